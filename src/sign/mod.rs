//! Sign: the API key (the one place that sees the secret), the per-request JWT, and the CDP
//! wallet secret with its `X-Wallet-Auth` token.
//! Imports only `config`; everything above it asks here for a token and never sees the key.

pub mod jwt;
pub mod key;
pub mod wallet;
