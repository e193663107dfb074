//! The request path, phase by phase:
//! check client -> route -> sign -> forward -> stream back -> log.
//!
//! Each phase is a small function; [`Proxy::handle`] runs them in order and turns any
//! [`ProxyError`] into cbgate's JSON error response.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::config::Config;
use crate::error::ProxyError;
use crate::forward::date_watch::DateWatch;
use crate::forward::headers::{strip_client_credentials, strip_hop_by_hop};
use crate::forward::upstream::{SetupError, UpstreamClient};
use crate::forward::ws::{self, WsState};
use crate::gate::client::ClientGate;
use crate::gate::policy::{check_path, Policy};
use crate::gate::route::{Route, Router};
use crate::ops::audit::{self, Audit, RequestInfo, Ticket};
use crate::ops::metrics::Metrics;
use crate::ops::readiness::Readiness;
use crate::sign::jwt::{Binding, Signer};
use crate::sign::key::ApiKey;
use crate::Body;
use zeroize::Zeroizing;

/// Everything the request path needs, built once from the configuration.
#[derive(Debug)]
pub struct Proxy {
    router: Router,
    /// The key and clock correction; shared with WebSocket relay tasks, which outlive requests.
    signer: Arc<Signer>,
    client: UpstreamClient,
    ws: WsState,
    policy: Policy,
    clients: ClientGate,
    max_body_bytes: u64,
    metrics: Metrics,
    readiness: Readiness,
    /// Watches the `Date` of every upstream response for a clock jump between measurements.
    clock_watch: DateWatch,
    /// The audit log, when `audit.file` is set.
    audit: Option<Audit>,
}

/// Building the proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("routes: {0}")]
    Routes(String),
    #[error("{0}")]
    Policy(String),
    #[error(transparent)]
    Upstream(#[from] SetupError),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
}

/// What the log line of one request reports.
struct Outcome<'a> {
    route: Option<&'a str>,
    upstream_time: Option<Duration>,
    /// Set once the intent record is durable; becomes the result record.
    audit: Option<Ticket>,
}

impl Proxy {
    /// Builds the proxy; `key` is `None` when no key is configured (requests go unsigned).
    pub fn new(cfg: &Config, key: Option<ApiKey>) -> Result<Proxy, BuildError> {
        let metrics = Metrics::new();
        Ok(Proxy {
            router: Router::with_ws(&cfg.routes, &cfg.ws_routes).map_err(BuildError::Routes)?,
            signer: Arc::new(Signer::new(key)),
            client: UpstreamClient::new(&cfg.upstream)?,
            ws: WsState::new(&cfg.ws, Arc::clone(metrics.ws())),
            policy: Policy::new(&cfg.policy)
                .map_err(|(k, m)| BuildError::Policy(format!("{k}: {m}")))?,
            clients: ClientGate::new(None, &cfg.allowed_origins, &cfg.allowed_hosts),
            max_body_bytes: cfg.max_body_bytes,
            metrics,
            readiness: Readiness::default(),
            clock_watch: DateWatch::default(),
            audit: Audit::open(&cfg.audit, cfg.upstream.request_timeout)?,
        })
    }

    /// Requires clients to send `token` as `cbgate-token` (from `client_token_file`).
    pub fn with_client_token(mut self, token: Option<Zeroizing<String>>, cfg: &Config) -> Proxy {
        self.clients = ClientGate::new(token, &cfg.allowed_origins, &cfg.allowed_hosts);
        self
    }

    /// The signing state: current key (rotatable) and clock correction.
    pub fn signer(&self) -> &Arc<Signer> {
        &self.signer
    }

    /// The route table.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The upstream client (pooled HTTPS, and fresh HTTP/1.1 connections for WebSocket).
    pub fn upstream(&self) -> &UpstreamClient {
        &self.client
    }

    /// WebSocket session state.
    pub fn ws(&self) -> &WsState {
        &self.ws
    }

    /// The metrics `/metrics` serves.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The audit log, when configured.
    pub fn audit(&self) -> Option<&Audit> {
        self.audit.as_ref()
    }

    /// The `Date` watcher that asks the clock task for an early measurement.
    pub fn clock_watch(&self) -> &DateWatch {
        &self.clock_watch
    }

    /// What `/readyz` reports besides the key.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// A `'static` subscribe-token minter for WebSocket relay tasks (same key and clock offset).
    pub fn ws_signer(&self) -> ws::WsSigner {
        ws::WsSigner::new(Arc::clone(&self.signer))
    }

    /// A fresh WebSocket subscribe token (no request binding), or `None` without a key.
    pub fn ws_token(&self) -> Result<Option<String>, ProxyError> {
        self.ws_signer().token()
    }

    /// Handles one client request; never fails (errors become JSON responses).
    pub async fn handle(&self, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let _in_flight = self.metrics.in_flight();
        let request_id = request_id(req.headers());
        // Forwarded to Coinbase and returned to the client, so one id follows the request.
        req.headers_mut().insert(&REQUEST_ID, request_id.clone());
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let rid = request_id.to_str().unwrap_or("-").to_owned();
        let mut outcome = Outcome {
            route: None,
            upstream_time: None,
            audit: None,
        };
        let mut resp = match self.forward(req, &mut outcome).await {
            Ok(resp) => resp,
            Err(e) => {
                let (status, code) = e.status_and_code();
                self.count_error(&e);
                tracing::warn!(request_id = rid, %method, path, status = status.as_u16(), error = code, reason = %e, "request refused or failed");
                // Audit: every refusal (policy, guard, kill switch, ...) and every failed
                // forwarded request is recorded here, the one place errors become responses.
                if let Some(a) = &self.audit {
                    let key = self.signer.key();
                    let info = RequestInfo {
                        request_id: &rid,
                        key: key.as_deref().map(|k| k.name()),
                        method: &method,
                        path: &path,
                        query: None,
                    };
                    a.refused(outcome.audit.take(), &info, status.as_u16(), code)
                        .await;
                }
                e.into_response()
            }
        };
        resp.headers_mut().insert(&REQUEST_ID, request_id);
        let route = outcome.route.unwrap_or("-");
        let total = started.elapsed();
        self.metrics
            .request(route, &method, resp.status().as_u16(), total);
        if let Some(t) = outcome.upstream_time {
            self.metrics.upstream(route, t);
        }
        tracing::info!(
            request_id = rid,
            %method,
            route,
            path,
            status = resp.status().as_u16(),
            upstream_ms = outcome.upstream_time.map(|d| d.as_secs_f64() * 1e3),
            total_ms = total.as_secs_f64() * 1e3,
            "request"
        );
        Ok(resp)
    }

    fn count_error(&self, e: &ProxyError) {
        match e {
            ProxyError::PolicyDenied(_) => self.metrics.policy_denied(),
            ProxyError::Upstream(u) => self.metrics.upstream_error(u.kind()),
            _ => {}
        }
    }

    async fn forward<'a>(
        &'a self,
        req: Request<Incoming>,
        outcome: &mut Outcome<'a>,
    ) -> Result<Response<Body>, ProxyError> {
        if let Some(why) = crate::listen::sniff::rejected(req.uri().path()) {
            return Err(ProxyError::BadRequest(why.into()));
        }
        check_request(&req, self.max_body_bytes)?;
        self.clients.check(req.uri(), req.headers())?;
        check_path(req.uri().path()).map_err(ProxyError::InvalidPath)?;
        if ws::is_upgrade(&req) {
            let route =
                self.router
                    .find_ws(req.uri().path())
                    .ok_or_else(|| ProxyError::NoRoute {
                        path: req.uri().path().to_owned(),
                        prefixes: self.router.ws_paths().join(", "),
                    })?;
            outcome.route = Some(&route.path);
            self.policy.check(req.method(), req.uri().path())?;
            return ws::proxy(&self.client, &self.ws, self.ws_signer(), route, req).await;
        }
        let route = self.route(req.uri().path())?;
        outcome.route = Some(&route.prefix);
        self.policy.check(req.method(), req.uri().path())?;
        let upstream = &route.upstream;

        let (mut parts, body) = req.into_parts();
        // Audit (write-ahead): a state-changing request's body is buffered and hashed, and its
        // intent record is on disk before anything is sent.
        let body: Body = match &self.audit {
            Some(a) if audit::audited(&parts.method) => {
                let bytes = read_body(body, self.max_body_bytes, a.body_timeout).await?;
                let key = self.signer.key();
                let info = RequestInfo {
                    request_id: parts
                        .headers
                        .get(&REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-"),
                    key: key.as_deref().map(|k| k.name()),
                    method: &parts.method,
                    path: parts.uri.path(),
                    query: parts.uri.query(),
                };
                outcome.audit = Some(a.intent(&info, &bytes).await?);
                http_body_util::Full::new(bytes)
                    .map_err(|never| match never {})
                    .boxed_unsync()
            }
            _ => body.map_err(Into::into).boxed_unsync(),
        };
        let token = self.sign(&parts.method, &upstream.authority, parts.uri.path(), route)?;

        // The request id was set in `handle`; a `Connection: x-request-id` must not drop it.
        let request_id = parts.headers.get(&REQUEST_ID).cloned();
        strip_hop_by_hop(&mut parts.headers);
        strip_client_credentials(&mut parts.headers);
        if let Some(id) = request_id {
            parts.headers.insert(&REQUEST_ID, id);
        }
        if let Some(token) = token {
            let mut value =
                HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| ProxyError::Sign)?;
            // Keeps the token out of HPACK tables and hyper's Debug output.
            value.set_sensitive(true);
            parts.headers.insert(header::AUTHORIZATION, value);
        }
        // Path and query go upstream byte for byte, as the client sent them.
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = Uri::builder()
            .scheme("https")
            .authority(upstream.authority.as_str())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| ProxyError::BadRequest(format!("cannot build upstream URI: {e}")))?;
        // The pool picks HTTP/1.1 or h2 by ALPN, whatever the client spoke.
        parts.version = Version::HTTP_11;
        // The limit is enforced while streaming (a chunked body has no declared length). When it
        // trips, the client reports a generic send error, so the flag says why.
        let too_large = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&too_large);
        let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
        let body = Limited::new(body, limit)
            .map_err(move |e| {
                if e.is::<LengthLimitError>() {
                    flag.store(true, Ordering::Relaxed);
                }
                e
            })
            .boxed_unsync();

        let sent = Instant::now();
        let resp = self
            .client
            .send(&upstream.host, Request::from_parts(parts, body))
            .await;
        outcome.upstream_time = Some(sent.elapsed());
        let resp = match resp {
            Err(_) if too_large.load(Ordering::Relaxed) => {
                return Err(ProxyError::BodyTooLarge {
                    limit: self.max_body_bytes,
                })
            }
            other => other?,
        };
        let (mut parts, body) = resp.into_parts();
        self.clock_watch
            .observe(&parts.headers, self.signer.clock_offset());
        strip_hop_by_hop(&mut parts.headers);
        let mut body = body.map_err(Into::into).boxed_unsync();
        if let Some(ticket) = outcome.audit.take() {
            body = ticket.tee(parts.status.as_u16(), outcome.upstream_time, body);
        }
        Ok(Response::from_parts(parts, body))
    }

    fn route(&self, path: &str) -> Result<&Route, ProxyError> {
        self.router.find(path).ok_or_else(|| ProxyError::NoRoute {
            path: path.to_owned(),
            prefixes: self.router.prefixes().join(", "),
        })
    }

    /// A fresh token bound to this request, or `None` when no key is configured.
    fn sign(
        &self,
        method: &Method,
        authority: &str,
        path: &str,
        route: &Route,
    ) -> Result<Option<String>, ProxyError> {
        let binding = Binding {
            method: method.as_str(),
            host: authority,
            path,
        };
        let started = Instant::now();
        let token = self
            .signer
            .mint(route.upstream.claims, &binding)
            .map_err(|_| ProxyError::Sign)?;
        if token.is_some() {
            self.metrics.jwt_signed(started.elapsed());
        }
        Ok(token)
    }
}

/// The request id header.
static REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The client's `x-request-id` when it is a sane token (1..=128 of `[A-Za-z0-9._:-]`, so it
/// cannot inject into logs), otherwise a new random one.
fn request_id(headers: &http::HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&REQUEST_ID) {
        let b = v.as_bytes();
        if (1..=128).contains(&b.len())
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(c))
        {
            return v.clone();
        }
    }
    let mut raw = [0u8; 16];
    // A failed RNG leaves zeros: an id is for correlation, not security.
    let _ = aws_lc_rs::rand::fill(&mut raw);
    let mut hex = [0u8; 32];
    crate::sign::jwt::hex_lower(&raw, &mut hex);
    HeaderValue::from_bytes(&hex).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// Reads a whole request body (at most `limit` bytes, within `timeout`).
async fn read_body(
    body: Incoming,
    limit: u64,
    timeout: Duration,
) -> Result<bytes::Bytes, ProxyError> {
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => Err(ProxyError::BadRequest(format!(
            "request body not received within {} s",
            timeout.as_secs()
        ))),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(ProxyError::BodyTooLarge { limit }),
        Ok(Err(e)) => Err(ProxyError::BadRequest(format!(
            "reading the request body: {e}"
        ))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Refuses requests cbgate must not forward, before any other work.
fn check_request(req: &Request<Incoming>, max_body_bytes: u64) -> Result<(), ProxyError> {
    // Methods are case-sensitive tokens: `post` is not POST to a policy rule, but some server
    // along the way might fold it. Only the methods the Coinbase APIs use pass.
    if ![
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
        Method::CONNECT,
    ]
    .contains(req.method())
    {
        return Err(ProxyError::MethodNotAllowed(req.method().to_string()));
    }
    if req.method() == Method::CONNECT {
        return Err(ProxyError::BadRequest(
            "CONNECT is not supported: cbgate is a reverse proxy, send plain requests such as GET /api/v3/brokerage/accounts".into(),
        ));
    }
    // HTTP/2 always carries :scheme and :authority; in HTTP/1 they mean absolute-form, which
    // only forward proxies accept.
    if req.version() < Version::HTTP_2
        && (req.uri().scheme().is_some() || req.uri().authority().is_some())
    {
        return Err(ProxyError::BadRequest(
            "absolute-form request target refused: send only the path, e.g. GET /api/v3/brokerage/accounts, with cbgate as the base URL".into(),
        ));
    }
    if !req.uri().path().starts_with('/') {
        return Err(ProxyError::BadRequest(
            "request target must be a path starting with /".into(),
        ));
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body_bytes) {
        return Err(ProxyError::BodyTooLarge {
            limit: max_body_bytes,
        });
    }
    Ok(())
}
