//! The session of `--mode nbd`: a resync (a scan pass that compares the disks with the
//! server's copy, while the log already records every write), then the log streams in
//! write order, and a point is a mark in the log — a crash-consistent cut across the
//! VM's disks, taken without scanning anything. An app-consistent point freezes the VM
//! only for the mark.

use super::{Session, SessionError};
use crate::stream::{self, LogEvent, SharedStates};
use crate::tracker::Tracker;
use crate::{NbdMode, Requests};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tern_core::Seq;
use tern_proto as pb;
use tokio::sync::mpsc;
use tokio::time::Instant as Due;
use tonic::Status;
use tracing::{info, warn};

/// Resync rounds run at a lower priority than the VM's writes before they stop yielding.
const YIELDING_ROUNDS: u32 = 3;

/// How often the agent tells the server how it tracks its disks.
const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// A mark made for a point that is not sent yet (its hashes are being taken).
#[derive(Debug)]
pub(super) struct PendingMark {
    pub(super) id: u64,
    pub(super) requests: Requests,
    pub(super) consistency: pb::Consistency,
    pub(super) note: String,
    pub(super) time_ms: i64,
}

/// How streaming ended.
enum Streamed {
    /// The session is over (stand down, shutdown).
    Done,
    /// The log was dropped: resync, then stream again.
    Resync,
    /// The streaming thread ended.
    Stopped,
}

/// With `--log-buffer` unacked, no message from the server for this long ends the session.
const ACK_STALL: std::time::Duration = std::time::Duration::from_secs(10);

/// Releases the writes a multi-VM barrier holds when the session ends, however it ends.
pub(super) struct ReleaseHold(pub(super) Arc<Tracker>);

impl Drop for ReleaseHold {
    fn drop(&mut self) {
        self.0.release_hold();
    }
}

/// The log's stream, which outlives a dropped link: the streaming thread (it goes on
/// taking the log's items as long as there is room for its events), the states it
/// shares with the session, each disk's next seq, and the batches sent and not acked
/// yet. The next session sends those the server's journal lacks and goes on from there:
/// the journal gets the log in write order, without a gap and without comparing any disk.
#[derive(Debug)]
pub(crate) struct LogStream {
    events: mpsc::Receiver<LogEvent>,
    thread: Option<std::thread::JoinHandle<Result<(), stream::StreamError>>>,
    cancel: tokio_util::sync::CancellationToken,
    shared: SharedStates,
    next_seq: Vec<Seq>,
    /// The server's copy of each disk the seqs count in.
    generations: Vec<String>,
    /// Sent and not acked, in the order sent: disk and batch.
    unacked: std::collections::VecDeque<(usize, pb::Batch)>,
    unacked_bytes: usize,
}

impl Drop for LogStream {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn payload_bytes(b: &pb::Batch) -> usize {
    b.records.iter().map(|r| r.payload.len()).sum()
}

impl LogStream {
    /// The server made `disk` durable up to `seq`: its batches up to there are let go.
    fn acked(&mut self, disk: usize, seq: u64) {
        let mut freed = 0;
        self.unacked.retain(|(d, b)| {
            let done = *d == disk && b.first_seq + b.records.len() as u64 <= seq + 1;
            if done {
                freed += payload_bytes(b);
            }
            !done
        });
        self.unacked_bytes -= freed;
    }

    fn keep(&mut self, disk: usize, batch: pb::Batch) {
        self.unacked_bytes += payload_bytes(&batch);
        self.unacked.push_back((disk, batch));
    }

    /// The log still runs (it was not dropped while the link was down) and its thread
    /// streams it.
    fn alive(&self, tracker: &Tracker) -> bool {
        tracker.logging() && self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// A log carried over from a dropped link goes on only if it still runs: else it is
    /// stopped here, before the saved state is read.
    pub(super) async fn stop_if_dropped(carried: &mut Option<LogStream>, tracker: &Tracker) {
        if carried.as_ref().is_none_or(|l| l.alive(tracker)) {
            return;
        }
        info!(
            "the change log was dropped while the server was away (past --spill-max, or the state \
            directory is full); comparing the extents written since the last committed point"
        );
        if let Some(log) = carried.take() {
            log.stop(tracker).await;
        }
    }

    /// Stops the thread, then the log (the next session starts it anew).
    async fn stop(self, tracker: &Tracker) {
        drop(self.close().await);
        tracker.stop_logging();
    }

    /// What the agent's `Hello` says of each disk while a log is carried: the state it
    /// goes on from (the copy its seqs count in, the last point acked), which may not be
    /// on disk yet (a state written in place between two points is not committed).
    pub(super) fn claims(&self) -> Vec<(String, u64)> {
        let states = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        states.iter().map(|s| (s.generation.clone(), s.seq.0)).collect()
    }

    /// Whether the log can go on where the server's journal of each disk ends
    /// (`welcomed`: generation, durable seq): within what this stream sent and kept.
    pub(super) fn check(&self, welcomed: &[(String, u64)]) -> Result<(), String> {
        for (i, (generation, durable)) in welcomed.iter().enumerate() {
            if *generation != self.generations[i] {
                return Err("the server holds another copy of the disks".into());
            }
            let first =
                self.unacked.iter().find(|(d, _)| *d == i).map_or(self.next_seq[i].0, |(_, b)| b.first_seq);
            if *durable + 1 < first || *durable >= self.next_seq[i].0 {
                return Err(format!(
                    "the server's journal ends at record {durable}, outside what this agent sent and \
                     kept (records {first} to {})",
                    self.next_seq[i].0 - 1
                ));
            }
        }
        Ok(())
    }

    /// The batches the server's journal lacks (`welcomed`, checked): sent again first.
    fn again(&mut self, welcomed: &[(String, u64)]) -> Vec<pb::Batch> {
        let mut again = Vec::new();
        let kept = std::mem::take(&mut self.unacked);
        self.unacked_bytes = 0;
        for (disk, mut b) in kept {
            let durable = welcomed[disk].1;
            let skip = usize::try_from((durable + 1).saturating_sub(b.first_seq)).unwrap_or(usize::MAX);
            if skip >= b.records.len() {
                continue;
            }
            if skip > 0 {
                b.records.drain(..skip);
                if !b.times_ms.is_empty() {
                    b.times_ms.drain(..skip);
                }
                b.first_seq = durable + 1;
            }
            again.push(b.clone());
            self.keep(disk, b);
        }
        again
    }

    /// Stops the streaming thread (every item it took is sent or dropped with the log);
    /// its error, if it ended with one.
    pub(super) async fn close(mut self) -> Result<(), String> {
        self.cancel.cancel();
        // A thread blocked on a full channel wakes when the receiver goes.
        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        drop(std::mem::replace(&mut self.events, rx));
        let Some(t) = self.thread.take() else { return Ok(()) };
        match tokio::task::spawn_blocking(move || t.join()).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(_)) => Err("the streaming thread panicked".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl Session {
    pub(super) async fn run_nbd(&mut self) -> Result<(), SessionError> {
        let Some(tracker) = self.tracker.clone() else { return Ok(()) };
        if self.log.is_some() {
            self.resume_log(&tracker).await?;
        } else {
            self.resync(&tracker).await?;
        }
        let Some(mut log) = self.log.take() else { return Ok(()) };
        let streamed = self.stream(&tracker, &mut log).await;
        log.next_seq = self.next_seq.clone();
        match streamed {
            // The session's end decides whether the log goes on (see `end_log`).
            Ok(Streamed::Done) => {
                self.log = Some(log);
                Ok(())
            }
            Err(e) => {
                self.log = Some(log);
                Err(e)
            }
            // A new session: the server says what it holds past the saved state, and the
            // hot extents are compared.
            Ok(Streamed::Resync) => {
                drop(log.close().await);
                Err(Status::unavailable(
                    "the change log was dropped; reconnecting to compare the hot extents with the server's copy",
                )
                .into())
            }
            Ok(Streamed::Stopped) => match log.close().await {
                Err(e) => Err(Status::unavailable(e).into()),
                Ok(()) => Ok(()),
            },
        }
    }

    /// Whether a log carried over from a dropped link goes on in this session: the server
    /// holds the same copies, and its journal ends within what the log sent and kept. If
    /// not, the log stops here (and the next session compares the hot extents).
    pub(super) async fn carry_on(&mut self, welcome: &pb::Welcome) -> bool {
        let Some(log) = self.log.as_ref() else { return false };
        let check = if welcome.hashes_follow.is_empty() {
            log.check(&self.welcomed)
        } else {
            Err("the server sends its block hashes: it does not know this agent's state".into())
        };
        match check {
            Ok(()) => {
                info!(vm = %self.config.vm, server = %self.config.server, "connected again; replicating");
                true
            }
            Err(why) => {
                info!(reason = %why, "the change log cannot go on where the server's journal ends; \
                    comparing the extents written since the last committed point");
                if let (Some(log), Some(t)) = (self.log.take(), &self.tracker) {
                    log.stop(t).await;
                }
                false
            }
        }
    }

    /// A log carried over from a dropped link goes on where the server's journal ends
    /// (`welcome` checked that it can): the batches the journal lacks are sent again.
    async fn resume_log(&mut self, tracker: &Arc<Tracker>) -> Result<(), SessionError> {
        let Some(log) = self.log.as_mut() else { return Ok(()) };
        let again = log.again(&self.welcomed);
        let bytes: usize = again.iter().map(payload_bytes).sum();
        let stats = tracker.stats();
        info!(
            records = again.iter().map(|b| b.records.len()).sum::<usize>(),
            bytes,
            backlog_bytes = stats.queued_bytes as u64 + stats.spilled_bytes,
            "the server is back: the change log goes on where its journal ends, nothing compared"
        );
        self.next_seq = log.next_seq.clone();
        self.shared = Some(log.shared.clone());
        let mut limiter = tern_proto::rate::RateLimiter::new(self.config.max_rate);
        for b in again {
            self.send_numbered(b, &mut limiter).await?;
        }
        Ok(())
    }

    /// Compares what may differ from the server's copy while the log runs, then starts
    /// the log's stream.
    async fn resync(&mut self, tracker: &Arc<Tracker>) -> Result<(), SessionError> {
        // The log runs before the hot extents are read: a write is in one or the other.
        tracker.start_logging();
        for (i, (d, r)) in self.config.disks.iter().zip(&mut self.regions).enumerate() {
            if let Some(r) = r {
                let hot = tracker.hot_ranges(i);
                let bytes: u64 = hot.iter().map(|x| x.1).sum();
                if bytes >= d.size {
                    info!(disk = %d.name, hot_mib = bytes >> 20, size_mib = d.size >> 20,
                        "comparing the whole disk with the server's copy: its change log cannot vouch for it");
                } else {
                    info!(disk = %d.name, hot_mib = bytes >> 20, size_mib = d.size >> 20,
                        "comparing only the extents written since the last committed point");
                }
                r.extend(hot);
            }
        }
        let started = Instant::now();
        for round in 1.. {
            if round > YIELDING_ROUNDS && !self.resync_urgent {
                warn!(
                    rounds = round - 1,
                    "the VM writes faster than the resync catches up while yielding to it; \
                    the resync now runs at normal priority (no point is made until it is done)"
                );
                self.resync_urgent = true;
            }
            self.report_tracking(tracker, true).await?;
            if let Err(e) = self.attempt(false, true).await? {
                return Err(Status::internal(e).into());
            }
            if tracker.logging() {
                break;
            }
            // The log could not hold the writes made while the disks were compared: compare
            // again what they touched (less each time, as long as the disks read faster than
            // the VM writes), with the log running anew.
            let again = tracker.restart_logging();
            let bytes: u64 = again.iter().flatten().map(|r| r.1).sum();
            info!(
                mib = bytes >> 20,
                "the change log filled up during the resync; comparing what was written meanwhile"
            );
            self.regions = again.into_iter().map(Some).collect();
        }
        info!(
            ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "disks compared with the server's copy; streaming writes as they happen"
        );
        let shared: SharedStates = Arc::new(Mutex::new(std::mem::take(&mut self.states)));
        self.shared = Some(shared.clone());
        let (ev_tx, events) = mpsc::channel::<LogEvent>(4);
        // Not the session's: the stream outlives a dropped link.
        let cancel = tokio_util::sync::CancellationToken::new();
        let (t, c, st) = (tracker.clone(), cancel.clone(), shared.clone());
        let names: Vec<String> = self.config.disks.iter().map(|d| d.name.to_string()).collect();
        // Its own thread: it runs at a lower priority than the VM's writes.
        let thread = std::thread::Builder::new()
            .name("tern-stream".into())
            .spawn(move || stream::run(&t, &names, &st, &ev_tx, &c))
            .map_err(|e| Status::internal(format!("cannot start the streaming thread: {e}")))?;
        self.log = Some(LogStream {
            events,
            thread: Some(thread),
            cancel,
            shared,
            next_seq: self.next_seq.clone(),
            generations: self.welcomed.iter().map(|w| w.0.clone()).collect(),
            unacked: std::collections::VecDeque::new(),
            unacked_bytes: 0,
        });
        Ok(())
    }

    /// The session ends: its log's stream goes on when only the link dropped (the next
    /// session resumes it), else it stops, and the log with it.
    pub(super) async fn end_log(
        &mut self,
        tracker: &Arc<Tracker>,
        result: &Result<(), Status>,
    ) -> Option<LogStream> {
        // Only a lost link, or a server that cannot take records for now: a refusal (a
        // batch that fails verification, a gap) would be refused again if sent again,
        // where a resync reads the disk afresh.
        let link_dropped = result.as_ref().is_err_and(|s| {
            matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Aborted
                    | tonic::Code::ResourceExhausted
            )
        });
        // The server's storage is full: what it takes once there is room must fit, and its
        // journal past the newest point cannot be folded away. The log's backlog can be far
        // more than the disk's hot extents (each overwrite is in it); when it is, the log
        // stops and the next session compares the hot extents, sending only what differs (a
        // backlog bigger than the room retention made kept replication stuck).
        let server_full = result.as_ref().is_err_and(|s| s.code() == tonic::Code::ResourceExhausted);
        if let Some(log) = self.log.take() {
            let stats = tracker.stats();
            let backlog = stats.queued_bytes as u64 + stats.spilled_bytes + log.unacked_bytes as u64;
            let hot: u64 = tracker.tracking(false).iter().map(|t| t.2).sum();
            if server_full && backlog > hot {
                info!(
                    backlog_bytes = backlog,
                    hot_bytes = hot,
                    "the process server's storage is full and the change log holds more than the extents \
                     written since the last point: the log stops, and once there is room those extents are \
                     compared, sending only what differs"
                );
            } else if link_dropped && !self.shutdown.is_cancelled() && tracker.logging() {
                info!(
                    backlog_bytes = stats.queued_bytes as u64 + stats.spilled_bytes,
                    unacked_bytes = log.unacked_bytes,
                    "the process server is away: the change log goes on, in memory and then in \
                     the state directory (up to --spill-max), and is sent once the server is back"
                );
                return Some(log);
            }
            drop(log.close().await);
        }
        tracker.stop_logging();
        None
    }

    /// Sends the log's records and points until the session ends or the log is dropped.
    async fn stream(
        &mut self,
        tracker: &Arc<Tracker>,
        log: &mut LogStream,
    ) -> Result<Streamed, SessionError> {
        let mut limiter = tern_proto::rate::RateLimiter::new(self.config.max_rate);
        let mut report = tokio::time::interval(REPORT_EVERY);
        // Sent batches are kept until acked, in the log's memory: past it the session
        // waits for acks before it sends more (the spill takes the writes meanwhile).
        let unacked_max = self.config.nbd.as_ref().map_or(64 << 20, NbdMode::log_memory);
        // At the bound: when the session gives up on acks that stopped coming.
        let mut stall_at: Option<Due> = None;
        loop {
            let freed = self.settle_acks(log);
            if log.unacked_bytes < unacked_max {
                stall_at = None;
            } else if freed || stall_at.is_none() {
                stall_at = Some(Due::now() + ACK_STALL);
            }
            let Some((final_point, wanted)) = self.turn().await? else { return Ok(Streamed::Done) };
            let now = Due::now();
            // A dropped log takes no marks: the session ends on the reader's word, and
            // the requests are answered (or asked again) after the next resync. Nor does a
            // log still on its way to the mark of a session whose link dropped: requests
            // wait for it.
            let idle = self.awaiting_point.is_none()
                && self.pending_mark.is_none()
                && tracker.logging()
                && !tracker.marking();
            if idle && final_point.is_none() && self.inbox.barrier.is_some() {
                self.barrier_mark(tracker).await?;
                continue;
            }
            if idle && (final_point.is_some() || (!self.stood_down && wanted)) {
                self.mark(tracker, final_point, now).await?;
                continue;
            }
            let due = self.due_crash.min(self.due_app);
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(Streamed::Done),
                _ = tokio::time::sleep_until(due), if idle && !self.stood_down => {}
                _ = report.tick() => self.report_tracking(tracker, false).await?,
                m = self.inbound.message() => self.inbox.take(m?)?,
                // Acks that stop coming while the bound holds the log back: the next
                // session's Welcome says where the server's journal ends.
                () = tokio::time::sleep_until(stall_at.unwrap_or(due)), if stall_at.is_some() => {
                    return Err(Status::unavailable(format!(
                        "no ack from the process server for {} s with {} MiB sent; reconnecting",
                        ACK_STALL.as_secs(),
                        log.unacked_bytes >> 20
                    ))
                    .into());
                }
                // Sent batches are kept until acked: past a bound, the acks come first.
                ev = log.events.recv(), if log.unacked_bytes < unacked_max => match ev {
                    Some(LogEvent::Batch { disk, records, times }) => {
                        let batch = self.number(disk, records, times);
                        log.keep(disk, batch.clone());
                        self.send_numbered(batch, &mut limiter).await?;
                    }
                    Some(LogEvent::Mark { id, fingerprints }) => self.point_of_mark(id, fingerprints).await?,
                    Some(LogEvent::Overflowed) => return Ok(Streamed::Resync),
                    // The streaming thread ended: its error is returned by run_nbd.
                    None => return Ok(Streamed::Stopped),
                },
            }
        }
    }

    /// The server's acks let go of the batches they cover; whether they let go of any.
    fn settle_acks(&mut self, log: &mut LogStream) -> bool {
        if self.inbox.durable.is_empty() {
            return false;
        }
        let before = log.unacked_bytes;
        for (name, seq) in self.inbox.durable.drain() {
            if let Some(i) = self.config.disks.iter().position(|d| d.name.as_str() == name) {
                log.acked(i, seq);
            }
        }
        log.unacked_bytes < before
    }

    /// Marks the log for a point: frozen around the mark when app-consistent.
    async fn mark(
        &mut self,
        tracker: &Arc<Tracker>,
        final_point: Option<u64>,
        now: Due,
    ) -> Result<(), SessionError> {
        let mut requests = std::mem::take(&mut self.inbox.requests);
        if let Some(id) = final_point {
            requests.push((id, false));
        }
        let app = now >= self.due_app || requests.iter().any(|r| r.1);
        let (c, a) = self.schedule.due(now, false);
        self.due_crash = c;
        if app || self.schedule.hold {
            self.due_app = a;
        }
        let (cfg, t) = (self.config.clone(), tracker.clone());
        let freeze = app && cfg.hooks.configured();
        let (id, frozen) = tokio::task::spawn_blocking(move || {
            if !freeze {
                return (t.mark(), Err(String::new()));
            }
            let started = Instant::now();
            match cfg.hooks.freeze() {
                Ok(f) => {
                    let id = t.mark();
                    let held = started.elapsed();
                    f.thaw();
                    (id, Ok(held))
                }
                Err(e) => {
                    warn!(error = %e, "freeze failed; the point will be crash-consistent");
                    (t.mark(), Err(e))
                }
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let (consistency, mut note) = match frozen {
            Ok(held) => (pb::Consistency::App, format!("frozen {} ms for the mark", held.as_millis())),
            Err(e) if app && e.is_empty() => {
                (pb::Consistency::Crash, "no --freeze or --freeze-fs is configured".into())
            }
            Err(e) => (pb::Consistency::Crash, e),
        };
        if final_point.is_some() {
            note = "final point after the source was shut down".into();
            self.stood_down = true;
        }
        let Some((id, time_ms)) = id else {
            for (id, _) in requests {
                self.point_failed(id, "the change log is being resynced; try again in a moment".into())
                    .await?;
            }
            return Ok(());
        };
        self.pending_mark = Some(PendingMark { id, requests, consistency, note, time_ms });
        Ok(())
    }

    async fn report_tracking(&mut self, tracker: &Arc<Tracker>, resync: bool) -> Result<(), SessionError> {
        let disks = self
            .config
            .disks
            .iter()
            .zip(tracker.tracking(resync))
            .map(|(d, (regime, backlog, hot))| pb::DiskTracking {
                disk: d.name.to_string(),
                regime: regime.into(),
                backlog_bytes: backlog,
                hot_bytes: hot,
                pass_offset: 0,
            })
            .collect();
        let problem = crate::state::write_problem();
        self.problem_told.clone_from(&problem);
        self.send(pb::agent_message::Msg::Tracking(pb::Tracking { disks, problem })).await
    }

    /// A mark's hashes are taken and every record before it sent: its point goes out.
    async fn point_of_mark(
        &mut self,
        id: u64,
        fingerprints: Vec<tern_core::Digest>,
    ) -> Result<(), SessionError> {
        let Some(m) = self.pending_mark.take_if(|m| m.id == id) else { return Ok(()) };
        let seqs: Vec<Seq> = self.next_seq.iter().map(|n| Seq(n.0 - 1)).collect();
        let point = pb::MakePoint {
            request_ids: m.requests.iter().map(|r| r.0).collect(),
            consistency: m.consistency as i32,
            disks: self.point_disks(&fingerprints, &seqs),
            time_ms: m.time_ms,
            sent_ms: crate::now_ms(),
            note: m.note,
        };
        if self.repeats_last_point(&point) {
            return Ok(());
        }
        self.send_point(point, m.requests, seqs).await?;
        self.awaiting_mark = Some(id);
        Ok(())
    }
}
