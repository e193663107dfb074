//! What the audit log costs: durable records per second (each record fsync'd before its writer
//! continues, as an intent record is before its request leaves) with 1 and with 32 concurrent
//! writers. With 32, group commit lets one fsync release every record queued meanwhile.
//!
//! Then the end-to-end cost: the proxy's throughput of state-changing requests (`POST`, each
//! with a durable intent record before it leaves and a result record after) against the mock
//! Coinbase over TLS, `audit.file` on and off, with 1 and 32 concurrent clients, in
//! interleaved rounds (off, on, off, on, ...) because the machine is shared.
//!
//! Run: `cargo bench --bench audit` (the file goes to `$AUDIT_BENCH_DIR`, default a temporary
//! directory under `target/`: put it on the disk the real log will use). Prints one line per
//! case; the chain is verified afterwards so the figures cannot come from a broken log.
//! `AUDIT_BENCH_ROUNDS` (default 3) and `AUDIT_BENCH_SECS` (default 3) size the proxy rounds;
//! `AUDIT_BENCH_ONLY=on` (or `off`) runs one side only, to profile it (`perf record`);
//! `AUDIT_BENCH_CLIENTS=1,32,128` (the default) the client counts.

#[path = "../tests/common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cbgate::config::AuditConfig;
use cbgate::ops::audit::{self, Audit};
use serde_json::{Map, Value};

/// A record the size of an order intent (about 600 bytes).
fn record(i: usize) -> Map<String, Value> {
    let v = serde_json::json!({
        "time": "2026-12-01T22:30:00.123Z",
        "type": "intent",
        "request_id": format!("{i:032x}"),
        "identity": null,
        "key": "organizations/00000000-0000-0000-0000-000000000000/apiKeys/00000000-0000-0000-0000-000000000000",
        "method": "POST",
        "path": "/api/v3/brokerage/orders",
        "body_sha256": "5b0d1f8c6a0e4b1e9f2a7c3d4e5f60718293a4b5c6d7e8f90112233445566778",
        "body_bytes": 182,
        "order": {"product_id": "BTC-USD", "side": "BUY", "client_order_id": format!("c-{i}"),
                  "order_type": "limit_limit_gtc", "base_size": "0.001", "limit_price": "10000"},
        "decision": "forwarded",
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

async fn run(dir: &std::path::Path, writers: usize, per_writer: usize) -> (f64, Duration) {
    let file = dir.join(format!("audit-{writers}.log"));
    let _ = std::fs::remove_file(&file);
    let cfg = AuditConfig {
        file: Some(file.clone()),
        ..AuditConfig::default()
    };
    let log = Arc::new(
        Audit::open(&cfg, Duration::from_secs(30))
            .expect("open")
            .expect("configured"),
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let log = Arc::clone(&log);
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                log.append(record(w * per_writer + i))
                    .await
                    .expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let took = started.elapsed();
    let n = writers * per_writer;
    let report = audit::verify(std::slice::from_ref(&file)).expect("chain verifies");
    assert_eq!(report.records as usize, n);
    let _ = std::fs::remove_file(&file);
    (n as f64 / took.as_secs_f64(), took / n as u32)
}

/// This process's CPU time so far (user, system; all threads), from `/proc/self/stat`
/// (clock ticks of 1/100 s, Linux's fixed USER_HZ).
fn cpu_secs() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) closed by its `)`.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the `)`.
    let tick = |i: usize| f.get(i).copied().unwrap_or(0) as f64 / 100.0;
    (tick(11), tick(12))
}

/// One round: requests per second and CPU microseconds per request (client, cbgate, mock
/// and audit writer together, as they share the process).
struct Round {
    rate: f64,
    cpu_us: f64,
    /// The part of `cpu_us` spent in the kernel (syscalls, fsync, wake-ups).
    sys_us: f64,
    requests: u64,
}

/// POSTs per second through `gate` with `clients` request loops for `time`.
async fn throughput(gate: &common::harness::Gate, clients: usize, time: Duration) -> Round {
    let cpu0 = cpu_secs();
    use bytes::Bytes;
    use http_body_util::Full;
    let client = common::harness::h1_client();
    let url = format!("{}/api/v3/brokerage/orders", gate.url);
    let body = Bytes::from_static(
        br#"{"client_order_id":"c-1","product_id":"BTC-USD","side":"BUY","order_configuration":{"limit_limit_gtc":{"base_size":"0.001","limit_price":"10000","post_only":true}}}"#,
    );
    let end = Instant::now() + time;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                let req = http::Request::post(&url)
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))
                    .expect("request");
                let r = common::harness::send(&client, req).await;
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
    let cpu1 = cpu_secs();
    Round {
        rate: total as f64 / started.elapsed().as_secs_f64(),
        cpu_us: (cpu1.0 + cpu1.1 - cpu0.0 - cpu0.1) * 1e6 / total.max(1) as f64,
        sys_us: (cpu1.1 - cpu0.1) * 1e6 / total.max(1) as f64,
        requests: total,
    }
}

/// The proxy with the audit log on and off, interleaved rounds, for 1 and 32 clients.
async fn proxy_cost(dir: &std::path::Path) {
    use common::harness::{Gate, KeyForm, TestKey, Upstream};
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rounds = env("AUDIT_BENCH_ROUNDS", 3) as usize;
    // `on` or `off`: run that side only (for a profile of one side).
    let only_var = std::env::var("AUDIT_BENCH_ONLY").ok();
    let only = only_var.as_deref();
    let secs = Duration::from_secs(env("AUDIT_BENCH_SECS", 3));
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = Upstream::start(Some(&key)).await;
    let mut off = up.config();
    off.log.level = "warn".into();
    // The rate budget (30/s per key) would be what is measured otherwise.
    off.budget.enabled = false;
    let mut on = off.clone();
    let file = dir.join("proxy-audit.log");
    on.audit.file = Some(file.clone());
    let gate_off = Gate::start(off, Some(&key)).await;
    let gate_on = Gate::start(on, Some(&key)).await;
    // 128 clients: what group commit does when more requests are in flight than one fsync's
    // time can hold up.
    let fsyncs = || gate_on.proxy.audit().map_or(0, |a| a.fsyncs());
    let counts: Vec<usize> = std::env::var("AUDIT_BENCH_CLIENTS")
        .ok()
        .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![1, 32, 128]);
    for clients in counts {
        throughput(&gate_off, clients, Duration::from_secs(1)).await;
        throughput(&gate_on, clients, Duration::from_secs(1)).await;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut synced = 0;
        for _ in 0..rounds {
            if only != Some("on") {
                b.push(throughput(&gate_off, clients, secs).await);
            }
            let before = fsyncs();
            if only != Some("off") {
                a.push(throughput(&gate_on, clients, secs).await);
            }
            synced += fsyncs() - before;
        }
        if a.is_empty() || b.is_empty() {
            // One side only (to profile it): its rate, no comparison.
            let r = a.iter().chain(&b).map(|r| r.rate).sum::<f64>() / rounds.max(1) as f64;
            println!(
                "proxy, {clients:>3} client(s), audit {}: {r:.0} req/s",
                only.unwrap_or("")
            );
            continue;
        }
        let sent: u64 = a.iter().map(|r| r.requests).sum();
        let mean =
            |v: &[Round], f: fn(&Round) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
        let (on, off) = (mean(&a, |r| r.rate), mean(&b, |r| r.rate));
        let (cpu_on, cpu_off) = (mean(&a, |r| r.cpu_us), mean(&b, |r| r.cpu_us));
        let (sys_on, sys_off) = (mean(&a, |r| r.sys_us), mean(&b, |r| r.sys_us));
        let rates = |v: &[Round]| v.iter().map(|r| r.rate.round()).collect::<Vec<_>>();
        println!(
            "proxy, {clients:>3} client(s), POST through the mock over TLS: audit off {off:.0} req/s, on {on:.0} req/s ({:+.1}%); CPU per request off {cpu_off:.0} us ({sys_off:.0} in the kernel), on {cpu_on:.0} us ({sys_on:.0}); {:.2} fsyncs per request; rounds off {:?}, on {:?}",
            (on - off) / off * 100.0,
            synced as f64 / sent.max(1) as f64,
            rates(&b),
            rates(&a)
        );
    }
    gate_on.stop().await;
    gate_off.stop().await;
    // The last result records are queued, not waited for: give the writer a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = audit::verify(std::slice::from_ref(&file)).expect("the proxy's chain verifies");
    println!(
        "proxy audit log: {} records, chain verified",
        report.records
    );
}

fn main() {
    let dir = std::env::var_os("AUDIT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tmp"));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let dir = tempfile::tempdir_in(&dir).expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // `cargo bench` passes flags such as --bench; nothing to parse.
    for (writers, per_writer) in [(1, 500), (32, 200)] {
        let (rate, each) = rt.block_on(run(dir.path(), writers, per_writer));
        println!(
            "audit log, fsync on, {writers:>2} concurrent writer(s): {rate:>9.0} durable records/s ({:.3} ms per record per writer, {} records)",
            each.as_secs_f64() * 1e3 * writers as f64,
            writers * per_writer
        );
    }
    rt.block_on(proxy_cost(dir.path()));
}
