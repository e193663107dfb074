//! The pre-trade guard (`[guard]`, `[keys.NAME.guard]`, `[clients.NAME.guard]`) and the kill
//! switch's place in the request path.
//!
//! Every order-creating or -editing request is matched against a table of endpoints, one small
//! table per API family (Advanced Trade, Exchange, INTX, Prime: a method, a path and a parser
//! that turns the body into an [`Order`]). A table applies only to its family's hosts (the
//! route's upstream family), so `/orders` on the Exchange host is guarded and the same path
//! on another host is not taken for it. For a match:
//!
//! 1. while [`Halt`] is on, the request is refused (423);
//! 2. when a guard limit applies, the body (read whole by the proxy, which sends the same
//!    bytes upstream; an order body over [`ORDER_BODY_LIMIT`] bytes is refused) is parsed
//!    strictly, checked against every limit of every layer that applies, and forwarded byte for
//!    byte. The rate limit is reserved last, after every other check passed, under one lock:
//!    1,000 concurrent orders with a limit of 5 let exactly 5 through.
//!
//! Layers: `[guard]` applies to every order, `[keys.NAME.guard]` to orders signed with that
//! key, `[clients.NAME.guard]` to orders from that identity. Every layer that is set applies
//! in full, so an override can only tighten: the limits that bind an order are the union of
//! what each layer says, which is easy to reason about for money (no layer can loosen another
//! by mistake). `max_orders_per_minute` counts the orders of one (identity, key) pair; the
//! smallest limit among the layers that apply binds.
//!
//! Not in the tables, so never refused: previews (`/orders/preview`, Prime's `order_preview`:
//! Coinbase places nothing, and a client may want to ask what an order would cost while
//! halted), cancels (the way out), reads, and WebSocket data.
//!
//! The body is parsed as Coinbase's gateway would read it, and anything it could read
//! differently is refused: a field given twice, also under another spelling (`productId`,
//! `Product_ID`: Go and protobuf JSON accept those), more than one order configuration, and
//! sizes or prices that are not plain decimal strings.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use percent_encoding::percent_decode_str;
use rust_decimal::Decimal;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::{Config, GuardConfig, KeyKind, ORDER_TYPES};
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
    /// A derivatives gateway call cbgate cannot tell apart (400 `bad_request`): a JSON-RPC
    /// batch, or a body naming another method than the path.
    #[error("{0}")]
    BadCall(String),
}

fn halted_message(h: &HaltState) -> String {
    format!(
        "trading is halted since {} ({}): orders are refused until `cbgate resume`; cancels and reads still pass",
        h.since_rfc3339(),
        h.reason
    )
}

/// Where the guard gets a product's current price: the public price endpoint of the family
/// of the host the order goes to, through cbgate's upstream client. Implemented in `forward`,
/// which may reach the network.
pub trait PriceSource: Sync {
    /// Which upstream answers (host[:port]): prices are cached per upstream, so a sandbox's
    /// price never values a production order.
    fn origin(&self) -> &str;

    /// The product's current price, or why it is not known.
    fn price<'a>(
        &'a self,
        product: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Decimal, String>> + Send + 'a>>;
}

/// Where a request goes, as the guard sees it.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// The route's upstream family: which table applies.
    pub family: KeyKind,
    /// The upstream is the derivatives gateway (JSON-RPC): [`GATEWAY`] applies.
    pub gateway: bool,
    pub method: &'a Method,
    /// The upstream path.
    pub path: &'a str,
    /// The upstream query, if any (the gateway's parameters may be there).
    pub query: Option<&'a str>,
}

/// Who sends an order: the client identity's name and the signing key's name (`None`:
/// unsigned). Picks the override layers and the `max_orders_per_minute` window.
#[derive(Clone, Copy, Debug)]
pub struct Sender<'a> {
    pub identity: &'a str,
    pub key: Option<&'a str>,
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
    /// `BUY` or `SELL`, upper case whatever the family's spelling.
    pub side: Field<String>,
    /// The order type as the body gives it, e.g. `limit_limit_gtc` (Advanced Trade's
    /// `order_configuration` key), `limit` (Exchange), `LIMIT` (INTX, Prime).
    pub configuration: Field<String>,
    /// The [`ORDER_TYPES`] name that configuration is, if cbgate knows it.
    pub kind: Option<&'static str>,
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
    /// The family whose hosts serve it.
    pub family: KeyKind,
    pub method: Method,
    /// The upstream path, lower case, no trailing `/`; a `*` segment is any one segment.
    pub path: &'static str,
    /// What the request does, for messages.
    pub what: &'static str,
    pub parse: fn(&Map<String, Value>) -> Result<Order, Refusal>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} ({})",
            self.family.as_str(),
            self.method,
            self.path,
            self.what
        )
    }
}

/// Advanced Trade (`api.coinbase.com/api/v3/brokerage`): create, edit, close a position.
pub static ADVANCED_TRADE: &[Endpoint] = &[
    Endpoint {
        family: KeyKind::Cdp,
        method: Method::POST,
        path: "/api/v3/brokerage/orders",
        what: "order",
        parse: parse_create,
    },
    Endpoint {
        family: KeyKind::Cdp,
        method: Method::POST,
        path: "/api/v3/brokerage/orders/edit",
        what: "order edit",
        parse: parse_edit,
    },
    Endpoint {
        family: KeyKind::Cdp,
        method: Method::POST,
        path: "/api/v3/brokerage/orders/close_position",
        what: "position close",
        parse: parse_close,
    },
    // Committing a convert quote trades one currency for another; the amounts were set by the
    // quote (`POST /convert/quote`, which moves nothing and so passes).
    Endpoint {
        family: KeyKind::Cdp,
        method: Method::POST,
        path: "/api/v3/brokerage/convert/trade/*",
        what: "conversion",
        parse: parse_unknown,
    },
];

/// Coinbase Exchange (`api.exchange.coinbase.com`): `POST /orders` (it has no edit).
pub static EXCHANGE: &[Endpoint] = &[Endpoint {
    family: KeyKind::Exchange,
    method: Method::POST,
    path: "/orders",
    what: "order",
    parse: parse_exchange,
}];

/// International Exchange (`api.international.coinbase.com`): create and modify.
pub static INTX: &[Endpoint] = &[
    Endpoint {
        family: KeyKind::Intx,
        method: Method::POST,
        path: "/api/v1/orders",
        what: "order",
        parse: parse_intx,
    },
    Endpoint {
        family: KeyKind::Intx,
        method: Method::PUT,
        path: "/api/v1/orders/*",
        what: "order modify",
        parse: parse_intx_modify,
    },
];

/// Coinbase Prime (`api.prime.coinbase.com`): create and edit (the preview places nothing).
pub static PRIME: &[Endpoint] = &[
    Endpoint {
        family: KeyKind::Prime,
        method: Method::POST,
        path: "/v1/portfolios/*/order",
        what: "order",
        parse: parse_prime,
    },
    Endpoint {
        family: KeyKind::Prime,
        method: Method::PUT,
        path: "/v1/portfolios/*/orders/*/edit",
        what: "order edit",
        parse: parse_prime_edit,
    },
    // Accepting an RFQ quote executes it at the quote's size and price (the quote request
    // itself places nothing).
    Endpoint {
        family: KeyKind::Prime,
        method: Method::POST,
        path: "/v1/portfolios/*/accept_quote",
        what: "quote acceptance",
        parse: parse_prime_accept,
    },
];

/// The derivatives gateway (`drb.coinbase.com/api/v2`, JSON-RPC 2.0): `path` is the RPC
/// method, called by any HTTP method (ccxt sends `GET` with the parameters in the query).
/// Block trades and RFQ quotes execute at sizes the guard cannot read, so every limit that
/// needs a value refuses them.
pub static GATEWAY: &[Endpoint] = &[
    rpc("private/buy", "order", parse_rpc_buy),
    rpc("private/sell", "order", parse_rpc_sell),
    rpc("private/edit", "order edit", parse_rpc_edit),
    rpc("private/edit_by_label", "order edit", parse_rpc_edit),
    rpc("private/close_position", "position close", parse_rpc_close),
    rpc("private/execute_block_trade", "block trade", parse_unknown),
    rpc("private/approve_block_trade", "block trade", parse_unknown),
    rpc("private/verify_block_trade", "block trade", parse_unknown),
    rpc(
        "private/accept_block_rfq",
        "block RFQ acceptance",
        parse_unknown,
    ),
    rpc(
        "private/add_block_rfq_quote",
        "block RFQ quote",
        parse_unknown,
    ),
    rpc(
        "private/edit_block_rfq_quote",
        "block RFQ quote",
        parse_unknown,
    ),
];

const fn rpc(
    method: &'static str,
    what: &'static str,
    parse: fn(&Map<String, Value>) -> Result<Order, Refusal>,
) -> Endpoint {
    Endpoint {
        family: KeyKind::Cdp,
        method: Method::POST,
        path: method,
        what,
        parse,
    }
}

/// Every family's table.
static FAMILIES: &[&[Endpoint]] = &[ADVANCED_TRADE, EXCHANGE, INTX, PRIME];

/// The guarded endpoint a request to a host of `family` goes to, if any. `path` is the
/// upstream path, matched as the policy matches it (each segment percent-decoded and
/// case-folded, a `.json`-style format suffix and a trailing `/` ignored), so no spelling
/// slips past.
pub fn endpoint(family: KeyKind, method: &Method, path: &str) -> Option<&'static Endpoint> {
    FAMILIES
        .iter()
        .flat_map(|f| f.iter())
        .filter(|e| e.family == family && e.method == method)
        .find(|e| path_matches(e.path, path))
}

/// Whether `path` is `pattern` in any spelling the policy treats as the same path.
fn path_matches(pattern: &str, path: &str) -> bool {
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let (Some(pat), Some(got)) = (pattern.strip_prefix('/'), path.strip_prefix('/')) else {
        return false;
    };
    let mut got = got.split('/');
    for want in pat.split('/') {
        let Some(seg) = got.next() else {
            return false;
        };
        if want == "*" {
            if seg.is_empty() {
                return false;
            }
            continue;
        }
        let seg = percent_decode_str(seg)
            .decode_utf8_lossy()
            .to_ascii_lowercase();
        // The policy's rule: a literal also matches itself plus a format suffix.
        let ok = seg
            .strip_prefix(want)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'));
        if !ok {
            return false;
        }
    }
    got.next().is_none()
}

/// One guard layer, compiled: where it comes from (for messages) and its limits.
#[derive(Debug)]
struct Layer {
    /// The table's key: `guard`, `keys.NAME.guard`, `clients.NAME.guard`.
    name: String,
    cfg: GuardConfig,
}

impl Layer {
    fn new(name: String, cfg: &GuardConfig) -> Option<Layer> {
        if !cfg.is_active() {
            return None;
        }
        let mut cfg = cfg.clone();
        for p in &mut cfg.products {
            p.make_ascii_uppercase();
        }
        for s in &mut cfg.sides {
            s.make_ascii_uppercase();
        }
        Some(Layer { name, cfg })
    }
}

/// Prices fetched, by (family, product): when, and the price.
type PriceCache = HashMap<(String, String), (Instant, Decimal)>;

/// The compiled guard layers plus the kill switch.
#[derive(Debug)]
pub struct Guard {
    global: Option<Layer>,
    keys: HashMap<String, Layer>,
    clients: HashMap<String, Layer>,
    /// How long a fetched price is reused: `[guard].price_max_age`.
    price_max_age: Duration,
    halt: Halt,
    /// When each order of the last minute was admitted, per layer (bounded by the config).
    windows: Mutex<HashMap<String, VecDeque<Instant>>>,
    prices: Mutex<PriceCache>,
}

impl Guard {
    /// Compiles `[guard]` alone (already validated); the kill switch starts in memory.
    pub fn new(cfg: &GuardConfig) -> Guard {
        Guard {
            global: Layer::new("guard".into(), cfg),
            keys: HashMap::new(),
            clients: HashMap::new(),
            price_max_age: cfg.price_max_age,
            halt: Halt::in_memory(),
            windows: Mutex::new(HashMap::new()),
            prices: Mutex::new(HashMap::new()),
        }
    }

    /// Compiles `[guard]`, every `[keys.NAME.guard]` and every `[clients.NAME.guard]`.
    pub fn from_config(cfg: &Config) -> Guard {
        let mut g = Guard::new(&cfg.guard);
        for (name, k) in &cfg.keys {
            if let Some(l) = k
                .guard
                .as_ref()
                .and_then(|c| Layer::new(format!("keys.{name}.guard"), c))
            {
                g.keys.insert(name.clone(), l);
            }
        }
        for (name, c) in &cfg.clients.named {
            if let Some(l) = c
                .guard
                .as_ref()
                .and_then(|c| Layer::new(format!("clients.{name}.guard"), c))
            {
                g.clients.insert(name.clone(), l);
            }
        }
        g
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

    /// The layers that apply to `who`, global first.
    fn layers<'a>(&'a self, who: &Sender<'_>) -> Vec<&'a Layer> {
        let mut v: Vec<&Layer> = self.global.iter().collect();
        if let Some(l) = who.key.and_then(|k| self.keys.get(k)) {
            v.push(l);
        }
        if let Some(l) = self.clients.get(who.identity) {
            v.push(l);
        }
        v
    }

    /// Decides one request whose body has been read (`body`, at most `max_body_bytes`):
    /// passes anything that is not an order endpoint; refuses orders while halted (423), and
    /// with a limit that applies to `who` parses the order (at most 64 KiB) and checks it.
    /// The body is forwarded as is.
    pub async fn admit(
        &self,
        to: &Target<'_>,
        body: &Bytes,
        who: &Sender<'_>,
        prices: &dyn PriceSource,
    ) -> Result<(), Refusal> {
        if to.gateway {
            return self.admit_rpc(to, body, who);
        }
        let Some(ep) = endpoint(to.family, to.method, to.path) else {
            return Ok(());
        };
        if let Some(h) = self.halt.current() {
            return Err(Refusal::Halted(h));
        }
        if self.layers(who).is_empty() {
            return Ok(());
        }
        within_order_limit(ep, body)?;
        self.check(ep, body, who, prices).await
    }

    /// [`Guard::admit`] for the derivatives gateway: the call is read from the path, or from
    /// the body's `method` when the path names none (they must agree when both do), and its
    /// parameters from the query or the body's `params`.
    fn admit_rpc(&self, to: &Target<'_>, body: &Bytes, who: &Sender<'_>) -> Result<(), Refusal> {
        let env = rpc_envelope(body)?;
        let from_path = rpc_method_of_path(to.path);
        let call = match (&from_path, &env.method) {
            (Some(p), Some(b)) if !p.eq_ignore_ascii_case(b) => {
                return Err(Refusal::BadCall(format!(
                    "the JSON-RPC body calls {b:?} but the path calls {p:?}; cbgate judges one call per request: send the body to /api/v2/{b}"
                )))
            }
            (Some(p), _) => p.clone(),
            (None, Some(b)) => b.to_ascii_lowercase(),
            (None, None) => return Ok(()),
        };
        let Some(ep) = GATEWAY.iter().find(|e| e.path == call) else {
            return Ok(());
        };
        if let Some(h) = self.halt.current() {
            return Err(Refusal::Halted(h));
        }
        let layers = self.layers(who);
        if layers.is_empty() {
            return Ok(());
        }
        within_order_limit(ep, body)?;
        let params = rpc_params(to.query, env.params.as_deref(), ep)?;
        let order = (ep.parse)(&params)?;
        for l in &layers {
            check_fields(l, ep, &order)?;
        }
        // The gateway's `amount` is in USD for inverse instruments and in the base currency
        // for linear ones, and options are priced in the base currency: without each
        // instrument's specification cbgate cannot tell a size from a notional, so a size
        // limit refuses (never guesses).
        if let Some(l) = layers
            .iter()
            .find(|l| l.cfg.max_order_base.is_some() || l.cfg.max_order_quote.is_some())
        {
            return Err(denied(format!(
                "{}.max_order_base / max_order_quote is set, and the size of a derivatives gateway {} cannot be determined (its amount is in USD for inverse instruments and in the base currency for linear ones); put size limits in [keys.NAME.guard] of the keys that do not trade there",
                l.name, ep.what
            )));
        }
        self.reserve(&layers, who)
    }

    /// Checks one order body against every limit of every layer that applies to `who`;
    /// reserves a rate slot when all pass.
    pub async fn check(
        &self,
        ep: &Endpoint,
        body: &[u8],
        who: &Sender<'_>,
        prices: &dyn PriceSource,
    ) -> Result<(), Refusal> {
        let obj = parse_strict(body)
            .map_err(|e| Refusal::BadOrder(format!("the {} body is not valid: {e}", ep.what)))?;
        let order = (ep.parse)(&obj)?;
        let layers = self.layers(who);
        for l in &layers {
            check_fields(l, ep, &order)?;
        }
        for l in &layers {
            self.check_size(l, ep, &order, prices).await?;
        }
        self.reserve(&layers, who)
    }

    async fn check_size(
        &self,
        layer: &Layer,
        ep: &Endpoint,
        order: &Order,
        prices: &dyn PriceSource,
    ) -> Result<(), Refusal> {
        let (max_base, max_quote) = (layer.cfg.max_order_base, layer.cfg.max_order_quote);
        // An order naming both sizes is judged by the larger reading of each (a tiny quote
        // size next to a huge base size must not pass as the tiny one), so it needs a price.
        let both = order.base.is_some() && order.quote.is_some();
        let need_price = (max_base.is_some() && (order.base.is_none() || both))
            || (max_quote.is_some() && (order.quote.is_none() || both));
        let mut priced_by = "limit_price";
        let price = match (order.limit_price, need_price) {
            (Some(p), _) => Some(p),
            (None, false) => None,
            (None, true) => {
                priced_by = "current price";
                let Field::Given(product) = &order.product else {
                    return Err(undetermined(ep, "it names no price and no product"));
                };
                Some(
                    self.price(ep.family, product, prices)
                        .await
                        .map_err(|why| {
                            undetermined(ep, &format!("the price of {product} is not known: {why}"))
                        })?,
                )
            }
        };
        let n = &layer.name;
        if let Some(max) = max_base {
            let from_quote = match (order.quote, price) {
                (Some(q), Some(p)) if !p.is_zero() => {
                    Some(q.checked_div(p).unwrap_or(Decimal::MAX))
                }
                _ => None,
            };
            let base = match (order.base, from_quote) {
                (Some(b), Some(f)) => b.max(f),
                (Some(b), None) if order.quote.is_none() => b,
                (None, Some(f)) => f,
                _ => return Err(undetermined(ep, "its base size cannot be worked out")),
            };
            if base > max {
                return Err(denied(format!(
                    "{n}.max_order_base is {max}; this {} is {base} in the base currency",
                    ep.what
                )));
            }
        }
        if let Some(max) = max_quote {
            let from_base = match (order.base, price) {
                (Some(b), Some(p)) => match b.checked_mul(p) {
                    Some(q) => Some((q, format!("{b} x {p} {priced_by}"))),
                    None => return Err(undetermined(ep, "its notional overflows")),
                },
                _ => None,
            };
            let (quote, how) = match (order.quote, from_base) {
                (Some(q), Some((f, how))) if f > q => (f, how),
                (Some(q), Some(_)) => (q, "quote size".to_owned()),
                (Some(q), None) if order.base.is_none() => (q, "quote size".to_owned()),
                (None, Some(f)) => f,
                _ => return Err(undetermined(ep, "its size is not given")),
            };
            if quote > max {
                return Err(denied(format!(
                    "{n}.max_order_quote is {max}; this {}'s notional is {} ({how}) in the quote currency",
                    ep.what,
                    quote.normalize()
                )));
            }
        }
        Ok(())
    }

    /// A product's price on `family`'s hosts: cached for `guard.price_max_age`, else fetched.
    async fn price(
        &self,
        family: KeyKind,
        product: &str,
        prices: &dyn PriceSource,
    ) -> Result<Decimal, String> {
        let key = (
            format!("{}|{}", family.as_str(), prices.origin()),
            product.to_ascii_uppercase(),
        );
        {
            let cache = self.prices.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, p)) = cache.get(&key) {
                if at.elapsed() < self.price_max_age {
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

    /// Takes one slot in the window of every layer in `layers` that sets
    /// `max_orders_per_minute`, or refuses and takes none. Each layer counts its own scope:
    /// `[guard]` every order through this cbgate, `keys.NAME.guard` every order with that key,
    /// `clients.NAME.guard` every order of that identity; so cycling keys or identities never
    /// multiplies a limit.
    fn reserve(&self, layers: &[&Layer], who: &Sender<'_>) -> Result<(), Refusal> {
        let limited: Vec<(u32, &str)> = layers
            .iter()
            .filter_map(|l| l.cfg.max_orders_per_minute.map(|m| (m, l.name.as_str())))
            .collect();
        if limited.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let mut all = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        for (max, name) in &limited {
            let w = all.entry((*name).to_owned()).or_default();
            while w
                .front()
                .is_some_and(|t| now.duration_since(*t) >= RATE_WINDOW)
            {
                w.pop_front();
            }
            if w.len() >= *max as usize {
                let retry = w
                    .front()
                    .map(|t| RATE_WINDOW.saturating_sub(now.duration_since(*t)).as_secs() + 1)
                    .unwrap_or(1);
                return Err(denied(format!(
                    "{name}.max_orders_per_minute is {max}: {} orders in the last minute (this one from identity {} with key {}); retry in {retry} s",
                    w.len(),
                    who.identity,
                    who.key.unwrap_or("(none)"),
                )));
            }
        }
        // All passed under the one lock: take a slot in each.
        for (_, name) in &limited {
            if let Some(w) = all.get_mut(*name) {
                w.push_back(now);
            }
        }
        Ok(())
    }
}

/// The limits that need no price: products, sides, order types, post-only.
fn check_fields(layer: &Layer, ep: &Endpoint, order: &Order) -> Result<(), Refusal> {
    let (c, n) = (&layer.cfg, &layer.name);
    match &order.product {
        Field::Given(p)
            if !c.products.is_empty() && !c.products.contains(&p.to_ascii_uppercase()) =>
        {
            return Err(denied(format!(
                "product {p} is not in {n}.products ({})",
                c.products.join(", ")
            )));
        }
        Field::Unknown if !c.products.is_empty() => {
            return Err(denied(format!(
                "a {}'s product is not in the request, and {n}.products allows only {}",
                ep.what,
                c.products.join(", ")
            )));
        }
        _ => {}
    }
    if !c.sides.is_empty() {
        match &order.side {
            Field::Given(s) if !c.sides.contains(s) => {
                return Err(denied(format!(
                    "side {s} is not in {n}.sides ({})",
                    c.sides.join(", ")
                )))
            }
            Field::Unknown => {
                return Err(denied(format!(
                    "a {}'s side is not in the request, and {n}.sides allows only {}",
                    ep.what,
                    c.sides.join(", ")
                )))
            }
            _ => {}
        }
    }
    if order.configuration == Field::Unknown && !c.order_types.is_empty() {
        return Err(denied(format!(
            "a {}'s order type is not in the request, and {n}.order_types allows only {}",
            ep.what,
            c.order_types.join(", ")
        )));
    }
    if let Field::Given(key) = &order.configuration {
        let Some(kind) = order.kind else {
            return Err(denied(format!(
                "order type {key} is not one cbgate can value; the guard refuses it"
            )));
        };
        if !c.order_types.is_empty() && !c.order_types.iter().any(|t| t == kind || t == key) {
            return Err(denied(format!(
                "order type {key} ({kind}) is not in {n}.order_types ({})",
                c.order_types.join(", ")
            )));
        }
    }
    if c.require_post_only {
        match order.post_only {
            Field::Given(true) | Field::Unchanged => {}
            _ => {
                return Err(denied(format!(
                    "{n}.require_post_only is set: only limit orders with \"post_only\": true pass (this {} is not post-only)",
                    ep.what
                )))
            }
        }
    }
    Ok(())
}

/// Refuses an order body over [`ORDER_BODY_LIMIT`] before it is parsed.
fn within_order_limit(ep: &Endpoint, body: &[u8]) -> Result<(), Refusal> {
    if body.len() > ORDER_BODY_LIMIT {
        return Err(Refusal::BadOrder(format!(
            "the {} body is larger than {ORDER_BODY_LIMIT} bytes; an order is a few hundred",
            ep.what
        )));
    }
    Ok(())
}

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

/// The [`ORDER_TYPES`] name of an Advanced Trade `order_configuration` key.
fn at_kind(key: &str) -> Option<&'static str> {
    ORDER_TYPES
        .iter()
        .find(|(_, keys)| keys.contains(&key))
        .map(|(name, _)| *name)
}

/// `POST /orders`: `{client_order_id, product_id, side, order_configuration: {KEY: {...}}}`.
fn parse_create(obj: &Map<String, Value>) -> Result<Order, Refusal> {
    let product = product_of(obj, "product_id")?;
    let side = side_of(obj)?;
    let Some(Value::Object(conf)) = get(obj, "order_configuration") else {
        return Err(bad("order_configuration must be an object"));
    };
    let mut entries = conf.iter();
    let (Some((key, Value::Object(inner))), None) = (entries.next(), entries.next()) else {
        return Err(bad(
            "order_configuration must hold exactly one order type, e.g. {\"limit_limit_gtc\": {...}}",
        ));
    };
    let key = key.to_ascii_lowercase();
    let kind = at_kind(&key);
    let post_only = post_only_of(inner, kind)?;
    Ok(Order {
        product: Field::Given(product),
        side: Field::Given(side),
        configuration: Field::Given(key),
        kind,
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
        base: decimal(obj, "size")?,
        quote: None,
        limit_price: decimal(obj, "price")?,
        ..unchanged()
    })
}

/// `POST /orders/close_position`: `{client_order_id, product_id, size?}`: a market order on
/// the opposite side of the position.
fn parse_close(obj: &Map<String, Value>) -> Result<Order, Refusal> {
    Ok(Order {
        product: Field::Given(product_of(obj, "product_id")?),
        side: Field::Unknown,
        configuration: Field::Given("market_market_ioc".into()),
        kind: Some("market"),
        post_only: Field::Given(false),
        base: decimal(obj, "size")?,
        quote: None,
        limit_price: None,
    })
}

/// An edit: product, side, type and post-only stay the order's.
fn unchanged() -> Order {
    Order {
        product: Field::Unchanged,
        side: Field::Unchanged,
        configuration: Field::Unchanged,
        kind: None,
        post_only: Field::Unchanged,
        base: None,
        quote: None,
        limit_price: None,
    }
}

// ---------------------------------------------------------------------------
// Exchange, INTX and Prime bodies
// ---------------------------------------------------------------------------

/// Exchange `POST /orders`: `{product_id, side: buy|sell, type: limit|market|stop, size,
/// price, funds, stop, stop_price, post_only, time_in_force, ...}` (type defaults to limit).
/// A `stop` on a limit order makes it a stop-limit. A market order's `price` is ignored by
/// Coinbase, so it never values one: size x current price does.
fn parse_exchange(obj: &Map<String, Value>) -> Result<Order, Refusal> {
    let product = product_of(obj, "product_id")?;
    let side = side_of(obj)?;
    let ty = match get(obj, "type") {
        None | Some(Value::Null) => "limit".to_owned(),
        Some(Value::String(t)) => t.to_ascii_lowercase(),
        Some(_) => return Err(bad("type must be \"limit\", \"market\" or \"stop\"")),
    };
    let stop = !matches!(get(obj, "stop"), None | Some(Value::Null));
    let kind = match (ty.as_str(), stop) {
        ("limit", false) => Some("limit"),
        ("limit", true) | ("stop", _) => Some("stop_limit"),
        ("market", false) => Some("market"),
        _ => None,
    };
    let configuration = if stop && ty != "stop" {
        format!("{ty} (stop)")
    } else {
        ty
    };
    sized(
        obj,
        product,
        side,
        configuration,
        kind,
        ["size", "funds", "price"],
    )
}

/// INTX `POST /api/v1/orders`: `{instrument, side: BUY|SELL, size, type: MARKET|LIMIT|
/// STOP|STOP_LIMIT|TAKE_PROFIT_STOP_LOSS, price, stop_price, post_only, tif, portfolio, ...}`.
/// Sizes are in the base asset. A STOP order is a market order once triggered, at a price
/// no body states: the guard does not value it.
fn parse_intx(obj: &Map<String, Value>) -> Result<Order, Refusal> {
    let product = product_of(obj, "instrument")?;
    let side = side_of(obj)?;
    let ty = type_of(obj, "MARKET, LIMIT, STOP_LIMIT or TAKE_PROFIT_STOP_LOSS")?;
    let kind = match ty.as_str() {
        "MARKET" => Some("market"),
        "LIMIT" => Some("limit"),
        "STOP_LIMIT" => Some("stop_limit"),
        "TAKE_PROFIT_STOP_LOSS" => Some("bracket"),
        _ => None,
    };
    let mut order = sized(obj, product, side, ty, kind, ["size", "", "price"])?;
    if order.limit_price.is_some() {
        order.limit_price = intx_bound(obj, order.limit_price)?;
    }
    Ok(order)
}

/// An INTX order's highest stated price: a bracket's stop leg fills at `stop_limit_price`,
/// which may be far from its take-profit `price`, so the notional uses the largest.
fn intx_bound(
    obj: &Map<String, Value>,
    price: Option<Decimal>,
) -> Result<Option<Decimal>, Refusal> {
    let mut bound = price;
    for name in ["stop_price", "stop_limit_price"] {
        if let Some(p) = decimal(obj, name)? {
            bound = Some(bound.map_or(p, |b| b.max(p)));
        }
    }
    Ok(bound)
}

/// INTX `PUT /api/v1/orders/{id}`: `{portfolio, client_order_id, price, stop_price, size,
/// stop_limit_price}`; instrument, side and type stay the order's.
fn parse_intx_modify(obj: &Map<String, Value>) -> Result<Order, Refusal> {
    Ok(Order {
        base: decimal(obj, "size")?,
        limit_price: intx_bound(obj, decimal(obj, "price")?)?,
        ..unchanged()
    })
}

/// Prime `POST /v1/portfolios/{id}/order`: `{product_id, side: BUY|SELL, type: MARKET|LIMIT|
/// TWAP|VWAP|BLOCK|STOP_LIMIT|RFQ, base_quantity, quote_value, limit_price, post_only, ...}`.
/// Prime has no public price endpoint, so a market order in base size cannot be valued.
fn parse_prime(obj: &Map<String, Value>) -> Result<Order, Refusal> {
    let product = product_of(obj, "product_id")?;
    let side = side_of(obj)?;
    let ty = type_of(obj, "MARKET, LIMIT, TWAP or STOP_LIMIT")?;
    let kind = match ty.as_str() {
        "MARKET" => Some("market"),
        "LIMIT" => Some("limit"),
        "STOP_LIMIT" => Some("stop_limit"),
        "TWAP" => Some("twap"),
        _ => None,
    };
    sized(
        obj,
        product,
        side,
        ty,
        kind,
        ["base_quantity", "quote_value", "limit_price"],
    )
}

/// Prime `PUT /v1/portfolios/{id}/orders/{order_id}/edit`: `{orig_client_order_id,
/// client_order_id, base_quantity, quote_value, limit_price, stop_price, ...}`.
fn parse_prime_edit(obj: &Map<String, Value>) -> Result<Order, Refusal> {
    Ok(Order {
        base: decimal(obj, "base_quantity")?,
        quote: decimal(obj, "quote_value")?,
        limit_price: decimal(obj, "limit_price")?,
        ..unchanged()
    })
}

/// An order with its sizes read from the `[base, quote, price]` fields (`""`: none); a
/// market order has no price bound, whatever the body says.
fn sized(
    obj: &Map<String, Value>,
    product: String,
    side: String,
    configuration: String,
    kind: Option<&'static str>,
    [base, quote, price]: [&str; 3],
) -> Result<Order, Refusal> {
    let opt = |name: &str| {
        if name.is_empty() {
            Ok(None)
        } else {
            decimal(obj, name)
        }
    };
    let limit_price = opt(price)?;
    Ok(Order {
        product: Field::Given(product),
        side: Field::Given(side),
        configuration: Field::Given(configuration),
        kind,
        post_only: Field::Given(post_only_of(obj, kind)?),
        base: opt(base)?,
        quote: opt(quote)?,
        limit_price: if kind == Some("market") {
            None
        } else {
            limit_price
        },
    })
}

/// A trade whose product, side, type and size are not in the request (a convert commit, a
/// block trade): every limit that needs one of them refuses it; the order rate counts it.
fn parse_unknown(_: &Map<String, Value>) -> Result<Order, Refusal> {
    Ok(Order {
        product: Field::Unknown,
        side: Field::Unknown,
        configuration: Field::Unknown,
        kind: None,
        post_only: Field::Unknown,
        base: None,
        quote: None,
        limit_price: None,
    })
}

/// Prime `POST /v1/portfolios/{id}/accept_quote`: `{product_id, side, client_order_id,
/// quote_id}`; size and price are the quote's.
fn parse_prime_accept(obj: &Map<String, Value>) -> Result<Order, Refusal> {
    Ok(Order {
        product: Field::Given(product_of(obj, "product_id")?),
        side: Field::Given(side_of(obj)?),
        ..parse_unknown(obj)?
    })
}

// ---------------------------------------------------------------------------
// Derivatives gateway (JSON-RPC) calls
// ---------------------------------------------------------------------------

/// The top level of a JSON-RPC body: the method it names and its raw `params`.
#[derive(Default)]
struct Envelope {
    method: Option<String>,
    params: Option<Box<RawValue>>,
}

/// Reads `method` and `params` from a gateway body without building the rest: an empty or
/// non-JSON body names neither (the gateway answers it with its own error). A batch (a JSON
/// array) is refused, since its calls could each be anything.
fn rpc_envelope(body: &[u8]) -> Result<Envelope, Refusal> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        Some(b'[') => {
            return Err(Refusal::BadCall(
                "a JSON-RPC batch (a JSON array) is refused: cbgate judges one call per request; send the calls one by one".into(),
            ))
        }
        _ => return Ok(Envelope::default()),
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let env = de
        .deserialize_map(EnvelopeVisitor)
        .and_then(|e| de.end().map(|()| e))
        .map_err(|e| Refusal::BadCall(format!("the JSON-RPC body is not valid: {e}")))?;
    Ok(env)
}

struct EnvelopeVisitor;

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = Envelope;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON-RPC object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
        let mut env = Envelope::default();
        let mut seen = HashSet::new();
        while let Some(k) = map.next_key::<Cow<'de, str>>()? {
            let name = spelling(&k);
            if !seen.insert(name.clone()) {
                return Err(serde::de::Error::custom(format!(
                    "field {k:?} is given twice (perhaps under another spelling)"
                )));
            }
            match name.as_str() {
                "method" => env.method = Some(map.next_value::<String>()?),
                "params" => env.params = Some(map.next_value::<Box<RawValue>>()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(env)
    }
}

/// The RPC method a gateway path calls (`/api/v2/private/buy` -> `private/buy`), in the
/// policy's match form with a format suffix dropped; `None` for `/api/v2` itself.
fn rpc_method_of_path(path: &str) -> Option<String> {
    let form = crate::gate::policy::match_form(path);
    let call = form.strip_prefix("/api/v2/")?;
    let call = match call.rsplit_once('/') {
        Some((dir, last)) => format!("{dir}/{}", last.split('.').next().unwrap_or(last)),
        None => call.split('.').next().unwrap_or(call).to_owned(),
    };
    (!call.is_empty()).then_some(call)
}

/// A gateway order's parameters: the query's (ccxt's `GET`) or the body's `params`, never
/// both (the gateway might read either).
fn rpc_params(
    query: Option<&str>,
    params: Option<&RawValue>,
    ep: &Endpoint,
) -> Result<Map<String, Value>, Refusal> {
    let query = query.filter(|q| !q.is_empty());
    match (query, params) {
        (Some(_), Some(_)) => Err(Refusal::BadOrder(format!(
            "the {} gives parameters in both the query and the body; send them in one place",
            ep.what
        ))),
        (None, Some(p)) => parse_strict(p.get().as_bytes())
            .map_err(|e| Refusal::BadOrder(format!("the {}'s params are not valid: {e}", ep.what))),
        (Some(q), None) => {
            let mut out = Map::new();
            let mut seen = HashSet::new();
            for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
                if !seen.insert(spelling(&k)) {
                    return Err(Refusal::BadOrder(format!(
                        "the {}'s parameter {k:?} is given twice (perhaps under another spelling)",
                        ep.what
                    )));
                }
                // A query spells booleans as text.
                let v = match v.as_ref() {
                    "true" => Value::Bool(true),
                    "false" => Value::Bool(false),
                    _ => Value::String(v.into_owned()),
                };
                out.insert(k.into_owned(), v);
            }
            Ok(out)
        }
        (None, None) => Ok(Map::new()),
    }
}

/// The [`ORDER_TYPES`] name of a gateway order `type` (default `limit`); stop-market, take
/// and trailing orders are not ones the guard values.
fn rpc_type(obj: &Map<String, Value>) -> Result<(String, Option<&'static str>), Refusal> {
    let ty = match get(obj, "type") {
        None | Some(Value::Null) => "limit".to_owned(),
        Some(Value::String(t)) if !t.is_empty() => t.to_ascii_lowercase(),
        Some(_) => return Err(bad("type must be a string such as \"limit\" or \"market\"")),
    };
    let kind = match ty.as_str() {
        "limit" => Some("limit"),
        "market" => Some("market"),
        "stop_limit" => Some("stop_limit"),
        _ => None,
    };
    Ok((ty, kind))
}

/// `instrument_name`, e.g. `BTC-PERPETUAL`, `BTC_USDC-PERPETUAL`, `BTC-27DEC24-50000-C`.
fn instrument_of(obj: &Map<String, Value>) -> Result<String, Refusal> {
    match get(obj, "instrument_name") {
        Some(Value::String(p))
            if (1..=64).contains(&p.len())
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            Ok(p.clone())
        }
        _ => Err(bad(
            "instrument_name must be an instrument such as \"BTC-PERPETUAL\"",
        )),
    }
}

/// `private/buy` and `private/sell`: `{instrument_name, amount | contracts, type, price,
/// post_only, ...}`; the side is the method's.
fn parse_rpc_order(obj: &Map<String, Value>, side: &str) -> Result<Order, Refusal> {
    let product = instrument_of(obj)?;
    let (ty, kind) = rpc_type(obj)?;
    Ok(Order {
        product: Field::Given(product),
        side: Field::Given(side.to_owned()),
        configuration: Field::Given(ty),
        kind,
        post_only: Field::Given(post_only_of(obj, kind)?),
        base: None,
        quote: None,
        limit_price: None,
    })
}

fn parse_rpc_buy(obj: &Map<String, Value>) -> Result<Order, Refusal> {
    parse_rpc_order(obj, "BUY")
}

fn parse_rpc_sell(obj: &Map<String, Value>) -> Result<Order, Refusal> {
    parse_rpc_order(obj, "SELL")
}

/// `private/edit` (`order_id`) and `private/edit_by_label` (`label`, `instrument_name`):
/// amount, price and post-only may change; instrument, side and type stay the order's.
fn parse_rpc_edit(obj: &Map<String, Value>) -> Result<Order, Refusal> {
    let post_only = match get(obj, "post_only") {
        None | Some(Value::Null) => Field::Unchanged,
        Some(_) => Field::Given(post_only_of(obj, None)?),
    };
    Ok(Order {
        post_only,
        ..unchanged()
    })
}

/// `private/close_position`: `{instrument_name, type: limit | market, price}`; the side and
/// the size are the position's.
fn parse_rpc_close(obj: &Map<String, Value>) -> Result<Order, Refusal> {
    let product = instrument_of(obj)?;
    let (ty, kind) = rpc_type(obj)?;
    Ok(Order {
        product: Field::Given(product),
        side: Field::Unknown,
        configuration: Field::Given(ty),
        kind,
        post_only: Field::Given(false),
        base: None,
        quote: None,
        limit_price: None,
    })
}

fn bad(why: &str) -> Refusal {
    Refusal::BadOrder(format!("invalid order: {why}"))
}

/// `side`, `BUY` or `SELL` in either case (Exchange spells them `buy`, `sell`), upper-cased.
fn side_of(obj: &Map<String, Value>) -> Result<String, Refusal> {
    match get(obj, "side") {
        Some(Value::String(s))
            if s.eq_ignore_ascii_case("BUY") || s.eq_ignore_ascii_case("SELL") =>
        {
            Ok(s.to_ascii_uppercase())
        }
        _ => Err(bad("side must be \"BUY\" or \"SELL\"")),
    }
}

/// `type`, upper-cased (INTX and Prime).
fn type_of(obj: &Map<String, Value>, which: &str) -> Result<String, Refusal> {
    match get(obj, "type") {
        Some(Value::String(t)) if !t.is_empty() => Ok(t.to_ascii_uppercase()),
        _ => Err(bad(&format!("type must be one of {which}"))),
    }
}

/// `post_only`; a market order is never post-only, whatever the body says.
fn post_only_of(obj: &Map<String, Value>, kind: Option<&str>) -> Result<bool, Refusal> {
    let p = match get(obj, "post_only") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("post_only must be true or false")),
    };
    Ok(p && kind != Some("market"))
}

fn product_of(obj: &Map<String, Value>, name: &str) -> Result<String, Refusal> {
    match get(obj, name) {
        Some(Value::String(p))
            if (1..=64).contains(&p.len())
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
        {
            Ok(p.clone())
        }
        _ => Err(bad(&format!(
            "{name} must be a product id such as \"BTC-USD\""
        ))),
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
        fn origin(&self) -> &str {
            "fixed"
        }

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

    const WHO: Sender<'static> = Sender {
        identity: "anonymous",
        key: Some("default"),
    };

    async fn check(g: &Guard, body: &str) -> Result<(), Refusal> {
        let ep =
            endpoint(KeyKind::Cdp, &Method::POST, "/api/v3/brokerage/orders").expect("endpoint");
        g.check(ep, body.as_bytes(), &WHO, &Fixed(Some(dec("50000"))))
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
    fn paths_match_in_every_spelling_and_only_on_their_family() {
        use KeyKind::*;
        let at = |m: &Method, p: &str| endpoint(Cdp, m, p).map(|e| e.what);
        assert_eq!(
            at(&Method::POST, "/API/v3/brokerage/orders/"),
            Some("order")
        );
        assert_eq!(
            at(&Method::POST, "/api/v3/brokerage/%6Frders"),
            Some("order")
        );
        assert_eq!(
            at(&Method::POST, "/api/v3/brokerage/orders.json"),
            Some("order")
        );
        assert!(at(&Method::POST, "/api/v3/brokerage/orders/preview").is_none());
        assert!(at(&Method::POST, "/api/v3/brokerage/orders/batch_cancel").is_none());
        assert!(at(&Method::GET, "/api/v3/brokerage/orders").is_none());
        // Exchange's `/orders`, in every spelling, and only on the Exchange host.
        for p in [
            "/orders",
            "/ORDERS",
            "/orders/",
            "/%6frders",
            "/Orders.json",
        ] {
            assert!(endpoint(Exchange, &Method::POST, p).is_some(), "{p}");
        }
        for f in [Cdp, Prime, Intx] {
            assert!(endpoint(f, &Method::POST, "/orders").is_none());
        }
        assert!(endpoint(Exchange, &Method::POST, "/api/v3/brokerage/orders").is_none());
        assert!(endpoint(Exchange, &Method::DELETE, "/orders").is_none());
        assert!(endpoint(Exchange, &Method::POST, "/orders/x").is_none());
        // INTX create and modify; its cancels pass.
        assert!(endpoint(Intx, &Method::POST, "/api/v1/orders").is_some());
        assert!(endpoint(Intx, &Method::PUT, "/api/v1/orders/123").is_some());
        assert!(endpoint(Intx, &Method::PUT, "/API/V1/Orders/123/").is_some());
        assert!(endpoint(Intx, &Method::DELETE, "/api/v1/orders/123").is_none());
        assert!(endpoint(Intx, &Method::DELETE, "/api/v1/orders").is_none());
        // Prime create and edit, not preview or cancel.
        assert!(endpoint(Prime, &Method::POST, "/v1/portfolios/p-1/order").is_some());
        assert!(endpoint(Prime, &Method::POST, "/V1/Portfolios/p-1/Order/").is_some());
        assert!(endpoint(Prime, &Method::PUT, "/v1/portfolios/p-1/orders/o-1/edit").is_some());
        assert!(endpoint(Prime, &Method::POST, "/v1/portfolios/p-1/order_preview").is_none());
        assert!(endpoint(Prime, &Method::POST, "/v1/portfolios/p-1/orders/o-1/cancel").is_none());
        assert!(endpoint(Prime, &Method::POST, "/v1/portfolios//order").is_none());
        assert!(endpoint(Prime, &Method::POST, "/v1/portfolios/p-1/accept_quote").is_some());
        assert!(endpoint(Prime, &Method::POST, "/v1/portfolios/p-1/rfq").is_none());
        assert!(endpoint(Cdp, &Method::POST, "/api/v3/brokerage/convert/trade/q-1").is_some());
        assert!(endpoint(Cdp, &Method::POST, "/api/v3/brokerage/convert/quote").is_none());
        assert!(endpoint(Cdp, &Method::GET, "/api/v3/brokerage/convert/trade/q-1").is_none());
    }

    async fn family_check(
        g: &Guard,
        f: KeyKind,
        m: Method,
        path: &str,
        body: Value,
    ) -> Result<(), Refusal> {
        let ep = endpoint(f, &m, path).expect("endpoint");
        g.check(
            ep,
            body.to_string().as_bytes(),
            &WHO,
            &Fixed(Some(dec("50000"))),
        )
        .await
    }

    #[tokio::test]
    async fn each_familys_shape_is_read() {
        use serde_json::json;
        let g = guard(|c| {
            c.max_order_quote = Some(dec("1000"));
            c.sides = vec!["BUY".into()];
        });
        let ex = |b: Value| family_check(&g, KeyKind::Exchange, Method::POST, "/orders", b);
        assert!(ex(json!({"product_id": "BTC-USD", "side": "buy", "type": "limit", "size": "0.02", "price": "50000"})).await.is_ok());
        let e = ex(
            json!({"product_id": "BTC-USD", "side": "buy", "size": "0.02", "price": "50000.01"}),
        )
        .await
        .expect_err("over");
        assert!(e.to_string().contains("1000.0002"), "{e}");
        // A market order's price is not its bound: size x current price (50000).
        let e = ex(json!({"product_id": "BTC-USD", "side": "buy", "type": "market", "size": "1", "price": "1"})).await.expect_err("over");
        assert!(e.to_string().contains("current price"), "{e}");
        assert!(ex(
            json!({"product_id": "BTC-USD", "side": "buy", "type": "market", "funds": "1000"})
        )
        .await
        .is_ok());
        let e =
            ex(json!({"product_id": "BTC-USD", "side": "sell", "type": "market", "funds": "1"}))
                .await
                .expect_err("side");
        assert!(e.to_string().contains("side SELL"), "{e}");
        // Both sizes: the larger reading binds, a tiny `funds` does not hide a huge `size`.
        let e = ex(json!({"product_id": "BTC-USD", "side": "buy", "type": "limit", "size": "100", "price": "50000", "funds": "1"})).await.expect_err("both sizes, limit");
        assert!(e.to_string().contains("5000000"), "{e}");
        let e = ex(json!({"product_id": "BTC-USD", "side": "buy", "type": "market", "size": "100", "funds": "1"})).await.expect_err("both sizes, market");
        assert!(e.to_string().contains("current price"), "{e}");
        let intx = |b: Value| family_check(&g, KeyKind::Intx, Method::POST, "/api/v1/orders", b);
        assert!(intx(json!({"instrument": "BTC-PERP", "side": "BUY", "type": "LIMIT", "size": "0.02", "price": "50000", "tif": "GTC"})).await.is_ok());
        // A bracket is valued at its highest leg: 0.02 x 60000 (stop_limit_price) > 1000.
        let e = intx(json!({"instrument": "BTC-PERP", "side": "BUY", "type": "TAKE_PROFIT_STOP_LOSS", "size": "0.02", "price": "40000", "stop_price": "59000", "stop_limit_price": "60000", "tif": "GTC"})).await.expect_err("bracket");
        assert!(e.to_string().contains("1200"), "{e}");
        let e = intx(json!({"instrument": "BTC-PERP", "side": "BUY", "type": "STOP", "size": "0.001", "stop_price": "1"})).await.expect_err("stop");
        assert!(
            e.to_string().contains("STOP is not one cbgate can value"),
            "{e}"
        );
        let prime = |b: Value| {
            family_check(
                &g,
                KeyKind::Prime,
                Method::POST,
                "/v1/portfolios/p/order",
                b,
            )
        };
        assert!(prime(
            json!({"product_id": "BTC-USD", "side": "BUY", "type": "MARKET", "quote_value": "1000"})
        )
        .await
        .is_ok());
        let e = prime(json!({"product_id": "BTC-USD", "side": "BUY", "type": "LIMIT", "base_quantity": "1", "limit_price": "1000.01"})).await.expect_err("over");
        assert!(e.to_string().contains("1000.01"), "{e}");
    }

    fn cfg_with(f: impl FnOnce(&mut GuardConfig)) -> GuardConfig {
        let mut c = GuardConfig::default();
        f(&mut c);
        c
    }

    #[tokio::test]
    async fn every_layer_that_applies_binds() {
        let mut cfg = Config {
            guard: cfg_with(|c| c.max_order_quote = Some(dec("1000"))),
            ..Default::default()
        };
        cfg.keys.insert(
            "small".into(),
            crate::config::NamedKeyConfig {
                guard: Some(cfg_with(|c| c.max_order_quote = Some(dec("100")))),
                ..Default::default()
            },
        );
        cfg.clients.named.insert(
            "bot".into(),
            crate::config::ClientConfig {
                guard: Some(cfg_with(|c| c.products = vec!["ETH-USD".into()])),
                ..Default::default()
            },
        );
        let g = Guard::from_config(&cfg);
        let ep = endpoint(KeyKind::Cdp, &Method::POST, "/api/v3/brokerage/orders").expect("ep");
        let run = |who: Sender<'static>, body: String| {
            let g = &g;
            async move { g.check(ep, body.as_bytes(), &who, &Fixed(None)).await }
        };
        let anon = Sender {
            identity: "anonymous",
            key: Some("default"),
        };
        let small = Sender {
            identity: "anonymous",
            key: Some("small"),
        };
        let bot = Sender {
            identity: "bot",
            key: Some("default"),
        };
        assert!(run(anon, limit("0.0021", "50000")).await.is_ok());
        let e = run(small, limit("0.0021", "50000"))
            .await
            .expect_err("key layer");
        assert!(
            e.to_string()
                .contains("keys.small.guard.max_order_quote is 100"),
            "{e}"
        );
        assert!(run(small, limit("0.001", "100")).await.is_ok());
        let e = run(bot, limit("0.001", "1"))
            .await
            .expect_err("client layer");
        assert!(e.to_string().contains("clients.bot.guard.products"), "{e}");
        // The global layer still binds the identity's orders: it can only tighten.
        let eth = limit("1", "1001").replace("BTC-USD", "ETH-USD");
        let e = run(bot, eth).await.expect_err("global");
        assert!(
            e.to_string()
                .starts_with("refused by the guard: guard.max_order_quote"),
            "{e}"
        );
    }

    #[test]
    fn a_thousand_concurrent_orders_never_pass_the_rate_limit() {
        let mut cfg = Config {
            guard: cfg_with(|c| c.max_orders_per_minute = Some(7)),
            ..Default::default()
        };
        cfg.clients.named.insert(
            "bot".into(),
            crate::config::ClientConfig {
                guard: Some(cfg_with(|c| c.max_orders_per_minute = Some(3))),
                ..Default::default()
            },
        );
        let g = std::sync::Arc::new(Guard::from_config(&cfg));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .build()
            .expect("runtime");
        let counts = rt.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..1000 {
                let g = g.clone();
                tasks.spawn(async move {
                    let (identity, key) = match i % 4 {
                        0 => ("anonymous", "a"),
                        1 => ("anonymous", "b"),
                        2 => ("bot", "a"),
                        _ => ("bot", "b"),
                    };
                    let ep = endpoint(KeyKind::Cdp, &Method::POST, "/api/v3/brokerage/orders")
                        .expect("ep");
                    let who = Sender {
                        identity,
                        key: Some(key),
                    };
                    let ok = g
                        .check(ep, limit("1", "1").as_bytes(), &who, &Fixed(None))
                        .await
                        .is_ok();
                    (i % 4, ok)
                });
            }
            let mut counts = [0usize; 4];
            while let Some(r) = tasks.join_next().await {
                let (pair, ok) = r.expect("task");
                counts[pair] += usize::from(ok);
            }
            counts
        });
        // Each layer counts its own scope: [guard]'s 7 is every order, clients.bot.guard's 3
        // every order of bot with any key; cycling keys multiplies neither.
        assert_eq!(counts.iter().sum::<usize>(), 7, "{counts:?}");
        assert!(counts[2] + counts[3] <= 3, "{counts:?}");
    }

    #[test]
    fn gateway_calls_are_read_from_the_path_or_the_body() {
        assert_eq!(
            rpc_method_of_path("/api/v2/private/buy").as_deref(),
            Some("private/buy")
        );
        assert_eq!(
            rpc_method_of_path("/API/v2/Private/BUY/").as_deref(),
            Some("private/buy")
        );
        assert_eq!(
            rpc_method_of_path("/api/v2/private/buy.json").as_deref(),
            Some("private/buy")
        );
        assert_eq!(
            rpc_method_of_path("/api/v2/private%2Fbuy").as_deref(),
            Some("private/buy")
        );
        assert_eq!(rpc_method_of_path("/api/v2/"), None);
        let env =
            rpc_envelope(br#"{"jsonrpc":"2.0","Method":"private/sell","params":{"a":1},"id":3}"#)
                .expect("envelope");
        assert_eq!(env.method.as_deref(), Some("private/sell"));
        assert_eq!(
            env.params.map(|p| p.get().to_owned()).as_deref(),
            Some(r#"{"a":1}"#)
        );
        assert!(rpc_envelope(br#"{"method":"public/test","METHOD":"private/buy"}"#).is_err());
        assert!(rpc_envelope(b" [ {} ]").is_err());
        assert!(rpc_envelope(b"").expect("empty").method.is_none());
        assert!(rpc_envelope(b"not json").expect("opaque").method.is_none());
    }

    #[tokio::test]
    async fn trades_the_request_cannot_describe_meet_every_limit_that_needs_a_value() {
        let conversion = endpoint(
            KeyKind::Cdp,
            &Method::POST,
            "/api/v3/brokerage/convert/trade/q",
        )
        .expect("ep");
        let (who, body) = (WHO, br#"{"from_account":"a","to_account":"b"}"#);
        let g = guard(|c| c.products = vec!["BTC-USD".into()]);
        let r = g.check(conversion, body, &who, &Fixed(None)).await;
        assert!(
            matches!(&r, Err(Refusal::Denied(m)) if m.contains("product is not in the request")),
            "{r:?}"
        );
        let g = guard(|c| c.max_order_quote = Some(dec("100")));
        let r = g.check(conversion, body, &who, &Fixed(None)).await;
        assert!(
            matches!(&r, Err(Refusal::Denied(m)) if m.contains("cannot be determined")),
            "{r:?}"
        );
        // Only an order rate: counted like any order.
        let g = guard(|c| c.max_orders_per_minute = Some(1));
        assert!(g.check(conversion, body, &who, &Fixed(None)).await.is_ok());
        assert!(g.check(conversion, body, &who, &Fixed(None)).await.is_err());
    }
}
