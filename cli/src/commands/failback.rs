//! The way back: reprotect, failback, reverse replication.

use crate::Drctl;
use crate::error::CliError;
use crate::output::{print_json, print_output, refuse_existing_file, wait_job};
use serde_json::{Value, json};
use std::path::PathBuf;
use tern_proto as pb;

pub struct Reprotect {
    pub vm: String,
    pub master_target: String,
    pub location: String,
    pub target_disks: Vec<String>,
    pub sync: String,
    pub identity_out: PathBuf,
}

pub async fn reprotect(d: &mut Drctl, r: Reprotect) -> Result<(), CliError> {
    refuse_existing_file(&r.identity_out)?;
    let reply =
        d.c.reprotect(pb::ReprotectRequest {
            vm: r.vm.clone(),
            master_target: r.master_target.clone(),
            alternate: r.location == "alternate",
            target_disks: r.target_disks.clone(),
            sync: pb::SyncMode::write(
                r.sync.parse().map_err(|e: tern_core::lifecycle::UnknownName| {
                    CliError::Usage(format!("--sync: {e}"))
                })?,
            ),
        })
        .await?
        .into_inner();
    tern_core::pki::write_private(&r.identity_out, &reply.bundle)?;
    let (vm, identity) = (&r.vm, r.identity_out.display().to_string());
    let command = agent_command(&d.server, &identity, vm, &reply.recovered_disks);
    if d.json {
        return print_json(&json!({"vm": vm, "identity": identity, "agent_command": command}));
    }
    out!("VM {vm} is reprotected to {} ({} location, sync {}).", r.master_target, r.location, r.sync);
    out!("Start the recovered VM's agent:\n  {command}");
    out!("(add `--mode nbd` when the recovered VM is to run its disks through the agent, the io path)");
    Ok(())
}

/// The command that starts a reprotected VM's agent beside the recovered VM: one `--disk`
/// per disk the master target receives (`NAME=PATH`, as the server names them).
pub fn agent_command(server: &str, identity: &str, vm: &str, disks: &[String]) -> String {
    let disks: String = disks.iter().map(|d| format!(" --disk {d}")).collect();
    format!(
        "mobility-agent run --server {server} --identity {identity} --vm {vm}{disks} --state-dir <dir> --shutdown '<command that shuts the recovered VM down>'"
    )
}

pub async fn failback(d: &mut Drctl, vm: String, drill: bool) -> Result<(), CliError> {
    let started = d.c.failback(pb::FailbackRequest { vm: vm.clone(), drill }).await?.into_inner();
    let job = wait_job(&mut d.c, started.job, d.json).await?;
    print_output(&job, d.json)?;
    if drill {
        if !d.json {
            out!(
                "failback of {vm} rehearsed: the master target applied that point onto scratch copies, verified them and removed them; the VM runs on, nothing changed"
            );
        }
        return Ok(());
    }
    if !d.json {
        out!("VM {vm} failed back; start it on the primary site, then `drctl commit {vm}`");
    }
    Ok(())
}

pub async fn cancel_reprotect(d: &mut Drctl, vm: String, force: bool) -> Result<(), CliError> {
    let r = d.c.cancel_reprotect(pb::CancelReprotectRequest { vm: vm.clone(), force }).await?.into_inner();
    if d.json {
        return print_json(&json!({
            "vm": vm,
            "state": tern_core::VmState::FailoverCommitted.as_str(),
            "master_target_released": r.released,
            "revoked_serial": if r.revoked_serial.is_empty() { Value::Null } else { json!(r.revoked_serial) },
            "points_deleted": r.points_deleted,
        }));
    }
    out!(
        "reprotect of VM {vm} cancelled: it is failover-committed again ({} points of the recovered VM deleted)",
        r.points_deleted
    );
    if !r.revoked_serial.is_empty() {
        out!("the recovered VM's agent identity (serial {}) is revoked: stop that agent", r.revoked_serial);
    }
    if !r.released {
        out!("the master target could not be reached: its journal for VM {vm} is not released");
    }
    out!("`drctl reprotect {vm} ...` starts again");
    Ok(())
}

pub async fn reverse_replicate(d: &mut Drctl, vm: String) -> Result<(), CliError> {
    d.c.reverse_replicate(pb::ReverseRequest { vm: vm.clone() }).await?;
    if d.json {
        return print_json(&json!({"vm": vm, "state": tern_core::VmState::Protected.as_str()}));
    }
    out!("VM {vm} replicates from the primary site again; start its agent on the on-premises disks");
    Ok(())
}
