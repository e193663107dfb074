//! Sign: the credentials (the one place that sees the secrets): CDP keys and their per-request
//! JWT, the CDP wallet secret's `X-Wallet-Auth`, and the Exchange/Prime/INTX HMAC signers.
//! Imports only `config`; everything above it asks here for a token and never sees the key.

pub mod hmac;
pub mod jwt;
pub mod key;
pub mod keys;
pub mod wallet;
