//! Ops: what runs beside the request path. Leaves the proxy uses (`metrics`, `readiness`,
//! `harden`, `audit`) import nothing above them; the tasks that drive a built proxy (`admin`,
//! `cancel`, `clock`, `reload`, `online`) import `proxy` and are imported by nothing but the binary.

pub mod admin;
pub mod audit;
pub mod cancel;
pub mod clock;
pub mod harden;
pub mod logbuf;
pub mod metrics;
pub mod online;
pub mod readiness;
pub mod reload;
