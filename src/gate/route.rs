//! Routing: the request path alone picks the upstream. The client's `Host` header never does.

use std::sync::Arc;

use crate::config::{BaseUrl, KeyKind, RouteConfig, WsRouteConfig};
use crate::sign::jwt::ClaimStyle;

/// An upstream Coinbase API host.
#[derive(Debug, PartialEq, Eq)]
pub struct Upstream {
    /// Host name: used for DNS (or `upstream.resolve`), SNI and the certificate check.
    pub host: String,
    pub port: u16,
    /// `host`, or `host:port` when the port is not 443: the `Host` header and the JWT's host.
    pub authority: String,
    /// Which request-binding claim Coinbase expects from this host.
    pub claims: ClaimStyle,
    /// Which API family (and so which kind of key) this host takes.
    pub family: KeyKind,
    /// The derivatives gateway: requests carry an access token bought at `public/auth` with
    /// a CDP JWT, not a per-request signature.
    pub token_gateway: bool,
}

impl Upstream {
    /// Parses `https://host[:port]` (a trailing `/` is allowed; no path, query or user info).
    pub fn parse(url: &str) -> Result<Upstream, String> {
        Upstream::parse_scheme(url, "https")
    }

    /// Parses a WebSocket upstream, `wss://host[:port]`.
    pub fn parse_ws(url: &str) -> Result<Upstream, String> {
        Upstream::parse_scheme(url, "wss")
    }

    fn parse_scheme(url: &str, scheme: &str) -> Result<Upstream, String> {
        let BaseUrl { host, port } = BaseUrl::parse(url, scheme)?;
        let authority = if port == 443 {
            host.clone()
        } else {
            format!("{host}:{port}")
        };
        Ok(Upstream {
            claims: ClaimStyle::for_host(&host),
            family: KeyKind::for_host(&host),
            token_gateway: host == "drb.coinbase.com",
            host,
            port,
            authority,
        })
    }
}

/// Marks a request that arrived inside an intercepted `CONNECT` tunnel (`[intercept]`): the
/// tunnel's host, with the path, picks the route.
#[derive(Clone, Debug)]
pub struct Tunnel {
    /// The upstream host named by the `CONNECT`, lower case.
    pub host: Arc<str>,
}

/// A matched route.
#[derive(Debug)]
pub struct Route {
    pub prefix: String,
    pub upstream: Arc<Upstream>,
    /// The credential this route signs with when the request names none.
    pub key: Option<String>,
    /// Whether the prefix (all but its final `/`) is removed before forwarding.
    pub strip_prefix: bool,
}

impl Route {
    /// `upstream_path` (a tunnel's, already in the host's form) as a client of this route
    /// would have sent it: with the stripped prefix put back, so `[[policy.rules]]`, written
    /// against the paths clients send, judge tunnelled requests the same way.
    pub fn client_path(&self, upstream_path: &str) -> String {
        if self.strip_prefix {
            format!("{}{}", self.prefix.trim_end_matches('/'), upstream_path)
        } else {
            upstream_path.to_owned()
        }
    }

    /// The request target as sent upstream: `path_and_query` without the prefix when the
    /// route strips it (`/exchange/orders?x` -> `/orders?x`), else unchanged.
    pub fn upstream_target<'a>(&self, path_and_query: &'a str) -> &'a str {
        if self.strip_prefix {
            // The prefix ends with `/` (checked at load) and matched: keep that `/`.
            let cut = self.prefix.len().saturating_sub(1);
            path_and_query.get(cut..).unwrap_or(path_and_query)
        } else {
            path_and_query
        }
    }
}

/// A WebSocket route: exact path.
#[derive(Debug)]
pub struct WsRoute {
    pub path: String,
    pub upstream: Upstream,
    /// The credential this route signs with when the upgrade request names none.
    pub key: Option<String>,
}

/// The route table, longest prefix first, plus the WebSocket routes.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    ws_routes: Vec<WsRoute>,
}

impl Router {
    /// Builds the REST and WebSocket tables.
    pub fn with_ws(configs: &[RouteConfig], ws: &[WsRouteConfig]) -> Result<Router, String> {
        let mut router = Router::new(configs)?;
        for c in ws {
            router.ws_routes.push(WsRoute {
                path: c.path.clone(),
                upstream: Upstream::parse_ws(&c.upstream)?,
                key: c.key.clone(),
            });
        }
        Ok(router)
    }

    /// The WebSocket route for exactly `path`.
    pub fn find_ws(&self, path: &str) -> Option<&WsRoute> {
        self.ws_routes.iter().find(|r| r.path == path)
    }

    /// The WebSocket route to `host` (a tunnel's host): Coinbase's streams live at `/`, so
    /// the host alone picks it.
    pub fn find_ws_for_host(&self, host: &str) -> Option<&WsRoute> {
        self.ws_routes.iter().find(|r| r.upstream.host == host)
    }

    /// The REST route for `path` inside a tunnel to `host`, where `path` is already the path
    /// the host sees: a route that keeps its prefix when `path` falls under it, else the route
    /// that strips its prefix for that host (e.g. `/exchange/` for api.exchange.coinbase.com),
    /// whose whole path space the host is.
    pub fn find_for_host(&self, path: &str, host: &str) -> Option<&Route> {
        self.find(path)
            .filter(|r| r.upstream.host == host && !r.strip_prefix)
            .or_else(|| {
                self.routes
                    .iter()
                    .find(|r| r.upstream.host == host && r.strip_prefix)
            })
    }

    /// Every upstream host name (REST and WebSocket), each once: what `[intercept]` answers
    /// `CONNECT` for and what the local CA is constrained to.
    pub fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = Vec::new();
        let all = self
            .routes
            .iter()
            .map(|r| &r.upstream.host)
            .chain(self.ws_routes.iter().map(|r| &r.upstream.host));
        for h in all {
            if !hosts.contains(h) {
                hosts.push(h.clone());
            }
        }
        hosts
    }

    /// The configured WebSocket paths, for error messages.
    pub fn ws_paths(&self) -> Vec<&str> {
        self.ws_routes.iter().map(|r| r.path.as_str()).collect()
    }

    /// Builds the REST table; the configuration was validated, but errors are still reported.
    pub fn new(configs: &[RouteConfig]) -> Result<Router, String> {
        let mut routes = Vec::with_capacity(configs.len());
        for c in configs {
            // Routes to the same host share one Upstream.
            let parsed = Upstream::parse(&c.upstream)?;
            let upstream = match routes.iter().find(|r: &&Route| *r.upstream == parsed) {
                Some(r) => Arc::clone(&r.upstream),
                None => Arc::new(parsed),
            };
            routes.push(Route {
                prefix: c.prefix.clone(),
                upstream,
                key: c.key.clone(),
                strip_prefix: c.strip_prefix,
            });
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(Router {
            routes,
            ws_routes: Vec::new(),
        })
    }

    /// The route whose prefix is the longest match for `path`.
    pub fn find(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| path.starts_with(&r.prefix))
    }

    /// The first route to a host of `family` (cbgate's own calls, e.g. `--cancel-open`).
    pub fn find_family(&self, family: KeyKind) -> Option<&Route> {
        self.routes.iter().find(|r| r.upstream.family == family)
    }

    /// The first route to the token-authenticated derivatives gateway, whatever its prefix.
    pub fn find_gateway(&self) -> Option<&Route> {
        self.routes.iter().find(|r| r.upstream.token_gateway)
    }

    /// The configured prefixes, for error messages.
    pub fn prefixes(&self) -> Vec<&str> {
        self.routes.iter().map(|r| r.prefix.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::default_routes;

    #[test]
    fn default_routes_pick_the_right_host() {
        let r = Router::new(&default_routes()).expect("routes");
        let host = |p| r.find(p).map(|r| r.upstream.host.clone());
        assert_eq!(
            host("/api/v3/brokerage/accounts").as_deref(),
            Some("api.coinbase.com")
        );
        assert_eq!(host("/v2/accounts").as_deref(), Some("api.coinbase.com"));
        assert_eq!(
            host("/platform/v1/networks").as_deref(),
            Some("api.cdp.coinbase.com")
        );
        assert_eq!(host("/api/v2/x").as_deref(), Some("drb.coinbase.com"));
        assert!(r
            .find("/api/v2/private/buy")
            .is_some_and(|r| r.upstream.token_gateway));
        let ex = r.find("/exchange/orders").expect("exchange route");
        assert_eq!(ex.upstream.host, "api.exchange.coinbase.com");
        assert_eq!(ex.upstream.family, KeyKind::Exchange);
        assert_eq!(ex.upstream_target("/exchange/orders?a=1"), "/orders?a=1");
        assert_eq!(ex.upstream_target("/exchange/"), "/");
        let prime = r.find("/prime/v1/portfolios").expect("prime route");
        assert_eq!(prime.upstream.family, KeyKind::Prime);
        assert_eq!(
            prime.upstream_target("/prime/v1/portfolios"),
            "/v1/portfolios"
        );
        let intx = r.find("/intx/api/v1/orders").expect("intx route");
        assert_eq!(intx.upstream.family, KeyKind::Intx);
        assert_eq!(
            intx.upstream_target("/intx/api/v1/orders"),
            "/api/v1/orders"
        );
        assert_eq!(
            r.find("/api/v3/brokerage/x")
                .map(|r| r.upstream_target("/api/v3/brokerage/x")),
            Some("/api/v3/brokerage/x")
        );
        assert_eq!(host("/v2"), None);
        assert_eq!(
            r.find("/platform/x").map(|r| r.upstream.claims),
            Some(ClaimStyle::Uris)
        );
    }

    #[test]
    fn longest_prefix_wins() {
        let r = Router::new(&[
            RouteConfig::new("/a/", "https://one.example"),
            RouteConfig::new("/a/b/", "https://two.example:8443"),
        ])
        .expect("routes");
        let up = &r.find("/a/b/c").expect("match").upstream;
        assert_eq!(up.authority, "two.example:8443");
        assert_eq!(
            r.find("/a/c").expect("match").upstream.authority,
            "one.example"
        );
    }

    #[test]
    fn upstream_urls_are_checked() {
        assert!(Upstream::parse("http://api.coinbase.com").is_err());
        assert!(Upstream::parse("https://api.coinbase.com/path").is_err());
        assert!(Upstream::parse("https://u:p@api.coinbase.com").is_err());
        assert_eq!(
            Upstream::parse("https://API.coinbase.com:443/")
                .expect("ok")
                .authority,
            "api.coinbase.com"
        );
    }
}
