//! Replication groups: membership, multi-VM intervals, multi-VM points.

use crate::Drctl;
use crate::args::GroupCmd;
use crate::error::CliError;
use crate::output::{dur, point_json, print_json, print_point};
use serde_json::{Value, json};
use tern_core::units::rpo_text as rpo;
use tern_proto as pb;

fn interval(s: Option<&String>) -> Result<Option<u64>, CliError> {
    s.map(|s| {
        if s == "0" {
            return Ok(0);
        }
        Ok(u64::try_from(tern_core::units::parse_duration(s)?.as_millis()).unwrap_or(u64::MAX))
    })
    .transpose()
}

pub fn group_json(g: &pb::GroupInfo) -> Value {
    json!({
        "name": g.name,
        "vms": g.vms,
        "crash_interval": dur(g.crash_interval_ms),
        "app_interval": dur(g.app_interval_ms),
        "latest_multi_vm_point": if g.latest_point == 0 { Value::Null } else { json!(g.latest_point) },
        "latest_multi_vm_app_point": if g.latest_app_point == 0 { Value::Null } else { json!(g.latest_app_point) },
        "rpo_seconds": if g.rpo_seconds < 0 { Value::Null } else { json!(g.rpo_seconds) },
        "health": pb::Health::read(g.health).map_or("unknown", tern_core::Health::as_str),
        "error": if g.error.is_empty() { Value::Null } else { json!(g.error) },
        "hold_ms": g.hold_ms,
        "away": g.away,
        "paused": if g.paused.is_empty() { Value::Null } else { json!(g.paused) },
    })
}

/// The groups' table of `drctl group list` and `drctl status`.
pub fn print_groups(groups: &[pb::GroupInfo]) {
    let row = |c: [&str; 6]| out!("{:<20} {:<8} {:>10} {:>10} {:>8}  {}", c[0], c[1], c[2], c[3], c[4], c[5]);
    row(["GROUP", "HEALTH", "MULTI-VM", "APP", "RPO", "MEMBERS"]);
    for g in groups {
        let id = |n: u64| if n == 0 { "-".to_string() } else { n.to_string() };
        let health = pb::Health::read(g.health).map_or("unknown", tern_core::Health::as_str);
        let members = g.vms.join(" ");
        row([&g.name, health, &id(g.latest_point), &id(g.latest_app_point), &rpo(g.rpo_seconds), &members]);
    }
    for g in groups {
        if !g.paused.is_empty() {
            out!("{}: paused: {}", g.name, g.paused);
        }
        if !g.away.is_empty() {
            out!("{}: away (agent not connected): {}", g.name, g.away.join(", "));
        }
        if !g.error.is_empty() {
            out!("{}: the last multi-VM point failed: {}", g.name, g.error);
        }
    }
}

/// The worst health among groups, as a monitoring check's outcome.
pub fn groups_check(groups: &[pb::GroupInfo]) -> Result<(), CliError> {
    use tern_core::Health;
    let mut worst: Option<(Health, &pb::GroupInfo)> = None;
    for g in groups {
        let h = pb::Health::read(g.health).unwrap_or(Health::Critical);
        if h != Health::Normal && worst.is_none_or(|(w, _)| h == Health::Critical && w != Health::Critical) {
            worst = Some((h, g));
        }
    }
    match worst {
        None => Ok(()),
        Some((h, g)) => {
            let why = if !g.away.is_empty() {
                format!("{} away", g.away.join(", "))
            } else if !g.error.is_empty() {
                g.error.clone()
            } else {
                format!("RPO {}", rpo(g.rpo_seconds))
            };
            Err(CliError::Unhealthy(h, format!("group {} is {h}: {why}", g.name)))
        }
    }
}

fn show(d: &Drctl, g: &pb::GroupInfo) -> Result<(), CliError> {
    if d.json {
        return print_json(&group_json(g));
    }
    out!("group {}: {}", g.name, g.vms.join(", "));
    let every =
        |ms: u64| if ms == 0 { "none on a schedule".to_string() } else { format!("every {}", dur(ms)) };
    out!("  multi-VM crash points: {}; app points: {}", every(g.crash_interval_ms), every(g.app_interval_ms));
    let id = |n: u64| if n == 0 { "none yet".to_string() } else { n.to_string() };
    out!(
        "  latest multi-VM point: {} (RPO {}); latest app-consistent: {}",
        id(g.latest_point),
        rpo(g.rpo_seconds),
        id(g.latest_app_point)
    );
    out!("  health: {}", pb::Health::read(g.health).map_or("unknown", tern_core::Health::as_str));
    if g.hold_ms > 0 {
        out!("  members held their cut {} ms at the last multi-VM point", g.hold_ms);
    }
    if !g.paused.is_empty() {
        out!("  paused: {}", g.paused);
    }
    if !g.away.is_empty() {
        out!("  away (agent not connected): {}", g.away.join(", "));
    }
    if !g.error.is_empty() {
        out!("  the last multi-VM point failed: {}", g.error);
    }
    Ok(())
}

pub async fn run(d: &mut Drctl, cmd: GroupCmd) -> Result<(), CliError> {
    let change = |name: String, op: pb::GroupOp, vms: Vec<String>| pb::GroupChange {
        name,
        op: op as i32,
        vms,
        crash_interval_ms: None,
        app_interval_ms: None,
    };
    let req = match cmd {
        GroupCmd::List => {
            let r = d.c.groups(pb::GroupsRequest::default()).await?.into_inner();
            if d.json {
                return print_json(&Value::Array(r.groups.iter().map(group_json).collect()));
            }
            if r.groups.is_empty() {
                out!("no replication groups; create one with `drctl group create NAME --vm A --vm B`");
            } else {
                print_groups(&r.groups);
            }
            return Ok(());
        }
        GroupCmd::Show { name } => {
            let r = d.c.groups(pb::GroupsRequest { name }).await?.into_inner();
            return match r.groups.first() {
                Some(g) => show(d, g),
                None => Err(CliError::Server("the server returned no group".into())),
            };
        }
        GroupCmd::Checkpoint { name, app_consistent } => {
            let r = d.c.group_checkpoint(pb::GroupCheckpointRequest { name: name.clone(), app_consistent });
            let r = r.await?.into_inner();
            if d.json {
                let members: Vec<Value> = r
                    .members
                    .iter()
                    .map(|m| json!({"vm": m.vm, "point": m.point.as_ref().map(point_json)}))
                    .collect();
                return print_json(
                    &json!({"group": name, "point": r.point, "hold_ms": r.hold_ms, "members": members}),
                );
            }
            out!("multi-VM point {} of group {name} (members held their cut {} ms):", r.point, r.hold_ms);
            for m in &r.members {
                out!("  {}:", m.vm);
                if let Some(p) = &m.point {
                    print_point(p);
                }
            }
            return Ok(());
        }
        GroupCmd::Create { name, vms, crash_interval, app_interval } => pb::GroupChange {
            crash_interval_ms: interval(crash_interval.as_ref())?,
            app_interval_ms: interval(app_interval.as_ref())?,
            ..change(name, pb::GroupOp::Create, vms)
        },
        GroupCmd::Add { name, vms } => change(name, pb::GroupOp::Add, vms),
        GroupCmd::Remove { name, vms } => change(name, pb::GroupOp::Remove, vms),
        GroupCmd::Policy { name, crash_interval, app_interval } => pb::GroupChange {
            crash_interval_ms: interval(crash_interval.as_ref())?,
            app_interval_ms: interval(app_interval.as_ref())?,
            ..change(name, pb::GroupOp::Policy, Vec::new())
        },
    };
    let name = req.name.clone();
    let deleting = req.op == pb::GroupOp::Remove as i32 && req.vms.is_empty();
    let info = d.c.change_group(req).await?.into_inner();
    if deleting {
        if d.json {
            return print_json(&json!({"removed": name}));
        }
        out!("group {name} removed");
        return Ok(());
    }
    show(d, &info)
}
