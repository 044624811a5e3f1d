//! The daemons in one process, on `127.0.0.1:0`: the process server's `run` and the
//! agent's `run`, stopped through their shutdown tokens. No binaries, no kill -9 — the
//! end-to-end suite (tests/) covers those; this covers the daemon skeleton: start-up,
//! replication to a point, a test failover read back byte for byte, and a clean stop that
//! leaves a data directory the next start opens.

#![allow(clippy::unwrap_used)]
use std::time::Duration;
use tern_core::pki::{Bundle, Role};
use tern_core::{DiskName, VmName};
use tern_proto as pb;
use tokio_util::sync::CancellationToken;

async fn admin(url: &str, bundle: &Bundle) -> pb::admin_client::AdminClient<tonic::transport::Channel> {
    pb::admin_client::AdminClient::new(pb::connect(url, bundle).await.expect("admin connects"))
}

async fn server(data: &std::path::Path) -> (String, CancellationToken, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let config = tern_process_server::Config {
        data_dir: data.to_path_buf(),
        segment_bytes: None,
        space_reserve: 0,
        retention_every: Duration::from_secs(3600),
        scrub: tern_process_server::scrub::ScrubConfig { every: Duration::ZERO, rate: 0 },
        relay_max_rate: 0,
        stream_window: tern_proto::STREAM_WINDOW,
        metrics: false,
        web: None,
    };
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task =
        tokio::spawn(async move { tern_process_server::run(config, listener, s).await.expect("serves") });
    (url, stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_daemons_replicate_fail_over_and_stop_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ps");
    tern_process_server::init(&data, &[]).unwrap();
    let admin_bundle = Bundle::load(&data.join("pki").join("admin.bundle")).unwrap();
    let (url, stop, task) = server(&data).await;
    let mut a = admin(&url, &admin_bundle).await;
    assert_eq!(admin_bundle.role().unwrap(), Role::Admin);

    let enrolled = a
        .enroll(pb::EnrollRequest { role: pb::Role::Agent as i32, name: "web".into() })
        .await
        .expect("enroll")
        .into_inner();
    let disk = dir.path().join("web.img");
    let mut bytes = vec![0u8; 6 << 20];
    blake3::Hasher::new().update(b"in-process").finalize_xof().fill(&mut bytes[1 << 20..3 << 20]);
    std::fs::write(&disk, &bytes).unwrap();
    let agent_stop = CancellationToken::new();
    let config = tern_agent::Config {
        server: url.clone(),
        identity: Bundle::parse(&enrolled.bundle, "enrolled").unwrap(),
        vm: VmName::new("web").unwrap(),
        disks: vec![tern_agent::scan::DiskSource {
            name: DiskName::new("sda").unwrap(),
            path: disk.clone(),
            size: bytes.len() as u64,
            block_device: false,
        }],
        state_dir: dir.path().join("agent"),
        interval: Duration::from_secs(1),
        hooks: Default::default(),
        shutdown: None,
        max_rate: 0,
        nbd: None,
        save_every: Duration::from_secs(5),
    };
    let s = agent_stop.clone();
    let agent = tokio::spawn(async move { tern_agent::run(config, s).await });

    // The first point: the agent's initial sync ends in one.
    let point = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Ok(r) = a.points(pb::PointsRequest { vm: "web".into(), limit: 0 }).await
                && let Some(p) = r.into_inner().points.pop()
            {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a first point within a minute");

    let out = dir.path().join("out");
    let started = a
        .test_failover(pb::TestFailoverRequest {
            vm: "web".into(),
            point: point.id.to_string(),
            output: out.display().to_string(),
            format: pb::OutputFormat::Raw as i32,
        })
        .await
        .expect("test failover starts")
        .into_inner();
    let job = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let jobs = a.jobs(pb::JobsRequest { id: started.job }).await.unwrap().into_inner().jobs;
            if let Some(j) = jobs.into_iter().find(|j| j.state != pb::JobState::Running as i32) {
                return j;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the test failover ends within a minute");
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{}", job.error);
    let written = &job.output.expect("a finished test failover names its output").disks[0];
    let copy = std::fs::read(&written.file).unwrap();
    assert_eq!(blake3::hash(&copy), blake3::hash(&bytes), "the test failover is the disk, byte for byte");
    assert_eq!(written.blake3, blake3::hash(&bytes).to_hex().to_string());

    // A clean stop: both daemons return, and the data directory opens again with its point.
    agent_stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), agent).await.expect("the agent stops").unwrap().unwrap();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), task).await.expect("the server stops").unwrap();
    let reopened = tern_store::Store::open(&data).expect("the stopped server released its data directory");
    let points = reopened.points(&VmName::new("web").unwrap()).unwrap();
    assert!(points.iter().any(|p| p.id.0 == point.id), "point {} is still listed after the stop", point.id);
}
