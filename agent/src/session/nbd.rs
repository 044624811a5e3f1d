//! The session of `--mode nbd`: a resync (a scan pass that compares the disks with the
//! server's copy, while the log already records every write), then the log streams in
//! write order, and a point is a mark in the log — a crash-consistent cut across the
//! VM's disks, taken without scanning anything. An app-consistent point freezes the VM
//! only for the mark.

use super::{Session, SessionError};
use crate::Requests;
use crate::stream::{self, LogEvent, SharedStates};
use crate::tracker::Tracker;
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
}

/// Stops the log when the session ends, however it ends.
struct StopLogging(Arc<Tracker>);

impl Drop for StopLogging {
    fn drop(&mut self) {
        self.0.stop_logging();
    }
}

impl Session {
    pub(super) async fn run_nbd(&mut self) -> Result<(), SessionError> {
        let Some(tracker) = self.tracker.clone() else { return Ok(()) };
        let _stop = StopLogging(tracker.clone());
        // The log runs before the hot extents are read: a write is in one or the other.
        tracker.start_logging();
        for (i, (d, r)) in self.config.disks.iter().zip(&mut self.regions).enumerate() {
            if let Some(r) = r {
                let hot = tracker.hot_ranges(i);
                let bytes: u64 = hot.iter().map(|x| x.1).sum();
                info!(disk = %d.name, hot_mib = bytes >> 20, size_mib = d.size >> 20,
                    "comparing only the extents written since the last committed point");
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
            self.report_tracking(&tracker, true).await?;
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
        let (ev_tx, mut ev_rx) = mpsc::channel::<LogEvent>(4);
        let cancel = self.shutdown.child_token();
        let (t, c, st) = (tracker.clone(), cancel.clone(), shared.clone());
        let names: Vec<String> = self.config.disks.iter().map(|d| d.name.to_string()).collect();
        // Its own thread: it runs at a lower priority than the VM's writes.
        let streamer = std::thread::Builder::new()
            .name("tern-stream".into())
            .spawn(move || stream::run(&t, &names, &st, &ev_tx, &c))
            .map_err(|e| Status::internal(format!("cannot start the streaming thread: {e}")))?;
        let streamed = self.stream(&tracker, &mut ev_rx).await;
        cancel.cancel();
        drop(ev_rx);
        let joined = tokio::task::spawn_blocking(move || streamer.join())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|_| Status::internal("the streaming thread panicked"))?;
        match (streamed?, joined) {
            (_, Err(e)) => Err(Status::unavailable(e.to_string()).into()),
            (Streamed::Done, Ok(())) => Ok(()),
            // A new session: the server says what it holds past the saved state, and the
            // hot extents are compared.
            (Streamed::Resync, Ok(())) => Err(Status::unavailable(
                "the change log was dropped; reconnecting to compare the hot extents with the server's copy",
            )
            .into()),
        }
    }

    /// Sends the log's records and points until the session ends or the log is dropped.
    async fn stream(
        &mut self,
        tracker: &Arc<Tracker>,
        events: &mut mpsc::Receiver<LogEvent>,
    ) -> Result<Streamed, SessionError> {
        let mut limiter = tern_proto::rate::RateLimiter::new(self.config.max_rate);
        let mut report = tokio::time::interval(REPORT_EVERY);
        loop {
            let Some((final_point, wanted)) = self.turn().await? else { return Ok(Streamed::Done) };
            let now = Due::now();
            // A dropped log takes no marks: the session ends on the reader's word, and
            // the requests are answered (or asked again) after the next resync.
            let idle = self.awaiting_point.is_none() && self.pending_mark.is_none() && tracker.logging();
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
                ev = events.recv() => match ev {
                    Some(LogEvent::Batch { disk, records, times }) => self.send_batch(disk, records, times, &mut limiter).await?,
                    Some(LogEvent::Mark { id, fingerprints }) => self.send_point(id, fingerprints).await?,
                    Some(LogEvent::Overflowed) => return Ok(Streamed::Resync),
                    // The streaming thread ended: its error is returned by run_nbd.
                    None => return Ok(Streamed::Done),
                },
            }
        }
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

    async fn report_tracking(&self, tracker: &Arc<Tracker>, resync: bool) -> Result<(), SessionError> {
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
            })
            .collect();
        self.send(pb::agent_message::Msg::Tracking(pb::Tracking { disks })).await
    }

    /// A mark's hashes are taken and every record before it sent: its point goes out.
    async fn send_point(
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
            note: m.note,
        };
        self.send(pb::agent_message::Msg::Point(point)).await?;
        self.awaiting_point = Some((m.requests, seqs));
        self.awaiting_mark = Some(id);
        Ok(())
    }
}
