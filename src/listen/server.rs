//! Accepting clients: TCP and Unix-socket listeners, HTTP/1.1 and h2c (prior knowledge) on the
//! same port, keep-alive, and graceful shutdown.

use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Largest request head accepted (HTTP/1 read buffer, HTTP/2 header list). It must not exceed
/// what the smuggling guard inspects, or a head could hide a bad shape past the guard's view.
const MAX_HEAD_BYTES: usize = crate::listen::sniff::MAX_HEAD;

/// One h2 client connection may hold at most 1/CLIENT_SHARE of `upstream.max_in_flight` as
/// concurrent streams, so a single connection cannot take every upstream slot. A half keeps
/// the default (256 / 2 = 128) above the 100 that RFC 9113 section 6.5.2 recommends and that
/// clients (hyper, h2) assume before they read cbgate's SETTINGS: a lower limit would refuse
/// (REFUSED_STREAM) the first burst of streams on every new client connection.
const CLIENT_SHARE: usize = 2;

/// The h2 `SETTINGS_MAX_CONCURRENT_STREAMS` cbgate announces to each client connection.
pub fn client_streams(max_in_flight: usize) -> u32 {
    u32::try_from((max_in_flight / CLIENT_SHARE).max(1)).unwrap_or(u32::MAX)
}

use crate::config::ListenAddr;
use crate::listen::sniff::SmuggleGuard;
use crate::proxy::Proxy;

/// A bound listener. Binding is separate from serving so that callers (and tests) can bind
/// port 0 and learn the address before [`run`] starts.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

/// Binding a listener failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {cause}")]
pub struct BindError {
    pub addr: String,
    pub cause: io::Error,
}

impl Listener {
    /// Binds `addr`. A Unix socket is created with mode 0600; a stale socket file left by an
    /// earlier run is replaced, any other file at that path is an error.
    pub async fn bind(addr: &ListenAddr) -> Result<Listener, BindError> {
        let err = |cause| BindError {
            addr: addr.to_string(),
            cause,
        };
        match addr {
            ListenAddr::Tcp(a) => TcpListener::bind(a).await.map(Listener::Tcp).map_err(err),
            ListenAddr::Unix(path) => {
                use std::os::unix::fs::FileTypeExt as _;
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        return Err(err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "path exists and is not a socket",
                        )));
                    }
                    // A socket someone still answers on belongs to a running instance.
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        return Err(err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "another process is serving on this socket",
                        )));
                    }
                    std::fs::remove_file(path).map_err(err)?;
                }
                // Create the socket 0600 from the start: a chmod after bind would leave a window
                // in which group members (umask 002) could connect. umask is process-wide, so
                // it is restored at once.
                let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
                let bound = UnixListener::bind(path);
                rustix::process::umask(old);
                let listener = bound.map_err(err)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(err)?;
                Ok(Listener::Unix {
                    listener,
                    path: path.clone(),
                })
            }
        }
    }

    /// The address clients use, for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
            Listener::Unix { path, .. } => format!("unix:{}", path.display()),
        }
    }
}

/// Serving options that are not part of the proxy itself.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Time a client has to send a complete HTTP/1 request head.
    pub header_read_timeout: Duration,
    /// How long in-flight requests may take to finish after shutdown starts.
    pub drain_timeout: Duration,
    /// Open client connections at most; more are answered 503 and closed.
    pub max_connections: usize,
    /// Request header fields at most (HTTP/1); more get 431.
    pub max_headers: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            header_read_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(25),
            max_connections: 1024,
            max_headers: 100,
        }
    }
}

enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Serves `listeners` until `shutdown` resolves, then stops accepting and lets open
/// connections finish their requests for up to `drain_timeout`.
pub async fn run(
    listeners: Vec<Listener>,
    proxy: Arc<Proxy>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .max_headers(opts.max_headers)
        // Caps the request head at 64 KiB (hyper's default is ~400 KiB): larger gets 431.
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        // hyper's default is 200 per connection: 20 connections could open 4,000 streams.
        .max_concurrent_streams(client_streams(proxy.upstream().max_in_flight()))
        // h2 has no header read timeout: pings find clients that went away while holding a
        // connection slot.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(opts.max_connections));

    let (tx, mut rx) = mpsc::channel::<Accepted>(64);
    let mut unix_paths = Vec::new();
    let accept_tasks: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            if let Listener::Unix { path, .. } = &l {
                unix_paths.push(path.clone());
            }
            tokio::spawn(accept_loop(l, tx.clone()))
        })
        .collect();
    drop(tx);

    let graceful = GracefulShutdown::new();
    proxy.readiness().set_listening();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = rx.recv() => match accepted {
                Some(Accepted::Tcp(s)) => {
                    let _ = s.set_nodelay(true);
                    let s = SmuggleGuard::new(s).first_head_timeout(opts.header_read_timeout);
                    admit(s, &slots, &builder, &proxy, &graceful);
                }
                Some(Accepted::Unix(s)) => {
                    let s = SmuggleGuard::new(s).first_head_timeout(opts.header_read_timeout);
                    admit(s, &slots, &builder, &proxy, &graceful);
                }
                None => break,
            },
            () = &mut shutdown => break,
        }
    }
    // Not ready from here on, so the orchestrator stops sending traffic while we drain.
    proxy.readiness().set_shutting_down();
    for t in &accept_tasks {
        t.abort();
    }
    for p in unix_paths {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!(
        connections = graceful.count(),
        "shutting down: draining open connections"
    );
    // Upgraded (WebSocket) connections are outside hyper's graceful shutdown: close them too.
    let drained = tokio::join!(
        tokio::time::timeout(opts.drain_timeout, graceful.shutdown()),
        proxy.ws().shutdown(opts.drain_timeout),
    );
    if drained.0.is_err() {
        tracing::warn!(after = ?opts.drain_timeout, "drain timeout: closing remaining connections");
    }
}

async fn accept_loop(listener: Listener, tx: mpsc::Sender<Accepted>) {
    loop {
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
            Listener::Unix { listener, .. } => {
                listener.accept().await.map(|(s, _)| Accepted::Unix(s))
            }
        };
        match accepted {
            Ok(a) => {
                if tx.send(a).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves the connection if a slot is free; otherwise answers 503 and closes it, so a flood of
/// idle connections cannot exhaust file descriptors or memory.
fn admit<I>(
    io: I,
    slots: &Arc<Semaphore>,
    builder: &Arc<auto::Builder<TokioExecutor>>,
    proxy: &Arc<Proxy>,
    graceful: &GracefulShutdown,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match Arc::clone(slots).try_acquire_owned() {
        Ok(permit) => serve(io, permit, builder, proxy, graceful),
        Err(_) => {
            tracing::warn!("max_connections reached: refusing a client connection");
            tokio::spawn(refuse(io));
        }
    }
}

async fn refuse<I: AsyncRead + AsyncWrite + Unpin>(mut io: I) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = r#"{"error":"too_many_connections","message":"cbgate has max_connections open client connections; retry later"}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         x-cbgate-error: too_many_connections\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = io.write_all(head.as_bytes()).await;
        let _ = io.write_all(body.as_bytes()).await;
        let _ = io.shutdown().await;
        // Read what the client sent (briefly, boundedly) before closing: closing a socket with
        // unread input sends a reset that can destroy the 503 before the client reads it.
        let mut sink = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match tokio::time::timeout(Duration::from_millis(500), io.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
    })
    .await;
}

fn serve<I>(
    io: I,
    permit: OwnedSemaphorePermit,
    builder: &Arc<auto::Builder<TokioExecutor>>,
    proxy: &Arc<Proxy>,
    graceful: &GracefulShutdown,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let builder = Arc::clone(builder);
    let proxy = Arc::clone(proxy);
    let watcher = graceful.watcher();
    let open = proxy.metrics().client_connection();
    tokio::spawn(async move {
        let svc = service_fn(move |req| {
            let proxy = Arc::clone(&proxy);
            async move { proxy.handle(req).await }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(error = %e, "client connection ended with an error");
        }
        drop(permit);
        drop(open);
    });
}
