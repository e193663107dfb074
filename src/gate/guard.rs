//! The pre-trade guard (`[guard]`) and the kill switch's place in the request path.
//!
//! Every order-creating or -editing request is matched against a table of endpoints, one small
//! table per API family (only Advanced Trade today; Exchange, Prime and INTX are further
//! entries: a method, a path and a parser that turns the body into an [`Order`]). For a match:
//!
//! 1. while [`Halt`] is on, the request is refused (423);
//! 2. when a `[guard]` limit is set, the body (read whole by the proxy, which sends the same
//!    bytes upstream; an order body over [`ORDER_BODY_LIMIT`] bytes is refused) is parsed
//!    strictly, checked against every limit, and forwarded byte for byte. The rate limit is reserved last, after every other check passed,
//!    under one lock: 100 concurrent orders with a limit of 5 let exactly 5 through.
//!
//! Not in the table, so never refused: previews (`/orders/preview`, `/orders/edit_preview`:
//! Coinbase places nothing, and a client may want to ask what an order would cost while
//! halted), cancels (`/orders/batch_cancel`: the way out), reads, and WebSocket data.
//!
//! The body is parsed as Coinbase's gateway would read it, and anything it could read
//! differently is refused: a field given twice, also under another spelling (`productId`,
//! `Product_ID`: Go and protobuf JSON accept those), more than one order configuration, and
//! sizes or prices that are not plain decimal strings.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use rust_decimal::Decimal;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::config::{GuardConfig, ORDER_TYPES};
use crate::gate::halt::{Halt, HaltState};

/// The most bytes of an order body cbgate buffers (an order is a few hundred bytes).
pub const ORDER_BODY_LIMIT: usize = 64 * 1024;

/// The window `max_orders_per_minute` counts over.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Product prices kept at most (only prices Coinbase answered are cached).
const PRICE_CACHE_ENTRIES: usize = 1024;

/// Why an order-creating request is refused before it is signed.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// A guard limit refused it (403 `guard_denied`).
    #[error("{0}")]
    Denied(String),
    /// The body is not an order cbgate can read (400 `invalid_order`).
    #[error("{0}")]
    BadOrder(String),
    /// The kill switch is on (423 `halted`).
    #[error("{}", halted_message(.0))]
    Halted(HaltState),
}

fn halted_message(h: &HaltState) -> String {
    format!(
        "trading is halted since {} ({}): orders are refused until `cbgate resume`; cancels and reads still pass",
        h.since_rfc3339(),
        h.reason
    )
}

/// Where the guard gets a product's current price (`GET /api/v3/brokerage/market/products/{id}`
/// through cbgate's upstream client). Implemented in `forward`, which may reach the network.
pub trait PriceSource: Sync {
    /// The product's current price, or why it is not known.
    fn price<'a>(
        &'a self,
        product: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Decimal, String>> + Send + 'a>>;
}

/// A field of an order that an edit cannot change: checked when the order was created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Field<T> {
    /// Given in this body.
    Given(T),
    /// Not part of this request (an edit keeps the order's product, side and type).
    Unchanged,
    /// Set by Coinbase, not by the body (a position close takes the position's side).
    Unknown,
}

/// What the guard needs to know of one order.
#[derive(Clone, Debug)]
pub struct Order {
    pub product: Field<String>,
    pub side: Field<String>,
    /// The `order_configuration` key, e.g. `limit_limit_gtc`.
    pub configuration: Field<String>,
    pub post_only: Field<bool>,
    /// Size in the base currency, when given.
    pub base: Option<Decimal>,
    /// Size in the quote currency, when given.
    pub quote: Option<Decimal>,
    /// The order's own price bound, when it has one (limit orders and edits).
    pub limit_price: Option<Decimal>,
}

/// One guarded endpoint of an API family.
pub struct Endpoint {
    pub method: Method,
    /// The path as policy matches it: lower case, no trailing `/`.
    pub path: &'static str,
    /// What the request does, for messages.
    pub what: &'static str,
    pub parse: fn(&Map<String, Value>) -> Result<Order, Refusal>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.method, self.path, self.what)
    }
}

/// Advanced Trade (`api.coinbase.com/api/v3/brokerage`): create, edit, close a position.
pub static ADVANCED_TRADE: &[Endpoint] = &[
    Endpoint {
        method: Method::POST,
        path: "/api/v3/brokerage/orders",
        what: "order",
        parse: parse_create,
    },
    Endpoint {
        method: Method::POST,
        path: "/api/v3/brokerage/orders/edit",
        what: "order edit",
        parse: parse_edit,
    },
    Endpoint {
        method: Method::POST,
        path: "/api/v3/brokerage/orders/close_position",
        what: "position close",
        parse: parse_close,
    },
];

/// Every family's table.
static FAMILIES: &[&[Endpoint]] = &[ADVANCED_TRADE];

/// The guarded endpoint a request goes to, if any. `path` is matched as the policy matches it
/// (percent-decoded, case-folded, without a trailing `/`), so no spelling slips past.
pub fn endpoint(method: &Method, path: &str) -> Option<&'static Endpoint> {
    // Most requests are reads: skip the path normalisation (an allocation) for them.
    if !FAMILIES
        .iter()
        .flat_map(|f| f.iter())
        .any(|e| e.method == method)
    {
        return None;
    }
    let form = crate::gate::policy::match_form(path);
    FAMILIES
        .iter()
        .flat_map(|f| f.iter())
        .find(|e| e.method == method && e.path == form)
}

/// The compiled `[guard]` plus the kill switch.
#[derive(Debug)]
pub struct Guard {
    cfg: GuardConfig,
    active: bool,
    halt: Halt,
    /// When each order of the last minute was admitted (at most `max_orders_per_minute`).
    window: Mutex<VecDeque<Instant>>,
    prices: Mutex<HashMap<String, (Instant, Decimal)>>,
}

impl Guard {
    /// Compiles `[guard]` (already validated); the kill switch starts in memory.
    pub fn new(cfg: &GuardConfig) -> Guard {
        let mut cfg = cfg.clone();
        for p in &mut cfg.products {
            p.make_ascii_uppercase();
        }
        for s in &mut cfg.sides {
            s.make_ascii_uppercase();
        }
        Guard {
            active: cfg.is_active(),
            cfg,
            halt: Halt::in_memory(),
            window: Mutex::new(VecDeque::new()),
            prices: Mutex::new(HashMap::new()),
        }
    }

    /// Uses `halt` (e.g. one persisted in `state_dir`).
    pub fn with_halt(mut self, halt: Halt) -> Guard {
        self.halt = halt;
        self
    }

    /// The kill switch.
    pub fn halt(&self) -> &Halt {
        &self.halt
    }

    /// Decides one request whose body has been read (`body`, at most `max_body_bytes`): passes
    /// anything that is not an order endpoint; refuses orders while halted (423), and with a
    /// limit set parses the order (at most 64 KiB) and checks it. The body is forwarded as is.
    pub async fn admit(
        &self,
        method: &Method,
        path: &str,
        body: &Bytes,
        prices: &dyn PriceSource,
    ) -> Result<(), Refusal> {
        let Some(ep) = endpoint(method, path) else {
            return Ok(());
        };
        if let Some(h) = self.halt.current() {
            return Err(Refusal::Halted(h));
        }
        if !self.active {
            return Ok(());
        }
        if body.len() > ORDER_BODY_LIMIT {
            return Err(Refusal::BadOrder(format!(
                "the {} body is larger than {ORDER_BODY_LIMIT} bytes; an order is a few hundred",
                ep.what
            )));
        }
        self.check(ep, body, prices).await
    }

    /// Checks one order body against every limit; reserves a rate slot when all pass.
    pub async fn check(
        &self,
        ep: &Endpoint,
        body: &[u8],
        prices: &dyn PriceSource,
    ) -> Result<(), Refusal> {
        let obj = parse_strict(body)
            .map_err(|e| Refusal::BadOrder(format!("the {} body is not valid: {e}", ep.what)))?;
        let order = (ep.parse)(&obj)?;
        let c = &self.cfg;
        if let Field::Given(p) = &order.product {
            if !c.products.is_empty() && !c.products.contains(&p.to_ascii_uppercase()) {
                return Err(denied(format!(
                    "product {p} is not in guard.products ({})",
                    c.products.join(", ")
                )));
            }
        }
        if !c.sides.is_empty() {
            match &order.side {
                Field::Given(s) if !c.sides.contains(s) => {
                    return Err(denied(format!(
                        "side {s} is not in guard.sides ({})",
                        c.sides.join(", ")
                    )))
                }
                Field::Unknown => {
                    return Err(denied(format!(
                        "a {}'s side is not in the request, and guard.sides allows only {}",
                        ep.what,
                        c.sides.join(", ")
                    )))
                }
                _ => {}
            }
        }
        if let Field::Given(key) = &order.configuration {
            let Some((kind, _)) = ORDER_TYPES
                .iter()
                .find(|(_, keys)| keys.contains(&key.as_str()))
            else {
                return Err(denied(format!(
                    "order configuration {key} is not one cbgate can value; the guard refuses it"
                )));
            };
            if !c.order_types.is_empty() && !c.order_types.iter().any(|t| t == kind || t == key) {
                return Err(denied(format!(
                    "order type {key} ({kind}) is not in guard.order_types ({})",
                    c.order_types.join(", ")
                )));
            }
        }
        if c.require_post_only {
            match order.post_only {
                Field::Given(true) | Field::Unchanged => {}
                _ => {
                    return Err(denied(format!(
                        "guard.require_post_only is set: only limit orders with \"post_only\": true pass (this {} is not post-only)",
                        ep.what
                    )))
                }
            }
        }
        self.check_size(ep, &order, prices).await?;
        self.reserve()
    }

    async fn check_size(
        &self,
        ep: &Endpoint,
        order: &Order,
        prices: &dyn PriceSource,
    ) -> Result<(), Refusal> {
        let (max_base, max_quote) = (self.cfg.max_order_base, self.cfg.max_order_quote);
        let need_price = (max_base.is_some() && order.base.is_none())
            || (max_quote.is_some() && order.quote.is_none());
        let mut priced_by = "limit_price";
        let price = match (order.limit_price, need_price) {
            (Some(p), _) => Some(p),
            (None, false) => None,
            (None, true) => {
                priced_by = "current price";
                let Field::Given(product) = &order.product else {
                    return Err(undetermined(ep, "it names no price and no product"));
                };
                Some(self.price(product, prices).await.map_err(|why| {
                    undetermined(ep, &format!("the price of {product} is not known: {why}"))
                })?)
            }
        };
        if let Some(max) = max_base {
            let base = match (order.base, order.quote, price) {
                (Some(b), _, _) => b,
                (None, Some(q), Some(p)) if !p.is_zero() => {
                    q.checked_div(p).unwrap_or(Decimal::MAX)
                }
                _ => return Err(undetermined(ep, "its base size cannot be worked out")),
            };
            if base > max {
                return Err(denied(format!(
                    "guard.max_order_base is {max}; this {} is {base} in the base currency",
                    ep.what
                )));
            }
        }
        if let Some(max) = max_quote {
            let (quote, how) = match (order.quote, order.base, price) {
                (Some(q), _, _) => (q, "quote_size".to_owned()),
                (None, Some(b), Some(p)) => match b.checked_mul(p) {
                    Some(q) => (q, format!("{b} x {p} {priced_by}")),
                    None => return Err(undetermined(ep, "its notional overflows")),
                },
                _ => return Err(undetermined(ep, "its size is not given")),
            };
            if quote > max {
                return Err(denied(format!(
                    "guard.max_order_quote is {max}; this {}'s notional is {} ({how}) in the quote currency",
                    ep.what,
                    quote.normalize()
                )));
            }
        }
        Ok(())
    }

    /// A product's price: cached for `guard.price_max_age`, else fetched.
    async fn price(&self, product: &str, prices: &dyn PriceSource) -> Result<Decimal, String> {
        let key = product.to_ascii_uppercase();
        {
            let cache = self.prices.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, p)) = cache.get(&key) {
                if at.elapsed() < self.cfg.price_max_age {
                    return Ok(*p);
                }
            }
        }
        let p = prices.price(product).await?;
        if p <= Decimal::ZERO {
            return Err(format!("Coinbase reports price {p}"));
        }
        let mut cache = self.prices.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= PRICE_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, (Instant::now(), p));
        Ok(p)
    }

    /// Takes one slot of `max_orders_per_minute`, or refuses.
    fn reserve(&self) -> Result<(), Refusal> {
        let Some(max) = self.cfg.max_orders_per_minute else {
            return Ok(());
        };
        let now = Instant::now();
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        while w
            .front()
            .is_some_and(|t| now.duration_since(*t) >= RATE_WINDOW)
        {
            w.pop_front();
        }
        if w.len() >= max as usize {
            let retry = w
                .front()
                .map(|t| RATE_WINDOW.saturating_sub(now.duration_since(*t)).as_secs() + 1)
                .unwrap_or(1);
            return Err(denied(format!(
                "guard.max_orders_per_minute is {max}: {} orders in the last minute; retry in {retry} s",
                w.len()
            )));
        }
        w.push_back(now);
        Ok(())
    }
}

/// Reads a whole order body, at most [`ORDER_BODY_LIMIT`] bytes. The body may already carry
/// `max_body_bytes` as a `Limited` layer; its error counts as too large too.
fn denied(why: String) -> Refusal {
    Refusal::Denied(format!("refused by the guard: {why}"))
}

fn undetermined(ep: &Endpoint, why: &str) -> Refusal {
    denied(format!(
        "the size of this {} cannot be determined ({why}), and a size limit is set",
        ep.what
    ))
}

// ---------------------------------------------------------------------------
// Advanced Trade bodies
// ---------------------------------------------------------------------------

/// `POST /orders`: `{client_order_id, product_id, side, order_configuration: {KEY: {...}}}`.
fn parse_create(obj: &Map<String, Value>) -> Result<Order, Refusal> {
    let product = product_of(obj)?;
    let side = match get(obj, "side") {
        Some(Value::String(s)) if s == "BUY" || s == "SELL" => s.clone(),
        _ => return Err(bad("side must be \"BUY\" or \"SELL\"")),
    };
    let Some(Value::Object(conf)) = get(obj, "order_configuration") else {
        return Err(bad("order_configuration must be an object"));
    };
    let mut entries = conf.iter();
    let (Some((key, Value::Object(inner))), None) = (entries.next(), entries.next()) else {
        return Err(bad(
            "order_configuration must hold exactly one order type, e.g. {\"limit_limit_gtc\": {...}}",
        ));
    };
    let post_only = match get(inner, "post_only") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("post_only must be true or false")),
    };
    Ok(Order {
        product: Field::Given(product),
        side: Field::Given(side),
        configuration: Field::Given(key.to_ascii_lowercase()),
        post_only: Field::Given(post_only),
        base: decimal(inner, "base_size")?,
        quote: decimal(inner, "quote_size")?,
        limit_price: decimal(inner, "limit_price")?,
    })
}

/// `POST /orders/edit`: `{order_id, price, size}`; product, side and type stay the order's.
fn parse_edit(obj: &Map<String, Value>) -> Result<Order, Refusal> {
    match get(obj, "order_id") {
        Some(Value::String(s)) if !s.is_empty() => {}
        _ => return Err(bad("order_id must be a string")),
    }
    Ok(Order {
        product: Field::Unchanged,
        side: Field::Unchanged,
        configuration: Field::Unchanged,
        post_only: Field::Unchanged,
        base: decimal(obj, "size")?,
        quote: None,
        limit_price: decimal(obj, "price")?,
    })
}

/// `POST /orders/close_position`: `{client_order_id, product_id, size?}`: a market order on
/// the opposite side of the position.
fn parse_close(obj: &Map<String, Value>) -> Result<Order, Refusal> {
    Ok(Order {
        product: Field::Given(product_of(obj)?),
        side: Field::Unknown,
        configuration: Field::Given("market_market_ioc".into()),
        post_only: Field::Given(false),
        base: decimal(obj, "size")?,
        quote: None,
        limit_price: None,
    })
}

fn bad(why: &str) -> Refusal {
    Refusal::BadOrder(format!("invalid order: {why}"))
}

fn product_of(obj: &Map<String, Value>) -> Result<String, Refusal> {
    match get(obj, "product_id") {
        Some(Value::String(p))
            if (1..=64).contains(&p.len())
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
        {
            Ok(p.clone())
        }
        _ => Err(bad("product_id must be a product id such as \"BTC-USD\"")),
    }
}

/// A size or price: a plain non-negative decimal string (`"0.001"`), as Coinbase takes them.
fn decimal(obj: &Map<String, Value>, name: &str) -> Result<Option<Decimal>, Refusal> {
    match get(obj, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_decimal(s).map(Some).ok_or_else(|| {
            bad(&format!(
                "{name} {s:?} is not a plain decimal such as \"0.5\""
            ))
        }),
        Some(_) => Err(bad(&format!(
            "{name} must be a decimal string such as \"0.5\""
        ))),
    }
}

fn parse_decimal(s: &str) -> Option<Decimal> {
    let digits = s.bytes().filter(u8::is_ascii_digit).count();
    let dots = s.bytes().filter(|b| *b == b'.').count();
    if digits == 0 || dots > 1 || digits + dots != s.len() {
        return None;
    }
    s.parse().ok()
}

/// A field by name, however it is spelled (see [`spelling`]).
fn get<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    let want = spelling(name);
    obj.iter()
        .find(|(k, _)| spelling(k) == want)
        .map(|(_, v)| v)
}

/// The spelling-free form of a key: lower case without `_`, so `product_id`, `productId` and
/// `PRODUCT_ID` are one field.
fn spelling(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Parses a JSON object, refusing a key that appears twice in any object under any spelling.
fn parse_strict(body: &[u8]) -> Result<Map<String, Value>, String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = Strict.deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err("it is not a JSON object".into()),
    }
}

#[derive(Clone, Copy)]
struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Strict)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        let mut seen = HashSet::new();
        while let Some(k) = map.next_key::<String>()? {
            if !seen.insert(spelling(&k)) {
                return Err(serde::de::Error::custom(format!(
                    "field {k:?} is given twice (perhaps under another spelling)"
                )));
            }
            let v = map.next_value_seed(Strict)?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Option<Decimal>);
    impl PriceSource for Fixed {
        fn price<'a>(
            &'a self,
            _product: &'a str,
        ) -> Pin<Box<dyn Future<Output = Result<Decimal, String>> + Send + 'a>> {
            let p = self.0.ok_or_else(|| "no price".to_owned());
            Box::pin(async move { p })
        }
    }

    fn dec(s: &str) -> Decimal {
        s.parse().expect("decimal")
    }

    fn guard(f: impl FnOnce(&mut GuardConfig)) -> Guard {
        let mut c = GuardConfig::default();
        f(&mut c);
        Guard::new(&c)
    }

    async fn check(g: &Guard, body: &str) -> Result<(), Refusal> {
        let ep = endpoint(&Method::POST, "/api/v3/brokerage/orders").expect("endpoint");
        g.check(ep, body.as_bytes(), &Fixed(Some(dec("50000"))))
            .await
    }

    fn limit(base: &str, price: &str) -> String {
        format!(
            r#"{{"client_order_id":"a","product_id":"BTC-USD","side":"BUY","order_configuration":{{"limit_limit_gtc":{{"base_size":"{base}","limit_price":"{price}","post_only":false}}}}}}"#
        )
    }

    #[tokio::test]
    async fn spellings_and_duplicates_are_refused() {
        let g = guard(|c| c.products = vec!["BTC-USD".into()]);
        for body in [
            r#"{"product_id":"BTC-USD","productId":"ETH-USD","side":"BUY","order_configuration":{"market_market_ioc":{"quote_size":"1"}}}"#,
            r#"{"product_id":"BTC-USD","side":"BUY","order_configuration":{"market_market_ioc":{"quote_size":"1","quoteSize":"9"}}}"#,
            r#"{"product_id":"BTC-USD","side":"BUY","order_configuration":{"market_market_ioc":{"quote_size":1}}}"#,
            r#"{"product_id":"BTC-USD","side":"BUY","order_configuration":{"market_market_ioc":{"quote_size":"1e9"}}}"#,
            r#"{"product_id":"BTC-USD","side":"BUY","order_configuration":{}}"#,
            r#"[1]"#,
        ] {
            assert!(
                matches!(check(&g, body).await, Err(Refusal::BadOrder(_))),
                "{body}"
            );
        }
        assert!(check(&g, &limit("1", "1")).await.is_ok());
    }

    #[tokio::test]
    async fn notional_uses_the_limit_price_exactly() {
        let g = guard(|c| c.max_order_quote = Some(dec("1000")));
        assert!(check(&g, &limit("0.1", "10000")).await.is_ok());
        let e = check(&g, &limit("0.1", "10000.01"))
            .await
            .expect_err("over");
        assert!(e.to_string().contains("1000.001"), "{e}");
    }

    #[test]
    fn paths_match_in_every_spelling() {
        assert!(endpoint(&Method::POST, "/API/v3/brokerage/orders/").is_some());
        assert!(endpoint(&Method::POST, "/api/v3/brokerage/orders/preview").is_none());
        assert!(endpoint(&Method::POST, "/api/v3/brokerage/orders/batch_cancel").is_none());
        assert!(endpoint(&Method::GET, "/api/v3/brokerage/orders").is_none());
    }
}
