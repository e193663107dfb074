//! The per-core model (`[runtime] model = "per-core"`, the default) through the real binary:
//! two worker threads, each with its own `SO_REUSEPORT` socket, still hold one global
//! `max_connections`, never join another process's port, drain on SIGTERM and answer on every
//! worker.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use common::harness::{cbgate_command, free_port, http_get, KeyForm, Process, TestKey, Upstream};

/// A per-core configuration with two threads on a TCP port; `extra` goes at the top level.
fn write_config(up: &Upstream, extra: &str) -> (PathBuf, SocketAddr, SocketAddr) {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let cfg = up.dir.path().join("cbgate.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"listen = ["{listen}"]
admin_listen = "{admin}"
shutdown_timeout = "10s"
{extra}

[runtime]
model = "per-core"
threads = 2

[budget]
enabled = false

[upstream]
ca_file = "{ca}"

[upstream.resolve]
"api.coinbase.com" = "{mock}"
"api.cdp.coinbase.com" = "{mock}"
"#,
            ca = up.ca_file.display(),
            mock = up.mock.addr,
        ),
    )
    .expect("write config");
    (cfg, listen, admin)
}

async fn start(key: &TestKey, cfg: &PathBuf, admin: SocketAddr) -> Process {
    let mut cmd = cbgate_command();
    cmd.args(["serve", "--config"])
        .arg(cfg)
        .env("COINBASE_API_KEY", &key.name)
        .env("COINBASE_API_SECRET", &key.secret);
    let mut p = Process::spawn(cmd);
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ready.clone();
    let probe = tokio::spawn(async move {
        loop {
            // Connect first: http_get panics on a refused connection (not listening yet).
            let up = tokio::net::TcpStream::connect(admin).await.is_ok();
            if up && http_get(admin, "/readyz").await.0 == StatusCode::OK {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    p.wait_until("/readyz 200", || {
        ready.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    probe.abort();
    p
}

/// The names of the process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(n) = std::fs::read_to_string(t.path().join("comm")) {
                names.push(n.trim().to_owned());
            }
        }
    }
    names
}

/// One HTTP/1.1 keep-alive GET on an open connection; the response head and body as text.
async fn get_on(s: &mut tokio::net::TcpStream, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the head and a body of its content-length have arrived.
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("response in time")
            .expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                break;
            }
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_is_one_limit_across_the_worker_threads() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let (cfg, listen, admin) = write_config(&up, "max_connections = 3");
    let p = start(&key, &cfg, admin).await;
    let workers = thread_names(p.child.id())
        .iter()
        .filter(|n| n.starts_with("cbgate-w"))
        .count();
    assert_eq!(workers, 2, "threads: {:?}", thread_names(p.child.id()));

    // Three connections, each answered once (so each holds a slot on whichever worker took it).
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(listen)
            .await
            .expect("connect");
        let answer = get_on(&mut s, "/api/v3/brokerage/accounts").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(s);
    }
    // The fourth is over the one limit, whichever worker's socket the kernel gives it to.
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(listen)
            .await
            .expect("connect");
        let answer = get_on(&mut s, "/api/v3/brokerage/accounts").await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("too_many_connections"), "{answer}");
    }
    // A slot freed on one worker is free for all.
    drop(held.pop());
    let mut ok = false;
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(listen)
            .await
            .expect("connect");
        if get_on(&mut s, "/api/v3/brokerage/accounts")
            .await
            .starts_with("HTTP/1.1 200")
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "a freed slot was never given to a new connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_cbgate_cannot_share_the_port_through_reuseport() {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = Upstream::start(Some(&key)).await;
    let (cfg, listen, admin) = write_config(&up, "");
    let _first = start(&key, &cfg, admin).await;
    // The same listen address, another admin port: refused, not silently sharing the port.
    let other = up.dir.path().join("second.toml");
    let text = std::fs::read_to_string(&cfg).expect("config");
    let admin2 = format!("127.0.0.1:{}", free_port());
    std::fs::write(&other, text.replace(&admin.to_string(), &admin2)).expect("write");
    let mut cmd = cbgate_command();
    cmd.args(["serve", "--config"])
        .arg(&other)
        .env("COINBASE_API_KEY", &key.name)
        .env("COINBASE_API_SECRET", &key.secret);
    let out = common::harness::run_within(cmd, Duration::from_secs(20)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {listen}")),
        "{stderr}"
    );
    assert!(stderr.contains("another cbgate"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_requests_of_every_worker() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let (cfg, listen, admin) = write_config(&up, "");
    let p = start(&key, &cfg, admin).await;

    // Slow streamed responses on several connections (spread over the workers by the kernel).
    let mut bodies = Vec::new();
    for _ in 0..6 {
        let stream = tokio::net::TcpStream::connect(listen)
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
        bodies.push(body);
    }
    p.signal("TERM");
    for body in bodies {
        let rest = body.collect().await.expect("rest of the body").to_bytes();
        assert_eq!(&rest[..], b"chunk-1\nchunk-2\n");
    }
    let (status, output) = p.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_idle_upstream_connections_leave_slots_for_each_other() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let (cfg, listen, admin) = write_config(&up, "");
    // 13 connections per host shared by two workers' pools: each keeps at most 6 idle, so
    // one slot always stays free for the other worker (pool_max_idle_per_host = 13 alone
    // would let one pool keep all 13 while the other waits for a slot).
    // HTTP/1.1 upstream: one connection per concurrent request (h2 would multiplex on one).
    let text = std::fs::read_to_string(&cfg).expect("read config");
    std::fs::write(
        &cfg,
        text.replacen(
            "[upstream]\n",
            "[upstream]\nprotocol = \"http1\"\nmax_connections_per_host = 13\npool_max_idle_per_host = 13\n",
            1,
        ),
    )
    .expect("write config");
    let _p = start(&key, &cfg, admin).await;

    // 26 slow requests at once, on 26 client connections spread over both workers: every
    // slot is used.
    let mut tasks = Vec::new();
    for _ in 0..26 {
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(listen)
                .await
                .expect("connect");
            get_on(&mut s, "/api/v3/brokerage/sleep/300").await
        }));
    }
    for t in tasks {
        let answer = t.await.expect("request");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    assert!(
        up.mock.connections() >= 13,
        "the burst opened only {} upstream connections: it does not test the idle limit",
        up.mock.connections()
    );
    // What stays open afterwards is what the pools keep idle: at most 6 each.
    let mut open = up.mock.open_connections();
    for _ in 0..100 {
        if open <= 12 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        open = up.mock.open_connections();
    }
    assert!(
        open <= 12,
        "{open} idle upstream connections kept: more than the two workers' share of 13"
    );
}
