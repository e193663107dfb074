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
use crate::config::{KeyKind, DEFAULT_KEY};
use crate::error::ProxyError;
use crate::forward::body_timeout::{BodyTimeout, Direction, TimedBody};
use crate::forward::date_watch::DateWatch;
use crate::forward::headers::{strip_client_credentials, strip_hop_by_hop, WALLET_AUTH};
use crate::forward::upstream::{SetupError, UpstreamClient, UpstreamError};
use crate::forward::ws::{self, WsState};
use crate::gate::budget::{self, Budget};
use crate::gate::client::ClientGate;
use crate::gate::guard::Guard;
use crate::gate::halt::{Halt, HaltState};
use crate::gate::halt_shared::SharedHalt;
use crate::gate::identity::{ClientTokens, Identities, Identity, IdentityError, Peer, Recognised};
use crate::gate::policy::{check_path, Policy};
use crate::gate::route::{Route, Router, Tunnel};
use crate::listen::tls::TlsContext;
use crate::ops::audit::{self, Audit, RequestInfo, Ticket};
use crate::ops::metrics::Metrics;
use crate::ops::readiness::Readiness;
use crate::sign::jwt::{Binding, ClaimStyle, Signer};
use crate::sign::key::ApiKey;
use crate::sign::keys::{Credential, Keyring};
use crate::sign::wallet::{self, WalletSecret};
use crate::Body;
use zeroize::Zeroizing;

/// Everything the request path needs, built once from the configuration.
#[derive(Debug)]
pub struct Proxy {
    router: Router,
    /// The key and clock correction; shared with WebSocket relay tasks, which outlive requests.
    signer: Arc<Signer>,
    /// The named credentials (`[keys.NAME]`); `[key]` is `signer`'s, named `default`.
    keys: Arc<Keyring>,
    /// Derivatives gateway access tokens, per credential.
    gateway: crate::forward::gateway::TokenCache,
    client: UpstreamClient,
    ws: WsState,
    policy: Policy,
    clients: ClientGate,
    /// Client identities (`[clients.NAME]`, `client_token_file`): who sent each request.
    identities: Identities,
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
    /// The CDP Wallet Secret: with it cbgate mints `X-Wallet-Auth`; without, a client's passes.
    wallet: Option<WalletSecret>,
    /// TLS towards clients (`https://` listeners, intercepted tunnels), when configured.
    tls: Option<Arc<TlsContext>>,
    /// `[intercept].enabled`: answer CONNECT for the upstream hosts.
    intercept: bool,
    /// The rate budget per credential and class.
    budget: Budget,
    /// The kill switch shared through Redis, when `budget.redis` is set.
    shared_halt: Option<Arc<SharedHalt>>,
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
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Budget(#[from] budget::BudgetError),
}

/// What the log line of one request reports.
struct Outcome<'a> {
    route: Option<&'a str>,
    /// Who sent the request, once recognised.
    identity: Option<Recognised>,
    upstream_time: Option<Duration>,
    /// Set once the intent record is durable; becomes the result record.
    audit: Option<Ticket>,
    /// The name of the credential the request was signed with (`default`, `[keys.NAME]`).
    key: Option<String>,
    /// How long the request waited for a budget token (`x-cbgate-queued-ms`).
    queued: Option<Duration>,
}

impl Proxy {
    /// Builds the proxy; `key` is `None` when no key is configured (requests go unsigned).
    pub fn new(cfg: &Config, key: Option<ApiKey>) -> Result<Proxy, BuildError> {
        let metrics = Metrics::new();
        if key.is_some() {
            metrics.credential_loaded(DEFAULT_KEY, KeyKind::Cdp.as_str());
        }
        let budget = Budget::new(&cfg.budget, None, metrics.budget().clone())?;
        Ok(Proxy {
            router: Router::with_ws(&cfg.routes, &cfg.ws_routes).map_err(BuildError::Routes)?,
            signer: Arc::new(Signer::new(key)),
            keys: Arc::new(Keyring::default()),
            gateway: crate::forward::gateway::TokenCache::default(),
            client: UpstreamClient::new(&cfg.upstream, cfg.pool_max_idle())?,
            ws: WsState::new(&cfg.ws, Arc::clone(metrics.ws())),
            policy: Policy::new(&cfg.policy)
                .map_err(|(k, m)| BuildError::Policy(format!("{k}: {m}")))?,
            clients: ClientGate::new(None, &cfg.allowed_origins, &cfg.allowed_hosts),
            identities: Identities::new(cfg)?,
            max_body_bytes: cfg.max_body_bytes,
            body_timeout: cfg.body_timeout,
            metrics,
            readiness: Readiness::default(),
            clock_watch: DateWatch::default(),
            guard: Guard::from_config(cfg),
            admin_token: None,
            admin_loopback: cfg.admin_listen.ip().is_loopback(),
            audit: Audit::open(&cfg.audit, cfg.upstream.request_timeout)?,
            wallet: None,
            tls: None,
            intercept: cfg.intercept.enabled,
            budget,
            shared_halt: None,
        })
    }

    /// Rebuilds the budget with the Redis password (the content of `budget.redis_password_file`,
    /// read by the binary) and the CA of `budget.redis_ca_file`. Call before serving.
    pub fn with_redis_password(
        mut self,
        access: impl Into<budget::RedisAccess>,
        cfg: &Config,
    ) -> Result<Proxy, BuildError> {
        let access = access.into();
        self.budget = Budget::with_access(&cfg.budget, &access, self.metrics.budget().clone())?;
        Ok(self)
    }

    /// Shares the kill switch through Redis (`budget.redis`, `budget.shared_halt`).
    pub fn with_shared_halt(mut self, shared: Option<Arc<SharedHalt>>) -> Proxy {
        self.shared_halt = shared;
        self
    }

    /// The kill switch's Redis sync, when the halt is shared.
    pub fn shared_halt(&self) -> Option<&Arc<SharedHalt>> {
        self.shared_halt.as_ref()
    }

    /// The rate budget.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Takes a budget token of `class` (from [`budget::classify`]) for `identity`'s request
    /// with `credential`, recording the wait in `outcome`; `Ok(None)` for a request no limit
    /// applies to (`class` is `None`).
    async fn reserve_budget(
        &self,
        class: Option<budget::Class>,
        credential: &str,
        identity: &Identity,
        outcome: &mut Outcome<'_>,
    ) -> Result<Option<budget::Ticket>, ProxyError> {
        let Some(class) = class else {
            return Ok(None);
        };
        // The queue is fair per identity, and `clients.NAME.budget_share` caps one identity.
        let share = identity
            .settings()
            .budget_share
            .and_then(|d| rust_decimal::prelude::ToPrimitive::to_f64(&d));
        match self
            .budget
            .acquire(credential, class, identity.name(), share)
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

    /// Uses `keys` as the named credentials (`[keys.NAME]`, loaded by the caller).
    pub fn with_keys(mut self, keys: Keyring) -> Proxy {
        for k in keys.iter() {
            self.metrics.credential_loaded(k.name(), k.kind().as_str());
        }
        self.keys = Arc::new(keys);
        self
    }

    /// The named credentials.
    pub fn keys(&self) -> &Arc<Keyring> {
        &self.keys
    }

    /// The derivatives gateway's access tokens.
    pub fn gateway_tokens(&self) -> &crate::forward::gateway::TokenCache {
        &self.gateway
    }

    /// Uses `tls` for the `https://` listeners and intercepted tunnels.
    pub fn with_tls(mut self, tls: Arc<TlsContext>) -> Proxy {
        self.tls = Some(tls);
        self
    }

    /// TLS towards clients, when configured.
    pub fn tls(&self) -> Option<&Arc<TlsContext>> {
        self.tls.as_ref()
    }

    /// Whether `CONNECT` is intercepted (`[intercept].enabled`).
    pub fn intercepts(&self) -> bool {
        self.intercept
    }

    /// Checks a `CONNECT` under `[intercept]` and returns the upstream host to terminate TLS
    /// for: only the configured upstream host names on port 443 pass (403 otherwise: cbgate
    /// never tunnels bytes it cannot sign), and the client token is checked here, once for the
    /// whole tunnel: the client identity recognised here (its token as `cbgate-token` or as
    /// the `Proxy-Authorization: Basic` password) is the identity of every request inside.
    pub fn connect_target(
        &self,
        req: &Request<Incoming>,
    ) -> Result<(String, Recognised), ProxyError> {
        let target = req
            .uri()
            .authority()
            .map(|a| (a.host().to_ascii_lowercase(), a.port_u16()));
        let hosts = self.router.hosts();
        let (host, port) = target.ok_or_else(|| {
            ProxyError::BadRequest("CONNECT needs a host:port target (RFC 9110 §9.3.6)".into())
        })?;
        if port != Some(443) || !hosts.contains(&host) {
            return Err(ProxyError::ConnectRefused(format!(
                "CONNECT {}:{} refused: cbgate tunnels only to the Coinbase hosts it signs for, on port 443 ({}); it never passes on bytes it cannot sign",
                host,
                port.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                hosts.join(", ")
            )));
        }
        self.clients.check_connect(req.headers())?;
        let peer = req.extensions().get::<Peer>().copied();
        let who = self.identities.recognise_connect(req.headers(), peer)?;
        if self.tls.as_ref().and_then(|t| t.ca()).is_none() {
            return Err(ProxyError::BadRequest(
                "intercept needs the local CA, which could not be set up (see the start-up log)"
                    .into(),
            ));
        }
        Ok((host, who))
    }

    /// cbgate's error response for a refused request, logged and counted like every other.
    pub fn refusal(&self, method: &Method, path: &str, e: ProxyError) -> Response<Body> {
        let (status, code) = e.status_and_code();
        self.count_error(&e);
        tracing::warn!(%method, path, status = status.as_u16(), error = code, reason = %e, "request refused or failed");
        let mut resp = e.into_response();
        self.metrics
            .request("-", method, resp.status().as_u16(), Duration::ZERO);
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        resp
    }

    /// Requires clients to send `token` as `cbgate-token` (from `client_token_file`): the
    /// client identity `default`. `cfg` is no longer read (kept for callers).
    pub fn with_client_token(mut self, token: Option<Zeroizing<String>>, _cfg: &Config) -> Proxy {
        self.identities.set_default_token(token);
        self
    }

    /// Mints `X-Wallet-Auth` with `wallet` for the CDP v2 requests the CDP SDKs sign
    /// (`key.wallet_secret_file` or `CDP_WALLET_SECRET`), replacing any the client sent.
    pub fn with_wallet_secret(mut self, wallet: Option<WalletSecret>) -> Proxy {
        self.wallet = wallet;
        self
    }

    /// Sets the client identities' tokens (`clients.NAME.token_file`, read with
    /// [`ClientTokens::read`]); two identities with one token are an error.
    pub fn with_client_tokens(mut self, tokens: ClientTokens) -> Result<Proxy, BuildError> {
        self.identities = self.identities.with_tokens(tokens)?;
        Ok(self)
    }

    /// The client identities.
    pub fn identities(&self) -> &Identities {
        &self.identities
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
            identity: None,
            upstream_time: None,
            audit: None,
            key: None,
            queued: None,
        };
        let mut resp = match self.forward(req, &mut outcome).await {
            Ok(resp) => resp,
            Err(e) => {
                let (status, code) = e.status_and_code();
                self.count_error(&e);
                let identity = outcome.identity.as_ref().map_or("-", |r| r.identity.name());
                tracing::warn!(request_id = rid, identity, %method, path, status = status.as_u16(), error = code, reason = %e, "request refused or failed");
                // Audit: every refusal (policy, guard, kill switch, ...) and every failed
                // forwarded request is recorded here, the one place errors become responses.
                if let Some(a) = &self.audit {
                    let key = self.signer.key();
                    let info = RequestInfo {
                        request_id: &rid,
                        identity: outcome.identity.as_ref().map(|r| r.identity.name()),
                        // A refused key_not_allowed records the key asked for, not [key]'s.
                        key: match &e {
                            ProxyError::KeyNotAllowed { key, .. } => Some(key.as_str()),
                            _ => outcome.key.as_deref().or(key.as_deref().map(|k| k.name())),
                        },
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
        let key_name = outcome.key.as_deref().unwrap_or("-");
        let total = started.elapsed();
        self.metrics
            .request(route, &method, resp.status().as_u16(), total);
        if let Some(t) = outcome.upstream_time {
            self.metrics.upstream(route, t);
        }
        let (identity, by) = outcome
            .identity
            .as_ref()
            .map_or(("-", "-"), |r| (r.identity.name(), r.by.as_str()));
        self.metrics
            .client_request(identity, route, &method, resp.status().as_u16());
        if let Some(k) = outcome.key.as_deref() {
            self.metrics
                .key_request(k, identity, resp.status().as_u16());
        }
        tracing::info!(
            request_id = rid,
            identity,
            identified_by = by,
            %method,
            route,
            key = key_name,
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
        let tunnel = req.extensions().get::<Tunnel>().cloned();
        check_request(
            &req,
            self.max_body_bytes,
            self.intercept && tunnel.is_none(),
        )?;
        // Origin and Host first: a page in a browser (DNS rebinding) must not learn from the
        // answer whether a guessed token is some identity's.
        match &tunnel {
            Some(t) => self
                .clients
                .check_tunnel(req.uri(), req.headers(), &t.host)?,
            None => self.clients.check(req.uri(), req.headers())?,
        }
        // Before anything reads or strips the credentials: a client's `Authorization: Bearer`
        // is read here as an identity token and removed before forwarding (cbgate's own
        // signature replaces it); the Unix peer was taken at accept. Inside an intercepted
        // tunnel the identity is the one recognised at its CONNECT (the SDK inside sends its
        // own credentials, never cbgate's token).
        let who = match (&tunnel, req.extensions().get::<Recognised>()) {
            (Some(_), Some(at_connect)) => at_connect.clone(),
            _ => {
                let peer = req.extensions().get::<Peer>().copied();
                self.identities.recognise(req.headers(), peer)?
            }
        };
        let identity = Arc::clone(&who.identity);
        outcome.identity = Some(who);
        check_path(req.uri().path()).map_err(ProxyError::InvalidPath)?;
        if ws::is_upgrade(&req) {
            let found = match &tunnel {
                Some(t) => self.router.find_ws_for_host(&t.host),
                None => self.router.find_ws(req.uri().path()),
            };
            let route = found.ok_or_else(|| ProxyError::NoRoute {
                path: req.uri().path().to_owned(),
                prefixes: self.router.ws_paths().join(", "),
            })?;
            outcome.route = Some(&route.path);
            identity.check(&self.policy, req.method(), req.uri().path())?;
            let selected = self.select(
                req.headers(),
                route.key.as_ref(),
                route.upstream.family,
                &route.upstream.host,
                &identity,
            )?;
            outcome.key = selected.name();
            // The session slot first: an upgrade refused for ws.max_sessions spends no token.
            let reserved = ws::reserve(&self.ws, &req)?;
            // A WebSocket connect counts against its own limit; the ticket has nothing to learn.
            let (host, method, path) = (
                route.upstream.host.clone(),
                req.method().clone(),
                req.uri().path().to_owned(),
            );
            let credential = selected.budget_id(&self.signer);
            let _ticket = self
                .reserve_budget(
                    budget::classify(&host, &path, &method, true),
                    &credential,
                    &identity,
                    outcome,
                )
                .await?;
            let signer = match selected {
                Selected::Named(_, cred) => self.ws_signer().with_credential(cred),
                // No key: subscribes pass unsigned (public channels).
                Selected::Unsigned | Selected::Default => self.ws_signer(),
            };
            return ws::proxy_reserved(&self.client, &self.ws, signer, route, req, reserved).await;
        }
        let route = match &tunnel {
            Some(t) => self
                .router
                .find_for_host(req.uri().path(), &t.host)
                .ok_or_else(|| ProxyError::NoRoute {
                    path: format!("{}{}", t.host, req.uri().path()),
                    prefixes: self.router.prefixes().join(", "),
                })?,
            None => self.route(req.uri().path())?,
        };
        outcome.route = Some(&route.prefix);
        let sent = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        // Inside a tunnel the client already speaks the host's paths: nothing to strip, and the
        // rules see the path as it would have come through the route's prefix.
        let (target, client_path) = match &tunnel {
            Some(_) => (sent.to_owned(), route.client_path(req.uri().path())),
            None => (
                route.upstream_target(sent).to_owned(),
                req.uri().path().to_owned(),
            ),
        };
        let upstream_path = target.split_once('?').map_or(target.as_str(), |(p, _)| p);
        identity.check_on(
            &self.policy,
            req.method(),
            &client_path,
            route.upstream.family,
            upstream_path,
            route.upstream.token_gateway,
        )?;
        let local_auth = route.upstream.token_gateway
            && crate::gate::policy::match_form(upstream_path) == crate::forward::gateway::AUTH_PATH;
        // Chosen before anything is read or reserved: a wrong name costs nothing.
        let selected = self.select_key(req.headers(), route, &identity)?;
        outcome.key = selected.name();
        let credential = selected.budget_id(&self.signer);
        let upstream = &route.upstream;

        // Reserve, then act: the upstream slot is taken before signing and connecting, and
        // rides in the response body until it ends, so streaming responses count.
        let permit = self.client.reserve().await?;
        let (mut parts, body) = req.into_parts();

        // The request id was set in `handle`; a `Connection: x-request-id` must not drop it.
        let request_id = parts.headers.get(&REQUEST_ID).cloned();
        strip_hop_by_hop(&mut parts.headers);
        strip_client_credentials(&mut parts.headers);
        // cbgate holds the wallet secret: a client's token (signed with a placeholder, for
        // cbgate's host) never goes up, whether or not this request gets cbgate's own.
        if self.wallet.is_some() {
            parts.headers.remove(&WALLET_AUTH);
        }
        if let Some(id) = &request_id {
            parts.headers.insert(&REQUEST_ID, id.clone());
        }
        // Path and query go upstream byte for byte, as the client sent them (less the
        // route's prefix when it strips it).
        parts.uri = Uri::builder()
            .scheme("https")
            .authority(upstream.authority.as_str())
            .path_and_query(target.as_str())
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
        // The client's own token exchange: answered here, so the real token never leaves.
        if local_auth && !matches!(selected, Selected::Unsigned) {
            let mut resp = Response::new(
                Full::new(Bytes::from(crate::forward::gateway::local_auth_answer(
                    &body,
                )))
                .map_err(|never| match never {})
                .boxed_unsync(),
            );
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return Ok(resp);
        }
        // Halt and the pre-trade guard decide on the body as it will be sent, before signing.
        // The order's own upstream, so its family's table and its family's prices apply.
        let prices = crate::forward::price::ProductPrices {
            client: &self.client,
            upstream,
        };
        let who = crate::gate::guard::Sender {
            identity: identity.name(),
            key: outcome.key.as_deref(),
        };
        let to = crate::gate::guard::Target {
            family: upstream.family,
            gateway: upstream.token_gateway,
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query(),
        };
        self.guard.admit(&to, &body, &who, &prices).await?;
        // Reserve, then act: the budget token is taken before signing and sending, after the
        // checks that refuse without sending (a refused order spends no token).
        let ticket = self
            .reserve_budget(
                budget::classify(&upstream.host, parts.uri.path(), &parts.method, false),
                &credential,
                &identity,
                outcome,
            )
            .await?;
        // Audit (write-ahead): a state-changing request's intent record, with the SHA-256 of
        // the body read above, is on disk before anything is sent.
        if let Some(a) = &self.audit {
            if audit::audited(&parts.method) {
                let key = self.signer.key();
                let info = RequestInfo {
                    identity: Some(identity.name()),
                    request_id: parts
                        .headers
                        .get(&REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-"),
                    // The credential's CDP key name (as before) or its [keys.NAME] name.
                    key: match &selected {
                        Selected::Named(..) => outcome.key.as_deref(),
                        _ => key.as_deref().map(|k| k.name()),
                    },
                    method: &parts.method,
                    path: parts.uri.path(),
                    query: parts.uri.query(),
                };
                outcome.audit = Some(a.intent(&info, &body).await?);
            }
        }

        // The body's hash for X-Wallet-Auth, when this is a request the CDP SDKs wallet-sign.
        let wallet_hash = match &self.wallet {
            Some(_)
                if route.upstream.claims == ClaimStyle::Uris
                    && wallet::requires_wallet_auth(parts.method.as_str(), parts.uri.path()) =>
            {
                Some(wallet::req_hash(&body).map_err(|e| ProxyError::BadRequest(e.to_string()))?)
            }
            _ => None,
        };

        let sent = Instant::now();
        let deadline = tokio::time::Instant::now() + self.client.request_timeout();
        let mut resent = false;
        // The derivatives gateway's token a 401 refused, once: the next attempt exchanges anew.
        let mut refused_token: Option<Zeroizing<String>> = None;
        let mut refreshed = false;
        let resp = loop {
            // A fresh token per attempt: the JWT's nonce and time window are single-use.
            let auth = self
                .authorize(
                    &selected,
                    &parts.method,
                    route,
                    &target,
                    &body,
                    refused_token.as_deref().map(|s| s.as_str()),
                )
                .await?;
            let gateway_token = match (&auth, route.upstream.token_gateway) {
                (Auth::Bearer(t), true) => Some(Zeroizing::new(t.clone())),
                _ => None,
            };
            let mut req = Request::new(
                Full::new(body.clone())
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            );
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = parts.uri.clone();
            *req.version_mut() = parts.version;
            *req.headers_mut() = parts.headers.clone();
            match auth {
                Auth::None => {}
                Auth::Bearer(token) => {
                    let mut value = HeaderValue::try_from(format!("Bearer {token}"))
                        .map_err(|_| ProxyError::Sign)?;
                    // Keeps the token out of HPACK tables and hyper's Debug output.
                    value.set_sensitive(true);
                    req.headers_mut().insert(header::AUTHORIZATION, value);
                }
                Auth::Hmac(fields) => {
                    for (name, value) in *fields {
                        req.headers_mut().insert(name, value);
                    }
                }
            }
            if let (Some(w), Some(hash)) = (&self.wallet, &wallet_hash) {
                let now = crate::sign::jwt::now_secs(self.signer.clock_offset());
                let token = w
                    .mint(
                        now,
                        parts.method.as_str(),
                        &upstream.authority,
                        parts.uri.path(),
                        hash.as_deref(),
                    )
                    .map_err(|_| ProxyError::Sign)?;
                let mut value = HeaderValue::try_from(token).map_err(|_| ProxyError::Sign)?;
                value.set_sensitive(true);
                req.headers_mut().insert(&WALLET_AUTH, value);
            }
            match self.client.send_until(&upstream.host, req, deadline).await {
                // Once: the server said it never processed this stream (GOAWAY while
                // rotating its connection, REFUSED_STREAM), so a resend cannot duplicate it.
                Err(UpstreamError::Unprocessed { .. }) if !resent => {
                    resent = true;
                    self.metrics.upstream_resend();
                }
                // The gateway revoked or expired the token early: exchange a new one and send
                // again, once (a 401 on the new token goes to the client).
                Ok(r)
                    if r.status() == http::StatusCode::UNAUTHORIZED
                        && gateway_token.is_some()
                        && !refreshed =>
                {
                    refreshed = true;
                    refused_token = gateway_token;
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

    /// The credential for this request: the `cbgate-key` header, else the route's `key`,
    /// else the identity's `default_key`, else `default` (`[key]`); the identity must be
    /// allowed it (`clients.NAME.keys`) and it must be of the route's family.
    fn select_key(
        &self,
        headers: &http::HeaderMap,
        route: &Route,
        identity: &Identity,
    ) -> Result<Selected, ProxyError> {
        self.select(
            headers,
            route.key.as_ref(),
            route.upstream.family,
            &route.upstream.host,
            identity,
        )
    }

    fn select(
        &self,
        headers: &http::HeaderMap,
        route_key: Option<&String>,
        family: KeyKind,
        host: &str,
        identity: &Identity,
    ) -> Result<Selected, ProxyError> {
        let header = headers.get(crate::forward::headers::KEY_HEADER);
        let (name, from) = match (header, route_key) {
            (Some(v), _) => {
                let name = v
                    .to_str()
                    .ok()
                    .map(str::trim)
                    .filter(|n| crate::config::valid_key_name(n))
                    .ok_or_else(|| {
                        ProxyError::BadRequest(
                            "the cbgate-key header must be a credential name (1-64 of A-Z a-z 0-9 _ -)".into(),
                        )
                    })?;
                (name.to_owned(), "the cbgate-key header")
            }
            (None, Some(k)) => (k.clone(), "the route's key"),
            (None, None) => match &identity.settings().default_key {
                Some(k) => (k.clone(), "the identity's default_key"),
                None => (DEFAULT_KEY.to_owned(), "the default"),
            },
        };
        // Before the name is looked up: an identity limited to some credentials learns
        // nothing about the others (not even which names exist).
        if !identity.settings().may_use(&name) {
            return Err(ProxyError::KeyNotAllowed {
                key: if crate::config::looks_like_key_material(&name) {
                    crate::config::shown(&name)
                } else {
                    name.clone()
                },
                from,
                identity: identity.name().to_owned(),
                allowed: identity
                    .settings()
                    .keys
                    .as_deref()
                    .unwrap_or_default()
                    .join(", "),
            });
        }
        let mismatch = |kind: KeyKind| ProxyError::KeyKindMismatch {
            name: name.clone(),
            from,
            kind: kind.as_str(),
            host: host.to_owned(),
            family: family.as_str(),
        };
        if name == DEFAULT_KEY {
            return match self.signer.key() {
                // No [key] at all: forwarded unsigned, as before named keys existed.
                None => Ok(Selected::Unsigned),
                Some(_) if family != KeyKind::Cdp => Err(mismatch(KeyKind::Cdp)),
                Some(_) => Ok(Selected::Default),
            };
        }
        let Some(named) = self.keys.get(&name) else {
            let mut known = self.keys.names();
            known.insert(0, DEFAULT_KEY);
            return Err(ProxyError::UnknownKey {
                // Logged and returned: a pasted secret is not repeated.
                name: crate::config::shown(&name),
                from,
                known: known.join(", "),
            });
        };
        let cred = named.current();
        if cred.kind() != family {
            return Err(mismatch(cred.kind()));
        }
        Ok(Selected::Named(name, cred))
    }

    /// The credentials for one attempt: a fresh JWT, or fresh HMAC headers over the exact
    /// bytes sent (`target` as sent upstream, `body` as forwarded).
    async fn authorize(
        &self,
        selected: &Selected,
        method: &Method,
        route: &Route,
        target: &str,
        body: &[u8],
        refused: Option<&str>,
    ) -> Result<Auth, ProxyError> {
        let path = target.split_once('?').map_or(target, |(p, _)| p);
        let binding = Binding {
            method: method.as_str(),
            host: &route.upstream.authority,
            path,
        };
        let started = Instant::now();
        let now = crate::sign::jwt::now_secs(self.signer.clock_offset());
        if route.upstream.token_gateway {
            let default_key = self.signer.key();
            // The cache is per name and key fingerprint.
            let (name, key): (&str, &ApiKey) = match selected {
                Selected::Unsigned => return Ok(Auth::None),
                Selected::Default => match default_key.as_deref() {
                    Some(k) => (DEFAULT_KEY, k),
                    None => return Ok(Auth::None),
                },
                Selected::Named(n, cred) => match cred.as_ref() {
                    Credential::Cdp(k) => (n.as_str(), k),
                    // Checked in select_key: a gateway route's family is cdp.
                    Credential::Hmac(_) => return Err(ProxyError::Sign),
                },
            };
            let token = self
                .gateway
                .token(name, key, now, &self.client, &route.upstream, refused)
                .await
                .map_err(|e| ProxyError::Gateway(e.to_string()))?;
            return Ok(Auth::Bearer(token.to_string()));
        }
        let auth = match selected {
            Selected::Unsigned => Auth::None,
            Selected::Default => match self
                .signer
                .mint(route.upstream.claims, &binding)
                .map_err(|_| ProxyError::Sign)?
            {
                Some(t) => Auth::Bearer(t),
                None => Auth::None,
            },
            Selected::Named(_, cred) => match cred.as_ref() {
                Credential::Cdp(key) => Auth::Bearer(
                    crate::sign::jwt::mint(key, now, route.upstream.claims, &binding)
                        .map_err(|_| ProxyError::Sign)?,
                ),
                Credential::Hmac(key) => Auth::Hmac(Box::new(
                    key.headers(now, method.as_str(), target, body)
                        .map_err(|_| ProxyError::Sign)?,
                )),
            },
        };
        if let Auth::Bearer(_) = auth {
            self.metrics.jwt_signed(started.elapsed());
        }
        Ok(auth)
    }
}

/// Which credential a request signs with.
enum Selected {
    /// None configured: forwarded unsigned.
    Unsigned,
    /// `[key]`, read from the signer at each attempt (so a rotation mid-request is used).
    Default,
    /// A `[keys.NAME]` credential, as loaded when the request was routed.
    Named(String, Arc<Credential>),
}

impl Selected {
    /// What the rate budget keys this credential's buckets by: its public fingerprint, the
    /// same in every replica that holds the same key (config names may differ), and different
    /// for different keys.
    fn budget_id(&self, signer: &Signer) -> String {
        match self {
            Selected::Unsigned => "unsigned".to_owned(),
            Selected::Default => signer
                .key()
                .map_or_else(|| "unsigned".to_owned(), |k| k.fingerprint().to_owned()),
            Selected::Named(_, cred) => cred.fingerprint(),
        }
    }

    /// The credential's name, for logs and the audit log.
    fn name(&self) -> Option<String> {
        match self {
            Selected::Unsigned => None,
            Selected::Default => Some(DEFAULT_KEY.to_owned()),
            Selected::Named(n, _) => Some(n.clone()),
        }
    }
}

/// What one attempt carries.
enum Auth {
    None,
    Bearer(String),
    Hmac(Box<[(http::HeaderName, HeaderValue); 4]>),
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

/// Refuses requests cbgate must not forward, before any other work. `absolute_ok`: with
/// `[intercept]`, an HTTP/1 absolute-form target naming cbgate itself (`http://127.0.0.1:8750/...`,
/// from an `HTTP_PROXY` pointing at cbgate) is accepted (RFC 9112 §3.2.2: the target's
/// authority then stands for Host, and the client gate checks it like a Host).
fn check_request(
    req: &Request<Incoming>,
    max_body_bytes: u64,
    absolute_ok: bool,
) -> Result<(), ProxyError> {
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
            "CONNECT is not supported: cbgate is a reverse proxy, send plain requests such as GET /api/v3/brokerage/accounts (or set intercept.enabled = true to use cbgate as HTTPS_PROXY)".into(),
        ));
    }
    // HTTP/2 always carries :scheme and :authority; in HTTP/1 they mean absolute-form, which
    // only forward proxies accept.
    let absolute = req.uri().scheme().is_some() || req.uri().authority().is_some();
    if req.version() < Version::HTTP_2 && absolute && absolute_ok {
        if req.uri().scheme_str() != Some("http") {
            return Err(ProxyError::BadRequest(
                "absolute-form request target refused: only http:// targets naming cbgate itself are accepted; reach Coinbase hosts through CONNECT (HTTPS_PROXY)".into(),
            ));
        }
    } else if req.version() < Version::HTTP_2 && absolute {
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
