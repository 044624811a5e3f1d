//! The way back: reprotect to a master target, fail back, and re-enable replication from
//! the primary site.

use crate::admin::{blocking, point_info, vm_arg};
use crate::relay::master_target;
use crate::{Ctx, store_status};
use std::sync::Arc;
use std::time::Duration;
use tern_core::pki::Role;
use tern_core::{DiskName, JobKind, PointId, SyncMode, VmName, VmState};
use tern_proto as pb;
use tern_store::{Policy, ReprotectRow, Transition};
use tonic::Status;
use tracing::{info, warn};

/// The failback's phases before the recovered VM is asked to shut down: one that fails in
/// them changed nothing.
pub const BEFORE_SHUTDOWN: [&str; 3] = ["starting", "checking the master target", ASKING_SHUTDOWN];
const ASKING_SHUTDOWN: &str = "asking the recovered VM's agent to shut it down";

/// A failback whose drain makes no progress for this long fails (and can be run again).
const DRAIN_STALL: Duration = Duration::from_secs(300);
/// The agent's final pass may send nothing while the shutdown hook runs (the agent gives
/// it up to 600 s); past this without a byte, the failback fails (and can be run again).
const FINAL_PASS_STALL: Duration = Duration::from_secs(660);

/// The failback policy: made at reprotect, not editable.
pub fn failback_policy() -> Policy {
    Policy {
        retention_ms: 24 * 3_600_000,
        crash_interval_ms: 5 * 60_000,
        app_interval_ms: 60 * 60_000,
        rpo_threshold_ms: 15 * 60_000,
        max_journal_bytes: 0,
    }
}

/// Refuses, saying what to do, unless `vm` is in `wanted` (before work that precedes the
/// state change; the change itself checks again).
async fn require(ctx: &Arc<Ctx>, vm: &VmName, wanted: VmState, what: &'static str) -> Result<(), Status> {
    let store = ctx.store.clone();
    let v = vm.clone();
    blocking(move || store.require_state(&v, wanted, what)).await?.map_err(store_status)
}

/// `NAME=PATH` target disks, checked against the VM's disks: each named once, each a disk
/// of the VM, every disk of the VM named.
pub fn target_disks(
    vm: &VmName,
    disks: &[DiskName],
    given: &[String],
) -> Result<Vec<(DiskName, String)>, Status> {
    let mut targets: Vec<(DiskName, String)> = Vec::new();
    for t in given {
        let (name, path) = t
            .split_once('=')
            .ok_or_else(|| Status::invalid_argument(format!("--target-disk {t:?}: write it as NAME=PATH")))?;
        let name = DiskName::new(name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !disks.contains(&name) {
            let names: Vec<String> = disks.iter().map(ToString::to_string).collect();
            return Err(Status::not_found(format!(
                "VM {vm} has no disk {name}; its disks: {}",
                names.join(", ")
            )));
        }
        if targets.iter().any(|(n, _)| *n == name) {
            return Err(Status::invalid_argument(format!("disk {name} is named twice")));
        }
        let same = |p: &str| std::path::Path::new(p).components().eq(std::path::Path::new(path).components());
        if let Some((other, _)) = targets.iter().find(|(_, p)| same(p.as_str())) {
            return Err(Status::invalid_argument(format!(
                "disks {other} and {name} both name {path} as their target disk: each disk needs a file of its own \
                 (the failback would write one over the other)"
            )));
        }
        targets.push((name, path.to_string()));
    }
    if let Some(d) = disks.iter().find(|d| !targets.iter().any(|(n, _)| n == *d)) {
        return Err(Status::invalid_argument(format!(
            "no --target-disk for disk {d}: every disk of VM {vm} needs one"
        )));
    }
    Ok(targets)
}

pub async fn reprotect(ctx: &Arc<Ctx>, r: pb::ReprotectRequest) -> Result<pb::ReprotectReply, Status> {
    let vm = vm_arg(&r.vm)?;
    require(
        ctx,
        &vm,
        VmState::FailoverCommitted,
        "reprotect needs a committed failover (`drctl failover`, then `drctl commit`)",
    )
    .await?;
    let sync = pb::SyncMode::read(r.sync).unwrap_or(SyncMode::Before);
    let handles = ctx.store.vm_disks(&vm);
    let names: Vec<DiskName> = handles.iter().map(|h| h.name.clone()).collect();
    let targets = target_disks(&vm, &names, &r.target_disks)?;
    let mut mt = master_target(ctx, &r.master_target).await?;
    let disks = handles
        .iter()
        .map(|h| {
            let path = targets.iter().find(|(n, _)| *n == h.name).map(|(_, p)| p.clone()).unwrap_or_default();
            pb::TargetDisk {
                name: h.name.to_string(),
                size: h.size,
                path,
                alternate: r.alternate,
                start_after: h.base_seq().0,
            }
        })
        .collect();
    mt.prepare(pb::PrepareRequest { vm: vm.to_string(), disks, write_through: sync == SyncMode::During })
        .await
        .map_err(|e| {
            if e.code() == tonic::Code::Unimplemented {
                Status::failed_precondition(format!(
                    "{} does not answer as a master target (a process server's address?): give the URL of \
                     `master-target serve` on the primary site",
                    r.master_target
                ))
            } else {
                e
            }
        })?;
    // The recovered VM's identity, named in the reprotect: until the failback is committed
    // it is the only agent identity that may replicate the VM.
    let (bundle, serial) = crate::admin::issue_bundle(ctx, Role::Agent(vm.clone())).await?;
    let row = ReprotectRow {
        master_target: r.master_target.clone(),
        alternate: r.alternate,
        sync,
        disks: targets.iter().map(|(n, p)| (n.to_string(), p.clone())).collect(),
        identity: serial.clone(),
    };
    let store = ctx.store.clone();
    let v = vm.clone();
    let moved = blocking(move || {
        let generations = store.new_generations(&v);
        store.transition(&v, Transition::Reprotect { row, policy: failback_policy(), generations })
    })
    .await?;
    if let Err(e) = moved {
        // Never handed out: it must not replicate the VM later either.
        retire_identity(ctx, &vm, &serial).await;
        return Err(store_status(e));
    }
    info!(vm = %vm, master_target = %r.master_target, alternate = r.alternate, sync = %sync, "VM reprotected");
    // The recovered VM's agent is awaited from now: the old one's absence does not count.
    ctx.hub.absent_from_now(&vm);
    // The failover's files, by disk: `DIR/NAME.raw` (or `.vhd`).
    let (store, v) = (ctx.store.clone(), vm.clone());
    let files =
        blocking(move || store.failover_row(&v)).await?.ok().flatten().map(|f| f.files).unwrap_or_default();
    let recovered_disks = targets
        .iter()
        .map(|(name, _)| {
            let file = files.iter().find(|f| {
                std::path::Path::new(f).file_stem().and_then(|s| s.to_str()) == Some(name.as_str())
            });
            match file {
                Some(f) => format!("{name}={f}"),
                None => format!("{name}=<recovered disk {name}>"),
            }
        })
        .collect();
    Ok(pb::ReprotectReply { bundle, recovered_disks })
}

/// Marks a VM as being failed back for as long as it lives (health, `Ctx::failing_back`);
/// one failback of a VM at a time (two would shut it down twice and apply two final
/// points onto the same disks).
#[derive(Debug)]
pub struct FailingBack {
    ctx: Arc<Ctx>,
    vm: VmName,
}

impl FailingBack {
    pub fn enter(ctx: &Arc<Ctx>, vm: &VmName) -> Result<FailingBack, String> {
        if !crate::lock(&ctx.failing_back).insert(vm.clone()) {
            return Err(format!("a failback of VM {vm} is running already; follow it with `drctl jobs`"));
        }
        Ok(FailingBack { ctx: ctx.clone(), vm: vm.clone() })
    }
}

impl Drop for FailingBack {
    fn drop(&mut self) {
        crate::lock(&self.ctx.failing_back).remove(&self.vm);
    }
}

/// `drctl failback`, entered (`FailingBack::enter`) before its job started.
pub async fn failback(
    ctx: &Arc<Ctx>,
    vm: VmName,
    job: crate::jobs::Job,
    entered: FailingBack,
) -> Result<pb::JobOutput, String> {
    let again = format!(": run `drctl failback {vm}` again");
    failback_at(ctx, vm, job, None, Some(entered))
        .await
        .map_err(|e| if e.starts_with("the failback's final pass was cut short") { e + &again } else { e })
}

/// Shuts the recovered VM down through its agent and returns its final point (made after
/// the shutdown hook, with everything it wrote).
pub async fn shut_down_recovered(
    ctx: &Arc<Ctx>,
    vm: &VmName,
    job: &crate::jobs::Job,
) -> Result<tern_store::Point, String> {
    let row = reprotected_row(ctx, vm, Transition::FailBack.refusal()).await?;
    // The master target must take the final state: one that cannot be reached, or is
    // refused (a revoked identity, another CA), is found before the recovered VM is stopped.
    job.phase("checking the master target").await;
    crate::relay::master_target_alone(ctx, &row.master_target)
        .await
        .map_err(|e| format!("{}; the recovered VM was not shut down, nothing changed", e.message()))?;
    // Until the request is out, nothing is shut down: a failback that fails here is not
    // one cut short (see `health::failback_cut_short`).
    job.phase(ASKING_SHUTDOWN).await;
    let rx = ctx.hub.request_shutdown(vm).await.map_err(|e| {
        format!("{}; the recovered VM must be shut down through its agent for a failback", e.message())
    })?;
    job.phase(if row.sync == SyncMode::During {
        "shutting down the recovered VM, then the full download of its disks onto the target disks"
    } else {
        "shutting down the recovered VM and sending its last changes"
    })
    .await;
    final_point(ctx, vm, rx, job).await.map_err(|reason| {
        // The shutdown was asked for: its hook may have run (the VM may be off), and with
        // --sync during the full download was writing the target disks.
        let disks = if row.sync == SyncMode::During {
            "; the full download may have been writing the target disks, which may then hold part old and \
             part new data: do not start the primary VM from them"
        } else {
            "; the target disks are unchanged"
        };
        format!(
            "the failback's final pass was cut short: {reason}. The recovered VM's shutdown hook may have run \
             (check whether it still runs){disks}. The failback run again asks its shutdown hook again, which \
             must succeed when the VM is already off"
        )
    })
}

/// A failback at `point` (a final point already made, say with the rest of its replication
/// group shut down first), or after a shutdown of its own.
pub async fn failback_at(
    ctx: &Arc<Ctx>,
    vm: VmName,
    job: crate::jobs::Job,
    point: Option<tern_store::Point>,
    entered: Option<FailingBack>,
) -> Result<pb::JobOutput, String> {
    let _failing_back = match entered {
        Some(e) => e,
        None => FailingBack::enter(ctx, &vm)?,
    };
    let row = reprotected_row(ctx, &vm, Transition::FailBack.refusal()).await?;
    let point = match point {
        Some(p) => p,
        None => shut_down_recovered(ctx, &vm, &job).await?,
    };
    drain(ctx, &vm, &point, &row, &job).await?;
    job.phase("applying the final point on the master target").await;
    let request = pb::ApplyRequest { vm: vm.to_string(), disks: point_info(&point).disks };
    let mut wait = Duration::from_millis(500);
    let applied = loop {
        let attempt = async {
            let mut mt = master_target(ctx, &row.master_target).await?;
            mt.apply(request.clone()).await.map(|r| r.into_inner())
        }
        .await;
        match attempt {
            Ok(r) => break r,
            Err(e) if crate::relay::transport_failure(&e) => {
                ctx.relay.forget(&row.master_target, &e);
                warn!(vm = %vm, error = %e.message(), "master target unavailable during the apply; retrying");
                // Whoever follows the job sees why it waits (it goes on once the master
                // target is back).
                job.phase(&format!(
                    "applying the final point on the master target: waiting for it to be reachable again \
                     ({}); retrying",
                    e.message()
                ))
                .await;
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(format!("the master target refused the apply: {}", e.message())),
        }
    };
    let store = ctx.store.clone();
    let v = vm.clone();
    blocking(move || store.transition(&v, Transition::FailBack))
        .await
        .map_err(|e| e.message().to_string())?
        .map_err(|e| e.to_string())?;
    ctx.hub.stand_down(&vm, "the VM failed back").await;
    info!(vm = %vm, point = %point.id, "failed back");
    let disks = applied_disks(ctx, &vm, &point, &applied.fingerprints, Some(&row));
    Ok(crate::jobs::point_output(&vm, &point, disks))
}

/// The disks a master target applied `point` onto, with the fingerprints it found; `row`
/// names their paths there (none for a drill's scratch copies, which are gone).
fn applied_disks(
    ctx: &Ctx,
    vm: &VmName,
    point: &tern_store::Point,
    fingerprints: &[String],
    row: Option<&ReprotectRow>,
) -> Vec<pb::OutputDisk> {
    point
        .disks
        .iter()
        .zip(fingerprints)
        .map(|(d, fp)| pb::OutputDisk {
            name: d.disk.to_string(),
            file: row
                .and_then(|r| r.disks.iter().find(|(n, _)| n == d.disk.as_str()))
                .map(|(_, p)| p.clone())
                .unwrap_or_default(),
            size: ctx.store.disk(vm, &d.disk).map_or(0, |h| h.size),
            fingerprint: fp.clone(),
            seq: d.seq.0,
            ..Default::default()
        })
        .collect()
}

/// Where a reprotected VM fails back to; refused (with `what`) when it is not reprotected.
async fn reprotected_row(ctx: &Arc<Ctx>, vm: &VmName, what: &'static str) -> Result<ReprotectRow, String> {
    require(ctx, vm, VmState::Reprotected, what).await.map_err(|e| e.message().to_string())?;
    let (store, v) = (ctx.store.clone(), vm.clone());
    blocking(move || store.reprotect(&v))
        .await
        .map_err(|e| e.message().to_string())?
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the VM has no reprotect record".to_string())
}

/// Waits until the master target has every record of `point`.
async fn drain(
    ctx: &Arc<Ctx>,
    vm: &VmName,
    point: &tern_store::Point,
    row: &tern_store::ReprotectRow,
    job: &crate::jobs::Job,
) -> Result<(), String> {
    job.phase("draining to the master target").await;
    let total: u64 = point.disks.iter().map(|d| d.seq.0).sum();
    let (mut last, mut since) = (0u64, std::time::Instant::now());
    loop {
        let done: u64 = point.disks.iter().map(|d| ctx.relay.acked(vm, &d.disk).0.min(d.seq.0)).sum();
        job.progress(done, total);
        if done >= total {
            return Ok(());
        }
        if done != last {
            (last, since) = (done, std::time::Instant::now());
        } else if since.elapsed() > DRAIN_STALL {
            let why = ctx
                .relay
                .last_error(vm)
                .map(|e| format!(" (the relay's last error: {e})"))
                .unwrap_or_default();
            return Err(format!(
                "the master target at {} took nothing for {}s{why}; check it and the process server's log, then run failback again",
                row.master_target,
                DRAIN_STALL.as_secs()
            ));
        }
        if !ctx.relay.next_ack(&ctx.shutdown, Duration::from_millis(100)).await {
            return Err("the process server is stopping".into());
        }
    }
}

/// A failback rehearsed without stopping the recovered VM: a fresh point of it (through
/// its agent; the newest point when the agent is away), relayed to the master target,
/// applied there onto scratch copies and verified, the copies removed. Nothing changes: the
/// VM stays reprotected and running, the target disks untouched.
pub async fn drill(ctx: &Arc<Ctx>, vm: VmName, job: crate::jobs::Job) -> Result<pb::JobOutput, String> {
    let row =
        reprotected_row(ctx, &vm, "a failback drill needs a reprotected VM (`drctl reprotect`)").await?;
    if row.sync == SyncMode::During {
        return Err(format!(
            "VM {vm} was reprotected with --sync during: the master target receives nothing until the failback \
             itself, so there is nothing to rehearse (reprotect with --sync before to drill)"
        ));
    }
    let point = if ctx.hub.connected(&vm) {
        job.phase("making a point of the running recovered VM").await;
        let rx = ctx.hub.request_checkpoint(&vm, false).await.map_err(|e| e.message().to_string())?;
        match tokio::time::timeout(Duration::from_secs(600), rx).await {
            Ok(Ok(Ok(p))) => p,
            Ok(Ok(Err(reason))) => return Err(format!("the recovered VM's agent made no point: {reason}")),
            _ => return Err("the recovered VM's agent made no point within 10 min".into()),
        }
    } else {
        let (store, v) = (ctx.store.clone(), vm.clone());
        blocking(move || store.resolve_point(&v, &tern_store::PointSpec::LatestProcessed))
            .await
            .map_err(|e| e.message().to_string())?
            .map_err(|e| e.to_string())?
    };
    drain(ctx, &vm, &point, &row, &job).await?;
    job.phase("applying the point onto scratch copies on the master target").await;
    let request = pb::ApplyRequest { vm: vm.to_string(), disks: point_info(&point).disks };
    let mut mt = master_target(ctx, &row.master_target).await.map_err(|e| e.message().to_string())?;
    let applied = mt
        .drill(request)
        .await
        .inspect_err(|e| ctx.relay.forget(&row.master_target, e))
        .map_err(|e| format!("the master target's drill failed: {}", e.message()))?
        .into_inner();
    info!(vm = %vm, point = %point.id, "failback drill verified on the master target");
    let disks = applied_disks(ctx, &vm, &point, &applied.fingerprints, None);
    let mut out = crate::jobs::point_output(&vm, &point, disks);
    out.note = "failback drill: applied on scratch copies on the master target, verified, removed".into();
    Ok(out)
}

/// Waits for the final point an agent makes after its shutdown hook. Its last pass may be a
/// full download of every disk: the job shows how far it has come, and the wait fails only
/// when nothing arrives for longer than the shutdown hook may take.
pub async fn final_point(
    ctx: &Arc<Ctx>,
    vm: &VmName,
    mut rx: tokio::sync::oneshot::Receiver<crate::hub::PointResult>,
    job: &crate::jobs::Job,
) -> Result<tern_store::Point, String> {
    let total: u64 = ctx.store.vm_disks(vm).iter().map(|h| h.size).sum();
    let (mut bytes, mut since) = (ctx.hub.bytes_received(vm), std::time::Instant::now());
    loop {
        tokio::select! {
            r = &mut rx => return match r {
                Ok(r) => r,
                Err(_) => Err("the agent made no final point".into()),
            },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                job.progress(ctx.hub.scan_position(vm).min(total), total);
                let now = ctx.hub.bytes_received(vm);
                if now != bytes {
                    (bytes, since) = (now, std::time::Instant::now());
                } else if since.elapsed() > FINAL_PASS_STALL {
                    return Err(format!(
                        "the agent sent nothing for {}s after the shutdown request; check its log",
                        FINAL_PASS_STALL.as_secs()
                    ));
                }
            }
            _ = ctx.shutdown.cancelled() => return Err("the process server is stopping".into()),
        }
    }
}

/// After a failback: the master target's journal and the failover's output go; the
/// primary site runs the VM again.
pub async fn commit_failback(ctx: &Arc<Ctx>, vm: &VmName) -> Result<PointId, Status> {
    let (store, v) = (ctx.store.clone(), vm.clone());
    let row = blocking(move || store.reprotect(&v))
        .await?
        .map_err(store_status)?
        .ok_or_else(|| Status::internal("no reprotect record"))?;
    // W16: a master target that was down answered "Connection refused (os error 111)" alone.
    let again = format!(
        "the failback stays done, and the VM's journal there is not released yet: run `drctl commit {vm}` \
         again once it answers"
    );
    let mut mt = master_target(ctx, &row.master_target)
        .await
        .map_err(|e| Status::unavailable(format!("{}; {again}", e.message())))?;
    mt.release(pb::ReleaseRequest { vm: vm.to_string() }).await.map_err(|e| {
        ctx.relay.forget(&row.master_target, &e);
        if crate::relay::transport_failure(&e) {
            Status::unavailable(format!(
                "cannot reach the master target at {} ({}); {again}",
                row.master_target,
                e.message()
            ))
        } else {
            e
        }
    })?;
    let store = ctx.store.clone();
    let v = vm.clone();
    let point = blocking(move || store.commit_failback(&v)).await?.map_err(store_status)?;
    // The recovered VM is shut down and its disks are the primary's again: its agent
    // identity could only send a stale disk from now on.
    if !row.identity.is_empty() {
        retire_identity(ctx, vm, &row.identity).await;
    }
    Ok(point)
}

/// Undoes a reprotect (a wrong master target or target disk, a recovered disk the agent
/// cannot replicate, a master target gone for good): refused while a failback or its drill
/// runs; the master target releases its journal for the VM (unless it cannot be reached
/// and `force` is given), the VM becomes failover-committed again with the points made
/// since gone, and the recovered VM's agent identity is revoked (its connection cut). The
/// recovered VM runs on, unprotected, as after the commit of its failover.
pub async fn cancel_reprotect(
    ctx: &Arc<Ctx>,
    vm: &VmName,
    force: bool,
) -> Result<pb::CancelReprotectReply, Status> {
    let running = ctx.jobs.running(vm, &[JobKind::Failback, JobKind::FailbackDrill]).await?;
    if let Some(j) = running {
        return Err(Status::failed_precondition(format!(
            "a {} of VM {vm} is running (job {}); cancel the reprotect once it has ended (`drctl jobs --wait {}`)",
            j.kind, j.id, j.id
        )));
    }
    let (store, v) = (ctx.store.clone(), vm.clone());
    let row = blocking(move || {
        store.require_state(
            &v,
            VmState::Reprotected,
            "only a reprotected VM's reprotect can be cancelled",
        )?;
        store.reprotect(&v)
    })
    .await?
    .map_err(store_status)?
    .ok_or_else(|| Status::internal("a reprotected VM without its reprotect record"))?;
    let released = match release(ctx, vm, &row.master_target).await {
        Ok(()) => true,
        Err(e) if force => {
            warn!(vm = %vm, master_target = %row.master_target, error = %e.message(),
                "reprotect cancelled without the master target: its journal for the VM is not released");
            false
        }
        Err(e) => {
            return Err(Status::unavailable(format!(
                "{}; nothing was changed. Retry once the master target at {} is back, or give --force \
                 to cancel without it (its journal for VM {vm} then stays there, and a later reprotect \
                 to it must name the same target disks)",
                e.message(),
                row.master_target
            )));
        }
    };
    let (store, v) = (ctx.store.clone(), vm.clone());
    let points = blocking(move || -> Result<u64, tern_store::StoreError> {
        let n = store.points(&v)?.len() as u64;
        store.cancel_reprotect(&v)?;
        Ok(n)
    })
    .await?
    .map_err(store_status)?;
    ctx.initial_syncs.abandon(vm, "the reprotect was cancelled before its first point").await;
    if !row.identity.is_empty() {
        retire_identity(ctx, vm, &row.identity).await;
    }
    info!(vm = %vm, master_target = %row.master_target, released, points_deleted = points,
        "reprotect cancelled; the VM is failover-committed again");
    Ok(pb::CancelReprotectReply { released, revoked_serial: row.identity, points_deleted: points })
}

/// Has the master target drop its journal for `vm`.
async fn release(ctx: &Arc<Ctx>, vm: &VmName, url: &str) -> Result<(), Status> {
    let mut mt = master_target(ctx, url).await?;
    mt.release(pb::ReleaseRequest { vm: vm.to_string() }).await.inspect_err(|e| ctx.relay.forget(url, e))?;
    Ok(())
}

/// Revokes an identity the circle no longer needs; a failure is logged (it is listed as
/// valid in `drctl identities`, and `drctl revoke` can retire it).
async fn retire_identity(ctx: &Arc<Ctx>, vm: &VmName, serial: &str) {
    let info = ctx.identities.list().into_iter().find(|r| r.info.serial == serial).map(|r| r.info);
    let Some(info) = info else { return };
    let ids = ctx.identities.clone();
    match blocking(move || ids.revoke(vec![info], tern_store::now_ms())).await {
        Ok(Ok(_)) => info!(vm = %vm, serial, "the recovered VM's agent identity is revoked"),
        Ok(Err(e)) => {
            warn!(vm = %vm, serial, error = %e, "cannot revoke the recovered VM's agent identity; revoke it with `drctl revoke`")
        }
        Err(e) => {
            warn!(vm = %vm, serial, error = %e.message(), "cannot revoke the recovered VM's agent identity; revoke it with `drctl revoke`")
        }
    }
}

pub async fn reverse_replicate(ctx: &Arc<Ctx>, vm: &VmName) -> Result<(), Status> {
    let store = ctx.store.clone();
    let v = vm.clone();
    blocking(move || {
        let generations = store.new_generations(&v);
        store.transition(&v, Transition::ReverseReplicate { policy: Policy::default(), generations })
    })
    .await?
    .map_err(store_status)?;
    info!(vm = %vm, "replication from the primary site re-enabled");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_disks_onto_one_file_are_refused() {
        let vm = VmName::new("v").unwrap();
        let disks = [DiskName::new("d1").unwrap(), DiskName::new("d2").unwrap()];
        let given = |a: &str, b: &str| vec![format!("d1={a}"), format!("d2={b}")];
        let e = target_disks(&vm, &disks, &given("/x/a.img", "/x//a.img")).unwrap_err();
        assert!(e.message().contains("both name"), "{}", e.message());
        assert_eq!(target_disks(&vm, &disks, &given("/x/a.img", "/x/b.img")).unwrap().len(), 2);
    }
}
