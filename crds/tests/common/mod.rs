//! Helpers shared by the integration tests: the corpus of objects to validate (corpus.rs, which
//! the operator's real-API-server tests include too), their errors as text, and the CEL rules of
//! every CRD.

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

pub mod corpus;

use corpus::API_VERSION;

/// The CRD serving `kind`.
pub fn crd(kind: &str) -> &'static CustomResourceDefinition {
    breakwater_api::crd_for(API_VERSION, kind).unwrap_or_else(|| panic!("no CRD serves {API_VERSION} {kind}"))
}

/// The `openAPIV3Schema` of the CRD's only version, as JSON.
pub fn schema(crd: &CustomResourceDefinition) -> Value {
    let version = crd.spec.versions.first().expect("the CRD has a version");
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the version has a schema");
    serde_json::to_value(schema).expect("a schema serializes to JSON")
}

/// What `validate_object` says about an object, one line per error.
pub fn errors(object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().unwrap_or_default();
    breakwater_api::validate_object(crd(kind), object).iter().map(ToString::to_string).collect()
}

/// One CEL rule of a CRD and where it sits.
#[derive(Debug, Clone)]
pub struct RuleSite {
    pub kind: String,
    /// The schema path, with `[]` for list items: `spec.limits[].rate`.
    pub path: String,
    /// The `type` of the schema node the rule is on, which the API server prints.
    pub node_type: String,
    pub rule: String,
    pub message: String,
}

/// Every `x-kubernetes-validations` rule of every CRD.
pub fn rule_sites() -> Vec<RuleSite> {
    fn walk(kind: &str, node: &Value, path: &str, sites: &mut Vec<RuleSite>) {
        for rule in node.get("x-kubernetes-validations").and_then(Value::as_array).into_iter().flatten() {
            sites.push(RuleSite {
                kind: kind.to_owned(),
                path: path.to_owned(),
                node_type: node["type"].as_str().unwrap_or_default().to_owned(),
                rule: rule["rule"].as_str().unwrap_or_default().to_owned(),
                message: rule["message"].as_str().unwrap_or_default().to_owned(),
            });
        }
        for (key, child) in node.get("properties").and_then(Value::as_object).into_iter().flatten() {
            let child_path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
            walk(kind, child, &child_path, sites);
        }
        if let Some(items) = node.get("items") {
            walk(kind, items, &format!("{path}[]"), sites);
        }
        if let Some(values) = node.get("additionalProperties").filter(|a| a.is_object()) {
            walk(kind, values, &format!("{path}.*"), sites);
        }
    }
    let mut sites = Vec::new();
    for crd in breakwater_api::crds() {
        walk(&crd.spec.names.kind, &schema(&crd), "", &mut sites);
    }
    sites
}
