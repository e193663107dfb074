//! What `/readyz` reports besides the key: set by the listener and the drain, read by `admin`.
//! A leaf: imports nothing of cbgate's, so `proxy` can hold it without importing `admin`.

use std::sync::atomic::{AtomicBool, Ordering};

/// What `/readyz` needs to know besides the key.
#[derive(Debug, Default)]
pub struct Readiness {
    listening: AtomicBool,
    shutting_down: AtomicBool,
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

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}
