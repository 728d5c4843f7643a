//! `bitback mount`: a backup point's volumes as read-only files, one
//! `<volume>.raw` per volume, each the volume's whole virtual disk at that
//! point, read through its chain by a qemu-storage-daemon that serves on
//! after bitback exits (FUSE exports; [`super::runtime`]). `umount` ends
//! it and removes what `mount` made.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use tracing::warn;

use super::bucket;
use super::runtime::{self, Kind, State};
use crate::engine::chain::{Pick, resolve};
use crate::engine::check::Checks;
use crate::engine::key::Key;
use crate::engine::outcome::BadInput;
use crate::qemu::blockdev::{Address, Export, Node};
use crate::qemu::daemon::DaemonSpec;
use crate::repo::{Manifest, Repo};

/// What to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    pub vm: String,
    /// Which point.
    pub backup: Pick,
    /// Only these volumes; all of the point's when empty.
    pub volumes: Vec<String>,
    /// The directory that gets the files (made when missing).
    pub dir: PathBuf,
    /// The key of an encrypted backup.
    pub key: Option<Key>,
    /// What is checked before the point is served.
    pub checks: Checks,
}

/// A point being served: what `mount` and `restore --live` report.
#[derive(Debug, Clone, Serialize)]
pub struct Served {
    pub vm: String,
    pub backup: String,
    /// (volume, file): the FUSE files, or the live images.
    pub files: Vec<ServedFile>,
    /// The daemon's pid: it runs on after bitback.
    pub pid: u32,
    /// Its runtime directory (state, sockets, pid file).
    pub runtime: PathBuf,
    /// The live exports' NBD socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// The pid of the bitback server the daemon reads a bucket's point
    /// from (it ends when the daemon does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServedFile {
    pub volume: String,
    pub path: PathBuf,
    pub virtual_size: u64,
    /// The NBD URL a live image reads its not-yet-restored data from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export: Option<String>,
}

/// The point's volumes chosen by `wanted` (all when empty), each with its
/// QEMU node (`vol<i>`, its chain opened read-only) and the daemon's
/// secret objects. Refuses an unknown volume and an encrypted point
/// without its key.
pub(super) struct Point {
    pub manifest: Manifest,
    pub volumes: Vec<(String, u64)>,
    /// Each volume's files, full first.
    pub files: Vec<Vec<PathBuf>>,
    pub blockdevs: Vec<Node>,
    pub objects: Vec<String>,
    /// Each volume's guest ranges that hold data, where they are known
    /// already (a point in a bucket: its server mapped them).
    pub data: Option<Vec<Vec<(u64, u64)>>>,
}

impl Point {
    /// [`Point::open`] under the VM's read lock (for `purpose`), after
    /// cleaning up what dead daemons left.
    pub(super) fn locked(
        repo: &Repo,
        vm: &str,
        backup: &Pick,
        wanted: &[String],
        key: Option<&Key>,
        purpose: &str,
        checks: Checks,
    ) -> anyhow::Result<(Option<crate::repo::ReadLock>, Point)> {
        runtime::clean_all_dead();
        let lock = repo.read_lock(vm, purpose)?;
        Ok((lock, Point::open(repo, vm, backup, wanted, key, checks)?))
    }

    fn open(
        repo: &Repo,
        vm: &str,
        backup: &Pick,
        wanted: &[String],
        key: Option<&Key>,
        checks: Checks,
    ) -> anyhow::Result<Point> {
        if checks == Checks::Structure {
            warn!(
                vm,
                "--no-verify: serving the point without honouring verify's damage records or the files' recorded lengths (their structure is still checked)"
            );
        }
        let (manifest, chain) = resolve(repo, vm, backup, checks, wanted)?;
        let secret = match (&manifest.encryption, key) {
            (None, _) => None,
            (Some(_), Some(_)) => Some("bitback-key"),
            (Some(_), None) => {
                return Err(BadInput(format!(
                    "backup {} is encrypted; give its key with --key-file FILE",
                    manifest.id
                ))
                .into());
            }
        };
        let mut volumes = Vec::new();
        let mut chains = Vec::new();
        let mut blockdevs = Vec::new();
        for v in manifest
            .volumes
            .iter()
            .filter(|v| wanted.is_empty() || wanted.contains(&v.name))
        {
            let files = crate::engine::chain::volume_files(repo, &chain, &v.name)?;
            let image = crate::engine::chain::chain_image(&files, secret)?;
            blockdevs.push(image.named(format!("vol{}", volumes.len())).node());
            volumes.push((v.name.clone(), v.virtual_size));
            chains.push(files);
        }
        let objects = match (secret, key) {
            (Some(secret), Some(key)) => vec![format!(
                "secret,id={secret},format=raw,file={}",
                key.path().display().to_string().replace(',', ",,")
            )],
            _ => Vec::new(),
        };
        Ok(Point {
            manifest,
            volumes,
            files: chains,
            blockdevs,
            objects,
            data: None,
        })
    }

    /// The point a bucket's server opened, its volumes read from the
    /// server's `socket` (nodes `vol<i>`, each an NBD client of the
    /// volume's export).
    pub(super) fn from_bucket(opened: &bucket::Opened, socket: &Path) -> Point {
        Point {
            manifest: opened.manifest.clone(),
            volumes: opened
                .volumes
                .iter()
                .map(|v| (v.name.clone(), v.virtual_size))
                .collect(),
            files: opened.volumes.iter().map(|_| Vec::new()).collect(),
            blockdevs: opened
                .volumes
                .iter()
                .enumerate()
                .map(|(i, v)| Node::Nbd {
                    node_name: format!("vol{i}"),
                    export: v.name.clone(),
                    server: Address::Unix {
                        path: socket.to_path_buf(),
                    },
                    read_only: true,
                })
                .collect(),
            objects: Vec::new(),
            data: Some(opened.volumes.iter().map(|v| v.data.clone()).collect()),
        }
    }
}

/// Where a served point lies, as its runtime state and lease name it.
pub(super) struct Origin {
    /// The repository directory (absolute), or the bucket's URL.
    pub repo: PathBuf,
    /// The lease's path in a directory repository.
    pub lease: Option<PathBuf>,
    /// The lease in a bucket.
    pub bucket_lease: Option<runtime::BucketLease>,
}

impl Origin {
    pub(super) fn of_repo(repo: &Repo, vm: &str, kind: Kind, key: &Path) -> Origin {
        // The VM's name was checked when its point was opened.
        let root = std::fs::canonicalize(repo.root()).unwrap_or_else(|_| repo.root().to_path_buf());
        let lease = runtime::lease_path(&root.join(vm), &runtime::dir_for(kind, key));
        Origin {
            repo: root,
            lease: Some(lease),
            bucket_lease: None,
        }
    }

    /// Of a point in the bucket `source` names, served as `kind` from the
    /// runtime directory keyed `key`.
    pub(super) fn of_bucket(source: &bucket::Source, kind: Kind, key: &Path) -> Origin {
        Origin {
            repo: PathBuf::from(&source.url),
            lease: None,
            bucket_lease: Some(runtime::BucketLease::new(
                &source.url,
                source.endpoint.as_deref(),
                &source.vm,
                &runtime::dir_for(kind, key),
            )),
        }
    }
}

/// An absolute form of `dir`, made when missing: (path, made).
pub(super) fn target_dir(dir: &Path) -> anyhow::Result<(PathBuf, bool)> {
    let made = match std::fs::create_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if !dir.is_dir() {
                return Err(BadInput(format!("{} is not a directory", dir.display())).into());
            }
            false
        }
        Err(e) => return Err(anyhow::Error::from(e).context(format!("creating {}", dir.display()))),
    };
    let path =
        std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
    Ok((path, made))
}

/// A serve being set up: its target directory, its runtime directory and
/// its state, which records each file as it is made, so that
/// [`Serving::undo`] (or the next run, after a kill) removes them again.
pub(super) struct Serving {
    pub target: PathBuf,
    pub runtime: PathBuf,
    pub state: State,
}

impl Serving {
    /// The target directory `dir` (made when missing) and a new runtime
    /// directory keyed by `key(target)`, with the state of serving `point`,
    /// and its lease in the repository.
    pub(super) fn begin(
        kind: Kind,
        dir: &Path,
        key: impl FnOnce(&Path) -> PathBuf,
        origin: impl FnOnce(&Path) -> Origin,
        vm: &str,
        point: &Point,
    ) -> anyhow::Result<Serving> {
        let (target, made_target) = target_dir(dir)?;
        let key = key(&target);
        let Origin {
            repo,
            lease,
            bucket_lease,
        } = origin(&key);
        let state = State {
            kind,
            repo,
            vm: vm.to_string(),
            backup: point.manifest.id.clone(),
            volumes: point.volumes.iter().map(|(n, _)| n.clone()).collect(),
            target: target.clone(),
            files: Vec::new(),
            pending: Vec::new(),
            made_target,
            starter: std::process::id(),
            started: runtime::now(),
            lease: lease.clone(),
            bucket_lease: bucket_lease.clone(),
        };
        let runtime = match runtime::make_dir(kind, &key, &state) {
            Ok(runtime) => runtime,
            Err(e) => {
                if made_target {
                    let _ = std::fs::remove_dir(&target);
                }
                return Err(e);
            }
        };
        let mut serving = Serving {
            target,
            runtime,
            state,
        };
        if let Some(lease) = &bucket_lease
            && let Err(e) = lease.write(&serving.runtime, &serving.state)
        {
            return Err(serving.undo(e));
        }
        let Some(lease) = lease else {
            return Ok(serving);
        };
        match runtime::take_lease(&lease, &serving.runtime, &serving.state) {
            Ok(true) => {}
            // A repository this user cannot write: no prune runs from here
            // either, and the lock keeps others off.
            Ok(false) => {
                serving.state.lease = None;
                if let Err(e) = runtime::write(&serving.runtime, &serving.state) {
                    return Err(serving.undo(e));
                }
            }
            Err(e) => return Err(serving.undo(e)),
        }
        Ok(serving)
    }

    /// Records `file`, just made: served (`pending` false: in the lease
    /// too) or made aside.
    pub(super) fn record(&mut self, file: &Path, pending: bool) -> anyhow::Result<()> {
        match pending {
            true => self.state.pending.push(file.to_path_buf()),
            false => self.state.files.push(file.to_path_buf()),
        }
        runtime::write(&self.runtime, &self.state)?;
        if let (false, Some(lease)) = (pending, &self.state.lease) {
            runtime::take_lease(lease, &self.runtime, &self.state)?;
        }
        if let (false, Some(lease)) = (pending, &self.state.bucket_lease) {
            lease.write(&self.runtime, &self.state)?;
        }
        Ok(())
    }

    /// Records that `aside` is served as `file` now.
    pub(super) fn placed(&mut self, aside: &Path, file: &Path) -> anyhow::Result<()> {
        self.state.pending.retain(|p| p != aside);
        self.record(file, false)
    }

    /// Gives the target directory to `owner` when bitback made it (a VM's
    /// QEMU of that user reaches the images in it).
    pub(super) fn give_target(&self, owner: crate::qmp::SocketOwner) -> anyhow::Result<()> {
        if self.state.made_target {
            crate::qemu::daemon::give_to(&self.target, owner)
                .with_context(|| format!("giving {} to QEMU's user", self.target.display()))?;
        }
        Ok(())
    }

    /// Removes what was made (before the set-up ended); returns `e`.
    pub(super) fn undo(&self, e: anyhow::Error) -> anyhow::Error {
        for f in self.state.files.iter().chain(&self.state.pending) {
            let _ = std::fs::remove_file(f);
        }
        if let Some(f) = &self.state.lease {
            crate::repo::leases::remove_lease(f);
        }
        if let Some(lease) = &self.state.bucket_lease {
            lease.remove();
        }
        let _ = std::fs::remove_dir_all(&self.runtime);
        if self.state.made_target {
            let _ = std::fs::remove_dir(&self.target);
        }
        e
    }

    /// Starts the daemon serving `point` as `spec` says (its blockdevs and
    /// objects are the point's), holding `lock`; returns its pid.
    pub(super) fn start(
        &self,
        point: &Point,
        spec: DaemonSpec,
        lock: Option<crate::repo::ReadLock>,
    ) -> anyhow::Result<u32> {
        let spec = DaemonSpec {
            blockdevs: point.blockdevs.clone(),
            objects: point.objects.clone(),
            ..spec
        };
        crate::fault::point("serve-before-daemon");
        runtime::start(&self.runtime, &spec, lock).map_err(|e| self.undo(e))
    }
}

/// Mounts a point: returns once every `<dir>/<volume>.raw` serves the
/// volume's bytes.
pub async fn mount(repo: &Repo, opts: &MountOptions) -> anyhow::Result<Served> {
    let (lock, point) = Point::locked(
        repo,
        &opts.vm,
        &opts.backup,
        &opts.volumes,
        opts.key.as_ref(),
        "mount",
        opts.checks,
    )?;
    let serving = Serving::begin(
        Kind::Mount,
        &opts.dir,
        Path::to_path_buf,
        |key| Origin::of_repo(repo, &opts.vm, Kind::Mount, key),
        &opts.vm,
        &point,
    )?;
    mount_point(serving, point, lock, None)
}

/// Mounts a point that lies in a bucket (`source`), read by a bitback
/// server that the mount's qemu-storage-daemon reads from.
pub async fn mount_bucket(source: &bucket::Source, opts: &MountOptions) -> anyhow::Result<Served> {
    runtime::clean_all_dead();
    let server = bucket::Server::open(source)?;
    let opened = server.opened.clone();
    let point = Point::from_bucket(&opened, Path::new(""));
    let serving = Serving::begin(
        Kind::Mount,
        &opts.dir,
        Path::to_path_buf,
        |key| Origin::of_bucket(source, Kind::Mount, key),
        &opts.vm,
        &point,
    )?;
    let (server_pid, socket) = match server.listen(&serving.runtime) {
        Ok(listening) => listening,
        Err(e) => return Err(serving.undo(e)),
    };
    let point = Point::from_bucket(&opened, &socket);
    let served = mount_point(serving, point, None, Some(server_pid));
    if served.is_err() {
        bucket::end_server(server_pid);
    }
    served
}

/// Makes the FUSE files of `point` in the serve's target and starts its
/// daemon (holding `lock`); `server`: a bucket's server it reads from.
fn mount_point(
    mut serving: Serving,
    point: Point,
    lock: Option<crate::repo::ReadLock>,
    server: Option<u32>,
) -> anyhow::Result<Served> {
    let mut exports = Vec::new();
    for (i, (name, _)) in point.volumes.iter().enumerate() {
        let file = serving.target.join(format!("{name}.raw"));
        // The export replaces a file that must exist; a file there already
        // is someone's, never taken over.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file)
        {
            Ok(_) => {
                if let Err(e) = serving.record(&file, false) {
                    let _ = std::fs::remove_file(&file);
                    return Err(serving.undo(e));
                }
            }
            Err(e) => {
                return Err(
                    serving.undo(if e.kind() == std::io::ErrorKind::AlreadyExists {
                        BadInput(format!(
                            "{} exists; mount into an empty directory",
                            file.display()
                        ))
                        .into()
                    } else {
                        anyhow::Error::from(e).context(format!("creating {}", file.display()))
                    }),
                );
            }
        }
        exports.push(Export::Fuse {
            id: format!("e{i}"),
            node_name: format!("vol{i}"),
            mountpoint: file,
            writable: false,
        });
    }
    let spec = DaemonSpec {
        exports,
        ..DaemonSpec::default()
    };
    let pid = serving.start(&point, spec, lock)?;
    Ok(Served {
        vm: serving.state.vm.clone(),
        backup: point.manifest.id.clone(),
        files: point
            .volumes
            .iter()
            .zip(&serving.state.files)
            .map(|((volume, size), path)| ServedFile {
                volume: volume.clone(),
                path: path.clone(),
                virtual_size: *size,
                export: None,
            })
            .collect(),
        pid,
        runtime: serving.runtime,
        socket: None,
        server,
    })
}

/// Ends the mount at `dir`: its daemon, its files, the directory if
/// `mount` made it; a mount whose daemon died is cleaned up the same way.
/// Cleans up after any other dead daemon too. Returns what was mounted.
pub async fn umount(dir: &Path) -> anyhow::Result<State> {
    let target =
        std::fs::canonicalize(dir).map_err(|e| BadInput(format!("{}: {e}", dir.display())))?;
    let runtime = runtime::dir_for(Kind::Mount, &target);
    let state = runtime::read(&runtime);
    runtime::clean_all_dead();
    let state = match state {
        Ok(state) => state,
        Err(_) => {
            return Err(BadInput(format!(
                "nothing is mounted at {} by bitback on this host",
                target.display()
            ))
            .into());
        }
    };
    // A loop device on a served file would read nothing once it goes.
    let busy: Vec<String> = state
        .files
        .iter()
        .flat_map(|f| {
            crate::disk::loop_devices_on(f)
                .into_iter()
                .map(move |dev| format!("{} by {dev}", f.display()))
        })
        .collect();
    if !busy.is_empty() {
        return Err(BadInput(format!(
            "{} is still used: {}; unmount what the loop device holds and detach it (losetup -d) first",
            target.display(),
            busy.join(", ")
        ))
        .into());
    }
    if runtime.exists() {
        runtime::stop(&runtime, &state).await?;
    }
    Ok(state)
}
