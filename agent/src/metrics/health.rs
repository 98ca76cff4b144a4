//! The GPU health signals SREs page on beside XIDs: ECC error counts,
//! remapped and pending rows, clock throttle reasons (physical GPUs, where
//! NVML has them).

use nvml_wrapper::bitmasks::device::ThrottleReasons;

use super::{counter, gauge, id, text::Sink, with};
use crate::snapshot::Snapshot;

/// NVML's clock throttle-reason bits and their `reason` label values: a
/// bounded set, one series each per GPU.
pub(super) const THROTTLE_REASONS: [(&str, u64); 9] = [
    ("gpu_idle", ThrottleReasons::GPU_IDLE.bits()),
    (
        "applications_clocks",
        ThrottleReasons::APPLICATIONS_CLOCKS_SETTING.bits(),
    ),
    ("sw_power_cap", ThrottleReasons::SW_POWER_CAP.bits()),
    ("hw_slowdown", ThrottleReasons::HW_SLOWDOWN.bits()),
    ("sync_boost", ThrottleReasons::SYNC_BOOST.bits()),
    ("sw_thermal", ThrottleReasons::SW_THERMAL_SLOWDOWN.bits()),
    ("hw_thermal", ThrottleReasons::HW_THERMAL_SLOWDOWN.bits()),
    (
        "hw_power_brake",
        ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN.bits(),
    ),
    (
        "display_clock",
        ThrottleReasons::DISPLAY_CLOCK_SETTING.bits(),
    ),
];

fn flag(b: bool) -> f64 {
    f64::from(u8::from(b))
}

pub(super) fn encode(snap: &Snapshot, e: &mut impl Sink) -> std::fmt::Result {
    let gpus = &snap.gpus;
    counter(
        "tally_gpu_ecc_errors",
        "ECC errors the GPU counted since its driver loaded (NVML's volatile counters): \
         type=corrected (single-bit, fixed by ECC) or uncorrected (double-bit, data lost).",
        None,
    )
    .encode(
        e,
        gpus.iter().flat_map(|g| {
            g.ecc_errors.into_iter().flat_map(|c| {
                [
                    (with(g, "type", "corrected"), c.corrected as f64),
                    (with(g, "type", "uncorrected"), c.uncorrected as f64),
                ]
            })
        }),
    )?;
    gauge(
        "tally_gpu_remapped_rows",
        "Memory rows the GPU remapped to spare rows, by the kind of error that caused it \
         (Ampere and later).",
        None,
    )
    .encode(
        e,
        gpus.iter().flat_map(|g| {
            g.remapped_rows.into_iter().flat_map(|r| {
                [
                    (with(g, "cause", "correctable"), f64::from(r.correctable)),
                    (
                        with(g, "cause", "uncorrectable"),
                        f64::from(r.uncorrectable),
                    ),
                ]
            })
        }),
    )?;
    gauge(
        "tally_gpu_row_remap_pending",
        "1 while a row remap waits for a GPU reset to take effect.",
        None,
    )
    .encode(
        e,
        gpus.iter()
            .filter_map(|g| Some((id(g), flag(g.remapped_rows?.pending)))),
    )?;
    gauge(
        "tally_gpu_row_remap_failed",
        "1 when a row remap failed: the GPU's memory can no longer be repaired.",
        None,
    )
    .encode(
        e,
        gpus.iter()
            .filter_map(|g| Some((id(g), flag(g.remapped_rows?.failed)))),
    )?;
    gauge(
        "tally_gpu_throttle_reasons",
        "1 for each reason NVML gives for the GPU's clocks being held down now (hw_slowdown, \
         hw_thermal, hw_power_brake: the hardware protecting itself).",
        None,
    )
    .encode(
        e,
        gpus.iter().flat_map(|g| {
            g.throttle_reasons.into_iter().flat_map(move |bits| {
                THROTTLE_REASONS
                    .iter()
                    .map(move |(name, bit)| (with(g, "reason", name), flag(bits & bit != 0)))
            })
        }),
    )
}
