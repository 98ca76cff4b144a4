//! The scenario file (`TALLY_SIM_SCENARIO`): which GPUs the simulated driver
//! has. Parsed and validated once, at `nvmlInit`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// Compute slices of one physical GPU (A100/H100 class).
pub const COMPUTE_SLICES: u32 = 7;
/// Memory slices of one physical GPU (A100/H100 class).
pub const MEMORY_SLICES: u32 = 8;

/// MIG profile names the simulator accepts (A30, A100 40/80 GB, H100 80/94/96 GB,
/// H200 141 GB). The compute-slice count is the number before `g`, the memory
/// the number before `gb`; `+me` adds the media extensions.
pub const KNOWN_MIG_PROFILES: &[&str] = &[
    // A30 24 GB
    "1g.6gb",
    "1g.6gb+me",
    "2g.12gb",
    "2g.12gb+me",
    "4g.24gb",
    // A100 40 GB
    "1g.5gb",
    "1g.5gb+me",
    "1g.10gb",
    "2g.10gb",
    "3g.20gb",
    "4g.20gb",
    "7g.40gb",
    // A100 80 GB, H100 80 GB
    "1g.10gb+me",
    "1g.20gb",
    "2g.20gb",
    "3g.40gb",
    "4g.40gb",
    "7g.80gb",
    // H100 94/96 GB (NVL, GH200)
    "1g.12gb",
    "1g.12gb+me",
    "1g.24gb",
    "2g.24gb",
    "3g.47gb",
    "3g.48gb",
    "4g.47gb",
    "4g.48gb",
    "7g.94gb",
    "7g.96gb",
    // H200 141 GB
    "1g.18gb",
    "1g.18gb+me",
    "1g.35gb",
    "2g.35gb",
    "3g.71gb",
    "4g.71gb",
    "7g.141gb",
];

/// The scenario file as written by a test or demo.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    /// The GPUs, in NVML index order.
    #[serde(default)]
    pub gpu: Vec<GpuSpec>,
    /// How often the simulated driver takes a per-process utilization sample
    /// (default 1000 ms). Samples carry the start of their period as time stamp.
    pub sample_period_ms: Option<u64>,
}

/// One `[[gpu]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    /// Marketing name, returned by `nvmlDeviceGetName`.
    pub model: String,
    /// Total framebuffer in MiB.
    pub memory_mib: u64,
    /// `GPU-…` UUID; a deterministic one per index when absent.
    pub uuid: Option<String>,
    /// Power draw at 0 % utilization, watts.
    pub power_idle_w: f64,
    /// Power draw at 100 % utilization, watts; also the enforced power limit.
    pub power_max_w: f64,
    /// MIG instances (profile names); MIG mode is on when present.
    pub mig: Option<Vec<String>>,
    /// Temperature at 0 % utilization (default 32 °C).
    pub temperature_idle_c: Option<u32>,
    /// Temperature at 100 % utilization (default 78 °C).
    pub temperature_max_c: Option<u32>,
    /// PCIe bandwidth per direction at full link use, KB/s (default 32 000 000).
    pub pcie_max_kbps: Option<u32>,
    /// Board serial number (default: deterministic per index).
    pub serial: Option<String>,
    /// Whether the board has a total-energy counter (default true); without
    /// one `nvmlDeviceGetTotalEnergyConsumption` answers NOT_SUPPORTED, as on
    /// pre-Volta boards, many GeForce cards and some vGPU guests.
    pub energy_counter: Option<bool>,
}

/// A validated scenario, ready for the simulator.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The GPUs, index = position.
    pub gpus: Vec<Gpu>,
    /// Sampling period of per-process utilization, milliseconds (≥ 1).
    pub sample_period_ms: u64,
}

/// The NVIDIA architectures the simulator names (NVML's `NVML_DEVICE_ARCH_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Volta = 5,
    Turing = 6,
    Ampere = 7,
    Ada = 8,
    Hopper = 9,
    Blackwell = 10,
}

/// One simulated physical GPU.
#[derive(Debug, Clone)]
pub struct Gpu {
    pub index: u32,
    pub model: String,
    pub uuid: String,
    pub serial: String,
    pub memory_mib: u64,
    pub power_idle_mw: u64,
    pub power_max_mw: u64,
    pub temperature_idle_c: u32,
    pub temperature_max_c: u32,
    pub pcie_max_kbps: u32,
    pub arch: Option<Arch>,
    /// Streaming multiprocessors of the whole GPU.
    pub sm_count: u32,
    /// `None`: MIG mode off. `Some`: MIG mode on with these instances.
    pub mig: Option<Vec<MigInstance>>,
    /// Whether NVML reports a total-energy counter for this GPU.
    pub energy_counter: bool,
}

/// One MIG instance (a GPU instance holding one full compute instance).
#[derive(Debug, Clone)]
pub struct MigInstance {
    /// Position in the scenario's `mig` list, which is also the MIG device index.
    pub index: u32,
    pub profile: String,
    pub compute_slices: u32,
    pub memory_slices: u32,
    pub memory_mib: u64,
    /// GPU instance id: `index + 1`.
    pub gpu_instance_id: u32,
    /// Compute instance id: always 0 (one compute instance spanning the GPU instance).
    pub compute_instance_id: u32,
    pub uuid: String,
}

/// Why a scenario could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// `TALLY_SIM_SCENARIO` is not set.
    #[error(
        "{} is not set; point it at a scenario TOML file",
        crate::state::SCENARIO_ENV
    )]
    NotSet,
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is out of range or inconsistent.
    #[error("{path}: {field}: {problem}")]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
}

/// Reads and validates a scenario file.
pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
    let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Validates scenario text; `path` is only used in messages.
pub fn parse(path: &Path, text: &str) -> Result<Scenario, ScenarioError> {
    let file: ScenarioFile = toml::from_str(text).map_err(|e| ScenarioError::Parse {
        path: path.to_owned(),
        message: one_line_toml_error(text, &e),
    })?;
    let invalid = |field: String, problem: String| ScenarioError::Invalid {
        path: path.to_owned(),
        field,
        problem,
    };
    let sample_period_ms = file.sample_period_ms.unwrap_or(1000);
    if sample_period_ms == 0 {
        return Err(invalid(
            "sample_period_ms".into(),
            "must be at least 1".into(),
        ));
    }
    let mut gpus = Vec::with_capacity(file.gpu.len());
    for (i, spec) in file.gpu.into_iter().enumerate() {
        let at = |key: &str| format!("gpu[{i}].{key}");
        let index = u32::try_from(i).map_err(|_| invalid(at("model"), "too many GPUs".into()))?;
        if i >= crate::sim::MAX_GPUS {
            return Err(invalid(
                format!("gpu[{i}]"),
                format!("at most {} GPUs are simulated", crate::sim::MAX_GPUS),
            ));
        }
        if spec.model.trim().is_empty() {
            return Err(invalid(at("model"), "must not be empty".into()));
        }
        if spec.memory_mib == 0 {
            return Err(invalid(at("memory_mib"), "must be greater than 0".into()));
        }
        for (key, w) in [
            ("power_idle_w", spec.power_idle_w),
            ("power_max_w", spec.power_max_w),
        ] {
            if !w.is_finite() || !(0.0..=100_000.0).contains(&w) {
                return Err(invalid(
                    at(key),
                    format!("{w} is not a power in watts (0..=100000)"),
                ));
            }
        }
        if spec.power_max_w <= 0.0 {
            return Err(invalid(at("power_max_w"), "must be greater than 0".into()));
        }
        if spec.power_idle_w > spec.power_max_w {
            return Err(invalid(
                at("power_idle_w"),
                format!(
                    "idle power {} W is above max power {} W",
                    spec.power_idle_w, spec.power_max_w
                ),
            ));
        }
        let temperature_idle_c = spec.temperature_idle_c.unwrap_or(32);
        let temperature_max_c = spec.temperature_max_c.unwrap_or(78);
        if temperature_idle_c > temperature_max_c {
            return Err(invalid(
                at("temperature_idle_c"),
                format!(
                    "{temperature_idle_c} °C is above temperature_max_c {temperature_max_c} °C"
                ),
            ));
        }
        let uuid = match spec.uuid {
            Some(u) if !u.starts_with("GPU-") || u.len() < 5 || u.len() > 79 => {
                return Err(invalid(
                    at("uuid"),
                    format!("{u:?} must look like \"GPU-…\""),
                ));
            }
            Some(u) => u,
            None => format!("GPU-{}", uuid_from(&format!("tally-sim-gpu-{index}"))),
        };
        if gpus.iter().any(|g: &Gpu| g.uuid == uuid) {
            return Err(invalid(
                at("uuid"),
                format!("{uuid} is used by another GPU"),
            ));
        }
        let arch = arch_of(&spec.model);
        let sm_count = match arch {
            Some(Arch::Hopper | Arch::Blackwell) => 132,
            Some(Arch::Ampere) => 108,
            _ => 80,
        };
        let mig = match spec.mig {
            None => None,
            Some(profiles) => Some(
                mig_instances(&uuid, spec.memory_mib, &profiles)
                    .map_err(|(j, problem)| invalid(format!("gpu[{i}].mig[{j}]"), problem))?,
            ),
        };
        gpus.push(Gpu {
            index,
            serial: spec.serial.unwrap_or_else(|| format!("1654{index:09}")),
            model: spec.model,
            uuid,
            memory_mib: spec.memory_mib,
            // Checked finite and within 0..=100 kW above.
            power_idle_mw: (spec.power_idle_w * 1000.0).round() as u64,
            power_max_mw: (spec.power_max_w * 1000.0).round() as u64,
            temperature_idle_c,
            temperature_max_c,
            pcie_max_kbps: spec.pcie_max_kbps.unwrap_or(32_000_000),
            arch,
            sm_count,
            mig,
            energy_counter: spec.energy_counter.unwrap_or(true),
        });
    }
    Ok(Scenario {
        gpus,
        sample_period_ms,
    })
}

/// Memory slice size of a GPU: an eighth of its framebuffer.
fn memory_slice_mib(gpu_memory_mib: u64) -> u64 {
    gpu_memory_mib / u64::from(MEMORY_SLICES)
}

/// Builds the MIG instances; on error returns the offending list position.
fn mig_instances(
    gpu_uuid: &str,
    gpu_memory_mib: u64,
    profiles: &[String],
) -> Result<Vec<MigInstance>, (usize, String)> {
    let slice_mib = memory_slice_mib(gpu_memory_mib);
    let (mut compute_used, mut memory_used) = (0, 0);
    let mut out = Vec::with_capacity(profiles.len());
    for (j, name) in profiles.iter().enumerate() {
        let Some((compute_slices, memory_gb)) = parse_profile(name) else {
            return Err((j, format!("unknown MIG profile {name:?}")));
        };
        // The profile's memory must be (close to) a whole number of this
        // GPU's memory slices: 1g.10gb fits an 80 GB GPU, not a 40 GB one.
        let ratio = (memory_gb as f64 * 1024.0) / slice_mib.max(1) as f64;
        let memory_slices = ratio.round() as u32;
        if memory_slices == 0
            || !matches!(memory_slices, 1 | 2 | 4 | 8)
            || (ratio - f64::from(memory_slices)).abs() > 0.15 * f64::from(memory_slices)
        {
            return Err((
                j,
                format!(
                    "MIG profile {name:?} does not fit a {gpu_memory_mib} MiB GPU (memory slice {slice_mib} MiB)"
                ),
            ));
        }
        compute_used += compute_slices;
        memory_used += memory_slices;
        if compute_used > COMPUTE_SLICES {
            return Err((
                j,
                format!(
                    "{name:?} brings compute slices to {compute_used}, the GPU has {COMPUTE_SLICES}"
                ),
            ));
        }
        if memory_used > MEMORY_SLICES {
            return Err((
                j,
                format!(
                    "{name:?} brings memory slices to {memory_used}, the GPU has {MEMORY_SLICES}"
                ),
            ));
        }
        let index = j as u32; // at most 7 instances fit, checked above
        out.push(MigInstance {
            index,
            profile: name.clone(),
            compute_slices,
            memory_slices,
            memory_mib: u64::from(memory_slices) * slice_mib,
            gpu_instance_id: index + 1,
            compute_instance_id: 0,
            uuid: format!("MIG-{}", uuid_from(&format!("{gpu_uuid}/mig/{index}"))),
        });
    }
    Ok(out)
}

/// `"3g.40gb"` → `(3, 40)`, for known profiles only.
pub fn parse_profile(name: &str) -> Option<(u32, u32)> {
    if !KNOWN_MIG_PROFILES.contains(&name) {
        return None;
    }
    let base = name.strip_suffix("+me").unwrap_or(name);
    let (g, mem) = base.split_once('.')?;
    let compute = g.strip_suffix('g')?.parse().ok()?;
    let memory = mem.strip_suffix("gb")?.parse().ok()?;
    Some((compute, memory))
}

/// Guesses the architecture from the marketing name.
fn arch_of(model: &str) -> Option<Arch> {
    let m = model.to_ascii_uppercase();
    let has = |s: &str| {
        m.split(|c: char| !c.is_ascii_alphanumeric())
            .any(|w| w == s)
    };
    if has("B200") || has("GB200") || has("B100") {
        Some(Arch::Blackwell)
    } else if has("H100") || has("H200") || has("H800") || has("GH200") || has("H20") {
        Some(Arch::Hopper)
    } else if has("L4") || has("L40") || has("L40S") {
        Some(Arch::Ada)
    } else if ["A100", "A800", "A30", "A40", "A10", "A16", "A2"]
        .iter()
        .any(|s| has(s))
    {
        Some(Arch::Ampere)
    } else if has("T4") {
        Some(Arch::Turing)
    } else if has("V100") {
        Some(Arch::Volta)
    } else {
        None
    }
}

/// A deterministic RFC-4122-shaped UUID (no `GPU-`/`MIG-` prefix) from a seed.
fn uuid_from(seed: &str) -> String {
    let fnv = |basis: u64| {
        seed.bytes().fold(basis, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let hi = fnv(0xcbf2_9ce4_8422_2325);
    let lo = fnv(0x6c62_272e_07bb_0142);
    let hex = format!("{hi:016x}{lo:016x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// toml's errors span several lines with a source excerpt; the simulator
/// prints one line: `line N: message`.
pub(crate) fn one_line_toml_error(text: &str, e: &toml::de::Error) -> String {
    let mut out = String::new();
    if let Some(span) = e.span() {
        let before = text.get(..span.start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let _ = write!(out, "line {line}: ");
    }
    out.push_str(&e.message().replace('\n', " "));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Scenario, ScenarioError> {
        parse(Path::new("/s.toml"), text)
    }

    const H100: &str = "[[gpu]]\nmodel = \"NVIDIA H100 80GB HBM3\"\nmemory_mib = 81559\npower_idle_w = 70\npower_max_w = 700\n";

    #[test]
    fn mig_slices_and_ids() {
        let s = p(&format!(
            "{H100}mig = [\"3g.40gb\", \"2g.20gb\", \"1g.10gb\", \"1g.10gb\"]\n"
        ))
        .unwrap();
        let mig = s.gpus[0].mig.as_ref().unwrap();
        assert_eq!(mig.len(), 4);
        assert_eq!((mig[0].compute_slices, mig[0].memory_slices), (3, 4));
        assert_eq!(mig[0].memory_mib, 4 * (81559 / 8));
        assert_eq!((mig[3].gpu_instance_id, mig[3].compute_instance_id), (4, 0));
        assert!(mig[0].uuid.starts_with("MIG-") && mig[0].uuid != mig[1].uuid);
        assert_eq!(s.gpus[0].arch, Some(Arch::Hopper));
    }

    #[test]
    fn errors_name_the_field() {
        let e = p(&format!("{H100}mig = [\"3g.40gb\", \"9g.99gb\"]\n")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/s.toml: gpu[0].mig[1]: unknown MIG profile \"9g.99gb\""
        );
        let e = p(&format!("{H100}mig = [\"7g.80gb\", \"1g.10gb\"]\n")).unwrap_err();
        assert!(e.to_string().contains("compute slices to 8"), "{e}");
        let e = p(&format!(
            "{H100}mig = [\"3g.40gb\", \"3g.40gb\", \"1g.10gb\"]\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("memory slices to 9"), "{e}");
        let e = p(&format!("{H100}mig = [\"1g.5gb\"]\n")).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        let e = p(&H100.replace("power_idle_w = 70", "power_idle_w = 800")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/s.toml: gpu[0].power_idle_w: idle power 800 W"),
            "{e}"
        );
        let e = p(&H100.replace("81559", "0")).unwrap_err();
        assert!(e.to_string().contains("gpu[0].memory_mib"), "{e}");
        let e = p(&format!("{H100}colour = 1\n")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/s.toml: line 6: unknown field `colour`"),
            "{e}"
        );
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn a100_40gb_profiles_fit() {
        let s = p("[[gpu]]\nmodel = \"NVIDIA A100-SXM4-40GB\"\nmemory_mib = 40536\npower_idle_w = 50\npower_max_w = 400\nmig = [\"4g.20gb\", \"2g.10gb\", \"1g.5gb\"]\n").unwrap();
        let mig = s.gpus[0].mig.as_ref().unwrap();
        assert_eq!(mig.iter().map(|m| m.memory_slices).sum::<u32>(), 7);
        assert_eq!(s.gpus[0].arch, Some(Arch::Ampere));
    }
}
