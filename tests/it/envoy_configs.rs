//! Every Envoy configuration we ship passes `envoy --mode validate` with Envoy 1.40.

use std::process::Command;

use crate::harness::{envoy_bin, repo_path};

#[test]
fn every_shipped_envoy_config_validates() {
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(repo_path("envoy")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = Command::new(envoy_bin())
                .args(["--mode", "validate", "--disable-hot-restart", "-c"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{} does not validate:\n{}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    checked.sort();
    assert_eq!(
        checked,
        [
            "demo-fail-open.yaml",
            "demo.yaml",
            "envoy.yaml",
            "routes.yaml"
        ],
        "every shipped bootstrap, and only those"
    );
}
