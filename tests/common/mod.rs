pub mod harness;
pub mod mock;
pub mod provision;
pub mod ws_mock;
