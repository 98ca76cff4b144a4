//! Loading an embedded object with its maps pinned in the pin directory, and
//! taking its maps and programs out by name.

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapError},
    programs::{Program, ProgramError},
};

use super::{
    PinDir,
    error::{ProbeError, chain, ebpf_error, load_error},
};

/// Loads `object` (`bytes`), creating or reopening its maps under the pin
/// directory; `true` when `map` was already pinned (an agent restart), so
/// its counters did not start from zero.
pub(super) fn load_object(
    pin: &PinDir,
    object: &'static str,
    bytes: &[u8],
    map: &str,
) -> Result<(Ebpf, bool), ProbeError> {
    let reused = pin.pinned(map);
    let ebpf = EbpfLoader::new()
        .default_map_pin_directory(&pin.path)
        .load(bytes)
        .map_err(|e| ebpf_error(object, e))?;
    Ok((ebpf, reused))
}

/// Map `name` of `object`, as its type `T`.
pub(super) fn take_map<T>(
    ebpf: &mut Ebpf,
    object: &'static str,
    name: &str,
) -> Result<T, ProbeError>
where
    T: TryFrom<Map, Error = MapError>,
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

/// Program `program` of `object`, as its type `T` (not loaded into the
/// kernel yet).
pub(super) fn program<'a, T>(
    ebpf: &'a mut Ebpf,
    object: &'static str,
    program: &'static str,
) -> Result<&'a mut T, ProbeError>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(program)
        .ok_or_else(|| ProbeError::Load {
            object,
            message: format!("program {program} missing"),
        })?
        .try_into()
        .map_err(|e| load_error(program, e))
}
