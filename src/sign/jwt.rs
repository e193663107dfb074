//! Minting the per-request JWT, exactly as the official SDKs do (coinbase-advanced-py's
//! `jwt_generator`, the CDP SDKs' `auth/utils/jwt`).
//!
//! Header `{"alg","kid","nonce","typ"}`; claims `{"sub","iss":"cdp","nbf","exp"}` plus either
//! `uri` (`api.coinbase.com`), or `uris` and `iat` (`api.cdp.coinbase.com`), or nothing (WebSocket
//! subscribe messages). The token is assembled here rather than through `jsonwebtoken::encode`,
//! which re-parses the key DER on every call and has no `nonce` header field; the signature comes
//! from the key pair parsed once at start-up. `jsonwebtoken` verifies our output independently in
//! [`self_test`].

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Serialize;

use crate::sign::key::{Algorithm, ApiKey};

/// Token lifetime: Coinbase accepts at most two minutes.
pub const LIFETIME_SECS: u64 = 120;

/// Which request-binding claim a token carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimStyle {
    /// `"uri": "GET api.coinbase.com/path"` (Advanced Trade and App API).
    Uri,
    /// `"uris": ["GET api.cdp.coinbase.com/path"]` plus `iat` (CDP platform API).
    Uris,
    /// No request binding (WebSocket subscribe messages).
    None,
}

impl ClaimStyle {
    /// The style Coinbase expects for an upstream host.
    pub fn for_host(host: &str) -> ClaimStyle {
        if host.eq_ignore_ascii_case("api.cdp.coinbase.com") {
            ClaimStyle::Uris
        } else {
            ClaimStyle::Uri
        }
    }
}

/// Signing failed. It carries no key material.
#[derive(Debug, thiserror::Error)]
#[error("signing the JWT failed")]
pub struct SignError;

#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    kid: &'a str,
    nonce: &'a str,
    typ: &'static str,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iss: &'static str,
    nbf: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    uri: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uris: Option<[&'a str; 1]>,
}

/// What a token is bound to: `METHOD host/path` (host with `:port` only when not 443).
pub struct Binding<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
}

/// Seconds since the Unix epoch, shifted by `offset_secs` (the measured clock skew).
pub fn now_secs(offset_secs: i64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    now.saturating_add_signed(offset_secs)
}

/// 32 random bytes as 64 lowercase hex characters, as the SDK's `secrets.token_hex()`.
fn nonce() -> Result<[u8; 64], SignError> {
    let mut raw = [0u8; 32];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| SignError)?;
    let mut out = [0u8; 64];
    hex_lower(&raw, &mut out);
    Ok(out)
}

/// Lower-case hex of `raw` into `out` (twice as long), without allocating: used per request.
pub(crate) fn hex_lower(raw: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in raw.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0x0f)];
    }
}

/// Mints one token. `binding` is ignored for [`ClaimStyle::None`].
pub fn mint(
    key: &ApiKey,
    now: u64,
    style: ClaimStyle,
    binding: &Binding<'_>,
) -> Result<String, SignError> {
    let nonce = nonce()?;
    let nonce = std::str::from_utf8(&nonce).map_err(|_| SignError)?;
    let header = Header {
        alg: key.algorithm().as_str(),
        kid: key.name(),
        nonce,
        typ: "JWT",
    };
    let bound = match style {
        ClaimStyle::None => String::new(),
        _ => format!("{} {}{}", binding.method, binding.host, binding.path),
    };
    let claims = Claims {
        sub: key.name(),
        iss: "cdp",
        nbf: now,
        iat: (style == ClaimStyle::Uris).then_some(now),
        exp: now + LIFETIME_SECS,
        uri: (style == ClaimStyle::Uri).then_some(bound.as_str()),
        uris: (style == ClaimStyle::Uris).then_some([bound.as_str()]),
    };
    let header = serde_json::to_vec(&header).map_err(|_| SignError)?;
    let claims = serde_json::to_vec(&claims).map_err(|_| SignError)?;

    let mut token = String::with_capacity(
        (header.len() + claims.len()) * 4 / 3 + 2 + 88, /* 64-byte signature */
    );
    URL_SAFE_NO_PAD.encode_string(&header, &mut token);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(&claims, &mut token);
    let signature = key.sign(token.as_bytes()).map_err(|_| SignError)?;
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(&signature, &mut token);
    Ok(token)
}

#[derive(Serialize)]
struct GatewayHeader<'a> {
    alg: &'static str,
    typ: &'static str,
    kid: &'a str,
    nonce: &'a str,
}

#[derive(Serialize)]
struct GatewayClaims<'a> {
    aud: [&'static str; 1],
    sub: &'a str,
    iss: &'static str,
    nbf: u64,
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    uri: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uris: Option<[&'a str; 1]>,
}

/// The JWT exchanged at the derivatives gateway's `public/auth` for an access token, built as
/// ccxt 4.5.90 `coinbaseinternational.create_auth_token` builds it (Coinbase documents this
/// call thinly; ccxt is the one implementation known to work). Header `{alg, typ, kid, nonce}`
/// with a 16-byte hex nonce; claims `{aud, sub, iss, nbf, exp = nbf + 120, iat}` plus, for an
/// ES256 key, the legacy `iss: "coinbase-cloud"`, `aud: ["retail_rest_api_proxy"]` and
/// `uri: "POST host/path"`, and for an Ed25519 key `iss: "cdp"`, `aud: ["cdp_service"]` and
/// `uris: ["POST host/path"]`. `host_path` is e.g. `drb.coinbase.com/api/v2/public/auth`.
pub fn mint_gateway_auth(key: &ApiKey, now: u64, host_path: &str) -> Result<String, SignError> {
    let mut raw = [0u8; 16];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| SignError)?;
    let mut nonce = [0u8; 32];
    hex_lower(&raw, &mut nonce);
    let nonce = std::str::from_utf8(&nonce).map_err(|_| SignError)?;
    let header = GatewayHeader {
        alg: key.algorithm().as_str(),
        typ: "JWT",
        kid: key.name(),
        nonce,
    };
    let uri = format!("POST {host_path}");
    let ed = key.algorithm() == Algorithm::EdDsa;
    let claims = GatewayClaims {
        aud: [if ed {
            "cdp_service"
        } else {
            "retail_rest_api_proxy"
        }],
        sub: key.name(),
        iss: if ed { "cdp" } else { "coinbase-cloud" },
        nbf: now,
        exp: now + LIFETIME_SECS,
        iat: now,
        uri: (!ed).then_some(uri.as_str()),
        uris: ed.then_some([uri.as_str()]),
    };
    let header = serde_json::to_vec(&header).map_err(|_| SignError)?;
    let claims = serde_json::to_vec(&claims).map_err(|_| SignError)?;
    let mut token = String::new();
    URL_SAFE_NO_PAD.encode_string(&header, &mut token);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(&claims, &mut token);
    let signature = key.sign(token.as_bytes()).map_err(|_| SignError)?;
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(&signature, &mut token);
    Ok(token)
}

/// The signing state shared by every request and WebSocket session: the current key (swapped
/// atomically on rotation; a request keeps the key it loaded) and the clock correction.
#[derive(Debug, Default)]
pub struct Signer {
    key: arc_swap::ArcSwapOption<ApiKey>,
    clock_offset: std::sync::atomic::AtomicI64,
}

impl Signer {
    /// A signer with `key`, or an unsigned pass-through when `None`.
    pub fn new(key: Option<ApiKey>) -> Signer {
        Signer {
            key: arc_swap::ArcSwapOption::from(key.map(std::sync::Arc::new)),
            clock_offset: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// The current key.
    pub fn key(&self) -> Option<std::sync::Arc<ApiKey>> {
        self.key.load_full()
    }

    /// Installs a new key; tokens minted from now on use it.
    pub fn replace_key(&self, key: ApiKey) {
        self.key.store(Some(std::sync::Arc::new(key)));
    }

    /// Seconds added to the local clock for `nbf`/`exp`.
    pub fn clock_offset(&self) -> i64 {
        self.clock_offset.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the clock correction (measured skew against Coinbase).
    pub fn set_clock_offset(&self, secs: i64) {
        self.clock_offset
            .store(secs, std::sync::atomic::Ordering::Relaxed);
    }

    /// Mints a token with the current key, or `None` when no key is configured.
    pub fn mint(
        &self,
        style: ClaimStyle,
        binding: &Binding<'_>,
    ) -> Result<Option<String>, SignError> {
        let guard = self.key.load();
        let Some(key) = guard.as_deref() else {
            return Ok(None);
        };
        mint(key, now_secs(self.clock_offset()), style, binding).map(Some)
    }
}

/// Signs a token and verifies it with `jsonwebtoken` (an independent implementation) against the
/// key's own public key. Run at start-up and by `cbgate check`.
pub fn self_test(key: &ApiKey) -> Result<(), String> {
    let binding = Binding {
        method: "GET",
        host: "api.coinbase.com",
        path: "/api/v3/brokerage/key_permissions",
    };
    let token = mint(key, now_secs(0), ClaimStyle::Uri, &binding).map_err(|e| e.to_string())?;
    let (alg, decoding) = match key.algorithm() {
        Algorithm::Es256 => {
            // The public key is the uncompressed point 0x04 || x || y.
            let pk = key.public_key();
            if pk.len() != 65 {
                return Err("unexpected P-256 public key length".into());
            }
            let x = URL_SAFE_NO_PAD.encode(&pk[1..33]);
            let y = URL_SAFE_NO_PAD.encode(&pk[33..]);
            (
                jsonwebtoken::Algorithm::ES256,
                jsonwebtoken::DecodingKey::from_ec_components(&x, &y)
                    .map_err(|e| format!("self-test: {e}"))?,
            )
        }
        Algorithm::EdDsa => (
            jsonwebtoken::Algorithm::EdDSA,
            jsonwebtoken::DecodingKey::from_ed_der(key.public_key()),
        ),
    };
    let mut validation = jsonwebtoken::Validation::new(alg);
    validation.set_issuer(&["cdp"]);
    validation.sub = Some(key.name().to_owned());
    validation.validate_nbf = true;
    jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &validation)
        .map(|_| ())
        .map_err(|e| format!("self-test token did not verify: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_part(part: &str) -> serde_json::Value {
        let bytes = URL_SAFE_NO_PAD.decode(part).expect("base64url");
        serde_json::from_slice(&bytes).expect("json")
    }

    fn ed_key() -> ApiKey {
        let b64 = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        ApiKey::parse("organizations/o/apiKeys/k", &b64).expect("seed")
    }

    #[test]
    fn uri_claims_match_the_sdk() {
        let key = ed_key();
        let b = Binding {
            method: "GET",
            host: "api.coinbase.com",
            path: "/api/v3/brokerage/accounts",
        };
        let t = mint(&key, 1_700_000_000, ClaimStyle::Uri, &b).expect("mint");
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        let h = decode_part(parts[0]);
        assert_eq!(h["alg"], "EdDSA");
        assert_eq!(h["kid"], "organizations/o/apiKeys/k");
        assert_eq!(h["typ"], "JWT");
        let n = h["nonce"].as_str().expect("nonce");
        assert_eq!(n.len(), 64);
        assert!(n
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        let c = decode_part(parts[1]);
        assert_eq!(
            c,
            serde_json::json!({"sub": "organizations/o/apiKeys/k", "iss": "cdp",
                "nbf": 1_700_000_000u64, "exp": 1_700_000_120u64,
                "uri": "GET api.coinbase.com/api/v3/brokerage/accounts"})
        );
        assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).expect("sig").len(), 64);
    }

    #[test]
    fn uris_and_ws_styles() {
        let key = ed_key();
        let b = Binding {
            method: "POST",
            host: "api.cdp.coinbase.com",
            path: "/platform/v1/x",
        };
        let t = mint(&key, 10, ClaimStyle::Uris, &b).expect("mint");
        let c = decode_part(t.split('.').nth(1).expect("claims"));
        assert_eq!(
            c["uris"],
            serde_json::json!(["POST api.cdp.coinbase.com/platform/v1/x"])
        );
        assert_eq!(c["iat"], 10);
        assert!(c.get("uri").is_none());
        let t = mint(&key, 10, ClaimStyle::None, &b).expect("mint");
        let c = decode_part(t.split('.').nth(1).expect("claims"));
        assert!(c.get("uri").is_none() && c.get("uris").is_none() && c.get("iat").is_none());
    }

    #[test]
    fn self_test_passes_for_both_algorithms() {
        self_test(&ed_key()).expect("ed25519");
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .expect("generate");
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref())
        );
        let key = ApiKey::parse("k", &pem).expect("p256 pkcs8");
        self_test(&key).expect("es256");
    }
}
