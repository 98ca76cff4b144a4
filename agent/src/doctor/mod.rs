//! `tally doctor`: checks this node point by point and says what to fix.
//!
//! [`node`] checks what the agent samples with (NVML, privileges, cgroups,
//! BTF, bpffs, each eBPF probe); [`setup`] checks what the config asks of
//! the node (kubelet socket, cgroup delegation, directories, aggregator).
//! A [`Report`] prints each check as it finishes, then a summary.

mod node;
mod setup;

use std::{io::Write, path::Path, process::ExitCode};

use serde::Serialize;

pub use self::{
    node::{checks, checks_lazy, effective_caps, probe_checks},
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
        let (status, text) = check.verdict.parts();
        match status {
            "ok" => self.summary.ok += 1,
            "warn" => self.summary.warn += 1,
            _ => self.summary.fail += 1,
        }
        if self.format == Format::Text {
            let tag = match status {
                "ok" => "ok  ",
                "warn" => "warn",
                _ => "FAIL",
            };
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

/// Runs the node checks and prints them; exit 1 if any failed.
pub fn run(nvml_lib: &Path) -> ExitCode {
    let mut r = Report::new(Format::Text);
    r.extend(checks_lazy(nvml_lib));
    r.finish()
}

/// The node checks, then a real load and attach of every eBPF probe as
/// `config` sets them up (in a throwaway pin directory); exit 1 if any failed.
pub fn run_with_probes(nvml_lib: &Path, config: &crate::probes::ProbesConfig) -> ExitCode {
    let mut r = Report::new(Format::Text);
    r.extend(checks_lazy(nvml_lib));
    r.extend(probe_checks(config));
    r.finish()
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
