//! Client connections over real sockets: every phase of a connection has a timeout (protocol
//! detection and the h2 preface, idle keep-alive and h2, silent bodies both ways), the admin
//! listener has its own limits, timeouts and Host check, and the open-file limit is raised.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use common::harness::{self, Gate, KeyForm, TestKey, Upstream};

/// Small numbers so a test takes a second or two.
const SHORT: Duration = Duration::from_millis(300);

/// Connects and writes `bytes`, keeping the connection open.
async fn stalled(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    if !bytes.is_empty() {
        s.write_all(bytes).await.expect("write");
    }
    s
}

/// Reads until the server closes the connection; panics if it is still open after 5 s.
async fn closed_by_server(s: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "{what}: still open after 5 s");
    out
}

/// The first connection beyond the limit gets 503; returns the response text.
async fn over_the_limit(addr: SocketAddr) -> String {
    harness::raw(addr, b"GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n").await
}

/// A request that cbgate answers itself (404 no_route): the connection was served.
async fn served(addr: SocketAddr) -> String {
    harness::raw(
        addr,
        b"GET /nope HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const SETTINGS: &[u8] = &[0, 0, 0, 0x4, 0, 0, 0, 0, 0];
/// A HEADERS frame on stream 1 without END_HEADERS: the CONTINUATION never comes.
const HEADERS_UNFINISHED: &[u8] = &[0, 0, 1, 0x1, 0, 0, 0, 0, 1, 0x82];

#[tokio::test]
async fn h2_preface_and_unfinished_first_requests_do_not_hold_slots() {
    let up = Upstream::start(None).await;
    let mut cfg = up.config();
    cfg.max_connections = 4;
    cfg.header_read_timeout = SHORT;
    let gate = Gate::start(cfg, None).await;
    let mut conns = [
        // The 14 bytes that decide "maybe HTTP/2": hyper-util's version sniffing has no timer.
        stalled(gate.addr, b"PRI * HTTP/2.0").await,
        stalled(gate.addr, PREFACE).await,
        stalled(gate.addr, &[PREFACE, SETTINGS].concat()).await,
        stalled(gate.addr, &[PREFACE, SETTINGS, HEADERS_UNFINISHED].concat()).await,
    ];
    tokio::time::sleep(Duration::from_millis(50)).await;
    let out = over_the_limit(gate.addr).await;
    assert!(
        out.starts_with("HTTP/1.1 503"),
        "all 4 slots are held: {out}"
    );
    for (i, c) in conns.iter_mut().enumerate() {
        closed_by_server(c, &format!("stalled connection {i}")).await;
    }
    let out = served(gate.addr).await;
    assert!(out.starts_with("HTTP/1.1 404"), "slots were freed: {out}");
    gate.stop().await;
}

/// An h2c connection (prior knowledge) that answers pings; resolves when the server closes it.
async fn h2c_connection(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get(format!("http://localhost:{}/nope", addr.port()))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // The sender stays alive (held by nobody would close the client side).
    tokio::spawn(async move {
        let _keep = sender;
        std::future::pending::<()>().await;
    });
    task
}

#[tokio::test]
async fn idle_keep_alive_and_h2_connections_are_closed_after_idle_timeout() {
    let up = Upstream::start(None).await;
    let mut cfg = up.config();
    cfg.max_connections = 4;
    // Long enough that only idle_timeout can close the HTTP/1.1 connections.
    cfg.header_read_timeout = Duration::from_secs(10);
    cfg.idle_timeout = SHORT;
    let gate = Gate::start(cfg, None).await;
    let mut h1 = Vec::new();
    for _ in 0..2 {
        let mut s = stalled(gate.addr, b"GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).await.expect("response");
        assert!(buf[..n].starts_with(b"HTTP/1.1 404"));
        h1.push(s);
    }
    let h2 = vec![
        h2c_connection(gate.addr).await,
        h2c_connection(gate.addr).await,
    ];
    let out = over_the_limit(gate.addr).await;
    assert!(
        out.starts_with("HTTP/1.1 503"),
        "all 4 slots are held: {out}"
    );
    for (i, s) in h1.iter_mut().enumerate() {
        closed_by_server(s, &format!("keep-alive connection {i}")).await;
    }
    for (i, t) in h2.into_iter().enumerate() {
        let r = tokio::time::timeout(Duration::from_secs(5), t).await;
        assert!(r.is_ok(), "h2 connection {i}: still open after 5 s");
    }
    let out = served(gate.addr).await;
    assert!(out.starts_with("HTTP/1.1 404"), "slots were freed: {out}");
    gate.stop().await;
}

#[tokio::test]
async fn a_request_body_that_stops_gets_408_and_frees_the_connection() {
    let up = Upstream::start(None).await;
    let mut cfg = up.config();
    cfg.max_connections = 1;
    cfg.body_timeout = SHORT;
    let gate = Gate::start(cfg, None).await;
    let mut s = stalled(
        gate.addr,
        b"POST /api/v3/brokerage/orders HTTP/1.1\r\nHost: localhost\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"client_order_id\":",
    )
    .await;
    let out = String::from_utf8_lossy(&closed_by_server(&mut s, "stalled body").await).into_owned();
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(out.contains("request_body_timeout"), "{out}");
    // The slot is free again.
    let out = served(gate.addr).await;
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    gate.stop().await;
}

#[tokio::test]
async fn an_upstream_body_that_stops_is_cut_off_and_both_connections_released() {
    let up = Upstream::start(None).await;
    let mut cfg = up.config();
    cfg.max_connections = 1;
    cfg.body_timeout = SHORT;
    let gate = Gate::start(cfg, None).await;
    let mut s = stalled(
        gate.addr,
        b"GET /api/v3/brokerage/market/stall-body HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    let out =
        String::from_utf8_lossy(&closed_by_server(&mut s, "stalled response").await).into_owned();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("first"), "{out}");
    assert!(
        !out.ends_with("0\r\n\r\n"),
        "the response must not look complete: {out}"
    );
    // cbgate stopped reading the upstream body (stream reset or connection closed).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while up.mock.stalls_released() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "upstream response still held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = served(gate.addr).await;
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    gate.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_body_timeout() {
    let up = Upstream::start(None).await;
    let mut cfg = up.config();
    cfg.max_connections = 1;
    cfg.body_timeout = SHORT;
    let gate = Gate::start(cfg, None).await;
    // Far more than the socket buffers on both sides hold.
    const TOTAL: usize = 64 << 20;
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(16 * 1024).expect("rcvbuf");
    let mut s = sock.connect(gate.addr).await.expect("connect");
    s.write_all(
        format!("GET /api/v3/brokerage/market/big/{TOTAL} HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    // The client reads nothing for a while: cbgate gives up on it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection was not closed");
    assert!(got < TOTAL, "cut off: {got} of {TOTAL} bytes");
    let out = served(gate.addr).await;
    assert!(
        out.starts_with("HTTP/1.1 404"),
        "the slot is free again: {out}"
    );
    gate.stop().await;
}

/// An admin listener in-process, with a loaded key, the proxy marked listening.
async fn admin(max: usize) -> (SocketAddr, TestKey) {
    let cfg = cbgate::config::Config {
        admin_max_connections: max,
        header_read_timeout: SHORT,
        idle_timeout: SHORT,
        ..Default::default()
    };
    let key = TestKey::generate(KeyForm::P256Sec1);
    let dir = tempfile::tempdir().expect("tempdir");
    let api_key = cbgate::sign::key::KeySource::File(key.write_json(dir.path()))
        .load()
        .expect("key");
    let proxy = Arc::new(cbgate::proxy::Proxy::new(&cfg, Some(api_key)).expect("proxy"));
    proxy.readiness().set_listening();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let gate = cbgate::gate::client::ClientGate::new(None, &[], &[]).allow_ip_hosts();
    let opts = cbgate::listen::server::ServeOptions::admin(&cfg);
    tokio::spawn(cbgate::ops::admin::run(
        listener,
        proxy,
        gate,
        opts,
        std::future::pending(),
    ));
    (addr, key)
}

async fn admin_get(addr: SocketAddr, path: &str, host: &str) -> String {
    harness::raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

#[tokio::test]
async fn admin_refuses_rebinding_hosts_and_cross_site_origins() {
    let (addr, key) = admin(4).await;
    let ok = admin_get(addr, "/readyz", "127.0.0.1").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains(&key.name), "readyz names the key: {ok}");
    // A probe to the pod IP.
    let ok = admin_get(addr, "/livez", "10.1.2.3:8751").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let bad = admin_get(addr, "/readyz", "attacker.example").await;
    assert!(bad.starts_with("HTTP/1.1 403"), "{bad}");
    assert!(bad.contains("host_not_allowed"), "{bad}");
    assert!(!bad.contains(&key.name), "{bad}");
    let bad = harness::raw(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nOrigin: https://attacker.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 403"), "{bad}");
    assert!(bad.contains("origin_not_allowed"), "{bad}");
}

#[tokio::test]
async fn admin_has_its_own_connection_limit_and_timeouts() {
    let (addr, _key) = admin(2).await;
    let mut idle = [
        stalled(addr, b"").await,
        stalled(addr, b"GET /livez HTTP/1.1\r\nHost: local").await,
    ];
    tokio::time::sleep(Duration::from_millis(50)).await;
    let out = admin_get(addr, "/livez", "localhost").await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    for (i, s) in idle.iter_mut().enumerate() {
        closed_by_server(s, &format!("idle admin connection {i}")).await;
    }
    let out = admin_get(addr, "/metrics", "localhost").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.contains("cbgate_timeouts_total{listener=\"admin\",kind=\"header\"} 2"),
        "{out}"
    );
    assert!(
        out.contains("cbgate_connections_refused_total{listener=\"admin\"} 1"),
        "{out}"
    );
}

/// `cbgate` with the soft (and hard) open-file limit set before exec.
fn with_nofile(mut cmd: std::process::Command, soft: u64, hard: u64) -> std::process::Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: setrlimit is a plain system call, safe between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setrlimit(
                rustix::process::Resource::Nofile,
                rustix::process::Rlimit {
                    current: Some(soft),
                    maximum: Some(hard),
                },
            )
            .map_err(std::io::Error::from)
        });
    }
    cmd
}

#[test]
fn check_raises_the_open_file_limit_and_warns_when_it_is_too_small() {
    let out = with_nofile(harness::cbgate_command(), 256, 8192)
        .arg("check")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("open files: soft limit 8192 (hard 8192, raised from 256)"),
        "{text}"
    );
    assert!(!text.contains("warning:"), "{text}");
    // A hard limit of 1024 cannot hold max_connections = 1024 with its upstream connections.
    let out = with_nofile(harness::cbgate_command(), 1024, 1024)
        .arg("check")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("warning: the open-file limit (RLIMIT_NOFILE) is 1024"),
        "{text}"
    );
}

fn serve_config(dir: &std::path::Path, extra: &str) -> (std::path::PathBuf, u16) {
    let port = harness::free_port();
    let admin = harness::free_port();
    let path = dir.join("cbgate.toml");
    std::fs::write(
        &path,
        format!(
            "listen = [\"127.0.0.1:{port}\"]\nadmin_listen = \"127.0.0.1:{admin}\"\n{extra}\n\
             [upstream.resolve]\n\"api.coinbase.com\" = \"127.0.0.1:9\"\n"
        ),
    )
    .expect("write config");
    (path, port)
}

async fn wait_served(p: &mut harness::Process, port: u16) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    p.wait_until("the proxy port answers", || {
        std::net::TcpStream::connect(addr).is_ok()
    })
    .await;
}

#[tokio::test]
async fn serve_runs_with_the_raised_limit_and_survives_running_out_of_descriptors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, port) = serve_config(dir.path(), "header_read_timeout = \"300ms\"");
    let mut cmd = with_nofile(harness::cbgate_command(), 128, 4096);
    cmd.arg("serve").arg("--config").arg(&config);
    let mut p = harness::Process::spawn(cmd);
    wait_served(&mut p, port).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", p.child.id())).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line");
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums, ["4096", "4096"], "{line}");
    drop(p);

    // Now a hard limit of 64: more idle connections than descriptors. The accept loop backs
    // off while out of descriptors, the header timeout frees them, and the port serves again.
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, port) = serve_config(dir.path(), "header_read_timeout = \"300ms\"");
    let mut cmd = with_nofile(harness::cbgate_command(), 64, 64);
    cmd.arg("serve").arg("--config").arg(&config);
    let mut p = harness::Process::spawn(cmd);
    wait_served(&mut p, port).await;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut idle = Vec::new();
    for _ in 0..80 {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !p.output().contains("accept failed") {
        assert!(
            std::time::Instant::now() < deadline,
            "accept never ran out of descriptors:\n{}",
            p.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(idle);
    let out = served(addr).await;
    assert!(out.starts_with("HTTP/1.1 404"), "{out}\n{}", p.output());
    assert!(
        p.output()
            .contains("the open-file limit (RLIMIT_NOFILE) is 64"),
        "{}",
        p.output()
    );
    assert!(p.child.try_wait().expect("wait").is_none(), "still running");
}
