//! `cbgate placeholder-key`: a throwaway credential that the client libraries accept.
//!
//! The SDKs refuse to start, or to make a private call, without a key they can parse, and they
//! sign every request themselves. cbgate removes whatever they send (`Authorization`, the HMAC
//! headers, `X-Wallet-Auth` when it holds the wallet secret, subscribe `jwt`s) and signs with
//! the real key, so the client can be given this instead: a fresh key that no Coinbase account
//! knows, named so that nobody mistakes it for a real one. It is printed, because it guards
//! nothing.

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use clap::Args;
use zeroize::Zeroizing;

/// `cbgate placeholder-key` flags.
#[derive(Args, Debug)]
pub struct PlaceholderArgs {
    /// An Ed25519 key instead (`{"id", "privateKey": base64 of 64 bytes}`), as the CDP
    /// portal's default keys: for CDP_API_KEY_ID / CDP_API_KEY_SECRET.
    #[arg(long, conflicts_with_all = ["pkcs8", "wallet_secret"])]
    pub ed25519: bool,
    /// The P-256 key as PKCS#8 (`BEGIN PRIVATE KEY`), which @coinbase/cdp-sdk needs, instead
    /// of SEC1 (`BEGIN EC PRIVATE KEY`), which coinbase-advanced-py and ccxt need.
    #[arg(long, conflicts_with = "wallet_secret")]
    pub pkcs8: bool,
    /// A CDP Wallet Secret instead (base64 of a DER PKCS#8 P-256 key): for CDP_WALLET_SECRET.
    #[arg(long)]
    pub wallet_secret: bool,
}

/// A random key name segment, `placeholder-<uuid-like hex>`.
fn placeholder_id() -> anyhow::Result<String> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| anyhow::anyhow!("the random generator failed"))?;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "placeholder-{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = Zeroizing::new(STANDARD.encode(der));
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The placeholder as it is printed.
pub fn generate(args: &PlaceholderArgs) -> anyhow::Result<String> {
    let fail = |what: &str| anyhow::anyhow!("generating the placeholder key failed ({what})");
    if args.wallet_secret {
        let pair =
            EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).map_err(|_| fail("P-256"))?;
        let der = pair.to_pkcs8v1().map_err(|_| fail("PKCS#8"))?;
        return Ok(format!("{}\n", STANDARD.encode(der.as_ref())));
    }
    let id = placeholder_id()?;
    let json = if args.ed25519 {
        let mut seed = Zeroizing::new([0u8; 32]);
        aws_lc_rs::rand::fill(&mut seed[..]).map_err(|_| fail("random"))?;
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed[..]).map_err(|_| fail("Ed25519"))?;
        let mut both = Zeroizing::new(seed.to_vec());
        both.extend_from_slice(pair.public_key().as_ref());
        serde_json::json!({ "id": id, "privateKey": STANDARD.encode(&both[..]) })
    } else {
        let pair =
            EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).map_err(|_| fail("P-256"))?;
        let key = if args.pkcs8 {
            pem(
                "PRIVATE KEY",
                pair.to_pkcs8v1().map_err(|_| fail("PKCS#8"))?.as_ref(),
            )
        } else {
            pem(
                "EC PRIVATE KEY",
                pair.private_key()
                    .as_der()
                    .map_err(|_| fail("SEC1"))?
                    .as_ref(),
            )
        };
        serde_json::json!({
            "name": format!("organizations/placeholder/apiKeys/{id}"),
            "privateKey": key,
        })
    };
    Ok(format!("{}\n", serde_json::to_string_pretty(&json)?))
}

/// Prints the placeholder on stdout.
pub fn run(args: PlaceholderArgs) -> Result<(), super::Failure> {
    use std::io::Write as _;
    let text = generate(&args).map_err(super::Failure::Runtime)?;
    std::io::stdout()
        .write_all(text.as_bytes())
        .map_err(|e| super::Failure::Runtime(e.into()))
}
