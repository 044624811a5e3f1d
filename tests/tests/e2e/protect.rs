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
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no point 999") && err.contains("drctl points db"), "{err}");
    let out = server.drctl(&["points", "nosuch"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not protected"));
    let out = server.drctl(&["test-failover-cleanup", "db"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no open test failover"));
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
