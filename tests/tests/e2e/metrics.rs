//! Prometheus metrics of the three daemons, scraped over HTTP as Prometheus would, and the
//! alert rules file checked by `promtool`.

use crate::harness::*;
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

fn scrape(port: u16) -> String {
    http_get(port, "/metrics")
}

/// The samples of the text format: `name{labels}` to value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("HTTP") && l.contains(' '))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn value(s: &HashMap<String, f64>, name: &str, vm: &str) -> Option<f64> {
    s.iter()
        .find(|(k, _)| k.starts_with(&format!("{name}{{")) && k.contains(&format!("vm=\"{vm}\"")))
        .map(|(_, v)| *v)
}

#[test]
fn metrics_of_two_replicating_vms_move_and_the_rules_pass_promtool() {
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/tern-rules.yml");
    let checked = run_ok(Command::new("promtool").args(["check", "rules"]).arg(&rules))
        .expect("promtool (Debian's prometheus package, installed by .ci/run) accepts the rules");
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested =
        run_ok(Command::new("promtool").args(["test", "rules"]).arg(rules.with_extension("test.yml")))
            .expect("the rules fire (and stay quiet) as deploy/prometheus/tern-rules.test.yml says");
    assert!(tested.contains("SUCCESS"), "{tested}");

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (server, ps_port) = Server::with_http(root, "--metrics", "127.0.0.1");
    let agent_port = free_port();
    let web_metrics = format!("127.0.0.1:{agent_port}");
    let _agents = [
        protect_vm(&server, root, "web", 16, 4, &["--metrics", &web_metrics]),
        protect_vm(&server, root, "db", 16, 4, &[]),
    ];
    // The gauges follow every 2 s.
    let before = deadline_poll("both VMs in the metrics", Duration::from_secs(20), || {
        let s = samples(&scrape(ps_port));
        (value(&s, "tern_vm_rpo_seconds", "web").is_some()
            && value(&s, "tern_vm_rpo_seconds", "db").is_some())
        .then_some(s)
    });
    // The server's certificate, about five years ahead (the alert's input).
    let expiry =
        before.get("tern_certificate_expiry_timestamp_seconds").copied().expect("the certificate's expiry");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(expiry > now + 4.0 * 365.0 * 86400.0 && expiry < now + 6.0 * 365.0 * 86400.0, "{expiry}");
    // Each daemon's metrics port also answers a liveness probe.
    for port in [ps_port, agent_port] {
        assert!(http_get(port, "/healthz").ends_with("\r\n\r\nok\n"), "port {port}");
    }
    for vm in ["web", "db"] {
        assert!(value(&before, "tern_vm_received_bytes_total", vm).unwrap() > 4.0 * 1024.0 * 1024.0, "{vm}");
        assert_eq!(value(&before, "tern_vm_agent_connected", vm), Some(1.0));
        assert_eq!(value(&before, "tern_vm_health", vm), Some(0.0));
        assert!(before.keys().any(|k| k.starts_with("tern_vm_state{")
            && k.contains(&format!("vm=\"{vm}\""))
            && k.contains("state=\"protected\"")));
        assert!(
            before
                .keys()
                .any(|k| k.starts_with("tern_disk_journal_bytes{") && k.contains(&format!("vm=\"{vm}\"")))
        );
    }
    assert!(before.contains_key("process_resident_memory_bytes"));
    assert!(before.get("process_cpu_seconds_total").is_some_and(|v| *v > 0.0), "{before:?}");

    // More data on web: its bytes and durable seq move, db's stay.
    write_random(&root.join("web.img"), 8, 99);
    server.checkpoint("web");
    let moved =
        |s: &HashMap<String, f64>, name: &str| Some(value(s, name, "web")? > value(&before, name, "web")?);
    let after = deadline_poll("web's bytes, seq and point time to move", Duration::from_secs(20), || {
        let s = samples(&scrape(ps_port));
        let all = moved(&s, "tern_vm_received_bytes_total")?
            && moved(&s, "tern_disk_durable_seq")?
            && moved(&s, "tern_vm_last_point_timestamp_seconds")?;
        all.then_some(s)
    });
    assert_eq!(
        value(&after, "tern_vm_received_bytes_total", "db"),
        value(&before, "tern_vm_received_bytes_total", "db"),
        "db sent nothing meanwhile"
    );

    // Both scrapes pass Prometheus's own lint (help text on every metric, names, units).
    for (who, port) in [("process server", ps_port), ("agent", agent_port)] {
        let mut lint = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .output_with_stdin(body_of(&scrape(port)).as_bytes());
        assert!(lint.0, "{who}'s metrics fail promtool check metrics: {}", lint.1.split_off(0));
    }

    // The agent's endpoint answers with its own figures.
    let agent = samples(&scrape(agent_port));
    assert!(
        value(&agent, "tern_agent_sent_bytes_total", "web").unwrap() > 12.0 * 1024.0 * 1024.0,
        "{agent:?}"
    );
    assert_eq!(value(&agent, "tern_agent_connected", "web"), Some(1.0));
    assert!(value(&agent, "tern_agent_points_total", "web").unwrap() >= 2.0);

    // The master target's endpoint answers (its replication figures come with a reprotect).
    let mt_port = free_port();
    let mut mt = MasterTarget::start(&server, root, "mt1");
    mt.kill9();
    mt.extra = vec!["--metrics".into(), format!("127.0.0.1:{mt_port}")];
    mt.restart();
    assert!(samples(&scrape(mt_port)).contains_key("process_open_fds"));
}

/// Runs the command with `input` on its stdin: (success, stdout and stderr).
trait WithStdin {
    fn output_with_stdin(&mut self, input: &[u8]) -> (bool, String);
}

impl WithStdin for Command {
    fn output_with_stdin(&mut self, input: &[u8]) -> (bool, String) {
        use std::io::Write;
        let mut child =
            self.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }
}

/// The body of an HTTP/1.1 response, its chunks joined if it came chunked.
fn body_of(response: &str) -> String {
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or(("", response));
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}
