//! The admin API that `drctl` calls. Admin identities only.

use crate::auth::require_admin;
use crate::{Ctx, store_status};
use std::sync::Arc;
use std::time::Duration;
use tern_core::pki::{Ca, Role};
use tern_core::{FailoverKind, JobKind, VmName, VmState};
use tern_proto as pb;
use tern_store::{Consistency, Format, Point, PointSpec};
use tern_store::{MAX_RETENTION_MS, Policy};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

const DEFAULT_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct AdminService {
    pub ctx: Arc<Ctx>,
}

pub(crate) fn vm_arg(s: &str) -> Result<VmName, Status> {
    VmName::new(s).map_err(|e| Status::invalid_argument(e.to_string()))
}

pub fn point_info(p: &Point) -> pb::PointInfo {
    pb::PointInfo {
        id: p.id.0,
        time_ms: p.time_ms,
        consistency: match p.consistency {
            Consistency::App => pb::Consistency::App as i32,
            Consistency::Crash => pb::Consistency::Crash as i32,
        },
        disks: p
            .disks
            .iter()
            .map(|d| pb::PointDisk {
                disk: d.disk.to_string(),
                seq: d.seq.0,
                fingerprint: d.fingerprint.0.to_vec(),
            })
            .collect(),
        note: p.note.clone(),
        group: p.group.as_ref().map(ToString::to_string).unwrap_or_default(),
    }
}

pub(crate) use tern_daemon::blocking;

impl AdminService {
    async fn state(&self, vm: &VmName) -> Result<VmState, Status> {
        let store = self.ctx.store.clone();
        let v = vm.clone();
        blocking(move || store.vm_state(&v)).await?.map_err(store_status)
    }

    /// While a VM is reprotected, this server's copy is the spool of the failback stream
    /// (records relative to the master target's disk), not a disk to rebuild.
    async fn refuse_while_failing_back(&self, vm: &VmName) -> Result<(), Status> {
        let state = self.state(vm).await?;
        if matches!(state, VmState::Reprotected | VmState::FailedBack) {
            return Err(Status::failed_precondition(format!(
                "VM {vm} is {state}: its points here describe the way back to the master target; \
                 test failover and verify are available again after `drctl reverse-replicate {vm}`"
            )));
        }
        Ok(())
    }

    async fn known_vm(&self, vm: &VmName) -> Result<(), Status> {
        let store = self.ctx.store.clone();
        let v = vm.clone();
        let known = blocking(move || store.has_vm(&v)).await?.map_err(store_status)?;
        if known {
            return Ok(());
        }
        let enrolled =
            crate::identities::waiting(&self.ctx.identities, &[]).into_iter().find(|w| w.vm == vm.as_str());
        Err(Status::not_found(match enrolled {
            Some(w) => format!(
                "VM {vm} is enrolled (its agent identity was issued {}) but its agent has not connected \
                 yet; start it with `mobility-agent run --vm {vm} ...`",
                tern_store::rfc3339(w.enrolled_ms)
            ),
            None => format!(
                "VM {vm} is not protected here: enroll its agent (`drctl enroll agent --vm {vm} --out FILE`) \
                 and start it (`mobility-agent run --vm {vm} ...`)"
            ),
        }))
    }

    /// A point named by id, time or kind is looked up before a job starts, so that a
    /// wrong one is refused as not found (`latest` asks the agent, in the job).
    async fn point_exists(&self, vm: &VmName, spec: &PointSpec) -> Result<(), Status> {
        if *spec == PointSpec::Latest {
            return Ok(());
        }
        let (store, v, s) = (self.ctx.store.clone(), vm.clone(), spec.clone());
        blocking(move || store.resolve_point(&v, &s)).await?.map(|_| ()).map_err(store_status)
    }

    pub(crate) async fn vm_status(&self, vm: VmName) -> Result<pb::VmStatus, Status> {
        let store = self.ctx.store.clone();
        let v = vm.clone();
        let last = blocking(move || store.latest_point(&v)).await?.map_err(store_status)?;
        let last = last.as_ref();
        let connected = self.ctx.hub.connected(&vm);
        let rpo = last.map_or(-1, |p| ((tern_store::now_ms() - p.time_ms) / 1000).max(0));
        let absent = self.ctx.hub.disconnected_for(&vm).map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX));
        let (policy, state, test, not_whole) = {
            let store = self.ctx.store.clone();
            let v = vm.clone();
            blocking(move || {
                Ok::<_, tern_store::StoreError>((
                    store.policy(&v)?,
                    store.vm_state(&v)?,
                    store.test_failover_row(&v)?,
                    store.failover_not_whole(&v)?,
                ))
            })
            .await?
            .map_err(store_status)?
        };
        let error = crate::health::problem(&self.ctx, &vm).unwrap_or_default();
        let failing_back = crate::lock(&self.ctx.failing_back).contains(&vm);
        let health = crate::health::health(
            state,
            rpo,
            absent,
            policy.rpo_threshold_ms / 1000,
            !error.is_empty(),
            failing_back,
        );
        // A failed-over VM whose disks were not written whole cannot start: said, critical.
        let (health, error) = match crate::health::output_cut_short(&self.ctx, &vm, not_whole) {
            Some(why) if error.is_empty() => (tern_core::Health::Critical, why),
            _ => (health, error),
        };
        // Not in place of why a VM is critical (its agent away, its RPO).
        let (health, error) = match crate::health::concern(&self.ctx, &vm) {
            Some(why) if error.is_empty() && health != tern_core::Health::Critical => {
                (crate::health::with_concern(health, true), why)
            }
            _ => (health, error),
        };
        let disks = self
            .ctx
            .store
            .vm_disks(&vm)
            .iter()
            .map(|h| {
                // The agent's report holds while it is connected; a stood-down or absent
                // agent's last one would pass for now.
                let t = connected
                    .then(|| self.ctx.hub.tracking(&vm, h.name.as_str()))
                    .flatten()
                    .unwrap_or_default();
                pb::DiskStatus {
                    name: h.name.to_string(),
                    size: h.size,
                    durable_seq: h.durable().0,
                    journal_bytes: h.journal_bytes(),
                    master_target_seq: self.ctx.relay.acked(&vm, &h.name).0,
                    tracking: t.regime,
                    backlog_bytes: t.backlog_bytes,
                    hot_bytes: t.hot_bytes,
                    pass_offset: t.pass_offset,
                }
            })
            .collect();
        let group = {
            let (store, v) = (self.ctx.store.clone(), vm.clone());
            blocking(move || store.group_of(&v)).await?.map_err(store_status)?
        };
        let group = group.map(|g| g.to_string()).unwrap_or_default();
        Ok(pb::VmStatus {
            vm: vm.to_string(),
            state: pb::VmState::write(state),
            initial_sync: state == VmState::Protected && last.is_none(),
            retention_ms: crate::lock(&self.ctx.retention_runs).get(&vm).copied().unwrap_or(0),
            health: pb::Health::write(health),
            agent_connected: connected,
            last_point: last.map_or(0, |p| p.id.0),
            last_point_time_ms: last.map_or(0, |p| p.time_ms),
            rpo_seconds: rpo,
            bytes_received: self.ctx.hub.bytes_received(&vm),
            disks,
            policy: Some(policy_info(&policy)),
            storage_bytes: self.ctx.store.vm_disks(&vm).iter().map(|h| h.bytes_used()).sum(),
            error,
            group,
            test_failover: test.map(|t| pb::OpenTestFailover { point: t.point.0, output: t.output }),
            job: self.ctx.jobs.running_of(&vm),
        })
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn change_group(&self, req: Request<pb::GroupChange>) -> Result<Response<pb::GroupInfo>, Status> {
        require_admin(&req, "ChangeGroup")?;
        let info = crate::groups::change_group(&self.ctx, req.into_inner()).await?;
        Ok(Response::new(info.unwrap_or_default()))
    }

    async fn apply_plan(&self, req: Request<pb::ApplyPlanRequest>) -> Result<Response<pb::PlanInfo>, Status> {
        require_admin(&req, "ApplyPlan")?;
        Ok(Response::new(crate::plan::apply(&self.ctx, req.into_inner()).await?))
    }

    async fn plans(&self, req: Request<pb::PlansRequest>) -> Result<Response<pb::PlansReply>, Status> {
        require_admin(&req, "Plans")?;
        let plans = crate::plan::list(&self.ctx, &req.into_inner().name).await?;
        Ok(Response::new(pb::PlansReply { plans }))
    }

    async fn remove_plan(&self, req: Request<pb::PlanRef>) -> Result<Response<pb::PlanInfo>, Status> {
        require_admin(&req, "RemovePlan")?;
        Ok(Response::new(crate::plan::remove(&self.ctx, &req.into_inner().name).await?))
    }

    async fn run_plan(&self, req: Request<pb::RunPlanRequest>) -> Result<Response<pb::JobStarted>, Status> {
        require_admin(&req, "RunPlan")?;
        let job = crate::plan::start(&self.ctx, req.into_inner()).await?;
        Ok(Response::new(pb::JobStarted { job }))
    }

    async fn continue_plan(&self, req: Request<pb::PlanRef>) -> Result<Response<pb::JobStarted>, Status> {
        require_admin(&req, "ContinuePlan")?;
        let job = crate::plan::resume(&self.ctx, &req.into_inner().name).await?;
        Ok(Response::new(pb::JobStarted { job }))
    }

    async fn cancel_plan(&self, req: Request<pb::PlanRef>) -> Result<Response<pb::JobStarted>, Status> {
        require_admin(&req, "CancelPlan")?;
        let job = crate::plan::cancel(&self.ctx, &req.into_inner().name).await?;
        Ok(Response::new(pb::JobStarted { job }))
    }

    async fn groups(&self, req: Request<pb::GroupsRequest>) -> Result<Response<pb::GroupsReply>, Status> {
        require_admin(&req, "Groups")?;
        let groups = crate::groups::groups(&self.ctx, &req.into_inner().name).await?;
        Ok(Response::new(pb::GroupsReply { groups }))
    }

    async fn group_checkpoint(
        &self,
        req: Request<pb::GroupCheckpointRequest>,
    ) -> Result<Response<pb::GroupCheckpointReply>, Status> {
        require_admin(&req, "GroupCheckpoint")?;
        Ok(Response::new(crate::groups::checkpoint(&self.ctx, req.into_inner()).await?))
    }

    async fn enroll(&self, req: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollReply>, Status> {
        require_admin(&req, "Enroll")?;
        let r = req.into_inner();
        let role = match pb::Role::try_from(r.role) {
            Ok(pb::Role::Agent) => Role::Agent(vm_arg(&r.name)?),
            Ok(pb::Role::MasterTarget) => Role::MasterTarget(
                tern_core::pki::master_target_name(&r.name)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            ),
            Ok(pb::Role::Admin) => Role::Admin,
            _ => return Err(Status::invalid_argument("role must be agent, master-target or admin")),
        };
        let (bundle, serial) = issue_bundle(&self.ctx, role).await?;
        Ok(Response::new(pb::EnrollReply { bundle, serial }))
    }

    async fn identities(
        &self,
        req: Request<pb::IdentitiesRequest>,
    ) -> Result<Response<pb::IdentitiesReply>, Status> {
        require_admin(&req, "Identities")?;
        let rows = self.ctx.identities.list();
        Ok(Response::new(pb::IdentitiesReply {
            identities: rows.iter().map(crate::identities::info).collect(),
        }))
    }

    async fn revoke(&self, req: Request<pb::RevokeRequest>) -> Result<Response<pb::IdentitiesReply>, Status> {
        require_admin(&req, "Revoke")?;
        let caller = crate::identities::caller_serial(&req);
        Ok(Response::new(crate::identities::revoke(&self.ctx, caller, req.into_inner()).await?))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        require_admin(&req, "Status")?;
        let r = req.into_inner();
        let vms = if r.vm.is_empty() {
            let store = self.ctx.store.clone();
            blocking(move || store.vms()).await?.map_err(store_status)?
        } else {
            let vm = vm_arg(&r.vm)?;
            if let Err(unknown) = self.known_vm(&vm).await {
                // Enrolled, its agent never connected: shown as the list shows it (a warning
                // to a check), not as a VM that does not exist.
                let waiting: Vec<_> = crate::identities::waiting(&self.ctx.identities, &[])
                    .into_iter()
                    .filter(|w| w.vm == vm.as_str())
                    .collect();
                if waiting.is_empty() {
                    return Err(unknown);
                }
                return Ok(Response::new(pb::StatusReply { vms: Vec::new(), groups: Vec::new(), waiting }));
            }
            vec![vm]
        };
        let mut out = Vec::new();
        for vm in vms {
            out.push(self.vm_status(vm).await?);
        }
        let mut groups = crate::groups::groups(&self.ctx, "").await?;
        let mut waiting = Vec::new();
        if r.vm.is_empty() {
            let protected: Vec<VmName> = out.iter().filter_map(|s| VmName::new(&s.vm).ok()).collect();
            waiting = crate::identities::waiting(&self.ctx.identities, &protected);
        } else {
            groups.retain(|g| g.vms.contains(&r.vm));
        }
        Ok(Response::new(pb::StatusReply { vms: out, groups, waiting }))
    }

    async fn points(&self, req: Request<pb::PointsRequest>) -> Result<Response<pb::PointsReply>, Status> {
        require_admin(&req, "Points")?;
        let r = req.into_inner();
        let vm = vm_arg(&r.vm)?;
        self.known_vm(&vm).await?;
        let store = self.ctx.store.clone();
        let limit = usize::try_from(r.limit).unwrap_or(usize::MAX);
        let (points, total) =
            blocking(move || store.recent_points(&vm, limit)).await?.map_err(store_status)?;
        Ok(Response::new(pb::PointsReply { points: points.iter().map(point_info).collect(), total }))
    }

    async fn checkpoint(
        &self,
        req: Request<pb::CheckpointCall>,
    ) -> Result<Response<pb::CheckpointReply>, Status> {
        require_admin(&req, "Checkpoint")?;
        let r = req.into_inner();
        let vm = vm_arg(&r.vm)?;
        self.known_vm(&vm).await?;
        let rx = self.ctx.hub.request_checkpoint(&vm, r.app_consistent).await?;
        info!(vm = %vm, app = r.app_consistent, "checkpoint requested");
        if !r.wait {
            return Ok(Response::new(pb::CheckpointReply { point: None }));
        }
        let limit =
            if r.timeout_ms == 0 { DEFAULT_CHECKPOINT_TIMEOUT } else { Duration::from_millis(r.timeout_ms) };
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(Ok(point))) => Ok(Response::new(pb::CheckpointReply { point: Some(point_info(&point)) })),
            // Not a state that refuses it (6): the point failed (exit 1).
            Ok(Ok(Err(reason))) => Err(Status::aborted(format!("no point was made: {reason}"))),
            Ok(Err(_)) => {
                Err(Status::unavailable("the agent went away before the point was made; try again"))
            }
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no point within {:?}; the agent may still be sending the changes (see `drctl status {vm}`)",
                limit
            ))),
        }
    }

    async fn test_failover(
        &self,
        req: Request<pb::TestFailoverRequest>,
    ) -> Result<Response<pb::TestFailoverReply>, Status> {
        require_admin(&req, "TestFailover")?;
        let r = req.into_inner();
        let vm = vm_arg(&r.vm)?;
        self.known_vm(&vm).await?;
        self.refuse_while_failing_back(&vm).await?;
        let spec = point_arg(&vm, &r.point)?;
        output_arg(&r.output, self.ctx.store.root())?;
        self.point_exists(&vm, &spec).await?;
        // Refused here, not as a failed job: one open test failover at a time.
        let (store, v) = (self.ctx.store.clone(), vm.clone());
        if let Some(open) = blocking(move || store.test_failover_row(&v)).await?.map_err(store_status)? {
            return Err(store_status(tern_store::StoreError::TestFailoverOpen {
                vm,
                point: open.point,
                output: open.output,
            }));
        }
        let format = if r.format == pb::OutputFormat::Vhd as i32 { Format::Vhd } else { Format::Raw };
        let out_dir = std::path::PathBuf::from(&r.output);
        let claim = self.ctx.jobs.claim_dir(&vm, "test failover", &out_dir).await?;
        let job = self.ctx.jobs.start(JobKind::TestFailover, &vm).await?;
        let id = job.id;
        let ctx = self.ctx.clone();
        self.ctx.tracker.spawn(async move {
            let done = run_test_failover(&ctx, vm, spec, out_dir, format, &job).await;
            // Open (its row kept) or not, the directory is no longer being written.
            drop(claim);
            match done {
                Ok(output) => job.succeed(output).await,
                Err(e) => job.fail(&e).await,
            }
        });
        Ok(Response::new(pb::TestFailoverReply { job: id }))
    }

    async fn test_failover_cleanup(
        &self,
        req: Request<pb::CleanupRequest>,
    ) -> Result<Response<pb::CleanupReply>, Status> {
        require_admin(&req, "TestFailoverCleanup")?;
        let vm = vm_arg(&req.into_inner().vm)?;
        self.known_vm(&vm).await?;
        // The files of a test failover still being written would go under its job.
        let writing = self.ctx.jobs.running(&vm, &[JobKind::TestFailover]).await?;
        if let Some(j) = writing {
            return Err(Status::failed_precondition(format!(
                "the test failover of VM {vm} is still being written (job {}); clean up once it has ended \
                 (`drctl jobs --wait {}`)",
                j.id, j.id
            )));
        }
        let store = self.ctx.store.clone();
        let v = vm.clone();
        let removed = blocking(move || {
            store.room_for_recovery("a test failover's cleanup");
            store.test_failover_cleanup(&v)
        })
        .await?
        .map_err(store_status)?;
        info!(vm = %vm, files = removed.len(), "test failover cleaned up");
        Ok(Response::new(pb::CleanupReply { removed }))
    }

    async fn set_policy(
        &self,
        req: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::PolicyInfo>, Status> {
        require_admin(&req, "SetPolicy")?;
        let r = req.into_inner();
        let vm = vm_arg(&r.vm)?;
        self.known_vm(&vm).await?;
        let state = self.state(&vm).await?;
        if matches!(state, VmState::Reprotected | VmState::FailedBack) {
            return Err(Status::failed_precondition(format!(
                "VM {vm} is {state}: its failback policy (RPO threshold 15m, retention 24h, app interval 60m) cannot be edited"
            )));
        }
        let want = r.policy.unwrap_or_default();
        let store = self.ctx.store.clone();
        let v = vm.clone();
        let policy = blocking(move || {
            // A partial change is of the VM's own policy (kept during the way back).
            let mut p = store.own_policy(&v)?;
            let ms = |x: u64, cur: i64| if x == 0 { cur } else { i64::try_from(x).unwrap_or(i64::MAX) };
            p.retention_ms = ms(want.retention_ms, p.retention_ms);
            p.crash_interval_ms = ms(want.crash_interval_ms, p.crash_interval_ms);
            p.app_interval_ms = ms(want.app_interval_ms, p.app_interval_ms);
            p.rpo_threshold_ms = ms(want.rpo_threshold_ms, p.rpo_threshold_ms);
            p.max_journal_bytes = match want.max_journal_bytes {
                0 => p.max_journal_bytes,
                u64::MAX => 0,
                b => i64::try_from(b).unwrap_or(i64::MAX),
            };
            Ok::<_, tern_store::StoreError>(p)
        })
        .await?
        .map_err(store_status)?;
        for (name, v) in [
            ("--retention", policy.retention_ms),
            ("--crash-interval", policy.crash_interval_ms),
            ("--app-interval", policy.app_interval_ms),
            ("--rpo-threshold", policy.rpo_threshold_ms),
        ] {
            if v < 1000 {
                return Err(Status::invalid_argument(format!("{name} must be at least 1s")));
            }
            // As long as points are kept at most: longer is a unit mistyped, most often
            // (`5M` is five months).
            if v > MAX_RETENTION_MS {
                return Err(Status::invalid_argument(format!(
                    "{name} may be at most 30d ({} given; M is months, m minutes)",
                    tern_core::units::rpo_text(v / 1000)
                )));
            }
        }
        // Journals are freed a segment at a time (each disk keeps the one it writes into):
        // below two segments a disk, every pass would prune all but the newest point.
        let disks = self.ctx.store.vm_disks(&vm).len().max(1) as u64;
        let least = 2 * self.ctx.store.segment_bytes() * disks;
        if want.max_journal_bytes != 0
            && policy.max_journal_bytes != 0
            && u64::try_from(policy.max_journal_bytes).unwrap_or(0) < least
        {
            return Err(Status::invalid_argument(format!(
                "--max-journal must be at least {} (twice the process server's --segment-size for each of \
                 the VM's {disks} disk(s): journals are freed a segment at a time), or none",
                tern_core::units::size_text(least)
            )));
        }
        let store = self.ctx.store.clone();
        let v = vm.clone();
        blocking(move || store.set_policy(&v, &policy)).await?.map_err(store_status)?;
        self.ctx.hub.send_policy(&vm, agent_policy(&policy));
        info!(vm = %vm, retention_ms = policy.retention_ms, crash_interval_ms = policy.crash_interval_ms,
            app_interval_ms = policy.app_interval_ms, rpo_threshold_ms = policy.rpo_threshold_ms,
            max_journal_bytes = policy.max_journal_bytes, "policy set");
        Ok(Response::new(policy_info(&policy)))
    }

    async fn failover(&self, req: Request<pb::FailoverRequest>) -> Result<Response<pb::JobStarted>, Status> {
        require_admin(&req, "Failover")?;
        let r = req.into_inner();
        let vm = vm_arg(&r.vm)?;
        self.known_vm(&vm).await?;
        let kind = pb::FailoverKind::read(r.kind)
            .ok_or_else(|| Status::invalid_argument("a failover's kind must be planned or unplanned"))?;
        let planned = kind == FailoverKind::Planned;
        let spec = point_arg(&vm, if r.point.is_empty() { "latest" } else { &r.point })?;
        output_arg(&r.output, self.ctx.store.root())?;
        // First: a failover or change of point writing the disks now is named as such.
        let claim = self.ctx.jobs.claim_output(&vm, "failover")?;
        let state = self.state(&vm).await?;
        // A failover cut short (a restart of this server) is finished by writing its output
        // again, which a commit needs first (W19-A: the advice named a commit, refused then).
        let (store, v) = (self.ctx.store.clone(), vm.clone());
        if state == VmState::FailedOver
            && let Some(not_whole) =
                blocking(move || store.failover_not_whole(&v)).await?.map_err(store_status)?
        {
            return Err(Status::failed_precondition(format!(
                "VM {vm} is failed-over already, and {not_whole}"
            )));
        }
        if state != VmState::Protected {
            return Err(Status::failed_precondition(format!(
                "VM {vm} is {state}; a failover needs a protected VM{}",
                if state == VmState::FailedOver {
                    " (change the point with `drctl change-point`, or `drctl commit`)"
                } else {
                    ""
                }
            )));
        }
        self.point_exists(&vm, &spec).await?;
        if planned && !self.ctx.hub.connected(&vm) {
            return Err(Status::failed_precondition(format!(
                "a planned failover shuts the source down through its agent, and the agent of {vm} is not connected; \
                 nothing changed. Start the agent, or use --kind unplanned"
            )));
        }
        let format = if r.format == pb::OutputFormat::Vhd as i32 { Format::Vhd } else { Format::Raw };
        let out_dir = std::path::PathBuf::from(&r.output);
        let dir_claim = self.ctx.jobs.claim_dir(&vm, "failover", &out_dir).await?;
        let job = self
            .ctx
            .jobs
            .start(if planned { JobKind::PlannedFailover } else { JobKind::UnplannedFailover }, &vm)
            .await?;
        let id = job.id;
        let ctx = self.ctx.clone();
        let shutdown_source = r.shutdown_source;
        self.ctx.tracker.spawn(async move {
            let done = run_failover(&ctx, vm, kind, spec, out_dir, format, shutdown_source, &job).await;
            // The disks are written: the next change of point may start once the job ends
            // (the catalog's failover row keeps the directory from other outputs).
            drop((claim, dir_claim));
            match done {
                Ok(output) => job.succeed(output).await,
                Err(e) => job.fail(&e).await,
            }
        });
        Ok(Response::new(pb::JobStarted { job: id }))
    }

    async fn change_point(
        &self,
        req: Request<pb::ChangePointRequest>,
    ) -> Result<Response<pb::JobStarted>, Status> {
        require_admin(&req, "ChangePoint")?;
        let r = req.into_inner();
        let vm = vm_arg(&r.vm)?;
        self.known_vm(&vm).await?;
        let mut spec = point_arg(&vm, &r.point)?;
        let mut why = "";
        if spec == PointSpec::Latest {
            // The agent stood down at failover: everything received (in nbd mode, what came
            // after the newest point too).
            spec = PointSpec::Received;
            why = "the agent stood down at the failover, so no new point could be made";
        }
        // Claimed before the state is read: a commit (which claims too) between the two
        // would otherwise leave this writing the output of a committed VM.
        let claim = self.ctx.jobs.claim_output(&vm, "change of point")?;
        let state = self.state(&vm).await?;
        if state != VmState::FailedOver {
            return Err(Status::failed_precondition(format!(
                "VM {vm} is {state}; only a failed-over, uncommitted VM can change its point"
            )));
        }
        self.point_exists(&vm, &spec).await?;
        let job = self.ctx.jobs.start(JobKind::ChangePoint, &vm).await?;
        let id = job.id;
        let ctx = self.ctx.clone();
        self.ctx.tracker.spawn(async move {
            job.phase("writing disks").await;
            let store = ctx.store.clone();
            let j = job.clone();
            let res = blocking(move || {
                store.change_point_noted(&vm, &spec, why, &mut |done, total| j.progress(done, total))
            })
            .await;
            drop(claim);
            match res {
                Ok(Ok(out)) => job.succeed(crate::jobs::output_of(&out)).await,
                Ok(Err(e)) => job.fail(&e.to_string()).await,
                Err(e) => job.fail(e.message()).await,
            }
        });
        Ok(Response::new(pb::JobStarted { job: id }))
    }

    async fn commit(&self, req: Request<pb::CommitRequest>) -> Result<Response<pb::CommitReply>, Status> {
        require_admin(&req, "Commit")?;
        let vm = vm_arg(&req.into_inner().vm)?;
        self.known_vm(&vm).await?;
        // Not while a failover or change of point writes the disks (W19-A: a commit taken
        // during a change of point committed one point while the output held another, or
        // none): refused, naming the job.
        let _claim = self.ctx.jobs.claim_output(&vm, "commit")?;
        let state = self.state(&vm).await?;
        if matches!(state, VmState::FailedOver | VmState::FailedBack) {
            let store = self.ctx.store.clone();
            blocking(move || store.room_for_recovery("a commit")).await?;
        }
        if state == VmState::FailedBack {
            let point = crate::failback::commit_failback(&self.ctx, &vm).await?;
            return Ok(Response::new(pb::CommitReply { point: point.0, ..Default::default() }));
        }
        // The commit deletes the points, the test failover's with them (W19-A: status still
        // said it was open and kept its point, which was gone).
        let (store, v) = (self.ctx.store.clone(), vm.clone());
        if state == VmState::FailedOver
            && let Some(open) = blocking(move || store.test_failover_row(&v)).await?.map_err(store_status)?
        {
            return Err(Status::failed_precondition(format!(
                "VM {vm} has an open test failover (point {} in {}), whose point the commit would delete: \
                 `drctl test-failover-cleanup {vm}` first",
                open.point, open.output
            )));
        }
        let store = self.ctx.store.clone();
        let (point, between) = blocking(move || {
            // A failover to a moment between two points commits at that moment.
            let between = store.failover_row(&vm)?.and_then(|f| f.between);
            Ok::<_, tern_store::StoreError>((store.commit(&vm)?, between))
        })
        .await?
        .map_err(store_status)?;
        Ok(Response::new(pb::CommitReply {
            point: point.0,
            between_time_ms: between.as_ref().map_or(0, |b| b.time_ms),
            between_next: between.map_or(0, |b| b.next),
        }))
    }

    async fn verify(&self, req: Request<pb::VerifyRequest>) -> Result<Response<pb::VerifyReply>, Status> {
        require_admin(&req, "Verify")?;
        let r = req.into_inner();
        let vm = vm_arg(&r.vm)?;
        self.known_vm(&vm).await?;
        self.refuse_while_failing_back(&vm).await?;
        let mut spec = point_arg(&vm, if r.point.is_empty() { "latest-processed" } else { &r.point })?;
        if spec == PointSpec::Latest {
            spec = PointSpec::LatestProcessed;
        }
        let store = self.ctx.store.clone();
        let v = vm.clone();
        let (point, disks) = blocking(move || store.verify(&v, &spec)).await?.map_err(|e| {
            if e.is_storage_full() {
                // Not a verdict on the point: its scratch copy found no room.
                return Status::resource_exhausted(format!(
                    "cannot verify: no room in the data directory for the scratch copy it rebuilds \
                     (DATA_DIR/tmp, as large as the disk's data): {e}; nothing is known against the point"
                ));
            }
            store_status(e)
        })?;
        // As the scrub does: a point that does not recover turns the VM critical, naming it.
        let problem = disks
            .iter()
            .find(|d| !d.ok)
            .map(|d| format!("disk {} has fingerprint {}, the point says {}", d.name, d.actual, d.expected));
        if let Some(p) = &problem {
            tracing::error!(vm = %vm, point = %point, problem = %p, "verify: a recovery point does not recover");
        }
        self.ctx.scrub.verified(&vm, point.0, problem);
        Ok(Response::new(pb::VerifyReply {
            point: point.0,
            disks: disks
                .into_iter()
                .map(|d| pb::VerifiedDisk { name: d.name, expected: d.expected, actual: d.actual, ok: d.ok })
                .collect(),
        }))
    }

    async fn reprotect(
        &self,
        req: Request<pb::ReprotectRequest>,
    ) -> Result<Response<pb::ReprotectReply>, Status> {
        require_admin(&req, "Reprotect")?;
        let r = req.into_inner();
        self.known_vm(&vm_arg(&r.vm)?).await?;
        Ok(Response::new(crate::failback::reprotect(&self.ctx, r).await?))
    }

    async fn failback(&self, req: Request<pb::FailbackRequest>) -> Result<Response<pb::JobStarted>, Status> {
        require_admin(&req, "Failback")?;
        let r = req.into_inner();
        let vm = vm_arg(&r.vm)?;
        self.known_vm(&vm).await?;
        let state = self.state(&vm).await?;
        if r.drill {
            if state != VmState::Reprotected {
                return Err(Status::failed_precondition(format!(
                    "VM {vm} is {state}; a failback drill needs a reprotected VM"
                )));
            }
            // Refused before a job starts, as the state is (the job checks it again).
            let (store, v) = (self.ctx.store.clone(), vm.clone());
            let during = blocking(move || store.reprotect(&v))
                .await?
                .map_err(store_status)?
                .is_some_and(|row| row.sync == tern_core::SyncMode::During);
            if during {
                return Err(Status::failed_precondition(format!(
                    "VM {vm} was reprotected with --sync during: the master target receives nothing until \
                     the failback itself, so there is nothing to rehearse (reprotect with --sync before to drill)"
                )));
            }
            let job = self.ctx.jobs.start(JobKind::FailbackDrill, &vm).await?;
            let (id, ctx) = (job.id, self.ctx.clone());
            self.ctx.tracker.spawn(async move {
                match crate::failback::drill(&ctx, vm, job.clone()).await {
                    Ok(output) => job.succeed(output).await,
                    Err(e) => job.fail(&e).await,
                }
            });
            return Ok(Response::new(pb::JobStarted { job: id }));
        }
        if state != VmState::Reprotected {
            return Err(Status::failed_precondition(format!(
                "VM {vm} is {state}; failback needs a reprotected VM"
            )));
        }
        if !self.ctx.hub.connected(&vm) {
            return Err(Status::failed_precondition(format!(
                "the agent of the recovered VM {vm} is not connected; failback shuts the VM down through it. Nothing changed"
            )));
        }
        let entered =
            crate::failback::FailingBack::enter(&self.ctx, &vm).map_err(Status::failed_precondition)?;
        let job = self.ctx.jobs.start(JobKind::Failback, &vm).await?;
        let id = job.id;
        let ctx = self.ctx.clone();
        self.ctx.tracker.spawn(async move {
            match crate::failback::failback(&ctx, vm, job.clone(), entered).await {
                Ok(output) => job.succeed(output).await,
                Err(e) => job.fail(&e).await,
            }
        });
        Ok(Response::new(pb::JobStarted { job: id }))
    }

    async fn reverse_replicate(
        &self,
        req: Request<pb::ReverseRequest>,
    ) -> Result<Response<pb::ReverseReply>, Status> {
        require_admin(&req, "ReverseReplicate")?;
        let vm = vm_arg(&req.into_inner().vm)?;
        self.known_vm(&vm).await?;
        crate::failback::reverse_replicate(&self.ctx, &vm).await?;
        Ok(Response::new(pb::ReverseReply {}))
    }

    async fn remove_vm(
        &self,
        req: Request<pb::RemoveVmRequest>,
    ) -> Result<Response<pb::RemoveVmReply>, Status> {
        require_admin(&req, "RemoveVm")?;
        let r = req.into_inner();
        let vm = vm_arg(&r.vm)?;
        self.known_vm(&vm).await?;
        Ok(Response::new(remove_vm(&self.ctx, &vm, r.delete_points).await?))
    }

    async fn cancel_reprotect(
        &self,
        req: Request<pb::CancelReprotectRequest>,
    ) -> Result<Response<pb::CancelReprotectReply>, Status> {
        require_admin(&req, "CancelReprotect")?;
        let r = req.into_inner();
        let vm = vm_arg(&r.vm)?;
        self.known_vm(&vm).await?;
        Ok(Response::new(crate::failback::cancel_reprotect(&self.ctx, &vm, r.force).await?))
    }

    async fn jobs(&self, req: Request<pb::JobsRequest>) -> Result<Response<pb::JobsReply>, Status> {
        require_admin(&req, "Jobs")?;
        let id = req.into_inner().id;
        let jobs = self.ctx.jobs.clone();
        let list = blocking(move || jobs.list(id)).await?.map_err(store_status)?;
        if id != 0 && list.is_empty() {
            return Err(Status::not_found(format!("there is no job {id}; `drctl jobs` lists them")));
        }
        Ok(Response::new(pb::JobsReply { jobs: list }))
    }
}

/// Issues an identity bundle from the deployment's CA, and records it (it is handed out
/// only once on record, so that it can be listed and revoked). Returns the bundle's PEM
/// and its certificate's serial.
pub(crate) async fn issue_bundle(ctx: &Arc<Ctx>, role: Role) -> Result<(String, String), Status> {
    let pki = ctx.data_dir.join("pki");
    let ids = ctx.identities.clone();
    let (pem, info) = blocking(move || {
        let ca = Ca {
            cert_pem: std::fs::read_to_string(pki.join("ca.pem"))?,
            key_pem: std::fs::read_to_string(pki.join("ca.key"))?,
        };
        Ok::<_, std::io::Error>(ca.issue_client(&role).and_then(|b| Ok((b.to_pem(), b.info()?))))
    })
    .await?
    .map_err(|e| Status::internal(format!("cannot read the CA: {e}")))?
    .map_err(|e| Status::internal(e.to_string()))?;
    let (serial, role) = (info.serial.clone(), info.role.clone());
    blocking(move || ids.record(info))
        .await?
        .map_err(|e| Status::internal(format!("cannot record the new identity: {e}")))?;
    info!(identity = %role, serial, "identity enrolled");
    Ok((pem, serial))
}

fn point_arg(vm: &VmName, s: &str) -> Result<PointSpec, Status> {
    PointSpec::parse(s).ok_or_else(|| {
        Status::invalid_argument(format!(
            "point {s:?} is not one of latest, latest-processed, latest-app, latest-multi-vm, \
             latest-multi-vm-app, a point id or an RFC 3339 time; \
             list points with `drctl points {vm}`"
        ))
    })
}

/// `p` resolved through symlinks as far as it exists; the rest is yet to be made.
pub(crate) fn resolved(p: &std::path::Path) -> std::path::PathBuf {
    let mut existing = p;
    let mut rest = Vec::new();
    while !existing.exists() {
        let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else { break };
        rest.push(name);
        existing = parent;
    }
    let mut r = existing.canonicalize().unwrap_or_else(|_| existing.to_path_buf());
    r.extend(rest.iter().rev());
    r
}

pub(crate) fn output_arg(s: &str, data_dir: &std::path::Path) -> Result<(), Status> {
    let path = std::path::Path::new(s);
    if s.is_empty() || !path.is_absolute() || path.components().any(|c| c == std::path::Component::ParentDir)
    {
        return Err(Status::invalid_argument(
            "--output must be an absolute directory on the process server, without `..`",
        ));
    }
    let resolve = resolved;
    if path.exists() && !path.is_dir() {
        return Err(Status::invalid_argument(format!(
            "--output {s} is a file; name a directory (it is made if missing)"
        )));
    }
    if resolve(path).starts_with(resolve(data_dir)) {
        return Err(Status::invalid_argument(format!(
            "--output {s} is inside the process server's data directory ({}), whose contents the server \
             manages (and may delete); choose a directory outside it",
            data_dir.display()
        )));
    }
    // Found now, not as a failed job: the nearest existing directory must be writable (a
    // read-only file system, the unit's sandbox, permissions).
    let mut existing = path;
    while !existing.exists() {
        match existing.parent() {
            Some(p) => existing = p,
            None => break,
        }
    }
    // A file on the way (`--output FILE/sub`) is said as such, not as a failed job's
    // "File exists" (W19-B).
    if existing != path && !existing.is_dir() {
        return Err(Status::invalid_argument(format!(
            "--output {s}: {} is a file, so no directory can be made under it; choose another directory",
            existing.display()
        )));
    }
    if let Err(e) = rustix::fs::access(existing, rustix::fs::Access::WRITE_OK) {
        // An argument to change, as the checks above: exit 2.
        return Err(Status::invalid_argument(format!(
            "--output {s}: the process server cannot write in {} ({}); choose a directory it can write \
             (under its systemd unit: /var/lib/tern-outputs, or one added with `systemctl edit process-server`, \
             [Service] ReadWritePaths=DIR)",
            existing.display(),
            std::io::Error::from(e)
        )));
    }
    Ok(())
}

pub fn policy_info(p: &Policy) -> pb::PolicyInfo {
    let u = |v: i64| u64::try_from(v).unwrap_or(0);
    pb::PolicyInfo {
        retention_ms: u(p.retention_ms),
        crash_interval_ms: u(p.crash_interval_ms),
        app_interval_ms: u(p.app_interval_ms),
        rpo_threshold_ms: u(p.rpo_threshold_ms),
        max_journal_bytes: u(p.max_journal_bytes),
    }
}

pub fn agent_policy(p: &Policy) -> pb::Policy {
    let u = |v: i64| u64::try_from(v).unwrap_or(0);
    pb::Policy {
        crash_interval_ms: u(p.crash_interval_ms),
        app_interval_ms: u(p.app_interval_ms),
        hold: false,
    }
}

/// A test failover of `vm` at `spec` into `out_dir`, inside `job` (the RPC's and a plan's).
pub(crate) async fn run_test_failover(
    ctx: &Arc<Ctx>,
    vm: VmName,
    spec: PointSpec,
    out_dir: std::path::PathBuf,
    format: Format,
    job: &crate::jobs::Job,
) -> Result<pb::JobOutput, String> {
    let (spec, why) = resolve_latest(ctx, &vm, spec, job).await;
    job.phase("writing disks").await;
    let (store, j, v, s) = (ctx.store.clone(), job.clone(), vm.clone(), spec.clone());
    let res = blocking(move || {
        store.test_failover_noted(&v, &s, &why, &out_dir, format, &mut |done, total| j.progress(done, total))
    })
    .await
    .map_err(|e| e.message().to_string())?;
    let res = res.map_err(|e| unrecoverable(ctx, &vm, &spec, e))?;
    Ok(crate::jobs::output_of(&res))
}

/// A failover's error, said; a point whose output does not match its fingerprint (stored
/// data damaged) turns the VM critical naming the point, as the scrub and verify do.
fn unrecoverable(ctx: &Ctx, vm: &VmName, spec: &PointSpec, e: tern_store::StoreError) -> String {
    if let tern_store::StoreError::FingerprintMismatch { disk, expected, actual } = &e
        && let Ok(point) = ctx.store.resolve_point(vm, spec)
    {
        let problem =
            format!("disk {disk} has fingerprint {}, the point says {}", actual.to_hex(), expected.to_hex());
        tracing::error!(vm = %vm, point = %point.id, problem = %problem, "failover: a recovery point does not recover");
        ctx.scrub.verified(vm, point.id.0, Some(problem));
        return format!(
            "{e}: point {} does not recover (its stored data is damaged); `drctl verify {vm} --point ID` finds \
             one that does",
            point.id
        );
    }
    e.to_string()
}

/// A failover of `vm` (planned: the source shut down and its final point used), inside
/// `job` (the RPC's and a plan's). The agent stands down once the disks are written.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_failover(
    ctx: &Arc<Ctx>,
    vm: VmName,
    kind: FailoverKind,
    mut spec: PointSpec,
    out_dir: std::path::PathBuf,
    format: Format,
    shutdown_source: bool,
    job: &crate::jobs::Job,
) -> Result<pb::JobOutput, String> {
    let planned = kind == FailoverKind::Planned;
    if planned || shutdown_source {
        job.phase("shutting down the source and sending its last changes").await;
        match shut_down_source(ctx, &vm, job).await {
            Ok(point) => spec = PointSpec::Id(point),
            Err(e) if planned => {
                return Err(format!(
                    "the source's final point was not made: {e}; nothing changed here, VM {vm} stays protected"
                ));
            }
            Err(e) => warn!(vm = %vm, error = %e, "source not shut down; the unplanned failover goes on"),
        }
    }
    let (spec, why) = resolve_latest(ctx, &vm, spec, job).await;
    job.phase("writing disks").await;
    let store = ctx.store.clone();
    let j = job.clone();
    let v = vm.clone();
    let s = spec.clone();
    let res = blocking(move || {
        store.failover_noted(&v, kind, &s, &why, &out_dir, format, &mut |done, total| j.progress(done, total))
    })
    .await
    .map_err(|e| e.message().to_string())?
    .map_err(|e| unrecoverable(ctx, &vm, &spec, e))?;
    ctx.hub.stand_down(&vm, "the VM failed over").await;
    info!(vm = %vm, point = res.point, kind = %kind, "failed over");
    Ok(crate::jobs::output_of(&res))
}

/// `latest`: make everything received into a point first (through the agent, if it is
/// connected); otherwise, or if that fails, everything received ([`PointSpec::Received`]:
/// the journal's end in nbd mode, else the newest point), with why (the output's note: an
/// operator who asked for `latest` must not take an older point for it).
async fn resolve_latest(
    ctx: &Arc<Ctx>,
    vm: &VmName,
    spec: PointSpec,
    job: &crate::jobs::Job,
) -> (PointSpec, String) {
    if spec != PointSpec::Latest {
        return (spec, String::new());
    }
    if !ctx.hub.connected(vm) {
        info!(vm = %vm, "agent not connected; latest is the latest processed point");
        return (
            PointSpec::Received,
            "the agent is not connected, so no new point could be made".to_string(),
        );
    }
    job.phase("making a point of everything received").await;
    let made = async {
        let rx = ctx.hub.request_checkpoint(vm, false).await.map_err(|e| e.message().to_string())?;
        match tokio::time::timeout(Duration::from_secs(300), rx).await {
            Ok(Ok(Ok(p))) => Ok(p.id),
            Ok(Ok(Err(reason))) => Err(reason),
            _ => Err("no point in time".to_string()),
        }
    }
    .await;
    match made {
        Ok(id) => (PointSpec::Id(id), String::new()),
        Err(e) => {
            warn!(vm = %vm, error = %e, "could not make a latest point; using the latest processed one");
            (PointSpec::Received, format!("a new point could not be made ({e})"))
        }
    }
}

/// Planned failover: the agent runs its shutdown hook, drains, makes the final point.
async fn shut_down_source(
    ctx: &Arc<Ctx>,
    vm: &VmName,
    job: &crate::jobs::Job,
) -> Result<tern_core::PointId, String> {
    let rx = ctx.hub.request_shutdown(vm).await.map_err(|e| e.message().to_string())?;
    // Asked: the agent may have run the shutdown hook before the final point was lost (W19-A:
    // an identity revoked meanwhile; the job said the source was not shut down, and it was).
    crate::failback::final_point(ctx, vm, rx, job).await.map(|p| p.id).map_err(|e| {
        format!(
            "{e}. The agent was asked to shut the source down and may have run its shutdown hook: check \
             the source VM; if it is off, fail over with `--kind unplanned` (its newest point), else it \
             runs on"
        )
    })
}

/// Removes a VM's copy (a disk resized, a VM retired), once nothing uses it: its agent
/// stopped, no job or test failover open, in no replication group, and in a state where
/// nothing on the way back depends on it.
async fn remove_vm(ctx: &Arc<Ctx>, vm: &VmName, delete_points: bool) -> Result<pb::RemoveVmReply, Status> {
    use tern_core::VmState;
    if ctx.hub.connected(vm) {
        return Err(Status::failed_precondition(format!(
            "VM {vm}'s agent is connected: stop it first (a removed VM's agent protects it anew when it starts)"
        )));
    }
    let (store, v) = (ctx.store.clone(), vm.clone());
    let (state, group, test, running, points) = blocking(move || -> Result<_, tern_store::StoreError> {
        Ok((
            store.vm_state(&v)?,
            store.group_of(&v)?,
            store.test_failover_row(&v)?,
            // An initial sync waits for the agent (stopped, as checked above): it ends with
            // the copy.
            store.jobs()?.into_iter().find(|j| {
                j.vm == v.as_str()
                    && j.state == tern_core::JobState::Running
                    && j.kind != tern_core::JobKind::InitialSync
            }),
            store.points(&v)?,
        ))
    })
    .await?
    .map_err(store_status)?;
    let what = match state {
        VmState::Protected | VmState::FailoverCommitted | VmState::FailbackCommitted => None,
        VmState::FailedOver => Some(format!("commit its failover first (`drctl commit {vm}`)")),
        VmState::Reprotected => {
            Some(format!("cancel its reprotect (`drctl reprotect-cancel {vm}`) or fail it back first"))
        }
        VmState::FailedBack => Some(format!("commit its failback first (`drctl commit {vm}`)")),
    };
    if let Some(what) = what {
        return Err(Status::failed_precondition(format!("VM {vm} is {state}: {what}")));
    }
    if let Some(g) = group {
        return Err(Status::failed_precondition(format!(
            "VM {vm} is in replication group {g}: `drctl group remove {g} --vm {vm}` first"
        )));
    }
    if test.is_some() {
        return Err(Status::failed_precondition(format!(
            "VM {vm} has an open test failover: `drctl test-failover-cleanup {vm}` first"
        )));
    }
    if let Some(j) = running {
        return Err(Status::failed_precondition(format!(
            "a {} of VM {vm} is running (job {}): remove it once that has ended (`drctl jobs --wait {}`)",
            j.kind, j.id, j.id
        )));
    }
    if !delete_points {
        return Err(Status::invalid_argument(format!(
            "removing VM {vm} deletes its {} recovery points and everything stored of it here; give \
             --delete-points to go on",
            points.len()
        )));
    }
    let (store, v) = (ctx.store.clone(), vm.clone());
    blocking(move || store.remove_vm(&v)).await?.map_err(store_status)?;
    ctx.initial_syncs.abandon(vm, "the VM's copy was removed before its first point").await;
    ctx.hub.forget(vm);
    ctx.scrub.forget(vm);
    let plans = crate::plan::naming(ctx, vm).await;
    if !plans.is_empty() {
        warn!(vm = %vm, plans = ?plans, "a removed VM is named by recovery plans: they cannot run until it is protected again");
    }
    Ok(pb::RemoveVmReply { points_deleted: points.len() as u64, plans })
}
