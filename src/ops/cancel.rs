//! `cbgate halt --cancel-open`: cancel every open order of the key through cbgate's own signing
//! path. Advanced Trade: list `GET /api/v3/brokerage/orders/historical/batch?order_status=OPEN`
//! (following `cursor` while `has_next`), then `POST /api/v3/brokerage/orders/batch_cancel`
//! with at most [`CANCEL_BATCH`] `order_ids` per call (Coinbase's limit).

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};

use crate::forward::upstream::OwnCall;
use crate::proxy::Proxy;
use crate::sign::jwt::Binding;

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

/// What cancelling the open orders did.
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
}

/// One order that was not cancelled.
#[derive(Debug, serde::Serialize)]
pub struct Failed {
    pub order_id: String,
    pub reason: String,
}

/// Lists the key's open orders and cancels them all; never panics, always reports.
pub async fn cancel_open(proxy: &Proxy) -> CancelReport {
    let mut report = CancelReport::default();
    let ids = match list_open(proxy).await {
        Ok(ids) => ids,
        Err(e) => {
            report.error = Some(format!("listing open orders failed: {e}"));
            return report;
        }
    };
    report.open = ids.len();
    for batch in ids.chunks(CANCEL_BATCH) {
        let body = json!({ "order_ids": batch }).to_string();
        let answer = match call(proxy, Method::POST, CANCEL_PATH, "", Some(body)).await {
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
async fn list_open(proxy: &Proxy) -> Result<Vec<String>, String> {
    let mut ids = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut cursor = String::new();
    for _ in 0..MAX_PAGES {
        let mut query = String::from("order_status=OPEN&limit=1000");
        if !cursor.is_empty() {
            query.push_str("&cursor=");
            query.extend(url::form_urlencoded::byte_serialize(cursor.as_bytes()));
        }
        let page = call(proxy, Method::GET, LIST_PATH, &query, None).await?;
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

/// One signed call; the JSON answer of a 2xx, otherwise the status and the start of the body.
async fn call(
    proxy: &Proxy,
    method: Method,
    path: &str,
    query: &str,
    body: Option<String>,
) -> Result<Value, String> {
    tokio::time::timeout(CALL_TIMEOUT, call_once(proxy, method, path, query, body))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", CALL_TIMEOUT.as_secs())))
}

async fn call_once(
    proxy: &Proxy,
    method: Method,
    path: &str,
    query: &str,
    body: Option<String>,
) -> Result<Value, String> {
    let route = proxy
        .router()
        .find(path)
        .ok_or_else(|| format!("no route for {path}"))?;
    let upstream = &route.upstream;
    // The JWT binds the path without the query, as Coinbase checks it.
    let binding = Binding {
        method: method.as_str(),
        host: &upstream.authority,
        path,
    };
    let token = proxy
        .signer()
        .mint(upstream.claims, &binding)
        .map_err(|e| e.to_string())?
        .ok_or("no API key configured")?;
    let path_and_query = if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    };
    let (status, _, bytes) = proxy
        .upstream()
        .call(
            OwnCall {
                method,
                host: &upstream.host,
                authority: &upstream.authority,
                path: &path_and_query,
                token: Some(&token),
                body: body.map(Bytes::from),
            },
            MAX_ANSWER,
        )
        .await?;
    if !status.is_success() {
        return Err(format!(
            "{path} answered {status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
        ));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("{path}: the answer is not JSON: {e}"))
}
