//! Trading safety over real sockets against the realistic mock: the pre-trade guard (`[guard]`)
//! lets each order just under a limit through and refuses the one just over, before signing, so
//! nothing refused reaches the mock; and the kill switch (`cbgate halt` / `resume` / `status`,
//! `POST /halt` on the admin listener) refuses orders with 423, lets cancels pass, survives a
//! restart, and `--cancel-open` cancels exactly the open orders Coinbase lists.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use common::harness::{
    self, cbgate_command, free_port, h1_client, http_get, Gate, KeyForm, Process, Resp, TestKey,
    Upstream,
};
use common::mock::{AuthOutcome, GatewayAuthMode, MockOptions};

const ORDERS: &str = "/api/v3/brokerage/orders";

async fn realistic(key: &TestKey) -> Upstream {
    Upstream::start_with(MockOptions {
        key: Some(key.expected.clone()),
        realistic: true,
        prices: vec![
            ("BTC-USD".into(), "50000.00".into()),
            ("ETH-USD".into(), "2500".into()),
        ],
        ..MockOptions::default()
    })
    .await
}

fn dec(s: &str) -> rust_decimal::Decimal {
    s.parse().expect("decimal")
}

async fn post(base: &str, path: &str, body: &str) -> Resp {
    let req = Request::post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    harness::send(&h1_client(), req).await
}

fn order(product: &str, side: &str, kind: &str, conf: Value) -> String {
    json!({
        "client_order_id": "c-1",
        "product_id": product,
        "side": side,
        "order_configuration": { kind: conf },
    })
    .to_string()
}

fn limit(product: &str, base: &str, price: &str) -> String {
    order(
        product,
        "BUY",
        "limit_limit_gtc",
        json!({"base_size": base, "limit_price": price, "post_only": false}),
    )
}

/// A refusal by the guard: 403 guard_denied in Advanced Trade's error shape, naming `words`.
fn assert_denied(r: &Resp, words: &[&str]) {
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert_eq!(r.cbgate_error(), Some("guard_denied"));
    let v = r.json();
    assert_eq!(v["error"], "guard_denied");
    let msg = v["message"].as_str().expect("message");
    assert_eq!(v["error_details"], msg);
    for w in words {
        assert!(msg.contains(w), "{msg:?} should name {w:?}");
    }
}

fn assert_placed(r: &Resp) {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["success"], true, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_passes_just_under_and_refuses_just_over() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = realistic(&key).await;
    let mut cfg = up.config();
    cfg.guard.products = vec!["BTC-USD".into(), "ETH-USD".into(), "DOGE-USD".into()];
    cfg.guard.max_order_base = Some(dec("0.5"));
    cfg.guard.max_order_quote = Some(dec("1000"));
    cfg.guard.sides = vec!["BUY".into()];
    cfg.guard.order_types = vec!["limit".into(), "market".into()];
    // Long enough that two orders in this test share one fetched price, however slow the host.
    cfg.guard.price_max_age = Duration::from_secs(600);
    let gate = Gate::start(cfg, Some(&key)).await;
    let u = &gate.url;
    let mut placed = 0;

    // max_order_quote on a limit order: base_size x limit_price, exactly.
    assert_placed(&post(u, ORDERS, &limit("BTC-USD", "0.02", "49999.99")).await);
    assert_placed(&post(u, ORDERS, &limit("BTC-USD", "0.02", "50000")).await);
    placed += 2;
    let r = post(u, ORDERS, &limit("BTC-USD", "0.02", "50000.01")).await;
    assert_denied(&r, &["guard.max_order_quote is 1000", "1000.0002"]);

    // max_order_base.
    assert_placed(&post(u, ORDERS, &limit("ETH-USD", "0.5", "1")).await);
    placed += 1;
    let r = post(u, ORDERS, &limit("ETH-USD", "0.50000001", "1")).await;
    assert_denied(&r, &["guard.max_order_base is 0.5", "0.50000001"]);

    // Market order in quote size: the quote is direct.
    let market = |product: &str, field: &str, v: &str| {
        order(product, "BUY", "market_market_ioc", json!({ field: v }))
    };
    assert_placed(&post(u, ORDERS, &market("BTC-USD", "quote_size", "1000")).await);
    placed += 1;
    let r = post(u, ORDERS, &market("BTC-USD", "quote_size", "1000.01")).await;
    assert_denied(&r, &["max_order_quote", "1000.01"]);

    // Market order in base size: priced from the mock's product endpoint (50000).
    assert_placed(&post(u, ORDERS, &market("BTC-USD", "base_size", "0.02")).await);
    placed += 1;
    let r = post(u, ORDERS, &market("BTC-USD", "base_size", "0.0200001")).await;
    assert_denied(&r, &["max_order_quote", "current price", "1000.005"]);
    // One fetch served both (cached), through cbgate's upstream client.
    let fetches = up
        .mock
        .requests_to("GET", "/api/v3/brokerage/market/products/BTC-USD");
    assert_eq!(fetches.len(), 1, "price fetched once and cached");
    // Market in quote size against max_order_base: 1250 / 2500 = 0.5 base... but the quote
    // limit refuses first, so use a product whose base limit bites: 1000 / 2500 = 0.4 passes.
    assert_placed(&post(u, ORDERS, &market("ETH-USD", "quote_size", "1000")).await);
    placed += 1;

    // A product without a price (the endpoint answers 404): refused, not waved through.
    let r = post(u, ORDERS, &market("DOGE-USD", "base_size", "1")).await;
    assert_denied(&r, &["cannot be determined", "DOGE-USD"]);
    // A product outside the allow-list.
    let r = post(u, ORDERS, &limit("SOL-USD", "0.01", "1")).await;
    assert_denied(&r, &["product SOL-USD is not in guard.products"]);
    // Sides and order types.
    let sell = order(
        "BTC-USD",
        "SELL",
        "limit_limit_gtc",
        json!({"base_size": "0.01", "limit_price": "1"}),
    );
    assert_denied(&post(u, ORDERS, &sell).await, &["side SELL", "guard.sides"]);
    let stop = order(
        "BTC-USD",
        "BUY",
        "stop_limit_stop_limit_gtc",
        json!({"base_size": "0.01", "limit_price": "1", "stop_price": "1", "stop_direction": "STOP_DIRECTION_STOP_UP"}),
    );
    assert_denied(
        &post(u, ORDERS, &stop).await,
        &["stop_limit_stop_limit_gtc", "guard.order_types"],
    );
    let unknown = order(
        "BTC-USD",
        "BUY",
        "iceberg_gtc",
        json!({"base_size": "0.01"}),
    );
    assert_denied(&post(u, ORDERS, &unknown).await, &["iceberg_gtc"]);

    // Bodies the guard cannot read the way Coinbase would: 400, not forwarded.
    for body in [
        "not json".to_owned(),
        r#"{"product_id":"BTC-USD","productId":"ETH-USD","side":"BUY","order_configuration":{"limit_limit_gtc":{"base_size":"1","limit_price":"1"}}}"#.to_owned(),
        order("BTC-USD", "BUY", "limit_limit_gtc", json!({"base_size": 0.01, "limit_price": "1"})),
    ] {
        let r = post(u, ORDERS, &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text());
        assert_eq!(r.cbgate_error(), Some("invalid_order"));
        assert!(r.json()["error_details"].is_string());
    }

    // An edit is size x price, too.
    let edit = |size: &str, price: &str| {
        json!({"order_id": "o-1", "size": size, "price": price}).to_string()
    };
    let r = post(u, "/api/v3/brokerage/orders/edit", &edit("0.02", "50000")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = post(
        u,
        "/api/v3/brokerage/orders/edit",
        &edit("0.02", "50000.01"),
    )
    .await;
    assert_denied(&r, &["max_order_quote", "order edit"]);
    // A preview places nothing: not guarded.
    let r = post(
        u,
        "/api/v3/brokerage/orders/preview",
        &limit("SOL-USD", "9", "9"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // Nothing refused reached the mock: it saw exactly the placed orders, byte for byte.
    assert_eq!(up.mock.orders().len(), placed);
    let posts = up.mock.requests_to("POST", ORDERS);
    assert_eq!(posts.len(), placed);
    for p in &posts {
        assert!(matches!(p.auth, AuthOutcome::Valid { .. }), "{:?}", p.auth);
    }
    assert_eq!(
        up.mock
            .requests_to("POST", "/api/v3/brokerage/orders/edit")
            .len(),
        1
    );
    // The buffered body goes upstream byte for byte.
    assert_eq!(
        posts[0].body,
        Bytes::from(limit("BTC-USD", "0.02", "49999.99"))
    );
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_bodies_are_read_with_a_cap() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = realistic(&key).await;
    let mut cfg = up.config();
    cfg.guard.max_order_quote = Some(dec("1000"));
    let gate = Gate::start(cfg, Some(&key)).await;
    // Over the guard's 64 KiB order cap (but under max_body_bytes): 400, not buffered on.
    let padding = "x".repeat(cbgate::gate::guard::ORDER_BODY_LIMIT);
    let big = order(
        "BTC-USD",
        "BUY",
        "limit_limit_gtc",
        json!({"base_size": "0.01", "limit_price": "1", "pad": padding}),
    );
    let r = post(&gate.url, ORDERS, &big).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert_eq!(r.cbgate_error(), Some("invalid_order"));
    assert!(r.text().contains("65536"), "{}", r.text());
    gate.stop().await;
    // Under a smaller max_body_bytes, the usual 413.
    let mut cfg = up.config();
    cfg.guard.max_order_quote = Some(dec("1000"));
    cfg.max_body_bytes = 1000;
    let gate = Gate::start(cfg, Some(&key)).await;
    let req = Request::post(format!("{}{ORDERS}", gate.url))
        .header("transfer-encoding", "chunked")
        .body(Full::new(Bytes::from(big)))
        .expect("request");
    let r = harness::send(&h1_client(), req).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    assert!(up.mock.requests_to("POST", ORDERS).is_empty());
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_post_only_passes_only_post_only_limit_orders() {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = realistic(&key).await;
    let mut cfg = up.config();
    cfg.guard.require_post_only = true;
    let gate = Gate::start(cfg, Some(&key)).await;
    let post_only = |p: bool| {
        order(
            "BTC-USD",
            "BUY",
            "limit_limit_gtd",
            json!({"base_size": "0.01", "limit_price": "1", "end_time": "2030-01-01T00:00:00Z", "post_only": p}),
        )
    };
    assert_placed(&post(&gate.url, ORDERS, &post_only(true)).await);
    assert_denied(
        &post(&gate.url, ORDERS, &post_only(false)).await,
        &["require_post_only"],
    );
    let market = order(
        "BTC-USD",
        "BUY",
        "market_market_ioc",
        json!({"quote_size": "1"}),
    );
    assert_denied(&post(&gate.url, ORDERS, &market).await, &["post-only"]);
    assert_eq!(up.mock.orders().len(), 1);
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_orders_with_a_limit_of_five_let_exactly_five_through() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = realistic(&key).await;
    let mut cfg = up.config();
    cfg.guard.max_orders_per_minute = Some(5);
    let gate = Gate::start(cfg, Some(&key)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let url = gate.url.clone();
        tasks.spawn(async move { post(&url, ORDERS, &limit("BTC-USD", "0.01", "1")).await });
    }
    let (mut ok, mut denied) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let r = r.expect("task");
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::FORBIDDEN => {
                assert_denied(&r, &["guard.max_orders_per_minute is 5"]);
                denied += 1;
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    assert_eq!((ok, denied), (5, 45));
    assert_eq!(up.mock.orders().len(), 5);
    assert_eq!(up.mock.requests_to("POST", ORDERS).len(), 5);
    gate.stop().await;
}

// ---------------------------------------------------------------------------
// Kill switch, with the binary
// ---------------------------------------------------------------------------

struct Setup {
    cfg: PathBuf,
    key_file: PathBuf,
    proxy: SocketAddr,
    admin: SocketAddr,
}

fn write_config(up: &Upstream, key: &TestKey, state_dir: &Path, extra: &str) -> Setup {
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let cfg = up.dir.path().join("cbgate.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"listen = ["{proxy}"]
admin_listen = "{admin}"
shutdown_timeout = "5s"
state_dir = "{state}"
{extra}

[upstream]
ca_file = "{ca}"

[upstream.resolve]
"api.coinbase.com" = "{mock}"
"api.exchange.coinbase.com" = "{mock}"
"api.international.coinbase.com" = "{mock}"
"drb.coinbase.com" = "{mock}"
"#,
            state = state_dir.display(),
            ca = up.ca_file.display(),
            mock = up.mock.addr,
        ),
    )
    .expect("write config");
    Setup {
        cfg,
        key_file: key.write_json(up.dir.path()),
        proxy,
        admin,
    }
}

async fn serve(s: &Setup) -> Process {
    let mut cmd = cbgate_command();
    cmd.args(["serve", "--config"])
        .arg(&s.cfg)
        .arg("--key-file")
        .arg(&s.key_file);
    let mut p = Process::spawn(cmd);
    let admin = s.admin;
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ready.clone();
    let probe = tokio::spawn(async move {
        loop {
            if tokio::net::TcpStream::connect(admin).await.is_ok()
                && http_get(admin, "/readyz").await.0 == StatusCode::OK
            {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    p.wait_until("/readyz 200", || {
        ready.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    probe.abort();
    p
}

async fn stop(p: Process) {
    p.signal("TERM");
    let (status, out) = p.wait_exit().await;
    assert!(status.success(), "{out}");
}

/// Runs a CLI command against `s`'s admin listener; (exit ok, stdout + stderr).
fn cli(s: &Setup, args: &[&str]) -> (bool, String) {
    let out = cbgate_command()
        .args(args)
        .arg("--config")
        .arg(&s.cfg)
        .output()
        .expect("run cbgate");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn assert_halted(r: &Resp, reason: &str) {
    assert_eq!(r.status, StatusCode::LOCKED, "{}", r.text());
    assert_eq!(r.cbgate_error(), Some("halted"));
    let v = r.json();
    assert_eq!(v["error"], "halted");
    assert_eq!(v["reason"], reason);
    assert!(v["halted_since"].as_str().is_some_and(|s| s.ends_with('Z')));
    let msg = v["message"].as_str().expect("message");
    assert!(
        msg.contains(reason) && msg.contains("cbgate resume"),
        "{msg}"
    );
    assert_eq!(v["error_details"], msg);
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_from_the_cli_refuses_orders_passes_cancels_and_survives_a_restart() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = realistic(&key).await;
    let state = tempfile::tempdir().expect("tempdir");
    let state_dir = state.path().join("cbgate");
    let s = write_config(&up, &key, &state_dir, "");
    let base = format!("http://{}", s.proxy);
    let p = serve(&s).await;

    assert_placed(&post(&base, ORDERS, &limit("BTC-USD", "0.01", "1")).await);
    let placed = up.mock.orders()[0].order_id.clone();
    let (ok, out) = cli(&s, &["status"]);
    assert!(ok && out.contains("not halted"), "{out}");
    let (ok, out) = cli(&s, &["halt", "--reason", "runaway bot"]);
    assert!(
        ok && out.contains("halted since") && out.contains("runaway bot"),
        "{out}"
    );

    // Orders and edits are refused, cancels and reads pass.
    assert_halted(
        &post(&base, ORDERS, &limit("BTC-USD", "0.01", "1")).await,
        "runaway bot",
    );
    let edit = json!({"order_id": placed, "size": "1", "price": "1"}).to_string();
    assert_halted(
        &post(&base, "/api/v3/brokerage/orders/edit", &edit).await,
        "runaway bot",
    );
    // Committing a convert quote is a trade too; asking for the quote moves nothing.
    let convert = json!({"from_account": "USD", "to_account": "USDC"}).to_string();
    assert_halted(
        &post(&base, "/api/v3/brokerage/convert/trade/q-1", &convert).await,
        "runaway bot",
    );
    assert!(up
        .mock
        .requests_to("POST", "/api/v3/brokerage/convert/trade/q-1")
        .is_empty());
    let cancel = json!({ "order_ids": [placed] }).to_string();
    let r = post(&base, "/api/v3/brokerage/orders/batch_cancel", &cancel).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["results"][0]["success"], true);
    let r = harness::send(
        &h1_client(),
        Request::get(format!("{base}/api/v3/brokerage/accounts"))
            .body(Full::new(Bytes::new()))
            .expect("request"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        up.mock.requests_to("POST", ORDERS).len(),
        1,
        "refused orders never reach Coinbase"
    );

    // Shown in /readyz and /metrics; persisted 0600 in a 0700 directory.
    let (_, ready) = http_get(s.admin, "/readyz").await;
    let ready: Value = serde_json::from_str(&ready).expect("json");
    assert_eq!(ready["halted"]["halted"], true);
    assert_eq!(ready["halted"]["reason"], "runaway bot");
    let (_, metrics) = http_get(s.admin, "/metrics").await;
    assert_eq!(metric(&metrics, "cbgate_halted"), Some(1.0));
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&state_dir), 0o700);
        assert_eq!(mode(&state_dir.join("halt.json")), 0o600);
    }

    // A restart with the same state_dir is still halted.
    stop(p).await;
    let p = serve(&s).await;
    assert_halted(
        &post(&base, ORDERS, &limit("BTC-USD", "0.01", "1")).await,
        "runaway bot",
    );
    let (_, metrics) = http_get(s.admin, "/metrics").await;
    assert_eq!(metric(&metrics, "cbgate_halted"), Some(1.0));
    let (ok, out) = cli(&s, &["status"]);
    assert!(
        ok && out.contains("halted since") && out.contains("runaway bot"),
        "{out}"
    );

    let (ok, out) = cli(&s, &["resume"]);
    assert!(ok && out.contains("not halted"), "{out}");
    assert_placed(&post(&base, ORDERS, &limit("BTC-USD", "0.01", "1")).await);
    let (_, metrics) = http_get(s.admin, "/metrics").await;
    assert_eq!(metric(&metrics, "cbgate_halted"), Some(0.0));
    stop(p).await;
    // And the resume survives a restart too.
    let p = serve(&s).await;
    assert_placed(&post(&base, ORDERS, &limit("BTC-USD", "0.01", "1")).await);
    stop(p).await;
}

async fn admin_call(
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Resp {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    harness::send(
        &h1_client(),
        req.body(Full::new(Bytes::from(body.to_owned())))
            .expect("request"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_over_the_admin_api_needs_the_admin_token() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = realistic(&key).await;
    let state = tempfile::tempdir().expect("tempdir");
    const TOKEN: &str = "admin-token-0123456789abcdef";
    let token_file = harness::write_private(up.dir.path(), "admin-token", TOKEN.as_bytes());
    let s = write_config(
        &up,
        &key,
        state.path(),
        &format!("admin_token_file = \"{}\"", token_file.display()),
    );
    let base = format!("http://{}", s.proxy);
    let p = serve(&s).await;

    let halt = r#"{"reason": "maintenance"}"#;
    for token in [None, Some("wrong-token-0123456789")] {
        let r = admin_call(s.admin, "POST", "/halt", token, halt).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
        let r = admin_call(s.admin, "GET", "/status", token, "").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    assert_placed(&post(&base, ORDERS, &limit("BTC-USD", "0.01", "1")).await);

    let r = admin_call(s.admin, "POST", "/halt", Some(TOKEN), halt).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["halted"], true);
    assert_halted(
        &post(&base, ORDERS, &limit("BTC-USD", "0.01", "1")).await,
        "maintenance",
    );
    let r = admin_call(s.admin, "GET", "/status", Some(TOKEN), "").await;
    assert_eq!(r.json()["reason"], "maintenance");
    // The CLI reads the token from admin_token_file.
    let (ok, out) = cli(&s, &["status"]);
    assert!(ok && out.contains("maintenance"), "{out}");

    let r = admin_call(s.admin, "POST", "/resume", None, "").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = admin_call(s.admin, "POST", "/resume", Some(TOKEN), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_placed(&post(&base, ORDERS, &limit("BTC-USD", "0.01", "1")).await);
    assert_eq!(up.mock.orders().len(), 2);
    stop(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_cancel_open_cancels_exactly_the_open_orders() {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = realistic(&key).await;
    // 150 open orders (two cancel batches, 22 listing pages) and 3 filled ones.
    let open: Vec<String> = (0..150)
        .map(|_| up.mock.seed_order("BTC-USD", false))
        .collect();
    let filled: Vec<String> = (0..3)
        .map(|_| up.mock.seed_order("ETH-USD", true))
        .collect();
    // And 4 on the derivatives gateway (one private/cancel_all with the key's token).
    up.mock.seed_gateway_orders(&key.name, 4);
    let state = tempfile::tempdir().expect("tempdir");
    let s = write_config(&up, &key, state.path(), "");
    let p = serve(&s).await;

    let (ok, out) = cli(&s, &["halt", "--reason", "panic", "--cancel-open"]);
    assert!(ok, "{out}");
    assert!(out.contains("cancelled 150 of 150 open orders"), "{out}");
    assert!(
        out.contains("derivatives gateway: cancelled 4 open orders"),
        "{out}"
    );
    assert_eq!(up.mock.gateway_open(&key.name), 0);
    assert_eq!(up.mock.gateway_auths(), vec![key.name.clone()]);
    for id in &open {
        assert!(
            out.contains(&format!("cancelled {id}")),
            "{id} not reported:\n{out}"
        );
    }
    for o in up.mock.orders() {
        assert_eq!(o.cancelled, open.contains(&o.order_id), "{}", o.order_id);
        assert!(!(o.cancelled && filled.contains(&o.order_id)));
    }
    let cancels = up
        .mock
        .requests_to("POST", "/api/v3/brokerage/orders/batch_cancel");
    let sizes: Vec<usize> = cancels
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_slice(&r.body).expect("json");
            v["order_ids"].as_array().expect("ids").len()
        })
        .collect();
    assert_eq!(sizes, [100, 50]);
    let lists = up
        .mock
        .requests_to("GET", "/api/v3/brokerage/orders/historical/batch");
    assert_eq!(
        lists.len(),
        150_usize.div_ceil(common::mock::OPEN_ORDERS_PAGE)
    );
    for r in cancels.iter().chain(&lists) {
        assert!(matches!(r.auth, AuthOutcome::Valid { .. }), "{:?}", r.auth);
    }
    // Halted, too; a second run finds nothing left to cancel.
    assert_halted(
        &post(
            &format!("http://{}", s.proxy),
            ORDERS,
            &limit("BTC-USD", "0.01", "1"),
        )
        .await,
        "panic",
    );
    let (ok, out) = cli(&s, &["halt", "--cancel-open"]);
    assert!(ok && out.contains("cancelled 0 of 0 open orders"), "{out}");
    assert!(
        out.contains("derivatives gateway: cancelled 0 open orders"),
        "{out}"
    );
    assert!(
        out.contains("panic"),
        "a repeated halt keeps its reason: {out}"
    );
    // The gateway dropped cbgate's cached token (its restart): a 401, one fresh exchange, the
    // cancel retried once.
    up.mock.seed_gateway_orders(&key.name, 2);
    up.mock.revoke_gateway_tokens();
    let (ok, out) = cli(&s, &["halt", "--cancel-open"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("derivatives gateway: cancelled 2 open orders"),
        "{out}"
    );
    assert_eq!(up.mock.gateway_auths().len(), 2);
    // A key the gateway refuses (no derivatives access) has nothing open there: skipped, and
    // the halt still succeeds.
    up.mock.set_gateway_auth(GatewayAuthMode::Refuse);
    up.mock.revoke_gateway_tokens();
    let (ok, out) = cli(&s, &["halt", "--cancel-open"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("derivatives gateway: skipped") && out.contains("no access to derivatives"),
        "{out}"
    );
    // The gateway not answering usably (a proxy's 502 page; a JSON-RPC error with 503, the
    // gateway's state, not the key's) is not "nothing open": reported, and the exit says so.
    for (mode, status) in [
        (GatewayAuthMode::BadGateway, "502"),
        (GatewayAuthMode::Unavailable, "503"),
    ] {
        up.mock.set_gateway_auth(mode);
        let (ok, out) = cli(&s, &["halt", "--cancel-open"]);
        assert!(!ok, "{out}");
        assert!(
            out.contains("derivatives gateway: NOT cancelled") && out.contains(status),
            "{out}"
        );
        assert!(
            !out.contains("drb-tok-"),
            "a gateway token in the output: {out}"
        );
    }
    stop(p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_endpoints_on_a_non_loopback_admin_listener_need_a_token() {
    // Configured as if exposed (e.g. for Kubernetes probes); actually served on loopback here.
    let cfg = cbgate::config::Config {
        admin_listen: "0.0.0.0:8751".parse().expect("addr"),
        ..Default::default()
    };
    let proxy = std::sync::Arc::new(cbgate::proxy::Proxy::new(&cfg, None).expect("proxy"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin = listener.local_addr().expect("addr");
    let task = tokio::spawn(cbgate::ops::admin::run(
        listener,
        std::sync::Arc::clone(&proxy),
        cbgate::gate::client::ClientGate::new(None, &[], &[]).allow_ip_hosts(),
        cbgate::listen::server::ServeOptions::admin(&cfg),
        std::future::pending(),
    ));
    let r = admin_call(admin, "POST", "/halt", None, "").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert_eq!(r.json()["error"], "admin_token_required");
    assert!(!proxy.halt_state().is_halted());
    // The probes stay open.
    assert_eq!(http_get(admin, "/livez").await.0, StatusCode::OK);
    task.abort();
}

// ---------------------------------------------------------------------------
// Exchange, INTX and Prime: each family's order shape, on its own hosts
// ---------------------------------------------------------------------------

const EX_SECRET: &str =
    "dGhpcyBpcyBhIHRlc3Qgc2VjcmV0IGZvciBjYmdhdGUncyBFeGNoYW5nZSBzaWduZXIsIDY0IGJ5dGVzIGxvbmchIQ==";
const INTX_SECRET: &str =
    "aW50eCB0ZXN0IHNlY3JldDogbm90IGEgcmVhbCBrZXksIGJ1dCA2NCBieXRlcyBvZiBiYXNlNjQgaW5wdXQgLi4uIQ==";
const PRIME_SECRET: &str = "prime-signing-key-7f3a9c1e5b2d8a6f4c0e1b3d5a7c9e2f";

/// The realistic mock, knowing the CDP key and one key of each HMAC family.
async fn realistic_all(key: &TestKey) -> Upstream {
    let hmac = |family, k: &str, secret: &str, pass: &str| common::mock::ExpectedHmac {
        family,
        key: k.into(),
        secret: secret.into(),
        passphrase: pass.into(),
    };
    Upstream::start_with(MockOptions {
        key: Some(key.expected.clone()),
        realistic: true,
        prices: vec![
            ("BTC-USD".into(), "50000.00".into()),
            ("BTC-PERP".into(), "50000".into()),
            ("ETH-USD".into(), "2500".into()),
        ],
        hmac: vec![
            hmac("exchange", "ex-key-1", EX_SECRET, "ex-pass"),
            hmac("intx", "intx-key-1", INTX_SECRET, "intx-pass"),
            hmac("prime", "prime-access-1", PRIME_SECRET, "prime-pass"),
        ],
        ..MockOptions::default()
    })
    .await
}

/// `[keys.ex]`, `[keys.ix]`, `[keys.pr]` as TOML (files written into `dir`), plus `extra`
/// lines inside each key's table.
fn hmac_keys_toml(dir: &Path, ex_extra: &str) -> String {
    let ex = harness::write_private(
        dir,
        "exchange.json",
        format!(r#"{{"key": "ex-key-1", "secret": "{EX_SECRET}", "passphrase": "ex-pass"}}"#)
            .as_bytes(),
    );
    let ix = harness::write_private(
        dir,
        "intx.json",
        format!(r#"{{"key": "intx-key-1", "secret": "{INTX_SECRET}", "passphrase": "intx-pass"}}"#)
            .as_bytes(),
    );
    let pr = harness::write_private(
        dir,
        "prime.json",
        format!(
            r#"{{"key": "prime-access-1", "secret": "{PRIME_SECRET}", "passphrase": "prime-pass"}}"#
        )
        .as_bytes(),
    );
    format!(
        "[keys.ex]\nkind = \"exchange\"\nfile = {ex:?}\n{ex_extra}\n[keys.ix]\nkind = \"intx\"\nfile = {ix:?}\n[keys.pr]\nkind = \"prime\"\nfile = {pr:?}\n"
    )
}

fn with_keys(up: &Upstream, toml: &str) -> cbgate::config::Config {
    let parsed = cbgate::config::Config::from_toml_str(toml).expect("keys config");
    let mut cfg = up.config();
    cfg.keys = parsed.keys;
    cfg.clients = parsed.clients;
    cfg
}

async fn send_as(base: &str, method: &str, path: &str, key: &str, body: &Value) -> Resp {
    send_with(base, method, path, &[("cbgate-key", key)], body).await
}

async fn send_with(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> Resp {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    harness::send(&h1_client(), req.body(Full::new(body)).expect("request")).await
}

fn assert_ok(r: &Resp) {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_familys_orders_pass_just_under_and_are_refused_just_over() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = realistic_all(&key).await;
    let dir = tempfile::tempdir().expect("dir");
    let mut cfg = with_keys(&up, &hmac_keys_toml(dir.path(), ""));
    cfg.guard.products = vec![
        "BTC-USD".into(),
        "BTC-PERP".into(),
        "ETH-USD".into(),
        "DOGE-USD".into(),
    ];
    cfg.guard.max_order_base = Some(dec("0.5"));
    cfg.guard.max_order_quote = Some(dec("1000"));
    cfg.guard.sides = vec!["BUY".into()];
    cfg.guard.order_types = vec!["limit".into(), "market".into()];
    cfg.guard.price_max_age = Duration::from_secs(600);
    let gate = Gate::start(cfg, Some(&key)).await;
    let u = gate.url.as_str();

    // Exchange: POST /orders (through /exchange/, prefix stripped), sides in lower case.
    let ex = |body: Value| async move { send_as(u, "POST", "/exchange/orders", "ex", &body).await };
    let ex_limit = |size: &str, price: &str| json!({"product_id": "BTC-USD", "side": "buy", "type": "limit", "size": size, "price": price, "post_only": false});
    let mut placed = 0;
    assert_ok(&ex(ex_limit("0.02", "50000")).await);
    placed += 1;
    assert_denied(
        &ex(ex_limit("0.02", "50000.01")).await,
        &["guard.max_order_quote is 1000", "1000.0002"],
    );
    assert_denied(
        &ex(ex_limit("0.50000001", "1")).await,
        &["guard.max_order_base is 0.5", "0.50000001"],
    );
    // Market in quote (`funds`): direct. Market in base: size x the ticker's price (50000);
    // the body's `price` is no bound on a market order.
    let ex_market = |field: &str, v: &str| json!({"product_id": "BTC-USD", "side": "buy", "type": "market", field: v, "price": "1"});
    assert_ok(&ex(ex_market("funds", "1000")).await);
    assert_denied(&ex(ex_market("funds", "1000.01")).await, &["1000.01"]);
    assert_ok(&ex(ex_market("size", "0.02")).await);
    placed += 2;
    assert_denied(
        &ex(ex_market("size", "0.0200001")).await,
        &["max_order_quote", "current price", "1000.005"],
    );
    assert_eq!(
        up.mock.requests_to("GET", "/products/BTC-USD/ticker").len(),
        1,
        "the Exchange ticker, fetched once and cached"
    );
    // No price for the product on the Exchange host: refused, not waved through.
    let doge = json!({"product_id": "DOGE-USD", "side": "buy", "type": "market", "size": "1"});
    assert_denied(&ex(doge).await, &["cannot be determined", "DOGE-USD"]);
    let mut sol = ex_limit("0.01", "1");
    sol["product_id"] = "SOL-USD".into();
    assert_denied(
        &ex(sol).await,
        &["product SOL-USD is not in guard.products"],
    );
    let mut sell = ex_limit("0.01", "1");
    sell["side"] = "sell".into();
    assert_denied(&ex(sell).await, &["side SELL", "guard.sides"]);
    let mut stop = ex_limit("0.01", "1");
    stop["stop"] = "loss".into();
    stop["stop_price"] = "1".into();
    assert_denied(&ex(stop).await, &["stop_limit", "guard.order_types"]);
    // Every spelling of the path is guarded.
    let r = send_as(u, "POST", "/exchange/ORDERS/", "ex", &ex_limit("9", "9")).await;
    assert_denied(&r, &["max_order_base"]);
    let r = send_as(u, "POST", "/exchange/%6Frders", "ex", &ex_limit("9", "9")).await;
    assert_denied(&r, &["max_order_base"]);
    // A size as a JSON number: not read the way Coinbase might; 400.
    let r = ex(json!({"product_id": "BTC-USD", "side": "buy", "size": 0.01, "price": "1"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert_eq!(r.cbgate_error(), Some("invalid_order"));
    assert_eq!(up.mock.exchange_orders().len(), placed);
    assert_eq!(up.mock.requests_to("POST", "/orders").len(), placed);

    // INTX: POST /api/v1/orders and PUT /api/v1/orders/{id}; priced by the instrument quote.
    let ix = |m: &'static str, p: &'static str, body: Value| async move {
        send_as(u, m, p, "ix", &body).await
    };
    const IX_ORDERS: &str = "/intx/api/v1/orders";
    let ix_order = |ty: &str, size: &str, price: Option<&str>| {
        let mut o = json!({"instrument": "BTC-PERP", "side": "BUY", "type": ty, "size": size, "tif": "GTC", "portfolio": "pf-1"});
        if let Some(p) = price {
            o["price"] = p.into();
        }
        o
    };
    assert_ok(&ix("POST", IX_ORDERS, ix_order("LIMIT", "0.02", Some("50000"))).await);
    assert_denied(
        &ix(
            "POST",
            IX_ORDERS,
            ix_order("LIMIT", "0.02", Some("50000.01")),
        )
        .await,
        &["1000.0002"],
    );
    assert_denied(
        &ix(
            "POST",
            IX_ORDERS,
            ix_order("LIMIT", "0.50000001", Some("1")),
        )
        .await,
        &["max_order_base"],
    );
    assert_ok(&ix("POST", IX_ORDERS, ix_order("MARKET", "0.02", None)).await);
    assert_denied(
        &ix("POST", IX_ORDERS, ix_order("MARKET", "0.0200001", None)).await,
        &["current price", "1000.005"],
    );
    assert_eq!(
        up.mock
            .requests_to("GET", "/api/v1/instruments/BTC-PERP/quote")
            .len(),
        1
    );
    let mut sell = ix_order("LIMIT", "0.01", Some("1"));
    sell["side"] = "SELL".into();
    assert_denied(&ix("POST", IX_ORDERS, sell).await, &["side SELL"]);
    assert_denied(
        &ix("POST", IX_ORDERS, ix_order("STOP_LIMIT", "0.01", Some("1"))).await,
        &["STOP_LIMIT", "guard.order_types"],
    );
    let mut eth = ix_order("LIMIT", "0.01", Some("1"));
    eth["instrument"] = "ETH-PERP".into();
    assert_denied(&ix("POST", IX_ORDERS, eth).await, &["ETH-PERP"]);
    let modify =
        |size: &str, price: &str| json!({"portfolio": "pf-1", "size": size, "price": price});
    assert_ok(&ix("PUT", "/intx/api/v1/orders/42", modify("0.02", "50000")).await);
    assert_denied(
        &ix("PUT", "/intx/api/v1/orders/42", modify("0.02", "50000.01")).await,
        &["order modify", "max_order_quote"],
    );
    assert_eq!(up.mock.requests_to("POST", "/api/v1/orders").len(), 2);
    assert_eq!(up.mock.requests_to("PUT", "/api/v1/orders/42").len(), 1);

    // Prime: POST /v1/portfolios/{id}/order. No public price: a market order in base size
    // cannot be valued and is refused.
    const PR_ORDER: &str = "/prime/v1/portfolios/pf-1/order";
    let pr = |body: Value| async move { send_as(u, "POST", PR_ORDER, "pr", &body).await };
    let pr_order = |ty: &str, fields: Value| {
        let mut o =
            json!({"product_id": "BTC-USD", "side": "BUY", "type": ty, "client_order_id": "c-1"});
        for (k, v) in fields.as_object().expect("fields") {
            o[k] = v.clone();
        }
        o
    };
    assert_ok(
        &pr(pr_order(
            "LIMIT",
            json!({"base_quantity": "0.02", "limit_price": "50000"}),
        ))
        .await,
    );
    assert_denied(
        &pr(pr_order(
            "LIMIT",
            json!({"base_quantity": "0.02", "limit_price": "50000.01"}),
        ))
        .await,
        &["1000.0002"],
    );
    assert_ok(
        &pr(pr_order(
            "LIMIT",
            json!({"base_quantity": "0.5", "limit_price": "1"}),
        ))
        .await,
    );
    assert_denied(
        &pr(pr_order(
            "LIMIT",
            json!({"base_quantity": "0.50000001", "limit_price": "1"}),
        ))
        .await,
        &["max_order_base is 0.5", "0.50000001"],
    );
    // A market order needs the current price for the other limit: none on Prime, refused.
    assert_denied(
        &pr(pr_order("MARKET", json!({"base_quantity": "0.001"}))).await,
        &["cannot be determined", "Prime has no public price endpoint"],
    );
    assert_denied(
        &pr(pr_order("MARKET", json!({"quote_value": "10"}))).await,
        &["cannot be determined", "Prime has no public price endpoint"],
    );
    assert_denied(
        &pr(pr_order(
            "TWAP",
            json!({"base_quantity": "0.001", "limit_price": "1"}),
        ))
        .await,
        &["TWAP", "guard.order_types"],
    );
    assert_eq!(
        up.mock
            .requests_to("POST", "/v1/portfolios/pf-1/order")
            .len(),
        2
    );
    assert!(up
        .mock
        .requests()
        .iter()
        .all(|r| !r.path_and_query.starts_with("/v1/") || r.method == "POST"));
    for r in up.mock.requests() {
        if r.method != "GET" {
            assert!(matches!(r.auth, AuthOutcome::Valid { .. }), "{:?}", r.auth);
        }
    }
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_post_only_on_each_family() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = realistic_all(&key).await;
    let dir = tempfile::tempdir().expect("dir");
    let mut cfg = with_keys(&up, &hmac_keys_toml(dir.path(), ""));
    cfg.guard.require_post_only = true;
    let gate = Gate::start(cfg, Some(&key)).await;
    let u = gate.url.as_str();
    for (path, key, mut order) in [
        (
            "/exchange/orders",
            "ex",
            json!({"product_id": "BTC-USD", "side": "buy", "type": "limit", "size": "0.01", "price": "1"}),
        ),
        (
            "/intx/api/v1/orders",
            "ix",
            json!({"instrument": "BTC-PERP", "side": "BUY", "type": "LIMIT", "size": "0.01", "price": "1"}),
        ),
        (
            "/prime/v1/portfolios/pf-1/order",
            "pr",
            json!({"product_id": "BTC-USD", "side": "BUY", "type": "LIMIT", "base_quantity": "0.01", "limit_price": "1"}),
        ),
    ] {
        order["post_only"] = true.into();
        assert_ok(&send_as(u, "POST", path, key, &order).await);
        order["post_only"] = false.into();
        assert_denied(
            &send_as(u, "POST", path, key, &order).await,
            &["require_post_only"],
        );
        // A market order is never post-only, whatever it says.
        order["post_only"] = true.into();
        order["type"] = if key == "ex" { "market" } else { "MARKET" }.into();
        assert_denied(&send_as(u, "POST", path, key, &order).await, &["post-only"]);
    }
    assert_eq!(up.mock.exchange_orders().len(), 1);
    assert_eq!(up.mock.requests_to("POST", "/api/v1/orders").len(), 1);
    assert_eq!(
        up.mock
            .requests_to("POST", "/v1/portfolios/pf-1/order")
            .len(),
        1
    );
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_refuses_each_familys_orders_and_passes_its_cancels() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = realistic_all(&key).await;
    let dir = tempfile::tempdir().expect("dir");
    // No guard limit at all: the kill switch works without one.
    let cfg = with_keys(&up, &hmac_keys_toml(dir.path(), ""));
    let gate = Gate::start(cfg, Some(&key)).await;
    let u = gate.url.as_str();
    gate.proxy.halt("desk closed").expect("halt");
    let ex = json!({"product_id": "BTC-USD", "side": "buy", "size": "0.01", "price": "1"});
    let ix = json!({"instrument": "BTC-PERP", "side": "BUY", "type": "LIMIT", "size": "0.01", "price": "1"});
    let pr = json!({"product_id": "BTC-USD", "side": "BUY", "type": "LIMIT", "base_quantity": "0.01", "limit_price": "1"});
    for (method, path, key, body) in [
        ("POST", "/exchange/orders", "ex", &ex),
        ("POST", "/exchange/Orders/", "ex", &ex),
        ("POST", "/intx/api/v1/orders", "ix", &ix),
        ("PUT", "/intx/api/v1/orders/42", "ix", &json!({"size": "1"})),
        ("POST", "/prime/v1/portfolios/pf-1/order", "pr", &pr),
    ] {
        let r = send_as(u, method, path, key, body).await;
        assert_halted(&r, "desk closed");
    }
    assert_halted(
        &post(u, ORDERS, &limit("BTC-USD", "0.01", "1")).await,
        "desk closed",
    );
    // Cancels pass: Exchange one and all, INTX one and all, Prime one.
    for (method, path, key) in [
        ("DELETE", "/exchange/orders/abc", "ex"),
        ("DELETE", "/exchange/orders", "ex"),
        ("DELETE", "/intx/api/v1/orders/42", "ix"),
        ("DELETE", "/intx/api/v1/orders?portfolio=pf-1", "ix"),
        ("POST", "/prime/v1/portfolios/pf-1/orders/o-1/cancel", "pr"),
    ] {
        let r = send_as(u, method, path, key, &Value::Null).await;
        assert_ok(&r);
    }
    let reached: Vec<String> = up
        .mock
        .requests()
        .iter()
        .filter(|r| r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path_and_query))
        .collect();
    assert_eq!(
        reached,
        [
            "DELETE /orders/abc",
            "DELETE /orders",
            "DELETE /api/v1/orders/42",
            "DELETE /api/v1/orders?portfolio=pf-1",
            "POST /v1/portfolios/pf-1/orders/o-1/cancel",
        ],
        "no refused order reached Coinbase"
    );
    gate.stop().await;
}

/// cbgate served in-process as `cbgate serve` builds it, client identities' tokens included
/// (the harness's `Gate` reads none): its base URL and a sender that stops it.
async fn serve_with_identities(
    cfg: cbgate::config::Config,
    key: &TestKey,
    dir: &Path,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    use cbgate::listen::server::{self, Listener, ServeOptions};
    cfg.validate().expect("valid test config");
    let api_key = cbgate::sign::key::KeySource::File(key.write_json(dir))
        .load()
        .expect("key loads");
    let keys = cbgate::sign::keys::Keyring::load(&cfg.keys, &std::collections::HashMap::new())
        .expect("named keys load");
    let tokens = cbgate::gate::identity::ClientTokens::read(&cfg).expect("token files read");
    let proxy = std::sync::Arc::new(
        cbgate::proxy::Proxy::new(&cfg, Some(api_key))
            .expect("proxy builds")
            .with_keys(keys)
            .with_client_tokens(tokens)
            .expect("tokens are distinct"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(server::run(
        vec![Listener::Tcp(listener)],
        proxy,
        ServeOptions::proxy(&cfg),
        async move {
            let _ = rx.await;
        },
    ));
    (format!("http://{addr}"), tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_per_identity_and_per_key_only_tighten() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = realistic_all(&key).await;
    let dir = tempfile::tempdir().expect("dir");
    const BOT_TOKEN: &str = "bot-token-0123456789abcdef";
    let token = harness::write_private(dir.path(), "bot.token", BOT_TOKEN.as_bytes());
    let toml = format!(
        "{}\n[clients.bot]\ntoken_file = {token:?}\n[clients.bot.guard]\nproducts = [\"ETH-USD\"]\nmax_orders_per_minute = 2\n",
        hmac_keys_toml(dir.path(), "[keys.ex.guard]\nmax_order_quote = 100\n")
    );
    let mut cfg = with_keys(&up, &toml);
    cfg.guard.max_order_quote = Some(dec("1000"));
    let (url, stop) = serve_with_identities(cfg, &key, dir.path()).await;
    let u = url.as_str();
    let as_bot = [("cbgate-token", BOT_TOKEN)];
    let at = |product: &str, base: &str, price: &str| -> Value {
        serde_json::from_str(&limit(product, base, price)).expect("json")
    };

    // Anonymous with the default key: only [guard] applies.
    assert_placed(&send_with(u, "POST", ORDERS, &[], &at("BTC-USD", "0.02", "50000")).await);
    assert_denied(
        &send_with(u, "POST", ORDERS, &[], &at("BTC-USD", "0.02", "50000.01")).await,
        &["refused by the guard: guard.max_order_quote is 1000"],
    );
    // The Exchange key's own layer: 100 in the quote currency.
    let ex =
        |size: &str| json!({"product_id": "ETH-USD", "side": "buy", "size": size, "price": "2500"});
    assert_denied(
        &send_as(u, "POST", "/exchange/orders", "ex", &ex("0.0400001")).await,
        &["keys.ex.guard.max_order_quote is 100"],
    );
    assert_ok(&send_as(u, "POST", "/exchange/orders", "ex", &ex("0.04")).await);
    // The bot identity: its products, and still the global limit.
    assert_denied(
        &send_with(u, "POST", ORDERS, &as_bot, &at("BTC-USD", "0.001", "1")).await,
        &["clients.bot.guard.products"],
    );
    assert_denied(
        &send_with(u, "POST", ORDERS, &as_bot, &at("ETH-USD", "1", "1000.01")).await,
        &["refused by the guard: guard.max_order_quote is 1000"],
    );
    // Both the identity's and the key's layers bind the bot's Exchange orders.
    let r = send_with(
        u,
        "POST",
        "/exchange/orders",
        &[("cbgate-token", BOT_TOKEN), ("cbgate-key", "ex")],
        &ex("0.1"),
    )
    .await;
    assert_denied(&r, &["keys.ex.guard.max_order_quote"]);
    // The bot's 2 orders a minute count per (identity, key): a third is refused, while the
    // anonymous client with the same key goes on.
    assert_placed(&send_with(u, "POST", ORDERS, &as_bot, &at("ETH-USD", "0.1", "1")).await);
    assert_placed(&send_with(u, "POST", ORDERS, &as_bot, &at("ETH-USD", "0.1", "1")).await);
    assert_denied(
        &send_with(u, "POST", ORDERS, &as_bot, &at("ETH-USD", "0.1", "1")).await,
        &[
            "clients.bot.guard.max_orders_per_minute is 2",
            "identity bot",
        ],
    );
    assert_placed(&send_with(u, "POST", ORDERS, &[], &at("ETH-USD", "0.1", "1")).await);
    assert_eq!(up.mock.orders().len(), 4);
    assert_eq!(up.mock.exchange_orders().len(), 1);
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_cancel_open_cancels_an_exchange_keys_open_orders_and_says_what_it_did_not() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = realistic_all(&key).await;
    let open: Vec<String> = (0..3)
        .map(|_| up.mock.seed_exchange_order("BTC-USD", false))
        .collect();
    let filled = up.mock.seed_exchange_order("BTC-USD", true);
    let state = tempfile::tempdir().expect("tempdir");
    let keys = hmac_keys_toml(up.dir.path(), "");
    // The key tables go last: everything after a table header belongs to it.
    let s = write_config(&up, &key, state.path(), "");
    let text = std::fs::read_to_string(&s.cfg).expect("read config");
    std::fs::write(&s.cfg, format!("{text}\n{keys}")).expect("write config");
    let p = serve(&s).await;

    let (ok, out) = cli(&s, &["halt", "--reason", "panic", "--cancel-open"]);
    // Not all done: the INTX and Prime keys' orders were not cancelled, and it says so.
    assert!(!ok, "{out}");
    assert!(out.contains("cancelled 0 of 0 open orders"), "[key]: {out}");
    assert!(
        out.contains("key ex (exchange): cancelled 3 of 3 open orders"),
        "{out}"
    );
    for id in &open {
        assert!(out.contains(&format!("  cancelled {id}")), "{id}:\n{out}");
    }
    assert!(!out.contains(&filled), "{out}");
    assert!(
        out.contains("key ix (intx): not cancelled: INTX cancels only within a portfolio"),
        "{out}"
    );
    assert!(out.contains("key pr (prime): not cancelled"), "{out}");
    for o in up.mock.exchange_orders() {
        assert_eq!(o.cancelled, open.contains(&o.order_id), "{}", o.order_id);
    }
    let deletes = up.mock.requests_to("DELETE", "/orders");
    assert_eq!(deletes.len(), 1);
    assert!(
        matches!(deletes[0].auth, AuthOutcome::Valid { .. }),
        "{:?}",
        deletes[0].auth
    );
    // Halted all the same; and nothing was sent to INTX.
    assert!(up
        .mock
        .requests()
        .iter()
        .all(|r| !r.path_and_query.starts_with("/api/v1/")));
    let (ok, out) = cli(&s, &["status"]);
    assert!(ok && out.contains("panic"), "{out}");
    stop(p).await;
}
