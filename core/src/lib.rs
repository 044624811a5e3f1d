//! tern-core: the shared vocabulary of tern — names, ids, digests, block hashing,
//! the extent codec (hash + compress + verify), typed units and TLS identities.
//! No networking and no storage here.

pub mod backoff;
pub mod blocks;
pub mod codec;
pub mod disk;
pub mod ids;
pub mod lifecycle;
pub mod pki;
pub mod units;

pub use blocks::{BLOCK_SIZE, PAGE_SIZE, PAGES_PER_BLOCK};
pub use ids::{Digest, DiskName, GroupName, NameError, PlanName, PointId, Seq, VmName};
pub use lifecycle::{FailoverKind, Health, JobKind, JobState, SyncMode, VmState};
