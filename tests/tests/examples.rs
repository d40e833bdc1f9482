//! Every example in `examples/` is accepted, resolves its references, and says what it does.

use std::path::{Path, PathBuf};

use breakwater_operator::standalone::{self, load};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn every_example_is_accepted_and_resolved() {
    let loaded = load::load_dir(&examples_dir(), "breakwater-system").expect("examples load");
    assert!(loaded.rejected.is_empty(), "schema violations: {:?}", loaded.rejected);
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff_now());
    let rows = standalone::evaluate(&loaded, None, &Default::default(), &now);
    for kind in ["CircuitBreakerPolicy", "RateLimitPolicy", "LockLease", "OutboxRelay"] {
        assert!(rows.iter().any(|r| r.kind == kind), "no example of {kind}");
    }
    for row in &rows {
        // Programmed needs proxies; Held, Tripped and WouldReject read Redis: standalone mode
        // has neither.
        let data_plane = ["Programmed", "Held", "Tripped", "WouldReject"];
        for condition in row.status.conditions.iter().filter(|c| !data_plane.contains(&c.type_.as_str())) {
            assert_eq!(
                condition.status, "True",
                "{} {}: {} {}: {}",
                row.kind, row.name, condition.type_, condition.reason, condition.message
            );
        }
    }
    let root_override = rows.iter().any(|r| {
        r.name.namespace == "breakwater-system"
            && r.object.pointer("/spec/mode").and_then(|m| m.as_str()) == Some("Override")
    });
    assert!(root_override, "an example shows a platform-team Override in the root namespace");
}

#[test]
fn every_example_file_opens_with_a_comment() {
    let mut files: Vec<_> =
        std::fs::read_dir(examples_dir()).expect("examples dir").flatten().map(|e| e.path()).collect();
    files.sort();
    assert!(!files.is_empty());
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable");
        assert!(text.starts_with("# "), "{} must open with a comment saying what it does", file.display());
    }
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}
