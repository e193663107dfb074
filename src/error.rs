//! Errors cbgate itself answers with, each mapped to one status and one code.
//!
//! The body is `{"error": "<code>", "message": "<sentence>"}` and the response carries
//! `x-cbgate-error: <code>`, so a client can tell cbgate's answers from Coinbase's (which pass
//! through untouched). Messages never carry a secret or a token: they are built from the
//! request line, host names and library errors that hold neither.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};

use crate::forward::upstream::{ConnectStage, UpstreamError};
use crate::gate::client::ClientError;
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
    #[error("could not sign the request")]
    Sign,
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
    /// The intent record could not be made durable: the request is not sent (write-ahead).
    #[error("{0}; the request was not sent; check the disk and audit.file")]
    Audit(#[from] AuditError),
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
            ProxyError::Sign => (StatusCode::INTERNAL_SERVER_ERROR, "signing_failed"),
            ProxyError::TooManySessions(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "too_many_connections")
            }
            ProxyError::Client(ClientError::Token) => {
                (StatusCode::UNAUTHORIZED, "client_unauthorized")
            }
            ProxyError::Client(ClientError::Origin(_)) => {
                (StatusCode::FORBIDDEN, "origin_not_allowed")
            }
            ProxyError::Client(ClientError::Host(_)) => (StatusCode::FORBIDDEN, "host_not_allowed"),
            ProxyError::Client(ClientError::HostCount) => (StatusCode::BAD_REQUEST, "bad_request"),
            ProxyError::InvalidPath(_) => (StatusCode::BAD_REQUEST, "invalid_path"),
            ProxyError::PolicyDenied(_) => (StatusCode::FORBIDDEN, "policy_denied"),
            ProxyError::Audit(_) => (StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable"),
            ProxyError::Upstream(e) => match e {
                UpstreamError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
                UpstreamError::Other { .. } => (StatusCode::BAD_GATEWAY, "upstream_error"),
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
        json_error(status, code, &self.to_string())
    }
}

/// Builds `{"error": code, "message": message}` with the `x-cbgate-error` header.
pub fn json_error(status: StatusCode, code: &'static str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
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
