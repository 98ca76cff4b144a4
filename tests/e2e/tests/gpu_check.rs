//! `tests/gpu/check.sh`, the check run on a lent GPU machine, run here
//! against the NVML simulator with no nvidia-smi: every part that does not
//! need the driver's own tools runs (doctor, agent scrapes, Tally's own
//! sums, the workload's tenant and copies, the `cuMemcpy*` symbols of a
//! libcuda) and the rest says skipped. With `sim-nvidia-smi` (nvidia-smi's
//! queries answered from the same simulated driver) every comparison runs
//! and agrees; a stand-in nvidia-smi that disagrees shows that a mismatch
//! fails the check.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Mutex,
};

use tally_e2e::{
    SimNode, probes_support::fake_cuda, require_root, sim_lib, sim_run_bin, tally_bin,
};

/// One check.sh at a time: each asserts that nothing named
/// `tally-gpucheck*` is left, which another run in flight would have.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../gpu/check.sh")
}

/// Runs check.sh on `node` for 6 s (a scrape every 2 s) with the fake
/// libcuda, and as the workload `tests/gpu/gpu-hold.c --busy` (built here
/// with `cc`) on that libcuda, registered on GPU 0 with 4 GiB at half the
/// SMs; `extra`
/// arguments and `path_front` (a directory put first on PATH) as given.
fn run_check(node: &SimNode, out: &Path, extra: &[&str], path_front: Option<&Path>) -> Output {
    let gpu_hold = node.dir.path().join("gpu-hold");
    let cc = Command::new("cc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&gpu_hold)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../gpu/gpu-hold.c"))
        .output()
        .expect("run cc (apt-get install gcc)");
    assert!(
        cc.status.success(),
        "cc gpu-hold.c: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let hold = format!(
        "{} --state {} --gpu 0 --memory-mib 4096 --sm 0.5 -- {} --lib {} --mib 16 --seconds 4 --busy",
        sim_run_bin().display(),
        node.state.display(),
        gpu_hold.display(),
        fake_cuda().lib.display()
    );
    let mut path = std::env::var("PATH").unwrap_or_default();
    if let Some(front) = path_front {
        path = format!("{}:{path}", front.display());
    }
    Command::new("bash")
        .arg(script())
        .arg("--tally")
        .arg(tally_bin())
        .arg("--out")
        .arg(out)
        .arg("--nvml-lib")
        .arg(sim_lib())
        .args(["--seconds", "6", "--scrape-every", "2"])
        .arg("--cuda-lib")
        .arg(&fake_cuda().lib)
        .arg("--hold-cmd")
        .arg(hold)
        .args(extra)
        .envs(node.env())
        .env("PATH", path)
        .output()
        .expect("run check.sh")
}

/// What check.sh must leave behind: no cgroup, pin directory or temporary
/// directory of its own.
fn assert_cleaned_up() {
    let own = tally_e2e::own_unified_cgroup();
    let mount = tally_e2e::unified_mount().expect("cgroup v2");
    let dir = mount.join(own.trim_start_matches('/'));
    for (what, dir) in [
        ("cgroup", dir),
        ("pin directory", PathBuf::from("/sys/fs/bpf")),
        ("temporary directory", PathBuf::from("/tmp")),
    ] {
        let left: Vec<String> = fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("tally-gpucheck"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "check.sh left a {what} behind: {left:?}");
    }
}

/// Runs check.sh as `run_check` does and returns its report, which must
/// say it passed.
fn run_passing(node: &SimNode, out: &Path, extra: &[&str], path_front: Option<&Path>) -> String {
    let run = run_check(node, out, extra, path_front);
    let report = fs::read_to_string(out.join("report.md")).unwrap_or_default();
    assert!(
        run.status.success(),
        "check.sh failed ({}):\n{}\n{}\nreport:\n{report}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(report.contains("Result: passed"), "{report}");
    report
}

/// A directory for a stand-in nvidia-smi, to put first on PATH.
fn smi_dir(node: &SimNode) -> PathBuf {
    let bin = node.dir.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    bin
}

fn row<'a>(report: &'a str, check: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.starts_with(&format!("| {check}")))
        .unwrap_or_else(|| panic!("no row {check:?} in report.md:\n{report}"))
}

#[test]
fn check_sh_passes_on_the_simulator_and_says_what_it_skipped() {
    if !require_root() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let node = SimNode::standard();
    let out = node.dir.path().join("out");
    let report = run_passing(&node, &out, &["--no-nvidia-smi"], None);
    // Driver-tool comparisons are skipped and listed as such.
    for check in ["device count", "memory used and total", "GPM support"] {
        assert!(
            row(&report, check).ends_with("| skipped (no nvidia-smi) |"),
            "{check}: {report}"
        );
    }
    assert!(
        report.contains("Skipped:\n- device count: no nvidia-smi"),
        "{report}"
    );
    // Doctor, with every probe loading.
    for check in ["doctor: nvml", "doctor: btf", "doctor: pcie_uprobes"] {
        assert!(!row(&report, check).contains("FAIL"), "{report}");
    }
    // Tally's own sums, on the plain GPUs, the MIG GPU and its instances.
    for check in [
        "gpu 0 observed s = wall time",
        "gpu 0 Σ tenants' energy = counter increase",
        "gpu 2 Σ tenants' energy = counter increase",
        "gpu 2/1/0 observed s = wall time",
        "gpu 2 energy counter monotonic",
    ] {
        assert!(row(&report, check).ends_with("| ok |"), "{check}: {report}");
    }
    // The workload ran in the test tenant's cgroup and was charged to it.
    let workload = row(&report, "workload: pid, memory, tenant gpucheck");
    assert!(workload.contains("tenant gpucheck, 4096 MiB"), "{workload}");
    assert!(workload.contains("| ok ("), "{workload}");
    // gpu-hold's one 16 MiB copy, counted by the uprobes for its tenant.
    assert!(
        row(
            &report,
            "workload: PCIe h2d bytes of tenant gpucheck (uprobes)"
        )
        .ends_with("| 16777216 | gpu-hold copied 16777216 | ok |"),
        "{report}"
    );
    // Its held time, charged to its tenant within its lifetime; its SM
    // seconds have no reference without nvidia-smi, but gpu-hold's busy
    // loop (the fake kernel's launches) ran.
    let held = row(
        &report,
        "workload: held GPU time of tenant gpucheck (its only holder)",
    );
    assert!(held.ends_with("| ok |"), "{held}");
    let sm = row(&report, "workload: SM seconds of tenant gpucheck");
    assert!(sm.contains("| gpu-hold: busy "), "{sm}");
    assert!(sm.ends_with("| skipped (no nvidia-smi) |"), "{sm}");
    // Every cuMemcpy* of the fake libcuda found in its ELF symbols, and as
    // many uprobes attached.
    assert!(
        report.contains("exported 22 of 22 = uprobes attached | 22 attached |"),
        "{report}"
    );
    for file in [
        "metrics-00.txt",
        "metrics-03.txt",
        "doctor.txt",
        "agent.log",
    ] {
        assert!(out.join(file).exists(), "no {file} in {}", out.display());
    }
    assert_cleaned_up();
}

#[test]
fn check_sh_agrees_with_nvidia_smi_answering_from_the_same_driver() {
    if !require_root() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let node = SimNode::standard();
    // nvidia-smi's queries answered from the simulator (src/bin/sim-nvidia-smi.rs).
    let bin = smi_dir(&node);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_sim-nvidia-smi"), bin.join("nvidia-smi"))
        .unwrap();
    let out = node.dir.path().join("out");
    // A scrape every second: the SM row's tolerance is one scrape and one
    // sampling interval at 50 %, and 20 %: 1.4 s of the 2 SM-seconds, so
    // a tenant charged none or twice as much fails it.
    let report = run_passing(&node, &out, &["--scrape-every", "1"], Some(&bin));
    // Every comparison with the driver's tool ran, none skipped.
    assert!(!report.contains("no nvidia-smi"), "{report}");
    for check in [
        "device count",
        "MIG instances (UUIDs)",
        "gpu 0 uuid",
        "gpu 2 MIG mode",
        "gpu 0 memory used (MiB)",
        "gpu 0 power (W)",
        "gpu 0 utilization (%)",
        "workload: pid, memory, tenant gpucheck",
        "workload: held GPU time of tenant gpucheck (its only holder)",
        "workload: SM seconds of tenant gpucheck",
    ] {
        assert!(row(&report, check).contains("| ok"), "{check}: {report}");
    }
    // The SM seconds were compared with the integral, not skipped.
    let sm = row(&report, "workload: SM seconds of tenant gpucheck");
    assert!(sm.contains("∫ utilization.gpu "), "{sm}");
    assert_cleaned_up();
}

#[test]
fn check_sh_fails_when_nvidia_smi_disagrees() {
    if !require_root() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let node = SimNode::standard();
    // A stand-in nvidia-smi whose GPU 0 has another UUID.
    let bin = smi_dir(&node);
    let smi = bin.join("nvidia-smi");
    fs::write(
        &smi,
        "#!/bin/sh\ncase \"$*\" in\n\
         *index,driver_version*) echo '0, 550.54.15'; echo '1, 550.54.15'; echo '2, 550.54.15' ;;\n\
         *query-gpu*) echo '0, GPU-00000000-0000-0000-0000-000000000000, NVIDIA H100 80GB HBM3, Disabled, 0, 81559, 70.00, 32, 0' ;;\n\
         esac\n",
    )
    .unwrap();
    fs::set_permissions(&smi, fs::Permissions::from_mode(0o755)).unwrap();
    let out = node.dir.path().join("out");
    let run = run_check(&node, &out, &[], Some(&bin));
    let report = fs::read_to_string(out.join("report.md")).unwrap_or_default();
    assert_eq!(run.status.code(), Some(1), "{report}");
    assert!(
        row(&report, "gpu 0 uuid").contains("| MISMATCH at scrape 00"),
        "{report}"
    );
    assert!(row(&report, "gpu 0 model").contains("| ok ("), "{report}");
    assert!(report.contains("Result: FAILED"), "{report}");
    assert_cleaned_up();
}
