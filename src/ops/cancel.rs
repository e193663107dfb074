//! `cbgate halt --cancel-open`: cancel every open order of each signing key through cbgate's
//! own signing path.
//!
//! - Advanced Trade (`[key]` and every `[keys.NAME]` of kind `cdp`): list
//!   `GET /api/v3/brokerage/orders/historical/batch?order_status=OPEN` (following `cursor`
//!   while `has_next`), then `POST /api/v3/brokerage/orders/batch_cancel` with at most
//!   [`CANCEL_BATCH`] `order_ids` per call (Coinbase's limit).
//! - Exchange (`kind = "exchange"`): `DELETE /orders`, which cancels every open order of the
//!   key's profile in one call and answers the ids it cancelled.
//! - The derivatives gateway (any route to `drb.coinbase.com`), for each CDP key, after all of
//!   the above: `private/cancel_all` with the key's access token; the gateway answers how many
//!   orders it cancelled. A key the gateway refuses at `public/auth` (400, 401, 403) is
//!   reported as skipped, not as an error: most CDP keys never trade derivatives. A gateway
//!   that does not answer usably is an error, and later keys are not tried.
//! - INTX and Prime keys are reported as not cancelled, with why: both APIs cancel only
//!   within a portfolio named in the request (INTX `DELETE /api/v1/orders?portfolio=`, Prime
//!   `POST /v1/portfolios/{id}/orders/{id}/cancel` per order), and cbgate does not know which
//!   portfolios a key trades; guessing one would leave the others open while saying "done".

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};

use http_body_util::BodyExt as _;

use crate::config::KeyKind;
use crate::proxy::Proxy;
use crate::sign::hmac::HmacKey;
use crate::sign::jwt::Binding;
use crate::sign::key::ApiKey;
use crate::sign::keys::Credential;

/// Open orders are listed from here.
pub const LIST_PATH: &str = "/api/v3/brokerage/orders/historical/batch";
/// Orders are cancelled here.
pub const CANCEL_PATH: &str = "/api/v3/brokerage/orders/batch_cancel";
/// Order ids per cancel call at most (Coinbase refuses more).
pub const CANCEL_BATCH: usize = 100;
/// Pages of open orders followed at most (a runaway cursor must not loop forever).
pub const MAX_PAGES: usize = 100;
/// Each call to Coinbase, answer included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest answer read.
const MAX_ANSWER: usize = 8 * 1024 * 1024;

/// What cancelling the open orders did: the top-level fields for `[key]` (Advanced Trade),
/// `keys` for each `[keys.NAME]`.
#[derive(Debug, Default, serde::Serialize)]
pub struct CancelReport {
    /// Open orders Coinbase listed.
    pub open: usize,
    /// Ids Coinbase reported cancelled.
    pub cancelled: Vec<String>,
    /// Ids that were not cancelled, with Coinbase's reason.
    pub failed: Vec<Failed>,
    /// Why listing or cancelling stopped early, if it did.
    pub error: Option<String>,
    /// `[key]`'s orders on the derivatives gateway, when a route goes there.
    pub derivatives: Option<GatewayCancel>,
    /// One entry per `[keys.NAME]`.
    pub keys: Vec<KeyCancel>,
}

/// What `private/cancel_all` did on the derivatives gateway for one key.
#[derive(Debug, Default, serde::Serialize)]
pub struct GatewayCancel {
    /// Orders the gateway reported cancelled.
    pub cancelled: u64,
    pub error: Option<String>,
    /// Set when the gateway does not take this key, saying why.
    pub skipped: Option<String>,
}

/// What cancelling did for one named key.
#[derive(Debug, serde::Serialize)]
pub struct KeyCancel {
    pub key: String,
    pub kind: &'static str,
    /// Open orders Coinbase listed (Exchange answers only what it cancelled: the same).
    pub open: usize,
    pub cancelled: Vec<String>,
    pub failed: Vec<Failed>,
    pub error: Option<String>,
    /// Set when this key's orders were not looked at, saying why.
    pub skipped: Option<String>,
    /// A CDP key's orders on the derivatives gateway, when a route goes there.
    pub derivatives: Option<GatewayCancel>,
}

/// How one of cbgate's own calls is signed.
#[derive(Clone, Copy)]
enum Signing<'a> {
    /// `[key]`, through the signer.
    Default,
    Cdp(&'a ApiKey),
    Hmac(&'a HmacKey),
}

/// One order that was not cancelled.
#[derive(Debug, serde::Serialize)]
pub struct Failed {
    pub order_id: String,
    pub reason: String,
}

/// Cancels the open orders of every signing key; never panics, always reports.
pub async fn cancel_open(proxy: &Proxy) -> CancelReport {
    let named: Vec<_> = proxy.keys().iter().collect();
    // `[key]` as before; with only named keys configured, there is no `[key]` to cancel for.
    let mut report = if proxy.signer().key().is_some() || named.is_empty() {
        advanced_trade(proxy, Signing::Default).await
    } else {
        CancelReport::default()
    };
    for k in &named {
        let cred = k.current();
        let mut entry = KeyCancel {
            key: k.name().to_owned(),
            kind: cred.kind().as_str(),
            open: 0,
            cancelled: Vec::new(),
            failed: Vec::new(),
            error: None,
            skipped: None,
            derivatives: None,
        };
        match cred.as_ref() {
            Credential::Cdp(key) => {
                let r = advanced_trade(proxy, Signing::Cdp(key)).await;
                (entry.open, entry.cancelled, entry.failed, entry.error) =
                    (r.open, r.cancelled, r.failed, r.error);
            }
            Credential::Hmac(h) if h.kind() == KeyKind::Exchange => {
                match exchange(proxy, h).await {
                    Ok(ids) => {
                        entry.open = ids.len();
                        entry.cancelled = ids;
                    }
                    Err(e) => entry.error = Some(format!("DELETE /orders failed: {e}")),
                }
            }
            Credential::Hmac(h) => {
                entry.skipped = Some(format!(
                    "not cancelled: {} cancels only within a portfolio named in the request, and cbgate does not know this key's portfolios; cancel them with the {} API (orders are refused while halted)",
                    if h.kind() == KeyKind::Prime { "Prime" } else { "INTX" },
                    if h.kind() == KeyKind::Prime { "Prime" } else { "INTX" },
                ));
            }
        }
        report.keys.push(entry);
    }
    // The derivatives gateway after every spot cancel, so a gateway that hangs holds none of
    // them up; once it has failed, later keys are not tried (each would wait as long).
    let mut down = None;
    if let Some(key) = proxy.signer().key() {
        report.derivatives = gateway(proxy, crate::config::DEFAULT_KEY, &key, &mut down).await;
    }
    for (entry, k) in report.keys.iter_mut().zip(&named) {
        if let Credential::Cdp(key) = k.current().as_ref() {
            entry.derivatives = gateway(proxy, k.name(), key, &mut down).await;
        }
    }
    report
}

/// Exchange `DELETE /orders`: the ids Coinbase reports cancelled.
async fn exchange(proxy: &Proxy, key: &HmacKey) -> Result<Vec<String>, String> {
    let answer = call(
        proxy,
        Signing::Hmac(key),
        KeyKind::Exchange,
        Method::DELETE,
        "/orders",
        "",
        None,
    )
    .await?;
    let ids = answer
        .as_array()
        .ok_or("the answer is not a list of order ids")?;
    Ok(ids
        .iter()
        .filter_map(|id| id.as_str().map(str::to_owned))
        .collect())
}

/// Lists one CDP key's open Advanced Trade orders and cancels them all.
async fn advanced_trade(proxy: &Proxy, signing: Signing<'_>) -> CancelReport {
    let mut report = CancelReport::default();
    let ids = match list_open(proxy, signing).await {
        Ok(ids) => ids,
        Err(e) => {
            report.error = Some(format!("listing open orders failed: {e}"));
            return report;
        }
    };
    report.open = ids.len();
    for batch in ids.chunks(CANCEL_BATCH) {
        let body = json!({ "order_ids": batch }).to_string();
        let answer = match call(
            proxy,
            signing,
            KeyKind::Cdp,
            Method::POST,
            CANCEL_PATH,
            "",
            Some(body),
        )
        .await
        {
            Ok(v) => v,
            Err(e) => {
                report.error = Some(format!("cancelling failed: {e}"));
                for id in batch {
                    report.failed.push(Failed {
                        order_id: id.clone(),
                        reason: "not cancelled: the cancel call failed".into(),
                    });
                }
                continue;
            }
        };
        let results = answer
            .get("results")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for id in batch {
            let r = results
                .iter()
                .find(|r| r.get("order_id").and_then(Value::as_str) == Some(id));
            match r {
                Some(r) if r.get("success").and_then(Value::as_bool) == Some(true) => {
                    report.cancelled.push(id.clone());
                }
                Some(r) => report.failed.push(Failed {
                    order_id: id.clone(),
                    reason: r
                        .get("failure_reason")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_owned(),
                }),
                None => report.failed.push(Failed {
                    order_id: id.clone(),
                    reason: "Coinbase's answer does not mention this order".into(),
                }),
            }
        }
    }
    report
}

/// Every open order id, following the cursor.
async fn list_open(proxy: &Proxy, signing: Signing<'_>) -> Result<Vec<String>, String> {
    let mut ids = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut cursor = String::new();
    for _ in 0..MAX_PAGES {
        let mut query = String::from("order_status=OPEN&limit=1000");
        if !cursor.is_empty() {
            query.push_str("&cursor=");
            query.extend(url::form_urlencoded::byte_serialize(cursor.as_bytes()));
        }
        let page = call(
            proxy,
            signing,
            KeyKind::Cdp,
            Method::GET,
            LIST_PATH,
            &query,
            None,
        )
        .await?;
        let orders = page
            .get("orders")
            .and_then(Value::as_array)
            .ok_or("the answer has no \"orders\" list")?;
        for o in orders {
            if let Some(id) = o.get("order_id").and_then(Value::as_str) {
                if seen.insert(id.to_owned()) {
                    ids.push(id.to_owned());
                }
            }
        }
        let has_next = page.get("has_next").and_then(Value::as_bool) == Some(true);
        let next = page
            .get("cursor")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !has_next || next.is_empty() || next == cursor {
            return Ok(ids);
        }
        cursor = next.to_owned();
    }
    Err(format!(
        "more than {MAX_PAGES} pages of open orders; run it again"
    ))
}

/// The gateway's path of `private/cancel_all`.
pub const GATEWAY_CANCEL_PATH: &str = "/api/v2/private/cancel_all";

/// Cancels every open order of `key` on the derivatives gateway; `None` when no route goes
/// there. `down`: why the gateway failed for an earlier key (then this one is not tried), set
/// when it fails for this one.
async fn gateway(
    proxy: &Proxy,
    name: &str,
    key: &ApiKey,
    down: &mut Option<String>,
) -> Option<GatewayCancel> {
    let route = proxy.router().find_gateway()?;
    let upstream = &route.upstream;
    let mut report = GatewayCancel::default();
    if let Some(why) = down {
        report.error = Some(format!("not tried: it failed for an earlier key ({why})"));
        return Some(report);
    }
    let work = async {
        let now = crate::sign::jwt::now_secs(proxy.signer().clock_offset());
        let tokens = proxy.gateway_tokens();
        let body = Bytes::from(
            json!({"jsonrpc": "2.0", "id": 1, "method": "private/cancel_all", "params": {}})
                .to_string(),
        );
        // A cached token the gateway has since dropped (its restart, a key change) gets a 401:
        // one fresh exchange and one retry, as a client's request gets.
        let mut refused: Option<zeroize::Zeroizing<String>> = None;
        loop {
            let token = match tokens
                .token(
                    name,
                    key,
                    now,
                    proxy.upstream(),
                    upstream,
                    refused.as_deref().map(String::as_str),
                )
                .await
            {
                Ok(t) => t,
                // A key without derivatives access has no orders there to cancel.
                Err(e @ crate::forward::gateway::GatewayError::Refused(_)) => {
                    report.skipped = Some(format!("the gateway does not take this key ({e})"));
                    return;
                }
                // Not reached: whether orders are open there is unknown, which halt must say.
                Err(e) => {
                    report.error = Some(e.to_string());
                    return;
                }
            };
            let answer = proxy
                .upstream()
                .call(
                    crate::forward::upstream::OwnCall {
                        method: Method::POST,
                        host: &upstream.host,
                        authority: &upstream.authority,
                        path: GATEWAY_CANCEL_PATH,
                        token: Some(token.as_str()),
                        body: Some(body.clone()),
                    },
                    MAX_ANSWER,
                )
                .await;
            let (status, bytes) = match answer {
                Ok((status, _, bytes)) => (status, bytes),
                Err(e) => {
                    report.error = Some(format!("private/cancel_all failed: {e}"));
                    return;
                }
            };
            if status == http::StatusCode::UNAUTHORIZED && refused.is_none() {
                refused = Some(token);
                continue;
            }
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            match v.get("result").and_then(Value::as_u64) {
                Some(n) if status.is_success() => report.cancelled = n,
                _ => {
                    let why = v
                        .pointer("/error/message")
                        .and_then(Value::as_str)
                        .unwrap_or("no result");
                    report.error = Some(format!(
                        "private/cancel_all answered {status}: {}",
                        why.chars().take(200).collect::<String>()
                    ));
                }
            }
            return;
        }
    };
    if tokio::time::timeout(CALL_TIMEOUT, work).await.is_err() {
        report.error = Some(format!("no answer within {} s", CALL_TIMEOUT.as_secs()));
    }
    if let Some(e) = &report.error {
        *down = Some(e.chars().take(200).collect());
    }
    Some(report)
}

/// One signed call to a host of `family`; the JSON answer of a 2xx, otherwise the status and
/// the start of the body.
async fn call(
    proxy: &Proxy,
    signing: Signing<'_>,
    family: KeyKind,
    method: Method,
    path: &str,
    query: &str,
    body: Option<String>,
) -> Result<Value, String> {
    tokio::time::timeout(
        CALL_TIMEOUT,
        call_once(proxy, signing, family, method, path, query, body),
    )
    .await
    .unwrap_or_else(|_| Err(format!("no answer within {} s", CALL_TIMEOUT.as_secs())))
}

async fn call_once(
    proxy: &Proxy,
    signing: Signing<'_>,
    family: KeyKind,
    method: Method,
    path: &str,
    query: &str,
    body: Option<String>,
) -> Result<Value, String> {
    let route = match family {
        KeyKind::Cdp => proxy.router().find(path),
        other => proxy.router().find_family(other),
    }
    .ok_or_else(|| format!("no route for {path} on a {} host", family.as_str()))?;
    let upstream = &route.upstream;
    let path_and_query = if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    };
    let body = Bytes::from(body.unwrap_or_default());
    let mut req = http::Request::builder()
        .method(method.clone())
        .uri(format!("https://{}{path_and_query}", upstream.authority));
    // The JWT binds the path without the query, as Coinbase checks it.
    let binding = Binding {
        method: method.as_str(),
        host: &upstream.authority,
        path,
    };
    let now = crate::sign::jwt::now_secs(proxy.signer().clock_offset());
    let token = match signing {
        Signing::Default => Some(
            proxy
                .signer()
                .mint(upstream.claims, &binding)
                .map_err(|e| e.to_string())?
                .ok_or("no API key configured")?,
        ),
        Signing::Cdp(key) => Some(
            crate::sign::jwt::mint(key, now, upstream.claims, &binding)
                .map_err(|e| e.to_string())?,
        ),
        Signing::Hmac(key) => {
            for (name, value) in key
                .headers(now, method.as_str(), &path_and_query, &body)
                .map_err(|e| e.to_string())?
            {
                req = req.header(name, value);
            }
            None
        }
    };
    if let Some(token) = token {
        let mut auth = http::HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| "the token is not a valid header value".to_owned())?;
        auth.set_sensitive(true);
        req = req.header(http::header::AUTHORIZATION, auth);
    }
    if !body.is_empty() {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(
            http_body_util::Full::new(body)
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .map_err(|e| e.to_string())?;
    let resp = proxy
        .upstream()
        .send(&upstream.host, req)
        .await
        .map_err(|e| e.to_string())?;
    let (parts, answer) = resp.into_parts();
    let bytes = http_body_util::Limited::new(answer, MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("reading the answer failed: {e}"))?
        .to_bytes();
    let status = parts.status;
    if !status.is_success() {
        return Err(format!(
            "{path} answered {status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("{path}: the answer is not JSON: {e}"))
}
