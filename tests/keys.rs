//! The key matrix. Every accepted key form signs end to end through a real cbgate against the
//! mock Coinbase; every kind of damage .env files, shells and JSON escaping do to a secret loads
//! to the same key; every rejected form fails with an error that names the problem and never
//! quotes the secret, whether it comes through `ApiKey::parse`, a key file, the
//! `COINBASE_API_KEY` / `COINBASE_API_SECRET` pair or the `cbgate check` binary.

mod common;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING,
};
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use http::StatusCode;
use serde_json::json;

use cbgate::sign::key::{Algorithm, ApiKey, KeyError, KeySource};
use common::harness::{get, pem, write_private, Gate, KeyForm, TestKey, Upstream};
use common::mock::{AuthOutcome, ExpectedKey};

const ALL_FORMS: [KeyForm; 5] = [
    KeyForm::P256Sec1,
    KeyForm::P256Pkcs8,
    KeyForm::Ed25519B64_64,
    KeyForm::Ed25519B64_32,
    KeyForm::Ed25519Pkcs8,
];

/// The name used where the test is about the secret, not the name.
const NAME: &str = "organizations/0f0e0d0c/apiKeys/a1b2c3d4";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn expected_alg(key: &TestKey) -> Algorithm {
    match key.expected {
        ExpectedKey::Es256 { .. } => Algorithm::Es256,
        ExpectedKey::EdDsa { .. } => Algorithm::EdDsa,
    }
}

fn expected_public_key(key: &TestKey) -> &[u8] {
    match &key.expected {
        ExpectedKey::Es256 { public_key, .. } | ExpectedKey::EdDsa { public_key, .. } => public_key,
    }
}

/// `SHA256:<base64, no padding>` of the public key, as `cbgate check` prints it.
fn fingerprint(public_key: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, public_key);
    format!("SHA256:{}", STANDARD_NO_PAD.encode(d.as_ref()))
}

/// The loaded key is the generated one: same name, algorithm and public key; it signs a token
/// that `jsonwebtoken` verifies; its Debug output does not show the secret.
fn assert_same_key(loaded: &ApiKey, key: &TestKey, how: &str) {
    assert_eq!(loaded.name(), key.name, "{how}: key name");
    assert_eq!(loaded.algorithm(), expected_alg(key), "{how}: algorithm");
    assert_eq!(
        loaded.public_key(),
        expected_public_key(key),
        "{how}: public key differs from the generated key's"
    );
    cbgate::sign::jwt::self_test(loaded).unwrap_or_else(|e| panic!("{how}: self-test failed: {e}"));
    assert_no_secret(&format!("{loaded:?}"), &key.secret);
}

/// Fails if `msg` contains any 16-character window of the secret (or of its PEM body lines).
fn assert_no_secret(msg: &str, secret: &str) {
    assert!(
        secret.chars().count() >= 16,
        "test bug: secret {secret:?} is too short to check for leaks"
    );
    common::harness::assert_no_secret(msg, secret, "output");
}

/// The error names the problem (contains `phrase`), is one line, and neither its Display nor
/// its Debug form quotes the secret.
fn assert_err_names(err: &KeyError, phrase: &str, secret: &str, how: &str) {
    let msg = err.to_string();
    assert!(
        msg.contains(phrase),
        "{how}: error does not name the problem ({phrase:?}): {msg}"
    );
    assert!(!msg.contains('\n'), "{how}: error is not one line: {msg:?}");
    assert_no_secret(&msg, secret);
    assert_no_secret(&format!("{err:?}"), secret);
}

/// Writes `body` as the key file `key.json` (mode 0600) in `dir`.
fn write_json(dir: &Path, body: &serde_json::Value) -> PathBuf {
    write_private(dir, "key.json", body.to_string().as_bytes())
}

fn env_pair(name: &str, secret: &str) -> HashMap<String, String> {
    HashMap::from([
        ("COINBASE_API_KEY".to_owned(), name.to_owned()),
        ("COINBASE_API_SECRET".to_owned(), secret.to_owned()),
    ])
}

/// Loads through `KeySource::select(None, env)`, as the binary does without a key file.
fn load_from_env(env: &HashMap<String, String>) -> Result<ApiKey, KeyError> {
    KeySource::select(None, env)?
        .expect("both variables set: a key source")
        .load()
}

/// Runs the cbgate binary with `args` and `env`; no key or configuration from the test's own
/// environment leaks in.
fn cbgate<I, S>(args: I, env: &[(&str, &str)]) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cbgate"));
    cmd.args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("CBGATE_")) {
            cmd.env_remove(&k);
        }
    }
    cmd.env_remove("COINBASE_API_KEY")
        .env_remove("COINBASE_API_SECRET")
        .env_remove("CDP_API_KEY_ID")
        .env_remove("CDP_API_KEY_SECRET")
        .env_remove("CDP_WALLET_SECRET")
        .env_remove("CBGATE_CONFIG");
    cmd.envs(env.iter().copied());
    cmd.output().expect("run the cbgate binary")
}

/// `cbgate check` failed as a configuration error: exit 2, one stderr line naming the problem,
/// nothing on stdout, the secret nowhere.
fn assert_check_fails(out: &Output, phrase: &str, secret: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_no_secret(&stdout, secret);
    assert_no_secret(&stderr, secret);
    assert_eq!(
        out.status.code(),
        Some(2),
        "cbgate check: exit status; stdout {stdout:?}, stderr {stderr:?}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "cbgate check: stderr is not one line: {stderr:?}"
    );
    assert!(
        stderr.contains(phrase),
        "cbgate check: stderr does not name the problem ({phrase:?}): {stderr:?}"
    );
    assert!(stdout.is_empty(), "cbgate check: stdout {stdout:?}");
}

/// `cbgate check` succeeded and printed the key's name, algorithm and fingerprint, not its
/// secret.
fn assert_check_ok(out: &Output, key: &TestKey) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_no_secret(&stdout, &key.secret);
    assert_no_secret(&stderr, &key.secret);
    assert_eq!(
        out.status.code(),
        Some(0),
        "cbgate check: exit status; stdout {stdout:?}, stderr {stderr:?}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let want = [
        format!("key: {}", key.name),
        format!("algorithm: {}", expected_alg(key).as_str()),
        format!(
            "public key fingerprint: {}",
            fingerprint(expected_public_key(key))
        ),
    ];
    for w in &want {
        assert!(
            lines.contains(&w.as_str()),
            "cbgate check: no line {w:?} in {stdout:?}"
        );
    }
}

/// A bad secret fails the same way everywhere it can come from: `ApiKey::parse`, the key file,
/// the environment pair, and `cbgate check --key-file`.
fn assert_secret_rejected(secret: &str, phrase: &str) {
    let err = ApiKey::parse(NAME, secret).expect_err("ApiKey::parse accepted a bad secret");
    assert_err_names(&err, phrase, secret, "ApiKey::parse");

    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_json(dir.path(), &json!({ "name": NAME, "privateKey": secret }));
    let err = KeySource::File(path.clone())
        .load()
        .expect_err("key file with a bad secret loaded");
    assert_err_names(&err, phrase, secret, "key file");

    let err = load_from_env(&env_pair(NAME, secret)).expect_err("env pair with a bad secret");
    assert_err_names(&err, phrase, secret, "env pair");

    let out = cbgate(
        [OsStr::new("check"), "--key-file".as_ref(), path.as_ref()],
        &[],
    );
    assert_check_fails(&out, phrase, secret);
}

/// A key file that fails before any secret is parsed: `KeySource::File` and `cbgate check`.
fn assert_file_rejected(path: &Path, phrase: &str, secret: &str) {
    let err = KeySource::File(path.to_owned())
        .load()
        .expect_err("bad key file loaded");
    assert_err_names(&err, phrase, secret, "key file");
    let out = cbgate(
        [OsStr::new("check"), "--key-file".as_ref(), path.as_ref()],
        &[],
    );
    assert_check_fails(&out, phrase, secret);
}

/// Splits one DER TLV off the front of `der`: (tag, contents, rest).
fn der_tlv(der: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = der[0];
    let first = der[1];
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        let len = der[2..2 + n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, 2 + n)
    };
    (tag, &der[header..header + len], &der[header + len..])
}

/// The PKCS#1 `RSAPrivateKey` inside a PKCS#8 `PrivateKeyInfo` (its privateKey OCTET STRING).
fn pkcs1_from_pkcs8(pkcs8: &[u8]) -> Vec<u8> {
    let (tag, info, _) = der_tlv(pkcs8);
    assert_eq!(tag, 0x30, "PrivateKeyInfo is a SEQUENCE");
    let (tag, _version, rest) = der_tlv(info);
    assert_eq!(tag, 0x02, "version INTEGER");
    let (tag, _algorithm, rest) = der_tlv(rest);
    assert_eq!(tag, 0x30, "AlgorithmIdentifier SEQUENCE");
    let (tag, key, _) = der_tlv(rest);
    assert_eq!(tag, 0x04, "privateKey OCTET STRING");
    assert_eq!(key[0], 0x30, "RSAPrivateKey is a SEQUENCE");
    key.to_vec()
}

fn random_bytes_b64(n: usize) -> String {
    let mut b = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut b).expect("random bytes");
    STANDARD.encode(b)
}

// ---------------------------------------------------------------------------
// 1. Good forms, end to end through a real cbgate
// ---------------------------------------------------------------------------

async fn signs_end_to_end(form: KeyForm, alg: &str) {
    let key = TestKey::generate(form);
    let up = Upstream::start(Some(&key)).await;
    let gate = Gate::start(up.config(), Some(&key)).await;

    let r = get(&gate, "/api/v3/brokerage/accounts").await;
    assert_eq!(r.status, StatusCode::OK, "{form:?}: {}", r.text());
    let rec = up.mock.requests();
    assert_eq!(rec.len(), 1, "{form:?}: one upstream request");
    match &rec[0].auth {
        AuthOutcome::Valid {
            alg: got_alg,
            kid,
            claims,
            ..
        } => {
            assert_eq!(got_alg, alg, "{form:?}: JWT alg");
            assert_eq!(kid, &key.name, "{form:?}: JWT kid");
            assert_eq!(claims["sub"], key.name.as_str(), "{form:?}: JWT sub");
        }
        other => panic!("{form:?}: mock did not accept the token: {other:?}"),
    }
    gate.stop().await;
}

#[tokio::test]
async fn p256_sec1_pem_signs_end_to_end() {
    signs_end_to_end(KeyForm::P256Sec1, "ES256").await;
}

#[tokio::test]
async fn p256_pkcs8_pem_signs_end_to_end() {
    signs_end_to_end(KeyForm::P256Pkcs8, "ES256").await;
}

#[tokio::test]
async fn ed25519_base64_64_bytes_signs_end_to_end() {
    signs_end_to_end(KeyForm::Ed25519B64_64, "EdDSA").await;
}

#[tokio::test]
async fn ed25519_base64_32_bytes_signs_end_to_end() {
    signs_end_to_end(KeyForm::Ed25519B64_32, "EdDSA").await;
}

#[tokio::test]
async fn ed25519_pkcs8_pem_signs_end_to_end() {
    signs_end_to_end(KeyForm::Ed25519Pkcs8, "EdDSA").await;
}

// ---------------------------------------------------------------------------
// 2. Damaged but acceptable: each loads to the same key
// ---------------------------------------------------------------------------

/// What .env files, shells, JSON escaping and copy-paste do to `secret`.
fn damaged_variants(secret: &str) -> Vec<(&'static str, String)> {
    let mut v = vec![
        ("double quotes", format!("\"{secret}\"")),
        ("single quotes", format!("'{secret}'")),
        (
            "leading and trailing whitespace and newlines",
            format!("\n \t\n  {secret}  \n\n\t "),
        ),
        ("quotes inside whitespace", format!("  \"{secret}\"\n")),
        ("whitespace inside quotes", format!("\"\n {secret} \n\"")),
        ("trailing newline", format!("{secret}\n")),
    ];
    if secret.contains("-----BEGIN") {
        let escaped = secret.replace('\n', "\\n");
        v.extend([
            ("literal \\n for newlines", escaped.clone()),
            (
                "literal \\n, no trailing one",
                secret.trim_end().replace('\n', "\\n"),
            ),
            (
                "literal \\r\\n for newlines",
                secret.replace('\n', "\\r\\n"),
            ),
            ("CRLF line ends", secret.replace('\n', "\r\n")),
            (
                "CRLF line ends, no final one",
                secret.trim_end().replace('\n', "\r\n"),
            ),
            (
                ".env style: double quotes around literal \\n",
                format!("\"{escaped}\""),
            ),
            (
                ".env style: single quotes around literal \\n",
                format!("'{escaped}'"),
            ),
            (
                "literal \\n plus trailing whitespace",
                format!("{escaped}  \n"),
            ),
        ]);
    } else {
        let wrap = |width: usize, sep: &str| -> String {
            secret
                .as_bytes()
                .chunks(width)
                .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
                .collect::<Vec<_>>()
                .join(sep)
        };
        v.extend([
            ("base64 wrapped at 20 columns", wrap(20, "\n")),
            (
                "base64 wrapped at 64 columns, trailing newline",
                wrap(64, "\n") + "\n",
            ),
            ("base64 wrapped at 16 columns, CRLF", wrap(16, "\r\n")),
            ("base64 wrapped with literal \\n", wrap(24, "\\n")),
            (
                "base64 wrapped and quoted",
                format!("\"{}\"", wrap(30, "\n")),
            ),
        ]);
    }
    v
}

/// Each damaged variant of each form loads to the generated key through `ApiKey::parse`, a
/// key file (JSON-escaped) and the environment pair.
fn damaged_variants_load(form: KeyForm) {
    let key = TestKey::generate(form);
    let dir = tempfile::tempdir().expect("tempdir");
    for (label, damaged) in damaged_variants(&key.secret) {
        let how = format!("{form:?}, {label}");
        let loaded = ApiKey::parse(&key.name, &damaged)
            .unwrap_or_else(|e| panic!("{how}: ApiKey::parse rejected it: {e}"));
        assert_same_key(&loaded, &key, &format!("{how}, ApiKey::parse"));

        let path = write_json(
            dir.path(),
            &json!({ "name": key.name, "privateKey": damaged }),
        );
        let loaded = KeySource::File(path)
            .load()
            .unwrap_or_else(|e| panic!("{how}: key file rejected: {e}"));
        assert_same_key(&loaded, &key, &format!("{how}, key file"));

        let loaded = load_from_env(&env_pair(&key.name, &damaged))
            .unwrap_or_else(|e| panic!("{how}: env pair rejected: {e}"));
        assert_same_key(&loaded, &key, &format!("{how}, env pair"));
    }
}

#[test]
fn damaged_p256_sec1_secrets_load_to_the_same_key() {
    damaged_variants_load(KeyForm::P256Sec1);
}

#[test]
fn damaged_p256_pkcs8_secrets_load_to_the_same_key() {
    damaged_variants_load(KeyForm::P256Pkcs8);
}

#[test]
fn damaged_ed25519_base64_64_secrets_load_to_the_same_key() {
    damaged_variants_load(KeyForm::Ed25519B64_64);
}

#[test]
fn damaged_ed25519_base64_32_secrets_load_to_the_same_key() {
    damaged_variants_load(KeyForm::Ed25519B64_32);
}

#[test]
fn damaged_ed25519_pkcs8_secrets_load_to_the_same_key() {
    damaged_variants_load(KeyForm::Ed25519Pkcs8);
}

/// ccxt#22182: the key file's JSON string holds `\\n` (an escaped backslash, then `n`), so the
/// decoded secret has the two characters `\n` where newlines belong.
#[test]
fn json_file_with_double_escaped_newlines_loads() {
    for form in [KeyForm::P256Sec1, KeyForm::P256Pkcs8, KeyForm::Ed25519Pkcs8] {
        let key = TestKey::generate(form);
        let dir = tempfile::tempdir().expect("tempdir");
        let escaped = key.secret.replace('\n', "\\\\n");
        let text = format!(
            "{{\n  \"name\": \"{}\",\n  \"privateKey\": \"{escaped}\"\n}}\n",
            key.name
        );
        assert!(
            text.contains("-----\\\\n") && !text.contains("-----\\n"),
            "test bug: the file must hold backslash-backslash-n"
        );
        let path = write_private(dir.path(), "cdp_api_key.json", text.as_bytes());
        let loaded = KeySource::File(path)
            .load()
            .unwrap_or_else(|e| panic!("{form:?}: key file rejected: {e}"));
        assert_same_key(&loaded, &key, &format!("{form:?}, JSON with \\\\n"));
    }
}

/// The portal's new JSON says `id`; some tools write `secret`. Every combination loads.
#[test]
fn json_files_with_id_and_secret_fields_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    for form in ALL_FORMS {
        let key = TestKey::generate(form);
        for (name_field, secret_field) in [
            ("id", "privateKey"),
            ("name", "secret"),
            ("id", "secret"),
            ("name", "privateKey"),
        ] {
            let path = write_json(
                dir.path(),
                &json!({ name_field: key.name, secret_field: key.secret }),
            );
            let loaded = KeySource::File(path).load().unwrap_or_else(|e| {
                panic!("{form:?}, {{{name_field}, {secret_field}}}: rejected: {e}")
            });
            assert_same_key(
                &loaded,
                &key,
                &format!("{form:?}, {{{name_field}, {secret_field}}}"),
            );
        }
    }
}

/// `COINBASE_API_KEY` + `COINBASE_API_SECRET`, as the official SDK reads them, for every form,
/// plain and as a .env file would hand them over (quoted, literal `\n`, trailing newline).
#[test]
fn env_pair_loads_every_form() {
    for form in ALL_FORMS {
        let key = TestKey::generate(form);
        let dotenv = format!("\"{}\"\n", key.secret.replace('\n', "\\n"));
        for (label, secret) in [("plain", key.secret.clone()), (".env style", dotenv)] {
            let src = KeySource::select(None, &env_pair(&key.name, &secret))
                .unwrap_or_else(|e| panic!("{form:?}, {label}: select failed: {e}"))
                .expect("both variables set: a key source");
            assert!(
                matches!(src, KeySource::Inline { .. }),
                "{form:?}: env pair gives an inline source"
            );
            assert_no_secret(&format!("{src:?}"), &key.secret);
            let loaded = src
                .load()
                .unwrap_or_else(|e| panic!("{form:?}, {label}: env pair rejected: {e}"));
            assert_same_key(&loaded, &key, &format!("{form:?}, env pair, {label}"));
        }
    }
}

/// A quoted key name from a .env file is unquoted; a configured file wins over the env pair.
#[test]
fn env_pair_name_is_unquoted_and_file_wins() {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let env = env_pair(&format!("  \"{}\"\n", key.name), &key.secret);
    let loaded = load_from_env(&env).expect("quoted name loads");
    assert_same_key(&loaded, &key, "quoted name");

    let other = TestKey::generate(KeyForm::P256Sec1);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = other.write_json(dir.path());
    let src = KeySource::select(Some(&path), &env)
        .expect("select")
        .expect("a key source");
    assert!(matches!(src, KeySource::File(_)), "the file wins");
    assert_same_key(&src.load().expect("file loads"), &other, "file over env");

    assert!(
        KeySource::select(None, &HashMap::new())
            .expect("no key is fine")
            .is_none(),
        "neither variable set: no key"
    );
}

// ---------------------------------------------------------------------------
// 3. Bad forms: an error naming the problem, never the secret
// ---------------------------------------------------------------------------

#[test]
fn p384_keys_are_named_by_curve() {
    let kp = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).expect("generate P-384");
    let sec1 = pem(
        "EC PRIVATE KEY",
        kp.private_key().as_der().expect("SEC1 DER").as_ref(),
    );
    assert_secret_rejected(&sec1, "curve P-384");
    let pkcs8 = pem("PRIVATE KEY", kp.to_pkcs8v1().expect("PKCS#8").as_ref());
    assert_secret_rejected(&pkcs8, "curve P-384");
}

#[test]
fn rsa_keys_are_named() {
    let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
        .expect("generate RSA-2048");
    let pkcs8 = kp.as_der().expect("PKCS#8 DER");
    let pkcs1 = pkcs1_from_pkcs8(pkcs8.as_ref());
    assert_secret_rejected(&pem("RSA PRIVATE KEY", &pkcs1), "RSA key");
    assert_secret_rejected(&pem("PRIVATE KEY", pkcs8.as_ref()), "RSA key");
}

#[test]
fn p256_public_key_is_named() {
    let kp = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("generate P-256");
    let spki = kp.public_key().as_der().expect("SPKI DER");
    assert_secret_rejected(&pem("PUBLIC KEY", spki.as_ref()), "public key");
}

#[test]
fn truncated_ed25519_base64_is_named() {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    assert_eq!(key.secret.len(), 88, "64 bytes are 88 base64 characters");
    let cut = &key.secret[..key.secret.len() - 8];
    assert_secret_rejected(cut, "decodes to 60 bytes");
}

#[test]
fn truncated_pem_is_named() {
    for form in [KeyForm::P256Sec1, KeyForm::Ed25519Pkcs8] {
        let key = TestKey::generate(form);
        let first_line_end = key.secret.find('\n').expect("PEM has lines");
        let end = key.secret.find("-----END").expect("PEM has an END line");
        let mid = (first_line_end + end) / 2;
        assert!(mid > first_line_end + 1 && mid < end, "cut inside the body");
        assert_secret_rejected(&key.secret[..mid], "missing END line");
    }
}

#[test]
fn garbage_is_named() {
    assert_secret_rejected(
        "Hello! This is *not* a key; @@ 42 ##",
        "neither a PEM private key nor valid base64",
    );
}

#[test]
fn random_48_bytes_are_named_by_length() {
    assert_secret_rejected(&random_bytes_b64(48), "decodes to 48 bytes");
}

#[test]
fn random_64_bytes_look_like_an_hmac_secret() {
    // An Exchange/Prime HMAC secret is base64 of 64 random bytes: the "public half" of such a
    // "seed || public key" does not match its seed.
    let secret = random_bytes_b64(64);
    assert_secret_rejected(&secret, "public half does not match");
    let err = ApiKey::parse(NAME, &secret).expect_err("HMAC-like secret");
    assert!(err.to_string().contains("HMAC"), "{err}");
}

#[test]
fn missing_key_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("no_such_key.json");
    let err = KeySource::File(path.clone())
        .load()
        .expect_err("missing file");
    assert!(err.to_string().contains("does not exist"), "{err}");
    let out = cbgate(
        [OsStr::new("check"), "--key-file".as_ref(), path.as_ref()],
        &[],
    );
    assert_check_fails(&out, "does not exist", "no secret exists here");
}

#[test]
fn key_file_that_is_not_json_is_named() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let dir = tempfile::tempdir().expect("tempdir");
    // The bare PEM saved as the key file.
    let path = write_private(dir.path(), "key.pem", key.secret.as_bytes());
    assert_file_rejected(&path, "not valid JSON", &key.secret);
    // The JSON cut off inside the secret.
    let full = json!({ "name": key.name, "privateKey": key.secret }).to_string();
    let path = write_private(dir.path(), "cut.json", &full.as_bytes()[..full.len() - 40]);
    assert_file_rejected(&path, "not valid JSON", &key.secret);
}

#[test]
fn key_file_without_private_key_is_named() {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let dir = tempfile::tempdir().expect("tempdir");
    // A misspelt field holds the secret: the message names the field, not its value.
    let path = write_json(
        dir.path(),
        &json!({ "name": key.name, "private_key": key.secret }),
    );
    assert_file_rejected(&path, "no \"privateKey\"", &key.secret);
}

#[test]
fn key_file_with_numeric_private_key_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let digits = "1234567890123456789012345678901234567890";
    let text = format!("{{\"name\": \"{NAME}\", \"privateKey\": {digits}}}");
    let path = write_private(dir.path(), "key.json", text.as_bytes());
    assert_file_rejected(&path, "must be a string", digits);
    let err = KeySource::File(path).load().expect_err("number secret");
    assert!(
        err.to_string().contains("privateKey"),
        "names the field: {err}"
    );
}

#[test]
fn empty_key_name_is_named() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    for name in ["", "   ", "\"\"", " \" \" \n"] {
        let err = ApiKey::parse(name, &key.secret).expect_err("empty name");
        assert_err_names(&err, "name is empty", &key.secret, "ApiKey::parse");
        let err = load_from_env(&env_pair(name, &key.secret)).expect_err("empty name");
        assert_err_names(&err, "name is empty", &key.secret, "env pair");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_json(dir.path(), &json!({ "name": "", "privateKey": key.secret }));
    assert_file_rejected(&path, "name is empty", &key.secret);
}

#[test]
fn half_an_env_pair_is_named() {
    let key = TestKey::generate(KeyForm::P256Sec1);

    let only_name = HashMap::from([("COINBASE_API_KEY".to_owned(), key.name.clone())]);
    let err = KeySource::select(None, &only_name).expect_err("only the name");
    assert_err_names(
        &err,
        "COINBASE_API_KEY is set but COINBASE_API_SECRET is not",
        &key.secret,
        "only COINBASE_API_KEY",
    );

    let only_secret = HashMap::from([("COINBASE_API_SECRET".to_owned(), key.secret.clone())]);
    let err = KeySource::select(None, &only_secret).expect_err("only the secret");
    assert_err_names(
        &err,
        "COINBASE_API_SECRET is set but COINBASE_API_KEY is not",
        &key.secret,
        "only COINBASE_API_SECRET",
    );

    let out = cbgate(["check"], &[("COINBASE_API_KEY", key.name.as_str())]);
    assert_check_fails(&out, "COINBASE_API_KEY is set but", &key.secret);
    let out = cbgate(["check"], &[("COINBASE_API_SECRET", key.secret.as_str())]);
    assert_check_fails(&out, "COINBASE_API_SECRET is set but", &key.secret);
}

// ---------------------------------------------------------------------------
// 4. `cbgate check` with good keys
// ---------------------------------------------------------------------------

#[test]
fn check_prints_name_alg_and_fingerprint_for_an_es256_key_file() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = key.write_json(dir.path());
    let out = cbgate(
        [OsStr::new("check"), "--key-file".as_ref(), path.as_ref()],
        &[],
    );
    assert_check_ok(&out, &key);
}

#[test]
fn check_prints_name_alg_and_fingerprint_for_an_ed25519_env_pair() {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let out = cbgate(
        ["check"],
        &[
            ("COINBASE_API_KEY", key.name.as_str()),
            ("COINBASE_API_SECRET", key.secret.as_str()),
        ],
    );
    assert_check_ok(&out, &key);
}

#[test]
fn check_accepts_a_dotenv_style_pem_in_the_env_pair() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let dotenv = format!("\"{}\"", key.secret.replace('\n', "\\n"));
    let out = cbgate(
        ["check"],
        &[
            ("COINBASE_API_KEY", key.name.as_str()),
            ("COINBASE_API_SECRET", dotenv.as_str()),
        ],
    );
    assert_check_ok(&out, &key);
    assert_no_secret(&String::from_utf8_lossy(&out.stdout), &dotenv);
}

/// The leak check itself catches a quoted window of the text and of a PEM body line, and lets
/// a clean message through.
#[test]
fn assert_no_secret_catches_quoted_fragments() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let body_line = key.secret.lines().nth(1).expect("a body line");
    let leaky = [
        format!("bad key near {:?}", &body_line[10..26]),
        format!("joined body {}", &key.secret.replace('\n', "")[70..86]),
        format!("escaped: {}", &key.secret.replace('\n', "\\n")[20..36]),
    ];
    for msg in leaky {
        let caught = std::panic::catch_unwind(|| assert_no_secret(&msg, &key.secret)).is_err();
        assert!(caught, "leak not caught: {msg}");
    }
    assert_no_secret("the secret is an RSA key", &key.secret);
}

// ---------------------------------------------------------------------------
// 5. Paste mistakes: each named, with the fix, without the secret
// ---------------------------------------------------------------------------

/// A PEM pasted into the JSON with its real line breaks (JSON strings cannot hold them).
#[test]
fn pem_with_raw_newlines_inside_the_json_string_is_named() {
    let key = TestKey::generate(KeyForm::P256Sec1);
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "{{\n  \"name\": \"{}\",\n  \"privateKey\": \"{}\"\n}}\n",
        key.name, key.secret
    );
    let path = write_private(dir.path(), "cdp_api_key.json", text.as_bytes());
    assert_file_rejected(&path, "has real line breaks", &key.secret);
    let err = KeySource::File(path).load().expect_err("raw newlines");
    assert!(err.to_string().contains("as \\n"), "names the fix: {err}");
}

/// The bare PEM saved as the key file is named as such.
#[test]
fn bare_pem_as_the_key_file_is_named() {
    let key = TestKey::generate(KeyForm::Ed25519Pkcs8);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_private(dir.path(), "key.pem", key.secret.as_bytes());
    assert_file_rejected(&path, "holds a bare PEM key", &key.secret);
}

/// A PEM whose line breaks were lost (one line, or spaces) is reflowed and loads.
#[test]
fn pem_with_lost_newlines_loads_to_the_same_key() {
    for form in [KeyForm::P256Sec1, KeyForm::P256Pkcs8, KeyForm::Ed25519Pkcs8] {
        let key = TestKey::generate(form);
        for (how, damaged) in [
            ("newlines stripped", key.secret.replace('\n', "")),
            ("newlines as spaces", key.secret.replace('\n', " ")),
        ] {
            let loaded = ApiKey::parse(&key.name, &damaged)
                .unwrap_or_else(|e| panic!("{form:?}, {how}: rejected: {e}"));
            assert_same_key(&loaded, &key, &format!("{form:?}, {how}"));
            let loaded = load_from_env(&env_pair(&key.name, &damaged))
                .unwrap_or_else(|e| panic!("{form:?}, {how}: env pair rejected: {e}"));
            assert_same_key(&loaded, &key, &format!("{form:?}, {how}, env pair"));
        }
    }
}

/// An Exchange/Prime key file ({"key", "secret", "passphrase"}) is named, with what to do.
#[test]
fn exchange_key_json_is_named() {
    let secret = random_bytes_b64(64);
    let dir = tempfile::tempdir().expect("tempdir");
    for body in [
        json!({ "key": "0123456789abcdef0123456789abcdef", "secret": secret, "passphrase": "p4ssphr4se" }),
        json!({ "key": "0123456789abcdef0123456789abcdef", "secret": secret }),
        json!({ "name": NAME, "privateKey": secret, "passphrase": "p4ssphr4se" }),
    ] {
        let path = write_json(dir.path(), &body);
        assert_file_rejected(&path, "Coinbase Exchange API key", &secret);
        let msg = KeySource::File(path)
            .load()
            .expect_err("exchange")
            .to_string();
        assert!(msg.contains("CDP API key"), "{msg}");
        assert!(msg.contains("Coinbase Developer Platform"), "{msg}");
        assert!(msg.contains("kind = \"exchange\""), "{msg}");
        assert!(!msg.contains("p4ssphr4se"), "{msg}");
    }
}

/// A 32-hex-character secret is an HMAC-style secret, not a CDP key.
#[test]
fn hex_hmac_secret_is_named() {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).expect("random");
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    assert_secret_rejected(&hex, "32 hex characters: an HMAC-style API secret");
    let msg = ApiKey::parse(NAME, &hex).expect_err("hex").to_string();
    assert!(msg.contains("Coinbase Developer Platform"), "{msg}");
}

/// The secret given as the key name (the two variables swapped, or the name field) is refused
/// without printing it: the name is shown by `check` and logged by `serve`.
#[test]
fn a_key_name_that_is_key_material_is_refused_unseen() {
    let good = TestKey::generate(KeyForm::Ed25519B64_64);
    for secret in [
        TestKey::generate(KeyForm::P256Sec1).secret,
        TestKey::generate(KeyForm::Ed25519B64_64).secret,
    ] {
        let err = ApiKey::parse(&secret, &good.secret).expect_err("secret as name");
        assert_err_names(
            &err,
            "key name looks like key material",
            &secret,
            "ApiKey::parse",
        );
        let out = cbgate(
            ["check"],
            &[
                ("COINBASE_API_KEY", secret.as_str()),
                ("COINBASE_API_SECRET", good.secret.as_str()),
            ],
        );
        assert_check_fails(&out, "key name looks like key material", &secret);
    }
    // Real names pass: the path form and a bare id.
    ApiKey::parse(NAME, &good.secret).expect("path-shaped name");
    ApiKey::parse(&good.name, &good.secret).expect("id-shaped name");
}

/// `--key-file` naming a directory says so (it used to report the directory's mode).
#[test]
fn key_file_that_is_a_directory_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_file_rejected(dir.path(), "is a directory", "no secret lives in here");
    let out = cbgate(
        [
            OsStr::new("check"),
            "--key-file".as_ref(),
            dir.path().as_ref(),
        ],
        &[],
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("mode"));
}

/// The whole key JSON pasted as the secret (COINBASE_API_SECRET) is named.
#[test]
fn a_json_document_as_the_secret_is_named() {
    let secret = random_bytes_b64(64);
    let doc = json!({ "id": "0f0e0d0c-a1b2", "privateKey": secret }).to_string();
    let err = ApiKey::parse(NAME, &doc).expect_err("JSON as the secret");
    assert_err_names(&err, "is a JSON document", &secret, "ApiKey::parse");
    let err = load_from_env(&env_pair(NAME, &doc)).expect_err("JSON as the secret");
    assert_err_names(&err, "--key-file", &secret, "env pair");
}

/// The CDP SDKs' variables work for cbgate too: `CDP_API_KEY_ID` + `CDP_API_KEY_SECRET` for the
/// key, `CDP_WALLET_SECRET` for the wallet secret; a bad wallet secret is exit 2, named, never
/// quoted; only half of the CDP pair is named as such.
#[test]
fn cdp_environment_variables_give_the_key_and_the_wallet_secret() {
    let key = TestKey::generate(KeyForm::Ed25519B64_64);
    let pkcs8 = aws_lc_rs::signature::EcdsaKeyPair::generate(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
    )
    .expect("P-256")
    .to_pkcs8v1()
    .expect("pkcs8");
    let wallet = STANDARD.encode(pkcs8.as_ref());
    let out = cbgate(
        ["check"],
        &[
            ("CDP_API_KEY_ID", key.name.as_str()),
            ("CDP_API_KEY_SECRET", key.secret.as_str()),
            ("CDP_WALLET_SECRET", wallet.as_str()),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("key: {}", key.name)), "{stdout}");
    assert!(stdout.contains("algorithm: EdDSA"), "{stdout}");
    assert!(stdout.contains("wallet secret: loaded"), "{stdout}");
    assert_no_secret(&stdout, &wallet);

    // The API key secret pasted where the wallet secret belongs.
    let out = cbgate(
        ["check"],
        &[
            ("CDP_API_KEY_ID", key.name.as_str()),
            ("CDP_API_KEY_SECRET", key.secret.as_str()),
            ("CDP_WALLET_SECRET", key.secret.as_str()),
        ],
    );
    assert_check_fails(&out, "CDP_WALLET_SECRET", &key.secret);

    let out = cbgate(["check"], &[("CDP_API_KEY_ID", key.name.as_str())]);
    assert_check_fails(&out, "CDP_API_KEY_SECRET", &key.secret);
}

// ---------------------------------------------------------------------------
// 4. Named credentials on the command line: token --key, check --online --key
// ---------------------------------------------------------------------------

const EX_SECRET: &str =
    "dGhpcyBpcyBhIHRlc3Qgc2VjcmV0IGZvciBjYmdhdGUncyBFeGNoYW5nZSBzaWduZXIsIDY0IGJ5dGVzIGxvbmchIQ==";

/// A cbgate.toml in `dir` with `[keys.bot]` (CDP, `bot`'s JSON), `[keys.ex]` (Exchange) and the
/// mock as upstream; returns its path.
fn named_keys_config(dir: &Path, up: &Upstream, bot: &TestKey) -> PathBuf {
    let bot_dir = dir.join("bot");
    std::fs::create_dir_all(&bot_dir).expect("mkdir");
    let bot_file = bot.write_json(&bot_dir);
    let ex_file = write_private(
        dir,
        "exchange.json",
        format!(r#"{{"key": "ex-key-1", "secret": "{EX_SECRET}", "passphrase": "ex-pass"}}"#)
            .as_bytes(),
    );
    let path = dir.join("cbgate.toml");
    std::fs::write(
        &path,
        format!(
            "[keys.bot]\nfile = {bot_file:?}\n[keys.ex]\nkind = \"exchange\"\nfile = {ex_file:?}\n\
             [upstream]\nca_file = {ca:?}\n[upstream.resolve]\n\"api.coinbase.com\" = \"{mock}\"\n",
            ca = up.ca_file,
            mock = up.mock.addr,
        ),
    )
    .expect("write config");
    path
}

#[tokio::test]
async fn token_key_mints_for_the_named_cdp_credential_and_refuses_hmac_kinds() {
    let default = TestKey::generate(KeyForm::P256Sec1);
    let bot = TestKey::generate(KeyForm::Ed25519B64_64);
    let up = Upstream::start(None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = named_keys_config(dir.path(), &up, &bot);
    let default_file = default.write_json(dir.path());
    let token = |key: Option<&str>| {
        let mut args: Vec<&OsStr> = vec![
            "token".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
            "--key-file".as_ref(),
            default_file.as_os_str(),
        ];
        if let Some(k) = key {
            args.extend([OsStr::new("--key"), OsStr::new(k)]);
        }
        args.extend([OsStr::new("GET"), OsStr::new("/api/v3/brokerage/accounts")]);
        cbgate(args, &[])
    };
    for (key, want) in [
        (Some("bot"), &bot),
        (None, &default),
        (Some("default"), &default),
    ] {
        let out = token(key);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{key:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let jwt = stdout.trim();
        let t = common::mock::verify_signature(&want.expected, jwt)
            .unwrap_or_else(|e| panic!("{key:?}: not signed by {}: {e}", want.name));
        assert_eq!(t.kid, want.name, "{key:?}");
        assert_eq!(
            t.claims["uri"],
            "GET api.coinbase.com/api/v3/brokerage/accounts"
        );
    }
    // An Exchange key has no token; an unknown name is named. Exit 2, one line, nothing on
    // stdout, no secret.
    for (key, phrase) in [
        ("ex", "--key ex is of kind exchange"),
        (
            "nope",
            "\"nope\", which is not configured; configured: default, bot, ex",
        ),
    ] {
        let out = token(Some(key));
        assert_check_fails(&out, phrase, EX_SECRET);
        assert_no_secret(&String::from_utf8_lossy(&out.stderr), &bot.secret);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_online_probes_every_cdp_credential_and_key_limits_it_to_one() {
    let default = TestKey::generate(KeyForm::P256Pkcs8);
    let bot = TestKey::generate(KeyForm::Ed25519B64_32);
    let portfolio = |uuid: &str, kind: &str, trade: bool| {
        json!({"can_view": true, "can_trade": trade, "can_transfer": false,
               "portfolio_uuid": uuid, "portfolio_type": kind})
    };
    let up = Upstream::start_with(common::mock::MockOptions {
        key: Some(default.expected.clone()),
        also_accept: vec![bot.expected.clone()],
        permissions: vec![
            (
                default.name.clone(),
                portfolio("11111111-aaaa", "DEFAULT", false),
            ),
            (
                bot.name.clone(),
                portfolio("22222222-bbbb", "CONSUMER", true),
            ),
        ],
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = named_keys_config(dir.path(), &up, &bot);
    let default_file = default.write_json(dir.path());
    let run = |key: Option<&'static str>| {
        let (cfg, default_file) = (cfg.clone(), default_file.clone());
        tokio::task::spawn_blocking(move || {
            let mut args: Vec<&OsStr> = vec![
                "check".as_ref(),
                "--online".as_ref(),
                "--config".as_ref(),
                cfg.as_os_str(),
                "--key-file".as_ref(),
                default_file.as_os_str(),
            ];
            if let Some(k) = key {
                args.extend([OsStr::new("--key"), OsStr::new(k)]);
            }
            cbgate(args, &[])
        })
    };
    let line = |name: &str, uuid: &str, kind: &str, trade: bool| {
        format!(
            "online: credential {name}: ok; portfolio_uuid: \"{uuid}\", portfolio_type: \"{kind}\"; can_view: true, can_trade: {trade}, can_transfer: false"
        )
    };
    let probes = || {
        up.mock
            .requests_to("GET", cbgate::ops::online::PERMISSIONS_PATH)
    };
    let out = run(None).await.expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    for want in [
        line("default", "11111111-aaaa", "DEFAULT", false),
        line("bot", "22222222-bbbb", "CONSUMER", true),
    ] {
        assert!(lines.contains(&want.as_str()), "{want:?} in\n{stdout}");
    }
    // The Exchange key is not probed (key_permissions is a CDP endpoint): two calls, one per
    // CDP credential, each signed by its own key.
    let kids: Vec<String> = probes()
        .iter()
        .map(|r| match &r.auth {
            AuthOutcome::Valid { kid, .. } => kid.clone(),
            other => panic!("not verified: {other:?}"),
        })
        .collect();
    assert_eq!(kids, [default.name.clone(), bot.name.clone()]);
    for secret in [&default.secret, &bot.secret] {
        assert_no_secret(&stdout, secret);
    }
    assert_no_secret(&stdout, EX_SECRET);

    // --key bot: that one only.
    let out = run(Some("bot")).await.expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l == line("bot", "22222222-bbbb", "CONSUMER", true)),
        "{stdout}"
    );
    assert!(!stdout.contains("credential default"), "{stdout}");
    assert_eq!(probes().len(), 3);
    assert!(matches!(&probes()[2].auth, AuthOutcome::Valid { kid, .. } if *kid == bot.name));

    // --key ex: not a CDP credential; nothing is sent, the reason is given, exit 1.
    let out = run(Some("ex")).await.expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("credential ex: of kind exchange: key_permissions is a CDP endpoint"),
        "{stderr}"
    );
    assert_eq!(probes().len(), 3);
    assert_no_secret(&stderr, EX_SECRET);
}
