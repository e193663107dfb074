//! Request-smuggling shapes sent as raw bytes on a socket, as request-smuggling test suites do:
//! each must be answered 400 (or 431) and never reach Coinbase. Next to each, what hyper alone
//! (the same server configuration without `cbgate::listen::sniff::SmuggleGuard`) does with it, checked
//! by `hyper_alone_accepts_the_shapes_the_guard_exists_for`.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use common::harness::{raw, Gate, KeyForm, TestKey, Upstream};

/// What a shape must get from cbgate.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// 400 from cbgate, whose JSON message contains this.
    Refused(&'static str),
    /// This status from hyper itself (no cbgate body).
    Hyper(u16),
}

/// What hyper alone does with a shape (documentation, checked for the `Forwards` cases).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alone {
    /// Passes a request to the service: without the guard it would be signed and forwarded.
    Forwards,
    /// Answers this status itself.
    Refuses(u16),
}

struct Shape {
    name: &'static str,
    bytes: Vec<u8>,
    want: Want,
    alone: Alone,
}

const ORDERS: &str = "POST /api/v3/brokerage/orders HTTP/1.1\r\nHost: localhost\r\n";
const ACCOUNTS: &str = "GET /api/v3/brokerage/accounts HTTP/1.1\r\nHost: localhost\r\n";

fn shape(name: &'static str, bytes: &str, want: Want, alone: Alone) -> Shape {
    Shape {
        name,
        bytes: bytes.as_bytes().to_vec(),
        want,
        alone,
    }
}

fn shapes() -> Vec<Shape> {
    use Alone::{Forwards, Refuses};
    use Want::{Hyper, Refused};
    const TE_CL: &str = "both Transfer-Encoding and Content-Length";
    const DUP_CL: &str = "more than one Content-Length";
    const BAD_TE: &str = "Transfer-Encoding must be exactly one";
    let mut v = vec![
        shape(
            "Content-Length then Transfer-Encoding",
            &format!("{ORDERS}Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX"),
            Refused(TE_CL),
            Forwards,
        ),
        shape(
            "Transfer-Encoding then Content-Length",
            &format!("{ORDERS}Transfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nX"),
            Refused(TE_CL),
            Forwards,
        ),
        shape(
            "Transfer-Encoding: chunked and content-length: 0",
            &format!("{ORDERS}Transfer-Encoding: chunked\r\ncontent-length: 0\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            Refused(TE_CL),
            Forwards,
        ),
        shape(
            "duplicate equal Content-Length",
            &format!("{ORDERS}Content-Length: 2\r\nContent-Length: 2\r\n\r\n{{}}"),
            Refused(DUP_CL),
            Forwards,
        ),
        shape(
            "duplicate different Content-Length",
            &format!("{ORDERS}Content-Length: 2\r\nContent-Length: 3\r\n\r\n{{}} "),
            Refused(DUP_CL),
            Refuses(400),
        ),
        shape(
            "Content-Length list in one field",
            &format!("{ORDERS}Content-Length: 2, 2\r\n\r\n{{}}"),
            Refused(DUP_CL),
            Refuses(400),
        ),
        shape(
            "Content-Length with a sign",
            &format!("{ORDERS}Content-Length: +2\r\n\r\n{{}}"),
            Refused("Content-Length is not a plain decimal number"),
            Refuses(400),
        ),
        shape(
            "Transfer-Encoding: chunked, identity",
            &format!("{ORDERS}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
            Refused(BAD_TE),
            Refuses(400),
        ),
        shape(
            "Transfer-Encoding: chunked, chunked",
            &format!("{ORDERS}Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
            Refused(BAD_TE),
            Forwards,
        ),
        shape(
            "two Transfer-Encoding fields, identity then chunked",
            &format!("{ORDERS}Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            Refused(BAD_TE),
            Forwards,
        ),
        shape(
            "Transfer-Encoding: xchunked",
            &format!("{ORDERS}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
            Refused(BAD_TE),
            Refuses(400),
        ),
        shape(
            "Transfer-Encoding on HTTP/1.0",
            "POST /api/v3/brokerage/orders HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            Refused("Transfer-Encoding in an HTTP/1.0 request"),
            Refuses(400),
        ),
        shape(
            "obs-fold",
            &format!("{ACCOUNTS}X-A: 1\r\n  continued\r\n\r\n"),
            Refused("obsolete line folding"),
            Refuses(400),
        ),
        shape(
            "space before the colon",
            &format!("{ORDERS}Transfer-Encoding : chunked\r\nContent-Length: 2\r\n\r\n{{}}"),
            Refused("whitespace between a header name and its colon"),
            Refuses(400),
        ),
        shape(
            "NUL in a header value",
            &format!("{ACCOUNTS}X-A: 1\x002\r\n\r\n"),
            Refused("a NUL byte in the request head"),
            Refuses(400),
        ),
        shape(
            "bare LF ending a header line",
            &format!("{ACCOUNTS}X-A: 1\nX-B: 2\r\n\r\n"),
            Refused("bare LF"),
            Forwards,
        ),
        shape(
            "bare LF hiding a Transfer-Encoding",
            &format!("{ORDERS}X-A: 1\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            Refused("bare LF"),
            Forwards,
        ),
        shape(
            "bare CR inside a header line",
            &format!("{ACCOUNTS}X-A: 1\rX-B: 2\r\n\r\n"),
            Refused("a bare CR"),
            Refuses(400),
        ),
        shape(
            "vertical tab in a header value",
            &format!("{ACCOUNTS}X-A: 1\x0b\r\n\r\n"),
            Refused("a malformed header field"),
            Refuses(400),
        ),
    ];
    // Larger than 64 KiB: hyper's read buffer is capped there (server.rs), so hyper answers
    // 431. The padding also hides a TE+CL pair beyond the guard's limit: it must not get
    // through uninspected.
    v.push(shape(
        "head larger than 64 KiB, hiding TE + CL",
        &format!(
            "{ORDERS}X-Pad: {}\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
            "a".repeat(70 * 1024)
        ),
        Hyper(431),
        Refuses(431),
    ));
    let mut many = String::from(ACCOUNTS);
    for i in 0..101 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    v.push(shape(
        "more than 100 header fields",
        &many,
        Hyper(431),
        Refuses(431),
    ));
    v
}

fn status_of(out: &str) -> Option<u16> {
    out.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[tokio::test]
async fn smuggling_shapes_get_400_and_never_reach_coinbase() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;
    let mut failures = Vec::new();
    for s in shapes() {
        let out = raw(gate.addr, &s.bytes).await;
        let got = status_of(&out);
        let ok = match s.want {
            Want::Refused(why) => {
                got == Some(400)
                    && out.contains(r#""error":"bad_request""#)
                    && out.contains(why)
                    && out.contains("x-cbgate-error: bad_request")
            }
            Want::Hyper(status) => got == Some(status),
        };
        let reached = up.mock.requests().len();
        if !ok || reached != 0 {
            failures.push(format!(
                "{}: want {:?}, upstream requests {reached}, got:\n{out}",
                s.name, s.want
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
    assert!(up.mock.requests().is_empty());
}

#[tokio::test]
async fn pipelined_valid_then_smuggled_answers_both_in_order() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;
    let bytes = format!(
        "{ACCOUNTS}\r\n{ORDERS}Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/v3/brokerage/orders/historical/batch HTTP/1.1\r\nHost: localhost\r\n\r\n"
    );
    let out = raw(gate.addr, bytes.as_bytes()).await;
    let ok_at = out
        .find("HTTP/1.1 200")
        .expect("first request answered 200");
    let bad_at = out
        .find("HTTP/1.1 400")
        .expect("second request answered 400");
    assert!(ok_at < bad_at, "responses out of order:\n{out}");
    assert!(
        out.contains("both Transfer-Encoding and Content-Length"),
        "{out}"
    );
    assert_eq!(
        out.matches("HTTP/1.1 ").count(),
        2,
        "nothing after the refusal:\n{out}"
    );
    let rec = up.mock.requests();
    assert_eq!(rec.len(), 1, "only the valid request reaches Coinbase");
    assert_eq!(rec[0].path_and_query, "/api/v3/brokerage/accounts");
}

#[tokio::test]
async fn valid_chunked_and_pipelined_requests_pass_through_the_guard() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;
    // A chunked body with an extension, a chunk whose data looks like framing, and a trailer;
    // then a Content-Length body that contains a request; then a GET. One connection, one write.
    let cl_body = "{\"note\":\"\r\n\r\nGET / HTTP/1.1\r\n\"}";
    let bytes = format!(
        "{ORDERS}Transfer-Encoding: chunked\r\n\r\n4;ext=1\r\n{{\"a\"\r\nA\r\n:\"0\r\n\r\n\"}}x\r\n0\r\nX-Trailer: t\r\n\r\n\
         {ORDERS}Content-Length: {}\r\n\r\n{cl_body}\
         {ACCOUNTS}Connection: close\r\n\r\n",
        cl_body.len()
    );
    let out = raw(gate.addr, bytes.as_bytes()).await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 3, "{out}");
    let rec = up.mock.requests();
    assert_eq!(rec.len(), 3);
    assert_eq!(&rec[0].body[..], b"{\"a\":\"0\r\n\r\n\"}x");
    assert_eq!(&rec[1].body[..], cl_body.as_bytes());
    assert_eq!(rec[2].path_and_query, "/api/v3/brokerage/accounts");
}

#[tokio::test]
async fn unix_socket_clients_are_guarded_too() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let up = Upstream::start(Some(&key)).await;
    let sock = up.dir.path().join("cbgate.sock");
    let listener =
        cbgate::listen::server::Listener::bind(&cbgate::config::ListenAddr::Unix(sock.clone()))
            .await
            .expect("bind unix");
    let _gate = Gate::start_on(up.config(), Some(&key), vec![listener]).await;
    let mut s = tokio::net::UnixStream::connect(&sock)
        .await
        .expect("connect");
    s.write_all(format!("{ORDERS}Content-Length: 2\r\nContent-Length: 2\r\n\r\n{{}}").as_bytes())
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("more than one Content-Length"), "{out}");
    assert!(up.mock.requests().is_empty());
}

#[tokio::test]
async fn silent_clients_are_cut_off_at_the_header_read_timeout() {
    // hyper-util's auto builder reads the first bytes (HTTP/1 or HTTP/2?) without a timer, so
    // before the guard a client that connected and sent nothing held its connection forever;
    // the guard's first-head deadline closes it.
    let up = Upstream::start(None).await;
    let mut cfg = up.config();
    cfg.header_read_timeout = Duration::from_millis(300);
    let gate = Gate::start(cfg, None).await;
    for first in [
        &b""[..],
        b"G",
        b"GET /api/v3/brokerage/accounts HTTP/1.1\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(gate.addr)
            .await
            .expect("connect");
        s.write_all(first).await.expect("write");
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "connection still open after the header read timeout (sent {first:?})"
        );
    }
    assert!(up.mock.requests().is_empty());
}

/// Serves connections with hyper alone, configured as `cbgate::listen::server` configures it, and
/// counts the requests its service sees.
async fn hyper_alone() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    tokio::spawn(async move {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(2))
            .max_headers(100)
            .max_buf_size(64 * 1024)
            .keep_alive(true);
        let builder = Arc::new(builder);
        while let Ok((s, _)) = listener.accept().await {
            let builder = Arc::clone(&builder);
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let counter = Arc::clone(&counter);
                    async move {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            "served",
                        ))))
                    }
                });
                let _ = builder
                    .serve_connection_with_upgrades(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// Like `harness::raw`, but gives up after one second: hyper alone keeps serving the
/// connections that it accepts, so they do not close.
async fn raw_briefly(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn hyper_alone_accepts_the_shapes_the_guard_exists_for() {
    // Documents the guard's value: each `Forwards` shape is served by hyper alone (so cbgate
    // would sign and forward it); each `Refuses` shape hyper refuses itself. If hyper becomes
    // stricter, this fails and the table above should be updated.
    let (addr, seen) = hyper_alone().await;
    let mut wrong = Vec::new();
    for s in shapes() {
        let before = seen.load(Ordering::SeqCst);
        let out = raw_briefly(addr, &s.bytes).await;
        let served = seen.load(Ordering::SeqCst) > before;
        let got = if served {
            Alone::Forwards
        } else {
            Alone::Refuses(status_of(&out).unwrap_or(0))
        };
        if got != s.alone {
            wrong.push(format!(
                "{}: documented {:?}, hyper alone {:?}:\n{out}",
                s.name, s.alone, got
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n---\n"));
}
