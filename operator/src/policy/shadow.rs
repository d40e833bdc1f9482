//! What a RateLimitPolicy's status says about its shadow limits: how many requests each
//! would have rejected in the last complete minute, counted by every agent together in
//! Redis (`breakwater_store::shadow`), so a team can read it before enforcing the limit.
//! Only scope Cluster limits are counted there (a scope Pod limit runs in Envoy alone).
//! [`limits`] says which limits a policy's status shows; [`report`] turns one read of them
//! into `status.shadow` and the `WouldReject` condition, purely.

use std::collections::BTreeMap;

use breakwater_api::{
    RateLimitPolicySpec,
    rate_limit::{Limit, Scope, ShadowStatus},
};

use super::{
    attachment::Within,
    breaker::Summary,
    lock_lease::{Status, held, time},
    rate_limit,
};
use crate::inventory::{Inventory, ObjectName};

/// The `WouldReject` condition of a RateLimitPolicy with a shadow limit of scope Cluster:
/// its type and reasons.
pub mod would_reject {
    pub const TYPE: &str = "WouldReject";
    /// A shadow limit would have rejected requests in the last complete minute.
    pub const WOULD_REJECT: &str = "WouldReject";
    /// None would have rejected any.
    pub const NOTHING_REJECTED: &str = "NothingRejected";
    /// No Service port enforces the policy's shadow limits.
    pub const NOT_IN_EFFECT: &str = "NotInEffect";
    /// Redis could not be read: the counts are not shown.
    pub const STORE_UNAVAILABLE: &str = super::held::STORE_UNAVAILABLE;
    /// The operator runs without Redis, so it cannot know.
    pub const NO_STORE: &str = super::held::NO_STORE;
}

/// Whether a limit is counted in Redis in shadow mode.
fn counted(limit: &Limit) -> bool {
    limit.shadow && limit.scope() == Scope::Cluster
}

/// Whether a policy's status speaks of shadow limits at all: it has one of scope Cluster.
pub fn has_shadow_limits(spec: &RateLimitPolicySpec) -> bool {
    spec.limits.iter().any(counted)
}

/// One shadow limit of a policy as the agents count it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShadowLimit {
    /// The limit's name in the policy.
    pub limit: String,
    /// `<namespace>/<policy>/<limit>`: the rule id the agents count it under (the agent
    /// configuration's `RateLimitRule.id`).
    pub rule: String,
}

impl ShadowLimit {
    pub fn rule_id(policy: &ObjectName, limit: &str) -> String {
        format!("{}/{}/{limit}", policy.namespace, policy.name)
    }
}

/// The shadow limits (scope Cluster) of `policy` that some Service port enforces, by name.
/// Only the ports the policy can reach are evaluated (its namespace's, or every one for a
/// root-namespace policy).
pub fn limits(policy: &ObjectName, inventory: &Inventory) -> Vec<ShadowLimit> {
    let within = Within::of_policy(&policy.namespace, inventory);
    let names: BTreeMap<String, ShadowLimit> = rate_limit::effective_within(inventory, within)
        .into_values()
        .flatten()
        .filter(|effective| &effective.policy == policy && counted(&effective.limit))
        .map(|effective| {
            let name = effective.limit.name.clone();
            let rule = ShadowLimit::rule_id(policy, &name);
            (name.clone(), ShadowLimit { limit: name, rule })
        })
        .collect();
    names.into_values().collect()
}

/// One limit's count: the requests it would have rejected in the minute that starts at
/// `minute_start_us` (Redis's clock), the last complete one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MinuteCount {
    pub minute_start_us: i64,
    pub would_reject: u64,
}

/// What the operator learnt about a policy's shadow limits from the store.
#[derive(Clone, Copy, Debug)]
pub enum Observation<'a> {
    NoStore,
    Unavailable(&'a str),
    /// Each limit's count, in the order of the limits.
    Read(&'a [MinuteCount]),
}

/// The status a read produces.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// `status.shadow`: empty unless Redis was read.
    pub shadow: Vec<ShadowStatus>,
    pub would_reject: Summary,
}

/// `status.shadow` and the `WouldReject` condition of a policy whose counted shadow limits
/// are `limits`. When Redis cannot be read the counts are left out and `WouldReject` says
/// why.
pub fn report(limits: &[ShadowLimit], observation: Observation<'_>) -> Report {
    let summary = |status, reason, message: String| Summary { status, reason, message };
    let without = |would_reject| Report { shadow: Vec::new(), would_reject };
    if limits.is_empty() {
        return without(summary(
            Status::False,
            would_reject::NOT_IN_EFFECT,
            "no Service port enforces this policy's shadow limits".into(),
        ));
    }
    let counts = match observation {
        Observation::NoStore => {
            return without(summary(
                Status::Unknown,
                would_reject::NO_STORE,
                "the operator runs without Redis (--redis-url), so it cannot tell what the shadow limits would reject"
                    .into(),
            ));
        }
        Observation::Unavailable(error) => {
            return without(summary(
                Status::Unknown,
                would_reject::STORE_UNAVAILABLE,
                format!("cannot read the shadow counts from Redis: {error}"),
            ));
        }
        Observation::Read(counts) => counts,
    };
    let shadow: Vec<ShadowStatus> = limits
        .iter()
        .zip(counts)
        .map(|(limit, count)| ShadowStatus {
            limit: limit.limit.clone(),
            would_reject: count.would_reject,
            window_start: time(count.minute_start_us),
        })
        .collect();
    let minute =
        counts.iter().map(|c| c.minute_start_us).max().map_or_else(String::new, |us| time(us).0.to_string());
    let rejecting: Vec<String> = shadow
        .iter()
        .filter(|s| s.would_reject > 0)
        .map(|s| format!("{} {}", s.limit, s.would_reject))
        .collect();
    let total: u64 = shadow.iter().map(|s| s.would_reject).sum();
    let would_reject = if rejecting.is_empty() {
        summary(
            Status::False,
            would_reject::NOTHING_REJECTED,
            format!("no shadow limit would have rejected a request in the minute from {minute}"),
        )
    } else {
        summary(
            Status::True,
            would_reject::WOULD_REJECT,
            format!(
                "would have rejected {total} request{} in the minute from {minute}, cluster-wide: {}",
                if total == 1 { "" } else { "s" },
                rejecting.join(", ")
            ),
        )
    };
    Report { shadow, would_reject }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;
    /// 2026-11-22T05:45:00Z, in microseconds.
    const MINUTE: i64 = 1_795_326_300 * S;

    fn limit(name: &str) -> ShadowLimit {
        ShadowLimit { limit: name.into(), rule: ShadowLimit::rule_id(&ObjectName::new("shop", "api"), name) }
    }

    fn count(would_reject: u64) -> MinuteCount {
        MinuteCount { minute_start_us: MINUTE, would_reject }
    }

    #[test]
    fn each_limit_shows_its_count_and_the_minute() {
        let limits = [limit("per-user"), limit("per-path")];
        assert_eq!(limits[0].rule, "shop/api/per-user", "the agents' rule id");
        let report = report(&limits, Observation::Read(&[count(12), count(0)]));
        let json = serde_json::to_value(&report.shadow).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!([
                {"limit": "per-user", "wouldReject": 12, "windowStart": "2026-11-22T05:45:00Z"},
                {"limit": "per-path", "wouldReject": 0, "windowStart": "2026-11-22T05:45:00Z"},
            ])
        );
        assert_eq!(
            (report.would_reject.status, report.would_reject.reason, report.would_reject.message.as_str()),
            (
                Status::True,
                "WouldReject",
                "would have rejected 12 requests in the minute from 2026-11-22T05:45:00Z, cluster-wide: per-user 12"
            )
        );
        let quiet = super::report(&limits, Observation::Read(&[count(0), count(0)]));
        assert_eq!(
            (quiet.would_reject.status, quiet.would_reject.message.as_str()),
            (
                Status::False,
                "no shadow limit would have rejected a request in the minute from 2026-11-22T05:45:00Z"
            )
        );
    }

    #[test]
    fn without_a_read_the_counts_are_left_out_and_the_condition_says_why() {
        let limits = [limit("per-user")];
        let none = report(&limits, Observation::NoStore);
        assert!(none.shadow.is_empty());
        assert_eq!((none.would_reject.status, none.would_reject.reason), (Status::Unknown, "NoStore"));
        let down = report(&limits, Observation::Unavailable("connection refused"));
        assert!(down.shadow.is_empty());
        assert_eq!(
            (down.would_reject.reason, down.would_reject.message.as_str()),
            ("StoreUnavailable", "cannot read the shadow counts from Redis: connection refused")
        );
        let nowhere = report(&[], Observation::NoStore);
        assert_eq!(
            (nowhere.would_reject.status, nowhere.would_reject.reason),
            (Status::False, "NotInEffect")
        );
    }
}
