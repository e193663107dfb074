//! The rate budget: one GCRA bucket per (credential, class), so that every program sharing a
//! key, and every cbgate replica sharing it through Redis, stays inside Coinbase's limit.
//!
//! Reserve, then act: [`Budget::acquire`] takes the token before the request is signed or
//! sent (atomically: under the bucket's lock, or in one Lua script in Redis). A request over
//! budget waits in the bucket's queue, which serves client identities in turn (round robin),
//! so a greedy identity cannot starve a polite one, for at most `budget.max_wait`; then it is
//! refused. [`Budget::observe`] learns from Coinbase's answers: a 429, or
//! `x-ratelimit-remaining: 0`, pauses the bucket for every client at once.

mod class;
mod gcra;
mod redis;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use tokio::sync::oneshot;
use zeroize::Zeroizing;

use crate::config::{BudgetConfig, RedisUnavailable};
use crate::ops::metrics::BudgetMetrics;

pub use class::{classify, Class};
pub use gcra::{Gcra, Params};
pub use redis::{connect_with_script, redacted_url, redis_client, RedisAccess};

/// The identity of requests whose client is not known (until named clients are wired).
pub const ANONYMOUS: &str = "anonymous";

/// The bucket scope of per-IP classes (one for the gateway, whatever credential signs).
const PER_IP_SCOPE: &str = "per-ip";

/// Why the budget refused a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No token within `budget.max_wait` (or the bucket is paused for longer).
    Exhausted {
        class: Class,
        waited: Duration,
        retry_after: Duration,
        /// The bucket is paused because Coinbase answered 429.
        paused: bool,
    },
    /// Redis is unreachable and `budget.redis_unavailable = "refuse"`.
    Unavailable { class: Class },
}

/// A token taken: how long the request waited for it, and which bucket to tell what Coinbase
/// answered.
#[derive(Debug)]
pub struct Ticket {
    /// Time spent waiting for the token (zero when one was free).
    pub queued: Duration,
    bucket: Option<Arc<Bucket>>,
}

impl Ticket {
    /// The class the request was counted in, if budgeted.
    pub fn class(&self) -> Option<Class> {
        self.bucket.as_ref().map(|b| b.class)
    }
}

/// The budget, shared by every request (cheap to clone).
#[derive(Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("enabled", &self.inner.cfg.enabled)
            .field("redis", &self.inner.redis.as_ref().map(|r| r.shown_url()))
            .finish()
    }
}

struct Inner {
    cfg: BudgetConfig,
    buckets: Mutex<HashMap<(String, Class), Arc<Bucket>>>,
    redis: Option<Arc<redis::RedisStore>>,
    metrics: BudgetMetrics,
    /// The zero of the local monotonic clock (ns).
    epoch: Instant,
}

#[derive(Debug)]
struct Bucket {
    scope: String,
    class: Class,
    redis_key: String,
    params: Params,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The bucket when it is kept in this process.
    local: Gcra,
    /// This process's share of the bucket while Redis is unreachable.
    fallback: Gcra,
    /// Local ns until which the bucket is paused (Coinbase said 429).
    paused_until: u64,
    /// Waiting requests, one queue per identity, served in turn.
    queues: VecDeque<Queue>,
    /// Whether a task is handing out tokens to the queue.
    dispatching: bool,
    /// Tokens left after the last take (local or as Redis said).
    last_tokens: u32,
    /// Per-identity caps (`budget_share`), each a bucket of its share of the rate.
    shares: HashMap<String, Gcra>,
}

#[derive(Debug)]
struct Queue {
    identity: String,
    waiters: VecDeque<oneshot::Sender<Grant>>,
}

#[derive(Debug)]
enum Grant {
    Go,
    Unavailable,
}

/// What a bucket answered.
enum Decision {
    Taken,
    Wait(Duration),
    Unavailable,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere mid-update of plain numbers.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Building the budget failed.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("budget.redis {url}: {why}")]
    Redis { url: String, why: String },
}

impl Budget {
    /// Builds the budget; with `budget.redis`, the Redis client too (it connects on
    /// [`Budget::start`] or the first request, in the background). `access` holds the content
    /// of `budget.redis_password_file`.
    pub fn new(
        cfg: &BudgetConfig,
        password: Option<Zeroizing<String>>,
        metrics: BudgetMetrics,
    ) -> Result<Budget, BudgetError> {
        Budget::with_access(cfg, &RedisAccess::from(password), metrics)
    }

    /// [`Budget::new`] with everything connecting needs: the password and the CA of
    /// `budget.redis_ca_file`.
    pub fn with_access(
        cfg: &BudgetConfig,
        access: &RedisAccess,
        metrics: BudgetMetrics,
    ) -> Result<Budget, BudgetError> {
        let redis = match (&cfg.redis, cfg.enabled) {
            (Some(url), true) => Some(Arc::new(redis::RedisStore::new(
                url,
                access,
                cfg,
                metrics.clone(),
            )?)),
            _ => None,
        };
        Ok(Budget {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                buckets: Mutex::new(HashMap::new()),
                redis,
                metrics,
                epoch: Instant::now(),
            }),
        })
    }

    /// Starts connecting to Redis in the background (no-op without `budget.redis`).
    pub fn start(&self) {
        if let Some(r) = &self.inner.redis {
            r.ensure_connecting();
        }
    }

    /// Whether requests are budgeted at all.
    pub fn enabled(&self) -> bool {
        self.inner.cfg.enabled
    }

    /// Whether the buckets are in Redis and Redis answers (`None` without `budget.redis`).
    pub fn redis_up(&self) -> Option<bool> {
        self.inner.redis.as_ref().map(|r| r.is_up())
    }

    fn now(&self) -> u64 {
        u64::try_from(self.inner.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn bucket(&self, credential: &str, class: Class) -> Arc<Bucket> {
        let scope = if class.per_ip() {
            PER_IP_SCOPE
        } else {
            credential
        };
        let mut map = lock(&self.inner.buckets);
        if let Some(b) = map.get(&(scope.to_owned(), class)) {
            return Arc::clone(b);
        }
        let limit = class.limit(&self.inner.cfg);
        let params = Params::new(&limit, 1.0);
        let fallback = Params::new(&limit, f64::from(self.inner.cfg.replicas));
        let b = Arc::new(Bucket {
            scope: scope.to_owned(),
            class,
            redis_key: format!(
                "{}:{}:{}",
                self.inner.cfg.redis_key_prefix,
                scope,
                class.name()
            ),
            params,
            state: Mutex::new(State {
                local: Gcra::new(params),
                fallback: Gcra::new(fallback),
                paused_until: 0,
                queues: VecDeque::new(),
                dispatching: false,
                last_tokens: limit.burst(),
                shares: HashMap::new(),
            }),
        });
        map.insert((scope.to_owned(), class), Arc::clone(&b));
        b
    }

    /// Takes a token of `credential`'s `class` bucket for a request of client `identity`,
    /// waiting in the identity's turn for at most `budget.max_wait`. `share` (0 < share <= 1)
    /// caps the identity at that fraction of the bucket's rate (`budget_share`).
    pub async fn acquire(
        &self,
        credential: &str,
        class: Class,
        identity: &str,
        share: Option<f64>,
    ) -> Result<Ticket, Refusal> {
        if !self.inner.cfg.enabled {
            return Ok(Ticket {
                queued: Duration::ZERO,
                bucket: None,
            });
        }
        let started = Instant::now();
        let max_wait = self.inner.cfg.max_wait;
        let deadline = started + max_wait;
        let bucket = self.bucket(credential, class);
        if let Some(r) = &self.inner.redis {
            r.ensure_connecting();
        }
        let exhausted = |waited: Duration, retry_after: Duration, paused: bool| {
            self.inner.metrics.refused(class.name(), "exhausted");
            self.inner.metrics.waited(class.name(), waited);
            Err(Refusal::Exhausted {
                class,
                waited,
                retry_after,
                paused,
            })
        };

        // The identity's own cap comes first: its share of the rate, reserved ahead.
        if let Some(share) = share.filter(|s| *s > 0.0 && *s < 1.0) {
            let reserved = {
                let mut st = lock(&bucket.state);
                let limit = class.limit(&self.inner.cfg);
                st.shares
                    .entry(identity.to_owned())
                    .or_insert_with(|| Gcra::new(Params::new(&limit, 1.0 / share)))
                    .reserve(self.now(), max_wait)
            };
            match reserved {
                Ok(wait) if !wait.is_zero() => tokio::time::sleep(wait).await,
                Ok(_) => {}
                Err(wait) => return exhausted(started.elapsed(), wait, false),
            }
        }

        // Nobody waiting: take a token now if one is free.
        let queue_empty = lock(&bucket.state).queues.is_empty();
        if queue_empty {
            match self.decide(&bucket).await {
                Decision::Taken => return Ok(self.granted(bucket, started)),
                Decision::Unavailable => return Err(self.unavailable(class)),
                Decision::Wait(w) => {
                    let paused = self.is_paused(&bucket);
                    if started.elapsed() + w > max_wait {
                        return exhausted(started.elapsed(), w, paused);
                    }
                }
            }
        }

        // Wait in this identity's queue.
        let (tx, rx) = oneshot::channel();
        {
            let mut st = lock(&bucket.state);
            match st.queues.iter_mut().find(|q| q.identity == identity) {
                Some(q) => q.waiters.push_back(tx),
                None => st.queues.push_back(Queue {
                    identity: identity.to_owned(),
                    waiters: VecDeque::from([tx]),
                }),
            }
            if !st.dispatching {
                st.dispatching = true;
                tokio::spawn(self.clone().dispatch(Arc::clone(&bucket)));
            }
        }
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(Grant::Go)) => Ok(self.granted(bucket, started)),
            Ok(Ok(Grant::Unavailable)) | Ok(Err(_)) => Err(self.unavailable(class)),
            Err(_) => {
                let (retry, paused) = {
                    let st = lock(&bucket.state);
                    // The queue ahead at the bucket's rate, or the rest of a pause.
                    let waiting: usize = st.queues.iter().map(|q| q.waiters.len()).sum();
                    let behind = Duration::from_nanos(
                        bucket.params.interval_ns.saturating_mul(waiting as u64 + 1),
                    );
                    let pause = Duration::from_nanos(st.paused_until.saturating_sub(self.now()));
                    (behind.max(pause), !pause.is_zero())
                };
                exhausted(started.elapsed(), retry, paused)
            }
        }
    }

    fn granted(&self, bucket: Arc<Bucket>, started: Instant) -> Ticket {
        let queued = started.elapsed();
        let tokens = lock(&bucket.state).last_tokens;
        self.inner
            .metrics
            .tokens(bucket.class.name(), f64::from(tokens));
        self.inner.metrics.waited(bucket.class.name(), queued);
        Ticket {
            queued,
            bucket: Some(bucket),
        }
    }

    fn unavailable(&self, class: Class) -> Refusal {
        self.inner.metrics.refused(class.name(), "unavailable");
        Refusal::Unavailable { class }
    }

    fn is_paused(&self, bucket: &Bucket) -> bool {
        lock(&bucket.state).paused_until > self.now()
    }

    /// Hands tokens to the queue, one identity after the other, until it is empty.
    async fn dispatch(self, bucket: Arc<Bucket>) {
        loop {
            {
                let mut st = lock(&bucket.state);
                for q in st.queues.iter_mut() {
                    q.waiters.retain(|w| !w.is_closed());
                }
                st.queues.retain(|q| !q.waiters.is_empty());
                if st.queues.is_empty() {
                    st.dispatching = false;
                    return;
                }
            }
            match self.decide(&bucket).await {
                Decision::Taken => {
                    let mut st = lock(&bucket.state);
                    // The next identity's oldest live waiter; a token whose waiter just gave
                    // up goes to the next one.
                    while let Some(mut q) = st.queues.pop_front() {
                        let sent = match q.waiters.pop_front() {
                            Some(w) => w.send(Grant::Go).is_ok(),
                            None => false,
                        };
                        if !q.waiters.is_empty() {
                            st.queues.push_back(q);
                        }
                        if sent {
                            break;
                        }
                    }
                }
                Decision::Wait(w) => {
                    // With Redis, other replicas move the bucket too: look again soon.
                    let nap = if self.inner.redis.is_some() {
                        w.min(Duration::from_millis(100))
                    } else {
                        w
                    };
                    tokio::time::sleep(nap.max(Duration::from_micros(200))).await;
                }
                Decision::Unavailable => {
                    let mut st = lock(&bucket.state);
                    for q in st.queues.drain(..) {
                        for w in q.waiters {
                            let _ = w.send(Grant::Unavailable);
                        }
                    }
                    st.dispatching = false;
                    return;
                }
            }
        }
    }

    /// One attempt at a token: the pause, then Redis or the local bucket.
    async fn decide(&self, bucket: &Bucket) -> Decision {
        {
            let st = lock(&bucket.state);
            let now = self.now();
            if st.paused_until > now {
                return Decision::Wait(Duration::from_nanos(st.paused_until - now));
            }
            if self.inner.redis.is_none() {
                drop(st);
                return self.take_local(bucket, false);
            }
        }
        let Some(r) = &self.inner.redis else {
            return self.take_local(bucket, false);
        };
        if r.is_up() {
            if let Some(answer) = r.take(&bucket.redis_key, bucket.params).await {
                let mut st = lock(&bucket.state);
                return match answer {
                    Ok(left) => {
                        st.last_tokens = left;
                        Decision::Taken
                    }
                    Err(w) => Decision::Wait(w),
                };
            }
        }
        match self.inner.cfg.redis_unavailable {
            RedisUnavailable::Refuse => Decision::Unavailable,
            RedisUnavailable::Local => self.take_local(bucket, true),
        }
    }

    fn take_local(&self, bucket: &Bucket, fallback: bool) -> Decision {
        let now = self.now();
        let mut st = lock(&bucket.state);
        let g = if fallback {
            &mut st.fallback
        } else {
            &mut st.local
        };
        match g.take(now) {
            Ok(left) => {
                st.last_tokens = left;
                Decision::Taken
            }
            Err(w) => Decision::Wait(w),
        }
    }

    /// Learns from Coinbase's answer to a budgeted request: a 429, or
    /// `x-ratelimit-remaining: 0` with `x-ratelimit-reset`, pauses the bucket (see
    /// [`pause_for`]). With Redis, the pause is stored there before this returns (within
    /// `budget.redis_timeout`), so the other replicas hold off before the client even sees the 429.
    pub async fn observe(&self, ticket: &Ticket, status: u16, headers: &HeaderMap) {
        let Some(bucket) = &ticket.bucket else {
            return;
        };
        if status == 429 {
            self.inner.metrics.upstream_429(bucket.class.name());
        }
        let Some(pause) = pause_for(status, headers, &self.inner.cfg, SystemTime::now()) else {
            return;
        };
        self.pause(bucket, pause).await;
    }

    async fn pause(&self, bucket: &Arc<Bucket>, pause: Duration) {
        self.inner.metrics.paused(bucket.class.name());
        let until = self
            .now()
            .saturating_add(u64::try_from(pause.as_nanos()).unwrap_or(u64::MAX));
        {
            let mut st = lock(&bucket.state);
            st.paused_until = st.paused_until.max(until);
        }
        tracing::warn!(
            class = bucket.class.name(),
            credential = bucket.scope,
            pause_ms = pause.as_millis() as u64,
            "Coinbase's rate limit was reached: the budget is paused for every client"
        );
        if let Some(r) = &self.inner.redis {
            r.pause(&bucket.redis_key, bucket.params, pause).await;
        }
    }

    /// Pauses `credential`'s `class` bucket for `pause` (bounded by `budget.max_pause`).
    pub async fn pause_bucket(&self, credential: &str, class: Class, pause: Duration) {
        let b = self.bucket(credential, class);
        self.pause(&b, pause.min(self.inner.cfg.max_pause)).await;
    }

    /// What `/status` and `/readyz` show of the budget.
    pub fn status(&self) -> serde_json::Value {
        let cfg = &self.inner.cfg;
        let now = self.now();
        let mut buckets: Vec<serde_json::Value> = lock(&self.inner.buckets)
            .values()
            .map(|b| {
                let st = lock(&b.state);
                let limit = b.class.limit(cfg);
                let local = self.inner.redis.is_none();
                serde_json::json!({
                    "credential": b.scope,
                    "class": b.class.name(),
                    "rate_per_second": limit.per_second(),
                    "burst": limit.burst(),
                    "tokens": if local { st.local.tokens(now) } else { st.last_tokens },
                    "paused_ms": st.paused_until.saturating_sub(now) / 1_000_000,
                    "waiting": st.queues.iter().map(|q| q.waiters.len()).sum::<usize>(),
                })
            })
            .collect();
        buckets.sort_by_key(|b| (b["credential"].to_string(), b["class"].to_string()));
        let (mode, redis) = match &self.inner.redis {
            None => ("local", serde_json::Value::Null),
            Some(r) => {
                let mode = match (r.is_up(), cfg.redis_unavailable) {
                    (true, _) => "redis",
                    (false, RedisUnavailable::Local) => "local-fallback",
                    (false, RedisUnavailable::Refuse) => "refusing",
                };
                (mode, r.status())
            }
        };
        serde_json::json!({
            "enabled": cfg.enabled,
            "mode": if cfg.enabled { mode } else { "off" },
            "max_wait_ms": cfg.max_wait.as_millis() as u64,
            "replicas": cfg.replicas,
            "redis": redis,
            "buckets": buckets,
        })
    }
}

/// How long Coinbase asks the key to pause, bounded by `budget.max_pause`: a 429's
/// `Retry-After` (seconds or an HTTP date), else its `x-ratelimit-reset`, else
/// `budget.default_pause`; on other answers, `x-ratelimit-remaining: 0` with a reset in the
/// future. `x-ratelimit-reset` is read as Unix seconds when it is that large, else as seconds
/// from now.
pub fn pause_for(
    status: u16,
    headers: &HeaderMap,
    cfg: &BudgetConfig,
    now: SystemTime,
) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let retry_after = text("retry-after").and_then(|v| match v.parse::<u64>() {
        Ok(s) => Some(Duration::from_secs(s)),
        Err(_) => httpdate::parse_http_date(v)
            .ok()
            .map(|t| t.duration_since(now).unwrap_or(Duration::ZERO)),
    });
    let reset = text("x-ratelimit-reset").and_then(|v| {
        let n = v
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n >= 0.0)?;
        if n >= 1e9 {
            let at = UNIX_EPOCH + Duration::from_secs_f64(n);
            Some(at.duration_since(now).unwrap_or(Duration::ZERO))
        } else {
            Some(Duration::from_secs_f64(n))
        }
    });
    let pause = if status == 429 {
        retry_after
            .or(reset)
            .filter(|d| !d.is_zero())
            .unwrap_or(cfg.default_pause)
    } else if text("x-ratelimit-remaining") == Some("0") {
        reset.filter(|d| !d.is_zero())?
    } else {
        return None;
    };
    Some(pause.min(cfg.max_pause))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClassLimit;
    use crate::ops::metrics::Metrics;

    fn budget(rate: f64, burst: u32, max_wait_ms: u64) -> Budget {
        let cfg = BudgetConfig {
            max_wait: Duration::from_millis(max_wait_ms),
            advanced_private: ClassLimit {
                rate,
                per: Duration::from_secs(1),
                burst: Some(burst),
            },
            ..BudgetConfig::default()
        };
        Budget::new(&cfg, None, Metrics::new().budget().clone()).expect("budget")
    }

    #[tokio::test]
    async fn tokens_are_taken_once_under_concurrency() {
        let b = budget(20.0, 5, 300);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                b.acquire("k", Class::AdvancedPrivate, ANONYMOUS, None)
                    .await
                    .is_ok()
            }));
        }
        let mut granted = 0;
        for t in tasks {
            granted += usize::from(t.await.expect("task"));
        }
        let elapsed = started.elapsed().as_secs_f64();
        // burst + rate x time, and no more.
        let most = 5.0 + 20.0 * elapsed;
        assert!(granted as f64 <= most + 1e-9, "{granted} > {most}");
        assert!(granted >= 5 + 4, "{granted}");
        // Everyone answered within max_wait (+ slack).
        assert!(elapsed < 0.3 + 0.2, "{elapsed}");
    }

    #[tokio::test]
    async fn a_greedy_identity_cannot_starve_a_polite_one() {
        let b = budget(10.0, 1, 1000);
        // Drain the burst.
        b.acquire("k", Class::AdvancedPrivate, "greedy", None)
            .await
            .expect("first");
        let mut greedy = Vec::new();
        for _ in 0..40 {
            let b = b.clone();
            greedy.push(tokio::spawn(async move {
                b.acquire("k", Class::AdvancedPrivate, "greedy", None)
                    .await
                    .is_ok()
            }));
        }
        // The polite identity arrives after the greedy one filled the queue.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut polite = Vec::new();
        for _ in 0..3 {
            let b = b.clone();
            polite.push(tokio::spawn(async move {
                b.acquire("k", Class::AdvancedPrivate, "polite", None)
                    .await
                    .map(|t| t.queued)
            }));
        }
        for p in polite {
            let queued = p
                .await
                .expect("task")
                .expect("the polite identity is served");
            assert!(queued < Duration::from_millis(1000), "{queued:?}");
        }
        let mut served = 0;
        for g in greedy {
            served += usize::from(g.await.expect("task"));
        }
        // About 10 tokens in the second, 3 of them went to the polite identity.
        assert!((4..=9).contains(&served), "greedy served {served}");
    }

    #[tokio::test]
    async fn a_share_caps_an_identity() {
        let b = budget(20.0, 20, 200);
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                b.acquire("k", Class::AdvancedPrivate, "small", Some(0.25))
                    .await
                    .is_ok()
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await.expect("task"));
        }
        // A quarter of the burst (5) plus a quarter of the rate (5/s) over max_wait (0.2 s).
        assert!((5..=6).contains(&ok), "{ok}");
        // The others still have the bucket.
        b.acquire("k", Class::AdvancedPrivate, "other", None)
            .await
            .expect("others are not capped");
    }

    #[tokio::test]
    async fn a_pause_holds_every_identity_then_refuses_with_retry_after() {
        let b = budget(100.0, 100, 200);
        b.pause_bucket("k", Class::AdvancedPrivate, Duration::from_secs(2))
            .await;
        let started = Instant::now();
        let r = b
            .acquire("k", Class::AdvancedPrivate, "any", None)
            .await
            .expect_err("paused");
        match r {
            Refusal::Exhausted {
                retry_after,
                paused,
                ..
            } => {
                assert!(paused);
                assert!(retry_after > Duration::from_millis(1500), "{retry_after:?}");
            }
            other => panic!("{other:?}"),
        }
        // Refused at once: the pause is longer than max_wait.
        assert!(started.elapsed() < Duration::from_millis(100));
        // Other credentials are not paused.
        b.acquire("other", Class::AdvancedPrivate, "any", None)
            .await
            .expect("other key");
    }

    #[test]
    fn coinbase_tells_how_long_to_pause() {
        let cfg = BudgetConfig::default();
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let h = |pairs: &[(&'static str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, v.parse().expect("value"));
            }
            m
        };
        let p = |status, pairs: &[(&'static str, &str)]| pause_for(status, &h(pairs), &cfg, now);
        assert_eq!(
            p(429, &[("retry-after", "2")]),
            Some(Duration::from_secs(2))
        );
        assert_eq!(p(429, &[]), Some(Duration::from_secs(1)), "default");
        assert_eq!(
            p(429, &[("x-ratelimit-reset", "1800000005")]),
            Some(Duration::from_secs(5))
        );
        // A reset in the past (the mock's fixed epoch) falls back to the default.
        assert_eq!(
            p(429, &[("x-ratelimit-reset", "1700000000")]),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            p(429, &[("retry-after", "3600")]),
            Some(Duration::from_secs(60)),
            "bounded"
        );
        assert_eq!(
            p(
                200,
                &[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "3")]
            ),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            p(
                200,
                &[("x-ratelimit-remaining", "29"), ("x-ratelimit-reset", "3")]
            ),
            None
        );
        assert_eq!(p(200, &[("x-ratelimit-remaining", "0")]), None);
        assert_eq!(p(200, &[]), None);
        assert_eq!(
            p(429, &[("retry-after", "Thu, 15 Jan 2027 08:00:04 GMT")]).map(|d| d.as_secs() <= 60),
            Some(true)
        );
    }

    #[tokio::test]
    async fn disabled_budget_lets_everything_through() {
        let cfg = BudgetConfig {
            enabled: false,
            ..BudgetConfig::default()
        };
        let b = Budget::new(&cfg, None, Metrics::new().budget().clone()).expect("budget");
        for _ in 0..1000 {
            let t = b
                .acquire("k", Class::AdvancedPrivate, ANONYMOUS, None)
                .await
                .expect("off");
            assert!(t.class().is_none());
        }
    }
}
