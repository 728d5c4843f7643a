//! Backing up a stopped VM: bitback starts qemu-storage-daemon on the
//! images, runs the same backup as for a running VM, and quits the daemon
//! cleanly so the new checkpoint bitmap is written into each image for the
//! VM's next start.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tracing::{info, warn};

use super::backup::{BackupOptions, Cancel, backup_named};
use crate::qcow2;
use crate::qmp::{Endpoint, Options, Qmp};
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
    let daemon = Daemon::start(&resolved).await?;
    let renames: Vec<(String, String)> = resolved
        .iter()
        .enumerate()
        .map(|(i, image)| (format!("bb-v{i}"), image.volume.clone()))
        .collect();
    let result = backup_named(&daemon.qmp, repo, lock, opts, cancel, &renames).await;
    let stopped = daemon.stop().await;
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

struct Daemon {
    child: tokio::process::Child,
    qmp: Qmp,
    dir: PathBuf,
}

impl Daemon {
    async fn start(images: &[StoppedImage]) -> anyhow::Result<Daemon> {
        let dir = std::env::temp_dir().join(format!(
            "bitback-qsd-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let socket = dir.join("qmp.sock");
        let mut cmd = tokio::process::Command::new("qemu-storage-daemon");
        cmd.arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=bitback-mon",
                socket.display()
            ))
            .args(["--monitor", "chardev=bitback-mon"]);
        for (i, image) in images.iter().enumerate() {
            let spec = json!({
                "driver": "qcow2",
                "node-name": format!("bb-v{i}"),
                "file": { "driver": "file", "filename": image.path },
            });
            cmd.arg("--blockdev").arg(spec.to_string());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            let _ = std::fs::remove_dir_all(&dir);
            anyhow::anyhow!(e).context(
                "starting qemu-storage-daemon (install qemu-utils 7.2 or newer, which has it)",
            )
        })?;
        info!(
            pid = child.id(),
            "started qemu-storage-daemon on the stopped vm's images"
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr).await;
                }
                let _ = std::fs::remove_dir_all(&dir);
                bail!("qemu-storage-daemon exited ({status}): {}", stderr.trim());
            }
            if socket.exists() {
                let options = Options::default();
                if let Ok(qmp) = Qmp::connect_with(Endpoint::Unix(socket.clone()), options).await {
                    return Ok(Daemon { child, qmp, dir });
                }
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                let _ = std::fs::remove_dir_all(&dir);
                bail!("qemu-storage-daemon did not open its monitor within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Quits the daemon so it closes the images cleanly; kills it by pid
    /// if it does not exit.
    async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.qmp.execute_raw("quit", Value::Null).await;
        let exited = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await;
        let _ = std::fs::remove_dir_all(&self.dir);
        match exited {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => bail!("qemu-storage-daemon exited with {status}"),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                warn!("qemu-storage-daemon did not quit; killing it");
                let _ = self.child.kill().await;
                bail!("qemu-storage-daemon did not quit within 60 s")
            }
        }
    }
}
