#![no_main]

// The invariants live in checks.rs so that tests/fuzz_corpus.rs runs them too.
#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::key_parse(data));
