//! The ingest ceiling: open-loop steps of offered reports/s against a
//! fresh aggregator (or two on one PostgreSQL) until p99 passes 1 s.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{runtime::Runtime, sync::Semaphore};

use super::{AUTH, CEILING_P99_S, CONNECTIONS, MAX_IN_FLIGHT, report, tokens, unix_ms};
use crate::bench::{
    Check, Ctx, Section, Verdict, failed,
    ledger::{Aggregator, Backend, Db, start_aggregator, write_config},
    util::{self, Stats},
};

/// One step of a ceiling run: an offered rate held for a while.
struct Step {
    offered: f64,
    ok: u64,
    failed: u64,
    secs: f64,
    /// Scheduled send → 2xx (or failure), s: queueing in the generator
    /// counts, so an overloaded aggregator cannot hide it.
    latency: Stats,
    loadgen_cpu: f64,
}

impl Step {
    fn passes(&self) -> bool {
        self.failed == 0
            && self.latency.p99 <= CEILING_P99_S
            && self.ok as f64 >= 0.95 * self.offered * self.secs
    }
}

/// A ceiling run on `backend` with `replicas` aggregators behind a
/// round-robin generator: open-loop steps of `rates`, each for `step`,
/// until one fails; then the ledger is counted.
fn ceiling(
    ctx: &Ctx,
    rt: &Runtime,
    backend: Backend,
    replicas: usize,
    rates: &[f64],
    step: Duration,
) -> anyhow::Result<(Vec<Step>, String)> {
    let dir = util::scratch(&format!("fleet-ceiling-{}-{replicas}", backend.name()))?;
    let db = match backend {
        Backend::Sqlite => Db::sqlite(&dir),
        Backend::Postgres => Db::postgres()?,
    };
    let nodes = 1000;
    let tokens = tokens(nodes);
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let config = write_config(&dir, &db, CONNECTIONS, &refs, AUTH)?;
    let mut aggs: Vec<Aggregator> = Vec::new();
    for r in 0..replicas {
        let addr = SocketAddr::from(([127, 0, 0, 1], tally_e2e::free_port()));
        aggs.push(start_aggregator(
            &ctx.tally,
            &config,
            addr,
            &dir.join(format!("aggregator-{r}.log")),
        )?);
    }
    let urls: Arc<[String]> = aggs
        .iter()
        .map(|a| format!("http://{}/api/v1/reports", a.addr))
        .collect();
    let tokens: Arc<[String]> = tokens.into();
    let boot: Arc<str> = format!("ceiling-{}", std::process::id()).into();
    let seqs: Arc<[AtomicU64]> = (0..nodes).map(|_| AtomicU64::new(0)).collect();
    // Intervals a day back: a node sends faster than real time here.
    let base_ms = unix_ms() - 86_400_000;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .build()?;
    let mut steps = Vec::new();
    for &rate in rates {
        eprintln!(
            "bench: ceiling on {} × {replicas}: {rate:.0} reports/s",
            backend.name()
        );
        let gen0 = util::cpu_seconds(std::process::id())?;
        let total = (rate * step.as_secs_f64()) as u64;
        let results: Vec<(f64, bool)> = rt.block_on(async {
            let gate = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
            let start = tokio::time::Instant::now();
            let mut handles = Vec::with_capacity(total as usize);
            for k in 0..total {
                let at = start + Duration::from_secs_f64(k as f64 / rate);
                tokio::time::sleep_until(at).await;
                let node = k as usize % nodes;
                let seq = seqs[node].fetch_add(1, Ordering::Relaxed);
                let (client, gate, boot) = (client.clone(), gate.clone(), boot.clone());
                let url = urls[k as usize % urls.len()].clone();
                let token = tokens[node].clone();
                handles.push(tokio::spawn(async move {
                    let _permit = gate.acquire_owned().await;
                    let r = report(node, &boot, seq, base_ms + seq * 10_000);
                    let ok = match serde_json::to_vec(&r) {
                        Ok(body) => client
                            .post(url)
                            .bearer_auth(token)
                            .header(reqwest::header::CONTENT_TYPE, "application/json")
                            .body(body)
                            .send()
                            .await
                            .is_ok_and(|a| a.status().is_success()),
                        Err(_) => false,
                    };
                    (at.elapsed().as_secs_f64(), ok)
                }));
            }
            let mut out = Vec::with_capacity(handles.len());
            for h in handles {
                out.push(h.await.unwrap_or((f64::INFINITY, false)));
            }
            out
        });
        let secs = step.as_secs_f64();
        let ok = results.iter().filter(|r| r.1).count() as u64;
        let latencies: Vec<f64> = results.iter().map(|r| r.0).collect();
        let s = Step {
            offered: rate,

            ok,
            failed: total - ok,
            secs,
            latency: Stats::of(&latencies),
            loadgen_cpu: (util::cpu_seconds(std::process::id())? - gen0) / secs * 100.0,
        };
        let pass = s.passes();
        steps.push(s);
        if !pass {
            break;
        }
    }
    let ok: u64 = steps.iter().map(|s| s.ok).sum();
    let stored = db.count("reports")?;
    drop(aggs);
    let ledger = if stored == ok {
        format!("{stored} reports in the ledger, one per 2xx answer: complete")
    } else {
        format!(
            "{stored} reports in the ledger for {ok} 2xx answers (the difference: requests \
             that timed out after the aggregator had stored them)"
        )
    };
    Ok((steps, ledger))
}

/// Runs the ceiling on each backend and writes its table and checks into
/// `s`; a backend that fails says so and the others still run.
pub(super) fn section(ctx: &Ctx, rt: &Runtime, s: &mut Section) {
    let (rates, step): (&[f64], _) = if ctx.quick {
        (&[50.0, 100.0, 200.0], Duration::from_secs(3))
    } else {
        (
            // Steps of √2: the ceiling is known to within 41 %.
            &[
                100.0, 141.0, 200.0, 283.0, 400.0, 566.0, 800.0, 1131.0, 1600.0, 2263.0, 3200.0,
                4525.0, 6400.0,
            ],
            Duration::from_secs(10),
        )
    };
    let _ = writeln!(
        s.body,
        "\n**Ingest ceiling.** The same reports from 1,000 nodes (one token each), sent open \
         loop at a fixed rate for {} s per step (rates {}; at most {MAX_IN_FLIGHT} requests \
         in flight), latency from each report's scheduled send to its 2xx, so a backlog in the \
         generator counts; the steps stop at the first where p99 passes {CEILING_P99_S} s, a \
         request fails or fewer than 95 % of the offered reports are stored. Each backend \
         fresh; two replicas share one PostgreSQL, the generator alternates between them.\n\n\
         | backend | offered reports/s | stored reports/s | p50 ms | p99 ms | max ms | failed \
         | load generator CPU % |\n| --- | --- | --- | --- | --- | --- | --- | --- |",
        step.as_secs(),
        rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut ceilings = Vec::new();
    for (backend, replicas, target) in [
        (Backend::Sqlite, 1, "≥ 2,000 reports/s"),
        (Backend::Postgres, 1, "≥ 1,000 reports/s"),
        (Backend::Postgres, 2, "more than one replica"),
    ] {
        let label = if replicas == 1 {
            backend.name().to_owned()
        } else {
            format!("{} × {replicas} replicas", backend.name())
        };
        let what = format!("9. ingest ceiling ({label})");
        match ceiling(ctx, rt, backend, replicas, rates, step) {
            Ok((steps, ledger)) => {
                for st in &steps {
                    let _ = writeln!(
                        s.body,
                        "| {label} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {:.0} |",
                        st.offered,
                        st.ok as f64 / st.secs,
                        st.latency.median * 1000.0,
                        st.latency.p99 * 1000.0,
                        st.latency.max * 1000.0,
                        st.failed,
                        st.loadgen_cpu
                    );
                }
                let best = steps
                    .iter()
                    .filter(|s| s.passes())
                    .map(|s| s.offered)
                    .fold(0.0, f64::max);
                let past = steps.iter().find(|s| !s.passes());
                let measured = match past {
                    Some(p) => format!(
                        "p99 ≤ 1 s up to {best:.0} reports/s; at {:.0}: p99 {:.2} s, {} failed; {ledger}",
                        p.offered, p.latency.p99, p.failed
                    ),
                    None => format!(
                        "p99 ≤ 1 s at every step, up to {best:.0} reports/s (the generator's \
                         highest); {ledger}"
                    ),
                };
                ceilings.push(best);
                let pass = match (backend, replicas) {
                    (Backend::Sqlite, _) => best >= 2000.0,
                    (Backend::Postgres, 1) => best >= 1000.0,
                    _ => ceilings.get(1).is_some_and(|&one| best > one),
                };
                s.checks
                    .push(Check::new(what, target, measured, Verdict::of(pass)));
            }
            Err(e) => {
                ceilings.push(0.0);
                let f = failed(&what, &e);
                let _ = writeln!(s.body, "| {label} | failed: {} |", f.checks[0].measured);
                s.checks.extend(f.checks);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_fails_on_p99_failures_or_shortfall() {
        let step = |p99: f64, ok: u64, failed: u64| Step {
            offered: 100.0,
            ok,
            failed,
            secs: 10.0,
            latency: Stats {
                p99,
                ..Default::default()
            },
            loadgen_cpu: 0.0,
        };
        assert!(step(0.5, 1000, 0).passes());
        assert!(!step(1.5, 1000, 0).passes());
        assert!(!step(0.5, 999, 1).passes());
        assert!(!step(0.5, 900, 0).passes());
    }
}
