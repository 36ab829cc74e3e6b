//! The vPMU's MSR interface, both vendors: see `harness.rs`.
#![no_main]

#[allow(dead_code)] // each target uses one entry function
#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::msr(data));
