//! `breakwater-store`: what Breakwater keeps in Redis, for the two processes that read it.
//! The agent (`breakwater-agent`) grants leases, counts requests, steps the shared circuit
//! breakers and counts shadow-mode rejections here; the operator (`breakwater-operator`)
//! reads who holds each lease, each breaker's state and the shadow counts. Both link this
//! crate and nothing of each other, so the operator never links the rate-limit server, the
//! lease HTTP API or the ADS client, and the two can never disagree on the key layout.
//!
//! - [`connection`]: [`RedisTopology`] (standalone or Cluster) and [`RedisConnection`], the
//!   shared multiplexed connections kept alive by a background task;
//! - [`lease`]: the lease store — [`lease::LeaseStore`] with its Redis backend (the key
//!   layout and the Lua scripts, the only code that reads or writes lease keys) and its
//!   in-memory twin — and [`lease::events`], the channel the scripts publish changes on;
//! - [`breaker`]: the shared circuit breaker — one CLOSED/OPEN/HALF_OPEN machine per target
//!   Service port, a Lua script on Redis's clock ([`breaker::RedisBreakers`]) and its pure
//!   twin ([`breaker::Machine`], run by [`breaker::MemoryBreakers`]), with its transitions
//!   published as [`breaker::Event`]s;
//! - [`shadow`]: per-minute counts of what a shadow-mode rate-limit rule would have rejected;
//! - [`relay`]: an outbox relay's live facts;
//! - [`pubsub`]: subscribing to the channels the scripts publish on (leases, breakers);
//! - [`clock`]: the clock of the in-memory stores (Redis `TIME`'s stand-in);
//! - [`key`]: the escaping every key name uses;
//! - [`Error`]: every way a store call fails, and whether asking again may help.

pub mod breaker;
pub mod clock;
pub mod connection;
pub mod error;
pub mod key;
pub mod lease;
pub mod pubsub;
pub mod relay;
mod reply;
pub mod shadow;

pub use connection::{RedisConnection, RedisSettings, RedisTopology, redact};
pub use error::{Error, ErrorKind, Result};
