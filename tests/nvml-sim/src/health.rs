//! Health signals a GPU reports about itself (`health/<index>.toml`): ECC
//! error counts and row remapping. Throttle reasons stay with the clocks in
//! `ffi`. Same conventions as `ffi`.

use std::ffi::{c_uint, c_ulonglong};

use crate::{
    ffi::{Device, Ret, put, with_view},
    scenario::Arch,
    sim::code,
};

/// `errorType` 0 corrected, 1 uncorrected; `counterType` 0 volatile, 1
/// aggregate (the same counts here: the simulated driver never reloads).
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: Device,
    error_type: c_uint,
    counter_type: c_uint,
    count: *mut c_ulonglong,
) -> Ret {
    with_view(device, |_, v| {
        let h = &v.physical()?.health;
        let n = match (error_type, counter_type) {
            (0, 0 | 1) => h.ecc_corrected,
            (1, 0 | 1) => h.ecc_uncorrected,
            _ => return Err(code::INVALID_ARGUMENT),
        };
        // SAFETY: NVML contract (module docs).
        unsafe { put(count, n) }
    })
}

/// Row remapping (Ampere and later, HBM GPUs); NOT_SUPPORTED on others.
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlDeviceGetRemappedRows(
    device: Device,
    corr_rows: *mut c_uint,
    unc_rows: *mut c_uint,
    is_pending: *mut c_uint,
    failure_occurred: *mut c_uint,
) -> Ret {
    with_view(device, |_, v| {
        let v = v.physical()?;
        if !matches!(
            v.gpu.arch,
            Some(Arch::Ampere | Arch::Hopper | Arch::Blackwell)
        ) {
            return Err(code::NOT_SUPPORTED);
        }
        let h = &v.health;
        // SAFETY: NVML contract (module docs).
        unsafe {
            put(corr_rows, h.remapped_correctable)?;
            put(unc_rows, h.remapped_uncorrectable)?;
            put(is_pending, c_uint::from(h.remap_pending))?;
            put(failure_occurred, c_uint::from(h.remap_failed))
        }
    })
}
