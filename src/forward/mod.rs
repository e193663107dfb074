//! Forward: header hygiene, the verified TLS client to Coinbase, the WebSocket relay, and the
//! watch on upstream `Date` headers. Imports `config`, `sign`, `gate`, `ops::metrics`, `error`.

pub mod body_timeout;
pub mod date_watch;
pub mod gateway;
pub mod headers;
pub mod price;
pub mod upstream;
pub mod ws;
