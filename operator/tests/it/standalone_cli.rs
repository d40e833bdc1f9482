//! `breakwater-operator standalone` as a user runs it: exit codes, table and JSON output,
//! and bad inputs refused with a message that names the field or the file and line.

use std::{path::Path, process::Command};

/// The bad objects all tests share (kube::validation creates each on a real API server too).
#[path = "../../../crds/tests/common/corpus.rs"]
pub(crate) mod corpus;

use corpus::cli::{self, GOOD_LIMITS};

const BIN: &str = env!("CARGO_BIN_EXE_breakwater-operator");

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
";

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn standalone(files: &[(&str, &str)], args: &[&str]) -> Outcome {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write fixture");
    }
    run(dir.path(), args)
}

fn run(dir: &Path, args: &[&str]) -> Outcome {
    let dir = dir.to_str().expect("utf-8 path");
    let output = Command::new(BIN)
        .args(["standalone", "--once", "--dir", dir])
        .args(args)
        .output()
        .expect("binary runs");
    Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The Service `shop/api`, then a RateLimitPolicy on it with this spec.
fn rate_limit(spec: &str) -> String {
    format!("{SERVICE}{}", cli::rate_limit(spec))
}

#[test]
fn examples_are_all_accepted() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let out = run(&examples, &[]);
    assert_eq!(out.code, Some(0), "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(out.stdout.starts_with("NAMESPACE"), "{}", out.stdout);
    for kind in ["circuitbreakerpolicy/", "ratelimitpolicy/", "locklease/", "outboxrelay/"] {
        assert!(out.stdout.contains(kind), "{kind} missing from:\n{}", out.stdout);
    }
}

#[test]
fn json_output_holds_the_status_the_api_server_would() {
    let out = standalone(&[("p.yaml", &rate_limit(GOOD_LIMITS))], &["--output", "json"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let list: serde_json::Value = serde_json::from_str(&out.stdout).expect("valid JSON");
    assert_eq!(list["kind"], "List");
    let item = &list["items"][0];
    assert_eq!(item["kind"], "RateLimitPolicy");
    assert_eq!(item["spec"]["limits"][0]["burst"], 20);
    assert_eq!(item["status"]["targets"], 1);
    let types: Vec<&str> = item["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .filter_map(|c| c["type"].as_str())
        .collect();
    assert_eq!(types, ["Accepted", "ResolvedRefs", "Programmed"]);
}

#[test]
fn missing_target_is_reported_but_accepted() {
    let policy = rate_limit(GOOD_LIMITS).replace("name: api}]", "name: nope}]");
    let out = standalone(&[("p.yaml", &policy)], &[]);
    // Accepted (valid) but ResolvedRefs False: exit 0 counts acceptance only.
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    assert!(out.stdout.contains("TargetNotFound"), "{}", out.stdout);
    assert!(out.stdout.contains("Service shop/nope not found"), "{}", out.stdout);
}

/// Each bad input, the exit code, and what the message must name: the bad Breakwater objects
/// of the shared corpus (exit 1, refused by the schema or by the operator), then files that do
/// not hold a Breakwater object (exit 2).
#[test]
fn bad_inputs_are_refused_with_a_precise_message() {
    let mut cases: Vec<(String, String, i32, Vec<&str>)> = cli::cases()
        .into_iter()
        .map(|case| {
            let what = format!("{} (refused by {:?})", case.what, case.refused_by);
            (what, format!("{SERVICE}{}", case.document), 1, case.needles)
        })
        .collect();
    cases.extend([
        (
            "YAML syntax error".to_string(),
            format!("{SERVICE}apiVersion: v1\nkind: Namespace\nmetadata: {{name: [unclosed\n"),
            2,
            vec!["p.yaml:8", "YAML syntax error"],
        ),
        (
            "not an object".to_string(),
            format!("{SERVICE}just: a map\n"),
            2,
            vec!["p.yaml:6", "apiVersion and kind must be set"],
        ),
        (
            "unknown Breakwater kind".to_string(),
            "apiVersion: breakwater.dev/v1alpha1\nkind: RateLimit\nmetadata: {name: x}\nspec: {}\n"
                .to_string(),
            2,
            vec!["p.yaml:1", "no kind \"RateLimit\""],
        ),
    ]);
    for (what, text, code, needles) in cases {
        let out = standalone(&[("p.yaml", &text)], &[]);
        let all = format!("{}{}", out.stdout, out.stderr);
        assert_eq!(out.code, Some(code), "{what}: wrong exit code; output:\n{all}");
        for needle in needles {
            assert!(all.contains(needle), "{what}: output lacks {needle:?}:\n{all}");
        }
    }
}

#[test]
fn unreadable_directory_exits_2_and_names_it() {
    let out = run(Path::new("/nonexistent/breakwater"), &[]);
    assert_eq!(out.code, Some(2));
    assert!(out.stderr.contains("/nonexistent/breakwater: cannot read"), "{}", out.stderr);
}

#[test]
fn rbac_lists_no_wildcards() {
    let output = Command::new(BIN).arg("rbac").output().expect("binary runs");
    assert!(output.status.success());
    let rbac: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let text = rbac.to_string();
    assert!(!text.contains('*'), "{text}");
    let rules = rbac["clusterRules"].as_array().expect("clusterRules");
    assert!(rules.iter().any(|r| {
        r["resources"].as_array().is_some_and(|res| res.iter().any(|x| x == "ratelimitpolicies/status"))
    }));
}
