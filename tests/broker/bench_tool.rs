//! `entrepot bench` hands over to the separate `entrepot-bench` binary: with the same
//! arguments (`--help` included) and its exit status, and with an error naming that binary
//! and how to build it when it is missing.
//!
//! Method: the real `entrepot` binary, hard-linked into a fresh directory, next to a
//! stand-in `entrepot-bench` (a symlink to `/bin/sh` or `/bin/echo`, which show what they
//! were given) or next to nothing with an empty PATH. The load generator itself is tested
//! in its own crate (bench/tests/bench_tool.rs).

use std::path::Path;
use std::process::{Command, Output};

use tempfile::TempDir;

/// A directory holding `entrepot` and, when given, `entrepot-bench` as a symlink to `fake`.
fn install(fake: Option<&str>) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("bench-dispatch")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir");
    let entrepot = dir.path().join("entrepot");
    // A hard link (same file system as target/), so the binary sees this directory as its
    // own; a copy where the link is refused.
    if std::fs::hard_link(env!("CARGO_BIN_EXE_entrepot"), &entrepot).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_entrepot"), &entrepot).expect("copy entrepot");
    }
    if let Some(fake) = fake {
        std::os::unix::fs::symlink(fake, dir.path().join("entrepot-bench")).expect("symlink");
    }
    dir
}

fn run(dir: &Path, args: &[&str], path: &Path) -> Output {
    Command::new(dir.join("entrepot"))
        .args(args)
        .env("PATH", path)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run entrepot")
}

#[test]
fn bench_runs_entrepot_bench_next_to_it_with_the_same_arguments_and_exit_status() {
    let dir = install(Some("/bin/sh"));
    // `sh -c SCRIPT sh ARGS…` prints ARGS and exits 3: what entrepot-bench would receive.
    let out = run(
        dir.path(),
        &[
            "bench",
            "-c",
            r#"printf '%s|' "$@"; exit 3"#,
            "sh",
            "--help",
            "--url",
            "amqp://127.0.0.1:1",
            "--persistent",
        ],
        dir.path(),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "--help|--url|amqp://127.0.0.1:1|--persistent|",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn bench_plot_runs_entrepot_bench_plot() {
    let dir = install(Some("/bin/echo"));
    let out = run(
        dir.path(),
        &["bench-plot", "--input", "runs", "--output", "p.png"],
        dir.path(),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "plot --input runs --output p.png\n"
    );
}

#[test]
fn bench_without_entrepot_bench_fails_naming_it_and_how_to_build_it() {
    let dir = install(None);
    let empty = tempfile::tempdir().expect("empty PATH dir");
    let out = run(dir.path(), &["bench", "--count", "1"], empty.path());
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`entrepot-bench` binary"), "{stderr}");
    assert!(
        stderr.contains("cargo build --release -p entrepot-bench"),
        "{stderr}"
    );
}
