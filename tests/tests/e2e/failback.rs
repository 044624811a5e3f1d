//! The way back: reprotect to a master target, fail back, reverse-replicate.

use crate::harness::*;
use std::time::Duration;

fn received(server: &Server, vm: &str) -> u64 {
    server.status(vm)["bytes_received"].as_u64().unwrap()
}

#[test]
fn the_full_circle() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("circle.bundle");
    server.enroll_agent("circle", &identity);
    let onprem = root.join("onprem-sda.img");
    make_ext4(&onprem, 32, 81);
    let size = 32u64 << 20;
    let mut primary =
        Agent::start(&server, &identity, "circle", &[("sda", &onprem)], &root.join("st-primary"), &[]);
    server.wait_connected("circle");
    server.checkpoint("circle");
    scatter_writes(&onprem, 0.01, 82);
    server.checkpoint("circle");
    let at_failover = b3(&onprem, None);

    // The primary site is lost; writes after the last point never reached the recovery site.
    primary.kill9();
    scatter_writes(&onprem, 0.01, 83);
    let out = root.join("recovered");
    let res =
        server.drctl_json(&["failover", "circle", "--kind", "unplanned", "--output", out.to_str().unwrap()]);
    assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), at_failover);
    server.drctl_json(&["commit", "circle"]);

    // The recovered VM runs at the recovery site and writes.
    let recovered = out.join("sda.raw");
    scatter_writes(&recovered, 0.01, 84);

    // Reprotect to the original on-premises disk: a delta sync against it.
    let mut mt = MasterTarget::start(&server, root, "mt1");
    let rec_identity = root.join("recovered.bundle");
    let r = server.drctl_json(&[
        "reprotect",
        "circle",
        "--master-target",
        &mt.url(),
        "--location",
        "original",
        "--target-disk",
        &format!("sda={}", onprem.display()),
        "--identity-out",
        rec_identity.to_str().unwrap(),
    ]);
    assert!(r["agent_command"].as_str().unwrap().contains("mobility-agent run"));
    assert_eq!(server.status("circle")["state"], "reprotected");
    let err = server.drctl_err(&["policy", "set", "circle", "--retention", "1h"]);
    assert!(err.contains("cannot be edited"), "{err}");
    let err = server.drctl_err(&["test-failover", "circle", "--output", root.join("no").to_str().unwrap()]);
    assert!(err.contains("reverse-replicate"), "{err}");
    let before = received(&server, "circle");
    let mut rec_agent = Agent::start(
        &server,
        &rec_identity,
        "circle",
        &[("sda", &recovered)],
        &root.join("st-recovered"),
        &["--shutdown", "true"],
    );
    server.wait_connected("circle");
    server.checkpoint("circle");
    let delta = received(&server, "circle") - before;
    assert!(delta < size / 4, "the reprotect sync sent {delta} bytes of a {size}-byte disk: not a delta");

    // The master target goes down for a while; the process server keeps the stream.
    mt.kill9();
    scatter_writes(&recovered, 0.01, 85);
    server.checkpoint("circle");
    let d = &server.status("circle")["disks"][0];
    assert!(
        d["master_target_seq"].as_u64() < d["durable_seq"].as_u64(),
        "the journal holds what the MT missed: {d}"
    );
    mt.restart_same_port();
    deadline_poll("the relay to catch up", Duration::from_secs(30), || {
        let d = server.status("circle")["disks"][0].clone();
        (d["master_target_seq"] == d["durable_seq"]).then_some(())
    });
    scatter_writes(&recovered, 0.01, 86);
    let want = b3(&recovered, None);

    let res = server.drctl_json(&["failback", "circle"]);
    assert_eq!(res["disks"][0]["fingerprint"].as_str().unwrap(), fingerprint(&recovered));
    assert_eq!(b3(&onprem, None), want, "the on-premises disk equals the recovered VM's final state");
    assert_eq!(server.status("circle")["state"], "failed-back");
    let child = rec_agent.child.as_mut().unwrap();
    deadline_poll("the recovered VM's agent to stand down", Duration::from_secs(30), || {
        child.try_wait().unwrap()
    });
    server.drctl_json(&["commit", "circle"]);
    assert_eq!(server.status("circle")["state"], "failback-committed");
    assert!(!recovered.exists(), "commit removes what the failover made");

    // Reverse replication: the primary site protects the VM again, by delta.
    server.drctl_json(&["reverse-replicate", "circle"]);
    let before = received(&server, "circle");
    let _again = Agent::start(&server, &identity, "circle", &[("sda", &onprem)], &root.join("st-again"), &[]);
    server.wait_connected("circle");
    server.checkpoint("circle");
    let delta = received(&server, "circle") - before;
    assert!(delta < size / 4, "reverse replication sent {delta} bytes: not a delta");
    assert_eq!(server.status("circle")["state"], "protected");
    scatter_writes(&onprem, 0.01, 87);
    let p = server.checkpoint("circle");
    let out = root.join("final-drill");
    let res = server.drctl_json(&[
        "test-failover",
        "circle",
        "--point",
        &p["id"].to_string(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), b3(&onprem, None));
}

#[test]
fn alternate_location_with_sync_during() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("alt.bundle");
    server.enroll_agent("alt", &identity);
    let onprem = root.join("alt.img");
    make_ext4(&onprem, 32, 91);
    let mut primary = Agent::start(&server, &identity, "alt", &[("sda", &onprem)], &root.join("st"), &[]);
    server.wait_connected("alt");
    let older = server.checkpoint("alt");
    scatter_writes(&onprem, 0.02, 90);
    server.checkpoint("alt");
    primary.kill9();
    // Fail over to the older point: the journal holds records past it.
    let out = root.join("recovered");
    server.drctl_json(&[
        "failover",
        "alt",
        "--kind",
        "unplanned",
        "--point",
        &older["id"].to_string(),
        "--output",
        out.to_str().unwrap(),
    ]);
    server.drctl_json(&["commit", "alt"]);
    let recovered = out.join("sda.raw");
    scatter_writes(&recovered, 0.02, 92);
    let mt = MasterTarget::start(&server, root, "mt2");
    let new_disk = root.join("new-sda.img");
    // A wrong size is refused and nothing is written.
    let err = server.drctl_err(&[
        "reprotect",
        "alt",
        "--master-target",
        &mt.url(),
        "--location",
        "original",
        "--target-disk",
        &format!("sda={}", root.join("missing.img").display()),
        "--identity-out",
        root.join("x.bundle").to_str().unwrap(),
    ]);
    assert!(err.contains("cannot open"), "{err}");
    assert_eq!(server.status("alt")["state"], "failover-committed");
    let rec_identity = root.join("rec.bundle");
    server.drctl_json(&[
        "reprotect",
        "alt",
        "--master-target",
        &mt.url(),
        "--location",
        "alternate",
        "--sync",
        "during",
        "--target-disk",
        &format!("sda={}", new_disk.display()),
        "--identity-out",
        rec_identity.to_str().unwrap(),
    ]);
    let _rec = Agent::start(
        &server,
        &rec_identity,
        "alt",
        &[("sda", &recovered)],
        &root.join("st-rec"),
        &["--shutdown", "true"],
    );
    server.wait_connected("alt");
    scatter_writes(&recovered, 0.01, 93);
    let want = b3(&recovered, None);
    let res = server.drctl_json(&["failback", "alt"]);
    assert_eq!(res["disks"][0]["fingerprint"].as_str().unwrap(), fingerprint(&recovered));
    assert_eq!(b3(&new_disk, None), want, "the new disk is byte-identical");
}

#[test]
fn reprotect_to_a_disk_of_the_wrong_size_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("w.bundle");
    server.enroll_agent("w", &identity);
    let onprem = root.join("w.img");
    make_random(&onprem, 8, 2, 1);
    let mut primary = Agent::start(&server, &identity, "w", &[("sda", &onprem)], &root.join("st"), &[]);
    server.wait_connected("w");
    server.checkpoint("w");
    primary.kill9();
    server.drctl_json(&[
        "failover",
        "w",
        "--kind",
        "unplanned",
        "--output",
        root.join("o").to_str().unwrap(),
    ]);
    server.drctl_json(&["commit", "w"]);
    let mt = MasterTarget::start(&server, root, "mt3");
    let small = root.join("small.img");
    make_random(&small, 4, 1, 2);
    let before = b3(&small, None);
    let err = server.drctl_err(&[
        "reprotect",
        "w",
        "--master-target",
        &mt.url(),
        "--location",
        "original",
        "--target-disk",
        &format!("sda={}", small.display()),
        "--identity-out",
        root.join("x.bundle").to_str().unwrap(),
    ]);
    assert!(err.contains("4194304 bytes") && err.contains("8388608 bytes"), "{err}");
    assert_eq!(b3(&small, None), before, "nothing written");
    assert_eq!(server.status("w")["state"], "failover-committed");
}

#[test]
fn master_target_killed_during_the_failback_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("k.bundle");
    server.enroll_agent("k", &identity);
    let onprem = root.join("k.img");
    make_random(&onprem, 48, 4, 1);
    let mut primary = Agent::start(&server, &identity, "k", &[("sda", &onprem)], &root.join("st"), &[]);
    server.wait_connected("k");
    server.checkpoint("k");
    primary.kill9();
    let out = root.join("recovered");
    server.drctl_json(&["failover", "k", "--kind", "unplanned", "--output", out.to_str().unwrap()]);
    server.drctl_json(&["commit", "k"]);
    let recovered = out.join("sda.raw");
    let mut mt = MasterTarget::start(&server, root, "mtk");
    let rec_identity = root.join("rec.bundle");
    server.drctl_json(&[
        "reprotect",
        "k",
        "--master-target",
        &mt.url(),
        "--location",
        "original",
        "--target-disk",
        &format!("sda={}", onprem.display()),
        "--identity-out",
        rec_identity.to_str().unwrap(),
    ]);
    let _rec = Agent::start(
        &server,
        &rec_identity,
        "k",
        &[("sda", &recovered)],
        &root.join("st-rec"),
        &["--shutdown", "true"],
    );
    server.wait_connected("k");
    make_random(&recovered, 48, 40, 2);
    let want = b3(&recovered, None);
    // The master target will crash in the middle of the apply: after the target disk was
    // written, before its new position was recorded.
    mt.kill9();
    mt.restart_with(&[("TERN_CRASH_AT", "retention-after-base-write")]);
    let failback = std::process::Command::new(bin("drctl"))
        .args(["--server", &server.url(), "--identity"])
        .arg(server.admin())
        .args(["failback", "k", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let child = mt.child.as_mut().unwrap();
    deadline_poll("the master target to crash in the apply", Duration::from_secs(180), || {
        child.try_wait().unwrap()
    });
    assert!(mt.log_text().contains("crashing on purpose"));
    mt.child = None;
    mt.restart_same_port();
    let done = failback.wait_with_output().unwrap();
    assert!(done.status.success(), "failback: {}", String::from_utf8_lossy(&done.stderr));
    let res: serde_json::Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(res["disks"][0]["fingerprint"].as_str().unwrap(), fingerprint(&recovered));
    assert_eq!(b3(&onprem, None), want);
    assert!(
        server.log_text().contains("during the apply; retrying"),
        "the kill should have interrupted the apply: {}",
        tail(&server.log_text(), 20)
    );
}
