//! Live restores: `restore --live` returns in seconds with one empty qcow2
//! image per volume whose backing file is the point, served read-only over
//! NBD by a qemu-storage-daemon that runs on after bitback
//! ([`super::detached`]); a VM starts on the images at once and reads what
//! it has not written from the backup. `restore --finish` then streams
//! the backup's data into the images in the running VM (`block-stream`),
//! which drops their backing, and ends the export once no image needs it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};
use tracing::{info, warn};

use super::detached::{self, Kind, State};
use super::key::Key;
use super::mount::{Point, Served, ServedFile, Serving};
use super::{BadInput, ProgressSink};
use crate::libvirt::Domain;
use crate::qcow2::{self, CreateOptions};
use crate::qemu::daemon::DaemonSpec;
use crate::qmp::{Qmp, SocketOwner};
use crate::repo::Repo;

/// What to restore live.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    pub vm: String,
    pub backup: Option<String>,
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
}

/// The NBD URL of `volume` on `socket`: a backing file name QEMU opens.
fn export_url(volume: &str, socket: &Path) -> String {
    format!("nbd+unix:///{volume}?socket={}", socket.display())
}

/// The socket of an export URL [`export_url`] wrote, if it is one.
fn socket_of(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("nbd+unix:///")?;
    let (_, query) = rest.split_once('?')?;
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("socket="))
        .map(PathBuf::from)
}

/// Creates the images and starts the export; returns at once.
pub async fn restore_live(repo: &Repo, opts: &LiveOptions) -> anyhow::Result<Served> {
    let (lock, point) = Point::locked(
        repo,
        &opts.vm,
        opts.backup.as_deref(),
        &opts.volumes,
        opts.key.as_ref(),
        "restore --live",
    )?;
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
        repo,
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
    let mut exports = Vec::new();
    for (i, (name, size)) in point.volumes.iter().enumerate() {
        let path = image_of(&serving.target, name);
        let aside = aside_of(&path);
        let url = export_url(name, &socket);
        let made = super::restore::data_ranges(&point.files[i])
            .and_then(|data| new_image(&path, &aside, *size, &url, data.as_deref(), opts));
        if let Err(e) = made.and_then(|()| serving.record(&aside, true)) {
            let _ = std::fs::remove_file(&aside);
            return Err(serving.undo(e));
        }
        placing.push((aside, path.clone()));
        exports.push(json!({
            "type": "nbd", "id": format!("e{i}"), "node-name": format!("vol{i}"),
            "name": name, "writable": false,
        }));
        files.push(ServedFile {
            volume: name.clone(),
            path,
            virtual_size: *size,
            export: Some(url),
        });
    }
    let spec = DaemonSpec {
        nbd: Some(json!({ "type": "unix", "path": socket })),
        exports,
        ..DaemonSpec::default()
    };
    let pid = serving.start(&point, spec, lock)?;
    if let Some(owner) = opts.owner
        && let Err(e) = crate::qemu::daemon::give_to(&socket, owner)
    {
        let _ = detached::stop(&serving.runtime, &serving.state).await;
        return Err(serving.undo(
            anyhow::Error::from(e).context(format!("giving {} to QEMU's user", socket.display())),
        ));
    }
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
    })
}

/// `restore --live --libvirt DOMAIN`: the point's volumes become images
/// at the shut-off domain's disk paths (its qcow2 file disks, named by
/// target device), the domain starts on them (`started` is told), and the
/// streams run to their end ([`finish`]).
pub async fn restore_live_domain(
    repo: &Repo,
    opts: &LiveOptions,
    domain: &Domain,
    progress: Option<&ProgressSink>,
    started: impl FnOnce(&Served),
) -> anyhow::Result<(Served, FinishReport)> {
    let info = domain.info()?;
    if info.running {
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
    let served = restore_live(repo, &opts).await?;
    if let Err(e) = domain.start() {
        return Err(anyhow::Error::from(e).context(format!(
            "starting domain {} on the restored images (they and the export stay: fix it, start the domain, then run bitback restore --finish --libvirt {})",
            domain.name, domain.name
        )));
    }
    started(&served);
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

/// Renames `aside` to `path`: over a file there only when `force`.
fn place(aside: &Path, path: &Path, force: bool) -> anyhow::Result<()> {
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
    /// `streamed`, or `waited` (a stream already running was waited for).
    pub how: &'static str,
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
struct Backed {
    node: String,
    image: String,
    runtime: PathBuf,
}

/// The VM's images backed by a live export under [`detached::base`]: its
/// qcow2 nodes whose header names one as backing file (a VM's devices and
/// a qemu-storage-daemon's nodes alike).
async fn backed_images(qmp: &Qmp) -> anyhow::Result<Vec<Backed>> {
    let nodes = qmp
        .execute_raw("query-named-block-nodes", json!({ "flat": true }))
        .await?;
    let base = detached::base();
    let mut found = Vec::new();
    for n in nodes.as_array().into_iter().flatten() {
        if n["drv"] != "qcow2" {
            continue;
        }
        let Some(backing) = n["backing_file"].as_str() else {
            continue;
        };
        let Some(socket) = socket_of(backing) else {
            continue;
        };
        let Some(runtime) = socket.parent().filter(|p| p.starts_with(&base)) else {
            continue;
        };
        let Some(node) = n["node-name"].as_str() else {
            continue;
        };
        found.push(Backed {
            node: node.to_string(),
            image: n["image"]["filename"]
                .as_str()
                .or_else(|| n["file"].as_str())
                .unwrap_or_default()
                .to_string(),
            runtime: runtime.to_path_buf(),
        });
    }
    Ok(found)
}

/// The job id `--finish` streams `node` with.
fn job_id(node: &str) -> String {
    format!("bitback-stream-{node}")
}

/// Streams every image of the VM behind `qmp` that a live export backs,
/// waits, and ends each export no image needs any more, showing the
/// streams' bytes on `progress`.
pub async fn finish(qmp: &Qmp, progress: Option<&ProgressSink>) -> anyhow::Result<FinishReport> {
    detached::clean_all_dead();
    let backed = backed_images(qmp).await?;
    let mut events = qmp.subscribe();
    let running = qmp.execute_raw("query-block-jobs", Value::Null).await?;
    let running: Vec<String> = running
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| j["device"].as_str().map(String::from))
        .collect();
    let mut volumes = Vec::new();
    for b in &backed {
        b.serving()?;
        let id = job_id(&b.node);
        if running.contains(&id) {
            volumes.push(Finished {
                node: b.node.clone(),
                image: b.image.clone(),
                how: "waited",
            });
            continue;
        }
        qmp.execute_raw(
            "block-stream",
            json!({ "job-id": id, "device": b.node, "auto-dismiss": true }),
        )
        .await
        .with_context(|| format!("starting the stream of {}", b.image))?;
        volumes.push(Finished {
            node: b.node.clone(),
            image: b.image.clone(),
            how: "streamed",
        });
    }
    if let Some(p) = progress {
        p.0.start("streaming the backup into the images", 0);
    }
    // Wait for every job: by events, with a poll of the job list for
    // progress (and for an end whose event came before we listened).
    let mut pending: Vec<String> = volumes.iter().map(|v| job_id(&v.node)).collect();
    let mut failures = Vec::new();
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
                let jobs = qmp.execute_raw("query-block-jobs", Value::Null).await?;
                let jobs = jobs.as_array().cloned().unwrap_or_default();
                let (mut done, mut all) = (0u64, 0u64);
                for j in &jobs {
                    if pending.iter().any(|p| j["device"].as_str() == Some(p)) {
                        done += j["offset"].as_u64().unwrap_or(0);
                        all += j["len"].as_u64().unwrap_or(0);
                    }
                }
                if let Some(p) = progress {
                    p.0.update(done, all);
                }
                pending.retain(|p| jobs.iter().any(|j| j["device"].as_str() == Some(p)));
            }
        }
    }
    if let Some(p) = progress {
        p.0.finish();
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

impl Backed {
    /// Fails, saying what it means, when the export it reads from is gone.
    fn serving(&self) -> anyhow::Result<()> {
        if detached::daemon(&self.runtime).is_none() {
            bail!(
                "{} reads its not-yet-restored data from a live export that is gone ({}): \
                 the VM gets read errors there, and the image cannot be completed from it; \
                 restore the point again with bitback restore",
                self.image,
                self.runtime.display()
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
    for (runtime, state) in detached::all() {
        if state.kind != Kind::Live {
            continue;
        }
        if needed(&state, &runtime) {
            if backed.iter().any(|b| b.runtime == runtime) {
                kept.push(runtime);
            }
        } else {
            detached::stop(&runtime, &state).await?;
            ended.push(runtime);
        }
    }
    Ok((ended, kept))
}

/// [`finish`] for a libvirt domain, with libvirt's own streams (`virsh
/// blockpull`), so that libvirt's view of each disk's chain follows.
pub async fn finish_domain(
    domain: &Domain,
    progress: Option<&ProgressSink>,
) -> anyhow::Result<FinishReport> {
    detached::clean_all_dead();
    let base = detached::base();
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
    let mut volumes = Vec::new();
    for b in &backed {
        b.serving()?;
        let how = if domain.blockjob(&b.node)?.is_some() {
            "waited"
        } else {
            domain
                .blockpull(&b.node)
                .with_context(|| format!("starting the stream of {}", b.image))?;
            "streamed"
        };
        volumes.push(Finished {
            node: b.node.clone(),
            image: b.image.clone(),
            how,
        });
    }
    if let Some(p) = progress {
        p.0.start("streaming the backup into the images", 0);
    }
    loop {
        let (mut done, mut all, mut running) = (0, 0, false);
        for b in &backed {
            if let Some((cur, end)) = domain.blockjob(&b.node)? {
                running = true;
                done += cur;
                all += end;
            }
        }
        if let Some(p) = progress {
            p.0.update(done, all);
        }
        if !running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some(p) = progress {
        p.0.finish();
    }
    // A stream that failed leaves its disk backed by the export.
    let left = backed_disks(&domain.info()?);
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

/// Whether an image of a live restore still reads from its export (its
/// header names the export as backing file).
fn needed(state: &State, runtime: &Path) -> bool {
    let socket = runtime.join("nbd.sock");
    state.files.iter().any(|image| {
        match qcow2::Image::open(image).map(|i| i.hc.backing_file) {
            Ok(Some(backing)) => socket_of(&backing).is_some_and(|s| s == socket),
            Ok(None) => false,
            Err(e) => {
                // An image gone or unreadable: not ours to judge; keep the
                // export for whoever still uses it.
                warn!(image = %image.display(), error = %e, "cannot read a live image's header");
                image.exists()
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_urls_name_their_socket() {
        let url = export_url("vda", Path::new("/run/bitback/live-0123/nbd.sock"));
        assert_eq!(
            url,
            "nbd+unix:///vda?socket=/run/bitback/live-0123/nbd.sock"
        );
        assert_eq!(
            socket_of(&url).as_deref(),
            Some(Path::new("/run/bitback/live-0123/nbd.sock"))
        );
        assert_eq!(socket_of("/var/lib/images/base.qcow2"), None);
        assert_eq!(socket_of("nbd+unix:///vda"), None);
    }
}
