//! Listen: bound listeners (TCP, Unix), connection limits, header timeouts and the graceful
//! drain (`server`), and the request-smuggling guard in front of hyper (`sniff`).
//! `server` hands each request to `proxy`; `sniff` imports nothing of cbgate's.

pub mod server;
pub mod sniff;
