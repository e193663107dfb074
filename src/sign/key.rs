//! Loading the Coinbase API key: the one place that ever sees the secret.
//!
//! Keys come as the JSON file the CDP portal downloads (`name` or `id`, `privateKey` or `secret`)
//! or as the `COINBASE_API_KEY` / `COINBASE_API_SECRET` pair the official SDK reads. Two families:
//! ECDSA P-256 (SEC1 or PKCS#8 PEM, JWT alg `ES256`) and Ed25519 (base64 of 64 or 32 bytes, or
//! PKCS#8 PEM, alg `EdDSA`). The key is parsed once here into an aws-lc-rs key pair; the request
//! path only ever signs with the parsed pair.
//!
//! Errors name the problem and never quote the secret: base64 and PEM decoder messages can echo
//! input bytes, so they are replaced by our own sentences.

use std::fmt;
use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use base64::Engine as _;
use rustls_pki_types::pem::SectionKind;
use zeroize::Zeroizing;

/// Which JWT algorithm a key signs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// ECDSA P-256 with SHA-256, signature as raw r||s.
    Es256,
    /// Ed25519.
    EdDsa,
}

impl Algorithm {
    /// The JWT `alg` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Es256 => "ES256",
            Algorithm::EdDsa => "EdDSA",
        }
    }
}

/// A problem with the configured key. Display is one line that names the problem; no variant
/// holds any byte of the secret.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {} does not exist", crate::config::shown(&.0.to_string_lossy()))]
    FileMissing(PathBuf),
    #[error("key file {0} is a directory; give the path of the CDP key JSON file in it")]
    IsDirectory(PathBuf),
    #[error("{path} has mode {mode:04o}: group or others can read or change it; run chmod 600 {path} (or set key.allow_insecure_permissions = true)")]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error("key file {path} cannot be read: {reason}")]
    FileUnreadable { path: PathBuf, reason: String },
    #[error("key file {path} is not valid JSON (line {line}, column {column}); expected the CDP key JSON {{\"name\": ..., \"privateKey\": ...}}")]
    NotJson {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    #[error("key file {0} is not valid JSON: it holds a bare PEM key; cbgate needs the CDP key JSON {{\"name\": ..., \"privateKey\": ...}}, or COINBASE_API_KEY (the key name) and COINBASE_API_SECRET (the PEM)")]
    BarePem(PathBuf),
    #[error("key file {0} is not valid JSON: the PEM in \"privateKey\" has real line breaks, which a JSON string cannot hold; write each line break as \\n, or download the key file again")]
    RawNewlines(PathBuf),
    #[error("key file {0} holds a Coinbase Exchange API key (key, secret, passphrase: HMAC-signed), not a CDP API key; create a CDP API key on the Coinbase Developer Platform (portal.cdp.coinbase.com); support for Exchange keys is planned as kind = \"exchange\"")]
    ExchangeKey(PathBuf),
    #[error("the secret is {0} hex characters: an HMAC-style API secret (a legacy Coinbase or Exchange key), not a CDP key; cbgate needs a CDP API key (ECDSA or Ed25519) from the Coinbase Developer Platform (portal.cdp.coinbase.com)")]
    HexSecret(usize),
    #[error("key file {path} has no {field} field")]
    MissingField { path: PathBuf, field: &'static str },
    #[error("key file {path}: field {field} must be a string")]
    FieldNotString { path: PathBuf, field: &'static str },
    #[error("{0} is set but {1} is not; set both, or neither")]
    EnvIncomplete(&'static str, &'static str),
    #[error("the key name is empty")]
    EmptyName,
    #[error("the key name looks like key material (it is not shown): the name is organizations/.../apiKeys/... or the key id, and the secret goes in privateKey or COINBASE_API_SECRET; are the two swapped?")]
    NameIsSecret,
    #[error("the secret is empty")]
    EmptySecret,
    #[error("the secret is a public key (PEM {0}); cbgate needs the private key from the downloaded key file")]
    PublicKeyGiven(&'static str),
    #[error(
        "the secret is an RSA key; Coinbase CDP keys are ECDSA P-256 (ES256) or Ed25519 (EdDSA)"
    )]
    Rsa,
    #[error("the secret is an ECDSA key on curve {0}; Coinbase CDP keys use P-256 (ES256)")]
    WrongCurve(&'static str),
    #[error("the secret is a PEM block of an unsupported kind ({0}); expected EC PRIVATE KEY or PRIVATE KEY")]
    UnsupportedPem(&'static str),
    #[error("the secret's PEM block is malformed (missing END line: truncated?)")]
    NoEndLine,
    #[error("the secret's PEM block is malformed (its base64 body is damaged)")]
    BadPem,
    #[error("the secret's {0} PEM block does not hold a usable private key")]
    BadPrivateKey(&'static str),
    #[error("the secret is neither a PEM private key nor valid base64 (truncated or mangled?)")]
    BadBase64,
    #[error("the secret is a JSON document (a whole key file?); give the key file's path with --key-file or key.file, or only its privateKey value as the secret")]
    SecretIsJson,
    #[error("the secret decodes to {0} bytes; an Ed25519 secret is 64 bytes (seed + public key) or 32 bytes (seed): truncated?")]
    WrongLength(usize),
    #[error("the 64-byte Ed25519 secret's public half does not match its seed; is this an Exchange/Prime HMAC secret? Those keys cannot sign JWTs")]
    PublicHalfMismatch,
}

/// A loaded, ready-to-sign API key. Debug prints the name and algorithm only.
pub struct ApiKey {
    name: String,
    pair: KeyPairKind,
    /// [`ApiKey::fingerprint`], computed once: the rate budget keys every request by it.
    fingerprint: String,
}

enum KeyPairKind {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("alg", &self.algorithm())
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Where the key comes from, as configuration decided.
pub enum KeySource {
    /// A CDP key JSON file.
    File(PathBuf),
    /// Name and secret given directly (the `COINBASE_API_KEY` / `COINBASE_API_SECRET` pair).
    Inline {
        name: String,
        secret: Zeroizing<String>,
    },
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::File(p) => f.debug_tuple("File").field(p).finish(),
            KeySource::Inline { name, .. } => f
                .debug_struct("Inline")
                .field("name", name)
                .field("secret", &"<redacted>")
                .finish(),
        }
    }
}

impl KeySource {
    /// Builds the source from the environment pair; `None` when neither variable is set.
    pub fn from_env_pair(
        name: Option<String>,
        secret: Option<String>,
    ) -> Result<Option<KeySource>, KeyError> {
        match (name, secret) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(KeyError::EnvIncomplete(
                "COINBASE_API_KEY",
                "COINBASE_API_SECRET",
            )),
            (None, Some(s)) => {
                drop(Zeroizing::new(s));
                Err(KeyError::EnvIncomplete(
                    "COINBASE_API_SECRET",
                    "COINBASE_API_KEY",
                ))
            }
            (Some(name), Some(secret)) => Ok(Some(KeySource::Inline {
                name,
                secret: Zeroizing::new(secret),
            })),
        }
    }

    /// Picks the key source: the configured file, else the `COINBASE_API_KEY` +
    /// `COINBASE_API_SECRET` pair from `env`, else the CDP SDKs' `CDP_API_KEY_ID` +
    /// `CDP_API_KEY_SECRET` pair, else none (requests are forwarded unsigned).
    pub fn select(
        file: Option<&Path>,
        env: &std::collections::HashMap<String, String>,
    ) -> Result<Option<KeySource>, KeyError> {
        if let Some(f) = file {
            return Ok(Some(KeySource::File(f.to_owned())));
        }
        if let Some(src) = KeySource::from_env_pair(
            env.get("COINBASE_API_KEY").cloned(),
            env.get("COINBASE_API_SECRET").cloned(),
        )? {
            return Ok(Some(src));
        }
        match (
            env.get("CDP_API_KEY_ID").cloned(),
            env.get("CDP_API_KEY_SECRET").cloned(),
        ) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(KeyError::EnvIncomplete(
                "CDP_API_KEY_ID",
                "CDP_API_KEY_SECRET",
            )),
            (None, Some(s)) => {
                drop(Zeroizing::new(s));
                Err(KeyError::EnvIncomplete(
                    "CDP_API_KEY_SECRET",
                    "CDP_API_KEY_ID",
                ))
            }
            (Some(name), Some(secret)) => Ok(Some(KeySource::Inline {
                name,
                secret: Zeroizing::new(secret),
            })),
        }
    }

    /// Reads and parses the key; a key file readable by group or others is refused.
    pub fn load(&self) -> Result<ApiKey, KeyError> {
        self.load_with(false)
    }

    /// Reads and parses the key; `allow_insecure_permissions` skips the file mode check
    /// (`key.allow_insecure_permissions`).
    pub fn load_with(&self, allow_insecure_permissions: bool) -> Result<ApiKey, KeyError> {
        match self {
            KeySource::File(path) => {
                if !allow_insecure_permissions {
                    check_private_file(path)?;
                }
                load_file(path)
            }
            KeySource::Inline { name, secret } => ApiKey::parse(name, secret),
        }
    }
}

/// Refuses a secret file that group or others may read or write, as ssh refuses such private
/// keys: anyone who can read it can trade (or withdraw) with the key.
pub fn check_private_file(path: &Path) -> Result<(), KeyError> {
    use std::os::unix::fs::PermissionsExt as _;
    // metadata() follows symlinks: Kubernetes secret volumes link through `..data`.
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            KeyError::FileMissing(path.to_owned())
        } else {
            KeyError::FileUnreadable {
                path: path.to_owned(),
                reason: e.kind().to_string(),
            }
        }
    })?;
    if meta.is_dir() {
        return Err(KeyError::IsDirectory(path.to_owned()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

fn load_file(path: &Path) -> Result<ApiKey, KeyError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            KeyError::FileMissing(path.to_owned())
        } else if e.kind() == std::io::ErrorKind::IsADirectory {
            KeyError::IsDirectory(path.to_owned())
        } else {
            KeyError::FileUnreadable {
                path: path.to_owned(),
                reason: e.kind().to_string(),
            }
        }
    })?);
    // Parse into a Value first: serde's typed errors can quote the offending value.
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| not_json(path, &text, &e))?;
    // An Exchange/Prime key file: {"key", "secret", "passphrase"} (a CDP file has "name").
    let has = |f: &str| value.get(f).is_some();
    if has("passphrase") || (has("key") && !has("name") && !has("id") && !has("privateKey")) {
        return Err(KeyError::ExchangeKey(path.to_owned()));
    }
    let field = |names: [&'static str; 2], label: &'static str| -> Result<&str, KeyError> {
        for n in names {
            if let Some(v) = value.get(n) {
                return v.as_str().ok_or(KeyError::FieldNotString {
                    path: path.to_owned(),
                    field: n,
                });
            }
        }
        Err(KeyError::MissingField {
            path: path.to_owned(),
            field: label,
        })
    };
    let name = field(["name", "id"], "\"name\" (or \"id\")")?;
    let secret = field(["privateKey", "secret"], "\"privateKey\" (or \"secret\")")?;
    let key = ApiKey::parse(name, secret);
    // serde_json::Value does not zeroize; overwrite the secret string we know about.
    let mut value = value;
    for n in ["privateKey", "secret"] {
        if let Some(serde_json::Value::String(s)) = value.get_mut(n) {
            zeroize::Zeroize::zeroize(s);
        }
    }
    key
}

/// Whether a key name is really a secret: a PEM, or base64 of an Ed25519 secret's 32 or 64
/// bytes. (Not the general heuristic: a bare key id is a UUID, which is valid URL-safe base64.)
fn name_is_secret(name: &str) -> bool {
    name.contains("-----")
        || name.contains("PRIVATE KEY")
        || name.chars().any(char::is_control)
        || [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::STANDARD_NO_PAD,
        ]
        .iter()
        .any(|e| {
            e.decode(name.as_bytes())
                .is_ok_and(|b| b.len() == 32 || b.len() == 64)
        })
}

/// Names the paste mistake behind a key file that is not JSON.
fn not_json(path: &Path, text: &str, e: &serde_json::Error) -> KeyError {
    let start = text.trim_start();
    if start.starts_with("-----BEGIN") {
        return KeyError::BarePem(path.to_owned());
    }
    if let (true, Some(b), Some(end)) = (
        start.starts_with('{'),
        text.find("-----BEGIN"),
        text.find("-----END"),
    ) {
        if b < end && text[b..end].contains('\n') {
            return KeyError::RawNewlines(path.to_owned());
        }
    }
    KeyError::NotJson {
        path: path.to_owned(),
        line: e.line(),
        column: e.column(),
    }
}

/// Undoes what .env files, shells and JSON escaping do to a secret: surrounding whitespace and
/// quotes, literal `\n` (two characters) for newlines, CRLF line ends.
fn normalize(secret: &str) -> Zeroizing<String> {
    let mut s = secret.trim();
    loop {
        let stripped = s
            .strip_prefix('"')
            .and_then(|r| r.strip_suffix('"'))
            .or_else(|| s.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')));
        match stripped {
            Some(inner) => s = inner.trim(),
            None => break,
        }
    }
    // One pass into one zeroizing buffer (the output is never longer than the input, so it never
    // reallocates): chained `replace` calls would leave unwiped copies of the whole secret.
    let mut out = Zeroizing::new(String::with_capacity(s.len()));
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        let (emit_newline, skip) = if rest.starts_with("\\r\\n") {
            (true, 4)
        } else if rest.starts_with("\\n") || rest.starts_with("\r\n") {
            (true, 2)
        } else if c == '\r' {
            (true, 1)
        } else {
            (false, c.len_utf8())
        };
        if emit_newline {
            out.push('\n');
        } else {
            out.push(c);
        }
        rest = &rest[skip..];
    }
    out
}

/// `SHA256:<base64>` of a public key.
fn fingerprint_of(public_key: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, public_key);
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(d.as_ref())
    )
}

impl ApiKey {
    /// Parses a key from its name and secret text (PEM or base64).
    pub fn parse(name: &str, secret: &str) -> Result<ApiKey, KeyError> {
        let name = name.trim().trim_matches('"').trim();
        if name.is_empty() {
            return Err(KeyError::EmptyName);
        }
        if name_is_secret(name) {
            return Err(KeyError::NameIsSecret);
        }
        let secret = normalize(secret);
        if secret.is_empty() {
            return Err(KeyError::EmptySecret);
        }
        let hex = secret.trim();
        if (hex.len() == 32 || hex.len() == 64) && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(KeyError::HexSecret(hex.len()));
        }
        let pair = if secret.contains("-----BEGIN") {
            parse_pem(secret.as_bytes())?
        } else if secret.starts_with('{') {
            return Err(KeyError::SecretIsJson);
        } else {
            parse_ed25519_base64(&secret)?
        };
        let fingerprint = fingerprint_of(match &pair {
            KeyPairKind::Es256(k) => k.public_key().as_ref(),
            KeyPairKind::EdDsa(k) => k.public_key().as_ref(),
        });
        Ok(ApiKey {
            name: name.to_owned(),
            pair,
            fingerprint,
        })
    }

    /// The key name: the JWT `kid` and `sub`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The JWT algorithm this key signs with.
    pub fn algorithm(&self) -> Algorithm {
        match self.pair {
            KeyPairKind::Es256(_) => Algorithm::Es256,
            KeyPairKind::EdDsa(_) => Algorithm::EdDsa,
        }
    }

    /// The public key: the uncompressed SEC1 point (P-256) or the 32 raw bytes (Ed25519).
    pub fn public_key(&self) -> &[u8] {
        match &self.pair {
            KeyPairKind::Es256(k) => k.public_key().as_ref(),
            KeyPairKind::EdDsa(k) => k.public_key().as_ref(),
        }
    }

    /// `SHA256:<base64>` of the public key, as ssh prints fingerprints: safe to show.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Signs `message`: raw r||s (64 bytes) for ES256, the 64-byte signature for EdDSA.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, aws_lc_rs::error::Unspecified> {
        match &self.pair {
            KeyPairKind::Es256(k) => {
                let rng = aws_lc_rs::rand::SystemRandom::new();
                Ok(k.sign(&rng, message)?.as_ref().to_vec())
            }
            KeyPairKind::EdDsa(k) => Ok(k.sign(message).as_ref().to_vec()),
        }
    }
}

fn parse_pem(text: &[u8]) -> Result<KeyPairKind, KeyError> {
    match parse_pem_once(text) {
        Err(KeyError::BadPem) if !contains(text, b"-----END") => Err(KeyError::NoEndLine),
        // Line breaks lost on the way (pasted into one line, or turned into spaces): the
        // armour lines still delimit the body, so rewrap it and try again.
        Err(KeyError::BadPem) => match reflow(text) {
            Some(fixed) if fixed.as_bytes() != text => parse_pem_once(fixed.as_bytes()),
            _ => Err(KeyError::BadPem),
        },
        other => other,
    }
}

/// The first PEM block rebuilt with its body on 64-character lines, or `None` without
/// matching BEGIN and END lines.
fn reflow(text: &[u8]) -> Option<Zeroizing<String>> {
    let s = std::str::from_utf8(text).ok()?;
    let begin = s.find("-----BEGIN ")? + "-----BEGIN ".len();
    let label_len = s[begin..].find("-----")?;
    let label = &s[begin..begin + label_len];
    let body_start = begin + label_len + "-----".len();
    let end_line = format!("-----END {label}-----");
    let body_end = body_start + s[body_start..].find(&end_line)?;
    let body: Zeroizing<String> = Zeroizing::new(
        s[body_start..body_end]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect(),
    );
    let mut out = Zeroizing::new(String::with_capacity(s.len() + body.len() / 64 + 8));
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).ok()?);
        out.push('\n');
    }
    out.push_str(&end_line);
    out.push('\n');
    Some(out)
}

fn parse_pem_once(text: &[u8]) -> Result<KeyPairKind, KeyError> {
    let mut rest = text;
    let (kind, der) = match rustls_pki_types::pem::from_buf(&mut rest) {
        Ok(Some((kind, der))) => (kind, Zeroizing::new(der)),
        // from_buf skips sections it does not know (e.g. "EC PUBLIC KEY"): name the common ones.
        Ok(None) if contains(text, b"PUBLIC KEY-----") => {
            return Err(KeyError::PublicKeyGiven("PUBLIC KEY"))
        }
        Ok(None) if contains(text, b"BEGIN ENCRYPTED PRIVATE KEY") => {
            return Err(KeyError::UnsupportedPem(
                "ENCRYPTED PRIVATE KEY: decrypt it first, e.g. openssl pkcs8 -in enc.pem -out key.pem",
            ))
        }
        Ok(None) if contains(text, b"BEGIN OPENSSH PRIVATE KEY") => {
            return Err(KeyError::UnsupportedPem("OPENSSH PRIVATE KEY"))
        }
        Ok(None) | Err(_) => return Err(KeyError::BadPem),
    };
    match kind {
        SectionKind::EcPrivateKey => {
            EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
                .map(KeyPairKind::Es256)
                .map_err(|_| {
                    curve_of(&der).map_or(
                        KeyError::BadPrivateKey("EC PRIVATE KEY"),
                        KeyError::WrongCurve,
                    )
                })
        }
        SectionKind::PrivateKey => {
            if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der) {
                return Ok(KeyPairKind::EdDsa(k));
            }
            if let Ok(k) =
                EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
            {
                return Ok(KeyPairKind::Es256(k));
            }
            if contains(&der, OID_RSA) {
                Err(KeyError::Rsa)
            } else if let Some(curve) = curve_of(&der) {
                Err(KeyError::WrongCurve(curve))
            } else {
                Err(KeyError::BadPrivateKey("PRIVATE KEY"))
            }
        }
        SectionKind::RsaPrivateKey => Err(KeyError::Rsa),
        SectionKind::PublicKey => Err(KeyError::PublicKeyGiven("PUBLIC KEY")),
        SectionKind::Certificate => Err(KeyError::UnsupportedPem("CERTIFICATE")),
        _ => Err(KeyError::UnsupportedPem("not a private key")),
    }
}

// DER encodings of the OIDs we name in errors (tag, length, value). Only used to word an error
// after aws-lc-rs has already rejected the key, never to accept one.
const OID_RSA: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
const CURVES: &[(&str, &[u8])] = &[
    ("P-384", &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22]),
    ("P-521", &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23]),
    ("secp256k1", &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a]),
    ("P-224", &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x21]),
];

fn curve_of(der: &[u8]) -> Option<&'static str> {
    CURVES
        .iter()
        .find(|(_, oid)| contains(der, oid))
        .map(|(name, _)| *name)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn parse_ed25519_base64(secret: &str) -> Result<KeyPairKind, KeyError> {
    // Base64 secrets are sometimes wrapped over lines; whitespace carries no data.
    let compact: Zeroizing<String> =
        Zeroizing::new(secret.chars().filter(|c| !c.is_whitespace()).collect());
    let engines = [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let bytes = engines
        .iter()
        .find_map(|e| e.decode(compact.as_bytes()).ok())
        .map(Zeroizing::new)
        .ok_or(KeyError::BadBase64)?;
    match bytes.len() {
        64 => Ed25519KeyPair::from_seed_and_public_key(&bytes[..32], &bytes[32..])
            .map(KeyPairKind::EdDsa)
            .map_err(|_| KeyError::PublicHalfMismatch),
        32 => Ed25519KeyPair::from_seed_unchecked(&bytes)
            .map(KeyPairKind::EdDsa)
            .map_err(|_| KeyError::WrongLength(32)),
        n => Err(KeyError::WrongLength(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_undoes_env_file_damage() {
        assert_eq!(
            normalize("  \"-----BEGIN X-----\\nabc\\n-----END X-----\\n\"  ").as_str(),
            "-----BEGIN X-----\nabc\n-----END X-----\n"
        );
        assert_eq!(normalize("'a\r\nb'\n").as_str(), "a\nb");
        assert_eq!(
            normalize("a\\r\\nb\rc\u{e9}\\nd").as_str(),
            "a\nb\nc\u{e9}\nd"
        );
        let n = normalize("x\\ny\\r\\nz");
        assert_eq!(n.as_str(), "x\ny\nz");
    }

    #[test]
    fn debug_never_shows_secret() {
        let seed = [7u8; 32];
        let b64 = base64::engine::general_purpose::STANDARD.encode(seed);
        let key = ApiKey::parse("k", &b64).expect("32-byte seed");
        let dbg = format!("{key:?}");
        assert!(!dbg.contains(&b64));
        assert!(dbg.contains("redacted"));
        let src = KeySource::Inline {
            name: "k".into(),
            secret: Zeroizing::new(b64.clone()),
        };
        assert!(!format!("{src:?}").contains(&b64));
    }

    #[test]
    fn the_kept_fingerprint_is_the_sha256_of_the_public_key() {
        // Two keys: a fingerprint computed once at parse must still be each key's own.
        for seed in [[7u8; 32], [8u8; 32]] {
            let b64 = base64::engine::general_purpose::STANDARD.encode(seed);
            let key = ApiKey::parse("k", &b64).expect("32-byte seed");
            let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.public_key());
            let want = format!(
                "SHA256:{}",
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(d.as_ref())
            );
            assert_eq!(key.fingerprint(), want);
        }
    }

    #[test]
    fn unsupported_pem_kinds_are_named() {
        let enc =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let e = ApiKey::parse("k", enc).expect_err("encrypted");
        assert!(e.to_string().contains("ENCRYPTED PRIVATE KEY"), "{e}");
        let ssh = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n-----END OPENSSH PRIVATE KEY-----\n";
        let e = ApiKey::parse("k", ssh).expect_err("openssh");
        assert!(e.to_string().contains("OPENSSH"), "{e}");
    }

    #[test]
    fn wrong_lengths_are_named() {
        let b64 = base64::engine::general_purpose::STANDARD.encode([1u8; 48]);
        let err = ApiKey::parse("k", &b64).expect_err("48 bytes is no key");
        assert!(err.to_string().contains("48 bytes"), "{err}");
        assert!(matches!(
            ApiKey::parse("k", "not base64 !!"),
            Err(KeyError::BadBase64)
        ));
    }
}
