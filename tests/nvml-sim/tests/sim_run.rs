//! `tally-sim-run`: registers the workload's own pid, then execs it.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

mod common;

use std::{
    process::{Command, Stdio},
    thread::sleep,
    time::Duration,
};

use common::{ChildGuard, H100, H100_MIG, Sim};
use nvml_sim::{Registration, state};
use nvml_wrapper::enums::device::UsedGpuMemory;

const BIN: &str = env!("CARGO_BIN_EXE_tally-sim-run");

/// Waits (without a deadline assertion: the child may be slow on a loaded
/// machine) until the registration file exists, then reads it.
fn wait_registration(
    state_dir: &std::path::Path,
    pid: u32,
    child: &mut ChildGuard,
) -> Registration {
    let path = state::proc_file(state_dir, pid);
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            return toml::from_str(&text).expect("registration parses");
        }
        if let Some(status) = child.0.as_mut().unwrap().try_wait().unwrap() {
            panic!("tally-sim-run exited with {status} before registering");
        }
        sleep(Duration::from_millis(10));
    }
}

#[test]
fn registers_own_pid_and_execs() {
    let sim = Sim::new(H100_MIG);
    let child = Command::new(BIN)
        .args(["--state"])
        .arg(&sim.state)
        .args([
            "--gpu",
            "0",
            "--mig",
            "2",
            "--memory-mib",
            "4096",
            "--sm",
            "0.8",
            "--",
            "sleep",
            "60",
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(Some(child));
    let pid = child.pid();
    let reg = wait_registration(&sim.state, pid, &mut child);
    assert_eq!(
        reg,
        Registration {
            gpu: 0,
            mig: Some(2),
            memory_mib: 4096,
            sm: 0.8,
            kind: nvml_sim::ProcKind::Compute,
        }
    );
    // The registered pid is the workload: after exec it is `sleep`.
    loop {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        if comm.trim() == "sleep" {
            break;
        }
        sleep(Duration::from_millis(10));
    }

    let nvml = sim.nvml();
    let mig = nvml
        .device_by_index(0)
        .unwrap()
        .mig_device_by_index(2)
        .unwrap();
    let procs = mig.running_compute_processes().unwrap();
    assert_eq!(procs.len(), 1);
    assert_eq!(procs[0].pid, pid);
    assert_eq!(
        procs[0].used_gpu_memory,
        UsedGpuMemory::Used(4096 * 1024 * 1024)
    );
    child.kill();
    assert!(mig.running_compute_processes().unwrap().is_empty());
}

#[test]
fn state_dir_from_environment() {
    let sim = Sim::new(H100);
    let out = Command::new(BIN)
        .env(state::STATE_ENV, &sim.state)
        .args(["--gpu", "0", "--memory-mib", "1", "--sm", "0", "--", "true"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = std::fs::read_dir(state::procs_dir(&sim.state))
        .unwrap()
        .count();
    assert_eq!(files, 1);
}

#[test]
fn bad_arguments_are_reported() {
    let sim = Sim::new(H100);
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .env_remove(state::STATE_ENV)
            .arg("--state")
            .arg(&sim.state)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cases = [
        (
            "--gpu 0 --memory-mib 1 --sm 1.5 -- true",
            2,
            "1.5 is outside 0..=1",
        ),
        ("--gpu 0 --memory-mib 1 --sm 0.5", 2, "<CMD>"),
        ("--gpu x --memory-mib 1 --sm 0.5 -- true", 2, "--gpu"),
        (
            "--gpu 0 --memory-mib 1 --sm 0.5 -- /no/such/cmd",
            127,
            "cannot run \"/no/such/cmd\"",
        ),
    ];
    for (args, want, needle) in cases {
        let args: Vec<&str> = args.split_whitespace().collect();
        let (code, err) = run(&args);
        assert_eq!(code, Some(want), "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // A failed exec leaves no registration behind.
    let left = std::fs::read_dir(state::procs_dir(&sim.state))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0);
}
