//! What `/readyz` reports besides the key: set by the listener and the drain, read by `admin`.
//! A leaf: imports nothing of cbgate's, so `proxy` can hold it without importing `admin`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// The last check of whether Coinbase answers (the clock task's `GET /time`, at start and
/// every `clock_check_interval`). Shown in `/readyz`, but never makes cbgate unready: a
/// Coinbase outage is not cbgate's, and an orchestrator that restarts or unroutes the gateway
/// for it would turn the clients' clear 502s into connection errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamCheck {
    /// Whether the last check got an answer.
    pub reachable: bool,
    /// `ok`, or why the check failed.
    pub detail: String,
    /// When it ran, in Unix seconds.
    pub checked_unix: u64,
}

/// What `/readyz` needs to know besides the key.
#[derive(Debug, Default)]
pub struct Readiness {
    listening: AtomicBool,
    shutting_down: AtomicBool,
    upstream: Mutex<Option<UpstreamCheck>>,
}

impl Readiness {
    /// The proxy listeners are accepting.
    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::SeqCst);
    }

    /// Shutdown has begun: report not ready so the orchestrator stops sending traffic.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether the proxy listeners are accepting.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    /// Records a reachability check; returns the previous one.
    pub fn set_upstream(&self, result: Result<(), String>) -> Option<UpstreamCheck> {
        let check = UpstreamCheck {
            reachable: result.is_ok(),
            detail: result.err().unwrap_or_else(|| "ok".into()),
            checked_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        // A poisoned lock only means a panic elsewhere while storing a plain value.
        let mut slot = self.upstream.lock().unwrap_or_else(|e| e.into_inner());
        slot.replace(check)
    }

    /// The last reachability check, if one ran.
    pub fn upstream(&self) -> Option<UpstreamCheck> {
        self.upstream
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}
