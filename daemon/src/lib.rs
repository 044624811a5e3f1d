//! What the two daemons that take replication streams share: the process server (from
//! agents) and the master target (relayed from the process server). The ingest step that
//! turns a batch into verified records, the one mapping of store errors to statuses, the
//! role checks on client certificates, and running store calls off the async runtime.

pub mod commit;
pub mod ingest;
pub mod roles;

use tern_store::StoreError;
use tonic::Status;

/// Which daemon answers: the advice for a full disk names its own data directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    ProcessServer,
    MasterTarget,
}

/// Runs a store call (SQLite, fsync, file reads) on the blocking pool, never on a runtime
/// thread.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(e.to_string()))
}

/// Maps a store error to a status: the code says whose fault it is, the message what to do.
pub fn store_status(e: StoreError, site: Site) -> Status {
    let msg = e.to_string();
    if e.is_storage_full() {
        return Status::resource_exhausted(match site {
            Site::ProcessServer => format!(
                "the process server's storage is full ({msg}): free space in its data directory or give it \
                 more; nothing acknowledged is lost, and replication resumes where it stopped once \
                 there is room"
            ),
            Site::MasterTarget => format!(
                "the master target's storage is full ({msg}): free space in its data directory or on the \
                 target disk's file system; the process server keeps the stream and resends"
            ),
        });
    }
    match e {
        StoreError::UnknownVm(_)
        | StoreError::UnknownDisk { .. }
        | StoreError::PointNotFound { .. }
        | StoreError::GroupNotFound(_) => Status::not_found(msg),
        StoreError::NoTestFailover(_)
        | StoreError::TestFailoverOpen { .. }
        | StoreError::DiskSizeChanged { .. }
        | StoreError::PointBeyondDurable { .. }
        | StoreError::Group(_)
        | StoreError::WrongState { .. } => Status::failed_precondition(msg),
        StoreError::SeqGap { .. } => Status::out_of_range(msg),
        StoreError::OutputExists(_)
        | StoreError::PointDisksMismatch { .. }
        | StoreError::VhdTooLarge { .. } => Status::invalid_argument(msg),
        StoreError::SegmentCorrupt { .. }
        | StoreError::JournalRecordBad { .. }
        | StoreError::JournalDamaged { .. }
        | StoreError::FingerprintMismatch { .. } => Status::data_loss(msg),
        StoreError::Io { .. }
        | StoreError::CatalogQuery { .. }
        | StoreError::JournalFailed { .. }
        | StoreError::VmDamaged { .. }
        | StoreError::DataDirInUse { .. }
        | StoreError::CatalogMissing { .. }
        | StoreError::CatalogBehind { .. }
        | StoreError::CatalogExists { .. }
        | StoreError::CatalogTooNew { .. }
        | StoreError::BadRow { .. }
        | StoreError::RebuildRefused { .. } => Status::unavailable(msg),
        StoreError::Invariant(_) | StoreError::Injected(_) => Status::internal(msg),
    }
}
