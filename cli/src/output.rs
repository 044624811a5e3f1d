//! What drctl prints: tables and lines for people, JSON with `--json`, progress of jobs.

use crate::error::CliError;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use tern_core::JobState;
use tern_proto as pb;
use tern_proto::admin_client::AdminClient;
use tonic::transport::Channel;

pub use tern_core::units::rfc3339;

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn point_json(p: &pb::PointInfo) -> Value {
    let mut v = json!({
        "id": p.id,
        "time": rfc3339(p.time_ms),
        "consistency": if p.consistency == pb::Consistency::App as i32 { "app" } else { "crash" },
        "disks": p.disks.iter().map(|d| json!({"name": d.disk, "seq": d.seq, "fingerprint": hex(&d.fingerprint)})).collect::<Vec<_>>(),
    });
    if !p.note.is_empty() {
        v["note"] = json!(p.note);
    }
    if !p.group.is_empty() {
        v["group"] = json!(p.group);
    }
    v
}

/// A VM's state as `drctl status` shows it (`initial-sync` before the first point).
pub fn state_name(s: &pb::VmStatus) -> &'static str {
    match pb::VmState::read(s.state) {
        Some(state) => state.shown(!s.initial_sync),
        None => "unknown",
    }
}

pub fn health_name(s: &pb::VmStatus) -> &'static str {
    pb::Health::read(s.health).map_or("unknown", tern_core::Health::as_str)
}

pub fn job_kind(j: &pb::JobInfo) -> &'static str {
    pb::JobKind::read(j.kind).map_or("unknown", tern_core::JobKind::as_str)
}

pub fn job_state(j: &pb::JobInfo) -> &'static str {
    pb::JobState::read(j.state).map_or("unknown", JobState::as_str)
}

pub fn status_json(s: &pb::VmStatus) -> Value {
    json!({
        "vm": s.vm,
        "state": state_name(s),
        "health": health_name(s),
        "agent_connected": s.agent_connected,
        "last_point": if s.last_point == 0 { Value::Null } else { json!(s.last_point) },
        "rpo_seconds": if s.rpo_seconds < 0 { Value::Null } else { json!(s.rpo_seconds) },
        "bytes_received": s.bytes_received,
        "storage_bytes": s.storage_bytes,
        // When retention last ran over the VM (not the policy's retention: that is in "policy").
        "retention_last_run": if s.retention_ms == 0 { Value::Null } else { json!(rfc3339(s.retention_ms)) },
        "retention_last_run_ms": if s.retention_ms == 0 { Value::Null } else { json!(s.retention_ms) },
        "error": if s.error.is_empty() { Value::Null } else { json!(s.error) },
        "group": if s.group.is_empty() { Value::Null } else { json!(s.group) },
        "test_failover": s.test_failover.as_ref().map(|t| json!({"point": t.point, "output": t.output})),
        "job": s.job.as_ref().map(job_json),
        "policy": s.policy.as_ref().map(policy_json).unwrap_or(Value::Null),
        "disks": s.disks.iter().map(|d| json!({"name": d.name, "size": d.size, "durable_seq": d.durable_seq, "journal_bytes": d.journal_bytes, "master_target_seq": d.master_target_seq, "tracking": (!d.tracking.is_empty()).then_some(&d.tracking), "backlog_bytes": d.backlog_bytes, "hot_bytes": d.hot_bytes, "pass_offset": (d.pass_offset > 0).then_some(d.pass_offset)})).collect::<Vec<_>>(),
    })
}

pub fn print_json(v: &Value) -> Result<(), CliError> {
    out!("{}", serde_json::to_string_pretty(v).map_err(|e| CliError::Local(e.to_string()))?);
    Ok(())
}

pub fn human_bytes(n: u64) -> String {
    tern_core::units::size_text(n)
}

pub fn print_point(p: &pb::PointInfo) {
    let kind = if p.consistency == pb::Consistency::App as i32 { "app" } else { "crash" };
    let group = if p.group.is_empty() { String::new() } else { format!("[multi-VM, group {}] ", p.group) };
    out!("{:>6}  {}  {:<5}  {group}{}", p.id, rfc3339(p.time_ms), kind, p.note);
}

pub fn dur(ms: u64) -> String {
    match ms {
        m if m % 86_400_000 == 0 => format!("{}d", m / 86_400_000),
        m if m % 3_600_000 == 0 => format!("{}h", m / 3_600_000),
        m if m % 60_000 == 0 => format!("{}m", m / 60_000),
        m if m % 1000 == 0 => format!("{}s", m / 1000),
        m => format!("{m}ms"),
    }
}

pub fn policy_json(p: &pb::PolicyInfo) -> Value {
    json!({
        "retention": dur(p.retention_ms),
        "crash_interval": dur(p.crash_interval_ms),
        "app_interval": dur(p.app_interval_ms),
        "rpo_threshold": dur(p.rpo_threshold_ms),
        "max_journal_bytes": (p.max_journal_bytes > 0).then_some(p.max_journal_bytes),
    })
}

/// A policy's bound on the VM's journals, for people.
pub fn journal_bound(bytes: u64) -> String {
    if bytes == 0 { "without a bound".into() } else { format!("at most {}", human_bytes(bytes)) }
}

pub fn job_json(j: &pb::JobInfo) -> Value {
    let mut v = json!({
        "id": j.id, "kind": job_kind(j), "vm": j.vm, "state": job_state(j), "phase": j.phase,
        "done": j.done, "total": j.total, "started": rfc3339(j.started_ms),
    });
    if j.ended_ms != 0 {
        v["ended"] = json!(rfc3339(j.ended_ms));
    }
    if !j.error.is_empty() {
        v["error"] = json!(j.error);
    }
    if let Some(o) = &j.output {
        v["result"] = output_json(o);
    }
    v
}

/// A job's output as JSON, in the shape of a failover's vm.json.
pub fn output_json(o: &pb::JobOutput) -> Value {
    let disks: Vec<Value> = o
        .disks
        .iter()
        .map(|d| {
            let mut v = json!({"name": d.name, "file": d.file, "size": d.size, "fingerprint": d.fingerprint});
            if !d.format.is_empty() {
                v["format"] = json!(d.format);
                v["virtual_size"] = json!(if d.virtual_size == 0 { d.size } else { d.virtual_size });
            }
            if !d.blake3.is_empty() {
                v["blake3"] = json!(d.blake3);
            }
            if d.seq > 0 {
                v["seq"] = json!(d.seq);
            }
            v
        })
        .collect();
    let mut v = json!({
        "vm": o.vm, "point": o.point, "time": o.time, "time_ms": o.time_ms,
        "consistency": o.consistency, "disks": disks,
    });
    if !o.between_points.is_empty() {
        v["between_points"] = json!(o.between_points);
    }
    if !o.note.is_empty() {
        v["note"] = json!(o.note);
    }
    v
}

/// An output directory names a place on the process server's host: a relative one would
/// be resolved against the wrong directory (this shell's, on another host), so it is refused.
pub fn absolute(p: &Path) -> Result<PathBuf, CliError> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Err(CliError::Usage(format!(
            "--output {}: give an absolute path; it names a directory on the process server's host",
            p.display()
        )))
    }
}

/// Follows a job to its end: a progress bar on a terminal, plain lines otherwise. Fails
/// with the job's error if it failed.
pub async fn wait_job(c: &mut AdminClient<Channel>, id: u64, quiet: bool) -> Result<pb::JobInfo, CliError> {
    follow_job(c, id, quiet, false).await
}

/// [`wait_job`]; with `pause`, it also returns while the job waits for the operator (a
/// plan at a manual step: its phase starts with "waiting:").
pub async fn follow_job(
    c: &mut AdminClient<Channel>,
    id: u64,
    quiet: bool,
    pause: bool,
) -> Result<pb::JobInfo, CliError> {
    use std::io::IsTerminal;
    let tty = !quiet && std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:32} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    });
    let mut last_line = String::new();
    // Without a terminal (a log, a pipe): how far a long phase has come, every 10 s (W16: a
    // 46 s full download printed its phase and nothing else).
    let mut told_at = std::time::Instant::now();
    let mut poll = std::time::Duration::from_millis(20);
    loop {
        let r = c.jobs(pb::JobsRequest { id }).await?.into_inner();
        let job = r.jobs.into_iter().next().ok_or_else(|| CliError::Server(format!("job {id} vanished")))?;
        if let Some(b) = &bar {
            b.set_message(format!("job {id}: {}", job.phase));
            b.set_length(job.total);
            b.set_position(job.done);
        } else if !quiet {
            let line = format!("job {id} ({} {}): {}", job_kind(&job), job.vm, job.phase);
            if line != last_line {
                eprintln!("{line}");
                last_line = line;
                told_at = std::time::Instant::now();
            } else if job.total > 0 && told_at.elapsed() >= std::time::Duration::from_secs(10) {
                #[allow(clippy::cast_precision_loss)]
                let pct = job.done as f64 * 100.0 / job.total as f64;
                eprintln!("{line}: {pct:.1}%");
                told_at = std::time::Instant::now();
            }
        }
        let state = pb::JobState::read(job.state)
            .ok_or_else(|| CliError::Server(format!("job {id} has an unknown state {}", job.state)))?;
        if state != JobState::Running || (pause && job.phase.starts_with("waiting:")) {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            if state == JobState::Failed {
                let kind = job_kind(&job).to_string();
                return Err(CliError::JobFailed { id, kind, vm: job.vm, error: job.error });
            }
            return Ok(job);
        }
        // Short jobs end within a few polls; long ones are asked every 200 ms.
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(std::time::Duration::from_millis(200));
    }
}

/// Prints what a failover-like job wrote (its vm.json).
pub fn print_output(job: &pb::JobInfo, as_json: bool) -> Result<(), CliError> {
    let Some(o) = &job.output else {
        return Err(CliError::Server(format!("job {} succeeded without saying what it wrote", job.id)));
    };
    if as_json {
        return print_json(&output_json(o));
    }
    match o.between_points.as_slice() {
        [a, 0] => out!(
            "{} written, after point {a} ({}-consistent: every write that reached the process server by then, \
             none after); every record applied matched its BLAKE3",
            o.time,
            o.consistency
        ),
        [a, b] => out!(
            "{} written, between points {a} and {b} ({}-consistent: every write made by then, none after); \
             every record applied matched its BLAKE3",
            o.time,
            o.consistency
        ),
        _ => out!(
            "point {} ({}, {}) written; every disk matches the point's fingerprint",
            o.point,
            o.time,
            o.consistency
        ),
    }
    if !o.note.is_empty() && o.between_points.is_empty() {
        out!("  {}", o.note);
    }
    for d in &o.disks {
        let (what, hash) =
            if d.blake3.is_empty() { ("fingerprint", &d.fingerprint) } else { ("blake3", &d.blake3) };
        out!("  {:<10} {}  {}  {what} {hash}", d.name, human_bytes(d.size), d.file);
    }
    Ok(())
}

/// An identity is never written over an existing file (it could be another identity, the
/// admin bundle even).
pub fn refuse_existing_file(path: &Path) -> Result<(), CliError> {
    if path.exists() {
        return Err(CliError::Usage(format!(
            "{} already exists; choose another file, or remove it first",
            path.display()
        )));
    }
    // A file that cannot be made is found before the server does anything for it.
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(CliError::Usage(format!(
            "{}: there is no directory {}; make it first, or choose another file",
            path.display(),
            parent.display()
        )));
    }
    Ok(())
}
