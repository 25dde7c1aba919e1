//! Manifest validation, offline and at start-up.
//!
//! Goal: `entrepot validate DIR` accepts the shipped `examples/`, and for each kind of
//! mistake (unknown kind, missing field, duplicate address, unknown plan, bad pattern, bad
//! YAML) exits 1 naming the file, the line and the reason; `serve` refuses to start on
//! such a directory with the same message.
//!
//! Method: a valid base file (plans, an address space) plus one broken `case.yaml` per
//! mistake in a temporary directory, checked with the real binary.

use std::path::Path;
use std::process::Command;

const BASE: &str = "\
apiVersion: admin.enmasse.io/v1beta2
kind: AddressSpacePlan
metadata: {name: small}
spec: {maxConnections: 10}
---
apiVersion: admin.enmasse.io/v1beta2
kind: AddressPlan
metadata: {name: small-queue}
spec: {maxDepth: 100}
---
apiVersion: enmasse.io/v1beta1
kind: AddressSpace
metadata: {name: app}
spec: {type: standard, plan: small}
";

fn validate(dir: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_entrepot"))
        .arg("validate")
        .arg(dir)
        .output()
        .expect("run entrepot validate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const ADDRESS: &str =
    "apiVersion: enmasse.io/v1beta1\nkind: Address\nmetadata: {name: app.orders}\n";

#[test]
fn validate_accepts_the_shipped_examples() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let (code, stdout, stderr) = validate(&examples);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("1 address spaces, 1 addresses, 1 users"),
        "{stdout}"
    );
}

#[test]
fn each_invalid_manifest_is_reported_with_file_line_and_reason() {
    let address = format!("{ADDRESS}spec: {{address: orders, type: queue, plan: small-queue}}\n");
    let cases: Vec<(&str, String, &str)> = vec![
        ("unknown kind", "kind: Queue\nmetadata: {name: x}\n".into(), "case.yaml:1: unknown kind \"Queue\""),
        (
            "missing field",
            format!("{ADDRESS}spec: {{type: queue, plan: small-queue}}\n"),
            "case.yaml:4: spec: missing field `address`",
        ),
        (
            "duplicate address",
            format!("{address}---\n{address}"),
            "case.yaml:6: duplicate address \"orders\" in address space \"app\" (first defined at",
        ),
        (
            "unknown plan",
            format!("{ADDRESS}spec: {{address: orders, type: queue, plan: huge}}\n"),
            "case.yaml:1: unknown address plan \"huge\"",
        ),
        (
            "bad pattern",
            "apiVersion: user.enmasse.io/v1beta1\nkind: MessagingUser\nmetadata: {name: app.u}\nspec:\n  username: u\n  authentication: {type: serviceaccount}\n  authorization: [{addresses: [\"or*ders\"], operations: [send]}]\n".into(),
            "case.yaml:1: address pattern \"or*ders\": `*` may only end a pattern",
        ),
        (
            "bad YAML",
            format!("{ADDRESS}spec: {{address: [orders\n"),
            "case.yaml:5: ",
        ),
        (
            "unknown space",
            "apiVersion: enmasse.io/v1beta1\nkind: Address\nmetadata: {name: nope.orders}\nspec: {address: orders, type: queue, plan: small-queue}\n".into(),
            "case.yaml:1: address \"orders\" names address space \"nope\", which is not defined",
        ),
    ];
    for (what, case, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.yaml"), BASE).unwrap();
        std::fs::write(dir.path().join("case.yaml"), &case).unwrap();
        let (code, _, stderr) = validate(dir.path());
        assert_eq!(code, 1, "{what}: expected exit 1, stderr: {stderr}");
        assert!(
            stderr.contains(expected),
            "{what}: expected {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn serve_refuses_to_start_on_invalid_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    std::fs::write(manifests.join("base.yaml"), BASE).unwrap();
    std::fs::write(manifests.join("case.yaml"), "kind: Queue\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_entrepot"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .arg("--manifests")
        .arg(&manifests)
        .output()
        .expect("run entrepot serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("case.yaml:1: unknown kind \"Queue\""),
        "{stderr}"
    );
}
