//! Every listed point recovers: faults mid-pass, two agents for one VM, and the like.

use crate::harness::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
enum Cut {
    AgentKill,
    ServerKill,
    Link,
}

impl Cut {
    fn make(self, agent: &mut Agent, server: &mut Server, proxy: &Proxy) {
        match self {
            Cut::AgentKill => agent.kill9(),
            Cut::ServerKill => server.kill9(),
            Cut::Link => proxy.cut(),
        }
    }

    /// What `make` cut comes back.
    fn mend(self, agent: &mut Agent, server: &mut Server, proxy: &Proxy) {
        match self {
            Cut::AgentKill => agent.restart(),
            Cut::ServerKill => server.start(),
            Cut::Link => proxy.up(),
        }
    }
}

fn durable_seq(server: &Server, vm: &str) -> u64 {
    server.status(vm)["disks"][0]["durable_seq"].as_u64().unwrap_or(0)
}

fn read_page(disk: &Path, page: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    std::fs::File::open(disk).unwrap().read_exact_at(&mut buf, page * 4096).unwrap();
    buf
}

fn write_at(disk: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

/// `drctl verify` of a point, and a test failover of it equals `want` (BLAKE3 of the disk).
pub(crate) fn assert_point_recovers(
    server: &Server,
    root: &Path,
    vm: &str,
    point: &serde_json::Value,
    want: &str,
) {
    let id = point["id"].to_string();
    let v = server.drctl_json(&["verify", vm, "--point", &id]);
    assert_eq!(v["ok"], true, "point {id} does not verify: {v}");
    let out = root.join(format!("tfo-{vm}-{id}"));
    let res = server.drctl_json(&["test-failover", vm, "--point", &id, "--output", out.to_str().unwrap()]);
    assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), want, "point {id}");
    server.drctl_json(&["test-failover-cleanup", vm]);
}

/// Point P1; the VM changes page 10; a pass starts and sends it; the pass is cut; the VM
/// writes page 10 back to its value at P1; replication resumes. The records the cut pass
/// left in the journal must not pass for the disk: the next point recovers byte for byte.
fn a_cut_pass_then_a_page_written_back(cut: Cut) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let proxy = Proxy::start(server.port);
    let identity = root.join("cut.bundle");
    server.enroll_agent("cut", &identity);
    let disk = root.join("cut.img");
    make_random(&disk, 64, 2, 131);
    let mut agent = Agent::start_at(
        &proxy.url(),
        &identity,
        "cut",
        &[("sda", &disk)],
        &root.join("st"),
        &["--max-rate", "2MiB"],
    );
    server.wait_connected("cut");
    server.checkpoint("cut");
    let at_p1 = read_page(&disk, 10);
    let mut noise = vec![0u8; 6 << 20];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut noise);
    write_at(&disk, 10 * 4096, &noise[..4096]);
    write_at(&disk, 32 << 20, &noise);
    let before = durable_seq(&server, "cut");
    server.drctl_json(&["checkpoint", "cut"]);
    // Page 10 goes first (passes go in offset order); cut once it is durable.
    deadline_poll("the pass to send page 10", Duration::from_secs(30), || {
        (durable_seq(&server, "cut") >= before + 2).then_some(())
    });
    cut.make(&mut agent, &mut server, &proxy);
    write_at(&disk, 10 * 4096, &at_p1);
    cut.mend(&mut agent, &mut server, &proxy);
    let p2 = server.checkpoint("cut");
    assert_point_recovers(&server, root, "cut", &p2, &b3(&disk, None));
}

#[test]
fn a_pass_cut_by_an_agent_kill_then_a_page_written_back() {
    a_cut_pass_then_a_page_written_back(Cut::AgentKill);
}

#[test]
fn a_pass_cut_by_a_process_server_kill_then_a_page_written_back() {
    a_cut_pass_then_a_page_written_back(Cut::ServerKill);
}

#[test]
fn a_pass_cut_by_a_dropped_connection_then_a_page_written_back() {
    a_cut_pass_then_a_page_written_back(Cut::Link);
}

/// An initial sync cut midway goes on from what the server acked: the agent saved its
/// state at it during the pass, so the server sends no block hashes (it would hash all it
/// received, on every reconnect) and the next point recovers byte for byte.
fn an_initial_sync_cut_midway(cut: Cut) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let proxy = Proxy::start(server.port);
    let identity = root.join("init.bundle");
    server.enroll_agent("init", &identity);
    let disk = root.join("init.img");
    make_random(&disk, 24, 24, 57);
    let mut agent = Agent::start_at(
        &proxy.url(),
        &identity,
        "init",
        &[("sda", &disk)],
        &root.join("st"),
        &["--max-rate", "4MiB", "--save-every", "500ms"],
    );
    // Random data travels as a record per 64 KiB block: half the disk is durable, and
    // saved at least once by then.
    deadline_poll("half the initial sync", Duration::from_secs(30), || {
        (durable_seq(&server, "init") >= 12 * 16).then_some(())
    });
    // The pass says how far it has read, every 2 s.
    let at = deadline_poll("the pass's report", Duration::from_secs(10), || {
        server.status("init")["disks"][0]["pass_offset"].as_u64()
    });
    assert!(at > 0 && at <= 24 << 20, "{at}");
    if matches!(cut, Cut::Link) {
        let text = String::from_utf8_lossy(&server.drctl(&["status", "init"]).stdout).to_string();
        assert!(text.contains("tracking scan, pass at "), "{text}");
    }
    cut.make(&mut agent, &mut server, &proxy);
    if !matches!(cut, Cut::ServerKill) {
        // The sync's job waits for the agent with its progress kept (it was one job per
        // session, failed at its end, each starting again from 0).
        let job = deadline_poll("the job waiting for the agent", Duration::from_secs(30), || {
            let jobs = server.drctl_json(&["jobs"]);
            let j = jobs.as_array().unwrap().iter().find(|j| j["kind"] == "initial-sync").cloned();
            j.filter(|j| j["phase"].as_str().unwrap().contains("waiting for the agent to reconnect"))
        });
        assert_eq!(job["state"], "running", "{job}");
        assert!(job["done"].as_u64().unwrap() >= 12 << 20, "progress lost: {job}");
    }
    if matches!(cut, Cut::AgentKill) {
        // A sync that gets no further while its sessions end says so, past the threshold.
        server.drctl_json(&["policy", "set", "init", "--rpo-threshold", "1s"]);
        let status = deadline_poll("the stalled sync in status", Duration::from_secs(30), || {
            let s = server.status("init");
            s["error"].as_str().is_some_and(|e| e.contains("initial sync has not got further")).then_some(s)
        });
        assert_eq!(status["health"], "critical", "{status}");
    }
    let before = agent.log_text().len();
    cut.mend(&mut agent, &mut server, &proxy);
    let p1 = server.checkpoint("init");
    // One job from the first session to the first point; a process server restarted
    // midway fails the one it was running (interrupted) and follows the sync with another.
    let jobs = server.drctl_json(&["jobs"]);
    let syncs: Vec<_> = jobs.as_array().unwrap().iter().filter(|j| j["kind"] == "initial-sync").collect();
    let want = if matches!(cut, Cut::ServerKill) { 2 } else { 1 };
    assert_eq!(syncs.len(), want, "{jobs}");
    assert_eq!(syncs.last().unwrap()["state"], "succeeded", "{jobs}");
    // No pass runs now: none is shown.
    let status = server.status("init");
    assert!(status["disks"][0]["pass_offset"].is_null(), "{status}");
    let log = agent.log_text()[before..].to_string();
    assert!(
        !log.contains("comparing with the server's block hashes") && !log.contains("sent again"),
        "the sync started over after the cut: {}",
        tail(&log, 20)
    );
    assert!(
        log.contains("saved state matches the server's copy") || log.contains("records past the saved state"),
        "the agent did not go on from its saved state: {}",
        tail(&log, 20)
    );
    assert_point_recovers(&server, root, "init", &p1, &b3(&disk, None));
}

#[test]
fn an_initial_sync_cut_by_an_agent_kill_goes_on_from_what_was_acked() {
    an_initial_sync_cut_midway(Cut::AgentKill);
}

#[test]
fn an_initial_sync_cut_by_a_process_server_kill_goes_on_from_what_was_acked() {
    an_initial_sync_cut_midway(Cut::ServerKill);
}

#[test]
fn an_initial_sync_cut_by_a_dropped_connection_goes_on_from_what_was_acked() {
    an_initial_sync_cut_midway(Cut::Link);
}

/// A sync cut before its first save goes on by comparing with the server's block hashes;
/// that session saves too once it is past what the server held, so a second cut goes on
/// from its saved state.
#[test]
fn an_initial_sync_cut_before_its_first_save_saves_once_past_what_the_server_held() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("init.bundle");
    server.enroll_agent("init", &identity);
    let disk = root.join("init.img");
    make_random(&disk, 24, 24, 58);
    let start = |save_every: &str| {
        Agent::start(
            &server,
            &identity,
            "init",
            &[("sda", &disk)],
            &root.join("st"),
            &["--max-rate", "4MiB", "--save-every", save_every],
        )
    };
    let mut first = start("1h");
    deadline_poll("4 MiB of the initial sync", Duration::from_secs(30), || {
        (durable_seq(&server, "init") >= 4 * 16).then_some(())
    });
    first.kill9();
    let mut second = start("300ms");
    deadline_poll("16 MiB of the initial sync", Duration::from_secs(30), || {
        (durable_seq(&server, "init") >= 16 * 16).then_some(())
    });
    second.kill9();
    let log = second.log_text();
    assert!(log.contains("comparing with the server's block hashes"), "{}", tail(&log, 20));
    let before = log.len();
    second.restart();
    let p1 = server.checkpoint("init");
    let log = second.log_text()[before..].to_string();
    assert!(
        !log.contains("comparing with the server's block hashes")
            && (log.contains("saved state matches the server's copy")
                || log.contains("records past the saved state")),
        "the session that compared with the server's hashes saved nothing: {}",
        tail(&log, 20)
    );
    assert_point_recovers(&server, root, "init", &p1, &b3(&disk, None));
}

/// A session that goes on from a saved state compares the pages that the records past it
/// wrote with the server's values of them, and sends none of what the server holds; so a
/// session cut before it could save again is followed by another that does the same (it
/// sent those blocks whole before, and on a link that drops before a save's acks come, the
/// same blocks went at every session; W15 then had such a session compare the whole disk
/// with the server's block hashes, a scratch copy of every block since the base image).
#[test]
fn sessions_cut_before_they_saved_send_nothing_the_server_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let proxy = Proxy::start(server.port);
    let identity = root.join("init.bundle");
    server.enroll_agent("init", &identity);
    let disk = root.join("init.img");
    make_random(&disk, 32, 32, 59);
    let agent = Agent::start_at(
        &proxy.url(),
        &identity,
        "init",
        &[("sda", &disk)],
        &root.join("st"),
        &["--max-rate", "4MiB", "--save-every", "1s"],
    );
    // Saves at 1 s and 3 s into the pass.
    deadline_poll("14 MiB of the initial sync", Duration::from_secs(30), || {
        (durable_seq(&server, "init") >= 14 * 16).then_some(())
    });
    // Cut until a session goes on from the saved state with records past it, then cut that
    // one at once, before its first save (1 s into its pass).
    let mut cut_early = false;
    for _ in 0..5 {
        let before = agent.log_text().len();
        proxy.cut();
        proxy.up();
        let past = deadline_poll("the next session", Duration::from_secs(30), || {
            let log = agent.log_text()[before..].to_string();
            log.contains("connected; replicating").then(|| log.contains("records past the saved state"))
        });
        if past {
            proxy.cut();
            proxy.up();
            cut_early = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(1500));
    }
    assert!(cut_early, "no session went on from the saved state with records past it");
    let p1 = server.checkpoint("init");
    let log = agent.log_text();
    assert!(
        log.contains("page by page")
            && !log.contains("comparing with the server's block hashes")
            && !log.contains("sending the blocks they wrote again"),
        "{}",
        tail(&log, 20)
    );
    // What came in is the disk about once: what a cut lost on the way is sent again, what
    // the server holds is not (the blocks past the saved state went again whole before).
    let received = server.status("init")["bytes_received"].as_u64().unwrap();
    assert!(received < 36 << 20, "{received} bytes received for a 32 MiB disk of random data");
    assert_point_recovers(&server, root, "init", &p1, &b3(&disk, None));
}

/// A link that drops with nothing written since the last point makes no point again at
/// each reconnect (W15: one per reconnect, 20,000 a day that all said the same on a link
/// that dropped every 4 s); a page written meanwhile, or a checkpoint asked for, does.
#[test]
fn a_reconnect_with_nothing_written_since_the_last_point_makes_none() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let proxy = Proxy::start(server.port);
    let identity = root.join("idle.bundle");
    server.enroll_agent("idle", &identity);
    let disk = root.join("idle.img");
    make_random(&disk, 8, 2, 60);
    let agent = Agent::start_at(&proxy.url(), &identity, "idle", &[("sda", &disk)], &root.join("st"), &[]);
    // Acked to the agent too (the server lists it a moment before its ack arrives).
    let p1 = deadline_poll("the first point", Duration::from_secs(30), || {
        Some(newest_point(&server, "idle"))
            .filter(|&p| p > 0 && agent.log_text().contains("recovery point acked"))
    });
    let reconnect = || {
        let before = agent.log_text().len();
        proxy.cut();
        proxy.up();
        deadline_poll("a pass after the reconnect", Duration::from_secs(30), || {
            let log = agent.log_text()[before..].to_string();
            (log.contains("no point is made again") || log.contains("recovery point acked")).then_some(log)
        })
    };
    for _ in 0..3 {
        let log = reconnect();
        assert!(log.contains("no point is made again"), "{}", tail(&log, 20));
    }
    let points = server.drctl_json(&["points", "idle"]);
    assert_eq!(points.as_array().unwrap().len(), 1, "points after three idle reconnects: {points}");
    write_at(&disk, 3 << 20, &[0x5a; 4096]);
    let log = reconnect();
    assert!(log.contains("recovery point acked"), "{}", tail(&log, 20));
    let p2 = newest_point(&server, "idle");
    assert!(p2 > p1, "no point after a page written while the link was down");
    let p2 = server.drctl_json(&["points", "idle"]).as_array().unwrap().last().unwrap().clone();
    assert_point_recovers(&server, root, "idle", &p2, &b3(&disk, None));
    // A point asked for is made whatever changed.
    let p3 = server.checkpoint("idle");
    assert!(p3["id"].as_u64().unwrap() > p2["id"].as_u64().unwrap(), "{p3}");
}

/// A link that dies somewhere between (the server's side of the connection stays open
/// until its keepalive notices): the agent comes back at once on a new connection, and the
/// server ends the dead session for it instead of refusing it as a second agent.
#[test]
fn an_agent_back_on_a_new_connection_replaces_its_dead_session() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let proxy = Proxy::start(server.port);
    let identity = root.join("wan.bundle");
    server.enroll_agent("wan", &identity);
    let disk = root.join("wan.img");
    make_random(&disk, 16, 4, 7);
    let agent = Agent::start_at(&proxy.url(), &identity, "wan", &[("sda", &disk)], &root.join("st"), &[]);
    server.wait_connected("wan");
    server.checkpoint("wan");
    proxy.strand();
    deadline_poll("the agent to come back", Duration::from_secs(30), || {
        server.log_text().contains("the agent came back on a new connection").then_some(())
    });
    scatter_writes(&disk, 0.05, 8);
    let p = server.checkpoint("wan");
    assert_point_recovers(&server, root, "wan", &p, &b3(&disk, None));
    let log = agent.log_text();
    assert!(!log.contains("already replicating"), "{}", tail(&log, 20));
}

/// A second agent for a VM (the same bundle on another host, or by mistake) is refused
/// with who holds the VM, while the first goes on; once the first is gone, the second
/// takes over within seconds, and every point verifies.
#[test]
fn a_second_agent_for_a_vm_is_refused_until_the_first_is_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("two.bundle");
    server.enroll_agent("two", &identity);
    let (a_disk, b_disk) = (root.join("a.img"), root.join("b.img"));
    make_random(&a_disk, 16, 4, 141);
    make_random(&b_disk, 16, 4, 142);
    let mut first = Agent::start(&server, &identity, "two", &[("sda", &a_disk)], &root.join("st-a"), &[]);
    server.wait_connected("two");
    let p1 = server.checkpoint("two");
    let h1 = b3(&a_disk, None);
    let second = Agent::start(&server, &identity, "two", &[("sda", &b_disk)], &root.join("st-b"), &[]);
    deadline_poll("the second agent to be refused", Duration::from_secs(20), || {
        second.log_text().contains("already replicating from another agent").then_some(())
    });
    scatter_writes(&a_disk, 0.01, 143);
    let p2 = server.checkpoint("two");
    assert_point_recovers(&server, root, "two", &p1, &h1);
    assert_point_recovers(&server, root, "two", &p2, &b3(&a_disk, None));
    first.kill9();
    let gone = Instant::now();
    let p3 = server.checkpoint("two");
    assert!(gone.elapsed() < Duration::from_secs(15), "takeover took {:?}", gone.elapsed());
    assert_point_recovers(&server, root, "two", &p3, &b3(&b_disk, None));
}

/// A disk added to a protected VM: earlier points still recover (they cover the disks they
/// were made with), new points cover both; leaving a disk out is refused with what to do.
#[test]
fn an_added_disk_keeps_earlier_points_and_a_left_out_disk_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("grow.bundle");
    server.enroll_agent("grow", &identity);
    let (sda, sdb) = (root.join("sda.img"), root.join("sdb.img"));
    make_random(&sda, 16, 2, 151);
    make_random(&sdb, 8, 3, 152);
    let state = root.join("st");
    let mut one = Agent::start(&server, &identity, "grow", &[("sda", &sda)], &state, &[]);
    server.wait_connected("grow");
    let p1 = server.checkpoint("grow");
    let h1 = b3(&sda, None);
    one.kill9();
    scatter_writes(&sda, 0.01, 153);
    let _two = Agent::start(&server, &identity, "grow", &[("sda", &sda), ("sdb", &sdb)], &state, &[]);
    let p2 = server.checkpoint("grow");
    assert_point_recovers(&server, root, "grow", &p1, &h1);
    let out = root.join("p2");
    let res = server.drctl_json(&[
        "test-failover",
        "grow",
        "--point",
        &p2["id"].to_string(),
        "--output",
        out.to_str().unwrap(),
    ]);
    let disks = res["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{res}");
    assert_eq!(disks[0]["blake3"].as_str().unwrap(), b3(&sda, None));
    assert_eq!(disks[1]["blake3"].as_str().unwrap(), b3(&sdb, None));
    assert_eq!(b3(&out.join("sdb.raw"), None), b3(&sdb, None));
    server.drctl_json(&["test-failover-cleanup", "grow"]);
    drop(_two);
    let mut short = Agent::start(&server, &identity, "grow", &[("sda", &sda)], &root.join("st2"), &[]);
    let status = short.wait_exit("the agent without sdb to stop");
    assert!(!status.success());
    assert!(short.log_text().contains("disk(s) sdb that this agent does not give"), "{}", short.log_text());
    // Replication stops until someone acts: the VM's status says so.
    let s = server.status("grow");
    assert!(s["error"].as_str().is_some_and(|e| e.contains("does not give")), "{s}");
    assert_eq!(s["health"], "critical", "{s}");
}

/// One VM's files damaged (a closed segment's header) stop only that VM: the process server
/// starts, says which VM and why (critical), and the other VM goes on replicating. A second
/// server on the same data directory is refused, and so is a data directory whose catalog
/// is gone (instead of starting empty and forgetting every point).
#[test]
fn damage_stays_with_its_vm_and_the_data_directory_is_guarded() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.extra = vec!["--segment-size".into(), "256KiB".into()];
    server.start();
    let mut agents = Vec::new();
    for vm in ["hurt", "fine"] {
        let identity = root.join(format!("{vm}.bundle"));
        server.enroll_agent(vm, &identity);
        let disk = root.join(format!("{vm}.img"));
        make_random(&disk, 8, 2, 161);
        agents.push(Agent::start(
            &server,
            &identity,
            vm,
            &[("sda", &disk)],
            &root.join(format!("st-{vm}")),
            &[],
        ));
        server.wait_connected(vm);
        server.checkpoint(vm);
    }
    let second = serve_until_exit(&server, &[]);
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use by another process"), "{second:?}");

    server.kill9();
    let segments = server.data.join("vms/hurt/sda/journal");
    let segs = segment_files(&segments);
    assert!(segs.len() > 2, "several segments: {segs:?}");
    write_at(&segs[0], 0, b"XXXX");
    server.start();
    let hurt = server.status("hurt");
    assert_eq!(hurt["health"], "critical", "{hurt}");
    assert!(hurt["error"].as_str().unwrap().contains("stored data damaged"), "{hurt}");
    // As a monitoring check: critical exits 2 and says why; a normal VM exits 0.
    let check = server.drctl(&["status", "hurt", "--check"]);
    assert_eq!(check.status.code(), Some(2), "{check:?}");
    assert!(String::from_utf8_lossy(&check.stderr).contains("VM hurt is critical"), "{check:?}");
    assert_eq!(server.drctl(&["status", "fine", "--check"]).status.code(), Some(0));
    let fine_disk = root.join("fine.img");
    scatter_writes(&fine_disk, 0.02, 162);
    let p = server.checkpoint("fine");
    assert_point_recovers(&server, root, "fine", &p, &b3(&fine_disk, None));
    let err = server.drctl_err(&["test-failover", "hurt", "--output", root.join("no").to_str().unwrap()]);
    assert!(err.contains("could not be opened"), "{err}");

    server.kill9();
    for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
        let _ = std::fs::rename(server.data.join(f), root.join(f));
    }
    let empty = serve_until_exit(&server, &[]);
    assert!(!empty.status.success());
    assert!(String::from_utf8_lossy(&empty.stderr).contains("no catalog"), "{empty:?}");

    // A catalog a newer tern wrote (a downgrade): refused with exit 2, which the unit does
    // not restart (no restart mends it), and left as it was.
    for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
        let _ = std::fs::rename(root.join(f), server.data.join(f));
    }
    let db = rusqlite::Connection::open(server.data.join("catalog.db")).unwrap();
    let version: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    db.pragma_update(None, "user_version", version + 1).unwrap();
    drop(db);
    let newer = serve_until_exit(&server, &[]);
    assert_eq!(newer.status.code(), Some(2), "{newer:?}");
    assert!(String::from_utf8_lossy(&newer.stderr).contains("newer tern"), "{newer:?}");
    assert!(!String::from_utf8_lossy(&newer.stdout).contains("listening"), "{newer:?}");
}

/// A lost catalog is rebuilt from the journals: the same points come back (id, time,
/// consistency), each verifies, the newest fails over byte for byte, and replication goes
/// on (the agent compares hashes first: a new epoch) to a new point with a new id.
#[test]
fn a_lost_catalog_is_rebuilt_from_the_journals() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.extra = vec!["--segment-size".into(), "256KiB".into()];
    server.start();
    let identity = root.join("lost.bundle");
    server.enroll_agent("lost", &identity);
    let disk = root.join("lost.img");
    make_random(&disk, 16, 3, 171);
    let _agent = Agent::start(&server, &identity, "lost", &[("sda", &disk)], &root.join("st"), &[]);
    server.wait_connected("lost");
    let mut wants = Vec::new();
    for seed in 0..3 {
        scatter_writes(&disk, 0.03, 172 + seed);
        let p = server.checkpoint("lost");
        wants.push((p, b3(&disk, None)));
    }
    let listed = |server: &Server| -> Vec<(u64, String, String)> {
        let points = server.drctl_json(&["points", "lost"]);
        points
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["id"].as_u64().unwrap(), p["time"].to_string(), p["consistency"].to_string()))
            .collect()
    };
    let before = listed(&server);
    assert!(before.len() >= 3, "{before:?}");

    server.kill9();
    for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
        let _ = std::fs::remove_file(server.data.join(f));
    }
    let refused = serve_until_exit(&server, &[]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--rebuild-catalog"), "{refused:?}");
    let check = |extra: &[&str]| {
        std::process::Command::new(bin("process-server"))
            .args(["check", "--data-dir"])
            .arg(&server.data)
            .args(extra)
            .output()
            .unwrap()
    };
    let rebuilt = check(&["--rebuild-catalog"]);
    let text = String::from_utf8_lossy(&rebuilt.stdout);
    assert!(rebuilt.status.success(), "{rebuilt:?}");
    assert!(text.contains(&format!("VM lost: {} point(s) rebuilt", before.len())), "{text}");
    let again = check(&["--rebuild-catalog"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never replaces a catalog"), "{again:?}");
    let described = check(&[]);
    assert!(String::from_utf8_lossy(&described.stdout).contains("VM lost:"), "{described:?}");

    server.start();
    assert_eq!(listed(&server), before);
    for (p, want) in &wants {
        assert_point_recovers(&server, root, "lost", p, want);
    }
    server.wait_connected("lost");
    scatter_writes(&disk, 0.03, 179);
    let p = server.checkpoint("lost");
    assert!(p["id"].as_u64().unwrap() > before.last().unwrap().0, "{p}");
    assert_point_recovers(&server, root, "lost", &p, &b3(&disk, None));
}

/// Runs `process-server serve` on the server's data directory, expecting it to stop by
/// itself (a refusal); one still serving after 20 s is killed and fails the test.
fn serve_until_exit(server: &Server, extra: &[&str]) -> std::process::Output {
    let mut child = std::process::Command::new(bin("process-server"))
        .args(["serve", "--data-dir"])
        .arg(&server.data)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if exited.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            panic!("a second process server on {} kept serving", server.data.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// `--stream-window` outside 64KiB..1GiB is refused at start, saying so; a small one
/// (a site of many agents on a LAN) replicates as the default does.
#[test]
fn a_small_stream_window_replicates_and_a_wrong_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    let refused = serve_until_exit(&server, &["--stream-window", "1KiB"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("--stream-window must be between 64KiB and 1GiB"), "{err}");
    // With JSON logs the reason is one JSON log line, for the log shipper to keep.
    let out = std::process::Command::new(bin("process-server"))
        .args(["serve", "--data-dir"])
        .arg(&server.data)
        .args(["--listen", "127.0.0.1:0", "--stream-window", "1KiB"])
        .env("TERN_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a misconfiguration, which its unit does not restart: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let line: serde_json::Value = serde_json::from_str(err.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {err}"));
    assert_eq!(line["level"], "ERROR", "{line}");
    assert!(line["message"].as_str().unwrap().contains("--stream-window must be between"), "{line}");
    server.extra = vec!["--stream-window".into(), "64KiB".into()];
    server.start();
    let identity = root.join("w.bundle");
    server.enroll_agent("w", &identity);
    let disk = root.join("w.img");
    make_random(&disk, 16, 8, 191);
    let _agent = Agent::start(&server, &identity, "w", &[("sda", &disk)], &root.join("st"), &[]);
    server.wait_connected("w");
    let p = server.checkpoint("w");
    assert_point_recovers(&server, root, "w", &p, &b3(&disk, None));
}

/// A VM "rot" with one point, on a server started with `--scrub-every SCRUB`, whose base
/// image then rots where the disk is a hole (no record covers it): the server, the agent
/// (kept running) and the point's id.
fn rotted_point(root: &Path, scrub_every: &str) -> (Server, Agent, String) {
    let mut server = Server::init(root);
    server.extra = vec!["--scrub-every".into(), scrub_every.into()];
    server.start();
    let identity = root.join("rot.bundle");
    server.enroll_agent("rot", &identity);
    let disk = root.join("rot.img");
    make_random(&disk, 8, 2, 171);
    let agent = Agent::start(&server, &identity, "rot", &[("sda", &disk)], &root.join("st"), &[]);
    server.wait_connected("rot");
    let p = server.checkpoint("rot");
    assert_eq!(server.status("rot")["health"], "normal");
    write_at(&server.data.join("vms/rot/sda/base.img"), 6 << 20, b"rot");
    (server, agent, p["id"].to_string())
}

/// The background scrub finds a point that no longer recovers (a base image damaged on
/// storage) and turns the VM critical, naming the point.
#[test]
fn the_scrub_names_a_point_that_does_not_recover() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, _agent, id) = rotted_point(tmp.path(), "1s");
    let s = deadline_poll("the scrub to notice", Duration::from_secs(30), || {
        let s = server.status("rot");
        s["error"].as_str().is_some_and(|e| e.contains(&format!("point {id} does not recover"))).then_some(s)
    });
    assert_eq!(s["health"], "critical", "{s}");
    // `drctl verify` says so too, with its own exit code (4), apart from other failures.
    let out = server.drctl(&["verify", "rot", "--point", &id]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("DOES NOT VERIFY"), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("the point says"), "{out:?}");
}

/// Without the scrub, a `drctl verify` that finds a point broken turns the VM critical too,
/// naming the point: the operator's check is not forgotten by the next `drctl status`.
#[test]
fn a_verify_that_finds_a_point_broken_turns_the_vm_critical() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut server, _agent, id) = rotted_point(tmp.path(), "0s");
    assert_eq!(server.status("rot")["health"], "normal", "nothing has looked yet");
    let out = server.drctl(&["verify", "rot", "--point", &id]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let s = server.status("rot");
    assert_eq!(s["health"], "critical", "{s}");
    assert!(
        s["error"].as_str().is_some_and(|e| e.contains(&format!("verify: point {id} does not recover"))),
        "{s}"
    );
    // Still said after a restart of the server (W18-B: it went back to normal).
    server.kill9();
    server.start();
    let s = server.status("rot");
    assert_eq!(s["health"], "critical", "{s}");
    assert!(s["error"].as_str().is_some_and(|e| e.contains("does not recover")), "{s}");
    // Mended (the bytes were a hole's zeroes): a verify of that point clears it.
    write_at(&server.data.join("vms/rot/sda/base.img"), 6 << 20, &[0; 3]);
    let out = server.drctl(&["verify", "rot", "--point", &id]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(server.status("rot")["health"], "normal");
}

/// Smaller refusals: an identity is never written over an existing file, an output inside
/// the data directory is refused, and so is a directory given as a disk.
#[test]
fn small_mistakes_are_refused_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let admin_before = std::fs::read(server.admin()).unwrap();
    let err = server.drctl_err(&["enroll", "agent", "--vm", "x", "--out", server.admin().to_str().unwrap()]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(server.admin()).unwrap(), admin_before, "the admin bundle is untouched");
    // A file that cannot be made is refused before anything is issued.
    let nowhere = root.join("no-such-dir").join("x.bundle");
    let out = server.drctl(&["enroll", "agent", "--vm", "x", "--out", nowhere.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(server.drctl_json(&["identities"]).as_array().unwrap().len(), 1, "nothing was issued");
    // A monitoring check says 0-3 whatever happens: 3 when it cannot tell.
    let out = server.drctl(&["status", "nosuch", "--check"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    let identity = root.join("m.bundle");
    server.enroll_agent("m", &identity);
    let disk = root.join("m.img");
    make_random(&disk, 8, 1, 181);
    // Enrolled, its agent not started: not protected, a warning; every such VM is named.
    server.enroll_agent("m2", &root.join("m2.bundle"));
    let out = server.drctl(&["status", "--check"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("VM m is enrolled") && said.contains("VM m2 is enrolled"), "{out:?}");
    let _agent = Agent::start(&server, &identity, "m", &[("sda", &disk)], &root.join("st"), &[]);
    server.wait_connected("m");
    // A second agent on the same state directory is refused at start.
    let mut twin = Agent::start(&server, &identity, "m", &[("sda", &disk)], &root.join("st"), &[]);
    // Exit 2, as a misconfiguration (its unit does not start it again and again), said once.
    assert_eq!(twin.wait_exit("the second agent on one state directory to stop").code(), Some(2));
    assert_eq!(twin.log_text().matches("in use by another agent").count(), 1, "{}", twin.log_text());
    // Another VM's agent given this VM's disk (a unit file copied, its path not edited) is
    // refused at start, naming the disk, instead of protecting it as its own.
    let identity2 = root.join("m2.bundle");
    let mut other = Agent::start(&server, &identity2, "m2", &[("sda", &disk)], &root.join("st2"), &[]);
    assert_eq!(other.wait_exit("an agent given another agent's disk to stop").code(), Some(2));
    let said = other.log_text();
    assert!(said.contains("m.img") && said.contains("another agent reads this file"), "{said}");
    assert!(server.status("m2")["last_point"].is_null(), "{}", server.status("m2"));
    // One file given for two disks: refused at start, naming both.
    let twice = root.join("m2.img");
    make_random(&twice, 8, 1, 182);
    let mut other =
        Agent::start(&server, &identity2, "m2", &[("sda", &twice), ("sdb", &twice)], &root.join("st2"), &[]);
    assert_eq!(other.wait_exit("an agent given one file for two disks to stop").code(), Some(2));
    let said = other.log_text();
    assert!(said.contains("disk sdb") && said.contains("the same file as disk sda"), "{said}");
    // A damaged identity file (cut short, here) is a mistake no restart mends: exit 2,
    // saying what to do (W18-A: exit 1, which its unit restarted every 2 s for good).
    let cut = root.join("cut.bundle");
    let text = std::fs::read_to_string(&identity).unwrap();
    std::fs::write(&cut, &text[..text.len() / 2]).unwrap();
    let mut other = Agent::start(&server, &cut, "m", &[("sda", &disk)], &root.join("st3"), &[]);
    assert_eq!(other.wait_exit("an agent given a damaged identity to stop").code(), Some(2));
    assert!(other.log_text().contains("drctl enroll"), "{}", other.log_text());
    // Its certificate changed in one character of its signature: it still parses, and is
    // refused at once, not seen as a transport error at each try (W18-A).
    let forged = root.join("forged.bundle");
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let ends: Vec<usize> =
        (0..lines.len()).filter(|&i| lines[i].starts_with("-----END CERTIFICATE")).collect();
    let last = ends[1] - 1; // the client certificate's last line of base64 (the CA's is first)
    let i = lines[last].trim_end_matches('=').len() - 4;
    let c = if lines[last].as_bytes()[i] == b'A' { "B" } else { "A" };
    lines[last].replace_range(i..=i, c);
    std::fs::write(&forged, lines.join("\n") + "\n").unwrap();
    let mut other = Agent::start(&server, &forged, "m", &[("sda", &disk)], &root.join("st4"), &[]);
    assert_eq!(other.wait_exit("an agent given a forged identity to stop").code(), Some(2));
    assert!(other.log_text().contains("does not carry its CA's valid signature"), "{}", other.log_text());
    // 0 is not an interval (on the wire it would mean "keep"): refused.
    let out = server.drctl(&["policy", "set", "m", "--crash-interval", "0s"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    server.checkpoint("m");
    let inside = server.data.join("tmp").join("drill");
    let err = server.drctl_err(&["test-failover", "m", "--output", inside.to_str().unwrap()]);
    assert!(err.contains("inside the process server's data directory"), "{err}");
    // A relative output would be resolved against this shell's directory, not the server's.
    let out = server.drctl(&["test-failover", "m", "--output", "drill"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("give an absolute path"), "{out:?}");
    // A place the server cannot write (here a read-only file system; under its unit, outside
    // ReadWritePaths) is refused at once, saying where outputs may go.
    let ro = Tmpfs::mount(&root.join("ro"), "size=1m,ro");
    let out = server.drctl(&["test-failover", "m", "--output", ro.dir.join("drill").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "an argument to change: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot write") && err.contains("ReadWritePaths"), "{err}");
    // A unit mistyped: five months for five minutes.
    let out = server.drctl(&["policy", "set", "m", "--crash-interval", "5M"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 30d"), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("M is months"), "{out:?}");
    // A file given as the output directory.
    let file = root.join("a-file");
    std::fs::write(&file, b"keep").unwrap();
    let out = server.drctl(&["test-failover", "m", "--output", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is a file; name a directory"), "{out:?}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    // A second test failover while one is open: refused before any job starts (exit 6).
    let drill = root.join("drill");
    server.drctl_json(&["test-failover", "m", "--output", drill.to_str().unwrap()]);
    let jobs = server.drctl_json(&["jobs"]).as_array().unwrap().len();
    let out = server.drctl(&["test-failover", "m", "--output", root.join("drill2").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already has an open test failover"), "{out:?}");
    assert_eq!(server.drctl_json(&["jobs"]).as_array().unwrap().len(), jobs, "no job started");

    let dir_disk = root.join("a-directory");
    std::fs::create_dir(&dir_disk).unwrap();
    let id2 = root.join("d.bundle");
    server.enroll_agent("d", &id2);
    let mut bad = Agent::start(&server, &id2, "d", &[("sda", &dir_disk)], &root.join("st-d"), &[]);
    let status = bad.wait_exit("the agent to refuse the directory");
    assert!(!status.success());
    assert!(bad.log_text().contains("not a disk"), "{}", bad.log_text());
    let vms = server.drctl_json(&["status"]);
    // Enrolled, never protected: listed as such, with no disks.
    assert!(
        vms.as_array()
            .unwrap()
            .iter()
            .all(|v| v["vm"] != "d" || (v["state"] == "unprotected" && v["disks"] == serde_json::json!([]))),
        "no empty VM left behind: {vms}"
    );
}

/// Writes 4 KiB pages of a disk as a VM would, sometimes writing a page back to a value it
/// held before (the case a cut pass must not hide).
struct Writer {
    disk: std::fs::File,
    pages: u64,
    rng: rand::rngs::StdRng,
    /// Earlier values of pages, to write back.
    history: Vec<(u64, Vec<u8>)>,
    /// The value each page written since the last point had at that point.
    at_point: std::collections::HashMap<u64, Vec<u8>>,
}

impl Writer {
    fn new(disk: &Path, seed: u64) -> Writer {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(disk).unwrap();
        let pages = f.metadata().unwrap().len() / 4096;
        Writer {
            disk: f,
            pages,
            rng: rand::SeedableRng::seed_from_u64(seed),
            history: Vec::new(),
            at_point: Default::default(),
        }
    }

    fn burst(&mut self, n: usize) {
        use rand::{Rng, RngCore};
        for _ in 0..n {
            let (page, data) = if !self.history.is_empty() && self.rng.random_bool(0.3) {
                let i = self.rng.random_range(0..self.history.len());
                self.history.swap_remove(i)
            } else {
                let mut d = vec![0u8; 4096];
                self.rng.fill_bytes(&mut d);
                (self.rng.random_range(0..self.pages), d)
            };
            self.write(page, &data);
        }
        self.disk.sync_all().unwrap();
    }

    fn write(&mut self, page: u64, data: &[u8]) {
        let mut old = vec![0u8; 4096];
        self.disk.read_exact_at(&mut old, page * 4096).unwrap();
        self.at_point.entry(page).or_insert_with(|| old.clone());
        self.history.push((page, old));
        self.disk.write_all_at(data, page * 4096).unwrap();
    }

    /// Writes up to `n` of the pages changed since the last point back to their value at
    /// that point: what a pass cut short may have sent differently.
    fn write_back_to_point(&mut self, n: usize) {
        let pages: Vec<u64> = self.at_point.keys().copied().take(n).collect();
        for page in pages {
            if let Some(v) = self.at_point.remove(&page) {
                self.disk.write_all_at(&v, page * 4096).unwrap();
            }
        }
        self.disk.sync_all().unwrap();
    }

    /// A point was taken of the disk as it is now.
    fn point_taken(&mut self) {
        self.at_point.clear();
    }
}

fn newest_point(server: &Server, vm: &str) -> u64 {
    server.status(vm)["last_point"].as_u64().unwrap_or(0)
}

/// Every listed point of `vm` verifies; returns how many there are.
fn verify_all_points(server: &Server, vm: &str) -> usize {
    let points = server.drctl_json(&["points", vm]);
    let mut verified = 0;
    for p in points.as_array().unwrap() {
        let id = p["id"].to_string();
        let out = server.drctl(&["verify", vm, "--point", &id, "--json"]);
        if !out.status.success() {
            // Retention (a 90 s window here) may prune the oldest points while the others
            // are verified: a point no longer listed need not verify; any other failure is one.
            let err = String::from_utf8_lossy(&out.stderr);
            let listed = server.drctl_json(&["points", vm]);
            let still = listed.as_array().unwrap().iter().any(|q| q["id"] == p["id"]);
            assert!(err.contains("was pruned") && !still, "verify of point {id} failed: {err}");
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["ok"], true, "point {id} does not verify: {v}");
        verified += 1;
    }
    verified
}

/// The fault loop: a writer changes pages (sometimes back to earlier values); at a random
/// moment of a pass the agent is killed, the process server is killed, or the connection
/// drops, for a second; after every iteration every listed point verifies and the newest
/// point's test failover equals the source as it was when the point was taken.
/// `TERN_FAULT_ITERATIONS` (default 10) and `TERN_FAULT_SEED` set the run; it prints one
/// summary line (bench/faults.sh runs it 100 times and reads that line).
#[test]
fn fault_loop() {
    use rand::{Rng, RngCore, SeedableRng};
    let iterations: usize =
        std::env::var("TERN_FAULT_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let seed: u64 = std::env::var("TERN_FAULT_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    });
    eprintln!("fault loop: seed {seed} (TERN_FAULT_SEED={seed} repeats it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.extra = vec!["--retention-every".into(), "2s".into()];
    server.start();
    let proxy = Proxy::start(server.port);
    let identity = root.join("loop.bundle");
    server.enroll_agent("loop", &identity);
    let disk = root.join("loop.img");
    make_random(&disk, 16, 4, seed);
    let mut agent = Agent::start_at(
        &proxy.url(),
        &identity,
        "loop",
        &[("sda", &disk)],
        &root.join("st"),
        &["--max-rate", "1MiB"],
    );
    server.wait_connected("loop");
    server.checkpoint("loop");
    // Retention keeps the number of points (and of verifications) bounded in long runs.
    server.drctl_json(&["policy", "set", "loop", "--retention", "90s"]);
    let mut writer = Writer::new(&disk, seed);
    let connected = |server: &Server| server.status("loop")["agent_connected"] == true;
    let (mut verified, mut reconnects, mut cut_mid_pass) = (0usize, Vec::new(), 0usize);
    for i in 0..iterations {
        writer.burst(rng.random_range(20..200));
        // A run of changed data, so that the pass (1 MiB/s) lasts long enough to be cut.
        let mut run = vec![0u8; rng.random_range(512..1024) * 4096];
        rng.fill_bytes(&mut run);
        write_at(&disk, rng.random_range(0..2048u64) * 4096, &run);
        let (seq_before, points_before) = (durable_seq(&server, "loop"), newest_point(&server, "loop"));
        server.drctl_json(&["checkpoint", "loop"]);
        // Once the pass has begun to land, at a random moment of it.
        let started = Instant::now();
        while durable_seq(&server, "loop") == seq_before
            && newest_point(&server, "loop") == points_before
            && started.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..1500)));
        writer.burst(rng.random_range(0..20));
        // Mid-pass: records of the pass are durable and its point is not made yet.
        let mid_pass =
            durable_seq(&server, "loop") > seq_before && newest_point(&server, "loop") == points_before;
        cut_mid_pass += usize::from(mid_pass);
        let fault = match rng.random_range(0..3) {
            0 => Cut::AgentKill,
            1 => Cut::ServerKill,
            _ => Cut::Link,
        };
        match fault {
            Cut::AgentKill => agent.kill9(),
            Cut::ServerKill => server.kill9(),
            Cut::Link => proxy.cut(),
        }
        if !matches!(fault, Cut::ServerKill) {
            deadline_poll("the server to see the agent gone", Duration::from_secs(15), || {
                (!connected(&server)).then_some(())
            });
        }
        writer.burst(rng.random_range(0..40));
        writer.write_back_to_point(rng.random_range(1..30));
        std::thread::sleep(Duration::from_secs(1));
        match fault {
            Cut::AgentKill => agent.restart(),
            Cut::ServerKill => server.start(),
            Cut::Link => proxy.up(),
        }
        let back = Instant::now();
        deadline_poll("the agent to reconnect", Duration::from_secs(30), || connected(&server).then_some(()));
        let reconnect = back.elapsed();
        reconnects.push((fault, reconnect));
        let p = server.checkpoint("loop");
        writer.point_taken();
        let want = b3(&disk, None);
        verified += verify_all_points(&server, "loop");
        assert_point_recovers(&server, root, "loop", &p, &want);
        eprintln!(
            "fault loop: iteration {} {fault:?}{}: reconnected in {reconnect:.2?}, point {}",
            i + 1,
            if mid_pass { " mid-pass" } else { "" },
            p["id"]
        );
    }
    let max = reconnects.iter().map(|r| r.1).max().unwrap_or_default();
    eprintln!(
        "fault loop summary: {iterations} iterations ({cut_mid_pass} cut mid-pass), {verified} point \
         verifications, all passed; reconnect after a 1 s outage: max {:.2} s ({} agent kills, {} server kills, {} dropped links)",
        max.as_secs_f64(),
        reconnects.iter().filter(|r| matches!(r.0, Cut::AgentKill)).count(),
        reconnects.iter().filter(|r| matches!(r.0, Cut::ServerKill)).count(),
        reconnects.iter().filter(|r| matches!(r.0, Cut::Link)).count(),
    );
}

/// Every binary names itself, its release and the commit it was built from; drctl's shell
/// completions and man page come from its definition, with no server to ask.
#[test]
fn versions_completions_and_the_man_page() {
    use std::process::Command;
    let rev = run_ok(Command::new("git").args(["rev-parse", "--short=12", "HEAD"])).unwrap();
    for b in ["drctl", "mobility-agent", "process-server", "master-target"] {
        let v = run_ok(Command::new(bin(b)).arg("--version")).unwrap();
        assert!(v.starts_with(&format!("{b} 0.")), "{v}");
        assert!(v.contains(&format!("({})", rev.trim())), "{b} --version names the commit {rev}: {v}");
    }
    let bash = run_ok(Command::new(bin("drctl")).args(["completions", "bash"])).unwrap();
    assert!(bash.contains("test-failover") && bash.contains("complete"), "{bash}");
    let man = run_ok(Command::new(bin("drctl")).arg("man")).unwrap();
    assert!(man.contains(".TH drctl") && man.contains("test\\-failover"), "{man}");
}

/// A process server started from its config file alone behaves as with the same flags:
/// the file's segment size closes segments as `--segment-size` would.
#[test]
fn a_server_started_from_its_config_file_alone() {
    use std::process::Command;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    let config = root.join("process-server.toml");
    std::fs::write(
        &config,
        format!(
            "data-dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nsegment-size = \"1MiB\"\n",
            server.data.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(&server.log).unwrap();
    let (child, port) = spawn_listening(
        Command::new(bin("process-server")).args(["serve", "--config"]).arg(&config).stderr(log),
    );
    server.child = Some(child);
    server.port = port;
    let identity = root.join("web.bundle");
    server.enroll_agent("web", &identity);
    let disk = root.join("web.img");
    make_random(&disk, 8, 4, 5);
    let _agent = Agent::start(&server, &identity, "web", &[("sda", &disk)], &root.join("web-state"), &[]);
    server.checkpoint("web");
    let journal = server.data.join("vms/web/sda/journal");
    let segments = std::fs::read_dir(&journal)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "seg"))
        .count();
    assert!(segments >= 3, "4 MiB of records in segments of 1 MiB: {segments} segments");

    // A key the command does not have is refused, naming the keys it has.
    std::fs::write(&config, "data-dir = \"/x\"\nretention = \"1h\"\n").unwrap();
    let out = Command::new(bin("process-server")).args(["serve", "--config"]).arg(&config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("line 2: unknown key `retention`")
            && err.contains("segment-size"),
        "{err}"
    );
    // A listen address without its port is refused at once, naming the file's key (it was
    // only found when binding, as "cannot listen on 0.0.0.0", with no word of the file).
    std::fs::write(&config, format!("data-dir = \"{}\"\nlisten = \"0.0.0.0\"\n", server.data.display()))
        .unwrap();
    let out = Command::new(bin("process-server")).args(["serve", "--config"]).arg(&config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(2) && err.contains("HOST:PORT") && err.contains("process-server.toml"),
        "{err}"
    );
    // A scrub rate of 0 would never finish a round: refused, saying what to give instead.
    let out = Command::new(bin("process-server"))
        .args(["serve", "--listen", "127.0.0.1:0", "--scrub-rate", "0", "--data-dir"])
        .arg(&server.data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("--scrub-every 0"), "{err}");
    // A data directory never initialised, and a master target given a file that is no
    // identity: exit 2 as well, not restarted every 2 s by their units.
    let empty = tmp.path().join("empty");
    let out = Command::new(bin("process-server"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&empty)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("process-server init"), "{err}");
    let junk = tmp.path().join("junk.bundle");
    std::fs::write(&junk, "not a bundle").unwrap();
    let out = Command::new(bin("master-target"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path().join("mt"))
        .arg("--identity")
        .arg(&junk)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("junk.bundle"), "{err}");
}

/// drctl takes the server and its identity from TERN_SERVER and TERN_ADMIN_IDENTITY, and from
/// the older DRCTL_* names when those are not set.
#[test]
fn drctl_reads_tern_variables_and_the_older_names() {
    use std::process::Command;
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::init(tmp.path());
    let admin = server.admin().display().to_string();
    let status = |env: &[(&str, &str)]| {
        let out = Command::new(bin("drctl"))
            .env_remove("TERN_SERVER")
            .env_remove("TERN_ADMIN_IDENTITY")
            .env_remove("DRCTL_SERVER")
            .env_remove("DRCTL_IDENTITY")
            .envs(env.iter().copied())
            .arg("status")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = status(&[]);
    assert!(code == Some(2) && err.contains("TERN_SERVER"), "{code:?} {err}");
    // Nothing listens on port 1: reaching the point of connecting shows both were read.
    for (s, i) in [("TERN_SERVER", "TERN_ADMIN_IDENTITY"), ("DRCTL_SERVER", "DRCTL_IDENTITY")] {
        let (code, err) = status(&[(s, "https://127.0.0.1:1"), (i, &admin)]);
        assert_eq!(code, Some(3), "{s}/{i}: unreachable, not a usage error: {err}");
    }
}

/// A disk file replaced under a scan-mode agent (`mv` over it): the disk's lock follows the
/// new file within seconds, and lets the old one go (W18-B: it stayed on the old file, so a
/// second agent given the new one was not refused). `flock -n` tells.
#[test]
fn a_disks_lock_follows_the_file_that_replaces_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let _agent = protect_vm(&server, root, "mv", 4, 1, &[]);
    let disk = root.join("mv.img");
    let old = root.join("old.img");
    std::fs::hard_link(&disk, &old).unwrap();
    let locked = |f: &Path| {
        !std::process::Command::new("flock").args(["-n", "-x"]).arg(f).arg("true").status().unwrap().success()
    };
    assert!(locked(&disk), "the disk is locked at start");
    let new = root.join("new.img");
    std::fs::copy(&disk, &new).unwrap();
    std::fs::rename(&new, &disk).unwrap();
    deadline_poll("the lock on the new file", Duration::from_secs(30), || locked(&disk).then_some(()));
    assert!(!locked(&old), "the old file's lock is let go");
}

/// Two disks given under each other's names: refused as such (exit 3), naming the fix, and
/// not taken as a resize whose remedy deletes every point (W18-B); given right, it goes on.
#[test]
fn disks_given_under_each_others_names_are_refused_as_swapped() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("two.bundle");
    server.enroll_agent("two", &identity);
    let (a, b) = (root.join("a.img"), root.join("b.img"));
    make_random(&a, 4, 1, 201);
    make_random(&b, 4, 1, 202);
    let state = root.join("st");
    let mut agent = Agent::start(&server, &identity, "two", &[("sda", &a), ("sdb", &b)], &state, &[]);
    server.checkpoint("two");
    agent.stop();
    let mut swapped = Agent::start(&server, &identity, "two", &[("sda", &b), ("sdb", &a)], &state, &[]);
    assert_eq!(swapped.wait_exit("the swapped agent to be refused").code(), Some(3));
    let log = swapped.log_text();
    assert!(log.contains("look swapped") && log.contains(&format!("--disk sdb={}", b.display())), "{log}");
    agent.restart();
    server.wait_connected("two");
    let p = server.checkpoint("two");
    assert_eq!(p["disks"].as_array().unwrap().len(), 2, "{p}");
}

/// A refused session's error (here a resized disk) is shown until a later session is
/// admitted, then goes: it does not wait for an ack that may not come for long.
#[test]
fn a_refusal_shown_in_status_goes_once_a_session_is_admitted() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let mut agent = protect_vm(&server, root, "grown", 8, 2, &[]);
    agent.kill9();
    let disk = root.join("grown.img");
    let bigger = root.join("bigger.img");
    std::fs::copy(&disk, &bigger).unwrap();
    std::fs::OpenOptions::new().write(true).open(&bigger).unwrap().set_len(9 << 20).unwrap();
    let identity = root.join("grown.bundle");
    let mut wrong = Agent::start(&server, &identity, "grown", &[("sda", &bigger)], &root.join("st-big"), &[]);
    deadline_poll("the refusal in status", Duration::from_secs(30), || {
        server.status("grown")["error"].as_str().filter(|e| e.contains("resized")).map(|_| ())
    });
    wrong.kill9();
    agent.restart();
    server.wait_connected("grown");
    deadline_poll("the refusal to go", Duration::from_secs(30), || {
        server.status("grown")["error"].is_null().then_some(())
    });
}

/// Bit rot in a closed journal segment (opening does not read those): the first read that
/// meets it (a test failover) notes it; the VM turns critical saying what to do, verify
/// says the point does not recover (exit 4), no point is acknowledged meanwhile. The next
/// start cuts the journal there: the points past it go, the ones before still verify, and
/// the agent resends what is missing, so the next point is the disk byte for byte.
#[test]
fn a_damaged_record_in_a_closed_segment_is_cut_at_the_next_start_and_the_disk_resynced() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.extra = vec!["--segment-size".into(), "256KiB".into(), "--retention-every".into(), "1s".into()];
    server.start();
    let identity = root.join("bit.bundle");
    server.enroll_agent("bit", &identity);
    let disk = root.join("bit.img");
    make_random(&disk, 8, 4, 181);
    let _agent = Agent::start(&server, &identity, "bit", &[("sda", &disk)], &root.join("st"), &[]);
    server.wait_connected("bit");
    server.checkpoint("bit");
    for seed in [182, 183] {
        scatter_writes(&disk, 0.05, seed);
        server.checkpoint("bit");
    }
    let before = server.drctl_json(&["points", "bit"]).as_array().unwrap().len();

    server.kill9();
    let dir = server.data.join("vms/bit/sda/journal");
    let segs = segment_files(&dir);
    assert!(segs.len() > 3, "several segments: {segs:?}");
    let rotten = &segs[segs.len() - 2];
    let len = std::fs::metadata(rotten).unwrap().len();
    let mut b = std::fs::read(rotten).unwrap()[(len / 2) as usize];
    b ^= 0x10;
    write_at(rotten, len / 2, &[b]);
    server.start();

    let err = server.drctl_err(&["test-failover", "bit", "--output", root.join("t1").to_str().unwrap()]);
    assert!(err.contains("corrupt"), "{err}");
    let s = server.status("bit");
    assert_eq!(s["health"], "critical", "{s}");
    assert!(s["error"].as_str().unwrap().contains("process server is restarted"), "{s}");
    let out = server.drctl(&["verify", "bit"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let out = server.drctl(&["checkpoint", "bit", "--wait"]);
    assert!(!out.status.success(), "no point past the damage is acknowledged: {out:?}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        server.drctl_json(&["points", "bit"]).as_array().unwrap().len(),
        before,
        "retention pruned nothing"
    );

    server.kill9();
    server.start();
    let kept = server.drctl_json(&["points", "bit"]);
    let kept: Vec<String> = kept.as_array().unwrap().iter().map(|p| p["id"].to_string()).collect();
    assert!(kept.len() < before, "the points past the damage are gone: {kept:?}");
    for id in &kept {
        let out = server.drctl(&["verify", "bit", "--point", id]);
        assert_eq!(out.status.code(), Some(0), "point {id} before the damage: {out:?}");
    }
    assert!(std::fs::read_dir(&dir).unwrap().any(|e| e.unwrap().path().to_string_lossy().contains(".seg.")));
    let p = server.checkpoint("bit");
    assert_point_recovers(&server, root, "bit", &p, &b3(&disk, None));
    assert_eq!(server.status("bit")["health"], "normal");
}

/// A disk resized under protection: the refusal says what to do and the agent asks again
/// every few seconds, so that a disk put back to its size goes on replicating (W18-B: an
/// in-place copy that truncated first stopped the agent for good); `drctl remove` (refused
/// while the agent runs, and without --delete-points) removes the VM's copy, and the agent,
/// started again, protects the disk anew at its new size, byte for byte.
#[test]
fn a_resized_disk_is_protected_anew_after_its_copy_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let mut agent = protect_vm(&server, root, "grown", 8, 2, &[]);
    server.drctl_json(&["policy", "set", "grown", "--crash-interval", "7m"]);
    let out = server.drctl(&["remove", "grown", "--delete-points"]);
    assert_eq!(out.status.code(), Some(6), "refused while the agent runs: {out:?}");
    let refused = |server: &Server| {
        deadline_poll("the resized disk refused", Duration::from_secs(30), || {
            let s = server.status("grown");
            s["error"].as_str().is_some_and(|e| e.contains("drctl remove grown --delete-points")).then_some(s)
        })
    };
    // Grown while the agent runs: its next pass finds it, says why to the server (not only
    // in its own log), and the agent waits, asking again.
    let disk = root.join("grown.img");
    let before = b3(&disk, None);
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(12 << 20).unwrap();
    write_at(&disk, 10 << 20, &[0x5a; 8192]);
    let _ = server.drctl(&["checkpoint", "grown", "--wait"]);
    let s = refused(&server);
    assert_eq!(s["health"], "critical", "{s}");
    assert!(agent.child.as_mut().unwrap().try_wait().unwrap().is_none(), "the agent waits, asking again");
    // Put back to its size: replication goes on by itself, the refusal goes.
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(8 << 20).unwrap();
    assert_eq!(b3(&disk, None), before);
    server.wait_connected("grown");
    deadline_poll("the refusal to go", Duration::from_secs(60), || {
        server.status("grown")["error"].is_null().then_some(())
    });
    let p = server.checkpoint("grown");
    assert_point_recovers(&server, root, "grown", &p, &before);
    // Emptied for a moment (a copy in place that truncates first): said in status (W18-C:
    // it stayed normal), and gone once the disk is back.
    let saved = std::fs::read(&disk).unwrap();
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(0).unwrap();
    let _ = server.drctl(&["checkpoint", "grown", "--wait"]);
    deadline_poll("size 0 in status", Duration::from_secs(60), || {
        server.status("grown")["error"].as_str().is_some_and(|e| e.contains("has size 0")).then_some(())
    });
    std::fs::write(&disk, &saved).unwrap();
    deadline_poll("the refusal to go", Duration::from_secs(60), || {
        server.status("grown")["error"].is_null().then_some(())
    });
    // Grown again, for good this time.
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(12 << 20).unwrap();
    write_at(&disk, 10 << 20, &[0x5a; 8192]);
    let _ = server.drctl(&["checkpoint", "grown", "--wait"]);
    refused(&server);

    let out = server.drctl(&["remove", "grown"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--delete-points"), "{out:?}");
    // The agent connects for a moment at each of its tries: the removal may meet one.
    let removed = deadline_poll("the copy removed", Duration::from_secs(30), || {
        let out = server.drctl(&["remove", "grown", "--delete-points", "--json"]);
        out.status.success().then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap())
    });
    assert!(removed["points_deleted"].as_u64().unwrap() >= 1, "{removed}");
    // Its policy goes with it; the reply says how to set it again.
    let restore = removed["restore_policy"].as_str().unwrap().to_string();
    assert!(restore.contains("--crash-interval 7m"), "{removed}");
    assert!(!server.data.join("vms/grown").exists());
    // At its next try the server takes the disk at its new size, which this process opened
    // at the old one: it exits 1, and its unit starts it again.
    assert_eq!(agent.wait_exit("the agent to exit for a restart").code(), Some(1));
    assert!(agent.log_text().contains("start the agent again to protect it at its new size"));
    agent.restart();
    server.wait_connected("grown");
    let p = server.checkpoint("grown");
    assert_point_recovers(&server, root, "grown", &p, &b3(&disk, None));
    assert_eq!(server.status("grown")["disks"][0]["size"], 12 << 20);
    let args: Vec<&str> = restore.split_whitespace().skip(1).collect();
    server.drctl_json(&args);
    assert_eq!(server.status("grown")["policy"]["crash_interval"], "7m");
}

/// A daemon whose log reader goes away (a log shipper's pipe closed, a closed terminal)
/// loses log lines, not its work: the process server and an nbd-mode agent (the VM's disk)
/// go on making points, and the server still stops on SIGTERM.
#[test]
fn daemons_go_on_when_their_log_reader_goes_away() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    let (mut child, port) = spawn_listening(
        std::process::Command::new(bin("process-server"))
            .args(["serve", "--data-dir"])
            .arg(&server.data)
            .args(["--listen", "127.0.0.1:0"])
            .env("TERN_SPACE_RESERVE", "16MiB")
            .stderr(std::process::Stdio::piped()),
    );
    drop(child.stderr.take());
    server.port = port;
    let identity = root.join("q.bundle");
    server.enroll_agent("q", &identity);
    let disk = root.join("q.img");
    make_random(&disk, 8, 2, 11);
    let socket = root.join("q.sock");
    let mut agent = std::process::Command::new(bin("mobility-agent"))
        .args(["run", "--server", &server.url(), "--identity"])
        .arg(&identity)
        .args(["--vm", "q", "--mode", "nbd", "--interval", "1h", "--state-dir"])
        .arg(root.join("q-state"))
        .arg("--disk")
        .arg(format!("sda={}", disk.display()))
        .arg("--nbd-listen")
        .arg(format!("unix:{}", socket.display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(agent.stderr.take());
    server.wait_connected("q");
    for _ in 0..3 {
        server.checkpoint("q");
    }
    assert!(agent.try_wait().unwrap().is_none(), "the agent is still the VM's disk");
    let term = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let exited = deadline_poll("the process server to stop on SIGTERM", Duration::from_secs(20), || {
        child.try_wait().unwrap()
    });
    assert!(exited.success(), "{exited:?}");
    let _ = agent.kill();
    let _ = agent.wait();
}

/// A server dialled by an address its certificate does not name says what to do, and
/// `process-server reissue-cert --san` (a name forgotten at init) fixes it after a restart;
/// the admin bundle issued before stays valid.
#[test]
fn a_name_forgotten_at_init_is_added_by_reissuing_the_server_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let server = Server::init(root);
    let serve = || {
        spawn_listening(
            std::process::Command::new(bin("process-server"))
                .args(["serve", "--data-dir"])
                .arg(&server.data)
                .args(["--listen", "127.0.0.2:0"])
                .env("TERN_SPACE_RESERVE", "16MiB")
                .stderr(std::process::Stdio::null()),
        )
    };
    // Status through 127.0.0.2 from a server started anew; the server is stopped after.
    let status_there = |args: &[&str]| {
        let (mut child, port) = serve();
        let out = drctl_as(&format!("https://127.0.0.2:{port}"), &server.admin(), args);
        let _ = child.kill();
        let _ = child.wait();
        out
    };
    let reissue = |san: &str| {
        std::process::Command::new(bin("process-server"))
            .args(["reissue-cert", "--data-dir"])
            .arg(&server.data)
            .args(["--san", san])
            .output()
            .unwrap()
    };
    let out = status_there(&["status"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("process-server reissue-cert") && err.contains("--san"), "{err}");
    let out = reissue("127.0.0.2");
    assert!(out.status.success(), "{out:?}");
    let out = status_there(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    // Another name later keeps the names the certificate had; run as root on the data
    // directory of a server that runs as its own user (here nobody), the new files are
    // that user's, not root's (the server could not read them and did not start).
    let chown = std::process::Command::new("chown").args(["-R", "65534:65534"]).arg(&server.data).status();
    assert!(chown.unwrap().success());
    let out = reissue("dr.example.test");
    for f in ["server.pem", "server.key"] {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(server.data.join("pki").join(f)).unwrap();
        assert_eq!((m.uid(), m.gid()), (65534, 65534), "{f}");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("127.0.0.2") && text.contains("dr.example.test"),
        "{out:?}"
    );
    let out = status_there(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
}

/// A disk file the agent cannot open shows in the VM's status, not only in the agent's log
/// (W18-B: the VM showed "agent no" until the RPO threshold): gone while the agent runs,
/// the pass that cannot read it says so; at the agent's start, the agent says so before it
/// exits 1. Back in place, a point is made and the VM is whole again.
#[test]
fn a_disk_file_the_agent_cannot_open_shows_in_status() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("gone.bundle");
    server.enroll_agent("gone", &identity);
    let disk = root.join("gone.img");
    make_random(&disk, 8, 2, 5);
    let state = root.join("gone-state");
    let agent = Agent::start(&server, &identity, "gone", &[("sda", &disk)], &state, &[]);
    server.wait_connected("gone");
    server.checkpoint("gone");
    let away = root.join("away.img");
    std::fs::rename(&disk, &away).unwrap();
    server.drctl_json(&["policy", "set", "gone", "--crash-interval", "1s"]);
    let said = |what: &str| {
        deadline_poll(what, Duration::from_secs(30), || {
            let s = server.status("gone");
            let e = s["error"].as_str().unwrap_or_default().to_string();
            (s["health"] == "critical" && e.contains("gone.img") && e.contains("No such file")).then_some(e)
        })
    };
    let e = said("the pass that cannot read the disk said in status");
    assert!(e.contains("tries again"), "{e}");
    drop(agent);
    server.drctl_json(&["policy", "set", "gone", "--crash-interval", "5m"]);
    let mut agent = Agent::start(&server, &identity, "gone", &[("sda", &disk)], &state, &[]);
    assert_eq!(agent.wait_exit("an agent without its disk to stop").code(), Some(1));
    let e = said("the agent's start without its disk said in status");
    assert!(e.contains("exits and its unit starts it again"), "{e}");
    std::fs::rename(&away, &disk).unwrap();
    let _agent = Agent::start(&server, &identity, "gone", &[("sda", &disk)], &state, &[]);
    server.wait_connected("gone");
    let p = server.checkpoint("gone");
    let out = root.join("back");
    let res = server.drctl_json(&["test-failover", "gone", "--output", out.to_str().unwrap()]);
    assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), b3(&disk, None), "point {p}");
    let s = server.status("gone");
    assert!(s["error"].is_null(), "{s}");
}
