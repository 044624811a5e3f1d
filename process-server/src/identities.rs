//! The identities this deployment's CA issued (or the process server saw connect), and
//! which of them are revoked: `DATA_DIR/pki/identities`, a text file rewritten whole
//! (temporary file, fsync, rename, fsync of the directory) at each change. It lives beside
//! the CA rather than in the catalog so that rebuilding the catalog cannot lift a
//! revocation.
//!
//! Identities issued before this file existed are not in it until they connect; they are
//! honoured all the same (the CA signed them), and `drctl revoke --bundle FILE` revokes
//! one from its bundle.

use crate::Ctx;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tern_core::VmName;
use tern_core::pki::{CertInfo, Role};
use tern_proto as pb;
use tern_proto::tls::Revocations;
use tonic::{Request, Status};

const FILE: &str = "identities";
/// Made beside the file when it is first written: a data directory whose file is gone has
/// lost its revocations, where one without either is from before identities were kept.
pub const KEPT_MARK: &str = "identities.kept";
const HEADER: &str = "# tern identities: serial, role, name (- for none), issued and revoked (0: valid), in ms since the epoch\n";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub info: CertInfo,
    /// 0 while valid.
    pub revoked_ms: i64,
}

#[derive(Debug)]
pub struct Identities {
    path: PathBuf,
    /// What the file holds; locked only to read or swap it, never across file I/O.
    rows: Mutex<Vec<Row>>,
    /// Held across a change (read, write the file, swap), one at a time.
    writer: Mutex<()>,
    revocations: Revocations,
    existed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentitiesError {
    #[error(
        "{path} line {line}: {reason}; restore the file from a backup (it lists revoked identities, so the server does not start without it)"
    )]
    Bad { path: String, line: usize, reason: String },
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
}

fn parse_line(line: &str) -> Result<Row, String> {
    let f: Vec<&str> = line.split('\t').collect();
    let [serial, kind, name, issued, revoked] = f[..] else {
        return Err(format!("{} fields, not 5", f.len()));
    };
    if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("serial {serial:?} is not hex"));
    }
    let name = if name == "-" { "" } else { name };
    let role = Role::from_parts(kind, name).map_err(|e| e.to_string())?;
    let ms = |s: &str| s.parse::<i64>().map_err(|e| format!("{s:?}: {e}"));
    // Serials are compared as `serial_of` writes them; a hand-edited line may say `0A`.
    let serial = serial.to_ascii_lowercase();
    Ok(Row { info: CertInfo { serial, role, issued_ms: ms(issued)? }, revoked_ms: ms(revoked)? })
}

fn render(rows: &[Row]) -> String {
    let mut s = String::from(HEADER);
    for r in rows {
        let name = if r.info.role.name().is_empty() { "-" } else { r.info.role.name() };
        s.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\n",
            r.info.serial,
            r.info.role.kind(),
            name,
            r.info.issued_ms,
            r.revoked_ms
        ));
    }
    s
}

impl Identities {
    /// Reads `pki/identities` (none yet: no identity recorded; see [`Identities::existed`])
    /// and refuses the revoked.
    pub fn open(pki: &Path) -> Result<Identities, IdentitiesError> {
        let path = pki.join(FILE);
        let mut existed = true;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                existed = false;
                String::new()
            }
            Err(error) => return Err(IdentitiesError::Io { path: path.display().to_string(), error }),
        };
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let row = parse_line(line).map_err(|reason| IdentitiesError::Bad {
                path: path.display().to_string(),
                line: i + 1,
                reason,
            })?;
            rows.push(row);
        }
        let revocations = Revocations::default();
        for r in rows.iter().filter(|r| r.revoked_ms != 0) {
            revocations.revoke(&r.info.serial);
        }
        Ok(Identities { path, rows: Mutex::new(rows), writer: Mutex::new(()), revocations, existed })
    }

    /// Whether the file was there when opened.
    pub fn existed(&self) -> bool {
        self.existed
    }

    /// Writes the file as it is (to make it where there was none).
    pub fn save(&self) -> Result<(), IdentitiesError> {
        let _w = crate::lock(&self.writer);
        self.commit(self.list()).1
    }

    /// The revoked identities, for the interceptor and the connections to be cut.
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    pub fn list(&self) -> Vec<Row> {
        crate::lock(&self.rows).clone()
    }

    pub fn known(&self, serial: &str) -> bool {
        crate::lock(&self.rows).iter().any(|r| r.info.serial == serial)
    }

    /// Records an identity issued or seen, once.
    pub fn record(&self, info: CertInfo) -> Result<(), IdentitiesError> {
        let _w = crate::lock(&self.writer);
        let mut next = self.list();
        if next.iter().any(|r| r.info.serial == info.serial) {
            return Ok(());
        }
        next.push(Row { info, revoked_ms: 0 });
        self.commit(next).1
    }

    /// Writes `next` and takes it as the rows if the file now holds it (the rename done,
    /// even if what follows failed): whether it took it, and how the write went.
    fn commit(&self, next: Vec<Row>) -> (bool, Result<(), IdentitiesError>) {
        match self.write(&next) {
            Ok(()) => {
                *crate::lock(&self.rows) = next;
                (true, Ok(()))
            }
            Err((renamed, e)) => {
                if renamed {
                    *crate::lock(&self.rows) = next;
                }
                (renamed, Err(e))
            }
        }
    }

    /// Revokes these identities (each recorded first if it was not): saved, then their
    /// calls refused and their open connections closed. Returns each one's row; one revoked
    /// before keeps its time.
    pub fn revoke(&self, infos: Vec<CertInfo>, now_ms: i64) -> Result<Vec<Row>, IdentitiesError> {
        let _w = crate::lock(&self.writer);
        let mut next = self.list();
        let mut out = Vec::new();
        for info in infos {
            let i = match next.iter().position(|r| r.info.serial == info.serial) {
                Some(i) => i,
                None => {
                    next.push(Row { info, revoked_ms: 0 });
                    next.len() - 1
                }
            };
            if next[i].revoked_ms == 0 {
                next[i].revoked_ms = now_ms;
            }
            out.push(next[i].clone());
        }
        let (taken, written) = self.commit(next);
        if taken {
            for r in &out {
                self.revocations.revoke(&r.info.serial);
            }
        }
        written.map(|()| out)
    }

    /// Temporary file, fsync, rename, fsync of the directory. An error says whether the
    /// rename was done (the file then holds `rows`).
    fn write(&self, rows: &[Row]) -> Result<(), (bool, IdentitiesError)> {
        let io = |renamed| {
            move |error| (renamed, IdentitiesError::Io { path: self.path.display().to_string(), error })
        };
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io(false))?;
        f.write_all(render(rows).as_bytes()).map_err(io(false))?;
        f.sync_all().map_err(io(false))?;
        std::fs::rename(&tmp, &self.path).map_err(io(false))?;
        if let Some(dir) = self.path.parent() {
            let mark = dir.join(KEPT_MARK);
            if !mark.exists() {
                std::fs::File::create(&mark).map_err(io(true))?;
            }
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(true))?;
        }
        Ok(())
    }
}

/// The admin API's view of a row.
pub fn info(r: &Row) -> pb::IdentityInfo {
    pb::IdentityInfo {
        serial: r.info.serial.clone(),
        role: r.info.role.kind().to_string(),
        name: r.info.role.name().to_string(),
        issued_ms: r.info.issued_ms,
        revoked_ms: r.revoked_ms,
    }
}

/// The serial of the certificate a request came with.
pub fn caller_serial<T>(req: &Request<T>) -> Option<String> {
    let certs = req.peer_certs()?;
    tern_core::pki::serial_of(certs.first()?.as_ref()).ok()
}

/// Which identities a revoke request names: serials (or unique beginnings of them, as
/// `drctl identities` lists them) and certificates.
fn named(rows: &[Row], r: pb::RevokeRequest, ca_pem: &str) -> Result<Vec<CertInfo>, Status> {
    let mut out: Vec<CertInfo> = Vec::new();
    for given in r.serials {
        // openssl prints serials with colons, and in capitals.
        let s: String = given.trim().chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
        if s.len() < 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(format!(
                "{given:?} is not a serial number: give at least its first 8 hex digits, as `drctl identities` lists them"
            )));
        }
        let matches: Vec<&Row> = rows.iter().filter(|r| r.info.serial.starts_with(&s)).collect();
        match matches[..] {
            [one] => out.push(one.info.clone()),
            [] => {
                return Err(Status::not_found(format!(
                    "no identity on record has serial {s}; `drctl identities` lists them. One issued \
                     before they were kept is revoked from its bundle: `drctl revoke --bundle FILE`"
                )));
            }
            _ => {
                return Err(Status::invalid_argument(format!(
                    "{s} begins the serials of {} identities; give more of its digits",
                    matches.len()
                )));
            }
        }
    }
    for pem in r.certificates {
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| Status::invalid_argument(format!("not a PEM certificate: {e}")))?;
        let info = tern_core::pki::cert_info(der.as_ref())
            .map_err(|e| Status::invalid_argument(format!("not a tern identity: {e}")))?;
        // Another deployment's identity is nothing to revoke here: saying it was would
        // leave the operator believing a leaked one is shut out (W18-A).
        if !tern_core::pki::issued_by(der.as_ref(), ca_pem).unwrap_or(false) {
            return Err(Status::invalid_argument(format!(
                "{} {} (serial {}) was not issued by this process server's CA: it is another \
                 deployment's, and nothing was revoked. Give the bundle this server's `drctl enroll` \
                 made, or its serial from `drctl identities`",
                info.role.kind(),
                info.role.name(),
                info.serial
            )));
        }
        out.push(info);
    }
    if out.is_empty() {
        return Err(Status::invalid_argument(
            "name an identity: a serial from `drctl identities`, or --bundle FILE",
        ));
    }
    Ok(out)
}

/// Revokes the identities a request names (see [`Identities::revoke`]). The caller's own
/// and the server's are refused, with what to do instead.
pub async fn revoke(
    ctx: &Arc<Ctx>,
    caller: Option<String>,
    r: pb::RevokeRequest,
) -> Result<pb::IdentitiesReply, Status> {
    let ca_pem = std::fs::read_to_string(ctx.data_dir.join("pki").join("ca.pem"))
        .map_err(|e| Status::internal(format!("cannot read this server's CA certificate: {e}")))?;
    let infos = named(&ctx.identities.list(), r, &ca_pem)?;
    for i in &infos {
        if caller.as_deref() == Some(i.serial.as_str()) {
            return Err(Status::failed_precondition(format!(
                "{} is the identity this request came with; revoke it with another admin identity \
                 (make one with `drctl enroll admin --out FILE`)",
                i.serial
            )));
        }
        match &i.role {
            Role::Server => {
                return Err(Status::invalid_argument(format!(
                    "{} is the process server's own certificate, not a client identity",
                    i.serial
                )));
            }
            // A master target's: the process server refuses it when it connects to it
            // (`tern_proto::connect_checked`), and its open connections close.
            Role::Admin | Role::Agent(_) | Role::MasterTarget(_) => {}
        }
    }
    let ids = ctx.identities.clone();
    let rows = tern_daemon::blocking(move || ids.revoke(infos, tern_store::now_ms()))
        .await?
        .map_err(|e| Status::internal(format!("cannot save the revocation: {e}")))?;
    for r in &rows {
        tracing::warn!(serial = %r.info.serial, identity = %r.info.role, "identity revoked");
    }
    Ok(pb::IdentitiesReply { identities: rows.iter().map(info).collect() })
}

/// Told of each refused agent call, with the VM and the message.
pub type OnRefused = Arc<dyn Fn(&VmName, &str) + Send + Sync>;

/// Refuses every call made with a revoked identity, saying so and what to do. (Revoked
/// identities still complete the TLS handshake: an alert there reaches a client only now
/// and then, and as "connection closed".) `refused` is told of each refused agent call, so
/// that the VM's status says why nothing arrives.
pub fn refuse_revoked(
    revocations: Revocations,
    refused: OnRefused,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |req: Request<()>| {
        let Some(serial) = caller_serial(&req) else { return Ok(req) };
        if !revocations.is_revoked(&serial) {
            return Ok(req);
        }
        let role = req
            .peer_certs()
            .and_then(|c| c.first().map(|c| tern_core::pki::role_of(c.as_ref())))
            .and_then(Result::ok);
        tracing::warn!(serial, identity = ?role, "call refused: the identity is revoked");
        let what = match &role {
            Some(Role::Agent(vm)) => format!(
                "this agent identity for VM {vm} (serial {serial}) has been revoked; enroll a new one \
                 with `drctl enroll agent --vm {vm} --out FILE` and run the agent with it (an old agent \
                 no longer wanted, such as the recovered VM's after a failback or a cancelled reprotect: \
                 stop it)"
            ),
            _ => format!(
                "this identity (serial {serial}) has been revoked; use another admin identity, or have \
                 one made for you with `drctl enroll admin --out FILE`"
            ),
        };
        if let Some(Role::Agent(vm)) = &role {
            refused(vm, &what);
        }
        Err(Status::permission_denied(what))
    }
}

/// VMs with a valid agent identity and no catalog entry yet, each with its newest
/// identity's issue time.
pub fn waiting(ids: &Identities, protected: &[VmName]) -> Vec<pb::EnrolledVm> {
    let mut out: Vec<pb::EnrolledVm> = Vec::new();
    for r in ids.list().iter().filter(|r| r.revoked_ms == 0) {
        let Role::Agent(vm) = &r.info.role else { continue };
        if protected.contains(vm) {
            continue;
        }
        match out.iter_mut().find(|w| w.vm == vm.as_str()) {
            Some(w) => w.enrolled_ms = w.enrolled_ms.max(r.info.issued_ms),
            None => out.push(pb::EnrolledVm { vm: vm.to_string(), enrolled_ms: r.info.issued_ms }),
        }
    }
    out.sort_by(|a, b| a.vm.cmp(&b.vm));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(serial: &str, role: Role) -> CertInfo {
        CertInfo { serial: serial.into(), role, issued_ms: 1_700_000_000_000 }
    }

    #[test]
    fn revocations_are_kept_across_a_restart_and_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let ids = Identities::open(dir.path()).unwrap();
        assert!(ids.list().is_empty());
        let web = Role::Agent(VmName::new("web1").unwrap());
        ids.record(info("0a1b", web.clone())).unwrap();
        ids.record(info("0a1b", web.clone())).unwrap();
        ids.record(info("ff00", Role::Admin)).unwrap();
        assert_eq!(ids.list().len(), 2);
        assert!(!ids.revocations().is_revoked("0a1b"));
        // Revoking one not recorded yet records it too.
        let out = ids.revoke(vec![info("0a1b", web.clone()), info("cc", Role::Admin)], 5).unwrap();
        assert_eq!(out.iter().map(|r| r.revoked_ms).collect::<Vec<_>>(), [5, 5]);
        assert!(ids.revocations().is_revoked("0a1b") && ids.revocations().is_revoked("cc"));
        // Again: the first time stands.
        assert_eq!(ids.revoke(vec![info("0a1b", web)], 9).unwrap()[0].revoked_ms, 5);
        let again = Identities::open(dir.path()).unwrap();
        assert_eq!(again.list(), ids.list());
        assert!(again.revocations().is_revoked("0a1b") && again.revocations().is_revoked("cc"));
        assert!(!again.revocations().is_revoked("ff00"));
    }

    #[test]
    fn a_hand_written_serial_in_capitals_still_matches() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "0A1B\tadmin\t-\t1\t5\n").unwrap();
        let ids = Identities::open(dir.path()).unwrap();
        assert!(ids.existed());
        assert!(ids.revocations().is_revoked("0a1b"));
        assert!(!Identities::open(&dir.path().join("nowhere")).unwrap().existed());
    }

    #[test]
    fn a_damaged_file_stops_the_server_saying_where() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE),
            format!("{HEADER}0a1b\tagent\tweb1\t1\t0\nzz\tadmin\t-\t1\t0\n"),
        )
        .unwrap();
        let err = Identities::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("line 3") && err.contains("not hex"), "{err}");
        std::fs::write(dir.path().join(FILE), "0a1b\tagent\tweb1\t1\n").unwrap();
        let err = Identities::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("line 1") && err.contains("4 fields"), "{err}");
    }
}
