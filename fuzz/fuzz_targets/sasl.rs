//! Fuzz target: `entrepot::fuzzing::sasl` (input layout documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| entrepot::fuzzing::sasl(data));
