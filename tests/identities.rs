//! Client identities over real sockets: by token (`cbgate-token` and `Authorization: Bearer`),
//! by Unix peer credentials (clients run under other uids), each with its own ceiling; no
//! spelling gets an order past a view-only identity; `clients.require`; and the identity in
//! metrics and audit records, never the token.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use cbgate::config::{ClientConfig, Config, ListenAddr, Permission, RuleAction, RuleConfig};
use cbgate::gate::identity::{read_token_file, ClientTokens};
use cbgate::listen::server::{self, Listener, ServeOptions};
use cbgate::proxy::Proxy;
use cbgate::sign::key::KeySource;

use common::harness::{
    self, h1_client, h2c_client, send, write_private, KeyForm, TestKey, Upstream,
};
use common::mock::AuthOutcome;

const VIEWER_TOKEN: &str = "viewer-token-4f1c9a7e2b";
const TRADER_TOKEN: &str = "trader-token-8d2e6b1f0c";
const OPS_TOKEN: &str = "ops-token-31a5c7e9d2b4";
const ORDER: &str = r#"{"client_order_id":"c1","product_id":"BTC-USD","side":"BUY","order_configuration":{"limit_limit_gtc":{"base_size":"0.001","limit_price":"10000"}}}"#;

/// cbgate serving in-process on the given listeners, with the identities' tokens read from
/// their files as `serve` reads them.
struct Served {
    url: String,
    addr: Option<std::net::SocketAddr>,
    proxy: Arc<Proxy>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Served {
    async fn start(cfg: Config, key: &TestKey, listeners: Vec<Listener>) -> Served {
        cfg.validate().expect("valid test config");
        let dir = tempfile::tempdir().expect("tempdir");
        let api_key = KeySource::File(key.write_json(dir.path()))
            .load()
            .expect("key loads");
        let tokens = ClientTokens::read(&cfg).expect("token files read");
        let default = cfg
            .client_token_file
            .as_deref()
            .map(|p| read_token_file(p).expect("client_token_file read"));
        // `[keys.NAME]` from files, as `serve` loads them.
        let keys = cbgate::sign::keys::Keyring::load(&cfg.keys, &std::collections::HashMap::new())
            .expect("named keys load");
        let proxy = Arc::new(
            Proxy::new(&cfg, Some(api_key))
                .expect("proxy builds")
                .with_keys(keys)
                .with_client_token(default, &cfg)
                .with_client_tokens(tokens)
                .expect("tokens are distinct"),
        );
        let addr = match listeners.first() {
            Some(Listener::Tcp(l)) => Some(l.local_addr().expect("addr")),
            _ => None,
        };
        let (tx, rx) = oneshot::channel();
        let opts = ServeOptions {
            drain_timeout: Duration::from_secs(2),
            ..ServeOptions::proxy(&cfg)
        };
        let task = tokio::spawn(server::run(listeners, proxy.clone(), opts, async move {
            let _ = rx.await;
        }));
        Served {
            url: addr.map_or_else(String::new, |a| format!("http://{a}")),
            addr,
            proxy,
            stop: Some(tx),
            task,
        }
    }

    async fn tcp(cfg: Config, key: &TestKey) -> Served {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Served::start(cfg, key, vec![Listener::Tcp(l)]).await
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn identity(token_file: Option<PathBuf>, permission: Option<Permission>) -> ClientConfig {
    ClientConfig {
        token_file,
        permission,
        ..ClientConfig::default()
    }
}

/// Three identities by token (viewer: view, trader: trade, ops: the global transfer).
fn three_identities(up: &Upstream, dir: &Path) -> Config {
    let mut cfg = up.config();
    cfg.policy.permission = Permission::Transfer;
    for (name, token, permission) in [
        ("viewer", VIEWER_TOKEN, Some(Permission::View)),
        ("trader", TRADER_TOKEN, Some(Permission::Trade)),
        ("ops", OPS_TOKEN, None),
    ] {
        let file = write_private(
            dir,
            &format!("{name}.token"),
            format!("{token}\n").as_bytes(),
        );
        cfg.clients
            .named
            .insert(name.into(), identity(Some(file), permission));
    }
    cfg
}

fn post(url: &str, path: &str, auth: Option<(&str, String)>) -> Request<Full<Bytes>> {
    let mut b = Request::post(format!("{url}{path}")).header("content-type", "application/json");
    if let Some((name, value)) = auth {
        b = b.header(name, value);
    }
    b.body(Full::new(Bytes::from_static(ORDER.as_bytes())))
        .expect("request")
}

/// The two ways a client presents its token.
fn spellings(token: &str) -> [(&'static str, String); 2] {
    [
        ("cbgate-token", token.to_owned()),
        ("authorization", format!("Bearer {token}")),
    ]
}

#[tokio::test]
async fn identities_by_token_each_get_their_own_ceiling() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = three_identities(&up, dir.path());
    let audit_file = dir.path().join("audit.log");
    cfg.audit.file = Some(audit_file.clone());
    let gate = Served::tcp(cfg, &key).await;
    let client = h1_client();

    // (identity, token, may place an order, may send funds)
    for (name, token, orders, transfers) in [
        ("viewer", VIEWER_TOKEN, false, false),
        ("trader", TRADER_TOKEN, true, false),
        ("ops", OPS_TOKEN, true, true),
    ] {
        for auth in spellings(token) {
            let how = auth.0;
            for (path, allowed) in [
                ("/api/v3/brokerage/orders", orders),
                ("/v2/accounts/a1/transactions", transfers),
            ] {
                let before = up.mock.requests_to("POST", path).len();
                let r = send(&client, post(&gate.url, path, Some(auth.clone()))).await;
                let after = up.mock.requests_to("POST", path).len();
                if allowed {
                    assert_eq!(
                        r.status,
                        StatusCode::OK,
                        "{name} by {how}: {path}: {}",
                        r.text()
                    );
                    assert_eq!(after, before + 1, "{name} by {how}: {path} forwarded once");
                } else {
                    assert_eq!(r.status, StatusCode::FORBIDDEN, "{name} by {how}: {path}");
                    assert_eq!(r.cbgate_error(), Some("policy_denied"));
                    let m = r.json()["message"].as_str().unwrap_or_default().to_owned();
                    assert!(
                        m.contains(&format!("\"{name}\"")),
                        "names the identity: {m}"
                    );
                    assert!(!m.contains(token), "never the token: {m}");
                    assert_eq!(
                        after, before,
                        "{name} by {how}: {path} never reaches Coinbase"
                    );
                }
                assert!(!r.text().contains(token));
            }
        }
    }
    // A read passes for everyone.
    let r = send(
        &client,
        Request::get(format!("{}/api/v3/brokerage/accounts", gate.url))
            .header("authorization", format!("bearer {VIEWER_TOKEN}"))
            .body(Full::new(Bytes::new()))
            .expect("request"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // Upstream sees cbgate's own signature, never a client's token in any header.
    let recorded = up.mock.requests();
    assert!(!recorded.is_empty());
    for rec in &recorded {
        assert!(
            matches!(rec.auth, AuthOutcome::Valid { .. }),
            "signed by cbgate: {:?}",
            rec.auth
        );
        assert!(rec.headers.get("cbgate-token").is_none());
        for (_, v) in rec.headers.iter() {
            let v = String::from_utf8_lossy(v.as_bytes());
            for t in [VIEWER_TOKEN, TRADER_TOKEN, OPS_TOKEN] {
                assert!(!v.contains(t), "a client token reached Coinbase");
            }
        }
    }

    // Metrics by identity name; no token anywhere.
    let metrics = gate.proxy.metrics().render();
    for line in [
        r#"cbgate_client_requests_total{identity="viewer",route="/api/v3/",method="POST",status="4xx"} 2"#,
        r#"cbgate_client_requests_total{identity="trader",route="/api/v3/",method="POST",status="2xx"} 2"#,
        r#"cbgate_client_requests_total{identity="trader",route="/v2/",method="POST",status="4xx"} 2"#,
        r#"cbgate_client_requests_total{identity="ops",route="/v2/",method="POST",status="2xx"} 2"#,
        r#"cbgate_client_requests_total{identity="viewer",route="/api/v3/",method="GET",status="2xx"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    for t in [VIEWER_TOKEN, TRADER_TOKEN, OPS_TOKEN] {
        assert!(!metrics.contains(t));
    }
    gate.stop().await;

    // Audit records name the identity of every intent and refusal.
    let text = std::fs::read_to_string(&audit_file).expect("audit log");
    let recs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let count = |kind: &str, who: &str| {
        recs.iter()
            .filter(|r| r["type"] == kind && r["identity"] == who)
            .count()
    };
    assert_eq!(count("refusal", "viewer"), 4, "{text}");
    assert_eq!(count("intent", "trader"), 2, "{text}");
    assert_eq!(count("refusal", "trader"), 2, "{text}");
    assert_eq!(count("intent", "ops"), 4, "{text}");
    for t in [VIEWER_TOKEN, TRADER_TOKEN, OPS_TOKEN] {
        assert!(!text.contains(t));
    }
}

#[tokio::test]
async fn a_view_only_identity_cannot_post_an_order_by_any_spelling() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = three_identities(&up, dir.path());
    // The trader may trade, but not edit orders, by its own rule; and may not open /ws/user.
    let trader = cfg.clients.named.get_mut("trader").expect("trader");
    trader.rules = vec![
        RuleConfig {
            action: RuleAction::Deny,
            methods: vec!["POST".into()],
            path: "/api/v3/brokerage/orders/edit".into(),
        },
        RuleConfig {
            action: RuleAction::Deny,
            methods: vec!["GET".into()],
            path: "/ws/user".into(),
        },
    ];
    let gate = Served::tcp(cfg, &key).await;
    let addr = gate.addr.expect("tcp");

    let orders = [
        "/api/v3/brokerage/orders",
        "/api/v3/brokerage/orders/",
        "/API/V3/Brokerage/Orders",
        "/api/v3/brokerage/%6Frders",
        "/api/v3/brokerage/ORDERS.json",
        "/api/v3/brokerage//orders",
        "/api/v3/brokerage/./orders",
        "/api/v3/brokerage/x/../orders",
        "/api/v3/brokerage/orders%2F",
        "/api/v3/brokerage/orders;x",
        "/api/v3/brokerage/orders/edit",
        "/api/v3/brokerage/orders/batch_cancel",
        "/api/v3/brokerage/orders?x=1",
    ];
    for (client, proto) in [(h1_client(), "h1"), (h2c_client(), "h2c")] {
        for path in orders {
            for auth in spellings(VIEWER_TOKEN) {
                for method in ["POST", "PUT", "PATCH", "DELETE"] {
                    let mut req = post(&gate.url, path, Some(auth.clone()));
                    *req.method_mut() = method.parse().expect("method");
                    let r = send(&client, req).await;
                    // Refused by cbgate itself (403 policy, 400 path shape, 404 no route).
                    assert!(
                        r.status.is_client_error() && r.cbgate_error().is_some(),
                        "{proto} {method} {path} by {}: {} {}",
                        auth.0,
                        r.status,
                        r.text()
                    );
                }
            }
        }
    }
    // Raw HTTP/1: a lower-case method, an absolute-form target, an override header.
    for (line, extra) in [
        ("post /api/v3/brokerage/orders HTTP/1.1", ""),
        ("POST http://localhost/api/v3/brokerage/orders HTTP/1.1", ""),
        (
            "GET /api/v3/brokerage/orders HTTP/1.1",
            "X-HTTP-Method-Override: POST\r\n",
        ),
    ] {
        let raw = format!(
            "{line}\r\nHost: localhost\r\ncbgate-token: {VIEWER_TOKEN}\r\n{extra}\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{ORDER}",
            ORDER.len()
        );
        let out = harness::raw(addr, raw.as_bytes()).await;
        let status = out.get(9..12).unwrap_or("");
        assert!(
            ["400", "403", "405"].contains(&status),
            "{line} {extra:?}: {out}"
        );
    }
    assert!(
        up.mock.requests().is_empty(),
        "nothing from the viewer reached Coinbase: {:?}",
        up.mock
            .requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path_and_query))
            .collect::<Vec<_>>()
    );

    // The trader's own deny rule covers the spellings of its path, and names the identity.
    let client = h1_client();
    for path in [
        "/api/v3/brokerage/orders/edit",
        "/api/v3/brokerage/orders/Edit/",
        "/api/v3/brokerage/orders/%65dit",
        "/api/v3/brokerage/orders/edit.json",
    ] {
        let r = send(
            &client,
            post(&gate.url, path, Some(("cbgate-token", TRADER_TOKEN.into()))),
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {}", r.text());
        let m = r.json()["message"].as_str().unwrap_or_default().to_owned();
        assert!(
            m.contains("\"trader\"") && m.contains("clients.trader.rules"),
            "{m}"
        );
    }
    assert!(up.mock.requests().is_empty());
    // ... while its plain order passes.
    let r = send(
        &client,
        post(
            &gate.url,
            "/api/v3/brokerage/orders",
            Some(("cbgate-token", TRADER_TOKEN.into())),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    // A WebSocket upgrade is judged under the identity too.
    let upgrade = |token: &str| {
        format!(
            "GET /ws/user HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        )
    };
    let out = harness::raw(addr, upgrade(TRADER_TOKEN).as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(
        out.contains("policy_denied") && out.contains("trader"),
        "{out}"
    );
    assert!(!out.contains(TRADER_TOKEN));
    gate.stop().await;
}

#[tokio::test]
async fn unknown_tokens_are_refused_when_required_and_anonymous_otherwise() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = "wrong-token-0123456789ab";

    // require = true: no token, a wrong one, a near miss: 401, and nothing reaches Coinbase.
    let mut cfg = three_identities(&up, dir.path());
    cfg.policy.permission = Permission::Trade;
    cfg.clients.named.get_mut("ops").expect("ops").permission = None;
    cfg.clients.require = true;
    let gate = Served::tcp(cfg, &key).await;
    let client = h1_client();
    let near_miss = format!("{}X", &VIEWER_TOKEN[..VIEWER_TOKEN.len() - 1]);
    for auth in [
        None,
        Some(("cbgate-token", wrong.to_owned())),
        Some(("authorization", format!("Bearer {wrong}"))),
        Some(("cbgate-token", near_miss.clone())),
        Some(("authorization", format!("Basic {VIEWER_TOKEN}"))),
        Some(("cbgate-token", String::new())),
    ] {
        let r = send(
            &client,
            post(&gate.url, "/api/v3/brokerage/orders", auth.clone()),
        )
        .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{auth:?}: {}", r.text());
        assert_eq!(r.cbgate_error(), Some("client_unauthorized"));
        let m = r.json()["message"].as_str().unwrap_or_default().to_owned();
        assert!(m.contains("clients.require"), "{m}");
        assert!(!m.contains(wrong) && !m.contains(&near_miss), "{m}");
    }
    // Two tokens: which one counts would be a guess.
    let two = Request::get(format!("{}/api/v3/brokerage/accounts", gate.url))
        .header("cbgate-token", OPS_TOKEN)
        .header("cbgate-token", VIEWER_TOKEN)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let r = send(&client, two).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(
        up.mock.requests().is_empty(),
        "no refused request reached Coinbase"
    );
    // A known token still passes.
    let r = send(
        &client,
        post(
            &gate.url,
            "/api/v3/brokerage/orders",
            Some(("authorization", format!("Bearer {OPS_TOKEN}"))),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let metrics = gate.proxy.metrics().render();
    assert!(
        metrics.contains(
            r#"cbgate_client_requests_total{identity="-",route="-",method="POST",status="4xx"} 6"#
        ),
        "{metrics}"
    );
    gate.stop().await;

    // require = false: an unknown token is no identity, served as anonymous with the global
    // policy (trade): its order passes, its transfer does not, and the refusal names no one.
    let mut cfg = three_identities(&up, dir.path());
    cfg.policy.permission = Permission::Trade;
    cfg.clients.named.get_mut("ops").expect("ops").permission = None;
    let gate = Served::tcp(cfg, &key).await;
    for auth in [
        None,
        Some(("cbgate-token", wrong.to_owned())),
        Some(("authorization", format!("Bearer {wrong}"))),
    ] {
        let r = send(
            &client,
            post(&gate.url, "/api/v3/brokerage/orders", auth.clone()),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{auth:?}: {}", r.text());
        let r = send(
            &client,
            post(&gate.url, "/v2/accounts/a/transactions", auth.clone()),
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{auth:?}: {}", r.text());
        let m = r.json()["message"].as_str().unwrap_or_default().to_owned();
        assert!(m.contains("cbgate's permission ceiling \"trade\""), "{m}");
        assert!(!m.contains("client identity"), "{m}");
    }
    let metrics = gate.proxy.metrics().render();
    assert!(
        metrics.contains(r#"cbgate_client_requests_total{identity="anonymous",route="/api/v3/",method="POST",status="2xx"} 3"#),
        "{metrics}"
    );
    gate.stop().await;
}

#[tokio::test]
async fn client_token_file_is_the_default_identity_beside_named_ones() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = three_identities(&up, dir.path());
    cfg.policy.permission = Permission::Trade;
    cfg.clients.named.remove("ops");
    let legacy = "legacy-token-0123456789abc";
    cfg.client_token_file = Some(write_private(dir.path(), "client.token", legacy.as_bytes()));
    let gate = Served::tcp(cfg, &key).await;
    let client = h1_client();
    // Required, as client_token_file always was.
    let r = send(&client, post(&gate.url, "/api/v3/brokerage/orders", None)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    for auth in spellings(legacy) {
        let r = send(
            &client,
            post(&gate.url, "/api/v3/brokerage/orders", Some(auth)),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let r = send(
        &client,
        post(
            &gate.url,
            "/api/v3/brokerage/orders",
            Some(("cbgate-token", VIEWER_TOKEN.into())),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    let metrics = gate.proxy.metrics().render();
    assert!(
        metrics.contains(r#"cbgate_client_requests_total{identity="default",route="/api/v3/",method="POST",status="2xx"} 2"#),
        "{metrics}"
    );
    gate.stop().await;

    // One token for two identities is refused at start.
    let mut cfg = three_identities(&up, dir.path());
    cfg.client_token_file = Some(write_private(dir.path(), "dup.token", OPS_TOKEN.as_bytes()));
    let default = read_token_file(cfg.client_token_file.as_deref().expect("set")).expect("read");
    let e = Proxy::new(&cfg, None)
        .expect("proxy")
        .with_client_token(Some(default), &cfg)
        .with_client_tokens(ClientTokens::read(&cfg).expect("read"))
        .expect_err("one token, two identities")
        .to_string();
    assert!(
        e.contains("client_token_file") && e.contains("clients.ops.token_file"),
        "{e}"
    );
    assert!(!e.contains(OPS_TOKEN), "{e}");
}

#[test]
fn token_files_are_checked_like_the_key_file() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = "open-token-0123456789abcdef";
    let file = write_private(dir.path(), "open.token", secret.as_bytes());
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let short = write_private(dir.path(), "short.token", b"short");
    let config = dir.path().join("cbgate.toml");
    for (token_file, phrase) in [
        (&file, "mode 0644"),
        (&short, "at least 16"),
        (&dir.path().join("absent.token"), "does not exist"),
    ] {
        std::fs::write(
            &config,
            format!(
                "[clients.dash]\ntoken_file = \"{}\"\npermission = \"view\"\n",
                token_file.display()
            ),
        )
        .expect("write config");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cbgate"))
            .args(["check", "--config"])
            .arg(&config)
            .env_remove("COINBASE_API_KEY")
            .env_remove("COINBASE_API_SECRET")
            .env_remove("CBGATE_CONFIG")
            .output()
            .expect("run cbgate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("clients.dash.token_file") && stderr.contains(phrase),
            "{phrase}: {stderr}"
        );
        assert!(!stderr.contains(&secret[..16]), "{stderr}");
    }
    // The admin endpoints' token may not be a client's: that client could halt and resume.
    let client = write_private(dir.path(), "client.token", secret.as_bytes());
    let admin = write_private(dir.path(), "admin.token", format!("{secret}\n").as_bytes());
    std::fs::write(
        &config,
        format!(
            "admin_token_file = \"{}\"\n[clients.dash]\ntoken_file = \"{}\"\n",
            admin.display(),
            client.display()
        ),
    )
    .expect("write config");
    let out = harness::cbgate_command()
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("run cbgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("admin_token_file") && stderr.contains("clients.dash.token_file"),
        "{stderr}"
    );
    assert!(!stderr.contains(&secret[..16]), "{stderr}");
    // A good one: check lists the identities; one token in two files is refused, naming both.
    let good = write_private(dir.path(), "good.token", secret.as_bytes());
    let same = write_private(dir.path(), "same.token", format!("{secret}\n").as_bytes());
    let check = |text: String| {
        std::fs::write(&config, text).expect("write config");
        harness::cbgate_command()
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .expect("run cbgate")
    };
    let out = check(format!(
        "[clients.dash]\ntoken_file = \"{}\"\npermission = \"view\"\n[clients.bot]\nunix_uid = 1001\n",
        good.display()
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("clients: bot (unix_uid 1001, trade); dash (token, view); no known identity: served as anonymous"),
        "{stdout}"
    );
    assert!(
        stdout.contains("warning: client identities bot are recognised only by unix_uid/unix_gid"),
        "no Unix listener: {stdout}"
    );
    let out = check(format!(
        "[clients.dash]\ntoken_file = \"{}\"\n[clients.bot]\ntoken_file = \"{}\"\n",
        good.display(),
        same.display()
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("clients.bot.token_file") && stderr.contains("clients.dash.token_file"),
        "{stderr}"
    );
    assert!(!stderr.contains(&secret[..16]), "{stderr}");
}

/// Runs curl as `uid`/`gid` against the Unix socket; returns (status, body), or `None` when
/// it could not connect.
async fn curl_as(
    uid: u32,
    gid: u32,
    sock: &Path,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Option<(u16, String)> {
    curl_as_with(uid, gid, sock, method, path, token, false).await
}

/// [`curl_as`], over h2c (prior knowledge) when `h2`; checks that h2 was spoken.
async fn curl_as_with(
    uid: u32,
    gid: u32,
    sock: &Path,
    method: &str,
    path: &str,
    token: Option<&str>,
    h2: bool,
) -> Option<(u16, String)> {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-q", "-sS", "--max-time", "10", "--unix-socket"])
        .arg(sock)
        .args(["-X", method, "-H", "content-type: application/json"])
        .args(["-o", "-", "-w", "\n%{http_version} %{http_code}"]);
    if h2 {
        cmd.arg("--http2-prior-knowledge");
    }
    if method == "POST" {
        cmd.args(["--data", ORDER]);
    }
    if let Some(t) = token {
        cmd.args(["-H", &format!("cbgate-token: {t}")]);
    }
    cmd.arg(format!("http://localhost{path}"));
    if uid != rustix::process::geteuid().as_raw() {
        cmd.gid(gid).uid(uid);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run curl (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "curl as {uid}: {method} {path}: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let (body, last) = text.rsplit_once('\n')?;
    let (version, code) = last.trim().split_once(' ')?;
    if h2 && code != "000" {
        assert_eq!(version, "2", "curl spoke HTTP/{version}, not h2c");
    }
    match code.trim().parse::<u16>() {
        Ok(0) | Err(_) => None,
        Ok(c) => Some((c, body.to_owned())),
    }
}

#[tokio::test]
async fn unix_peer_credentials_pick_the_identity() {
    use std::os::unix::fs::PermissionsExt as _;
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Other uids must reach the socket through its directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let me = rustix::process::geteuid().as_raw();
    let root = me == 0;
    let (viewer_uid, trader_uid, group_gid, stranger) = if root {
        (61001, 61002, 61003, 61009)
    } else {
        // Without root no child can take another uid: test cbgate's own uid only.
        eprintln!("not root: only the test's own uid is exercised");
        (me, u32::MAX - 1, u32::MAX - 2, u32::MAX - 3)
    };
    let token_file = write_private(dir.path(), "ops.token", OPS_TOKEN.as_bytes());

    let build = |mode: u32, sock: &Path| {
        let mut cfg = up.config();
        cfg.policy.permission = Permission::Trade;
        cfg.listen = vec![ListenAddr::Unix(sock.to_owned())];
        cfg.unix_mode = cbgate::config::UnixMode(mode);
        cfg.clients.require = true;
        let by = |uid: Option<u32>, gid: Option<u32>, p: Permission| ClientConfig {
            unix_uid: uid,
            unix_gid: gid,
            permission: Some(p),
            ..ClientConfig::default()
        };
        cfg.clients.named.insert(
            "viewer".into(),
            by(Some(viewer_uid), None, Permission::View),
        );
        cfg.clients.named.insert(
            "trader".into(),
            by(Some(trader_uid), None, Permission::Trade),
        );
        cfg.clients
            .named
            .insert("staff".into(), by(None, Some(group_gid), Permission::View));
        cfg.clients
            .named
            .insert("ops".into(), identity(Some(token_file.clone()), None));
        cfg
    };

    let sock = dir.path().join("cbgate.sock");
    let cfg = build(0o666, &sock);
    let listener = Listener::bind_mode(&cfg.listen[0], cfg.unix_mode.0)
        .await
        .expect("bind unix");
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o666);
    let gate = Served::start(cfg, &key, vec![listener]).await;

    let orders = "/api/v3/brokerage/orders";
    // The viewer's uid reads but cannot order; the refusal names it.
    let (s, body) = curl_as(
        viewer_uid,
        viewer_uid,
        &sock,
        "GET",
        "/api/v3/brokerage/accounts",
        None,
    )
    .await
    .expect("viewer connects");
    assert_eq!(s, 200, "{body}");
    let (s, body) = curl_as(viewer_uid, viewer_uid, &sock, "POST", orders, None)
        .await
        .expect("viewer connects");
    assert_eq!(s, 403, "{body}");
    assert!(body.contains(r#"client identity \"viewer\""#), "{body}");
    // h2c on the same socket: every stream of the connection carries the peer. (No request
    // body here: curl 7.88 reports the RST_STREAM(NO_ERROR) that follows an early 403 to a
    // POST whose body it is still sending as a framing error.)
    let (s, body) = curl_as_with(viewer_uid, viewer_uid, &sock, "DELETE", orders, None, true)
        .await
        .expect("viewer connects");
    assert_eq!(s, 403, "{body}");
    assert!(body.contains(r#"client identity \"viewer\""#), "{body}");
    let (s, body) = curl_as_with(
        viewer_uid,
        viewer_uid,
        &sock,
        "GET",
        "/api/v3/brokerage/accounts",
        None,
        true,
    )
    .await
    .expect("viewer connects");
    assert_eq!(s, 200, "{body}");
    // A token beats the peer's uid: the viewer's process holding the ops token is ops.
    let (s, body) = curl_as(
        viewer_uid,
        viewer_uid,
        &sock,
        "POST",
        orders,
        Some(OPS_TOKEN),
    )
    .await
    .expect("viewer connects");
    assert_eq!(s, 200, "{body}");
    if root {
        let (s, body) = curl_as(trader_uid, trader_uid, &sock, "POST", orders, None)
            .await
            .expect("trader connects");
        assert_eq!(s, 200, "{body}");
        // Recognised by the primary gid.
        let (s, body) = curl_as(stranger, group_gid, &sock, "POST", orders, None)
            .await
            .expect("staff connects");
        assert_eq!(s, 403, "{body}");
        assert!(body.contains("staff"), "{body}");
        let (s, body) = curl_as(
            stranger,
            group_gid,
            &sock,
            "GET",
            "/api/v3/brokerage/accounts",
            None,
        )
        .await
        .expect("staff connects");
        assert_eq!(s, 200, "{body}");
        // An unknown uid and gid: refused (clients.require), naming its uid, not served.
        let (s, body) = curl_as(
            stranger,
            stranger,
            &sock,
            "GET",
            "/api/v3/brokerage/accounts",
            None,
        )
        .await
        .expect("stranger connects");
        assert_eq!(s, 401, "{body}");
        assert!(body.contains(&format!("uid {stranger}")), "{body}");
        // root itself is no configured identity either.
        let (s, _) = curl_as(0, 0, &sock, "GET", "/api/v3/brokerage/accounts", None)
            .await
            .expect("root connects");
        assert_eq!(s, 401);
    }
    let metrics = gate.proxy.metrics().render();
    assert!(
        metrics.contains(r#"cbgate_client_requests_total{identity="viewer",route="/api/v3/",method="POST",status="4xx"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"cbgate_client_requests_total{identity="viewer",route="/api/v3/",method="DELETE",status="4xx"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"cbgate_client_requests_total{identity="ops",route="/api/v3/",method="POST",status="2xx"} 1"#),
        "{metrics}"
    );
    if root {
        assert!(
            metrics.contains(r#"cbgate_client_requests_total{identity="trader",route="/api/v3/",method="POST",status="2xx"} 1"#),
            "{metrics}"
        );
        assert!(
            metrics.contains(r#"cbgate_client_requests_total{identity="staff",route="/api/v3/",method="GET",status="2xx"} 1"#),
            "{metrics}"
        );
    }
    gate.stop().await;

    // The default mode 0600: no other uid can even connect.
    if root {
        let sock = dir.path().join("private.sock");
        let cfg = build(0o600, &sock);
        let listener = Listener::bind_mode(&cfg.listen[0], cfg.unix_mode.0)
            .await
            .expect("bind unix");
        let gate = Served::start(cfg, &key, vec![listener]).await;
        let got = curl_as(
            viewer_uid,
            viewer_uid,
            &sock,
            "GET",
            "/api/v3/brokerage/accounts",
            None,
        )
        .await;
        assert_eq!(got, None, "a 0600 socket refuses other uids at connect");
        gate.stop().await;
    }
}

#[tokio::test]
async fn the_binary_serves_identities_and_logs_their_names_never_their_tokens() {
    use std::os::unix::fs::PermissionsExt as _;
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("cbgate.sock");
    let viewer_file = write_private(dir.path(), "viewer.token", VIEWER_TOKEN.as_bytes());
    let me = rustix::process::geteuid().as_raw();
    let cfg = dir.path().join("cbgate.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"listen = ["unix:{sock}"]
unix_mode = "0660"
admin_listen = "127.0.0.1:{admin}"

[log]
format = "json"

[upstream]
ca_file = "{ca}"

[upstream.resolve]
"api.coinbase.com" = "{mock}"

[clients]
require = true

[clients.viewer]
token_file = "{viewer}"
permission = "view"

[clients.bot]
unix_uid = {me}
"#,
            sock = sock.display(),
            admin = harness::free_port(),
            ca = up.ca_file.display(),
            mock = up.mock.addr,
            viewer = viewer_file.display(),
        ),
    )
    .expect("write config");
    let mut cmd = harness::cbgate_command();
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .env("COINBASE_API_KEY", &key.name)
        .env("COINBASE_API_SECRET", key.secret.replace('\n', "\\n"))
        .env("RUST_LOG", "trace");
    let mut p = harness::Process::spawn(cmd);
    let probe = sock.clone();
    p.wait_until("the socket is served", || {
        std::os::unix::net::UnixStream::connect(&probe).is_ok()
    })
    .await;
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660, "unix_mode applied");

    let order = |token: Option<&str>| {
        let mut b = Request::post("/api/v3/brokerage/orders")
            .header("host", "localhost")
            .header("content-type", "application/json");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(Full::new(Bytes::from_static(ORDER.as_bytes())))
            .expect("request")
    };
    // This process's uid is the bot (trade): its order passes.
    let r = harness::send_unix(&sock, order(None)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // The same process with the viewer's token is the viewer (view): refused.
    let r = harness::send_unix(&sock, order(Some(VIEWER_TOKEN))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert!(r.text().contains("viewer"), "{}", r.text());
    p.signal("TERM");
    let (_, out) = p.wait_exit().await;

    let lines: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let request_line = |who: &str, status: u64| {
        lines.iter().any(|l| {
            l["fields"]["message"] == "request"
                && l["fields"]["identity"] == who
                && l["fields"]["status"] == status
        })
    };
    assert!(request_line("bot", 200), "{out}");
    assert!(request_line("viewer", 403), "{out}");
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["identified_by"] == "unix_uid"),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "client identity"
                && l["fields"]["identity"] == "viewer"),
        "{out}"
    );
    // Trace level, every path above: no 16-character piece of the token anywhere.
    for w in VIEWER_TOKEN.as_bytes().windows(16) {
        let w = String::from_utf8_lossy(w);
        assert!(!out.contains(w.as_ref()), "token piece {w:?} in the output");
    }
}

#[test]
fn the_readme_example_is_a_valid_configuration() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    let section = readme
        .split("\n## Client identities\n")
        .nth(1)
        .expect("the Client identities section");
    let toml = section
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a toml block");
    let cfg = Config::from_toml_str(toml).expect("the README example loads");
    assert!(cfg.clients.require);
    let names: Vec<&str> = cfg.clients.named.keys().map(String::as_str).collect();
    assert_eq!(names, ["bot", "dashboard", "ops"]);
    assert_eq!(
        cfg.clients.named["dashboard"].permission,
        Some(Permission::View)
    );
}

/// A GET of the accounts as the identity holding `token`.
fn get_as(url: &str, token: &str) -> Request<Full<Bytes>> {
    Request::get(format!("{url}/api/v3/brokerage/accounts"))
        .header("cbgate-token", token)
        .body(Full::new(Bytes::new()))
        .expect("request")
}

/// The rate budget's queue takes turns per identity: a bot flooding a shared key's budget
/// cannot starve another program using the same key, and `budget_share` caps one identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_serves_identities_in_turn_and_caps_a_share() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = three_identities(&up, dir.path());
    // 10/s with a burst of 2, waits of up to 1 s: the greedy identity alone wants 6x that.
    cfg.budget.advanced_private = cbgate::config::ClassLimit {
        rate: 10.0,
        per: Duration::from_secs(1),
        burst: Some(2),
    };
    cfg.budget.max_wait = Duration::from_secs(1);
    // "trader" may use a quarter of the rate at most.
    cfg.clients
        .named
        .get_mut("trader")
        .expect("trader")
        .budget_share = Some(rust_decimal::Decimal::new(25, 2));
    let gate = Served::tcp(cfg, &key).await;
    let client = h1_client();

    let greedy: Vec<_> = (0..60)
        .map(|_| {
            let (c, url) = (client.clone(), gate.url.clone());
            tokio::spawn(async move { send(&c, get_as(&url, OPS_TOKEN)).await.status })
        })
        .collect();
    // The polite program starts after the flood is queued, one request at a time.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..4 {
        let r = send(&client, get_as(&gate.url, VIEWER_TOKEN)).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "polite request {i} behind a flood of 60: {}",
            String::from_utf8_lossy(&r.body)
        );
        // Its turn comes next, not after the flood's queue (which holds up to max_wait = 1 s
        // of requests): a FIFO queue would make it wait about a second.
        let queued: u64 = r
            .headers
            .get("x-cbgate-queued-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("x-cbgate-queued-ms");
        assert!(
            queued < 500,
            "polite request {i} queued {queued} ms behind the flood"
        );
    }
    let mut greedy_refused = 0;
    for t in greedy {
        if t.await.expect("task") == StatusCode::TOO_MANY_REQUESTS {
            greedy_refused += 1;
        }
    }
    assert!(
        greedy_refused > 0,
        "60 requests in about 1 s of a 10/s budget: some must be refused"
    );

    // The capped identity alone, on a budget that has refilled: at most its share of the rate
    // (plus the burst) in two seconds, however many it sends.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = up.mock.requests().len();
    let started = std::time::Instant::now();
    let capped: Vec<_> = (0..30)
        .map(|_| {
            let (c, url) = (client.clone(), gate.url.clone());
            tokio::spawn(async move { send(&c, get_as(&url, TRADER_TOKEN)).await.status })
        })
        .collect();
    let mut served = 0;
    for t in capped {
        if t.await.expect("task") == StatusCode::OK {
            served += 1;
        }
    }
    let span = started.elapsed().as_secs_f64();
    assert_eq!(up.mock.requests().len() - before, served);
    let most = 2.0 + 10.0 * 0.25 * span + 1.0;
    assert!(
        (served as f64) <= most,
        "a 0.25 share of 10/s served {served} in {span:.2} s (at most {most:.1})"
    );
    assert!(served >= 1, "the capped identity was never served");
    gate.stop().await;
}

// ---------------------------------------------------------------------------
// Which credentials an identity may use: clients.NAME.keys and default_key
// ---------------------------------------------------------------------------

const BOT_TOKEN: &str = "bot-token-5e2a9c7f1d3b";
const ANY_TOKEN: &str = "any-token-0b7d3f9e5a1c";

/// `[key]` (`default`), `[keys.bot]` and `[keys.ops]`, all accepted by the mock (by kid); a
/// route `/api/v3/brokerage/portfolios` signed with `ops`; identities `bot` (keys = ["bot"],
/// default_key = "bot") and `any` (every key, default_key = "ops"), by token.
struct KeyedSetup {
    default: TestKey,
    bot: TestKey,
    ops: TestKey,
    up: Upstream,
    dir: tempfile::TempDir,
}

impl KeyedSetup {
    async fn start() -> KeyedSetup {
        let default = TestKey::generate(KeyForm::P256Sec1);
        let bot = TestKey::generate(KeyForm::Ed25519B64_64);
        let ops = TestKey::generate(KeyForm::P256Pkcs8);
        let up = Upstream::start_with(common::mock::MockOptions {
            key: Some(default.expected.clone()),
            also_accept: vec![bot.expected.clone(), ops.expected.clone()],
            ..Default::default()
        })
        .await;
        let dir = tempfile::tempdir().expect("tempdir");
        KeyedSetup {
            default,
            bot,
            ops,
            up,
            dir,
        }
    }

    fn config(&self) -> Config {
        let dir = self.dir.path();
        let mut cfg = self.up.config();
        for (name, key) in [("bot", &self.bot), ("ops", &self.ops)] {
            let sub = dir.join(name);
            std::fs::create_dir_all(&sub).expect("mkdir");
            cfg.keys.insert(
                name.into(),
                cbgate::config::NamedKeyConfig {
                    file: Some(key.write_json(&sub)),
                    ..Default::default()
                },
            );
        }
        let mut by_route = cbgate::config::RouteConfig::new(
            "/api/v3/brokerage/portfolios",
            "https://api.coinbase.com",
        );
        by_route.key = Some("ops".into());
        cfg.routes.insert(0, by_route);
        for (name, token, keys, default_key) in [
            ("bot", BOT_TOKEN, Some(vec!["bot".to_owned()]), "bot"),
            ("any", ANY_TOKEN, None, "ops"),
        ] {
            let file = write_private(dir, &format!("{name}.token"), token.as_bytes());
            cfg.clients.named.insert(
                name.into(),
                ClientConfig {
                    token_file: Some(file),
                    keys,
                    default_key: Some(default_key.into()),
                    ..ClientConfig::default()
                },
            );
        }
        cfg
    }
}

fn get_with(url: &str, path: &str, token: Option<&str>, key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::get(format!("{url}{path}"));
    if let Some(t) = token {
        b = b.header("cbgate-token", t);
    }
    if let Some(k) = key {
        b = b.header("cbgate-key", k);
    }
    b.body(Full::new(Bytes::new())).expect("request")
}

/// How many budget tokens of `class` were taken (`cbgate_budget_wait_seconds_count`).
fn budget_taken(proxy: &Proxy, class: &str) -> u64 {
    let metrics = proxy.metrics().render();
    let prefix = format!("cbgate_budget_wait_seconds_count{{class=\"{class}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |n| n.trim().parse().expect("a count"))
}

#[tokio::test]
async fn identity_keys_limit_and_default_key_picks_the_credential() {
    let s = KeyedSetup::start().await;
    let mut cfg = s.config();
    let audit_file = s.dir.path().join("audit.log");
    cfg.audit.file = Some(audit_file.clone());
    let gate = Served::tcp(cfg, &s.default).await;
    let client = h1_client();
    const ACCOUNTS: &str = "/api/v3/brokerage/accounts";
    const PORTFOLIOS: &str = "/api/v3/brokerage/portfolios";

    // Served: (token, cbgate-key, path) -> the key the mock saw sign it.
    for (token, key, path, want, why) in [
        (Some(BOT_TOKEN), None, ACCOUNTS, &s.bot, "bot's default_key"),
        (
            Some(BOT_TOKEN),
            Some("bot"),
            PORTFOLIOS,
            &s.bot,
            "the header beats the route's key",
        ),
        (Some(ANY_TOKEN), None, ACCOUNTS, &s.ops, "any's default_key"),
        (
            Some(ANY_TOKEN),
            Some("default"),
            ACCOUNTS,
            &s.default,
            "the header beats default_key",
        ),
        (
            Some(ANY_TOKEN),
            Some("bot"),
            PORTFOLIOS,
            &s.bot,
            "any may use every key",
        ),
        (
            Some(ANY_TOKEN),
            None,
            PORTFOLIOS,
            &s.ops,
            "the route's key beats default_key",
        ),
        (
            None,
            None,
            ACCOUNTS,
            &s.default,
            "anonymous: the global default",
        ),
        (None, Some("bot"), ACCOUNTS, &s.bot, "anonymous: any key"),
    ] {
        let r = send(&client, get_with(&gate.url, path, token, key)).await;
        assert_eq!(r.status, StatusCode::OK, "{why}: {}", r.text());
        let rec = up_last(&s.up);
        match &rec.auth {
            AuthOutcome::Valid { kid, .. } => assert_eq!(kid, &want.name, "{why}"),
            other => panic!("{why}: not verified: {other:?}"),
        }
        assert!(
            rec.headers.get("cbgate-key").is_none(),
            "{why}: header stripped"
        );
    }
    let forwarded = s.up.mock.requests().len();
    let taken = budget_taken(&gate.proxy, "advanced_private");
    assert_eq!(
        taken, forwarded as u64,
        "one budget token per forwarded request"
    );

    // Refused: bot may use only "bot", by header or by the route's key.
    for (key, path, from) in [
        (Some("ops"), ACCOUNTS, "the cbgate-key header"),
        (Some("default"), ACCOUNTS, "the cbgate-key header"),
        (None, PORTFOLIOS, "the route's key"),
    ] {
        let r = send(&client, get_with(&gate.url, path, Some(BOT_TOKEN), key)).await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "{key:?} {path}: {}",
            r.text()
        );
        assert_eq!(r.cbgate_error(), Some("key_not_allowed"), "{}", r.text());
        let v = r.json();
        let m = v["message"].as_str().unwrap_or_default();
        let asked = key.unwrap_or("ops");
        assert!(
            m.contains(&format!("credential {asked} ({from})"))
                && m.contains("client identity \"bot\"")
                && m.contains("clients.bot.keys: bot"),
            "names the key, where it came from and the identity: {m}"
        );
        // Both error shapes, as every other refusal.
        assert_eq!(v["errorType"], "key_not_allowed");
        assert_eq!(v["errorMessage"], m);
        assert!(!r.text().contains(BOT_TOKEN));
    }
    assert_eq!(
        s.up.mock.requests().len(),
        forwarded,
        "a refused request reached Coinbase"
    );
    assert_eq!(
        budget_taken(&gate.proxy, "advanced_private"),
        taken,
        "a refused request spent a budget token"
    );
    // An order from bot through its default_key: the audit intent names the key "bot"; the
    // refusal names the key asked for, not [key]'s.
    let order = |key: Option<&str>| {
        let mut b = Request::post(format!("{}/api/v3/brokerage/orders", gate.url))
            .header("content-type", "application/json")
            .header("cbgate-token", BOT_TOKEN);
        if let Some(k) = key {
            b = b.header("cbgate-key", k);
        }
        b.body(Full::new(Bytes::from_static(ORDER.as_bytes())))
            .expect("request")
    };
    let r = send(&client, order(None)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = send(&client, order(Some("ops"))).await;
    assert_eq!(r.cbgate_error(), Some("key_not_allowed"));
    let metrics = gate.proxy.metrics().render();
    assert!(
        metrics.contains(r#"cbgate_client_requests_total{identity="bot",route="/api/v3/",method="POST",status="4xx"} 1"#),
        "{metrics}"
    );
    // Who used which key: by the key that signed, never the one a refused request named.
    for line in [
        r#"cbgate_key_requests_total{key="bot",identity="bot",status="2xx"} 3"#,
        r#"cbgate_key_requests_total{key="ops",identity="any",status="2xx"} 2"#,
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert!(
        !metrics.contains(r#"cbgate_key_requests_total{key="ops",identity="bot""#),
        "{metrics}"
    );
    gate.stop().await;
    let text = std::fs::read_to_string(&audit_file).expect("audit log");
    let recs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let intent = recs
        .iter()
        .find(|r| r["type"] == "intent" && r["identity"] == "bot")
        .unwrap_or_else(|| panic!("bot's intent record in {text}"));
    assert_eq!(intent["key"], "bot", "{text}");
    let refusal = recs
        .iter()
        .rfind(|r| r["type"] == "refusal" && r["identity"] == "bot")
        .unwrap_or_else(|| panic!("bot's refusal record in {text}"));
    assert_eq!(refusal["key"], "ops", "{text}");
    assert!(!text.contains(BOT_TOKEN));
}

fn up_last(up: &Upstream) -> common::mock::Recorded {
    up.mock
        .requests()
        .pop()
        .expect("a request reached the mock")
}

#[tokio::test]
async fn a_websocket_upgrade_with_a_key_the_identity_may_not_use_is_refused() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::Error as WsError;
    let s = KeyedSetup::start().await;
    let ws = common::ws_mock::WsUpstream::start(common::ws_mock::WsMockOptions::default()).await;
    let mut cfg = s.config();
    // The WebSocket hosts go to the WebSocket mock, trusted by its own CA.
    let ws_cfg = ws.config();
    cfg.upstream.ca_file = ws_cfg.upstream.ca_file.clone();
    cfg.upstream.resolve = ws_cfg.upstream.resolve.clone();
    let gate = Served::tcp(cfg, &s.default).await;
    let addr = gate.addr.expect("tcp");
    let upgrade = |key: Option<&'static str>| async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut req = format!("ws://{addr}/ws/user")
            .into_client_request()
            .expect("request");
        req.headers_mut()
            .insert("cbgate-token", http::HeaderValue::from_static(BOT_TOKEN));
        if let Some(k) = key {
            req.headers_mut()
                .insert("cbgate-key", http::HeaderValue::from_static(k));
        }
        tokio::time::timeout(
            Duration::from_secs(20),
            tokio_tungstenite::client_async(req, tcp),
        )
        .await
        .expect("handshake within 20 s")
    };
    for key in ["ops", "default"] {
        match upgrade(Some(key)).await {
            Err(WsError::Http(resp)) => {
                assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{key}");
                assert_eq!(
                    resp.headers()
                        .get("x-cbgate-error")
                        .and_then(|v| v.to_str().ok()),
                    Some("key_not_allowed"),
                    "{key}"
                );
                let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
                    .into_owned();
                let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
                let m = v["message"].as_str().unwrap_or_default();
                assert!(
                    m.contains(&format!("credential {key} (the cbgate-key header)"))
                        && m.contains("client identity \"bot\""),
                    "{body}"
                );
            }
            Ok(_) => panic!("bot upgraded with the {key} key"),
            Err(e) => panic!("{key}: {e}"),
        }
    }
    assert_eq!(
        ws.mock.connections(),
        0,
        "a refused upgrade reached Coinbase"
    );
    assert_eq!(
        budget_taken(&gate.proxy, "ws_connect"),
        0,
        "a refused upgrade spent a token"
    );
    // Control: bot's own key (its default_key) upgrades.
    let (mut client, resp) = upgrade(None).await.expect("bot's own key upgrades");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(ws.mock.upgrades().len(), 1);
    assert_eq!(budget_taken(&gate.proxy, "ws_connect"), 1);
    let _ = futures_util::SinkExt::close(&mut client).await;
    gate.stop().await;
}

#[tokio::test]
async fn client_tokens_are_read_again_on_sighup_all_or_nothing() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = three_identities(&up, dir.path());
    cfg.clients.require = true;
    let gate = Served::tcp(cfg, &key).await;
    let client = h1_client();
    let status = |token: &'static str| {
        let client = &client;
        let url = gate.url.clone();
        async move { send(client, get_as(&url, token)).await.status }
    };
    assert_eq!(status(VIEWER_TOKEN).await, StatusCode::OK);
    const NEW_VIEWER: &str = "viewer-token-rotated-77aa31";
    write_private(dir.path(), "viewer.token", NEW_VIEWER.as_bytes());
    // Not before the reload: tokens are read at start and on SIGHUP only.
    assert_eq!(status(NEW_VIEWER).await, StatusCode::UNAUTHORIZED);
    cbgate::ops::reload::reload_client_tokens(&gate.proxy);
    assert_eq!(status(NEW_VIEWER).await, StatusCode::OK);
    assert_eq!(
        status(VIEWER_TOKEN).await,
        StatusCode::UNAUTHORIZED,
        "the old token is gone"
    );
    assert_eq!(
        status(TRADER_TOKEN).await,
        StatusCode::OK,
        "the others stay"
    );

    // One bad file: nothing changes (the good new trader token is not taken either).
    write_private(dir.path(), "trader.token", b"trader-token-rotated-0042aa");
    write_private(dir.path(), "ops.token", b"short");
    let e = gate
        .proxy
        .identities()
        .reload_tokens(None)
        .expect_err("a short token is refused");
    assert!(
        e.contains("clients.ops.token_file") && !e.contains("short"),
        "{e}"
    );
    assert_eq!(status(OPS_TOKEN).await, StatusCode::OK);
    assert_eq!(status(TRADER_TOKEN).await, StatusCode::OK);
    assert_eq!(
        status("trader-token-rotated-0042aa").await,
        StatusCode::UNAUTHORIZED
    );
    // Two identities with one token: refused as at start.
    write_private(dir.path(), "ops.token", NEW_VIEWER.as_bytes());
    let e = gate
        .proxy
        .identities()
        .reload_tokens(None)
        .expect_err("shared");
    assert!(e.contains("the same token"), "{e}");
    // A client token equal to the admin token: refused.
    write_private(dir.path(), "ops.token", OPS_TOKEN.as_bytes());
    let e = gate
        .proxy
        .identities()
        .reload_tokens(Some(OPS_TOKEN))
        .expect_err("admin");
    assert!(
        e.contains("clients.ops.token_file") && e.contains("admin_token_file"),
        "{e}"
    );
    assert_eq!(status(NEW_VIEWER).await, StatusCode::OK);
    gate.stop().await;
}
