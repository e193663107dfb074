//! Clock skew against Coinbase. A token whose `nbf` comes from a clock running ahead is refused
//! (intermittent 401s), so cbgate measures Coinbase's clock at start and every few minutes and,
//! when the offset exceeds 1 s, signs with the corrected time.

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};

use crate::forward::date_watch::{unix_now, THRESHOLD_SECS};
use crate::gate::route::Upstream;
use crate::proxy::Proxy;

/// The public endpoint that reports Coinbase's time.
pub const TIME_PATH: &str = "/api/v3/brokerage/time";

/// Offsets beyond this are treated as bad measurements, not applied.
const MAX_OFFSET_SECS: f64 = 86_400.0;

/// Shortest pause before a measurement asked for by [`DateWatch`](crate::forward::date_watch::DateWatch).
const MIN_NUDGED_INTERVAL: Duration = Duration::from_secs(2);

/// Measures `Coinbase time - local time` in seconds: `epochMillis`/`epochSeconds` from
/// `GET /api/v3/brokerage/time`, taken at the midpoint of the round trip, or the response's
/// `Date` header when the body cannot be read.
pub async fn measure(proxy: &Proxy, upstream: &Upstream) -> Result<f64, String> {
    let uri: Uri = format!("https://{}{TIME_PATH}", upstream.authority)
        .parse()
        .map_err(|e| format!("bad time URI: {e}"))?;
    let req = Request::get(uri)
        .body(
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .map_err(|e| e.to_string())?;
    let sent = unix_now();
    let resp = proxy
        .upstream()
        .send(&upstream.host, req)
        .await
        .map_err(|e| e.to_string())?;
    let received = unix_now();
    let midpoint = (sent + received) / 2.0;
    let date = resp
        .headers()
        .get(header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64());
    let status = resp.status();
    let body = Limited::new(resp.into_body(), 64 * 1024)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let from_body = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let millis = v["epochMillis"]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .map(|m| m / 1000.0);
            millis.or_else(|| v["epochSeconds"].as_str().and_then(|s| s.parse().ok()))
        });
    let offset = match (status.is_success(), from_body, date) {
        (true, Some(server), _) => server - midpoint,
        // The Date header has one-second resolution: good enough to catch a large skew.
        (true, None, Some(server)) => server + 0.5 - midpoint,
        _ => {
            return Err(format!(
                "{} answered {status} without a usable time",
                upstream.host
            ))
        }
    };
    // One odd answer must not make every token unusable: an offset beyond a day is not a
    // clock that drifted, it is a bad measurement.
    if !offset.is_finite() || offset.abs() > MAX_OFFSET_SECS {
        return Err(format!(
            "{} reported a time {offset:.0} s away from ours: ignored",
            upstream.host
        ));
    }
    Ok(offset)
}

/// Applies a measured offset: records it, and corrects the signing clock when it exceeds 1 s.
pub fn apply(proxy: &Proxy, offset: f64) {
    proxy.metrics().clock_offset(offset);
    let correction = if offset.abs() > THRESHOLD_SECS {
        offset.round() as i64
    } else {
        0
    };
    let previous = proxy.signer().clock_offset();
    if correction != previous {
        proxy.signer().set_clock_offset(correction);
        if correction == 0 {
            tracing::info!(
                offset_secs = offset,
                "clock skew gone: signing with the local clock"
            );
        } else {
            tracing::warn!(
                offset_secs = offset,
                correction_secs = correction,
                "the local clock differs from Coinbase's: signing with the corrected time (fix NTP on this host)"
            );
        }
    }
}

/// Measures now, then every `every` or sooner when [`DateWatch`](crate::forward::date_watch::DateWatch) sees a jump.
pub async fn run(proxy: std::sync::Arc<Proxy>, every: Duration) {
    let Some(upstream) = proxy.router().find(TIME_PATH).map(|r| r.upstream.clone()) else {
        tracing::debug!("no route for {TIME_PATH}: clock skew is not measured");
        return;
    };
    loop {
        let measured = measure(&proxy, &upstream).await;
        let previous = proxy
            .readiness()
            .set_upstream(measured.as_ref().map(|_| ()).map_err(Clone::clone));
        match measured {
            Ok(offset) => {
                if previous.is_some_and(|p| !p.reachable) {
                    tracing::info!(host = %upstream.host, "Coinbase answers again");
                }
                apply(&proxy, offset)
            }
            // Said once when it starts failing (at start, too), not at every tick.
            Err(e) if previous.is_none_or(|p| p.reachable) => tracing::warn!(
                host = %upstream.host,
                error = %e,
                "Coinbase cannot be reached: requests will fail with 502 until it can (check DNS, egress, upstream.resolve)"
            ),
            Err(e) => tracing::debug!(error = %e, "clock skew measurement failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = proxy.clock_watch().woken() => {
                tracing::debug!("an upstream Date header disagrees with the clock: measuring now");
                // Several responses may have noticed; one measurement answers them all, and a
                // bogus Date on every response cannot make us measure more than every few seconds.
                tokio::time::sleep(MIN_NUDGED_INTERVAL).await;
            }
        }
    }
}
