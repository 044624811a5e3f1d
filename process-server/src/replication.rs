//! The replication service: one bidirectional stream per agent. Batches are verified in
//! parallel off the reactor, appended in order, fsynced as a group, then acked.

use crate::clock::ClockSkew;
use crate::lock;
use crate::{Ctx, store_status};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use tern_core::{Digest, DiskName, Seq, VmName};
use tern_daemon::Site;
use tern_daemon::commit::{self, Durable, GroupCommit, Sink, Written};
use tern_proto::{
    Ack, AgentMessage, Batch, DiskState, PointAck, ServerMessage, Welcome, agent_message, server_message,
};
use tern_store::{Consistency, DiskHandle, NewPoint, PointDisk};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

/// Verified batches waiting to be written; bounds server memory per session.
const PIPELINE_DEPTH: usize = 4;

#[derive(Debug, Clone)]
pub struct ReplicationService {
    pub ctx: Arc<Ctx>,
}

type Handles = Arc<HashMap<DiskName, Arc<DiskHandle>>>;
use crate::initial::InitialSync;

enum Item {
    /// A batch being verified (see `tern_daemon::ingest`).
    Batch(tern_daemon::ingest::Pending),
    Point(tern_proto::MakePoint),
    PointFailed(tern_proto::PointFailed),
}

fn msg(m: server_message::Msg) -> Result<ServerMessage, Status> {
    Ok(ServerMessage { msg: Some(m) })
}

#[tonic::async_trait]
impl tern_proto::replication_server::Replication for ReplicationService {
    type ReplicateStream = Pin<Box<dyn Stream<Item = Result<ServerMessage, Status>> + Send>>;

    async fn replicate(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let (parts_req, mut inbound) = split(req);
        let hello = match inbound.message().await? {
            Some(AgentMessage { msg: Some(agent_message::Msg::Hello(h)) }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a replication stream must be Hello",
                ));
            }
        };
        let vm = VmName::new(&hello.vm).map_err(|e| Status::invalid_argument(e.to_string()))?;
        crate::auth::require_agent_for(&parts_req, &vm)?;
        // An agent that cannot replicate says why before it exits (a disk it cannot open):
        // shown in the VM's status, where only "agent no" would show otherwise (W18-B).
        if !hello.problem.is_empty() {
            warn!(vm = %vm, problem = %hello.problem, "the agent cannot replicate");
            // Not from a second process while the VM's agent replicates (W19-C: one started
            // by mistake turned a healthy VM critical until its next point).
            if self.ctx.store.has_vm(&vm).unwrap_or(false) && !self.ctx.hub.connected(&vm) {
                self.ctx.hub.fail_point(&vm, &hello.problem);
            }
            return Err(Status::unavailable(format!("noted: {}", hello.problem)));
        }
        // Taken now: the Hello is the stream's first message, with nothing queued before it.
        let (skew, skew_ms) = ClockSkew::measured(hello.time_ms, tern_store::now_ms());
        let ctx = self.ctx.clone();
        // A disk of size 0 (emptied for a moment, a device detached) shows in the VM's
        // status as any refusal does (W18-C: it stayed normal while its agent asked again).
        let (disks, agent_states, sources) = disks_of(&hello).inspect_err(|e| {
            if ctx.store.has_vm(&vm).unwrap_or(false) {
                ctx.hub.set_error(&vm, e.message());
            }
        })?;
        let peer = parts_req.remote_addr().map_or_else(|| "unknown address".to_string(), |a| a.to_string());
        let guard = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            ctx.hub.take_session(&vm, peer, &hello.instance),
        )
        .await
        .map_err(|_| Status::unavailable("the previous session of this VM is still draining; retry"))?
        .map_err(|held| {
            warn!(vm = %vm, holder = %held.peer, "a second agent for the VM refused");
            Status::already_exists(held.to_string())
        })?;
        let serial = crate::identities::caller_serial(&parts_req);
        let admitted = admit_session(&ctx, &vm, serial, disks, agent_states, sources).await?;
        let hashes_follow = hash_sources(&admitted);
        let welcome = welcome_of(&admitted, &hashes_follow);
        let handles = admitted.handles;
        let (out_tx, out_rx) = mpsc::channel(64);
        out_tx
            .send(msg(server_message::Msg::Welcome(welcome)))
            .await
            .map_err(|_| Status::cancelled("agent went away"))?;
        // An earlier session's refusal (a resized disk, a missing one) holds no more; with
        // `--sync during` no ack would come to clear it before the failback.
        ctx.hub.clear_refusal(&vm);
        let session = ctx.hub.next_id();
        let cancel = ctx.shutdown.child_token();
        ctx.hub.attach(&vm, session, out_tx.clone(), cancel.clone());
        ctx.hub.set_clock_skew(&vm, skew);
        info!(vm = %vm, session, disks = handles.len(), "agent connected");
        if skew_ms.saturating_abs() > crate::clock::WARN_MS {
            warn!(vm = %vm, skew_s = skew_ms / 1000,
                "the agent's clock is {} this server's by {}: its points are dated on this server's clock; \
                 set the agent host's time right (NTP)",
                if skew_ms > 0 { "behind" } else { "ahead of" },
                tern_core::units::rpo_text(skew_ms.saturating_abs() / 1000));
        }
        let handles: Handles = Arc::new(handles.into_iter().map(|h| (h.name.clone(), h)).collect());
        let initial = crate::initial::join(&ctx, &vm).await?;
        let ctx2 = ctx.clone();
        // The block hashes stream while the session runs: the agent compares each part of
        // its disk as soon as that part's hashes have come, and sends what differs.
        let copies: Copies = Arc::default();
        let senders = (ctx.clone(), vm.clone(), out_tx.clone(), cancel.clone(), copies.clone());
        ctx.tracker.spawn(send_all_hashes(senders, hashes_follow));
        ctx.tracker.spawn(async move {
            let ended = cancel.clone();
            run_session(&ctx2, &vm, handles, inbound, out_tx, cancel, initial.clone(), copies).await;
            // Hashes still on their way (or waiting for the relay) stop with the session.
            ended.cancel();
            let why = match ctx2.hub.session_error(&vm, session) {
                Some(e) => format!("the session ended: {e}"),
                None => "the agent disconnected".to_string(),
            };
            crate::initial::session_ended(&ctx2, &vm, &initial, why).await;
            ctx2.hub.detach(&vm, session);
            info!(vm = %vm, session, "agent session ended");
            drop(guard);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

/// The disks a `Hello` names, and what the agent's saved state says of each.
#[allow(clippy::type_complexity)]
/// Which file (or device) the agent reads each disk from, and its path (`DiskInfo.source`).
type Sources = Vec<(DiskName, String, String)>;

#[allow(clippy::type_complexity)]
fn disks_of(
    hello: &tern_proto::Hello,
) -> Result<(Vec<(DiskName, u64)>, HashMap<DiskName, (String, u64)>, Sources), Status> {
    let mut disks = Vec::new();
    let mut agent_states: HashMap<DiskName, (String, u64)> = HashMap::new();
    let mut sources = Vec::new();
    for d in &hello.disks {
        let name = DiskName::new(&d.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if d.size == 0 {
            return Err(Status::invalid_argument(format!(
                "disk {name} has size 0; is the path right? (its agent asks again every few seconds: a \
                 file emptied for a moment, or a device detached, is taken again once it is back)"
            )));
        }
        agent_states.insert(name.clone(), (d.state_generation.clone(), d.state_seq));
        if !d.source.is_empty() {
            sources.push((name.clone(), d.source.clone(), d.path.clone()));
        }
        disks.push((name, d.size));
    }
    if disks.is_empty() {
        return Err(Status::invalid_argument("Hello names no disks; pass --disk NAME=PATH"));
    }
    Ok((disks, agent_states, sources))
}

/// The disks whose agent gets the receiver's block hashes (a delta sync): those without a
/// valid hash map of the receiver's copy. Reprotected, the receiver is the master target's
/// disk: its hashes, or none with --sync during to the original location (everything is
/// sent at failback). A new alternate disk gets the master target's hashes too, not
/// zeroes: a session cut before the agent saved its state may have had records relayed
/// there, and a block one wrote that the VM zeroed since would not be sent again.
fn hash_sources(a: &Admitted) -> Vec<(Arc<DiskHandle>, HashSource)> {
    a.handles
        .iter()
        .zip(&a.doubtful)
        .filter_map(|(h, doubtful)| {
            let durable = h.durable().0;
            if doubtful.is_some() {
                return None;
            }
            match &a.reprotect {
                Some(r) if r.sync == tern_core::SyncMode::During && !r.alternate => None,
                Some(r) => Some((h.clone(), HashSource::MasterTarget(r.master_target.clone()))),
                None if durable > 0 => Some((h.clone(), HashSource::Local)),
                None => None,
            }
        })
        .collect()
}

fn welcome_of(a: &Admitted, hashes_follow: &[(Arc<DiskHandle>, HashSource)]) -> Welcome {
    let mut agent_policy = crate::admin::agent_policy(&a.policy);
    agent_policy.hold = a.reprotect.as_ref().is_some_and(|r| r.sync == tern_core::SyncMode::During);
    Welcome {
        hashes_follow: hashes_follow.iter().map(|(h, _)| h.name.to_string()).collect(),
        disks: a
            .handles
            .iter()
            .zip(&a.doubtful)
            .map(|(h, doubtful)| DiskState {
                name: h.name.to_string(),
                durable_seq: h.durable().0,
                generation: h.generation(),
                state_invalid: doubtful.is_none(),
                doubtful: doubtful
                    .as_ref()
                    .map(|d| &d.ranges[..])
                    .unwrap_or_default()
                    .iter()
                    .map(|&(a, b)| tern_proto::ByteRange { offset: a, length: b - a })
                    .collect(),
                doubtful_pages: doubtful.as_ref().map(|d| d.pages.clone()).unwrap_or_default(),
            })
            .collect(),
        interval_ms: 0,
        policy: Some(agent_policy),
    }
}

/// Sends each disk's block hashes in turn; a failure ends the session with its reason.
async fn send_all_hashes(
    (ctx, vm, out, cancel, copies): (Arc<Ctx>, VmName, crate::hub::Outbound, CancellationToken, Copies),
    hashes_follow: Vec<(Arc<DiskHandle>, HashSource)>,
) {
    for (h, source) in hashes_follow {
        let sent = tokio::select! {
            _ = cancel.cancelled() => return,
            r = send_hashes(&ctx, &h, source, &out, &copies) => r,
        };
        if let Err(e) = sent {
            warn!(vm = %vm, disk = %h.name, error = %e.message(), "cannot send block hashes; the session ends");
            count_error(&vm, &e);
            ctx.hub.fail_session(&vm, e.message());
            let _ = out.send(Err(e)).await;
            cancel.cancel();
            return;
        }
    }
}

/// What a session starts from once its agent is admitted.
struct Admitted {
    handles: Vec<Arc<DiskHandle>>,
    /// Per disk, what the agent's state cannot vouch for (see [`doubtful_ranges`]).
    doubtful: Vec<Option<Doubtful>>,
    policy: tern_store::Policy,
    reprotect: Option<tern_store::ReprotectRow>,
}

/// [`admit`] on the blocking pool; a refusal that stops the VM's replication, or the
/// server's own failure, shows in the VM's status.
async fn admit_session(
    ctx: &Arc<Ctx>,
    vm: &VmName,
    serial: Option<String>,
    disks: Vec<(DiskName, u64)>,
    agent_states: HashMap<DiskName, (String, u64)>,
    sources: Sources,
) -> Result<Admitted, Status> {
    let (store, vm2) = (ctx.store.clone(), vm.clone());
    let registered = crate::admin::blocking(move || {
        admit(&store, &vm2, serial.as_deref(), &disks, &agent_states, &sources)
    })
    .await?
    .map_err(store_status)
    .inspect_err(|e| {
        warn!(vm = %vm, error = %e.message(), "replication session refused");
        // The server's own storage failing is what its sessions end on; a refusal of
        // this agent (a resized disk) goes once a session is admitted.
        if e.code() == tonic::Code::ResourceExhausted {
            ctx.hub.fail_session(vm, e.message());
        } else {
            ctx.hub.set_error(vm, e.message());
        }
    })?;
    registered.map_err(|refused| {
        // A refusal that stops the VM's replication until someone acts shows in its
        // status (and turns it critical); one of a stale agent (the VM replicates from
        // elsewhere now) does not.
        if refused.stops_replication {
            ctx.hub.set_error(vm, refused.status.message());
        }
        refused.status
    })
}

/// Why an agent was not admitted.
#[derive(Debug)]
struct Refused {
    status: Status,
    /// The VM replicates from nowhere until someone acts (damaged data, a disk left out, an
    /// agent on the old disk after a failback elsewhere); not so for an agent that stands
    /// down because the VM replicates from elsewhere now.
    stops_replication: bool,
}

impl Refused {
    fn stops(status: Status) -> Refused {
        Refused { status, stops_replication: true }
    }

    fn stands_down(status: Status) -> Refused {
        Refused { status, stops_replication: false }
    }
}

/// The refusal of an agent whose VM no longer replicates from its source (`state`).
fn stood_down(vm: &VmName, state: tern_core::VmState) -> Refused {
    let next = if state == tern_core::VmState::FailbackCommitted {
        format!(
            "; if this agent is on the primary site, which runs the VM again, `drctl reverse-replicate {vm}` \
             makes it the source again, then start this agent"
        )
    } else {
        String::new()
    };
    Refused::stands_down(Status::failed_precondition(format!(
        "VM {vm} is {state}: it no longer replicates from this source, so the agent stands down{next}"
    )))
}

/// Admits an agent's Hello: refuses a VM whose data is damaged, that no longer replicates
/// from its source, whose agent is another while it is reprotected (`identity` is the
/// caller's certificate serial), or whose disks the Hello leaves out (`Ok(Err)`); registers
/// its disks, makes what earlier sessions wrote durable, and finds what the agent's state
/// cannot vouch for.
fn admit(
    store: &tern_store::Store,
    vm: &VmName,
    identity: Option<&str>,
    disks: &[(DiskName, u64)],
    agent_states: &HashMap<DiskName, (String, u64)>,
    sources: &Sources,
) -> Result<Result<Admitted, Refused>, tern_store::StoreError> {
    if let Some(reason) = store.damaged(vm) {
        return Ok(Err(Refused::stops(Status::unavailable(format!(
            "VM {vm}'s stored data on the process server is damaged ({reason}); it takes no records \
             until it is repaired and the server restarted (other VMs are not affected)"
        )))));
    }
    let known = store.has_vm(vm)?;
    if known {
        let state = store.vm_state(vm)?;
        if !state.takes_replication() {
            warn!(vm = %vm, state = %state, "agent refused: the VM no longer replicates from this source");
            return Ok(Err(stood_down(vm, state)));
        }
        // Reprotected, the VM runs at the recovery site: only the agent `drctl reprotect`
        // made an identity for may replicate it. The primary site's old agent, back after
        // an unplanned failover, would otherwise send the old disk, and the failback would
        // write it over the primary's disks.
        if state == tern_core::VmState::Reprotected
            && let Some(row) = store.reprotect(vm)?
            && !row.identity.is_empty()
            && identity != Some(row.identity.as_str())
        {
            warn!(vm = %vm, serial = ?identity, "agent refused: the VM is reprotected and this is not the recovered VM's agent");
            return Ok(Err(Refused::stands_down(Status::failed_precondition(format!(
                "VM {vm} is reprotected: it runs at the recovery site, and only the recovered VM's agent \
                 (the identity `drctl reprotect` wrote) replicates it until the failback is committed. \
                 This agent, with another identity, stands down; after `drctl failback`, `drctl commit` \
                 and `drctl reverse-replicate` it protects the VM from the primary site again"
            )))));
        }
    }
    // Failed back to another location, the primary runs on the disks the failback wrote:
    // an agent still reading the files it read before the failover (left running, or
    // started again unchanged) would replace the protected copy with the old disks.
    let protected = !known || store.vm_state(vm)? == tern_core::VmState::Protected;
    if known
        && protected
        && let Some(refused) = fenced_refusal(store, vm, sources)?
    {
        return Ok(Err(refused));
    }
    // A disk may be added (earlier points cover the disks they were made with), not
    // left out: points without it would fail over a VM that lacks a disk.
    let missing: Vec<String> = store
        .vm_disks(vm)
        .iter()
        .filter(|h| !disks.iter().any(|(n, _)| *n == h.name))
        .map(|h| h.name.to_string())
        .collect();
    if !missing.is_empty() {
        warn!(vm = %vm, missing = ?missing, "agent refused: it leaves out disks of the VM");
        return Ok(Err(Refused::stops(Status::failed_precondition(format!(
            "VM {vm} is protected with disk(s) {} that this agent does not give; pass every disk \
             (--disk NAME=PATH for each), since recovery points must cover the whole VM",
            missing.join(", ")
        )))));
    }
    if known && let Some(refused) = swapped_refusal(store, vm, sources)? {
        return Ok(Err(refused));
    }
    let hs = store.register(vm, disks)?;
    if protected {
        for (name, source, path) in sources {
            // Only a guard for later: a full catalog must not refuse the session.
            if let Err(e) = store.note_source(vm, name, source, path) {
                warn!(vm = %vm, disk = %name, error = %e, "cannot note which file the agent reads");
            }
        }
    }
    // Written-but-unacked records of an earlier session become durable here, so the
    // position the agent resumes from is exactly what is on disk.
    for h in &hs {
        h.sync()?;
    }
    let doubtful: Vec<_> = hs.iter().map(|h| doubtful_ranges(store, h, agent_states.get(&h.name))).collect();
    let policy = store.policy(vm)?;
    let reprotect = store.reprotect(vm)?;
    let reprotect =
        reprotect.filter(|_| store.vm_state(vm).is_ok_and(|s| s == tern_core::VmState::Reprotected));
    Ok(Ok(Admitted { handles: hs, doubtful, policy, reprotect }))
}

/// Refuses an agent of a VM failed back to another location that still reads a disk it
/// read before the failover (see `admit`).
fn fenced_refusal(
    store: &tern_store::Store,
    vm: &VmName,
    sources: &Sources,
) -> Result<Option<Refused>, tern_store::StoreError> {
    for (name, source, path) in sources {
        if store.fenced_source(vm, name, source)?.is_some() {
            warn!(vm = %vm, disk = %name, path = %path, "agent refused: it reads the disk the VM had before its failback to another location");
            return Ok(Some(Refused::stops(Status::failed_precondition(format!(
                "VM {vm} failed back to another location, but this agent reads disk {name} at {path}: the same \
                 file (or device) it read before the failover, which the failback did not write, so it holds \
                 the old disk. Stop this agent, and start it on the disks the failback wrote (replicating this \
                 one would replace the protected copy with the old disk)"
            )))));
        }
    }
    Ok(None)
}

/// Refuses disks given under each other's names (`--disk sda=B --disk sdb=A`): said as
/// such, not as a resize whose remedy deletes every point (W18-B). Files only: a device's
/// number may go to another device at the next boot.
fn swapped_refusal(
    store: &tern_store::Store,
    vm: &VmName,
    sources: &Sources,
) -> Result<Option<Refused>, tern_store::StoreError> {
    let recorded = store.disk_sources(vm)?;
    for (name, source, path) in sources {
        let swapped = recorded
            .iter()
            .find(|(disk, s, _)| source.starts_with("f:") && disk != name.as_str() && s == source);
        if let Some((other, _, was)) = swapped {
            warn!(vm = %vm, disk = %name, other = %other, "agent refused: disk names swapped");
            return Ok(Some(Refused::stops(Status::failed_precondition(format!(
                "this agent gives {path} as disk {name}, but it is the file disk {other} was read from \
                 ({was}): the --disk names look swapped. Give each disk the name it had (--disk \
                 {other}={path})"
            )))));
        }
    }
    Ok(None)
}

/// Doubtful ranges past this many make the agent's state worthless: it compares every block.
const MAX_DOUBTFUL_RANGES: usize = 1 << 16;
/// Records past the agent's state holding more data than this are not read for their page
/// values (the Welcome carries 40 bytes per page: 2.5 MiB at this bound); their blocks are
/// forgotten and sent whole.
const MAX_DOUBTFUL_PAGE_BYTES: u64 = 256 << 20;

/// What the agent's saved state cannot vouch for: the byte ranges records past it wrote,
/// and the server's values of the pages they wrote (`DiskState.doubtful_pages`; empty when
/// they could not be had).
struct Doubtful {
    ranges: Vec<(u64, u64)>,
    pages: Vec<u8>,
}

/// Whether the agent's saved state (generation, seq) can go on describing the server's copy
/// of `h`, and if so the byte ranges it cannot vouch for: those that records past its seq
/// wrote (a pass cut short by a crash or a dropped link, or a point whose ack was lost).
/// The agent compares those blocks again with the values of the pages the records left
/// (so a page the VM wrote back to its old value after the cut is resent, and one the
/// server holds is not), or, without those values, forgets them and sends them whole.
/// `None`: the state is of no use (another copy, ahead of the server, or records past it
/// already folded into the base image).
fn doubtful_ranges(
    store: &tern_store::Store,
    h: &DiskHandle,
    agent: Option<&(String, u64)>,
) -> Option<Doubtful> {
    let durable = h.durable();
    let (generation, seq) = agent?;
    if *generation != h.generation() {
        return None;
    }
    if Seq(*seq) > durable {
        // Records this copy acknowledged are gone: its data directory went back in time (a
        // restore from a backup) or its storage lost writes (W19-D: said nowhere). A new
        // epoch, so that the state the agent saves against this copy is never taken for
        // the other's.
        warn!(vm = %h.vm, disk = %h.name, agent_seq = seq, journal_end = %durable,
            "the agent's saved state is ahead of this server's journal: records acknowledged before are gone \
             (the data directory restored from a backup, or its storage lost writes), and points made past \
             the journal's end are not listed; the agent compares the whole disk");
        if let Err(e) = store.new_epoch(h) {
            warn!(vm = %h.vm, disk = %h.name, error = %e, "cannot start a new epoch for the disk");
        }
        return None;
    }
    if Seq(*seq) == durable {
        return Some(Doubtful { ranges: Vec::new(), pages: Vec::new() });
    }
    let ranges = store.written_after(h, Seq(*seq), durable).filter(|r| r.len() <= MAX_DOUBTFUL_RANGES)?;
    let values = store.page_values_after(h, Seq(*seq), durable, MAX_DOUBTFUL_PAGE_BYTES).unwrap_or_default();
    info!(vm = %h.vm, disk = %h.name, agent_seq = seq, durable = %durable, ranges = ranges.len(), pages = values.len(),
        "records past the agent's saved state: it compares those ranges again");
    let mut pages = Vec::with_capacity(values.len() * 40);
    for (p, v) in values {
        pages.extend_from_slice(&p.to_be_bytes());
        pages.extend_from_slice(&v.0);
    }
    Some(Doubtful { ranges, pages })
}

/// Splits a request into its metadata (for authorisation) and the inbound stream.
fn split(req: Request<Streaming<AgentMessage>>) -> (Request<()>, Streaming<AgentMessage>) {
    let (meta, ext, inbound) = req.into_parts();
    (Request::from_parts(meta, ext, ()), inbound)
}

#[allow(clippy::too_many_arguments)]
async fn run_session(
    ctx: &Arc<Ctx>,
    vm: &VmName,
    handles: Handles,
    mut inbound: Streaming<AgentMessage>,
    out: crate::hub::Outbound,
    cancel: CancellationToken,
    initial: InitialSync,
    copies: Copies,
) {
    let (pipe_tx, pipe_rx) = mpsc::channel::<Item>(PIPELINE_DEPTH);
    let writer = tokio::spawn(write_loop(
        ctx.clone(),
        vm.clone(),
        pipe_rx,
        out.clone(),
        cancel.clone(),
        initial.clone(),
    ));
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => break,
            m = inbound.message() => m,
        };
        let item = match next {
            Ok(Some(AgentMessage { msg: Some(agent_message::Msg::Batch(b)) })) => {
                ctx.hub.add_bytes(vm, prost::Message::encoded_len(&b) as u64);
                if let Some(end) = b.records.iter().map(|r| r.offset + u64::from(r.length)).max() {
                    ctx.hub.note_scan(vm, &b.disk, end);
                }
                crate::initial::note_progress(&initial, handles.values().map(|h| h.size), &b);
                match prepare_batch(&handles, b) {
                    Ok(item) => item,
                    Err(status) => {
                        count_error(vm, &status);
                        warn!(vm = %vm, error = %status.message(), "batch refused");
                        ctx.hub.fail_session(vm, status.message());
                        let _ = out.send(Err(status)).await;
                        break;
                    }
                }
            }
            Ok(Some(AgentMessage { msg: Some(agent_message::Msg::Point(p)) })) => {
                // A point ends the first pass: no page-hash request can follow, so the
                // copies its hashes described can go (a request still running keeps its own).
                lock(&copies).clear();
                Item::Point(p)
            }
            Ok(Some(AgentMessage { msg: Some(agent_message::Msg::PointFailed(f)) })) => {
                // A barrier hears at once: the other members must not be held for nothing.
                ctx.barriers.failed(f.request_id, vm, &f.reason);
                Item::PointFailed(f)
            }
            Ok(Some(AgentMessage { msg: Some(agent_message::Msg::Reached(r)) })) => {
                ctx.barriers.reached(r.request_id, vm);
                continue;
            }
            Ok(Some(AgentMessage { msg: Some(agent_message::Msg::Tracking(t)) })) => {
                crate::initial::note_pass(&initial, handles.values().map(|h| h.size), &t);
                ctx.hub.note_tracking(vm, t);
                continue;
            }
            Ok(Some(AgentMessage { msg: Some(agent_message::Msg::PageHashes(r)) })) => {
                let (c, v, o) = (ctx.clone(), vm.clone(), out.clone());
                let copy = DiskName::new(&r.disk).ok().and_then(|d| lock(&copies).get(&d).cloned());
                ctx.tracker.spawn(async move {
                    if let Err(e) = send_page_hashes(&c, &v, r, &o, copy).await {
                        warn!(vm = %v, error = %e.message(), "cannot answer a page-hash request; the session ends");
                        let _ = o.send(Err(e)).await;
                    }
                });
                continue;
            }
            Ok(Some(_)) => {
                let _ = out.send(Err(Status::invalid_argument("unexpected message after Hello"))).await;
                break;
            }
            Ok(None) => break,
            Err(status) => {
                info!(vm = %vm, error = %status.message(), "agent stream closed");
                break;
            }
        };
        if pipe_tx.send(item).await.is_err() {
            break;
        }
    }
    drop(pipe_tx);
    let _ = writer.await;
}

/// The copies of a session's disks that this server's hashes described, kept for the
/// agent's page-hash requests until its first point.
type Copies = Arc<std::sync::Mutex<HashMap<DiskName, HashedDisk>>>;

/// A disk and the copy of it that its hashes described.
type HashedDisk = (Arc<DiskHandle>, Arc<tern_store::HashedCopy>);

/// Whose copy of a disk the agent compares with.
#[derive(Debug, Clone)]
enum HashSource {
    /// This server's copy, at its durable position.
    Local,
    /// The master target's target disk (reprotect).
    MasterTarget(String),
}

/// Streams the block hashes of the receiver's copy of `h` to the agent.
async fn send_hashes(
    ctx: &Arc<Ctx>,
    h: &Arc<DiskHandle>,
    source: HashSource,
    out: &crate::hub::Outbound,
    copies: &Copies,
) -> Result<(), Status> {
    let started = std::time::Instant::now();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    match source {
        HashSource::MasterTarget(url) => {
            // The agent's records follow this server's durable position, so the hashes must
            // describe the target disk with everything up to there: when the master target
            // is behind (the spool holds records it has not had yet), the relay goes first.
            let want = h.durable();
            let mut mt = crate::relay::master_target_alone(ctx, &url).await?;
            let (mut stream, mut pending) = loop {
                let request = tern_proto::HashesRequest {
                    vm: h.vm.to_string(),
                    disk: h.name.to_string(),
                    coarse: true,
                };
                let mut stream = mt.hashes(request).await?.into_inner();
                let first = stream.message().await?;
                if let Some(c) = &first
                    && c.upto_seq < want.0
                {
                    info!(vm = %h.vm, disk = %h.name, master_target_seq = c.upto_seq, seq = %want,
                        "the master target is behind the spool; hashing once the relay has caught up");
                    drop(stream);
                    wait_relayed(ctx, h, want).await?;
                    continue;
                }
                break (stream, first);
            };
            while let Some(chunk) = match pending.take() {
                Some(c) => Some(c),
                None => stream.message().await?,
            } {
                sent.fetch_add(chunk.table.len() as u64, std::sync::atomic::Ordering::Relaxed);
                out.send(msg(server_message::Msg::BlockHashes(chunk)))
                    .await
                    .map_err(|_| Status::cancelled("agent went away"))?;
            }
        }
        HashSource::Local => {
            let (h2, out2, scratch, copies) =
                (h.clone(), out.clone(), ctx.data_dir.join("tmp"), copies.clone());
            let sent2 = sent.clone();
            tokio::task::spawn_blocking(move || {
                let mut emit = |first: u64, chunk: &[tern_core::blocks::BlockHashes]| {
                    let hashes = tern_proto::hash_table::message(h2.name.as_str(), h2.size, first, chunk);
                    sent2.fetch_add(hashes.table.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    out2.blocking_send(msg(server_message::Msg::BlockHashes(hashes))).is_ok()
                };
                // Coarse entries (the block hash alone): the agent asks for the pages of just
                // the blocks that differ, answered from this same copy.
                let upto = h2.durable();
                // The agent gone (its connection died): the copy stops between records.
                let gone = out2.clone();
                let copy =
                    Arc::new(tern_store::HashedCopy::new_until(&h2, &scratch, upto, &|| gone.is_closed())?);
                lock(&copies).insert(h2.name.clone(), (h2.clone(), copy.clone()));
                copy.hash(&h2, true, &mut emit)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| {
                if !e.is_storage_full() {
                    return store_status(e);
                }
                // Said with what it takes (W16: "no space left" alone, while freeing a few
                // MB did not help).
                Status::resource_exhausted(format!(
                    "the process server's storage is full ({e}): the agent of VM {} compares disk {} with this \
                     server's copy, which takes a scratch copy of every block written since the base image \
                     (up to {} bytes, the disk's size) in its data directory's tmp/. Free that much space, or \
                     shorten the VM's retention (`drctl policy set {} --retention ...`) so that retention \
                     folds the journal; nothing acknowledged is lost, and replication resumes once there is room",
                    h.vm, h.name, h.size, h.vm
                ))
            })?;
        }
    }
    info!(vm = %h.vm, disk = %h.name, ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        bytes = sent.load(std::sync::atomic::Ordering::Relaxed), "block hashes sent for a delta sync");
    Ok(())
}

/// Answers an agent's request for the page hashes of blocks that differ from a coarse
/// table: from this server's copy when its hashes came from there, else from the master
/// target's target disk.
async fn send_page_hashes(
    ctx: &Arc<Ctx>,
    vm: &VmName,
    r: tern_proto::PageHashesRequest,
    out: &crate::hub::Outbound,
    copy: Option<HashedDisk>,
) -> Result<(), Status> {
    if r.blocks.len() > tern_proto::MAX_PAGE_HASH_BLOCKS {
        return Err(Status::invalid_argument(format!(
            "at most {} blocks per page-hash request",
            tern_proto::MAX_PAGE_HASH_BLOCKS
        )));
    }
    let blocks = r.blocks.len();
    let reply = match copy {
        Some((h, copy)) => {
            let asked = r.blocks;
            tokio::task::spawn_blocking(move || {
                copy.page_hashes(&h, &asked)
                    .map(|e| tern_proto::hash_table::sparse_message(h.name.as_str(), h.size, &asked, &e))
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::invalid_argument(e.to_string()))?
        }
        None => {
            let (c, v) = (ctx.clone(), vm.clone());
            let row = crate::admin::blocking(move || c.store.reprotect(&v))
                .await?
                .map_err(store_status)?
                .ok_or_else(|| {
                    Status::invalid_argument("page hashes are only sent for a reprotect's delta sync")
                })?;
            let mut mt = crate::relay::master_target(ctx, &row.master_target).await?;
            mt.page_hashes(tern_proto::TargetPageHashesRequest {
                vm: vm.to_string(),
                disk: r.disk.clone(),
                blocks: r.blocks,
            })
            .await
            .inspect_err(|e| ctx.relay.forget(&row.master_target, e))?
            .into_inner()
        }
    };
    info!(vm = %vm, disk = %r.disk, blocks, bytes = reply.table.len(), "page hashes sent for a delta sync");
    out.send(msg(server_message::Msg::BlockHashes(reply)))
        .await
        .map_err(|_| Status::cancelled("agent went away"))
}

/// Waits until the master target has acked everything of `h` up to `seq`.
async fn wait_relayed(ctx: &Arc<Ctx>, h: &DiskHandle, seq: Seq) -> Result<(), Status> {
    while ctx.relay.acked(&h.vm, &h.name) < seq {
        if !ctx.relay.next_ack(&ctx.shutdown, std::time::Duration::from_millis(200)).await {
            return Err(Status::unavailable("the process server is stopping"));
        }
    }
    Ok(())
}

fn prepare_batch(handles: &Handles, b: Batch) -> Result<Item, Status> {
    let name = DiskName::new(&b.disk).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let disk = handles
        .get(&name)
        .cloned()
        .ok_or_else(|| Status::invalid_argument(format!("disk {name} was not named in Hello")))?;
    Ok(Item::Batch(tern_daemon::ingest::verify(disk, b, false)?))
}

/// Writes a session's items in order: batches into the journal, points once everything
/// before them is durable. The shared group commit (`tern_daemon::commit`) fsyncs and acks.
struct SessionWriter {
    ctx: Arc<Ctx>,
    vm: VmName,
    out: crate::hub::Outbound,
    initial: InitialSync,
    late: Arc<LateAcks>,
    /// Per disk, the write time of the last record written (this server's clock).
    last_time: HashMap<String, i64>,
}

/// Acks that found the agent's queue full: the newest per disk (acks are cumulative), sent
/// by at most one task once there is room. Never dropped: an agent in nbd mode keeps what
/// it sent until acked, and waits for acks past a bound.
#[derive(Default)]
struct LateAcks {
    newest: std::sync::Mutex<HashMap<String, u64>>,
    sending: std::sync::atomic::AtomicBool,
}

impl LateAcks {
    fn newest(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.newest.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(self: &Arc<Self>, ack: Ack, out: &crate::hub::Outbound) {
        {
            let mut newest = self.newest();
            let seq = newest.entry(ack.disk).or_default();
            *seq = (*seq).max(ack.durable_seq);
        }
        if !self.sending.swap(true, std::sync::atomic::Ordering::AcqRel) {
            tokio::spawn(self.clone().send(out.clone()));
        }
    }

    async fn send(self: Arc<Self>, out: crate::hub::Outbound) {
        use std::sync::atomic::Ordering;
        loop {
            let acks: Vec<(String, u64)> = self.newest().drain().collect();
            if acks.is_empty() {
                self.sending.store(false, Ordering::Release);
                // One pushed between the drain and the store found a sender running: look
                // again, unless a new sender took it.
                if self.newest().is_empty() || self.sending.swap(true, Ordering::AcqRel) {
                    return;
                }
                continue;
            }
            for (disk, durable_seq) in acks {
                let ack = Ack { disk, durable_seq };
                // The session is over: nobody is left to ack.
                if out.send(msg(server_message::Msg::Ack(ack))).await.is_err() {
                    return;
                }
            }
        }
    }
}

impl Sink for SessionWriter {
    type Item = Item;

    async fn take(&mut self, item: Item, gc: &mut GroupCommit) -> Result<(), Status> {
        match item {
            Item::Batch(pending) => {
                let v = pending.await.map_err(|e| Status::internal(e.to_string()))??;
                let d = v.disk.clone();
                // On this server's clock, as the points are (a time asked for a failover is
                // one of this server's, W18-C): moved by the agent's clock difference, and
                // never before the disk's last record's after a change of it.
                let skew = self.ctx.hub.clock_skew(&self.vm);
                let floor = self.last_time.entry(d.name.to_string()).or_insert(i64::MIN);
                let times: Vec<i64> = v
                    .times
                    .iter()
                    .map(|t| {
                        *floor = (*floor).max(skew.to_server(*t));
                        *floor
                    })
                    .collect();
                let records = v.records;
                crate::admin::blocking(move || d.append_timed(v.first, &records, &times))
                    .await?
                    .map_err(store_status)?;
                gc.written(Written::Journal(v.disk));
                Ok(())
            }
            Item::Point(p) => {
                let done = gc.flush().await?;
                self.durable(done);
                make_point(&self.ctx, &self.vm, p, &self.out, &self.initial).await
            }
            Item::PointFailed(f) => {
                warn!(vm = %self.vm, request = f.request_id, reason = %f.reason, "agent could not make a point");
                if f.request_id == 0 {
                    self.ctx.hub.fail_point(&self.vm, &f.reason);
                }
                self.ctx.hub.resolve(f.request_id, Err(f.reason));
                Ok(())
            }
        }
    }

    /// Acks what a commit made durable, and wakes the relays of reprotected VMs.
    fn durable(&mut self, done: Vec<Durable>) {
        for (disk, durable) in done {
            self.ctx.relay.records_durable();
            self.ctx.hub.clear_error(&disk.vm);
            let ack = Ack { disk: disk.name.to_string(), durable_seq: durable.0 };
            // The writer never waits on the agent: when the agent is slow to read, the ack
            // goes out later, and is never dropped.
            if let Err(tokio::sync::mpsc::error::TrySendError::Full(Ok(ServerMessage {
                msg: Some(server_message::Msg::Ack(ack)),
            }))) = self.out.try_send(msg(server_message::Msg::Ack(ack)))
            {
                self.late.push(ack, &self.out);
            }
        }
    }
}

/// Counts a refusal that ends a session, by its code (the metrics' errors by kind).
fn count_error(vm: &VmName, status: &Status) {
    let code = tern_proto::metrics::code_label(status.code());
    metrics::counter!("tern_replication_errors_total", "vm" => vm.to_string(), "code" => code).increment(1);
}

async fn write_loop(
    ctx: Arc<Ctx>,
    vm: VmName,
    rx: mpsc::Receiver<Item>,
    out: crate::hub::Outbound,
    cancel: CancellationToken,
    initial: InitialSync,
) {
    let gc = GroupCommit::new(ctx.store.clone(), Site::ProcessServer);
    let writer = SessionWriter {
        ctx: ctx.clone(),
        vm: vm.clone(),
        out: out.clone(),
        initial,
        late: Arc::default(),
        last_time: HashMap::new(),
    };
    if let Err(status) = commit::write_loop(rx, writer, gc).await {
        count_error(&vm, &status);
        warn!(vm = %vm, error = %status.message(), "replication session ends");
        ctx.hub.fail_session(&vm, status.message());
        let _ = out.send(Err(status)).await;
        cancel.cancel();
    }
}

/// Acks a point to its agent and to whoever waits for it.
async fn point_made(
    ctx: &Arc<Ctx>,
    vm: &VmName,
    p: &tern_proto::MakePoint,
    point: tern_store::Point,
    out: &crate::hub::Outbound,
    initial: &InitialSync,
) -> Result<(), Status> {
    info!(vm = %vm, point = %point.id, consistency = point.consistency.as_str(),
        group = point.group.as_ref().map_or("", |g| g.as_str()), "recovery point made");
    ctx.hub.point_made(vm);
    let ack = PointAck { request_id: p.request_ids.first().copied().unwrap_or(0), point_id: point.id.0 };
    let _ = out.send(msg(server_message::Msg::PointAck(ack))).await;
    for id in &p.request_ids {
        ctx.hub.resolve(*id, Ok(point.clone()));
    }
    crate::initial::point_made(initial, crate::jobs::point_output(vm, &point, Vec::new())).await;
    Ok(())
}

/// A point's time on this server's clock: the agent's time of its cut, moved by how far the
/// agent's clock was off at its Hello, and never later than now (a clock set right during
/// the session) nor earlier than the VM's newest point (points stay in order). A point
/// dated in the future would stay inside the retention window for good, and the journal
/// behind it with it.
fn point_time(ctx: &Ctx, vm: &VmName, agent_ms: i64, sent_ms: i64) -> i64 {
    let now = tern_store::now_ms();
    let newest = ctx.store.resolve_point(vm, &tern_store::PointSpec::Latest).map_or(i64::MIN, |p| p.time_ms);
    let mut skew = ctx.hub.clock_skew(vm);
    if let Some(rebased) = skew.rebased(sent_ms, now) {
        warn!(vm = %vm, was_ms = skew.ms(), now_ms = rebased.ms(),
            "the agent's clock moved during the session: its points are dated by the new difference");
        skew = rebased;
        ctx.hub.set_clock_skew(vm, skew);
    }
    let t = skew.to_server(agent_ms);
    let clamped = t.min(now).max(newest.min(now));
    if clamped.saturating_sub(t).saturating_abs() > crate::clock::WARN_MS {
        warn!(vm = %vm, agent_ms, dated_ms = clamped,
            "a point's time from the agent is off this server's clock; dated by this server's instead");
    }
    clamped
}

async fn make_point(
    ctx: &Arc<Ctx>,
    vm: &VmName,
    p: tern_proto::MakePoint,
    out: &crate::hub::Outbound,
    initial: &InitialSync,
) -> Result<(), Status> {
    let mut disks = Vec::new();
    for d in &p.disks {
        disks.push(PointDisk {
            disk: DiskName::new(&d.disk).map_err(|e| Status::invalid_argument(e.to_string()))?,
            seq: Seq(d.seq),
            fingerprint: Digest::from_slice(&d.fingerprint)
                .ok_or_else(|| Status::invalid_argument("point fingerprint is not 32 bytes"))?,
        });
    }
    let consistency = if p.consistency == tern_proto::Consistency::App as i32 {
        Consistency::App
    } else {
        Consistency::Crash
    };
    let time_ms = point_time(ctx, vm, p.time_ms, p.sent_ms);
    let mut cut = NewPoint { vm: vm.clone(), time_ms, consistency, note: p.note.clone(), disks };
    // A member's cut of a multi-VM point: written with the others' (one id) once they have
    // all come, or, when the group's point fails, as this VM's own point with the reason in
    // its note. The writer goes on meanwhile (the agent makes no other point until this one
    // is acked), so a slow member never stalls the others' replication.
    if let Ok(rx) = ctx.barriers.arrive(&p.request_ids, cut.clone()) {
        let (ctx, vm, out, initial) = (ctx.clone(), vm.clone(), out.clone(), initial.clone());
        ctx.clone().tracker.spawn(async move {
            let reason = match rx.await {
                Ok(Ok(point)) => {
                    let _ = point_made(&ctx, &vm, &p, point, &out, &initial).await;
                    return;
                }
                Ok(Err(reason)) => reason,
                Err(_) => "the process server stopped the barrier".to_string(),
            };
            cut.note = format!("{}; no multi-VM point: {reason}", p.note);
            if let Err(status) = own_point(&ctx, &vm, p, cut, &out, &initial).await {
                warn!(vm = %vm, error = %status.message(), "a member's cut could not be written as its own point");
                let _ = out.send(Err(status)).await;
            }
        });
        return Ok(());
    }
    own_point(ctx, vm, p, cut, out, initial).await
}

/// Writes a cut as a point of its VM alone and acks it.
async fn own_point(
    ctx: &Arc<Ctx>,
    vm: &VmName,
    p: tern_proto::MakePoint,
    cut: NewPoint,
    out: &crate::hub::Outbound,
    initial: &InitialSync,
) -> Result<(), Status> {
    let store = ctx.store.clone();
    let made = crate::admin::blocking(move || {
        let NewPoint { vm, time_ms, consistency, note, disks } = cut;
        store.make_point(&vm, time_ms, consistency, &note, disks)
    })
    .await?;
    match made {
        Ok(point) => point_made(ctx, vm, &p, point, out, initial).await,
        Err(e) => {
            warn!(vm = %vm, error = %e, "point refused");
            for id in &p.request_ids {
                ctx.hub.resolve(*id, Err(e.to_string()));
            }
            Err(store_status(e))
        }
    }
}
