//! Quiescing the VM around an app-consistent point: the operator's `--freeze`/`--thaw`
//! commands and file-system freezes of `--freeze-fs` mount points (FIFREEZE/FITHAW, as
//! fsfreeze(8) does). Whatever was attempted is undone, with a timeout, even when the
//! freeze or the point fails.
#![allow(unsafe_code)]

use rustix::ioctl::{IntegerSetter, Opcode, ioctl, opcode};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use tracing::{error, info};

/// Longest the `--shutdown` hook may take (a VM's shutdown is slower than a freeze; not
/// `--hook-timeout`): killed past it, and the planned failover or failback does not go on.
/// The process server waits a little longer for the final point (`FINAL_PASS_STALL`).
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(600);

const FIFREEZE: Opcode = opcode::read_write::<i32>(b'X', 119);
const FITHAW: Opcode = opcode::read_write::<i32>(b'X', 120);

#[derive(Debug, Clone, Default)]
pub struct Hooks {
    pub freeze: Option<String>,
    pub thaw: Option<String>,
    pub freeze_fs: Vec<PathBuf>,
    pub timeout: Duration,
    /// Where a quiesce under way is recorded (`STATE_DIR/frozen`), so that an agent killed
    /// inside it (SIGKILL, the OOM killer, a crash: no thaw ran) thaws when it starts
    /// again ([`Hooks::recover`]) instead of leaving the VM's file systems frozen.
    pub marker: Option<PathBuf>,
}

/// The marker's first line when the freeze command was to run (its thaw must run too).
const COMMAND_LINE: &str = "freeze-command";

/// What a freeze did, to be undone by [`Frozen::thaw`].
#[derive(Debug)]
#[must_use = "a freeze must be thawed"]
pub struct Frozen<'a> {
    hooks: &'a Hooks,
    command_ran: bool,
    file_systems: Vec<PathBuf>,
}

/// Whether `path` is the root of a mount: FIFREEZE on any other directory freezes the file
/// system it lies on (a `--freeze-fs /srv/db` whose mount failed would freeze `/`).
pub fn is_mount_point(path: &std::path::Path) -> std::io::Result<bool> {
    use rustix::fs::{AtFlags, CWD, StatxAttributes, StatxFlags, statx};
    match statx(CWD, path, AtFlags::NO_AUTOMOUNT, StatxFlags::empty()) {
        Ok(st) if st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) => {
            return Ok(st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT));
        }
        // No statx (old kernels), or one a container's seccomp profile refuses.
        Ok(_) | Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM | rustix::io::Errno::ACCESS) => {}
        Err(e) => return Err(e.into()),
    }
    // A kernel before 5.8: a mount's root lies on another device than its parent, or is `/`.
    use std::os::unix::fs::MetadataExt;
    let here = std::fs::metadata(path)?;
    let parent = std::fs::metadata(path.join(".."))?;
    Ok(here.dev() != parent.dev() || here.ino() == parent.ino())
}

/// Says at start which `--freeze-fs` directories are not mount points (yet).
pub fn warn_unmounted(freeze_fs: &[PathBuf]) {
    for fs in freeze_fs {
        if !is_mount_point(fs).unwrap_or(false) {
            tracing::warn!(path = %fs.display(),
                "--freeze-fs names no mount point (yet): app-consistent points fail until it is mounted");
        }
    }
}

fn fs_ioctl(mount: &std::path::Path, freeze: bool) -> std::io::Result<()> {
    let dir = std::fs::File::open(mount)?;
    // SAFETY: FIFREEZE and FITHAW take an int argument that the kernel ignores; it is
    // passed by value, so no memory is read or written through it.
    let r = unsafe {
        if freeze {
            ioctl(&dir, IntegerSetter::<FIFREEZE>::new_usize(0))
        } else {
            ioctl(&dir, IntegerSetter::<FITHAW>::new_usize(0))
        }
    };
    r.map_err(std::io::Error::from)
}

/// Runs `sh -c cmd`, killing it after `timeout`.
pub fn run_hook(what: &str, cmd: &str, timeout: Duration) -> Result<(), String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .spawn()
        .map_err(|e| format!("{what} hook `{cmd}` could not start: {e}"))?;
    let end = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return Ok(()),
            Ok(Some(s)) => return Err(format!("{what} hook `{cmd}` failed with {s}")),
            Ok(None) if Instant::now() >= end => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{what} hook `{cmd}` did not finish within {}s and was killed",
                    timeout.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("{what} hook `{cmd}`: {e}")),
        }
    }
}

impl Hooks {
    pub fn configured(&self) -> bool {
        self.freeze.is_some() || !self.freeze_fs.is_empty()
    }

    /// Quiesces: the freeze command first (applications flush), then the file systems.
    /// On failure everything already done is undone and the reason returned.
    pub fn freeze(&self) -> Result<Frozen<'_>, String> {
        // Before anything is quiesced: a file system that is not mounted fails the point.
        for fs in &self.freeze_fs {
            match is_mount_point(fs) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(format!(
                        "--freeze-fs {} is not a mount point (not mounted?): freezing it would freeze the \
                         file system it lies on; nothing was frozen, mount it or fix the flag",
                        fs.display()
                    ));
                }
                Err(e) => return Err(format!("cannot freeze file system {}: {e}", fs.display())),
            }
        }
        self.mark()?;
        let mut frozen = Frozen { hooks: self, command_ran: false, file_systems: Vec::new() };
        if let Some(cmd) = &self.freeze {
            frozen.command_ran = true;
            if let Err(e) = run_hook("freeze", cmd, self.timeout) {
                frozen.thaw();
                return Err(e);
            }
        }
        for fs in &self.freeze_fs {
            // Again: the freeze command may have unmounted it.
            if !is_mount_point(fs).unwrap_or(false) {
                frozen.thaw();
                return Err(format!(
                    "--freeze-fs {} is no longer a mount point; nothing was frozen",
                    fs.display()
                ));
            }
            if let Err(e) = fs_ioctl(fs, true) {
                frozen.thaw();
                return Err(format!("cannot freeze file system {}: {e}", fs.display()));
            }
            frozen.file_systems.push(fs.clone());
        }
        info!(file_systems = self.freeze_fs.len(), "VM quiesced");
        Ok(frozen)
    }
}

impl Hooks {
    /// Records what a freeze is about to do, durably, before it does any of it.
    fn mark(&self) -> Result<(), String> {
        let Some(path) = &self.marker else { return Ok(()) };
        let mut text = String::new();
        if self.freeze.is_some() {
            text.push_str(COMMAND_LINE);
            text.push('\n');
        }
        for fs in &self.freeze_fs {
            text.push_str(&fs.display().to_string());
            text.push('\n');
        }
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            let mut f = std::fs::File::create(path)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            match path.parent() {
                Some(dir) => std::fs::File::open(dir)?.sync_all(),
                None => Ok(()),
            }
        };
        write()
            .map_err(|e| format!("cannot record the freeze in {}: {e}; nothing was frozen", path.display()))
    }

    fn unmark(&self) {
        if let Some(path) = &self.marker
            && let Err(e) = std::fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            error!(path = %path.display(), error = %e, "cannot remove the freeze marker; the next start thaws again");
        }
    }

    /// At start: a quiesce the last run recorded and never undone (the agent was killed
    /// inside it) is undone now: its file systems thawed (one that is not frozen is left as
    /// it is), its thaw command run. Returns what was undone, for the log.
    pub fn recover(&self) -> Option<String> {
        let path = self.marker.as_ref()?;
        let text = std::fs::read_to_string(path).ok()?;
        let mut undone = Vec::new();
        let mut command = false;
        for line in text.lines().filter(|l| !l.is_empty()) {
            if line == COMMAND_LINE {
                command = true;
                continue;
            }
            match fs_ioctl(std::path::Path::new(line), false) {
                Ok(()) => undone.push(format!("thawed {line}")),
                // EINVAL: not frozen (the kill came before its freeze, or after its thaw).
                Err(e) if e.raw_os_error() == Some(22) => {}
                Err(e) => error!(fs = line, error = %e, "cannot thaw a file system frozen by the last run"),
            }
        }
        if command && let Some(cmd) = &self.thaw {
            match run_hook("thaw", cmd, self.timeout) {
                Ok(()) => undone.push(format!("ran the thaw command `{cmd}`")),
                Err(e) => error!(error = %e, "thaw hook failed (undoing the last run's freeze)"),
            }
        }
        self.unmark();
        Some(if undone.is_empty() { "nothing was still frozen".to_string() } else { undone.join(", ") })
    }
}

impl Frozen<'_> {
    /// Thaws the file systems (in reverse order), then runs the thaw command.
    pub fn thaw(self) {
        for fs in self.file_systems.iter().rev() {
            if let Err(e) = fs_ioctl(fs, false) {
                error!(fs = %fs.display(), error = %e, "cannot thaw file system");
            }
        }
        if self.command_ran
            && let Some(cmd) = &self.hooks.thaw
            && let Err(e) = run_hook("thaw", cmd, self.hooks.timeout)
        {
            error!(error = %e, "thaw hook failed");
        }
        self.hooks.unmark();
    }
}
