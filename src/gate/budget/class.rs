//! Which of Coinbase's rate limits a request counts against.

use http::Method;

use crate::config::{BudgetConfig, ClassLimit};

/// A family of requests Coinbase limits together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Advanced Trade private REST (`/api/v3/brokerage/...`): 30/s per key.
    AdvancedPrivate,
    /// Advanced Trade public REST (`/api/v3/brokerage/market/...`, `/time`): 10/s per IP.
    AdvancedPublic,
    /// Advanced Trade WebSocket connections: 8/s per IP.
    WsConnect,
    /// Coinbase App v2 (`/v2/...`): 10,000/hour per key.
    AppV2,
    /// CDP v2 reads (GET, HEAD, OPTIONS on `api.cdp.coinbase.com`).
    CdpRead,
    /// CDP v2 writes.
    CdpWrite,
    /// Exchange (`api.exchange.coinbase.com`).
    Exchange,
    /// Prime (`api.prime.coinbase.com`).
    Prime,
    /// International Exchange (`api.international.coinbase.com`).
    Intx,
}

impl Class {
    /// Every class.
    pub const ALL: [Class; 9] = [
        Class::AdvancedPrivate,
        Class::AdvancedPublic,
        Class::WsConnect,
        Class::AppV2,
        Class::CdpRead,
        Class::CdpWrite,
        Class::Exchange,
        Class::Prime,
        Class::Intx,
    ];

    /// The configuration key (`budget.<name>`), also the metric label and the Redis key part.
    pub fn name(self) -> &'static str {
        match self {
            Class::AdvancedPrivate => "advanced_private",
            Class::AdvancedPublic => "advanced_public",
            Class::WsConnect => "ws_connect",
            Class::AppV2 => "app_v2",
            Class::CdpRead => "cdp_read",
            Class::CdpWrite => "cdp_write",
            Class::Exchange => "exchange",
            Class::Prime => "prime",
            Class::Intx => "intx",
        }
    }

    /// Whether Coinbase counts this class per IP address rather than per key: such buckets are
    /// one for the whole gateway, whatever credential signs.
    pub fn per_ip(self) -> bool {
        matches!(self, Class::AdvancedPublic | Class::WsConnect)
    }

    /// This class's configured limit.
    pub fn limit(self, cfg: &BudgetConfig) -> ClassLimit {
        match self {
            Class::AdvancedPrivate => cfg.advanced_private,
            Class::AdvancedPublic => cfg.advanced_public,
            Class::WsConnect => cfg.ws_connect,
            Class::AppV2 => cfg.app_v2,
            Class::CdpRead => cfg.cdp_read,
            Class::CdpWrite => cfg.cdp_write,
            Class::Exchange => cfg.exchange,
            Class::Prime => cfg.prime,
            Class::Intx => cfg.intx,
        }
    }
}

/// The class of a request to `host` (the upstream host name, lower case) for `path`, or `None`
/// when cbgate knows no limit for it (such requests are not budgeted). The host decides for the
/// hosts of one family; the path for `api.coinbase.com` and hosts it does not know (a sandbox,
/// a test resolve), as the routes send Advanced Trade and App paths there.
pub fn classify(host: &str, path: &str, method: &Method, websocket: bool) -> Option<Class> {
    let host = host.split(':').next().unwrap_or(host);
    if websocket {
        return Some(Class::WsConnect);
    }
    let read = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    match host {
        "api.cdp.coinbase.com" => {
            return Some(if read {
                Class::CdpRead
            } else {
                Class::CdpWrite
            })
        }
        "api.exchange.coinbase.com" | "api-public.sandbox.exchange.coinbase.com" => {
            return Some(Class::Exchange)
        }
        "api.prime.coinbase.com" => return Some(Class::Prime),
        "api.international.coinbase.com" | "api-n5e1.coinbase.com" => return Some(Class::Intx),
        _ => {}
    }
    if path == "/api/v3/brokerage/time" || path.starts_with("/api/v3/brokerage/market/") {
        Some(Class::AdvancedPublic)
    } else if path.starts_with("/api/v3/") {
        Some(Class::AdvancedPrivate)
    } else if path.starts_with("/v2/") {
        Some(Class::AppV2)
    } else if path.starts_with("/platform/") {
        Some(if read {
            Class::CdpRead
        } else {
            Class::CdpWrite
        })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_fall_in_their_published_class() {
        let c = |host, path, m: Method| classify(host, path, &m, false);
        let at = "api.coinbase.com";
        assert_eq!(
            c(at, "/api/v3/brokerage/accounts", Method::GET),
            Some(Class::AdvancedPrivate)
        );
        assert_eq!(
            c(at, "/api/v3/brokerage/orders", Method::POST),
            Some(Class::AdvancedPrivate)
        );
        assert_eq!(
            c(at, "/api/v3/brokerage/market/products/BTC-USD", Method::GET),
            Some(Class::AdvancedPublic)
        );
        assert_eq!(
            c(at, "/api/v3/brokerage/time", Method::GET),
            Some(Class::AdvancedPublic)
        );
        // Only the exact public prefix: a private path that merely starts alike is private.
        assert_eq!(
            c(at, "/api/v3/brokerage/marketplace", Method::GET),
            Some(Class::AdvancedPrivate)
        );
        assert_eq!(c(at, "/v2/accounts", Method::GET), Some(Class::AppV2));
        let cdp = "api.cdp.coinbase.com";
        assert_eq!(
            c(cdp, "/platform/v2/evm/accounts", Method::GET),
            Some(Class::CdpRead)
        );
        assert_eq!(
            c(cdp, "/platform/v2/evm/accounts", Method::POST),
            Some(Class::CdpWrite)
        );
        assert_eq!(c(cdp, "/anything", Method::DELETE), Some(Class::CdpWrite));
        assert_eq!(
            c("api.exchange.coinbase.com", "/orders", Method::POST),
            Some(Class::Exchange)
        );
        assert_eq!(
            c("api.prime.coinbase.com", "/v1/portfolios", Method::GET),
            Some(Class::Prime)
        );
        assert_eq!(
            c(
                "api.international.coinbase.com",
                "/api/v1/orders",
                Method::GET
            ),
            Some(Class::Intx)
        );
        // A port does not change the host's family.
        assert_eq!(
            c("api.cdp.coinbase.com:8443", "/platform/x", Method::GET),
            Some(Class::CdpRead)
        );
        // Unknown hosts are classed by path (a sandbox route), or not at all.
        assert_eq!(
            c(
                "api-sandbox.coinbase.com",
                "/api/v3/brokerage/accounts",
                Method::GET
            ),
            Some(Class::AdvancedPrivate)
        );
        assert_eq!(c("example.test", "/other", Method::GET), None);
        assert_eq!(
            classify("advanced-trade-ws.coinbase.com", "/", &Method::GET, true),
            Some(Class::WsConnect)
        );
    }

    #[test]
    fn per_ip_classes_and_names() {
        let per_ip: Vec<&str> = Class::ALL
            .iter()
            .filter(|c| c.per_ip())
            .map(|c| c.name())
            .collect();
        assert_eq!(per_ip, ["advanced_public", "ws_connect"]);
        let cfg = BudgetConfig::default();
        for (name, limit) in cfg.classes() {
            let class = Class::ALL
                .into_iter()
                .find(|c| c.name() == name)
                .expect("every configured class exists");
            assert_eq!(class.limit(&cfg), *limit);
        }
        assert_eq!(Class::AdvancedPrivate.limit(&cfg).per_second(), 30.0);
        assert_eq!(Class::CdpRead.limit(&cfg).per_second(), 60.0);
    }
}
