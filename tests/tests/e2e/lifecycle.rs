//! The failover lifecycle: point options, planned and unplanned failover, change of point,
//! commit, app consistency, retention.

use crate::harness::*;
use std::path::Path;
use std::time::Duration;

fn setup(root: &Path, vm: &str, extra_agent: &[&str], serve: &[&str]) -> (Server, Agent, std::path::PathBuf) {
    let mut server = Server::init(root);
    server.extra = serve.iter().map(|s| s.to_string()).collect();
    server.start();
    let identity = root.join(format!("{vm}.bundle"));
    server.enroll_agent(vm, &identity);
    let disk = root.join(format!("{vm}.img"));
    make_ext4(&disk, 32, 11);
    let agent = Agent::start(
        &server,
        &identity,
        vm,
        &[("sda", &disk)],
        &root.join(format!("{vm}-state")),
        extra_agent,
    );
    server.wait_connected(vm);
    (server, agent, disk)
}

fn id(p: &serde_json::Value) -> String {
    p["id"].to_string()
}

fn output_hash(res: &serde_json::Value) -> String {
    res["disks"][0]["blake3"].as_str().unwrap().to_string()
}

#[test]
fn every_point_option_gives_the_source_at_that_point() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let hooks = root.join("hooks.log");
    let (freeze, thaw) = logging_hooks(&hooks);
    let (server, _agent, disk) = setup(root, "opt", &["--freeze", &freeze, "--thaw", &thaw], &[]);

    let p1 = server.checkpoint("opt");
    let h1 = b3(&disk, None);
    scatter_writes(&disk, 0.01, 21);
    let p2 = server.drctl_json(&["checkpoint", "opt", "--wait", "--app-consistent"]);
    let h2 = b3(&disk, None);
    assert_eq!(p2["consistency"], "app");
    std::thread::sleep(Duration::from_millis(50));
    let between = server
        .drctl_json(&["points", "opt"])
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == p2["id"])
        .unwrap()["time"]
        .as_str()
        .unwrap()
        .to_string();
    scatter_writes(&disk, 0.01, 22);
    let p3 = server.checkpoint("opt");
    let h3 = b3(&disk, None);
    // Written after the last point: only `latest` sees it.
    scatter_writes(&disk, 0.01, 23);
    let h4 = b3(&disk, None);

    let cases: Vec<(String, &String)> = vec![
        (id(&p1), &h1),
        (between, &h2),
        ("latest-app".into(), &h2),
        ("latest-processed".into(), &h3),
        (id(&p3), &h3),
        ("latest".into(), &h4),
    ];
    for (i, (point, want)) in cases.iter().enumerate() {
        let out = root.join(format!("tfo-{i}"));
        let res =
            server.drctl_json(&["test-failover", "opt", "--point", point, "--output", out.to_str().unwrap()]);
        assert_eq!(&output_hash(&res), *want, "--point {point}");
        assert_eq!(&b3(&out.join("sda.raw"), None), *want, "--point {point}");
        // Status shows the open test failover, which point and where, until its cleanup.
        let open = &server.status("opt")["test_failover"];
        assert!(open["point"].as_u64().is_some_and(|p| p > 0), "{open}");
        assert_eq!(open["output"].as_str(), out.to_str(), "{open}");
        let text = String::from_utf8(server.drctl(&["status", "opt"]).stdout).unwrap();
        assert!(text.contains(&format!("test failover open: point {}", open["point"])), "{text}");
        server.drctl_json(&["test-failover-cleanup", "opt"]);
        assert!(server.status("opt")["test_failover"].is_null());
    }
    let err =
        server.drctl_err(&["test-failover", "opt", "--point", "1999-01-01T00:00:00Z", "--output", "/tmp/x"]);
    assert!(err.contains("the oldest is"), "{err}");
    let err = server.drctl_err(&["test-failover", "opt", "--point", "someday", "--output", "/tmp/x"]);
    assert!(err.contains("RFC 3339"), "{err}");
    // drctl verify rebuilds a point from the store.
    let v = server.drctl_json(&["verify", "opt", "--point", &id(&p2)]);
    assert_eq!(v["ok"], true);
}

#[test]
fn planned_failover_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let marker = root.join("shut-down");
    let shutdown = format!("touch {}", marker.display());
    let (server, mut agent, disk) = setup(root, "pl", &["--shutdown", &shutdown], &[]);
    server.checkpoint("pl");
    // Writes that land just before the failover, with no point after them.
    scatter_writes(&disk, 0.02, 31);
    let want = b3(&disk, None);
    let out = root.join("failover");
    let res = server.drctl_json(&[
        "failover",
        "pl",
        "--kind",
        "planned",
        "--output",
        out.to_str().unwrap(),
        "--format",
        "vhd",
    ]);
    assert!(marker.exists(), "the shutdown hook ran");
    assert_eq!(output_hash(&res), want);
    assert_eq!(b3(&out.join("sda.vhd"), Some(32 << 20)), want);
    assert_eq!(server.status("pl")["state"], "failed-over");
    // The agent was told to stand down and exits by itself.
    let child = agent.child.as_mut().unwrap();
    deadline_poll("the agent to stand down", Duration::from_secs(30), || child.try_wait().unwrap());
    let err = server.drctl_err(&[
        "failover",
        "pl",
        "--kind",
        "unplanned",
        "--output",
        root.join("again").to_str().unwrap(),
    ]);
    assert!(err.contains("failed-over"), "{err}");
}

#[test]
fn planned_failover_is_refused_when_the_source_cannot_shut_down() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (server, mut agent, _disk) = setup(root, "ref", &["--shutdown", "exit 3"], &[]);
    server.checkpoint("ref");
    let out = root.join("failover");
    let err = server.drctl_err(&["failover", "ref", "--kind", "planned", "--output", out.to_str().unwrap()]);
    assert!(err.contains("shutdown hook") && err.contains("stays protected"), "{err}");
    assert_eq!(server.status("ref")["state"], "protected");
    assert!(!out.join("sda.raw").exists());
    // With the agent stopped, a planned failover does not run either.
    agent.kill9();
    deadline_poll("the server to notice", Duration::from_secs(30), || {
        (server.status("ref")["agent_connected"] == false).then_some(())
    });
    let err = server.drctl_err(&["failover", "ref", "--kind", "planned", "--output", out.to_str().unwrap()]);
    assert!(err.contains("not connected") && err.contains("--kind unplanned"), "{err}");
    assert_eq!(server.status("ref")["state"], "protected");
}

#[test]
fn unplanned_failover_with_the_agent_gone_then_change_point_and_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (mut server, mut agent, disk) = setup(root, "un", &[], &[]);
    let p1 = server.checkpoint("un");
    let h1 = b3(&disk, None);
    scatter_writes(&disk, 0.01, 41);
    server.checkpoint("un");
    let h2 = b3(&disk, None);
    agent.kill9();
    // Lost with the primary site: never reached the recovery site.
    scatter_writes(&disk, 0.01, 42);
    let out = root.join("failover");
    let res =
        server.drctl_json(&["failover", "un", "--kind", "unplanned", "--output", out.to_str().unwrap()]);
    assert_eq!(output_hash(&res), h2, "unplanned failover uses the newest point");
    // `latest` (the default) could not make a point: the output says it is an older one.
    let note = res["note"].as_str().unwrap_or_default();
    assert!(note.contains("not the moment asked for") && note.contains("not connected"), "{res}");
    let res = server.drctl_json(&["change-point", "un", "--point", &id(&p1)]);
    assert_eq!(output_hash(&res), h1);
    assert_eq!(b3(&out.join("sda.raw"), None), h1);
    // Back to `latest`: the newest point, and the output says it is not a new one.
    let res = server.drctl_json(&["change-point", "un", "--point", "latest"]);
    assert_eq!(output_hash(&res), h2);
    let note = res["note"].as_str().unwrap_or_default();
    assert!(note.contains("not the moment asked for") && note.contains("stood down"), "{res}");
    // A test failover into the failover's directory is refused: its cleanup would delete
    // the recovered VM's disks (W19-A).
    let out2 = server.drctl(&["test-failover", "un", "--point", &id(&p1), "--output", out.to_str().unwrap()]);
    assert_eq!(out2.status.code(), Some(6), "{out2:?}");
    let err = String::from_utf8_lossy(&out2.stderr);
    assert!(err.contains("output directory of the failover of VM un"), "{err}");
    // A commit would delete the point of an open test failover: refused until it is cleaned up.
    let drill = root.join("drill");
    server.drctl_json(&["test-failover", "un", "--point", &id(&p1), "--output", drill.to_str().unwrap()]);
    let refused = server.drctl(&["commit", "un"]);
    assert_eq!(refused.status.code(), Some(6), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("drctl test-failover-cleanup un"),
        "{refused:?}"
    );
    server.drctl_json(&["test-failover-cleanup", "un"]);
    // A change of point and a commit at once: one waits for the other, and the output is
    // the committed point's (W19-A: the commit went through while the disks were written,
    // leaving the output empty or at another point).
    let (url, admin, p1_id) = (server.url(), server.admin(), id(&p1));
    let change = {
        let p1_id = p1_id.clone();
        std::thread::spawn(move || drctl_as(&url, &admin, &["change-point", "un", "--point", &p1_id]))
    };
    let commit = server.drctl(&["commit", "un", "--json"]);
    let change = change.join().unwrap();
    let committed = if commit.status.success() {
        serde_json::from_slice::<serde_json::Value>(&commit.stdout).unwrap()["point"].to_string()
    } else {
        assert_eq!(commit.status.code(), Some(6), "{commit:?}");
        assert!(String::from_utf8_lossy(&commit.stderr).contains("being written already"), "{commit:?}");
        server.drctl_json(&["commit", "un"])["point"].to_string()
    };
    assert!(change.status.success() || change.status.code() == Some(6), "{change:?}");
    let want = if committed == p1_id { &h1 } else { &h2 };
    assert_eq!(&b3(&out.join("sda.raw"), None), want, "the output is the committed point's ({committed})");
    assert_eq!(server.status("un")["state"], "failover-committed");
    assert_eq!(server.drctl_json(&["points", "un"]).as_array().unwrap().len(), 0);
    let err = server.drctl_err(&["change-point", "un", "--point", "latest-processed"]);
    assert!(err.contains("failover-committed"), "{err}");
    let err = server.drctl_err(&["commit", "un"]);
    assert!(err.contains("failover-committed"), "{err}");
    let err =
        server.drctl_err(&["test-failover", "un", "--point", &p1_id, "--output", drill.to_str().unwrap()]);
    assert!(err.contains("points went with the commit") && err.contains("drctl reprotect un"), "{err}");
    // The output stays for the recovered VM.
    assert_eq!(&b3(&out.join("sda.raw"), None), want);
    let jobs = server.drctl_json(&["jobs"]);
    assert!(jobs.as_array().unwrap().iter().all(|j| j["state"] == "succeeded"), "{jobs}");
    let kinds: Vec<&str> = jobs.as_array().unwrap().iter().map(|j| j["kind"].as_str().unwrap()).collect();
    assert!(
        kinds.contains(&"initial-sync")
            && kinds.contains(&"unplanned-failover")
            && kinds.contains(&"change-point")
    );
    // What the jobs made is kept with them across a restart of the process server.
    server.kill9();
    server.start();
    assert_eq!(server.drctl_json(&["jobs"]), jobs);
}

#[test]
fn app_consistent_points_and_a_failing_freeze() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let log = root.join("hooks.log");
    let switch = root.join("freeze-fails");
    let freeze = format!("echo freeze >> {0}; test ! -e {1}", log.display(), switch.display());
    let thaw = format!("echo thaw >> {}", log.display());
    let (server, _agent, _disk) = setup(root, "app", &["--freeze", &freeze, "--thaw", &thaw], &[]);
    server.checkpoint("app");
    let p = server.drctl_json(&["checkpoint", "app", "--wait", "--app-consistent"]);
    assert_eq!(p["consistency"], "app");
    std::fs::write(&switch, b"").unwrap();
    let p = server.drctl_json(&["checkpoint", "app", "--wait", "--app-consistent"]);
    assert_eq!(p["consistency"], "crash");
    assert!(p["note"].as_str().unwrap().contains("freeze hook"), "{p}");
    let points = server.drctl_json(&["points", "app"]);
    assert!(
        points.as_array().unwrap().iter().any(|q| q["note"].as_str().is_some_and(|n| n.contains("freeze")))
    );
    let calls = std::fs::read_to_string(&log).unwrap();
    let freezes = calls.lines().filter(|l| *l == "freeze").count();
    let thaws = calls.lines().filter(|l| *l == "thaw").count();
    assert_eq!(freezes, 2, "{calls}");
    assert_eq!(thaws, freezes, "thaw ran after every freeze, failed or not: {calls}");
}

#[test]
fn retention_prunes_folds_and_respects_a_pinned_point() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // The server's clock is put forward through this file instead of sleeping.
    let clock = root.join("clock");
    std::fs::write(&clock, "0").unwrap();
    let mut server = Server::init(root);
    server.extra = ["--retention-every", "1s", "--segment-size", "256KiB"].map(String::from).to_vec();
    server.env = vec![("TERN_CLOCK_FILE".into(), clock.display().to_string())];
    server.start();
    let identity = root.join("ret.bundle");
    server.enroll_agent("ret", &identity);
    let disk = root.join("ret.img");
    make_ext4(&disk, 32, 11);
    let _agent = Agent::start(&server, &identity, "ret", &[("sda", &disk)], &root.join("ret-state"), &[]);
    server.wait_connected("ret");
    server.drctl_json(&["policy", "set", "ret", "--retention", "4s"]);
    assert_eq!(server.status("ret")["policy"]["retention"], "4s");
    let p1 = server.checkpoint("ret");
    let pinned_hash = b3(&disk, None);
    let pin_out = root.join("pinned");
    server.drctl_json(&["test-failover", "ret", "--point", &id(&p1), "--output", pin_out.to_str().unwrap()]);
    for seed in 0..3 {
        scatter_writes(&disk, 0.02, 50 + seed);
        server.checkpoint("ret");
    }
    // Five seconds later on the server's clock: every point is past the 4 s window.
    std::fs::write(&clock, "5000").unwrap();
    scatter_writes(&disk, 0.02, 60);
    let last = server.checkpoint("ret");
    // Wait for a retention pass that began after that point (on the server's clock).
    let real_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let after = i64::try_from(real_ms).unwrap() + 5000;
    deadline_poll("a retention pass", Duration::from_secs(20), || {
        (server.status("ret")["retention_last_run_ms"].as_i64()? > after).then_some(())
    });
    // The pinned point and everything after it stays while the test failover is open.
    let points = server.drctl_json(&["points", "ret"]);
    assert!(points.as_array().unwrap().iter().any(|p| p["id"] == p1["id"]), "{points}");
    server.drctl_json(&["test-failover-cleanup", "ret"]);
    deadline_poll("retention to prune", Duration::from_secs(20), || {
        let pts = server.drctl_json(&["points", "ret"]);
        (pts.as_array().unwrap().len() == 1).then_some(())
    });
    let points = server.drctl_json(&["points", "ret"]);
    assert_eq!(points[0]["id"], last["id"], "only the newest point is left");
    let log = server.log_text();
    assert!(log.contains("folded into the base image"), "segments were deleted: {}", tail(&log, 20));
    let v = server.drctl_json(&["verify", "ret"]);
    assert_eq!(v["ok"], true);
    let out = root.join("after");
    let res = server.drctl_json(&["test-failover", "ret", "--output", out.to_str().unwrap()]);
    assert_eq!(output_hash(&res), b3(&disk, None));
    assert_ne!(pinned_hash, b3(&disk, None));
}

/// The bytes of a VM's journal segments on the process server.
fn journal_bytes(server: &Server, vm: &str) -> u64 {
    let mut total = 0;
    for disk in std::fs::read_dir(server.data.join("vms").join(vm)).unwrap().flatten() {
        let Ok(segments) = std::fs::read_dir(disk.path().join("journal")) else { continue };
        for seg in segments.flatten() {
            if seg.path().extension().is_some_and(|e| e == "seg") {
                total += seg.metadata().unwrap().len();
            }
        }
    }
    total
}

/// `drctl policy set --max-journal`: a bound below two segments is refused saying the
/// least; within its window, a VM writing past the bound loses its oldest points, and its
/// journal comes back within the bound, the newest point recovering; `none` removes it.
#[test]
fn a_policy_bound_on_the_journal_prunes_points_ahead_of_their_window() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.extra = ["--retention-every", "1s", "--segment-size", "256KiB"].map(String::from).to_vec();
    server.start();
    let identity = root.join("big.bundle");
    server.enroll_agent("big", &identity);
    let disk = root.join("big.img");
    make_random(&disk, 16, 4, 21);
    let _agent = Agent::start(&server, &identity, "big", &[("sda", &disk)], &root.join("big-state"), &[]);
    server.wait_connected("big");
    let err = server.drctl_err(&["policy", "set", "big", "--max-journal", "300KiB"]);
    assert!(err.contains("at least 512.0 KiB") && err.contains("--segment-size"), "{err}");
    server.drctl_json(&["policy", "set", "big", "--max-journal", "1MiB"]);
    assert_eq!(server.status("big")["policy"]["max_journal_bytes"], 1 << 20);
    // `policy show` and `status VM` say it too.
    assert_eq!(server.drctl_json(&["policy", "show", "big"])["max_journal_bytes"], 1 << 20);
    for args in [&["policy", "show", "big"][..], &["status", "big"]] {
        let out = server.drctl(args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("journals at most 1.0 MiB"), "{args:?}: {out:?}");
    }
    let err = server.drctl_err(&["policy", "show", "nosuch"]);
    assert!(err.contains("nosuch"), "{err}");
    let first = server.checkpoint("big");
    // 6 x ~0.6 MiB of random pages: well past the bound, all within the day's window.
    for seed in 0..6 {
        scatter_writes(&disk, 0.04, 70 + seed);
        server.checkpoint("big");
    }
    deadline_poll("the journal back within its bound", Duration::from_secs(30), || {
        (journal_bytes(&server, "big") <= 1 << 20).then_some(())
    });
    let points = server.drctl_json(&["points", "big"]);
    let points = points.as_array().unwrap();
    assert!(points.len() < 7 && points.iter().all(|p| p["id"] != first["id"]), "{points:?}");
    let log = server.log_text();
    assert!(log.contains("ahead of the retention window"), "{}", tail(&log, 20));
    let out = root.join("after");
    let res = server.drctl_json(&["test-failover", "big", "--output", out.to_str().unwrap()]);
    assert_eq!(output_hash(&res), b3(&disk, None));
    server.drctl_json(&["test-failover-cleanup", "big"]);
    server.drctl_json(&["policy", "set", "big", "--max-journal", "none"]);
    assert_eq!(server.status("big")["policy"]["max_journal_bytes"], serde_json::Value::Null);
}

/// An agent whose host clock is a year ahead (faketime) dates its points on the process
/// server's clock, and the server says the agent's clock is off (W18: such a point stayed
/// inside the retention window for good, and retention stopped at it).
#[test]
fn an_agent_whose_clock_is_a_year_ahead_has_its_points_dated_by_the_server() {
    use std::process::Command;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("skew.bundle");
    server.enroll_agent("skew", &identity);
    let disk = root.join("skew.img");
    make_random(&disk, 4, 1, 31);
    let log = std::fs::File::create(root.join("skew.log")).unwrap();
    // faketime's library itself: the faketime command runs its program as a child, which a
    // kill of it leaves running.
    let lib = ["x86_64-linux-gnu", "aarch64-linux-gnu"]
        .map(|a| format!("/usr/lib/{a}/faketime/libfaketime.so.1"))
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("libfaketime (Debian: faketime)");
    let mut agent = Some(
        Command::new(bin("mobility-agent"))
            .env("LD_PRELOAD", lib)
            .env("FAKETIME", "+365d")
            .args(["run", "--server", &server.url(), "--identity"])
            .arg(&identity)
            .args(["--vm", "skew", "--interval", "1h", "--state-dir"])
            .arg(root.join("skew-state"))
            .arg(format!("--disk=sda={}", disk.display()))
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let year = String::from_utf8(Command::new("date").args(["-u", "+%Y"]).output().unwrap().stdout).unwrap();
    let p = server.checkpoint("skew");
    let time = p["time"].as_str().unwrap();
    assert!(time.starts_with(year.trim()), "point dated {time}, this year is {year}");
    let log = server.log_text();
    assert!(log.contains("the agent's clock is ahead of this server's by"), "{}", tail(&log, 20));
    kill9(&mut agent);
}

#[test]
fn freeze_fs_freezes_a_mounted_file_system_around_app_points() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // A real ext4 file system on a loop device: the VM's disk is the image under the mount.
    let disk = root.join("fs.img");
    make_ext4(&disk, 32, 71);
    let fs = Mounted::new(&disk, &root.join("mnt"), &["-o", "loop"]);
    let mnt = fs.dir.clone();
    std::fs::write(mnt.join("hello.txt"), b"written before the point").unwrap();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("fz.bundle");
    server.enroll_agent("fz", &identity);
    // The loop device keeps touching the image, so only a frozen scan is a consistent cut.
    let _agent = Agent::start(
        &server,
        &identity,
        "fz",
        &[("sda", &disk)],
        &root.join("st"),
        &["--freeze", "sync", "--freeze-fs", mnt.to_str().unwrap()],
    );
    server.wait_connected("fz");
    server.checkpoint("fz");
    let p = server.drctl_json(&["checkpoint", "fz", "--wait", "--app-consistent"]);
    assert_eq!(p["consistency"], "app", "{p}");
    // Thawed again afterwards: the file system takes writes.
    std::fs::write(mnt.join("after.txt"), b"written after the point").unwrap();
    let out = root.join("out");
    let res =
        server.drctl_json(&["test-failover", "fz", "--point", &id(&p), "--output", out.to_str().unwrap()]);
    // The output is a clean file system holding the file written before the point.
    let fsck = std::process::Command::new("e2fsck").args(["-fn"]).arg(out.join("sda.raw")).output().unwrap();
    assert!(fsck.status.success(), "e2fsck: {}", String::from_utf8_lossy(&fsck.stdout));
    let cat = std::process::Command::new("debugfs")
        .args(["-R", "cat /hello.txt"])
        .arg(out.join("sda.raw"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "written before the point");
    assert_eq!(res["consistency"], "app");
}

/// `--freeze-fs` naming a directory that is not a mount point (a mount that failed) is
/// never frozen: FIFREEZE on it would freeze the file system it lies on (the host's `/`).
/// The point is crash-consistent and says why. The directory here lies on a loop-mounted
/// ext4, so a freeze that got through would freeze that, and the point would say `app`.
#[test]
fn freeze_fs_refuses_a_directory_that_is_not_a_mount_point() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let disk = root.join("fs.img");
    make_ext4(&disk, 16, 73);
    let fs = Mounted::new(&disk, &root.join("mnt"), &["-o", "loop"]);
    let sub = fs.dir.join("db-not-mounted");
    std::fs::create_dir(&sub).unwrap();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("nm.bundle");
    server.enroll_agent("nm", &identity);
    let agent = Agent::start(
        &server,
        &identity,
        "nm",
        &[("sda", &disk)],
        &root.join("st"),
        &["--freeze-fs", sub.to_str().unwrap()],
    );
    server.wait_connected("nm");
    server.checkpoint("nm");
    let p = server.drctl_json(&["checkpoint", "nm", "--wait", "--app-consistent"]);
    assert_eq!(p["consistency"], "crash", "{p}");
    assert!(p["note"].as_str().unwrap().contains("not a mount point"), "{p}");
    assert!(agent.log_text().contains("names no mount point"), "warned at start");
    std::fs::write(sub.join("after.txt"), b"the file system takes writes").unwrap();
}

/// An agent killed while the VM was quiesced (no thaw ran) leaves its marker in the state
/// directory: the next start thaws the file systems and runs the thaw command, instead of
/// leaving the VM's file system frozen for good.
#[test]
fn an_agent_killed_while_frozen_thaws_when_it_starts_again() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let disk = root.join("fs.img");
    make_ext4(&disk, 16, 72);
    let fs = Mounted::new(&disk, &root.join("mnt"), &["-o", "loop"]);
    let mnt = fs.dir.clone();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("kf.bundle");
    server.enroll_agent("kf", &identity);
    // What a kill inside the window leaves: the file system frozen, the marker written.
    let state = root.join("st");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("frozen"), format!("freeze-command\n{}\n", mnt.display())).unwrap();
    let froze = std::process::Command::new("fsfreeze").arg("-f").arg(&mnt).status().unwrap();
    assert!(froze.success());
    let thawed_flag = root.join("thawed");
    let thaw = format!("touch {}", thawed_flag.display());
    let agent = Agent::start(
        &server,
        &identity,
        "kf",
        &[("sda", &disk)],
        &state,
        &["--freeze", "true", "--thaw", &thaw, "--freeze-fs", mnt.to_str().unwrap()],
    );
    deadline_poll("the agent to undo the last run's freeze", Duration::from_secs(30), || {
        agent.log_text().contains("its freeze is undone").then_some(())
    });
    // Not frozen any more: fsfreeze -u finds nothing to thaw (and would thaw it otherwise).
    let unfreeze = std::process::Command::new("fsfreeze").arg("-u").arg(&mnt).output().unwrap();
    assert!(!unfreeze.status.success(), "the file system was still frozen");
    assert!(thawed_flag.exists(), "the thaw command ran");
    assert!(!state.join("frozen").exists(), "the marker is gone");
    // And the agent goes on: an app-consistent point freezes and thaws as before.
    let p = server.drctl_json(&["checkpoint", "kf", "--wait", "--app-consistent"]);
    assert_eq!(p["consistency"], "app", "{p}");
    std::fs::write(mnt.join("after.txt"), b"the file system takes writes").unwrap();
    assert!(!state.join("frozen").exists(), "removed after each thaw");
}

/// Changes of point started together write the failover's disks one at a time: the others
/// are refused at once, saying which job writes (W16: two at once both failed, one removing
/// the other's file, and the output was gone until a third ran alone).
#[test]
fn changes_of_point_started_together_are_one_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (server, mut agent, disk) = setup(root, "cc", &[], &[]);
    let p1 = server.checkpoint("cc");
    let h1 = b3(&disk, None);
    scatter_writes(&disk, 0.05, 43);
    server.checkpoint("cc");
    agent.kill9();
    let out = root.join("failover");
    server.drctl_json(&["failover", "cc", "--kind", "unplanned", "--output", out.to_str().unwrap()]);
    let (url, admin) = (server.url(), server.admin());
    let p1 = id(&p1);
    let outs: Vec<std::process::Output> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..3)
            .map(|_| s.spawn(|| drctl_as(&url, &admin, &["change-point", "cc", "--point", &p1, "--json"])))
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let mut done = 0;
    for o in &outs {
        if o.status.success() {
            done += 1;
            continue;
        }
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(6), "{err}");
        assert!(err.contains("being written already") && err.contains("nothing changed"), "{err}");
    }
    assert!(done >= 1, "{outs:?}");
    assert_eq!(b3(&out.join("sda.raw"), None), h1);
    let jobs = server.drctl_json(&["jobs"]);
    assert!(jobs.as_array().unwrap().iter().all(|j| j["state"] == "succeeded"), "{jobs}");
    let s = server.status("cc");
    assert_ne!(s["health"], "critical", "{s}");
}

/// Disks that keep changing through every pass, without a freeze hook, make no point: after
/// a few scheduled points missed in a row status says so and why (W16: normal until the RPO
/// threshold), and the next point made clears it.
#[test]
fn points_missed_in_a_row_on_busy_disks_are_shown() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (server, _agent, disk) = setup(root, "busy", &[], &[]);
    server.checkpoint("busy");
    server.drctl_json(&["policy", "set", "busy", "--crash-interval", "1s"]);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
            let mut page = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all_at(&[page as u8; 4096], (page % 4096) * 4096).unwrap();
                page += 7;
                std::thread::sleep(Duration::from_micros(300));
            }
        });
        let s = deadline_poll("the missed points in status", Duration::from_secs(60), || {
            let s = server.status("busy");
            s["error"].as_str().is_some_and(|e| e.contains("missed in a row")).then_some(s)
        });
        let why = s["error"].as_str().unwrap();
        assert!(why.contains("the agent makes no point") && why.contains("--freeze"), "{s}");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    deadline_poll("a point to clear it", Duration::from_secs(30), || {
        server.status("busy")["error"].is_null().then_some(())
    });
    let p = server.checkpoint("busy");
    crate::faults::assert_point_recovers(&server, root, "busy", &p, &b3(&disk, None));
}
