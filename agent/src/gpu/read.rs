//! Reading one GPU through NVML: every driver call of a sampling cycle,
//! and nothing else. Runs on the device's worker thread (see `workers`),
//! so a hung driver call stalls only that device.

use std::{
    collections::{BTreeMap, HashMap},
    time::Instant,
};

use nvml_wrapper::{
    Device, Nvml,
    enum_wrappers::device::{EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor},
    enums::{device::UsedGpuMemory, gpm::GpmMetricId},
    error::NvmlError,
    gpm::{GpmSample, gpm_metrics_get},
};

use crate::snapshot::{EccErrors, RemappedRows};

/// Compute slices of a full A100/H100 when NVML does not say.
const DEFAULT_COMPUTE_SLICES: u32 = 7;

/// A process as NVML lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RawProcess {
    pub pid: u32,
    pub memory_bytes: u64,
}

/// One MIG instance of a GPU in MIG mode.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawInstance {
    pub gi: u32,
    pub ci: u32,
    pub uuid: String,
    pub profile: Option<String>,
    /// Its GPU-instance slices over the parent's total.
    pub slice_fraction: f64,
    pub memory_used: u64,
    pub memory_total: u64,
    pub processes: Vec<RawProcess>,
    /// SM activity 0..1 since the previous cycle, from GPM (Hopper and
    /// later); `None` where the GPU has no GPM or at the first cycle.
    pub sm_activity: Option<f64>,
}

/// The previous cycle's GPM sample of each GPU instance: GPM measures
/// activity between two samples, so each is kept for the next cycle. Lives
/// on the device's reader thread, one per GPU.
#[derive(Default)]
pub(super) struct GpmSamples {
    last: HashMap<u32, GpmSample<'static>>,
    /// Whether the GPU has GPM, asked once: it is a property of the board,
    /// and the reader runs every cycle.
    supported: Option<bool>,
}

/// Every how many cycles a GPU's ECC counts and remapped rows are read
/// again (10 s at the default 1 s interval).
const HEALTH_EVERY: u64 = 10;

/// What a GPU's reader thread keeps between cycles, one per GPU.
#[derive(Default)]
pub(super) struct ReaderState {
    gpm: GpmSamples,
    health: SlowHealth,
}

/// ECC counts and remapped rows: three driver calls that move only when
/// memory fails, which is rare, so they are read on the first cycle and then
/// every [`HEALTH_EVERY`] cycles, the last values carried in between. A new
/// error shows within that many intervals; throttle reasons, a state that
/// flips with the load (idle, power cap), are still read every cycle.
#[derive(Default)]
struct SlowHealth {
    cycles: u64,
    ecc_errors: Option<EccErrors>,
    remapped_rows: Option<RemappedRows>,
}

impl SlowHealth {
    /// Whether this cycle reads them afresh (the first does).
    fn due(&mut self) -> bool {
        let due = self.cycles.is_multiple_of(HEALTH_EVERY);
        self.cycles += 1;
        due
    }
}

/// Everything one cycle reads of one physical GPU.
#[derive(Debug, Clone)]
pub(super) struct RawDevice {
    /// When the energy counter was read: the interval boundary.
    pub read_at: Instant,
    pub uuid: String,
    pub model: String,
    pub mig_mode: bool,
    pub utilization: Option<f64>,
    pub memory_used: u64,
    pub memory_total: u64,
    pub power_watts: Option<f64>,
    pub temperature_celsius: Option<f64>,
    pub energy_mj: Option<u64>,
    /// PCIe throughput in KB/s: (tx, rx).
    pub pcie_kbps: Option<(u32, u32)>,
    pub processes: Vec<RawProcess>,
    pub ecc_errors: Option<EccErrors>,
    pub remapped_rows: Option<RemappedRows>,
    pub throttle_reasons: Option<u64>,
    /// Per-process SM samples newer than the cursor: (pid, timestamp µs, SM 0..1).
    pub sm_samples: Vec<(u32, u64, f64)>,
    pub instances: Vec<RawInstance>,
}

/// Reads GPU `index`. Fails only on calls every GPU answers (handle, UUID,
/// name, memory); optional readings become `None`. `util_cursor` is the
/// newest per-process sample timestamp already consumed.
pub(super) fn read_device(
    nvml: &'static Nvml,
    index: u32,
    util_cursor: u64,
    state: &mut ReaderState,
) -> Result<RawDevice, NvmlError> {
    let device = nvml.device_by_index(index)?;
    let uuid = device.uuid()?;
    let model = device.name()?;
    let memory = device.memory_info()?;
    let mig_mode = device.mig_mode().map(|m| m.current == 1).unwrap_or(false);
    let utilization = match device.utilization_rates() {
        Ok(u) => Some(f64::from(u.gpu) / 100.0),
        Err(NvmlError::GpuLost) => return Err(NvmlError::GpuLost),
        Err(_) => None,
    };
    let read_at = Instant::now();
    let energy_mj = device.total_energy_consumption().ok();
    let pcie_kbps = device
        .pcie_throughput(PcieUtilCounter::Send)
        .and_then(|tx| Ok((tx, device.pcie_throughput(PcieUtilCounter::Receive)?)))
        .ok();
    let health = &mut state.health;
    if health.due() {
        health.ecc_errors = read_ecc(&device);
        health.remapped_rows = remapped_rows(nvml, &device);
    }
    let (ecc_errors, remapped_rows) = (health.ecc_errors, health.remapped_rows);
    let (processes, sm_samples, instances) = if mig_mode {
        (
            Vec::new(),
            Vec::new(),
            read_instances(nvml, &device, &mut state.gpm),
        )
    } else {
        (
            read_processes(&device),
            read_sm_samples(&device, util_cursor),
            Vec::new(),
        )
    };
    Ok(RawDevice {
        read_at,
        uuid,
        model,
        mig_mode,
        utilization,
        memory_used: memory.used,
        memory_total: memory.total,
        power_watts: device.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
        temperature_celsius: device
            .temperature(TemperatureSensor::Gpu)
            .ok()
            .map(f64::from),
        energy_mj,
        pcie_kbps,
        ecc_errors,
        remapped_rows,
        throttle_reasons: device.current_throttle_reasons().ok().map(|r| r.bits()),
        processes,
        sm_samples,
        instances,
    })
}

/// Every process on the device: CUDA contexts, graphics contexts and MPS
/// clients are listed by three NVML calls; a call the device lacks (old
/// drivers, no MPS) lists none.
fn read_processes(device: &Device<'_>) -> Vec<RawProcess> {
    let lists = [
        device.running_compute_processes(),
        device.running_graphics_processes(),
        device.mps_running_compute_processes(),
    ];
    merge_processes(
        lists
            .into_iter()
            .flat_map(Result::unwrap_or_default)
            .map(|p| RawProcess {
                pid: p.pid,
                memory_bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => b,
                    UsedGpuMemory::Unavailable => 0,
                },
            }),
    )
}

/// One entry per pid, by pid: a process with both a compute and a graphics
/// context is listed by both calls, with the memory it holds on the device
/// in each, so the largest is kept rather than the sum.
fn merge_processes(listed: impl Iterator<Item = RawProcess>) -> Vec<RawProcess> {
    let mut by_pid: BTreeMap<u32, u64> = BTreeMap::new();
    for p in listed {
        let memory = by_pid.entry(p.pid).or_default();
        *memory = (*memory).max(p.memory_bytes);
    }
    by_pid
        .into_iter()
        .map(|(pid, memory_bytes)| RawProcess { pid, memory_bytes })
        .collect()
}

fn read_sm_samples(device: &Device<'_>, cursor: u64) -> Vec<(u32, u64, f64)> {
    // NOT_FOUND means no sample since the cursor; other errors mean the
    // device has no per-process utilization. Either way: none.
    device
        .process_utilization_stats(cursor)
        .unwrap_or_default()
        .into_iter()
        .map(|s| (s.pid, s.timestamp, f64::from(s.sm_util.min(100)) / 100.0))
        .collect()
}

fn read_instances(
    nvml: &'static Nvml,
    parent: &Device<'static>,
    gpm: &mut GpmSamples,
) -> Vec<RawInstance> {
    let has_gpm = match gpm.supported {
        Some(known) => known,
        None => match parent.gpm_support() {
            Ok(answer) => *gpm.supported.insert(answer),
            // Not cached: a GPU that cannot answer now (lost) is asked again.
            Err(_) => false,
        },
    };
    if !has_gpm {
        gpm.last.clear();
    }
    let total_slices = parent
        .attributes()
        .ok()
        .map(|a| a.gpu_instance_slice_count)
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_COMPUTE_SLICES);
    let max = parent.mig_device_count().unwrap_or(0);
    let mut out: Vec<RawInstance> = Vec::new();
    // Per instance: its GPU instance and (compute, GPU instance) slices.
    let mut slices_of: Vec<(u32, Option<(u32, u32)>)> = Vec::new();
    for i in 0..max {
        // Unpopulated indices answer NOT_FOUND: skip them.
        let Ok(mig) = parent.mig_device_by_index(i) else {
            continue;
        };
        let (gi, ci) = mig_ids(nvml, &mig).unwrap_or((i, 0));
        let attrs = mig.attributes().ok();
        // Real NVML names a MIG device "<model> MIG <profile>".
        let profile = mig
            .name()
            .ok()
            .and_then(|n| n.rsplit_once(" MIG ").map(|(_, p)| p.to_owned()))
            .or_else(|| {
                attrs.as_ref().map(|a| {
                    format!(
                        "{}g.{}gb",
                        a.compute_instance_slice_count,
                        (a.memory_size_mb as f64 / 1024.0).round()
                    )
                })
            });
        let slices = attrs
            .as_ref()
            .map(|a| a.gpu_instance_slice_count)
            .unwrap_or(0);
        slices_of.push((
            gi,
            attrs
                .as_ref()
                .map(|a| (a.compute_instance_slice_count, a.gpu_instance_slice_count)),
        ));
        let memory = mig.memory_info().ok();
        out.push(RawInstance {
            gi,
            ci,
            uuid: mig.uuid().unwrap_or_default(),
            profile,
            slice_fraction: f64::from(slices) / f64::from(total_slices),
            memory_used: memory.as_ref().map(|m| m.used).unwrap_or(0),
            memory_total: memory.as_ref().map(|m| m.total).unwrap_or(0),
            processes: read_processes(&mig),
            sm_activity: None,
        });
    }
    if has_gpm {
        // GPM measures a GPU instance, not its compute instances: one
        // sample per GPU instance per cycle (a second one microseconds
        // later would measure nothing and replace the sample the next cycle
        // compares against), shared among its compute instances.
        let mut activity: HashMap<u32, Option<f64>> = HashMap::new();
        for (inst, share) in out.iter_mut().zip(compute_shares(&slices_of)) {
            let gi_activity = *activity
                .entry(inst.gi)
                .or_insert_with(|| mig_activity(nvml, parent, inst.gi, gpm));
            inst.sm_activity = gi_activity.map(|a| a * share);
        }
    }
    // Instances destroyed since: their samples go.
    gpm.last.retain(|gi, _| out.iter().any(|i| i.gi == *gi));
    out
}

/// Each MIG device's share of its GPU instance, from `(gi, (compute
/// instance slices, GPU instance slices))`: its compute slices over the GPU
/// instance's, or an even split among the GPU instance's compute instances
/// where the slices are unknown. One compute instance spanning its GPU
/// instance (the usual layout) has all of it.
fn compute_shares(instances: &[(u32, Option<(u32, u32)>)]) -> Vec<f64> {
    instances
        .iter()
        .map(|&(gi, slices)| match slices {
            Some((ci, of)) if ci > 0 && of > 0 => (f64::from(ci) / f64::from(of)).min(1.0),
            _ => 1.0 / instances.iter().filter(|(g, _)| *g == gi).count() as f64,
        })
        .collect()
}

/// SM activity of GPU instance `gi` since the previous cycle's sample, and
/// a new sample kept for the next cycle. A failed sample forgets the old
/// one, so no activity spans a gap.
fn mig_activity(
    nvml: &'static Nvml,
    parent: &Device<'static>,
    gi: u32,
    gpm: &mut GpmSamples,
) -> Option<f64> {
    let Ok(now) = parent.gpm_mig_sample(gi) else {
        gpm.last.remove(&gi);
        return None;
    };
    let before = gpm.last.insert(gi, now)?;
    let metrics = gpm_metrics_get(nvml, &before, &gpm.last[&gi], &[GpmMetricId::SmUtil]).ok()?;
    let sm_util = metrics.into_iter().next()?.ok()?.value;
    Some((sm_util / 100.0).clamp(0.0, 1.0))
}

/// Volatile ECC counts; `None` on GPUs without ECC (or with it off).
fn read_ecc(device: &Device<'_>) -> Option<EccErrors> {
    let count = |t| device.total_ecc_errors(t, EccCounter::Volatile).ok();
    Some(EccErrors {
        corrected: count(MemoryError::Corrected)?,
        uncorrected: count(MemoryError::Uncorrected)?,
    })
}

/// Row remapping state; `None` before Ampere and on GPUs without HBM.
///
/// nvml-wrapper 0.13 has no safe wrapper for `nvmlDeviceGetRemappedRows`,
/// so it goes through the raw symbol table, like [`mig_ids`].
#[allow(unsafe_code)]
fn remapped_rows(nvml: &Nvml, device: &Device<'_>) -> Option<RemappedRows> {
    let f = nvml.lib().nvmlDeviceGetRemappedRows.as_ref().ok()?;
    let (mut corr, mut unc, mut pending, mut failed) = (0u32, 0u32, 0u32, 0u32);
    // SAFETY: `device` is a live handle from this NVML instance, and the
    // function writes one `unsigned int` through each valid pointer.
    let rc = unsafe {
        f(
            device.handle(),
            &mut corr,
            &mut unc,
            &mut pending,
            &mut failed,
        )
    };
    (rc == 0).then_some(RemappedRows {
        correctable: corr,
        uncorrectable: unc,
        pending: pending != 0,
        failed: failed != 0,
    })
}

/// GPU instance and compute instance ids of a MIG device handle.
///
/// nvml-wrapper 0.13 has no safe wrapper for these two calls, so they go
/// through its raw symbol table (as `nvmlDeviceGetRemappedRows` does).
#[allow(unsafe_code)]
fn mig_ids(nvml: &Nvml, mig: &Device<'_>) -> Option<(u32, u32)> {
    let lib = nvml.lib();
    let gi_fn = lib.nvmlDeviceGetGpuInstanceId.as_ref().ok()?;
    let ci_fn = lib.nvmlDeviceGetComputeInstanceId.as_ref().ok()?;
    let (mut gi, mut ci) = (0u32, 0u32);
    // SAFETY: `mig` is a live handle from this NVML instance, and both
    // functions write one `unsigned int` through a valid pointer.
    let ok = unsafe {
        let handle = mig.handle();
        gi_fn(handle, &mut gi) == 0 && ci_fn(handle, &mut ci) == 0
    };
    ok.then_some((gi, ci))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: u32, memory_bytes: u64) -> RawProcess {
        RawProcess { pid, memory_bytes }
    }

    #[test]
    fn compute_instances_share_their_gpu_instance() {
        // GI 1: one CI spanning it; GI 2: 1 + 2 of its 3 slices; GI 3:
        // slices unknown, two CIs.
        let shares = compute_shares(&[
            (1, Some((3, 3))),
            (2, Some((1, 3))),
            (2, Some((2, 3))),
            (3, None),
            (3, None),
        ]);
        let expected = [1.0, 1.0 / 3.0, 2.0 / 3.0, 0.5, 0.5];
        assert_eq!(shares.len(), expected.len());
        for (s, e) in shares.iter().zip(expected) {
            assert!((s - e).abs() < 1e-12, "{shares:?}");
        }
    }

    #[test]
    fn health_is_read_on_the_first_cycle_then_every_few() {
        let mut h = SlowHealth::default();
        let due: Vec<bool> = (0..2 * HEALTH_EVERY).map(|_| h.due()).collect();
        let expected: Vec<bool> = (0..2 * HEALTH_EVERY)
            .map(|c| c % HEALTH_EVERY == 0)
            .collect();
        assert_eq!(due, expected);
    }

    #[test]
    fn a_pid_listed_by_several_calls_is_counted_once() {
        let merged = merge_processes([p(7, 100), p(3, 10), p(7, 300), p(9, 0)].into_iter());
        assert_eq!(merged, [p(3, 10), p(7, 300), p(9, 0)]);
    }
}
