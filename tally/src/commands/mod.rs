//! One module per `tally` command.

pub(crate) mod agent;
pub(crate) mod aggregator;
pub(crate) mod audit;
pub(crate) mod completions;
pub(crate) mod config;
pub(crate) mod doctor;
pub(crate) mod man;
pub(crate) mod report;
pub(crate) mod run;
pub(crate) mod top;
