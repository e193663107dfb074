//! The fuzz targets as unit tests: every file of `fuzz/corpus/<target>/` goes through the same
//! invariant check the cargo-fuzz target runs (`fuzz/checks.rs`), then a few hundred
//! deterministic pseudo-random inputs (mutations of the corpus and plain random bytes) as a
//! smoke run. No libFuzzer, no nightly: this is what CI runs. See `fuzz/README.md` for real
//! fuzzing.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

/// Pseudo-random inputs per target in the smoke run.
const SMOKE_INPUTS: usize = 300;

type Check = fn(&[u8]);

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            let data = std::fs::read(&path).expect("read corpus file");
            (path.display().to_string(), data)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
}

/// Runs one input; on a violated invariant, fails naming the input and its bytes.
fn run(check: Check, label: &str, data: &[u8]) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(data))) {
        let msg = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("(non-string panic)");
        panic!("{label}: {msg}\ninput: b\"{}\"", data.escape_ascii());
    }
}

/// xorshift64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Bytes the parsers care about, so that mutations hit interesting branches.
const INTERESTING: &[u8] = b"%/.\\\n\r\"'-=*[]{}#:,0aF\x00\x7f\xff ";

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = d.len();
        match rng.below(6) {
            0 if len > 0 => {
                let i = rng.below(len);
                d[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                d[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(16)).min(len);
                d.drain(start..end);
            }
            3 => {
                let at = rng.below(len + 1);
                let b = if rng.below(2) == 0 {
                    INTERESTING[rng.below(INTERESTING.len())]
                } else {
                    rng.next() as u8
                };
                d.insert(at, b);
            }
            4 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(32)).min(len);
                let chunk = d[start..end].to_vec();
                let at = rng.below(len + 1);
                d.splice(at..at, chunk);
            }
            _ => d.truncate(rng.below(len + 1)),
        }
    }
    d
}

fn smoke(target: &str, check: Check, seed: u64) {
    let files = corpus(target);
    let mut rng = Rng(seed);
    for i in 0..SMOKE_INPUTS {
        let data = if i % 4 == 0 {
            (0..rng.below(64)).map(|_| rng.next() as u8).collect()
        } else {
            let (_, base) = &files[rng.below(files.len())];
            mutate(&mut rng, base)
        };
        run(check, &format!("{target} smoke input #{i}"), &data);
    }
}

fn replay(target: &str, check: Check) {
    for (path, data) in corpus(target) {
        run(check, &path, &data);
    }
}

#[test]
fn key_parse_corpus() {
    replay("key_parse", checks::key_parse);
}

#[test]
fn key_parse_smoke() {
    smoke("key_parse", checks::key_parse, 0x6b65_795f_7061_7273);
}

#[test]
fn config_load_corpus() {
    replay("config_load", checks::config_load);
}

#[test]
fn config_load_smoke() {
    smoke("config_load", checks::config_load, 0x636f_6e66_6967_6c64);
}

#[test]
fn policy_path_corpus() {
    replay("policy_path", checks::policy_path);
}

#[test]
fn policy_path_smoke() {
    smoke("policy_path", checks::policy_path, 0x706f_6c69_6379_7061);
}
