//! Worlds written as YAML, loaded by the loader standalone mode uses, so every fixture
//! passes the CRD schema and CEL rules.

use std::{collections::BTreeMap, path::Path};

use breakwater_operator::{
    inventory::Inventory,
    standalone::load::{Loaded, load_text},
};

/// Two namespaces: `shop`, labelled `tier: production`, and `lab`, labelled `tier: sandbox`.
pub const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {tier: production}}
---
apiVersion: v1
kind: Namespace
metadata: {name: lab, labels: {tier: sandbox}}
"#;

/// The inventory of `yaml` (multi-document), with root namespace `breakwater-system`; fails
/// the test when an object breaks the schema.
pub fn load(yaml: &str) -> Inventory {
    let mut loaded = Loaded { inventory: Inventory::new("breakwater-system"), ..Loaded::default() };
    load_text(Path::new("world.yaml"), yaml, &mut loaded, &mut BTreeMap::new()).expect("world loads");
    assert!(loaded.rejected.is_empty(), "fixture breaks the schema: {:?}", loaded.rejected);
    loaded.inventory
}
