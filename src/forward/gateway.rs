//! The derivatives gateway (`drb.coinbase.com/api/v2`, JSON-RPC 2.0): no per-request
//! signature, but an access token that a CDP JWT buys at `public/auth`.
//!
//! cbgate exchanges the token itself, once per credential, caches it, fetches a new one when
//! 80% of its `expires_in` has passed (so a request never carries one about to expire) or
//! after a 401, and never hands it to a client: a client's own `public/auth` is answered by
//! cbgate with a placeholder (see [`local_auth_answer`]), and cbgate replaces whatever
//! `Authorization` a client sends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use zeroize::Zeroizing;

use crate::forward::upstream::{OwnCall, UpstreamClient};
use crate::gate::route::Upstream;
use crate::sign::key::ApiKey;

/// The host whose routes are token-authenticated.
pub const GATEWAY_HOST: &str = "drb.coinbase.com";

/// The path of the token exchange.
pub const AUTH_PATH: &str = "/api/v2/public/auth";

/// What cbgate answers a client's own `public/auth` with in place of the token.
pub const PLACEHOLDER_TOKEN: &str = "cbgate-managed";

/// A failed token exchange; never carries the JWT or a token.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The gateway answered and refused the key (400, 401 or 403 with a JSON-RPC error, or
    /// no token in a 2xx answer): most often a CDP key without derivatives access.
    #[error("the derivatives gateway's public/auth refused the key: {0}")]
    Refused(String),
    /// No usable answer: the gateway was not reached, answered 429 or 5xx or not JSON, or the
    /// exchange JWT could not be made.
    #[error("the derivatives gateway's public/auth failed: {0}")]
    Failed(String),
}

struct Cached {
    token: Zeroizing<String>,
    refresh_at: Instant,
}

/// Access tokens by credential (name and key fingerprint, so a rotated key gets its own).
#[derive(Default)]
pub struct TokenCache {
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Cached>>>>>,
    /// Exchanges made, for metrics and tests.
    exchanges: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").finish_non_exhaustive()
    }
}

impl TokenCache {
    /// The number of `public/auth` exchanges made so far.
    pub fn exchanges(&self) -> u64 {
        self.exchanges.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn slot(&self, id: &str) -> Arc<tokio::sync::Mutex<Option<Cached>>> {
        let mut slots = match self.slots.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        Arc::clone(slots.entry(id.to_owned()).or_default())
    }

    /// A valid token for `key` (named `name`), exchanging one when none is cached, the cached
    /// one is due for refresh, or `stale` is the token a 401 just refused. Concurrent requests
    /// for one key wait for a single exchange.
    pub async fn token(
        &self,
        name: &str,
        key: &ApiKey,
        now_secs: u64,
        client: &UpstreamClient,
        upstream: &Upstream,
        stale: Option<&str>,
    ) -> Result<Zeroizing<String>, GatewayError> {
        let id = format!("{name}/{}", key.fingerprint());
        let slot = self.slot(&id);
        let mut guard = slot.lock().await;
        if let Some(c) = guard.as_ref() {
            let refused = stale.is_some_and(|s| s == c.token.as_str());
            if !refused && Instant::now() < c.refresh_at {
                return Ok(c.token.clone());
            }
        }
        let fresh = self.exchange(key, now_secs, client, upstream).await?;
        let token = fresh.token.clone();
        *guard = Some(fresh);
        Ok(token)
    }

    async fn exchange(
        &self,
        key: &ApiKey,
        now_secs: u64,
        client: &UpstreamClient,
        upstream: &Upstream,
    ) -> Result<Cached, GatewayError> {
        let jwt = Zeroizing::new(
            crate::sign::jwt::mint_gateway_auth(
                key,
                now_secs,
                &format!("{}{AUTH_PATH}", upstream.authority),
            )
            .map_err(|_| GatewayError::Failed("signing the exchange JWT failed".into()))?,
        );
        let body = Zeroizing::new(
            serde_json::json!({
                "jsonrpc": "2.0",
                "id": 1,
                "method": "public/auth",
                "params": {"grant_type": "coinbase_cdp", "token": jwt.as_str()},
            })
            .to_string(),
        );
        let started = Instant::now();
        let (status, _, answer) = client
            .call(
                OwnCall {
                    method: http::Method::POST,
                    host: &upstream.host,
                    authority: &upstream.authority,
                    path: AUTH_PATH,
                    token: None,
                    body: Some(Bytes::copy_from_slice(body.as_bytes())),
                },
                64 * 1024,
            )
            .await
            .map_err(GatewayError::Failed)?;
        self.exchanges
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let answer = Zeroizing::new(answer.to_vec());
        let v: serde_json::Value = serde_json::from_slice(&answer).map_err(|_| {
            GatewayError::Failed(format!("HTTP {status}, and the answer is not JSON"))
        })?;
        if !status.is_success() {
            // The error object holds no token; its message is Coinbase's sentence.
            let why = v
                .pointer("/error/message")
                .and_then(|m| m.as_str())
                .unwrap_or("no message");
            let why = format!(
                "HTTP {status}: {}",
                why.chars().take(200).collect::<String>()
            );
            // Only a client error is about the key; 429 and 5xx are the gateway's own state.
            let about_the_key = matches!(status.as_u16(), 400 | 401 | 403);
            return Err(if about_the_key {
                GatewayError::Refused(why)
            } else {
                GatewayError::Failed(why)
            });
        }
        let token = v
            .pointer("/result/access_token")
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| GatewayError::Refused("the answer has no result.access_token".into()))?;
        let expires_in = v
            .pointer("/result/expires_in")
            .and_then(|e| e.as_u64())
            .unwrap_or(3600)
            .max(1);
        // Refresh when 80% of the lifetime has passed: early enough for a slow request and a
        // clock that runs behind, late enough not to exchange on every call.
        let lifetime = Duration::from_millis(expires_in * 800);
        Ok(Cached {
            token: Zeroizing::new(token.to_owned()),
            refresh_at: started + lifetime,
        })
    }
}

/// cbgate's answer to a client's own `public/auth`: a JSON-RPC result with a placeholder token
/// (cbgate holds the real one), echoing the request's `id`.
pub fn local_auth_answer(request_body: &[u8]) -> String {
    let id = serde_json::from_slice::<serde_json::Value>(request_body)
        .ok()
        .and_then(|v| v.get("id").cloned())
        .filter(|id| id.is_number() || id.is_string())
        .unwrap_or(serde_json::Value::Null);
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "result": {
            "access_token": PLACEHOLDER_TOKEN,
            "refresh_token": PLACEHOLDER_TOKEN,
            "expires_in": 3600,
            "scope": "cbgate",
            "token_type": "bearer",
        },
    })
    .to_string()
}
