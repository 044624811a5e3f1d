//! Replication groups: multi-VM points are one cut across every member. A writer runs
//! cross-VM transactions (transaction n is written to A's disk, then to B's); at every
//! multi-VM point of group {A, B} the test-failover outputs must hold a consistent cut:
//! B's last transaction ≤ A's last ≤ B's last + 1. C, in no group, is left alone.

use crate::harness::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// 4 KiB slots the writer cycles through on each disk.
const SLOTS: u64 = 64;

/// The newest transaction an image holds: slot `n % SLOTS` of the disk's last `SLOTS` 4 KiB
/// holds n (8-byte little endian repeated), so it is the largest first word of any slot.
/// The slots are at the end: a scan reads them last.
fn last_transaction(image: &Path) -> u64 {
    let data = std::fs::read(image).unwrap();
    let base = data.len() - SLOTS as usize * 4096;
    (0..SLOTS as usize)
        .map(|s| u64::from_le_bytes(data[base + s * 4096..base + s * 4096 + 8].try_into().unwrap()))
        .max()
        .unwrap()
}

/// Waits for the writer's first transaction on A's disk: the writer (a process, nbdsh in
/// nbd mode) takes a while to start on a loaded machine, and a point of nothing proves
/// nothing.
fn wait_for_the_writer(root: &Path) {
    deadline_poll("the writer to start", Duration::from_secs(30), || {
        (last_transaction(&root.join("a.img")) > 0).then_some(())
    });
}

/// Test-fails `vm` over to point `id`; the output image's path (checked against its manifest).
fn output_at(server: &Server, root: &Path, vm: &str, id: &str) -> PathBuf {
    let out = root.join(format!("tfo-{vm}-{id}"));
    let res = server.drctl_json(&["test-failover", vm, "--point", id, "--output", out.to_str().unwrap()]);
    assert_eq!(res["point"].to_string(), id, "{res}");
    let file = out.join("sda.raw");
    assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), b3(&file, None), "{vm} at {id}");
    file
}

/// Takes a multi-VM point of group `shop` while the writer runs and checks the cut on both
/// members' test-failover outputs; returns A's last transaction.
fn check_group_point(server: &Server, root: &Path, app: bool) -> u64 {
    let mut args = vec!["group", "checkpoint", "shop"];
    if app {
        args.push("--app-consistent");
    }
    let r = server.drctl_json(&args);
    let id = r["point"].to_string();
    let members: Vec<&str> =
        r["members"].as_array().unwrap().iter().map(|m| m["vm"].as_str().unwrap()).collect();
    assert_eq!(members, ["a", "b"], "{r}");
    for m in r["members"].as_array().unwrap() {
        assert_eq!(m["point"]["id"].to_string(), id, "one id on every member: {r}");
        assert_eq!(m["point"]["group"], "shop", "{r}");
        if app {
            assert_eq!(m["point"]["consistency"], "app", "{r}");
        }
    }
    let (a, b) = (output_at(server, root, "a", &id), output_at(server, root, "b", &id));
    let (ta, tb) = (last_transaction(&a), last_transaction(&b));
    assert!(tb <= ta && ta <= tb + 1, "point {id}: A's last transaction {ta}, B's {tb}: not one cut");
    for vm in ["a", "b"] {
        server.drctl_json(&["test-failover-cleanup", vm]);
    }
    ta
}

/// Writes transactions to A's and B's disk files (scan mode) until `stop` exists.
fn file_writer(a: &Path, b: &Path, stop: &Path) -> Child {
    let script = format!(
        r"
import os, time
a, b = os.open({a:?}, os.O_WRONLY), os.open({b:?}, os.O_WRONLY)
base_a, base_b = [os.fstat(f).st_size - {SLOTS} * 4096 for f in (a, b)]
n = 0
while not os.path.exists({stop:?}):
    n += 1
    rec = n.to_bytes(8, 'little') * 512
    os.pwrite(a, rec, base_a + (n % {SLOTS}) * 4096)
    os.pwrite(b, rec, base_b + (n % {SLOTS}) * 4096)
    time.sleep(0.0005)
",
        a = a.display().to_string(),
        b = b.display().to_string(),
        stop = stop.display().to_string(),
    );
    Command::new("python3").args(["-c", &script]).spawn().unwrap()
}

/// A writer process, stopped and reaped however the test ends (a frozen one is resumed first).
struct Writer(Child);

impl Writer {
    fn finish(mut self, stop: &Path) {
        std::fs::write(stop, b"").unwrap();
        let _ = Command::new("kill").args(["-CONT", &self.0.id().to_string()]).status();
        assert!(self.0.wait().unwrap().success());
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0.id().to_string()]).status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn zero_disk(path: &Path) {
    std::fs::write(path, vec![0u8; 4 << 20]).unwrap();
}

/// A member's agent, started and its first point made.
fn start_member(server: &Server, root: &Path, vm: &str, extra: &[&str]) -> Agent {
    let identity = root.join(format!("{vm}.bundle"));
    server.enroll_agent(vm, &identity);
    let disk = root.join(format!("{vm}.img"));
    let agent =
        Agent::start(server, &identity, vm, &[("sda", &disk)], &root.join(format!("{vm}-state")), extra);
    server.checkpoint(vm);
    agent
}

#[test]
fn scan_mode_multi_vm_points_are_one_cut_across_the_group_with_freeze_hooks() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (server, metrics) = Server::with_http(root, "--metrics", "127.0.0.1");
    // B's disk is larger: its frozen pass reaches the slots long after A's pass is done, so
    // a member that thawed before the others had their cut would show.
    zero_disk(&root.join("a.img"));
    make_random(&root.join("b.img"), 48, 40, 2);
    zero_disk(&root.join("c.img"));
    let stop = root.join("stop");
    let writer = Writer(file_writer(&root.join("a.img"), &root.join("b.img"), &stop));
    // The freeze hook stops the writer, the thaw lets it go on: a quiesced application.
    let (freeze, thaw) = (format!("kill -STOP {}", writer.0.id()), format!("kill -CONT {}", writer.0.id()));
    let hooks = ["--freeze", freeze.as_str(), "--thaw", thaw.as_str()];
    let _a = start_member(&server, root, "a", &hooks);
    let mut b = start_member(&server, root, "b", &hooks);
    let _c = start_member(&server, root, "c", &[]);
    server.drctl_json(&["group", "create", "shop", "--vm", "a", "--vm", "b"]);

    wait_for_the_writer(root);
    let mut last = 0;
    for i in 0..3 {
        let ta = check_group_point(&server, root, i == 2);
        assert!(ta > last, "the writer went on between points ({last} then {ta})");
        last = ta;
        std::thread::sleep(Duration::from_millis(200));
    }
    // latest-multi-vm is the group's newest common point; C, in no group, gets its own latest.
    let points = server.drctl_json(&["points", "a"]);
    let newest_multi =
        points.as_array().unwrap().iter().rev().find(|p| p["group"] == "shop").unwrap()["id"].clone();
    let out = root.join("tfo-latest");
    let r = server.drctl_json(&[
        "test-failover",
        "a",
        "--point",
        "latest-multi-vm",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r["point"], newest_multi);
    server.drctl_json(&["test-failover-cleanup", "a"]);
    let c_latest = server.drctl_json(&["points", "c"]).as_array().unwrap().last().unwrap()["id"].clone();
    let out = root.join("tfo-c");
    let r = server.drctl_json(&[
        "test-failover",
        "c",
        "--point",
        "latest-multi-vm",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r["point"], c_latest);
    server.drctl_json(&["test-failover-cleanup", "c"]);
    let shown = server.drctl_json(&["group", "show", "shop"]);
    assert_eq!(
        (shown["latest_multi_vm_point"].clone(), shown["health"].as_str()),
        (newest_multi.clone(), Some("normal"))
    );

    // In scan mode a member without a freeze hook cannot hold a cut: no multi-VM point.
    server.drctl_json(&["group", "create", "loose", "--vm", "c"]);
    let err = server.drctl_err(&["group", "checkpoint", "loose"]);
    assert!(err.contains("no --freeze or --freeze-fs"), "{err}");
    assert!(server.drctl_json(&["points", "c"]).as_array().unwrap().iter().all(|p| p["group"].is_null()));
    server.drctl_json(&["group", "remove", "loose"]);
    // What is not there is not found (exit 5): the group, a VM, a member.
    for args in [
        &["group", "remove", "loose"][..],
        &["group", "add", "shop", "--vm", "nosuch"],
        &["group", "remove", "shop", "--vm", "c"],
    ] {
        let out = server.drctl(args);
        assert_eq!(out.status.code(), Some(5), "{args:?}: {out:?}");
    }

    // A member away: the group's point fails with the reason, and no member gets one.
    b.kill9();
    deadline_poll("B to be seen away", Duration::from_secs(30), || {
        (server.status("b")["agent_connected"] == false).then_some(())
    });
    let before = server.drctl_json(&["points", "a"]).as_array().unwrap().len();
    let err = server.drctl_err(&["group", "checkpoint", "shop"]);
    assert!(err.contains("VM b is away"), "{err}");
    assert_eq!(server.drctl_json(&["points", "a"]).as_array().unwrap().len(), before, "no partial point");
    // Away: a warning at once, critical once away longer than its RPO threshold (as a VM).
    let shown = server.drctl_json(&["group", "show", "shop"]);
    let health = (shown["health"].as_str(), shown["away"][0].as_str());
    assert_eq!(health, (Some("warning"), Some("b")), "{shown}");
    server.drctl_json(&["policy", "set", "b", "--rpo-threshold", "1s"]);
    deadline_poll("the group to turn critical", Duration::from_secs(10), || {
        (server.drctl_json(&["group", "show", "shop"])["health"] == "critical").then_some(())
    });
    let check = server.drctl(&["status", "--check"]);
    assert_eq!(check.status.code(), Some(2), "{}", String::from_utf8_lossy(&check.stderr));
    // And to Prometheus, which alerts on it (TernGroupCritical).
    deadline_poll("the group's health in the metrics", Duration::from_secs(10), || {
        http_get(metrics, "/metrics").contains("tern_group_health{group=\"shop\"} 2").then_some(())
    });
    let text = String::from_utf8(server.drctl(&["status"]).stdout).unwrap();
    assert!(text.contains("shop") && text.contains("away (agent not connected): b"), "{text}");
    // The member that failed it leaves: its failure goes with it.
    server.drctl_json(&["group", "remove", "shop", "--vm", "b"]);
    let shown = server.drctl_json(&["group", "show", "shop"]);
    assert!(shown["error"].is_null() || shown["error"] == "", "{shown}");
    // Back in, it fails the group's point again; then it fails over: the group is paused,
    // and the failure from before says nothing of it (nor of it whole again).
    server.drctl_json(&["group", "add", "shop", "--vm", "b"]);
    let err = server.drctl_err(&["group", "checkpoint", "shop"]);
    assert!(err.contains("VM b is away"), "{err}");
    let fo = root.join("fo-b");
    server.drctl_json(&["failover", "b", "--kind", "unplanned", "--output", fo.to_str().unwrap()]);
    let shown = server.drctl_json(&["group", "show", "shop"]);
    assert!(shown["paused"].as_str().is_some_and(|p| !p.is_empty()), "{shown}");
    assert_eq!(shown["health"], "normal", "{shown}");
    assert!(shown["error"].is_null() || shown["error"] == "", "{shown}");

    writer.finish(&stop);
}

/// nbd mode: the agents hold new writes for the barrier (milliseconds), no hook needed.
#[test]
fn nbd_mode_multi_vm_points_hold_writes_for_milliseconds_and_are_one_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let mut agents = Vec::new();
    let mut uris = Vec::new();
    for vm in ["a", "b"] {
        zero_disk(&root.join(format!("{vm}.img")));
        let socket = root.join(format!("{vm}.sock"));
        let listen = format!("unix:{}", socket.display());
        let (freeze, thaw) = logging_hooks(&root.join(format!("{vm}-hooks.log")));
        let args = ["--mode", "nbd", "--nbd-listen", &listen, "--freeze", &freeze, "--thaw", &thaw];
        agents.push(start_member(&server, root, vm, &args));
        uris.push(format!("nbd+unix:///sda?socket={}", socket.display()));
    }
    server.drctl_json(&["group", "create", "shop", "--vm", "a", "--vm", "b"]);
    let stop = root.join("stop");
    // Each pwrite returns once the agent acked it: B's write of n follows A's ack of n.
    let script = format!(
        r"
import os, nbd, time
h2 = nbd.NBD()
h2.connect_uri({b:?})
n = 0
while not os.path.exists({stop:?}):
    n += 1
    rec = n.to_bytes(8, 'little') * 512
    h.pwrite(rec, h.get_size() - (n % {SLOTS} + 1) * 4096)
    h2.pwrite(rec, h2.get_size() - (n % {SLOTS} + 1) * 4096)
    time.sleep(0.0005)
",
        b = uris[1],
        stop = stop.display().to_string()
    );
    let writer = Writer(
        Command::new("nbdsh")
            .env("PATH", "/usr/bin:/bin")
            .args(["-u", &uris[0], "-c", &script])
            .spawn()
            .unwrap(),
    );
    wait_for_the_writer(root);
    let mut last = 0;
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        // The last one app-consistent: frozen before the mark, thawed after the release.
        let ta = check_group_point(&server, root, i == 2);
        assert!(ta > last, "the writer went on between points ({last} then {ta})");
        last = ta;
    }
    // The group's own interval takes multi-VM points unasked.
    let asked = server.drctl_json(&["group", "show", "shop"])["latest_multi_vm_point"].as_u64().unwrap();
    server.drctl_json(&["group", "policy", "shop", "--crash-interval", "1s"]);
    deadline_poll("a scheduled multi-VM point", Duration::from_secs(20), || {
        let g = server.drctl_json(&["group", "show", "shop"]);
        (g["latest_multi_vm_point"].as_u64().unwrap() > asked + 1).then_some(())
    });
    server.drctl_json(&["group", "policy", "shop", "--crash-interval", "0"]);
    let points = server.drctl_json(&["points", "b"]);
    let p = points.as_array().unwrap().iter().rev().find(|p| p["group"] == "shop").unwrap();
    let note = p["note"].as_str().unwrap();
    let held: u64 = note.split("writes held ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(held < 5000, "writes held {held} ms for the barrier: {note}");
    writer.finish(&stop);
    for vm in ["a", "b"] {
        let hooks = std::fs::read_to_string(root.join(format!("{vm}-hooks.log"))).unwrap();
        assert_eq!(hooks.lines().collect::<Vec<_>>(), ["freeze", "thaw"], "{vm}: one freeze and its thaw");
    }
    for a in &agents {
        assert!(!a.log_text().contains("ERROR"), "{}", tail(&a.log_text(), 20));
    }
}

/// After a restart of the process server, members whose agents have not reconnected yet
/// are away from that moment: the group warns, and turns critical only once they have been
/// away longer than their RPO threshold, as each VM does (it was critical at once).
#[test]
fn after_a_server_restart_a_group_waits_for_its_agents_before_it_turns_critical() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let mut a = protect_vm(&server, root, "a", 8, 2, &[]);
    let mut b = protect_vm(&server, root, "b", 8, 2, &[]);
    server.drctl_json(&["group", "create", "pair", "--vm", "a", "--vm", "b"]);
    a.kill9();
    b.kill9();
    server.kill9();
    server.start();
    let shown = server.drctl_json(&["group", "show", "pair"]);
    assert_eq!(shown["health"], "warning", "{shown}");
    let check = server.drctl(&["status", "--check"]);
    assert_eq!(check.status.code(), Some(1), "{}", String::from_utf8_lossy(&check.stderr));
    // Away longer than the threshold: critical, the VM as its group.
    server.drctl_json(&["policy", "set", "a", "--rpo-threshold", "1s"]);
    deadline_poll("the group to turn critical", Duration::from_secs(10), || {
        (server.drctl_json(&["group", "show", "pair"])["health"] == "critical").then_some(())
    });
    assert_eq!(server.status("a")["health"], "critical");
}
