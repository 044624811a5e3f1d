//! Protecting a block device whose file system is mounted and written (the in-guest case).

use crate::harness::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

/// A database committing continuously on ext4 on a loop device; the agent protects the
/// device (not the image) with `--freeze-fs`. Every point's image replays its journal,
/// mounts, passes `PRAGMA integrity_check` and holds every transaction committed before the
/// point was asked for. Buffered reads of the device saw its page cache, which the file
/// system's writes bypass: the points held the database as of the first scan.
#[test]
fn a_database_on_a_mounted_block_device_is_in_every_point() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let image = root.join("guest.img");
    make_ext4(&image, 48, 111);
    let device = LoopDevice::attach(&image);
    let mnt = Mounted::new(&device.dev, &root.join("mnt"), &[]);
    let committed = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, c, s) = (mnt.dir.join("app.db"), committed.clone(), stop.clone());
        std::thread::spawn(move || sqlite_writer(&db, &c, &s))
    };
    deadline_poll("the first commits", Duration::from_secs(10), || {
        (committed.load(Ordering::Acquire) > 50).then_some(())
    });

    let mut server = Server::init(root);
    server.start();
    let identity = root.join("db.bundle");
    server.enroll_agent("db", &identity);
    let _agent = Agent::start(
        &server,
        &identity,
        "db",
        &[("sda", &device.dev)],
        &root.join("st"),
        &["--freeze-fs", mnt.dir.to_str().unwrap()],
    );
    server.wait_connected("db");
    for round in 0..3 {
        // Let the database grow between points, so that stale blocks would show.
        let floor = committed.load(Ordering::Acquire) + 200;
        deadline_poll("more commits", Duration::from_secs(30), || {
            (committed.load(Ordering::Acquire) > floor).then_some(())
        });
        let before = committed.load(Ordering::Acquire);
        let p = server.checkpoint("db");
        let out = root.join(format!("point-{round}"));
        server.drctl_json(&[
            "test-failover",
            "db",
            "--point",
            &p["id"].to_string(),
            "--output",
            out.to_str().unwrap(),
        ]);
        let what = format!("point {round}");
        check_database_image(&out.join("sda.raw"), &root.join(format!("m{round}")), before, &what);
        server.drctl_json(&["test-failover-cleanup", "db"]);
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
}

/// A block device without a freeze hook could never give a consistent cut (no change
/// signal): the agent refuses it at start and says what to give.
#[test]
fn a_block_device_without_a_freeze_hook_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let image = root.join("bare.img");
    make_random(&image, 8, 1, 201);
    let device = LoopDevice::attach(&image);
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("bare.bundle");
    server.enroll_agent("bare", &identity);
    let mut agent = Agent::start(&server, &identity, "bare", &[("sda", &device.dev)], &root.join("st"), &[]);
    let status = agent.wait_exit("the agent to refuse the device");
    assert_eq!(status.code(), Some(2), "a configuration no restart mends");
    assert!(agent.log_text().contains("is a block device") && agent.log_text().contains("--freeze-fs"));

    // A freeze that always fails (here --freeze-fs names no mount point): no point can be
    // made, and status says why instead of normal; the scan is not repeated unfrozen.
    let mut agent = Agent::start(
        &server,
        &identity,
        "bare",
        &[("sda", &device.dev)],
        &root.join("st"),
        &["--freeze-fs", root.to_str().unwrap()],
    );
    server.wait_connected("bare");
    server.drctl_json(&["policy", "set", "bare", "--crash-interval", "1s"]);
    let s = deadline_poll("status to say why no point is made", Duration::from_secs(60), || {
        let s = server.status("bare");
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("makes no point") && e.contains("freeze failed"))
            .then_some(s)
    });
    assert_ne!(s["health"], "normal", "{s}");
    assert!(!agent.log_text().contains("attempt=2"), "{}", tail(&agent.log_text(), 20));
    agent.kill9();
}
