#![no_main]
//! Fuzz target `aws_eventstream`: see `tokenbudget::meter::fuzz::aws_eventstream` for what it drives and checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tokenbudget::meter::fuzz::aws_eventstream(data));
