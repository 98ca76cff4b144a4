//! Benchmark 6's load-independent figure: instructions the SQLite ledger
//! writer spends per report, counted by callgrind. The ingest rates move
//! by a third from one run to the next on the shared machine, more than
//! most changes to ingest; this count repeats to a fraction of a percent.

use std::net::SocketAddr;

use anyhow::{Context as _, bail};

use super::{
    Check, Ctx, Section, Verdict, callgrind, failed,
    ledger::{AGENT_TOKEN, Db, ReportTemplate, start_aggregator, write_config},
    util,
};

/// The writer thread's function: every statement of every report runs in
/// it ([`callgrind::whole_run_wrapper`] says why not per call).
pub(super) const WRITER: &str = "tally_aggregator::ledger::writer::run";

/// Simulated nodes posting at once, so that reports queue and commit
/// together as they do under load.
const NODES: u64 = 16;

/// Reports per node in the short and the long run: the count per report
/// is the slope between the two, so start-up, migrations and each
/// statement's first preparation drop out.
const RUNS: [u64; 2] = [2, 12];

/// Benchmark 6's paragraph on the SQLite writer's count, and its line in
/// the summary.
pub(super) fn section(ctx: &Ctx) -> Section {
    const TITLE: &str = "6. SQLite writer instructions per report";
    eprintln!("bench: ingest on SQLite under callgrind");
    match sqlite_writer(ctx) {
        Ok(per) => Section {
            title: TITLE.into(),
            body: format!(
                "\n**SQLite writer, instructions per report:** {} (callgrind, user space, \
                 counted inside `{WRITER}` only: {NODES} nodes post {} reports each to a fresh \
                 ledger, then {} each to another; the figure is the slope between the two \
                 runs). It repeats to a fraction of a percent from run to run, where the rates \
                 above move by a third: a change to ingest shows here first.\n",
                callgrind::show(per),
                RUNS[0],
                RUNS[1],
            ),
            checks: vec![Check::new(TITLE, "", callgrind::show(per), Verdict::Info)],
        },
        Err(e) => failed(TITLE, &e),
    }
}

/// Instructions per report of the SQLite writer.
pub(super) fn sqlite_writer(ctx: &Ctx) -> anyhow::Result<f64> {
    let mut totals = [0.0; 2];
    for (total, reports) in totals.iter_mut().zip(RUNS) {
        *total = counted_run(ctx, reports).with_context(|| {
            format!("counting the SQLite writer over {reports} reports per node")
        })?;
    }
    per_report(totals)
}

/// The slope between the two runs' totals.
fn per_report([short, long]: [f64; 2]) -> anyhow::Result<f64> {
    if long <= short {
        bail!(
            "the longer run counted no more instructions ({long}) than the shorter ({short}): \
             the writer was not counted"
        );
    }
    Ok((long - short) / (NODES * (RUNS[1] - RUNS[0])) as f64)
}

/// A fresh SQLite ledger's aggregator under callgrind, `reports` reports
/// posted by each of [`NODES`] nodes; the writer's instructions.
fn counted_run(ctx: &Ctx, reports: u64) -> anyhow::Result<f64> {
    let dir = util::scratch(&format!("ingest-callgrind-{reports}"))?;
    let counted = callgrind::whole_run_wrapper(&ctx.tally, &dir, WRITER)?;
    let db = Db::sqlite(&dir);
    let config = write_config(&dir, &db, 4, &[AGENT_TOKEN], "")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], tally_e2e::free_port()));
    let mut agg = start_aggregator(&counted, &config, addr, &dir.join("aggregator.log"))?;
    let boot = format!("callgrind-{}", std::process::id());
    let start0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64
        - 400_000_000;
    let posted: Vec<_> = (0..NODES)
        .map(|n| {
            let reports_of = ReportTemplate::new(&format!("callgrind-{n:02}"), &boot);
            std::thread::spawn(move || -> anyhow::Result<()> {
                let client = tally_e2e::Client::new(addr).bearer(AGENT_TOKEN);
                for seq in 0..reports {
                    let s = start0 + seq * 10_000;
                    let r = client.post_json(
                        "/api/v1/reports",
                        reports_of.body(seq, s, s + 10_000).as_bytes(),
                    )?;
                    if r.status != 200 {
                        bail!("report {seq} answered {}: {}", r.status, r.text());
                    }
                }
                Ok(())
            })
        })
        .collect();
    for p in posted {
        p.join()
            .map_err(|_| anyhow::anyhow!("a posting thread panicked"))??;
    }
    // Callgrind writes its count when the aggregator exits on SIGTERM
    // (not when `stop` has to SIGKILL it).
    agg.proc.stop();
    callgrind::whole_run_total(&dir).context("the aggregator under callgrind left no count")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The figure is the slope per report between the runs, and a run
    /// that counted nothing more (the function name not matched) is an
    /// error, never a zero.
    #[test]
    fn the_count_is_the_slope_between_the_runs() {
        let per = per_report([1_000_000.0, 1_000_000.0 + 160.0 * 3_000_000.0]).unwrap();
        assert_eq!(per, 3_000_000.0);
        let e = per_report([5.0, 5.0]).unwrap_err();
        assert!(e.to_string().contains("not counted"), "{e}");
    }
}
