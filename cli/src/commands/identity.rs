//! `drctl identities` and `drctl revoke`.

use crate::Drctl;
use crate::error::CliError;
use crate::output::{print_json, rfc3339};
use serde_json::{Value, json};
use std::path::PathBuf;
use tern_proto as pb;

/// When an identity expires: its issue plus the validity every identity gets (W18-A: an
/// expired one was listed as valid).
fn expires_ms(i: &pb::IdentityInfo) -> i64 {
    i.issued_ms.saturating_add(tern_core::pki::IDENTITY_VALIDITY_MS)
}

fn identity_json(i: &pb::IdentityInfo) -> Value {
    json!({
        "serial": i.serial,
        "role": i.role,
        "name": i.name,
        "issued": rfc3339(i.issued_ms),
        "expires": rfc3339(expires_ms(i)),
        "expired": expires_ms(i) <= tern_core::pki::now_ms(),
        "revoked": if i.revoked_ms == 0 { Value::Null } else { Value::String(rfc3339(i.revoked_ms)) },
    })
}

fn print_identities(ids: &[pb::IdentityInfo]) {
    out!("{:<16} {:<14} {:<20} {:<24} {:<24} REVOKED", "SERIAL", "ROLE", "NAME", "ISSUED", "EXPIRES");
    let now = tern_core::pki::now_ms();
    for i in ids {
        let revoked = if i.revoked_ms == 0 { "-".to_string() } else { rfc3339(i.revoked_ms) };
        let name = if i.name.is_empty() { "-" } else { &i.name };
        let serial = i.serial.get(..16).unwrap_or(&i.serial);
        let expires = rfc3339(expires_ms(i));
        let expires = if expires_ms(i) <= now { format!("{expires} (expired)") } else { expires };
        out!("{serial:<16} {:<14} {name:<20} {:<24} {expires:<24} {revoked}", i.role, rfc3339(i.issued_ms));
    }
}

pub async fn list(d: &mut Drctl) -> Result<(), CliError> {
    let r = d.c.identities(pb::IdentitiesRequest {}).await?.into_inner();
    if d.json {
        return print_json(&Value::Array(r.identities.iter().map(identity_json).collect()));
    }
    print_identities(&r.identities);
    Ok(())
}

pub async fn revoke(d: &mut Drctl, serials: Vec<String>, bundles: &[PathBuf]) -> Result<(), CliError> {
    if serials.is_empty() && bundles.is_empty() {
        return Err(CliError::Usage(
            "name an identity to revoke: a serial from `drctl identities`, or --bundle FILE".into(),
        ));
    }
    let mut certificates = Vec::new();
    for b in bundles {
        // A whole bundle, or the certificate alone: its key is not needed.
        let found = std::fs::read_to_string(b)
            .map_err(|e| e.to_string())
            .and_then(|text| tern_core::pki::leaf_certificates(&text).map_err(|e| e.to_string()))
            .map_err(|e| CliError::Usage(format!("--bundle {}: {e}", b.display())))?;
        if found.is_empty() {
            return Err(CliError::Usage(format!(
                "--bundle {}: no client certificate in it (a bundle, or a PEM certificate file)",
                b.display()
            )));
        }
        certificates.extend(found);
    }
    let r = d.c.revoke(pb::RevokeRequest { serials, certificates }).await?.into_inner();
    if d.json {
        return print_json(&Value::Array(r.identities.iter().map(identity_json).collect()));
    }
    for i in &r.identities {
        let name = if i.name.is_empty() { String::new() } else { format!(" {}", i.name) };
        out!("revoked {} ({}{name}) at {}", i.serial, i.role, rfc3339(i.revoked_ms));
    }
    Ok(())
}
