//! `--mode nbd`: the agent serves the VM's disks over NBD and streams every write. Real
//! clients (nbdinfo, qemu-io, qemu-img, nbdsh) write through it; points are marks in the
//! write stream, so each one is the disk after some prefix of the writes.

use crate::harness::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// nbdsh runs the system's python3, which has the libnbd module.
fn nbdsh(uri: &str, script: &str) -> Command {
    let mut c = Command::new("nbdsh");
    c.env("PATH", "/usr/bin:/bin").args(["-u", uri, "-c", script]);
    c
}

struct NbdVm {
    server: Server,
    agent: Agent,
    disk: PathBuf,
    uri: String,
}

/// A VM protected in nbd mode: a `size_mib` disk with `data_mib` of data, its first point made.
fn protect_nbd(root: &Path, size_mib: u64, data_mib: u64, extra: &[&str]) -> NbdVm {
    let vm = start_nbd(root, |disk| make_random(disk, size_mib, data_mib, 7), extra);
    vm.server.checkpoint("db");
    vm
}

/// VM `db` in nbd mode: a server, the disk `make_disk` writes, its agent started (no point
/// waited for), the export at `db.sock`.
fn start_nbd(root: &Path, make_disk: impl FnOnce(&Path), extra: &[&str]) -> NbdVm {
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("db.bundle");
    server.enroll_agent("db", &identity);
    let disk = root.join("db.img");
    make_disk(&disk);
    let socket = root.join("db.sock");
    let listen = format!("unix:{}", socket.display());
    let mut args = vec!["--mode", "nbd", "--nbd-listen", &listen];
    args.extend_from_slice(extra);
    let agent = Agent::start(&server, &identity, "db", &[("sda", &disk)], &root.join("db-state"), &args);
    let uri = format!("nbd+unix:///sda?socket={}", socket.display());
    NbdVm { server, agent, disk, uri }
}

/// Test-fails over to `point`, checks the output against its manifest, returns its BLAKE3
/// and path (cleaned up by the next call).
fn test_failover(server: &Server, root: &Path, point: &Value) -> (String, PathBuf) {
    let id = point["id"].to_string();
    let out = root.join(format!("tfo-{id}"));
    let res = server.drctl_json(&["test-failover", "db", "--point", &id, "--output", out.to_str().unwrap()]);
    let file = out.join("sda.raw");
    let hash = b3(&file, None);
    assert_eq!(
        res["disks"][0]["blake3"].as_str().unwrap(),
        hash,
        "point {id}: output differs from its manifest"
    );
    (hash, file)
}

/// The disk file cut short under an nbd-mode agent (it serves the size it opened): the
/// VM's status says so (W18-C: it stayed normal while no point could be made); put back to
/// its size, the warning goes and points are made again, the disk byte for byte.
#[test]
fn a_disk_file_cut_short_under_the_agent_shows_in_status_until_it_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let vm = protect_nbd(root, 8, 4, &[]);
    vm.server.drctl_json(&["policy", "set", "db", "--crash-interval", "1s"]);
    let whole = std::fs::read(&vm.disk).unwrap();
    std::fs::OpenOptions::new().write(true).open(&vm.disk).unwrap().set_len(4 << 20).unwrap();
    let s = deadline_poll("the cut in status", Duration::from_secs(30), || {
        let s = vm.server.status("db");
        s["error"].as_str().is_some_and(|e| e.contains("bytes now")).then_some(s)
    });
    assert_ne!(s["health"], "normal", "{s}");
    std::fs::write(&vm.disk, &whole).unwrap();
    deadline_poll("the warning to go", Duration::from_secs(60), || {
        vm.server.status("db")["error"].is_null().then_some(())
    });
    let p = vm.server.checkpoint("db");
    let (got, _) = test_failover(&vm.server, root, &p);
    assert_eq!(got, b3(&vm.disk, None));
}

#[test]
fn real_clients_write_through_the_agent_and_each_point_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let vm = protect_nbd(root, 32, 4, &[]);

    // nbdinfo lists the export with its size.
    let sock = vm.uri.split("socket=").nth(1).unwrap().to_string();
    let list =
        run_ok(Command::new("nbdinfo").args(["--json", "--list"]).arg(format!("nbd+unix:///?socket={sock}")))
            .unwrap();
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["exports"][0]["export-name"], "sda");
    assert_eq!(list["exports"][0]["export-size"].as_u64(), Some(32 << 20));

    let received_before = vm.server.status("db")["bytes_received"].as_u64().unwrap();
    // qemu-io: a pattern, zeroes (WRITE_ZEROES), a discard (TRIM), a flush.
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 1M 2M",
        "-c",
        "write -z 5M 1M",
        "-c",
        "discard 8M 64k",
        "-c",
        "write -P 0x11 12345 4000",
        "-c",
        "flush",
        &vm.uri,
    ]))
    .unwrap();
    // nbdsh (libnbd): an unaligned write with FUA.
    run_ok(&mut nbdsh(&vm.uri, "h.pwrite(b'tern' * 3000, 3 * 1024 * 1024 + 17, nbd.CMD_FLAG_FUA)")).unwrap();
    // What the clients see is the local disk.
    run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&vm.disk).arg(&vm.uri))
        .unwrap();

    let point = vm.server.checkpoint("db");
    let (hash, out) = test_failover(&vm.server, root, &point);
    deadline_poll("status to show the log", Duration::from_secs(10), || {
        (vm.server.status("db")["disks"][0]["tracking"] == "log").then_some(())
    });
    let text = String::from_utf8(vm.server.drctl(&["status", "db"]).stdout).unwrap();
    assert!(text.contains("disk sda: 32.0 MiB, tracking log, backlog"), "{text}");
    assert_eq!(hash, b3(&vm.disk, None), "the point differs from the disk");
    run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&vm.disk).arg(&out))
        .unwrap();
    // Only the writes travelled, never the disk.
    let received = vm.server.status("db")["bytes_received"].as_u64().unwrap() - received_before;
    assert!(received < 4 << 20, "{received} bytes received for about 3 MiB of writes");
    assert!(!vm.agent.log_text().contains("ERROR"), "{}", tail(&vm.agent.log_text(), 20));
}

/// The writer of the order test: record i (1-based) of `n` goes to 4 KiB slot
/// `i * 7919 % slots` and holds i; each acked record is noted in `progress`.
const WRITER: &str = r"
import time
n, slots, progress = int(N), int(SLOTS), open(PROGRESS, 'w')
for i in range(1, n + 1):
    h.pwrite(i.to_bytes(8, 'little') * 512, (i * 7919 % slots) * 4096)
    progress.write('%d\n' % i)
    progress.flush()
    time.sleep(0.001)
";

/// A writer script for `n` records over `slots` slots, noting its progress in `progress`.
fn writer_script(template: &str, n: u64, slots: u64, progress: &Path) -> String {
    template
        .replace("int(N)", &n.to_string())
        .replace("int(SLOTS)", &slots.to_string())
        .replace("PROGRESS", &format!("{:?}", progress.display().to_string()))
}

#[test]
fn every_point_is_the_disk_after_a_prefix_of_the_acked_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let vm = protect_nbd(root, 16, 0, &[]);
    let (n, slots) = (3000u64, 2048u64);
    let progress = root.join("progress");
    let script = writer_script(WRITER, n, slots, &progress);
    let mut writer = nbdsh(&vm.uri, &script).spawn().unwrap();
    let acked = || {
        let text = std::fs::read_to_string(&progress).unwrap_or_default();
        text.lines().filter_map(|l| l.parse::<u64>().ok()).next_back().unwrap_or(0)
    };
    // Points while the writer runs, each with the writes acked before it was asked for.
    let mut points = Vec::new();
    while writer.try_wait().unwrap().is_none() {
        let before = acked();
        let p = vm.server.checkpoint("db");
        points.push((p, before));
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(writer.wait().unwrap().success());
    assert_eq!(acked(), n);
    points.push((vm.server.checkpoint("db"), n));
    assert!(points.len() >= 4, "only {} points during the writes", points.len());

    // The disk after the first k writes, slot by slot.
    let after = |k: u64| {
        let mut s = vec![0u64; slots as usize];
        for i in 1..=k {
            s[(i * 7919 % slots) as usize] = i;
        }
        s
    };
    let mut prefixes = Vec::new();
    for (point, before) in &points {
        let (_, file) = test_failover(&vm.server, root, point);
        let data = std::fs::read(&file).unwrap();
        let got: Vec<u64> = data[..(slots * 4096) as usize]
            .chunks(4096)
            .map(|c| u64::from_le_bytes(c[..8].try_into().unwrap()))
            .collect();
        let k = got.iter().copied().max().unwrap();
        assert_eq!(got, after(k), "point {}: not the disk after the first {k} writes", point["id"]);
        assert!(
            k >= *before,
            "point {}: holds {k} writes, {before} were acked before it was asked for",
            point["id"]
        );
        prefixes.push(k);
        vm.server.drctl_json(&["test-failover-cleanup", "db"]);
    }
    assert!(prefixes.windows(2).all(|w| w[0] <= w[1]), "prefixes go back: {prefixes:?}");
    assert!(prefixes.iter().any(|&k| k > 0 && k < n), "no point fell inside the writes: {prefixes:?}");
}

/// The timed writer: like [`WRITER`], and each line of `progress` also says when the
/// write was issued and when it was acked (Unix ms, the agent's clock: the same machine).
const TIMED_WRITER: &str = r"
import time
n, slots, progress = int(N), int(SLOTS), open(PROGRESS, 'w')
for i in range(1, n + 1):
    issued = int(time.time() * 1000)
    h.pwrite(i.to_bytes(8, 'little') * 512, (i * 7919 % slots) * 4096)
    progress.write('%d %d %d\n' % (i, issued, int(time.time() * 1000)))
    time.sleep(0.001)
progress.close()
";

/// RFC 3339 (UTC, milliseconds) of Unix millisecond `ms`, as `--point` takes it.
fn rfc3339_ms(ms: u64) -> String {
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{}.{:03}", ms / 1000, ms % 1000), "+%Y-%m-%dT%H:%M:%S.%3NZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn a_test_failover_to_any_time_between_two_points_is_the_disk_at_that_moment() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let vm = protect_nbd(root, 16, 0, &[]);
    let (n, slots) = (2000u64, 2048u64);
    let progress = root.join("progress");
    let script = writer_script(TIMED_WRITER, n, slots, &progress);
    // No point is made while the writer runs: every moment asked for lies between the
    // point before it and the one after.
    assert!(nbdsh(&vm.uri, &script).status().unwrap().success());
    let after_point = vm.server.checkpoint("db");
    let writes = timed_writes(&progress);
    assert_eq!(writes.len() as u64, n);
    let (start, end) = (writes[0].1, writes[writes.len() - 1].2);
    let held = moments_hold(&vm, root, &writes, slots, Some(&after_point["id"]));
    assert!(held.windows(2).all(|w| w[0] < w[1]), "each later moment holds more writes: {held:?}");
    // The human form says what was written.
    let out = root.join("tfo-human");
    let when = rfc3339_ms((start + end) / 2);
    let text = String::from_utf8(
        vm.server.drctl(&["test-failover", "db", "--point", &when, "--output", out.to_str().unwrap()]).stdout,
    )
    .unwrap();
    // The time as the server prints it (RFC 3339 drops trailing zeroes of the fraction).
    let printed = text.split(' ').next().unwrap_or_default();
    assert_eq!(chrono_ms(printed), chrono_ms(&when), "{text}");
    assert!(text.contains(" written, between points "), "{text}");
    // A failover to that moment commits at that moment, and says so.
    vm.server.drctl_json(&["test-failover-cleanup", "db"]);
    let out = root.join("failed-over");
    vm.server.drctl_json(&[
        "failover",
        "db",
        "--kind",
        "unplanned",
        "--point",
        &when,
        "--output",
        out.to_str().unwrap(),
    ]);
    let committed = vm.server.drctl_json(&["commit", "db"]);
    assert_eq!(committed["between_points"][1], after_point["id"], "{committed}");
    assert_eq!(chrono_ms(committed["time"].as_str().unwrap()), chrono_ms(&when), "{committed}");
}

/// The primary site is lost with writes made after the newest point: they reached the
/// process server, stamped with when the VM wrote them, so an unplanned failover to
/// `latest` (no point can be made with the agent gone) writes them too, as the moment
/// after the point, and commits there. (Before, it wrote the point and lost them: up to a
/// crash interval of acknowledged writes.)
#[test]
fn an_unplanned_failover_with_the_agent_gone_keeps_what_arrived_after_the_newest_point() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut vm = protect_nbd(root, 32, 4, &[]);
    let point = vm.server.checkpoint("db");
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0xcd 8M 8M", "-c", "flush", &vm.uri]))
        .unwrap();
    let want = b3(&vm.disk, None);
    // Every write the agent logged is durable at the server.
    deadline_poll("the writes to reach the server", Duration::from_secs(60), || {
        let d = vm.server.status("db")["disks"][0].clone();
        let ahead = d["durable_seq"].as_u64()? > point["disks"][0]["seq"].as_u64()?;
        (ahead && d["backlog_bytes"].as_u64() == Some(0)).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    vm.agent.kill9();
    let out = root.join("failed-over");
    let res =
        vm.server.drctl_json(&["failover", "db", "--kind", "unplanned", "--output", out.to_str().unwrap()]);
    assert_eq!(res["between_points"], serde_json::json!([point["id"], 0]), "{res}");
    assert!(res["note"].as_str().unwrap().contains(&format!("after point {}", point["id"])), "{res}");
    assert_eq!(b3(&out.join("sda.raw"), None), want, "the writes after the point are there");
    let text = String::from_utf8(vm.server.drctl(&["commit", "db"]).stdout).unwrap();
    assert!(text.contains(&format!("(after point {})", point["id"])), "{text}");
    let h = vm.server.drctl_json(&["status", "db"]);
    assert_eq!(h["state"], "failover-committed", "{h}");
}

/// The timed writer's lines: (write, issued, acked).
fn timed_writes(progress: &Path) -> Vec<(u64, u64, u64)> {
    std::fs::read_to_string(progress)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Vec<u64> = l.split(' ').map(|x| x.parse().unwrap()).collect();
            (v[0], v[1], v[2])
        })
        .collect()
}

/// Test-fails over to five moments spread over the timed `writes`: each output must be
/// the disk after the first k writes, with every write acked by then and none issued
/// after it. `after`: the point each moment must come before. Returns each moment's k.
fn moments_hold(
    vm: &NbdVm,
    root: &Path,
    writes: &[(u64, u64, u64)],
    slots: u64,
    after: Option<&Value>,
) -> Vec<u64> {
    let (start, end) = (writes[0].1, writes[writes.len() - 1].2);
    let mut held = Vec::new();
    for step in 1..=5u64 {
        let t = start + (end - start) * step / 6;
        let when = rfc3339_ms(t);
        let out = root.join(format!("tfo-{step}"));
        let res = vm.server.drctl_json(&[
            "test-failover",
            "db",
            "--point",
            &when,
            "--output",
            out.to_str().unwrap(),
        ]);
        if let Some(after) = after {
            assert_eq!(&res["between_points"][1], after, "at {when}: {res}");
        }
        assert_eq!(res["consistency"], "crash");
        let file = out.join("sda.raw");
        assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), b3(&file, None), "at {when}");
        let data = std::fs::read(&file).unwrap();
        let got: Vec<u64> = data
            .chunks(4096)
            .take(slots as usize)
            .map(|c| u64::from_le_bytes(c[..8].try_into().unwrap()))
            .collect();
        let k = got.iter().copied().max().unwrap();
        let mut want = vec![0u64; slots as usize];
        for i in 1..=k {
            want[(i * 7919 % slots) as usize] = i;
        }
        assert_eq!(got, want, "at {when}: not the disk after the first {k} writes");
        // Every write acked by then is there; none issued after it.
        let acked = writes.iter().filter(|w| w.2 <= t).map(|w| w.0).max().unwrap_or(0);
        let issued = writes.iter().filter(|w| w.1 <= t).map(|w| w.0).max().unwrap_or(0);
        assert!(
            acked <= k && k <= issued,
            "at {when}: holds {k} writes; {acked} acked and {issued} issued by then"
        );
        held.push(k);
        vm.server.drctl_json(&["test-failover-cleanup", "db"]);
    }
    held
}

/// The server killed and back while a timed writer runs: the log goes on through the
/// outage, so every moment of it is still the disk at that moment.
#[test]
fn through_a_server_outage_every_moment_is_the_disk_at_that_moment() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut vm = protect_nbd(root, 16, 0, &["--log-buffer", "1MiB"]);
    let (n, slots) = (3000u64, 2048u64);
    let progress = root.join("progress");
    let script = writer_script(TIMED_WRITER, n, slots, &progress);
    let mut writer = nbdsh(&vm.uri, &script).spawn().unwrap();
    let lines = || std::fs::read_to_string(&progress).map(|t| t.lines().count() as u64).unwrap_or(0);
    deadline_poll("the writer to get going", Duration::from_secs(60), || (lines() >= n / 4).then_some(()));
    vm.server.kill9();
    deadline_poll("the writer to go on", Duration::from_secs(60), || (lines() >= n * 3 / 4).then_some(()));
    vm.server.start();
    assert!(writer.wait().unwrap().success());
    vm.server.checkpoint("db");
    let writes = timed_writes(&progress);
    assert_eq!(writes.len() as u64, n);
    let held = moments_hold(&vm, root, &writes, slots, None);
    assert!(held.windows(2).all(|w| w[0] < w[1]), "each later moment holds more writes: {held:?}");
    let log = vm.agent.log_text();
    assert!(log.contains("the change log goes on where its journal ends"), "{}", tail(&log, 20));
    assert!(hot_mib_compared(&log).is_empty(), "nothing is compared:\n{}", tail(&log, 20));
}

/// Random 4 KiB writes into `[8, 16)` MiB for `secs`, one every `gap_ms`, then a flush.
fn churn(uri: &str, secs: u64, gap_ms: u64, seed: u64) -> std::process::Child {
    let script = format!(
        "import random, time\nr = random.Random({seed})\nend = time.time() + {secs}\nwhile time.time() < end:\n    \
         h.pwrite(bytes([r.randrange(1, 256)]) * 4096, r.randrange(8 * 256, 16 * 256) * 4096)\n    \
         time.sleep({gap})\nh.flush()",
        gap = gap_ms as f64 / 1000.0
    );
    nbdsh(uri, &script).spawn().unwrap()
}

/// Waits until the agent's log has `needle` (`what` for the failure message).
fn wait_log(agent: &Agent, needle: &str, what: &str, within: Duration) {
    deadline_poll(what, within, || agent.log_text().contains(needle).then_some(()));
}

/// `mib` MiB of random data written through the export from `from_mib` on, 256 KiB at a time.
fn write_mib(uri: &str, from_mib: u64, mib: u64) {
    let script = format!(
        "import os\nfor i in range({n}):\n    h.pwrite(os.urandom(262144), {from} + i * 262144)\nh.flush()",
        n = mib * 4,
        from = from_mib << 20
    );
    run_ok(&mut nbdsh(uri, &script)).unwrap();
}

/// The process server away while the VM writes: the change log goes on, in memory and then
/// in the state directory. Back within `--spill-max`, the log goes on where the server's
/// journal ends (nothing compared, every write in order); past it, the log is dropped, the
/// extents written are the dirty map, and only those are compared.
#[test]
fn the_log_goes_on_through_a_server_outage_then_past_its_spill_the_written_extents_are_compared() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut vm = protect_nbd(root, 256, 2, &["--log-buffer", "1MiB", "--spill-max", "32MiB"]);
    let spill = root.join("db-state").join("spill.log");
    let spilled = || std::fs::metadata(&spill).map(|m| m.len()).unwrap_or(0);

    // A short outage under churn: the log spills, and is sent once the server is back.
    let mut writer = churn(&vm.uri, 10, 3, 5);
    std::thread::sleep(Duration::from_millis(500));
    vm.server.kill9();
    // 12 MiB: more than the log's memory and what the streaming thread holds for the link
    // (1 MiB, and about 5 MiB of batches).
    write_mib(&vm.uri, 24, 12);
    let during = spilled();
    assert!(during > 1 << 20, "{during} bytes in the spill");
    vm.server.start();
    wait_log(
        &vm.agent,
        "the change log goes on where its journal ends",
        "the log to go on",
        Duration::from_secs(30),
    );
    assert!(writer.wait().unwrap().success());
    let point = vm.server.checkpoint("db");
    let (hash, _) = test_failover(&vm.server, root, &point);
    assert_eq!(hash, b3(&vm.disk, None), "{}", tail(&vm.agent.log_text(), 20));
    let log = vm.agent.log_text();
    assert!(hot_mib_compared(&log).is_empty(), "nothing is compared:\n{}", tail(&log, 20));
    assert!(!log.contains("dropping it"), "{}", tail(&log, 20));
    assert_eq!(spilled(), 0, "the spill ({during} bytes while the server was away) is sent and emptied");
    vm.server.drctl_json(&["test-failover-cleanup", "db"]);

    // An outage of a minute under churn, with more writes than the log and its spill hold:
    // the log is dropped, and once the server is back the extents written are compared.
    let mut writer = churn(&vm.uri, 66, 3, 6);
    std::thread::sleep(Duration::from_millis(500));
    vm.server.kill9();
    let down = std::time::Instant::now();
    write_mib(&vm.uri, 40, 12);
    assert!(spilled() > 1 << 20, "{} bytes in the spill", spilled());
    write_mib(&vm.uri, 52, 36);
    wait_log(&vm.agent, "dropping it", "the log to pass its spill", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(60).saturating_sub(down.elapsed()));
    vm.server.start();
    assert!(writer.wait().unwrap().success());
    let point = vm.server.checkpoint("db");
    let (hash, _) = test_failover(&vm.server, root, &point);
    assert_eq!(hash, b3(&vm.disk, None));
    let log = vm.agent.log_text();
    assert!(log.contains("the change log was dropped while the server was away"), "{}", tail(&log, 20));
    // Written since the last committed point: [8, 16) by the churn, [24, 36) and [40, 88)
    // (in 4 MiB extents), of 256 MiB.
    let hot = hot_mib_compared(&log);
    assert!(hot.last().is_some_and(|&h| h <= 68), "hot MiB compared: {hot:?}\n{}", tail(&log, 20));
}

#[test]
fn a_log_larger_than_its_memory_spills_to_the_state_directory_and_drains_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // 1 MiB of log in memory and a link of 1 MiB/s: most of 12 MiB of writes wait in the
    // spill, for about 10 s (the agent reports how it tracks every 2 s; a faster link, under
    // a loaded machine, could drain it between two reports).
    let vm = protect_nbd(root, 32, 2, &["--log-buffer", "1MiB", "--max-rate", "1MiB"]);
    let script = "import os\nfor i in range(48):\n    h.pwrite(os.urandom(262144), 4 * 1048576 + i * 262144)\nh.flush()";
    run_ok(&mut nbdsh(&vm.uri, script)).unwrap();
    let spill = root.join("db-state").join("spill.log");
    let spilled = std::fs::metadata(&spill).map(|m| m.len()).unwrap_or(0);
    assert!(spilled > 2 << 20, "{spilled} bytes in the spill");
    // drctl status says so, with the backlog.
    let mut seen = Vec::new();
    deadline_poll("status to show the spill", Duration::from_secs(20), || {
        let d = vm.server.status("db")["disks"][0].clone();
        seen.push(format!("{} {}", d["tracking"], d["backlog_bytes"]));
        assert!(seen.len() < 180, "status never showed the spill: {seen:?}");
        (d["tracking"] == "spill" && d["backlog_bytes"].as_u64().unwrap_or(0) > 0).then_some(())
    });
    let point = vm.server.checkpoint("db");
    let (hash, _) = test_failover(&vm.server, root, &point);
    assert_eq!(hash, b3(&vm.disk, None));
    assert_eq!(std::fs::metadata(&spill).unwrap().len(), 0, "the spill is emptied once sent");
    let log = vm.agent.log_text();
    assert!(!log.contains("dropping it"), "{}", tail(&log, 20));
}

#[test]
fn past_its_spill_the_log_is_dropped_and_the_written_extents_are_compared() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let vm = protect_nbd(root, 32, 2, &["--log-buffer", "1MiB", "--spill-max", "2MiB", "--max-rate", "2MiB"]);
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x77 4M 8M", "-c", "flush", &vm.uri]))
        .unwrap();
    let point = vm.server.checkpoint("db");
    let (hash, _) = test_failover(&vm.server, root, &point);
    assert_eq!(hash, b3(&vm.disk, None));
    let log = vm.agent.log_text();
    assert!(log.contains("--spill-max") && log.contains("dropping it"), "{}", tail(&log, 20));
}

/// The MiB of hot extents each resync of the agent's log compared, in order.
fn hot_mib_compared(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("comparing") && l.contains("hot_mib="))
        .filter_map(|l| l.split("hot_mib=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

/// `n` 4 KiB writes at random pages of `[from_mib, to_mib)` through the export.
fn writes_in(uri: &str, n: u32, from_mib: u64, to_mib: u64, seed: u64) {
    let (a, b) = (from_mib * 256, to_mib * 256);
    let script = format!(
        "import random\nr = random.Random({seed})\nfor i in range({n}):\n    h.pwrite(bytes([r.randrange(1, 256)]) * 4096, r.randrange({a}, {b}) * 4096)\nh.flush()"
    );
    run_ok(&mut nbdsh(uri, &script)).unwrap();
}

#[test]
fn a_killed_agent_compares_only_the_extents_written_since_its_last_point() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut vm = protect_nbd(root, 64, 32, &[]);
    // Written and covered by a point: two extents stay hot a while, then go cold.
    writes_in(&vm.uri, 50, 0, 8, 1);
    vm.server.checkpoint("db");
    // Written after the last point, and the agent is killed under these writes: some
    // reached the server, some did not, the last was never acked.
    let churn = "import random, time\nr = random.Random(2)\nwhile True:\n    h.pwrite(bytes([r.randrange(1, 256)]) * 4096, r.randrange(16 * 256, 20 * 256) * 4096)\n    time.sleep(0.001)";
    let mut writer = nbdsh(&vm.uri, churn).stderr(std::process::Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    vm.agent.kill9();
    assert!(!writer.wait().unwrap().success(), "the writer should have lost its export");
    // What the killed agent had sent is read off the connection until the server sees it go.
    deadline_poll("the server to see the agent gone", Duration::from_secs(30), || {
        (vm.server.status("db")["agent_connected"] == false).then_some(())
    });
    let received_before = vm.server.status("db")["bytes_received"].as_u64().unwrap();
    vm.agent.restart();
    vm.server.wait_connected("db");
    writes_in(&vm.uri, 10, 40, 44, 3);
    let point = vm.server.checkpoint("db");
    let (hash, _) = test_failover(&vm.server, root, &point);
    assert_eq!(hash, b3(&vm.disk, None), "the point after the restart differs from the disk");
    let log = vm.agent.log_text();
    let hot = hot_mib_compared(&log);
    // The restart compared three extents (12 MiB) of the 64 MiB disk.
    assert_eq!(hot.last(), Some(&12), "{}", tail(&log, 20));
    let received = vm.server.status("db")["bytes_received"].as_u64().unwrap() - received_before;
    // At most the 4 MiB the writer was churning (records the server holds past the agent's
    // saved state are sent again whole) and the new writes: not the disk's 32 MiB of data.
    assert!(received < 5 << 20, "{received} bytes received after the restart");
}

/// A VM that writes a little all the time never leaves the log idle: its writes still
/// reach the server within moments (a batch waits 50 ms at most), not once 4,096 records
/// have gathered (about 40 s here).
#[test]
fn writes_that_never_stop_reach_the_server_within_moments() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let vm = protect_nbd(root, 32, 4, &[]);
    let durable = || vm.server.status("db")["disks"][0]["durable_seq"].as_u64().unwrap();
    let before = durable();
    let progress = root.join("written");
    let script = format!(
        "import time\nn = 0\nend = time.time() + 30\nwhile time.time() < end:\n    \
         h.pwrite(bytes([n % 251 + 1]) * 4096, (n % 2048) * 4096)\n    h.flush()\n    n += 1\n    \
         open({p:?}, 'w').write(str(n))\n    time.sleep(0.01)",
        p = progress.display().to_string()
    );
    let mut writer = nbdsh(&vm.uri, &script).spawn().unwrap();
    let written = || std::fs::read_to_string(&progress).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let acked = deadline_poll("100 writes through the export", Duration::from_secs(60), || {
        written().filter(|&n| n >= 100)
    });
    // One record a write; the writer goes on meanwhile.
    deadline_poll("the acked writes to be durable on the server", Duration::from_secs(10), || {
        (durable() >= before + acked).then_some(())
    });
    writer.kill().unwrap();
    writer.wait().unwrap();
}

/// A disk written while its nbd-mode agent was stopped (a backup restored in place, another
/// tool), or another file put in its place, is not what the activity log describes: the
/// next start compares it in full, and the next point is the disk as it is.
#[test]
fn a_disk_changed_while_its_agent_was_stopped_is_compared_in_full() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut vm = protect_nbd(root, 48, 16, &[]);
    writes_in(&vm.uri, 20, 0, 4, 1);
    vm.server.checkpoint("db");
    let compared = |vm: &NbdVm| hot_mib_compared(&vm.agent.log_text());

    // Stopped and started again with nothing changed: only the hot extents are compared.
    vm.agent.stop();
    vm.agent.restart();
    vm.server.wait_connected("db");
    let p = vm.server.checkpoint("db");
    assert_eq!(test_failover(&vm.server, root, &p).0, b3(&vm.disk, None));
    assert!(compared(&vm).last().is_some_and(|&mib| mib < 48), "{}", tail(&vm.agent.log_text(), 20));
    vm.server.drctl_json(&["test-failover-cleanup", "db"]);

    // Written in place while the agent is stopped.
    vm.agent.stop();
    scatter_writes(&vm.disk, 0.01, 5);
    vm.agent.restart();
    vm.server.wait_connected("db");
    let p = vm.server.checkpoint("db");
    assert_eq!(test_failover(&vm.server, root, &p).0, b3(&vm.disk, None), "a stale point");
    assert_eq!(compared(&vm).last(), Some(&48), "{}", tail(&vm.agent.log_text(), 20));
    vm.server.drctl_json(&["test-failover-cleanup", "db"]);

    // Another file moved over the disk's path, killed rather than stopped this time.
    vm.agent.kill9();
    let other = root.join("restored.img");
    std::fs::copy(&vm.disk, &other).unwrap();
    scatter_writes(&other, 0.01, 6);
    std::fs::rename(&other, &vm.disk).unwrap();
    vm.agent.restart();
    vm.server.wait_connected("db");
    let p = vm.server.checkpoint("db");
    assert_eq!(test_failover(&vm.server, root, &p).0, b3(&vm.disk, None), "a stale point");
    assert_eq!(compared(&vm).last(), Some(&48), "{}", tail(&vm.agent.log_text(), 20));
}

/// The agent's export as a block device of this machine: nbdfuse shows it as a file, a
/// loop device makes that a disk. Taken down in order when dropped.
struct Attached {
    fuse_dir: PathBuf,
    fuse: std::process::Child,
    device: Option<LoopDevice>,
}

impl Attached {
    fn new(uri: &str, dir: &Path) -> Attached {
        std::fs::create_dir_all(dir).unwrap();
        let fuse = Command::new("nbdfuse").arg(dir).arg(uri).spawn().unwrap();
        let file = dir.join("nbd");
        deadline_poll("nbdfuse to serve the export", Duration::from_secs(10), || {
            std::fs::metadata(&file).ok().filter(|m| m.len() > 0).map(|_| ())
        });
        Attached { fuse_dir: dir.to_path_buf(), fuse, device: Some(LoopDevice::attach(&file)) }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.device.take();
        let _ = Command::new("umount").arg(&self.fuse_dir).status();
        let _ = self.fuse.wait();
    }
}

/// The case scan mode cannot serve without a long freeze: a database committing every
/// 2 ms on ext4, no freeze hook. Through the agent's export, points come every second
/// while it writes, and every one of them recovers the database intact.
#[test]
fn a_database_written_through_the_export_gets_a_point_every_second_each_intact() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let vm = start_nbd(root, |disk| make_ext4(disk, 48, 5), &[]);
    let server = &vm.server;
    server.checkpoint("db");
    server.drctl_json(&["policy", "set", "db", "--crash-interval", "1s"]);
    let uri = vm.uri.clone();
    let attached = Attached::new(&uri, &root.join("fuse"));
    let mut mnt = Mounted::new(&attached.device.as_ref().unwrap().dev, &root.join("mnt"), &[]);

    let (committed, stop) = (AtomicI64::new(0), AtomicBool::new(false));
    let started_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    // Scheduled points made since the writes began (no freeze, no scan): about one a second.
    let made_since_start = |points: &Value| -> Vec<Value> {
        let made = points.as_array().unwrap().iter();
        made.filter(|p| chrono_ms(p["time"].as_str().unwrap()) > started_ms).cloned().collect()
    };
    let requested = std::thread::scope(|s| {
        s.spawn(|| sqlite_writer(&mnt.dir.join("app.db"), &committed, &stop));
        // At least 6 s of writes; longer only while a slow phase of a shared machine
        // leaves the database or the schedule short of what the checks below need.
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs(6));
        while started.elapsed() < Duration::from_secs(60)
            && (committed.load(Ordering::Acquire) <= 500
                || made_since_start(&server.drctl_json(&["points", "db"])).len() < 4)
        {
            std::thread::sleep(Duration::from_millis(500));
        }
        let before = committed.load(Ordering::Acquire);
        let p = server.checkpoint("db");
        stop.store(true, Ordering::Relaxed);
        (p, before)
    });
    assert!(committed.load(Ordering::Acquire) > 500, "the database barely wrote");

    let points = server.drctl_json(&["points", "db"]);
    let during: Vec<Value> =
        made_since_start(&points).into_iter().filter(|p| p["id"] != requested.0["id"]).collect();
    assert!(during.len() >= 4, "{} points while the database wrote: {points}", during.len());
    let mut to_check: Vec<(Value, i64)> = during.iter().rev().take(3).map(|p| (p.clone(), 0)).collect();
    to_check.push(requested);
    for (i, (p, before)) in to_check.iter().enumerate() {
        let out = root.join(format!("p{i}"));
        server.drctl_json(&[
            "test-failover",
            "db",
            "--point",
            &p["id"].to_string(),
            "--output",
            out.to_str().unwrap(),
        ]);
        let what = format!("point {}", p["id"]);
        check_database_image(&out.join("sda.raw"), &root.join(format!("m{i}")), *before, &what);
        server.drctl_json(&["test-failover-cleanup", "db"]);
    }
    mnt.unmount();
}

/// Milliseconds since the epoch of an RFC 3339 time as drctl prints it (UTC, `Z`).
fn chrono_ms(t: &str) -> u128 {
    let out = Command::new("date").args(["-u", "-d", t, "+%s%3N"]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().parse().unwrap()
}

/// qemu-io on VM `db`'s export with `reconnect-delay` (a request waits up to 30 s for the
/// agent to come back), running `cmds` then a flush.
fn qemu_io_reconnecting(root: &Path, cmds: &[&str]) -> std::process::Child {
    let sock = root.join("db.sock");
    let opts =
        format!("driver=nbd,server.type=unix,server.path={},export=sda,reconnect-delay=30", sock.display());
    let mut qemu = Command::new("qemu-io");
    qemu.args(["--image-opts", &opts]);
    for c in cmds.iter().chain(&["flush"]) {
        qemu.args(["-c", c]);
    }
    qemu.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
}

/// Waits for qemu-io and checks that none of its requests failed.
fn assert_no_qemu_error(qemu: std::process::Child) {
    let out = qemu.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !text.contains("error"), "qemu-io: {text}");
}

/// QEMU with `reconnect-delay`: a write issued while the agent is down waits for it and
/// lands once the agent is back; the next point has it.
#[test]
fn qemu_writes_wait_while_the_agent_restarts_and_land_in_the_next_point() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut vm = protect_nbd(root, 32, 2, &[]);
    let qemu = qemu_io_reconnecting(root, &["write -P 0x61 1M 64k", "sleep 2500", "write -P 0x62 2M 64k"]);
    std::thread::sleep(Duration::from_millis(800));
    vm.agent.kill9();
    std::thread::sleep(Duration::from_millis(500));
    vm.agent.restart();
    assert_no_qemu_error(qemu);
    let data = std::fs::read(&vm.disk).unwrap();
    assert!(
        data[2 << 20..(2 << 20) + 65536].iter().all(|&b| b == 0x62),
        "the second write is not on the disk"
    );
    let point = vm.server.checkpoint("db");
    let (hash, _) = test_failover(&vm.server, root, &point);
    assert_eq!(hash, b3(&vm.disk, None));
}

/// The agent stopped as its unit stops it (SIGTERM) while QEMU writes every 50 ms: no write
/// fails; those that came while it stopped are sent again to the next agent.
#[test]
fn qemu_writes_through_a_clean_restart_of_the_agent_never_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut vm = protect_nbd(root, 32, 2, &[]);
    let writes: Vec<String> = (0..80u64)
        .flat_map(|i| [format!("write -P {} {}k 4k", i % 200 + 1, i * 4), "sleep 50".into()])
        .collect();
    let qemu = qemu_io_reconnecting(root, &writes.iter().map(String::as_str).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_millis(1000));
    vm.agent.stop();
    vm.agent.restart();
    assert_no_qemu_error(qemu);
    let point = vm.server.checkpoint("db");
    let (hash, _) = test_failover(&vm.server, root, &point);
    assert_eq!(hash, b3(&vm.disk, None));
}

/// A state directory with no room for the spill: the log is dropped with a clear reason,
/// the hot extents are compared, and no write is lost.
#[test]
fn a_full_state_directory_drops_the_log_and_loses_no_write() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let _small = Mounted::new(Path::new("tmpfs"), &root.join("db-state"), &["-t", "tmpfs", "-o", "size=1m"]);
    let vm = protect_nbd(root, 32, 2, &["--log-buffer", "1MiB", "--max-rate", "4MiB"]);
    let script = "import os\nfor i in range(64):\n    h.pwrite(os.urandom(262144), 4 * 1048576 + i * 262144)\nh.flush()";
    run_ok(&mut nbdsh(&vm.uri, script)).unwrap();
    let df = run_ok(Command::new("df").arg(root.join("db-state"))).unwrap();
    let point = vm.server.checkpoint("db");
    let (hash, _) = test_failover(&vm.server, root, &point);
    assert_eq!(hash, b3(&vm.disk, None));
    let log = vm.agent.log_text();
    assert!(log.contains("cannot spill to the state directory"), "{df}\n{}", tail(&log, 20));
}

/// Writes during the first sync, more than the log holds: the sync compares what they
/// touched again instead of starting over, and the first point has them.
#[test]
fn writes_that_overflow_the_log_during_the_first_sync_are_compared_again() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let vm = start_nbd(
        root,
        |disk| make_random(disk, 32, 16, 9),
        &["--log-buffer", "1MiB", "--spill-max", "1MiB", "--max-rate", "8MiB"],
    );
    let sock = root.join("db.sock");
    deadline_poll("the export", Duration::from_secs(10), || sock.exists().then_some(()));
    let script = "import os, time\nfor i in range(24):\n    h.pwrite(os.urandom(262144), 20 * 1048576 + i * 262144)\n    time.sleep(0.02)\nh.flush()";
    run_ok(&mut nbdsh(&vm.uri, script)).unwrap();
    let point = vm.server.checkpoint("db");
    let (hash, _) = test_failover(&vm.server, root, &point);
    assert_eq!(hash, b3(&vm.disk, None));
    let log = vm.agent.log_text();
    assert!(log.contains("filled up during the resync"), "{}", tail(&log, 20));
}

/// An app-consistent point in nbd mode freezes the VM only around the mark (no scan under
/// the freeze), says for how long, and holds every write made before it.
#[test]
fn an_app_consistent_point_freezes_only_for_the_mark() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let log = root.join("hooks.log");
    let (freeze, thaw) = logging_hooks(&log);
    let vm = start_nbd(root, |disk| make_random(disk, 32, 8, 3), &["--freeze", &freeze, "--thaw", &thaw]);
    vm.server.checkpoint("db");
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 4M 3M", "-c", "flush", &vm.uri]))
        .unwrap();
    let before = std::fs::read_to_string(&log).unwrap_or_default().lines().count();
    let p = vm.server.drctl_json(&["checkpoint", "db", "--wait", "--app-consistent"]);
    assert_eq!(p["consistency"], "app", "{p}");
    let note = p["note"].as_str().unwrap();
    let ms: u64 = note
        .strip_prefix("frozen ")
        .and_then(|n| n.strip_suffix(" ms for the mark"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the note says how long the VM was frozen: {note:?}"));
    assert!(ms < 1000, "frozen {ms} ms for a mark");
    let calls: Vec<String> =
        std::fs::read_to_string(&log).unwrap().lines().skip(before).map(String::from).collect();
    assert_eq!(calls, ["freeze", "thaw"], "one freeze, then its thaw");
    let (hash, _) = test_failover(&vm.server, root, &p);
    assert_eq!(hash, b3(&vm.disk, None), "the point holds every write made before it");
}

/// Revoking an nbd-mode agent's identity stops replication, not the VM: the export goes on
/// taking writes, and an agent started with a new identity sends them.
#[test]
fn a_revoked_nbd_agent_keeps_serving_the_disk_and_a_new_identity_sends_what_was_written() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut vm = protect_nbd(root, 32, 4, &[]);
    let serial = vm
        .server
        .drctl_json(&["identities"])
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["role"] == "agent")
        .unwrap()["serial"]
        .as_str()
        .unwrap()
        .to_string();
    vm.server.drctl_json(&["revoke", &serial]);
    wait_log(&vm.agent, "the disks stay served", "the agent to log its refusal", Duration::from_secs(30));
    assert!(vm.agent.log_text().contains("has been revoked"), "{}", vm.agent.log_text());
    assert!(vm.agent.child.as_mut().unwrap().try_wait().unwrap().is_none(), "the agent goes on running");
    // The operator sees why nothing arrives, before any RPO threshold passes.
    let status = vm.server.drctl_json(&["status", "db"]);
    assert!(status["error"].as_str().unwrap().contains("has been revoked"), "{status}");
    assert_eq!(status["health"], "critical", "{status}");
    // The VM writes on, through the export.
    write_mib(&vm.uri, 8, 4);
    let written = b3(&vm.disk, None);

    // The operator enrolls a new identity and restarts the agent with it.
    vm.agent.kill9();
    let fresh = root.join("db2.bundle");
    vm.server.enroll_agent("db", &fresh);
    let sock = vm.uri.split("socket=").nth(1).unwrap().to_string();
    let listen = format!("unix:{sock}");
    let _ = std::fs::remove_file(&sock);
    let _agent = Agent::start(
        &vm.server,
        &fresh,
        "db",
        &[("sda", &vm.disk)],
        &root.join("db-state"),
        &["--mode", "nbd", "--nbd-listen", &listen],
    );
    let point = vm.server.checkpoint("db");
    let (hash, _) = test_failover(&vm.server, root, &point);
    assert_eq!(hash, written, "the writes made while the agent was refused are in the next point");
}

/// An unplanned failover while the source still runs: its nbd-mode agent stands down from
/// replication but goes on serving the disk, so the source VM's I/O does not fail under it.
#[test]
fn an_nbd_agent_told_to_stand_down_keeps_serving_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut vm = protect_nbd(root, 32, 4, &[]);
    let out = root.join("failed-over");
    vm.server.drctl_json(&["failover", "db", "--kind", "unplanned", "--output", out.to_str().unwrap()]);
    wait_log(
        &vm.agent,
        "stood down: the disks stay served",
        "the agent to stand down",
        Duration::from_secs(30),
    );
    write_mib(&vm.uri, 8, 2);
    let read = run_ok(&mut nbdsh(&vm.uri, "print(h.get_size())")).unwrap();
    assert_eq!(read.trim(), (32u64 << 20).to_string());
    assert!(vm.agent.child.as_mut().unwrap().try_wait().unwrap().is_none(), "the agent goes on running");
}

/// One agent serves a disk: a second on the same disk, or on the same socket, is refused
/// at start and the first goes on serving. `--nbd-socket-group` opens the socket to a group.
#[test]
fn a_second_agent_for_the_disk_or_the_socket_is_refused_and_the_socket_takes_a_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let vm = protect_nbd(root, 16, 2, &["--nbd-socket-group", "65534"]);
    let sock = root.join("db.sock");
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!((meta.permissions().mode() & 0o777, meta.gid()), (0o660, 65534));

    let identity = root.join("db.bundle");
    let other_sock = format!("unix:{}", root.join("other.sock").display());
    let mut same_disk = Agent::start(
        &vm.server,
        &identity,
        "db",
        &[("sda", &vm.disk)],
        &root.join("st-2"),
        &["--mode", "nbd", "--nbd-listen", &other_sock],
    );
    assert!(!same_disk.wait_exit("the second agent on the disk to stop").success());
    assert!(same_disk.log_text().contains("is served by another nbd-mode agent"), "{}", same_disk.log_text());

    let copy = root.join("copy.img");
    std::fs::copy(&vm.disk, &copy).unwrap();
    let live_sock = format!("unix:{}", sock.display());
    let mut same_sock = Agent::start(
        &vm.server,
        &identity,
        "db",
        &[("sda", &copy)],
        &root.join("st-3"),
        &["--mode", "nbd", "--nbd-listen", &live_sock],
    );
    assert!(!same_sock.wait_exit("the agent on a live socket to stop").success());
    assert!(same_sock.log_text().contains("is served by another process"), "{}", same_sock.log_text());
    // The first still serves.
    write_mib(&vm.uri, 4, 1);
    let p = vm.server.checkpoint("db");
    let (hash, _) = test_failover(&vm.server, root, &p);
    assert_eq!(hash, b3(&vm.disk, None));
}

/// The process server's data directory fills while the VM overwrites the same few MiB: the
/// change log's backlog (every overwrite) is far more than retention can free, where
/// comparing the extents written since the last point sends at most their size. The log is
/// given up for the compare, and once retention has made room (an hour later on the
/// server's clock, past the window) replication goes on by itself, byte for byte. (With
/// the log kept, its backlog filled whatever retention freed and no point came again.)
#[test]
fn a_full_server_gives_up_a_log_larger_than_the_written_extents() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (server, _tmpfs, clock) = server_on_a_small_tmpfs(root, "48m");
    let identity = root.join("db.bundle");
    server.enroll_agent("db", &identity);
    let disk = root.join("db.img");
    make_random(&disk, 16, 0, 0);
    let socket = root.join("db.sock");
    let listen = format!("unix:{}", socket.display());
    let args = ["--mode", "nbd", "--nbd-listen", &listen, "--log-buffer", "4MiB", "--spill-max", "512MiB"];
    let agent = Agent::start(&server, &identity, "db", &[("sda", &disk)], &root.join("db-state"), &args);
    server.wait_connected("db");
    server.drctl_json(&["policy", "set", "db", "--retention", "30m", "--crash-interval", "1s"]);
    server.checkpoint("db");
    // Rounds of 8 MiB over the same 8 MiB, a point after each, until the 48 MiB file
    // system is full; then 8 rounds more, which the agent keeps (64 MiB, every overwrite).
    let uri = format!("nbd+unix:///sda?socket={}", socket.display());
    let full = || server.status("db")["error"].as_str().is_some_and(|e| e.contains("storage is full"));
    let mut after_full = 0;
    for _ in 0..40 {
        write_mib(&uri, 4, 8);
        std::thread::sleep(Duration::from_millis(1500));
        if after_full > 0 || full() {
            after_full += 1;
        }
        if after_full == 8 {
            break;
        }
    }
    assert_eq!(after_full, 8, "the server's storage never filled: {}", server.status("db"));
    // Past the window: retention folds every point but the newest into the base image.
    std::fs::write(&clock, "3600000").unwrap();
    let started = std::time::Instant::now();
    let point = loop {
        let out = server.drctl(&["checkpoint", "db", "--wait", "--json", "--timeout", "20s"]);
        if out.status.success() {
            break serde_json::from_slice::<Value>(&out.stdout).unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "no point once there is room: {}\nstatus {}\nagent:\n{}\nserver:\n{}",
            String::from_utf8_lossy(&out.stderr),
            server.status("db"),
            tail(&agent.log_text(), 30),
            tail(&server.log_text(), 30)
        );
    };
    let (hash, _) = test_failover(&server, root, &point);
    assert_eq!(hash, b3(&disk, None), "{}", tail(&agent.log_text(), 20));
    let log = agent.log_text();
    assert!(log.contains("the log stops, and once there is room"), "{}", tail(&log, 20));
}

/// The process server's data directory put back to an older copy (a restore), then to the
/// newer one again: the agent's state, saved against the older copy, is not taken for a
/// position in the newer one's journal, and the newest point equals the disk (W19-D: every
/// point made after the return failed its check, and status said normal).
#[test]
fn a_data_directory_put_back_in_time_and_forward_again_keeps_points_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut vm = protect_nbd(root, 16, 2, &[]);
    let write = |vm: &NbdVm, pattern: u8, at_mib: u64| {
        let cmd = format!("write -P {pattern} {at_mib}M 1M");
        run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", &cmd, "-c", "flush", &vm.uri])).unwrap();
    };
    let (ps, older, newer) = (vm.server.data.clone(), root.join("ps-older"), root.join("ps-newer"));
    let copy = |from: &Path, to: &Path| {
        assert!(Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap().success());
    };
    let restart = |vm: &mut NbdVm| {
        vm.server.start();
        vm.server.wait_connected("db");
    };
    write(&vm, 0x11, 1);
    vm.server.checkpoint("db");
    vm.server.kill9();
    copy(&ps, &older);
    restart(&mut vm);
    // Many records into the newer copy, of one block: its journal goes further than the
    // agent's state will go against the older one, where comparing sends that block once.
    let mut cmds = Vec::new();
    for i in 0..300u64 {
        cmds.extend(["-c".to_string(), format!("write -P {} 8M 4K", 1 + i % 200)]);
    }
    run_ok(Command::new("qemu-io").args(["-f", "raw"]).args(&cmds).args(["-c", "flush", &vm.uri])).unwrap();
    vm.server.checkpoint("db");
    vm.server.kill9();
    std::fs::rename(&ps, &newer).unwrap();
    copy(&older, &ps);
    restart(&mut vm);
    write(&vm, 0x33, 5);
    vm.server.checkpoint("db");
    assert!(vm.server.log_text().contains("the agent's saved state is ahead of this server's journal"));
    vm.server.kill9();
    std::fs::remove_dir_all(&ps).unwrap();
    std::fs::rename(&newer, &ps).unwrap();
    restart(&mut vm);
    write(&vm, 0x44, 7);
    let last = vm.server.checkpoint("db");
    let (hash, _) = test_failover(&vm.server, root, &last);
    assert_eq!(hash, b3(&vm.disk, None), "{}", tail(&vm.server.log_text(), 20));
}
