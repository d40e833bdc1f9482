//! LockLease: checks beyond the schema, and what the lease's status says about who holds
//! it. The agents grant leases and keep the grants in Redis; the operator only reads them
//! ([`report`] turns one read into the status fields and the `Held` condition, purely).

use std::time::Duration;

use breakwater_api::{
    LockLease, LockLeaseSpec,
    lock_lease::{LeaseGrant, LockLeaseStatus},
};
use breakwater_store::lease::{Grant, LeaseState};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use serde::Serialize;

use super::{Assessment, Verdict, reason};
use crate::selector;

pub fn assess(lease: &LockLease) -> Assessment {
    let accepted = match (lease.spec.ttl.to_std(), selector::check(&lease.spec.pod_selector)) {
        (Err(err), _) => Verdict::fail(reason::INVALID, format!("spec.ttl: {err}")),
        (_, Err(err)) => Verdict::fail(reason::INVALID_SELECTOR, format!("spec.podSelector.{err}")),
        (Ok(ttl), Ok(())) => {
            let what = match lease.spec.holders {
                1 => "lock".to_string(),
                n => format!("semaphore of {n}"),
            };
            Verdict::ok(reason::ACCEPTED, format!("{what} with a {}s ttl", ttl.as_secs_f64()))
        }
    };
    Assessment { accepted, resolved_refs: None, targets: None }
}

/// The `Held` condition: its type and reasons.
pub mod held {
    pub const TYPE: &str = "Held";
    /// At least one grant is current.
    pub const HELD: &str = "Held";
    /// No grant is current.
    pub const FREE: &str = "Free";
    /// Redis could not be read; the holders shown are the last ones read.
    pub const STORE_UNAVAILABLE: &str = "StoreUnavailable";
    /// The operator runs without Redis, so it cannot know.
    pub const NO_STORE: &str = "NoStore";
}

/// A condition status that may be Unknown (`Held` is, when Redis cannot be read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

/// The `Held` condition before it becomes a `metav1.Condition`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub status: Status,
    pub reason: &'static str,
    pub message: String,
}

/// The status fields the operator derives from Redis (the rest of `LockLeaseStatus` is
/// the conditions). Times are whole seconds, as `metav1.Time` carries them, so a value read
/// back from the API server compares equal to the one computed.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<i64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<LeaseGrant>,
}

impl LeaseFields {
    /// The fields as a resource's status carries them now.
    pub fn of(status: Option<&LockLeaseStatus>) -> Self {
        status.map_or_else(Self::default, |s| Self {
            holder: s.holder.clone(),
            fencing_token: s.fencing_token,
            holders: s.holders.clone(),
        })
    }
}

/// What the operator learnt about a lease from the store.
#[derive(Clone, Copy, Debug)]
pub enum Observation<'a> {
    /// The operator runs without Redis.
    NoStore,
    /// Redis could not be read, for this reason.
    Unavailable(&'a str),
    /// The lease as Redis holds it, read at `state.now_us` (Redis `TIME`).
    Read(&'a LeaseState),
}

/// The status a read produces, and when it changes next by itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub fields: LeaseFields,
    pub held: Held,
    /// How long until the earliest current grant expires unless renewed (by Redis's
    /// clock): nobody publishes an expiry, so the status must be read again then.
    pub next_expiry: Option<Duration>,
}

/// The status fields and `Held` condition of a lease with `spec`, from one observation.
/// When Redis cannot be read, the fields last written (`last`) stay, marked Unknown rather
/// than cleared: the lease may well still be held. Grants that have expired by the read's
/// own clock are dropped, so a state read just before an expiry and reported after it
/// cannot show a holder Redis no longer has.
pub fn report(observation: Observation<'_>, spec: &LockLeaseSpec, last: &LeaseFields) -> Report {
    match observation {
        Observation::NoStore => Report {
            fields: LeaseFields::default(),
            held: Held {
                status: Status::Unknown,
                reason: held::NO_STORE,
                message:
                    "the operator runs without Redis (--redis-url), so it cannot tell who holds the lease"
                        .into(),
            },
            next_expiry: None,
        },
        Observation::Unavailable(error) => Report {
            fields: last.clone(),
            held: Held {
                status: Status::Unknown,
                reason: held::STORE_UNAVAILABLE,
                message: format!("cannot read the lease from Redis: {error}"),
            },
            next_expiry: None,
        },
        Observation::Read(state) => read(state, spec),
    }
}

fn read(state: &LeaseState, spec: &LockLeaseSpec) -> Report {
    let mut current: Vec<&Grant> = state.grants.iter().filter(|g| g.expires_at_us > state.now_us).collect();
    current.sort_by_key(|g| g.fencing_token);
    let newest = current.last().copied();
    let newest_token = current.iter().map(|g| g.fencing_token).max();
    let fields = LeaseFields {
        holder: newest.map(|g| g.holder.clone()),
        fencing_token: state.last_token.max(newest_token),
        holders: current.iter().map(|g| grant(g)).collect(),
    };
    let earliest = current.iter().map(|g| g.expires_at_us).min();
    let held = match (newest, earliest) {
        (Some(newest), Some(_)) if spec.holders <= 1 && current.len() == 1 => Held {
            status: Status::True,
            reason: held::HELD,
            message: format!(
                "held by {} (token {}) until {}",
                newest.holder,
                newest.fencing_token,
                time(newest.expires_at_us).0
            ),
        },
        (Some(newest), Some(earliest)) => Held {
            status: Status::True,
            reason: held::HELD,
            message: format!(
                "{}/{} slots held; newest by {} (token {}); the first ends at {}",
                current.len(),
                spec.holders,
                newest.holder,
                newest.fencing_token,
                time(earliest).0
            ),
        },
        _ => Held {
            status: Status::False,
            reason: held::FREE,
            message: match fields.fencing_token {
                Some(token) => format!("free; the last grant had fencing token {token}"),
                None => "free; never granted".to_string(),
            },
        },
    };
    let next_expiry =
        earliest.map(|at| Duration::from_micros(u64::try_from(at.saturating_sub(state.now_us)).unwrap_or(0)));
    Report { fields, held, next_expiry }
}

fn grant(grant: &Grant) -> LeaseGrant {
    LeaseGrant {
        holder: grant.holder.clone(),
        fencing_token: grant.fencing_token,
        acquired_at: time(grant.acquired_at_us),
        renewed_at: Some(time(grant.renewed_at_us)),
        expires_at: time(grant.expires_at_us),
    }
}

/// Microseconds since the epoch (Redis `TIME`) as a `metav1.Time`, in whole seconds (all it
/// serializes), clamped to the representable range.
pub fn time(us: i64) -> Time {
    let seconds = us.div_euclid(1_000_000);
    let clamped = seconds.clamp(Timestamp::MIN.as_second(), Timestamp::MAX.as_second());
    Time(Timestamp::from_second(clamped).unwrap_or(Timestamp::UNIX_EPOCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000;
    /// 2026-11-22T05:45:20Z, in microseconds.
    const NOW: i64 = 1_795_326_320 * S;

    fn spec(holders: u32) -> LockLeaseSpec {
        serde_json::from_value(serde_json::json!({
            "ttl": "30s", "holders": holders, "podSelector": {"matchLabels": {"app": "w"}}
        }))
        .expect("spec")
    }

    fn grant(holder: &str, token: i64, acquired: i64, expires: i64) -> Grant {
        Grant {
            holder: holder.into(),
            fencing_token: token,
            acquired_at_us: NOW + acquired * S,
            renewed_at_us: NOW + acquired * S + S / 2,
            expires_at_us: NOW + expires * S,
        }
    }

    fn state(last_token: Option<i64>, grants: Vec<Grant>) -> LeaseState {
        LeaseState { now_us: NOW, last_token, grants }
    }

    fn at(offset: i64) -> Time {
        time(NOW + offset * S)
    }

    #[test]
    fn free_lease() {
        let never = report(Observation::Read(&state(None, vec![])), &spec(1), &LeaseFields::default());
        assert_eq!(never.fields, LeaseFields::default());
        assert_eq!(
            never.held,
            Held { status: Status::False, reason: "Free", message: "free; never granted".into() }
        );
        assert_eq!(never.next_expiry, None);
        let released = report(Observation::Read(&state(Some(17), vec![])), &spec(1), &LeaseFields::default());
        assert_eq!(released.fields.fencing_token, Some(17), "the newest token stays visible");
        assert_eq!(released.fields.holder, None);
        assert_eq!(released.held.message, "free; the last grant had fencing token 17");
    }

    #[test]
    fn held_lock() {
        let s = state(Some(17), vec![grant("billing-worker-0/3f2a", 17, -10, 20)]);
        let r = report(Observation::Read(&s), &spec(1), &LeaseFields::default());
        assert_eq!(r.fields.holder.as_deref(), Some("billing-worker-0/3f2a"));
        assert_eq!(r.fields.fencing_token, Some(17));
        assert_eq!(
            r.fields.holders,
            [LeaseGrant {
                holder: "billing-worker-0/3f2a".into(),
                fencing_token: 17,
                acquired_at: at(-10),
                renewed_at: Some(at(-10)), // half a second later: whole seconds only
                expires_at: at(20),
            }]
        );
        assert_eq!(r.held.status, Status::True);
        assert_eq!(r.held.reason, "Held");
        assert_eq!(r.held.message, "held by billing-worker-0/3f2a (token 17) until 2026-11-22T05:45:40Z");
        assert_eq!(r.next_expiry, Some(Duration::from_secs(20)));
    }

    #[test]
    fn semaphore_partially_and_fully_held() {
        let two = state(Some(9), vec![grant("a/1", 8, -20, 5), grant("b/2", 9, -1, 29)]);
        let r = report(Observation::Read(&two), &spec(3), &LeaseFields::default());
        assert_eq!(r.held.status, Status::True);
        assert_eq!(
            r.held.message,
            "2/3 slots held; newest by b/2 (token 9); the first ends at 2026-11-22T05:45:25Z"
        );
        assert_eq!(r.fields.holder.as_deref(), Some("b/2"), "the newest grant's holder");
        assert_eq!(r.fields.fencing_token, Some(9));
        assert_eq!(r.fields.holders.iter().map(|g| g.fencing_token).collect::<Vec<_>>(), [8, 9]);
        assert_eq!(r.next_expiry, Some(Duration::from_secs(5)), "the earliest expiry");

        let full =
            state(Some(12), vec![grant("c/3", 12, 0, 30), grant("a/1", 8, -20, 5), grant("b/2", 9, -1, 29)]);
        let r = report(Observation::Read(&full), &spec(3), &LeaseFields::default());
        assert!(r.held.message.starts_with("3/3 slots held; newest by c/3 (token 12)"), "{}", r.held.message);
        assert_eq!(
            r.fields.holders.iter().map(|g| g.fencing_token).collect::<Vec<_>>(),
            [8, 9, 12],
            "by token"
        );
    }

    #[test]
    fn expired_grants_are_dropped() {
        // Expired at the read's clock (and exactly at it): not a holder any more.
        let s = state(Some(5), vec![grant("old/1", 4, -40, -10), grant("edge/2", 5, -30, 0)]);
        let r = report(Observation::Read(&s), &spec(1), &LeaseFields::default());
        assert_eq!(r.fields.holder, None);
        assert!(r.fields.holders.is_empty());
        assert_eq!(r.fields.fencing_token, Some(5));
        assert_eq!(r.held.reason, "Free");
        assert_eq!(r.next_expiry, None);
        // One expired, one current: the current one alone.
        let s = state(Some(6), vec![grant("old/1", 4, -40, -10), grant("new/3", 6, -1, 29)]);
        let r = report(Observation::Read(&s), &spec(1), &LeaseFields::default());
        assert_eq!(r.fields.holder.as_deref(), Some("new/3"));
        assert_eq!(r.fields.holders.len(), 1);
    }

    #[test]
    fn unavailable_keeps_the_last_fields_and_no_store_knows_nothing() {
        let last = LeaseFields { holder: Some("a/1".into()), fencing_token: Some(3), holders: vec![] };
        let r = report(Observation::Unavailable("connection refused"), &spec(1), &last);
        assert_eq!(r.fields, last);
        assert_eq!(
            r.held,
            Held {
                status: Status::Unknown,
                reason: "StoreUnavailable",
                message: "cannot read the lease from Redis: connection refused".into()
            }
        );
        let r = report(Observation::NoStore, &spec(1), &last);
        assert_eq!(r.fields, LeaseFields::default());
        assert_eq!((r.held.status, r.held.reason), (Status::Unknown, "NoStore"));
    }

    #[test]
    fn times_are_whole_seconds() {
        assert_eq!(time(1_500_000).0, Timestamp::from_second(1).expect("valid"));
        assert_eq!(time(-1).0, Timestamp::from_second(-1).expect("valid"), "floor, not toward zero");
        assert_eq!(time(i64::MAX).0.as_second(), Timestamp::MAX.as_second());
    }
}
