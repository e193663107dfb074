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
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub mod pattern;

/// A configuration error; Display names the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    // Not marked as the source: the message already includes it, and `{:#}` would repeat it.
    Load(config::ConfigError),
    #[error("configuration file {0} does not exist")]
    FileMissing(PathBuf),
    #[error("configuration key {key}: {message}")]
    Invalid { key: String, message: String },
}

impl From<config::ConfigError> for ConfigError {
    fn from(e: config::ConfigError) -> Self {
        ConfigError::Load(e)
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
        s.parse::<SocketAddr>()
            .map(ListenAddr::Tcp)
            .map_err(|_| format!("{s:?} is not IP:PORT or unix:/path"))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
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
        let u = url::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        if u.scheme() != scheme {
            return Err(format!(
                "{url:?} must use {scheme}: cbgate only talks to Coinbase over verified TLS"
            ));
        }
        if !(u.path().is_empty() || u.path() == "/")
            || u.query().is_some()
            || u.fragment().is_some()
            || !u.username().is_empty()
            || u.password().is_some()
        {
            return Err(format!("{url:?} must be only scheme, host and port"));
        }
        let host = match u.host() {
            Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
            None => return Err(format!("{url:?} has no host")),
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
}

/// The built-in routes, used when the configuration names none.
pub fn default_routes() -> Vec<RouteConfig> {
    [
        ("/api/v3/", "https://api.coinbase.com"),
        ("/v2/", "https://api.coinbase.com"),
        ("/platform/", "https://api.cdp.coinbase.com"),
    ]
    .into_iter()
    .map(|(p, u)| RouteConfig {
        prefix: p.into(),
        upstream: u.into(),
    })
    .collect()
}

/// One WebSocket route: an upgrade request for exactly `path` goes to `upstream` (`wss://`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WsRouteConfig {
    /// Exact path, e.g. `/ws/user`.
    pub path: String,
    /// Upstream WebSocket URL, `wss://host[:port]`.
    pub upstream: String,
}

/// The built-in WebSocket routes (Advanced Trade market data and user data).
pub fn default_ws_routes() -> Vec<WsRouteConfig> {
    [
        ("/ws", "wss://advanced-trade-ws.coinbase.com"),
        ("/ws/user", "wss://advanced-trade-ws-user.coinbase.com"),
    ]
    .into_iter()
    .map(|(p, u)| WsRouteConfig {
        path: p.into(),
        upstream: u.into(),
    })
    .collect()
}

/// `[ws]`: WebSocket relay limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsConfig {
    /// Largest message accepted from either side (order book snapshots are several MB).
    pub max_message_bytes: usize,
    /// Open WebSocket sessions at most. An upgraded connection no longer counts against
    /// `max_connections`, so sessions have their own limit; more get 503.
    pub max_sessions: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            max_message_bytes: 64 * 1024 * 1024,
            max_sessions: 256,
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
}

/// The permission ceiling cbgate enforces, whatever the key itself may do.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
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
    /// Path pattern: `*` matches one segment, a final `**` any number of segments.
    pub path: String,
}

/// `[policy]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub permission: Permission,
    pub rules: Vec<RuleConfig>,
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
    /// How long an idle pooled connection is kept.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            ca_file: None,
            resolve: BTreeMap::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            pool_idle_timeout: Duration::from_secs(90),
        }
    }
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

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Proxy listeners.
    pub listen: Vec<ListenAddr>,
    /// Request bodies larger than this get 413.
    pub max_body_bytes: u64,
    /// Time a client has to send the request head (slow-header defence).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    pub key: KeyConfig,
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
    /// File holding the token clients must send as `cbgate-token`.
    pub client_token_file: Option<PathBuf>,
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
    /// How long in-flight requests and streams may take to finish after SIGTERM/SIGINT.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How often Coinbase's clock is measured (also once at start).
    #[serde(with = "humantime_serde")]
    pub clock_check_interval: Duration,
    /// The audit log.
    pub audit: AuditConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 8750)))],
            max_body_bytes: 1024 * 1024,
            header_read_timeout: Duration::from_secs(10),
            key: KeyConfig::default(),
            upstream: UpstreamConfig::default(),
            routes: default_routes(),
            ws_routes: default_ws_routes(),
            ws: WsConfig::default(),
            log: LogConfig::default(),
            policy: PolicyConfig::default(),
            unsafe_listen: false,
            client_token_file: None,
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            max_connections: 1024,
            max_headers: 100,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8751)),
            shutdown_timeout: Duration::from_secs(25),
            clock_check_interval: Duration::from_secs(300),
            audit: AuditConfig::default(),
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

impl Config {
    /// Builds the configuration from its layers and checks it.
    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        let mut b = config::Config::builder();
        if let Some(path) = &sources.file {
            if !path.exists() {
                return Err(ConfigError::FileMissing(path.clone()));
            }
            b = b.add_source(
                config::File::from(path.as_path())
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let env: config::Map<String, String> = sources
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("CBGATE_") && !NOT_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        b = b.add_source(
            config::Environment::with_prefix("CBGATE")
                .prefix_separator("_")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("listen")
                .try_parsing(true)
                .source(Some(env)),
        );
        if !sources.listen.is_empty() {
            b = b.set_override("listen", sources.listen.clone())?;
        }
        if let Some(a) = &sources.admin_listen {
            b = b.set_override("admin_listen", a.as_str())?;
        }
        if let Some(f) = &sources.key_file {
            b = b.set_override("key.file", f.to_string_lossy().into_owned())?;
        }
        let cfg: Config = b.build()?.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses and checks a TOML document alone (no environment, no flags): the file layer, for
    /// `cbgate check` of a document and for fuzzing the loader.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()?
            .try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot: non-empty lists, sane numbers, well-formed upstream URLs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(invalid("listen", "needs at least one address"));
        }
        for addr in &self.listen {
            if let ListenAddr::Tcp(a) = addr {
                let allowed = a.ip().is_loopback()
                    || (self.unsafe_listen && self.client_token_file.is_some());
                if !allowed {
                    return Err(invalid(
                        "listen",
                        format!(
                            "{a} is not a loopback address: anyone who reaches it could trade with your key; \
                             set unsafe_listen = true and client_token_file to require a client token"
                        ),
                    ));
                }
            }
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be greater than 0"));
        }
        if self.max_headers == 0 {
            return Err(invalid("max_headers", "must be greater than 0"));
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
                    format!("{:?} must start with /", r.prefix),
                ));
            }
            BaseUrl::parse(&r.upstream, "https")
                .map_err(|m| invalid(format!("{key}.upstream"), m))?;
        }
        for (i, r) in self.ws_routes.iter().enumerate() {
            let key = format!("ws_routes[{i}]");
            if !r.path.starts_with('/') {
                return Err(invalid(
                    format!("{key}.path"),
                    format!("{:?} must start with /", r.path),
                ));
            }
            BaseUrl::parse(&r.upstream, "wss")
                .map_err(|m| invalid(format!("{key}.upstream"), m))?;
        }
        if self.ws.max_message_bytes == 0 {
            return Err(invalid("ws.max_message_bytes", "must be greater than 0"));
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
            ("header_read_timeout", self.header_read_timeout),
            ("clock_check_interval", self.clock_check_interval),
        ] {
            if t.is_zero() {
                return Err(invalid(name, "must be greater than 0"));
            }
        }
        for host in self.upstream.resolve.keys() {
            if host.is_empty() || host.contains([':', '/', ' ']) {
                return Err(invalid(
                    format!("upstream.resolve.{host}"),
                    "must be a bare host name",
                ));
            }
        }
        Ok(())
    }
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
        assert_eq!(c.max_body_bytes, d.max_body_bytes);
        assert_eq!(c.header_read_timeout, d.header_read_timeout);
        assert_eq!(c.upstream.connect_timeout, d.upstream.connect_timeout);
        assert_eq!(c.upstream.request_timeout, d.upstream.request_timeout);
        assert_eq!(c.upstream.pool_idle_timeout, d.upstream.pool_idle_timeout);
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
}
