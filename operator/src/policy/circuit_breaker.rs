//! CircuitBreakerPolicy: validation beyond the schema, conflicts, and the effective policy of
//! each Service port. Sections (connectionLimits, outlierDetection, retry, timeout, breaker)
//! merge whole: a root Override section replaces the namespace's, a root Default section
//! fills one the namespace leaves unset. Two namespace policies on one port conflict; the
//! older keeps it.

use std::collections::{BTreeMap, BTreeSet};

use breakwater_api::{CircuitBreakerPolicy, CircuitBreakerPolicySpec, Mode, circuit_breaker::WindowKind};
use kube::ResourceExt;

use super::{
    Assessment, Verdict,
    attachment::{self, Resolution, Role, Within},
    count_of, join_names, precedence, reason,
};
use crate::inventory::{Inventory, ObjectName, ServicePort};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Section {
    ConnectionLimits,
    OutlierDetection,
    Retry,
    Timeout,
    Breaker,
}

impl Section {
    pub const ALL: [Section; 5] =
        [Self::ConnectionLimits, Self::OutlierDetection, Self::Retry, Self::Timeout, Self::Breaker];

    pub fn field(self) -> &'static str {
        match self {
            Self::ConnectionLimits => "connectionLimits",
            Self::OutlierDetection => "outlierDetection",
            Self::Retry => "retry",
            Self::Timeout => "timeout",
            Self::Breaker => "breaker",
        }
    }

    fn is_set(self, spec: &CircuitBreakerPolicySpec) -> bool {
        match self {
            Self::ConnectionLimits => spec.connection_limits.is_some(),
            Self::OutlierDetection => spec.outlier_detection.is_some(),
            Self::Retry => spec.retry.is_some(),
            Self::Timeout => spec.timeout.is_some(),
            Self::Breaker => spec.breaker.is_some(),
        }
    }

    /// Copies this section from `from` into `into`.
    fn copy(self, from: &CircuitBreakerPolicySpec, into: &mut CircuitBreakerPolicySpec) {
        match self {
            Self::ConnectionLimits => into.connection_limits.clone_from(&from.connection_limits),
            Self::OutlierDetection => into.outlier_detection.clone_from(&from.outlier_detection),
            Self::Retry => into.retry.clone_from(&from.retry),
            Self::Timeout => into.timeout.clone_from(&from.timeout),
            Self::Breaker => into.breaker.clone_from(&from.breaker),
        }
    }
}

/// The merged caller-side policy of one Service port, and which policy each section came from.
#[derive(Clone, Debug, PartialEq)]
pub struct EffectiveCircuitBreaker {
    /// Only the sections are meaningful; the attachment fields are empty.
    pub spec: CircuitBreakerPolicySpec,
    pub sources: BTreeMap<Section, ObjectName>,
}

/// Semantic checks the schema and CEL cannot make.
fn validate(spec: &CircuitBreakerPolicySpec) -> Result<(), Verdict> {
    // What Envoy cannot express as written is refused here, never dropped by the compiler.
    super::check::circuit_breaker_policy(spec).map_err(|m| Verdict::fail(reason::INVALID, m))?;
    let durations = [
        ("timeout", spec.timeout.as_ref()),
        ("retry.perTryTimeout", spec.retry.as_ref().and_then(|r| r.per_try_timeout.as_ref())),
        ("outlierDetection.interval", spec.outlier_detection.as_ref().and_then(|o| o.interval.as_ref())),
        (
            "outlierDetection.baseEjectionTime",
            spec.outlier_detection.as_ref().and_then(|o| o.base_ejection_time.as_ref()),
        ),
        ("breaker.openDuration", spec.breaker.as_ref().map(|b| &b.open_duration)),
        (
            "breaker.slidingWindow.duration",
            spec.breaker.as_ref().and_then(|b| b.sliding_window.duration.as_ref()),
        ),
        (
            "breaker.slowCall.duration",
            spec.breaker.as_ref().and_then(|b| b.slow_call.as_ref()).map(|s| &s.duration),
        ),
    ];
    for (field, duration) in durations {
        if let Some(Err(err)) = duration.map(|d| d.to_std()) {
            return Err(Verdict::fail(reason::INVALID, format!("spec.{field}: {err}")));
        }
    }
    if let Some(breaker) = &spec.breaker
        && breaker.sliding_window.kind == WindowKind::Count
        && let (Some(minimum), Some(size)) = (breaker.minimum_calls, breaker.sliding_window.size)
        && minimum > size
    {
        return Err(Verdict::fail(
            reason::INVALID,
            format!(
                "spec.breaker.minimumCalls ({minimum}) exceeds slidingWindow.size ({size}): the breaker could never trip"
            ),
        ));
    }
    Ok(())
}

fn attach(
    policy: &CircuitBreakerPolicy,
    inventory: &Inventory,
    within: Within<'_>,
) -> Result<(Role, Resolution), Verdict> {
    validate(&policy.spec)?;
    let namespace = policy.namespace().unwrap_or_default();
    let role = attachment::check(&policy.spec, &namespace, inventory)?;
    Ok((role, attachment::resolve_within(&policy.spec, &namespace, role, inventory, within)))
}

/// Every valid policy that can reach a port `within`, with the ports it reaches there, in
/// precedence order (oldest first).
fn attached<'a>(
    inventory: &'a Inventory,
    within: Within<'_>,
) -> Vec<(&'a CircuitBreakerPolicy, Role, Resolution)> {
    let mut policies: Vec<&CircuitBreakerPolicy> = inventory
        .circuit_breakers
        .iter()
        .map(AsRef::as_ref)
        .filter(|p| within.may_reach(p.metadata.namespace.as_deref().unwrap_or_default(), inventory))
        .collect();
    policies.sort_by(|a, b| precedence(*a, *b));
    policies
        .into_iter()
        .filter_map(|p| attach(p, inventory, within).ok().map(|(role, res)| (p, role, res)))
        .collect()
}

pub fn assess(policy: &CircuitBreakerPolicy, inventory: &Inventory) -> Assessment {
    let (role, resolution) = match attach(policy, inventory, Within::Everywhere) {
        Ok(attached) => attached,
        Err(verdict) => return Assessment { accepted: verdict, resolved_refs: None, targets: Some(0) },
    };
    let ports = resolution.ports.len();
    let accepted = match role {
        Role::Root(_) => Verdict::ok(
            reason::ACCEPTED,
            format!("applies to {} selected by namespaceSelector", count_of(ports, "Service port")),
        ),
        Role::Namespace => {
            // Its ports are in its namespace: only that namespace's policies and the root
            // namespace's can share one with it.
            let namespace = policy.namespace().unwrap_or_default();
            let others = attached(inventory, Within::Namespace(&namespace));
            if let Some((winner, port)) = older_on_same_port(policy, &resolution.ports, &others) {
                return Assessment {
                    accepted: Verdict::fail(
                        reason::CONFLICTED,
                        format!(
                            "Service port {port} is already configured by the older CircuitBreakerPolicy {winner}; merge the two or target different ports"
                        ),
                    ),
                    resolved_refs: resolution.verdict,
                    targets: Some(0),
                };
            }
            overridden(policy, &resolution.ports, &others).unwrap_or_else(|| {
                Verdict::ok(reason::ACCEPTED, format!("applies to {}", count_of(ports, "Service port")))
            })
        }
    };
    Assessment {
        accepted,
        resolved_refs: resolution.verdict,
        targets: Some(u32::try_from(ports).unwrap_or(u32::MAX)),
    }
}

fn older_on_same_port<'a>(
    policy: &CircuitBreakerPolicy,
    ports: &BTreeSet<ServicePort>,
    others: &'a [(&'a CircuitBreakerPolicy, Role, Resolution)],
) -> Option<(ObjectName, ServicePort)> {
    others
        .iter()
        .filter(|(other, role, _)| *role == Role::Namespace && precedence(*other, policy).is_lt())
        .find_map(|(other, _, res)| {
            res.ports.intersection(ports).next().map(|port| (ObjectName::of(*other), port.clone()))
        })
}

/// Accepted/Overridden: the sections of this policy that root Override policies replace.
fn overridden(
    policy: &CircuitBreakerPolicy,
    ports: &BTreeSet<ServicePort>,
    others: &[(&CircuitBreakerPolicy, Role, Resolution)],
) -> Option<Verdict> {
    let mut replaced = BTreeSet::new();
    let mut by = BTreeSet::new();
    for (other, role, res) in others {
        if *role != Role::Root(Mode::Override) || res.ports.is_disjoint(ports) {
            continue;
        }
        for section in Section::ALL {
            if section.is_set(&policy.spec) && section.is_set(&other.spec) {
                replaced.insert(section.field().to_string());
                by.insert(ObjectName::of(*other).to_string());
            }
        }
    }
    (!replaced.is_empty()).then(|| {
        Verdict::ok(
            reason::OVERRIDDEN,
            format!("{} overridden by root policy {}", join_names(replaced), join_names(by)),
        )
    })
}

/// The effective policy of each Service port any valid, unconflicted policy reaches.
pub fn effective(inventory: &Inventory) -> BTreeMap<ServicePort, EffectiveCircuitBreaker> {
    effective_within(inventory, Within::Everywhere)
}

/// [`effective`], for the Service ports `within` only: the same policy for each of them,
/// at the cost of what can reach them.
pub fn effective_within(
    inventory: &Inventory,
    within: Within<'_>,
) -> BTreeMap<ServicePort, EffectiveCircuitBreaker> {
    let policies = attached(inventory, within);
    let mut merged: BTreeMap<ServicePort, EffectiveCircuitBreaker> = BTreeMap::new();
    // Lowest precedence first, so each later layer may replace: Defaults (oldest first, each
    // only filling gaps, so the oldest wins), then the namespace's own policy, then Overrides
    // (newest first, each replacing, so the oldest wins).
    let mut layers: Vec<&(&CircuitBreakerPolicy, Role, Resolution)> = Vec::new();
    layers.extend(policies.iter().filter(|(_, role, _)| *role == Role::Root(Mode::Default)));
    let mut claimed = BTreeSet::new();
    for entry in policies.iter().filter(|(_, role, _)| *role == Role::Namespace) {
        // Only the oldest namespace policy on a port counts; a later one is Conflicted.
        if entry.2.ports.is_disjoint(&claimed) {
            claimed.extend(entry.2.ports.iter().cloned());
            layers.push(entry);
        }
    }
    layers.extend(policies.iter().rev().filter(|(_, role, _)| *role == Role::Root(Mode::Override)));

    for (policy, role, resolution) in layers {
        for port in &resolution.ports {
            let entry = merged
                .entry(port.clone())
                .or_insert_with(|| EffectiveCircuitBreaker { spec: empty_spec(), sources: BTreeMap::new() });
            for section in Section::ALL.into_iter().filter(|s| s.is_set(&policy.spec)) {
                let fills_gap = !section.is_set(&entry.spec);
                if *role != Role::Root(Mode::Default) || fills_gap {
                    section.copy(&policy.spec, &mut entry.spec);
                    entry.sources.insert(section, ObjectName::of(*policy));
                }
            }
        }
    }
    merged
}

/// A spec with no attachment and no sections: the start of every merge.
pub fn empty_spec() -> CircuitBreakerPolicySpec {
    CircuitBreakerPolicySpec {
        target_refs: None,
        namespace_selector: None,
        service_selector: None,
        mode: None,
        connection_limits: None,
        outlier_detection: None,
        retry: None,
        timeout: None,
        breaker: None,
    }
}
