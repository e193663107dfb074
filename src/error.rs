//! Errors cbgate itself answers with, each mapped to one status and one code.
//!
//! The body is `{"error": "<code>", "message": "<sentence>", "error_details": "<sentence>",
//! "errorType": "<code>", "errorMessage": "<sentence>"}`: the Advanced Trade shape and the CDP
//! shape at once, so that every SDK shows cbgate's sentence (coinbase-advanced-py reads
//! `message`/`error_details`, the CDP SDKs `errorMessage`, and crash or say "Forbidden" on
//! other shapes) whatever route the request took. The response carries `x-cbgate-error:
//! <code>`, so a client can tell cbgate's answers from Coinbase's (which pass through
//! untouched). Messages never carry a secret or a token: they are built from the
//! request line, host names and library errors that hold neither.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};

use crate::forward::upstream::{ConnectStage, UpstreamError};
use crate::gate::budget::Refusal as BudgetRefusal;
use crate::gate::client::ClientError;
use crate::gate::guard::Refusal;
use crate::gate::halt::HaltState;
use crate::gate::policy::Denied;
use crate::ops::audit::AuditError;
use crate::Body;

/// The header naming a cbgate-made error.
pub const ERROR_HEADER: &str = "x-cbgate-error";

/// A request cbgate refused or could not complete.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    BadRequest(String),
    #[error("method {0:?} is not forwarded: cbgate passes GET, HEAD, POST, PUT, DELETE, PATCH and OPTIONS")]
    MethodNotAllowed(String),
    #[error("no route for {path}; routes: {prefixes}")]
    NoRoute { path: String, prefixes: String },
    #[error("request body is larger than max_body_bytes ({limit} bytes)")]
    BodyTooLarge { limit: u64 },
    #[error("the request body did not arrive within {0:?} (upstream.request_timeout)")]
    BodyDeadline(std::time::Duration),
    #[error("the request body stopped arriving: nothing for {after:?} (body_timeout); send the whole body without pauses")]
    BodyTimeout { after: std::time::Duration },
    #[error("could not sign the request")]
    Sign,
    /// `cbgate-key` or the route named a credential that is not configured.
    #[error("{from} names the credential {name}, which is not configured; configured: {known}")]
    UnknownKey {
        name: String,
        from: &'static str,
        known: String,
    },
    /// The derivatives gateway's token exchange failed (no token or JWT in the message).
    #[error("{0}; check the key (a CDP key with access to derivatives) and the clock")]
    Gateway(String),
    /// The selected credential is of another family than the route's host.
    #[error("the credential {name} ({from}) is a {kind} key, but {host} takes {family} keys; send cbgate-key with a {family} credential, or set the route's key")]
    KeyKindMismatch {
        name: String,
        from: &'static str,
        kind: &'static str,
        host: String,
        family: &'static str,
    },
    /// The selected credential is not one the client identity may use (`clients.NAME.keys`).
    #[error("the credential {key} ({from}) is not one client identity \"{identity}\" may use (clients.{identity}.keys: {allowed}); send cbgate-key with one of those, or add {key} to clients.{identity}.keys")]
    KeyNotAllowed {
        key: String,
        from: &'static str,
        identity: String,
        allowed: String,
    },
    #[error("cbgate has ws.max_sessions ({0}) WebSocket sessions open; retry later")]
    TooManySessions(usize),
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("invalid request path: {0}; send the path in its plain canonical form")]
    InvalidPath(&'static str),
    #[error("{0}")]
    PolicyDenied(#[from] Denied),
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    #[error("{0}")]
    GuardDenied(String),
    #[error("{0}")]
    InvalidOrder(String),
    #[error("{}", Refusal::Halted(.0.clone()))]
    Halted(HaltState),
    /// A `CONNECT` to a target cbgate does not sign for (`[intercept]`).
    #[error("{0}")]
    ConnectRefused(String),
    /// The intent record could not be made durable: the request is not sent (write-ahead).
    #[error("{0}; the request was not sent; check the disk and audit.file")]
    Audit(#[from] AuditError),
    /// The credential's rate budget has no token within `budget.max_wait` (429).
    #[error("{}", budget_message(.0))]
    Budget(BudgetRefusal),
}

/// The sentence of a budget refusal.
fn budget_message(r: &BudgetRefusal) -> String {
    match r {
        BudgetRefusal::Exhausted {
            class,
            waited,
            retry_after,
            paused,
        } => {
            let why = if *paused {
                "Coinbase answered 429, so cbgate pauses this credential's requests for every client"
            } else {
                "the credential's rate budget is spent"
            };
            format!(
                "{why} (class {}, budget.{}); waited {} ms (budget.max_wait); retry after {} s",
                class.name(),
                class.name(),
                waited.as_millis(),
                retry_secs(*retry_after)
            )
        }
        BudgetRefusal::Unavailable { class } => format!(
            "the shared rate budget (budget.redis) cannot be reached and budget.redis_unavailable = \"refuse\" (class {}); retry shortly, or set it to \"local\"",
            class.name()
        ),
    }
}

/// `Retry-After` in whole seconds, at least 1.
fn retry_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0).max(u64::from(d.is_zero()))
}

impl From<Refusal> for ProxyError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Denied(m) => ProxyError::GuardDenied(m),
            Refusal::BadOrder(m) => ProxyError::InvalidOrder(m),
            Refusal::Halted(h) => ProxyError::Halted(h),
            Refusal::BadCall(m) => ProxyError::BadRequest(m),
        }
    }
}

impl ProxyError {
    /// The HTTP status and the machine-readable code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ProxyError::MethodNotAllowed(_) => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            ProxyError::NoRoute { .. } => (StatusCode::NOT_FOUND, "no_route"),
            ProxyError::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            ProxyError::BodyDeadline(_) | ProxyError::BodyTimeout { .. } => {
                (StatusCode::REQUEST_TIMEOUT, "request_body_timeout")
            }
            ProxyError::Sign => (StatusCode::INTERNAL_SERVER_ERROR, "signing_failed"),
            ProxyError::UnknownKey { .. } => (StatusCode::BAD_REQUEST, "unknown_key"),
            ProxyError::Gateway(_) => (StatusCode::BAD_GATEWAY, "gateway_auth_failed"),
            ProxyError::KeyKindMismatch { .. } => (StatusCode::BAD_REQUEST, "key_kind_mismatch"),
            ProxyError::KeyNotAllowed { .. } => (StatusCode::FORBIDDEN, "key_not_allowed"),
            ProxyError::TooManySessions(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "too_many_connections")
            }
            ProxyError::Client(ClientError::Token | ClientError::NoIdentity { .. }) => {
                (StatusCode::UNAUTHORIZED, "client_unauthorized")
            }
            ProxyError::Client(ClientError::Origin(_) | ClientError::CrossSite(_)) => {
                (StatusCode::FORBIDDEN, "origin_not_allowed")
            }
            ProxyError::Client(ClientError::Host(_)) => (StatusCode::FORBIDDEN, "host_not_allowed"),
            ProxyError::Client(ClientError::HostCount | ClientError::Ambiguous(_)) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            ProxyError::InvalidPath(_) => (StatusCode::BAD_REQUEST, "invalid_path"),
            ProxyError::PolicyDenied(_) => (StatusCode::FORBIDDEN, "policy_denied"),
            ProxyError::GuardDenied(_) => (StatusCode::FORBIDDEN, "guard_denied"),
            ProxyError::InvalidOrder(_) => (StatusCode::BAD_REQUEST, "invalid_order"),
            ProxyError::Halted(_) => (StatusCode::LOCKED, "halted"),
            ProxyError::Audit(_) => (StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable"),
            ProxyError::ConnectRefused(_) => (StatusCode::FORBIDDEN, "connect_refused"),
            ProxyError::Budget(BudgetRefusal::Exhausted { .. }) => {
                (StatusCode::TOO_MANY_REQUESTS, "budget_exhausted")
            }
            ProxyError::Budget(BudgetRefusal::Unavailable { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, "budget_unavailable")
            }
            ProxyError::Upstream(e) => match e {
                UpstreamError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
                UpstreamError::Other { .. } | UpstreamError::Unprocessed { .. } => {
                    (StatusCode::BAD_GATEWAY, "upstream_error")
                }
                UpstreamError::Busy { .. } => (StatusCode::SERVICE_UNAVAILABLE, "upstream_busy"),
                UpstreamError::Connect(c) => match c.stage {
                    ConnectStage::Timeout => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
                    ConnectStage::Dns => (StatusCode::BAD_GATEWAY, "upstream_dns"),
                    ConnectStage::Connect => (StatusCode::BAD_GATEWAY, "upstream_connect"),
                    ConnectStage::Tls => (StatusCode::BAD_GATEWAY, "upstream_tls"),
                },
            },
        }
    }

    /// The JSON response for this error.
    pub fn into_response(self) -> Response<Body> {
        let (status, code) = self.status_and_code();
        let message = self.to_string();
        let mut resp = json_error(status, code, &message);
        if let ProxyError::Budget(r) = &self {
            let secs = match r {
                BudgetRefusal::Exhausted { retry_after, .. } => retry_secs(*retry_after),
                BudgetRefusal::Unavailable { .. } => 1,
            };
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        // Order refusals come in Advanced Trade's error shape, which order clients parse.
        if let ProxyError::GuardDenied(_) | ProxyError::InvalidOrder(_) | ProxyError::Halted(_) =
            &self
        {
            let mut body = serde_json::json!({
                "error": code,
                "message": message,
                "error_details": message,
            });
            if let ProxyError::Halted(h) = &self {
                body["halted_since"] = h.since_rfc3339().into();
                body["reason"] = h.reason.clone().into();
            }
            *resp.body_mut() = Full::new(Bytes::from(body.to_string()))
                .map_err(|never| match never {})
                .boxed_unsync();
        }
        resp
    }
}

/// Builds the error body (both API shapes, see the module doc) with the `x-cbgate-error` header.
pub fn json_error(status: StatusCode, code: &'static str, message: &str) -> Response<Body> {
    let body = serde_json::json!({
        "error": code,
        "message": message,
        "error_details": message,
        "errorType": code,
        "errorMessage": message,
    })
    .to_string();
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(ERROR_HEADER, HeaderValue::from_static(code));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_carry_the_advanced_trade_and_the_cdp_shape() {
        let resp = ProxyError::MethodNotAllowed("TRACE".into()).into_response();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[ERROR_HEADER], "method_not_allowed");
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        let message = v["message"].as_str().expect("message");
        assert!(message.contains("TRACE"), "{v}");
        assert_eq!(v["error"], "method_not_allowed");
        assert_eq!(v["error_details"], message);
        assert_eq!(v["errorType"], "method_not_allowed");
        assert_eq!(v["errorMessage"], message);
    }

    #[tokio::test]
    async fn budget_refusals_are_429_with_retry_after() {
        use crate::gate::budget::Class;
        use std::time::Duration;
        let resp = ProxyError::Budget(BudgetRefusal::Exhausted {
            class: Class::AdvancedPrivate,
            waited: Duration::from_millis(1000),
            retry_after: Duration::from_millis(1200),
            paused: false,
        })
        .into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[ERROR_HEADER], "budget_exhausted");
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(v["error"], "budget_exhausted");
        assert_eq!(v["errorType"], "budget_exhausted");
        assert!(
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("advanced_private")),
            "{v}"
        );
        assert_eq!(retry_secs(Duration::ZERO), 1);
        assert_eq!(retry_secs(Duration::from_secs(3)), 3);
        let resp = ProxyError::Budget(BudgetRefusal::Unavailable {
            class: Class::CdpRead,
        })
        .into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    }
}
