//! Operations, with real processes and sockets: admin endpoints and metrics, JSON logs with
//! request ids, graceful shutdown on SIGTERM during a slow response, key rotation on SIGHUP and on
//! a Kubernetes-style symlink swap (good and bad keys), and clock skew against a mock clock 30 s
//! off. The whole key-rotation session runs at trace level and its output is searched for secrets.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};

use common::harness::{
    self, assert_no_secret, cbgate_command, free_port, http_get, KeyForm, Process, TestKey,
    Upstream,
};
use common::mock::{AuthOutcome, MockOptions};

/// Writes a config for `up` listening on a Unix socket; returns (config path, socket, admin).
fn write_config(up: &Upstream, extra: &str) -> (PathBuf, PathBuf, SocketAddr) {
    let sock = up.dir.path().join("gate.sock");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let cfg = up.dir.path().join("cbgate.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"listen = ["unix:{sock}"]
admin_listen = "{admin}"
shutdown_timeout = "10s"
{extra}

[upstream]
ca_file = "{ca}"

[upstream.resolve]
"api.coinbase.com" = "{mock}"
"api.cdp.coinbase.com" = "{mock}"
"#,
            sock = sock.display(),
            ca = up.ca_file.display(),
            mock = up.mock.addr,
        ),
    )
    .expect("write config");
    (cfg, sock, admin)
}

/// What reached the mock, less cbgate's own clock measurements.
fn client_requests(up: &Upstream) -> Vec<common::mock::Recorded> {
    up.mock
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query != cbgate::ops::clock::TIME_PATH)
        .collect()
}

fn kid(auth: &AuthOutcome) -> String {
    match auth {
        AuthOutcome::Valid { kid, .. } => kid.clone(),
        other => panic!("mock refused the token: {other:?}"),
    }
}

/// A metric's value from the Prometheus text, or 0 when absent.
fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn wait_ready(p: &mut Process, admin: SocketAddr) {
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ready.clone();
    let probe = tokio::spawn(async move {
        loop {
            if let Ok(Ok(s)) = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(admin),
            )
            .await
            {
                drop(s);
                if http_get(admin, "/readyz").await.0 == StatusCode::OK {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    p.wait_until("/readyz 200", || {
        ready.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    probe.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_metrics_json_logs_and_request_ids() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let (cfg, sock, admin) = write_config(&up, "[log]\nformat = \"json\"");
    let key_file = key.write_json(up.dir.path());
    let mut cmd = cbgate_command();
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .arg("--key-file")
        .arg(&key_file);
    let mut p = Process::spawn(cmd);
    wait_ready(&mut p, admin).await;

    let (status, body) = http_get(admin, "/livez").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = http_get(admin, "/readyz").await;
    assert_eq!(status, StatusCode::OK);
    let ready: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(ready["key"], key.name.as_str());
    assert_eq!(ready["algorithm"], "ES256");

    // A request id from the client is forwarded to Coinbase, returned, and logged.
    let req = Request::get("/api/v3/brokerage/accounts/acc-123?limit=1")
        .header("host", "localhost")
        .header("x-request-id", "test-req-1")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let r = harness::send_unix(&sock, req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.headers["x-request-id"], "test-req-1");
    assert_eq!(
        client_requests(&up)[0].headers["x-request-id"],
        "test-req-1"
    );
    // Without one, cbgate makes one up.
    let r = harness::get_unix(&sock, "/api/v3/brokerage/accounts").await;
    let generated = r.headers["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(generated.len(), 32);
    assert_eq!(
        client_requests(&up)[1].headers["x-request-id"],
        generated.as_str()
    );
    // A denied request and a 404 count too.
    let post = Request::post("/v2/accounts/a/withdrawals")
        .header("host", "localhost")
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("request");
    assert_eq!(
        harness::send_unix(&sock, post).await.status,
        StatusCode::FORBIDDEN
    );

    let (status, metrics) = http_get(admin, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        metric(
            &metrics,
            "cbgate_requests_total{route=\"/api/v3/\",method=\"GET\",status=\"2xx\"}"
        ),
        2.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "cbgate_policy_denials_total"), 1.0);
    assert_eq!(
        metric(&metrics, "cbgate_jwt_sign_duration_seconds_count"),
        2.0
    );
    assert!(
        metric(
            &metrics,
            "cbgate_upstream_duration_seconds_count{route=\"/api/v3/\"}"
        ) >= 2.0
    );
    assert!(metric(&metrics, "cbgate_client_connections") >= 0.0);
    assert!(metrics.contains("cbgate_build_info{version="));
    // No label carries a path with ids in it, a query, or a key name.
    assert!(!metrics.contains("acc-123") && !metrics.contains("limit="));
    assert!(!metrics.contains(&key.name));

    // `cbgate health` probes /readyz.
    let out = cbgate_command()
        .args(["health", "--config"])
        .arg(&cfg)
        .output()
        .expect("health");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    p.signal("TERM");
    let (status, output) = p.wait_exit().await;
    assert_eq!(status.code(), Some(0));
    // JSON logs: every line is a JSON object; the request line carries the request id.
    let mut saw = false;
    for line in output.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["fields"]["request_id"] == "test-req-1" && v["fields"]["message"] == "request" {
            saw = true;
            assert_eq!(v["fields"]["status"], 200);
            assert_eq!(v["fields"]["path"], "/api/v3/brokerage/accounts/acc-123");
        }
    }
    assert!(saw, "no request log line with the request id:\n{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_without_a_key_and_health_fails() {
    let up = Upstream::start(None).await;
    let (cfg, sock, admin) = write_config(&up, "");
    let mut cmd = cbgate_command();
    cmd.args(["serve", "--config"]).arg(&cfg);
    let mut p = Process::spawn(cmd);
    p.wait_until("socket", || sock.exists()).await;
    let mut answer = None;
    for _ in 0..200 {
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(admin),
        )
        .await
        {
            answer = Some(http_get(admin, "/readyz").await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (status, body) = answer.expect("admin listener up");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("no API key configured"), "{body}");
    // Public endpoints still work unsigned.
    let r = harness::get_unix(&sock, "/api/v3/brokerage/market/products").await;
    assert_eq!(r.status, StatusCode::OK);
    let out = cbgate_command()
        .args(["health", "--config"])
        .arg(&cfg)
        .output()
        .expect("health");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("503"));
    let out = cbgate_command()
        .args(["health", "--live", "--config"])
        .arg(&cfg)
        .output()
        .expect("health --live");
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_slow_response_finish_reports_not_ready_and_exits_0() {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = Upstream::start(Some(&key)).await;
    let (cfg, sock, admin) = write_config(&up, "");
    let mut cmd = cbgate_command();
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .env("COINBASE_API_KEY", &key.name)
        .env("COINBASE_API_SECRET", &key.secret);
    let mut p = Process::spawn(cmd);
    wait_ready(&mut p, admin).await;

    // Start a slow streamed response (three chunks, 400 ms apart).
    let stream = tokio::net::UnixStream::connect(&sock)
        .await
        .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = Request::get("/api/v3/brokerage/slow-stream")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response head");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body
        .frame()
        .await
        .expect("frame")
        .expect("ok")
        .into_data()
        .expect("data");
    assert_eq!(&first[..], b"chunk-0\n");

    // Mid-response: SIGTERM. Readiness drops at once; the response still completes.
    p.signal("TERM");
    let mut not_ready = false;
    for _ in 0..40 {
        if http_get(admin, "/readyz").await.0 == StatusCode::SERVICE_UNAVAILABLE {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(not_ready, "/readyz still 200 after SIGTERM");
    let rest = body.collect().await.expect("rest of the body").to_bytes();
    assert_eq!(&rest[..], b"chunk-1\nchunk-2\n");
    let (status, output) = p.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
}

/// Kubernetes secret volume layout: dir/cdp_api_key.json -> ..data/cdp_api_key.json,
/// ..data -> ..<version>. An update writes a new version dir and renames a new ..data link over
/// the old one.
fn k8s_write_version(dir: &Path, version: &str, json: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    let vdir = dir.join(version);
    std::fs::create_dir(&vdir).expect("version dir");
    let f = vdir.join("cdp_api_key.json");
    std::fs::write(&f, json).expect("write key");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o400)).expect("chmod");
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    let link = dir.join("cdp_api_key.json");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/cdp_api_key.json", &link).expect("symlink key");
    }
}

fn key_json(k: &TestKey) -> String {
    serde_json::json!({ "name": k.name, "privateKey": k.secret }).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_on_symlink_swap_and_sighup_keeps_last_good_key() {
    let a = TestKey::generate(KeyForm::P256Sec1);
    let b = TestKey::generate(KeyForm::Ed25519B64_64);
    let bad = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBrokenBrokenBrokenBrokenBrokenBrokenBrokenBroken\n-----END EC PRIVATE KEY-----\n";
    let up = Upstream::start_with(MockOptions {
        key: Some(a.expected.clone()),
        also_accept: vec![b.expected.clone()],
        ..MockOptions::default()
    })
    .await;
    let (cfg, sock, admin) = write_config(&up, "");
    let secrets = up.dir.path().join("secret-volume");
    std::fs::create_dir(&secrets).expect("dir");
    k8s_write_version(&secrets, "..v1", &key_json(&a));
    let key_file = secrets.join("cdp_api_key.json");

    let mut cmd = cbgate_command();
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .arg("--key-file")
        .arg(&key_file)
        .env("RUST_LOG", "trace");
    let mut p = Process::spawn(cmd);
    wait_ready(&mut p, admin).await;
    let signed_by = |n: usize| kid(&client_requests(&up)[n].auth);

    assert_eq!(
        harness::get_unix(&sock, "/api/v3/brokerage/accounts")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(signed_by(0), a.name);

    // A bad key arrives by symlink swap: rejected, the last good key stays.
    k8s_write_version(
        &secrets,
        "..v2",
        &serde_json::json!({"name": "bad", "privateKey": bad}).to_string(),
    );
    let failed = || async {
        metric(
            &http_get(admin, "/metrics").await.1,
            "cbgate_key_reloads_total{result=\"failed\"}",
        )
    };
    for _ in 0..200 {
        if failed().await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(failed().await, 1.0, "the swap to a bad key was not noticed");
    assert_eq!(
        harness::get_unix(&sock, "/api/v3/brokerage/accounts")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(signed_by(1), a.name, "the last good key stays in use");

    // SIGHUP with the bad key still in place: reloads (and rejects) again.
    p.signal("HUP");
    for _ in 0..200 {
        if failed().await >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(failed().await, 2.0, "SIGHUP did not trigger a reload");

    // A good new key by symlink swap: in use for the next request.
    k8s_write_version(&secrets, "..v3", &key_json(&b));
    let mut rotated = false;
    for _ in 0..200 {
        let r = harness::get_unix(&sock, "/api/v3/brokerage/accounts").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        if kid(&client_requests(&up).last().expect("request").auth) == b.name {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(rotated, "the new key was never used");
    let ok = metric(
        &http_get(admin, "/metrics").await.1,
        "cbgate_key_reloads_total{result=\"ok\"}",
    );
    assert_eq!(ok, 1.0);

    // SIGHUP with a good, unchanged key reloads it.
    p.signal("HUP");
    let mut reloaded = false;
    for _ in 0..200 {
        let ok = metric(
            &http_get(admin, "/metrics").await.1,
            "cbgate_key_reloads_total{result=\"ok\"}",
        );
        if ok >= 2.0 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(reloaded, "SIGHUP with a good key did not reload");

    p.signal("TERM");
    let (status, output) = p.wait_exit().await;
    assert_eq!(status.code(), Some(0));
    assert!(
        output.contains("new key rejected"),
        "no log line for the rejected key"
    );
    // A trace-level session with reloads of good and bad keys: no secret, no token in it.
    assert_no_secret(&output, &a.secret, "cbgate's output (key A)");
    assert_no_secret(&output, &b.secret, "cbgate's output (key B)");
    assert_no_secret(&output, bad, "cbgate's output (bad key)");
    for r in client_requests(&up) {
        let token = r.headers["authorization"].to_str().expect("ascii");
        let sig = token.rsplit('.').next().expect("signature");
        assert!(!output.contains(sig), "a JWT appears in the logs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_upstream_clock_is_measured_and_corrected() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    // Coinbase's clock 30 s behind ours: our nbf would be 30 s in its future.
    let up = Upstream::start_with(MockOptions {
        key: Some(key.expected.clone()),
        clock_offset_secs: -30,
        ..MockOptions::default()
    })
    .await;

    // Without correction the mock refuses the token, as Coinbase would.
    let gate = harness::Gate::start(up.config(), Some(&key)).await;
    let r = harness::get(&gate, "/api/v3/brokerage/accounts").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    gate.stop().await;

    let (cfg, sock, admin) = write_config(&up, "");
    let key_file = key.write_json(up.dir.path());
    let mut cmd = cbgate_command();
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .arg("--key-file")
        .arg(&key_file);
    let mut p = Process::spawn(cmd);
    wait_ready(&mut p, admin).await;
    let mut offset = 0.0;
    for _ in 0..400 {
        let (_, body) = http_get(admin, "/readyz").await;
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        offset = v["clock_correction_seconds"].as_f64().unwrap_or(0.0);
        if offset != 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The mock's clock has one-second resolution (epochMillis is whole seconds), and on a loaded
    // 2-core machine the round trip adds up to a few hundred ms, so the measured offset lies
    // between about -31.5 and -30, and the applied correction between -32 and -30.
    assert!(
        (-32.0..=-30.0).contains(&offset),
        "correction applied: {offset}"
    );
    let gauge = metric(
        &http_get(admin, "/metrics").await.1,
        "cbgate_clock_offset_seconds",
    );
    assert!((-32.0..=-30.0).contains(&gauge), "gauge {gauge}");
    let r = harness::get_unix(&sock, "/api/v3/brokerage/accounts").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let last = client_requests(&up).last().cloned().expect("request");
    let claims = match &last.auth {
        AuthOutcome::Valid { claims, .. } => claims.clone(),
        other => panic!("{other:?}"),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs() as i64;
    let nbf = claims["nbf"].as_i64().expect("nbf");
    assert!(
        (nbf - (now - 30)).abs() <= 2,
        "nbf {nbf} vs corrected now {}",
        now - 30
    );
    p.signal("TERM");
    let (_, output) = p.wait_exit().await;
    assert_eq!(
        output.matches("differs from Coinbase").count(),
        1,
        "logged once:\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_online_prints_permissions_or_the_reason() {
    let key = TestKey::generate(KeyForm::P256Pkcs8);
    let up = Upstream::start(Some(&key)).await;
    let (cfg, _, _) = write_config(&up, "");
    let key_file = key.write_json(up.dir.path());
    let run = |key_file: &Path| {
        let cfg = cfg.clone();
        let key_file = key_file.to_owned();
        tokio::task::spawn_blocking(move || {
            cbgate_command()
                .args(["check", "--online", "--config"])
                .arg(&cfg)
                .arg("--key-file")
                .arg(&key_file)
                .output()
                .expect("check --online")
        })
    };
    let out = run(&key_file).await.expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("can_trade: true"), "{stdout}");
    assert!(stdout.contains("can_transfer: false"), "{stdout}");
    assert!(stdout.contains("clock offset:"), "{stdout}");
    let signed: Vec<_> = client_requests(&up)
        .into_iter()
        .filter(|r| r.path_and_query == cbgate::ops::online::PERMISSIONS_PATH)
        .collect();
    assert_eq!(signed.len(), 1);
    assert_eq!(
        kid(&signed[0].auth),
        key.name,
        "signed through the signing path"
    );

    // A key Coinbase does not know: 401, with the usual causes spelled out.
    let other = TestKey::generate(KeyForm::P256Pkcs8);
    let dir = tempfile::tempdir().expect("tempdir");
    let other_file = other.write_json(dir.path());
    let out = run(&other_file).await.expect("join");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("401 from Coinbase") && stderr.contains("clock"),
        "{stderr}"
    );
    assert_no_secret(&stderr, &other.secret, "check --online output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_jump_seen_in_a_date_header_is_measured_before_the_next_tick() {
    let key = TestKey::generate(KeyForm::Ed25519B64_32);
    let up = Upstream::start(Some(&key)).await;
    // The periodic check is an hour away: only the Date watch can notice the jump.
    let (cfg, sock, admin) = write_config(&up, "clock_check_interval = \"1h\"");
    let key_file = key.write_json(up.dir.path());
    let mut cmd = cbgate_command();
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .arg("--key-file")
        .arg(&key_file);
    let mut p = Process::spawn(cmd);
    wait_ready(&mut p, admin).await;
    let r = harness::get_unix(&sock, "/api/v3/brokerage/accounts").await;
    assert_eq!(r.status, StatusCode::OK);

    // Coinbase's clock (as this host sees it) jumps 30 s behind.
    up.mock.set_clock_offset(-30);
    let r = harness::get_unix(&sock, "/api/v3/brokerage/accounts").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "the jump bites first");
    let mut recovered = false;
    for _ in 0..400 {
        let r = harness::get_unix(&sock, "/api/v3/brokerage/accounts").await;
        if r.status == StatusCode::OK {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        recovered,
        "no re-measurement after the Date header showed the jump"
    );
    let (_, body) = http_get(admin, "/readyz").await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let offset = v["clock_correction_seconds"].as_i64().expect("offset");
    assert!((-32..=-30).contains(&offset), "{offset}");
}
