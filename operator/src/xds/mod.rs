//! Serving configuration to proxies over ADS, and learning from their ACKs and NACKs
//! whether each policy is `Programmed`. In a cluster each stream first proves which pod it
//! is (`identity`).

pub mod cache;
pub mod delta;
pub mod feed;
pub mod identity;
pub mod server;

pub use cache::{Acknowledgements, Changes, Compiler, Rejection, SnapshotCache};
pub use identity::{Authenticator, DEFAULT_AUDIENCE};
pub use server::{AdsServer, serve};
