//! Multi-VM points: the process server asks every member of a replication group for a cut
//! (`Barrier`), and releases them all at once when each has reported its cut
//! (`BarrierReached`). Until the release each member holds its cut: in scan mode the VM
//! stays frozen after its frozen pass, in nbd mode its new writes wait. So every member's
//! cut is the same moment, and a write that depends on another VM's acknowledged write is
//! never in a cut without it. A member that cannot hold (no freeze hook in scan mode, a
//! failed freeze) refuses the barrier rather than make a false multi-VM point.

use super::{Session, SessionError};
use crate::tracker::Tracker;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_core::Seq;
use tern_proto as pb;
use tonic::Status;
use tracing::{info, warn};

/// Least time a member holds its cut waiting for the release.
const MIN_HOLD: Duration = Duration::from_secs(1);

/// What a point's note says of how its hold ended.
fn hold_note(proceed: Option<bool>, held: Duration, what: &str, most: Duration) -> String {
    let ms = held.as_millis();
    match proceed {
        Some(true) => format!("multi-VM point: {what} {ms} ms for the barrier"),
        Some(false) => format!(
            "{what} {ms} ms for a multi-VM barrier that another member could not reach: a point of this VM alone"
        ),
        None => format!(
            "{what} {ms} ms for a multi-VM barrier and no release came within {} s: a point of this VM alone",
            most.as_secs()
        ),
    }
}

impl Session {
    /// Hands a barrier's release to the frozen pass that waits for it.
    pub(super) fn pass_release(&mut self) {
        let Some((id, proceed)) = self.inbox.release.take() else { return };
        if let Some((want, tx)) = &self.release_to
            && *want == id
        {
            let _ = tx.send(proceed);
        }
    }

    /// The requests a held cut answers: the barrier's only when the release said proceed.
    /// Otherwise the server hears that this member gave up (no multi-VM point can include a
    /// cut that stopped holding before the others were released), and the cut is this VM's
    /// own point.
    async fn after_hold(
        &self,
        b: &pb::Barrier,
        proceed: Option<bool>,
        note: &str,
    ) -> Result<crate::Requests, SessionError> {
        if proceed == Some(true) {
            return Ok(vec![(b.request_id, b.app_consistent)]);
        }
        self.point_failed(b.request_id, format!("VM {}: {note}", self.config.vm)).await?;
        Ok(Vec::new())
    }

    /// Takes the barrier asked for, or refuses it (the reason goes to the server) when it
    /// came too long ago to be held now.
    async fn take_barrier(&mut self) -> Result<Option<(pb::Barrier, Duration)>, SessionError> {
        let Some((b, received)) = self.inbox.barrier.take() else { return Ok(None) };
        let most = Duration::from_millis(b.hold_ms).max(MIN_HOLD);
        if received.elapsed() > most {
            let reason = format!(
                "VM {}: the barrier came while the agent was busy (a pass or a resync) and is {} s old",
                self.config.vm,
                received.elapsed().as_secs()
            );
            self.point_failed(b.request_id, reason).await?;
            return Ok(None);
        }
        Ok(Some((b, most)))
    }

    /// Scan mode: a frozen pass that stays frozen until the release. Without a freeze hook
    /// a pass is no cut of a moment, so the barrier is refused.
    pub(super) async fn barrier_scan(&mut self) -> Result<(), SessionError> {
        let Some((b, most)) = self.take_barrier().await? else { return Ok(()) };
        let refusal = if !self.config.hooks.configured() {
            Some(format!(
                "VM {} has no --freeze or --freeze-fs: in scan mode a multi-VM point needs every member's \
                 freeze hook (configure one, or run its agent in --mode nbd)",
                self.config.vm
            ))
        } else if self.feeds().iter().any(Option::is_some) {
            Some(format!(
                "VM {}: the first pass after a resync still compares with the server's copy and cannot be \
                 frozen; try again once it is done",
                self.config.vm
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            return self.point_failed(b.request_id, reason).await;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        self.release_to = Some((b.request_id, tx));
        self.held = None;
        let result = self.attempt_held(true, true, Some((rx, most))).await;
        self.release_to = None;
        let held = self.held.take();
        let (pass, frozen) = match result? {
            Ok(done) => done,
            Err(freeze_failed) => {
                let reason = format!("VM {}: the freeze hook failed: {freeze_failed}", self.config.vm);
                return self.point_failed(b.request_id, reason).await;
            }
        };
        let Some((proceed, held)) = held.filter(|_| frozen && pass.consistent) else {
            let reason = format!(
                "VM {}: its disks changed during the frozen pass; check that the freeze hook quiesces every write",
                self.config.vm
            );
            return self.point_failed(b.request_id, reason).await;
        };
        let note = hold_note(proceed, held, "frozen", most);
        info!(request = b.request_id, held_ms = held.as_millis(), proceed = ?proceed, "multi-VM barrier held");
        let requests = self.after_hold(&b, proceed, &note).await?;
        let seqs: Vec<Seq> = self.next_seq.iter().map(|n| Seq(n.0 - 1)).collect();
        let point = pb::MakePoint {
            request_ids: requests.iter().map(|r| r.0).collect(),
            consistency: pb::Consistency::App as i32,
            disks: self.point_disks(&pass.fingerprints, &seqs),
            time_ms: crate::now_ms(),
            sent_ms: crate::now_ms(),
            note,
        };
        self.send_point(point, requests, seqs).await
    }

    /// nbd mode: a mark that holds the VM's new writes until the release (frozen only
    /// around the mark when app-consistent). The point goes out once the mark's hashes
    /// are taken, as for any mark.
    pub(super) async fn barrier_mark(&mut self, tracker: &Arc<Tracker>) -> Result<(), SessionError> {
        let Some((b, most)) = self.take_barrier().await? else { return Ok(()) };
        let freeze = b.app_consistent;
        if freeze && !self.config.hooks.configured() {
            let reason = format!(
                "VM {} has no --freeze or --freeze-fs for an app-consistent multi-VM point",
                self.config.vm
            );
            return self.point_failed(b.request_id, reason).await;
        }
        // One blocking thread holds the cut: freeze, mark with the writes held, wait for the
        // release (at most `most` from the mark), let the writes go, then thaw. The thaw
        // comes after the release: a thaw writes (a file system's superblock), and a write
        // made while held would wait for a release that waits for the thaw.
        let (cfg, t) = (self.config.clone(), tracker.clone());
        let (marked_tx, marked_rx) = tokio::sync::oneshot::channel::<bool>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<bool>();
        let mut holder = tokio::task::spawn_blocking(move || {
            let frozen = if freeze { Some(cfg.hooks.freeze()?) } else { None };
            let Some(mark) = t.mark_and_hold(true) else {
                let _ = marked_tx.send(false);
                if let Some(f) = frozen {
                    f.thaw();
                }
                return Ok(None);
            };
            let at = Instant::now();
            let _ = marked_tx.send(true);
            // A dropped sender (the session ended) releases at once.
            let proceed = release_rx.recv_timeout(most).ok();
            t.release_hold();
            let held = at.elapsed();
            if let Some(f) = frozen {
                f.thaw();
            }
            Ok::<_, String>(Some((mark, proceed, held)))
        });
        let mut release_tx = Some(release_tx);
        if marked_rx.await.unwrap_or(false) {
            self.send(pb::agent_message::Msg::Reached(pb::BarrierReached { request_id: b.request_id }))
                .await?;
        }
        let held = loop {
            if let Some((rid, proceed)) = self.inbox.release.take()
                && rid == b.request_id
                && let Some(tx) = release_tx.take()
            {
                let _ = tx.send(proceed);
            }
            tokio::select! {
                r = &mut holder => break r.map_err(|e| Status::internal(e.to_string()))?,
                _ = self.shutdown.cancelled(), if release_tx.is_some() => release_tx = None,
                m = self.inbound.message() => self.inbox.take(m?)?,
            }
        };
        let ((id, time_ms), proceed, held) = match held {
            Ok(Some(h)) => h,
            Ok(None) => {
                let reason =
                    format!("VM {}: its change log is being resynced; try again in a moment", self.config.vm);
                return self.point_failed(b.request_id, reason).await;
            }
            Err(e) => {
                let reason = format!("VM {}: the freeze hook failed: {e}", self.config.vm);
                return self.point_failed(b.request_id, reason).await;
            }
        };
        if proceed.is_none() {
            warn!(request = b.request_id, "no release came for the multi-VM barrier; the VM's writes go on");
        }
        info!(request = b.request_id, held_ms = held.as_millis(), proceed = ?proceed, "multi-VM barrier held");
        let consistency = if freeze { pb::Consistency::App } else { pb::Consistency::Crash };
        let note = hold_note(proceed, held, "writes held", most);
        let requests = self.after_hold(&b, proceed, &note).await?;
        self.pending_mark = Some(super::nbd::PendingMark { id, requests, consistency, note, time_ms });
        Ok(())
    }
}
