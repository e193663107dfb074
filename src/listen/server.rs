//! Accepting clients: TCP and Unix-socket listeners, HTTP/1.1 and h2c (prior knowledge) on the
//! same port, keep-alive, and graceful shutdown. The admin listener is served by the same code
//! with its own budget ([`serve`]).
//!
//! Every phase of a client connection has a timeout. Each connection task runs one timer:
//! until the first request reaches the service, `header_read_timeout` from accept (this covers
//! hyper-util's protocol detection, which has no timer, the h2 preface and SETTINGS, and the
//! first HEADERS); while no request is in flight, `idle_timeout`; while a request is in flight,
//! none (its bodies have `body_timeout`, see `forward::body_timeout`). hyper's own HTTP/1
//! `header_read_timeout` also covers every later request head.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Largest request head accepted (HTTP/1 read buffer, HTTP/2 header list). It must not exceed
/// what the smuggling guard inspects, or a head could hide a bad shape past the guard's view.
const MAX_HEAD_BYTES: usize = crate::listen::sniff::MAX_HEAD;

use crate::config::{Config, ListenAddr};

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
use crate::gate::identity::{Peer, Recognised};
use crate::listen::sniff::SmuggleGuard;
use crate::proxy::Proxy;
use crate::{Body, BoxError};

/// After cbgate closes an idle connection (h2: GOAWAY), how long the peer has to let it end.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Refusals (503, then a short lingering close) in progress at once per listener; past it a
/// connection over the limit is closed at once, so a flood cannot hold descriptors this way.
pub const REFUSING_AT_ONCE: usize = 32;

/// A bound listener. Binding is separate from serving so that callers (and tests) can bind
/// port 0 and learn the address before [`run`] starts.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    /// TCP serving TLS (`https://`); the certificate comes from the proxy's
    /// [`crate::listen::tls::TlsContext`].
    Tls(TcpListener),
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
        Listener::bind_mode(addr, 0o600).await
    }

    /// Binds `addr`; a Unix socket gets `unix_mode` (e.g. 0o660 so that a group can connect;
    /// its peers are then told apart by their uid/gid, see `gate::identity`).
    pub async fn bind_mode(addr: &ListenAddr, unix_mode: u32) -> Result<Listener, BindError> {
        let err = |cause| BindError {
            addr: addr.to_string(),
            cause,
        };
        match addr {
            ListenAddr::Tcp(a) => TcpListener::bind(a).await.map(Listener::Tcp).map_err(err),
            ListenAddr::Tls(a) => TcpListener::bind(a).await.map(Listener::Tls).map_err(err),
            ListenAddr::Unix(path) => {
                use std::os::unix::fs::FileTypeExt as _;
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    // A symlink is replaced below (rename swaps the link itself), never followed.
                    if !meta.file_type().is_socket() && !meta.file_type().is_symlink() {
                        return Err(err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "path exists and is not a socket",
                        )));
                    }
                    // A socket someone still answers on belongs to a running instance.
                    if meta.file_type().is_socket()
                        && std::os::unix::net::UnixStream::connect(path).is_ok()
                    {
                        return Err(err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "another process is serving on this socket",
                        )));
                    }
                }
                let listener = bind_private(path, unix_mode & 0o666).map_err(err)?;
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
            Listener::Tls(l) => l
                .local_addr()
                .map(|a| format!("https://{a}"))
                .unwrap_or_else(|_| "https".into()),
            Listener::Unix { path, .. } => format!("unix:{}", path.display()),
        }
    }
}

/// Binds a Unix socket at `path` with `mode`: bound in a fresh directory next to it that only
/// this user can enter (0700), given its mode there, then renamed onto `path`. So no one can
/// connect before the mode is set, without touching the process-wide umask; the chmod is on a
/// path no one else can swap for a symlink; and the rename replaces whatever is at `path` (a
/// stale socket, a symlink) atomically instead of following it.
fn bind_private(path: &std::path::Path, mode: u32) -> io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt as _;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let mut raw = [0u8; 4];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| io::Error::other("no random bytes"))?;
    // Short, so that the temporary path stays within the 108 bytes of a socket address.
    let dir = parent.join(format!(".cbgate-{:08x}", u32::from_le_bytes(raw)));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let tmp = dir.join("s");
    let bound = (|| {
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    })();
    if bound.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let _ = std::fs::remove_dir(&dir);
    bound
}

/// Serving options for one listener (the proxy's or the admin's).
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Time a new connection has to deliver its first complete request (protocol detection,
    /// h2 preface and SETTINGS, request headers); hyper also applies it to later HTTP/1 heads.
    pub header_read_timeout: Duration,
    /// Time a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// Time a client may read nothing while cbgate has a response to write (`body_timeout`).
    pub write_timeout: Duration,
    /// How long in-flight requests may take to finish after shutdown starts.
    pub drain_timeout: Duration,
    /// Open client connections at most; more are answered 503 and closed.
    pub max_connections: usize,
    /// Request header fields at most (HTTP/1); more get 431.
    pub max_headers: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions::proxy(&Config::default())
    }
}

impl ServeOptions {
    /// The proxy listener's options.
    pub fn proxy(cfg: &Config) -> ServeOptions {
        ServeOptions {
            header_read_timeout: cfg.header_read_timeout,
            idle_timeout: cfg.idle_timeout,
            write_timeout: cfg.body_timeout,
            drain_timeout: cfg.shutdown_timeout,
            max_connections: cfg.max_connections,
            max_headers: cfg.max_headers,
        }
    }

    /// The admin listener's: the same timeouts, its own connection budget.
    pub fn admin(cfg: &Config) -> ServeOptions {
        ServeOptions {
            max_connections: cfg.admin_max_connections,
            ..ServeOptions::proxy(cfg)
        }
    }
}

/// Which listener a connection came in on: the `listener` label of metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The proxy port: requests go through the smuggling guard to [`Proxy::handle`].
    Proxy,
    /// The admin port (`/livez`, `/readyz`, `/metrics`).
    Admin,
}

impl Role {
    fn label(self) -> &'static str {
        match self {
            Role::Proxy => "proxy",
            Role::Admin => "admin",
        }
    }
}

enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(TcpStream, tokio_rustls::TlsAcceptor),
}

/// An accepted `CONNECT` (`[intercept]`), handed from its connection to the accept loop, which
/// serves the tunnel (so a connection task never spawns another connection task itself).
struct TunnelStart {
    req: Request<Incoming>,
    host: Arc<str>,
    /// The client identity recognised at the CONNECT: every request inside is its.
    who: Recognised,
    acceptor: tokio_rustls::TlsAcceptor,
    /// The tunnel's own connection slot, taken before the 200 was sent.
    permit: OwnedSemaphorePermit,
    /// The TLS handshake inside and the first request must be done by then.
    deadline: Instant,
}

/// The `max_connections` slots of the proxy listeners. Clones share the slots, so threads
/// that each serve their own listeners (the per-core model) hold one global limit.
#[derive(Clone, Debug)]
pub struct ConnectionSlots(Arc<Semaphore>);

impl ConnectionSlots {
    /// `max` open client connections at most.
    pub fn new(max: usize) -> ConnectionSlots {
        ConnectionSlots(Arc::new(Semaphore::new(max)))
    }
}

/// Serves `listeners` until `shutdown` resolves, then stops accepting and lets open
/// connections finish their requests for up to `drain_timeout`.
pub async fn run(
    listeners: Vec<Listener>,
    proxy: Arc<Proxy>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let slots = ConnectionSlots::new(opts.max_connections);
    run_with_slots(listeners, proxy, opts, slots, shutdown).await;
}

/// [`run`] with connection slots shared with other servers (one per per-core worker).
pub async fn run_with_slots(
    listeners: Vec<Listener>,
    proxy: Arc<Proxy>,
    opts: ServeOptions,
    slots: ConnectionSlots,
    shutdown: impl Future<Output = ()>,
) {
    let drain_timeout = opts.drain_timeout;
    let unix_paths: Vec<PathBuf> = listeners
        .iter()
        .filter_map(|l| match l {
            Listener::Unix { path, .. } => Some(path.clone()),
            Listener::Tcp(_) | Listener::Tls(_) => None,
        })
        .collect();
    let handler = {
        let proxy = Arc::clone(&proxy);
        move |req| -> ProxyFuture {
            let proxy = Arc::clone(&proxy);
            // Boxed once here: the request's state machine is kilobytes (every phase's
            // locals), and hyper and the service wrapper would otherwise move it by value
            // several times per request (memcpy was 12% of a request's instructions).
            Box::pin(async move {
                match proxy.handle(req).await {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                }
            })
        }
    };
    let server = Server::new(Role::Proxy, Arc::clone(&proxy), opts, slots, handler);
    proxy.readiness().set_listening();
    server.accept_until(listeners, shutdown).await;
    // Not ready from here on, so the orchestrator stops sending traffic while we drain.
    proxy.readiness().set_shutting_down();
    for p in unix_paths {
        let _ = std::fs::remove_file(p);
    }
    tracing::info!(
        connections = server.open(),
        "shutting down: draining open connections"
    );
    // Upgraded (WebSocket) connections are outside hyper's graceful shutdown: close them too.
    let (drained, ()) = tokio::join!(
        server.drain(drain_timeout),
        proxy.ws().shutdown(drain_timeout),
    );
    if !drained {
        tracing::warn!(after = ?drain_timeout, "drain timeout: closing remaining connections");
    }
}

/// The proxy's per-request future, boxed (see `run_with_slots`).
type ProxyFuture = std::pin::Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// Serves `handler` on `listeners` for `role` (the admin listener) with the same connection
/// limits, timeouts and drain as the proxy listener, until `shutdown` resolves.
pub async fn serve<H, F>(
    role: Role,
    listeners: Vec<Listener>,
    proxy: Arc<Proxy>,
    opts: ServeOptions,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let drain_timeout = opts.drain_timeout;
    let slots = ConnectionSlots::new(opts.max_connections);
    let server = Server::new(role, proxy, opts, slots, handler);
    server.accept_until(listeners, shutdown).await;
    server.drain(drain_timeout).await;
}

/// One listener's serving state, shared by its connection tasks.
struct Server<H> {
    role: Role,
    builder: auto::Builder<TokioExecutor>,
    slots: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    opts: ServeOptions,
    proxy: Arc<Proxy>,
    handler: H,
    /// `true` once shutdown starts; every connection task holds a receiver, so
    /// [`watch::Sender::closed`] resolves when the last one has ended.
    stop: watch::Sender<bool>,
    /// Accepted CONNECTs on their way to the accept loop.
    tunnels: mpsc::Sender<TunnelStart>,
    tunnels_rx: std::sync::Mutex<Option<mpsc::Receiver<TunnelStart>>>,
    header_timeouts: Counter,
    idle_timeouts: Counter,
    write_timeouts: Counter,
}

impl<H, F> Server<H>
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    fn new(
        role: Role,
        proxy: Arc<Proxy>,
        opts: ServeOptions,
        slots: ConnectionSlots,
        handler: H,
    ) -> Arc<Server<H>> {
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
            // Pings find clients that went away while a request is in flight; idle ones are
            // closed by idle_timeout, whether they answer pings or not.
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let metrics = proxy.metrics();
        let (tunnels, tunnels_rx) = mpsc::channel(64);
        Arc::new(Server {
            tunnels,
            tunnels_rx: std::sync::Mutex::new(Some(tunnels_rx)),
            role,
            builder,
            slots: slots.0,
            refusing: Arc::new(Semaphore::new(REFUSING_AT_ONCE)),
            header_timeouts: metrics.timeout_counter(role.label(), "header"),
            idle_timeouts: metrics.timeout_counter(role.label(), "idle"),
            write_timeouts: metrics.timeout_counter(role.label(), "client_write"),
            opts,
            proxy,
            handler,
            stop: watch::Sender::new(false),
        })
    }

    /// Open connections (for the drain log line).
    fn open(&self) -> usize {
        self.stop.receiver_count()
    }

    /// Accepts on every listener until `shutdown` resolves.
    async fn accept_until(self: &Arc<Self>, listeners: Vec<Listener>, shutdown: impl Future) {
        let (tx, mut rx) = mpsc::channel::<Accepted>(64);
        let mut accept_tasks = Vec::new();
        for l in listeners {
            let acceptor = match &l {
                Listener::Tls(tcp) => {
                    let built = match (self.proxy.tls(), tcp.local_addr()) {
                        (Some(tls), Ok(local)) => {
                            tls.listener_acceptor(local).map_err(|e| e.to_string())
                        }
                        (None, _) => {
                            Err("no TLS configured (tls.cert_file or the local CA)".into())
                        }
                        (_, Err(e)) => Err(e.to_string()),
                    };
                    match built {
                        Ok(a) => Some(a),
                        Err(e) => {
                            tracing::error!(listen = %l.describe(), error = %e, "https listener not served");
                            continue;
                        }
                    }
                }
                _ => None,
            };
            accept_tasks.push(tokio::spawn(accept_loop(
                l,
                acceptor,
                tx.clone(),
                self.role,
            )));
        }
        drop(tx);
        let mut tunnels = self
            .tunnels_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                Some(t) = async { match tunnels.as_mut() { Some(r) => r.recv().await, None => None } } => {
                    tokio::spawn(Arc::clone(self).serve_tunnel(t));
                }
                accepted = rx.recv() => match accepted {
                    Some(Accepted::Tls(s, acceptor)) => {
                        let _ = s.set_nodelay(true);
                        self.admit_tls(s, acceptor);
                    }
                    Some(Accepted::Tcp(s)) => {
                        let _ = s.set_nodelay(true);
                        if self.role == Role::Proxy {
                            self.admit(SmuggleGuard::new(s), None);
                        } else {
                            self.admit(s, None);
                        }
                    }
                    Some(Accepted::Unix(s)) => {
                        // The kernel's record of who connected (SO_PEERCRED): the uid/gid of
                        // the process that called connect(), which a client cannot forge.
                        let peer = match s.peer_cred() {
                            Ok(c) => Some(Peer { uid: c.uid(), gid: c.gid() }),
                            Err(e) => {
                                tracing::debug!(error = %e, "no peer credentials on a Unix connection");
                                None
                            }
                        };
                        if self.role == Role::Proxy {
                            self.admit(SmuggleGuard::new(s), peer);
                        } else {
                            self.admit(s, peer);
                        }
                    }
                    None => break,
                },
                _ = &mut shutdown => break,
            }
        }
        for t in &accept_tasks {
            t.abort();
        }
    }

    /// Asks every connection to finish (HTTP/1: after the current response; h2: GOAWAY) and
    /// waits up to `timeout` for them; `false` when some were still open.
    async fn drain(&self, timeout: Duration) -> bool {
        self.stop.send_replace(true);
        tokio::time::timeout(timeout, self.stop.closed())
            .await
            .is_ok()
    }

    /// Serves the connection if a slot is free; otherwise answers 503 and closes it, so a flood
    /// of idle connections cannot exhaust file descriptors or memory.
    fn admit<I>(self: &Arc<Self>, io: I, peer: Option<Peer>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match self.slot() {
            Some(permit) => {
                let deadline = Instant::now() + self.opts.header_read_timeout;
                tokio::spawn(Arc::clone(self).serve_conn(io, permit, deadline, peer, None));
            }
            None => {
                // Bounded too: past REFUSING_AT_ONCE the connection is just closed.
                if let Ok(permit) = Arc::clone(&self.refusing).try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(io).await;
                        drop(permit);
                    });
                }
            }
        }
    }

    /// Takes a connection slot, or counts and logs the refusal.
    fn slot(&self) -> Option<OwnedSemaphorePermit> {
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                self.proxy.metrics().connection_refused(self.role.label());
                tracing::warn!(
                    listener = self.role.label(),
                    limit = self.opts.max_connections,
                    "connection limit reached: refusing a client connection"
                );
                None
            }
        }
    }

    /// A TLS connection: the slot is taken first, and the handshake runs inside the same
    /// `header_read_timeout` as the first request, so a client that stalls in the handshake
    /// holds its slot no longer than one that stalls in its headers.
    fn admit_tls(self: &Arc<Self>, tcp: TcpStream, acceptor: tokio_rustls::TlsAcceptor) {
        let Some(permit) = self.slot() else {
            // A TLS client cannot read a plain 503: the connection is closed.
            return;
        };
        let deadline = Instant::now() + self.opts.header_read_timeout;
        let server = Arc::clone(self);
        tokio::spawn(async move {
            match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    server
                        .serve_conn(SmuggleGuard::new(tls), permit, deadline, None, None)
                        .await
                }
                Ok(Err(e)) => {
                    tracing::info!(listener = server.role.label(), error = %e, "TLS handshake with a client failed");
                }
                Err(_) => server.handshake_timeout(),
            }
        });
    }

    fn handshake_timeout(&self) {
        self.header_timeouts.inc();
        tracing::info!(
            listener = self.role.label(),
            kind = "header",
            after_ms = self.opts.header_read_timeout.as_millis() as u64,
            "closing a client connection: timeout (in the TLS handshake)"
        );
    }

    /// Answers a `CONNECT` under `[intercept]`: checks the target, reserves the tunnel's own
    /// connection slot, then says 200 and hands the tunnel to the accept loop. `deadline`
    /// bounds the TLS handshake inside the tunnel and its first request: the connection's
    /// first-request deadline when the CONNECT was its first request, else
    /// `header_read_timeout` from now.
    fn connect(&self, req: Request<Incoming>, first_deadline: Instant) -> Response<Body> {
        let path = req.uri().to_string();
        let (host, who) = match self.proxy.connect_target(&req) {
            Ok(t) => t,
            Err(e) => return self.proxy.refusal(req.method(), &path, e),
        };
        let acceptor = match self.proxy.tls().map(|t| t.tunnel_acceptor(&host)) {
            Some(Ok(a)) => a,
            Some(Err(e)) => {
                let e = crate::error::ProxyError::BadRequest(format!("intercept: {e}"));
                return self.proxy.refusal(req.method(), &path, e);
            }
            None => {
                let e = crate::error::ProxyError::BadRequest(
                    "intercept needs the local CA, which is not set up".into(),
                );
                return self.proxy.refusal(req.method(), &path, e);
            }
        };
        let Some(permit) = self.slot() else {
            let mut resp = crate::error::json_error(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "too_many_connections",
                "cbgate has its maximum of open connections (max_connections) and a tunnel needs one of its own; retry later",
            );
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            return resp;
        };
        let now = Instant::now();
        let deadline = if now < first_deadline {
            first_deadline
        } else {
            now + self.opts.header_read_timeout
        };
        tracing::debug!(
            host,
            "CONNECT accepted: terminating TLS for an upstream host"
        );
        let host: Arc<str> = Arc::from(host);
        let (parts, body) = req.into_parts();
        let req = Request::from_parts(parts, body);
        let start = TunnelStart {
            req,
            host,
            who,
            acceptor,
            permit,
            deadline,
        };
        if self.tunnels.try_send(start).is_err() {
            return crate::error::json_error(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "too_many_connections",
                "cbgate is setting up too many tunnels at once or shutting down; retry later",
            );
        }
        let mut resp = Response::new(Body::default());
        *resp.status_mut() = http::StatusCode::OK;
        resp
    }

    /// Serves an accepted CONNECT: waits for the upgrade, terminates TLS with the host's leaf
    /// and serves the requests inside as coming through the tunnel, with the same timers.
    async fn serve_tunnel(self: Arc<Self>, t: TunnelStart) {
        let TunnelStart {
            req,
            host,
            who,
            acceptor,
            permit,
            deadline,
        } = t;
        let upgraded = match tokio::time::timeout_at(deadline, hyper::upgrade::on(req)).await {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "CONNECT tunnel not upgraded");
                return;
            }
            Err(_) => return self.handshake_timeout(),
        };
        match tokio::time::timeout_at(deadline, acceptor.accept(TokioIo::new(upgraded))).await {
            Ok(Ok(tls)) => {
                self.serve_conn(
                    SmuggleGuard::new(tls),
                    permit,
                    deadline,
                    None,
                    Some((host, who)),
                )
                .await
            }
            Ok(Err(e)) => {
                tracing::info!(host = %host, error = %e, "TLS handshake inside a CONNECT tunnel failed (does the client trust `cbgate ca`?)");
            }
            Err(_) => self.handshake_timeout(),
        }
    }

    /// Serves one connection. `deadline`: its first request must have arrived by then.
    /// `peer`: the Unix peer's credentials. `tunnel`: the host of the intercepted CONNECT this
    /// connection is inside, and the client identity recognised at that CONNECT.
    async fn serve_conn<I>(
        self: Arc<Self>,
        io: I,
        permit: OwnedSemaphorePermit,
        deadline: Instant,
        peer: Option<Peer>,
        tunnel: Option<(Arc<str>, Recognised)>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let open = self.proxy.metrics().client_connection();
        let mut stop = self.stop.subscribe();
        let activity = Arc::new(Activity::default());
        let svc = {
            let server = Arc::clone(&self);
            let activity = Arc::clone(&activity);
            service_fn(move |mut req: Request<Incoming>| {
                let in_flight = activity.begin();
                // Every request of the connection carries its peer, for the identity phase.
                if let Some(p) = peer {
                    req.extensions_mut().insert(p);
                }
                let intercept = server.role == Role::Proxy
                    && server.proxy.intercepts()
                    && tunnel.is_none()
                    && req.method() == http::Method::CONNECT;
                let resp = if intercept {
                    futures_util::future::Either::Left(std::future::ready(
                        server.connect(req, deadline),
                    ))
                } else {
                    if let Some((host, who)) = &tunnel {
                        req.extensions_mut().insert(crate::gate::route::Tunnel {
                            host: Arc::clone(host),
                        });
                        req.extensions_mut().insert(who.clone());
                    }
                    futures_util::future::Either::Right((server.handler)(req))
                };
                async move {
                    // The request counts as in flight until its response body is dropped.
                    Ok::<_, Infallible>(resp.await.map(|body| Tracked {
                        inner: body,
                        _in_flight: in_flight,
                    }))
                }
            })
        };
        let io = WriteTimeout {
            io,
            timeout: self.opts.write_timeout,
            stalled: None,
            fired: self.write_timeouts.clone(),
            role: self.role,
        };
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc);
        tokio::pin!(conn);
        let sleep = tokio::time::sleep_until(deadline);
        tokio::pin!(sleep);
        let mut first = true;
        let mut closing = false;
        // Our timer and hyper's own HTTP/1 header timer can both end a connection that sends
        // no head: count the timeout once.
        let mut counted = false;
        let result = loop {
            let busy = activity.busy();
            tokio::select! {
                biased;
                r = conn.as_mut() => break r,
                () = activity.changed.notified() => {
                    // A request started or the last one ended.
                    first = false;
                    if !activity.busy() {
                        let wait = if closing { CLOSE_GRACE } else { self.opts.idle_timeout };
                        sleep.as_mut().reset(Instant::now() + wait);
                    }
                }
                _ = stop.changed(), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                    if !activity.busy() {
                        sleep.as_mut().reset(Instant::now() + CLOSE_GRACE);
                    }
                }
                () = sleep.as_mut(), if !busy => {
                    if closing {
                        // The peer did not let the connection end: drop it.
                        break Ok(());
                    }
                    let (kind, counter, limit) = if first {
                        ("header", &self.header_timeouts, self.opts.header_read_timeout)
                    } else {
                        ("idle", &self.idle_timeouts, self.opts.idle_timeout)
                    };
                    counter.inc();
                    counted = true;
                    tracing::info!(
                        listener = self.role.label(),
                        kind,
                        after_ms = limit.as_millis() as u64,
                        "closing a client connection: timeout"
                    );
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                    sleep.as_mut().reset(Instant::now() + CLOSE_GRACE);
                }
            }
        };
        if let Err(e) = result {
            if is_timeout(&e) && !counted {
                // hyper's HTTP/1 header_read_timeout, on a later request head.
                self.header_timeouts.inc();
                tracing::info!(
                    listener = self.role.label(),
                    kind = "header",
                    "closing a client connection: timeout"
                );
            } else {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        }
        drop(permit);
        drop(open);
    }
}

/// Whether hyper ended a connection for its header read timeout.
fn is_timeout(e: &BoxError) -> bool {
    e.downcast_ref::<hyper::Error>()
        .is_some_and(hyper::Error::is_timeout)
}

/// Requests in flight on one connection; the connection task is told when the count changes.
#[derive(Debug, Default)]
struct Activity {
    count: AtomicUsize,
    changed: Notify,
}

impl Activity {
    fn begin(self: &Arc<Self>) -> InFlight {
        self.count.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
        InFlight(Arc::clone(self))
    }

    fn busy(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }
}

/// One request in flight; dropped with its response body.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_one();
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until it is dropped.
    struct Tracked {
        #[pin]
        inner: Body,
        _in_flight: InFlight,
    }
}

impl HttpBody for Tracked {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client connection whose writes fail once the client has read nothing for `timeout`. A
/// client that stops reading would otherwise hold its slot, and the upstream response, for
/// ever: while the socket is full hyper stops polling the response body, so the body's own
/// timeout never runs.
struct WriteTimeout<I> {
    io: I,
    timeout: Duration,
    /// Armed while a write is pending.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    fired: Counter,
    role: Role,
}

impl<I> WriteTimeout<I> {
    /// Called when the socket cannot take more: pending until `timeout` has passed since the
    /// first refused write, then the error that ends the connection.
    fn poll_stall<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        std::task::ready!(sleep.as_mut().poll(cx));
        self.stalled = None;
        self.fired.inc();
        tracing::warn!(
            listener = self.role.label(),
            kind = "client_write",
            after_ms = timeout.as_millis() as u64,
            "closing a client connection: the client read nothing for body_timeout"
        );
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client read nothing for body_timeout",
        )))
    }

    fn progress<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.poll_stall(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteTimeout<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.progress(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.progress(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.progress(r, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The smuggling guard's lingering close has its own, shorter, bound.
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

async fn accept_loop(
    listener: Listener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    tx: mpsc::Sender<Accepted>,
    role: Role,
) {
    loop {
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
            Listener::Tls(l) => match &acceptor {
                Some(a) => l.accept().await.map(|(s, _)| Accepted::Tls(s, a.clone())),
                None => return,
            },
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
                // Out of file descriptors (EMFILE, ENFILE) and the like: the pending connection
                // stays queued, so back off briefly rather than spin on it, and keep serving.
                tracing::warn!(listener = role.label(), error = %e, "accept failed; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn refuse<I: AsyncRead + AsyncWrite + Unpin>(mut io: I) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = r#"{"error":"too_many_connections","message":"cbgate has its maximum of open connections on this port (max_connections, admin_max_connections); retry later"}"#;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt as _;

    fn mode_of(p: &std::path::Path) -> u32 {
        std::fs::symlink_metadata(p)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777
    }

    #[tokio::test]
    async fn a_unix_socket_replaces_a_symlink_at_its_path_and_never_follows_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"not cbgate's").expect("write");
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let sock = dir.path().join("cbgate.sock");
        std::os::unix::fs::symlink(&victim, &sock).expect("symlink");
        let addr = ListenAddr::Unix(sock.clone());

        let listener = Listener::bind_mode(&addr, 0o660).await.expect("bind");
        let meta = std::fs::symlink_metadata(&sock).expect("stat");
        assert!(
            meta.file_type().is_socket(),
            "the symlink was replaced by the socket"
        );
        assert_eq!(mode_of(&sock), 0o660);
        // The link's target is untouched: neither chmodded nor overwritten.
        assert_eq!(mode_of(&victim), 0o600);
        assert_eq!(std::fs::read(&victim).expect("read"), b"not cbgate's");
        assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());
        // No temporary directory is left next to it.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        // A live socket is another instance's; a stale one is replaced; a file is refused.
        let Err(e) = Listener::bind_mode(&addr, 0o600).await else {
            panic!("in use: bound")
        };
        assert_eq!(e.cause.kind(), io::ErrorKind::AddrInUse);
        drop(listener);
        let again = Listener::bind_mode(&addr, 0o600)
            .await
            .expect("stale socket replaced");
        assert_eq!(mode_of(&sock), 0o600);
        drop(again);
        let file = ListenAddr::Unix(victim.clone());
        let Err(e) = Listener::bind_mode(&file, 0o600).await else {
            panic!("a file: bound")
        };
        assert_eq!(e.cause.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&victim).expect("read"), b"not cbgate's");
    }
}
