//! Header hygiene between client and upstream.

use http::header::{self, HeaderMap, HeaderName};

/// Removes hop-by-hop fields, which describe one connection and must not be forwarded.
///
/// RFC 9110 §7.6.1: "Intermediaries MUST parse a received Connection header field before a
/// message is forwarded and, for each connection-option in this field, remove any header or
/// trailer field(s) from the message with the same name as the connection-option, and then
/// remove the Connection header field itself (or replace it with the intermediary's own control
/// options for the forwarded message)." The same section names Proxy-Connection, Keep-Alive,
/// TE, Transfer-Encoding and Upgrade as fields a proxy must not forward either.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// Fields that frameworks read as the request's real method or path, with what they override:
/// the method ones from Symfony, ASP.NET, Express `method-override` and Google front ends, the
/// path ones from IIS URL Rewrite and (older) Symfony. cbgate's policy judges the request line;
/// a server honouring one of these would run a DELETE the policy saw as a GET, or route to a
/// path it never saw.
pub const ROUTING_OVERRIDES: [(&str, &str); 5] = [
    ("x-http-method-override", "method"),
    ("x-http-method", "method"),
    ("x-method-override", "method"),
    ("x-original-url", "path"),
    ("x-rewrite-url", "path"),
];

/// The first method- or path-override field the request carries, and what it overrides.
pub fn routing_override(headers: &HeaderMap) -> Option<(&'static str, &'static str)> {
    ROUTING_OVERRIDES
        .into_iter()
        .find(|(name, _)| headers.contains_key(*name))
}

/// Removes what a client must not be able to send to Coinbase through cbgate: its own
/// credentials (cbgate's token replaces them), its `cbgate-token`, and the `Host` (the route
/// chooses the upstream).
///
/// Credentials are every field any Coinbase API reads as one: `Authorization` (the JWT
/// families), `CB-ACCESS-*` (Exchange and International Exchange HMAC: key, sign, timestamp,
/// passphrase) and `X-CB-ACCESS-*` (Prime). A client holding a placeholder key signs with it;
/// forwarding those fields next to cbgate's would at best confuse the server and at worst let
/// a client's own (real) credential through unseen by the policy. `X-Wallet-Auth` is handled
/// by the caller: it passes when cbgate holds no wallet secret (see `sign::wallet`).
pub fn strip_client_credentials(headers: &mut HeaderMap) {
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(header::HOST);
    headers.remove(&crate::gate::client::TOKEN_HEADER);
    headers.remove(KEY_HEADER);
    // A client's own HMAC headers would ride next to cbgate's (or alone, unsigned).
    let hmac: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hmac_credential(name.as_str()))
        .cloned()
        .collect();
    for name in hmac {
        headers.remove(name);
    }
}

/// `CB-ACCESS-*` or `X-CB-ACCESS-*` (header names arrive lower-cased).
fn is_hmac_credential(name: &str) -> bool {
    name.starts_with("cb-access-") || name.starts_with("x-cb-access-")
}

/// The CDP wallet-auth header, which cbgate replaces when it holds the wallet secret.
pub static WALLET_AUTH: HeaderName = HeaderName::from_static("x-wallet-auth");

/// The request header that picks a credential by name; never forwarded.
pub const KEY_HEADER: &str = "cbgate-key";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_connection_and_the_fields_it_names() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, X-Secret-Hop".parse().expect("v"),
        );
        h.append(header::CONNECTION, "close".parse().expect("v"));
        h.insert("x-secret-hop", "1".parse().expect("v"));
        h.insert("keep-alive", "timeout=5".parse().expect("v"));
        h.insert(header::TE, "trailers".parse().expect("v"));
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().expect("v"));
        h.insert("proxy-connection", "keep-alive".parse().expect("v"));
        h.insert(header::UPGRADE, "h2c".parse().expect("v"));
        h.insert("x-ratelimit-remaining", "5".parse().expect("v"));
        h.insert(header::CONTENT_TYPE, "application/json".parse().expect("v"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["content-type", "x-ratelimit-remaining"]);
    }

    #[test]
    fn every_client_credential_is_removed() {
        let mut h = HeaderMap::new();
        for name in [
            "authorization",
            "proxy-authorization",
            "host",
            "cbgate-token",
            "CB-ACCESS-KEY",
            "CB-ACCESS-SIGN",
            "CB-ACCESS-TIMESTAMP",
            "CB-ACCESS-PASSPHRASE",
            "X-CB-ACCESS-KEY",
            "X-CB-ACCESS-SIGNATURE",
            "X-CB-ACCESS-TIMESTAMP",
            "X-CB-ACCESS-PASSPHRASE",
        ] {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                "client".parse().expect("v"),
            );
        }
        // Twice: every value of a repeated field goes.
        h.append("cb-access-sign", "again".parse().expect("v"));
        // Not credentials: kept.
        h.insert("cb-version", "2024-01-01".parse().expect("v"));
        h.insert("x-cb-accessibility", "1".parse().expect("v"));
        h.insert("x-wallet-auth", "w".parse().expect("v"));
        h.insert(header::CONTENT_TYPE, "application/json".parse().expect("v"));
        strip_client_credentials(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            vec![
                "cb-version",
                "content-type",
                "x-cb-accessibility",
                "x-wallet-auth"
            ]
        );
    }
}
