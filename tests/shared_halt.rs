//! The kill switch shared through a real redis-server (`budget.redis`): two cbgate processes,
//! a halt on one (CLI and admin API) refuses orders on the other, a resume on the other
//! resumes both, a Redis outage keeps the halt, a halt made while Redis is down reaches the
//! other replica when Redis is back; a stale resume never ends a newer halt; and the same
//! over `rediss://` with a private CA (and a clear failure with the wrong one).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use cbgate::config::BudgetConfig;
use cbgate::gate::budget::RedisAccess;
use cbgate::gate::halt::Halt;
use cbgate::gate::halt_shared::{Pushed, ResumeError, SharedHalt};
use cbgate::ops::metrics::Metrics;
use common::harness::{
    self, cbgate_command, free_port, h1_client, http_get, serve_until_ready, KeyForm, Process,
    Resp, TestKey, Upstream,
};
use common::mock::MockOptions;
use common::redis_server::{RedisServer, TlsFiles};

const ORDERS: &str = "/api/v3/brokerage/orders";
const PASSWORD: &str = "halt-test-redis-password-91c2";

async fn realistic(key: &TestKey) -> Upstream {
    Upstream::start_with(MockOptions {
        key: Some(key.expected.clone()),
        realistic: true,
        prices: vec![("BTC-USD".into(), "50000.00".into())],
        ..MockOptions::default()
    })
    .await
}

struct Replica {
    process: Process,
    url: String,
    admin: SocketAddr,
    config: PathBuf,
}

/// Writes the configuration of replica `name`: its own state_dir, the shared key, `redis`
/// lines in `[budget]`.
fn write_config(
    up: &Upstream,
    key_file: &Path,
    name: &str,
    budget: &str,
) -> (PathBuf, SocketAddr, SocketAddr) {
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let state = up.dir.path().join(format!("state-{name}"));
    let text = format!(
        "listen = [\"{proxy}\"]\nadmin_listen = \"{admin}\"\nstate_dir = \"{}\"\n\
         [key]\nfile = \"{}\"\n\
         [upstream]\nca_file = \"{}\"\n[upstream.resolve]\n\"api.coinbase.com\" = \"{}\"\n\
         [budget]\nreplica_name = \"{name}\"\nreplicas = 2\n{budget}\n",
        state.display(),
        key_file.display(),
        up.ca_file.display(),
        up.mock.addr,
    );
    let cfg = up.dir.path().join(format!("cbgate-{name}.toml"));
    std::fs::write(&cfg, text).expect("write config");
    (cfg, proxy, admin)
}

async fn start(cfg: PathBuf, proxy: SocketAddr, admin: SocketAddr) -> Replica {
    let process = serve_until_ready(&cfg, admin).await;
    Replica {
        process,
        url: format!("http://{proxy}"),
        admin,
        config: cfg,
    }
}

fn plain_redis(redis: &RedisServer) -> String {
    format!(
        "redis = \"redis://:{}@127.0.0.1:{}/0\"",
        redis.password, redis.port
    )
}

async fn order(r: &Replica) -> Resp {
    let body = json!({
        "client_order_id": "c-1",
        "product_id": "BTC-USD",
        "side": "BUY",
        "order_configuration": { "limit_limit_gtc": {
            "base_size": "0.01", "limit_price": "1", "post_only": false } },
    })
    .to_string();
    let req = Request::post(format!("{}{ORDERS}", r.url))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    harness::send(&h1_client(), req).await
}

fn assert_placed(r: &Resp) {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["success"], true, "{}", r.text());
}

fn assert_halted(r: &Resp, reason: &str) {
    assert_eq!(r.status, StatusCode::LOCKED, "{}", r.text());
    assert_eq!(r.json()["reason"], reason, "{}", r.text());
}

async fn status(r: &Replica) -> Value {
    let (code, body) = http_get(r.admin, "/status").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    serde_json::from_str(&body).expect("json")
}

/// Polls `/status` until `probe` holds (15 s at most: generous; no timing is asserted).
/// Returns how long it took.
async fn wait_for(r: &Replica, what: &str, probe: impl Fn(&Value) -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        let s = status(r).await;
        if probe(&s) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{what}: not within 15 s; /status: {s}\n{}",
            r.process.output()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn halted(want: bool) -> impl Fn(&Value) -> bool {
    move |s: &Value| s["halted"] == want
}

fn shared_state(want: &'static str) -> impl Fn(&Value) -> bool {
    move |s: &Value| s["shared"]["state"] == want
}

fn cli(r: &Replica, args: &[&str]) -> (bool, String) {
    let out = cbgate_command()
        .args(args)
        .arg("--config")
        .arg(&r.config)
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

async fn admin_post(r: &Replica, path: &str, body: &str) -> Resp {
    let req = Request::post(format!("http://{}{path}", r.admin))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    harness::send(&h1_client(), req).await
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_on_one_replica_halts_the_other_through_redis_and_survives_an_outage() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = realistic(&key).await;
    let key_file = key.write_json(up.dir.path());
    let port = free_port();
    let mut redis = RedisServer::start(port, PASSWORD);
    let (cfg, p, adm) = write_config(&up, &key_file, "replica-a", &plain_redis(&redis));
    let a = start(cfg, p, adm).await;
    let (cfg, p, adm) = write_config(&up, &key_file, "replica-b", &plain_redis(&redis));
    let b = start(cfg, p, adm).await;
    assert_placed(&order(&b).await);
    let mut figures = Vec::new();

    // `cbgate halt` on A: B refuses orders.
    let t0 = Instant::now();
    let (ok, out) = cli(&a, &["halt", "--reason", "cli halt"]);
    assert!(ok && out.contains("shared through Redis"), "{out}");
    wait_for(&b, "B halted by A's CLI halt", halted(true)).await;
    figures.push(("CLI halt on A -> B halted", t0.elapsed()));
    assert_halted(&order(&b).await, "cli halt");
    let s = status(&b).await;
    assert_eq!(s["by"], "replica-a", "{s}");
    assert_eq!(s["shared"]["last_change"]["by"], "replica-a", "{s}");
    assert_eq!(s["shared"]["replica"], "replica-b", "{s}");
    let (ok, out) = cli(&b, &["status"]);
    assert!(
        ok && out.contains("halted by replica replica-a")
            && out.contains("kill switch: shared through redis://:***@127.0.0.1"),
        "{out}"
    );
    assert!(!out.contains(PASSWORD), "{out}");
    let (_, ready) = http_get(b.admin, "/readyz").await;
    assert!(ready.contains("\"replica\":\"replica-b\""), "{ready}");

    // `cbgate resume` on B: A passes orders again.
    let t0 = Instant::now();
    let (ok, out) = cli(&b, &["resume"]);
    assert!(ok && out.contains("not halted"), "{out}");
    wait_for(&a, "A resumed by B", halted(false)).await;
    figures.push(("CLI resume on B -> A resumed", t0.elapsed()));
    assert_placed(&order(&a).await);

    // `POST /halt` on A: B refuses orders.
    let t0 = Instant::now();
    let r = admin_post(&a, "/halt", r#"{"reason":"api halt"}"#).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["replicas"]["reached"], true, "{}", r.text());
    wait_for(&b, "B halted by A's API halt", halted(true)).await;
    figures.push(("API halt on A -> B halted", t0.elapsed()));
    assert_halted(&order(&b).await, "api halt");

    // Redis stops: both keep the halt, and a resume is refused rather than half done.
    redis.stop();
    for r in [&a, &b] {
        wait_for(r, "Redis seen unreachable", shared_state("unreachable")).await;
        assert_halted(&order(r).await, "api halt");
        let (_, m) = http_get(r.admin, "/metrics").await;
        assert_eq!(metric(&m, "cbgate_halt_shared_up"), Some(0.0), "{m}");
        assert!(m.contains("cbgate_halt_shared_errors_total{kind="), "{m}");
    }
    let (ok, out) = cli(&a, &["resume"]);
    assert!(!ok && out.contains("Redis is unreachable"), "{out}");
    assert_halted(&order(&a).await, "api halt");

    // Redis is back, empty: the halted replicas put the halt back; a resume on A resumes B.
    let redis = RedisServer::start(port, PASSWORD);
    for r in [&a, &b] {
        wait_for(r, "Redis seen again", shared_state("ok")).await;
        assert_halted(&order(r).await, "api halt");
    }
    let r = admin_post(&a, "/resume", "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    wait_for(&b, "B resumed by A", halted(false)).await;
    assert_placed(&order(&b).await);
    let s = status(&a).await;
    assert!(
        s["shared"]["last_outage"]["recovered_at"].is_string(),
        "{s}"
    );
    assert!(s["shared"]["last_error"].is_null(), "{s}");

    // A halt while Redis is down halts here only, says so, and reaches B when Redis is back.
    drop(redis);
    wait_for(&a, "Redis seen unreachable", shared_state("unreachable")).await;
    let (ok, out) = cli(&a, &["halt", "--reason", "offline halt"]);
    assert!(
        !ok && out.contains("halted on THIS replica only") && out.contains("halted since"),
        "{out}"
    );
    assert_halted(&order(&a).await, "offline halt");
    assert_eq!(status(&a).await["shared"]["pending_push"], true);
    assert_placed(&order(&b).await);
    let t0 = Instant::now();
    let _redis = RedisServer::start(port, PASSWORD);
    wait_for(&b, "B halted by A's pending halt", halted(true)).await;
    figures.push(("Redis back -> A's offline halt reaches B", t0.elapsed()));
    assert_halted(&order(&b).await, "offline halt");
    assert_eq!(status(&a).await["shared"]["pending_push"], false);

    for (what, took) in &figures {
        eprintln!("observed latency: {what}: {} ms", took.as_millis());
    }
    for r in [&a, &b] {
        assert!(
            !r.process.output().contains(PASSWORD),
            "the password was logged"
        );
    }
}

fn budget_config(url: &str) -> BudgetConfig {
    BudgetConfig {
        redis: Some(url.to_owned()),
        ..BudgetConfig::default()
    }
}

fn shared(cfg: &BudgetConfig, name: &str) -> SharedHalt {
    SharedHalt::new(
        cfg,
        &RedisAccess::default(),
        name.to_owned(),
        Metrics::new().budget().clone(),
    )
    .expect("build")
    .expect("shared")
}

/// The version check, step by step (two syncs in one process, no polling task, one Redis).
#[tokio::test]
async fn a_stale_resume_never_ends_a_newer_halt() {
    let port = free_port();
    let mut redis = RedisServer::start(port, PASSWORD);
    let cfg = budget_config(&format!("redis://:{PASSWORD}@127.0.0.1:{port}/0"));
    let (x, y) = (shared(&cfg, "x"), shared(&cfg, "y"));
    let (hx, hy) = (Halt::in_memory(), Halt::in_memory());

    let (r, pushed) = x.halt(&hx, "one").await;
    r.expect("halt");
    assert!(matches!(pushed, Pushed::Shared { .. }), "{pushed:?}");
    y.reconcile(&hy).await.expect("reconcile");
    assert_eq!(hy.current().map(|h| h.reason), Some("one".into()));
    assert_eq!(hy.current().and_then(|h| h.by), Some("x".into()));

    y.resume(&hy).await.expect("resume");
    x.reconcile(&hx).await.expect("reconcile");
    assert!(!hx.is_halted() && !hy.is_halted());

    // X halts again; Y has not read Redis since its resume. Its next resume is stale.
    let (r, _) = x.halt(&hx, "two").await;
    r.expect("halt");
    match y.resume(&hy).await {
        Err(ResumeError::Newer { by, reason, .. }) => {
            assert_eq!((by.as_str(), reason.as_str()), ("x", "two"));
        }
        other => panic!("a stale resume was applied: {other:?}"),
    }
    assert_eq!(
        hy.current().map(|h| h.reason),
        Some("two".into()),
        "Y took the halt"
    );
    x.reconcile(&hx).await.expect("reconcile");
    assert_eq!(hx.current().map(|h| h.reason), Some("two".into()));

    // Redis restarts empty: X (halted) puts the halt back for a replica that knew nothing.
    redis.stop();
    let _redis = RedisServer::start(port, PASSWORD);
    let (z, hz) = (shared(&cfg, "z"), Halt::in_memory());
    let deadline = Instant::now() + Duration::from_secs(15);
    while !hz.is_halted() {
        assert!(Instant::now() < deadline, "the halt did not come back");
        x.reconcile(&hx).await.expect("reconcile");
        z.reconcile(&hz).await.expect("reconcile");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hz.current().map(|h| h.reason), Some("two".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_and_a_clear_failure_with_the_wrong_one() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = realistic(&key).await;
    let key_file = key.write_json(up.dir.path());
    let good = TlsFiles::generate(up.dir.path(), "good");
    let wrong = TlsFiles::generate(up.dir.path(), "wrong");
    let port = free_port();
    let _redis = RedisServer::start_tls(port, PASSWORD, &good);
    let url = format!("rediss://:{PASSWORD}@127.0.0.1:{port}/0");

    let lines = format!(
        "redis = \"{url}\"\nredis_ca_file = \"{}\"",
        good.ca.display()
    );
    let (cfg, p, adm) = write_config(&up, &key_file, "tls-good", &lines);
    let a = start(cfg, p, adm).await;
    wait_for(&a, "budget in Redis over TLS", |s| {
        s["budget"]["mode"] == "redis"
    })
    .await;
    wait_for(&a, "shared halt over TLS", shared_state("ok")).await;
    let r = admin_post(&a, "/halt", r#"{"reason":"tls halt"}"#).await;
    assert_eq!(r.json()["replicas"]["reached"], true, "{}", r.text());

    // The wrong CA: the replica starts, falls back as configured, says why, nothing hangs.
    let lines = format!(
        "redis = \"{url}\"\nredis_ca_file = \"{}\"",
        wrong.ca.display()
    );
    let (cfg, p, adm) = write_config(&up, &key_file, "tls-wrong", &lines);
    let b = start(cfg, p, adm).await;
    let t0 = Instant::now();
    let req = Request::get(format!("{}/api/v3/brokerage/accounts", b.url))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let r = harness::send(&h1_client(), req).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the local fallback serves: {}",
        r.text()
    );
    eprintln!(
        "wrong CA: a request answered in {} ms",
        t0.elapsed().as_millis()
    );
    wait_for(&b, "TLS failure seen", |s| {
        s["budget"]["redis"]["last_error"].is_string() && s["shared"]["state"] == "unreachable"
    })
    .await;
    let st = status(&b).await;
    assert_eq!(st["budget"]["mode"], "local-fallback", "{st}");
    let why = st["budget"]["redis"]["last_error"].as_str().unwrap_or("");
    assert!(why.to_lowercase().contains("certificate"), "{why}");
    assert_eq!(
        st["halted"], false,
        "the halt in Redis did not reach it: {st}"
    );
    let (ok, out) = cli(&a, &["status"]);
    assert!(ok && out.contains("rediss://:***@127.0.0.1"), "{out}");
    assert!(!out.contains(PASSWORD), "{out}");
}
