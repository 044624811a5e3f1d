//! Store and forward to the master target: a reprotected VM's stream is ingested into its
//! journal like any other (durable before ack), and this relay reads the journal in order
//! and sends it on, resuming from what the master target has acked. A master-target outage
//! only delays it; nothing is lost, because retention does not run while a VM is reprotected.

use crate::Ctx;
use crate::lock;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tern_core::pki::Bundle;
use tern_core::{DiskName, Seq, VmName, VmState};
use tern_proto as pb;
use tern_store::DiskHandle;
use tern_store::ReadPosition;
use tern_store::RecordKind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::transport::Channel;
use tracing::{info, warn};

/// States in which the stream flows to the master target.
pub const RELAY_STATES: [VmState; 1] = [VmState::Reprotected];

#[derive(Debug, Default)]
pub struct Relay {
    acked: Mutex<HashMap<(VmName, DiskName), Seq>>,
    running: Mutex<HashSet<VmName>>,
    /// Woken when records become durable, so that relays send them at once.
    wake: tokio::sync::Notify,
    /// Woken when a master target acks, for whoever waits on a drain.
    pub acked_wake: tokio::sync::Notify,
    /// One connection per master target for the calls of delta syncs and failbacks: a new
    /// one costs the TLS handshake's round trips (over a WAN, tens of ms each time). A
    /// channel reconnects by itself after its master target went away.
    channels: Mutex<HashMap<String, Channel>>,
    /// Why each VM's relay last failed, until the master target acks again.
    errors: Mutex<HashMap<VmName, String>>,
}

impl Relay {
    /// Why the relay of `vm` last failed, if it has not made progress since.
    pub fn last_error(&self, vm: &VmName) -> Option<String> {
        lock(&self.errors).get(vm).cloned()
    }

    /// A new relay session found the master target holding everything: no failure of the
    /// relay stands. Returns the one that stood.
    fn caught_up(&self, vm: &VmName) -> Option<String> {
        lock(&self.errors).remove(vm)
    }

    /// The master target acked a disk up to `a.durable_seq`.
    fn record_ack(&self, vm: &VmName, a: &pb::Ack) {
        lock(&self.errors).remove(vm);
        if let Ok(d) = DiskName::new(&a.disk) {
            let mut acked = lock(&self.acked);
            let e = acked.entry((vm.clone(), d)).or_default();
            *e = (*e).max(Seq(a.durable_seq));
        }
        self.acked_wake.notify_waiters();
    }

    /// New records are durable: idle relays look again.
    pub fn records_durable(&self) {
        self.wake.notify_waiters();
    }

    /// Waits until a master target acks something or `tick` passes; false when the process
    /// server is stopping.
    pub async fn next_ack(&self, shutdown: &tokio_util::sync::CancellationToken, tick: Duration) -> bool {
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = self.acked_wake.notified() => true,
            _ = tokio::time::sleep(tick) => true,
        }
    }

    /// What the master target has made durable of this disk.
    pub fn acked(&self, vm: &VmName, disk: &DiskName) -> Seq {
        lock(&self.acked).get(&(vm.clone(), disk.clone())).copied().unwrap_or_default()
    }
}

/// The process server dials master targets with its own identity.
pub fn client_identity(ctx: &Ctx) -> Result<Bundle, Status> {
    crate::tls::identity(&ctx.data_dir.join("pki")).map_err(Status::internal)
}

/// The master target at `url`, on the connection kept for it (made on first use).
pub async fn master_target(ctx: &Ctx, url: &str) -> Result<MasterTargetClient, Status> {
    let cached = lock(&ctx.relay.channels).get(url).cloned();
    let ch = match cached {
        Some(ch) => ch,
        None => {
            let ch = dial(ctx, url).await?;
            lock(&ctx.relay.channels).insert(url.to_string(), ch.clone());
            ch
        }
    };
    Ok(mt_client(ch))
}

/// A connection of its own to the master target at `url`, for a long stream (a delta
/// sync's block hashes): a slow reader of one VM's stream then holds back no other VM's
/// calls on the shared connection.
pub async fn master_target_alone(ctx: &Ctx, url: &str) -> Result<MasterTargetClient, Status> {
    Ok(mt_client(dial(ctx, url).await?))
}

type MasterTargetClient = pb::master_target_client::MasterTargetClient<Channel>;

async fn dial(ctx: &Ctx, url: &str) -> Result<Channel, Status> {
    let bundle = client_identity(ctx)?;
    // A master target whose identity is revoked is refused at the handshake.
    pb::connect_checked(url, &bundle, ctx.identities.revocations().clone()).await.map_err(|e| match e {
        pb::ConnectError::Unreachable { url, reason } => {
            Status::unavailable(format!("cannot reach the master target at {url}: {reason}"))
        }
        pb::ConnectError::BadUrl { .. } => Status::invalid_argument(e.to_string()),
    })
}

fn mt_client(ch: Channel) -> MasterTargetClient {
    MasterTargetClient::new(ch)
        .max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(pb::MAX_MESSAGE_BYTES)
}

impl Relay {
    /// A call to the master target at `url` failed in transport: its next call connects
    /// anew (with the diagnosis a new connection gives, e.g. a certificate from another CA),
    /// rather than on a connection that may be half dead.
    pub fn forget(&self, url: &str, e: &Status) {
        if transport_failure(e) {
            lock(&self.channels).remove(url);
        }
    }
}

/// The call did not reach the master target, or its connection broke: worth a retry.
pub fn transport_failure(e: &Status) -> bool {
    matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
}

/// Keeps one relay running for every VM in a relay state.
pub async fn relay_worker(ctx: Arc<Ctx>) {
    let mut seen = None;
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        // A relay runs until its VM leaves the relay states: only a change of state can
        // call for a new one.
        let epoch = ctx.store.state_epoch();
        if seen == Some(epoch) {
            continue;
        }
        let c = ctx.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut vms = Vec::new();
            for vm in c.store.vms()? {
                if RELAY_STATES.contains(&c.store.vm_state(&vm)?) {
                    vms.push(vm);
                }
            }
            Ok::<_, tern_store::StoreError>(vms)
        })
        .await;
        // Seen only once read: a failed read is tried again at the next tick.
        let Ok(Ok(vms)) = read else { continue };
        seen = Some(epoch);
        for vm in vms {
            if lock(&ctx.relay.running).insert(vm.clone()) {
                let c = ctx.clone();
                ctx.tracker.spawn(async move {
                    relay_vm(&c, &vm).await;
                    lock(&c.relay.running).remove(&vm);
                    // The VM may have come back to a relay state meanwhile: look again.
                    c.store.bump_state_epoch();
                });
            }
        }
    }
}

async fn relay_vm(ctx: &Arc<Ctx>, vm: &VmName) {
    let mut backoff = tern_core::backoff::Backoff::new(RECONNECT_FIRST, RECONNECT_CAP);
    loop {
        let delay = match relay_session(ctx, vm, &mut backoff).await {
            // A relay cut by the end of the reprotect (a cancel, a commit) is no failure, nor
            // is an earlier failure of it news to a later reprotect.
            Ok(()) | Err(_) if !still_relaying(ctx, vm).await => {
                lock(&ctx.relay.errors).remove(vm);
                return;
            }
            // The process server stopping.
            Ok(()) => return,
            Err(e) => {
                let delay = backoff.next_delay();
                let why = format!("relay to the master target: {}", e.message());
                lock(&ctx.relay.errors).insert(vm.clone(), why.clone());
                // `drctl status` says why the master target falls behind.
                ctx.hub.set_error(vm, &why);
                warn!(vm = %vm, error = %e.message(), retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(0),
                    "relay to the master target interrupted; the journal keeps everything meanwhile");
                delay
            }
        };
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Reconnecting to a master target: soon after it is back (the cap), without hammering it.
const RECONNECT_FIRST: Duration = Duration::from_millis(200);
const RECONNECT_CAP: Duration = Duration::from_secs(2);

/// A --sync during VM's records wait here until its failback starts (see `relay_session`).
pub fn held(ctx: &Ctx, vm: &VmName, sync: tern_core::SyncMode) -> bool {
    sync == tern_core::SyncMode::During && !lock(&ctx.failing_back).contains(vm)
}

async fn still_relaying(ctx: &Ctx, vm: &VmName) -> bool {
    let (store, vm) = (ctx.store.clone(), vm.clone());
    crate::admin::blocking(move || store.vm_state(&vm).is_ok_and(|s| RELAY_STATES.contains(&s)))
        .await
        .unwrap_or(false)
}

async fn relay_session(
    ctx: &Arc<Ctx>,
    vm: &VmName,
    backoff: &mut tern_core::backoff::Backoff,
) -> Result<(), Status> {
    let (store, v) = (ctx.store.clone(), vm.clone());
    // No longer reprotected (cancelled, committed): nothing to relay, and no error to show.
    let Some(row) =
        crate::admin::blocking(move || store.reprotect(&v)).await?.map_err(crate::store_status)?
    else {
        return Ok(());
    };
    // The relay's long stream has a connection of its own, like a delta sync's hashes.
    let ch = dial(ctx, &row.master_target).await?;
    let mut client = pb::replication_client::ReplicationClient::new(ch)
        .max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(pb::MAX_MESSAGE_BYTES);
    let handles = ctx.store.vm_disks(vm);
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(8);
    let hello = pb::Hello {
        vm: vm.to_string(),
        disks: handles
            .iter()
            .map(|h| pb::DiskInfo { name: h.name.to_string(), size: h.size, ..Default::default() })
            .collect(),
        protocol: 1,
        instance: tern_proto::instance_id().to_string(),
        time_ms: tern_store::now_ms(),
        problem: String::new(),
    };
    tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(hello)) })
        .await
        .map_err(|_| Status::cancelled("relay stream closed"))?;
    let mut inbound = client.replicate(ReceiverStream::new(rx)).await?.into_inner();
    let welcome = match inbound.message().await? {
        Some(pb::ServerMessage { msg: Some(pb::server_message::Msg::Welcome(w)) }) => w,
        _ => return Err(Status::internal("the master target did not answer Hello")),
    };
    let mut next: HashMap<DiskName, Seq> = HashMap::new();
    for h in &handles {
        let mt = welcome.disks.iter().find(|d| d.name == h.name.as_str()).map_or(0, |d| d.durable_seq);
        lock(&ctx.relay.acked).insert((vm.clone(), h.name.clone()), Seq(mt));
        next.insert(h.name.clone(), Seq(mt + 1));
    }
    // The master target holds everything the journal has: no ack will come to clear an
    // earlier failure (an idle VM stayed critical with it after the link was back).
    // (Or it takes nothing until the failback, with --sync during: no ack will come either.)
    if (held(ctx, vm, row.sync)
        || handles.iter().all(|h| next.get(&h.name).is_some_and(|n| *n > h.durable())))
        && let Some(e) = ctx.relay.caught_up(vm)
        && ctx.hub.error(vm).as_deref() == Some(e.as_str())
    {
        // Only the relay's own failure: another (an agent's refusal) stands.
        ctx.hub.clear_error(vm);
    }
    let mut cursor: HashMap<DiskName, ReadPosition> = HashMap::new();
    let mut limiter = pb::rate::RateLimiter::new(ctx.relay_max_rate);
    info!(vm = %vm, master_target = %row.master_target, "relaying to the master target");
    let mut seen = None;
    loop {
        // The catalog is read only after a change of state (idle, this loop wakes every 100 ms).
        let epoch = ctx.store.state_epoch();
        if seen != Some(epoch) {
            if !still_relaying(ctx, vm).await {
                return Ok(());
            }
            seen = Some(epoch);
        }
        let mut sent = false;
        // With --sync during the target disks are written through: they stay as they are
        // until the failback itself (its full download), not filled piecemeal beforehand by
        // what the recovered VM's agent sends meanwhile (nbd mode streams every write, a
        // checkpoint sends a pass), which would leave them neither the old VM's nor the new.
        let held = held(ctx, vm, row.sync);
        for h in handles.iter().filter(|_| !held) {
            match send_new_records(h, &mut next, &mut cursor, &tx, &mut limiter).await {
                Ok(s) => sent |= s,
                Err(e) => return Err(said_or(e, &mut inbound).await),
            }
        }
        let wait = if sent { Duration::from_millis(0) } else { Duration::from_millis(100) };
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = ctx.relay.wake.notified(), if !sent => {}
            m = inbound.message() => match m? {
                None => return Err(Status::unavailable("the master target closed the stream")),
                Some(pb::ServerMessage { msg: Some(pb::server_message::Msg::Ack(a)) }) => {
                    // Progress: the next outage starts the backoff over (not a Welcome alone: a
                    // master target that fails every session after it must not be hammered).
                    backoff.reset();
                    ctx.relay.record_ack(vm, &a);
                    ctx.hub.clear_error(vm);
                }
                Some(_) => {}
            },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Why a relay stream that closed under a send ended: the master target's own word (a
/// refused batch), which follows on its answers, or else `e`.
async fn said_or(e: Status, inbound: &mut tonic::Streaming<pb::ServerMessage>) -> Status {
    match tokio::time::timeout(Duration::from_secs(2), inbound.message()).await {
        Ok(Err(said)) => said,
        _ => e,
    }
}

/// Sends the records of `h` past what was sent; true when any went.
async fn send_new_records(
    h: &Arc<DiskHandle>,
    next: &mut HashMap<DiskName, Seq>,
    cursor: &mut HashMap<DiskName, ReadPosition>,
    tx: &mpsc::Sender<pb::AgentMessage>,
    limiter: &mut pb::rate::RateLimiter,
) -> Result<bool, Status> {
    let from = next.get(&h.name).copied().unwrap_or(Seq(1));
    if h.durable() < from {
        return Ok(false);
    }
    // Reading goes on from where the last read stopped, not from the segment's start.
    let at = cursor.get(&h.name).copied().filter(|p| p.last_seq.next() == from);
    let disk = h.clone();
    let (batches, complete, end, durable) = tokio::task::spawn_blocking(move || {
        let snapshot = disk.snapshot();
        read_batches(&snapshot, from, at.as_ref()).map(|(b, c, e)| (b, c, e, snapshot.durable))
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
    .map_err(crate::store_status)?;
    if let Some(end) = end {
        cursor.insert(h.name.clone(), end);
    }
    let mut sent = false;
    for (first, records) in batches {
        let n = records.len() as u64;
        let batch = pb::Batch { disk: h.name.to_string(), first_seq: first, records, times_ms: Vec::new() };
        limiter.take(prost::Message::encoded_len(&batch) as u64).await;
        tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Batch(batch)) })
            .await
            .map_err(|_| Status::unavailable("relay stream closed"))?;
        next.insert(h.name.clone(), Seq(first + n));
        sent = true;
    }
    if complete {
        // Everything up to the durable position went (bookmarks share a seq).
        next.insert(h.name.clone(), Seq(durable.0 + 1));
    }
    Ok(sent)
}

/// A relayed batch holds about this much payload.
const READ_BATCH_BYTES: usize = 1 << 20;
/// ... and covers at most this much of the disk: a master target writing through holds a
/// few batches decompressed, and 1 MiB of well-compressed records can be 100 MiB plain.
const READ_BATCH_PLAIN_BYTES: usize = 4 << 20;
/// One read of the journal stops past this much payload.
const READ_BYTES: usize = 8 << 20;

/// Reads the durable records from `from` on (going on from `at`, where an earlier read
/// stopped, when given), as wire batches of about 1 MiB. Returns the batches, whether they
/// reach the durable position, and where the read stopped.
#[allow(clippy::type_complexity)]
fn read_batches(
    snapshot: &tern_store::JournalSnapshot,
    from: Seq,
    at: Option<&ReadPosition>,
) -> Result<(Vec<(u64, Vec<pb::Record>)>, bool, Option<ReadPosition>), tern_store::StoreError> {
    let mut out: Vec<(u64, Vec<pb::Record>)> = Vec::new();
    // Payload and plain bytes of the batch being filled, and payload of the whole read.
    let (mut bytes, mut plain, mut total) = (0usize, 0usize, 0usize);
    let mut reader = match at {
        Some(p) => snapshot.read_from(p, snapshot.durable),
        None => snapshot.read_range(Seq(from.0 - 1), snapshot.durable),
    };
    for rec in reader.by_ref() {
        let rec = rec?;
        let r = rec.record;
        let kind = match r.kind {
            RecordKind::Bookmark | RecordKind::Time => continue,
            RecordKind::Write => pb::RecordKind::Write,
            RecordKind::Zero => pb::RecordKind::Zero,
        };
        let wire = pb::Record {
            kind: kind as i32,
            offset: r.offset,
            length: r.length,
            digest: if kind == pb::RecordKind::Zero { Vec::new() } else { r.digest.0.to_vec() },
            compression: if r.compressed { pb::Compression::Zstd } else { pb::Compression::None } as i32,
            payload: r.payload,
        };
        let size = wire.payload.len() + 64;
        let length = wire.length as usize;
        total += size;
        match out.last_mut() {
            Some((_, recs))
                if bytes + size <= READ_BATCH_BYTES
                    && plain + length <= READ_BATCH_PLAIN_BYTES
                    && recs.len() < 1024 =>
            {
                bytes += size;
                plain += length;
                recs.push(wire);
            }
            _ => {
                (bytes, plain) = (size, length);
                out.push((rec.seq.0, vec![wire]));
            }
        }
        // One read holds a bounded amount: a long backlog (the master target was away for
        // hours) is relayed a few MiB at a time, not read into memory whole.
        if total >= READ_BYTES {
            return Ok((out, false, reader.position()));
        }
    }
    Ok((out, true, reader.position()))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use tern_store::{Record, Store};

    /// A backlog is read a bounded amount at a time, in batches of about 1 MiB, and the
    /// reads resumed from where they stopped return every record once, in order.
    #[test]
    fn a_backlog_is_read_a_bounded_amount_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let vm = VmName::new("vm").unwrap();
        let j = store.register(&vm, &[(DiskName::new("sda").unwrap(), 1 << 30)]).unwrap().remove(0);
        // 200 records of 100 KB (stored as they are: already "compressed" payloads).
        let records: Vec<Record> = (0..200u64)
            .map(|i| {
                let payload: Vec<u8> =
                    (0..100_000u32).map(|b| (b.wrapping_mul(2_654_435_761) >> 13) as u8 ^ i as u8).collect();
                Record {
                    kind: RecordKind::Write,
                    offset: i * 131_072,
                    length: 100_000,
                    digest: tern_core::Digest::of(&payload),
                    compressed: false,
                    payload: payload.into(),
                }
            })
            .collect();
        j.append(Seq(1), &records).unwrap();
        j.sync().unwrap();
        let snapshot = j.snapshot();
        let (mut from, mut at, mut seen, mut reads) = (Seq(1), None, Vec::new(), 0);
        loop {
            let (batches, complete, end) = read_batches(&snapshot, from, at.as_ref()).unwrap();
            reads += 1;
            let bytes: usize = batches.iter().flat_map(|(_, r)| r).map(|r| r.payload.len()).sum();
            assert!(bytes <= READ_BYTES + 100_000, "one read held {bytes} bytes");
            for (first, recs) in &batches {
                let b: usize = recs.iter().map(|r| r.payload.len() + 64).sum();
                assert!(b <= READ_BATCH_BYTES, "a batch of {b} bytes");
                let p: usize = recs.iter().map(|r| r.length as usize).sum();
                assert!(p <= READ_BATCH_PLAIN_BYTES, "a batch covering {p} bytes");
                seen.extend((0..recs.len() as u64).map(|i| first + i));
                from = Seq(first + recs.len() as u64);
            }
            at = end;
            if complete {
                break;
            }
        }
        assert_eq!(seen, (1..=200).collect::<Vec<u64>>());
        assert!(reads >= 3, "20 MB in reads of 8 MiB: {reads} reads");

        // Records that compress 1000:1: batches are cut by what they cover on the disk.
        let mut enc = tern_core::codec::Encoder::new();
        let dense: Vec<Record> = (0..40u64)
            .map(|i| {
                let e = enc.encode(&vec![b'a' + i as u8; 1 << 20]);
                Record {
                    kind: RecordKind::Write,
                    offset: i << 20,
                    length: 1 << 20,
                    digest: e.digest,
                    compressed: e.compressed,
                    payload: e.payload.into(),
                }
            })
            .collect();
        j.append(Seq(201), &dense).unwrap();
        j.sync().unwrap();
        let (batches, complete, _) = read_batches(&j.snapshot(), Seq(201), None).unwrap();
        assert!(complete);
        assert_eq!(batches.len(), 10, "40 MiB of disk in batches of 4 MiB");
        assert!(batches.iter().all(|(_, r)| r.len() == 4));
    }
}
