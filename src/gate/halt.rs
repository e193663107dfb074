//! The kill switch: while halted, every order-creating or -editing request is refused (423
//! `halted`); cancels, reads and WebSocket data still pass, so a halted gateway can still be
//! used to get out of positions safely.
//!
//! The state is kept in memory and, when a `state_dir` is configured, in `state_dir/halt.json`
//! (mode 0600, written to a temporary file and renamed over, so a crash leaves the old or the
//! new state, never half of one). A halt therefore survives a restart. Halting changes memory
//! first (safe at once) and then the file; resuming removes the file first and only then
//! lets orders through, so a failed write never leaves a restarted cbgate less safe than the
//! running one.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// The file in `state_dir` that holds the halt.
pub const HALT_FILE: &str = "halt.json";

/// The longest reason kept, in characters (a reason is for people, not a log dump).
pub const MAX_REASON_CHARS: usize = 500;

/// One halt: why and since when.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HaltState {
    /// The operator's reason (`cbgate halt --reason`), control characters removed.
    pub reason: String,
    /// When the halt began, Unix seconds.
    pub since_unix: u64,
    /// Which replica halted (`budget.replica_name`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// With the halt shared through Redis: the shared state's version this halt was stored
    /// as. `None`: not pushed to Redis yet (it is pushed when Redis answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_version: Option<u64>,
}

impl HaltState {
    /// `since` as an RFC 3339 UTC time, for messages.
    pub fn since_rfc3339(&self) -> String {
        httpdate_to_rfc3339(self.since_unix)
    }
}

/// Reading or writing the halt state failed.
#[derive(Debug, thiserror::Error)]
pub enum HaltError {
    #[error("state_dir {}: {source}; set state_dir to a directory cbgate's user can write", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a halt state written by cbgate ({message}); fix or delete it (deleting it resumes trading)", path.display())]
    Corrupt { path: PathBuf, message: String },
}

/// The kill switch.
#[derive(Debug, Default)]
pub struct Halt {
    /// `None`: in memory only.
    dir: Option<PathBuf>,
    current: RwLock<Option<HaltState>>,
    /// Serialises halt and resume so that the file and memory agree.
    change: Mutex<()>,
}

impl Halt {
    /// A kill switch that is not persisted (no `state_dir`).
    pub fn in_memory() -> Halt {
        Halt::default()
    }

    /// Opens `dir` (created with mode 0700 when missing) and loads a persisted halt.
    pub fn open(dir: &Path) -> Result<Halt, HaltError> {
        let io = |source| HaltError::Io {
            path: dir.to_owned(),
            source,
        };
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
        let file = dir.join(HALT_FILE);
        let current = match std::fs::read(&file) {
            Ok(bytes) => Some(serde_json::from_slice::<HaltState>(&bytes).map_err(|e| {
                HaltError::Corrupt {
                    path: file.clone(),
                    message: e.to_string(),
                }
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(HaltError::Io {
                    path: file,
                    source: e,
                })
            }
        };
        Ok(Halt {
            dir: Some(dir.to_owned()),
            current: RwLock::new(current),
            change: Mutex::new(()),
        })
    }

    /// Where the state is persisted, if anywhere.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The halt in force, if any.
    pub fn current(&self) -> Option<HaltState> {
        // A poisoned lock only means a panic elsewhere while storing a plain value.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether orders are refused.
    pub fn is_halted(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Halts now. Already halted: keeps the first halt's time, and its reason unless a new one
    /// is given.
    /// Memory is set before the file is written; on a write error cbgate stays halted (the
    /// error says the halt will not survive a restart).
    pub fn halt(&self, reason: &str) -> Result<HaltState, HaltError> {
        self.halt_as(reason, None)
    }

    /// [`Halt::halt`], recording which replica halted. The state is marked as not yet
    /// pushed to the shared store (`shared_version: None`).
    pub fn halt_as(&self, reason: &str, by: Option<&str>) -> Result<HaltState, HaltError> {
        let _change = self.change.lock().unwrap_or_else(|e| e.into_inner());
        let reason: String = reason
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_REASON_CHARS)
            .collect();
        let before = self.current();
        let reason = match (reason.trim(), &before) {
            ("", Some(b)) => b.reason.clone(),
            ("", None) => "halted by the operator".to_owned(),
            (r, _) => r.to_owned(),
        };
        let since_unix = before.map(|h| h.since_unix).unwrap_or_else(now_unix);
        let state = HaltState {
            reason,
            since_unix,
            by: by.map(str::to_owned),
            shared_version: None,
        };
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(state.clone());
        if let Some(dir) = &self.dir {
            write_atomically(dir, &state)?;
        }
        Ok(state)
    }

    /// Resumes trading; returns the halt that ended, if any. The file goes first: if it cannot
    /// be removed, cbgate stays halted.
    pub fn resume(&self) -> Result<Option<HaltState>, HaltError> {
        let _change = self.change.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(dir) = &self.dir {
            let file = dir.join(HALT_FILE);
            match std::fs::remove_file(&file) {
                Ok(()) => sync_dir(dir)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(HaltError::Io {
                        path: file,
                        source: e,
                    })
                }
            }
        }
        Ok(self
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take())
    }
}

impl Halt {
    /// Replaces the state with `new` if it is still `expected` (a compare-and-set, so a
    /// state learnt from another replica never overwrites a halt made here meanwhile).
    /// Returns whether it was replaced. Halting writes memory first, then the file; resuming
    /// removes the file first, so a failed write leaves cbgate halted.
    pub fn replace_if(
        &self,
        expected: &Option<HaltState>,
        new: Option<HaltState>,
    ) -> Result<bool, HaltError> {
        let _change = self.change.lock().unwrap_or_else(|e| e.into_inner());
        if &self.current() != expected {
            return Ok(false);
        }
        match new {
            Some(state) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(state.clone());
                if let Some(dir) = &self.dir {
                    write_atomically(dir, &state)?;
                }
            }
            None => {
                if let Some(dir) = &self.dir {
                    remove_file(dir)?;
                }
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
        Ok(true)
    }
}

/// Removes `dir/halt.json` durably (a missing file is fine).
fn remove_file(dir: &Path) -> Result<(), HaltError> {
    let file = dir.join(HALT_FILE);
    match std::fs::remove_file(&file) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HaltError::Io {
            path: file,
            source: e,
        }),
    }
}

/// Writes `state` to `dir/halt.json` through a temporary file (0600, fsynced) and a rename.
fn write_atomically(dir: &Path, state: &HaltState) -> Result<(), HaltError> {
    let tmp = dir.join(format!(".{HALT_FILE}.tmp"));
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| HaltError::Io { path, source }
    };
    let body = serde_json::to_vec_pretty(state).map_err(|e| HaltError::Corrupt {
        path: tmp.clone(),
        message: e.to_string(),
    })?;
    // A stale temporary file from a crash is replaced; O_NOFOLLOW keeps a planted link out.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(&body).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    let file = dir.join(HALT_FILE);
    std::fs::rename(&tmp, &file).map_err(io(&file))?;
    sync_dir(dir)
}

/// Makes a rename or removal in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), HaltError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| HaltError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// Unix seconds as an RFC 3339 UTC time (`YYYY-MM-DDTHH:MM:SSZ`).
pub fn unix_to_rfc3339(secs: u64) -> String {
    httpdate_to_rfc3339(secs)
}

/// The current time in Unix seconds.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
fn httpdate_to_rfc3339(secs: u64) -> String {
    // httpdate gives an IMF-fixdate; rebuild the fields from it rather than hand-roll a calendar.
    let t = UNIX_EPOCH + std::time::Duration::from_secs(secs);
    let imf = httpdate::fmt_http_date(t); // "Tue, 01 Dec 2026 22:30:00 GMT"
    let parts: Vec<&str> = imf.split_whitespace().collect();
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    match parts.as_slice() {
        [_, day, mon, year, hms, _] => {
            let m = MONTHS.iter().position(|x| x == mon).map_or(0, |i| i + 1);
            format!("{year}-{m:02}-{day}T{hms}Z")
        }
        _ => imf,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn halt_survives_reopen_and_resume_clears_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        let h = Halt::open(&dir).expect("open");
        assert_eq!(
            std::fs::metadata(&dir).expect("dir").permissions().mode() & 0o777,
            0o700
        );
        assert!(!h.is_halted());
        let s = h.halt("bad fill\n on BTC").expect("halt");
        assert_eq!(s.reason, "bad fill on BTC");
        let file = dir.join(HALT_FILE);
        assert_eq!(
            std::fs::metadata(&file).expect("file").permissions().mode() & 0o777,
            0o600
        );
        let again = Halt::open(&dir).expect("reopen");
        assert_eq!(again.current(), Some(s.clone()));
        let kept = again.halt("").expect("halt again");
        assert_eq!(kept, s, "a repeated halt keeps time and reason");
        assert!(again.resume().expect("resume").is_some());
        assert!(!file.exists());
        assert!(!Halt::open(&dir).expect("reopen").is_halted());
    }

    #[test]
    fn a_corrupt_file_names_itself() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join(HALT_FILE), "{").expect("write");
        let e = Halt::open(tmp.path()).expect_err("corrupt");
        assert!(e.to_string().contains("halt.json"), "{e}");
    }

    #[test]
    fn rfc3339() {
        assert_eq!(httpdate_to_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(httpdate_to_rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
