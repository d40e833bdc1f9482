//! `LockLease`: a named lock (or counting semaphore) that the selected pods take through
//! their agent, with a fencing token on every grant.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{Duration, conditions_schema};

/// A lease that pods matching podSelector may acquire through their agent. holders: 1 is a
/// mutex; holders: N is a semaphore of N. Every grant carries a fencing token that only ever
/// increases.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "breakwater.dev",
    version = "v1alpha1",
    kind = "LockLease",
    doc = "A distributed lock or semaphore with fencing tokens, granted to pods by their agent",
    namespaced,
    status = "LockLeaseStatus",
    shortname = "ll",
    category = "breakwater",
    printcolumn = r#"{"name":"Holder","type":"string","jsonPath":".status.holder"}"#,
    printcolumn = r#"{"name":"Token","type":"integer","jsonPath":".status.fencingToken"}"#,
    printcolumn = r#"{"name":"TTL","type":"string","jsonPath":".spec.ttl"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LockLeaseSpec {
    /// How long a grant lasts unless renewed (1s to 1h). Holders renew well before it ends.
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('1h')").message("ttl must be between 1s and 1h"))]
    pub ttl: Duration,
    /// How many pods may hold the lease at once: 1 for a lock, more for a semaphore.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024))]
    pub holders: u32,
    /// The pods (in this namespace) whose agents may acquire the lease.
    pub pod_selector: LabelSelector,
}

fn one() -> u32 {
    1
}

/// Who holds the lease, as the agents last reported it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LockLeaseStatus {
    /// The holder with the newest grant (the only one when holders is 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// The newest fencing token granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<i64>,
    /// Every current grant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<LeaseGrant>,
    /// Accepted, Programmed and Held.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// One grant of the lease.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LeaseGrant {
    /// The holder id the agent issued (pod name and a nonce).
    pub holder: String,
    /// The fencing token of this grant.
    pub fencing_token: i64,
    /// When the agent granted the lease to this holder.
    pub acquired_at: Time,
    /// When the holder last renewed the grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_at: Option<Time>,
    /// When the grant ends unless it is renewed.
    pub expires_at: Time,
}
