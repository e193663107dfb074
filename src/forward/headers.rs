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
pub fn strip_client_credentials(headers: &mut HeaderMap) {
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(header::HOST);
    headers.remove(&crate::gate::client::TOKEN_HEADER);
    headers.remove(KEY_HEADER);
    // A client's own HMAC headers would ride next to cbgate's (or alone, unsigned).
    for name in crate::sign::hmac::HMAC_HEADERS {
        headers.remove(name);
    }
}

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
}
