pub mod harness;
pub mod mock;
