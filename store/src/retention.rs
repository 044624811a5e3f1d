//! Retention: points older than the policy's window are pruned, the journal records behind
//! the oldest kept point are folded into the base image, and whole segments behind it are
//! deleted. Order, so that a crash anywhere is harmless:
//! 1. delete the pruned points from the catalog (nothing may materialise them any more);
//! 2. mark the disk's `base.seq` with the new position (a catalog rebuild takes no point
//!    older than it);
//! 3. apply records (base, oldest kept] to the base image and fsync it;
//! 4. move the catalog's base position;
//! 5. delete the segments wholly behind it.
//!
//! Steps 3 to 5 go one segment at a time, so that a fold on a full file system needs room
//! for one segment's data (the space reserve, [`crate::reserve`]), not the whole range's.
//!
//! Replay is idempotent, so an interrupted step 3 or 4 is simply done again. A point pinned
//! by an open test failover, an uncommitted failover or a recovery plan's unfinished
//! operation is never pruned nor passed.

use crate::durable::io_err;
use crate::materialize::apply_records;
use crate::{DiskHandle, Store, StoreError, failpoint};
use tern_core::{PointId, Seq, VmName};

/// The point a plan's run (the process server's JSON in `plans.run`) holds for `vm`: its
/// chosen point, or its final point at a failback, while the run is not done and has not
/// finished `vm`. A run that cannot be read pins nothing. (The process server's plan
/// module tests that its runs read so.)
pub fn plan_run_pins(run: &str, vm: &str) -> Vec<u64> {
    let Ok(run) = serde_json::from_str::<serde_json::Value>(run) else { return Vec::new() };
    let finished = run["state"] == "done"
        || run["done"].as_array().is_some_and(|d| d.iter().any(|v| v.as_str() == Some(vm)));
    if finished {
        return Vec::new();
    }
    ["points", "finals"].iter().filter_map(|k| run[k][vm].as_u64()).collect()
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RetentionReport {
    pub pruned: Vec<PointId>,
    /// Of `pruned`, those still within the retention window, pruned to keep the VM's
    /// journals within the policy's bound.
    pub ahead_of_window: usize,
    /// The bytes the VM's journals keep when that is still over the policy's bound (the
    /// newest point, or a pinned one, holds them).
    pub over_bound: Option<u64>,
    pub segments_deleted: usize,
}

impl Store {
    /// Points that must stay: the open test failover's, the uncommitted failover's, and
    /// those a recovery plan's unfinished operation chose for VMs it has not reached yet
    /// (a plan waiting at a manual step, or stopped by a failed action, goes on with them).
    /// What keeps retention from pruning points past their window, across the VMs: each
    /// pin whose point is older than its VM's retention, with what frees it. For a full
    /// data directory's message.
    pub fn retention_holds(&self) -> Result<Vec<String>, StoreError> {
        let c = self.catalog();
        let now = crate::now_ms();
        let mut holds = Vec::new();
        for vm in c.vms()? {
            let cutoff = now - c.policy(&vm)?.retention_ms;
            let old = |id: PointId| -> Result<bool, StoreError> {
                Ok(c.point(&vm, id)?.is_some_and(|p| p.time_ms < cutoff))
            };
            if let Some(t) = c.test_failover(&vm)?
                && old(t.point)?
            {
                holds.push(format!(
                    "VM {vm}'s open test failover keeps point {} (`drctl test-failover-cleanup {vm}` frees it)",
                    t.point
                ));
            }
            if let Some(f) = c.failover(&vm)?
                && old(f.point)?
            {
                holds.push(format!(
                    "VM {vm} is failed over to point {} (`drctl commit {vm}` frees it)",
                    f.point
                ));
            }
            for plan in c.plans()? {
                for id in plan_run_pins(&plan.run, vm.as_str()) {
                    if old(PointId(id))? {
                        holds.push(format!(
                            "plan {}'s unfinished operation keeps point {id} of VM {vm} (`drctl plan continue {0}` \
                             or `drctl plan cancel {0}` and another operation frees it)",
                            plan.name
                        ));
                    }
                }
            }
        }
        Ok(holds)
    }

    pub fn pinned_points(&self, vm: &VmName) -> Result<Vec<PointId>, StoreError> {
        let c = self.catalog();
        let mut pins = Vec::new();
        if let Some(t) = c.test_failover(vm)? {
            pins.push(t.point);
        }
        if let Some(f) = c.failover(vm)? {
            pins.push(f.point);
        }
        for plan in c.plans()? {
            pins.extend(plan_run_pins(&plan.run, vm.as_str()).into_iter().map(PointId));
        }
        Ok(pins)
    }

    /// One retention pass over `vm` at time `now_ms`. When the data directory is full, the
    /// space reserve is given up and the pass tried again: its fold needs room before it
    /// frees any.
    pub fn apply_retention(&self, vm: &VmName, now_ms: i64) -> Result<RetentionReport, StoreError> {
        self.reserve.recheck();
        let report = match self.retention_pass(vm, now_ms) {
            Err(e)
                if e.is_storage_full()
                    && self.reserve.release("so that retention can fold the journal and free space")? =>
            {
                self.retention_pass(vm, now_ms)
            }
            done => done,
        }?;
        if !self.reserve.held()
            && let Err(e) = self.reserve.take()
        {
            tracing::warn!(error = %e, "the space reserve cannot be set aside again yet");
        }
        Ok(report)
    }

    /// Which of `points` (oldest first) retention prunes now: those past the window, and
    /// within it as many as the bound on the journals needs; never a pinned point, the
    /// newest one, nor (for the bound) the newest multi-VM one. `None` without points.
    fn choose_pruned(
        &self,
        vm: &VmName,
        policy: &crate::catalog::Policy,
        points: &[crate::catalog::Point],
        now_ms: i64,
    ) -> Result<Option<RetentionReport>, StoreError> {
        let pins = self.pinned_points(vm)?;
        let mut report = RetentionReport::default();
        let Some((_newest, older)) = points.split_last() else { return Ok(None) };
        let cutoff = now_ms - policy.retention_ms;
        let bound = u64::try_from(policy.max_journal_bytes).unwrap_or(0);
        // A point's age for the window: no later than any point after it, nor than now. A
        // point an agent with a wrong clock dated in the future (before the server dated
        // points itself) would otherwise stay inside the window for good, and every point
        // after it with it.
        let mut aged: Vec<i64> = points.iter().map(|p| p.time_ms).collect();
        let mut later = now_ms;
        for t in aged.iter_mut().rev() {
            later = later.min(*t);
            *t = later;
        }
        // What the VM's journals would hold once folded up to `p`: a disk `p` does not cover
        // (added since) keeps all of its journal.
        let handles = self.vm_disks(vm);
        let kept = |p: &crate::catalog::Point| -> u64 {
            handles
                .iter()
                .map(|h| match p.disks.iter().find(|pd| pd.disk == h.name) {
                    Some(pd) => h.journal().bytes_kept_after_fold(pd.seq),
                    None => h.journal().bytes(),
                })
                .sum()
        };
        // The bound does not take the VM's newest multi-VM point: its group could no longer
        // fail over together.
        let newest_group = points.iter().rev().find(|p| p.group.is_some()).map(|p| p.id);
        // The newest point is always kept: a VM whose agent went quiet keeps a point to fail
        // over to. Within the window, a point goes only while the journals would hold more
        // than the bound with it the oldest.
        for (p, &age) in older.iter().zip(&aged) {
            if pins.contains(&p.id) {
                break;
            }
            if age >= cutoff {
                if bound == 0 || Some(p.id) == newest_group || kept(p) <= bound {
                    break;
                }
                report.ahead_of_window += 1;
            }
            report.pruned.push(p.id);
        }
        if bound > 0 {
            let oldest = &points[report.pruned.len()];
            report.over_bound = Some(kept(oldest)).filter(|&k| k > bound);
        }
        Ok(Some(report))
    }

    fn retention_pass(&self, vm: &VmName, now_ms: i64) -> Result<RetentionReport, StoreError> {
        // A VM whose data could not be opened keeps every point until it is repaired.
        if let Some(reason) = self.damaged(vm) {
            return Err(StoreError::VmDamaged { vm: vm.clone(), reason: reason.to_string() });
        }
        // Nor one with a damaged journal record: the points before the damage may be the only
        // ones that recover, and a fold would stop at the damage anyway.
        if let Some(reason) = self.journal_damage(vm) {
            return Err(StoreError::JournalDamaged { vm: vm.clone(), reason });
        }
        let (policy, points) = {
            let c = self.catalog();
            (c.policy(vm)?, c.points(vm)?)
        };
        let Some(mut report) = self.choose_pruned(vm, &policy, &points, now_ms)? else {
            return Ok(RetentionReport::default());
        };
        let bound = u64::try_from(policy.max_journal_bytes).unwrap_or(0);
        if !report.pruned.is_empty() {
            // The records the fold needs are read (and checked) before any point goes: a
            // damaged one found by the fold itself would come after the only points that
            // recover were pruned.
            let keep = &points[report.pruned.len()];
            for pd in &keep.disks {
                let Some(h) = self.disk(vm, &pd.disk) else { continue };
                let snapshot = h.journal().snapshot();
                for rec in snapshot.read_range(h.base_seq(), pd.seq) {
                    if let Err(e) = rec {
                        h.note_damage(&e);
                        return Err(match self.journal_damage(vm) {
                            Some(reason) => StoreError::JournalDamaged { vm: vm.clone(), reason },
                            None => e,
                        });
                    }
                }
            }
            self.catalog().delete_points(vm, &report.pruned)?;
            if report.ahead_of_window > 0 {
                let left = &points[report.pruned.len()];
                tracing::info!(vm = %vm, points = report.pruned.len(), within_window = report.ahead_of_window,
                    max_journal_bytes = bound, oldest_kept = left.id.0,
                    oldest_kept_age_s = (now_ms - left.time_ms) / 1000,
                    "points pruned ahead of the retention window, to keep the VM's journals within the policy's bound");
            } else {
                tracing::info!(vm = %vm, points = report.pruned.len(), "points older than the retention window pruned");
            }
        }
        if let Some(bytes) = report.over_bound {
            // Said by the retention worker, once an hour at most.
            tracing::debug!(vm = %vm, journal_bytes = bytes, max_journal_bytes = bound,
                "the VM's journals stay over the policy's bound");
        }
        failpoint("retention-after-prune")?;
        let oldest = &points[report.pruned.len()];
        for pd in &oldest.disks {
            let Some(h) = self.disk(vm, &pd.disk) else { continue };
            report.segments_deleted += self.advance_base(&h, pd.seq)?;
            if h.base_seq() == pd.seq {
                // Best effort: what it frees is folded already, and a segment it cannot read
                // (a damaged header) must not stop retention of the VM's other disks.
                let _exclusive = h.write_lock();
                match h.journal().retire_folded(pd.seq, oldest.id.0) {
                    Ok(0) => {}
                    Ok(retired) => {
                        tracing::info!(vm = %vm, disk = %h.name, segments = retired, base_seq = %pd.seq,
                            "the base image holds every record: the journal starts a segment anew");
                        report.segments_deleted += retired;
                    }
                    Err(e) => tracing::warn!(vm = %vm, disk = %h.name, error = %e,
                        "the journal's folded segments could not be retired; retention tries again"),
                }
            }
        }
        Ok(report)
    }

    /// Folds the records up to `seq` into the base image and deletes the segments behind
    /// it. Returns the number of segments deleted.
    ///
    /// It goes one segment at a time, deleting each as soon as the base holds its records:
    /// a fold then needs free space for about one segment's data, however far it goes.
    pub fn advance_base(&self, h: &DiskHandle, seq: Seq) -> Result<usize, StoreError> {
        let _exclusive = h.write_lock();
        let mut deleted = h.journal().delete_segments_through(h.base_seq())?;
        let base = h.base_seq();
        if seq > base {
            // First the mark that the base may hold records up to `seq`: a catalog rebuilt
            // after a crash in the middle of the fold must not bring back a point before it.
            crate::rebuild::mark_base(&self.root, &h.vm, &h.name, seq)?;
            let f = tern_core::disk::open_for_write(&h.base_path).map_err(io_err(&h.base_path))?;
            let mut from = base;
            let steps = h.journal().fold_steps(base, seq);
            for to in steps {
                let snapshot = h.journal().snapshot();
                apply_records(h, &snapshot, from, to, &f, &h.base_path, &mut |_| {})?;
                f.sync_all().map_err(io_err(&h.base_path))?;
                failpoint("retention-after-base-write")?;
                self.catalog().set_base_seq(&h.vm, &h.name, to)?;
                *h.base_seq.lock().unwrap_or_else(|p| p.into_inner()) = to;
                failpoint("retention-after-catalog")?;
                deleted += h.journal().delete_segments_through(to)?;
                failpoint("retention-after-segment")?;
                from = to;
            }
        }
        if deleted > 0 {
            tracing::info!(vm = %h.vm, disk = %h.name, segments = deleted, base_seq = %h.base_seq(),
                "journal segments folded into the base image and deleted");
        }
        Ok(deleted)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
pub(crate) mod tests {
    use crate::catalog::Policy;
    use crate::{Consistency, PointDisk, PointSpec, Store, StoreError, StoreOptions, set_failpoint};
    use tern_core::blocks::Fingerprint;
    use tern_core::{DiskName, Seq, VmName};

    const SIZE: usize = 1 << 20;

    use crate::test_record as write;
    use std::path::{Path, PathBuf};

    /// A store with six points at times 0..=5 s, each after writes to its own pages,
    /// segments of 8 KiB so that retention has whole segments to delete.
    pub(crate) fn setup(root: &std::path::Path) -> (Store, VmName) {
        let store =
            Store::open_with(root, StoreOptions { segment_bytes: Some(8192), ..Default::default() }).unwrap();
        let vm = VmName::new("vm").unwrap();
        let d = DiskName::new("sda").unwrap();
        let h = store.register(&vm, &[(d.clone(), SIZE as u64)]).unwrap().remove(0);
        let mut image = vec![0u8; SIZE];
        let mut seq = 0u64;
        for t in 0..6u64 {
            for k in 0..4u64 {
                let off = ((t * 4 + k) * 4096 * 3) as usize % (SIZE - 4096);
                let mut page = vec![0u8; 4096];
                blake3::Hasher::new().update(&[t as u8, k as u8]).finalize_xof().fill(&mut page);
                image[off..off + 4096].copy_from_slice(&page);
                seq += 1;
                h.journal().append(Seq(seq), &[write(&page, off as u64)]).unwrap();
            }
            h.journal().sync().unwrap();
            let mut fp = Fingerprint::new();
            fp.push_data(&image);
            store
                .make_point(
                    &vm,
                    (t * 1000) as i64,
                    Consistency::Crash,
                    "",
                    vec![PointDisk { disk: d.clone(), seq: Seq(seq), fingerprint: fp.finish() }],
                )
                .unwrap();
        }
        store.catalog().set_policy(&vm, &Policy { retention_ms: 2500, ..Policy::default() }).unwrap();
        (store, vm)
    }

    pub(crate) fn all_points_verify(store: &Store, vm: &VmName) -> usize {
        let points = store.points(vm).unwrap();
        for p in &points {
            let (_, disks) = store.verify(vm, &PointSpec::Id(p.id)).unwrap();
            assert!(disks.iter().all(|d| d.ok), "point {} no longer verifies: {disks:?}", p.id);
        }
        points.len()
    }

    #[test]
    fn retention_prunes_folds_and_deletes_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm) = setup(dir.path());
        let h = store.vm_disks(&vm).remove(0);
        let segments_before = h.journal().segment_count();
        let report = store.apply_retention(&vm, 5000).unwrap();
        assert_eq!(report.pruned.len(), 3, "points at 0, 1 and 2 s are older than 5 s - 2.5 s");
        assert!(report.segments_deleted > 0);
        assert!(h.journal().segment_count() < segments_before);
        assert!(h.base_seq() > Seq(0));
        assert_eq!(all_points_verify(&store, &vm), 3);
        // The newest point is kept however old it is.
        store.apply_retention(&vm, 1_000_000).unwrap();
        assert_eq!(all_points_verify(&store, &vm), 1);
    }

    /// A bound on the VM's journals prunes points still in the window, oldest first, only
    /// as far as needed, never past a pinned point nor the newest; without one, none go.
    #[test]
    fn a_bound_on_the_journals_prunes_points_ahead_of_their_window() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm) = setup(dir.path());
        let h = store.vm_disks(&vm).remove(0);
        let journal = || h.journal().bytes();
        let all = store.points(&vm).unwrap();
        // Within a day's window, no bound: nothing goes.
        let day = Policy { retention_ms: 86_400_000, ..Policy::default() };
        store.catalog().set_policy(&vm, &day).unwrap();
        let report = store.apply_retention(&vm, 5000).unwrap();
        assert_eq!((report.pruned.len(), report.over_bound), (0, None));
        let before = journal();
        // A bound of about half the journal: the oldest points go, the base takes their
        // records, and the journal is within the bound.
        let bound = before / 2;
        store.catalog().set_policy(&vm, &Policy { max_journal_bytes: bound as i64, ..day }).unwrap();
        let report = store.apply_retention(&vm, 5000).unwrap();
        assert!(!report.pruned.is_empty() && report.pruned.len() < all.len() - 1, "{report:?}");
        assert_eq!(report.ahead_of_window, report.pruned.len());
        assert_eq!(report.pruned, all[..report.pruned.len()].iter().map(|p| p.id).collect::<Vec<_>>());
        assert_eq!(report.over_bound, None);
        assert!(journal() <= bound, "{} bytes kept, bound {bound}", journal());
        // Only as far as needed: the oldest point kept would have left it over the bound.
        let kept = all_points_verify(&store, &vm);
        assert_eq!(kept, all.len() - report.pruned.len());
        // A test failover's point stops the pruning; the journals stay over the bound, and
        // the report says so.
        let pinned = store.points(&vm).unwrap()[0].id;
        let out = dir.path().join("tfo");
        store.test_failover(&vm, &PointSpec::Id(pinned), &out, crate::Format::Raw, &mut |_, _| {}).unwrap();
        store.catalog().set_policy(&vm, &Policy { max_journal_bytes: 1, ..day }).unwrap();
        let report = store.apply_retention(&vm, 5000).unwrap();
        assert!(report.pruned.is_empty(), "{report:?}");
        assert!(report.over_bound.is_some_and(|b| b > 1), "{report:?}");
        store.test_failover_cleanup(&vm).unwrap();
        // Then all but the newest go.
        let report = store.apply_retention(&vm, 5000).unwrap();
        assert_eq!(report.pruned.len(), kept - 1);
        assert_eq!(all_points_verify(&store, &vm), 1);
    }

    /// A point dated in the future (an agent's clock years ahead, before the server dated
    /// points) ages as the points after it do, instead of holding retention for good.
    #[test]
    fn a_point_dated_in_the_future_ages_with_the_points_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm) = setup(dir.path());
        let last = store.points(&vm).unwrap().pop().unwrap();
        for t in [9_000_000_000_000, 6000] {
            store.make_point(&vm, t, Consistency::Crash, "", last.disks.clone()).unwrap();
        }
        let report = store.apply_retention(&vm, 1_000_000).unwrap();
        assert_eq!(report.pruned.len(), 7, "all but the newest: {report:?}");
        assert_eq!(all_points_verify(&store, &vm), 1);
    }

    #[test]
    fn a_fold_deletes_each_segment_as_soon_as_the_base_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm) = setup(dir.path());
        let h = store.vm_disks(&vm).remove(0);
        let before = h.journal().segment_count();
        let target = store.points(&vm).unwrap()[3].disks[0].seq;
        let steps = h.journal().fold_steps(Seq(0), target);
        assert!(steps.len() > 2, "the setup's 8 KiB segments give the fold several steps: {steps:?}");
        assert_eq!(steps.last(), Some(&target));
        assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
        // Stopped after its first step: one segment gone already, the base part of the way.
        set_failpoint(Some("retention-after-segment"));
        assert!(matches!(store.apply_retention(&vm, 5000), Err(StoreError::Injected(_))));
        set_failpoint(None);
        assert_eq!(h.journal().segment_count(), before - 1);
        assert_eq!(h.base_seq(), steps[0]);
        assert_eq!(all_points_verify(&store, &vm), 3);
        store.apply_retention(&vm, 5000).unwrap();
        assert_eq!(h.base_seq(), target);
        assert_eq!(h.journal().segment_count(), before - (steps.len() - 1));
        assert_eq!(all_points_verify(&store, &vm), 3);
    }

    #[test]
    fn a_test_failover_pins_its_point() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm) = setup(dir.path());
        let first = store.points(&vm).unwrap()[1].id;
        let out = dir.path().join("tfo");
        store.test_failover(&vm, &PointSpec::Id(first), &out, crate::Format::Raw, &mut |_, _| {}).unwrap();
        // Said to an operator whose data directory fills.
        let holds = store.retention_holds().unwrap();
        assert_eq!(holds.len(), 1, "{holds:?}");
        assert!(
            holds[0].contains(&format!("keeps point {first}")) && holds[0].contains("test-failover-cleanup")
        );
        let report = store.apply_retention(&vm, 1_000_000).unwrap();
        assert_eq!(report.pruned.len(), 1, "only the point before the pinned one goes");
        assert!(store.points(&vm).unwrap().iter().any(|p| p.id == first));
        store.test_failover_cleanup(&vm).unwrap();
        assert!(store.retention_holds().unwrap().is_empty());
        store.apply_retention(&vm, 1_000_000).unwrap();
        assert_eq!(all_points_verify(&store, &vm), 1);
    }

    #[test]
    fn an_unfinished_plan_pins_the_points_it_chose_for_the_vms_it_has_not_reached() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm) = setup(dir.path());
        let chosen = store.points(&vm).unwrap()[1].id;
        let plan = |run: String| crate::PlanRow {
            name: "app".into(),
            source: "app.toml".into(),
            file: String::new(),
            applied_ms: 0,
            run,
        };
        // Waiting at a manual step before the VM's group: its point stays.
        let waiting = format!(r#"{{"state":"waiting","done":["web"],"points":{{"{vm}":{}}}}}"#, chosen.0);
        store.put_plan(&plan(String::new())).unwrap();
        store.set_plan_run("app", &waiting).unwrap();
        let report = store.apply_retention(&vm, 1_000_000).unwrap();
        assert_eq!(report.pruned.len(), 1, "only the point before the pinned one goes");
        assert!(store.points(&vm).unwrap().iter().any(|p| p.id == chosen));
        // Once the plan has done the VM, the point is the VM's own failover's to pin, or free.
        let done = format!(r#"{{"state":"waiting","done":["web","{vm}"],"points":{{"{vm}":{}}}}}"#, chosen.0);
        store.set_plan_run("app", &done).unwrap();
        store.apply_retention(&vm, 1_000_000).unwrap();
        assert_eq!(all_points_verify(&store, &vm), 1);
        assert_eq!(super::plan_run_pins("not json", "a"), Vec::<u64>::new());
        assert_eq!(super::plan_run_pins(r#"{"state":"failed","finals":{"a":7}}"#, "a"), vec![7]);
        assert_eq!(super::plan_run_pins(r#"{"state":"done","points":{"a":7}}"#, "a"), Vec::<u64>::new());
    }

    #[test]
    fn a_crash_at_every_step_of_retention_keeps_every_point_verifiable() {
        for fp in [
            "retention-after-prune",
            "retention-after-base-write",
            "retention-after-catalog",
            "retention-after-segment",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (store, vm) = setup(dir.path());
            set_failpoint(Some(fp));
            let err = store.apply_retention(&vm, 5000).unwrap_err();
            set_failpoint(None);
            assert!(matches!(err, StoreError::Injected(_)), "{fp}: {err}");
            drop(store);
            // The process died there; the store reopens and every kept point still verifies.
            let store = Store::open_with(
                dir.path(),
                StoreOptions { segment_bytes: Some(8192), ..Default::default() },
            )
            .unwrap();
            assert_eq!(all_points_verify(&store, &vm), 3, "after a crash at {fp}");
            // The next pass finishes the job.
            store.apply_retention(&vm, 5000).unwrap();
            let h = store.vm_disks(&vm).remove(0);
            assert!(h.base_seq() > Seq(0), "{fp}");
            assert_eq!(all_points_verify(&store, &vm), 3, "after finishing retention interrupted at {fp}");
        }
    }

    #[test]
    fn failover_change_point_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm) = setup(dir.path());
        let points = store.points(&vm).unwrap();
        let out = dir.path().join("fo");
        let res = store
            .failover(
                &vm,
                tern_core::FailoverKind::Unplanned,
                &PointSpec::Id(points[2].id),
                &out,
                crate::Format::Raw,
                &mut |_, _| {},
            )
            .unwrap();
        assert_eq!(res.point, points[2].id.0);
        assert!(matches!(
            store.failover(
                &vm,
                tern_core::FailoverKind::Unplanned,
                &PointSpec::LatestProcessed,
                &out,
                crate::Format::Raw,
                &mut |_, _| {}
            ),
            Err(StoreError::WrongState { .. })
        ));
        // Retention never passes the failover's point.
        store.apply_retention(&vm, 1_000_000).unwrap();
        assert!(store.points(&vm).unwrap().iter().any(|p| p.id == points[2].id));
        let res = store.change_point(&vm, &PointSpec::LatestProcessed, &mut |_, _| {}).unwrap();
        assert_eq!(res.point, points[5].id.0);
        let want = std::fs::read(out.join("sda.raw")).unwrap();
        store.commit(&vm).unwrap();
        assert!(store.points(&vm).unwrap().is_empty());
        assert!(matches!(
            store.change_point(&vm, &PointSpec::LatestProcessed, &mut |_, _| {}),
            Err(StoreError::WrongState { .. })
        ));
        assert!(matches!(store.commit(&vm), Err(StoreError::WrongState { .. })));
        // The base image now holds the failover point's disk.
        let h = store.vm_disks(&vm).remove(0);
        assert_eq!(std::fs::read(&h.base_path).unwrap(), want);
        assert_eq!(h.journal().segment_count(), 0);
        drop(h);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.vm_state(&vm).unwrap(), tern_core::VmState::FailoverCommitted);
    }

    /// The test store's VM failed over (unplanned) to its third point, written to `DIR/fo`:
    /// the store, the VM, its points and the output directory.
    fn failed_over_at_third_point(dir: &Path) -> (Store, VmName, Vec<crate::Point>, PathBuf) {
        let (store, vm) = setup(dir);
        let points = store.points(&vm).unwrap();
        let out = dir.join("fo");
        let kind = tern_core::FailoverKind::Unplanned;
        store
            .failover(&vm, kind, &PointSpec::Id(points[2].id), &out, crate::Format::Raw, &mut |_, _| {})
            .unwrap();
        (store, vm, points, out)
    }

    /// A commit cut short after the VM became failover-committed, before (or while) its
    /// journals were deleted: the next open deletes them, so that nothing of the old
    /// primary's records is relayed later, and no gap stalls a relay.
    #[test]
    fn a_commit_cut_short_has_its_journals_deleted_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm, _, out) = failed_over_at_third_point(dir.path());
        let want = std::fs::read(out.join("sda.raw")).unwrap();
        crate::set_failpoint(Some("commit-before-journal-delete"));
        assert!(matches!(store.commit(&vm), Err(StoreError::Injected(_))));
        crate::set_failpoint(None);
        let h = store.vm_disks(&vm).remove(0);
        assert!(h.journal().segment_count() > 0, "the failure point leaves the journal");
        drop(h);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.vm_state(&vm).unwrap(), tern_core::VmState::FailoverCommitted);
        let h = store.vm_disks(&vm).remove(0);
        assert_eq!(h.journal().segment_count(), 0);
        assert_eq!((h.durable(), h.journal_bytes()), (h.base_seq(), 0));
        assert_eq!(std::fs::read(&h.base_path).unwrap(), want, "the base image is the failover's point");
    }

    #[test]
    fn jobs_left_running_by_a_stopped_server_end_as_failed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm) = setup(dir.path());
        let id = store.catalog().insert_job(tern_core::JobKind::UnplannedFailover, &vm, 1).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.fail_interrupted_jobs(2).unwrap(), 1);
        let job = store.catalog().jobs().unwrap().into_iter().find(|j| j.id == id).unwrap();
        assert_eq!(job.state, tern_core::JobState::Failed);
        assert!(
            job.error.contains("interrupted") && job.error.contains("run the command again"),
            "{}",
            job.error
        );
    }

    /// A test failover cut short by a stop (its manifest never written) is closed at the
    /// next start, its partial output removed, so that it can run again (a plan's
    /// `continue` was refused by it); one that was written whole stays open.
    #[test]
    fn a_test_failover_cut_short_is_closed_and_its_partial_output_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm) = setup(dir.path());
        let points = store.points(&vm).unwrap();
        let out = dir.path().join("tfo");
        std::fs::create_dir(&out).unwrap();
        let files =
            vec![out.join("sda.raw").display().to_string(), out.join("vm.json").display().to_string()];
        let row = crate::catalog::TestFailoverRow {
            point: points[1].id,
            output: out.display().to_string(),
            files: files.clone(),
        };
        store.catalog().open_test_failover(&vm, &row).unwrap();
        std::fs::write(format!("{}.partial", files[0]), b"half").unwrap();
        let id = store.catalog().insert_job(tern_core::JobKind::TestFailover, &vm, 1).unwrap();
        assert_eq!(store.fail_interrupted_jobs(2).unwrap(), 1);
        let job = store.catalog().jobs().unwrap().into_iter().find(|j| j.id == id).unwrap();
        assert!(job.error.contains("partial output was removed"), "{}", job.error);
        assert!(store.test_failover_row(&vm).unwrap().is_none(), "closed");
        assert!(!out.exists(), "its partial file and the directory it made are gone");
        let spec = PointSpec::Id(points[1].id);
        store.test_failover(&vm, &spec, &out, crate::Format::Raw, &mut |_, _| {}).unwrap();

        // Written whole (the manifest is there): it stays open, and the job says how to close it.
        let id = store.catalog().insert_job(tern_core::JobKind::TestFailover, &vm, 3).unwrap();
        assert_eq!(store.fail_interrupted_jobs(4).unwrap(), 1);
        let job = store.catalog().jobs().unwrap().into_iter().find(|j| j.id == id).unwrap();
        assert!(job.error.contains("test-failover-cleanup"), "{}", job.error);
        assert!(store.test_failover_row(&vm).unwrap().is_some() && out.join("sda.raw").exists());
    }

    /// A failover or change of point cut short leaves the VM failed over with its output
    /// not whole: commit (which deletes every other point) refuses until `change-point`
    /// has written it, and the interrupted job says so rather than "run it again" (a second
    /// failover is refused).
    #[test]
    fn commit_refuses_a_failover_whose_output_was_not_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm, points, out) = failed_over_at_third_point(dir.path());
        // What a change of point cut short leaves: the row moved, its output not written.
        let row = store.catalog().failover(&vm).unwrap().unwrap();
        store.catalog().change_failover(&vm, row.point, None, &row.files).unwrap();
        let id = store.catalog().insert_job(tern_core::JobKind::ChangePoint, &vm, 1).unwrap();
        assert_eq!(store.fail_interrupted_jobs(2).unwrap(), 1);
        let job = store.catalog().jobs().unwrap().into_iter().find(|j| j.id == id).unwrap();
        let advice = format!("drctl change-point {vm} --point {}", points[2].id);
        assert!(job.error.contains(&advice), "{}", job.error);
        let err = store.commit(&vm).unwrap_err().to_string();
        assert!(err.contains("not written whole") && err.contains(&advice), "{err}");
        assert_eq!(store.points(&vm).unwrap().len(), points.len(), "nothing deleted");
        // What a recovery plan's `continue` does for it: written again at its own point,
        // the output removed first being no matter; once whole, nothing more.
        std::fs::remove_file(out.join("sda.raw")).unwrap();
        let o = store.finish_failover_output(&vm, &mut |_, _| {}).unwrap().expect("written again");
        assert_eq!(o.point, points[2].id.0);
        let written = blake3::hash(&std::fs::read(out.join("sda.raw")).unwrap()).to_hex().to_string();
        assert_eq!(o.disks[0].blake3, written);
        assert!(store.finish_failover_output(&vm, &mut |_, _| {}).unwrap().is_none());
        store.commit(&vm).unwrap();
    }

    #[test]
    fn point_options_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm) = setup(dir.path());
        let points = store.points(&vm).unwrap();
        assert_eq!(
            store.resolve_point(&vm, &PointSpec::parse("latest-processed").unwrap()).unwrap().id,
            points[5].id
        );
        let t = PointSpec::parse("1970-01-01T00:00:02.500Z").unwrap();
        assert_eq!(store.resolve_point(&vm, &t).unwrap().id, points[2].id);
        let err = store.resolve_point(&vm, &PointSpec::parse("latest-app").unwrap()).unwrap_err();
        assert!(err.to_string().contains("the oldest is"), "{err}");
        assert!(PointSpec::parse("yesterday").is_none());
    }
}
