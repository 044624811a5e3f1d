//! One module per command family.

pub mod failback;
pub mod failover;
pub mod jobs;
pub mod protect;
