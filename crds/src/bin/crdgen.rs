//! Writes every CRD as YAML into the directories given on the command line
//! (`make crds` passes crds/yaml and the chart's crds/ folder).

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let dirs: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if dirs.is_empty() {
        eprintln!("usage: crdgen DIR [DIR...]");
        return ExitCode::from(2);
    }
    for crd in breakwater_api::crds() {
        let yaml = match breakwater_api::crd_yaml(&crd) {
            Ok(yaml) => yaml,
            Err(err) => {
                eprintln!("crdgen: cannot render {}: {err}", crd.spec.names.kind);
                return ExitCode::FAILURE;
            }
        };
        for dir in &dirs {
            let path = dir.join(breakwater_api::crd_file_name(&crd));
            if let Err(err) = std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, &yaml)) {
                eprintln!("crdgen: cannot write {}: {err}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
