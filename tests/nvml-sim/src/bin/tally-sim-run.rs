//! `tally-sim-run`: run a command as a process on a simulated GPU.
//!
//! Registers its own pid in the simulator's state directory, then `exec`s
//! the command, so the registered pid is the workload's.
#![forbid(unsafe_code)]
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{os::unix::process::CommandExt, path::PathBuf, process::Command};

use clap::Parser;
use nvml_sim::{ProcKind, Registration};

/// Run CMD as a process using a simulated GPU (see tests/nvml-sim/README.md).
#[derive(Debug, Parser)]
#[command(name = "tally-sim-run", version)]
struct Args {
    /// The simulator's state directory (as in TALLY_SIM_STATE).
    #[arg(long, env = "TALLY_SIM_STATE", value_name = "DIR")]
    state: PathBuf,
    /// NVML index of the GPU.
    #[arg(long, value_name = "INDEX")]
    gpu: u32,
    /// MIG instance on that GPU (position in the scenario's `mig` list).
    #[arg(long, value_name = "INDEX")]
    mig: Option<u32>,
    /// GPU memory the process holds, MiB.
    #[arg(long, value_name = "MIB")]
    memory_mib: u64,
    /// SM utilization of the process, 0..=1.
    #[arg(long, value_name = "FRACTION", value_parser = parse_sm)]
    sm: f64,
    /// Which NVML call lists the process: compute, graphics or mps.
    #[arg(long, value_name = "KIND", default_value = "compute", value_parser = parse_kind)]
    kind: ProcKind,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

fn parse_sm(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is outside 0..=1"))
    }
}

fn parse_kind(s: &str) -> Result<ProcKind, String> {
    match s {
        "compute" => Ok(ProcKind::Compute),
        "graphics" => Ok(ProcKind::Graphics),
        "mps" => Ok(ProcKind::Mps),
        _ => Err(format!("{s:?} is not one of compute, graphics, mps")),
    }
}

fn main() {
    let args = Args::parse();
    let reg = Registration {
        gpu: args.gpu,
        mig: args.mig,
        memory_mib: args.memory_mib,
        sm: args.sm,
        kind: args.kind,
    };
    let pid = std::process::id();
    if let Err(e) = nvml_sim::register(&args.state, pid, &reg) {
        eprintln!("tally-sim-run: cannot register pid {pid}: {e}");
        std::process::exit(1);
    }
    let (cmd, rest) = args.command.split_first().expect("clap requires CMD");
    let err = Command::new(cmd).args(rest).exec();
    // exec only returns on failure; leave no registration behind.
    let _ = nvml_sim::unregister(&args.state, pid);
    eprintln!("tally-sim-run: cannot run {cmd:?}: {err}");
    std::process::exit(127);
}
