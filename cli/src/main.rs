use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use std::path::PathBuf;
use tern_core::pki::Bundle;
use tern_proto as pb;
use tern_proto::admin_client::AdminClient;
use tonic::transport::Channel;

/// Prints a line on standard output. A reader that went away (`drctl status | head -1`)
/// ends drctl quietly instead of with a panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: cannot write to standard output: {e}");
            std::process::exit(1);
        }
    }};
}

/// tern operator CLI.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Process server, e.g. https://dr.example:7443
    #[arg(long, env = "DRCTL_SERVER", global = true)]
    server: Option<String>,
    /// Admin identity bundle (DATA_DIR/pki/admin.bundle of `process-server init`).
    #[arg(long, env = "DRCTL_IDENTITY", global = true)]
    identity: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OutFormat {
    Raw,
    Vhd,
}

impl OutFormat {
    fn wire(self) -> i32 {
        match self {
            OutFormat::Raw => pb::OutputFormat::Raw as i32,
            OutFormat::Vhd => pb::OutputFormat::Vhd as i32,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Issue an identity bundle.
    #[command(subcommand)]
    Enroll(Enroll),
    /// State, health, RPO, last point and bytes received of one VM or all.
    Status { vm: Option<String> },
    /// Recovery points of a VM, oldest first.
    Points { vm: String },
    /// Ask the VM's agent for a point now.
    Checkpoint {
        vm: String,
        /// Run the agent's freeze/thaw hooks around the point.
        #[arg(long)]
        app_consistent: bool,
        /// Wait until the point is durable and print it.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long, e.g. 10m.
        #[arg(long, default_value = "10m")]
        timeout: String,
    },
    /// Write the VM's disks at a point into a directory on the process server, without
    /// disturbing replication.
    TestFailover {
        vm: String,
        /// latest, latest-processed, latest-app, a point id, or an RFC 3339 time.
        #[arg(long, default_value = "latest-processed")]
        point: String,
        /// Absolute output directory on the process server's host.
        #[arg(long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "raw")]
        format: OutFormat,
    },
    /// Remove everything the open test failover of a VM made.
    TestFailoverCleanup { vm: String },
    /// Replication policy of a VM.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Fail a VM over: write its disks at a point and stop replicating it.
    Failover {
        vm: String,
        /// planned: shut the source down through its agent first and lose nothing (refused if
        /// that fails); unplanned: go on even when the source is unreachable.
        #[arg(long, value_parser = ["planned", "unplanned"])]
        kind: String,
        /// unplanned only: try the planned shutdown first, go on if it fails.
        #[arg(long)]
        shutdown_source: bool,
        /// latest, latest-processed, latest-app, a point id, or an RFC 3339 time (planned
        /// failovers always use the final point made after the shutdown).
        #[arg(long, default_value = "latest")]
        point: String,
        /// Absolute output directory on the process server's host.
        #[arg(long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "raw")]
        format: OutFormat,
    },
    /// Rewrite a failed-over VM's disks at another point (before commit).
    ChangePoint {
        vm: String,
        #[arg(long)]
        point: String,
    },
    /// End a failover: delete the VM's recovery points and journal, keep the base images.
    Commit { vm: String },
    /// Rebuild a point from the store and check every disk's fingerprint; exit 1 on a mismatch.
    Verify {
        vm: String,
        #[arg(long, default_value = "latest-processed")]
        point: String,
    },
    /// After a committed failover: protect the recovered VM back to a master target on the
    /// primary site. Writes the identity for the recovered VM's agent and prints its command.
    Reprotect {
        vm: String,
        /// The master target, e.g. https://onprem-mt:7444
        #[arg(long)]
        master_target: String,
        /// original: the on-premises disk (must exist with the same size; delta sync);
        /// alternate: a new disk (must not exist; created sparse, full sync).
        #[arg(long, value_parser = ["original", "alternate"])]
        location: String,
        /// NAME=PATH on the master target's host, for every disk of the VM.
        #[arg(long = "target-disk", required = true)]
        target_disks: Vec<String>,
        /// before: replicate continuously, failback drains the last changes; during: send
        /// everything at failback.
        #[arg(long, value_parser = ["before", "during"], default_value = "before")]
        sync: String,
        /// Where to write the recovered VM's agent identity.
        #[arg(long)]
        identity_out: PathBuf,
    },
    /// Shut the recovered VM down and apply its final state onto the primary site's disks.
    Failback { vm: String },
    /// After a committed failback: replicate from the primary site again.
    ReverseReplicate { vm: String },
    /// List jobs, or wait for one.
    Jobs {
        /// Wait until this job ends; exit non-zero if it failed.
        #[arg(long)]
        wait: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Change a VM's policy; options left out keep their value.
    Set {
        vm: String,
        /// How long points are kept (default 24h, at most 30d).
        #[arg(long)]
        retention: Option<String>,
        /// Time between crash-consistent points (default 5m, at least 1s).
        #[arg(long)]
        crash_interval: Option<String>,
        /// Time between app-consistent points (default 60m).
        #[arg(long)]
        app_interval: Option<String>,
        /// RPO above which health turns warning; twice it, critical (default 15m).
        #[arg(long)]
        rpo_threshold: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum Enroll {
    /// Identity for the mobility agent of one VM.
    Agent {
        #[arg(long)]
        vm: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Identity for a master target.
    MasterTarget {
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn client(cli: &Cli) -> anyhow::Result<AdminClient<Channel>> {
    let server =
        cli.server.as_deref().ok_or_else(|| anyhow!("no server: pass --server URL or set DRCTL_SERVER"))?;
    let identity = cli
        .identity
        .as_ref()
        .ok_or_else(|| anyhow!("no identity: pass --identity BUNDLE or set DRCTL_IDENTITY"))?;
    let bundle = Bundle::load(identity)?;
    let channel = pb::connect(server, &bundle).await?;
    Ok(AdminClient::new(channel))
}

/// Turns a gRPC status into an error that says what happened.
fn explain(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Unavailable
            if s.message().contains("transport")
                || s.message().contains("connection")
                || s.message().is_empty() =>
        {
            anyhow!(
                "the process server closed the connection ({}); is --identity a bundle issued by this deployment's CA?",
                pb::error_chain(&s)
            )
        }
        _ => anyhow!("{}", s.message()),
    }
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn point_json(p: &pb::PointInfo) -> Value {
    let mut v = json!({
        "id": p.id,
        "time": rfc3339(p.time_ms),
        "consistency": if p.consistency == pb::Consistency::App as i32 { "app" } else { "crash" },
        "disks": p.disks.iter().map(|d| json!({"name": d.disk, "seq": d.seq, "fingerprint": hex(&d.fingerprint)})).collect::<Vec<_>>(),
    });
    if !p.note.is_empty() {
        v["note"] = json!(p.note);
    }
    v
}

fn status_json(s: &pb::VmStatus) -> Value {
    json!({
        "vm": s.vm,
        "state": s.state,
        "health": s.health,
        "agent_connected": s.agent_connected,
        "last_point": if s.last_point == 0 { Value::Null } else { json!(s.last_point) },
        "rpo_seconds": if s.rpo_seconds < 0 { Value::Null } else { json!(s.rpo_seconds) },
        "bytes_received": s.bytes_received,
        "storage_bytes": s.storage_bytes,
        "error": if s.error.is_empty() { Value::Null } else { json!(s.error) },
        "policy": s.policy.as_ref().map(policy_json).unwrap_or(Value::Null),
        "disks": s.disks.iter().map(|d| json!({"name": d.name, "size": d.size, "durable_seq": d.durable_seq, "journal_bytes": d.journal_bytes, "master_target_seq": d.master_target_seq})).collect::<Vec<_>>(),
    })
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    out!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

fn print_point(p: &pb::PointInfo) {
    let kind = if p.consistency == pb::Consistency::App as i32 { "app" } else { "crash" };
    out!("{:>6}  {}  {:<5}  {}", p.id, rfc3339(p.time_ms), kind, p.note);
}

fn dur(ms: u64) -> String {
    match ms {
        m if m % 86_400_000 == 0 => format!("{}d", m / 86_400_000),
        m if m % 3_600_000 == 0 => format!("{}h", m / 3_600_000),
        m if m % 60_000 == 0 => format!("{}m", m / 60_000),
        m if m % 1000 == 0 => format!("{}s", m / 1000),
        m => format!("{m}ms"),
    }
}

fn policy_json(p: &pb::PolicyInfo) -> Value {
    json!({
        "retention": dur(p.retention_ms),
        "crash_interval": dur(p.crash_interval_ms),
        "app_interval": dur(p.app_interval_ms),
        "rpo_threshold": dur(p.rpo_threshold_ms),
    })
}

fn job_json(j: &pb::JobInfo) -> Value {
    let mut v = json!({
        "id": j.id, "kind": j.kind, "vm": j.vm, "state": j.state, "phase": j.phase,
        "done": j.done, "total": j.total, "started": rfc3339(j.started_ms),
    });
    if j.ended_ms != 0 {
        v["ended"] = json!(rfc3339(j.ended_ms));
    }
    if !j.error.is_empty() {
        v["error"] = json!(j.error);
    }
    if let Ok(r) = serde_json::from_str::<Value>(&j.result) {
        v["result"] = r;
    }
    v
}

fn absolute(p: &std::path::Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().context("current directory")?.join(p)
    })
}

/// Follows a job to its end: a progress bar on a terminal, plain lines otherwise. Fails
/// with the job's error if it failed.
async fn wait_job(c: &mut AdminClient<Channel>, id: u64, quiet: bool) -> anyhow::Result<pb::JobInfo> {
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
    let mut poll = std::time::Duration::from_millis(20);
    loop {
        let r = c.jobs(pb::JobsRequest { id }).await.map_err(explain)?.into_inner();
        let job = r.jobs.into_iter().next().ok_or_else(|| anyhow!("job {id} vanished"))?;
        if let Some(b) = &bar {
            b.set_message(format!("job {id}: {}", job.phase));
            b.set_length(job.total);
            b.set_position(job.done);
        } else if !quiet {
            let line = format!("job {id} ({} {}): {}", job.kind, job.vm, job.phase);
            if line != last_line {
                eprintln!("{line}");
                last_line = line;
            }
        }
        if job.state != "running" {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            if job.state == "failed" {
                anyhow::bail!("job {id} ({} of {}) failed: {}", job.kind, job.vm, job.error);
            }
            return Ok(job);
        }
        // Short jobs end within a few polls; long ones are asked every 200 ms.
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(std::time::Duration::from_millis(200));
    }
}

/// Prints what a failover-like job wrote (its vm.json).
fn print_output(job: &pb::JobInfo, as_json: bool) -> anyhow::Result<()> {
    let v: Value = serde_json::from_str(&job.result).unwrap_or(Value::Null);
    if as_json {
        return print_json(&v);
    }
    out!(
        "point {} ({}, {}) written; every disk matches the point's fingerprint",
        v["point"],
        v["time"].as_str().unwrap_or(""),
        v["consistency"].as_str().unwrap_or("")
    );
    for d in v["disks"].as_array().cloned().unwrap_or_default() {
        let (what, hash) = match d["blake3"].as_str() {
            Some(b) => ("blake3", b),
            None => ("fingerprint", d["fingerprint"].as_str().unwrap_or("")),
        };
        out!(
            "  {:<10} {}  {}  {what} {hash}",
            d["name"].as_str().unwrap_or(""),
            human_bytes(d["size"].as_u64().unwrap_or(0)),
            d["file"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

/// An identity is never written over an existing file (it could be another identity, the
/// admin bundle even).
fn refuse_existing_file(path: &std::path::Path) -> anyhow::Result<()> {
    if path.exists() {
        anyhow::bail!("{} already exists; choose another file, or remove it first", path.display());
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut c = client(&cli).await?;
    match &cli.cmd {
        Cmd::Enroll(e) => {
            let (role, name, out) = match e {
                Enroll::Agent { vm, out } => (pb::Role::Agent, vm, out),
                Enroll::MasterTarget { name, out } => (pb::Role::MasterTarget, name, out),
            };
            refuse_existing_file(out)?;
            let r = c
                .enroll(pb::EnrollRequest { role: role as i32, name: name.clone() })
                .await
                .map_err(explain)?
                .into_inner();
            tern_core::pki::write_private(out, &r.bundle)?;
            if cli.json {
                print_json(&json!({"identity": out.display().to_string(), "name": name}))?;
            } else {
                out!("wrote identity for {name} to {}", out.display());
            }
        }
        Cmd::Status { vm } => {
            let r = c
                .status(pb::StatusRequest { vm: vm.clone().unwrap_or_default() })
                .await
                .map_err(explain)?
                .into_inner();
            if cli.json {
                let v = match vm {
                    Some(_) => r.vms.first().map(status_json).unwrap_or(Value::Null),
                    None => Value::Array(r.vms.iter().map(status_json).collect()),
                };
                print_json(&v)?;
            } else {
                out!(
                    "{:<20} {:<14} {:<8} {:<6} {:>10} {:>8} {:>10}",
                    "VM",
                    "STATE",
                    "HEALTH",
                    "AGENT",
                    "LAST POINT",
                    "RPO",
                    "RECEIVED"
                );
                for s in &r.vms {
                    out!(
                        "{:<20} {:<14} {:<8} {:<6} {:>10} {:>8} {:>10}",
                        s.vm,
                        s.state,
                        s.health,
                        if s.agent_connected { "yes" } else { "no" },
                        if s.last_point == 0 { "-".to_string() } else { s.last_point.to_string() },
                        if s.rpo_seconds < 0 { "-".to_string() } else { format!("{}s", s.rpo_seconds) },
                        human_bytes(s.bytes_received)
                    );
                }
                for s in r.vms.iter().filter(|s| !s.error.is_empty()) {
                    out!("{}: replication is failing: {}", s.vm, s.error);
                }
            }
        }
        Cmd::Points { vm } => {
            let r = c.points(pb::PointsRequest { vm: vm.clone() }).await.map_err(explain)?.into_inner();
            if cli.json {
                print_json(&Value::Array(r.points.iter().map(point_json).collect()))?;
            } else if r.points.is_empty() {
                out!("VM {vm} has no recovery points yet");
            } else {
                out!("{:>6}  {:<25}  {:<5}  NOTE", "ID", "TIME", "KIND");
                for p in &r.points {
                    print_point(p);
                }
            }
        }
        Cmd::Checkpoint { vm, app_consistent, wait, timeout } => {
            let timeout = tern_core::units::parse_duration(timeout)?;
            let r = c
                .checkpoint(pb::CheckpointCall {
                    vm: vm.clone(),
                    app_consistent: *app_consistent,
                    wait: *wait,
                    timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                })
                .await
                .map_err(explain)?
                .into_inner();
            match (r.point, cli.json) {
                (Some(p), true) => print_json(&point_json(&p))?,
                (Some(p), false) => print_point(&p),
                (None, true) => print_json(&json!({"requested": true}))?,
                (None, false) => out!("checkpoint requested; `drctl points {vm}` lists it once made"),
            }
        }
        Cmd::TestFailover { vm, point, output, format } => {
            let output = absolute(output)?;
            let started = c
                .test_failover(pb::TestFailoverRequest {
                    vm: vm.clone(),
                    point: point.clone(),
                    output: output.display().to_string(),
                    format: format.wire(),
                })
                .await
                .map_err(explain)?
                .into_inner();
            let job = wait_job(&mut c, started.job, cli.json).await?;
            print_output(&job, cli.json)?;
        }
        Cmd::TestFailoverCleanup { vm } => {
            let r = c
                .test_failover_cleanup(pb::CleanupRequest { vm: vm.clone() })
                .await
                .map_err(explain)?
                .into_inner();
            if cli.json {
                print_json(&json!({"removed": r.removed}))?;
            } else {
                out!("test failover of {vm} cleaned up; removed {} entries", r.removed.len());
                for f in &r.removed {
                    out!("  {f}");
                }
            }
        }
        Cmd::Policy(PolicyCmd::Set { vm, retention, crash_interval, app_interval, rpo_threshold }) => {
            let ms = |v: &Option<String>| -> anyhow::Result<u64> {
                Ok(match v {
                    Some(s) => {
                        u64::try_from(tern_core::units::parse_duration(s)?.as_millis()).unwrap_or(u64::MAX)
                    }
                    None => 0,
                })
            };
            let p = c
                .set_policy(pb::SetPolicyRequest {
                    vm: vm.clone(),
                    policy: Some(pb::PolicyInfo {
                        retention_ms: ms(retention)?,
                        crash_interval_ms: ms(crash_interval)?,
                        app_interval_ms: ms(app_interval)?,
                        rpo_threshold_ms: ms(rpo_threshold)?,
                    }),
                })
                .await
                .map_err(explain)?
                .into_inner();
            if cli.json {
                print_json(&policy_json(&p))?;
            } else {
                out!(
                    "policy of {vm}: retention {}, crash points every {}, app points every {}, RPO threshold {}",
                    dur(p.retention_ms),
                    dur(p.crash_interval_ms),
                    dur(p.app_interval_ms),
                    dur(p.rpo_threshold_ms)
                );
            }
        }
        Cmd::Failover { vm, kind, shutdown_source, point, output, format } => {
            let output = absolute(output)?;
            let started = c
                .failover(pb::FailoverRequest {
                    vm: vm.clone(),
                    kind: kind.clone(),
                    shutdown_source: *shutdown_source,
                    point: point.clone(),
                    output: output.display().to_string(),
                    format: format.wire(),
                })
                .await
                .map_err(explain)?
                .into_inner();
            let job = wait_job(&mut c, started.job, cli.json).await?;
            print_output(&job, cli.json)?;
            if !cli.json {
                out!(
                    "VM {vm} is failed over; check it, then `drctl commit {vm}` (or `drctl change-point {vm} --point ...`)"
                );
            }
        }
        Cmd::ChangePoint { vm, point } => {
            let started = c
                .change_point(pb::ChangePointRequest { vm: vm.clone(), point: point.clone() })
                .await
                .map_err(explain)?
                .into_inner();
            let job = wait_job(&mut c, started.job, cli.json).await?;
            print_output(&job, cli.json)?;
        }
        Cmd::Commit { vm } => {
            let r = c.commit(pb::CommitRequest { vm: vm.clone() }).await.map_err(explain)?.into_inner();
            if cli.json {
                print_json(&json!({"vm": vm, "point": r.point}))?;
            } else {
                out!("{vm} committed at point {}", r.point);
            }
        }
        Cmd::Verify { vm, point } => {
            let r = c
                .verify(pb::VerifyRequest { vm: vm.clone(), point: point.clone() })
                .await
                .map_err(explain)?
                .into_inner();
            let ok = r.disks.iter().all(|d| d.ok);
            if cli.json {
                print_json(&json!({
                    "vm": vm, "point": r.point, "ok": ok,
                    "disks": r.disks.iter().map(|d| json!({"name": d.name, "expected": d.expected, "actual": d.actual, "ok": d.ok})).collect::<Vec<_>>(),
                }))?;
            } else {
                for d in &r.disks {
                    out!("{:<10} {}  {}", d.name, if d.ok { "ok      " } else { "MISMATCH" }, d.actual);
                }
                out!("point {} of {vm}: {}", r.point, if ok { "verified" } else { "DOES NOT VERIFY" });
            }
            if !ok {
                anyhow::bail!("point {} of {vm} does not verify", r.point);
            }
        }
        Cmd::Reprotect { vm, master_target, location, target_disks, sync, identity_out } => {
            refuse_existing_file(identity_out)?;
            let r = c
                .reprotect(pb::ReprotectRequest {
                    vm: vm.clone(),
                    master_target: master_target.clone(),
                    alternate: location == "alternate",
                    target_disks: target_disks.clone(),
                    sync: sync.clone(),
                })
                .await
                .map_err(explain)?
                .into_inner();
            tern_core::pki::write_private(identity_out, &r.bundle)?;
            let server = cli.server.clone().unwrap_or_default();
            let command = format!(
                "mobility-agent run --server {server} --identity {} --vm {vm} --disk NAME=<recovered disk> --state-dir <dir> --shutdown '<command that shuts the recovered VM down>'",
                identity_out.display()
            );
            if cli.json {
                print_json(
                    &json!({"vm": vm, "identity": identity_out.display().to_string(), "agent_command": command}),
                )?;
            } else {
                out!("VM {vm} is reprotected to {master_target} ({location} location, sync {sync}).");
                out!("Start the recovered VM's agent:\n  {command}");
            }
        }
        Cmd::Failback { vm } => {
            let started =
                c.failback(pb::FailbackRequest { vm: vm.clone() }).await.map_err(explain)?.into_inner();
            let job = wait_job(&mut c, started.job, cli.json).await?;
            print_output(&job, cli.json)?;
            if !cli.json {
                out!("VM {vm} failed back; start it on the primary site, then `drctl commit {vm}`");
            }
        }
        Cmd::ReverseReplicate { vm } => {
            c.reverse_replicate(pb::ReverseRequest { vm: vm.clone() }).await.map_err(explain)?;
            if cli.json {
                print_json(&json!({"vm": vm, "state": tern_core::VmState::Protected.as_str()}))?;
            } else {
                out!(
                    "VM {vm} replicates from the primary site again; start its agent on the on-premises disks"
                );
            }
        }
        Cmd::Jobs { wait } => match wait {
            Some(id) => {
                let job = wait_job(&mut c, *id, cli.json).await?;
                if cli.json {
                    print_json(&job_json(&job))?;
                } else {
                    out!("job {} ({} of {}) succeeded", job.id, job.kind, job.vm);
                }
            }
            None => {
                let r = c.jobs(pb::JobsRequest { id: 0 }).await.map_err(explain)?.into_inner();
                if cli.json {
                    print_json(&Value::Array(r.jobs.iter().map(job_json).collect()))?;
                } else {
                    out!("{:>5}  {:<20} {:<16} {:<10} {:<30} STARTED", "ID", "KIND", "VM", "STATE", "PHASE");
                    for j in &r.jobs {
                        out!(
                            "{:>5}  {:<20} {:<16} {:<10} {:<30} {}",
                            j.id,
                            j.kind,
                            j.vm,
                            j.state,
                            j.phase,
                            rfc3339(j.started_ms)
                        );
                        if !j.error.is_empty() {
                            out!("       error: {}", j.error);
                        }
                    }
                }
            }
        },
    }
    Ok(())
}
