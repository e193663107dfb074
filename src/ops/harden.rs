//! Process hardening at start-up, so the secret stays inside this process.
//!
//! What ssh-agent and Vault do: no core files (`RLIMIT_CORE = 0`), not dumpable
//! (`PR_SET_DUMPABLE 0`: same-user processes can no longer ptrace us or read /proc/PID/mem), and
//! memory locked so key pages are never written to swap. All through rustix's safe wrappers.
//!
//! Not secrecy but availability: the soft limit on open files is raised to the hard one, since
//! the common soft default of 1024 is smaller than what `max_connections` alone needs.

use rustix::mm::{mlockall, MlockAllFlags};

use crate::config::Config;
use crate::listen::server::REFUSING_AT_ONCE;
use rustix::process::{
    dumpable_behavior, getrlimit, set_dumpable_behavior, setrlimit, DumpableBehavior, Resource,
    Rlimit,
};

/// What hardening achieved, for the log and `cbgate check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub core_dumps_disabled: bool,
    pub not_dumpable: bool,
    /// `Ok(())` when memory is locked; otherwise why not, as a sentence.
    pub memory_locked: Result<(), String>,
    /// The open-file limit after raising it.
    pub open_files: OpenFiles,
}

/// RLIMIT_NOFILE after start-up; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    pub soft: Option<u64>,
    pub hard: Option<u64>,
    /// The soft limit before it was raised, when it was raised.
    pub raised_from: Option<u64>,
}

impl OpenFiles {
    /// The message when `needed` descriptors do not fit in the soft limit, or `None`.
    pub fn shortfall(&self, needed: u64) -> Option<String> {
        let soft = self.soft?;
        (needed > soft).then(|| {
            format!(
                "the open-file limit (RLIMIT_NOFILE) is {soft}, but the connection limits may need \
                 {needed} descriptors: raise it (systemd LimitNOFILE=, docker --ulimit nofile=, \
                 ulimit -n) or lower max_connections; past the limit, clients get 503 or 502"
            )
        })
    }
}

/// A generous bound on the file descriptors cbgate may hold at once: each proxy connection
/// plus one upstream connection for it (HTTP/1.1 upstreams need one per request), each
/// WebSocket session's two sockets (they no longer count against `max_connections`), the admin
/// budget, the refusals in progress on both listeners, the listeners, and a margin of 64 for
/// the log, the key watch, the runtime and the TLS roots.
pub fn descriptors_needed(cfg: &Config) -> u64 {
    let n = |v: usize| v as u64;
    n(cfg.max_connections) * 2
        + n(cfg.ws.max_sessions) * 2
        + n(cfg.admin_max_connections)
        + 2 * n(REFUSING_AT_ONCE)
        + n(cfg.listen.len())
        + 1
        + 64
}

/// Applies every measure it can; never fails the start-up, the report says what did not work.
pub fn apply() -> Report {
    let core_dumps_disabled = setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .is_ok();
    let not_dumpable = set_dumpable_behavior(DumpableBehavior::NotDumpable).is_ok()
        && matches!(dumpable_behavior(), Ok(DumpableBehavior::NotDumpable));
    Report {
        core_dumps_disabled,
        not_dumpable,
        memory_locked: lock_memory(),
        open_files: raise_open_files(),
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (no privilege needed).
fn raise_open_files() -> OpenFiles {
    let before = getrlimit(Resource::Nofile);
    let mut raised_from = None;
    if before.current != before.maximum {
        let ok = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: before.maximum,
                maximum: before.maximum,
            },
        )
        .is_ok();
        if ok {
            raised_from = before.current;
        }
    }
    let after = getrlimit(Resource::Nofile);
    OpenFiles {
        soft: after.current,
        hard: after.maximum,
        raised_from,
    }
}

/// Locks current and future pages (on fault, so resident memory does not grow) when the limit
/// allows it. With a finite RLIMIT_MEMLOCK, MCL_FUTURE would make later allocations fail once
/// the limit is reached, so then nothing is locked and the caller warns instead.
fn lock_memory() -> Result<(), String> {
    // Raise the soft limit to the hard one first: systemd's LimitMEMLOCK sets both.
    let limit = getrlimit(Resource::Memlock);
    if limit.current != limit.maximum {
        let _ = setrlimit(
            Resource::Memlock,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
    let limit = getrlimit(Resource::Memlock);
    if limit.current.is_some() && !has_cap_ipc_lock() {
        let kib = limit.current.unwrap_or(0) / 1024;
        return Err(format!(
            "RLIMIT_MEMLOCK is {kib} KiB and the process lacks CAP_IPC_LOCK; \
             allow it with LimitMEMLOCK=infinity (systemd), --cap-add IPC_LOCK (docker), \
             or run without swap"
        ));
    }
    mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT)
        .map_err(|e| format!("mlockall failed: {e}"))
}

/// Whether the effective capability set holds CAP_IPC_LOCK (bit 14), which lifts the limit.
fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}
