//! NVML's C API over [`crate::sim`]. Every export runs inside
//! `catch_unwind`, so no panic crosses into the caller; pointers are
//! null-checked and written only with NVML's documented layouts (nvml.h,
//! x86_64).
//!
//! Each export is `unsafe` because its caller promises what nvml.h says:
//! non-null pointers point to writable objects of the documented type, and
//! buffers hold `*count` elements. That contract is NVML's and is not
//! restated on every function.
#![allow(non_snake_case, clippy::missing_safety_doc)]

use std::{
    ffi::{CStr, c_char, c_int, c_uint, c_ulonglong, c_void},
    panic::{AssertUnwindSafe, catch_unwind},
    ptr,
    thread::sleep,
    time::{Duration, Instant},
};

use crate::{
    sim::{self, Code, Handle, NO_INSTANCE, Sim, View, code, driver, event},
    state::{ProcKind, THROTTLE_GPU_IDLE},
};

pub(crate) type Ret = c_uint;
pub(crate) type Device = *mut c_void;
type EventSet = *mut c_void;

/// `nvmlProcessInfo_t` as filled by the `_v2`/`_v3` calls.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// `nvmlProcessInfo_v1_t`, filled by the unversioned call.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct ProcessInfoV1 {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct ProcessUtilizationSample {
    pid: c_uint,
    time_stamp: c_ulonglong,
    sm_util: c_uint,
    mem_util: c_uint,
    enc_util: c_uint,
    dec_util: c_uint,
}

#[repr(C)]
pub(crate) struct Memory {
    total: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

#[repr(C)]
pub(crate) struct MemoryV2 {
    version: c_uint,
    total: c_ulonglong,
    reserved: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

/// `NVML_STRUCT_VERSION(Memory, 2)`.
const MEMORY_V2_VERSION: c_uint = (size_of::<MemoryV2>() | (2 << 24)) as c_uint;

#[repr(C)]
pub(crate) struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

#[repr(C)]
pub(crate) struct EventData {
    device: Device,
    event_type: c_ulonglong,
    event_data: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// `nvmlEventData_t` before the instance ids were added (`nvmlEventSetWait`).
#[repr(C)]
pub(crate) struct EventDataV1 {
    device: Device,
    event_type: c_ulonglong,
    event_data: c_ulonglong,
}

#[repr(C)]
pub(crate) struct DeviceAttributes {
    multiprocessor_count: c_uint,
    shared_copy_engine_count: c_uint,
    shared_decoder_count: c_uint,
    shared_encoder_count: c_uint,
    shared_jpeg_count: c_uint,
    shared_ofa_count: c_uint,
    gpu_instance_slice_count: c_uint,
    compute_instance_slice_count: c_uint,
    memory_size_mb: c_ulonglong,
}

#[repr(C)]
pub(crate) struct PciInfo {
    bus_id_legacy: [c_char; 16],
    domain: c_uint,
    bus: c_uint,
    device: c_uint,
    pci_device_id: c_uint,
    pci_sub_system_id: c_uint,
    bus_id: [c_char; 32],
}

const _: () = {
    assert!(size_of::<ProcessInfo>() == 24);
    assert!(size_of::<ProcessInfoV1>() == 16);
    assert!(size_of::<ProcessUtilizationSample>() == 32);
    assert!(size_of::<Memory>() == 24);
    assert!(size_of::<MemoryV2>() == 40);
    assert!(size_of::<Utilization>() == 8);
    assert!(size_of::<EventData>() == 32);
    assert!(size_of::<EventDataV1>() == 24);
    assert!(size_of::<DeviceAttributes>() == 40);
    assert!(size_of::<PciInfo>() == 68);
};

const MIB: u64 = 1024 * 1024;
const DRIVER_VERSION: &str = "550.54.15";
const NVML_VERSION: &str = "12.550.54.15";
const CUDA_DRIVER_VERSION: c_int = 12040;
/// Event set handles are this plus a small id.
const EVENT_SET_BASE: usize = 0xE5E7_0000;

/// Runs `f` with panics turned into NVML_ERROR_UNKNOWN.
pub(crate) fn guard(f: impl FnOnce() -> Result<(), Code>) -> Ret {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => code::SUCCESS,
        Ok(Err(c)) => c,
        Err(_) => code::UNKNOWN,
    }
}

/// Runs `f` on the initialized simulator.
pub(crate) fn with_sim(f: impl FnOnce(&mut Sim) -> Result<(), Code>) -> Ret {
    guard(|| f(driver().sim()?))
}

/// Runs `f` on a fresh reading of `device` (GPU_IS_LOST for a lost GPU),
/// after the `hang/<index>` fault of its GPU, if any, is lifted.
pub(crate) fn with_view(
    device: Device,
    f: impl FnOnce(&mut Sim, &View) -> Result<(), Code>,
) -> Ret {
    with_handle(device, |sim, h| {
        let view = sim.observe(h)?;
        f(sim, &view)
    })
}

/// How often a hung query looks whether `hang/<index>` is gone.
const HANG_POLL: Duration = Duration::from_millis(20);

/// Runs `f` on the handle behind `device`, after the `hang/<index>` fault of
/// its GPU, if any, is lifted. The state directory is refreshed once per
/// pass, so `f` reads it as of the same instant the hang was checked.
///
/// While the marker exists the calling thread sleeps between passes —
/// without the driver lock, so queries of other GPUs (and `nvmlShutdown`)
/// still run, as when a driver call is stuck on one device.
pub(crate) fn with_handle(
    device: Device,
    f: impl FnOnce(&mut Sim, Handle) -> Result<(), Code>,
) -> Ret {
    guard(|| {
        loop {
            {
                let mut driver = driver();
                let sim = driver.sim()?;
                let h = sim.resolve(device as usize)?;
                sim.refresh();
                if !sim.hung(h.gpu()) {
                    return f(sim, h);
                }
            }
            sleep(HANG_POLL);
        }
    })
}

/// Writes `v` to an out-pointer.
///
/// # Safety
/// `p` is null or valid for writing a `T`.
pub(crate) unsafe fn put<T>(p: *mut T, v: T) -> Result<(), Code> {
    if p.is_null() {
        return Err(code::INVALID_ARGUMENT);
    }
    // SAFETY: non-null, and valid for writes per this function's contract.
    unsafe { p.write(v) };
    Ok(())
}

/// Copies `s` and a NUL into `buf` of `len` bytes.
///
/// # Safety
/// `buf` is null or valid for writing `len` bytes.
unsafe fn put_str(buf: *mut c_char, len: c_uint, s: &str) -> Result<(), Code> {
    if buf.is_null() {
        return Err(code::INVALID_ARGUMENT);
    }
    if (len as usize) < s.len() + 1 {
        return Err(code::INSUFFICIENT_SIZE);
    }
    // SAFETY: `buf` holds at least `s.len() + 1` bytes (checked above) and
    // cannot overlap the Rust string.
    unsafe {
        ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), buf, s.len());
        buf.add(s.len()).write(0);
    }
    Ok(())
}

/// NVML's count protocol: with a NULL buffer or `*count` below the number of
/// items, sets `*count` and returns INSUFFICIENT_SIZE; else copies the items
/// and sets `*count` to how many. Zero items always succeed.
///
/// # Safety
/// `count` is null or valid for reads and writes; `buf` is null or valid for
/// writing `*count` elements.
unsafe fn put_slice<T: Copy>(buf: *mut T, count: *mut c_uint, items: &[T]) -> Result<(), Code> {
    if count.is_null() {
        return Err(code::INVALID_ARGUMENT);
    }
    let n = items.len() as c_uint;
    // SAFETY: `count` is non-null and valid per the contract.
    let room = unsafe { count.read() };
    if n > 0 && (buf.is_null() || room < n) {
        // SAFETY: as above.
        unsafe { count.write(n) };
        return Err(code::INSUFFICIENT_SIZE);
    }
    // SAFETY: `buf` has room for `room >= n` elements (or n == 0); `count` as above.
    unsafe {
        if n > 0 {
            ptr::copy_nonoverlapping(items.as_ptr(), buf, items.len());
        }
        count.write(n);
    }
    Ok(())
}

/// Handle → C pointer value.
pub(crate) fn raw(h: Handle) -> Device {
    ptr::without_provenance_mut(h.to_raw())
}

/// Exports that answer exactly as another export does: the older or newer
/// versions of one call, whose arguments have the same layout.
macro_rules! aliases {
    ($($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),*) = $target:ident;)*) => {$(
        $(#[$m])*
        #[unsafe(no_mangle)]
        pub(crate) unsafe extern "C" fn $name($($arg: $ty),*) -> Ret {
            // SAFETY: the same NVML contract as the target's (module docs).
            unsafe { $target($($arg),*) }
        }
    )*};
}

/// Exports of the shape `(device, args…, out) -> Ret` that write one value,
/// computed from a fresh reading of `device` (see [`with_view`]), to `out`.
/// Parameter names are no part of the C ABI, so `out` stands for nvml.h's.
macro_rules! device_getters {
    ($(
        $(#[$m:meta])*
        fn $name:ident($($arg:ident: $ty:ty),*) -> $t:ty = |$v:ident| $value:expr;
    )*) => {$(
        $(#[$m])*
        #[unsafe(no_mangle)]
        pub(crate) unsafe extern "C" fn $name(device: Device, $($arg: $ty,)* out: *mut $t) -> Ret {
            with_view(device, |_, $v| {
                let value: $t = $value;
                // SAFETY: NVML contract (module docs).
                unsafe { put(out, value) }
            })
        }
    )*};
}

// ----------------------------------------------------------------------------
// Init, shutdown, system
// ----------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlInit_v2() -> Ret {
    guard(|| driver().init())
}

aliases! {
    fn nvmlInit() = nvmlInit_v2;
}

/// Flags (NO_GPUS, NO_ATTACH) change nothing: a scenario may have no GPUs.
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> Ret {
    guard(|| driver().init())
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlShutdown() -> Ret {
    guard(|| driver().shutdown())
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlErrorString(result: Ret) -> *const c_char {
    let s: &'static CStr = match result {
        code::SUCCESS => c"Success",
        code::UNINITIALIZED => c"Uninitialized",
        code::INVALID_ARGUMENT => c"Invalid Argument",
        code::NOT_SUPPORTED => c"Not Supported",
        4 => c"Insufficient Permissions",
        5 => c"Already Initialized",
        code::NOT_FOUND => c"Not Found",
        code::INSUFFICIENT_SIZE => c"Insufficient Size",
        8 => c"Insufficient External Power",
        code::DRIVER_NOT_LOADED => c"Driver Not Loaded",
        code::TIMEOUT => c"Timeout",
        code::GPU_IS_LOST => c"GPU is lost",
        code::ARGUMENT_VERSION_MISMATCH => c"Argument version mismatch",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> Ret {
    // SAFETY: NVML contract (module docs).
    with_sim(|_| unsafe { put_str(version, length, DRIVER_VERSION) })
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlSystemGetNVMLVersion(
    version: *mut c_char,
    length: c_uint,
) -> Ret {
    // SAFETY: NVML contract (module docs).
    with_sim(|_| unsafe { put_str(version, length, NVML_VERSION) })
}

aliases! {
    fn nvmlSystemGetCudaDriverVersion(v: *mut c_int) = nvmlSystemGetCudaDriverVersion_v2;
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(v: *mut c_int) -> Ret {
    // SAFETY: NVML contract (module docs).
    with_sim(|_| unsafe { put(v, CUDA_DRIVER_VERSION) })
}

/// The process's executable path (first word of `/proc/<pid>/cmdline`, else `comm`).
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlSystemGetProcessName(
    pid: c_uint,
    name: *mut c_char,
    length: c_uint,
) -> Ret {
    with_sim(|_| {
        let proc = std::path::Path::new("/proc").join(pid.to_string());
        let cmd = std::fs::read(proc.join("cmdline")).unwrap_or_default();
        let first = cmd.split(|b| *b == 0).next().unwrap_or_default();
        let s = if first.is_empty() {
            std::fs::read_to_string(proc.join("comm"))
                .map_err(|_| code::NOT_FOUND)?
                .trim_end()
                .to_owned()
        } else {
            String::from_utf8_lossy(first).into_owned()
        };
        // SAFETY: NVML contract (module docs).
        unsafe { put_str(name, length, &s) }
    })
}

// ----------------------------------------------------------------------------
// Handles and identity
// ----------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> Ret {
    // SAFETY: NVML contract (module docs).
    with_sim(|sim| unsafe { put(count, sim.gpu_count()) })
}

aliases! {
    fn nvmlDeviceGetCount(count: *mut c_uint) = nvmlDeviceGetCount_v2;
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut Device,
) -> Ret {
    with_sim(|sim| {
        let h = sim.handle_by_index(index)?;
        // SAFETY: NVML contract (module docs).
        unsafe { put(device, raw(h)) }
    })
}

aliases! {
    fn nvmlDeviceGetHandleByIndex(index: c_uint, device: *mut Device) =
        nvmlDeviceGetHandleByIndex_v2;
}

/// Accepts `GPU-…` and `MIG-…` UUIDs.
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut Device,
) -> Ret {
    with_sim(|sim| {
        if uuid.is_null() {
            return Err(code::INVALID_ARGUMENT);
        }
        // SAFETY: NVML contract: `uuid` is a NUL-terminated string.
        let uuid = unsafe { CStr::from_ptr(uuid) };
        let uuid = uuid.to_str().map_err(|_| code::INVALID_ARGUMENT)?;
        let h = sim.handle_by_uuid(uuid)?;
        // SAFETY: NVML contract (module docs).
        unsafe { put(device, raw(h)) }
    })
}

device_getters! {
    /// On a MIG handle: the parent GPU's index.
    fn nvmlDeviceGetIndex() -> c_uint = |v| v.gpu.index;
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlDeviceGetUUID(
    device: Device,
    uuid: *mut c_char,
    length: c_uint,
) -> Ret {
    with_view(device, |_, v| {
        let s = v.mig.as_ref().map_or(&v.gpu.uuid, |m| &m.uuid);
        // SAFETY: NVML contract (module docs).
        unsafe { put_str(uuid, length, s) }
    })
}

/// On a MIG handle: `<model> MIG <profile>`, as the driver names them.
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlDeviceGetName(
    device: Device,
    name: *mut c_char,
    length: c_uint,
) -> Ret {
    with_view(device, |_, v| {
        let s = match &v.mig {
            None => v.gpu.model.clone(),
            Some(m) => format!("{} MIG {}", v.gpu.model, m.profile),
        };
        // SAFETY: NVML contract (module docs).
        unsafe { put_str(name, length, &s) }
    })
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlDeviceGetSerial(
    device: Device,
    serial: *mut c_char,
    length: c_uint,
) -> Ret {
    // SAFETY: NVML contract (module docs).
    with_view(device, |_, v| unsafe {
        put_str(serial, length, &v.gpu.serial)
    })
}

device_getters! {
    /// The parent GPU's PCI location, also for MIG handles.
    fn nvmlDeviceGetPciInfo_v3() -> PciInfo = |v| pci_info(v);

    fn nvmlDeviceGetArchitecture() -> c_uint = |v| v.gpu.arch.map_or(0xFFFF_FFFF, |a| a as c_uint);

    /// NVML_BRAND_NVIDIA (14) for Hopper and later, NVML_BRAND_TESLA (2) before.
    fn nvmlDeviceGetBrand() -> c_uint = |v| match v.gpu.arch {
        Some(crate::scenario::Arch::Hopper | crate::scenario::Arch::Blackwell) => 14,
        _ => 2,
    };
}

fn pci_info(v: &View) -> PciInfo {
    let bus = 0x18 + v.gpu.index * 3;
    let mut info = PciInfo {
        bus_id_legacy: [0; 16],
        domain: 0,
        bus,
        device: 0,
        pci_device_id: match v.gpu.arch {
            Some(crate::scenario::Arch::Hopper) => 0x2330_10DE,
            Some(crate::scenario::Arch::Ampere) => 0x20B2_10DE,
            _ => 0x1DB4_10DE,
        },
        pci_sub_system_id: 0x16C1_10DE,
        bus_id: [0; 32],
    };
    let legacy = format!("0000:{bus:02x}:00.0");
    let full = format!("00000000:{bus:02x}:00.0");
    for (dst, src) in info.bus_id_legacy.iter_mut().zip(legacy.bytes()) {
        *dst = src as c_char;
    }
    for (dst, src) in info.bus_id.iter_mut().zip(full.bytes()) {
        *dst = src as c_char;
    }
    info
}

// ----------------------------------------------------------------------------
// Memory, utilization, power, thermals, clocks, PCIe
// ----------------------------------------------------------------------------

device_getters! {
    /// Per instance on MIG handles.
    fn nvmlDeviceGetMemoryInfo() -> Memory = |v| Memory {
        total: v.mem_total_mib * MIB,
        free: (v.mem_total_mib - v.mem_used_mib) * MIB,
        used: v.mem_used_mib * MIB,
    };
}

/// `reserved` is 0: free = total − used.
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: Device,
    memory: *mut MemoryV2,
) -> Ret {
    with_view(device, |_, v| {
        if memory.is_null() {
            return Err(code::INVALID_ARGUMENT);
        }
        // SAFETY: non-null; NVML contract (module docs).
        let version = unsafe { (*memory).version };
        if version != MEMORY_V2_VERSION {
            return Err(code::ARGUMENT_VERSION_MISMATCH);
        }
        let m = MemoryV2 {
            version,
            total: v.mem_total_mib * MIB,
            reserved: 0,
            free: (v.mem_total_mib - v.mem_used_mib) * MIB,
            used: v.mem_used_mib * MIB,
        };
        // SAFETY: NVML contract (module docs).
        unsafe { put(memory, m) }
    })
}

device_getters! {
    /// NOT_SUPPORTED on MIG handles and on GPUs in MIG mode, as on real GPUs.
    fn nvmlDeviceGetUtilizationRates() -> Utilization = |v| {
        if v.is_mig_handle() || v.gpu.mig.is_some() {
            return Err(code::NOT_SUPPORTED);
        }
        Utilization {
            gpu: (v.gpu_util * 100.0).round() as c_uint,
            memory: (v.gpu_mem_util * 100.0).round() as c_uint,
        }
    };

    fn nvmlDeviceGetPowerUsage() -> c_uint = |v| v.physical()?.power_mw as c_uint;

    fn nvmlDeviceGetEnforcedPowerLimit() -> c_uint = |v| v.physical()?.gpu.power_max_mw as c_uint;

    /// Only NVML_TEMPERATURE_GPU (0).
    fn nvmlDeviceGetTemperature(sensor: c_uint) -> c_uint = |v| {
        if sensor != 0 {
            return Err(code::INVALID_ARGUMENT);
        }
        v.physical()?.temperature_c()
    };

    fn nvmlDeviceGetClockInfo(kind: c_uint) -> c_uint = |v| v
        .physical()?
        .clock_mhz(kind)
        .ok_or(code::INVALID_ARGUMENT)?;

    fn nvmlDeviceGetMaxClockInfo(kind: c_uint) -> c_uint = |v| v
        .physical()?
        .max_clock_mhz(kind)
        .ok_or(code::INVALID_ARGUMENT)?;

    /// Clock id 0 (current) is the current clock; the others the maximum.
    fn nvmlDeviceGetClock(kind: c_uint, id: c_uint) -> c_uint = |v| {
        let v = v.physical()?;
        let mhz = match id {
            0 => v.clock_mhz(kind),
            1..=3 => v.max_clock_mhz(kind),
            _ => None,
        };
        mhz.ok_or(code::INVALID_ARGUMENT)?
    };

    /// GpuIdle (0x1) at 0 % utilization, none otherwise.
    fn nvmlDeviceGetCurrentClocksThrottleReasons() -> c_ulonglong = |v| {
        let idle = if v.physical()?.gpu_util > 0.0 {
            0
        } else {
            THROTTLE_GPU_IDLE
        };
        idle | v.health_throttle
    };

    /// Counter 0 = TX, 1 = RX, KB/s, proportional to utilization.
    fn nvmlDeviceGetPcieThroughput(counter: c_uint) -> c_uint = |v| v
        .physical()?
        .pcie_kbps(counter)
        .ok_or(code::INVALID_ARGUMENT)?;

    fn nvmlDeviceGetPcieReplayCounter() -> c_uint = |v| {
        v.physical()?;
        0
    };

    fn nvmlDeviceGetCurrPcieLinkGeneration() -> c_uint = |v| pcie_gen(v.physical()?);

    fn nvmlDeviceGetMaxPcieLinkGeneration() -> c_uint = |v| pcie_gen(v.physical()?);

    fn nvmlDeviceGetCurrPcieLinkWidth() -> c_uint = |v| {
        v.physical()?;
        16
    };

    fn nvmlDeviceGetMaxPcieLinkWidth() -> c_uint = |v| {
        v.physical()?;
        16
    };
}

/// mJ since the state directory's first query of the GPU.
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: Device,
    energy: *mut c_ulonglong,
) -> Ret {
    with_view(device, |sim, v| {
        let v = v.physical()?;
        if !v.gpu.energy_counter {
            return Err(code::NOT_SUPPORTED);
        }
        let mj = sim.energy_mj(v.gpu.index, v.power_mw)?;
        // SAFETY: NVML contract (module docs).
        unsafe { put(energy, mj) }
    })
}

// Every simulated GPU runs at its maximum power limit.
aliases! {
    fn nvmlDeviceGetPowerManagementLimit(device: Device, limit: *mut c_uint) =
        nvmlDeviceGetEnforcedPowerLimit;

    fn nvmlDeviceGetPowerManagementDefaultLimit(device: Device, limit: *mut c_uint) =
        nvmlDeviceGetEnforcedPowerLimit;

    /// The newer name of the throttle reasons.
    fn nvmlDeviceGetCurrentClocksEventReasons(device: Device, reasons: *mut c_ulonglong) =
        nvmlDeviceGetCurrentClocksThrottleReasons;
}

fn pcie_gen(v: &View) -> c_uint {
    use crate::scenario::Arch;
    match v.gpu.arch {
        Some(Arch::Hopper | Arch::Blackwell) => 5,
        _ => 4,
    }
}

// ----------------------------------------------------------------------------
// Processes
// ----------------------------------------------------------------------------

/// The processes of `kind` on the handle: each kind is listed by its own
/// call, as NVML lists CUDA contexts, graphics contexts and MPS clients
/// separately.
fn process_infos(v: &View, kind: ProcKind) -> Vec<ProcessInfo> {
    v.procs
        .iter()
        .filter(|p| p.reg.kind == kind)
        .map(|p| ProcessInfo {
            pid: p.pid,
            used_gpu_memory: p.reg.memory_mib * MIB,
            gpu_instance_id: p.gpu_instance_id,
            compute_instance_id: p.compute_instance_id,
        })
        .collect()
}

/// A physical handle lists every process on the GPU (with its MIG
/// instance's ids, or 0xFFFFFFFF); a MIG handle the processes on that instance.
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: Device,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    // SAFETY: NVML contract (module docs).
    unsafe { list_processes(device, ProcKind::Compute, count, infos) }
}

/// [`put_slice`] of the processes of `kind` on `device`.
///
/// # Safety
/// As [`put_slice`] for `count` and `infos`.
unsafe fn list_processes(
    device: Device,
    kind: ProcKind,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    // SAFETY: this function's contract.
    with_view(device, |_, v| unsafe {
        put_slice(infos, count, &process_infos(v, kind))
    })
}

aliases! {
    fn nvmlDeviceGetComputeRunningProcesses_v2(
        device: Device,
        count: *mut c_uint,
        infos: *mut ProcessInfo
    ) = nvmlDeviceGetComputeRunningProcesses_v3;
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses(
    device: Device,
    count: *mut c_uint,
    infos: *mut ProcessInfoV1,
) -> Ret {
    with_view(device, |_, v| {
        let items: Vec<ProcessInfoV1> = process_infos(v, ProcKind::Compute)
            .into_iter()
            .map(|p| ProcessInfoV1 {
                pid: p.pid,
                used_gpu_memory: p.used_gpu_memory,
            })
            .collect();
        // SAFETY: NVML contract (module docs).
        unsafe { put_slice(infos, count, &items) }
    })
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(
    device: Device,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    // SAFETY: NVML contract (module docs).
    unsafe { list_processes(device, ProcKind::Graphics, count, infos) }
}

aliases! {
    fn nvmlDeviceGetGraphicsRunningProcesses_v2(
        device: Device,
        count: *mut c_uint,
        infos: *mut ProcessInfo
    ) = nvmlDeviceGetGraphicsRunningProcesses_v3;
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlDeviceGetMPSComputeRunningProcesses_v3(
    device: Device,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    // SAFETY: NVML contract (module docs).
    unsafe { list_processes(device, ProcKind::Mps, count, infos) }
}

/// One sample per registered process, newer than `last_seen`; NOT_FOUND when
/// there is none; NOT_SUPPORTED in MIG mode.
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: Device,
    samples: *mut ProcessUtilizationSample,
    count: *mut c_uint,
    last_seen: c_ulonglong,
) -> Ret {
    with_view(device, |sim, v| {
        if v.is_mig_handle() || v.gpu.mig.is_some() {
            return Err(code::NOT_SUPPORTED);
        }
        let items: Vec<ProcessUtilizationSample> = sim
            .samples(v, last_seen)
            .into_iter()
            .map(|s| ProcessUtilizationSample {
                pid: s.pid,
                time_stamp: s.time_stamp_us,
                sm_util: s.sm_pct,
                mem_util: s.mem_pct,
                enc_util: 0,
                dec_util: 0,
            })
            .collect();
        if items.is_empty() {
            return Err(code::NOT_FOUND);
        }
        // SAFETY: NVML contract (module docs).
        unsafe { put_slice(samples, count, &items) }
    })
}

// ----------------------------------------------------------------------------
// MIG
// ----------------------------------------------------------------------------

/// Every simulated GPU is MIG-capable; current = pending = whether the
/// scenario lists MIG instances.
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: Device,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> Ret {
    with_view(device, |_, v| {
        let on = c_uint::from(v.physical()?.gpu.mig.is_some());
        // SAFETY: NVML contract (module docs).
        unsafe {
            put(current, on)?;
            put(pending, on)
        }
    })
}

device_getters! {
    fn nvmlDeviceGetMaxMigDeviceCount() -> c_uint = |v| {
        v.physical()?;
        sim::MAX_MIG_DEVICES
    };

    /// NOT_FOUND for an index without an instance (or MIG mode off).
    fn nvmlDeviceGetMigDeviceHandleByIndex(index: c_uint) -> Device = |v| {
        v.physical()?;
        if index >= sim::MAX_MIG_DEVICES {
            return Err(code::INVALID_ARGUMENT);
        }
        let n = v.gpu.mig.as_ref().map_or(0, Vec::len);
        if index as usize >= n {
            return Err(code::NOT_FOUND);
        }
        raw(Handle::Mig(v.gpu.index, index))
    };

    fn nvmlDeviceIsMigDeviceHandle() -> c_uint = |v| c_uint::from(v.is_mig_handle());

    fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle() -> Device = |v| {
        if !v.is_mig_handle() {
            return Err(code::INVALID_ARGUMENT);
        }
        raw(Handle::Gpu(v.gpu.index))
    };

    fn nvmlDeviceGetGpuInstanceId() -> c_uint = |v| {
        v.mig.as_ref().ok_or(code::INVALID_ARGUMENT)?.gpu_instance_id
    };

    fn nvmlDeviceGetComputeInstanceId() -> c_uint = |v| {
        v.mig.as_ref().ok_or(code::INVALID_ARGUMENT)?.compute_instance_id
    };

    /// MIG handles only (NOT_SUPPORTED on physical GPUs, as nvml.h documents).
    fn nvmlDeviceGetAttributes_v2() -> DeviceAttributes = |v| {
        let m = v.mig.as_ref().ok_or(code::NOT_SUPPORTED)?;
        let cs = m.compute_slices;
        DeviceAttributes {
            multiprocessor_count: v.gpu.sm_count / crate::scenario::COMPUTE_SLICES * cs,
            shared_copy_engine_count: cs,
            shared_decoder_count: cs.div_ceil(2),
            shared_encoder_count: 0,
            shared_jpeg_count: cs.div_ceil(2),
            shared_ofa_count: c_uint::from(cs == crate::scenario::COMPUTE_SLICES),
            gpu_instance_slice_count: cs,
            compute_instance_slice_count: cs,
            memory_size_mb: m.memory_mib,
        }
    };
}

aliases! {
    fn nvmlDeviceGetAttributes(device: Device, attrs: *mut DeviceAttributes) =
        nvmlDeviceGetAttributes_v2;
}

// ----------------------------------------------------------------------------
// Events
// ----------------------------------------------------------------------------

fn set_id(set: EventSet) -> Result<usize, Code> {
    (set as usize)
        .checked_sub(EVENT_SET_BASE)
        .filter(|id| *id > 0)
        .ok_or(code::INVALID_ARGUMENT)
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlEventSetCreate(set: *mut EventSet) -> Ret {
    with_sim(|sim| {
        if set.is_null() {
            return Err(code::INVALID_ARGUMENT);
        }
        let id = sim.event_set_create();
        // SAFETY: NVML contract (module docs).
        unsafe { put(set, ptr::without_provenance_mut(EVENT_SET_BASE + id)) }
    })
}

/// nvml-wrapper's `Drop for EventSet` calls this unconditionally; after
/// shutdown it answers UNINITIALIZED.
#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlEventSetFree(set: EventSet) -> Ret {
    with_sim(|sim| sim.event_set_free(set_id(set)?))
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlDeviceRegisterEvents(
    device: Device,
    types: c_ulonglong,
    set: EventSet,
) -> Ret {
    with_handle(device, |sim, h| sim.register_events(h, types, set_id(set)?))
}

device_getters! {
    fn nvmlDeviceGetSupportedEventTypes() -> c_ulonglong = |v| {
        v.physical()?;
        event::SUPPORTED
    };
}

/// Looks for an XID for a registered GPU to claim, and sleeps until `xid/`
/// changes (the set's [`crate::xid_wait::XidChanges`]) to look again, until `timeout_ms` passes. The
/// driver lock is not held while sleeping.
fn wait_event(set: EventSet, timeout_ms: c_uint) -> Result<sim::Event, Code> {
    let id = set_id(set)?;
    let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
    // Watched since the set was made: an XID written after a look wakes us.
    let changes = driver().sim()?.xid_changes(id)?;
    loop {
        if let Some(ev) = driver().sim()?.poll_xid(id)? {
            return Ok(ev);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(code::TIMEOUT);
        }
        match &changes {
            Some(c) => c.wait(deadline - now),
            // No state directory: nothing can ever come.
            None => sleep(deadline - now),
        }
    }
}

/// An event as `nvmlEventSetWait_v2` reports it: XIDs are per GPU.
fn event_data(ev: sim::Event) -> EventData {
    EventData {
        device: raw(Handle::Gpu(ev.gpu)),
        event_type: ev.event_type,
        event_data: ev.data,
        gpu_instance_id: NO_INSTANCE,
        compute_instance_id: NO_INSTANCE,
    }
}

/// Waits for the next event of `set` and writes it to `data` in the layout
/// `layout` makes of it; `data` is checked before waiting.
///
/// # Safety
/// `data` is null or valid for writing a `T`.
unsafe fn wait_into<T>(
    set: EventSet,
    data: *mut T,
    timeout_ms: c_uint,
    layout: impl FnOnce(sim::Event) -> T,
) -> Ret {
    guard(|| {
        if data.is_null() {
            return Err(code::INVALID_ARGUMENT);
        }
        let ev = wait_event(set, timeout_ms)?;
        // SAFETY: this function's contract.
        unsafe { put(data, layout(ev)) }
    })
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlEventSetWait_v2(
    set: EventSet,
    data: *mut EventData,
    timeout_ms: c_uint,
) -> Ret {
    // SAFETY: NVML contract (module docs).
    unsafe { wait_into(set, data, timeout_ms, event_data) }
}

#[unsafe(no_mangle)]
pub(crate) unsafe extern "C" fn nvmlEventSetWait(
    set: EventSet,
    data: *mut EventDataV1,
    timeout_ms: c_uint,
) -> Ret {
    // SAFETY: NVML contract (module docs).
    unsafe {
        wait_into(set, data, timeout_ms, |ev| {
            // The old layout is the new one without the instance ids.
            let d = event_data(ev);
            EventDataV1 {
                device: d.device,
                event_type: d.event_type,
                event_data: d.event_data,
            }
        })
    }
}
