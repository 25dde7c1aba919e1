//! Fuzz target: `entrepot::fuzzing::manifest` (input layout documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| entrepot::fuzzing::manifest(data));
