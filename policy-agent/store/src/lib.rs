//! `breakwater-store`: what Breakwater keeps in Redis, for the two processes that read it.
//! The agent (`breakwater-agent`) grants leases and counts requests here; the operator
//! (`breakwater-operator`) only reads who holds each lease. Both link this crate and nothing
//! of each other, so the operator never links the rate-limit server, the lease HTTP API or
//! the ADS client, and the two can never disagree on the key layout.
//!
//! - [`connection`]: [`RedisTopology`] (standalone or Cluster) and [`RedisConnection`], the
//!   shared multiplexed connections kept alive by a background task;
//! - [`lease`]: the lease store — [`lease::LeaseStore`] with its Redis backend (the key
//!   layout and the Lua scripts, the only code that reads or writes lease keys) and its
//!   in-memory twin — and [`lease::events`], the channel the scripts publish changes on;
//! - [`relay`]: an outbox relay's live facts;
//! - [`pubsub`]: subscribing to the channels the scripts publish on;
//! - [`clock`]: the clock of the in-memory stores (Redis `TIME`'s stand-in);
//! - [`key`]: the escaping every key name uses;
//! - [`Error`]: every way a store call fails, and whether asking again may help.

pub mod clock;
pub mod connection;
pub mod error;
pub mod key;
pub mod lease;
pub mod pubsub;
pub mod relay;
mod reply;

pub use connection::{RedisConnection, RedisSettings, RedisTopology, redact};
pub use error::{Error, ErrorKind, Result};
