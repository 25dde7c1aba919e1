//! Fuzz target: `entrepot::fuzzing::message_sections` (input layout documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| entrepot::fuzzing::message_sections(data));
