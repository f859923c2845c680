#![no_main]
//! Fuzz target `sse_framing`: see `tokenbudget::meter::fuzz::sse_framing` for what it drives and checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tokenbudget::meter::fuzz::sse_framing(data));
