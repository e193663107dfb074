//! Proves the mock Coinbase upstream (tests/common/mock.rs) verifies tokens the
//! way Coinbase does. Tokens are built by hand here, independent of cbgate.
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use common::mock::{
    http_date, iso8601, parse_http_date, AuthOutcome, ExpectedKey, MockCoinbase, MockOptions, Pki,
};
use http::header::{AUTHORIZATION, CONTENT_LENGTH, DATE, HOST};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const HOSTS: [&str; 4] = [
    "api.coinbase.com",
    "api.cdp.coinbase.com",
    "advanced-trade-ws.coinbase.com",
    "advanced-trade-ws-user.coinbase.com",
];
const NAME: &str = "organizations/test-org/apiKeys/test-key";
const ACCOUNTS: &str = "/api/v3/brokerage/accounts";

// ---------------------------------------------------------------------------
// Hand-made tokens
// ---------------------------------------------------------------------------

enum TestKey {
    Es(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

impl TestKey {
    fn es256() -> TestKey {
        TestKey::Es(EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("gen P-256"))
    }

    fn ed25519() -> TestKey {
        TestKey::Ed(Ed25519KeyPair::generate().expect("gen Ed25519"))
    }

    fn expected(&self, name: &str) -> ExpectedKey {
        match self {
            TestKey::Es(k) => ExpectedKey::Es256 {
                name: name.to_string(),
                public_key: k.public_key().as_ref().to_vec(),
            },
            TestKey::Ed(k) => ExpectedKey::EdDsa {
                name: name.to_string(),
                public_key: k.public_key().as_ref().to_vec(),
            },
        }
    }

    fn alg(&self) -> &'static str {
        match self {
            TestKey::Es(_) => "ES256",
            TestKey::Ed(_) => "EdDSA",
        }
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        match self {
            TestKey::Es(k) => k
                .sign(&SystemRandom::new(), msg)
                .expect("ES256 sign")
                .as_ref()
                .to_vec(),
            TestKey::Ed(k) => k.sign(msg).as_ref().to_vec(),
        }
    }
}

fn nonce() -> String {
    let mut b = [0u8; 32];
    SystemRandom::new().fill(&mut b).expect("random nonce");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

fn token(key: &TestKey, nonce: &str, claims: &Value) -> String {
    let header = json!({"alg": key.alg(), "kid": NAME, "nonce": nonce, "typ": "JWT"});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = key.sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
}

fn rest_claims(uri: &str, nbf: i64) -> Value {
    json!({"sub": NAME, "iss": "cdp", "nbf": nbf, "exp": nbf + 120, "uri": uri})
}

fn cdp_claims(uri: &str, nbf: i64) -> Value {
    json!({"sub": NAME, "iss": "cdp", "nbf": nbf, "iat": nbf, "exp": nbf + 120, "uris": [uri]})
}

// ---------------------------------------------------------------------------
// Tiny client: one TLS connection per request, trusting only the test CA
// ---------------------------------------------------------------------------

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn send(
    mock: &MockCoinbase,
    pki: &Pki,
    host: &str,
    h2: bool,
    path_and_query: &str,
    jwt: Option<&str>,
) -> Reply {
    let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
    let connector = TlsConnector::from(Arc::new(pki.client_config(&[alpn])));
    let tcp = TcpStream::connect(mock.addr)
        .await
        .expect("connect to mock");
    let name = ServerName::try_from(host.to_string()).expect("server name");
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn), "ALPN");

    let mut req = Request::builder().method("GET");
    req = if h2 {
        req.uri(format!("https://{host}{path_and_query}"))
    } else {
        req.uri(path_and_query).header(HOST, host)
    };
    if let Some(t) = jwt {
        req = req.header(AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Empty::<Bytes>::new()).expect("build request");

    let io = TokioIo::new(tls);
    let resp: http::Response<Incoming> = if h2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        sender.send_request(req).await.expect("h2 request")
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        sender.send_request(req).await.expect("h1 request")
    };
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("read body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

fn assert_401(r: &Reply, reason_part: &str) {
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"], "UNAUTHORIZED");
    let msg = v["message"].as_str().expect("message");
    assert!(
        msg.contains(reason_part),
        "reason {msg:?} lacks {reason_part:?}"
    );
    assert_eq!(r.headers["x-ratelimit-limit"], "30");
}

async fn start(key: Option<&TestKey>) -> (Pki, MockCoinbase) {
    let pki = Pki::new(&HOSTS);
    let opts = MockOptions {
        key: key.map(|k| k.expected(NAME)),
        ..Default::default()
    };
    let mock = MockCoinbase::start(&pki, opts).await;
    (pki, mock)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn es256_tokens_are_verified() {
    let key = TestKey::es256();
    let (pki, mock) = start(Some(&key)).await;
    let host = "api.coinbase.com";
    let uri = format!("GET {host}{ACCOUNTS}");

    // Valid, over HTTP/1.1, with a query on the wire but not in `uri`.
    let n1 = nonce();
    let t1 = token(&key, &n1, &rest_claims(&uri, now()));
    let r = send(
        &mock,
        &pki,
        host,
        false,
        &format!("{ACCOUNTS}?limit=5"),
        Some(&t1),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.headers["x-ratelimit-remaining"], "29");
    assert_eq!(r.headers["x-ratelimit-reset"], "1700000000");
    let echo = r.json();
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["path"], ACCOUNTS);
    assert_eq!(echo["query"], "limit=5");
    assert_eq!(echo["host"], host);
    assert_eq!(echo["headers"]["authorization"], json!(["<redacted>"]));
    assert!(!r.text().contains(&t1), "JWT echoed");
    let rec = mock.requests();
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].path_and_query, format!("{ACCOUNTS}?limit=5"));
    assert_eq!(rec[0].version, http::Version::HTTP_11);
    match &rec[0].auth {
        AuthOutcome::Valid {
            alg,
            kid,
            nonce,
            claims,
        } => {
            assert_eq!(alg, "ES256");
            assert_eq!(kid, NAME);
            assert_eq!(nonce, &n1);
            assert_eq!(claims["uri"], uri.as_str());
        }
        other => panic!("want Valid, got {other:?}"),
    }

    // The same token again: reused nonce.
    let r = send(&mock, &pki, host, false, ACCOUNTS, Some(&t1)).await;
    assert_401(&r, "nonce reused");

    // Valid over HTTP/2 (authority from :authority).
    let t2 = token(&key, &nonce(), &rest_claims(&uri, now()));
    let r = send(&mock, &pki, host, true, ACCOUNTS, Some(&t2)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["version"], "HTTP/2");
    assert_eq!(r.json()["host"], host);

    // Query string inside `uri`.
    let with_query = format!("{uri}?limit=5");
    let t3 = token(&key, &nonce(), &rest_claims(&with_query, now()));
    let r = send(
        &mock,
        &pki,
        host,
        false,
        &format!("{ACCOUNTS}?limit=5"),
        Some(&t3),
    )
    .await;
    assert_401(&r, "uri is not");

    // Signed by another key.
    let other = TestKey::es256();
    let t4 = token(&other, &nonce(), &rest_claims(&uri, now()));
    let r = send(&mock, &pki, host, true, ACCOUNTS, Some(&t4)).await;
    assert_401(&r, "signature");

    // Expired: nbf 200 s ago, so exp was 80 s ago.
    let t5 = token(&key, &nonce(), &rest_claims(&uri, now() - 200));
    let r = send(&mock, &pki, host, false, ACCOUNTS, Some(&t5)).await;
    assert_401(&r, "expired");

    // Not yet valid: nbf a minute in the future.
    let t6 = token(&key, &nonce(), &rest_claims(&uri, now() + 60));
    let r = send(&mock, &pki, host, false, ACCOUNTS, Some(&t6)).await;
    assert_401(&r, "not yet valid");

    assert_eq!(mock.requests().len(), 7);
    assert_eq!(mock.connections(), 7);
    // t1, t2, t3, t5, t6 passed the signature check; t4 did not.
    assert_eq!(mock.nonces_seen(), 5);
}

#[tokio::test]
async fn eddsa_tokens_are_verified() {
    let key = TestKey::ed25519();
    let (pki, mock) = start(Some(&key)).await;
    let host = "api.coinbase.com";
    let uri = format!("GET {host}{ACCOUNTS}");

    let t = token(&key, &nonce(), &rest_claims(&uri, now()));
    let r = send(&mock, &pki, host, true, ACCOUNTS, Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let rec = mock.requests();
    assert!(
        matches!(&rec[0].auth, AuthOutcome::Valid { alg, .. } if alg == "EdDSA"),
        "{:?}",
        rec[0].auth
    );

    // An ES256 token where an Ed25519 key is expected.
    let es = TestKey::es256();
    let t = token(&es, &nonce(), &rest_claims(&uri, now()));
    let r = send(&mock, &pki, host, false, ACCOUNTS, Some(&t)).await;
    assert_401(&r, "alg");
}

#[tokio::test]
async fn cdp_host_wants_uris() {
    let key = TestKey::es256();
    let (pki, mock) = start(Some(&key)).await;
    let host = "api.cdp.coinbase.com";
    let path = "/platform/v2/evm/accounts";
    let uri = format!("GET {host}{path}");

    let t = token(&key, &nonce(), &cdp_claims(&uri, now()));
    let r = send(&mock, &pki, host, false, path, Some(&t)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let rec = mock.requests();
    match &rec[0].auth {
        AuthOutcome::Valid { claims, .. } => assert_eq!(claims["uris"], json!([uri])),
        other => panic!("want Valid, got {other:?}"),
    }

    let t = token(&key, &nonce(), &rest_claims(&uri, now()));
    let r = send(&mock, &pki, host, true, path, Some(&t)).await;
    assert_401(&r, "uri");
}

#[tokio::test]
async fn public_paths_need_no_token() {
    let key = TestKey::es256();
    let (pki, mock) = start(Some(&key)).await;
    let host = "api.coinbase.com";

    let r = send(
        &mock,
        &pki,
        host,
        false,
        "/api/v3/brokerage/market/products",
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(mock.requests()[0].auth, AuthOutcome::Missing);

    let r = send(&mock, &pki, host, true, ACCOUNTS, None).await;
    assert_401(&r, "missing Authorization");
}

#[tokio::test]
async fn time_and_helper_endpoints() {
    let pki = Pki::new(&HOSTS);
    let opts = MockOptions {
        key: None,
        clock_offset_secs: 3600,
        ..Default::default()
    };
    let mock = MockCoinbase::start(&pki, opts).await;
    let host = "api.coinbase.com";

    let r = send(&mock, &pki, host, false, "/api/v3/brokerage/time", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    let secs: i64 = v["epochSeconds"]
        .as_str()
        .expect("string")
        .parse()
        .expect("int");
    assert!((secs - (now() + 3600)).abs() <= 2, "epochSeconds {secs}");
    assert_eq!(v["epochMillis"], (secs * 1000).to_string());
    assert_eq!(v["iso"], iso8601(secs));
    let date = r.headers[DATE].to_str().expect("ascii Date");
    assert_eq!(parse_http_date(date), Some(secs));

    // A token when the mock expects none.
    let key = TestKey::es256();
    let t = token(
        &key,
        &nonce(),
        &rest_claims("GET api.coinbase.com/x", now()),
    );
    let r = send(&mock, &pki, host, false, "/x", Some(&t)).await;
    assert_401(&r, "unexpected token");

    let market = "/api/v3/brokerage/market";
    let r = send(
        &mock,
        &pki,
        host,
        true,
        &format!("{market}/status/503"),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json(), json!({"status": 503}));

    let n = 200_000usize;
    let r = send(&mock, &pki, host, false, &format!("{market}/big/{n}"), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), n);
    assert!(r
        .body
        .iter()
        .enumerate()
        .all(|(i, b)| *b == (i % 251) as u8));

    let started = Instant::now();
    let r = send(
        &mock,
        &pki,
        host,
        false,
        &format!("{market}/slow-stream"),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers.get(CONTENT_LENGTH).is_none());
    assert_eq!(r.headers["transfer-encoding"], "chunked");
    assert_eq!(r.text(), "chunk-0\nchunk-1\nchunk-2\n");
    assert!(started.elapsed() >= Duration::from_millis(750));
}

#[test]
fn date_formatting() {
    assert_eq!(iso8601(1_700_000_000), "2023-11-14T22:13:20Z");
    assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(http_date(1_700_000_000), "Tue, 14 Nov 2023 22:13:20 GMT");
    assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    for t in [0, 951_782_400, 1_700_000_000, 4_102_444_800] {
        assert_eq!(parse_http_date(&http_date(t)), Some(t));
    }
}
