//! End-to-end behaviour of the proxy over real sockets: cbgate in-process, a mock Coinbase over
//! real TLS that verifies every JWT as Coinbase would.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;

use common::harness::{self, get, h1_client, h2c_client, send, Gate, KeyForm, TestKey, Upstream};
use common::mock::AuthOutcome;

fn valid_claims(auth: &AuthOutcome) -> &serde_json::Value {
    match auth {
        AuthOutcome::Valid { claims, .. } => claims,
        other => panic!("mock did not accept the token: {other:?}"),
    }
}

#[tokio::test]
async fn signs_get_with_uri_claim_and_passes_answer_back() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;

    let r = get(&gate, "/api/v3/brokerage/accounts").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["path"], "/api/v3/brokerage/accounts");
    assert_eq!(r.json()["host"], "api.coinbase.com");
    // Coinbase's rate-limit headers reach the client.
    assert_eq!(r.headers["x-ratelimit-remaining"], "29");
    assert_eq!(r.headers["x-ratelimit-limit"], "30");
    assert!(r.cbgate_error().is_none());

    let rec = up.mock.requests();
    assert_eq!(rec.len(), 1);
    let claims = valid_claims(&rec[0].auth);
    assert_eq!(
        claims["uri"],
        "GET api.coinbase.com/api/v3/brokerage/accounts"
    );
    assert_eq!(claims["sub"], key.name.as_str());
    // The outgoing Authorization header carries a bearer token, not the client's.
    let auth = rec[0].headers["authorization"].to_str().expect("ascii");
    assert!(auth.starts_with("Bearer ey"));
}

#[tokio::test]
async fn cdp_platform_requests_get_uris_claim() {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;

    let r = get(&gate, "/platform/v1/networks/base-mainnet/assets").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["host"], "api.cdp.coinbase.com");
    let rec = up.mock.requests();
    let claims = valid_claims(&rec[0].auth);
    assert_eq!(
        claims["uris"],
        serde_json::json!(["GET api.cdp.coinbase.com/platform/v1/networks/base-mainnet/assets"])
    );
    assert_eq!(claims["iat"], claims["nbf"]);
}

#[tokio::test]
async fn query_and_encoded_path_pass_unchanged_and_stay_out_of_the_claim() {
    let key = TestKey::generate(KeyForm::P256Pkcs8);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;

    // `%2D` is an encoded unreserved `-`: the path stays plainly Coinbase-shaped.
    let target = "/api/v3/brokerage/orders/historical/batch%2Dx?product_ids=BTC-USD&product_ids=ETH-USD&q=%2F%26x+y%3B%20z:@&cursor=";
    let r = get(&gate, target).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let rec = up.mock.requests();
    assert_eq!(
        rec[0].path_and_query, target,
        "path and query forwarded byte for byte"
    );
    let claims = valid_claims(&rec[0].auth);
    assert_eq!(
        claims["uri"],
        "GET api.coinbase.com/api/v3/brokerage/orders/historical/batch%2Dx"
    );
}

#[tokio::test]
async fn request_bodies_arrive_intact_for_each_method() {
    let key = TestKey::generate(KeyForm::Ed25519B64_32);
    let up = Upstream::start(Some(&key)).await;
    // PUT and DELETE on portfolios are above the default "trade" ceiling.
    let mut cfg = up.config();
    cfg.policy.permission = cbgate::config::Permission::Transfer;
    let gate = Gate::start(cfg, Some(&key)).await;
    let client = h1_client();

    let binary: Vec<u8> = (0..50_000u32).map(|i| (i % 256) as u8).collect();
    let cases: Vec<(Method, &str, Bytes)> = vec![
        (
            Method::POST,
            "/api/v3/brokerage/orders",
            Bytes::from_static(br#"{"client_order_id":"c1","product_id":"BTC-USD","side":"BUY"}"#),
        ),
        (
            Method::PUT,
            "/api/v3/brokerage/portfolios/p1",
            Bytes::from_static(b"{\"name\":\"\xc3\xa9\"}"),
        ),
        (
            Method::DELETE,
            "/api/v3/brokerage/portfolios/p1",
            Bytes::new(),
        ),
        (
            Method::POST,
            "/api/v3/brokerage/orders/batch_cancel",
            Bytes::from(binary),
        ),
    ];
    for (method, path, body) in &cases {
        let req = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", gate.url))
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))
            .expect("request");
        let r = send(&client, req).await;
        assert_eq!(r.status, StatusCode::OK, "{method} {path}: {}", r.text());
    }
    let rec = up.mock.requests();
    assert_eq!(rec.len(), cases.len());
    for (got, (method, path, body)) in rec.iter().zip(&cases) {
        assert_eq!(got.method, method.as_str());
        assert_eq!(&got.body, body, "{method} {path} body");
        let claims = valid_claims(&got.auth);
        assert_eq!(claims["uri"], format!("{method} api.coinbase.com{path}"));
    }
}

#[tokio::test]
async fn chunked_request_body_streams_through() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;

    // A body of unknown length: the client sends it chunked.
    let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = (0..5)
        .map(|i| Ok(Frame::data(Bytes::from(format!("part-{i};")))))
        .collect();
    let body = StreamBody::new(futures_stream(chunks));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<StreamBody<_>>();
    let req = Request::post(format!("{}/api/v3/brokerage/orders", gate.url))
        .body(body)
        .expect("request");
    let resp = client.request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let rec = up.mock.requests();
    assert_eq!(&rec[0].body[..], b"part-0;part-1;part-2;part-3;part-4;");
}

/// A stream over a vector, without pulling in the futures crate.
fn futures_stream<T: Unpin>(items: Vec<T>) -> impl futures_core::Stream<Item = T> + Unpin {
    struct Iter<T>(std::vec::IntoIter<T>);
    impl<T: Unpin> futures_core::Stream for Iter<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    Iter(items.into_iter())
}

#[tokio::test]
async fn slow_chunked_response_reaches_the_client_chunk_by_chunk() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;

    let req = Request::get(format!("{}/api/v3/brokerage/slow-stream", gate.url))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = h1_client().request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // The mock sends three chunks 400 ms apart. A proxy that buffered the response would hand
    // over all of it at once; a streaming one hands over the first chunk alone.
    let first = body
        .frame()
        .await
        .expect("a frame")
        .expect("no error")
        .into_data()
        .expect("data frame");
    assert_eq!(&first[..], b"chunk-0\n");
    let rest = body.collect().await.expect("rest").to_bytes();
    assert_eq!(&rest[..], b"chunk-1\nchunk-2\n");
}

#[tokio::test]
async fn client_credentials_and_hop_by_hop_headers_are_stripped() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;

    let req = Request::get(format!("{}/api/v3/brokerage/accounts", gate.url))
        .header("authorization", "Bearer client-supplied")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("host", "127.0.0.1:8750")
        .header("connection", "keep-alive, x-hop-secret")
        .header("x-hop-secret", "must not pass")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("x-custom", "kept")
        .header("user-agent", "bot/1.0")
        .header("cb-access-key", "client-key")
        .header("cb-access-sign", "client-sign")
        .header("cb-access-timestamp", "1700000000")
        .header("cb-access-passphrase", "client-passphrase")
        .header("x-cb-access-key", "client-key")
        .header("x-cb-access-signature", "client-sign")
        .header("x-cb-access-timestamp", "1700000000")
        .header("x-cb-access-passphrase", "client-passphrase")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let r = send(&h1_client(), req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let rec = &up.mock.requests()[0];
    valid_claims(&rec.auth);
    for gone in [
        "cb-access-key",
        "cb-access-sign",
        "cb-access-timestamp",
        "cb-access-passphrase",
        "x-cb-access-key",
        "x-cb-access-signature",
        "x-cb-access-timestamp",
        "x-cb-access-passphrase",
        "proxy-authorization",
        "connection",
        "x-hop-secret",
        "keep-alive",
        "proxy-connection",
        "te",
    ] {
        assert!(
            rec.headers.get(gone).is_none(),
            "{gone} reached the upstream"
        );
    }
    assert_eq!(rec.headers.get_all("authorization").iter().count(), 1);
    assert_ne!(rec.headers["authorization"], "Bearer client-supplied");
    assert_eq!(
        r.json()["host"],
        "api.coinbase.com",
        "Host is the upstream's"
    );
    assert_eq!(rec.headers["x-custom"], "kept");
    assert_eq!(rec.headers["user-agent"], "bot/1.0");
}

#[tokio::test]
async fn raw_http1_connection_headers_are_removed() {
    // The same check with bytes on the wire, so no client library tidies the request first.
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;
    let out = harness::raw(
        gate.addr,
        b"GET /api/v3/brokerage/accounts HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close, X-Foo\r\nX-Foo: 1\r\nAuthorization: Bearer nope\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let rec = &up.mock.requests()[0];
    assert!(rec.headers.get("x-foo").is_none());
    assert!(rec.headers.get("connection").is_none());
    valid_claims(&rec.auth);
}

#[tokio::test]
async fn h2c_clients_are_served_and_upstream_uses_h2_when_offered() {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;

    let req = Request::post(format!("{}/api/v3/brokerage/orders/preview", gate.url))
        .body(Full::new(Bytes::from_static(b"{\"a\":1}")))
        .expect("request");
    let r = send(&h2c_client(), req).await;
    assert_eq!(r.version, Version::HTTP_2);
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let rec = &up.mock.requests()[0];
    assert_eq!(&rec.body[..], b"{\"a\":1}");
    // ALPN picked h2 towards the upstream.
    assert_eq!(rec.version, Version::HTTP_2);
    assert_eq!(
        valid_claims(&rec.auth)["uri"],
        "POST api.coinbase.com/api/v3/brokerage/orders/preview"
    );
}

#[tokio::test]
async fn upstream_connections_are_pooled_and_reused() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;
    for _ in 0..20 {
        let r = get(&gate, "/api/v3/brokerage/accounts").await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(up.mock.requests().len(), 20);
    assert_eq!(
        up.mock.connections(),
        1,
        "one TLS connection serves all requests"
    );
}

#[tokio::test]
async fn two_hundred_concurrent_requests_each_get_a_distinct_nonce() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let mut cfg = up.config();
    // 200 requests at once are over Coinbase's 30/s: the rate budget would rightly refuse
    // most (tests/budget.rs tests that). This test is about nonces.
    cfg.budget.enabled = false;
    let gate = Gate::start(cfg, Some(&key)).await;
    let client = h1_client();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let client = client.clone();
        let url = format!("{}/api/v3/brokerage/orders/historical/{i}", gate.url);
        tasks.spawn(async move {
            let req = Request::get(url)
                .body(Full::new(Bytes::new()))
                .expect("req");
            send(&client, req).await.status
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.expect("task"), StatusCode::OK);
    }
    let rec = up.mock.requests();
    assert_eq!(rec.len(), 200);
    let nonces: HashSet<String> = rec
        .iter()
        .map(|r| match &r.auth {
            AuthOutcome::Valid { nonce, .. } => nonce.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(nonces.len(), 200);
}

#[tokio::test]
async fn no_route_is_404_from_cbgate() {
    let up = Upstream::start(None).await;
    let gate = Gate::start(up.config(), None).await;
    // /api/v2/ is the derivatives gateway's route; /api/v1/ has none.
    for path in ["/", "/api/v1/accounts", "/favicon.ico", "/v2"] {
        let r = get(&gate, path).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(r.cbgate_error(), Some("no_route"));
        assert_eq!(r.json()["error"], "no_route");
        assert!(r.json()["message"]
            .as_str()
            .expect("message")
            .contains("/api/v3/"));
    }
    assert!(up.mock.requests().is_empty());
}

#[tokio::test]
async fn absolute_form_and_connect_are_refused() {
    let up = Upstream::start(None).await;
    let gate = Gate::start(up.config(), None).await;
    let out = harness::raw(
        gate.addr,
        b"GET http://api.coinbase.com/api/v3/brokerage/market/products HTTP/1.1\r\nHost: api.coinbase.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("absolute-form"), "{out}");
    let out = harness::raw(
        gate.addr,
        b"CONNECT api.coinbase.com:443 HTTP/1.1\r\nHost: api.coinbase.com:443\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("CONNECT"), "{out}");
    assert!(up.mock.requests().is_empty());
}

#[tokio::test]
async fn oversized_bodies_get_413_and_never_reach_coinbase() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let mut cfg = up.config();
    cfg.max_body_bytes = 1024;
    let gate = Gate::start(cfg, Some(&key)).await;

    // Declared length over the limit.
    let req = Request::post(format!("{}/api/v3/brokerage/orders", gate.url))
        .body(Full::new(Bytes::from(vec![b'x'; 1025])))
        .expect("request");
    let r = send(&h1_client(), req).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.cbgate_error(), Some("body_too_large"));
    assert!(up.mock.requests().is_empty());

    // Chunked, no declared length: the limit is enforced while streaming.
    let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = (0..4)
        .map(|_| Ok(Frame::data(Bytes::from(vec![b'y'; 400]))))
        .collect();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<StreamBody<_>>();
    let req = Request::post(format!("{}/api/v3/brokerage/orders", gate.url))
        .body(StreamBody::new(futures_stream(chunks)))
        .expect("request");
    let resp = client.request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        up.mock.requests().iter().all(|r| r.body.len() <= 1024),
        "no over-limit body completed upstream"
    );

    // At the limit is fine.
    let req = Request::post(format!("{}/api/v3/brokerage/orders", gate.url))
        .body(Full::new(Bytes::from(vec![b'x'; 1024])))
        .expect("request");
    assert_eq!(send(&h1_client(), req).await.status, StatusCode::OK);
}

#[tokio::test]
async fn upstream_down_is_502_naming_the_host() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let mut cfg = up.config();
    // A port nothing listens on: bind, note it, close it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    cfg.upstream
        .resolve
        .insert("api.coinbase.com".into(), closed);
    let gate = Gate::start(cfg, Some(&key)).await;
    let r = get(&gate, "/api/v3/brokerage/accounts").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.cbgate_error(), Some("upstream_connect"));
    let msg = r.json()["message"].as_str().expect("message").to_owned();
    assert!(msg.contains("api.coinbase.com"), "{msg}");
}

#[tokio::test]
async fn upstream_hanging_is_504() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let mut cfg = up.config();
    cfg.upstream.request_timeout = Duration::from_millis(500);
    let gate = Gate::start(cfg, Some(&key)).await;
    let r = get(&gate, "/api/v3/brokerage/hang").await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.cbgate_error(), Some("upstream_timeout"));
    assert!(r.json()["message"]
        .as_str()
        .expect("m")
        .contains("api.coinbase.com"));
}

#[tokio::test]
async fn connect_that_hangs_is_504() {
    // A listener that never completes the TLS handshake (accepts TCP, says nothing).
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let mut cfg = up.config();
    cfg.upstream
        .resolve
        .insert("api.coinbase.com".into(), silent_addr);
    cfg.upstream.connect_timeout = Duration::from_millis(300);
    let gate = Gate::start(cfg, Some(&key)).await;
    let r = get(&gate, "/api/v3/brokerage/accounts").await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text());
    assert_eq!(r.cbgate_error(), Some("upstream_timeout"));
    hold.abort();
}

#[tokio::test]
async fn untrusted_certificate_is_502_naming_the_problem() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let mut cfg = up.config();
    cfg.upstream.ca_file = None; // Mozilla roots only: the test CA is unknown.
    let gate = Gate::start(cfg, Some(&key)).await;
    let r = get(&gate, "/api/v3/brokerage/accounts").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.cbgate_error(), Some("upstream_tls"));
    let msg = r.json()["message"].as_str().expect("m").to_owned();
    assert!(msg.contains("certificate not trusted"), "{msg}");
    assert!(msg.contains("api.coinbase.com"), "{msg}");
    assert!(up.mock.requests().is_empty());
}

#[tokio::test]
async fn certificate_for_another_name_is_refused() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let mut cfg = up.config();
    // The mock's certificate does not cover this name, though the CA is trusted.
    cfg.routes = vec![cbgate::config::RouteConfig::new(
        "/api/v3/",
        "https://api.evil.example",
    )];
    cfg.upstream
        .resolve
        .insert("api.evil.example".into(), up.mock.addr);
    let gate = Gate::start(cfg, Some(&key)).await;
    let r = get(&gate, "/api/v3/brokerage/accounts").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.cbgate_error(), Some("upstream_tls"));
    let msg = r.json()["message"].as_str().expect("m").to_owned();
    assert!(
        msg.contains("not valid for the name api.evil.example"),
        "{msg}"
    );
}

#[tokio::test]
async fn coinbase_errors_pass_through_untouched() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;
    for code in [401u16, 429, 500] {
        let r = get(&gate, &format!("/api/v3/brokerage/status/{code}")).await;
        assert_eq!(r.status.as_u16(), code);
        assert!(
            r.cbgate_error().is_none(),
            "cbgate must not relabel Coinbase's {code}"
        );
        assert_eq!(r.json()["status"], code);
        assert_eq!(r.headers["x-ratelimit-remaining"], "29");
    }
}

#[tokio::test]
async fn without_a_key_requests_go_unsigned() {
    let up = Upstream::start(None).await;
    let gate = Gate::start(up.config(), None).await;
    let r = get(&gate, "/api/v3/brokerage/market/products?limit=1").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = get(&gate, "/api/v3/brokerage/accounts").await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "Coinbase's own 401 comes back"
    );
    assert!(r.cbgate_error().is_none());
    let rec = up.mock.requests();
    assert!(rec.iter().all(|r| r.auth == AuthOutcome::Missing));
    assert!(rec.iter().all(|r| r.headers.get("authorization").is_none()));
}

#[tokio::test]
async fn client_keep_alive_serves_several_requests_on_one_connection() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;
    let out = harness::raw(
        gate.addr,
        b"GET /api/v3/brokerage/accounts HTTP/1.1\r\nHost: localhost\r\n\r\nGET /api/v3/brokerage/time HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert_eq!(up.mock.requests().len(), 2);
}

#[tokio::test]
async fn unix_socket_listener_is_private_and_serves() {
    use std::os::unix::fs::PermissionsExt as _;
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = Upstream::start(Some(&key)).await;
    let sock = up.dir.path().join("cbgate.sock");
    let listener =
        cbgate::listen::server::Listener::bind(&cbgate::config::ListenAddr::Unix(sock.clone()))
            .await
            .expect("bind unix");
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let gate = Gate::start_on(up.config(), Some(&key), vec![listener]).await;

    let r = harness::get_unix(&sock, "/api/v3/brokerage/accounts").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    valid_claims(&up.mock.requests()[0].auth);
    gate.stop().await;
    assert!(!sock.exists(), "socket file removed on shutdown");
}

/// With the wallet secret, cbgate's `X-Wallet-Auth` replaces the client's on the requests the
/// CDP SDKs sign, and the client's is removed from all others; on other routes none is added.
/// Without the secret the client's passes through untouched.
#[tokio::test]
async fn x_wallet_auth_is_minted_replaced_or_passed() {
    use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    use base64::Engine as _;
    let key = TestKey::generate(KeyForm::P256Sec1);
    let pkcs8 = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
        .expect("P-256")
        .to_pkcs8v1()
        .expect("pkcs8");
    let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
    let secret = cbgate::sign::wallet::WalletSecret::parse(&b64).expect("wallet secret");
    let up = Upstream::start_with(common::mock::MockOptions {
        key: Some(key.expected.clone()),
        wallet_key: Some(secret.public_key().to_vec()),
        ..Default::default()
    })
    .await;
    let mut cfg = up.config();
    cfg.policy.permission = cbgate::config::Permission::Transfer;
    let gate = Gate::start_with_wallet(cfg.clone(), Some(&key), Some(secret)).await;
    let req = |method: Method, path: &str, body: &'static str| {
        Request::builder()
            .method(method)
            .uri(format!("{}{path}", gate.url))
            .header("x-wallet-auth", "client-token")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("request")
    };
    let client = h1_client();
    for (m, path, body) in [
        (
            Method::POST,
            "/platform/v2/evm/accounts",
            r#"{"name":"n1"}"#,
        ),
        (Method::POST, "/platform/v2/evm/accounts", ""),
        (Method::GET, "/platform/v2/evm/accounts", ""),
        (Method::POST, "/platform/v2/evm/swaps", r#"{"a":1}"#),
        (Method::POST, "/v2/accounts/a1/transactions", r#"{"a":1}"#),
    ] {
        let r = send(&client, req(m.clone(), path, body)).await;
        assert_eq!(r.status, StatusCode::OK, "{m} {path}: {}", r.text());
    }
    let recs = up.mock.requests();
    let claims = |i: usize| match &recs[i].wallet_auth {
        Some(Ok(c)) => c.clone(),
        other => panic!("request {i}: {other:?}"),
    };
    assert!(
        claims(0)["reqHash"].is_string(),
        "a body with fields is hashed"
    );
    assert!(claims(1).get("reqHash").is_none(), "an empty body is not");
    assert_eq!(recs.len(), 5);
    for (i, r) in recs.iter().enumerate().skip(2) {
        assert!(r.headers.get("x-wallet-auth").is_none(), "request {i}");
    }

    // No wallet secret: the client's own token passes, on every route.
    let gate2 = Gate::start(cfg, Some(&key)).await;
    let r = send(
        &client,
        Request::post(format!("{}/platform/v2/evm/swaps", gate2.url))
            .header("x-wallet-auth", "client-token")
            .body(Full::new(Bytes::new()))
            .expect("request"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let last = up.mock.requests().pop().expect("recorded");
    assert_eq!(last.headers["x-wallet-auth"], "client-token");
    gate.stop().await;
    gate2.stop().await;
}
