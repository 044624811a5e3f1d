//! Identities: an agent writes only its own VM, another CA is refused, agents cannot administer.

use crate::harness::*;
use std::path::Path;
use std::sync::Once;
use std::time::Duration;
use tern_core::pki::Bundle;
use tern_proto as pb;

fn provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[test]
fn identities_are_enforced() {
    provider();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let a = root.join("a.bundle");
    server.enroll_agent("a", &a);

    // The agent binary refuses a bundle of another VM before it dials.
    let disk = root.join("b.img");
    make_random(&disk, 4, 1, 1);
    let out = std::process::Command::new(bin("mobility-agent"))
        .args(["run", "--server", &server.url(), "--identity", a.to_str().unwrap(), "--vm", "b"])
        .args([
            "--disk",
            &format!("sda={}", disk.display()),
            "--state-dir",
            root.join("st").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("identity of VM a, not b"));

    // The server refuses it too, whatever the client says.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let bundle = Bundle::load(&a).unwrap();
    let url = server.url();
    let status = rt.block_on(async {
        let ch = pb::connect(&url, &bundle).await.unwrap();
        let mut c = pb::replication_client::ReplicationClient::new(ch);
        let hello = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                vm: "b".into(),
                disks: vec![pb::DiskInfo { name: "sda".into(), size: 1 << 20, ..Default::default() }],
                protocol: 1,
                ..Default::default()
            })),
        };
        match c.replicate(tokio_stream::iter(vec![hello])).await {
            Ok(_) => panic!("writing VM b with VM a's certificate must fail"),
            Err(status) => status,
        }
    });
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("for VM a; it cannot write VM b"), "{}", status.message());

    // An agent identity on the admin API.
    let out = drctl_as(&server.url(), &a, &["status"]);
    assert_eq!(out.status.code(), Some(1), "refused by the server: exit 1");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs an admin identity"), "{err}");

    // A certificate from another deployment's CA.
    let other = tempfile::tempdir().unwrap();
    let foreign = Server::init(other.path());
    let out = drctl_as(&server.url(), &foreign.admin(), &["status"]);
    assert_eq!(out.status.code(), Some(3), "not accepted by the server: exit 3");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to another deployment"), "{err}");

    // A bundle whose key is another identity's: refused before dialling, saying why.
    let own = std::fs::read_to_string(server.admin()).unwrap();
    let theirs = std::fs::read_to_string(foreign.admin()).unwrap();
    let key = |pem: &str| pem[pem.find("-----BEGIN PRIVATE KEY-----").unwrap()..].to_string();
    let mixed = other.path().join("mixed.bundle");
    std::fs::write(&mixed, own.replace(&key(&own), &key(&theirs))).unwrap();
    let out = drctl_as(&server.url(), &mixed, &["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not belong to its certificate"), "{err}");
    assert_eq!(out.status.code(), Some(2), "a broken identity file is a usage mistake: exit 2");
    // Nothing listening: exit 3.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = drctl_as(&format!("https://127.0.0.1:{closed}"), &server.admin(), &["status"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    // The admin identity still works, and the server logged each refusal with the identity.
    let out = server.drctl(&["status"]);
    assert!(out.status.success());
    let log = server.log_text();
    assert!(log.contains("certificate is for another VM") && log.contains("identity=a"), "{log}");
    assert!(log.contains("non-admin identity refused") && log.contains("agent for VM a"), "{log}");
    assert!(log.contains("TLS handshake refused"), "{log}");
}

/// The serial `drctl enroll --json` printed.
fn enroll(server: &Server, args: &[&str]) -> String {
    server.drctl_json(args)["serial"].as_str().unwrap().to_string()
}

#[test]
fn a_revoked_identity_is_cut_off_and_refused_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    // init's admin identity is on record.
    let ids = server.drctl_json(&["identities"]);
    assert_eq!(ids.as_array().unwrap().len(), 1, "{ids}");
    assert_eq!(ids[0]["role"], "admin");
    assert!(ids[0]["revoked"].is_null());

    // Enrolled, not yet connected: said by `status` and by `status VM`.
    let first = root.join("web.bundle");
    let first_serial = enroll(&server, &["enroll", "agent", "--vm", "web", "--out", first.to_str().unwrap()]);
    let out = server.drctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("web is enrolled") && text.contains("has not connected yet"), "{text}");
    let all = server.drctl_json(&["status"]);
    assert_eq!(
        (&all[0]["vm"], &all[0]["state"], &all[0]["health"]),
        (&"web".into(), &"unprotected".into(), &"warning".into()),
        "{all}"
    );
    let out = server.drctl(&["status", "web"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("web is enrolled"), "{out:?}");
    assert_eq!(server.drctl_json(&["status", "web"])["state"], "unprotected");
    // A per-VM check says warning (not protected yet), not unknown.
    let out = server.drctl(&["status", "web", "--check"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    let disk = root.join("web.img");
    make_random(&disk, 8, 4, 7);
    let state = root.join("web-state");
    let mut agent = Agent::start(&server, &first, "web", &[("sda", &disk)], &state, &[]);
    server.checkpoint("web");
    let out = server.drctl(&["status"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("has not connected"), "{out:?}");

    // Revoked by 8 digits of its serial: the live session is cut, and the agent, refused
    // on its next call, stops saying why and what to do.
    let revoked = server.drctl_json(&["revoke", &first_serial[..8]]);
    assert_eq!(revoked[0]["serial"].as_str().unwrap(), first_serial);
    let status = agent.wait_exit("the revoked agent to stop");
    assert_eq!(status.code(), Some(3), "refused: the unit's RestartPreventExitStatus");
    let log = agent.log_text();
    assert!(log.contains("has been revoked") && log.contains("drctl enroll agent --vm web"), "{log}");

    // Another admin; it may revoke others but not itself, and once revoked it is refused.
    let second = root.join("admin2.bundle");
    let second_serial = enroll(&server, &["enroll", "admin", "--out", second.to_str().unwrap()]);
    let out = drctl_as(&server.url(), &second, &["revoke", &second_serial]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("the identity this request came with"), "{out:?}");
    server.drctl_json(&["revoke", &second_serial]);
    let out = drctl_as(&server.url(), &second, &["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has been revoked"), "{out:?}");

    // Wrong names: not hex (2), on record nowhere (5).
    assert_eq!(server.drctl(&["revoke", "zz"]).status.code(), Some(2));
    let out = server.drctl(&["revoke", "00000000"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bundle"), "{out:?}");

    // An identity the server never recorded (issued from the CA by hand): revoked from
    // its certificate alone.
    let pki = server.data.join("pki");
    let ca = tern_core::pki::Ca {
        cert_pem: std::fs::read_to_string(pki.join("ca.pem")).unwrap(),
        key_pem: std::fs::read_to_string(pki.join("ca.key")).unwrap(),
    };
    let stray = ca.issue_client(&tern_core::pki::Role::Admin).unwrap();
    let stray_file = root.join("stray.bundle");
    std::fs::write(&stray_file, stray.to_pem()).unwrap();
    let stray_cert = root.join("stray.pem");
    std::fs::write(&stray_cert, &stray.cert_pem).unwrap();
    server.drctl_json(&["revoke", "--bundle", stray_cert.to_str().unwrap()]);
    assert!(!drctl_as(&server.url(), &stray_file, &["status"]).status.success());
    let out = server.drctl(&["revoke", "--bundle", root.join("none.pem").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Another deployment's identity (W18-A: it was said revoked, and listed): refused,
    // nothing recorded.
    let listed = server.drctl_json(&["identities"]).as_array().unwrap().len();
    let elsewhere =
        tern_core::pki::Ca::create("elsewhere").unwrap().issue_client(&tern_core::pki::Role::Admin).unwrap();
    let foreign = root.join("foreign.pem");
    std::fs::write(&foreign, &elsewhere.cert_pem).unwrap();
    let out = server.drctl(&["revoke", "--bundle", foreign.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not issued by this process server's CA"),
        "{out:?}"
    );
    assert_eq!(server.drctl_json(&["identities"]).as_array().unwrap().len(), listed);

    // Across a restart: all of it stands. The list lost (W18-A: started anew and empty,
    // every revoked identity let in again): the server does not start (exit 2), saying what
    // to do; restored, it does.
    server.kill9();
    let list = server.data.join("pki/identities");
    let kept = std::fs::read(&list).unwrap();
    std::fs::remove_file(&list).unwrap();
    let out = std::process::Command::new(bin("process-server"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&server.data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is missing") && err.contains("Restore it from a backup"), "{err}");
    std::fs::write(&list, kept).unwrap();
    server.start();
    let out = drctl_as(&server.url(), &second, &["status"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("has been revoked"), "{out:?}");
    agent.restart();
    assert!(!agent.wait_exit("the revoked agent to stop again").success());
    let ids = server.drctl_json(&["identities"]);
    let revoked: Vec<&str> = ids
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| !i["revoked"].is_null())
        .map(|i| i["serial"].as_str().unwrap())
        .collect();
    assert_eq!(revoked.len(), 3, "{ids}");
    // Each with its expiry, five years after its issue.
    for i in ids.as_array().unwrap() {
        let (issued, expires) = (i["issued"].as_str().unwrap(), i["expires"].as_str().unwrap());
        let year = |t: &str| t[..4].parse::<i32>().unwrap();
        // 5 x 365 days: five years, or a day short of them across a leap day.
        assert!((4..=5).contains(&(year(expires) - year(issued))) && expires > issued, "{i}");
        assert_eq!(i["expired"], false, "{i}");
    }
    assert!(revoked.contains(&first_serial.as_str()) && revoked.contains(&second_serial.as_str()));

    // A new identity for the VM goes on replicating it, and its points are whole.
    let fresh = root.join("web2.bundle");
    enroll(&server, &["enroll", "agent", "--vm", "web", "--out", fresh.to_str().unwrap()]);
    let _agent = Agent::start(&server, &fresh, "web", &[("sda", &disk)], &state, &[]);
    scatter_writes(&disk, 0.05, 3);
    server.checkpoint("web");
    let out = root.join("tfo");
    let res = server.drctl_json(&["test-failover", "web", "--output", out.to_str().unwrap()]);
    assert_eq!(res["disks"][0]["blake3"].as_str().unwrap(), b3(&disk, None));
    assert_eq!(b3(&out.join("sda.raw"), None), b3(&disk, None));
}

/// Identities last five years. Near the end each daemon and drctl warn; after it, each says
/// its identity expired and what to do (the handshake's refusal showed only as "connection
/// closed"), and `process-server enroll-admin` on the server's host makes a new admin
/// identity when none is left valid. (faketime moves the clock of the command it runs.)
#[test]
fn an_expired_identity_says_so_and_a_new_admin_is_made_on_the_server_host() {
    use std::process::Command;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Server::init(root);
    server.start();
    let later = |days: u32, bin_name: &str| {
        let mut c = Command::new("faketime");
        c.arg("-f").arg(format!("+{days}d")).arg(bin(bin_name));
        c
    };
    let drctl_later = |days: u32, identity: &Path, args: &[&str]| {
        later(days, "drctl")
            .args(["--server", &server.url(), "--identity"])
            .arg(identity)
            .args(args)
            .output()
            .unwrap()
    };
    // Ten days before the end: works, and warns.
    let out = drctl_later(365 * 5 - 10, &server.admin(), &["status", "--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("expires on") && err.contains("enroll-admin"), "{out:?}");
    // After it: refused here, saying why and what to do.
    let out = drctl_later(365 * 5 + 2, &server.admin(), &["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(err.contains("expired on") && err.contains("process-server enroll-admin"), "{err}");
    // An agent's: exit 2, a configuration no restart mends.
    let identity = root.join("old.bundle");
    server.enroll_agent("old", &identity);
    let disk = root.join("old.img");
    make_random(&disk, 4, 1, 3);
    let out = later(365 * 5 + 2, "mobility-agent")
        .args(["run", "--server", &server.url(), "--vm", "old", "--identity"])
        .arg(&identity)
        .arg("--disk")
        .arg(format!("sda={}", disk.display()))
        .arg("--state-dir")
        .arg(root.join("old-state"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("expired on") && err.contains("drctl enroll agent --vm old"), "{err}");
    // A master target's: exit 2 too, which its unit does not restart.
    let mt_identity = root.join("mt.bundle");
    server.drctl_json(&[
        "enroll",
        "master-target",
        "--name",
        "127.0.0.1",
        "--out",
        mt_identity.to_str().unwrap(),
    ]);
    let out = later(365 * 5 + 2, "master-target")
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(root.join("mt"))
        .arg("--identity")
        .arg(&mt_identity)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("expired on") && err.contains("drctl enroll master-target"), "{err}");
    // A process server whose own certificate expired: exit 2 (its unit does not restart
    // it every 2 s), saying how to issue it again.
    let ps2 = root.join("ps2");
    let out = Command::new(bin("process-server")).args(["init", "--data-dir"]).arg(&ps2).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = later(365 * 5 + 2, "process-server")
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&ps2)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("expired on") && err.contains("reissue-cert"), "{err}");
    // A new admin identity from the CA in the data directory, with the server running.
    let fresh = root.join("fresh-admin.bundle");
    let out = Command::new(bin("process-server"))
        .args(["enroll-admin", "--data-dir"])
        .arg(&server.data)
        .arg("--out")
        .arg(&fresh)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // On record once it has connected (recorded off the accept path: soon after).
    deadline_poll("the new admin on record", Duration::from_secs(30), || {
        let out = drctl_as(&server.url(), &fresh, &["identities", "--json"]);
        assert!(out.status.success(), "{out:?}");
        let ids: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (ids.as_array().unwrap().iter().filter(|i| i["role"] == "admin").count() == 2).then_some(())
    });
}
