//! The request path, phase by phase:
//! check client -> route -> sign -> forward -> stream back -> log.
//!
//! Each phase is a small function; [`Proxy::handle`] runs them in order and turns any
//! [`ProxyError`] into cbgate's JSON error response.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::client::ClientGate;
use crate::config::Config;
use crate::error::ProxyError;
use crate::headers::{strip_client_credentials, strip_hop_by_hop};
use crate::jwt::{self, Binding};
use crate::key::ApiKey;
use crate::policy::{check_path, Policy};
use crate::route::{Route, Router};
use crate::upstream::{SetupError, UpstreamClient};
use crate::ws::{self, WsState};
use crate::Body;
use zeroize::Zeroizing;

/// Everything the request path needs, built once from the configuration.
#[derive(Debug)]
pub struct Proxy {
    router: Router,
    /// Shared with WebSocket relay tasks, which outlive the request.
    key: Option<Arc<ApiKey>>,
    client: UpstreamClient,
    ws: WsState,
    policy: Policy,
    clients: ClientGate,
    max_body_bytes: u64,
    /// Seconds to add to the local clock when minting tokens (measured skew; 0 by default).
    clock_offset: Arc<AtomicI64>,
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
}

/// What the log line of one request reports.
struct Outcome<'a> {
    route: Option<&'a str>,
    upstream_time: Option<Duration>,
}

impl Proxy {
    /// Builds the proxy; `key` is `None` when no key is configured (requests go unsigned).
    pub fn new(cfg: &Config, key: Option<ApiKey>) -> Result<Proxy, BuildError> {
        Ok(Proxy {
            router: Router::with_ws(&cfg.routes, &cfg.ws_routes).map_err(BuildError::Routes)?,
            key: key.map(Arc::new),
            client: UpstreamClient::new(&cfg.upstream)?,
            ws: WsState::new(&cfg.ws),
            policy: Policy::new(&cfg.policy)
                .map_err(|(k, m)| BuildError::Policy(format!("{k}: {m}")))?,
            clients: ClientGate::new(None, &cfg.allowed_origins, &cfg.allowed_hosts),
            max_body_bytes: cfg.max_body_bytes,
            clock_offset: Arc::new(AtomicI64::new(0)),
        })
    }

    /// Requires clients to send `token` as `cbgate-token` (from `client_token_file`).
    pub fn with_client_token(mut self, token: Option<Zeroizing<String>>, cfg: &Config) -> Proxy {
        self.clients = ClientGate::new(token, &cfg.allowed_origins, &cfg.allowed_hosts);
        self
    }

    /// The loaded key, if any.
    pub fn key(&self) -> Option<&ApiKey> {
        self.key.as_deref()
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

    /// A `'static` subscribe-token minter for WebSocket relay tasks (same key and clock offset).
    pub fn ws_signer(&self) -> ws::WsSigner {
        ws::WsSigner::new(self.key.clone(), Arc::clone(&self.clock_offset))
    }

    /// A fresh WebSocket subscribe token (no request binding), or `None` without a key.
    pub fn ws_token(&self) -> Result<Option<String>, ProxyError> {
        self.ws_signer().token()
    }

    /// Sets the clock correction applied to `nbf`/`exp`.
    pub fn set_clock_offset(&self, secs: i64) {
        self.clock_offset.store(secs, Ordering::Relaxed);
    }

    /// Handles one client request; never fails (errors become JSON responses).
    pub async fn handle(&self, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let mut outcome = Outcome {
            route: None,
            upstream_time: None,
        };
        let resp = match self.forward(req, &mut outcome).await {
            Ok(resp) => resp,
            Err(e) => {
                let (status, code) = e.status_and_code();
                tracing::warn!(%method, path, status = status.as_u16(), error = code, reason = %e, "request refused or failed");
                e.into_response()
            }
        };
        tracing::info!(
            %method,
            route = outcome.route.unwrap_or("-"),
            path,
            status = resp.status().as_u16(),
            upstream_ms = outcome.upstream_time.map(|d| d.as_secs_f64() * 1e3),
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "request"
        );
        Ok(resp)
    }

    async fn forward<'a>(
        &'a self,
        req: Request<Incoming>,
        outcome: &mut Outcome<'a>,
    ) -> Result<Response<Body>, ProxyError> {
        if let Some(why) = crate::sniff::rejected(req.uri().path()) {
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
            return ws::proxy(self, route, req).await;
        }
        let route = self.route(req.uri().path())?;
        outcome.route = Some(&route.prefix);
        self.policy.check(req.method(), req.uri().path())?;
        let upstream = &route.upstream;

        let (mut parts, body) = req.into_parts();
        let token = self.sign(&parts.method, &upstream.authority, parts.uri.path(), route)?;

        strip_hop_by_hop(&mut parts.headers);
        strip_client_credentials(&mut parts.headers);
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
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(
            parts,
            body.map_err(Into::into).boxed_unsync(),
        ))
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
        let Some(key) = &self.key else {
            return Ok(None);
        };
        let now = jwt::now_secs(self.clock_offset.load(Ordering::Relaxed));
        let binding = Binding {
            method: method.as_str(),
            host: authority,
            path,
        };
        jwt::mint(key, now, route.upstream.claims, &binding)
            .map(Some)
            .map_err(|_| ProxyError::Sign)
    }
}

/// Refuses requests cbgate must not forward, before any other work.
fn check_request(req: &Request<Incoming>, max_body_bytes: u64) -> Result<(), ProxyError> {
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
