//! The state directory (`TALLY_SIM_STATE`): what runs on the simulated GPUs
//! and which faults are injected. Every call of the simulator sees what was
//! written before it (`watch` keeps it in memory); tests and
//! `tally-sim-run` write it through the functions here.
//!
//! Layout (every on-disk path of the simulator is named in this module):
//! - `procs/<pid>.toml` — a [`Registration`];
//! - `lost/<index>` — GPU `index` has fallen off the bus;
//! - `hang/<index>` — every query of GPU `index` blocks until it is removed;
//! - `xid/<name>.toml` — an [`XidFault`], renamed to `<name>.toml.delivered`
//!   once an event set has received it;
//! - `health/<index>.toml` — [`Health`] signals GPU `index` reports (ECC
//!   counts, remapped rows, throttle reasons);
//! - `reset/<index>` — the energy counter of GPU `index` restarts from 0
//!   (a driver reload); the simulator removes the file when it does;
//! - `.energy/<index>` — the simulator's energy integral (internal).

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::scenario::{self, Scenario};

/// Environment variable naming the scenario file.
pub const SCENARIO_ENV: &str = "TALLY_SIM_SCENARIO";
/// Environment variable naming the state directory.
pub const STATE_ENV: &str = "TALLY_SIM_STATE";

/// Directory of process registrations.
pub fn procs_dir(state: &Path) -> PathBuf {
    state.join("procs")
}
/// Registration file of `pid`.
pub fn proc_file(state: &Path, pid: u32) -> PathBuf {
    procs_dir(state).join(format!("{pid}.toml"))
}
/// Marker file that makes GPU `index` lost.
pub fn lost_file(state: &Path, index: u32) -> PathBuf {
    state.join("lost").join(index.to_string())
}
/// Marker file that makes every query of GPU `index` block while it exists.
pub fn hang_file(state: &Path, index: u32) -> PathBuf {
    state.join("hang").join(index.to_string())
}
/// Directory of pending (and delivered) XID faults.
pub fn xid_dir(state: &Path) -> PathBuf {
    state.join("xid")
}
/// Suffix a delivered XID file gets.
pub const DELIVERED_SUFFIX: &str = ".delivered";
/// Health signals of GPU `index`.
pub fn health_file(state: &Path, index: u32) -> PathBuf {
    state.join("health").join(format!("{index}.toml"))
}
/// Marker that makes the energy counter of GPU `index` restart from 0 at
/// the next query; the simulator removes it once done.
pub fn reset_file(state: &Path, index: u32) -> PathBuf {
    state.join("reset").join(index.to_string())
}
/// Energy integral of GPU `index` (`<ns> <picojoules> <power mW>`: the
/// integral up to `<ns>` and the power since).
pub fn energy_file(state: &Path, index: u32) -> PathBuf {
    state.join(".energy").join(index.to_string())
}

/// A process's use of a simulated GPU: the content of `procs/<pid>.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// NVML index of the physical GPU.
    pub gpu: u32,
    /// MIG instance: position in that GPU's scenario `mig` list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig: Option<u32>,
    /// Framebuffer the process holds, MiB.
    pub memory_mib: u64,
    /// SM utilization of the process, 0..=1 (of its GPU or MIG instance).
    pub sm: f64,
    /// Which NVML call lists the process (default compute).
    #[serde(default, skip_serializing_if = "ProcKind::is_compute")]
    pub kind: ProcKind,
}

/// The kind of GPU context a process has; each kind is listed by its own
/// NVML call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcKind {
    /// A CUDA context: `nvmlDeviceGetComputeRunningProcesses`.
    #[default]
    Compute,
    /// An OpenGL/Vulkan context: `nvmlDeviceGetGraphicsRunningProcesses`.
    Graphics,
    /// An MPS client: `nvmlDeviceGetMPSComputeRunningProcesses`.
    Mps,
}

impl ProcKind {
    pub fn is_compute(&self) -> bool {
        *self == ProcKind::Compute
    }
}

/// A critical XID error to deliver once: the content of `xid/<name>.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XidFault {
    /// NVML index of the physical GPU that reports it.
    pub gpu: u32,
    /// The XID number (e.g. 79, fallen off the bus; 48, double-bit ECC).
    pub xid: u64,
}

/// What GPU `index` reports about its own health: the content of
/// `health/<index>.toml`. Every key defaults to a healthy GPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    /// Corrected (single-bit) ECC errors since driver load.
    pub ecc_corrected: u64,
    /// Uncorrected (double-bit) ECC errors since driver load.
    pub ecc_uncorrected: u64,
    /// Rows remapped for correctable / uncorrectable errors (Ampere and
    /// later).
    pub remapped_correctable: u32,
    pub remapped_uncorrectable: u32,
    /// A remap waits for the next GPU reset.
    pub remap_pending: bool,
    /// A remap failed: the GPU needs replacing.
    pub remap_failed: bool,
    /// Clock throttle reasons on top of the simulator's own (`gpu_idle`):
    /// `sw_power_cap`, `hw_slowdown`, `sync_boost`, `sw_thermal`,
    /// `hw_thermal`, `hw_power_brake`.
    pub throttle: Vec<String>,
}

/// NVML's throttle-reason bits by the names `health/<index>.toml` uses,
/// spelled out (not taken from nvml-wrapper) so that the simulator catches
/// a wrong bit on the agent's side; a unit test checks them against
/// nvml-wrapper's `ThrottleReasons`.
const THROTTLE_REASONS: &[(&str, u64)] = &[
    ("gpu_idle", 0x1),
    ("applications_clocks", 0x2),
    ("sw_power_cap", 0x4),
    ("hw_slowdown", 0x8),
    ("sync_boost", 0x10),
    ("sw_thermal", 0x20),
    ("hw_thermal", 0x40),
    ("hw_power_brake", 0x80),
    ("display_clock", 0x100),
];

/// `nvmlClocksThrottleReasonGpuIdle`: the reason the simulator gives
/// itself at 0 % utilization.
pub(crate) const THROTTLE_GPU_IDLE: u64 = throttle_bit("gpu_idle");

/// The bit of throttle reason `name` in [`THROTTLE_REASONS`], at compile
/// time.
const fn throttle_bit(name: &str) -> u64 {
    let mut i = 0;
    while i < THROTTLE_REASONS.len() {
        let (n, bit) = THROTTLE_REASONS[i];
        if n.len() == name.len() {
            let (a, b) = (n.as_bytes(), name.as_bytes());
            let mut j = 0;
            while j < a.len() && a[j] == b[j] {
                j += 1;
            }
            if j == a.len() {
                return bit;
            }
        }
        i += 1;
    }
    panic!("no such throttle reason")
}

impl Health {
    /// The throttle bits, or the first unknown name.
    pub fn throttle_bits(&self) -> Result<u64, String> {
        self.throttle.iter().try_fold(0, |bits, name| {
            THROTTLE_REASONS
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, b)| bits | b)
                .ok_or_else(|| format!("unknown throttle reason {name:?}"))
        })
    }
}

/// Parses `health/<index>.toml` as the simulator does; the error is one
/// line.
pub fn parse_health(text: &str) -> Result<Health, String> {
    let health: Health =
        toml::from_str(text).map_err(|e| scenario::one_line_toml_error(text, &e))?;
    health.throttle_bits()?;
    Ok(health)
}

/// Writes GPU `index`'s health signals (`Health::default()`: healthy).
pub fn set_health(state: &Path, index: u32, health: &Health) -> Result<(), StateError> {
    health
        .throttle_bits()
        .map_err(|_| StateError::Invalid("unknown throttle reason"))?;
    let text = toml::to_string(health).map_err(|_| StateError::Invalid("not serializable"))?;
    write_atomic(&health_file(state, index), &text)
}

/// Why the state directory could not be written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A registration value is out of range.
    #[error("invalid registration: {0}")]
    Invalid(&'static str),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Registration {
    /// Checks the ranges the simulator enforces when reading.
    pub fn validate(&self) -> Result<(), &'static str> {
        if !(0.0..=1.0).contains(&self.sm) {
            return Err("sm must be within 0..=1");
        }
        Ok(())
    }
}

/// Writes `contents` to `path` atomically (temporary file, then rename), so
/// the simulator never reads half a file.
fn write_atomic(path: &Path, contents: &str) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    fs::write(&tmp, contents).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Registers `pid` as a GPU process: writes `procs/<pid>.toml`. The
/// simulator ignores it once `/proc/<pid>` is gone.
pub fn register(state: &Path, pid: u32, reg: &Registration) -> Result<PathBuf, StateError> {
    reg.validate().map_err(StateError::Invalid)?;
    let path = proc_file(state, pid);
    let text = toml::to_string(reg).map_err(|_| StateError::Invalid("not serializable"))?;
    write_atomic(&path, &text)?;
    Ok(path)
}

/// Removes the registration of `pid` (no error when there is none).
pub fn unregister(state: &Path, pid: u32) -> Result<(), StateError> {
    let path = proc_file(state, pid);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
        _ => Ok(()),
    }
}

/// Marks GPU `index` lost (`lost = true`) or back (`false`).
pub fn set_lost(state: &Path, index: u32, lost: bool) -> Result<(), StateError> {
    let path = lost_file(state, index);
    if lost {
        write_atomic(&path, "")
    } else {
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }
}

/// Makes every query of GPU `index` (and of its MIG instances) block
/// (`hang = true`) until called again with `false`.
pub fn set_hang(state: &Path, index: u32, hang: bool) -> Result<(), StateError> {
    let path = hang_file(state, index);
    if hang {
        write_atomic(&path, "")
    } else {
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(&path)(e)),
            _ => Ok(()),
        }
    }
}

/// Makes the energy counter of GPU `index` restart from 0 at its next
/// query, as a driver reload does.
pub fn reset_energy(state: &Path, index: u32) -> Result<(), StateError> {
    write_atomic(&reset_file(state, index), "")
}

/// Parses the text of `procs/<pid>.toml` and checks it against `scenario`
/// as the simulator does on every read; the error is one line.
pub fn parse_registration(scenario: &Scenario, text: &str) -> Result<Registration, String> {
    let reg: Registration =
        toml::from_str(text).map_err(|e| scenario::one_line_toml_error(text, &e))?;
    reg.validate().map_err(str::to_owned)?;
    let Some(gpu) = scenario.gpus.get(reg.gpu as usize) else {
        return Err(format!(
            "gpu = {} is out of range ({} GPUs)",
            reg.gpu,
            scenario.gpus.len()
        ));
    };
    match (reg.mig, &gpu.mig) {
        (Some(m), Some(mig)) if m as usize >= mig.len() => Err(format!(
            "mig = {m} is out of range (gpu {} has {} MIG instances)",
            reg.gpu,
            mig.len()
        )),
        (Some(m), None) => Err(format!("mig = {m} but gpu {} is not in MIG mode", reg.gpu)),
        (None, Some(_)) => Err(format!(
            "gpu {} is in MIG mode; say which instance with mig = N",
            reg.gpu
        )),
        _ => Ok(reg),
    }
}

/// Parses the text of `xid/<name>.toml` and checks its GPU against
/// `scenario`; the error is one line.
pub fn parse_xid(scenario: &Scenario, text: &str) -> Result<XidFault, String> {
    let fault: XidFault =
        toml::from_str(text).map_err(|e| scenario::one_line_toml_error(text, &e))?;
    if fault.gpu as usize >= scenario.gpus.len() {
        return Err(format!("gpu = {} is out of range", fault.gpu));
    }
    Ok(fault)
}

/// Queues a critical XID error as `xid/<name>.toml`; `name` must be a plain
/// file name. Returns the path.
pub fn inject_xid(state: &Path, name: &str, fault: &XidFault) -> Result<PathBuf, StateError> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(StateError::Invalid("xid name must be a plain file name"));
    }
    let path = xid_dir(state).join(format!("{name}.toml"));
    let text = toml::to_string(fault).map_err(|_| StateError::Invalid("not serializable"))?;
    write_atomic(&path, &text)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use nvml_wrapper::bitmasks::device::ThrottleReasons;

    use super::*;

    #[test]
    fn throttle_bits_are_nvmls() {
        let nvml = [
            ("gpu_idle", ThrottleReasons::GPU_IDLE),
            (
                "applications_clocks",
                ThrottleReasons::APPLICATIONS_CLOCKS_SETTING,
            ),
            ("sw_power_cap", ThrottleReasons::SW_POWER_CAP),
            ("hw_slowdown", ThrottleReasons::HW_SLOWDOWN),
            ("sync_boost", ThrottleReasons::SYNC_BOOST),
            ("sw_thermal", ThrottleReasons::SW_THERMAL_SLOWDOWN),
            ("hw_thermal", ThrottleReasons::HW_THERMAL_SLOWDOWN),
            ("hw_power_brake", ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN),
            ("display_clock", ThrottleReasons::DISPLAY_CLOCK_SETTING),
        ];
        assert_eq!(THROTTLE_REASONS.len(), nvml.len());
        for ((name, bit), (nvml_name, reason)) in THROTTLE_REASONS.iter().zip(nvml) {
            assert_eq!((*name, *bit), (nvml_name, reason.bits()));
        }
        assert_eq!(THROTTLE_GPU_IDLE, ThrottleReasons::GPU_IDLE.bits());
    }

    #[test]
    fn register_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registration {
            gpu: 1,
            mig: Some(2),
            memory_mib: 4096,
            sm: 0.5,
            kind: ProcKind::Mps,
        };
        let path = register(dir.path(), 42, &reg).unwrap();
        assert_eq!(path, dir.path().join("procs/42.toml"));
        let back: Registration = toml::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, reg);
        let bad = Registration { sm: 1.5, ..reg };
        assert!(register(dir.path(), 43, &bad).is_err());
        unregister(dir.path(), 42).unwrap();
        unregister(dir.path(), 42).unwrap();
        assert!(!path.exists());
    }
}
