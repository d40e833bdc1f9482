//! The image's build context is a complete workspace. The Dockerfile copies the context as
//! it is (no list of members to keep by hand) and builds with `cargo build --locked -p ...`;
//! this test makes that context from the tracked files minus `.dockerignore`, and asks cargo
//! to resolve the workspace there, offline and locked, and to find every package the
//! Dockerfile builds. A member left out of the context (a missing Cargo.toml once broke
//! `docker build`) fails here, without a Docker engine.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `*` within one path component, as Docker's patterns (filepath.Match) read it.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            text.starts_with(head)
                && (0..=text.len() - head.len()).any(|skip| glob(tail, &text[head.len() + skip..]))
        }
    }
}

/// Whether `path` (relative, `/`-separated) is left out by a `.dockerignore` pattern: a path
/// from the root (it and everything under it), or `**/NAME` (NAME at any depth).
fn ignored(path: &str, patterns: &[String]) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    patterns.iter().any(|pattern| match pattern.strip_prefix("**/") {
        Some(name) => parts.iter().any(|part| glob(name, part)),
        None => {
            let wanted: Vec<&str> = pattern.split('/').collect();
            wanted.len() <= parts.len() && wanted.iter().zip(&parts).all(|(w, p)| glob(w, p))
        }
    })
}

fn patterns() -> Vec<String> {
    let text = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    let patterns: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.trim_end_matches('/').to_string())
        .collect();
    for pattern in &patterns {
        let rest = pattern.strip_prefix("**/").unwrap_or(pattern);
        let plain = !pattern.starts_with('!') && !rest.contains("**");
        assert!(plain, ".dockerignore pattern {pattern:?} is of a form this test does not read; extend it");
    }
    patterns
}

#[test]
fn patterns_read_as_docker_reads_them() {
    let patterns: Vec<String> = ["target", ".venv*", "**/__pycache__", "docs/build"].map(String::from).into();
    assert!(ignored("target/debug/x", &patterns));
    assert!(ignored(".venv-old/bin/python", &patterns));
    assert!(ignored("charts/tests/__pycache__/a.pyc", &patterns));
    assert!(ignored("docs/build/index.html", &patterns));
    assert!(!ignored("operator/target.rs", &patterns));
    assert!(!ignored("docs/builder.md", &patterns));
    assert!(!ignored("tests/harness/Cargo.toml", &patterns));
}

#[test]
fn the_build_context_is_a_complete_workspace() {
    let patterns = patterns();
    let listed = Command::new("git").args(["ls-files", "-z"]).current_dir(root()).output().expect("git runs");
    assert!(listed.status.success(), "git ls-files: {}", String::from_utf8_lossy(&listed.stderr));
    let context = tempfile::tempdir().expect("temp dir");
    let mut copied = 0;
    for path in String::from_utf8_lossy(&listed.stdout).split('\0').filter(|p| !p.is_empty()) {
        let source = root().join(path);
        if ignored(path, &patterns) || !source.is_file() {
            continue;
        }
        let target = context.path().join(path);
        std::fs::create_dir_all(target.parent().expect("a parent")).expect("mkdir");
        std::fs::copy(&source, &target).expect("copy into the context");
        copied += 1;
    }
    assert!(copied > 50, "only {copied} files in the context");

    // Fails, with cargo's message, when a member is missing from the context.
    let metadata = breakwater_harness::cargo_metadata(context.path());
    let metadata: serde_json::Value = serde_json::from_slice(&metadata).expect("metadata JSON");
    let members: Vec<String> = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["source"].is_null())
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();

    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let words: Vec<&str> = dockerfile.split_whitespace().collect();
    let built: Vec<&str> = words.windows(2).filter(|w| w[0] == "-p").map(|w| w[1]).collect();
    assert!(!built.is_empty(), "the Dockerfile builds no package with -p");
    for package in built {
        assert!(members.iter().any(|m| m == package), "the Dockerfile builds {package}, not in {members:?}");
    }
}
