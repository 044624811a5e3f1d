use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tern_core::pki::{Bundle, Role};

/// tern master target: receives the failback stream at the primary site and applies it
/// onto the on-premises disks.
#[derive(Parser, Debug)]
#[command(name = "master-target", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("TERN_GIT_REV"), ")"))]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve the process server's relayed failback stream.
    Serve {
        /// Journal and catalog of the failback stream.
        #[arg(long)]
        data_dir: PathBuf,
        /// Address to listen on (port 0 picks a free port and prints it).
        #[arg(long)]
        listen: String,
        /// Identity from `drctl enroll master-target --name NAME --out FILE`.
        #[arg(long)]
        identity: PathBuf,
        /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9466 (off by default).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
    },
}

fn main() {
    tern_proto::daemon::init();
    use tern_proto::daemon::{Misconfigured, ServeError};
    // No restart mends these: exit 2, which the unit does not restart.
    tern_proto::daemon::exit_on(run(), |e| {
        e.downcast_ref::<Misconfigured>().is_some()
            || e.downcast_ref::<ServeError>().is_some_and(ServeError::for_good)
    });
}

fn run() -> anyhow::Result<()> {
    let Cmd::Serve { data_dir, listen, identity, metrics } = tern_proto::config::parse::<Cli>().cmd;
    // An identity that does not load or is another role's: exit 2, as for a bad flag.
    let misconfigured = |e: String| tern_proto::daemon::Misconfigured(e);
    let bundle = Bundle::load(&identity)
        .map_err(|e| misconfigured(format!("loading identity {}: {e:#}", identity.display())))?;
    match bundle.role().map_err(|e| misconfigured(format!("identity {}: {e:#}", identity.display())))? {
        Role::MasterTarget(_) => {}
        other => {
            return Err(misconfigured(format!(
                "{} is the identity of the {other}; enroll one with `drctl enroll master-target --name NAME --out FILE`",
                identity.display()
            ))
            .into());
        }
    }
    let what = format!("the master target's identity {}", identity.display());
    let renew = "enroll a new one (`drctl enroll master-target --name NAME --out FILE`, the same name), put it in \
                 place and restart the master target";
    match bundle.expiry(tern_core::pki::now_ms(), &what, renew) {
        tern_core::pki::Expiry::Valid => {}
        tern_core::pki::Expiry::Soon(w) => tracing::warn!("{w}"),
        // A restart cannot mend it: exit 2, which the unit does not restart.
        tern_core::pki::Expiry::Expired(e) => {
            tern_proto::daemon::report_fatal(&e);
            std::process::exit(2);
        }
    }
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        if let Some(addr) = metrics {
            tern_proto::metrics::serve(addr, None)?;
            metrics::describe_counter!(
                "tern_mt_received_bytes_total",
                metrics::Unit::Bytes,
                "Bytes received from the process server's relay."
            );
            metrics::describe_gauge!("tern_mt_durable_seq", "Last record of the disk made durable here.");
        }
        let shutdown = tern_proto::daemon::shutdown_on_signal();
        let config = tern_master_target::Config { data_dir, identity: bundle };
        Ok(tern_master_target::run(config, listener, shutdown).await?)
    })
}
