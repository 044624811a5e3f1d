//! Protect an ext4 image, change it, and test-fail over to each point, raw and VHD.

use crate::harness::*;
use std::process::Command;

#[test]
fn test_failover_to_each_point_is_byte_identical_in_raw_and_vhd() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("web.bundle");
    server.enroll_agent("web", &identity);
    let disk = root.join("web-sda.img");
    make_ext4(&disk, 64, 1);
    let _agent = Agent::start(&server, &identity, "web", &[("sda", &disk)], &root.join("agent-state"), &[]);

    let p1 = server.checkpoint("web");
    let h1 = b3(&disk, None);
    let copy1 = root.join("at-p1.img");
    std::fs::copy(&disk, &copy1).unwrap();
    let received_before = server.status("web")["bytes_received"].as_u64().unwrap();

    let changed = scatter_writes(&disk, 0.01, 2);
    let p2 = server.checkpoint("web");
    let h2 = b3(&disk, None);
    assert_ne!(h1, h2);
    let received = server.status("web")["bytes_received"].as_u64().unwrap() - received_before;
    let changed_bytes = changed as u64 * 4096;
    assert!(
        received <= changed_bytes * 3 / 2,
        "the 1% incremental sent {received} bytes for {changed_bytes} changed bytes"
    );

    let points = server.drctl_json(&["points", "web"]);
    let ids: Vec<u64> = points.as_array().unwrap().iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert!(ids.contains(&p1["id"].as_u64().unwrap()) && ids.contains(&p2["id"].as_u64().unwrap()));
    assert_eq!(points[0]["consistency"], "crash");

    let size = 64u64 << 20;
    for (point, hash, reference) in [(&p1, &h1, &copy1), (&p2, &h2, &disk)] {
        for format in ["raw", "vhd"] {
            let out = root.join(format!("tfo-{}-{format}", point["id"]));
            let id = point["id"].to_string();
            let res = server.drctl_json(&[
                "test-failover",
                "web",
                "--point",
                &id,
                "--output",
                out.to_str().unwrap(),
                "--format",
                format,
            ]);
            let file = out.join(format!("sda.{format}"));
            assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), hash.as_str());
            assert_eq!(&b3(&file, Some(size)), hash, "point {id} {format}: output differs from the source");
            let manifest: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out.join("vm.json")).unwrap()).unwrap();
            assert_eq!(manifest["disks"][0]["blake3"].as_str().unwrap(), hash.as_str());
            assert_eq!(manifest["point"].to_string(), id);
            if format == "vhd" {
                assert_eq!(std::fs::metadata(&file).unwrap().len(), size + 512);
                let info =
                    run_ok(Command::new("qemu-img").args(["info", "--output=json", "-f", "vpc"]).arg(&file))
                        .unwrap();
                let info: serde_json::Value = serde_json::from_str(&info).unwrap();
                assert_eq!(info["virtual-size"].as_u64(), Some(size));
                run_ok(
                    Command::new("qemu-img")
                        .args(["compare", "-f", "raw", "-F", "vpc"])
                        .arg(reference)
                        .arg(&file),
                )
                .unwrap();
            }
            // One open test failover per VM.
            let second =
                server.drctl(&["test-failover", "web", "--output", root.join("x").to_str().unwrap()]);
            assert!(!second.status.success());
            assert!(String::from_utf8_lossy(&second.stderr).contains("test-failover-cleanup"));
            server.drctl_json(&["test-failover-cleanup", "web"]);
            assert!(!file.exists() && !out.join("vm.json").exists(), "cleanup left {}", out.display());
        }
    }
    // Replication went on meanwhile.
    assert_eq!(server.status("web")["agent_connected"], true);
    assert_eq!(server.status("web")["state"], "protected");
}

#[test]
fn unknown_points_and_vms_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("db.bundle");
    server.enroll_agent("db", &identity);
    let disk = root.join("db.img");
    make_random(&disk, 8, 2, 3);
    let _agent = Agent::start(&server, &identity, "db", &[("sda", &disk)], &root.join("st"), &[]);
    server.checkpoint("db");
    let out = server.drctl(&[
        "test-failover",
        "db",
        "--point",
        "999",
        "--output",
        root.join("o").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(5), "not found: exit 5");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no point 999") && err.contains("drctl points db"), "{err}");
    let out = server.drctl(&["points", "nosuch"]);
    assert_eq!(out.status.code(), Some(5), "not found: exit 5");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not protected"));
    let out = server.drctl(&["test-failover-cleanup", "db"]);
    assert_eq!(out.status.code(), Some(6), "refused by state: exit 6");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no open test failover"));
    let out = server.drctl(&[
        "reprotect",
        "db",
        "--master-target",
        "https://127.0.0.1:1",
        "--location",
        "original",
        "--target-disk",
        "sda=/nonexistent/sda.img",
        "--identity-out",
        root.join("back.bundle").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(6), "reprotect while protected is refused by state: {out:?}");

    // An agent away for longer than the RPO threshold makes the VM critical: --check exits 2.
    server.drctl_json(&["policy", "set", "db", "--rpo-threshold", "1s"]);
    drop(_agent);
    deadline_poll("the away agent to make db critical", std::time::Duration::from_secs(30), || {
        let out = server.drctl(&["status", "db", "--check"]);
        (out.status.code() == Some(2)).then_some(())
    });
}

/// Replication through a WAN-like link (25 ms each way): the initial sync, an incremental
/// and a point are correct byte for byte. Correctness through latency; speed is in
/// bench/wan.sh.
#[test]
fn replication_through_a_delaying_link_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let wan = Proxy::delayed(server.port, std::time::Duration::from_millis(25));
    let identity = root.join("far.bundle");
    server.enroll_agent("far", &identity);
    let disk = root.join("far.img");
    make_random(&disk, 32, 12, 191);
    let _agent = Agent::start_at(&wan.url(), &identity, "far", &[("sda", &disk)], &root.join("st"), &[]);
    server.wait_connected("far");
    let p1 = server.checkpoint("far");
    let h1 = b3(&disk, None);
    scatter_writes(&disk, 0.02, 192);
    let p2 = server.checkpoint("far");
    for (p, want) in [(&p1, h1), (&p2, b3(&disk, None))] {
        let out = root.join(format!("tfo-{}", p["id"]));
        let res = server.drctl_json(&[
            "test-failover",
            "far",
            "--point",
            &p["id"].to_string(),
            "--output",
            out.to_str().unwrap(),
        ]);
        assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), want);
        assert_eq!(b3(&out.join("sda.raw"), None), want);
        server.drctl_json(&["test-failover-cleanup", "far"]);
    }
}

/// A qcow2 image given as a disk would be replicated as container bytes and written out as
/// if it were the disk: the agent refuses it with what to do, and nothing is sent.
#[test]
fn a_qcow2_source_is_refused_and_nothing_is_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("q.bundle");
    server.enroll_agent("q", &identity);
    let image = root.join("q.qcow2");
    run_ok(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&image).arg("32M")).unwrap();
    let mut agent = Agent::start(&server, &identity, "q", &[("sda", &image)], &root.join("st"), &[]);
    let status = agent.wait_exit("the agent to refuse the qcow2 image");
    // 2, a configuration no restart mends: the unit's RestartPreventExitStatus (1 restarted
    // the agent every 2 s for ever).
    assert_eq!(status.code(), Some(2), "{status}");
    let log = agent.log_text();
    assert!(log.contains("is a qcow2 image") && log.contains("qemu-img convert"), "{log}");
    let vms = server.drctl_json(&["status"]);
    // Listed as enrolled only: not registered, nothing received.
    assert!(
        vms.as_array().unwrap().iter().all(|v| v["state"] == "unprotected" && v["bytes_received"] == 0),
        "nothing registered, nothing sent: {vms}"
    );
}

/// VHD outputs of disks whose size is not a whole MiB (nor a whole sector) are valid VHDs
/// that qemu reads and that hold the disk (padded with zeroes to a whole MiB, as cloud
/// managed disks require); two exports of one point are two disks (different unique ids).
#[test]
fn vhd_outputs_of_odd_sized_disks_are_valid() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    for (i, size) in [3_000_000u64, (1 << 20) + 512, 64 << 20].into_iter().enumerate() {
        let vm = format!("odd{i}");
        let identity = root.join(format!("{vm}.bundle"));
        server.enroll_agent(&vm, &identity);
        let disk = root.join(format!("{vm}.img"));
        let data: Vec<u8> = (0..size.min(2 << 20)).map(|b| (b * 7 % 251) as u8).collect();
        std::fs::write(&disk, &data).unwrap();
        std::fs::File::options().write(true).open(&disk).unwrap().set_len(size).unwrap();
        let _agent =
            Agent::start(&server, &identity, &vm, &[("sda", &disk)], &root.join(format!("st{i}")), &[]);
        server.wait_connected(&vm);
        let p = server.checkpoint(&vm);
        let mut ids = Vec::new();
        for n in 0..2 {
            let out = root.join(format!("{vm}-{n}"));
            let res = server.drctl_json(&[
                "test-failover",
                &vm,
                "--point",
                &p["id"].to_string(),
                "--output",
                out.to_str().unwrap(),
                "--format",
                "vhd",
            ]);
            let vhd = out.join("sda.vhd");
            let d = &res["disks"][0];
            assert_eq!(d["blake3"].as_str().unwrap(), b3(&disk, None));
            let info =
                run_ok(Command::new("qemu-img").args(["info", "-f", "vpc", "--output", "json"]).arg(&vhd))
                    .unwrap_or_else(|e| panic!("{size} bytes: {e}"));
            let info: serde_json::Value = serde_json::from_str(&info).unwrap();
            assert_eq!(info["virtual-size"], size.next_multiple_of(1 << 20), "{info}");
            let cmp = Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "vpc"])
                .arg(&disk)
                .arg(&vhd)
                .output()
                .unwrap();
            assert!(cmp.status.success(), "{size} bytes: {}", String::from_utf8_lossy(&cmp.stdout));
            assert_eq!(d["size"], size);
            assert_eq!(d["virtual_size"], size.next_multiple_of(1 << 20));
            let f = std::fs::read(&vhd).unwrap();
            ids.push(f[f.len() - 512 + 68..f.len() - 512 + 84].to_vec());
            server.drctl_json(&["test-failover-cleanup", &vm]);
        }
        assert_ne!(ids[0], ids[1], "two exports, two unique ids");
    }
}

/// A disk far larger than the data it holds (64 GiB, sparse, 6 MiB of data spread to its
/// last byte): protected, changed, and test-failed over; the output is compared with the
/// source by `qemu-img compare`, and its holes stay holes. The agent's state follows the
/// data, not the disk: its table is sparse.
#[test]
fn a_64_gib_sparse_disk_is_protected_and_fails_over_byte_for_byte() {
    use rand::{RngCore, SeedableRng};
    use std::os::unix::fs::{FileExt, MetadataExt};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let identity = root.join("big.bundle");
    server.enroll_agent("big", &identity);
    let disk = root.join("big.img");
    let size = 64u64 << 30;
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(size).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(64);
    let mut buf = vec![0u8; 1 << 20];
    for at in [
        0,
        (7 << 30) + (64 << 10),
        (20 << 30) + (3 << 20),
        33 << 30,
        (47 << 30) + (128 << 10),
        size - (1 << 20),
    ] {
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, at).unwrap();
    }
    f.sync_all().unwrap();
    let state = root.join("agent-state");
    let _agent = Agent::start(&server, &identity, "big", &[("sda", &disk)], &state, &[]);
    server.checkpoint("big");
    for page in [3u64, 1 << 22, (size >> 12) - 1] {
        rng.fill_bytes(&mut buf[..4096]);
        f.write_all_at(&buf[..4096], page << 12).unwrap();
    }
    f.sync_all().unwrap();
    let p2 = server.checkpoint("big");
    // The process server works out the zero subtrees of a 64 GiB disk in the background
    // (34 MB per TiB: 8-byte magic, 2,080 bytes per 64 MiB); once they are there, the
    // output's BLAKE3 takes them for its holes instead of hashing 64 GiB of zeroes.
    let table = server.data.join("zero-subtrees");
    deadline_poll("the zero-subtree table to cover the disk", std::time::Duration::from_secs(300), || {
        (std::fs::metadata(&table).map_or(0, |m| m.len()) >= 8 + (size >> 26) * 2080).then_some(())
    });
    let out = root.join("tfo");
    let res = server.drctl_json(&[
        "test-failover",
        "big",
        "--point",
        &p2["id"].to_string(),
        "--output",
        out.to_str().unwrap(),
    ]);
    let file = out.join("sda.raw");
    run_ok(Command::new("qemu-img").args(["compare", "-q", "-f", "raw", "-F", "raw"]).arg(&disk).arg(&file))
        .expect("qemu-img compare: the test failover equals the disk");
    let allocated = |p: &std::path::Path| std::fs::metadata(p).unwrap().blocks() * 512;
    assert_eq!(std::fs::metadata(&file).unwrap().len(), size);
    assert!(allocated(&file) < 64 << 20, "holes stay holes: {} bytes allocated", allocated(&file));
    let table = state.join("disk-sda.table");
    assert!(allocated(&table) < 4 << 20, "the agent state follows the data: {} bytes", allocated(&table));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("vm.json")).unwrap()).unwrap();
    assert_eq!(manifest["disks"][0]["blake3"], res["disks"][0]["blake3"]);
    assert_eq!(manifest["schema"], 1, "vm.json names its layout");
    assert_eq!(manifest["tern_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(manifest["disks"][0]["format"], "raw");
}
