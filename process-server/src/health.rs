//! RPO health, and the background workers: health transitions and retention.

use crate::Ctx;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tern_core::{Health, SyncMode, VmName, VmState};
use tracing::{info, warn};

/// normal; warning above the RPO threshold; critical above twice it, when the agent has
/// been away longer than the threshold, or while replication fails on this side (`failing`).
/// A protected VM and a reprotected one (its changes go on to the master target: a relay
/// that fails is failing here) replicate; a VM in any other state does not: normal.
/// While a failback runs (`failing_back`) the recovered VM is shut down on purpose: only a
/// failure counts.
pub fn health(
    state: VmState,
    rpo_secs: i64,
    absent_secs: i64,
    threshold_secs: i64,
    failing: bool,
    failing_back: bool,
) -> Health {
    if !matches!(state, VmState::Protected | VmState::Reprotected) {
        return Health::Normal;
    }
    if failing_back {
        return if failing { Health::Critical } else { Health::Normal };
    }
    if rpo_secs > 2 * threshold_secs || absent_secs > threshold_secs || failing {
        Health::Critical
    } else if rpo_secs > threshold_secs {
        Health::Warning
    } else {
        Health::Normal
    }
}

fn vm_health(ctx: &Ctx, vm: &VmName) -> Result<Health, tern_store::StoreError> {
    let (policy, state, points) = {
        let s = &ctx.store;
        (s.policy(vm)?, s.vm_state(vm)?, s.latest_point(vm)?)
    };
    let rpo = points.map_or_else(
        || {
            // Before the first point, RPO counts from when the VM was first seen.
            0
        },
        |p| ((tern_store::now_ms() - p.time_ms) / 1000).max(0),
    );
    let absent = ctx.hub.disconnected_for(vm).map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX));
    let failing_back = crate::lock(&ctx.failing_back).contains(vm);
    // A failed-over VM whose disks were not written whole cannot start.
    if output_cut_short(ctx, vm, ctx.store.failover_not_whole(vm)?).is_some() {
        return Ok(Health::Critical);
    }
    let h =
        health(state, rpo, absent, policy.rpo_threshold_ms / 1000, problem(ctx, vm).is_some(), failing_back);
    Ok(with_concern(h, concern(ctx, vm).is_some()))
}

/// What replication goes on despite, a warning, not critical (every point is still whole):
/// the agent's state directory cannot be written (it sends again what it cannot vouch for,
/// and a restart of it compares the disks in full), or the process server's data directory
/// is close to full.
pub fn concern(ctx: &Ctx, vm: &VmName) -> Option<String> {
    let replicates = || ctx.store.vm_state(vm).is_ok_and(|s| s.takes_replication());
    ctx.hub.agent_problem(vm).or_else(|| low_space(ctx)).filter(|_| replicates())
}

/// The data directory close to full: less free than the space reserve's size, or the
/// reserve given up. Said before a write fails (W16: health stayed normal on a file system
/// 100 % full until a record could not be written).
fn low_space(ctx: &Ctx) -> Option<String> {
    let reserve = ctx.store.reserve();
    if reserve.bytes() == 0 {
        return None;
    }
    let free = tern_store::reserve::free_bytes(&ctx.data_dir).ok()?;
    let dir = ctx.data_dir.display();
    if !reserve.held() {
        return Some(format!(
            "the process server's data directory {dir} filled: its space reserve is given up (set aside again \
             once {} bytes are free; {free} now), and new records are taken only while {} bytes stay free; \
             free space there, give it more, or shorten retention",
            reserve.bytes().saturating_mul(2),
            reserve.bytes()
        ));
    }
    (free < reserve.bytes()).then(|| {
        format!(
            "the process server's data directory {dir} has {free} bytes free, less than its space reserve's {}: \
             once it is full, replication stops until retention frees space; free space there or give it more",
            reserve.bytes()
        )
    })
}

/// `h`, at least a warning when there is a [`concern`].
pub fn with_concern(h: Health, concern: bool) -> Health {
    if concern && h == Health::Normal { Health::Warning } else { h }
}

/// `not_whole` (what [`tern_store::Store::failover_not_whole`] says of `vm`), unless its
/// output is being written right now (a failover, change of point or plan step running):
/// only one cut short is a problem.
pub fn output_cut_short(ctx: &Ctx, vm: &VmName, not_whole: Option<String>) -> Option<String> {
    not_whole.filter(|_| !ctx.jobs.writing_output(vm) && !ctx.plans.at_vm(vm))
}

/// A reprotected VM whose last failback of this reprotect failed once it had asked the
/// recovered VM to shut down (a process server killed midway, a final pass or drain cut
/// short): the recovered VM may be off, and with `--sync during` the target disks may be
/// half written (W16: status said normal while the primary image's database was torn).
/// Said until a failback succeeds, the reprotect is cancelled (or made anew), or a failback
/// drill succeeds on a fresh point of the recovered VM made after the cut (it runs). Read
/// from the jobs kept in the catalog (30 days, at most 50 of a kind per VM).
fn failback_cut_short(ctx: &Ctx, vm: &VmName) -> Option<String> {
    use tern_core::{JobKind, JobState};
    if !ctx.store.vm_state(vm).is_ok_and(|s| s == VmState::Reprotected)
        || crate::lock(&ctx.failing_back).contains(vm)
    {
        return None;
    }
    let row = ctx.store.reprotect(vm).ok().flatten()?;
    // This reprotect's jobs only: it began when its identity was issued (to the second).
    let since =
        ctx.identities.list().iter().find(|r| r.info.serial == row.identity).map_or(0, |r| r.info.issued_ms);
    let jobs = ctx.store.jobs().ok()?;
    let ours = |j: &&tern_store::JobRow| j.vm == vm.as_str() && j.started_ms >= since;
    // A failback refused before the shutdown was asked for changed nothing.
    let before_shutdown = |phase: &str| crate::failback::BEFORE_SHUTDOWN.contains(&phase);
    let last = jobs
        .iter()
        .filter(ours)
        .filter(|j| j.kind == JobKind::Failback && !before_shutdown(&j.phase))
        .max_by_key(|j| j.id)?;
    if last.state != JobState::Failed {
        return None;
    }
    let runs_again = jobs.iter().filter(ours).any(|j| {
        j.kind == JobKind::FailbackDrill
            && j.id > last.id
            && j.state == JobState::Succeeded
            && <tern_proto::JobOutput as prost::Message>::decode(j.output.as_slice())
                .is_ok_and(|o| o.time_ms > last.ended_ms)
    });
    if runs_again {
        return None;
    }
    let (torn, stay) = if row.sync == SyncMode::During {
        (
            "; the target disks may hold part old and part new data: do not start the primary VM from them",
            format!("`drctl reprotect-cancel {vm}`"),
        )
    } else {
        ("", format!("start the recovered VM again and run `drctl failback {vm} --drill`"))
    };
    Some(format!(
        "the failback (job {}) was cut short in phase \"{}\" ({}): the recovered VM may be shut down{torn}; \
         run `drctl failback {vm}` again (its shutdown hook must succeed on a VM already off), or, to stay on \
         the recovery site, {stay}",
        last.id, last.phase, last.error
    ))
}

/// Logs every change of a VM's health, every few seconds.
pub async fn health_worker(ctx: Arc<Ctx>) {
    let mut last: HashMap<VmName, Health> = HashMap::new();
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let c = ctx.clone();
        let now = tokio::task::spawn_blocking(move || {
            let vms = c.store.vms().unwrap_or_default();
            vms.into_iter().filter_map(|vm| vm_health(&c, &vm).ok().map(|h| (vm, h))).collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (vm, h) in now {
            let before = last.insert(vm.clone(), h);
            if before.is_some_and(|b| b != h) || (before.is_none() && h != Health::Normal) {
                let was = before.map_or("unknown", Health::as_str);
                if h == Health::Normal {
                    info!(vm = %vm, health = %h, was, "RPO health changed");
                } else {
                    warn!(vm = %vm, health = %h, was, "RPO health changed");
                }
            }
        }
    }
}

/// Applies each VM's retention window at `every`; backs off on errors.
pub async fn retention_worker(ctx: Arc<Ctx>, every: Duration) {
    let mut wait = every;
    // When each VM's journals over its bound were last said (once an hour at most).
    let over_said: Arc<std::sync::Mutex<HashMap<VmName, std::time::Instant>>> = Arc::default();
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let c = ctx.clone();
        let over_said = over_said.clone();
        let failed = tokio::task::spawn_blocking(move || {
            let mut failed = false;
            for vm in c.store.vms().unwrap_or_default() {
                // Only while the journal is this site's own: a reprotected VM's journal is the
                // spool for the master target and is kept whole until failback.
                if !c.store.vm_state(&vm).is_ok_and(|s| matches!(s, VmState::Protected | VmState::FailedOver))
                    || c.store.damaged(&vm).is_some()
                {
                    crate::lock(&c.retention_errors).remove(&vm);
                    continue;
                }
                let now = tern_store::now_ms();
                match c.store.apply_retention(&vm, now) {
                    Ok(report) => {
                        let mut said = crate::lock(&over_said);
                        match report.over_bound {
                            Some(bytes) if said.get(&vm).is_none_or(|at| at.elapsed() >= Duration::from_secs(3600)) => {
                                warn!(vm = %vm, journal_bytes = bytes,
                                    "the VM's journals stay over its policy's bound (--max-journal): the newest \
                                     point, its newest multi-VM point, or one a failover, test failover or plan \
                                     keeps holds them; they go once later points are made, or raise the bound");
                                said.insert(vm.clone(), std::time::Instant::now());
                            }
                            Some(_) => {}
                            None => {
                                said.remove(&vm);
                            }
                        }
                        drop(said);
                        crate::lock(&c.retention_errors).remove(&vm);
                        crate::lock(&c.retention_runs).insert(vm, now);
                    }
                    Err(e) => {
                        warn!(vm = %vm, error = %e, "retention failed; retrying later");
                        crate::lock(&c.retention_errors).insert(vm, format!("retention: {e}"));
                        failed = true;
                    }
                }
            }
            failed
        })
        .await
        .unwrap_or(true);
        // Backs off, but not far: a pass that failed for want of space goes again soon after
        // space is freed.
        wait = if failed { (wait * 2).min(every.max(Duration::from_secs(60))) } else { every };
    }
}

/// What is wrong with a VM beyond its RPO, most lasting first: its stored data could not
/// be opened, replication is failing on this side, its initial sync has not got further for
/// longer than the RPO threshold while its sessions keep ending, retention cannot fold its journal (a
/// full data directory), or the scrub found a point that does not recover. Any of them
/// makes the VM critical.
pub fn problem(ctx: &Ctx, vm: &VmName) -> Option<String> {
    let p = ctx
        .store
        .damaged(vm)
        .map(|d| format!("stored data damaged: {d}"))
        .or_else(|| ctx.store.journal_damage(vm))
        // Replication's failure is no news once the VM no longer replicates (failed over).
        .or_else(|| {
            ctx.hub.error(vm).filter(|_| ctx.store.vm_state(vm).map_or(true, |s| s.takes_replication()))
        })
        .or_else(|| {
            // Not while the VM takes no replication, nor while a `--sync during` reprotect
            // holds the agent until the failback (it sends nothing meanwhile, by design).
            let replicates = ctx.store.vm_state(vm).is_ok_and(|s| s.takes_replication());
            let held = ctx.store.reprotect(vm).is_ok_and(|r| r.is_some_and(|r| r.sync == SyncMode::During));
            let threshold = ctx.store.policy(vm).map_or(300_000, |p| p.rpo_threshold_ms);
            let threshold = std::time::Duration::from_millis(u64::try_from(threshold).unwrap_or(0));
            (replicates && !held).then(|| ctx.initial_syncs.stalled(vm, threshold)).flatten()
        })
        .or_else(|| crate::lock(&ctx.retention_errors).get(vm).cloned())
        .or_else(|| {
            ctx.scrub
                .failure(vm, |point| ctx.store.points(vm).is_ok_and(|ps| ps.iter().any(|p| p.id.0 == point)))
        })
        .or_else(|| failback_cut_short(ctx, vm))?;
    // A full data directory that retention cannot free for a pinned point: shortening a
    // retention window does nothing then, freeing the pin does.
    if p.contains("storage is full")
        && let Ok(holds) = ctx.store.retention_holds()
        && !holds.is_empty()
    {
        return Some(format!("{p}; retention is held back: {}", holds.join("; ")));
    }
    Some(p)
}
