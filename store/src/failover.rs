//! Failover, change of point, commit, and verification of a point from the store.

use crate::catalog::{FailoverRow, Transition};
use crate::materialize::{Format, materialize_disk};
use crate::{DiskHandle, FailoverOutput, PointSpec, Position, Store, StoreError};
use std::path::{Path, PathBuf};
use tern_core::{FailoverKind, PointId, VmName, VmState};

/// One disk's fingerprint as the point records it and as the store recomputes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VerifiedDisk {
    pub name: String,
    pub expected: String,
    pub actual: String,
    pub ok: bool,
}

impl Store {
    /// Refuses, with `what` to do, unless `vm` is `wanted` (a check before long work; the
    /// state change itself checks again, atomically, in [`Store::transition`]).
    pub fn require_state(&self, vm: &VmName, wanted: VmState, what: &str) -> Result<(), StoreError> {
        let state = self.catalog().vm_state(vm)?;
        if state == wanted {
            Ok(())
        } else {
            Err(StoreError::WrongState { vm: vm.clone(), state: state.to_string(), what: what.to_string() })
        }
    }

    pub fn vm_state(&self, vm: &VmName) -> Result<VmState, StoreError> {
        self.catalog().vm_state(vm)
    }

    /// Fails `vm` over to `spec`: pins the point, marks the VM failed over and writes its
    /// disks to `out_dir`. If writing fails, the VM goes back to protected.
    pub fn failover(
        &self,
        vm: &VmName,
        kind: FailoverKind,
        spec: &PointSpec,
        out_dir: &Path,
        format: Format,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<FailoverOutput, StoreError> {
        self.failover_noted(vm, kind, spec, "", out_dir, format, progress)
    }

    /// [`Store::failover`], where `why` says why `spec` is not what the operator asked for
    /// (`latest` that could not be made): the output's note and `vm.json` say it.
    #[allow(clippy::too_many_arguments)]
    pub fn failover_noted(
        &self,
        vm: &VmName,
        kind: FailoverKind,
        spec: &PointSpec,
        why: &str,
        out_dir: &Path,
        format: Format,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<FailoverOutput, StoreError> {
        let row = FailoverRow {
            kind,
            point: PointId(0),
            output: out_dir.display().to_string(),
            format: String::new(),
            files: Vec::new(),
            between: None,
        };
        self.require_state(vm, VmState::Protected, Transition::FailOver(row.clone()).refusal())?;
        let position = self.resolve_position(vm, spec)?.noted(why);
        let handles = self.point_disks(vm, &position.point)?;
        let files = output_files(&handles, out_dir, format)?;
        refuse_existing(&files, out_dir)?;
        self.transition(
            vm,
            Transition::FailOver(FailoverRow {
                point: position.point.id,
                format: format.extension().to_string(),
                files: files.iter().map(|f| f.display().to_string()).collect(),
                between: position.between.clone(),
                ..row
            }),
        )?;
        // Failed over, nothing written yet: a stop here leaves an output that is not whole.
        crate::failpoint("failover-before-output")?;
        match self.write_output(
            vm,
            &position,
            &handles,
            &files,
            &out_dir.join("vm.json"),
            out_dir,
            format,
            progress,
        ) {
            Ok(out) => {
                self.catalog().set_failover_written(vm)?;
                Ok(out)
            }
            Err(e) => {
                self.transition(vm, Transition::AbandonFailover)?;
                Err(e)
            }
        }
    }

    /// Rewrites the failover output at another point (before commit).
    pub fn change_point(
        &self,
        vm: &VmName,
        spec: &PointSpec,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<FailoverOutput, StoreError> {
        self.change_point_noted(vm, spec, "", progress)
    }

    /// [`Store::change_point`], with why the position is not the moment asked for (the
    /// output's note), as [`Store::failover_noted`].
    pub fn change_point_noted(
        &self,
        vm: &VmName,
        spec: &PointSpec,
        why: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<FailoverOutput, StoreError> {
        self.require_state(
            vm,
            VmState::FailedOver,
            "only a failed-over, uncommitted VM can change its point",
        )?;
        let row =
            self.catalog().failover(vm)?.ok_or(StoreError::Invariant("failed-over VM without failover"))?;
        let position = self.resolve_position(vm, spec)?.noted(why);
        self.rewrite_output(vm, &row, &position, progress)
    }

    /// Writes a failover's output again at its own position when it was not written whole
    /// (the failover or a change of point cut short by a stop of the process server), as
    /// `drctl change-point` to that position would: what a recovery plan's `continue` does
    /// for a VM it already failed over. `None` when the output is whole.
    pub fn finish_failover_output(
        &self,
        vm: &VmName,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Option<FailoverOutput>, StoreError> {
        self.require_state(
            vm,
            VmState::FailedOver,
            "only a failed-over, uncommitted VM has a failover output",
        )?;
        if self.catalog().failover_written(vm)? {
            return Ok(None);
        }
        let row =
            self.catalog().failover(vm)?.ok_or(StoreError::Invariant("failed-over VM without failover"))?;
        let point = self.resolve_point(vm, &PointSpec::Id(row.point))?;
        let position = Position { point, between: row.between.clone(), why_point: String::new() };
        self.rewrite_output(vm, &row, &position, progress).map(Some)
    }

    /// Removes the failover's output and writes it at `position`, marked whole once done.
    fn rewrite_output(
        &self,
        vm: &VmName,
        row: &FailoverRow,
        position: &Position,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<FailoverOutput, StoreError> {
        let format = if row.format == "vhd" { Format::Vhd } else { Format::Raw };
        let out_dir = PathBuf::from(&row.output);
        remove_outputs(row)?;
        let handles = self.point_disks(vm, &position.point)?;
        let files = output_files(&handles, &out_dir, format)?;
        let listed: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        self.catalog().change_failover(vm, position.point.id, position.between.as_ref(), &listed)?;
        let manifest = out_dir.join("vm.json");
        let out = self.write_output(vm, position, &handles, &files, &manifest, &out_dir, format, progress)?;
        self.catalog().set_failover_written(vm)?;
        Ok(out)
    }

    /// For a failed-over VM whose output was not written whole (a failover or change of
    /// point cut short): what to do about it.
    pub fn failover_not_whole(&self, vm: &VmName) -> Result<Option<String>, StoreError> {
        if self.vm_state(vm)? != VmState::FailedOver || self.catalog().failover_written(vm)? {
            return Ok(None);
        }
        let row =
            self.catalog().failover(vm)?.ok_or(StoreError::Invariant("failed-over VM without failover"))?;
        Ok(Some(format!(
            "its failover output in {} was not written whole (the failover or change of point was cut short): \
             write it with `drctl change-point {vm} --point {}`",
            row.output,
            point_arg_of(&row)
        )))
    }

    /// Ends the failover: the base images move to the failover point (reverse replication
    /// reuses them), then the points and the journals are deleted.
    pub fn commit(&self, vm: &VmName) -> Result<PointId, StoreError> {
        self.require_state(vm, VmState::FailedOver, Transition::CommitFailover.refusal())?;
        let row =
            self.catalog().failover(vm)?.ok_or(StoreError::Invariant("failed-over VM without failover"))?;
        if !self.catalog().failover_written(vm)? {
            return Err(not_whole(vm, &row));
        }
        let point = self.resolve_point(vm, &PointSpec::Id(row.point))?;
        let position = Position { point, between: row.between.clone(), why_point: String::new() };
        for (pd, seq) in position.point.disks.iter().zip(position.seqs()) {
            if let Some(h) = self.disk(vm, &pd.disk) {
                self.advance_base(&h, seq)?;
            }
        }
        // The bookmarks stay until the journals go below: a catalog rebuild in between must
        // not bring the points back.
        if let Some(last) = self.points(vm)?.last() {
            crate::rebuild::mark_points_deleted(self.root(), vm, last.id)?;
        }
        self.transition(vm, Transition::CommitFailover)?;
        // Committed, the journals not yet deleted: the next open deletes them.
        crate::failpoint("commit-before-journal-delete")?;
        for h in self.vm_disks(vm) {
            let _exclusive = h.write_lock();
            h.journal().delete_all(h.base_seq())?;
            h.forget_damage();
        }
        tracing::info!(vm = %vm, position = %position.describe(),
            "failover committed; points and journals deleted, base images kept");
        Ok(position.point.id)
    }

    /// Rebuilds each disk of the point from the store and recomputes its fingerprint.
    pub fn verify(&self, vm: &VmName, spec: &PointSpec) -> Result<(PointId, Vec<VerifiedDisk>), StoreError> {
        let point = self.resolve_point(vm, spec)?;
        let scratch = self.root().join("tmp");
        crate::durable::create_dir_durable(&scratch)?;
        // The scratch copy holds at most the base's data and the journal's, and never more
        // than the disk: refused, not begun, where it would eat the room replication and
        // retention need.
        use std::os::unix::fs::MetadataExt;
        let need: u64 = self
            .point_disks(vm, &point)?
            .iter()
            .map(|h| {
                (std::fs::metadata(&h.base_path).map_or(0, |m| m.blocks() * 512) + h.journal_bytes())
                    .min(h.size)
            })
            .sum();
        let free = crate::reserve::free_bytes(&scratch)?;
        let (reserve, want) = (self.reserve().bytes(), need.saturating_add(self.reserve().bytes()));
        if free < want {
            return Err(StoreError::Io {
                path: scratch.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    format!(
                        "rebuilding the point takes up to {need} bytes of scratch space here (its disks' base \
                         images and journals, at most their size), and {reserve} more stay free for the space \
                         reserve (retention's room to fold); {free} are free: free another {} bytes, or verify \
                         once retention has folded older points",
                        want - free
                    ),
                ),
            });
        }
        let mut out = Vec::new();
        for (h, pd) in self.point_disks(vm, &point)?.into_iter().zip(&point.disks) {
            // Unique per call: the scrub and `drctl verify` may rebuild the same disk at once.
            static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = scratch.join(format!("verify-{}-{}-{}-{n}.raw", vm, h.name, std::process::id()));
            let result = materialize_disk(
                &h,
                pd.seq,
                Some(pd.fingerprint),
                &path,
                Format::Raw,
                &self.zeroes,
                &mut |_| {},
            );
            let _ = std::fs::remove_file(&path);
            let actual = match result {
                Ok(d) => d.fingerprint,
                Err(StoreError::FingerprintMismatch { actual, .. }) => actual.to_hex(),
                Err(e) => return Err(e),
            };
            let expected = pd.fingerprint.to_hex();
            out.push(VerifiedDisk { name: h.name.to_string(), ok: actual == expected, expected, actual });
        }
        Ok((point.id, out))
    }
}

/// What `drctl change-point VM --point ARG` takes to write the failover's own position
/// again: its point, or for a moment between or after points that moment (`latest` for
/// everything received after the newest point).
pub(crate) fn point_arg_of(row: &FailoverRow) -> String {
    match &row.between {
        Some(b) if b.next == 0 => "latest".to_string(),
        Some(b) => crate::rfc3339(b.time_ms),
        None => row.point.to_string(),
    }
}

/// Why a commit (which deletes every other point) waits: the failover's output was not
/// written whole since its point was chosen (a failover or change of point cut short).
fn not_whole(vm: &VmName, row: &FailoverRow) -> StoreError {
    StoreError::WrongState {
        vm: vm.clone(),
        state: VmState::FailedOver.to_string(),
        what: format!(
            "its failover output in {} was not written whole (the failover or change of point was cut \
             short); write it with `drctl change-point {vm} --point {}` first, then commit",
            row.output,
            point_arg_of(row)
        ),
    }
}

/// Removes what a failover wrote: its disk files and its vm.json (those already gone are
/// no error). Every file is tried; the first that would not go is the error.
pub(crate) fn remove_outputs(row: &FailoverRow) -> Result<(), StoreError> {
    let manifest = Path::new(&row.output).join("vm.json");
    let mut first = Ok(());
    for f in row.files.iter().map(PathBuf::from).chain(std::iter::once(manifest)) {
        match std::fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                if first.is_ok() {
                    first = Err(StoreError::Io { path: f.display().to_string(), source: e });
                }
            }
        }
    }
    // The removal holds across a crash before the catalog forgets the row (a missing
    // directory was removed with its files).
    let dir = Path::new(&row.output);
    if first.is_ok() && dir.is_dir() {
        first = crate::durable::sync_dir(dir);
    }
    first
}

/// The largest disk a VHD holds: 2040 GiB (the format's CHS limit, which qemu's vpc driver
/// and Hyper-V enforce).
pub const VHD_MAX_BYTES: u64 = 2040 << 30;

/// Each disk's output file in `dir`; a disk too large for a VHD is refused before anything
/// is written.
pub(crate) fn output_files(
    handles: &[std::sync::Arc<crate::DiskHandle>],
    dir: &Path,
    format: Format,
) -> Result<Vec<PathBuf>, StoreError> {
    if format == Format::Vhd
        && let Some(h) = handles.iter().find(|h| h.size > VHD_MAX_BYTES)
    {
        return Err(StoreError::VhdTooLarge { disk: h.name.to_string(), size: h.size });
    }
    Ok(handles.iter().map(|h| dir.join(format!("{}.{}", h.name, format.extension()))).collect())
}

pub(crate) fn refuse_existing(files: &[PathBuf], dir: &Path) -> Result<(), StoreError> {
    for f in files.iter().chain(std::iter::once(&dir.join("vm.json"))) {
        if f.exists() {
            return Err(StoreError::OutputExists(f.display().to_string()));
        }
    }
    Ok(())
}

impl Store {
    /// A rehearsal of a failback's apply (a master target): `disk` as of `upto` written to a
    /// scratch copy beside the store, its fingerprint checked against `expected`, the copy
    /// removed. The target disk and the journal are only read. Returns the BLAKE3 and the
    /// fingerprint of the copy.
    pub fn drill_disk(
        &self,
        disk: &DiskHandle,
        upto: tern_core::Seq,
        expected: tern_core::Digest,
    ) -> Result<(String, String), StoreError> {
        let scratch = self.root.join("tmp");
        crate::durable::create_dir_durable(&scratch)?;
        let path = scratch.join(format!("drill-{}-{}.raw", disk.vm, disk.name));
        let made =
            materialize_disk(disk, upto, Some(expected), &path, Format::Raw, &self.zeroes, &mut |_| {});
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(PathBuf::from(format!("{}.partial", path.display())));
        made.map(|o| (o.blake3, o.fingerprint))
    }
}
