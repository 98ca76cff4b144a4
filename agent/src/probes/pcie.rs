//! The PCIe probe: uprobes on libcuda's `cuMemcpy*` family, counting
//! host↔device bytes per cgroup id.

use std::path::PathBuf;

use aya::{
    Ebpf,
    programs::{UProbe, uprobe::UProbeScope},
};
use tally_ebpf::PcieValue;
use tracing::{info, warn};

use super::{
    PinDir, cuda,
    error::{ProbeError, chain, load_error},
    load::{load_object, program, take_map},
    maps::{self, CgroupCounters},
    state::Part,
    totals::Totals,
};

/// Loaded uprobes and their map.
pub(super) struct PcieProbe {
    _ebpf: Ebpf,
    pub(super) map: CgroupCounters<PcieValue>,
}

/// Loads `pcie.bpf.o` and attaches its programs to every copy entry point
/// of `libs` (default: the driver libraries found on this host). `Err`
/// when the object could not be loaded; otherwise the probe, kept even
/// when nothing could be attached (counters of earlier runs stay
/// readable), and the attach result.
pub(super) fn start(
    pin: &PinDir,
    libs: Option<&[PathBuf]>,
    totals: &mut Totals,
) -> Result<(PcieProbe, Result<(), ProbeError>), ProbeError> {
    let libs: Vec<PathBuf> = match libs {
        Some(l) => l.to_vec(),
        None => cuda::discover(),
    };
    let (mut ebpf, reused) = load_object(pin, "pcie", tally_ebpf::PCIE, tally_ebpf::MAP_PCIE)?;
    let mut map: CgroupCounters<PcieValue> = take_map(&mut ebpf, "pcie", tally_ebpf::MAP_PCIE)?;
    maps::remove(&mut map, &totals.adopt(Part::Pcie, reused));
    for shape in cuda::Shape::ALL {
        let name = shape.program();
        let prog: &mut UProbe = program(&mut ebpf, "pcie", name)?;
        prog.load().map_err(|e| load_error(name, e))?;
    }
    let attached = attach(&mut ebpf, &libs);
    Ok((PcieProbe { _ebpf: ebpf, map }, attached))
}

/// Attaches the loaded programs to each library's copy entry points.
fn attach(ebpf: &mut Ebpf, libs: &[PathBuf]) -> Result<(), ProbeError> {
    let mut problems = Vec::new();
    let mut attached = 0usize;
    let mut missing_libs = Vec::new();
    for lib in libs {
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
