//! Client-side validation of Breakwater objects against their CRDs.
//!
//! In standalone mode the operator reads policies from files, and no API server stands between
//! a typo and the data plane. This module refuses what `kubectl apply` (server-side, with strict
//! field validation) would refuse, and words each problem as the API server does. It reads the
//! rules from the CRDs generated from this crate's types, so the two cannot drift apart.
//!
//! [`validate_object`] follows the API server's create path:
//!
//! 1. decoding with strict field validation: another kind, or a field the schema does not
//!    declare (an `unknown field` error), fails the request before anything is validated, so
//!    these are then the only errors;
//! 2. with the status subresource enabled, `status` is dropped (a create cannot set it);
//! 3. null values of fields that are neither nullable nor defaulted are pruned, then schema
//!    `default`s are applied;
//! 4. `metadata.name` / `metadata.namespace` and the OpenAPI schema checks (type, required, enum,
//!    bounds, lengths, patterns, list keys);
//! 5. the CEL `x-kubernetes-validations` rules, evaluated by kube's CEL engine. As in the API
//!    server, a required, type, enum, too-long or too-many error from step 4 skips the rules
//!    and says so in one more error; other errors (a bound, a pattern) do not, so a rule may
//!    also report on a value the schema refused (a duration without a unit).
//!
//! It checks the schema keywords these CRDs use (tests/structural.rs fails on any other);
//! `format` is not checked: the API server ignores `uint32`/`uint64`, and only status (dropped
//! on create) has a `date-time`.

use std::{fmt, sync::OnceLock};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionVersion,
};
use kube::core::cel::{ErrorKind, ValidationError, Validator};
use regex::Regex;
use serde_json::{Map, Value};

/// One problem with one field, worded like the API server's field errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Where the problem is, as the API server writes it: `spec.limits[0].rate`. Empty when
    /// the object as a whole is wrong (it is not a mapping).
    pub path: String,
    /// What is wrong: `Required value`, `Invalid value: -1: ...`, `unknown field "spec.foo"`.
    pub message: String,
}

impl FieldError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// The CRD of the API serving `apiVersion` and `kind`, or `None` if it is not a Breakwater
/// resource. Standalone mode uses it to pick the schema for each document it reads; the CRDs
/// are built once.
pub fn crd_for(api_version: &str, kind: &str) -> Option<&'static CustomResourceDefinition> {
    static CRDS: OnceLock<Vec<CustomResourceDefinition>> = OnceLock::new();
    CRDS.get_or_init(crate::crds)
        .iter()
        .find(|crd| crd.spec.names.kind == kind && served_version(crd, api_version).is_some())
}

/// Every reason the API server would refuse to create `object` from `crd`; empty if it would
/// accept it. The object is not changed: pruning and defaulting happen on a copy.
pub fn validate_object(crd: &CustomResourceDefinition, object: &Value) -> Vec<FieldError> {
    let Some(fields) = object.as_object() else {
        return vec![FieldError::new(
            "",
            format!("Invalid value: {}: the object must be a mapping", quote(json_type(object))),
        )];
    };
    let api_version = fields.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    let schema = served_version(crd, api_version)
        .and_then(|version| version.schema.as_ref()?.open_api_v3_schema.as_ref())
        .and_then(|schema| serde_json::to_value(schema).ok());
    let Some(schema) = schema else {
        let served: Vec<String> = crd
            .spec
            .versions
            .iter()
            .filter(|v| v.served)
            .map(|v| format!("{}/{}", crd.spec.group, v.name))
            .collect();
        return vec![not_supported("apiVersion", object.get("apiVersion"), &served)];
    };

    // The API server refuses another kind before it looks at anything else.
    let kind = fields.get("kind");
    if kind.and_then(Value::as_str) != Some(crd.spec.names.kind.as_str()) {
        let kind = kind.map_or_else(|| quote(""), go_value);
        return vec![FieldError::new(
            "kind",
            format!("Invalid value: {kind}: must be {}", crd.spec.names.kind),
        )];
    }

    let mut object = object.clone();
    let mut errors = Vec::new();
    prune_unknown(&mut object, &schema, "", &["apiVersion", "kind", "metadata"], &mut errors);
    if !errors.is_empty() {
        // Strict decoding refuses the request before validation: nothing else is reported.
        return errors;
    }
    check_metadata(fields.get("metadata"), &mut errors);
    let status_subresource =
        crd.spec.versions.iter().any(|v| v.subresources.as_ref().is_some_and(|s| s.status.is_some()));
    if let (true, Some(fields)) = (status_subresource, object.as_object_mut()) {
        fields.remove("status");
    }
    prune_nulls(&mut object, &schema);
    apply_defaults(&mut object, &schema);
    check_node(&object, &schema, "", &mut errors);

    if has_rules(&schema) {
        if errors.iter().any(blocks_rules) {
            errors.push(FieldError::new("", RULES_NOT_CHECKED));
        } else {
            check_rules(&schema, &object, &mut errors);
        }
    }
    errors
}

/// The version of `crd` that `api_version` (`group/version`) names, if it is served.
fn served_version<'a>(
    crd: &'a CustomResourceDefinition,
    api_version: &str,
) -> Option<&'a CustomResourceDefinitionVersion> {
    let (group, version) = api_version.split_once('/')?;
    if group != crd.spec.group {
        return None;
    }
    crd.spec.versions.iter().find(|v| v.name == version && v.served)
}

// ---------------------------------------------------------------------------------------------
// metadata
// ---------------------------------------------------------------------------------------------

const DNS1123_LABEL: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const DNS1123_SUBDOMAIN: &str = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";

/// The only metadata checks that matter without an API server: a name to key the object by,
/// and names the API server would accept.
fn check_metadata(metadata: Option<&Value>, errors: &mut Vec<FieldError>) {
    const NAME_REQUIRED: &str = "Required value: name or generateName is required";
    let metadata = match metadata {
        None | Some(Value::Null) => {
            errors.push(FieldError::new("metadata.name", NAME_REQUIRED));
            return;
        }
        Some(Value::Object(metadata)) => metadata,
        Some(other) => {
            errors.push(type_invalid("metadata", other, "object"));
            return;
        }
    };
    match metadata.get("name") {
        None | Some(Value::Null) => errors.push(FieldError::new("metadata.name", NAME_REQUIRED)),
        Some(Value::String(name)) if name.is_empty() => {
            errors.push(FieldError::new("metadata.name", NAME_REQUIRED));
        }
        Some(Value::String(name)) => check_dns_name(
            "metadata.name",
            name,
            253,
            DNS1123_SUBDOMAIN,
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', \
             and must start and end with an alphanumeric character (e.g. 'example.com'",
            errors,
        ),
        Some(other) => errors.push(type_invalid("metadata.name", other, "string")),
    }
    match metadata.get("namespace") {
        None | Some(Value::Null) => {}
        Some(Value::String(namespace)) => check_dns_name(
            "metadata.namespace",
            namespace,
            63,
            DNS1123_LABEL,
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', \
             and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc'",
            errors,
        ),
        Some(other) => errors.push(type_invalid("metadata.namespace", other, "string")),
    }
}

fn check_dns_name(
    path: &str,
    name: &str,
    max_len: usize,
    pattern: &str,
    explanation: &str,
    errors: &mut Vec<FieldError>,
) {
    let value = quote(name);
    if name.len() > max_len {
        errors.push(FieldError::new(
            path,
            format!("Invalid value: {value}: must be no more than {max_len} characters"),
        ));
    }
    let matches = |pattern: &str| Regex::new(&format!("^{pattern}$")).is_ok_and(|re| re.is_match(name));
    if matches(pattern) {
        return;
    }
    // As the API server's IsDNS1123Label: a valid subdomain that is no valid label differs from
    // one only by its dots, and is told so.
    let explanation = if pattern == DNS1123_LABEL && matches(DNS1123_SUBDOMAIN) {
        "must not contain dots".to_owned()
    } else {
        format!("{explanation}, regex used for validation is '{pattern}')")
    };
    errors.push(FieldError::new(path, format!("Invalid value: {value}: {explanation}")));
}

// ---------------------------------------------------------------------------------------------
// pruning and defaulting
// ---------------------------------------------------------------------------------------------

/// Reports and removes the fields the schema does not declare, as strict decoding does. This
/// walks like the API server's pruning: a mapping where the schema declares neither the key nor
/// `additionalProperties` loses the key, whatever the schema's `type` (the wrong type is
/// reported later). `keep` lists the keys allowed at this level regardless (apiVersion, kind and
/// metadata at the root, whose contents are not walked).
fn prune_unknown(value: &mut Value, schema: &Value, path: &str, keep: &[&str], errors: &mut Vec<FieldError>) {
    let preserve = schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    match value {
        Value::Object(fields) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let mut unknown = Vec::new();
            for (key, child) in fields.iter_mut() {
                if keep.contains(&key.as_str()) {
                    continue;
                }
                let declared =
                    properties.and_then(|p| p.get(key)).or_else(|| additional.filter(|a| a.is_object()));
                match declared {
                    Some(child_schema) => prune_unknown(child, child_schema, &join(path, key), &[], errors),
                    None if preserve || additional == Some(&Value::Bool(true)) => {}
                    None => unknown.push(key.clone()),
                }
            }
            for key in unknown {
                let field = join(path, &key);
                errors.push(FieldError::new(field.clone(), format!("unknown field {}", quote(&field))));
                fields.remove(&key);
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune_unknown(item, item_schema, &index(path, i), &[], errors);
                }
            }
        }
        _ => {}
    }
}

/// The schema of the value under `key` of a mapping: its declared property, or else the
/// schema of a map's values.
fn child_schema<'a>(schema: &'a Value, key: &str) -> Option<&'a Value> {
    schema
        .get("properties")
        .and_then(|p| p.get(key))
        .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()))
}

fn is_nullable(schema: &Value) -> bool {
    schema.get("nullable") == Some(&Value::Bool(true))
}

/// Removes `key: null` where the field is not nullable and has no default: the API server
/// treats such a null as an absent field (so `required` still applies) rather than a wrong type.
fn prune_nulls(value: &mut Value, schema: &Value) {
    match value {
        Value::Object(fields) => {
            fields.retain(|key, child| match child_schema(schema, key) {
                Some(s) => !(child.is_null() && !is_nullable(s) && s.get("default").is_none()),
                None => true,
            });
            for (key, child) in fields.iter_mut() {
                if let Some(s) = child_schema(schema, key) {
                    prune_nulls(child, s);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                items.iter_mut().for_each(|item| prune_nulls(item, item_schema));
            }
        }
        _ => {}
    }
}

/// Fills absent fields (and non-nullable nulls) with their schema `default`, then defaults
/// inside them, as the API server does before validating: a CEL rule sees
/// `delivery.pollInterval` even when the file leaves `delivery` out.
fn apply_defaults(value: &mut Value, schema: &Value) {
    match value {
        Value::Object(fields) => {
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                for (key, property) in properties {
                    let Some(default) = property.get("default") else { continue };
                    let missing = fields.get(key).is_none_or(|v| v.is_null() && !is_nullable(property));
                    if missing {
                        fields.insert(key.clone(), default.clone());
                    }
                }
            }
            for (key, child) in fields.iter_mut() {
                if let Some(s) = child_schema(schema, key) {
                    apply_defaults(child, s);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                items.iter_mut().for_each(|item| apply_defaults(item, item_schema));
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// OpenAPI schema checks
// ---------------------------------------------------------------------------------------------

/// Checks one value against one schema node and recurses into its fields and items. The
/// messages are those of the API server's OpenAPI validator (`<path> in body should ...`).
fn check_node(value: &Value, schema: &Value, path: &str, errors: &mut Vec<FieldError>) {
    if !check_type(value, schema, path, errors) {
        return;
    }
    match value {
        Value::String(text) => check_string(text, schema, path, errors),
        Value::Number(_) => check_number(value, schema, path, errors),
        Value::Array(items) => check_array(items, schema, path, errors),
        Value::Object(fields) => check_object(fields, schema, path, errors),
        Value::Null | Value::Bool(_) => {}
    }
    check_enum(value, schema, path, errors);
}

/// The JSON type of a value as the API server names it; whole numbers are `integer`.
fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Checks `type`, `nullable` and `x-kubernetes-int-or-string`; false if the value has the
/// wrong type, so that the checks that assume the type are skipped for it.
fn check_type(value: &Value, schema: &Value, path: &str, errors: &mut Vec<FieldError>) -> bool {
    let expected = if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        "integer,string"
    } else {
        match schema.get("type").and_then(Value::as_str) {
            Some(expected) => expected,
            None => return true,
        }
    };
    let allows = |t: &str| expected.split(',').any(|e| e == t);
    let ok = match json_type(value) {
        "null" => is_nullable(schema),
        // A whole number written as 5.0 is still an integer; an integer is also a number.
        "number" => {
            allows("number") || (allows("integer") && value.as_f64().is_some_and(|n| n.fract() == 0.0))
        }
        "integer" => allows("integer") || allows("number"),
        actual => allows(actual),
    };
    if !ok {
        errors.push(type_invalid(path, value, expected));
    }
    ok
}

/// `maxLength`, `minLength` (in characters, though the API server's message says bytes) and
/// `pattern`; like the API server, only the first failure is reported.
fn check_string(text: &str, schema: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let length = text.chars().count() as u64;
    let value = quote(text);
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && length > max
    {
        errors.push(FieldError::new(path, format!("Too long: may not be more than {max} bytes")));
    } else if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && length < min
    {
        errors.push(FieldError::new(
            path,
            format!("Invalid value: {value}: {path} in body should be at least {min} chars long"),
        ));
    } else if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        match Regex::new(pattern) {
            Ok(re) if re.is_match(text) => {}
            Ok(_) => errors.push(FieldError::new(
                path,
                format!("Invalid value: {value}: {path} in body should match '{pattern}'"),
            )),
            Err(err) => errors.push(FieldError::new(
                path,
                format!("Internal error: the schema's pattern '{pattern}' does not compile: {err}"),
            )),
        }
    }
}

/// `minimum` and `maximum`, each possibly exclusive.
fn check_number(value: &Value, schema: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let Some(number) = value.as_f64() else { return };
    let shown = go_value(value);
    let bound = |key: &str| schema.get(key).and_then(Value::as_f64);
    let exclusive = |key: &str| schema.get(key) == Some(&Value::Bool(true));
    // The API server prints a bound as an integer when the value is one.
    let show_bound = |b: f64| if value.is_f64() { go_float(b) } else { format!("{}", b.trunc()) };
    if let Some(min) = bound("minimum") {
        let (fails, wording) = if exclusive("exclusiveMinimum") {
            (number <= min, "greater than")
        } else {
            (number < min, "greater than or equal to")
        };
        if fails {
            errors.push(FieldError::new(
                path,
                format!("Invalid value: {shown}: {path} in body should be {wording} {}", show_bound(min)),
            ));
        }
    }
    if let Some(max) = bound("maximum") {
        let (fails, wording) = if exclusive("exclusiveMaximum") {
            (number >= max, "less than")
        } else {
            (number > max, "less than or equal to")
        };
        if fails {
            errors.push(FieldError::new(
                path,
                format!("Invalid value: {shown}: {path} in body should be {wording} {}", show_bound(max)),
            ));
        }
    }
}

/// `minItems`, `maxItems`, each item, and the uniqueness `x-kubernetes-list-type` demands.
fn check_array(items: &[Value], schema: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let count = items.len() as u64;
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
        && count < min
    {
        errors.push(FieldError::new(
            path,
            format!("Invalid value: {count}: {path} in body should have at least {min} items"),
        ));
    }
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
        && count > max
    {
        errors.push(FieldError::new(path, format!("Too many: {count}: must have at most {max} items")));
    }
    if let Some(item_schema) = schema.get("items") {
        for (i, item) in items.iter().enumerate() {
            check_node(item, item_schema, &index(path, i), errors);
        }
    }
    check_list_type(items, schema, path, errors);
}

/// `x-kubernetes-list-type`: a `set` holds no value twice; a `map` holds no two items with
/// the same values of `x-kubernetes-list-map-keys` (server-side apply merges items by them).
fn check_list_type(items: &[Value], schema: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let list_type = schema.get("x-kubernetes-list-type").and_then(Value::as_str);
    if !matches!(list_type, Some("set" | "map")) {
        return;
    }
    let keys: Vec<&str> = schema
        .get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
        .map(|keys| keys.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let identity = |item: &Value| match list_type {
        Some("map") => {
            Value::Object(keys.iter().filter_map(|&k| Some((k.to_owned(), item.get(k)?.clone()))).collect())
        }
        _ => item.clone(),
    };
    let mut seen = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let id = identity(item);
        if seen.contains(&id) {
            errors.push(FieldError::new(index(path, i), format!("Duplicate value: {id}")));
        } else {
            seen.push(id);
        }
    }
}

/// `required`, then each field with its declared schema (or the schema of a map's values).
fn check_object(fields: &Map<String, Value>, schema: &Value, path: &str, errors: &mut Vec<FieldError>) {
    for key in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
        if let Some(key) = key.as_str()
            && !fields.contains_key(key)
        {
            errors.push(FieldError::new(join(path, key), "Required value"));
        }
    }
    for (key, child) in fields {
        if let Some(child_schema) = child_schema(schema, key) {
            check_node(child, child_schema, &join(path, key), errors);
        }
    }
}

/// `enum`. As in the API server, null never matches (not even a `null` listed in the enum).
fn check_enum(value: &Value, schema: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let Some(allowed) = schema.get("enum").and_then(Value::as_array) else { return };
    if value.is_null() || !allowed.contains(value) {
        let allowed: Vec<String> =
            allowed.iter().map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned)).collect();
        errors.push(not_supported(path, Some(value), &allowed));
    }
}

// ---------------------------------------------------------------------------------------------
// CEL rules
// ---------------------------------------------------------------------------------------------

/// What the API server adds, with no field path (it prints `<nil>`), when it skips the rules.
const RULES_NOT_CHECKED: &str = "Invalid value: null: some validation rules were not checked because the \
     object was invalid; correct the existing errors to complete validation";

/// Whether the schema has any `x-kubernetes-validations` rule: without one the API server has
/// no rules to skip, and says nothing about them.
fn has_rules(schema: &Value) -> bool {
    schema.get("x-kubernetes-validations").and_then(Value::as_array).is_some_and(|rules| !rules.is_empty())
        || schema.get("properties").and_then(Value::as_object).is_some_and(|p| p.values().any(has_rules))
        || schema.get("items").is_some_and(has_rules)
        || schema.get("additionalProperties").is_some_and(has_rules)
}

/// Whether the API server skips the CEL rules after this error: field errors of type
/// Required, NotSupported, TooLong, TooMany and TypeInvalid do (`hasBlockingErr` in
/// apiextensions-apiserver), Invalid (bounds, patterns, names) and Duplicate do not. The type
/// is read back from the wording, which this module writes: each type's message starts with
/// its name, except TypeInvalid, which shares `Invalid value` with Invalid.
fn blocks_rules(error: &FieldError) -> bool {
    const BLOCKING: [&str; 4] = ["Required value", "Unsupported value:", "Too long:", "Too many:"];
    BLOCKING.iter().any(|prefix| error.message.starts_with(prefix))
        || (error.message.starts_with("Invalid value:")
            && error.message.contains(" in body must be of type "))
}

/// Evaluates every `x-kubernetes-validations` rule with kube's CEL engine (which applies the
/// schema defaults itself; they are already applied here) and words each failure as the API
/// server does: `<path>: Invalid value: "<type>": <message>`.
fn check_rules(schema: &Value, object: &Value, errors: &mut Vec<FieldError>) {
    if let Err(failures) = Validator::new().validate(schema, object, None) {
        errors.extend(failures.iter().map(|failure| rule_error(schema, failure)));
    }
}

fn rule_error(schema: &Value, failure: &ValidationError) -> FieldError {
    let node = schema_at(schema, &failure.field_path);
    let node_type = node.and_then(|n| n.get("type")).and_then(Value::as_str).unwrap_or("object");
    let message = match failure.kind {
        ErrorKind::ValidationFailure => failure.message.trim().to_owned(),
        ErrorKind::EvaluationError => {
            // The API server names the rule by its message: "<error> evaluating rule: <message>".
            let rule_message = node
                .and_then(|n| n.get("x-kubernetes-validations"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|r| r.get("rule").and_then(Value::as_str) == Some(failure.rule.as_str()))
                .and_then(|r| r.get("message"))
                .and_then(Value::as_str)
                .unwrap_or(&failure.rule);
            let cause =
                std::error::Error::source(failure).map_or_else(|| failure.message.clone(), |c| c.to_string());
            format!("{} evaluating rule: {}", cel_go_cause(cause), rule_message.trim())
        }
        // The rule could not be run here (an unsupported CEL function, a compilation error):
        // fail closed rather than accept what the API server might refuse.
        _ => {
            return FieldError::new(
                failure.field_path.clone(),
                format!(
                    "Internal error: rule {:?} cannot be checked client-side: {}",
                    failure.rule, failure.message
                ),
            );
        }
    };
    FieldError::new(failure.field_path.clone(), format!("Invalid value: {}: {message}", quote(node_type)))
}

/// An evaluation error as cel-go (the API server's CEL) words it, where kube's engine (the Rust
/// `cel` crate) words it otherwise: `duration()` of a string that is no duration is
/// `Error executing function 'duration': Parsing Error: ...` there, a type conversion error in
/// cel-go. Other causes are kept as the engine words them.
fn cel_go_cause(cause: String) -> String {
    if cause.starts_with("Error executing function 'duration':") {
        "type conversion error from 'string' to 'google.protobuf.Duration'".to_owned()
    } else {
        cause
    }
}

/// The schema node at a path written as `spec.limits[0].rate`.
fn schema_at<'a>(schema: &'a Value, path: &str) -> Option<&'a Value> {
    let mut node = schema;
    for segment in path.split('.').filter(|s| !s.is_empty()) {
        let (name, mut indexes) = segment.split_at(segment.find('[').unwrap_or(segment.len()));
        if !name.is_empty() {
            node = child_schema(node, name)?;
        }
        while let Some(rest) = indexes.strip_prefix('[') {
            indexes = &rest[rest.find(']')? + 1..];
            node = node.get("items")?;
        }
    }
    Some(node)
}

// ---------------------------------------------------------------------------------------------
// wording
// ---------------------------------------------------------------------------------------------

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// A string in double quotes, escaped (as Go's `%q` does for the strings found in manifests).
fn quote(text: &str) -> String {
    Value::String(text.to_owned()).to_string()
}

/// A value as the API server prints a bad value: strings quoted, numbers, booleans and null
/// bare.
fn go_value(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::String(text) => quote(text),
        Value::Number(n) if n.is_f64() => n.as_f64().map_or_else(|| n.to_string(), go_float),
        other => other.to_string(),
    }
}

/// A float as Go's `%v` prints it: shortest form, with an exponent below 1e-4 and from 1e6.
fn go_float(number: f64) -> String {
    let exponent = if number == 0.0 { 0 } else { number.abs().log10().floor() as i32 };
    if (-4..6).contains(&exponent) {
        format!("{number}")
    } else {
        let scientific = format!("{number:e}");
        let (mantissa, exp) = scientific.split_once('e').unwrap_or((&scientific, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

fn type_invalid(path: &str, value: &Value, expected: &str) -> FieldError {
    let actual = quote(json_type(value));
    FieldError::new(
        path,
        format!("Invalid value: {actual}: {path} in body must be of type {expected}: {actual}"),
    )
}

fn not_supported(path: &str, value: Option<&Value>, supported: &[String]) -> FieldError {
    let value = value.map_or_else(|| quote(""), go_value);
    let supported: Vec<String> = supported.iter().map(|s| quote(s)).collect();
    FieldError::new(path, format!("Unsupported value: {value}: supported values: {}", supported.join(", ")))
}

#[cfg(test)]
mod tests {
    //! Where standalone mode worded an answer differently from kube-apiserver 1.34, or gave other
    //! errors than it does. operator/tests/it/kube/validation.rs compares every bad object of the
    //! test corpus with a real API server's answer.

    use serde_json::json;

    use super::*;

    fn errors(kind: &str, spec: Value) -> Vec<String> {
        let object = json!({
            "apiVersion": "breakwater.dev/v1alpha1",
            "kind": kind,
            "metadata": { "name": "nightly", "namespace": "billing" },
            "spec": spec,
        });
        let crd = crd_for("breakwater.dev/v1alpha1", kind).expect("a Breakwater kind");
        validate_object(crd, &object).iter().map(ToString::to_string).collect()
    }

    const NOT_CHECKED: &str = "Invalid value: null: some validation rules were not checked because the \
                               object was invalid; correct the existing errors to complete validation";

    #[test]
    fn unknown_fields_are_the_only_errors() {
        // Strict decoding fails first: neither the holders bound nor the ttl type is reported.
        let found = errors("LockLease", json!({ "ttl": { "seconds": 30 }, "holders": 0, "podSelector": {} }));
        assert_eq!(found, ["spec.ttl.seconds: unknown field \"spec.ttl.seconds\""]);
    }

    #[test]
    fn a_blocking_error_skips_the_rules_and_says_so() {
        // The ttl rule would fail on 2h, but a type error blocks the rules.
        let found = errors("LockLease", json!({ "ttl": "2h", "holders": "two", "podSelector": {} }));
        assert_eq!(
            found,
            [
                "spec.holders: Invalid value: \"string\": spec.holders in body must be of type integer: \"string\"",
                NOT_CHECKED,
            ]
        );
    }

    #[test]
    fn a_bound_or_pattern_error_does_not_skip_the_rules() {
        let found = errors("LockLease", json!({ "ttl": "2h", "holders": 0, "podSelector": {} }));
        assert_eq!(
            found,
            [
                "spec.holders: Invalid value: 0: spec.holders in body should be greater than or equal to 1",
                "spec.ttl: Invalid value: \"string\": ttl must be between 1s and 1h",
            ]
        );
        // A rule that reads a value the pattern refused fails as cel-go's duration() does.
        let found = errors("LockLease", json!({ "ttl": "30", "podSelector": {} }));
        assert_eq!(
            found,
            [
                "spec.ttl: Invalid value: \"30\": spec.ttl in body should match '^([0-9]{1,6}(h|m|s|ms))+$'",
                "spec.ttl: Invalid value: \"string\": type conversion error from 'string' to \
                 'google.protobuf.Duration' evaluating rule: ttl must be between 1s and 1h",
            ]
        );
    }

    #[test]
    fn api_server_wording() {
        // Before: `Unsupported value: "null"`.
        let found = errors(
            "CircuitBreakerPolicy",
            json!({ "targetRefs": [{ "name": "a" }], "timeout": "1s", "mode": null }),
        );
        assert_eq!(
            found[0],
            "spec.mode: Unsupported value: null: supported values: \"Default\", \"Override\""
        );
        // Before: `Too long: may not be longer than 63`.
        let found = errors(
            "CircuitBreakerPolicy",
            json!({ "targetRefs": [{ "name": "a".repeat(64) }], "timeout": "1s" }),
        );
        assert_eq!(found, ["spec.targetRefs[0].name: Too long: may not be more than 63 bytes", NOT_CHECKED]);
        // Before: `kind: Unsupported value: "Lease": supported values: "LockLease"`.
        let crd = crd_for("breakwater.dev/v1alpha1", "LockLease").expect("LockLease");
        let lease = json!({ "apiVersion": "breakwater.dev/v1alpha1", "kind": "Lease", "metadata": {} });
        assert_eq!(
            validate_object(crd, &lease),
            [FieldError::new("kind", "Invalid value: \"Lease\": must be LockLease")]
        );
        // Before: the RFC 1123 label explanation, for a namespace that is a subdomain.
        let lease = json!({ "apiVersion": "breakwater.dev/v1alpha1", "kind": "LockLease", "metadata": { "name": "l", "namespace": "team.billing" }, "spec": { "ttl": "1s", "podSelector": {} } });
        let found: Vec<String> = validate_object(crd, &lease).iter().map(ToString::to_string).collect();
        assert_eq!(found, ["metadata.namespace: Invalid value: \"team.billing\": must not contain dots"]);
        // Before: `metadata.name: Required value`.
        let lease = json!({ "apiVersion": "breakwater.dev/v1alpha1", "kind": "LockLease", "metadata": {}, "spec": { "ttl": "1s", "podSelector": {} } });
        let found: Vec<String> = validate_object(crd, &lease).iter().map(ToString::to_string).collect();
        assert_eq!(found, ["metadata.name: Required value: name or generateName is required", NOT_CHECKED]);
    }
}
