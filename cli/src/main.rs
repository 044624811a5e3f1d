use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use std::path::PathBuf;
use tern_core::pki::Bundle;
use tern_proto as pb;
use tern_proto::admin_client::AdminClient;
use tonic::transport::Channel;

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
        /// A point id or latest-processed.
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
        "disks": s.disks.iter().map(|d| json!({"name": d.name, "size": d.size, "durable_seq": d.durable_seq, "journal_bytes": d.journal_bytes})).collect::<Vec<_>>(),
    })
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
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
    println!("{:>6}  {}  {:<5}  {}", p.id, rfc3339(p.time_ms), kind, p.note);
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut c = client(&cli).await?;
    match &cli.cmd {
        Cmd::Enroll(e) => {
            let (role, name, out) = match e {
                Enroll::Agent { vm, out } => (pb::Role::Agent, vm, out),
                Enroll::MasterTarget { name, out } => (pb::Role::MasterTarget, name, out),
            };
            let r = c
                .enroll(pb::EnrollRequest { role: role as i32, name: name.clone() })
                .await
                .map_err(explain)?
                .into_inner();
            tern_core::pki::write_private(out, &r.bundle)?;
            if cli.json {
                print_json(&json!({"identity": out.display().to_string(), "name": name}))?;
            } else {
                println!("wrote identity for {name} to {}", out.display());
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
                println!(
                    "{:<20} {:<14} {:<8} {:<6} {:>10} {:>8} {:>10}",
                    "VM", "STATE", "HEALTH", "AGENT", "LAST POINT", "RPO", "RECEIVED"
                );
                for s in &r.vms {
                    println!(
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
            }
        }
        Cmd::Points { vm } => {
            let r = c.points(pb::PointsRequest { vm: vm.clone() }).await.map_err(explain)?.into_inner();
            if cli.json {
                print_json(&Value::Array(r.points.iter().map(point_json).collect()))?;
            } else if r.points.is_empty() {
                println!("VM {vm} has no recovery points yet");
            } else {
                println!("{:>6}  {:<25}  {:<5}  NOTE", "ID", "TIME", "KIND");
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
                (None, false) => println!("checkpoint requested; `drctl points {vm}` lists it once made"),
            }
        }
        Cmd::TestFailover { vm, point, output, format } => {
            let output = if output.is_absolute() {
                output.clone()
            } else {
                std::env::current_dir().context("current directory")?.join(output)
            };
            if !cli.json {
                eprintln!("test failover of {vm} to point {point} into {} ...", output.display());
            }
            let r = c
                .test_failover(pb::TestFailoverRequest {
                    vm: vm.clone(),
                    point: point.clone(),
                    output: output.display().to_string(),
                    format: match format {
                        OutFormat::Raw => pb::OutputFormat::Raw,
                        OutFormat::Vhd => pb::OutputFormat::Vhd,
                    } as i32,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if cli.json {
                print_json(&json!({
                    "vm": vm,
                    "point": r.point,
                    "time": rfc3339(r.time_ms),
                    "output": r.output,
                    "disks": r.disks.iter().map(|d| json!({"name": d.name, "file": d.file, "size": d.size, "blake3": d.blake3, "fingerprint": d.fingerprint})).collect::<Vec<_>>(),
                }))?;
            } else {
                println!(
                    "point {} ({}) written to {}; every disk matches the point's fingerprint",
                    r.point,
                    rfc3339(r.time_ms),
                    r.output
                );
                for d in &r.disks {
                    println!("  {:<10} {}  {}  blake3 {}", d.name, human_bytes(d.size), d.file, d.blake3);
                }
            }
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
                println!("test failover of {vm} cleaned up; removed {} entries", r.removed.len());
                for f in &r.removed {
                    println!("  {f}");
                }
            }
        }
    }
    Ok(())
}
