//! Prometheus metrics, served by the admin listener at `/metrics`.
//!
//! Labels are bounded and carry nothing secret: the route *prefix* (never a path with ids in
//! it, never a query), the method (unknown methods become `OTHER`), the status class.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    identity: String,
    route: String,
    method: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    key: String,
    identity: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TimeoutLabels {
    listener: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredentialLabels {
    key: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredentialResultLabels {
    key: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// Counters the WebSocket relay keeps; read at scrape time.
#[derive(Debug, Default)]
pub struct WsCounters {
    pub open_sessions: AtomicU64,
    pub messages_to_upstream: AtomicU64,
    pub messages_to_client: AtomicU64,
    pub subscribes_signed: AtomicU64,
    /// Upgrades refused because `ws.max_sessions` sessions were open.
    pub sessions_refused: AtomicU64,
    /// Sessions closed because the client sent a message over `ws.max_client_message_bytes`.
    pub client_messages_too_big: AtomicU64,
    /// Sessions closed because the client sent no subscribe within `ws.subscribe_timeout`.
    pub subscribe_timeouts: AtomicU64,
    /// Sessions closed because neither side sent anything for `ws.idle_timeout`.
    pub idle_timeouts: AtomicU64,
}

#[derive(Debug)]
struct WsCollector(Arc<WsCounters>);

impl Collector for WsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.0;
        let gauge = ConstGauge::new(c.open_sessions.load(Ordering::Relaxed) as i64);
        gauge.encode(encoder.encode_descriptor(
            "ws_sessions",
            "Open WebSocket sessions",
            None,
            MetricType::Gauge,
        )?)?;
        for (name, help, v) in [
            (
                "ws_messages_to_upstream",
                "WebSocket messages relayed from clients to Coinbase",
                &c.messages_to_upstream,
            ),
            (
                "ws_messages_to_client",
                "WebSocket messages relayed from Coinbase to clients",
                &c.messages_to_client,
            ),
            (
                "ws_subscribes_signed",
                "Subscribe/unsubscribe messages given a fresh JWT",
                &c.subscribes_signed,
            ),
            (
                "ws_sessions_refused",
                "WebSocket upgrades refused at ws.max_sessions",
                &c.sessions_refused,
            ),
            (
                "ws_client_messages_too_big",
                "WebSocket sessions closed for a client message over ws.max_client_message_bytes",
                &c.client_messages_too_big,
            ),
            (
                "ws_subscribe_timeouts",
                "WebSocket sessions closed for no subscribe within ws.subscribe_timeout",
                &c.subscribe_timeouts,
            ),
            (
                "ws_idle_timeouts",
                "WebSocket sessions closed after ws.idle_timeout without a message",
                &c.idle_timeouts,
            ),
        ] {
            let counter = ConstCounter::new(v.load(Ordering::Relaxed));
            counter.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }
        Ok(())
    }
}

/// The method label: unknown methods become `OTHER`, so the label stays bounded.
fn method_label(method: &http::Method) -> String {
    match *method {
        http::Method::GET
        | http::Method::HEAD
        | http::Method::POST
        | http::Method::PUT
        | http::Method::DELETE
        | http::Method::PATCH
        | http::Method::OPTIONS => method.as_str().to_owned(),
        _ => "OTHER".to_owned(),
    }
}

/// All of cbgate's metrics. Cheap to update from the request path (atomics).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    client_requests: Family<ClientLabels, Counter>,
    key_requests: Family<KeyLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram>,
    upstream_duration: Family<RouteLabels, Histogram>,
    jwt_sign_duration: Histogram,
    upstream_errors: Family<KindLabels, Counter>,
    upstream_resends: Counter,
    policy_denials: Counter,
    guard_denials: Counter,
    halted: Gauge,
    in_flight: Gauge,
    client_connections: Gauge,
    timeouts: Family<TimeoutLabels, Counter>,
    connections_refused: Family<ListenerLabels, Counter>,
    key_reloads: Family<ResultLabels, Counter>,
    credentials: Family<CredentialLabels, Gauge>,
    credential_reloads: Family<CredentialResultLabels, Counter>,
    clock_offset: Gauge<f64, AtomicU64>,
    ws: Arc<WsCounters>,
    budget: BudgetMetrics,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~52 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric under the `cbgate_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cbgate");
        let requests = Family::<RequestLabels, Counter>::default();
        let client_requests = Family::<ClientLabels, Counter>::default();
        let key_requests = Family::<KeyLabels, Counter>::default();
        let request_duration =
            Family::<RouteLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        let upstream_duration =
            Family::<RouteLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        let jwt_sign_duration = Histogram::new(exponential_buckets(0.000_005, 2.0, 14));
        let upstream_errors = Family::<KindLabels, Counter>::default();
        let upstream_resends = Counter::default();
        let policy_denials = Counter::default();
        let guard_denials = Counter::default();
        let halted = Gauge::default();
        let in_flight = Gauge::default();
        let client_connections = Gauge::default();
        let timeouts = Family::<TimeoutLabels, Counter>::default();
        let connections_refused = Family::<ListenerLabels, Counter>::default();
        let key_reloads = Family::<ResultLabels, Counter>::default();
        let credentials = Family::<CredentialLabels, Gauge>::default();
        let credential_reloads = Family::<CredentialResultLabels, Counter>::default();
        let clock_offset = Gauge::<f64, AtomicU64>::default();
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        registry.register(
            "requests",
            "Requests handled, by route prefix, method and status class",
            requests.clone(),
        );
        registry.register(
            "client_requests",
            "Requests handled, by client identity ([clients.NAME], default, anonymous; - before \
             one was recognised), route prefix, method and status class",
            client_requests.clone(),
        );
        registry.register(
            "key_requests",
            "Requests that selected a credential, by its name ([keys.NAME], default), the client \
             identity and status class: who used which key",
            key_requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request received to response headers sent",
            request_duration.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time from request sent upstream to response headers received",
            upstream_duration.clone(),
        );
        registry.register(
            "jwt_sign_duration_seconds",
            "Time to mint one JWT",
            jwt_sign_duration.clone(),
        );
        registry.register(
            "upstream_errors",
            "Failures reaching Coinbase, by kind (dns, connect, tls, timeout, unprocessed, busy, other)",
            upstream_errors.clone(),
        );
        registry.register(
            "upstream_resends",
            "Requests sent again on a new connection because the server closed the first without processing it (GOAWAY, REFUSED_STREAM)",
            upstream_resends.clone(),
        );
        registry.register(
            "policy_denials",
            "Requests denied by the permission ceiling or a policy rule",
            policy_denials.clone(),
        );
        registry.register(
            "guard_denials",
            "Orders refused by a [guard] limit or while halted",
            guard_denials.clone(),
        );
        registry.register(
            "halted",
            "1 while the kill switch is on (orders refused), else 0",
            halted.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Requests in progress",
            in_flight.clone(),
        );
        registry.register(
            "client_connections",
            "Open client connections",
            client_connections.clone(),
        );
        registry.register(
            "timeouts",
            "Connections closed or requests failed by a timeout, by listener (proxy, admin) and kind \
             (header: no complete first request within header_read_timeout, or a later HTTP/1 head; \
             idle: idle_timeout; request_body, upstream_body: body_timeout)",
            timeouts.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections answered 503 because max_connections (proxy) or admin_max_connections \
             (admin) were open",
            connections_refused.clone(),
        );
        registry.register(
            "key_reloads",
            "Key reloads, by result (ok, failed)",
            key_reloads.clone(),
        );
        registry.register(
            "credential",
            "1 for each loaded credential, by name (default is [key]) and kind (cdp, exchange, prime, intx)",
            credentials.clone(),
        );
        registry.register(
            "credential_reloads",
            "Reloads of named credentials ([keys.NAME]), by name and result (ok, failed)",
            credential_reloads.clone(),
        );
        registry.register(
            "clock_offset_seconds",
            "Measured offset of Coinbase's clock from the local clock (applied when over 1 s)",
            clock_offset.clone(),
        );
        registry.register("build_info", "cbgate version", build);
        let ws = Arc::new(WsCounters::default());
        registry.register_collector(Box::new(WsCollector(Arc::clone(&ws))));
        let budget = BudgetMetrics::register(&mut registry, halted.clone());
        Metrics {
            registry,
            requests,
            client_requests,
            key_requests,
            request_duration,
            upstream_duration,
            jwt_sign_duration,
            upstream_errors,
            upstream_resends,
            policy_denials,
            guard_denials,
            halted,
            in_flight,
            client_connections,
            timeouts,
            connections_refused,
            key_reloads,
            credentials,
            credential_reloads,
            clock_offset,
            ws,
            budget,
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// The content type of [`Metrics::render`].
    pub fn content_type() -> &'static str {
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE
    }

    /// Records one finished request.
    pub fn request(&self, route: &str, method: &http::Method, status: u16, total: Duration) {
        let method = method_label(method);
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                method,
                status: format!("{}xx", status / 100),
            })
            .inc();
        self.request_duration
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .observe(total.as_secs_f64());
    }

    /// Records one finished request under its client identity. `identity` is a configured
    /// name, `anonymous`, `default` or `-`, so the label stays bounded.
    pub fn client_request(&self, identity: &str, route: &str, method: &http::Method, status: u16) {
        self.client_requests
            .get_or_create(&ClientLabels {
                identity: identity.to_owned(),
                route: route.to_owned(),
                method: method_label(method),
                status: format!("{}xx", status / 100),
            })
            .inc();
    }

    /// Records one finished request under the credential it selected. `key` is a configured
    /// credential's name (never a name a client sent that matched none), so the label stays
    /// bounded.
    pub fn key_request(&self, key: &str, identity: &str, status: u16) {
        self.key_requests
            .get_or_create(&KeyLabels {
                key: key.to_owned(),
                identity: identity.to_owned(),
                status: format!("{}xx", status / 100),
            })
            .inc();
    }

    /// Records the upstream part of a request.
    pub fn upstream(&self, route: &str, took: Duration) {
        self.upstream_duration
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Records one JWT minted.
    pub fn jwt_signed(&self, took: Duration) {
        self.jwt_sign_duration.observe(took.as_secs_f64());
    }

    /// Records a failure reaching Coinbase.
    pub fn upstream_error(&self, kind: &str) {
        self.upstream_errors
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Records a request sent again because the server did not process the first attempt.
    pub fn upstream_resend(&self) {
        self.upstream_resends.inc();
    }

    /// Records a policy denial.
    pub fn policy_denied(&self) {
        self.policy_denials.inc();
    }

    /// Counts an order the guard or the kill switch refused.
    pub fn guard_denied(&self) {
        self.guard_denials.inc();
    }

    /// Sets `cbgate_halted`.
    pub fn set_halted(&self, halted: bool) {
        self.halted.set(i64::from(halted));
    }

    /// Tracks requests in progress; the guard decrements on drop.
    pub fn in_flight(&self) -> GaugeGuard {
        self.in_flight.inc();
        GaugeGuard(self.in_flight.clone())
    }

    /// Tracks open client connections; the guard decrements on drop.
    pub fn client_connection(&self) -> GaugeGuard {
        self.client_connections.inc();
        GaugeGuard(self.client_connections.clone())
    }

    /// The counter of timeouts of `kind` on `listener` (`proxy` or `admin`): increment it when
    /// the timeout fires. Cheap to clone into a body or connection task.
    pub fn timeout_counter(&self, listener: &str, kind: &str) -> Counter {
        self.timeouts
            .get_or_create(&TimeoutLabels {
                listener: listener.to_owned(),
                kind: kind.to_owned(),
            })
            .clone()
    }

    /// Records a connection refused for want of a free slot on `listener`.
    pub fn connection_refused(&self, listener: &str) {
        self.connections_refused
            .get_or_create(&ListenerLabels {
                listener: listener.to_owned(),
            })
            .inc();
    }

    /// Marks the credential `key` of `kind` as loaded.
    pub fn credential_loaded(&self, key: &str, kind: &str) {
        self.credentials
            .get_or_create(&CredentialLabels {
                key: key.to_owned(),
                kind: kind.to_owned(),
            })
            .set(1);
    }

    /// Records a reload attempt of the named credential `key`.
    pub fn credential_reload(&self, key: &str, ok: bool) {
        self.credential_reloads
            .get_or_create(&CredentialResultLabels {
                key: key.to_owned(),
                result: if ok { "ok" } else { "failed" }.to_owned(),
            })
            .inc();
    }

    /// Records a key reload attempt.
    pub fn key_reload(&self, ok: bool) {
        self.key_reloads
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "failed" }.to_owned(),
            })
            .inc();
    }

    /// Records the measured clock offset.
    pub fn clock_offset(&self, secs: f64) {
        self.clock_offset.set(secs);
    }

    /// The WebSocket relay's counters.
    pub fn ws(&self) -> &Arc<WsCounters> {
        &self.ws
    }

    /// The rate budget's metrics (cheap to clone into the budget).
    pub fn budget(&self) -> &BudgetMetrics {
        &self.budget
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    class: String,
    reason: String,
}

/// The rate budget's metrics (`cbgate_budget_*`), labelled by class only: metrics never carry
/// a key name.
#[derive(Clone, Debug)]
pub struct BudgetMetrics {
    tokens: Family<ClassLabels, Gauge<f64, AtomicU64>>,
    wait: Family<ClassLabels, Histogram>,
    refusals: Family<RefusalLabels, Counter>,
    upstream_429: Family<ClassLabels, Counter>,
    pauses: Family<ClassLabels, Counter>,
    redis_errors: Family<KindLabels, Counter>,
    redis_up: Gauge,
    halt_errors: Family<KindLabels, Counter>,
    halt_up: Gauge,
    /// `cbgate_halted`, set by the shared halt's sync when another replica halts or resumes.
    halted: Gauge,
}

impl BudgetMetrics {
    fn register(registry: &mut Registry, halted: Gauge) -> BudgetMetrics {
        let m = BudgetMetrics {
            tokens: Family::default(),
            // 1 ms .. ~16 s
            wait: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 15))
            }),
            refusals: Family::default(),
            upstream_429: Family::default(),
            pauses: Family::default(),
            redis_errors: Family::default(),
            redis_up: Gauge::default(),
            halt_errors: Family::default(),
            halt_up: Gauge::default(),
            halted,
        };
        registry.register(
            "halt_shared_errors",
            "Failed Redis calls of the shared kill switch, by kind (connect, error, timeout)",
            m.halt_errors.clone(),
        );
        registry.register(
            "halt_shared_up",
            "1 while the shared kill switch's Redis answers (0: each replica keeps its last \
             known halt state), unset without budget.redis",
            m.halt_up.clone(),
        );
        registry.register(
            "budget_tokens",
            "Tokens left in a budget bucket after its last request, by class",
            m.tokens.clone(),
        );
        registry.register(
            "budget_wait_seconds",
            "How long requests waited for a budget token (0 when one was free), by class",
            m.wait.clone(),
        );
        registry.register(
            "budget_refusals",
            "Requests refused by the budget, by class and reason (exhausted: 429 after \
             budget.max_wait; unavailable: 503 while Redis is unreachable and \
             redis_unavailable = refuse)",
            m.refusals.clone(),
        );
        registry.register(
            "budget_upstream_429",
            "429 answers from Coinbase, by class (each pauses the bucket)",
            m.upstream_429.clone(),
        );
        registry.register(
            "budget_pauses",
            "Bucket pauses learnt from Coinbase (429, x-ratelimit-remaining: 0), by class",
            m.pauses.clone(),
        );
        registry.register(
            "budget_redis_errors",
            "Failed Redis calls of the shared budget, by kind (timeout, error, connect)",
            m.redis_errors.clone(),
        );
        registry.register(
            "budget_redis_up",
            "1 while the shared budget's Redis answers (0: local fallback or refusals), \
             unset without budget.redis",
            m.redis_up.clone(),
        );
        m
    }

    /// Records the tokens left in a bucket of `class`.
    pub fn tokens(&self, class: &str, left: f64) {
        self.tokens
            .get_or_create(&ClassLabels {
                class: class.to_owned(),
            })
            .set(left);
    }

    /// Records how long a request waited for its token.
    pub fn waited(&self, class: &str, took: Duration) {
        self.wait
            .get_or_create(&ClassLabels {
                class: class.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Records a refusal (`exhausted` or `unavailable`).
    pub fn refused(&self, class: &str, reason: &str) {
        self.refusals
            .get_or_create(&RefusalLabels {
                class: class.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Records a 429 from Coinbase.
    pub fn upstream_429(&self, class: &str) {
        self.upstream_429
            .get_or_create(&ClassLabels {
                class: class.to_owned(),
            })
            .inc();
    }

    /// Records a pause learnt from Coinbase.
    pub fn paused(&self, class: &str) {
        self.pauses
            .get_or_create(&ClassLabels {
                class: class.to_owned(),
            })
            .inc();
    }

    /// Records a failed Redis call.
    pub fn redis_error(&self, kind: &str) {
        self.redis_errors
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Sets `cbgate_budget_redis_up`.
    pub fn set_redis_up(&self, up: bool) {
        self.redis_up.set(i64::from(up));
    }

    /// Records a failed Redis call of the shared kill switch.
    pub fn halt_error(&self, kind: &str) {
        self.halt_errors
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Sets `cbgate_halt_shared_up`.
    pub fn set_halt_up(&self, up: bool) {
        self.halt_up.set(i64::from(up));
    }

    /// Sets `cbgate_halted` (a state learnt from another replica).
    pub fn set_halted(&self, halted: bool) {
        self.halted.set(i64::from(halted));
    }
}

/// Decrements a gauge when dropped.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_with_bounded_labels() {
        let m = Metrics::new();
        m.request(
            "/api/v3/",
            &http::Method::GET,
            200,
            Duration::from_millis(3),
        );
        m.request(
            "/api/v3/",
            &http::Method::from_bytes(b"BREW").expect("m"),
            404,
            Duration::ZERO,
        );
        m.upstream("/api/v3/", Duration::from_millis(2));
        m.jwt_signed(Duration::from_micros(40));
        m.upstream_error("tls");
        m.policy_denied();
        let _g = m.in_flight();
        m.key_reload(false);
        m.timeout_counter("proxy", "idle").inc();
        m.connection_refused("admin");
        m.clock_offset(-30.0);
        m.ws().subscribes_signed.fetch_add(2, Ordering::Relaxed);
        m.ws().subscribe_timeouts.fetch_add(1, Ordering::Relaxed);
        let text = m.render();
        for needle in [
            "cbgate_requests_total{route=\"/api/v3/\",method=\"GET\",status=\"2xx\"} 1",
            "method=\"OTHER\",status=\"4xx\"",
            "cbgate_request_duration_seconds_bucket",
            "cbgate_upstream_duration_seconds_count{route=\"/api/v3/\"} 1",
            "cbgate_jwt_sign_duration_seconds_count 1",
            "cbgate_upstream_errors_total{kind=\"tls\"} 1",
            "cbgate_policy_denials_total 1",
            "cbgate_in_flight_requests 1",
            "cbgate_client_connections 0",
            "cbgate_key_reloads_total{result=\"failed\"} 1",
            "cbgate_timeouts_total{listener=\"proxy\",kind=\"idle\"} 1",
            "cbgate_connections_refused_total{listener=\"admin\"} 1",
            "cbgate_clock_offset_seconds -30",
            "cbgate_build_info{version=",
            "cbgate_ws_sessions 0",
            "cbgate_ws_subscribes_signed_total 2",
            "cbgate_ws_subscribe_timeouts_total 1",
            "cbgate_ws_client_messages_too_big_total 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
