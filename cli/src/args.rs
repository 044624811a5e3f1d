//! The command line: what each command takes.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use tern_proto as pb;

/// tern operator CLI.
#[derive(Parser, Debug)]
#[command(name = "drctl", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("TERN_GIT_REV"), ")"))]
pub struct Cli {
    /// Process server, e.g. https://dr.example:7443
    /// (also TERN_SERVER; DRCTL_SERVER is read when neither is given)
    #[arg(long, env = "TERN_SERVER", global = true)]
    pub server: Option<String>,
    /// Admin identity bundle (DATA_DIR/pki/admin.bundle of `process-server init`).
    /// (also TERN_ADMIN_IDENTITY, not TERN_IDENTITY: that is an agent's own; DRCTL_IDENTITY
    /// is read when neither is given)
    #[arg(long, env = "TERN_ADMIN_IDENTITY", global = true)]
    pub identity: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OutFormat {
    Raw,
    Vhd,
}

impl OutFormat {
    pub fn wire(self) -> i32 {
        match self {
            OutFormat::Raw => pb::OutputFormat::Raw as i32,
            OutFormat::Vhd => pb::OutputFormat::Vhd as i32,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Print a shell completion script, e.g. `drctl completions bash > /etc/bash_completion.d/drctl`.
    Completions { shell: clap_complete::Shell },
    /// Print drctl's man page (roff), e.g. `drctl man > /usr/local/share/man/man1/drctl.1`.
    Man,
    /// Issue an identity bundle.
    #[command(subcommand)]
    Enroll(Enroll),
    /// State, health, RPO, last point and bytes received of one VM or all.
    Status {
        vm: Option<String>,
        /// A monitoring check: exit 0 when every VM is normal, 1 when one is at warning,
        /// 2 when one is critical (3 when the server cannot be reached).
        #[arg(long)]
        check: bool,
    },
    /// Recovery points of a VM, oldest first.
    Points {
        vm: String,
        /// Only the newest N points (0: all). Default: 100, or all with --json.
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Ask the VM's agent for a point now.
    Checkpoint {
        vm: String,
        /// Run the agent's freeze/thaw hooks around the point.
        #[arg(long)]
        app_consistent: bool,
        /// Wait until the point is durable and print it.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this long, e.g. 10m.
        #[arg(long, default_value = "10m")]
        timeout: String,
    },
    /// Write the VM's disks at a point into a directory on the process server, without
    /// disturbing replication.
    TestFailover {
        vm: String,
        /// latest, latest-processed, latest-app, latest-multi-vm, latest-multi-vm-app, a
        /// point id, or an RFC 3339 time.
        #[arg(long, default_value = "latest-processed")]
        point: String,
        /// Absolute output directory on the process server's host.
        #[arg(long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "raw")]
        format: OutFormat,
    },
    /// Remove everything the open test failover of a VM made.
    TestFailoverCleanup { vm: String },
    /// Replication policy of a VM.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Fail a VM over: write its disks at a point and stop replicating it.
    Failover {
        vm: String,
        /// planned: shut the source down through its agent first and lose nothing (refused if
        /// that fails); unplanned: go on even when the source is unreachable.
        #[arg(long, value_parser = ["planned", "unplanned"])]
        kind: String,
        /// unplanned only: try the planned shutdown first, go on if it fails.
        #[arg(long)]
        shutdown_source: bool,
        /// latest, latest-processed, latest-app, latest-multi-vm, latest-multi-vm-app, a
        /// point id, or an RFC 3339 time (planned failovers always use the final point made
        /// after the shutdown).
        #[arg(long, default_value = "latest")]
        point: String,
        /// Absolute output directory on the process server's host.
        #[arg(long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "raw")]
        format: OutFormat,
    },
    /// Rewrite a failed-over VM's disks at another point (before commit).
    ChangePoint {
        vm: String,
        /// The point to rewrite the disks at: latest (everything received), latest-processed,
        /// latest-app, a point id, or an RFC 3339 time.
        #[arg(long)]
        point: String,
    },
    /// End a failover: delete the VM's recovery points and journal, keep the base images.
    Commit { vm: String },
    /// Rebuild a point from the store and check every disk's fingerprint; exit 4 on a mismatch.
    Verify {
        vm: String,
        /// The point to check: latest-processed, latest-app, a point id, or an RFC 3339 time.
        #[arg(long, default_value = "latest-processed")]
        point: String,
    },
    /// After a committed failover: protect the recovered VM back to a master target on the
    /// primary site. Writes the identity for the recovered VM's agent and prints its command.
    Reprotect {
        vm: String,
        /// The master target, e.g. https://onprem-mt:7444
        #[arg(long)]
        master_target: String,
        /// original: the on-premises disk (must exist with the same size; delta sync);
        /// alternate: a new disk (must not exist; created sparse, full sync).
        #[arg(long, value_parser = ["original", "alternate"])]
        location: String,
        /// NAME=PATH on the master target's host, for every disk of the VM.
        #[arg(long = "target-disk", required = true)]
        target_disks: Vec<String>,
        /// before: replicate continuously, failback drains the last changes; during: send
        /// everything at failback.
        #[arg(long, value_parser = ["before", "during"], default_value = "before")]
        sync: String,
        /// Where to write the recovered VM's agent identity.
        #[arg(long)]
        identity_out: PathBuf,
    },
    /// Remove a VM's copy on this server: every recovery point, journal and base image of it.
    /// For a disk that was resized (stop the agent, remove, start it again: it syncs anew)
    /// or a VM retired. Refused while its agent is connected, while a failover or reprotect
    /// is under way, while a test failover is open and while it is in a replication group.
    Remove {
        vm: String,
        /// Confirms that every recovery point of the VM is deleted.
        #[arg(long)]
        delete_points: bool,
    },
    /// Undo a reprotect (a wrong master target or target disk, a recovered disk its agent
    /// cannot replicate): the master target releases its journal for the VM, the points
    /// made since go, the recovered VM's agent identity is revoked, and the VM is
    /// failover-committed again, ready for another `drctl reprotect`.
    ReprotectCancel {
        vm: String,
        /// Cancel even if the master target cannot be reached (its journal for the VM stays
        /// there; a later reprotect to it must name the same target disks).
        #[arg(long)]
        force: bool,
    },
    /// Shut the recovered VM down and apply its final state onto the primary site's disks.
    Failback {
        vm: String,
        /// Rehearse it instead: a fresh point of the running recovered VM is applied onto
        /// scratch copies on the master target and verified, then removed; nothing changes.
        #[arg(long)]
        drill: bool,
    },
    /// After a committed failback: replicate from the primary site again.
    ReverseReplicate { vm: String },
    /// Replication groups: VMs whose multi-VM points are taken at one cut across all of
    /// them (`latest-multi-vm`, `latest-multi-vm-app`).
    #[command(subcommand)]
    Group(GroupCmd),
    /// Recovery plans: ordered groups of VMs that fail over (and back) as one application.
    #[command(subcommand)]
    Plan(PlanCmd),
    /// List jobs, or wait for one.
    Jobs {
        /// Wait until this job ends; exit non-zero if it failed.
        #[arg(long)]
        wait: Option<u64>,
        /// Only this VM's jobs.
        #[arg(long, conflicts_with = "wait")]
        vm: Option<String>,
        /// Only jobs in this state: running, succeeded, failed.
        #[arg(long, conflicts_with = "wait")]
        state: Option<tern_core::JobState>,
        /// Only jobs of this kind: initial-sync, test-failover, planned-failover, ...
        #[arg(long, conflicts_with = "wait")]
        kind: Option<tern_core::JobKind>,
    },
    /// Identities the deployment's CA issued (and those seen connecting): serial, role,
    /// name, when issued, whether revoked.
    Identities,
    /// Revoke identities: the process server refuses them from now on and closes their
    /// connections. A lost or leaked bundle, a decommissioned agent host or master target.
    /// Your own identity cannot be revoked with itself (enroll another admin first).
    Revoke {
        /// Serial numbers from `drctl identities` (the first 8 hex digits or more).
        serials: Vec<String>,
        /// The identity in this bundle file (for one issued before identities were kept).
        #[arg(long = "bundle")]
        bundles: Vec<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PlanCmd {
    /// Check a plan file and store it (replacing the plan of its name); errors name the line.
    Apply { file: PathBuf },
    /// Plans, with their last operation and how far it got.
    List,
    /// One plan: its groups, actions and last operation.
    Show { name: String },
    /// Forget a plan (its VMs are not touched).
    Remove { name: String },
    /// Test-fail over every VM of the plan, group by group, into OUTPUT/VM/.
    TestFailover {
        name: String,
        /// latest, latest-processed, latest-app, latest-multi-vm, latest-multi-vm-app (no
        /// point id or time: those name one VM's point).
        #[arg(long, default_value = "latest-processed")]
        point: String,
        /// Absolute directory on the process server's host; each VM goes to OUTPUT/VM/.
        #[arg(long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "raw")]
        format: OutFormat,
    },
    /// Remove what the plan's test failover made.
    TestFailoverCleanup { name: String },
    /// Fail every VM of the plan over, group by group, into OUTPUT/VM/.
    Failover {
        name: String,
        #[arg(long, value_parser = ["planned", "unplanned"])]
        kind: String,
        /// As for test-failover (planned failovers use each VM's final point).
        #[arg(long, default_value = "latest")]
        point: String,
        #[arg(long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "raw")]
        format: OutFormat,
    },
    /// Commit the failover (or failback) of every VM of the plan.
    Commit { name: String },
    /// Reprotect every VM to the master target its [vm.NAME] section names; the agents'
    /// identities go to IDENTITY_DIR/VM.bundle on the process server's host.
    Reprotect {
        name: String,
        #[arg(long)]
        identity_dir: PathBuf,
    },
    /// Fail every VM of the plan back, group by group.
    Failback {
        name: String,
        /// Rehearse it without stopping the recovered VMs: each VM's fresh point applied
        /// onto scratch copies on its master target, verified, removed.
        #[arg(long)]
        drill: bool,
    },
    /// Protect every VM of the plan from the primary site again.
    ReverseReplicate { name: String },
    /// Go on past a manual step, or again from where a failed step stopped the plan.
    Continue { name: String },
    /// Stop the plan's running operation at its next step: at a manual step or in an
    /// action (killed) at once, else once the operation on the VM under way ends. VMs
    /// already done stay done; `continue` goes on from there.
    Cancel { name: String },
}

#[derive(Subcommand, Debug)]
pub enum GroupCmd {
    /// Create a group of protected VMs (a VM belongs to one group at most).
    Create {
        name: String,
        #[arg(long = "vm", required = true)]
        vms: Vec<String>,
        /// Time between multi-VM crash-consistent points (default: none on a schedule).
        #[arg(long)]
        crash_interval: Option<String>,
        /// Time between multi-VM app-consistent points (default: none on a schedule).
        #[arg(long)]
        app_interval: Option<String>,
    },
    /// Add VMs to a group.
    Add {
        name: String,
        #[arg(long = "vm", required = true)]
        vms: Vec<String>,
    },
    /// Remove VMs from a group; with no --vm, remove the group (its multi-VM points stay
    /// points of each VM).
    Remove {
        name: String,
        #[arg(long = "vm")]
        vms: Vec<String>,
    },
    /// Groups with their members, latest common multi-VM point, RPO and health.
    List,
    /// One group.
    Show { name: String },
    /// Change a group's multi-VM intervals (0: none on a schedule); left out keeps.
    Policy {
        name: String,
        #[arg(long)]
        crash_interval: Option<String>,
        #[arg(long)]
        app_interval: Option<String>,
    },
    /// Take a multi-VM point now: every member's agent reaches a cut and holds it until
    /// all have one (scan mode: every member needs a freeze hook).
    Checkpoint {
        name: String,
        /// Run the members' freeze hooks around the cut.
        #[arg(long)]
        app_consistent: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Change a VM's policy; options left out keep their value.
    Set {
        vm: String,
        /// How long points are kept (default 24h, at most 30d).
        #[arg(long)]
        retention: Option<String>,
        /// Time between crash-consistent points (default 5m, at least 1s).
        #[arg(long)]
        crash_interval: Option<String>,
        /// Time between app-consistent points (default 60m).
        #[arg(long)]
        app_interval: Option<String>,
        /// RPO above which health turns warning; twice it, critical (default 15m).
        #[arg(long)]
        rpo_threshold: Option<String>,
        /// The most the VM's journals may hold together (e.g. 50GiB; none: no bound, the
        /// default; at least twice the server's --segment-size per disk). Past it, retention
        /// prunes the oldest points ahead of their window, so that one VM's burst of writes
        /// cannot fill the data directory for every VM.
        #[arg(long, value_name = "SIZE|none")]
        max_journal: Option<String>,
    },
    /// Show a VM's policy.
    Show { vm: String },
}

#[derive(Subcommand, Debug)]
pub enum Enroll {
    /// Identity for the mobility agent of one VM.
    Agent {
        #[arg(long)]
        vm: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Identity for a master target.
    MasterTarget {
        /// Its name, which its certificate also holds as a DNS name or IP address (besides
        /// localhost and 127.0.0.1): give the host name or address the process server dials
        /// it by (the --master-target URL's host).
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Another admin identity (for a second operator, or to replace a revoked one).
    Admin {
        #[arg(long)]
        out: PathBuf,
    },
}
