//! Test failover, failover, change of point, commit and verification.

use crate::Drctl;
use crate::args::OutFormat;
use crate::error::CliError;
use crate::output::{absolute, print_json, print_output, wait_job};
use serde_json::json;
use std::path::Path;
use tern_proto as pb;

pub async fn test_failover(
    d: &mut Drctl,
    vm: String,
    point: String,
    output: &Path,
    format: OutFormat,
) -> Result<(), CliError> {
    let output = absolute(output)?.display().to_string();
    let request = pb::TestFailoverRequest { vm, point, output, format: format.wire() };
    let started = d.c.test_failover(request).await?.into_inner();
    let job = wait_job(&mut d.c, started.job, d.json).await?;
    print_output(&job, d.json)
}

pub async fn cleanup(d: &mut Drctl, vm: String) -> Result<(), CliError> {
    let r = d.c.test_failover_cleanup(pb::CleanupRequest { vm: vm.clone() }).await?.into_inner();
    if d.json {
        return print_json(&json!({"removed": r.removed}));
    }
    out!("test failover of {vm} cleaned up; removed {} entries", r.removed.len());
    for f in &r.removed {
        out!("  {f}");
    }
    Ok(())
}

pub async fn failover(
    d: &mut Drctl,
    vm: String,
    kind: String,
    shutdown_source: bool,
    point: String,
    output: &Path,
    format: OutFormat,
) -> Result<(), CliError> {
    let output = absolute(output)?.display().to_string();
    let kind: tern_core::FailoverKind = kind
        .parse()
        .map_err(|e: tern_core::lifecycle::UnknownName| CliError::Usage(format!("--kind: {e}")))?;
    let kind = pb::FailoverKind::write(kind);
    let request =
        pb::FailoverRequest { vm: vm.clone(), kind, shutdown_source, point, output, format: format.wire() };
    let started = d.c.failover(request).await?.into_inner();
    let job = wait_job(&mut d.c, started.job, d.json).await?;
    print_output(&job, d.json)?;
    if !d.json {
        out!(
            "VM {vm} is failed over; check it, then `drctl commit {vm}` (or `drctl change-point {vm} --point ...`)"
        );
    }
    Ok(())
}

pub async fn change_point(d: &mut Drctl, vm: String, point: String) -> Result<(), CliError> {
    let started = d.c.change_point(pb::ChangePointRequest { vm, point }).await?.into_inner();
    let job = wait_job(&mut d.c, started.job, d.json).await?;
    print_output(&job, d.json)
}

pub async fn commit(d: &mut Drctl, vm: String) -> Result<(), CliError> {
    let r = d.c.commit(pb::CommitRequest { vm: vm.clone() }).await?.into_inner();
    if r.between_time_ms != 0 {
        let time = crate::output::rfc3339(r.between_time_ms);
        if d.json {
            return print_json(
                &json!({"vm": vm, "point": r.point, "time": time, "between_points": [r.point, r.between_next]}),
            );
        }
        if r.between_next == 0 {
            out!("{vm} committed at {time} (after point {})", r.point);
        } else {
            out!("{vm} committed at {time} (between points {} and {})", r.point, r.between_next);
        }
        return Ok(());
    }
    if d.json {
        return print_json(&json!({"vm": vm, "point": r.point}));
    }
    out!("{vm} committed at point {}", r.point);
    Ok(())
}

/// Exits 4 (a [`CliError::Mismatch`]) when a disk does not match the point's fingerprint.
pub async fn verify(d: &mut Drctl, vm: String, point: String) -> Result<(), CliError> {
    let r = match d.c.verify(pb::VerifyRequest { vm: vm.clone(), point }).await {
        Ok(r) => r.into_inner(),
        // A record the point needs failed its check as it was read: the point does not recover.
        Err(s) if s.code() == tonic::Code::DataLoss => {
            return Err(CliError::NotRecoverable(format!(
                "VM {vm}: the point does not recover: {}",
                s.message()
            )));
        }
        Err(s) => return Err(s.into()),
    };
    let ok = r.disks.iter().all(|d| d.ok);
    if d.json {
        let disks: Vec<_> = r
            .disks
            .iter()
            .map(|d| json!({"name": d.name, "expected": d.expected, "actual": d.actual, "ok": d.ok}))
            .collect();
        print_json(&json!({"vm": vm, "point": r.point, "ok": ok, "disks": disks}))?;
    } else {
        for d in &r.disks {
            if d.ok {
                out!("{:<10} ok        {}", d.name, d.actual);
            } else {
                out!("{:<10} MISMATCH  {} (the point says {})", d.name, d.actual, d.expected);
            }
        }
        out!("point {} of {vm}: {}", r.point, if ok { "verified" } else { "DOES NOT VERIFY" });
    }
    if ok { Ok(()) } else { Err(CliError::Mismatch { vm, point: r.point }) }
}
