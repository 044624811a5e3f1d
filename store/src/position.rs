//! Any time between two points: in `--mode nbd` the agent stamps each record with the
//! moment the VM wrote it, and the journal keeps those stamps as time records. Because the
//! agent's log is one order across the VM's disks and its stamps never go down, the
//! records stamped at or before a moment are a prefix of that order: a crash-consistent
//! cut, as good as a point, found without the VM ever being marked there.

use crate::catalog::Between;
use crate::format::{RecordKind, TimeRuns};
use crate::journal::JournalSnapshot;
use crate::{DiskHandle, Point, PointSpec, Store, StoreError, rfc3339};
use tern_core::{Seq, VmName};

/// What a failover to `spec` writes: a point, or a position between it and the next.
#[derive(Clone, Debug)]
pub struct Position {
    pub point: Point,
    pub between: Option<Between>,
    /// Why a time resolved to the point at or before it rather than to the exact moment
    /// (empty when it did, or when no time was asked for).
    pub why_point: String,
}

impl Position {
    /// Each disk's last record, in the order of the point's disks.
    pub fn seqs(&self) -> Vec<Seq> {
        match &self.between {
            Some(b) => b.seqs.iter().map(|&s| Seq(s)).collect(),
            None => self.point.disks.iter().map(|d| d.seq).collect(),
        }
    }

    pub fn time_ms(&self) -> i64 {
        self.between.as_ref().map_or(self.point.time_ms, |b| b.time_ms)
    }

    /// The same, with `why` as the reason it is not the moment asked for, before the one
    /// it has (a position between points needs none).
    pub fn noted(mut self, why: &str) -> Position {
        if !why.is_empty() && self.between.is_none() {
            self.why_point = if self.why_point.is_empty() {
                why.to_string()
            } else {
                format!("{why}; {}", self.why_point)
            };
        }
        self
    }

    /// How a person names it: "point 41", or "2026-…Z (between points 41 and 42)".
    pub fn describe(&self) -> String {
        match &self.between {
            Some(b) if b.next == 0 => format!("{} (after point {})", rfc3339(b.time_ms), self.point.id),
            Some(b) => format!("{} (between points {} and {})", rfc3339(b.time_ms), self.point.id, b.next),
            None => format!("point {}", self.point.id),
        }
    }
}

impl Store {
    /// Resolves `spec` for a failover or test failover. A time resolves to the journal
    /// position of that moment when every record between the points around it carries the
    /// time it was written (an agent in `--mode nbd`, streaming since before the earlier
    /// point); otherwise, as for every other spec, to a point.
    pub fn resolve_position(&self, vm: &VmName, spec: &PointSpec) -> Result<Position, StoreError> {
        let point = self.resolve_point(vm, spec)?;
        let t = match *spec {
            PointSpec::Time(t) => t,
            PointSpec::Received => i64::MAX,
            _ => return Ok(Position { point, between: None, why_point: String::new() }),
        };
        Ok(match self.between(vm, &point, t)? {
            At::Point => Position { point, between: None, why_point: String::new() },
            At::Next(next) => Position { point: next, between: None, why_point: String::new() },
            At::Between(b) => Position { point, between: Some(b), why_point: String::new() },
            At::Earlier(why_point) => Position { point, between: None, why_point },
        })
    }

    /// The position at `t` after `point`.
    fn between(&self, vm: &VmName, point: &Point, t: i64) -> Result<At, StoreError> {
        // At the point's own millisecond too: writes acked just after its mark may carry it.
        if point.time_ms > t {
            return Ok(At::Point);
        }
        let Some(next) = self.catalog().next_point(vm, point.id)? else {
            return self.after_newest(vm, point, t);
        };
        let names = |p: &Point| p.disks.iter().map(|d| d.disk.clone()).collect::<Vec<_>>();
        if next.time_ms <= t || names(&next) != names(point) {
            return Ok(At::Earlier(format!("points {} and {} do not bound it", point.id, next.id)));
        }
        let mut seqs = Vec::new();
        for (h, (a, b)) in self.point_disks(vm, point)?.iter().zip(point.disks.iter().zip(&next.disks)) {
            match cut_at(h, a.seq, b.seq, t)? {
                Some(seq) => seqs.push(seq.0),
                None => {
                    return Ok(At::Earlier(format!(
                        "disk {} has records between points {} and {} without the time they were \
                         written (a scan-mode agent, or a resync), so only the points are consistent there",
                        h.name, point.id, next.id
                    )));
                }
            }
        }
        if seqs.iter().zip(&point.disks).all(|(s, d)| *s == d.seq.0) {
            return Ok(At::Point);
        }
        if seqs.iter().zip(&next.disks).all(|(s, d)| *s == d.seq.0) {
            // Nothing was written between that moment and the next point: the next point is
            // the same state, and it has a fingerprint to check the output against.
            return Ok(At::Next(next));
        }
        Ok(At::Between(Between { time_ms: t, next: next.id.0, seqs }))
    }
}

impl Store {
    /// The position at `t` after the newest point, `point`: what reached this server since
    /// (with the agent gone, no next point will come). Every record past the point must carry
    /// the time it was written.
    ///
    /// The agent sends a VM's writes in one order, and this server appends them in that
    /// order; so what this process appended and made durable is a prefix of it across all
    /// the disks, cut anywhere by time. Records from before a restart may not be (a crash
    /// between two disks' fsyncs): then each disk is trusted only below its own last time,
    /// and the cut is a millisecond before the earliest of those (a write lost on its way to
    /// one disk was stamped at or after that disk's last), which needs records after the
    /// point on every disk.
    fn after_newest(&self, vm: &VmName, point: &Point, t: i64) -> Result<At, StoreError> {
        let handles = self.point_disks(vm, point)?;
        // One order across the disks: appended by this process, and all of it durable now.
        let in_order = handles.iter().zip(&point.disks).all(|(h, pd)| h.appended_here_after(pd.seq))
            && handles.iter().all(|h| h.sync().is_ok());
        let (mut earliest, mut latest) = (i64::MAX, i64::MIN);
        let mut ends = Vec::new();
        for (h, pd) in handles.iter().zip(&point.disks) {
            let durable = h.durable();
            if durable <= pd.seq {
                ends.push(None);
                continue;
            }
            let _reading = h.read_lock();
            let snapshot = h.journal().snapshot();
            match last_time_in(&snapshot, pd.seq, durable, &format!("journal of {}/{}", h.vm, h.name))? {
                Some(last) => (earliest, latest) = (earliest.min(last), latest.max(last)),
                None => {
                    return Ok(At::Earlier(format!(
                        "disk {} has records after point {} without the time they were written (a \
                         scan-mode agent, or a resync), so only the point is consistent",
                        h.name, point.id
                    )));
                }
            }
            ends.push(Some(durable));
        }
        if ends.iter().all(Option::is_none) {
            return Ok(At::Point);
        }
        let bound = if in_order || handles.len() == 1 {
            t.min(latest)
        } else if let Some((h, _)) = handles.iter().zip(&ends).find(|(_, e)| e.is_none()) {
            return Ok(At::Earlier(format!(
                "disk {} has nothing after point {} and the process server restarted since, so a later \
                 moment cannot be checked across the VM's disks",
                h.name, point.id
            )));
        } else {
            // Stamps are milliseconds: a write lost on its way to one disk may share that
            // disk's last stamp, and a later write to another disk too.
            t.min(earliest.saturating_sub(1))
        };
        let mut seqs = Vec::new();
        for ((h, pd), end) in handles.iter().zip(&point.disks).zip(&ends) {
            match cut_at(h, pd.seq, end.unwrap_or(pd.seq), bound)? {
                Some(seq) => seqs.push(seq.0),
                None => return Ok(At::Earlier(format!("disk {} changed under the read; try again", h.name))),
            }
        }
        if seqs.iter().zip(&point.disks).all(|(s, d)| *s == d.seq.0) {
            if !in_order && bound < t {
                return Ok(At::Earlier(format!(
                    "what arrived after point {} came partly before a restart of the process server, \
                     and none of it can be vouched for across the VM's disks",
                    point.id
                )));
            }
            return Ok(At::Point);
        }
        Ok(At::Between(Between { time_ms: bound, next: 0, seqs }))
    }
}

/// What a time between two points resolves to.
enum At {
    /// The earlier point itself (nothing written between it and the time).
    Point,
    /// The next point (nothing written between the time and it).
    Next(Point),
    /// A position strictly between them.
    Between(Between),
    /// The earlier point, because the moment cannot be found; why.
    Earlier(String),
}

/// The last record of `h` in `(after, upto]` written at or before `t`; `None` when a
/// record in that span before the answer carries no time.
fn cut_at(h: &DiskHandle, after: Seq, upto: Seq, t: i64) -> Result<Option<Seq>, StoreError> {
    let _reading = h.read_lock();
    let snapshot = h.journal().snapshot();
    cut_in(&snapshot, after, upto, t, &format!("journal of {}/{}", h.vm, h.name))
}

fn cut_in(
    snapshot: &JournalSnapshot,
    after: Seq,
    upto: Seq,
    t: i64,
    what: &str,
) -> Result<Option<Seq>, StoreError> {
    Ok(timed_cut(snapshot, after, upto, t, what)?.map(|(cut, _)| cut))
}

/// The time the last record in `(after, upto]` was written; `None` when one of them
/// carries no time.
fn last_time_in(
    snapshot: &JournalSnapshot,
    after: Seq,
    upto: Seq,
    what: &str,
) -> Result<Option<i64>, StoreError> {
    Ok(timed_cut(snapshot, after, upto, i64::MAX, what)?.and_then(|(_, time)| time))
}

/// The last record in `(after, upto]` written at or before `t`, with its time, from the
/// time records alone; `None` when a record before the answer carries no time.
fn timed_cut(
    snapshot: &JournalSnapshot,
    after: Seq,
    upto: Seq,
    t: i64,
    what: &str,
) -> Result<Option<(Seq, Option<i64>)>, StoreError> {
    let mut covered = after.0;
    let mut cut = (after, None);
    for rec in snapshot.read_marks(after, upto) {
        if covered >= upto.0 {
            break;
        }
        let rec = rec?;
        if rec.record.kind != RecordKind::Time {
            continue;
        }
        let runs = TimeRuns::decode(&rec.record.payload).ok_or_else(|| StoreError::SegmentCorrupt {
            path: what.to_string(),
            offset: 0,
            reason: format!("time record after record {} does not decode", rec.seq),
        })?;
        let mut first = runs.first;
        for (last, time) in runs.runs {
            let from = first;
            first = last + 1;
            if last <= covered {
                continue;
            }
            if from > covered + 1 {
                // Records without a time come first.
                return Ok(None);
            }
            if time > t {
                return Ok(Some(cut));
            }
            covered = last.min(upto.0);
            cut = (Seq(covered), Some(time));
            if covered >= upto.0 {
                break;
            }
        }
    }
    Ok((covered >= upto.0).then_some(cut))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::journal::Journal;
    use crate::test_record;

    fn journal_with(dir: &std::path::Path, batches: &[(u64, usize, &[i64])]) -> Journal {
        let (mut j, _) = Journal::open(dir).unwrap();
        for &(first, n, times) in batches {
            let records: Vec<_> = (0..n).map(|i| test_record(b"x", i as u64 * 4096)).collect();
            j.append(Seq(first), &records).unwrap();
            if !times.is_empty() {
                j.append_times(&TimeRuns::of(first, times)).unwrap();
            }
        }
        j.sync().unwrap();
        j
    }

    #[test]
    fn a_time_cuts_after_the_last_record_written_by_then() {
        let dir = tempfile::tempdir().unwrap();
        // 1..=3 from a resync (no times), then 4..=8 stamped, 9 not, 10 stamped.
        let j = journal_with(
            dir.path(),
            &[(1, 3, &[]), (4, 3, &[100, 100, 101]), (7, 2, &[103, 105]), (9, 1, &[]), (10, 1, &[110])],
        );
        let s = j.snapshot();
        let cut = |after: u64, upto: u64, t: i64| cut_in(&s, Seq(after), Seq(upto), t, "test").unwrap();
        assert_eq!(cut(3, 8, 99), Some(Seq(3)), "nothing written by then");
        assert_eq!(cut(3, 8, 100), Some(Seq(5)));
        assert_eq!(cut(3, 8, 101), Some(Seq(6)));
        assert_eq!(cut(3, 8, 102), Some(Seq(6)));
        assert_eq!(cut(3, 8, 104), Some(Seq(7)));
        assert_eq!(cut(3, 8, 105), Some(Seq(8)));
        assert_eq!(cut(3, 6, 500), Some(Seq(6)), "never past the next point");
        assert_eq!(cut(5, 8, 101), Some(Seq(6)), "a run that straddles the point");
        assert_eq!(cut(0, 8, 101), None, "records without a time come first");
        assert_eq!(cut(8, 10, 111), None, "record 9 has no time");
        assert_eq!(cut(8, 8, 111), Some(Seq(8)), "nothing between the points");
        assert_eq!(cut(3, 10, 104), Some(Seq(7)), "the answer comes before the gap");
    }

    /// A disk with point 1 at t = 1000 (two records from a resync, no times), then eight
    /// pages written at 1000 (the point's own millisecond, after its mark), 1100, ... 1700,
    /// then point 2 at t = 2000. Returns the disk's image after each record.
    fn two_points(root: &std::path::Path) -> (Store, VmName, Vec<Vec<u8>>) {
        use crate::{Consistency, PointDisk};
        use tern_core::DiskName;
        use tern_core::blocks::Fingerprint;
        const SIZE: usize = 1 << 20;
        let store = Store::open(root).unwrap();
        let vm = VmName::new("vm").unwrap();
        let d = DiskName::new("sda").unwrap();
        let h = store.register(&vm, &[(d.clone(), SIZE as u64)]).unwrap().remove(0);
        let mut images = vec![vec![0u8; SIZE]];
        let point = |seq: u64, time_ms: i64, image: &[u8]| {
            h.journal().sync().unwrap();
            let mut fp = Fingerprint::new();
            fp.push_data(image);
            let disks = vec![PointDisk { disk: d.clone(), seq: Seq(seq), fingerprint: fp.finish() }];
            store.make_point(&vm, time_ms, Consistency::Crash, "", disks).unwrap();
        };
        for seq in 1..=10u64 {
            let mut page = vec![0u8; 4096];
            blake3::Hasher::new().update(&seq.to_le_bytes()).finalize_xof().fill(&mut page);
            let off = (seq * 3 * 4096) as usize;
            let mut image = images.last().unwrap().clone();
            image[off..off + 4096].copy_from_slice(&page);
            let times: Vec<i64> = if seq > 2 { vec![1000 + 100 * (seq as i64 - 3)] } else { vec![] };
            h.append_timed(Seq(seq), &[test_record(&page, off as u64)], &times).unwrap();
            images.push(image);
            if seq == 2 {
                point(2, 1000, &images[2]);
            }
        }
        point(10, 2000, &images[10]);
        (store, vm, images)
    }

    #[test]
    fn a_failover_to_a_time_between_points_writes_that_moment() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm, images) = two_points(&dir.path().join("store"));
        let at = |ms: i64| PointSpec::Time(ms);
        // 1800: the last write; nothing after it until point 2, which is then the answer.
        // 1000: the write acked after point 1's mark in its millisecond is there. 1700: the
        // last write; nothing after it until point 2, which is then the answer (checked
        // against its fingerprint).
        for (ms, seq, between) in [(1450, 7, true), (1000, 3, true), (1700, 10, false), (2500, 10, false)] {
            let out = dir.path().join(format!("tfo-{ms}"));
            let res = store.test_failover(&vm, &at(ms), &out, crate::Format::Raw, &mut |_, _| {}).unwrap();
            assert_eq!(res.disks[0].seq, seq, "at {ms}");
            assert_eq!(res.between_points.is_some(), between, "at {ms}: {res:?}");
            assert_eq!(std::fs::read(out.join("sda.raw")).unwrap(), images[seq as usize], "at {ms}");
            store.test_failover_cleanup(&vm).unwrap();
        }
        let out = dir.path().join("fo");
        let res = store
            .failover(
                &vm,
                tern_core::FailoverKind::Unplanned,
                &at(1650),
                &out,
                crate::Format::Raw,
                &mut |_, _| {},
            )
            .unwrap();
        assert_eq!((res.disks[0].seq, res.between_points), (9, Some([1, 2])));
        assert!(res.note.contains("every write made by then"), "{}", res.note);
        let res = store.change_point(&vm, &at(1250), &mut |_, _| {}).unwrap();
        assert_eq!(res.disks[0].seq, 5);
        store.commit(&vm).unwrap();
        let h = store.vm_disks(&vm).remove(0);
        assert_eq!(h.base_seq(), Seq(5), "the commit moves the base to the position, not to a point");
        assert_eq!(std::fs::read(&h.base_path).unwrap(), images[5]);
    }

    /// With the agent gone no point comes after the newest: what reached the server since
    /// (stamped, in nbd mode) is a crash-consistent moment all the same, and `Received` (what
    /// `latest` becomes) uses all of it. A record without its time (scan mode, a resync)
    /// leaves only the point.
    #[test]
    fn what_arrived_after_the_newest_point_is_a_moment_too() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm, mut images) = two_points(&dir.path().join("store"));
        let h = store.vm_disks(&vm).remove(0);
        let write = |images: &mut Vec<Vec<u8>>, seq: u64, times: &[i64]| {
            let mut page = vec![0u8; 4096];
            blake3::Hasher::new().update(&seq.to_le_bytes()).finalize_xof().fill(&mut page);
            let off = (seq * 3 * 4096) as usize;
            let mut image = images.last().unwrap().clone();
            image[off..off + 4096].copy_from_slice(&page);
            h.append_timed(Seq(seq), &[test_record(&page, off as u64)], times).unwrap();
            h.journal().sync().unwrap();
            images.push(image);
        };
        for seq in 11..=13u64 {
            write(&mut images, seq, &[2000 + 100 * (seq as i64 - 10)]);
        }
        let run = |spec: PointSpec, name: &str| {
            let out = dir.path().join(name);
            let res = store.test_failover(&vm, &spec, &out, crate::Format::Raw, &mut |_, _| {}).unwrap();
            let image = std::fs::read(out.join("sda.raw")).unwrap();
            store.test_failover_cleanup(&vm).unwrap();
            (res, image)
        };
        let (res, image) = run(PointSpec::Received, "all");
        assert_eq!((res.disks[0].seq, res.between_points), (13, Some([2, 0])), "{res:?}");
        assert!(res.note.contains("after point 2"), "{}", res.note);
        assert_eq!(image, images[13]);
        let (res, image) = run(PointSpec::Time(2250), "t2250");
        assert_eq!(res.disks[0].seq, 12);
        assert_eq!(image, images[12]);
        // A failover there commits there.
        let out = dir.path().join("fo");
        let kind = tern_core::FailoverKind::Unplanned;
        store.failover(&vm, kind, &PointSpec::Received, &out, crate::Format::Raw, &mut |_, _| {}).unwrap();
        store.change_point(&vm, &PointSpec::Received, &mut |_, _| {}).unwrap();
        assert_eq!(std::fs::read(out.join("sda.raw")).unwrap(), images[13]);
        // A record without its time: only the point is consistent.
        write(&mut images, 14, &[]);
        let res = store.change_point(&vm, &PointSpec::Received, &mut |_, _| {}).unwrap();
        assert_eq!((res.disks[0].seq, res.between_points), (10, None));
        assert!(res.note.contains("without the time"), "{}", res.note);
        let res = store.change_point(&vm, &PointSpec::Time(2250), &mut |_, _| {}).unwrap();
        assert_eq!((res.disks[0].seq, res.between_points), (10, None));
    }

    /// Two disks written in one order, A, B, A, B, ...: the cut at any moment holds, on
    /// both disks, exactly the writes made by then (a prefix of that one order).
    #[test]
    fn a_cut_across_two_disks_is_a_prefix_of_their_one_write_order() {
        use crate::{Consistency, PointDisk};
        use tern_core::DiskName;
        use tern_core::blocks::Fingerprint;
        const SIZE: usize = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let vm = VmName::new("vm").unwrap();
        let names = [DiskName::new("a").unwrap(), DiskName::new("b").unwrap()];
        let hs =
            store.register(&vm, &[(names[0].clone(), SIZE as u64), (names[1].clone(), SIZE as u64)]).unwrap();
        let mut images = [vec![0u8; SIZE], vec![0u8; SIZE]];
        let mut next = [1u64, 1];
        let point = |images: &[Vec<u8>; 2], next: &[u64; 2], t: i64| {
            let disks = (0..2)
                .map(|d| {
                    hs[d].journal().sync().unwrap();
                    let mut fp = Fingerprint::new();
                    fp.push_data(&images[d]);
                    PointDisk { disk: names[d].clone(), seq: Seq(next[d] - 1), fingerprint: fp.finish() }
                })
                .collect();
            store.make_point(&vm, t, Consistency::Crash, "", disks).unwrap();
        };
        point(&images, &next, 1000);
        // Write i (1..=12) goes to disk i % 2 at time 1000 + 10 i, one page each.
        for i in 1..=12u64 {
            let d = (i % 2) as usize;
            let page = vec![i as u8; 4096];
            let off = (i * 4096) as usize;
            images[d][off..off + 4096].copy_from_slice(&page);
            hs[d]
                .append_timed(Seq(next[d]), &[test_record(&page, off as u64)], &[1000 + 10 * i as i64])
                .unwrap();
            next[d] += 1;
        }
        point(&images, &next, 2000);
        for t in [1005, 1010, 1015, 1075, 1090, 1115] {
            let pos = store.resolve_position(&vm, &PointSpec::Time(t)).unwrap();
            let made = ((t - 1000) / 10) as u64; // writes 1..=made were made by t
            let want: Vec<u64> =
                (0..2).map(|d| (1..=made).filter(|i| (i % 2) as usize == d).count() as u64).collect();
            assert_eq!(pos.seqs(), want.iter().map(|&s| Seq(s)).collect::<Vec<_>>(), "at {t}: {pos:?}");
        }
        // After the newest point: writes 13..=17, then the agent is gone. All of them were
        // appended by this process, in the VM's one order: everything is the moment.
        for i in 13..=17u64 {
            let d = (i % 2) as usize;
            let page = vec![i as u8; 4096];
            hs[d]
                .append_timed(Seq(next[d]), &[test_record(&page, i * 4096)], &[2000 + 10 * i as i64])
                .unwrap();
            hs[d].journal().sync().unwrap();
            next[d] += 1;
        }
        let pos = store.resolve_position(&vm, &PointSpec::Received).unwrap();
        assert_eq!(pos.between.as_ref().map(|b| (b.time_ms, b.next)), Some((2170, 0)), "{pos:?}");
        assert_eq!(pos.seqs(), [Seq(8), Seq(9)], "a: 2, 4, .., 16; b: 1, 3, .., 17");
        // A quiet disk (one write after the point) does not hold back the busy one.
        let vm2 = VmName::new("vm2").unwrap();
        let hs2 = store
            .register(&vm2, &[(names[0].clone(), SIZE as u64), (names[1].clone(), SIZE as u64)])
            .unwrap();
        let disks = (0..2)
            .map(|d| {
                let mut fp = Fingerprint::new();
                fp.push_data(&vec![0u8; SIZE]);
                PointDisk { disk: names[d].clone(), seq: Seq(0), fingerprint: fp.finish() }
            })
            .collect();
        store.make_point(&vm2, 1000, Consistency::Crash, "", disks).unwrap();
        hs2[1].append_timed(Seq(1), &[test_record(&[2u8; 4096], 0)], &[1050]).unwrap();
        for i in 1..=5u64 {
            hs2[0]
                .append_timed(Seq(i), &[test_record(&[i as u8; 4096], i * 4096)], &[1100 + i as i64])
                .unwrap();
        }
        for h in &hs2 {
            h.journal().sync().unwrap();
        }
        let pos = store.resolve_position(&vm2, &PointSpec::Received).unwrap();
        assert_eq!(pos.seqs(), [Seq(5), Seq(1)], "{pos:?}");
        // After a restart the records may not be one prefix (a crash between two disks'
        // fsyncs): each disk is trusted below its own last time only.
        drop((hs, hs2));
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let pos = store.resolve_position(&vm, &PointSpec::Received).unwrap();
        assert_eq!(pos.between.as_ref().map(|b| (b.time_ms, b.next)), Some((2159, 0)), "{pos:?}");
        assert_eq!(pos.seqs(), [Seq(7), Seq(8)], "a: 2, 4, .., 14; b: 1, 3, .., 15 (stamped 2150)");
        // vm2's quiet disk was written at 1050, before every write to the busy one: nothing
        // written from then on can be vouched for, so the point.
        let pos = store.resolve_position(&vm2, &PointSpec::Received).unwrap();
        assert!(pos.between.is_none() && pos.why_point.contains("restart"), "{pos:?}");
    }

    #[test]
    fn a_time_between_points_without_times_resolves_to_the_earlier_point() {
        let dir = tempfile::tempdir().unwrap();
        let (store, vm) = crate::retention::tests::setup(dir.path());
        let pos = store.resolve_position(&vm, &PointSpec::Time(1500)).unwrap();
        assert_eq!((pos.point.time_ms, &pos.between), (1000, &None));
        assert!(pos.why_point.contains("without the time"), "{}", pos.why_point);
        // After the newest point, with nothing written since: that point.
        let pos = store.resolve_position(&vm, &PointSpec::Time(9000)).unwrap();
        assert_eq!((pos.point.time_ms, &pos.between, pos.why_point.as_str()), (5000, &None, ""));
    }

    #[test]
    fn time_runs_round_trip_and_refuse_garbage() {
        let r = TimeRuns::of(7, &[5, 5, 6, 9, 9]);
        assert_eq!(r.runs, [(8, 5), (9, 6), (11, 9)]);
        assert_eq!(TimeRuns::decode(&r.encode()), Some(r));
        assert_eq!(TimeRuns::decode(&[1, 2, 3]), None);
        let backwards = TimeRuns { first: 1, runs: vec![(2, 9), (3, 8)] };
        assert_eq!(TimeRuns::decode(&backwards.encode()), None, "times never go down");
    }
}
