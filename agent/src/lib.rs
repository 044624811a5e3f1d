//! tern-agent (`mobility-agent`): tracks a VM's disks by scanning them, ships the changed
//! pages to the process server over one long-lived mTLS gRPC stream, and makes recovery
//! points at consistent cuts. It only ever dials out, and reconnects by itself.

pub mod hooks;
pub mod scan;
pub mod state;

use scan::{DiskSource, PassResult, ScanError, ScanEvent};
use state::DiskState;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_core::pki::Bundle;
use tern_core::{Seq, VmName};
use tern_proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tracing::{error, info, warn};

/// Times a checkpoint is retried when disks keep changing during the scan.
const CONSISTENT_ATTEMPTS: usize = 5;
/// Reconnecting: within about a second of the server being back (the cap), without
/// hammering it meanwhile. The backoff starts over once a session has had records acked.
const RECONNECT_FIRST: Duration = Duration::from_millis(200);
const RECONNECT_CAP: Duration = Duration::from_secs(1);

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
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the process server refused this agent: {0}")]
    Refused(String),
    #[error("state directory {path}: {source}")]
    StateDir { path: String, source: std::io::Error },
}

/// Runs until `shutdown` or a permanent refusal (wrong identity, bad disk).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|source| AgentError::StateDir { path: config.state_dir.display().to_string(), source })?;
    let config = Arc::new(config);
    // Unreachable, or gone after replication made progress: back within about a second.
    let mut reconnect = tern_core::backoff::Backoff::new(RECONNECT_FIRST, RECONNECT_CAP);
    // Welcomed, then failed before anything was acked (storage full on the server, a
    // refused batch): each try costs a pass, so the tries space out further.
    let mut refused = tern_core::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let progress = Progress::default();
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = session(config.clone(), shutdown.clone(), &progress) => r,
        };
        match outcome {
            Ok(()) => return Ok(()),
            Err(status) if is_permanent(status.code()) => {
                error!(code = ?status.code(), "{}", status.message());
                return Err(AgentError::Refused(status.message().to_string()));
            }
            Err(status) => {
                if progress.acked.load(std::sync::atomic::Ordering::Relaxed) {
                    reconnect.reset();
                    refused.reset();
                }
                let delay = if progress.welcomed.load(std::sync::atomic::Ordering::Relaxed)
                    && !progress.acked.load(std::sync::atomic::Ordering::Relaxed)
                {
                    refused.next_delay()
                } else {
                    reconnect.next_delay()
                };
                warn!(code = ?status.code(), error = %status.message(), retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "session with the process server ended; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
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
    /// Set once the server acks records or a point: the session made progress.
    acked: Arc<std::sync::atomic::AtomicBool>,
}

impl Inbox {
    /// Acks only mark progress: the agent's saved state moves only with acked points.
    fn take(&mut self, m: Option<pb::ServerMessage>) -> Result<(), tonic::Status> {
        let Some(msg) = m else {
            return Err(tonic::Status::unavailable("the process server closed the stream"));
        };
        match msg.msg {
            Some(pb::server_message::Msg::Checkpoint(c)) => {
                self.requests.push((c.request_id, c.app_consistent))
            }
            Some(pb::server_message::Msg::Shutdown(r)) => self.shutdown = Some(r.request_id),
            Some(pb::server_message::Msg::Policy(p)) => self.policy = Some(p),
            Some(pb::server_message::Msg::StandDown(s)) => self.stand_down = Some(s.reason),
            Some(pb::server_message::Msg::PointAck(p)) => {
                self.acked.store(true, std::sync::atomic::Ordering::Relaxed);
                self.point_ack = Some(p.point_id);
            }
            Some(pb::server_message::Msg::Ack(_)) => {
                self.acked.store(true, std::sync::atomic::Ordering::Relaxed)
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
}

async fn session(
    config: Arc<Config>,
    shutdown: CancellationToken,
    progress: &Progress,
) -> Result<(), tonic::Status> {
    let channel = pb::connect(&config.server, &config.identity).await.map_err(status_of)?;
    let mut client = pb::replication_client::ReplicationClient::new(channel)
        .max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(pb::MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(4);
    let cfg = config.clone();
    let saved: Vec<Option<DiskState>> = tokio::task::spawn_blocking(move || {
        cfg.disks
            .iter()
            .map(|d| DiskState::load(&DiskState::path(&cfg.state_dir, d.name.as_str()), d.size))
            .collect()
    })
    .await
    .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let hello = pb::Hello {
        vm: config.vm.to_string(),
        disks: config
            .disks
            .iter()
            .zip(&saved)
            .map(|(d, s)| pb::DiskInfo {
                name: d.name.to_string(),
                size: d.size,
                state_generation: s.as_ref().map(|s| s.generation.clone()).unwrap_or_default(),
                state_seq: s.as_ref().map_or(0, |s| s.seq.0),
            })
            .collect(),
        protocol: 1,
    };
    tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(hello)) })
        .await
        .map_err(|_| tonic::Status::cancelled("stream closed"))?;
    let mut inbound = client.replicate(ReceiverStream::new(rx)).await?.into_inner();
    // The session itself; when it ends because the server closed the stream, the server's
    // reason (storage full, a refused batch) is in the stream's status: that is reported.
    let result: Result<(), tonic::Status> = async {
        let welcome = match inbound.message().await? {
            Some(pb::ServerMessage { msg: Some(pb::server_message::Msg::Welcome(w)) }) => w,
            _ => return Err(tonic::Status::internal("the server did not answer Hello with Welcome")),
        };
        progress.welcomed.store(true, std::sync::atomic::Ordering::Relaxed);
        // What the receiver holds, per disk.
        let mut states = choose_states(&config, &welcome, saved);
        let mut inbox = Inbox { acked: progress.acked.clone(), ..Default::default() };
        // The first pass compares with the receiver's block hashes as they arrive.
        let mut feeds: Vec<Option<std::sync::mpsc::Receiver<scan::HashChunk>>> = Vec::new();
        for d in &config.disks {
            if welcome.hashes_follow.iter().any(|h| h == d.name.as_str()) {
                let (feed_tx, feed_rx) = std::sync::mpsc::channel();
                inbox.feeds.insert(d.name.to_string(), (d.size, feed_tx));
                feeds.push(Some(feed_rx));
            } else {
                feeds.push(None);
            }
        }
        if !inbox.feeds.is_empty() {
            info!(disks = ?welcome.hashes_follow, "no saved state for the server's copy; comparing with the server's block hashes");
        }
        let mut next_seq: Vec<Seq> = config
            .disks
            .iter()
            .map(|d| {
                let durable =
                    welcome.disks.iter().find(|w| w.name == d.name.as_str()).map_or(0, |w| w.durable_seq);
                Seq(durable + 1)
            })
            .collect();
        let mut schedule = Schedule::from_policy(welcome.policy.as_ref(), config.interval);
        info!(vm = %config.vm, server = %config.server, crash_interval_s = schedule.crash.as_secs(),
            app_interval_s = schedule.app.as_secs(), "connected; replicating");

        // The first pass starts at once: it syncs whatever changed while disconnected.
        let (mut due_crash, mut due_app) = schedule.due(tokio::time::Instant::now(), true);
        // A point sent and not yet acked: the requests it answers and each disk's seq.
        let mut awaiting_point: Option<(Requests, Vec<Seq>)> = None;
        let mut stood_down = false;
        loop {
            if let Some(reason) = inbox.stand_down.take() {
                info!(reason = %reason, "the process server told this agent to stand down; stopping");
                return Ok(());
            }
            if let Some(p) = inbox.policy.take() {
                schedule = Schedule::from_policy(Some(&p), config.interval);
                let (c, a) = schedule.due(tokio::time::Instant::now(), false);
                (due_crash, due_app) = if schedule.hold { (c, a) } else { (due_crash.min(c), due_app.min(a)) };
                info!(
                    crash_interval_s = schedule.crash.as_secs(),
                    app_interval_s = schedule.app.as_secs(),
                    "policy changed"
                );
            }
            if let Some(point_id) = inbox.point_ack.take()
                && let Some((requests, seqs)) = awaiting_point.take()
            {
                info!(point = point_id, answers = requests.len(), "recovery point acked");
                for (s, seq) in states.iter_mut().zip(seqs) {
                    s.seq = seq;
                }
                let cfg = config.clone();
                states = tokio::task::spawn_blocking(move || {
                    save_states(&cfg, &states);
                    states
                })
                .await
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
            }
            let now = tokio::time::Instant::now();
            let mut final_point = None;
            // A shutdown request is served even after a final point: a failback that failed
            // later (say, the master target was away) asks again, and gets a fresh final point.
            if awaiting_point.is_none()
                && let Some(id) = inbox.shutdown.take()
            {
                match &config.shutdown {
                    None => {
                        let reason = "the agent has no --shutdown hook configured".to_string();
                        send(
                            &tx,
                            pb::agent_message::Msg::PointFailed(pb::PointFailed { request_id: id, reason }),
                        )
                        .await?;
                    }
                    Some(cmd) => {
                        let cmd = cmd.clone();
                        let hook = tokio::task::spawn_blocking(move || {
                            hooks::run_hook("shutdown", &cmd, Duration::from_secs(600))
                        })
                        .await
                        .map_err(|e| tonic::Status::internal(e.to_string()))?;
                        match hook {
                            Ok(()) => final_point = Some(id),
                            Err(reason) => {
                                warn!(error = %reason, "shutdown hook failed; the planned failover will not run");
                                send(
                                    &tx,
                                    pb::agent_message::Msg::PointFailed(pb::PointFailed {
                                        request_id: id,
                                        reason,
                                    }),
                                )
                                .await?;
                            }
                        }
                    }
                }
            }
            if stood_down && final_point.is_none() {
                for (id, _) in std::mem::take(&mut inbox.requests) {
                    let reason = "the source was shut down for a failover; it makes no more points".to_string();
                    send(&tx, pb::agent_message::Msg::PointFailed(pb::PointFailed { request_id: id, reason }))
                        .await?;
                }
            }
            let scheduled_app = now >= due_app;
            if awaiting_point.is_none()
                && (final_point.is_some()
                    || (!stood_down && (now >= due_crash || scheduled_app || !inbox.requests.is_empty())))
            {
                let mut requests = std::mem::take(&mut inbox.requests);
                if let Some(id) = final_point {
                    requests.push((id, false));
                }
                let app = scheduled_app || requests.iter().any(|r| r.1);
                let (result, back) = scan_until_consistent(
                    &config,
                    states,
                    &tx,
                    &mut inbound,
                    &mut next_seq,
                    &mut inbox,
                    &shutdown,
                    app,
                    true,
                    // Held (failback with --sync during), the pass is a full download: blocks
                    // are checked whole and their 4 KiB page values are not computed.
                    !schedule.hold,
                    std::mem::take(&mut feeds),
                )
                .await?;
                states = back;
                let (c, a) = schedule.due(tokio::time::Instant::now(), false);
                due_crash = c;
                if app || schedule.hold {
                    due_app = a;
                }
                match result {
                    Some((pass, frozen, mut note)) => {
                        let consistency = if frozen { pb::Consistency::App } else { pb::Consistency::Crash };
                        if final_point.is_some() {
                            note = "final point after the source was shut down".into();
                            stood_down = true;
                        }
                        let point = pb::MakePoint {
                            request_ids: requests.iter().map(|r| r.0).collect(),
                            consistency: consistency as i32,
                            disks: config
                                .disks
                                .iter()
                                .zip(&pass.fingerprints)
                                .zip(&next_seq)
                                .map(|((d, fp), next)| pb::PointDisk {
                                    disk: d.name.to_string(),
                                    seq: next.0 - 1,
                                    fingerprint: fp.0.to_vec(),
                                })
                                .collect(),
                            time_ms: now_ms(),
                            note,
                        };
                        send(&tx, pb::agent_message::Msg::Point(point)).await?;
                        // No pass runs until the point is acked, so `states` stays the point's state.
                        awaiting_point = Some((requests, next_seq.iter().map(|n| Seq(n.0 - 1)).collect()));
                    }
                    None => {
                        for (id, _) in requests {
                            let reason = "the disks kept changing during every scan, so no consistent cut could be had; \
                                          configure --freeze/--thaw hooks to quiesce the VM";
                            send(
                                &tx,
                                pb::agent_message::Msg::PointFailed(pb::PointFailed {
                                    request_id: id,
                                    reason: reason.into(),
                                }),
                            )
                            .await?;
                        }
                    }
                }
                continue;
            }
            let due = due_crash.min(due_app);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(due), if awaiting_point.is_none() && !stood_down => {}
                m = inbound.message() => inbox.take(m?)?,
            }
        }
    }
    .await;
    match result {
        Err(e) if e.message() == STREAM_CLOSED => Err(server_reason(&mut inbound).await.unwrap_or(e)),
        r => r,
    }
}

/// What [`send`] says when the server has closed the stream.
const STREAM_CLOSED: &str = "the stream to the process server closed";

/// The status the server ended the stream with, if it says one within a moment.
async fn server_reason(inbound: &mut tonic::Streaming<pb::ServerMessage>) -> Option<tonic::Status> {
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

async fn send(tx: &mpsc::Sender<pb::AgentMessage>, m: pb::agent_message::Msg) -> Result<(), tonic::Status> {
    tx.send(pb::AgentMessage { msg: Some(m) }).await.map_err(|_| tonic::Status::unavailable(STREAM_CLOSED))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Picks, per disk, what to compare the disk with: the saved state when it describes the
/// server's copy, zeroes for a new copy, the server's hashes (filled in afterwards) when it
/// sends them, and "unknown" (send everything with data) otherwise.
fn choose_states(config: &Config, welcome: &pb::Welcome, saved: Vec<Option<DiskState>>) -> Vec<DiskState> {
    config
        .disks
        .iter()
        .zip(saved)
        .map(|(d, saved)| {
            let w = welcome.disks.iter().find(|w| w.name == d.name.as_str());
            let (generation, durable) = w.map_or((String::new(), 0), |w| (w.generation.clone(), w.durable_seq));
            let trusted = w.is_some_and(|w| !w.state_invalid);
            match saved {
                Some(mut s) if trusted && s.generation == generation && s.seq.0 <= durable => {
                    let doubtful = w.map_or(&[][..], |w| &w.doubtful[..]);
                    let forgotten = s.forget(doubtful.iter().map(|r| (r.offset, r.length)));
                    if forgotten > 0 {
                        info!(disk = %d.name, blocks = forgotten, state_seq = s.seq.0, durable,
                            "the server holds records past the saved state; comparing the blocks they wrote again");
                    } else {
                        info!(disk = %d.name, "saved state matches the server's copy; sending only changes");
                    }
                    s
                }
                _ if welcome.hashes_follow.iter().any(|h| h == d.name.as_str()) => {
                    DiskState::unknown(d.size, &generation)
                }
                _ if durable == 0 => DiskState::zeroes(d.size, &generation),
                _ => {
                    warn!(disk = %d.name, "no saved state for the server's copy; every block with data is sent again");
                    DiskState::unknown(d.size, &generation)
                }
            }
        })
        .collect()
}

fn save_states(config: &Config, states: &[DiskState]) {
    for (d, s) in config.disks.iter().zip(states) {
        let path = DiskState::path(&config.state_dir, d.name.as_str());
        if let Err(e) = s.save(&path) {
            warn!(disk = %d.name, path = %path.display(), error = %e, "cannot save agent state; a restart will resend more");
        }
    }
}

/// Scans until a pass is a consistent cut (or attempts run out), forwarding records as
/// they come and handling acks meanwhile. Returns the consistent pass and the point's note.
#[allow(clippy::too_many_arguments)]
#[allow(clippy::type_complexity)]
async fn scan_until_consistent(
    config: &Arc<Config>,
    mut states: Vec<DiskState>,
    tx: &mpsc::Sender<pb::AgentMessage>,
    inbound: &mut tonic::Streaming<pb::ServerMessage>,
    next_seq: &mut [Seq],
    inbox: &mut Inbox,
    shutdown: &CancellationToken,
    app: bool,
    may_quiesce: bool,
    page_hashes: bool,
    mut feeds: Vec<Option<std::sync::mpsc::Receiver<scan::HashChunk>>>,
) -> Result<(Option<(PassResult, bool, String)>, Vec<DiskState>), tonic::Status> {
    let mut note = String::new();
    for attempt in 1..=CONSISTENT_ATTEMPTS {
        let started = Instant::now();
        note.clear();
        // An app point always quiesces; a crash point falls back on the hooks when the
        // disks kept changing during an unquiesced scan.
        // A pass that still waits for the receiver's block hashes is never frozen: the VM
        // would stay frozen for as long as the hashes take to arrive.
        let feeding = feeds.iter().any(Option::is_some);
        // A pass over a block device is a consistent cut only when frozen: an unfrozen one
        // would be thrown away.
        let must_freeze = app || attempt > 1 || config.disks.iter().any(|d| d.block_device);
        let quiesce = may_quiesce && must_freeze && config.hooks.configured() && !feeding;
        if app && !config.hooks.configured() {
            note = "no --freeze or --freeze-fs is configured".into();
        } else if app && feeding {
            note = "the first pass after a resync compares with the receiver's block hashes as they arrive and is not frozen".into();
        }
        let (ev_tx, mut ev_rx) = mpsc::channel::<ScanEvent>(2);
        let cancel = shutdown.child_token();
        let cfg = config.clone();
        let c2 = cancel.clone();
        let attempt_feeds = std::mem::take(&mut feeds);
        let scanner = tokio::task::spawn_blocking(move || {
            let frozen = if quiesce {
                match cfg.hooks.freeze() {
                    Ok(f) => Some(f),
                    Err(e) => {
                        warn!(error = %e, "freeze failed; the point will be crash-consistent");
                        return (Err((e, attempt_feeds)), states);
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
                attempt_feeds,
                &ev_tx,
                &c2,
            );
            let was_frozen = frozen.is_some();
            if let Some(f) = frozen {
                f.thaw();
            }
            (Ok((r, was_frozen)), states)
        });
        let _guard = cancel.clone().drop_guard();
        let mut limiter = RateLimiter::new(config.max_rate);
        loop {
            tokio::select! {
                ev = ev_rx.recv() => match ev {
                    Some(ScanEvent::NeedPages { disk, blocks }) => {
                        let disk = config.disks[disk].name.to_string();
                        send(tx, pb::agent_message::Msg::PageHashes(pb::PageHashesRequest { disk, blocks })).await?;
                    }
                    Some(ScanEvent::Batch { disk, records }) => {
                        let n = records.len() as u64;
                        let batch = pb::Batch { disk: config.disks[disk].name.to_string(), first_seq: next_seq[disk].0, records };
                        limiter.take(prost::Message::encoded_len(&batch) as u64).await;
                        next_seq[disk] = Seq(next_seq[disk].0 + n);
                        send(tx, pb::agent_message::Msg::Batch(batch)).await?;
                    }
                    None => break,
                },
                m = inbound.message() => inbox.take(m?)?,
            }
        }
        let (result, back) = scanner.await.map_err(|e| tonic::Status::internal(e.to_string()))?;
        states = back;
        let (result, frozen) = match result {
            Ok(r) => r,
            Err((freeze_failed, unused_feeds)) => {
                // The freeze failed: scan again unquiesced; the point, if any, is crash-consistent.
                let app_note = freeze_failed;
                let (r, back) = Box::pin(scan_until_consistent(
                    config,
                    states,
                    tx,
                    inbound,
                    next_seq,
                    inbox,
                    shutdown,
                    false,
                    false,
                    page_hashes,
                    unused_feeds,
                ))
                .await?;
                return Ok((r.map(|(pass, frozen, _)| (pass, frozen, app_note)), back));
            }
        };
        let pass = result.map_err(|e| match e {
            ScanError::Cancelled => tonic::Status::cancelled("scan cancelled"),
            ScanError::Resized { .. } => tonic::Status::failed_precondition(e.to_string()),
            ScanError::Read { .. } => tonic::Status::unavailable(e.to_string()),
        })?;
        info!(
            attempt,
            consistent = pass.consistent,
            read_mb = pass.bytes_read >> 20,
            changed_kb = pass.bytes_changed >> 10,
            ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "scan pass done"
        );
        if pass.consistent {
            return Ok((Some((pass, frozen, note)), states));
        }
    }
    Ok((None, states))
}

/// Spaces out sends so that at most `rate` bytes per second go on the wire.
#[derive(Debug)]
struct RateLimiter {
    rate: u64,
    start: tokio::time::Instant,
    sent: u64,
}

impl RateLimiter {
    fn new(rate: u64) -> Self {
        RateLimiter { rate, start: tokio::time::Instant::now(), sent: 0 }
    }

    async fn take(&mut self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        self.sent += bytes;
        let due = self.start + Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
        tokio::time::sleep_until(due).await;
    }
}
