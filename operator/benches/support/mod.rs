//! What the operator's benchmarks share: the commit a figure comes from, and the process's
//! memory.

use std::{path::Path, process::Command};

/// `git rev-parse --short HEAD`, marked when the operator's sources (or the test harness it
/// runs on, or the lock file) differ from it: other work in the tree is not a benchmark's
/// concern.
pub fn commit() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| Command::new("git").arg("-C").arg(&root).args(args).output();
    let head = git(&["rev-parse", "--short", "HEAD"])
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown (not a git checkout)".to_string());
    let clean = git(&["diff", "--quiet", "HEAD", "--", "operator", "tests/harness", "Cargo.lock"])
        .is_ok_and(|out| out.status.success());
    if clean { head } else { format!("{head} + uncommitted changes under operator/") }
}

/// A field of /proc/self/status in kB (`VmRSS`, `VmHWM`); 0 when it cannot be read.
pub fn vm_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}
