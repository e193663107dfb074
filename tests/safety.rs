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
use common::mock::{AuthOutcome, MockOptions};

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
    let state = tempfile::tempdir().expect("tempdir");
    let s = write_config(&up, &key, state.path(), "");
    let p = serve(&s).await;

    let (ok, out) = cli(&s, &["halt", "--reason", "panic", "--cancel-open"]);
    assert!(ok, "{out}");
    assert!(out.contains("cancelled 150 of 150 open orders"), "{out}");
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
        out.contains("panic"),
        "a repeated halt keeps its reason: {out}"
    );
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
