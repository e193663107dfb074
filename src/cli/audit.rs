//! `cbgate audit verify FILE...`: checks the audit log's hash chain across rotated files.

use std::path::PathBuf;

use cbgate::ops::audit::{self, VerifyError};

use super::Failure;

/// Verifies `files` (oldest first) and prints what was checked, or the first broken record.
/// Exit 0: the chain holds; 1: it is broken; 2: a file cannot be read.
pub fn verify(files: Vec<PathBuf>) -> Result<(), Failure> {
    match audit::verify(&files) {
        Ok(r) => {
            for b in &r.breaks {
                println!("chain break recorded by cbgate (a crash while writing): {b}");
            }
            println!(
                "ok: {} records (seq {}..{}) in {} file(s); head {}",
                r.records,
                r.first_seq,
                r.last_seq,
                files.len(),
                r.head
            );
            if r.first_seq > 1 {
                println!(
                    "note: the chain starts at seq {}: earlier records are in files not given (or rotated away)",
                    r.first_seq
                );
            }
            Ok(())
        }
        Err(e @ VerifyError::Read { .. }) => Err(Failure::Config(e.into())),
        Err(e) => Err(Failure::Runtime(
            anyhow::Error::from(e).context("audit log verification failed"),
        )),
    }
}
