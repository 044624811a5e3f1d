//! Recovery plans: apply a file, list and show, run an operation group by group.

use crate::Drctl;
use crate::args::PlanCmd;
use crate::error::CliError;
use crate::output::{absolute, follow_job, print_json, rfc3339};
use serde_json::{Value, json};
use tern_proto as pb;

fn run_json(r: &pb::PlanRunInfo) -> Value {
    json!({
        "operation": r.operation,
        "state": r.state,
        "group": r.step + 1,
        "stage": r.stage,
        "done": r.done,
        "message": if r.message.is_empty() { Value::Null } else { json!(r.message) },
        "job": r.job,
        "points": r.points,
        "notes": r.notes,
        "agents": r.agents.iter().map(|(vm, a)| (vm.clone(), json!({
            "identity": std::path::Path::new(&r.identity_dir).join(format!("{vm}.bundle")).display().to_string(),
            "disks": a.disks,
        }))).collect::<serde_json::Map<_, _>>(),
    })
}

pub fn plan_json(p: &pb::PlanInfo) -> Value {
    json!({
        "name": p.name,
        "source": p.source,
        "applied": rfc3339(p.applied_ms),
        "groups": p.steps.iter().map(|s| json!({"vms": s.vms, "pre": s.pre, "post": s.post, "manual": if s.manual.is_empty() { Value::Null } else { json!(s.manual) }})).collect::<Vec<_>>(),
        "run": p.run.as_ref().map(run_json),
        "problem": if p.problem.is_empty() { Value::Null } else { json!(p.problem) },
    })
}

fn run_text(r: &pb::PlanRunInfo) -> String {
    let mut s = format!("{} {}", r.operation, r.state);
    if r.state != "done" {
        s += &format!(" at group {} ({})", r.step + 1, r.stage);
    }
    if !r.done.is_empty() {
        s += &format!("; done: {}", r.done.join(", "));
    }
    s
}

fn show(p: &pb::PlanInfo) {
    out!("plan {} (from {}, applied {})", p.name, p.source, rfc3339(p.applied_ms));
    if !p.problem.is_empty() {
        out!("  cannot run now: {}", p.problem);
    }
    for (i, s) in p.steps.iter().enumerate() {
        out!("  group {}: {}", i + 1, s.vms.join(", "));
        for a in &s.pre {
            out!("    pre:    {a}");
        }
        for a in &s.post {
            out!("    post:   {a}");
        }
        if !s.manual.is_empty() {
            out!("    manual: {}", s.manual);
        }
    }
    if let Some(r) = &p.run {
        out!("  last operation: {} (job {})", run_text(r), r.job);
        for (vm, point) in &r.points {
            if *point != 0 {
                out!("    {vm}: point {point}");
            }
        }
        if !r.message.is_empty() {
            out!("  {}", r.message);
        }
        for n in &r.notes {
            out!("  note: {n}");
        }
    }
}

async fn one(d: &mut Drctl, name: &str) -> Result<pb::PlanInfo, CliError> {
    let r = d.c.plans(pb::PlansRequest { name: name.to_string() }).await?.into_inner();
    r.plans.into_iter().next().ok_or_else(|| CliError::Server("the server returned no plan".into()))
}

/// Starts (or continues) an operation and follows its job until it ends or waits for a
/// manual step; then prints where the plan stands.
async fn follow(d: &mut Drctl, name: &str, job: u64) -> Result<(), CliError> {
    follow_until(d, name, job, true).await
}

/// [`follow`]; with `pause` false, past a manual step too, to the job's end.
async fn follow_until(d: &mut Drctl, name: &str, job: u64, pause: bool) -> Result<(), CliError> {
    let result = follow_job(&mut d.c, job, d.json, pause).await;
    let plan = one(d, name).await?;
    if d.json {
        print_json(&plan_json(&plan))?;
    } else if let Some(r) = &plan.run {
        out!("plan {name}: {}", run_text(r));
        for (vm, point) in &r.points {
            if *point != 0 {
                out!("  {vm}: point {point}");
            }
        }
        if r.state == "waiting" {
            out!("{}", r.message);
        }
        for n in &r.notes {
            out!("note: {n}");
        }
        if r.operation == "reprotect" && !r.agents.is_empty() {
            out!("Start each recovered VM's agent (copy its identity from {} to it):", r.identity_dir);
            for (vm, a) in &r.agents {
                let identity = std::path::Path::new(&r.identity_dir).join(format!("{vm}.bundle"));
                let command =
                    super::failback::agent_command(&d.server, &identity.display().to_string(), vm, &a.disks);
                out!("  {command}");
            }
            out!(
                "(add `--mode nbd` for a VM whose recovered disks are to run through the agent, the io path)"
            );
        }
    }
    result.map(|_| ())
}

/// "1 group", "3 groups".
fn groups(n: usize) -> String {
    format!("{n} group{}", if n == 1 { "" } else { "s" })
}

async fn apply(d: &mut Drctl, file: &std::path::Path) -> Result<(), CliError> {
    use std::io::Read;
    let bad = |e: std::io::Error| CliError::Usage(format!("{}: {e}", file.display()));
    // Read up to one byte past the bound: a pipe has no size to look at first (W19-C).
    let mut text = String::new();
    std::fs::File::open(file)
        .map_err(bad)?
        .take(tern_proto::MAX_PLAN_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(bad)?;
    if text.len() > tern_proto::MAX_PLAN_BYTES {
        return Err(CliError::Usage(format!(
            "{}: the plan file is too large (more than {} bytes)",
            file.display(),
            tern_proto::MAX_PLAN_BYTES
        )));
    }
    let source = file.display().to_string();
    let p = d.c.apply_plan(pb::ApplyPlanRequest { source, text }).await?.into_inner();
    if d.json {
        return print_json(&plan_json(&p));
    }
    out!("plan {} applied: {}", p.name, groups(p.steps.len()));
    show(&p);
    Ok(())
}

async fn list(d: &mut Drctl) -> Result<(), CliError> {
    let r = d.c.plans(pb::PlansRequest::default()).await?.into_inner();
    if d.json {
        return print_json(&Value::Array(r.plans.iter().map(plan_json).collect()));
    }
    if r.plans.is_empty() {
        out!("no recovery plans; `drctl plan apply FILE` registers one");
    }
    for p in &r.plans {
        let vms: Vec<&str> = p.steps.iter().flat_map(|s| s.vms.iter().map(String::as_str)).collect();
        let last = p.run.as_ref().map_or("no operation yet".to_string(), run_text);
        if p.problem.is_empty() {
            out!("{:<20} {}, VMs {}; {last}", p.name, groups(p.steps.len()), vms.join(" "));
        } else {
            out!("{:<20} cannot run now: {}; {last}", p.name, p.problem);
        }
    }
    Ok(())
}

pub async fn run(d: &mut Drctl, cmd: PlanCmd) -> Result<(), CliError> {
    let request = |name: String, operation: &str| pb::RunPlanRequest {
        name,
        operation: operation.to_string(),
        ..Default::default()
    };
    let req = match cmd {
        PlanCmd::Apply { file } => return apply(d, &file).await,
        PlanCmd::List => return list(d).await,
        PlanCmd::Show { name } => {
            let p = one(d, &name).await?;
            if d.json {
                return print_json(&plan_json(&p));
            }
            show(&p);
            return Ok(());
        }
        PlanCmd::Remove { name } => {
            d.c.remove_plan(pb::PlanRef { name: name.clone() }).await?;
            if d.json {
                return print_json(&json!({"removed": name}));
            }
            out!("plan {name} removed");
            return Ok(());
        }
        PlanCmd::Continue { name } => {
            let job = d.c.continue_plan(pb::PlanRef { name: name.clone() }).await?.into_inner().job;
            return follow(d, &name, job).await;
        }
        PlanCmd::Cancel { name } => {
            let job = d.c.cancel_plan(pb::PlanRef { name: name.clone() }).await?.into_inner().job;
            if !d.json {
                out!(
                    "plan {name}: job {job} stops at its next step (an operation on a VM under way ends first)"
                );
            }
            // Until the job has ended (at a manual step its phase still says waiting), failed,
            // "cancelled": what was asked for.
            return match follow_until(d, &name, job, false).await {
                Err(CliError::JobFailed { .. }) => Ok(()),
                other => other,
            };
        }
        PlanCmd::TestFailover { name, point, output, format } => pb::RunPlanRequest {
            point,
            output: absolute(&output)?.display().to_string(),
            format: format.wire(),
            ..request(name, "test-failover")
        },
        PlanCmd::Failover { name, kind, point, output, format } => {
            let kind: tern_core::FailoverKind = kind
                .parse()
                .map_err(|e: tern_core::lifecycle::UnknownName| CliError::Usage(format!("--kind: {e}")))?;
            pb::RunPlanRequest {
                point,
                output: absolute(&output)?.display().to_string(),
                format: format.wire(),
                kind: pb::FailoverKind::write(kind),
                ..request(name, "failover")
            }
        }
        PlanCmd::TestFailoverCleanup { name } => request(name, "test-failover-cleanup"),
        PlanCmd::Commit { name } => request(name, "commit"),
        PlanCmd::Reprotect { name, identity_dir } => pb::RunPlanRequest {
            identity_dir: absolute(&identity_dir)?.display().to_string(),
            ..request(name, "reprotect")
        },
        PlanCmd::Failback { name, drill } => request(name, if drill { "failback-drill" } else { "failback" }),
        PlanCmd::ReverseReplicate { name } => request(name, "reverse-replicate"),
    };
    let name = req.name.clone();
    let job = d.c.run_plan(req).await?.into_inner().job;
    follow(d, &name, job).await
}
