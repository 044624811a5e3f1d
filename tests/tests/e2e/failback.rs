//! The way back: reprotect to a master target, fail back, reverse-replicate.

use crate::harness::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn received(server: &Server, vm: &str) -> u64 {
    server.status(vm)["bytes_received"].as_u64().unwrap()
}

/// Protects `disk` as the only disk of `vm` and makes a first point.
fn protect(server: &Server, root: &Path, vm: &str, disk: &Path) -> (Agent, PathBuf, serde_json::Value) {
    let identity = root.join(format!("{vm}.bundle"));
    server.enroll_agent(vm, &identity);
    let agent = Agent::start(server, &identity, vm, &[("sda", disk)], &root.join(format!("st-{vm}")), &[]);
    server.wait_connected(vm);
    let point = server.checkpoint(vm);
    (agent, identity, point)
}

/// Unplanned failover of `vm` (to `point`, or the latest) into `root/recovered`, then commit.
/// Returns the recovered disk.
fn fail_over_and_commit(server: &Server, root: &Path, vm: &str, point: Option<&str>) -> PathBuf {
    let out = root.join("recovered");
    let mut args = vec!["failover", vm, "--kind", "unplanned", "--output", out.to_str().unwrap()];
    if let Some(p) = point {
        args.extend(["--point", p]);
    }
    server.drctl_json(&args);
    server.drctl_json(&["commit", vm]);
    out.join("sda.raw")
}

/// `drctl reprotect` of disk sda; returns the arguments.
fn reprotect_args(
    vm: &str,
    mt: &MasterTarget,
    location: &str,
    sync: &str,
    target: &Path,
    identity: &Path,
) -> Vec<String> {
    [
        "reprotect",
        vm,
        "--master-target",
        &mt.url(),
        "--location",
        location,
        "--sync",
        sync,
        "--target-disk",
        &format!("sda={}", target.display()),
        "--identity-out",
        identity.to_str().unwrap(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The recovered VM's agent, whose shutdown hook always succeeds.
fn recovered_agent(server: &Server, root: &Path, vm: &str, identity: &Path, disk: &Path) -> Agent {
    recovered_agent_with(server, root, vm, identity, disk, &[])
}

/// [`recovered_agent`] with more arguments (a rate limit, so that a kill lands in a pass).
fn recovered_agent_with(
    server: &Server,
    root: &Path,
    vm: &str,
    identity: &Path,
    disk: &Path,
    extra: &[&str],
) -> Agent {
    let args: Vec<&str> = ["--shutdown", "true"].iter().chain(extra).copied().collect();
    let agent =
        Agent::start(server, identity, vm, &[("sda", disk)], &root.join(format!("st-{vm}-back")), &args);
    server.wait_connected(vm);
    agent
}

#[test]
fn the_full_circle() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let onprem = root.join("onprem-sda.img");
    make_ext4(&onprem, 32, 81);
    let size = 32u64 << 20;
    let (mut primary, identity, _) = protect(&server, root, "circle", &onprem);
    // The VM's own policy, which the way back keeps for reverse replication.
    server.drctl_json(&["policy", "set", "circle", "--rpo-threshold", "1m", "--crash-interval", "20s"]);
    let own_policy = server.status("circle")["policy"].clone();
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
    let r = server.drctl_json(&strs(&reprotect_args(
        "circle",
        &mt,
        "original",
        "before",
        &onprem,
        &rec_identity,
    )));
    let command = r["agent_command"].as_str().unwrap();
    assert!(command.contains("mobility-agent run"), "{command}");
    let recovered_arg = format!("--disk sda={}", out.join("sda.raw").display());
    assert!(command.contains(&recovered_arg), "the failover's file for sda: {command}");
    assert_eq!(server.status("circle")["state"], "reprotected");
    let err = server.drctl_err(&["policy", "set", "circle", "--retention", "1h"]);
    assert!(err.contains("cannot be edited"), "{err}");
    let err = server.drctl_err(&["test-failover", "circle", "--output", root.join("no").to_str().unwrap()]);
    assert!(err.contains("reverse-replicate"), "{err}");
    // The primary site comes back and its old agent starts (systemd restarts it): it must
    // not pass for the recovered VM, or the failback would write the old disk back.
    primary.restart();
    let status = primary.wait_exit("the primary's old agent to be refused");
    assert_eq!(status.code(), Some(3), "{}", primary.log_text());
    assert!(primary.log_text().contains("only the recovered VM's agent"), "{}", primary.log_text());
    let before = received(&server, "circle");
    let mut rec_agent = recovered_agent(&server, root, "circle", &rec_identity, &recovered);
    server.checkpoint("circle");
    let delta = received(&server, "circle") - before;
    assert!(delta < size / 4, "the reprotect sync sent {delta} bytes of a {size}-byte disk: not a delta");

    // The master target goes down for a while; the process server keeps the stream.
    mt.kill9();
    scatter_writes(&recovered, 0.01, 85);
    server.checkpoint("circle");
    let d = &server.status("circle")["disks"][0];
    assert!(
        d["master_target_seq"].as_u64().unwrap() < d["durable_seq"].as_u64().unwrap(),
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
    // The master target down at the commit: said, with what to do (W16: "Connection refused
    // (os error 111)" alone), and the commit goes through once it is back.
    mt.kill9();
    let err = server.drctl_err(&["commit", "circle"]);
    assert!(
        err.contains("cannot reach the master target at") && err.contains("drctl commit circle"),
        "{err}"
    );
    assert_eq!(server.status("circle")["state"], "failed-back");
    mt.restart_same_port();
    server.drctl_json(&["commit", "circle"]);
    assert_eq!(server.status("circle")["state"], "failback-committed");
    assert!(!recovered.exists(), "commit removes what the failover made");
    // The recovered VM's identity is retired with it.
    let rec_serial = tern_core::pki::Bundle::load(&rec_identity).unwrap().info().unwrap().serial;
    let ids = server.drctl_json(&["identities"]);
    let row = ids.as_array().unwrap().iter().find(|i| i["serial"] == rec_serial.as_str()).unwrap();
    assert!(!row["revoked"].is_null(), "{ids}");

    // Reverse replication: the primary site protects the VM again, by delta.
    server.drctl_json(&["reverse-replicate", "circle"]);
    assert_eq!(server.status("circle")["policy"], own_policy, "the VM's policy is back");
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
    // The relay to the master target under a cap, and the log as JSON lines.
    server.extra = vec!["--relay-max-rate".into(), "16MiB".into()];
    server.env = vec![("TERN_LOG_FORMAT".into(), "json".into())];
    server.start();
    let onprem = root.join("alt.img");
    make_ext4(&onprem, 32, 91);
    let (mut primary, _, older) = protect(&server, root, "alt", &onprem);
    scatter_writes(&onprem, 0.02, 90);
    server.checkpoint("alt");
    primary.kill9();
    // Fail over to the older point: the journal holds records past it.
    let recovered = fail_over_and_commit(&server, root, "alt", Some(&older["id"].to_string()));
    scatter_writes(&recovered, 0.02, 92);
    let mut mt = MasterTarget::start(&server, root, "mt2");
    // Again with its metrics served, on the same port.
    mt.kill9();
    let mt_metrics = free_port();
    mt.extra = vec!["--metrics".into(), format!("127.0.0.1:{mt_metrics}")];
    mt.restart();
    let new_disk = root.join("new-sda.img");
    // A wrong size is refused and nothing is written.
    let args =
        reprotect_args("alt", &mt, "original", "before", &root.join("missing.img"), &root.join("x.bundle"));
    let err = server.drctl_err(&strs(&args));
    assert!(err.contains("cannot open"), "{err}");
    assert_eq!(server.status("alt")["state"], "failover-committed");
    let rec_identity = root.join("rec.bundle");
    server.drctl_json(&strs(&reprotect_args("alt", &mt, "alternate", "during", &new_disk, &rec_identity)));
    let _rec = recovered_agent(&server, root, "alt", &rec_identity, &recovered);
    // Nothing reaches the master target before the failback: a drill is refused up front.
    let jobs = server.drctl_json(&["jobs"]).as_array().unwrap().len();
    let out = server.drctl(&["failback", "alt", "--drill"]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to rehearse"), "{out:?}");
    assert_eq!(server.drctl_json(&["jobs"]).as_array().unwrap().len(), jobs, "no job started");
    scatter_writes(&recovered, 0.01, 93);
    let want = b3(&recovered, None);
    let res = server.drctl_json(&["failback", "alt"]);
    assert_eq!(res["disks"][0]["fingerprint"].as_str().unwrap(), fingerprint(&recovered));
    assert_eq!(b3(&new_disk, None), want, "the new disk is byte-identical");
    let log = server.log_text();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }
    assert!(log.contains("relaying to the master target"), "{}", tail(&log, 10));
    // The master target's own figures: what it received and made durable of the relay.
    assert!(http_get(mt_metrics, "/healthz").ends_with("ok\n"));
    let m = http_get(mt_metrics, "/metrics");
    let sample = |prefix: &str| {
        m.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit_once(' '))
            .map(|(_, v)| v.parse::<f64>().unwrap())
    };
    assert!(sample("tern_mt_received_bytes_total{vm=\"alt\"}").is_some_and(|b| b > 0.0), "{m}");
    assert!(sample("tern_mt_durable_seq{").is_some_and(|s| s > 0.0), "{m}");
    // The primary runs on the new disk now. Its old agent, started again unchanged on the
    // old disk (which the failback did not write), is refused: it would replace the
    // protected copy with the old disk.
    server.drctl_json(&["commit", "alt"]);
    server.drctl_json(&["reverse-replicate", "alt"]);
    primary.restart();
    assert_eq!(primary.wait_exit("the stale agent to be refused").code(), Some(3));
    assert!(
        primary.log_text().contains("failed back to another location"),
        "{}",
        tail(&primary.log_text(), 10)
    );
    // On the disk the failback wrote (same identity, same state directory) it protects the VM.
    let identity = root.join("alt.bundle");
    let _back = Agent::start(&server, &identity, "alt", &[("sda", &new_disk)], &root.join("st-alt"), &[]);
    server.wait_connected("alt");
    let p = server.checkpoint("alt");
    let out = root.join("after-reverse");
    let res = server.drctl_json(&[
        "test-failover",
        "alt",
        "--point",
        &p["id"].to_string(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), b3(&new_disk, None));
    // The new agent gone (a restart, a reboot's order), the old one is still refused: the
    // new agent did not lift the fence.
    drop(_back);
    primary.restart();
    assert_eq!(primary.wait_exit("the stale agent to be refused again").code(), Some(3));
}

#[test]
fn reprotect_to_a_disk_of_the_wrong_size_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let onprem = root.join("w.img");
    make_random(&onprem, 8, 2, 1);
    let (mut primary, _, _) = protect(&server, root, "w", &onprem);
    primary.kill9();
    fail_over_and_commit(&server, root, "w", None);
    let mt = MasterTarget::start(&server, root, "mt3");
    let small = root.join("small.img");
    make_random(&small, 4, 1, 2);
    let before = b3(&small, None);
    let err = server.drctl_err(&strs(&reprotect_args(
        "w",
        &mt,
        "original",
        "before",
        &small,
        &root.join("x.bundle"),
    )));
    assert!(err.contains("4194304 bytes") && err.contains("8388608 bytes"), "{err}");
    assert_eq!(b3(&small, None), before, "nothing written");
    assert_eq!(server.status("w")["state"], "failover-committed");
}

/// One file is the target of one disk: a second VM's reprotect onto a file already
/// prepared on the master target (by its path, or another path to it) is refused before
/// anything is written, as is an alternate location in a directory that does not exist
/// (naming it, leaving nothing behind).
#[test]
fn a_target_disk_already_taken_or_in_a_missing_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let (w_disk, v_disk) = (root.join("w.img"), root.join("v.img"));
    make_random(&w_disk, 8, 2, 1);
    make_random(&v_disk, 8, 2, 2);
    let (mut w, _, _) = protect(&server, root, "w", &w_disk);
    let (mut v, _, _) = protect(&server, root, "v", &v_disk);
    w.kill9();
    v.kill9();
    fail_over_and_commit(&server, root, "w", None);
    let out_v = root.join("recovered-v");
    server.drctl_json(&["failover", "v", "--kind", "unplanned", "--output", out_v.to_str().unwrap()]);
    server.drctl_json(&["commit", "v"]);
    let mt = MasterTarget::start(&server, root, "mt-taken");
    server.drctl_json(&strs(&reprotect_args(
        "w",
        &mt,
        "original",
        "before",
        &w_disk,
        &root.join("w-back.bundle"),
    )));
    let before = b3(&w_disk, None);
    std::fs::create_dir(root.join("sub")).unwrap();
    for other_path in [w_disk.clone(), root.join("sub").join("..").join("w.img")] {
        let err = server.drctl_err(&strs(&reprotect_args(
            "v",
            &mt,
            "original",
            "before",
            &other_path,
            &root.join("v-back.bundle"),
        )));
        assert!(err.contains("already the target of VM w disk sda"), "{err}");
    }
    let nowhere = root.join("no-such-dir").join("v.img");
    let err = server.drctl_err(&strs(&reprotect_args(
        "v",
        &mt,
        "alternate",
        "before",
        &nowhere,
        &root.join("v-back.bundle"),
    )));
    assert!(err.contains("does not exist") && err.contains("no-such-dir"), "{err}");
    // The process server's own address for the master target's: said, not an empty error.
    let url = server.url();
    let target = format!("sda={}", v_disk.display());
    let bundle = root.join("v-back.bundle");
    let err = server.drctl_err(&[
        "reprotect",
        "v",
        "--master-target",
        &url,
        "--location",
        "original",
        "--target-disk",
        &target,
        "--identity-out",
        bundle.to_str().unwrap(),
    ]);
    assert!(err.contains("does not answer as a master target"), "{err}");
    assert_eq!(b3(&w_disk, None), before, "nothing written");
    assert_eq!(server.status("v")["state"], "failover-committed");
    // Its own file is taken as it should be.
    server.drctl_json(&strs(&reprotect_args(
        "v",
        &mt,
        "original",
        "before",
        &v_disk,
        &root.join("v-back.bundle"),
    )));
    assert_eq!(server.status("v")["state"], "reprotected");
}

/// The way back up to the reprotect: `vm`'s on-premises disk (`mib` MiB holding
/// `data_mib` MiB of random data from `seed`) protected, failed over unplanned and
/// committed, a master target `mt` started, and the VM reprotected onto the on-premises disk
/// with `--sync sync`. The recovered VM's agent is not started.
struct Reprotected {
    onprem: PathBuf,
    recovered: PathBuf,
    mt: MasterTarget,
    identity: PathBuf,
}

fn reprotected(
    server: &Server,
    root: &Path,
    vm: &str,
    (mib, data_mib, seed): (u64, u64, u64),
    sync: &str,
) -> Reprotected {
    let onprem = root.join(format!("{vm}.img"));
    make_random(&onprem, mib, data_mib, seed);
    let (mut primary, _, _) = protect(server, root, vm, &onprem);
    primary.kill9();
    let recovered = fail_over_and_commit(server, root, vm, None);
    let mt = MasterTarget::start(server, root, &format!("mt-{vm}"));
    let identity = root.join("rec.bundle");
    server.drctl_json(&strs(&reprotect_args(vm, &mt, "original", sync, &onprem, &identity)));
    Reprotected { onprem, recovered, mt, identity }
}

/// Starts `drctl failback VM --json` without waiting for it.
fn spawn_failback(server: &Server, vm: &str) -> std::process::Child {
    std::process::Command::new(bin("drctl"))
        .args(["--server", &server.url(), "--identity"])
        .arg(server.admin())
        .args(["failback", vm, "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until a failback has asked the recovered VM's agent for its final pass.
fn wait_for_the_final_pass(server: &Server) {
    deadline_poll("the failback's final pass", Duration::from_secs(60), || {
        let log = server.log_text();
        (log.contains("shutting down the recovered VM and sending its last changes")
            || log.contains("shutting down the recovered VM, then the full download"))
        .then_some(())
    });
}

/// Fails `vm` back while the master target aborts at fail point `crash_at` (it is
/// restarted with it armed first), restarts it once it has crashed, and returns what
/// `drctl failback --json` printed once the failback completed.
fn fail_back_through_a_master_target_crash(
    server: &Server,
    mt: &mut MasterTarget,
    vm: &str,
    crash_at: &str,
) -> serde_json::Value {
    mt.kill9();
    mt.restart_with(&[("TERN_CRASH_AT", crash_at)]);
    let failback = spawn_failback(server, vm);
    let child = mt.child.as_mut().unwrap();
    deadline_poll(&format!("the master target to crash at {crash_at}"), Duration::from_secs(180), || {
        child.try_wait().unwrap()
    });
    assert!(mt.log_text().contains("crashing on purpose"));
    mt.child = None;
    mt.restart_same_port();
    let done = failback.wait_with_output().unwrap();
    assert!(done.status.success(), "failback: {}", String::from_utf8_lossy(&done.stderr));
    serde_json::from_slice(&done.stdout).unwrap()
}

#[test]
fn master_target_killed_during_the_failback_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let Reprotected { onprem, recovered, mut mt, identity: rec_identity } =
        reprotected(&server, root, "k", (48, 4, 1), "before");
    let _rec = recovered_agent(&server, root, "k", &rec_identity, &recovered);
    write_random(&recovered, 40, 2);
    let want = b3(&recovered, None);
    // The master target will crash in the middle of the apply: after the target disk was
    // written, before its new position was recorded.
    let res = fail_back_through_a_master_target_crash(&server, &mut mt, "k", "retention-after-base-write");
    assert_eq!(res["disks"][0]["fingerprint"].as_str().unwrap(), fingerprint(&recovered));
    assert_eq!(b3(&onprem, None), want);
    assert!(
        server.log_text().contains("during the apply; retrying"),
        "the kill should have interrupted the apply: {}",
        tail(&server.log_text(), 20)
    );
}

/// With --sync during the target disk stays as it is until the failback: what the recovered
/// VM's agent sends before it (a checkpoint's pass here; every write in nbd mode) waits in
/// the process server's journal, and the failback's full download then makes the target
/// disk the recovered one.
#[test]
fn with_sync_during_the_target_disk_is_untouched_until_the_failback() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let Reprotected { onprem, recovered, mt: _mt, identity } =
        reprotected(&server, root, "d", (32, 8, 9), "during");
    let untouched = b3(&onprem, None);
    // What the master target holds once the relay has its Welcome: the failed-over base.
    let held = deadline_poll("the relay to reach the master target", Duration::from_secs(30), || {
        let seq = server.status("d")["disks"][0]["master_target_seq"].as_u64().unwrap_or(0);
        (seq > 0).then_some(seq)
    });
    make_random(&recovered, 32, 16, 10);
    let _rec = recovered_agent(&server, root, "d", &identity, &recovered);
    server.checkpoint("d");
    scatter_writes(&recovered, 0.01, 11);
    server.checkpoint("d");
    // The relay would have sent within moments (it looks every 100 ms).
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let d = &server.status("d")["disks"][0];
        assert_eq!(d["master_target_seq"], held, "relayed before the failback: {d}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(b3(&onprem, None), untouched, "the target disk was written before the failback");
    let want = b3(&recovered, None);
    let res = server.drctl_json(&["failback", "d"]);
    assert_eq!(res["disks"][0]["fingerprint"].as_str().unwrap(), fingerprint(&recovered));
    assert_eq!(b3(&onprem, None), want);
}

#[test]
fn master_target_killed_during_a_full_download_onto_the_original_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let Reprotected { onprem, recovered, mut mt, identity: rec_identity } =
        reprotected(&server, root, "w", (48, 40, 5), "during");
    // A drill of a plan naming it is refused before its first group: with --sync during
    // the master target holds nothing to rehearse from until the failback itself.
    let plan = root.join("wp.toml");
    let toml = format!(
        "name = \"wp\"\n[[group]]\nvms = [\"w\"]\n[vm.w]\nmaster_target = \"{}\"\nlocation = \"original\"\n\
         target_disks = [\"sda={}\"]\n",
        mt.url(),
        onprem.display()
    );
    std::fs::write(&plan, toml).unwrap();
    server.drctl_json(&["plan", "apply", plan.to_str().unwrap()]);
    let err = server.drctl_err(&["plan", "failback", "wp", "--drill"]);
    assert!(err.contains("--sync during") && err.contains("--sync before to drill"), "{err}");
    server.drctl_json(&["plan", "remove", "wp"]);
    // The recovered disk diverges: other data, and zeroes from 30 MiB on where the
    // on-premises disk still holds data (the full download must zero it there).
    make_random(&recovered, 48, 30, 6);
    let _rec = recovered_agent(&server, root, "w", &rec_identity, &recovered);
    let want = b3(&recovered, None);
    // The master target will crash after writing relayed records onto the target disk,
    // before recording how far it got.
    let res =
        fail_back_through_a_master_target_crash(&server, &mut mt, "w", "write-through-after-base-write");
    assert_eq!(res["disks"][0]["fingerprint"].as_str().unwrap(), fingerprint(&recovered));
    assert_eq!(b3(&onprem, None), want, "the on-premises disk is byte-identical to the recovered one");
    assert!(mt.log_text().contains("write-through"), "{}", tail(&mt.log_text(), 20));
}

/// The process server killed -9 twice on the way back: while it relays the reprotect's
/// stream to the master target, and just after a failback started. Each time it restarts,
/// the agent reconnects and the relay resumes from what the master target holds; the
/// interrupted failback is reported as failed, and running it again completes it with the
/// on-premises disk byte-identical to the recovered one.
#[test]
fn process_server_killed_during_reprotect_and_failback() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let Reprotected { onprem, recovered, mt: _mt, identity: rec_identity } =
        reprotected(&server, root, "p", (48, 8, 11), "before");
    // 8 MiB/s on the wire: 24 MiB of changes take a few seconds, and the kills land in them.
    let _rec = recovered_agent_with(&server, root, "p", &rec_identity, &recovered, &["--max-rate", "8MiB"]);
    server.checkpoint("p");
    // 24 MiB of new data: the kill lands once records of it have come in.
    let before = server.status("p")["disks"][0]["journal_bytes"].as_u64().unwrap();
    write_random(&recovered, 24, 12);
    // A pass now (the failback policy's interval is long); its point is cut short by the kill.
    let mut pass = std::process::Command::new(bin("drctl"))
        .args(["--server", &server.url(), "--identity"])
        .arg(server.admin())
        .args(["checkpoint", "p", "--wait"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    deadline_poll("new records to come in", Duration::from_secs(60), || {
        (server.status("p")["disks"][0]["journal_bytes"].as_u64().unwrap() > before + (4 << 20)).then_some(())
    });
    server.kill9();
    let _ = pass.wait();
    server.start();
    server.wait_connected("p");
    server.checkpoint("p");
    deadline_poll("the relay to catch up after the restart", Duration::from_secs(60), || {
        let d = server.status("p")["disks"][0].clone();
        (d["master_target_seq"] == d["durable_seq"]).then_some(())
    });
    // Enough new data that the failback's final pass takes a while.
    write_random(&recovered, 24, 13);
    let want = b3(&recovered, None);

    // A failback cut short by the process server's death.
    let failback = spawn_failback(&server, "p");
    wait_for_the_final_pass(&server);
    server.kill9();
    let cut = failback.wait_with_output().unwrap();
    assert!(
        !cut.status.success(),
        "the failback cannot have finished: {}",
        String::from_utf8_lossy(&cut.stdout)
    );
    server.start();
    let s = server.status("p");
    assert_eq!(s["state"], "reprotected", "a cut failback changes nothing");
    // But the recovered VM may be off: said, critical, until the failback is run again (W16:
    // status said normal).
    assert_eq!(s["health"], "critical", "{s}");
    let why = s["error"].as_str().unwrap();
    assert!(why.contains("was cut short") && why.contains("run `drctl failback p` again"), "{s}");
    // The agent reconnects on its own (a failback without it is refused, nothing changed).
    server.wait_connected("p");
    let res = server.drctl_json(&["failback", "p"]);
    assert_eq!(res["disks"][0]["fingerprint"].as_str().unwrap(), fingerprint(&recovered));
    assert_eq!(server.status("p")["state"], "failed-back");
    assert_eq!(b3(&onprem, None), want, "the on-premises disk equals the recovered VM's final state");
}

/// The recovered VM's agent killed -9 in the failback's final pass: the failback fails and
/// says nothing changed; with the agent started again, running it again completes it
/// byte-identical (the shutdown hook runs a second time, on a VM that is already off).
#[test]
fn recovered_agent_killed_during_the_failback_final_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let Reprotected { onprem, recovered, mt: _mt, identity: rec_identity } =
        reprotected(&server, root, "a", (48, 8, 21), "before");
    // 8 MiB/s on the wire: the final pass's 24 MiB take a few seconds, and the kill lands in it.
    let mut rec =
        recovered_agent_with(&server, root, "a", &rec_identity, &recovered, &["--max-rate", "8MiB"]);
    server.checkpoint("a");
    write_random(&recovered, 24, 22);
    let want = b3(&recovered, None);
    let onprem_before = b3(&onprem, None);
    let failback = spawn_failback(&server, "a");
    // The agent's word, not the server's phase: the phase is logged before the request goes
    // out, and a kill between the two would find no agent to ask.
    deadline_poll("the agent's final pass", Duration::from_secs(60), || {
        rec.log_text().contains("the final pass sends what the VM wrote last").then_some(())
    });
    // One failback at a time: a second would shut the VM down again and apply another
    // final point onto the same disk.
    let err = server.drctl_err(&["failback", "a"]);
    assert!(err.contains("running already"), "{err}");
    // Status shows the failback running, its phase and how far (W16: only `drctl jobs` did).
    let s = server.status("a");
    assert_eq!(s["job"]["kind"], "failback", "{s}");
    let text = String::from_utf8_lossy(&server.drctl(&["status", "a"]).stdout).to_string();
    assert!(text.contains("(failback) running: shutting down the recovered VM"), "{text}");
    rec.kill9();
    let done = failback.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(
        !done.status.success()
            && err.contains("cut short")
            && err.contains("the target disks are unchanged")
            && err.contains("run `drctl failback a` again"),
        "failback: {err}\nagent log tail:\n{}\nserver log tail:\n{}",
        tail(&rec.log_text(), 40),
        tail(&server.log_text(), 40)
    );
    assert_eq!(server.status("a")["state"], "reprotected");
    assert_eq!(b3(&onprem, None), onprem_before, "with --sync before a cut final pass writes nothing there");
    rec.restart();
    server.wait_connected("a");
    let res = server.drctl_json(&["failback", "a"]);
    assert_eq!(res["disks"][0]["fingerprint"].as_str().unwrap(), fingerprint(&recovered));
    assert_eq!(b3(&onprem, None), want);
}

/// The recovered VM's agent loses its state while the master target is down and the process
/// server spools records it has not relayed; some pages then go back to what the master
/// target still holds. When the agent comes back, the hashes it compares with must describe
/// the master target's disk with the spool relayed (else those pages would count as equal
/// and never be resent); the failback gives a byte-identical disk.
#[test]
fn an_agent_that_lost_its_state_while_the_master_target_was_behind() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let Reprotected { onprem, recovered, mut mt, identity: rec_identity } =
        reprotected(&server, root, "b", (32, 8, 31), "before");
    let mut rec = recovered_agent(&server, root, "b", &rec_identity, &recovered);
    server.checkpoint("b");
    // What the master target holds of the first 2 MiB.
    let mut held = vec![0u8; 2 << 20];
    std::fs::File::open(&recovered).unwrap().read_exact_at(&mut held, 0).unwrap();

    mt.kill9();
    write_random(&recovered, 8, 32);
    server.checkpoint("b");
    let d = &server.status("b")["disks"][0];
    assert!(
        d["master_target_seq"].as_u64().unwrap() < d["durable_seq"].as_u64().unwrap(),
        "the spool holds what the MT missed: {d}"
    );
    // The VM writes the first 2 MiB back as they were; the agent's host loses its state.
    std::fs::OpenOptions::new().write(true).open(&recovered).unwrap().write_all_at(&held, 0).unwrap();
    rec.kill9();
    std::fs::remove_dir_all(root.join("st-b-back")).unwrap();
    mt.restart_same_port();
    rec.restart();
    server.wait_connected("b");
    server.checkpoint("b");
    assert!(rec.log_text().contains("comparing with the server's block hashes"));
    let want = b3(&recovered, None);
    let res = server.drctl_json(&["failback", "b"]);
    assert_eq!(res["disks"][0]["fingerprint"].as_str().unwrap(), fingerprint(&recovered));
    assert_eq!(b3(&onprem, None), want, "the on-premises disk equals the recovered VM's final state");
}

/// Reprotect to the original disk when that disk is a block device whose file system was
/// written after the device was first read: the device's page cache still holds the old
/// blocks (the file system wrote through another loop device over the same image, as a
/// file system's writes bypass a device's page cache), so only direct reads see what the
/// device holds. The delta sync must send what differs from the device's real content and
/// the failback must leave it byte-identical to the recovered disk.
#[test]
fn reprotect_onto_a_block_device_written_after_it_was_read() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let onprem = root.join("bdev.img");
    make_ext4(&onprem, 32, 121);
    let (mut primary, _, _) = protect(&server, root, "bdev", &onprem);
    primary.kill9();
    let recovered = fail_over_and_commit(&server, root, "bdev", None);
    scatter_writes(&recovered, 0.01, 122);

    let device = LoopDevice::attach(&onprem);
    // Someone holds the device open and has read it through its page cache (a backup, a
    // monitoring agent); the cache lives as long as the device is open.
    let mut holder = std::fs::File::open(&device.dev).unwrap();
    std::io::copy(&mut holder, &mut std::io::sink()).unwrap();
    // The on-premises VM ran on a bit after the failover and wrote its file system, through
    // a device of its own (`mount -o loop` would reuse the first one, and its unmount would
    // drop that device's cache).
    let vm_device = LoopDevice::attach(&onprem);
    assert_ne!(vm_device.dev, device.dev);
    let mut fs = Mounted::new(&vm_device.dev, &root.join("onprem-mnt"), &[]);
    let mut noise = vec![0u8; 3 << 20];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut noise);
    std::fs::write(fs.dir.join("after-failover.bin"), &noise).unwrap();
    fs.unmount();
    drop(vm_device);
    assert_ne!(b3(&onprem, None), b3(&recovered, None));

    let mt = MasterTarget::start(&server, root, "mt-bdev");
    let identity = root.join("rec.bundle");
    server.drctl_json(&strs(&reprotect_args("bdev", &mt, "original", "before", &device.dev, &identity)));
    let _rec = recovered_agent(&server, root, "bdev", &identity, &recovered);
    server.checkpoint("bdev");
    scatter_writes(&recovered, 0.01, 123);
    let want = b3(&recovered, None);
    let res = server.drctl_json(&["failback", "bdev"]);
    assert_eq!(res["disks"][0]["fingerprint"].as_str().unwrap(), fingerprint(&recovered));
    drop(holder);
    drop(device);
    assert_eq!(b3(&onprem, None), want, "the on-premises disk equals the recovered VM's final state");
}

/// On the way back: the recovered VM changes a page, a pass sends it, the recovered VM's
/// agent is killed -9 mid-pass, the page goes back to its value at the last point, and the
/// agent comes back. The records the cut pass left in the process server's spool (and on
/// the master target) must not pass for the disk: the failback is byte-identical.
#[test]
fn a_cut_pass_then_a_page_written_back_while_reprotected() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let Reprotected { onprem, recovered, mt: _mt, identity: rec_identity } =
        reprotected(&server, root, "wb", (32, 4, 131), "before");
    let mut rec =
        recovered_agent_with(&server, root, "wb", &rec_identity, &recovered, &["--max-rate", "2MiB"]);
    server.checkpoint("wb");
    let page = |buf: &mut Vec<u8>| {
        let f = std::fs::File::open(&recovered).unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&f, buf, 10 * 4096).unwrap();
    };
    let mut at_point = vec![0u8; 4096];
    page(&mut at_point);
    let f = std::fs::OpenOptions::new().write(true).open(&recovered).unwrap();
    let mut noise = vec![0u8; 6 << 20];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut noise);
    std::os::unix::fs::FileExt::write_all_at(&f, &noise[..4096], 10 * 4096).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &noise, 16 << 20).unwrap();
    f.sync_all().unwrap();
    let durable = |s: &Server| s.status("wb")["disks"][0]["durable_seq"].as_u64().unwrap();
    let before = durable(&server);
    server.drctl_json(&["checkpoint", "wb"]);
    deadline_poll("the pass to send page 10", Duration::from_secs(30), || {
        (durable(&server) >= before + 2).then_some(())
    });
    rec.kill9();
    std::os::unix::fs::FileExt::write_all_at(&f, &at_point, 10 * 4096).unwrap();
    f.sync_all().unwrap();
    rec.restart();
    server.wait_connected("wb");
    server.checkpoint("wb");
    let want = b3(&recovered, None);
    let res = server.drctl_json(&["failback", "wb"]);
    assert_eq!(res["disks"][0]["fingerprint"].as_str().unwrap(), fingerprint(&recovered));
    assert_eq!(b3(&onprem, None), want, "the on-premises disk equals the recovered VM's final state");
}

/// A reprotect to the wrong place is undone: the master target releases the VM, the
/// recovered VM's points and identity go, the VM is failover-committed again; refused
/// while the master target is down (without --force). Reprotected anew to another disk, the
/// failback brings that disk to the recovered VM's bytes, writes of both epochs included.
#[test]
fn a_reprotect_is_cancelled_and_done_again_to_another_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let onprem = root.join("rc.img");
    make_random(&onprem, 16, 4, 31);
    let (mut primary, _, _) = protect(&server, root, "rc", &onprem);
    primary.kill9();
    let recovered = fail_over_and_commit(&server, root, "rc", None);
    let mut mt = MasterTarget::start(&server, root, "mt-rc");

    let wrong = root.join("wrong.img");
    let first = root.join("rec1.bundle");
    server.drctl_json(&strs(&reprotect_args("rc", &mt, "alternate", "before", &wrong, &first)));
    let mut rec1 = recovered_agent(&server, root, "rc", &first, &recovered);
    scatter_writes(&recovered, 0.02, 32);
    server.checkpoint("rc");
    let out = server.drctl_json(&["reprotect-cancel", "rc"]);
    assert_eq!(out["state"], "failover-committed", "{out}");
    assert_eq!(out["master_target_released"], true, "{out}");
    assert!(out["points_deleted"].as_u64().unwrap() >= 1, "{out}");
    let serial = out["revoked_serial"].as_str().unwrap().to_string();
    let ids = server.drctl_json(&["identities"]);
    let id = ids.as_array().unwrap().iter().find(|i| i["serial"] == serial.as_str()).unwrap();
    assert!(id["revoked"].is_string(), "{ids}");
    assert_eq!(rec1.wait_exit("the cancelled reprotect's agent to stop").code(), Some(3));
    assert_eq!(server.status("rc")["state"], "failover-committed");
    assert!(server.drctl_json(&["points", "rc"]).as_array().unwrap().is_empty());
    let out = server.drctl(&["reprotect-cancel", "rc"]);
    assert_eq!(out.status.code(), Some(6), "not reprotected any more: {out:?}");

    // Again, to the right disk. The recovered VM wrote on meanwhile.
    scatter_writes(&recovered, 0.02, 33);
    let right = root.join("right.img");
    let second = root.join("rec2.bundle");
    server.drctl_json(&strs(&reprotect_args("rc", &mt, "alternate", "before", &right, &second)));
    let _rec2 = recovered_agent(&server, root, "rc", &second, &recovered);
    server.checkpoint("rc");
    // With the master target down, a cancel changes nothing and says what to do.
    mt.kill9();
    let err = server.drctl_err(&["reprotect-cancel", "rc"]);
    assert!(err.contains("--force") && err.contains("nothing was changed"), "{err}");
    assert_eq!(server.status("rc")["state"], "reprotected");
    mt.restart();
    scatter_writes(&recovered, 0.01, 34);
    let want = b3(&recovered, None);
    let res = server.drctl_json(&["failback", "rc"]);
    assert_eq!(res["disks"][0]["fingerprint"].as_str().unwrap(), fingerprint(&recovered));
    assert_eq!(b3(&right, None), want, "the second reprotect's disk is byte-identical");
}

/// A master target's identity revoked: the process server refuses it at the handshake (a
/// failback fails saying so, nothing changed); restarted with a new identity, on the same
/// data directory and port, the failback goes through byte for byte.
#[test]
fn a_revoked_master_target_is_refused_until_it_has_a_new_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let mut r = reprotected(&server, root, "mr", (16, 4, 41), "before");
    let _rec = recovered_agent(&server, root, "mr", &r.identity, &r.recovered);
    server.checkpoint("mr");
    scatter_writes(&r.recovered, 0.02, 42);
    let ids = server.drctl_json(&["identities"]);
    let serial = ids.as_array().unwrap().iter().find(|i| i["role"] == "master-target").unwrap()["serial"]
        .as_str()
        .unwrap()
        .to_string();
    server.drctl_json(&["revoke", &serial]);
    let before = b3(&r.onprem, None);
    let err = server.drctl_err(&["failback", "mr"]);
    assert!(err.contains("Revoked") && err.contains("new one") && err.contains("not shut down"), "{err}");
    assert_eq!(server.status("mr")["state"], "reprotected");
    // The relay says why the master target falls behind (its first error may be the cut of
    // the connection it had; the next attempt's is the refusal).
    deadline_poll("the relay's refusal in status", Duration::from_secs(30), || {
        let s = server.status("mr");
        let e = s["error"].as_str().unwrap_or_default();
        (e.contains("relay to the master target") && e.contains("Revoked")).then_some(())
    });
    // Monitoring sees it: the reprotected VM's changes no longer reach the way back.
    assert_eq!(server.status("mr")["health"], "critical");
    let check = server.drctl(&["status", "mr", "--check"]);
    assert_eq!(check.status.code(), Some(2), "{check:?}");
    assert_eq!(b3(&r.onprem, None), before, "nothing written");

    r.mt.kill9();
    let fresh = root.join("mt-mr-2.bundle");
    server.drctl_json(&["enroll", "master-target", "--name", "mt-mr", "--out", fresh.to_str().unwrap()]);
    r.mt.identity = fresh;
    r.mt.restart_same_port();
    // The VM is idle (its last pass was relayed before the revoke): no ack comes, yet the
    // relay's failure goes once it is connected again and the master target holds everything
    // (it stayed, critical, until the VM next wrote).
    deadline_poll("the relay's failure to go from status", Duration::from_secs(30), || {
        let s = server.status("mr");
        (!s["error"].as_str().unwrap_or_default().contains("relay") && s["health"] != "critical")
            .then_some(())
    });
    scatter_writes(&r.recovered, 0.01, 43);
    let want = b3(&r.recovered, None);
    let res = server.drctl_json(&["failback", "mr"]);
    assert_eq!(res["disks"][0]["fingerprint"].as_str().unwrap(), fingerprint(&r.recovered));
    assert_eq!(b3(&r.onprem, None), want, "the on-premises disk is byte-identical");
}

/// A master target asked to stop (SIGTERM, as its unit does) while a VM is reprotected
/// ends its relay stream and exits, instead of waiting on it until killed; started again,
/// the failback completes byte for byte.
#[test]
fn a_master_target_stops_on_sigterm_while_a_relay_stream_is_open() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let Reprotected { onprem, recovered, mut mt, identity } =
        reprotected(&server, root, "s", (16, 4, 31), "before");
    let _rec = recovered_agent(&server, root, "s", &identity, &recovered);
    write_random(&recovered, 2, 32);
    server.checkpoint("s");
    deadline_poll("the relay stream to open", Duration::from_secs(30), || {
        server.log_text().contains("relaying to the master target").then_some(())
    });
    let mut child = mt.child.take().unwrap();
    let term = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let exited = deadline_poll("the master target to exit on SIGTERM", Duration::from_secs(15), || {
        child.try_wait().unwrap()
    });
    assert!(exited.success(), "{exited:?}\n{}", tail(&mt.log_text(), 20));
    mt.restart_same_port();
    write_random(&recovered, 2, 33);
    let want = b3(&recovered, None);
    let res = server.drctl_json(&["failback", "s"]);
    assert_eq!(res["disks"][0]["fingerprint"].as_str().unwrap(), fingerprint(&recovered));
    assert_eq!(b3(&onprem, None), want);
}

/// The recovered VM's agent is killed during its first delta sync, after records reached
/// the master target, and starts again without its state (W4's path): the disks are
/// compared again (the master target hashes its target disk with the records it holds,
/// copying aside only the blocks those wrote, when it holds any by then), and the failback
/// is byte for byte.
#[test]
fn a_delta_sync_cut_short_is_compared_again_over_the_records_the_master_target_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let Reprotected { onprem, recovered, mt: _mt, identity } =
        reprotected(&server, root, "o", (48, 8, 71), "before");
    write_random(&recovered, 24, 72);
    let mut agent = recovered_agent_with(&server, root, "o", &identity, &recovered, &["--max-rate", "4MiB"]);
    deadline_poll("records at the master target", Duration::from_secs(60), || {
        (server.status("o")["disks"][0]["master_target_seq"].as_u64().unwrap_or(0) > 0).then_some(())
    });
    agent.kill9();
    assert!(server.drctl_json(&["points", "o"]).as_array().unwrap().is_empty(), "cut before its first point");
    std::fs::remove_dir_all(root.join("st-o-back")).unwrap();
    let _agent = recovered_agent(&server, root, "o", &identity, &recovered);
    server.checkpoint("o");
    let want = b3(&recovered, None);
    let res = server.drctl_json(&["failback", "o"]);
    assert_eq!(res["disks"][0]["fingerprint"].as_str().unwrap(), fingerprint(&recovered));
    assert_eq!(b3(&onprem, None), want, "the on-premises disk is byte-identical to the recovered one");
}

/// The recovered VM's first sync to the master target, cut by an agent that went away,
/// waits for it as one job with its progress; `drctl reprotect-cancel` ends that job (it
/// would otherwise wait for an agent whose identity the cancel revoked).
#[test]
fn a_reprotect_cancel_ends_the_sync_that_waits_for_its_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let Reprotected { recovered, mt: _mt, identity, .. } =
        reprotected(&server, root, "wc", (16, 4, 41), "before");
    // The recovered VM differs from the target disk by 8 MiB: its sync takes a while at 1 MiB/s.
    write_random(&recovered, 8, 42);
    let sync = |s: &Server| {
        let jobs = s.drctl_json(&["jobs"]);
        // The newest: the VM's first protection had one too.
        let syncs = jobs.as_array().unwrap().iter().filter(|j| j["kind"] == "initial-sync");
        syncs.max_by_key(|j| j["id"].as_u64()).cloned()
    };
    let first = sync(&server).unwrap()["id"].as_u64();
    let mut rec = recovered_agent_with(&server, root, "wc", &identity, &recovered, &["--max-rate", "1MiB"]);
    deadline_poll("the sync to the master target to make progress", Duration::from_secs(30), || {
        sync(&server).filter(|j| j["id"].as_u64() != first && j["done"].as_u64().unwrap_or(0) > 0)
    });
    rec.kill9();
    let job = deadline_poll("the sync to wait for its agent", Duration::from_secs(30), || {
        sync(&server)
            .filter(|j| j["phase"].as_str().unwrap_or("").contains("waiting for the agent to reconnect"))
    });
    assert_eq!(job["state"], "running", "{job}");
    let out = server.drctl_json(&["reprotect-cancel", "wc"]);
    assert_eq!(out["state"], "failover-committed", "{out}");
    let job = sync(&server).unwrap();
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap_or("").contains("reprotect was cancelled"), "{job}");
    let jobs = server.drctl_json(&["jobs"]);
    assert!(jobs.as_array().unwrap().iter().all(|j| j["state"] != "running"), "{jobs}");
    // Listed by VM, state and kind: the cancelled sync is the VM's one failed initial sync.
    let failed = server.drctl_json(&["jobs", "--vm", "wc", "--state", "failed", "--kind", "initial-sync"]);
    assert_eq!(failed.as_array().unwrap().len(), 1, "{failed}; all: {jobs}");
    assert_eq!(failed[0]["id"], job["id"], "{failed}");
    assert_eq!(server.drctl_json(&["jobs", "--vm", "nosuch"]), serde_json::json!([]));
}
