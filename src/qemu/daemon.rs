//! qemu-storage-daemon, started by bitback: for stopped VMs, exports and
//! the demo. It lives in a private temp directory (its sockets, an
//! overlay) and is ended by its pid when dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tracing::{info, warn};

use super::blockdev::{Address, Export, Node, json_of};
use crate::qmp::{Endpoint, Options, Qmp};

/// What to start the daemon with.
#[derive(Debug, Clone, Default)]
pub struct DaemonSpec {
    /// `--blockdev` values.
    pub blockdevs: Vec<Node>,
    /// Open a QMP monitor (at `<dir>/qmp.sock`).
    pub qmp: bool,
    /// `--nbd-server` address.
    pub nbd: Option<Address>,
    /// `--export` values.
    pub exports: Vec<Export>,
    /// `--object` values (a secret read from a key file, never the key).
    pub objects: Vec<String>,
}

impl DaemonSpec {
    /// The daemon's arguments, with a monitor on `qmp` when given.
    fn args(&self, qmp: Option<&Path>) -> Result<Vec<String>, Error> {
        let mut args = Vec::new();
        if let Some(socket) = qmp {
            args.push("--chardev".to_string());
            args.push(format!(
                "socket,path={},server=on,wait=off,id=bitback-mon",
                socket.display().to_string().replace(',', ",,")
            ));
            args.push("--monitor".into());
            args.push("chardev=bitback-mon".into());
        }
        for object in &self.objects {
            args.push("--object".into());
            args.push(object.clone());
        }
        for blockdev in &self.blockdevs {
            args.push("--blockdev".into());
            args.push(json_of("a --blockdev", blockdev)?.to_string());
        }
        if let Some(addr) = &self.nbd {
            args.push("--nbd-server".into());
            args.push(json!({ "addr": json_of("the NBD server's address", addr)? }).to_string());
        }
        for export in &self.exports {
            args.push("--export".into());
            args.push(json_of("an --export", export)?.to_string());
        }
        Ok(args)
    }
}

/// Starts a daemon that outlives bitback (`--daemonize`: its own session,
/// no death signal from us), its monitor at `<dir>/qmp.sock` and its pid
/// in `<dir>/daemon.pid`, and returns its pid once it serves (QEMU's
/// parent process exits then). `inherit` is a descriptor the daemon keeps
/// open for its life (a lock).
pub fn start_detached(
    dir: &Path,
    spec: &DaemonSpec,
    inherit: Option<std::os::fd::RawFd>,
) -> Result<u32, Error> {
    use std::os::unix::process::CommandExt;
    let pid_file = dir.join("daemon.pid");
    let mut cmd = std::process::Command::new("qemu-storage-daemon");
    cmd.arg("--daemonize")
        .arg("--pidfile")
        .arg(&pid_file)
        .args(spec.args(Some(&dir.join("qmp.sock")))?)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(fd) = inherit {
        // SAFETY: the closure runs in the child between fork and exec, and
        // calls only fcntl(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().map_err(Error::Starting)?;
    if !out.status.success() {
        return Err(Error::Exited {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let text = std::fs::read_to_string(&pid_file).map_err(Error::Waiting)?;
    text.trim().parse().map_err(|_| {
        Error::Waiting(std::io::Error::other(format!(
            "{} holds {text:?}, not a pid",
            pid_file.display()
        )))
    })
}

/// A running daemon. Dropping it kills it (by pid) and removes its
/// directory; [`Daemon::quit`] asks it to close its images cleanly first.
pub struct Daemon {
    child: tokio::process::Child,
    dir: PathBuf,
    pub qmp: Option<Qmp>,
}

/// Makes the child started by `cmd` get SIGTERM when bitback dies, even
/// by SIGKILL (a wrapper's timeout): a helper left running would hold the
/// VM's images locked (qemu-storage-daemon) or a libvirt connection open
/// (the QMP proxy). Linux delivers it when the thread that spawned the
/// child ends; bitback spawns from runtime threads that live as long as
/// the process.
pub(crate) fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec, and
    // calls only prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
}

/// What can go wrong running qemu-storage-daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating {}", path.display())]
    PrivateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("starting qemu-storage-daemon (install qemu-utils 7.2 or newer, which has it)")]
    Starting(#[source] std::io::Error),

    #[error("qemu-storage-daemon exited ({status}): {stderr}")]
    Exited {
        status: std::process::ExitStatus,
        stderr: String,
    },

    #[error("qemu-storage-daemon (pid {pid}) did not come up within {limit:?}; it was stopped")]
    StartTimeout { pid: u32, limit: Duration },

    #[error("qemu-storage-daemon did not quit within {limit:?}; it was killed")]
    QuitTimeout { limit: Duration },

    #[error("waiting for qemu-storage-daemon")]
    Waiting(#[source] std::io::Error),

    #[error(transparent)]
    NotUtf8(#[from] super::blockdev::NotUtf8),
}

/// A fresh private directory under the system temp dir.
pub fn private_dir(purpose: &str) -> Result<PathBuf, Error> {
    let dir = std::env::temp_dir().join(format!(
        "bitback-{purpose}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    match std::fs::create_dir(&dir) {
        Ok(()) => Ok(dir),
        Err(source) => Err(Error::PrivateDir { path: dir, source }),
    }
}

/// A new directory of this run's own under the system temp dir, mode
/// 0700, named `bitback-<purpose>-<pid>-<16 random hex digits>`: no other
/// local user can guess its name ahead, plant a file or link in it, or
/// read what it holds. `mkdir` never follows a planted link. A killed
/// run's is removed by a later run ([`clean_dead_runs`]).
pub fn run_dir(purpose: &str) -> Result<PathBuf, Error> {
    use std::io::Read;
    use std::os::unix::fs::DirBuilderExt;
    let mut raw = [0u8; 8];
    let mut made = None;
    for _ in 0..10 {
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut raw))
            .map_err(|source| Error::PrivateDir {
                path: "/dev/urandom".into(),
                source,
            })?;
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let dir =
            std::env::temp_dir().join(format!("bitback-{purpose}-{}-{hex}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                made = Some(dir);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(Error::PrivateDir { path: dir, source }),
        }
    }
    made.ok_or_else(|| Error::PrivateDir {
        path: std::env::temp_dir(),
        source: std::io::Error::other("no free random name"),
    })
}

/// The temp-dir names of a run's own directories, each followed by the
/// run's pid: its libvirt proxy's socket, its NBD sockets, its scratch
/// images, a probe's socket, a `bitback run`'s shared rate files.
const RUN_DIRS: [&str; 5] = [
    "bitback-libvirt-",
    "bitback-nbd-",
    "bitback-scratch-",
    "bitback-probe-",
    "bitback-run-",
];

/// Removes what runs that died (SIGKILL) left in the temp dir: a
/// directory of [`RUN_DIRS`]'s names whose run is gone, and in it only
/// sockets and plain files, never through a link. One whose pid lives
/// (a run going on, or a pid taken again) is left alone.
pub fn clean_dead_runs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = RUN_DIRS
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .and_then(|rest| rest.split(['-', '.']).next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id()
            || Path::new(&format!("/proc/{pid}")).exists()
            || !entry.file_type().is_ok_and(|t| t.is_dir())
        {
            continue;
        }
        let dir = entry.path();
        for file in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            use std::os::unix::fs::FileTypeExt;
            if file.file_type().is_ok_and(|t| t.is_file() || t.is_socket()) {
                let _ = std::fs::remove_file(file.path());
            }
        }
        match std::fs::remove_dir(&dir) {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), pid, "removed what a killed bitback left")
            }
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "a dead run's directory stays")
            }
        }
    }
}

/// A new directory `<temp>/<name>` (or `<name>.N` when that name is
/// taken) of mode 0700 for a socket QEMU connects to, owned by `owner`
/// when given (an unprivileged QEMU's user), else by us. Only a new one:
/// a directory there already (a dead process's with our pid, or planted)
/// is not ours to use or remove.
pub fn socket_dir(name: &str, owner: Option<crate::qmp::SocketOwner>) -> Result<PathBuf, Error> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir().join(name);
    let mut attempt = 0u32;
    let dir = loop {
        let dir = match attempt {
            0 => base.clone(),
            n => base.with_extension(n.to_string()),
        };
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => break dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1;
            }
            Err(source) => return Err(Error::PrivateDir { path: dir, source }),
        }
    };
    if let Some(owner) = owner
        && let Err(source) = std::os::unix::fs::chown(&dir, Some(owner.uid), Some(owner.gid))
    {
        let _ = std::fs::remove_dir(&dir);
        return Err(Error::PrivateDir { path: dir, source });
    }
    Ok(dir)
}

/// Gives a file bitback made to `owner`, an unprivileged QEMU's user: a
/// socket it listens on (QEMU needs write permission on a socket to
/// connect; see [`socket_dir`]), an image, a directory.
pub fn give_to(path: &Path, owner: crate::qmp::SocketOwner) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid))
}

/// How long a daemon may take to listen, plus [`START_LIMIT_PER_OBJECT`]
/// for each secret (key) it is given.
const START_LIMIT: Duration = Duration::from_secs(120);
const START_LIMIT_PER_OBJECT: Duration = Duration::from_secs(60);

impl Daemon {
    /// Starts the daemon in `dir` (which it owns from now on: it is
    /// removed when the daemon goes) and waits until it listens.
    pub async fn start(dir: PathBuf, spec: &DaemonSpec) -> Result<Daemon, Error> {
        let socket = dir.join("qmp.sock");
        let mut std_cmd = std::process::Command::new("qemu-storage-daemon");
        die_with_parent(&mut std_cmd);
        std_cmd.args(spec.args(spec.qmp.then_some(socket.as_path()))?);
        let mut cmd = tokio::process::Command::from(std_cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Error::Starting(e));
            }
        };
        info!(pid = child.id(), "started qemu-storage-daemon");
        let mut daemon = Daemon {
            child,
            dir,
            qmp: None,
        };
        // The daemon listens only once every image is open, and opening a
        // LUKS image derives its key (about 2 s each at QEMU's default,
        // many times that on a loaded host): a fixed 15 s failed five
        // keyed images under load. The limit grows with the keys.
        let limit = START_LIMIT + START_LIMIT_PER_OBJECT * spec.objects.len() as u32;
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = daemon.child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr).await;
                }
                return Err(Error::Exited {
                    status,
                    stderr: stderr.trim().to_string(),
                });
            }
            if daemon.listening(spec, &socket).await {
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                return Err(Error::StartTimeout {
                    pid: daemon.child.id().unwrap_or(0),
                    limit,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn listening(&mut self, spec: &DaemonSpec, socket: &Path) -> bool {
        if spec.qmp && self.qmp.is_none() {
            if !socket.exists() {
                return false;
            }
            match Qmp::connect_with(Endpoint::Unix(socket.into()), Options::default()).await {
                Ok(qmp) => self.qmp = Some(qmp),
                Err(_) => return false,
            }
        }
        match spec.nbd.as_ref() {
            Some(Address::Unix { path }) => path.exists(),
            Some(Address::Inet { host, port }) => {
                tokio::net::TcpStream::connect(format!("{host}:{port}"))
                    .await
                    .is_ok()
            }
            Some(Address::Fd { .. }) | None => true,
        }
    }

    /// The daemon's private directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Waits until the daemon exits on its own.
    pub async fn wait(&mut self) -> Result<std::process::ExitStatus, Error> {
        self.child.wait().await.map_err(Error::Waiting)
    }

    /// Asks the daemon to quit (it closes its images cleanly, writing
    /// persistent bitmaps) and waits; kills it by pid if it does not exit.
    pub async fn quit(mut self) -> Result<(), Error> {
        if let Some(qmp) = &self.qmp {
            let _ = qmp.execute_raw("quit", Value::Null).await;
        }
        match tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(Error::Exited {
                status,
                stderr: String::new(),
            }),
            Ok(Err(e)) => Err(Error::Waiting(e)),
            Err(_) => {
                warn!("qemu-storage-daemon did not quit; killing it");
                let _ = self.child.kill().await;
                Err(Error::QuitTimeout {
                    limit: Duration::from_secs(60),
                })
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
