pub mod harness;
pub mod mock;
pub mod provision;
pub mod redis_server;
pub mod ws_mock;
