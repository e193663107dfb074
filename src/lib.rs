//! cbgate: a local authenticating gateway for the Coinbase APIs.
//!
//! A client sends a plain HTTP request to cbgate; cbgate signs it with a fresh per-request JWT
//! and forwards it over verified TLS to Coinbase, streaming the answer back. The API secret
//! never leaves this process.
//!
//! The folders follow a request's journey; [`proxy`] runs the phases in order:
//!
//! | phase                                   | room          | what lives there                                   |
//! |-----------------------------------------|---------------|----------------------------------------------------|
//! | configuration, parsed once              | [`config`]    | typed structs, layering, validation; imports nothing of cbgate's |
//! | accept                                  | [`listen`]    | listeners, connection limits, drain; smuggling guard; TLS to clients, local CA, CONNECT interception |
//! | check client -> route -> policy -> budget | [`gate`]    | Origin/Host, client identities, routes, ceilings, rate budget |
//! | sign                                    | [`sign`]      | the API key (the one place that sees the secret), JWTs |
//! | forward -> stream back                  | [`forward`]   | header hygiene, upstream TLS pool, WebSocket relay, `Date` watch |
//! | log, metrics, readiness                 | [`ops`]       | metrics, readiness, hardening; admin, clock, key reload, online check |
//! | the phases in order                     | [`proxy`]     | [`proxy::Proxy::handle`]                           |
//! | cbgate's own error responses            | [`error`]     | one status and one message per error               |
//!
//! Imports point down the table's flow and never back: `config` imports nothing, `sign` only
//! `config`, `gate` `config` and `sign` (and `ops::metrics`, a leaf, for the rate budget's
//! metrics), `forward` those plus `ops::metrics`, `proxy` all of
//! them; `ops::{admin, clock, reload, online}` and `listen::server` drive a built [`proxy::Proxy`]
//! and nothing below imports them. The binary (`src/main.rs`, subcommands in `src/cli/`) loads
//! the configuration and key, binds the listeners and calls [`listen::server::run`], which
//! takes already-bound listeners and a shutdown future so that tests can drive it directly.

pub mod config;
pub mod error;
pub mod forward;
pub mod gate;
pub mod listen;
pub mod ops;
pub mod proxy;
pub mod sign;

/// Body type used in both directions: streamed, boxed, with a boxed error.
pub type Body = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;

/// Boxed error for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
