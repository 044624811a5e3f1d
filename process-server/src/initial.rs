//! A VM's initial sync (its replication until the first point) is followed as one job from
//! its first session to the first point, across the sessions that a dropping link or a
//! restarted agent cuts it into: between two, the job waits for the agent with its progress
//! kept. It used to be one job per session, each failed at its end, with the progress
//! starting again from 0 (W15: 9 failed jobs in 40 s on a link reset every 4 s).

use crate::Ctx;
use crate::jobs::Job;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_core::{DiskName, VmName, VmState};
use tonic::Status;

/// A running initial sync.
#[derive(Debug)]
pub struct Sync {
    job: Job,
    /// How far each disk has come: a scan sends records in offset order, so the highest
    /// end offset any record reached.
    ends: HashMap<DiskName, u64>,
    /// When the sync last got further.
    advanced_at: Instant,
    /// Sessions that ended since then, and why the last did.
    cuts: u32,
    last_cut: String,
    /// The VM's state when the sync started: a sync of another state (a reprotect after
    /// a cancelled one) is another sync.
    state: VmState,
    /// This session's pass, per disk: how far it has read. A pass that reads on is not
    /// stuck, even below where an earlier session came (it reads again from the start
    /// and compares).
    pass_at: HashMap<DiskName, u64>,
}

/// The sync a session goes on with (`None` inside once the VM has a point).
pub type InitialSync = Arc<Mutex<Option<Sync>>>;

/// Each VM's initial sync that has not made its point yet.
#[derive(Debug, Default)]
pub struct InitialSyncs {
    by_vm: Mutex<HashMap<VmName, InitialSync>>,
}

fn lock_sync(i: &InitialSync) -> std::sync::MutexGuard<'_, Option<Sync>> {
    crate::lock(i)
}

/// Until the VM's first point its replication is an initial sync: the one running goes on,
/// else a new job starts.
pub async fn join(ctx: &Arc<Ctx>, vm: &VmName) -> Result<InitialSync, Status> {
    let store = ctx.store.clone();
    let v = vm.clone();
    let (has_points, state) = crate::admin::blocking(move || {
        Ok::<_, tern_store::StoreError>((store.latest_point(&v)?.is_some(), store.vm_state(&v)?))
    })
    .await?
    .map_err(crate::store_status)?;
    if has_points {
        crate::lock(&ctx.initial_syncs.by_vm).remove(vm);
        return Ok(Arc::new(Mutex::new(None)));
    }
    let running = crate::lock(&ctx.initial_syncs.by_vm).get(vm).cloned();
    if let Some(sync) = running {
        let job = lock_sync(&sync).as_ref().map(|s| (s.job.clone(), s.state));
        match job {
            Some((job, was)) if was == state => {
                job.phase_keeping_progress("sending the disks").await;
                return Ok(sync);
            }
            Some((job, was)) => {
                lock_sync(&sync).take();
                job.fail(&format!(
                    "the VM was {was} when this sync started and is {state} now; another follows"
                ))
                .await;
            }
            None => {}
        }
    }
    let job = ctx.jobs.start(tern_core::JobKind::InitialSync, vm).await.inspect_err(|e| {
        tracing::warn!(vm = %vm, error = %e.message(), "replication session refused");
        ctx.hub.fail_session(vm, e.message());
    })?;
    job.phase("sending the disks").await;
    let sync = Arc::new(Mutex::new(Some(Sync {
        job,
        ends: HashMap::new(),
        advanced_at: Instant::now(),
        cuts: 0,
        last_cut: String::new(),
        state,
        pass_at: HashMap::new(),
    })));
    crate::lock(&ctx.initial_syncs.by_vm).insert(vm.clone(), sync.clone());
    Ok(sync)
}

/// A batch arrived: the job's progress is the sum over disks of how far each has come.
pub fn note_progress(initial: &InitialSync, sizes: impl Iterator<Item = u64>, b: &tern_proto::Batch) {
    let mut guard = lock_sync(initial);
    let Some(s) = guard.as_mut() else { return };
    let Ok(name) = DiskName::new(&b.disk) else { return };
    let end = b.records.iter().map(|r| r.offset + u64::from(r.length)).max().unwrap_or(0);
    s.advance(name, end);
    s.job.progress(s.ends.values().sum(), sizes.sum());
}

impl Sync {
    /// `disk` has come to `end`: further than before, the sync is not stuck.
    fn advance(&mut self, disk: DiskName, end: u64) {
        let e = self.ends.entry(disk).or_default();
        if end > *e {
            *e = end;
            self.advanced_at = Instant::now();
            self.cuts = 0;
        }
    }
}

/// A long pass says how far it has read each disk: a sync that compares (with the server's
/// hashes, or a saved state) reads far ahead of the records it sends, and is not stuck.
pub fn note_pass(initial: &InitialSync, sizes: impl Iterator<Item = u64>, t: &tern_proto::Tracking) {
    let mut guard = lock_sync(initial);
    let Some(s) = guard.as_mut() else { return };
    for d in &t.disks {
        let Ok(name) = DiskName::new(&d.disk) else { continue };
        let at = s.pass_at.entry(name.clone()).or_default();
        if d.pass_offset > *at {
            *at = d.pass_offset;
            (s.advanced_at, s.cuts) = (Instant::now(), 0);
        }
        s.advance(name, d.pass_offset);
    }
    s.job.progress(s.ends.values().sum(), sizes.sum());
}

/// The first point is made: the job succeeds with it.
pub async fn point_made(initial: &InitialSync, output: tern_proto::JobOutput) {
    let taken = lock_sync(initial).take();
    if let Some(s) = taken {
        s.job.succeed(output).await;
    }
}

/// A session ended before the first point: the job waits for the next one, saying why
/// this one ended, unless the VM takes no replication now (a reprotect cancelled, a VM
/// failed over meanwhile): then it fails.
pub async fn session_ended(ctx: &Arc<Ctx>, vm: &VmName, initial: &InitialSync, why: String) {
    if lock_sync(initial).is_none() {
        return;
    }
    let (store, v) = (ctx.store.clone(), vm.clone());
    let state = crate::admin::blocking(move || store.vm_state(&v)).await.ok().and_then(Result::ok);
    let job = {
        let mut guard = lock_sync(initial);
        let Some(s) = guard.as_mut() else { return };
        s.cuts += 1;
        s.last_cut.clone_from(&why);
        s.pass_at.clear();
        s.job.clone()
    };
    match state {
        Some(s) if !s.takes_replication() => {
            lock_sync(initial).take();
            crate::lock(&ctx.initial_syncs.by_vm).remove(vm);
            let end = format!(
                "{why} before the first point; the VM is {s} now and takes no replication, so no initial sync follows"
            );
            job.fail(&end).await;
        }
        _ => job.phase_keeping_progress(&format!("waiting for the agent to reconnect ({why})")).await,
    }
}

impl InitialSyncs {
    /// A VM's copy is removed: its sync, waiting for an agent, ends.
    pub async fn abandon(&self, vm: &VmName, why: &str) {
        let Some(sync) = crate::lock(&self.by_vm).remove(vm) else { return };
        let taken = lock_sync(&sync).take();
        if let Some(s) = taken {
            s.job.fail(why).await;
        }
    }

    /// Why `vm`'s initial sync is stuck: it has not got further for longer than
    /// `threshold` while its sessions keep ending (a single long session that reads a
    /// large empty disk sends nothing for a while, and is not stuck).
    pub fn stalled(&self, vm: &VmName, threshold: Duration) -> Option<String> {
        let sync = crate::lock(&self.by_vm).get(vm).cloned()?;
        let guard = lock_sync(&sync);
        let s = guard.as_ref()?;
        let idle = s.advanced_at.elapsed();
        (s.cuts > 0 && idle > threshold).then(|| {
            format!(
                "the initial sync has not got further for {} s: {} session(s) ended since (the last: {})",
                idle.as_secs(),
                s.cuts,
                s.last_cut
            )
        })
    }
}
