//! WebSocket relay for the Advanced Trade streams (`/ws`, `/ws/user`).
//!
//! A client upgrades over HTTP/1.1. cbgate first opens the upstream (verified TLS through
//! [`UpstreamClient::connect_http1`](crate::forward::upstream::UpstreamClient::connect_http1), then the
//! WebSocket handshake), and only when Coinbase has accepted answers the client with 101; a
//! failure before that is one of cbgate's JSON errors, so the client learns what went wrong.
//!
//! The relay then runs one task per session with one message in flight per direction: read a
//! message, await until it is written out to the other side, read the next. A slow reader
//! therefore stops cbgate reading the other side (TCP back-pressure reaches the sender), and a
//! session holds at most one message per direction (the message and its copy in tungstenite's
//! write buffer, each at most `ws.max_message_bytes`) plus fixed-size socket buffers.
//!
//! What passes and what changes:
//! - A client text message that is a JSON object whose `type` is `subscribe` or `unsubscribe`
//!   gets a fresh `jwt` (replacing any the client sent; the other fields keep their order).
//!   Without a key it passes unchanged. The rewritten message is re-serialized JSON: compact
//!   whitespace, same fields, values and order.
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

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use futures_util::{Sink, SinkExt as _, Stream, StreamExt as _};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
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
use crate::Body;

/// How long a closing handshake may take on each side before cbgate drops the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Room in tungstenite's write buffer beyond one full message: frame header plus a queued
/// pong or close frame (control frames are at most 127 bytes on the wire).
const WRITE_BUFFER_SLACK: usize = 1024;

/// The largest close reason RFC 6455 allows (125-byte control payload minus the code).
const MAX_CLOSE_REASON: usize = 123;

/// Shared state of all WebSocket sessions: limits, shutdown signal, session count and counters.
#[derive(Debug)]
pub struct WsState {
    max_message_bytes: usize,
    max_sessions: usize,
    shared: Arc<Shared>,
}

/// What session tasks (which outlive the request) share with [`WsState`].
#[derive(Debug)]
struct Shared {
    /// `true` once shutdown started; every session watches it.
    shutdown: watch::Sender<bool>,
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
            max_sessions: cfg.max_sessions,
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

    /// The configured message size limit.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Sessions open now (upgrade accepted, relay not finished).
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

/// Counts one open session for as long as it lives, whatever way its task ends.
struct SessionGuard(Arc<Shared>);

impl SessionGuard {
    fn new(shared: &Arc<Shared>) -> SessionGuard {
        shared.open.fetch_add(1, Ordering::SeqCst);
        shared
            .counters
            .open_sessions
            .fetch_add(1, Ordering::Relaxed);
        SessionGuard(Arc::clone(shared))
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
pub struct WsSigner(Arc<Signer>);

impl WsSigner {
    /// A subscribe-token minter over the shared signer.
    pub fn new(signer: Arc<Signer>) -> WsSigner {
        WsSigner(signer)
    }

    /// A fresh token without request binding (no `uri`), or `None` without a key.
    pub fn token(&self) -> Result<Option<String>, ProxyError> {
        let none = Binding {
            method: "",
            host: "",
            path: "",
        };
        self.0
            .mint(jwt::ClaimStyle::None, &none)
            .map_err(|_| ProxyError::Sign)
    }
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

/// The tungstenite settings for both sides: the message and frame limit, and a write buffer
/// that holds one message (the relay never queues a second one behind it).
fn ws_config(max_message_bytes: usize) -> WebSocketConfig {
    let base = WebSocketConfig::default();
    let max_write = base
        .write_buffer_size
        .saturating_add(max_message_bytes)
        .saturating_add(WRITE_BUFFER_SLACK);
    base.max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes))
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
    mut req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let client_key = check_handshake(&req)?;
    let upstream = &route.upstream;
    if state.open_sessions() >= state.max_sessions() {
        return Err(ProxyError::TooManySessions(state.max_sessions()));
    }

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

    let config = ws_config(state.max_message_bytes());
    let (upstream_ws, up_resp) = match tokio::time::timeout(
        client.request_timeout(),
        tokio_tungstenite::client_async_with_config(up_req, tls, Some(config)),
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

    // Counted from now, so that a shutdown starting before the client's upgrade completes
    // still waits for (and closes) this session.
    let guard = SessionGuard::new(&state.shared);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let session = Session {
        route: route.path.clone(),
        host: upstream.host.clone(),
        signer,
        shared: Arc::clone(&state.shared),
        max_message_bytes: state.max_message_bytes(),
    };
    tokio::spawn(async move {
        let _guard = guard;
        let mut upstream_ws = upstream_ws;
        match on_upgrade.await {
            Ok(upgraded) => {
                let client_ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
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
    /// This side sent a message larger than `ws.max_message_bytes`.
    TooBig(Side, WsError),
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

        let end = tokio::select! {
            end = self.pump(Side::Client, &mut client_rx, &mut up_tx, &to_upstream, &signed) => end,
            end = self.pump(Side::Upstream, &mut up_rx, &mut client_tx, &to_client, &signed) => end,
            () = async {
                // The sender lives in `Shared`, which this session holds, so this cannot fail;
                // if it did, that would be no reason to end the session.
                if shutdown.wait_for(|s| *s).await.is_err() {
                    std::future::pending::<()>().await;
                }
            } => End::Shutdown,
        };

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
        tracing::info!(
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
        );
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
                        "cbgate: message larger than ws.max_message_bytes ({})",
                        self.max_message_bytes
                    ),
                ))),
                away("cbgate: client went away"),
            ),
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
            let msg = match (from, msg) {
                (Side::Client, Message::Text(text)) => match sign_subscription(&text, &self.signer)
                {
                    Ok(Some(rewritten)) => {
                        signed.fetch_add(1, Ordering::Relaxed);
                        self.shared
                            .counters
                            .subscribes_signed
                            .fetch_add(1, Ordering::Relaxed);
                        Message::text(rewritten)
                    }
                    Ok(None) => Message::Text(text),
                    Err(_) => return End::SignFailed,
                },
                // tungstenite's reader never yields raw frames.
                (_, Message::Frame(_)) => continue,
                (_, msg) => msg,
            };
            // Awaiting the flush is the back-pressure: nothing more is read from `from` until
            // `to` has taken this message.
            if let Err(e) = tx.send(msg).await {
                return End::Failed(to, e);
            }
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

/// When `text` is a JSON object whose `type` is `subscribe` or `unsubscribe` and a key is
/// configured, the same object with `jwt` set to a fresh token: a client-sent `jwt` is replaced
/// in place, otherwise `jwt` is appended; the other fields keep their order.
fn sign_subscription(text: &str, signer: &WsSigner) -> Result<Option<String>, ProxyError> {
    // Cheap rejection of everything that cannot be an object (market data clients rarely send
    // anything else, but binary-looking text should not be parsed for nothing).
    if !text.trim_start().starts_with('{') {
        return Ok(None);
    }
    let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(text) else {
        return Ok(None);
    };
    if !matches!(
        obj.get("type").and_then(Value::as_str),
        Some("subscribe" | "unsubscribe")
    ) {
        return Ok(None);
    }
    let Some(token) = signer.token()? else {
        return Ok(None);
    };
    obj.insert("jwt".to_owned(), Value::String(token));
    Ok(Some(Value::Object(obj).to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sign::key::ApiKey;

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
    fn other_messages_and_no_key_pass_unchanged() {
        let s = signed_with_test_key();
        for text in [
            "hello",
            "[1,2]",
            r#"{"type":"heartbeat"}"#,
            r#"{"type":"Subscribe"}"#,
            r#"{"type":["subscribe"]}"#,
            r#"{"type":"subscribe""#,
            "  ",
        ] {
            assert_eq!(sign_subscription(text, &s).expect("ok"), None, "{text}");
        }
        assert_eq!(
            sign_subscription(r#"{"type":"subscribe"}"#, &unsigned()).expect("ok"),
            None
        );
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
        let c = ws_config(5 << 20);
        assert!(c.max_write_buffer_size > (5 << 20) + 14);
        assert_eq!(c.max_message_size, Some(5 << 20));
        assert_eq!(c.max_frame_size, Some(5 << 20));
        let c = ws_config(usize::MAX);
        assert_eq!(c.max_write_buffer_size, usize::MAX);
    }
}
