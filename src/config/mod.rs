//! Configuration, parsed once into typed structs.
//!
//! Layers, lowest first: embedded defaults (the `Default` impls and serde defaults below) < TOML
//! file (`--config FILE` or `CBGATE_CONFIG`) < environment (`CBGATE_...`, `__` between levels,
//! e.g. `CBGATE_UPSTREAM__CA_FILE`) < command-line flags. Unknown keys and bad values are errors
//! that name the key. Nothing else in the crate reads files or the environment for settings:
//! the binary passes the environment in as a map.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub mod budget;
mod load;
pub mod pattern;

pub use budget::{BudgetConfig, ClassLimit, RedisUnavailable};

/// A configuration error; Display names the key, variable, flag or file at fault, and never
/// quotes the configuration's text or a value that may be a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file, variable or flag is wrong; the message is the whole sentence.
    #[error("{0}")]
    Load(String),
    #[error("configuration file {} does not exist", load::shown_path(.0))]
    FileMissing(PathBuf),
    #[error("configuration key {key}: {message}")]
    Invalid { key: String, message: String },
}

/// Whether `s` looks like key material (a PEM, a base64 or hex blob, a key JSON) rather than
/// a file path, an address or a name: such a value is never printed.
pub fn looks_like_key_material(s: &str) -> bool {
    use base64::Engine as _;
    if s.len() > 512
        || s.chars().any(char::is_control)
        || s.contains("-----")
        || s.contains("PRIVATE KEY")
        || s.contains("privateKey")
    {
        return true;
    }
    let compact: String = s
        .trim()
        .trim_matches(['"', '\''])
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    if compact.len() < 20 {
        return false;
    }
    if compact.len() >= 32 && compact.chars().all(|c| c.is_ascii_hexdigit()) {
        return true;
    }
    // A dot-less path that happens to be valid base64 is hidden too: a harmless false alarm.
    let engines = [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    engines
        .iter()
        .any(|e| e.decode(compact.as_bytes()).is_ok_and(|b| b.len() >= 16))
}

/// `s` quoted for a message, or a note that it is not shown because it looks like key material.
pub fn shown(s: &str) -> String {
    if looks_like_key_material(s) {
        "(a value that looks like key material, not shown)".to_owned()
    } else {
        format!("{s:?}")
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Where the proxy listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address, e.g. `127.0.0.1:8750` or `[::1]:8750`.
    Tcp(SocketAddr),
    /// A Unix domain socket path, written `unix:/path`; created with mode 0600.
    Unix(PathBuf),
    /// A TCP address served over TLS, written `https://127.0.0.1:8443` (certificate from
    /// `[tls]`, or from the local CA in `state_dir`).
    Tls(SocketAddr),
}

impl ListenAddr {
    /// The TCP address, for TCP and TLS listeners.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            ListenAddr::Tcp(a) | ListenAddr::Tls(a) => Some(*a),
            ListenAddr::Unix(_) => None,
        }
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, e.g. unix:/run/cbgate.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("https://") {
            let addr = addr.strip_suffix('/').unwrap_or(addr);
            return addr
                .parse::<SocketAddr>()
                .map(ListenAddr::Tls)
                .map_err(|_| {
                    format!(
                        "{} is not https://IP:PORT, e.g. https://127.0.0.1:8443",
                        shown(s)
                    )
                });
        }
        if s.starts_with("http://") {
            return Err(format!(
                "{} : write a plain listener as IP:PORT (no http://), a TLS one as https://IP:PORT",
                shown(s)
            ));
        }
        s.parse::<SocketAddr>()
            .map(ListenAddr::Tcp)
            .map_err(|_| format!("{} is not IP:PORT, https://IP:PORT or unix:/path", shown(s)))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tls(a) => write!(f, "https://{a}"),
        }
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The scheme-less part of an upstream base URL: what `routes` and `ws_routes` may name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseUrl {
    /// Lower-case host name, or an IP address (IPv6 in brackets).
    pub host: String,
    /// The port, 443 when the URL names none.
    pub port: u16,
}

impl BaseUrl {
    /// Parses `SCHEME://host[:port]` (a trailing `/` is allowed; no path, query or user info).
    pub fn parse(url: &str, scheme: &str) -> Result<BaseUrl, String> {
        let u = url::Url::parse(url).map_err(|e| format!("{} is not a URL: {e}", shown(url)))?;
        if u.scheme() != scheme {
            return Err(format!(
                "{} must use {scheme}: cbgate only talks to Coinbase over verified TLS",
                shown(url)
            ));
        }
        if !(u.path().is_empty() || u.path() == "/")
            || u.query().is_some()
            || u.fragment().is_some()
            || !u.username().is_empty()
            || u.password().is_some()
        {
            return Err(format!("{} must be only scheme, host and port", shown(url)));
        }
        let host = match u.host() {
            Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
            None => return Err(format!("{} has no host", shown(url))),
        };
        Ok(BaseUrl {
            host,
            port: u.port().unwrap_or(443),
        })
    }
}

/// One route: requests whose path starts with `prefix` go to `upstream`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix, e.g. `/api/v3/`.
    pub prefix: String,
    /// Upstream base URL, `https://host[:port]`.
    pub upstream: String,
    /// The credential (`[keys.NAME]`, or `default` for `[key]`) this route signs with unless
    /// the request names one in `cbgate-key`.
    #[serde(default)]
    pub key: Option<String>,
    /// Remove `prefix` (all but its final `/`) before forwarding: `/exchange/orders` goes
    /// upstream as `/orders`. For hosts whose own paths do not start with the prefix.
    #[serde(default)]
    pub strip_prefix: bool,
}

impl RouteConfig {
    /// A route with no key of its own and no prefix stripping.
    pub fn new(prefix: impl Into<String>, upstream: impl Into<String>) -> RouteConfig {
        RouteConfig {
            prefix: prefix.into(),
            upstream: upstream.into(),
            key: None,
            strip_prefix: false,
        }
    }
}

/// The built-in routes, used when the configuration names none.
pub fn default_routes() -> Vec<RouteConfig> {
    let mut routes: Vec<RouteConfig> = [
        ("/api/v3/", "https://api.coinbase.com"),
        ("/v2/", "https://api.coinbase.com"),
        ("/platform/", "https://api.cdp.coinbase.com"),
        // The derivatives gateway (JSON-RPC 2.0; a CDP key buys an access token).
        ("/api/v2/", "https://drb.coinbase.com"),
    ]
    .into_iter()
    .map(|(p, u)| RouteConfig::new(p, u))
    .collect();
    // The HMAC families' own paths (`/orders`, `/v1/portfolios`) would clash with each other
    // and with Advanced Trade, so each lives under a prefix that is stripped.
    for (p, u) in [
        ("/exchange/", "https://api.exchange.coinbase.com"),
        ("/prime/", "https://api.prime.coinbase.com"),
        ("/intx/", "https://api.international.coinbase.com"),
    ] {
        let mut r = RouteConfig::new(p, u);
        r.strip_prefix = true;
        routes.push(r);
    }
    routes
}

/// Which Coinbase API family a credential belongs to, and so how it signs.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// A CDP API key (ES256 or Ed25519 JWT): Advanced Trade, App API, CDP platform.
    #[default]
    Cdp,
    /// Coinbase Exchange: key, base64 secret, passphrase (HMAC, `CB-ACCESS-*`).
    Exchange,
    /// Coinbase Prime: access key, signing key, passphrase (HMAC, `X-CB-ACCESS-*`).
    Prime,
    /// International Exchange (legacy REST): key, base64 secret, passphrase (HMAC).
    Intx,
}

impl KeyKind {
    /// The name used in `kind = "..."`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Cdp => "cdp",
            KeyKind::Exchange => "exchange",
            KeyKind::Prime => "prime",
            KeyKind::Intx => "intx",
        }
    }

    /// The family an upstream host belongs to (production and sandbox hosts); every other
    /// host takes CDP JWTs.
    pub fn for_host(host: &str) -> KeyKind {
        match host.to_ascii_lowercase().as_str() {
            "api.exchange.coinbase.com"
            | "api-public.sandbox.exchange.coinbase.com"
            | "ws-feed.exchange.coinbase.com"
            | "ws-feed-public.sandbox.exchange.coinbase.com" => KeyKind::Exchange,
            "api.prime.coinbase.com" => KeyKind::Prime,
            "api.international.coinbase.com" | "api-n5e1.coinbase.com" => KeyKind::Intx,
            _ => KeyKind::Cdp,
        }
    }
}

/// The credential name `[key]` goes by.
pub const DEFAULT_KEY: &str = "default";

/// `[keys.NAME]`: one named credential. Either `file`, or the environment variable names.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NamedKeyConfig {
    /// The credential's JSON file: the CDP key JSON for `cdp`; for the HMAC kinds
    /// `{"key", "secret", "passphrase"}` or the portals' and SDKs' spellings.
    pub file: Option<PathBuf>,
    pub kind: KeyKind,
    /// Name of the environment variable holding the key name (CDP) or API key (HMAC kinds).
    pub key_env: Option<String>,
    /// Name of the environment variable holding the secret.
    pub secret_env: Option<String>,
    /// Name of the environment variable holding the passphrase (HMAC kinds).
    pub passphrase_env: Option<String>,
    /// Accept a key file readable or writable by group or others.
    pub allow_insecure_permissions: bool,
    /// `[keys.NAME.guard]`: limits for orders signed with this key, applied on top of
    /// `[guard]` (every layer that is set applies, so this can only tighten).
    pub guard: Option<GuardConfig>,
}

/// Whether `name` may name a credential: 1-64 of `A-Z a-z 0-9 _ -`.
pub fn valid_key_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// One WebSocket route: an upgrade request for exactly `path` goes to `upstream` (`wss://`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WsRouteConfig {
    /// Exact path, e.g. `/ws/user`.
    pub path: String,
    /// Upstream WebSocket URL, `wss://host[:port]`.
    pub upstream: String,
    /// The credential this route signs subscribes with unless the upgrade request names one
    /// in `cbgate-key`.
    #[serde(default)]
    pub key: Option<String>,
}

/// The built-in WebSocket routes (Advanced Trade market data and user data).
pub fn default_ws_routes() -> Vec<WsRouteConfig> {
    [
        ("/ws", "wss://advanced-trade-ws.coinbase.com"),
        ("/ws/user", "wss://advanced-trade-ws-user.coinbase.com"),
        // Coinbase Exchange's feed: subscribes are signed with an exchange key.
        ("/exchange/ws", "wss://ws-feed.exchange.coinbase.com"),
    ]
    .into_iter()
    .map(|(p, u)| WsRouteConfig {
        path: p.into(),
        upstream: u.into(),
        key: None,
    })
    .collect()
}

/// `[ws]`: WebSocket relay limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsConfig {
    /// Largest message accepted from Coinbase (order book snapshots are several MB).
    pub max_message_bytes: usize,
    /// Largest message accepted from a client. Coinbase's client messages (subscribe,
    /// unsubscribe) are a few hundred bytes; a larger one closes the session with 1009.
    pub max_client_message_bytes: usize,
    /// Open WebSocket sessions at most. An upgraded connection no longer counts against
    /// `max_connections`, so sessions have their own limit; more get 503.
    pub max_sessions: usize,
    /// A session whose client sends no subscribe within this is closed (Coinbase closes such a
    /// connection after 5 s itself).
    #[serde(with = "humantime_serde")]
    pub subscribe_timeout: Duration,
    /// A session in which neither side sends anything for this long is closed. Coinbase closes
    /// quiet channels within 60-90 s unless the client subscribes to `heartbeats` (one a
    /// second), so a live session is never this quiet; a dead peer is.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            max_message_bytes: 64 * 1024 * 1024,
            max_client_message_bytes: 64 * 1024,
            max_sessions: 256,
            subscribe_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// `[key]`: where the API key comes from.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeyConfig {
    /// The CDP key JSON file. When unset, `COINBASE_API_KEY` + `COINBASE_API_SECRET` are used.
    pub file: Option<PathBuf>,
    /// Accept a key file readable or writable by group or others (refused by default, as ssh
    /// refuses such private keys).
    pub allow_insecure_permissions: bool,
    /// The CDP Wallet Secret (base64 DER PKCS#8 P-256) for `X-Wallet-Auth`. When unset,
    /// `CDP_WALLET_SECRET` is used; with neither, a client's own `X-Wallet-Auth` passes.
    pub wallet_secret_file: Option<PathBuf>,
}

/// The permission ceiling cbgate enforces, whatever the key itself may do. Ordered: `View` <
/// `Trade` < `Transfer` (a client identity's ceiling is compared with the global one).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// GET and HEAD only.
    View,
    /// View, plus Advanced Trade orders and convert.
    #[default]
    Trade,
    /// Everything, including sending and withdrawing funds.
    Transfer,
}

/// What a policy rule does when it matches.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Allow,
    Deny,
}

/// One `[[policy.rules]]` entry: first match wins, before the ceiling.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub action: RuleAction,
    /// Methods this rule applies to, e.g. `["POST", "DELETE"]`; `["*"]` or empty for all.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Path pattern: `*` matches one segment, a final `**` any number of segments; a literal
    /// segment also matches itself plus a format suffix (`transactions` covers
    /// `transactions.json`) and may use only `A-Z a-z 0-9 - . _ ~`, like request paths.
    pub path: String,
}

/// `[policy]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub permission: Permission,
    pub rules: Vec<RuleConfig>,
}

impl Permission {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::View => "view",
            Permission::Trade => "trade",
            Permission::Transfer => "transfer",
        }
    }
}

/// Identity names cbgate gives itself: `anonymous` (no known identity) and `default` (the
/// identity of `client_token_file`).
pub const ANONYMOUS: &str = "anonymous";
/// The identity of `client_token_file`.
pub const DEFAULT_CLIENT: &str = "default";

/// `[clients.NAME]`: one client identity, recognised by a token or by its Unix peer uid/gid.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// File holding this identity's token (mode 0600, at least 16 characters), sent as
    /// `cbgate-token` or `Authorization: Bearer`.
    pub token_file: Option<PathBuf>,
    /// On a Unix-socket listener: a peer whose uid (SO_PEERCRED) is this.
    pub unix_uid: Option<u32>,
    /// On a Unix-socket listener: a peer whose primary gid (SO_PEERCRED) is this.
    pub unix_gid: Option<u32>,
    /// This identity's ceiling, never above `policy.permission` (unset: the global one).
    pub permission: Option<Permission>,
    /// Rules like `[[policy.rules]]`, applied in addition to the global policy.
    pub rules: Vec<RuleConfig>,
    /// At most this fraction (0 < share <= 1) of each rate budget bucket's rate for this
    /// identity (unset: no cap beyond the fair queue).
    #[serde(deserialize_with = "opt_decimal")]
    pub budget_share: Option<rust_decimal::Decimal>,
    /// The credentials this identity may sign with (`default` is `[key]`); unset: every one.
    /// Any other, by `cbgate-key` or a route's `key`, is refused with 403 `key_not_allowed`.
    pub keys: Option<Vec<String>>,
    /// The credential used when neither `cbgate-key` nor the route names one (unset: `default`).
    pub default_key: Option<String>,
    /// `[clients.NAME.guard]`: limits for this identity's orders, applied on top of `[guard]`
    /// and the key's own (every layer that is set applies, so this can only tighten).
    pub guard: Option<GuardConfig>,
}

impl ClientConfig {
    /// Whether this identity may sign with the credential `name` (`keys` unset: every one).
    pub fn may_use(&self, name: &str) -> bool {
        self.keys
            .as_ref()
            .is_none_or(|k| k.iter().any(|n| n == name))
    }
}

/// `[clients]`: `require` plus one `[clients.NAME]` table per identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientsConfig {
    /// Refuse (401) a request from no known identity; otherwise it is served as `anonymous`
    /// with the global policy.
    pub require: bool,
    /// The identities, by name.
    pub named: BTreeMap<String, ClientConfig>,
}

impl<'de> Deserialize<'de> for ClientsConfig {
    // `require` next to free-form names: a map visitor, so that each value goes through the
    // loader's own deserializer and its errors keep their key (`clients.bot.permision`).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ClientsConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = ClientsConfig::default();
                while let Some(k) = map.next_key::<String>()? {
                    if k == "require" {
                        out.require = map.next_value()?;
                    } else {
                        let c: ClientConfig = map.next_value()?;
                        out.named.insert(k, c);
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// Whether `name` may name a client identity: 1 to 32 of `a-z 0-9 - _`, starting with a
/// letter (names become log fields and metric labels, so they stay short and plain).
pub fn valid_client_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A Unix socket's mode, written as octal text (`"0660"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixMode(pub u32);

impl Default for UnixMode {
    fn default() -> Self {
        UnixMode(0o600)
    }
}

impl<'de> Deserialize<'de> for UnixMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let t = s.trim();
        let digits = t.strip_prefix("0o").unwrap_or(t);
        match u32::from_str_radix(digits, 8) {
            Ok(m) if !digits.is_empty() && m <= 0o777 => Ok(UnixMode(m)),
            _ => Err(serde::de::Error::custom(
                "expected an octal mode as text, such as \"0600\" or \"0660\"",
            )),
        }
    }
}

/// `[upstream]`: how cbgate reaches Coinbase.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Extra trusted root certificates (PEM), added to the built-in Mozilla roots.
    pub ca_file: Option<PathBuf>,
    /// Host name -> `ip:port`, like curl's `--resolve`. SNI, certificate check and JWT keep the name.
    pub resolve: BTreeMap<String, SocketAddr>,
    /// TCP connect plus TLS handshake.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// From sending the request to the response headers.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long an idle pooled connection is kept. Below the servers' own keep-alive timeout
    /// (nginx 75 s, many load balancers 60 s), so cbgate closes an idle connection before the
    /// server does, and never sends a request into a connection the server is closing.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per upstream host (h2 needs one; HTTP/1.1 one per concurrent request).
    pub pool_max_idle_per_host: usize,
    /// Open connections per upstream host at most, busy or idle. With HTTP/1.1 this is also the
    /// number of requests in flight to that host; more wait for a free connection.
    pub max_connections_per_host: usize,
    /// Upstream requests in flight at most, from signing until the response body ends.
    pub max_in_flight: usize,
    /// How long a request waits for one of the `max_in_flight` slots; then 503 upstream_busy.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// The HTTP version offered to upstream hosts (TLS ALPN).
    pub protocol: UpstreamProtocol,
    /// Per-host exceptions to `protocol`: host name -> protocol.
    pub host_protocol: BTreeMap<String, UpstreamProtocol>,
}

/// What cbgate offers an upstream host in TLS ALPN.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// `h2` then `http/1.1`: the server picks; h2 multiplexes requests on one connection, so
    /// a burst needs no new TLS handshakes (each a round trip to Coinbase).
    #[default]
    Auto,
    /// `http/1.1` only: a pool of keep-alive connections, one request at a time on each.
    Http1,
}

/// How client connections are spread over threads (`[runtime]`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeModel {
    /// One single-threaded event loop per thread, each accepting on its own `SO_REUSEPORT`
    /// socket and holding its own upstream pool: a request is read, signed, forwarded and
    /// answered on one thread.
    #[default]
    PerCore,
    /// One work-stealing runtime: any worker thread may run any part of a request.
    Shared,
}

/// `runtime.threads` at most.
pub const MAX_THREADS: usize = 64;

/// `[runtime]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    pub model: RuntimeModel,
    /// Threads serving the proxy listeners; 0: one per CPU cbgate may run on.
    pub threads: usize,
}

impl Config {
    /// Idle upstream connections per host each connection pool keeps: `(each worker's pool,
    /// the pool of cbgate's own calls)`. Idle connections hold `max_connections_per_host`
    /// slots, so in the per-core model (a pool per worker thread) each worker's pool keeps at
    /// most its share, `max_connections_per_host / threads` (one worker's idle connections
    /// must not leave another waiting for a slot), and the pool of cbgate's own calls (rare:
    /// start-up checks, `halt --cancel-open`) keeps none. 0 for the workers when the share is
    /// less than one: no keep-alive reuse rather than a starved worker (a warning says so).
    pub fn pool_max_idle(&self) -> (usize, usize) {
        let cap = self.upstream.pool_max_idle_per_host;
        match self.runtime.model {
            RuntimeModel::PerCore => {
                let share = self.upstream.max_connections_per_host / self.runtime.thread_count();
                (share.min(cap), 0)
            }
            RuntimeModel::Shared => (cap, cap),
        }
    }

    /// A warning when the per-core pools get no idle connections at all (see
    /// [`Config::pool_max_idle`]).
    fn pool_share_warning(&self) -> Option<String> {
        (self.pool_max_idle().0 == 0).then(|| {
            format!(
                "upstream.max_connections_per_host ({}) is less than one per worker thread ({}): no upstream connection is kept alive between requests, each one connects anew; raise max_connections_per_host or lower runtime.threads",
                self.upstream.max_connections_per_host,
                self.runtime.thread_count()
            )
        })
    }
}

impl RuntimeConfig {
    /// The number of threads to serve with (`threads`, or the CPUs available).
    pub fn thread_count(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS)),
            n => n,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            ca_file: None,
            resolve: BTreeMap::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            pool_idle_timeout: Duration::from_secs(50),
            pool_max_idle_per_host: 16,
            max_connections_per_host: 64,
            max_in_flight: 256,
            queue_timeout: Duration::from_secs(2),
            protocol: UpstreamProtocol::default(),
            host_protocol: BTreeMap::new(),
        }
    }
}

/// The order types `[guard].order_types` may name, and the Advanced Trade
/// `order_configuration` keys each covers. A name in `order_types` is either a type (`limit`:
/// every key of that type) or one exact key (`limit_limit_gtc`).
pub const ORDER_TYPES: &[(&str, &[&str])] = &[
    ("market", &["market_market_ioc", "market_market_fok"]),
    (
        "limit",
        &[
            "limit_limit_gtc",
            "limit_limit_gtd",
            "limit_limit_fok",
            "sor_limit_ioc",
        ],
    ),
    (
        "stop_limit",
        &["stop_limit_stop_limit_gtc", "stop_limit_stop_limit_gtd"],
    ),
    ("bracket", &["trigger_bracket_gtc", "trigger_bracket_gtd"]),
    ("twap", &["twap_limit_gtd"]),
];

/// `[guard]`: pre-trade limits checked on every order-creating or -editing request before it
/// is signed. Every limit is off by default; a refused order never reaches Coinbase. The same
/// struct is `[keys.NAME.guard]` and `[clients.NAME.guard]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Product ids that may be traded, e.g. `["BTC-USD", "ETH-USD"]`; empty: every product.
    pub products: Vec<String>,
    /// Largest order size in the base currency (e.g. BTC for BTC-USD); a string or a number.
    #[serde(deserialize_with = "opt_decimal")]
    pub max_order_base: Option<rust_decimal::Decimal>,
    /// Largest order notional in the quote currency (e.g. USD for BTC-USD): size x limit price,
    /// the `quote_size`, or size x the product's current price for a market order in base size.
    #[serde(deserialize_with = "opt_decimal")]
    pub max_order_quote: Option<rust_decimal::Decimal>,
    /// Sides allowed, `BUY` and/or `SELL`; empty: both.
    pub sides: Vec<String>,
    /// Order types allowed (see [`ORDER_TYPES`]); empty: all cbgate knows. A configuration
    /// cbgate does not know is refused while the guard is on.
    pub order_types: Vec<String>,
    /// Only post-only limit orders pass (they can never take liquidity).
    pub require_post_only: bool,
    /// Orders (creates and edits) per rolling minute at most; unset: no limit.
    pub max_orders_per_minute: Option<u32>,
    /// How long a product price fetched to value a market order is reused.
    #[serde(with = "humantime_serde")]
    pub price_max_age: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            products: Vec::new(),
            max_order_base: None,
            max_order_quote: None,
            sides: Vec::new(),
            order_types: Vec::new(),
            require_post_only: false,
            max_orders_per_minute: None,
            price_max_age: Duration::from_secs(2),
        }
    }
}

impl GuardConfig {
    /// Whether any limit is set (otherwise order bodies are not even read).
    pub fn is_active(&self) -> bool {
        !self.products.is_empty()
            || self.max_order_base.is_some()
            || self.max_order_quote.is_some()
            || !self.sides.is_empty()
            || !self.order_types.is_empty()
            || self.require_post_only
            || self.max_orders_per_minute.is_some()
    }

    /// Checks the values; `prefix` is the table's key (`guard`, `clients.NAME.guard`, ...).
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        for p in &self.products {
            if p.is_empty()
                || p.len() > 64
                || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(invalid(
                    format!("{prefix}.products"),
                    format!("{p:?} is not a product id such as \"BTC-USD\""),
                ));
            }
        }
        for (name, v) in [
            ("max_order_base", self.max_order_base),
            ("max_order_quote", self.max_order_quote),
        ] {
            if v.is_some_and(|d| d <= rust_decimal::Decimal::ZERO) {
                return Err(invalid(
                    format!("{prefix}.{name}"),
                    "must be greater than 0 (leave it unset for no limit)",
                ));
            }
        }
        for s in &self.sides {
            if !s.eq_ignore_ascii_case("BUY") && !s.eq_ignore_ascii_case("SELL") {
                return Err(invalid(
                    format!("{prefix}.sides"),
                    format!("{s:?} is not BUY or SELL"),
                ));
            }
        }
        for t in &self.order_types {
            let known = ORDER_TYPES
                .iter()
                .any(|(name, keys)| name == t || keys.contains(&t.as_str()));
            if !known {
                let names: Vec<&str> = ORDER_TYPES.iter().map(|(n, _)| *n).collect();
                return Err(invalid(
                    format!("{prefix}.order_types"),
                    format!(
                        "{t:?} is not an order type: use {} or an order_configuration key such as limit_limit_gtc",
                        names.join(", ")
                    ),
                ));
            }
        }
        if self.max_orders_per_minute == Some(0) {
            return Err(invalid(
                format!("{prefix}.max_orders_per_minute"),
                "must be greater than 0 (leave it unset for no limit)",
            ));
        }
        Ok(())
    }
}

/// An optional exact decimal from a TOML string (`"0.5"`), integer or float. A float is taken
/// in its shortest round-trip spelling, which is what was written for any value with up to 15
/// significant digits, so `0.1` is exactly 0.1 and not 0.1000000000000000055...
fn opt_decimal<'de, D: Deserializer<'de>>(d: D) -> Result<Option<rust_decimal::Decimal>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Option<rust_decimal::Decimal>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a decimal number, e.g. \"0.5\" or 100")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
            s.trim()
                .parse::<rust_decimal::Decimal>()
                .map(Some)
                .map_err(|_| E::custom(format!("{s:?} is not a decimal number")))
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Self::Value, E> {
            Ok(Some(n.into()))
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Self::Value, E> {
            Ok(Some(n.into()))
        }
        fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Self::Value, E> {
            self.visit_str(&n.to_string())
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(V)
        }
    }
    d.deserialize_any(V)
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[log]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter, e.g. `info` or `cbgate=debug`; `RUST_LOG` overrides it.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// `[audit]`: the tamper-evident audit log of state-changing requests and refusals.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The log file (JSON lines, mode 0600); unset: no audit log.
    pub file: Option<PathBuf>,
    /// The file is rotated (`audit.log` -> `audit.log.1`) before it would grow past this.
    pub max_file_bytes: u64,
    /// Rotated files kept (`audit.log.1` ..= `audit.log.<keep>`); older ones are deleted.
    pub keep: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            file: None,
            max_file_bytes: 64 * 1024 * 1024,
            keep: 10,
        }
    }
}

/// `[tls]`: the certificate of the `https://` listeners. Unset (the default): cbgate issues
/// short-lived certificates from its own name-constrained local CA in `state_dir`
/// (`cbgate ca` prints it).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Certificate chain (PEM, leaf first).
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, SEC1 or PKCS#1).
    pub key_file: Option<PathBuf>,
}

/// `[intercept]`: cbgate as the client's `HTTPS_PROXY` for the Coinbase hosts.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct InterceptConfig {
    /// Answer `CONNECT host:443` for the upstream hosts of `routes` and `ws_routes` (any
    /// other target gets 403), terminate TLS there with a certificate from the local CA, and
    /// handle the requests inside like plain ones. Off: CONNECT and absolute-form are refused.
    pub enabled: bool,
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Proxy listeners.
    pub listen: Vec<ListenAddr>,
    /// Request bodies larger than this get 413.
    pub max_body_bytes: u64,
    /// Time a new connection has to deliver its first complete request (protocol detection,
    /// the h2 preface and SETTINGS, the request headers), and an HTTP/1 client each later head.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a client connection may stay open with no request in flight (HTTP/1.1
    /// keep-alive and h2) before cbgate closes it (h2: GOAWAY).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Longest silence inside a body, in either direction: a client request body that stops
    /// arriving, or an upstream response body that stops after its headers. The request
    /// fails (client 408, or a reset response) and both connections are released.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    pub key: KeyConfig,
    /// Named credentials besides `[key]` (which is the one named `default`).
    pub keys: BTreeMap<String, NamedKeyConfig>,
    pub upstream: UpstreamConfig,
    /// Routes, longest prefix wins. Replaces the built-in list when given.
    pub routes: Vec<RouteConfig>,
    /// WebSocket routes, exact path. Replaces the built-in list when given.
    pub ws_routes: Vec<WsRouteConfig>,
    pub ws: WsConfig,
    pub log: LogConfig,
    /// Permission ceiling and rules.
    pub policy: PolicyConfig,
    /// Allow listening on a non-loopback address (also needs `client_token_file`).
    pub unsafe_listen: bool,
    /// File holding the token clients must send as `cbgate-token`: the client identity named
    /// `default`, and then every request needs a known identity (as `clients.require`).
    pub client_token_file: Option<PathBuf>,
    /// Client identities and whether one is required.
    pub clients: ClientsConfig,
    /// The mode of Unix-socket listeners (default `0600`: the owner only).
    pub unix_mode: UnixMode,
    /// `Origin` values allowed to call cbgate (browsers); any other `Origin` is refused.
    pub allowed_origins: Vec<String>,
    /// `Host` names accepted besides loopback names and addresses (DNS-rebinding defence).
    pub allowed_hosts: Vec<String>,
    /// Open client connections at most; more are answered 503 and closed.
    pub max_connections: usize,
    /// Request header fields at most (HTTP/1); more get 431.
    pub max_headers: usize,
    /// The admin listener (`/livez`, `/readyz`, `/metrics`).
    pub admin_listen: SocketAddr,
    /// Open admin connections at most: its own small budget, so the admin port can never use
    /// the file descriptors the proxy port needs. More get 503 and are closed.
    pub admin_max_connections: usize,
    /// How long in-flight requests and streams may take to finish after SIGTERM/SIGINT.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How often Coinbase's clock is measured (also once at start).
    #[serde(with = "humantime_serde")]
    pub clock_check_interval: Duration,
    /// Pre-trade limits on Advanced Trade orders.
    pub guard: GuardConfig,
    /// Where cbgate keeps state that must survive a restart (the kill switch). Default:
    /// `$STATE_DIRECTORY` (systemd), else `$XDG_STATE_HOME/cbgate`, else
    /// `~/.local/state/cbgate`; with none of them, the halt state lives in memory only.
    pub state_dir: Option<PathBuf>,
    /// Whether `state_dir` was filled in from the environment's defaults rather than set: an
    /// unusable default (a read-only container) degrades to an in-memory halt with a warning,
    /// an unusable configured directory is an error.
    #[serde(skip)]
    pub state_dir_is_default: bool,
    /// File holding the token `cbgate halt`/`resume`/`status` send as `Authorization: Bearer`
    /// to the admin listener's `/halt`, `/resume` and `/status`.
    pub admin_token_file: Option<PathBuf>,
    /// The audit log.
    pub audit: AuditConfig,
    /// The certificate of the `https://` listeners.
    pub tls: TlsConfig,
    /// Intercepting `HTTPS_PROXY` mode.
    pub intercept: InterceptConfig,
    /// The rate budget per credential and request class (Coinbase's limits).
    pub budget: BudgetConfig,
    /// Threads and how requests are scheduled on them.
    pub runtime: RuntimeConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 8750)))],
            max_body_bytes: 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            key: KeyConfig::default(),
            keys: BTreeMap::new(),
            upstream: UpstreamConfig::default(),
            routes: default_routes(),
            ws_routes: default_ws_routes(),
            ws: WsConfig::default(),
            log: LogConfig::default(),
            policy: PolicyConfig::default(),
            unsafe_listen: false,
            client_token_file: None,
            clients: ClientsConfig::default(),
            unix_mode: UnixMode::default(),
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            max_connections: 1024,
            max_headers: 100,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8751)),
            admin_max_connections: 16,
            shutdown_timeout: Duration::from_secs(25),
            clock_check_interval: Duration::from_secs(300),
            guard: GuardConfig::default(),
            state_dir: None,
            state_dir_is_default: false,
            admin_token_file: None,
            audit: AuditConfig::default(),
            tls: TlsConfig::default(),
            intercept: InterceptConfig::default(),
            budget: BudgetConfig::default(),
            runtime: RuntimeConfig::default(),
        }
    }
}

/// Everything that feeds the layers, gathered by the binary.
#[derive(Default)]
pub struct Sources {
    /// `--config FILE`, else `CBGATE_CONFIG`.
    pub file: Option<PathBuf>,
    /// The process environment (only `CBGATE_*` entries are used).
    pub env: HashMap<String, String>,
    /// Command-line flags.
    pub listen: Vec<String>,
    pub admin_listen: Option<String>,
    pub key_file: Option<PathBuf>,
}

impl fmt::Debug for Sources {
    // The environment holds COINBASE_API_SECRET: show only the variable names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.env.keys().collect();
        names.sort();
        f.debug_struct("Sources")
            .field("file", &self.file)
            .field("env", &names)
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .field("key_file", &self.key_file)
            .finish()
    }
}

/// Environment variables that steer cbgate but are not configuration keys.
/// `CBGATE_CONFIG` names the file; the others are read by the example clients (examples/), so
/// a shell that exports them for a client can still start cbgate.
const NOT_KEYS: &[&str] = &[
    "CBGATE_CONFIG",
    "CBGATE_URL",
    "CBGATE_WS_URL",
    "CBGATE_TOKEN_FILE",
    "CBGATE_WS_MAX_MESSAGES",
];

/// What a path setting holding key material is told.
const NOT_A_PATH: &str =
    "the value is not a file path (it looks like key material: put the key in a file and give its path)";

/// Reads and parses the configuration file; names `--config` or `CBGATE_CONFIG` when the
/// value is not a path at all.
fn file_layer(path: &Path, sources: &Sources) -> Result<load::Node, ConfigError> {
    let from_env = sources
        .env
        .get("CBGATE_CONFIG")
        .is_some_and(|v| Path::new(v) == path);
    let name = if from_env {
        "CBGATE_CONFIG"
    } else {
        "--config"
    };
    if looks_like_key_material(&path.to_string_lossy()) {
        return Err(ConfigError::Load(format!("{name}: {NOT_A_PATH}")));
    }
    if !path.exists() {
        return Err(ConfigError::FileMissing(path.to_owned()));
    }
    let shown_file = load::shown_path(path);
    // The file may be a key file given by mistake: wipe the text once parsed.
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::InvalidData => "it is not UTF-8 text".to_owned(),
            std::io::ErrorKind::IsADirectory => "it is a directory".to_owned(),
            k => k.to_string(),
        };
        ConfigError::Load(format!(
            "configuration file {shown_file} cannot be read: {why}"
        ))
    })?);
    let doc: toml::Table = toml::from_str(&text).map_err(|e| {
        let start = text.trim_start();
        let hint = if text.contains("-----BEGIN") || text.contains("privateKey") {
            " (it looks like a key file: give it with --key-file or key.file)"
        } else if start.starts_with('{') {
            " (it looks like JSON; the configuration file is TOML)"
        } else {
            ""
        };
        ConfigError::Load(format!(
            "configuration file {shown_file} is not valid TOML: {}{hint}",
            load::toml_syntax(&text, &e)
        ))
    })?;
    Ok(load::Node::from_toml(
        toml::Value::Table(doc),
        &load::Origin::File(path.to_owned()),
    ))
}

impl Config {
    /// Builds the configuration from its layers and checks it.
    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        let mut root = match &sources.file {
            Some(path) => file_layer(path, sources)?,
            None => load::Node::table(load::Origin::Text),
        };
        load::env_tree(&sources.env, NOT_KEYS, &mut root).map_err(ConfigError::Load)?;
        if !sources.listen.is_empty() {
            let flag = load::Origin::Flag("--listen");
            root.set(&["listen".into()], load::Node::list(&sources.listen, flag));
        }
        if let Some(a) = &sources.admin_listen {
            let value = load::Node::text(a.clone(), load::Origin::Flag("--admin-listen"));
            root.set(&["admin_listen".into()], value);
        }
        if let Some(f) = &sources.key_file {
            let value = load::Node::text(
                f.to_string_lossy().into_owned(),
                load::Origin::Flag("--key-file"),
            );
            root.set(&["key".into(), "file".into()], value);
        }
        let mut cfg = Config::parse_tree(root)?;
        if cfg.state_dir.is_none() {
            cfg.state_dir = default_state_dir(&sources.env);
            cfg.state_dir_is_default = cfg.state_dir.is_some();
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses and checks a TOML document alone (no environment, no flags): the file layer, for
    /// `cbgate check` of a document and for fuzzing the loader.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let doc: toml::Table = toml::from_str(text).map_err(|e| {
            ConfigError::Load(format!(
                "configuration is not valid TOML: {}",
                load::toml_syntax(text, &e)
            ))
        })?;
        Config::from_tree(load::Node::from_toml(
            toml::Value::Table(doc),
            &load::Origin::Text,
        ))
    }

    fn from_tree(root: load::Node) -> Result<Config, ConfigError> {
        let cfg = Config::parse_tree(root)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The tree as typed structs, before `validate` (which `load` runs after it fills in
    /// defaults that come from the environment).
    fn parse_tree(root: load::Node) -> Result<Config, ConfigError> {
        // No configuration value is a secret: key material here is a paste mistake.
        if let Some((key, origin)) = root.find_key_material("") {
            let problem = if key.ends_with("file") {
                NOT_A_PATH
            } else {
                "the value looks like key material and is not shown; cbgate reads the key only \
                 from key.file or COINBASE_API_KEY + COINBASE_API_SECRET"
            };
            return Err(ConfigError::Load(load::at_origin(&origin, &key, problem)));
        }
        Config::deserialize(load::De {
            node: root,
            path: String::new(),
        })
        .map_err(|e| ConfigError::Load(e.to_string()))
    }

    /// The upstream host names of `routes` and `ws_routes`, each once, in order: what the
    /// local CA is constrained to and `[intercept]` answers `CONNECT` for.
    pub fn upstream_hosts(&self) -> Vec<String> {
        let rest = self
            .routes
            .iter()
            .map(|r| BaseUrl::parse(&r.upstream, "https"));
        let ws = self
            .ws_routes
            .iter()
            .map(|r| BaseUrl::parse(&r.upstream, "wss"));
        let mut hosts: Vec<String> = Vec::new();
        for b in rest.chain(ws).flatten() {
            if !hosts.contains(&b.host) {
                hosts.push(b.host);
            }
        }
        hosts
    }

    /// Whether TLS towards clients is needed: an `https://` listener or `[intercept]`.
    pub fn needs_client_tls(&self) -> bool {
        self.intercept.enabled || self.listen.iter().any(|l| matches!(l, ListenAddr::Tls(_)))
    }

    /// Checks what serde cannot: non-empty lists, sane numbers, well-formed upstream URLs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(invalid("listen", "needs at least one address"));
        }
        for addr in &self.listen {
            if let Some(a) = addr.socket_addr() {
                let allowed =
                    a.ip().is_loopback() || (self.unsafe_listen && self.tokens_required());
                if !allowed {
                    return Err(invalid(
                        "listen",
                        format!(
                            "{a} is not a loopback address: anyone who reaches it could trade with your key; \
                             set unsafe_listen = true and client_token_file (or clients.require = true \
                             with a token_file identity) to require a client token"
                        ),
                    ));
                }
            }
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be greater than 0"));
        }
        if self.admin_max_connections == 0 {
            return Err(invalid("admin_max_connections", "must be greater than 0"));
        }
        if self.max_headers == 0 {
            return Err(invalid("max_headers", "must be greater than 0"));
        }
        if self.runtime.threads > MAX_THREADS {
            return Err(invalid(
                "runtime.threads",
                format!("must be at most {MAX_THREADS} (0: one per CPU)"),
            ));
        }
        for (i, r) in self.policy.rules.iter().enumerate() {
            pattern::parse_pattern(&r.path)
                .map_err(|m| invalid(format!("policy.rules[{i}].path"), m))?;
            pattern::parse_methods(&r.methods)
                .map_err(|m| invalid(format!("policy.rules[{i}].methods"), m))?;
        }
        if self.max_body_bytes == 0 {
            return Err(invalid("max_body_bytes", "must be greater than 0"));
        }
        if self.routes.is_empty() {
            return Err(invalid("routes", "needs at least one route"));
        }
        for (i, r) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            if !r.prefix.starts_with('/') {
                return Err(invalid(
                    format!("{key}.prefix"),
                    format!("{} must start with /", shown(&r.prefix)),
                ));
            }
            let base = BaseUrl::parse(&r.upstream, "https")
                .map_err(|m| invalid(format!("{key}.upstream"), m))?;
            if r.strip_prefix && !r.prefix.ends_with('/') {
                return Err(invalid(
                    format!("{key}.prefix"),
                    format!(
                        "{} must end with / when strip_prefix = true",
                        shown(&r.prefix)
                    ),
                ));
            }
            if let Some(name) = &r.key {
                self.check_route_key(&format!("{key}.key"), name, &base.host)?;
            }
        }
        self.validate_keys()?;
        for (i, r) in self.ws_routes.iter().enumerate() {
            let key = format!("ws_routes[{i}]");
            if !r.path.starts_with('/') {
                return Err(invalid(
                    format!("{key}.path"),
                    format!("{} must start with /", shown(&r.path)),
                ));
            }
            let base = BaseUrl::parse(&r.upstream, "wss")
                .map_err(|m| invalid(format!("{key}.upstream"), m))?;
            if let Some(name) = &r.key {
                self.check_route_key(&format!("{key}.key"), name, &base.host)?;
            }
        }
        if self.ws.max_message_bytes == 0 {
            return Err(invalid("ws.max_message_bytes", "must be greater than 0"));
        }
        if self.ws.max_client_message_bytes == 0 {
            return Err(invalid(
                "ws.max_client_message_bytes",
                "must be greater than 0",
            ));
        }
        if self.ws.max_sessions == 0 {
            return Err(invalid("ws.max_sessions", "must be greater than 0"));
        }
        if self.audit.max_file_bytes == 0 {
            return Err(invalid("audit.max_file_bytes", "must be greater than 0"));
        }
        if self.audit.keep == 0 {
            return Err(invalid(
                "audit.keep",
                "must be at least 1: rotation without a kept file would cut the chain",
            ));
        }
        if self
            .audit
            .file
            .as_ref()
            .is_some_and(|f| f.as_os_str().is_empty())
        {
            return Err(invalid("audit.file", "must be a file path (or left unset)"));
        }
        for (name, t) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.request_timeout", self.upstream.request_timeout),
            (
                "upstream.pool_idle_timeout",
                self.upstream.pool_idle_timeout,
            ),
            ("upstream.queue_timeout", self.upstream.queue_timeout),
            ("header_read_timeout", self.header_read_timeout),
            ("idle_timeout", self.idle_timeout),
            ("body_timeout", self.body_timeout),
            ("clock_check_interval", self.clock_check_interval),
            ("ws.subscribe_timeout", self.ws.subscribe_timeout),
            ("ws.idle_timeout", self.ws.idle_timeout),
        ] {
            if t.is_zero() {
                return Err(invalid(name, "must be greater than 0"));
            }
        }
        for (name, n) in [
            ("upstream.max_in_flight", self.upstream.max_in_flight),
            (
                "upstream.max_connections_per_host",
                self.upstream.max_connections_per_host,
            ),
            (
                "upstream.pool_max_idle_per_host",
                self.upstream.pool_max_idle_per_host,
            ),
        ] {
            if n == 0 {
                return Err(invalid(name, "must be greater than 0"));
            }
        }
        if self.upstream.pool_max_idle_per_host > self.upstream.max_connections_per_host {
            return Err(invalid(
                "upstream.pool_max_idle_per_host",
                "must not exceed upstream.max_connections_per_host",
            ));
        }
        self.guard.validate("guard")?;
        // The override layers are the same table, checked by the same code.
        for (name, c) in &self.clients.named {
            if let Some(g) = &c.guard {
                g.validate(&format!("clients.{name}.guard"))?;
            }
        }
        for (name, k) in &self.keys {
            if let Some(g) = &k.guard {
                g.validate(&format!("keys.{name}.guard"))?;
            }
        }
        self.validate_clients()?;
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(_), None) => {
                return Err(invalid(
                    "tls.key_file",
                    "tls.cert_file is set: set tls.key_file (its private key) too",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "tls.cert_file",
                    "tls.key_file is set: set tls.cert_file (the certificate chain) too",
                ))
            }
            _ => {}
        }
        self.budget.validate()?;
        if self.state_dir.as_ref().is_some_and(|d| !d.is_absolute()) {
            return Err(invalid(
                "state_dir",
                "must be an absolute path, e.g. /var/lib/cbgate",
            ));
        }
        for host in self.upstream.resolve.keys() {
            if host.is_empty() || host.contains([':', '/', ' ']) {
                return Err(invalid(
                    format!("upstream.resolve.{}", shown(host)),
                    "must be a bare host name",
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Whether every request must come from a known client identity: `clients.require`, or
    /// `client_token_file` (which has always required its token).
    pub fn identity_required(&self) -> bool {
        self.clients.require || self.client_token_file.is_some()
    }

    /// A warning when some identity is recognised by `unix_uid`/`unix_gid` only and no
    /// listener is a Unix socket: that identity can never be recognised.
    pub fn unreachable_identities(&self) -> Option<String> {
        if self.listen.iter().any(|l| matches!(l, ListenAddr::Unix(_))) {
            return None;
        }
        let names: Vec<&str> = self
            .clients
            .named
            .iter()
            .filter(|(_, c)| c.token_file.is_none())
            .map(|(n, _)| n.as_str())
            .collect();
        (!names.is_empty()).then(|| {
            format!(
                "client identities {} are recognised only by unix_uid/unix_gid, but no listener is a Unix socket (listen = [\"unix:/path\"]): they can never be recognised",
                names.join(", ")
            )
        })
    }

    /// A warning when a Unix socket lets its group connect (`unix_mode` with group bits) while
    /// a request from no known identity is still served with the global ceiling: then every
    /// member of the socket's group that is no identity gets that ceiling.
    pub fn group_socket_warning(&self) -> Option<String> {
        let unix = self.listen.iter().any(|l| matches!(l, ListenAddr::Unix(_)));
        (unix && self.unix_mode.0 & 0o060 != 0 && !self.identity_required()).then(|| {
            format!(
                "unix_mode {:04o} lets the socket's group connect, and with clients.require = false a group member that is no client identity gets the global ceiling (policy.permission); set clients.require = true to serve only configured identities",
                self.unix_mode.0
            )
        })
    }

    /// Every warning about this configuration (it loads, but something in it is likely not
    /// what was meant), for `serve` and `check` alike.
    pub fn warnings(&self) -> Vec<String> {
        [
            self.unreachable_identities(),
            self.group_socket_warning(),
            self.unenforced_limits_warning(),
            self.pool_share_warning(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// A warning when identities are limited by `keys` or a `guard` while a request from no
    /// known identity is still served: a program that leaves out its token is `anonymous`,
    /// which may use every key and has no identity guard.
    pub fn unenforced_limits_warning(&self) -> Option<String> {
        let names: Vec<&str> = self
            .clients
            .named
            .iter()
            .filter(|(_, c)| c.keys.is_some() || c.guard.is_some())
            .map(|(n, _)| n.as_str())
            .collect();
        (!names.is_empty() && !self.identity_required()).then(|| {
            format!(
                "client identities {} are limited by keys or guard, but with clients.require = false a program that sends no token is served as anonymous, with every key and no identity guard; set clients.require = true to make those limits binding",
                names.join(", ")
            )
        })
    }

    /// Whether a request over TCP needs a token: an identity is required and TCP clients can
    /// only be recognised by one (Unix peer credentials do not exist there).
    fn tokens_required(&self) -> bool {
        self.client_token_file.is_some()
            || (self.clients.require && self.clients.named.values().any(|c| c.token_file.is_some()))
    }

    fn validate_clients(&self) -> Result<(), ConfigError> {
        if self.clients.require && self.clients.named.is_empty() && self.client_token_file.is_none()
        {
            return Err(invalid(
                "clients.require",
                "is true but no client identity is configured, so every request would be refused: add a [clients.NAME] table (token_file, unix_uid or unix_gid), or set require = false",
            ));
        }
        let mut uids: BTreeMap<u32, &str> = BTreeMap::new();
        let mut gids: BTreeMap<u32, &str> = BTreeMap::new();
        for (name, c) in &self.clients.named {
            let key = format!("clients.{}", shown_name(name));
            if !valid_client_name(name) {
                return Err(invalid(
                    key,
                    "a client name is 1 to 32 of a-z 0-9 - _, starting with a letter",
                ));
            }
            if name == ANONYMOUS {
                return Err(invalid(
                    key,
                    "the name anonymous is cbgate's own, for requests from no known identity; choose another",
                ));
            }
            if name == DEFAULT_CLIENT && self.client_token_file.is_some() {
                return Err(invalid(
                    key,
                    "the name default is the identity of client_token_file; choose another, or move the token file to clients.default.token_file",
                ));
            }
            if c.token_file.is_none() && c.unix_uid.is_none() && c.unix_gid.is_none() {
                return Err(invalid(
                    key,
                    "recognises nobody: give token_file, unix_uid or unix_gid",
                ));
            }
            if c.token_file
                .as_ref()
                .is_some_and(|f| f.as_os_str().is_empty())
            {
                return Err(invalid(format!("{key}.token_file"), "must be a file path"));
            }
            if let Some(share) = c.budget_share {
                if share <= rust_decimal::Decimal::ZERO || share > rust_decimal::Decimal::ONE {
                    return Err(invalid(
                        format!("{key}.budget_share"),
                        format!("{share} is not a fraction of the budget: give a number above 0 and at most 1, e.g. 0.5"),
                    ));
                }
            }
            if let Some(p) = c.permission {
                if p > self.policy.permission {
                    return Err(invalid(
                        format!("{key}.permission"),
                        format!(
                            "\"{}\" is above policy.permission = \"{}\": an identity can only narrow the global ceiling; lower {key}.permission or raise policy.permission",
                            p.as_str(),
                            self.policy.permission.as_str()
                        ),
                    ));
                }
            }
            self.check_client_keys(&key, c)?;
            for (i, r) in c.rules.iter().enumerate() {
                pattern::parse_pattern(&r.path)
                    .map_err(|m| invalid(format!("{key}.rules[{i}].path"), m))?;
                pattern::parse_methods(&r.methods)
                    .map_err(|m| invalid(format!("{key}.rules[{i}].methods"), m))?;
            }
            for (what, id, seen) in [
                ("unix_uid", c.unix_uid, &mut uids),
                ("unix_gid", c.unix_gid, &mut gids),
            ] {
                if let Some(id) = id {
                    if let Some(other) = seen.insert(id, name) {
                        return Err(invalid(
                            format!("{key}.{what}"),
                            format!(
                                "{id} is also clients.{other}.{what}: one peer would be two identities; give each {what} to one identity"
                            ),
                        ));
                    }
                }
            }
        }
        let mode = self.unix_mode.0;
        if mode & 0o600 != 0o600 || mode & 0o111 != 0 {
            return Err(invalid(
                "unix_mode",
                format!("{mode:04o}: the owner needs read and write (0600) and no execute bits are used; e.g. \"0600\" or \"0660\""),
            ));
        }
        if mode & 0o006 != 0 && !self.identity_required() {
            return Err(invalid(
                "unix_mode",
                format!("{mode:04o} lets every local user connect: set clients.require = true so that only configured identities (unix_uid, unix_gid, token) are served, or use \"0660\" with a group"),
            ));
        }
        Ok(())
    }

    /// `clients.NAME.keys` and `default_key` name configured credentials, and `default_key`
    /// is one of `keys` when both are set. `at` is `clients.NAME`.
    fn check_client_keys(&self, at: &str, c: &ClientConfig) -> Result<(), ConfigError> {
        let configured = |name: &str| name == DEFAULT_KEY || self.keys.contains_key(name);
        let known = || {
            let mut known: Vec<&str> = self.keys.keys().map(String::as_str).collect();
            known.insert(0, DEFAULT_KEY);
            known.join(", ")
        };
        let unknown = |field: String, name: &str| {
            invalid(
                field,
                format!(
                    "{} is not a configured credential; add [keys.{}] or use one of: {}",
                    shown(name),
                    if valid_key_name(name) { name } else { "NAME" },
                    known()
                ),
            )
        };
        if let Some(keys) = &c.keys {
            if keys.is_empty() {
                return Err(invalid(
                    format!("{at}.keys"),
                    "is empty, so this identity could sign with no credential: list the credentials it may use, e.g. keys = [\"default\"], or remove the setting to allow every one",
                ));
            }
            for (i, name) in keys.iter().enumerate() {
                if !configured(name) {
                    return Err(unknown(format!("{at}.keys[{i}]"), name));
                }
            }
        }
        if c.default_key.is_none() && !c.may_use(DEFAULT_KEY) {
            return Err(invalid(
                format!("{at}.default_key"),
                format!(
                    "is missing: {at}.keys does not include default, so every request that names no credential would be refused; set default_key to one of: {}",
                    c.keys.as_deref().unwrap_or_default().join(", ")
                ),
            ));
        }
        if let Some(name) = &c.default_key {
            if !configured(name) {
                return Err(unknown(format!("{at}.default_key"), name));
            }
            if !c.may_use(name) {
                return Err(invalid(
                    format!("{at}.default_key"),
                    format!(
                        "{name} is not in {at}.keys ({}): the identity could not use its own default; add it to keys or pick one of them",
                        c.keys.as_deref().unwrap_or_default().join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A route's `key` names a configured credential of the host's family.
    fn check_route_key(&self, at: &str, name: &str, host: &str) -> Result<(), ConfigError> {
        let family = KeyKind::for_host(host);
        let kind = if name == DEFAULT_KEY {
            KeyKind::Cdp
        } else {
            match self.keys.get(name) {
                Some(k) => k.kind,
                None => {
                    let mut known: Vec<&str> = self.keys.keys().map(String::as_str).collect();
                    known.insert(0, DEFAULT_KEY);
                    return Err(invalid(
                        at,
                        format!(
                            "{} is not a configured credential; add [keys.{}] or use one of: {}",
                            shown(name),
                            if valid_key_name(name) { name } else { "NAME" },
                            known.join(", ")
                        ),
                    ));
                }
            }
        };
        if kind != family {
            return Err(invalid(
                at,
                format!(
                    "the credential {name} is kind \"{}\" but {host} takes {} keys; pick a [keys.NAME] with kind = \"{}\"",
                    kind.as_str(),
                    family.as_str(),
                    family.as_str()
                ),
            ));
        }
        Ok(())
    }

    /// Checks `[keys.NAME]`: names, one source each, and what each kind needs.
    fn validate_keys(&self) -> Result<(), ConfigError> {
        for (name, k) in &self.keys {
            let at = |field: &str| format!("keys.{}.{field}", shown_name(name));
            if name == DEFAULT_KEY {
                return Err(invalid(
                    "keys.default",
                    "the name default is [key]'s: configure that credential in [key], or give this one another name",
                ));
            }
            if !valid_key_name(name) {
                return Err(invalid(
                    format!("keys.{}", shown_name(name)),
                    "a credential name is 1-64 of A-Z a-z 0-9 _ -",
                ));
            }
            let hmac = k.kind != KeyKind::Cdp;
            let any_env =
                k.key_env.is_some() || k.secret_env.is_some() || k.passphrase_env.is_some();
            match (&k.file, any_env) {
                (Some(_), true) => {
                    return Err(invalid(
                        at("file"),
                        "give either file or key_env/secret_env, not both",
                    ))
                }
                (None, false) => {
                    return Err(invalid(
                        at("file"),
                        "is missing: give the credential's JSON file (or key_env and secret_env)",
                    ))
                }
                (Some(f), false) if f.as_os_str().is_empty() => {
                    return Err(invalid(at("file"), "must be a file path"))
                }
                (None, true) => {
                    let need: &[(&str, &Option<String>)] = if hmac {
                        &[
                            ("key_env", &k.key_env),
                            ("secret_env", &k.secret_env),
                            ("passphrase_env", &k.passphrase_env),
                        ]
                    } else {
                        &[("key_env", &k.key_env), ("secret_env", &k.secret_env)]
                    };
                    for (field, v) in need {
                        match v {
                            None => {
                                return Err(invalid(
                                    at(field),
                                    format!(
                                        "is missing: a {} credential from the environment needs {}",
                                        k.kind.as_str(),
                                        need.iter().map(|(f, _)| *f).collect::<Vec<_>>().join(", ")
                                    ),
                                ))
                            }
                            Some(var) if !valid_env_name(var) => {
                                return Err(invalid(
                                    at(field),
                                    "must be an environment variable name such as EXCHANGE_API_SECRET (the name, not the value)",
                                ))
                            }
                            Some(_) => {}
                        }
                    }
                    if !hmac && k.passphrase_env.is_some() {
                        return Err(invalid(
                            at("passphrase_env"),
                            "CDP keys have no passphrase; remove it, or set kind to exchange, prime or intx",
                        ));
                    }
                }
                (Some(_), false) => {}
            }
        }
        Ok(())
    }
}

fn shown_name(name: &str) -> String {
    if valid_key_name(name) {
        name.to_owned()
    } else {
        shown(name)
    }
}

fn valid_env_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !v.as_bytes()[0].is_ascii_digit()
}

/// The default `state_dir` from the environment map: systemd's `$STATE_DIRECTORY` (its first
/// entry), else `$XDG_STATE_HOME/cbgate`, else `$HOME/.local/state/cbgate`. Relative values are
/// ignored, as the XDG spec says.
fn default_state_dir(env: &HashMap<String, String>) -> Option<PathBuf> {
    let abs = |v: &str| {
        let p = PathBuf::from(v);
        (!v.is_empty() && p.is_absolute()).then_some(p)
    };
    if let Some(d) = env
        .get("STATE_DIRECTORY")
        .and_then(|v| abs(v.split(':').next().unwrap_or("")))
    {
        return Some(d);
    }
    if let Some(d) = env.get("XDG_STATE_HOME").and_then(|v| abs(v)) {
        return Some(d.join("cbgate"));
    }
    env.get("HOME")
        .and_then(|v| abs(v))
        .map(|h| h.join(".local/state/cbgate"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn load_toml(text: &str) -> Result<Config, ConfigError> {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(text.as_bytes()).expect("write");
        Config::load(&Sources {
            file: Some(f.path().to_owned()),
            ..Sources::default()
        })
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::load(&Sources::default()).expect("defaults");
        assert_eq!(c.listen, vec!["127.0.0.1:8750".parse().expect("addr")]);
        assert_eq!(c.max_body_bytes, 1 << 20);
        assert_eq!(c.routes, default_routes());
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.upstream.request_timeout, Duration::from_secs(30));
    }

    #[test]
    fn upstream_limits_must_be_positive_and_consistent() {
        for (text, key) in [
            ("[upstream]\nmax_in_flight = 0", "upstream.max_in_flight"),
            (
                "[upstream]\nmax_connections_per_host = 0",
                "upstream.max_connections_per_host",
            ),
            (
                "[upstream]\npool_max_idle_per_host = 0",
                "upstream.pool_max_idle_per_host",
            ),
            (
                "[upstream]\nqueue_timeout = \"0s\"",
                "upstream.queue_timeout",
            ),
            (
                "[upstream]\npool_idle_timeout = \"0s\"",
                "upstream.pool_idle_timeout",
            ),
            (
                "[upstream]\nmax_connections_per_host = 4\npool_max_idle_per_host = 8",
                "upstream.pool_max_idle_per_host",
            ),
        ] {
            let e = load_toml(text).expect_err(text);
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn shipped_example_is_valid_and_equals_the_defaults() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/cbgate.toml");
        let c = Config::load(&Sources {
            file: Some(path),
            ..Sources::default()
        })
        .expect("config/cbgate.toml loads");
        let d = Config::default();
        assert_eq!(c.listen, d.listen);
        assert_eq!(c.routes, d.routes);
        assert_eq!(c.ws_routes, d.ws_routes);
        assert_eq!(c.ws.max_message_bytes, d.ws.max_message_bytes);
        assert_eq!(c.ws.max_sessions, d.ws.max_sessions);
        assert_eq!(c.ws.max_client_message_bytes, d.ws.max_client_message_bytes);
        assert_eq!(c.ws.subscribe_timeout, d.ws.subscribe_timeout);
        assert_eq!(c.ws.idle_timeout, d.ws.idle_timeout);
        assert_eq!(c.max_body_bytes, d.max_body_bytes);
        assert_eq!(c.header_read_timeout, d.header_read_timeout);
        assert_eq!(c.idle_timeout, d.idle_timeout);
        assert_eq!(c.body_timeout, d.body_timeout);
        assert_eq!(c.admin_max_connections, d.admin_max_connections);
        assert_eq!(c.upstream.connect_timeout, d.upstream.connect_timeout);
        assert_eq!(c.upstream.request_timeout, d.upstream.request_timeout);
        assert_eq!(c.upstream.pool_idle_timeout, d.upstream.pool_idle_timeout);
        assert_eq!(
            c.upstream.pool_max_idle_per_host,
            d.upstream.pool_max_idle_per_host
        );
        assert_eq!(
            c.upstream.max_connections_per_host,
            d.upstream.max_connections_per_host
        );
        assert_eq!(c.upstream.max_in_flight, d.upstream.max_in_flight);
        assert_eq!(c.upstream.queue_timeout, d.upstream.queue_timeout);
        assert_eq!(c.log.level, d.log.level);
        assert_eq!(c.log.format, d.log.format);
        assert_eq!(c.policy.permission, d.policy.permission);
        assert_eq!(c.unsafe_listen, d.unsafe_listen);
        assert_eq!(c.allowed_origins, d.allowed_origins);
        assert_eq!(c.allowed_hosts, d.allowed_hosts);
        assert_eq!(c.max_connections, d.max_connections);
        assert_eq!(c.max_headers, d.max_headers);
        assert_eq!(c.admin_listen, d.admin_listen);
        assert_eq!(c.shutdown_timeout, d.shutdown_timeout);
        assert_eq!(c.clock_check_interval, d.clock_check_interval);
        assert_eq!(c.audit.file, d.audit.file);
        assert_eq!(c.audit.max_file_bytes, d.audit.max_file_bytes);
        assert_eq!(c.audit.keep, d.audit.keep);
        assert_eq!(
            c.key.allow_insecure_permissions,
            d.key.allow_insecure_permissions
        );
        assert_eq!(c.guard, d.guard);
        assert_eq!(c.state_dir, d.state_dir);
        assert_eq!(c.admin_token_file, d.admin_token_file);
        assert_eq!(c.clients, d.clients);
        assert_eq!(c.unix_mode, d.unix_mode);
        assert_eq!(c.tls, d.tls);
        assert_eq!(c.intercept, d.intercept);
        assert_eq!(c.budget, d.budget);
    }

    #[test]
    fn guard_decimals_are_exact_and_limits_are_checked() {
        let c = load_toml(
            "[guard]\nmax_order_base = \"0.1\"\nmax_order_quote = 0.1\nproducts = [\"BTC-USD\"]\nmax_orders_per_minute = 5\n",
        )
        .expect("load");
        let tenth: rust_decimal::Decimal = "0.1".parse().expect("decimal");
        assert_eq!(c.guard.max_order_base, Some(tenth));
        assert_eq!(c.guard.max_order_quote, Some(tenth));
        assert!(c.guard.is_active());
        for (text, key) in [
            (
                "[guard]\nmax_orders_per_minute = 0",
                "guard.max_orders_per_minute",
            ),
            ("[guard]\nmax_order_quote = \"-1\"", "guard.max_order_quote"),
            ("[guard]\nmax_order_base = \"lots\"", "max_order_base"),
            ("[guard]\nsides = [\"HOLD\"]", "guard.sides"),
            ("[guard]\norder_types = [\"iceberg\"]", "guard.order_types"),
            ("[guard]\nproducts = [\"BTC USD\"]", "guard.products"),
            ("state_dir = \"relative\"", "state_dir"),
        ] {
            let e = load_toml(text).expect_err(text);
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn guard_from_the_environment() {
        let env = HashMap::from([
            (
                "CBGATE_GUARD__PRODUCTS".to_string(),
                "BTC-USD,ETH-USD".to_string(),
            ),
            (
                "CBGATE_GUARD__MAX_ORDER_QUOTE".to_string(),
                "2500.5".to_string(),
            ),
            ("CBGATE_GUARD__SIDES".to_string(), "BUY".to_string()),
        ]);
        let c = Config::load(&Sources {
            env,
            ..Sources::default()
        })
        .expect("load");
        assert_eq!(c.guard.products, ["BTC-USD", "ETH-USD"]);
        assert_eq!(c.guard.sides, ["BUY"]);
        assert_eq!(
            c.guard.max_order_quote,
            Some("2500.5".parse().expect("dec"))
        );
    }

    #[test]
    fn state_dir_default_follows_systemd_then_xdg_then_home() {
        let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let all = env(&[
            ("STATE_DIRECTORY", "/var/lib/cbgate:/var/lib/other"),
            ("XDG_STATE_HOME", "/x"),
            ("HOME", "/home/u"),
        ]);
        assert_eq!(default_state_dir(&all), Some("/var/lib/cbgate".into()));
        let xdg = env(&[("XDG_STATE_HOME", "/x"), ("HOME", "/home/u")]);
        assert_eq!(default_state_dir(&xdg), Some("/x/cbgate".into()));
        let home = env(&[("XDG_STATE_HOME", "rel"), ("HOME", "/home/u")]);
        assert_eq!(
            default_state_dir(&home),
            Some("/home/u/.local/state/cbgate".into())
        );
        assert_eq!(default_state_dir(&HashMap::new()), None);
    }

    #[test]
    fn https_listeners_tls_files_and_intercept() {
        let c = load_toml(
            "listen = [\"127.0.0.1:8750\", \"https://127.0.0.1:8443\", \"https://[::1]:8443/\"]\n\
             [intercept]\nenabled = true\n",
        )
        .expect("valid");
        assert_eq!(
            c.listen,
            vec![
                ListenAddr::Tcp("127.0.0.1:8750".parse().expect("addr")),
                ListenAddr::Tls("127.0.0.1:8443".parse().expect("addr")),
                ListenAddr::Tls("[::1]:8443".parse().expect("addr")),
            ]
        );
        assert!(c.needs_client_tls() && c.intercept.enabled);
        assert_eq!(c.listen[1].to_string(), "https://127.0.0.1:8443");
        assert_eq!(
            c.upstream_hosts(),
            // The default routes' hosts, REST then WebSocket: the local CA is constrained to
            // these and intercept answers CONNECT for them.
            [
                "api.coinbase.com",
                "api.cdp.coinbase.com",
                "drb.coinbase.com",
                "api.exchange.coinbase.com",
                "api.prime.coinbase.com",
                "api.international.coinbase.com",
                "advanced-trade-ws.coinbase.com",
                "advanced-trade-ws-user.coinbase.com",
                "ws-feed.exchange.coinbase.com"
            ]
        );
        assert!(!Config::default().needs_client_tls());
        for (text, key) in [
            ("listen = [\"https://0.0.0.0:8443\"]", "listen"),
            ("listen = [\"http://127.0.0.1:8750\"]", "listen"),
            ("listen = [\"https://localhost:8443\"]", "listen"),
            ("[tls]\ncert_file = \"/c.pem\"", "tls.key_file"),
            ("[tls]\nkey_file = \"/k.pem\"", "tls.cert_file"),
            ("[intercept]\nenabled = true\nother = 1", "intercept"),
        ] {
            let e = load_toml(text).expect_err(text).to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn env_list_of_listeners() {
        let env = HashMap::from([(
            "CBGATE_LISTEN".to_string(),
            "127.0.0.1:1,unix:/run/x.sock".to_string(),
        )]);
        let c = Config::load(&Sources {
            env,
            ..Sources::default()
        })
        .expect("load");
        assert_eq!(
            c.listen,
            vec![
                ListenAddr::Tcp("127.0.0.1:1".parse().expect("addr")),
                ListenAddr::Unix("/run/x.sock".into())
            ]
        );
    }

    #[test]
    fn layers_override_in_order() {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(
            f,
            "max_body_bytes = 10\nlisten = [\"127.0.0.1:1\"]\n[key]\nfile = \"/a\""
        )
        .expect("write");
        let env = HashMap::from([
            ("CBGATE_MAX_BODY_BYTES".to_string(), "20".to_string()),
            ("CBGATE_KEY__FILE".to_string(), "/b".to_string()),
            ("CBGATE_CONFIG".to_string(), "/ignored".to_string()),
            (
                "CBGATE_URL".to_string(),
                "http://127.0.0.1:8750".to_string(),
            ),
            ("OTHER".to_string(), "x".to_string()),
        ]);
        let c = Config::load(&Sources {
            file: Some(f.path().to_owned()),
            env,
            listen: vec!["unix:/tmp/x.sock".into()],
            admin_listen: None,
            key_file: Some("/c".into()),
        })
        .expect("load");
        assert_eq!(c.max_body_bytes, 20, "env beats file");
        assert_eq!(c.key.file, Some(PathBuf::from("/c")), "flag beats env");
        assert_eq!(c.listen, vec![ListenAddr::Unix("/tmp/x.sock".into())]);
    }

    #[test]
    fn resolve_table_keeps_dotted_host_names() {
        let c = load_toml(
            "[upstream]\nconnect_timeout = \"250ms\"\n[upstream.resolve]\n\"api.coinbase.com\" = \"127.0.0.1:8443\"\n",
        )
        .expect("load");
        assert_eq!(
            c.upstream.resolve.get("api.coinbase.com"),
            Some(&"127.0.0.1:8443".parse().expect("addr"))
        );
        assert_eq!(c.upstream.connect_timeout, Duration::from_millis(250));
    }

    #[test]
    fn key_material_is_told_from_paths_addresses_and_names() {
        use base64::Engine as _;
        for plain in [
            "/etc/cbgate/cdp_api_key.json",
            "/run/secrets/cbgate-token",
            "127.0.0.1:8750",
            "unix:/run/cbgate/cbgate.sock",
            "https://api.coinbase.com",
            "/api/v3/brokerage/orders/**",
            "cbgate=debug,hyper=info",
            "lisen",
        ] {
            assert!(!looks_like_key_material(plain), "{plain}");
            assert_eq!(shown(plain), format!("{plain:?}"));
        }
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![0x5au8; n]);
        for secret in [
            "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----\n".to_owned(),
            "-----BEGIN EC PRIVATE KEY-----MHcCAQEE-----END EC PRIVATE KEY-----".to_owned(),
            b64(32),
            b64(64),
            "0123456789abcdef0123456789abcdef".to_owned(),
            "{\"name\": \"k\", \"privateKey\": \"x\"}".to_owned(),
        ] {
            assert!(looks_like_key_material(&secret), "{secret}");
            assert!(!shown(&secret).contains(&secret[..16]), "{secret}");
        }
    }

    #[test]
    fn env_lists_split_on_commas_for_every_list_key() {
        let env = HashMap::from([(
            "CBGATE_ALLOWED_HOSTS".to_string(),
            "gate.local, other.local".to_string(),
        )]);
        let c = Config::load(&Sources {
            env,
            ..Sources::default()
        })
        .expect("load");
        assert_eq!(c.allowed_hosts, vec!["gate.local", "other.local"]);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = load_toml("lisen = [\"127.0.0.1:1\"]").expect_err("unknown key");
        assert!(e.to_string().contains("lisen"), "{e}");
        let e = load_toml("[upstream]\nca_fil = \"x\"").expect_err("unknown nested key");
        assert!(e.to_string().contains("ca_fil"), "{e}");
        let e = load_toml("listen = [\"nowhere\"]").expect_err("bad address");
        assert!(e.to_string().contains("nowhere"), "{e}");
        let e = load_toml("max_body_bytes = \"lots\"").expect_err("bad number");
        assert!(e.to_string().contains("max_body_bytes"), "{e}");
        let e = load_toml("[[routes]]\nprefix = \"/x/\"\nupstream = \"http://plain\"")
            .expect_err("plain http upstream");
        assert!(e.to_string().contains("routes[0].upstream"), "{e}");
        let e = load_toml("[upstream]\nconnect_timeout = \"soon\"").expect_err("bad duration");
        assert!(e.to_string().contains("connect_timeout"), "{e}");
    }

    #[test]
    fn client_keys_and_default_key_name_configured_credentials() {
        const KEYS: &str =
            "[keys.bot]\nfile = \"/k/bot.json\"\n[keys.ops]\nfile = \"/k/ops.json\"\n";
        let c = load_toml(&format!(
            "{KEYS}[clients.bot]\nunix_uid = 1\nkeys = [\"bot\"]\ndefault_key = \"bot\"\n\
             [clients.any]\nunix_uid = 2\ndefault_key = \"ops\"\n\
             [clients.dflt]\nunix_uid = 3\nkeys = [\"default\", \"ops\"]\n"
        ))
        .expect("load");
        let bot = &c.clients.named["bot"];
        assert_eq!(bot.keys.as_deref(), Some(&["bot".to_owned()][..]));
        assert_eq!(bot.default_key.as_deref(), Some("bot"));
        assert!(bot.may_use("bot") && !bot.may_use("ops") && !bot.may_use(DEFAULT_KEY));
        // Unset keys: every credential.
        assert!(c.clients.named["any"].may_use("ops") && c.clients.named["any"].may_use("x"));
        assert!(c.clients.named["dflt"].may_use(DEFAULT_KEY));
        for (text, key, words) in [
            (
                "[clients.bot]\nunix_uid = 1\nkeys = [\"bot\", \"nope\"]\ndefault_key = \"bot\"",
                "clients.bot.keys[1]",
                "\"nope\" is not a configured credential; add [keys.nope] or use one of: default, bot, ops",
            ),
            (
                "[clients.bot]\nunix_uid = 1\ndefault_key = \"nope\"",
                "clients.bot.default_key",
                "\"nope\" is not a configured credential",
            ),
            (
                "[clients.bot]\nunix_uid = 1\nkeys = [\"bot\"]\ndefault_key = \"ops\"",
                "clients.bot.default_key",
                "ops is not in clients.bot.keys (bot)",
            ),
            (
                "[clients.bot]\nunix_uid = 1\nkeys = [\"bot\", \"ops\"]",
                "clients.bot.default_key",
                "set default_key to one of: bot, ops",
            ),
            (
                "[clients.bot]\nunix_uid = 1\nkeys = []",
                "clients.bot.keys",
                "is empty",
            ),
            (
                "[clients.bot]\nunix_uid = 1\nkey = \"bot\"",
                "clients.bot.key",
                "did you mean clients.bot.keys?",
            ),
        ] {
            let e = load_toml(&format!("{KEYS}{text}")).expect_err(text);
            let shown = e.to_string();
            assert!(shown.contains(key) && shown.contains(words), "{text}: {shown}");
        }
    }

    #[test]
    fn client_identities_parse_and_are_checked() {
        let c = load_toml(
            "[policy]\npermission = \"trade\"\n[clients]\nrequire = true\n\
             [clients.dash]\ntoken_file = \"/etc/cbgate/dash.token\"\npermission = \"view\"\n\
             [clients.bot]\nunix_uid = 1001\nunix_gid = 1001\n\
             [[clients.bot.rules]]\naction = \"deny\"\nmethods = [\"POST\"]\npath = \"/api/v3/brokerage/orders/edit\"\n",
        )
        .expect("load");
        assert!(c.clients.require && c.identity_required());
        assert_eq!(c.clients.named["dash"].permission, Some(Permission::View));
        assert_eq!(c.clients.named["bot"].unix_uid, Some(1001));
        assert_eq!(c.clients.named["bot"].rules.len(), 1);
        // A group-readable socket warns only while unknown peers get the global ceiling.
        let group = |require: bool| {
            load_toml(&format!(
                "listen = [\"unix:/run/cbgate.sock\"]\nunix_mode = \"0660\"\n[clients]\nrequire = {require}\n[clients.bot]\nunix_uid = 1001\n"
            ))
            .expect("load")
            .group_socket_warning()
        };
        assert!(group(false).is_some_and(|w| w.contains("clients.require = true")));
        let limited = |require: bool| {
            load_toml(&format!(
                "[clients]\nrequire = {require}\n[clients.bot]\nunix_uid = 1\n[clients.bot.guard]\nmax_orders_per_minute = 5\n"
            ))
            .expect("config")
            .unenforced_limits_warning()
        };
        assert!(limited(false)
            .is_some_and(|w| w.contains("bot") && w.contains("clients.require = true")));
        assert_eq!(limited(true), None);
        assert!(group(true).is_none());
        for (text, key, words) in [
            (
                "[policy]\npermission = \"trade\"\n[clients.ops]\nunix_uid = 1\npermission = \"transfer\"",
                "clients.ops.permission",
                "policy.permission = \"trade\"",
            ),
            ("[clients.ops]\nunix_uid = 1\npermision = \"view\"", "clients.ops.permision", "permission"),
            ("[clients.ops]\npermission = \"view\"", "clients.ops", "recognises nobody"),
            ("[clients]\nrequire = true", "clients.require", "no client identity is configured"),
            (
                "[clients.ops]\nunix_uid = 1\nbudget_share = 1.5",
                "clients.ops.budget_share",
                "at most 1",
            ),
            ("[clients.Ops]\nunix_uid = 1", "clients.Ops", "a-z"),
            ("[clients.anonymous]\nunix_uid = 1", "clients.anonymous", "cbgate's own"),
            (
                "[clients.a]\nunix_uid = 7\n[clients.b]\nunix_uid = 7",
                "clients.b.unix_uid",
                "clients.a.unix_uid",
            ),
            (
                "[clients.a]\nunix_gid = 7\n[clients.b]\nunix_gid = 7",
                "clients.b.unix_gid",
                "clients.a.unix_gid",
            ),
            (
                "[clients.a]\nunix_uid = 7\n[[clients.a.rules]]\naction = \"deny\"\npath = \"v2\"",
                "clients.a.rules[0].path",
                "",
            ),
            ("unix_mode = \"0666\"", "unix_mode", "clients.require = true"),
            ("unix_mode = \"0400\"", "unix_mode", "0600"),
            ("unix_mode = \"rw\"", "unix_mode", "octal"),
            (
                "client_token_file = \"/t\"\n[clients.default]\nunix_uid = 1",
                "clients.default",
                "client_token_file",
            ),
            (
                "listen = [\"0.0.0.0:8750\"]\nunsafe_listen = true\n[clients]\nrequire = true\n[clients.a]\nunix_uid = 1",
                "listen",
                "unsafe_listen",
            ),
        ] {
            let e = load_toml(text).expect_err(text).to_string();
            assert!(e.contains(key) && e.contains(words), "{text}: {e}");
        }
        let c =
            load_toml("unix_mode = \"0666\"\n[clients]\nrequire = true\n[clients.a]\nunix_uid = 1")
                .expect("0666 with require");
        assert_eq!(c.unix_mode, UnixMode(0o666));
        let c = load_toml(
            "listen = [\"0.0.0.0:8750\"]\nunsafe_listen = true\n[clients]\nrequire = true\n[clients.a]\ntoken_file = \"/t\"",
        )
        .expect("a token identity required on a public listener");
        assert_eq!(c.unix_mode, UnixMode(0o600));
        let env = HashMap::from([
            ("CBGATE_CLIENTS__REQUIRE".to_string(), "true".to_string()),
            (
                "CBGATE_CLIENTS__BOT__UNIX_UID".to_string(),
                "1001".to_string(),
            ),
            ("CBGATE_UNIX_MODE".to_string(), "0660".to_string()),
        ]);
        let c = Config::load(&Sources {
            env,
            ..Sources::default()
        })
        .expect("env");
        assert!(c.clients.require);
        assert_eq!(c.clients.named["bot"].unix_uid, Some(1001));
        assert_eq!(c.unix_mode, UnixMode(0o660));
    }

    #[test]
    fn named_keys_and_route_keys_are_checked() {
        let c = load_toml(
            "[keys.ex]\nkind = \"exchange\"\nfile = \"/k/ex.json\"\n[keys.p]\nkind = \"prime\"\nkey_env = \"PK\"\nsecret_env = \"PS\"\npassphrase_env = \"PP\"\n[[routes]]\nprefix = \"/exchange/\"\nupstream = \"https://api.exchange.coinbase.com\"\nstrip_prefix = true\nkey = \"ex\"\n",
        )
        .expect("valid");
        assert_eq!(c.keys["ex"].kind, KeyKind::Exchange);
        assert_eq!(c.keys["p"].key_env.as_deref(), Some("PK"));
        assert_eq!(c.routes[0].key.as_deref(), Some("ex"));
        for (text, want) in [
            ("[keys.default]\nfile = \"/k\"", "keys.default"),
            ("[keys.a]\nkind = \"exchange\"", "keys.a.file"),
            ("[keys.a]\nfile = \"/k\"\nkey_env = \"X\"", "not both"),
            ("[keys.a]\nkind = \"intx\"\nkey_env = \"K\"\nsecret_env = \"S\"", "keys.a.passphrase_env"),
            ("[keys.a]\nkey_env = \"K\"\nsecret_env = \"my secret\"", "environment variable name"),
            ("[keys.a]\nkind = \"hmac\"\nfile = \"/k\"", "kind"),
            ("[keys.\"a b\"]\nfile = \"/k\"", "1-64"),
            ("[[routes]]\nprefix = \"/x/\"\nupstream = \"https://api.coinbase.com\"\nkey = \"nope\"", "routes[0].key"),
            ("[keys.ex]\nkind = \"exchange\"\nfile = \"/k\"\n[[routes]]\nprefix = \"/x/\"\nupstream = \"https://api.coinbase.com\"\nkey = \"ex\"", "takes cdp keys"),
            ("[[routes]]\nprefix = \"/exchange/\"\nupstream = \"https://api.exchange.coinbase.com\"\nkey = \"default\"", "takes exchange keys"),
            ("[[routes]]\nprefix = \"/x\"\nupstream = \"https://api.coinbase.com\"\nstrip_prefix = true", "end with /"),
        ] {
            let e = load_toml(text).expect_err(text);
            assert!(e.to_string().contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn zero_websocket_limits_are_refused_naming_the_key() {
        for (toml, key) in [
            (
                "[ws]\nmax_client_message_bytes = 0",
                "ws.max_client_message_bytes",
            ),
            ("[ws]\nsubscribe_timeout = \"0s\"", "ws.subscribe_timeout"),
            ("[ws]\nidle_timeout = \"0s\"", "ws.idle_timeout"),
        ] {
            let e = load_toml(toml).expect_err(key);
            assert!(e.to_string().contains(key), "{e}");
        }
        let c = load_toml("[ws]\nsubscribe_timeout = \"10s\"\nmax_client_message_bytes = 4096")
            .expect("valid");
        assert_eq!(c.ws.subscribe_timeout, Duration::from_secs(10));
        assert_eq!(c.ws.max_client_message_bytes, 4096);
    }

    #[test]
    fn each_upstream_pool_keeps_at_most_its_share_of_the_per_host_slots_idle() {
        let idle = |toml: &str| {
            let c = load_toml(toml).expect("load");
            let warned = c
                .warnings()
                .iter()
                .any(|w| w.contains("max_connections_per_host"));
            (c.pool_max_idle(), warned)
        };
        // The shared runtime has one pool for everything: pool_max_idle_per_host as set.
        assert_eq!(idle("[runtime]\nmodel = \"shared\"\n"), ((16, 16), false));
        // Two workers: 64 / 2 = 32 each, capped at 16; cbgate's own calls keep none.
        assert_eq!(idle("[runtime]\nthreads = 2\n"), ((16, 0), false));
        assert_eq!(
            idle("[runtime]\nthreads = 2\n[upstream]\nmax_connections_per_host = 13\npool_max_idle_per_host = 13\n"),
            ((6, 0), false)
        );
        // The most threads with the default limit still keep one each.
        assert_eq!(idle("[runtime]\nthreads = 64\n"), ((1, 0), false));
        // Fewer slots than workers: no idle connections (and a warning), never a starved worker.
        assert_eq!(
            idle("[runtime]\nthreads = 4\n[upstream]\nmax_connections_per_host = 3\npool_max_idle_per_host = 3\n"),
            ((0, 0), true)
        );
    }
}
