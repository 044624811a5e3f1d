//! `process-server check`: what a data directory holds, read while no server runs on it,
//! and the rebuild of a lost catalog from the journals.

use std::fmt::Write as _;
use std::path::Path;
use tern_store::RebuildReport;
use tern_store::{Store, StoreError};

/// Opens the data directory as the server would (checking every journal, cutting torn
/// tails) and describes each VM: its disks, its points and whether its data opened.
pub fn check(data_dir: &Path) -> Result<String, StoreError> {
    let store = Store::open(data_dir)?;
    let mut out = String::new();
    let vms = store.vms()?;
    for vm in &vms {
        if let Some(reason) = store.damaged(vm) {
            let _ = writeln!(out, "VM {vm}: DAMAGED: {reason}");
            continue;
        }
        let points = store.points(vm)?;
        let _ = writeln!(out, "VM {vm}: {} point(s){}", points.len(), newest(&points));
        for h in store.vm_disks(vm) {
            let (durable, segments) = (h.durable(), h.segment_count());
            let _ = writeln!(
                out,
                "  disk {}: {} bytes, base at record {}, journal to {} ({} segment(s))",
                h.name,
                h.size,
                h.base_seq().0,
                durable.0,
                segments
            );
        }
    }
    let _ = writeln!(out, "{} VM(s); run `drctl verify VM` to rebuild and check a point", vms.len());
    Ok(out)
}

fn newest(points: &[tern_store::Point]) -> String {
    points.last().map_or(String::new(), |p| {
        format!(", newest {} at {} ({})", p.id, tern_store::rfc3339(p.time_ms), p.consistency.as_str())
    })
}

/// Rebuilds the catalog and says what came back and what did not.
pub fn rebuild(data_dir: &Path) -> Result<String, StoreError> {
    let report = tern_store::rebuild_catalog(data_dir)?;
    // Run as root for a server that runs as its own user: the catalog must be the server's.
    let catalog = data_dir.join("catalog.db");
    crate::own_like(&catalog, data_dir).map_err(|e| StoreError::Io {
        path: catalog.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(describe(&report, data_dir))
}

fn describe(report: &RebuildReport, data_dir: &Path) -> String {
    let mut out = String::new();
    for vm in &report.vms {
        let _ = writeln!(out, "VM {}: {} point(s) rebuilt{}", vm.vm, vm.points.len(), newest(&vm.points));
        for d in &vm.disks {
            let _ = writeln!(
                out,
                "  disk {}: {} bytes, journal from record {} to {}",
                d.name,
                d.size,
                d.base_seq.0 + 1,
                d.durable.0
            );
        }
        for s in &vm.skipped {
            let _ = writeln!(out, "  not rebuilt: {s}");
        }
    }
    let _ = writeln!(
        out,
        "catalog rebuilt in {}: {} VM(s), {} point(s).\n\
         Not in the journals, so not rebuilt: policies (back to the defaults; set them again with \
         `drctl policy`), VM states (every VM is protected), open test failovers and failovers, \
         reprotect settings, jobs and point notes.\n\
         Every disk starts a new epoch: its agent compares block hashes before it sends again.\n\
         Start the server, then check the points with `drctl verify VM --point ID` (the scrub \
         also re-verifies every point in the background).",
        data_dir.join("catalog.db").display(),
        report.vms.len(),
        report.vms.iter().map(|v| v.points.len()).sum::<usize>()
    );
    out
}
