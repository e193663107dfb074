pub mod harness;
pub mod mock;
pub mod ws_mock;
