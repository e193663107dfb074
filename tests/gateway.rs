//! The derivatives gateway (`drb.coinbase.com/api/v2`): cbgate exchanges a CDP JWT at
//! `public/auth` once per key, refreshes before expiry and after a 401, answers a client's
//! own `public/auth` itself, and no client ever sees the token. The exchange JWT is compared
//! with the one ccxt 4.5.90 `coinbaseinternational.create_auth_token` builds.

mod common;

use std::process::Command;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use common::harness::{h1_client, send, Gate, KeyForm, TestKey, Upstream};
use common::mock::MockOptions;
use common::provision;
use http::Request;
use http_body_util::Full;
use serde_json::Value;

fn part(token: &str, i: usize) -> Value {
    let seg = token.split('.').nth(i).expect("segment");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(seg).expect("b64")).expect("json")
}

#[test]
fn exchange_jwt_has_the_claims_ccxt_builds() {
    for form in [KeyForm::P256Sec1, KeyForm::Ed25519B64_64] {
        let k = TestKey::generate(form);
        let dir = tempfile::tempdir().expect("dir");
        let key = cbgate::sign::key::KeySource::File(k.write_json(dir.path()))
            .load()
            .expect("key");
        let ours = cbgate::sign::jwt::mint_gateway_auth(
            &key,
            1_764_000_000,
            "drb.coinbase.com/api/v2/public/auth",
        )
        .expect("mint");
        let script = r#"
import json, sys, ccxt
e = ccxt.coinbaseinternational({'apiKey': sys.argv[1], 'secret': sys.argv[2]})
print(e.create_auth_token(1764000000, 'POST', 'https://drb.coinbase.com/api/v2/public/auth', e.is_eddsa_secret()))
"#;
        let out = Command::new(provision::sdk_python())
            .args(["-c", script, &k.name, &k.secret])
            .output()
            .expect("python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(part(&ours, 1), part(&theirs, 1), "{form:?} claims");
        let (mut h1, mut h2) = (part(&ours, 0), part(&theirs, 0));
        let (n1, n2) = (h1["nonce"].take(), h2["nonce"].take());
        assert_eq!(h1, h2, "{form:?} header");
        assert_eq!(n1.as_str().map(str::len), Some(32), "16 random bytes, hex");
        assert!(n2.is_string());
    }
}

fn post(gate: &Gate, path: &str, key: Option<&str>, body: &'static str) -> Request<Full<Bytes>> {
    let mut b =
        Request::post(format!("{}{path}", gate.url)).header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("cbgate-key", k);
    }
    b.body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request")
}

const SUMMARY: &str = r#"{"jsonrpc":"2.0","id":7,"method":"private/get_account_summary","params":{"currency":"BTC"}}"#;

#[tokio::test]
async fn tokens_are_exchanged_once_per_key_refreshed_and_never_shown() {
    let a = TestKey::generate(KeyForm::P256Sec1);
    let b = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = Upstream::start_with(MockOptions {
        key: Some(a.expected.clone()),
        also_accept: vec![b.expected.clone()],
        gateway_token_secs: 3,
        ..MockOptions::default()
    })
    .await;
    let dir_b = tempfile::tempdir().expect("dir");
    let mut cfg = up.config();
    cfg.keys.insert(
        "deriv-b".into(),
        cbgate::config::NamedKeyConfig {
            file: Some(b.write_json(dir_b.path())),
            ..Default::default()
        },
    );
    let gate = Gate::start(cfg, Some(&a)).await;
    let client = h1_client();
    let mut seen = String::new();

    // A client's own public/auth (as ccxt sends it) is answered by cbgate.
    let resp = send(
        &client,
        post(
            &gate,
            "/api/v2/public/auth",
            None,
            r#"{"jsonrpc":"2.0","id":42,"method":"public/auth","params":{"grant_type":"coinbase_cdp","token":"x"}}"#,
        ),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["id"], 42);
    assert_eq!(resp.json()["result"]["access_token"], "cbgate-managed");
    assert!(up.mock.gateway_auths().is_empty(), "not forwarded");
    seen.push_str(&resp.text());

    // Two calls with the default key: one exchange.
    for _ in 0..2 {
        let resp = send(
            &client,
            post(&gate, "/api/v2/private/get_account_summary", None, SUMMARY),
        )
        .await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        seen.push_str(&resp.text());
        seen.push_str(&format!("{:?}", resp.headers));
    }
    assert_eq!(up.mock.gateway_auths(), vec![a.name.clone()]);
    // Another key: its own exchange.
    let resp = send(
        &client,
        post(
            &gate,
            "/api/v2/private/get_account_summary",
            Some("deriv-b"),
            SUMMARY,
        ),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    seen.push_str(&resp.text());
    assert_eq!(
        up.mock.gateway_auths(),
        vec![a.name.clone(), b.name.clone()]
    );

    // Before the 3 s token expires (80% = 2.4 s), cbgate exchanges anew: the mock never
    // refuses an expired token.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let resp = send(
        &client,
        post(&gate, "/api/v2/private/get_account_summary", None, SUMMARY),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(up.mock.gateway_auths().len(), 3);
    assert_eq!(up.mock.gateway_refused(), 0);

    // A revoked token: the 401 is answered by a new exchange and one resend.
    up.mock.revoke_gateway_tokens();
    let resp = send(
        &client,
        post(&gate, "/api/v2/private/get_account_summary", None, SUMMARY),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    seen.push_str(&resp.text());
    assert_eq!(up.mock.gateway_refused(), 1);
    assert_eq!(up.mock.gateway_auths().len(), 4);

    // The trade ceiling (default) refuses a withdrawal by method name.
    let resp = send(
        &client,
        post(
            &gate,
            "/api/v2/private/withdraw",
            None,
            r#"{"jsonrpc":"2.0","id":1,"method":"private/withdraw","params":{}}"#,
        ),
    )
    .await;
    assert_eq!(resp.status, 403, "{}", resp.text());

    for token in up.mock.gateway_tokens() {
        assert!(!seen.contains(&token), "a client saw a gateway token");
    }
    gate.stop().await;
}
