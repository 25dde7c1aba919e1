//! Fuzz target: `entrepot::fuzzing::frame_decoder` (input layout documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| entrepot::fuzzing::frame_decoder(data));
