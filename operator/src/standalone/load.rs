//! Reads every YAML file under a directory into an [`Inventory`], checking Breakwater objects
//! against the CRD schema and CEL rules exactly as `kubectl apply` would have the API server
//! do. A file that cannot be read or parsed is an error naming the file and line; an object
//! that breaks the schema is kept as a rejection, so that every problem is reported at once.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use breakwater_api::validation;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::ResourceExt;
use serde_json::Value;

use crate::{
    error::{Error, Result},
    inventory::{Inventory, ObjectName},
};

/// Where an object was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub path: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.line)
    }
}

/// A Breakwater object the API server would refuse.
#[derive(Clone, Debug)]
pub struct Rejected {
    pub source: Source,
    pub kind: String,
    pub name: ObjectName,
    pub object: Value,
    pub errors: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Loaded {
    pub inventory: Inventory,
    pub rejected: Vec<Rejected>,
    /// Objects of kinds standalone mode does not use (Deployments, ConfigMaps…).
    pub ignored: Vec<(Source, String)>,
}

/// Loads every `.yaml`/`.yml` file under `dir`, in path order.
pub fn load_dir(dir: &Path, root_namespace: &str) -> Result<Loaded> {
    let mut files = Vec::new();
    collect_yaml_files(dir, &mut files)?;
    files.sort();
    let mut loaded = Loaded { inventory: Inventory::new(root_namespace), ..Loaded::default() };
    let mut seen = BTreeMap::new();
    for path in files {
        let text =
            std::fs::read_to_string(&path).map_err(|source| Error::Read { path: path.clone(), source })?;
        load_text(&path, &text, &mut loaded, &mut seen)?;
    }
    Ok(loaded)
}

fn collect_yaml_files(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let read_err = |source| Error::Read { path: dir.to_path_buf(), source };
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        if path.is_dir() {
            collect_yaml_files(&path, files)?;
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    Ok(())
}

/// Splits a multi-document YAML text at `---` lines, with the 1-based line each starts on.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = vec![(1, String::new())];
    for (index, line) in text.lines().enumerate() {
        if line == "---" || line.starts_with("--- ") {
            docs.push((index + 2, String::new()));
        } else if let Some((_, doc)) = docs.last_mut() {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs
}

/// Loads the documents of one file into `loaded`. `seen` maps each object identity to where
/// it was first defined, to refuse duplicates as `kubectl apply` of one set would.
pub fn load_text(
    path: &Path,
    text: &str,
    loaded: &mut Loaded,
    seen: &mut BTreeMap<(String, ObjectName), Source>,
) -> Result<()> {
    for (start, doc) in documents(text) {
        let parse_err =
            |line: usize, message: String| Error::Parse { path: path.to_path_buf(), line, message };
        let value: Value = match serde_saphyr::from_str::<Option<Value>>(&doc) {
            Ok(Some(value)) => value,
            Ok(None) => continue,
            Err(err) => {
                let line = err.location().map_or(0, |l| usize::try_from(l.line()).unwrap_or(0));
                return Err(parse_err(
                    start + line.saturating_sub(1),
                    format!("YAML syntax error: {}", first_line(&err)),
                ));
            }
        };
        if value.is_null() {
            continue;
        }
        let source = Source { path: path.to_path_buf(), line: start };
        let (api_version, kind) = match (
            value.get("apiVersion").and_then(Value::as_str),
            value.get("kind").and_then(Value::as_str),
        ) {
            (Some(a), Some(k)) => (a.to_string(), k.to_string()),
            _ => {
                return Err(parse_err(
                    start,
                    "not a Kubernetes object: apiVersion and kind must be set".into(),
                ));
            }
        };
        let meta = value.get("metadata");
        let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or_default();
        let namespace = meta.and_then(|m| m.get("namespace")).and_then(Value::as_str).unwrap_or("default");
        let id = ObjectName::new(namespace, name);
        if let Some(first) = seen.insert((kind.clone(), id.clone()), source.clone()) {
            return Err(parse_err(start, format!("{kind} {id} is defined twice (first at {first})")));
        }
        add_object(loaded, source, &api_version, &kind, id, value)
            .map_err(|message| parse_err(start, message))?;
    }
    Ok(())
}

fn first_line(err: &impl std::fmt::Display) -> String {
    err.to_string().lines().next().unwrap_or_default().to_string()
}

/// Adds one parsed object. Err is for objects that are not objects of the kind they claim.
fn add_object(
    loaded: &mut Loaded,
    source: Source,
    api_version: &str,
    kind: &str,
    id: ObjectName,
    mut value: Value,
) -> Result<(), String> {
    // kubectl fills the namespace from the context (standalone mode uses "default"), and the
    // API server starts every object at generation 1.
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.entry("namespace").or_insert_with(|| Value::String(id.namespace.clone()));
        meta.entry("generation").or_insert_with(|| Value::from(1));
    }
    let inventory = &mut loaded.inventory;
    match (api_version, kind) {
        ("v1", "Service") => inventory.add_service(Arc::new(typed::<Service>(value, kind)?)),
        // The workloads that run proxies, and their Services' endpoints: what `render`
        // and the xDS server compile for.
        ("v1", "Pod") => {
            inventory.pods.insert(id, Arc::new(typed::<Pod>(value, kind)?));
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            inventory.endpoint_slices.insert(id, Arc::new(typed::<EndpointSlice>(value, kind)?));
        }
        ("v1", "Namespace") => {
            let ns: Namespace = typed(value, kind)?;
            inventory.add_namespace(ns.name_any(), ns.labels().clone());
        }
        ("v1", "Secret") => {
            inventory.add_secret(&typed::<Secret>(value, kind)?);
        }
        _ => match validation::crd_for(api_version, kind) {
            Some(crd) => {
                let errors: Vec<String> =
                    validation::validate_object(crd, &value).iter().map(ToString::to_string).collect();
                if errors.is_empty() {
                    add_breakwater(inventory, kind, value.clone())
                        .map_err(|err| format!("{kind} {id}: {err}"))?;
                } else {
                    loaded.rejected.push(Rejected {
                        source,
                        kind: kind.to_string(),
                        name: id,
                        object: value,
                        errors,
                    });
                }
            }
            None if api_version.starts_with("breakwater.dev/") => {
                return Err(format!(
                    "no kind {kind:?} in {api_version}: expected CircuitBreakerPolicy, RateLimitPolicy, LockLease or OutboxRelay"
                ));
            }
            None => loaded.ignored.push((source, format!("{api_version} {kind} {id}"))),
        },
    }
    Ok(())
}

fn typed<K: serde::de::DeserializeOwned>(value: Value, kind: &str) -> Result<K, String> {
    serde_json::from_value(value).map_err(|err| format!("invalid {kind}: {err}"))
}

fn add_breakwater(inventory: &mut Inventory, kind: &str, value: Value) -> Result<(), String> {
    match kind {
        "CircuitBreakerPolicy" => inventory.circuit_breakers.push(Arc::new(typed(value, kind)?)),
        "RateLimitPolicy" => inventory.rate_limits.push(Arc::new(typed(value, kind)?)),
        "LockLease" => inventory.lock_leases.push(Arc::new(typed(value, kind)?)),
        "OutboxRelay" => inventory.outbox_relays.push(Arc::new(typed(value, kind)?)),
        other => return Err(format!("unsupported kind {other}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_and_endpoint_slices_fill_the_inventory() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: api-1, namespace: shop, labels: {app: api}}\nspec: {containers: [{name: api, image: api}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: api-x1, namespace: shop, labels: {kubernetes.io/service-name: api}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\n";
        let mut loaded = Loaded::default();
        load_text(Path::new("w.yaml"), text, &mut loaded, &mut BTreeMap::new()).expect("loads");
        assert!(loaded.ignored.is_empty(), "{:?}", loaded.ignored);
        let pod = &loaded.inventory.pods[&ObjectName::new("shop", "api-1")];
        assert_eq!(pod.labels().get("app").map(String::as_str), Some("api"));
        let slice = &loaded.inventory.endpoint_slices[&ObjectName::new("shop", "api-x1")];
        assert_eq!(slice.endpoints[0].addresses, ["10.0.0.1"]);
    }

    #[test]
    fn documents_keep_their_start_lines() {
        let docs = documents("a: 1\n---\nb: 2\nc: 3\n--- # third\nd: 4\n");
        let starts: Vec<usize> = docs.iter().map(|(line, _)| *line).collect();
        assert_eq!(starts, [1, 3, 6]);
        assert_eq!(docs[1].1, "b: 2\nc: 3\n");
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let text =
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: [unclosed\n";
        let err = load_text(Path::new("x.yaml"), text, &mut Loaded::default(), &mut BTreeMap::new())
            .expect_err("syntax error");
        let Error::Parse { line, message, .. } = &err else { panic!("unexpected {err}") };
        assert_eq!(*line, 6, "{message}");
        assert!(err.to_string().starts_with("x.yaml:6: YAML syntax error"), "{err}");
    }

    #[test]
    fn duplicates_are_refused() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
        let err = load_text(Path::new("d.yaml"), text, &mut Loaded::default(), &mut BTreeMap::new())
            .expect_err("duplicate");
        assert!(err.to_string().contains("defined twice (first at d.yaml:1)"), "{err}");
    }
}
