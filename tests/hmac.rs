//! Named credentials and the HMAC families (Exchange, Prime, INTX), end to end: cbgate signs,
//! the mock verifies (signature, timestamp window, exact body bytes), and an implementation
//! cbgate did not write computes the same signature for the same inputs: ccxt 4.5.90 Python
//! `coinbaseexchange` (REST and the WebSocket subscribe), ccxt 4.5.84 npm
//! `coinbaseinternational` (its INTX REST signer; 4.5.90 moved that class to the derivatives
//! gateway), and Coinbase's documented Python example for Prime (ccxt has no Prime class).

mod common;

use std::path::Path;
use std::process::Command;

use bytes::Bytes;
use common::harness::{
    self, h1_client, send, write_private, Gate, KeyForm, Resp, TestKey, Upstream,
};
use common::mock::{AuthOutcome, ExpectedHmac, MockOptions, Recorded};
use common::provision;
use http::Request;
use http_body_util::Full;

const EX_SECRET: &str =
    "dGhpcyBpcyBhIHRlc3Qgc2VjcmV0IGZvciBjYmdhdGUncyBFeGNoYW5nZSBzaWduZXIsIDY0IGJ5dGVzIGxvbmchIQ==";
const INTX_SECRET: &str =
    "aW50eCB0ZXN0IHNlY3JldDogbm90IGEgcmVhbCBrZXksIGJ1dCA2NCBieXRlcyBvZiBiYXNlNjQgaW5wdXQgLi4uIQ==";
const PRIME_SECRET: &str = "prime-signing-key-7f3a9c1e5b2d8a6f4c0e1b3d5a7c9e2f";

fn expected() -> Vec<ExpectedHmac> {
    vec![
        ExpectedHmac {
            family: "exchange",
            key: "ex-key-1".into(),
            secret: EX_SECRET.into(),
            passphrase: "ex-pass".into(),
        },
        ExpectedHmac {
            family: "prime",
            key: "prime-access-1".into(),
            secret: PRIME_SECRET.into(),
            passphrase: "prime-pass".into(),
        },
        ExpectedHmac {
            family: "intx",
            key: "intx-key-1".into(),
            secret: INTX_SECRET.into(),
            passphrase: "intx-pass".into(),
        },
    ]
}

/// Writes the three HMAC key files in the portals' / SDKs' spellings and returns a config
/// naming them `ex`, `pr` and `ix`.
fn hmac_config(up: &Upstream, dir: &Path) -> cbgate::config::Config {
    let ex = write_private(
        dir,
        "exchange.json",
        format!(r#"{{"key": "ex-key-1", "secret": "{EX_SECRET}", "passphrase": "ex-pass"}}"#)
            .as_bytes(),
    );
    let pr = write_private(
        dir,
        "prime.json",
        format!(
            r#"{{"accessKey": "prime-access-1", "signingKey": "{PRIME_SECRET}", "passphrase": "prime-pass", "portfolioId": "p-1", "svcAccountId": "s-1"}}"#
        )
        .as_bytes(),
    );
    let ix = write_private(
        dir,
        "intx.json",
        format!(
            r#"{{"apiKey": "intx-key-1", "apiSecret": "{INTX_SECRET}", "passphrase": "intx-pass"}}"#
        )
        .as_bytes(),
    );
    let text = format!(
        "[keys.ex]\nkind = \"exchange\"\nfile = {:?}\n[keys.pr]\nkind = \"prime\"\nfile = {:?}\n[keys.ix]\nkind = \"intx\"\nfile = {:?}\n",
        ex, pr, ix
    );
    let parsed = cbgate::config::Config::from_toml_str(&text).expect("keys config");
    let mut cfg = up.config();
    cfg.keys = parsed.keys;
    cfg
}

fn request(
    gate: &Gate,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &'static str,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("{}{path}", gate.url));
    if let Some(k) = key {
        b = b.header("cbgate-key", k);
    }
    if !body.is_empty() {
        b = b.header("content-type", "application/json");
    }
    b.body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request")
}

fn last(up: &Upstream) -> Recorded {
    up.mock
        .requests()
        .pop()
        .expect("a request reached the mock")
}

fn header(r: &Recorded, name: &str) -> String {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("{name} missing"))
        .to_owned()
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// ccxt Python `coinbaseexchange.sign()` for the given timestamp: prints body and signature.
fn ccxt_exchange(ts: &str, method: &str, path: &str, params: &str) -> serde_json::Value {
    let script = r#"
import json, sys, ccxt
ts, method, path, params = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
e = ccxt.coinbaseexchange({'apiKey': 'ex-key-1', 'secret': sys.argv[5], 'password': 'ex-pass'})
e.nonce = lambda: int(ts)
r = e.sign(path, ['private'], method, params)
print(json.dumps({'url': r['url'], 'body': r['body'], 'headers': r['headers']}))
"#;
    let out = run_ok(
        Command::new(provision::sdk_python())
            .args(["-c", script, ts, method, path, params, EX_SECRET]),
        "ccxt coinbaseexchange",
    );
    serde_json::from_str(&out).expect("ccxt output")
}

/// ccxt npm `coinbaseinternational.sign()` (its INTX REST signer) for the given timestamp.
fn ccxt_intx(ts: &str, method: &str, path: &str, params: &str) -> serde_json::Value {
    let script = r#"
const ccxt = require('ccxt');
const [ts, method, path, params, secret] = process.argv.slice(1);
const e = new ccxt.coinbaseinternational({apiKey: 'intx-key-1', secret, password: 'intx-pass'});
e.nonce = () => Number(ts);
const r = e.sign(path, ['v1', 'private'], method, JSON.parse(params));
console.log(JSON.stringify({url: r.url, body: r.body === undefined ? null : r.body, headers: r.headers}));
"#;
    let out = run_ok(
        Command::new("node")
            .current_dir(provision::sdk_node())
            .args(["-e", script, ts, method, path, params, INTX_SECRET]),
        "ccxt coinbaseinternational",
    );
    serde_json::from_str(&out).expect("ccxt output")
}

/// Coinbase's documented Prime signing example (Prime REST API docs, "Signing Requests"):
///   message = timestamp + method + url_path + body
///   signature_b64 = base64.b64encode(hmac.digest(SIGNING_KEY.encode(), message.encode(), hashlib.sha256))
fn documented_prime(ts: &str, method: &str, url_path: &str, body: &str) -> String {
    let script = r#"
import base64, hashlib, hmac, sys
timestamp, method, url_path, body, SIGNING_KEY = sys.argv[1:6]
message = timestamp + method + url_path + body
print(base64.b64encode(hmac.digest(SIGNING_KEY.encode(), message.encode(), hashlib.sha256)).decode())
"#;
    run_ok(
        Command::new(provision::sdk_python()).args([
            "-c",
            script,
            ts,
            method,
            url_path,
            body,
            PRIME_SECRET,
        ]),
        "Coinbase's Prime example",
    )
}

fn assert_valid(r: &Recorded, key: &str) {
    match &r.auth {
        AuthOutcome::Valid { kid, .. } => assert_eq!(kid, key),
        other => panic!("mock did not accept the signature: {other:?}"),
    }
}

const ORDER: &str = r#"{"size":"0.01","price":"100.5","side":"buy","product_id":"BTC-USD"}"#;

#[tokio::test]
async fn exchange_signature_matches_ccxt_and_the_mock() {
    let up = Upstream::start_with(MockOptions {
        hmac: expected(),
        ..MockOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let gate = Gate::start(hmac_config(&up, dir.path()), None).await;
    let client = h1_client();

    // POST with a body: the mock checks the exact bytes; ccxt must build the same body.
    let resp = send(
        &client,
        request(&gate, "POST", "/exchange/orders", Some("ex"), ORDER),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let r = last(&up);
    assert_valid(&r, "ex-key-1");
    assert_eq!(r.path_and_query, "/orders", "prefix stripped");
    assert_eq!(&r.body[..], ORDER.as_bytes());
    assert!(
        r.headers.get("cbgate-key").is_none(),
        "cbgate-key forwarded"
    );
    assert!(r.headers.get("authorization").is_none());
    let ts = header(&r, "cb-access-timestamp");
    let c = ccxt_exchange(&ts, "POST", "orders", ORDER);
    assert_eq!(c["body"].as_str(), Some(ORDER), "ccxt builds the same body");
    assert_eq!(
        c["headers"]["CB-ACCESS-SIGN"].as_str(),
        Some(header(&r, "cb-access-sign").as_str())
    );
    assert_eq!(c["headers"]["CB-ACCESS-KEY"], "ex-key-1");
    assert_eq!(
        c["headers"]["CB-ACCESS-PASSPHRASE"].as_str(),
        Some(header(&r, "cb-access-passphrase").as_str())
    );

    // GET with a query: Exchange signs the query too.
    let resp = send(
        &client,
        request(
            &gate,
            "GET",
            "/exchange/orders?status=open&limit=5",
            Some("ex"),
            "",
        ),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let r = last(&up);
    assert_valid(&r, "ex-key-1");
    assert_eq!(r.path_and_query, "/orders?status=open&limit=5");
    let ts = header(&r, "cb-access-timestamp");
    let c = ccxt_exchange(&ts, "GET", "orders", r#"{"status":"open","limit":"5"}"#);
    assert!(
        c["url"]
            .as_str()
            .unwrap_or("")
            .ends_with("/orders?status=open&limit=5"),
        "{c}"
    );
    assert_eq!(
        c["headers"]["CB-ACCESS-SIGN"].as_str(),
        Some(header(&r, "cb-access-sign").as_str())
    );

    // The timestamp window: a server clock 40 s ahead refuses the signature.
    up.mock.set_clock_offset(40);
    let resp = send(
        &client,
        request(&gate, "GET", "/exchange/accounts", Some("ex"), ""),
    )
    .await;
    assert_eq!(resp.status, 401, "{}", resp.text());
    assert!(matches!(last(&up).auth, AuthOutcome::Invalid(ref w) if w.contains("window")));
    gate.stop().await;
}

#[tokio::test]
async fn intx_signature_matches_ccxt_and_the_mock() {
    let up = Upstream::start_with(MockOptions {
        hmac: expected(),
        ..MockOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let mut cfg = hmac_config(&up, dir.path());
    // By route this time: no header needed.
    for r in &mut cfg.routes {
        if r.prefix == "/intx/" {
            r.key = Some("ix".into());
        }
    }
    let gate = Gate::start(cfg, None).await;
    let client = h1_client();
    let resp = send(
        &client,
        request(&gate, "POST", "/intx/api/v1/orders", None, ORDER),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let r = last(&up);
    assert_valid(&r, "intx-key-1");
    assert_eq!(r.path_and_query, "/api/v1/orders");
    assert_eq!(&r.body[..], ORDER.as_bytes());
    let ts = header(&r, "cb-access-timestamp");
    let c = ccxt_intx(&ts, "POST", "orders", ORDER);
    assert_eq!(c["body"].as_str(), Some(ORDER));
    assert_eq!(
        c["headers"]["CB-ACCESS-SIGN"].as_str(),
        Some(header(&r, "cb-access-sign").as_str())
    );

    // GET with a query: INTX signs the path without it.
    let resp = send(
        &client,
        request(
            &gate,
            "GET",
            "/intx/api/v1/orders?portfolio=p1&limit=2",
            None,
            "",
        ),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let r = last(&up);
    assert_valid(&r, "intx-key-1");
    let ts = header(&r, "cb-access-timestamp");
    let c = ccxt_intx(&ts, "GET", "orders", r#"{"portfolio":"p1","limit":"2"}"#);
    assert!(
        c["url"]
            .as_str()
            .unwrap_or("")
            .ends_with("/api/v1/orders?portfolio=p1&limit=2"),
        "{c}"
    );
    assert_eq!(
        c["headers"]["CB-ACCESS-SIGN"].as_str(),
        Some(header(&r, "cb-access-sign").as_str())
    );

    // INTX's window is 5 s.
    up.mock.set_clock_offset(7);
    let resp = send(
        &client,
        request(&gate, "GET", "/intx/api/v1/portfolios", None, ""),
    )
    .await;
    assert_eq!(resp.status, 401, "{}", resp.text());
    gate.stop().await;
}

#[tokio::test]
async fn prime_signature_matches_coinbases_example_and_the_mock() {
    let up = Upstream::start_with(MockOptions {
        hmac: expected(),
        ..MockOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let gate = Gate::start(hmac_config(&up, dir.path()), None).await;
    let client = h1_client();
    let body = r#"{"portfolio_id":"p1","product_id":"BTC-USD","side":"BUY","type":"MARKET","base_quantity":"0.001"}"#;
    let resp = send(
        &client,
        request(
            &gate,
            "POST",
            "/prime/v1/portfolios/p1/order",
            Some("pr"),
            body,
        ),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let r = last(&up);
    assert_valid(&r, "prime-access-1");
    assert_eq!(&r.body[..], body.as_bytes());
    let ts = header(&r, "x-cb-access-timestamp");
    assert_eq!(
        documented_prime(&ts, "POST", "/v1/portfolios/p1/order", body),
        header(&r, "x-cb-access-signature")
    );
    // A query is not signed.
    let resp = send(
        &client,
        request(
            &gate,
            "GET",
            "/prime/v1/portfolios/p1/orders?order_statuses=OPEN",
            Some("pr"),
            "",
        ),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let r = last(&up);
    assert_valid(&r, "prime-access-1");
    let ts = header(&r, "x-cb-access-timestamp");
    assert_eq!(
        documented_prime(&ts, "GET", "/v1/portfolios/p1/orders", ""),
        header(&r, "x-cb-access-signature")
    );
    gate.stop().await;
}

/// Exchange's WebSocket signed subscribe fields equal ccxt.pro's `authenticate()`.
#[test]
fn exchange_ws_subscribe_fields_match_ccxt_pro() {
    let key = cbgate::sign::hmac::HmacKey::from_parts(
        cbgate::config::KeyKind::Exchange,
        "ex-key-1",
        EX_SECRET,
        "ex-pass",
    )
    .expect("key");
    let ours = key.ws_subscribe_fields(1_764_000_000);
    let script = r#"
import json, sys, ccxt.pro
e = ccxt.pro.coinbaseexchange({'apiKey': 'ex-key-1', 'secret': sys.argv[1], 'password': 'ex-pass'})
e.nonce = lambda: 1764000000
print(json.dumps(e.authenticate()))
"#;
    let out = run_ok(
        Command::new(provision::sdk_python()).args(["-c", script, EX_SECRET]),
        "ccxt.pro coinbaseexchange",
    );
    let theirs: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(theirs["signature"], ours["signature"]);
    assert_eq!(theirs["key"], ours["key"]);
    assert_eq!(theirs["passphrase"], ours["passphrase"]);
    assert_eq!(
        theirs["timestamp"].to_string().trim_matches('"'),
        "1764000000"
    );
    assert_eq!(ours["timestamp"], "1764000000");
}

#[tokio::test]
async fn two_cdp_keys_by_header_and_by_route() {
    let a = TestKey::generate(KeyForm::P256Sec1);
    let b = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = Upstream::start_with(MockOptions {
        key: Some(a.expected.clone()),
        also_accept: vec![b.expected.clone()],
        ..MockOptions::default()
    })
    .await;
    let dir_b = tempfile::tempdir().expect("dir");
    let b_file = b.write_json(dir_b.path());
    let mut cfg = up.config();
    cfg.keys.insert(
        "portfolio-b".into(),
        cbgate::config::NamedKeyConfig {
            file: Some(b_file),
            ..Default::default()
        },
    );
    let mut by_route = cbgate::config::RouteConfig::new(
        "/api/v3/brokerage/portfolios",
        "https://api.coinbase.com",
    );
    by_route.key = Some("portfolio-b".into());
    cfg.routes.push(by_route);
    cfg.validate().expect("valid");
    let gate = Gate::start(cfg, Some(&a)).await;
    let client = h1_client();
    let signed_by = |r: &Recorded| match &r.auth {
        AuthOutcome::Valid { kid, alg, .. } => (kid.clone(), alg.clone()),
        other => panic!("not verified: {other:?}"),
    };
    for (path, header, want, alg) in [
        ("/api/v3/brokerage/accounts", None, &a.name, "ES256"),
        (
            "/api/v3/brokerage/accounts",
            Some("portfolio-b"),
            &b.name,
            "EdDSA",
        ),
        ("/api/v3/brokerage/portfolios", None, &b.name, "EdDSA"),
        (
            "/api/v3/brokerage/portfolios",
            Some("default"),
            &a.name,
            "ES256",
        ),
    ] {
        let resp = send(&client, request(&gate, "GET", path, header, "")).await;
        assert_eq!(resp.status, 200, "{path} {header:?}: {}", resp.text());
        let r = last(&up);
        assert_eq!(
            signed_by(&r),
            (want.clone(), alg.to_owned()),
            "{path} {header:?}"
        );
        assert!(r.headers.get("cbgate-key").is_none());
    }
    gate.stop().await;
}

#[tokio::test]
async fn wrong_or_unknown_key_is_a_clear_error_and_nothing_is_sent() {
    let a = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start_with(MockOptions {
        key: Some(a.expected.clone()),
        hmac: expected(),
        ..MockOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let gate = Gate::start(hmac_config(&up, dir.path()), Some(&a)).await;
    let client = h1_client();
    let cases: [(&str, Option<&str>, &str, &str); 4] = [
        (
            "/api/v3/brokerage/accounts",
            Some("nope"),
            "unknown_key",
            "nope",
        ),
        (
            "/api/v3/brokerage/accounts",
            Some("ex"),
            "key_kind_mismatch",
            "exchange",
        ),
        ("/exchange/accounts", None, "key_kind_mismatch", "default"),
        (
            "/prime/v1/portfolios",
            Some("ex"),
            "key_kind_mismatch",
            "prime",
        ),
    ];
    for (path, key, code, word) in cases {
        let resp: Resp = send(&client, request(&gate, "GET", path, key, "")).await;
        assert_eq!(resp.status, 400, "{path}");
        assert_eq!(resp.cbgate_error(), Some(code), "{path}: {}", resp.text());
        assert!(resp.text().contains(word), "{path}: {}", resp.text());
    }
    assert!(up.mock.requests().is_empty(), "nothing reached Coinbase");
    gate.stop().await;
}

#[tokio::test]
async fn hmac_families_have_view_trade_transfer_ceilings() {
    let up = Upstream::start_with(MockOptions {
        hmac: expected(),
        ..MockOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let cfg = hmac_config(&up, dir.path());
    assert_eq!(cfg.policy.permission, cbgate::config::Permission::Trade);
    let gate = Gate::start(cfg, None).await;
    let client = h1_client();
    for (method, path, key, allowed) in [
        ("POST", "/exchange/orders", "ex", true),
        ("DELETE", "/exchange/orders/o-1", "ex", true),
        ("POST", "/exchange/withdrawals/crypto", "ex", false),
        ("POST", "/exchange/profiles/transfer", "ex", false),
        ("POST", "/exchange/conversions", "ex", false),
        ("POST", "/prime/v1/portfolios/p1/order", "pr", true),
        (
            "POST",
            "/prime/v1/portfolios/p1/wallets/w1/withdrawals",
            "pr",
            false,
        ),
        ("POST", "/prime/v1/portfolios/p1/address_book", "pr", false),
        ("POST", "/intx/api/v1/orders", "ix", true),
        ("POST", "/intx/api/v1/transfers/withdraw", "ix", false),
        ("POST", "/intx/API/v1/Transfers/withdraw", "ix", false),
    ] {
        let body = if method == "POST" { ORDER } else { "" };
        let resp = send(&client, request(&gate, method, path, Some(key), body)).await;
        if allowed {
            assert_eq!(resp.status, 200, "{method} {path}: {}", resp.text());
        } else {
            assert_eq!(resp.status, 403, "{method} {path}: {}", resp.text());
            assert_eq!(resp.cbgate_error(), Some("policy_denied"));
        }
    }
    gate.stop().await;
}

#[tokio::test]
async fn a_rotated_hmac_key_is_used_and_a_bad_one_is_refused() {
    let mut hmac = expected();
    hmac.push(ExpectedHmac {
        family: "exchange",
        key: "ex-key-2".into(),
        secret: INTX_SECRET.into(),
        passphrase: "ex-pass-2".into(),
    });
    let up = Upstream::start_with(MockOptions {
        hmac,
        ..MockOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let gate = Gate::start(hmac_config(&up, dir.path()), None).await;
    let client = h1_client();
    let reloader = cbgate::ops::reload::KeyReloader::new(None, false);
    write_private(
        dir.path(),
        "exchange.json",
        format!(r#"{{"key": "ex-key-2", "secret": "{INTX_SECRET}", "passphrase": "ex-pass-2"}}"#)
            .as_bytes(),
    );
    reloader.reload_named(&gate.proxy, "test", false);
    let resp = send(
        &client,
        request(&gate, "GET", "/exchange/accounts", Some("ex"), ""),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_valid(&last(&up), "ex-key-2");
    // A broken file leaves the last good key in use.
    write_private(dir.path(), "exchange.json", b"{\"key\": \"ex-key-3\"}");
    reloader.reload_named(&gate.proxy, "test", false);
    let resp = send(
        &client,
        request(&gate, "GET", "/exchange/accounts", Some("ex"), ""),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_valid(&last(&up), "ex-key-2");
    let metrics = gate.proxy.metrics().render();
    assert!(
        metrics.contains(r#"cbgate_credential_reloads_total{key="ex",result="ok"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"cbgate_credential_reloads_total{key="ex",result="failed"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"cbgate_credential{key="pr",kind="prime"} 1"#),
        "{metrics}"
    );
    gate.stop().await;
}

/// `cbgate check` with a bad HMAC key file: one line naming the problem and the credential,
/// exit status 2 or 1, and no 16-character window of the secret anywhere in the output.
#[test]
fn bad_hmac_key_files_get_one_clear_line_without_the_secret() {
    let dir = tempfile::tempdir().expect("dir");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "exchange",
            format!(r#"{{"key": "k1", "secret": "{EX_SECRET}"}}"#),
            "no passphrase field",
        ),
        (
            "exchange",
            format!(r#"{{"key": "k1", "secret": "{EX_SECRET}", "passphrase": "p""#),
            "not valid JSON",
        ),
        (
            "exchange",
            format!(r#"{{"key": "k1", "secret": "~{EX_SECRET}", "passphrase": "p"}}"#),
            "not valid base64",
        ),
        ("exchange", EX_SECRET.to_owned(), "bare text"),
        (
            "intx",
            format!(r#"{{"key": "{INTX_SECRET}", "secret": "k1", "passphrase": "p"}}"#),
            "swapped",
        ),
        (
            "prime",
            format!(
                r#"{{"accessKey": "a", "passphrase": "p", "secret": 7, "x": "{PRIME_SECRET}"}}"#
            ),
            "must be a string",
        ),
        (
            "prime",
            format!(r#"{{"name": "organizations/o/apiKeys/k", "privateKey": "{PRIME_SECRET}"}}"#),
            "kind = \"cdp\"",
        ),
    ];
    for (i, (kind, text, want)) in cases.iter().enumerate() {
        let file = write_private(dir.path(), &format!("k{i}.json"), text.as_bytes());
        let config = dir.path().join(format!("c{i}.toml"));
        std::fs::write(
            &config,
            format!("[keys.trader]\nkind = \"{kind}\"\nfile = {file:?}\n"),
        )
        .expect("write config");
        let out = harness::cbgate_command()
            .args(["check", "--config"])
            .arg(&config)
            .env_remove("COINBASE_API_KEY")
            .env_remove("COINBASE_API_SECRET")
            .output()
            .expect("run cbgate check");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{want}: {all}");
        assert!(
            all.contains(want) && all.contains("trader"),
            "{want}: {all}"
        );
        assert_eq!(all.trim().lines().count(), 1, "one line: {all}");
        for secret in [EX_SECRET, INTX_SECRET, PRIME_SECRET] {
            harness::assert_no_secret(&all, secret, want);
        }
    }
}
