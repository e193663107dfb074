//! The HMAC families: Coinbase Exchange, Prime and International Exchange (INTX) keys.
//!
//! Exactly as `shared/coinbase-auth.md` and the reference signers (ccxt's `coinbaseexchange`,
//! the INTX signer of ccxt's `coinbaseinternational`, Coinbase's Prime examples) do it:
//!
//! | family   | headers          | HMAC key               | message                                   |
//! |----------|------------------|------------------------|-------------------------------------------|
//! | exchange | `CB-ACCESS-*`    | base64-decoded secret  | timestamp + METHOD + path **with** query + body |
//! | prime    | `X-CB-ACCESS-*`  | the secret's bytes     | timestamp + METHOD + path without query + body |
//! | intx     | `CB-ACCESS-*`    | base64-decoded secret  | timestamp + METHOD + path without query + body |
//!
//! Timestamps are integer seconds (Exchange allows decimals, INTX needs integers within 5 s).
//! The signature is base64 of HMAC-SHA256. The secret lives only inside the aws-lc-rs HMAC key
//! (which wipes it when freed) and the passphrase in a [`Zeroizing`] string; neither is ever in
//! Debug output or an error.

use std::fmt;
use std::path::{Path, PathBuf};

use aws_lc_rs::hmac;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use http::{HeaderName, HeaderValue};
use zeroize::Zeroizing;

use crate::config::KeyKind;

/// Base64 as the portals show it, with or without the final `=` padding.
const LENIENT_B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The path Exchange's WebSocket signed subscribe signs (with `GET`).
pub const WS_VERIFY_PATH: &str = "/users/self/verify";

/// A problem with an HMAC credential. Display is one line naming the problem and the fix; no
/// variant holds a byte of the secret or passphrase.
#[derive(Debug, thiserror::Error)]
pub enum HmacKeyError {
    #[error("{}", .0)]
    File(#[from] crate::sign::key::KeyError),
    #[error("key file {path} is not valid JSON (line {line}, column {column}); expected {{\"key\": ..., \"secret\": ..., \"passphrase\": ...}}")]
    NotJson {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    #[error("key file {0} is not valid JSON: it holds bare text; write the {1} key as {{\"key\": ..., \"secret\": ..., \"passphrase\": ...}}")]
    BareText(PathBuf, &'static str),
    #[error("key file {0} holds JSON that is not an object; expected {{\"key\": ..., \"secret\": ..., \"passphrase\": ...}}")]
    NotObject(PathBuf),
    #[error("key file {0} holds a CDP API key (name/privateKey), not a {1} key; set kind = \"cdp\" for it, or give the {1} key file (key, secret, passphrase)")]
    CdpKeyGiven(PathBuf, &'static str),
    #[error("key file {path} has no {field} field (accepted spellings: {accepted})")]
    MissingField {
        path: PathBuf,
        field: &'static str,
        accepted: &'static str,
    },
    #[error("key file {path} has both {first} and {second}; keep one {field} field")]
    DuplicateField {
        path: PathBuf,
        field: &'static str,
        first: String,
        second: String,
    },
    #[error("key file {path}: field {field} must be a string")]
    NotString { path: PathBuf, field: String },
    #[error("the {0} is empty")]
    Empty(&'static str),
    #[error(
        "the {0} secret is not valid base64 (as the portal shows it): copy the secret again, whole"
    )]
    SecretNotBase64(&'static str),
    #[error(
        "the {0} secret is a PEM private key: that is a CDP API key; set kind = \"cdp\" for it"
    )]
    SecretIsPem(&'static str),
    #[error("the {0} key looks like a secret (it is not shown): are key and secret swapped?")]
    KeyLooksSecret(&'static str),
    #[error("the environment variable {0} is not set")]
    EnvMissing(String),
}

/// A loaded HMAC credential, ready to sign. Debug shows the family and a fingerprint only.
pub struct HmacKey {
    kind: KeyKind,
    key: String,
    mac: hmac::Key,
    passphrase: Zeroizing<String>,
}

impl fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HmacKey")
            .field("kind", &self.kind.as_str())
            .field("fingerprint", &self.fingerprint())
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Which field a JSON spelling fills.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Field {
    Key,
    Secret,
    Passphrase,
}

/// Field names as the portals, the official SDKs (`EXCHANGE_CREDENTIALS`, `PRIME_CREDENTIALS`,
/// `INTX_CREDENTIALS`: `accessKey`, `signingKey`, `passphrase`) and ccxt (`apiKey`, `secret`,
/// `password`) spell them; compared lower-cased with `_` and `-` removed.
fn field_of(name: &str) -> Option<Field> {
    let n: String = name
        .chars()
        .filter(|c| *c != '_' && *c != '-')
        .collect::<String>()
        .to_ascii_lowercase();
    match n.as_str() {
        "key" | "apikey" | "accesskey" | "apikeyid" | "keyid" => Some(Field::Key),
        "secret" | "apisecret" | "signingkey" | "secretkey" | "b64secret" | "apisecretkey" => {
            Some(Field::Secret)
        }
        "passphrase" | "apipassphrase" | "password" => Some(Field::Passphrase),
        _ => None,
    }
}

const KEY_SPELLINGS: &str = "key, apiKey, accessKey";
const SECRET_SPELLINGS: &str = "secret, apiSecret, signingKey";
const PASSPHRASE_SPELLINGS: &str = "passphrase";

fn family_name(kind: KeyKind) -> &'static str {
    match kind {
        KeyKind::Exchange => "Exchange",
        KeyKind::Prime => "Prime",
        KeyKind::Intx => "INTX",
        KeyKind::Cdp => "CDP",
    }
}

/// Strips what .env files and copy-paste add: surrounding whitespace and quotes.
fn clean(s: &str) -> &str {
    let t = s.trim();
    let t = t
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .or_else(|| t.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
        .unwrap_or(t);
    t.trim()
}

impl HmacKey {
    /// Builds a key of `kind` (not `cdp`) from its three parts.
    pub fn from_parts(
        kind: KeyKind,
        key: &str,
        secret: &str,
        passphrase: &str,
    ) -> Result<HmacKey, HmacKeyError> {
        let family = family_name(kind);
        let key = clean(key);
        let secret = Zeroizing::new(clean(secret).to_owned());
        let passphrase = Zeroizing::new(clean(passphrase).to_owned());
        if key.is_empty() {
            return Err(HmacKeyError::Empty("API key"));
        }
        if secret.is_empty() {
            return Err(HmacKeyError::Empty("secret"));
        }
        if passphrase.is_empty() {
            return Err(HmacKeyError::Empty("passphrase"));
        }
        if secret.contains("-----BEGIN") || secret.contains("PRIVATE KEY") {
            return Err(HmacKeyError::SecretIsPem(family));
        }
        // Keys are ids (hex or uuid); an 88-character base64 blob is the secret.
        if key.len() > 64 || key.contains('+') || key.contains('/') || key.ends_with('=') {
            return Err(HmacKeyError::KeyLooksSecret(family));
        }
        let raw: Zeroizing<Vec<u8>> = match kind {
            KeyKind::Prime => Zeroizing::new(secret.as_bytes().to_vec()),
            _ => Zeroizing::new(
                LENIENT_B64
                    .decode(secret.as_bytes())
                    .map_err(|_| HmacKeyError::SecretNotBase64(family))?,
            ),
        };
        if raw.is_empty() {
            return Err(HmacKeyError::Empty("secret"));
        }
        Ok(HmacKey {
            kind,
            key: key.to_owned(),
            mac: hmac::Key::new(hmac::HMAC_SHA256, &raw),
            passphrase,
        })
    }

    /// Parses the JSON text of a key file (`path` only names it in errors).
    pub fn parse_json(kind: KeyKind, path: &Path, text: &str) -> Result<HmacKey, HmacKeyError> {
        let family = family_name(kind);
        let doc: serde_json::Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                let t = text.trim_start();
                if !t.starts_with('{') && !t.starts_with('[') {
                    return Err(HmacKeyError::BareText(path.to_owned(), family));
                }
                return Err(HmacKeyError::NotJson {
                    path: path.to_owned(),
                    line: e.line(),
                    column: e.column(),
                });
            }
        };
        let serde_json::Value::Object(map) = doc else {
            return Err(HmacKeyError::NotObject(path.to_owned()));
        };
        if map.contains_key("privateKey")
            || map
                .get("name")
                .and_then(|v| v.as_str())
                .is_some_and(|n| n.starts_with("organizations/"))
        {
            return Err(HmacKeyError::CdpKeyGiven(path.to_owned(), family));
        }
        let mut found: [Option<(&str, &str)>; 3] = [None, None, None];
        for (name, value) in &map {
            let Some(field) = field_of(name) else {
                continue;
            };
            let slot = field as usize;
            let Some(v) = value.as_str() else {
                return Err(HmacKeyError::NotString {
                    path: path.to_owned(),
                    field: crate::config::shown(name),
                });
            };
            if let Some((first, _)) = found[slot] {
                return Err(HmacKeyError::DuplicateField {
                    path: path.to_owned(),
                    field: ["key", "secret", "passphrase"][slot],
                    first: crate::config::shown(first),
                    second: crate::config::shown(name),
                });
            }
            found[slot] = Some((name.as_str(), v));
        }
        let get = |f: Field, field, accepted| {
            found[f as usize]
                .map(|(_, v)| v)
                .ok_or_else(|| HmacKeyError::MissingField {
                    path: path.to_owned(),
                    field,
                    accepted,
                })
        };
        let key = get(Field::Key, "key", KEY_SPELLINGS)?;
        let secret = get(Field::Secret, "secret", SECRET_SPELLINGS)?;
        let passphrase = get(Field::Passphrase, "passphrase", PASSPHRASE_SPELLINGS)?;
        HmacKey::from_parts(kind, key, secret, passphrase)
    }

    /// Reads a key file; one readable by group or others is refused unless `allow_insecure`.
    pub fn load_file(
        kind: KeyKind,
        path: &Path,
        allow_insecure: bool,
    ) -> Result<HmacKey, HmacKeyError> {
        if !allow_insecure {
            crate::sign::key::check_private_file(path)?;
        }
        let text = Zeroizing::new(std::fs::read(path).map_err(|e| {
            crate::sign::key::KeyError::FileUnreadable {
                path: path.to_owned(),
                reason: e.kind().to_string(),
            }
        })?);
        let text = String::from_utf8_lossy(&text);
        let text = Zeroizing::new(text.into_owned());
        HmacKey::parse_json(kind, path, &text)
    }

    /// The family.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The API key (an identifier sent in the clear as `CB-ACCESS-KEY`; not the secret).
    pub fn key_id(&self) -> &str {
        &self.key
    }

    /// The first 8 bytes of SHA-256 of the key id, hex: names the key in logs.
    pub fn fingerprint(&self) -> String {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, self.key.as_bytes());
        let mut out = [0u8; 16];
        crate::sign::jwt::hex_lower(&d.as_ref()[..8], &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// base64(HMAC-SHA256(secret, timestamp + method + path + body)). `path` is what this
    /// family signs: see [`HmacKey::signed_path`].
    pub fn signature(&self, timestamp: &str, method: &str, path: &str, body: &[u8]) -> String {
        let mut ctx = hmac::Context::with_key(&self.mac);
        ctx.update(timestamp.as_bytes());
        ctx.update(method.as_bytes());
        ctx.update(path.as_bytes());
        ctx.update(body);
        STANDARD.encode(ctx.sign().as_ref())
    }

    /// The part of the request target this family signs: Exchange the path with its query,
    /// Prime and INTX the path alone.
    pub fn signed_path<'a>(&self, path_and_query: &'a str) -> &'a str {
        match self.kind {
            KeyKind::Exchange => path_and_query,
            _ => path_and_query
                .split_once('?')
                .map_or(path_and_query, |(p, _)| p),
        }
    }

    /// The four authentication headers for one request at `now` (integer seconds); the
    /// signature and passphrase values are marked sensitive (kept out of HPACK tables).
    pub fn headers(
        &self,
        now: u64,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<[(HeaderName, HeaderValue); 4], SignHmacError> {
        let ts = now.to_string();
        let sig = self.signature(&ts, method, self.signed_path(path_and_query), body);
        let names: [&'static str; 4] = match self.kind {
            KeyKind::Prime => [
                "x-cb-access-key",
                "x-cb-access-signature",
                "x-cb-access-timestamp",
                "x-cb-access-passphrase",
            ],
            _ => [
                "cb-access-key",
                "cb-access-sign",
                "cb-access-timestamp",
                "cb-access-passphrase",
            ],
        };
        let value = |s: &str, sensitive: bool| {
            let mut v = HeaderValue::try_from(s).map_err(|_| SignHmacError)?;
            v.set_sensitive(sensitive);
            Ok::<_, SignHmacError>(v)
        };
        Ok([
            (HeaderName::from_static(names[0]), value(&self.key, false)?),
            (HeaderName::from_static(names[1]), value(&sig, true)?),
            (HeaderName::from_static(names[2]), value(&ts, false)?),
            (
                HeaderName::from_static(names[3]),
                value(&self.passphrase, true)?,
            ),
        ])
    }

    /// The fields Exchange's WebSocket feed wants in a signed `subscribe` message:
    /// `signature`, `key`, `passphrase`, `timestamp`, signing `timestamp + "GET" +
    /// "/users/self/verify"`.
    pub fn ws_subscribe_fields(&self, now: u64) -> serde_json::Map<String, serde_json::Value> {
        let ts = now.to_string();
        let sig = self.signature(&ts, "GET", WS_VERIFY_PATH, b"");
        let mut m = serde_json::Map::new();
        m.insert("signature".into(), sig.into());
        m.insert("key".into(), self.key.clone().into());
        m.insert("passphrase".into(), self.passphrase.as_str().into());
        m.insert("timestamp".into(), ts.into());
        m
    }
}

/// A header value could not be built (a key id with bytes a header cannot carry).
#[derive(Debug, thiserror::Error)]
#[error("the HMAC authentication headers could not be built")]
pub struct SignHmacError;

/// Which upstream header names carry HMAC credentials: a client's own are removed before
/// forwarding, so a request can never carry two sets.
pub const HMAC_HEADERS: [&str; 8] = [
    "cb-access-key",
    "cb-access-sign",
    "cb-access-timestamp",
    "cb-access-passphrase",
    "x-cb-access-key",
    "x-cb-access-signature",
    "x-cb-access-timestamp",
    "x-cb-access-passphrase",
];

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str =
        "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA==";

    fn p() -> PathBuf {
        PathBuf::from("/k.json")
    }

    #[test]
    fn exchange_signs_path_with_query_and_prime_intx_without() {
        let ex = HmacKey::from_parts(KeyKind::Exchange, "k1", SECRET, "pp").expect("exchange");
        let hdr = ex
            .headers(1_700_000_000, "GET", "/orders?status=open", b"")
            .expect("h");
        assert_eq!(hdr[0].0, "cb-access-key");
        assert_eq!(hdr[2].1, "1700000000");
        assert_eq!(
            hdr[1].1.to_str().expect("ascii"),
            ex.signature("1700000000", "GET", "/orders?status=open", b"")
        );
        let intx = HmacKey::from_parts(KeyKind::Intx, "k1", SECRET, "pp").expect("intx");
        assert_eq!(intx.signed_path("/api/v1/orders?x=1"), "/api/v1/orders");
        let prime = HmacKey::from_parts(KeyKind::Prime, "k1", SECRET, "pp").expect("prime");
        let hdr = prime.headers(5, "POST", "/v1/x?y=1", b"{}").expect("h");
        assert_eq!(hdr[1].0, "x-cb-access-signature");
        assert!(hdr[1].1.is_sensitive() && hdr[3].1.is_sensitive());
        // Prime keys the HMAC with the secret text itself: a different MAC than INTX's.
        assert_ne!(
            prime.signature("5", "POST", "/v1/x", b"{}"),
            intx.signature("5", "POST", "/v1/x", b"{}")
        );
    }

    #[test]
    fn json_spellings_of_portals_and_sdks_are_accepted() {
        for text in [
            r#"{"key": "k", "secret": "@", "passphrase": "p"}"#,
            r#"{"apiKey": "k", "apiSecret": "@", "passphrase": "p"}"#,
            r#"{"accessKey": "k", "signingKey": "@", "passphrase": "p", "portfolioId": "x", "svcAccountId": "y"}"#,
            r#"{"api_key": "k", "api_secret": "@", "passphrase": "p"}"#,
        ] {
            let text = text.replace('@', SECRET);
            let k = HmacKey::parse_json(KeyKind::Exchange, &p(), &text).expect(&text);
            assert_eq!(k.key_id(), "k");
        }
    }

    #[test]
    fn bad_forms_are_named_and_never_quote_the_secret() {
        let cases: Vec<(String, &str)> = vec![
            (
                format!(r#"{{"key": "k", "secret": "{SECRET}"}}"#),
                "no passphrase field",
            ),
            (
                r#"{"key": "k", "passphrase": "p"}"#.to_owned(),
                "no secret field",
            ),
            (
                format!(r#"{{"secret": "{SECRET}", "passphrase": "p"}}"#),
                "no key field",
            ),
            (
                format!(r#"{{"key": "k", "secret": "{SECRET}", "passphrase": "p""#),
                "not valid JSON",
            ),
            (SECRET.to_owned(), "bare text"),
            (
                format!(r#"{{"key": "k", "secret": "!{SECRET}", "passphrase": "p"}}"#),
                "not valid base64",
            ),
            (
                format!(r#"{{"key": "{SECRET}", "secret": "k", "passphrase": "p"}}"#),
                "swapped",
            ),
            (
                format!(
                    r#"{{"key": "k", "secret": "{SECRET}", "apiSecret": "{SECRET}", "passphrase": "p"}}"#
                ),
                "keep one secret",
            ),
            (
                format!(r#"{{"name": "organizations/o/apiKeys/k", "privateKey": "{SECRET}"}}"#),
                "kind = \"cdp\"",
            ),
            (
                r#"{"key": "k", "secret": 5, "passphrase": "p"}"#.to_owned(),
                "must be a string",
            ),
            (format!(r#"[{SECRET:?}]"#), "not an object"),
        ];
        for (text, want) in cases {
            let e = HmacKey::parse_json(KeyKind::Exchange, &p(), &text).expect_err(want);
            let msg = e.to_string();
            assert!(msg.contains(want), "{want}: {msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
            for w in SECRET.as_bytes().windows(16) {
                let w = std::str::from_utf8(w).expect("ascii");
                assert!(!msg.contains(w), "secret in: {msg}");
            }
        }
    }

    #[test]
    fn debug_shows_no_secret() {
        let k = HmacKey::from_parts(KeyKind::Exchange, "k", SECRET, "passphrase-xyz").expect("k");
        let d = format!("{k:?}");
        assert!(
            !d.contains("passphrase-xyz") && !d.contains(&SECRET[..16]),
            "{d}"
        );
    }
}
