//! Live restores: `restore --live` returns in seconds with one empty qcow2
//! image per volume whose backing file is the point, served read-only over
//! NBD by a qemu-storage-daemon that runs on after bitback
//! ([`super::runtime`]); a VM starts on the images at once and reads what
//! it has not written from the backup. `restore --finish` then streams
//! the backup's data into the images in the running VM (`block-stream`),
//! which drops their backing, and ends the export once no image needs it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use tracing::{info, warn};

use super::bucket;
use super::mount::{Origin, Point, Served, ServedFile, Serving};
use super::runtime::{self, Kind, State, socket_of};
use crate::engine::chain::Pick;
use crate::engine::key::Key;
use crate::engine::outcome::BadInput;
use crate::engine::progress::ProgressSink;
use crate::libvirt::Domain;
use crate::qcow2::{self, CreateOptions};
use crate::qemu::backup;
use crate::qemu::blockdev::{Address, Export};
use crate::qemu::daemon::DaemonSpec;
use crate::qemu::query;
use crate::qmp::{Qmp, SocketOwner};
use crate::repo::Repo;

/// What to restore live.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    pub vm: String,
    pub backup: Pick,
    pub volumes: Vec<String>,
    /// The directory that gets `<volume>.qcow2` (made when missing), or,
    /// with `images`, only the key of the export.
    pub output: PathBuf,
    /// The image path of each volume, instead of `<output>/<volume>.qcow2`
    /// (a libvirt domain's disk paths).
    pub images: Vec<(String, PathBuf)>,
    /// Replace images that exist.
    pub force: bool,
    pub key: Option<Key>,
    /// The user the VM's QEMU runs as, when not bitback's: the socket and
    /// images are given to it.
    pub owner: Option<SocketOwner>,
    /// Serve again the point that images a live restore made read from
    /// (their export ended before they were streamed): no image is made.
    pub resume: bool,
    /// What is checked before the point is served.
    pub checks: crate::engine::check::Checks,
}

/// The export name of `volume` of backup `backup` of `vm`: it names the
/// point, so that a resume serves the one an image reads.
fn export_name(vm: &str, backup: &str, volume: &str) -> String {
    format!("{vm}/{backup}/{volume}")
}

/// The NBD URL of export `name` on `socket`: a backing file name QEMU
/// opens.
fn export_url(name: &str, socket: &Path) -> String {
    format!("nbd+unix:///{name}?socket={}", socket.display())
}

/// What a live image's backing file names: the point's volume it reads,
/// and the export's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reads {
    vm: String,
    backup: String,
    volume: String,
    socket: PathBuf,
}

/// [`Reads`] of a backing file name [`export_url`] wrote, if it is one.
fn reads_of(url: &str) -> Option<Reads> {
    let socket = socket_of(url)?;
    let (name, _) = url.strip_prefix("nbd+unix:///")?.split_once('?')?;
    let mut parts = name.splitn(3, '/');
    let (vm, backup, volume) = (parts.next()?, parts.next()?, parts.next()?);
    Some(Reads {
        vm: vm.into(),
        backup: backup.into(),
        volume: volume.into(),
        socket,
    })
}

/// Creates the images and starts the export; returns at once.
pub async fn restore_live(repo: &Repo, opts: &LiveOptions) -> anyhow::Result<Served> {
    if opts.resume {
        return resume(repo, opts).await;
    }
    let (lock, point) = Point::locked(
        repo,
        &opts.vm,
        &opts.backup,
        &opts.volumes,
        opts.key.as_ref(),
        "restore --live",
        opts.checks,
    )?;
    let origin = |key: &Path| Origin::of_repo(repo, &opts.vm, Kind::Live, key);
    live_point(opts, point, origin, lock, None).await
}

/// Where the point a live restore serves lies.
#[derive(Clone, Copy)]
pub enum PointIn<'a> {
    Repo(&'a Repo),
    Bucket(&'a bucket::Source),
}

/// Creates the images of a point that lies in a bucket (`source`) and
/// starts its export, a qemu-storage-daemon reading the point from a
/// bitback server; returns at once.
pub async fn restore_live_bucket(
    source: &bucket::Source,
    opts: &LiveOptions,
) -> anyhow::Result<Served> {
    if opts.resume {
        return Err(BadInput(
            "--resume serves a directory repository's point again; for a bucket's, start the live restore anew".into(),
        )
        .into());
    }
    runtime::clean_all_dead();
    let server = bucket::Server::open(source)?;
    let opened = server.opened.clone();
    let origin = |key: &Path| Origin::of_bucket(source, Kind::Live, key);
    live_point(
        opts,
        Point::from_bucket(&opened, Path::new("")),
        origin,
        None,
        Some((server, opened)),
    )
    .await
}

/// [`restore_live`] of `point`, found: its images, then its export.
/// `bucket`: the server a bucket's point is read from (and what it
/// opened), told to listen once the runtime directory is made.
async fn live_point(
    opts: &LiveOptions,
    mut point: Point,
    origin: impl FnOnce(&Path) -> Origin,
    lock: Option<crate::repo::ReadLock>,
    bucket: Option<(bucket::Server, bucket::Opened)>,
) -> anyhow::Result<Served> {
    let image_of = |target: &Path, name: &str| {
        opts.images
            .iter()
            .find(|(v, _)| v == name)
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| target.join(format!("{name}.qcow2")))
    };
    // One export per set of images: keyed by the first image's path.
    let mut serving = Serving::begin(
        Kind::Live,
        &opts.output,
        |target| {
            point
                .volumes
                .first()
                .map(|(name, _)| image_of(target, name))
                .unwrap_or_else(|| target.to_path_buf())
        },
        origin,
        &opts.vm,
        &point,
    )?;
    let socket = serving.runtime.join("nbd.sock");
    if let Some(owner) = opts.owner
        && let Err(e) = serving.give_target(owner)
    {
        return Err(serving.undo(e));
    }
    if !opts.images.is_empty()
        && let Some((name, _)) = point
            .volumes
            .iter()
            .find(|(name, _)| !opts.images.iter().any(|(v, _)| v == name))
    {
        return Err(serving.undo(BadInput(format!(
            "volume {name} of backup {} has no qcow2 file disk to become (a live restore makes qcow2 images; restore it with bitback restore, or give --volume for the others)",
            point.manifest.id
        )).into()));
    }
    // Each image is made aside and renamed into place once the export
    // serves: a failure before that leaves what was there (even with
    // --force) as it was.
    let mut files = Vec::new();
    let mut placing = Vec::new();
    for (i, (name, size)) in point.volumes.iter().enumerate() {
        let path = image_of(&serving.target, name);
        let aside = aside_of(&path);
        let url = export_url(&export_name(&opts.vm, &point.manifest.id, name), &socket);
        let data = match &point.data {
            Some(data) => Ok(data.get(i).cloned()),
            None => crate::engine::native::data_ranges(&point.files[i]),
        };
        let made =
            data.and_then(|data| new_image(&path, &aside, *size, &url, data.as_deref(), opts));
        if let Err(e) = made.and_then(|()| serving.record(&aside, true)) {
            let _ = std::fs::remove_file(&aside);
            return Err(serving.undo(e));
        }
        placing.push((aside, path.clone()));
        files.push(ServedFile {
            volume: name.clone(),
            path,
            virtual_size: *size,
            export: Some(url),
        });
    }
    let server = match bucket {
        Some((server, opened)) => match server.listen(&serving.runtime) {
            Ok((pid, socket)) => {
                point = Point::from_bucket(&opened, &socket);
                Some(pid)
            }
            Err(e) => return Err(serving.undo(e)),
        },
        None => None,
    };
    let pid = match serve(&serving, &point, &opts.vm, opts.owner, lock).await {
        Ok(pid) => pid,
        Err(e) => {
            if let Some(server) = server {
                bucket::end_server(server);
            }
            return Err(e);
        }
    };
    for (aside, path) in &placing {
        place(aside, path, opts.force)
            .and_then(|()| serving.placed(aside, path))
            .with_context(|| {
                format!(
                    "placing {} (the export serves on in {}: bitback restore --finish ends it once no image needs it)",
                    path.display(),
                    serving.runtime.display()
                )
            })?;
    }
    info!(backup = %point.manifest.id, pid, "live restore ready");
    Ok(Served {
        vm: opts.vm.clone(),
        backup: point.manifest.id.clone(),
        files,
        pid,
        runtime: serving.runtime,
        socket: Some(socket),
        server,
    })
}

/// Starts the daemon of a live restore: an NBD export of each volume of
/// `point` on the runtime directory's socket, given to `owner`; returns
/// its pid. Undoes the set-up when it fails.
async fn serve(
    serving: &Serving,
    point: &Point,
    vm: &str,
    owner: Option<SocketOwner>,
    lock: Option<crate::repo::ReadLock>,
) -> anyhow::Result<u32> {
    let socket = serving.runtime.join("nbd.sock");
    let exports = point
        .volumes
        .iter()
        .enumerate()
        .map(|(i, (name, _))| Export::Nbd {
            id: format!("e{i}"),
            node_name: format!("vol{i}"),
            name: export_name(vm, &point.manifest.id, name),
            writable: false,
        })
        .collect();
    let spec = DaemonSpec {
        nbd: Some(Address::Unix {
            path: socket.clone(),
        }),
        exports,
        ..DaemonSpec::default()
    };
    let pid = serving.start(point, spec, lock)?;
    if let Some(owner) = owner
        && let Err(e) = crate::qemu::daemon::give_to(&socket, owner)
    {
        let _ = runtime::stop(&serving.runtime, &serving.state).await;
        return Err(serving.undo(
            anyhow::Error::from(e).context(format!("giving {} to QEMU's user", socket.display())),
        ));
    }
    Ok(pid)
}

/// An image that reads from a live export: its path, what it reads, its
/// virtual size.
type ImageReading = (PathBuf, Reads, u64);

/// The images a resume serves again: those of `opts` (or the qcow2
/// images in its output directory) that read from a bitback live export,
/// each with what it reads and its size, and the first one's export. All
/// must read from one live restore, of the VM and backup asked for.
fn images_to_resume(opts: &LiveOptions) -> anyhow::Result<(Vec<ImageReading>, Reads)> {
    let candidates: Vec<PathBuf> = if opts.images.is_empty() {
        let entries = std::fs::read_dir(&opts.output)
            .with_context(|| format!("reading {}", opts.output.display()))?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "qcow2"))
            .collect();
        found.sort();
        found
    } else {
        opts.images.iter().map(|(_, p)| p.clone()).collect()
    };
    // The images that read from a bitback live export.
    let mut images: Vec<ImageReading> = Vec::new();
    for path in candidates {
        let Ok(image) = qcow2::Image::open(&path) else {
            continue;
        };
        if let Some(reads) = image.hc.backing_file.as_deref().and_then(reads_of) {
            images.push((path, reads, image.hc.header.size));
        }
    }
    let Some((_, first, _)) = images.first() else {
        return Err(BadInput(format!(
            "no qcow2 image in {} reads from a bitback live export: nothing to resume (streamed already, or not made by restore --live)",
            opts.output.display()
        ))
        .into());
    };
    let first = first.clone();
    if images
        .iter()
        .any(|(_, r, _)| (&r.vm, &r.backup, &r.socket) != (&first.vm, &first.backup, &first.socket))
    {
        return Err(BadInput(format!(
            "the images read from more than one live restore: {}; resume each from a directory of its own",
            images
                .iter()
                .map(|(p, r, _)| format!("{} ({} of backup {} of vm {}, {})", p.display(), r.volume, r.backup, r.vm, r.socket.display()))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .into());
    }
    if first.vm != opts.vm {
        return Err(BadInput(format!(
            "the images read from vm {}, not {}: give --vm {}",
            first.vm, opts.vm, first.vm
        ))
        .into());
    }
    if let Some(b) = opts.backup.id()
        && b != first.backup
    {
        return Err(BadInput(format!(
            "the images read from backup {}, not {b}: a resume serves the backup they read (leave out --backup)",
            first.backup
        ))
        .into());
    }
    Ok((images, first))
}

/// `restore --live --resume`: serves again, at the socket their backing
/// file names, the point that images a live restore made read from, when
/// its export ended before they were streamed (the host restarted, the
/// daemon was killed). The images stay as they are, with whatever the
/// guest wrote: start the VM on them (a running QEMU reconnects at its
/// next read), then run `--finish`. The point is the one the images name;
/// a `--backup` that differs is refused.
async fn resume(repo: &Repo, opts: &LiveOptions) -> anyhow::Result<Served> {
    let (images, first) = images_to_resume(opts)?;
    let wanted: Vec<String> = images.iter().map(|(_, r, _)| r.volume.clone()).collect();
    let (lock, point) = Point::locked(
        repo,
        &opts.vm,
        &Pick::Id(first.backup.clone()),
        &wanted,
        opts.key.as_ref(),
        "restore --live --resume",
        opts.checks,
    )?;
    let image_of = |name: &str| {
        images
            .iter()
            .find(|(_, r, _)| r.volume == name)
            .with_context(|| format!("backup volume {name} has no image being resumed"))
    };
    for (name, size) in &point.volumes {
        let (path, _, image_size) = image_of(name)?;
        if image_size != size {
            return Err(BadInput(format!(
                "{} holds {image_size} bytes, volume {name} of backup {} {size}: not the image its restore made",
                path.display(),
                point.manifest.id
            ))
            .into());
        }
    }
    // The runtime directory is keyed as the live restore keyed it: by
    // its first image's path.
    let (first_volume, _) = point.volumes.first().context("a point of no volume")?;
    let first_image = image_of(first_volume)?.0.clone();
    let serving = Serving::begin(
        Kind::Live,
        &opts.output,
        |target| match opts.images.is_empty() {
            true => target.join(first_image.file_name().unwrap_or_default()),
            false => first_image.clone(),
        },
        |key| Origin::of_repo(repo, &opts.vm, Kind::Live, key),
        &opts.vm,
        &point,
    )?;
    let socket = serving.runtime.join("nbd.sock");
    if socket != first.socket {
        return Err(serving.undo(
            BadInput(format!(
                "the images read from {}, and this run would serve at {}: resume on the host that made them, with the BITBACK_RUNTIME_DIR it had",
                first.socket.display(),
                socket.display()
            ))
            .into(),
        ));
    }
    let pid = serve(&serving, &point, &opts.vm, opts.owner, lock).await?;
    let mut serving = serving;
    let mut files = Vec::new();
    for (name, size) in &point.volumes {
        let (path, _, _) = image_of(name)?;
        // Recorded once served: the images are the VM's, never removed.
        serving.record(path, false).with_context(|| {
            format!(
                "recording {} (the export serves in {})",
                path.display(),
                serving.runtime.display()
            )
        })?;
        files.push(ServedFile {
            volume: name.clone(),
            path: path.clone(),
            virtual_size: *size,
            export: Some(export_url(
                &export_name(&opts.vm, &point.manifest.id, name),
                &socket,
            )),
        });
    }
    info!(backup = %point.manifest.id, pid, "live restore served again");
    Ok(Served {
        vm: opts.vm.clone(),
        backup: point.manifest.id.clone(),
        files,
        pid,
        runtime: serving.runtime,
        socket: Some(socket),
        server: None,
    })
}

/// `restore --live --libvirt DOMAIN`: the point's volumes become images
/// at the shut-off domain's disk paths (its qcow2 file disks, named by
/// target device), the domain starts on them (`started` is told), and the
/// streams run to their end ([`finish`]).
pub async fn restore_live_domain(
    from: PointIn<'_>,
    opts: &LiveOptions,
    domain: &Domain,
    progress: Option<&ProgressSink>,
    started: impl FnOnce(&Served),
) -> anyhow::Result<(Served, FinishReport)> {
    let info = domain.info()?;
    if info.running && !opts.resume {
        return Err(BadInput(format!(
            "domain {} is running; a live restore starts it on the backup: shut it off first",
            domain.name
        ))
        .into());
    }
    let images: Vec<(String, PathBuf)> = info
        .disks
        .iter()
        .filter(|d| d.device == "disk" && d.kind == "file" && d.format.as_deref() == Some("qcow2"))
        .filter_map(|d| d.source.clone().map(|s| (d.target.clone(), s)))
        .collect();
    let output = images
        .first()
        .and_then(|(_, p)| p.parent())
        .map(Path::to_path_buf)
        .ok_or_else(|| BadInput(format!("domain {} has no qcow2 file disk", domain.name)))?;
    let opts = LiveOptions {
        output,
        images,
        owner: domain.qemu_user(),
        ..opts.clone()
    };
    let served = match from {
        PointIn::Repo(repo) => restore_live(repo, &opts).await?,
        PointIn::Bucket(source) => restore_live_bucket(source, &opts).await?,
    };
    if info.running {
        // A resume: the running QEMU reconnects to the export at its next
        // read.
    } else if let Err(e) = domain.start() {
        return Err(anyhow::Error::from(e).context(format!(
            "starting domain {} on the restored images (they and the export stay: fix it, start the domain, then run bitback restore --finish --libvirt {})",
            domain.name, domain.name
        )));
    }
    started(&served);
    crate::fault::point("live-domain-started");
    let report = finish_domain(domain, progress).await?;
    Ok((served, report))
}

/// An empty qcow2 image at `aside` (to become `path`, which must not exist
/// unless --force) backed by the export `url`, with a zero
/// cluster wherever the point holds no data (`data`: its data ranges,
/// when known): the VM reads those as zeros without asking the export, and
/// the stream, which skips what the image holds, copies only data.
fn new_image(
    path: &Path,
    aside: &Path,
    size: u64,
    url: &str,
    data: Option<&[(u64, u64)]>,
    opts: &LiveOptions,
) -> anyhow::Result<()> {
    if !opts.force && (path.exists() || path.is_symlink()) {
        return Err(BadInput(format!(
            "{} exists; give --force to replace it",
            path.display()
        ))
        .into());
    }
    refuse_held(path)?;
    let create = CreateOptions {
        size,
        backing: Some(url),
        backing_format: Some("raw"),
        ..CreateOptions::default()
    };
    let made = match data {
        None => qcow2::create(aside, &create).map_err(anyhow::Error::from),
        Some(data) => zeroed_image(aside, &create, data),
    };
    made.with_context(|| format!("creating {}", aside.display()))?;
    if let Some(owner) = opts.owner {
        crate::qemu::daemon::give_to(aside, owner)
            .with_context(|| format!("giving {} to QEMU's user", aside.display()))?;
    }
    Ok(())
}

/// Where an image is made before it is placed: beside it, hidden.
fn aside_of(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.bitback-live"))
}

/// Refuses to replace a file a process holds open (a running VM's disk,
/// which would go on writing to a deleted file), even with --force.
fn refuse_held(path: &Path) -> anyhow::Result<()> {
    let holders = crate::disk::holders(path);
    if holders.is_empty() {
        return Ok(());
    }
    Err(BadInput(format!(
        "{} is held open by {}; a disk in use is never replaced, --force or not (stop the VM first)",
        path.display(),
        holders.join(", ")
    ))
    .into())
}

/// Renames `aside` to `path`: over a file there only when `force`, and
/// never over one a process holds open.
fn place(aside: &Path, path: &Path, force: bool) -> anyhow::Result<()> {
    if force {
        refuse_held(path)?;
    }
    let flags = match force {
        true => nix::fcntl::RenameFlags::empty(),
        false => nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    };
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        aside,
        nix::fcntl::AT_FDCWD,
        path,
        flags,
    )
    .map_err(|e| anyhow::Error::from(std::io::Error::from(e)))
}

/// [`new_image`]'s image with zero clusters: every whole cluster outside
/// `data` (sorted, disjoint guest ranges).
fn zeroed_image(path: &Path, create: &CreateOptions, data: &[(u64, u64)]) -> anyhow::Result<()> {
    // At most this much per call: the writer lists a range's clusters.
    const STEP: u64 = 1 << 30;
    let cs = create.cluster_size;
    let mut image = qcow2::Stream::create(path, create)?;
    // The gaps between data ranges, and after the last.
    let starts = std::iter::once(0).chain(data.iter().map(|&(_, end)| end));
    let ends = data
        .iter()
        .map(|&(start, _)| start)
        .chain(std::iter::once(create.size));
    for (start, end) in starts.zip(ends) {
        // Whole clusters only: a cluster data shares reads from the export.
        // The disk's last cluster may be short; a gap to the end takes it.
        let mut from = start.div_ceil(cs) * cs;
        let to = if end == create.size {
            end
        } else {
            end / cs * cs
        };
        while from < to {
            let n = (to - from).min(STEP);
            image.write_zeroes(from, n)?;
            from += n;
        }
    }
    image.finish()?;
    Ok(())
}

/// One volume `--finish` streamed, or found streamed.
#[derive(Debug, Clone, Serialize)]
pub struct Finished {
    /// The QEMU node (or device) streamed.
    pub node: String,
    /// The image's file.
    pub image: String,
    pub how: How,
}

/// How `--finish` took a volume off its export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum How {
    /// Its stream was started now.
    Streamed,
    /// A stream already running (a `--finish` killed before) was waited
    /// for.
    Waited,
}

impl std::fmt::Display for How {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            How::Streamed => "streamed",
            How::Waited => "waited",
        })
    }
}

/// What `--finish` did.
#[derive(Debug, Clone, Serialize)]
pub struct FinishReport {
    pub volumes: Vec<Finished>,
    /// Exports ended (runtime directories), each once no image needs it.
    pub ended: Vec<PathBuf>,
    /// This VM's exports still needed by an image (a failed stream, or an
    /// image of the same restore that this VM does not have open).
    pub kept: Vec<PathBuf>,
}

/// A device of the VM whose image is backed by a bitback live export.
#[derive(Clone)]
struct Backed {
    node: String,
    image: String,
    runtime: PathBuf,
}

/// The VM's images backed by a live export under [`runtime::base`]: its
/// qcow2 nodes whose header names one as backing file (a VM's devices and
/// a qemu-storage-daemon's nodes alike).
async fn backed_images(qmp: &Qmp) -> anyhow::Result<Vec<Backed>> {
    let base = runtime::base();
    let mut found = Vec::new();
    for n in query::nodes(qmp).await? {
        if n.drv != "qcow2" {
            continue;
        }
        let Some(backing) = n.backing_file.as_deref() else {
            continue;
        };
        let Some(socket) = socket_of(backing) else {
            continue;
        };
        let Some(runtime) = socket.parent().filter(|p| p.starts_with(&base)) else {
            continue;
        };
        if n.node_name.is_empty() {
            continue;
        }
        let image = match n.image.filename.is_empty() {
            true => n.file.clone(),
            false => n.image.filename.clone(),
        };
        found.push(Backed {
            node: n.node_name.clone(),
            image,
            runtime: runtime.to_path_buf(),
        });
    }
    Ok(found)
}

/// The job id `--finish` streams `node` with.
fn job_id(node: &str) -> String {
    format!("bitback-stream-{node}")
}

/// How many times `--finish` streams again what is still backed by an
/// export that serves, and the first wait before it (doubled each time).
/// QEMU's NBD client reconnects to an export served again (`--resume`) in
/// the background, after a first request failed; a stream that met that
/// failure succeeds once it has.
const ROUNDS: u32 = 6;
const FIRST_WAIT: Duration = Duration::from_secs(1);

/// The rounds of a `--finish`.
struct Rounds {
    round: u32,
    wait: Duration,
}

impl Rounds {
    fn new() -> Rounds {
        Rounds {
            round: 1,
            wait: FIRST_WAIT,
        }
    }

    /// After a round that left `left` backed (`failed` says how): waits
    /// and says to stream again, unless the rounds are over or an export
    /// is gone (nothing to reconnect to).
    async fn again(&mut self, left: &[Backed], failed: String) -> bool {
        if left.is_empty() || self.round == ROUNDS || left.iter().any(|b| b.serving().is_err()) {
            return false;
        }
        warn!(
            failed,
            "a stream failed while its export serves (QEMU may be reconnecting to it); streaming again in {} s",
            self.wait.as_secs()
        );
        tokio::time::sleep(self.wait).await;
        self.wait *= 2;
        self.round += 1;
        true
    }
}

/// Streams every image of the VM behind `qmp` that a live export backs,
/// waits, and ends each export no image needs any more, showing the
/// streams' bytes on `progress`. A stream that fails while its export
/// serves is run again (see [`ROUNDS`]).
pub async fn finish(qmp: &Qmp, progress: Option<&ProgressSink>) -> anyhow::Result<FinishReport> {
    runtime::clean_all_dead();
    let backed = backed_images(qmp).await?;
    let mut volumes: Vec<Finished> = Vec::new();
    let mut rounds = Rounds::new();
    let mut todo = backed.clone();
    let failures = loop {
        let (streamed, failures, left) = stream_round(qmp, &todo, progress).await?;
        for f in streamed {
            if !volumes.iter().any(|v| v.node == f.node) {
                volumes.push(f);
            }
        }
        if failures.is_empty() || !rounds.again(&left, failures.join("; ")).await {
            break failures;
        }
        todo = left;
    };
    let (ended, kept) = end_exports(&backed).await?;
    if !failures.is_empty() {
        bail!(
            "streaming failed: {}; the images keep their backing, and the export serves on: run bitback restore --finish again",
            failures.join("; ")
        );
    }
    Ok(FinishReport {
        volumes,
        ended,
        kept,
    })
}

/// One round of [`finish`]: streams each of `backed` (a stream running
/// already is waited for) and waits for all; returns what was streamed,
/// the failures (an image still backed after its stream among them), and
/// the images still backed.
async fn stream_round(
    qmp: &Qmp,
    backed: &[Backed],
    progress: Option<&ProgressSink>,
) -> anyhow::Result<(Vec<Finished>, Vec<String>, Vec<Backed>)> {
    let mut events = qmp.subscribe();
    let running: Vec<String> = query::block_jobs(qmp)
        .await?
        .into_iter()
        .map(|j| j.device)
        .collect();
    // One stream at a time (see the note in finish_domain): those running
    // already (a --finish killed before) are waited for first.
    let (waiting, starting): (Vec<&Backed>, Vec<&Backed>) = backed
        .iter()
        .partition(|b| running.contains(&job_id(&b.node)));
    let mut volumes = Vec::new();
    for b in &waiting {
        b.serving()?;
        volumes.push(Finished {
            node: b.node.clone(),
            image: b.image.clone(),
            how: How::Waited,
        });
    }
    let ids = waiting.iter().map(|b| job_id(&b.node)).collect();
    let mut failures = wait_jobs(qmp, &mut events, ids, progress).await?;
    for b in &starting {
        b.serving()?;
        let id = job_id(&b.node);
        backup::stream(qmp, &id, &b.node)
            .await
            .with_context(|| format!("starting the stream of {}", b.image))?;
        volumes.push(Finished {
            node: b.node.clone(),
            image: b.image.clone(),
            how: How::Streamed,
        });
        failures.extend(wait_jobs(qmp, &mut events, vec![id], progress).await?);
    }
    // What is still backed by an export: a failed stream, or one whose end
    // went unseen and failed.
    let left = backed_images(qmp).await?;
    for b in &left {
        if !failures.iter().any(|f| f.starts_with(&job_id(&b.node))) {
            failures.push(format!(
                "{}: still backed by the export after its stream",
                job_id(&b.node)
            ));
        }
    }
    Ok((volumes, failures, left))
}

/// Waits for the block jobs `pending` to end: by events, with a poll of
/// the job list for progress (and for an end whose event came before we
/// listened). Returns their failures.
async fn wait_jobs(
    qmp: &Qmp,
    events: &mut crate::qmp::Events,
    mut pending: Vec<String>,
    progress: Option<&ProgressSink>,
) -> anyhow::Result<Vec<String>> {
    let mut failures = Vec::new();
    if pending.is_empty() {
        return Ok(failures);
    }
    if let Some(p) = progress {
        p.0.start("streaming the backup into the images", 0);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while !pending.is_empty() {
        tokio::select! {
            event = events.next(Duration::from_secs(3600)) => {
                let event = event.context("waiting for the streams")?;
                if event.name == "BLOCK_JOB_COMPLETED" || event.name == "BLOCK_JOB_CANCELLED" {
                    let device = event.data["device"].as_str().unwrap_or_default().to_string();
                    if let Some(at) = pending.iter().position(|p| *p == device) {
                        pending.swap_remove(at);
                        if event.name == "BLOCK_JOB_CANCELLED" {
                            failures.push(format!("{device}: cancelled"));
                        } else if let Some(error) = event.data["error"].as_str() {
                            failures.push(format!("{device}: {error}"));
                        }
                    }
                }
            }
            _ = tick.tick() => {
                let jobs = query::block_jobs(qmp).await?;
                let (mut done, mut all) = (0u64, 0u64);
                for j in jobs.iter().filter(|j| pending.contains(&j.device)) {
                    done += j.offset;
                    all += j.len;
                }
                if let Some(p) = progress {
                    p.0.update(done, all);
                }
                pending.retain(|p| jobs.iter().any(|j| &j.device == p));
            }
        }
    }
    if let Some(p) = progress {
        p.0.finish();
    }
    Ok(failures)
}

impl Backed {
    /// Fails, saying what it means, when the export it reads from is gone.
    fn serving(&self) -> anyhow::Result<()> {
        if runtime::daemon(&self.runtime).is_none() {
            bail!(
                "{} reads its not-yet-restored data from a live export that is gone ({}): \
                 the VM gets read errors there until bitback restore --live --resume --repo REPO \
                 --vm VM --output {} (or --libvirt DOMAIN) serves it again (what the guest \
                 wrote stays); then run \
                 --finish again",
                self.image,
                self.runtime.display(),
                Path::new(&self.image)
                    .parent()
                    .unwrap_or(Path::new("DIR"))
                    .display()
            );
        }
        Ok(())
    }
}

/// Ends every live export no image needs any more: the streamed ones', and
/// one whose stream finished while no bitback watched. Returns (ended,
/// kept): kept are those of `backed` an image still reads from.
async fn end_exports(backed: &[Backed]) -> anyhow::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut ended, mut kept) = (Vec::new(), Vec::new());
    for (runtime, state) in runtime::all() {
        if state.kind != Kind::Live {
            continue;
        }
        if needed(&state, &runtime) {
            if backed.iter().any(|b| b.runtime == runtime) {
                kept.push(runtime);
            }
        } else {
            runtime::stop(&runtime, &state).await?;
            ended.push(runtime);
        }
    }
    Ok((ended, kept))
}

/// Waits until the stream of disk `node` of `domain` ends, showing its
/// progress.
async fn wait_for_stream(
    domain: &Domain,
    node: &str,
    progress: Option<&ProgressSink>,
) -> anyhow::Result<()> {
    if let Some(p) = progress {
        p.0.start("streaming the backup into the images", 0);
    }
    while let Some((done, all)) = domain.blockjob(node)? {
        if let Some(p) = progress {
            p.0.update(done, all);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some(p) = progress {
        p.0.finish();
    }
    Ok(())
}

/// [`finish`] for a libvirt domain, with libvirt's own streams (`virsh
/// blockpull`), so that libvirt's view of each disk's chain follows.
pub async fn finish_domain(
    domain: &Domain,
    progress: Option<&ProgressSink>,
) -> anyhow::Result<FinishReport> {
    runtime::clean_all_dead();
    let base = runtime::base();
    let backed_disks = |info: &crate::libvirt::DomainInfo| -> Vec<Backed> {
        info.disks
            .iter()
            .filter_map(|d| {
                let runtime = d.backing_socket.as_ref()?.parent()?;
                runtime.starts_with(&base).then(|| Backed {
                    node: d.target.clone(),
                    image: d
                        .source
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    runtime: runtime.to_path_buf(),
                })
            })
            .collect()
    };
    let info = domain.info()?;
    if !info.running {
        return Err(BadInput(format!(
            "domain {} is not running; start it on its images first",
            domain.name
        ))
        .into());
    }
    let backed = backed_disks(&info);
    let mut volumes: Vec<Finished> = Vec::new();
    let mut rounds = Rounds::new();
    // Rounds, as `finish` runs them: a stream that failed leaves its disk
    // backed by the export.
    let mut todo = backed.clone();
    let left = loop {
        // One stream at a time, those running already (a --finish killed
        // before) first. libvirt's QEMU 10.0.2 crashed once in CI (a
        // segfault in bdrv_refresh_filename, on an implicit node without
        // children: a stream's filter) while two pulls of one domain ran;
        // streams that never run together never end together.
        let mut order: Vec<(&Backed, bool)> = Vec::new();
        for b in &todo {
            order.push((b, domain.blockjob(&b.node)?.is_some()));
        }
        order.sort_by_key(|(_, running)| !running);
        for (b, running) in order {
            b.serving()?;
            if !running {
                domain
                    .blockpull(&b.node)
                    .with_context(|| format!("starting the stream of {}", b.image))?;
            }
            if !volumes.iter().any(|v| v.node == b.node) {
                volumes.push(Finished {
                    node: b.node.clone(),
                    image: b.image.clone(),
                    how: if running { How::Waited } else { How::Streamed },
                });
            }
            wait_for_stream(domain, &b.node, progress).await?;
        }
        let left = backed_disks(&domain.info()?);
        let failed = left
            .iter()
            .map(|b| b.node.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if !rounds.again(&left, failed).await {
            break left;
        }
        todo = left;
    };
    let (ended, kept) = end_exports(&backed).await?;
    if !left.is_empty() {
        bail!(
            "streaming failed for {}: the disks keep their backing, and the export serves on: run bitback restore --finish again (virsh domblkerror and the domain's log say more)",
            left.iter()
                .map(|b| b.node.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(FinishReport {
        volumes,
        ended,
        kept,
    })
}

/// Whether an image of a live restore still reads from its export.
fn needed(state: &State, runtime: &Path) -> bool {
    runtime::still_read(&state.files, runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_urls_name_their_point_and_socket() {
        let name = export_name("vm1", "20261130T225843Z", "vda");
        let url = export_url(&name, Path::new("/run/bitback/live-0123/nbd.sock"));
        assert_eq!(
            url,
            "nbd+unix:///vm1/20261130T225843Z/vda?socket=/run/bitback/live-0123/nbd.sock"
        );
        assert_eq!(
            socket_of(&url).as_deref(),
            Some(Path::new("/run/bitback/live-0123/nbd.sock"))
        );
        assert_eq!(
            reads_of(&url),
            Some(Reads {
                vm: "vm1".into(),
                backup: "20261130T225843Z".into(),
                volume: "vda".into(),
                socket: "/run/bitback/live-0123/nbd.sock".into(),
            })
        );
        // An export name without the point (an older bitback's) is no
        // point to resume.
        assert_eq!(reads_of("nbd+unix:///vda?socket=/run/x/nbd.sock"), None);
        assert_eq!(socket_of("/var/lib/images/base.qcow2"), None);
        assert_eq!(socket_of("nbd+unix:///vda"), None);
    }
}
