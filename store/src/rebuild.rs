//! A lost catalog rebuilt from the data: the VMs and disks from `vms/`, each disk's base
//! position from its journal and its `base.seq` mark, the points from the bookmarks in
//! the journals.
//!
//! Two small files, each published durably, make the bookmarks enough:
//! - `vms/<vm>/<disk>/base.seq`: the newest record that may be in `base.img`. Retention
//!   writes it *before* it folds records into the base, so a point older than it may no
//!   longer be rebuilt from the base (a fold cut by a crash has already overwritten some of
//!   its blocks) and is not brought back, while every point at or after it is: replaying
//!   records the base already holds, in order, changes nothing.
//! - `vms/<vm>/points.deleted`: point ids up to this one were deleted on purpose (a
//!   committed failback), although their bookmarks are still in the journal.
//!
//! What the journals do not hold is not invented: policies start at their defaults, every
//! VM is `protected`, and open failovers, reprotect settings, jobs and point notes are gone.
//! Every disk gets a new generation, so its agent compares block hashes before it sends
//! again instead of trusting its saved state.

use crate::catalog::{Catalog, DiskRow};
use crate::durable::{io_err, publish, publish_file};
use crate::format::{BookmarkBody, RecordKind};
use crate::journal::Journal;
use crate::{Consistency, Point, PointDisk, StoreError, disk_dir, lock_data_dir, new_generation};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tern_core::{Digest, DiskName, PointId, Seq, VmName};

const BASE_MARK: &str = "base.seq";
const SIZE_MARK: &str = "disk.size";
const DELETED_MARK: &str = "points.deleted";

/// Publishes a disk's `base.seq` mark: records up to `seq` may be in its base image.
pub(crate) fn mark_base(root: &Path, vm: &VmName, disk: &DiskName, seq: Seq) -> Result<(), StoreError> {
    publish(&disk_dir(root, vm, disk).join(BASE_MARK), format!("{}\n", seq.0).as_bytes())
}

/// Publishes a disk's `disk.size` mark: its size in bytes, which `base.img` must have (a
/// rebuild would otherwise take the size of a base image cut short).
pub(crate) fn mark_size(root: &Path, vm: &VmName, disk: &DiskName, size: u64) -> Result<(), StoreError> {
    publish(&disk_dir(root, vm, disk).join(SIZE_MARK), format!("{size}\n").as_bytes())
}

/// Whether a disk has its `disk.size` mark (an older tern did not write one).
pub(crate) fn has_size_mark(root: &Path, vm: &VmName, disk: &DiskName) -> bool {
    disk_dir(root, vm, disk).join(SIZE_MARK).exists()
}

/// Whether a disk has its `base.seq` mark (an older tern did not write one).
pub(crate) fn has_base_mark(root: &Path, vm: &VmName, disk: &DiskName) -> bool {
    disk_dir(root, vm, disk).join(BASE_MARK).exists()
}

/// A disk's `base.seq` mark, if it has one.
pub(crate) fn base_mark(root: &Path, vm: &VmName, disk: &DiskName) -> Result<Option<u64>, StoreError> {
    read_mark(&disk_dir(root, vm, disk).join(BASE_MARK))
}

/// Publishes `vms/<vm>/points.deleted`: the VM's points up to `id` are deleted on purpose.
pub(crate) fn mark_points_deleted(root: &Path, vm: &VmName, id: PointId) -> Result<(), StoreError> {
    let dir = root.join("vms").join(vm.as_str());
    crate::durable::create_dir_durable(&dir)?;
    publish(&dir.join(DELETED_MARK), format!("{}\n", id.0).as_bytes())
}

/// A number in a mark file; `None` when the file does not exist.
fn read_mark(path: &Path) -> Result<Option<u64>, StoreError> {
    match std::fs::read_to_string(path) {
        Ok(s) => s.trim().parse().map(Some).map_err(|_| StoreError::RebuildRefused {
            path: path.display().to_string(),
            reason: format!("holds {:?}, not a number", s.trim()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io { path: path.display().to_string(), source: e }),
    }
}

/// What a rebuild found and wrote.
#[derive(Debug, Default)]
pub struct RebuildReport {
    pub vms: Vec<RebuiltVm>,
}

#[derive(Debug)]
pub struct RebuiltVm {
    pub vm: VmName,
    pub disks: Vec<RebuiltDisk>,
    /// The points brought back, oldest first.
    pub points: Vec<Point>,
    /// Bookmarks not brought back, and why.
    pub skipped: Vec<String>,
}

#[derive(Debug)]
pub struct RebuiltDisk {
    pub name: DiskName,
    pub size: u64,
    /// Records up to here are read from the base image.
    pub base_seq: Seq,
    /// The journal's last durable record.
    pub durable: Seq,
}

/// One disk as found on storage, before its points are known.
struct FoundDisk {
    row: DiskRow,
    /// Points older than this on the disk are not rebuilt.
    floor: Seq,
    durable: Seq,
    /// The bookmarks this disk's journal holds: point id, and the record each follows.
    marked: std::collections::HashMap<u64, u64>,
}

/// Rebuilds `DIR/catalog.db` from the journals and base images under `DIR/vms`. Refuses
/// when a catalog exists or the directory is in use, and writes nothing unless every VM
/// could be read: a VM left out would be re-registered from scratch by its agent, over
/// its own files.
pub fn rebuild_catalog(root: &Path) -> Result<RebuildReport, StoreError> {
    let _lock = lock_data_dir(root)?;
    let catalog_path = root.join("catalog.db");
    if catalog_path.exists() {
        return Err(StoreError::CatalogExists { path: catalog_path.display().to_string() });
    }
    let tmp = root.join("catalog.rebuild");
    for leftover in ["catalog.rebuild", "catalog.rebuild-wal", "catalog.rebuild-shm"] {
        let _ = std::fs::remove_file(root.join(leftover));
    }
    let mut report = RebuildReport::default();
    {
        let mut catalog = Catalog::open(&tmp)?;
        let mut highest = PointId(0);
        for dir in sorted_dirs(&root.join("vms"))? {
            let vm = name_of(&dir, VmName::new)?;
            let (rebuilt, top) = rebuild_vm(root, &vm, &mut catalog)?;
            highest = highest.max(top);
            report.vms.push(rebuilt);
        }
        catalog.raise_point_counter(highest)?;
        catalog.close_checkpointed()?;
    }
    publish_file(&tmp, &catalog_path)?;
    Ok(report)
}

fn sorted_dirs(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StoreError::Io { path: dir.display().to_string(), source: e }),
    };
    for e in entries {
        let p = e.map_err(io_err(dir))?.path();
        if p.is_dir() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

fn name_of<T, E>(dir: &Path, parse: impl FnOnce(&str) -> Result<T, E>) -> Result<T, StoreError> {
    dir.file_name().and_then(|n| n.to_str()).and_then(|n| parse(n).ok()).ok_or_else(|| {
        StoreError::RebuildRefused {
            path: dir.display().to_string(),
            reason: "is not a VM or disk name tern would have written; move it out of the data directory"
                .into(),
        }
    })
}

/// Rebuilds one VM's rows; returns them and the highest point id any of its bookmarks names.
fn rebuild_vm(root: &Path, vm: &VmName, catalog: &mut Catalog) -> Result<(RebuiltVm, PointId), StoreError> {
    let vm_dir = root.join("vms").join(vm.as_str());
    let deleted = PointId(read_mark(&vm_dir.join(DELETED_MARK))?.unwrap_or(0));
    let mut found = BTreeMap::new();
    let mut bookmarks: BTreeMap<u64, BookmarkBody> = BTreeMap::new();
    for dir in sorted_dirs(&vm_dir)? {
        let name = name_of(&dir, DiskName::new)?;
        let disk = find_disk(&dir, vm, &name, &mut bookmarks)?;
        found.insert(name, disk);
    }
    catalog.add_vm(vm, crate::now_ms())?;
    for d in found.values() {
        catalog.add_disk(vm, &d.row)?;
    }
    let mut out = RebuiltVm { vm: vm.clone(), disks: Vec::new(), points: Vec::new(), skipped: Vec::new() };
    let highest = PointId(bookmarks.keys().next_back().copied().unwrap_or(0)).max(deleted);
    for (id, body) in bookmarks {
        if id <= deleted.0 {
            continue;
        }
        match point_of(vm, &body, &found) {
            Ok(p) => {
                catalog.insert_point(&p)?;
                out.points.push(p);
            }
            Err(why) => out.skipped.push(format!("point {id}: {why}")),
        }
    }
    out.disks = found
        .into_values()
        .map(|d| RebuiltDisk {
            name: d.row.name,
            size: d.row.size,
            base_seq: d.row.base_seq,
            durable: d.durable,
        })
        .collect();
    Ok((out, highest))
}

/// Reads one disk's base image size, marks and journal, and collects its bookmarks.
fn find_disk(
    dir: &Path,
    vm: &VmName,
    name: &DiskName,
    bookmarks: &mut BTreeMap<u64, BookmarkBody>,
) -> Result<FoundDisk, StoreError> {
    let refuse = |reason: String| StoreError::RebuildRefused { path: dir.display().to_string(), reason };
    let base = dir.join("base.img");
    let size = match std::fs::metadata(&base) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(refuse(
                "has no base.img: its base is an outside file (a master target's disk), which a \
                 rebuild cannot find; restore the catalog from a backup"
                    .into(),
            ));
        }
        Err(e) => return Err(StoreError::Io { path: base.display().to_string(), source: e }),
    };
    // The disk's size as registered (a data directory older than the mark: the base's).
    if let Some(want) = read_mark(&dir.join(SIZE_MARK))?
        && want != size
    {
        return Err(refuse(format!(
            "its base.img is {size} bytes but the disk is {want} ({SIZE_MARK}): the base image is cut short \
             or is another disk's; restore it from the backup the rest of the data directory came from"
        )));
    }
    let floor = read_mark(&dir.join(BASE_MARK))?.map(Seq).ok_or_else(|| {
        refuse(format!(
            "has no {BASE_MARK}: it was last written by a tern that did not keep one, so the base \
             image's position is unknown; restore the catalog from a backup"
        ))
    })?;
    let (journal, _) = Journal::open(&dir.join("journal"))?;
    let snapshot = journal.snapshot();
    let durable = journal.durable();
    // Replay starts at the journal's first record: the base holds everything before it
    // (segments are deleted only once folded in), and replaying what it already holds
    // changes nothing.
    let base_seq = snapshot.first_seq().map_or(floor, |f| Seq(f.0 - 1));
    if base_seq > floor {
        return Err(refuse(format!(
            "its journal starts after record {} but the base image holds records only up to {}: \
             records in between are missing",
            base_seq.0, floor.0
        )));
    }
    let mut marked = std::collections::HashMap::new();
    for r in snapshot.read(durable) {
        let r = r?;
        if r.record.kind != RecordKind::Bookmark {
            continue;
        }
        let body: BookmarkBody = serde_json::from_slice(&r.record.payload)
            .map_err(|e| refuse(format!("bookmark after record {} does not decode: {e}", r.seq.0)))?;
        marked.insert(body.point, r.seq.0);
        bookmarks.entry(body.point).or_insert(body);
    }
    let row =
        DiskRow { name: name.clone(), size, generation: new_generation(vm, name), base_seq, base_path: None };
    Ok(FoundDisk { row, floor, durable, marked })
}

/// The point a bookmark describes, or why it cannot be brought back.
fn point_of(vm: &VmName, b: &BookmarkBody, disks: &BTreeMap<DiskName, FoundDisk>) -> Result<Point, String> {
    if b.vm != vm.as_str() {
        return Err(format!("its bookmark names VM {}", b.vm));
    }
    let consistency = match b.consistency.as_str() {
        "crash" => Consistency::Crash,
        "app" => Consistency::App,
        other => return Err(format!("unknown consistency {other:?}")),
    };
    let mut point_disks = Vec::new();
    for bd in &b.disks {
        let name = DiskName::new(&bd.disk).map_err(|_| format!("bad disk name {:?}", bd.disk))?;
        let d = disks.get(&name).ok_or_else(|| format!("disk {name} is not in the data directory"))?;
        let seq = Seq(bd.seq);
        if seq < d.floor {
            return Err(format!(
                "older than disk {name}'s base image (record {} < {}): pruned by retention",
                seq.0, d.floor.0
            ));
        }
        if seq > d.durable {
            return Err(format!(
                "needs record {} of disk {name}, whose journal ends at {}",
                seq.0, d.durable.0
            ));
        }
        // A point exists only once its bookmark is in every disk's journal, after the
        // record it covers there: one written on some disks only (a point refused, or cut
        // off a damaged journal and its seq reused) is not one.
        if d.marked.get(&b.point).is_none_or(|&after| after < seq.0) {
            return Err(format!("its bookmark is not in disk {name}'s journal after record {}", seq.0));
        }
        let fingerprint = Digest::from_hex(&bd.fingerprint).ok_or("its fingerprint does not decode")?;
        point_disks.push(PointDisk { disk: name, seq, fingerprint });
    }
    if point_disks.is_empty() {
        return Err("it names no disk".into());
    }
    point_disks.sort_by(|a, b| a.disk.cmp(&b.disk));
    Ok(Point {
        id: PointId(b.point),
        vm: vm.clone(),
        time_ms: b.time_ms,
        consistency,
        note: String::new(),
        disks: point_disks,
        // A multi-VM point comes back as one; the group's membership is the operator's
        // to set again (`drctl group create`): the catalog alone kept it.
        group: if b.group.is_empty() {
            None
        } else {
            Some(tern_core::GroupName::new(&b.group).map_err(|e| e.to_string())?)
        },
    })
}

#[cfg(test)]
mod tests {
    use super::rebuild_catalog;
    use crate::catalog::Policy;
    use crate::retention::tests::{all_points_verify, setup};
    use crate::{Point, Store, StoreError, StoreOptions, set_failpoint};
    use std::path::Path;

    fn reopen(root: &Path) -> Store {
        Store::open_with(root, StoreOptions { segment_bytes: Some(8192), ..Default::default() }).unwrap()
    }

    fn lose_catalog(root: &Path) {
        for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
            let _ = std::fs::remove_file(root.join(f));
        }
    }

    /// What a point is, without its note (bookmarks do not keep notes).
    fn key(p: &Point) -> (u64, i64, &'static str, Vec<(String, u64, String)>) {
        let disks = p.disks.iter().map(|d| (d.disk.to_string(), d.seq.0, d.fingerprint.to_hex())).collect();
        (p.id.0, p.time_ms, p.consistency.as_str(), disks)
    }

    #[test]
    fn a_lost_catalog_comes_back_with_every_point_after_retention() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm) = setup(dir.path());
        let report = store.apply_retention(&vm, 5000).unwrap();
        assert!(report.segments_deleted > 0, "the base has moved and segments are gone");
        let before: Vec<_> = store.points(&vm).unwrap().iter().map(key).collect();
        drop(store);
        assert!(matches!(rebuild_catalog(dir.path()), Err(StoreError::CatalogExists { .. })));
        lose_catalog(dir.path());
        assert!(matches!(Store::open(dir.path()), Err(StoreError::CatalogMissing { .. })));
        let report = rebuild_catalog(dir.path()).unwrap();
        assert_eq!(report.vms.len(), 1);
        assert!(
            report.vms[0].skipped.iter().all(|s| s.contains("pruned by retention")),
            "{:?}",
            report.vms[0].skipped
        );
        let store = reopen(dir.path());
        let after: Vec<_> = store.points(&vm).unwrap().iter().map(key).collect();
        assert_eq!(after, before);
        assert_eq!(all_points_verify(&store, &vm), 3);
        // Policies are not in the journals: back to the defaults until set again. Retention
        // then goes on from the rebuilt position, and a new point takes a new id.
        assert_eq!(store.catalog().policy(&vm).unwrap(), Policy::default());
        store.catalog().set_policy(&vm, &Policy { retention_ms: 2500, ..Policy::default() }).unwrap();
        store.apply_retention(&vm, 1_000_000).unwrap();
        assert_eq!(all_points_verify(&store, &vm), 1);
        assert!(store.catalog().next_point_id().unwrap().0 > before.last().unwrap().0);
    }

    /// Once the base holds every record, retention starts the journal on a new segment
    /// holding only the kept points' bookmarks, so that a VM's whole journal can go however
    /// large its last segment grew. Crashed before the old segments go, or after: the
    /// newest point verifies, a lost catalog comes back with it (and no pruned one), and
    /// records go on after it.
    #[test]
    fn a_folded_journal_starts_anew_with_the_bookmarks_of_its_kept_points() {
        for crash in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (store, vm) = setup(dir.path());
            let h = store.vm_disks(&vm).remove(0);
            let before = h.journal().bytes();
            let newest = store.points(&vm).unwrap().pop().unwrap();
            if crash {
                // Retiring is best effort: the pass goes on, and the process dies there.
                set_failpoint(Some("retire-before-delete"));
                let report = store.apply_retention(&vm, 1_000_000).unwrap();
                set_failpoint(None);
                assert_eq!(h.journal().segment_count(), 2, "{report:?}");
                drop((h, store));
                let store = reopen(dir.path());
                assert_eq!(all_points_verify(&store, &vm), 1, "crashed before the old segments went");
                store.apply_retention(&vm, 1_000_000).unwrap();
            } else {
                let report = store.apply_retention(&vm, 1_000_000).unwrap();
                assert_eq!(report.pruned.len(), 5);
                drop((h, store));
            }
            let store = reopen(dir.path());
            let h = store.vm_disks(&vm).remove(0);
            assert_eq!(h.journal().segment_count(), 1);
            let after = h.journal().bytes();
            assert!(after < 1024, "a segment header and one bookmark, of {before} bytes: {after}");
            assert_eq!(h.base_seq(), newest.disks[0].seq);
            assert_eq!(all_points_verify(&store, &vm), 1);
            // Nothing more to retire: the new segment stays.
            assert_eq!(store.apply_retention(&vm, 1_000_000).unwrap().segments_deleted, 0);
            drop((h, store));
            lose_catalog(dir.path());
            let report = rebuild_catalog(dir.path()).unwrap();
            assert!(report.vms[0].skipped.is_empty(), "{:?}", report.vms[0].skipped);
            let store = reopen(dir.path());
            let points = store.points(&vm).unwrap();
            assert_eq!(points.iter().map(key).collect::<Vec<_>>(), vec![key(&newest)]);
            assert_eq!(all_points_verify(&store, &vm), 1);
            // Records go on after the base, and a point on them verifies.
            let h = store.vm_disks(&vm).remove(0);
            let next = h.base_seq().next();
            h.journal().append(next, &[crate::test_record(&[5u8; 4096], 0)]).unwrap();
            h.journal().sync().unwrap();
            let p = &newest.disks[0];
            // The base image is the newest point's disk.
            let mut image = std::fs::read(&h.base_path).unwrap();
            image[..4096].fill(5);
            let mut fp = tern_core::blocks::Fingerprint::new();
            fp.push_data(&image);
            let d = crate::PointDisk { disk: p.disk.clone(), seq: next, fingerprint: fp.finish() };
            store.make_point(&vm, 2_000_000, crate::Consistency::Crash, "", vec![d]).unwrap();
            assert_eq!(all_points_verify(&store, &vm), 2, "crash: {crash}");
        }
    }

    /// A fold into the base cut by a crash has overwritten blocks that the pruned points
    /// still need: a rebuild must not bring them back (their bookmarks are still in the
    /// journal), and every point it brings back recovers.
    #[test]
    fn a_rebuild_after_a_crash_in_the_middle_of_retention_lists_only_points_that_recover() {
        for fp in ["retention-after-prune", "retention-after-base-write", "retention-after-catalog"] {
            let dir = tempfile::tempdir().unwrap();
            let (store, vm) = setup(dir.path());
            set_failpoint(Some(fp));
            assert!(store.apply_retention(&vm, 5000).is_err());
            set_failpoint(None);
            drop(store);
            lose_catalog(dir.path());
            rebuild_catalog(dir.path()).unwrap();
            let store = reopen(dir.path());
            let n = all_points_verify(&store, &vm);
            // Before the mark moved nothing was folded: the pruned points are whole again.
            let want = if fp == "retention-after-prune" { 6 } else { 3 };
            assert_eq!(n, want, "after a crash at {fp}");
        }
    }

    /// A bookmark in one disk's journal only (a point refused on a later disk, or cut off a
    /// damaged journal whose seqs were then reused) is not a point.
    #[test]
    fn a_bookmark_missing_from_one_disk_is_not_a_point() {
        use crate::{Consistency, PointDisk};
        use tern_core::blocks::Fingerprint;
        use tern_core::{DiskName, Seq, VmName};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let vm = VmName::new("two").unwrap();
        let (a, b) = (DiskName::new("sda").unwrap(), DiskName::new("sdb").unwrap());
        let hs = store.register(&vm, &[(a.clone(), 1 << 20), (b.clone(), 1 << 20)]).unwrap();
        for h in &hs {
            h.append(Seq(1), &[crate::test_record(&[9u8; 4096], 0)]).unwrap();
            h.sync().unwrap();
        }
        let mut image = vec![0u8; 1 << 20];
        image[..4096].fill(9);
        let mut fp = Fingerprint::new();
        fp.push_data(&image);
        let disks = |seq| {
            vec![
                PointDisk { disk: a.clone(), seq: Seq(seq), fingerprint: fp.finish() },
                PointDisk { disk: b.clone(), seq: Seq(seq), fingerprint: fp.finish() },
            ]
        };
        let good = store.make_point(&vm, 1, Consistency::Crash, "", disks(1)).unwrap();
        // Point 77's bookmark reached sda only.
        let body = serde_json::to_vec(&crate::format::BookmarkBody {
            point: 77,
            vm: "two".into(),
            time_ms: 2,
            consistency: "crash".into(),
            group: String::new(),
            disks: disks(1)
                .iter()
                .map(|d| crate::format::BookmarkDisk {
                    disk: d.disk.to_string(),
                    seq: 1,
                    fingerprint: d.fingerprint.to_hex(),
                })
                .collect(),
        })
        .unwrap();
        {
            let mut j = hs[0].journal();
            j.append_bookmark(&body).unwrap();
            j.sync().unwrap();
        }
        drop((hs, store));
        lose_catalog(dir.path());
        let report = rebuild_catalog(dir.path()).unwrap();
        let ids: Vec<u64> = report.vms[0].points.iter().map(|p| p.id.0).collect();
        assert_eq!(ids, [good.id.0]);
        assert!(
            report.vms[0].skipped.iter().any(|s| s.contains("point 77") && s.contains("sdb")),
            "{:?}",
            report.vms[0].skipped
        );
        let store = reopen(dir.path());
        assert!(store.catalog().next_point_id().unwrap().0 > 77, "the id is not reused");
    }

    #[test]
    fn points_deleted_on_purpose_stay_deleted_and_an_unmarked_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm) = setup(dir.path());
        // A failback commit deletes every point; its bookmarks stay in the journal.
        store.catalog().raw_set_state_for_tests(&vm, tern_core::VmState::FailedBack);
        store.commit_failback(&vm).unwrap();
        drop(store);
        lose_catalog(dir.path());
        let report = rebuild_catalog(dir.path()).unwrap();
        assert!(report.vms[0].points.is_empty());
        let store = reopen(dir.path());
        assert!(store.points(&vm).unwrap().is_empty());
        assert!(store.catalog().next_point_id().unwrap().0 > 6, "point ids are never reused");
        drop(store);

        // A data directory last opened by a tern without base marks gets them at the next
        // open; one whose catalog was lost before that cannot be rebuilt safely.
        let mark = dir.path().join("vms/vm/sda/base.seq");
        std::fs::remove_file(&mark).unwrap();
        drop(reopen(dir.path()));
        assert!(mark.exists(), "written at open");
        std::fs::remove_file(&mark).unwrap();
        lose_catalog(dir.path());
        let err = rebuild_catalog(dir.path()).unwrap_err();
        assert!(err.to_string().contains("base.seq"), "{err}");
        assert!(!dir.path().join("catalog.db").exists(), "a refused rebuild writes nothing");
    }

    /// A base image cut short (W19-D: a rebuild took its length for the disk's size) marks
    /// the VM damaged at open, and refuses a rebuild; a data directory older than the size
    /// mark gets it at open.
    #[test]
    fn a_base_image_cut_short_is_found_at_open_and_refuses_a_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm) = setup(dir.path());
        let size = store.disk(&vm, &tern_core::DiskName::new("sda").unwrap()).unwrap().size;
        drop(store);
        let mark = dir.path().join("vms/vm/sda/disk.size");
        assert_eq!(std::fs::read_to_string(&mark).unwrap(), format!("{size}\n"), "written at register");
        std::fs::remove_file(&mark).unwrap();
        drop(reopen(dir.path()));
        assert!(mark.exists(), "written at open");
        let base = dir.path().join("vms/vm/sda/base.img");
        std::fs::OpenOptions::new().write(true).open(&base).unwrap().set_len(size / 2).unwrap();
        let store = reopen(dir.path());
        let why = store.damaged(&vm).expect("the VM is marked").to_string();
        assert!(why.contains(&format!("is {} bytes but the disk is {size}", size / 2)), "{why}");
        drop(store);
        lose_catalog(dir.path());
        let err = rebuild_catalog(dir.path()).unwrap_err();
        assert!(err.to_string().contains("cut short"), "{err}");
        assert!(!dir.path().join("catalog.db").exists(), "a refused rebuild writes nothing");
        // Back at its size (what it held in its second half aside), it is rebuilt.
        std::fs::OpenOptions::new().write(true).open(&base).unwrap().set_len(size).unwrap();
        rebuild_catalog(dir.path()).unwrap();
    }
}
