//! Long operations (test failover, failover, change of point) run as jobs: a row in the
//! catalog, progress in memory while they run, the outcome (and what they made) stored
//! when they end. A job that a restart interrupted ends as failed with the reason (see
//! `Catalog::fail_interrupted_jobs`). Ended jobs are pruned as new ones start (kept 30
//! days, at most 50 of a kind per VM: `tern_store::JOBS_KEPT_MS`).

use crate::lock;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tern_core::{JobKind, JobState, VmName};
use tern_proto as pb;
use tern_store::JobRow;
use tern_store::Store;
use tracing::{info, warn};

#[derive(Debug)]
pub struct Jobs {
    store: Arc<Store>,
    /// Running jobs (and an ended one whose last row could not be written).
    live: Mutex<HashMap<u64, JobRow>>,
    /// VMs whose failover output a job is writing (see [`Jobs::claim_output`]).
    writing: Mutex<HashMap<VmName, &'static str>>,
    /// Output directories (resolved) that a running failover or test failover writes into,
    /// with whose and what (see [`Jobs::claim_dir`]).
    dirs: Mutex<Vec<(PathBuf, VmName, &'static str)>>,
}

/// Held while a failover or test failover writes into its output directory.
#[derive(Debug)]
pub struct DirClaim {
    jobs: Arc<Jobs>,
    dir: PathBuf,
}

impl Drop for DirClaim {
    fn drop(&mut self) {
        lock(&self.jobs.dirs).retain(|(d, _, _)| *d != self.dir);
    }
}

/// Held while a job writes a VM's failover output (a failover, a change of point).
#[derive(Debug)]
pub struct OutputClaim {
    jobs: Arc<Jobs>,
    vm: VmName,
}

impl Drop for OutputClaim {
    fn drop(&mut self) {
        lock(&self.jobs.writing).remove(&self.vm);
    }
}

impl Jobs {
    pub fn new(store: Arc<Store>) -> Arc<Jobs> {
        Arc::new(Jobs {
            store,
            live: Mutex::new(HashMap::new()),
            writing: Mutex::default(),
            dirs: Mutex::default(),
        })
    }

    /// One job at a time writes a VM's failover output: a second change of point started
    /// while one runs (or one while the failover writes) would write the same files (W16:
    /// two at once both failed, and the output was gone). Refused, naming the running job.
    /// `holder`: what claims it ("failover", "change of point", "commit"), said to another
    /// that finds it taken before a job of the holder is listed.
    pub fn claim_output(
        self: &Arc<Self>,
        vm: &VmName,
        holder: &'static str,
    ) -> Result<OutputClaim, tonic::Status> {
        let held = {
            let mut writing = lock(&self.writing);
            match writing.get(vm) {
                Some(h) => *h,
                None => {
                    writing.insert(vm.clone(), holder);
                    return Ok(OutputClaim { jobs: self.clone(), vm: vm.clone() });
                }
            }
        };
        let running = lock(&self.live)
            .values()
            .find(|r| writes_output(r, vm))
            .map(|r| format!(" (job {}, {}: `drctl jobs --wait {}`)", r.id, r.kind, r.id))
            // Claimed a moment before its job is listed, or by a commit (W19-A: said without one).
            .unwrap_or_else(|| format!(" (by a {held} under way: `drctl jobs` lists a job once it has one)"));
        Err(tonic::Status::failed_precondition(format!(
            "the disks of VM {vm}'s failover are being written already{running}; nothing changed: run this \
             again once that has ended"
        )))
    }

    /// Claims `dir` (an `--output`) for `what` (a failover or a test failover) of `vm`: refused
    /// when it is the output of any VM's failover (its recovered disks, committed or not) or
    /// open test failover, or one being written now, and, for a test failover, while one of
    /// `vm` is being written (W19-A: a test failover opened in the failover's own directory,
    /// and its cleanup deleted the recovered VM's disks; two at once, one failed as a job).
    pub async fn claim_dir(
        self: &Arc<Self>,
        vm: &VmName,
        what: &'static str,
        dir: &Path,
    ) -> Result<DirClaim, tonic::Status> {
        let dir = crate::admin::resolved(dir);
        let store = self.store.clone();
        let kept =
            crate::admin::blocking(move || store.outputs_in_use()).await?.map_err(crate::store_status)?;
        let mut dirs = lock(&self.dirs);
        let taken = kept
            .iter()
            .map(|(v, w, d)| (crate::admin::resolved(Path::new(d)), v.clone(), *w))
            .chain(dirs.iter().map(|(d, v, w)| (d.clone(), v.to_string(), *w)))
            .find(|(d, _, _)| *d == dir);
        if let Some((d, whose, w)) = taken {
            let remedy = if w == "test failover" {
                format!(" (`drctl test-failover-cleanup {whose}` removes it)")
            } else {
                String::new()
            };
            return Err(tonic::Status::failed_precondition(format!(
                "{} is the output directory of the {w} of VM {whose}{remedy}: writing the {what} of VM {vm} there \
                 would overwrite (or later delete) its disks; nothing changed: choose another directory",
                d.display()
            )));
        }
        if what == "test failover"
            && let Some((d, _, _)) = dirs.iter().find(|(_, v, w)| v == vm && *w == what)
        {
            return Err(tonic::Status::failed_precondition(format!(
                "a test failover of VM {vm} is being written already (into {}); nothing changed: one test \
                 failover of a VM is open at a time",
                d.display()
            )));
        }
        dirs.push((dir.clone(), vm.clone(), what));
        Ok(DirClaim { jobs: self.clone(), dir })
    }

    /// The running job of `vm` of one of `kinds`: the catalog's, less one that ended while
    /// its last row could not be written (a full file system), which the catalog still
    /// shows running.
    pub async fn running(
        &self,
        vm: &VmName,
        kinds: &'static [JobKind],
    ) -> Result<Option<JobRow>, tonic::Status> {
        let (store, v) = (self.store.clone(), vm.clone());
        let row = crate::admin::blocking(move || store.running_job(&v, kinds))
            .await?
            .map_err(crate::store_status)?;
        let live = lock(&self.live);
        Ok(row.filter(|r| live.get(&r.id).is_none_or(|l| l.state == JobState::Running)))
    }

    /// Records a new running job (in the catalog, on the blocking pool). The end of a job
    /// whose last row could not be written (a full file system) is written first.
    pub async fn start(self: &Arc<Self>, kind: JobKind, vm: &VmName) -> Result<Job, tonic::Status> {
        let now = tern_store::now_ms();
        let ended: Vec<JobRow> =
            lock(&self.live).values().filter(|r| r.state != JobState::Running).cloned().collect();
        let (store, v, jobs) = (self.store.clone(), vm.clone(), self.clone());
        let id = crate::admin::blocking(move || {
            if !matches!(kind, JobKind::InitialSync | JobKind::FailbackDrill) {
                store.room_for_recovery(&format!("a {kind} job"));
            }
            for row in ended {
                if store.update_job(&row).is_ok() {
                    lock(&jobs.live).remove(&row.id);
                }
            }
            store.insert_job(kind, &v, now)
        })
        .await?
        .map_err(crate::store_status)?;
        let row = JobRow {
            id,
            kind,
            vm: vm.to_string(),
            state: JobState::Running,
            phase: "starting".into(),
            done: 0,
            total: 0,
            error: String::new(),
            started_ms: now,
            ended_ms: 0,
            output: Vec::new(),
        };
        lock(&self.live).insert(id, row);
        info!(job = id, kind = %kind, vm = %vm, "job started");
        Ok(Job { id, jobs: self.clone() })
    }

    /// Whether a failover or change of point of `vm` is running: its output is being written.
    pub fn writing_output(&self, vm: &VmName) -> bool {
        lock(&self.live).values().any(|r| writes_output(r, vm))
    }

    /// The newest job running for `vm`, as `list` shows it (W16: status kept showing
    /// `reprotected` through a failback; only `drctl jobs` had it).
    pub fn running_of(&self, vm: &VmName) -> Option<pb::JobInfo> {
        let live = lock(&self.live);
        let row = live
            .values()
            .filter(|r| r.state == JobState::Running && r.vm == vm.as_str())
            .max_by_key(|r| r.id)?;
        Some(info(row.clone()))
    }

    /// Jobs, oldest first; `id` 0 for all.
    pub fn list(&self, id: u64) -> Result<Vec<pb::JobInfo>, tern_store::StoreError> {
        let rows = self.store.jobs()?;
        let live = lock(&self.live);
        Ok(rows
            .into_iter()
            .filter(|r| id == 0 || r.id == id)
            .map(|r| info(live.get(&r.id).cloned().unwrap_or(r)))
            .collect())
    }
}

/// A job as `drctl jobs` shows it.
fn info(row: JobRow) -> pb::JobInfo {
    // An output that does not decode (a damaged row) is left out, not an error: the job's
    // state and error still show.
    let output = (!row.output.is_empty())
        .then(|| <pb::JobOutput as prost::Message>::decode(row.output.as_slice()).ok())
        .flatten();
    pb::JobInfo {
        id: row.id,
        kind: pb::JobKind::write(row.kind),
        vm: row.vm,
        state: pb::JobState::write(row.state),
        phase: row.phase,
        done: row.done,
        total: row.total,
        error: row.error,
        started_ms: row.started_ms,
        ended_ms: row.ended_ms,
        output,
    }
}

/// A job of `vm` running that writes its failover output.
fn writes_output(r: &JobRow, vm: &VmName) -> bool {
    r.state == JobState::Running
        && r.vm == vm.as_str()
        && matches!(r.kind, JobKind::PlannedFailover | JobKind::UnplannedFailover | JobKind::ChangePoint)
}

/// What a (test) failover or change of point wrote, as a job's output.
pub fn output_of(o: &tern_store::FailoverOutput) -> pb::JobOutput {
    pb::JobOutput {
        vm: o.vm.clone(),
        point: o.point,
        time: o.time.clone(),
        time_ms: o.time_ms,
        consistency: o.consistency.clone(),
        disks: o
            .disks
            .iter()
            .map(|d| pb::OutputDisk {
                name: d.name.clone(),
                file: d.file.clone(),
                format: d.format.to_string(),
                size: d.size,
                virtual_size: d.virtual_size,
                blake3: d.blake3.clone(),
                fingerprint: d.fingerprint.clone(),
                seq: d.seq,
            })
            .collect(),
        between_points: o.between_points.map(Vec::from).unwrap_or_default(),
        note: o.note.clone(),
    }
}

/// A point as a job's output (an initial sync's first point, a failback's final one),
/// with the disks it wrote, if any.
pub fn point_output(vm: &VmName, p: &tern_store::Point, disks: Vec<pb::OutputDisk>) -> pb::JobOutput {
    pb::JobOutput {
        vm: vm.to_string(),
        point: p.id.0,
        time: tern_store::rfc3339(p.time_ms),
        time_ms: p.time_ms,
        consistency: p.consistency.as_str().to_string(),
        disks,
        ..Default::default()
    }
}

/// The handle a running job reports through.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: u64,
    jobs: Arc<Jobs>,
}

impl Job {
    fn update(&self, f: impl FnOnce(&mut JobRow)) -> Option<JobRow> {
        let mut live = lock(&self.jobs.live);
        let row = live.get_mut(&self.id)?;
        f(row);
        Some(row.clone())
    }

    /// Writes the row to the catalog on the blocking pool; awaited, so a job's rows land
    /// in the order it reports them. An ended job's row, once written, leaves memory.
    async fn persist(&self, row: Option<JobRow>) {
        let Some(row) = row else { return };
        let ended = row.state != JobState::Running;
        let store = self.jobs.store.clone();
        match crate::admin::blocking(move || store.update_job(&row)).await {
            Ok(Ok(())) if ended => {
                lock(&self.jobs.live).remove(&self.id);
            }
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(job = self.id, error = %e, "cannot record job progress"),
            Err(e) => warn!(job = self.id, error = %e.message(), "cannot record job progress"),
        }
    }

    pub async fn phase(&self, phase: &str) {
        info!(job = self.id, phase, "job phase");
        let row = self.update(|r| {
            r.phase = phase.to_string();
            r.done = 0;
            r.total = 0;
        });
        self.persist(row).await;
    }

    /// A new phase that keeps the progress made (an initial sync waiting for its agent).
    pub async fn phase_keeping_progress(&self, phase: &str) {
        info!(job = self.id, phase, "job phase");
        let row = self.update(|r| r.phase = phase.to_string());
        self.persist(row).await;
    }

    pub fn progress(&self, done: u64, total: u64) {
        self.update(|r| {
            r.done = done;
            r.total = total;
        });
    }

    pub async fn succeed(&self, output: pb::JobOutput) {
        info!(job = self.id, "job succeeded");
        let row = self.update(|r| {
            r.state = JobState::Succeeded;
            r.phase = "done".into();
            r.done = r.total;
            r.ended_ms = tern_store::now_ms();
            r.output = prost::Message::encode_to_vec(&output);
        });
        self.persist(row).await;
    }

    pub async fn fail(&self, error: &str) {
        warn!(job = self.id, error, "job failed");
        let row = self.update(|r| {
            r.state = JobState::Failed;
            r.error = error.to_string();
            r.ended_ms = tern_store::now_ms();
        });
        self.persist(row).await;
    }
}
