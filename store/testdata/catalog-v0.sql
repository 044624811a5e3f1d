PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE vms (
    name TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'protected'
);
INSERT INTO vms VALUES('web',1795857799990,'protected');
INSERT INTO vms VALUES('db',1795857800038,'failed-over');
CREATE TABLE policies (
    vm TEXT PRIMARY KEY REFERENCES vms(name),
    retention_ms INTEGER NOT NULL,
    crash_interval_ms INTEGER NOT NULL,
    app_interval_ms INTEGER NOT NULL,
    rpo_threshold_ms INTEGER NOT NULL
);
INSERT INTO policies VALUES('web',7200000,300000,3600000,600000);
CREATE TABLE failovers (
    vm TEXT PRIMARY KEY REFERENCES vms(name),
    kind TEXT NOT NULL,
    point INTEGER NOT NULL,
    output TEXT NOT NULL,
    format TEXT NOT NULL,
    files TEXT NOT NULL
);
INSERT INTO failovers VALUES('db','unplanned',7,'/tmp/fx/fo-db','raw','["/tmp/fx/fo-db/sda.raw"]');
CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO counters VALUES('point',7);
CREATE TABLE reprotects (
    vm TEXT PRIMARY KEY REFERENCES vms(name),
    master_target TEXT NOT NULL,
    alternate INTEGER NOT NULL,
    sync TEXT NOT NULL,
    disks TEXT NOT NULL
);
CREATE TABLE jobs (
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
INSERT INTO jobs VALUES(1,'initial-sync','web','succeeded','done',8388608,8388608,'',1795857799997,1795857800045);
INSERT INTO jobs VALUES(2,'initial-sync','db','succeeded','done',8388608,8388608,'',1795857800045,1795857800074);
INSERT INTO jobs VALUES(3,'test-failover','web','succeeded','done',8388608,8388608,'',1795857803137,1795857803153);
INSERT INTO jobs VALUES(4,'unplanned-failover','db','succeeded','done',8388608,8388608,'',1795857803175,1795857803198);
CREATE TABLE disks (
    vm TEXT NOT NULL REFERENCES vms(name),
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    generation TEXT NOT NULL,
    base_seq INTEGER NOT NULL DEFAULT 0,
    base_path TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (vm, name)
);
INSERT INTO disks VALUES('web','sda',8388608,'e393ad14f4dae48285e921575eb9f9b7',0,'');
INSERT INTO disks VALUES('db','sda',8388608,'9f26e2679baa6ebabe5d05023755749d',0,'');
CREATE TABLE points (
    id INTEGER PRIMARY KEY,
    vm TEXT NOT NULL REFERENCES vms(name),
    time_ms INTEGER NOT NULL,
    consistency TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
INSERT INTO points VALUES(1,'web',1795857800023,'crash','');
INSERT INTO points VALUES(2,'db',1795857800057,'crash','');
INSERT INTO points VALUES(3,'web',1795857803030,'crash','');
INSERT INTO points VALUES(4,'web',1795857803063,'crash','');
INSERT INTO points VALUES(5,'db',1795857803081,'crash','');
INSERT INTO points VALUES(6,'db',1795857803111,'crash','');
INSERT INTO points VALUES(7,'db',1795857803180,'crash','');
CREATE TABLE point_disks (
    point INTEGER NOT NULL REFERENCES points(id),
    disk TEXT NOT NULL,
    seq INTEGER NOT NULL,
    fingerprint BLOB NOT NULL,
    PRIMARY KEY (point, disk)
);
INSERT INTO point_disks VALUES(1,'sda',4,X'415b981115faeaf1a72f1530b2fb5e1661c45bd91dedbde12af148ec3a03030c');
INSERT INTO point_disks VALUES(2,'sda',4,X'754cf9cc469d461c5c465b430003f31d1f5d8d1b1564ed549a05016ad61c735f');
INSERT INTO point_disks VALUES(3,'sda',4,X'415b981115faeaf1a72f1530b2fb5e1661c45bd91dedbde12af148ec3a03030c');
INSERT INTO point_disks VALUES(4,'sda',5,X'4bf0ecdae146080949004407b6eb3b0bd16a1b2b35e789cd625c1c04d096cde6');
INSERT INTO point_disks VALUES(5,'sda',4,X'754cf9cc469d461c5c465b430003f31d1f5d8d1b1564ed549a05016ad61c735f');
INSERT INTO point_disks VALUES(6,'sda',5,X'062fded5321303c12a56d3b19fcc7f8a712fb4c99e7cc592cb8a44355d199039');
INSERT INTO point_disks VALUES(7,'sda',5,X'062fded5321303c12a56d3b19fcc7f8a712fb4c99e7cc592cb8a44355d199039');
CREATE TABLE test_failovers (
    vm TEXT PRIMARY KEY REFERENCES vms(name),
    point INTEGER NOT NULL,
    output TEXT NOT NULL,
    files TEXT NOT NULL
);
INSERT INTO test_failovers VALUES('web',4,'/tmp/fx/tfo-web','["/tmp/fx/tfo-web/sda.raw","/tmp/fx/tfo-web/vm.json"]');
CREATE INDEX points_vm ON points (vm, id);
COMMIT;
