//! The `cbgate` binary as users run it: `serve` as a real process (config file, env key,
//! SIGTERM), `token`, exit codes, and logs that never carry the secret or a JWT.

mod common;

use std::io::Read as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use common::harness::{self, assert_no_secret, KeyForm, TestKey, Upstream};

fn cbgate() -> Command {
    harness::cbgate_command()
}

fn run(c: &mut Command) -> Output {
    c.stdin(Stdio::null()).output().expect("run cbgate")
}

fn claims_of(token: &str) -> serde_json::Value {
    let part = token.trim().split('.').nth(1).expect("three parts");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("json")
}

#[test]
fn token_prints_a_jwt_bound_to_the_request_without_query() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let out = run(cbgate()
        .env("COINBASE_API_KEY", &key.name)
        .env("COINBASE_API_SECRET", &key.secret)
        .args(["token", "get", "/api/v3/brokerage/accounts?limit=5"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).expect("utf8");
    let c = claims_of(&token);
    assert_eq!(c["uri"], "GET api.coinbase.com/api/v3/brokerage/accounts");
    assert_eq!(c["sub"], key.name.as_str());
    assert_eq!(
        c["exp"].as_u64().expect("exp") - c["nbf"].as_u64().expect("nbf"),
        120
    );

    let out = run(cbgate()
        .env("COINBASE_API_KEY", &key.name)
        .env("COINBASE_API_SECRET", &key.secret)
        .args([
            "token",
            "POST",
            "https://api.cdp.coinbase.com/platform/v1/accounts",
        ]));
    assert!(out.status.success());
    let c = claims_of(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        c["uris"],
        serde_json::json!(["POST api.cdp.coinbase.com/platform/v1/accounts"])
    );

    // The Coinbase docs' "host/path" spelling.
    let out = run(cbgate()
        .env("COINBASE_API_KEY", &key.name)
        .env("COINBASE_API_SECRET", &key.secret)
        .args(["token", "GET", "api.coinbase.com/v2/user"]));
    assert!(out.status.success());
    assert_eq!(
        claims_of(&String::from_utf8_lossy(&out.stdout))["uri"],
        "GET api.coinbase.com/v2/user"
    );

    let out = run(cbgate()
        .env("COINBASE_API_KEY", &key.name)
        .env("COINBASE_API_SECRET", &key.secret)
        .args(["token", "--ws"]));
    assert!(out.status.success());
    let c = claims_of(&String::from_utf8_lossy(&out.stdout));
    assert!(c.get("uri").is_none() && c.get("uris").is_none());
}

#[test]
fn bad_configuration_exits_2_naming_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("cbgate.toml");
    std::fs::write(&cfg, "lisen = [\"127.0.0.1:8750\"]\n").expect("write");
    let out = run(cbgate().args(["serve", "--config"]).arg(&cfg));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lisen"));

    let out = run(cbgate().args(["check", "--config", "/nonexistent/cbgate.toml"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cbgate.toml"));

    let out = run(cbgate().args(["serve", "--listen", "not-an-address"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not-an-address"));

    let out = run(cbgate().env("COINBASE_API_KEY", "k").args(["check"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("COINBASE_API_SECRET"));

    let out = run(cbgate().arg("--version"));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

struct Served {
    child: Child,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_socket(sock: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("cbgate exited early: {status}");
        }
        assert!(Instant::now() < deadline, "cbgate did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cbgate serve` as a process at the most verbose log level, drives every error path a
/// client can reach, stops it with SIGTERM, and searches everything it printed for the secret
/// and for every token the mock received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_process_logs_requests_but_never_secrets_and_exits_0_on_sigterm() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let sock = up.dir.path().join("gate.sock");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let cfg = up.dir.path().join("cbgate.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"listen = ["unix:{sock}"]
max_body_bytes = 2048

[upstream]
ca_file = "{ca}"
request_timeout = "1s"

[upstream.resolve]
"api.coinbase.com" = "{mock}"
"api.cdp.coinbase.com" = "{closed}"
"#,
            sock = sock.display(),
            ca = up.ca_file.display(),
            mock = up.mock.addr,
        ),
    )
    .expect("write config");

    let child = cbgate()
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("COINBASE_API_KEY", &key.name)
        .env("COINBASE_API_SECRET", key.secret.replace('\n', "\\n"))
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cbgate");
    let mut served = Served { child };
    // Drain the pipes while it runs: trace logging fills a pipe buffer in no time.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let err_reader = drain(served.child.stderr.take().map(|p| Box::new(p) as _));
    let out_reader = drain(served.child.stdout.take().map(|p| Box::new(p) as _));
    wait_for_socket(&sock, &mut served.child);

    let ok = harness::get_unix(&sock, "/api/v3/brokerage/accounts?limit=1").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let post = Request::post("/api/v3/brokerage/orders")
        .header("host", "localhost")
        .header("authorization", "Bearer client-token-never-logged")
        .body(Full::new(Bytes::from_static(b"{\"side\":\"BUY\"}")))
        .expect("request");
    assert_eq!(harness::send_unix(&sock, post).await.status, StatusCode::OK);
    // Error paths: no route, too large, Coinbase's 401, upstream down, upstream timeout.
    assert_eq!(
        harness::get_unix(&sock, "/nope").await.status,
        StatusCode::NOT_FOUND
    );
    let big = Request::post("/api/v3/brokerage/orders")
        .header("host", "localhost")
        .body(Full::new(Bytes::from(vec![b'x'; 4096])))
        .expect("request");
    assert_eq!(
        harness::send_unix(&sock, big).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        harness::get_unix(&sock, "/api/v3/brokerage/status/401")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        harness::get_unix(&sock, "/platform/v1/networks")
            .await
            .status,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(
        harness::get_unix(&sock, "/api/v3/brokerage/hang")
            .await
            .status,
        StatusCode::GATEWAY_TIMEOUT
    );

    // Hardening took effect in the serving process: no core files, memory locked (this test
    // runs as root, or with CAP_IPC_LOCK, in CI; elsewhere cbgate warns instead).
    let pid = served.child.id().to_string();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core line");
    assert!(
        core.split_whitespace().filter(|w| *w == "0").count() == 2,
        "{core}"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let can_lock = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|c| c & (1 << 14) != 0);
    if can_lock {
        let locked_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmLck:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmLck");
        assert!(locked_kb > 0, "memory not locked: {status}");
    }

    // SIGTERM: drain and exit 0.
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = served.child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "cbgate did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");

    let stderr = err_reader.join().expect("stderr reader");
    let stdout = out_reader.join().expect("stdout reader");
    let all = format!("{stdout}{stderr}");

    // One line per request, with method, route and status.
    assert!(
        all.lines().any(|l| l.contains("request")
            && l.contains("GET")
            && l.contains("/api/v3/brokerage/accounts")
            && l.contains("200")),
        "no request log line in:\n{all}"
    );
    assert!(
        !all.contains("limit=1"),
        "query strings stay out of the logs"
    );

    assert_no_secret(&all, &key.secret, "cbgate's output");
    assert!(!all.contains("client-token-never-logged"));
    let tokens: Vec<String> = up
        .mock
        .requests()
        .iter()
        .filter_map(|r| r.headers.get("authorization"))
        .map(|v| {
            v.to_str()
                .expect("ascii")
                .trim_start_matches("Bearer ")
                .to_owned()
        })
        .collect();
    assert!(tokens.len() >= 4, "tokens were issued: {}", tokens.len());
    for t in &tokens {
        assert!(!all.contains(t.as_str()), "a JWT appears in the logs");
        // Nor its signature alone.
        let sig = t.rsplit('.').next().expect("signature");
        assert!(!all.contains(sig), "a JWT signature appears in the logs");
    }
}

#[test]
fn completions_are_generated_for_common_shells() {
    for (shell, marker) in [
        ("bash", "_cbgate()"),
        ("zsh", "#compdef cbgate"),
        ("fish", "complete -c cbgate"),
    ] {
        let out = run(cbgate().args(["completions", shell]));
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "{shell}: {text}");
        assert!(text.contains("serve") && text.contains("check"), "{shell}");
    }
    let out = run(cbgate().args(["completions", "tcsh"]));
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn a_secret_that_is_not_utf8_is_named_not_printed() {
    use std::os::unix::ffi::OsStrExt as _;
    let key = TestKey::generate(KeyForm::P256Sec1);
    // A Windows-1252 .env file: a non-breaking space (0xA0) inside the PEM.
    let mut bytes = key.secret.clone().into_bytes();
    bytes.insert(40, 0xA0);
    let out = run(cbgate()
        .env("COINBASE_API_KEY", &key.name)
        .env("COINBASE_API_SECRET", std::ffi::OsStr::from_bytes(&bytes))
        .arg("check"));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("COINBASE_API_SECRET is not valid UTF-8"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_no_secret(&stderr, &key.secret, "cbgate's error");
    assert_no_secret(&String::from_utf8_lossy(&out.stdout), &key.secret, "stdout");
}

/// A second stop signal during the drain ends the process at once, non-zero, and says so:
/// the operator pressing Ctrl-C again (or an orchestrator escalating) must not wait out
/// `shutdown_timeout` behind a request that hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_during_the_drain_exits_at_once_non_zero() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    for (first, second, code) in [("TERM", "INT", 130), ("TERM", "TERM", 143)] {
        let up = Upstream::start(Some(&key)).await;
        let sock = up.dir.path().join("gate.sock");
        let admin = harness::free_port();
        let cfg = up.dir.path().join("cbgate.toml");
        // The drain would last a minute: the hung request holds it open that long.
        std::fs::write(
            &cfg,
            format!(
                r#"listen = ["unix:{sock}"]
admin_listen = "127.0.0.1:{admin}"
shutdown_timeout = "60s"

[upstream]
ca_file = "{ca}"
request_timeout = "60s"

[upstream.resolve]
"api.coinbase.com" = "{mock}"
"#,
                sock = sock.display(),
                ca = up.ca_file.display(),
                mock = up.mock.addr,
            ),
        )
        .expect("write config");
        let mut cmd = cbgate();
        cmd.args(["serve", "--config"])
            .arg(&cfg)
            .env("COINBASE_API_KEY", &key.name)
            .env("COINBASE_API_SECRET", &key.secret);
        let mut p = harness::Process::spawn(cmd);
        p.wait_until("the socket", || sock.exists()).await;

        let hung = tokio::spawn({
            let sock = sock.clone();
            async move { harness::get_unix(&sock, "/api/v3/brokerage/hang").await }
        });
        // cbgate's own clock measurement reaches the mock too: wait for this very request.
        p.wait_until("the hung request to reach the mock", || {
            up.mock
                .requests()
                .iter()
                .any(|r| r.path_and_query == "/api/v3/brokerage/hang")
        })
        .await;
        p.signal(first);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !p.output().contains("draining") {
            assert!(
                Instant::now() < deadline,
                "the drain did not start:\n{}",
                p.output()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let signalled = Instant::now();
        p.signal(second);
        let deadline = signalled + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = p.child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "SIG{second} during the drain did not stop cbgate within 10 s:\n{}",
                p.output()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let (_, output) = p.wait_exit().await;
        assert_eq!(
            status.code(),
            Some(code),
            "SIG{first} then SIG{second}:\n{output}"
        );
        assert!(
            output.contains("second stop signal during the drain"),
            "the cut-short drain is logged:\n{output}"
        );
        hung.abort();
    }
}

/// `cbgate placeholder-key` prints fresh throwaway credentials, plainly named as placeholders,
/// in the forms the SDKs (and cbgate's own parser) accept.
#[test]
fn placeholder_keys_are_fresh_parseable_and_named_as_placeholders() {
    let gen = |args: &[&str]| {
        let out = run(cbgate().arg("placeholder-key").args(args));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    for (args, alg, begin) in [
        (
            &[][..],
            cbgate::sign::key::Algorithm::Es256,
            Some("-----BEGIN EC PRIVATE KEY-----\n"),
        ),
        (
            &["--pkcs8"][..],
            cbgate::sign::key::Algorithm::Es256,
            Some("-----BEGIN PRIVATE KEY-----\n"),
        ),
        (
            &["--ed25519"][..],
            cbgate::sign::key::Algorithm::EdDsa,
            None,
        ),
    ] {
        let a: serde_json::Value = serde_json::from_str(&gen(args)).expect("JSON");
        let b: serde_json::Value = serde_json::from_str(&gen(args)).expect("JSON");
        assert_ne!(
            a["privateKey"], b["privateKey"],
            "{args:?}: fresh each time"
        );
        let name = a["name"].as_str().or(a["id"].as_str()).expect("name or id");
        assert!(name.contains("placeholder"), "{name}");
        let secret = a["privateKey"].as_str().expect("privateKey");
        if let Some(begin) = begin {
            assert!(secret.starts_with(begin), "{secret:.40}");
            assert!(
                name.starts_with("organizations/placeholder/apiKeys/"),
                "{name}"
            );
        } else {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(secret)
                .expect("base64");
            assert_eq!(raw.len(), 64);
        }
        let key = cbgate::sign::key::ApiKey::parse(name, secret).expect("cbgate parses it");
        assert_eq!(key.algorithm(), alg);
    }
    let w = gen(&["--wallet-secret"]);
    cbgate::sign::wallet::WalletSecret::parse(&w).expect("a wallet secret");
    assert_ne!(w, gen(&["--wallet-secret"]));
}
