//! Recovery plans: a file of ordered groups of VMs, run as one operation group by group,
//! with actions, manual steps and `plan continue`, around the whole circle.

use crate::harness::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The VMs of the plan, in its order: group 1 is `db`, group 2 `app` and `web` (a
/// replication group, `tier`).
const VMS: [&str; 3] = ["db", "app", "web"];

/// The plan file: actions append `WHEN pre|post GROUP VMS` lines to `log`; group 1 waits for
/// a manual step; group 2's post action fails once (while `flag` is absent) to show that
/// `plan continue` resumes without redoing a VM.
fn plan_file(log: &Path, flag: &Path, mt: &str, disks: &[PathBuf]) -> String {
    let act = |what: &str| {
        format!(
            "echo \\\"$(date +%s%N) {what} $TERN_GROUP $TERN_VMS $TERN_OPERATION\\\" >> {}",
            log.display()
        )
    };
    let mut s = format!(
        "name = \"shop\"
[[group]]
vms = [\"db\"]
pre = [\"{}\"]
post = [\"{}\"]
manual = \"Check that db accepts connections\"
[[group]]
vms = [\"app\", \"web\"]
pre = [\"{}\"]
post = [\"{}\", \"test -f {} || (touch {}; echo not yet >&2; exit 3)\"]
",
        act("pre"),
        act("post"),
        act("pre"),
        act("post"),
        flag.display(),
        flag.display()
    );
    for (vm, disk) in VMS.iter().zip(disks) {
        s += &format!(
            "[vm.{vm}]\nmaster_target = \"{mt}\"\nlocation = \"original\"\ntarget_disks = [\"sda={}\"]\n",
            disk.display()
        );
    }
    s
}

/// The action log's lines as (what, group) in time order, for one operation.
fn actions(log: &Path, operation: &str) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut lines: Vec<(u128, String)> = text
        .lines()
        .filter(|l| l.ends_with(operation))
        .map(|l| {
            let mut f = l.splitn(2, ' ');
            let t: u128 = f.next().unwrap().parse().unwrap();
            (t, f.next().unwrap().trim_end_matches(operation).trim().to_string())
        })
        .collect();
    lines.sort();
    lines.into_iter().map(|(_, l)| l).collect()
}

/// Runs a plan operation that stops at group 1's manual step, then continues it to the end
/// (the first continue meets group 2's failing post action once when `fails_once`).
fn run_through(server: &Server, args: &[&str], fails_once: bool) -> Value {
    let out = server.drctl(args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("waiting") && text.contains("drctl plan continue shop"), "{text}");
    if fails_once {
        let err = server.drctl_err(&["plan", "continue", "shop"]);
        assert!(
            err.contains("post action") && err.contains("not yet") && err.contains("plan continue shop"),
            "{err}"
        );
        let shown = server.drctl_json(&["plan", "show", "shop"]);
        assert_eq!(shown["run"]["state"], "failed", "{shown}");
        assert_eq!(shown["run"]["done"].as_array().unwrap().len(), 3, "every VM was done before: {shown}");
    }
    server.drctl_json(&["plan", "continue", "shop"])
}

/// Unix milliseconds of an RFC 3339 time as drctl prints it.
fn ms_of(t: &str) -> u64 {
    let out = std::process::Command::new("date").args(["-u", "-d", t, "+%s%3N"]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().parse().unwrap()
}

/// Each VM's output of a plan (test) failover is its point, byte for byte.
fn check_outputs(out: &Path, run: &Value) {
    for vm in VMS {
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(out.join(vm).join("vm.json")).unwrap()).unwrap();
        assert_eq!(manifest["point"], run["points"][vm], "{vm}: {manifest}");
        let disk = &manifest["disks"][0];
        assert_eq!(disk["blake3"].as_str().unwrap(), b3(&out.join(vm).join("sda.raw"), None), "{vm}");
    }
}

#[test]
fn a_plan_goes_round_the_circle_group_by_group() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let mut agents = Vec::new();
    let mut disks = Vec::new();
    for (i, vm) in VMS.iter().enumerate() {
        let disk = root.join(format!("{vm}.img"));
        make_random(&disk, 8, 4, 40 + i as u64);
        let identity = root.join(format!("{vm}.bundle"));
        server.enroll_agent(vm, &identity);
        let hooks = ["--freeze", "true", "--thaw", "true", "--shutdown", "true"];
        agents.push(Agent::start(
            &server,
            &identity,
            vm,
            &[("sda", &disk)],
            &root.join(format!("{vm}-st")),
            &hooks,
        ));
        server.checkpoint(vm);
        disks.push(disk);
    }
    server.drctl_json(&["group", "create", "tier", "--vm", "app", "--vm", "web"]);
    let multi = server.drctl_json(&["group", "checkpoint", "tier"])["point"].clone();
    // db writes after the group's point: its own latest point is newer.
    scatter_writes(&disks[0], 0.02, 9);
    server.checkpoint("db");

    let mut mt = MasterTarget::start(&server, root, "mt1");
    let (log, flag) = (root.join("actions.log"), root.join("flag"));
    let file = root.join("shop.toml");
    std::fs::write(&file, plan_file(&log, &flag, &mt.url(), &disks)).unwrap();

    // A bad file is refused with its line; nothing is stored.
    let bad = root.join("bad.toml");
    std::fs::write(&bad, "name = \"shop\"\n[[group]]\nvms = [\"db\"]\nprefix = [\"x\"]\n").unwrap();
    let err = server.drctl_err(&["plan", "apply", bad.to_str().unwrap()]);
    assert!(err.contains("bad.toml:line 4") && err.contains("prefix"), "{err}");
    std::fs::write(&bad, "name = \"shop\"\n[[group]]\nvms = [\"db\", \"ghost\"]\n").unwrap();
    let err = server.drctl_err(&["plan", "apply", bad.to_str().unwrap()]);
    assert!(err.contains("line 3") && err.contains("VM ghost is not protected"), "{err}");
    // Too large a file is refused saying so (W19-B: stored, then every `plan list` failed).
    let manual = "m".repeat(tern_proto::MAX_PLAN_BYTES);
    std::fs::write(&bad, format!("name = \"big\"\n[[group]]\nvms = [\"db\"]\nmanual = \"{manual}\"\n"))
        .unwrap();
    let err = server.drctl_err(&["plan", "apply", bad.to_str().unwrap()]);
    assert!(err.contains("too large") && err.contains("more than 65536 bytes"), "{err}");
    // A target disk the VM does not have is found at apply, not in the middle of a failback.
    let wrong = plan_file(&log, &flag, &mt.url(), &disks).replacen("sda=", "sdz=", 1);
    std::fs::write(&bad, wrong).unwrap();
    let out = server.drctl(&["plan", "apply", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[vm.db] target_disks") && err.contains("has no disk sdz"), "{err}");
    assert!(server.drctl_json(&["plan", "list"]).as_array().unwrap().is_empty());

    let applied = server.drctl_json(&["plan", "apply", file.to_str().unwrap()]);
    assert_eq!(applied["groups"].as_array().unwrap().len(), 2);
    // A custom point names one VM's point: refused for a plan.
    let out = root.join("drill");
    let o = out.to_str().unwrap();
    let err = server.drctl_err(&["plan", "test-failover", "shop", "--point", "3", "--output", o]);
    assert!(err.contains("custom point"), "{err}");

    // Test failover at latest-multi-vm: app and web at the group's common point, db (in no
    // group) at its own latest; actions in group order; a manual step; a failed action
    // resumed without redoing a VM.
    let run = run_through(
        &server,
        &["plan", "test-failover", "shop", "--point", "latest-multi-vm", "--output", o],
        true,
    )["run"]
        .clone();
    assert_eq!(run["state"], "done", "{run}");
    assert_eq!((run["points"]["app"].clone(), run["points"]["web"].clone()), (multi.clone(), multi.clone()));
    assert!(run["points"]["db"].as_u64() > multi.as_u64(), "{run}");
    check_outputs(&out, &run);
    let order = actions(&log, "test-failover");
    // The failed action ran again on `continue`, the one before it did not.
    assert_eq!(order, ["pre 1 db", "post 1 db", "pre 2 app web", "post 2 app web"], "{order:?}");
    let jobs = server.drctl_json(&["jobs"]);
    let per_vm =
        jobs.as_array().unwrap().iter().filter(|j| j["kind"] == "test-failover" && j["vm"] == "app").count();
    assert_eq!(per_vm, 1, "app was test-failed over once: {jobs}");
    // Again while that drill is open: refused before any action, naming the open drill
    // (not its files as in the way, which led to deleting them by hand).
    let err =
        server.drctl_err(&["plan", "test-failover", "shop", "--point", "latest-multi-vm", "--output", o]);
    assert!(
        err.contains("already has an open test failover") && err.contains("Nothing was changed"),
        "{err}"
    );
    assert_eq!(actions(&log, "test-failover").len(), 4, "no action ran");
    server.drctl_json(&["plan", "test-failover-cleanup", "shop"]);
    assert!(!out.join("db").join("sda.raw").exists());

    // At latest, the group makes a multi-VM point now: app and web at that one new point
    // (not a fresh point each, at different moments), db at a fresh one of its own.
    let run = run_through(
        &server,
        &["plan", "test-failover", "shop", "--point", "latest", "--output", o],
        false,
    )["run"]
        .clone();
    assert_eq!(run["state"], "done", "{run}");
    let fresh = run["points"]["app"].as_u64().unwrap();
    assert!(fresh > multi.as_u64().unwrap(), "{run}");
    assert_eq!(run["points"]["web"].as_u64(), Some(fresh), "{run}");
    let web_points = server.drctl_json(&["points", "web"]);
    let p = web_points.as_array().unwrap().iter().find(|p| p["id"] == fresh).unwrap();
    assert_eq!(p["group"], "tier", "a multi-VM point: {p}");
    check_outputs(&out, &run);
    server.drctl_json(&["plan", "test-failover-cleanup", "shop"]);

    // Failover (unplanned, the primary site lost) at latest-multi-vm, then commit.
    for a in &mut agents {
        a.kill9();
    }
    let out = root.join("recovered");
    let o = out.to_str().unwrap();
    let run = run_through(
        &server,
        &["plan", "failover", "shop", "--kind", "unplanned", "--point", "latest-multi-vm", "--output", o],
        false,
    )["run"]
        .clone();
    check_outputs(&out, &run);
    // The group's newest common point: the one the drill at latest made.
    assert_eq!((run["points"]["app"].as_u64(), run["points"]["web"].as_u64()), (Some(fresh), Some(fresh)));
    server.drctl_json(&["plan", "commit", "shop"]);
    for vm in VMS {
        assert_eq!(server.status(vm)["state"], "failover-committed");
    }

    // The recovered VMs run and write; reprotect to the original disks, fail back.
    let ids = root.join("ids");
    let reprotected =
        server.drctl_json(&["plan", "reprotect", "shop", "--identity-dir", ids.to_str().unwrap()]);
    let mut recovered_agents = Vec::new();
    for (i, vm) in VMS.iter().enumerate() {
        let disk = out.join(vm).join("sda.raw");
        let bundle = ids.join(format!("{vm}.bundle"));
        // What the agent beside each recovered VM is started with.
        let agent = &reprotected["run"]["agents"][vm];
        assert_eq!(agent["identity"], bundle.display().to_string(), "{reprotected}");
        assert_eq!(agent["disks"], serde_json::json!([format!("sda={}", disk.display())]), "{reprotected}");
        let st = root.join(format!("{vm}-back"));
        recovered_agents.push(Agent::start(
            &server,
            &bundle,
            vm,
            &[("sda", &disk)],
            &st,
            &["--shutdown", "true"],
        ));
        server.wait_connected(vm);
        server.checkpoint(vm);
        scatter_writes(&disk, 0.02, 60 + i as u64);
    }
    let want: Vec<String> = VMS.iter().map(|vm| b3(&out.join(vm).join("sda.raw"), None)).collect();
    // A drill first: each VM's fresh point applied on scratch copies on the master target
    // and verified; the VMs run on, the original disks are not touched.
    let originals: Vec<String> = disks.iter().map(|d| b3(d, None)).collect();
    let drill = run_through(&server, &["plan", "failback", "shop", "--drill"], false);
    assert_eq!(drill["run"]["state"], "done", "{drill}");
    let jobs = server.drctl_json(&["jobs"]);
    for vm in VMS {
        let j =
            jobs.as_array().unwrap().iter().rev().find(|j| j["kind"] == "failback-drill" && j["vm"] == vm);
        let j = j.unwrap_or_else(|| panic!("no drill job of {vm}: {jobs}"));
        let fp = j["result"]["disks"][0]["fingerprint"].as_str().unwrap();
        assert_eq!(
            fp,
            fingerprint(&out.join(vm).join("sda.raw")),
            "{vm}: the drill verified the running VM's state"
        );
        assert_eq!(server.status(vm)["state"], "reprotected");
        assert_eq!(server.status(vm)["agent_connected"], true, "{vm} still runs");
    }
    let after: Vec<String> = disks.iter().map(|d| b3(d, None)).collect();
    assert_eq!(after, originals, "a drill does not touch the target disks");
    let scratch = root.join("mt1").join("tmp");
    assert!(std::fs::read_dir(&scratch).map_or(0, |d| d.count()) == 0, "the drill's copies are removed");
    run_through(&server, &["plan", "failback", "shop"], false);
    // app and web (replication group tier) were both shut down before either was applied:
    // the group comes back at one moment, both stopped.
    let web_final = server.drctl_json(&["points", "web"]).as_array().unwrap().last().unwrap().clone();
    assert!(web_final["note"].as_str().unwrap().contains("final point"), "{web_final}");
    let jobs = server.drctl_json(&["jobs"]);
    let app_job =
        jobs.as_array().unwrap().iter().rev().find(|j| j["kind"] == "failback" && j["vm"] == "app").unwrap();
    let (final_ms, app_started) =
        (ms_of(web_final["time"].as_str().unwrap()), ms_of(app_job["started"].as_str().unwrap()));
    assert!(
        final_ms <= app_started,
        "web's final point ({final_ms}) came after app's failback started ({app_started})"
    );
    assert_eq!(actions(&log, "failback"), ["pre 1 db", "post 1 db", "pre 2 app web", "post 2 app web"]);
    for ((vm, disk), want) in VMS.iter().zip(&disks).zip(&want) {
        assert_eq!(&b3(disk, None), want, "{vm}: the original disk is the recovered VM's final state");
        assert_eq!(server.status(vm)["state"], "failed-back");
    }
    server.drctl_json(&["plan", "commit", "shop"]);
    server.drctl_json(&["plan", "reverse-replicate", "shop"]);
    mt.kill9();
    // Protected from the primary site again: a point of each original disk recovers it.
    drop(recovered_agents);
    let mut again = Vec::new();
    for (vm, disk) in VMS.iter().zip(&disks) {
        let identity = root.join(format!("{vm}.bundle"));
        again.push(Agent::start(
            &server,
            &identity,
            vm,
            &[("sda", disk)],
            &root.join(format!("{vm}-again")),
            &[],
        ));
        let p = server.checkpoint(vm);
        assert_eq!(server.status(vm)["state"], "protected");
        let o = root.join(format!("final-{vm}"));
        let r = server.drctl_json(&[
            "test-failover",
            vm,
            "--point",
            &p["id"].to_string(),
            "--output",
            o.to_str().unwrap(),
        ]);
        assert_eq!(r["disks"][0]["blake3"].as_str().unwrap(), b3(disk, None), "{vm}");
    }
}

#[test]
fn a_plan_with_a_vm_without_a_point_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let _ready = protect_vm(&server, root, "ready", 8, 2, &[]);
    // A VM whose initial sync crawls: it is protected, with no point yet.
    let identity = root.join("slow.bundle");
    server.enroll_agent("slow", &identity);
    let disk = root.join("slow.img");
    make_random(&disk, 16, 16, 3);
    let _slow = Agent::start(
        &server,
        &identity,
        "slow",
        &[("sda", &disk)],
        &root.join("slow-st"),
        &["--max-rate", "64KiB"],
    );
    server.wait_connected("slow");
    let file = root.join("p.toml");
    std::fs::write(&file, "name = \"p\"\n[[group]]\nvms = [\"ready\"]\n[[group]]\nvms = [\"slow\"]\n")
        .unwrap();
    server.drctl_json(&["plan", "apply", file.to_str().unwrap()]);
    let out = root.join("out");
    let err = server.drctl_err(&[
        "plan",
        "failover",
        "p",
        "--kind",
        "unplanned",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("VM slow has no point") && err.contains("Nothing was written"), "{err}");
    assert!(!out.exists(), "nothing was written");
    assert_eq!(server.status("ready")["state"], "protected");
}

/// `drctl plan continue p` in the background.
fn spawn_continue(server: &Server) -> std::process::Child {
    std::process::Command::new(bin("drctl"))
        .args(["--server", &server.url(), "--identity"])
        .arg(server.admin())
        .args(["plan", "continue", "p"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// A plan can be stopped where an operator needs to stop it: at a manual step, or in a
/// hung action (killed with what it started); a process server killed in the middle leaves
/// the plan saying `plan continue`, which goes on from there; a VM removed from under a
/// plan shows as the plan's problem.
#[test]
fn a_plan_is_cancelled_at_a_manual_step_or_in_a_hung_action_and_continues_after_a_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let _a = protect_vm(&server, root, "a", 8, 2, &[]);
    let _b = protect_vm(&server, root, "b", 8, 2, &[]);
    // Group 2's pre action hangs while `hang` exists, with a child of its own.
    let (hang, pid) = (root.join("hang"), root.join("sleeper.pid"));
    let file = root.join("p.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"p\"\n[[group]]\nvms = [\"a\"]\nmanual = \"Check a\"\n[[group]]\nvms = [\"b\"]\n\
             pre = [\"if test -f {0}; then sleep 600 & echo $! > {1}; wait; fi\"]\n",
            hang.display(),
            pid.display()
        ),
    )
    .unwrap();
    server.drctl_json(&["plan", "apply", file.to_str().unwrap()]);
    let out = root.join("out");
    let tfo =
        ["plan", "test-failover", "p", "--point", "latest-processed", "--output", out.to_str().unwrap()];
    // At the manual step: removal is refused, saying how to stop it; cancel stops it.
    let text = String::from_utf8_lossy(&server.drctl(&tfo).stdout).into_owned();
    assert!(text.contains("waiting"), "{text}");
    // Run again meanwhile: it says what the first one is doing.
    let err = server.drctl_err(&tfo);
    assert!(err.contains("waits at a manual step") && err.contains("drctl plan continue p"), "{err}");
    let err = server.drctl_err(&["plan", "remove", "p"]);
    assert!(err.contains("drctl plan cancel p"), "{err}");
    let out_cancel = server.drctl(&["plan", "cancel", "p"]);
    assert!(out_cancel.status.success(), "{out_cancel:?}");
    let shown = server.drctl_json(&["plan", "show", "p"]);
    assert_eq!(shown["run"]["state"], "failed", "{shown}");
    assert!(shown["run"]["message"].as_str().unwrap().contains("cancelled"), "{shown}");
    let err = server.drctl_err(&["plan", "cancel", "p"]);
    assert!(err.contains("no operation running"), "{err}");
    server.drctl_json(&["plan", "test-failover-cleanup", "p"]);
    assert!(!out.join("a").join("sda.raw").exists(), "the cleanup removed the cancelled run's output");

    // In a hung action: cancel kills it and what it started.
    std::fs::write(&hang, "").unwrap();
    let text = String::from_utf8_lossy(&server.drctl(&tfo).stdout).into_owned();
    assert!(text.contains("waiting"), "{text}");
    let continued = spawn_continue(&server);
    let sleeper: i32 = deadline_poll("the hung action to start", Duration::from_secs(30), || {
        std::fs::read_to_string(&pid).ok().and_then(|s| s.trim().parse().ok())
    });
    let alive = |p: i32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
    };
    assert!(alive(sleeper));
    let out_cancel = server.drctl(&["plan", "cancel", "p"]);
    assert!(out_cancel.status.success(), "{out_cancel:?}");
    deadline_poll("the action's child to be killed", Duration::from_secs(10), || {
        (!alive(sleeper)).then_some(())
    });
    let mut continued = continued;
    assert!(!continued.wait().unwrap().success(), "the continued run ended cancelled");
    let shown = server.drctl_json(&["plan", "show", "p"]);
    assert_eq!(shown["run"]["done"], serde_json::json!(["a"]), "{shown}");

    // A process server killed in the hung action: the plan says how to go on.
    std::fs::remove_file(&pid).unwrap();
    let continued = spawn_continue(&server);
    deadline_poll("the hung action to start again", Duration::from_secs(30), || pid.exists().then_some(()));
    server.kill9();
    let mut continued = continued;
    let _ = continued.wait();
    // A server killed -9 cannot kill its action (under systemd the unit's cgroup goes with
    // it): the test does.
    if let Some(p) = std::fs::read_to_string(&pid).ok().map(|s| s.trim().to_string()) {
        let _ = std::process::Command::new("kill").args(["-9", &p]).status();
    }
    server.start();
    let shown = server.drctl_json(&["plan", "show", "p"]);
    assert_eq!(shown["run"]["state"], "failed", "{shown}");
    assert!(shown["run"]["message"].as_str().unwrap().contains("drctl plan continue p"), "{shown}");
    let jobs = server.drctl_json(&["jobs"]);
    let job = jobs.as_array().unwrap().iter().rev().find(|j| j["kind"] == "plan").unwrap().clone();
    assert!(job["error"].as_str().unwrap().contains("drctl plan continue p"), "{job}");
    std::fs::remove_file(&hang).unwrap();
    let run = server.drctl_json(&["plan", "continue", "p"]);
    assert_eq!(run["run"]["state"], "done", "{run}");
    assert!(out.join("b").join("sda.raw").exists());
    server.drctl_json(&["plan", "test-failover-cleanup", "p"]);

    // A VM removed from under the plan: said, by the removal and by the plan.
    drop(_b);
    let removed = server.drctl(&["remove", "b", "--delete-points"]);
    assert!(removed.status.success(), "{removed:?}");
    assert!(String::from_utf8_lossy(&removed.stderr).contains("plan p names VM b"), "{removed:?}");
    let shown = server.drctl_json(&["plan", "show", "p"]);
    assert!(shown["problem"].as_str().unwrap_or_default().contains("VM b is not protected"), "{shown}");
}

/// A process server that stops while a plan's failover writes a VM's disks leaves that VM
/// failed over with its output not whole: `plan continue` writes it again at its point
/// before it goes on, so that no later group starts beside a VM without its disks.
#[test]
fn a_plan_failover_cut_short_in_a_vms_output_writes_it_again_on_continue() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let _a = protect_vm(&server, root, "a", 8, 4, &[]);
    let _b = protect_vm(&server, root, "b", 8, 4, &[]);
    let file = root.join("p.toml");
    std::fs::write(&file, "name = \"p\"\n[[group]]\nvms = [\"a\"]\n[[group]]\nvms = [\"b\"]\n").unwrap();
    server.drctl_json(&["plan", "apply", file.to_str().unwrap()]);
    // The server stops (as a kill -9 would) once VM a is failed over, before its disks
    // are written.
    server.kill9();
    server.env = vec![("TERN_CRASH_AT".into(), "failover-before-output".into())];
    server.start();
    let out = root.join("out");
    let fo = ["plan", "failover", "p", "--kind", "unplanned", "--output", out.to_str().unwrap()];
    assert!(!server.drctl(&fo).status.success());
    server.kill9();
    server.env.clear();
    server.start();
    // Status says so: it cannot start as it is.
    let a = server.status("a");
    assert_eq!((a["state"].as_str(), a["health"].as_str()), (Some("failed-over"), Some("critical")), "{a}");
    assert!(a["error"].as_str().unwrap().contains("drctl change-point a"), "{a}");
    assert!(!out.join("a").join("vm.json").exists());
    let run = server.drctl_json(&["plan", "continue", "p"]);
    assert_eq!(run["run"]["state"], "done", "{run}");
    for vm in ["a", "b"] {
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(out.join(vm).join("vm.json")).unwrap()).unwrap();
        assert_eq!(manifest["point"], run["run"]["points"][vm], "{vm}: {manifest}");
        let written = b3(&out.join(vm).join("sda.raw"), None);
        assert_eq!(manifest["disks"][0]["blake3"].as_str().unwrap(), written, "{vm}");
        assert_eq!(written, b3(&root.join(format!("{vm}.img")), None), "{vm}");
    }
    assert_eq!(server.status("a")["health"], "normal");
    // Whole now: the commit goes through.
    server.drctl_json(&["plan", "commit", "p"]);
}
