//! The upstream client under load, over real sockets: bounded fan-out (in-flight slots, per-host
//! connections, idle pool, h2 streams per client connection) and transparent resends when the
//! server rotates its connections (GOAWAY).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};

use common::harness::{get, h1_client, h2c_client, send, Gate, KeyForm, TestKey, Upstream};
use common::mock::{AuthOutcome, MockOptions};

fn get_req(gate: &Gate, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("{}{path}", gate.url))
        .body(Full::new(Bytes::new()))
        .expect("request")
}

/// Polls `probe` every 20 ms for up to `within`; returns its last answer.
async fn eventually(within: Duration, mut probe: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if probe() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn requests_beyond_max_in_flight_wait_then_get_503_upstream_busy() {
    let up = Upstream::start(None).await;
    let mut cfg = up.config();
    cfg.upstream.max_in_flight = 3;
    cfg.upstream.queue_timeout = Duration::from_millis(300);
    let gate = Gate::start(cfg, None).await;

    let tasks: Vec<_> = (0..9)
        .map(|_| {
            let req = get_req(&gate, "/api/v3/brokerage/market/sleep/1500");
            tokio::spawn(async move { send(&h1_client(), req).await })
        })
        .collect();
    let mut ok = 0;
    let mut busy = 0;
    for t in tasks {
        let r = t.await.expect("task");
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(r.cbgate_error(), Some("upstream_busy"), "{}", r.text());
                assert_eq!(r.json()["error"], "upstream_busy");
                let msg = r.json()["message"].as_str().unwrap_or_default().to_owned();
                assert!(
                    msg.contains("upstream.max_in_flight (3)") && msg.contains("queue_timeout"),
                    "{msg}"
                );
                busy += 1;
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert_eq!((ok, busy), (3, 6), "3 slots, 6 turned away");
    assert!(
        up.mock.peak_concurrency() <= 3,
        "{}",
        up.mock.peak_concurrency()
    );
    let metrics = gate.proxy.metrics().render();
    assert!(
        metrics.contains("cbgate_upstream_errors_total{kind=\"busy\"} 6"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_streaming_response_keeps_its_slot_until_its_body_ends() {
    let up = Upstream::start(None).await;
    let mut cfg = up.config();
    cfg.upstream.max_in_flight = 1;
    cfg.upstream.queue_timeout = Duration::from_millis(200);
    let gate = Gate::start(cfg, None).await;

    // The mock sends this body in three chunks over 800 ms.
    let client = h1_client();
    let resp = client
        .request(get_req(&gate, "/api/v3/brokerage/market/slow-stream"))
        .await
        .expect("head");
    assert_eq!(resp.status(), StatusCode::OK);

    let second = get(&gate, "/api/v3/brokerage/market/products").await;
    assert_eq!(
        second.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the stream still holds the only slot: {}",
        second.text()
    );
    assert_eq!(second.cbgate_error(), Some("upstream_busy"));

    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"chunk-0\nchunk-1\nchunk-2\n");
    let third = get(&gate, "/api/v3/brokerage/market/products").await;
    assert_eq!(third.status, StatusCode::OK, "slot freed: {}", third.text());
}

#[tokio::test]
async fn http1_upstream_connections_per_host_are_capped() {
    let up = Upstream::start_with(MockOptions {
        http1_only: true,
        ..MockOptions::default()
    })
    .await;
    let mut cfg = up.config();
    cfg.upstream.max_connections_per_host = 2;
    cfg.upstream.pool_max_idle_per_host = 2;
    cfg.upstream.max_in_flight = 16;
    let gate = Gate::start(cfg, None).await;

    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let req = get_req(&gate, "/api/v3/brokerage/market/sleep/200");
            tokio::spawn(async move { send(&h1_client(), req).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.expect("task");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.json()["version"], "HTTP/1.1");
    }
    // 8 concurrent requests shared 2 connections instead of opening 8.
    assert!(up.mock.connections() <= 2, "{}", up.mock.connections());
    assert!(
        up.mock.peak_concurrency() <= 2,
        "{}",
        up.mock.peak_concurrency()
    );
}

#[tokio::test]
async fn idle_connections_beyond_pool_max_idle_per_host_are_closed() {
    let up = Upstream::start_with(MockOptions {
        http1_only: true,
        ..MockOptions::default()
    })
    .await;
    let mut cfg = up.config();
    cfg.upstream.max_connections_per_host = 4;
    cfg.upstream.pool_max_idle_per_host = 1;
    let gate = Gate::start(cfg, None).await;

    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let req = get_req(&gate, "/api/v3/brokerage/market/sleep/300");
            tokio::spawn(async move { send(&h1_client(), req).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task").status, StatusCode::OK);
    }
    assert_eq!(
        up.mock.connections(),
        4,
        "one connection per concurrent request"
    );
    let settled = eventually(Duration::from_secs(3), || up.mock.open_connections() == 1).await;
    assert!(
        settled,
        "{} connections still open; 1 may stay idle",
        up.mock.open_connections()
    );
}

#[tokio::test]
async fn one_h2_client_connection_gets_only_a_share_of_the_upstream_slots() {
    let up = Upstream::start(None).await;
    let mut cfg = up.config();
    // 8 slots: one client connection may hold 8 / 2 = 4 streams.
    cfg.upstream.max_in_flight = 8;
    let gate = Gate::start(cfg, None).await;
    assert_eq!(cbgate::listen::server::client_streams(8), 4);
    assert_eq!(cbgate::listen::server::client_streams(256), 128);

    let client = h2c_client();
    // One request first: until a client has read cbgate's SETTINGS it may open more streams
    // than allowed, and those are refused (REFUSED_STREAM), as RFC 9113 section 5.1.2 says.
    let r = send(&client, get_req(&gate, "/api/v3/brokerage/market/products")).await;
    assert_eq!(r.status, StatusCode::OK);
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let client = client.clone();
            let req = get_req(&gate, "/api/v3/brokerage/market/sleep/300");
            tokio::spawn(async move { send(&client, req).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.expect("task");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.version, http::Version::HTTP_2);
    }
    assert!(
        up.mock.peak_concurrency() <= 4,
        "one client connection had {} requests upstream at once",
        up.mock.peak_concurrency()
    );
}

/// An h2 relay in front of the mock that rotates connections the way nginx does at
/// `keepalive_requests`: after `every` requests on a connection it sends one
/// GOAWAY(last-stream-id = that request, NO_ERROR) at once (hyper and h2 servers first send
/// GOAWAY(2^31-1) and wait a round trip, which never leaves a stream above the last id). Streams
/// the client opened after it are above the last id: the relay drops their frames, so the mock
/// never sees them, exactly as nginx never processes them.
///
/// It works on frames only: HPACK state is not disturbed because no header block is forwarded
/// after the first one dropped (stream ids rise with each new HEADERS).
async fn goaway_relay(
    pki: &common::mock::Pki,
    mock: std::net::SocketAddr,
    every: u32,
) -> std::net::SocketAddr {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::sync::Mutex;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind relay");
    let addr = listener.local_addr().expect("relay addr");
    let mut server_cfg = (*pki.server_config()).clone();
    server_cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(pki.client_config(&[b"h2"])));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, connector) = (acceptor.clone(), connector.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(client) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(up_tcp) = tokio::net::TcpStream::connect(mock).await else {
                    return;
                };
                let _ = up_tcp.set_nodelay(true);
                let name =
                    rustls_pki_types::ServerName::try_from("api.coinbase.com").expect("name");
                let Ok(upstream) = connector.connect(name, up_tcp).await else {
                    return;
                };
                let (mut c_rd, c_wr) = tokio::io::split(client);
                let (mut u_rd, mut u_wr) = tokio::io::split(upstream);
                let c_wr = Arc::new(Mutex::new(c_wr));
                // Server to client: whole frames, so an injected GOAWAY falls between two.
                let down = {
                    let c_wr = Arc::clone(&c_wr);
                    tokio::spawn(async move {
                        let mut head = [0u8; 9];
                        while u_rd.read_exact(&mut head).await.is_ok() {
                            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                            let mut frame = head.to_vec();
                            frame.resize(9 + len, 0);
                            if u_rd.read_exact(&mut frame[9..]).await.is_err() {
                                break;
                            }
                            if c_wr.lock().await.write_all(&frame).await.is_err() {
                                break;
                            }
                        }
                        let _ = c_wr.lock().await.shutdown().await;
                    })
                };
                // Client to server: count new streams, send the GOAWAY, drop what is above it.
                let mut preface = [0u8; 24];
                if c_rd.read_exact(&mut preface).await.is_ok()
                    && u_wr.write_all(&preface).await.is_ok()
                {
                    let mut streams = 0u32;
                    let mut last: Option<u32> = None;
                    let mut head = [0u8; 9];
                    while c_rd.read_exact(&mut head).await.is_ok() {
                        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                        let kind = head[3];
                        let id =
                            u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                        let mut frame = head.to_vec();
                        frame.resize(9 + len, 0);
                        if c_rd.read_exact(&mut frame[9..]).await.is_err() {
                            break;
                        }
                        if last.is_some_and(|l| id > l) {
                            continue; // never processed
                        }
                        if kind == 0x1 && last.is_none() {
                            streams += 1;
                            if streams == every {
                                last = Some(id);
                                let mut goaway = vec![0, 0, 8, 0x7, 0, 0, 0, 0, 0];
                                goaway.extend_from_slice(&id.to_be_bytes());
                                goaway.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
                                let _ = c_wr.lock().await.write_all(&goaway).await;
                            }
                        }
                        if u_wr.write_all(&frame).await.is_err() {
                            break;
                        }
                    }
                }
                let _ = u_wr.shutdown().await;
                let _ = down.await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn nginx_style_goaway_rotation_is_invisible_and_never_duplicates_a_post() {
    const CLIENTS: usize = 8;
    const PER_CLIENT: usize = 50;
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start_with(MockOptions {
        key: Some(key.expected.clone()),
        ..MockOptions::default()
    })
    .await;
    // nginx's keepalive_requests, scaled down: a GOAWAY every 10 requests.
    let relay = goaway_relay(&up.pki, up.mock.addr, 10).await;
    let mut cfg = up.config();
    for h in common::harness::HOSTS {
        cfg.upstream.resolve.insert((*h).to_owned(), relay);
    }
    let gate = Gate::start(cfg, Some(&key)).await;

    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let url = gate.url.clone();
            tokio::spawn(async move {
                let client = h1_client();
                let mut failures = Vec::new();
                for i in 0..PER_CLIENT {
                    let req = if i % 2 == 0 {
                        let body = format!(
                            r#"{{"client_order_id":"c{c}-{i}","product_id":"BTC-USD","side":"BUY"}}"#
                        );
                        Request::builder()
                            .method(Method::POST)
                            .uri(format!("{url}/api/v3/brokerage/orders"))
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body)))
                            .expect("request")
                    } else {
                        Request::get(format!("{url}/api/v3/brokerage/accounts"))
                            .body(Full::new(Bytes::new()))
                            .expect("request")
                    };
                    let r = send(&client, req).await;
                    if r.status != StatusCode::OK {
                        failures.push(format!("{}: {}", r.status, r.text()));
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.expect("task"));
    }
    assert!(
        failures.is_empty(),
        "{} of {} failed, first: {:?}",
        failures.len(),
        CLIENTS * PER_CLIENT,
        failures.first()
    );

    // Every POST reached the mock exactly once, with a token it accepted.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for rec in up.mock.requests() {
        assert!(
            matches!(rec.auth, AuthOutcome::Valid { .. }),
            "{:?}",
            rec.auth
        );
        if rec.method == "POST" {
            let v: serde_json::Value = serde_json::from_slice(&rec.body).expect("json body");
            let id = v["client_order_id"].as_str().expect("id").to_owned();
            *seen.entry(id).or_default() += 1;
        }
    }
    let dup: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dup.is_empty(), "duplicated POSTs: {dup:?}");
    assert_eq!(seen.len(), CLIENTS * PER_CLIENT / 2);
    // The rotation really cut streams off, and those were sent again.
    let metrics = gate.proxy.metrics().render();
    let resends = metrics
        .lines()
        .find_map(|l| l.strip_prefix("cbgate_upstream_resends_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(resends > 0, "{metrics}");
    assert!(
        up.mock.connections() >= CLIENTS * PER_CLIENT / 10,
        "the mock rotated its connections ({} opened)",
        up.mock.connections()
    );
}

#[tokio::test]
async fn refused_streams_are_resent_once_with_a_fresh_token() {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = Upstream::start_with(MockOptions {
        key: Some(key.expected.clone()),
        refuse_every: Some(3),
        ..MockOptions::default()
    })
    .await;
    let gate = Gate::start(up.config(), Some(&key)).await;

    let tasks: Vec<_> = (0..4)
        .map(|c| {
            let url = gate.url.clone();
            tokio::spawn(async move {
                let client = h1_client();
                let mut statuses = Vec::new();
                for i in 0..15 {
                    let body = format!(r#"{{"client_order_id":"r{c}-{i}"}}"#);
                    let req = Request::builder()
                        .method(Method::POST)
                        .uri(format!("{url}/api/v3/brokerage/orders"))
                        .body(Full::new(Bytes::from(body)))
                        .expect("request");
                    let r = send(&client, req).await;
                    statuses.push((r.status, r.text()));
                }
                statuses
            })
        })
        .collect();
    for t in tasks {
        for (status, text) in t.await.expect("task") {
            assert_eq!(status, StatusCode::OK, "{text}");
        }
    }
    let recs = up.mock.requests();
    assert_eq!(recs.len(), 60, "each POST processed exactly once");
    let mut nonces = std::collections::HashSet::new();
    for rec in &recs {
        match &rec.auth {
            AuthOutcome::Valid { nonce, .. } => assert!(nonces.insert(nonce.clone())),
            other => panic!("{other:?}"),
        }
    }
    // Every refusal was answered by exactly one resend.
    let refused = up.mock.refused();
    assert!(refused >= 15, "{refused}");
    let metrics = gate.proxy.metrics().render();
    assert!(
        metrics.contains(&format!("cbgate_upstream_resends_total {refused}\n")),
        "{refused} refused: {metrics}"
    );
}

/// `upstream.protocol` and `upstream.host_protocol` decide what ALPN offers: the mock speaks h2
/// and HTTP/1.1, so the version it received shows what cbgate offered.
#[tokio::test]
async fn upstream_protocol_sets_what_the_upstream_connections_offer_per_host() {
    use cbgate::config::UpstreamProtocol;
    let versions = |up: &Upstream| -> Vec<http::Version> {
        up.mock
            .requests_to("GET", "/api/v3/brokerage/market/products")
            .iter()
            .map(|r| r.version)
            .collect()
    };
    let path = "/api/v3/brokerage/market/products";
    for (protocol, exception, want) in [
        (UpstreamProtocol::Auto, None, http::Version::HTTP_2),
        (UpstreamProtocol::Http1, None, http::Version::HTTP_11),
        // The exception for the host wins over the default.
        (
            UpstreamProtocol::Http1,
            Some(UpstreamProtocol::Auto),
            http::Version::HTTP_2,
        ),
        (
            UpstreamProtocol::Auto,
            Some(UpstreamProtocol::Http1),
            http::Version::HTTP_11,
        ),
    ] {
        let up = Upstream::start(None).await;
        let mut cfg = up.config();
        cfg.upstream.protocol = protocol;
        if let Some(p) = exception {
            cfg.upstream
                .host_protocol
                .insert("api.coinbase.com".into(), p);
        }
        let gate = Gate::start(cfg, None).await;
        for _ in 0..2 {
            let r = get(&gate, path).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        }
        assert_eq!(
            versions(&up),
            vec![want, want],
            "protocol {protocol:?}, exception {exception:?}"
        );
        gate.stop().await;
    }
}
