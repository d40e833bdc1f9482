//! The configuration the operator compiles for one pod's `breakwater-agent`, and the
//! descriptor convention it shares with Envoy's rate-limit filter. The operator produces it
//! (over ADS, or in a file for standalone use); the agent consumes it. Plain serde types,
//! so the two sides agree on the wire format by construction.
//!
//! Descriptor convention: for every limit, Envoy sends a descriptor whose first entry is
//! `(LIMIT_KEY, rule id)`; the remaining entries are the key parts (header values, remote
//! address, path, fixed values), and together they name one counter.

use serde::{Deserialize, Serialize};

use crate::rate_limit::{Algorithm, FailureMode};

/// The rate-limit domain every Breakwater limit uses in Envoy's `ratelimit` filter.
pub const DOMAIN: &str = "breakwater";
/// The key of the first descriptor entry, whose value is a [`RateLimitRule::id`].
pub const LIMIT_KEY: &str = "breakwater.limit";
/// The ADS type URL of an [`AgentConfig`] resource (its `Any.value` is the JSON encoding).
pub const TYPE_URL: &str = "type.googleapis.com/breakwater.agent.v1alpha1.AgentConfig";

/// Everything one agent enforces.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentConfig {
    /// Scope-Cluster rate limits, sorted by id.
    #[serde(default)]
    pub rate_limits: Vec<RateLimitRule>,
    /// The `LockLease`s this pod may take, sorted by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<LeaseRule>,
}

/// One `LockLease` a pod's agent may grant to its pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRule {
    /// `<namespace>/<name>` of the LockLease: names its grants in Redis, shared by every
    /// agent that grants it.
    pub id: String,
    /// The name the pod asks for (`/v1/leases/NAME`): the LockLease's name, since a pod
    /// only sees leases of its own namespace.
    pub name: String,
    /// How long a grant lasts unless renewed, in milliseconds.
    pub ttl_ms: u64,
    /// How many holders at once: 1 for a lock, N for a semaphore.
    pub holders: u32,
}

/// One limit of one policy, as the agent enforces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitRule {
    /// `<policy namespace>/<policy name>/<limit name>`: unique, and stable across compiles
    /// so counters survive configuration changes.
    pub id: String,
    /// Requests admitted per period.
    pub requests: u32,
    /// The period, in milliseconds.
    pub period_ms: u64,
    /// Extra requests a TokenBucket admits at once (0 for the other algorithms).
    #[serde(default)]
    pub burst: u32,
    pub algorithm: Algorithm,
    /// Count, report, never reject.
    #[serde(default)]
    pub shadow: bool,
    /// What to answer when the store cannot decide in time.
    pub failure_mode: FailureMode,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_as_json() {
        let config = AgentConfig {
            rate_limits: vec![RateLimitRule {
                id: "shop/api/per-user".into(),
                requests: 100,
                period_ms: 60_000,
                burst: 20,
                algorithm: Algorithm::TokenBucket,
                shadow: false,
                failure_mode: FailureMode::Open,
            }],
            leases: vec![LeaseRule {
                id: "billing/invoice-run".into(),
                name: "invoice-run".into(),
                ttl_ms: 30_000,
                holders: 1,
            }],
        };
        let json = serde_json::to_string(&config).expect("serializes");
        assert!(json.contains(r#""periodMs":60000"#), "{json}");
        assert!(json.contains(r#""ttlMs":30000"#), "{json}");
        assert_eq!(serde_json::from_str::<AgentConfig>(&json).expect("parses"), config);
    }
}
