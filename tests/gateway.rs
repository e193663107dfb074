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

fn call(
    gate: &Gate,
    method: &str,
    path_and_query: &str,
    body: &'static str,
) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("{}{path_and_query}", gate.url))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("request")
}

/// The gateway's orders (`private/buy`, `sell`, `edit`, block trades) meet the guard and the
/// kill switch like every other family's: in the query (ccxt's `GET`) or in the JSON-RPC
/// body; a body that names another call than the path, or a batch, is refused; nothing
/// refused reaches the mock.
#[tokio::test]
async fn gateway_orders_meet_the_guard_and_the_kill_switch() {
    let a = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&a)).await;
    let mut cfg = up.config();
    cfg.guard.products = vec!["BTC-PERPETUAL".into()];
    cfg.guard.require_post_only = true;
    let gate = Gate::start(cfg, Some(&a)).await;
    let client = h1_client();
    let buys = || {
        up.mock.requests_to("GET", "/api/v2/private/buy").len()
            + up.mock.requests_to("POST", "/api/v2/private/buy").len()
    };

    // ccxt's createOrder: GET with the parameters in the query.
    let ok = "/api/v2/private/buy?instrument_name=BTC-PERPETUAL&amount=10&type=limit&price=50000&post_only=true";
    let r = send(&client, call(&gate, "GET", ok, "")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(buys(), 1);

    let refused = [
        // Just outside each limit.
        ("GET", "/api/v2/private/buy?instrument_name=ETH-PERPETUAL&amount=10&type=limit&price=1&post_only=true", "", 403, "product ETH-PERPETUAL is not in guard.products"),
        ("GET", "/api/v2/private/buy?instrument_name=BTC-PERPETUAL&amount=10&type=limit&price=1", "", 403, "require_post_only"),
        ("GET", "/api/v2/private/buy?instrument_name=BTC-PERPETUAL&amount=10&type=market", "", 403, "require_post_only"),
        // The same in a JSON-RPC body, and under another spelling of the path.
        ("POST", "/api/v2/private/BUY", r#"{"jsonrpc":"2.0","id":1,"method":"private/buy","params":{"instrument_name":"ETH-PERPETUAL","amount":10,"type":"limit","price":1,"post_only":true}}"#, 403, "ETH-PERPETUAL"),
        // A call named only in the body is still that call.
        ("POST", "/api/v2/", r#"{"jsonrpc":"2.0","id":1,"method":"private/buy","params":{"instrument_name":"ETH-PERPETUAL","amount":1}}"#, 403, ""),
        // A body naming another call than the path, and a batch: which one would run?
        ("POST", "/api/v2/private/get_position", r#"{"jsonrpc":"2.0","id":1,"method":"private/buy","params":{"instrument_name":"ETH-PERPETUAL","amount":1}}"#, 400, "calls \"private/buy\" but the path calls \"private/get_position\""),
        ("POST", "/api/v2/private/get_position", r#"[{"jsonrpc":"2.0","id":1,"method":"private/buy","params":{}}]"#, 400, "batch"),
        // Parameters in two places, one of which the guard would not read.
        ("POST", "/api/v2/private/buy?instrument_name=BTC-PERPETUAL&post_only=true", r#"{"jsonrpc":"2.0","id":1,"method":"private/buy","params":{"instrument_name":"ETH-PERPETUAL"}}"#, 400, "both the query and the body"),
        // A block trade's product is not in the request, and products is set.
        ("POST", "/api/v2/private/execute_block_trade", r#"{"jsonrpc":"2.0","id":1,"method":"private/execute_block_trade","params":{"trades":[]}}"#, 403, "block trade's product is not in the request"),
    ];
    for (method, path, body, status, says) in refused {
        let r = send(&client, call(&gate, method, path, body)).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains(says), "{method} {path}: {message}");
    }
    assert_eq!(buys(), 1, "nothing refused reached the gateway");
    assert!(up
        .mock
        .requests_to("POST", "/api/v2/private/execute_block_trade")
        .is_empty());

    // Halted: orders get 423, a cancel and a read pass.
    gate.proxy.halt("gateway drill").expect("halt");
    let r = send(&client, call(&gate, "GET", ok, "")).await;
    assert_eq!(r.status, 423, "{}", r.text());
    assert!(r.text().contains("gateway drill"), "{}", r.text());
    let r = send(
        &client,
        call(
            &gate,
            "GET",
            "/api/v2/private/edit?order_id=1&amount=5&price=1",
            "",
        ),
    )
    .await;
    assert_eq!(r.status, 423, "{}", r.text());
    for path in [
        "/api/v2/private/cancel_all",
        "/api/v2/private/get_open_orders_by_instrument?instrument_name=BTC-PERPETUAL",
    ] {
        let r = send(&client, call(&gate, "GET", path, "")).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    assert_eq!(buys(), 1);
    assert!(up
        .mock
        .requests_to("GET", "/api/v2/private/edit")
        .is_empty());
    assert_eq!(
        up.mock
            .requests_to("GET", "/api/v2/private/cancel_all")
            .len(),
        1
    );
    gate.stop().await;
}

/// A size limit cannot be applied to a gateway order (its amount is USD or base currency
/// depending on the instrument): the order is refused with the reason, not waved through.
#[tokio::test]
async fn a_size_limit_refuses_gateway_orders_it_cannot_value() {
    let a = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&a)).await;
    let mut cfg = up.config();
    cfg.guard.max_order_quote = Some("1000".parse().expect("decimal"));
    let gate = Gate::start(cfg, Some(&a)).await;
    let r = send(
        &h1_client(),
        call(
            &gate,
            "GET",
            "/api/v2/private/sell?instrument_name=BTC-PERPETUAL&amount=10&type=limit&price=50000",
            "",
        ),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.cbgate_error(), Some("guard_denied"));
    assert!(
        r.text()
            .contains("guard.max_order_base / max_order_quote is set"),
        "{}",
        r.text()
    );
    assert!(up
        .mock
        .requests_to("GET", "/api/v2/private/sell")
        .is_empty());
    gate.stop().await;
}

/// ccxt 4.5.90's own requests (`coinbaseinternational`'s `privateGetBuy`, as its
/// `createOrder` sends it: a GET with the parameters in the query)
/// meet the guard: the allowed order reaches the gateway, the others are refused with
/// ccxt's error carrying cbgate's sentence.
#[test]
fn ccxt_orders_meet_the_guard() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let a = TestKey::generate(KeyForm::P256Sec1);
    // ccxt needs some key to build its own public/auth JWT; cbgate answers that call itself.
    let client_key = TestKey::generate(KeyForm::P256Sec1);
    let (up, gate) = rt.block_on(async {
        let up = Upstream::start(Some(&a)).await;
        let mut cfg = up.config();
        cfg.guard.products = vec!["BTC-PERPETUAL".into()];
        cfg.guard.require_post_only = true;
        let gate = Gate::start(cfg, Some(&a)).await;
        (up, gate)
    });
    let script = r#"
import json, sys, ccxt
e = ccxt.coinbaseinternational({'apiKey': sys.argv[2], 'secret': sys.argv[3]})
e.urls['api']['rest'] = sys.argv[1] + '/api/v2'
# createOrder first calls authenticate_v2, whose public/auth cbgate answers with its
# placeholder; ccxt 4.5.90's sign() fails on that POST (it extends None headers), so the
# token it would have cached is set here.
e.options['v2AccessToken'] = 'cbgate-managed'
e.options['v2TokenExpires'] = e.milliseconds() + 3600 * 1000
for instrument, post_only in [('BTC-PERPETUAL', True), ('ETH-PERPETUAL', True), ('BTC-PERPETUAL', False)]:
    params = {'instrument_name': instrument, 'amount': 10, 'type': 'limit', 'price': '50000', 'label': 'bot-1'}
    if post_only:
        params['post_only'] = True
        params['reject_post_only'] = True
    try:
        e.privateGetBuy(params)
        print(json.dumps({'ok': True}))
    except Exception as err:
        print(json.dumps({'ok': False, 'error': type(err).__name__, 'message': str(err)}))
"#;
    let out = Command::new(provision::sdk_python())
        .args([
            "-c",
            script,
            &gate.url,
            &client_key.name,
            &client_key.secret,
        ])
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["ok"], true, "{lines:?}");
    for (l, says) in lines[1..].iter().zip([
        "product ETH-PERPETUAL is not in guard.products",
        "require_post_only",
    ]) {
        assert_eq!(l["ok"], false, "{lines:?}");
        assert!(
            l["message"].as_str().is_some_and(|m| m.contains(says)),
            "{l}"
        );
    }
    let buys = up.mock.requests_to("GET", "/api/v2/private/buy");
    assert_eq!(buys.len(), 1, "only the allowed order reached the gateway");
    assert!(buys[0]
        .path_and_query
        .contains("instrument_name=BTC-PERPETUAL"));
    assert!(
        up.mock.gateway_auths().len() <= 1,
        "cbgate exchanged at most once"
    );
    rt.block_on(gate.stop());
}
