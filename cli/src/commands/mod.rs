//! One module per command family.

pub mod failback;
pub mod failover;
pub mod group;
pub mod identity;
pub mod jobs;
pub mod plan;
pub mod protect;
