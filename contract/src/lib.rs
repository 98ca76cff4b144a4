//! What crosses a boundary between Tally's parts, in one small crate: the
//! report an agent sends the aggregator ([`wire`]), the enforcement audit
//! log and its hash chain ([`audit`]), tenant names ([`tenant`]), token
//! files ([`token`]) and the config-file primitives both roles' files are
//! read with ([`config`]).
//!
//! It depends on serde and the standard library only (plus sha2 and hmac for
//! the chain), so the agent, the aggregator, the fuzz targets and outside tools
//! can share it without pulling in either role.
#![forbid(unsafe_code)]

pub mod audit;
pub mod config;
pub mod tenant;
pub mod token;
pub mod wire;
