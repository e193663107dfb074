//! Gate: what decides whether a request may go, in the order the proxy asks: the client check
//! (token, Origin, Host), the route, the policy ceiling. Imports `config` and `sign` only.

pub mod client;
pub mod policy;
pub mod route;
