//! tern-master-target: the primary site's end of failback. It receives the stream the
//! process server relays from the recovered VM, keeps it in a journal (the same store as
//! the process server's) whose base image is the on-premises target disk itself, and on
//! failback applies the final point onto that disk and checks its fingerprint. A full
//! download (failback with `--sync during`) is written straight onto the target disk
//! instead (`tern_store::write_through`).
//! Only the process server (role `server`) may call it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tern_core::pki::Bundle;
use tern_core::{Digest, DiskName, Seq, SyncMode, VmName};
use tern_proto as pb;
use tern_store::{DiskHandle, Store, StoreError};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

/// Blocks per PageHashes request: the answer stays far below the message size limit.
const MAX_PAGE_HASH_BLOCKS: usize = pb::MAX_PAGE_HASH_BLOCKS;

/// A master target's VM states: how relayed records are kept until the failback.

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub identity: Bundle,
}

#[derive(Debug)]
struct Ctx {
    store: Arc<Store>,
    data_dir: PathBuf,
    /// One prepare at a time: from the check that a file is no other disk's target to its
    /// registration, so that two cannot take the same file.
    preparing: tokio::sync::Mutex<()>,
}

fn status(e: StoreError) -> Status {
    tern_daemon::store_status(e, tern_daemon::Site::MasterTarget)
}

use tern_daemon::roles::require_server;

fn vm_arg(s: &str) -> Result<VmName, Status> {
    VmName::new(s).map_err(|e| Status::invalid_argument(e.to_string()))
}

use tern_daemon::Site;
use tern_daemon::blocking;
use tern_daemon::commit::{self, Durable, GroupCommit, Sink, Written};

#[derive(Debug, Clone)]
struct MasterTargetService {
    ctx: Arc<Ctx>,
}

impl MasterTargetService {
    /// A disk that `Prepare` registered here.
    fn prepared(&self, vm: &VmName, disk: &str) -> Result<Arc<DiskHandle>, Status> {
        let name = DiskName::new(disk).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.ctx
            .store
            .disk(vm, &name)
            .ok_or_else(|| Status::not_found(format!("VM {vm} disk {name} is not prepared here")))
    }
}

impl MasterTargetService {
    /// A point's disk as prepared here, with its seq and fingerprint; refused while the
    /// process server has not relayed everything up to the seq.
    fn point_disk(&self, vm: &VmName, d: &pb::PointDisk) -> Result<(Arc<DiskHandle>, Seq, Digest), Status> {
        let h = self.prepared(vm, &d.disk)?;
        let expected = Digest::from_slice(&d.fingerprint)
            .ok_or_else(|| Status::invalid_argument("fingerprint is not 32 bytes"))?;
        let seq = Seq(d.seq);
        if h.durable() < seq {
            return Err(Status::failed_precondition(format!(
                "disk {}: only seq {} of {seq} has arrived; the process server is still relaying",
                h.name,
                h.durable()
            )));
        }
        Ok((h, seq, expected))
    }
}

type HashStream = Pin<Box<dyn Stream<Item = Result<pb::BlockHashes, Status>> + Send>>;

#[tonic::async_trait]
impl pb::master_target_server::MasterTarget for MasterTargetService {
    async fn prepare(&self, req: Request<pb::PrepareRequest>) -> Result<Response<pb::PrepareReply>, Status> {
        require_server(&req, "Prepare")?;
        let r = req.into_inner();
        let vm = vm_arg(&r.vm)?;
        let mode = if r.write_through { SyncMode::During } else { SyncMode::Before };
        if !self.ctx.store.vm_disks(&vm).is_empty()
            && let Ok(Ok(Some(was))) = {
                let (store, v) = (self.ctx.store.clone(), vm.clone());
                blocking(move || store.target_mode(&v)).await
            }
            && was != mode
        {
            return Err(Status::failed_precondition(format!(
                "VM {vm} is already prepared here with --sync {was}; release it first"
            )));
        }
        let _preparing = self.ctx.preparing.lock().await;
        let mut disks = Vec::new();
        for d in &r.disks {
            let name = DiskName::new(&d.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
            let path = PathBuf::from(&d.path);
            if !path.is_absolute() {
                return Err(Status::invalid_argument(format!(
                    "target disk {name}: {} is not an absolute path",
                    d.path
                )));
            }
            if let Some(h) = self.ctx.store.disk(&vm, &name) {
                if h.base_path != path || h.size != d.size {
                    return Err(Status::failed_precondition(format!(
                        "VM {vm} disk {name} is already prepared here for {} ({} bytes), left by an earlier \
                         reprotect (one cancelled with --force while this master target was away): reprotect \
                         naming that same target disk, then `drctl reprotect-cancel {vm}` with this master target \
                         up releases it",
                        h.base_path.display(),
                        h.size
                    )));
                }
                continue;
            }
            if d.alternate {
                if path.exists() {
                    return Err(Status::failed_precondition(format!(
                        "target disk {name}: {} already exists; an alternate location must be a new file (a \
                         reprotect cancelled with `drctl reprotect-cancel` leaves the file it made there: delete \
                         it, or give another path)",
                        path.display()
                    )));
                }
                if !path.parent().is_some_and(std::path::Path::is_dir) {
                    return Err(Status::failed_precondition(format!(
                        "target disk {name}: the directory of {} does not exist on the master target; create it \
                         first or give another path",
                        path.display()
                    )));
                }
            } else {
                let size = tern_core::disk::DiskReader::open(&path).and_then(|d| d.size()).map_err(|e| {
                    Status::failed_precondition(format!(
                        "target disk {name}: cannot open {} on the master target: {e}; for a new disk use --location alternate",
                        path.display()
                    ))
                })?;
                if size != d.size {
                    return Err(Status::failed_precondition(format!(
                        "target disk {name}: {} is {size} bytes but the VM's disk is {} bytes; give the original disk or one of the same size",
                        path.display(),
                        d.size
                    )));
                }
            }
            disks.push((name, d.size, path, d.alternate, Seq(d.start_after)));
        }
        refuse_taken(&self.ctx.store, &vm, &disks)?;
        let store = self.ctx.store.clone();
        let v = vm.clone();
        blocking(move || create_and_register(&store, &v, &disks, mode))
            .await?
            .map_err(|e| Status::failed_precondition(format!("cannot prepare the target disks: {e}")))?;
        info!(vm = %vm, disks = r.disks.len(), sync = %mode, "target disks prepared");
        Ok(Response::new(pb::PrepareReply {}))
    }

    type HashesStream = HashStream;

    async fn hashes(&self, req: Request<pb::HashesRequest>) -> Result<Response<HashStream>, Status> {
        require_server(&req, "Hashes")?;
        let r = req.into_inner();
        let vm = vm_arg(&r.vm)?;
        let h = self.prepared(&vm, &r.disk)?;
        let (tx, rx) = mpsc::channel(4);
        let scratch = self.ctx.data_dir.join("tmp");
        let coarse = r.coarse;
        tokio::task::spawn_blocking(move || {
            let upto = h.durable();
            let r = tern_store::hash_disk(&h, &scratch, upto, coarse, &mut |first, chunk| {
                let mut m = pb::hash_table::message(h.name.as_str(), h.size, first, chunk);
                m.upto_seq = upto.0;
                tx.blocking_send(Ok(m)).is_ok()
            });
            if let Err(e) = r {
                let e = if e.is_storage_full() && h.durable() > h.base_seq() {
                    // The compare hashes the target disk with the relayed records this
                    // master target holds for it (a reprotect cut short, or cancelled and
                    // made again): the blocks they wrote are copied under `scratch`.
                    Status::resource_exhausted(format!(
                        "the master target has no room for the scratch copy a delta sync compares ({e}): \
                         the blocks of the target disk that the {} relayed records it holds wrote, copied \
                         under {} (about the size of those records). Free that much there, or `drctl \
                         reprotect-cancel VM` and reprotect with --sync during (a full download, no compare)",
                        h.durable().0 - h.base_seq().0,
                        scratch.display(),
                    ))
                } else {
                    status(e)
                };
                let _ = tx.blocking_send(Err(e));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn page_hashes(
        &self,
        req: Request<pb::TargetPageHashesRequest>,
    ) -> Result<Response<pb::BlockHashes>, Status> {
        require_server(&req, "PageHashes")?;
        let r = req.into_inner();
        let vm = vm_arg(&r.vm)?;
        let h = self.prepared(&vm, &r.disk)?;
        if r.blocks.len() > MAX_PAGE_HASH_BLOCKS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_PAGE_HASH_BLOCKS} blocks per request, not {}",
                r.blocks.len()
            )));
        }
        let blocks = r.blocks;
        let reply = blocking(move || {
            tern_store::base_block_hashes(&h, &blocks)
                .map(|entries| pb::hash_table::sparse_message(h.name.as_str(), h.size, &blocks, &entries))
        })
        .await?
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(reply))
    }

    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyReply>, Status> {
        require_server(&req, "Apply")?;
        let r = req.into_inner();
        let vm = vm_arg(&r.vm)?;
        let mut out = Vec::new();
        for d in r.disks {
            let (h, seq, expected) = self.point_disk(&vm, &d)?;
            let name = h.name.clone();
            let store = self.ctx.store.clone();
            let started = std::time::Instant::now();
            let fingerprint = blocking(move || {
                store.advance_base(&h, seq)?;
                let f = tern_core::disk::DiskReader::open(&h.base_path)
                    .map_err(|e| StoreError::Io { path: h.base_path.display().to_string(), source: e })?;
                tern_store::fingerprint_file(&f, h.size, &h.base_path)
            })
            .await?
            .map_err(status)?;
            if fingerprint != expected {
                return Err(Status::data_loss(format!(
                    "disk {name}: after the apply the target disk's fingerprint is {fingerprint}, the point's is \
                     {expected}: the target disk was written outside tern since the reprotect (its blocks are no \
                     longer what the delta sync compared). Do not start the primary VM from it; start the \
                     recovered VM again, `drctl reprotect-cancel VM`, `drctl reprotect` again (it compares or downloads \
                     the disk anew), then `drctl failback VM`"
                )));
            }
            info!(vm = %vm, disk = %name, seq = %seq, ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(0),
                "point applied onto the target disk and verified");
            out.push(fingerprint.to_hex());
        }
        Ok(Response::new(pb::ApplyReply { fingerprints: out }))
    }

    async fn drill(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyReply>, Status> {
        require_server(&req, "Drill")?;
        let r = req.into_inner();
        let vm = vm_arg(&r.vm)?;
        let mut out = Vec::new();
        for d in r.disks {
            let (h, seq, expected) = self.point_disk(&vm, &d)?;
            let name = h.name.clone();
            let store = self.ctx.store.clone();
            let started = std::time::Instant::now();
            let (_, fingerprint) =
                blocking(move || store.drill_disk(&h, seq, expected)).await?.map_err(status)?;
            info!(vm = %vm, disk = %name, seq = %seq, ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(0),
                "failback drill: the point applied onto a scratch copy verified, the copy removed");
            out.push(fingerprint);
        }
        Ok(Response::new(pb::ApplyReply { fingerprints: out }))
    }

    async fn release(&self, req: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseReply>, Status> {
        require_server(&req, "Release")?;
        let vm = vm_arg(&req.into_inner().vm)?;
        let store = self.ctx.store.clone();
        let v = vm.clone();
        blocking(move || store.forget(&v)).await?.map_err(status)?;
        info!(vm = %vm, "failback journal released");
        Ok(Response::new(pb::ReleaseReply {}))
    }
}

/// The relayed stream: the process server sends, records land in the journal, acks go back.
#[derive(Debug, Clone)]
struct RelayService {
    ctx: Arc<Ctx>,
    /// The master target stopping: a relay stream (open as long as a VM is reprotected)
    /// ends, or the server would wait for it forever.
    shutdown: CancellationToken,
}

type Outbound = mpsc::Sender<Result<pb::ServerMessage, Status>>;

fn msg(m: pb::server_message::Msg) -> Result<pb::ServerMessage, Status> {
    Ok(pb::ServerMessage { msg: Some(m) })
}

#[tonic::async_trait]
impl pb::replication_server::Replication for RelayService {
    type ReplicateStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, Status>> + Send>>;

    async fn replicate(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        require_server(&req, "Replicate")?;
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await? {
            Some(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(h)) }) => h,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        let vm = vm_arg(&hello.vm)?;
        let disks = self.ctx.store.vm_disks(&vm);
        if disks.is_empty() {
            return Err(Status::failed_precondition(format!(
                "VM {vm} is not prepared on this master target"
            )));
        }
        // What a session cut short left appended is made durable (or the session refused)
        // before its position is told: the sender resends from there.
        let synced = disks.clone();
        let durable = blocking(move || synced.iter().map(|h| h.sync()).collect::<Result<Vec<Seq>, _>>())
            .await?
            .map_err(status)?;
        let welcome = pb::Welcome {
            disks: disks
                .iter()
                .zip(durable)
                .map(|(h, durable)| pb::DiskState {
                    name: h.name.to_string(),
                    durable_seq: durable.0,
                    generation: h.generation(),
                    doubtful: Vec::new(),
                    doubtful_pages: Vec::new(),
                    state_invalid: false,
                })
                .collect(),
            ..Default::default()
        };
        let (tx, rx) = mpsc::channel(64);
        tx.send(msg(pb::server_message::Msg::Welcome(welcome)))
            .await
            .map_err(|_| Status::cancelled("gone"))?;
        let store = self.ctx.store.clone();
        let v = vm.clone();
        let s = store.clone();
        let through = blocking(move || s.target_mode(&v)).await?.is_ok_and(|m| m == Some(SyncMode::During));
        let (pipe_tx, pipe_rx) = mpsc::channel::<Pending>(PIPELINE_DEPTH);
        tokio::spawn(write_loop(store.clone(), vm.clone(), through, pipe_rx, tx.clone()));
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = inbound.message() => next,
                    () = shutdown.cancelled() => {
                        // What is verified is still written and acked; the sender resends
                        // the rest to the next master target process.
                        info!(vm = %vm, "relay stream ended: the master target is stopping");
                        break;
                    }
                };
                let m = match next {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        info!(vm = %vm, error = %e.message(), "relay stream closed");
                        break;
                    }
                };
                let Some(pb::agent_message::Msg::Batch(b)) = m.msg else { continue };
                match verify_batch(&store, &vm, b, through) {
                    Ok(pending) => {
                        if pipe_tx.send(pending).await.is_err() {
                            break;
                        }
                    }
                    Err(s) => {
                        warn!(vm = %vm, error = %s.message(), "relayed batch refused");
                        let _ = tx.send(Err(s)).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Verified batches waiting to be written; bounds memory per relay stream.
const PIPELINE_DEPTH: usize = 4;

use tern_daemon::ingest::Pending;

/// Starts verifying a relayed batch (see `tern_daemon::ingest`); written through, its
/// plain bytes are kept.
fn verify_batch(store: &Store, vm: &VmName, b: pb::Batch, through: bool) -> Result<Pending, Status> {
    let name = DiskName::new(&b.disk).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let disk =
        store.disk(vm, &name).ok_or_else(|| Status::invalid_argument(format!("unknown disk {name}")))?;
    tern_daemon::ingest::verify(disk, b, through)
}

/// Acks are cumulative; a dropped one is superseded by the next.
fn ack(out: &Outbound, done: Vec<Durable>) {
    for (disk, durable) in done {
        let _ = out.try_send(msg(pb::server_message::Msg::Ack(pb::Ack {
            disk: disk.name.to_string(),
            durable_seq: durable.0,
        })));
    }
}

/// Writes verified batches in order — into the journal, or written through onto the target
/// disk; the shared group commit (`tern_daemon::commit`) makes them durable and acks them.
#[derive(Debug)]
struct Writer {
    store: Arc<Store>,
    through: bool,
    out: Outbound,
    /// Write-through: where each disk's next record goes, and its open target disk.
    next: HashMap<DiskName, Seq>,
    files: HashMap<DiskName, Arc<std::fs::File>>,
}

impl Sink for Writer {
    type Item = Pending;

    async fn take(&mut self, pending: Pending, gc: &mut GroupCommit) -> Result<(), Status> {
        let v = pending.await.map_err(|e| Status::internal(e.to_string()))??;
        metrics::counter!("tern_mt_received_bytes_total", "vm" => v.disk.vm.to_string())
            .increment(v.wire_bytes);
        if !self.through {
            let d = v.disk.clone();
            let records = v.records;
            blocking(move || d.append(v.first, &records)).await?.map_err(status)?;
            gc.written(Written::Journal(v.disk));
            return Ok(());
        }
        let name = v.disk.name.clone();
        let last = v.last();
        let expect = *self.next.entry(name.clone()).or_insert_with(|| v.disk.durable().next());
        if v.first > expect {
            return Err(status(StoreError::SeqGap { expected: expect, got: v.first }));
        }
        // A batch resent after a reconnect may overlap what is already written.
        let skip = usize::try_from(expect.0 - v.first.0).unwrap_or(usize::MAX);
        if skip >= v.plain.len() {
            return Ok(());
        }
        let file = match self.files.get(&name) {
            Some(f) => f.clone(),
            None => {
                let (s, d) = (self.store.clone(), v.disk.clone());
                let f = Arc::new(blocking(move || s.open_base_for_writing(&d)).await?.map_err(status)?);
                self.files.insert(name.clone(), f.clone());
                f
            }
        };
        let (s, d, f) = (self.store.clone(), v.disk.clone(), file.clone());
        blocking(move || s.write_through(&d, &f, &v.plain[skip..])).await?.map_err(status)?;
        self.next.insert(name, last.next());
        gc.written(Written::Through { disk: v.disk, file, last });
        Ok(())
    }

    fn durable(&mut self, done: Vec<Durable>) {
        for (disk, seq) in &done {
            let l = [("vm", disk.vm.to_string()), ("disk", disk.name.to_string())];
            metrics::gauge!("tern_mt_durable_seq", &l).set(seq.0 as f64);
        }
        ack(&self.out, done);
    }
}

/// Runs one relay stream's writer; a refusal ends the stream with its status.
async fn write_loop(
    store: Arc<Store>,
    vm: VmName,
    through: bool,
    rx: mpsc::Receiver<Pending>,
    out: Outbound,
) {
    let writer = Writer {
        store: store.clone(),
        through,
        out: out.clone(),
        next: HashMap::new(),
        files: HashMap::new(),
    };
    if let Err(s) = commit::write_loop(rx, writer, GroupCommit::new(store, Site::MasterTarget)).await {
        warn!(vm = %vm, error = %s.message(), "relayed batch refused");
        let _ = out.send(Err(s)).await;
    }
}

pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tern_proto::daemon::ServeError> {
    let tls = tern_proto::tls::server_config(
        &config.identity.ca_pem,
        &config.identity.cert_pem,
        &config.identity.key_pem,
    )?;
    let dir = config.data_dir.clone();
    let store = Arc::new(
        tokio::task::spawn_blocking(move || Store::open(&dir))
            .await?
            .map_err(|e| tern_proto::daemon::ServeError::opening(e.is_for_good(), e))?,
    );
    // Said once the data directory is open (it may be refused: in use, too new), so that
    // "listening" means serving; a reader gone after the first line is no error.
    if let Ok(addr) = listener.local_addr() {
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), "listening on {addr}");
    }
    let ctx =
        Arc::new(Ctx { store, data_dir: config.data_dir.clone(), preparing: tokio::sync::Mutex::new(()) });
    let tracker = TaskTracker::new();
    let incoming = tern_proto::tls::incoming(
        listener,
        tls,
        // Only the process server calls a master target; nothing is revoked here.
        tern_proto::tls::Revocations::default(),
        shutdown.clone(),
        &tracker,
    );
    info!(data_dir = %config.data_dir.display(), "master target ready");
    tern_proto::daemon::notify_ready();
    pb::server()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(pb::master_target_server::MasterTargetServer::new(MasterTargetService {
            ctx: ctx.clone(),
        }))
        .add_service(
            pb::replication_server::ReplicationServer::new(RelayService { ctx, shutdown: shutdown.clone() })
                .max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(pb::MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown.cancelled())
        .await?;
    tern_proto::daemon::notify_stopping();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
    Ok(())
}

/// A target disk a prepare makes or takes: name, size, path, alternate (a new file), and
/// the position its journal starts after.
type NewDisk = (DiskName, u64, PathBuf, bool, Seq);

/// Refuses a file that is already the target of another disk (of this VM or another).
fn refuse_taken(store: &Store, vm: &VmName, disks: &[NewDisk]) -> Result<(), Status> {
    // One file, one disk: two disks written onto one file would leave one of them
    // overwritten by the other, with every fingerprint matching the last one applied.
    let mut taken: Vec<(String, PathBuf, FileKey)> = Vec::new();
    for v in store.vms().map_err(status)? {
        for h in store.vm_disks(&v) {
            if v != *vm || !disks.iter().any(|d| d.0 == h.name) {
                taken.push((format!("VM {v} disk {}", h.name), h.base_path.clone(), file_key(&h.base_path)));
            }
        }
    }
    for (name, _, path, _, _) in disks {
        let key = file_key(path);
        if let Some((whose, at, _)) = taken.iter().find(|(_, p, k)| p == path || key.is_some() && *k == key) {
            return Err(Status::failed_precondition(format!(
                "target disk {name}: {} is already the target of {whose} ({}); every disk needs a file of its \
                 own",
                path.display(),
                at.display()
            )));
        }
        taken.push((format!("VM {vm} disk {name}"), path.clone(), key));
    }
    Ok(())
}

/// Makes the new files of alternate disks and registers the disks (on the blocking pool).
fn create_and_register(store: &Store, v: &VmName, disks: &[NewDisk], mode: SyncMode) -> std::io::Result<()> {
    // The new files this prepare made: removed again if it fails (those of disks it
    // did not register), so that a retry with a corrected path is not refused for them.
    let mut made: Vec<(DiskName, PathBuf)> = Vec::new();
    let result = (|| {
        for (name, size, path, alternate, _) in disks {
            if *alternate {
                let mut create = || -> std::io::Result<()> {
                    let f = std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
                    made.push((name.clone(), path.clone()));
                    f.set_len(*size)?;
                    f.sync_all()
                };
                create().map_err(|e| {
                    std::io::Error::new(e.kind(), format!("target disk {name}: {}: {e}", path.display()))
                })?;
                if let Some(dir) = path.parent() {
                    std::fs::File::open(dir)?.sync_all()?;
                }
            }
        }
        let list: Vec<_> = disks.iter().map(|(n, s, p, _, a)| (n.clone(), *s, p.clone(), *a)).collect();
        store
            .register_on(v, &list)
            .and_then(|()| store.set_target_mode(v, mode))
            .map_err(|e| std::io::Error::other(e.to_string()))
    })();
    if result.is_err() {
        for (name, p) in made {
            if store.disk(v, &name).is_none() {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    result
}

/// What makes two paths one file: its device and inode when it exists, else its directory's
/// (canonical) path and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FileKeyInner {
    Inode(u64, u64),
    Path(PathBuf),
}

type FileKey = Option<FileKeyInner>;

fn file_key(path: &std::path::Path) -> FileKey {
    use std::os::unix::fs::MetadataExt;
    if let Ok(m) = std::fs::metadata(path) {
        return Some(FileKeyInner::Inode(m.dev(), m.ino()));
    }
    let dir = std::fs::canonicalize(path.parent()?).ok()?;
    Some(FileKeyInner::Path(dir.join(path.file_name()?)))
}
