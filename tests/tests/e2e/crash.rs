//! Crashes: the process server killed in the middle of an ingest, the agent killed and restarted.

use crate::harness::*;
use std::time::Duration;

#[test]
fn server_killed_mid_ingest_then_agent_resumes_and_point_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("app.bundle");
    server.enroll_agent("app", &identity);
    let disk = root.join("app.img");
    // Incompressible data at a limited rate, so the kill lands in the middle of the ingest.
    make_random(&disk, 64, 40, 7);
    let mut agent = Agent::start(
        &server,
        &identity,
        "app",
        &[("sda", &disk)],
        &root.join("st"),
        &["--max-rate", "10MiB"],
    );
    deadline_poll("ingest to be under way", Duration::from_secs(60), || {
        let s = server.drctl_json(&["status"]);
        let got =
            s.as_array().and_then(|a| a.first()).and_then(|v| v["bytes_received"].as_u64()).unwrap_or(0);
        (got > 12 << 20).then_some(())
    });
    server.kill9();
    server.start();
    let point = server.checkpoint("app");
    assert!(point["disks"][0]["seq"].as_u64().unwrap() > 0);
    let want = b3(&disk, None);
    let out = root.join("after-crash");
    let res = server.drctl_json(&["test-failover", "app", "--output", out.to_str().unwrap()]);
    assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), want);
    assert_eq!(b3(&out.join("sda.raw"), None), want);
    server.drctl_json(&["test-failover-cleanup", "app"]);
    assert!(agent.log_text().contains("reconnecting"), "the agent should have noticed the crash");

    // Kill the agent and restart it: it trusts its saved state and resends almost nothing.
    let before = server.status("app")["bytes_received"].as_u64().unwrap();
    agent.kill9();
    agent.restart();
    let p = server.checkpoint("app");
    let resent = server.status("app")["bytes_received"].as_u64().unwrap() - before;
    assert!(resent < (64 << 20) / 20, "agent restart resent {resent} bytes (more than 5% of the disk)");
    let out = root.join("after-agent-restart");
    let res = server.drctl_json(&[
        "test-failover",
        "app",
        "--point",
        &p["id"].to_string(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), want);
}

#[test]
fn an_agent_that_lost_its_state_resyncs_by_delta() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("lost.bundle");
    server.enroll_agent("lost", &identity);
    let disk = root.join("lost.img");
    make_ext4(&disk, 64, 9);
    let state = root.join("st");
    let mut agent = Agent::start(&server, &identity, "lost", &[("sda", &disk)], &state, &[]);
    server.checkpoint("lost");
    agent.kill9();
    // The agent's host lost its state directory, and the VM wrote meanwhile.
    std::fs::remove_dir_all(&state).unwrap();
    let changed = scatter_writes(&disk, 0.01, 5) as u64 * 4096;
    let before = server.status("lost")["bytes_received"].as_u64().unwrap();
    agent.restart();
    let p = server.checkpoint("lost");
    let sent = server.status("lost")["bytes_received"].as_u64().unwrap() - before;
    assert!(sent <= changed * 3 / 2, "a delta resync sent {sent} bytes for {changed} changed bytes");
    assert!(agent.log_text().contains("comparing with the server's block hashes"));
    let want = b3(&disk, None);
    let out = root.join("out");
    let res = server.drctl_json(&[
        "test-failover",
        "lost",
        "--point",
        &p["id"].to_string(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), want);
}
