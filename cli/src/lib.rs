//! drctl, the operator's command line, as a library: `args` (what each command takes),
//! `commands` (one module per family), `output` (tables, JSON, progress) and `error`
//! (what failed, and the exit code for it).

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

pub mod args;
mod commands;
pub mod error;
pub mod output;

use args::{Cli, Cmd, PolicyCmd};
use error::CliError;
use tern_core::pki::Bundle;
use tern_proto as pb;
use tern_proto::admin_client::AdminClient;
use tonic::transport::Channel;

/// A connected drctl: the admin client and how to print.
pub(crate) struct Drctl {
    pub c: AdminClient<Channel>,
    pub json: bool,
    pub server: String,
}

async fn client(cli: &Cli) -> Result<AdminClient<Channel>, CliError> {
    let server = cli
        .server
        .as_deref()
        .ok_or_else(|| CliError::Usage("no server: pass --server URL or set TERN_SERVER".into()))?;
    let identity = cli.identity.as_ref().ok_or_else(|| {
        CliError::Usage("no identity: pass --identity BUNDLE or set TERN_ADMIN_IDENTITY".into())
    })?;
    let bundle = Bundle::load(identity).map_err(|e| {
        CliError::Usage(format!(
            "cannot load the admin identity: {e}; pass the admin.bundle that `process-server init` \
             wrote in DATA_DIR/pki"
        ))
    })?;
    let what = format!("the admin identity {}", identity.display());
    let renew = "make a new one with `drctl enroll admin --out FILE` (with an admin identity still valid), or on \
                 the process server's host with `process-server enroll-admin --data-dir DATA_DIR --out FILE`";
    match bundle.expiry(tern_core::pki::now_ms(), &what, renew) {
        tern_core::pki::Expiry::Valid => {}
        tern_core::pki::Expiry::Soon(warning) => eprintln!("warning: {warning}"),
        tern_core::pki::Expiry::Expired(e) => return Err(CliError::Unreachable(e)),
    }
    let channel = pb::connect(server, &bundle).await?;
    Ok(AdminClient::new(channel).max_decoding_message_size(tern_proto::MAX_MESSAGE_BYTES))
}

/// Writes `bytes` to standard output; a reader that went away (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    match std::io::stdout().write_all(bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

/// Runs one command. `drctl status --check` exits 0-3 whatever happens (the monitoring
/// plugin convention): what is not a health verdict is 3, unknown.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let check = matches!(cli.cmd, Cmd::Status { check: true, .. });
    match run_command(cli).await {
        Err(e) if check && !matches!(e, CliError::Unhealthy(..)) => {
            Err(CliError::CheckUnknown(e.to_string()))
        }
        r => r,
    }
}

async fn run_command(mut cli: Cli) -> Result<(), CliError> {
    // The names of earlier releases, read last.
    cli.server = cli.server.or_else(|| std::env::var("DRCTL_SERVER").ok());
    cli.identity = cli.identity.or_else(|| std::env::var_os("DRCTL_IDENTITY").map(Into::into));
    // Generated from the CLI's definition; no server is asked.
    match cli.cmd {
        Cmd::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "drctl",
                &mut script,
            );
            return write_stdout(&script)
                .map_err(|e| CliError::Local(format!("cannot write the completions: {e}")));
        }
        Cmd::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut page)
                .and_then(|()| write_stdout(&page))
                .map_err(|e| CliError::Local(format!("cannot write the man page: {e}")))?;
            return Ok(());
        }
        _ => {}
    }
    let c = client(&cli).await?;
    let d = &mut Drctl { c, json: cli.json, server: cli.server.clone().unwrap_or_default() };
    use commands::{failback, failover, group, identity, jobs, plan, protect};
    match cli.cmd {
        Cmd::Enroll(e) => protect::enroll(d, e).await,
        Cmd::Status { vm, check } => protect::status(d, vm, check).await,
        Cmd::Points { vm, limit } => protect::points(d, vm, limit).await,
        Cmd::Checkpoint { vm, app_consistent, wait, timeout } => {
            protect::checkpoint(d, vm, app_consistent, wait, &timeout).await
        }
        Cmd::Policy(PolicyCmd::Set {
            vm,
            retention,
            crash_interval,
            app_interval,
            rpo_threshold,
            max_journal,
        }) => {
            protect::set_policy(d, vm, [retention, crash_interval, app_interval, rpo_threshold], max_journal)
                .await
        }
        Cmd::Policy(PolicyCmd::Show { vm }) => protect::show_policy(d, vm).await,
        Cmd::TestFailover { vm, point, output, format } => {
            failover::test_failover(d, vm, point, &output, format).await
        }
        Cmd::TestFailoverCleanup { vm } => failover::cleanup(d, vm).await,
        Cmd::Failover { vm, kind, shutdown_source, point, output, format } => {
            failover::failover(d, vm, kind, shutdown_source, point, &output, format).await
        }
        Cmd::ChangePoint { vm, point } => failover::change_point(d, vm, point).await,
        Cmd::Commit { vm } => failover::commit(d, vm).await,
        Cmd::Verify { vm, point } => failover::verify(d, vm, point).await,
        Cmd::Reprotect { vm, master_target, location, target_disks, sync, identity_out } => {
            let r = failback::Reprotect { vm, master_target, location, target_disks, sync, identity_out };
            failback::reprotect(d, r).await
        }
        Cmd::Remove { vm, delete_points } => protect::remove(d, vm, delete_points).await,
        Cmd::ReprotectCancel { vm, force } => failback::cancel_reprotect(d, vm, force).await,
        Cmd::Failback { vm, drill } => failback::failback(d, vm, drill).await,
        Cmd::ReverseReplicate { vm } => failback::reverse_replicate(d, vm).await,
        Cmd::Group(g) => group::run(d, g).await,
        Cmd::Plan(p) => plan::run(d, p).await,
        Cmd::Jobs { wait: Some(id), .. } => jobs::wait(d, id).await,
        Cmd::Jobs { wait: None, vm, state, kind } => jobs::list(d, &jobs::Filter { vm, state, kind }).await,
        Cmd::Identities => identity::list(d).await,
        Cmd::Revoke { serials, bundles } => identity::revoke(d, serials, &bundles).await,
        Cmd::Completions { .. } | Cmd::Man => Ok(()),
    }
}
