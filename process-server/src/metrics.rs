//! The process server's Prometheus metrics (served with `serve --metrics ADDR`, see
//! `tern_proto::metrics`): every few seconds the status `drctl status` shows becomes
//! gauges per VM and disk, and the jobs of this process's life their progress. Counters
//! of refused batches and ended sessions are counted where they happen (`replication.rs`).

use crate::Ctx;
use std::sync::Arc;
use std::time::Duration;
use tern_core::{Health, JobState, VmState};
use tern_proto as pb;

const EVERY: Duration = Duration::from_secs(2);

/// Keeps the gauges current until the server stops.
pub async fn metrics_worker(ctx: Arc<Ctx>) {
    describe();
    let admin = crate::admin::AdminService { ctx: ctx.clone() };
    loop {
        collect(&ctx, &admin).await;
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_gauge!("tern_vm_rpo_seconds", Unit::Seconds, "Age of the VM's latest recovery point.");
    describe_gauge!("tern_vm_rpo_threshold_seconds", Unit::Seconds, "The VM's RPO threshold (policy).");
    describe_gauge!("tern_vm_last_point_timestamp_seconds", Unit::Seconds, "Time of the latest point.");
    describe_gauge!("tern_vm_health", "0 normal, 1 warning, 2 critical.");
    describe_gauge!("tern_vm_state", "1 for the VM's lifecycle state, 0 for the others.");
    describe_gauge!("tern_vm_initial_sync", "1 while the VM has no point yet.");
    describe_gauge!("tern_vm_agent_connected", "1 while the VM's agent is connected.");
    describe_gauge!("tern_vm_failing", "1 while replication of the VM is failing (see drctl status).");
    describe_counter!("tern_vm_received_bytes_total", Unit::Bytes, "Bytes received from the VM's agent.");
    describe_gauge!("tern_vm_storage_bytes", Unit::Bytes, "Bytes the VM's base images and journals hold.");
    describe_gauge!("tern_disk_durable_seq", "Last record of the disk made durable (acked).");
    describe_gauge!("tern_disk_journal_bytes", Unit::Bytes, "Bytes in the disk's journal.");
    describe_gauge!("tern_disk_relay_lag_records", "Records durable here, not yet at the master target.");
    describe_gauge!(
        "tern_disk_backlog_bytes",
        Unit::Bytes,
        "nbd mode: bytes of writes the agent has logged and not sent yet (its last report)."
    );
    describe_gauge!(
        "tern_disk_hot_bytes",
        Unit::Bytes,
        "nbd mode: bytes of extents a restart of the agent would compare."
    );
    describe_gauge!(
        "tern_disk_pass_offset_bytes",
        Unit::Bytes,
        "How far the agent's running pass (nbd mode: its resync) has read the disk (0 when none runs)."
    );
    describe_gauge!(
        "tern_group_rpo_seconds",
        Unit::Seconds,
        "Age of the replication group's newest multi-VM point."
    );
    describe_gauge!("tern_group_health", "A replication group's health: 0 normal, 1 warning, 2 critical.");
    describe_gauge!("tern_job_progress_ratio", "A running job's progress, 0 to 1.");
    describe_gauge!("tern_jobs_running", "Jobs running.");
    describe_counter!("tern_replication_errors_total", "Sessions ended or batches refused, by gRPC code.");
    describe_gauge!(
        "tern_data_dir_free_bytes",
        Unit::Bytes,
        "Free space of the data directory's file system."
    );
    describe_gauge!(
        "tern_certificate_expiry_timestamp_seconds",
        Unit::Seconds,
        "When the process server's own certificate (pki/server.pem) expires."
    );
    describe_gauge!(
        "tern_space_reserve_held",
        "1 while the space reserve is set aside (or none is configured: nothing to give up); 0 while it is given up (the data directory filled)."
    );
}

async fn collect(ctx: &Arc<Ctx>, admin: &crate::admin::AdminService) {
    if let Ok(free) = tern_store::reserve::free_bytes(&ctx.data_dir) {
        metrics::gauge!("tern_data_dir_free_bytes").set(free as f64);
    }
    metrics::gauge!("tern_space_reserve_held").set(if ctx.store.reserve().held() { 1.0 } else { 0.0 });
    if let Some(expires) = crate::tls::expires_ms() {
        metrics::gauge!("tern_certificate_expiry_timestamp_seconds").set(expires as f64 / 1000.0);
    }
    let store = ctx.store.clone();
    let Ok(Ok(vms)) = tokio::task::spawn_blocking(move || store.vms()).await else { return };
    for vm in vms {
        let (store, v) = (ctx.store.clone(), vm.clone());
        let sync = tokio::task::spawn_blocking(move || store.reprotect(&v))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        // A --sync during VM's records wait for its failback on purpose: no lag to alert on.
        let held = sync.is_some_and(|r| crate::relay::held(ctx, &vm, r.sync));
        let Ok(s) = admin.vm_status(vm).await else { continue };
        vm_gauges(&s, held);
    }
    // A group's multi-VM points can fail while each member is normal.
    if let Ok(groups) = crate::groups::groups(ctx, "").await {
        for g in groups {
            if g.latest_point != 0 {
                metrics::gauge!("tern_group_rpo_seconds", "group" => g.name.clone())
                    .set(g.rpo_seconds as f64);
            }
            let health = pb::Health::read(g.health).unwrap_or(Health::Critical);
            metrics::gauge!("tern_group_health", "group" => g.name).set(f64::from(health as u8));
        }
    }
    let jobs = ctx.jobs.clone();
    if let Ok(Ok(jobs)) = tokio::task::spawn_blocking(move || jobs.list(0)).await {
        // Running jobs only: an ended job's series is no longer refreshed and expires.
        let running: Vec<_> =
            jobs.iter().filter(|j| pb::JobState::read(j.state) == Some(JobState::Running)).collect();
        for j in &running {
            let ratio = if j.total == 0 { 0.0 } else { j.done as f64 / j.total as f64 };
            let kind = pb::JobKind::read(j.kind).map_or("unknown", |k| k.as_str());
            metrics::gauge!("tern_job_progress_ratio", "job" => j.id.to_string(), "kind" => kind, "vm" => j.vm.clone())
                .set(ratio);
        }
        metrics::gauge!("tern_jobs_running").set(running.len() as f64);
    }
}

fn vm_gauges(s: &pb::VmStatus, relay_held: bool) {
    let vm = s.vm.clone();
    let g = |name: &'static str, v: f64| metrics::gauge!(name, "vm" => vm.clone()).set(v);
    if s.last_point != 0 {
        g("tern_vm_rpo_seconds", s.rpo_seconds as f64);
        g("tern_vm_last_point_timestamp_seconds", s.last_point_time_ms as f64 / 1000.0);
    }
    if let Some(p) = &s.policy {
        g("tern_vm_rpo_threshold_seconds", p.rpo_threshold_ms as f64 / 1000.0);
    }
    let health = pb::Health::read(s.health).unwrap_or(Health::Critical);
    g("tern_vm_health", f64::from(health as u8));
    g("tern_vm_initial_sync", f64::from(u8::from(s.initial_sync)));
    g("tern_vm_agent_connected", f64::from(u8::from(s.agent_connected)));
    g("tern_vm_failing", f64::from(u8::from(!s.error.is_empty())));
    g("tern_vm_storage_bytes", s.storage_bytes as f64);
    metrics::counter!("tern_vm_received_bytes_total", "vm" => vm.clone()).absolute(s.bytes_received);
    // The error series exist from the start at 0, so that `increase()` sees the first one.
    for code in ["resource_exhausted", "data_loss", "unavailable", "invalid_argument", "internal"] {
        metrics::counter!("tern_replication_errors_total", "vm" => vm.clone(), "code" => code).increment(0);
    }
    let state = pb::VmState::read(s.state);
    for st in VmState::ALL {
        let v = f64::from(u8::from(state == Some(*st)));
        metrics::gauge!("tern_vm_state", "vm" => vm.clone(), "state" => st.as_str()).set(v);
    }
    for d in &s.disks {
        let l = [("vm", vm.clone()), ("disk", d.name.clone())];
        metrics::gauge!("tern_disk_durable_seq", &l).set(d.durable_seq as f64);
        metrics::gauge!("tern_disk_journal_bytes", &l).set(d.journal_bytes as f64);
        metrics::gauge!("tern_disk_pass_offset_bytes", &l).set(d.pass_offset as f64);
        if !d.tracking.is_empty() && d.tracking != "scan" {
            metrics::gauge!("tern_disk_backlog_bytes", &l).set(d.backlog_bytes as f64);
            metrics::gauge!("tern_disk_hot_bytes", &l).set(d.hot_bytes as f64);
        }
        if state.is_some_and(|s| crate::relay::RELAY_STATES.contains(&s)) {
            let lag = if relay_held { 0 } else { d.durable_seq.saturating_sub(d.master_target_seq) };
            metrics::gauge!("tern_disk_relay_lag_records", &l).set(lag as f64);
        }
    }
}
