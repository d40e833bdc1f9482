//! What a CircuitBreakerPolicy's status says about its shared breakers. The agents keep each
//! Service port's breaker in Redis (`breakwater_store::breaker`); the operator only reads
//! it. [`targets`] says which breakers a policy's status shows — those of the Service ports
//! whose effective `breaker` section the policy supplies — and [`report`] turns one read of
//! them into `status.breakers` and the `Tripped` condition, purely.

use std::collections::BTreeMap;

use breakwater_api::circuit_breaker::{Breaker, BreakerState as ShownState, BreakerStatus};
use breakwater_store::breaker::{BreakerState, State};

use super::{
    attachment::Within,
    circuit_breaker::{self, Section},
    lock_lease::{Status, held, time},
};
use crate::inventory::{Inventory, ObjectName, ServicePort};

/// The `Tripped` condition of a CircuitBreakerPolicy with a `breaker` section: its type and
/// reasons.
pub mod tripped {
    pub const TYPE: &str = "Tripped";
    /// At least one of its breakers is OPEN.
    pub const OPEN: &str = "Open";
    /// None is OPEN, at least one is HALF_OPEN.
    pub const HALF_OPEN: &str = "HalfOpen";
    /// Every one of its breakers is CLOSED.
    pub const CLOSED: &str = "Closed";
    /// No Service port takes its breaker section from this policy.
    pub const NOT_IN_EFFECT: &str = "NotInEffect";
    /// Redis could not be read: the breakers are not shown.
    pub const STORE_UNAVAILABLE: &str = super::held::STORE_UNAVAILABLE;
    /// The operator runs without Redis, so it cannot know.
    pub const NO_STORE: &str = super::held::NO_STORE;
}

/// How many breakers a condition message names before it counts the rest.
const NAMED: usize = 5;

/// One Service port's shared breaker, as the status of the policy that supplies its
/// `breaker` section shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// `<namespace>/<name>:<port number>`: the breaker's id in Redis, in the agents'
    /// configuration and in its transition events.
    pub id: String,
    pub service: ObjectName,
    pub port: u16,
    /// The policy whose `breaker` section the port's effective policy holds.
    pub policy: ObjectName,
    /// That section.
    pub breaker: Breaker,
}

impl Target {
    /// The breaker `id` names, `<service namespace>/<service name>:<port number>`, the
    /// contract between the compiler, the agents and the store (`breaker-contract.md`).
    pub fn id(service: &ObjectName, port: u16) -> String {
        format!("{}/{}:{port}", service.namespace, service.name)
    }

    /// "Service shop/payments port 8080", for messages.
    pub fn describe(&self) -> String {
        format!("Service {} port {}", self.service, self.port)
    }
}

/// Every shared breaker of the cluster, by id: one per Service port whose effective policy
/// has a `breaker` section, as the compiler gives them to the agents (TCP ports of Services
/// that are not ExternalName, by number).
pub fn breakers(inventory: &Inventory) -> BTreeMap<String, Target> {
    breakers_within(inventory, Within::Everywhere)
}

fn breakers_within(inventory: &Inventory, within: Within<'_>) -> BTreeMap<String, Target> {
    circuit_breaker::effective_within(inventory, within)
        .into_iter()
        .filter_map(|(port, effective)| {
            let breaker = effective.spec.breaker?;
            let policy = effective.sources.get(&Section::Breaker)?.clone();
            let number = port_number(inventory, &port)?;
            let id = Target::id(&port.service, number);
            Some((id.clone(), Target { id, service: port.service, port: number, policy, breaker }))
        })
        .collect()
}

/// The breakers whose `breaker` section `policy` supplies, by id. Only the ports the policy
/// can reach are evaluated (its namespace's, or every one for a root-namespace policy).
pub fn targets(policy: &ObjectName, inventory: &Inventory) -> Vec<Target> {
    breakers_within(inventory, Within::of_policy(&policy.namespace, inventory))
        .into_values()
        .filter(|target| &target.policy == policy)
        .collect()
}

/// The number of the port `port` names (its name, or its number when unnamed), if the
/// compiler gives it a route: a TCP port of a Service that is not ExternalName.
fn port_number(inventory: &Inventory, port: &ServicePort) -> Option<u16> {
    let spec = inventory.services.get(&port.service)?.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    spec.ports.iter().flatten().find_map(|p| {
        let number = u16::try_from(p.port).ok().filter(|n| *n > 0)?;
        let tcp = p.protocol.as_deref().is_none_or(|protocol| protocol == "TCP");
        let key = p.name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| number.to_string());
        (tcp && key == port.port).then_some(number)
    })
}

/// A condition before it becomes a `metav1.Condition`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub status: Status,
    pub reason: &'static str,
    pub message: String,
}

/// What the operator learnt about a policy's breakers from the store.
#[derive(Clone, Copy, Debug)]
pub enum Observation<'a> {
    /// The operator runs without Redis.
    NoStore,
    /// Redis could not be read, for this reason.
    Unavailable(&'a str),
    /// Each target's breaker as Redis holds it, in the order of the targets (None: never
    /// written, or expired — a CLOSED breaker that never moved).
    Read(&'a [Option<BreakerState>]),
}

/// The status a read produces.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// `status.breakers`: empty unless Redis was read.
    pub breakers: Vec<BreakerStatus>,
    pub tripped: Summary,
}

/// `status.breakers` and the `Tripped` condition of a policy whose breakers are `targets`.
/// When Redis cannot be read the breakers are left out (a state shown must be one Redis
/// holds), and `Tripped` says why.
pub fn report(targets: &[Target], observation: Observation<'_>) -> Report {
    let unknown = |reason, message: String| Report {
        breakers: Vec::new(),
        tripped: Summary { status: Status::Unknown, reason, message },
    };
    if targets.is_empty() {
        return Report {
            breakers: Vec::new(),
            tripped: Summary {
                status: Status::False,
                reason: tripped::NOT_IN_EFFECT,
                message: "no Service port takes its breaker section from this policy".into(),
            },
        };
    }
    let states = match observation {
        Observation::NoStore => {
            return unknown(
                tripped::NO_STORE,
                "the operator runs without Redis (--redis-url), so it cannot tell the breakers' state".into(),
            );
        }
        Observation::Unavailable(error) => {
            return unknown(
                tripped::STORE_UNAVAILABLE,
                format!("cannot read the breakers from Redis: {error}"),
            );
        }
        Observation::Read(states) => states,
    };
    let read: Vec<(&Target, BreakerState)> =
        targets.iter().zip(states.iter().map(|s| s.unwrap_or_default())).collect();
    let mut breakers: Vec<BreakerStatus> = read.iter().map(|(target, state)| shown(target, state)).collect();
    breakers.sort_by(|a, b| (&a.service, a.port).cmp(&(&b.service, b.port)));
    let ids = |state: State| -> Vec<&str> {
        read.iter().filter(|(_, s)| s.state == state).map(|(t, _)| t.id.as_str()).collect()
    };
    let (open, half_open) = (ids(State::Open), ids(State::HalfOpen));
    let total = read.len();
    let tripped = if !open.is_empty() {
        let mut message =
            format!("{} OPEN, answered 503 by every caller: {}", of(open.len(), total), named(&open));
        if !half_open.is_empty() {
            message.push_str(&format!("; {} HALF_OPEN: {}", half_open.len(), named(&half_open)));
        }
        Summary { status: Status::True, reason: tripped::OPEN, message }
    } else if !half_open.is_empty() {
        Summary {
            status: Status::True,
            reason: tripped::HALF_OPEN,
            message: format!(
                "{} HALF_OPEN, admitting probe calls only: {}",
                of(half_open.len(), total),
                named(&half_open)
            ),
        }
    } else {
        let message = match total {
            1 => format!("the breaker of {} is CLOSED", read[0].0.describe()),
            n => format!("all {n} breakers are CLOSED"),
        };
        Summary { status: Status::False, reason: tripped::CLOSED, message }
    };
    Report { breakers, tripped }
}

/// "1 of 3 breakers", "the breaker" (of one).
fn of(n: usize, total: usize) -> String {
    match total {
        1 => "the breaker is".to_string(),
        _ => format!("{n} of {total} breakers {}", if n == 1 { "is" } else { "are" }),
    }
}

/// The first few ids, and how many more.
fn named(ids: &[&str]) -> String {
    let mut text = ids.iter().take(NAMED).copied().collect::<Vec<_>>().join(", ");
    if ids.len() > NAMED {
        text.push_str(&format!(" and {} more", ids.len() - NAMED));
    }
    text
}

/// One breaker as `status.breakers` shows it. The rates are whole percentages rounded down,
/// so a rate shown at a threshold has reached it (the machine opens when
/// `failures * 100 >= threshold * calls`); while OPEN or HALF_OPEN, those of the window that
/// opened it (the store keeps its totals until it closes). None while the window holds no
/// call, and the slow-call rate None without a `slowCall` rule.
pub fn shown(target: &Target, state: &BreakerState) -> BreakerStatus {
    BreakerStatus {
        service: target.service.to_string(),
        port: u32::from(target.port),
        state: match state.state {
            State::Closed => ShownState::Closed,
            State::Open => ShownState::Open,
            State::HalfOpen => ShownState::HalfOpen,
        },
        failure_rate: percent(state.failures, state.calls),
        slow_call_rate: target.breaker.slow_call.as_ref().and_then(|_| percent(state.slow, state.calls)),
        calls: state.calls,
        last_transition_time: (state.since_us > 0).then(|| time(state.since_us)),
    }
}

/// `part` of `calls` in whole percent, rounded down; None of no call.
pub fn percent(part: u64, calls: u64) -> Option<u32> {
    (calls > 0).then(|| {
        let percent = u128::from(part.min(calls)) * 100 / u128::from(calls);
        u32::try_from(percent).unwrap_or(100)
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use breakwater_api::CircuitBreakerPolicy;
    use k8s_openapi::api::core::v1::Service;
    use serde_json::json;

    use super::*;

    const S: i64 = 1_000_000;
    /// 2026-11-22T05:45:20Z, in microseconds.
    const SINCE: i64 = 1_795_326_320 * S;

    fn breaker(slow: bool) -> Breaker {
        let mut section = json!({
            "failureRateThreshold": 50, "slidingWindow": {"type": "Count", "size": 100},
            "minimumCalls": 20, "openDuration": "30s", "halfOpenCalls": 3,
        });
        if slow {
            section["slowCall"] = json!({"duration": "2s", "rateThreshold": 80});
        }
        serde_json::from_value(section).expect("a breaker section")
    }

    fn target(service: &str, port: u16, slow: bool) -> Target {
        let service = ObjectName::new("shop", service);
        Target {
            id: Target::id(&service, port),
            service,
            port,
            policy: ObjectName::new("shop", "payments"),
            breaker: breaker(slow),
        }
    }

    fn state(state: State, calls: u64, failures: u64, slow: u64) -> BreakerState {
        BreakerState {
            state,
            since_us: SINCE + 700_000,
            generation: 1,
            calls,
            failures,
            slow,
            ..Default::default()
        }
    }

    fn said(report: &Report) -> (Status, &'static str, &str) {
        (report.tripped.status, report.tripped.reason, report.tripped.message.as_str())
    }

    #[test]
    fn a_breaker_shows_its_state_rates_and_transition_time() {
        let targets = [target("payments", 8080, true)];
        let read = [Some(state(State::Closed, 40, 10, 7))];
        let report = report(&targets, Observation::Read(&read));
        let shown = &report.breakers[0];
        assert_eq!(
            (shown.service.as_str(), shown.port, shown.state),
            ("shop/payments", 8080, ShownState::Closed)
        );
        assert_eq!((shown.failure_rate, shown.slow_call_rate, shown.calls), (Some(25), Some(17), 40));
        assert_eq!(shown.last_transition_time, Some(time(SINCE)), "whole seconds of Redis's clock");
        // OPEN (and HALF_OPEN) reads the totals of the window that opened it.
        let open = super::shown(&targets[0], &state(State::Open, 40, 22, 3));
        assert_eq!(
            (open.state, open.failure_rate, open.slow_call_rate, open.calls),
            (ShownState::Open, Some(55), Some(7), 40)
        );
        assert_eq!(
            said(&report),
            (Status::False, tripped::CLOSED, "the breaker of Service shop/payments port 8080 is CLOSED")
        );
        let json = serde_json::to_value(shown).expect("serializes");
        assert_eq!(
            json,
            json!({"service": "shop/payments", "port": 8080, "state": "Closed", "failureRate": 25,
                   "slowCallRate": 17, "calls": 40, "lastTransitionTime": "2026-11-22T05:45:20Z"})
        );
    }

    #[test]
    fn an_empty_window_has_no_rates_and_a_breaker_never_written_is_closed() {
        let targets = [target("payments", 8080, true), target("ledger", 80, false)];
        let read = [None, Some(state(State::Closed, 9, 3, 3))];
        let report = report(&targets, Observation::Read(&read));
        let [ledger, payments] = &report.breakers[..] else { panic!("{:?}", report.breakers) };
        assert_eq!(
            (payments.state, payments.failure_rate, payments.slow_call_rate),
            (ShownState::Closed, None, None)
        );
        assert_eq!((payments.calls, payments.last_transition_time.clone()), (0, None), "never moved");
        assert_eq!((ledger.failure_rate, ledger.slow_call_rate), (Some(33), None), "no slowCall rule");
        assert_eq!(said(&report), (Status::False, tripped::CLOSED, "all 2 breakers are CLOSED"));
    }

    #[test]
    fn rates_round_down_so_a_shown_threshold_has_been_reached() {
        assert_eq!(percent(2, 3), Some(66));
        assert_eq!(percent(1, 2), Some(50));
        assert_eq!(percent(0, 0), None);
        assert_eq!(percent(9, 3), Some(100), "never above 100");
        assert_eq!(percent(u64::MAX, u64::MAX), Some(100));
    }

    #[test]
    fn tripped_names_open_then_half_open_breakers() {
        let targets: Vec<Target> = (1..=8).map(|n| target(&format!("s{n}"), 80, false)).collect();
        let mut read = vec![Some(state(State::Closed, 0, 0, 0)); 8];
        read[2] = Some(state(State::HalfOpen, 0, 0, 0));
        let half = report(&targets, Observation::Read(&read));
        assert_eq!(
            said(&half),
            (
                Status::True,
                tripped::HALF_OPEN,
                "1 of 8 breakers is HALF_OPEN, admitting probe calls only: shop/s3:80"
            )
        );
        for n in [0, 1, 4, 5, 6, 7] {
            read[n] = Some(state(State::Open, 0, 0, 0));
        }
        let open = report(&targets, Observation::Read(&read));
        assert_eq!(
            said(&open),
            (
                Status::True,
                tripped::OPEN,
                "6 of 8 breakers are OPEN, answered 503 by every caller: shop/s1:80, shop/s2:80, shop/s5:80, \
                 shop/s6:80, shop/s7:80 and 1 more; 1 HALF_OPEN: shop/s3:80"
            )
        );
        let one = report(&targets[..1], Observation::Read(&read[..1]));
        assert_eq!(one.tripped.message, "the breaker is OPEN, answered 503 by every caller: shop/s1:80");
    }

    #[test]
    fn without_a_read_the_breakers_are_left_out_and_tripped_says_why() {
        let targets = [target("payments", 8080, false)];
        let none = report(&targets, Observation::NoStore);
        assert!(none.breakers.is_empty());
        assert_eq!((none.tripped.status, none.tripped.reason), (Status::Unknown, "NoStore"));
        assert!(none.tripped.message.contains("--redis-url"), "{}", none.tripped.message);
        let down = report(&targets, Observation::Unavailable("timed out"));
        assert!(down.breakers.is_empty());
        assert_eq!(
            said(&down),
            (Status::Unknown, "StoreUnavailable", "cannot read the breakers from Redis: timed out")
        );
        let nowhere = report(&[], Observation::NoStore);
        assert_eq!(
            said(&nowhere),
            (Status::False, "NotInEffect", "no Service port takes its breaker section from this policy")
        );
    }

    fn service(name: &str, ports: serde_json::Value, external: bool) -> Arc<Service> {
        let mut spec = json!({"ports": ports});
        if external {
            spec["type"] = json!("ExternalName");
            spec["externalName"] = json!("example.com");
        }
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "shop"}, "spec": spec}))
                .expect("a Service"),
        )
    }

    fn policy(name: &str, spec: serde_json::Value) -> Arc<CircuitBreakerPolicy> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "breakwater.dev/v1alpha1", "kind": "CircuitBreakerPolicy",
                "metadata": {"name": name, "namespace": "shop"}, "spec": spec,
            }))
            .expect("a CircuitBreakerPolicy"),
        )
    }

    #[test]
    fn the_breakers_are_the_tcp_ports_whose_effective_section_a_policy_supplies() {
        let mut inventory = Inventory::new("breakwater-system");
        inventory.add_service(service(
            "payments",
            json!([{"name": "http", "port": 8080}, {"port": 9090}, {"name": "dns", "port": 53, "protocol": "UDP"}]),
            false,
        ));
        inventory.add_service(service("api", json!([{"name": "http", "port": 80}]), false));
        inventory.add_service(service("outside", json!([{"name": "http", "port": 443}]), true));
        let section = serde_json::to_value(breaker(false)).expect("JSON");
        let targeting = |names: &[&str]| {
            json!(names.iter().map(|n| json!({"kind": "Service", "name": n})).collect::<Vec<_>>())
        };
        inventory.circuit_breakers.push(policy(
            "payments",
            json!({"targetRefs": targeting(&["payments", "outside"]), "breaker": section}),
        ));
        inventory
            .circuit_breakers
            .push(policy("api", json!({"targetRefs": targeting(&["api"]), "timeout": "1s"})));

        let all = breakers(&inventory);
        assert_eq!(all.keys().collect::<Vec<_>>(), ["shop/payments:8080", "shop/payments:9090"]);
        let payments = targets(&ObjectName::new("shop", "payments"), &inventory);
        assert_eq!(
            payments.iter().map(|t| (t.service.name.as_str(), t.port)).collect::<Vec<_>>(),
            [("payments", 8080), ("payments", 9090)]
        );
        assert!(targets(&ObjectName::new("shop", "api"), &inventory).is_empty(), "no breaker section");
    }
}
