//! The admin API that `drctl` calls. Admin identities only.

use crate::auth::require_admin;
use crate::{Ctx, store_status};
use std::sync::Arc;
use std::time::Duration;
use tern_core::pki::{Ca, Role};
use tern_core::{DiskName, VmName};
use tern_proto as pb;
use tern_store::{Consistency, Format, Point, PointSpec};
use tonic::{Request, Response, Status};
use tracing::info;

/// RPO threshold until policies exist: above it health is warning, above twice it critical.
const RPO_THRESHOLD_SECS: i64 = 15 * 60;
const DEFAULT_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct AdminService {
    pub ctx: Arc<Ctx>,
}

fn vm_arg(s: &str) -> Result<VmName, Status> {
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
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(e.to_string()))
}

impl AdminService {
    async fn known_vm(&self, vm: &VmName) -> Result<(), Status> {
        let store = self.ctx.store.clone();
        let v = vm.clone();
        let known = blocking(move || store.catalog().has_vm(&v)).await?.map_err(store_status)?;
        if known {
            Ok(())
        } else {
            Err(Status::not_found(format!(
                "VM {vm} is not protected here; start its agent with `mobility-agent run --vm {vm} ...`"
            )))
        }
    }

    async fn vm_status(&self, vm: VmName) -> Result<pb::VmStatus, Status> {
        let store = self.ctx.store.clone();
        let v = vm.clone();
        let points = blocking(move || store.points(&v)).await?.map_err(store_status)?;
        let connected = self.ctx.hub.connected(&vm);
        let last = points.last();
        let rpo = last.map_or(-1, |p| ((tern_store::now_ms() - p.time_ms) / 1000).max(0));
        let absent = self.ctx.hub.disconnected_for(&vm).map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX));
        let health = if rpo > 2 * RPO_THRESHOLD_SECS || absent > RPO_THRESHOLD_SECS {
            "critical"
        } else if rpo > RPO_THRESHOLD_SECS {
            "warning"
        } else {
            "normal"
        };
        let disks = self
            .ctx
            .store
            .vm_disks(&vm)
            .iter()
            .map(|h| {
                let j = h.journal();
                pb::DiskStatus {
                    name: h.name.to_string(),
                    size: h.size,
                    durable_seq: j.durable().0,
                    journal_bytes: j.bytes(),
                }
            })
            .collect();
        Ok(pb::VmStatus {
            vm: vm.to_string(),
            state: if points.is_empty() { "initial-sync" } else { "protected" }.to_string(),
            health: health.to_string(),
            agent_connected: connected,
            last_point: last.map_or(0, |p| p.id.0),
            last_point_time_ms: last.map_or(0, |p| p.time_ms),
            rpo_seconds: rpo,
            bytes_received: self.ctx.hub.bytes_received(&vm),
            disks,
        })
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn enroll(&self, req: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollReply>, Status> {
        require_admin(&req, "Enroll")?;
        let r = req.into_inner();
        let role = match pb::Role::try_from(r.role) {
            Ok(pb::Role::Agent) => Role::Agent(vm_arg(&r.name)?),
            Ok(pb::Role::MasterTarget) => Role::MasterTarget(
                DiskName::new(&r.name).map_err(|e| Status::invalid_argument(e.to_string()))?.to_string(),
            ),
            Ok(pb::Role::Admin) => Role::Admin,
            _ => return Err(Status::invalid_argument("role must be agent, master-target or admin")),
        };
        let pki = self.ctx.data_dir.join("pki");
        let bundle = blocking(move || {
            let ca = Ca {
                cert_pem: std::fs::read_to_string(pki.join("ca.pem"))?,
                key_pem: std::fs::read_to_string(pki.join("ca.key"))?,
            };
            Ok::<_, std::io::Error>(ca.issue_client(&role).map(|b| (b.to_pem(), role)))
        })
        .await?
        .map_err(|e| Status::internal(format!("cannot read the CA: {e}")))?
        .map_err(|e| Status::internal(e.to_string()))?;
        info!(identity = %bundle.1, "identity enrolled");
        Ok(Response::new(pb::EnrollReply { bundle: bundle.0 }))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        require_admin(&req, "Status")?;
        let r = req.into_inner();
        let vms = if r.vm.is_empty() {
            let store = self.ctx.store.clone();
            blocking(move || store.vms()).await?.map_err(store_status)?
        } else {
            let vm = vm_arg(&r.vm)?;
            self.known_vm(&vm).await?;
            vec![vm]
        };
        let mut out = Vec::new();
        for vm in vms {
            out.push(self.vm_status(vm).await?);
        }
        Ok(Response::new(pb::StatusReply { vms: out }))
    }

    async fn points(&self, req: Request<pb::PointsRequest>) -> Result<Response<pb::PointsReply>, Status> {
        require_admin(&req, "Points")?;
        let vm = vm_arg(&req.into_inner().vm)?;
        self.known_vm(&vm).await?;
        let store = self.ctx.store.clone();
        let points = blocking(move || store.points(&vm)).await?.map_err(store_status)?;
        Ok(Response::new(pb::PointsReply { points: points.iter().map(point_info).collect() }))
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
            Ok(Ok(Err(reason))) => Err(Status::failed_precondition(format!("no point was made: {reason}"))),
            Ok(Err(_)) => {
                Err(Status::unavailable("the agent went away before the point was made; try again"))
            }
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no point within {}s; the agent may still be sending the changes (see `drctl status {vm}`)",
                limit.as_secs()
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
        let spec = PointSpec::parse(&r.point).ok_or_else(|| {
            Status::invalid_argument(format!(
                "point {:?} is neither a point id nor latest-processed; list points with `drctl points {vm}`",
                r.point
            ))
        })?;
        if r.output.is_empty() || !std::path::Path::new(&r.output).is_absolute() {
            return Err(Status::invalid_argument(
                "--output must be an absolute directory on the process server",
            ));
        }
        let format = if r.format == pb::OutputFormat::Vhd as i32 { Format::Vhd } else { Format::Raw };
        let store = self.ctx.store.clone();
        let out_dir = std::path::PathBuf::from(&r.output);
        let v = vm.clone();
        info!(vm = %vm, point = %r.point, output = %r.output, "test failover started");
        let res = blocking(move || store.test_failover(&v, &spec, &out_dir, format, &mut |_, _| {}))
            .await?
            .map_err(store_status)?;
        info!(vm = %vm, point = res.point, "test failover done");
        Ok(Response::new(pb::TestFailoverReply {
            point: res.point,
            time_ms: res.time_ms,
            output: r.output,
            disks: res
                .disks
                .into_iter()
                .map(|d| pb::OutputDisk {
                    name: d.name,
                    file: d.file,
                    size: d.size,
                    blake3: d.blake3,
                    fingerprint: d.fingerprint,
                })
                .collect(),
        }))
    }

    async fn test_failover_cleanup(
        &self,
        req: Request<pb::CleanupRequest>,
    ) -> Result<Response<pb::CleanupReply>, Status> {
        require_admin(&req, "TestFailoverCleanup")?;
        let vm = vm_arg(&req.into_inner().vm)?;
        self.known_vm(&vm).await?;
        let store = self.ctx.store.clone();
        let v = vm.clone();
        let removed = blocking(move || store.test_failover_cleanup(&v)).await?.map_err(store_status)?;
        info!(vm = %vm, files = removed.len(), "test failover cleaned up");
        Ok(Response::new(pb::CleanupReply { removed }))
    }
}
