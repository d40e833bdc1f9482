//! The crates' dependencies point one way (docs/architecture.md): the control plane never
//! links the data plane. `breakwater-operator` reads leases through `breakwater-store`, the
//! small crate both use; linking `breakwater-agent` would pull the rate-limit server, the
//! lease HTTP API and the ADS client into the operator. Checked on what cargo resolves, so a
//! dependency added back to operator/Cargo.toml fails here.

use std::process::Command;

use serde_json::Value;

/// `cargo metadata` of the workspace, without resolving (`--no-deps`: the manifests as
/// written, offline).
fn metadata() -> Value {
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline", "--manifest-path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"))
        .output()
        .expect("cargo metadata runs");
    assert!(output.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON")
}

/// The names of `package`'s dependencies of `kind` (null: normal, "dev", "build").
fn dependencies(metadata: &Value, package: &str, kind: Option<&str>) -> Vec<String> {
    let packages = metadata["packages"].as_array().expect("packages");
    let found =
        packages.iter().find(|p| p["name"] == package).unwrap_or_else(|| panic!("no package {package}"));
    found["dependencies"]
        .as_array()
        .expect("dependencies")
        .iter()
        .filter(|d| d["kind"].as_str() == kind)
        .map(|d| d["name"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn the_operator_does_not_link_the_agent() {
    let metadata = metadata();
    for kind in [None, Some("build")] {
        let operator = dependencies(&metadata, "breakwater-operator", kind);
        assert!(
            !operator.iter().any(|d| d == "breakwater-agent"),
            "breakwater-operator's {kind:?} dependencies include breakwater-agent: {operator:?}"
        );
    }
    assert!(dependencies(&metadata, "breakwater-operator", None).iter().any(|d| d == "breakwater-store"));
    assert!(dependencies(&metadata, "breakwater-agent", None).iter().any(|d| d == "breakwater-store"));
}

#[test]
fn the_store_links_neither_plane() {
    let metadata = metadata();
    let store = dependencies(&metadata, "breakwater-store", None);
    for crate_ in ["breakwater-operator", "breakwater-agent", "breakwater-api"] {
        assert!(!store.iter().any(|d| d == crate_), "breakwater-store depends on {crate_}: {store:?}");
    }
}
