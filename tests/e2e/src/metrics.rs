//! A scraped `/metrics`, parsed by `openmetrics-parser` and flattened back
//! into the series a scrape shows (`x_total`, `x_created`, `x_bucket`…), so
//! tests find a sample by the name the README's metric reference gives.

use std::collections::BTreeMap;

use openmetrics_parser::{
    HistogramValue, MetricNumber, MetricsExposition, OpenMetricsValue, PrometheusValue,
    RenderableMetricValue, SummaryValue, openmetrics, prometheus,
};

/// One sample of the exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed Prometheus/OpenMetrics text exposition.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses OpenMetrics text (it ends with `# EOF`, as the agent's and
    /// the aggregator's do) or else the Prometheus text format. Panics on
    /// text that is neither: a malformed exposition is a bug to see.
    pub fn parse(text: &str) -> Metrics {
        Metrics::try_parse(text).unwrap_or_else(|e| panic!("{e}; the exposition:\n{text}"))
    }

    /// [`Metrics::parse`], with the parser's complaint as an error.
    pub fn try_parse(text: &str) -> Result<Metrics, String> {
        let mut samples = Vec::new();
        if text.lines().any(|l| l.trim_end() == "# EOF") {
            let text = accepted_by_parser(text);
            let exposition = openmetrics::parse_openmetrics(&text)
                .map_err(|e| format!("not valid OpenMetrics: {e}"))?;
            flatten(&exposition, &mut samples, |value, push| match value {
                OpenMetricsValue::Unknown(n)
                | OpenMetricsValue::Gauge(n)
                | OpenMetricsValue::StateSet(n) => push("", None, n.as_f64()),
                OpenMetricsValue::Counter(c) => {
                    push("_total", None, c.value.as_f64());
                    if let Some(created) = c.created {
                        push("_created", None, created);
                    }
                }
                OpenMetricsValue::Histogram(h) => {
                    histogram(h, ["_bucket", "_sum", "_count", "_created"], push)
                }
                OpenMetricsValue::GaugeHistogram(h) => {
                    histogram(h, ["_bucket", "_gsum", "_gcount", "_created"], push)
                }
                OpenMetricsValue::Summary(v) => summary(v, push),
                OpenMetricsValue::Info => push("_info", None, 1.0),
            })?;
        } else {
            let exposition = prometheus::parse_prometheus(text)
                .map_err(|e| format!("not valid Prometheus text: {e}"))?;
            flatten(&exposition, &mut samples, |value, push| match value {
                PrometheusValue::Unknown(n) | PrometheusValue::Gauge(n) => {
                    push("", None, n.as_f64())
                }
                PrometheusValue::Counter(c) => push("", None, c.value.as_f64()),
                PrometheusValue::Histogram(h) => {
                    histogram(h, ["_bucket", "_sum", "_count", "_created"], push)
                }
                PrometheusValue::Summary(v) => summary(v, push),
            })?;
        }
        Ok(Metrics { samples })
    }

    /// Samples of `name` whose labels include every pair of `labels`.
    pub fn select<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The one sample matching, if exactly one does.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut it = self.select(name, labels);
        let first = it.next()?;
        assert!(
            it.next().is_none(),
            "more than one series of {name} matches {labels:?}"
        );
        Some(first.value)
    }

    /// Sum over every sample matching.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.select(name, labels).map(|s| s.value).sum()
    }

    /// How much the sum over every sample matching grew since `earlier`
    /// (a counter's increase between two scrapes).
    pub fn increase(&self, earlier: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sum(name, labels) - earlier.sum(name, labels)
    }

    /// Number of series in the exposition.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether the exposition has no series.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// `text` as openmetrics-parser 0.5 accepts it. The OpenMetrics spec
/// allows, and prometheus-client writes, two things that parser refuses:
/// a family with no samples yet (a labelled counter before its first
/// increment), and a `# UNIT` on a histogram or summary. Their metadata
/// lines are dropped; every sample line is kept.
fn accepted_by_parser(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // Metadata of the current family, held until its first sample.
    let mut held: Vec<&str> = Vec::new();
    let mut family = "";
    let mut distribution = false;
    for line in text.lines() {
        let meta = ["# HELP ", "# TYPE ", "# UNIT "]
            .iter()
            .find_map(|p| line.strip_prefix(p));
        match meta {
            Some(rest) => {
                let name = rest.split_whitespace().next().unwrap_or("");
                if name != family {
                    // A new family: the previous one's unflushed metadata
                    // had no samples.
                    held.clear();
                    family = name;
                    distribution = false;
                }
                if line.starts_with("# TYPE ") {
                    distribution = matches!(
                        rest.split_whitespace().nth(1),
                        Some("histogram" | "gaugehistogram" | "summary")
                    );
                }
                if !(line.starts_with("# UNIT ") && distribution) {
                    held.push(line);
                }
            }
            None => {
                if !line.starts_with('#') {
                    for h in held.drain(..) {
                        out.push_str(h);
                        out.push('\n');
                    }
                }
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

type Push<'a> = dyn FnMut(&str, Option<(&str, String)>, f64) + 'a;

/// Flattens every sample of `exposition` into `samples`: `series` pushes
/// the series one sample's value shows as (name suffix, an extra label,
/// value), each with the sample's labels.
fn flatten<T: Clone, V: RenderableMetricValue + Clone>(
    exposition: &MetricsExposition<T, V>,
    samples: &mut Vec<Sample>,
    series: impl Fn(&V, &mut Push<'_>),
) -> Result<(), String> {
    for family in exposition.families.values() {
        let name = family.family_name.as_str();
        for s in family.iter_samples() {
            let labels = labels_of(s.get_labelset().map_err(|e| e.to_string())?.iter());
            let mut push = |suffix: &str, extra: Option<(&str, String)>, value: f64| {
                let mut labels = labels.clone();
                if let Some((k, v)) = extra {
                    labels.insert(k.to_owned(), v);
                }
                samples.push(Sample {
                    name: format!("{name}{suffix}"),
                    labels,
                    value,
                });
            };
            series(&s.value, &mut push);
        }
    }
    Ok(())
}

fn labels_of<'a>(it: impl Iterator<Item = (&'a String, &'a String)>) -> BTreeMap<String, String> {
    it.map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn bound(f: f64) -> String {
    match f {
        f64::INFINITY => "+Inf".into(),
        f64::NEG_INFINITY => "-Inf".into(),
        f => f.to_string(),
    }
}

fn histogram(h: &HistogramValue, [bucket, sum, count, created]: [&str; 4], push: &mut Push<'_>) {
    for b in &h.buckets {
        push(bucket, Some(("le", bound(b.upper_bound))), b.count.as_f64());
    }
    if let Some(s) = h.sum {
        push(sum, None, s.as_f64());
    }
    if let Some(c) = h.count {
        push(count, None, c as f64);
    }
    if let Some(c) = h.created {
        push(created, None, c);
    }
}

fn summary(v: &SummaryValue, push: &mut Push<'_>) {
    for q in &v.quantiles {
        push("", Some(("quantile", bound(q.quantile))), q.value.as_f64());
    }
    if let Some(s) = v.sum {
        push("_sum", None, MetricNumber::as_f64(&s));
    }
    if let Some(c) = v.count {
        push("_count", None, c as f64);
    }
    if let Some(c) = v.created {
        push("_created", None, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_parses_with_units_totals_and_created() {
        let m = Metrics::parse(concat!(
            "# HELP tally_x_seconds X.\n",
            "# TYPE tally_x_seconds counter\n",
            "# UNIT tally_x_seconds seconds\n",
            "tally_x_seconds_total{tenant=\"ac\\\"me\",gpu=\"0\"} 1.5\n",
            "tally_x_seconds_created{tenant=\"ac\\\"me\",gpu=\"0\"} 1700000000.0\n",
            "tally_x_seconds_total{tenant=\"a,b=c\",gpu=\"1\"} 2\n",
            "# HELP tally_up Up.\n",
            "# TYPE tally_up gauge\n",
            "tally_up 1\n",
            "# HELP tally_d_seconds D.\n",
            "# TYPE tally_d_seconds histogram\n",
            "# UNIT tally_d_seconds seconds\n",
            "tally_d_seconds_sum 0.5\n",
            "tally_d_seconds_count 2\n",
            "tally_d_seconds_bucket{le=\"0.1\"} 1\n",
            "tally_d_seconds_bucket{le=\"+Inf\"} 2\n",
            "# EOF\n",
        ));
        assert_eq!(
            m.value("tally_x_seconds_total", &[("tenant", "ac\"me")]),
            Some(1.5)
        );
        assert_eq!(
            m.value("tally_x_seconds_created", &[("gpu", "0")]),
            Some(1.7e9)
        );
        assert_eq!(
            m.value("tally_x_seconds_total", &[("tenant", "a,b=c")]),
            Some(2.0)
        );
        assert_eq!(m.sum("tally_x_seconds_total", &[]), 3.5);
        assert_eq!(m.value("tally_x_seconds_total", &[("gpu", "2")]), None);
        assert_eq!(m.value("tally_up", &[]), Some(1.0));
        assert_eq!(m.value("tally_d_seconds_count", &[]), Some(2.0));
        assert_eq!(
            m.value("tally_d_seconds_bucket", &[("le", "+Inf")]),
            Some(2.0)
        );
        assert_eq!(m.len(), 8);
    }

    #[test]
    fn prometheus_text_parses() {
        let m = Metrics::parse(
            "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3 1700000000\n# TYPE b gauge\nb 2\n",
        );
        assert_eq!(m.value("a_total", &[("x", "1")]), Some(3.0));
        assert_eq!(m.value("b", &[]), Some(2.0));
    }

    #[test]
    fn the_agents_exposition_parses() {
        let m = Metrics::parse(include_str!("../testdata/agent-metrics.txt"));
        assert_eq!(m.select("tally_gpu_info", &[]).count(), 1);
        assert!(m.value("tally_samples_total", &[]).is_some_and(|n| n > 0.0));
        assert!(m.value("tally_sample_duration_seconds", &[]).is_some());
    }

    #[test]
    fn families_without_samples_and_units_on_histograms_are_accepted() {
        let m = Metrics::parse(concat!(
            "# HELP a Empty so far.\n",
            "# TYPE a counter\n",
            "# HELP h H.\n",
            "# TYPE h histogram\n",
            "# UNIT h seconds\n",
            "h_sum 1.0\n",
            "h_count 1\n",
            "h_bucket{le=\"+Inf\"} 1\n",
            "# HELP b B.\n",
            "# TYPE b gauge\n",
            "b{x=\"1\"} 1.0\n",
            "# EOF\n",
        ));
        assert_eq!(m.value("b", &[("x", "1")]), Some(1.0));
        assert_eq!(m.value("h_count", &[]), Some(1.0));
        assert_eq!(m.select("a_total", &[]).count(), 0);
    }

    #[test]
    fn malformed_openmetrics_is_refused() {
        assert!(Metrics::try_parse("# TYPE x counter\nx_total{ 1\n# EOF\n").is_err());
    }
}
