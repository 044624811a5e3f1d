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
    // Coarse first: the server sent one block hash per 64 KiB block (33 bytes, not the 544
    // of block + page hashes), then the page hashes of just the blocks that differ.
    let log = server.log_text();
    let table: u64 = log
        .lines()
        .filter(|l| l.contains("block hashes sent for a delta sync"))
        .map(|l| l.split("bytes=").nth(1).unwrap().trim().parse::<u64>().unwrap())
        .sum();
    assert!(table <= 33 * 1024, "the block hash table took {table} bytes for 1,024 blocks");
    assert!(
        log.contains("page hashes sent for a delta sync"),
        "the agent asked for the pages of differing blocks"
    );
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

/// Bit rot in the process server's journal (not a crash): a record before the last point
/// is damaged while the server is down. At restart the points that needed it are removed
/// (one that did not stays and still verifies), the error is logged, and the agent, whose
/// saved state no longer counts, compares block hashes and resends what was lost; the next
/// point verifies byte for byte.
#[test]
fn a_damaged_journal_drops_the_points_it_cannot_rebuild_and_the_agent_resyncs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("rot.bundle");
    server.enroll_agent("rot", &identity);
    let disk = root.join("rot.img");
    make_ext4(&disk, 48, 3);
    let mut agent = Agent::start(&server, &identity, "rot", &[("sda", &disk)], &root.join("st"), &[]);
    let p1 = server.checkpoint("rot");
    let want1 = b3(&disk, None);
    scatter_writes(&disk, 0.02, 11);
    let p2 = server.checkpoint("rot");
    agent.kill9();
    server.kill9();

    // Flip one payload byte of the first record after point 1's bookmark.
    let dir = server.data.join("vms/rot/sda/journal");
    let segs = segment_files(&dir);
    let seg = segs.last().unwrap();
    let mut bytes = std::fs::read(seg).unwrap();
    let mark = format!("{{\"point\":{}", p1["id"]);
    let bm = bytes.windows(mark.len()).position(|w| w == mark.as_bytes()).expect("point 1's bookmark");
    let rec = bm + bytes[bm..].windows(4).position(|w| w == b"TRNR").expect("a record after point 1");
    bytes[rec + 80 + 2] ^= 0x10;
    std::fs::write(seg, &bytes).unwrap();

    server.start();
    let ids: Vec<u64> = server
        .drctl_json(&["points", "rot"])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert!(ids.contains(&p1["id"].as_u64().unwrap()), "point 1 lies before the damage: {ids:?}");
    assert!(!ids.contains(&p2["id"].as_u64().unwrap()), "point 2 needed the lost records: {ids:?}");
    assert!(server.log_text().contains("the journal lost acknowledged records"));
    let out = root.join("p1");
    let res = server.drctl_json(&[
        "test-failover",
        "rot",
        "--point",
        &p1["id"].to_string(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), want1);
    server.drctl_json(&["test-failover-cleanup", "rot"]);

    agent.restart();
    let p3 = server.checkpoint("rot");
    assert!(agent.log_text().contains("comparing with the server's block hashes"));
    let out = root.join("p3");
    let res = server.drctl_json(&[
        "test-failover",
        "rot",
        "--point",
        &p3["id"].to_string(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), b3(&disk, None));
}

/// The process server's data directory fills up during an initial sync: the daemon stays
/// up and says so (`drctl status`: health critical and the reason), nothing stored is
/// damaged, and once there is room the agent's retries go on where they stopped and the
/// point verifies byte for byte.
#[test]
fn a_full_data_directory_is_reported_and_replication_resumes_once_there_is_room() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let tmpfs = Tmpfs::mount(&root.join("ps"), "size=24m");
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("full.bundle");
    server.enroll_agent("full", &identity);
    let disk = root.join("full.img");
    // 40 MiB of incompressible data: more than the 24 MiB the server has.
    make_random(&disk, 48, 40, 21);
    let mut agent = Agent::start(&server, &identity, "full", &[("sda", &disk)], &root.join("st"), &[]);
    let s = deadline_poll("the server to report its storage full", Duration::from_secs(60), || {
        // Until the agent's first session the VM is unknown.
        let out = server.drctl(&["status", "full", "--json"]);
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        s["error"].as_str().is_some_and(|e| e.contains("storage is full")).then_some(s)
    });
    assert_eq!(s["health"], "critical", "{s}");
    let table = server.drctl(&["status"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("full: critical: "));
    assert!(server.child.as_mut().unwrap().try_wait().unwrap().is_none(), "the process server stays up");
    deadline_poll("the agent to be told why", Duration::from_secs(60), || {
        agent.log_text().contains("storage is full").then_some(())
    });

    tmpfs.remount("size=256m");
    let p = server.checkpoint("full");
    let out = root.join("out");
    let res = server.drctl_json(&[
        "test-failover",
        "full",
        "--point",
        &p["id"].to_string(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), b3(&disk, None));
    // The failure stays on show a little while after replication goes on, then clears.
    deadline_poll("the error to clear", Duration::from_secs(60), || {
        let s = server.status("full");
        (s["error"].is_null() && s["health"] == "normal").then_some(())
    });
    agent.kill9();
}

/// The data directory fills while points are kept, so that nothing can be written until
/// retention folds old points into the base image, which itself needs room before it frees
/// any: the space reserve is given up for it, the fold goes one segment at a time, new
/// records wait meanwhile, and once retention has freed space the reserve is set aside
/// again and replication goes on, byte for byte.
#[test]
fn a_full_data_directory_frees_itself_by_retention_with_the_space_reserve() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (mut server, _tmpfs, clock) = server_on_a_small_tmpfs(root, "90m");
    let reserve = server.data.join("space-reserve");
    assert_eq!(std::fs::metadata(&reserve).unwrap().len(), 4 << 20);
    let identity = root.join("fill.bundle");
    server.enroll_agent("fill", &identity);
    let disk = root.join("fill.img");
    // An empty 32 MiB disk: its first point leaves the base image empty.
    make_random(&disk, 32, 0, 0);
    let mut agent = Agent::start(&server, &identity, "fill", &[("sda", &disk)], &root.join("st"), &[]);
    server.wait_connected("fill");
    server.drctl_json(&["policy", "set", "fill", "--retention", "30m"]);
    server.checkpoint("fill");
    // 16 MiB of incompressible data into one half of the disk or the other, in turn: five
    // points hold about 80 MiB of journal on the 90 MiB file system, a sixth does not fit.
    let fill_half = |round: u64| {
        use rand::{RngCore, SeedableRng};
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(40 + round);
        let mut buf = vec![0u8; 1 << 20];
        let half = round % 2;
        for mib in half * 16..(half + 1) * 16 {
            rng.fill_bytes(&mut buf);
            f.write_all_at(&buf, mib << 20).unwrap();
        }
    };
    let mut last = serde_json::Value::Null;
    for round in 0..5 {
        fill_half(round);
        last = server.checkpoint("fill");
    }
    let at_last = b3(&disk, None);
    fill_half(5);
    server.drctl_json(&["checkpoint", "fill"]);
    deadline_poll("the server to report its storage full", Duration::from_secs(60), || {
        server.status("fill")["error"].as_str().is_some_and(|e| e.contains("storage is full")).then_some(())
    });
    assert!(reserve.exists(), "nothing gives the reserve up but retention");
    // A point asked for now is refused for the full storage, not blamed on the agent.
    let err = server.drctl_err(&["checkpoint", "fill", "--wait"]);
    assert!(err.contains("storage is full"), "{err}");
    // Verify has no room for its scratch copy: said, and no verdict against the point.
    let err = server.drctl_err(&["verify", "fill"]);
    assert!(err.contains("cannot verify"), "{err}");
    let s = server.status("fill");
    assert!(!s["error"].as_str().unwrap_or_default().contains("does not recover"), "{s}");
    // A test failover is not refused for want of a few KiB for its catalog rows (W16: a
    // full catalog refused every failover while the reserve sat there): the reserve is
    // given up for them, and new records still wait for room.
    let out = root.join("out-full");
    let id = last["id"].to_string();
    let res =
        server.drctl_json(&["test-failover", "fill", "--point", &id, "--output", out.to_str().unwrap()]);
    assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), at_last);
    assert!(!reserve.exists(), "given up for the test failover");
    assert!(server.log_text().contains("given up for the catalog rows of a test-failover job"));
    server.drctl_json(&["test-failover-cleanup", "fill"]);
    // A server killed on a full file system starts again (opening writes nothing) and
    // answers. (Its agent's sessions end at once while it is full: no wait for one.)
    server.kill9();
    server.start();
    assert_eq!(server.status("fill")["state"], "protected");
    // An hour later on the server's clock, every point but the newest is past the window:
    // the records up to it are folded into the base image, which has 32 MiB to allocate on
    // a full file system before the third round's overwrites free any, and their segments
    // deleted.
    std::fs::write(&clock, "3600000").unwrap();
    let p = server.checkpoint("fill");
    // The fold runs in the server's retention pass, beside the session: the point may be
    // made (with room the released reserve gave) before the fold has logged its work.
    deadline_poll("retention to fold the journal", Duration::from_secs(60), || {
        server.log_text().contains("folded into the base image").then_some(())
    });
    deadline_poll("the reserve to be set aside again", Duration::from_secs(30), || {
        std::fs::metadata(&reserve).is_ok_and(|m| m.len() == 4 << 20).then_some(())
    });
    let out = root.join("out");
    let res = server.drctl_json(&[
        "test-failover",
        "fill",
        "--point",
        &p["id"].to_string(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), b3(&disk, None));
    agent.kill9();
}

/// A data directory close to full is a warning before any write fails (W16: health stayed
/// normal on a file system 100 % full until a record could not be written), and the
/// warning goes once there is room again.
#[test]
fn a_data_directory_close_to_full_is_a_warning_before_a_write_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (server, _tmpfs, _clock) = server_on_a_small_tmpfs(root, "48m");
    let identity = root.join("low.bundle");
    server.enroll_agent("low", &identity);
    let disk = root.join("low.img");
    make_random(&disk, 8, 2, 5);
    let mut agent = Agent::start(&server, &identity, "low", &[("sda", &disk)], &root.join("st"), &[]);
    server.wait_connected("low");
    server.checkpoint("low");
    assert_eq!(server.status("low")["health"], "normal");
    // Leave 1 MiB free, less than the space reserve (4 MiB asked, a twentieth of the 48 MiB
    // file system given).
    let out =
        std::process::Command::new("stat").args(["-f", "-c", "%a %S"]).arg(&server.data).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut it = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
    let free = it.next().unwrap() * it.next().unwrap();
    let filler = server.data.join("filler");
    let f = std::fs::File::create(&filler).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![1u8; (free - (1 << 20)) as usize], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let s = deadline_poll("the warning", Duration::from_secs(10), || {
        let s = server.status("low");
        (s["health"] == "warning").then_some(s)
    });
    let why = s["error"].as_str().unwrap();
    assert!(why.contains("bytes free, less than its space reserve"), "{s}");
    let checked = server.drctl(&["status", "low", "--check"]);
    assert_eq!(checked.status.code(), Some(1), "a warning: {checked:?}");
    std::fs::remove_file(&filler).unwrap();
    deadline_poll("the warning to go", Duration::from_secs(10), || {
        (server.status("low")["health"] == "normal").then_some(())
    });
    agent.kill9();
}

/// An agent whose state directory is full when it must make its state is this host's
/// trouble, not a refusal: it keeps trying (exit 3 stopped it for good, as its unit does
/// not restart 3) and protects the VM once there is room. `drctl status` says so (W15:
/// only the agent's log did), and says so when a point's state cannot be saved.
#[test]
fn an_agent_with_a_full_state_directory_waits_for_room() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let state = root.join("st");
    let _tmpfs = Tmpfs::mount(&state, "size=1m");
    // Fill it: nothing more can be written there.
    let filler = state.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let _ = std::io::Write::write_all(&mut f, &vec![0u8; 2 << 20]);
    drop(f);
    let identity = root.join("st.bundle");
    server.enroll_agent("st", &identity);
    let disk = root.join("st.img");
    make_random(&disk, 16, 4, 61);
    let mut agent = Agent::start(&server, &identity, "st", &[("sda", &disk)], &state, &[]);
    deadline_poll("the agent to say its state directory is full", Duration::from_secs(60), || {
        agent.log_text().contains("agent state directory").then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(agent.child.as_mut().unwrap().try_wait().unwrap().is_none(), "{}", agent.log_text());
    // `drctl status` says it too (only the agent's log did), as a warning.
    let cannot_write = |what: &str| {
        deadline_poll(what, Duration::from_secs(60), || {
            let s = server.status("st");
            s["error"].as_str().is_some_and(|e| e.contains("the agent cannot write its state")).then_some(s)
        })
    };
    let status = cannot_write("status to say the state directory is full");
    assert_eq!(status["health"], "warning", "{status}");
    assert!(status["error"].as_str().unwrap().contains("free space in its state directory"), "{status}");
    std::fs::remove_file(&filler).unwrap();
    let p = server.checkpoint("st");
    crate::faults::assert_point_recovers(&server, root, "st", &p, &b3(&disk, None));
    let status = server.status("st");
    assert!(status["error"].is_null() && status["health"] == "normal", "{status}");
    // Full again, and a page written where the disk had none: the table's new entry cannot
    // be written when the point is acked. The point is whole; status says what is wrong.
    let mut f = std::fs::File::create(&filler).unwrap();
    let _ = std::io::Write::write_all(&mut f, &vec![0u8; 2 << 20]);
    drop(f);
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::File::options().write(true).open(&disk).unwrap(),
        &page,
        12 << 20,
    )
    .unwrap();
    let p = server.checkpoint("st");
    let status = cannot_write("status to say the state cannot be saved");
    assert_eq!(status["health"], "warning", "{status}");
    crate::faults::assert_point_recovers(&server, root, "st", &p, &b3(&disk, None));
    // Room again: the agent starts a new state by itself (its failed table was never
    // written again in that session) and the warning goes.
    std::fs::remove_file(&filler).unwrap();
    deadline_poll("the warning to go", Duration::from_secs(60), || {
        let s = server.status("st");
        (s["error"].is_null() && s["health"] == "normal").then_some(())
    });
    assert!(agent.log_text().contains("takes writes again: reconnecting to start a new state"));
    let p = server.checkpoint("st");
    crate::faults::assert_point_recovers(&server, root, "st", &p, &b3(&disk, None));
    agent.kill9();
}
