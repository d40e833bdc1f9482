//! The Envoy descriptor set `render` prints with (`operator/descriptors/envoy.bin`) is the one
//! envoy-types ships (`src/generated/types.bin`, not exported by the crate). It is committed
//! rather than copied out of the package at build time (which took a nested `cargo metadata`
//! in a build script), and this test fails when it differs from the locked envoy-types' set:
//! after an upgrade, run `make golden`. (The whole set, not the part the examples need: the
//! compiler emits types no example shows, such as rate-limit descriptor extensions.)

use std::path::Path;

const COMMITTED: &str = "descriptors/envoy.bin";

/// The locked envoy-types' descriptor set, found through cargo.
fn envoy_types_descriptors() -> Vec<u8> {
    let output = breakwater_harness::cargo_metadata(Path::new(env!("CARGO_MANIFEST_DIR")));
    let metadata: serde_json::Value = serde_json::from_slice(&output).expect("metadata JSON");
    let manifest = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str())
        .expect("cargo knows the locked envoy-types");
    let path = Path::new(manifest).parent().expect("package dir").join("src/generated/types.bin");
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

#[test]
fn the_committed_envoy_descriptors_are_envoy_types_own() {
    let wanted = envoy_types_descriptors();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(COMMITTED);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &wanted).expect("write the descriptors");
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == wanted,
        "{COMMITTED} ({} bytes) differs from envoy-types' set ({} bytes): run `make golden` and commit it",
        committed.len(),
        wanted.len()
    );
}
