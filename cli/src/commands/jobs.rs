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

pub async fn list(d: &mut Drctl) -> Result<(), CliError> {
    let r = d.c.jobs(pb::JobsRequest { id: 0 }).await?.into_inner();
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
