//! Copies the Envoy descriptor set that `envoy-types` ships (`src/generated/types.bin`) into
//! OUT_DIR, so that `render` can print any Envoy resource as protobuf-JSON with prost-reflect.
//! envoy-types does not export the bytes, so the package is found through `cargo metadata`
//! (the very cargo that runs this build, from the `CARGO` variable): the version the
//! operator actually links against, wherever the registry or a vendor directory keeps it.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=Cargo.toml");
    println!("cargo:rerun-if-changed=../Cargo.lock");
    if let Err(message) = copy_descriptor_set() {
        // A build script reports failure by exiting non-zero; the message is what cargo shows.
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

fn copy_descriptor_set() -> Result<(), String> {
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|_| "OUT_DIR is not set".to_string())?);
    let package_dir = envoy_types_dir()?;
    let source = package_dir.join("src/generated/types.bin");
    if !source.is_file() {
        return Err(format!(
            "the envoy-types package at {} has no src/generated/types.bin: breakwater-operator needs the \
             Envoy descriptor set it ships to render resources; use an envoy-types release that includes it",
            package_dir.display()
        ));
    }
    println!("cargo:rerun-if-changed={}", source.display());
    std::fs::copy(&source, out_dir.join("envoy_types.bin"))
        .map_err(|err| format!("cannot copy {} into OUT_DIR: {err}", source.display()))?;
    Ok(())
}

/// The directory of the envoy-types package this crate depends on.
fn envoy_types_dir() -> Result<PathBuf, String> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let manifest_dir = env::var("CARGO_MANIFEST_DIR").map_err(|_| "CARGO_MANIFEST_DIR is not set")?;
    // Only the target's packages: on a fresh registry, packages of other platforms were never
    // downloaded, and `--offline` would fail on them.
    let target = env::var("TARGET").map_err(|_| "TARGET is not set")?;
    let output = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--filter-platform", &target])
        .current_dir(&manifest_dir)
        .output()
        .map_err(|err| format!("cannot run `{cargo} metadata` to locate envoy-types: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "`{cargo} metadata` failed while locating envoy-types: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|err| format!("cannot parse `cargo metadata` output: {err}"))?;
    let packages = metadata["packages"].as_array().ok_or("`cargo metadata` lists no packages")?;
    let this = env::var("CARGO_PKG_NAME").unwrap_or_default();

    // The envoy-types this package depends on, from the resolved graph; any envoy-types if the
    // graph is missing (it never is with --format-version 1, but a clear fallback costs little).
    let this_id = packages.iter().find(|p| p["name"] == this.as_str()).and_then(|p| p["id"].as_str());
    let dep_id = this_id.and_then(|id| {
        metadata["resolve"]["nodes"].as_array()?.iter().find(|n| n["id"] == id)?["deps"]
            .as_array()?
            .iter()
            .find(|d| d["name"] == "envoy_types")?["pkg"]
            .as_str()
    });
    let package = packages
        .iter()
        .find(|p| dep_id.is_some_and(|id| p["id"] == id))
        .or_else(|| packages.iter().find(|p| p["name"] == "envoy-types"))
        .ok_or("envoy-types is not among the dependencies `cargo metadata` resolved")?;
    let manifest = package["manifest_path"].as_str().ok_or("envoy-types has no manifest_path")?;
    Path::new(manifest)
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("unexpected manifest path {manifest}"))
}
