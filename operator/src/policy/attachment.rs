//! Where a Service policy applies: its `targetRefs` in its own namespace, or, for a policy in
//! the root namespace, every Service its namespace and Service selectors match.

use std::collections::{BTreeMap, BTreeSet};

use breakwater_api::{Attachment, Mode};
use kube::ResourceExt;

use super::{Verdict, count_of, join_names, reason};
use crate::{
    inventory::{Inventory, ObjectName, ServicePort},
    selector,
};

/// How a policy attaches, once its attachment has been checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A namespace's own policy, on its targetRefs.
    Namespace,
    /// A root-namespace policy with a selector.
    Root(Mode),
}

/// Checks the rules CEL cannot: selectors and `mode` belong to the root namespace only, and
/// selector expressions must be well formed.
pub fn check(spec: &impl Attachment, namespace: &str, inventory: &Inventory) -> Result<Role, Verdict> {
    let Some(namespaces) = spec.namespace_selector() else {
        return Ok(Role::Namespace);
    };
    if namespace != inventory.root_namespace {
        return Err(Verdict::fail(
            reason::ROOT_NAMESPACE_ONLY,
            format!(
                "namespaceSelector and mode are reserved for the root namespace {:?}; in namespace {namespace:?} use targetRefs",
                inventory.root_namespace
            ),
        ));
    }
    for (field, sel) in
        [("namespaceSelector", Some(namespaces)), ("serviceSelector", spec.service_selector())]
    {
        if let Some(sel) = sel {
            selector::check(sel)
                .map_err(|err| Verdict::fail(reason::INVALID_SELECTOR, format!("spec.{field}.{err}")))?;
        }
    }
    Ok(Role::Root(spec.mode().unwrap_or_default()))
}

/// How much of the inventory an evaluation looks at. One policy's status needs only the
/// Service ports it reaches, and a namespace's ports are reached by the policies of that
/// namespace and of the root namespace alone (targetRefs never leave their namespace): so
/// its evaluation costs what that namespace holds, not every policy and Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Within<'a> {
    Everywhere,
    /// The Service ports of this namespace, and the policies that can reach them.
    Namespace(&'a str),
}

impl Within<'_> {
    /// Whether a policy in `namespace` can reach a port in scope.
    pub fn may_reach(&self, namespace: &str, inventory: &Inventory) -> bool {
        match self {
            Self::Everywhere => true,
            Self::Namespace(within) => namespace == *within || namespace == inventory.root_namespace,
        }
    }

    /// The scope that holds every port of a policy in `namespace`: a root-namespace policy
    /// may select any namespace.
    pub fn of_policy<'a>(namespace: &'a str, inventory: &Inventory) -> Within<'a> {
        if namespace == inventory.root_namespace { Within::Everywhere } else { Within::Namespace(namespace) }
    }
}

/// The Service ports a policy reaches, and what could not be resolved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolution {
    pub ports: BTreeSet<ServicePort>,
    /// ResolvedRefs: True with a summary, or False naming the first missing references.
    pub verdict: Option<Verdict>,
}

/// Resolves the Service ports of a policy whose attachment passed [`check`].
pub fn resolve(spec: &impl Attachment, namespace: &str, role: Role, inventory: &Inventory) -> Resolution {
    resolve_within(spec, namespace, role, inventory, Within::Everywhere)
}

/// [`resolve`], keeping only the ports `within` holds (the verdict then counts only those).
pub fn resolve_within(
    spec: &impl Attachment,
    namespace: &str,
    role: Role,
    inventory: &Inventory,
    within: Within<'_>,
) -> Resolution {
    match (role, within) {
        (Role::Namespace, Within::Namespace(other)) if other != namespace => Resolution::default(),
        (Role::Namespace, _) => resolve_refs(spec, namespace, inventory),
        (Role::Root(_), _) => resolve_selectors(spec, inventory, within),
    }
}

fn resolve_refs(spec: &impl Attachment, namespace: &str, inventory: &Inventory) -> Resolution {
    let mut ports = BTreeSet::new();
    let mut missing_services = Vec::new();
    let mut missing_sections = Vec::new();
    for target in spec.target_refs() {
        let service = ObjectName::new(namespace, &target.name);
        let Some(service_ports) = inventory.service_ports(&service) else {
            missing_services.push(format!("Service {service}"));
            continue;
        };
        match &target.section_name {
            Some(section) if service_ports.contains(section) => {
                ports.insert(ServicePort { service, port: section.clone() });
            }
            Some(section) => missing_sections.push(format!(
                "port {section:?} of Service {service} (it has {})",
                if service_ports.is_empty() { "no ports".to_string() } else { join_names(service_ports) }
            )),
            None => ports
                .extend(service_ports.into_iter().map(|port| ServicePort { service: service.clone(), port })),
        }
    }
    let verdict = if !missing_services.is_empty() {
        Verdict::fail(reason::TARGET_NOT_FOUND, format!("{} not found", join_names(missing_services)))
    } else if !missing_sections.is_empty() {
        Verdict::fail(reason::SECTION_NOT_FOUND, format!("{} not found", join_names(missing_sections)))
    } else {
        Verdict::ok(
            reason::RESOLVED_REFS,
            format!("{} resolved", count_of(spec.target_refs().len(), "target")),
        )
    };
    Resolution { ports, verdict: Some(verdict) }
}

fn resolve_selectors(spec: &impl Attachment, inventory: &Inventory, within: Within<'_>) -> Resolution {
    let all = k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector::default();
    let ns_selector = spec.namespace_selector().unwrap_or(&all);
    let svc_selector = spec.service_selector().unwrap_or(&all);
    let no_labels = BTreeMap::new();
    let mut ports = BTreeSet::new();
    let mut services = 0;
    // Services are sorted by namespace: the namespace selector is matched once per namespace,
    // and the Services of a namespace it does not select are skipped without being visited,
    // so a root policy costs O(namespaces + the Services it selects), not O(Services).
    let mut next = match within {
        Within::Everywhere => inventory.services.keys().next().map(|service| service.namespace.clone()),
        Within::Namespace(namespace) => Some(namespace.to_string()),
    };
    while let Some(namespace) = next.take() {
        let labels = inventory.namespaces.get(&namespace).unwrap_or(&no_labels);
        let selected = selector::matches(ns_selector, labels);
        let of_namespace = inventory.services.range(ObjectName::new(namespace.as_str(), "")..);
        for (service, object) in of_namespace {
            if service.namespace != namespace {
                if within == Within::Everywhere {
                    next = Some(service.namespace.clone());
                }
                break;
            }
            if !selected {
                // The first Service of the next namespace: `namespace\0` is the least string
                // after `namespace`, so every later namespace sorts at or after it.
                if within == Within::Everywhere {
                    next = inventory
                        .services
                        .range(ObjectName::new(format!("{namespace}\0"), "")..)
                        .next()
                        .map(|(service, _)| service.namespace.clone());
                }
                break;
            }
            if !selector::matches(svc_selector, object.labels()) {
                continue;
            }
            services += 1;
            let service_ports = inventory.service_ports(service).unwrap_or_default();
            ports
                .extend(service_ports.into_iter().map(|port| ServicePort { service: service.clone(), port }));
        }
    }
    let verdict =
        Verdict::ok(reason::RESOLVED_REFS, format!("selectors match {}", count_of(services, "Service")));
    Resolution { ports, verdict: Some(verdict) }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use breakwater_api::{RateLimitPolicySpec, TargetRef, common::TargetKind, rate_limit::FailureMode};
    use k8s_openapi::{
        api::core::v1::{Service, ServicePort as K8sPort, ServiceSpec},
        apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
    };

    use super::*;

    fn service(ns: &str, name: &str, ports: &[(&str, i32)]) -> Arc<Service> {
        Arc::new(Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, p)| K8sPort {
                            name: (!n.is_empty()).then(|| n.to_string()),
                            port: *p,
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            status: None,
        })
    }

    fn spec_with_refs(refs: &[(&str, Option<&str>)]) -> RateLimitPolicySpec {
        RateLimitPolicySpec {
            target_refs: Some(
                refs.iter()
                    .map(|(name, section)| TargetRef {
                        group: String::new(),
                        kind: TargetKind::Service,
                        name: name.to_string(),
                        section_name: section.map(str::to_string),
                    })
                    .collect(),
            ),
            namespace_selector: None,
            service_selector: None,
            mode: None,
            limits: vec![],
            failure_mode: FailureMode::Open,
        }
    }

    fn inventory() -> Inventory {
        let mut inv = Inventory::new("breakwater-system");
        inv.add_service(service("shop", "api", &[("http", 80), ("", 9090)]));
        inv.add_service(service("shop", "db", &[("pg", 5432)]));
        inv.add_service(service("lab", "api", &[("http", 80)]));
        inv.add_namespace("lab".into(), [("tier".to_string(), "sandbox".to_string())].into());
        inv
    }

    #[test]
    fn target_without_section_covers_every_port() {
        let inv = inventory();
        let res = resolve(&spec_with_refs(&[("api", None)]), "shop", Role::Namespace, &inv);
        let ports: Vec<String> = res.ports.iter().map(|p| p.to_string()).collect();
        assert_eq!(ports, ["shop/api:9090", "shop/api:http"]);
        assert!(res.verdict.is_some_and(|v| v.ok));
    }

    #[test]
    fn missing_service_and_section_are_named() {
        let inv = inventory();
        let res =
            resolve(&spec_with_refs(&[("api", Some("grpc")), ("nope", None)]), "shop", Role::Namespace, &inv);
        let verdict = res.verdict.expect("verdict");
        assert_eq!(verdict.reason, reason::TARGET_NOT_FOUND);
        assert_eq!(verdict.message, "Service shop/nope not found");

        let res = resolve(&spec_with_refs(&[("api", Some("grpc"))]), "shop", Role::Namespace, &inv);
        let verdict = res.verdict.expect("verdict");
        assert_eq!(verdict.reason, reason::SECTION_NOT_FOUND);
        assert!(verdict.message.contains("it has http and 9090"), "{}", verdict.message);
    }

    #[test]
    fn selectors_only_in_root_namespace() {
        let inv = inventory();
        let mut spec = spec_with_refs(&[]);
        spec.target_refs = None;
        spec.namespace_selector = Some(LabelSelector::default());
        spec.mode = Some(Mode::Override);
        let err = check(&spec, "shop", &inv).expect_err("refused outside root");
        assert_eq!(err.reason, reason::ROOT_NAMESPACE_ONLY);
        assert_eq!(check(&spec, "breakwater-system", &inv), Ok(Role::Root(Mode::Override)));
    }

    #[test]
    fn selectors_visit_each_namespace_once_and_miss_none() {
        let mut inv = Inventory::new("breakwater-system");
        let prod = [("tier".to_string(), "production".to_string())];
        // Namespaces that are prefixes of one another, one selected between two that are
        // not, and one known only through its Services (no labels: not selected).
        for (ns, labelled) in [("lab", true), ("lab-a", false), ("lab2", true), ("m", false), ("z", true)] {
            inv.add_namespace(ns.into(), if labelled { prod.clone().into() } else { BTreeMap::new() });
            for name in ["a", "b"] {
                inv.add_service(service(ns, name, &[("http", 80)]));
            }
        }
        inv.services.insert(ObjectName::new("unlisted", "x"), service("unlisted", "x", &[("http", 80)]));
        let mut spec = spec_with_refs(&[]);
        spec.target_refs = None;
        spec.namespace_selector =
            Some(LabelSelector { match_labels: Some(prod.into()), ..Default::default() });
        let res = resolve(&spec, "breakwater-system", Role::Root(Mode::Default), &inv);
        let services: BTreeSet<String> = res.ports.iter().map(|p| p.service.to_string()).collect();
        let expected = ["lab/a", "lab/b", "lab2/a", "lab2/b", "z/a", "z/b"];
        assert_eq!(services.iter().map(String::as_str).collect::<Vec<_>>(), expected);
        assert_eq!(res.verdict.expect("verdict").message, "selectors match 6 Services");

        // An empty selector: every Service of every namespace, listed or not.
        spec.namespace_selector = Some(LabelSelector::default());
        let res = resolve(&spec, "breakwater-system", Role::Root(Mode::Default), &inv);
        assert_eq!(res.ports.len(), 11);
    }

    #[test]
    fn namespace_selector_picks_services_by_namespace_labels() {
        let inv = inventory();
        let mut spec = spec_with_refs(&[]);
        spec.target_refs = None;
        spec.namespace_selector = Some(LabelSelector {
            match_labels: Some([("tier".into(), "sandbox".into())].into()),
            ..Default::default()
        });
        let res = resolve(&spec, "breakwater-system", Role::Root(Mode::Default), &inv);
        let ports: Vec<String> = res.ports.iter().map(|p| p.to_string()).collect();
        assert_eq!(ports, ["lab/api:http"]);
    }
}
