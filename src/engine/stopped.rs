//! Backing up a stopped VM: bitback starts qemu-storage-daemon on the
//! images, runs the same backup as for a running VM, and quits the daemon
//! cleanly so the new checkpoint bitmap is written into each image for the
//! VM's next start.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::json;

use super::backup::{BackupOptions, Cancel, backup_named};
use crate::qcow2;
use crate::qemu::daemon::{Daemon, DaemonSpec, private_dir};
use crate::repo::{self, Manifest, Repo, VmLock};

/// One image of a stopped VM, and the volume name it is backed up as.
#[derive(Debug, Clone)]
pub struct StoppedImage {
    pub volume: String,
    pub path: PathBuf,
}

/// Backs up a stopped VM's images. With no images given, uses the volumes
/// recorded in the VM's state.
pub async fn backup_stopped(
    repo: &Repo,
    lock: &VmLock,
    opts: &BackupOptions,
    images: &[StoppedImage],
    cancel: Cancel,
) -> anyhow::Result<Manifest> {
    let images = if images.is_empty() {
        let state = repo.load_state(&opts.vm)?.with_context(|| {
            format!(
                "vm {} has no recorded volumes; name its images with --image VOLUME=PATH",
                opts.vm
            )
        })?;
        state
            .volumes
            .iter()
            .map(|v| StoppedImage {
                volume: v.name.clone(),
                path: v.image_file.clone().into(),
            })
            .collect()
    } else {
        images.to_vec()
    };
    let mut resolved = Vec::new();
    for image in &images {
        repo::check_name("volume", &image.volume)?;
        let path = std::fs::canonicalize(&image.path).with_context(|| {
            format!("image {} of volume {}", image.path.display(), image.volume)
        })?;
        check_not_in_use(&path)?;
        resolved.push(StoppedImage {
            volume: image.volume.clone(),
            path,
        });
    }
    let spec = DaemonSpec {
        qmp: true,
        blockdevs: resolved
            .iter()
            .enumerate()
            .map(|(i, image)| {
                json!({
                    "driver": "qcow2",
                    "node-name": format!("bb-v{i}"),
                    "file": { "driver": "file", "filename": image.path },
                })
            })
            .collect(),
        ..DaemonSpec::default()
    };
    let daemon = Daemon::start(private_dir("qsd")?, &spec).await?;
    let qmp = daemon.qmp.clone().context("the daemon has no monitor")?;
    let renames: Vec<(String, String)> = resolved
        .iter()
        .enumerate()
        .map(|(i, image)| (format!("bb-v{i}"), image.volume.clone()))
        .collect();
    let result = backup_named(&qmp, repo, lock, opts, cancel, &renames).await;
    drop(qmp);
    let stopped = daemon.quit().await;
    let manifest = result?;
    stopped.context("stopping qemu-storage-daemon (the new checkpoint may not be saved)")?;
    Ok(manifest)
}

fn check_not_in_use(path: &Path) -> anyhow::Result<()> {
    // A write lock needs a descriptor open for writing.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    match qcow2::lock_out_qemu(&file) {
        Ok(_) => Ok(()),
        Err(qcow2::Error::InUse) => bail!(
            "image {} is in use by a running QEMU; back the VM up through its QMP socket (--qmp)",
            path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("checking {}", path.display())),
    }
}
