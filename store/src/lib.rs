//! tern-store: each replicated disk as a sparse base image plus an append-only journal of
//! segment files, a SQLite catalog of VMs, disks and recovery points, and materialisation
//! of a disk at a point.
//!
//! # Invariants (MUST hold after any crash)
//! 1. A record is acked to its sender only after [`Journal::sync`] covered it: nothing
//!    acked is lost. Records that were written but not synced may be cut at the next open.
//! 2. Data before index before commit point: a point enters the catalog only after the
//!    records it covers and its bookmark records are fsynced.
//! 3. Files that are not appended to are published with [`durable::publish`]: write a
//!    temporary file, fsync, rename, fsync the folder.
//! 4. Every record describes itself (magic, kind, seq, lengths, digest, check): the
//!    journal is read back, and cut at a torn tail, from the data alone; a bookmark record
//!    holds everything the catalog knows of its point.
//! 5. Every read that leaves the process is verified: journal records against their check
//!    and digest, a materialised disk against its point's fingerprint. What fails is kept
//!    (`.torn` files) and reported, never silently dropped.
//! 6. An incoming batch is verified whole before any of it is written.
//!
//! # What may run together
//! Locks are taken in one order and never held the other way round: a disk's retention
//! lock, then that disk's journal lock, then the catalog lock. The catalog lock is never
//! held while a journal lock is awaited or a journal is fsynced; no two disks' journal locks
//! are held at once. The locks are the store's own: its callers use operations.
//!
//! | operation | takes | runs alongside |
//! | --- | --- | --- |
//! | ingest (append, sync) of disk D | D's journal lock, for the write | everything; other disks' ingest |
//! | make a point of VM V | each disk's journal lock briefly (durable check), the catalog briefly (an id), each disk's journal lock in name order (bookmark + sync), then the catalog lock (insert) | ingest of other VMs |
//! | retention / commit of disk D | D's retention lock exclusively; within it D's journal lock (snapshot, segment deletion) and the catalog lock (base position), each briefly | ingest of D, everything else |
//! | materialise (test failover) | D's journal lock only to take a snapshot, then nothing (the zero-subtree table's lock briefly, to open a view of it) | ingest and points of the same disk |
//! | zero-subtree warm-up | the table's lock, for one step (1 GiB of disk, 0.25-0.6 CPU-s) | everything |
//! | catalog queries | the catalog lock, briefly | everything |
//! | written_after (a new session's doubtful ranges) | D's journal lock to copy the segments' summaries (a few KiB each) and take a snapshot of the segments they do not cover, then nothing (a segment retention deletes meanwhile gives `None`) | everything |
//! | the whole store | an exclusive flock on `DIR/lock` while open | nothing else in another process |

mod catalog;
pub mod durable;
mod failover;
mod format;
mod journal;
mod materialize;
mod position;
mod rebuild;
pub mod reserve;
mod retention;
mod write_through;
mod written;
pub mod zero_subtrees;

pub use catalog::{
    Between, Consistency, FailoverRow, GroupRow, JOBS_KEPT_MS, JOBS_KEPT_PER_KIND, JobRow, MAX_RETENTION_MS,
    PlanRow, Point, PointDisk, Policy, ReprotectRow, SCHEMA_VERSION, TestFailoverRow, Transition,
};
pub use failover::VerifiedDisk;
pub use format::{RecordKind, TimeRuns};
pub use journal::{
    JournalSnapshot, ReadPosition, Record, RecordProblem, StoredRecord, decode_record, verify_record,
};
pub use materialize::{
    Format, HASHES_PER_CHUNK, HashedCopy, OutputDisk, base_block_hashes, fingerprint_file, hash_disk,
};
pub use position::Position;
pub use rebuild::{RebuildReport, RebuiltDisk, RebuiltVm, rebuild_catalog};
pub use retention::{RetentionReport, plan_run_pins};
pub use write_through::PlainRecord;

use catalog::Catalog;
use journal::Journal;

use durable::{create_dir_durable, io_err};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use tern_core::codec::CodecError;
use tern_core::{Digest, DiskName, GroupName, PointId, Seq, VmName};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("segment {path} is corrupt at byte {offset}: {reason}")]
    SegmentCorrupt { path: String, offset: u64, reason: String },
    #[error("journal record {seq} of disk {disk} is damaged: {reason}")]
    JournalRecordBad { disk: String, seq: Seq, reason: CodecError },
    #[error("expected sequence number {expected}, got {got}; resend from {expected}")]
    SeqGap { expected: Seq, got: Seq },
    #[error("VM {0} is not protected here")]
    UnknownVm(VmName),
    #[error("VM {vm} has no disk {disk}")]
    UnknownDisk { vm: VmName, disk: String },
    #[error(
        "disk {disk} of VM {vm} was {was} bytes and is now {now}; a resized disk cannot be replicated into the \
         same copy (a scan-mode agent asks again every few seconds; an nbd-mode agent serves the size it \
         opened until it is restarted). Resized by mistake, or for a moment (a copy in place): put it back \
         to {was} bytes and replication goes on. To protect it at its new size, remove \
         the VM's copy here (`drctl remove {vm} --delete-points`: its recovery points go; fail over or \
         test-fail over first if one is still needed): the agent then restarts (its unit starts it again) \
         and syncs the disks anew"
    )]
    DiskSizeChanged { vm: VmName, disk: DiskName, was: u64, now: u64 },
    #[error("a point must cover every disk of VM {vm}: {reason}")]
    PointDisksMismatch { vm: VmName, reason: String },
    #[error("point covers seq {seq} of disk {disk}, but only {durable} is durable")]
    PointBeyondDurable { disk: String, seq: Seq, durable: Seq },
    /// A replication group change or lookup that cannot be done; the text says why.
    #[error("{0}")]
    Group(String),
    /// The group, or the VM a group change names, does not exist (or is not a member).
    #[error("{0}")]
    GroupNotFound(String),
    #[error("VM {vm} has no point {wanted}; {available}")]
    PointNotFound { vm: VmName, wanted: String, available: String },
    #[error("disk {disk}: the materialised image has fingerprint {actual}, the point says {expected}")]
    FingerprintMismatch { disk: String, expected: Digest, actual: Digest },
    #[error(
        "VM {vm} already has an open test failover (point {point}, in {output}); run `drctl test-failover-cleanup {vm}` first"
    )]
    TestFailoverOpen { vm: VmName, point: PointId, output: String },
    #[error("VM {0} has no open test failover")]
    NoTestFailover(VmName),
    #[error("{0} already exists; choose an empty output directory or remove it")]
    OutputExists(String),
    #[error(
        "disk {disk} is {size} bytes: a VHD holds at most 2040 GiB (qemu and Hyper-V refuse a larger one); use --format raw"
    )]
    VhdTooLarge { disk: String, size: u64 },
    #[error("catalog: {op} failed: {reason}")]
    CatalogQuery {
        op: &'static str,
        reason: String,
        /// SQLite found its file system full.
        full: bool,
    },
    #[error("internal invariant broken: {0}")]
    Invariant(&'static str),
    #[error("VM {vm} is {state}; {what}")]
    WrongState { vm: VmName, state: String, what: String },
    #[error("fail point {0} hit")]
    Injected(&'static str),
    #[error(
        "the journal in {dir} could not be made durable ({reason}); nothing more is written to it: \
         check the storage, then restart the daemon, which checks the journal and asks the sender \
         for what is missing"
    )]
    JournalFailed { dir: String, reason: String },
    #[error("{dir} is in use by another process (its lock file is held): stop the other daemon first")]
    DataDirInUse { dir: String },
    #[error(
        "{dir} holds replicated data (vms/) but no catalog (catalog.db): refusing to start empty, which \
         would forget every recovery point. Restore catalog.db (with catalog.db-wal, if any) from a backup, \
         or rebuild it from the journals: `process-server check --data-dir {dir} --rebuild-catalog`"
    )]
    CatalogMissing { dir: String },
    #[error(
        "{dir} holds replicated data of VM(s) {vms} that its catalog (catalog.db) does not know: restored \
         without its catalog.db-wal, or from a backup older than that data? Refusing to start, as their agents \
         would sync them anew over the journals that hold their points. Restore catalog.db together with \
         catalog.db-wal (copy both with the server stopped), or move catalog.db, catalog.db-wal and \
         catalog.db-shm aside and rebuild it: `process-server check --data-dir {dir} --rebuild-catalog`"
    )]
    CatalogBehind { dir: String, vms: String },
    #[error(
        "catalog row {table}[{key}] does not decode ({reason}); restore catalog.db from a backup, or move it \
         away and rebuild it with `process-server check --rebuild-catalog`"
    )]
    BadRow { table: &'static str, key: String, reason: String },
    #[error(
        "{path} was written by a newer tern (catalog version {version}; this one knows up to {known}): run \
         the newer version"
    )]
    CatalogTooNew { path: String, version: i64, known: i64 },
    #[error("{path} exists: a rebuild never replaces a catalog; move it away first if it is damaged")]
    CatalogExists { path: String },
    #[error("cannot rebuild the catalog: {path} {reason}; nothing was written")]
    RebuildRefused { path: String, reason: String },
    #[error("VM {vm}'s stored data could not be opened ({reason}); repair it and restart the process server")]
    VmDamaged { vm: VmName, reason: String },
    #[error("VM {vm}: {reason}")]
    JournalDamaged { vm: VmName, reason: String },
}

impl StoreError {
    /// A data directory this version can never open (a newer one wrote it): no restart
    /// mends it.
    pub fn is_for_good(&self) -> bool {
        matches!(self, StoreError::CatalogTooNew { .. } | StoreError::CatalogBehind { .. })
    }

    /// The file system under the data directory is full (or over its quota): not damage,
    /// and it passes once space is freed.
    pub fn is_storage_full(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => {
                matches!(source.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
            }
            StoreError::CatalogQuery { full, .. } => *full,
            _ => false,
        }
    }
}

#[cfg(any(test, feature = "failpoints"))]
thread_local! {
    static FAILPOINT: std::cell::RefCell<Option<&'static str>> = const { std::cell::RefCell::new(None) };
}

/// Arms a named fail point for the calling thread (tests and the `failpoints` feature).
#[cfg(any(test, feature = "failpoints"))]
pub fn set_failpoint(name: Option<&'static str>) {
    FAILPOINT.with(|f| *f.borrow_mut() = name);
}

/// Returns `Injected` when the named fail point is armed: the caller stops as a crash would.
/// With the `failpoints` feature, `TERN_CRASH_AT=<name>` in the environment makes the
/// process abort there instead, like a kill -9 at that exact step (end-to-end crash tests).
pub(crate) fn failpoint(name: &'static str) -> Result<(), StoreError> {
    #[cfg(any(test, feature = "failpoints"))]
    if FAILPOINT.with(|f| *f.borrow() == Some(name)) {
        return Err(StoreError::Injected(name));
    }
    #[cfg(feature = "failpoints")]
    if std::env::var("TERN_CRASH_AT").is_ok_and(|v| v == name) {
        tracing::error!(failpoint = name, "crashing on purpose (TERN_CRASH_AT)");
        std::process::abort();
    }
    let _ = name;
    Ok(())
}

/// One replicated disk: its base image and its journal. Its locks are the store's own:
/// callers use its operations.
#[derive(Debug)]
pub struct DiskHandle {
    pub vm: VmName,
    pub name: DiskName,
    pub size: u64,
    /// Identifies this copy of the disk; a sender's state is only valid for it.
    generation: Mutex<String>,
    pub base_path: PathBuf,
    journal: Mutex<Journal>,
    /// The journal's durable seq, mirrored whenever the journal's lock is let go: read
    /// without waiting behind an append or an fsync (status, relays, acks).
    durable: std::sync::atomic::AtomicU64,
    /// The journal's size in bytes, mirrored the same way.
    journal_bytes: std::sync::atomic::AtomicU64,
    /// Records up to this seq are in the base image.
    base_seq: Mutex<Seq>,
    /// Readers of the base image and segments (materialisation) share it; moving the base
    /// and deleting segments (retention, commit) takes it exclusively.
    retention: std::sync::RwLock<()>,
    /// A record a read found damaged since the journal was opened (its segment's first seq,
    /// its byte offset), noted in the journal's `damaged` mark for the next open to cut.
    damage: Mutex<Option<(u64, u64)>>,
    /// The data directory's space reserve: a new record waits while it is given up and
    /// space is short.
    reserve: Arc<reserve::Reserve>,
}

/// The journal's lock; letting it go publishes the durable seq to [`DiskHandle::durable`].
pub(crate) struct JournalGuard<'a> {
    guard: MutexGuard<'a, Journal>,
    handle: &'a DiskHandle,
}

impl std::ops::Deref for JournalGuard<'_> {
    type Target = Journal;
    fn deref(&self) -> &Journal {
        &self.guard
    }
}

impl std::ops::DerefMut for JournalGuard<'_> {
    fn deref_mut(&mut self) -> &mut Journal {
        &mut self.guard
    }
}

impl Drop for JournalGuard<'_> {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Release;
        self.handle.durable.store(self.guard.durable().0, Release);
        self.handle.journal_bytes.store(self.guard.bytes(), Release);
    }
}

impl DiskHandle {
    pub(crate) fn journal(&self) -> JournalGuard<'_> {
        JournalGuard { guard: self.journal.lock().unwrap_or_else(|p| p.into_inner()), handle: self }
    }

    /// The last record that is fsynced. Never waits: safe on an async runtime thread.
    pub fn durable(&self) -> Seq {
        Seq(self.durable.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Appends `records`, numbered from `first_seq`, without syncing; returns the last seq.
    pub fn append(&self, first_seq: Seq, records: &[Record]) -> Result<Seq, StoreError> {
        self.append_timed(first_seq, records, &[])
    }

    /// [`DiskHandle::append`], then a time record with when the source wrote each record
    /// (`times`, one per record; empty when not known).
    pub fn append_timed(&self, first_seq: Seq, records: &[Record], times: &[i64]) -> Result<Seq, StoreError> {
        self.reserve.admit()?;
        let mut j = self.journal();
        let last = j.append(first_seq, records)?;
        if !times.is_empty() && times.len() == records.len() {
            j.append_times(&TimeRuns::of(first_seq.0, times))?;
        }
        Ok(last)
    }

    /// Makes everything appended durable (the group commit); returns the durable seq.
    pub fn sync(&self) -> Result<Seq, StoreError> {
        self.journal().sync()
    }

    /// Whether every record after `seq` was appended by this process (see
    /// [`Store::resolve_position`] after the newest point).
    pub(crate) fn appended_here_after(&self, seq: Seq) -> bool {
        self.journal().appended_here_after(seq)
    }

    /// The durable records at this moment, for a reader that does not hold the journal.
    pub fn snapshot(&self) -> JournalSnapshot {
        self.journal().snapshot()
    }

    /// The journal's size in bytes. Never waits.
    pub fn journal_bytes(&self) -> u64 {
        self.journal_bytes.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The number of journal segment files.
    pub fn segment_count(&self) -> usize {
        self.journal().segment_count()
    }

    /// Identifies this copy of the disk and its replication epoch; a sender's saved state
    /// is only valid for the same generation.
    pub fn generation(&self) -> String {
        self.generation.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A read found a record of this disk's journal damaged (`e` is a segment that fails
    /// its checks): noted in the journal, so that the next open cuts it there (the points
    /// past it are removed and the disk resynced from its agent), and meanwhile no point is
    /// made and no retention runs on the VM.
    pub(crate) fn note_damage(&self, e: &StoreError) {
        let StoreError::SegmentCorrupt { path, offset, reason } = e else { return };
        tracing::error!(vm = %self.vm, disk = %self.name, segment = %path, offset, reason = %reason,
            "a journal record is damaged (storage bit rot): the points past it cannot be recovered; \
             restart the process server to cut the journal there and resync the disk from its agent");
        let known = *self.damage.lock().unwrap_or_else(|p| p.into_inner());
        match self.journal().note_damage(path, *offset, known, self.base_seq()) {
            Ok(None) => tracing::error!(vm = %self.vm, disk = %self.name, segment = %path,
                "the damaged segment also holds records the base image holds: it is not cut; verify the \
                 points (`drctl verify`) and check the disk under the data directory"),
            Ok(d) => *self.damage.lock().unwrap_or_else(|p| p.into_inner()) = d,
            Err(e) => {
                tracing::error!(vm = %self.vm, disk = %self.name, error = %e, "cannot note the journal's damage");
            }
        }
    }

    /// The journal's records are all gone (a commit, a removal): so is a damage noted in them.
    pub(crate) fn forget_damage(&self) {
        *self.damage.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// What a read found damaged in this disk's journal, for the operator.
    pub fn journal_damage(&self) -> Option<String> {
        let (first, offset) = (*self.damage.lock().unwrap_or_else(|p| p.into_inner()))?;
        Some(format!(
            "the journal of disk {} is damaged (segment {first:020}.seg, byte {offset}): the points past it \
             cannot be recovered, and no point is made until the process server is restarted, which cuts \
             the journal there and resyncs the disk from its agent (the points before the damage stay)",
            self.name
        ))
    }

    pub fn base_seq(&self) -> Seq {
        *self.base_seq.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.retention.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.retention.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes this disk takes: allocated base image plus journal.
    pub fn bytes_used(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let base = std::fs::metadata(&self.base_path).map_or(0, |m| m.blocks() * 512);
        base + self.journal_bytes()
    }
}

/// Which point a failover or test failover uses. `latest` (make a point of everything
/// received first) is resolved by the process server, which then asks for `LatestProcessed`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PointSpec {
    Latest,
    LatestProcessed,
    LatestApp,
    /// The newest multi-VM point the VM's replication group has in common (a VM in no
    /// group: its latest processed point).
    LatestMultiVm,
    /// The same, of app-consistent multi-VM points (a VM in no group: its latest app point).
    LatestMultiVmApp,
    Id(PointId),
    /// The newest point at or before this Unix time in milliseconds.
    Time(i64),
    /// Everything this server has received: the journal's durable end, when every record
    /// after the newest point carries the time it was written (`--mode nbd`), else the
    /// newest point. What `latest` becomes when no point can be made (the agent gone).
    Received,
}

/// A cut an agent made, not yet a point: what [`Store::make_group_point`] takes per member.
#[derive(Clone, Debug)]
pub struct NewPoint {
    pub vm: VmName,
    pub time_ms: i64,
    pub consistency: Consistency,
    pub note: String,
    pub disks: Vec<PointDisk>,
}

impl PointSpec {
    pub fn parse(s: &str) -> Option<PointSpec> {
        match s {
            "latest" => Some(PointSpec::Latest),
            "latest-processed" => Some(PointSpec::LatestProcessed),
            "latest-app" => Some(PointSpec::LatestApp),
            "latest-multi-vm" => Some(PointSpec::LatestMultiVm),
            "latest-multi-vm-app" => Some(PointSpec::LatestMultiVmApp),
            _ => {
                if let Ok(n) = s.parse::<u64>() {
                    return Some(PointSpec::Id(PointId(n)));
                }
                let t =
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
                i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok().map(PointSpec::Time)
            }
        }
    }
}

impl std::fmt::Display for PointSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PointSpec::Latest => f.write_str("latest"),
            PointSpec::LatestProcessed => f.write_str("latest-processed"),
            PointSpec::LatestApp => f.write_str("latest-app"),
            PointSpec::LatestMultiVm => f.write_str("latest-multi-vm"),
            PointSpec::LatestMultiVmApp => f.write_str("latest-multi-vm-app"),
            PointSpec::Received => f.write_str("latest (everything received)"),
            PointSpec::Id(id) => write!(f, "{id}"),
            PointSpec::Time(ms) => f.write_str(&rfc3339(*ms)),
        }
    }
}

/// Options for opening a store.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreOptions {
    /// Close journal segments past this size (default 256 MiB).
    pub segment_bytes: Option<u64>,
    /// The space reserve's size ([`reserve`]); `Some(0)`: none, and a file left is removed;
    /// `None`: none, and the file is left alone.
    pub reserve_bytes: Option<u64>,
}

impl Store {
    /// The size past which journal segments close (`--segment-size`): journals are freed a
    /// segment at a time.
    pub fn segment_bytes(&self) -> u64 {
        self.options.segment_bytes.unwrap_or(journal::SEGMENT_TARGET_BYTES)
    }
}

/// The layout version of `vm.json`; it grows when a field changes meaning or goes.
pub const MANIFEST_SCHEMA: u32 = 1;

/// The outcome of a test failover, also written as `vm.json` in the output directory.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FailoverOutput {
    /// The layout of `vm.json` ([`MANIFEST_SCHEMA`]): a reader refuses a newer one.
    pub schema: u32,
    /// The tern that wrote it.
    pub tern_version: &'static str,
    pub vm: String,
    /// The point written, or for a time between two points the earlier of them.
    pub point: u64,
    pub time: String,
    pub time_ms: i64,
    pub consistency: String,
    /// For a time between two points: those points. Its disks are the journal position
    /// of that moment (crash-consistent), checked record by record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub between_points: Option<[u64; 2]>,
    /// How the point was chosen, when that is not plain.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
    pub disks: Vec<OutputDisk>,
}

/// Free space under which a recovery action gives up the space reserve for its catalog
/// rows ([`Store::room_for_recovery`]).
pub const RECOVERY_ROOM: u64 = 8 << 20;

#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    catalog: Mutex<Catalog>,
    disks: Mutex<HashMap<(VmName, DiskName), Arc<DiskHandle>>>,
    options: StoreOptions,
    /// VMs whose data could not be opened, and why: they are left alone (not replicated,
    /// not failed over) while the others go on.
    damaged: HashMap<VmName, String>,
    /// Counts changes of VMs' states (transitions, VMs added or forgotten), so that a
    /// daemon watching states reads the catalog only after one.
    state_epoch: std::sync::atomic::AtomicU64,
    /// The values of zero subtrees that outputs' whole-disk BLAKE3 takes for holes.
    zeroes: zero_subtrees::ZeroSubtrees,
    /// Room set aside for retention to fold in when the file system is full.
    reserve: Arc<reserve::Reserve>,
    /// Held open with an exclusive flock for as long as the store is open.
    _lock: std::fs::File,
}

/// The store's clock: Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .saturating_add(clock_skew_ms())
}

/// The seam end-to-end tests age points through instead of sleeping: with the
/// `failpoints` feature, `TERN_CLOCK_FILE=PATH` puts the clock forward by the milliseconds
/// written in PATH (read at every call; a missing or unreadable file counts 0).
#[cfg(feature = "failpoints")]
fn clock_skew_ms() -> i64 {
    std::env::var_os("TERN_CLOCK_FILE")
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(not(feature = "failpoints"))]
fn clock_skew_ms() -> i64 {
    0
}

pub(crate) fn new_generation(vm: &VmName, disk: &DiskName) -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut h = blake3::Hasher::new();
    h.update(vm.as_str().as_bytes());
    h.update(disk.as_str().as_bytes());
    h.update(&nanos.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    Digest::from(h.finalize()).to_hex()[..32].to_string()
}

impl Store {
    /// Opens the store under `root`, checking every journal and cutting torn tails.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        Store::open_with(root, StoreOptions::default())
    }

    pub fn open_with(root: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        create_dir_durable(root)?;
        let lock = lock_data_dir(root)?;
        let catalog_path = root.join("catalog.db");
        if !catalog_path.exists() && holds_vm_data(root) {
            return Err(StoreError::CatalogMissing { dir: root.display().to_string() });
        }
        create_dir_durable(&root.join("vms"))?;
        remove_scratch(&root.join("tmp"));
        let mut catalog = Catalog::open(&catalog_path)?;
        // A catalog that does not know VMs whose data is here (restored without its -wal,
        // or from a backup older than them): started on, each agent would sync its VM anew
        // over the journals that hold its points (W19-D: every VM's history was lost).
        let unknown = unknown_vm_data(root, &catalog.vms()?);
        if !unknown.is_empty() {
            return Err(StoreError::CatalogBehind {
                dir: root.display().to_string(),
                vms: unknown.join(", "),
            });
        }
        let reserve = Arc::new(reserve::Reserve::open(root, options.reserve_bytes)?);
        let mut disks = HashMap::new();
        let mut damaged = HashMap::new();
        for vm in catalog.vms()? {
            // Damage to one VM's files stays with that VM.
            let opened = catalog.disks(&vm).and_then(|rows| {
                rows.into_iter()
                    .map(|row| open_disk(root, &vm, row, options, &reserve))
                    .collect::<Result<Vec<_>, _>>()
            });
            let handles = match opened {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(vm = %vm, error = %e,
                        "the VM's stored data cannot be opened; it is left alone until repaired, the other VMs go on");
                    damaged.insert(vm, e.to_string());
                    continue;
                }
            };
            if let Some(why) = points_behind_the_base(root, &catalog, &vm, &handles)? {
                tracing::error!(vm = %vm, problem = %why, "the catalog is older than the VM's stored data");
                damaged.insert(vm, why);
                continue;
            }
            drop_points_past_the_journals(&mut catalog, &vm, &handles)?;
            // (A master target's VMs have no such state: their row says how records are kept.)
            if matches!(catalog.vm_state(&vm), Ok(tern_core::VmState::FailoverCommitted)) {
                finish_commit(&vm, &handles)?;
            }
            for handle in handles {
                // A data directory written before disks had their base and size marks gets
                // them now, so that its catalog can be rebuilt if it is ever lost.
                if handle.base_path == disk_dir(root, &vm, &handle.name).join("base.img") {
                    if !rebuild::has_base_mark(root, &vm, &handle.name) {
                        rebuild::mark_base(root, &vm, &handle.name, handle.base_seq())?;
                    }
                    if !rebuild::has_size_mark(root, &vm, &handle.name) {
                        rebuild::mark_size(root, &vm, &handle.name, handle.size)?;
                    }
                }
                disks.insert((vm.clone(), handle.name.clone()), Arc::new(handle));
            }
        }
        Ok(Store {
            root: root.to_path_buf(),
            catalog: Mutex::new(catalog),
            disks: Mutex::new(disks),
            options,
            damaged,
            state_epoch: std::sync::atomic::AtomicU64::new(0),
            zeroes: zero_subtrees::ZeroSubtrees::new(root.join("zero-subtrees")),
            reserve,
            _lock: lock,
        })
    }

    /// The data directory's space reserve.
    pub fn reserve(&self) -> &reserve::Reserve {
        &self.reserve
    }

    /// Room for the catalog rows of a recovery action (a failover, a test failover, a
    /// change of point, a commit, a failback, a plan's step) on a data directory that is
    /// full or nearly: the space reserve is given up when less than [`RECOVERY_ROOM`] is
    /// free. New journal records still wait while it is given up (see [`reserve`]): its
    /// room goes to the catalog and to retention, not to replication. A failover must not
    /// be refused for want of a few KiB while the reserve sits there.
    pub fn room_for_recovery(&self, what: &str) {
        self.reserve.recheck();
        if self.reserve.held()
            && let Ok(free) = reserve::free_bytes(&self.root)
            && free < RECOVERY_ROOM
            && let Err(e) = self.reserve.release(&format!("for the catalog rows of {what}"))
        {
            tracing::warn!(error = %e, "cannot give up the space reserve for {what}");
        }
    }

    /// Why a VM's stored data could not be opened, if it could not.
    pub fn damaged(&self, vm: &VmName) -> Option<&str> {
        self.damaged.get(vm).map(String::as_str)
    }

    /// A damaged journal record a read found on one of the VM's disks (see
    /// [`DiskHandle::journal_damage`]).
    pub fn journal_damage(&self, vm: &VmName) -> Option<String> {
        self.vm_disks(vm).iter().find_map(|h| h.journal_damage())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The zero-subtree table of this data directory (see [`zero_subtrees`]).
    pub fn zero_subtrees(&self) -> &zero_subtrees::ZeroSubtrees {
        &self.zeroes
    }

    /// Starts a thread that works out the zero-subtree values the store's largest disk
    /// needs, a step at a time on all cores at nice 10, before a failover needs them: a
    /// failover of a 1 TiB disk would otherwise spend 256-600 CPU-s hashing the zeroes of
    /// its holes. Looks every second for a larger disk; ends within a step once `stop`
    /// returns true (join it before the store's directory is opened again: it holds the
    /// store during a step).
    pub fn warm_zero_subtrees(
        self: &Arc<Store>,
        stop: impl Fn() -> bool + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let store = Arc::downgrade(self);
        std::thread::Builder::new().name("zero-subtrees".into()).spawn(move || {
            if let Err(e) = tern_core::disk::lower_thread_priority() {
                tracing::debug!(error = %e, "cannot lower a thread's priority");
            }
            let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
            // After an error, a pause before the next try.
            let mut pause = 0u32;
            // A warm-up under way: when it started, and up to which size.
            let mut started: Option<(std::time::Instant, u64)> = None;
            while !stop() {
                let Some(store) = store.upgrade() else { return };
                let size = store.largest_disk();
                let more = pause == 0 && {
                    // 16 records a step: 1 GiB of disk, 0.25-0.6 CPU-s.
                    match store.zeroes.warm(size, 16, threads) {
                        Ok(more) => more,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot extend the zero-subtree table; outputs hash the zeroes of their holes meanwhile");
                            pause = 30;
                            false
                        }
                    }
                };
                drop(store);
                match (more, started) {
                    (true, None) => {
                        tracing::info!(disk_gib = size >> 30,
                            "working out the zero-subtree values for the largest disk in the background (once; \
                             until then an output of it hashes the zeroes of its holes)");
                        started = Some((std::time::Instant::now(), size));
                    }
                    (false, Some((at, size))) if pause == 0 => {
                        tracing::info!(disk_gib = size >> 30, secs = at.elapsed().as_secs(),
                            "the zero-subtree values cover the largest disk");
                        started = None;
                    }
                    _ => {}
                }
                if more {
                    // An output waiting for the table gets it between two steps.
                    std::thread::sleep(std::time::Duration::from_millis(5));
                } else {
                    // A look a second for a larger disk (a lock and a compare).
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    pause = pause.saturating_sub(1);
                }
            }
        })
    }

    /// The size of the largest disk the store holds.
    pub fn largest_disk(&self) -> u64 {
        self.disks.lock().unwrap_or_else(|p| p.into_inner()).values().map(|h| h.size).max().unwrap_or(0)
    }

    pub(crate) fn catalog(&self) -> MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every replication group.
    pub fn groups(&self) -> Result<Vec<GroupRow>, StoreError> {
        self.catalog().groups()
    }

    pub fn group(&self, name: &GroupName) -> Result<Option<GroupRow>, StoreError> {
        self.catalog().group(name)
    }

    pub fn group_of(&self, vm: &VmName) -> Result<Option<GroupName>, StoreError> {
        self.catalog().group_of(vm)
    }

    /// Creates a group (`create`: its crash and app intervals) or adds members to one.
    pub fn add_to_group(
        &self,
        name: &GroupName,
        vms: &[VmName],
        create: Option<(i64, i64)>,
    ) -> Result<(), StoreError> {
        self.catalog().add_to_group(name, vms, create, now_ms())
    }

    /// Removes members; with none named, the group.
    pub fn remove_from_group(&self, name: &GroupName, vms: &[VmName]) -> Result<(), StoreError> {
        self.catalog().remove_from_group(name, vms)
    }

    pub fn set_group_intervals(
        &self,
        name: &GroupName,
        crash_ms: Option<i64>,
        app_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        self.catalog().set_group_intervals(name, crash_ms, app_ms)
    }

    /// The newest multi-VM point every member of `group` has (app-consistent only when
    /// `app`), as a point of its first member.
    pub fn common_point(&self, group: &GroupRow, app: bool) -> Result<Option<Point>, StoreError> {
        let c = self.catalog();
        let Some(id) = common_group_point(&c, &group.name, &group.members, app)? else { return Ok(None) };
        match group.members.first() {
            Some(vm) => c.point(vm, id),
            None => Ok(None),
        }
    }

    pub fn put_plan(&self, plan: &PlanRow) -> Result<(), StoreError> {
        self.catalog().put_plan(plan)
    }

    /// See [`Catalog::fenced_source`].
    pub fn fenced_source(
        &self,
        vm: &VmName,
        disk: &DiskName,
        source: &str,
    ) -> Result<Option<String>, StoreError> {
        self.catalog().fenced_source(vm, disk, source)
    }

    /// See [`Catalog::disk_sources`].
    pub fn disk_sources(&self, vm: &VmName) -> Result<Vec<(String, String, String)>, StoreError> {
        self.catalog().disk_sources(vm)
    }

    /// See [`Catalog::note_source`].
    pub fn note_source(
        &self,
        vm: &VmName,
        disk: &DiskName,
        source: &str,
        path: &str,
    ) -> Result<(), StoreError> {
        self.catalog().note_source(vm, disk, source, path)
    }

    pub fn plans(&self) -> Result<Vec<PlanRow>, StoreError> {
        self.catalog().plans()
    }

    pub fn delete_plan(&self, name: &str) -> Result<bool, StoreError> {
        self.catalog().delete_plan(name)
    }

    pub fn set_plan_run(&self, name: &str, run: &str) -> Result<(), StoreError> {
        self.catalog().set_plan_run(name, run)
    }

    fn disk_map(&self) -> MutexGuard<'_, HashMap<(VmName, DiskName), Arc<DiskHandle>>> {
        self.disks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a VM's disks (a sender's hello). Known disks must keep their size.
    pub fn register(
        &self,
        vm: &VmName,
        disks: &[(DiskName, u64)],
    ) -> Result<Vec<Arc<DiskHandle>>, StoreError> {
        let catalog = self.catalog();
        let mut map = self.disk_map();
        let mut out = Vec::new();
        for (name, size) in disks {
            if let Some(h) = map.get(&(vm.clone(), name.clone()))
                && h.size != *size
            {
                return Err(StoreError::DiskSizeChanged {
                    vm: vm.clone(),
                    disk: name.clone(),
                    was: h.size,
                    now: *size,
                });
            }
        }
        catalog.add_vm(vm, now_ms())?;
        self.state_changed();
        for (name, size) in disks {
            if let Some(h) = map.get(&(vm.clone(), name.clone())) {
                out.push(h.clone());
                continue;
            }
            let row = catalog::DiskRow {
                name: name.clone(),
                size: *size,
                generation: new_generation(vm, name),
                base_seq: Seq(0),
                base_path: None,
            };
            let dir = disk_dir(&self.root, vm, name);
            create_dir_durable(&dir)?;
            let base = dir.join("base.img");
            let f = std::fs::File::create(&base).map_err(io_err(&base))?;
            f.set_len(*size).map_err(io_err(&base))?;
            f.sync_all().map_err(io_err(&base))?;
            durable::sync_dir(&dir)?;
            rebuild::mark_base(&self.root, vm, name, Seq(0))?;
            rebuild::mark_size(&self.root, vm, name, *size)?;
            catalog.add_disk(vm, &row)?;
            let handle = Arc::new(open_disk(&self.root, vm, row, self.options, &self.reserve)?);
            map.insert((vm.clone(), name.clone()), handle.clone());
            out.push(handle);
        }
        Ok(out)
    }

    /// Registers disks whose base image is a given file (a master target's target disks).
    /// A known disk keeps its registration.
    /// `start_after`: the records that will arrive are numbered after it.
    pub fn register_on(
        &self,
        vm: &VmName,
        disks: &[(DiskName, u64, PathBuf, Seq)],
    ) -> Result<(), StoreError> {
        let catalog = self.catalog();
        let mut map = self.disk_map();
        catalog.add_vm(vm, now_ms())?;
        self.state_changed();
        for (name, size, base, start_after) in disks {
            if map.contains_key(&(vm.clone(), name.clone())) {
                continue;
            }
            let row = catalog::DiskRow {
                name: name.clone(),
                size: *size,
                generation: new_generation(vm, name),
                base_seq: *start_after,
                base_path: Some(base.clone()),
            };
            create_dir_durable(&disk_dir(&self.root, vm, name))?;
            catalog.add_disk(vm, &row)?;
            let handle = Arc::new(open_disk(&self.root, vm, row, self.options, &self.reserve)?);
            map.insert((vm.clone(), name.clone()), handle);
        }
        Ok(())
    }

    /// Removes a protected VM's copy: its files are moved out of `vms/` first (into the
    /// scratch directory, emptied at every start), then its catalog rows go in one
    /// transaction, then the files. A crash in between leaves the rows of a VM whose files
    /// are gone (a second remove finishes it), never files a new VM of that name would take
    /// for its own.
    pub fn remove_vm(&self, vm: &VmName) -> Result<(), StoreError> {
        // A fold or a read under way on a disk ends first; later ones find no VM.
        let handles = self.vm_disks(vm);
        let _exclusive: Vec<_> = handles.iter().map(|h| h.write_lock()).collect();
        let dir = self.root.join("vms").join(vm.as_str());
        let scratch = self.root.join("tmp");
        create_dir_durable(&scratch)?;
        let aside = scratch.join(format!("removed-{vm}-{}", now_ms()));
        if dir.exists() {
            std::fs::rename(&dir, &aside).map_err(io_err(&dir))?;
            durable::sync_dir(&self.root.join("vms"))?;
            durable::sync_dir(&scratch)?;
        }
        {
            let mut catalog = self.catalog();
            catalog.forget_vm(vm)?;
        }
        self.disk_map().retain(|(v, _), _| v != vm);
        for h in &handles {
            h.forget_damage();
        }
        self.state_changed();
        if aside.exists() {
            std::fs::remove_dir_all(&aside).map_err(io_err(&aside))?;
        }
        tracing::warn!(vm = %vm, "VM removed: its points, journals and base images are deleted");
        Ok(())
    }

    /// Forgets a VM: its journals, catalog rows and, unless the base is an outside file,
    /// its base images.
    pub fn forget(&self, vm: &VmName) -> Result<(), StoreError> {
        let handles = self.vm_disks(vm);
        let mut catalog = self.catalog();
        catalog.forget_vm(vm)?;
        self.state_changed();
        self.disk_map().retain(|(v, _), _| v != vm);
        drop(catalog);
        for h in handles {
            h.journal().delete_all(h.base_seq())?;
            h.forget_damage();
        }
        let dir = self.root.join("vms").join(vm.as_str());
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
            durable::sync_dir(&self.root.join("vms"))?;
        }
        Ok(())
    }

    /// Commits a failback: the failover's output files go, then (with a mark that a catalog
    /// rebuild must not bring them back: their bookmarks stay in the journal) every point,
    /// the reprotect and the failover, as the VM becomes failback-committed. Returns the
    /// last point.
    pub fn commit_failback(&self, vm: &VmName) -> Result<PointId, StoreError> {
        use catalog::Transition;
        self.require_state(vm, tern_core::VmState::FailedBack, Transition::CommitFailback.refusal())?;
        let (points, failover) = {
            let c = self.catalog();
            (c.points(vm)?, c.failover(vm)?)
        };
        if let Some(f) = failover {
            // The failback is done whatever is left of the output: a file that will not go
            // is said, not fatal.
            if let Err(e) = failover::remove_outputs(&f) {
                tracing::warn!(error = %e, "cannot remove a failover output file");
            }
            let _ = std::fs::remove_dir(&f.output);
        }
        let last = points.last().map_or(PointId(0), |p| p.id);
        if last.0 > 0 {
            rebuild::mark_points_deleted(&self.root, vm, last)?;
        }
        self.transition(vm, Transition::CommitFailback)?;
        Ok(last)
    }

    /// Undoes a reprotect: the VM is failover-committed again, the reprotect's row and the
    /// points made since go (with the mark that a catalog rebuild must not bring them
    /// back). The journal stays: the next reprotect relays from the base as this one did
    /// (until a restart of the process server, which deletes it: see `finish_commit`).
    pub fn cancel_reprotect(&self, vm: &VmName) -> Result<(), StoreError> {
        use catalog::Transition;
        self.require_state(vm, tern_core::VmState::Reprotected, Transition::CancelReprotect.refusal())?;
        if let Some(last) = self.catalog().points(vm)?.last() {
            rebuild::mark_points_deleted(&self.root, vm, last.id)?;
        }
        self.transition(vm, Transition::CancelReprotect)
    }

    /// A new generation for `h`'s copy, now: no sender's saved state counts for it any more,
    /// so the next sync of the disk compares it whole. For a copy found behind a sender's
    /// state (its data directory went back in time): a later return to the newer directory
    /// must not take the state the sender saved against this one for its own (W19-D).
    pub fn new_epoch(&self, h: &DiskHandle) -> Result<(), StoreError> {
        let g = new_generation(&h.vm, &h.name);
        self.catalog().set_generation(&h.vm, &h.name, &g)?;
        *h.generation.lock().unwrap_or_else(|p| p.into_inner()) = g;
        Ok(())
    }

    /// New generations for every disk of `vm`, for a transition that starts a new
    /// replication epoch: senders' saved states no longer count, so the next sync of each
    /// disk is a delta sync.
    pub fn new_generations(&self, vm: &VmName) -> Vec<(DiskName, String)> {
        self.vm_disks(vm).iter().map(|h| (h.name.clone(), new_generation(vm, &h.name))).collect()
    }

    /// Changes `vm`'s state with every row that goes with it, in one catalog transaction
    /// (see [`catalog::Transition`]); a refusal changes nothing.
    pub fn transition(&self, vm: &VmName, t: catalog::Transition) -> Result<(), StoreError> {
        self.catalog().transition(vm, &t)?;
        if let catalog::Transition::Reprotect { generations, .. }
        | catalog::Transition::ReverseReplicate { generations, .. } = &t
        {
            for (disk, g) in generations {
                if let Some(h) = self.disk(vm, disk) {
                    *h.generation.lock().unwrap_or_else(|p| p.into_inner()) = g.clone();
                }
            }
        }
        self.state_changed();
        tracing::info!(vm = %vm, from = %t.from(), to = %t.to(), "VM state changed");
        Ok(())
    }

    pub fn disk(&self, vm: &VmName, disk: &DiskName) -> Option<Arc<DiskHandle>> {
        self.disk_map().get(&(vm.clone(), disk.clone())).cloned()
    }

    /// The VM's disks in name order.
    /// The disks a point covers, in the point's order: the disks the VM had when the point
    /// was made (a disk added later is not in earlier points).
    pub fn point_disks(&self, vm: &VmName, point: &Point) -> Result<Vec<Arc<DiskHandle>>, StoreError> {
        if let Some(reason) = self.damaged(vm) {
            return Err(StoreError::VmDamaged { vm: vm.clone(), reason: reason.to_string() });
        }
        point
            .disks
            .iter()
            .map(|pd| {
                self.disk(vm, &pd.disk).ok_or(StoreError::Invariant("a point names a disk the VM lacks"))
            })
            .collect()
    }

    pub fn vm_disks(&self, vm: &VmName) -> Vec<Arc<DiskHandle>> {
        let mut v: Vec<_> = self.disk_map().values().filter(|h| &h.vm == vm).cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn state_changed(&self) {
        self.state_epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Makes watchers of `state_epoch` read the states again (a relay that ended).
    pub fn bump_state_epoch(&self) {
        self.state_changed();
    }

    /// Moves whenever a VM's state may have changed (a transition, a VM added or
    /// forgotten); unchanged, every `vm_state` answer still holds. Lock-free.
    pub fn state_epoch(&self) -> u64 {
        self.state_epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn vms(&self) -> Result<Vec<VmName>, StoreError> {
        self.catalog().vms()
    }

    pub fn points(&self, vm: &VmName) -> Result<Vec<Point>, StoreError> {
        self.catalog().points(vm)
    }

    /// The newest `n` points of a VM (all of them for 0), oldest first, and how many it has
    /// (counting them reads the VM's index entries).
    pub fn recent_points(&self, vm: &VmName, n: usize) -> Result<(Vec<Point>, u64), StoreError> {
        self.catalog().recent_points(vm, n)
    }

    /// The newest point of a VM, at a cost that does not grow with the count.
    pub fn latest_point(&self, vm: &VmName) -> Result<Option<Point>, StoreError> {
        self.catalog().latest_point(vm)
    }

    pub fn has_vm(&self, vm: &VmName) -> Result<bool, StoreError> {
        self.catalog().has_vm(vm)
    }

    pub fn policy(&self, vm: &VmName) -> Result<Policy, StoreError> {
        self.catalog().policy(vm)
    }

    /// See [`Catalog::own_policy`]: what a partial `policy set` changes, and what reverse
    /// replication brings back.
    pub fn own_policy(&self, vm: &VmName) -> Result<Policy, StoreError> {
        self.catalog().own_policy(vm)
    }

    pub fn set_policy(&self, vm: &VmName, p: &Policy) -> Result<(), StoreError> {
        self.catalog().set_policy(vm, p)
    }

    /// Where a reprotected VM fails back to.
    pub fn reprotect(&self, vm: &VmName) -> Result<Option<ReprotectRow>, StoreError> {
        self.catalog().reprotect(vm)
    }

    /// The VM's open test failover, if it has one.
    pub fn test_failover_row(&self, vm: &VmName) -> Result<Option<TestFailoverRow>, StoreError> {
        self.catalog().test_failover(vm)
    }

    /// Every VM's failover and open test failover output directory (see
    /// `Catalog::outputs_in_use`).
    pub fn outputs_in_use(&self) -> Result<Vec<(String, &'static str, String)>, StoreError> {
        self.catalog().outputs_in_use()
    }

    /// The uncommitted failover of a VM.
    pub fn failover_row(&self, vm: &VmName) -> Result<Option<FailoverRow>, StoreError> {
        self.catalog().failover(vm)
    }

    /// On a master target: how a VM's relayed records are kept.
    pub fn target_mode(&self, vm: &VmName) -> Result<Option<tern_core::SyncMode>, StoreError> {
        self.catalog().target_mode(vm)
    }

    pub fn set_target_mode(&self, vm: &VmName, mode: tern_core::SyncMode) -> Result<(), StoreError> {
        self.catalog().set_target_mode(vm, mode)
    }

    /// Records a new running job, after pruning ended ones (see [`JOBS_KEPT_MS`]).
    pub fn insert_job(&self, kind: tern_core::JobKind, vm: &VmName, now_ms: i64) -> Result<u64, StoreError> {
        let catalog = self.catalog();
        match catalog.prune_jobs(now_ms) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(pruned = n, "ended jobs pruned"),
            Err(e) => tracing::warn!(error = %e, "cannot prune ended jobs"),
        }
        catalog.insert_job(kind, vm, now_ms)
    }

    pub fn update_job(&self, j: &JobRow) -> Result<(), StoreError> {
        self.catalog().update_job(j)
    }

    /// A job of `vm` still running, of one of `kinds` (any kind when empty).
    pub fn running_job(
        &self,
        vm: &VmName,
        kinds: &[tern_core::JobKind],
    ) -> Result<Option<JobRow>, StoreError> {
        Ok(self.jobs()?.into_iter().find(|j| {
            j.vm == vm.as_str()
                && j.state == tern_core::JobState::Running
                && (kinds.is_empty() || kinds.contains(&j.kind))
        }))
    }

    pub fn jobs(&self) -> Result<Vec<JobRow>, StoreError> {
        self.catalog().jobs()
    }

    /// Jobs a stopped process left running end as failed; returns how many. Ended jobs are
    /// pruned too (see [`JOBS_KEPT_MS`]).
    pub fn fail_interrupted_jobs(&self, now_ms: i64) -> Result<usize, StoreError> {
        if let Err(e) = self.catalog().prune_jobs(now_ms) {
            tracing::warn!(error = %e, "cannot prune ended jobs");
        }
        let running: Vec<JobRow> =
            self.jobs()?.into_iter().filter(|j| j.state == tern_core::JobState::Running).collect();
        let n = running.len();
        for mut j in running {
            j.state = tern_core::JobState::Failed;
            j.ended_ms = now_ms;
            j.error = match self.remove_cut_test_failover(&j) {
                Some(removed) => format!(
                    "interrupted: the process server stopped while the job ran; its partial output was \
                     removed ({removed} files): run the test failover again"
                ),
                None => format!(
                    "interrupted: the process server stopped while the job ran; {}",
                    self.after_interrupt(&j)
                ),
            };
            self.update_job(&j)?;
        }
        Ok(n)
    }

    /// The open test failover a stop cut short (its job was running and its manifest,
    /// written last, is not there): what it wrote is removed and it is closed, so that its
    /// point is no longer pinned and the test failover (or a plan's `continue`) can run
    /// again. Returns how many files went; `None` when there was nothing to remove.
    fn remove_cut_test_failover(&self, j: &JobRow) -> Option<usize> {
        if j.kind != tern_core::JobKind::TestFailover {
            return None;
        }
        let vm = VmName::new(&j.vm).ok()?;
        let open = self.test_failover_row(&vm).ok()??;
        // Only a manifest known to be absent: an output that cannot be looked at (not
        // mounted, no permission) is left alone.
        if !matches!(Path::new(&open.output).join("vm.json").try_exists(), Ok(false)) {
            return None;
        }
        match self.test_failover_cleanup(&vm) {
            Ok(removed) => {
                tracing::info!(vm = %vm, point = %open.point, output = %open.output, removed = ?removed,
                    "a test failover cut short by a stop: its partial output removed");
                Some(removed.len())
            }
            Err(e) => {
                tracing::warn!(vm = %vm, error = %e, "cannot remove the partial output of a test failover cut short");
                None
            }
        }
    }

    /// What to do about a job the last stop cut short: "again" is not always the way on.
    fn after_interrupt(&self, j: &JobRow) -> String {
        use tern_core::JobKind::{
            ChangePoint, InitialSync, Plan, PlannedFailover, TestFailover, UnplannedFailover,
        };
        match j.kind {
            // The job's VM is the plan's name; its progress is kept with the plan.
            Plan => {
                return format!(
                    "`drctl plan continue {0}` goes on from where it stopped (`drctl plan show {0}` says where); \
                     running the plan's operation again would start over from its first group",
                    j.vm
                );
            }
            InitialSync => return "the initial sync starts again by itself when the agent reconnects".into(),
            _ => {}
        }
        let vm = VmName::new(&j.vm).ok();
        let state = vm.as_ref().and_then(|vm| self.vm_state(vm).ok());
        let failover = vm.as_ref().and_then(|vm| self.catalog().failover(vm).ok().flatten());
        match (j.kind, state, failover) {
            (
                PlannedFailover | UnplannedFailover | ChangePoint,
                Some(tern_core::VmState::FailedOver),
                Some(row),
            ) => format!(
                "the VM is failed over but its output in {} may be incomplete: write it again with \
                 `drctl change-point {} --point {}` (commit refuses until it is whole)",
                row.output,
                j.vm,
                failover::point_arg_of(&row)
            ),
            (TestFailover, _, _)
                if vm.as_ref().is_some_and(|vm| self.test_failover_row(vm).is_ok_and(|t| t.is_some())) =>
            {
                format!(
                    "its output may be incomplete: run `drctl test-failover-cleanup {}`, then the test failover again",
                    j.vm
                )
            }
            _ => "run the command again".to_string(),
        }
    }

    /// The byte ranges that records numbered `after < seq <= upto` wrote, merged where
    /// they touch, in offset order; `None` when they cannot be told: some are no longer in
    /// the journal (folded into the base image, or their segment deleted while this read),
    /// or a header it reads does not read back. Takes no lock that retention or a long
    /// read could hold it behind: a new session must not wait on a scrub.
    ///
    /// Segments answer from their summaries where they have one (written by this process,
    /// or kept beside a closed segment), with no read: after a burst 1.5 million 4 KiB
    /// records followed the sender's last point, and reading their headers took 13.2 s
    /// (bench/nbd.sh) while a new session waited. Summaries may be coarser than the records
    /// (see [`written`]): the answer is then a superset, never less. Headers are read for
    /// the segment holding `after` and for those without a summary.
    pub fn written_after(&self, h: &DiskHandle, after: Seq, upto: Seq) -> Option<Vec<(u64, u64)>> {
        let (known, unread) = {
            let mut j = h.journal();
            if after < h.base_seq() {
                return None;
            }
            j.written_since(after)
        };
        let mut ranges: Vec<(u64, u64)> = known.iter().flat_map(|r| r.iter().copied()).collect();
        // The rest by their headers only, their payloads neither copied nor hashed.
        for r in unread.read_headers(after, upto) {
            let r = match r {
                Ok(r) => r.record,
                Err(e) => {
                    tracing::warn!(vm = %h.vm, disk = %h.name, error = %e, "records past a sender's state do not read back");
                    return None;
                }
            };
            if r.kind.is_data() {
                ranges.push((r.offset, r.offset + u64::from(r.length)));
            }
        }
        if h.base_seq() > after {
            return None;
        }
        for r in &mut ranges {
            r.1 = r.1.min(h.size);
        }
        written::merge(&mut ranges);
        Some(ranges)
    }

    /// The page values ([`tern_core::blocks::page_value`]) of the full blocks' pages that
    /// records `after < seq <= upto` wrote, as those records leave them (sorted by page
    /// index): when every record writes whole 4 KiB pages (a scan-mode agent's), the last
    /// to write a page gives all its bytes, so neither the records before `after` nor the
    /// base image are read. A sender whose state stops at `after` keeps its entries of
    /// those blocks with these pages in place, and compares them instead of sending them
    /// whole. `None` when a record writes part of a page, when the records' data passes
    /// `max_bytes`, when records past `after` were folded into the base image, or when they
    /// do not read back.
    pub fn page_values_after(
        &self,
        h: &DiskHandle,
        after: Seq,
        upto: Seq,
        max_bytes: u64,
    ) -> Option<Vec<(u64, Digest)>> {
        use tern_core::blocks::{BLOCK_SIZE, PAGE_SIZE, PAGES_PER_BLOCK, page_value};
        let (page, block) = (PAGE_SIZE as u64, BLOCK_SIZE as u64);
        let snapshot = {
            let j = h.journal();
            if after < h.base_seq() {
                return None;
            }
            j.snapshot()
        };
        // Pages of the disk's last, short block are left out: its page values are plain
        // hashes that do not merge into its block hash.
        let full_pages = h.size / block * block / page;
        let zero = vec![0u8; PAGE_SIZE];
        let mut values: std::collections::BTreeMap<u64, Digest> = std::collections::BTreeMap::new();
        let mut dec = tern_core::codec::Decoder::new();
        let mut bytes = 0u64;
        for rec in snapshot.read_range(after, upto) {
            let rec = rec.ok()?;
            let r = &rec.record;
            if !r.kind.is_data() {
                continue;
            }
            let (offset, length) = (r.offset, u64::from(r.length));
            let whole = offset % page == 0 && (length % page == 0 || offset + length == h.size);
            bytes += length;
            if !whole || bytes > max_bytes {
                return None;
            }
            let plain = match r.kind {
                RecordKind::Write if rec.plain_checked => None,
                RecordKind::Write => {
                    Some(dec.decode(r.compressed, &r.payload, r.length as usize, &r.digest).ok()?)
                }
                _ => None,
            };
            let data: Option<&[u8]> = match r.kind {
                RecordKind::Write => Some(plain.as_deref().unwrap_or(&r.payload)),
                _ => None,
            };
            for i in 0..length.div_ceil(page) {
                let p = offset / page + i;
                if p >= full_pages {
                    break;
                }
                let at = usize::try_from(i * page).ok()?;
                let content = match data {
                    Some(d) => d.get(at..at + PAGE_SIZE)?,
                    None => &zero[..],
                };
                values.insert(p, page_value(content, usize::try_from(p % PAGES_PER_BLOCK as u64).ok()?));
            }
        }
        if h.base_seq() > after {
            return None;
        }
        Some(values.into_iter().collect())
    }

    /// Makes a recovery point: bookmarks in every disk's journal, fsynced, then the catalog.
    pub fn make_point(
        &self,
        vm: &VmName,
        time_ms: i64,
        consistency: Consistency,
        note: &str,
        disks: Vec<PointDisk>,
    ) -> Result<Point, StoreError> {
        let cut = NewPoint { vm: vm.clone(), time_ms, consistency, note: note.to_string(), disks };
        Ok(self.make_points(None, vec![cut])?.remove(0))
    }

    /// Makes one multi-VM point of `group`: one id for every member's cut, each member's
    /// bookmarks written, then all the rows in one catalog transaction. Every cut is checked
    /// before anything is written: a refusal of one leaves no trace on any.
    pub fn make_group_point(&self, group: &GroupName, cuts: Vec<NewPoint>) -> Result<Vec<Point>, StoreError> {
        self.make_points(Some(group), cuts)
    }

    fn make_points(&self, group: Option<&GroupName>, cuts: Vec<NewPoint>) -> Result<Vec<Point>, StoreError> {
        let mut checked = Vec::new();
        for mut cut in cuts {
            let handles = self.vm_disks(&cut.vm);
            if handles.is_empty() {
                return Err(StoreError::UnknownVm(cut.vm));
            }
            // A point past a damaged record could not be recovered: none is acknowledged.
            if let Some(reason) = self.journal_damage(&cut.vm) {
                return Err(StoreError::JournalDamaged { vm: cut.vm, reason });
            }
            cut.disks.sort_by(|a, b| a.disk.cmp(&b.disk));
            let names: Vec<&DiskName> = cut.disks.iter().map(|d| &d.disk).collect();
            let have: Vec<&DiskName> = handles.iter().map(|h| &h.name).collect();
            if names != have {
                return Err(StoreError::PointDisksMismatch {
                    vm: cut.vm.clone(),
                    reason: format!("point names {names:?}, VM has {have:?}"),
                });
            }
            for (h, d) in handles.iter().zip(&cut.disks) {
                let durable = h.durable();
                if d.seq > durable {
                    return Err(StoreError::PointBeyondDurable {
                        disk: h.name.to_string(),
                        seq: d.seq,
                        durable,
                    });
                }
            }
            checked.push((cut, handles));
        }
        let id = self.catalog().next_point_id()?;
        let mut points = Vec::new();
        for (cut, handles) in checked {
            let NewPoint { vm, time_ms, consistency, note, disks } = cut;
            let point = Point { id, vm, time_ms, consistency, note, disks, group: group.cloned() };
            let body = serde_json::to_vec(&format::BookmarkBody {
                point: id.0,
                vm: point.vm.to_string(),
                time_ms,
                consistency: consistency.as_str().to_string(),
                disks: point
                    .disks
                    .iter()
                    .map(|d| format::BookmarkDisk {
                        disk: d.disk.to_string(),
                        seq: d.seq.0,
                        fingerprint: d.fingerprint.to_hex(),
                    })
                    .collect(),
                group: group.map(ToString::to_string).unwrap_or_default(),
            })
            .map_err(|_| StoreError::Invariant("bookmark encodes"))?;
            for h in &handles {
                let mut j = h.journal();
                j.append_bookmark(&body)?;
                j.sync()?;
            }
            points.push(point);
        }
        self.catalog().insert_points(&points)?;
        Ok(points)
    }

    /// The point `spec` names: a few probes of the catalog's index, however many points.
    pub fn resolve_point(&self, vm: &VmName, spec: &PointSpec) -> Result<Point, StoreError> {
        let found = {
            let c = self.catalog();
            match spec {
                PointSpec::Latest | PointSpec::LatestProcessed | PointSpec::Received => c.latest_point(vm)?,
                PointSpec::LatestApp => c.latest_app_point(vm)?,
                PointSpec::LatestMultiVm | PointSpec::LatestMultiVmApp => {
                    let app = *spec == PointSpec::LatestMultiVmApp;
                    match c.group_of(vm)? {
                        Some(g) => {
                            let members = c.group(&g)?.map(|r| r.members).unwrap_or_default();
                            match common_group_point(&c, &g, &members, app)? {
                                Some(id) => c.point(vm, id)?,
                                None => None,
                            }
                        }
                        None if app => c.latest_app_point(vm)?,
                        None => c.latest_point(vm)?,
                    }
                }
                PointSpec::Id(id) => c.point(vm, *id)?,
                PointSpec::Time(ms) => c.point_at_or_before(vm, *ms)?,
            }
        };
        if let Some(p) = found {
            return Ok(p);
        }
        // The refusal names the oldest and newest: two probes, however many points.
        let (oldest, newest) = {
            let c = self.catalog();
            (c.oldest_point(vm)?, c.latest_point(vm)?)
        };
        Err(StoreError::PointNotFound {
            vm: vm.clone(),
            wanted: match spec {
                PointSpec::Latest | PointSpec::LatestProcessed | PointSpec::Received => {
                    "yet (latest-processed)".into()
                }
                PointSpec::LatestApp => "that is app-consistent (latest-app)".into(),
                PointSpec::LatestMultiVm => {
                    "that its replication group has in common (latest-multi-vm); make one with `drctl group checkpoint`".into()
                }
                PointSpec::LatestMultiVmApp => "that is app-consistent and its replication group has in common \
                    (latest-multi-vm-app); make one with `drctl group checkpoint --app`"
                    .into(),
                PointSpec::Id(id) => format!("{id} (it does not exist or was pruned)"),
                PointSpec::Time(ms) => format!("at or before {}", rfc3339(*ms)),
            },
            available: match (oldest, newest) {
                (Some(a), Some(b)) => format!(
                    "the oldest is {} ({}), the newest {} ({}); see `drctl points {vm}`",
                    a.id,
                    rfc3339(a.time_ms),
                    b.id,
                    rfc3339(b.time_ms)
                ),
                // Its points went with the commit (W19-A: told to wait for an initial sync).
                _ if self.vm_state(vm).is_ok_and(|s| s == tern_core::VmState::FailoverCommitted) => format!(
                    "its failover is committed, and its points went with the commit: the recovered VM runs on \
                     the failover's output; `drctl reprotect {vm}` protects it again"
                ),
                _ => {
                    "it has no points yet; wait for the initial sync or run `drctl checkpoint --wait`".into()
                }
            },
        })
    }

    /// Writes every disk of `vm` at `spec` into `out_dir` and records an open test failover.
    pub fn test_failover(
        &self,
        vm: &VmName,
        spec: &PointSpec,
        out_dir: &Path,
        format: Format,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<FailoverOutput, StoreError> {
        self.test_failover_noted(vm, spec, "", out_dir, format, progress)
    }

    /// [`Store::test_failover`], where `why` says why `spec` is not what the operator asked
    /// for (`latest` that could not be made): the output's note and `vm.json` say it.
    pub fn test_failover_noted(
        &self,
        vm: &VmName,
        spec: &PointSpec,
        why: &str,
        out_dir: &Path,
        format: Format,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<FailoverOutput, StoreError> {
        if !self.catalog().has_vm(vm)? {
            return Err(StoreError::UnknownVm(vm.clone()));
        }
        let position = self.resolve_position(vm, spec)?.noted(why);
        let point = &position.point;
        let handles = self.point_disks(vm, point)?;
        let files = failover::output_files(&handles, out_dir, format)?;
        let manifest = out_dir.join("vm.json");
        // An open test failover first: its own files would otherwise be named as in the
        // way, and removing them by hand is not how it is closed.
        if let Some(open) = self.catalog().test_failover(vm)? {
            return Err(StoreError::TestFailoverOpen {
                vm: vm.clone(),
                point: open.point,
                output: open.output,
            });
        }
        failover::refuse_existing(&files, out_dir)?;
        {
            let catalog = self.catalog();
            if let Some(open) = catalog.test_failover(vm)? {
                return Err(StoreError::TestFailoverOpen {
                    vm: vm.clone(),
                    point: open.point,
                    output: open.output,
                });
            }
            let mut listed: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            listed.push(manifest.display().to_string());
            catalog.open_test_failover(
                vm,
                &catalog::TestFailoverRow {
                    point: point.id,
                    output: out_dir.display().to_string(),
                    files: listed,
                },
            )?;
        }
        let result = self.write_output(vm, &position, &handles, &files, &manifest, out_dir, format, progress);
        if result.is_err() {
            for f in &files {
                let _ = std::fs::remove_file(f);
            }
            self.catalog().close_test_failover(vm)?;
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn write_output(
        &self,
        vm: &VmName,
        position: &Position,
        handles: &[Arc<DiskHandle>],
        files: &[PathBuf],
        manifest: &Path,
        out_dir: &Path,
        format: Format,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<FailoverOutput, StoreError> {
        create_dir_durable(out_dir)?;
        let total: u64 = handles.iter().map(|h| h.size).sum();
        let mut before = 0u64;
        let mut disks = Vec::new();
        let point = &position.point;
        if !position.why_point.is_empty() {
            tracing::info!(vm = %vm, point = %point.id, reason = %position.why_point,
                "the time asked for resolves to the point at or before it");
        }
        let seqs = position.seqs();
        for (((h, path), pd), seq) in handles.iter().zip(files).zip(&point.disks).zip(seqs) {
            let size = h.size;
            // A position between points has no fingerprint of its own: each record it
            // applies is checked against its BLAKE3 instead.
            let expected = position.between.is_none().then_some(pd.fingerprint);
            let out =
                materialize::materialize_disk(h, seq, expected, path, format, &self.zeroes, &mut |done| {
                    progress(before + done.min(size), total)
                })?;
            before += size;
            disks.push(out);
        }
        let output = FailoverOutput {
            schema: MANIFEST_SCHEMA,
            tern_version: env!("CARGO_PKG_VERSION"),
            vm: vm.to_string(),
            point: point.id.0,
            time: rfc3339(position.time_ms()),
            time_ms: position.time_ms(),
            // Between two points is a crash-consistent moment, whatever the earlier point was.
            consistency: if position.between.is_some() { "crash" } else { point.consistency.as_str() }
                .to_string(),
            between_points: position.between.as_ref().map(|b| [point.id.0, b.next]),
            note: match (&position.between, position.why_point.as_str()) {
                (Some(b), _) if b.next == 0 => format!(
                    "the journal position at {}, after point {}: every write that reached the process \
                     server by then, none after",
                    rfc3339(position.time_ms()),
                    point.id
                ),
                (Some(_), _) => format!(
                    "the journal position at {}: every write made by then, none after",
                    rfc3339(position.time_ms())
                ),
                (None, "") => String::new(),
                (None, why) => {
                    format!("point {} (not the moment asked for): {why}", point.id)
                }
            },
            disks,
        };
        let mut json =
            serde_json::to_vec_pretty(&output).map_err(|_| StoreError::Invariant("manifest encodes"))?;
        json.push(b'\n');
        durable::publish(manifest, &json)?;
        Ok(output)
    }

    /// Removes what the open test failover of `vm` made; returns the removed paths.
    pub fn test_failover_cleanup(&self, vm: &VmName) -> Result<Vec<String>, StoreError> {
        let catalog = self.catalog();
        let open = catalog.test_failover(vm)?.ok_or_else(|| StoreError::NoTestFailover(vm.clone()))?;
        let mut removed = Vec::new();
        for f in &open.files {
            let p = Path::new(f);
            for candidate in [p.to_path_buf(), PathBuf::from(format!("{f}.partial"))] {
                match std::fs::remove_file(&candidate) {
                    Ok(()) => removed.push(candidate.display().to_string()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(StoreError::Io { path: candidate.display().to_string(), source: e });
                    }
                }
            }
        }
        let dir = Path::new(&open.output);
        // Only an empty directory is removed: it may have held other things before.
        if std::fs::remove_dir(dir).is_ok() {
            removed.push(open.output.clone());
        }
        catalog.close_test_failover(vm)?;
        Ok(removed)
    }
}

/// A journal that opens shorter than a recovery point of its disk lost acknowledged
/// records: a record before the end of its last segment was damaged (not a torn write:
/// points are made only of fsynced records), and the records from it on were cut off and
/// kept beside the segment. The points past the journal's end cannot be rebuilt any more:
/// they are removed (unless an open failover holds one), so that no one fails over to them
/// and new records, numbered on from the journal's end, are never read as theirs. The
/// disk starts a new epoch, so its sender compares block hashes and resends what is
/// missing instead of trusting its saved state.
fn drop_points_past_the_journals(
    catalog: &mut Catalog,
    vm: &VmName,
    handles: &[DiskHandle],
) -> Result<(), StoreError> {
    let points = catalog.points(vm)?;
    let mut drop = Vec::new();
    for h in handles {
        let end = h.journal().durable().max(h.base_seq());
        // The points whose position on this disk lies past the journal's end.
        let lost: Vec<(PointId, Seq)> = points
            .iter()
            .filter_map(|p| p.disks.iter().find(|d| d.disk == h.name).map(|d| (p.id, d.seq)))
            .filter(|(_, seq)| *seq > end)
            .collect();
        if lost.is_empty() {
            continue;
        }
        let held = [catalog.failover(vm)?.map(|f| f.point), catalog.test_failover(vm)?.map(|t| t.point)];
        let (kept, gone): (Vec<_>, Vec<_>) = lost.iter().partition(|(id, _)| held.contains(&Some(*id)));
        tracing::error!(vm = %vm, disk = %h.name, journal_end = %end,
            needed = %lost.iter().map(|(_, s)| *s).max().unwrap_or(end),
            removed_points = ?gone.iter().map(|(id, _)| id.0).collect::<Vec<_>>(),
            kept_for_an_open_failover = ?kept.iter().map(|(id, _)| id.0).collect::<Vec<_>>(),
            "the journal lost acknowledged records (damaged storage; the cut bytes are kept in a \
             .torn file beside its last segment): recovery points past its end are removed and the \
             disk is resynced from its agent; check the disk under the data directory");
        drop.extend(gone.into_iter().map(|(id, _)| id));
        let g = new_generation(vm, &h.name);
        catalog.set_generation(vm, &h.name, &g)?;
        *h.generation.lock().unwrap_or_else(|p| p.into_inner()) = g;
    }
    drop.sort_unstable_by_key(|p| p.0);
    drop.dedup();
    catalog.delete_points(vm, &drop)
}

/// The newest multi-VM point of `group` that every one of `members` still has (retention
/// may have pruned it on some): a few index probes per step down, however many points.
pub fn common_group_point(
    c: &Catalog,
    group: &GroupName,
    members: &[VmName],
    app: bool,
) -> Result<Option<PointId>, StoreError> {
    let mut below = PointId(u64::try_from(i64::MAX).unwrap_or(u64::MAX));
    if members.is_empty() {
        return Ok(None);
    }
    loop {
        let mut lowest = None::<PointId>;
        let mut agree = true;
        for vm in members {
            let Some(id) = c.group_point_at_or_below(vm, group, app, below)? else { return Ok(None) };
            if lowest.is_some_and(|l| l != id) {
                agree = false;
            }
            lowest = Some(lowest.map_or(id, |l| l.min(id)));
        }
        let Some(lowest) = lowest else { return Ok(None) };
        if agree {
            return Ok(Some(lowest));
        }
        below = lowest;
    }
}

/// A committed failover keeps no journal (reverse replication starts its own after the
/// base image): one whose commit was cut short while it deleted them, leaving some
/// segments, or all of them, has them deleted now. Left there, a relay to a master target
/// would stall at the gap they leave, or send records of the old primary. (A cancelled
/// reprotect's records go too: the VM is then as a commit leaves it, and the next
/// reprotect's agent compares with the master target's disk.)
fn finish_commit(vm: &VmName, handles: &[DiskHandle]) -> Result<(), StoreError> {
    for h in handles {
        let mut journal = h.journal();
        if journal.segment_count() == 0 {
            continue;
        }
        tracing::warn!(vm = %vm, disk = %h.name, segments = journal.segment_count(), base_seq = %h.base_seq(),
            "a failover-committed VM keeps no journal: what is left (of a commit cut short while it deleted \
             it, or a cancelled reprotect's records) is deleted, as a commit leaves it; the next reprotect \
             compares with the master target's disk");
        journal.delete_all(h.base_seq())?;
        drop(journal);
        h.forget_damage();
    }
    Ok(())
}

/// Scratch copies (hashes of a materialised disk, a verify's output) live only while the
/// daemon that made them runs; a crash leaves them behind, so they go at start-up.
fn remove_scratch(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut n = 0;
    for e in entries.flatten() {
        if std::fs::remove_file(e.path()).is_ok() || std::fs::remove_dir_all(e.path()).is_ok() {
            n += 1;
        }
    }
    if n > 0 {
        tracing::info!(dir = %dir.display(), removed = n, "scratch files of an earlier run removed");
    }
}

pub(crate) fn disk_dir(root: &Path, vm: &VmName, disk: &DiskName) -> PathBuf {
    root.join("vms").join(vm.as_str()).join(disk.as_str())
}

/// Takes the data directory's lock file: one daemon per data directory.
pub(crate) fn lock_data_dir(root: &Path) -> Result<std::fs::File, StoreError> {
    let path = root.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    match tern_core::disk::try_lock_exclusive(&f) {
        Ok(true) => Ok(f),
        Ok(false) => Err(StoreError::DataDirInUse { dir: root.display().to_string() }),
        Err(source) => Err(StoreError::Io { path: path.display().to_string(), source }),
    }
}

/// Whether the data directory holds a journal segment or base image of some VM.
/// The VMs under `vms/` that `known` leaves out and that hold data: a base image or a
/// journal segment that is not empty (a directory a crash left during a registration holds
/// none).
fn unknown_vm_data(root: &Path, known: &[VmName]) -> Vec<String> {
    let has_data = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.len() > 0);
    let Ok(vms) = std::fs::read_dir(root.join("vms")) else { return Vec::new() };
    let mut unknown: Vec<String> = vms
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| !known.iter().any(|k| k.as_str() == name))
        .filter(|name| {
            let vm = root.join("vms").join(name);
            std::fs::read_dir(&vm).into_iter().flatten().filter_map(Result::ok).any(|disk| {
                let d = disk.path();
                has_data(&d.join("base.img"))
                    || std::fs::read_dir(d.join("journal"))
                        .into_iter()
                        .flatten()
                        .filter_map(Result::ok)
                        .any(|s| s.path().extension().is_some_and(|x| x == "seg") && has_data(&s.path()))
            })
        })
        .collect();
    unknown.sort();
    unknown
}

/// Why the catalog is older than `vm`'s stored data, if it is: it lists a point that a
/// disk's base image has moved past (its `base.seq` mark, written before each fold, is past
/// the point's position; retention deletes such points before it folds). Such points
/// cannot be recovered (W19-D: a catalog.db restored from an older backup listed them all,
/// and said nothing). A missing base image that records were folded into is said too, and
/// a journal whose first segment is gone.
fn points_behind_the_base(
    root: &Path,
    catalog: &Catalog,
    vm: &VmName,
    handles: &[DiskHandle],
) -> Result<Option<String>, StoreError> {
    let points = catalog.points(vm)?;
    // A commit moves the base images to the failover's position before it deletes the
    // points (`Store::commit`): one cut short in between leaves them listed, and is done
    // again. A failed-over VM is not judged by its marks.
    if matches!(catalog.vm_state(vm), Ok(tern_core::VmState::FailedOver)) {
        return Ok(None);
    }
    for h in handles {
        // Segments go only once the base holds their records (the catalog's base position
        // is written first): a journal that starts further on lost a segment file.
        let base = h.base_seq();
        if let Some(first) = h.journal().snapshot().first_seq()
            && first.0 > base.0 + 1
        {
            return Ok(Some(format!(
                "disk {}'s journal starts at record {first} but its base image holds records only up to \
                 {base}: records {} to {} are gone (a segment file missing from a restored data directory?), \
                 and no point past record {base} can be recovered. Restore {} whole from one backup, or \
                 remove the VM (`drctl remove {vm} --delete-points`) and protect it anew",
                h.name,
                base.0 + 1,
                first.0 - 1,
                disk_dir(root, vm, &h.name).display()
            )));
        }
        let own = disk_dir(root, vm, &h.name).join("base.img");
        if h.base_path != own {
            continue;
        }
        if let Ok(m) = std::fs::metadata(&own)
            && m.len() != h.size
        {
            return Ok(Some(format!(
                "disk {}'s base image {} is {} bytes but the disk is {}: it is cut short or is another disk's \
                 (a data directory restored in part?), and its points cannot be recovered from it. Restore it \
                 from the backup the rest of the data directory came from, or remove the VM (`drctl remove \
                 {vm} --delete-points`) and protect it anew",
                h.name,
                own.display(),
                m.len(),
                h.size
            )));
        }
        if h.base_seq().0 > 0 && !own.exists() {
            return Ok(Some(format!(
                "disk {}'s base image {} is gone, though records up to {} were folded into it: its points \
                 cannot be recovered without it. Restore it from the backup the rest of the data directory \
                 came from, or remove the VM (`drctl remove {vm} --delete-points`) and protect it anew",
                h.name,
                own.display(),
                h.base_seq()
            )));
        }
        let Some(mark) = rebuild::base_mark(root, vm, &h.name)? else { continue };
        let behind: Vec<u64> = points
            .iter()
            .filter(|p| p.disks.iter().any(|d| d.disk == h.name && d.seq.0 < mark))
            .map(|p| p.id.0)
            .collect();
        if let (Some(first), Some(last)) = (behind.first(), behind.last()) {
            return Ok(Some(format!(
                "the catalog is older than this VM's stored data (catalog.db restored from an older backup?): \
                 disk {}'s base image holds records up to {mark}, past points {first} to {last}, which cannot \
                 be recovered. Rebuild the catalog from the journals: stop the process server, move \
                 catalog.db (and catalog.db-wal, -shm) aside, and run `process-server check --data-dir {} \
                 --rebuild-catalog`",
                h.name,
                root.display()
            )));
        }
    }
    Ok(None)
}

fn holds_vm_data(root: &Path) -> bool {
    std::fs::read_dir(root.join("vms")).is_ok_and(|mut vms| vms.any(|e| e.is_ok()))
}

fn open_disk(
    root: &Path,
    vm: &VmName,
    row: catalog::DiskRow,
    options: StoreOptions,
    reserve: &Arc<reserve::Reserve>,
) -> Result<DiskHandle, StoreError> {
    let dir = disk_dir(root, vm, &row.name);
    let (mut journal, recovery) = Journal::open(&dir.join("journal"))?;
    journal.continue_after(row.base_seq);
    if let Some(bytes) = options.segment_bytes {
        journal.set_segment_target(bytes);
    }
    tracing::info!(vm = %vm, disk = %row.name, durable_seq = %recovery.durable, cut_bytes = recovery.cut_bytes,
        "journal opened");
    Ok(DiskHandle {
        vm: vm.clone(),
        name: row.name,
        size: row.size,
        generation: Mutex::new(row.generation),
        base_path: row.base_path.clone().unwrap_or_else(|| dir.join("base.img")),
        durable: std::sync::atomic::AtomicU64::new(journal.durable().0),
        journal_bytes: std::sync::atomic::AtomicU64::new(journal.bytes()),
        journal: Mutex::new(journal),
        base_seq: Mutex::new(row.base_seq),
        retention: std::sync::RwLock::new(()),
        damage: Mutex::new(None),
        reserve: reserve.clone(),
    })
}

pub use tern_core::units::rfc3339;

/// `len` bytes that do not compress, different for each `seed`, for tests.
#[cfg(test)]
pub(crate) fn incompressible(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut data);
    data
}

/// A write record of `data` at `offset`, for tests.
#[cfg(test)]
pub(crate) fn test_record(data: &[u8], offset: u64) -> Record {
    let e = tern_core::codec::Encoder::new().encode(data);
    Record {
        kind: format::RecordKind::Write,
        offset,
        length: u32::try_from(data.len()).unwrap_or(u32::MAX),
        digest: e.digest,
        compressed: e.compressed,
        payload: e.payload.into(),
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use tern_core::blocks::Fingerprint;

    use crate::test_record as write;

    /// The page values of what records past a sender's state wrote are those of the bytes
    /// the last record to write each page left (compressed or plain, a zero record's
    /// zeroes), for the pages of full blocks only; a record writing part of a page, or more
    /// data than allowed, gives none.
    #[test]
    fn page_values_after_are_the_pages_the_last_records_left() {
        use tern_core::blocks::{PAGE_SIZE, page_value};
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let vm = VmName::new("p").unwrap();
        // Two full blocks and a short one of 32 KiB.
        let size = (2 << 16) + (32 << 10);
        let h = store.register(&vm, &[(DiskName::new("sda").unwrap(), size)]).unwrap().remove(0);
        let noise: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        let zero = Record { kind: format::RecordKind::Zero, length: 4096, ..write(&[0u8; 0], 17 * 4096) };
        let records = [
            (1, write(&[0xAA; 8192], 0)),         // pages 0, 1 (before the sender's state)
            (2, write(&[0xBB; 4096], 4096)),      // page 1 again
            (3, write(&noise, 16 * 4096)),        // pages 16-18: block 1, compresses badly
            (4, write(&[0xCC; 8192], 17 * 4096)), // pages 17, 18 again, compresses well
            (5, zero),                            // page 17 zeroed
            (6, write(&[0xDD; 4096], 32 * 4096)), // page 32: the short block, left out
        ];
        for (seq, r) in records {
            h.journal().append(Seq(seq), &[r]).unwrap();
        }
        h.journal().sync().unwrap();
        let v = |data: &[u8], page: usize| page_value(data, page % 16);
        let want = vec![
            (1, v(&[0xBB; 4096], 1)),
            (16, v(&noise[..4096], 16)),
            (17, v(&[0; 4096], 17)),
            (18, v(&[0xCC; 4096], 18)),
        ];
        assert_eq!(store.page_values_after(&h, Seq(1), Seq(6), 1 << 20).unwrap(), want);
        // From the start: page 0 too.
        let all = store.page_values_after(&h, Seq(0), Seq(6), 1 << 20).unwrap();
        assert_eq!(all[0], (0, v(&[0xAA; 4096], 0)));
        assert_eq!(&all[1..], &want[..]);
        // More data than allowed: none.
        assert!(store.page_values_after(&h, Seq(1), Seq(6), 8192).is_none());
        // A record that writes half a page: none.
        h.journal().append(Seq(7), &[write(&[1u8; 2048], 2 * 4096 + 1024)]).unwrap();
        h.journal().sync().unwrap();
        assert!(store.page_values_after(&h, Seq(1), Seq(7), 1 << 20).is_none());
        assert_eq!(store.page_values_after(&h, Seq(1), Seq(6), 1 << 20).unwrap(), want);
    }

    /// A new session's doubtful ranges: segments this process wrote answer from their
    /// summaries, unread, with what the records' headers say; after a reopen the closed
    /// segments' files answer the same, and so do the headers without the files; a journal
    /// of both kinds answers whole.
    #[test]
    fn written_after_answers_from_the_summaries_what_the_headers_say() {
        let root = tempfile::tempdir().unwrap();
        let vm = VmName::new("w").unwrap();
        let d = DiskName::new("sda").unwrap();
        let options = || StoreOptions { segment_bytes: Some(2 << 10), ..Default::default() };
        // Scattered 4 KiB writes, some touching, some overlapping by half.
        let at = |i: u64| (i * 7919 % 1000) * 4096 + if i.is_multiple_of(5) { 2048 } else { 0 };
        let want = |after: u64, upto: u64| {
            let mut r: Vec<(u64, u64)> = (after + 1..=upto).map(|i| (at(i), at(i) + 4096)).collect();
            r.sort_unstable();
            let mut m: Vec<(u64, u64)> = Vec::new();
            for (a, b) in r {
                match m.last_mut() {
                    Some((_, end)) if *end >= a => *end = (*end).max(b),
                    _ => m.push((a, b)),
                }
            }
            m
        };
        let append = |h: &DiskHandle, from: u64, to: u64| {
            for i in from..=to {
                h.journal().append(Seq(i), &[write(&[i as u8; 4096], at(i))]).unwrap();
            }
            h.journal().sync().unwrap();
        };
        let check = |store: &Store, h: &DiskHandle, upto: u64| {
            for after in [0, 1, 57, 100, 150, 199, 200, 250, upto - 1, upto] {
                if after <= upto {
                    assert_eq!(
                        store.written_after(h, Seq(after), Seq(upto)).unwrap(),
                        want(after, upto),
                        "after {after}"
                    );
                }
            }
        };
        {
            let store = Store::open_with(root.path(), options()).unwrap();
            let h = store.register(&vm, &[(d.clone(), 64 << 20)]).unwrap().remove(0);
            append(&h, 1, 200);
            assert!(h.journal().segment_count() > 4, "{}", h.journal().segment_count());
            check(&store, &h, 200);
        }
        // Reopened: the closed segments' ranges from their files; then without the files,
        // from the headers.
        for files in [true, false] {
            if !files {
                for e in std::fs::read_dir(root.path().join("vms/w/sda/journal")).unwrap() {
                    let p = e.unwrap().path();
                    if p.extension().is_some_and(|x| x == "ranges") {
                        std::fs::remove_file(p).unwrap();
                    }
                }
            }
            let store = Store::open_with(root.path(), options()).unwrap();
            check(&store, &store.vm_disks(&vm).remove(0), 200);
        }
        let store = Store::open_with(root.path(), options()).unwrap();
        let h = store.vm_disks(&vm).remove(0);
        append(&h, 201, 300);
        check(&store, &h, 300);
    }

    /// A multi-VM point is one id on every member, written all or nothing;
    /// `latest-multi-vm` is the newest one every member still has, and survives a reopen
    /// and a catalog rebuild from the journals' bookmarks.
    #[test]
    fn a_multi_vm_point_is_one_id_on_every_member_and_the_common_one_is_resolved() {
        let root = tempfile::tempdir().unwrap();
        let (a, b, c) = (VmName::new("a").unwrap(), VmName::new("b").unwrap(), VmName::new("c").unwrap());
        let d = DiskName::new("sda").unwrap();
        let g = GroupName::new("shop").unwrap();
        let cut = |vm: &VmName, app: bool| NewPoint {
            vm: vm.clone(),
            time_ms: now_ms(),
            consistency: if app { Consistency::App } else { Consistency::Crash },
            note: String::new(),
            disks: vec![PointDisk { disk: d.clone(), seq: Seq(1), fingerprint: Digest::of(b"") }],
        };
        let ids = {
            let store = Store::open(root.path()).unwrap();
            for vm in [&a, &b, &c] {
                let h = store.register(vm, &[(d.clone(), 1 << 20)]).unwrap().remove(0);
                h.journal().append(Seq(1), &[write(&[7; 4096], 0)]).unwrap();
                h.journal().sync().unwrap();
            }
            store.catalog().add_to_group(&g, &[a.clone(), b.clone()], Some((0, 0)), 1).unwrap();
            let other = GroupName::new("other").unwrap();
            let refused =
                store.catalog().add_to_group(&other, &[c.clone(), a.clone()], Some((0, 0)), 1).unwrap_err();
            assert!(refused.to_string().contains("already in group shop"), "{refused}");
            assert_eq!(store.catalog().group_of(&c).unwrap(), None, "a refused change changes nothing");
            assert!(store.catalog().groups().unwrap().iter().all(|r| r.name != other), "nor makes the group");
            // Added again to its own group: nothing to do.
            store.catalog().add_to_group(&g, std::slice::from_ref(&a), None, 1).unwrap();
            assert_eq!(store.catalog().group_of(&a).unwrap(), Some(g.clone()));
            let app = store.make_group_point(&g, vec![cut(&a, true), cut(&b, true)]).unwrap();
            assert_eq!((app[0].id, app[1].vm.as_str()), (app[1].id, "b"));
            let own = store.make_point(&a, now_ms(), Consistency::Crash, "", cut(&a, false).disks).unwrap();
            let crash = store.make_group_point(&g, vec![cut(&a, false), cut(&b, false)]).unwrap();
            // A cut beyond what is durable on one member refuses the whole point.
            let mut bad = cut(&b, false);
            bad.disks[0].seq = Seq(2);
            assert!(store.make_group_point(&g, vec![cut(&a, false), bad]).is_err());
            let resolve = |vm: &VmName, spec: &str| store.resolve_point(vm, &PointSpec::parse(spec).unwrap());
            assert_eq!(resolve(&a, "latest-multi-vm").unwrap().id, crash[0].id);
            assert_eq!(resolve(&b, "latest-multi-vm-app").unwrap().id, app[0].id);
            assert_eq!(resolve(&a, "latest").unwrap().id, crash[0].id);
            assert!(own.id < crash[0].id && own.group.is_none());
            // Pruned on one member: the common point is the older one.
            store.catalog().delete_points(&b, &[crash[0].id]).unwrap();
            assert_eq!(resolve(&a, "latest-multi-vm").unwrap().id, app[0].id);
            // A VM in no group: its latest processed point.
            let c_own = store.make_point(&c, now_ms(), Consistency::Crash, "", cut(&c, false).disks).unwrap();
            assert_eq!(resolve(&c, "latest-multi-vm").unwrap().id, c_own.id);
            assert!(resolve(&c, "latest-multi-vm-app").is_err());
            (app[0].id, crash[0].id)
        };
        let store = Store::open(root.path()).unwrap();
        let p = store.resolve_point(&a, &PointSpec::Id(ids.0)).unwrap();
        assert_eq!((p.group.as_ref(), p.consistency), (Some(&g), Consistency::App));
        drop(store);
        std::fs::remove_file(root.path().join("catalog.db")).unwrap();
        let _ = std::fs::remove_file(root.path().join("catalog.db-wal"));
        let _ = std::fs::remove_file(root.path().join("catalog.db-shm"));
        let report = rebuild_catalog(root.path()).unwrap();
        let store = Store::open(root.path()).unwrap();
        let p = store.resolve_point(&b, &PointSpec::Id(ids.0)).unwrap_or_else(|e| panic!("{e}: {report:?}"));
        assert_eq!(p.group.as_ref(), Some(&g), "the bookmark brings the group back");
        assert_eq!(store.resolve_point(&a, &PointSpec::Id(ids.1)).unwrap().group.as_ref(), Some(&g));
    }

    #[test]
    fn scratch_copies_left_by_a_crash_go_at_open() {
        let root = tempfile::tempdir().unwrap();
        drop(Store::open(root.path()).unwrap());
        std::fs::create_dir_all(root.path().join("tmp")).unwrap();
        std::fs::write(root.path().join("tmp/hash-vm-sda-1-0.raw"), b"x").unwrap();
        drop(Store::open(root.path()).unwrap());
        assert_eq!(std::fs::read_dir(root.path().join("tmp")).unwrap().count(), 0);
    }

    /// A damaged record before the end of the last segment cuts acknowledged records off:
    /// the points that needed them are removed at open and the disk gets a new epoch; the
    /// point before the damage still fails over byte for byte. A torn tail past the last
    /// point (a crash) changes neither.
    #[test]
    fn a_journal_shorter_than_its_points_drops_them_and_starts_a_new_epoch() {
        let root = tempfile::tempdir().unwrap();
        let vm = VmName::new("vm1").unwrap();
        let d = DiskName::new("sda").unwrap();
        let size = 1u64 << 20;
        let mut image = vec![0u8; size as usize];
        let point = |store: &Store, image: &[u8], seq: u64| {
            let mut fp = Fingerprint::new();
            fp.push_data(image);
            let disks = vec![PointDisk { disk: d.clone(), seq: Seq(seq), fingerprint: fp.finish() }];
            store.make_point(&vm, now_ms(), Consistency::Crash, "", disks).unwrap().id
        };
        let (first, generation) = {
            let store = Store::open(root.path()).unwrap();
            let h = store.register(&vm, &[(d.clone(), size)]).unwrap().remove(0);
            image[..4096].fill(1);
            h.journal().append(Seq(1), &[write(&image[..4096], 0)]).unwrap();
            h.journal().sync().unwrap();
            let first = point(&store, &image, 1);
            image[8192..12288].fill(2);
            image[16384..20480].fill(3);
            h.journal()
                .append(Seq(2), &[write(&image[8192..12288], 8192), write(&image[16384..20480], 16384)])
                .unwrap();
            h.journal().sync().unwrap();
            point(&store, &image, 3);
            // A fourth record, synced, then torn by a crash: nothing past the points.
            h.journal().append(Seq(4), &[write(&[4u8; 4096], 0)]).unwrap();
            h.journal().sync().unwrap();
            (first, h.generation())
        };
        let seg = std::fs::read_dir(root.path().join("vms/vm1/sda/journal"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "seg"))
            .unwrap();
        let len = std::fs::metadata(&seg).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 10).unwrap();
        {
            let store = Store::open(root.path()).unwrap();
            assert_eq!(store.points(&vm).unwrap().len(), 2, "a torn tail past the points keeps them");
            assert_eq!(store.disk(&vm, &d).unwrap().generation(), generation);
        }
        // Bit rot in record 2 (the third record header in the segment: 1, bookmark, 2).
        let mut bytes = std::fs::read(&seg).unwrap();
        let at = bytes.windows(4).enumerate().filter(|(_, w)| w == b"TRNR").nth(2).unwrap().0;
        bytes[at + format::RECORD_HEADER_LEN + 1] ^= 0x40;
        std::fs::write(&seg, &bytes).unwrap();
        let store = Store::open(root.path()).unwrap();
        let ids: Vec<PointId> = store.points(&vm).unwrap().iter().map(|p| p.id).collect();
        assert_eq!(ids, [first], "the point past the damage is gone");
        let h = store.disk(&vm, &d).unwrap();
        assert_ne!(h.generation(), generation, "the sender must compare hashes, not trust its state");
        assert_eq!(h.journal().durable(), Seq(1));
        let out = root.path().join("out");
        let res =
            store.test_failover(&vm, &PointSpec::LatestProcessed, &out, Format::Raw, &mut |_, _| {}).unwrap();
        let mut want = vec![0u8; size as usize];
        want[..4096].fill(1);
        assert_eq!(res.disks[0].blake3, Digest::of(&want).to_hex());
        // Numbering goes on from the journal's end; the resent records land there.
        h.journal().append(Seq(2), &[write(&image[8192..12288], 8192)]).unwrap();
        assert_eq!(h.journal().sync().unwrap(), Seq(2));
    }

    /// A catalog older than the stored data (restored from a backup) is found at open: VM
    /// data it does not know refuses the start; points a base image has moved past, or a
    /// base image gone that records were folded into, mark the VM damaged, saying what to
    /// do (W19-D: the server started, and listed points that did not recover).
    #[test]
    fn a_catalog_older_than_the_stored_data_is_found_at_open() {
        let root = tempfile::tempdir().unwrap();
        let (vm, d) = (VmName::new("vm1").unwrap(), DiskName::new("sda").unwrap());
        let size = 1u64 << 20;
        let mut image = vec![0u8; size as usize];
        let point_at = |store: &Store, image: &[u8], seq: u64| {
            let mut fp = Fingerprint::new();
            fp.push_data(image);
            let disks = vec![PointDisk { disk: d.clone(), seq: Seq(seq), fingerprint: fp.finish() }];
            store.make_point(&vm, now_ms(), Consistency::Crash, "", disks).unwrap().id
        };
        {
            let store = Store::open(root.path()).unwrap();
            let h = store.register(&vm, &[(d.clone(), size)]).unwrap().remove(0);
            for i in 1..=10u64 {
                let data = incompressible(i, 4096);
                image[(i * 4096) as usize..][..4096].copy_from_slice(&data);
                h.journal().append(Seq(i), &[write(&data, i * 4096)]).unwrap();
                h.journal().sync().unwrap();
                if i == 3 || i == 8 {
                    point_at(&store, &image, i);
                }
            }
        }
        // The base image moved past point 1 (at record 3): a fold the catalog does not know.
        rebuild::mark_base(root.path(), &vm, &d, Seq(5)).unwrap();
        let store = Store::open(root.path()).unwrap();
        let why = store.damaged(&vm).expect("the VM is marked").to_string();
        assert!(why.contains("older than") && why.contains("--rebuild-catalog"), "{why}");
        drop(store);
        rebuild::mark_base(root.path(), &vm, &d, Seq(3)).unwrap();
        let store = Store::open(root.path()).unwrap();
        assert!(store.damaged(&vm).is_none(), "no point is behind the base");
        // Records folded into a base image that is then lost.
        let h = store.disk(&vm, &d).unwrap();
        store.advance_base(&h, Seq(3)).unwrap();
        drop((h, store));
        std::fs::remove_file(root.path().join("vms/vm1/sda/base.img")).unwrap();
        let store = Store::open(root.path()).unwrap();
        let why = store.damaged(&vm).expect("the VM is marked").to_string();
        assert!(why.contains("base image") && why.contains("is gone"), "{why}");
        drop(store);
        // A catalog that does not know the VM at all: no start.
        for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
            let _ = std::fs::remove_file(root.path().join(f));
        }
        drop(Catalog::open(&root.path().join("catalog.db")).unwrap());
        let Err(err) = Store::open(root.path()) else {
            panic!("a catalog that does not know vm1 is refused")
        };
        assert!(matches!(err, StoreError::CatalogBehind { .. }) && err.to_string().contains("vm1"), "{err}");
        assert!(err.is_for_good());
    }

    /// Bit rot in a closed segment (which opening does not read) found by a read: the
    /// damage is noted, no point is made and no retention runs on the VM meanwhile, and the
    /// points before the damage still fail over. The next open cuts the journal at the
    /// damage (the bytes set aside), removes the points past it and starts a new epoch.
    #[test]
    fn a_damaged_record_found_by_a_read_stops_points_and_the_next_open_cuts_there() {
        let root = tempfile::tempdir().unwrap();
        let vm = VmName::new("vm1").unwrap();
        let d = DiskName::new("sda").unwrap();
        let size = 1u64 << 20;
        let mut image = vec![0u8; size as usize];
        // Incompressible pages: about two records to a 2 KiB segment.
        let page = |i: u64| incompressible(i, 1024);
        let options = || StoreOptions { segment_bytes: Some(2 << 10), ..Default::default() };
        let mut ids = Vec::new();
        let generation = {
            let store = Store::open_with(root.path(), options()).unwrap();
            let h = store.register(&vm, &[(d.clone(), size)]).unwrap().remove(0);
            for i in 1..=20u64 {
                let data = page(i);
                let at = (i * 4096) as usize;
                image[at..at + 1024].copy_from_slice(&data);
                h.journal().append(Seq(i), &[write(&data, i * 4096)]).unwrap();
                h.journal().sync().unwrap();
                if [2, 10, 20].contains(&i) {
                    let mut fp = Fingerprint::new();
                    fp.push_data(&image);
                    let disks = vec![PointDisk { disk: d.clone(), seq: Seq(i), fingerprint: fp.finish() }];
                    ids.push(store.make_point(&vm, now_ms(), Consistency::Crash, "", disks).unwrap().id);
                }
            }
            h.generation()
        };
        // The closed segment that holds seq 6: its first record's payload flipped.
        let dir = root.path().join("vms/vm1/sda/journal");
        let mut segs: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .map(|p| (p.file_stem().unwrap().to_str().unwrap().parse().unwrap(), p))
            .collect();
        segs.sort();
        let (first, seg) = segs.iter().rev().find(|(n, _)| *n <= 6).unwrap().clone();
        assert!(first > 2 && segs.last().unwrap().0 > 6, "{segs:?}");
        let mut bytes = std::fs::read(&seg).unwrap();
        let at = bytes.windows(4).position(|w| w == b"TRNR").unwrap();
        bytes[at + format::RECORD_HEADER_LEN + 1] ^= 0x40;
        std::fs::write(&seg, &bytes).unwrap();

        let store = Store::open_with(root.path(), options()).unwrap();
        assert_eq!(store.points(&vm).unwrap().len(), 3, "opening reads no closed segment");
        let out = root.path().join("out");
        let err =
            store.test_failover(&vm, &PointSpec::Id(ids[2]), &out, Format::Raw, &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, StoreError::SegmentCorrupt { .. }), "{err}");
        let _ = store.test_failover_cleanup(&vm);
        let why = store.journal_damage(&vm).expect("the damage is noted");
        assert!(why.contains("restart") && why.contains(&format!("{first:020}.seg")), "{why}");
        assert!(dir.join("damaged").exists());
        let h = store.disk(&vm, &d).unwrap();
        let disks = vec![PointDisk { disk: d.clone(), seq: Seq(20), fingerprint: Digest::of(b"x") }];
        let refused = store.make_point(&vm, now_ms(), Consistency::Crash, "", disks).unwrap_err();
        assert!(matches!(refused, StoreError::JournalDamaged { .. }), "{refused}");
        let retention = store.apply_retention(&vm, now_ms() + 10 * 86_400_000).unwrap_err();
        assert!(matches!(retention, StoreError::JournalDamaged { .. }), "{retention}");
        assert_eq!(store.points(&vm).unwrap().len(), 3, "retention pruned nothing");
        drop(h);
        drop(store);

        let store = Store::open_with(root.path(), options()).unwrap();
        let kept: Vec<PointId> = store.points(&vm).unwrap().iter().map(|p| p.id).collect();
        assert_eq!(kept, [ids[0]], "the points past the damage are gone, the one before stays");
        let h = store.disk(&vm, &d).unwrap();
        assert_eq!(h.journal().durable(), Seq(first - 1), "cut at the damaged record");
        assert_ne!(h.generation(), generation, "the agent compares hashes and resends");
        assert!(store.journal_damage(&vm).is_none() && !dir.join("damaged").exists());
        assert!(
            std::fs::read_dir(&dir).unwrap().any(|e| e
                .unwrap()
                .path()
                .to_string_lossy()
                .ends_with(".seg.cut"))
        );
        let res =
            store.test_failover(&vm, &PointSpec::Id(ids[0]), &out, Format::Raw, &mut |_, _| {}).unwrap();
        let mut want = vec![0u8; size as usize];
        for i in 1..=2u64 {
            want[(i * 4096) as usize..(i * 4096 + 1024) as usize].copy_from_slice(&page(i));
        }
        assert_eq!(res.disks[0].blake3, Digest::of(&want).to_hex());
        // The resent records go on from the cut, and points are made again.
        h.journal().append(Seq(first), &[write(&page(first), first * 4096)]).unwrap();
        h.journal().sync().unwrap();
        let disks = vec![PointDisk { disk: d.clone(), seq: Seq(first), fingerprint: Digest::of(b"x") }];
        store.make_point(&vm, now_ms(), Consistency::Crash, "", disks).unwrap();
    }

    /// A segment file missing from a restored data directory (W19-D: a rebuild crossed the
    /// gap and made a disk with the records after it and without those in it). One from the
    /// middle stops a read across it like a damaged record, and the next open cuts there;
    /// a first segment gone, which an open sees by name, marks the VM damaged.
    #[test]
    fn a_segment_file_gone_from_the_data_directory_is_never_read_across() {
        let root = tempfile::tempdir().unwrap();
        let (vm, d) = (VmName::new("vm1").unwrap(), DiskName::new("sda").unwrap());
        let size = 1u64 << 20;
        let mut image = vec![0u8; size as usize];
        let mut at_point = Vec::new();
        let options = || StoreOptions { segment_bytes: Some(2 << 10), ..Default::default() };
        let mut ids = Vec::new();
        {
            let store = Store::open_with(root.path(), options()).unwrap();
            let h = store.register(&vm, &[(d.clone(), size)]).unwrap().remove(0);
            for i in 1..=20u64 {
                let data = incompressible(i, 1024);
                image[(i * 4096) as usize..][..1024].copy_from_slice(&data);
                h.journal().append(Seq(i), &[write(&data, i * 4096)]).unwrap();
                h.journal().sync().unwrap();
                if [2, 10, 20].contains(&i) {
                    let mut fp = Fingerprint::new();
                    fp.push_data(&image);
                    let disks = vec![PointDisk { disk: d.clone(), seq: Seq(i), fingerprint: fp.finish() }];
                    ids.push(store.make_point(&vm, now_ms(), Consistency::Crash, "", disks).unwrap().id);
                    at_point.push(image.clone());
                }
            }
        }
        let dir = root.path().join("vms/vm1/sda/journal");
        let segments = || {
            let mut segs: Vec<u64> = std::fs::read_dir(&dir)
                .unwrap()
                .filter_map(|e| e.unwrap().file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
                .collect();
            segs.sort_unstable();
            segs
        };
        // The segment holding record 14, between points 10 and 20.
        let gone = *segments().iter().rev().find(|&&n| n <= 14).unwrap();
        assert!(gone > 10 && segments().last().copied().unwrap() > 14, "{:?}", segments());
        std::fs::remove_file(dir.join(format!("{gone:020}.seg"))).unwrap();

        let store = Store::open_with(root.path(), options()).unwrap();
        assert!(store.damaged(&vm).is_none(), "an open reads no closed segment");
        let out = root.path().join("out");
        let err =
            store.test_failover(&vm, &PointSpec::Id(ids[2]), &out, Format::Raw, &mut |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("are missing"), "{err}");
        let _ = store.test_failover_cleanup(&vm);
        assert!(store.journal_damage(&vm).is_some(), "the gap is noted as a damage");
        let res =
            store.test_failover(&vm, &PointSpec::Id(ids[1]), &out, Format::Raw, &mut |_, _| {}).unwrap();
        assert_eq!(res.disks[0].blake3, Digest::of(&at_point[1]).to_hex(), "the point before the gap");
        store.test_failover_cleanup(&vm).unwrap();
        drop(store);
        let store = Store::open_with(root.path(), options()).unwrap();
        let kept: Vec<PointId> = store.points(&vm).unwrap().iter().map(|p| p.id).collect();
        assert_eq!(kept, ids[..2], "the point past the gap is gone, those before stay");
        assert_eq!(store.disk(&vm, &d).unwrap().journal().durable(), Seq(gone - 1), "cut at the gap");
        drop(store);

        // The first segment gone: the base holds nothing, the journal starts further on.
        std::fs::remove_file(dir.join(format!("{:020}.seg", segments()[0]))).unwrap();
        let store = Store::open_with(root.path(), options()).unwrap();
        let why = store.damaged(&vm).expect("the VM is marked").to_string();
        assert!(why.contains("journal starts at record") && why.contains("records 1 to"), "{why}");
    }

    /// A VHD holds at most 2040 GiB: a larger disk is refused before anything is written.
    #[test]
    fn a_disk_too_large_for_a_vhd_is_refused_before_anything_is_written() {
        let root = tempfile::tempdir().unwrap();
        let vm = VmName::new("big").unwrap();
        let d = DiskName::new("sda").unwrap();
        let size = failover::VHD_MAX_BYTES + (1 << 20);
        let store = Store::open(root.path()).unwrap();
        let h = store.register(&vm, &[(d.clone(), size)]).unwrap().remove(0);
        h.journal().append(Seq(1), &[write(&[7u8; 4096], 0)]).unwrap();
        h.journal().sync().unwrap();
        let disks = vec![PointDisk { disk: d, seq: Seq(1), fingerprint: Digest::of(b"x") }];
        store.make_point(&vm, now_ms(), Consistency::Crash, "", disks).unwrap();
        let out = root.path().join("out");
        let err = store
            .test_failover(&vm, &PointSpec::LatestProcessed, &out, Format::Vhd, &mut |_, _| {})
            .unwrap_err();
        assert!(matches!(err, StoreError::VhdTooLarge { .. }), "{err}");
        assert!(err.to_string().contains("--format raw"), "{err}");
        assert!(!out.join("sda.vhd").exists());
        assert!(store.test_failover_cleanup(&vm).is_err(), "no test failover was opened");
    }

    #[test]
    fn point_materialises_byte_for_byte_and_cleanup_removes_it() {
        let root = tempfile::tempdir().unwrap();
        let vm = VmName::new("vm1").unwrap();
        let d = DiskName::new("sda").unwrap();
        let size = 1u64 << 20;
        let mut image = vec![0u8; size as usize];
        {
            let store = Store::open(root.path()).unwrap();
            let h = store.register(&vm, &[(d.clone(), size)]).unwrap().remove(0);
            image[4096..8192].fill(9);
            image[100_000..100_100].fill(3);
            let recs = [write(&image[4096..8192], 4096), write(&image[100_000..100_100], 100_000)];
            h.journal().append(Seq(1), &recs).unwrap();
            h.journal().sync().unwrap();
            let mut fp = Fingerprint::new();
            fp.push_data(&image);
            store
                .make_point(
                    &vm,
                    now_ms(),
                    Consistency::Crash,
                    "",
                    vec![PointDisk { disk: d.clone(), seq: Seq(2), fingerprint: fp.finish() }],
                )
                .unwrap();
            // A later write that the point must not include.
            h.journal().append(Seq(3), &[write(&[1u8; 4096], 0)]).unwrap();
            h.journal().sync().unwrap();
            // The size of a known disk cannot change.
            assert!(matches!(
                store.register(&vm, &[(d.clone(), size * 2)]),
                Err(StoreError::DiskSizeChanged { .. })
            ));
        }
        let store = Store::open(root.path()).unwrap();
        let out = root.path().join("out");
        let res =
            store.test_failover(&vm, &PointSpec::LatestProcessed, &out, Format::Vhd, &mut |_, _| {}).unwrap();
        assert_eq!(res.disks[0].blake3, Digest::of(&image).to_hex());
        let bytes = std::fs::read(out.join("sda.vhd")).unwrap();
        assert_eq!(bytes.len() as u64, size + 512);
        assert_eq!(&bytes[..size as usize], &image[..]);
        assert!(matches!(
            store.test_failover(
                &vm,
                &PointSpec::LatestProcessed,
                &root.path().join("o2"),
                Format::Raw,
                &mut |_, _| {}
            ),
            Err(StoreError::TestFailoverOpen { .. })
        ));
        let removed = store.test_failover_cleanup(&vm).unwrap();
        assert!(removed.len() >= 2);
        assert!(!out.exists());
        assert!(matches!(
            store.resolve_point(&vm, &PointSpec::Id(PointId(7))),
            Err(StoreError::PointNotFound { .. })
        ));
    }

    #[test]
    fn wrong_fingerprint_fails_loudly_and_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let vm = VmName::new("vm1").unwrap();
        let d = DiskName::new("sda").unwrap();
        let h = store.register(&vm, &[(d.clone(), 1 << 20)]).unwrap().remove(0);
        h.journal().append(Seq(1), &[write(&[5u8; 4096], 0)]).unwrap();
        h.journal().sync().unwrap();
        let bogus = Digest::of(b"bogus");
        store
            .make_point(
                &vm,
                now_ms(),
                Consistency::Crash,
                "",
                vec![PointDisk { disk: d, seq: Seq(1), fingerprint: bogus }],
            )
            .unwrap();
        let out = root.path().join("out");
        let err = store
            .test_failover(&vm, &PointSpec::LatestProcessed, &out, Format::Raw, &mut |_, _| {})
            .unwrap_err();
        assert!(matches!(err, StoreError::FingerprintMismatch { .. }), "{err}");
        assert!(!out.join("sda.raw").exists());
        assert!(matches!(store.test_failover_cleanup(&vm), Err(StoreError::NoTestFailover(_))));
    }
}
