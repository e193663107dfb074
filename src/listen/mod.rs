//! Listen: bound listeners (TCP, Unix), connection limits, header timeouts and the graceful
//! drain (`server`), and the request-smuggling guard in front of hyper (`sniff`).
//! `server` hands each request to `proxy`; `sniff` imports nothing of cbgate's. `tls` serves
//! TLS to clients (`https://` listeners, intercepted CONNECT tunnels) with certificates from
//! `tls.cert_file` or the local CA of `ca`; `proxy` holds the built `tls::TlsContext`.

pub mod ca;
pub mod server;
pub mod sniff;
pub mod tls;
pub mod workers;
