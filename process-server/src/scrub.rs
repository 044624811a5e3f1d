//! The background scrub: re-verifies recovery points from the store (as `drctl verify`
//! does), newest first, at a bounded read rate, so that a point that no longer recovers
//! (bit rot, a damaged segment) turns its VM critical, naming the point, instead of being
//! found at failover time.

use crate::{Ctx, lock};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tern_core::{VmName, VmState};
use tern_store::PointSpec;
use tracing::{error, info, warn};

#[derive(Debug, Clone, Copy)]
pub struct ScrubConfig {
    /// Time between the start of two rounds; zero turns the scrub off.
    pub every: Duration,
    /// Bytes of disk verified per second, on average: each point is read at full speed,
    /// then the scrub pauses until the rate is kept.
    pub rate: u64,
}

/// Per VM, a point found not to recover and why.
type Marks = HashMap<VmName, (u64, String)>;

/// The points the last scrub found broken, per VM. Kept in `DATA_DIR/scrub.json` too: a
/// point found not to recover stays said across a restart of the server (W18-B: the VM
/// went back to normal, and the next round came only after `--scrub-every`).
#[derive(Debug, Default)]
pub struct Scrub {
    /// Where they are kept (none in tests).
    path: Option<std::path::PathBuf>,
    /// The first point the last round found broken, per VM, and why.
    failures: Mutex<Marks>,
    /// Held while the marks are written: one writer at a time, the newest marks last.
    saving: Mutex<()>,
    /// The point a `drctl verify` found broken, per VM, and why: it holds until a verify of
    /// that point passes, the point is no longer listed, or a scrub round finds every
    /// point recovering.
    verified: Mutex<Marks>,
}

/// `scrub.json`'s layout.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Kept {
    failures: HashMap<String, (u64, String)>,
    verified: HashMap<String, (u64, String)>,
}

impl Scrub {
    /// The marks kept in `data_dir` by the last run (none when there are none, or they
    /// cannot be read: the next round finds them again).
    pub fn open(data_dir: &std::path::Path) -> Scrub {
        let path = data_dir.join("scrub.json");
        let kept: Kept = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                warn!(path = %path.display(), error = %e, "the scrub's marks cannot be read; the next round finds them again");
                Kept::default()
            }),
            Err(_) => Kept::default(),
        };
        fn named<T>(m: HashMap<String, T>) -> HashMap<VmName, T> {
            m.into_iter().filter_map(|(v, x)| VmName::new(&v).ok().map(|v| (v, x))).collect()
        }
        Scrub {
            failures: Mutex::new(named(kept.failures)),
            verified: Mutex::new(named(kept.verified)),
            path: Some(path),
            saving: Mutex::new(()),
        }
    }

    /// Keeps the marks as they are now (best effort: a full data directory shows as itself).
    fn save(&self) {
        let Some(path) = &self.path else { return };
        let _one = lock(&self.saving);
        let kept = Kept {
            failures: lock(&self.failures).iter().map(|(v, s)| (v.to_string(), s.clone())).collect(),
            verified: lock(&self.verified).iter().map(|(v, s)| (v.to_string(), s.clone())).collect(),
        };
        let written = serde_json::to_vec(&kept)
            .map_err(|e| e.to_string())
            .and_then(|b| tern_store::durable::publish(path, &b).map_err(|e| e.to_string()));
        if let Err(e) = written {
            warn!(path = %path.display(), error = %e, "cannot keep the scrub's marks");
        }
    }

    /// Why the scrub, or a `drctl verify`, marks `vm` critical, if either does; `listed`
    /// tells whether a point is still listed.
    pub fn failure(&self, vm: &VmName, listed: impl Fn(u64) -> bool) -> Option<String> {
        self.mark(&self.failures, vm, &listed).or_else(|| self.mark(&self.verified, vm, &listed))
    }

    /// Why `marks` (the scrub's or a verify's) marks `vm` critical, if its point is still
    /// listed; a mark of a point pruned since (or removed) is dropped and the change saved,
    /// as nothing is left of that point to fail over to.
    fn mark(&self, marks: &Mutex<Marks>, vm: &VmName, listed: &impl Fn(u64) -> bool) -> Option<String> {
        let (point, why) = lock(marks).get(vm)?.clone();
        if listed(point) {
            return Some(why);
        }
        let mut m = lock(marks);
        if m.get(vm).is_some_and(|(p, _)| *p == point) {
            m.remove(vm);
            drop(m);
            self.save();
        }
        None
    }

    /// The VM was removed: what was found about its points goes with them.
    pub fn forget(&self, vm: &VmName) {
        lock(&self.failures).remove(vm);
        lock(&self.verified).remove(vm);
        self.save();
    }

    /// What a `drctl verify` of `point` found: `Some(problem)` marks the VM critical, `None`
    /// (it recovers) clears a mark of that point.
    pub fn verified(&self, vm: &VmName, point: u64, problem: Option<String>) {
        let mut verified = lock(&self.verified);
        match problem {
            Some(p) => {
                verified.insert(vm.clone(), (point, format!("verify: point {point} does not recover: {p}")));
            }
            None => {
                if verified.get(vm).is_some_and(|(p, _)| *p == point) {
                    verified.remove(vm);
                }
            }
        }
        drop(verified);
        self.save();
    }
}

/// States in which a VM's points are the store's own and worth checking.
const SCRUBBED_STATES: &[VmState] = &[VmState::Protected, VmState::Reprotected, VmState::FailedOver];

pub async fn scrub_worker(ctx: Arc<Ctx>, config: ScrubConfig) {
    if config.every.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(config.every) => {}
        }
        let vms = {
            let c = ctx.clone();
            tokio::task::spawn_blocking(move || c.store.vms().unwrap_or_default()).await.unwrap_or_default()
        };
        for vm in vms {
            if !scrub_vm(&ctx, &vm, config).await {
                return;
            }
        }
    }
}

/// Verifies the points of one VM, newest first. False once the server is shutting down.
async fn scrub_vm(ctx: &Arc<Ctx>, vm: &VmName, config: ScrubConfig) -> bool {
    let c = ctx.clone();
    let v = vm.clone();
    let points = tokio::task::spawn_blocking(move || {
        let state = c.store.vm_state(&v).ok()?;
        SCRUBBED_STATES.contains(&state).then(|| c.store.points(&v).ok()).flatten()
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_default();
    let mut broken = None;
    for p in points.iter().rev() {
        if ctx.shutdown.is_cancelled() {
            return false;
        }
        let started = tokio::time::Instant::now();
        let c = ctx.clone();
        let (v, id) = (vm.clone(), p.id);
        let verdict = tokio::task::spawn_blocking(move || c.store.verify(&v, &PointSpec::Id(id))).await;
        let problem = match verdict {
            Ok(Ok((_, disks))) => disks.iter().find(|d| !d.ok).map(|d| {
                format!("disk {} has fingerprint {}, the point says {}", d.name, d.actual, d.expected)
            }),
            // Pruned or committed meanwhile: nothing to say.
            Ok(Err(tern_store::StoreError::PointNotFound { .. })) => None,
            // No room for the scratch copy: nothing is known against the point (the full data
            // directory shows as itself, in replication and retention).
            Ok(Err(e)) if e.is_storage_full() => {
                warn!(vm = %vm, point = %id, error = %e,
                    "scrub: no room in the data directory to rebuild the point; it is checked next round");
                None
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        // Retention may have pruned the point while it was read: only a point still listed
        // can be broken.
        let listed = {
            let c = ctx.clone();
            let v = vm.clone();
            tokio::task::spawn_blocking(move || {
                c.store.points(&v).is_ok_and(|ps| ps.iter().any(|p| p.id == id))
            })
            .await
            .unwrap_or(true)
        };
        if let Some(problem) = problem.filter(|_| listed) {
            error!(vm = %vm, point = %id, problem = %problem, "scrub: a recovery point does not recover");
            let b = broken
                .get_or_insert_with(|| (id.0, format!("scrub: point {id} does not recover: {problem}")));
            // Shown at once, not after the whole round.
            lock(&ctx.scrub.failures).insert(vm.clone(), b.clone());
            ctx.scrub.save();
        }
        // The rate bounds how fast the scrub reads the store, whatever the disk sizes.
        let bytes: u64 = ctx.store.point_disks(vm, p).map_or(0, |hs| hs.iter().map(|h| h.size).sum());
        let budget = Duration::from_secs_f64(bytes as f64 / config.rate.max(1) as f64);
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return false,
            _ = tokio::time::sleep_until(started + budget) => {}
        }
    }
    let mut failures = lock(&ctx.scrub.failures);
    let changed = match broken {
        Some(b) => failures.insert(vm.clone(), b.clone()).as_ref() != Some(&b),
        None => {
            let was_verified = lock(&ctx.scrub.verified).remove(vm).is_some();
            if failures.remove(vm).is_some() {
                info!(vm = %vm, "scrub: every point recovers again");
                true
            } else {
                if !points.is_empty() {
                    tracing::debug!(vm = %vm, points = points.len(), "scrub: every point recovers");
                }
                was_verified
            }
        }
    };
    drop(failures);
    if changed {
        ctx.scrub.save();
    }
    true
}
