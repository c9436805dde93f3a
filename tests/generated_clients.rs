//! The API as client developers in other languages generate it from `proto/`, with the
//! generators they use (installed by scripts/codegen-tools.sh).

mod common;

use std::path::Path;
use std::process::Command;

use common::TestApp;

/// Issue 24: Go code generation failed ("unable to determine Go import path").
#[test]
fn go_code_generates_from_the_protos() {
    let protoc = std::env::var("THERMOSTAT_TEST_PROTOC")
        .expect("THERMOSTAT_TEST_PROTOC: run the tests through scripts/test.sh");
    let out = tempfile::tempdir().expect("tempdir");
    let generated = Command::new(protoc)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["-I", "proto", "--go_out"])
        .arg(out.path())
        .args([
            "thermostat/v1/setpoint.proto",
            "thermostat/v1/control.proto",
        ])
        .output()
        .expect("protoc runs");
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let package = out.path().join("thermostat/gen/go/thermostat/v1");
    for (file, declares) in [
        ("setpoint.pb.go", "type PutSetpointRequest struct"),
        ("control.pb.go", "type HeaterCommandEvent struct"),
    ] {
        let code = std::fs::read_to_string(Path::new(&package).join(file)).expect(file);
        assert!(code.contains("package thermostatv1"), "{file}");
        assert!(code.contains(declares), "{file}");
    }
}

/// Issue 24: a Python client generated with grpcio-tools puts, updates with a mask, reads the
/// error details of bad requests and pages through 1,200 setpoints (clients/python/).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_python_client_runs_its_scenario() {
    let mut config = TestApp::fresh_config().await;
    // The scenario's 1,200 Puts, from one identity, at once.
    config.limits.write_rate_limit = 100_000;
    config.limits.write_burst = 100_000;
    let app = TestApp::spawn_with(config).await;
    let addr = app.addr.to_string();
    let ran = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["clients/python/run.sh", &addr])
            .output()
            .expect("run clients/python/run.sh")
    })
    .await
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&ran.stdout),
        String::from_utf8_lossy(&ran.stderr),
    );
    assert!(
        ran.status.success(),
        "--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    for step in [
        "put and masked update: ok",
        "error details: ok",
        "1200 setpoints in",
    ] {
        assert!(stdout.contains(step), "{step} missing from:\n{stdout}");
    }
}

fn buf(args: &[&str]) -> std::process::Output {
    Command::new("bash")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("scripts/buf.sh")
        .args(args)
        .output()
        .expect("run scripts/buf.sh")
}

fn printed(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Issue 24: `buf lint` (STANDARD and every comment rule; exceptions explained in buf.yaml).
#[test]
fn the_protos_pass_buf_lint() {
    let out = buf(&["lint"]);
    assert!(out.status.success(), "{}", printed(&out));
}

/// Issue 24: no change that breaks generated code since the newest release tag (`v*`).
#[test]
fn the_protos_keep_what_the_last_release_generated() {
    let tag = Command::new("git")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["describe", "--tags", "--abbrev=0", "--match", "v*"])
        .output()
        .expect("run git");
    assert!(
        tag.status.success(),
        "no release tag v* to compare with (a clone without tags?): {}",
        printed(&tag)
    );
    let tag = String::from_utf8_lossy(&tag.stdout).trim().to_owned();
    let out = buf(&["breaking", "--against", &format!(".git#tag={tag}")]);
    assert!(
        out.status.success(),
        "breaking changes since {tag}: {}",
        printed(&out)
    );
}

/// Issue 24 (AIP-203): every field of every request message, and of the resources a request
/// carries, says whether it is required, optional or output only.
#[test]
fn every_request_field_has_a_field_behavior() {
    use prost_reflect::{DescriptorPool, Value};
    let pool = DescriptorPool::decode(thermostat::proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let behavior = pool
        .get_extension_by_name("google.api.field_behavior")
        .expect("google.api.field_behavior is in the descriptor set");
    let mut missing = Vec::new();
    let mut checked = 0;
    for message in pool.all_messages() {
        let name = message.full_name();
        let is_input = name.ends_with("Request")
            || ["thermostat.v1.Setpoint", "thermostat.v1.SensorReading"].contains(&name);
        if !name.starts_with("thermostat.v1.") || !is_input {
            continue;
        }
        for field in message.fields() {
            checked += 1;
            let options = field.options();
            let given = options.has_extension(&behavior)
                && matches!(&*options.get_extension(&behavior), Value::List(v) if !v.is_empty());
            if !given {
                missing.push(field.full_name().to_owned());
            }
        }
    }
    assert!(checked > 30, "only {checked} fields looked at");
    assert!(missing.is_empty(), "without a field_behavior: {missing:?}");
}
