//! The committed CRD YAML (crds/yaml and the Helm chart's crds/) must be what the Rust types
//! generate, or the cluster would enforce a different schema than the operator and standalone
//! mode validate against.

use std::path::{Path, PathBuf};

/// The directories `make crds` writes, relative to the workspace root.
const COMMITTED_DIRS: &[&str] = &["crds/yaml", "charts/breakwater/crds"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("crds/ sits in the workspace root").to_path_buf()
}

/// The first line where the two texts differ, to point at the drift.
fn first_difference(committed: &str, generated: &str) -> String {
    let mut committed_lines = committed.lines();
    let mut generated_lines = generated.lines();
    for line in 1.. {
        match (committed_lines.next(), generated_lines.next()) {
            (None, None) => break,
            (a, b) if a == b => continue,
            (a, b) => {
                return format!(
                    "first difference at line {line}:\n  committed: {}\n  generated: {}",
                    a.unwrap_or("<end of file>"),
                    b.unwrap_or("<end of file>")
                );
            }
        }
    }
    "the files differ only in line endings".to_owned()
}

#[test]
fn committed_crd_yaml_matches_the_rust_types() {
    let root = workspace_root();
    let mut stale = Vec::new();
    for crd in breakwater_api::crds() {
        let generated = breakwater_api::crd_yaml(&crd).expect("the CRD renders as YAML");
        let file = breakwater_api::crd_file_name(&crd);
        for dir in COMMITTED_DIRS {
            let path = root.join(dir).join(&file);
            match std::fs::read_to_string(&path) {
                Ok(committed) if committed == generated => {}
                Ok(committed) => {
                    stale.push(format!("{dir}/{file} is stale; {}", first_difference(&committed, &generated)))
                }
                Err(err) => stale.push(format!("{dir}/{file} cannot be read: {err}")),
            }
        }
    }
    assert!(
        stale.is_empty(),
        "the committed CRDs differ from the Rust types in crds/src; run `make crds` and commit the result:\n{}",
        stale.join("\n")
    );
}

#[test]
fn no_committed_crd_is_left_over() {
    let root = workspace_root();
    let expected: Vec<String> = breakwater_api::crds().iter().map(breakwater_api::crd_file_name).collect();
    for dir in COMMITTED_DIRS {
        let entries =
            std::fs::read_dir(root.join(dir)).unwrap_or_else(|err| panic!("cannot list {dir}: {err}"));
        for entry in entries {
            let name = entry.expect("a directory entry").file_name().to_string_lossy().into_owned();
            if !(name.ends_with(".yaml") || name.ends_with(".yml")) {
                continue;
            }
            assert!(
                expected.contains(&name),
                "{dir}/{name} is not generated from any Rust type; delete it or run `make crds`"
            );
        }
    }
}
