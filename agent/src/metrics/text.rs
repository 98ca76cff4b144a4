//! The snapshot's families written by hand, as prometheus-client writes
//! them.
//!
//! prometheus-client writes each sample as a dozen `fmt::Write` calls
//! through `dyn Write` (name, unit, suffix, `{`, each label key, `="`,
//! value, `"`, …), and its label sets are owned values: a scrape of
//! benchmark 1's node spent two thirds of its encoding there, and a tenth
//! in allocating the cloned label values. Here a sample is a few
//! `push_str`s of borrowed strings. Every family goes through one code
//! path, [`Sink`]: in the agent it is the body's `String`; in tests it is
//! also prometheus-client's own encoder, and a test compares the two texts
//! for a whole snapshot. The text is the same but for the digits of
//! fractional values: zmij writes the shortest digits that read back as
//! the same number, where prometheus-client's dtoa (Grisu2) sometimes
//! writes a longer string of them, and at a third of dtoa's instructions;
//! and for label values with a quote or a backslash, escaped here
//! where prometheus-client 0.23 writes them as given (a text no parser
//! reads).

use prometheus_client::{metrics::MetricType, registry::Unit};
use tally_contract::tenant::write_label_value;

use super::{Family, Number};

/// A sample's labels: `(key, value)` pairs, written in order.
pub(super) trait Labels {
    fn pairs(&self) -> impl Iterator<Item = (&str, &str)>;
}

impl<V: AsRef<str>, const N: usize> Labels for [(&'static str, V); N] {
    fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.iter().map(|(k, v)| (*k, v.as_ref()))
    }
}

/// Where families are written.
pub(super) trait Sink {
    /// Writes `family` with its samples, of which there is at least one
    /// ([`Family::encode`] leaves out a family without samples, as
    /// prometheus-client does).
    fn family<L: Labels>(
        &mut self,
        family: &Family<'_>,
        samples: impl Iterator<Item = (L, f64)>,
    ) -> std::fmt::Result;
}

impl Sink for String {
    fn family<L: Labels>(
        &mut self,
        family: &Family<'_>,
        samples: impl Iterator<Item = (L, f64)>,
    ) -> std::fmt::Result {
        let unit = family.unit.as_ref().map(Unit::as_str);
        descriptor(self, family.name, family.help, unit, family.kind);
        let counter = matches!(family.kind, MetricType::Counter);
        let mut numbers = Numbers::default();
        for (labels, value) in samples {
            series(self, family.name, unit, counter);
            self.push('{');
            for (i, (key, value)) in labels.pairs().enumerate() {
                if i > 0 {
                    self.push(',');
                }
                self.push_str(key);
                self.push_str("=\"");
                write_label_value(self, value)?;
                self.push('"');
            }
            self.push_str("} ");
            numbers.push(self, counter, value);
            self.push('\n');
        }
        Ok(())
    }
}

/// A family's `# HELP`, `# TYPE` and (with a unit) `# UNIT` lines.
pub(super) fn descriptor(
    out: &mut String,
    name: &str,
    help: &str,
    unit: Option<&str>,
    kind: MetricType,
) {
    let lines = [
        ("# HELP ", Some(help)),
        ("# TYPE ", Some(kind.as_str())),
        ("# UNIT ", unit),
    ];
    for (line, tail) in lines {
        let Some(tail) = tail else { continue };
        out.push_str(line);
        out.push_str(name);
        if let Some(unit) = unit {
            out.push('_');
            out.push_str(unit);
        }
        out.push(' ');
        out.push_str(tail);
        out.push('\n');
    }
}

/// A sample's name: the family's, its unit, and `_total` for a counter.
pub(super) fn series(out: &mut String, name: &str, unit: Option<&str>, counter: bool) {
    out.push_str(name);
    if let Some(unit) = unit {
        out.push('_');
        out.push_str(unit);
    }
    if counter {
        out.push_str("_total");
    }
}

/// Buffers to write sample values in.
#[derive(Default)]
pub(super) struct Numbers {
    ints: itoa::Buffer,
    floats: zmij::Buffer,
}

impl Numbers {
    /// Appends `value` as [`Number::of`] says it is written.
    pub(super) fn push(&mut self, out: &mut String, counter: bool, value: f64) {
        out.push_str(match Number::of(counter, value) {
            Number::Unsigned(v) => self.ints.format(v),
            Number::Signed(v) => self.ints.format(v),
            // NaN and infinities spelled as prometheus-client's dtoa
            // spells them (`NaN`, `inf`, `-inf`).
            Number::Float(v) => self.floats.format(v),
        });
    }
}

#[cfg(test)]
pub(super) mod reference {
    //! prometheus-client's encoder as a [`Sink`], to compare against.

    use prometheus_client::{
        collector::Collector,
        encoding::{DescriptorEncoder, EncodeMetric},
        metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
        registry::Registry,
    };

    use super::{Family, Labels, Number, Sink};

    impl Sink for DescriptorEncoder<'_> {
        fn family<L: Labels>(
            &mut self,
            family: &Family<'_>,
            samples: impl Iterator<Item = (L, f64)>,
        ) -> std::fmt::Result {
            let mut metric = self.encode_descriptor(
                family.name,
                family.help,
                family.unit.as_ref(),
                family.kind,
            )?;
            let counter = matches!(family.kind, MetricType::Counter);
            for (labels, value) in samples {
                let labels: Vec<(&str, &str)> = labels.pairs().collect();
                let family = metric.encode_family(&labels)?;
                // `of` gives `Unsigned` to counters only and `Signed` to gauges only.
                match Number::of(counter, value) {
                    Number::Unsigned(v) => ConstCounter::new(v).encode(family)?,
                    Number::Signed(v) => ConstGauge::new(v).encode(family)?,
                    Number::Float(v) if counter => ConstCounter::new(v).encode(family)?,
                    Number::Float(v) => ConstGauge::new(v).encode(family)?,
                }
            }
            Ok(())
        }
    }

    /// What prometheus-client writes for `collector`, `# EOF` included.
    pub(in crate::metrics) fn encode_collector(out: &mut String, collector: impl Collector) {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(collector));
        prometheus_client::encoding::text::encode_registry(out, &registry)
            .expect("prometheus-client encodes the collector");
    }

    /// The same lines, each sample's value the same number (NaN for NaN),
    /// however its digits are written.
    pub(in crate::metrics) fn same_samples(mine: &str, theirs: &str) {
        let (mine, theirs): (Vec<&str>, Vec<&str>) =
            (mine.lines().collect(), theirs.lines().collect());
        assert_eq!(mine.len(), theirs.len(), "{mine:#?}\n{theirs:#?}");
        for (m, t) in mine.iter().zip(&theirs) {
            if m.starts_with('#') {
                assert_eq!(m, t);
                continue;
            }
            let (m_series, m_value) = m.rsplit_once(' ').expect("a sample line");
            let (t_series, t_value) = t.rsplit_once(' ').expect("a sample line");
            assert_eq!(m_series, t_series);
            let (a, b): (f64, f64) = (m_value.parse().unwrap(), t_value.parse().unwrap());
            assert!(a == b || (a.is_nan() && b.is_nan()), "{m} against {t}");
        }
    }
}
