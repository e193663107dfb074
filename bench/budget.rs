//! What the rate budget costs (issue 15): the proxy's throughput against the mock Coinbase with
//! the budget on (a limit it never reaches, so every request takes the token path but never
//! waits) and off; one `acquire` alone (local buckets, then Redis on loopback), so the Redis
//! round trip is seen on its own.
//!
//! Run: `cargo bench --bench budget` (needs `redis-server` on the PATH for the Redis part:
//! `apt-get install redis-server`). Prints one line per case.

#[path = "../tests/common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use cbgate::config::{BudgetConfig, ClassLimit};
use cbgate::gate::budget::{Budget, Class, ANONYMOUS};
use cbgate::ops::metrics::Metrics;
use common::harness::{free_port, h1_client, send, Gate, KeyForm, TestKey, Upstream};

/// A limit no run reaches.
fn unlimited() -> ClassLimit {
    ClassLimit {
        rate: 1e9,
        per: Duration::from_secs(1),
        burst: Some(1_000_000_000),
    }
}

/// Requests per second through `gate` with `conns` request loops for `time`.
async fn throughput(gate: &Gate, conns: usize, time: Duration) -> f64 {
    let client = h1_client();
    let url = format!("{}/api/v3/brokerage/accounts", gate.url);
    let end = Instant::now() + time;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                let req = Request::get(&url)
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                let r = send(&client, req).await;
                assert_eq!(r.status, 200, "{}", r.text());
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("loop");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

async fn proxy_throughput() {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = Upstream::start(Some(&key)).await;
    let mut on = up.config();
    on.budget.advanced_private = unlimited();
    on.log.level = "warn".into();
    let mut off = on.clone();
    off.budget.enabled = false;
    let gate_on = Gate::start(on, Some(&key)).await;
    let gate_off = Gate::start(off, Some(&key)).await;
    // Warm-up, then A B A B A B.
    throughput(&gate_on, 16, Duration::from_secs(2)).await;
    throughput(&gate_off, 16, Duration::from_secs(2)).await;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        b.push(throughput(&gate_off, 16, Duration::from_secs(4)).await);
        a.push(throughput(&gate_on, 16, Duration::from_secs(4)).await);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (on, off) = (mean(&a), mean(&b));
    println!(
        "proxy, 16 connections, mock upstream over TLS: budget off {off:.0} req/s, on {on:.0} req/s ({:+.1}%); rounds off {b:.0?}, on {a:.0?}",
        (on - off) / off * 100.0
    );
}

/// Per-call latency of `acquire` on `budget`: (mean, p50, p99) in µs.
async fn acquire_latency(budget: &Budget, n: usize) -> (f64, f64, f64) {
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        budget
            .acquire("bench-key", Class::AdvancedPrivate, ANONYMOUS, None)
            .await
            .expect("within an unlimited budget");
        took.push(t.elapsed().as_secs_f64() * 1e6);
    }
    took.sort_by(f64::total_cmp);
    let mean = took.iter().sum::<f64>() / n as f64;
    (mean, took[n / 2], took[n * 99 / 100])
}

async fn acquire_costs() {
    let cfg = BudgetConfig {
        advanced_private: unlimited(),
        ..BudgetConfig::default()
    };
    let local = Budget::new(&cfg, None, Metrics::new().budget().clone()).expect("budget");
    acquire_latency(&local, 10_000).await;
    let (mean, p50, p99) = acquire_latency(&local, 200_000).await;
    println!("acquire, local bucket: mean {mean:.2} µs, p50 {p50:.2} µs, p99 {p99:.2} µs");

    let Some(bin) = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("redis-server"))
            .find(|p| p.is_file())
    }) else {
        println!("acquire, Redis: not measured (redis-server is not installed: apt-get install redis-server)");
        return;
    };
    let port = free_port();
    let mut redis = std::process::Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server");
    let cfg = BudgetConfig {
        redis: Some(format!("redis://127.0.0.1:{port}/0")),
        // A slow call on a busy machine must not drop to the local fallback mid-measurement.
        redis_timeout: Duration::from_secs(1),
        ..cfg
    };
    let shared = Budget::new(&cfg, None, Metrics::new().budget().clone()).expect("budget");
    let deadline = Instant::now() + Duration::from_secs(10);
    shared.start();
    while shared.redis_up() != Some(true) {
        assert!(Instant::now() < deadline, "Redis did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
        shared.start();
    }
    acquire_latency(&shared, 2_000).await;
    let (mean, p50, p99) = acquire_latency(&shared, 20_000).await;
    println!(
        "acquire, Redis on loopback (EVALSHA of the GCRA script): mean {mean:.1} µs, p50 {p50:.1} µs, p99 {p99:.1} µs"
    );
    assert_eq!(shared.redis_up(), Some(true), "Redis stayed up");
    let _ = redis.kill();
    let _ = redis.wait();
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        acquire_costs().await;
        proxy_throughput().await;
    });
}
