//! Gate: what decides whether a request may go, in the order the proxy asks: the client check
//! (Origin, Host), the client identity (token or Unix peer), the route, the policy ceiling, then
//! for orders the kill switch and the pre-trade guard, and the rate budget. Imports `config` and
//! `sign` only, and `ops::metrics` for the budget's metrics (a leaf).

pub mod budget;
pub mod client;
pub mod guard;
pub mod halt;
pub mod halt_shared;
pub mod identity;
pub mod policy;
pub mod route;
