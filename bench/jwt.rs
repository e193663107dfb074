//! What one per-request JWT costs: cbgate's own minting (key pair parsed once) against
//! `jsonwebtoken::encode` (which re-parses the PKCS#8 DER on every call) and against the bare
//! signature over the same signing input, for ES256 and EdDSA.
//!
//! Run: `cargo bench --bench jwt -- --warm-up-time 1 --measurement-time 3`.
//!
//! Every token is checked once with `jsonwebtoken::decode` before anything is timed, so the
//! numbers cannot come from a path that produces garbage.

use std::hint::black_box;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use cbgate::sign::jwt::{self, Binding, ClaimStyle};
use cbgate::sign::key::{Algorithm, ApiKey};
use criterion::{criterion_group, criterion_main, Criterion};
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde::Serialize;

const KEY_NAME: &str = "organizations/00000000-0000-0000-0000-000000000000/apiKeys/00000000-0000-0000-0000-000000000000";

const BINDING: Binding<'static> = Binding {
    method: "GET",
    host: "api.coinbase.com",
    path: "/api/v3/brokerage/accounts",
};

/// The claims cbgate puts in a `ClaimStyle::Uri` token, for `jsonwebtoken::encode`.
#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iss: &'static str,
    nbf: u64,
    exp: u64,
    uri: String,
}

/// The nonce cbgate puts in its header: 32 random bytes as 64 lowercase hex characters.
fn hex_nonce() -> String {
    let mut raw = [0u8; 32];
    aws_lc_rs::rand::fill(&mut raw).expect("rng");
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in raw {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// What a proxy built on `jsonwebtoken` would do per request: a fresh header (with a fresh
/// nonce) and fresh claims, then `encode`. jsonwebtoken 11's `Header` does have a `nonce`
/// field (the ACME one, RFC 8555), so the nonce goes in the header as cbgate puts it; the field
/// order differs (`typ, alg, kid, nonce` against cbgate's `alg, kid, nonce, typ`) but the bytes
/// signed are the same length.
fn jsonwebtoken_token(alg: jsonwebtoken::Algorithm, key: &EncodingKey, now: u64) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(KEY_NAME.to_owned());
    header.nonce = Some(hex_nonce());
    let claims = Claims {
        sub: KEY_NAME,
        iss: "cdp",
        nbf: now,
        exp: now + jwt::LIFETIME_SECS,
        uri: format!("{} {}{}", BINDING.method, BINDING.host, BINDING.path),
    };
    jsonwebtoken::encode(&header, &claims, key).expect("jsonwebtoken::encode")
}

/// Decodes `token` with jsonwebtoken against the key's public key and checks what cbgate binds.
fn verify(token: &str, key: &ApiKey, now: u64) {
    let (alg, decoding) = match key.algorithm() {
        Algorithm::Es256 => {
            let pk = key.public_key();
            assert_eq!(pk.len(), 65, "uncompressed P-256 point");
            let x = URL_SAFE_NO_PAD.encode(&pk[1..33]);
            let y = URL_SAFE_NO_PAD.encode(&pk[33..]);
            (
                jsonwebtoken::Algorithm::ES256,
                DecodingKey::from_ec_components(&x, &y).expect("ec components"),
            )
        }
        Algorithm::EdDsa => (
            jsonwebtoken::Algorithm::EdDSA,
            DecodingKey::from_ed_der(key.public_key()),
        ),
    };
    let mut validation = Validation::new(alg);
    validation.set_issuer(&["cdp"]);
    validation.sub = Some(KEY_NAME.to_owned());
    validation.validate_nbf = true;
    let data = jsonwebtoken::decode::<serde_json::Value>(token, &decoding, &validation)
        .unwrap_or_else(|e| panic!("{alg:?} token does not verify: {e}"));
    assert_eq!(data.header.kid.as_deref(), Some(KEY_NAME));
    assert_eq!(data.header.nonce.as_ref().map(String::len), Some(64));
    assert_eq!(data.claims["nbf"], now);
    assert_eq!(data.claims["exp"], now + jwt::LIFETIME_SECS);
    assert_eq!(
        data.claims["uri"],
        "GET api.coinbase.com/api/v3/brokerage/accounts"
    );
}

/// The `header.claims` part of a token: the bytes its signature covers.
fn signing_input(token: &str) -> Vec<u8> {
    let (input, _signature) = token.rsplit_once('.').expect("three parts");
    input.as_bytes().to_vec()
}

fn es256(c: &mut Criterion) {
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("generate P-256");
    let pkcs8 = pair.to_pkcs8v1().expect("PKCS#8");
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        STANDARD.encode(pkcs8.as_ref())
    );
    let key = ApiKey::parse(KEY_NAME, &pem).expect("ApiKey::parse P-256 PKCS#8 PEM");
    assert_eq!(key.algorithm(), Algorithm::Es256);
    // jsonwebtoken 11's aws-lc signer calls `EcdsaKeyPair::from_pkcs8`: it wants PKCS#8, not SEC1.
    let encoding = EncodingKey::from_ec_der(pkcs8.as_ref());
    let now = jwt::now_secs(0);

    // Sanity checks, outside the timed loops.
    let token = jwt::mint(&key, now, ClaimStyle::Uri, &BINDING).expect("mint");
    verify(&token, &key, now);
    verify(
        &jsonwebtoken_token(jsonwebtoken::Algorithm::ES256, &encoding, now),
        &key,
        now,
    );
    let msg = signing_input(&token);
    let rng = SystemRandom::new();
    assert_eq!(pair.sign(&rng, &msg).expect("sign").as_ref().len(), 64);

    let mut g = c.benchmark_group("es256");
    g.bench_function("cbgate_mint", |b| {
        b.iter(|| {
            jwt::mint(
                black_box(&key),
                black_box(now),
                ClaimStyle::Uri,
                black_box(&BINDING),
            )
            .expect("mint")
        })
    });
    g.bench_function("jsonwebtoken_encode", |b| {
        b.iter(|| {
            jsonwebtoken_token(
                jsonwebtoken::Algorithm::ES256,
                black_box(&encoding),
                black_box(now),
            )
        })
    });
    g.bench_function("bare_signature", |b| {
        b.iter(|| pair.sign(&rng, black_box(&msg)).expect("sign"))
    });
    g.finish();
}

fn eddsa(c: &mut Criterion) {
    let mut seed = [0u8; 32];
    aws_lc_rs::rand::fill(&mut seed).expect("rng");
    let key = ApiKey::parse(KEY_NAME, &STANDARD.encode(seed)).expect("ApiKey::parse seed");
    assert_eq!(key.algorithm(), Algorithm::EdDsa);
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed).expect("seed");
    // jsonwebtoken 11's aws-lc signer calls `Ed25519KeyPair::from_pkcs8`, which takes PKCS#8 v1
    // (what `openssl genpkey -algorithm ED25519` writes) or v2; v1 is the smaller parse.
    let pkcs8 = pair.to_pkcs8v1().expect("PKCS#8");
    let encoding = EncodingKey::from_ed_der(pkcs8.as_ref());
    let now = jwt::now_secs(0);

    let token = jwt::mint(&key, now, ClaimStyle::Uri, &BINDING).expect("mint");
    verify(&token, &key, now);
    verify(
        &jsonwebtoken_token(jsonwebtoken::Algorithm::EdDSA, &encoding, now),
        &key,
        now,
    );
    let msg = signing_input(&token);
    // Ed25519 is deterministic: the same key signs the same bytes the same way.
    let (_, cbgate_signature) = token.rsplit_once('.').expect("three parts");
    assert_eq!(
        URL_SAFE_NO_PAD.encode(pair.sign(&msg).as_ref()),
        cbgate_signature
    );

    let mut g = c.benchmark_group("eddsa");
    g.bench_function("cbgate_mint", |b| {
        b.iter(|| {
            jwt::mint(
                black_box(&key),
                black_box(now),
                ClaimStyle::Uri,
                black_box(&BINDING),
            )
            .expect("mint")
        })
    });
    g.bench_function("jsonwebtoken_encode", |b| {
        b.iter(|| {
            jsonwebtoken_token(
                jsonwebtoken::Algorithm::EdDSA,
                black_box(&encoding),
                black_box(now),
            )
        })
    });
    g.bench_function("bare_signature", |b| b.iter(|| pair.sign(black_box(&msg))));
    g.finish();
}

criterion_group!(benches, es256, eddsa);
criterion_main!(benches);
