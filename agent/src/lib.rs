//! tern-agent (`mobility-agent`): tracks a VM's disks by scanning them, ships the changed
//! pages to the process server over one long-lived mTLS gRPC stream, and makes recovery
//! points at consistent cuts. It only ever dials out, and reconnects by itself.

pub mod activity;
pub mod changes;
pub mod hooks;
pub mod nbd;
pub mod scan;
mod session;
pub use session::tell_problem;
mod spill;
pub mod state;
mod stream;
pub mod tracker;

use scan::DiskSource;
use state::DiskState;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tern_core::VmName;
use tern_core::pki::Bundle;
use tern_proto as pb;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::{error, info, warn};

/// Times a checkpoint is retried when disks keep changing during the scan.
const CONSISTENT_ATTEMPTS: usize = 5;
/// Reconnecting: within about a second of the server being back (the cap), without
/// hammering it meanwhile. The backoff starts over once a session has had records acked.
const RECONNECT_FIRST: Duration = Duration::from_millis(200);
const RECONNECT_CAP: Duration = Duration::from_secs(1);
/// In nbd mode, how long a refused agent waits before it asks again.
const REFUSED_RETRY: Duration = Duration::from_secs(60);
/// How long an agent refused for a disk's size waits before it asks again (a look at the
/// disk's size and a handshake: cheap).
const DISK_SIZE_RETRY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Config {
    pub server: String,
    pub identity: Bundle,
    pub vm: VmName,
    pub disks: Vec<DiskSource>,
    pub state_dir: PathBuf,
    pub interval: Duration,
    /// Freeze/thaw commands and file systems around app-consistent points.
    pub hooks: hooks::Hooks,
    /// Shuts the source VM down before a planned failover.
    pub shutdown: Option<String>,
    /// Bytes per second on the wire at most (0: unlimited).
    pub max_rate: u64,
    /// `--mode nbd`: serve the disks over NBD and stream every write; `None` for scan mode.
    pub nbd: Option<NbdMode>,
    /// Scan mode: during a long pass (the initial sync), save each disk's state at what the
    /// server acked this often, so that a dropped link or a restart goes on from there.
    pub save_every: Duration,
}

#[derive(Debug, Clone)]
pub struct NbdMode {
    pub listen: nbd::Listen,
    /// Most bytes of writes held in memory: an eighth for the requests the NBD connections
    /// are applying (all of them together), the rest for the change log (the writes logged, in batches, sent and
    /// not acked yet).
    pub log_buffer: usize,
    /// Then at most this many in the state directory; past it the log is dropped.
    pub spill_max: u64,
    /// A unix socket's group (given its mode 0660), so that a hypervisor that does not run
    /// as the agent's user may connect: connecting needs write permission on the socket.
    pub socket_group: Option<u32>,
}

impl NbdMode {
    /// Payload bytes of the requests the NBD connections have in flight, all together, at
    /// most (a request larger than this is served alone).
    pub fn in_flight(&self) -> usize {
        self.log_buffer / 8
    }

    /// Bytes of writes the change log holds in memory, at most.
    pub fn log_memory(&self) -> usize {
        self.log_buffer - self.in_flight()
    }
}

impl AgentError {
    /// Another agent holds the state directory or a disk (or one file is given for two
    /// disks): a second agent started on them, which starting again would not mend.
    pub fn in_use(&self) -> bool {
        matches!(self, AgentError::Disk { .. })
            || matches!(self, AgentError::StateDir { source, .. } | AgentError::Nbd { source, .. }
            if source.kind() == std::io::ErrorKind::WouldBlock)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the process server refused this agent: {0}")]
    Refused(String),
    // The cause is the error's source: `{e:#}` prints it once, after the message.
    #[error("state directory {path}")]
    StateDir { path: String, source: std::io::Error },
    #[error("serving the disks over NBD at {listen}")]
    Nbd { listen: String, source: std::io::Error },
    #[error("disk {disk} ({path})")]
    Disk { disk: String, path: String, source: std::io::Error },
    /// A disk the server now takes at a new size: a restart protects it (exit 1).
    #[error("{0}")]
    Resized(String),
}

/// Runs until `shutdown` or, in scan mode, a permanent refusal (wrong identity, bad disk).
/// In nbd mode a refusal is asked again every minute, the disks served meanwhile.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|source| AgentError::StateDir { path: config.state_dir.display().to_string(), source })?;
    // Held while the agent runs: two agents on one state directory would overwrite each
    // other's saved state and, in nbd mode, its socket.
    let _lock = lock_state_dir(&config.state_dir)?;
    if let Some(undone) = config.hooks.recover() {
        warn!(undone, "the last run stopped while the VM was quiesced (killed?); its freeze is undone");
    }
    let tracker = match &config.nbd {
        Some(m) => Some(serve_nbd(&config, m)?),
        None => {
            for d in &config.disks {
                activity::ActivityLog::remove(&config.state_dir, d.name.as_str());
            }
            None
        }
    };
    if config.nbd.is_none() {
        let held = lock_scanned_disks(&config.disks)?;
        follow_disk_locks(config.disks.clone(), held);
    }
    let config = Arc::new(config);
    // Ready as soon as it runs: the first session may wait for a server that is away.
    tern_proto::daemon::notify_ready();
    let result = replicate(&config, tracker.clone(), shutdown).await;
    tern_proto::daemon::notify_stopping();
    if let Some(t) = tracker {
        t.seal();
    }
    result
}

/// Sessions with the process server, one after another, until `shutdown` or, in scan mode,
/// a permanent refusal.
async fn replicate(
    config: &Arc<Config>,
    tracker: Option<Arc<tracker::Tracker>>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    // Unreachable, or gone after replication made progress: back within about a second.
    let mut reconnect = tern_core::backoff::Backoff::new(RECONNECT_FIRST, RECONNECT_CAP);
    // Welcomed, then ended by the server before anything was acked (storage full on the
    // server, a refused batch): each try costs a pass, so the tries space out further.
    let mut refused = tern_core::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    // --mode nbd: the change log's stream outlives a dropped link, so that the next
    // session goes on where the server's journal ends instead of comparing disks.
    let mut carried = None;
    // See `distrust_next`.
    let mut distrust_saved = false;
    // The last point acked, across sessions: a reconnect that finds nothing written since
    // makes no point again (see `Session::repeats_last_point`).
    let last_point = Arc::default();
    loop {
        let progress = Progress { last_point: Arc::clone(&last_point), ..Progress::default() };
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = session::session(config.clone(), tracker.clone(), shutdown.clone(), &progress, &mut carried, distrust_saved) => r,
        };
        distrust_saved = distrust_next(&progress, &outcome);
        metrics::gauge!("tern_agent_connected", "vm" => config.vm.to_string()).set(0.0);
        let wait = match outcome {
            // Told to stand down (the VM failed over). In nbd mode the agent is the VM's
            // disk, and an unplanned failover may find the source still running: the disks
            // stay served, and the server is asked again every minute (it takes the agent
            // once replication from this site is enabled again).
            Ok(()) if tracker.is_some() && !shutdown.is_cancelled() => {
                info!(
                    retry_in_s = REFUSED_RETRY.as_secs(),
                    "stood down: the disks stay served over NBD, replication waits; stop the agent once the VM is off"
                );
                REFUSED_RETRY
            }
            Ok(()) => return Ok(()),
            // A disk resized, or of size 0: often for a moment (a copy in place that truncates
            // first, a loop device detached and attached again). Asked again every 10 s, so
            // that replication goes on once it is back, and status keeps showing why
            // meanwhile, across a restart of the server too (W18-B: the agent exited for
            // good, and status said normal once the server restarted).
            Err(status) if is_permanent(status.code()) && tracker.is_none() && disk_size_refused(&status) => {
                error!(code = ?status.code(), retry_in_s = DISK_SIZE_RETRY.as_secs(), "{}", status.message());
                DISK_SIZE_RETRY
            }
            // The server took the disk at its new size (its copy was removed): this process
            // knows it at the old one. Exit 1: its unit starts it again, which protects it anew.
            Err(status) if status.message().contains(RESTART_FOR_SIZE) => {
                error!("{}", status.message());
                return Err(AgentError::Resized(status.message().to_string()));
            }
            Err(status) if is_permanent(status.code()) && tracker.is_none() => {
                error!(code = ?status.code(), "{}", status.message());
                return Err(AgentError::Refused(status.message().to_string()));
            }
            // In nbd mode the agent is the VM's disk: a refusal (a revoked identity, a disk
            // the server will not take) stops replication, not the VM. The disks stay
            // served and the change log goes on (spilling, then dropped and compared),
            // until the server takes a session again or the agent is restarted.
            Err(status) if is_permanent(status.code()) => {
                error!(code = ?status.code(), retry_in_s = REFUSED_RETRY.as_secs(),
                    "{}; the disks stay served over NBD, replication waits", status.message());
                REFUSED_RETRY
            }
            Err(status) => transient_delay(&status, &progress, &mut reconnect, &mut refused),
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// How long to wait before the next session after one that ended for a reason that may
/// pass (a dropped link, the server's storage full, a refused batch), logged with its
/// cause. `reconnect` and `refused` are the backoffs of `replicate`: both start over once a
/// session made progress.
fn transient_delay(
    status: &tonic::Status,
    progress: &Progress,
    reconnect: &mut tern_core::backoff::Backoff,
    refused: &mut tern_core::backoff::Backoff,
) -> Duration {
    if progress.acked.load(std::sync::atomic::Ordering::Relaxed) {
        reconnect.reset();
        refused.reset();
    }
    // A connection that died under the session (reset, a dead link) says nothing of the
    // server: back within about a second, however often it happens. The longer waits are
    // for what the server itself said.
    let from_server = std::error::Error::source(status).is_none();
    let delay = if from_server
        && progress.welcomed.load(std::sync::atomic::Ordering::Relaxed)
        && !progress.acked.load(std::sync::atomic::Ordering::Relaxed)
    {
        refused.next_delay()
    } else {
        reconnect.next_delay()
    };
    // The transport's cause, where it has one ("transport error" alone says little).
    let error = match std::error::Error::source(status) {
        Some(cause) => format!("{}: {}", status.message(), pb::error_chain(cause)),
        None => status.message().to_string(),
    };
    warn!(code = ?status.code(), error, retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        "session with the process server ended; reconnecting");
    delay
}

/// Scan mode: whether the next session compares with the server's block hashes instead of
/// going on from the saved state. So when the session that ended went on from a saved
/// state, sent again whole blocks that records past it wrote (the server could not give
/// their page values), and was cut before it saved anything: on a link that drops sooner
/// than a save can be had (it is written once the acks of its records come), going on so
/// would send the same blocks at every session and never get further. Not after the
/// server's storage filled: the comparison would have it make a scratch copy of every
/// block written since its base image, room a full server lacks (W16: freeing 25 MB did
/// not get replication going again).
fn distrust_next(progress: &Progress, outcome: &Result<(), tonic::Status>) -> bool {
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    let full = matches!(outcome, Err(s) if s.code() == tonic::Code::ResourceExhausted);
    progress.resumed_past.load(relaxed) && !progress.saved.load(relaxed) && !full
}

/// Takes the state directory's lock file (`DIR/lock`, an exclusive flock).
fn lock_state_dir(dir: &std::path::Path) -> Result<std::fs::File, AgentError> {
    let path = dir.join("lock");
    let err = |source| AgentError::StateDir { path: path.display().to_string(), source };
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(err)?;
    match tern_core::disk::try_lock_exclusive(&f) {
        Ok(true) => Ok(f),
        Ok(false) => Err(AgentError::StateDir {
            path: dir.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "in use by another agent (its lock file is held): each agent needs its own --state-dir",
            ),
        }),
        Err(e) => Err(err(e)),
    }
}

/// Scan mode: takes each disk's lock (an exclusive flock, as nbd mode does), held while the
/// agent runs, so that a second agent given the same file (another VM's `--disk`, a unit
/// file copied and not quite edited) is refused at start instead of protecting one VM's
/// disk as another's (W17: it replicated, normal, with nothing said). Only a regular file
/// on a local file system: a block device's lock tells udev the device is being
/// partitioned, and on NFS (or SMB, FUSE, cluster file systems) a flock becomes a lock of
/// the whole file that would keep the hypervisor from taking its own. A disk that cannot
/// be opened now is left to the session to report.
/// How often a scan-mode agent looks whether a disk's path names another file than the one
/// whose lock it holds.
const LOCK_FOLLOW_EVERY: Duration = Duration::from_secs(10);

/// Keeps each disk's lock on the file its path names now: a disk replaced under the agent
/// (`mv` over it, a symlink pointed elsewhere) has its new file locked and the old one let
/// go, so that another agent given the new file is refused and one given the old one is
/// not (W18-B: the lock stayed on the old file). A new file another agent holds is said in
/// the log. The thread lives as long as the process; it holds the locks.
fn follow_disk_locks(disks: Vec<DiskSource>, mut held: Vec<Option<std::fs::File>>) {
    use std::os::unix::fs::MetadataExt;
    let id = |m: &std::fs::Metadata| (m.dev(), m.ino());
    let spawned = std::thread::Builder::new().name("disk-locks".into()).spawn(move || {
        let mut told: Vec<Option<(u64, u64)>> = vec![None; disks.len()];
        loop {
            std::thread::sleep(LOCK_FOLLOW_EVERY);
            for ((d, lock), told) in disks.iter().zip(&mut held).zip(&mut told) {
                let Ok(now) = std::fs::metadata(&d.path) else { continue };
                if !now.is_file() || lock.as_ref().and_then(|f| f.metadata().ok()).is_some_and(|m| id(&m) == id(&now)) {
                    continue;
                }
                let Ok(f) = std::fs::File::open(&d.path) else { continue };
                if !local_file_system(&f) || f.metadata().map_or(true, |m| id(&m) != id(&now)) {
                    continue;
                }
                match tern_core::disk::try_lock_exclusive(&f) {
                    Ok(true) => {
                        info!(disk = %d.name, path = %d.path.display(), "the disk's path names another file now: its lock follows it");
                        *lock = Some(f);
                        *told = None;
                    }
                    Ok(false) if *told != Some(id(&now)) => {
                        error!(disk = %d.name, path = %d.path.display(),
                            "the disk's path names another file now, which another agent reads (it holds the \
                             file's lock): each disk belongs to one VM's agent; check both agents' --disk");
                        *told = Some(id(&now));
                    }
                    _ => {}
                }
            }
        }
    });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the thread that keeps the disks' locks on their files");
    }
}

fn lock_scanned_disks(disks: &[DiskSource]) -> Result<Vec<Option<std::fs::File>>, AgentError> {
    use std::os::unix::fs::MetadataExt;
    let mut held: Vec<(std::fs::File, (u64, u64), &DiskSource)> = Vec::new();
    for d in disks {
        let Ok(f) = std::fs::File::open(&d.path) else { continue };
        let Ok(m) = f.metadata() else { continue };
        if !m.is_file() || !local_file_system(&f) {
            continue;
        }
        let err = |source| AgentError::Disk {
            disk: d.name.to_string(),
            path: d.path.display().to_string(),
            source,
        };
        if let Some((_, _, first)) = held.iter().find(|h| h.1 == (m.dev(), m.ino())) {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the same file as disk {} ({}): each --disk needs a file of its own",
                    first.name,
                    first.path.display()
                ),
            )));
        }
        if !tern_core::disk::try_lock_exclusive(&f).map_err(err)? {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "another agent reads this file (it holds the disk's lock): each disk belongs to one \
                 VM's agent. Check this agent's --disk (was the path meant for another VM?), or stop \
                 the other agent first",
            )));
        }
        held.push((f, (m.dev(), m.ino()), d));
    }
    // Per disk, in order: the lock held, if any.
    Ok(disks
        .iter()
        .map(|d| {
            let i = held.iter().position(|h| std::ptr::eq(h.2, d))?;
            Some(held.remove(i).0)
        })
        .collect())
}

/// Whether `f` is on a file system of this host's own (where a flock is not a lock the
/// file's other users, the hypervisor among them, see).
pub(crate) fn local_file_system(f: &std::fs::File) -> bool {
    // ext2/3/4, XFS, Btrfs, tmpfs, ZFS, F2FS, bcachefs, overlayfs (a container's).
    const LOCAL: [i64; 8] =
        [0xEF53, 0x5846_5342, 0x9123_683E, 0x0102_1994, 0x2FC1_2FC1, 0xF2F5_2010, 0xCA45_1A4E, 0x794C_7630];
    // f_type's width differs between targets.
    #[allow(clippy::useless_conversion)]
    rustix::fs::fstatfs(f).is_ok_and(|s| LOCAL.contains(&i64::from(s.f_type)))
}

/// Opens the disks for the io path and serves them; the exports stay up whatever
/// happens to the sessions with the process server.
fn serve_nbd(config: &Config, m: &NbdMode) -> Result<Arc<tracker::Tracker>, AgentError> {
    let err = |source| AgentError::Nbd { listen: m.listen.to_string(), source };
    let disks: Vec<_> = config.disks.iter().map(|d| (d.name.clone(), d.path.clone())).collect();
    let tracker =
        tracker::Tracker::open(&disks, &config.state_dir, m.log_memory(), m.spill_max).map_err(err)?;
    let bound = nbd::serve(&m.listen, tracker.exports(), m.in_flight()).map_err(err)?;
    if let (nbd::Listen::Unix(path), Some(gid)) = (&bound, m.socket_group) {
        use std::os::unix::fs::PermissionsExt;
        std::os::unix::fs::chown(path, None, Some(gid))
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)))
            .map_err(err)?;
    }
    let names: Vec<&str> = config.disks.iter().map(|d| d.name.as_str()).collect();
    info!(listen = %bound, exports = ?names, "serving the disks over NBD");
    if let nbd::Listen::Tcp(addr) = &bound
        && !addr.ip().is_loopback()
    {
        // NBD has no authentication here, nor TLS: whoever reaches the port reads and
        // writes the VM's disks.
        warn!(listen = %bound, "the disks are served to anyone who can reach this address, without \
            authentication or encryption: prefer a unix socket (--nbd-listen unix:PATH) or a loopback \
            address, or keep the port behind a firewall");
    }
    Ok(tracker)
}

/// Lowers the calling thread's priority (nice 10): replication work in nbd mode yields the
/// CPU to the VM's writes, and falls behind (the log spills) rather than slow them.
pub(crate) fn lower_priority() {
    if let Err(e) = tern_core::disk::lower_thread_priority() {
        tracing::debug!(error = %e, "cannot lower a thread's priority");
    }
}

/// Whether this agent's identity has expired or soon will, with what to do.
pub fn identity_expiry(config: &Config) -> tern_core::pki::Expiry {
    let renew = format!(
        "enroll a new one (`drctl enroll agent --vm {0} --out FILE`), put it in place of this one and restart the agent",
        config.vm
    );
    config.identity.expiry(tern_core::pki::now_ms(), "this agent's identity", &renew)
}

/// Said when the server took a disk at another size than this process opened it at.
pub(crate) const RESTART_FOR_SIZE: &str = "start the agent again to protect it at its new size";

/// Whether the server refused a disk for its size (resized, or 0 bytes): see the process
/// server's `DiskSizeChanged` and Hello checks, whose messages these are.
fn disk_size_refused(status: &tonic::Status) -> bool {
    let m = status.message();
    m.contains("a resized disk cannot be replicated") || m.contains(" has size 0;")
}

fn is_permanent(code: Code) -> bool {
    matches!(
        code,
        Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument | Code::FailedPrecondition
    )
}

fn status_of(e: pb::ConnectError) -> tonic::Status {
    match e {
        pb::ConnectError::BadUrl { .. } => tonic::Status::invalid_argument(e.to_string()),
        pb::ConnectError::Unreachable { .. } => tonic::Status::unavailable(e.to_string()),
    }
}

/// Checkpoint requests: (request id, app-consistent).
type Requests = Vec<(u64, bool)>;

/// What the server asked for and has not been served yet. Filled from the inbound stream
/// whether a scan is running or not.
#[derive(Debug, Default)]
struct Inbox {
    /// Block hashes of the receiver's copy still arriving, per disk name: handed to the
    /// scan, which waits for each chunk's hashes before comparing it (so scanning starts
    /// with the first hashes instead of after the last). The disk's size decodes them.
    feeds: std::collections::HashMap<String, (u64, std::sync::mpsc::Sender<scan::HashChunk>)>,
    requests: Requests,
    /// A planned failover: run the shutdown hook, make a final point, stand down.
    shutdown: Option<u64>,
    policy: Option<pb::Policy>,
    stand_down: Option<String>,
    point_ack: Option<u64>,
    /// A multi-VM barrier asked for, and when it came.
    barrier: Option<(pb::Barrier, std::time::Instant)>,
    /// A barrier's release: its request and whether every member reached its cut.
    release: Option<(u64, bool)>,
    /// Set once the server acks records or a point: the session made progress.
    acked: Arc<std::sync::atomic::AtomicBool>,
    /// Per disk name, the last seq the server acked as durable.
    durable: std::collections::HashMap<String, u64>,
}

impl Inbox {
    /// Acks mark progress; the saved state moves with acked points, and during a long
    /// scan-mode pass with what is acked (`ScanEvent::Settle`, `ScanEvent::Mark`).
    fn take(&mut self, m: Option<pb::ServerMessage>) -> Result<(), tonic::Status> {
        let Some(msg) = m else {
            return Err(tonic::Status::unavailable("the process server closed the stream"));
        };
        match msg.msg {
            Some(pb::server_message::Msg::Checkpoint(c)) => {
                self.requests.push((c.request_id, c.app_consistent))
            }
            Some(pb::server_message::Msg::Shutdown(r)) => self.shutdown = Some(r.request_id),
            Some(pb::server_message::Msg::Barrier(b)) => self.barrier = Some((b, std::time::Instant::now())),
            Some(pb::server_message::Msg::Release(r)) => self.release = Some((r.request_id, r.proceed)),
            Some(pb::server_message::Msg::Policy(p)) => self.policy = Some(p),
            Some(pb::server_message::Msg::StandDown(s)) => self.stand_down = Some(s.reason),
            Some(pb::server_message::Msg::PointAck(p)) => {
                self.acked.store(true, std::sync::atomic::Ordering::Relaxed);
                self.point_ack = Some(p.point_id);
            }
            Some(pb::server_message::Msg::Ack(a)) => {
                self.acked.store(true, std::sync::atomic::Ordering::Relaxed);
                let d = self.durable.entry(a.disk).or_default();
                *d = (*d).max(a.durable_seq);
            }
            Some(pb::server_message::Msg::BlockHashes(bh)) => {
                let Some((size, feed)) = self.feeds.get(&bh.disk) else { return Ok(()) };
                let size = *size;
                let len = |k: usize| {
                    let block = if bh.blocks.is_empty() { bh.first_block + k as u64 } else { bh.blocks[k] };
                    tern_core::blocks::block_len(size, block)
                };
                let in_range = |k: usize| bh.blocks.is_empty() || k < bh.blocks.len();
                let decoded = pb::hash_table::decode(&bh.table, |k| if in_range(k) { len(k) } else { 0 })
                    .filter(|d| bh.blocks.is_empty() || d.len() == bh.blocks.len());
                // Sends fail only when the scan has ended: nobody is left to hear the rest.
                match decoded {
                    Some(entries) if !bh.blocks.is_empty() => {
                        drop(
                            feed.send(scan::HashChunk::Pages(
                                bh.blocks.iter().copied().zip(entries).collect(),
                            )),
                        );
                    }
                    Some(entries) => drop(feed.send(scan::HashChunk::Range(bh.first_block, entries))),
                    None if !bh.blocks.is_empty() => {
                        warn!(disk = %bh.disk, "malformed page hashes; those blocks are sent whole");
                        // Unknown entries: every page of those blocks differs, so each goes whole.
                        let unknown = bh.blocks.iter().map(|&b| (b, state::UNKNOWN)).collect();
                        drop(feed.send(scan::HashChunk::Pages(unknown)));
                    }
                    None => warn!(disk = %bh.disk, "malformed block hashes; those blocks are sent whole"),
                }
                if bh.last {
                    drop(feed.send(scan::HashChunk::End));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// When the agent makes points by itself.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    crash: Duration,
    app: Duration,
    /// Only points that are asked for (a failback that syncs during the failover).
    hold: bool,
}

impl Schedule {
    fn from_policy(p: Option<&pb::Policy>, fallback: Duration) -> Schedule {
        let ms = |v: u64| if v == 0 { fallback } else { Duration::from_millis(v) };
        Schedule {
            crash: ms(p.map_or(0, |p| p.crash_interval_ms)),
            app: ms(p.map_or(0, |p| p.app_interval_ms)),
            hold: p.is_some_and(|p| p.hold),
        }
    }

    /// When the next scheduled pass of each kind is due, counting from `now`.
    fn due(&self, now: tokio::time::Instant, first: bool) -> (tokio::time::Instant, tokio::time::Instant) {
        let far = now + Duration::from_secs(100 * 365 * 86_400);
        if self.hold {
            return (far, far);
        }
        (if first { now } else { now + self.crash }, now + self.app)
    }
}

/// How far a session came: welcomed, and records or a point acked.
#[derive(Debug, Default)]
struct Progress {
    welcomed: std::sync::atomic::AtomicBool,
    acked: Arc<std::sync::atomic::AtomicBool>,
    /// Scan mode: the session went on from a saved state that the server holds records
    /// past, and sends blocks they wrote again whole (without the server's page values).
    resumed_past: std::sync::atomic::AtomicBool,
    /// The saved state was written in this session (a point acked, or a pass's progress).
    saved: Arc<std::sync::atomic::AtomicBool>,
    /// The last point the server acked to this process, whichever session made it.
    last_point: Arc<std::sync::Mutex<Option<PointMade>>>,
}

/// What a point says of the disks, and when it was made.
#[derive(Debug, Clone, PartialEq)]
struct PointMade {
    /// Per disk: the generation of the server's journal, the point's seq and fingerprint.
    disks: Vec<(String, u64, Vec<u8>)>,
    time_ms: i64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Picks, per disk, what to compare the disk with: the saved state when it describes the
/// server's copy, zeroes for a new copy, the server's hashes (filled in afterwards) when it
/// sends them, and "unknown" (send everything with data) otherwise.
/// The second value tells, per disk, whether its saved state was trusted (then only what
/// changed since it was committed needs comparing); the third, whether blocks that records
/// past a trusted state wrote are sent whole (forgotten, without the server's page values).
fn choose_states(
    config: &Config,
    welcome: &pb::Welcome,
    saved: Vec<Option<DiskState>>,
) -> std::io::Result<(Vec<DiskState>, Vec<bool>, bool)> {
    let mut states = Vec::with_capacity(config.disks.len());
    let mut resumed = Vec::with_capacity(config.disks.len());
    let mut resent = false;
    for (d, saved) in config.disks.iter().zip(saved) {
        let w = welcome.disks.iter().find(|w| w.name == d.name.as_str());
        let (generation, durable) = w.map_or((String::new(), 0), |w| (w.generation.clone(), w.durable_seq));
        let trusted = w.is_some_and(|w| !w.state_invalid);
        let path = DiskState::path(&config.state_dir, d.name.as_str());
        let trusted_saved =
            matches!(&saved, Some(s) if trusted && s.generation == generation && s.seq.0 <= durable);
        resumed.push(trusted_saved);
        let state = match saved {
            Some(mut s) if trusted && s.generation == generation && s.seq.0 <= durable => {
                let doubtful = w.map_or(&[][..], |w| &w.doubtful[..]);
                let pages = w.map(|w| server_pages(&w.doubtful_pages)).unwrap_or_default();
                let (kept, forgotten) =
                    s.forget_but_pages(doubtful.iter().map(|r| (r.offset, r.length)), &pages);
                if forgotten > 0 {
                    info!(disk = %d.name, blocks = forgotten, state_seq = s.seq.0, durable,
                        "the server holds records past the saved state; sending the blocks they wrote again (read anew)");
                }
                if kept > 0 {
                    info!(disk = %d.name, blocks = kept, state_seq = s.seq.0, durable,
                        "the server holds records past the saved state; comparing the pages they wrote with the \
                         server's, page by page");
                }
                if kept + forgotten == 0 {
                    info!(disk = %d.name, "saved state matches the server's copy; sending only changes");
                }
                resent |= forgotten > 0;
                s
            }
            _ if welcome.hashes_follow.iter().any(|h| h == d.name.as_str()) => {
                DiskState::unknown(&path, d.size, &generation)?
            }
            _ if durable == 0 => DiskState::zeroes(&path, d.size, &generation)?,
            _ => {
                warn!(disk = %d.name, "no saved state for the server's copy; every block with data is sent again");
                DiskState::unknown(&path, d.size, &generation)?
            }
        };
        states.push(state);
    }
    Ok((states, resumed, resent))
}

/// `DiskState.doubtful_pages`: page index to the server's page value.
fn server_pages(bytes: &[u8]) -> std::collections::HashMap<u64, tern_core::Digest> {
    bytes
        .chunks_exact(40)
        .filter_map(|c| {
            let (index, value) = c.split_at(8);
            Some((u64::from_be_bytes(index.try_into().ok()?), tern_core::Digest::from_slice(value)?))
        })
        .collect()
}

/// A point is acked: each disk's state vouches for its seq from now on. False when a
/// state could not be saved.
fn commit_states(config: &Config, states: &mut [DiskState], seqs: &[tern_core::Seq]) -> bool {
    let mut all = true;
    for ((d, s), seq) in config.disks.iter().zip(states).zip(seqs) {
        if let Err(e) = s.commit(*seq) {
            warn!(disk = %d.name, error = %e, "cannot save agent state; a restart will compare the disk in full");
            all = false;
        }
    }
    all
}

/// The help text and units of the agent's metrics (`--metrics ADDR`).
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_gauge!("tern_agent_connected", "1 while the agent has a session with the process server.");
    describe_counter!("tern_agent_points_total", "Recovery points the agent has made.");
    describe_gauge!(
        "tern_agent_last_point_timestamp_seconds",
        Unit::Seconds,
        "Time of the agent's last point."
    );
    describe_counter!(
        "tern_agent_sent_bytes_total",
        Unit::Bytes,
        "Bytes the agent has sent to the process server."
    );
}

/// The agent's counters exist from the start at 0, so that `rate()` and `increase()` see an
/// agent that has sent nothing yet, or nothing since a restart.
pub fn zero_counters(vm: &VmName) {
    metrics::counter!("tern_agent_sent_bytes_total", "vm" => vm.to_string()).increment(0);
    metrics::counter!("tern_agent_points_total", "vm" => vm.to_string()).increment(0);
}
