#![no_main]
//! Fuzz target `usage_bedrock`: see `tokenbudget::meter::fuzz::usage_bedrock` for what it drives and checks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tokenbudget::meter::fuzz::usage_bedrock(data));
