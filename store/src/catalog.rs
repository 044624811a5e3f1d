//! The catalog: VMs, disks, recovery points and open test failovers, in SQLite (WAL mode)
//! inside the data directory. Journal positions are not kept here: the journal itself is
//! the truth for what is durable, so the catalog never runs ahead of the data.

use crate::StoreError;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use tern_core::{
    Digest, DiskName, FailoverKind, GroupName, JobKind, JobState, PointId, Seq, SyncMode, VmName, VmState,
};

#[derive(Debug)]
pub struct Catalog {
    db: Connection,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskRow {
    pub name: DiskName,
    pub size: u64,
    pub generation: String,
    /// Records up to this seq are applied to the base image.
    pub base_seq: Seq,
    /// The base image is this outside file (a master target's target disk).
    pub base_path: Option<std::path::PathBuf>,
}

/// Where a reprotected VM fails back to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReprotectRow {
    pub master_target: String,
    pub alternate: bool,
    pub sync: SyncMode,
    /// (disk, path on the master target)
    pub disks: Vec<(String, String)>,
    /// The serial of the agent identity reprotect issued for the recovered VM: the only
    /// one that may replicate the VM until the failback is committed (empty for a reprotect
    /// made before it was kept: any agent identity of the VM then).
    pub identity: String,
}

/// A VM's replication policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub retention_ms: i64,
    pub crash_interval_ms: i64,
    pub app_interval_ms: i64,
    pub rpo_threshold_ms: i64,
    /// The most the VM's journals may hold together (0: no bound): retention prunes its
    /// oldest points ahead of their window to keep within it, so that one VM's burst of
    /// writes does not fill the data directory every VM replicates into.
    pub max_journal_bytes: i64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            retention_ms: 24 * 3_600_000,
            crash_interval_ms: 5 * 60_000,
            app_interval_ms: 60 * 60_000,
            rpo_threshold_ms: 15 * 60_000,
            max_journal_bytes: 0,
        }
    }
}

/// Longest retention window a policy may have.
pub const MAX_RETENTION_MS: i64 = 30 * 24 * 3_600_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverRow {
    pub kind: FailoverKind,
    pub point: PointId,
    pub output: String,
    pub format: String,
    pub files: Vec<String>,
    /// A failover to a time between `point` and the next: the journal position it used.
    pub between: Option<Between>,
}

/// A journal position between two points: the moment `time_ms`, after point `point` and
/// before point `next`. `seqs` is each disk's last record at that moment, in the order of
/// the point's disks.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Between {
    pub time_ms: i64,
    pub next: u64,
    pub seqs: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRow {
    pub id: u64,
    pub kind: JobKind,
    pub vm: String,
    pub state: JobState,
    pub phase: String,
    pub done: u64,
    pub total: u64,
    pub error: String,
    pub started_ms: i64,
    pub ended_ms: i64,
    /// What a succeeded job made, encoded by the process server (`tern_proto::JobOutput`);
    /// empty before it ends, and for jobs that make nothing.
    pub output: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    Crash,
    App,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Crash => "crash",
            Consistency::App => "app",
        }
    }
    fn parse(s: &str) -> Option<Consistency> {
        match s {
            "crash" => Some(Consistency::Crash),
            "app" => Some(Consistency::App),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointDisk {
    pub disk: DiskName,
    pub seq: Seq,
    pub fingerprint: Digest,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Point {
    pub id: PointId,
    pub vm: VmName,
    pub time_ms: i64,
    pub consistency: Consistency,
    pub note: String,
    pub disks: Vec<PointDisk>,
    /// A multi-VM point of this replication group: the same id is a point of every
    /// member, all taken at one cut.
    pub group: Option<GroupName>,
}

/// A replication group: VMs whose multi-VM points are taken at one cut across all of
/// them, on the group's own intervals (0: none on a schedule).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRow {
    pub name: GroupName,
    pub members: Vec<VmName>,
    pub crash_interval_ms: i64,
    pub app_interval_ms: i64,
}

/// A recovery plan as applied: its name, the file's text and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanRow {
    pub name: String,
    pub source: String,
    pub file: String,
    pub applied_ms: i64,
    /// The plan's last operation and how far it got (JSON, the process server's), or empty.
    pub run: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestFailoverRow {
    pub point: PointId,
    pub output: String,
    pub files: Vec<String>,
}

fn q(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |e| StoreError::CatalogQuery {
        op,
        full: e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull),
        reason: e.to_string(),
    }
}

const TARGET_JOURNAL: &str = "journal";
const TARGET_WRITE_THROUGH: &str = "write-through";

/// The catalog's layout (`PRAGMA user_version`). 0: before the version was kept. 2: a
/// failover may use a position between two points (`failovers.cut`). 3: a point is keyed
/// by VM and id (a multi-VM point's id is shared by its group's members), replication
/// groups and recovery plans. 4: a reprotect names the recovered VM's agent identity
/// (`reprotects.identity`). 5: the VM's own policy is kept in `saved_policies` from
/// reprotect to reverse replication, and a failover's output is known whole
/// (`failovers.written`). 6: the sources of disks and fences (`disk_sources`, `disk_fences`). 7: a job's output is kept with it (`jobs.output`), and ended jobs
/// are pruned ([`JOBS_KEPT_MS`], [`JOBS_KEPT_PER_KIND`]). 8: a policy may bound the VM's
/// journals (`max_journal_bytes`, in `policies` and `saved_policies`).
pub const SCHEMA_VERSION: i64 = 8;

/// An ended job is kept this long (30 days)...
pub const JOBS_KEPT_MS: i64 = 30 * 24 * 3_600_000;
/// ...and of a VM's ended jobs of one kind only this many, the newest: an agent that
/// fails its initial sync at each session would otherwise add a row every 30 s for as
/// long as its trouble lasts.
pub const JOBS_KEPT_PER_KIND: i64 = 50;

/// Version 3's point tables, under the names a migration copies into.
const POINT_TABLES: &str = "
CREATE TABLE IF NOT EXISTS {points} (
    vm TEXT NOT NULL REFERENCES vms(name),
    id INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    consistency TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    grp TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (vm, id)
);
CREATE TABLE IF NOT EXISTS {point_disks} (
    vm TEXT NOT NULL,
    point INTEGER NOT NULL,
    disk TEXT NOT NULL,
    seq INTEGER NOT NULL,
    fingerprint BLOB NOT NULL,
    PRIMARY KEY (vm, point, disk),
    FOREIGN KEY (vm, point) REFERENCES {points}(vm, id)
);
";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'protected'
);
CREATE TABLE IF NOT EXISTS saved_policies (
    vm TEXT PRIMARY KEY REFERENCES vms(name),
    retention_ms INTEGER NOT NULL,
    crash_interval_ms INTEGER NOT NULL,
    app_interval_ms INTEGER NOT NULL,
    rpo_threshold_ms INTEGER NOT NULL,
    max_journal_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS policies (
    vm TEXT PRIMARY KEY REFERENCES vms(name),
    retention_ms INTEGER NOT NULL,
    crash_interval_ms INTEGER NOT NULL,
    app_interval_ms INTEGER NOT NULL,
    rpo_threshold_ms INTEGER NOT NULL,
    max_journal_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS failovers (
    vm TEXT PRIMARY KEY REFERENCES vms(name),
    kind TEXT NOT NULL,
    point INTEGER NOT NULL,
    output TEXT NOT NULL,
    format TEXT NOT NULL,
    files TEXT NOT NULL,
    cut TEXT NOT NULL DEFAULT '',
    written INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reprotects (
    vm TEXT PRIMARY KEY REFERENCES vms(name),
    master_target TEXT NOT NULL,
    alternate INTEGER NOT NULL,
    sync TEXT NOT NULL,
    disks TEXT NOT NULL,
    identity TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    vm TEXT NOT NULL,
    state TEXT NOT NULL,
    phase TEXT NOT NULL DEFAULT '',
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER NOT NULL DEFAULT 0,
    output BLOB NOT NULL DEFAULT x''
);
CREATE TABLE IF NOT EXISTS disks (
    vm TEXT NOT NULL REFERENCES vms(name),
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    generation TEXT NOT NULL,
    base_seq INTEGER NOT NULL DEFAULT 0,
    base_path TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (vm, name)
);
CREATE INDEX IF NOT EXISTS points_vm_time ON points (vm, time_ms, id);
CREATE INDEX IF NOT EXISTS points_vm_consistency ON points (vm, consistency, id);
CREATE INDEX IF NOT EXISTS points_vm_group ON points (vm, grp, consistency, id);
CREATE TABLE IF NOT EXISTS groups (
    name TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    crash_interval_ms INTEGER NOT NULL,
    app_interval_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS group_members (
    vm TEXT PRIMARY KEY REFERENCES vms(name),
    grp TEXT NOT NULL REFERENCES groups(name)
);
CREATE TABLE IF NOT EXISTS plans (
    name TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    file TEXT NOT NULL,
    applied_ms INTEGER NOT NULL,
    run TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS disk_sources (
    vm TEXT NOT NULL,
    disk TEXT NOT NULL,
    source TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (vm, disk)
);
CREATE TABLE IF NOT EXISTS disk_fences (
    vm TEXT NOT NULL,
    disk TEXT NOT NULL,
    source TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (vm, disk, source)
);
CREATE TABLE IF NOT EXISTS test_failovers (
    vm TEXT PRIMARY KEY REFERENCES vms(name),
    point INTEGER NOT NULL,
    output TEXT NOT NULL,
    files TEXT NOT NULL
);
";

/// Every row of a VM, deleted (its jobs stay, as history).
const FORGET_VM: [&str; 12] = [
    "DELETE FROM disk_sources WHERE vm = ?1",
    "DELETE FROM disk_fences WHERE vm = ?1",
    "DELETE FROM point_disks WHERE vm = ?1",
    "DELETE FROM points WHERE vm = ?1",
    "DELETE FROM group_members WHERE vm = ?1",
    "DELETE FROM disks WHERE vm = ?1",
    "DELETE FROM policies WHERE vm = ?1",
    "DELETE FROM saved_policies WHERE vm = ?1",
    "DELETE FROM test_failovers WHERE vm = ?1",
    "DELETE FROM failovers WHERE vm = ?1",
    "DELETE FROM reprotects WHERE vm = ?1",
    "DELETE FROM vms WHERE name = ?1",
];

/// A change of a VM's state with the rows that change with it (see [`Catalog::transition`]).
#[derive(Clone, Debug)]
pub enum Transition {
    /// protected → failed-over, with the failover's row.
    FailOver(FailoverRow),
    /// failed-over → protected: the failover's output could not be written.
    AbandonFailover,
    /// failed-over → failover-committed: every point goes.
    CommitFailover,
    /// failover-committed → reprotected: where to fail back to, the failback policy and a
    /// new epoch for every disk.
    Reprotect { row: ReprotectRow, policy: Policy, generations: Vec<(DiskName, String)> },
    /// reprotected → failover-committed: the reprotect is undone (its row and the points
    /// made since go).
    CancelReprotect,
    /// reprotected → failed-back.
    FailBack,
    /// failed-back → failback-committed: points, reprotect and failover rows go.
    CommitFailback,
    /// failback-committed → protected: replication from the primary site, its policy and
    /// a new epoch for every disk.
    ReverseReplicate { policy: Policy, generations: Vec<(DiskName, String)> },
}

impl Transition {
    pub fn from(&self) -> VmState {
        match self {
            Transition::FailOver(_) => VmState::Protected,
            Transition::AbandonFailover | Transition::CommitFailover => VmState::FailedOver,
            Transition::Reprotect { .. } => VmState::FailoverCommitted,
            Transition::FailBack | Transition::CancelReprotect => VmState::Reprotected,
            Transition::CommitFailback => VmState::FailedBack,
            Transition::ReverseReplicate { .. } => VmState::FailbackCommitted,
        }
    }

    pub fn to(&self) -> VmState {
        match self {
            Transition::FailOver(_) => VmState::FailedOver,
            Transition::AbandonFailover | Transition::ReverseReplicate { .. } => VmState::Protected,
            Transition::CommitFailover | Transition::CancelReprotect => VmState::FailoverCommitted,
            Transition::Reprotect { .. } => VmState::Reprotected,
            Transition::FailBack => VmState::FailedBack,
            Transition::CommitFailback => VmState::FailbackCommitted,
        }
    }

    /// What a refusal tells the operator.
    pub fn refusal(&self) -> &'static str {
        match self {
            Transition::FailOver(_) => {
                "a failover needs a protected VM (a failed-over VM changes point with `drctl change-point`)"
            }
            Transition::AbandonFailover => "only a failover being written can be abandoned",
            Transition::CommitFailover => {
                "only a failed-over VM (or a failed-back one) can be committed; a committed failover cannot be committed again"
            }
            Transition::Reprotect { .. } => {
                "reprotect needs a committed failover (`drctl failover`, then `drctl commit`)"
            }
            Transition::FailBack => "failback needs a reprotected VM (`drctl reprotect` first)",
            Transition::CancelReprotect => "only a reprotected VM's reprotect can be cancelled",
            Transition::CommitFailback => {
                "committing a failback needs a failed-back VM (`drctl failback` first)"
            }
            Transition::ReverseReplicate { .. } => {
                "reverse replication follows a committed failback (`drctl commit` first); a protected \
                 VM replicates from its source already, nothing to do"
            }
        }
    }
}

use tern_core::lifecycle::UnknownName;

fn bad_row(table: &'static str, key: &str, reason: String) -> StoreError {
    StoreError::BadRow { table, key: key.to_string(), reason }
}

fn read_state(db: &Connection, vm: &VmName) -> Result<VmState, StoreError> {
    let s: String = db
        .query_row("SELECT state FROM vms WHERE name = ?1", [vm.as_str()], |r| r.get(0))
        .optional()
        .map_err(q("read VM state"))?
        .ok_or_else(|| StoreError::UnknownVm(vm.clone()))?;
    s.parse().map_err(|e: UnknownName| bad_row("vms", vm.as_str(), e.to_string()))
}

fn put_policy(db: &Connection, vm: &VmName, p: &Policy) -> Result<(), StoreError> {
    db.execute(
        "INSERT INTO policies (vm, retention_ms, crash_interval_ms, app_interval_ms, rpo_threshold_ms,
           max_journal_bytes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(vm) DO UPDATE SET retention_ms = ?2, crash_interval_ms = ?3,
           app_interval_ms = ?4, rpo_threshold_ms = ?5, max_journal_bytes = ?6",
        policy_params(vm, p),
    )
    .map_err(q("set policy"))?;
    Ok(())
}

/// A policy row's parameters in column order, `?1` (the VM) to `?6`, for the statements
/// that write `policies` and `saved_policies` (which share columns).
fn policy_params<'a>(vm: &'a VmName, p: &Policy) -> impl rusqlite::Params + 'a {
    (
        vm.as_str(),
        p.retention_ms,
        p.crash_interval_ms,
        p.app_interval_ms,
        p.rpo_threshold_ms,
        p.max_journal_bytes,
    )
}

/// The VM's reprotect row, made or replaced.
fn put_reprotect(tx: &rusqlite::Transaction<'_>, vm: &VmName, row: &ReprotectRow) -> Result<(), StoreError> {
    let disks = serde_json::to_string(&row.disks).map_err(|_| StoreError::Invariant("disk list encodes"))?;
    tx.execute(
        "INSERT INTO reprotects (vm, master_target, alternate, sync, disks, identity)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(vm) DO UPDATE SET master_target = ?2, alternate = ?3, sync = ?4, disks = ?5,
             identity = ?6",
        params![
            vm.as_str(),
            row.master_target,
            i64::from(row.alternate),
            row.sync.as_str(),
            disks,
            row.identity
        ],
    )
    .map(|_| ())
    .map_err(q("change VM state"))
}

fn put_generations(
    db: &Connection,
    vm: &VmName,
    generations: &[(DiskName, String)],
) -> Result<(), StoreError> {
    for (disk, g) in generations {
        db.execute(
            "UPDATE disks SET generation = ?3 WHERE vm = ?1 AND name = ?2",
            params![vm.as_str(), disk.as_str(), g],
        )
        .map_err(q("start a new epoch"))?;
    }
    Ok(())
}

fn cut_text(between: Option<&Between>) -> Result<String, StoreError> {
    match between {
        Some(b) => serde_json::to_string(b).map_err(|_| StoreError::Invariant("failover position encodes")),
        None => Ok(String::new()),
    }
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Catalog {
    pub fn open(path: &Path) -> Result<Catalog, StoreError> {
        let mut db = Connection::open(path).map_err(q("open catalog"))?;
        db.pragma_update(None, "journal_mode", "WAL").map_err(q("set WAL mode"))?;
        // FULL: a point the catalog reports must survive power loss.
        db.pragma_update(None, "synchronous", "FULL").map_err(q("set synchronous"))?;
        db.pragma_update(None, "foreign_keys", "ON").map_err(q("enable foreign keys"))?;
        let version: i64 =
            db.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(q("read schema version"))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::CatalogTooNew {
                path: path.display().to_string(),
                version,
                known: SCHEMA_VERSION,
            });
        }
        if version != SCHEMA_VERSION {
            migrate(&mut db, version, path)?;
        }
        Ok(Catalog { db })
    }
}

/// Creates the schema, or brings a catalog of an older `version` to this one, in one
/// transaction. Skipped for a catalog already at this version: opening it writes nothing,
/// so a server whose file system is full still starts (and can be failed over from).
fn migrate(db: &mut Connection, version: i64, path: &Path) -> Result<(), StoreError> {
    {
        let tx = db.transaction().map_err(q("migrate catalog"))?;
        let columns = |table: &str| -> Result<Vec<String>, StoreError> {
            let mut st =
                tx.prepare("SELECT name FROM pragma_table_info(?1)").map_err(q("migrate catalog"))?;
            let names = st.query_map([table], |r| r.get::<_, String>(0)).map_err(q("migrate catalog"))?;
            names.collect::<Result<Vec<_>, _>>().map_err(q("migrate catalog"))
        };
        let point_columns = columns("points")?;
        if point_columns.is_empty() {
            tx.execute_batch(
                &POINT_TABLES.replace("{points}", "points").replace("{point_disks}", "point_disks"),
            )
            .map_err(q("create schema"))?;
        } else if !point_columns.iter().any(|c| c == "grp") {
            // Before version 3 a point's id was its key alone: copy into the (vm, id) layout.
            tx.execute_batch(&format!(
                "{}
                 INSERT INTO points_v3 (vm, id, time_ms, consistency, note)
                     SELECT vm, id, time_ms, consistency, note FROM points;
                 INSERT INTO point_disks_v3 (vm, point, disk, seq, fingerprint)
                     SELECT p.vm, pd.point, pd.disk, pd.seq, pd.fingerprint
                     FROM point_disks pd JOIN points p ON p.id = pd.point;
                 DROP TABLE point_disks;
                 DROP TABLE points;
                 ALTER TABLE points_v3 RENAME TO points;
                 ALTER TABLE point_disks_v3 RENAME TO point_disks;",
                POINT_TABLES.replace("{points}", "points_v3").replace("{point_disks}", "point_disks_v3")
            ))
            .map_err(q("migrate catalog points"))?;
        }
        tx.execute_batch(SCHEMA).map_err(q("create schema"))?;
        // Version 1 had no `failovers.cut`.
        let has_cut: bool = tx
            .query_row("SELECT count(*) FROM pragma_table_info('failovers') WHERE name = 'cut'", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(q("migrate catalog"))?
            > 0;
        if !has_cut {
            tx.execute_batch("ALTER TABLE failovers ADD COLUMN cut TEXT NOT NULL DEFAULT ''")
                .map_err(q("migrate catalog"))?;
        }
        // Before version 5 a failover's output was not known to be whole (taken as whole).
        if !columns("failovers")?.iter().any(|c| c == "written") {
            tx.execute_batch("ALTER TABLE failovers ADD COLUMN written INTEGER NOT NULL DEFAULT 1")
                .map_err(q("migrate catalog"))?;
        }
        // Before version 4 a reprotect did not name the recovered VM's identity.
        if !columns("reprotects")?.iter().any(|c| c == "identity") {
            tx.execute_batch("ALTER TABLE reprotects ADD COLUMN identity TEXT NOT NULL DEFAULT ''")
                .map_err(q("migrate catalog"))?;
        }
        // Before version 8 a policy did not bound the VM's journals.
        for table in ["policies", "saved_policies"] {
            if !columns(table)?.iter().any(|c| c == "max_journal_bytes") {
                tx.execute_batch(&format!(
                    "ALTER TABLE {table} ADD COLUMN max_journal_bytes INTEGER NOT NULL DEFAULT 0"
                ))
                .map_err(q("migrate catalog"))?;
            }
        }
        // Before version 7 a job's output was kept in memory only.
        if !columns("jobs")?.iter().any(|c| c == "output") {
            tx.execute_batch("ALTER TABLE jobs ADD COLUMN output BLOB NOT NULL DEFAULT x''")
                .map_err(q("migrate catalog"))?;
        }
        // Version 0 is a catalog from before the version was kept: the same tables, whose
        // state names are checked as they are read.
        tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(q("migrate catalog"))?;
        tx.commit().map_err(q("migrate catalog"))?;
        if version < SCHEMA_VERSION {
            tracing::info!(catalog = %path.display(), from = version, to = SCHEMA_VERSION, "catalog migrated");
        }
    }
    Ok(())
}

impl Catalog {
    pub fn vms(&self) -> Result<Vec<VmName>, StoreError> {
        let mut st = self.db.prepare("SELECT name FROM vms ORDER BY name").map_err(q("list VMs"))?;
        let rows = st.query_map([], |r| r.get::<_, String>(0)).map_err(q("list VMs"))?;
        let mut out = Vec::new();
        for r in rows {
            let name = r.map_err(q("list VMs"))?;
            out.push(VmName::new(&name).map_err(|e| bad_row("vms", &name, e.to_string()))?);
        }
        Ok(out)
    }

    pub fn has_vm(&self, vm: &VmName) -> Result<bool, StoreError> {
        self.db
            .query_row("SELECT 1 FROM vms WHERE name = ?1", [vm.as_str()], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .map_err(q("look up VM"))
    }

    pub fn add_vm(&self, vm: &VmName, now_ms: i64) -> Result<(), StoreError> {
        self.db
            .execute(
                "INSERT OR IGNORE INTO vms (name, created_ms) VALUES (?1, ?2)",
                params![vm.as_str(), now_ms],
            )
            .map_err(q("add VM"))?;
        Ok(())
    }

    pub fn disks(&self, vm: &VmName) -> Result<Vec<DiskRow>, StoreError> {
        let mut st = self
            .db
            .prepare(
                "SELECT name, size, generation, base_seq, base_path FROM disks WHERE vm = ?1 ORDER BY name",
            )
            .map_err(q("list disks"))?;
        let rows = st
            .query_map([vm.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .map_err(q("list disks"))?;
        let mut out = Vec::new();
        for r in rows {
            let (name, size, generation, base, base_path) = r.map_err(q("list disks"))?;
            let key = format!("{vm}/{name}");
            out.push(DiskRow {
                name: DiskName::new(&name).map_err(|e| bad_row("disks", &key, e.to_string()))?,
                size: u64::try_from(size).map_err(|_| bad_row("disks", &key, format!("size {size}")))?,
                generation,
                base_seq: Seq(
                    u64::try_from(base).map_err(|_| bad_row("disks", &key, format!("base_seq {base}")))?
                ),
                base_path: (!base_path.is_empty()).then(|| std::path::PathBuf::from(base_path)),
            });
        }
        Ok(out)
    }

    pub fn add_disk(&self, vm: &VmName, disk: &DiskRow) -> Result<(), StoreError> {
        self.db
            .execute(
                "INSERT INTO disks (vm, name, size, generation, base_path, base_seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    vm.as_str(),
                    disk.name.as_str(),
                    i64_of(disk.size),
                    disk.generation,
                    disk.base_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                    i64_of(disk.base_seq.0)
                ],
            )
            .map_err(q("add disk"))?;
        Ok(())
    }

    pub fn set_generation(&self, vm: &VmName, disk: &DiskName, generation: &str) -> Result<(), StoreError> {
        put_generations(&self.db, vm, &[(disk.clone(), generation.to_string())])
    }

    pub fn reprotect(&self, vm: &VmName) -> Result<Option<ReprotectRow>, StoreError> {
        self.db
            .query_row(
                "SELECT master_target, alternate, sync, disks, identity FROM reprotects WHERE vm = ?1",
                [vm.as_str()],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                },
            )
            .optional()
            .map_err(q("look up reprotect"))?
            .map(|(master_target, alternate, sync, disks, identity)| {
                let bad = |reason: String| bad_row("reprotects", vm.as_str(), reason);
                Ok(ReprotectRow {
                    master_target,
                    alternate: alternate != 0,
                    sync: sync.parse().map_err(|e: UnknownName| bad(e.to_string()))?,
                    disks: serde_json::from_str(&disks).map_err(|e| bad(format!("disks: {e}")))?,
                    identity,
                })
            })
            .transpose()
    }

    /// Removes every row of a VM, in one transaction.
    pub fn forget_vm(&mut self, vm: &VmName) -> Result<(), StoreError> {
        let tx = self.db.transaction().map_err(q("forget VM"))?;
        for sql in FORGET_VM {
            tx.execute(sql, [vm.as_str()]).map_err(q("forget VM"))?;
        }
        tx.commit().map_err(q("forget VM"))
    }

    /// The path an agent read `disk` of `vm` at, when `source` is the file (or device) the
    /// primary read before a failback to another location: it holds the old disk.
    pub fn fenced_source(
        &self,
        vm: &VmName,
        disk: &DiskName,
        source: &str,
    ) -> Result<Option<String>, StoreError> {
        self.db
            .query_row(
                "SELECT path FROM disk_fences WHERE vm = ?1 AND disk = ?2 AND source = ?3",
                params![vm.as_str(), disk.as_str(), source],
                |r| r.get(0),
            )
            .optional()
            .map_err(q("read disk sources"))
    }

    /// Notes which file (or device) the agent of a protected VM reads `disk` from (what a
    /// later failback to an alternate location fences).
    /// Which file (or device) the agent last read each disk of `vm` from: disk, source, path.
    pub fn disk_sources(&self, vm: &VmName) -> Result<Vec<(String, String, String)>, StoreError> {
        let mut st = self
            .db
            .prepare("SELECT disk, source, path FROM disk_sources WHERE vm = ?1")
            .map_err(q("read disk sources"))?;
        let rows = st
            .query_map([vm.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(q("read disk sources"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(q("read disk sources"))
    }

    pub fn note_source(
        &self,
        vm: &VmName,
        disk: &DiskName,
        source: &str,
        path: &str,
    ) -> Result<(), StoreError> {
        self.db
            .execute(
                "INSERT INTO disk_sources (vm, disk, source, path) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (vm, disk) DO UPDATE SET source = ?3, path = ?4
                     WHERE source != ?3 OR path != ?4",
                params![vm.as_str(), disk.as_str(), source, path],
            )
            .map_err(q("note disk source"))?;
        Ok(())
    }

    pub fn set_base_seq(&self, vm: &VmName, disk: &DiskName, seq: Seq) -> Result<(), StoreError> {
        self.db
            .execute(
                "UPDATE disks SET base_seq = ?3 WHERE vm = ?1 AND name = ?2",
                params![vm.as_str(), disk.as_str(), i64_of(seq.0)],
            )
            .map_err(q("move base position"))?;
        Ok(())
    }

    pub fn vm_state(&self, vm: &VmName) -> Result<VmState, StoreError> {
        read_state(&self.db, vm)
    }

    /// On a master target: how a VM's relayed records are kept (`None`: not prepared).
    /// Stored in `vms.state` as `journal` (sync before) or `write-through` (sync during).
    pub fn target_mode(&self, vm: &VmName) -> Result<Option<SyncMode>, StoreError> {
        let s: Option<String> = self
            .db
            .query_row("SELECT state FROM vms WHERE name = ?1", [vm.as_str()], |r| r.get(0))
            .optional()
            .map_err(q("read target mode"))?;
        s.map(|s| match s.as_str() {
            TARGET_JOURNAL => Ok(SyncMode::Before),
            TARGET_WRITE_THROUGH => Ok(SyncMode::During),
            other => Err(bad_row("vms", vm.as_str(), format!("{other:?} is not a master target mode"))),
        })
        .transpose()
    }

    pub fn set_target_mode(&self, vm: &VmName, mode: SyncMode) -> Result<(), StoreError> {
        let s = match mode {
            SyncMode::Before => TARGET_JOURNAL,
            SyncMode::During => TARGET_WRITE_THROUGH,
        };
        self.db
            .execute("UPDATE vms SET state = ?2 WHERE name = ?1", params![vm.as_str(), s])
            .map_err(q("set target mode"))?;
        Ok(())
    }

    /// Puts a VM in any state, for tests of what each state allows.
    #[cfg(test)]
    pub(crate) fn raw_set_state_for_tests(&self, vm: &VmName, state: VmState) {
        self.db
            .execute("UPDATE vms SET state = ?2 WHERE name = ?1", params![vm.as_str(), state.as_str()])
            .unwrap();
    }

    /// Changes a VM's state and every row that changes with it, in one SQLite transaction:
    /// refused, naming the state and what to do, unless the VM is in the transition's
    /// starting state; a refusal or an error changes no row.
    pub fn transition(&mut self, vm: &VmName, t: &Transition) -> Result<(), StoreError> {
        let tx = self.db.transaction().map_err(q("change VM state"))?;
        let state = read_state(&tx, vm)?;
        if state != t.from() {
            return Err(StoreError::WrongState {
                vm: vm.clone(),
                state: state.to_string(),
                what: t.refusal().into(),
            });
        }
        debug_assert!(t.from().can_become(t.to()), "{t:?}");
        let v = vm.as_str();
        let exec = |sql: &str, p: &[&dyn rusqlite::ToSql]| {
            tx.execute(sql, p).map(|_| ()).map_err(q("change VM state"))
        };
        // The VM's row of one policy table copied into the other (they share columns).
        let copy_policy = |from: &str, to: &str| {
            exec(
                &format!(
                    "INSERT OR REPLACE INTO {to}
                     SELECT vm, retention_ms, crash_interval_ms, app_interval_ms, rpo_threshold_ms,
                       max_journal_bytes
                     FROM {from} WHERE vm = ?1"
                ),
                params![v],
            )
        };
        // The VM's own policy, kept since its reprotect, in force again.
        let restore_saved_policy = || -> Result<(), StoreError> {
            copy_policy("saved_policies", "policies")?;
            exec("DELETE FROM saved_policies WHERE vm = ?1", params![v])
        };
        let delete_points = |tx: &rusqlite::Transaction<'_>| -> Result<(), StoreError> {
            for sql in ["DELETE FROM point_disks WHERE vm = ?1", "DELETE FROM points WHERE vm = ?1"] {
                tx.execute(sql, [v]).map_err(q("change VM state"))?;
            }
            Ok(())
        };
        match t {
            Transition::FailOver(f) => {
                let files = serde_json::to_string(&f.files)
                    .map_err(|_| StoreError::Invariant("file list encodes"))?;
                let cut = cut_text(f.between.as_ref())?;
                exec(
                    "INSERT INTO failovers (vm, kind, point, output, format, files, cut, written)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0)",
                    params![v, f.kind.as_str(), i64_of(f.point.0), f.output, f.format, files, cut],
                )?;
            }
            Transition::AbandonFailover => exec("DELETE FROM failovers WHERE vm = ?1", params![v])?,
            Transition::CommitFailover => delete_points(&tx)?,
            Transition::Reprotect { row, policy, generations } => {
                put_reprotect(&tx, vm, row)?;
                // The VM's own policy waits for reverse replication.
                copy_policy("policies", "saved_policies")?;
                put_policy(&tx, vm, policy)?;
                put_generations(&tx, vm, generations)?;
            }
            Transition::FailBack => {}
            Transition::CancelReprotect => {
                delete_points(&tx)?;
                exec("DELETE FROM reprotects WHERE vm = ?1", params![v])?;
                // The VM's own policy is in force again (a later reprotect keeps it anew).
                restore_saved_policy()?;
            }
            Transition::CommitFailback => {
                delete_points(&tx)?;
                // Failed back to another location: the files the primary's agent read before
                // the failover hold the old disks, and an agent still reading them is refused.
                // Kept until the VM is removed: another agent replicating meanwhile does not
                // lift it (the old one, still running, would get its turn when that one
                // goes away).
                exec(
                    "INSERT OR IGNORE INTO disk_fences (vm, disk, source, path)
                         SELECT vm, disk, source, path FROM disk_sources WHERE vm = ?1
                         AND EXISTS (SELECT 1 FROM reprotects WHERE vm = ?1 AND alternate = 1)",
                    params![v],
                )?;
                exec("DELETE FROM reprotects WHERE vm = ?1", params![v])?;
                exec("DELETE FROM failovers WHERE vm = ?1", params![v])?;
            }
            Transition::ReverseReplicate { policy, generations } => {
                // The policy the VM had before the failover comes back; `policy` where none
                // was kept.
                put_policy(&tx, vm, policy)?;
                restore_saved_policy()?;
                put_generations(&tx, vm, generations)?;
            }
        }
        exec("UPDATE vms SET state = ?2 WHERE name = ?1", params![v, t.to().as_str()])?;
        tx.commit().map_err(q("change VM state"))
    }

    /// The VM's own policy: the one kept for reverse replication while the failback policy
    /// is in force (from reprotect until then), else the one in force.
    pub fn own_policy(&self, vm: &VmName) -> Result<Policy, StoreError> {
        match self.policy_in("saved_policies", vm)? {
            Some(p) => Ok(p),
            None => self.policy(vm),
        }
    }

    pub fn policy(&self, vm: &VmName) -> Result<Policy, StoreError> {
        Ok(self.policy_in("policies", vm)?.unwrap_or_default())
    }

    /// `vm`'s row of a policy table (`policies` or `saved_policies`, which share columns).
    fn policy_in(&self, table: &str, vm: &VmName) -> Result<Option<Policy>, StoreError> {
        self.db
            .query_row(
                &format!(
                    "SELECT retention_ms, crash_interval_ms, app_interval_ms, rpo_threshold_ms, max_journal_bytes \
                     FROM {table} WHERE vm = ?1"
                ),
                [vm.as_str()],
                |r| {
                    Ok(Policy {
                        retention_ms: r.get(0)?,
                        crash_interval_ms: r.get(1)?,
                        app_interval_ms: r.get(2)?,
                        rpo_threshold_ms: r.get(3)?,
                        max_journal_bytes: r.get(4)?,
                    })
                },
            )
            .optional()
            .map_err(q("read policy"))
    }

    /// The operator's policy for `vm`; one kept for reverse replication becomes it too (the
    /// operator's word wins over what the VM had before its failover).
    pub fn set_policy(&self, vm: &VmName, p: &Policy) -> Result<(), StoreError> {
        put_policy(&self.db, vm, p)?;
        self.db
            .execute(
                "UPDATE saved_policies SET retention_ms = ?2, crash_interval_ms = ?3, app_interval_ms = ?4,
                   rpo_threshold_ms = ?5, max_journal_bytes = ?6 WHERE vm = ?1",
                policy_params(vm, p),
            )
            .map_err(q("set policy"))?;
        Ok(())
    }

    pub fn failover(&self, vm: &VmName) -> Result<Option<FailoverRow>, StoreError> {
        self.db
            .query_row(
                "SELECT kind, point, output, format, files, cut FROM failovers WHERE vm = ?1",
                [vm.as_str()],
                |r| {
                    Ok((
                        (r.get::<_, String>(0)?, r.get::<_, i64>(1)?),
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                    ))
                },
            )
            .optional()
            .map_err(q("look up failover"))?
            .map(|((kind, point), output, format, files, cut)| {
                let bad = |reason: String| bad_row("failovers", vm.as_str(), reason);
                Ok(FailoverRow {
                    kind: kind.parse().map_err(|e: UnknownName| bad(e.to_string()))?,
                    point: PointId(u64::try_from(point).map_err(|_| bad(format!("point {point}")))?),
                    output,
                    format,
                    files: serde_json::from_str(&files).map_err(|e| bad(format!("files: {e}")))?,
                    between: match cut.as_str() {
                        "" => None,
                        c => Some(serde_json::from_str(c).map_err(|e| bad(format!("cut: {e}")))?),
                    },
                })
            })
            .transpose()
    }

    /// Moves the open failover to another point or position (its state does not change).
    pub fn change_failover(
        &self,
        vm: &VmName,
        point: PointId,
        between: Option<&Between>,
        files: &[String],
    ) -> Result<(), StoreError> {
        let files = serde_json::to_string(files).map_err(|_| StoreError::Invariant("file list encodes"))?;
        self.db
            .execute(
                "UPDATE failovers SET point = ?2, files = ?3, cut = ?4, written = 0 WHERE vm = ?1",
                params![vm.as_str(), i64_of(point.0), files, cut_text(between)?],
            )
            .map_err(q("change failover point"))?;
        Ok(())
    }

    /// The failover's output is written whole (its `vm.json` published): commit may go.
    pub fn set_failover_written(&self, vm: &VmName) -> Result<(), StoreError> {
        self.db
            .execute("UPDATE failovers SET written = 1 WHERE vm = ?1", [vm.as_str()])
            .map_err(q("mark failover written"))?;
        Ok(())
    }

    /// Whether the failover's output was written whole since its point last changed.
    pub fn failover_written(&self, vm: &VmName) -> Result<bool, StoreError> {
        self.db
            .query_row("SELECT written FROM failovers WHERE vm = ?1", [vm.as_str()], |r| r.get::<_, i64>(0))
            .optional()
            .map(|w| w.is_some_and(|w| w != 0))
            .map_err(q("read failover"))
    }

    /// Removes points of a VM (and their disk rows) by id.
    pub fn delete_points(&mut self, vm: &VmName, ids: &[PointId]) -> Result<(), StoreError> {
        let tx = self.db.transaction().map_err(q("delete points"))?;
        for id in ids {
            let key = params![vm.as_str(), i64_of(id.0)];
            tx.execute("DELETE FROM point_disks WHERE vm = ?1 AND point = ?2", key)
                .map_err(q("delete points"))?;
            tx.execute("DELETE FROM points WHERE vm = ?1 AND id = ?2", key).map_err(q("delete points"))?;
        }
        tx.commit().map_err(q("delete points"))
    }

    pub fn insert_job(&self, kind: JobKind, vm: &VmName, now_ms: i64) -> Result<u64, StoreError> {
        self.db
            .execute(
                "INSERT INTO jobs (kind, vm, state, started_ms) VALUES (?1, ?2, ?3, ?4)",
                params![kind.as_str(), vm.as_str(), JobState::Running.as_str(), now_ms],
            )
            .map_err(q("create job"))?;
        Ok(u64::try_from(self.db.last_insert_rowid()).unwrap_or(0))
    }

    pub fn update_job(&self, j: &JobRow) -> Result<(), StoreError> {
        self.db
            .execute(
                "UPDATE jobs SET state = ?2, phase = ?3, done = ?4, total = ?5, error = ?6, ended_ms = ?7, \
                 output = ?8 WHERE id = ?1",
                params![
                    i64_of(j.id),
                    j.state.as_str(),
                    j.phase,
                    i64_of(j.done),
                    i64_of(j.total),
                    j.error,
                    j.ended_ms,
                    j.output
                ],
            )
            .map_err(q("update job"))?;
        Ok(())
    }

    pub fn jobs(&self) -> Result<Vec<JobRow>, StoreError> {
        let mut st = self
            .db
            .prepare(
                "SELECT id, kind, vm, state, phase, done, total, error, started_ms, ended_ms, output FROM jobs \
                 ORDER BY id",
            )
            .map_err(q("list jobs"))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, i64>(8)?,
                    r.get::<_, i64>(9)?,
                    r.get::<_, Vec<u8>>(10)?,
                ))
            })
            .map_err(q("list jobs"))?;
        let mut out = Vec::new();
        for r in rows {
            let (id, kind, vm, state, phase, done, total, error, started_ms, ended_ms, output) =
                r.map_err(q("list jobs"))?;
            let bad = |reason: String| bad_row("jobs", &id.to_string(), reason);
            let count = |v: i64| u64::try_from(v).map_err(|_| bad(format!("negative count {v}")));
            out.push(JobRow {
                id: u64::try_from(id).map_err(|_| bad("negative id".into()))?,
                kind: kind.parse().map_err(|e: UnknownName| bad(e.to_string()))?,
                vm,
                state: state.parse().map_err(|e: UnknownName| bad(e.to_string()))?,
                phase,
                done: count(done)?,
                total: count(total)?,
                error,
                started_ms,
                ended_ms,
                output,
            });
        }
        Ok(out)
    }

    /// Deletes ended jobs that ended more than [`JOBS_KEPT_MS`] before `now_ms`, and those
    /// past the newest [`JOBS_KEPT_PER_KIND`] ended ones of their VM and kind; returns how
    /// many. Running jobs are kept, and so is the newest job.
    pub fn prune_jobs(&self, now_ms: i64) -> Result<usize, StoreError> {
        self.db
            .execute(
                // The newest row stays, whatever its age: ids come from the highest one, and
                // a pruned id given to the next job would answer `drctl jobs --wait` wrongly.
                "DELETE FROM jobs WHERE state != ?1 AND id < (SELECT max(id) FROM jobs) AND (ended_ms < ?2 OR id IN (
                     SELECT id FROM (
                         SELECT id, row_number() OVER (PARTITION BY vm, kind ORDER BY id DESC) AS newer
                         FROM jobs WHERE state != ?1)
                     WHERE newer > ?3))",
                params![JobState::Running.as_str(), now_ms - JOBS_KEPT_MS, JOBS_KEPT_PER_KIND],
            )
            .map_err(q("prune jobs"))
    }

    /// Point ids are never reused, even after the points they named were deleted.
    pub fn next_point_id(&self) -> Result<PointId, StoreError> {
        let max: Option<i64> =
            self.db.query_row("SELECT MAX(id) FROM points", [], |r| r.get(0)).map_err(q("next point id"))?;
        let last: Option<i64> = self
            .db
            .query_row("SELECT value FROM counters WHERE name = 'point'", [], |r| r.get(0))
            .optional()
            .map_err(q("next point id"))?;
        let next = max.unwrap_or(0).max(last.unwrap_or(0)) + 1;
        self.db
            .execute(
                "INSERT INTO counters (name, value) VALUES ('point', ?1) ON CONFLICT(name) DO UPDATE SET value = ?1",
                [next],
            )
            .map_err(q("next point id"))?;
        Ok(PointId(u64::try_from(next).unwrap_or(0)))
    }

    /// Folds the WAL into the database file and closes it, checking both: a file published
    /// elsewhere (a rebuilt catalog) must hold everything without its WAL.
    pub fn close_checkpointed(self) -> Result<(), StoreError> {
        self.db
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0))
            .map_err(q("checkpoint catalog"))
            .and_then(|busy| {
                if busy == 0 { Ok(()) } else { Err(StoreError::Invariant("catalog checkpoint blocked")) }
            })?;
        self.db.close().map_err(|(_, e)| q("close catalog")(e))
    }

    /// Point ids up to `id` count as used (a rebuilt catalog never reissues a point id
    /// that a bookmark of a deleted point still names).
    pub fn raise_point_counter(&self, id: PointId) -> Result<(), StoreError> {
        self.db
            .execute(
                "INSERT INTO counters (name, value) VALUES ('point', ?1) \
                 ON CONFLICT(name) DO UPDATE SET value = MAX(value, ?1)",
                [i64_of(id.0)],
            )
            .map_err(q("raise point counter"))?;
        Ok(())
    }

    pub fn insert_point(&mut self, p: &Point) -> Result<(), StoreError> {
        self.insert_points(std::slice::from_ref(p))
    }

    /// Inserts points in one transaction: a multi-VM point is a row per member, all or none.
    pub fn insert_points(&mut self, points: &[Point]) -> Result<(), StoreError> {
        let tx = self.db.transaction().map_err(q("insert point"))?;
        for p in points {
            let group = p.group.as_ref().map_or("", GroupName::as_str);
            tx.execute(
                "INSERT INTO points (vm, id, time_ms, consistency, note, grp) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![p.vm.as_str(), i64_of(p.id.0), p.time_ms, p.consistency.as_str(), p.note, group],
            )
            .map_err(q("insert point"))?;
            for d in &p.disks {
                tx.execute(
                    "INSERT INTO point_disks (vm, point, disk, seq, fingerprint) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        p.vm.as_str(),
                        i64_of(p.id.0),
                        d.disk.as_str(),
                        i64_of(d.seq.0),
                        d.fingerprint.0.to_vec()
                    ],
                )
                .map_err(q("insert point"))?;
            }
        }
        tx.commit().map_err(q("insert point"))
    }

    /// Points of a VM, oldest first.
    pub fn points(&self, vm: &VmName) -> Result<Vec<Point>, StoreError> {
        self.points_from(vm, 0)
    }

    /// The newest `n` points of a VM, oldest first, and how many it has in all.
    pub fn recent_points(&self, vm: &VmName, n: usize) -> Result<(Vec<Point>, u64), StoreError> {
        let (count, from): (i64, Option<i64>) = self
            .db
            .query_row(
                "SELECT count(*), (SELECT id FROM points WHERE vm = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)
                 FROM points WHERE vm = ?1",
                params![vm.as_str(), i64::try_from(n.saturating_sub(1)).unwrap_or(i64::MAX)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(q("count points"))?;
        let total = u64::try_from(count).unwrap_or(0);
        // Fewer than `n`: all of them.
        let from = if n == 0 { 0 } else { from.unwrap_or(0) };
        Ok((self.points_from(vm, from)?, total))
    }

    /// The newest point of a VM: one probe of the `(vm, id)` index.
    pub fn latest_point(&self, vm: &VmName) -> Result<Option<Point>, StoreError> {
        self.point_where(vm, "SELECT max(id) FROM points WHERE vm = ?1 AND id >= ?2", 0)
    }

    /// The oldest point of a VM: one probe of the `(vm, id)` index.
    pub fn oldest_point(&self, vm: &VmName) -> Result<Option<Point>, StoreError> {
        self.point_where(vm, "SELECT min(id) FROM points WHERE vm = ?1 AND id >= ?2", 0)
    }

    /// One point of a VM by id.
    pub fn point(&self, vm: &VmName, id: PointId) -> Result<Option<Point>, StoreError> {
        let id = i64_of(id.0);
        Ok(self.points_in(vm, id, id)?.pop())
    }

    /// The newest point of a VM whose query `sql` (with `?1` the VM, `?2` its argument)
    /// names by id.
    fn point_where(&self, vm: &VmName, sql: &str, arg: i64) -> Result<Option<Point>, StoreError> {
        let id: Option<i64> =
            self.db.query_row(sql, params![vm.as_str(), arg], |r| r.get(0)).map_err(q("look up point"))?;
        match id {
            Some(id) => Ok(self.points_in(vm, id, id)?.pop()),
            None => Ok(None),
        }
    }

    /// The newest point at or before Unix millisecond `ms`: one step down the time index
    /// (`max(id)` over the range read all of it: 197 ms at 2.6 million points, 0.01 ms so).
    pub fn point_at_or_before(&self, vm: &VmName, ms: i64) -> Result<Option<Point>, StoreError> {
        self.point_where(
            vm,
            "SELECT (SELECT id FROM points WHERE vm = ?1 AND time_ms <= ?2 ORDER BY time_ms DESC, id DESC LIMIT 1)",
            ms,
        )
    }

    /// The point after `id` (the next one made).
    pub fn next_point(&self, vm: &VmName, id: PointId) -> Result<Option<Point>, StoreError> {
        self.point_where(vm, "SELECT min(id) FROM points WHERE vm = ?1 AND id > ?2", i64_of(id.0))
    }

    /// The newest app-consistent point.
    pub fn latest_app_point(&self, vm: &VmName) -> Result<Option<Point>, StoreError> {
        self.point_where(
            vm,
            "SELECT max(id) FROM points WHERE vm = ?1 AND consistency = 'app' AND id >= ?2",
            0,
        )
    }

    /// The newest multi-VM point of `group` that `vm` has (app-consistent ones only when
    /// `app`), at or below id `below`: one or two probes of the group index.
    pub fn group_point_at_or_below(
        &self,
        vm: &VmName,
        group: &GroupName,
        app: bool,
        below: PointId,
    ) -> Result<Option<PointId>, StoreError> {
        let probe = "SELECT max(id) FROM points WHERE vm = ?1 AND grp = ?2 AND consistency = ?3 AND id <= ?4";
        let mut best: Option<i64> = None;
        for c in if app { &["app"][..] } else { &["crash", "app"][..] } {
            let id: Option<i64> = self
                .db
                .query_row(probe, params![vm.as_str(), group.as_str(), c, i64_of(below.0)], |r| r.get(0))
                .map_err(q("look up multi-VM point"))?;
            best = best.max(id);
        }
        Ok(best.and_then(|id| u64::try_from(id).ok()).map(PointId))
    }

    /// The group `vm` belongs to, if any.
    pub fn group_of(&self, vm: &VmName) -> Result<Option<GroupName>, StoreError> {
        let g: Option<String> = self
            .db
            .query_row("SELECT grp FROM group_members WHERE vm = ?1", [vm.as_str()], |r| r.get(0))
            .optional()
            .map_err(q("look up group"))?;
        g.map(|g| GroupName::new(&g).map_err(|e| bad_row("group_members", vm.as_str(), e.to_string())))
            .transpose()
    }

    /// Every replication group, by name, with its members in name order.
    pub fn groups(&self) -> Result<Vec<GroupRow>, StoreError> {
        let mut st = self
            .db
            .prepare("SELECT name, crash_interval_ms, app_interval_ms FROM groups ORDER BY name")
            .map_err(q("list groups"))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
            .map_err(q("list groups"))?;
        let mut out = Vec::new();
        for r in rows {
            let (name, crash_interval_ms, app_interval_ms) = r.map_err(q("list groups"))?;
            let name = GroupName::new(&name).map_err(|e| bad_row("groups", &name, e.to_string()))?;
            out.push(GroupRow { name, members: Vec::new(), crash_interval_ms, app_interval_ms });
        }
        let mut st =
            self.db.prepare("SELECT grp, vm FROM group_members ORDER BY vm").map_err(q("list groups"))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(q("list groups"))?;
        for r in rows {
            let (grp, vm) = r.map_err(q("list groups"))?;
            let bad = |reason: String| bad_row("group_members", &vm, reason);
            let g = out
                .iter_mut()
                .find(|g| g.name.as_str() == grp)
                .ok_or_else(|| bad(format!("group {grp:?} does not exist")))?;
            g.members.push(VmName::new(&vm).map_err(|e| bad(e.to_string()))?);
        }
        Ok(out)
    }

    pub fn group(&self, name: &GroupName) -> Result<Option<GroupRow>, StoreError> {
        Ok(self.groups()?.into_iter().find(|g| &g.name == name))
    }

    /// Creates a group, or (with `create` false) adds members to an existing one; refused
    /// (nothing changed) when a VM is unknown or already in a group.
    pub fn add_to_group(
        &mut self,
        name: &GroupName,
        vms: &[VmName],
        create: Option<(i64, i64)>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let tx = self.db.transaction().map_err(q("change group"))?;
        let exists: bool = tx
            .query_row("SELECT count(*) FROM groups WHERE name = ?1", [name.as_str()], |r| r.get::<_, i64>(0))
            .map_err(q("change group"))?
            > 0;
        match (create, exists) {
            (Some(_), true) => return Err(StoreError::Group(format!("group {name} already exists"))),
            (None, false) => {
                return Err(StoreError::GroupNotFound(format!(
                    "no group is named {name}; create it with `drctl group create {name} --vm ...`"
                )));
            }
            (Some((crash, app)), false) => {
                tx.execute(
                    "INSERT INTO groups (name, created_ms, crash_interval_ms, app_interval_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![name.as_str(), now_ms, crash, app],
                )
                .map_err(q("change group"))?;
            }
            (None, true) => {}
        }
        for (i, vm) in vms.iter().enumerate() {
            if vms[..i].contains(vm) {
                return Err(StoreError::Group(format!("VM {vm} is named twice; name each VM once")));
            }
            let known: bool = tx
                .query_row("SELECT count(*) FROM vms WHERE name = ?1", [vm.as_str()], |r| r.get::<_, i64>(0))
                .map_err(q("change group"))?
                > 0;
            if !known {
                return Err(StoreError::GroupNotFound(format!(
                    "VM {vm} is not protected here: its agent has not replicated it yet (enroll it with \
                     `drctl enroll agent --vm {vm} --out FILE` if it is not, and start `mobility-agent run --vm {vm} ...`)"
                )));
            }
            let other: Option<String> = tx
                .query_row("SELECT grp FROM group_members WHERE vm = ?1", [vm.as_str()], |r| r.get(0))
                .optional()
                .map_err(q("change group"))?;
            // Already a member: nothing to do (adding is idempotent, for scripts).
            if other.as_deref() == Some(name.as_str()) {
                continue;
            }
            if let Some(other) = other {
                return Err(StoreError::Group(format!(
                    "VM {vm} is already in group {other}; a VM belongs to one group (`drctl group remove {other} --vm {vm}` first)"
                )));
            }
            tx.execute(
                "INSERT INTO group_members (vm, grp) VALUES (?1, ?2)",
                params![vm.as_str(), name.as_str()],
            )
            .map_err(q("change group"))?;
        }
        tx.commit().map_err(q("change group"))
    }

    /// Removes members from a group; with no VMs named, removes the group itself (its
    /// multi-VM points stay points of each VM).
    pub fn remove_from_group(&mut self, name: &GroupName, vms: &[VmName]) -> Result<(), StoreError> {
        let tx = self.db.transaction().map_err(q("change group"))?;
        if vms.is_empty() {
            tx.execute("DELETE FROM group_members WHERE grp = ?1", [name.as_str()])
                .map_err(q("change group"))?;
            let n = tx
                .execute("DELETE FROM groups WHERE name = ?1", [name.as_str()])
                .map_err(q("change group"))?;
            if n == 0 {
                return Err(StoreError::GroupNotFound(format!("no group is named {name}")));
            }
        }
        for vm in vms {
            let n = tx
                .execute(
                    "DELETE FROM group_members WHERE vm = ?1 AND grp = ?2",
                    params![vm.as_str(), name.as_str()],
                )
                .map_err(q("change group"))?;
            if n == 0 {
                return Err(StoreError::GroupNotFound(format!("VM {vm} is not in group {name}")));
            }
        }
        tx.commit().map_err(q("change group"))
    }

    /// Sets a group's multi-VM intervals (`None` keeps one).
    pub fn set_group_intervals(
        &self,
        name: &GroupName,
        crash_ms: Option<i64>,
        app_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let n = self
            .db
            .execute(
                "UPDATE groups SET crash_interval_ms = coalesce(?2, crash_interval_ms),
                 app_interval_ms = coalesce(?3, app_interval_ms) WHERE name = ?1",
                params![name.as_str(), crash_ms, app_ms],
            )
            .map_err(q("set group policy"))?;
        if n == 0 {
            return Err(StoreError::GroupNotFound(format!("no group is named {name}")));
        }
        Ok(())
    }

    /// Stores a plan's file under its name, replacing an earlier one.
    pub fn put_plan(&self, plan: &PlanRow) -> Result<(), StoreError> {
        self.db
            .execute(
                "INSERT INTO plans (name, source, file, applied_ms, run) VALUES (?1, ?2, ?3, ?4, '')
                 ON CONFLICT(name) DO UPDATE SET source = ?2, file = ?3, applied_ms = ?4",
                params![plan.name, plan.source, plan.file, plan.applied_ms],
            )
            .map_err(q("store plan"))?;
        Ok(())
    }

    pub fn plans(&self) -> Result<Vec<PlanRow>, StoreError> {
        let mut st = self
            .db
            .prepare("SELECT name, source, file, applied_ms, run FROM plans ORDER BY name")
            .map_err(q("list plans"))?;
        let rows = st
            .query_map([], |r| {
                Ok(PlanRow {
                    name: r.get(0)?,
                    source: r.get(1)?,
                    file: r.get(2)?,
                    applied_ms: r.get(3)?,
                    run: r.get(4)?,
                })
            })
            .map_err(q("list plans"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(q("list plans"))
    }

    /// Records how far a plan's operation got.
    pub fn set_plan_run(&self, name: &str, run: &str) -> Result<(), StoreError> {
        self.db
            .execute("UPDATE plans SET run = ?2 WHERE name = ?1", params![name, run])
            .map_err(q("record plan run"))?;
        Ok(())
    }

    pub fn delete_plan(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.db.execute("DELETE FROM plans WHERE name = ?1", [name]).map_err(q("delete plan"))? > 0)
    }

    /// Points of a VM from id `from` on, oldest first.
    fn points_from(&self, vm: &VmName, from: i64) -> Result<Vec<Point>, StoreError> {
        self.points_in(vm, from, i64::MAX)
    }

    /// Points of a VM with `from <= id <= to`, oldest first.
    fn points_in(&self, vm: &VmName, from: i64, to: i64) -> Result<Vec<Point>, StoreError> {
        let mut st = self
            .db
            .prepare(
                "SELECT id, time_ms, consistency, note, grp FROM points
                 WHERE vm = ?1 AND id >= ?2 AND id <= ?3 ORDER BY id",
            )
            .map_err(q("list points"))?;
        let rows = st
            .query_map(params![vm.as_str(), from, to], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .map_err(q("list points"))?;
        let mut points = Vec::new();
        let mut index = std::collections::HashMap::new();
        for r in rows {
            let (id, time_ms, consistency, note, group) = r.map_err(q("list points"))?;
            let bad = |reason: String| bad_row("points", &id.to_string(), reason);
            index.insert(id, points.len());
            points.push(Point {
                id: PointId(u64::try_from(id).map_err(|_| bad("negative id".into()))?),
                vm: vm.clone(),
                time_ms,
                consistency: Consistency::parse(&consistency)
                    .ok_or_else(|| bad(format!("unknown consistency {consistency:?}")))?,
                note,
                disks: Vec::new(),
                group: if group.is_empty() {
                    None
                } else {
                    Some(GroupName::new(&group).map_err(|e| bad(e.to_string()))?)
                },
            });
        }
        let mut st = self
            .db
            .prepare(
                "SELECT point, disk, seq, fingerprint FROM point_disks
                 WHERE vm = ?1 AND point >= ?2 AND point <= ?3 ORDER BY point, disk",
            )
            .map_err(q("list point disks"))?;
        let rows = st
            .query_map(params![vm.as_str(), from, to], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            })
            .map_err(q("list point disks"))?;
        for r in rows {
            let (point, disk, seq, fp) = r.map_err(q("list point disks"))?;
            let bad = |reason: String| bad_row("point_disks", &format!("{point}/{disk}"), reason);
            let p = index
                .get(&point)
                .and_then(|&i| points.get_mut(i))
                .ok_or_else(|| bad("its point is not listed".into()))?;
            p.disks.push(PointDisk {
                disk: DiskName::new(&disk).map_err(|e| bad(e.to_string()))?,
                seq: Seq(u64::try_from(seq).map_err(|_| bad(format!("seq {seq}")))?),
                fingerprint: Digest::from_slice(&fp)
                    .ok_or_else(|| bad("fingerprint is not 32 bytes".into()))?,
            });
        }
        Ok(points)
    }

    pub fn test_failover(&self, vm: &VmName) -> Result<Option<TestFailoverRow>, StoreError> {
        self.db
            .query_row("SELECT point, output, files FROM test_failovers WHERE vm = ?1", [vm.as_str()], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
            })
            .optional()
            .map_err(q("look up test failover"))?
            .map(|(point, output, files)| {
                let bad = |reason: String| bad_row("test_failovers", vm.as_str(), reason);
                Ok(TestFailoverRow {
                    point: PointId(u64::try_from(point).map_err(|_| bad(format!("point {point}")))?),
                    output,
                    files: serde_json::from_str(&files).map_err(|e| bad(format!("files: {e}")))?,
                })
            })
            .transpose()
    }

    /// Every VM's failover output directory (`"failover"`, kept until a failback commits)
    /// and open test failover's (`"test failover"`): (VM, what, directory).
    pub fn outputs_in_use(&self) -> Result<Vec<(String, &'static str, String)>, StoreError> {
        let mut stmt = self
            .db
            .prepare("SELECT vm, 0, output FROM failovers UNION ALL SELECT vm, 1, output FROM test_failovers")
            .map_err(q("list outputs"))?;
        let rows = stmt
            .query_map([], |r| {
                let what = if r.get::<_, i64>(1)? == 0 { "failover" } else { "test failover" };
                Ok((r.get::<_, String>(0)?, what, r.get::<_, String>(2)?))
            })
            .map_err(q("list outputs"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(q("list outputs"))
    }

    pub fn open_test_failover(&self, vm: &VmName, row: &TestFailoverRow) -> Result<(), StoreError> {
        let files =
            serde_json::to_string(&row.files).map_err(|_| StoreError::Invariant("file list encodes"))?;
        self.db
            .execute(
                "INSERT INTO test_failovers (vm, point, output, files) VALUES (?1, ?2, ?3, ?4)",
                params![vm.as_str(), i64_of(row.point.0), row.output, files],
            )
            .map_err(q("record test failover"))?;
        Ok(())
    }

    pub fn close_test_failover(&self, vm: &VmName) -> Result<(), StoreError> {
        self.db
            .execute("DELETE FROM test_failovers WHERE vm = ?1", [vm.as_str()])
            .map_err(q("close test failover"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failover_between_points_keeps_its_position() {
        let (_dir, mut c, vm) = catalog_in(VmState::Protected);
        let Transition::FailOver(row) = transitions().remove(0) else { panic!("first is a failover") };
        c.transition(&vm, &Transition::FailOver(row.clone())).unwrap();
        assert_eq!(c.failover(&vm).unwrap().unwrap(), row);
        c.change_failover(&vm, PointId(1), None, &row.files).unwrap();
        assert_eq!(c.failover(&vm).unwrap().unwrap().between, None);
    }

    #[test]
    fn recent_points_are_the_newest_and_count_them_all() {
        let (_dir, mut c, vm) = catalog_in(VmState::Protected);
        let disk = DiskName::new("sda").unwrap();
        for i in 0..6 {
            let id = c.next_point_id().unwrap();
            let pd =
                PointDisk { disk: disk.clone(), seq: Seq(10 + i), fingerprint: Digest::of(&i.to_le_bytes()) };
            let p = Point {
                id,
                vm: vm.clone(),
                time_ms: 10 + i as i64,
                consistency: Consistency::Crash,
                note: String::new(),
                disks: vec![pd],
                group: None,
            };
            c.insert_point(&p).unwrap();
        }
        let all = c.points(&vm).unwrap();
        assert_eq!(all.len(), 7);
        let (p, total) = c.recent_points(&vm, 3).unwrap();
        assert_eq!(total, 7);
        assert_eq!(p, all[4..].to_vec());
        assert_eq!(p[2].disks[0].seq, Seq(15));
        assert_eq!(c.recent_points(&vm, 0).unwrap().0, all);
        assert_eq!(c.recent_points(&vm, 70).unwrap().0, all);
        assert_eq!(c.latest_point(&vm).unwrap().as_ref(), all.last());
    }

    /// Every row of every table, as text: what a refused change must leave as it was.
    fn dump(c: &Catalog) -> Vec<String> {
        let mut out = Vec::new();
        for table in [
            "vms",
            "disks",
            "points",
            "point_disks",
            "policies",
            "saved_policies",
            "failovers",
            "test_failovers",
            "reprotects",
            "jobs",
            "counters",
        ] {
            let mut st = c.db.prepare(&format!("SELECT * FROM {table}")).unwrap();
            let n = st.column_count();
            let rows = st
                .query_map([], |r| {
                    let cols: Vec<String> = (0..n).map(|i| format!("{:?}", r.get_ref(i).unwrap())).collect();
                    Ok(format!("{table}: {}", cols.join(" | ")))
                })
                .unwrap();
            out.extend(rows.map(Result::unwrap));
        }
        out
    }

    fn transitions() -> Vec<Transition> {
        let row = FailoverRow {
            kind: FailoverKind::Unplanned,
            point: PointId(1),
            output: "/out".into(),
            format: "raw".into(),
            files: vec!["/out/sda.raw".into()],
            between: Some(Between { time_ms: 1_700_000_000_123, next: 2, seqs: vec![41] }),
        };
        let reprotect = ReprotectRow {
            master_target: "https://mt:7443".into(),
            alternate: false,
            sync: SyncMode::Before,
            disks: vec![("sda".into(), "/dev/sdb".into())],
            identity: "0a1b".into(),
        };
        let generations = vec![(DiskName::new("sda").unwrap(), "g2".to_string())];
        vec![
            Transition::FailOver(row),
            Transition::AbandonFailover,
            Transition::CommitFailover,
            Transition::Reprotect {
                row: reprotect,
                policy: Policy::default(),
                generations: generations.clone(),
            },
            Transition::CancelReprotect,
            Transition::FailBack,
            Transition::CommitFailback,
            Transition::ReverseReplicate { policy: Policy::default(), generations },
        ]
    }

    /// A VM with a disk, a point and a policy, in `state`.
    fn catalog_in(state: VmState) -> (tempfile::TempDir, Catalog, VmName) {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Catalog::open(&dir.path().join("catalog.db")).unwrap();
        let vm = VmName::new("vm").unwrap();
        c.add_vm(&vm, 1).unwrap();
        let disk = DiskName::new("sda").unwrap();
        let row = DiskRow {
            name: disk.clone(),
            size: 1 << 20,
            generation: "g1".into(),
            base_seq: Seq(0),
            base_path: None,
        };
        c.add_disk(&vm, &row).unwrap();
        let id = c.next_point_id().unwrap();
        let pd = PointDisk { disk, seq: Seq(3), fingerprint: Digest::of(b"x") };
        let point = Point {
            id,
            vm: vm.clone(),
            time_ms: 5,
            consistency: Consistency::Crash,
            note: String::new(),
            disks: vec![pd],
            group: None,
        };
        c.insert_point(&point).unwrap();
        c.set_policy(
            &vm,
            &Policy { retention_ms: 7_200_000, max_journal_bytes: 5 << 30, ..Policy::default() },
        )
        .unwrap();
        c.raw_set_state_for_tests(&vm, state);
        (dir, c, vm)
    }

    /// Every change not allowed from a state (reprotect before commit, failback while
    /// protected, a second commit, ...) is refused with the state and what to do, and no
    /// row changes; the allowed one changes the state and its rows together.
    #[test]
    fn a_forbidden_transition_is_refused_and_changes_no_row() {
        let mut refused = 0;
        for &state in VmState::ALL {
            for t in transitions() {
                let (_dir, mut c, vm) = catalog_in(state);
                let before = dump(&c);
                let result = c.transition(&vm, &t);
                if t.from() == state {
                    result.unwrap();
                    assert_eq!(c.vm_state(&vm).unwrap(), t.to());
                    assert!(state.can_become(t.to()), "{state} -> {}", t.to());
                    continue;
                }
                let err = result.unwrap_err();
                let text = err.to_string();
                assert!(matches!(err, StoreError::WrongState { .. }), "{state} {t:?}: {text}");
                assert!(text.contains(&format!("is {state};")) && text.contains(t.refusal()), "{text}");
                assert_eq!(dump(&c), before, "{state} {t:?} changed a row");
                refused += 1;
            }
        }
        assert_eq!(refused, VmState::ALL.len() * transitions().len() - transitions().len());
    }

    #[test]
    fn a_commit_removes_the_points_and_reverse_replication_restores_the_policy_in_one_step() {
        let (_dir, mut c, vm) = catalog_in(VmState::FailedOver);
        c.transition(&vm, &Transition::CommitFailover).unwrap();
        assert!(c.points(&vm).unwrap().is_empty());
        let (_dir, mut c, vm) = catalog_in(VmState::FailbackCommitted);
        let generations = vec![(DiskName::new("sda").unwrap(), "g9".to_string())];
        c.transition(&vm, &Transition::ReverseReplicate { policy: Policy::default(), generations }).unwrap();
        assert_eq!(c.policy(&vm).unwrap(), Policy::default());
        assert_eq!(c.disks(&vm).unwrap()[0].generation, "g9");
        assert_eq!(c.vm_state(&vm).unwrap(), VmState::Protected);
    }

    /// The VM's own policy (a 2 h retention here) is kept from reprotect, through a
    /// cancelled reprotect (which brings it back) and a second one, to reverse replication,
    /// which brings it back; a policy the operator sets meanwhile wins.
    #[test]
    fn the_vms_policy_comes_back_at_reverse_replication() {
        let (_dir, mut c, vm) = catalog_in(VmState::FailoverCommitted);
        let own = c.policy(&vm).unwrap();
        assert_eq!((own.retention_ms, own.max_journal_bytes), (7_200_000, 5 << 30));
        let failback = Policy { crash_interval_ms: 30_000, ..Policy::default() };
        let reprotect = |policy: Policy| Transition::Reprotect {
            row: ReprotectRow {
                master_target: "https://mt:7443".into(),
                alternate: false,
                sync: SyncMode::Before,
                disks: vec![("sda".into(), "/dev/sdb".into())],
                identity: "0a1b".into(),
            },
            policy,
            generations: vec![],
        };
        c.transition(&vm, &reprotect(failback)).unwrap();
        assert_eq!(c.policy(&vm).unwrap(), failback);
        c.transition(&vm, &Transition::CancelReprotect).unwrap();
        assert_eq!(c.policy(&vm).unwrap(), own);
        c.transition(&vm, &reprotect(failback)).unwrap();
        c.transition(&vm, &Transition::FailBack).unwrap();
        c.transition(&vm, &Transition::CommitFailback).unwrap();
        let reverse = Transition::ReverseReplicate { policy: Policy::default(), generations: vec![] };
        c.transition(&vm, &reverse).unwrap();
        assert_eq!(c.policy(&vm).unwrap(), own);
        let rows: i64 = c.db.query_row("SELECT count(*) FROM saved_policies", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 0, "kept for one circle");
        // Round again, the operator setting a policy before reverse replication.
        c.raw_set_state_for_tests(&vm, VmState::FailoverCommitted);
        c.transition(&vm, &reprotect(failback)).unwrap();
        c.transition(&vm, &Transition::FailBack).unwrap();
        c.transition(&vm, &Transition::CommitFailback).unwrap();
        assert_eq!(c.own_policy(&vm).unwrap(), own, "what comes back, shown meanwhile");
        let chosen = Policy { rpo_threshold_ms: 60_000, ..own };
        c.set_policy(&vm, &chosen).unwrap();
        c.transition(&vm, &reverse).unwrap();
        assert_eq!(c.policy(&vm).unwrap(), chosen);
    }

    /// A catalog written before the schema version was kept (a `.dump` of one made by the
    /// process server at a669440: two VMs, one failed over, one with an open test failover
    /// and its own policy, four jobs) opens, migrates, and reads back as it was.
    #[test]
    fn a_catalog_from_before_the_version_opens_migrates_and_reads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        Connection::open(&path).unwrap().execute_batch(include_str!("../testdata/catalog-v0.sql")).unwrap();
        let c = Catalog::open(&path).unwrap();
        let version: i64 = c.db.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let (web, db) = (VmName::new("web").unwrap(), VmName::new("db").unwrap());
        assert_eq!(c.vms().unwrap(), [db.clone(), web.clone()]);
        assert_eq!(c.vm_state(&web).unwrap(), VmState::Protected);
        assert_eq!(c.vm_state(&db).unwrap(), VmState::FailedOver);
        let ids: Vec<u64> = c.points(&web).unwrap().iter().map(|p| p.id.0).collect();
        assert_eq!(ids, [1, 3, 4]);
        let p = &c.points(&web).unwrap()[0];
        assert_eq!((p.time_ms, p.consistency, p.disks.len()), (1_795_857_800_023, Consistency::Crash, 1));
        assert_eq!(c.policy(&web).unwrap().retention_ms, 7_200_000);
        assert_eq!(c.policy(&web).unwrap().max_journal_bytes, 0, "no bound before version 8");
        let f = c.failover(&db).unwrap().unwrap();
        assert_eq!((f.kind, f.point, f.between), (FailoverKind::Unplanned, PointId(7), None));
        assert_eq!(c.test_failover(&web).unwrap().unwrap().point, PointId(4));
        let kinds: Vec<JobKind> = c.jobs().unwrap().iter().map(|j| j.kind).collect();
        assert_eq!(
            kinds,
            [JobKind::InitialSync, JobKind::InitialSync, JobKind::TestFailover, JobKind::UnplannedFailover]
        );
        assert!(c.next_point_id().unwrap().0 > 7);
        drop(c);
        // A catalog from a newer tern is refused, not misread.
        Connection::open(&path).unwrap().pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        assert!(matches!(Catalog::open(&path), Err(StoreError::CatalogTooNew { .. })));
    }

    #[test]
    fn ended_jobs_are_kept_thirty_days_and_fifty_of_a_kind_per_vm_with_their_output() {
        let (_dir, c, vm) = catalog_in(VmState::Protected);
        let other = VmName::new("other").unwrap();
        let day = 24 * 3_600_000;
        let now = 100 * day;
        let end = |id: u64, kind: JobKind, vm: &VmName, ended_ms: i64| {
            let row = JobRow {
                id,
                kind,
                vm: vm.to_string(),
                state: JobState::Failed,
                phase: String::new(),
                done: 0,
                total: 0,
                error: "no room".into(),
                started_ms: ended_ms,
                ended_ms,
                output: id.to_le_bytes().to_vec(),
            };
            c.update_job(&row).unwrap();
        };
        // A running job 40 days old, one ended 31 days ago, one ended 29 days ago.
        let running = c.insert_job(JobKind::TestFailover, &vm, now - 40 * day).unwrap();
        let old = c.insert_job(JobKind::TestFailover, &vm, now - 31 * day).unwrap();
        end(old, JobKind::TestFailover, &vm, now - 31 * day);
        let recent = c.insert_job(JobKind::TestFailover, &vm, now - 29 * day).unwrap();
        end(recent, JobKind::TestFailover, &vm, now - 29 * day);
        // 60 failed initial syncs of one VM, and one of another.
        let syncs: Vec<u64> = (0..60)
            .map(|i| {
                let id = c.insert_job(JobKind::InitialSync, &vm, now - day + i).unwrap();
                end(id, JobKind::InitialSync, &vm, now - day + i);
                id
            })
            .collect();
        let elsewhere = c.insert_job(JobKind::InitialSync, &other, now).unwrap();
        end(elsewhere, JobKind::InitialSync, &other, now);

        assert_eq!(c.prune_jobs(now).unwrap(), 1 + 10);
        let kept: Vec<u64> = c.jobs().unwrap().iter().map(|j| j.id).collect();
        let mut want = vec![running, recent];
        want.extend(&syncs[10..]);
        want.push(elsewhere);
        assert_eq!(kept, want);
        let j = c.jobs().unwrap().into_iter().find(|j| j.id == recent).unwrap();
        assert_eq!((j.state, j.output), (JobState::Failed, recent.to_le_bytes().to_vec()));
        assert_eq!(c.prune_jobs(now).unwrap(), 0);
        // Long after, the newest stays: its id is not given again.
        assert_eq!(c.prune_jobs(now + 60 * day).unwrap(), kept.len() - 2);
        assert_eq!(c.jobs().unwrap().iter().map(|j| j.id).collect::<Vec<_>>(), [running, elsewhere]);
        assert!(c.insert_job(JobKind::TestFailover, &vm, now + 60 * day).unwrap() > elsewhere);
    }

    #[test]
    fn a_row_that_does_not_decode_is_an_error_naming_it() {
        let (_dir, c, vm) = catalog_in(VmState::Protected);
        c.db.execute("UPDATE vms SET state = 'floating' WHERE name = 'vm'", []).unwrap();
        let err = c.vm_state(&vm).unwrap_err().to_string();
        assert!(err.contains("vms[vm]") && err.contains("floating"), "{err}");
        c.db.execute("UPDATE points SET consistency = 'maybe'", []).unwrap();
        let err = c.points(&vm).unwrap_err().to_string();
        assert!(err.contains("points[1]") && err.contains("maybe"), "{err}");
    }
}
