//! GPM (GPU Performance Monitoring): per-GPU and per-MIG-instance SM
//! activity between two samples, on Hopper and later, as NVML gives it
//! without DCGM. Older architectures say `isSupportedDevice = 0` and
//! refuse samples with `NOT_SUPPORTED`.
//!
//! A sample records the activity (Σ registered `sm`, capped at 1) of its
//! GPU or instance at the time it is taken; a metric between two samples
//! is the mean of the two (the simulator has no counters in between, and
//! registrations are steps, so this is exact while they hold still).

use std::{
    ffi::{CStr, c_char, c_uint},
    ptr,
};

use crate::{
    ffi::{Device, Ret, guard, put, raw, with_handle, with_sim, with_view},
    scenario::Arch,
    sim::{Handle, Sim, View, code, instance_util},
};

/// What one filled sample saw.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Record {
    gpu: u32,
    /// GPU instance id for a MIG sample.
    gpu_instance: Option<u32>,
    /// SM activity 0..=1.
    activity: f64,
}

/// `nvmlGpmSupport_t`.
#[repr(C)]
pub(crate) struct GpmSupport {
    version: c_uint,
    is_supported_device: c_uint,
}

/// `nvmlGpmMetric_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct GpmMetric {
    metric_id: c_uint,
    nvml_return: c_uint,
    value: f64,
    short_name: *const c_char,
    long_name: *const c_char,
    unit: *const c_char,
}

/// `nvmlGpmMetricsGet_t`.
#[repr(C)]
pub(crate) struct GpmMetricsGet {
    version: c_uint,
    num_metrics: c_uint,
    sample1: Sample,
    sample2: Sample,
    metrics: [GpmMetric; METRIC_MAX],
}

type Sample = *mut std::ffi::c_void;

const _: () = {
    assert!(size_of::<GpmSupport>() == 8);
    assert!(size_of::<GpmMetric>() == 40);
    assert!(size_of::<GpmMetricsGet>() == 24 + 40 * METRIC_MAX);
};

/// `NVML_GPM_METRIC_MAX`: entries of `nvmlGpmMetricsGet_t.metrics`.
const METRIC_MAX: usize = 210;
/// `NVML_GPM_SUPPORT_VERSION`, `NVML_GPM_METRICS_GET_VERSION`.
const SUPPORT_VERSION: c_uint = 1;
const METRICS_GET_VERSION: c_uint = 1;
/// `NVML_GPM_METRIC_GRAPHICS_UTIL`, `_SM_UTIL`, `_SM_OCCUPANCY`: the
/// activity metrics answered, in percent.
const GRAPHICS_UTIL: c_uint = 1;
const SM_UTIL: c_uint = 2;
const SM_OCCUPANCY: c_uint = 3;
/// Sample handles are this plus a small id, never dereferenced.
const SAMPLE_BASE: usize = 0x6B10_0000;

fn supported(view: &View) -> bool {
    matches!(view.gpu.arch, Some(Arch::Hopper | Arch::Blackwell))
}

fn sample_id(sample: Sample) -> Result<usize, Code> {
    (sample as usize)
        .checked_sub(SAMPLE_BASE)
        .filter(|&id| id > 0)
        .ok_or(code::INVALID_ARGUMENT)
}

type Code = crate::sim::Code;

impl Sim {
    fn gpm_fill(&mut self, sample: Sample, record: Record) -> Result<(), Code> {
        let slot = self
            .gpm_samples
            .get_mut(&sample_id(sample)?)
            .ok_or(code::INVALID_ARGUMENT)?;
        *slot = Some(record);
        Ok(())
    }

    fn gpm_record(&self, sample: Sample) -> Result<Record, Code> {
        self.gpm_samples
            .get(&sample_id(sample)?)
            .copied()
            .flatten()
            .ok_or(code::INVALID_ARGUMENT)
    }
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlGpmQueryDeviceSupport(
    device: Device,
    support: *mut GpmSupport,
) -> Ret {
    with_view(device, |_, v| {
        if support.is_null() {
            return Err(code::INVALID_ARGUMENT);
        }
        // SAFETY: non-null; NVML contract (ffi module docs).
        let version = unsafe { (*support).version };
        if version != SUPPORT_VERSION {
            return Err(code::ARGUMENT_VERSION_MISMATCH);
        }
        let is = u32::from(!v.is_mig_handle() && supported(v));
        // SAFETY: as above.
        unsafe { (*support).is_supported_device = is };
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlGpmSampleAlloc(sample: *mut Sample) -> Ret {
    with_sim(|sim| {
        if sample.is_null() {
            return Err(code::INVALID_ARGUMENT);
        }
        sim.next_gpm += 1;
        let id = sim.next_gpm;
        sim.gpm_samples.insert(id, None);
        // SAFETY: NVML contract (ffi module docs).
        unsafe { put(sample, ptr::without_provenance_mut(SAMPLE_BASE + id)) }
    })
}

/// nvml-wrapper's `Drop for GpmSample` calls this unconditionally.
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlGpmSampleFree(sample: Sample) -> Ret {
    with_sim(|sim| {
        sim.gpm_samples
            .remove(&sample_id(sample)?)
            .map(|_| ())
            .ok_or(code::INVALID_ARGUMENT)
    })
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlGpmSampleGet(device: Device, sample: Sample) -> Ret {
    with_view(device, |sim, v| {
        if v.is_mig_handle() || !supported(v) {
            return Err(code::NOT_SUPPORTED);
        }
        let record = Record {
            gpu: v.gpu.index,
            gpu_instance: None,
            activity: v.gpu_util,
        };
        sim.gpm_fill(sample, record)
    })
}

/// A sample of GPU instance `gpu_instance_id` of the MIG-mode GPU `device`.
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlGpmMigSampleGet(
    device: Device,
    gpu_instance_id: c_uint,
    sample: Sample,
) -> Ret {
    with_view(device, |sim, v| {
        if v.is_mig_handle() || !supported(v) {
            return Err(code::NOT_SUPPORTED);
        }
        let inst = v
            .gpu
            .mig
            .iter()
            .flatten()
            .find(|m| m.gpu_instance_id == gpu_instance_id)
            .ok_or(code::INVALID_ARGUMENT)?;
        let record = Record {
            gpu: v.gpu.index,
            gpu_instance: Some(gpu_instance_id),
            activity: instance_util(&v.procs, inst.index),
        };
        sim.gpm_fill(sample, record)
    })
}

/// Activity metrics between two samples of the same GPU or instance, in
/// percent; other metrics answer `NOT_SUPPORTED` in their own entry.
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlGpmMetricsGet(request: *mut GpmMetricsGet) -> Ret {
    guard(|| {
        if request.is_null() {
            return Err(code::INVALID_ARGUMENT);
        }
        // SAFETY: non-null; NVML contract (ffi module docs).
        let req = unsafe { &mut *request };
        if req.version != METRICS_GET_VERSION {
            return Err(code::ARGUMENT_VERSION_MISMATCH);
        }
        let n = req.num_metrics as usize;
        if n > METRIC_MAX {
            return Err(code::INVALID_ARGUMENT);
        }
        let (a, b) = {
            let mut driver = crate::sim::driver();
            let sim = driver.sim()?;
            (sim.gpm_record(req.sample1)?, sim.gpm_record(req.sample2)?)
        };
        if (a.gpu, a.gpu_instance) != (b.gpu, b.gpu_instance) {
            return Err(code::INVALID_ARGUMENT);
        }
        // Lost (and hung) GPUs answer as their other queries do.
        let lost = with_handle(raw(Handle::Gpu(a.gpu)), |sim, h| sim.lost_as_read(h.gpu()));
        if lost != code::SUCCESS {
            return Err(lost);
        }
        let percent = 100.0 * (a.activity + b.activity) / 2.0;
        for m in &mut req.metrics[..n] {
            let name: &'static CStr = match m.metric_id {
                GRAPHICS_UTIL => c"graphics_util",
                SM_UTIL => c"sm_util",
                SM_OCCUPANCY => c"sm_occupancy",
                _ => {
                    m.nvml_return = code::NOT_SUPPORTED;
                    continue;
                }
            };
            m.nvml_return = code::SUCCESS;
            m.value = percent;
            m.short_name = name.as_ptr().cast();
            m.long_name = name.as_ptr().cast();
            m.unit = c"%".as_ptr();
        }
        Ok(())
    })
}
