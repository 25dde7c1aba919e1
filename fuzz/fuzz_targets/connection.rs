//! Fuzz target: `entrepot::fuzzing::connection` (input layout documented there). A
//! connection that outlives its input is a hang, reported as a crash.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(stalled) = entrepot::fuzzing::connection(data) {
        panic!("{stalled}");
    }
});
