//! WebSocket relay for the Advanced Trade streams (`/ws`, `/ws/user`).
//!
//! Work in progress: the upgrade is recognised and routed; relaying is not built yet.

use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::config::WsConfig;
use crate::error::ProxyError;
use crate::proxy::Proxy;
use crate::route::WsRoute;
use crate::Body;

/// Shared state of all WebSocket sessions.
#[derive(Debug)]
pub struct WsState {
    max_message_bytes: usize,
}

impl WsState {
    /// Builds the state from `[ws]`.
    pub fn new(cfg: &WsConfig) -> WsState {
        WsState {
            max_message_bytes: cfg.max_message_bytes,
        }
    }

    /// The configured message size limit.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Closes every open session with a close frame and waits up to `timeout` for them to end.
    pub async fn shutdown(&self, _timeout: Duration) {}
}

/// Whether `req` asks for a WebSocket upgrade (RFC 6455 §4.1).
pub fn is_upgrade(req: &Request<Incoming>) -> bool {
    let has_token = |name: http::header::HeaderName, token: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has_token(http::header::UPGRADE, "websocket") && has_token(http::header::CONNECTION, "upgrade")
}

/// Relays one WebSocket session between the client and `route`'s upstream.
pub async fn proxy(
    _proxy: &Proxy,
    route: &WsRoute,
    _req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    Err(ProxyError::BadRequest(format!(
        "WebSocket relay to {} is not available yet",
        route.upstream.host
    )))
}
