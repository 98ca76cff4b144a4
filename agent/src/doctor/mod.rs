//! `tally doctor`: checks this node point by point and says what to fix.
//!
//! [`node`] checks what the agent samples with (NVML, privileges, cgroups,
//! BTF, bpffs, each eBPF probe); [`setup`] checks what the config asks of
//! the node (kubelet socket, cgroup delegation, directories, aggregator).
//! A [`Report`] prints each check as it finishes, then a summary.

mod node;
mod setup;

use std::{io::Write, process::ExitCode};

use serde::Serialize;

pub use self::{
    node::{checks_lazy, probe_checks},
    setup::{AggregatorAnswer, aggregator_verdict, config_checks},
};

/// Outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok(String),
    /// Works, with a caveat.
    Warn(String),
    /// Does not work; the text says what to do.
    Fail(String),
}

impl Verdict {
    fn parts(&self) -> (&'static str, &str) {
        match self {
            Verdict::Ok(t) => ("ok", t),
            Verdict::Warn(t) => ("warn", t),
            Verdict::Fail(t) => ("fail", t),
        }
    }
}

/// One line of the doctor's report.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
}

/// How the report is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// One `[tag] name text` line per check as it finishes, then
    /// `N ok, N warn, N fail`.
    #[default]
    Text,
    /// One JSON document at the end: `{"checks": [...], "summary": {...}}`.
    Json,
}

#[derive(Debug, Default, Serialize)]
struct Summary {
    ok: usize,
    warn: usize,
    fail: usize,
}

#[derive(Serialize)]
struct JsonCheck<'a> {
    name: &'a str,
    status: &'a str,
    detail: &'a str,
}

/// Collects checks, printing each at once in text form.
#[derive(Debug, Default)]
pub struct Report {
    format: Format,
    checks: Vec<Check>,
    summary: Summary,
}

impl Report {
    pub fn new(format: Format) -> Report {
        Report {
            format,
            ..Report::default()
        }
    }

    /// Records a check (printing it now in text form).
    pub fn add(&mut self, check: Check) {
        let (count, tag, text) = match &check.verdict {
            Verdict::Ok(t) => (&mut self.summary.ok, "ok  ", t),
            Verdict::Warn(t) => (&mut self.summary.warn, "warn", t),
            Verdict::Fail(t) => (&mut self.summary.fail, "FAIL", t),
        };
        *count += 1;
        if self.format == Format::Text {
            println!("[{tag}] {:<12} {text}", check.name);
            // Each line shows up as its check finishes, piped or not.
            let _ = std::io::stdout().flush();
        }
        self.checks.push(check);
    }

    pub fn extend(&mut self, checks: impl IntoIterator<Item = Check>) {
        for c in checks {
            self.add(c);
        }
    }

    /// Prints the summary (or the JSON document); failure if any failed.
    pub fn finish(self) -> ExitCode {
        let s = &self.summary;
        match self.format {
            Format::Text => println!("{} ok, {} warn, {} fail", s.ok, s.warn, s.fail),
            Format::Json => {
                let checks: Vec<_> = self
                    .checks
                    .iter()
                    .map(|c| {
                        let (status, detail) = c.verdict.parts();
                        JsonCheck {
                            name: c.name,
                            status,
                            detail,
                        }
                    })
                    .collect();
                let doc = serde_json::json!({ "checks": checks, "summary": s });
                println!("{doc:#}");
            }
        }
        if s.fail > 0 {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_each_verdict() {
        let mut r = Report::new(Format::Json);
        r.add(Check {
            name: "a",
            verdict: Verdict::Ok("fine".into()),
        });
        r.add(Check {
            name: "b",
            verdict: Verdict::Warn("hm".into()),
        });
        r.add(Check {
            name: "c",
            verdict: Verdict::Fail("no".into()),
        });
        assert_eq!((r.summary.ok, r.summary.warn, r.summary.fail), (1, 1, 1));
        assert_eq!(r.finish(), ExitCode::FAILURE);
    }
}
