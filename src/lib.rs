//! cbgate: a local authenticating reverse proxy for the Coinbase APIs.
//!
//! A client sends a plain HTTP request to cbgate; cbgate signs it with a fresh per-request JWT
//! and forwards it over verified TLS to Coinbase, streaming the answer back. The API secret
//! never leaves this process.
//!
//! A request goes through named phases, one module each:
//!
//! | phase / concern                                        | module       |
//! |--------------------------------------------------------|--------------|
//! | configuration, parsed once into typed structs          | [`config`]   |
//! | the API key (the one place that sees the secret)       | [`key`]      |
//! | process hardening (no core, not dumpable, mlock)       | [`harden`]   |
//! | accept: listeners, connection limits, graceful drain   | [`server`]   |
//! | refuse request-smuggling shapes before hyper parses    | [`sniff`]    |
//! | the request path: runs the phases below, logs, metrics | [`proxy`]    |
//! | check client (token, Origin, Host)                     | [`client`]   |
//! | route                                                  | [`route`]    |
//! | policy (permission ceiling, canonical paths)           | [`policy`]   |
//! | sign                                                   | [`jwt`]      |
//! | forward: header hygiene                                | [`headers`]  |
//! | forward: upstream TLS and connection pool              | [`upstream`] |
//! | WebSocket relay (signs subscribe messages)             | [`ws`]       |
//! | cbgate's own error responses                           | [`error`]    |
//! | admin listener: /livez, /readyz, /metrics              | [`admin`]    |
//! | metrics registry                                       | [`metrics`]  |
//! | key rotation (SIGHUP, file watch)                      | [`reload`]   |
//! | clock skew against Coinbase                            | [`clock`]    |
//! | `cbgate check --online`                                | [`check`]    |
//!
//! The binary (`src/main.rs`) only parses flags, loads the configuration and key, binds the
//! listeners and calls [`server::run`], which takes already-bound listeners and a shutdown
//! future so that tests can drive it directly.

pub mod admin;
pub mod check;
pub mod client;
pub mod clock;
pub mod config;
pub mod error;
pub mod harden;
pub mod headers;
pub mod jwt;
pub mod key;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod server;
pub mod sniff;
pub mod upstream;
pub mod ws;

/// Body type used in both directions: streamed, boxed, with a boxed error.
pub type Body = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;

/// Boxed error for bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
