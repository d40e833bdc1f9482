//! What the integration tests (and, through `#[path]`, the benchmarks) share: an ADS client
//! that plays a proxy, YAML worlds, pieces of policy specs, an ACK storm on a real API server.

pub mod ads;
pub mod cluster;
pub mod specs;
pub mod storm;
pub mod world;
