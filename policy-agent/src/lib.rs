//! `breakwater-agent`: the per-pod sidecar. It serves Envoy's global rate-limit service
//! (`envoy.service.ratelimit.v3`) on Redis, runs the shared circuit breakers fed by Envoy's
//! access-log service (`envoy.service.accesslog.v3`), and grants leases:
//!
//! - [`algorithm`]: TokenBucket (GCRA), SlidingWindow and FixedWindow, as Redis Lua scripts
//!   and as their pure Rust twins;
//! - [`store`]: the [`store::CounterStore`] trait with the Redis (standalone, Cluster; the
//!   connection is `breakwater-store`'s) and in-memory backends;
//! - [`limiter`]: descriptors → counters → a `RateLimitResponse`, with deadlines, failure
//!   modes, the over-limit cache ([`cache`]) and quota batches ([`batch`]);
//! - [`config`]: the rules in force, swapped atomically, fed from a file or a channel;
//! - [`breaker`]: the shared breakers — outcomes in from the access log, decisions out from a
//!   local copy of each breaker's state in Redis, transitions followed as they are published;
//! - [`shadow`]: shadow-mode rejections reported to Redis for the operator's status;
//! - [`lease`]: leases (locks and semaphores) with fencing tokens, in Redis or in memory
//!   (the store is `breakwater-store`'s, shared with the operator), granted to the pod over
//!   a loopback HTTP API, and leader election on top of them;
//! - [`ads`]: the agent's own subscription to its configuration on the operator's xDS server,
//!   and [`ads_proxy`], the way the pod's Envoy reaches that server with the pod's token;
//! - [`capture`]: the traffic capture the injected init container installs (iptables);
//! - [`grpc`], [`http`], [`metrics`]: the servers around it, and [`coalesce`], the write
//!   coalescing of the gRPC connections;
//! - [`run`]: everything together — [`run()`] takes bound listeners, the [`Settings`] and
//!   a shutdown future, so tests bind `127.0.0.1:0` and stop the agent when they like, and
//!   `main` only parses flags, starts logging and calls it;
//! - [`Error`]: every way the agent fails, in one enum.

pub mod ads;
pub mod ads_proxy;
pub mod algorithm;
pub mod batch;
pub mod breaker;
pub mod cache;
pub mod capture;
pub mod cli;
pub mod coalesce;
pub mod config;
pub mod error;
pub mod grpc;
pub mod http;
pub mod lease;
pub mod limiter;
pub mod metrics;
pub mod run;
pub mod shadow;
pub mod source;
pub mod store;

pub use error::{Error, Result};
pub use run::{LeaseSettings, Listeners, Settings, StoreSettings, pod_id, run};
