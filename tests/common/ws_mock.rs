//! Test-only mock of the Coinbase Advanced Trade WebSocket upstream.
//!
//! Serves WebSocket over real TLS (the same test PKI as the REST mock) and checks every
//! `subscribe` / `unsubscribe` message's `jwt` the way Coinbase does: signature against the
//! expected key, header alg/kid/typ and a fresh 64-hex nonce, claims iss "cdp", sub, nbf/exp two
//! minutes apart, and no `uri`/`uris` (see shared/coinbase-auth.md). It records the upgrade
//! request and every frame it receives.
//!
//! What it sends is driven by what it receives, so that a test talking through cbgate can steer
//! it:
//! - a valid subscribe/unsubscribe: `{"channel":"subscriptions",...}`, then
//!   [`WsMockOptions::on_subscribe`] messages `{"channel":"user","sequence_num":i,...}`; an
//!   invalid one: `{"type":"error","message":"authentication failure: <why>"}`;
//! - `close-me`: a close frame 4001 "bye"; `drop-me`: drops the TCP connection, no close frame;
//! - `flood:N:SIZE`: N binary messages of SIZE bytes (8-byte big-endian index, then the index
//!   mod 251 repeated), counting in [`WsMock::flood_bytes_sent`] what each completed send wrote;
//! - `big:N`: one binary message of N bytes; `ping:P` / `pong:P`: a ping / unsolicited pong
//!   with payload P;
//! - any other text or binary message is echoed back unchanged.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

use cbgate::config::Config;

use super::harness::HOSTS;
use super::mock::{
    check_common_claims, now_with_offset, verify_signature, ExpectedKey, Pki, SignedToken,
};

/// How the mock behaves.
#[derive(Clone, Default)]
pub struct WsMockOptions {
    /// The key subscribe tokens must be signed with; `None` accepts only messages without `jwt`.
    pub key: Option<ExpectedKey>,
    /// Answer every upgrade with this HTTP status (e.g. 401) instead of 101.
    pub reject_status: Option<u16>,
    /// Messages to stream back after each accepted subscribe.
    pub on_subscribe: usize,
}

/// A frame the mock received, as it arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rec {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// Code and reason; `None` for a close frame without a code.
    Close(Option<(u16, String)>),
}

/// The upgrade request as the mock saw it.
#[derive(Clone, Debug)]
pub struct Upgrade {
    pub path_and_query: String,
    pub headers: HeaderMap,
}

/// The verdict on one subscribe/unsubscribe message's `jwt`.
#[derive(Clone, Debug)]
pub enum SubAuth {
    /// No `jwt` field.
    Missing,
    Valid(SignedToken),
    Invalid(String),
}

/// One subscribe/unsubscribe message received, with its verdict.
#[derive(Clone, Debug)]
pub struct Subscription {
    /// Which connection (0-based, in accept order).
    pub conn: usize,
    /// The message text exactly as received.
    pub text: String,
    pub auth: SubAuth,
}

#[derive(Default)]
struct State {
    upgrades: Vec<Upgrade>,
    frames: Vec<(usize, Rec)>,
    subscriptions: Vec<Subscription>,
    nonces: HashSet<String>,
}

struct Inner {
    opts: WsMockOptions,
    hosts: Vec<String>,
    connections: AtomicUsize,
    flood_bytes: AtomicU64,
    state: Mutex<State>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("ws mock state mutex poisoned")
    }
}

/// The running mock.
pub struct WsMock {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

impl Drop for WsMock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WsMock {
    /// Binds 127.0.0.1:0 and serves until dropped.
    pub async fn start(pki: &Pki, opts: WsMockOptions) -> WsMock {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ws mock (test setup)");
        let addr = listener.local_addr().expect("ws mock addr (test setup)");
        let inner = Arc::new(Inner {
            opts,
            hosts: pki.hosts.clone(),
            connections: AtomicUsize::new(0),
            flood_bytes: AtomicU64::new(0),
            state: Mutex::new(State::default()),
        });
        let acceptor = TlsAcceptor::from(pki.server_config());
        let task = tokio::spawn(accept_loop(listener, acceptor, Arc::clone(&inner)));
        WsMock { addr, inner, task }
    }

    /// Upgrade requests received (also the rejected ones).
    pub fn upgrades(&self) -> Vec<Upgrade> {
        self.inner.lock().upgrades.clone()
    }

    /// Every frame received, all connections, in order.
    pub fn frames(&self) -> Vec<Rec> {
        self.inner
            .lock()
            .frames
            .iter()
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Subscribe/unsubscribe messages received, with the verdict on their token.
    pub fn subscriptions(&self) -> Vec<Subscription> {
        self.inner.lock().subscriptions.clone()
    }

    /// TLS connections that completed the WebSocket handshake.
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Bytes of `flood:` messages whose send completed (handed to the kernel).
    pub fn flood_bytes_sent(&self) -> u64 {
        self.inner.flood_bytes.load(Ordering::SeqCst)
    }

    /// Waits (up to 10 s) until `pred` holds for the received frames, and returns them.
    pub async fn wait_frames(&self, pred: impl Fn(&[Rec]) -> bool) -> Vec<Rec> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let frames = self.frames();
            if pred(&frames) {
                return frames;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("ws mock: condition not met within 10 s; frames: {frames:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A WebSocket mock plus its PKI: the usual start of a WebSocket test.
pub struct WsUpstream {
    pub pki: Pki,
    pub mock: WsMock,
    pub dir: tempfile::TempDir,
    pub ca_file: PathBuf,
}

impl WsUpstream {
    pub async fn start(opts: WsMockOptions) -> WsUpstream {
        let pki = Pki::new(HOSTS);
        let mock = WsMock::start(&pki, opts).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = pki.write_ca(dir.path());
        WsUpstream {
            pki,
            mock,
            dir,
            ca_file,
        }
    }

    /// A configuration that trusts the test CA and resolves both WebSocket hosts to the mock.
    pub fn config(&self) -> Config {
        let mut cfg = Config::default();
        cfg.upstream.ca_file = Some(self.ca_file.clone());
        for h in [
            "advanced-trade-ws.coinbase.com",
            "advanced-trade-ws-user.coinbase.com",
        ] {
            cfg.upstream.resolve.insert(h.to_owned(), self.mock.addr);
        }
        cfg.upstream.connect_timeout = Duration::from_secs(2);
        cfg.upstream.request_timeout = Duration::from_secs(5);
        // Most tests exchange messages without subscribing, some for longer than the default
        // 5 s on a loaded machine; the tests of the timeout itself set their own.
        cfg.ws.subscribe_timeout = Duration::from_secs(60);
        cfg
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, inner: Arc<Inner>) {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let acceptor = acceptor.clone();
        let inner = Arc::clone(&inner);
        conns.spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            serve(tls, inner).await;
        });
    }
}

/// What the reader asks the writer to send.
enum Out {
    Msg(Message),
    Flood { n: u64, size: usize },
    Drop,
}

// The upgrade callback's error type is tungstenite's (`ErrorResponse`), not ours to shrink.
#[allow(clippy::result_large_err)]
async fn serve<S>(stream: S, inner: Arc<Inner>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let recorder = Arc::clone(&inner);
    let callback = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        recorder.lock().upgrades.push(Upgrade {
            path_and_query: req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
            headers: req.headers().clone(),
        });
        if let Some(status) = recorder.opts.reject_status {
            let mut err = ErrorResponse::new(Some(
                json!({"error": "UNAUTHORIZED", "message": "mock refuses the upgrade"}).to_string(),
            ));
            *err.status_mut() = StatusCode::from_u16(status).expect("valid status (test setup)");
            return Err(err);
        }
        let host = req
            .headers()
            .get("host")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !recorder.hosts.iter().any(|h| h == host) {
            let mut err = ErrorResponse::new(Some(format!("unexpected host {host:?}")));
            *err.status_mut() = StatusCode::BAD_REQUEST;
            return Err(err);
        }
        // Select the first subprotocol offered, as a server that supports it would.
        if let Some(first) = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
        {
            if let Ok(v) = HeaderValue::from_str(first.trim()) {
                resp.headers_mut().insert("sec-websocket-protocol", v);
            }
        }
        Ok(resp)
    };
    let config = WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    let Ok(ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await
    else {
        return;
    };
    let conn = inner.connections.fetch_add(1, Ordering::SeqCst);
    let (mut tx, mut rx) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(64);

    let flood = Arc::clone(&inner);
    let writer = tokio::spawn(async move {
        while let Some(out) = out_rx.recv().await {
            match out {
                Out::Msg(m) => {
                    if tx.send(m).await.is_err() {
                        return;
                    }
                }
                Out::Flood { n, size } => {
                    for i in 0..n {
                        let mut data = vec![(i % 251) as u8; size.max(8)];
                        data[..8].copy_from_slice(&i.to_be_bytes());
                        let len = data.len() as u64;
                        if tx.send(Message::binary(data)).await.is_err() {
                            return;
                        }
                        flood.flood_bytes.fetch_add(len, Ordering::SeqCst);
                    }
                }
                Out::Drop => return,
            }
        }
    });

    while let Some(Ok(msg)) = rx.next().await {
        let rec = match &msg {
            Message::Text(t) => Rec::Text(t.as_str().to_owned()),
            Message::Binary(b) => Rec::Binary(b.to_vec()),
            Message::Ping(p) => Rec::Ping(p.to_vec()),
            Message::Pong(p) => Rec::Pong(p.to_vec()),
            Message::Close(f) => Rec::Close(
                f.as_ref()
                    .map(|f| (u16::from(f.code), f.reason.as_str().to_owned())),
            ),
            Message::Frame(_) => continue,
        };
        inner.lock().frames.push((conn, rec));
        let outs = match msg {
            Message::Text(t) => on_text(&inner, conn, t.as_str()),
            Message::Binary(b) => vec![Out::Msg(Message::Binary(b))],
            _ => Vec::new(),
        };
        let mut dropped = false;
        for out in outs {
            dropped |= matches!(out, Out::Drop);
            if out_tx.send(out).await.is_err() {
                break;
            }
        }
        if dropped {
            break;
        }
    }
    // `drop-me`: dropping both halves closes the socket without a close frame. Otherwise the
    // connection ended; let the writer finish what it was sending.
    drop(rx);
    drop(out_tx);
    let _ = writer.await;
}

/// The mock's answer to a text message.
fn on_text(inner: &Inner, conn: usize, text: &str) -> Vec<Out> {
    if text == "close-me" {
        return vec![Out::Msg(Message::Close(Some(CloseFrame {
            code: CloseCode::Library(4001),
            reason: "bye".into(),
        })))];
    }
    if text == "drop-me" {
        return vec![Out::Drop];
    }
    if let Some(rest) = text.strip_prefix("flood:") {
        let mut it = rest.split(':').map(|p| p.parse::<u64>().unwrap_or(0));
        let n = it.next().unwrap_or(0);
        let size = it.next().unwrap_or(0) as usize;
        return vec![Out::Flood { n, size }];
    }
    if let Some(n) = text.strip_prefix("big:") {
        let n: usize = n.parse().unwrap_or(0);
        return vec![Out::Msg(Message::binary(vec![b'b'; n]))];
    }
    if let Some(p) = text.strip_prefix("ping:") {
        return vec![Out::Msg(Message::Ping(p.as_bytes().to_vec().into()))];
    }
    if let Some(p) = text.strip_prefix("pong:") {
        return vec![Out::Msg(Message::Pong(p.as_bytes().to_vec().into()))];
    }
    let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(text) else {
        return vec![Out::Msg(Message::text(text))];
    };
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or_default();
    if kind != "subscribe" && kind != "unsubscribe" {
        return vec![Out::Msg(Message::text(text))];
    }
    let auth = check_subscription(inner, &obj);
    inner.lock().subscriptions.push(Subscription {
        conn,
        text: text.to_owned(),
        auth: auth.clone(),
    });
    let accepted = matches!(
        (&auth, &inner.opts.key),
        (SubAuth::Valid(_), _) | (SubAuth::Missing, None)
    );
    if !accepted {
        let why = match auth {
            SubAuth::Invalid(r) => r,
            _ => "jwt missing".to_owned(),
        };
        return vec![Out::Msg(Message::text(
            json!({"type": "error", "message": format!("authentication failure: {why}")})
                .to_string(),
        ))];
    }
    let channel = obj.get("channel").cloned().unwrap_or(Value::Null);
    let mut outs = vec![Out::Msg(Message::text(
        json!({"channel": "subscriptions", "events": [{"type": kind, "channel": channel}]})
            .to_string(),
    ))];
    if kind == "subscribe" {
        for i in 0..inner.opts.on_subscribe {
            outs.push(Out::Msg(Message::text(
                json!({
                    "channel": channel,
                    "sequence_num": i,
                    "events": [{"type": "update", "orders": [{"order_id": format!("order-{i}")}]}],
                })
                .to_string(),
            )));
        }
    }
    outs
}

/// Checks a subscribe/unsubscribe's `jwt` like Coinbase: signature, header, fresh nonce,
/// claims, and no request binding.
fn check_subscription(inner: &Inner, obj: &serde_json::Map<String, Value>) -> SubAuth {
    let Some(jwt) = obj.get("jwt") else {
        return SubAuth::Missing;
    };
    let Some(key) = &inner.opts.key else {
        return SubAuth::Invalid("unexpected jwt".into());
    };
    let Some(token) = jwt.as_str() else {
        return SubAuth::Invalid("jwt is not a string".into());
    };
    let verdict = (|| {
        let signed = verify_signature(key, token)?;
        if !inner.lock().nonces.insert(signed.nonce.clone()) {
            return Err("nonce reused".to_owned());
        }
        let claims = check_common_claims(key, &signed.claims, now_with_offset(0))?;
        for bound in ["uri", "uris"] {
            if claims.contains_key(bound) {
                return Err(format!("{bound} present; WebSocket tokens carry none"));
            }
        }
        Ok(signed)
    })();
    match verdict {
        Ok(signed) => SubAuth::Valid(signed),
        Err(e) => SubAuth::Invalid(e),
    }
}
