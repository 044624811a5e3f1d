//! Jobs: list them, or follow one to its end.

use crate::Drctl;
use crate::error::CliError;
use crate::output::{job_json, job_kind, job_state, print_json, rfc3339, wait_job};
use serde_json::Value;
use tern_proto as pb;

pub async fn wait(d: &mut Drctl, id: u64) -> Result<(), CliError> {
    let job = wait_job(&mut d.c, id, d.json).await?;
    if d.json {
        return print_json(&job_json(&job));
    }
    out!("job {} ({} of {}) succeeded", job.id, job_kind(&job), job.vm);
    Ok(())
}

/// Which jobs `drctl jobs` lists: all, or those of a VM, a state, a kind.
#[derive(Debug, Default)]
pub struct Filter {
    pub vm: Option<String>,
    pub state: Option<tern_core::JobState>,
    pub kind: Option<tern_core::JobKind>,
}

impl Filter {
    fn takes(&self, j: &pb::JobInfo) -> bool {
        self.vm.as_ref().is_none_or(|vm| *vm == j.vm)
            && self.state.is_none_or(|s| pb::JobState::read(j.state) == Some(s))
            && self.kind.is_none_or(|k| pb::JobKind::read(j.kind) == Some(k))
    }
}

pub async fn list(d: &mut Drctl, filter: &Filter) -> Result<(), CliError> {
    let mut r = d.c.jobs(pb::JobsRequest { id: 0 }).await?.into_inner();
    r.jobs.retain(|j| filter.takes(j));
    if d.json {
        return print_json(&Value::Array(r.jobs.iter().map(job_json).collect()));
    }
    out!("{:>5}  {:<20} {:<16} {:<10} {:>6}  {:<30} STARTED", "ID", "KIND", "VM", "STATE", "DONE", "PHASE");
    for j in &r.jobs {
        out!(
            "{:>5}  {:<20} {:<16} {:<10} {:>6}  {:<30} {}",
            j.id,
            job_kind(j),
            j.vm,
            job_state(j),
            done_text(j),
            j.phase,
            rfc3339(j.started_ms)
        );
        if !j.error.is_empty() {
            out!("       error: {}", j.error);
        }
    }
    Ok(())
}

/// How far a job has come, as a percentage of its total (`-` while it has none; a job that
/// succeeded has come all the way, whatever its last phase measured).
fn done_text(j: &pb::JobInfo) -> String {
    if pb::JobState::read(j.state) == Some(tern_core::JobState::Succeeded) {
        return "100.0%".into();
    }
    if j.total == 0 {
        return "-".into();
    }
    #[allow(clippy::cast_precision_loss)]
    let pct = j.done.min(j.total) as f64 * 100.0 / j.total as f64;
    format!("{pct:.1}%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_takes_the_jobs_of_its_vm_state_and_kind() {
        let job = |vm: &str, state, kind| pb::JobInfo {
            vm: vm.into(),
            state: pb::JobState::write(state),
            kind: pb::JobKind::write(kind),
            ..Default::default()
        };
        use tern_core::{JobKind as K, JobState as S};
        let a = job("web", S::Running, K::InitialSync);
        let b = job("db", S::Failed, K::TestFailover);
        assert!(Filter::default().takes(&a) && Filter::default().takes(&b));
        let web = Filter { vm: Some("web".into()), ..Filter::default() };
        assert!(web.takes(&a) && !web.takes(&b));
        let failed = Filter { state: Some(S::Failed), ..Filter::default() };
        assert!(!failed.takes(&a) && failed.takes(&b));
        let both = Filter { vm: Some("db".into()), kind: Some(K::InitialSync), ..Filter::default() };
        assert!(!both.takes(&a) && !both.takes(&b));
        assert!("no-such".parse::<S>().unwrap_err().to_string().contains("running"));
    }

    #[test]
    fn a_job_shows_how_far_it_has_come() {
        let job = |done, total| pb::JobInfo { done, total, ..Default::default() };
        assert_eq!(done_text(&job(0, 0)), "-");
        assert_eq!(done_text(&job(1, 4)), "25.0%");
        assert_eq!(done_text(&job(1_073_745_920, 4_398_046_511_104)), "0.0%");
        assert_eq!(done_text(&job(5, 4)), "100.0%");
        let succeeded =
            pb::JobInfo { state: pb::JobState::write(tern_core::JobState::Succeeded), ..job(0, 0) };
        assert_eq!(done_text(&succeeded), "100.0%");
    }
}
