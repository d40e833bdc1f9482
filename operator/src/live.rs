//! The live facts agents keep in the shared Redis that a policy's status shows: the state of
//! each shared breaker (`breakwater_store::breaker`), whose transitions the operator follows
//! as the breaker script publishes them, and what each shadow limit would have rejected
//! (`breakwater_store::shadow`). The operator reads them through the store code the agents
//! write them with, so the two never disagree on the layout; `policy::breaker` and
//! `policy::shadow` word them, and [`announce`] words a transition as a Kubernetes Event.

use std::{fmt::Debug, sync::Arc};

use breakwater_store::{
    breaker::{self, BreakerState, BreakerStore, Event, RedisBreakers, State},
    lease::RedisLeases,
    shadow::RedisShadow,
};
use futures::{StreamExt, future::BoxFuture};
use tokio_util::sync::CancellationToken;

use crate::{
    compile::DEFAULT_HALF_OPEN_CALLS,
    follow::{Backoff, Followed, follow},
    lease::{RedisOptions, StoreError},
    policy::{
        breaker::{Target, percent},
        shadow::MinuteCount,
    },
};

/// Reads a breaker's state. Object-safe, so the controller holds any store behind one type.
pub trait BreakerReader: Send + Sync + Debug {
    /// The breaker `<namespace>/<service>:<port>` as stored, without advancing it; None
    /// when it was never written or has expired (CLOSED).
    fn state<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<BreakerState>, StoreError>>;
}

impl<S: BreakerStore + Debug> BreakerReader for S {
    fn state<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<BreakerState>, StoreError>> {
        Box::pin(BreakerStore::state(self, id))
    }
}

/// Reads what a shadow limit would have rejected.
pub trait ShadowReader: Send + Sync + Debug {
    /// The last complete minute of the rule `<namespace>/<policy>/<limit>`, by Redis's clock.
    fn last_minute<'a>(&'a self, rule: &'a str) -> BoxFuture<'a, Result<MinuteCount, StoreError>>;
}

impl ShadowReader for RedisShadow {
    fn last_minute<'a>(&'a self, rule: &'a str) -> BoxFuture<'a, Result<MinuteCount, StoreError>> {
        Box::pin(async move {
            let (minute_start_us, would_reject) = RedisShadow::last_minute(self, rule).await?;
            Ok(MinuteCount { minute_start_us, would_reject })
        })
    }
}

/// The breakers and shadow counts in the Redis `leases` reads: the same connection, key
/// prefix and deadline per read.
pub fn open(leases: &RedisLeases) -> (Arc<RedisBreakers>, Arc<RedisShadow>) {
    let (connection, prefix, deadline) = (leases.connection(), leases.key_prefix(), leases.deadline());
    (
        Arc::new(RedisBreakers::new(connection.clone(), prefix, deadline)),
        Arc::new(RedisShadow::new(connection.clone(), prefix, deadline)),
    )
}

/// Follows the breakers' transitions under the agents' key prefix until `stop` is
/// cancelled (the same subscription machinery as the lease events).
pub fn follow_redis(options: &RedisOptions, backoff: Backoff, stop: CancellationToken) -> Followed<Event> {
    let (topology, prefix) = (options.topology.clone(), options.key_prefix.clone());
    let subscribe = move || {
        let (topology, prefix) = (topology.clone(), prefix.clone());
        // Boxed here: the stream is 'static, but its opaque type names the borrowed values.
        async move { breaker::subscribe(&topology, &prefix).await.map(StreamExt::boxed) }
    };
    follow("breaker transitions", subscribe, backoff, stop)
}

/// The reasons of the Events that announce a breaker's transitions.
pub mod reason {
    pub const BREAKER_OPENED: &str = "BreakerOpened";
    pub const BREAKER_HALF_OPEN: &str = "BreakerHalfOpen";
    pub const BREAKER_CLOSED: &str = "BreakerClosed";
}

/// A transition as a Kubernetes Event on the policy whose `breaker` section the breaker runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    pub reason: &'static str,
    /// Warning (the breaker opened) or Normal.
    pub warning: bool,
    pub note: String,
}

/// The Event for `event`, a transition of `target`'s breaker. `read` is the breaker as read
/// after the event: an OPEN breaker keeps the totals of the window that opened it, so the
/// rates it opened at are named; a read that shows no OPEN window (none, or the breaker has
/// moved on) names the thresholds it opens at.
pub fn announce(target: &Target, event: &Event, read: Option<&BreakerState>) -> Announcement {
    let breaker = &target.breaker;
    let what = target.describe();
    let open_for = breaker.open_duration.to_string();
    match event.state {
        State::Open => {
            let measured = read.filter(|r| r.state == State::Open && r.calls > 0).map(|r| {
                let failed = percent(r.failures, r.calls).unwrap_or(0);
                let slow = breaker
                    .slow_call
                    .as_ref()
                    .map(|_| format!(", {}% slow", percent(r.slow, r.calls).unwrap_or(0)))
                    .unwrap_or_default();
                format!("{failed}% of {} calls failed{slow}", r.calls)
            });
            let rates = measured.unwrap_or_else(|| {
                let slow = breaker
                    .slow_call
                    .as_ref()
                    .map(|s| {
                        format!(" or its slow-call rate {}% (slower than {})", s.rate_threshold, s.duration)
                    })
                    .unwrap_or_default();
                format!("its failure rate reached {}%{slow}", breaker.failure_rate_threshold)
            });
            Announcement {
                reason: reason::BREAKER_OPENED,
                warning: true,
                note: format!(
                    "breaker {} of {what} opened: {rates}; every caller answers 503 for {open_for}, then probes decide",
                    target.id
                ),
            }
        }
        State::HalfOpen => {
            let probes = breaker.half_open_calls.unwrap_or(DEFAULT_HALF_OPEN_CALLS);
            Announcement {
                reason: reason::BREAKER_HALF_OPEN,
                warning: false,
                note: format!(
                    "breaker {} of {what} is half-open: {probes} probe call{} across all callers decide; \
                     one failure opens it again for {open_for}",
                    target.id,
                    if probes == 1 { "" } else { "s" }
                ),
            }
        }
        State::Closed => Announcement {
            reason: reason::BREAKER_CLOSED,
            warning: false,
            note: format!("breaker {} of {what} closed: its probe calls succeeded", target.id),
        },
    }
}

#[cfg(test)]
mod tests {
    use crate::inventory::ObjectName;

    use super::*;

    fn target(section: serde_json::Value) -> Target {
        let service = ObjectName::new("shop", "payments");
        Target {
            id: Target::id(&service, 8080),
            service,
            port: 8080,
            policy: ObjectName::new("shop", "payments"),
            breaker: serde_json::from_value(section).expect("a breaker section"),
        }
    }

    fn event(state: State) -> Event {
        Event { id: "shop/payments:8080".into(), state, since_us: 1, generation: 1 }
    }

    #[test]
    fn each_transition_is_announced_with_what_it_means() {
        let payments = target(serde_json::json!({
            "failureRateThreshold": 50, "slowCall": {"duration": "2s", "rateThreshold": 80},
            "slidingWindow": {"type": "Count", "size": 100}, "openDuration": "30s", "halfOpenCalls": 3,
        }));
        let opened = announce(&payments, &event(State::Open), None);
        assert_eq!((opened.reason, opened.warning), ("BreakerOpened", true));
        assert_eq!(
            opened.note,
            "breaker shop/payments:8080 of Service shop/payments port 8080 opened: its failure rate reached 50% \
             or its slow-call rate 80% (slower than 2s); every caller answers 503 for 30s, then probes decide"
        );
        // A read of the OPEN breaker shows the window that opened it: its rates are named.
        let read =
            BreakerState { state: State::Open, calls: 40, failures: 22, slow: 3, ..Default::default() };
        let measured = announce(&payments, &event(State::Open), Some(&read));
        assert!(measured.note.contains("opened: 55% of 40 calls failed, 7% slow;"), "{}", measured.note);

        let half = announce(&payments, &event(State::HalfOpen), None);
        assert_eq!((half.reason, half.warning), ("BreakerHalfOpen", false));
        assert_eq!(
            half.note,
            "breaker shop/payments:8080 of Service shop/payments port 8080 is half-open: 3 probe calls across \
             all callers decide; one failure opens it again for 30s"
        );
        let closed = announce(&payments, &event(State::Closed), None);
        assert_eq!((closed.reason, closed.warning), ("BreakerClosed", false));
        assert_eq!(
            closed.note,
            "breaker shop/payments:8080 of Service shop/payments port 8080 closed: its probe calls succeeded"
        );
    }

    #[test]
    fn unset_fields_are_announced_as_the_agents_run_them() {
        let plain = target(serde_json::json!({
            "failureRateThreshold": 25, "slidingWindow": {"type": "Time", "duration": "10s"}, "openDuration": "1m",
        }));
        let opened = announce(&plain, &event(State::Open), None);
        assert!(
            opened.note.contains("opened: its failure rate reached 25%; every caller answers 503 for 1m,")
        );
        let half = announce(&plain, &event(State::HalfOpen), None);
        assert!(half.note.contains(&format!("{DEFAULT_HALF_OPEN_CALLS} probe calls")), "{}", half.note);
    }
}
