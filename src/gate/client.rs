//! The check-client phase: only the right local clients get in.
//!
//! - A client token (`client_token_file`), when configured, must arrive as `cbgate-token`;
//!   it is compared in constant time and never forwarded.
//! - Browsers are hostile clients of a localhost service: a web page can make the browser send
//!   simple cross-site requests (no preflight), and DNS rebinding can let it read the answers.
//!   Any request with an `Origin` not listed in `allowed_origins` is refused, and so is any
//!   request whose `Host` is not a loopback name or address (or listed in `allowed_hosts`):
//!   a rebinding attack always carries the attacker's own host name.
//! - Browsers send no Origin on cross-site GETs of the `no-cors` kind (`<img src>`, `<script>`,
//!   a link), but they do send `Sec-Fetch-Site`. Without an Origin, anything but `same-origin`
//!   or `none` (typed into the address bar) is refused like a foreign Origin. With an Origin,
//!   the Origin check has decided already (an allowed `http://localhost:3000` is `same-site`).

use std::fmt;
use std::net::IpAddr;

use http::{header, HeaderMap, HeaderName, Uri};
use zeroize::Zeroizing;

/// The header carrying the client token.
pub static TOKEN_HEADER: HeaderName = HeaderName::from_static("cbgate-token");

/// Fetch metadata: how the browser relates the request's initiator to its target.
static SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// A client refused by the check-client phase.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("missing or wrong cbgate-token header: this cbgate requires a client token")]
    Token,
    /// No configured client identity matched and one is required (`clients.require`).
    #[error("{}", no_identity(*.token_sent, *.peer))]
    NoIdentity {
        /// Whether a token was sent (it matched no identity).
        token_sent: bool,
        /// The Unix peer's uid and gid, on a Unix socket.
        peer: Option<(u32, u32)>,
    },
    /// Two `cbgate-token` (or `Authorization`) headers: which one counts would be a guess.
    #[error("the request carries more than one {0} header; send exactly one")]
    Ambiguous(&'static str),
    #[error("Origin {0:?} is not allowed: browsers' cross-site requests are refused (add it to allowed_origins to allow it)")]
    Origin(String),
    /// A browser's cross-site request that carries no Origin (an image, a script, a link).
    #[error("Sec-Fetch-Site {0:?} without an allowed Origin: browsers' cross-site requests are refused (a page that must call cbgate has to send its Origin, listed in allowed_origins)")]
    CrossSite(String),
    #[error("Host {0:?} is not a loopback name: requests through DNS rebinding are refused (add it to allowed_hosts if clients reach cbgate by that name)")]
    Host(String),
    /// RFC 9112 §3.2: a request without exactly one Host gets 400.
    #[error("the request must carry exactly one Host header (RFC 9112 §3.2)")]
    HostCount,
}

fn no_identity(token_sent: bool, peer: Option<(u32, u32)>) -> String {
    let what = match (token_sent, peer) {
        (true, _) => "the token sent (cbgate-token or Authorization: Bearer) matches no client identity".to_owned(),
        (false, Some((uid, gid))) => format!(
            "no token was sent and the Unix peer (uid {uid}, gid {gid}) is no client identity's unix_uid or unix_gid"
        ),
        (false, None) => "no token was sent (cbgate-token or Authorization: Bearer)".to_owned(),
    };
    format!(
        "{what}; this cbgate serves only configured client identities (clients.require = true): \
         send an identity's token, or connect over the Unix socket as a configured unix_uid/unix_gid"
    )
}

/// Who may use cbgate.
pub struct ClientGate {
    token: Option<Zeroizing<String>>,
    allowed_origins: Vec<String>,
    allowed_hosts: Vec<String>,
    ip_hosts: bool,
}

impl fmt::Debug for ClientGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientGate")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("allowed_origins", &self.allowed_origins)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("ip_hosts", &self.ip_hosts)
            .finish()
    }
}

impl ClientGate {
    /// `token`: the client token, when one is configured.
    pub fn new(
        token: Option<Zeroizing<String>>,
        allowed_origins: &[String],
        allowed_hosts: &[String],
    ) -> ClientGate {
        ClientGate {
            token,
            allowed_origins: allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            allowed_hosts: allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            ip_hosts: false,
        }
    }

    /// Also accepts any IP-address `Host` (for the admin listener, which Kubernetes httpGet
    /// probes reach by the pod IP). DNS rebinding always carries a host *name*: a page whose
    /// origin is an IP address is served from that address, so it cannot be the attacker's.
    pub fn allow_ip_hosts(mut self) -> ClientGate {
        self.ip_hosts = true;
        self
    }

    /// Whether a client token is required.
    pub fn requires_token(&self) -> bool {
        self.token.is_some()
    }

    /// Checks one request's token, Origin and Host.
    pub fn check(&self, uri: &Uri, headers: &HeaderMap) -> Result<(), ClientError> {
        if let Some(expected) = &self.token {
            let ok = headers
                .get(&TOKEN_HEADER)
                .map(|v| constant_time_eq(v.as_bytes(), expected.as_bytes()))
                .unwrap_or(false);
            if !ok {
                return Err(ClientError::Token);
            }
        }
        self.check_browser(headers)?;
        self.check_hosts(uri, headers, |h| self.host_allowed(h))
    }

    /// Checks a `CONNECT` (intercept): the browser checks (its Host is the tunnel's target,
    /// not cbgate). The client identity, and with it any token, is recognised by
    /// `Identities::recognise_connect`.
    pub fn check_connect(&self, headers: &HeaderMap) -> Result<(), ClientError> {
        self.check_browser(headers)
    }

    /// Checks a request inside an intercepted tunnel to `host`: its token was checked at the
    /// `CONNECT`; the browser checks apply, and every Host must be the tunnel's host.
    pub fn check_tunnel(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        host: &str,
    ) -> Result<(), ClientError> {
        self.check_browser(headers)?;
        self.check_hosts(uri, headers, |h| {
            let h = h.trim().to_ascii_lowercase();
            h == host || h.strip_suffix(":443") == Some(host)
        })
    }

    fn check_browser(&self, headers: &HeaderMap) -> Result<(), ClientError> {
        for origin in headers.get_all(header::ORIGIN) {
            let o = String::from_utf8_lossy(origin.as_bytes()).into_owned();
            let normalized = o.trim_end_matches('/').to_ascii_lowercase();
            if !self.allowed_origins.contains(&normalized) {
                return Err(ClientError::Origin(o));
            }
        }
        if !headers.contains_key(header::ORIGIN) {
            for site in headers.get_all(&SEC_FETCH_SITE) {
                let s = String::from_utf8_lossy(site.as_bytes()).into_owned();
                let v = s.trim().to_ascii_lowercase();
                if v != "same-origin" && v != "none" {
                    return Err(ClientError::CrossSite(s));
                }
            }
        }
        Ok(())
    }

    fn check_hosts(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        allowed: impl Fn(&str) -> bool,
    ) -> Result<(), ClientError> {
        // HTTP/2 carries the host as :authority (in the URI); HTTP/1 as Host. Every Host given
        // is checked, and HTTP/1 needs exactly one.
        let hosts: Vec<String> = headers
            .get_all(header::HOST)
            .iter()
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            .collect();
        if hosts.len() > 1 || (hosts.is_empty() && uri.authority().is_none()) {
            return Err(ClientError::HostCount);
        }
        for host in uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .into_iter()
            .chain(hosts)
        {
            if !allowed(&host) {
                return Err(ClientError::Host(host));
            }
        }
        Ok(())
    }

    fn host_allowed(&self, authority: &str) -> bool {
        let authority = authority.trim().to_ascii_lowercase();
        let name = host_of(&authority);
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        if let Ok(ip) = name.parse::<IpAddr>() {
            if ip.is_loopback() || self.ip_hosts {
                return true;
            }
        }
        self.allowed_hosts
            .iter()
            .any(|h| *h == authority || h == name)
    }
}

/// The host part of `host[:port]` or `[v6][:port]`, without brackets.
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// Compares without an early exit, so timing does not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        h
    }

    fn origin_uri() -> Uri {
        "/api/v3/brokerage/accounts".parse().expect("uri")
    }

    #[test]
    fn loopback_hosts_pass_others_do_not() {
        let g = ClientGate::new(None, &[], &["cbgate:8750".into()]);
        for ok in [
            "localhost",
            "localhost:8750",
            "127.0.0.1:8750",
            "127.1.2.3",
            "[::1]:8750",
            "api.localhost",
            "LOCALHOST",
            "cbgate:8750",
        ] {
            assert!(
                g.check(&origin_uri(), &headers(&[("host", ok)])).is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "evil.example",
            "evil.example:8750",
            "localhost.evil.example",
            "0.0.0.0:8750",
            "10.0.0.1",
            "cbgate:9999",
            "[::2]",
        ] {
            assert!(
                matches!(
                    g.check(&origin_uri(), &headers(&[("host", bad)])),
                    Err(ClientError::Host(_))
                ),
                "{bad}"
            );
        }
        // h2: the authority comes in the URI.
        let uri: Uri = "http://evil.example/api/v3/x".parse().expect("uri");
        assert!(g.check(&uri, &HeaderMap::new()).is_err());
        let ok: Uri = "http://localhost:8750/api/v3/x".parse().expect("uri");
        assert!(g.check(&ok, &HeaderMap::new()).is_ok());
        // No Host at all, or two: refused.
        assert!(matches!(
            g.check(&origin_uri(), &HeaderMap::new()),
            Err(ClientError::HostCount)
        ));
        let two = headers(&[("host", "localhost"), ("host", "evil.example")]);
        assert!(matches!(
            g.check(&origin_uri(), &two),
            Err(ClientError::HostCount)
        ));
    }

    #[test]
    fn ip_hosts_pass_only_when_allowed() {
        let g = ClientGate::new(None, &[], &[]).allow_ip_hosts();
        for ok in ["10.0.0.1:8751", "[fd00::1]:8751", "127.0.0.1", "localhost"] {
            assert!(
                g.check(&origin_uri(), &headers(&[("host", ok)])).is_ok(),
                "{ok}"
            );
        }
        for bad in ["attacker.example", "10.0.0.1.nip.io", "evil.example:8751"] {
            assert!(
                g.check(&origin_uri(), &headers(&[("host", bad)])).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn origins_must_be_listed() {
        let g = ClientGate::new(None, &["http://localhost:3000/".into()], &[]);
        let h = |o: &str| headers(&[("host", "127.0.0.1:8750"), ("origin", o)]);
        assert!(g.check(&origin_uri(), &h("http://localhost:3000")).is_ok());
        assert!(g.check(&origin_uri(), &h("https://evil.example")).is_err());
        assert!(g.check(&origin_uri(), &h("null")).is_err());
        assert!(g
            .check(&origin_uri(), &headers(&[("host", "localhost")]))
            .is_ok());
        let site = |v: &str| headers(&[("host", "localhost"), ("sec-fetch-site", v)]);
        for bad in ["cross-site", "same-site", "Cross-Site", "bogus", ""] {
            assert!(
                matches!(
                    g.check(&origin_uri(), &site(bad)),
                    Err(ClientError::CrossSite(_))
                ),
                "{bad:?}"
            );
        }
        for ok in ["same-origin", "none", " NONE "] {
            assert!(g.check(&origin_uri(), &site(ok)).is_ok(), "{ok:?}");
        }
        // An allowed Origin decides on its own: its cross-site fetches are the point of it.
        let allowed = headers(&[
            ("host", "127.0.0.1:8750"),
            ("origin", "http://localhost:3000"),
            ("sec-fetch-site", "cross-site"),
        ]);
        assert!(g.check(&origin_uri(), &allowed).is_ok());
    }

    #[test]
    fn token_is_required_when_configured() {
        let g = ClientGate::new(
            Some(Zeroizing::new("s3cret-token-0123456789".into())),
            &[],
            &[],
        );
        let with = |t: &str| headers(&[("host", "localhost"), ("cbgate-token", t)]);
        assert!(g
            .check(&origin_uri(), &with("s3cret-token-0123456789"))
            .is_ok());
        assert!(matches!(
            g.check(&origin_uri(), &with("s3cret-token-012345678")),
            Err(ClientError::Token)
        ));
        assert!(g
            .check(&origin_uri(), &headers(&[("host", "localhost")]))
            .is_err());
        assert!(!format!("{g:?}").contains("s3cret"));
    }
}
