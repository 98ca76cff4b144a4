//! A stand-in `nvidia-smi` for machines without a GPU: the queries
//! `tests/gpu/check.sh` makes, answered from NVML (the simulator library
//! the test kit finds, [`tally_e2e::sim_lib`]) in nvidia-smi's formats. With it the check's comparisons with
//! the driver's own tool run in the tests, against the same simulated
//! driver the agent reads, at the moments the script asks.
//!
//! ```text
//! sim-nvidia-smi -L
//! sim-nvidia-smi --query-gpu=index,uuid,… --format=csv,noheader,nounits
//! sim-nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader,nounits
//! ```
//!
//! Fields: index, uuid, name, driver_version, mig.mode.current,
//! memory.used, memory.total (MiB), power.draw (W), temperature.gpu (°C),
//! utilization.gpu (%); pid, gpu_uuid, used_memory (MiB). What NVML does
//! not answer prints `[N/A]`, as nvidia-smi does. Anything else (`dmon`
//! among them) exits 2 naming what it does not know.
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

use std::{env, process::ExitCode};

use nvml_wrapper::{
    Device, Nvml, enum_wrappers::device::TemperatureSensor, enums::device::UsedGpuMemory,
    error::NvmlError, struct_wrappers::device::ProcessInfo,
};

const MIB: u64 = 1 << 20;
const NA: &str = "[N/A]";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    match run(&args) {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sim-nvidia-smi: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> Result<Vec<String>, String> {
    let mut query = None;
    let mut list = false;
    for arg in args {
        if arg == "-L" {
            list = true;
        } else if let Some(fields) = arg.strip_prefix("--query-gpu=") {
            query = Some(Query::Gpu(fields.split(',').map(str::to_owned).collect()));
        } else if let Some(fields) = arg.strip_prefix("--query-compute-apps=") {
            query = Some(Query::Apps(fields.split(',').map(str::to_owned).collect()));
        } else if arg != "--format=csv,noheader,nounits" {
            return Err(format!(
                "{arg}: not known here (-L, --query-gpu=…, --query-compute-apps=…, \
                 --format=csv,noheader,nounits)"
            ));
        }
    }
    let nvml = Nvml::builder()
        .lib_path(tally_e2e::sim_lib().as_os_str())
        .init()
        .map_err(|e| format!("NVML: {e}"))?;
    let count = nvml.device_count().map_err(|e| format!("NVML: {e}"))?;
    let devices = (0..count)
        .map(|i| nvml.device_by_index(i).map_err(|e| format!("GPU {i}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    match (list, query) {
        (true, None) => Ok(devices
            .iter()
            .enumerate()
            .flat_map(|(i, d)| list_lines(i, d))
            .collect()),
        (false, Some(Query::Gpu(fields))) => devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                fields
                    .iter()
                    .map(|f| gpu_field(&nvml, i, d, f))
                    .collect::<Result<Vec<_>, _>>()
            })
            .map(|row| row.map(|r| r.join(", ")))
            .collect(),
        (false, Some(Query::Apps(fields))) => {
            let mut lines = Vec::new();
            for d in &devices {
                let uuid = d.uuid().map_err(|e| format!("uuid: {e}"))?;
                let procs = d
                    .running_compute_processes()
                    .map_err(|e| format!("processes: {e}"))?;
                for p in &procs {
                    let row = fields
                        .iter()
                        .map(|f| app_field(p, &uuid, f))
                        .collect::<Result<Vec<_>, _>>()?;
                    lines.push(row.join(", "));
                }
            }
            Ok(lines)
        }
        _ => Err("give -L, or one --query-gpu=… or --query-compute-apps=…".into()),
    }
}

enum Query {
    Gpu(Vec<String>),
    Apps(Vec<String>),
}

/// `nvidia-smi -L`: a GPU's line, then one per MIG instance.
fn list_lines(index: usize, d: &Device<'_>) -> Vec<String> {
    let name = d.name().unwrap_or_else(|_| NA.into());
    let uuid = d.uuid().unwrap_or_else(|_| NA.into());
    let mut lines = vec![format!("GPU {index}: {name} (UUID: {uuid})")];
    let count = d.mig_device_count().unwrap_or(0);
    for i in 0..count {
        let Ok(mig) = d.mig_device_by_index(i) else {
            continue;
        };
        let profile = mig
            .name()
            .ok()
            .and_then(|n| n.rsplit_once(" MIG ").map(|(_, p)| p.to_owned()))
            .unwrap_or_else(|| NA.into());
        let uuid = mig.uuid().unwrap_or_else(|_| NA.into());
        lines.push(format!("  MIG {profile:<12} Device {i:>2}: (UUID: {uuid})"));
    }
    lines
}

/// One `--query-gpu` field of GPU `index`.
fn gpu_field(nvml: &Nvml, index: usize, d: &Device<'_>, field: &str) -> Result<String, String> {
    let or_na = |r: Result<String, NvmlError>| r.unwrap_or_else(|_| NA.into());
    Ok(match field {
        "index" => index.to_string(),
        "uuid" => or_na(d.uuid()),
        "name" => or_na(d.name()),
        "driver_version" => or_na(nvml.sys_driver_version()),
        "mig.mode.current" => or_na(d.mig_mode().map(|m| {
            if m.current == 1 {
                "Enabled"
            } else {
                "Disabled"
            }
            .to_owned()
        })),
        "memory.used" => or_na(d.memory_info().map(|m| (m.used / MIB).to_string())),
        "memory.total" => or_na(d.memory_info().map(|m| (m.total / MIB).to_string())),
        "power.draw" => or_na(
            d.power_usage()
                .map(|mw| format!("{:.2}", f64::from(mw) / 1000.0)),
        ),
        "temperature.gpu" => or_na(d.temperature(TemperatureSensor::Gpu).map(|t| t.to_string())),
        "utilization.gpu" => or_na(d.utilization_rates().map(|u| u.gpu.to_string())),
        other => return Err(format!("--query-gpu field {other}: not known here")),
    })
}

/// One `--query-compute-apps` field of process `p` on the GPU `uuid`.
fn app_field(p: &ProcessInfo, uuid: &str, field: &str) -> Result<String, String> {
    Ok(match field {
        "pid" => p.pid.to_string(),
        "gpu_uuid" => uuid.to_owned(),
        "used_memory" => match p.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => (bytes / MIB).to_string(),
            UsedGpuMemory::Unavailable => NA.into(),
        },
        other => {
            return Err(format!(
                "--query-compute-apps field {other}: not known here"
            ));
        }
    })
}
