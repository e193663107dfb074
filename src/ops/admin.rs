//! The admin listener (default `127.0.0.1:8751`), separate from the proxy port so that no
//! Coinbase path is shadowed: `GET /livez`, `GET /readyz`, `GET /metrics`.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::error::ProxyError;
use crate::gate::client::ClientGate;
use crate::listen::server::{self, Listener, Role, ServeOptions};
use crate::proxy::Proxy;
use crate::Body;

/// Why cbgate is not ready, or `None` when it is.
pub fn not_ready_reason(proxy: &Proxy) -> Option<String> {
    let r = proxy.readiness();
    if r.is_shutting_down() {
        return Some("shutting down".into());
    }
    if !r.is_listening() {
        return Some("the proxy listener is not accepting yet".into());
    }
    let Some(key) = proxy.signer().key() else {
        return Some(
            "no API key configured: requests are forwarded unsigned; set key.file or COINBASE_API_KEY + COINBASE_API_SECRET"
                .into(),
        );
    };
    if let Err(e) = crate::sign::jwt::self_test(&key) {
        return Some(format!("the key failed its signing self-test: {e}"));
    }
    None
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Answers one admin request.
pub fn handle(proxy: &Proxy, req: &Request<Incoming>) -> Response<Body> {
    const JSON: &str = "application/json";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return response(
            StatusCode::METHOD_NOT_ALLOWED,
            JSON,
            r#"{"error":"method_not_allowed"}"#.into(),
        );
    }
    match req.uri().path() {
        "/livez" => response(StatusCode::OK, JSON, r#"{"status":"alive"}"#.into()),
        "/readyz" => match not_ready_reason(proxy) {
            None => {
                let key = proxy.signer().key();
                let body = serde_json::json!({
                    "ready": true,
                    "key": key.as_ref().map(|k| k.name()),
                    "algorithm": key.as_ref().map(|k| k.algorithm().as_str()),
                    // The whole seconds applied when signing; the metric
                    // cbgate_clock_offset_seconds is the measured offset.
                    "clock_correction_seconds": proxy.signer().clock_offset(),
                    "upstream": upstream_detail(proxy),
                });
                response(StatusCode::OK, JSON, body.to_string())
            }
            Some(reason) => response(
                StatusCode::SERVICE_UNAVAILABLE,
                JSON,
                serde_json::json!({ "ready": false, "reason": reason, "upstream": upstream_detail(proxy) })
                    .to_string(),
            ),
        },
        "/metrics" => response(
            StatusCode::OK,
            crate::ops::metrics::Metrics::content_type(),
            proxy.metrics().render(),
        ),
        _ => response(
            StatusCode::NOT_FOUND,
            JSON,
            r#"{"error":"not_found","message":"admin endpoints: /livez, /readyz, /metrics"}"#
                .into(),
        ),
    }
}

/// The last reachability check of Coinbase, for `/readyz` (detail only: never flips readiness).
fn upstream_detail(proxy: &Proxy) -> serde_json::Value {
    match proxy.readiness().upstream() {
        None => serde_json::json!({ "reachable": null, "detail": "not checked yet" }),
        Some(c) => serde_json::json!({
            "reachable": c.reachable,
            "detail": c.detail,
            "checked_unix": c.checked_unix,
        }),
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves, with the proxy
/// listener's connection code: its own connection limit (`opts.max_connections`, from
/// `admin_max_connections`), the header and idle timeouts, and `gate`'s Host and Origin checks
/// (DNS rebinding, cross-site reads) before any endpoint answers.
pub async fn run(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    gate: ClientGate,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let gate = Arc::new(gate);
    let handler = {
        let proxy = Arc::clone(&proxy);
        move |req: Request<Incoming>| {
            let resp = match gate.check(req.uri(), req.headers()) {
                Ok(()) => handle(&proxy, &req),
                Err(e) => {
                    tracing::warn!(error = %e, "admin request refused");
                    ProxyError::from(e).into_response()
                }
            };
            std::future::ready(resp)
        }
    };
    server::serve(
        Role::Admin,
        vec![Listener::Tcp(listener)],
        proxy,
        opts,
        handler,
        shutdown,
    )
    .await;
}

/// `cbgate health`: a blocking HTTP/1.0 GET of `path` on the admin listener. `Ok(body)` on 200;
/// otherwise the reason, as a sentence.
pub fn probe(
    admin: std::net::SocketAddr,
    path: &str,
    timeout: std::time::Duration,
) -> Result<String, String> {
    let got = http_get(admin, path, timeout)
        .map_err(|e| format!("cannot reach the admin listener at {admin}: {e}"))?;
    if got.status == 200 {
        Ok(got.body.trim().to_owned())
    } else {
        Err(format!("{path}: {}: {}", got.status_line, got.body.trim()))
    }
}

/// What one blocking GET got back.
#[derive(Debug)]
pub struct Got {
    /// The status code (0 when the status line is not HTTP).
    pub status: u16,
    pub status_line: String,
    /// The header block, lines joined with CRLF.
    pub head: String,
    pub body: String,
}

/// A blocking HTTP/1.0 GET on loopback (a wildcard address is reached through loopback), for
/// probes run outside the runtime; at most 1 MiB of answer is read.
pub fn http_get(
    addr: std::net::SocketAddr,
    path: &str,
    timeout: std::time::Duration,
) -> Result<Got, String> {
    use std::io::{Read as _, Write as _};
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.take(1024 * 1024)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or("").to_owned();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok(Got {
        status,
        status_line,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}
