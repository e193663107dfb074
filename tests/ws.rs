//! The WebSocket relay end to end: a tokio-tungstenite client over plain TCP to cbgate
//! in-process, and a mock Coinbase WebSocket over real TLS (tests/common/ws_mock.rs) that
//! verifies every subscribe's JWT as Coinbase would.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use cbgate::config::Config;
use cbgate::listen::server::{self, Listener, ServeOptions};
use cbgate::proxy::Proxy;
use cbgate::sign::key::KeySource;

use common::harness::{raw, Gate, KeyForm, TestKey};
use common::ws_mock::{Rec, SubAuth, WsMockOptions, WsUpstream};

type Client = WebSocketStream<TcpStream>;

/// A client handshake's outcome: the socket and cbgate's 101, or the error (an HTTP refusal
/// carries cbgate's JSON answer).
type Handshake = Result<(Client, http::Response<Option<Vec<u8>>>), WsError>;

const USER_HOST: &str = "advanced-trade-ws-user.coinbase.com";

fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None)
}

/// Opens a WebSocket to cbgate at `path`, letting `edit` change the upgrade request.
async fn try_connect(
    addr: SocketAddr,
    path: &str,
    edit: impl FnOnce(&mut http::Request<()>),
) -> Handshake {
    let tcp = TcpStream::connect(addr).await.expect("connect to cbgate");
    let mut req = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("request");
    edit(&mut req);
    tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::client_async_with_config(req, tcp, Some(client_config())),
    )
    .await
    .expect("handshake within 20 s")
}

async fn connect(gate: &Gate, path: &str) -> Client {
    try_connect(gate.addr, path, |_| {})
        .await
        .expect("cbgate accepts the upgrade")
        .0
}

/// The next message, whatever it is (pings and pongs included).
async fn recv(ws: &mut Client) -> Message {
    tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .expect("a message within 20 s")
        .expect("connection still open")
        .expect("a valid frame")
}

/// The next text, binary or close message (pings and pongs skipped).
async fn recv_data(ws: &mut Client) -> Message {
    loop {
        match recv(ws).await {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

async fn recv_text(ws: &mut Client) -> String {
    match recv_data(ws).await {
        Message::Text(t) => t.as_str().to_owned(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// The close frame the client receives next (data messages before it are skipped).
async fn recv_close(ws: &mut Client) -> Option<(u16, String)> {
    loop {
        match recv(ws).await {
            Message::Close(f) => {
                return f.map(|f| (u16::from(f.code), f.reason.as_str().to_owned()))
            }
            _ => continue,
        }
    }
}

fn json(text: &str) -> serde_json::Map<String, serde_json::Value> {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not a JSON object ({e}): {text}"))
}

fn keys(obj: &serde_json::Map<String, serde_json::Value>) -> Vec<&str> {
    obj.keys().map(String::as_str).collect()
}

fn valid(auth: &SubAuth) -> &serde_json::Value {
    match auth {
        SubAuth::Valid(t) => &t.claims,
        other => panic!("the mock did not accept the subscribe token: {other:?}"),
    }
}

async fn signed_setup(form: KeyForm, on_subscribe: usize) -> (TestKey, WsUpstream, Gate) {
    let key = TestKey::generate(form);
    let up = WsUpstream::start(WsMockOptions {
        key: Some(key.expected.clone()),
        on_subscribe,
        ..WsMockOptions::default()
    })
    .await;
    let gate = Gate::start(up.config(), Some(&key)).await;
    (key, up, gate)
}

#[tokio::test]
async fn user_channel_subscribe_is_signed_fields_kept_and_stream_flows_back() {
    let (key, up, gate) = signed_setup(KeyForm::P256Sec1, 3).await;
    let mut ws = connect(&gate, "/ws/user").await;

    let sent = r#"{"type":"subscribe","product_ids":["BTC-USD","ETH-USD"],"channel":"user","jwt":"client-own-token","extra":{"b":1,"a":[true,null]}}"#;
    ws.send(Message::text(sent)).await.expect("send");

    let ack = json(&recv_text(&mut ws).await);
    assert_eq!(ack["channel"], "subscriptions");
    for i in 0..3 {
        let m = json(&recv_text(&mut ws).await);
        assert_eq!(m["channel"], "user");
        assert_eq!(m["sequence_num"], i);
    }

    let subs = up.mock.subscriptions();
    assert_eq!(subs.len(), 1);
    let claims = valid(&subs[0].auth);
    assert_eq!(claims["sub"], key.name.as_str());
    assert_eq!(claims["iss"], "cdp");
    let got = json(&subs[0].text);
    let want = json(sent);
    // Same fields in the same order; the client's jwt replaced in place by cbgate's.
    assert_eq!(keys(&got), keys(&want));
    assert_ne!(got["jwt"], "client-own-token");
    for k in ["type", "product_ids", "channel", "extra"] {
        assert_eq!(got[k], want[k], "{k}");
    }
    assert_eq!(keys(got["extra"].as_object().expect("object")), ["b", "a"]);

    let upgrade = &up.mock.upgrades()[0];
    assert_eq!(upgrade.path_and_query, "/");
    assert_eq!(upgrade.headers["host"], USER_HOST);
}

#[tokio::test]
async fn jwt_is_appended_when_absent_and_unsubscribe_is_signed_with_a_fresh_token() {
    let (key, up, gate) = signed_setup(KeyForm::Ed25519B64_64, 0).await;
    let mut ws = connect(&gate, "/ws/user").await;
    let sub = r#"{"type":"subscribe","channel":"user","product_ids":["BTC-USD"]}"#;
    let unsub = r#"{"type":"unsubscribe","channel":"user","product_ids":["BTC-USD"]}"#;
    ws.send(Message::text(sub)).await.expect("send");
    assert_eq!(json(&recv_text(&mut ws).await)["channel"], "subscriptions");
    ws.send(Message::text(unsub)).await.expect("send");
    assert_eq!(json(&recv_text(&mut ws).await)["channel"], "subscriptions");

    let subs = up.mock.subscriptions();
    assert_eq!(subs.len(), 2);
    let mut nonces = Vec::new();
    for (s, sent) in subs.iter().zip([sub, unsub]) {
        let claims = valid(&s.auth);
        assert_eq!(claims["sub"], key.name.as_str());
        let got = json(&s.text);
        assert_eq!(keys(&got), ["type", "channel", "product_ids", "jwt"]);
        assert_eq!(got["type"], json(sent)["type"]);
        if let SubAuth::Valid(t) = &s.auth {
            assert_eq!(t.alg, "EdDSA");
            nonces.push(t.nonce.clone());
        }
    }
    assert_ne!(nonces[0], nonces[1], "each subscribe gets its own token");
}

#[tokio::test]
async fn client_credential_fields_in_a_subscribe_are_removed() {
    let (_key, up, gate) = signed_setup(KeyForm::P256Sec1, 0).await;
    let mut ws = connect(&gate, "/ws/user").await;
    // Markers long enough that cbgate's own JWT (random base64url) cannot contain them by
    // chance: "pw" did, about one run in ten.
    let sub = r#"{"api_key":"client-key","type":"subscribe","passphrase":"client-passphrase","channel":"user","signature":"Y2xpZW50LXNpZ25hdHVyZQ==","timestamp":"1700000000","jwt":"client-jwt","product_ids":["BTC-USD"]}"#;
    ws.send(Message::text(sub)).await.expect("send");
    assert_eq!(json(&recv_text(&mut ws).await)["channel"], "subscriptions");
    let subs = up.mock.subscriptions();
    valid(&subs[0].auth);
    let got = json(&subs[0].text);
    assert_eq!(keys(&got), ["type", "channel", "jwt", "product_ids"]);
    for secret in [
        "client-key",
        "client-passphrase",
        "Y2xpZW50LXNpZ25hdHVyZQ",
        "client-jwt",
    ] {
        assert!(!subs[0].text.contains(secret), "{secret} reached Coinbase");
    }
}

#[tokio::test]
async fn other_frames_pass_byte_for_byte_both_ways() {
    let (_key, up, gate) = signed_setup(KeyForm::P256Pkcs8, 0).await;
    let mut ws = connect(&gate, "/ws").await;

    let texts = [
        "hello é 🚀 {not json",
        r#"{"type":"heartbeat","jwt":"stays"}"#,
        r#"{ "type" : "Subscribe" , "x": 1.50 }"#,
        r#"["subscribe"]"#,
        "",
    ];
    let binary: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    for t in texts {
        ws.send(Message::text(t)).await.expect("send text");
    }
    ws.send(Message::binary(binary.clone()))
        .await
        .expect("send binary");
    ws.send(Message::Ping(b"client-ping".to_vec().into()))
        .await
        .expect("send ping");
    ws.send(Message::Pong(b"client-heartbeat".to_vec().into()))
        .await
        .expect("send pong");
    // The mock pings and pongs the client too.
    ws.send(Message::text("ping:server-ping"))
        .await
        .expect("send");
    ws.send(Message::text("pong:server-heartbeat"))
        .await
        .expect("send");

    // The echoes came back unchanged, plus the mock's ping and pong.
    let mut got = Vec::new();
    let mut client_ping_pongs = 0;
    while got.len() < texts.len() + 3 || client_ping_pongs < 2 {
        match recv(&mut ws).await {
            Message::Pong(p) if p.as_ref() == b"client-ping" => client_ping_pongs += 1,
            m => got.push(m),
        }
    }
    let mut want: Vec<Message> = texts.iter().map(|t| Message::text(*t)).collect();
    want.push(Message::binary(binary.clone()));
    want.push(Message::Ping(b"server-ping".to_vec().into()));
    want.push(Message::Pong(b"server-heartbeat".to_vec().into()));
    assert_eq!(got, want);
    // The client's ping got two pongs: cbgate's own and the mock's, relayed.
    assert_eq!(client_ping_pongs, 2);
    // Sends the client's automatic answer to the mock's ping.
    ws.flush().await.expect("flush");

    // Everything the client sent reached the mock unchanged and in order.
    let frames = up
        .mock
        .wait_frames(|f| f.iter().filter(|r| matches!(r, Rec::Pong(_))).count() >= 3)
        .await;
    let mut want: Vec<Rec> = texts.iter().map(|t| Rec::Text((*t).to_owned())).collect();
    want.push(Rec::Binary(binary.clone()));
    want.push(Rec::Ping(b"client-ping".to_vec()));
    want.push(Rec::Pong(b"client-heartbeat".to_vec()));
    want.push(Rec::Text("ping:server-ping".into()));
    want.push(Rec::Text("pong:server-heartbeat".into()));
    let data: Vec<Rec> = frames
        .iter()
        .filter(|r| !(matches!(r, Rec::Pong(p) if p == b"server-ping")))
        .cloned()
        .collect();
    assert_eq!(data, want);
    // The mock's ping was answered twice: by cbgate at once, then by the client (relayed).
    let answers = frames
        .iter()
        .filter(|r| matches!(r, Rec::Pong(p) if p == b"server-ping"))
        .count();
    assert_eq!(answers, 2, "{frames:?}");
}

#[tokio::test]
async fn five_megabyte_messages_pass_both_ways() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = WsUpstream::start(WsMockOptions {
        key: Some(key.expected.clone()),
        ..WsMockOptions::default()
    })
    .await;
    let mut cfg = up.config();
    // Client messages are limited to 64 KiB by default; a larger limit is honoured.
    cfg.ws.max_client_message_bytes = 8 * 1024 * 1024;
    let gate = Gate::start(cfg, Some(&key)).await;
    let mut ws = connect(&gate, "/ws").await;
    let big: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    ws.send(Message::binary(big.clone()))
        .await
        .expect("send 5 MB");
    match recv_data(&mut ws).await {
        Message::Binary(b) => assert!(b.as_ref() == big.as_slice(), "echo differs"),
        other => panic!("expected the echo, got {other:?}"),
    }
    ws.send(Message::text(format!("big:{}", 5 * 1024 * 1024)))
        .await
        .expect("send");
    match recv_data(&mut ws).await {
        Message::Binary(b) => assert_eq!(b.len(), 5 * 1024 * 1024),
        other => panic!("expected 5 MB, got {other:?}"),
    }
    assert!(up.mock.frames().contains(&Rec::Binary(big)));
}

#[tokio::test]
async fn fragmented_messages_are_reassembled_and_a_fragmented_subscribe_is_signed() {
    let (_key, up, gate) = signed_setup(KeyForm::P256Sec1, 0).await;
    let mut ws = connect(&gate, "/ws/user").await;
    let sub = r#"{"type":"subscribe","channel":"user","product_ids":["BTC-USD"]}"#;
    let (a, rest) = sub.split_at(10);
    let (b, c) = rest.split_at(20);
    let frames = [
        Frame::message(a.as_bytes().to_vec(), OpCode::Data(Data::Text), false),
        Frame::message(b.as_bytes().to_vec(), OpCode::Data(Data::Continue), false),
        Frame::message(c.as_bytes().to_vec(), OpCode::Data(Data::Continue), true),
        Frame::message(vec![1u8, 2], OpCode::Data(Data::Binary), false),
        // A control frame may come between fragments (RFC 6455 §5.4).
        Frame::ping(b"mid".to_vec()),
        Frame::message(vec![3u8], OpCode::Data(Data::Continue), true),
    ];
    for f in frames {
        ws.send(Message::Frame(f)).await.expect("send fragment");
    }
    assert_eq!(json(&recv_text(&mut ws).await)["channel"], "subscriptions");
    match recv_data(&mut ws).await {
        Message::Binary(b) => assert_eq!(b.as_ref(), [1, 2, 3]),
        other => panic!("expected the binary echo, got {other:?}"),
    }
    let subs = up.mock.subscriptions();
    assert_eq!(subs.len(), 1);
    valid(&subs[0].auth);
    // One whole binary message; the ping that came between its fragments arrives first.
    let frames = up.mock.frames();
    let at = |r: &Rec| frames.iter().position(|f| f == r);
    let binary = at(&Rec::Binary(vec![1, 2, 3])).expect("reassembled binary message");
    let ping = at(&Rec::Ping(b"mid".to_vec())).expect("the ping");
    assert!(ping < binary, "{frames:?}");
    assert_eq!(
        frames
            .iter()
            .filter(|f| matches!(f, Rec::Binary(_)))
            .count(),
        1
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_stalls_the_upstream_then_gets_everything_in_order() {
    const N: u64 = 200;
    const SIZE: usize = 1024 * 1024;
    let (_key, up, gate) = signed_setup(KeyForm::P256Sec1, 0).await;
    let mut ws = connect(&gate, "/ws").await;
    ws.send(Message::text(format!("flood:{N}:{SIZE}")))
        .await
        .expect("send");

    // Read nothing for a while: cbgate must stop reading the upstream, whose sends then stall.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let early = up.mock.flood_bytes_sent();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let stalled = up.mock.flood_bytes_sent();
    assert!(
        stalled < 64 * 1024 * 1024,
        "the mock sent {stalled} bytes to a client that reads nothing: cbgate buffers"
    );
    assert!(
        stalled - early <= 2 * SIZE as u64,
        "sending still progressing ({early} -> {stalled}): not stalled"
    );

    for i in 0..N {
        match recv_data(&mut ws).await {
            Message::Binary(b) => {
                assert_eq!(b.len(), SIZE);
                assert_eq!(b[..8], i.to_be_bytes(), "message {i} out of order");
                assert!(b[8..].iter().all(|x| u64::from(*x) == i % 251));
            }
            other => panic!("expected flood message {i}, got {other:?}"),
        }
    }
    assert_eq!(up.mock.flood_bytes_sent(), N * SIZE as u64);
}

#[tokio::test]
async fn close_codes_and_reasons_pass_both_ways() {
    let (_key, up, gate) = signed_setup(KeyForm::P256Sec1, 0).await;

    // Client closes: the mock sees the client's code and reason.
    let mut ws = connect(&gate, "/ws").await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }))
    .await
    .expect("close");
    assert_eq!(recv_close(&mut ws).await, Some((1000, "done".into())));
    up.mock
        .wait_frames(|f| f.contains(&Rec::Close(Some((1000, "done".into())))))
        .await;

    // Upstream closes: the client sees the mock's code and reason.
    let mut ws = connect(&gate, "/ws").await;
    ws.send(Message::text("close-me")).await.expect("send");
    assert_eq!(recv_close(&mut ws).await, Some((4001, "bye".into())));
    // The mock got its close echoed back.
    up.mock
        .wait_frames(|f| f.contains(&Rec::Close(Some((4001, "bye".into())))))
        .await;

    // A close frame without a code stays without a code.
    let mut ws = connect(&gate, "/ws").await;
    ws.close(None).await.expect("close");
    assert_eq!(recv_close(&mut ws).await, None);
    up.mock.wait_frames(|f| f.contains(&Rec::Close(None))).await;
}

#[tokio::test]
async fn a_client_that_vanishes_closes_the_upstream_with_1001() {
    let (_key, up, gate) = signed_setup(KeyForm::P256Sec1, 0).await;
    let mut ws = connect(&gate, "/ws").await;
    ws.send(Message::text("hi")).await.expect("send");
    assert_eq!(recv_text(&mut ws).await, "hi");
    drop(ws); // TCP closed, no close frame
    let frames = up
        .mock
        .wait_frames(|f| f.iter().any(|r| matches!(r, Rec::Close(_))))
        .await;
    match frames.last() {
        Some(Rec::Close(Some((1001, _)))) => {}
        other => panic!("expected close 1001 at the mock, got {other:?}"),
    }
}

#[tokio::test]
async fn an_upstream_that_vanishes_closes_the_client_with_1011_naming_it() {
    let (_key, _up, gate) = signed_setup(KeyForm::P256Sec1, 0).await;
    let mut ws = connect(&gate, "/ws/user").await;
    ws.send(Message::text("drop-me")).await.expect("send");
    let (code, reason) = recv_close(&mut ws).await.expect("a close code");
    assert_eq!(code, 1011, "{reason}");
    assert!(reason.contains(USER_HOST), "{reason}");
}

/// The upgrade failed with an HTTP answer: its status, cbgate error code and JSON message.
fn refused(r: Handshake) -> (StatusCode, String, String) {
    match r {
        Err(WsError::Http(resp)) => {
            let code = resp
                .headers()
                .get("x-cbgate-error")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body = resp.body().clone().unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON error body");
            (
                resp.status(),
                code,
                v["message"].as_str().unwrap_or_default().to_owned(),
            )
        }
        Err(e) => panic!("expected an HTTP error answer, got {e}"),
        Ok(_) => panic!("expected the upgrade to be refused"),
    }
}

#[tokio::test]
async fn unreachable_or_untrusted_upstream_is_a_json_502_before_any_101() {
    // Nothing listens on the resolved port.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dead = closed.local_addr().expect("addr");
    drop(closed);
    let up = WsUpstream::start(WsMockOptions::default()).await;
    let mut cfg = up.config();
    cfg.upstream.resolve.insert(USER_HOST.into(), dead);
    let gate = Gate::start(cfg, None).await;
    let (status, code, message) = refused(try_connect(gate.addr, "/ws/user", |_| {}).await);
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(code, "upstream_connect");
    assert!(message.contains(USER_HOST), "{message}");

    // A certificate cbgate does not trust.
    let mut cfg = up.config();
    cfg.upstream.ca_file = None;
    let gate = Gate::start(cfg, None).await;
    let (status, code, message) = refused(try_connect(gate.addr, "/ws/user", |_| {}).await);
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(code, "upstream_tls");
    assert!(message.contains("certificate not trusted"), "{message}");
    assert_eq!(up.mock.connections(), 0);
}

#[tokio::test]
async fn an_upgrade_refused_upstream_is_a_502_naming_the_status() {
    let up = WsUpstream::start(WsMockOptions {
        reject_status: Some(401),
        ..WsMockOptions::default()
    })
    .await;
    let gate = Gate::start(up.config(), None).await;
    let (status, code, message) = refused(try_connect(gate.addr, "/ws/user", |_| {}).await);
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(code, "upstream_error");
    assert!(message.contains("401"), "{message}");
    assert!(message.contains(USER_HOST), "{message}");
    assert_eq!(up.mock.upgrades().len(), 1);
}

#[tokio::test]
async fn messages_over_max_message_bytes_close_with_1009() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = WsUpstream::start(WsMockOptions {
        key: Some(key.expected.clone()),
        ..WsMockOptions::default()
    })
    .await;
    let mut cfg = up.config();
    cfg.ws.max_message_bytes = 1024 * 1024;
    cfg.ws.max_client_message_bytes = 1024 * 1024;
    let gate = Gate::start(cfg, Some(&key)).await;

    // From the client: the client gets 1009, the upstream is told the client went away.
    let mut ws = connect(&gate, "/ws").await;
    ws.send(Message::binary(vec![0u8; 1024 * 1024]))
        .await
        .expect("at the limit");
    assert!(matches!(recv_data(&mut ws).await, Message::Binary(b) if b.len() == 1024 * 1024));
    let _ = ws.send(Message::binary(vec![0u8; 1024 * 1024 + 1])).await;
    let (code, reason) = recv_close(&mut ws).await.expect("close code");
    assert_eq!(code, 1009, "{reason}");
    assert!(reason.contains("max_client_message_bytes"), "{reason}");
    let frames = up
        .mock
        .wait_frames(|f| f.iter().any(|r| matches!(r, Rec::Close(_))))
        .await;
    assert!(
        matches!(frames.last(), Some(Rec::Close(Some((1001, _))))),
        "{frames:?}"
    );
    assert!(!frames
        .iter()
        .any(|r| matches!(r, Rec::Binary(b) if b.len() > 1024 * 1024)));

    // From the upstream: both sides get 1009.
    let mut ws = connect(&gate, "/ws").await;
    ws.send(Message::text(format!("big:{}", 1024 * 1024 + 1)))
        .await
        .expect("send");
    let (code, reason) = recv_close(&mut ws).await.expect("close code");
    assert_eq!(code, 1009, "{reason}");
    assert!(reason.contains("upstream"), "{reason}");
    up.mock
        .wait_frames(|f| f.iter().any(|r| matches!(r, Rec::Close(Some((1009, _))))))
        .await;
}

#[tokio::test]
async fn without_a_key_subscribe_passes_unsigned_and_unchanged() {
    let up = WsUpstream::start(WsMockOptions {
        on_subscribe: 2,
        ..WsMockOptions::default()
    })
    .await;
    let gate = Gate::start(up.config(), None).await;
    let mut ws = connect(&gate, "/ws").await;
    let sub = r#"{ "type": "subscribe", "channel": "ticker", "product_ids": ["BTC-USD"] }"#;
    ws.send(Message::text(sub)).await.expect("send");
    assert_eq!(json(&recv_text(&mut ws).await)["channel"], "subscriptions");
    for i in 0..2 {
        assert_eq!(json(&recv_text(&mut ws).await)["sequence_num"], i);
    }
    let subs = up.mock.subscriptions();
    assert_eq!(subs[0].text, sub, "byte for byte");
    assert!(matches!(subs[0].auth, SubAuth::Missing));
}

#[tokio::test]
async fn without_a_key_client_credentials_in_a_subscribe_are_removed() {
    let up = WsUpstream::start(WsMockOptions {
        on_subscribe: 1,
        ..WsMockOptions::default()
    })
    .await;
    let gate = Gate::start(up.config(), None).await;
    let mut ws = connect(&gate, "/ws").await;
    let sub = r#"{"type":"subscribe","channel":"ticker","jwt":"client-jwt","api_key":"k","signature":"s","timestamp":"1","passphrase":"p","product_ids":["BTC-USD"]}"#;
    ws.send(Message::text(sub)).await.expect("send");
    assert_eq!(json(&recv_text(&mut ws).await)["channel"], "subscriptions");
    let subs = up.mock.subscriptions();
    assert_eq!(
        subs[0].text,
        r#"{"type":"subscribe","channel":"ticker","product_ids":["BTC-USD"]}"#
    );
    assert!(matches!(subs[0].auth, SubAuth::Missing));
}

#[tokio::test]
async fn graceful_shutdown_sends_1001_to_client_and_upstream() {
    let (_key, up, gate) = signed_setup(KeyForm::P256Sec1, 0).await;
    let mut ws = connect(&gate, "/ws/user").await;
    ws.send(Message::text("hi")).await.expect("send");
    assert_eq!(recv_text(&mut ws).await, "hi");

    let started = Instant::now();
    let stopping = tokio::spawn(gate.stop());
    assert_eq!(
        recv_close(&mut ws).await,
        Some((1001, "cbgate shutting down".into()))
    );
    // Reading on sends the client's close reply, which completes the closing handshake.
    assert!(ws.next().await.is_none());
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("stop returns")
        .expect("stop task");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "shutdown waited {:?}",
        started.elapsed()
    );
    up.mock
        .wait_frames(|f| f.iter().any(|r| matches!(r, Rec::Close(Some((1001, _))))))
        .await;
}

#[tokio::test]
async fn bad_handshakes_are_400_json_errors() {
    let up = WsUpstream::start(WsMockOptions::default()).await;
    let gate = Gate::start(up.config(), None).await;
    let head = |extra: &str| {
        format!(
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n{extra}\r\n"
        )
    };
    for (extra, words) in [
        (
            "Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            "version 13",
        ),
        (
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            "Sec-WebSocket-Version",
        ),
        ("Sec-WebSocket-Version: 13\r\n", "Sec-WebSocket-Key"),
        (
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: c2hvcnQ=\r\n",
            "16 bytes",
        ),
    ] {
        let out = raw(gate.addr, head(extra).as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        assert!(out.contains("x-cbgate-error: bad_request"), "{out}");
        assert!(out.contains(words), "{words}: {out}");
    }
    assert_eq!(up.mock.connections(), 0);
    assert!(up.mock.upgrades().is_empty());
}

#[tokio::test]
async fn subprotocol_user_agent_and_query_go_upstream_but_credentials_do_not() {
    let up = WsUpstream::start(WsMockOptions::default()).await;
    let gate = Gate::start(up.config(), None).await;
    let (mut ws, resp) = try_connect(gate.addr, "/ws?lang=en", |r| {
        let h = r.headers_mut();
        h.insert(
            "sec-websocket-protocol",
            "proto-a, proto-b".parse().expect("v"),
        );
        h.insert("user-agent", "ws-test/1.0".parse().expect("v"));
        h.insert("cookie", "session=secret".parse().expect("v"));
        h.insert("authorization", "Bearer client-secret".parse().expect("v"));
    })
    .await
    .expect("upgrade");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "proto-a");
    ws.send(Message::text("x")).await.expect("send");
    assert_eq!(recv_text(&mut ws).await, "x");

    let u = &up.mock.upgrades()[0];
    assert_eq!(u.path_and_query, "/?lang=en");
    assert_eq!(u.headers["host"], "advanced-trade-ws.coinbase.com");
    assert_eq!(u.headers["user-agent"], "ws-test/1.0");
    assert_eq!(u.headers["sec-websocket-protocol"], "proto-a, proto-b");
    assert!(u.headers.get("cookie").is_none());
    assert!(u.headers.get("authorization").is_none());
}

#[tokio::test]
async fn session_count_and_message_counters() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = WsUpstream::start(WsMockOptions {
        key: Some(key.expected.clone()),
        on_subscribe: 2,
        ..WsMockOptions::default()
    })
    .await;
    let cfg: Config = up.config();
    let dir = tempfile::tempdir().expect("tempdir");
    let api_key = KeySource::File(key.write_json(dir.path()))
        .load()
        .expect("key loads");
    let proxy = Arc::new(Proxy::new(&cfg, Some(api_key)).expect("proxy"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(
        vec![Listener::Tcp(listener)],
        Arc::clone(&proxy),
        ServeOptions::default(),
        async move {
            let _ = stopped.await;
        },
    ));

    let (mut ws, _) = try_connect(addr, "/ws/user", |_| {})
        .await
        .expect("upgrade");
    assert_eq!(proxy.ws().open_sessions(), 1);
    ws.send(Message::text(r#"{"type":"subscribe","channel":"user"}"#))
        .await
        .expect("send");
    ws.send(Message::text("plain")).await.expect("send");
    for _ in 0..4 {
        recv_data(&mut ws).await; // ack, 2 updates, echo
    }
    assert_eq!(proxy.ws().messages_to_upstream(), 2);
    assert_eq!(proxy.ws().messages_to_client(), 4);
    assert_eq!(proxy.ws().subscribes_signed(), 1);
    ws.close(None).await.expect("close");
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.ws().open_sessions() != 0 {
        assert!(Instant::now() < deadline, "session still counted as open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    let _ = server.await;
}

#[tokio::test]
async fn python_example_streams_the_user_channel() {
    // The venv cargo test provisions (examples/python/requirements.txt installed).
    let python = common::provision::python();
    let (_key, up, gate) = signed_setup(KeyForm::Ed25519B64_64, 5).await;
    let url = format!("ws://{}/ws/user", gate.addr);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/ws_user.py");
    let out = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(python)
            .arg(script)
            .env("CBGATE_WS_URL", url)
            .env("CBGATE_WS_MAX_MESSAGES", "4")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start python3");
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().expect("output")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ws_user.py failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert_eq!(json(lines[0])["channel"], "subscriptions");
    assert!(
        lines[1..].iter().any(|l| json(l)["channel"] == "user"),
        "{stdout}"
    );

    // The script sent both subscribes before reading; the mock may still be recording them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.mock.subscriptions().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let subs = up.mock.subscriptions();
    for s in &subs {
        valid(&s.auth);
    }
    let channels: Vec<String> = subs
        .iter()
        .map(|s| {
            json(&s.text)["channel"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(channels, ["user", "heartbeats"]);
}

/// The mock must refuse what Coinbase refuses, or the signing tests above prove nothing.
#[tokio::test]
async fn ws_mock_rejects_tokens_coinbase_would_reject() {
    use cbgate::sign::jwt::{self, Binding, ClaimStyle};
    use cbgate::sign::key::ApiKey;

    let key = TestKey::generate(KeyForm::P256Sec1);
    let other = TestKey::generate(KeyForm::P256Sec1);
    let up = WsUpstream::start(WsMockOptions {
        key: Some(key.expected.clone()),
        ..WsMockOptions::default()
    })
    .await;
    let signer = ApiKey::parse(&key.name, &key.secret).expect("key");
    let stranger = ApiKey::parse(&other.name, &other.secret).expect("key");
    let now = jwt::now_secs(0);
    let bind = Binding {
        method: "GET",
        host: USER_HOST,
        path: "/",
    };
    let mint = |k: &ApiKey, at: u64, style| jwt::mint(k, at, style, &bind).expect("mint");
    let good = mint(&signer, now, ClaimStyle::None);
    let cases = [
        (good.clone(), None),
        (good, Some("nonce reused")),
        (mint(&signer, now, ClaimStyle::Uri), Some("uri present")),
        (mint(&signer, now, ClaimStyle::Uris), Some("uris present")),
        (mint(&stranger, now, ClaimStyle::None), Some("kid")),
        (mint(&signer, now - 200, ClaimStyle::None), Some("expired")),
        (
            mint(&signer, now + 60, ClaimStyle::None),
            Some("not yet valid"),
        ),
    ];

    let tcp = TcpStream::connect(up.mock.addr)
        .await
        .expect("connect mock");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(up.pki.client_config(&[b"http/1.1"])))
        .connect(
            rustls_pki_types::ServerName::try_from(USER_HOST).expect("name"),
            tcp,
        )
        .await
        .expect("TLS to the mock");
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{USER_HOST}/"), tls)
        .await
        .expect("upgrade at the mock");
    for (token, _) in &cases {
        let msg = serde_json::json!({"type": "subscribe", "channel": "user", "jwt": token});
        ws.send(Message::text(msg.to_string())).await.expect("send");
        ws.next().await.expect("answer").expect("frame");
    }
    let subs = up.mock.subscriptions();
    assert_eq!(subs.len(), cases.len());
    for (s, (_, want)) in subs.iter().zip(&cases) {
        match (&s.auth, want) {
            (SubAuth::Valid(_), None) => {}
            (SubAuth::Invalid(why), Some(w)) if why.contains(w) => {}
            (got, want) => panic!("expected {want:?}, the mock said {got:?}"),
        }
    }
}

/// A WebSocket session run by the real binary at the most verbose log level: neither a signed
/// subscribe's JWT (as text or as the hex some frame loggers print) nor the stream's private
/// messages may appear in the output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_of_a_websocket_session_hold_no_jwt_and_no_payload() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = WsUpstream::start(WsMockOptions {
        key: Some(key.expected.clone()),
        on_subscribe: 3,
        ..WsMockOptions::default()
    })
    .await;
    let port = common::harness::free_port();
    let admin = common::harness::free_port();
    let cfg_path = up.dir.path().join("cbgate.toml");
    let mut toml = format!(
        "listen = [\"127.0.0.1:{port}\"]\nadmin_listen = \"127.0.0.1:{admin}\"\n\n[upstream]\nca_file = \"{}\"\n\n[upstream.resolve]\n",
        up.ca_file.display()
    );
    for h in [USER_HOST, "advanced-trade-ws.coinbase.com"] {
        toml.push_str(&format!("\"{h}\" = \"{}\"\n", up.mock.addr));
    }
    std::fs::write(&cfg_path, toml).expect("config");
    let key_file = key.write_json(up.dir.path());
    let mut cmd = common::harness::cbgate_command();
    cmd.args(["serve", "--config"])
        .arg(&cfg_path)
        .arg("--key-file")
        .arg(&key_file)
        .env("RUST_LOG", "trace");
    let mut p = common::harness::Process::spawn(cmd);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let up_flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = up_flag.clone();
    let probe = tokio::spawn(async move {
        while TcpStream::connect(addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    p.wait_until("the proxy port", || {
        up_flag.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    probe.abort();

    let (mut ws, _) = try_connect(addr, "/ws/user", |_| {})
        .await
        .expect("upgrade");
    ws.send(Message::text(
        r#"{"type":"subscribe","channel":"user","product_ids":["BTC-USD"]}"#,
    ))
    .await
    .expect("send");
    let mut received = Vec::new();
    for _ in 0..4 {
        received.push(recv_text(&mut ws).await);
    }
    ws.close(None).await.expect("close");
    let subs = up.mock.subscriptions();
    assert_eq!(subs.len(), 1);
    valid(&subs[0].auth);
    let jwt = json(&subs[0].text)["jwt"].as_str().expect("jwt").to_owned();

    p.signal("TERM");
    let (status, output) = p.wait_exit().await;
    assert_eq!(status.code(), Some(0));
    assert!(output.contains("TRACE"), "the run was at trace level");
    let signature = jwt.rsplit('.').next().expect("signature");
    let hex: String = signature.bytes().map(|b| format!("{b:02x}")).collect();
    for (what, needle) in [
        ("JWT", jwt.as_str()),
        ("JWT signature", signature),
        ("JWT as hex", &hex[..32]),
    ] {
        assert!(!output.contains(needle), "the {what} appears in the logs");
    }
    for m in &received[1..] {
        assert!(
            !output.contains(m.as_str()),
            "a stream message appears in the logs: {m}"
        );
    }
    common::harness::assert_no_secret(&output, &key.secret, "cbgate's output");
}

#[tokio::test]
async fn sessions_over_ws_max_sessions_get_503() {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = WsUpstream::start(WsMockOptions {
        key: Some(key.expected.clone()),
        ..WsMockOptions::default()
    })
    .await;
    let mut cfg = up.config();
    cfg.ws.max_sessions = 1;
    let gate = Gate::start(cfg, Some(&key)).await;
    let first = connect(&gate, "/ws/user").await;
    let (status, code, message) = refused(try_connect(gate.addr, "/ws", |_| {}).await);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(code, "too_many_connections");
    assert!(message.contains("max_sessions"), "{message}");
    drop(first);
    // Once the first session has ended, a new one is admitted.
    let mut admitted = false;
    for _ in 0..100 {
        if try_connect(gate.addr, "/ws", |_| {}).await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted, "a freed session slot is reused");
}

/// Finding: the `ws_connect` budget token was taken before the `ws.max_sessions` slot, so an
/// upgrade refused for max_sessions had spent a token of Coinbase's connect limit.
#[tokio::test]
async fn an_upgrade_refused_for_max_sessions_spends_no_connect_token() {
    let up = WsUpstream::start(WsMockOptions::default()).await;
    let mut cfg = up.config();
    cfg.ws.max_sessions = 1;
    // Two connects in all (no refill within the test): one per session admitted.
    cfg.budget.ws_connect = cbgate::config::ClassLimit {
        rate: 1.0,
        per: Duration::from_secs(3600),
        burst: Some(2),
    };
    cfg.budget.max_wait = Duration::from_millis(50);
    let gate = Gate::start(cfg, None).await;
    let (mut first, _) = try_connect(gate.addr, "/ws", |_| {})
        .await
        .expect("first session");
    for _ in 0..5 {
        let (status, code, message) = refused(try_connect(gate.addr, "/ws", |_| {}).await);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{message}");
        assert_eq!(code, "too_many_connections", "{message}");
    }
    first.close(None).await.expect("close");
    while let Some(Ok(_)) = first.next().await {}
    // The second token is still there for the next session (refusals until the slot frees
    // are max_sessions ones, never the budget's 429).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match try_connect(gate.addr, "/ws", |_| {}).await {
            Ok(_) => break,
            Err(e) => {
                let (status, code, message) = refused(Err(e));
                assert_eq!(code, "too_many_connections", "{status}: {message}");
            }
        }
        assert!(Instant::now() < deadline, "the freed slot was not reused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// cbgate in-process with its `Proxy` at hand, for tests that read the relay's counters.
struct InProc {
    proxy: Arc<Proxy>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl InProc {
    async fn start(cfg: Config, key: &TestKey) -> InProc {
        cfg.validate().expect("valid test config");
        let dir = tempfile::tempdir().expect("tempdir");
        let api_key = KeySource::File(key.write_json(dir.path()))
            .load()
            .expect("key loads");
        let proxy = Arc::new(Proxy::new(&cfg, Some(api_key)).expect("proxy"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(server::run(
            vec![Listener::Tcp(listener)],
            Arc::clone(&proxy),
            ServeOptions::default(),
            async move {
                let _ = stopped.await;
            },
        ));
        InProc {
            proxy,
            addr,
            stop: Some(stop),
            server,
        }
    }

    fn counters(&self) -> &cbgate::ops::metrics::WsCounters {
        self.proxy.ws().counters()
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.server.abort();
    }
}

/// The close frame the client receives within `limit` (what a timeout test waits for).
async fn recv_close_within(ws: &mut Client, limit: Duration) -> Option<(u16, String)> {
    tokio::time::timeout(limit, recv_close(ws))
        .await
        .expect("cbgate closes the session in time")
}

fn load(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

/// Finding: every client text frame starting with `{` was parsed into a JSON tree, so one
/// 60 MiB frame of `[0,0,...]` took 2.2 GiB. Client messages now have their own small limit.
#[tokio::test]
async fn a_large_nested_client_message_closes_with_1009_and_never_reaches_coinbase() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = WsUpstream::start(WsMockOptions {
        key: Some(key.expected.clone()),
        on_subscribe: 1,
        ..WsMockOptions::default()
    })
    .await;
    let cfg = up.config();
    assert_eq!(cfg.ws.max_client_message_bytes, 64 * 1024, "the default");
    let gate = InProc::start(cfg, &key).await;

    // A subscribe of ordinary size is signed and relayed as before.
    let (mut ws, _) = try_connect(gate.addr, "/ws", |_| {})
        .await
        .expect("upgrade");
    ws.send(Message::text(
        r#"{"type":"subscribe","channel":"level2","product_ids":["BTC-USD"]}"#,
    ))
    .await
    .expect("send");
    assert_eq!(json(&recv_text(&mut ws).await)["channel"], "subscriptions");

    // 1 MiB of nested array: refused at the frame header, never buffered, never forwarded.
    let mut big = String::from(r#"{"type":"x","a":["#);
    while big.len() < 1024 * 1024 {
        big.push_str("[0,0],");
    }
    big.push_str("0]}");
    let _ = ws.send(Message::text(big)).await;
    let (code, reason) = recv_close(&mut ws).await.expect("close code");
    assert_eq!(code, 1009, "{reason}");
    assert!(
        reason.contains("ws.max_client_message_bytes (65536)"),
        "{reason}"
    );
    let frames = up
        .mock
        .wait_frames(|f| f.iter().any(|r| matches!(r, Rec::Close(_))))
        .await;
    assert!(
        matches!(frames.last(), Some(Rec::Close(Some((1001, _))))),
        "{frames:?}"
    );
    assert!(
        frames
            .iter()
            .all(|r| !matches!(r, Rec::Text(t) if t.len() > 64 * 1024)),
        "the oversized message reached the mock"
    );
    assert_eq!(load(&gate.counters().client_messages_too_big), 1);

    // Coinbase's direction keeps its own (64 MiB) limit: 5 MiB still reach the client.
    let (mut ws, _) = try_connect(gate.addr, "/ws", |_| {})
        .await
        .expect("upgrade");
    ws.send(Message::text(format!("big:{}", 5 * 1024 * 1024)))
        .await
        .expect("send");
    match recv_data(&mut ws).await {
        Message::Binary(b) => assert_eq!(b.len(), 5 * 1024 * 1024),
        other => panic!("expected 5 MiB, got {other:?}"),
    }
}

/// Finding: `ws.max_sessions` was checked before the upstream handshake and counted after it,
/// so 100 concurrent upgrades with a limit of 5 all got 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_upgrades_never_exceed_max_sessions() {
    const TRIES: usize = 50;
    const MAX: usize = 5;
    let up = WsUpstream::start(WsMockOptions::default()).await;
    let mut cfg = up.config();
    cfg.ws.max_sessions = MAX;
    // 50 upgrades at once are over Coinbase's 8 connections/s: the rate budget would refuse
    // some with 429 (tests/budget.rs). This test is about max_sessions.
    cfg.budget.enabled = false;
    let gate = Gate::start(cfg, None).await;
    let addr = gate.addr;

    let attempts: Vec<_> = (0..TRIES)
        .map(|_| tokio::spawn(async move { try_connect(addr, "/ws", |_| {}).await }))
        .collect();
    let mut open = Vec::new();
    let mut refused_count = 0;
    for a in attempts {
        match a.await.expect("join") {
            Ok((ws, _)) => open.push(ws),
            Err(WsError::Http(resp)) => {
                assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
                refused_count += 1;
            }
            Err(e) => panic!("unexpected handshake error: {e}"),
        }
    }
    assert_eq!(open.len(), MAX, "sessions admitted at once");
    assert_eq!(refused_count, TRIES - MAX);
    // The refused ones were refused before cbgate connected upstream.
    assert_eq!(up.mock.upgrades().len(), MAX);
    for ws in &mut open {
        ws.send(Message::text("alive")).await.expect("send");
        assert_eq!(recv_text(ws).await, "alive");
    }

    // Closed sessions free their slots: five new sessions are admitted.
    for mut ws in open {
        ws.close(None).await.expect("close");
        while let Some(Ok(_)) = ws.next().await {}
    }
    let mut again = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while again.len() < MAX {
        assert!(Instant::now() < deadline, "freed slots were not reused");
        match try_connect(addr, "/ws", |_| {}).await {
            Ok((ws, _)) => again.push(ws),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    // And the limit still holds.
    let (status, _, message) = refused(try_connect(addr, "/ws", |_| {}).await);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(message.contains("max_sessions"), "{message}");
}

/// A slot reserved for an upgrade whose upstream fails is released again.
#[tokio::test]
async fn a_failed_upstream_releases_its_session_slot() {
    let up = WsUpstream::start(WsMockOptions {
        reject_status: Some(401),
        ..WsMockOptions::default()
    })
    .await;
    let mut cfg = up.config();
    cfg.ws.max_sessions = 1;
    let gate = Gate::start(cfg, None).await;
    for _ in 0..3 {
        let (status, _, message) = refused(try_connect(gate.addr, "/ws", |_| {}).await);
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{message}");
    }
    assert_eq!(up.mock.upgrades().len(), 3);
}

/// Finding: a session that never subscribes stayed open forever (Coinbase closes it in 5 s).
#[tokio::test]
async fn a_session_without_a_subscribe_is_closed_after_subscribe_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(600);
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = WsUpstream::start(WsMockOptions {
        key: Some(key.expected.clone()),
        ..WsMockOptions::default()
    })
    .await;
    let mut cfg = up.config();
    cfg.ws.subscribe_timeout = TIMEOUT;
    let gate = InProc::start(cfg, &key).await;

    // Talks, but never subscribes.
    let started = Instant::now();
    let (mut idle, _) = try_connect(gate.addr, "/ws", |_| {})
        .await
        .expect("upgrade");
    idle.send(Message::text(r#"{"type":"heartbeat"}"#))
        .await
        .expect("send");
    assert_eq!(recv_text(&mut idle).await, r#"{"type":"heartbeat"}"#);
    // Subscribes in time.
    let (mut active, _) = try_connect(gate.addr, "/ws", |_| {})
        .await
        .expect("upgrade");
    active
        .send(Message::text(r#"{"type":"subscribe","channel":"ticker"}"#))
        .await
        .expect("send");
    assert_eq!(
        json(&recv_text(&mut active).await)["channel"],
        "subscriptions"
    );

    let (code, reason) = recv_close_within(&mut idle, TIMEOUT * 8)
        .await
        .expect("close code");
    assert!(started.elapsed() >= TIMEOUT);
    assert_eq!(code, 1008, "{reason}");
    assert!(
        reason.contains("no subscribe within ws.subscribe_timeout"),
        "{reason}"
    );
    assert!(
        idle.next().await.is_none(),
        "connection closed after the close frame"
    );
    up.mock
        .wait_frames(|f| f.iter().any(|r| matches!(r, Rec::Close(Some((1001, _))))))
        .await;
    assert_eq!(load(&gate.counters().subscribe_timeouts), 1);

    // The one that subscribed outlives the timeout.
    tokio::time::sleep(TIMEOUT).await;
    active
        .send(Message::text("still here"))
        .await
        .expect("send");
    assert_eq!(recv_text(&mut active).await, "still here");
    assert_eq!(load(&gate.counters().subscribe_timeouts), 1);
}

#[tokio::test]
async fn a_session_where_nobody_sends_is_closed_after_idle_timeout() {
    const IDLE: Duration = Duration::from_millis(800);
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = WsUpstream::start(WsMockOptions {
        key: Some(key.expected.clone()),
        ..WsMockOptions::default()
    })
    .await;
    let mut cfg = up.config();
    cfg.ws.idle_timeout = IDLE;
    let gate = InProc::start(cfg, &key).await;
    let (mut ws, _) = try_connect(gate.addr, "/ws", |_| {})
        .await
        .expect("upgrade");
    ws.send(Message::text(r#"{"type":"subscribe","channel":"ticker"}"#))
        .await
        .expect("send");
    assert_eq!(json(&recv_text(&mut ws).await)["channel"], "subscriptions");

    // Messages keep it open well past the idle timeout.
    let busy = Instant::now();
    while busy.elapsed() < IDLE * 2 {
        ws.send(Message::text("tick")).await.expect("send");
        assert_eq!(recv_text(&mut ws).await, "tick");
        tokio::time::sleep(IDLE / 4).await;
    }
    let quiet = Instant::now();
    let (code, reason) = recv_close_within(&mut ws, IDLE * 8)
        .await
        .expect("close code");
    assert!(quiet.elapsed() >= IDLE / 2, "closed while messages flowed");
    assert_eq!(code, 1001, "{reason}");
    assert!(reason.contains("ws.idle_timeout"), "{reason}");
    up.mock
        .wait_frames(|f| f.iter().any(|r| matches!(r, Rec::Close(Some((1001, _))))))
        .await;
    assert_eq!(load(&gate.counters().idle_timeouts), 1);
}

/// Coinbase Exchange's feed: with `cbgate-key` naming an Exchange key, a subscribe gets
/// `signature`, `key`, `passphrase` and `timestamp` (the client's own are dropped), and the
/// signature equals ccxt.pro 4.5.90 `coinbaseexchange.authenticate()`'s for that timestamp.
#[tokio::test]
async fn exchange_feed_subscribe_is_signed_as_ccxt_pro_signs() {
    const SECRET: &str =
        "dGhpcyBpcyBhIHRlc3Qgc2VjcmV0IGZvciBjYmdhdGUncyBFeGNoYW5nZSBzaWduZXIsIDY0IGJ5dGVzIGxvbmchIQ==";
    let up = WsUpstream::start(WsMockOptions::default()).await;
    let file = common::harness::write_private(
        up.dir.path(),
        "exchange.json",
        format!(r#"{{"key": "ex-key-1", "secret": "{SECRET}", "passphrase": "ex-pass"}}"#)
            .as_bytes(),
    );
    let mut cfg = up.config();
    cfg.upstream
        .resolve
        .insert("ws-feed.exchange.coinbase.com".into(), up.mock.addr);
    cfg.keys.insert(
        "ex".into(),
        cbgate::config::NamedKeyConfig {
            kind: cbgate::config::KeyKind::Exchange,
            file: Some(file),
            ..Default::default()
        },
    );
    let gate = Gate::start(cfg, None).await;
    let (mut ws, _) = try_connect(gate.addr, "/exchange/ws", |r| {
        r.headers_mut()
            .insert("cbgate-key", http::HeaderValue::from_static("ex"));
    })
    .await
    .expect("upgrade");
    ws.send(Message::text(
        r#"{"type":"subscribe","product_ids":["BTC-USD"],"channels":["full"],"signature":"mine","key":"k0"}"#,
    ))
    .await
    .expect("send");
    let frames = up
        .mock
        .wait_frames(|f| f.iter().any(|r| matches!(r, Rec::Text(_))))
        .await;
    let text = frames
        .iter()
        .find_map(|r| match r {
            Rec::Text(t) => Some(t.clone()),
            _ => None,
        })
        .expect("subscribe");
    let got = json(&text);
    assert_eq!(
        keys(&got),
        [
            "type",
            "product_ids",
            "channels",
            "signature",
            "key",
            "passphrase",
            "timestamp"
        ]
    );
    assert_eq!(got["key"], "ex-key-1");
    assert_eq!(got["passphrase"], "ex-pass");
    let ts = got["timestamp"].as_str().expect("timestamp");
    let script = r#"
import json, sys, ccxt.pro
e = ccxt.pro.coinbaseexchange({'apiKey': 'ex-key-1', 'secret': sys.argv[1], 'password': 'ex-pass'})
e.nonce = lambda: int(sys.argv[2])
print(e.authenticate()['signature'])
"#;
    let out = std::process::Command::new(common::provision::sdk_python())
        .args(["-c", script, SECRET, ts])
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        got["signature"]
    );
    let upgrade = up.mock.upgrades().pop().expect("upgrade");
    assert!(upgrade.headers.get("cbgate-key").is_none());
    gate.stop().await;
}
