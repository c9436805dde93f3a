//! The container image and Kubernetes manifests: their linters pass, and the image's build
//! command is the one scripts/build-like-docker.sh runs outside Docker.

use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Runs hadolint, kubernetes-validate and checkov through scripts/check-deploy.sh (which
/// installs them into a cached virtualenv on first use: about a minute once).
#[test]
fn container_and_manifests_pass_their_linters() {
    let out = Command::new("bash")
        .arg("scripts/check-deploy.sh")
        .current_dir(ROOT)
        .output()
        .expect("run bash scripts/check-deploy.sh");
    assert!(
        out.status.success(),
        "scripts/check-deploy.sh failed ({})\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

/// Every `cargo build` command line in a file, cut at the end of the shell command.
fn cargo_builds(file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(ROOT).join(file))
        .unwrap_or_else(|e| panic!("read {file}: {e}"));
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| line.find("cargo build").map(|at| &line[at..]))
        .map(|cmd| {
            let end = cmd.find(['&', ';', '\\', '|']).unwrap_or(cmd.len());
            cmd[..end].trim().to_string()
        })
        .collect()
}

#[test]
fn docker_build_steps_match_the_script() {
    let docker = cargo_builds("Dockerfile");
    let script = cargo_builds("scripts/build-like-docker.sh");
    assert!(
        docker.iter().any(|c| c == "cargo build --release --locked"),
        "the Dockerfile builds with something else than `cargo build --release --locked`: {docker:?}"
    );
    assert_eq!(
        docker, script,
        "the Dockerfile and scripts/build-like-docker.sh run different cargo builds"
    );
}
