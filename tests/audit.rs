//! The audit log over real sockets: orders through cbgate leave intent and result records (with
//! the order summary and Coinbase's order id) and refusals leave refusal records; the chain
//! verifies across rotation and `audit verify` names an edited, deleted, reordered or truncated
//! record; 50 concurrent POSTs never interleave; a SIGKILL while an order is upstream leaves its
//! intent on disk, and a restart resumes the chain. No record holds the secret or a JWT.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;

use cbgate::ops::audit::{self, Problem, VerifyError};
use common::harness::{
    assert_no_secret, cbgate_command, free_port, h1_client, http_get, send, Gate, KeyForm, Process,
    TestKey, Upstream,
};
use common::mock::MockOptions;

fn order_body(i: usize) -> String {
    serde_json::json!({
        "client_order_id": format!("client-{i}"),
        "product_id": "BTC-USD",
        "side": "BUY",
        "order_configuration": {"limit_limit_gtc": {"base_size": "0.001", "limit_price": "10000.00"}},
    })
    .to_string()
}

fn post(url: &str, path: &str, id: &str, body: String) -> Request<Full<Bytes>> {
    Request::post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .header("x-request-id", id)
        .body(Full::new(Bytes::from(body)))
        .expect("request")
}

/// `audit.log.N ... audit.log.1 audit.log`, oldest first, those that exist.
fn log_files(log: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = (1..=20)
        .rev()
        .map(|n| PathBuf::from(format!("{}.{n}", log.display())))
        .filter(|p| p.exists())
        .collect();
    files.push(log.to_owned());
    files
}

/// Every record of the log, in order; panics on a line that is not JSON.
fn records(log: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for f in log_files(log) {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for line in text.lines() {
            out.push(
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{}: line is not JSON ({e}): {line}", f.display())),
            );
        }
    }
    out
}

/// Waits (5 s at most) until the log holds `n` records: result records are written when a
/// response body ends, which may be just after the client has read it.
async fn wait_records(log: &Path, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = records(log);
        if r.len() >= n || std::time::Instant::now() > deadline {
            assert_eq!(r.len(), n, "records: {r:#?}");
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn of_type<'a>(records: &'a [Value], kind: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["type"] == kind).collect()
}

/// The key's secret and every JWT the mock received are absent from all of the log's files.
fn assert_log_holds_no_secret(log: &Path, key: &TestKey, up: &Upstream) {
    let all: String = log_files(log)
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap_or_default())
        .collect();
    assert_no_secret(&all, &key.secret, "audit log");
    // The same 16-character window check for every JWT, through a set of the log's windows
    // (assert_no_secret per token is quadratic: too slow for 50 tokens in a debug build).
    let windows: std::collections::HashSet<&[u8]> = all.as_bytes().windows(16).collect();
    let mut jwts = 0;
    for r in up.mock.requests() {
        if let Some(v) = r.headers.get("authorization") {
            let token = v.to_str().expect("ascii").trim_start_matches("Bearer ");
            if jwts == 0 {
                assert_no_secret(&all, token, "audit log (JWT)");
            }
            for w in token.as_bytes().windows(16) {
                assert!(
                    !windows.contains(w),
                    "audit log contains part of a JWT: {:?}",
                    String::from_utf8_lossy(w)
                );
            }
            jwts += 1;
        }
    }
    assert!(jwts > 0, "the mock saw signed requests");
    assert!(!all.to_ascii_lowercase().contains("bearer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_and_refusals_are_recorded_and_verify_names_the_first_broken_record() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start_with(MockOptions {
        key: Some(key.expected.clone()),
        realistic: true,
        ..MockOptions::default()
    })
    .await;
    let log = up.dir.path().join("audit.log");
    let mut cfg = up.config();
    cfg.audit.file = Some(log.clone());
    // Small enough that ten orders rotate the file a few times.
    cfg.audit.max_file_bytes = 3000;
    cfg.audit.keep = 5;
    cfg.policy.rules.push(cbgate::config::RuleConfig {
        action: cbgate::config::RuleAction::Deny,
        methods: vec!["GET".into()],
        path: "/api/v3/brokerage/portfolios".into(),
    });
    let gate = Gate::start(cfg, Some(&key)).await;
    let client = h1_client();

    for i in 0..10 {
        let r = send(
            &client,
            post(
                &gate.url,
                "/api/v3/brokerage/orders",
                &format!("order-{i}"),
                order_body(i),
            ),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    // Not JSON: recorded, without a summary. The query stays out of the record.
    let r = send(
        &client,
        post(
            &gate.url,
            "/api/v3/brokerage/orders/preview?account=abc123",
            "not-json",
            "hello".into(),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    // Refused by the permission ceiling (trade: no transfers), and a GET refused by a rule.
    let r = send(
        &client,
        post(
            &gate.url,
            "/v2/accounts/a1/transactions",
            "transfer",
            "{}".into(),
        ),
    )
    .await;
    assert_eq!(r.cbgate_error(), Some("policy_denied"));
    let req = Request::get(format!("{}/api/v3/brokerage/portfolios", gate.url))
        .header("x-request-id", "denied-get")
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(
        send(&client, req).await.cbgate_error(),
        Some("policy_denied")
    );
    // A plain GET is not recorded.
    let req = Request::get(format!("{}/api/v3/brokerage/accounts", gate.url))
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(send(&client, req).await.status, StatusCode::OK);

    let recs = wait_records(&log, 11 * 2 + 2).await;
    let files = log_files(&log);
    assert!(files.len() >= 3, "the log rotated: {files:?}");
    let report = audit::verify(&files).expect("the untouched log verifies across rotation");
    assert_eq!((report.first_seq, report.last_seq), (1, 24));

    // The order summary and, from the streamed response, Coinbase's order id.
    let orders = up.mock.orders();
    assert_eq!(orders.len(), 10);
    let intent = recs
        .iter()
        .find(|r| r["type"] == "intent" && r["request_id"] == "order-3")
        .expect("intent of order-3");
    assert_eq!(intent["key"], key.name.as_str());
    // No [clients] configured: every request is the identity `anonymous`.
    assert_eq!(intent["identity"], "anonymous");
    assert_eq!(intent["method"], "POST");
    assert_eq!(intent["path"], "/api/v3/brokerage/orders");
    assert_eq!(intent["decision"], "forwarded");
    assert_eq!(
        intent["body_sha256"],
        audit::sha256_hex(order_body(3).as_bytes()).as_str()
    );
    assert_eq!(
        intent["order"],
        serde_json::json!({"product_id": "BTC-USD", "side": "BUY", "client_order_id": "client-3",
            "order_type": "limit_limit_gtc", "base_size": "0.001", "limit_price": "10000.00"})
    );
    let time = intent["time"].as_str().expect("time");
    assert!(
        time.ends_with('Z') && time.len() == 24,
        "RFC 3339 UTC with ms: {time}"
    );
    let result = recs
        .iter()
        .find(|r| r["type"] == "result" && r["request_id"] == "order-3")
        .expect("result of order-3");
    assert_eq!(result["status"], 200);
    assert_eq!(result["success"], true);
    assert_eq!(result["order_id"], orders[3].order_id.as_str());
    assert_eq!(result["body"], "complete");
    assert!(result["latency_ms"].as_f64().is_some());

    let plain = recs
        .iter()
        .find(|r| r["type"] == "intent" && r["request_id"] == "not-json")
        .expect("intent of the non-JSON POST");
    assert!(plain.get("order").is_none(), "{plain}");
    assert_eq!(plain["path"], "/api/v3/brokerage/orders/preview");
    assert_eq!(
        plain["query_sha256"],
        audit::sha256_hex(b"account=abc123").as_str()
    );
    assert!(!records(&log)
        .iter()
        .any(|r| r.to_string().contains("abc123")));

    let refusals = of_type(&recs, "refusal");
    assert_eq!(refusals.len(), 2, "{refusals:#?}");
    assert_eq!(refusals[0]["request_id"], "transfer");
    assert_eq!(refusals[0]["error"], "policy_denied");
    assert_eq!(refusals[0]["status"], 403);
    assert_eq!(refusals[1]["method"], "GET");
    assert!(!up
        .mock
        .requests()
        .iter()
        .any(|r| r.path_and_query.starts_with("/v2/")));
    assert_log_holds_no_secret(&log, &key, &up);
    gate.stop().await;

    // Tampering with a copy of the log: each kind is named at the first broken record. The
    // file with the most records is tampered with; the truncation is of the newest file's end.
    let tampered = up.dir.path().join("tampered");
    std::fs::create_dir(&tampered).expect("mkdir");
    let tfiles: Vec<PathBuf> = files
        .iter()
        .map(|f| {
            let to = tampered.join(f.file_name().expect("name"));
            std::fs::copy(f, &to).expect("copy");
            to
        })
        .collect();
    let texts: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("read"))
        .collect();
    let target = (0..texts.len())
        .max_by_key(|i| texts[*i].lines().count())
        .expect("a file");
    let own: Vec<String> = texts[target].lines().map(str::to_owned).collect();
    assert!(own.len() >= 4, "{own:#?}");
    let check = |index: usize, text: String, line: usize, want: fn(&Problem) -> bool| {
        std::fs::write(&tfiles[index], text).expect("write");
        let got = audit::verify(&tfiles);
        std::fs::write(&tfiles[index], &texts[index]).expect("restore");
        match got {
            Err(VerifyError::Broken {
                file,
                line: l,
                problem,
            }) => {
                assert_eq!(file, tfiles[index]);
                assert_eq!(l, line, "{problem}");
                assert!(want(&problem), "{problem}");
            }
            other => panic!("tampering not detected: {other:?}"),
        }
    };
    let join = |ls: &[String]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();

    let mut edited = own.clone();
    edited[1] = edited[1].replacen("\"request_id\":\"", "\"request_id\":\"x", 1);
    assert_ne!(edited[1], own[1]);
    check(target, join(&edited), 2, |p| {
        matches!(p, Problem::Edited { next_line: 3 })
    });

    let mut deleted = own.clone();
    deleted.remove(1);
    check(target, join(&deleted), 2, |p| {
        matches!(p, Problem::Deleted { .. })
    });

    let mut reordered = own.clone();
    reordered.swap(1, 2);
    check(target, join(&reordered), 2, |p| {
        matches!(p, Problem::Reordered { .. })
    });

    let newest = texts.len() - 1;
    let mut truncated = texts[newest].clone();
    truncated.truncate(truncated.len() - 10);
    let last_line = texts[newest].lines().count();
    check(newest, truncated, last_line, |p| *p == Problem::Truncated);

    // The command line: 0 for the untouched log, 1 naming file and line for an edited one.
    let out = cbgate_command()
        .args(["audit", "verify"])
        .args(&files)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok: 24 records"), "{stdout}");
    std::fs::write(&tfiles[target], join(&edited)).expect("write");
    let out = cbgate_command()
        .args(["audit", "verify"])
        .args(&tfiles)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:2: edited", tfiles[target].display())),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_posts_never_interleave_records() {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = Upstream::start_with(MockOptions {
        key: Some(key.expected.clone()),
        realistic: true,
        ..MockOptions::default()
    })
    .await;
    let log = up.dir.path().join("audit.log");
    let mut cfg = up.config();
    cfg.audit.file = Some(log.clone());
    let gate = Gate::start(cfg, Some(&key)).await;
    let client = h1_client();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (client, url) = (client.clone(), gate.url.clone());
        tasks.push(tokio::spawn(async move {
            let r = send(
                &client,
                post(
                    &url,
                    "/api/v3/brokerage/orders",
                    &format!("c-{i}"),
                    order_body(i),
                ),
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        }));
    }
    for t in tasks {
        t.await.expect("request task");
    }
    // Every line parses (records() panics otherwise) and the chain holds.
    let recs = wait_records(&log, 100).await;
    let report = audit::verify(&log_files(&log)).expect("chain verifies");
    assert_eq!(report.records, 100);
    let mut intents: Vec<&str> = of_type(&recs, "intent")
        .iter()
        .map(|r| r["request_id"].as_str().expect("id"))
        .collect();
    let mut results: Vec<&str> = of_type(&recs, "result")
        .iter()
        .map(|r| r["request_id"].as_str().expect("id"))
        .collect();
    intents.sort_unstable();
    results.sort_unstable();
    let mut want: Vec<String> = (0..50).map(|i| format!("c-{i}")).collect();
    want.sort_unstable();
    assert_eq!(intents, want);
    assert_eq!(results, want);
    // Each result comes after its own intent.
    for id in &want {
        let pos = |kind: &str| {
            recs.iter()
                .position(|r| r["type"] == kind && r["request_id"] == id.as_str())
        };
        assert!(pos("intent") < pos("result"), "{id}");
    }
    let order_ids: Vec<String> = up.mock.orders().into_iter().map(|o| o.order_id).collect();
    for r in of_type(&recs, "result") {
        assert!(order_ids.iter().any(|o| r["order_id"] == o.as_str()), "{r}");
    }
    assert_log_holds_no_secret(&log, &key, &up);
    gate.stop().await;
}

/// A config for `up` listening on a Unix socket, with the audit log at `log`.
fn write_config(up: &Upstream, log: &Path) -> (PathBuf, PathBuf, SocketAddr) {
    let sock = up.dir.path().join("gate.sock");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let cfg = up.dir.path().join("cbgate.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"listen = ["unix:{sock}"]
admin_listen = "{admin}"

[audit]
file = "{log}"

[upstream]
ca_file = "{ca}"

[upstream.resolve]
"api.coinbase.com" = "{mock}"
"#,
            sock = sock.display(),
            log = log.display(),
            ca = up.ca_file.display(),
            mock = up.mock.addr,
        ),
    )
    .expect("write config");
    (cfg, sock, admin)
}

async fn start_binary(cfg: &Path, key: &TestKey, admin: SocketAddr) -> Process {
    let mut cmd = cbgate_command();
    cmd.args(["serve", "--config"])
        .arg(cfg)
        .env("COINBASE_API_KEY", &key.name)
        .env("COINBASE_API_SECRET", &key.secret);
    let mut p = Process::spawn(cmd);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(admin).await.is_ok()
            && http_get(admin, "/readyz").await.0 == StatusCode::OK
        {
            return p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not ready:\n{}",
            p.output()
        );
        if let Ok(Some(s)) = p.child.try_wait() {
            panic!("cbgate exited ({s}):\n{}", p.output());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Sends `POST path` over the Unix socket in the background.
fn post_unix(sock: &Path, path: &str, id: &str) -> tokio::task::JoinHandle<Option<StatusCode>> {
    let (sock, req) = (
        sock.to_owned(),
        Request::post(path)
            .header("host", "localhost")
            .header("x-request-id", id)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(order_body(0))))
            .expect("request"),
    );
    tokio::spawn(async move {
        let stream = tokio::net::UnixStream::connect(&sock).await.ok()?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.ok()?;
        Some(resp.status())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_an_order_is_upstream_leaves_its_intent_and_a_restart_resumes_the_chain() {
    use std::os::unix::fs::PermissionsExt as _;
    let key = TestKey::generate(KeyForm::P256Pkcs8);
    let up = Upstream::start(Some(&key)).await;
    let log = up.dir.path().join("audit.log");
    let (cfg, sock, admin) = write_config(&up, &log);
    let mut p = start_binary(&cfg, &key, admin).await;

    // The mock holds `/hang` for minutes: the order is upstream when cbgate is killed.
    let pending = post_unix(&sock, "/api/v3/brokerage/orders/hang", "killed-order");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !up
        .mock
        .requests()
        .iter()
        .any(|r| r.path_and_query.ends_with("/hang"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "order never reached the mock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.child.kill().expect("SIGKILL");
    let _ = p.child.wait();
    assert_eq!(
        pending.await.expect("task"),
        None,
        "no answer from a killed cbgate"
    );

    let recs = records(&log);
    let intent = recs.last().expect("a record");
    assert_eq!(intent["type"], "intent", "{recs:#?}");
    assert_eq!(intent["request_id"], "killed-order");
    assert_eq!(intent["path"], "/api/v3/brokerage/orders/hang");
    assert_eq!(intent["order"]["client_order_id"], "client-0");
    let mode = std::fs::metadata(&log).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "audit log mode");

    // A restart continues the chain after the killed process's last record.
    drop(p);
    let p = start_binary(&cfg, &key, admin).await;
    let done = post_unix(&sock, "/api/v3/brokerage/orders/echo", "after-restart");
    assert_eq!(done.await.expect("task"), Some(StatusCode::OK));
    p.signal("TERM");
    let (status, output) = p.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
    let recs = records(&log);
    assert_eq!(recs.len(), 3, "{recs:#?}");
    assert_eq!(recs[2]["type"], "result");
    assert_eq!(recs[2]["request_id"], "after-restart");
    let report = audit::verify(std::slice::from_ref(&log)).expect("chain spans the restart");
    assert_eq!((report.records, report.breaks.len()), (3, 0));
    assert_log_holds_no_secret(&log, &key, &up);
    assert_no_secret(&output, &key.secret, "cbgate output");
}
