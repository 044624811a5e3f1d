//! Recovery plans: files of ordered groups of VMs (`file.rs`), and their operations run
//! group by group as one job each. An operation's progress is kept in the catalog after
//! every step (which group, which stage, which VMs are done), so a failed action or a
//! manual step stops it in a clear state and `drctl plan continue` resumes where it
//! stopped, never redoing a finished VM.
//!
//! In each group: its `pre` actions, then each VM, then its `post` actions, then its manual
//! step (a wait for `plan continue`). Actions and manual steps belong to the operations that
//! bring VMs up somewhere (test failover, failover, failback); the others (cleanup, commit,
//! reprotect, reverse replication) only walk the groups in order.

pub mod file;

use crate::admin::{blocking, run_failover, run_test_failover};
use crate::{Ctx, lock, store_status};
use file::Plan;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tern_core::{FailoverKind, JobKind, PlanName, PointId, VmName, VmState};
use tern_proto as pb;
use tern_store::{Format, PlanRow, PointSpec};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{info, warn};

/// An action that runs longer than this fails the plan (it is killed).
const ACTION_TIMEOUT: Duration = Duration::from_secs(600);

/// The operations of a plan, by their names on the command line and in `plans.run`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Operation {
    #[default]
    TestFailover,
    TestFailoverCleanup,
    Failover,
    Commit,
    Reprotect,
    Failback,
    FailbackDrill,
    ReverseReplicate,
}

impl Operation {
    const ALL: [Operation; 8] = [
        Operation::TestFailover,
        Operation::TestFailoverCleanup,
        Operation::Failover,
        Operation::Commit,
        Operation::Reprotect,
        Operation::Failback,
        Operation::FailbackDrill,
        Operation::ReverseReplicate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::TestFailover => "test-failover",
            Operation::TestFailoverCleanup => "test-failover-cleanup",
            Operation::Failover => "failover",
            Operation::Commit => "commit",
            Operation::Reprotect => "reprotect",
            Operation::Failback => "failback",
            Operation::FailbackDrill => "failback-drill",
            Operation::ReverseReplicate => "reverse-replicate",
        }
    }

    fn parse(s: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// The state every VM must be in for it (commit takes two; see `precheck`).
    fn needs(self) -> Option<VmState> {
        match self {
            Operation::Failover => Some(VmState::Protected),
            Operation::Reprotect => Some(VmState::FailoverCommitted),
            Operation::Failback | Operation::FailbackDrill => Some(VmState::Reprotected),
            Operation::ReverseReplicate => Some(VmState::FailbackCommitted),
            Operation::TestFailover | Operation::TestFailoverCleanup | Operation::Commit => None,
        }
    }

    /// The state a VM is in once this operation is done with it (a VM found in it was done
    /// before a crash or a failure after its change: it is not done again).
    fn leaves(self) -> Option<VmState> {
        match self {
            Operation::Failover => Some(VmState::FailedOver),
            Operation::Reprotect => Some(VmState::Reprotected),
            Operation::Failback => Some(VmState::FailedBack),
            Operation::ReverseReplicate => Some(VmState::Protected),
            _ => None,
        }
    }

    /// Brings VMs up somewhere: actions and manual steps run.
    fn acts(self) -> bool {
        matches!(
            self,
            Operation::TestFailover | Operation::Failover | Operation::Failback | Operation::FailbackDrill
        )
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How far a plan's operation got: the `plans.run` column.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Run {
    pub operation: Operation,
    pub point: String,
    pub output: String,
    pub format: String,
    pub kind: String,
    pub identity_dir: String,
    /// running, waiting, failed, done.
    pub state: String,
    pub step: usize,
    /// pre, vms, post, manual.
    pub stage: String,
    pub done: Vec<String>,
    pub message: String,
    pub job: u64,
    pub points: BTreeMap<String, u64>,
    /// The next action of the stage (a failed one is where `continue` starts again).
    #[serde(default)]
    pub action: usize,
    /// The plan's groups and their VMs when the operation started: a file applied since
    /// with other groups cannot be continued into (its positions would mean other VMs).
    #[serde(default)]
    pub layout: Vec<Vec<String>>,
    /// Failback: the final points of VMs shut down ahead of their turn, with the rest of
    /// their replication group.
    #[serde(default)]
    pub finals: BTreeMap<String, u64>,
    /// Reprotect: each VM's disks for its agent's command (`NAME=PATH`, as
    /// `ReprotectReply.recovered_disks`).
    #[serde(default)]
    pub agents: BTreeMap<String, Vec<String>>,
    /// The manual step of the current group was shown (its wait began): a `continue` after
    /// a stop there goes past it. A stop before it (a cancel, a crash) leaves it to be shown.
    #[serde(default)]
    pub waited: bool,
    /// What the operator should know of how it went (a group that took its newest common
    /// point instead of a fresh one).
    #[serde(default)]
    pub notes: Vec<String>,
}

impl Run {
    fn info(&self) -> pb::PlanRunInfo {
        pb::PlanRunInfo {
            operation: self.operation.to_string(),
            state: self.state.clone(),
            step: u32::try_from(self.step).unwrap_or(u32::MAX),
            stage: self.stage.clone(),
            done: self.done.clone(),
            message: self.message.clone(),
            job: self.job,
            points: self.points.clone().into_iter().collect(),
            identity_dir: self.identity_dir.clone(),
            notes: self.notes.clone(),
            agents: self
                .agents
                .iter()
                .map(|(vm, disks)| (vm.clone(), pb::AgentDisks { disks: disks.clone() }))
                .collect(),
        }
    }
}

/// Plans whose operation is being driven now, and how to wake one at a manual step.
#[derive(Debug, Default)]
pub struct Plans {
    driving: std::sync::Mutex<HashMap<String, Driving>>,
}

impl Plans {
    /// Whether a plan being driven is at `vm`'s step now.
    pub fn at_vm(&self, vm: &VmName) -> bool {
        lock(&self.driving).values().any(|d| d.at_vm.as_deref() == Some(vm.as_str()))
    }
}

/// A plan being driven.
#[derive(Debug)]
struct Driving {
    /// Wakes it at a manual step.
    wake: Arc<Notify>,
    /// Its job, once started.
    job: Option<crate::jobs::Job>,
    /// It waits at a manual step now (taken by the one `continue` that wakes it).
    waiting: bool,
    /// `drctl plan cancel`: it stops at its next step (a VM's operation under way ends
    /// first; an action is killed).
    cancel: CancellationToken,
    /// The VM whose operation is under way, if one is.
    at_vm: Option<String>,
    /// Failback: the members of a replication group shut down with it, each held as being
    /// failed back (no `drctl failback` of it meanwhile) until its own failback takes over.
    entered: HashMap<String, crate::failback::FailingBack>,
}

/// Why a plan's walk stopped short.
#[derive(Debug)]
enum Stop {
    Failed(String),
    Cancelled,
}

impl From<String> for Stop {
    fn from(e: String) -> Stop {
        Stop::Failed(e)
    }
}

/// Whether the walk is to stop now: the process server stopping, or `drctl plan cancel`.
fn stopped(ctx: &Ctx, cancel: &CancellationToken) -> Option<Stop> {
    if ctx.shutdown.is_cancelled() {
        Some(Stop::Failed("the process server stopped".into()))
    } else {
        cancel.is_cancelled().then_some(Stop::Cancelled)
    }
}

const CANCELLED: &str = "cancelled by the operator (`drctl plan cancel`)";

/// At start-up: an operation the last stop cut short (nothing drives it now) shows as
/// failed, saying how to go on, instead of running forever. Returns how many.
pub fn mark_interrupted(store: &tern_store::Store) -> Result<usize, tern_store::StoreError> {
    let mut n = 0;
    for row in store.plans()? {
        let Ok(mut run) = serde_json::from_str::<Run>(&row.run) else { continue };
        if run.state != "running" {
            continue;
        }
        run.state = "failed".into();
        run.message = format!(
            "interrupted: the process server stopped while it ran; `drctl plan continue {}` goes on from there",
            row.name
        );
        let text = serde_json::to_string(&run)
            .map_err(|_| tern_store::StoreError::Invariant("a plan's progress encodes"))?;
        store.set_plan_run(&row.name, &text)?;
        n += 1;
    }
    Ok(n)
}

fn plan_arg(s: &str) -> Result<PlanName, Status> {
    PlanName::new(s).map_err(|e| Status::invalid_argument(e.to_string()))
}

async fn row(ctx: &Arc<Ctx>, name: &PlanName) -> Result<PlanRow, Status> {
    let store = ctx.store.clone();
    let plans = blocking(move || store.plans()).await?.map_err(store_status)?;
    plans.into_iter().find(|p| p.name == name.as_str()).ok_or_else(|| {
        Status::not_found(format!("no plan is named {name}; `drctl plan apply FILE` registers one"))
    })
}

/// Parses a stored or offered plan, with each VM checked against this server.
async fn parse(ctx: &Arc<Ctx>, source: &str, text: &str) -> Result<Plan, Status> {
    let store = ctx.store.clone();
    let known: std::collections::HashSet<VmName> =
        blocking(move || store.vms()).await?.map_err(store_status)?.into_iter().collect();
    let check = |vm: &VmName| {
        (!known.contains(vm))
            .then(|| format!("VM {vm} is not protected by this process server (see `drctl status`)"))
    };
    file::parse(text, &check).map_err(|e| Status::invalid_argument(format!("{source}:{e}")))
}

/// Parses a stored plan for `operation`. A VM removed since the file was applied is the
/// server's state, not a mistake in the command (exit 6, not 2); a cleanup goes on without
/// it, as nothing of the VM is left to clean (W19-A: the test failovers the plan opened
/// for the other VMs could not be cleaned up by the plan).
async fn parse_stored(ctx: &Arc<Ctx>, row: &PlanRow, operation: Operation) -> Result<Plan, Status> {
    if operation == Operation::TestFailoverCleanup {
        return file::parse(&row.file, &|_: &VmName| None)
            .map_err(|e| Status::invalid_argument(format!("{}:{e}", row.source)));
    }
    parse(ctx, &row.source, &row.file).await.map_err(|e| {
        Status::failed_precondition(format!(
            "{}; apply the plan's file again without it (`drctl plan apply FILE`)",
            e.message()
        ))
    })
}

/// `problem`: why the stored file cannot be run now, if it cannot.
fn plan_info(row: &PlanRow, plan: Option<&Plan>, problem: String) -> pb::PlanInfo {
    let run: Option<Run> = serde_json::from_str(&row.run).ok();
    pb::PlanInfo {
        name: row.name.clone(),
        source: row.source.clone(),
        applied_ms: row.applied_ms,
        steps: plan
            .map(|p| {
                p.steps
                    .iter()
                    .map(|s| pb::PlanStep {
                        vms: s.vms.iter().map(ToString::to_string).collect(),
                        pre: s.pre.clone(),
                        post: s.post.clone(),
                        manual: s.manual.clone().unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        run: run.map(|r| r.info()),
        text: row.file.clone(),
        problem,
    }
}

/// `drctl plan apply FILE`: checks the file and stores it (replacing the plan of that name).
pub async fn apply(ctx: &Arc<Ctx>, r: pb::ApplyPlanRequest) -> Result<pb::PlanInfo, Status> {
    if r.text.len() > tern_proto::MAX_PLAN_BYTES {
        return Err(Status::invalid_argument(format!(
            "{}: the plan file is too large ({} bytes; at most {})",
            r.source,
            r.text.len(),
            tern_proto::MAX_PLAN_BYTES
        )));
    }
    let plan = parse(ctx, &r.source, &r.text).await?;
    // Target disks are checked now against the VMs protected here (as a reprotect will),
    // not found wrong in the middle of a failback.
    for (vm, t) in &plan.targets {
        let disks: Vec<tern_core::DiskName> = ctx.store.vm_disks(vm).iter().map(|h| h.name.clone()).collect();
        if !disks.is_empty() {
            crate::failback::target_disks(vm, &disks, &t.target_disks).map_err(|e| {
                Status::new(e.code(), format!("{}: [vm.{vm}] target_disks: {}", r.source, e.message()))
            })?;
        }
    }
    let name = plan.name.to_string();
    if lock(&ctx.plans.driving).contains_key(&name) {
        return Err(Status::failed_precondition(format!(
            "plan {name} has an operation running; apply the file once it has ended"
        )));
    }
    let row = PlanRow {
        name: name.clone(),
        source: r.source,
        file: r.text,
        applied_ms: tern_store::now_ms(),
        run: String::new(),
    };
    let store = ctx.store.clone();
    let stored = row.clone();
    blocking(move || store.put_plan(&stored)).await?.map_err(store_status)?;
    info!(plan = %name, groups = plan.steps.len(), "plan applied");
    let row = self::row(ctx, &plan.name).await?;
    Ok(plan_info(&row, Some(&plan), String::new()))
}

/// `drctl plan list/show`.
pub async fn list(ctx: &Arc<Ctx>, name: &str) -> Result<Vec<pb::PlanInfo>, Status> {
    let store = ctx.store.clone();
    let rows = blocking(move || store.plans()).await?.map_err(store_status)?;
    let mut out = Vec::new();
    for row in rows.iter().filter(|r| name.is_empty() || r.name == name) {
        out.push(match parse(ctx, &row.source, &row.file).await {
            Ok(plan) => plan_info(row, Some(&plan), String::new()),
            Err(e) => plan_info(row, None, e.message().to_string()),
        });
    }
    if !name.is_empty() && out.is_empty() {
        return Err(Status::not_found(format!("no plan is named {name}; see `drctl plan list`")));
    }
    Ok(out)
}

/// `drctl plan remove`.
pub async fn remove(ctx: &Arc<Ctx>, name: &str) -> Result<pb::PlanInfo, Status> {
    let name = plan_arg(name)?;
    if lock(&ctx.plans.driving).contains_key(name.as_str()) {
        return Err(Status::failed_precondition(format!(
            "plan {name} has an operation running; stop it first with `drctl plan cancel {name}`"
        )));
    }
    let row = row(ctx, &name).await?;
    let store = ctx.store.clone();
    let n = name.to_string();
    blocking(move || store.delete_plan(&n)).await?.map_err(store_status)?;
    Ok(plan_info(&row, None, String::new()))
}

/// The plans whose file names `vm` (to warn that removing it leaves them unable to run).
pub async fn naming(ctx: &Arc<Ctx>, vm: &VmName) -> Vec<String> {
    let store = ctx.store.clone();
    let Ok(Ok(rows)) = blocking(move || store.plans()).await else { return Vec::new() };
    rows.into_iter()
        .filter(|r| file::parse(&r.file, &|_| None).is_ok_and(|p| p.vms().any(|v| v == vm)))
        .map(|r| r.name)
        .collect()
}

/// `drctl plan cancel`: the running operation stops at its next step; its job.
pub async fn cancel(ctx: &Arc<Ctx>, name: &str) -> Result<u64, Status> {
    let name = plan_arg(name)?;
    row(ctx, &name).await?;
    let (job, at_vm) = {
        let driving = lock(&ctx.plans.driving);
        let d = driving.get(name.as_str()).ok_or_else(|| {
            Status::failed_precondition(format!(
                "plan {name} has no operation running; nothing to cancel (`drctl plan show {name}` says where \
                 its last one stopped)"
            ))
        })?;
        d.cancel.cancel();
        (d.job.clone(), d.at_vm.clone())
    };
    info!(plan = %name, vm = ?at_vm, "plan operation cancel asked");
    let Some(job) = job else {
        return Err(Status::unavailable(format!(
            "plan {name}'s operation was starting: it stops at its first step (`drctl plan show {name}`)"
        )));
    };
    if let Some(vm) = at_vm {
        job.phase(&format!("cancelling: stops once VM {vm}'s operation under way ends")).await;
    }
    Ok(job.id)
}

async fn save(ctx: &Arc<Ctx>, name: &PlanName, run: &Run) -> Result<(), String> {
    let text = serde_json::to_string(run).map_err(|e| e.to_string())?;
    let store = ctx.store.clone();
    let n = name.to_string();
    blocking(move || store.set_plan_run(&n, &text))
        .await
        .map_err(|e| e.message().to_string())?
        .map_err(|e| e.to_string())
}

/// Each VM's point for a test failover or failover, all found before anything is written:
/// a VM without one stops the plan here, naming it. The VMs of a replication group take
/// one multi-VM point: for `latest` one made now (the newest common one if none can be
/// made), for the other options the group's newest common one (app-consistent for the app
/// options).
/// Returns each VM's point, and notes of the groups that took their newest common point
/// because a fresh one could not be made.
async fn resolve_points(
    ctx: &Arc<Ctx>,
    plan: &Plan,
    point: &str,
) -> Result<(BTreeMap<String, u64>, Vec<String>), Status> {
    let spec = PointSpec::parse(point).ok_or_else(|| {
        Status::invalid_argument(format!(
            "--point {point:?}: a plan takes latest, latest-processed, latest-app, latest-multi-vm or \
             latest-multi-vm-app"
        ))
    })?;
    if matches!(spec, PointSpec::Id(_) | PointSpec::Time(_)) {
        return Err(Status::invalid_argument(format!(
            "--point {point}: a custom point (an id or a time) names one VM's point and is not available for a \
             plan; use latest, latest-processed, latest-app, latest-multi-vm or latest-multi-vm-app"
        )));
    }
    let mut points = BTreeMap::new();
    // A replication group's common point is found once for all its members: found per VM, a
    // multi-VM point made (or pruned) meanwhile would put them at different moments.
    // Whatever the option, a group comes back at one moment: each member's own point (its
    // latest, or a fresh one at its turn) would put the group's VMs at different moments.
    // So `latest` has the group make one multi-VM point now (its newest common one if it
    // cannot, say with the primary site gone), the other options take the newest common one
    // (app-consistent for the app options).
    let app = matches!(spec, PointSpec::LatestApp | PointSpec::LatestMultiVmApp);
    let mut common: HashMap<tern_core::GroupName, Option<u64>> = HashMap::new();
    // Why a fresh multi-VM point could not be made, by group.
    let mut why_not: HashMap<tern_core::GroupName, String> = HashMap::new();
    let mut notes = Vec::new();
    for vm in plan.vms() {
        let (store, v) = (ctx.store.clone(), vm.clone());
        let group = blocking(move || store.group_of(&v)).await?.map_err(store_status)?;
        if let Some(g) = group {
            if !common.contains_key(&g) {
                let (id, not_fresh) = group_point(ctx, plan, &g, spec == PointSpec::Latest, app).await?;
                if let Some(e) = not_fresh {
                    why_not.insert(g.clone(), e);
                }
                if let (Some(e), Some(id)) = (why_not.get(&g), id) {
                    notes.push(format!(
                        "replication group {g}: a fresh multi-VM point could not be made ({e}); its newest common \
                         one, point {id}, was taken"
                    ));
                }
                common.insert(g.clone(), id);
            }
            match common.get(&g).copied().flatten() {
                Some(id) => {
                    points.insert(vm.to_string(), id);
                    continue;
                }
                None => {
                    let fresh = why_not
                        .get(&g)
                        .map_or(String::new(), |e| format!("; a fresh one could not be made: {e}"));
                    return Err(Status::failed_precondition(format!(
                        "plan {}: VM {vm} is in replication group {g}, which has no common multi-VM point{}{fresh} \
                         (`drctl group checkpoint {g}{}` makes one); every VM of a plan needs a point. Nothing was written",
                        plan.name,
                        if app { " that is app-consistent" } else { "" },
                        if app { " --app-consistent" } else { "" },
                    )));
                }
            }
        }
        // `latest` makes a fresh point of each VM at its turn; it needs one to fall back on.
        let probe = if spec == PointSpec::Latest { PointSpec::LatestProcessed } else { spec.clone() };
        let (store, v) = (ctx.store.clone(), vm.clone());
        match blocking(move || store.resolve_point(&v, &probe)).await? {
            Ok(p) => {
                points.insert(vm.to_string(), if spec == PointSpec::Latest { 0 } else { p.id.0 });
            }
            Err(e) => {
                return Err(Status::failed_precondition(format!(
                    "plan {}: VM {vm} has no point to fail over to ({e}); every VM of a plan needs one. Nothing was written",
                    plan.name
                )));
            }
        }
    }
    Ok((points, notes))
}

/// The point a plan takes for replication group `g`: a multi-VM point made now when
/// `fresh` (`latest`), else (or when it cannot be made: why, beside) the group's newest
/// common one, app-consistent when `app`. `None` when it has none.
async fn group_point(
    ctx: &Arc<Ctx>,
    plan: &Plan,
    g: &tern_core::GroupName,
    fresh: bool,
    app: bool,
) -> Result<(Option<u64>, Option<String>), Status> {
    let mut why_not = None;
    if fresh {
        match fresh_group_point(ctx, g).await? {
            Ok(points) => {
                if let Some(p) = points.first() {
                    return Ok((Some(p.id.0), None));
                }
            }
            Err(e) => {
                warn!(plan = %plan.name, group = %g, error = %e,
                    "no fresh multi-VM point for the plan; the group's newest common one is used");
                why_not = Some(e);
            }
        }
    }
    let (store, name) = (ctx.store.clone(), g.clone());
    let id = blocking(move || {
        let row = store.group(&name)?;
        row.map(|r| store.common_point(&r, app)).transpose()
    })
    .await?
    .map_err(store_status)?
    .flatten()
    .map(|p| p.id.0);
    Ok((id, why_not))
}

/// A multi-VM point of `group` made now, on its own task: a caller that goes away
/// (Ctrl-C) does not cut a barrier short.
async fn fresh_group_point(
    ctx: &Arc<Ctx>,
    group: &tern_core::GroupName,
) -> Result<Result<Vec<tern_store::Point>, String>, Status> {
    let (c, g) = (ctx.clone(), group.clone());
    ctx.tracker
        .spawn(async move { crate::groups::take_fresh_group_point(&c, &g, false).await })
        .await
        .map_err(|e| Status::internal(e.to_string()))
}

/// Checks what an operation needs of every VM before the first is touched.
async fn precheck(ctx: &Arc<Ctx>, plan: &Plan, run: &Run) -> Result<(), Status> {
    let want = run.operation.needs();
    for vm in plan.vms() {
        if run.done.contains(&vm.to_string()) {
            continue;
        }
        // A VM removed since the file was applied has nothing left to clean up (W19-C).
        let (store, v) = (ctx.store.clone(), vm.clone());
        if run.operation == Operation::TestFailoverCleanup
            && !blocking(move || store.has_vm(&v)).await?.map_err(store_status)?
        {
            continue;
        }
        let (store, v) = (ctx.store.clone(), vm.clone());
        let state = blocking(move || store.vm_state(&v)).await?.map_err(store_status)?;
        // Done before a crash, or before a failure that came after its change.
        if run.job != 0 && run.operation.leaves() == Some(state) {
            continue;
        }
        if let Some(want) = want
            && state != want
        {
            return Err(Status::failed_precondition(format!(
                "plan {}: VM {vm} is {state}; {} of the plan needs every VM {want}. Nothing was changed",
                plan.name, run.operation
            )));
        }
        if run.operation == Operation::Commit && !matches!(state, VmState::FailedOver | VmState::FailedBack) {
            return Err(Status::failed_precondition(format!(
                "plan {}: VM {vm} is {state}; commit needs every VM failed over or failed back",
                plan.name
            )));
        }
        if run.operation == Operation::Reprotect && !plan.targets.contains_key(vm) {
            return Err(Status::failed_precondition(format!(
                "plan {}: VM {vm} has no [vm.{vm}] section (master_target, location, target_disks) in the plan file",
                plan.name
            )));
        }
        let needs_agent = (run.operation == Operation::Failover && run.kind == "planned")
            || run.operation == Operation::Failback;
        if needs_agent && !ctx.hub.connected(vm) {
            let instead = if run.operation == Operation::Failover {
                " (if the primary site is gone, fail the plan over with --kind unplanned)"
            } else {
                ""
            };
            return Err(Status::failed_precondition(format!(
                "plan {}: the agent of VM {vm} is not connected, and a {} {} shuts it down through it{instead}. \
                 Nothing was changed",
                plan.name, run.kind, run.operation
            )));
        }
        // One open test failover per VM: a drill still open is found before the first
        // group's actions run (else the output files it holds were named as in the way).
        if run.operation == Operation::TestFailover {
            let (store, v) = (ctx.store.clone(), vm.clone());
            if let Some(open) = blocking(move || store.test_failover_row(&v)).await?.map_err(store_status)? {
                return Err(Status::failed_precondition(format!(
                    "plan {}: VM {vm} already has an open test failover (point {}, in {}); run `drctl plan \
                     test-failover-cleanup {0}` (or `drctl test-failover-cleanup {vm}`) first. Nothing was changed",
                    plan.name, open.point, open.output
                )));
            }
        }
        // A drill rehearses the failback from what the master target holds: with --sync
        // during it holds nothing before the failback itself. Found before the first group.
        if run.operation == Operation::FailbackDrill {
            let (store, v) = (ctx.store.clone(), vm.clone());
            let row = blocking(move || store.reprotect(&v)).await?.map_err(store_status)?;
            if row.is_some_and(|r| r.sync == tern_core::SyncMode::During) {
                return Err(Status::failed_precondition(format!(
                    "plan {}: VM {vm} was reprotected with --sync during: its master target receives nothing \
                     before the failback itself, so there is nothing to rehearse (reprotect it with --sync \
                     before to drill). Nothing was changed",
                    plan.name
                )));
            }
        }
    }
    Ok(())
}

/// `drctl plan OPERATION`: checks, then drives the operation as a job.
pub async fn start(ctx: &Arc<Ctx>, r: pb::RunPlanRequest) -> Result<u64, Status> {
    let name = plan_arg(&r.name)?;
    let operation = Operation::parse(&r.operation).ok_or_else(|| {
        let all: Vec<&str> = Operation::ALL.iter().map(|o| o.as_str()).collect();
        Status::invalid_argument(format!(
            "unknown plan operation {:?}; one of {}",
            r.operation,
            all.join(", ")
        ))
    })?;
    let row = row(ctx, &name).await?;
    let plan = parse_stored(ctx, &row, operation).await?;
    let format = if r.format == pb::OutputFormat::Vhd as i32 { "vhd" } else { "raw" };
    let kind = pb::FailoverKind::read(r.kind).map(|k| k.to_string()).unwrap_or_default();
    let mut run = Run {
        operation,
        point: r.point.clone(),
        output: r.output.clone(),
        format: format.into(),
        kind,
        identity_dir: r.identity_dir.clone(),
        state: "running".into(),
        stage: "pre".into(),
        ..Run::default()
    };
    match run.operation {
        Operation::TestFailover | Operation::Failover => {
            crate::admin::output_arg(&run.output, ctx.store.root())?;
            if run.operation == Operation::Failover && run.kind.is_empty() {
                return Err(Status::invalid_argument("a plan failover's kind is planned or unplanned"));
            }
            if run.operation == Operation::TestFailover || run.kind != "planned" {
                (run.points, run.notes) =
                    resolve_points(ctx, &plan, if run.point.is_empty() { "latest" } else { &run.point })
                        .await?;
            }
        }
        Operation::Reprotect => {
            crate::admin::output_arg(&run.identity_dir, ctx.store.root())?;
            // Before any VM is reprotected: a bundle that cannot be written is lost.
            let dir = PathBuf::from(&run.identity_dir);
            blocking(move || {
                std::fs::create_dir_all(&dir)?;
                let probe = dir.join(".tern-write-test");
                std::fs::write(&probe, b"")?;
                std::fs::remove_file(&probe)
            })
            .await?
            .map_err(|e| {
                Status::failed_precondition(format!(
                    "--identity-dir {}: cannot write there: {e}",
                    run.identity_dir
                ))
            })?;
        }
        _ => {}
    }
    if let Err(e) = precheck(ctx, &plan, &run).await {
        let last: Option<Run> = serde_json::from_str(&row.run).ok();
        // Still running (its drctl gone): its VMs' states are its own doing.
        let waiting = lock(&ctx.plans.driving).get(name.as_str()).map(|d| d.waiting);
        if let Some(waiting) = waiting {
            let (op, job) = last.map(|l| (l.operation.to_string(), l.job)).unwrap_or_default();
            let how = if waiting {
                format!("waits at a manual step (job {job}): `drctl plan continue {name}` goes on")
            } else {
                format!("is still running (job {job}): follow it with `drctl jobs --wait {job}`")
            };
            return Err(Status::failed_precondition(format!(
                "plan {name}'s {op} {how}, or `drctl plan cancel {name}` stops it"
            )));
        }
        // Most likely this operation stopped part way earlier: starting it anew is not
        // the way on.
        if let Some(last) = last.filter(|l| l.operation == run.operation && l.state != "done") {
            return Err(Status::new(
                e.code(),
                format!(
                    "{}; its last {} stopped at group {} ({}): `drctl plan continue {name}` goes on from there",
                    e.message(),
                    last.operation,
                    last.step + 1,
                    last.stage
                ),
            ));
        }
        return Err(e);
    }
    run.layout = layout(&plan);
    drive(ctx, name, plan, run).await
}

fn layout(plan: &Plan) -> Vec<Vec<String>> {
    plan.steps.iter().map(|s| s.vms.iter().map(ToString::to_string).collect()).collect()
}

/// `drctl plan continue`: past a manual step, or again from where a failure stopped it.
pub async fn resume(ctx: &Arc<Ctx>, name: &str) -> Result<u64, Status> {
    let name = plan_arg(name)?;
    let row = row(ctx, &name).await?;
    let mut run: Run = serde_json::from_str(&row.run)
        .map_err(|_| Status::failed_precondition(format!("plan {name} has no operation to continue")))?;
    let live = {
        let mut driving = lock(&ctx.plans.driving);
        driving
            .get_mut(name.as_str())
            .map(|d| (d.wake.clone(), d.job.clone(), std::mem::take(&mut d.waiting)))
    };
    if let Some((wake, job, waiting)) = live {
        if waiting {
            // The job says so before `continue` returns: whoever follows it sees it move on.
            if let Some(job) = job {
                job.phase("continuing after the manual step").await;
            }
            wake.notify_one();
            return Ok(run.job);
        }
        return Err(Status::failed_precondition(format!(
            "plan {name}'s {} is running (job {}); nothing waits for `plan continue`",
            run.operation, run.job
        )));
    }
    match run.state.as_str() {
        "waiting" => {
            run.step += 1;
            run.stage = "pre".into();
        }
        // Stopped at a manual step (the process server stopped while it waited, or after
        // it was continued): this continue is the operator's word for it.
        "failed" | "running" if run.stage == "manual" && run.waited => {
            run.step += 1;
            run.stage = "pre".into();
        }
        "failed" | "running" => {}
        _ => {
            return Err(Status::failed_precondition(format!(
                "plan {name}'s {} is {}; nothing to continue",
                run.operation, run.state
            )));
        }
    }
    let plan = parse_stored(ctx, &row, run.operation).await?;
    if !run.layout.is_empty() && run.layout != layout(&plan) {
        return Err(Status::failed_precondition(format!(
            "plan {name}'s groups changed since its {} started (the file was applied again): its progress \
             would name other VMs. Apply the file it started with to continue, or start the operation anew",
            run.operation
        )));
    }
    run.state = "running".into();
    run.message.clear();
    precheck(ctx, &plan, &run).await?;
    drive(ctx, name, plan, run).await
}

async fn drive(ctx: &Arc<Ctx>, name: PlanName, plan: Plan, mut run: Run) -> Result<u64, Status> {
    let wake = Arc::new(Notify::new());
    let cancel = ctx.shutdown.child_token();
    {
        let mut driving = lock(&ctx.plans.driving);
        if driving.contains_key(name.as_str()) {
            return Err(Status::failed_precondition(format!(
                "plan {name} has an operation running already (`drctl plan cancel {name}` stops it)"
            )));
        }
        let d = Driving {
            wake: wake.clone(),
            job: None,
            waiting: false,
            cancel: cancel.clone(),
            at_vm: None,
            entered: HashMap::new(),
        };
        driving.insert(name.to_string(), d);
    }
    let subject = VmName::new(name.as_str()).map_err(|e| Status::internal(e.to_string()))?;
    let job = match ctx.jobs.start(JobKind::Plan, &subject).await {
        Ok(j) => j,
        Err(e) => {
            lock(&ctx.plans.driving).remove(name.as_str());
            return Err(e);
        }
    };
    run.job = job.id;
    if let Some(d) = lock(&ctx.plans.driving).get_mut(name.as_str()) {
        d.job = Some(job.clone());
    }
    if let Err(e) = save(ctx, &name, &run).await {
        lock(&ctx.plans.driving).remove(name.as_str());
        job.fail(&format!("cannot record the plan's progress: {e}")).await;
        return Err(Status::unavailable(e));
    }
    info!(plan = %name, operation = %run.operation, job = job.id, "plan operation started");
    let (c, id) = (ctx.clone(), job.id);
    ctx.tracker.spawn(async move {
        let outcome = walk(&c, &name, &plan, &mut run, &job, &wake, &cancel).await;
        match &outcome {
            Ok(()) => {
                run.state = "done".into();
                run.message.clear();
            }
            Err(Stop::Failed(e)) => {
                run.state = "failed".into();
                run.message.clone_from(e);
            }
            Err(Stop::Cancelled) => {
                run.state = "failed".into();
                run.message = CANCELLED.into();
            }
        }
        // Saved before the plan is free again: a `continue` reads this state, not an older one.
        if let Err(e) = save(&c, &name, &run).await {
            warn!(plan = %name, error = %e, "cannot record the plan's end; `plan show` may show an older step");
        }
        lock(&c.plans.driving).remove(name.as_str());
        match outcome {
            Ok(()) => {
                info!(plan = %name, operation = %run.operation, "plan operation done");
                job.succeed(pb::JobOutput { vm: name.to_string(), note: run.notes.join("; "), ..Default::default() })
                    .await;
            }
            Err(Stop::Failed(e)) => {
                warn!(plan = %name, operation = %run.operation, error = %e, "plan operation stopped");
                job.fail(&format!("{e}; fix it, then `drctl plan continue {name}` goes on from there")).await;
            }
            Err(Stop::Cancelled) => {
                warn!(plan = %name, operation = %run.operation, "plan operation cancelled");
                job.fail(&format!(
                    "{CANCELLED} at group {} ({}); done: {}. `drctl plan continue {name}` goes on from there",
                    run.step + 1,
                    run.stage,
                    if run.done.is_empty() { "none".to_string() } else { run.done.join(", ") }
                ))
                .await;
            }
        }
    });
    Ok(id)
}

/// The current group's `pre` or `post` actions (as `run.stage` says), from the first not
/// yet done: a failed one runs again, the ones before it do not.
async fn run_actions(
    ctx: &Arc<Ctx>,
    name: &PlanName,
    plan: &Plan,
    run: &mut Run,
    job: &crate::jobs::Job,
    cancel: &CancellationToken,
) -> Result<(), Stop> {
    let step = &plan.steps[run.step];
    let group = run.step + 1;
    let vms: Vec<String> = step.vms.iter().map(ToString::to_string).collect();
    let env = [
        ("TERN_PLAN", name.to_string()),
        ("TERN_GROUP", group.to_string()),
        ("TERN_VMS", vms.join(" ")),
        ("TERN_OUTPUT", run.output.clone()),
        ("TERN_OPERATION", run.operation.to_string()),
    ];
    let actions = if run.stage == "pre" { &step.pre } else { &step.post };
    while let Some(cmd) = actions.get(run.action) {
        let (stage, n) = (run.stage.clone(), run.action + 1);
        job.phase(&format!("group {group}/{}: {stage} action {n}", plan.steps.len())).await;
        tokio::select! {
            // A cancel already asked for wins (the action is not started); one that comes
            // later drops the action, killing it with what it started.
            biased;
            () = cancel.cancelled() => return Err(stopped(ctx, cancel).unwrap_or(Stop::Cancelled)),
            done = action(cmd, &env) => {
                done.map_err(|e| format!("group {group}: {stage} action `{cmd}` failed: {e}"))?;
            }
        }
        run.action += 1;
        save(ctx, name, run).await?;
    }
    Ok(())
}

/// Walks the groups from where `run` stands, saving after every step.
async fn walk(
    ctx: &Arc<Ctx>,
    name: &PlanName,
    plan: &Plan,
    run: &mut Run,
    job: &crate::jobs::Job,
    wake: &Notify,
    cancel: &CancellationToken,
) -> Result<(), Stop> {
    let total = plan.vms().count() as u64;
    while run.step < plan.steps.len() {
        if let Some(stop) = stopped(ctx, cancel) {
            return Err(stop);
        }
        let step = &plan.steps[run.step];
        let group = run.step + 1;
        match run.stage.as_str() {
            "pre" | "post" => {
                if run.operation.acts() {
                    run_actions(ctx, name, plan, run, job, cancel).await?;
                }
                run.action = 0;
                run.stage = if run.stage == "pre" { "vms".into() } else { "manual".into() };
            }
            "vms" => {
                for vm in &step.vms {
                    if run.done.contains(&vm.to_string()) {
                        continue;
                    }
                    // Between VMs, never within one's operation: each is done or not.
                    if let Some(stop) = stopped(ctx, cancel) {
                        return Err(stop);
                    }
                    if let Some(d) = lock(&ctx.plans.driving).get_mut(name.as_str()) {
                        d.at_vm = Some(vm.to_string());
                    }
                    job.phase(&format!("group {group}/{}: {} of {vm}", plan.steps.len(), run.operation))
                        .await;
                    job.progress(run.done.len() as u64, total);
                    if already_done(ctx, name, run, vm, job)
                        .await
                        .map_err(|e| format!("group {group}: VM {vm}: {e}"))?
                    {
                        save(ctx, name, run).await?;
                        continue;
                    }
                    stop_group(ctx, name, plan, run, vm, job)
                        .await
                        .map_err(|e| format!("group {group}: {e}"))?;
                    let point = one_vm(ctx, plan, run, vm).await.map_err(|e| {
                        let mut e = format!("group {group}: VM {vm}: {e}");
                        if run.operation == Operation::Failover && run.kind == "planned" {
                            e += &format!(
                                ". If its source cannot be shut down, fail it over alone (`drctl failover {vm} \
                                 --kind unplanned --point latest --output {}`): `drctl plan continue {name}` \
                                 then goes on past it",
                                PathBuf::from(&run.output).join(vm.as_str()).display()
                            );
                        }
                        e
                    })?;
                    if let Some(p) = point {
                        run.points.insert(vm.to_string(), p);
                    }
                    run.done.push(vm.to_string());
                    save(ctx, name, run).await?;
                    if let Some(d) = lock(&ctx.plans.driving).get_mut(name.as_str()) {
                        d.at_vm = None;
                    }
                }
                run.stage = "post".into();
            }
            _ => {
                if let Some(text) = step.manual.as_ref().filter(|_| run.operation.acts()) {
                    wait_manual(ctx, name, run, job, (wake, cancel), group, text).await?;
                }
                run.step += 1;
                run.stage = "pre".into();
                run.waited = false;
            }
        }
        save(ctx, name, run).await?;
    }
    job.progress(total, total);
    Ok(())
}

/// A manual step after group `group`: the run waits, saying `text`, until `drctl plan
/// continue` wakes it (or the plan is cancelled or the server stops).
async fn wait_manual(
    ctx: &Arc<Ctx>,
    name: &PlanName,
    run: &mut Run,
    job: &crate::jobs::Job,
    (wake, cancel): (&Notify, &CancellationToken),
    group: usize,
    text: &str,
) -> Result<(), Stop> {
    run.state = "waiting".into();
    run.waited = true;
    run.message = format!("group {group}: {text} — then `drctl plan continue {name}`");
    save(ctx, name, run).await?;
    if let Some(d) = lock(&ctx.plans.driving).get_mut(name.as_str()) {
        d.waiting = true;
    }
    job.phase(&format!("waiting: {}", run.message)).await;
    info!(plan = %name, group, manual = %text, "plan waits for `plan continue`");
    tokio::select! {
        () = wake.notified() => {}
        // At this manual step: a `continue` later is the operator's word that it is done.
        () = cancel.cancelled() => return Err(stopped(ctx, cancel).unwrap_or(Stop::Cancelled)),
    }
    run.state = "running".into();
    run.message.clear();
    Ok(())
}

/// Failback: before the first member of a replication group is applied, every member the
/// plan names is shut down and its final point made, so that the group comes back at one
/// moment — all of them stopped — whatever the order of the plan's groups.
async fn stop_group(
    ctx: &Arc<Ctx>,
    name: &PlanName,
    plan: &Plan,
    run: &mut Run,
    vm: &VmName,
    job: &crate::jobs::Job,
) -> Result<(), String> {
    if run.operation != Operation::Failback || run.finals.contains_key(vm.as_str()) {
        return Ok(());
    }
    let group_of = |v: &VmName| {
        let (store, v) = (ctx.store.clone(), v.clone());
        async move {
            blocking(move || store.group_of(&v))
                .await
                .map_err(|e| e.message().to_string())?
                .map_err(|e| e.to_string())
        }
    };
    let Some(group) = group_of(vm).await? else { return Ok(()) };
    let mut members = Vec::new();
    for m in plan.vms() {
        if !run.done.contains(&m.to_string()) && group_of(m).await?.as_ref() == Some(&group) {
            members.push(m.clone());
        }
    }
    if members.len() < 2 {
        return Ok(());
    }
    for m in &members {
        if run.finals.contains_key(m.as_str()) {
            continue;
        }
        // Members shut down before this one stay down: the application is split until the
        // rest are (the member's own error speaks only of it, "nothing changed").
        let down: Vec<&str> =
            members.iter().map(VmName::as_str).filter(|v| run.finals.contains_key(*v)).collect();
        let why = |e: String| {
            let split = if down.is_empty() {
                String::new()
            } else {
                format!(
                    ". Already shut down, their final points made: {}; the rest of the group runs on until \
                     `drctl plan continue {name}` shuts it down and goes on",
                    down.join(", ")
                )
            };
            format!("VM {m} (replication group {group}, shut down with the rest of it): {e}{split}")
        };
        // One failback of a VM at a time: a `drctl failback` of this member now would shut
        // it down a second time. Held until the member's own failback (`failback_vm`).
        let entered = crate::failback::FailingBack::enter(ctx, m).map_err(why)?;
        let point = crate::failback::shut_down_recovered(ctx, m, job).await.map_err(why)?;
        if let Some(d) = lock(&ctx.plans.driving).get_mut(name.as_str()) {
            d.entered.insert(m.to_string(), entered);
        }
        info!(plan = %name, vm = %m, group = %group, point = %point.id, "shut down with its replication group for the failback");
        run.finals.insert(m.to_string(), point.id.0);
        save(ctx, name, run).await?;
    }
    Ok(())
}

/// Runs an action with the plan's environment; its output goes to the log.
/// The most of an action's standard error kept (logged, and its last lines said).
const ACTION_STDERR_KEPT: usize = 4096;

async fn action(cmd: &str, env: &[(&str, String)]) -> Result<(), String> {
    let mut c = tokio::process::Command::new("sh");
    // Its own process group: a timeout, a cancel or the server stopping kills what it
    // started too, not only the shell.
    c.arg("-c").arg(cmd).kill_on_drop(true).process_group(0);
    // Its output is not kept, and of its errors only the last ACTION_STDERR_KEPT bytes
    // (W19-B: an action writing hundreds of MB took the server's memory with it).
    c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().map_err(|e| format!("cannot run it: {e}"))?;
    let group = GroupKill(child.id());
    let mut stderr = child.stderr.take().ok_or("cannot run it: no pipe for its errors")?;
    let ran = async {
        use tokio::io::AsyncReadExt;
        let mut tail = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = stderr.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            tail.extend_from_slice(&buf[..n]);
            if tail.len() > 2 * ACTION_STDERR_KEPT {
                tail.drain(..tail.len() - ACTION_STDERR_KEPT);
            }
        }
        tail.drain(..tail.len().saturating_sub(ACTION_STDERR_KEPT));
        Ok::<_, std::io::Error>((child.wait().await?, tail))
    };
    let (status, tail) = tokio::time::timeout(ACTION_TIMEOUT, ran)
        .await
        .map_err(|_| format!("still running after {} s (killed)", ACTION_TIMEOUT.as_secs()))?
        .map_err(|e| format!("cannot run it: {e}"))?;
    // Ended by itself: what it left running on purpose (a service it started) stays.
    std::mem::forget(group);
    let text = String::from_utf8_lossy(&tail);
    let text = text.trim();
    info!(command = cmd, status = %status, stderr = text, "plan action ran");
    if status.success() {
        return Ok(());
    }
    let tail: String =
        text.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("; ");
    Err(format!("{status}{}", if tail.is_empty() { String::new() } else { format!(": {tail}") }))
}

/// Kills an action's process group when dropped before the action ended.
struct GroupKill(Option<u32>);

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

/// The operation on one VM, as its own job (progress and output in `drctl jobs`); the
/// point it wrote, for test failover and failover.
async fn one_vm(ctx: &Arc<Ctx>, plan: &Plan, run: &mut Run, vm: &VmName) -> Result<Option<u64>, String> {
    let out_dir = PathBuf::from(&run.output).join(vm.as_str());
    let format = if run.format == "vhd" { Format::Vhd } else { Format::Raw };
    let spec = match run.points.get(vm.as_str()) {
        Some(0) | None => PointSpec::Latest,
        Some(&id) => PointSpec::Id(PointId(id)),
    };
    let status = |s: Status| s.message().to_string();
    match run.operation {
        Operation::TestFailover => {
            // As `drctl test-failover`: not into a directory another output holds.
            let dir = ctx.jobs.claim_dir(vm, "test failover", &out_dir).await.map_err(status)?;
            let job = ctx.jobs.start(JobKind::TestFailover, vm).await.map_err(status)?;
            let r = run_test_failover(ctx, vm.clone(), spec, out_dir, format, &job).await;
            drop(dir);
            finish(&job, r).await.map(Some)
        }
        Operation::Failover => {
            let kind: FailoverKind =
                run.kind.parse().map_err(|_| "a failover's kind is planned or unplanned".to_string())?;
            let jk = if kind == FailoverKind::Planned {
                JobKind::PlannedFailover
            } else {
                JobKind::UnplannedFailover
            };
            let claim = ctx.jobs.claim_output(vm, "plan step").map_err(status)?;
            // As `drctl failover` (W19-C: a plan's test failover and a VM's failover wrote the
            // same directory, and the cleanup deleted the recovered disks). A VM found failed
            // over was done before, and is not here.
            let dir = ctx.jobs.claim_dir(vm, "failover", &out_dir).await.map_err(status)?;
            let job = ctx.jobs.start(jk, vm).await.map_err(status)?;
            let r = run_failover(ctx, vm.clone(), kind, spec, out_dir, format, false, &job).await;
            drop((claim, dir));
            finish(&job, r).await.map(Some)
        }
        Operation::Failback => failback_vm(ctx, &plan.name, run, vm).await.map(Some),
        Operation::FailbackDrill => {
            let job = ctx.jobs.start(JobKind::FailbackDrill, vm).await.map_err(status)?;
            let r = crate::failback::drill(ctx, vm.clone(), job.clone()).await;
            finish(&job, r).await.map(Some)
        }
        Operation::TestFailoverCleanup => {
            let (store, v) = (ctx.store.clone(), vm.clone());
            match blocking(move || store.test_failover_cleanup(&v)).await.map_err(status)? {
                Ok(_) | Err(tern_store::StoreError::NoTestFailover(_)) => Ok(None),
                Err(e) => Err(e.to_string()),
            }
        }
        Operation::Commit => {
            let (store, v) = (ctx.store.clone(), vm.clone());
            let state =
                blocking(move || store.vm_state(&v)).await.map_err(status)?.map_err(|e| e.to_string())?;
            if state == VmState::FailedBack {
                return crate::failback::commit_failback(ctx, vm).await.map(|p| Some(p.0)).map_err(status);
            }
            let (store, v) = (ctx.store.clone(), vm.clone());
            blocking(move || store.commit(&v))
                .await
                .map_err(status)?
                .map(|p| Some(p.0))
                .map_err(|e| e.to_string())
        }
        Operation::Reprotect => reprotect_vm(ctx, plan, run, vm).await.map(|()| None),
        Operation::ReverseReplicate => {
            crate::failback::reverse_replicate(ctx, vm).await.map(|()| None).map_err(status)
        }
    }
}

/// Whether `vm` is already where the operation leaves it (an earlier run of the plan did
/// it, or the operator by hand): then marked done, not done again; a failover whose
/// output was cut short has it written first.
async fn already_done(
    ctx: &Arc<Ctx>,
    name: &PlanName,
    run: &mut Run,
    vm: &VmName,
    job: &crate::jobs::Job,
) -> Result<bool, String> {
    let (store, v) = (ctx.store.clone(), vm.clone());
    let state = blocking(move || store.vm_state(&v)).await.map_err(|e| e.message().to_string())?;
    if run.operation.leaves().is_none() || state.ok() != run.operation.leaves() {
        return Ok(false);
    }
    info!(plan = %name, vm = %vm, operation = %run.operation, "VM already done; not done again");
    if run.operation == Operation::Failover
        && let Some(p) = finish_output(ctx, vm, job).await?
    {
        run.points.insert(vm.to_string(), p);
    }
    run.done.push(vm.to_string());
    Ok(true)
}

/// A VM this plan failed over whose output was cut short (the process server stopped while
/// it was written): written again at its failover's position before the plan goes on, so
/// that a later group never starts beside a VM without its disks. The point, when written.
async fn finish_output(ctx: &Arc<Ctx>, vm: &VmName, job: &crate::jobs::Job) -> Result<Option<u64>, String> {
    let _claim = ctx.jobs.claim_output(vm, "plan step").map_err(|s| s.message().to_string())?;
    let (store, v, j) = (ctx.store.clone(), vm.clone(), job.clone());
    let out = blocking(move || store.finish_failover_output(&v, &mut |done, total| j.progress(done, total)))
        .await
        .map_err(|e| e.message().to_string())?
        .map_err(|e| e.to_string())?;
    if let Some(o) = &out {
        warn!(vm = %vm, point = %o.point, "its failover output had been cut short: written again at its point");
    }
    Ok(out.map(|o| o.point))
}

/// A failback of one VM, at the final point made when its replication group was shut
/// down (see [`stop_group`]), or after a shutdown of its own.
async fn failback_vm(ctx: &Arc<Ctx>, name: &PlanName, run: &Run, vm: &VmName) -> Result<u64, String> {
    // Entered when its replication group was shut down, if it was.
    let entered = lock(&ctx.plans.driving).get_mut(name.as_str()).and_then(|d| d.entered.remove(vm.as_str()));
    let job = ctx.jobs.start(JobKind::Failback, vm).await.map_err(|s| s.message().to_string())?;
    let point = match run.finals.get(vm.as_str()) {
        Some(&id) => {
            let (store, v) = (ctx.store.clone(), vm.clone());
            let p = blocking(move || store.resolve_point(&v, &PointSpec::Id(PointId(id))))
                .await
                .map_err(|s| s.message().to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            match p {
                Ok(p) => Some(p),
                Err(e) => {
                    job.fail(&e).await;
                    return Err(e);
                }
            }
        }
        None => None,
    };
    let r = crate::failback::failback_at(ctx, vm.clone(), job.clone(), point, entered).await;
    finish(&job, r).await
}

/// Reprotects one VM to the master target its `[vm.NAME]` section names; its agent's
/// identity goes to the run's identity directory.
async fn reprotect_vm(ctx: &Arc<Ctx>, plan: &Plan, run: &mut Run, vm: &VmName) -> Result<(), String> {
    let status = |s: Status| s.message().to_string();
    let t = plan.targets.get(vm).ok_or("no [vm] section for it in the plan file")?;
    let r = pb::ReprotectRequest {
        vm: vm.to_string(),
        master_target: t.master_target.clone(),
        alternate: t.alternate,
        target_disks: t.target_disks.clone(),
        sync: pb::SyncMode::write(t.sync),
    };
    let reply = crate::failback::reprotect(ctx, r).await.map_err(status)?;
    run.agents.insert(vm.to_string(), reply.recovered_disks);
    let dir = PathBuf::from(&run.identity_dir);
    let path = dir.join(format!("{vm}.bundle"));
    let bundle = reply.bundle;
    blocking(move || {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        tern_core::pki::write_private(&path, &bundle).map_err(|e| e.to_string())
    })
    .await
    .map_err(status)?
    .map_err(|e| format!("cannot write the agent identity in {}: {e}", run.identity_dir))
}

async fn finish(job: &crate::jobs::Job, r: Result<pb::JobOutput, String>) -> Result<u64, String> {
    match r {
        Ok(out) => {
            let point = out.point;
            job.succeed(out).await;
            Ok(point)
        }
        Err(e) => {
            job.fail(&e).await;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Retention reads a run's JSON by its field names (the store does not know this type):
    /// a run waiting at a manual step pins the points of the VMs it has not done yet.
    #[test]
    fn the_store_reads_the_points_a_run_pins() {
        let run = Run {
            state: "waiting".into(),
            done: vec!["web".into()],
            points: [("web".to_string(), 5), ("db".to_string(), 7)].into(),
            finals: [("app".to_string(), 9)].into(),
            ..Default::default()
        };
        let json = serde_json::to_string(&run).unwrap();
        assert_eq!(tern_store::plan_run_pins(&json, "db"), vec![7]);
        assert_eq!(tern_store::plan_run_pins(&json, "app"), vec![9]);
        assert_eq!(tern_store::plan_run_pins(&json, "web"), Vec::<u64>::new());
        let done = serde_json::to_string(&Run { state: "done".into(), ..run }).unwrap();
        assert_eq!(tern_store::plan_run_pins(&done, "db"), Vec::<u64>::new());
    }

    /// An action's output is not kept, nor more than the end of its errors, however much it
    /// writes; the last lines say why it failed.
    #[tokio::test]
    async fn an_action_that_writes_much_is_answered_with_the_end_of_its_errors() {
        let loud = "head -c 100000000 /dev/zero; head -c 20000000 /dev/zero | tr '\\0' b >&2; \
                    printf '\\nfirst\\nsecond\\nthird\\n' >&2; exit 3";
        let err = action(loud, &[]).await.unwrap_err();
        assert!(err.contains("3") && err.ends_with("first; second; third"), "{}", &err[..err.len().min(300)]);
        assert!(err.len() < ACTION_STDERR_KEPT + 100, "{}", err.len());
        assert_eq!(action("echo fine >&2", &[]).await, Ok(()));
    }
}
