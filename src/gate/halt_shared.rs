//! The kill switch shared through Redis (`budget.redis`, `budget.shared_halt`): `cbgate halt`
//! on one replica halts every replica within `budget.halt_poll` (250 ms) plus a round trip.
//!
//! Safe for money, in this order of priority:
//! - **A halt is never lost.** Each replica keeps its own state (memory and `state_dir`) and
//!   only ever changes it from a state it read from Redis; a replica that cannot reach Redis
//!   keeps what it last knew. A halt made while Redis is unreachable halts here at once, is
//!   marked "not pushed" (also in `state_dir`, so a restart keeps that too) and is pushed when
//!   Redis answers; the command says plainly that the other replicas were not reached.
//! - **A stale resume never overrides a newer halt.** The state in Redis carries a version,
//!   bumped by every change in one Lua script (atomic). A resume names the version it ends; if
//!   Redis holds a newer halt, the resume is refused and this replica takes that halt.
//! - **A halt wins.** A halt that was never pushed is pushed even over a resume made
//!   meanwhile; a Redis that lost its data (restart without persistence) gets the halt back from
//!   any replica that is halted. Resuming needs Redis: while it is unreachable `resume` is
//!   refused (resuming one replica while the others stay halted, or are halted without anyone
//!   knowing, is not a safe state).
//!
//! Watching is a poll, not pub/sub: one EVALSHA of a few-line script every `halt_poll`. A
//! pub/sub message is fire-and-forget (a replica reconnecting misses it and needs a read
//! anyway), needs a second connection per replica, and the poll's cost is 4 tiny calls a
//! second per replica. The poll is also what pushes a pending halt and repairs a Redis that
//! lost its data, which pub/sub alone could not.

use std::sync::Mutex;

use std::time::Duration;

use redis::aio::MultiplexedConnection;

use crate::config::BudgetConfig;
use crate::gate::budget::{
    connect_with_script, redacted_url, redis_client, BudgetError, RedisAccess,
};
use crate::gate::halt::{now_unix, unix_to_rfc3339, Halt, HaltError, HaltState};
use crate::ops::metrics::BudgetMetrics;

/// KEYS[1]: the halt hash (`version`, `halted`, `reason`, `since`, `by`, `at`). ARGV[1]: `get`,
/// `halt` (ARGV: reason, since, by, the version this replica knows, and optionally the newest
/// version it may follow: a halt put back after Redis lost it must not follow a resume made
/// since) or `resume` (ARGV: the version it ends, by). Returns {applied (0/1), version, halted ("1"/"0"), reason, since, by,
/// at}; `at` is Redis's clock, so every replica shows one time for a change.
const SCRIPT: &str = r"
local f = redis.call('HMGET', KEYS[1], 'version', 'halted', 'reason', 'since', 'by', 'at')
local version = tonumber(f[1]) or 0
local halted = f[2] == '1'
local function state(applied)
  local g = redis.call('HMGET', KEYS[1], 'version', 'halted', 'reason', 'since', 'by', 'at')
  return {applied, tonumber(g[1]) or 0, g[2] or '0', g[3] or '', tonumber(g[4]) or 0, g[5] or '', tonumber(g[6]) or 0}
end
if ARGV[1] == 'get' then
  return state(1)
end
local now = redis.call('TIME')[1]
if ARGV[1] == 'halt' then
  local upto = tonumber(ARGV[6])
  if upto and version > upto then
    return state(0)
  end
  local since = tonumber(ARGV[3])
  if halted then
    local before = tonumber(f[4]) or since
    if before < since then since = before end
  end
  version = math.max(version, tonumber(ARGV[5]) or 0) + 1
  redis.call('HSET', KEYS[1], 'version', version, 'halted', '1', 'reason', ARGV[2],
    'since', string.format('%d', since), 'by', ARGV[4], 'at', now)
  return state(1)
end
if ARGV[1] == 'resume' then
  local base = tonumber(ARGV[2]) or 0
  if halted and version > base then
    return state(0)
  end
  version = math.max(version, base) + 1
  redis.call('HSET', KEYS[1], 'version', version, 'halted', '0', 'reason', '', 'since', 0,
    'by', ARGV[3], 'at', now)
  return state(1)
end
return redis.error_reply('unknown op')
";

/// The shared state as Redis holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    /// Bumped by every halt and resume; 0: never set (or Redis lost its data).
    pub version: u64,
    /// Whether trading is halted.
    pub halted: bool,
    /// The halt's reason.
    pub reason: String,
    /// When the halt began (Unix seconds, the halting replica's clock).
    pub since_unix: u64,
    /// The replica that made the last change.
    pub by: String,
    /// When the last change was made (Unix seconds, Redis's clock).
    pub at_unix: u64,
}

type Reply = (i64, i64, String, String, i64, String, i64);

fn remote(r: Reply) -> (bool, Remote) {
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    (
        r.0 == 1,
        Remote {
            version: n(r.1),
            halted: r.2 == "1",
            reason: r.3,
            since_unix: n(r.4),
            by: r.5,
            at_unix: n(r.6),
        },
    )
}

impl Remote {
    fn to_state(&self) -> HaltState {
        // Whatever wrote to Redis, a reason reaches 423 bodies and halt.json only as a local
        // halt's would: no control characters, bounded.
        let clean = |s: &str| -> String {
            s.chars()
                .filter(|c| !c.is_control())
                .take(crate::gate::halt::MAX_REASON_CHARS)
                .collect()
        };
        HaltState {
            reason: clean(&self.reason),
            since_unix: self.since_unix,
            by: Some(clean(&self.by)).filter(|b| !b.is_empty()),
            shared_version: Some(self.version),
        }
    }
}

/// What a halt did beyond this replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Stored in Redis: every replica halts within a poll.
    Shared { version: u64 },
    /// Redis was not reached: halted here only; pushed when Redis answers.
    NotReached { why: String },
}

/// Why a shared resume did not happen (trading stays halted).
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("still halted: the halt is shared through Redis ({url}) and Redis is unreachable ({why}); resuming this replica alone could let it trade while the others are halted: run `cbgate resume` again once Redis answers")]
    Unreachable { url: String, why: String },
    #[error("still halted: a newer halt is in force (by {by} at {at}: {reason}); check it, then run `cbgate resume` again to end it")]
    Newer {
        by: String,
        at: String,
        reason: String,
    },
    #[error("Redis resumed every replica, but this one is still halted: {0}")]
    Local(#[from] HaltError),
}

/// What the sync knows, guarded by one async lock so that a poll and a command never
/// interleave.
struct SyncState {
    conn: Option<MultiplexedConnection>,
    /// The newest version this replica has seen or written.
    known: u64,
    /// When the next connection attempt may start (growing pause while Redis is down).
    retry_at: Option<tokio::time::Instant>,
    pause: Duration,
}

/// For `/status`: the shared view, updated by every call.
#[derive(Default)]
struct View {
    up: bool,
    last: Option<Remote>,
    last_error: Option<(String, u64)>,
    last_outage: Option<serde_json::Value>,
}

/// The kill switch's Redis sync (see the module doc).
pub struct SharedHalt {
    client: redis::Client,
    shown: String,
    key: String,
    replica: String,
    poll: Duration,
    timeout: Duration,
    script: redis::Script,
    sync: tokio::sync::Mutex<SyncState>,
    view: Mutex<View>,
    metrics: BudgetMetrics,
}

impl std::fmt::Debug for SharedHalt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedHalt")
            .field("redis", &self.shown)
            .field("key", &self.key)
            .field("replica", &self.replica)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere while storing plain values.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SharedHalt {
    /// The sync of `cfg.redis` (none without it, or with `shared_halt = false`). `replica`
    /// names this process in the shared state (`budget.replica_name`, else host and pid).
    /// Every Redis call of the halt is bounded by `budget.redis_connect_timeout`: the halt is
    /// not on the request path, and a loaded Redis must not look like an outage.
    pub fn new(
        cfg: &BudgetConfig,
        access: &RedisAccess,
        replica: String,
        metrics: BudgetMetrics,
    ) -> Result<Option<SharedHalt>, BudgetError> {
        let Some(url) = cfg.redis.as_deref().filter(|_| cfg.shared_halt) else {
            return Ok(None);
        };
        Ok(Some(SharedHalt {
            client: redis_client(url, access)?,
            shown: redacted_url(url),
            key: format!("{}:halt", cfg.redis_key_prefix),
            replica,
            poll: cfg.halt_poll,
            timeout: cfg.redis_connect_timeout,
            script: redis::Script::new(SCRIPT),
            sync: tokio::sync::Mutex::new(SyncState {
                conn: None,
                known: 0,
                retry_at: None,
                pause: Duration::from_millis(100),
            }),
            view: Mutex::new(View::default()),
            metrics,
        }))
    }

    /// This replica's name in the shared state.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Reads the shared state every `halt_poll` and reconciles `halt` with it, forever (spawn
    /// it). `owner` holds the halt (the proxy); `halt_of` reaches it.
    pub async fn run<P>(
        self: std::sync::Arc<Self>,
        owner: std::sync::Arc<P>,
        halt_of: fn(&P) -> &Halt,
    ) where
        P: Send + std::marker::Sync + 'static,
    {
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let halt = halt_of(&owner);
            if let Err(e) = self.reconcile(halt).await {
                tracing::error!(error = %e, "the shared halt could not be applied to state_dir");
            }
        }
    }

    /// One poll: read Redis, then apply a newer state learnt there, or push this replica's
    /// halt when Redis lacks it.
    pub async fn reconcile(&self, halt: &Halt) -> Result<(), HaltError> {
        let mut sync = self.sync.lock().await;
        let Some(r) = self.call(&mut sync, &["get"]).await.map(|(_, r)| r) else {
            return Ok(());
        };
        let local = halt.current();
        match (&local, r.halted) {
            (None, true) => {
                // Another replica halted (or this one's resume was overridden): take it.
                if halt.replace_if(&local, Some(r.to_state()))? {
                    self.metrics.set_halted(true);
                    tracing::warn!(
                        by = r.by,
                        reason = r.reason,
                        since = unix_to_rfc3339(r.since_unix),
                        "trading HALTED by another replica (shared through Redis): orders are refused"
                    );
                    sync.known = r.version;
                }
            }
            (Some(l), true) => match l.shared_version {
                None => {
                    self.push(&mut sync, halt, l, None).await?;
                }
                Some(v) if v != r.version && r.version > sync.known => {
                    // A newer halt (a new reason): keep the halt, take its details.
                    if halt.replace_if(&local, Some(r.to_state()))? {
                        sync.known = r.version;
                    }
                }
                Some(_) => sync.known = sync.known.max(r.version),
            },
            (Some(l), false) => match l.shared_version {
                Some(v) if r.version > v => {
                    if halt.replace_if(&local, None)? {
                        self.metrics.set_halted(false);
                        tracing::warn!(
                            by = r.by,
                            "trading resumed by another replica (shared through Redis)"
                        );
                        sync.known = r.version;
                    }
                }
                // Never pushed (a halt wins), or Redis lost it (restarted empty): the halt goes
                // back, unless a change newer than it got there first.
                v => {
                    self.push(&mut sync, halt, l, v).await?;
                }
            },
            (None, false) => sync.known = sync.known.max(r.version),
        }
        Ok(())
    }

    /// Stores `state` (this replica's halt) in Redis and records the version it got; `None`
    /// when Redis was not reached, or (`upto`) Redis has moved past that version since (the
    /// next poll takes what is there).
    async fn push(
        &self,
        sync: &mut SyncState,
        halt: &Halt,
        state: &HaltState,
        upto: Option<u64>,
    ) -> Result<Option<u64>, HaltError> {
        let since = state.since_unix.to_string();
        let known = sync.known.to_string();
        let upto = upto.map(|v| v.to_string()).unwrap_or_default();
        let by = state.by.clone().unwrap_or_else(|| self.replica.clone());
        let Some((applied, r)) = self
            .call(sync, &["halt", &state.reason, &since, &by, &known, &upto])
            .await
        else {
            return Ok(None);
        };
        if !applied {
            return Ok(None);
        }
        sync.known = r.version;
        let mut stored = state.clone();
        stored.shared_version = Some(r.version);
        stored.since_unix = r.since_unix;
        stored.by = Some(by);
        halt.replace_if(&Some(state.clone()), Some(stored))?;
        tracing::info!(
            version = r.version,
            "the halt is stored in Redis: every replica halts"
        );
        Ok(Some(r.version))
    }

    /// `cbgate halt` / `POST /halt` with the halt shared: halts here first (memory, then
    /// `state_dir`), then pushes it to Redis.
    pub async fn halt(&self, halt: &Halt, reason: &str) -> (Result<HaltState, HaltError>, Pushed) {
        let local = halt.halt_as(reason, Some(&self.replica));
        self.metrics.set_halted(true);
        let mut sync = self.sync.lock().await;
        // Redis gets what is in force now (a poll may have pushed it already: pushed again,
        // harmless, the version moves on).
        let pushed = match halt.current() {
            Some(state) => match self.push(&mut sync, halt, &state, None).await {
                Ok(Some(version)) => Pushed::Shared { version },
                Ok(None) => Pushed::NotReached {
                    why: self.last_error().unwrap_or_else(|| "no answer".into()),
                },
                Err(e) => {
                    return (
                        Err(e),
                        Pushed::NotReached {
                            why: "not pushed: state_dir failed".into(),
                        },
                    )
                }
            },
            None => Pushed::NotReached {
                why: "resumed meanwhile".into(),
            },
        };
        (local, pushed)
    }

    /// `cbgate resume` / `POST /resume` with the halt shared: Redis first (refused when it
    /// holds a newer halt, or is unreachable), then this replica.
    pub async fn resume(&self, halt: &Halt) -> Result<Option<HaltState>, ResumeError> {
        let mut sync = self.sync.lock().await;
        let local = halt.current();
        let base = local
            .as_ref()
            .and_then(|l| l.shared_version)
            .unwrap_or(0)
            .max(sync.known)
            .to_string();
        let Some((applied, r)) = self
            .call(&mut sync, &["resume", &base, &self.replica])
            .await
        else {
            return Err(ResumeError::Unreachable {
                url: self.shown.clone(),
                why: self.last_error().unwrap_or_else(|| "no answer".into()),
            });
        };
        if !applied {
            // Take the newer halt here too, at once.
            if local.is_none() && halt.replace_if(&None, Some(r.to_state()))? {
                self.metrics.set_halted(true);
            }
            sync.known = r.version;
            return Err(ResumeError::Newer {
                by: r.by,
                at: unix_to_rfc3339(r.at_unix),
                reason: r.reason,
            });
        }
        sync.known = r.version;
        // Whatever is in force here ends (a halt made meanwhile waits for this lock, so it is
        // not this one).
        let ended = halt.current();
        halt.replace_if(&ended, None)?;
        self.metrics.set_halted(halt.is_halted());
        Ok(ended)
    }

    /// One script call, connecting first if needed; `None` when Redis failed (recorded).
    async fn call(&self, sync: &mut SyncState, args: &[&str]) -> Option<(bool, Remote)> {
        if sync.conn.is_none() {
            if sync
                .retry_at
                .is_some_and(|t| tokio::time::Instant::now() < t)
            {
                return None;
            }
            match tokio::time::timeout(self.timeout, self.connect()).await {
                Ok(Ok(c)) => {
                    sync.conn = Some(c);
                    sync.retry_at = None;
                    sync.pause = Duration::from_millis(100);
                }
                Ok(Err(e)) => {
                    self.failed(sync, "connect", &e.to_string());
                    return None;
                }
                Err(_) => {
                    self.failed(
                        sync,
                        "connect",
                        &format!(
                            "no connection within {} ms (budget.redis_connect_timeout)",
                            self.timeout.as_millis()
                        ),
                    );
                    return None;
                }
            }
        }
        let conn = sync.conn.as_mut()?;
        let mut inv = self.script.key(&self.key);
        for a in args {
            inv.arg(*a);
        }
        let result = tokio::time::timeout(self.timeout, inv.invoke_async::<Reply>(conn)).await;
        match result {
            Ok(Ok(reply)) => {
                let (applied, r) = remote(reply);
                self.answered(&r);
                Some((applied, r))
            }
            Ok(Err(e)) => {
                sync.conn = None;
                self.failed(sync, "error", &e.to_string());
                None
            }
            Err(_) => {
                sync.conn = None;
                self.failed(
                    sync,
                    "timeout",
                    &format!(
                        "no answer within {} ms (budget.redis_connect_timeout)",
                        self.timeout.as_millis()
                    ),
                );
                None
            }
        }
    }

    async fn connect(&self) -> redis::RedisResult<MultiplexedConnection> {
        connect_with_script(&self.client, self.timeout, &self.script).await
    }

    fn failed(&self, sync: &mut SyncState, kind: &str, why: &str) {
        self.metrics.halt_error(kind);
        self.metrics.set_halt_up(false);
        sync.retry_at = Some(tokio::time::Instant::now() + sync.pause);
        sync.pause = (sync.pause * 2).min(Duration::from_secs(2));
        let mut v = lock(&self.view);
        if v.up || v.last_error.is_none() {
            tracing::warn!(
                redis = self.shown,
                error = why,
                "cannot reach the shared halt's Redis: this replica keeps its last known halt state; a halt made here is pushed when Redis answers"
            );
        }
        v.up = false;
        v.last_error = Some((why.to_owned(), now_unix()));
    }

    fn answered(&self, r: &Remote) {
        self.metrics.set_halt_up(true);
        let mut v = lock(&self.view);
        if !v.up {
            if let Some((why, at)) = v.last_error.take() {
                tracing::warn!(redis = self.shown, "the shared halt's Redis answers again");
                v.last_outage = Some(serde_json::json!({
                    "error": why,
                    "at": unix_to_rfc3339(at),
                    "recovered_at": unix_to_rfc3339(now_unix()),
                }));
            }
        }
        v.up = true;
        v.last = Some(r.clone());
    }

    fn last_error(&self) -> Option<String> {
        lock(&self.view).last_error.as_ref().map(|(e, _)| e.clone())
    }

    /// For `/status` and `/readyz`: whether Redis answers, the last change seen there (which
    /// replica, when), and whether a halt made here still waits to be pushed.
    pub fn status(&self, halt: &Halt) -> serde_json::Value {
        let v = lock(&self.view);
        let pending = halt.current().is_some_and(|h| h.shared_version.is_none());
        serde_json::json!({
            "redis": self.shown,
            "replica": self.replica,
            "up": v.up,
            "state": match (v.up, v.last_error.is_some()) {
                (true, _) => "ok",
                (false, true) => "unreachable",
                (false, false) => "connecting",
            },
            "poll_ms": self.poll.as_millis() as u64,
            "pending_push": pending,
            "last_change": v.last.as_ref().filter(|r| r.version > 0).map(|r| serde_json::json!({
                "version": r.version,
                "halted": r.halted,
                "by": r.by,
                "at": unix_to_rfc3339(r.at_unix),
            })),
            "last_error": v.last_error.as_ref().map(|(e, _)| e),
            "last_error_at": v.last_error.as_ref().map(|(_, at)| unix_to_rfc3339(*at)),
            "last_outage": v.last_outage,
        })
    }
}
