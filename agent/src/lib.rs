//! Tally: who used which GPU, and how much.
//!
//! Data flows one way: samplers ([`gpu`], [`probes`]) → attribution
//! ([`tenants`], [`attribution`]) → outputs ([`metrics`], [`http`],
//! [`report`]). The aggregator role ([`aggregator`]) lives in the same
//! binary, as in Vector, and shares only the wire types of [`report`].
// `deny`, not `forbid`: one audited exception in `gpu::mig_ids`.
#![deny(unsafe_code)]

pub mod agent;
pub mod aggregator;
pub mod attribution;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod enforce;
pub mod gpu;
pub mod http;
pub mod kubernetes;
pub mod metrics;
pub mod paths;
pub mod privileges;
pub mod probes;
pub mod report;
pub mod signal;
pub mod snapshot;
pub mod states;
pub mod tenants;
