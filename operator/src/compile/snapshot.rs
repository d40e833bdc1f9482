//! What one proxy is configured with, as the xDS server holds it: resources encoded once and
//! shared. A [`Snapshot`] is a list of [`Part`]s — what every proxy gets, what its
//! namespace's proxies get, what is its own — each behind an `Arc`, so thousands of
//! snapshots hold one copy of what they share, and a part that did not change between two
//! snapshots is recognised without reading it. Every resource carries a hash of its bytes
//! (its version in delta xDS) and every part the digest of each type (the state-of-the-world
//! version is made of those).
//!
//! A resource name lives in one part only (the compiler names outbound resources
//! `outbound…`, inbound ones `inbound…`, and gives a namespace's short-name hosts names of
//! their own), so a type's resources are the parts' resources one after the other.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, OnceLock},
};

use envoy_types::pb::google::protobuf::Any;

use super::PolicyVersion;

/// FNV-1a: a hash with a fixed definition, so versions stay stable across builds and
/// replicas.
fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for byte in bytes {
        *hash ^= u64::from(*byte);
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// One encoded resource and the hash of its bytes.
#[derive(Debug, PartialEq)]
pub struct Resource {
    pub any: Any,
    pub hash: u64,
}

impl Resource {
    pub fn new(any: Any) -> Arc<Self> {
        let mut hash = FNV_OFFSET;
        fnv1a(&mut hash, &any.value);
        Arc::new(Self { any, hash })
    }

    /// Its version in delta xDS.
    pub fn version(&self) -> String {
        format!("{:016x}", self.hash)
    }
}

/// Resources by type URL, then by name.
pub type Resources = BTreeMap<&'static str, BTreeMap<String, Arc<Resource>>>;

/// Resources and the policies they carry; immutable once shared.
#[derive(Debug, Default)]
pub struct Part {
    resources: Resources,
    /// The policies whose configuration this part carries, each with the resource types that
    /// carry it: only the ACKs and NACKs of those types say anything about the policy.
    policies: BTreeMap<PolicyVersion, BTreeSet<&'static str>>,
    /// Per type, a hash of every resource's name and hash, made when first asked.
    digests: OnceLock<BTreeMap<&'static str, u64>>,
}

impl Clone for Part {
    fn clone(&self) -> Self {
        Self { resources: self.resources.clone(), policies: self.policies.clone(), digests: OnceLock::new() }
    }
}

impl PartialEq for Part {
    /// Equal resources (by their bytes' hash, which is what versions go by) and policies.
    fn eq(&self, other: &Self) -> bool {
        self.policies == other.policies && self.digests() == other.digests()
    }
}

impl Part {
    pub fn insert(&mut self, type_url: &'static str, name: impl Into<String>, any: Any) {
        self.digests.take();
        self.resources.entry(type_url).or_default().insert(name.into(), Resource::new(any));
    }

    /// Records that resources of `type_url` carry `policy`.
    pub fn carry(&mut self, policy: PolicyVersion, type_url: &'static str) {
        self.policies.entry(policy).or_default().insert(type_url);
    }

    pub fn resources(&self, type_url: &str) -> Option<&BTreeMap<String, Arc<Resource>>> {
        self.resources.get(type_url)
    }

    pub fn policies(&self) -> &BTreeMap<PolicyVersion, BTreeSet<&'static str>> {
        &self.policies
    }

    fn digests(&self) -> &BTreeMap<&'static str, u64> {
        self.digests.get_or_init(|| {
            let digest = |resources: &BTreeMap<String, Arc<Resource>>| {
                let mut hash = FNV_OFFSET;
                for (name, resource) in resources {
                    fnv1a(&mut hash, name.as_bytes());
                    fnv1a(&mut hash, &[0]);
                    fnv1a(&mut hash, &resource.hash.to_le_bytes());
                }
                hash
            };
            self.resources.iter().map(|(type_url, resources)| (*type_url, digest(resources))).collect()
        })
    }

    /// A hash of this part's resources of `type_url` (0 when it has none).
    pub fn digest(&self, type_url: &str) -> u64 {
        self.digests().get(type_url).copied().unwrap_or(0)
    }
}

/// Everything one proxy is configured with: its parts, in order.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    parts: Vec<Arc<Part>>,
}

impl PartialEq for Snapshot {
    /// Part by part: the same `Arc`, or equal content.
    fn eq(&self, other: &Self) -> bool {
        self.parts.len() == other.parts.len()
            && self.parts.iter().zip(&other.parts).all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
    }
}

impl Snapshot {
    pub fn from_parts(parts: Vec<Arc<Part>>) -> Self {
        Self { parts }
    }

    pub fn parts(&self) -> &[Arc<Part>] {
        &self.parts
    }

    /// The last part, for building a snapshot of one's own (tests, stand-in compilers).
    fn own(&mut self) -> &mut Part {
        if self.parts.is_empty() {
            self.parts.push(Arc::default());
        }
        let last = self.parts.len() - 1;
        Arc::make_mut(&mut self.parts[last])
    }

    pub fn insert(&mut self, type_url: &'static str, name: impl Into<String>, any: Any) {
        self.own().insert(type_url, name, any);
    }

    pub fn carry(&mut self, policy: PolicyVersion, type_url: &'static str) {
        self.own().carry(policy, type_url);
    }

    /// Carries `policy` on exactly `types`, none included (the cache's property tests).
    #[cfg(test)]
    pub fn carry_on(&mut self, policy: PolicyVersion, types: BTreeSet<&'static str>) {
        self.own().policies.insert(policy, types);
    }

    /// The resources of `type_url`, part after part.
    pub fn resources<'a>(&'a self, type_url: &'a str) -> impl Iterator<Item = (&'a str, &'a Arc<Resource>)> {
        self.parts
            .iter()
            .filter_map(move |part| part.resources(type_url))
            .flatten()
            .map(|(name, resource)| (name.as_str(), resource))
    }

    pub fn get(&self, type_url: &str, name: &str) -> Option<&Arc<Resource>> {
        self.parts.iter().find_map(|part| part.resources(type_url)?.get(name))
    }

    /// Every type URL with at least one resource.
    pub fn types(&self) -> BTreeSet<&'static str> {
        self.parts.iter().flat_map(|part| part.resources.keys().copied()).collect()
    }

    /// The policies the snapshot carries, with the types that carry each.
    pub fn policies(&self) -> BTreeMap<&PolicyVersion, BTreeSet<&'static str>> {
        let mut policies: BTreeMap<&PolicyVersion, BTreeSet<&'static str>> = BTreeMap::new();
        for part in &self.parts {
            for (policy, types) in &part.policies {
                policies.entry(policy).or_default().extend(types);
            }
        }
        policies
    }

    /// The state-of-the-world version of `type_url`: made of each part's digest of it, so
    /// the same resources have the same version on every replica and after a restart, and
    /// working it out costs nothing per resource once a part is digested.
    pub fn version(&self, type_url: &str) -> String {
        let mut hash = FNV_OFFSET;
        for part in &self.parts {
            fnv1a(&mut hash, &part.digest(type_url).to_le_bytes());
        }
        format!("{hash:016x}")
    }
}

/// Whether a subscription to `names` (None: every resource) takes the resource `name`: by
/// name, or by namespace as VHDS asks (`outbound_http` takes `outbound_http/…`).
pub fn wants(names: Option<&BTreeSet<String>>, name: &str) -> bool {
    let Some(names) = names else { return true };
    names.contains(name) || name.rsplit_once('/').is_some_and(|(prefix, _)| names.contains(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(bytes: &[u8]) -> Any {
        Any { type_url: "t".into(), value: bytes.to_vec() }
    }

    #[test]
    fn versions_follow_content_not_sharing() {
        let mut shared = Part::default();
        shared.insert("t", "a", any(b"1"));
        let shared = Arc::new(shared);
        let own = |bytes: &[u8]| {
            let mut part = Part::default();
            part.insert("t", "b", any(bytes));
            Arc::new(part)
        };
        let one = Snapshot::from_parts(vec![shared.clone(), own(b"2")]);
        let same = Snapshot::from_parts(vec![Arc::new((*shared).clone()), own(b"2")]);
        let other = Snapshot::from_parts(vec![shared, own(b"3")]);
        assert_eq!(one, same);
        assert_eq!(one.version("t"), same.version("t"));
        assert_ne!(one, other);
        assert_ne!(one.version("t"), other.version("t"));
        assert_eq!(one.resources("t").map(|(n, _)| n).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(one.version("none"), same.version("none"));
    }

    #[test]
    fn a_route_configuration_name_takes_its_virtual_hosts() {
        let names: BTreeSet<String> = ["outbound_http".to_string()].into();
        assert!(wants(Some(&names), "outbound_http"));
        assert!(wants(Some(&names), "outbound_http/api.shop:80"));
        assert!(!wants(Some(&names), "inbound|80"));
        assert!(!wants(Some(&names), "other/api.shop:80"));
        assert!(wants(None, "anything"));
    }
}
