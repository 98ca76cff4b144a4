//! The node agent: who used which GPU, and how much.
//!
//! Data flows one way: samplers ([`gpu`], [`probes`]) → attribution
//! ([`tenants`], [`kubernetes`], [`attribution`], [`states`]) → a
//! [`snapshot`] → outputs ([`metrics`], [`enforce`], [`report`]). [`run`]
//! wires them: one sampling thread publishes each snapshot, and the HTTP
//! routes and the report sender only read the latest one. What the agent
//! shares with the aggregator is `tally_contract`.
// `deny`, not `forbid`: the audited exceptions are the capability calls in
// `privileges`, the raw NVML symbols in `gpu::read` (MIG ids, remapped
// rows), `open_by_handle_at` in `probes::cgroups` (no safe wrapper
// exists), glibc's `mallopt` and `malloc_trim` in `allocator` and
// `madvise` in `code_pages`.
#![deny(unsafe_code)]

pub mod allocator;
pub mod attribution;
pub mod cgroupfs;
pub mod code_pages;
pub mod config;
pub mod doctor;
pub mod enforce;
pub mod gpu;
pub mod kubernetes;
pub mod metrics;
pub mod paths;
pub mod pids;
pub mod privileges;
pub mod probes;
pub mod report;
pub mod run;
pub mod snapshot;
pub mod state_lock;
pub mod states;
pub mod tenants;
