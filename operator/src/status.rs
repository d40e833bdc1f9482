//! Turns an [`Assessment`] into the `status` the API server holds: `metav1.Condition`s with
//! `observedGeneration`, whose `lastTransitionTime` moves only when the status flips.

use breakwater_api::common::condition_type;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::Serialize;

use crate::{
    inventory::ObjectName,
    policy::{
        Assessment, Verdict,
        lock_lease::{self, LeaseFields},
        reason,
    },
    xds::SnapshotCache,
};

/// The part of a resource's status the operator owns: conditions, and per kind `targets`
/// or a lease's holders (read from Redis).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnedStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets: Option<u32>,
    /// LockLease only.
    #[serde(flatten)]
    pub lease: Option<LeaseFields>,
    pub conditions: Vec<Condition>,
}

/// `Programmed`: what the data plane says, once the resource is accepted. Without an xDS
/// server (`cache` None) nothing can acknowledge, so it stays Pending — never claimed.
pub fn programmed(
    assessment: &Assessment,
    cache: Option<&SnapshotCache>,
    kind: &str,
    name: &ObjectName,
    generation: Option<i64>,
) -> Verdict {
    if !assessment.accepted.ok {
        return Verdict::fail(reason::PENDING, "not programmed: the resource is not accepted");
    }
    match cache {
        Some(cache) => cache.programmed(kind, name, generation.unwrap_or(1)),
        None => Verdict::fail(reason::PENDING, "no xDS server: nothing can acknowledge this generation"),
    }
}

/// The conditions for `assessment`, keeping the transition time of each condition whose
/// status did not change.
pub fn owned_status(
    assessment: &Assessment,
    programmed: Verdict,
    generation: Option<i64>,
    existing: &[Condition],
    now: &Time,
) -> OwnedStatus {
    let verdicts = [
        Some((condition_type::ACCEPTED, assessment.accepted.clone())),
        assessment.resolved_refs.clone().map(|v| (condition_type::RESOLVED_REFS, v)),
        Some((condition_type::PROGRAMMED, programmed)),
    ];
    let conditions = verdicts
        .into_iter()
        .flatten()
        .map(|(type_, verdict)| {
            let status = if verdict.ok { "True" } else { "False" };
            condition(type_, status, verdict.reason, verdict.message, generation, existing, now)
        })
        .collect();
    OwnedStatus { targets: assessment.targets, lease: None, conditions }
}

/// Adds what a lease read produced: the holder fields and the `Held` condition.
pub fn with_lease(
    mut status: OwnedStatus,
    report: lock_lease::Report,
    generation: Option<i64>,
    existing: &[Condition],
    now: &Time,
) -> OwnedStatus {
    let held = report.held;
    status.conditions.push(condition(
        lock_lease::held::TYPE,
        held.status.as_str(),
        held.reason,
        held.message,
        generation,
        existing,
        now,
    ));
    status.lease = Some(report.fields);
    status
}

/// One condition, keeping the transition time of the existing one when its status is the
/// same.
fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    existing: &[Condition],
    now: &Time,
) -> Condition {
    let last_transition_time = existing
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Conditions whose status differs from before (or that are new): what deserves an Event.
pub fn transitions<'a>(before: &[Condition], after: &'a [Condition]) -> Vec<&'a Condition> {
    after
        .iter()
        .filter(|c| {
            !before.iter().any(|b| b.type_ == c.type_ && b.status == c.status && b.reason == c.reason)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Time {
        Time(jiff::Timestamp::from_second(seconds).expect("valid timestamp"))
    }

    fn pending() -> Verdict {
        Verdict::fail(reason::PENDING, "waiting")
    }

    fn assessment(ok: bool) -> Assessment {
        let accepted = if ok { Verdict::ok("Accepted", "fine") } else { Verdict::fail("Invalid", "bad") };
        Assessment { accepted, resolved_refs: None, targets: Some(1) }
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let first = owned_status(&assessment(true), pending(), Some(1), &[], &at(100));
        let same = owned_status(&assessment(true), pending(), Some(2), &first.conditions, &at(200));
        assert_eq!(same.conditions[0].last_transition_time, at(100));
        assert_eq!(same.conditions[0].observed_generation, Some(2));
        let flipped = owned_status(&assessment(false), pending(), Some(3), &same.conditions, &at(300));
        assert_eq!(flipped.conditions[0].last_transition_time, at(300));
        assert_eq!(flipped.conditions[0].status, "False");
    }

    #[test]
    fn programmed_is_never_claimed_without_a_data_plane() {
        let name = ObjectName::new("shop", "p");
        let verdict = programmed(&assessment(true), None, "RateLimitPolicy", &name, Some(1));
        assert_eq!((verdict.ok, verdict.reason), (false, "Pending"));
        let cache = SnapshotCache::default();
        let verdict = programmed(&assessment(true), Some(&cache), "RateLimitPolicy", &name, Some(1));
        assert_eq!((verdict.ok, verdict.reason), (false, "Pending"), "{}", verdict.message);
        let verdict = programmed(&assessment(false), Some(&cache), "RateLimitPolicy", &name, Some(1));
        assert!(verdict.message.contains("not accepted"));
    }

    #[test]
    fn held_is_added_with_its_own_transition_time() {
        use lock_lease::{Held, Report, Status};
        let report = |status, reason: &'static str| Report {
            fields: LeaseFields { holder: Some("w/1".into()), ..LeaseFields::default() },
            held: Held { status, reason, message: "m".into() },
            next_expiry: None,
        };
        let base = owned_status(&assessment(true), pending(), Some(1), &[], &at(1));
        let first = with_lease(base.clone(), report(Status::True, "Held"), Some(1), &[], &at(1));
        let held = first.conditions.last().expect("Held");
        assert_eq!(
            (held.type_.as_str(), held.status.as_str(), held.reason.as_str()),
            ("Held", "True", "Held")
        );
        let json = serde_json::to_value(&first).expect("serializes");
        assert_eq!(json["holder"], "w/1", "lease fields sit beside the conditions: {json}");
        assert!(json.get("holders").is_none() && json.get("fencingToken").is_none(), "{json}");

        let again =
            with_lease(base.clone(), report(Status::True, "Held"), Some(1), &first.conditions, &at(5));
        assert_eq!(again.conditions.last().map(|c| c.last_transition_time.clone()), Some(at(1)));
        let unknown =
            with_lease(base, report(Status::Unknown, "StoreUnavailable"), Some(1), &first.conditions, &at(9));
        let held = unknown.conditions.last().expect("Held");
        assert_eq!((held.status.as_str(), held.last_transition_time.clone()), ("Unknown", at(9)));
    }

    #[test]
    fn transitions_report_changed_conditions_only() {
        let before = owned_status(&assessment(true), pending(), Some(1), &[], &at(1)).conditions;
        let after = owned_status(&assessment(false), pending(), Some(2), &before, &at(2)).conditions;
        let changed: Vec<&str> = transitions(&before, &after).iter().map(|c| c.type_.as_str()).collect();
        // Programmed stays False/Pending: only its message changed, which is no transition.
        assert_eq!(changed, ["Accepted"]);
        assert!(transitions(&after, &after).is_empty());
    }
}
