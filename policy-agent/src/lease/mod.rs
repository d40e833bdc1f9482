//! Leases for this pod: named locks and counting semaphores with fencing tokens. The
//! operator declares them (`LockLease`, delivered as [`breakwater_api::agent::LeaseRule`]s
//! in the agent configuration); the agent grants them to its pod over a loopback HTTP API
//! ([`api`]) and can keep one on the pod's behalf to elect a leader ([`leader`]).
//!
//! The store — the atomic operations, the Redis key layout and scripts, the in-memory twin,
//! the events — is [`breakwater_store::lease`], shared with the operator, which reads it;
//! what is only the agent's is here:
//!
//! - [`manager`]: what the API and the leader helper call — the leases this pod may use,
//!   holder ids, waiting for a grant, the token floor, metrics;
//! - [`api`], [`leader`]: the HTTP API and leader election on top of it.

pub use breakwater_store::lease::{
    Attempt, Grant, LeaseState, LeaseStore, MemoryLeases, RedisLeases, events, memory, redis,
};

pub mod api;
pub mod leader;
pub mod manager;

pub use manager::LeaseManager;
