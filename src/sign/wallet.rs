//! CDP v2 wallet auth: the `X-Wallet-Auth` token, minted exactly as the CDP SDKs do
//! (cdp-sdk 1.51 `cdp/auth/utils/{http,jwt}.py`, @coinbase/cdp-sdk 1.57 `auth/utils/`).
//!
//! The Wallet Secret is base64 of a DER PKCS#8 P-256 private key. The token is ES256 with the
//! header `{"alg":"ES256","typ":"JWT"}` only, and the claims `{"uris": ["METHOD host/path"],
//! "iat", "nbf", "jti": uuid4}` plus `reqHash` when the body is a non-empty JSON object. The
//! host is the real upstream's (the client's own copy would name cbgate's address, which the
//! server rejects: the reason cbgate mints this at all).
//!
//! `reqHash` is the SHA-256 (lower-case hex) of the parsed body re-serialised as Python's
//! `json.dumps(body, separators=(",", ":"), sort_keys=True)` writes it: every object's keys
//! sorted by code point, no spaces, non-ASCII and control characters as `\uXXXX`, floats as
//! Python's `repr`. For ASCII bodies this is byte for byte what the TypeScript SDK's
//! `JSON.stringify` of the sorted object gives as well; for non-ASCII strings the SDKs differ
//! (TypeScript keeps UTF-8), and cbgate follows the Python SDK, the reference implementation
//! its documentation describes.

use std::fmt;
use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::sign::jwt::SignError;

/// A problem with the wallet secret. Display names the problem; no variant holds a byte of it.
#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    #[error("wallet secret file {0} does not exist")]
    FileMissing(PathBuf),
    #[error("wallet secret file {path} cannot be read: {reason}")]
    FileUnreadable { path: PathBuf, reason: String },
    #[error("{path} has mode {mode:04o}: group or others can read or change it; run chmod 600 {path} (or set key.allow_insecure_permissions = true)")]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("the wallet secret is empty")]
    Empty,
    #[error("the wallet secret is not valid base64: it is the base64 of a DER PKCS#8 P-256 key, as the CDP portal shows it once (not a PEM, not the API key secret)")]
    NotBase64,
    #[error("the wallet secret does not decode to a P-256 private key (DER PKCS#8): is it the API key secret instead of the Wallet Secret?")]
    NotP256,
}

/// The loaded Wallet Secret. Debug shows nothing of it.
pub struct WalletSecret {
    pair: EcdsaKeyPair,
}

impl fmt::Debug for WalletSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WalletSecret(<redacted>)")
    }
}

impl WalletSecret {
    /// Parses the secret text: base64 of DER PKCS#8 P-256, with surrounding whitespace or
    /// quotes (from .env files) tolerated.
    pub fn parse(text: &str) -> Result<WalletSecret, WalletError> {
        let t = text.trim();
        let t = t
            .strip_prefix('"')
            .and_then(|r| r.strip_suffix('"'))
            .unwrap_or(t)
            .trim();
        if t.is_empty() {
            return Err(WalletError::Empty);
        }
        let der = Zeroizing::new(STANDARD.decode(t).map_err(|_| WalletError::NotBase64)?);
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
            .map_err(|_| WalletError::NotP256)?;
        Ok(WalletSecret { pair })
    }

    /// Reads `path` (private like the key file unless `allow_insecure`) and parses it.
    pub fn load_file(path: &Path, allow_insecure: bool) -> Result<WalletSecret, WalletError> {
        if !allow_insecure {
            crate::sign::key::check_private_file(path).map_err(|e| match e {
                crate::sign::key::KeyError::InsecurePermissions { path, mode } => {
                    WalletError::InsecurePermissions { path, mode }
                }
                crate::sign::key::KeyError::FileMissing(p) => WalletError::FileMissing(p),
                other => WalletError::FileUnreadable {
                    path: path.to_owned(),
                    reason: other.to_string(),
                },
            })?;
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                WalletError::FileMissing(path.to_owned())
            } else {
                WalletError::FileUnreadable {
                    path: path.to_owned(),
                    reason: e.kind().to_string(),
                }
            }
        })?);
        WalletSecret::parse(&text)
    }

    /// The secret from `file` when configured, else from `env` (`CDP_WALLET_SECRET`, as both
    /// CDP SDKs read it), else `None` (a client's own `X-Wallet-Auth` then passes through).
    pub fn select(
        file: Option<&Path>,
        env_value: Option<&str>,
        allow_insecure: bool,
    ) -> Result<Option<WalletSecret>, WalletError> {
        match (file, env_value) {
            (Some(f), _) => WalletSecret::load_file(f, allow_insecure).map(Some),
            (None, Some(v)) => WalletSecret::parse(v).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// The public key, uncompressed SEC1 point (65 bytes).
    pub fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    /// Mints one `X-Wallet-Auth` token for `METHOD host path` at `now`, with `req_hash` from
    /// [`req_hash`].
    pub fn mint(
        &self,
        now: u64,
        method: &str,
        host: &str,
        path: &str,
        req_hash: Option<&str>,
    ) -> Result<String, SignError> {
        let uri = format!("{method} {host}{path}");
        let claims = Claims {
            uris: [uri.as_str()],
            iat: now,
            nbf: now,
            jti: &uuid4()?,
            req_hash,
        };
        let claims = serde_json::to_vec(&claims).map_err(|_| SignError)?;
        let mut token = String::with_capacity(claims.len() * 4 / 3 + 140);
        URL_SAFE_NO_PAD.encode_string(br#"{"alg":"ES256","typ":"JWT"}"#, &mut token);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&claims, &mut token);
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let sig = self
            .pair
            .sign(&rng, token.as_bytes())
            .map_err(|_| SignError)?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut token);
        Ok(token)
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    uris: [&'a str; 1],
    iat: u64,
    nbf: u64,
    jti: &'a str,
    #[serde(rename = "reqHash", skip_serializing_if = "Option::is_none")]
    req_hash: Option<&'a str>,
}

/// A random (version 4) UUID, as Python's `str(uuid.uuid4())`.
fn uuid4() -> Result<String, SignError> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| SignError)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut hex = [0u8; 32];
    crate::sign::jwt::hex_lower(&b, &mut hex);
    let h = std::str::from_utf8(&hex).map_err(|_| SignError)?;
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

/// Whether the CDP SDKs sign a request with `X-Wallet-Auth`: POST, PUT or DELETE to a path
/// that matches the Python SDK's list (a superset of the TypeScript SDK's). `path` is the path
/// as sent, without the query.
pub fn requires_wallet_auth(method: &str, path: &str) -> bool {
    if !matches!(method, "POST" | "PUT" | "DELETE") {
        return false;
    }
    // `/end-users/{id}/<last>` with exactly one segment for `{id}`, at the end of the path.
    let end_user_child = |last: &str| {
        path.strip_suffix(last)
            .and_then(|p| p.strip_suffix('/'))
            .and_then(|p| p.rsplit_once('/'))
            .is_some_and(|(head, id)| !id.is_empty() && head.ends_with("/end-users"))
    };
    path.contains("/accounts")
        || path.contains("/spend-permissions")
        || smart_account_lend(path)
        || path.contains("/user-operations/prepare-and-send")
        || path.contains("/embedded-wallet-api/")
        || path.ends_with("/end-users")
        || path.ends_with("/end-users/import")
        || end_user_child("evm")
        || end_user_child("evm-smart-account")
        || end_user_child("solana")
}

/// `/evm/smart-accounts/[^/]+/lend/` anywhere in `path`.
fn smart_account_lend(path: &str) -> bool {
    const HEAD: &str = "/evm/smart-accounts/";
    path.match_indices(HEAD).any(|(i, _)| {
        let rest = &path[i + HEAD.len()..];
        rest.split_once('/')
            .is_some_and(|(id, after)| !id.is_empty() && after.starts_with("lend/"))
    })
}

/// The body could not be hashed as the SDKs do.
#[derive(Debug, thiserror::Error)]
#[error("the request body is JSON cbgate cannot hash for X-Wallet-Auth: {0}")]
pub struct HashError(&'static str);

/// The `reqHash` claim for `body`: `None` unless it is a non-empty JSON object (the SDKs hash
/// their request data only then). A body that is not JSON gets no `reqHash` either: the SDKs
/// only ever send JSON, and the server decides.
pub fn req_hash(body: &[u8]) -> Result<Option<String>, HashError> {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Ok(None);
    };
    match &value {
        serde_json::Value::Object(m) if !m.is_empty() => {}
        _ => return Ok(None),
    }
    let mut out = String::with_capacity(body.len() + 16);
    python_dumps(&value, &mut out)?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, out.as_bytes());
    let mut hex = [0u8; 64];
    crate::sign::jwt::hex_lower(digest.as_ref(), &mut hex);
    Ok(Some(String::from_utf8_lossy(&hex).into_owned()))
}

/// `json.dumps(v, separators=(",", ":"), sort_keys=True)` (ensure_ascii on) into `out`.
fn python_dumps(v: &serde_json::Value, out: &mut String) -> Result<(), HashError> {
    use serde_json::Value;
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                let f = n.as_f64().ok_or(HashError("a number out of range"))?;
                python_float(f, out)?;
            }
        }
        Value::String(s) => python_string(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                python_dumps(x, out)?;
            }
            out.push(']');
        }
        Value::Object(m) => {
            // Rust orders strings by UTF-8 bytes, which is code point order, as Python's sort.
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_unstable();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                python_string(k, out);
                out.push(':');
                python_dumps(&m[k], out)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

/// A JSON string as Python's `json.dumps` with `ensure_ascii=True` writes it: `"` `\` and the
/// short escapes, everything outside printable ASCII as `\uXXXX` (UTF-16 surrogate pairs above
/// U+FFFF).
fn python_string(s: &str, out: &mut String) {
    use std::fmt::Write as _;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// A float as Python's `repr`: the shortest digits that round-trip, in fixed notation when the
/// decimal exponent is in -4..16 (always with a fraction, `1.0`), else `1e+16` / `1.5e-05`.
fn python_float(f: f64, out: &mut String) -> Result<(), HashError> {
    if !f.is_finite() {
        return Err(HashError("a number out of range"));
    }
    // Rust's `{:e}` is the shortest round-trip form: "1.5e-7", "-1e20", "0e0".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').ok_or(HashError("a number"))?;
    let exp: i32 = exp.parse().map_err(|_| HashError("a number"))?;
    if (-4..16).contains(&exp) {
        let fixed = format!("{f}");
        out.push_str(&fixed);
        if !fixed.contains('.') {
            out.push_str(".0");
        }
    } else {
        out.push_str(mantissa);
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        let a = exp.unsigned_abs();
        if a < 10 {
            out.push('0');
        }
        out.push_str(&a.to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dumps(json: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(json).expect("json");
        let mut out = String::new();
        python_dumps(&v, &mut out).expect("dumps");
        out
    }

    /// Expected strings produced by CPython 3.11 `json.dumps(json.loads(s),
    /// separators=(",", ":"), sort_keys=True)`.
    #[test]
    fn matches_python_json_dumps() {
        for (input, python) in [
            (
                r#"{"b":1,"a":{"d":[1,2,{"z":0,"y":null}],"c":true}}"#,
                r#"{"a":{"c":true,"d":[1,2,{"y":null,"z":0}]},"b":1}"#,
            ),
            (
                r#"{"name":"caf\u00e9 \ud83d\ude00 \u2028"}"#,
                r#"{"name":"caf\u00e9 \ud83d\ude00 \u2028"}"#,
            ),
            (
                "{\"n\":\"tab\\there\\u0001\\u007f/\"}",
                r#"{"n":"tab\there\u0001\u007f/"}"#,
            ),
            (
                r#"{"f":[1.0,1.5,0.0001,0.00001,1e16,1e15,123456789.125,-2.5e-7]}"#,
                r#"{"f":[1.0,1.5,0.0001,1e-05,1e+16,1000000000000000.0,123456789.125,-2.5e-07]}"#,
            ),
            (
                r#"{"Z":1,"a":2,"_":3,"é":4}"#,
                r#"{"Z":1,"_":3,"a":2,"\u00e9":4}"#,
            ),
            (
                r#"{"big":18446744073709551615,"neg":-9223372036854775808}"#,
                r#"{"big":18446744073709551615,"neg":-9223372036854775808}"#,
            ),
        ] {
            assert_eq!(dumps(input), python, "{input}");
        }
    }

    #[test]
    fn req_hash_only_for_non_empty_objects() {
        for body in ["", "{}", "[1]", "\"x\"", "not json", "null"] {
            assert_eq!(req_hash(body.as_bytes()).expect("hash"), None, "{body}");
        }
        // Python: hashlib.sha256(json.dumps(d, separators=(",", ":"), sort_keys=True).encode()).
        assert_eq!(
            req_hash(br#"{ "name" : "a" }"#).expect("hash").as_deref(),
            Some("d9d719b27480b55cd4918020e7473e716ed3569c8adafe926cf9b10b4f8ef064")
        );
        assert_eq!(
            req_hash("{\"name\":\"café\"}".as_bytes())
                .expect("hash")
                .as_deref(),
            Some("9db11f5f5dc2b3898bb358a2e545b3c96e9052c61e2b4f4de41acded22ef5128")
        );
    }

    #[test]
    fn the_sdk_path_list() {
        for (m, p, want) in [
            ("POST", "/platform/v2/evm/accounts", true),
            ("PUT", "/platform/v2/evm/accounts/0xabc", true),
            (
                "POST",
                "/platform/v2/evm/accounts/0xabc/send/transaction",
                true,
            ),
            ("GET", "/platform/v2/evm/accounts", false),
            ("POST", "/platform/v2/solana/accounts/import", true),
            (
                "POST",
                "/platform/v2/evm/smart-accounts/0x1/spend-permissions",
                true,
            ),
            (
                "POST",
                "/platform/v2/evm/smart-accounts/0x1/lend/deposit",
                true,
            ),
            (
                "POST",
                "/platform/v2/evm/smart-accounts/0x1/user-operations",
                false,
            ),
            ("POST", "/platform/v2/evm/smart-accounts", false),
            (
                "POST",
                "/platform/v2/evm/smart-accounts/0x1/user-operations/prepare-and-send",
                true,
            ),
            (
                "POST",
                "/platform/v2/embedded-wallet-api/end-users/u/evm/sign/message",
                true,
            ),
            ("POST", "/platform/v2/end-users", true),
            ("POST", "/platform/v2/end-users/import", true),
            ("POST", "/platform/v2/end-users/u1/evm", true),
            ("POST", "/platform/v2/end-users/u1/evm-smart-account", true),
            ("POST", "/platform/v2/end-users/u1/solana", true),
            ("POST", "/platform/v2/end-users/u1/x/solana", false),
            ("POST", "/platform/v2/end-users/auth/validate-token", false),
            ("POST", "/platform/v2/evm/faucet", false),
            ("POST", "/platform/v2/evm/swaps", false),
            ("DELETE", "/platform/v2/policy-engine/policies/p", false),
        ] {
            assert_eq!(requires_wallet_auth(m, p), want, "{m} {p}");
        }
    }

    #[test]
    fn token_shape_and_signature() {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("generate");
        let secret = WalletSecret::parse(&format!(" \"{}\"\n", STANDARD.encode(pkcs8.as_ref())))
            .expect("parses");
        assert_eq!(format!("{secret:?}"), "WalletSecret(<redacted>)");
        let t = secret
            .mint(
                100,
                "POST",
                "api.cdp.coinbase.com",
                "/platform/v2/evm/accounts",
                Some("ab"),
            )
            .expect("mint");
        let parts: Vec<&str> = t.split('.').collect();
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).expect("b64")).expect("j");
        assert_eq!(header, serde_json::json!({"alg": "ES256", "typ": "JWT"}));
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("j");
        assert_eq!(
            claims["uris"],
            serde_json::json!(["POST api.cdp.coinbase.com/platform/v2/evm/accounts"])
        );
        assert_eq!(
            (claims["iat"].as_u64(), claims["nbf"].as_u64()),
            (Some(100), Some(100))
        );
        assert_eq!(claims["reqHash"], "ab");
        let jti = claims["jti"].as_str().expect("jti");
        assert_eq!((jti.len(), &jti[14..15]), (36, "4"));
        // Verified by jsonwebtoken against the public key.
        let pk = secret.public_key();
        let key = jsonwebtoken::DecodingKey::from_ec_components(
            &URL_SAFE_NO_PAD.encode(&pk[1..33]),
            &URL_SAFE_NO_PAD.encode(&pk[33..]),
        )
        .expect("key");
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.required_spec_claims.clear();
        v.validate_exp = false;
        jsonwebtoken::decode::<serde_json::Value>(&t, &key, &v).expect("verifies");
    }

    #[test]
    fn bad_secrets_are_named_not_quoted() {
        for (text, want) in [
            ("", "empty"),
            ("-----BEGIN PRIVATE KEY-----", "not valid base64"),
            ("aGVsbG8=", "P-256"),
        ] {
            let e = WalletSecret::parse(text).expect_err("refused").to_string();
            assert!(e.contains(want), "{e}");
            assert!(text.is_empty() || !e.contains(text), "{e}");
        }
    }
}
