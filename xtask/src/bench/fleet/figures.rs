//! The fleet run's report: its table, the ledger's sizes, its checks.

use std::fmt::Write as _;

use super::{CEILING_P99_S, FleetRun, INTERVAL, Scale};
use crate::bench::{Check, Section, Verdict, util::Stats};

/// The fleet run's table, notes and checks.
pub(super) fn fleet_figures(
    s: &mut Section,
    f: &FleetRun,
    problems: &[String],
    sizes: &[(&str, u64, u64)],
    scale: Scale,
    load_before: &str,
) {
    let offered = scale.agents as f64 / INTERVAL.as_secs_f64();
    let made: u64 = f.logs.iter().map(|l| l.created).sum();
    let delivered: u64 = f.logs.iter().map(|l| l.delivered).sum();
    let failures: u64 = f.logs.iter().map(|l| l.failures).sum();
    let refused: Vec<&String> = f.logs.iter().flat_map(|l| &l.refused).collect();
    let unsent: usize = f.logs.iter().map(|l| l.unsent).sum();
    let sent_us: u64 = f.logs.iter().map(|l| l.allocated_us).sum();
    let lat: Vec<f64> = f.logs.iter().flat_map(|l| l.latency_ms.clone()).collect();
    let delayed: Vec<f64> = f.logs.iter().flat_map(|l| l.delayed_s.clone()).collect();
    let lat = Stats::of(&lat);
    let delayed_st = Stats::of(&delayed);
    // Whole 10-s windows from the first full interval to the end of making.
    let making_s = scale.minutes * 60.0;
    let end = (making_s as usize).min(f.per_second.len());
    let windows: Vec<f64> = f
        .per_second
        .get(10..end)
        .unwrap_or_default()
        .chunks_exact(10)
        .map(|w| w.iter().sum::<u64>() as f64 / 10.0)
        .collect();
    let win = Stats::of(&windows);
    // Windows far below the offered rate: outages (the SIGKILL's, or any
    // other), by their start in seconds from the start of the run.
    let low: Vec<String> = windows
        .iter()
        .enumerate()
        .filter(|(_, w)| **w < 0.5 * offered)
        .map(|(i, _)| format!("{}", 10 + i * 10))
        .collect();
    let kill_window = windows
        .get((f.kill_at_s as usize).saturating_sub(10) / 10)
        .copied()
        .unwrap_or(0.0);
    let per_core_agg = delivered as f64 / f.aggregator_cpu_s.max(1e-9);
    let per_core_all = delivered as f64 / (f.aggregator_cpu_s + f.postgres_cpu_s).max(1e-9);
    let _ = writeln!(
        s.body,
        "\n**Fleet run** ({} agents, {} min; load average {load_before} before, {} after):\n\n\
         | measure | value |\n| --- | --- |\n\
         | reports made / stored (2xx) | {made} / {delivered} |\n\
         | reports/s, whole run (stored ÷ {:.0} s) | {:.1} |\n\
         | reports/s per 10-s window: median (min–max) | {} |\n\
         | window holding the SIGKILL | {kill_window:.1} reports/s |\n\
         | windows below half the offered rate (start, s) | {} |\n\
         | ingest latency p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |\n\
         | aggregator down (SIGKILL at {:.0} s → `/readyz` 200) | {:.1} s |\n\
         | failed tries, resent later | {failures} |\n\
         | reports stored only on a later try: count, made → stored median / max | {} , {:.1} / {:.1} s |\n\
         | refused for good / left unsent | {} / {unsent} |\n\
         | aggregator CPU | {:.0} s ({:.1} % of one core) |\n\
         | PostgreSQL CPU (postmaster and backends) | {:.0} s ({:.1} % of one core) |\n\
         | load generator CPU | {:.0} s ({:.1} % of one core) |\n\
         | reports per CPU second: aggregator alone / with PostgreSQL | {per_core_agg:.0} / {per_core_all:.0} |\n",
        scale.agents,
        scale.minutes,
        crate::exec::loadavg(),
        f.secs,
        delivered as f64 / f.secs,
        win.show(1),
        if low.is_empty() {
            "none".to_owned()
        } else {
            low.join(", ")
        },
        lat.median,
        lat.p99,
        lat.max,
        f.kill_at_s,
        f.down_s,
        delayed.len(),
        delayed_st.median,
        delayed_st.max,
        refused.len(),
        f.aggregator_cpu_s,
        f.aggregator_cpu_s / f.secs * 100.0,
        f.postgres_cpu_s,
        f.postgres_cpu_s / f.secs * 100.0,
        f.loadgen_cpu_s,
        f.loadgen_cpu_s / f.secs * 100.0,
    );
    if let Some(r) = refused.first() {
        let _ = writeln!(s.body, "First refusal: `{r}`\n");
    }
    // Per node and day, from the rows the run wrote over its making time.
    let node_days = scale.agents as f64 * making_s / 86_400.0;
    let _ = writeln!(
        s.body,
        "Ledger after the run (PostgreSQL, rows and bytes of table, indexes and partitions; \
         per node and day scaled from {making_s:.0} s of {} nodes; the hourly rollups grow \
         per hour, not per report: a node writes 24 × (8 + 4) rollup rows a day whatever \
         the run's length):\n\n\
         | table | rows | bytes | bytes per row | rows per node and day | bytes per node and day |\n\
         | --- | --- | --- | --- | --- | --- |",
        scale.agents
    );
    for (t, rows, bytes) in sizes {
        let per_row = *bytes as f64 / (*rows).max(1) as f64;
        let (rpd, bpd) = if t.ends_with("_hourly") {
            let r = 24.0 * if *t == "gpu_usage_hourly" { 8.0 } else { 4.0 };
            (r, r * per_row)
        } else {
            (*rows as f64 / node_days, *bytes as f64 / node_days)
        };
        let _ = writeln!(
            s.body,
            "| `{t}` | {rows} | {bytes} | {per_row:.0} | {rpd:.0} | {:.1} MB |",
            bpd / 1e6
        );
    }
    let verdict = if problems.is_empty() {
        format!(
            "every report exactly once ({delivered} of {made}); GPU time {:.0} s in raw rows and \
             rollups, as sent",
            sent_us as f64 / 1e6
        )
    } else {
        format!(
            "{} problems, first: {}",
            problems.len(),
            problems
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        )
    };
    let _ = writeln!(s.body, "\nLedger check: {verdict}.");
    s.checks.push(Check::new(
        format!(
            "9. fleet, {} agents × 1 report/{} s, {} min, PostgreSQL, one SIGKILL",
            scale.agents,
            INTERVAL.as_secs(),
            scale.minutes
        ),
        format!("the offered {offered:.0} reports/s sustained, p99 ≤ 1 s"),
        format!(
            "{:.1} reports/s (10-s windows {}), p50 {:.1} ms, p99 {:.1} ms; down {:.1} s",
            delivered as f64 / f.secs,
            win.show(1),
            lat.median,
            lat.p99,
            f.down_s
        ),
        Verdict::of(win.median >= 0.95 * offered && lat.p99 <= CEILING_P99_S * 1000.0),
    ));
    s.checks.push(Check::new(
        "9. fleet ledger after the SIGKILL",
        "every report exactly once, GPU seconds equal to what was sent",
        verdict,
        Verdict::of(problems.is_empty() && unsent == 0 && refused.is_empty()),
    ));
}
