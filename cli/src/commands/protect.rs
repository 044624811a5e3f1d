//! Identities, status, points, checkpoints and policies of protected VMs.

use crate::Drctl;
use crate::args::Enroll;
use crate::error::CliError;
use crate::output::{
    dur, health_name, human_bytes, job_kind, journal_bound, point_json, policy_json, print_json, print_point,
    refuse_existing_file, state_name, status_json,
};
use serde_json::{Value, json};
use tern_proto as pb;

pub async fn enroll(d: &mut Drctl, e: Enroll) -> Result<(), CliError> {
    let (role, name, out) = match e {
        Enroll::Agent { vm, out } => (pb::Role::Agent, vm, out),
        Enroll::MasterTarget { name, out } => (pb::Role::MasterTarget, name, out),
        Enroll::Admin { out } => (pb::Role::Admin, String::new(), out),
    };
    refuse_existing_file(&out)?;
    let r = d.c.enroll(pb::EnrollRequest { role: role as i32, name: name.clone() }).await?.into_inner();
    if let Err(e) = tern_core::pki::write_private(&out, &r.bundle) {
        // Nobody holds it: it must not stay valid.
        let revoked =
            d.c.revoke(pb::RevokeRequest { serials: vec![r.serial.clone()], certificates: vec![] }).await;
        let what =
            if revoked.is_ok() { "revoked again" } else { "NOT revoked: revoke it with `drctl revoke`" };
        return Err(CliError::Local(format!("{e}; the identity issued (serial {}) is {what}", r.serial)));
    }
    if d.json {
        print_json(&json!({"identity": out.display().to_string(), "name": name, "serial": r.serial}))
    } else {
        let whom = if name.is_empty() { "an admin".to_string() } else { name };
        out!("wrote identity for {whom} to {} (serial {})", out.display(), r.serial);
        Ok(())
    }
}

pub async fn status(d: &mut Drctl, vm: Option<String>, check: bool) -> Result<(), CliError> {
    let r = d.c.status(pb::StatusRequest { vm: vm.clone().unwrap_or_default() }).await?.into_inner();
    if d.json {
        let v = match vm {
            Some(_) => r
                .vms
                .first()
                .map(status_json)
                .or_else(|| r.waiting.first().map(waiting_json))
                .unwrap_or(Value::Null),
            None => Value::Array(
                r.vms.iter().map(status_json).chain(r.waiting.iter().map(waiting_json)).collect(),
            ),
        };
        print_json(&v)?;
    } else {
        if !r.vms.is_empty() || r.waiting.is_empty() {
            print_table(&r.vms);
        }
        if vm.is_some() {
            print_disks(&r.vms);
        }
        if !r.groups.is_empty() {
            out!("");
            super::group::print_groups(&r.groups);
        }
        if !r.waiting.is_empty() {
            out!("");
            for w in &r.waiting {
                out!(
                    "{} is enrolled (identity issued {}); its agent has not connected yet (or not since \
                     the VM was removed): start it to protect the VM, or `drctl revoke` its identity if \
                     the VM is retired",
                    w.vm,
                    crate::output::rfc3339(w.enrolled_ms)
                );
            }
        }
    }
    if check {
        health_check(&r.vms, &r.waiting)?;
        super::group::groups_check(&r.groups)
    } else {
        Ok(())
    }
}

pub async fn remove(d: &mut Drctl, vm: String, delete_points: bool) -> Result<(), CliError> {
    // The VM's policy goes with it: read first, to say how to set it again.
    let policy =
        d.c.status(pb::StatusRequest { vm: vm.clone() })
            .await
            .ok()
            .and_then(|r| r.into_inner().vms.into_iter().next())
            .and_then(|s| s.policy);
    let r = d.c.remove_vm(pb::RemoveVmRequest { vm: vm.clone(), delete_points }).await?.into_inner();
    let restore = policy.as_ref().map(|p| {
        let mut cmd = format!(
            "drctl policy set {vm} --retention {} --crash-interval {} --rpo-threshold {}",
            crate::output::dur(p.retention_ms),
            crate::output::dur(p.crash_interval_ms),
            crate::output::dur(p.rpo_threshold_ms)
        );
        if p.app_interval_ms != 0 {
            cmd += &format!(" --app-interval {}", crate::output::dur(p.app_interval_ms));
        }
        if p.max_journal_bytes != 0 {
            cmd += &format!(" --max-journal {}", p.max_journal_bytes);
        }
        cmd
    });
    if d.json {
        return print_json(&json!({
            "removed": vm,
            "points_deleted": r.points_deleted,
            "plans": r.plans,
            "policy": policy.as_ref().map(crate::output::policy_json),
            "restore_policy": restore,
        }));
    }
    let points = if r.points_deleted == 1 { "recovery point" } else { "recovery points" };
    out!("VM {vm} removed: {} {points} and its stored copy deleted", r.points_deleted);
    for plan in &r.plans {
        eprintln!(
            "warning: recovery plan {plan} names VM {vm}: it cannot run until {vm} is protected here again, or \
             its file is applied without it (`drctl plan apply FILE`)"
        );
    }
    out!(
        "its agent, started again, protects it anew (a full sync); to retire it, `drctl revoke` its identity"
    );
    if let Some(cmd) = restore {
        out!(
            "its policy went with it (a new one starts with the defaults): once its agent has connected, `{cmd}`"
        );
    }
    Ok(())
}

/// An enrolled VM whose agent has not connected yet, in `status --json`'s shape: not
/// protected, and a warning (as `--check` counts it).
fn waiting_json(w: &pb::EnrolledVm) -> Value {
    json!({
        "vm": w.vm,
        "state": "unprotected",
        "health": "warning",
        "agent_connected": false,
        "enrolled": crate::output::rfc3339(w.enrolled_ms),
        "last_point": Value::Null,
        "rpo_seconds": Value::Null,
        "bytes_received": 0,
        "storage_bytes": 0,
        "retention_last_run": Value::Null,
        "retention_last_run_ms": Value::Null,
        "error": "enrolled; its agent has not connected yet",
        "group": Value::Null,
        "policy": Value::Null,
        "disks": [],
    })
}

/// The worst health among `vms`, as a monitoring check's outcome.
fn health_check(vms: &[pb::VmStatus], waiting: &[pb::EnrolledVm]) -> Result<(), CliError> {
    use tern_core::Health;
    // Every VM that is not normal, a line each, the critical ones first: a check names all
    // it found, not the first.
    let mut unhealthy: Vec<(Health, String)> = Vec::new();
    for s in vms {
        let h = pb::Health::read(s.health)
            .ok_or_else(|| CliError::Server(format!("VM {} has an unknown health {}", s.vm, s.health)))?;
        if h == Health::Normal {
            continue;
        }
        let why = if !s.error.is_empty() {
            s.error.clone()
        } else if !s.agent_connected {
            format!("its agent is not connected; RPO {}", rpo(s.rpo_seconds))
        } else {
            format!("RPO {}", rpo(s.rpo_seconds))
        };
        unhealthy.push((h, format!("VM {} is {h}: {why}", s.vm)));
    }
    // Enrolled, its agent never connected: not protected, though nothing is failing.
    for w in waiting {
        unhealthy.push((
            Health::Warning,
            format!(
                "VM {} is enrolled but its agent has not connected yet (or not since the VM was removed): it \
                 is not protected; `drctl revoke` its identity if the VM is retired",
                w.vm
            ),
        ));
    }
    unhealthy.sort_by_key(|(h, _)| *h != Health::Critical);
    let Some(worst) = unhealthy.first().map(|(h, _)| *h) else { return Ok(()) };
    let lines: Vec<String> = unhealthy.into_iter().map(|(_, line)| line).collect();
    Err(CliError::Unhealthy(worst, lines.join("\n")))
}

use tern_core::units::rpo_text as rpo;

fn print_table(vms: &[pb::VmStatus]) {
    let row = |cols: [&str; 7]| {
        out!(
            "{:<20} {:<18} {:<8} {:<6} {:>10} {:>8} {:>10}",
            cols[0],
            cols[1],
            cols[2],
            cols[3],
            cols[4],
            cols[5],
            cols[6]
        )
    };
    row(["VM", "STATE", "HEALTH", "AGENT", "LAST POINT", "RPO", "RECEIVED"]);
    for s in vms {
        let last = if s.last_point == 0 { "-".to_string() } else { s.last_point.to_string() };
        let agent = if s.agent_connected { "yes" } else { "no" };
        let (state, health) = (state_name(s), health_name(s));
        row([&s.vm, state, health, agent, &last, &rpo(s.rpo_seconds), &human_bytes(s.bytes_received)]);
    }
    for s in vms.iter().filter(|s| !s.error.is_empty()) {
        // Headed by the health it makes, not "replication is failing": a warning's cause (the
        // agent cannot write its state), a failed-over VM's output cut short, a failback cut
        // short are no failures of replication; each message says what it is.
        out!("{}: {}: {}", s.vm, health_name(s), s.error);
    }
}

/// One VM's disks: size, how the agent tracks them, what waits to be sent.
fn print_disks(vms: &[pb::VmStatus]) {
    for s in vms {
        if let Some(p) = &s.policy {
            out!("  policy: {}", policy_text(p));
        }
        for d in &s.disks {
            let mut line = format!("  disk {}: {}", d.name, human_bytes(d.size));
            if !d.tracking.is_empty() {
                line += &format!(", tracking {}", d.tracking);
            }
            if d.tracking == "scan" && d.pass_offset > 0 && d.size > 0 {
                let pct = u128::from(d.pass_offset.min(d.size)) * 100 / u128::from(d.size);
                line += &format!(", pass at {pct}% ({})", human_bytes(d.pass_offset));
            }
            if d.tracking != "scan" && !d.tracking.is_empty() {
                line +=
                    &format!(", backlog {}, hot {}", human_bytes(d.backlog_bytes), human_bytes(d.hot_bytes));
            }
            out!("{line}");
        }
        if let Some(j) = &s.job {
            let mut line = format!("  job {} ({}) running: {}", j.id, job_kind(j), j.phase);
            if j.total > 0 {
                let pct = u128::from(j.done.min(j.total)) * 1000 / u128::from(j.total);
                line += &format!(", {}.{}%", pct / 10, pct % 10);
            }
            out!("{line} (`drctl jobs --wait {}` follows it)", j.id);
        }
        if let Some(t) = &s.test_failover {
            out!(
                "  test failover open: point {} written to {} (`drctl test-failover-cleanup {}` when done; \
                 the point is kept until then)",
                t.point,
                t.output,
                s.vm
            );
        }
    }
}

pub async fn points(d: &mut Drctl, vm: String, limit: Option<u32>) -> Result<(), CliError> {
    let limit = limit.unwrap_or(if d.json { 0 } else { 100 });
    let r = d.c.points(pb::PointsRequest { vm: vm.clone(), limit }).await?.into_inner();
    if d.json {
        return print_json(&Value::Array(r.points.iter().map(point_json).collect()));
    }
    if r.points.is_empty() {
        out!("VM {vm} has no recovery points yet");
    } else {
        out!("{:>6}  {:<25}  {:<5}  NOTE", "ID", "TIME", "KIND");
        for p in &r.points {
            print_point(p);
        }
        if (r.points.len() as u64) < r.total {
            out!("the newest {} of {} points (--limit 0 lists all)", r.points.len(), r.total);
        }
    }
    Ok(())
}

pub async fn checkpoint(
    d: &mut Drctl,
    vm: String,
    app_consistent: bool,
    wait: bool,
    timeout: &str,
) -> Result<(), CliError> {
    let timeout = tern_core::units::parse_duration(timeout)?;
    let r =
        d.c.checkpoint(pb::CheckpointCall {
            vm: vm.clone(),
            app_consistent,
            wait,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        })
        .await?
        .into_inner();
    match (r.point, d.json) {
        (Some(p), true) => print_json(&point_json(&p))?,
        (Some(p), false) => print_point(&p),
        (None, true) => print_json(&json!({"requested": true}))?,
        (None, false) => out!("checkpoint requested; `drctl points {vm}` lists it once made"),
    }
    Ok(())
}

/// `[retention, crash interval, app interval, RPO threshold]`, and the journals' bound; one
/// left out keeps its value.
pub async fn set_policy(
    d: &mut Drctl,
    vm: String,
    values: [Option<String>; 4],
    max_journal: Option<String>,
) -> Result<(), CliError> {
    let mut ms = [0u64; 4];
    let flags = ["--retention", "--crash-interval", "--app-interval", "--rpo-threshold"];
    for ((m, v), flag) in ms.iter_mut().zip(&values).zip(flags) {
        if let Some(s) = v {
            *m = u64::try_from(tern_core::units::parse_duration(s)?.as_millis()).unwrap_or(u64::MAX);
            // 0 on the wire keeps a value: a 0 given would be taken as left out.
            if *m == 0 {
                return Err(CliError::Usage(format!("{flag} {s}: must be at least 1s")));
            }
        }
    }
    // 0 keeps the bound, the largest value removes it.
    let max_journal_bytes = match max_journal.as_deref().map(str::trim) {
        None => 0,
        Some("none") => u64::MAX,
        Some(s) => match tern_core::units::parse_size(s)? {
            0 => {
                return Err(CliError::Usage(format!("--max-journal {s}: give a size, or none for no bound")));
            }
            // Larger than any data directory: a mistyped unit (W19-B: stored as 8388608 TiB).
            b if b > 1 << 60 => {
                return Err(CliError::Usage(format!(
                    "--max-journal {s}: at most 1EiB, or none for no bound"
                )));
            }
            b => b,
        },
    };
    let policy = pb::PolicyInfo {
        retention_ms: ms[0],
        crash_interval_ms: ms[1],
        app_interval_ms: ms[2],
        rpo_threshold_ms: ms[3],
        max_journal_bytes,
    };
    let p = d.c.set_policy(pb::SetPolicyRequest { vm: vm.clone(), policy: Some(policy) }).await?.into_inner();
    print_policy(d, &vm, &p)
}

/// `drctl policy show VM`: the policy the server keeps for the VM.
pub async fn show_policy(d: &mut Drctl, vm: String) -> Result<(), CliError> {
    let r = d.c.status(pb::StatusRequest { vm: vm.clone() }).await?.into_inner();
    match r.vms.first().and_then(|s| s.policy.as_ref()) {
        Some(p) => print_policy(d, &vm, p),
        None if r.waiting.iter().any(|w| w.vm == vm) => Err(CliError::Local(format!(
            "VM {vm} has no policy yet: it is enrolled, and its agent has not connected (a VM's policy is \
             set once it has)"
        ))),
        None => Err(CliError::Local(format!("VM {vm} has no policy on this process server"))),
    }
}

fn print_policy(d: &Drctl, vm: &str, p: &pb::PolicyInfo) -> Result<(), CliError> {
    if d.json {
        return print_json(&policy_json(p));
    }
    out!("policy of {vm}: {}", policy_text(p));
    Ok(())
}

/// A policy in words, as `drctl policy set` and `show` and `status VM` print it.
fn policy_text(p: &pb::PolicyInfo) -> String {
    format!(
        "retention {}, crash points every {}, app points every {}, RPO threshold {}, journals {}",
        dur(p.retention_ms),
        dur(p.crash_interval_ms),
        dur(p.app_interval_ms),
        dur(p.rpo_threshold_ms),
        journal_bound(p.max_journal_bytes)
    )
}
