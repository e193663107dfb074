//! Sign: the API key (the one place that sees the secret) and the per-request JWT.
//! Imports only `config`; everything above it asks here for a token and never sees the key.

pub mod hmac;
pub mod jwt;
pub mod key;
pub mod keys;
