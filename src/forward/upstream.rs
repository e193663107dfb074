//! The upstream client: verified TLS to Coinbase with pooled keep-alive connections.
//!
//! rustls with the Mozilla roots compiled in (plus `upstream.ca_file`), TLS 1.2+, hostname
//! verification, ALPN `h2` then `http/1.1`. There is deliberately no switch that turns
//! verification off. `upstream.resolve` changes only where the TCP connection goes: SNI, the
//! certificate check, `Host` and the JWT keep the real name.
//!
//! Fan-out is bounded three ways: `upstream.max_in_flight` requests at once ([`InFlightPermit`],
//! taken before signing and held until the response body ends), `max_connections_per_host`
//! open connections (a per-host semaphore whose permit lives inside each connection, so it
//! counts idle pooled connections too and frees only when hyper drops the socket), and
//! `pool_max_idle_per_host` idle ones (in the per-core model, each worker's pool its share of
//! the per-host slots: see `Config::pool_max_idle`).

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{UpstreamConfig, UpstreamProtocol};
use crate::Body;

/// Setting up the upstream client failed (bad `upstream.ca_file`).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("upstream.ca_file {path} {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// What part of reaching the upstream failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectStage {
    Dns,
    Connect,
    Tls,
    Timeout,
}

/// Reaching the upstream failed before any HTTP was exchanged.
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
pub struct ConnectError {
    pub host: String,
    pub stage: ConnectStage,
    pub detail: String,
}

/// A forwarded request failed. Each variant maps to one cbgate error code.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Connect(ConnectError),
    #[error("no response from {host} within {after:?}")]
    Timeout { host: String, after: Duration },
    #[error("request to {host} failed: {detail}")]
    Other { host: String, detail: String },
    /// The server closed the stream without processing it (GOAWAY above its last-stream-id,
    /// or REFUSED_STREAM: RFC 9113 sections 6.8 and 8.7); safe to send again, whatever the method.
    #[error("{host} closed the connection before processing the request: {detail}")]
    Unprocessed { host: String, detail: String },
    /// `upstream.max_in_flight` requests were in flight for all of `upstream.queue_timeout`.
    #[error("cbgate has upstream.max_in_flight ({max_in_flight}) requests in flight to Coinbase and none finished within upstream.queue_timeout ({waited:?}); retry later or raise upstream.max_in_flight")]
    Busy {
        max_in_flight: usize,
        waited: Duration,
    },
}

impl UpstreamError {
    /// The `kind` label of `cbgate_upstream_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Other { .. } => "other",
            UpstreamError::Unprocessed { .. } => "unprocessed",
            UpstreamError::Busy { .. } => "busy",
            UpstreamError::Connect(c) => match c.stage {
                ConnectStage::Dns => "dns",
                ConnectStage::Connect => "connect",
                ConnectStage::Tls => "tls",
                ConnectStage::Timeout => "timeout",
            },
        }
    }
}

/// What [`UpstreamClient::call`] sends.
#[derive(Debug)]
pub struct OwnCall<'a> {
    pub method: http::Method,
    /// Host name for DNS, SNI and the certificate check.
    pub host: &'a str,
    /// `host[:port]` for the URI.
    pub authority: &'a str,
    /// Path and query.
    pub path: &'a str,
    /// A bearer token, or `None` for a public endpoint.
    pub token: Option<&'a str>,
    /// A JSON body.
    pub body: Option<Bytes>,
}

/// Worker threads that get a pool of their own at most (`runtime.threads` at most).
const MAX_WORKER_POOLS: usize = crate::config::MAX_THREADS;

thread_local! {
    /// The per-core worker this thread is (see [`enter_worker`]), if any.
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks the calling thread as per-core worker `index`: upstream requests made on it use that
/// worker's own connection pool, so a pooled connection is driven by the thread that sends on
/// it (no wake-up of another thread per request). Connection and in-flight limits stay
/// shared by all workers.
pub fn enter_worker(index: usize) {
    WORKER.with(|w| w.set(Some(index)));
}

/// The pooled, verifying HTTPS client.
#[derive(Clone)]
pub struct UpstreamClient {
    /// The pool of threads that are no worker (the shared runtime, cbgate's own calls).
    client: Client<Connector, Body>,
    /// One pool per per-core worker, made on its first request.
    workers: Arc<[OnceLock<Client<Connector, Body>>]>,
    connector: Connector,
    pool_idle_timeout: Duration,
    /// Idle connections per host each worker's pool keeps.
    max_idle: usize,
    /// Same roots, resolve map and timeouts, ALPN `http/1.1` only (for WebSocket upgrades).
    http1_connector: Connector,
    request_timeout: Duration,
    in_flight: InFlight,
}

/// The `upstream.max_in_flight` slots: a request reserves one before it is signed.
#[derive(Clone, Debug)]
struct InFlight {
    slots: Arc<Semaphore>,
    max: usize,
    queue_timeout: Duration,
}

/// One reserved upstream slot. Move it into the response with [`InFlightPermit::hold`] so a
/// streaming response keeps its slot until its body ends.
#[derive(Debug)]
pub struct InFlightPermit {
    // Released on drop; never read.
    _slot: OwnedSemaphorePermit,
}

impl fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamClient").finish_non_exhaustive()
    }
}

/// The rustls client configuration: Mozilla roots + `ca_file`, TLS 1.2+, ALPN h2 and http/1.1.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, SetupError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let ca_err = |reason: String| SetupError::CaFile {
            path: path.to_owned(),
            reason,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| ca_err(pem_error(&e)))?
            .collect::<Result<_, _>>()
            .map_err(|e| ca_err(pem_error(&e)))?;
        if certs.is_empty() {
            return Err(ca_err(
                "holds no PEM certificate (a private key or other PEM block is not a CA \
                 certificate; give the CA's -----BEGIN CERTIFICATE----- file)"
                    .into(),
            ));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| ca_err(format!("holds a certificate that cannot be used: {e}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) if io.kind() == io::ErrorKind::NotFound => {
            "does not exist".into()
        }
        rustls::pki_types::pem::Error::Io(io) => format!("cannot be read: {}", io.kind()),
        _ => "is not a PEM file (bad base64 or a missing END line)".into(),
    }
}

impl UpstreamClient {
    /// Builds the client from `[upstream]`.
    /// `(worker_idle, own_idle)`: idle connections per host each worker's pool and the pool
    /// of every other thread keep (see [`crate::config::Config::pool_max_idle`]).
    pub fn new(
        cfg: &UpstreamConfig,
        (worker_idle, own_idle): (usize, usize),
    ) -> Result<UpstreamClient, SetupError> {
        let tls = tls_config(cfg.ca_file.as_deref())?;
        // WebSocket upgrades are HTTP/1.1 only: offering h2 there would let ALPN pick a
        // protocol that cannot upgrade.
        let mut tls_http1 = tls.clone();
        tls_http1.alpn_protocols = vec![b"http/1.1".to_vec()];
        let resolve = Arc::new(cfg.resolve.clone());
        let tls_http1 = TlsConnector::from(Arc::new(tls_http1));
        let connector = Connector {
            tls: TlsConnector::from(Arc::new(tls)),
            tls_http1: tls_http1.clone(),
            protocol: cfg.protocol,
            host_protocol: Arc::new(cfg.host_protocol.clone()),
            resolve: Arc::clone(&resolve),
            connect_timeout: cfg.connect_timeout,
            // Waiting for a connection slot is bounded like the request it serves.
            slots: Some(Arc::new(HostSlots {
                per_host: cfg.max_connections_per_host,
                wait: cfg.request_timeout,
                hosts: Mutex::new(HashMap::new()),
            })),
        };
        // WebSocket connections are not pooled and have their own cap (`ws.max_sessions`).
        let http1_connector = Connector {
            tls: tls_http1.clone(),
            tls_http1,
            protocol: UpstreamProtocol::Http1,
            host_protocol: Arc::new(BTreeMap::new()),
            resolve,
            connect_timeout: cfg.connect_timeout,
            slots: None,
        };
        let client = pool(connector.clone(), cfg.pool_idle_timeout, own_idle);
        Ok(UpstreamClient {
            client,
            workers: (0..MAX_WORKER_POOLS).map(|_| OnceLock::new()).collect(),
            connector,
            pool_idle_timeout: cfg.pool_idle_timeout,
            max_idle: worker_idle,
            http1_connector,
            request_timeout: cfg.request_timeout,
            in_flight: InFlight {
                slots: Arc::new(Semaphore::new(cfg.max_in_flight)),
                max: cfg.max_in_flight,
                queue_timeout: cfg.queue_timeout,
            },
        })
    }

    /// The pool for the calling thread: its worker's own, or the shared one.
    fn pool(&self) -> &Client<Connector, Body> {
        match WORKER.with(Cell::get).and_then(|i| self.workers.get(i)) {
            Some(slot) => slot.get_or_init(|| {
                pool(
                    self.connector.clone(),
                    self.pool_idle_timeout,
                    self.max_idle,
                )
            }),
            None => &self.client,
        }
    }

    /// `upstream.max_in_flight`.
    pub fn max_in_flight(&self) -> usize {
        self.in_flight.max
    }

    /// Reserves one of the `max_in_flight` slots, waiting up to `upstream.queue_timeout`.
    pub async fn reserve(&self) -> Result<InFlightPermit, UpstreamError> {
        let slots = Arc::clone(&self.in_flight.slots);
        match tokio::time::timeout(self.in_flight.queue_timeout, slots.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(InFlightPermit { _slot: permit }),
            // The semaphore is never closed; a closed one would mean no slot either.
            Ok(Err(_)) | Err(_) => Err(UpstreamError::Busy {
                max_in_flight: self.in_flight.max,
                waited: self.in_flight.queue_timeout,
            }),
        }
    }

    /// Opens a new verified TLS connection to `host:port` that speaks HTTP/1.1 (for a WebSocket
    /// upgrade), within the connect timeout. Not pooled.
    pub async fn connect_http1(
        &self,
        host: &str,
        port: u16,
    ) -> Result<TlsStream<TcpStream>, ConnectError> {
        self.http1_connector
            .connect_within_timeout(host, port)
            .await
            .map(|conn| conn.io.into_inner())
    }

    /// The time allowed from sending a request to its response head (`upstream.request_timeout`).
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// One request cbgate makes on its own behalf (clock check, product price, key
    /// permissions, cancel-open), not a client's: `METHOD https://<authority><path>` with an
    /// optional bearer token (marked sensitive) and JSON body, answered with its status,
    /// headers and at most `max_answer` bytes of body. Errors are sentences.
    pub async fn call(
        &self,
        call: OwnCall<'_>,
        max_answer: usize,
    ) -> Result<(http::StatusCode, http::HeaderMap, Bytes), String> {
        use http_body_util::{BodyExt as _, Full, Limited};
        let uri: Uri = format!("https://{}{}", call.authority, call.path)
            .parse()
            .map_err(|e| format!("bad URI: {e}"))?;
        let mut req = Request::builder().method(call.method).uri(uri);
        if let Some(token) = call.token {
            let mut auth = http::HeaderValue::try_from(format!("Bearer {token}"))
                .map_err(|_| "the token is not a valid header value".to_owned())?;
            auth.set_sensitive(true);
            req = req.header(http::header::AUTHORIZATION, auth);
        }
        if call.body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(
                Full::new(call.body.unwrap_or_default())
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .map_err(|e| e.to_string())?;
        let resp = self.send(call.host, req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let bytes = Limited::new(body, max_answer)
            .collect()
            .await
            .map_err(|e| format!("reading the answer failed: {e}"))?
            .to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }

    /// Sends `req` (absolute URI) and waits for the response head, up to the request timeout.
    pub async fn send(
        &self,
        host: &str,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.send_until(
            host,
            req,
            tokio::time::Instant::now() + self.request_timeout,
        )
        .await
    }

    /// Like [`UpstreamClient::send`], with the response head due by `deadline` (a resend
    /// shares the first attempt's request timeout).
    pub async fn send_until(
        &self,
        host: &str,
        req: Request<Body>,
        deadline: tokio::time::Instant,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match tokio::time::timeout_at(deadline, self.pool().request(req)).await {
            Err(_) => Err(UpstreamError::Timeout {
                host: host.to_owned(),
                after: self.request_timeout,
            }),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(host, &e)),
        }
    }
}

/// A connection pool over `connector`; pools made from clones of one connector share its
/// `max_connections_per_host` slots.
fn pool(connector: Connector, idle_timeout: Duration, max_idle: usize) -> Client<Connector, Body> {
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle_timeout)
        .pool_max_idle_per_host(max_idle)
        .build(connector)
}

/// Finds the cause of a client error in its source chain.
fn classify(host: &str, e: &hyper_util::client::legacy::Error) -> UpstreamError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut innermost = e.to_string();
    let mut unprocessed = false;
    while let Some(s) = source {
        if let Some(c) = s.downcast_ref::<ConnectError>() {
            return UpstreamError::Connect(ConnectError {
                host: c.host.clone(),
                stage: c.stage,
                detail: c.detail.clone(),
            });
        }
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            unprocessed = never_processed(h2);
        }
        innermost = s.to_string();
        source = s.source();
    }
    let host = host.to_owned();
    if unprocessed {
        UpstreamError::Unprocessed {
            host,
            detail: innermost,
        }
    } else {
        UpstreamError::Other {
            host,
            detail: innermost,
        }
    }
}

/// Whether the server says it did not process the stream, so it may be sent again.
///
/// - `RST_STREAM(REFUSED_STREAM)` from the server: "closed prior to any processing"
///   (RFC 9113 section 8.7).
/// - A GOAWAY from the server with `NO_ERROR`: h2 hands that error only to streams above the
///   GOAWAY's last-stream-id (and to streams opened after it), which the server promises it
///   did not and will not process (section 6.8). Streams at or below it complete, or fail with
///   a broken pipe, which is not resent.
///
/// A GOAWAY with an error code is not trusted: h2 then fails every open stream with it,
/// including those the server may have processed. hyper's `is_canceled()` alone is not
/// trusted either: it is also reported when a connection task dies after sending.
fn never_processed(e: &h2::Error) -> bool {
    if !e.is_remote() {
        return false;
    }
    (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM))
        || (e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR))
}

impl InFlightPermit {
    /// Wraps a response body so this slot stays taken until the body ends, fails, or is
    /// dropped (the client went away).
    pub fn hold(self, body: crate::Body) -> crate::Body {
        http_body_util::BodyExt::boxed_unsync(HeldBody {
            inner: body,
            permit: Some(self),
        })
    }
}

pin_project_lite::pin_project! {
    struct HeldBody {
        #[pin]
        inner: crate::Body,
        permit: Option<InFlightPermit>,
    }
}

impl hyper::body::Body for HeldBody {
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            this.permit.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The `max_connections_per_host` semaphores, one per `host:port` (the routes name few hosts).
struct HostSlots {
    per_host: usize,
    /// How long a new connection may wait for a slot.
    wait: Duration,
    hosts: Mutex<HashMap<(String, u16), Arc<Semaphore>>>,
}

impl HostSlots {
    async fn acquire(&self, host: &str, port: u16) -> Result<OwnedSemaphorePermit, ConnectError> {
        let sem = {
            // A poisoned lock only means another thread panicked mid-insert; the map is intact.
            let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(
                hosts
                    .entry((host.to_owned(), port))
                    .or_insert_with(|| Arc::new(Semaphore::new(self.per_host))),
            )
        };
        match tokio::time::timeout(self.wait, sem.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) | Err(_) => Err(ConnectError {
                host: host.to_owned(),
                stage: ConnectStage::Timeout,
                detail: format!(
                    "all upstream.max_connections_per_host ({}) connections to {host} stayed busy for {:?}",
                    self.per_host, self.wait
                ),
            }),
        }
    }
}

/// Opens TCP (honouring `upstream.resolve`) then TLS, within the connect timeout.
#[derive(Clone)]
pub struct Connector {
    /// ALPN h2 and http/1.1.
    tls: TlsConnector,
    /// ALPN http/1.1 only.
    tls_http1: TlsConnector,
    /// `upstream.protocol` and its per-host exceptions (`upstream.host_protocol`).
    protocol: UpstreamProtocol,
    host_protocol: Arc<BTreeMap<String, UpstreamProtocol>>,
    resolve: Arc<BTreeMap<String, SocketAddr>>,
    connect_timeout: Duration,
    /// `None` for connections outside the pool (WebSocket).
    slots: Option<Arc<HostSlots>>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TlsConn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsConn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().to_owned();
            let port = uri.port_u16().unwrap_or(443);
            // Reserve, then connect: the slot is taken before the socket exists and lives
            // in the connection, so it is released only when hyper drops the socket.
            let slot = match &this.slots {
                Some(slots) => Some(slots.acquire(&host, port).await?),
                None => None,
            };
            let mut conn = this.connect_within_timeout(&host, port).await?;
            conn.slot = slot;
            Ok(conn)
        })
    }
}

impl Connector {
    async fn connect_within_timeout(&self, host: &str, port: u16) -> Result<TlsConn, ConnectError> {
        match tokio::time::timeout(self.connect_timeout, self.connect(host, port)).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError {
                host: host.to_owned(),
                stage: ConnectStage::Timeout,
                detail: format!(
                    "connecting to {host} timed out after {:?}",
                    self.connect_timeout
                ),
            }),
        }
    }

    async fn connect(&self, host: &str, port: u16) -> Result<TlsConn, ConnectError> {
        let err = |stage, detail: String| ConnectError {
            host: host.to_owned(),
            stage,
            detail,
        };
        let addrs: Vec<SocketAddr> = match self.resolve.get(host) {
            Some(addr) => vec![*addr],
            None => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| {
                    err(
                        ConnectStage::Dns,
                        format!("DNS lookup of {host} failed: {e}"),
                    )
                })?
                .collect(),
        };
        let mut last = None;
        let mut tcp = None;
        for addr in &addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some((addr, e)),
            }
        }
        let tcp = match (tcp, last) {
            (Some(s), _) => s,
            (None, Some((addr, e))) => {
                return Err(err(
                    ConnectStage::Connect,
                    format!("cannot connect to {host} ({addr}): {e}"),
                ))
            }
            (None, None) => {
                return Err(err(
                    ConnectStage::Dns,
                    format!("DNS lookup of {host} returned no address"),
                ))
            }
        };
        // Requests are small and latency-bound: do not wait to coalesce segments.
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(host.trim_matches(|c| c == '[' || c == ']').to_owned())
            .map_err(|_| {
                err(
                    ConnectStage::Tls,
                    format!("{host} is not a valid TLS server name"),
                )
            })?;
        let protocol = self
            .host_protocol
            .get(host)
            .copied()
            .unwrap_or(self.protocol);
        let connector = match protocol {
            UpstreamProtocol::Auto => &self.tls,
            UpstreamProtocol::Http1 => &self.tls_http1,
        };
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| err(ConnectStage::Tls, describe_tls_error(host, &e)))?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok(TlsConn {
            io: TokioIo::new(tls),
            h2,
            slot: None,
        })
    }
}

/// Words a TLS handshake failure the way a user searching for it would.
fn describe_tls_error(host: &str, e: &io::Error) -> String {
    use rustls::CertificateError as C;
    let what = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            C::UnknownIssuer => {
                "certificate not trusted (unknown issuer); if this upstream is intended, add its CA with upstream.ca_file".to_owned()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                format!("certificate is not valid for the name {host}")
            }
            C::Expired | C::ExpiredContext { .. } => "certificate has expired".to_owned(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "certificate is not valid yet (check the system clock)".to_owned()
            }
            C::Revoked => "certificate has been revoked".to_owned(),
            other => certificate_sentence(other),
        },
        // rustls words several reasons as enum variant names ("received fatal alert:
        // HandshakeFailure"): turn those into words.
        Some(other) => humanize(&other.to_string()),
        None if e.kind() == io::ErrorKind::UnexpectedEof => {
            "connection closed during the TLS handshake (is this a TLS port?)".to_owned()
        }
        None => e.to_string(),
    };
    format!("TLS handshake with {host} failed: {what}")
}

/// A certificate problem rustls only words as a Rust variant name, as a phrase.
fn certificate_sentence(c: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    // webpki's reasons arrive wrapped as `Other(OtherError(Name))`; the name is all there is.
    let debug = format!("{c:?}");
    let name = debug
        .trim_end_matches(')')
        .rsplit('(')
        .next()
        .unwrap_or_default()
        .to_owned();
    match (c, name.as_str()) {
        (_, "CaUsedAsEndEntity") => {
            "certificate rejected: the server presented a CA certificate as its own; \
             it must present a server certificate issued by that CA"
                .to_owned()
        }
        (_, "EndEntityUsedAsCa") => {
            "certificate rejected: a server certificate is used as a CA in the chain".to_owned()
        }
        (C::BadEncoding, _) => "certificate rejected: it is not valid DER".to_owned(),
        (C::BadSignature, _) => "certificate rejected: its signature does not verify".to_owned(),
        (C::InvalidPurpose | C::InvalidPurposeContext { .. }, _) => {
            "certificate rejected: it is not meant for a TLS server".to_owned()
        }
        _ => format!("certificate rejected ({})", words(&name)),
    }
}

/// Rewrites each `CamelCase` or `Wrapper(CamelCase)` word of a message as plain words.
fn humanize(message: &str) -> String {
    message
        .split(' ')
        .map(|w| {
            let core = w.trim_end_matches([')', ',', '.']);
            let inner = core.rsplit('(').next().unwrap_or(core);
            let camel = inner.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                && inner.chars().skip(1).any(|c| c.is_ascii_uppercase())
                && inner.chars().any(|c| c.is_ascii_lowercase())
                && inner.chars().all(|c| c.is_ascii_alphanumeric());
            if camel {
                words(inner)
            } else {
                w.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `CaUsedAsEndEntity` -> `ca used as end entity`.
fn words(camel: &str) -> String {
    let mut out = String::new();
    for ch in camel.chars().filter(|c| c.is_ascii_alphanumeric()) {
        if ch.is_ascii_uppercase() && !out.is_empty() {
            out.push(' ');
        }
        out.push(ch.to_ascii_lowercase());
    }
    if out.is_empty() {
        "reason unknown".to_owned()
    } else {
        out
    }
}

pin_project_lite::pin_project! {
    /// A TLS connection to the upstream, telling the pool whether ALPN chose h2.
    pub struct TlsConn {
        #[pin]
        io: TokioIo<TlsStream<TcpStream>>,
        h2: bool,
        // This connection's `max_connections_per_host` slot, freed with the socket.
        slot: Option<OwnedSemaphorePermit>,
    }
}

impl Connection for TlsConn {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl hyper::rt::Read for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_variant_names_become_words() {
        assert_eq!(
            humanize("received fatal alert: HandshakeFailure"),
            "received fatal alert: handshake failure"
        );
        assert_eq!(
            humanize("peer is incompatible: Tls12NotOffered"),
            "peer is incompatible: tls12 not offered"
        );
        assert_eq!(
            humanize("invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))"),
            "invalid peer certificate: ca used as end entity"
        );
        assert_eq!(
            humanize("connection closed (is this TLS?)"),
            "connection closed (is this TLS?)"
        );
    }
}
