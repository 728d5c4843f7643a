//! Backing up a stopped VM: bitback starts qemu-storage-daemon on the
//! images, runs the same backup as for a running VM, and quits the daemon
//! cleanly so the new checkpoint bitmap is written into each qcow2 v3
//! image for the VM's next start.
//!
//! Each image is opened with the driver its first bytes and its file type
//! call for: qcow2 (encrypted ones with the image key), raw LUKS, or raw;
//! over `host_device` for a block device (LVM, DRBD, a loop device), over
//! `file` otherwise. The image key goes to the daemon as a secret object
//! over QMP, never on its command line.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::backup::{BackupOptions, backup_named};
use super::copy::Cancel;
use super::key::Key;
use crate::qcow2;
use crate::qemu::blockdev::{Node, Qcow2};
use crate::qemu::commands;
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
    image_key: Option<&Key>,
    cancel: Cancel,
) -> anyhow::Result<Manifest> {
    let images = if images.is_empty() {
        let state = repo.load_state(opts.vm())?.with_context(|| {
            format!(
                "vm {} has no recorded volumes; name its images with --image VOLUME=PATH",
                opts.vm()
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
    let mut blockdevs = Vec::new();
    let mut needs_key = Vec::new();
    for (i, image) in resolved.iter().enumerate() {
        let (blockdev, encrypted) = blockdev(&format!("bb-v{i}"), &image.path)?;
        if encrypted {
            needs_key.push(image.volume.as_str());
        }
        blockdevs.push(blockdev);
    }
    if !needs_key.is_empty() && image_key.is_none() {
        return Err(super::outcome::BadInput(format!(
            "volume {} of the stopped vm is encrypted; give its key with --image-key-file FILE",
            needs_key.join(", ")
        ))
        .into());
    }
    let spec = DaemonSpec {
        qmp: true,
        ..DaemonSpec::default()
    };
    let daemon = Daemon::start(private_dir("qsd")?, &spec).await?;
    let qmp = daemon.qmp.clone().context("the daemon has no monitor")?;
    if let Some(key) = image_key.filter(|_| !needs_key.is_empty()) {
        commands::add_secret(&qmp, KEY_ID, &key.base64())
            .await
            .context("handing the image key to qemu-storage-daemon")?;
    }
    for (blockdev, image) in blockdevs.into_iter().zip(&resolved) {
        commands::add_node(&qmp, &blockdev).await.with_context(|| {
            format!(
                "opening image {} of volume {}",
                image.path.display(),
                image.volume
            )
        })?;
    }
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

/// The id of the image key's secret object in the daemon.
const KEY_ID: &str = "bb-image-key";

/// The `blockdev-add` arguments that open `path` as node `node`, and
/// whether the image is encrypted.
fn blockdev(node: &str, path: &Path) -> anyhow::Result<(Node, bool)> {
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let protocol = match meta.file_type().is_block_device() {
        true => Node::HostDevice {
            filename: path.into(),
        },
        false => Node::file(path),
    };
    let mut magic = [0u8; 6];
    let mut opened =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let got = opened
        .read(&mut magic)
        .with_context(|| format!("reading {}", path.display()))?;
    if got >= 4 && magic[..4] == *b"QFI\xfb" {
        let image =
            qcow2::Image::open(path).with_context(|| format!("reading {}", path.display()))?;
        let encrypted = image.encrypted();
        let secret = encrypted.then_some(KEY_ID);
        let image = Qcow2::over(protocol).named(node).encrypted(secret);
        return Ok((image.node(), encrypted));
    }
    let node_name = Some(node.to_string());
    let file = Box::new(protocol);
    if got == 6 && magic == *b"LUKS\xba\xbe" {
        let key_secret = KEY_ID.into();
        return Ok((
            Node::Luks {
                node_name,
                file,
                key_secret,
            },
            true,
        ));
    }
    Ok((Node::Raw { node_name, file }, false))
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

/// The disks of a shut-off domain to back up: writable disks with a file
/// or block device source, named by target device.
pub fn domain_images(
    domain: &str,
    info: &crate::libvirt::DomainInfo,
    exclude: &[String],
) -> anyhow::Result<Vec<StoppedImage>> {
    let mut images = Vec::new();
    for disk in &info.disks {
        if disk.device != "disk" || disk.read_only || exclude.contains(&disk.target) {
            continue;
        }
        match (&disk.source, disk.kind.as_str()) {
            (Some(path), "file" | "block") => images.push(StoppedImage {
                volume: disk.target.clone(),
                path: path.clone(),
            }),
            _ => {
                return Err(super::outcome::BadInput(format!(
                    "disk {} of domain {domain} is a {} disk; bitback backs up file and block disks \
                     of a shut-off domain; leave it out with --exclude {}",
                    disk.target, disk.kind, disk.target
                ))
                .into());
            }
        }
    }
    if images.is_empty() {
        return Err(
            super::outcome::BadInput(format!("domain {domain} has no writable disk")).into(),
        );
    }
    Ok(images)
}
