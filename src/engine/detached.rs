//! Serving a backup point after bitback exits: `bitback mount` (FUSE files)
//! and `restore --live` (NBD exports a VM boots from) leave a
//! qemu-storage-daemon running, daemonized, in a runtime directory of its
//! own under [`base`]:
//!
//! - `state.json`: what it serves and what bitback made for it;
//! - `daemon.pid`, `qmp.sock` (its monitor), `nbd.sock` (live restores).
//!
//! The daemon inherits the VM's shared read lock, so prune and consolidate
//! refuse while it serves, and the lock ends when it does, however it
//! ends. A daemon that died is found by the pid check here and its
//! leftovers cleaned up by the next `mount`, `umount` or `--finish`.

use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::BadInput;
use crate::qemu::daemon::{self, DaemonSpec};
use crate::qmp::{Endpoint, Options as QmpOptions, Qmp};
use crate::repo::ReadLock;

const STATE: &str = "state.json";

/// What a runtime directory's daemon serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `bitback mount`: one read-only FUSE file per volume.
    Mount,
    /// `restore --live`: one NBD export per volume, the backing of images.
    Live,
}

/// A runtime directory's `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub kind: Kind,
    /// The repository (absolute).
    pub repo: PathBuf,
    pub vm: String,
    pub backup: String,
    pub volumes: Vec<String>,
    /// The mount directory, or the live images' directory (absolute).
    pub target: PathBuf,
    /// The files bitback made in `target`: the FUSE mount points (removed
    /// by `umount`), or the live images (the VM's from then on: never
    /// removed).
    pub files: Vec<PathBuf>,
    /// bitback made `target` (a mount removes it again when empty).
    pub made_target: bool,
    /// The daemon's pid.
    pub pid: u32,
    /// When it started (RFC 3339, UTC).
    pub started: String,
}

/// Where runtime directories live: `$BITBACK_RUNTIME_DIR`, else
/// `/run/bitback-exports` for root, else `$XDG_RUNTIME_DIR/bitback-exports`,
/// else `<temp>/bitback-exports-<uid>`.
pub fn base() -> PathBuf {
    if let Some(dir) = std::env::var_os("BITBACK_RUNTIME_DIR") {
        return PathBuf::from(dir);
    }
    use std::os::unix::fs::MetadataExt;
    // Our effective uid: the owner of /proc/self.
    let uid = std::fs::metadata("/proc/self").map_or(0, |m| m.uid());
    if uid == 0 {
        return PathBuf::from("/run/bitback-exports");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("bitback-exports"),
        None => std::env::temp_dir().join(format!("bitback-exports-{uid}")),
    }
}

/// The runtime directory that serves `target` (an absolute path): one per
/// target, so a second mount of one directory is refused.
pub fn dir_for(kind: Kind, target: &Path) -> PathBuf {
    let digest = blake3::hash(target.as_os_str().as_encoded_bytes());
    let tag = match kind {
        Kind::Mount => "mount",
        Kind::Live => "live",
    };
    base().join(format!("{tag}-{}", &digest.to_hex()[..16]))
}

/// Makes the runtime directory for `target`, new (mode 0711, whatever the
/// umask, under a base made 0755 when bitback makes it: a VM's QEMU,
/// perhaps another user, connects to a live export's socket there; nobody
/// else lists it).
/// Cleans up first what a dead daemon left there.
pub fn make_dir(kind: Kind, target: &Path) -> anyhow::Result<PathBuf> {
    let base = base();
    use std::os::unix::fs::PermissionsExt;
    if !base.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&base)
            .and_then(|()| std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)))
            .with_context(|| format!("creating {}", base.display()))?;
    }
    let dir = dir_for(kind, target);
    if dir.exists() {
        match read(&dir) {
            Ok(state) if alive(&state, &dir) => bail!(BadInput(format!(
                "{} is served already, by qemu-storage-daemon pid {} (backup {} of vm {}); end it first{}",
                target.display(),
                state.pid,
                state.backup,
                state.vm,
                match kind {
                    Kind::Mount => format!(" (bitback umount {})", target.display()),
                    Kind::Live => " (bitback restore --finish)".to_string(),
                }
            ))),
            Ok(state) => clean_dead(&dir, &state),
            Err(_) => {
                // A directory with no readable state: a start that died
                // before writing it.
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    std::fs::DirBuilder::new()
        .mode(0o711)
        .create(&dir)
        .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)))
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Reads a runtime directory's state.
pub fn read(dir: &Path) -> anyhow::Result<State> {
    let path = dir.join(STATE);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

fn write(dir: &Path, state: &State) -> anyhow::Result<()> {
    let path = dir.join(STATE);
    let tmp = dir.join(".state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))
}

/// Every runtime directory under [`base`] with its state (unreadable ones
/// left out).
pub fn all() -> Vec<(PathBuf, State)> {
    let Ok(entries) = std::fs::read_dir(base()) else {
        return Vec::new();
    };
    let mut found: Vec<(PathBuf, State)> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter_map(|dir| read(&dir).ok().map(|s| (dir, s)))
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// Whether the state's daemon still runs: its pid is a
/// qemu-storage-daemon whose pid file is in `dir`.
pub fn alive(state: &State, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", state.pid)) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let pid_file = dir.join("daemon.pid");
    args.first()
        .is_some_and(|a| a.ends_with(b"qemu-storage-daemon"))
        && args
            .iter()
            .any(|a| *a == pid_file.as_os_str().as_encoded_bytes())
}

/// What a dead daemon left: its FUSE mounts (detached), the mount points
/// bitback made, and its runtime directory. Live images stay: they are
/// the VM's.
pub fn clean_dead(dir: &Path, state: &State) {
    warn!(
        pid = state.pid,
        target = %state.target.display(),
        "the daemon serving backup {} of vm {} is gone; cleaning up after it",
        state.backup,
        state.vm
    );
    remove_mount_points(state);
    let _ = std::fs::remove_dir_all(dir);
}

/// Detaches and removes a mount's FUSE files, and its directory when
/// bitback made it and it is empty.
fn remove_mount_points(state: &State) {
    if state.kind != Kind::Mount {
        return;
    }
    for file in &state.files {
        // A dead FUSE daemon's mount answers every access with ENOTCONN
        // until detached.
        let _ = nix::mount::umount2(file, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(file);
    }
    if state.made_target {
        let _ = std::fs::remove_dir(&state.target);
    }
}

/// Starts the daemon of `spec` in `dir`, holding `lock`, and records
/// `state` (its pid filled in). On failure nothing is left in `dir`.
pub fn start(
    dir: &Path,
    spec: &DaemonSpec,
    lock: Option<ReadLock>,
    mut state: State,
) -> anyhow::Result<State> {
    let fd = lock.as_ref().map(|l| l.as_fd().as_raw_fd());
    match daemon::start_detached(dir, spec, fd) {
        Ok(pid) => {
            state.pid = pid;
            // The daemon holds the lock from now on; releasing it here
            // (flock's unlock on drop) would release it for the daemon
            // too, so the descriptor is closed when bitback exits instead.
            std::mem::forget(lock);
            info!(pid, dir = %dir.display(), "qemu-storage-daemon serves on after bitback");
            if let Err(e) = write(dir, &state) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                return Err(e);
            }
            Ok(state)
        }
        Err(e) => Err(anyhow::Error::from(e).context("starting qemu-storage-daemon")),
    }
}

/// Ends a runtime directory's daemon (QMP `quit`, then SIGTERM, then
/// SIGKILL, each by its pid, checked first) and removes what it served:
/// the mount points of a mount, the runtime directory.
pub async fn stop(dir: &Path, state: &State) -> anyhow::Result<()> {
    if alive(state, dir) {
        let socket = dir.join("qmp.sock");
        let quit = async {
            let qmp = Qmp::connect_with(Endpoint::Unix(socket), QmpOptions::default()).await?;
            qmp.execute_raw("quit", serde_json::Value::Null).await?;
            anyhow::Ok(())
        };
        if let Err(e) = tokio::time::timeout(Duration::from_secs(10), quit)
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 10 s")))
        {
            warn!(
                pid = state.pid,
                error = format!("{e:#}"),
                "the daemon did not take quit; signalling it"
            );
        }
        let pid = nix::unistd::Pid::from_raw(state.pid as i32);
        let mut signal = nix::sys::signal::Signal::SIGTERM;
        let mut waited = Duration::ZERO;
        while alive(state, dir) {
            if waited == Duration::from_secs(5) {
                let _ = nix::sys::signal::kill(pid, signal);
            }
            if waited == Duration::from_secs(20) {
                signal = nix::sys::signal::Signal::SIGKILL;
                let _ = nix::sys::signal::kill(pid, signal);
            }
            if waited > Duration::from_secs(30) {
                bail!("qemu-storage-daemon pid {} did not end", state.pid);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += Duration::from_millis(50);
        }
    }
    remove_mount_points(state);
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(())
}

/// Cleans up after every dead daemon under [`base`].
pub fn clean_all_dead() {
    for (dir, state) in all() {
        if !alive(&state, &dir) {
            clean_dead(&dir, &state);
        }
    }
}

/// This host's daemons that hold `vm`'s read lock in `repo`, described
/// for an error message.
pub fn holders(repo: &Path, vm: &str) -> Vec<String> {
    let repo = std::fs::canonicalize(repo).unwrap_or_else(|_| repo.to_path_buf());
    all()
        .into_iter()
        .filter(|(dir, s)| s.repo == repo && s.vm == vm && alive(s, dir))
        .map(|(_, s)| match s.kind {
            Kind::Mount => format!(
                "bitback mount of backup {} at {} (qemu-storage-daemon pid {}; bitback umount {})",
                s.backup,
                s.target.display(),
                s.pid,
                s.target.display()
            ),
            Kind::Live => format!(
                "a live restore of backup {} into {} (qemu-storage-daemon pid {}; bitback restore --finish)",
                s.backup,
                s.target.display(),
                s.pid
            ),
        })
        .collect()
}

/// The current time for [`State::started`].
pub fn now() -> String {
    crate::repo::time::Utc::now().rfc3339()
}
