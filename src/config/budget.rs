//! `[budget]`: the rate budget per credential and request class (see `gate::budget`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, ConfigError};

/// One class's limit: `rate` requests per `per`, with bursts of up to `burst` requests.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClassLimit {
    /// Requests allowed per `per`.
    pub rate: f64,
    /// The period `rate` is counted over (default 1 s).
    #[serde(default = "one_second", with = "humantime_serde")]
    pub per: Duration,
    /// Requests that may go at once after a quiet spell; default: one second's worth of
    /// `rate` (at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
}

fn one_second() -> Duration {
    Duration::from_secs(1)
}

impl ClassLimit {
    const fn new(rate: f64, per_secs: u64, burst: u32) -> ClassLimit {
        ClassLimit {
            rate,
            per: Duration::from_secs(per_secs),
            burst: Some(burst),
        }
    }

    /// Requests per second.
    pub fn per_second(&self) -> f64 {
        self.rate / self.per.as_secs_f64()
    }

    /// The burst, or one second's worth of the rate (at least 1).
    pub fn burst(&self) -> u32 {
        self.burst
            .unwrap_or_else(|| (self.per_second().floor() as u32).max(1))
    }
}

/// What a request does when the Redis holding the shared budget cannot be reached.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RedisUnavailable {
    /// Spend a per-process share of the budget (rate / `budget.replicas`).
    #[default]
    Local,
    /// Refuse with 503 `budget_unavailable`.
    Refuse,
}

/// `[budget]`. Defaults are Coinbase's published limits. Debug shows `redis` with any
/// password redacted.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Whether requests are held to the budget at all.
    pub enabled: bool,
    /// How long a request over budget waits for a token before 429 `budget_exhausted`.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// How long a pause learnt from Coinbase (a 429, `x-ratelimit-remaining: 0`) lasts at most.
    #[serde(with = "humantime_serde")]
    pub max_pause: Duration,
    /// A 429 that says nothing of when to come back pauses the bucket this long.
    #[serde(with = "humantime_serde")]
    pub default_pause: Duration,
    /// `redis://host:port/db` or `rediss://...`: keep the buckets in Redis, shared by replicas.
    pub redis: Option<String>,
    /// File holding the Redis password (AUTH), rather than a password in the URL.
    pub redis_password_file: Option<PathBuf>,
    /// PEM file of the CA that signed the Redis server's certificate (`rediss://`); without
    /// it, the system's roots are trusted.
    pub redis_ca_file: Option<PathBuf>,
    /// With `redis`: share the kill switch through it, so a halt on one replica halts all.
    pub shared_halt: bool,
    /// How often each replica reads the shared halt (one small Redis call).
    #[serde(with = "humantime_serde")]
    pub halt_poll: Duration,
    /// This replica's name in the shared halt's source (default: host name and process id).
    pub replica_name: Option<String>,
    /// Every Redis call gives up after this; the request then goes on as `redis_unavailable` says.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// Connecting (TCP, TLS, AUTH, script load), in the background.
    #[serde(with = "humantime_serde")]
    pub redis_connect_timeout: Duration,
    /// What to do while Redis is unreachable.
    pub redis_unavailable: RedisUnavailable,
    /// How many cbgate processes share the budget: a process falling back to a local budget
    /// spends rate / replicas.
    pub replicas: u32,
    /// Prefix of the Redis keys.
    pub redis_key_prefix: String,
    pub advanced_private: ClassLimit,
    pub advanced_public: ClassLimit,
    pub ws_connect: ClassLimit,
    pub app_v2: ClassLimit,
    pub cdp_read: ClassLimit,
    pub cdp_write: ClassLimit,
    pub exchange: ClassLimit,
    pub prime: ClassLimit,
    pub intx: ClassLimit,
}

impl std::fmt::Debug for BudgetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redis = self.redis.as_deref().map(|u| match url::Url::parse(u) {
            Ok(mut p) => {
                if p.password().is_some() {
                    let _ = p.set_password(Some("***"));
                }
                p.to_string()
            }
            Err(_) => "(not a URL)".to_owned(),
        });
        f.debug_struct("BudgetConfig")
            .field("enabled", &self.enabled)
            .field("max_wait", &self.max_wait)
            .field("max_pause", &self.max_pause)
            .field("default_pause", &self.default_pause)
            .field("redis", &redis)
            .field("redis_password_file", &self.redis_password_file)
            .field("redis_ca_file", &self.redis_ca_file)
            .field("shared_halt", &self.shared_halt)
            .field("halt_poll", &self.halt_poll)
            .field("replica_name", &self.replica_name)
            .field("redis_timeout", &self.redis_timeout)
            .field("redis_connect_timeout", &self.redis_connect_timeout)
            .field("redis_unavailable", &self.redis_unavailable)
            .field("replicas", &self.replicas)
            .field("redis_key_prefix", &self.redis_key_prefix)
            .field("classes", &self.classes())
            .finish()
    }
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            enabled: true,
            max_wait: Duration::from_secs(1),
            max_pause: Duration::from_secs(60),
            default_pause: Duration::from_secs(1),
            redis: None,
            redis_password_file: None,
            redis_ca_file: None,
            shared_halt: true,
            halt_poll: Duration::from_millis(250),
            replica_name: None,
            redis_timeout: Duration::from_millis(50),
            redis_connect_timeout: Duration::from_secs(1),
            redis_unavailable: RedisUnavailable::Local,
            replicas: 1,
            redis_key_prefix: "cbgate:budget".into(),
            advanced_private: ClassLimit::new(30.0, 1, 30),
            advanced_public: ClassLimit::new(10.0, 1, 10),
            ws_connect: ClassLimit::new(8.0, 1, 8),
            app_v2: ClassLimit::new(10_000.0, 3600, 100),
            cdp_read: ClassLimit::new(600.0, 10, 60),
            cdp_write: ClassLimit::new(500.0, 10, 50),
            exchange: ClassLimit::new(15.0, 1, 30),
            prime: ClassLimit::new(25.0, 1, 50),
            intx: ClassLimit::new(100.0, 1, 100),
        }
    }
}

impl BudgetConfig {
    /// Every class by its configuration key.
    pub fn classes(&self) -> [(&'static str, &ClassLimit); 9] {
        [
            ("advanced_private", &self.advanced_private),
            ("advanced_public", &self.advanced_public),
            ("ws_connect", &self.ws_connect),
            ("app_v2", &self.app_v2),
            ("cdp_read", &self.cdp_read),
            ("cdp_write", &self.cdp_write),
            ("exchange", &self.exchange),
            ("prime", &self.prime),
            ("intx", &self.intx),
        ]
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, d) in [
            ("budget.max_wait", self.max_wait),
            ("budget.max_pause", self.max_pause),
            ("budget.redis_timeout", self.redis_timeout),
            ("budget.redis_connect_timeout", self.redis_connect_timeout),
            ("budget.halt_poll", self.halt_poll),
        ] {
            if d.is_zero() {
                return Err(invalid(name, "must be greater than 0"));
            }
        }
        if self.default_pause > self.max_pause {
            return Err(invalid(
                "budget.default_pause",
                "must not exceed budget.max_pause",
            ));
        }
        if self.replicas == 0 {
            return Err(invalid("budget.replicas", "must be at least 1"));
        }
        if self.redis_key_prefix.is_empty() || self.redis_key_prefix.contains(' ') {
            return Err(invalid(
                "budget.redis_key_prefix",
                "must be a non-empty word, e.g. \"cbgate:budget\"",
            ));
        }
        if let Some(u) = &self.redis {
            match url::Url::parse(u) {
                Ok(p) if p.scheme() == "redis" || p.scheme() == "rediss" => {
                    if p.host_str().is_none_or(str::is_empty) {
                        return Err(invalid("budget.redis", "names no host"));
                    }
                }
                // The URL may hold a password: never quoted.
                _ => {
                    return Err(invalid(
                        "budget.redis",
                        "must be redis://host:port/db or rediss://host:port/db",
                    ))
                }
            }
        }
        if self.redis_password_file.is_some() && self.redis.is_none() {
            return Err(invalid(
                "budget.redis_password_file",
                "is set but budget.redis is not",
            ));
        }
        if let Some(n) = &self.replica_name {
            if n.trim().is_empty() || n.chars().count() > 64 || n.chars().any(char::is_control) {
                return Err(invalid(
                    "budget.replica_name",
                    "must be 1 to 64 printable characters, e.g. \"cbgate-a\"",
                ));
            }
        }
        if self.redis_ca_file.is_some() {
            let tls = self
                .redis
                .as_deref()
                .and_then(|u| url::Url::parse(u).ok())
                .is_some_and(|u| u.scheme() == "rediss");
            if !tls {
                return Err(invalid(
                    "budget.redis_ca_file",
                    "is set but budget.redis is not a rediss:// URL (TLS)",
                ));
            }
        }
        for (name, c) in self.classes() {
            if !(c.rate.is_finite() && c.rate > 0.0) {
                return Err(invalid(
                    format!("budget.{name}.rate"),
                    "must be a number greater than 0",
                ));
            }
            if c.per.is_zero() {
                return Err(invalid(
                    format!("budget.{name}.per"),
                    "must be greater than 0",
                ));
            }
            if c.burst == Some(0) {
                return Err(invalid(
                    format!("budget.{name}.burst"),
                    "must be at least 1",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn bad_budget_values_name_the_key_and_never_show_a_password() {
        for (text, key) in [
            ("[budget]\nmax_wait = \"0s\"", "budget.max_wait"),
            ("[budget]\nreplicas = 0", "budget.replicas"),
            (
                "[budget.advanced_private]\nrate = 0",
                "budget.advanced_private.rate",
            ),
            (
                "[budget.cdp_read]\nrate = 5\nburst = 0",
                "budget.cdp_read.burst",
            ),
            (
                "[budget]\nredis_password_file = \"/run/p\"",
                "budget.redis_password_file",
            ),
            (
                "[budget]\nredis = \"http://:hunter2-secret@h/0\"",
                "budget.redis",
            ),
            ("[budget.nope]\nrate = 1", "nope"),
            (
                "[budget]\nredis = \"redis://h:6379/0\"\nredis_ca_file = \"/ca.pem\"",
                "budget.redis_ca_file",
            ),
            ("[budget]\nreplica_name = \"\"", "budget.replica_name"),
            ("[budget]\nhalt_poll = \"0s\"", "budget.halt_poll"),
        ] {
            let e = Config::from_toml_str(text).expect_err(text).to_string();
            assert!(e.contains(key), "{text}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        let c = Config::from_toml_str("[budget]\nredis = \"redis://:hunter2-secret@h:6379/0\"")
            .expect("a password in the URL is allowed");
        let shown = format!("{:?}", c.budget);
        assert!(
            !shown.contains("hunter2") && shown.contains("***"),
            "{shown}"
        );
        let c = Config::from_toml_str("[budget.app_v2]\nrate = 100\nper = \"1m\"\n")
            .expect("partial class table");
        assert_eq!(c.budget.app_v2.per_second(), 100.0 / 60.0);
        assert_eq!(c.budget.app_v2.burst(), 1, "one second's worth, at least 1");
        assert_eq!(
            c.budget.advanced_private.rate, 30.0,
            "other classes keep defaults"
        );
    }
}
