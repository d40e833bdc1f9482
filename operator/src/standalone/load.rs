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

pub use crate::error::Source;
use crate::{
    error::{Error, Result},
    inventory::{Inventory, ObjectName},
};

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
        let at = |line: usize| Source { path: path.to_path_buf(), line };
        let value: Value = match serde_saphyr::from_str::<Option<Value>>(&doc) {
            Ok(Some(value)) => value,
            Ok(None) => continue,
            Err(source) => {
                let line = source.location().map_or(0, |l| usize::try_from(l.line()).unwrap_or(0));
                return Err(Error::Yaml { at: at(start + line.saturating_sub(1)), source: Box::new(source) });
            }
        };
        if value.is_null() {
            continue;
        }
        let source = at(start);
        let (api_version, kind) = match (
            value.get("apiVersion").and_then(Value::as_str),
            value.get("kind").and_then(Value::as_str),
        ) {
            (Some(a), Some(k)) => (a.to_string(), k.to_string()),
            _ => return Err(Error::NotAnObject { at: source }),
        };
        let meta = value.get("metadata");
        let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or_default();
        let namespace = meta.and_then(|m| m.get("namespace")).and_then(Value::as_str).unwrap_or("default");
        let id = ObjectName::new(namespace, name);
        if let Some(first) = seen.insert((kind.clone(), id.clone()), source.clone()) {
            return Err(Error::Duplicate { at: source, kind, name: id, first: Box::new(first) });
        }
        add_object(loaded, source, &api_version, &kind, id, value)?;
    }
    Ok(())
}

/// Adds one parsed object. Err is for objects that are not objects of the kind they claim.
fn add_object(
    loaded: &mut Loaded,
    source: Source,
    api_version: &str,
    kind: &str,
    id: ObjectName,
    mut value: Value,
) -> Result<()> {
    // kubectl fills the namespace from the context (standalone mode uses "default"), and the
    // API server starts every object at generation 1.
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.entry("namespace").or_insert_with(|| Value::String(id.namespace.clone()));
        meta.entry("generation").or_insert_with(|| Value::from(1));
    }
    let typed = |value| Typed { at: &source, kind, name: &id, value };
    let inventory = &mut loaded.inventory;
    match (api_version, kind) {
        ("v1", "Service") => inventory.add_service(Arc::new(typed(value).decode::<Service>()?)),
        // The workloads that run proxies, and their Services' endpoints: what `render`
        // and the xDS server compile for.
        ("v1", "Pod") => {
            let pod = typed(value).decode::<Pod>()?;
            inventory.pods.insert(id, Arc::new(pod));
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice = typed(value).decode::<EndpointSlice>()?;
            inventory.endpoint_slices.insert(id, Arc::new(slice));
        }
        ("v1", "Namespace") => {
            let ns: Namespace = typed(value).decode()?;
            inventory.add_namespace(ns.name_any(), ns.labels().clone());
        }
        ("v1", "Secret") => {
            inventory.add_secret(&typed(value).decode::<Secret>()?);
        }
        _ => match validation::crd_for(api_version, kind) {
            Some(crd) => {
                let errors: Vec<String> =
                    validation::validate_object(crd, &value).iter().map(ToString::to_string).collect();
                if errors.is_empty() {
                    let value = typed(value.clone());
                    match kind {
                        "CircuitBreakerPolicy" => inventory.circuit_breakers.push(Arc::new(value.decode()?)),
                        "RateLimitPolicy" => inventory.rate_limits.push(Arc::new(value.decode()?)),
                        "LockLease" => inventory.lock_leases.push(Arc::new(value.decode()?)),
                        "OutboxRelay" => inventory.outbox_relays.push(Arc::new(value.decode()?)),
                        _ => {
                            let (api_version, kind) = (api_version.to_string(), kind.to_string());
                            return Err(Error::UnknownKind { at: source, api_version, kind });
                        }
                    }
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
                return Err(Error::UnknownKind {
                    at: source,
                    api_version: api_version.to_string(),
                    kind: kind.to_string(),
                });
            }
            None => loaded.ignored.push((source, format!("{api_version} {kind} {id}"))),
        },
    }
    Ok(())
}

/// A parsed object on its way to its type.
struct Typed<'a> {
    at: &'a Source,
    kind: &'a str,
    name: &'a ObjectName,
    value: Value,
}

impl Typed<'_> {
    fn decode<K: serde::de::DeserializeOwned>(self) -> Result<K> {
        serde_json::from_value(self.value).map_err(|source| Error::Decode {
            at: self.at.clone(),
            kind: self.kind.to_string(),
            name: self.name.clone(),
            source,
        })
    }
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
        let Error::Yaml { at, source } = &err else { panic!("unexpected {err}") };
        assert_eq!(at.line, 6, "{source}");
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
