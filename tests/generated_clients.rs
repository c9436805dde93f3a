//! The API as client developers in other languages generate it from `proto/`, with the
//! generators they use (installed by scripts/codegen-tools.sh).

use std::path::Path;
use std::process::Command;

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
