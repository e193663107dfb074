//! Test-only mock of the Coinbase REST upstream.
//!
//! Serves TLS (ALPN `h2` and `http/1.1`) on 127.0.0.1 with a certificate from a
//! throw-away test CA, records every request, and verifies the per-request JWT
//! the way Coinbase does (see shared/coinbase-auth.md). Signature verification
//! uses the `jsonwebtoken` crate so it is independent of cbgate's own signer;
//! every other check (header fields, nonce, claims, clock) is done by hand.
//!
//! Every test binary that says `mod common;` compiles this file but uses only
//! part of it, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, DATE, HOST};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

// ---------------------------------------------------------------------------
// PKI
// ---------------------------------------------------------------------------

/// Test PKI made at test time: a CA and one server cert valid for all names given.
#[derive(Clone)]
pub struct Pki {
    /// PEM of the CA certificate (the only thing a client should trust).
    pub ca_pem: String,
    /// Server certificate chain, leaf first (leaf, CA).
    pub cert_chain_der: Vec<CertificateDer<'static>>,
    /// Server private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// The names the server certificate is valid for; the mock accepts exactly
    /// these as request hosts.
    pub hosts: Vec<String>,
}

impl Pki {
    pub fn new(hosts: &[&str]) -> Pki {
        let mut ca_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params (test setup)");
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cbgate test CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = rcgen::KeyPair::generate().expect("CA key (test setup)");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)
            .expect("self-sign CA (test setup)");

        let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let mut leaf_params =
            rcgen::CertificateParams::new(names.clone()).expect("leaf params (test setup)");
        leaf_params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        leaf_params.is_ca = rcgen::IsCa::ExplicitNoCa;
        leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = rcgen::KeyPair::generate().expect("leaf key (test setup)");
        let leaf = leaf_params
            .signed_by(&leaf_key, &ca)
            .expect("sign leaf (test setup)");

        Pki {
            ca_pem: ca.pem(),
            cert_chain_der: vec![leaf.der().clone(), ca.der().clone()],
            key_der: leaf_key.serialize_der(),
            hosts: names,
        }
    }

    /// Writes `ca.pem` into `dir` and returns its path.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.ca_pem).expect("write ca.pem (test setup)");
        path
    }

    /// rustls server config for the mock: aws-lc-rs provider, ALPN h2 + http/1.1.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions (test setup)")
            .with_no_client_auth()
            .with_single_cert(self.cert_chain_der.clone(), key)
            .expect("server cert (test setup)");
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(cfg)
    }

    /// rustls client config that trusts only this PKI's CA, offering `alpn`.
    pub fn client_config(&self, alpn: &[&[u8]]) -> rustls::ClientConfig {
        use rustls_pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        let ca = CertificateDer::from_pem_slice(self.ca_pem.as_bytes())
            .expect("parse CA pem (test setup)");
        roots.add(ca).expect("add CA root (test setup)");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions (test setup)")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        cfg
    }
}

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

/// What key the mock expects tokens to be signed with.
#[derive(Clone)]
pub enum ExpectedKey {
    /// `public_key`: uncompressed SEC1 point (65 bytes), as aws_lc_rs
    /// `EcdsaKeyPair::public_key().as_ref()`.
    Es256 { name: String, public_key: Vec<u8> },
    /// `public_key`: raw 32-byte Ed25519 public key.
    EdDsa { name: String, public_key: Vec<u8> },
}

impl ExpectedKey {
    pub fn name(&self) -> &str {
        match self {
            ExpectedKey::Es256 { name, .. } | ExpectedKey::EdDsa { name, .. } => name,
        }
    }

    fn alg_str(&self) -> &'static str {
        match self {
            ExpectedKey::Es256 { .. } => "ES256",
            ExpectedKey::EdDsa { .. } => "EdDSA",
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            ExpectedKey::Es256 { .. } => Algorithm::ES256,
            ExpectedKey::EdDsa { .. } => Algorithm::EdDSA,
        }
    }

    /// jsonwebtoken 11 hands the bytes of `from_ec_der` / `from_ed_der` straight
    /// to aws-lc-rs `UnparsedPublicKey`, which takes the raw SEC1 point for
    /// ECDSA and the raw 32 bytes for Ed25519.
    fn decoding_key(&self) -> DecodingKey {
        match self {
            ExpectedKey::Es256 { public_key, .. } => DecodingKey::from_ec_der(public_key),
            ExpectedKey::EdDsa { public_key, .. } => DecodingKey::from_ed_der(public_key),
        }
    }
}

#[derive(Clone, Default)]
pub struct MockOptions {
    pub key: Option<ExpectedKey>,
    /// Further keys accepted (chosen by the token's `kid`), as Coinbase accepts any live key of
    /// the account: lets key-rotation tests see which key signed.
    pub also_accept: Vec<ExpectedKey>,
    /// The mock's clock = real now + offset.
    pub clock_offset_secs: i64,
    /// Answer the trading endpoints the example clients call as Coinbase does (accounts list,
    /// order placement, batch cancel) instead of echoing; every other path still echoes.
    /// Off by default: other tests read the echo of `GET /api/v3/brokerage/accounts`.
    pub realistic: bool,
    /// Offer only `http/1.1` by ALPN (every concurrent request then needs its own connection).
    pub http1_only: bool,
    /// h2: refuse every n-th request with RST_STREAM(REFUSED_STREAM) before processing it (not
    /// recorded), as a server under load may (RFC 9113 section 8.7). A request is refused once:
    /// a resend with the same `x-request-id` is served.
    pub refuse_every: Option<usize>,
    /// HMAC keys the mock accepts on the Exchange, Prime and INTX hosts (see [`ExpectedHmac`]).
    pub hmac: Vec<ExpectedHmac>,
    /// `expires_in` of the derivatives gateway's access tokens (`drb.coinbase.com`); 0: 3600.
    pub gateway_token_secs: u64,
    /// Realistic mode: prices the public product endpoint
    /// (`GET /api/v3/brokerage/market/products/{id}`) answers; any other product is 404.
    pub prices: Vec<(String, String)>,
    /// The CDP Wallet Secret's public key (uncompressed SEC1 point, 65 bytes): CDP v2 wallet
    /// requests must then carry an `X-Wallet-Auth` that verifies against it (see
    /// [`verify_wallet_auth`]); without it `X-Wallet-Auth` is not checked.
    pub wallet_key: Option<Vec<u8>>,
    /// `GET /api/v3/brokerage/key_permissions` answers, by the JWT's kid (a CDP key is scoped
    /// to one portfolio, so each key has its own); a kid not listed gets the default answer.
    pub permissions: Vec<(String, Value)>,
}

/// An HMAC key (Exchange, Prime or INTX) the mock verifies requests against, written from
/// Coinbase's documentation of each family (shared/coinbase-auth.md), not from cbgate's code.
#[derive(Clone, Debug)]
pub struct ExpectedHmac {
    /// `exchange`, `prime` or `intx`.
    pub family: &'static str,
    pub key: String,
    /// The secret as the portal shows it (base64 for Exchange and INTX, text for Prime).
    pub secret: String,
    pub passphrase: String,
}

/// The HMAC family a host takes, if any.
pub fn hmac_family(host: &str) -> Option<&'static str> {
    match host {
        "api.exchange.coinbase.com" => Some("exchange"),
        "api.prime.coinbase.com" => Some("prime"),
        "api.international.coinbase.com" => Some("intx"),
        _ => None,
    }
}

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path_and_query: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub auth: AuthOutcome,
    /// The verified `X-Wallet-Auth` claims, or why it failed; `None` when not checked.
    pub wallet_auth: Option<Result<Value, String>>,
    /// When the mock received it (for rate measurements).
    pub at: std::time::Instant,
}

/// An order the realistic mock accepted: the id it issued and the request body it parsed.
#[derive(Clone, Debug)]
pub struct PlacedOrder {
    pub order_id: String,
    pub request: Value,
    /// Set once a batch cancel named this order.
    pub cancelled: bool,
    /// Seeded as already filled: never listed as open, never cancellable.
    pub filled: bool,
}

/// Open orders per page of `GET /orders/historical/batch` (small, so tests cross pages).
pub const OPEN_ORDERS_PAGE: usize = 7;

#[derive(Clone, Debug, PartialEq)]
pub enum AuthOutcome {
    Missing,
    Valid {
        alg: String,
        kid: String,
        nonce: String,
        claims: Value,
    },
    Invalid(String),
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

struct Inner {
    opts: MockOptions,
    /// Starts at `opts.clock_offset_secs`; tests may move the clock while the mock runs.
    clock_offset: std::sync::atomic::AtomicI64,
    hosts: Vec<String>,
    connections: AtomicUsize,
    /// Connections open now.
    open: AtomicUsize,
    /// Requests being handled now, and the most at once.
    active: AtomicUsize,
    peak: AtomicUsize,
    /// Requests seen, for `refuse_every`.
    seen: AtomicUsize,
    /// `/stall-body` responses whose reader went away (stream reset or connection closed).
    stalls_released: Arc<AtomicUsize>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    requests: Vec<Recorded>,
    nonces: HashSet<String>,
    /// `x-request-id`s refused once by `refuse_every`.
    refused: HashSet<String>,
    /// Orders placed through the realistic `POST /api/v3/brokerage/orders`, in order.
    orders: Vec<PlacedOrder>,
    /// Derivatives gateway tokens issued: token -> (key name, expiry in mock seconds).
    gateway_tokens: std::collections::HashMap<String, (String, i64)>,
    /// The key name of every successful `public/auth`, in order.
    gateway_auths: Vec<String>,
    /// Requests to the gateway refused for an unknown or expired token.
    gateway_refused: usize,
    /// Open gateway orders per key name (seeded), which `private/cancel_all` cancels.
    gateway_open: std::collections::HashMap<String, u64>,
    /// How `public/auth` answers from now on.
    gateway_auth_mode: GatewayAuthMode,
    /// Orders placed on the Exchange host (`POST /orders`) or seeded there.
    exchange_orders: Vec<PlacedOrder>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("mock state mutex poisoned")
    }

    fn now(&self) -> i64 {
        now_with_offset(self.clock_offset.load(Ordering::SeqCst))
    }
}

pub struct MockCoinbase {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

impl MockCoinbase {
    /// Binds 127.0.0.1:0 and serves TLS (h2 and http/1.1) until dropped.
    pub async fn start(pki: &Pki, opts: MockOptions) -> MockCoinbase {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind mock listener (test setup)");
        let addr = listener.local_addr().expect("mock local addr (test setup)");
        let acceptor = TlsAcceptor::from(pki.server_config());
        let inner = Arc::new(Inner {
            clock_offset: std::sync::atomic::AtomicI64::new(opts.clock_offset_secs),
            opts,
            hosts: pki.hosts.clone(),
            connections: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            seen: AtomicUsize::new(0),
            stalls_released: Arc::new(AtomicUsize::new(0)),
            state: Mutex::new(State::default()),
        });
        let acceptor = if inner.opts.http1_only {
            let mut cfg = (*pki.server_config()).clone();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            TlsAcceptor::from(Arc::new(cfg))
        } else {
            acceptor
        };
        let task = tokio::spawn(accept_loop(listener, acceptor, inner.clone()));
        MockCoinbase { addr, inner, task }
    }

    /// Moves the mock's clock: its time becomes real now + `secs`.
    pub fn set_clock_offset(&self, secs: i64) {
        self.inner.clock_offset.store(secs, Ordering::SeqCst);
    }

    /// Every request received, in order.
    /// The key names of the derivatives gateway's `public/auth` exchanges, in order.
    pub fn gateway_auths(&self) -> Vec<String> {
        self.inner.lock().gateway_auths.clone()
    }

    /// Gateway requests refused for an unknown, revoked or expired token.
    pub fn gateway_refused(&self) -> usize {
        self.inner.lock().gateway_refused
    }

    /// Every gateway token issued so far, as a client must never see them.
    pub fn gateway_tokens(&self) -> Vec<String> {
        self.inner.lock().gateway_tokens.keys().cloned().collect()
    }

    /// Seeds `n` open orders of key `kid` on the derivatives gateway.
    pub fn seed_gateway_orders(&self, kid: &str, n: u64) {
        *self
            .inner
            .lock()
            .gateway_open
            .entry(kid.to_owned())
            .or_default() += n;
    }

    /// Open gateway orders of key `kid` left.
    pub fn gateway_open(&self, kid: &str) -> u64 {
        self.inner
            .lock()
            .gateway_open
            .get(kid)
            .copied()
            .unwrap_or(0)
    }

    /// Sets how the derivatives gateway's `public/auth` answers from now on.
    pub fn set_gateway_auth(&self, mode: GatewayAuthMode) {
        self.inner.lock().gateway_auth_mode = mode;
    }

    /// Revokes every gateway token (as a server restart or a key change would).
    pub fn revoke_gateway_tokens(&self) {
        let mut st = self.inner.lock();
        let now = self.inner.now();
        for (_, exp) in st.gateway_tokens.values_mut() {
            *exp = now - 1;
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().requests.clone()
    }

    /// Number of TLS connections accepted (handshake completed).
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Number of TLS connections open now.
    pub fn open_connections(&self) -> usize {
        self.inner.open.load(Ordering::SeqCst)
    }

    /// The most requests the mock was handling at once.
    pub fn peak_concurrency(&self) -> usize {
        self.inner.peak.load(Ordering::SeqCst)
    }

    /// Requests refused by `refuse_every`.
    pub fn refused(&self) -> usize {
        self.inner.lock().refused.len()
    }

    /// Number of `/stall-body` responses cbgate stopped reading (stream reset or closed).
    pub fn stalls_released(&self) -> usize {
        self.inner.stalls_released.load(Ordering::SeqCst)
    }

    /// Number of distinct nonces seen on signature-valid tokens.
    pub fn nonces_seen(&self) -> usize {
        self.inner.lock().nonces.len()
    }

    /// Adds an order as if placed earlier (open, or already filled); returns its id.
    pub fn seed_order(&self, product: &str, filled: bool) -> String {
        let order_id = random_uuid();
        self.inner.lock().orders.push(PlacedOrder {
            order_id: order_id.clone(),
            request: json!({"product_id": product, "side": "BUY", "seeded": true}),
            cancelled: false,
            filled,
        });
        order_id
    }

    /// Adds an open (or filled) order on the Exchange host; returns its id.
    pub fn seed_exchange_order(&self, product: &str, filled: bool) -> String {
        let order_id = random_uuid();
        self.inner.lock().exchange_orders.push(PlacedOrder {
            order_id: order_id.clone(),
            request: json!({"product_id": product, "side": "buy", "seeded": true}),
            cancelled: false,
            filled,
        });
        order_id
    }

    /// Orders placed or seeded on the Exchange host, in order.
    pub fn exchange_orders(&self) -> Vec<PlacedOrder> {
        self.inner.lock().exchange_orders.clone()
    }

    /// Requests that reached the mock with this method and path (query ignored).
    pub fn requests_to(&self, method: &str, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == method && r.path_and_query.split('?').next() == Some(path))
            .collect()
    }

    /// Orders placed (realistic mode only), in order.
    pub fn orders(&self) -> Vec<PlacedOrder> {
        self.inner.lock().orders.clone()
    }
}

impl Drop for MockCoinbase {
    fn drop(&mut self) {
        // Dropping the accept loop drops its JoinSet, which aborts every
        // connection task too.
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, inner: Arc<Inner>) {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (tcp, _peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let inner = inner.clone();
        conns.spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            inner.connections.fetch_add(1, Ordering::SeqCst);
            inner.open.fetch_add(1, Ordering::SeqCst);
            let svc = {
                let inner = inner.clone();
                service_fn(move |req: Request<Incoming>| {
                    let inner = inner.clone();
                    async move {
                        if refuse(&inner, &req) {
                            // hyper answers a service error with RST_STREAM of its h2 reason.
                            return Err(h2::Error::from(h2::Reason::REFUSED_STREAM));
                        }
                        handle(inner, req).await.map_err(|never| match never {})
                    }
                })
            };
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                .await;
            inner.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

type RespBody = BoxBody<Bytes, Infallible>;

fn full(body: impl Into<Bytes>) -> RespBody {
    Full::new(body.into()).boxed()
}

fn json_response(status: StatusCode, v: &Value) -> Response<RespBody> {
    let mut resp = Response::new(full(v.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// 401 in both shapes: Advanced Trade's `error`/`message` and CDP's `errorType`/`errorMessage`
/// (the CDP SDKs show only `errorMessage`).
fn unauthorized(reason: &str) -> Response<RespBody> {
    json_response(
        StatusCode::UNAUTHORIZED,
        &json!({"error": "UNAUTHORIZED", "message": reason,
                "errorType": "unauthorized", "errorMessage": reason}),
    )
}

fn add_rate_limit_headers(resp: &mut Response<RespBody>) {
    let h = resp.headers_mut();
    // A handler that set its own (`/ratelimited/`) keeps them.
    if h.contains_key("x-ratelimit-remaining") {
        return;
    }
    h.insert(
        HeaderName::from_static("x-ratelimit-limit"),
        HeaderValue::from_static("30"),
    );
    h.insert(
        HeaderName::from_static("x-ratelimit-remaining"),
        HeaderValue::from_static("29"),
    );
    h.insert(
        HeaderName::from_static("x-ratelimit-reset"),
        HeaderValue::from_static("1700000000"),
    );
}

fn is_public(path: &str) -> bool {
    path.starts_with("/api/v3/brokerage/market/")
        || path == "/api/v3/brokerage/time"
        // Exchange's ticker and INTX's quote (public on their hosts).
        || (path.starts_with("/products/") && path.ends_with("/ticker"))
        || (path.starts_with("/api/v1/instruments/") && path.ends_with("/quote"))
}

/// URI authority (h2, or h1 absolute-form), else the Host header.
fn request_host(parts: &http::request::Parts) -> Option<String> {
    if let Some(a) = parts.uri.authority() {
        return Some(a.as_str().to_string());
    }
    parts
        .headers
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

/// Whether `refuse_every` refuses this request (h2 only, each `x-request-id` once).
fn refuse(inner: &Inner, req: &Request<Incoming>) -> bool {
    let Some(every) = inner.opts.refuse_every else {
        return false;
    };
    let n = inner.seen.fetch_add(1, Ordering::SeqCst) + 1;
    if req.version() != Version::HTTP_2 || !n.is_multiple_of(every) {
        return false;
    }
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    inner.lock().refused.insert(id)
}

/// Counts a request being handled, also when its future is dropped mid-way.
struct Active(Arc<Inner>);

impl Active {
    fn enter(inner: &Arc<Inner>) -> Active {
        let now = inner.active.fetch_add(1, Ordering::SeqCst) + 1;
        inner.peak.fetch_max(now, Ordering::SeqCst);
        Active(inner.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(
    inner: Arc<Inner>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let now = inner.now();
    let active = Active::enter(&inner);
    let mut resp = handle_inner(inner.clone(), req).await;
    drop(active);
    add_rate_limit_headers(&mut resp);
    // Every answer is dated by the mock's clock, as Coinbase's are by its own.
    if let Ok(v) = HeaderValue::from_str(&http_date(now)) {
        resp.headers_mut().insert(DATE, v);
    }
    Ok(resp)
}

async fn handle_inner(inner: Arc<Inner>, req: Request<Incoming>) -> Response<RespBody> {
    let (parts, body) = req.into_parts();
    let (body, body_err) = match body.collect().await {
        Ok(c) => (c.to_bytes(), None),
        Err(e) => (Bytes::new(), Some(e.to_string())),
    };
    let method = parts.method.as_str().to_string();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    let host = request_host(&parts);

    if host.as_deref() == Some("drb.coinbase.com") && path == "/api/v2/public/auth" {
        let mode = inner.lock().gateway_auth_mode;
        if mode == GatewayAuthMode::BadGateway {
            let mut resp = Response::new(full("<html>502 Bad Gateway</html>"));
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
            return resp;
        }
        if mode == GatewayAuthMode::Unavailable {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"jsonrpc": "2.0", "id": 1, "error": {"code": 10028, "message": "maintenance"}}),
            );
        }
        let outcome = if mode == GatewayAuthMode::Refuse {
            Err("this key has no access to derivatives".to_string())
        } else {
            gateway_auth(&inner, &body)
        };
        let (auth, resp) = match outcome {
            Ok((kid, claims, token, secs)) => (
                AuthOutcome::Valid {
                    alg: "gateway".into(),
                    kid,
                    nonce: String::new(),
                    claims,
                },
                json_response(
                    StatusCode::OK,
                    &json!({"jsonrpc": "2.0", "id": 1, "result": {
                        "access_token": token, "expires_in": secs, "refresh_token": "r",
                        "scope": "session:x", "token_type": "bearer"}}),
                ),
            ),
            Err(why) => (
                AuthOutcome::Invalid(why.clone()),
                json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"jsonrpc": "2.0", "id": 1, "error": {"code": 13004, "message": why}}),
                ),
            ),
        };
        inner.lock().requests.push(Recorded {
            method: method.clone(),
            path_and_query,
            version: parts.version,
            headers: parts.headers.clone(),
            body: body.clone(),
            auth,
            wallet_auth: None,
            at: std::time::Instant::now(),
        });
        return resp;
    }
    let auth = match host.as_deref().and_then(hmac_family) {
        None if host.as_deref() == Some("drb.coinbase.com") => {
            gateway_bearer(&inner, &parts.headers)
        }
        Some(family) => authenticate_hmac(
            &inner,
            family,
            &method,
            &path_and_query,
            &parts.headers,
            &body,
        ),
        None => authenticate(&inner, &method, host.as_deref(), &path, &parts.headers),
    };
    let wallet_auth = match &inner.opts.wallet_key {
        Some(k) if path.starts_with("/platform/") && cdp_wallet_request(&method, &path) => {
            let checked = verify_wallet_auth(
                k,
                &method,
                host.as_deref().unwrap_or(""),
                &path,
                &body,
                &parts.headers,
                inner.now(),
            )
            .await;
            // jti: never seen before, as a nonce.
            Some(checked.and_then(|claims| {
                let jti = claims["jti"].as_str().unwrap_or_default().to_owned();
                if inner.lock().nonces.insert(format!("jti:{jti}")) {
                    Ok(claims)
                } else {
                    Err("jti reused".into())
                }
            }))
        }
        _ => None,
    };
    inner.lock().requests.push(Recorded {
        method: method.clone(),
        path_and_query,
        version: parts.version,
        headers: parts.headers.clone(),
        body: body.clone(),
        auth: auth.clone(),
        wallet_auth: wallet_auth.clone(),
        at: std::time::Instant::now(),
    });

    if let Some(e) = body_err {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "BAD_REQUEST", "message": format!("reading body: {e}")}),
        );
    }
    match &auth {
        AuthOutcome::Invalid(reason) => return unauthorized(reason),
        AuthOutcome::Missing if !is_public(&path) => return unauthorized("missing Authorization"),
        _ => {}
    }
    if let Some(Err(reason)) = &wallet_auth {
        return unauthorized(&format!("X-Wallet-Auth: {reason}"));
    }
    // The gateway's cancel_all: answers how many of the token's key's orders it cancelled.
    if host.as_deref() == Some("drb.coinbase.com") && path == "/api/v2/private/cancel_all" {
        let who = match &auth {
            AuthOutcome::Valid { kid, .. } => kid.clone(),
            _ => String::new(),
        };
        let n = inner.lock().gateway_open.remove(&who).unwrap_or(0);
        return json_response(
            StatusCode::OK,
            &json!({"jsonrpc": "2.0", "id": 1, "result": n}),
        );
    }
    if inner.opts.realistic {
        if let Some(resp) = cdp_v2(&method, &path, &body) {
            return resp;
        }
    }

    if path == "/api/v3/brokerage/time" {
        let now = inner.now();
        let mut resp = json_response(
            StatusCode::OK,
            &json!({
                "iso": iso8601(now),
                "epochSeconds": now.to_string(),
                "epochMillis": (now * 1000).to_string(),
            }),
        );
        if let Ok(v) = HeaderValue::from_str(&http_date(now)) {
            resp.headers_mut().insert(DATE, v);
        }
        return resp;
    }

    if path == "/api/v3/brokerage/key_permissions" {
        let signer = match &auth {
            AuthOutcome::Valid { kid, .. } => Some(kid.as_str()),
            _ => None,
        };
        if let Some((_, answer)) = inner
            .opts
            .permissions
            .iter()
            .find(|(kid, _)| Some(kid.as_str()) == signer)
        {
            return json_response(StatusCode::OK, answer);
        }
        return json_response(
            StatusCode::OK,
            &json!({
                "can_view": true,
                "can_trade": true,
                "can_transfer": false,
                "portfolio_uuid": "8b5a5a1c-0000-4000-8000-000000000001",
                "portfolio_type": "DEFAULT",
            }),
        );
    }

    if inner.opts.realistic {
        let family = host.as_deref().and_then(hmac_family);
        if let Some(resp) = family.and_then(|f| hmac_trading(&inner, f, &method, &path, &body)) {
            return resp;
        }
        if family.is_none() {
            if let Some(resp) = trading(&inner, &method, &path, query.as_deref(), &body) {
                return resp;
            }
        }
    }

    if path.contains("/slow-stream") {
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        tokio::spawn(async move {
            for i in 0..3 {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
                if tx.send(Bytes::from(format!("chunk-{i}\n"))).await.is_err() {
                    return;
                }
            }
        });
        let mut resp = Response::new(ChannelBody::new(rx, None).boxed());
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return resp;
    }

    // Headers and a first chunk, then silence until the reader goes away.
    if path.contains("/stall-body") {
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let released = Arc::clone(&inner.stalls_released);
        tokio::spawn(async move {
            if tx.send(Bytes::from_static(b"first\n")).await.is_ok() {
                tx.closed().await;
            }
            released.fetch_add(1, Ordering::SeqCst);
        });
        let mut resp = Response::new(ChannelBody::new(rx, None).boxed());
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return resp;
    }

    // `/ratelimited/<secs>`: Coinbase's 429, asking the key to wait `secs`.
    if let Some(secs) = number_after(&path, "/ratelimited/") {
        let mut resp = json_response(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({"errors": [{"id": "rate_limit_exceeded", "message": "Too many requests"}]}),
        );
        let h = resp.headers_mut();
        h.insert("retry-after", HeaderValue::from(secs));
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
        h.insert(
            "x-ratelimit-reset",
            HeaderValue::from(inner.now() as u64 + secs),
        );
        return resp;
    }

    if path.contains("/hang") {
        tokio::time::sleep(Duration::from_secs(300)).await;
        return json_response(StatusCode::GATEWAY_TIMEOUT, &json!({"error": "hung"}));
    }

    if let Some(code) = number_after(&path, "/status/") {
        let Some(status) = u16::try_from(code)
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .filter(|s| !s.is_informational())
        else {
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": "BAD_REQUEST", "message": "bad status code"}),
            );
        };
        if matches!(status.as_u16(), 204 | 205 | 304) {
            let mut resp = Response::new(full(Bytes::new()));
            *resp.status_mut() = status;
            return resp;
        }
        return json_response(status, &json!({ "status": status.as_u16() }));
    }

    if let Some(n) = number_after(&path, "/big/") {
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        tokio::spawn(async move {
            const CHUNK: u64 = 64 * 1024;
            let mut i: u64 = 0;
            while i < n {
                let len = CHUNK.min(n - i);
                let chunk: Vec<u8> = (i..i + len).map(|j| (j % 251) as u8).collect();
                if tx.send(Bytes::from(chunk)).await.is_err() {
                    return;
                }
                i += len;
            }
        });
        let mut resp = Response::new(ChannelBody::new(rx, Some(n)).boxed());
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        return resp;
    }

    // `/sleep/<ms>`: a slow endpoint, then the echo.
    if let Some(ms) = number_after(&path, "/sleep/") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    // Echo.
    let mut headers = Map::new();
    for name in parts.headers.keys() {
        let values: Vec<Value> = if name == AUTHORIZATION {
            parts
                .headers
                .get_all(name)
                .iter()
                .map(|_| Value::from("<redacted>"))
                .collect()
        } else {
            parts
                .headers
                .get_all(name)
                .iter()
                .map(|v| Value::from(String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect()
        };
        headers.insert(name.as_str().to_string(), Value::Array(values));
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &body);
    json_response(
        StatusCode::OK,
        &json!({
            "method": method,
            "path": path,
            "query": query,
            "version": version_str(parts.version),
            "host": host,
            "headers": headers,
            "body_len": body.len(),
            "body_sha256": hex(digest.as_ref()),
        }),
    )
}

// ---------------------------------------------------------------------------
// CDP v2 (wallet API)
// ---------------------------------------------------------------------------

/// CDP's error body: `{"errorType", "errorMessage", "correlationId"}`.
fn cdp_error(status: StatusCode, kind: &str, message: &str) -> Response<RespBody> {
    json_response(
        status,
        &json!({"errorType": kind, "errorMessage": message, "correlationId": "mock"}),
    )
}

/// Which requests carry `X-Wallet-Auth`, written from the CDP API docs ("wallet-authenticated
/// endpoints": writes to accounts, spend permissions, user operations sent, end users and the
/// embedded wallet API), independently of cbgate's `sign::wallet` list.
fn cdp_wallet_request(method: &str, path: &str) -> bool {
    let write = matches!(method, "POST" | "PUT" | "DELETE");
    let segs: Vec<&str> = path.split('/').collect();
    let n = segs.len();
    write
        && (segs.contains(&"accounts")
            || segs.contains(&"spend-permissions")
            || path.contains("/user-operations/prepare-and-send")
            || segs.contains(&"embedded-wallet-api")
            || segs.last() == Some(&"end-users")
            || path.ends_with("/end-users/import")
            || (n >= 3
                && segs[n - 3] == "end-users"
                && matches!(segs[n - 1], "evm" | "evm-smart-account" | "solana"))
            || (segs
                .windows(4)
                .any(|w| w[0] == "smart-accounts" && w[2] == "lend")))
}

/// The `reqHash` a CDP SDK sends for `body`, as CPython computes it (the Python SDK's
/// `json.dumps(sorted, separators=(",", ":"), sort_keys=True)`), or `None` when the body is not
/// a non-empty JSON object. Run in a real `python3`, so it is not cbgate's code.
async fn python_req_hash(body: &[u8]) -> Result<Option<String>, String> {
    const SCRIPT: &str = "import sys, json, hashlib\n\
try:\n    d = json.loads(sys.stdin.buffer.read())\nexcept ValueError:\n    d = None\n\
print(hashlib.sha256(json.dumps(d, separators=(',', ':'), sort_keys=True).encode()).hexdigest() \
if isinstance(d, dict) and d else '')";
    let body = body.to_vec();
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let mut child = std::process::Command::new("python3")
            .args(["-c", SCRIPT])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("python3: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&body)
                .map_err(|e| format!("python3 stdin: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("python3: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "python3 failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let h = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok((!h.is_empty()).then_some(h))
    })
    .await
    .map_err(|e| format!("join: {e}"))?
}

/// Verifies `X-Wallet-Auth` as the CDP server does: exactly one, header exactly
/// `{"alg":"ES256","typ":"JWT"}`, ES256 signature by the wallet secret's public key
/// (`jsonwebtoken`), claims exactly `uris` (one entry, `METHOD host path` with the host this
/// request reached), integer `iat` = `nbf` within 60 s of now, a uuid4 `jti`, and `reqHash`
/// present exactly when the body is a non-empty JSON object, equal to CPython's hash of it.
pub async fn verify_wallet_auth(
    public_key: &[u8],
    method: &str,
    host: &str,
    path: &str,
    body: &[u8],
    headers: &HeaderMap,
    now: i64,
) -> Result<Value, String> {
    let mut values = headers.get_all("x-wallet-auth").iter();
    let token = values
        .next()
        .ok_or_else(|| "missing".to_string())?
        .to_str()
        .map_err(|_| "not ASCII".to_string())?;
    if values.next().is_some() {
        return Err("more than one".into());
    }
    let segments: Vec<&str> = token.split('.').collect();
    if segments.len() != 3 {
        return Err(format!("{} segments, want 3", segments.len()));
    }
    let header: Value = URL_SAFE_NO_PAD
        .decode(segments[0])
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| "header is not base64url JSON".to_string())?;
    if header != json!({"alg": "ES256", "typ": "JWT"}) {
        return Err(format!(
            "header {header}, want exactly alg ES256 and typ JWT"
        ));
    }
    let mut validation = Validation::new(Algorithm::ES256);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims = HashSet::new();
    let data =
        jsonwebtoken::decode::<Value>(token, &DecodingKey::from_ec_der(public_key), &validation)
            .map_err(|e| format!("signature check failed: {e}"))?;
    let claims = data.claims;
    let obj = claims
        .as_object()
        .ok_or_else(|| "claims are not an object".to_string())?;
    let want = format!("{method} {host}{path}");
    if obj.get("uris") != Some(&json!([want])) {
        return Err(format!("uris is {:?}, want [{want:?}]", obj.get("uris")));
    }
    let iat = obj
        .get("iat")
        .and_then(Value::as_i64)
        .ok_or("iat is not an integer")?;
    let nbf = obj
        .get("nbf")
        .and_then(Value::as_i64)
        .ok_or("nbf is not an integer")?;
    if iat != nbf || (iat - now).abs() > 60 {
        return Err(format!("iat {iat} / nbf {nbf} not now ({now})"));
    }
    let jti = obj
        .get("jti")
        .and_then(Value::as_str)
        .ok_or("jti is not a string")?;
    let b = jti.as_bytes();
    let uuid4 = b.len() == 36
        && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')
        && b[14] == b'4'
        && matches!(b[19], b'8' | b'9' | b'a' | b'b')
        && b.iter()
            .enumerate()
            .all(|(i, c)| [8, 13, 18, 23].contains(&i) || matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    if !uuid4 {
        return Err(format!("jti {jti:?} is not a uuid4"));
    }
    let expected = python_req_hash(body).await?;
    match (
        obj.get("reqHash").and_then(Value::as_str),
        expected.as_deref(),
    ) {
        (None, None) => {}
        (Some(got), Some(want)) if got == want => {}
        (got, want) => return Err(format!("reqHash {got:?}, want {want:?}")),
    }
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys.retain(|k| *k != "reqHash");
    if keys != ["iat", "jti", "nbf", "uris"] {
        return Err(format!(
            "claims {keys:?}, want iat, jti, nbf, uris (+ reqHash)"
        ));
    }
    Ok(claims)
}

/// The CDP v2 endpoints the SDK tests call, answered as the API reference shapes them.
fn cdp_v2(method: &str, path: &str, body: &[u8]) -> Option<Response<RespBody>> {
    let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let now = iso8601(now_with_offset(0));
    if method == "POST" && path == "/platform/v2/evm/accounts" {
        let mut address = String::from("0x");
        for _ in 0..5 {
            address.push_str(&random_uuid().replace('-', "")[..8]);
        }
        let mut account =
            json!({"address": address, "policies": [], "createdAt": now, "updatedAt": now});
        if let Some(name) = req.get("name") {
            account["name"] = name.clone();
        }
        return Some(json_response(StatusCode::CREATED, &account));
    }
    if method == "POST" && path == "/platform/v2/solana/accounts" {
        return Some(json_response(
            StatusCode::CREATED,
            &json!({"address": "9f1TYAzGJwBVUaFcYJYhLzaU3mZpGeH3hFpZVfLezB3C", "policies": [], "createdAt": now, "updatedAt": now}),
        ));
    }
    if method == "POST"
        && path.starts_with("/platform/v2/evm/accounts/0x")
        && path.ends_with("/sign/message")
    {
        if req.get("message").and_then(Value::as_str).is_none() {
            return Some(cdp_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "message is required",
            ));
        }
        return Some(json_response(
            StatusCode::OK,
            &json!({"signature": format!("0x{}1b", "ab".repeat(64))}),
        ));
    }
    None
}

// ---------------------------------------------------------------------------
// Realistic trading endpoints (MockOptions::realistic)
// ---------------------------------------------------------------------------

/// Coinbase's 400 for a malformed request body.
fn invalid_argument(details: &str) -> Response<RespBody> {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({"error": "INVALID_ARGUMENT", "error_details": details, "message": details}),
    )
}

/// The answers of `GET /accounts`, `POST /orders` and `POST /orders/batch_cancel`, shaped like
/// Coinbase's (Advanced Trade API reference); `None` for any other request.
fn trading(
    inner: &Inner,
    method: &str,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Option<Response<RespBody>> {
    if method == "GET" {
        if let Some(product) = path.strip_prefix("/api/v3/brokerage/market/products/") {
            return Some(product_price(inner, product));
        }
    }
    match (method, path) {
        ("GET", "/api/v3/brokerage/orders/historical/batch") => Some(open_orders(inner, query)),
        ("GET", "/api/v3/brokerage/accounts") => Some(accounts()),
        ("GET", "/api/v3/brokerage/market/products") => Some(products(query)),
        ("GET", "/v2/accounts") => Some(app_accounts()),
        ("POST", "/api/v3/brokerage/orders") => Some(place_order(inner, body)),
        ("POST", "/api/v3/brokerage/orders/batch_cancel") => Some(batch_cancel(inner, body)),
        ("GET", "/api/v3/brokerage/portfolios") => Some(json_response(
            StatusCode::OK,
            &json!({"portfolios": PORTFOLIOS.iter().map(|(uuid, kind, name)| json!({
                "name": name, "uuid": uuid, "type": kind, "deleted": false,
            })).collect::<Vec<_>>()}),
        )),
        ("POST", "/api/v3/brokerage/portfolios/move_funds") => Some(move_funds(body)),
        _ => None,
    }
}

/// The portfolios the realistic mock lists: (uuid, type, name).
pub const PORTFOLIOS: [(&str, &str, &str); 2] = [
    ("8b5a5a1c-0000-4000-8000-000000000001", "DEFAULT", "Default"),
    ("8b5a5a1c-0000-4000-8000-000000000002", "CONSUMER", "Bot"),
];

/// `POST /portfolios/move_funds`: Coinbase answers with the two portfolio ids; an unknown
/// portfolio or a malformed body is a 400.
fn move_funds(body: &[u8]) -> Response<RespBody> {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let known = |field: &str| {
        v[field]
            .as_str()
            .filter(|id| PORTFOLIOS.iter().any(|(uuid, _, _)| uuid == id))
            .map(str::to_owned)
    };
    match (
        known("source_portfolio_uuid"),
        known("target_portfolio_uuid"),
        v["funds"]["value"].as_str(),
        v["funds"]["currency"].as_str(),
    ) {
        (Some(source), Some(target), Some(_), Some(_)) if source != target => json_response(
            StatusCode::OK,
            &json!({"source_portfolio_uuid": source, "target_portfolio_uuid": target}),
        ),
        _ => json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "INVALID_ARGUMENT", "message": "invalid move_funds request"}),
        ),
    }
}

/// The realistic answers of the HMAC families: Exchange `POST /orders` (the order, its id in
/// `id`), `DELETE /orders` (the ids cancelled), `GET /products/{id}/ticker`; INTX
/// `GET /api/v1/instruments/{id}/quote`. Prices come from `prices` on every family. Other
/// requests (INTX and Prime orders) get the echo.
fn hmac_trading(
    inner: &Inner,
    family: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> Option<Response<RespBody>> {
    let price_of = |product: &str| {
        inner
            .opts
            .prices
            .iter()
            .find(|(p, _)| p == product)
            .map(|(_, price)| price.clone())
    };
    let not_found = || json_response(StatusCode::NOT_FOUND, &json!({"message": "NotFound"}));
    match (family, method) {
        ("exchange", "GET") => {
            let product = path.strip_prefix("/products/")?.strip_suffix("/ticker")?;
            Some(match price_of(product) {
                Some(p) => json_response(
                    StatusCode::OK,
                    &json!({"ask": p, "bid": p, "volume": "1000", "trade_id": 1, "price": p,
                            "size": "0.01", "time": "2026-12-02T00:00:00.000000Z"}),
                ),
                None => not_found(),
            })
        }
        ("intx", "GET") => {
            let product = path
                .strip_prefix("/api/v1/instruments/")?
                .strip_suffix("/quote")?;
            Some(match price_of(product) {
                Some(p) => json_response(
                    StatusCode::OK,
                    &json!({"best_bid_price": p, "best_ask_price": p, "trade_price": p,
                            "mark_price": p, "settlement_price": p,
                            "timestamp": "2026-12-02T00:00:00Z"}),
                ),
                None => not_found(),
            })
        }
        ("exchange", "POST") if path == "/orders" => {
            let Ok(request) = serde_json::from_slice::<Value>(body) else {
                return Some(json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"message": "invalid JSON"}),
                ));
            };
            let order_id = random_uuid();
            let mut answer = request.clone();
            answer["id"] = order_id.clone().into();
            answer["status"] = "pending".into();
            inner.lock().exchange_orders.push(PlacedOrder {
                order_id,
                request,
                cancelled: false,
                filled: false,
            });
            Some(json_response(StatusCode::OK, &answer))
        }
        ("exchange", "DELETE") if path == "/orders" => {
            let mut state = inner.lock();
            let mut ids = Vec::new();
            for o in state
                .exchange_orders
                .iter_mut()
                .filter(|o| !o.cancelled && !o.filled)
            {
                o.cancelled = true;
                ids.push(o.order_id.clone());
            }
            drop(state);
            Some(json_response(StatusCode::OK, &json!(ids)))
        }
        _ => None,
    }
}

/// `GET /market/products`: BTC-USD, the one spot product (ccxt loads the list before trading);
/// no futures (`product_type=FUTURE`).
fn products(query: Option<&str>) -> Response<RespBody> {
    if query.is_some_and(|q| q.contains("product_type=FUTURE")) {
        return json_response(StatusCode::OK, &json!({"products": [], "num_products": 0}));
    }
    json_response(
        StatusCode::OK,
        &json!({"products": [{
            "product_id": "BTC-USD", "price": "67060", "base_increment": "0.00000001",
            "quote_increment": "0.01", "quote_min_size": "1", "quote_max_size": "150000000",
            "base_min_size": "0.00000001", "base_max_size": "3400", "base_name": "Bitcoin",
            "quote_name": "US Dollar", "status": "online", "is_disabled": false,
            "cancel_only": false, "limit_only": false, "post_only": false,
            "trading_disabled": false, "auction_mode": false, "product_type": "SPOT",
            "quote_currency_id": "USD", "base_currency_id": "BTC",
            "base_display_symbol": "BTC", "quote_display_symbol": "USD",
            "view_only": false, "price_increment": "0.01", "display_name": "BTC-USD",
            "product_venue": "CBE", "alias": "", "alias_to": []
        }], "num_products": 1}),
    )
}

/// `GET /v2/accounts` of the Coinbase App API (ccxt's default for balances): two wallets.
fn app_accounts() -> Response<RespBody> {
    let wallet = |id: &str, code: &str, kind: &str, amount: &str| {
        json!({"id": id, "name": format!("{code} Wallet"), "primary": true, "type": kind,
               "currency": code, "balance": {"amount": amount, "currency": code},
               "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z",
               "resource": "account", "resource_path": format!("/v2/accounts/{id}")})
    };
    json_response(
        StatusCode::OK,
        &json!({
            "pagination": {"ending_before": null, "starting_after": null, "limit": 250,
                           "order": "desc", "previous_uri": null, "next_uri": null},
            "data": [
                wallet("6f7a3b2e-0000-4000-8000-000000000001", "BTC", "wallet", "0.50000000"),
                wallet("6f7a3b2e-0000-4000-8000-000000000002", "USD", "fiat", "1000.00"),
            ],
        }),
    )
}

fn accounts() -> Response<RespBody> {
    let account = |uuid: &str, currency: &str, name: &str, value: &str, kind: &str| {
        json!({
            "uuid": uuid,
            "name": name,
            "currency": currency,
            "available_balance": {"value": value, "currency": currency},
            "default": false,
            "active": true,
            "created_at": "2024-01-31T20:50:41.823Z",
            "updated_at": "2024-06-12T08:02:11.394Z",
            "deleted_at": null,
            "type": kind,
            "ready": true,
            "hold": {"value": "0", "currency": currency},
            "retail_portfolio_id": "8b5a5a1c-0000-4000-8000-000000000001",
            "platform": "ACCOUNT_PLATFORM_CONSUMER",
        })
    };
    let list = vec![
        account(
            "0b9c2a84-8b1d-5b5f-9c0e-6a1f3c2d4e01",
            "BTC",
            "BTC Wallet",
            "0.01250000",
            "ACCOUNT_TYPE_CRYPTO",
        ),
        account(
            "5d3a1f0e-2c4b-5e6f-8a9b-0c1d2e3f4a02",
            "USD",
            "Cash (USD)",
            "1523.47",
            "ACCOUNT_TYPE_FIAT",
        ),
    ];
    let size = list.len();
    json_response(
        StatusCode::OK,
        &json!({"accounts": list, "has_next": false, "cursor": "", "size": size}),
    )
}

fn place_order(inner: &Inner, body: &[u8]) -> Response<RespBody> {
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return invalid_argument("request body is not JSON");
    };
    let text = |name: &str| {
        request
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    let (client_order_id, product_id, side) =
        (text("client_order_id"), text("product_id"), text("side"));
    if client_order_id.is_empty() || product_id.is_empty() {
        return invalid_argument("client_order_id and product_id are required");
    }
    if side != "BUY" && side != "SELL" {
        return invalid_argument("side must be BUY or SELL");
    }
    let Some(configuration) = request
        .get("order_configuration")
        .and_then(Value::as_object)
        .filter(|c| c.len() == 1)
    else {
        return invalid_argument("order_configuration must hold exactly one order type");
    };
    let order_id = random_uuid();
    let response = json!({
        "success": true,
        "success_response": {
            "order_id": order_id,
            "product_id": product_id,
            "side": side,
            "client_order_id": client_order_id,
        },
        "order_configuration": configuration,
    });
    inner.lock().orders.push(PlacedOrder {
        order_id,
        request,
        cancelled: false,
        filled: false,
    });
    json_response(StatusCode::OK, &response)
}

/// `GET /market/products/{id}`: the product with its current `price`, as Coinbase answers.
fn product_price(inner: &Inner, product: &str) -> Response<RespBody> {
    match inner.opts.prices.iter().find(|(p, _)| p == product) {
        Some((p, price)) => json_response(
            StatusCode::OK,
            &json!({
                "product_id": p,
                "price": price,
                "price_percentage_change_24h": "1.2",
                "volume_24h": "1000",
                "base_increment": "0.00000001",
                "quote_increment": "0.01",
                "status": "online",
                "trading_disabled": false,
            }),
        ),
        None => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": "NOT_FOUND", "error_details": "product not found", "message": "product not found"}),
        ),
    }
}

/// `GET /orders/historical/batch?order_status=OPEN[&cursor=N]`: open orders, in pages of
/// [`OPEN_ORDERS_PAGE`], the cursor being the offset of the next page.
fn open_orders(inner: &Inner, query: Option<&str>) -> Response<RespBody> {
    let params: Vec<(String, String)> = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    if !params
        .iter()
        .any(|(k, v)| k == "order_status" && v == "OPEN")
    {
        return invalid_argument("this mock lists only order_status=OPEN");
    }
    let start: usize = params
        .iter()
        .find(|(k, _)| k == "cursor")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let state = inner.lock();
    let open: Vec<&PlacedOrder> = state
        .orders
        .iter()
        .filter(|o| !o.cancelled && !o.filled)
        .collect();
    let page: Vec<Value> = open
        .iter()
        .skip(start)
        .take(OPEN_ORDERS_PAGE)
        .map(|o| {
            json!({
                "order_id": o.order_id,
                "product_id": o.request.get("product_id").cloned().unwrap_or(Value::Null),
                "status": "OPEN",
            })
        })
        .collect();
    let next = start + page.len();
    let has_next = next < open.len();
    json_response(
        StatusCode::OK,
        &json!({
            "orders": page,
            "sequence": "0",
            "has_next": has_next,
            "cursor": if has_next { next.to_string() } else { String::new() },
        }),
    )
}

fn batch_cancel(inner: &Inner, body: &[u8]) -> Response<RespBody> {
    let ids: Option<Vec<String>> = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        v.get("order_ids")?
            .as_array()?
            .iter()
            .map(|id| id.as_str().map(str::to_owned))
            .collect()
    });
    let Some(ids) = ids.filter(|ids| !ids.is_empty()) else {
        return invalid_argument("order_ids must be a non-empty list of strings");
    };
    if ids.len() > 100 {
        return invalid_argument("at most 100 order_ids per batch_cancel");
    }
    let mut state = inner.lock();
    let results: Vec<Value> = ids
        .iter()
        .map(|id| {
            let order = state
                .orders
                .iter_mut()
                .find(|o| &o.order_id == id && !o.cancelled && !o.filled);
            match order {
                Some(o) => {
                    o.cancelled = true;
                    json!({"success": true, "failure_reason": "UNKNOWN_CANCEL_FAILURE_REASON", "order_id": id})
                }
                None => {
                    json!({"success": false, "failure_reason": "UNKNOWN_CANCEL_ORDER", "order_id": id})
                }
            }
        })
        .collect();
    drop(state);
    json_response(StatusCode::OK, &json!({ "results": results }))
}

/// A random version-4 UUID, as Coinbase's order ids are.
fn random_uuid() -> String {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).expect("random (test setup)");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The decimal number right after `marker` in `path` (digits up to the next
/// non-digit), if any.
fn number_after(path: &str, marker: &str) -> Option<u64> {
    let start = path.find(marker)? + marker.len();
    let digits: String = path[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

// ---------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------

fn authenticate(
    inner: &Inner,
    method: &str,
    host: Option<&str>,
    path: &str,
    headers: &HeaderMap,
) -> AuthOutcome {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return AuthOutcome::Missing;
    };
    if values.next().is_some() {
        return AuthOutcome::Invalid("more than one Authorization header".into());
    }
    let Some(primary) = inner.opts.key.as_ref() else {
        return AuthOutcome::Invalid("unexpected token".into());
    };
    let kid = kid_of(value.to_str().unwrap_or("").trim_start_matches("Bearer "));
    let key = inner
        .opts
        .also_accept
        .iter()
        .find(|k| Some(k.name()) == kid.as_deref())
        .unwrap_or(primary);
    match verify(inner, key, method, host, path, value) {
        Ok(outcome) => outcome,
        Err(reason) => AuthOutcome::Invalid(reason),
    }
}

/// Verifies an HMAC-signed request as the family's server does: the four headers (and no
/// `Authorization`), the key and passphrase, an integer timestamp within the window (30 s;
/// INTX 5 s), and the signature over timestamp + METHOD + path (with the query for Exchange
/// only) + the body bytes exactly as received.
fn authenticate_hmac(
    inner: &Inner,
    family: &'static str,
    method: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> AuthOutcome {
    let names: [&str; 4] = if family == "prime" {
        [
            "x-cb-access-key",
            "x-cb-access-signature",
            "x-cb-access-timestamp",
            "x-cb-access-passphrase",
        ]
    } else {
        [
            "cb-access-key",
            "cb-access-sign",
            "cb-access-timestamp",
            "cb-access-passphrase",
        ]
    };
    let got: Vec<Option<String>> = names
        .iter()
        .map(|n| {
            let mut all = headers.get_all(*n).iter();
            let v = all.next()?.to_str().ok()?.to_owned();
            all.next().is_none().then_some(v)
        })
        .collect();
    if got.iter().all(Option::is_none) {
        return AuthOutcome::Missing;
    }
    let check = || -> Result<AuthOutcome, String> {
        if headers.contains_key(AUTHORIZATION) {
            return Err("an Authorization header was sent to an HMAC host".into());
        }
        let [Some(key), Some(sig), Some(ts), Some(pass)] = [&got[0], &got[1], &got[2], &got[3]]
        else {
            return Err(format!("missing or repeated one of {names:?}"));
        };
        let expected = inner
            .opts
            .hmac
            .iter()
            .find(|k| k.family == family && &k.key == key)
            .ok_or_else(|| format!("unknown {family} key {key:?}"))?;
        if &expected.passphrase != pass {
            return Err("wrong passphrase".into());
        }
        let t: i64 = ts
            .parse()
            .map_err(|_| format!("timestamp {ts:?} is not integer seconds"))?;
        let window = if family == "intx" { 5 } else { 30 };
        if (t - inner.now()).abs() > window {
            return Err(format!("timestamp outside the {window} s window"));
        }
        let path = if family == "exchange" {
            path_and_query
        } else {
            path_and_query.split('?').next().unwrap_or(path_and_query)
        };
        let key_bytes = if family == "prime" {
            expected.secret.as_bytes().to_vec()
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(&expected.secret)
                .map_err(|_| "test secret is not base64".to_string())?
        };
        let mut msg = Vec::new();
        msg.extend_from_slice(ts.as_bytes());
        msg.extend_from_slice(method.as_bytes());
        msg.extend_from_slice(path.as_bytes());
        msg.extend_from_slice(body);
        let mac = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key_bytes),
            &msg,
        );
        let want = base64::engine::general_purpose::STANDARD.encode(mac.as_ref());
        if &want != sig {
            return Err(format!("{family} signature does not verify"));
        }
        Ok(AuthOutcome::Valid {
            alg: "HMAC-SHA256".into(),
            kid: key.clone(),
            nonce: ts.clone(),
            claims: json!({"family": family, "signature": sig, "timestamp": ts}),
        })
    };
    check().unwrap_or_else(AuthOutcome::Invalid)
}

/// `public/auth` on the derivatives gateway: the JSON-RPC body's `grant_type` and a CDP JWT
/// checked as ccxt 4.5.90's `create_auth_token` builds it (header alg, typ, kid, 32-hex nonce;
/// ES256: iss coinbase-cloud, aud retail_rest_api_proxy, uri; EdDSA: iss cdp, aud cdp_service,
/// uris), signature by `jsonwebtoken`. Issues a token valid `gateway_token_secs`.
fn gateway_auth(inner: &Inner, body: &[u8]) -> Result<(String, Value, String, u64), String> {
    let v: Value = serde_json::from_slice(body).map_err(|_| "body is not JSON".to_string())?;
    if v["jsonrpc"] != "2.0" || v["method"] != "public/auth" {
        return Err("not a JSON-RPC 2.0 public/auth call".into());
    }
    if v["params"]["grant_type"] != "coinbase_cdp" {
        return Err("grant_type is not coinbase_cdp".into());
    }
    let token = v["params"]["token"].as_str().ok_or("no token")?;
    let kid = kid_of(token).ok_or("no kid")?;
    let key = inner
        .opts
        .key
        .iter()
        .chain(inner.opts.also_accept.iter())
        .find(|k| k.name() == kid)
        .ok_or_else(|| format!("unknown kid {kid:?}"))?;
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap_or(""))
            .map_err(|_| "header not base64url")?,
    )
    .map_err(|_| "header not JSON")?;
    let nonce = header["nonce"].as_str().unwrap_or("");
    if header["alg"] != key.alg_str()
        || header["typ"] != "JWT"
        || nonce.len() != 32
        || !nonce.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(format!("header {header} is not ccxt's"));
    }
    let ed = key.alg_str() == "EdDSA";
    let mut validation = Validation::new(key.algorithm());
    validation.set_audience(&[if ed {
        "cdp_service"
    } else {
        "retail_rest_api_proxy"
    }]);
    validation.set_issuer(&[if ed { "cdp" } else { "coinbase-cloud" }]);
    validation.validate_nbf = true;
    validation.leeway = 0;
    let data = jsonwebtoken::decode::<Value>(token, &key.decoding_key(), &validation)
        .map_err(|e| format!("exchange JWT rejected: {e}"))?;
    let c = data.claims;
    let want = "POST drb.coinbase.com/api/v2/public/auth";
    let bound = if ed {
        c["uris"] == json!([want]) && c.get("uri").is_none()
    } else {
        c["uri"] == want && c.get("uris").is_none()
    };
    let nbf = c["nbf"].as_i64().unwrap_or(0);
    if !bound
        || c["sub"] != kid.as_str()
        || c["iat"].as_i64() != Some(nbf)
        || c["exp"].as_i64() != Some(nbf + 120)
        || (nbf - inner.now()).abs() > 30
    {
        return Err(format!("claims {c} are not ccxt's"));
    }
    let secs = if inner.opts.gateway_token_secs == 0 {
        3600
    } else {
        inner.opts.gateway_token_secs
    };
    let mut st = inner.lock();
    let token = format!("drb-tok-{}-{}", st.gateway_auths.len() + 1, random_uuid());
    st.gateway_tokens.insert(
        token.clone(),
        (
            kid.clone(),
            inner.now() + i64::try_from(secs).unwrap_or(3600),
        ),
    );
    st.gateway_auths.push(kid.clone());
    Ok((kid, c, token, secs))
}

/// How the mock's `public/auth` answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GatewayAuthMode {
    /// Verifies the exchange JWT and issues a token.
    #[default]
    Normal,
    /// Refuses every key with a JSON-RPC error (a key without derivatives access).
    Refuse,
    /// Answers 502 with an HTML page (something in between failed).
    BadGateway,
    /// Answers 503 with a JSON-RPC error (the gateway's maintenance).
    Unavailable,
}

/// A private gateway call: `Authorization: Bearer <issued, unexpired token>`.
fn gateway_bearer(inner: &Inner, headers: &HeaderMap) -> AuthOutcome {
    let Some(v) = headers.get(AUTHORIZATION) else {
        return AuthOutcome::Missing;
    };
    let token = v.to_str().unwrap_or("").trim_start_matches("Bearer ");
    let mut st = inner.lock();
    match st.gateway_tokens.get(token).cloned() {
        Some((kid, exp)) if inner.now() <= exp => AuthOutcome::Valid {
            alg: "bearer".into(),
            kid,
            nonce: String::new(),
            claims: json!({}),
        },
        _ => {
            st.gateway_refused += 1;
            AuthOutcome::Invalid("unknown or expired access token".into())
        }
    }
}

/// The `kid` of a token's JOSE header, unverified (only to pick which key to verify with).
fn kid_of(token: &str) -> Option<String> {
    let header = URL_SAFE_NO_PAD.decode(token.split('.').next()?).ok()?;
    let v: Value = serde_json::from_slice(&header).ok()?;
    v.get("kid")?.as_str().map(str::to_owned)
}

/// A token whose JOSE header and signature checked out.
#[derive(Clone, Debug)]
pub struct SignedToken {
    pub alg: String,
    pub kid: String,
    pub nonce: String,
    pub claims: Value,
}

/// Checks a token's JOSE header by hand (exactly alg, kid, nonce, typ; the nonce 64 lowercase
/// hex) and its signature with `jsonwebtoken`. Claims are left to [`check_common_claims`] and the
/// caller; nonce freshness too, since each mock keeps its own set.
pub fn verify_signature(key: &ExpectedKey, token: &str) -> Result<SignedToken, String> {
    let segments: Vec<&str> = token.split('.').collect();
    if segments.len() != 3 {
        return Err(format!("token has {} segments, want 3", segments.len()));
    }
    let header_bytes = URL_SAFE_NO_PAD
        .decode(segments[0])
        .map_err(|e| format!("header is not base64url: {e}"))?;
    let header: Map<String, Value> = serde_json::from_slice(&header_bytes)
        .map_err(|e| format!("header is not a JSON object: {e}"))?;
    let mut keys: Vec<&str> = header.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != ["alg", "kid", "nonce", "typ"] {
        return Err(format!(
            "header fields {keys:?}, want exactly alg, kid, nonce, typ"
        ));
    }
    let field = |name: &str| -> Result<String, String> {
        header
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("header {name} is not a string"))
    };
    let alg = field("alg")?;
    let kid = field("kid")?;
    let typ = field("typ")?;
    let nonce = field("nonce")?;
    if alg != key.alg_str() {
        return Err(format!("alg {alg:?}, want {:?}", key.alg_str()));
    }
    if kid != key.name() {
        return Err(format!("kid {kid:?} is not the key name"));
    }
    if typ != "JWT" {
        return Err(format!("typ {typ:?}, want \"JWT\""));
    }
    if nonce.len() != 64
        || !nonce
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err("nonce is not 64 lowercase hex chars".into());
    }

    // --- Signature, by jsonwebtoken. Its own time and claim checks are off.
    let mut validation = Validation::new(key.algorithm());
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims = HashSet::new();
    validation.leeway = 0;
    let data = jsonwebtoken::decode::<Value>(token, &key.decoding_key(), &validation)
        .map_err(|e| format!("signature check failed: {e}"))?;
    Ok(SignedToken {
        alg,
        kid,
        nonce,
        claims: data.claims,
    })
}

/// The claims every Coinbase token carries: iss "cdp", sub the key name, integer nbf/exp two
/// minutes apart, valid at `now` (5 s of leeway for nbf). Returns the claims object.
pub fn check_common_claims<'a>(
    key: &ExpectedKey,
    claims: &'a Value,
    now: i64,
) -> Result<&'a Map<String, Value>, String> {
    let obj = claims
        .as_object()
        .ok_or_else(|| "claims are not a JSON object".to_string())?;
    if obj.get("iss").and_then(Value::as_str) != Some("cdp") {
        return Err("iss is not \"cdp\"".into());
    }
    if obj.get("sub").and_then(Value::as_str) != Some(key.name()) {
        return Err("sub is not the key name".into());
    }
    let int = |name: &str| -> Result<i64, String> {
        obj.get(name)
            .and_then(Value::as_i64)
            .ok_or_else(|| format!("{name} is missing or not an integer"))
    };
    let nbf = int("nbf")?;
    let exp = int("exp")?;
    if exp - nbf != 120 {
        return Err(format!("exp - nbf = {}, want 120", exp - nbf));
    }
    if nbf > now + 5 {
        return Err(format!("token not yet valid: nbf {nbf} > now {now} + 5"));
    }
    if exp <= now {
        return Err(format!("token expired: exp {exp} <= now {now}"));
    }
    Ok(obj)
}

/// Real now (Unix seconds) plus `offset`.
pub fn now_with_offset(offset: i64) -> i64 {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    real + offset
}

fn verify(
    inner: &Inner,
    key: &ExpectedKey,
    method: &str,
    host: Option<&str>,
    path: &str,
    value: &HeaderValue,
) -> Result<AuthOutcome, String> {
    let value = value
        .to_str()
        .map_err(|_| "Authorization header is not ASCII".to_string())?;
    let token = value
        .strip_prefix("Bearer ")
        .ok_or_else(|| "Authorization is not 'Bearer <jwt>'".to_string())?;

    let SignedToken {
        alg,
        kid,
        nonce,
        claims,
    } = verify_signature(key, token)?;

    // --- Nonce: never seen before (only signature-valid tokens consume one).
    if !inner.lock().nonces.insert(nonce.clone()) {
        return Err("nonce reused".into());
    }

    // --- Claims.
    let obj = check_common_claims(key, &claims, inner.now())?;
    let nbf = obj.get("nbf").and_then(Value::as_i64).unwrap_or_default();

    let host = host.ok_or_else(|| "request has no host".to_string())?;
    if !inner.hosts.iter().any(|h| h == host) {
        return Err(format!("unexpected host {host:?}"));
    }
    let want = format!("{method} {host}{path}");
    if host == "api.cdp.coinbase.com" {
        if obj.contains_key("uri") {
            return Err("uri present; api.cdp.coinbase.com wants uris".into());
        }
        match obj.get("uris").and_then(Value::as_array) {
            Some(list) if list.len() == 1 && list[0].as_str() == Some(want.as_str()) => {}
            _ => return Err(format!("uris is not [{want:?}]")),
        }
        if obj.get("iat").and_then(Value::as_i64) != Some(nbf) {
            return Err("iat is missing or not equal to nbf".into());
        }
    } else {
        if obj.contains_key("uris") {
            return Err("uris present; this host wants uri".into());
        }
        if obj.get("uri").and_then(Value::as_str) != Some(want.as_str()) {
            return Err(format!("uri is not {want:?}"));
        }
    }

    Ok(AuthOutcome::Valid {
        alg,
        kid,
        nonce,
        claims,
    })
}

// ---------------------------------------------------------------------------
// Bodies and formatting helpers
// ---------------------------------------------------------------------------

/// A response body fed by an mpsc channel; `len` makes the size exact
/// (content-length on HTTP/1.1), `None` means chunked.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
    remaining: Option<u64>,
}

impl ChannelBody {
    fn new(rx: mpsc::Receiver<Bytes>, len: Option<u64>) -> Self {
        ChannelBody { rx, remaining: len }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(chunk)) => {
                if let Some(r) = this.remaining.as_mut() {
                    *r = r.saturating_sub(chunk.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// (year, month 1-12, day 1-31) for days since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn split_time(secs: i64) -> (i64, i64, i64, i64) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    (days, rem / 3600, (rem % 3600) / 60, rem % 60)
}

/// `2023-11-14T22:13:20Z`
pub fn iso8601(secs: i64) -> String {
    let (days, h, m, s) = split_time(secs);
    let (y, mo, d) = civil_from_days(days);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// IMF-fixdate, e.g. `Tue, 14 Nov 2023 22:13:20 GMT`.
pub fn http_date(secs: i64) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (days, h, m, s) = split_time(secs);
    let (y, mo, d) = civil_from_days(days);
    let wd = WEEKDAYS[days.rem_euclid(7) as usize];
    let mon = MONTHS[(mo - 1) as usize];
    format!("{wd}, {d:02} {mon} {y:04} {h:02}:{m:02}:{s:02} GMT")
}

/// Parses what [`http_date`] writes back into epoch seconds (for tests that
/// look at the `Date` header of `/api/v3/brokerage/time`).
pub fn parse_http_date(s: &str) -> Option<i64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let d: i64 = parts[1].parse().ok()?;
    let mo = MONTHS.iter().position(|m| *m == parts[2])? as i64 + 1;
    let y: i64 = parts[3].parse().ok()?;
    let hms: Vec<i64> = parts[4]
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    if hms.len() != 3 {
        return None;
    }
    // days_from_civil (H. Hinnant)
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2])
}
