//! Serving configuration to proxies over ADS, and learning from their ACKs and NACKs
//! whether each policy is `Programmed`.

pub mod cache;
pub mod feed;
pub mod server;

pub use cache::{Acknowledgements, Compiler, Rejection, SnapshotCache};
pub use server::{AdsServer, serve};
