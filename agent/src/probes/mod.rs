//! eBPF probes: loading, attaching, pinning, and reading kernel maps.
//!
//! Three objects from `tally-ebpf`, each loaded on its own so that one that
//! cannot load leaves the others working:
//! - `net`: `cgroup_skb` ingress/egress at the cgroup v2 root, bytes and
//!   packets per cgroup id;
//! - `pcie`: uprobes on libcuda's `cuMemcpy*` family, bytes per cgroup id;
//! - `proc`: raw tracepoints `sched_process_exec`/`sched_process_exit`,
//!   pid → cgroup of recently exited processes (see [`ExitedProcs`]).
//!
//! Maps are pinned under `[probes] pin_dir`; per-tenant totals are the
//! folded counters of vanished cgroups (state file, see [`state`]) plus the
//! live map entries, so they continue across agent restarts. Nothing here
//! is fatal: a probe that cannot start is reported in [`ProbeStatus`] with
//! the reason and the fix, logged once, and the agent serves the rest.

pub mod cgroups;
pub mod cuda;
pub mod state;

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuHashMap},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, ProgramError, RawTracePoint, UProbe,
        uprobe::UProbeScope,
    },
};
use serde::Deserialize;
use tally_ebpf::{NetValue, PcieValue, ProcRecord};
use tracing::{info, warn};

use self::{
    cgroups::CgroupPaths,
    state::{Counters, Part, State, StateFile},
};
use crate::{
    paths,
    snapshot::{GpuSnapshot, ProbeStatus, TENANT_UNATTRIBUTED, TenantIoUsage},
    tenants::{self, Resolver},
};

/// `[probes]`: which eBPF probes run and where they attach.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesConfig {
    /// Count network bytes per cgroup (`cgroup_skb` at the v2 root). Default on.
    pub network: bool,
    /// Count host↔device CUDA copies (uprobes on libcuda). Default on.
    pub pcie: bool,
    /// Remember the cgroup of exited processes (raw tracepoints). Default on.
    pub process: bool,
    /// CUDA driver libraries to probe. Default: `libcuda.so.1` as found in
    /// the loader cache (`ldconfig -p`) and the usual driver directories.
    pub cuda_libs: Option<Vec<PathBuf>>,
    /// bpffs directory the maps are pinned in. Default `/sys/fs/bpf/tally`.
    pub pin_dir: PathBuf,
}

impl Default for ProbesConfig {
    fn default() -> Self {
        Self {
            network: true,
            pcie: true,
            process: true,
            cuda_libs: None,
            pin_dir: PathBuf::from(paths::BPF_PIN_DIR),
        }
    }
}

/// Label values of `tally_probe_up{probe}`.
pub const PROBE_NET_INGRESS: &str = "network_ingress";
pub const PROBE_NET_EGRESS: &str = "network_egress";
pub const PROBE_PCIE: &str = "pcie_uprobes";
pub const PROBE_EXEC: &str = "process_exec";
pub const PROBE_EXIT: &str = "process_exit";

/// Why a probe is not running.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The probe is switched off in `[probes]`.
    #[error("disabled in the config ([probes] {key} = false)")]
    Disabled { key: &'static str },
    /// bpffs is not mounted and mounting it failed.
    #[error("bpffs is not mounted at {path} and `mount -t bpf` failed: {reason}")]
    Mount { path: PathBuf, reason: String },
    /// The pin directory could not be created or opened.
    #[error("cannot create the pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    /// Another agent holds the pin directory: attaching again would count
    /// every byte twice into the same maps.
    #[error("another tally agent holds {path} (flock): not attaching a second set of probes")]
    PinDirBusy { path: PathBuf },
    /// The object's maps could not be created or opened.
    #[error("cannot load {object}.bpf.o: {message}")]
    Load {
        object: &'static str,
        message: String,
    },
    /// The kernel refused the program; the verifier's log says why.
    #[error("the kernel refused program {program}: {source}; verifier log:\n{verifier_log}")]
    Verifier {
        program: &'static str,
        source: io::Error,
        verifier_log: String,
    },
    /// The program loaded but could not be attached.
    #[error("cannot attach {program} to {target}: {message}")]
    Attach {
        program: &'static str,
        target: String,
        message: String,
    },
    /// No cgroup v2 hierarchy to attach the network programs to.
    #[error(
        "no cgroup v2 hierarchy at {} or {}",
        paths::CGROUP_ROOT,
        paths::CGROUP_UNIFIED_HYBRID
    )]
    NoCgroup2,
    /// No CUDA driver library to probe.
    #[error("no CUDA driver library found (tried: {tried})")]
    NoCudaLibrary { tried: String },
    /// Libraries were found, but no copy entry point could be probed.
    #[error("no cuMemcpy* entry point could be probed: {details}")]
    NoCopySymbols { details: String },
}

impl ProbeError {
    /// What the operator can do about it.
    pub fn hint(&self) -> &'static str {
        let denied = |m: &str| {
            m.contains("Operation not permitted")
                || m.contains("Permission denied")
                || m.contains("EPERM")
        };
        match self {
            ProbeError::Disabled { .. } => "set it to true to enable",
            ProbeError::Mount { .. } => {
                "mount bpffs (`mount -t bpf -o mode=0700 bpf /sys/fs/bpf`), or run the agent \
                 as root or with CAP_SYS_ADMIN so it mounts it"
            }
            ProbeError::PinDir { .. } => {
                "run the agent as root or with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN \
                 (DaemonSet securityContext.capabilities.add, systemd AmbientCapabilities=)"
            }
            ProbeError::PinDirBusy { .. } => {
                "stop the other agent, or give this one another [probes] pin_dir"
            }
            ProbeError::Load { message, .. } | ProbeError::Attach { message, .. }
                if denied(message) =>
            {
                "run the agent as root or with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN"
            }
            ProbeError::Verifier { .. } => {
                "the kernel is older or configured differently than this build expects; \
                 report the verifier log"
            }
            ProbeError::Load { .. } | ProbeError::Attach { .. } => {
                "check the kernel has CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF, CONFIG_UPROBES \
                 and BTF; `tally doctor` checks each"
            }
            ProbeError::NoCgroup2 => {
                "mount cgroup2 (`mount -t cgroup2 none /sys/fs/cgroup/unified`)"
            }
            ProbeError::NoCudaLibrary { .. } | ProbeError::NoCopySymbols { .. } => {
                "install the NVIDIA driver, or list its libcuda.so.1 in [probes] cuda_libs"
            }
        }
    }

    /// The error and the hint, as shown in `ProbeStatus.error`.
    pub fn explain(&self) -> String {
        format!("{self}; fix: {}", self.hint())
    }
}

/// An error and every `source()` below it, joined with `: `.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        cur = s.source();
    }
    text
}

/// A program load error, keeping the verifier's log.
fn load_error(program: &'static str, e: ProgramError) -> ProbeError {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => ProbeError::Verifier {
            program,
            source: io_error,
            verifier_log: verifier_log.to_string(),
        },
        other => ProbeError::Attach {
            program,
            target: "the kernel (load)".into(),
            message: chain(&other),
        },
    }
}

fn ebpf_error(object: &'static str, e: EbpfError) -> ProbeError {
    match e {
        EbpfError::ProgramError(p) => load_error(object, p),
        other => ProbeError::Load {
            object,
            message: chain(&other),
        },
    }
}

/// The pinned-map directory, mounted and locked for this agent.
#[derive(Debug)]
struct PinDir {
    path: PathBuf,
    /// Held while the agent runs; released by the kernel if it dies.
    _lock: nix::fcntl::Flock<File>,
}

impl PinDir {
    fn open(path: &Path) -> Result<Self, ProbeError> {
        ensure_bpffs(path)?;
        std::fs::create_dir_all(path).map_err(|source| ProbeError::PinDir {
            path: path.to_owned(),
            source,
        })?;
        let dir = File::open(path).map_err(|source| ProbeError::PinDir {
            path: path.to_owned(),
            source,
        })?;
        let lock = nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| ProbeError::PinDirBusy {
                path: path.to_owned(),
            })?;
        Ok(Self {
            path: path.to_owned(),
            _lock: lock,
        })
    }

    fn pinned(&self, map: &str) -> bool {
        self.path.join(map).exists()
    }
}

/// Is a bpffs mounted at `dir` or one of its parents?
fn bpffs_mounted_over(dir: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    mounts.lines().any(|line| {
        let mut f = line.split_whitespace();
        let (_, Some(point), Some(fstype)) = (f.next(), f.next(), f.next()) else {
            return false;
        };
        fstype == "bpf" && dir.starts_with(point)
    })
}

/// Mounts bpffs at `/sys/fs/bpf` when `dir` is not on a bpffs yet.
fn ensure_bpffs(dir: &Path) -> Result<(), ProbeError> {
    if bpffs_mounted_over(dir) {
        return Ok(());
    }
    let mount_err = |reason: String| ProbeError::Mount {
        path: PathBuf::from(paths::BPFFS),
        reason,
    };
    if !dir.starts_with(paths::BPFFS) {
        return Err(mount_err(format!(
            "{} is not under {} and not on a bpffs",
            dir.display(),
            paths::BPFFS
        )));
    }
    let out = mount_bpffs()
        .output()
        .map_err(|e| mount_err(format!("cannot run mount: {e}")))?;
    if !out.status.success() {
        return Err(mount_err(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    info!(path = paths::BPFFS, "mounted bpffs");
    Ok(())
}

/// `mount` of bpffs at [`paths::BPFFS`], 0700 as systemd mounts it: without
/// a mode bpffs is 1777 and any user may create entries in it.
fn mount_bpffs() -> Command {
    let mut mount = Command::new("mount");
    mount.args(["-t", "bpf", "-o", "mode=0700", "bpf", paths::BPFFS]);
    mount
}

fn load_object(
    pin: &PinDir,
    object: &'static str,
    bytes: &[u8],
) -> Result<(Ebpf, bool), ProbeError> {
    // Which maps existed before: new maps mean counters started from zero.
    let map = match object {
        "net" => tally_ebpf::MAP_NET,
        "pcie" => tally_ebpf::MAP_PCIE,
        _ => tally_ebpf::MAP_PROCS,
    };
    let reused = pin.pinned(map);
    let ebpf = EbpfLoader::new()
        .default_map_pin_directory(&pin.path)
        .load(bytes)
        .map_err(|e| ebpf_error(object, e))?;
    Ok((ebpf, reused))
}

fn take_map<T>(ebpf: &mut Ebpf, object: &'static str, name: &str) -> Result<T, ProbeError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| ProbeError::Load {
        object,
        message: format!("map {name} missing from the object"),
    })?;
    T::try_from(map).map_err(|e| ProbeError::Load {
        object,
        message: chain(&e),
    })
}

/// Loaded network programs and their map.
struct NetProbe {
    _ebpf: Ebpf,
    map: PerCpuHashMap<MapData, u64, NetValue>,
}

/// Loaded uprobes and their map.
struct PcieProbe {
    _ebpf: Ebpf,
    map: PerCpuHashMap<MapData, u64, PcieValue>,
}

/// The tracepoint programs (the map is shared with [`ExitedProcs`]).
struct ProcProbe {
    _ebpf: Ebpf,
}

/// pid → cgroup path of processes that already exited, from the kernel's
/// `tally_procs` map. Handed to [`Resolver`] so a GPU process that ended
/// before the sampler read its `/proc` entry still lands on its tenant.
pub struct ExitedProcs {
    map: BpfHashMap<MapData, u32, ProcRecord>,
    cgroups: Arc<Mutex<CgroupPaths>>,
}

impl std::fmt::Debug for ExitedProcs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitedProcs").finish_non_exhaustive()
    }
}

impl ExitedProcs {
    /// The kernel's record of `pid`, if it has one.
    pub fn record(&self, pid: u32) -> Option<ProcRecord> {
        self.map.get(&pid, 0).ok()
    }

    /// The cgroup v2 path `pid` was in at exit (or exec), if recorded and the
    /// cgroup is (or was, while this agent ran) known.
    pub fn cgroup_of(&self, pid: u32) -> Option<String> {
        let rec = self.record(pid)?;
        self.cgroups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resolve(rec.cgroup_id)
    }
}

impl tenants::ExitedCgroups for ExitedProcs {
    fn cgroup_of_exited(&mut self, pid: u32) -> Option<String> {
        self.cgroup_of(pid)
    }
}

/// The running probes and the per-tenant totals derived from them.
pub struct Probes {
    net: Option<NetProbe>,
    pcie: Option<PcieProbe>,
    _procs: Option<ProcProbe>,
    exited: Option<ExitedProcs>,
    statuses: Vec<ProbeStatus>,
    cgroups: Arc<Mutex<CgroupPaths>>,
    /// Tenant each cgroup id was last resolved to: where its counters go
    /// when the cgroup vanishes.
    tenant_of: HashMap<u64, String>,
    state: State,
    state_file: StateFile,
    state_error_logged: bool,
    /// PCIe probe totals and device totals when this agent started, for the
    /// `_unattributed` remainder (device totals restart with the agent).
    pcie_at_start: Option<(u64, u64)>,
    residual_base: (u64, u64),
    residual_run: (u64, u64),
    _pin: Option<PinDir>,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes")
            .field("statuses", &self.statuses)
            .finish_non_exhaustive()
    }
}

fn status(probe: &str, result: &Result<(), ProbeError>) -> ProbeStatus {
    ProbeStatus {
        probe: probe.to_owned(),
        up: result.is_ok(),
        error: result.as_ref().err().map(ProbeError::explain),
    }
}

/// Statuses of the programs of one object: each program's own result, or,
/// when the object itself could not be used, that one error for every
/// program, explained once.
fn family_statuses<const N: usize>(
    probes: [&str; N],
    outcome: Result<[Result<(), ProbeError>; N], ProbeError>,
) -> [ProbeStatus; N] {
    match outcome {
        Ok(results) => std::array::from_fn(|i| status(probes[i], &results[i])),
        Err(e) => {
            let text = e.explain();
            probes.map(|probe| ProbeStatus {
                probe: probe.to_owned(),
                up: false,
                error: Some(text.clone()),
            })
        }
    }
}

impl Probes {
    /// Loads and attaches every enabled probe. Never fails: what cannot
    /// start is in [`Probes::statuses`], logged once with its fix.
    pub fn start(config: &ProbesConfig, state_dir: &Path) -> Probes {
        let cgroup_root = crate::cgroupfs::unified_root().map(Path::to_path_buf);
        let cgroups = Arc::new(Mutex::new(CgroupPaths::new(
            cgroup_root
                .clone()
                .unwrap_or_else(|| PathBuf::from(paths::CGROUP_UNIFIED_HYBRID)),
        )));
        let mut state_file = StateFile::new(state_dir);
        let mut state_error_logged = false;
        let mut state = match state_file.load() {
            Ok(s) => s,
            Err(e) => {
                warn!("{e}; probe totals restart from the maps alone");
                state_error_logged = true;
                State::default()
            }
        };
        let boot_id = std::fs::read_to_string(paths::BOOT_ID)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        state.boot_id = boot_id;

        let mut probes = Probes {
            net: None,
            pcie: None,
            _procs: None,
            exited: None,
            statuses: Vec::new(),
            cgroups,
            tenant_of: HashMap::new(),
            state_file,
            state_error_logged,
            pcie_at_start: None,
            residual_base: (state.residual_h2d_bytes, state.residual_d2h_bytes),
            residual_run: (0, 0),
            state,
            _pin: None,
        };

        let any = config.network || config.pcie || config.process;
        let pin = any.then(|| PinDir::open(&config.pin_dir));
        if let Some(Err(e)) = &pin {
            {
                // Nothing can load without the pin directory: every enabled
                // probe reports the same reason.
                let text = e.explain();
                for (probe, enabled, key) in [
                    (PROBE_NET_INGRESS, config.network, "network"),
                    (PROBE_NET_EGRESS, config.network, "network"),
                    (PROBE_PCIE, config.pcie, "pcie"),
                    (PROBE_EXEC, config.process, "process"),
                    (PROBE_EXIT, config.process, "process"),
                ] {
                    probes.statuses.push(ProbeStatus {
                        probe: probe.to_owned(),
                        up: false,
                        error: Some(if enabled {
                            text.clone()
                        } else {
                            ProbeError::Disabled { key }.explain()
                        }),
                    });
                }
            }
        } else {
            {
                let pin = pin.as_ref().and_then(|p| p.as_ref().ok());
                let net = match pin {
                    Some(pin) if config.network => probes.start_net(pin, cgroup_root.as_deref()),
                    _ => Err(ProbeError::Disabled { key: "network" }),
                };
                probes
                    .statuses
                    .extend(family_statuses([PROBE_NET_INGRESS, PROBE_NET_EGRESS], net));
                let pcie = match pin {
                    Some(pin) if config.pcie => probes.start_pcie(pin, config.cuda_libs.as_deref()),
                    _ => Err(ProbeError::Disabled { key: "pcie" }),
                };
                probes.statuses.push(status(PROBE_PCIE, &pcie));
                let procs = match pin {
                    Some(pin) if config.process => probes.start_procs(pin),
                    _ => Err(ProbeError::Disabled { key: "process" }),
                };
                probes
                    .statuses
                    .extend(family_statuses([PROBE_EXEC, PROBE_EXIT], procs));
            }
        }

        for s in &probes.statuses {
            match &s.error {
                None => info!(probe = %s.probe, "probe attached"),
                Some(e) => warn!(probe = %s.probe, "probe not running: {e}"),
            }
        }
        probes._pin = pin.and_then(Result::ok);
        probes.persist();
        probes
    }

    /// Ingress and egress results; `Err` when the object could not be used
    /// at all (both programs report that).
    fn start_net(
        &mut self,
        pin: &PinDir,
        root: Option<&Path>,
    ) -> Result<[Result<(), ProbeError>; 2], ProbeError> {
        let root = root.ok_or(ProbeError::NoCgroup2)?;
        let (mut ebpf, reused) = load_object(pin, "net", tally_ebpf::NET)?;
        let mut map: PerCpuHashMap<MapData, u64, NetValue> =
            take_map(&mut ebpf, "net", tally_ebpf::MAP_NET)?;
        self.adopt_map(reused, Part::Net, |ids| {
            for id in ids {
                let _ = map.remove(id);
            }
        });
        let mut attach = |program: &'static str, kind: CgroupSkbAttachType| {
            let target = root.display().to_string();
            let cgroup = File::open(root).map_err(|e| ProbeError::Attach {
                program,
                target: target.clone(),
                message: e.to_string(),
            })?;
            let prog: &mut CgroupSkb = ebpf
                .program_mut(program)
                .ok_or_else(|| ProbeError::Load {
                    object: "net",
                    message: format!("program {program} missing"),
                })?
                .try_into()
                .map_err(|e| load_error(program, e))?;
            prog.load().map_err(|e| load_error(program, e))?;
            // Single: the only mode this kernel accepts for links (aya #1078);
            // links coexist with other programs on the same cgroup.
            prog.attach(cgroup, kind, CgroupAttachMode::Single)
                .map_err(|e| ProbeError::Attach {
                    program,
                    target,
                    message: chain(&e),
                })?;
            Ok(())
        };
        let ingress = attach("tally_net_ingress", CgroupSkbAttachType::Ingress);
        let egress = attach("tally_net_egress", CgroupSkbAttachType::Egress);
        self.net = Some(NetProbe { _ebpf: ebpf, map });
        Ok([ingress, egress])
    }

    fn start_pcie(&mut self, pin: &PinDir, libs: Option<&[PathBuf]>) -> Result<(), ProbeError> {
        let libs: Vec<PathBuf> = match libs {
            Some(l) => l.to_vec(),
            None => cuda::discover(),
        };
        let (mut ebpf, reused) = load_object(pin, "pcie", tally_ebpf::PCIE)?;
        let mut map: PerCpuHashMap<MapData, u64, PcieValue> =
            take_map(&mut ebpf, "pcie", tally_ebpf::MAP_PCIE)?;
        self.adopt_map(reused, Part::Pcie, |ids| {
            for id in ids {
                let _ = map.remove(id);
            }
        });
        for shape in cuda::Shape::ALL {
            let program = shape.program();
            let prog: &mut UProbe = ebpf
                .program_mut(program)
                .ok_or_else(|| ProbeError::Load {
                    object: "pcie",
                    message: format!("program {program} missing"),
                })?
                .try_into()
                .map_err(|e| load_error(program, e))?;
            prog.load().map_err(|e| load_error(program, e))?;
        }
        // The map is kept even without a library: counters of earlier runs
        // stay readable.
        let mut problems = Vec::new();
        let mut attached = 0usize;
        let mut missing_libs = Vec::new();
        for lib in &libs {
            if !lib.exists() {
                missing_libs.push(lib.display().to_string());
                continue;
            }
            let mut here = 0usize;
            for (symbol, shape) in cuda::SYMBOLS {
                let prog: &mut UProbe = ebpf
                    .program_mut(shape.program())
                    .and_then(|p| p.try_into().ok())
                    .expect("loaded above");
                match prog.attach(*symbol, lib, UProbeScope::AllProcesses) {
                    Ok(_) => here += 1,
                    // Not every driver version exports every form.
                    Err(e) => {
                        let text = chain(&e);
                        if !text.contains("not found") && !text.contains("symbol") {
                            problems.push(format!("{}:{symbol}: {text}", lib.display()));
                        }
                    }
                }
            }
            if here == 0 {
                problems.push(format!("{}: no cuMemcpy* symbol", lib.display()));
            } else {
                info!(library = %lib.display(), entry_points = here, "uprobes attached");
            }
            attached += here;
        }
        self.pcie = Some(PcieProbe { _ebpf: ebpf, map });
        if libs.is_empty() || (attached == 0 && problems.is_empty()) {
            let tried = if libs.is_empty() {
                format!(
                    "`ldconfig -p` and {} in {}",
                    cuda::LIBCUDA,
                    cuda::DRIVER_DIRS.join(", ")
                )
            } else {
                missing_libs.join(", ")
            };
            return Err(ProbeError::NoCudaLibrary { tried });
        }
        if attached == 0 {
            problems.extend(missing_libs.iter().map(|l| format!("{l}: missing")));
            return Err(ProbeError::NoCopySymbols {
                details: problems.join("; "),
            });
        }
        if !missing_libs.is_empty() || !problems.is_empty() {
            warn!(
                missing = ?missing_libs,
                problems = ?problems,
                "some CUDA libraries could not be probed"
            );
        }
        Ok(())
    }

    /// Exec and exit results; `Err` when the object could not be loaded
    /// (both programs report that).
    fn start_procs(&mut self, pin: &PinDir) -> Result<[Result<(), ProbeError>; 2], ProbeError> {
        let (mut ebpf, _) = load_object(pin, "proc", tally_ebpf::PROC)?;
        let mut attach = |program: &'static str, tp: &str| -> Result<(), ProbeError> {
            let prog: &mut RawTracePoint = ebpf
                .program_mut(program)
                .ok_or_else(|| ProbeError::Load {
                    object: "proc",
                    message: format!("program {program} missing"),
                })?
                .try_into()
                .map_err(|e| load_error(program, e))?;
            prog.load().map_err(|e| load_error(program, e))?;
            prog.attach(tp).map_err(|e| ProbeError::Attach {
                program,
                target: format!("raw tracepoint {tp}"),
                message: chain(&e),
            })?;
            Ok(())
        };
        let exec = attach("tally_proc_exec", "sched_process_exec");
        let exit = attach("tally_proc_exit", "sched_process_exit");
        match take_map::<BpfHashMap<MapData, u32, ProcRecord>>(
            &mut ebpf,
            "proc",
            tally_ebpf::MAP_PROCS,
        ) {
            Ok(map) => {
                self.exited = Some(ExitedProcs {
                    map,
                    cgroups: self.cgroups.clone(),
                })
            }
            Err(e) => warn!("{}", e.explain()),
        }
        self._procs = Some(ProcProbe { _ebpf: ebpf });
        Ok([exec, exit])
    }

    /// Reconciles the state with a map just opened (see [`State::adopt`])
    /// and deletes the entries it says to.
    fn adopt_map(&mut self, reused: bool, part: Part, delete: impl FnOnce(&[u64])) {
        let ids = self.state.adopt(part, reused);
        delete(&ids);
    }

    /// State of every probe, for the snapshot.
    pub fn statuses(&self) -> Vec<ProbeStatus> {
        self.statuses.clone()
    }

    /// The exited-process lookup for [`Resolver`], once (it moves out).
    pub fn take_exited(&mut self) -> Option<ExitedProcs> {
        self.exited.take()
    }

    /// Reads the maps and returns cumulative per-tenant counters; folds and
    /// deletes entries of cgroups that vanished; adds the PCIe bytes the
    /// devices moved but no probe saw to `_unattributed`.
    pub fn sample(&mut self, resolver: &Resolver, gpus: &[GpuSnapshot]) -> Vec<TenantIoUsage> {
        let net: Vec<(u64, NetValue)> = self
            .net
            .as_ref()
            .map(|p| {
                p.map
                    .iter()
                    .flatten()
                    .map(|(id, per_cpu)| {
                        let mut sum = NetValue::default();
                        per_cpu.iter().for_each(|v| sum.add(v));
                        (id, sum)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let pcie: Vec<(u64, PcieValue)> = self
            .pcie
            .as_ref()
            .map(|p| {
                p.map
                    .iter()
                    .flatten()
                    .map(|(id, per_cpu)| {
                        let mut sum = PcieValue::default();
                        per_cpu.iter().for_each(|v| sum.add(v));
                        (id, sum)
                    })
                    .collect()
            })
            .unwrap_or_default();

        // Resolve ids; walk the hierarchy at most once per sample.
        let mut paths: HashMap<u64, Option<String>> = HashMap::new();
        {
            let mut cg = self.cgroups.lock().unwrap_or_else(|e| e.into_inner());
            let ids: Vec<u64> = net
                .iter()
                .map(|e| e.0)
                .chain(pcie.iter().map(|e| e.0))
                .collect();
            let mut walked = false;
            for id in ids {
                if paths.contains_key(&id) {
                    continue;
                }
                let mut path = cg.cached(id).map(str::to_owned);
                if path.is_none() && !walked {
                    cg.walk();
                    walked = true;
                    path = cg.cached(id).map(str::to_owned);
                }
                paths.insert(id, path);
            }
        }

        let mut live: BTreeMap<String, Counters> = BTreeMap::new();
        let mut vanished_net = Vec::new();
        let mut vanished_pcie = Vec::new();
        let tenant_for = |path: &str| {
            resolver
                .tenant_for_cgroup(path)
                .unwrap_or_else(|| TENANT_UNATTRIBUTED.to_owned())
        };
        for (id, v) in &net {
            match paths.get(id).cloned().flatten() {
                Some(path) => {
                    let tenant = tenant_for(&path);
                    live.entry(tenant.clone()).or_default().add_net(v);
                    self.tenant_of.insert(*id, tenant);
                }
                None => vanished_net.push((*id, *v)),
            }
        }
        for (id, v) in &pcie {
            match paths.get(id).cloned().flatten() {
                Some(path) => {
                    let tenant = tenant_for(&path);
                    live.entry(tenant.clone()).or_default().add_pcie(v);
                    self.tenant_of.insert(*id, tenant);
                }
                None => vanished_pcie.push((*id, *v)),
            }
        }

        // Fold vanished cgroups: state first (with the ids pending), then
        // delete the entries; a crash in between deletes them at start.
        if !vanished_net.is_empty() || !vanished_pcie.is_empty() {
            for (id, v) in &vanished_net {
                let tenant = self.vanished_tenant(*id);
                self.state.folded.entry(tenant).or_default().add_net(v);
                self.state.pending_net.push(*id);
            }
            for (id, v) in &vanished_pcie {
                let tenant = self.vanished_tenant(*id);
                self.state.folded.entry(tenant).or_default().add_pcie(v);
                self.state.pending_pcie.push(*id);
            }
            self.state.live = live.clone();
            self.persist();
            if let Some(p) = self.net.as_mut() {
                for (id, _) in &vanished_net {
                    let _ = p.map.remove(id);
                }
            }
            if let Some(p) = self.pcie.as_mut() {
                for (id, _) in &vanished_pcie {
                    let _ = p.map.remove(id);
                }
            }
            for id in vanished_net
                .iter()
                .map(|e| e.0)
                .chain(vanished_pcie.iter().map(|e| e.0))
            {
                self.tenant_of.remove(&id);
            }
            self.state.pending_net.clear();
            self.state.pending_pcie.clear();
        }
        // Ids resolved long ago whose entries are gone: forget them.
        if self.tenant_of.len() > 4 * (net.len() + pcie.len()) + 1024 {
            let keep: std::collections::HashSet<u64> = net
                .iter()
                .map(|e| e.0)
                .chain(pcie.iter().map(|e| e.0))
                .collect();
            self.tenant_of.retain(|id, _| keep.contains(id));
        }

        let mut totals = self.state.folded.clone();
        for (tenant, c) in &live {
            totals.entry(tenant.clone()).or_default().add(c);
        }
        self.state.live = live;
        self.add_pcie_residual(&mut totals, gpus);
        self.persist();
        totals
            .iter()
            .filter(|(t, c)| !c.is_zero() || t.as_str() == TENANT_UNATTRIBUTED)
            .map(|(t, c)| c.usage(t))
            .collect()
    }

    fn vanished_tenant(&self, id: u64) -> String {
        self.tenant_of
            .get(&id)
            .cloned()
            .unwrap_or_else(|| TENANT_UNATTRIBUTED.to_owned())
    }

    /// Device PCIe bytes (NVML, integrated since this agent started) minus
    /// the bytes every probe counted since then, never below what was
    /// already reported: charged to `_unattributed`, never spread.
    fn add_pcie_residual(&mut self, totals: &mut BTreeMap<String, Counters>, gpus: &[GpuSnapshot]) {
        // Physical GPUs only (MIG instances carry no PCIe counters). NVML's
        // RX is what the device received (host→device), TX what it sent.
        let mut have = false;
        let (mut dev_h2d, mut dev_d2h) = (0u64, 0u64);
        for g in gpus.iter().filter(|g| g.parent_uuid.is_none()) {
            if let Some(rx) = g.pcie_rx_bytes_total {
                dev_h2d += rx.max(0.0) as u64;
                have = true;
            }
            if let Some(tx) = g.pcie_tx_bytes_total {
                dev_d2h += tx.max(0.0) as u64;
                have = true;
            }
        }
        let probe_h2d: u64 = totals.values().map(|c| c.h2d_bytes).sum();
        let probe_d2h: u64 = totals.values().map(|c| c.d2h_bytes).sum();
        let start = *self.pcie_at_start.get_or_insert((probe_h2d, probe_d2h));
        if have {
            let seen_h2d = probe_h2d.saturating_sub(start.0);
            let seen_d2h = probe_d2h.saturating_sub(start.1);
            self.residual_run.0 = self.residual_run.0.max(dev_h2d.saturating_sub(seen_h2d));
            self.residual_run.1 = self.residual_run.1.max(dev_d2h.saturating_sub(seen_d2h));
        }
        self.state.residual_h2d_bytes = self.residual_base.0 + self.residual_run.0;
        self.state.residual_d2h_bytes = self.residual_base.1 + self.residual_run.1;
        let u = totals.entry(TENANT_UNATTRIBUTED.to_owned()).or_default();
        u.h2d_bytes += self.state.residual_h2d_bytes;
        u.d2h_bytes += self.state.residual_d2h_bytes;
    }

    fn persist(&mut self) {
        match self.state_file.save(&self.state) {
            Ok(()) => self.state_error_logged = false,
            Err(e) if !self.state_error_logged => {
                warn!(
                    "{e}; probe counters of vanished cgroups will not survive an agent restart \
                     (make [agent] state_dir writable)"
                );
                self.state_error_logged = true;
            }
            Err(_) => {}
        }
    }
}

/// Every probe name, in the order [`Probes::statuses`] lists them.
pub const PROBE_NAMES: [&str; 5] = [
    PROBE_NET_INGRESS,
    PROBE_NET_EGRESS,
    PROBE_PCIE,
    PROBE_EXEC,
    PROBE_EXIT,
];

/// Loads and attaches every probe for real, as the agent would, but with
/// maps in a throwaway pin directory beside `[probes] pin_dir` (a running
/// agent's maps and counters are left alone); detaches and removes it all
/// before returning. For `tally doctor`.
pub fn trial(config: &ProbesConfig) -> Vec<(&'static str, ProbeStatus)> {
    let mut name = config
        .pin_dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!("-doctor-{}", std::process::id()));
    let pin_dir = config.pin_dir.with_file_name(name);
    let state_dir = std::env::temp_dir().join(format!("tally-doctor-{}", std::process::id()));
    let trial_config = ProbesConfig {
        pin_dir: pin_dir.clone(),
        ..config.clone()
    };
    let statuses = Probes::start(&trial_config, &state_dir).statuses();
    if let Ok(entries) = std::fs::read_dir(&pin_dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let _ = std::fs::remove_dir(&pin_dir);
    let _ = std::fs::remove_dir_all(&state_dir);
    PROBE_NAMES
        .iter()
        .zip(statuses)
        .map(|(name, status)| (*name, status))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn probes_section_parses_and_rejects_unknown_keys() {
        let c = Config::parse(
            "[probes]\npcie = false\ncuda_libs = [\"/opt/nvidia/libcuda.so.1\"]\n\
             pin_dir = \"/sys/fs/bpf/t\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert!(!c.probes.pcie && c.probes.network && c.probes.process);
        assert_eq!(
            c.probes.cuda_libs,
            Some(vec![PathBuf::from("/opt/nvidia/libcuda.so.1")])
        );
        assert_eq!(c.probes.pin_dir, PathBuf::from("/sys/fs/bpf/t"));
        let d = Config::parse("", Path::new("t.toml")).unwrap().probes;
        assert_eq!(d.pin_dir, PathBuf::from(paths::BPF_PIN_DIR));
        assert!(d.cuda_libs.is_none());

        let err = Config::parse("[probes]\ncuda_lib = []\n", Path::new("t.toml")).unwrap_err();
        assert_eq!(err.problems[0].key, "probes", "{err}");
        assert!(err.to_string().contains("cuda_lib"), "{err}");
    }

    #[test]
    fn errors_carry_their_fix_and_the_verifier_log() {
        let e = ProbeError::Verifier {
            program: "tally_net_egress",
            source: io::Error::from_raw_os_error(13),
            verifier_log: "0: (b7) r0 = 1\ninvalid mem access".into(),
        };
        let text = e.explain();
        assert!(text.contains("invalid mem access"), "{text}");
        assert!(text.contains("fix:"), "{text}");
        let e = ProbeError::Load {
            object: "net",
            message: "map tally_net: Operation not permitted (os error 1)".into(),
        };
        assert!(e.explain().contains("CAP_BPF"), "{}", e.explain());
    }

    #[test]
    fn a_pair_sharing_a_broken_object_reports_its_error_once_each() {
        let e = ProbeError::Load {
            object: "net",
            message: "map tally_net: Operation not permitted (os error 1)".into(),
        };
        let want = e.explain();
        let [ingress, egress] = family_statuses([PROBE_NET_INGRESS, PROBE_NET_EGRESS], Err(e));
        for s in [&ingress, &egress] {
            let text = s.error.as_deref().unwrap();
            assert!(!s.up);
            assert_eq!(text, want, "{}", s.probe);
            assert_eq!(text.matches("cannot load").count(), 1, "{text}");
            assert_eq!(text.matches("fix:").count(), 1, "{text}");
        }
        assert_eq!(
            (ingress.probe.as_str(), egress.probe.as_str()),
            (PROBE_NET_INGRESS, PROBE_NET_EGRESS)
        );

        // Once the object loaded, each program reports its own result.
        let [exec, exit] = family_statuses(
            [PROBE_EXEC, PROBE_EXIT],
            Ok([Ok(()), Err(ProbeError::NoCgroup2)]),
        );
        assert!(exec.up && exec.error.is_none());
        assert!(!exit.up && exit.error.unwrap().contains("no cgroup v2"));
    }

    #[test]
    fn bpffs_is_mounted_for_root_only() {
        let mount = mount_bpffs();
        let args: Vec<_> = mount.get_args().collect();
        assert_eq!(mount.get_program(), "mount");
        assert_eq!(
            args,
            ["-t", "bpf", "-o", "mode=0700", "bpf", paths::BPFFS],
            "0700 as systemd mounts it, not bpffs's default 1777"
        );
    }

    #[test]
    fn disabled_probes_load_nothing_and_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let config = ProbesConfig {
            network: false,
            pcie: false,
            process: false,
            cuda_libs: None,
            pin_dir: dir.path().join("pins"),
        };
        let probes = Probes::start(&config, dir.path());
        let statuses = probes.statuses();
        assert_eq!(
            statuses
                .iter()
                .map(|s| s.probe.as_str())
                .collect::<Vec<_>>(),
            PROBE_NAMES
        );
        for s in statuses {
            assert!(!s.up);
            assert!(s.error.unwrap().contains("disabled in the config"));
        }
        assert!(
            !dir.path().join("pins").exists(),
            "no pin dir when all are off"
        );
    }
}
