//! The request path, phase by phase:
//! check client -> route -> sign -> forward -> stream back -> log.
//!
//! Each phase is a small function; [`Proxy::handle`] runs them in order and turns any
//! [`ProxyError`] into cbgate's JSON error response.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::config::Config;
use crate::error::ProxyError;
use crate::forward::body_timeout::{BodyTimeout, Direction, TimedBody};
use crate::forward::date_watch::DateWatch;
use crate::forward::headers::{strip_client_credentials, strip_hop_by_hop};
use crate::forward::upstream::{SetupError, UpstreamClient, UpstreamError};
use crate::forward::ws::{self, WsState};
use crate::gate::budget::{self, Budget, Ticket};
use crate::gate::client::ClientGate;
use crate::gate::guard::Guard;
use crate::gate::halt::{Halt, HaltState};
use crate::gate::policy::{check_path, Policy};
use crate::gate::route::{Route, Router};
use crate::ops::audit::{self, Audit, RequestInfo};
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
    /// Longest silence inside a request or response body.
    body_timeout: Duration,
    metrics: Metrics,
    readiness: Readiness,
    /// Watches the `Date` of every upstream response for a clock jump between measurements.
    clock_watch: DateWatch,
    /// The kill switch and the pre-trade limits.
    guard: Guard,
    /// The token `/halt`, `/resume` and `/status` require (`admin_token_file`).
    admin_token: Option<Zeroizing<String>>,
    /// Whether the admin listener is on loopback (control without a token is allowed only then).
    admin_loopback: bool,
    /// The audit log, when `audit.file` is set.
    audit: Option<Audit>,
    /// The rate budget per credential and class.
    budget: Budget,
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
    #[error(transparent)]
    Budget(#[from] budget::BudgetError),
}

/// What the log line of one request reports.
struct Outcome<'a> {
    route: Option<&'a str>,
    upstream_time: Option<Duration>,
    /// Set once the intent record is durable; becomes the result record.
    audit: Option<audit::Ticket>,
    /// How long the request waited for a budget token (`x-cbgate-queued-ms`).
    queued: Option<Duration>,
}

impl Proxy {
    /// Builds the proxy; `key` is `None` when no key is configured (requests go unsigned).
    pub fn new(cfg: &Config, key: Option<ApiKey>) -> Result<Proxy, BuildError> {
        let metrics = Metrics::new();
        let budget = Budget::new(&cfg.budget, None, metrics.budget().clone())?;
        Ok(Proxy {
            router: Router::with_ws(&cfg.routes, &cfg.ws_routes).map_err(BuildError::Routes)?,
            signer: Arc::new(Signer::new(key)),
            client: UpstreamClient::new(&cfg.upstream)?,
            ws: WsState::new(&cfg.ws, Arc::clone(metrics.ws())),
            policy: Policy::new(&cfg.policy)
                .map_err(|(k, m)| BuildError::Policy(format!("{k}: {m}")))?,
            clients: ClientGate::new(None, &cfg.allowed_origins, &cfg.allowed_hosts),
            max_body_bytes: cfg.max_body_bytes,
            body_timeout: cfg.body_timeout,
            metrics,
            readiness: Readiness::default(),
            clock_watch: DateWatch::default(),
            guard: Guard::new(&cfg.guard),
            admin_token: None,
            admin_loopback: cfg.admin_listen.ip().is_loopback(),
            audit: Audit::open(&cfg.audit, cfg.upstream.request_timeout)?,
            budget,
        })
    }

    /// Rebuilds the budget with the Redis password (the content of `budget.redis_password_file`,
    /// read by the binary). Call before serving.
    pub fn with_redis_password(
        mut self,
        password: Option<Zeroizing<String>>,
        cfg: &Config,
    ) -> Result<Proxy, BuildError> {
        self.budget = Budget::new(&cfg.budget, password, self.metrics.budget().clone())?;
        Ok(self)
    }

    /// The rate budget.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Takes a budget token for a request to `host` + `path` (see [`budget::classify`]),
    /// recording the wait in `outcome`; `Ok(None)` for a request no limit applies to.
    async fn reserve_budget(
        &self,
        host: &str,
        method: &Method,
        path: &str,
        websocket: bool,
        outcome: &mut Outcome<'_>,
    ) -> Result<Option<Ticket>, ProxyError> {
        let Some(class) = budget::classify(host, path, method, websocket) else {
            return Ok(None);
        };
        let key = self.signer.key();
        let credential = key.as_deref().map(|k| k.name()).unwrap_or("unsigned");
        // Client identities (`[clients.NAME]`, issue 13) are not wired yet: every request is
        // the one "anonymous" identity, with no budget_share. Pass the identity's name and share
        // here once they are.
        match self
            .budget
            .acquire(credential, class, budget::ANONYMOUS, None)
            .await
        {
            Ok(t) => {
                outcome.queued = Some(t.queued);
                Ok(Some(t))
            }
            Err(r) => {
                if let budget::Refusal::Exhausted { waited, .. } = &r {
                    outcome.queued = Some(*waited);
                }
                Err(ProxyError::Budget(r))
            }
        }
    }

    /// Requires clients to send `token` as `cbgate-token` (from `client_token_file`).
    pub fn with_client_token(mut self, token: Option<Zeroizing<String>>, cfg: &Config) -> Proxy {
        self.clients = ClientGate::new(token, &cfg.allowed_origins, &cfg.allowed_hosts);
        self
    }

    /// Requires `token` as `Authorization: Bearer` on the admin control endpoints.
    pub fn with_admin_token(mut self, token: Option<Zeroizing<String>>) -> Proxy {
        self.admin_token = token;
        self
    }

    /// The admin control token, if configured, and whether the admin listener is loopback.
    pub fn admin_control(&self) -> (Option<&str>, bool) {
        (
            self.admin_token.as_ref().map(|t| t.as_str()),
            self.admin_loopback,
        )
    }

    /// Uses `halt` as the kill switch (e.g. one persisted in `state_dir`).
    pub fn with_halt(mut self, halt: Halt) -> Proxy {
        self.metrics.set_halted(halt.is_halted());
        self.guard = self.guard.with_halt(halt);
        self
    }

    /// The kill switch's state.
    pub fn halt_state(&self) -> &Halt {
        self.guard.halt()
    }

    /// Halts trading (see [`Halt::halt`]) and updates `cbgate_halted`.
    pub fn halt(&self, reason: &str) -> Result<HaltState, crate::gate::halt::HaltError> {
        self.metrics.set_halted(true);
        let r = self.guard.halt().halt(reason);
        tracing::warn!(reason, "trading halted: orders are refused");
        r
    }

    /// Resumes trading (see [`Halt::resume`]) and updates `cbgate_halted`.
    pub fn resume(&self) -> Result<Option<HaltState>, crate::gate::halt::HaltError> {
        let r = self.guard.halt().resume();
        self.metrics.set_halted(self.guard.halt().is_halted());
        if r.is_ok() {
            tracing::warn!("trading resumed");
        }
        r
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
            queued: None,
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
        if let Some(q) = outcome.queued {
            resp.headers_mut()
                .insert(&QUEUED_MS, HeaderValue::from(q.as_millis() as u64));
        }
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
            ProxyError::GuardDenied(_) | ProxyError::Halted(_) => self.metrics.guard_denied(),
            ProxyError::Upstream(u) => self.metrics.upstream_error(u.kind()),
            // Counted by the budget itself (cbgate_budget_refusals_total).
            ProxyError::Budget(_) => {}
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
            let host = route.upstream.host.clone();
            let method = req.method().clone();
            let path = req.uri().path().to_owned();
            // A WebSocket connect counts against its own limit; the ticket has nothing to learn.
            let _ticket = self
                .reserve_budget(&host, &method, &path, true, outcome)
                .await?;
            return ws::proxy(&self.client, &self.ws, self.ws_signer(), route, req).await;
        }
        let route = self.route(req.uri().path())?;
        outcome.route = Some(&route.prefix);
        self.policy.check(req.method(), req.uri().path())?;
        let upstream = &route.upstream;

        // Reserve, then act: the upstream slot is taken before signing and connecting, and
        // rides in the response body until it ends, so streaming responses count.
        let permit = self.client.reserve().await?;
        let (mut parts, body) = req.into_parts();

        // The request id was set in `handle`; a `Connection: x-request-id` must not drop it.
        let request_id = parts.headers.get(&REQUEST_ID).cloned();
        strip_hop_by_hop(&mut parts.headers);
        strip_client_credentials(&mut parts.headers);
        if let Some(id) = &request_id {
            parts.headers.insert(&REQUEST_ID, id.clone());
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
        // The whole body is read before anything goes upstream: bodies are small (at most
        // max_body_bytes), the 413 is then exact and sent before Coinbase sees a byte, and a
        // request the server did not process can be sent again. A body that stops arriving
        // for body_timeout ends the wait early.
        let body = self
            .read_body(self.timed(body, Direction::Request, request_id.as_ref()))
            .await?;
        // Halt and the pre-trade guard decide on the body as it will be sent, before signing.
        let prices = crate::forward::price::ProductPrices {
            client: &self.client,
            router: &self.router,
        };
        self.guard
            .admit(&parts.method, parts.uri.path(), &body, &prices)
            .await?;
        // Reserve, then act: the budget token is taken before signing and sending, after the
        // checks that refuse without sending (a refused order spends no token).
        let ticket = self
            .reserve_budget(
                &upstream.host,
                &parts.method,
                parts.uri.path(),
                false,
                outcome,
            )
            .await?;
        // Audit (write-ahead): a state-changing request's intent record, with the SHA-256 of
        // the body read above, is on disk before anything is sent.
        if let Some(a) = &self.audit {
            if audit::audited(&parts.method) {
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
                outcome.audit = Some(a.intent(&info, &body).await?);
            }
        }

        let sent = Instant::now();
        let deadline = tokio::time::Instant::now() + self.client.request_timeout();
        let mut resent = false;
        let resp = loop {
            // A fresh token per attempt: the JWT's nonce and time window are single-use.
            let token = self.sign(&parts.method, &upstream.authority, parts.uri.path(), route)?;
            let mut req = Request::new(
                Full::new(body.clone())
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            );
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = parts.uri.clone();
            *req.version_mut() = parts.version;
            *req.headers_mut() = parts.headers.clone();
            if let Some(token) = token {
                let mut value = HeaderValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| ProxyError::Sign)?;
                // Keeps the token out of HPACK tables and hyper's Debug output.
                value.set_sensitive(true);
                req.headers_mut().insert(header::AUTHORIZATION, value);
            }
            match self.client.send_until(&upstream.host, req, deadline).await {
                // Once: the server said it never processed this stream (GOAWAY while
                // rotating its connection, REFUSED_STREAM), so a resend cannot duplicate it.
                Err(UpstreamError::Unprocessed { .. }) if !resent => {
                    resent = true;
                    self.metrics.upstream_resend();
                }
                other => break other,
            }
        };
        outcome.upstream_time = Some(sent.elapsed());
        let (mut parts, body) = resp?.into_parts();
        if let Some(t) = &ticket {
            self.budget
                .observe(t, parts.status.as_u16(), &parts.headers)
                .await;
        }
        self.clock_watch
            .observe(&parts.headers, self.signer.clock_offset());
        strip_hop_by_hop(&mut parts.headers);
        let mut body = self
            .timed(body, Direction::Response, request_id.as_ref())
            .boxed_unsync();
        if let Some(ticket) = outcome.audit.take() {
            body = ticket.tee(parts.status.as_u16(), outcome.upstream_time, body);
        }
        Ok(Response::from_parts(parts, permit.hold(body)))
    }

    /// `body` with the `body_timeout` inactivity timer, counted in `cbgate_timeouts_total`.
    fn timed(
        &self,
        body: Incoming,
        direction: Direction,
        request_id: Option<&HeaderValue>,
    ) -> TimedBody<Incoming> {
        TimedBody::new(
            body,
            self.body_timeout,
            direction,
            self.metrics.timeout_counter("proxy", direction.kind()),
            request_id.cloned(),
        )
    }

    /// Reads the request body whole, up to `max_body_bytes`, within the request timeout.
    async fn read_body(&self, body: TimedBody<Incoming>) -> Result<Bytes, ProxyError> {
        let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
        let within = self.client.request_timeout();
        match tokio::time::timeout(within, Limited::new(body, limit).collect()).await {
            Err(_) => Err(ProxyError::BodyDeadline(within)),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) if e.is::<LengthLimitError>() => Err(ProxyError::BodyTooLarge {
                limit: self.max_body_bytes,
            }),
            Ok(Err(e)) if e.is::<BodyTimeout>() => Err(ProxyError::BodyTimeout {
                after: self.body_timeout,
            }),
            Ok(Err(e)) => Err(ProxyError::BadRequest(format!(
                "reading the request body failed: {e}"
            ))),
        }
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

/// How long the request waited for a budget token, in ms.
static QUEUED_MS: http::HeaderName = http::HeaderName::from_static("x-cbgate-queued-ms");

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
    // Refused rather than stripped: a client that sends one means the other method or path,
    // and forwarding its request as the plain one would silently do something else.
    if let Some((name, what)) = crate::forward::headers::routing_override(req.headers()) {
        return Err(ProxyError::BadRequest(format!(
            "{name} is refused: the policy judges the request {what}, and a server honouring \
             {name} would use another one; send the real {what} in the request line instead"
        )));
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
