//! The CRDs must be what the API server accepts and what users can work with: structural
//! schemas (or the API server refuses the CRD), printer columns that point at real fields,
//! descriptions for `kubectl explain`, and names that don't collide.

mod common;

use std::collections::BTreeSet;

use common::schema;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

/// Keys that make a schema non-structural wherever they appear.
const FORBIDDEN_KEYS: &[&str] =
    &["$ref", "$schema", "definitions", "$defs", "patternProperties", "dependencies"];
/// Logical junctors: allowed only as value validations on top of a typed node.
const JUNCTORS: &[&str] = &["anyOf", "oneOf", "allOf", "not"];
/// What a node inside a junctor may not carry.
const FORBIDDEN_IN_JUNCTORS: &[&str] =
    &["type", "description", "default", "nullable", "additionalProperties", "title"];

fn for_each_crd(mut check: impl FnMut(&CustomResourceDefinition, &Value) -> Vec<String>) {
    let mut problems = Vec::new();
    for crd in breakwater_api::crds() {
        for problem in check(&crd, &schema(&crd)) {
            problems.push(format!("{}: {problem}", crd.spec.names.kind));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn child_path(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

/// The children of a node that are themselves schema nodes, with their paths.
fn children<'a>(node: &'a Value, path: &str) -> Vec<(String, &'a Value)> {
    let mut children = Vec::new();
    for (key, child) in node.get("properties").and_then(Value::as_object).into_iter().flatten() {
        children.push((child_path(path, key), child));
    }
    if let Some(items) = node.get("items") {
        children.push((format!("{path}[]"), items));
    }
    if let Some(values) = node.get("additionalProperties").filter(|a| a.is_object()) {
        children.push((format!("{path}.*"), values));
    }
    children
}

fn json_type_matches(value: &Value, node: &Value) -> bool {
    match (node.get("type").and_then(Value::as_str), value) {
        (_, Value::Null) => node.get("nullable") == Some(&Value::Bool(true)),
        (Some("string"), Value::String(_)) | (Some("boolean"), Value::Bool(_)) => true,
        (Some("integer"), Value::Number(n)) => n.is_i64() || n.is_u64(),
        (Some("number"), Value::Number(_)) => true,
        (Some("array"), Value::Array(_)) | (Some("object"), Value::Object(_)) => true,
        (None, _) => true,
        _ => false,
    }
}

/// Why a default would be refused: the API server requires a default to be valid for its
/// node, and to survive pruning unchanged.
fn default_problems(default: &Value, node: &Value, path: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if !json_type_matches(default, node) {
        problems.push(format!("{path}: default {default} does not have type {}", node["type"]));
        return problems;
    }
    if let Some(allowed) = node.get("enum").and_then(Value::as_array)
        && !allowed.contains(default)
    {
        problems.push(format!("{path}: default {default} is not one of the enum values"));
    }
    match default {
        Value::Object(fields) => {
            for key in node.get("required").and_then(Value::as_array).into_iter().flatten() {
                if key.as_str().is_some_and(|k| !fields.contains_key(k)) {
                    problems.push(format!("{path}: default lacks required field {key}"));
                }
            }
            for (key, value) in fields {
                match node.get("properties").and_then(|p| p.get(key)) {
                    Some(property) => {
                        problems.extend(default_problems(value, property, &child_path(path, key)))
                    }
                    None => problems.push(format!("{path}: default sets {key}, which the schema prunes")),
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = node.get("items") {
                for item in items {
                    problems.extend(default_problems(item, item_schema, &format!("{path}[]")));
                }
            }
        }
        _ => {}
    }
    problems
}

/// The rules of https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema
fn structural_problems(node: &Value, path: &str, in_junctor: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let at = if path.is_empty() { "<root>" } else { path };
    let has = |key: &str| node.get(key).is_some();
    let is_true = |key: &str| node.get(key) == Some(&Value::Bool(true));

    for key in FORBIDDEN_KEYS {
        if has(key) {
            problems.push(format!("{at}: {key} is not allowed in a structural schema"));
        }
    }
    if in_junctor {
        for key in FORBIDDEN_IN_JUNCTORS {
            if has(key) {
                problems.push(format!("{at}: {key} is not allowed inside anyOf/oneOf/allOf/not"));
            }
        }
        if node.as_object().is_some_and(|o| o.keys().any(|k| k.starts_with("x-kubernetes-"))) {
            problems.push(format!(
                "{at}: x-kubernetes-* extensions are not allowed inside anyOf/oneOf/allOf/not"
            ));
        }
    } else if !has("type")
        && !is_true("x-kubernetes-int-or-string")
        && !is_true("x-kubernetes-preserve-unknown-fields")
    {
        problems.push(format!(
            "{at}: no type (and neither x-kubernetes-int-or-string nor preserve-unknown-fields)"
        ));
    }
    if has("properties") && has("additionalProperties") {
        problems.push(format!("{at}: properties and additionalProperties are mutually exclusive"));
    }
    if node.get("additionalProperties") == Some(&Value::Bool(false)) {
        problems.push(format!("{at}: additionalProperties: false is not allowed"));
    }
    if is_true("uniqueItems") {
        problems.push(format!("{at}: uniqueItems: true is not allowed; use x-kubernetes-list-type: set"));
    }
    if node.get("items").is_some_and(Value::is_array) {
        problems.push(format!("{at}: items must be one schema, not a list"));
    }
    if let Some(ty) = node.get("type").and_then(Value::as_str) {
        if !["string", "integer", "number", "boolean", "object", "array"].contains(&ty) {
            problems.push(format!("{at}: unknown type {ty}"));
        }
        if ty == "array" && !has("items") {
            problems.push(format!("{at}: an array needs items"));
        }
    }
    if let Some(default) = node.get("default") {
        problems.extend(default_problems(default, node, at));
    }
    if let Some(allowed) = node.get("enum").and_then(Value::as_array) {
        for value in allowed {
            if !json_type_matches(value, node) {
                problems.push(format!("{at}: enum value {value} does not have the node's type"));
            }
        }
    }
    if node.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
        let items = &node["items"];
        let required: Vec<&str> = items
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let keys =
            node.get("x-kubernetes-list-map-keys").and_then(Value::as_array).cloned().unwrap_or_default();
        if keys.is_empty() {
            problems.push(format!("{at}: a list of type map needs x-kubernetes-list-map-keys"));
        }
        for key in keys.iter().filter_map(Value::as_str) {
            match items.get("properties").and_then(|p| p.get(key)) {
                None => problems.push(format!("{at}: list map key {key} is not a field of the items")),
                Some(field) => {
                    if !required.contains(&key) && field.get("default").is_none() {
                        problems.push(format!("{at}: list map key {key} must be required or defaulted"));
                    }
                    if field["type"].as_str().is_none_or(|t| t == "object" || t == "array") {
                        problems.push(format!("{at}: list map key {key} must be a scalar"));
                    }
                }
            }
        }
    }

    for junctor in JUNCTORS {
        let branches: Vec<&Value> = match node.get(*junctor) {
            Some(Value::Array(branches)) => branches.iter().collect(),
            Some(branch) => vec![branch],
            None => continue,
        };
        for branch in branches {
            problems.extend(structural_problems(branch, &format!("{at}.{junctor}"), true));
        }
    }
    for (child_path, child) in children(node, path) {
        problems.extend(structural_problems(child, &child_path, in_junctor));
    }
    problems
}

#[test]
fn schemas_are_structural() {
    for_each_crd(|_, schema| {
        let mut problems = structural_problems(schema, "", false);
        if schema["type"] != "object" {
            problems.push("<root>: the root must have type object".to_owned());
        }
        // The API server owns metadata: a schema may only restrict metadata.name and generateName.
        if let Some(metadata) = schema.pointer("/properties/metadata") {
            let fields: BTreeSet<&str> = metadata
                .get("properties")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(k, _)| k.as_str())
                .collect();
            if !fields.is_subset(&BTreeSet::from(["name", "generateName"]))
                || metadata.get("default").is_some()
            {
                problems.push("metadata: only name and generateName may be restricted".to_owned());
            }
        }
        problems
    });
}

/// The schema keywords `breakwater_api::validate_object` checks (or, like `description`, need
/// no check). A schema using another keyword would be enforced by the API server but not by
/// standalone mode: teach validation.rs the keyword first.
const KEYWORDS_VALIDATION_KNOWS: &[&str] = &[
    "type",
    "description",
    "title",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "nullable",
    "default",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "format",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
];
/// Formats validation.rs does not check: the API server ignores uint32 and uint64, JSON
/// integers are int64, and date-time appears only in status, which a create drops.
const FORMATS_VALIDATION_IGNORES: &[&str] = &["int32", "int64", "uint32", "uint64", "date-time"];

#[test]
fn schemas_use_only_keywords_client_side_validation_checks() {
    fn unknown_keywords(node: &Value, path: &str, found: &mut Vec<String>) {
        for (key, value) in node.as_object().into_iter().flatten() {
            if !KEYWORDS_VALIDATION_KNOWS.contains(&key.as_str()) {
                found.push(format!("{path}: {key}"));
            }
            if key == "format" && !value.as_str().is_some_and(|f| FORMATS_VALIDATION_IGNORES.contains(&f)) {
                found.push(format!("{path}: format {value}"));
            }
            if key == "format" && value == "date-time" && !path.starts_with("status") {
                found.push(format!("{path}: date-time outside status is not checked client-side"));
            }
        }
        for (child_path, child) in children(node, path) {
            unknown_keywords(child, &child_path, found);
        }
    }
    for_each_crd(|_, schema| {
        let mut found = Vec::new();
        unknown_keywords(schema, "", &mut found);
        found
    });
}

#[test]
fn every_field_is_described() {
    // List items and map values are described by their field; every field needs a description
    // of its own, for `kubectl explain`.
    fn undescribed(node: &Value, path: &str, is_field: bool, found: &mut Vec<String>) {
        let description = node.get("description").and_then(Value::as_str).unwrap_or_default().trim();
        if is_field && description.is_empty() {
            found.push(format!("{path} has no description"));
        }
        if description.starts_with("Auto-generated derived type") {
            found.push(format!("{} has kube's placeholder description; set `doc` in #[kube(...)]", path));
        }
        for (key, child) in node.get("properties").and_then(Value::as_object).into_iter().flatten() {
            undescribed(child, &child_path(path, key), true, found);
        }
        if let Some(items) = node.get("items") {
            undescribed(items, &format!("{path}[]"), false, found);
        }
        if let Some(values) = node.get("additionalProperties").filter(|a| a.is_object()) {
            undescribed(values, &format!("{path}.*"), false, found);
        }
    }
    for_each_crd(|_, schema| {
        let mut found = Vec::new();
        undescribed(schema, "<root>", true, &mut found);
        found
    });
}

/// The fields of ObjectMeta that printer columns commonly show; the schema does not declare
/// metadata.
const METADATA_FIELDS: &[(&str, &str)] = &[
    ("name", "string"),
    ("namespace", "string"),
    ("creationTimestamp", "date"),
    ("deletionTimestamp", "date"),
    ("generation", "integer"),
];

/// The printer-column type that shows a schema node.
fn column_type(node: &Value) -> &str {
    match (node["type"].as_str(), node["format"].as_str()) {
        (Some("string"), Some("date-time")) => "date",
        (Some(ty), _) => ty,
        (None, _) => "",
    }
}

/// The schema node a printer column's JSONPath selects, such as
/// `.status.conditions[?(@.type=="Accepted")].status`; the fields a filter reads must exist too.
fn resolve_json_path<'a>(schema: &'a Value, json_path: &str) -> Result<&'a Value, String> {
    let filters = regex::Regex::new(r"\[[^\]]*\]").expect("the filter pattern compiles");
    let filter_field = regex::Regex::new(r"@\.([A-Za-z0-9_]+)").expect("the field pattern compiles");
    let mut node = schema;
    let mut rest = json_path.strip_prefix('.').ok_or("the path must start with '.'")?;
    while !rest.is_empty() {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let (field, after) = rest.split_at(end);
        node = node.pointer(&format!("/properties/{field}")).ok_or(format!("no field {field}"))?;
        rest = after;
        if let Some(filter) = filters.find(rest).filter(|m| m.start() == 0) {
            node = node.get("items").ok_or(format!("{field} is not a list"))?;
            for read in filter_field.captures_iter(filter.as_str()) {
                let read = &read[1];
                node.pointer(&format!("/properties/{read}"))
                    .ok_or(format!("the filter reads {field}[].{read}, which does not exist"))?;
            }
            rest = &rest[filter.end()..];
        }
        rest = rest.strip_prefix('.').unwrap_or(rest);
    }
    Ok(node)
}

#[test]
fn printer_columns_point_at_fields_of_their_type() {
    for_each_crd(|crd, schema| {
        let mut problems = Vec::new();
        for version in &crd.spec.versions {
            for column in version.additional_printer_columns.iter().flatten() {
                let path = &column.json_path;
                let found = match path.strip_prefix(".metadata.") {
                    Some(field) => METADATA_FIELDS
                        .iter()
                        .find(|(name, _)| *name == field)
                        .map(|(_, ty)| (*ty).to_owned())
                        .ok_or(format!("metadata.{field} is not a field printer columns can show")),
                    None => resolve_json_path(schema, path).map(|node| column_type(node).to_owned()),
                };
                match found {
                    Err(why) => problems.push(format!("column {} ({path}): {why}", column.name)),
                    Ok(ty) if ty != column.type_ && !(column.type_ == "number" && ty == "integer") => {
                        problems.push(format!(
                            "column {} ({path}) has type {} but the field is {ty}",
                            column.name, column.type_
                        ))
                    }
                    Ok(_) => {}
                }
            }
        }
        problems
    });
}

/// Names, short names and kinds of built-in resources, which a CRD's short name must not take
/// (kubectl resolves them to the built-in, so the short name would be dead or, with older
/// kubectl, hijack the built-in).
const BUILT_IN_NAMES: &[&str] = &[
    "po",
    "pod",
    "pods",
    "svc",
    "service",
    "services",
    "deploy",
    "deployment",
    "ds",
    "sts",
    "rs",
    "cm",
    "configmap",
    "secret",
    "ns",
    "namespace",
    "no",
    "node",
    "pv",
    "pvc",
    "sa",
    "ep",
    "endpoints",
    "ev",
    "event",
    "events",
    "ing",
    "ingress",
    "netpol",
    "pdb",
    "hpa",
    "crd",
    "crds",
    "cj",
    "cronjob",
    "job",
    "jobs",
    "csr",
    "limits",
    "quota",
    "pc",
    "sc",
    "lease",
    "leases",
    "role",
    "rolebinding",
    "cs",
];

#[test]
fn names_short_names_and_categories() {
    let expected = [
        ("CircuitBreakerPolicy", "circuitbreakerpolicies", "circuitbreakerpolicy", vec!["cbp"]),
        ("RateLimitPolicy", "ratelimitpolicies", "ratelimitpolicy", vec!["rlp"]),
        ("LockLease", "lockleases", "locklease", vec!["ll"]),
        ("OutboxRelay", "outboxrelays", "outboxrelay", vec!["outbox"]),
    ];
    let crds = breakwater_api::crds();
    assert_eq!(crds.len(), expected.len(), "a CRD was added or removed; update this table");
    let mut short_names_seen = BTreeSet::new();
    for (kind, plural, singular, short_names) in expected {
        let crd =
            crds.iter().find(|c| c.spec.names.kind == kind).unwrap_or_else(|| panic!("no CRD for {kind}"));
        let names = &crd.spec.names;
        assert_eq!(crd.metadata.name.as_deref(), Some(format!("{plural}.breakwater.dev").as_str()));
        assert_eq!(crd.spec.group, "breakwater.dev");
        assert_eq!(crd.spec.scope, "Namespaced", "{kind}");
        assert_eq!(names.plural, plural);
        assert_eq!(names.singular.as_deref(), Some(singular));
        let actual: Vec<&str> = names.short_names.iter().flatten().map(String::as_str).collect();
        assert_eq!(actual, short_names, "short names of {kind}");
        assert_eq!(names.categories.as_deref(), Some(&["breakwater".to_owned()][..]), "categories of {kind}");
        for short_name in actual {
            assert!(
                !BUILT_IN_NAMES.contains(&short_name),
                "{kind}: short name {short_name} is a built-in resource's"
            );
            assert!(short_names_seen.insert(short_name), "short name {short_name} is used twice");
        }
    }
}

#[test]
fn one_served_stored_version_with_the_status_subresource() {
    for crd in breakwater_api::crds() {
        let kind = &crd.spec.names.kind;
        let [version] = crd.spec.versions.as_slice() else {
            panic!("{kind} should have exactly one version")
        };
        assert_eq!(version.name, "v1alpha1", "{kind}");
        assert!(version.served && version.storage, "{kind}: v1alpha1 must be served and stored");
        assert!(
            version.subresources.as_ref().is_some_and(|s| s.status.is_some()),
            "{kind}: the status subresource must be enabled so that only the operator writes status"
        );
        assert!(
            schema(&crd).pointer("/properties/status/type") == Some(&Value::from("object")),
            "{kind}: status must be declared as an object"
        );
    }
}
