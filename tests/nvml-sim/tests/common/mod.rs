//! Shared helpers: locate `libnvml_sim.so`, give each test its own scenario
//! and state directory, run child processes that are killed on drop.
#![allow(dead_code)] // each test binary uses a different subset

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard, PoisonError},
};

use nvml_wrapper::Nvml;
use tempfile::TempDir;

/// The simulated library. Cargo builds a package's library target (here
/// both the rlib and the cdylib, from one rustc invocation) before its
/// integration tests and leaves the cdylib next to the test binary in
/// `target/<profile>/deps/`. Only `cargo build` copies it up to
/// `target/<profile>/`, so that copy can be stale under `cargo test`: the
/// one in `deps/` is preferred.
pub(crate) fn lib_path() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a directory");
    let fresh = deps.join("libnvml_sim.so");
    if fresh.exists() {
        return fresh;
    }
    let built = deps
        .parent()
        .expect("test binary lives in target/<profile>/deps")
        .join("libnvml_sim.so");
    assert!(
        built.exists(),
        "{} not found; run `cargo build -p nvml-sim`",
        built.display()
    );
    built
}

/// NVML init reads process-wide environment variables and the simulator's
/// state is per process: tests in one binary take turns.
static LOCK: Mutex<()> = Mutex::new(());

/// One test's scenario and state directory, exported through the
/// environment while the test holds the lock.
pub(crate) struct Sim {
    _lock: MutexGuard<'static, ()>,
    pub dir: TempDir,
    pub scenario: PathBuf,
    pub state: PathBuf,
}

impl Sim {
    pub(crate) fn new(scenario_toml: &str) -> Sim {
        let lock = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        let dir = tempfile::tempdir().expect("tempdir");
        let scenario = dir.path().join("scenario.toml");
        let state = dir.path().join("state");
        fs::write(&scenario, scenario_toml).expect("write scenario");
        fs::create_dir(&state).expect("create state dir");
        // SAFETY: every test in this binary holds LOCK while it runs, so no
        // other thread reads or writes the environment meanwhile.
        unsafe {
            std::env::set_var(nvml_sim::state::SCENARIO_ENV, &scenario);
            std::env::set_var(nvml_sim::state::STATE_ENV, &state);
        }
        Sim {
            _lock: lock,
            dir,
            scenario,
            state,
        }
    }

    /// Initializes nvml-wrapper against the simulator.
    pub(crate) fn nvml(&self) -> Nvml {
        Nvml::builder()
            .lib_path(lib_path().as_os_str())
            .init()
            .expect("nvml init against the simulator")
    }

    /// Starts `sleep 60` and registers it.
    pub(crate) fn spawn(&self, gpu: u32, mig: Option<u32>, memory_mib: u64, sm: f64) -> ChildGuard {
        self.spawn_kind(gpu, mig, memory_mib, sm, nvml_sim::ProcKind::Compute)
    }

    /// Starts `sleep 60` and registers it as a process of `kind`.
    pub(crate) fn spawn_kind(
        &self,
        gpu: u32,
        mig: Option<u32>,
        memory_mib: u64,
        sm: f64,
        kind: nvml_sim::ProcKind,
    ) -> ChildGuard {
        let child = ChildGuard::sleep();
        let reg = nvml_sim::Registration {
            gpu,
            mig,
            memory_mib,
            sm,
            kind,
        };
        nvml_sim::register(&self.state, child.pid(), &reg).expect("register");
        child
    }
}

/// A child process killed and reaped on drop.
pub(crate) struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    pub(crate) fn sleep() -> ChildGuard {
        let child = Command::new("sleep")
            .arg("60")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        ChildGuard(Some(child))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.0.as_ref().expect("child").id()
    }

    /// Kills the child without reaping it: it stays a zombie.
    pub(crate) fn kill_leave_zombie(&mut self) {
        let child = self.0.as_mut().expect("child");
        child.kill().expect("kill");
        // Wait until the kernel has made it a zombie.
        let stat = format!("/proc/{}/stat", child.id());
        while !fs::read_to_string(&stat)
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Kills and reaps the child: its `/proc` entry is gone afterwards.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) const H100: &str = r#"
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
power_idle_w = 70
power_max_w = 700
"#;

pub(crate) const H100_MIG: &str = r#"
[[gpu]]
model = "NVIDIA H100 80GB HBM3"
memory_mib = 81559
uuid = "GPU-11111111-2222-3333-4444-555555555555"
power_idle_w = 70
power_max_w = 700
mig = ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]
"#;

pub(crate) const A100: &str = r#"
[[gpu]]
model = "NVIDIA A100-SXM4-40GB"
memory_mib = 40536
power_idle_w = 50
power_max_w = 400
"#;
