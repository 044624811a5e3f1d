//! Identities: an agent writes only its own VM, another CA is refused, agents cannot administer.

use crate::harness::*;
use std::sync::Once;
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
