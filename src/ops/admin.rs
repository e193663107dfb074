//! The admin listener (default `127.0.0.1:8751`), separate from the proxy port so that no
//! Coinbase path is shadowed: `GET /livez`, `GET /readyz`, `GET /metrics`, and the kill switch:
//! `POST /halt` (JSON body `{"reason": "...", "cancel_open": true}`, both optional),
//! `POST /resume`, `GET /status`. The kill-switch endpoints need `Authorization: Bearer
//! <admin token>` when `admin_token_file` is set, and are refused without one unless the admin
//! listener is on loopback.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::error::ProxyError;
use crate::gate::client::ClientGate;
use crate::gate::halt_shared::{Pushed, ResumeError};
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
        // Only named credentials: ready; the default route family goes unsigned.
        if proxy.keys().iter().next().is_some() {
            return None;
        }
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

/// `default` (`[key]`, when set) and every `[keys.NAME]`, for `/readyz`.
fn credentials(proxy: &Proxy) -> serde_json::Value {
    let mut out = Vec::new();
    if let Some(k) = proxy.signer().key() {
        out.push(serde_json::json!({
            "name": crate::config::DEFAULT_KEY,
            "kind": "cdp",
            "key": k.name(),
            "fingerprint": k.fingerprint(),
        }));
    }
    for k in proxy.keys().iter() {
        let cred = k.current();
        let id = match cred.as_ref() {
            crate::sign::keys::Credential::Cdp(c) => c.name().to_owned(),
            crate::sign::keys::Credential::Hmac(h) => h.key_id().to_owned(),
        };
        out.push(serde_json::json!({
            "name": k.name(),
            "kind": k.kind().as_str(),
            "key": id,
            "fingerprint": cred.fingerprint(),
        }));
    }
    serde_json::Value::Array(out)
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
pub async fn handle(proxy: &Proxy, req: Request<Incoming>) -> Response<Body> {
    if let "/halt" | "/resume" | "/status" = req.uri().path() {
        return control(proxy, req).await;
    }
    probes(proxy, &req)
}

/// The largest `/halt` body read.
const CONTROL_BODY_LIMIT: usize = 16 * 1024;
/// How long a `/halt` body may take to arrive.
const CONTROL_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    response(status, "application/json", v.to_string())
}

fn control_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &serde_json::json!({ "error": code, "message": message }),
    )
}

/// What `/status` reports, and `/halt` and `/resume` answer with. With the halt shared
/// through Redis, `shared` says whether Redis answers, the last change seen there (which
/// replica, when) and whether a halt made here still waits to be pushed.
pub fn halt_status(proxy: &Proxy) -> serde_json::Value {
    let h = proxy.halt_state();
    let state_dir = h.dir().map(|d| d.display().to_string());
    let shared = match proxy.shared_halt() {
        Some(s) => s.status(h),
        None => serde_json::Value::Null,
    };
    match h.current() {
        Some(s) => serde_json::json!({
            "halted": true,
            "reason": s.reason,
            "since": s.since_rfc3339(),
            "since_unix": s.since_unix,
            "by": s.by,
            "state_dir": state_dir,
            "shared": shared,
        }),
        None => serde_json::json!({ "halted": false, "state_dir": state_dir, "shared": shared }),
    }
}

/// `/halt`, `/resume`, `/status`.
async fn control(proxy: &Proxy, req: Request<Incoming>) -> Response<Body> {
    let (token, loopback) = proxy.admin_control();
    match token {
        Some(expected) => {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
            let ok = given.is_some_and(|g| {
                aws_lc_rs::constant_time::verify_slices_are_equal(g, expected.as_bytes()).is_ok()
            });
            if !ok {
                return control_error(
                    StatusCode::UNAUTHORIZED,
                    "admin_unauthorized",
                    "send the token of admin_token_file as Authorization: Bearer <token> (cbgate halt/resume/status do)",
                );
            }
        }
        None if !loopback => {
            return control_error(
                StatusCode::FORBIDDEN,
                "admin_token_required",
                "the admin listener is not on loopback: set admin_token_file to use /halt, /resume and /status",
            )
        }
        None => {}
    }
    let path = req.uri().path().to_owned();
    let want = if path == "/status" {
        Method::GET
    } else {
        Method::POST
    };
    if req.method() != want && !(path == "/status" && req.method() == Method::HEAD) {
        return control_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("use {want} {path}"),
        );
    }
    match path.as_str() {
        "/status" => {
            let mut v = halt_status(proxy);
            v["budget"] = proxy.budget().status();
            json_response(StatusCode::OK, &v)
        }
        "/resume" => match proxy.shared_halt() {
            None => match proxy.resume() {
                Ok(_) => json_response(StatusCode::OK, &halt_status(proxy)),
                Err(e) => control_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "state_write_failed",
                    &format!("still halted: {e}"),
                ),
            },
            Some(shared) => {
                let r = shared.resume(proxy.halt_state()).await;
                let mut out = halt_status(proxy);
                let status = match r {
                    Ok(_) => {
                        tracing::warn!("trading resumed on every replica (shared through Redis)");
                        StatusCode::OK
                    }
                    Err(e) => {
                        let (status, code) = match &e {
                            ResumeError::Unreachable { .. } => {
                                (StatusCode::SERVICE_UNAVAILABLE, "shared_halt_unreachable")
                            }
                            ResumeError::Newer { .. } => (StatusCode::CONFLICT, "newer_halt"),
                            ResumeError::Local(_) => {
                                (StatusCode::INTERNAL_SERVER_ERROR, "state_write_failed")
                            }
                        };
                        out["error"] = code.into();
                        out["message"] = e.to_string().into();
                        status
                    }
                };
                json_response(status, &out)
            }
        },
        _ => halt(proxy, req).await,
    }
}

/// `POST /halt`: halt first, then (optionally) cancel the open orders.
async fn halt(proxy: &Proxy, req: Request<Incoming>) -> Response<Body> {
    let body = tokio::time::timeout(
        CONTROL_BODY_TIMEOUT,
        http_body_util::Limited::new(req.into_body(), CONTROL_BODY_LIMIT).collect(),
    )
    .await;
    let bytes = match body {
        Ok(Ok(c)) => c.to_bytes(),
        _ => {
            return control_error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!(
                "the /halt body must arrive within {} s and be at most {CONTROL_BODY_LIMIT} bytes",
                CONTROL_BODY_TIMEOUT.as_secs()
            ),
            )
        }
    };
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct HaltRequest {
        reason: String,
        cancel_open: bool,
    }
    let ask: HaltRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        HaltRequest::default()
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(a) => a,
            Err(e) => {
                return control_error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!(
                    "the /halt body must be {{\"reason\": \"...\", \"cancel_open\": true}}: {e}"
                ),
                )
            }
        }
    };
    let (persisted, pushed) = match proxy.shared_halt() {
        None => (proxy.halt(&ask.reason), None),
        Some(shared) => {
            let (persisted, pushed) = shared.halt(proxy.halt_state(), &ask.reason).await;
            tracing::warn!(
                reason = ask.reason.as_str(),
                shared = matches!(pushed, Pushed::Shared { .. }),
                "trading halted: orders are refused"
            );
            (persisted, Some(pushed))
        }
    };
    let mut out = halt_status(proxy);
    let mut status = StatusCode::OK;
    if let Err(e) = persisted {
        status = StatusCode::INTERNAL_SERVER_ERROR;
        out["error"] = format!("halted, but the halt will not survive a restart: {e}").into();
    }
    match pushed {
        None => {}
        Some(Pushed::Shared { version }) => {
            out["replicas"] = serde_json::json!({ "reached": true, "version": version });
        }
        Some(Pushed::NotReached { why }) => {
            // Halted here; the others were not told. Said plainly, and not a failure of the
            // halt itself (it is pushed when Redis answers).
            out["replicas"] = serde_json::json!({
                "reached": false,
                "message": format!("halted on THIS replica only: Redis was not reached ({why}); the other replicas are NOT halted until it answers, then this halt is pushed to them"),
            });
        }
    }
    if ask.cancel_open {
        let report = crate::ops::cancel::cancel_open(proxy).await;
        tracing::warn!(
            open = report.open,
            cancelled = report.cancelled.len(),
            failed = report.failed.len(),
            "cancelled open orders"
        );
        out["cancel"] = serde_json::to_value(&report).unwrap_or_default();
    }
    json_response(status, &out)
}

/// The probes and metrics.
fn probes(proxy: &Proxy, req: &Request<Incoming>) -> Response<Body> {
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
                    // Every credential by name: kind and fingerprint, never the secret.
                    "keys": credentials(proxy),
                    // The whole seconds applied when signing; the metric
                    // cbgate_clock_offset_seconds is the measured offset.
                    "clock_correction_seconds": proxy.signer().clock_offset(),
                    "upstream": upstream_detail(proxy),
                    "halted": halt_status(proxy),
                    // Detail only: a Redis outage never makes cbgate unready (it falls back or
                    // refuses as budget.redis_unavailable says).
                    "budget": proxy.budget().status(),
                });
                response(StatusCode::OK, JSON, body.to_string())
            }
            Some(reason) => response(
                StatusCode::SERVICE_UNAVAILABLE,
                JSON,
                serde_json::json!({ "ready": false, "reason": reason, "upstream": upstream_detail(proxy), "halted": halt_status(proxy) })
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
            r#"{"error":"not_found","message":"admin endpoints: /livez, /readyz, /metrics, /status, POST /halt, POST /resume"}"#
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
            let proxy = Arc::clone(&proxy);
            let gate = Arc::clone(&gate);
            async move {
                match gate.check(req.uri(), req.headers()) {
                    Ok(()) => handle(&proxy, req).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin request refused");
                        ProxyError::from(e).into_response()
                    }
                }
            }
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
