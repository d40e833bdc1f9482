//! Policy evaluation: what the operator concludes about each resource — is it valid, do its
//! references resolve, where does it apply, and what is each Service's effective policy
//! once root-namespace Default and Override policies are merged in. Pure functions over an
//! [`Inventory`](crate::inventory::Inventory); the controllers and standalone mode share them.

pub mod attachment;
pub mod breaker;
pub mod check;
pub mod circuit_breaker;
pub mod lock_lease;
pub mod outbox_relay;
pub mod rate_limit;
pub mod shadow;

use std::cmp::Ordering;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Condition reasons. CamelCase and specific, so `kubectl get -o wide` alone says what is wrong.
pub mod reason {
    pub const ACCEPTED: &str = "Accepted";
    /// Valid, but a root-namespace Override replaces some of its sections.
    pub const OVERRIDDEN: &str = "Overridden";
    /// Valid, but every Service it selects has a policy of its own (root Default only).
    pub const SHADOWED: &str = "Shadowed";
    pub const INVALID: &str = "Invalid";
    pub const INVALID_SELECTOR: &str = "InvalidSelector";
    pub const ROOT_NAMESPACE_ONLY: &str = "RootNamespaceOnly";
    pub const CONFLICTED: &str = "Conflicted";
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    pub const TARGET_NOT_FOUND: &str = "TargetNotFound";
    pub const SECTION_NOT_FOUND: &str = "SectionNotFound";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const SECRET_KEY_NOT_FOUND: &str = "SecretKeyNotFound";
    pub const PENDING: &str = "Pending";
    /// Every proxy that carries the policy acknowledged the configuration with it.
    pub const PROGRAMMED: &str = "Programmed";
    /// A proxy rejected (NACKed) the configuration that carries the policy.
    pub const REJECTED: &str = "Rejected";
}

/// One condition's outcome, before it becomes a `metav1.Condition`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Verdict {
    pub fn ok(reason: &'static str, message: impl Into<String>) -> Self {
        Self { ok: true, reason, message: message.into() }
    }

    pub fn fail(reason: &'static str, message: impl Into<String>) -> Self {
        Self { ok: false, reason, message: message.into() }
    }
}

/// Everything the operator concludes about one resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assessment {
    pub accepted: Verdict,
    /// None for kinds without references (LockLease).
    pub resolved_refs: Option<Verdict>,
    /// Service ports the policy is in effect on; None for kinds that attach to none.
    pub targets: Option<u32>,
}

/// Older policies take precedence (Gateway API convention): by creation time, then by
/// namespace/name, so the order is total and stable across restarts.
pub fn precedence<K: kube::Resource>(a: &K, b: &K) -> Ordering {
    let created = |k: &K| k.meta().creation_timestamp.as_ref().map(|t| t.0);
    // `namespace()` and `name_any()` compared, borrowed: sorting thousands of policies
    // compares them often, and allocating four strings each time was most of the sort.
    fn named(meta: &ObjectMeta) -> (Option<&str>, &str) {
        (
            meta.namespace.as_deref(),
            meta.name.as_deref().or(meta.generate_name.as_deref()).unwrap_or_default(),
        )
    }
    match (created(a), created(b)) {
        (Some(x), Some(y)) if x != y => x.cmp(&y),
        _ => named(a.meta()).cmp(&named(b.meta())),
    }
}

/// Joins names for a message: "a, b and c".
pub fn join_names<I: IntoIterator<Item = String>>(names: I) -> String {
    let names: Vec<String> = names.into_iter().collect();
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

/// "1 Service port", "3 Service ports".
pub fn count_of(n: usize, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}
