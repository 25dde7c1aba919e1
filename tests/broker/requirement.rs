//! What a test needs from the machine beyond the broker: root for network namespaces,
//! a Docker daemon, a tmpfs mount, python-qpid-proton. Missing is a failure — CI
//! (`.ci/run`) provides all of it, so a test that found nothing to run on and passed
//! would prove nothing. A local run may skip such a test, saying why, only when
//! `ENTREPOT_TEST_ALLOW_SKIP=1` asks for it explicitly.

/// The environment variable that allows a local run to skip what it cannot run.
pub const ALLOW_SKIP: &str = "ENTREPOT_TEST_ALLOW_SKIP";

/// True when [`ALLOW_SKIP`] is `1`.
pub fn skip_allowed() -> bool {
    std::env::var(ALLOW_SKIP).as_deref() == Ok("1")
}

/// `test` cannot run because `missing`: returns (after saying so) when skipping is
/// allowed, so the caller returns too; panics otherwise.
pub fn skip_or_fail(test: &str, missing: &str) {
    assert!(
        skip_allowed(),
        "{test} cannot run: {missing} (set {ALLOW_SKIP}=1 to skip it in a local run)"
    );
    eprintln!("SKIPPED {test} ({ALLOW_SKIP}=1): {missing}");
}
