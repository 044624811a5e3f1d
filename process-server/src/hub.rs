//! Which agents are connected, the commands waiting for them, and per-VM counters.

use crate::lock;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tern_core::VmName;
use tern_proto::{CheckpointRequest, Policy, ServerMessage, ShutdownRequest, StandDown, server_message};
use tern_store::Point;
use tokio::sync::{OwnedMutexGuard, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Status;

pub type Outbound = mpsc::Sender<Result<ServerMessage, Status>>;

#[derive(Debug)]
struct Link {
    session: u64,
    commands: Outbound,
    cancel: CancellationToken,
    attached: Instant,
}

#[derive(Debug, Default)]
struct VmCounters {
    bytes_received: u64,
    disconnected_at: Option<Instant>,
    /// Per disk, the end of the last extent received: a pass sends in offset order, so
    /// this is how far the agent's current pass has come.
    scan_at: HashMap<String, u64>,
    /// Why the last session failed on this side (storage full, a bad batch), when, and
    /// whether replication has made progress since.
    error: Option<(String, Instant, bool)>,
    /// Why the VM's last session failed on this server's side (a full data directory, a
    /// refused record), and when; cleared when a session starts. Unlike `error`, never a
    /// relay's failure or another agent's refusal.
    session_failure: Option<(String, Instant)>,
    /// The agent's last tracking report, per disk.
    tracking: HashMap<String, tern_proto::DiskTracking>,
    /// Why the agent's last scheduled point could not be made; until a point is.
    point_failure: Option<String>,
    /// What the agent last said it cannot write in its state directory (`Tracking.problem`).
    agent_problem: Option<String>,
    /// How far the agent's clock is off this server's, as its session found it.
    clock_skew: crate::clock::ClockSkew,
}

/// A failure stays on show at least this long, even when a later session makes some
/// progress (a full disk still takes a batch or two into the space a failed write left).
const ERROR_HOLD: std::time::Duration = std::time::Duration::from_secs(10);

/// The answer to a checkpoint request: the point, or why the agent could not make it.
pub type PointResult = Result<Point, String>;

/// One VM's replication session: who holds it, and a lock that keeps a second session
/// from writing the same journals until the first has drained.
#[derive(Debug, Default)]
struct SessionSlot {
    lock: Arc<tokio::sync::Mutex<()>>,
    /// The live holder: its address, since when (ms) and its agent's instance (see
    /// `Hello.instance`). `None` once it is ending.
    holder: Mutex<Option<(String, i64, String)>>,
}

/// Held for as long as a session runs; frees the slot when dropped.
#[derive(Debug)]
pub struct SessionGuard {
    _lock: OwnedMutexGuard<()>,
    slot: Arc<SessionSlot>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        *lock(&self.slot.holder) = None;
    }
}

/// Why a session was refused: another agent holds the VM.
#[derive(Debug, thiserror::Error)]
#[error(
    "VM {vm} is already replicating from another agent ({peer}, connected at {since}): only one agent may \
     protect a VM. Stop the other agent (or give this one the VM it is meant for); if the other is gone, this \
     one takes over once the server notices, within seconds"
)]
pub struct Held {
    pub vm: VmName,
    pub peer: String,
    pub since: String,
}

#[derive(Debug, Default)]
pub struct Hub {
    links: Mutex<HashMap<VmName, Link>>,
    sessions: Mutex<HashMap<VmName, Arc<SessionSlot>>>,
    waiters: Mutex<HashMap<u64, (VmName, oneshot::Sender<PointResult>)>>,
    counters: Mutex<HashMap<VmName, VmCounters>>,
    next_id: AtomicU64,
}

impl Hub {
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Takes the session of `vm` for the agent at `peer`. A live session of another agent
    /// refuses it (one agent per VM: two would take turns and mix their disks); one that
    /// is ending (its agent died, its link dropped) is waited for until it has drained, and
    /// so is a live one of the same agent process (`instance`): its connection died and it
    /// came back before the server noticed; that session is ended now.
    /// The guard keeps a second session from writing the same journals at the same time.
    pub async fn take_session(
        &self,
        vm: &VmName,
        peer: String,
        instance: &str,
    ) -> Result<SessionGuard, Held> {
        let slot = lock(&self.sessions).entry(vm.clone()).or_default().clone();
        let guard = match slot.lock.clone().try_lock_owned() {
            Ok(g) => g,
            Err(_) => {
                if let Some((holder, since, of)) = lock(&slot.holder).clone() {
                    if instance.is_empty() || of != instance {
                        return Err(Held { vm: vm.clone(), peer: holder, since: tern_store::rfc3339(since) });
                    }
                    tracing::info!(vm = %vm, old = %holder, new = %peer,
                        "the agent came back on a new connection: its previous session ends");
                    if let Some(l) = lock(&self.links).get(vm) {
                        l.cancel.cancel();
                    }
                }
                slot.lock.clone().lock_owned().await
            }
        };
        *lock(&slot.holder) = Some((peer, tern_store::now_ms(), instance.to_string()));
        Ok(SessionGuard { _lock: guard, slot })
    }

    pub fn attach(&self, vm: &VmName, session: u64, commands: Outbound, cancel: CancellationToken) {
        lock(&self.links).insert(vm.clone(), Link { session, commands, cancel, attached: Instant::now() });
        let mut counters = lock(&self.counters);
        let c = counters.entry(vm.clone()).or_default();
        c.disconnected_at = None;
        c.session_failure = None;
        // A new session (another agent, or this one restarted after a fix) says anew
        // whether its points fail.
        c.point_failure = None;
    }

    pub fn detach(&self, vm: &VmName, session: u64) {
        let mut links = lock(&self.links);
        let attached = match links.get(vm) {
            Some(l) if l.session == session => l.attached,
            _ => return,
        };
        links.remove(vm);
        // Ending: a new session of the VM now waits for this one to drain.
        if let Some(slot) = lock(&self.sessions).get(vm) {
            *lock(&slot.holder) = None;
        }
        lock(&self.counters).entry(vm.clone()).or_default().disconnected_at = Some(Instant::now());
        let reason = match self.error_since(vm, attached) {
            Some(e) => format!("the replication session ended before the point was made: {e}"),
            None => "the agent disconnected before it made the point".to_string(),
        };
        // Whoever waits for a point from this agent learns at once that none will come.
        let mut waiters = lock(&self.waiters);
        let gone: Vec<u64> = waiters.iter().filter(|(_, (v, _))| v == vm).map(|(id, _)| *id).collect();
        for id in gone {
            if let Some((_, tx)) = waiters.remove(&id) {
                let _ = tx.send(Err(reason.clone()));
            }
        }
    }

    /// Why the live session `session` of `vm` failed on the server's side (a full data
    /// directory, a refused record), if it did: then that, not the agent, ended it.
    pub fn session_error(&self, vm: &VmName, session: u64) -> Option<String> {
        let attached = lock(&self.links).get(vm).filter(|l| l.session == session)?.attached;
        self.error_since(vm, attached)
    }

    fn error_since(&self, vm: &VmName, since: Instant) -> Option<String> {
        let counters = lock(&self.counters);
        counters.get(vm)?.session_failure.as_ref().filter(|(_, at)| *at >= since).map(|(e, _)| e.clone())
    }

    /// A session of `vm` fails on this server's side: shown in status (as [`Hub::set_error`])
    /// and told, instead of "the agent disconnected", to whoever waits on it.
    pub fn fail_session(&self, vm: &VmName, error: &str) {
        self.set_error(vm, error);
        lock(&self.counters).entry(vm.clone()).or_default().session_failure =
            Some((error.to_string(), Instant::now()));
    }

    pub fn connected(&self, vm: &VmName) -> bool {
        lock(&self.links).contains_key(vm)
    }

    /// Seconds since the agent of `vm` went away (None while connected or never seen).
    pub fn disconnected_for(&self, vm: &VmName) -> Option<u64> {
        if self.connected(vm) {
            return None;
        }
        lock(&self.counters).get(vm).and_then(|c| c.disconnected_at).map(|t| t.elapsed().as_secs())
    }

    /// The agent of `vm` counts as away from now (a new agent is awaited: a reprotect).
    pub fn absent_from_now(&self, vm: &VmName) {
        if !self.connected(vm) {
            lock(&self.counters).entry(vm.clone()).or_default().disconnected_at = Some(Instant::now());
        }
    }

    /// Forgets what is kept about `vm` (its counters, its last error): the VM was removed.
    pub fn forget(&self, vm: &VmName) {
        lock(&self.counters).remove(vm);
    }

    pub fn add_bytes(&self, vm: &VmName, n: u64) {
        lock(&self.counters).entry(vm.clone()).or_default().bytes_received += n;
    }

    /// Notes how far the agent's pass over `disk` has come.
    pub fn note_scan(&self, vm: &VmName, disk: &str, end: u64) {
        lock(&self.counters).entry(vm.clone()).or_default().scan_at.insert(disk.to_string(), end);
    }

    /// How far the agent's current pass has come, summed over its disks.
    pub fn scan_position(&self, vm: &VmName) -> u64 {
        lock(&self.counters).get(vm).map_or(0, |c| c.scan_at.values().sum())
    }

    /// Notes why replication of `vm` is failing; shown by `drctl status` until it goes on.
    pub fn set_error(&self, vm: &VmName, error: &str) {
        lock(&self.counters).entry(vm.clone()).or_default().error =
            Some((error.to_string(), Instant::now(), false));
    }

    /// A session of `vm` was admitted: an earlier refusal of its agent (a resized disk, a
    /// missing one) holds no more. A failure of the server's own (its storage full) holds
    /// until records are acked or a point is made again.
    pub fn clear_refusal(&self, vm: &VmName) {
        let failed = lock(&self.counters).get(vm).is_some_and(|c| c.session_failure.is_some());
        if !failed {
            self.clear_error(vm);
        }
    }

    /// Replication of `vm` made progress (records acked).
    pub fn clear_error(&self, vm: &VmName) {
        if let Some((_, _, progressed)) = lock(&self.counters).get_mut(vm).and_then(|c| c.error.as_mut()) {
            *progressed = true;
        }
    }

    /// The last failure, until replication has made progress since and it is
    /// [`ERROR_HOLD`] old; else why the agent's scheduled points fail, until one is made.
    pub fn error(&self, vm: &VmName) -> Option<String> {
        let mut counters = lock(&self.counters);
        let c = counters.get_mut(vm)?;
        match &c.error {
            Some((_, at, true)) if at.elapsed() >= ERROR_HOLD => {
                c.error = None;
            }
            Some((e, _, _)) => return Some(e.clone()),
            None => {}
        }
        c.point_failure.as_ref().map(|r| format!("the agent makes no point: {r}"))
    }

    /// The agent could not make a scheduled point, and why.
    pub fn fail_point(&self, vm: &VmName, reason: &str) {
        lock(&self.counters).entry(vm.clone()).or_default().point_failure = Some(reason.to_string());
    }

    /// Keeps how far the agent's clock is behind this server's (negative: ahead).
    pub fn set_clock_skew(&self, vm: &VmName, skew: crate::clock::ClockSkew) {
        lock(&self.counters).entry(vm.clone()).or_default().clock_skew = skew;
    }

    pub fn clock_skew(&self, vm: &VmName) -> crate::clock::ClockSkew {
        lock(&self.counters).get(vm).map(|c| c.clock_skew).unwrap_or_default()
    }

    /// A point of `vm` was made: its scheduled points no longer fail, and replication made
    /// progress (an idle VM acks no records: its point is the proof that its storage, full
    /// before, takes its writes again).
    pub fn point_made(&self, vm: &VmName) {
        if let Some(c) = lock(&self.counters).get_mut(vm) {
            c.point_failure = None;
        }
        self.clear_error(vm);
    }

    /// Keeps the agent's report of how it tracks its disks.
    pub fn note_tracking(&self, vm: &VmName, t: tern_proto::Tracking) {
        let mut c = lock(&self.counters);
        let e = c.entry(vm.clone()).or_default();
        e.agent_problem = (!t.problem.is_empty()).then_some(t.problem);
        for d in t.disks {
            e.tracking.insert(d.disk.clone(), d);
        }
    }

    /// What the agent of `vm` last said it cannot write in its state directory.
    pub fn agent_problem(&self, vm: &VmName) -> Option<String> {
        lock(&self.counters).get(vm).and_then(|c| c.agent_problem.clone())
    }

    /// The agent's last report on `disk` of `vm`.
    pub fn tracking(&self, vm: &VmName, disk: &str) -> Option<tern_proto::DiskTracking> {
        lock(&self.counters).get(vm).and_then(|c| c.tracking.get(disk).cloned())
    }

    pub fn bytes_received(&self, vm: &VmName) -> u64 {
        lock(&self.counters).get(vm).map_or(0, |c| c.bytes_received)
    }

    /// Asks the connected agent of `vm` for a point; the receiver gets the answer.
    pub async fn request_checkpoint(
        &self,
        vm: &VmName,
        app_consistent: bool,
    ) -> Result<oneshot::Receiver<PointResult>, Status> {
        self.request(vm, |request_id| {
            server_message::Msg::Checkpoint(CheckpointRequest { request_id, app_consistent })
        })
        .await
    }

    /// Asks the agent to run its shutdown hook and make a final point.
    pub async fn request_shutdown(&self, vm: &VmName) -> Result<oneshot::Receiver<PointResult>, Status> {
        self.request(vm, |request_id| server_message::Msg::Shutdown(ShutdownRequest { request_id })).await
    }

    async fn request(
        &self,
        vm: &VmName,
        make: impl FnOnce(u64) -> server_message::Msg,
    ) -> Result<oneshot::Receiver<PointResult>, Status> {
        let commands = self.commands(vm)?;
        let request_id = self.next_id();
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(request_id, (vm.clone(), tx));
        if commands.send(Ok(ServerMessage { msg: Some(make(request_id)) })).await.is_err() {
            lock(&self.waiters).remove(&request_id);
            return Err(Status::unavailable(format!("the agent of VM {vm} went away; try again")));
        }
        Ok(rx)
    }

    fn commands(&self, vm: &VmName) -> Result<Outbound, Status> {
        let link = lock(&self.links).get(vm).map(|l| l.commands.clone());
        link.ok_or_else(|| {
            let failure = lock(&self.counters).get(vm).and_then(|c| c.session_failure.clone()).map(|(e, _)| e);
            Status::failed_precondition(match failure {
                // The agent runs, but its sessions end on the server's side (a full data
                // directory): starting it is not the remedy.
                Some(e) => format!("the agent of VM {vm} is not connected: its last session ended on: {e}"),
                None => format!(
                    "the agent of VM {vm} is not connected; start `mobility-agent run` for it, or check its log"
                ),
            })
        })
    }

    /// Sends a command to the connected agent of `vm`; false when there is none (or it
    /// went away).
    pub async fn send_command(&self, vm: &VmName, msg: ServerMessage) -> bool {
        match self.commands(vm) {
            Ok(c) => c.send(Ok(msg)).await.is_ok(),
            Err(_) => false,
        }
    }

    /// Sends the new policy to the connected agent, if any.
    pub fn send_policy(&self, vm: &VmName, policy: Policy) {
        if let Ok(c) = self.commands(vm) {
            let _ = c.try_send(Ok(ServerMessage { msg: Some(server_message::Msg::Policy(policy)) }));
        }
    }

    /// Tells the agent of `vm` to stop replicating, and ends its session.
    pub async fn stand_down(&self, vm: &VmName, reason: &str) {
        let link = lock(&self.links).get(vm).map(|l| (l.commands.clone(), l.cancel.clone()));
        if let Some((commands, cancel)) = link {
            let msg = server_message::Msg::StandDown(StandDown { reason: reason.to_string() });
            let _ = commands.send(Ok(ServerMessage { msg: Some(msg) })).await;
            cancel.cancel();
        }
    }

    pub fn resolve(&self, request_id: u64, result: PointResult) {
        if let Some((_, tx)) = lock(&self.waiters).remove(&request_id) {
            let _ = tx.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ages the failure on show for `vm` by `by`, as if it had come that long ago.
    fn age(hub: &Hub, vm: &VmName, by: std::time::Duration) {
        let mut c = lock(&hub.counters);
        let e = c.get_mut(vm).unwrap().error.as_mut().unwrap();
        e.1 = e.1.checked_sub(by).unwrap();
    }

    #[test]
    fn a_storage_failure_ends_with_a_point_made_though_no_record_is_acked() {
        let (hub, vm) = (Hub::default(), VmName::new("idle").unwrap());
        hub.fail_session(&vm, "the process server's storage is full");
        age(&hub, &vm, ERROR_HOLD * 2);
        // A new session is admitted: the server's own failure stays until progress.
        hub.clear_refusal(&vm);
        assert!(hub.error(&vm).is_some_and(|e| e.contains("storage is full")));
        hub.point_made(&vm);
        assert_eq!(hub.error(&vm), None);
        // Progress shows a failure at least ERROR_HOLD, point or not.
        hub.fail_session(&vm, "the process server's storage is full");
        hub.point_made(&vm);
        assert!(hub.error(&vm).is_some());
    }
}
