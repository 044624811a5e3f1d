//! The catalog: VMs, disks, recovery points and open test failovers, in SQLite (WAL mode)
//! inside the data directory. Journal positions are not kept here: the journal itself is
//! the truth for what is durable, so the catalog never runs ahead of the data.

use crate::StoreError;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use tern_core::{Digest, DiskName, PointId, Seq, VmName};

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
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReprotectRow {
    pub master_target: String,
    pub alternate: bool,
    /// "before" or "during".
    pub sync: String,
    /// (disk, path on the master target)
    pub disks: Vec<(String, String)>,
}

/// A VM's replication policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub retention_ms: i64,
    pub crash_interval_ms: i64,
    pub app_interval_ms: i64,
    pub rpo_threshold_ms: i64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            retention_ms: 24 * 3_600_000,
            crash_interval_ms: 5 * 60_000,
            app_interval_ms: 60 * 60_000,
            rpo_threshold_ms: 15 * 60_000,
        }
    }
}

/// Longest retention window a policy may have.
pub const MAX_RETENTION_MS: i64 = 30 * 24 * 3_600_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverRow {
    pub kind: String,
    pub point: PointId,
    pub output: String,
    pub format: String,
    pub files: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRow {
    pub id: u64,
    pub kind: String,
    pub vm: String,
    pub state: String,
    pub phase: String,
    pub done: u64,
    pub total: u64,
    pub error: String,
    pub started_ms: i64,
    pub ended_ms: i64,
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
    fn parse(s: &str) -> Consistency {
        if s == "app" { Consistency::App } else { Consistency::Crash }
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

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'protected'
);
CREATE TABLE IF NOT EXISTS policies (
    vm TEXT PRIMARY KEY REFERENCES vms(name),
    retention_ms INTEGER NOT NULL,
    crash_interval_ms INTEGER NOT NULL,
    app_interval_ms INTEGER NOT NULL,
    rpo_threshold_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS failovers (
    vm TEXT PRIMARY KEY REFERENCES vms(name),
    kind TEXT NOT NULL,
    point INTEGER NOT NULL,
    output TEXT NOT NULL,
    format TEXT NOT NULL,
    files TEXT NOT NULL
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
    disks TEXT NOT NULL
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
    ended_ms INTEGER NOT NULL DEFAULT 0
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
CREATE TABLE IF NOT EXISTS points (
    id INTEGER PRIMARY KEY,
    vm TEXT NOT NULL REFERENCES vms(name),
    time_ms INTEGER NOT NULL,
    consistency TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS points_vm ON points (vm, id);
CREATE TABLE IF NOT EXISTS point_disks (
    point INTEGER NOT NULL REFERENCES points(id),
    disk TEXT NOT NULL,
    seq INTEGER NOT NULL,
    fingerprint BLOB NOT NULL,
    PRIMARY KEY (point, disk)
);
CREATE TABLE IF NOT EXISTS test_failovers (
    vm TEXT PRIMARY KEY REFERENCES vms(name),
    point INTEGER NOT NULL,
    output TEXT NOT NULL,
    files TEXT NOT NULL
);
";

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Catalog {
    pub fn open(path: &Path) -> Result<Catalog, StoreError> {
        let db = Connection::open(path).map_err(q("open catalog"))?;
        db.pragma_update(None, "journal_mode", "WAL").map_err(q("set WAL mode"))?;
        // FULL: a point the catalog reports must survive power loss.
        db.pragma_update(None, "synchronous", "FULL").map_err(q("set synchronous"))?;
        db.pragma_update(None, "foreign_keys", "ON").map_err(q("enable foreign keys"))?;
        db.execute_batch(SCHEMA).map_err(q("create schema"))?;
        Ok(Catalog { db })
    }

    pub fn vms(&self) -> Result<Vec<VmName>, StoreError> {
        let mut st = self.db.prepare("SELECT name FROM vms ORDER BY name").map_err(q("list VMs"))?;
        let rows = st.query_map([], |r| r.get::<_, String>(0)).map_err(q("list VMs"))?;
        let mut out = Vec::new();
        for r in rows {
            let name = r.map_err(q("list VMs"))?;
            if let Ok(vm) = VmName::new(&name) {
                out.push(vm);
            }
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
            if let Ok(name) = DiskName::new(&name) {
                out.push(DiskRow {
                    name,
                    size: u64::try_from(size).unwrap_or(0),
                    generation,
                    base_seq: Seq(u64::try_from(base).unwrap_or(0)),
                    base_path: (!base_path.is_empty()).then(|| std::path::PathBuf::from(base_path)),
                });
            }
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
        self.db
            .execute(
                "UPDATE disks SET generation = ?3 WHERE vm = ?1 AND name = ?2",
                params![vm.as_str(), disk.as_str(), generation],
            )
            .map_err(q("start a new epoch"))?;
        Ok(())
    }

    pub fn reprotect(&self, vm: &VmName) -> Result<Option<ReprotectRow>, StoreError> {
        self.db
            .query_row(
                "SELECT master_target, alternate, sync, disks FROM reprotects WHERE vm = ?1",
                [vm.as_str()],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                },
            )
            .optional()
            .map_err(q("look up reprotect"))
            .map(|row| {
                row.map(|(master_target, alternate, sync, disks)| ReprotectRow {
                    master_target,
                    alternate: alternate != 0,
                    sync,
                    disks: serde_json::from_str(&disks).unwrap_or_default(),
                })
            })
    }

    pub fn put_reprotect(&self, vm: &VmName, r: &ReprotectRow) -> Result<(), StoreError> {
        let disks = serde_json::to_string(&r.disks).unwrap_or_else(|_| "[]".into());
        self.db
            .execute(
                "INSERT INTO reprotects (vm, master_target, alternate, sync, disks) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(vm) DO UPDATE SET master_target = ?2, alternate = ?3, sync = ?4, disks = ?5",
                params![vm.as_str(), r.master_target, i64::from(r.alternate), r.sync, disks],
            )
            .map_err(q("record reprotect"))?;
        Ok(())
    }

    pub fn delete_reprotect(&self, vm: &VmName) -> Result<(), StoreError> {
        self.db.execute("DELETE FROM reprotects WHERE vm = ?1", [vm.as_str()]).map_err(q("end reprotect"))?;
        Ok(())
    }

    /// Removes every row of a VM.
    pub fn forget_vm(&self, vm: &VmName) -> Result<(), StoreError> {
        for sql in [
            "DELETE FROM point_disks WHERE point IN (SELECT id FROM points WHERE vm = ?1)",
            "DELETE FROM points WHERE vm = ?1",
            "DELETE FROM disks WHERE vm = ?1",
            "DELETE FROM policies WHERE vm = ?1",
            "DELETE FROM test_failovers WHERE vm = ?1",
            "DELETE FROM failovers WHERE vm = ?1",
            "DELETE FROM reprotects WHERE vm = ?1",
            "DELETE FROM vms WHERE name = ?1",
        ] {
            self.db.execute(sql, [vm.as_str()]).map_err(q("forget VM"))?;
        }
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

    pub fn vm_state(&self, vm: &VmName) -> Result<String, StoreError> {
        self.db
            .query_row("SELECT state FROM vms WHERE name = ?1", [vm.as_str()], |r| r.get(0))
            .optional()
            .map_err(q("read VM state"))?
            .ok_or_else(|| StoreError::UnknownVm(vm.clone()))
    }

    pub fn set_vm_state(&self, vm: &VmName, state: &str) -> Result<(), StoreError> {
        self.db
            .execute("UPDATE vms SET state = ?2 WHERE name = ?1", params![vm.as_str(), state])
            .map_err(q("set VM state"))?;
        Ok(())
    }

    pub fn policy(&self, vm: &VmName) -> Result<Policy, StoreError> {
        Ok(self
            .db
            .query_row(
                "SELECT retention_ms, crash_interval_ms, app_interval_ms, rpo_threshold_ms FROM policies WHERE vm = ?1",
                [vm.as_str()],
                |r| {
                    Ok(Policy {
                        retention_ms: r.get(0)?,
                        crash_interval_ms: r.get(1)?,
                        app_interval_ms: r.get(2)?,
                        rpo_threshold_ms: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(q("read policy"))?
            .unwrap_or_default())
    }

    pub fn set_policy(&self, vm: &VmName, p: &Policy) -> Result<(), StoreError> {
        self.db
            .execute(
                "INSERT INTO policies (vm, retention_ms, crash_interval_ms, app_interval_ms, rpo_threshold_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(vm) DO UPDATE SET retention_ms = ?2, crash_interval_ms = ?3,
                   app_interval_ms = ?4, rpo_threshold_ms = ?5",
                params![vm.as_str(), p.retention_ms, p.crash_interval_ms, p.app_interval_ms, p.rpo_threshold_ms],
            )
            .map_err(q("set policy"))?;
        Ok(())
    }

    pub fn failover(&self, vm: &VmName) -> Result<Option<FailoverRow>, StoreError> {
        self.db
            .query_row(
                "SELECT kind, point, output, format, files FROM failovers WHERE vm = ?1",
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
            .map_err(q("look up failover"))
            .map(|row| {
                row.map(|(kind, point, output, format, files)| FailoverRow {
                    kind,
                    point: PointId(u64::try_from(point).unwrap_or(0)),
                    output,
                    format,
                    files: serde_json::from_str(&files).unwrap_or_default(),
                })
            })
    }

    pub fn put_failover(&self, vm: &VmName, f: &FailoverRow) -> Result<(), StoreError> {
        let files = serde_json::to_string(&f.files).unwrap_or_else(|_| "[]".into());
        self.db
            .execute(
                "INSERT INTO failovers (vm, kind, point, output, format, files) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(vm) DO UPDATE SET kind = ?2, point = ?3, output = ?4, format = ?5, files = ?6",
                params![vm.as_str(), f.kind, i64_of(f.point.0), f.output, f.format, files],
            )
            .map_err(q("record failover"))?;
        Ok(())
    }

    pub fn delete_failover(&self, vm: &VmName) -> Result<(), StoreError> {
        self.db.execute("DELETE FROM failovers WHERE vm = ?1", [vm.as_str()]).map_err(q("end failover"))?;
        Ok(())
    }

    /// Removes points (and their disk rows) by id.
    pub fn delete_points(&mut self, ids: &[PointId]) -> Result<(), StoreError> {
        let tx = self.db.transaction().map_err(q("delete points"))?;
        for id in ids {
            tx.execute("DELETE FROM point_disks WHERE point = ?1", [i64_of(id.0)])
                .map_err(q("delete points"))?;
            tx.execute("DELETE FROM points WHERE id = ?1", [i64_of(id.0)]).map_err(q("delete points"))?;
        }
        tx.commit().map_err(q("delete points"))
    }

    pub fn insert_job(&self, kind: &str, vm: &VmName, now_ms: i64) -> Result<u64, StoreError> {
        self.db
            .execute(
                "INSERT INTO jobs (kind, vm, state, started_ms) VALUES (?1, ?2, 'running', ?3)",
                params![kind, vm.as_str(), now_ms],
            )
            .map_err(q("create job"))?;
        Ok(u64::try_from(self.db.last_insert_rowid()).unwrap_or(0))
    }

    pub fn update_job(&self, j: &JobRow) -> Result<(), StoreError> {
        self.db
            .execute(
                "UPDATE jobs SET state = ?2, phase = ?3, done = ?4, total = ?5, error = ?6, ended_ms = ?7 WHERE id = ?1",
                params![i64_of(j.id), j.state, j.phase, i64_of(j.done), i64_of(j.total), j.error, j.ended_ms],
            )
            .map_err(q("update job"))?;
        Ok(())
    }

    pub fn jobs(&self) -> Result<Vec<JobRow>, StoreError> {
        let mut st = self
            .db
            .prepare(
                "SELECT id, kind, vm, state, phase, done, total, error, started_ms, ended_ms FROM jobs ORDER BY id",
            )
            .map_err(q("list jobs"))?;
        let rows = st
            .query_map([], |r| {
                Ok(JobRow {
                    id: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                    kind: r.get(1)?,
                    vm: r.get(2)?,
                    state: r.get(3)?,
                    phase: r.get(4)?,
                    done: u64::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
                    total: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
                    error: r.get(7)?,
                    started_ms: r.get(8)?,
                    ended_ms: r.get(9)?,
                })
            })
            .map_err(q("list jobs"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(q("list jobs"))
    }

    /// Jobs left running by a process that stopped end as failed, with the reason.
    pub fn fail_interrupted_jobs(&self, now_ms: i64) -> Result<usize, StoreError> {
        self.db
            .execute(
                "UPDATE jobs SET state = 'failed', ended_ms = ?1,
                 error = 'interrupted: the process server stopped while the job ran; run the command again'
                 WHERE state = 'running'",
                [now_ms],
            )
            .map_err(q("fail interrupted jobs"))
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
        let tx = self.db.transaction().map_err(q("insert point"))?;
        tx.execute(
            "INSERT INTO points (id, vm, time_ms, consistency, note) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![i64_of(p.id.0), p.vm.as_str(), p.time_ms, p.consistency.as_str(), p.note],
        )
        .map_err(q("insert point"))?;
        for d in &p.disks {
            tx.execute(
                "INSERT INTO point_disks (point, disk, seq, fingerprint) VALUES (?1, ?2, ?3, ?4)",
                params![i64_of(p.id.0), d.disk.as_str(), i64_of(d.seq.0), d.fingerprint.0.to_vec()],
            )
            .map_err(q("insert point"))?;
        }
        tx.commit().map_err(q("insert point"))
    }

    /// Points of a VM, oldest first.
    pub fn points(&self, vm: &VmName) -> Result<Vec<Point>, StoreError> {
        let mut st = self
            .db
            .prepare("SELECT id, time_ms, consistency, note FROM points WHERE vm = ?1 ORDER BY id")
            .map_err(q("list points"))?;
        let rows = st
            .query_map([vm.as_str()], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?))
            })
            .map_err(q("list points"))?;
        let mut points = Vec::new();
        for r in rows {
            let (id, time_ms, consistency, note) = r.map_err(q("list points"))?;
            points.push(Point {
                id: PointId(u64::try_from(id).unwrap_or(0)),
                vm: vm.clone(),
                time_ms,
                consistency: Consistency::parse(&consistency),
                note,
                disks: Vec::new(),
            });
        }
        let mut st = self
            .db
            .prepare(
                "SELECT pd.point, pd.disk, pd.seq, pd.fingerprint FROM point_disks pd
                 JOIN points p ON p.id = pd.point WHERE p.vm = ?1 ORDER BY pd.point, pd.disk",
            )
            .map_err(q("list point disks"))?;
        let rows = st
            .query_map([vm.as_str()], |r| {
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
            let point = PointId(u64::try_from(point).unwrap_or(0));
            if let (Some(p), Ok(disk), Some(fingerprint)) =
                (points.iter_mut().find(|p| p.id == point), DiskName::new(&disk), Digest::from_slice(&fp))
            {
                p.disks.push(PointDisk { disk, seq: Seq(u64::try_from(seq).unwrap_or(0)), fingerprint });
            }
        }
        Ok(points)
    }

    pub fn test_failover(&self, vm: &VmName) -> Result<Option<TestFailoverRow>, StoreError> {
        self.db
            .query_row("SELECT point, output, files FROM test_failovers WHERE vm = ?1", [vm.as_str()], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
            })
            .optional()
            .map_err(q("look up test failover"))
            .map(|row| {
                row.map(|(point, output, files)| TestFailoverRow {
                    point: PointId(u64::try_from(point).unwrap_or(0)),
                    output,
                    files: serde_json::from_str(&files).unwrap_or_default(),
                })
            })
    }

    pub fn open_test_failover(&self, vm: &VmName, row: &TestFailoverRow) -> Result<(), StoreError> {
        let files = serde_json::to_string(&row.files).unwrap_or_else(|_| "[]".into());
        self.db
            .execute(
                "INSERT INTO test_failovers (vm, point, output, files) VALUES (?1, ?2, ?3, ?4)",
                params![vm.as_str(), i64_of(row.point.0), row.output, files],
            )
            .map_err(q("record test failover"))?;
        Ok(())
    }

    pub fn update_test_failover_files(&self, vm: &VmName, files: &[String]) -> Result<(), StoreError> {
        let files = serde_json::to_string(files).unwrap_or_else(|_| "[]".into());
        self.db
            .execute("UPDATE test_failovers SET files = ?2 WHERE vm = ?1", params![vm.as_str(), files])
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
