//! The status page, rendered by a real headless browser (Debian's chromium).

use crate::harness::*;
use std::process::Command;

fn chromium(args: &[&str], url: &str) -> String {
    run_ok(
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
            ])
            .args(args)
            .arg(url),
    )
    .expect("chromium (Debian's package, installed by .ci/run) renders the page")
}

#[test]
fn the_status_page_lists_the_vms_and_charts_every_point() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (server, port) = Server::with_http(root, "--web", "127.0.0.1");
    let _agents: Vec<Agent> =
        ["web", "db"].iter().map(|vm| protect_vm(&server, root, vm, 8, 2, &[])).collect();
    write_random(&root.join("web.img"), 1, 7);
    server.checkpoint("web");
    let url = format!("http://127.0.0.1:{port}/");
    assert!(http_get(port, "/healthz").ends_with("\r\n\r\nok\n"), "/healthz answers ok");

    let dom = chromium(&["--dump-dom"], &url);
    for vm in ["web", "db"] {
        let row = dom.split(&format!("<tr class=\"vm\" data-vm=\"{vm}\">")).nth(1).expect("a row per VM");
        let row = &row[..row.find("</tr>").unwrap()];
        assert!(row.contains("protected") && row.contains("normal"), "{vm}: {row}");
        let listed = server.drctl_json(&["points", vm]).as_array().unwrap().len();
        let chart = dom.split(&format!("class=\"chart\" data-vm=\"{vm}\"")).nth(1).expect("a chart per VM");
        let chart = &chart[..chart.find("</svg>").unwrap()];
        assert_eq!(chart.matches("class=\"point").count(), listed, "{vm}: one mark per point: {chart}");
    }
    assert!(dom.contains("id=\"jobs\"") && dom.contains("initial-sync"), "the jobs table");

    let shot = root.join("status.png");
    chromium(&[&format!("--screenshot={}", shot.display()), "--window-size=1280,900"], &url);
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a screenshot of the page: {} bytes",
        png.len()
    );
    // Kept for a look: the test's temp dir is removed, so copy it where CI keeps files.
    if let Ok(dir) = std::env::var("TERN_TEST_ARTIFACTS") {
        let _ = std::fs::copy(&shot, std::path::Path::new(&dir).join("status.png"));
    }
}

/// Off loopback the page is HTTPS and shows itself only to an admin identity: curl with
/// the admin bundle gets it, with an agent's bundle or none it is turned away.
#[test]
fn off_loopback_the_status_page_takes_only_an_admin_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (server, port) = Server::with_http(root, "--web", "0.0.0.0");
    let agent = root.join("web.bundle");
    server.enroll_agent("web", &agent);
    // curl takes the CA, the certificate and the key as separate files.
    let split = |bundle: &std::path::Path, name: &str| {
        let b = tern_core::pki::Bundle::load(bundle).unwrap();
        let (ca, cert, key) = (
            root.join(format!("{name}-ca.pem")),
            root.join(format!("{name}.pem")),
            root.join(format!("{name}.key")),
        );
        std::fs::write(&ca, b.ca_pem).unwrap();
        std::fs::write(&cert, b.cert_pem).unwrap();
        std::fs::write(&key, b.key_pem).unwrap();
        (ca, cert, key)
    };
    let url = format!("https://127.0.0.1:{port}/healthz");
    let curl = |id: Option<&(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)>,
                ca: &std::path::Path| {
        let mut c = Command::new("curl");
        c.args(["-s", "--max-time", "10", "--cacert"]).arg(ca);
        if let Some((_, cert, key)) = id {
            c.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        c.arg(&url).output().expect("curl (installed by .ci/run)")
    };
    let admin = split(&server.admin(), "admin");
    let ok = deadline_poll("the page over HTTPS", std::time::Duration::from_secs(20), || {
        let out = curl(Some(&admin), &admin.0);
        out.status.success().then_some(out)
    });
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "ok\n");
    let agent = split(&agent, "agent");
    assert!(!curl(Some(&agent), &admin.0).status.success(), "an agent identity is turned away");
    assert!(!curl(None, &admin.0).status.success(), "no identity is turned away");
    // A second admin is let in until it is revoked.
    let second = root.join("admin2.bundle");
    server.drctl_json(&["enroll", "admin", "--out", second.to_str().unwrap()]);
    let second_serial = tern_core::pki::Bundle::load(&second).unwrap().info().unwrap().serial;
    let second = split(&second, "admin2");
    assert!(curl(Some(&second), &admin.0).status.success(), "a second admin identity is let in");
    server.drctl_json(&["revoke", &second_serial]);
    assert!(!curl(Some(&second), &admin.0).status.success(), "a revoked admin identity is turned away");
    assert!(curl(Some(&admin), &admin.0).status.success(), "the first admin identity still is let in");
    let plain = Command::new("curl")
        .args(["-s", "--max-time", "5", &format!("http://127.0.0.1:{port}/healthz")])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("ok"), "no plain HTTP off loopback");
}
