//! One session with the process server: `Hello`, `Welcome`, then passes and points until
//! the stream ends, the server tells the agent to stand down, or the agent stops.

use crate::scan::{self, PassResult, ScanError, ScanEvent};
use crate::state::DiskState;
use crate::{
    CONSISTENT_ATTEMPTS, Config, Inbox, Progress, Requests, Schedule, choose_states, commit_states, hooks,
    now_ms, status_of,
};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};
use tern_core::Seq;
use tern_proto as pb;
use tokio::sync::mpsc;
use tokio::time::Instant as Due;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, info, warn};

mod barrier;
mod nbd;

/// How a session ends, inside: a status, or the stream closed under a send (the server's
/// reason, if it gives one, is then read from the inbound stream).
#[derive(Debug)]
enum SessionError {
    Status(Status),
    StreamClosed,
}

impl From<Status> for SessionError {
    fn from(s: Status) -> Self {
        SessionError::Status(s)
    }
}

type Feeds = Vec<Option<Receiver<scan::HashChunk>>>;

/// A consistent pass: the pass, whether it was frozen, and the point's note.
type Consistent = (PassResult, bool, String);

/// Why a pass gave no consistent cut; `lasting` when none will come until someone acts.
struct NoCut {
    reason: String,
    lasting: bool,
}

/// Scheduled points missed in a row (the disks kept changing) before the server is told,
/// which shows it in status until a point is made.
const MISSES_TOLD: u32 = 3;
/// The longest the process server may take to answer a session's opening call.
const OPEN_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);
/// How often a long scan-mode pass says how far it has come.
const PASS_REPORT_EVERY: Duration = Duration::from_secs(2);
/// How often the state directory is tried after a table failed (see
/// `Session::state_writable_again`).
const PROBE_EVERY: Duration = Duration::from_secs(10);

/// Connects, says `Hello`, and runs the session. The error is what [`crate::run`] decides
/// on: permanent refusals stop the agent, the rest reconnect.
pub(crate) async fn session(
    config: Arc<Config>,
    tracker: Option<Arc<crate::tracker::Tracker>>,
    shutdown: CancellationToken,
    progress: &Progress,
    carried: &mut Option<nbd::LogStream>,
    distrust_saved: bool,
) -> Result<(), Status> {
    // --mode nbd: writes held for a multi-VM barrier go on however the session ends.
    let _release = tracker.clone().map(nbd::ReleaseHold);
    if let Some(t) = &tracker {
        nbd::LogStream::stop_if_dropped(carried, t).await;
    }
    // An expired identity is refused at the TLS handshake, which the server answers by
    // closing the connection: said here, where it is known, instead of "connection closed".
    match crate::identity_expiry(&config) {
        tern_core::pki::Expiry::Expired(e) => return Err(Status::unauthenticated(e)),
        // Said once a day, at a session's start: an agent that runs for months sees it.
        tern_core::pki::Expiry::Soon(w) => {
            static WARNED_DAY: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
            let day = tern_core::pki::now_ms() / 86_400_000;
            if WARNED_DAY.swap(day, std::sync::atomic::Ordering::Relaxed) != day {
                warn!("{w}");
            }
        }
        tern_core::pki::Expiry::Valid => {}
    }
    let channel = pb::connect(&config.server, &config.identity).await.map_err(status_of)?;
    let mut client = pb::replication_client::ReplicationClient::new(channel)
        .max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(pb::MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(4);
    // A carried log's session never reads the saved state: it goes on, or it ends and the
    // next one reads the state afresh.
    let saved = if carried.is_some() {
        Vec::new()
    } else if distrust_saved {
        info!(
            "the last session went on from the saved state and was cut before it could save again: \
             comparing with the server's block hashes instead of sending again what it sent"
        );
        config.disks.iter().map(|_| None).collect()
    } else {
        saved_states(&config).await?
    };
    let claims: Vec<Option<(String, u64)>> = match carried.as_ref() {
        Some(log) => log.claims().into_iter().map(Some).collect(),
        None => saved.iter().map(|s| s.as_ref().map(|s| (s.generation.clone(), s.seq.0))).collect(),
    };
    let said = hello(&config, &claims);
    // A disk the server took at another size than the agent opened (it no longer knew the
    // VM: `drctl remove` after a resize): this process cannot protect it at its new size.
    let resized: Option<String> =
        config.disks.iter().zip(&said.disks).find(|(d, h)| d.size != h.size).map(|(d, h)| {
            format!(
                "disk {} is now {} bytes, was {} when the agent started: {} (its unit does)",
                d.name,
                h.size,
                d.size,
                crate::RESTART_FOR_SIZE
            )
        });
    tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(said)) })
        .await
        .map_err(|_| Status::cancelled("stream closed"))?;
    // A server that took the connection but never answers the call must not hold the agent.
    let inbound = tokio::time::timeout(OPEN_LIMIT, client.replicate(ReceiverStream::new(rx)))
        .await
        .map_err(|_| {
            Status::unavailable(format!(
                "the process server did not answer the session within {} s",
                OPEN_LIMIT.as_secs()
            ))
        })??
        .into_inner();
    let mut s = Session::new(config, shutdown, tx, inbound, tracker.clone(), progress, carried.take());
    let result = async {
        s.welcome(saved, progress).await?;
        if let Some(why) = resized {
            return Err(Status::failed_precondition(why).into());
        }
        match tracker {
            Some(_) => s.run_nbd().await,
            None => s.run().await,
        }
    }
    .await;
    let result = match result {
        Ok(()) => Ok(()),
        Err(SessionError::Status(status)) => Err(status),
        // The server's reason (storage full, a refused batch) is in the stream's status.
        Err(SessionError::StreamClosed) => Err(server_reason(&mut s.inbound)
            .await
            .unwrap_or_else(|| Status::unavailable("the stream to the process server closed"))),
    };
    if let Some(t) = &tracker {
        *carried = s.end_log(t, &result).await;
    }
    result
}

/// Each disk's saved state in the state directory, if any.
async fn saved_states(config: &Arc<Config>) -> Result<Vec<Option<DiskState>>, Status> {
    let cfg = config.clone();
    tokio::task::spawn_blocking(move || {
        cfg.disks.iter().map(|d| DiskState::open_saved(&cfg.state_dir, d.name.as_str(), d.size)).collect()
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))
}

/// `claims`: per disk, the state the agent has of the server's copy (generation, seq).
fn hello(config: &Config, claims: &[Option<(String, u64)>]) -> pb::Hello {
    pb::Hello {
        vm: config.vm.to_string(),
        disks: config
            .disks
            .iter()
            .zip(claims)
            .map(|(d, c)| pb::DiskInfo {
                name: d.name.to_string(),
                // Scan mode reads the disk as it is now: one resized under the agent is told to
                // the server, which refuses it and shows why. nbd mode serves the size it opened.
                size: if config.nbd.is_none() {
                    tern_core::disk::DiskReader::open(&d.path).and_then(|r| r.size()).unwrap_or(d.size)
                } else {
                    d.size
                },
                state_generation: c.as_ref().map(|c| c.0.clone()).unwrap_or_default(),
                state_seq: c.as_ref().map_or(0, |c| c.1),
                source: source_of(&d.path),
                path: d.path.display().to_string(),
            })
            .collect(),
        protocol: 1,
        instance: tern_proto::instance_id().to_string(),
        time_ms: now_ms(),
        problem: String::new(),
    }
}

/// Tells the process server why the agent cannot replicate, before it exits (a disk it
/// cannot open): the server shows it in the VM's status. Best effort, within 10 s: the
/// agent's log says it anyway.
pub async fn tell_problem(
    server: &str,
    identity: &tern_core::pki::Bundle,
    vm: &tern_core::VmName,
    problem: String,
) {
    let said = async {
        let channel = pb::connect(server, identity).await.ok()?;
        let mut client = pb::replication_client::ReplicationClient::new(channel);
        let hello = pb::Hello {
            vm: vm.to_string(),
            protocol: 1,
            instance: tern_proto::instance_id().to_string(),
            time_ms: now_ms(),
            problem,
            ..Default::default()
        };
        let first = pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(hello)) };
        // The server answers with its refusal once it has noted the problem.
        client.replicate(tokio_stream::once(first)).await.err()
    };
    match tokio::time::timeout(Duration::from_secs(10), said).await {
        Ok(Some(s)) if s.message().starts_with("noted: ") => {}
        _ => warn!("could not tell the process server why the agent stops"),
    }
}

/// Which file or device `path` is: `f:DEV:INODE` for a file, `b:RDEV` for a block device
/// (empty when it cannot be told).
fn source_of(path: &std::path::Path) -> String {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => format!("b:{}", m.rdev()),
        Ok(m) => format!("f:{}:{}", m.dev(), m.ino()),
        Err(_) => String::new(),
    }
}

/// `--mode nbd`: what the first pass compares, as far as the server tells. A disk whose
/// saved state was trusted needs what the server holds past that state, and its hot
/// extents (added once the log runs); any other disk is compared whole.
fn doubtful_regions(welcome: &pb::Welcome, config: &Config, resumed: &[bool]) -> scan::Regions {
    config
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let w = welcome.disks.iter().find(|w| w.name == d.name.as_str());
            resumed.get(i).copied().unwrap_or(false).then(|| {
                w.map(|w| w.doubtful.iter().map(|x| (x.offset, x.length)).collect()).unwrap_or_default()
            })
        })
        .collect()
}

/// The status the server ended the stream with, if it says one within a moment.
async fn server_reason(inbound: &mut tonic::Streaming<pb::ServerMessage>) -> Option<Status> {
    let drain = async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), drain).await.ok().flatten()
}

struct Session {
    config: Arc<Config>,
    shutdown: CancellationToken,
    tx: mpsc::Sender<pb::AgentMessage>,
    inbound: tonic::Streaming<pb::ServerMessage>,
    inbox: Inbox,
    /// What the receiver holds, per disk (lent to a scan while it runs).
    states: Vec<DiskState>,
    /// The seq of each disk's next record.
    next_seq: Vec<Seq>,
    schedule: Schedule,
    due_crash: Due,
    due_app: Due,
    /// A point sent and not yet acked: the requests it answers and each disk's seq.
    awaiting_point: Option<(Requests, Vec<Seq>)>,
    /// The source was shut down for a failover: no more points but a final one.
    stood_down: bool,
    /// The receiver's block hashes still to come, per disk, for the first pass. In a
    /// mutex only so that the session is `Sync` (its future `Send`): it is never contended.
    feeds: std::sync::Mutex<Feeds>,
    /// `--mode nbd` while the log streams: the states, shared with the streaming thread.
    shared: Option<crate::stream::SharedStates>,
    /// `--mode nbd`: a mark made and its point not sent yet.
    pending_mark: Option<nbd::PendingMark>,
    /// Per disk: the saved state was trusted (see `choose_states`).
    resumed: Vec<bool>,
    /// `--mode nbd`: the resync keeps losing to the VM's writes, so it no longer yields.
    resync_urgent: bool,
    /// What the next pass compares, per disk (empty: everything).
    regions: scan::Regions,
    /// `--mode nbd`: the mark of the point awaiting its ack.
    awaiting_mark: Option<u64>,
    tracker: Option<Arc<crate::tracker::Tracker>>,
    /// A scan-mode barrier's frozen pass waits on this for the server's release.
    release_to: Option<(u64, std::sync::mpsc::Sender<bool>)>,
    /// How a scan-mode barrier's hold ended: released (and whether to proceed), and for how long.
    held: Option<(Option<bool>, Duration)>,
    /// `--mode nbd`: the log's stream, once the session streams it (or carried over from
    /// a session whose link dropped).
    log: Option<nbd::LogStream>,
    /// What the server holds of each disk, as its `Welcome` said: generation, durable seq.
    welcomed: Vec<(String, u64)>,
    /// Set once the saved state is written (see `Progress::saved`).
    saved: Arc<std::sync::atomic::AtomicBool>,
    /// The last point acked to this process (see `Progress::last_point`).
    last_point: Arc<std::sync::Mutex<Option<crate::PointMade>>>,
    /// The point sent and not yet acked, as it will be `last_point`.
    sent_point: Option<crate::PointMade>,
    /// No point has been sent (or found needless) in this session yet.
    first_point: bool,
    /// The last `Tracking.problem` sent (the server keeps it until told otherwise).
    problem_told: String,
    /// When the state directory was last tried after a table failed.
    probed_at: Option<Instant>,
    /// Scheduled points missed in a row for want of a consistent cut.
    missed: u32,
    /// When a point's ack was last logged at INFO, and the points acked since (logged at
    /// DEBUG: at a 1 s interval an idle VM's log had a line a second).
    ack_logged: Option<(Instant, u64)>,
}

impl Session {
    /// A session just connected: nothing known of the server's copy yet.
    fn new(
        config: Arc<Config>,
        shutdown: CancellationToken,
        tx: mpsc::Sender<pb::AgentMessage>,
        inbound: tonic::Streaming<pb::ServerMessage>,
        tracker: Option<Arc<crate::tracker::Tracker>>,
        progress: &Progress,
        log: Option<nbd::LogStream>,
    ) -> Session {
        let now = Due::now();
        Session {
            inbox: Inbox { acked: progress.acked.clone(), ..Default::default() },
            saved: progress.saved.clone(),
            last_point: progress.last_point.clone(),
            sent_point: None,
            first_point: true,
            problem_told: String::new(),
            probed_at: None,
            schedule: Schedule::from_policy(None, config.interval),
            config,
            shutdown,
            tx,
            inbound,
            states: Vec::new(),
            next_seq: Vec::new(),
            due_crash: now,
            due_app: now,
            awaiting_point: None,
            missed: 0,
            ack_logged: None,
            stood_down: false,
            feeds: std::sync::Mutex::new(Vec::new()),
            shared: None,
            pending_mark: None,
            resumed: Vec::new(),
            resync_urgent: false,
            regions: Vec::new(),
            awaiting_mark: None,
            tracker,
            release_to: None,
            held: None,
            log,
            welcomed: Vec::new(),
        }
    }

    fn feeds(&mut self) -> &mut Feeds {
        self.feeds.get_mut().unwrap_or_else(|p| p.into_inner())
    }

    async fn send(&self, m: pb::agent_message::Msg) -> Result<(), SessionError> {
        self.tx.send(pb::AgentMessage { msg: Some(m) }).await.map_err(|_| SessionError::StreamClosed)
    }

    /// A point's disks: each disk's fingerprint and last record.
    fn point_disks(&self, fingerprints: &[tern_core::Digest], seqs: &[Seq]) -> Vec<pb::PointDisk> {
        self.config
            .disks
            .iter()
            .zip(fingerprints)
            .zip(seqs)
            .map(|((d, fp), seq)| pb::PointDisk {
                disk: d.name.to_string(),
                seq: seq.0,
                fingerprint: fp.0.to_vec(),
            })
            .collect()
    }

    /// Sends a point; no pass runs until it is acked (`awaiting_point`).
    async fn send_point(
        &mut self,
        point: pb::MakePoint,
        requests: Requests,
        seqs: Vec<Seq>,
    ) -> Result<(), SessionError> {
        self.first_point = false;
        self.sent_point = Some(crate::PointMade { disks: self.identity(&point), time_ms: point.time_ms });
        self.send(pb::agent_message::Msg::Point(point)).await?;
        self.awaiting_point = Some((requests, seqs));
        Ok(())
    }

    /// Each disk's saved state's seq (`None` for a table that failed); `None` when no state
    /// is at hand.
    fn saved_seqs(&self) -> Option<Vec<Option<u64>>> {
        let seqs = |states: &[DiskState]| -> Vec<Option<u64>> {
            states.iter().map(|s| (!s.failed()).then_some(s.seq.0)).collect()
        };
        match &self.shared {
            Some(shared) => Some(seqs(&shared.lock().unwrap_or_else(|p| p.into_inner()))),
            None => (!self.states.is_empty()).then(|| seqs(&self.states)),
        }
    }

    /// A table that failed (a full state directory) is not written again in its session:
    /// once the directory takes writes again (looked at every 10 s at most), the session
    /// ends so that the next makes a new state. Else every pass would send every block,
    /// and status keep its warning, until the link happened to drop.
    fn state_writable_again(&mut self) -> bool {
        let failed = match &self.shared {
            Some(shared) => shared.lock().unwrap_or_else(|p| p.into_inner()).iter().any(DiskState::failed),
            None => self.states.iter().any(DiskState::failed),
        };
        if !failed || self.probed_at.is_some_and(|t| t.elapsed() < PROBE_EVERY) {
            return false;
        }
        self.probed_at = Some(Instant::now());
        crate::state::dir_writable(&self.config.state_dir)
    }

    /// What `point` says of each disk: the server journal's generation, seq, fingerprint.
    fn identity(&self, point: &pb::MakePoint) -> Vec<(String, u64, Vec<u8>)> {
        self.welcomed
            .iter()
            .zip(&point.disks)
            .map(|((generation, _), d)| (generation.clone(), d.seq, d.fingerprint.clone()))
            .collect()
    }

    /// Whether `point` is a session's first, asked for by no one, and says what the last
    /// point acked to this process says (same journals, seqs and fingerprints: nothing was
    /// written since) less than a crash interval after it. Such a point is not made: a link
    /// that drops every few seconds made one at every reconnect (W15: 20,000 a day that all
    /// said the same). The next scheduled one is due a crash interval after the last.
    fn repeats_last_point(&mut self, point: &pb::MakePoint) -> bool {
        let first = std::mem::replace(&mut self.first_point, false);
        if !first || !point.request_ids.is_empty() || point.consistency != pb::Consistency::Crash as i32 {
            return false;
        }
        let last = self.last_point.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(last) = last else { return false };
        // The saved state must be at this point too (a table made anew this session, or one
        // whose commit failed, is saved only by a point).
        let saved = self.saved_seqs();
        if saved.is_none_or(|s| !s.into_iter().eq(point.disks.iter().map(|d| Some(d.seq)))) {
            return false;
        }
        let since_ms = u64::try_from(now_ms() - last.time_ms).unwrap_or(u64::MAX);
        let interval_ms = u64::try_from(self.schedule.crash.as_millis()).unwrap_or(u64::MAX);
        if last.disks != self.identity(point) || since_ms >= interval_ms {
            return false;
        }
        let wait = Duration::from_millis(interval_ms - since_ms);
        self.due_crash = Due::now() + wait;
        // The session did what it came for: as much progress as an ack (the reconnect
        // backoff starts over).
        self.inbox.acked.store(true, std::sync::atomic::Ordering::Relaxed);
        info!(
            last_point_s_ago = since_ms / 1000,
            next_in_s = wait.as_secs(),
            "nothing was written since the last point: no point is made again"
        );
        true
    }

    /// Tells the server that a disk could not be read (`e`), which shows it in the VM's
    /// status until a point is made; the session's end.
    async fn unreadable(&self, e: &ScanError) -> SessionError {
        let reason = format!("{e}; the agent tries again within seconds");
        if self.point_failed(0, reason).await.is_ok() {
            self.flush_sent().await;
        }
        Status::unavailable(e.to_string()).into()
    }

    /// Waits (at most 2 s) until the stream has taken every message sent, so that one sent
    /// just before the session ends is not lost with the stream.
    async fn flush_sent(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.tx.capacity() < self.tx.max_capacity() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    async fn point_failed(&self, request_id: u64, reason: String) -> Result<(), SessionError> {
        self.send(pb::agent_message::Msg::PointFailed(pb::PointFailed { request_id, reason })).await
    }

    /// Reads `Welcome` and sets up what the receiver holds, per disk.
    async fn welcome(
        &mut self,
        saved: Vec<Option<DiskState>>,
        progress: &Progress,
    ) -> Result<(), SessionError> {
        let welcome = match self.inbound.message().await? {
            Some(pb::ServerMessage { msg: Some(pb::server_message::Msg::Welcome(w)) }) => w,
            _ => return Err(Status::internal("the server did not answer Hello with Welcome").into()),
        };
        progress.welcomed.store(true, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("tern_agent_connected", "vm" => self.config.vm.to_string()).set(1.0);
        self.welcomed = self
            .config
            .disks
            .iter()
            .map(|d| {
                welcome
                    .disks
                    .iter()
                    .find(|w| w.name == d.name.as_str())
                    .map_or((String::new(), 0), |w| (w.generation.clone(), w.durable_seq))
            })
            .collect();
        if self.log.is_some() {
            if !self.carry_on(&welcome).await {
                // The Hello claimed the log's state: the next one claims the saved state,
                // read once the log has stopped, and the server answers for that.
                return Err(Status::unavailable(
                    "the change log cannot go on where the server's journal ends; reconnecting to \
                     compare the extents written since the last committed point",
                )
                .into());
            }
            self.schedule = Schedule::from_policy(welcome.policy.as_ref(), self.config.interval);
            (self.due_crash, self.due_app) = self.schedule.due(Due::now(), true);
            return Ok(());
        }
        // This host's trouble, not a refusal: tried again (backing off) until it is mended,
        // where a refusal would stop the agent for good (exit 3, which its unit does not
        // restart: a full /var at the first start stopped it so).
        let dir = self.config.state_dir.clone();
        let resent = match choose_states(&self.config, &welcome, saved) {
            Ok((states, resumed, resent)) => {
                crate::state::note_write(&dir, None);
                (self.states, self.resumed) = (states, resumed);
                resent
            }
            Err(e) => {
                crate::state::note_write(&dir, Some(format!("{}: {e}", dir.display())));
                self.tell_problem().await;
                return Err(Status::unavailable(format!(
                    "agent state directory {}: {e}; free space there or fix its permissions (tried again meanwhile)",
                    dir.display()
                ))
                .into());
            }
        };
        if self.tracker.is_some() {
            self.regions = doubtful_regions(&welcome, &self.config, &self.resumed);
        } else {
            // Blocks compared with the server's page values are not sent again whole: only
            // forgotten ones make a cut before the next save worth a compare of the disk.
            progress.resumed_past.store(resent, std::sync::atomic::Ordering::Relaxed);
        }
        // The first pass compares with the receiver's block hashes as they arrive.
        for d in &self.config.disks {
            if welcome.hashes_follow.iter().any(|h| h == d.name.as_str()) {
                let (feed_tx, feed_rx) = std::sync::mpsc::channel();
                self.inbox.feeds.insert(d.name.to_string(), (d.size, feed_tx));
                self.feeds.get_mut().unwrap_or_else(|p| p.into_inner()).push(Some(feed_rx));
            } else {
                self.feeds.get_mut().unwrap_or_else(|p| p.into_inner()).push(None);
            }
        }
        if !self.inbox.feeds.is_empty() {
            info!(disks = ?welcome.hashes_follow, "no saved state for the server's copy; comparing with the server's block hashes");
        }
        self.next_seq = self
            .config
            .disks
            .iter()
            .map(|d| {
                let durable =
                    welcome.disks.iter().find(|w| w.name == d.name.as_str()).map_or(0, |w| w.durable_seq);
                Seq(durable + 1)
            })
            .collect();
        self.schedule = Schedule::from_policy(welcome.policy.as_ref(), self.config.interval);
        info!(vm = %self.config.vm, server = %self.config.server, crash_interval_s = self.schedule.crash.as_secs(),
            app_interval_s = self.schedule.app.as_secs(), "connected; replicating");
        // The first pass starts at once: it syncs whatever changed while disconnected.
        (self.due_crash, self.due_app) = self.schedule.due(Due::now(), true);
        Ok(())
    }

    async fn run(&mut self) -> Result<(), SessionError> {
        let disks = self
            .config
            .disks
            .iter()
            .map(|d| pb::DiskTracking {
                disk: d.name.to_string(),
                regime: "scan".into(),
                ..Default::default()
            })
            .collect();
        let problem = crate::state::write_problem();
        self.problem_told.clone_from(&problem);
        self.send(pb::agent_message::Msg::Tracking(pb::Tracking { disks, problem })).await?;
        loop {
            let Some((final_point, wanted)) = self.turn().await? else { return Ok(()) };
            let now = Due::now();
            if self.awaiting_point.is_none() && final_point.is_none() && self.inbox.barrier.is_some() {
                self.barrier_scan().await?;
                continue;
            }
            if self.awaiting_point.is_none() && (final_point.is_some() || (!self.stood_down && wanted)) {
                self.pass_and_point(final_point, now).await?;
                continue;
            }
            let due = self.due_crash.min(self.due_app);
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(due), if self.awaiting_point.is_none() && !self.stood_down => {}
                // A failed table: the next turn looks whether the directory takes writes again.
                _ = tokio::time::sleep(PROBE_EVERY), if self.states.iter().any(DiskState::failed) => {}
                m = self.inbound.message() => self.inbox.take(m?)?,
            }
        }
    }

    /// Tells the server what cannot be written in the state directory (`Tracking.problem`)
    /// when that changed since it was last told.
    async fn report_problem(&mut self) -> Result<(), SessionError> {
        let problem = crate::state::write_problem();
        if problem == self.problem_told {
            return Ok(());
        }
        self.problem_told.clone_from(&problem);
        self.send(pb::agent_message::Msg::Tracking(pb::Tracking { disks: Vec::new(), problem })).await
    }

    /// The session ends for a state directory that cannot be written: the server is told
    /// first, and the request stream closed, so that the report arrives before the end.
    async fn tell_problem(&mut self) {
        if self.report_problem().await.is_err() {
            return;
        }
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, closed));
        let drained = async { while let Ok(Some(_)) = self.inbound.message().await {} };
        let _ = tokio::time::timeout(Duration::from_secs(2), drained).await;
    }

    /// What both modes do at each turn of their loop: stand down when told, take a new
    /// policy and a point's ack, serve a shutdown request, refuse points once stood down.
    /// `None`: the session is over; else the request a final point answers, and whether a
    /// point is wanted now.
    async fn turn(&mut self) -> Result<Option<(Option<u64>, bool)>, SessionError> {
        if let Some(reason) = self.inbox.stand_down.take() {
            info!(reason = %reason, "the process server told this agent to stand down; stopping");
            return Ok(None);
        }
        self.apply_policy();
        self.on_point_ack().await?;
        if self.state_writable_again() {
            return Err(Status::unavailable(
                "the agent state directory takes writes again: reconnecting to start a new state \
                 (the disks are compared with the server's block hashes)",
            )
            .into());
        }
        // After the ack's commit, and after a pass's saves (the pass ran since the last turn).
        self.report_problem().await?;
        let final_point = self.serve_shutdown_request().await?;
        if self.stood_down && final_point.is_none() {
            for (id, _) in std::mem::take(&mut self.inbox.requests) {
                let reason = "the source was shut down for a failover; it makes no more points";
                self.point_failed(id, reason.into()).await?;
            }
            if let Some((b, _)) = self.inbox.barrier.take() {
                let reason = "the source was shut down for a failover; it makes no more points";
                self.point_failed(b.request_id, reason.into()).await?;
            }
        }
        let now = Due::now();
        let wanted = now >= self.due_crash || now >= self.due_app || !self.inbox.requests.is_empty();
        Ok(Some((final_point, wanted)))
    }

    fn apply_policy(&mut self) {
        let Some(p) = self.inbox.policy.take() else { return };
        self.schedule = Schedule::from_policy(Some(&p), self.config.interval);
        let (c, a) = self.schedule.due(Due::now(), false);
        if self.schedule.hold {
            (self.due_crash, self.due_app) = (c, a);
        } else {
            (self.due_crash, self.due_app) = (self.due_crash.min(c), self.due_app.min(a));
        }
        info!(
            crash_interval_s = self.schedule.crash.as_secs(),
            app_interval_s = self.schedule.app.as_secs(),
            "policy changed"
        );
    }

    /// Logs a point's ack at INFO when it answers a request, or once a minute at most
    /// (saying how many were acked since the last line); at DEBUG otherwise.
    fn log_point_ack(&mut self, point: u64, answers: usize) {
        const EVERY: Duration = Duration::from_secs(60);
        match self.ack_logged {
            Some((at, since)) if answers == 0 && at.elapsed() < EVERY => {
                self.ack_logged = Some((at, since + 1));
                debug!(point, "recovery point acked");
            }
            Some((_, since)) if since > 0 => {
                self.ack_logged = Some((Instant::now(), 0));
                info!(
                    point,
                    answers,
                    earlier = since,
                    "recovery point acked (and the earlier ones since the last line)"
                );
            }
            _ => {
                self.ack_logged = Some((Instant::now(), 0));
                info!(point, answers, "recovery point acked");
            }
        }
    }

    /// A point is acked: the saved state moves to it.
    async fn on_point_ack(&mut self) -> Result<(), SessionError> {
        let Some(point_id) = self.inbox.point_ack.take() else { return Ok(()) };
        let Some((requests, seqs)) = self.awaiting_point.take() else { return Ok(()) };
        self.log_point_ack(point_id, requests.len());
        if let Some(made) = self.sent_point.take() {
            *self.last_point.lock().unwrap_or_else(|p| p.into_inner()) = Some(made);
        }
        let vm = self.config.vm.to_string();
        metrics::counter!("tern_agent_points_total", "vm" => vm.clone()).increment(1);
        metrics::gauge!("tern_agent_last_point_timestamp_seconds", "vm" => vm).set(now_ms() as f64 / 1000.0);
        let cfg = self.config.clone();
        if let Some(shared) = self.shared.clone() {
            let (tracker, mark) = (self.tracker.clone(), self.awaiting_mark.take());
            return tokio::task::spawn_blocking(move || {
                let saved = commit_states(&cfg, &mut shared.lock().unwrap_or_else(|p| p.into_inner()), &seqs);
                // Extents go cold only once the state vouches for their writes.
                if let (true, Some(t), Some(m)) = (saved, tracker, mark) {
                    t.committed(m);
                }
            })
            .await
            .map_err(|e| Status::internal(e.to_string()).into());
        }
        self.commit(seqs).await
    }

    /// Scan mode: saves each disk's state at `seqs` (on the blocking pool).
    async fn commit(&mut self, seqs: Vec<Seq>) -> Result<(), SessionError> {
        let (cfg, saved) = (self.config.clone(), self.saved.clone());
        let mut states = std::mem::take(&mut self.states);
        self.states = tokio::task::spawn_blocking(move || {
            if commit_states(&cfg, &mut states, &seqs) {
                saved.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            states
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(())
    }

    /// A planned failover asks to shut the source down: run the hook; on success the
    /// returned request gets the final point. Served even after a final point: a failback
    /// that failed later (say, the master target was away) asks again, and gets a fresh one.
    async fn serve_shutdown_request(&mut self) -> Result<Option<u64>, SessionError> {
        // A point on its way first (nbd mode: a mark being hashed): the final point
        // follows it.
        let marking = self.tracker.as_ref().is_some_and(|t| t.marking());
        if self.awaiting_point.is_some() || self.pending_mark.is_some() || marking {
            return Ok(None);
        }
        let Some(id) = self.inbox.shutdown.take() else { return Ok(None) };
        let Some(cmd) = self.config.shutdown.clone() else {
            self.point_failed(id, "the agent has no --shutdown hook configured".into()).await?;
            return Ok(None);
        };
        info!("the process server asks for a shutdown: running the shutdown hook, then the final pass");
        let hook =
            tokio::task::spawn_blocking(move || hooks::run_hook("shutdown", &cmd, hooks::SHUTDOWN_LIMIT))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        match hook {
            Ok(()) => {
                info!("shutdown hook done; the final pass sends what the VM wrote last");
                Ok(Some(id))
            }
            Err(reason) => {
                warn!(error = %reason, "shutdown hook failed; the planned failover will not run");
                self.point_failed(id, reason).await?;
                Ok(None)
            }
        }
    }

    /// A pass (repeated until it is a consistent cut), then a point of it for the
    /// requests it answers, or a refusal of each when no cut could be had.
    async fn pass_and_point(&mut self, final_point: Option<u64>, now: Due) -> Result<(), SessionError> {
        let mut requests = std::mem::take(&mut self.inbox.requests);
        if let Some(id) = final_point {
            requests.push((id, false));
        }
        let scheduled_app = now >= self.due_app;
        let app = scheduled_app || requests.iter().any(|r| r.1);
        // Held (failback with --sync during), the pass is a full download: blocks are
        // checked whole and their 4 KiB page values are not computed.
        let page_hashes = !self.schedule.hold;
        let result = self.scan_until_consistent(app, true, page_hashes).await?;
        let (c, a) = self.schedule.due(Due::now(), false);
        self.due_crash = c;
        if app || self.schedule.hold {
            self.due_app = a;
        }
        let (pass, frozen, mut note) = match result {
            Ok(c) => c,
            Err(NoCut { reason, lasting }) => {
                warn!(reason = %reason, "no point was made");
                // A scheduled point that cannot be made until someone acts (a block device
                // whose freeze fails) is told too (request 0): the server shows it in
                // status until a point is made (it made no point for ever while status said
                // normal). A cut missed on busy disks is not, the next may be had; but
                // missed MISSES_TOLD times in a row it is (W16: a steady writer without a
                // freeze hook made no point while status said normal until the RPO threshold).
                if requests.is_empty() {
                    self.missed += 1;
                    if lasting {
                        self.point_failed(0, reason).await?;
                    } else if self.missed >= MISSES_TOLD {
                        let n = self.missed;
                        self.point_failed(0, format!("{reason} ({n} scheduled points missed in a row)"))
                            .await?;
                    }
                } else {
                    for (id, _) in requests {
                        self.point_failed(id, reason.clone()).await?;
                    }
                }
                return Ok(());
            }
        };
        self.missed = 0;
        let consistency = if frozen { pb::Consistency::App } else { pb::Consistency::Crash };
        if final_point.is_some() {
            note = "final point after the source was shut down".into();
            self.stood_down = true;
        }
        let seqs: Vec<Seq> = self.next_seq.iter().map(|n| Seq(n.0 - 1)).collect();
        let point = pb::MakePoint {
            request_ids: requests.iter().map(|r| r.0).collect(),
            consistency: consistency as i32,
            disks: self.point_disks(&pass.fingerprints, &seqs),
            time_ms: now_ms(),
            sent_ms: now_ms(),
            note,
        };
        if self.repeats_last_point(&point) {
            return Ok(());
        }
        // No pass runs until the point is acked, so `states` stays the point's state.
        self.send_point(point, requests, seqs).await
    }

    /// Scans until a pass is a consistent cut (or attempts run out), forwarding records as
    /// they come and handling acks meanwhile.
    async fn scan_until_consistent(
        &mut self,
        app: bool,
        may_quiesce: bool,
        page_hashes: bool,
    ) -> Result<Result<Consistent, NoCut>, SessionError> {
        for attempt in 1..=CONSISTENT_ATTEMPTS {
            let started = Instant::now();
            // An app point always quiesces; a crash point falls back on the hooks when the
            // disks kept changing during an unquiesced scan. A pass that still waits for the
            // receiver's block hashes is never frozen: the VM would stay frozen for as long
            // as the hashes take to arrive. A pass over a block device is a consistent cut
            // only when frozen: an unfrozen one would be thrown away.
            let feeding = self.feeds().iter().any(Option::is_some);
            let must_freeze = app || attempt > 1 || self.config.disks.iter().any(|d| d.block_device);
            let hooks = self.config.hooks.configured();
            let quiesce = may_quiesce && must_freeze && hooks && !feeding;
            let note = if app && !hooks {
                "no --freeze or --freeze-fs is configured".into()
            } else if app && feeding {
                "the first pass after a resync compares with the receiver's block hashes as they arrive and is not frozen".into()
            } else {
                String::new()
            };
            let (pass, frozen) = match self.attempt(quiesce, page_hashes).await? {
                Ok(done) => done,
                Err(freeze_failed) if self.config.disks.iter().any(|d| d.block_device) => {
                    // An unfrozen pass over a block device is never a cut: scanning again
                    // would only send its pages for nothing.
                    return Ok(Err(NoCut {
                        reason: format!(
                            "the freeze failed ({freeze_failed}), and a block device's point needs it: fix the \
                         --freeze-fs mount point or the --freeze hook (a file system left frozen by an agent \
                         killed mid-freeze thaws with `fsfreeze -u MOUNT`)"
                        ),
                        lasting: true,
                    }));
                }
                Err(freeze_failed) => {
                    // The freeze failed: scan again unquiesced; the point, if any, is crash-consistent.
                    let r = Box::pin(self.scan_until_consistent(false, false, page_hashes)).await?;
                    return Ok(r.map(|(pass, frozen, _)| (pass, frozen, freeze_failed)));
                }
            };
            info!(
                attempt,
                consistent = pass.consistent,
                read_mb = pass.bytes_read >> 20,
                changed_kb = pass.bytes_changed >> 10,
                ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                "scan pass done"
            );
            if pass.consistent {
                return Ok(Ok((pass, frozen, note)));
            }
            self.save_acked().await?;
        }
        Ok(Err(NoCut {
            reason:
                "the disks kept changing during every scan, so no consistent cut could be had; configure \
                     --freeze/--thaw hooks to quiesce the VM"
                    .into(),
            lasting: false,
        }))
    }

    /// One pass, frozen when `quiesce`: the scan runs on a blocking thread while this
    /// forwards its records and page-hash requests and takes what the server sends. The
    /// inner error is why a freeze failed (the feeds are kept for the next try).
    async fn attempt(
        &mut self,
        quiesce: bool,
        page_hashes: bool,
    ) -> Result<Result<(PassResult, bool), String>, SessionError> {
        self.attempt_held(quiesce, page_hashes, None).await
    }

    /// [`Session::attempt`]; with `hold`, a frozen consistent pass stays frozen after it
    /// (a multi-VM barrier) until the release comes on it or its time runs out.
    async fn attempt_held(
        &mut self,
        quiesce: bool,
        page_hashes: bool,
        hold: Option<(Receiver<bool>, Duration)>,
    ) -> Result<Result<(PassResult, bool), String>, SessionError> {
        let (ev_tx, mut ev_rx) = mpsc::channel::<ScanEvent>(2);
        let cancel = self.shutdown.child_token();
        let (cfg, c2) = (self.config.clone(), cancel.clone());
        let feeds = std::mem::take(self.feeds());
        let regions = std::mem::take(&mut self.regions);
        let background = self.config.nbd.is_some() && !self.resync_urgent;
        // Scan mode saves a long pass's progress as the server acks it. Not in nbd mode (its
        // change log vouches for the state at points), nor in a full download (held: the
        // master target writes through), nor while frozen (it would hold the VM frozen
        // for the round trips).
        let save_every =
            (self.config.nbd.is_none() && !self.schedule.hold && !quiesce).then_some(self.config.save_every);
        let saved = self.saved.clone();
        let memory = self.tracker.as_ref().map(|t| t.memory()).unwrap_or_default();
        let shared: Arc<Vec<scan::PassShared>> =
            Arc::new(self.config.disks.iter().map(|_| scan::PassShared::default()).collect());
        self.share_acks(&shared);
        let pass_shared = shared.clone();
        let mut states = std::mem::take(&mut self.states);
        let scanner = tokio::task::spawn_blocking(move || {
            let frozen = if quiesce {
                match cfg.hooks.freeze() {
                    Ok(f) => Some(f),
                    Err(e) => {
                        warn!(error = %e, "freeze failed; the point will be crash-consistent");
                        return (Err((e, feeds)), states);
                    }
                }
            } else {
                None
            };
            let r = scan::run_pass(
                &cfg.disks,
                &mut states,
                frozen.is_some(),
                page_hashes,
                scan::Compare { feeds, regions, background, memory, save_every, saved, shared },
                &ev_tx,
                &c2,
            );
            let was_frozen = frozen.is_some();
            if let (Some((release, most)), Ok(pass)) = (hold, &r)
                && was_frozen
                && pass.consistent
            {
                let started = Instant::now();
                let proceed = if ev_tx.blocking_send(ScanEvent::Reached).is_ok() {
                    release.recv_timeout(most).ok()
                } else {
                    None
                };
                let _ = ev_tx.blocking_send(ScanEvent::Held { proceed, held: started.elapsed() });
            }
            if let Some(f) = frozen {
                f.thaw();
            }
            (Ok((r, was_frozen)), states)
        });
        let forwarded = self.forward(&mut ev_rx, &pass_shared).await;
        if forwarded.is_err() {
            // The session ends: the scan stops, and is waited for, so that it cannot save
            // its state after the next session has opened it (a mid-pass save at an ack
            // of this session, committed over the next session's header). A barrier's
            // hold ends too.
            cancel.cancel();
            drop(ev_rx);
            self.release_to = None;
        }
        let joined = scanner.await.map_err(|e| Status::internal(e.to_string()));
        forwarded?;
        let (result, states) = joined?;
        self.states = states;
        let (result, frozen) = match result {
            Ok(r) => r,
            Err((freeze_failed, unused_feeds)) => {
                *self.feeds() = unused_feeds;
                return Ok(Err(freeze_failed));
            }
        };
        let pass = match result {
            Ok(pass) => pass,
            Err(ScanError::Cancelled) => return Err(Status::cancelled("scan cancelled").into()),
            // Said to the server too, which shows it in the VM's status until a point is made:
            // the session ends, and a VM without one shows only that its agent is away (W18-B:
            // a disk file gone was only in the agent's log).
            Err(e @ ScanError::Read { .. }) => return Err(self.unreadable(&e).await),
            // Ends the session as a failure to retry: the next Hello gives the new size, which
            // the server refuses (and shows in the VM's status) before the agent stops for good.
            Err(e @ ScanError::Resized { .. }) => return Err(Status::unavailable(e.to_string()).into()),
        };
        Ok(Ok((pass, frozen)))
    }

    /// Sends records of `disk`, numbered from its next seq, within the rate limit, with
    /// when each was written (`times`: empty, or one per record).
    async fn send_batch(
        &mut self,
        disk: usize,
        records: Vec<pb::Record>,
        times_ms: Vec<i64>,
        limiter: &mut tern_proto::rate::RateLimiter,
    ) -> Result<(), SessionError> {
        let batch = self.number(disk, records, times_ms);
        self.send_numbered(batch, limiter).await
    }

    /// Numbers records of `disk` from its next seq.
    fn number(&mut self, disk: usize, records: Vec<pb::Record>, times_ms: Vec<i64>) -> pb::Batch {
        let first_seq = self.next_seq[disk].0;
        self.next_seq[disk] = Seq(first_seq + records.len() as u64);
        pb::Batch { disk: self.config.disks[disk].name.to_string(), first_seq, records, times_ms }
    }

    /// Sends a numbered batch within the rate limit.
    async fn send_numbered(
        &self,
        batch: pb::Batch,
        limiter: &mut tern_proto::rate::RateLimiter,
    ) -> Result<(), SessionError> {
        let bytes = prost::Message::encoded_len(&batch) as u64;
        limiter.take(bytes).await;
        metrics::counter!("tern_agent_sent_bytes_total", "vm" => self.config.vm.to_string()).increment(bytes);
        self.send(pb::agent_message::Msg::Batch(batch)).await
    }

    /// Scan mode, after a pass that is no cut (the disks changed while it read them): saves
    /// each disk's state at what the server acked, once it has acked all that was sent, so
    /// that a cut before the next point goes on from here (a pass shorter than the first
    /// mid-pass save would otherwise save nothing).
    async fn save_acked(&mut self) -> Result<(), SessionError> {
        if self.config.nbd.is_some() || self.schedule.hold {
            return Ok(());
        }
        let mut seqs = Vec::with_capacity(self.config.disks.len());
        for disk in 0..self.config.disks.len() {
            seqs.push(self.all_acked(disk).await?);
        }
        self.commit(seqs).await
    }

    /// Waits until the server has acked every record of `disk` sent so far, taking its
    /// other messages meanwhile; returns that seq.
    async fn all_acked(&mut self, disk: usize) -> Result<Seq, SessionError> {
        let sent = self.next_seq[disk].0 - 1;
        let name = self.config.disks[disk].name.to_string();
        let welcomed = self.welcomed.get(disk).map_or(0, |w| w.1);
        while self.inbox.durable.get(&name).copied().unwrap_or(0).max(welcomed) < sent {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Err(Status::cancelled("scan cancelled").into()),
                m = self.inbound.message() => {
                    self.inbox.take(m?)?;
                    self.pass_release();
                }
            }
        }
        Ok(Seq(sent))
    }

    /// Sends what the scan produces until it ends, taking server messages meanwhile. A
    /// pass that runs 2 s or more reports how far it has read each disk every 2 s
    /// (`DiskTracking.pass_offset`), and that it is over at its end.
    async fn forward(
        &mut self,
        events: &mut mpsc::Receiver<ScanEvent>,
        shared: &[scan::PassShared],
    ) -> Result<(), SessionError> {
        let mut limiter = tern_proto::rate::RateLimiter::new(self.config.max_rate);
        let mut report = tokio::time::interval_at(Due::now() + PASS_REPORT_EVERY, PASS_REPORT_EVERY);
        let mut reported = false;
        loop {
            tokio::select! {
                _ = report.tick() => {
                    self.report_pass(shared.iter().map(|s| s.reached.load(Relaxed))).await?;
                    reported = true;
                }
                ev = events.recv() => match ev {
                    Some(ScanEvent::NeedPages { disk, blocks }) => {
                        let disk = self.config.disks[disk].name.to_string();
                        self.send(pb::agent_message::Msg::PageHashes(pb::PageHashesRequest { disk, blocks })).await?;
                    }
                    Some(ScanEvent::Batch { disk, records }) => self.send_batch(disk, records, Vec::new(), &mut limiter).await?,
                    Some(ScanEvent::Reached) => {
                        if let Some((request_id, _)) = &self.release_to {
                            let reached = pb::BarrierReached { request_id: *request_id };
                            self.send(pb::agent_message::Msg::Reached(reached)).await?;
                        }
                    }
                    Some(ScanEvent::Held { proceed, held }) => self.held = Some((proceed, held)),
                    Some(ScanEvent::Settle { disk, acked }) => {
                        let seq = self.all_acked(disk).await?;
                        let _ = acked.send(seq);
                    }
                    // Every batch before it was numbered: the seq of the last one sent.
                    Some(ScanEvent::Mark { disk, sent }) => drop(sent.send(Seq(self.next_seq[disk].0 - 1))),
                    None => {
                        if reported {
                            self.report_pass(shared.iter().map(|_| 0)).await?;
                        }
                        return Ok(());
                    }
                },
                m = self.inbound.message() => {
                    self.inbox.take(m?)?;
                    self.pass_release();
                    self.share_acks(shared);
                }
            }
        }
    }

    /// Tells the pass what the server has acked of each disk (its saves commit at it).
    fn share_acks(&self, shared: &[scan::PassShared]) {
        for (i, (d, sh)) in self.config.disks.iter().zip(shared).enumerate() {
            let welcomed = self.welcomed.get(i).map_or(0, |w| w.1);
            let durable = self.inbox.durable.get(d.name.as_str()).copied().unwrap_or(0);
            sh.acked.store(durable.max(welcomed), Relaxed);
        }
    }

    /// How far the running pass (nbd mode: a resync) has read each disk.
    async fn report_pass(&mut self, reached: impl Iterator<Item = u64>) -> Result<(), SessionError> {
        let log = self.tracker.as_ref().map(|t| t.tracking(true));
        let disks = self
            .config
            .disks
            .iter()
            .zip(reached)
            .enumerate()
            .map(|(i, (d, r))| {
                let (regime, backlog_bytes, hot_bytes) =
                    log.as_ref().and_then(|l| l.get(i).copied()).unwrap_or(("scan", 0, 0));
                pb::DiskTracking {
                    disk: d.name.to_string(),
                    regime: regime.into(),
                    backlog_bytes,
                    hot_bytes,
                    pass_offset: r,
                }
            })
            .collect();
        let problem = crate::state::write_problem();
        self.problem_told.clone_from(&problem);
        self.send(pb::agent_message::Msg::Tracking(pb::Tracking { disks, problem })).await
    }
}
