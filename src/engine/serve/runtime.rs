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
//!
//! Each serve also leaves a lease in the repository, beside the lock:
//! `<vm>/.serving/<host>--<runtime dir>.json` ([`Lease`]). A prune on
//! another host, refused by the lock, names the holder from it; where a
//! NAS's locks do not reach across hosts, the lease alone keeps that prune
//! off (see [`leases_in_the_way`]).

use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::engine::outcome::BadInput;
use crate::qemu::commands;
use crate::qemu::daemon::{self, DaemonSpec};
use crate::qmp::{Endpoint, Options as QmpOptions, Qmp};
use crate::repo::{ReadLock, leases};

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
    /// The files it serves in `target`: the FUSE mount points (removed by
    /// `umount`), or the live images (the VM's from then on: never
    /// removed).
    pub files: Vec<PathBuf>,
    /// Files bitback made that it serves only once set up (live images,
    /// made aside and then renamed into place): removed when the set-up
    /// did not end.
    #[serde(default)]
    pub pending: Vec<PathBuf>,
    /// bitback made `target` (a mount removes it again when empty).
    pub made_target: bool,
    /// The pid of the bitback that set it up (it may be starting the
    /// daemon: the directory is in use while it runs).
    pub starter: u32,
    /// When it started (RFC 3339, UTC).
    pub started: String,
    /// Its lease in the repository, when it has one.
    #[serde(default)]
    pub lease: Option<PathBuf>,
    /// Its lease in a bucket, when the point lies in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket_lease: Option<BucketLease>,
}

/// A serve's lease in a bucket: an object under the VM's prefix,
/// `<vm>/.serving/<host>--<runtime dir>.json`, which prunes of the bucket
/// honour as a directory's prunes honour a lease file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketLease {
    /// `s3://BUCKET/PREFIX`.
    pub url: String,
    /// `--s3-endpoint`, when it was given.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The object's key in the repository.
    pub key: String,
}

impl BucketLease {
    /// The lease of the serve from `runtime` of `vm`'s point in the
    /// bucket at `url`.
    pub fn new(url: &str, endpoint: Option<&str>, vm: &str, runtime: &Path) -> BucketLease {
        let file = lease_path(Path::new(vm), runtime);
        BucketLease {
            url: url.to_string(),
            endpoint: endpoint.map(str::to_string),
            key: file.to_string_lossy().into_owned(),
        }
    }

    /// The bucket, reached with this process's credentials.
    fn bucket(&self) -> anyhow::Result<crate::repo::Bucket> {
        let location = crate::s3::Location::parse(&self.url)
            .context("not an s3:// URL")?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let config = crate::s3::Config::from_env(self.endpoint.as_deref())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(crate::repo::Bucket::new(&config, location)?)
    }

    /// Writes the lease of `state`, served from `runtime`.
    pub fn write(&self, runtime: &Path, state: &State) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(&lease_of(runtime, state))?;
        use crate::repo::Store;
        self.bucket()?
            .put(&self.key, &bytes)
            .with_context(|| format!("writing the lease {}{}", self.url, self.key))
    }

    /// Removes the lease (every version: it is bitback's own note, not a
    /// point); a failure is logged, and a prune on this host removes it
    /// later.
    pub fn remove(&self) {
        let removed = self.bucket().and_then(|b| Ok(b.remove_all(&self.key)?));
        if let Err(e) = removed {
            warn!(lease = %self.key, error = format!("{e:#}"), "the lease in the bucket stays; the next prune on this host removes it");
        }
    }
}

/// A lease: a serve of a point on some host, noted in the VM's directory
/// of the repository for prunes on every host to see.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lease {
    /// The host serving ([`host`]).
    pub host: String,
    pub kind: Kind,
    pub backup: String,
    /// The mount directory or the live images' directory, on that host.
    pub target: PathBuf,
    /// The runtime directory, on that host.
    pub runtime: PathBuf,
    pub started: String,
    /// The files it serves: a live restore's images, which need the point
    /// until they are streamed, whether or not the export still runs.
    #[serde(default)]
    pub files: Vec<PathBuf>,
}

/// This host's name in leases: `$BITBACK_HOST`, else the kernel's host
/// name (hosts that share a name, containers say, set `BITBACK_HOST`).
pub fn host() -> String {
    std::env::var("BITBACK_HOST")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Where the serve from `runtime` on this host keeps its lease, in the VM
/// directory `vm_dir`.
pub fn lease_path(vm_dir: &Path, runtime: &Path) -> PathBuf {
    let name = runtime
        .file_name()
        .map_or_else(|| "serve".into(), |n| n.to_string_lossy().into_owned());
    leases::lease_file(vm_dir, &host(), &name)
}

/// Writes the lease of `state` (served from `runtime`) at `path`. `false`
/// when the repository cannot be written by this user (read-only: no
/// prune of it runs here either).
pub fn take_lease(path: &Path, runtime: &Path, state: &State) -> anyhow::Result<bool> {
    leases::write_lease(path, &serde_json::to_vec_pretty(&lease_of(runtime, state))?)
        .with_context(|| format!("writing the lease {}", path.display()))
}

/// What the lease of `state`, served from `runtime`, says.
fn lease_of(runtime: &Path, state: &State) -> Lease {
    Lease {
        host: host(),
        kind: state.kind,
        backup: state.backup.clone(),
        target: state.target.clone(),
        runtime: runtime.to_path_buf(),
        started: state.started.clone(),
        files: state.files.clone(),
    }
}

/// A lease that keeps a prune or consolidation off.
pub struct InTheWay {
    /// It is this host's.
    pub here: bool,
    /// What serves, where, and how to end it: for an error message.
    pub what: String,
}

/// What a lease stands for now, as this host can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseStatus {
    /// This host's, and its serve runs (or is being set up).
    Serving,
    /// This host's live restore, its export gone, whose images still read
    /// from the point: `restore --live --resume` serves it again.
    NeedsResume,
    /// This host's, and its serve ended: nothing needs it.
    Ended,
    /// Another host's: this host cannot tell whether it still serves.
    OtherHost,
    /// A lease bitback cannot read.
    Unreadable,
}

/// A lease found in a repository, with its status.
#[derive(Debug, Clone, Serialize)]
pub struct FoundLease {
    pub path: PathBuf,
    pub status: LeaseStatus,
    /// `None` when it cannot be read.
    #[serde(flatten)]
    pub lease: Option<Lease>,
    /// Why it cannot be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl FoundLease {
    /// The lease at `path` as `read`, with its `status` (unreadable when
    /// it could not be read).
    fn of(
        path: PathBuf,
        read: anyhow::Result<Lease>,
        status: impl FnOnce(&Lease) -> LeaseStatus,
    ) -> FoundLease {
        match read {
            Ok(lease) => FoundLease {
                status: status(&lease),
                path,
                lease: Some(lease),
                error: None,
            },
            Err(e) => FoundLease {
                path,
                status: LeaseStatus::Unreadable,
                lease: None,
                error: Some(format!("{e:#}")),
            },
        }
    }
}

/// The leases in VM directory `vm_dir`, each with its status.
pub fn leases(vm_dir: &Path) -> Vec<FoundLease> {
    let here = host();
    leases::lease_files(vm_dir)
        .into_iter()
        .map(|path| {
            let read = std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(serde_json::from_slice::<Lease>(&b)?));
            let status = |lease: &Lease| status_of(&path, lease, &here);
            FoundLease::of(path.clone(), read, status)
        })
        .collect()
}

fn status_of(path: &Path, lease: &Lease, here: &str) -> LeaseStatus {
    // The serve's own lease (however the repository's path was spelled).
    let ours = |state: &State| {
        let same = |l: &Path| {
            matches!(
                (std::fs::canonicalize(l), std::fs::canonicalize(path)),
                (Ok(a), Ok(b)) if a == b
            )
        };
        state.lease.as_deref().is_some_and(same)
    };
    status_where(lease, here, ours)
}

/// What `lease` stands for, `ours` telling whether a runtime directory's
/// state is the serve that wrote it.
fn status_where(lease: &Lease, here: &str, ours: impl Fn(&State) -> bool) -> LeaseStatus {
    if lease.host != here {
        return LeaseStatus::OtherHost;
    }
    let serving =
        read(&lease.runtime).is_ok_and(|state| ours(&state) && in_use(&state, &lease.runtime));
    if serving {
        LeaseStatus::Serving
    } else if lease.kind == Kind::Live && still_read(&lease.files, &lease.runtime) {
        // A live restore's images not yet streamed need the point even
        // with their export gone (a host restart ends it).
        LeaseStatus::NeedsResume
    } else {
        LeaseStatus::Ended
    }
}

/// The leases in VM directory `vm_dir` that keep a prune or consolidation
/// off: every other host's (this host cannot tell whether that serve
/// still runs; a NAS's locks may not reach across hosts), and this host's
/// whose serve is in use or whose images still need the point. This
/// host's leases whose serve ended are removed.
pub fn leases_in_the_way(vm_dir: &Path) -> Vec<InTheWay> {
    in_the_way(leases(vm_dir), leases::remove_lease)
}

/// The leases of `vm` in `bucket` that keep a prune off, as
/// [`leases_in_the_way`] finds a directory's (this host's that ended are
/// removed).
pub fn bucket_leases_in_the_way(
    bucket: &crate::repo::Bucket,
    vm: &str,
) -> anyhow::Result<Vec<InTheWay>> {
    let found = bucket_leases(bucket, vm)?;
    let prefix = crate::repo::Store::locate(bucket, "")
        .to_string_lossy()
        .into_owned();
    Ok(in_the_way(found, |path| {
        let key = path.to_string_lossy();
        let key = key.strip_prefix(&prefix).unwrap_or(&key);
        if let Err(e) = bucket.remove_all(key) {
            warn!(lease = %path.display(), error = %e, "could not remove an ended serve's lease");
        }
    }))
}

/// The leases of `vm` in `bucket`, each with its status (as
/// [`leases`] finds a directory's; the path is the object's URL).
pub fn bucket_leases(bucket: &crate::repo::Bucket, vm: &str) -> anyhow::Result<Vec<FoundLease>> {
    use crate::repo::{Entry, Store};
    let here = host();
    let dir = format!("{vm}/{}", leases::DIR);
    let mut found = Vec::new();
    for entry in bucket.list(&dir)? {
        let Entry::Object(name) = entry else {
            continue;
        };
        let key = format!("{dir}/{name}");
        let path = bucket.locate(&key);
        let read = bucket
            .get(&key)
            .map_err(anyhow::Error::from)
            .and_then(|b| b.context("gone while read"))
            .and_then(|b| Ok(serde_json::from_slice::<Lease>(&b)?));
        let ours = |state: &State| state.bucket_lease.as_ref().is_some_and(|l| l.key == key);
        found.push(FoundLease::of(path, read, |lease| {
            status_where(lease, &here, ours)
        }));
    }
    Ok(found)
}

/// Of `found`, the leases that keep a prune off; those of this host's
/// serves that ended are removed by `remove`.
fn in_the_way(found: Vec<FoundLease>, remove: impl Fn(&Path)) -> Vec<InTheWay> {
    let mut ways = Vec::new();
    for FoundLease {
        path,
        status,
        lease,
        error,
    } in found
    {
        let (here, what) = match (status, lease) {
            (LeaseStatus::Ended, _) => {
                info!(lease = %path.display(), "removing the lease of a serve that ended on this host");
                remove(&path);
                continue;
            }
            (LeaseStatus::Unreadable, _) | (_, None) => (
                false,
                format!(
                    "a lease bitback cannot read ({}); remove {} if nothing serves this VM's backups",
                    error.unwrap_or_default(),
                    path.display()
                ),
            ),
            (LeaseStatus::NeedsResume, Some(lease)) => (
                true,
                format!(
                    "a live restore of backup {} whose images ({}) still read from it through an export that is gone (its lease {}; serve it again with bitback restore --live --resume, then --finish; or remove the lease if those images are no longer needed)",
                    lease.backup,
                    lease
                        .files
                        .iter()
                        .map(|f| f.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    path.display()
                ),
            ),
            (status, Some(lease)) => {
                let here = status == LeaseStatus::Serving;
                let what = format!(
                    "{} of backup {} at {} on host {} since {} (its lease {}; end it there{})",
                    match lease.kind {
                        Kind::Mount => "bitback mount",
                        Kind::Live => "a live restore",
                    },
                    lease.backup,
                    lease.target.display(),
                    lease.host,
                    lease.started,
                    path.display(),
                    if here {
                        String::new()
                    } else {
                        format!(
                            ", or remove the lease if host {} no longer serves it",
                            lease.host
                        )
                    }
                );
                (here, what)
            }
        };
        ways.push(InTheWay { here, what });
    }
    ways
}

/// A serve of this host (a runtime directory under [`base`]), for
/// `bitback serving`.
#[derive(Debug, Clone, Serialize)]
pub struct Serve {
    pub runtime: PathBuf,
    pub status: ServeStatus,
    /// The daemon's pid, while it runs.
    pub pid: Option<u32>,
    #[serde(flatten)]
    pub state: State,
}

/// What a serve of this host is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServeStatus {
    /// Its daemon runs.
    Serving,
    /// No daemon yet, and the bitback setting it up still runs.
    SettingUp,
    /// Its daemon died: the next mount, umount or `--finish` cleans up.
    Gone,
}

impl ServeStatus {
    /// As `bitback serving` prints it (the JSON's value).
    pub fn name(self) -> &'static str {
        match self {
            ServeStatus::Serving => "serving",
            ServeStatus::SettingUp => "setting-up",
            ServeStatus::Gone => "gone",
        }
    }
}

/// This host's serves, as their runtime directories say.
pub fn serves() -> Vec<Serve> {
    all()
        .into_iter()
        .map(|(runtime, state)| {
            let pid = daemon(&runtime);
            let status = match (pid, in_use(&state, &runtime)) {
                (Some(_), _) => ServeStatus::Serving,
                (None, true) => ServeStatus::SettingUp,
                (None, false) => ServeStatus::Gone,
            };
            Serve {
                runtime,
                status,
                pid,
                state,
            }
        })
        .collect()
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

/// Makes the runtime directory for `key` with `state` in it, new (mode
/// 0711, whatever the umask, under a base made 0755 when bitback makes it:
/// a VM's QEMU, perhaps another user, connects to a live export's socket
/// there; nobody else lists it). One left by a run no longer in use is
/// cleaned up first; one in use is refused.
pub fn make_dir(kind: Kind, key: &Path, state: &State) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let base = base();
    if !base.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&base)
            .and_then(|()| std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)))
            .with_context(|| format!("creating {}", base.display()))?;
    }
    let dir = dir_for(kind, key);
    // Made aside with its state, then renamed into place: the directory
    // never exists without a state.
    let aside = base.join(format!(
        ".new-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::DirBuilder::new()
        .mode(0o711)
        .create(&aside)
        .and_then(|()| std::fs::set_permissions(&aside, std::fs::Permissions::from_mode(0o711)))
        .with_context(|| format!("creating {}", aside.display()))?;
    let placed = write(&aside, state).and_then(|()| place(&aside, &dir, kind, &state.target));
    if placed.is_err() {
        let _ = std::fs::remove_dir_all(&aside);
    }
    placed.map(|()| dir)
}

/// Renames `aside` to `dir`, never over one in use: one no longer in use
/// is cleaned up and the rename tried once more.
fn place(aside: &Path, dir: &Path, kind: Kind, target: &Path) -> anyhow::Result<()> {
    for _ in 0..2 {
        let renamed = nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            aside,
            nix::fcntl::AT_FDCWD,
            dir,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        );
        match renamed {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => {
                return Err(anyhow::Error::from(e).context(format!("creating {}", dir.display())));
            }
        }
        let Ok(old) = read(dir) else {
            bail!(BadInput(format!(
                "{} is there without a state bitback can read; remove it to serve {} there",
                dir.display(),
                target.display()
            )));
        };
        if in_use(&old, dir) {
            let by = match daemon(dir) {
                Some(pid) => format!("qemu-storage-daemon pid {pid}"),
                None => format!("bitback pid {}, setting it up", old.starter),
            };
            bail!(BadInput(format!(
                "{} is served already, by {by} (backup {} of vm {}); end it first{}",
                target.display(),
                old.backup,
                old.vm,
                match kind {
                    Kind::Mount => format!(" (bitback umount {})", target.display()),
                    Kind::Live => " (bitback restore --finish)".to_string(),
                }
            )));
        }
        clean_dead(dir, &old);
    }
    bail!("{} could not be made", dir.display())
}

/// Reads a runtime directory's state.
pub fn read(dir: &Path) -> anyhow::Result<State> {
    let path = dir.join(STATE);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// Writes `state` into `dir` (atomically: aside, then renamed).
pub fn write(dir: &Path, state: &State) -> anyhow::Result<()> {
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

/// The pid of the daemon serving from `dir`, while it runs: the pid in
/// its pid file, if that process is a qemu-storage-daemon started with
/// that pid file (a pid used again is not taken for it).
pub fn daemon(dir: &Path) -> Option<u32> {
    let pid_file = dir.join("daemon.pid");
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let ours = args
        .first()
        .is_some_and(|a| a.ends_with(b"qemu-storage-daemon"))
        && args
            .iter()
            .any(|a| *a == pid_file.as_os_str().as_encoded_bytes());
    ours.then_some(pid)
}

/// Whether a runtime directory is in use: its daemon runs, or the bitback
/// that set it up still runs (and may be starting it).
pub fn in_use(state: &State, dir: &Path) -> bool {
    daemon(dir).is_some() || {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", state.starter)).unwrap_or_default();
        let program = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        Path::new(std::ffi::OsStr::from_bytes(program))
            .file_name()
            .is_some_and(|n| n.as_encoded_bytes().starts_with(b"bitback"))
    }
}

/// What a dead daemon left: its FUSE mounts (detached), the mount points
/// bitback made, files of a set-up that did not end, its lease, and its
/// runtime directory. Live images stay: they are the VM's; and while they
/// still read from the point, so does the lease, which keeps prunes off
/// until they are streamed (after `--resume`).
pub fn clean_dead(dir: &Path, state: &State) {
    warn!(
        target = %state.target.display(),
        "the daemon serving backup {} of vm {} is gone; cleaning up after it",
        state.backup,
        state.vm
    );
    remove_made(state, dir);
    let _ = std::fs::remove_dir_all(dir);
}

/// The socket of a live export's URL (`nbd+unix:///NAME?socket=PATH`),
/// if it is one.
pub fn socket_of(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("nbd+unix:///")?;
    let (_, query) = rest.split_once('?')?;
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("socket="))
        .map(PathBuf::from)
}

/// Whether any of `images` still reads from the live export of runtime
/// directory `runtime` (its header names the export as backing file). An
/// image that cannot be read counts while it exists: not ours to judge.
pub fn still_read(images: &[PathBuf], runtime: &Path) -> bool {
    let socket = runtime.join("nbd.sock");
    images.iter().any(
        |image| match crate::qcow2::Image::open(image).map(|i| i.hc.backing_file) {
            Ok(Some(backing)) => socket_of(&backing).is_some_and(|s| s == socket),
            Ok(None) => false,
            Err(e) => {
                warn!(image = %image.display(), error = %e, "cannot read a live image's header");
                image.exists()
            }
        },
    )
}

/// Removes what the serve from `dir` made outside it: its lease (unless
/// its live images still read from the point), the files of a set-up that
/// did not end, and a mount's FUSE files (detached) and its directory when
/// bitback made it and it is empty.
fn remove_made(state: &State, dir: &Path) {
    let needed = state.kind == Kind::Live && still_read(&state.files, dir);
    if let Some(lease) = &state.lease
        && !needed
    {
        leases::remove_lease(lease);
    }
    if let Some(lease) = &state.bucket_lease
        && !needed
    {
        lease.remove();
    }
    for file in &state.pending {
        let _ = std::fs::remove_file(file);
    }
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

/// Starts the daemon of `spec` in `dir`, holding `lock`; returns its pid.
pub fn start(dir: &Path, spec: &DaemonSpec, lock: Option<ReadLock>) -> anyhow::Result<u32> {
    let fd = lock.as_ref().map(|l| l.as_fd().as_raw_fd());
    let pid = daemon::start_detached(dir, spec, fd).context("starting qemu-storage-daemon")?;
    // The daemon holds the lock from now on; releasing it here (flock's
    // unlock on drop) would release it for the daemon too, so the
    // descriptor is closed when bitback exits instead.
    std::mem::forget(lock);
    info!(pid, dir = %dir.display(), "qemu-storage-daemon serves on after bitback");
    Ok(pid)
}

/// Ends a runtime directory's daemon (QMP `quit`, then SIGTERM, then
/// SIGKILL, each by its pid, checked first) and removes what it served:
/// the mount points of a mount, the runtime directory.
pub async fn stop(dir: &Path, state: &State) -> anyhow::Result<()> {
    if let Some(pid) = daemon(dir) {
        let socket = dir.join("qmp.sock");
        let quit = async {
            let qmp = Qmp::connect_with(Endpoint::Unix(socket), QmpOptions::default()).await?;
            commands::quit(&qmp).await?;
            anyhow::Ok(())
        };
        if let Err(e) = tokio::time::timeout(Duration::from_secs(10), quit)
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 10 s")))
        {
            warn!(
                pid,
                error = format!("{e:#}"),
                "the daemon did not take quit; signalling it"
            );
        }
        let target = nix::unistd::Pid::from_raw(pid as i32);
        let mut signal = nix::sys::signal::Signal::SIGTERM;
        let mut waited = Duration::ZERO;
        while daemon(dir) == Some(pid) {
            if waited == Duration::from_secs(5) {
                let _ = nix::sys::signal::kill(target, signal);
            }
            if waited == Duration::from_secs(20) {
                signal = nix::sys::signal::Signal::SIGKILL;
                let _ = nix::sys::signal::kill(target, signal);
            }
            if waited > Duration::from_secs(30) {
                bail!("qemu-storage-daemon pid {pid} did not end");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += Duration::from_millis(50);
        }
    }
    remove_made(state, dir);
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(())
}

/// Cleans up after every runtime directory under [`base`] no longer in
/// use.
pub fn clean_all_dead() {
    for (dir, state) in all() {
        if !in_use(&state, &dir) {
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
        .filter(|(_, s)| s.repo == repo && s.vm == vm)
        .filter_map(|(dir, s)| Some((daemon(&dir)?, s)))
        .map(|(pid, s)| match s.kind {
            Kind::Mount => format!(
                "bitback mount of backup {} at {} (qemu-storage-daemon pid {pid}; bitback umount {})",
                s.backup,
                s.target.display(),
                s.target.display()
            ),
            Kind::Live => format!(
                "a live restore of backup {} into {} (qemu-storage-daemon pid {pid}; bitback restore --finish)",
                s.backup,
                s.target.display(),
            ),
        })
        .collect()
}

/// The current time for [`State::started`].
pub fn now() -> String {
    crate::repo::time::Utc::now().rfc3339()
}

#[cfg(test)]
mod tests {
    use super::ServeStatus;

    #[test]
    fn serve_statuses_print_as_their_json() {
        for status in [
            ServeStatus::Serving,
            ServeStatus::SettingUp,
            ServeStatus::Gone,
        ] {
            assert_eq!(serde_json::to_value(status).unwrap(), status.name());
        }
    }
}
