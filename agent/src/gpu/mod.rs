//! GPU sampling through NVML (`nvml-wrapper`): the one GPU code path.
//!
//! Each cycle, every GPU is read on its own worker thread ([`workers`],
//! [`read`]) with a deadline, so a driver call that hangs marks its GPU and
//! stalls nothing else; HTTP handlers never call NVML. The [`Sampler`]
//! ([`sample`]) then attributes the processes to tenants, charges each
//! device's interval ([`account`], through [`crate::attribution`]), counts
//! XID errors ([`xid`]) and sets each device's state ([`crate::states`]).

mod account;
mod read;
mod sample;
mod workers;
mod xid;

use std::{ffi::OsStr, path::Path};

pub use self::sample::{DEFAULT_NVML_TIMEOUT, Sample, Sampler, open};

/// The file the loader would open for a bare library name, for messages.
pub fn describe_library(library: &Path) -> String {
    if library.components().count() > 1 || library.is_absolute() {
        library.display().to_string()
    } else {
        format!(
            "{} (found through the dynamic loader)",
            OsStr::new(library).to_string_lossy()
        )
    }
}
