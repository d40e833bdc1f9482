//! Golden files: what `breakwater-operator render` prints for every Pod of `examples/`, one
//! file per proxy under `tests/golden/`. Any difference fails; `make golden` (which sets
//! `UPDATE_GOLDEN=1`) rewrites the files, so a change to the compiler shows up as a diff in
//! review.

use std::path::{Path, PathBuf};

use breakwater_operator::{
    compile::{Compiled, Proxy},
    render::{self, Format},
    standalone::load,
};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Where two texts first differ, with a few lines of context from each.
fn diff_hint(expected: &str, actual: &str) -> String {
    let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    let first = e.iter().zip(&a).position(|(x, y)| x != y).unwrap_or(e.len().min(a.len()));
    let window = |lines: &[&str]| -> String {
        lines
            .iter()
            .enumerate()
            .skip(first.saturating_sub(2))
            .take(6)
            .map(|(i, l)| format!("  {:>5} | {l}\n", i + 1))
            .collect()
    };
    format!(
        "first difference at line {} (golden has {} lines, output {}):\n golden:\n{} output:\n{}",
        first + 1,
        e.len(),
        a.len(),
        window(&e),
        window(&a)
    )
}

#[test]
fn every_example_proxy_matches_its_golden_file() {
    let loaded = load::load_dir(&examples(), "breakwater-system").expect("examples load");
    assert!(!loaded.inventory.pods.is_empty(), "the examples declare Pods");
    let compiled = Compiled::new(&loaded.inventory);
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let dir = golden_dir();
    std::fs::create_dir_all(&dir).expect("golden dir");

    let mut expected_files = Vec::new();
    let mut failures = Vec::new();
    for pod in loaded.inventory.pods.keys() {
        let proxy = Proxy { pod: pod.clone() };
        let rendered = render::render(&proxy, &compiled.snapshot(&proxy)).expect("renders");
        let text = render::print(&[rendered], Format::Yaml, true).expect("prints") + "\n";
        let file = format!("{}.{}.yaml", pod.namespace, pod.name);
        let path = dir.join(&file);
        expected_files.push(file.clone());
        if update {
            std::fs::write(&path, &text).expect("write golden file");
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(golden) if golden == text => {}
            Ok(golden) => failures.push(format!("{file}: {}", diff_hint(&golden, &text))),
            Err(err) => failures.push(format!("{file}: cannot read ({err})")),
        }
    }
    // A golden file for a proxy that no longer exists is stale.
    for entry in std::fs::read_dir(&dir).expect("golden dir").flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".yaml") && !expected_files.contains(&name) {
            if update {
                std::fs::remove_file(entry.path()).expect("remove stale golden file");
            } else {
                failures.push(format!("{name}: no such proxy in examples/ any more"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "compiled configuration differs from tests/golden; if the change is intended, run `make golden` and review the diff\n\n{}",
        failures.join("\n\n")
    );
}

#[test]
fn render_prints_the_same_bytes_twice() {
    let loaded = load::load_dir(&examples(), "breakwater-system").expect("examples load");
    let proxies: Vec<Proxy> = loaded.inventory.pods.keys().map(|p| Proxy { pod: p.clone() }).collect();
    let once = render::render_dir(&loaded.inventory, &proxies).expect("renders");
    let twice = render::render_dir(&loaded.inventory, &proxies).expect("renders");
    for format in [Format::Yaml, Format::Json] {
        assert_eq!(
            render::print(&once, format, false).expect("prints"),
            render::print(&twice, format, false).expect("prints")
        );
    }
}
