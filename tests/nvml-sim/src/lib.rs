//! A simulated NVML (`libnvidia-ml`) for testing Tally without a GPU.
//!
//! Built as a `cdylib` (`libnvml_sim.so`) it exports the NVML C functions
//! the agent calls, with NVML's struct layouts, count protocol and return
//! codes, so `nvml_wrapper::Nvml::builder().lib_path(..).init()` runs its
//! real code path against it. The GPUs come from the scenario file named by
//! `TALLY_SIM_SCENARIO`; what runs on them and which faults are injected
//! from the state directory named by `TALLY_SIM_STATE` (see README.md).
//!
//! As an `rlib` it gives Rust tests the file formats: [`state::register`],
//! [`state::inject_xid`], [`state::set_lost`], [`scenario::parse`].
#![deny(unsafe_code)]
// Test packages: each target uses a part of the package's dependencies.
#![allow(unused_crate_dependencies)]

mod energy;
#[allow(unsafe_code)] // the extern "C" exports; every unsafe block says why it holds
mod ffi;
#[allow(unsafe_code)] // GPM's extern "C" exports, as in `ffi`
mod gpm;
#[allow(unsafe_code)] // ECC and row-remap exports, as in `ffi`
mod health;
pub mod scenario;
mod sim;
pub mod state;
mod watch;
mod xid_wait;

pub use state::{Health, ProcKind, Registration, XidFault, register, unregister};
