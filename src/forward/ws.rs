//! WebSocket relay for the Advanced Trade streams (`/ws`, `/ws/user`).
//!
//! A client upgrades over HTTP/1.1. cbgate first opens the upstream (verified TLS through
//! [`UpstreamClient::connect_http1`](crate::forward::upstream::UpstreamClient::connect_http1), then the
//! WebSocket handshake), and only when Coinbase has accepted answers the client with 101; a
//! failure before that is one of cbgate's JSON errors, so the client learns what went wrong.
//!
//! A session slot (`ws.max_sessions`) is reserved atomically before anything else happens and
//! held until the session's task ends, whatever way it ends; an upgrade finding no free slot
//! gets 503.
//!
//! The relay then runs one task per session with one message in flight per direction: read a
//! message, await until it is written out to the other side, read the next. A slow reader
//! therefore stops cbgate reading the other side (TCP back-pressure reaches the sender), and a
//! session holds at most one message per direction (the message and its copy in tungstenite's
//! write buffer: at most `ws.max_message_bytes` from Coinbase, `ws.max_client_message_bytes`
//! from the client) plus fixed-size socket buffers. tungstenite checks each frame's length
//! before reading its payload, so an oversized message is refused without being buffered.
//!
//! What passes and what changes:
//! - A client text message that is a JSON object whose `type` is `subscribe` or `unsubscribe`
//!   gets a fresh `jwt` (replacing any the client sent, in its place) and loses the client's
//!   own credential fields (`api_key`, `signature`, `timestamp`, `passphrase`); the other
//!   top-level fields keep their order and their values their exact text. Without a key the
//!   client's credential fields (`jwt` included) are still removed, and a message without any
//!   passes byte for byte: a client credential never reaches Coinbase. The message is recognised by a scan that looks at the `type` field only
//!   and skips every other value without building it, so no client input becomes a JSON tree.
//! - Every other message passes as it came: text, binary, ping and pong payloads, close code and
//!   reason. Fragmented messages are reassembled by tungstenite and forwarded as one frame (a
//!   control frame sent between two fragments therefore arrives before the message it interrupted).
//! - tungstenite answers every ping on the hop where it arrives (it cannot be turned off), and
//!   cbgate also forwards the ping and, later, the far end's pong. So a client's ping reaches
//!   Coinbase as a ping, and the client gets two pongs with its payload: cbgate's at once, then
//!   Coinbase's (RFC 6455 §5.5.3 allows unsolicited pongs; clients ignore the extra one). The
//!   same holds the other way. Should a relayed pong find cbgate's own answer still unsent, it
//!   replaces it (tungstenite keeps one pending pong), and that side gets one pong.
//! - Per-message compression is not negotiated with either side.
//!
//! When a session ends by itself:
//! - a client message over `ws.max_client_message_bytes`: 1009 to the client;
//! - no client subscribe within `ws.subscribe_timeout` (as Coinbase does): 1008 to the client;
//! - no message read from either side, and none delivered, for `ws.idle_timeout`: 1001. One
//!   message that takes longer than that to deliver to a peer that does not read also counts.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use futures_util::{Sink, SinkExt as _, Stream, StreamExt as _};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{watch, Notify};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::config::WsConfig;
use crate::error::ProxyError;
use crate::forward::upstream::{UpstreamClient, UpstreamError};
use crate::gate::route::WsRoute;
use crate::ops::metrics::WsCounters;
use crate::sign::jwt::{self, Binding, Signer};
use crate::sign::keys::Credential;
use crate::Body;

/// How long a closing handshake may take on each side before cbgate drops the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Room in tungstenite's write buffer beyond one full message: frame header plus a queued
/// pong or close frame (control frames are at most 127 bytes on the wire).
const WRITE_BUFFER_SLACK: usize = 1024;

/// The largest close reason RFC 6455 allows (125-byte control payload minus the code).
const MAX_CLOSE_REASON: usize = 123;

/// How long the client may take to complete its upgrade once cbgate answered 101.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(10);

/// Room for the `"jwt":"..."` a signed subscribe gains (a token is well under 2 KiB).
const JWT_ROOM: usize = 16 * 1024;

/// Shared state of all WebSocket sessions: limits, shutdown signal, session count and counters.
#[derive(Debug)]
pub struct WsState {
    max_message_bytes: usize,
    max_client_message_bytes: usize,
    max_sessions: usize,
    subscribe_timeout: Duration,
    idle_timeout: Duration,
    shared: Arc<Shared>,
}

/// What session tasks (which outlive the request) share with [`WsState`].
#[derive(Debug)]
struct Shared {
    /// `true` once shutdown started; every session watches it.
    shutdown: watch::Sender<bool>,
    /// Session slots reserved: sessions open or being opened. Never above `ws.max_sessions`.
    open: AtomicUsize,
    /// Notified whenever a session ends, so that shutdown can wait without polling.
    ended: Notify,
    /// The counters `/metrics` reports (sessions, messages each way, subscribes signed).
    counters: Arc<WsCounters>,
}

impl WsState {
    /// Builds the state from `[ws]`.
    pub fn new(cfg: &WsConfig, counters: Arc<WsCounters>) -> WsState {
        WsState {
            max_message_bytes: cfg.max_message_bytes,
            max_client_message_bytes: cfg.max_client_message_bytes,
            max_sessions: cfg.max_sessions,
            subscribe_timeout: cfg.subscribe_timeout,
            idle_timeout: cfg.idle_timeout,
            shared: Arc::new(Shared {
                shutdown: watch::Sender::new(false),
                open: AtomicUsize::new(0),
                ended: Notify::new(),
                counters,
            }),
        }
    }

    /// The configured session limit.
    pub fn max_sessions(&self) -> usize {
        self.max_sessions
    }

    /// The configured limit on messages from Coinbase.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// The configured limit on messages from a client.
    pub fn max_client_message_bytes(&self) -> usize {
        self.max_client_message_bytes
    }

    /// Sessions open now, counting those still connecting upstream (slot reserved, relay
    /// not finished).
    pub fn open_sessions(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Messages relayed client → Coinbase since start (text, binary, ping, pong; not close).
    pub fn messages_to_upstream(&self) -> u64 {
        self.shared
            .counters
            .messages_to_upstream
            .load(Ordering::Relaxed)
    }

    /// Messages relayed Coinbase → client since start (text, binary, ping, pong; not close).
    pub fn messages_to_client(&self) -> u64 {
        self.shared
            .counters
            .messages_to_client
            .load(Ordering::Relaxed)
    }

    /// The relay's counters, as `/metrics` reports them.
    pub fn counters(&self) -> &WsCounters {
        &self.shared.counters
    }

    /// Subscribe and unsubscribe messages that cbgate signed since start.
    pub fn subscribes_signed(&self) -> u64 {
        self.shared
            .counters
            .subscribes_signed
            .load(Ordering::Relaxed)
    }

    /// Closes every open session with a close frame (1001 "cbgate shutting down" to the client,
    /// 1001 to Coinbase) and waits up to `timeout` for them to end. Sessions that start after
    /// this call close at once.
    pub async fn shutdown(&self, timeout: Duration) {
        self.shared.shutdown.send_replace(true);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register interest before reading the count so that an end in between is not missed.
            let ended = self.shared.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let open = self.shared.open.load(Ordering::SeqCst);
            if open == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                tracing::warn!(
                    open,
                    after = ?timeout,
                    "WebSocket sessions still open at the drain timeout"
                );
                return;
            }
        }
    }
}

/// One reserved session slot, held for as long as the session lives and released on drop,
/// whatever way it ends (upstream failure, upgrade never completed, session end, shutdown).
struct SessionGuard(Arc<Shared>);

impl SessionGuard {
    /// Reserves a slot if fewer than `max` are taken. Compare-and-swap, so concurrent upgrades
    /// can never take more than `max` between them.
    fn try_reserve(shared: &Arc<Shared>, max: usize) -> Option<SessionGuard> {
        shared
            .open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        shared
            .counters
            .open_sessions
            .fetch_add(1, Ordering::Relaxed);
        Some(SessionGuard(Arc::clone(shared)))
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0
            .counters
            .open_sessions
            .fetch_sub(1, Ordering::Relaxed);
        self.0.ended.notify_waiters();
    }
}

/// Mints WebSocket subscribe tokens for relay tasks, which outlive the request that started
/// them and so cannot borrow the proxy. It shares the proxy's [`Signer`], so a session
/// signs with the key in use at each subscribe, rotated keys included. Debug never shows a key.
#[derive(Clone, Debug)]
pub struct WsSigner {
    signer: Arc<Signer>,
    /// The session's credential when it is not `[key]`: an Exchange key (signed subscribe
    /// fields) or another CDP key (its own JWTs), held as loaded when the session opened.
    named: Option<Arc<Credential>>,
}

impl WsSigner {
    /// A subscribe-token minter over the shared signer.
    pub fn new(signer: Arc<Signer>) -> WsSigner {
        WsSigner {
            signer,
            named: None,
        }
    }

    /// Signs with the named credential `cred` instead of `[key]` (the clock stays shared).
    pub fn with_credential(mut self, cred: Arc<Credential>) -> WsSigner {
        self.named = Some(cred);
        self
    }

    /// Whether a credential is configured (subscribes get cbgate's signature).
    pub fn has_key(&self) -> bool {
        self.named.is_some() || self.signer.key().is_some()
    }

    /// A fresh token without request binding (no `uri`), or `None` without a key.
    pub fn token(&self) -> Result<Option<String>, ProxyError> {
        let none = Binding {
            method: "",
            host: "",
            path: "",
        };
        match self.named.as_deref() {
            Some(Credential::Cdp(k)) => jwt::mint(
                k,
                jwt::now_secs(self.signer.clock_offset()),
                jwt::ClaimStyle::None,
                &none,
            )
            .map(Some)
            .map_err(|_| ProxyError::Sign),
            Some(Credential::Hmac(_)) => Ok(None),
            None => self
                .signer
                .mint(jwt::ClaimStyle::None, &none)
                .map_err(|_| ProxyError::Sign),
        }
    }

    /// The credential fields a subscribe gets, each value as JSON text, and whether they
    /// take the place of the client's `jwt` (else they go last); `None` without a key.
    fn fields(&self) -> Result<Option<(SubscribeFields, bool)>, ProxyError> {
        if let Some(Credential::Hmac(h)) = self.named.as_deref() {
            let now = jwt::now_secs(self.signer.clock_offset());
            let mut out = Vec::with_capacity(4);
            for (name, v) in h.ws_subscribe_fields(now) {
                let name = match name.as_str() {
                    "signature" => "signature",
                    "key" => "key",
                    "passphrase" => "passphrase",
                    _ => "timestamp",
                };
                out.push((
                    name,
                    serde_json::to_string(&v).map_err(|_| ProxyError::Sign)?,
                ));
            }
            return Ok(Some((out, false)));
        }
        let Some(token) = self.token()? else {
            return Ok(None);
        };
        let quoted = serde_json::to_string(&token).map_err(|_| ProxyError::Sign)?;
        Ok(Some((vec![("jwt", quoted)], true)))
    }
}

/// Credential fields for a subscribe: names and values as JSON text.
type SubscribeFields = Vec<(&'static str, String)>;

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

/// The tungstenite settings for one side: `read_limit` for each message and frame read from
/// it (checked before a frame's payload is buffered), and a write buffer that holds one
/// message of up to `largest_write` bytes (the relay never queues a second one behind it).
fn ws_config(read_limit: usize, largest_write: usize) -> WebSocketConfig {
    let base = WebSocketConfig::default();
    let max_write = base
        .write_buffer_size
        .saturating_add(largest_write)
        .saturating_add(WRITE_BUFFER_SLACK);
    base.max_message_size(Some(read_limit))
        .max_frame_size(Some(read_limit))
        .max_write_buffer_size(max_write)
}

/// Checks the client's handshake headers and returns its `Sec-WebSocket-Key`.
fn check_handshake(req: &Request<Incoming>) -> Result<HeaderValue, ProxyError> {
    if req.method() != Method::GET {
        return Err(ProxyError::BadRequest(format!(
            "a WebSocket upgrade must be a GET request, not {}",
            req.method()
        )));
    }
    if req.version() != Version::HTTP_11 {
        return Err(ProxyError::BadRequest(
            "a WebSocket upgrade needs HTTP/1.1".into(),
        ));
    }
    match req.headers().get(header::SEC_WEBSOCKET_VERSION) {
        Some(v) if v == "13" => {}
        Some(v) => {
            return Err(ProxyError::BadRequest(format!(
                "unsupported Sec-WebSocket-Version {:?}: cbgate speaks version 13",
                String::from_utf8_lossy(v.as_bytes())
            )))
        }
        None => {
            return Err(ProxyError::BadRequest(
                "WebSocket upgrade without Sec-WebSocket-Version: 13".into(),
            ))
        }
    }
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| {
            ProxyError::BadRequest("WebSocket upgrade without Sec-WebSocket-Key".into())
        })?;
    // RFC 6455 §4.1: the key is 16 random bytes, base64-encoded.
    match STANDARD.decode(key.as_bytes()) {
        Ok(raw) if raw.len() == 16 => Ok(key.clone()),
        _ => Err(ProxyError::BadRequest(
            "Sec-WebSocket-Key must be 16 bytes in base64".into(),
        )),
    }
}

/// Relays one WebSocket session between the client and `route`'s upstream.
///
/// Returns cbgate's JSON error when the handshake is bad or the upstream cannot be reached or
/// refuses the upgrade; otherwise 101, and the relay runs in its own task.
pub async fn proxy(
    client: &UpstreamClient,
    state: &WsState,
    signer: WsSigner,
    route: &WsRoute,
    req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let slot = reserve(state, &req)?;
    proxy_reserved(client, state, signer, route, req, slot).await
}

/// A checked handshake and its reserved session slot (`ws.max_sessions`), taken before
/// anything else is spent on the upgrade (a rate-budget token, a connection). Dropping it
/// frees the slot.
#[derive(Debug)]
pub struct Reserved {
    client_key: HeaderValue,
    slot: SessionGuard,
}

impl std::fmt::Debug for SessionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionGuard")
    }
}

/// Checks the upgrade request and reserves a session slot: refused (400, 503) without
/// anything spent.
pub fn reserve(state: &WsState, req: &Request<Incoming>) -> Result<Reserved, ProxyError> {
    let client_key = check_handshake(req)?;
    let Some(slot) = SessionGuard::try_reserve(&state.shared, state.max_sessions()) else {
        state
            .shared
            .counters
            .sessions_refused
            .fetch_add(1, Ordering::Relaxed);
        return Err(ProxyError::TooManySessions(state.max_sessions()));
    };
    Ok(Reserved { client_key, slot })
}

/// [`proxy`] with the handshake checked and the slot reserved by [`reserve`].
pub async fn proxy_reserved(
    client: &UpstreamClient,
    state: &WsState,
    signer: WsSigner,
    route: &WsRoute,
    mut req: Request<Incoming>,
    reserved: Reserved,
) -> Result<Response<Body>, ProxyError> {
    let Reserved {
        client_key,
        slot: guard,
    } = reserved;
    let upstream = &route.upstream;

    let tls = client
        .connect_http1(&upstream.host, upstream.port)
        .await
        .map_err(|e| ProxyError::Upstream(UpstreamError::Connect(e)))?;

    // Coinbase's streams live at `/`; the client's query string, if any, goes along.
    let target = match req.uri().query() {
        Some(q) => format!("wss://{}/?{q}", upstream.authority),
        None => format!("wss://{}/", upstream.authority),
    };
    let other = |detail: String| {
        ProxyError::Upstream(UpstreamError::Other {
            host: upstream.host.clone(),
            detail,
        })
    };
    let mut up_req = target
        .into_client_request()
        .map_err(|e| other(format!("cannot build the upgrade request: {e}")))?;
    // Only these client headers go upstream: the subprotocol must be negotiated end to end, and
    // the user agent helps Coinbase support. Cookies, credentials and Origin stay here.
    for name in [header::SEC_WEBSOCKET_PROTOCOL, header::USER_AGENT] {
        for v in req.headers().get_all(&name) {
            up_req.headers_mut().append(&name, v.clone());
        }
    }

    // Coinbase sends up to `max_message_bytes` and is sent client messages (signed ones a
    // token longer); the client the other way round.
    let upstream_config = ws_config(
        state.max_message_bytes(),
        state.max_client_message_bytes().saturating_add(JWT_ROOM),
    );
    let client_config = ws_config(state.max_client_message_bytes(), state.max_message_bytes());
    let (upstream_ws, up_resp) = match tokio::time::timeout(
        client.request_timeout(),
        tokio_tungstenite::client_async_with_config(up_req, tls, Some(upstream_config)),
    )
    .await
    {
        Err(_) => {
            return Err(ProxyError::Upstream(UpstreamError::Timeout {
                host: upstream.host.clone(),
                after: client.request_timeout(),
            }))
        }
        Ok(Err(WsError::Http(resp))) => {
            return Err(other(format!(
                "WebSocket upgrade answered with HTTP {}{}",
                resp.status(),
                body_excerpt(resp.body().as_deref())
            )))
        }
        Ok(Err(e)) => return Err(other(format!("WebSocket handshake failed: {e}"))),
        Ok(Ok(pair)) => pair,
    };

    let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    let accept = derive_accept_key(client_key.as_bytes());
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::try_from(accept).map_err(|_| other("bad accept key".into()))?,
    );
    // The subprotocol Coinbase chose (tungstenite checked it is one the client offered).
    if let Some(p) = up_resp.headers().get(header::SEC_WEBSOCKET_PROTOCOL) {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, p.clone());
    }

    // The slot was counted since the start, so a shutdown starting before the client's
    // upgrade completes still waits for (and closes) this session.
    let on_upgrade = hyper::upgrade::on(&mut req);
    let session = Session {
        route: route.path.clone(),
        host: upstream.host.clone(),
        signer,
        shared: Arc::clone(&state.shared),
        max_message_bytes: state.max_message_bytes(),
        max_client_message_bytes: state.max_client_message_bytes(),
        subscribe_timeout: state.subscribe_timeout,
        idle_timeout: state.idle_timeout,
    };
    tokio::spawn(async move {
        let _guard = guard;
        let mut upstream_ws = upstream_ws;
        let upgraded = match tokio::time::timeout(UPGRADE_TIMEOUT, on_upgrade).await {
            Ok(Ok(upgraded)) => Ok(upgraded),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("not completed within {UPGRADE_TIMEOUT:?}")),
        };
        match upgraded {
            Ok(upgraded) => {
                let client_ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(client_config),
                )
                .await;
                session.run(client_ws, upstream_ws).await;
            }
            Err(e) => {
                tracing::debug!(route = %session.route, error = %e, "client upgrade failed");
                let frame = close_frame(CloseCode::Away, "cbgate: client went away");
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, upstream_ws.close(Some(frame))).await;
            }
        }
    });
    Ok(resp)
}

/// Up to 200 characters of an error body, for the error message (printable ASCII only).
fn body_excerpt(body: Option<&[u8]>) -> String {
    let Some(body) = body.filter(|b| !b.is_empty()) else {
        return String::new();
    };
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                ' '
            }
        })
        .take(200)
        .collect();
    format!(": {}", text.trim())
}

/// A close frame; the reason is cut to what RFC 6455 allows, on a character boundary.
fn close_frame(code: CloseCode, reason: &str) -> CloseFrame {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    CloseFrame {
        code,
        reason: reason[..end].to_owned().into(),
    }
}

/// Which end of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Upstream,
}

/// Why a session ends.
#[derive(Debug)]
enum End {
    /// This side sent a Close frame (forwarded to the other side as it is).
    Closed(Side, Option<CloseFrame>),
    /// Reading from or writing to this side failed.
    Failed(Side, WsError),
    /// This side sent a message larger than its limit (`ws.max_client_message_bytes` for the
    /// client, `ws.max_message_bytes` for Coinbase).
    TooBig(Side, WsError),
    /// The client sent no subscribe within `ws.subscribe_timeout`.
    NoSubscribe,
    /// Neither side sent anything for `ws.idle_timeout`.
    Idle,
    /// cbgate could not mint a token for a subscribe message.
    SignFailed,
    /// cbgate is shutting down.
    Shutdown,
}

impl End {
    fn label(&self) -> &'static str {
        match self {
            End::Closed(Side::Client, _) => "client_closed",
            End::Closed(Side::Upstream, _) => "upstream_closed",
            End::Failed(Side::Client, _) => "client_failed",
            End::Failed(Side::Upstream, _) => "upstream_failed",
            End::TooBig(Side::Client, _) => "client_message_too_big",
            End::TooBig(Side::Upstream, _) => "upstream_message_too_big",
            End::NoSubscribe => "subscribe_timeout",
            End::Idle => "idle_timeout",
            End::SignFailed => "signing_failed",
            End::Shutdown => "shutdown",
        }
    }
}

/// How to finish one side once the session ends.
enum Finish {
    /// The peer closed first: tungstenite has queued the echo of its Close; send it.
    Echo,
    /// Send this Close frame, then wait for the peer's reply.
    Close(Option<CloseFrame>),
    /// The connection is broken: just drop it.
    Drop,
}

/// The close frame for a peer that broke the protocol, or `None` when the connection itself
/// is gone (nothing can be sent).
fn protocol_close(e: &WsError) -> Option<CloseFrame> {
    use tokio_tungstenite::tungstenite::error::ProtocolError as P;
    match e {
        WsError::Protocol(P::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(p) => Some(close_frame(
            CloseCode::Protocol,
            &format!("cbgate: protocol error: {p}"),
        )),
        WsError::Utf8(_) => Some(close_frame(
            CloseCode::Invalid,
            "cbgate: invalid UTF-8 in a text message",
        )),
        _ => None,
    }
}

/// Everything a relay task needs, owned (the task outlives the request).
struct Session {
    route: String,
    host: String,
    signer: WsSigner,
    shared: Arc<Shared>,
    max_message_bytes: usize,
    max_client_message_bytes: usize,
    subscribe_timeout: Duration,
    idle_timeout: Duration,
}

/// What a session's two pumps and its timers share.
struct Activity {
    /// When the session started; `last` counts from here.
    started: Instant,
    /// Milliseconds after `started` of the last message read from or delivered to either side.
    last: AtomicU64,
    /// Whether the client has sent a subscribe.
    subscribed: AtomicBool,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl Session {
    async fn run<C, U>(self, client: WebSocketStream<C>, upstream: WebSocketStream<U>)
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let started = Instant::now();
        let (mut client_tx, mut client_rx) = client.split();
        let (mut up_tx, mut up_rx) = upstream.split();
        let to_upstream = AtomicU64::new(0);
        let to_client = AtomicU64::new(0);
        let signed = AtomicU64::new(0);
        let mut shutdown = self.shared.shutdown.subscribe();
        let activity = Activity {
            started,
            last: AtomicU64::new(0),
            subscribed: AtomicBool::new(false),
        };

        let end = tokio::select! {
            end = self.pump(Side::Client, &mut client_rx, &mut up_tx, &to_upstream, &signed, &activity) => end,
            end = self.pump(Side::Upstream, &mut up_rx, &mut client_tx, &to_client, &signed, &activity) => end,
            () = async {
                tokio::time::sleep(self.subscribe_timeout).await;
                if activity.subscribed.load(Ordering::Relaxed) {
                    std::future::pending::<()>().await;
                }
            } => End::NoSubscribe,
            () = async {
                loop {
                    let last = Duration::from_millis(activity.last.load(Ordering::Relaxed));
                    // Past the end of time (a huge configured timeout): never idle.
                    let quiet_until = last
                        .checked_add(self.idle_timeout)
                        .and_then(|d| started.checked_add(d));
                    let Some(quiet_until) = quiet_until else {
                        std::future::pending::<()>().await;
                        return;
                    };
                    if Instant::now() >= quiet_until {
                        return;
                    }
                    tokio::time::sleep_until(quiet_until.into()).await;
                }
            } => End::Idle,
            () = async {
                // The sender lives in `Shared`, which this session holds, so this cannot fail;
                // if it did, that would be no reason to end the session.
                if shutdown.wait_for(|s| *s).await.is_err() {
                    std::future::pending::<()>().await;
                }
            } => End::Shutdown,
        };

        // Counted when the session is ended, not once the close handshakes are done.
        let counters = &self.shared.counters;
        let limit_hit = match &end {
            End::TooBig(Side::Client, _) => Some(&counters.client_messages_too_big),
            End::NoSubscribe => Some(&counters.subscribe_timeouts),
            End::Idle => Some(&counters.idle_timeouts),
            _ => None,
        };
        if let Some(c) = limit_hit {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let (client_finish, upstream_finish) = self.finishes(&end);
        let client_code = match &client_finish {
            Finish::Close(f) => f.as_ref().map(|f| u16::from(f.code)),
            _ => None,
        };
        let closed_code = match &end {
            End::Closed(_, f) => f.as_ref().map(|f| u16::from(f.code)),
            _ => client_code,
        };
        tokio::join!(
            finish(&mut client_tx, &mut client_rx, client_finish),
            finish(&mut up_tx, &mut up_rx, upstream_finish),
        );

        let detail = match &end {
            End::Failed(_, e) | End::TooBig(_, e) => Some(e.to_string()),
            _ => None,
        };
        // One line per session. Never payloads, tokens or close reasons (which peers write).
        macro_rules! session_line {
            ($level:ident) => {
                tracing::$level!(
                    route = %self.route,
                    upstream = %self.host,
                    duration_ms = started.elapsed().as_millis() as u64,
                    to_upstream = to_upstream.load(Ordering::Relaxed),
                    to_client = to_client.load(Ordering::Relaxed),
                    signed = signed.load(Ordering::Relaxed),
                    end = end.label(),
                    close_code = closed_code,
                    detail,
                    "websocket session"
                )
            };
        }
        // A session cbgate ended for breaking a limit is worth a warning.
        if limit_hit.is_some() {
            session_line!(warn);
        } else {
            session_line!(info);
        }
    }

    /// What each side gets, in the order (client, upstream).
    fn finishes(&self, end: &End) -> (Finish, Finish) {
        let away = |reason: &str| Finish::Close(Some(close_frame(CloseCode::Away, reason)));
        match end {
            End::Closed(Side::Client, f) => (Finish::Echo, Finish::Close(f.clone())),
            End::Closed(Side::Upstream, f) => (Finish::Close(f.clone()), Finish::Echo),
            End::Failed(Side::Client, e) => (
                protocol_close(e).map_or(Finish::Drop, |f| Finish::Close(Some(f))),
                away("cbgate: client went away"),
            ),
            End::Failed(Side::Upstream, e) => (
                Finish::Close(Some(close_frame(
                    CloseCode::Error,
                    &format!("cbgate: upstream {} failed: {e}", self.host),
                ))),
                protocol_close(e).map_or(Finish::Drop, |f| Finish::Close(Some(f))),
            ),
            End::TooBig(Side::Client, _) => (
                Finish::Close(Some(close_frame(
                    CloseCode::Size,
                    &format!(
                        "cbgate: message larger than ws.max_client_message_bytes ({})",
                        self.max_client_message_bytes
                    ),
                ))),
                away("cbgate: client went away"),
            ),
            End::NoSubscribe => (
                Finish::Close(Some(close_frame(
                    CloseCode::Policy,
                    &format!(
                        "cbgate: no subscribe within ws.subscribe_timeout ({:?})",
                        self.subscribe_timeout
                    ),
                ))),
                away("cbgate: client sent no subscribe"),
            ),
            End::Idle => {
                let reason = format!(
                    "cbgate: no message for ws.idle_timeout ({:?})",
                    self.idle_timeout
                );
                (away(&reason), away(&reason))
            }
            End::TooBig(Side::Upstream, _) => (
                Finish::Close(Some(close_frame(
                    CloseCode::Size,
                    &format!(
                        "cbgate: upstream message larger than ws.max_message_bytes ({})",
                        self.max_message_bytes
                    ),
                ))),
                Finish::Close(Some(close_frame(CloseCode::Size, "message too big"))),
            ),
            End::SignFailed => (
                Finish::Close(Some(close_frame(
                    CloseCode::Error,
                    "cbgate could not sign the subscribe message",
                ))),
                away("cbgate: client went away"),
            ),
            End::Shutdown => (away("cbgate shutting down"), away("cbgate shutting down")),
        }
    }

    /// Relays messages read from `from` to `to`, one at a time, until something ends the
    /// session. Client text messages get signed.
    async fn pump<R, W>(
        &self,
        from: Side,
        rx: &mut R,
        tx: &mut W,
        count: &AtomicU64,
        signed: &AtomicU64,
        activity: &Activity,
    ) -> End
    where
        R: Stream<Item = Result<Message, WsError>> + Unpin,
        W: Sink<Message, Error = WsError> + Unpin,
    {
        let to = match from {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        };
        let total = match from {
            Side::Client => &self.shared.counters.messages_to_upstream,
            Side::Upstream => &self.shared.counters.messages_to_client,
        };
        loop {
            let msg = match rx.next().await {
                Some(Ok(Message::Close(frame))) => return End::Closed(from, frame),
                Some(Ok(msg)) => msg,
                Some(Err(e @ WsError::Capacity(_))) => return End::TooBig(from, e),
                Some(Err(e)) => return End::Failed(from, e),
                None => return End::Failed(from, WsError::ConnectionClosed),
            };
            activity.touch();
            let msg = match (from, msg) {
                (Side::Client, Message::Text(text)) => {
                    let kind = subscription_kind(&text);
                    if kind == Some(SubKind::Subscribe) {
                        activity.subscribed.store(true, Ordering::Relaxed);
                    }
                    match kind.map(|_| sign_subscription(&text, &self.signer)) {
                        Some(Ok(Some(rewritten))) => {
                            // Without a key the rewrite only removed client credentials.
                            if self.signer.has_key() {
                                signed.fetch_add(1, Ordering::Relaxed);
                                self.shared
                                    .counters
                                    .subscribes_signed
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            Message::text(rewritten)
                        }
                        None | Some(Ok(None)) => Message::Text(text),
                        Some(Err(_)) => return End::SignFailed,
                    }
                }
                // tungstenite's reader never yields raw frames.
                (_, Message::Frame(_)) => continue,
                (_, msg) => msg,
            };
            // Awaiting the flush is the back-pressure: nothing more is read from `from` until
            // `to` has taken this message.
            if let Err(e) = tx.send(msg).await {
                return End::Failed(to, e);
            }
            activity.touch();
            count.fetch_add(1, Ordering::Relaxed);
            total.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Finishes one side within [`CLOSE_TIMEOUT`]: sends the close (or its echo) and reads until
/// the peer's reply or the end of the connection, discarding anything else.
async fn finish<R, W>(tx: &mut W, rx: &mut R, how: Finish)
where
    R: Stream<Item = Result<Message, WsError>> + Unpin,
    W: Sink<Message, Error = WsError> + Unpin,
{
    let work = async {
        let sent = match how {
            Finish::Drop => return,
            // With the peer's Close received, `close` only flushes the queued echo.
            Finish::Echo => tx.close().await,
            Finish::Close(frame) => tx.send(Message::Close(frame)).await,
        };
        if sent.is_err() {
            return;
        }
        while let Some(Ok(_)) = rx.next().await {}
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, work).await;
}

/// The two client messages cbgate signs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SubKind {
    Subscribe,
    Unsubscribe,
}

/// Top-level field names the rewrite treats specially.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    Type,
    Jwt,
    // The client's own credentials (legacy Exchange-style auth): never forwarded next to
    // cbgate's token.
    ApiKey,
    Key,
    Signature,
    Timestamp,
    Passphrase,
    #[serde(other)]
    Other,
}

/// A `type` value: the kind when it is the string `subscribe` or `unsubscribe`, `None` for any
/// other string. Anything but a string is an error, which makes the message not a subscription.
struct TypeValue(Option<SubKind>);

impl<'de> Deserialize<'de> for TypeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TypeValue, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TypeValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TypeValue, E> {
                Ok(TypeValue(match v {
                    "subscribe" => Some(SubKind::Subscribe),
                    "unsubscribe" => Some(SubKind::Unsubscribe),
                    _ => None,
                }))
            }
        }
        d.deserialize_str(V)
    }
}

/// Finds `type` in a JSON object, skipping every other value without building it (serde's
/// `IgnoredAny`), so the scan allocates nothing however large or deep the input is.
struct KindScan;

impl<'de> Visitor<'de> for KindScan {
    type Value = Option<SubKind>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<SubKind>, A::Error> {
        // A repeated `type` counts as its last value, as for most JSON parsers.
        let mut kind = None;
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Type => kind = map.next_value::<TypeValue>()?.0,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(kind)
    }
}

/// Whether `text` is a JSON object whose `type` is `subscribe` or `unsubscribe`.
fn subscription_kind(text: &str) -> Option<SubKind> {
    // Cheap rejection of everything that cannot be an object (market data clients rarely send
    // anything else, but binary-looking text should not be scanned for nothing).
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let mut d = serde_json::Deserializer::from_str(text);
    let kind = d.deserialize_map(KindScan).ok()?;
    d.end().ok()?;
    kind
}

/// A top-level key as written, borrowed from the input unless it holds escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Writes the object it visits to `out` with cbgate's credential `fields` (a CDP `jwt` in the
/// place of the first client `jwt`, or last; Exchange's signed fields last; none without a
/// credential) and the client's credential fields left out, counting them in `dropped`. Other values are copied as their raw text
/// (`RawValue` borrows it from the input), so nothing is parsed into a tree and the output is
/// at most the input plus the token.
struct Rewrite<'t> {
    /// Field names and their values as JSON text.
    fields: &'t [(&'static str, String)],
    /// Whether the fields go where the client's `jwt` was (else last).
    at_jwt: bool,
    out: &'t mut Vec<u8>,
    dropped: &'t mut usize,
}

impl<'de> Visitor<'de> for Rewrite<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Rewrite {
            fields,
            at_jwt,
            out,
            dropped,
        } = self;
        let mut first = true;
        let mut jwt_written = false;
        let mut put = |out: &mut Vec<u8>, key: &str, raw: &str| -> Result<(), A::Error> {
            out.push(if first { b'{' } else { b',' });
            first = false;
            serde_json::to_writer(&mut *out, key).map_err(de::Error::custom)?;
            out.push(b':');
            out.extend_from_slice(raw.as_bytes());
            Ok(())
        };
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            match Field::deserialize(de::value::StrDeserializer::<A::Error>::new(&key))? {
                Field::Jwt => {
                    map.next_value::<IgnoredAny>()?;
                    *dropped += 1;
                    if at_jwt && !jwt_written {
                        for (name, value) in fields {
                            put(out, name, value)?;
                        }
                        jwt_written = true;
                    }
                }
                Field::ApiKey
                | Field::Key
                | Field::Signature
                | Field::Timestamp
                | Field::Passphrase => {
                    map.next_value::<IgnoredAny>()?;
                    *dropped += 1;
                }
                Field::Type | Field::Other => {
                    let raw = map.next_value::<&'de RawValue>()?;
                    put(out, &key, raw.get())?;
                }
            }
        }
        if !jwt_written {
            for (name, value) in fields {
                put(out, name, value)?;
            }
        }
        if first {
            out.push(b'{');
        }
        out.push(b'}');
        Ok(())
    }
}

/// The subscribe/unsubscribe `text` with the client's credential fields removed and, when a
/// key is configured, `jwt` set to a fresh token. `None` when `text` is not a JSON object, or
/// when there is no key and nothing to remove: it then passes unchanged.
fn sign_subscription(text: &str, signer: &WsSigner) -> Result<Option<String>, ProxyError> {
    // Without a credential nothing is added, but the client's credential fields still go.
    let (fields, at_jwt) = signer.fields()?.unwrap_or_default();
    let extra: usize = fields.iter().map(|(n, v)| n.len() + v.len() + 4).sum();
    let mut out = Vec::with_capacity(text.len() + extra + 16);
    let mut dropped = 0;
    let mut d = serde_json::Deserializer::from_str(text);
    let rewritten = d.deserialize_map(Rewrite {
        fields: &fields,
        at_jwt,
        out: &mut out,
        dropped: &mut dropped,
    });
    if rewritten.is_err() || d.end().is_err() || (fields.is_empty() && dropped == 0) {
        return Ok(None);
    }
    // Made of the input's own (UTF-8) text and serde_json's output.
    Ok(String::from_utf8(out).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sign::key::ApiKey;
    use serde_json::Value;

    fn unsigned() -> WsSigner {
        WsSigner::new(Arc::new(Signer::new(None)))
    }

    fn signed_with_test_key() -> WsSigner {
        // Any valid key: a PKCS#8 P-256 key through the public parser.
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .expect("pkcs8");
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            STANDARD.encode(pkcs8.as_ref())
        );
        let key = ApiKey::parse("organizations/o/apiKeys/k", &pem).expect("key parses");
        WsSigner::new(Arc::new(Signer::new(Some(key))))
    }

    #[test]
    fn subscribe_gets_jwt_appended_and_field_order_kept() {
        let s = signed_with_test_key();
        let out = sign_subscription(
            r#"{"type":"subscribe","product_ids":["BTC-USD"],"channel":"user"}"#,
            &s,
        )
        .expect("signs")
        .expect("rewritten");
        let keys: Vec<String> = serde_json::from_str::<serde_json::Map<String, Value>>(&out)
            .expect("json")
            .keys()
            .cloned()
            .collect();
        assert_eq!(keys, ["type", "product_ids", "channel", "jwt"]);
    }

    #[test]
    fn client_jwt_is_replaced_in_place() {
        let s = signed_with_test_key();
        let out = sign_subscription(
            r#"{"jwt":"mine","type":"unsubscribe","channel":"user"}"#,
            &s,
        )
        .expect("signs")
        .expect("rewritten");
        let v: serde_json::Map<String, Value> = serde_json::from_str(&out).expect("json");
        assert_eq!(
            v.keys().collect::<Vec<_>>(),
            ["jwt", "type", "channel"],
            "jwt keeps its place"
        );
        assert_ne!(v["jwt"], "mine");
    }

    #[test]
    fn only_subscribe_and_unsubscribe_objects_are_recognised() {
        for text in [
            "hello",
            "[1,2]",
            r#"["subscribe"]"#,
            r#"{"type":"heartbeat"}"#,
            r#"{"type":"Subscribe"}"#,
            r#"{"type":["subscribe"]}"#,
            r#"{"type":"subscribe""#,
            r#"{"type":"subscribe"} x"#,
            r#"{"type":"subscribe","type":"x"}"#,
            "  ",
        ] {
            assert_eq!(subscription_kind(text), None, "{text}");
        }
        for (text, kind) in [
            (r#"{"type":"subscribe"}"#, SubKind::Subscribe),
            (
                r#" { "a" : [1, {"b": null}], "type" : "unsubscribe" } "#,
                SubKind::Unsubscribe,
            ),
            (r#"{"typ\u0065":"subscr\u0069be"}"#, SubKind::Subscribe),
        ] {
            assert_eq!(subscription_kind(text), Some(kind), "{text}");
        }
        assert_eq!(
            sign_subscription(r#"{"type":"subscribe"}"#, &unsigned()).expect("ok"),
            None
        );
    }

    #[test]
    fn without_a_key_client_credentials_are_still_removed() {
        let out = sign_subscription(
            r#"{"type":"subscribe","jwt":"mine","channel":"user","api_k\u0065y":"k","signature":"s","timestamp":"1","passphrase":"p"}"#,
            &unsigned(),
        )
        .expect("ok")
        .expect("rewritten");
        assert_eq!(out, r#"{"type":"subscribe","channel":"user"}"#);
        let out = sign_subscription(r#"{"jwt":"mine"}"#, &unsigned())
            .expect("ok")
            .expect("rewritten");
        assert_eq!(out, "{}");
    }

    #[test]
    fn credentials_are_dropped_values_kept_as_written_and_one_jwt_results() {
        let s = signed_with_test_key();
        let out = sign_subscription(
            r#"{"api_key":"k","type":"subscribe","jwt":"a","signature":"s","x":[1, 2.50, "\u00e9"],"timestamp":"1","jwt":"b","passphrase":"p"}"#,
            &s,
        )
        .expect("signs")
        .expect("rewritten");
        let v: serde_json::Map<String, Value> = serde_json::from_str(&out).expect("json");
        assert_eq!(v.keys().collect::<Vec<_>>(), ["type", "jwt", "x"]);
        assert!(out.contains(r#""x":[1, 2.50, "\u00e9"]"#), "{out}");
        assert_eq!(out.matches("\"jwt\"").count(), 1, "{out}");
        assert!(!["a", "b"].contains(&v["jwt"].as_str().expect("jwt")));
    }

    #[test]
    fn the_scan_of_a_large_nested_message_builds_no_tree() {
        // A million-element array: scanned, but not a subscription.
        let mut text = String::from(r#"{"type":"x","a":["#);
        text.push_str(&"0,".repeat(1 << 20));
        text.push_str("0]}");
        assert_eq!(subscription_kind(&text), None);
        let text = text.replacen(r#""x""#, r#""subscribe""#, 1);
        assert_eq!(subscription_kind(&text), Some(SubKind::Subscribe));
        let out = sign_subscription(&text, &signed_with_test_key())
            .expect("signs")
            .expect("rewritten");
        assert!(out.len() < text.len() + 2048);
    }

    #[test]
    fn close_reasons_are_cut_on_a_char_boundary() {
        let long = "é".repeat(100);
        let f = close_frame(CloseCode::Error, &long);
        assert!(f.reason.len() <= MAX_CLOSE_REASON);
        assert_eq!(f.reason.len() % 2, 0);
    }

    #[test]
    fn write_buffer_holds_one_full_message() {
        let c = ws_config(64 << 10, 5 << 20);
        assert!(c.max_write_buffer_size > (5 << 20) + 14);
        assert_eq!(c.max_message_size, Some(64 << 10));
        assert_eq!(c.max_frame_size, Some(64 << 10));
        let c = ws_config(1, usize::MAX);
        assert_eq!(c.max_write_buffer_size, usize::MAX);
    }
}
