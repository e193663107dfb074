//! The buckets in Redis, shared by every cbgate replica: one Lua script takes a token (or
//! pauses a bucket) atomically, on Redis's own clock, so N processes together stay within the
//! limit. Every call has a short timeout; a failure marks Redis down, the request goes on as
//! `budget.redis_unavailable` says, and a background task reconnects. No request ever waits
//! on a connection attempt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use zeroize::Zeroizing;

use super::{BudgetError, Params};
use crate::config::BudgetConfig;
use crate::ops::metrics::BudgetMetrics;

/// The GCRA of `gcra.rs`, in microseconds of Redis's clock. KEYS[1]: the bucket (a hash of
/// `tat` and `pause`). ARGV: interval, capacity, "take" | "pause", pause length. Returns
/// {taken (0/1), wait, tokens left}. Numbers are written with %.0f: Lua's tostring would round
/// a microsecond timestamp to 14 digits.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local s = redis.call('HMGET', KEYS[1], 'tat', 'pause')
local tat = tonumber(s[1]) or now
local pause = tonumber(s[2]) or 0
if ARGV[3] == 'pause' then
  local till = now + tonumber(ARGV[4])
  if till > pause then
    pause = till
    redis.call('HSET', KEYS[1], 'pause', string.format('%.0f', pause))
  end
  local keep = math.max(pause, tat) - now
  redis.call('PEXPIRE', KEYS[1], math.floor(keep / 1000) + 1000)
  return {0, pause - now, 0}
end
if pause > now then
  return {0, pause - now, 0}
end
if tat < now then tat = now end
local nxt = tat + interval
local ahead = nxt - now
if ahead > capacity then
  return {0, ahead - capacity, 0}
end
redis.call('HSET', KEYS[1], 'tat', string.format('%.0f', nxt))
redis.call('PEXPIRE', KEYS[1], math.floor(ahead / 1000) + 1000)
return {1, 0, math.floor((capacity - ahead) / interval)}
";

/// What connecting to `budget.redis` needs besides the URL, read once by the binary: the
/// password (`budget.redis_password_file`) and the CA certificates to trust for `rediss://`
/// (`budget.redis_ca_file`, PEM; without it, the system's roots).
#[derive(Clone, Default)]
pub struct RedisAccess {
    /// The AUTH password, if not in the URL.
    pub password: Option<Zeroizing<String>>,
    /// PEM certificates of the CA that signed the Redis server's certificate.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for RedisAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisAccess")
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .finish()
    }
}

impl From<Option<Zeroizing<String>>> for RedisAccess {
    fn from(password: Option<Zeroizing<String>>) -> RedisAccess {
        RedisAccess {
            password,
            ca_pem: None,
        }
    }
}

/// A connection to `client` whose connect and every reply are bounded by `timeout`, with
/// `script` loaded: calls are then EVALSHA (the crate reloads it on NOSCRIPT).
pub async fn connect_with_script(
    client: &redis::Client,
    timeout: Duration,
    script: &redis::Script,
) -> redis::RedisResult<MultiplexedConnection> {
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let mut c = client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await?;
    script.prepare_invoke().load_async(&mut c).await?;
    Ok(c)
}

/// The Redis client of `url` (no connection yet). A `rediss://` URL verifies the server's
/// certificate against `access.ca_pem` when given, else the system's roots; a CA file on a
/// `redis://` URL is an error (it would silently protect nothing).
pub fn redis_client(url: &str, access: &RedisAccess) -> Result<redis::Client, BudgetError> {
    use redis::IntoConnectionInfo as _;
    let shown = redacted_url(url);
    let fail = |why: String| BudgetError::Redis {
        url: shown.clone(),
        why,
    };
    let mut info = url
        .into_connection_info()
        .map_err(|e| fail(e.to_string()))?;
    if let Some(p) = &access.password {
        let settings = info.redis_settings().clone().set_password(p.as_str());
        info = info.set_redis_settings(settings);
    }
    let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
    match (&access.ca_pem, tls) {
        (Some(pem), true) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            },
        )
        .map_err(|e| fail(format!("budget.redis_ca_file: {e}"))),
        (Some(_), false) => Err(fail(
            "budget.redis_ca_file is set but the URL is redis:// (plain TCP): use rediss://".into(),
        )),
        (None, _) => redis::Client::open(info).map_err(|e| fail(e.to_string())),
    }
}

/// `url` with any password replaced by `***`, for logs and status.
pub fn redacted_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "(budget.redis: not a URL)".into(),
    }
}

pub(super) struct RedisStore {
    client: redis::Client,
    shown: String,
    script: redis::Script,
    conn: ArcSwapOption<MultiplexedConnection>,
    /// A reconnect task is running.
    connecting: AtomicBool,
    /// Redis failed since it last answered (the warning is logged once per outage).
    outage: AtomicBool,
    /// The last failure and when (Unix seconds); cleared when Redis answers again, and kept
    /// as `last_outage` with the time it ended.
    last_error: Mutex<Option<(String, u64)>>,
    last_outage: Mutex<Option<serde_json::Value>>,
    timeout: Duration,
    connect_timeout: Duration,
    metrics: BudgetMetrics,
}

impl RedisStore {
    pub(super) fn new(
        url: &str,
        access: &RedisAccess,
        cfg: &BudgetConfig,
        metrics: BudgetMetrics,
    ) -> Result<RedisStore, BudgetError> {
        let shown = redacted_url(url);
        let client = redis_client(url, access)?;
        Ok(RedisStore {
            client,
            shown,
            script: redis::Script::new(SCRIPT),
            conn: ArcSwapOption::empty(),
            connecting: AtomicBool::new(false),
            outage: AtomicBool::new(false),
            last_error: Mutex::new(None),
            last_outage: Mutex::new(None),
            timeout: cfg.redis_timeout,
            connect_timeout: cfg.redis_connect_timeout,
            metrics,
        })
    }

    /// The URL, password redacted.
    pub(super) fn shown_url(&self) -> &str {
        &self.shown
    }

    /// Whether a connection is up.
    pub(super) fn is_up(&self) -> bool {
        self.conn.load().is_some()
    }

    /// Starts the background connect task unless it runs (or there is no runtime).
    pub(super) fn ensure_connecting(self: &Arc<Self>) {
        if self.is_up() || self.connecting.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.connecting.store(false, Ordering::SeqCst);
            return;
        };
        // A weak handle: a budget dropped (a rebuilt proxy) ends its task.
        let me = Arc::downgrade(self);
        rt.spawn(connect_loop(me));
    }

    /// One token of `key`: `Some(Ok(tokens left))`, `Some(Err(wait))`, or `None` when Redis
    /// failed (then marked down and reconnecting).
    pub(super) async fn take(
        self: &Arc<Self>,
        key: &str,
        p: Params,
    ) -> Option<Result<u32, Duration>> {
        let reply = self.call(key, p, "take", 0).await?;
        let (taken, wait_us, left) = reply;
        Some(if taken == 1 {
            Ok(u32::try_from(left.max(0)).unwrap_or(u32::MAX))
        } else {
            Err(Duration::from_micros(
                u64::try_from(wait_us.max(1)).unwrap_or(1),
            ))
        })
    }

    /// Pauses `key` for `pause` for every replica (best effort: the local pause holds anyway).
    pub(super) async fn pause(self: &Arc<Self>, key: &str, p: Params, pause: Duration) {
        let us = u64::try_from(pause.as_micros()).unwrap_or(u64::MAX);
        let _ = self.call(key, p, "pause", us).await;
    }

    async fn call(
        self: &Arc<Self>,
        key: &str,
        p: Params,
        op: &str,
        pause_us: u64,
    ) -> Option<(i64, i64, i64)> {
        let conn = self.conn.load_full()?;
        let mut conn = (*conn).clone();
        let mut inv = self.script.key(key);
        inv.arg((p.interval_ns / 1000).max(1))
            .arg((p.capacity_ns / 1000).max(1))
            .arg(op)
            .arg(pause_us);
        match tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn)).await {
            Ok(Ok(reply)) => Some(reply),
            Ok(Err(e)) => {
                self.down("error", &e.to_string());
                None
            }
            Err(_) => {
                self.down(
                    "timeout",
                    &format!(
                        "no answer within {} ms (budget.redis_timeout)",
                        self.timeout.as_millis()
                    ),
                );
                None
            }
        }
    }

    fn down(self: &Arc<Self>, kind: &str, why: &str) {
        self.metrics.redis_error(kind);
        self.conn.store(None);
        self.metrics.set_redis_up(false);
        self.set_error(why);
        if !self.outage.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                redis = self.shown,
                error = why,
                "the shared budget's Redis is unreachable: falling back as budget.redis_unavailable says until it answers again"
            );
        }
        self.ensure_connecting();
    }

    fn set_error(&self, why: &str) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((why.to_owned(), crate::gate::halt::now_unix()));
    }

    /// Redis answers again: the error becomes `last_outage`, with when it ended.
    fn recovered(&self) {
        let error = self
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((why, at)) = error {
            let now = crate::gate::halt::now_unix();
            *self.last_outage.lock().unwrap_or_else(|e| e.into_inner()) = Some(serde_json::json!({
                "error": why,
                "at": crate::gate::halt::unix_to_rfc3339(at),
                "recovered_at": crate::gate::halt::unix_to_rfc3339(now),
            }));
        }
    }

    /// For `/status` and `/readyz`: `last_error` (with its time) only while Redis fails;
    /// after recovery, `last_outage` says what failed and when it recovered.
    pub(super) fn status(&self) -> serde_json::Value {
        let error = self
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let up = self.is_up();
        serde_json::json!({
            "url": self.shown,
            "up": up,
            "state": match (up, error.is_some()) {
                (true, _) => "ok",
                (false, true) => "unreachable",
                (false, false) => "connecting",
            },
            "last_error": error.as_ref().map(|(why, _)| why),
            "last_error_at": error.as_ref().map(|(_, at)| crate::gate::halt::unix_to_rfc3339(*at)),
            "last_outage": *self.last_outage.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }

    async fn connect_once(&self) -> redis::RedisResult<MultiplexedConnection> {
        connect_with_script(&self.client, self.connect_timeout, &self.script).await
    }
}

/// Connects (retrying with a growing pause, 100 ms to 2 s) until Redis answers, then ends.
async fn connect_loop(me: Weak<RedisStore>) {
    let mut pause = Duration::from_millis(100);
    loop {
        let Some(store) = me.upgrade() else { return };
        let attempt = tokio::time::timeout(store.connect_timeout, store.connect_once()).await;
        let why = match attempt {
            Ok(Ok(conn)) => {
                store.recovered();
                store.conn.store(Some(Arc::new(conn)));
                store.metrics.set_redis_up(true);
                store.connecting.store(false, Ordering::SeqCst);
                if store.outage.swap(false, Ordering::SeqCst) {
                    tracing::warn!(
                        redis = store.shown,
                        "the shared budget's Redis answers again: the budget is shared"
                    );
                } else {
                    tracing::info!(redis = store.shown, "rate budget shared through Redis");
                }
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!(
                "no connection within {} ms (budget.redis_connect_timeout)",
                store.connect_timeout.as_millis()
            ),
        };
        store.metrics.redis_error("connect");
        store.metrics.set_redis_up(false);
        store.set_error(&why);
        if !store.outage.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                redis = store.shown,
                error = why,
                "the shared budget's Redis is unreachable: falling back as budget.redis_unavailable says until it answers again"
            );
        }
        drop(store);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redacted_url("redis://:s3cret-pass@cache:6379/2"),
            "redis://:***@cache:6379/2"
        );
        assert_eq!(
            redacted_url("rediss://user:s3cret@cache:6380/0"),
            "rediss://user:***@cache:6380/0"
        );
        assert_eq!(redacted_url("redis://cache:6379/0"), "redis://cache:6379/0");
        assert!(!redacted_url("not a url s3cret").contains("s3cret"));
    }
}
