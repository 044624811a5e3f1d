//! The way back: reprotect, failback, reverse replication.

use crate::Drctl;
use crate::error::CliError;
use crate::output::{print_json, print_output, refuse_existing_file, wait_job};
use serde_json::json;
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
    let (vm, identity) = (&r.vm, r.identity_out.display());
    // One --disk per disk the master target receives, by its name: the file the failover
    // wrote for it where the server knows it.
    let disks: String = r
        .target_disks
        .iter()
        .filter_map(|t| t.split_once('=').map(|(name, _)| name))
        .map(|name| {
            let at = format!("{name}=");
            match reply.recovered_disks.iter().find(|d| d.starts_with(&at)) {
                Some(d) => format!(" --disk {d}"),
                None => format!(" --disk {name}=<recovered disk {name}>"),
            }
        })
        .collect();
    let command = format!(
        "mobility-agent run --server {} --identity {identity} --vm {vm}{disks} --state-dir <dir> --shutdown '<command that shuts the recovered VM down>'",
        d.server
    );
    if d.json {
        return print_json(&json!({"vm": vm, "identity": identity.to_string(), "agent_command": command}));
    }
    out!("VM {vm} is reprotected to {} ({} location, sync {}).", r.master_target, r.location, r.sync);
    out!("Start the recovered VM's agent:\n  {command}");
    Ok(())
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

pub async fn reverse_replicate(d: &mut Drctl, vm: String) -> Result<(), CliError> {
    d.c.reverse_replicate(pb::ReverseRequest { vm: vm.clone() }).await?;
    if d.json {
        return print_json(&json!({"vm": vm, "state": tern_core::VmState::Protected.as_str()}));
    }
    out!("VM {vm} replicates from the primary site again; start its agent on the on-premises disks");
    Ok(())
}
