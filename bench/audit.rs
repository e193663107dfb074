//! What the audit log costs: durable records per second (each record fsync'd before its writer
//! continues, as an intent record is before its request leaves) with 1 and with 32 concurrent
//! writers. With 32, group commit lets one fsync release every record queued meanwhile.
//!
//! Run: `cargo bench --bench audit` (the file goes to `$AUDIT_BENCH_DIR`, default a temporary
//! directory under `target/`: put it on the disk the real log will use). Prints one line per
//! case; the chain is verified afterwards so the figures cannot come from a broken log.

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

fn main() {
    let dir = std::env::var_os("AUDIT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tmp"));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let dir = tempfile::tempdir_in(&dir).expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // `cargo bench` passes flags such as --bench; nothing to parse.
    for (writers, per_writer) in [(1, 500), (32, 200)] {
        let (rate, each) = rt.block_on(run(dir.path(), writers, per_writer));
        println!(
            "audit log, fsync on, {writers:>2} concurrent writer(s): {rate:>9.0} durable records/s ({:.3} ms per record per writer, {} records)",
            each.as_secs_f64() * 1e3 * writers as f64,
            writers * per_writer
        );
    }
}
