//! The rate budget against the mock Coinbase and a real redis-server: one cbgate under 200
//! concurrent requests, a pause learnt from a 429, and two cbgate processes sharing one key's
//! budget through Redis, through a Redis outage and back.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use cbgate::config::ClassLimit;
use common::harness::{
    cbgate_command, free_port, h1_client, http_get, send, serve_until_ready, write_private, Gate,
    KeyForm, Process, Resp, TestClient, TestKey, Upstream, HOSTS,
};
use common::redis_server::RedisServer;

const ACCOUNTS: &str = "/api/v3/brokerage/accounts";

fn limit(rate: f64, burst: u32) -> ClassLimit {
    ClassLimit {
        rate,
        per: Duration::from_secs(1),
        burst: Some(burst),
    }
}

async fn get_url(client: &TestClient, url: &str) -> Resp {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    send(client, req).await
}

/// A refusal by the budget: 429, `Retry-After`, the code in the header and both body shapes.
fn assert_budget_refusal(r: &Resp) {
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert_eq!(r.cbgate_error(), Some("budget_exhausted"), "{}", r.text());
    let retry: u64 = r
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in whole seconds");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    let v = r.json();
    assert_eq!(v["error"], "budget_exhausted", "{v}");
    assert_eq!(v["errorType"], "budget_exhausted", "{v}");
}

fn queued_ms(r: &Resp) -> u64 {
    r.headers
        .get("x-cbgate-queued-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no x-cbgate-queued-ms: {:?}", r.headers))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_stay_within_rate_and_max_wait() {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = Upstream::start(Some(&key)).await;
    let mut cfg = up.config();
    let (rate, burst, max_wait) = (30.0, 10, Duration::from_secs(1));
    cfg.budget.advanced_private = limit(rate, burst);
    cfg.budget.max_wait = max_wait;
    let gate = Gate::start(cfg, Some(&key)).await;
    let client = h1_client();
    let url = format!("{}{ACCOUNTS}", gate.url);

    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let r = get_url(&client, &url).await;
            (r, started.elapsed())
        }));
    }
    let mut served = 0;
    let mut refused = 0;
    for t in tasks {
        let (r, took) = t.await.expect("task");
        // Waiting is bounded by max_wait; the rest is slack for a busy machine.
        assert!(took < max_wait + Duration::from_millis(1500), "{took:?}");
        assert!(queued_ms(&r) <= 1000 + 100, "{:?}", r.headers);
        if r.status == StatusCode::OK {
            served += 1;
        } else {
            assert_budget_refusal(&r);
            refused += 1;
        }
    }
    let seen = up.mock.requests();
    let last = seen.iter().map(|r| r.at).max().expect("some were served");
    let span = last.duration_since(t0).as_secs_f64();
    assert_eq!(
        seen.len(),
        served,
        "every served request reached the mock once"
    );
    // Every token was taken after t0 and before its request reached the mock.
    let most = f64::from(burst) + rate * span;
    assert!(
        served as f64 <= most,
        "{served} requests reached Coinbase in {span:.2} s: more than {most:.1}"
    );
    assert!(served >= burst as usize + 20, "served only {served}");
    assert!(
        refused > 0,
        "200 requests cannot fit in 1 s of a 30/s budget"
    );
    let metrics = gate.proxy.metrics().render();
    assert!(
        !metrics.contains(&key.name),
        "metrics never carry a key name"
    );
    assert!(
        metrics.contains(
            "cbgate_budget_refusals_total{class=\"advanced_private\",reason=\"exhausted\"}"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("cbgate_budget_wait_seconds_count{class=\"advanced_private\"} 200"),
        "{metrics}"
    );
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_pauses_the_bucket_for_every_client() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let mut cfg = up.config();
    cfg.budget.max_wait = Duration::from_millis(500);
    let gate = Gate::start(cfg, Some(&key)).await;
    let client = h1_client();

    // Coinbase answers 429 with Retry-After: 2; the answer itself passes through.
    let sent_at = Instant::now();
    let r = get_url(
        &client,
        &format!("{}/api/v3/brokerage/ratelimited/2", gate.url),
    )
    .await;
    let paused_at = Instant::now();
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.cbgate_error(), None, "Coinbase's own 429 passes through");
    let before = up.mock.requests().len();

    // During the pause cbgate refuses at once while the pause is longer than max_wait, and
    // holds a request when it ends within max_wait.
    let (mut refused, mut held) = (0, 0);
    while paused_at.elapsed() < Duration::from_millis(1900) {
        let started = Instant::now();
        let r = get_url(&client, &format!("{}{ACCOUNTS}", gate.url)).await;
        assert!(started.elapsed() < Duration::from_millis(500 + 500));
        if r.status == StatusCode::OK {
            assert!(queued_ms(&r) > 0, "served during the pause without waiting");
            held += 1;
        } else {
            assert_budget_refusal(&r);
            refused += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused >= 8, "{refused} refused, {held} held");
    // Nothing reached Coinbase before the 2 s were over (they began after `sent_at`).
    let pause_end = sent_at + Duration::from_secs(2);
    for r in &up.mock.requests()[before..] {
        assert!(
            r.at >= pause_end,
            "a request reached Coinbase {:?} before the pause ended",
            pause_end.duration_since(r.at)
        );
    }
    let status = cbgate::ops::admin::halt_status(&gate.proxy);
    assert!(status.is_object());
    let b = gate.proxy.budget().status();
    assert!(b["buckets"].to_string().contains("paused_ms"), "{b}");

    tokio::time::sleep_until((paused_at + Duration::from_millis(2300)).into()).await;
    let r = get_url(&client, &format!("{}{ACCOUNTS}", gate.url)).await;
    assert_eq!(r.status, StatusCode::OK, "served again after the pause");
    let metrics = gate.proxy.metrics().render();
    assert!(
        metrics.contains("cbgate_budget_upstream_429_total{class=\"advanced_private\"} 1"),
        "{metrics}"
    );
    gate.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Two cbgate processes, one key, one Redis.

struct Replica {
    process: Process,
    url: String,
    admin: SocketAddr,
    config: PathBuf,
}

/// Starts `cbgate serve` with the shared key and the budget in Redis. The first replica reads
/// the password from budget.redis_password_file, the second from the URL.
async fn start_replica(up: &Upstream, key_file: &Path, redis: &RedisServer, n: usize) -> Replica {
    let port = free_port();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let resolve: String = HOSTS
        .iter()
        .map(|h| format!("\"{h}\" = \"{}\"\n", up.mock.addr))
        .collect();
    let redis_keys = if n == 0 {
        let pw = write_private(
            up.dir.path(),
            "redis-password",
            format!("{}\n", redis.password).as_bytes(),
        );
        format!(
            "redis = \"redis://127.0.0.1:{}/0\"\nredis_password_file = \"{}\"\n",
            redis.port,
            pw.display()
        )
    } else {
        format!(
            "redis = \"redis://:{}@127.0.0.1:{}/0\"\n",
            redis.password, redis.port
        )
    };
    let text = format!(
        "listen = [\"127.0.0.1:{port}\"]\nadmin_listen = \"{admin}\"\n\
         [key]\nfile = \"{}\"\n\
         [upstream]\nca_file = \"{}\"\n[upstream.resolve]\n{resolve}\
         [budget]\n{redis_keys}replicas = 2\nmax_wait = \"300ms\"\nredis_timeout = \"50ms\"\n\
         [budget.advanced_private]\nrate = 20\nburst = 4\n",
        key_file.display(),
        up.ca_file.display(),
    );
    let cfg = up.dir.path().join(format!("cbgate-{n}.toml"));
    std::fs::write(&cfg, text).expect("write config");
    let process = serve_until_ready(&cfg, admin).await;
    Replica {
        process,
        url: format!("http://127.0.0.1:{port}"),
        admin,
        config: cfg,
    }
}

async fn budget_mode(r: &Replica) -> String {
    let (status, body) = http_get(r.admin, "/status").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["budget"]["mode"].as_str().unwrap_or("").to_owned()
}

async fn wait_mode(replicas: &[&Replica], mode: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    for r in replicas {
        loop {
            let m = budget_mode(r).await;
            if m == mode {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "budget mode stays {m:?}, expected {mode:?}:\n{}",
                r.process.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Drives both replicas for `time` with `tasks` request loops each; every request must be
/// answered (200, or a budget refusal) within `bound`. Returns the requests the mock saw
/// during the run and the run's length.
async fn drive(
    up: &Upstream,
    replicas: &[&Replica],
    tasks: usize,
    time: Duration,
    bound: Duration,
) -> (usize, f64) {
    let client = h1_client();
    let before = up.mock.requests().len();
    let t0 = Instant::now();
    let end = t0 + time;
    let mut handles = Vec::new();
    for r in replicas {
        for _ in 0..tasks {
            let client = client.clone();
            let url = format!("{}{ACCOUNTS}", r.url);
            handles.push(tokio::spawn(async move {
                let mut worst = Duration::ZERO;
                while Instant::now() < end {
                    let started = Instant::now();
                    let resp = get_url(&client, &url).await;
                    worst = worst.max(started.elapsed());
                    if resp.status != StatusCode::OK {
                        assert_budget_refusal(&resp);
                    }
                }
                worst
            }));
        }
    }
    for h in handles {
        let worst = h.await.expect("request loop");
        assert!(worst < bound, "a request took {worst:?} (bound {bound:?})");
    }
    let seen = up.mock.requests();
    let last = seen.iter().map(|r| r.at).max().unwrap_or(t0).max(t0);
    (seen.len() - before, last.duration_since(t0).as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_budget_through_redis_and_survive_an_outage() {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = Upstream::start(Some(&key)).await;
    let key_file = key.write_json(up.dir.path());
    let password = "budget-test-redis-password-7f3a";
    let redis_port = free_port();
    let mut redis = RedisServer::start(redis_port, password);
    let a = start_replica(&up, &key_file, &redis, 0).await;
    let b = start_replica(&up, &key_file, &redis, 1).await;
    let both = [&a, &b];
    wait_mode(&both, "redis").await;
    let (rate, burst) = (20.0, 4.0);
    // A request waits at most max_wait (300 ms) plus one Redis timeout; the rest is slack.
    let bound = Duration::from_millis(300 + 50 + 1200);

    // Shared: together within one budget (apart, they would spend twice as much).
    let (n, span) = drive(&up, &both, 6, Duration::from_secs(2), bound).await;
    let most = burst + rate * span;
    assert!(n as f64 <= most, "shared: {n} in {span:.2} s > {most:.1}");
    assert!(n as f64 >= rate * 1.0, "shared: only {n} in {span:.2} s");

    // Redis stops: each replica falls back to its share (rate / 2), no request hangs.
    redis.stop();
    let (n, span) = drive(&up, &both, 6, Duration::from_secs(2), bound).await;
    let most = burst + rate * span + 2.0;
    assert!(n as f64 <= most, "fallback: {n} in {span:.2} s > {most:.1}");
    assert!(n > 0, "the local fallback serves");
    for r in &both {
        assert_eq!(budget_mode(r).await, "local-fallback");
        let (_, metrics) = http_get(r.admin, "/metrics").await;
        assert!(metrics.contains("cbgate_budget_redis_up 0"), "{metrics}");
        assert!(
            metrics.contains("cbgate_budget_redis_errors_total{kind="),
            "{metrics}"
        );
        let (_, ready) = http_get(r.admin, "/readyz").await;
        assert!(ready.contains("\"up\":false"), "{ready}");
    }

    // Redis is back (empty): both share again, and /status no longer shows the error as
    // current: it is the last outage, with the time it ended.
    let redis = RedisServer::start(redis_port, password);
    wait_mode(&both, "redis").await;
    for r in &both {
        let (_, s) = http_get(r.admin, "/status").await;
        let v: serde_json::Value = serde_json::from_str(&s).expect("json");
        assert!(v["budget"]["redis"]["last_error"].is_null(), "{s}");
        assert!(
            v["budget"]["redis"]["last_outage"]["recovered_at"].is_string(),
            "{s}"
        );
    }
    let (n, span) = drive(&up, &both, 6, Duration::from_secs(2), bound).await;
    let most = burst + rate * span;
    assert!(
        n as f64 <= most,
        "shared again: {n} in {span:.2} s > {most:.1}"
    );

    // A 429 that one replica got pauses the other too (the pause is in Redis).
    let client = h1_client();
    let sent_at = Instant::now();
    let r = get_url(
        &client,
        &format!("{}/api/v3/brokerage/ratelimited/2", a.url),
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let before = up.mock.requests().len();
    let mut refused = 0;
    while sent_at.elapsed() < Duration::from_millis(1500) {
        let r = get_url(&client, &format!("{}{ACCOUNTS}", b.url)).await;
        if r.status != StatusCode::OK {
            assert_budget_refusal(&r);
            refused += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused >= 10, "the other replica refused only {refused}");
    let pause_end = sent_at + Duration::from_secs(2);
    for r in &up.mock.requests()[before..] {
        assert!(r.at >= pause_end, "the other replica sent during the pause");
    }

    let (_, status) = http_get(b.admin, "/status").await;
    assert!(status.contains("redis://:***@127.0.0.1"), "{status}");
    // `cbgate status` shows the budget: the mode, the redacted URL, the bucket.
    let out = cbgate_command()
        .args(["status", "--config"])
        .arg(&b.config)
        .output()
        .expect("cbgate status");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("rate budget: redis via redis://:***@127.0.0.1"),
        "{stdout}"
    );
    assert!(stdout.contains("advanced_private"), "{stdout}");
    assert!(!stdout.contains(password), "{stdout}");
    for r in both {
        let (_, status) = http_get(r.admin, "/status").await;
        let out = r.process.output();
        assert!(!out.contains(password), "the Redis password was logged");
        assert!(
            !status.contains(password),
            "the Redis password is in /status"
        );
        // Warned once for the one outage, and said when Redis answered again.
        assert_eq!(out.matches("Redis is unreachable").count(), 1, "{out}");
        assert!(out.contains("answers again"), "{out}");
    }
    drop(redis);
}

#[test]
fn the_replicas_example_is_a_valid_configuration() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let text = std::fs::read_to_string(dir.join("cbgate-replicas.toml")).expect("read");
    let cfg = cbgate::config::Config::from_toml_str(&text).expect("valid configuration");
    assert_eq!(cfg.budget.redis.as_deref(), Some("redis://redis:6379/0"));
    assert_eq!(cfg.budget.replicas, 2);
    assert!(cfg.budget.redis_password_file.is_some());
    let compose = std::fs::read_to_string(dir.join("compose-replicas.yml")).expect("read");
    for needle in [
        "./cbgate-replicas.toml:/etc/cbgate/cbgate.toml:ro",
        "cbgate-a:",
        "cbgate-b:",
        "redis:",
        "--save ''",
    ] {
        assert!(
            compose.contains(needle),
            "compose-replicas.yml lacks {needle}"
        );
    }
}
