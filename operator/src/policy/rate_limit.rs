//! RateLimitPolicy: validation beyond the schema, where each policy is in effect, and the
//! effective limits of each Service port. Limits only ever add up: a request must pass every
//! limit of its namespace's policies and of the root Override policies, so an application
//! team can tighten a platform floor but never loosen it. Root Default policies apply only
//! to ports that no namespace policy covers.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use breakwater_api::{
    RateLimitPolicy,
    rate_limit::{FailureMode, Limit},
};
use kube::ResourceExt;

use super::{
    Assessment, Verdict,
    attachment::{self, Resolution, Role, Within},
    count_of, precedence, reason,
};
use crate::inventory::{Inventory, ObjectName, ServicePort};

/// Where an effective limit comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    Namespace,
    RootOverride,
    RootDefault,
}

/// One limit enforced on one Service port.
#[derive(Clone, Debug, PartialEq)]
pub struct EffectiveLimit {
    pub policy: ObjectName,
    pub origin: Origin,
    /// Shared by every Service port the policy reaches (a root policy's limits land on
    /// thousands of them).
    pub limit: Arc<Limit>,
    pub failure_mode: FailureMode,
}

/// Checks what the schema cannot, then resolves where the policy applies.
fn attach(
    policy: &RateLimitPolicy,
    inventory: &Inventory,
    within: Within<'_>,
) -> Result<(Role, Resolution), Verdict> {
    for (index, limit) in policy.spec.limits.iter().enumerate() {
        limit
            .rate
            .per
            .to_std()
            .map_err(|err| Verdict::fail(reason::INVALID, format!("spec.limits[{index}].rate.per: {err}")))?;
    }
    // What Envoy cannot express as written is refused here, never dropped by the compiler.
    super::check::rate_limit_policy(&policy.spec).map_err(|m| Verdict::fail(reason::INVALID, m))?;
    let namespace = policy.namespace().unwrap_or_default();
    let role = attachment::check(&policy.spec, &namespace, inventory)?;
    Ok((role, attachment::resolve_within(&policy.spec, &namespace, role, inventory, within)))
}

/// The ports covered by namespace policies (which switch root Defaults off there).
fn namespace_covered(inventory: &Inventory) -> BTreeSet<ServicePort> {
    inventory
        .rate_limits
        .iter()
        .filter_map(|p| attach(p, inventory, Within::Everywhere).ok())
        .filter(|(role, _)| *role == Role::Namespace)
        .flat_map(|(_, resolution)| resolution.ports)
        .collect()
}

pub fn assess(policy: &RateLimitPolicy, inventory: &Inventory) -> Assessment {
    let (role, resolution) = match attach(policy, inventory, Within::Everywhere) {
        Ok(attached) => attached,
        Err(verdict) => return Assessment { accepted: verdict, resolved_refs: None, targets: Some(0) },
    };
    let all = resolution.ports.len();
    let (accepted, in_effect) = match role {
        Role::Root(breakwater_api::Mode::Default) => {
            let covered = namespace_covered(inventory);
            let in_effect = resolution.ports.iter().filter(|p| !covered.contains(p)).count();
            let verdict = if all > 0 && in_effect == 0 {
                Verdict::ok(
                    reason::SHADOWED,
                    format!("all {} selected set their own rate limits", count_of(all, "Service port")),
                )
            } else {
                Verdict::ok(
                    reason::ACCEPTED,
                    format!(
                        "default limits in effect on {in_effect} of {} selected",
                        count_of(all, "Service port")
                    ),
                )
            };
            (verdict, in_effect)
        }
        Role::Root(breakwater_api::Mode::Override) => (
            Verdict::ok(
                reason::ACCEPTED,
                format!("enforced on all {} selected", count_of(all, "Service port")),
            ),
            all,
        ),
        Role::Namespace => {
            (Verdict::ok(reason::ACCEPTED, format!("enforced on {}", count_of(all, "Service port"))), all)
        }
    };
    Assessment { accepted, resolved_refs: resolution.verdict, targets: Some(count(in_effect)) }
}

/// The limits each Service port enforces, in a stable order (origin, then precedence).
pub fn effective(inventory: &Inventory) -> BTreeMap<ServicePort, Vec<EffectiveLimit>> {
    effective_within(inventory, Within::Everywhere)
}

/// [`effective`], for the Service ports `within` only: the same limits for each of them,
/// at the cost of what can reach them.
pub fn effective_within(
    inventory: &Inventory,
    within: Within<'_>,
) -> BTreeMap<ServicePort, Vec<EffectiveLimit>> {
    let mut policies: Vec<_> = inventory
        .rate_limits
        .iter()
        .filter(|p| within.may_reach(p.metadata.namespace.as_deref().unwrap_or_default(), inventory))
        .collect();
    policies.sort_by(|a, b| precedence(a.as_ref(), b.as_ref()));
    let attached: Vec<_> =
        policies.iter().filter_map(|p| Some((p, attach(p, inventory, within).ok()?))).collect();

    let mut by_port: BTreeMap<ServicePort, Vec<EffectiveLimit>> = BTreeMap::new();
    for (policy, (role, resolution)) in &attached {
        let origin = match role {
            Role::Namespace => Origin::Namespace,
            Role::Root(breakwater_api::Mode::Override) => Origin::RootOverride,
            Role::Root(breakwater_api::Mode::Default) => Origin::RootDefault,
        };
        let name = ObjectName::of(policy.as_ref());
        let limits: Vec<Arc<Limit>> = policy.spec.limits.iter().cloned().map(Arc::new).collect();
        for port in &resolution.ports {
            by_port.entry(port.clone()).or_default().extend(limits.iter().map(|limit| EffectiveLimit {
                policy: name.clone(),
                origin,
                limit: limit.clone(),
                failure_mode: policy.spec.failure_mode,
            }));
        }
    }
    for limits in by_port.values_mut() {
        if limits.iter().any(|l| l.origin == Origin::Namespace) {
            limits.retain(|l| l.origin != Origin::RootDefault);
        }
        // Stable sort: precedence order is kept within each origin.
        limits.sort_by_key(|l| l.origin);
    }
    by_port
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
