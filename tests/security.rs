//! The front door and the permission ceiling, over real sockets: client token, browser attacks
//! (cross-site requests, DNS rebinding) with the headers a browser really sends, the policy
//! ceiling against every spelling of a denied path, slow and oversized request heads, connection
//! limits, key file permissions and process hardening.

mod common;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use common::harness::{self, get, h1_client, send, Gate, KeyForm, TestKey, Upstream};

#[tokio::test]
async fn client_token_is_enforced_and_never_forwarded() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let token = "tok-0123456789abcdef-xyz";
    let gate = Gate::start_with_token(up.config(), Some(&key), token).await;

    let r = get(&gate, "/api/v3/brokerage/accounts").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.cbgate_error(), Some("client_unauthorized"));

    let req = |t: &str| {
        Request::get(format!("{}/api/v3/brokerage/accounts", gate.url))
            .header("cbgate-token", t)
            .body(Full::new(Bytes::new()))
            .expect("request")
    };
    let r = send(&h1_client(), req("tok-0123456789abcdef-xyZ")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "a near miss is refused");
    assert!(
        up.mock.requests().is_empty(),
        "refused requests never reach Coinbase"
    );

    let r = send(&h1_client(), req(token)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let rec = &up.mock.requests()[0];
    assert!(
        rec.headers.get("cbgate-token").is_none(),
        "the token stays local"
    );
    assert!(!r.text().contains(token));
}

#[tokio::test]
async fn cross_site_simple_post_from_a_browser_is_refused() {
    // What a page on evil.example makes the browser send with
    // fetch("http://127.0.0.1:8750/api/v3/brokerage/orders", {method: "POST", mode: "no-cors",
    //   body: JSON.stringify(order)}): a "simple" request, no preflight.
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;
    let raw = format!(
        "POST /api/v3/brokerage/orders HTTP/1.1\r\n\
         Host: 127.0.0.1:{port}\r\n\
         Connection: close\r\n\
         Content-Length: 24\r\n\
         sec-ch-ua-platform: \"Linux\"\r\n\
         User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36\r\n\
         Content-Type: text/plain;charset=UTF-8\r\n\
         Accept: */*\r\n\
         Origin: https://evil.example\r\n\
         Sec-Fetch-Site: cross-site\r\n\
         Sec-Fetch-Mode: no-cors\r\n\
         Sec-Fetch-Dest: empty\r\n\
         Referer: https://evil.example/\r\n\
         Accept-Encoding: gzip, deflate, br, zstd\r\n\
         Accept-Language: en-US,en;q=0.9\r\n\r\n\
         {{\"side\":\"SELL\",\"x\":1}}\r\n",
        port = gate.addr.port()
    );
    let out = harness::raw(gate.addr, raw.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("origin_not_allowed"), "{out}");
    assert!(up.mock.requests().is_empty());
}

#[tokio::test]
async fn cross_site_get_without_origin_is_refused_by_sec_fetch_site() {
    // What `<img src="http://127.0.0.1:8750/api/v3/brokerage/accounts">` on evil.example makes
    // Chrome send: no Origin (no-cors GET), but Sec-Fetch-Site says where it came from.
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let mut cfg = up.config();
    cfg.allowed_origins = vec!["http://localhost:3000".into()];
    let gate = Gate::start(cfg, Some(&key)).await;
    let req = |site: &str, origin: Option<&str>| {
        format!(
            "GET /api/v3/brokerage/accounts HTTP/1.1\r\n\
             Host: 127.0.0.1:{port}\r\n\
             Connection: close\r\n\
             User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36\r\n\
             Accept: image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8\r\n\
             {origin}\
             Sec-Fetch-Site: {site}\r\n\
             Sec-Fetch-Mode: no-cors\r\n\
             Sec-Fetch-Dest: image\r\n\
             Referer: https://evil.example/\r\n\r\n",
            port = gate.addr.port(),
            origin = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default(),
        )
    };
    for site in ["cross-site", "same-site"] {
        let out = harness::raw(gate.addr, req(site, None).as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 403"), "{site}: {out}");
        assert!(out.contains("origin_not_allowed"), "{site}: {out}");
        assert!(
            out.contains("Sec-Fetch-Site"),
            "the message names the header: {out}"
        );
    }
    assert!(up.mock.requests().is_empty());
    // Typed into the address bar, or from cbgate's own origin: allowed.
    for site in ["none", "same-origin"] {
        let out = harness::raw(gate.addr, req(site, None).as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{site}: {out}");
    }
    // A listed Origin's cross-site fetch is what allowed_origins is for.
    let out = harness::raw(
        gate.addr,
        req("cross-site", Some("http://localhost:3000")).as_bytes(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(up.mock.requests().len(), 3);
}

#[tokio::test]
async fn method_and_path_override_headers_are_refused() {
    // Under the default "trade" ceiling a GET passes; a server honouring the override would
    // delete the portfolio.
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;
    for (name, value) in [
        ("X-HTTP-Method-Override", "DELETE"),
        ("X-HTTP-Method", "DELETE"),
        ("X-Method-Override", "PUT"),
        ("x-http-method-override", "GET"),
        ("X-Original-URL", "/v2/accounts/a/withdrawals"),
        ("X-Rewrite-URL", "/v2/accounts/a/withdrawals"),
    ] {
        let raw = format!(
            "GET /api/v3/brokerage/portfolios/p1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{name}: {value}\r\n\r\n"
        );
        let out = harness::raw(gate.addr, raw.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{name}: {out}");
        assert!(out.contains("bad_request"), "{name}: {out}");
        assert!(
            out.contains(&name.to_ascii_lowercase()) && out.contains("in the request line"),
            "{name}: {out}"
        );
    }
    assert!(up.mock.requests().is_empty());
    let r = get(&gate, "/api/v3/brokerage/portfolios/p1").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[tokio::test]
async fn dns_rebinding_is_refused_by_host() {
    // After rebinding, attacker.example resolves to 127.0.0.1: the page's same-origin GET carries
    // no Origin header, but its Host is the attacker's name.
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;
    let raw = format!(
        "GET /api/v3/brokerage/accounts HTTP/1.1\r\n\
         Host: attacker.example:{port}\r\n\
         Connection: close\r\n\
         User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36\r\n\
         Accept: */*\r\n\
         Sec-Fetch-Site: same-origin\r\n\
         Sec-Fetch-Mode: cors\r\n\
         Sec-Fetch-Dest: empty\r\n\
         Referer: http://attacker.example:{port}/\r\n\r\n",
        port = gate.addr.port()
    );
    let out = harness::raw(gate.addr, raw.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("host_not_allowed"), "{out}");
    assert!(up.mock.requests().is_empty());

    // An allowed origin and host list opens the door on purpose.
    let mut cfg = up.config();
    cfg.allowed_origins = vec!["http://localhost:3000".into()];
    cfg.allowed_hosts = vec!["cbgate.internal".into()];
    let gate = Gate::start(cfg, Some(&key)).await;
    let req = Request::get(format!("{}/api/v3/brokerage/accounts", gate.url))
        .header("host", "cbgate.internal:8750")
        .header("origin", "http://localhost:3000")
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(send(&h1_client(), req).await.status, StatusCode::OK);
}

#[tokio::test]
async fn trade_ceiling_denies_moving_funds_with_a_helpful_message() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;
    let client = h1_client();
    let post = |path: &str| {
        Request::post(format!("{}{path}", gate.url))
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("request")
    };
    for path in [
        "/v2/accounts/acc-1/transactions",
        "/v2/accounts/acc-1/withdrawals",
        "/api/v3/brokerage/portfolios/move_funds",
        "/platform/v1/accounts",
    ] {
        let r = send(&client, post(path)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(r.json()["error"], "policy_denied");
        let msg = r.json()["message"].as_str().expect("message").to_owned();
        assert!(
            msg.contains("\"trade\"") && msg.contains("transfer"),
            "{msg}"
        );
    }
    assert!(up.mock.requests().is_empty());
    for path in [
        "/api/v3/brokerage/orders",
        "/api/v3/brokerage/orders/batch_cancel",
    ] {
        assert_eq!(
            send(&client, post(path)).await.status,
            StatusCode::OK,
            "{path}"
        );
    }
    assert_eq!(up.mock.requests().len(), 2);
}

#[tokio::test]
async fn view_ceiling_and_rules() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let mut cfg = up.config();
    cfg.policy.permission = cbgate::config::Permission::View;
    cfg.policy.rules = vec![
        cbgate::config::RuleConfig {
            action: cbgate::config::RuleAction::Allow,
            methods: vec!["POST".into()],
            path: "/api/v3/brokerage/orders/preview".into(),
        },
        cbgate::config::RuleConfig {
            action: cbgate::config::RuleAction::Deny,
            methods: vec![],
            path: "/ws/user".into(),
        },
    ];
    let gate = Gate::start(cfg, Some(&key)).await;
    let client = h1_client();
    let post = |path: &str| {
        Request::post(format!("{}{path}", gate.url))
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("request")
    };
    assert_eq!(
        send(&client, post("/api/v3/brokerage/orders")).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(&client, post("/api/v3/brokerage/orders/preview"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        get(&gate, "/api/v3/brokerage/accounts").await.status,
        StatusCode::OK
    );
    // The policy applies to WebSocket upgrades too.
    let out = harness::raw(
        gate.addr,
        b"GET /ws/user HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("rule #2"), "{out}");
}

#[tokio::test]
async fn no_spelling_of_a_denied_path_slips_through() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let mut cfg = up.config();
    cfg.policy.rules = vec![cbgate::config::RuleConfig {
        action: cbgate::config::RuleAction::Deny,
        methods: vec!["POST".into()],
        path: "/api/v3/brokerage/orders/edit".into(),
    }];
    let gate = Gate::start(cfg, Some(&key)).await;
    // Spellings that some server along the way could normalise into the denied path.
    let spellings = [
        "/api/v3/brokerage/orders/edit",
        "/api/v3/brokerage/orders/%65dit",
        "/api/v3/brokerage/orders/%65%64%69%74",
        "/api/v3/brokerage/orders/./edit",
        "/api/v3/brokerage/orders/x/../edit",
        "/api/v3/brokerage/orders//edit",
        "//api/v3/brokerage/orders/edit",
        "/api/v3/brokerage/orders%2Fedit",
        "/api/v3/brokerage/orders%2fedit",
        "/api/v3/brokerage/orders/%2e/edit",
        "/api/v3/brokerage/orders/%2E%2E/orders/edit",
        "/api/v3/brokerage/orders\\edit",
        "/api/v3/brokerage/orders%5cedit",
        "/api/v3/brokerage/orders/edit%00",
        "/api/v3/brokerage/orders/edit%",
        "/api/v3/brokerage/orders/./../orders/edit",
    ];
    for path in spellings {
        let raw = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        let out = harness::raw(gate.addr, raw.as_bytes()).await;
        let status = out.get(9..12).unwrap_or("");
        assert!(
            status == "403" || status == "400",
            "{path} was not refused: {out}"
        );
    }
    assert!(
        up.mock.requests().is_empty(),
        "a spelling reached Coinbase: {:?}",
        up.mock
            .requests()
            .iter()
            .map(|r| r.path_and_query.clone())
            .collect::<Vec<_>>()
    );
}

/// Sends `METHOD path` raw (no client library rewrites it) and returns (status, error code).
async fn raw_status(gate: &Gate, method: &str, path: &str) -> (String, String) {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    let out = harness::raw(gate.addr, raw.as_bytes()).await;
    let status = out.get(9..12).unwrap_or("").to_owned();
    let code = out
        .lines()
        .find_map(|l| l.strip_prefix("x-cbgate-error: "))
        .unwrap_or("")
        .to_owned();
    (status, code)
}

#[tokio::test]
async fn suffixes_path_parameters_and_unicode_dots_do_not_get_past_the_policy() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    // "transfer" with one deny rule: only the rule stands between these and Coinbase.
    let mut cfg = up.config();
    cfg.policy.permission = cbgate::config::Permission::Transfer;
    cfg.policy.rules = vec![cbgate::config::RuleConfig {
        action: cbgate::config::RuleAction::Deny,
        methods: vec!["POST".into()],
        path: "/v2/accounts/*/transactions".into(),
    }];
    let transfer = Gate::start(cfg, Some(&key)).await;
    let acc = "/v2/accounts/2bbf394c-193b-5b2a-9155-3b4732659ede";
    // A format suffix is the same route to Rails-style servers: the rule covers it (403).
    for suffix in [".json", ".xml", ".JSON", ".json/"] {
        let path = format!("{acc}/transactions{suffix}");
        let (status, code) = raw_status(&transfer, "POST", &path).await;
        assert_eq!(
            (status.as_str(), code.as_str()),
            ("403", "policy_denied"),
            "{path}"
        );
    }
    // Not plainly Coinbase-shaped: refused before the policy runs (400).
    for tail in [
        "transactions.",
        "transactions;x",
        "transactions;",
        "transactions%20",
        "transactions%3b",
        "transactions%3Bx",
        "transactions%3a",
        "transactions:x",
        "transactions@x",
        "transactions+",
        "transactions=",
        "transactions%c0%ae",
        "transactions%ef%bc%8e",
        "transactions%e2%80%8b",
        "transactions..",
    ] {
        let path = format!("{acc}/{tail}");
        let (status, code) = raw_status(&transfer, "POST", &path).await;
        assert_eq!(
            (status.as_str(), code.as_str()),
            ("400", "invalid_path"),
            "{path}"
        );
    }

    // The default "trade" ceiling allows /api/v3/brokerage/orders/**: a server that reads these
    // as dot segments would route them out from under it, to a withdrawal.
    let trade = Gate::start(up.config(), Some(&key)).await;
    for dots in [
        "..;/..;/..;/..;/v2/accounts/a/withdrawals",
        "%c0%ae%c0%ae/%c0%ae%c0%ae/%c0%ae%c0%ae/%c0%ae%c0%ae/v2/accounts/a/withdrawals",
        "%ef%bc%8e%ef%bc%8e/%ef%bc%8e%ef%bc%8e/%ef%bc%8e%ef%bc%8e/%ef%bc%8e%ef%bc%8e/v2/accounts/a/withdrawals",
        "x;/../../../../v2/accounts/a/withdrawals",
        "..%3b/x",
        ".../x",
    ] {
        let path = format!("/api/v3/brokerage/orders/{dots}");
        let (status, code) = raw_status(&trade, "POST", &path).await;
        assert_eq!(status, "400", "{path}: {code}");
    }
    // The message names the problem.
    let r = send(
        &h1_client(),
        Request::post(format!("{}/api/v3/brokerage/orders/..;/x", trade.url))
            .body(Full::new(Bytes::new()))
            .expect("request"),
    )
    .await;
    let msg = r.json()["message"].as_str().unwrap_or_default().to_owned();
    assert!(msg.contains(';') && msg.contains("path parameter"), "{msg}");
    assert!(
        up.mock.requests().is_empty(),
        "a spelling reached Coinbase: {:?}",
        up.mock
            .requests()
            .iter()
            .map(|r| r.path_and_query.clone())
            .collect::<Vec<_>>()
    );

    // What real clients send still passes, byte for byte.
    let ok = [
        ("POST", format!("{acc}/withdrawals")),
        ("GET", format!("{acc}/transactions?limit=5&order=desc&starting_after=a%3Bb")),
        ("GET", "/api/v3/brokerage/orders/historical/batch?product_ids=BTC-USD&product_ids=BTC-PERP-INTX".into()),
        ("GET", "/api/v3/brokerage/products/BTC-PERP-INTX".into()),
        ("GET", "/api/v3/brokerage/products/BIT-28JUL23-CDE/candles?granularity=ONE_HOUR".into()),
        ("POST", "/platform/v2/evm/accounts".into()),
        ("GET", "/platform/v2/evm/accounts/0x742d35Cc6634C0532925a3b844Bc454e4438f44e".into()),
    ];
    for (method, path) in &ok {
        let (status, code) = raw_status(&transfer, method, path).await;
        assert_eq!(status, "200", "{method} {path}: {code}");
    }
    let seen: Vec<String> = up
        .mock
        .requests()
        .iter()
        .map(|r| r.path_and_query.clone())
        .collect();
    let sent: Vec<String> = ok.iter().map(|(_, p)| p.clone()).collect();
    assert_eq!(seen, sent);
}

#[tokio::test]
async fn slow_request_heads_are_cut_off() {
    let up = Upstream::start(None).await;
    let mut cfg = up.config();
    cfg.header_read_timeout = Duration::from_millis(500);
    let gate = Gate::start(cfg, None).await;
    let mut s = tokio::net::TcpStream::connect(gate.addr)
        .await
        .expect("connect");
    s.write_all(b"GET /api/v3/brokerage/market/products HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .expect("write");
    // Never finish the head: cbgate must hang up rather than hold the connection forever.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "connection still open after the header read timeout"
    );
    assert!(up.mock.requests().is_empty());
}

#[tokio::test]
async fn too_many_or_too_large_headers_get_431() {
    let up = Upstream::start(None).await;
    let gate = Gate::start(up.config(), None).await;
    let mut many = String::from("GET /api/v3/brokerage/market/products HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for i in 0..150 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let out = harness::raw(gate.addr, many.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    let big = format!(
        "GET /api/v3/brokerage/market/products HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let out = harness::raw(gate.addr, big.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert!(up.mock.requests().is_empty());
}

#[tokio::test]
async fn connections_over_the_limit_get_503() {
    let up = Upstream::start(None).await;
    let mut cfg = up.config();
    cfg.max_connections = 2;
    let gate = Gate::start(cfg, None).await;
    // Two idle connections take both slots.
    let _a = tokio::net::TcpStream::connect(gate.addr).await.expect("a");
    let _b = tokio::net::TcpStream::connect(gate.addr).await.expect("b");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let out = harness::raw(
        gate.addr,
        b"GET /api/v3/brokerage/market/products HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.contains("too_many_connections"), "{out}");
    drop(_a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = get(&gate, "/api/v3/brokerage/market/products").await;
    assert_eq!(r.status, StatusCode::OK, "a freed slot is reused");
}

#[test]
fn non_loopback_listen_needs_unsafe_listen_and_a_token() {
    let mut cfg = cbgate::config::Config {
        listen: vec!["0.0.0.0:8750".parse().expect("addr")],
        ..Default::default()
    };
    let e = cfg.validate().expect_err("refused");
    assert!(e.to_string().contains("not a loopback address"), "{e}");
    cfg.unsafe_listen = true;
    assert!(cfg.validate().is_err(), "unsafe_listen alone is not enough");
    cfg.client_token_file = Some("/run/secrets/cbgate-token".into());
    assert!(cfg.validate().is_ok());
    cfg.unsafe_listen = false;
    assert!(cfg.validate().is_err(), "a token alone is not enough");
}

fn cbgate() -> std::process::Command {
    harness::cbgate_command()
}

#[test]
fn key_file_readable_by_others_is_refused_unless_allowed() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = TestKey::generate(KeyForm::P256Sec1);
    let path = key.write_json(dir.path());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = cbgate()
        .arg("check")
        .arg("--key-file")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("0644") && err.contains("chmod 600"), "{err}");

    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[key]\nallow_insecure_permissions = true\n").expect("write");
    let out = cbgate()
        .arg("check")
        .arg("--config")
        .arg(&cfg)
        .arg("--key-file")
        .arg(&path)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A systemd credential (inside $CREDENTIALS_DIRECTORY) shows its ACL mask as group bits:
    // trusted there, and only there.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o440)).expect("chmod");
    let out = cbgate()
        .arg("check")
        .arg("--key-file")
        .arg(&path)
        .env("CREDENTIALS_DIRECTORY", dir.path())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let out = cbgate()
        .arg("check")
        .arg("--key-file")
        .arg(&path)
        .env("CREDENTIALS_DIRECTORY", elsewhere.path())
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(2),
        "outside the credentials directory"
    );

    // The client token file is held to the same rule.
    let tok = dir.path().join("token");
    std::fs::write(&tok, "0123456789abcdef0123").expect("write");
    std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    std::fs::write(&cfg, format!("client_token_file = \"{}\"\n", tok.display())).expect("write");
    let out = cbgate()
        .arg("check")
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("client_token_file"));
}

#[test]
fn check_reports_process_hardening() {
    let out = cbgate().arg("check").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("core dumps off: yes") && text.contains("not dumpable: yes"),
        "{text}"
    );
}

#[tokio::test]
async fn unusual_methods_are_refused_before_policy() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let mut cfg = up.config();
    cfg.policy.permission = cbgate::config::Permission::Transfer;
    cfg.policy.rules = vec![cbgate::config::RuleConfig {
        action: cbgate::config::RuleAction::Deny,
        methods: vec!["POST".into()],
        path: "/v2/accounts/*/withdrawals".into(),
    }];
    let gate = Gate::start(cfg, Some(&key)).await;
    for method in ["post", "Post", "PROPFIND", "TRACE"] {
        let raw = format!(
            "{method} /v2/accounts/a/withdrawals HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        let out = harness::raw(gate.addr, raw.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 405"), "{method}: {out}");
        assert!(out.contains("method_not_allowed"), "{method}: {out}");
    }
    // The same path in other spellings is still caught by the deny rule.
    for path in ["/v2/accounts/a/withdrawals/", "/v2/Accounts/a/WITHDRAWALS"] {
        let raw = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        let out = harness::raw(gate.addr, raw.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 403"), "{path}: {out}");
    }
    assert!(up.mock.requests().is_empty());
}

#[tokio::test]
async fn a_live_unix_socket_is_not_taken_over_but_a_stale_one_is_replaced() {
    use cbgate::config::ListenAddr;
    use cbgate::listen::server::Listener;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gate.sock");
    let first = Listener::bind(&ListenAddr::Unix(path.clone()))
        .await
        .expect("first bind");
    let e = Listener::bind(&ListenAddr::Unix(path.clone()))
        .await
        .expect_err("a live socket must not be replaced");
    assert!(e.to_string().contains("another process"), "{e}");
    drop(first);
    // The file is left behind by a process that is gone: a restart takes it over.
    assert!(path.exists());
    Listener::bind(&ListenAddr::Unix(path.clone()))
        .await
        .expect("stale socket replaced");
}
