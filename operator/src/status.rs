//! Turns what the operator found out about a resource into the `status` the API server
//! holds: `metav1.Condition`s with `observedGeneration`, whose `lastTransitionTime` moves only
//! when the status flips. [`assemble`] is the one place a status is put together, for the
//! controllers and standalone mode alike; [`programmed`] words what the proxies reported; a
//! lease's holders (`Held`), a relay's facts (`Ready`), a CircuitBreakerPolicy's breakers
//! (`Tripped`) and a RateLimitPolicy's shadow counts (`WouldReject`) come worded from
//! `policy`.

use breakwater_api::{circuit_breaker::BreakerStatus, common::condition_type, rate_limit::ShadowStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::Serialize;

use crate::{
    policy::{
        Assessment, Verdict, breaker,
        lock_lease::{self, LeaseFields},
        outbox_relay::{self, RelayFields},
        reason, shadow,
    },
    xds::Acknowledgements,
};

/// The part of a resource's status the operator owns: conditions, and per kind `targets`,
/// a lease's holders, a relay's facts, the breakers or the shadow counts (all read from
/// Redis).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnedStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets: Option<u32>,
    /// LockLease only.
    #[serde(flatten)]
    pub lease: Option<LeaseFields>,
    /// OutboxRelay only.
    #[serde(flatten)]
    pub relay: Option<RelayFields>,
    /// CircuitBreakerPolicy only: its breakers, as read from Redis (left out otherwise).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub breakers: Vec<BreakerStatus>,
    /// RateLimitPolicy only: its shadow limits' counts, as read from Redis.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shadow: Vec<ShadowStatus>,
    pub conditions: Vec<Condition>,
}

/// What a resource's status is assembled from.
#[derive(Clone, Debug, PartialEq)]
pub struct Findings {
    /// The evaluation: `Accepted`, `ResolvedRefs`, `targets`.
    pub assessment: Assessment,
    /// What the proxies carrying the resource said about its generation; None when no xDS
    /// server runs (nothing can acknowledge, so `Programmed` is never claimed).
    pub acknowledgements: Option<Acknowledgements>,
    /// A LockLease's holders, as read from the store; None for the other kinds.
    pub lease: Option<lock_lease::Report>,
    /// An OutboxRelay's facts and `Ready`; None for the other kinds, and in standalone mode,
    /// which runs no relay.
    pub relay: Option<outbox_relay::Report>,
    /// A CircuitBreakerPolicy's breakers and `Tripped`; None for the other kinds and for a
    /// policy without a `breaker` section.
    pub breakers: Option<breaker::Report>,
    /// A RateLimitPolicy's shadow counts and `WouldReject`; None for the other kinds and for
    /// a policy without a shadow limit of scope Cluster.
    pub shadow: Option<shadow::Report>,
}

/// The status of a resource at `generation`: `Accepted`, `ResolvedRefs` (for kinds with
/// references), `Programmed` once accepted, for a LockLease `Held` and its holders, for an
/// OutboxRelay `Ready` and its relay's facts, for a CircuitBreakerPolicy with a breaker
/// `Tripped` and its breakers, for a RateLimitPolicy with shadow limits `WouldReject` and
/// their counts.
/// Each condition keeps the transition time it has in `existing` unless its status flips.
pub fn assemble(
    findings: Findings,
    generation: Option<i64>,
    existing: &[Condition],
    now: &Time,
) -> OwnedStatus {
    let Findings { assessment, acknowledgements, lease, relay, breakers, shadow } = findings;
    let programmed = if assessment.accepted.ok {
        programmed(acknowledgements.as_ref())
    } else {
        Verdict::fail(reason::PENDING, "not programmed: the resource is not accepted")
    };
    let mut status = owned_status(&assessment, programmed, generation, existing, now);
    if let Some(report) = lease {
        status = with_lease(status, report, generation, existing, now);
    }
    if let Some(report) = relay {
        let ready = report.ready;
        status.conditions.push(condition(
            outbox_relay::ready::TYPE,
            ready.status.as_str(),
            &ready.reason,
            ready.message,
            generation,
            existing,
            now,
        ));
        status.relay = Some(report.fields);
    }
    if let Some(report) = breakers {
        let tripped = report.tripped;
        status.conditions.push(condition(
            breaker::tripped::TYPE,
            tripped.status.as_str(),
            tripped.reason,
            tripped.message,
            generation,
            existing,
            now,
        ));
        status.breakers = report.breakers;
    }
    if let Some(report) = shadow {
        let would_reject = report.would_reject;
        status.conditions.push(condition(
            shadow::would_reject::TYPE,
            would_reject.status.as_str(),
            would_reject.reason,
            would_reject.message,
            generation,
            existing,
            now,
        ));
        status.shadow = report.shadow;
    }
    status
}

/// `Programmed` of an accepted resource, in words, from what the proxies that carry it said
/// (None: no xDS server). True once every connected proxy carrying it acknowledged its
/// generation — at least one must be connected; pods that would carry it but have no proxy
/// connected are counted in the message and do not hold it back (see docs/decisions.md).
/// Rejected as soon as one of them NACKed the version it holds.
///
/// While it waits for ACKs the message counts the proxies it waits for, not those that
/// ACKed already: an ACK that leaves the verdict as it is leaves the words as they are too,
/// so it costs no status write (docs/decisions.md). The counts it does show change when
/// proxies connect or go, or pods come and go.
pub fn programmed(acknowledgements: Option<&Acknowledgements>) -> Verdict {
    let Some(acks) = acknowledgements else {
        return Verdict::fail(reason::PENDING, "no xDS server: nothing can acknowledge this generation");
    };
    let total = acks.connected + acks.not_connected;
    let not_connected = match acks.not_connected {
        0 => String::new(),
        n => format!(" ({n} not connected)"),
    };
    if let Some(first) = acks.rejections.first() {
        let rejected = acks.rejections.len();
        return Verdict::fail(
            reason::REJECTED,
            format!(
                "rejected by {rejected} of {total} proxies{not_connected}; {}: {}",
                first.node, first.message
            ),
        );
    }
    // When it is True every connected carrier acknowledged, and with none connected none
    // did: either way the count says nothing a single ACK changes.
    let counted = format!("acknowledged by {}/{total} proxies{not_connected}", acks.acknowledged);
    match acks.connected {
        _ if total == 0 => Verdict::fail(reason::PENDING, "no proxy carries this policy yet"),
        0 => Verdict::fail(reason::PENDING, counted),
        connected if acks.acknowledged == connected => Verdict::ok(reason::PROGRAMMED, counted),
        connected => Verdict::fail(
            reason::PENDING,
            format!("waiting for {connected}/{total} proxies to acknowledge{not_connected}"),
        ),
    }
}

/// The conditions for `assessment`, keeping the transition time of each condition whose
/// status did not change.
fn owned_status(
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
    OwnedStatus {
        targets: assessment.targets,
        lease: None,
        relay: None,
        breakers: Vec::new(),
        shadow: Vec::new(),
        conditions,
    }
}

/// Adds what a lease read produced: the holder fields and the `Held` condition.
fn with_lease(
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
    use crate::xds::Rejection;

    fn at(seconds: i64) -> Time {
        Time(jiff::Timestamp::from_second(seconds).expect("valid timestamp"))
    }

    fn assessment(ok: bool) -> Assessment {
        let accepted = if ok { Verdict::ok("Accepted", "fine") } else { Verdict::fail("Invalid", "bad") };
        Assessment { accepted, resolved_refs: None, targets: Some(1) }
    }

    fn findings(ok: bool) -> Findings {
        Findings {
            assessment: assessment(ok),
            acknowledgements: None,
            lease: None,
            relay: None,
            breakers: None,
            shadow: None,
        }
    }

    fn acks(connected: usize, acknowledged: usize, not_connected: usize) -> Acknowledgements {
        Acknowledgements { connected, acknowledged, not_connected, rejections: vec![] }
    }

    fn said(verdict: Verdict) -> (bool, &'static str, String) {
        (verdict.ok, verdict.reason, verdict.message)
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let first = assemble(findings(true), Some(1), &[], &at(100));
        let same = assemble(findings(true), Some(2), &first.conditions, &at(200));
        assert_eq!(same.conditions[0].last_transition_time, at(100));
        assert_eq!(same.conditions[0].observed_generation, Some(2));
        let flipped = assemble(findings(false), Some(3), &same.conditions, &at(300));
        assert_eq!(flipped.conditions[0].last_transition_time, at(300));
        assert_eq!(flipped.conditions[0].status, "False");
    }

    #[test]
    fn programmed_is_never_claimed_without_a_data_plane() {
        assert_eq!(said(programmed(None)).1, "Pending");
        assert_eq!(
            said(programmed(Some(&acks(0, 0, 0)))),
            (false, "Pending", "no proxy carries this policy yet".into())
        );
        let status = assemble(
            Findings { acknowledgements: Some(acks(2, 2, 0)), ..findings(false) },
            Some(1),
            &[],
            &at(1),
        );
        let programmed = status.conditions.iter().find(|c| c.type_ == "Programmed").expect("Programmed");
        assert_eq!(
            (programmed.status.as_str(), programmed.message.as_str()),
            ("False", "not programmed: the resource is not accepted")
        );
    }

    #[test]
    fn programmed_counts_the_connected_carriers_and_names_the_others() {
        assert_eq!(
            said(programmed(Some(&acks(2, 2, 0)))),
            (true, "Programmed", "acknowledged by 2/2 proxies".into())
        );
        // Waiting: the message names the connected proxies waited for, and stays the same
        // as they ACK one by one (no status write per ACK).
        for acknowledged in 0..2 {
            assert_eq!(
                said(programmed(Some(&acks(2, acknowledged, 0)))),
                (false, "Pending", "waiting for 2/2 proxies to acknowledge".into())
            );
            assert_eq!(
                said(programmed(Some(&acks(2, acknowledged, 3)))),
                (false, "Pending", "waiting for 2/5 proxies to acknowledge (3 not connected)".into())
            );
        }
        // Pods that carry the policy but have no proxy connected are counted, not waited for.
        assert_eq!(
            said(programmed(Some(&acks(1, 1, 2)))),
            (true, "Programmed", "acknowledged by 1/3 proxies (2 not connected)".into())
        );
        // With none connected, nothing has acknowledged it.
        assert_eq!(
            said(programmed(Some(&acks(0, 0, 3)))),
            (false, "Pending", "acknowledged by 0/3 proxies (3 not connected)".into())
        );
        let rejected = Acknowledgements {
            rejections: vec![Rejection { node: "shop/a".into(), message: "bad cluster".into() }],
            ..acks(2, 1, 1)
        };
        assert_eq!(
            said(programmed(Some(&rejected))),
            (false, "Rejected", "rejected by 1 of 3 proxies (1 not connected); shop/a: bad cluster".into())
        );
    }

    #[test]
    fn held_is_added_with_its_own_transition_time() {
        use lock_lease::{Held, Report, Status};
        let report = |status, reason: &'static str| Report {
            fields: LeaseFields { holder: Some("w/1".into()), ..LeaseFields::default() },
            held: Held { status, reason, message: "m".into() },
            next_expiry: None,
        };
        let leased = |status, reason| Findings { lease: Some(report(status, reason)), ..findings(true) };
        let first = assemble(leased(Status::True, "Held"), Some(1), &[], &at(1));
        let held = first.conditions.last().expect("Held");
        assert_eq!(
            (held.type_.as_str(), held.status.as_str(), held.reason.as_str()),
            ("Held", "True", "Held")
        );
        let json = serde_json::to_value(&first).expect("serializes");
        assert_eq!(json["holder"], "w/1", "lease fields sit beside the conditions: {json}");
        assert!(json.get("holders").is_none() && json.get("fencingToken").is_none(), "{json}");

        let again = assemble(leased(Status::True, "Held"), Some(1), &first.conditions, &at(5));
        assert_eq!(again.conditions.last().map(|c| c.last_transition_time.clone()), Some(at(1)));
        let unknown =
            assemble(leased(Status::Unknown, "StoreUnavailable"), Some(1), &first.conditions, &at(9));
        let held = unknown.conditions.last().expect("Held");
        assert_eq!((held.status.as_str(), held.last_transition_time.clone()), ("Unknown", at(9)));
    }

    #[test]
    fn ready_and_the_relay_fields_are_added_for_a_relay() {
        use outbox_relay::{Ready, Report, Status};
        let report = |status, reason: &str| Report {
            fields: RelayFields {
                active_relay: Some("orders-relay-0".into()),
                pending: Some(3),
                ..RelayFields::default()
            },
            ready: Ready { status, reason: reason.into(), message: "m".into() },
        };
        let relayed = |status, reason| Findings { relay: Some(report(status, reason)), ..findings(true) };
        let first = assemble(relayed(Status::Unknown, "NoReport"), Some(1), &[], &at(1));
        let ready = first.conditions.last().expect("Ready");
        assert_eq!(
            (ready.type_.as_str(), ready.status.as_str(), ready.reason.as_str()),
            ("Ready", "Unknown", "NoReport")
        );
        let json = serde_json::to_value(&first).expect("serializes");
        assert_eq!(
            (json["activeRelay"].as_str(), json["pending"].as_u64()),
            (Some("orders-relay-0"), Some(3))
        );
        assert!(json.get("published").is_none(), "{json}");
        let relaying = assemble(relayed(Status::True, "Relaying"), Some(1), &first.conditions, &at(7));
        let changed: Vec<&str> =
            transitions(&first.conditions, &relaying.conditions).iter().map(|c| c.reason.as_str()).collect();
        assert_eq!(changed, ["Relaying"], "a Ready transition is news (an Event)");
        assert_eq!(relaying.conditions.last().map(|c| c.last_transition_time.clone()), Some(at(7)));
    }

    #[test]
    fn tripped_and_the_breakers_are_added_for_a_breaker_section() {
        use breakwater_api::circuit_breaker::BreakerState;
        use lock_lease::Status;
        let report = |status, reason, shown: Vec<BreakerStatus>| breaker::Report {
            breakers: shown,
            tripped: breaker::Summary { status, reason, message: "m".into() },
        };
        let open = BreakerStatus {
            service: "shop/payments".into(),
            port: 8080,
            state: BreakerState::Open,
            failure_rate: None,
            slow_call_rate: None,
            calls: 0,
            last_transition_time: Some(at(3)),
        };
        let tripping = |r| Findings { breakers: Some(r), ..findings(true) };
        let first = assemble(tripping(report(Status::True, "Open", vec![open])), Some(1), &[], &at(4));
        let tripped = first.conditions.last().expect("Tripped");
        assert_eq!(
            (tripped.type_.as_str(), tripped.status.as_str(), tripped.reason.as_str()),
            ("Tripped", "True", "Open")
        );
        let json = serde_json::to_value(&first).expect("serializes");
        assert_eq!(json["breakers"][0]["state"], "Open", "{json}");
        assert!(json.get("shadow").is_none(), "{json}");
        let unknown =
            assemble(tripping(report(Status::Unknown, "StoreUnavailable", vec![])), Some(1), &[], &at(5));
        let json = serde_json::to_value(&unknown).expect("serializes");
        assert!(json.get("breakers").is_none(), "left out when Redis was not read: {json}");
    }

    #[test]
    fn would_reject_and_the_counts_are_added_for_shadow_limits() {
        use breakwater_api::rate_limit::ShadowStatus;
        use lock_lease::Status;
        let counted = Findings {
            shadow: Some(shadow::Report {
                shadow: vec![ShadowStatus {
                    limit: "per-user".into(),
                    would_reject: 7,
                    window_start: at(60),
                }],
                would_reject: breaker::Summary {
                    status: Status::True,
                    reason: "WouldReject",
                    message: "m".into(),
                },
            }),
            ..findings(true)
        };
        let status = assemble(counted, Some(1), &[], &at(130));
        let condition = status.conditions.last().expect("WouldReject");
        assert_eq!((condition.type_.as_str(), condition.status.as_str()), ("WouldReject", "True"));
        let json = serde_json::to_value(&status).expect("serializes");
        assert_eq!(json["shadow"][0]["wouldReject"], 7, "{json}");
    }

    #[test]
    fn transitions_report_changed_conditions_only() {
        let before = assemble(findings(true), Some(1), &[], &at(1)).conditions;
        let after = assemble(findings(false), Some(2), &before, &at(2)).conditions;
        let changed: Vec<&str> = transitions(&before, &after).iter().map(|c| c.type_.as_str()).collect();
        // Programmed stays False/Pending: only its message changed, which is no transition.
        assert_eq!(changed, ["Accepted"]);
        assert!(transitions(&after, &after).is_empty());
    }
}
