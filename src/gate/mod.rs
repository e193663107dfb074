//! Gate: what decides whether a request may go, in the order the proxy asks: the client check
//! (Origin, Host), the client identity (token or Unix peer), the route, the policy ceiling, then for orders the kill switch
//! and the pre-trade guard. Imports `config` and `sign` only.

pub mod client;
pub mod guard;
pub mod halt;
pub mod identity;
pub mod policy;
pub mod route;
