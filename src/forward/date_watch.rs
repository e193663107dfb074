//! The passive half of the clock-skew check: every upstream response's `Date` is compared with
//! the corrected clock; a jump wakes the clock task (`ops::clock`) to measure at once.
//! Lives here, below `proxy`, so the request path can use it without importing `ops::clock`.

use std::time::{SystemTime, UNIX_EPOCH};

use http::header;

/// Offsets at or below this are left alone: `nbf` has one-second resolution anyway.
pub const THRESHOLD_SECS: f64 = 1.0;

/// Seconds since the Unix epoch, as a float (0 if the clock is before 1970).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Passive check between measurements: the `Date` header of every upstream response. When it
/// disagrees with the corrected clock by more than its one-second resolution allows, the clock
/// task is woken to measure at once (an NTP step, a suspended VM) rather than at the next tick.
#[derive(Debug, Default)]
pub struct DateWatch {
    wake: tokio::sync::Notify,
}

impl DateWatch {
    /// Resolves when a response's `Date` disagreed with the corrected clock.
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Looks at one response's `Date`; cheap enough for every response.
    pub fn observe(&self, headers: &http::HeaderMap, correction_secs: i64) {
        let Some(date) = headers
            .get(header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        else {
            return;
        };
        let corrected_now = unix_now() + correction_secs as f64;
        // Date is truncated to whole seconds: allow that, the threshold and some latency.
        if (date.as_secs_f64() + 0.5 - corrected_now).abs() > THRESHOLD_SECS + 1.5 {
            self.wake.notify_one();
        }
    }
}
