//! `breakwater-operator render`: the configuration the compiler produces for a proxy,
//! printed the way Envoy itself prints configuration — protobuf-JSON (or the same as YAML)
//! with snake_case field names and every resource under its `@type`, laid out like the
//! discovery responses the proxy receives, plus the sidecar's bootstrap. Envoy messages are
//! rendered through prost-reflect with the descriptor set envoy-types ships, committed in
//! `operator/descriptors/envoy.bin`; the agent's resources (protobuf, crds/proto) — its
//! configuration and the breakers — are decoded into the contract types and printed as their
//! JSON.

use std::collections::BTreeMap;
use std::{
    path::PathBuf,
    sync::{Arc, OnceLock},
};

use breakwater_api::agent::{AgentConfig, BreakerRule};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use prost_reflect::{DescriptorError, DescriptorPool, DynamicMessage, SerializeOptions};
use serde::{Serialize, Serializer};

use crate::{
    compile::{self, Compiled, Proxy, Snapshot, type_url},
    error::{Error, Report, Result},
    standalone::{exit, load},
};

/// envoy-types' descriptor set, committed (tests/it/descriptors.rs keeps it equal to the
/// locked envoy-types' own; `make golden` rewrites it).
static DESCRIPTORS: &[u8] = include_bytes!("../descriptors/envoy.bin");

/// The order resource types are printed in: how a request travels through Envoy.
pub const TYPE_ORDER: [&str; 7] = type_url::ALL;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Yaml,
    Json,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub dir: PathBuf,
    pub root_namespace: String,
    /// `namespace/pod`; every Pod of the directory when None.
    pub proxy: Option<String>,
    pub format: Format,
}

fn pool() -> Result<&'static DescriptorPool> {
    static POOL: OnceLock<Result<DescriptorPool, Arc<DescriptorError>>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(DESCRIPTORS).map_err(Arc::new))
        .as_ref()
        .map_err(|err| Error::Descriptors(err.clone()))
}

/// Field names as in the .proto files (and Envoy's docs and config dumps); default values
/// left out.
const OPTIONS: SerializeOptions = SerializeOptions::new().use_proto_field_name(true);

/// A protobuf message that serializes as protobuf-JSON.
#[derive(Debug)]
struct Proto(DynamicMessage);

impl Serialize for Proto {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize_with_options(serializer, &OPTIONS)
    }
}

/// One resource as a discovery response carries it: `{"@type": …, fields…}`.
#[derive(Debug)]
enum Resource {
    Envoy(Proto),
    /// The agent's configuration, printed as the JSON it travels as, under its `@type`.
    Agent(AgentConfig),
    /// One of the agents' breakers, likewise.
    Breaker(BreakerRule),
}

/// A body printed under its `@type`, as protobuf-JSON prints an `Any`.
#[derive(Serialize)]
struct Typed<'a, T> {
    #[serde(rename = "@type")]
    type_url: &'a str,
    #[serde(flatten)]
    body: &'a T,
}

impl Serialize for Resource {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Envoy(message) => message.serialize(serializer),
            Self::Agent(config) => Typed { type_url: type_url::AGENT, body: config }.serialize(serializer),
            Self::Breaker(rule) => Typed { type_url: type_url::BREAKER, body: rule }.serialize(serializer),
        }
    }
}

fn resource(any: &Any) -> Result<Resource> {
    if any.type_url == type_url::AGENT {
        // Through the contract type, so fields print in its order (id first), not sorted.
        let config = breakwater_api::agent::decode(&any.value).map_err(Error::DecodeAgent)?;
        return Ok(Resource::Agent(config));
    }
    if any.type_url == type_url::BREAKER {
        let rule = breakwater_api::agent::decode_breaker(&any.value).map_err(Error::DecodeAgent)?;
        return Ok(Resource::Breaker(rule));
    }
    let message = decode("google.protobuf.Any", &any.encode_to_vec())?;
    Ok(Resource::Envoy(Proto(message)))
}

/// Decodes `bytes` as the message type `name` of the Envoy descriptor set.
fn decode(name: &str, bytes: &[u8]) -> Result<DynamicMessage> {
    let descriptor = pool()?.get_message_by_name(name).ok_or_else(|| Error::UnknownType(name.into()))?;
    DynamicMessage::decode(descriptor, bytes)
        .map_err(|source| Error::DecodeResource { type_url: name.to_string(), source })
}

/// Resources of one type, as in a DiscoveryResponse.
#[derive(Debug, Serialize)]
struct Response {
    type_url: &'static str,
    resources: Vec<Resource>,
}

#[derive(Debug, Serialize)]
struct PolicyEntry {
    kind: &'static str,
    namespace: String,
    name: String,
    generation: i64,
}

/// Everything printed for one proxy.
#[derive(Debug, Serialize)]
pub struct Rendered {
    node: String,
    /// The policies whose configuration the snapshot carries.
    policies: Vec<PolicyEntry>,
    bootstrap: Proto,
    discovery: Vec<Response>,
}

/// The sidecar bootstrap of node `node` in `namespace` as protobuf-JSON, the form Envoy's
/// `--config-yaml` takes (the injector passes it so).
pub fn bootstrap_json(node: &str, namespace: &str) -> Result<String> {
    serde_json::to_string(&bootstrap(node, namespace)?).map_err(Error::PrintJson)
}

fn bootstrap(node: &str, namespace: &str) -> Result<Proto> {
    decode("envoy.config.bootstrap.v3.Bootstrap", &compile::bootstrap(node, namespace).encode_to_vec())
        .map(Proto)
}

/// Renders one proxy's snapshot and bootstrap.
pub fn render(proxy: &Proxy, snapshot: &Snapshot) -> Result<Rendered> {
    let bootstrap = bootstrap(&proxy.node_id(), &proxy.pod.namespace)?;
    let mut discovery = Vec::new();
    for type_url in TYPE_ORDER {
        // By name, whichever part of the snapshot holds them.
        let resources: BTreeMap<&str, &Any> =
            snapshot.resources(type_url).map(|(n, r)| (n, &r.any)).collect();
        if resources.is_empty() {
            continue;
        }
        discovery.push(Response {
            type_url,
            resources: resources.into_values().map(resource).collect::<Result<_, _>>()?,
        });
    }
    Ok(Rendered {
        node: proxy.node_id(),
        policies: snapshot
            .policies()
            .keys()
            .map(|p| PolicyEntry {
                kind: p.kind,
                namespace: p.name.namespace.clone(),
                name: p.name.name.clone(),
                generation: p.generation,
            })
            .collect(),
        bootstrap,
        discovery,
    })
}

/// Prints rendered proxies: YAML documents separated by `---`, or JSON (one object for one
/// proxy, an array for several).
pub fn print(rendered: &[Rendered], format: Format, single: bool) -> Result<String> {
    match format {
        Format::Yaml => {
            let mut out = String::new();
            for (index, doc) in rendered.iter().enumerate() {
                if index > 0 {
                    out.push_str("---\n");
                }
                out.push_str(&format!("# proxy {}\n", doc.node));
                // Long type URLs stay on one line (no folded `>-` blocks).
                let mut yaml_options = serde_saphyr::SerializerOptions::default();
                yaml_options.prefer_block_scalars = false;
                out.push_str(
                    &serde_saphyr::to_string_with_options(doc, yaml_options).map_err(Error::PrintYaml)?,
                );
            }
            Ok(out)
        }
        Format::Json if single && rendered.len() == 1 => {
            serde_json::to_string_pretty(&rendered[0]).map_err(Error::PrintJson)
        }
        Format::Json => serde_json::to_string_pretty(rendered).map_err(Error::PrintJson),
    }
}

/// Renders every proxy of a loaded directory (or the one asked for).
pub fn render_dir(inventory: &crate::inventory::Inventory, proxies: &[Proxy]) -> Result<Vec<Rendered>> {
    let compiled = Compiled::new(inventory);
    proxies.iter().map(|proxy| render(proxy, &compiled.snapshot(proxy))).collect()
}

/// Runs `render`; returns the exit code (0 printed, 1 bad arguments, 2 unreadable files).
pub fn run(options: &Options) -> u8 {
    let loaded = match load::load_dir(&options.dir, &options.root_namespace) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("error: {}", Report(&err));
            return exit::UNREADABLE;
        }
    };
    for rejected in &loaded.rejected {
        for error in &rejected.errors {
            eprintln!(
                "error: {}: {} {} is invalid and is not compiled: {error}",
                rejected.source, rejected.kind, rejected.name
            );
        }
    }
    let inventory = &loaded.inventory;
    let proxies: Vec<Proxy> = match &options.proxy {
        Some(id) => match Proxy::from_node_id(id) {
            Some(proxy) => {
                if !inventory.pods.contains_key(&proxy.pod) {
                    eprintln!(
                        "note: no Pod {id} in {}: rendering the outbound configuration only",
                        options.dir.display()
                    );
                }
                vec![proxy]
            }
            None => {
                eprintln!("error: --proxy {id:?} is not NAMESPACE/POD");
                return 1;
            }
        },
        None => inventory.pods.keys().map(|pod| Proxy { pod: pod.clone() }).collect(),
    };
    if proxies.is_empty() {
        eprintln!(
            "note: no Pods in {}: add Pods (and their EndpointSlices), or name one with --proxy NAMESPACE/POD",
            options.dir.display()
        );
        return 0;
    }
    let printed = render_dir(inventory, &proxies)
        .and_then(|rendered| print(&rendered, options.format, options.proxy.is_some()));
    match printed {
        Ok(text) => {
            println!("{}", text.trim_end());
            0
        }
        Err(err) => {
            eprintln!("error: {}", Report(&err));
            exit::UNREADABLE
        }
    }
}
