//! Serving one backup point over NBD, read-only (or through a throwaway
//! writable overlay, to boot it), with qemu-storage-daemon.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tracing::info;

use super::BadInput;
use super::restore::resolve;
use crate::qcow2::{self, CreateOptions};
use crate::repo::Repo;

#[derive(Debug, Clone)]
pub enum Listen {
    Socket(PathBuf),
    /// TCP port on `host`.
    Tcp {
        host: String,
        port: u16,
    },
}

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub vm: String,
    pub backup: Option<String>,
    pub volume: String,
    pub listen: Listen,
    /// Let clients write (into the throwaway overlay).
    pub writable: bool,
}

/// A running export; dropping it stops the daemon and removes the overlay.
pub struct Export {
    child: tokio::process::Child,
    dir: PathBuf,
    /// What a client opens: `nbd+unix:///<volume>?socket=...` or
    /// `nbd://host:port/<volume>`.
    pub url: String,
    pub backup: String,
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Export {
    /// Waits until the daemon exits (it should not) or `stop` resolves.
    pub async fn serve_until(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::select! {
            status = self.child.wait() => bail!("qemu-storage-daemon exited: {:?}", status?),
            _ = stop => {
                let _ = self.child.kill().await;
                Ok(())
            }
        }
    }
}

pub async fn export(repo: &Repo, opts: &ExportOptions) -> anyhow::Result<Export> {
    let (manifest, chain) = resolve(repo, &opts.vm, opts.backup.as_deref(), false)?;
    let record = manifest
        .volumes
        .iter()
        .find(|v| v.name == opts.volume)
        .ok_or_else(|| {
            BadInput(format!(
                "backup {} has no volume {}; it has: {}",
                manifest.id,
                opts.volume,
                manifest
                    .volumes
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    let _ = chain;
    let top = std::fs::canonicalize(repo.root().join(&record.file))?;
    let dir = std::env::temp_dir().join(format!(
        "bitback-export-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir(&dir)?;
    let overlay = dir.join("overlay.qcow2");
    let top_name = top.to_str().context("backup path is not UTF-8")?;
    qcow2::create(
        &overlay,
        &CreateOptions {
            size: record.virtual_size,
            backing: Some(top_name),
            backing_format: Some("qcow2"),
            ..CreateOptions::default()
        },
    )?;
    let (addr, url) = match &opts.listen {
        Listen::Socket(path) => (
            json!({"type": "unix", "path": path}),
            format!("nbd+unix:///{}?socket={}", opts.volume, path.display()),
        ),
        Listen::Tcp { host, port } => (
            json!({"type": "inet", "host": host, "port": port.to_string()}),
            format!("nbd://{host}:{port}/{}", opts.volume),
        ),
    };
    let blockdev = json!({
        "driver": "qcow2", "node-name": "export0",
        "file": {"driver": "file", "filename": overlay},
    });
    let mut child = tokio::process::Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(blockdev.to_string())
        .arg("--nbd-server")
        .arg(json!({ "addr": addr }).to_string())
        .arg("--export")
        .arg(format!(
            "type=nbd,id=e0,node-name=export0,name={},writable={}",
            opts.volume,
            if opts.writable { "on" } else { "off" }
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting qemu-storage-daemon (install qemu-utils)")?;
    // Ready when it listens: a unix socket appears, or a TCP connect works.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ready = match &opts.listen {
            Listen::Socket(path) => path.exists(),
            Listen::Tcp { host, port } => tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .is_ok(),
        };
        if ready {
            break;
        }
        if let Some(status) = child.try_wait()? {
            let mut err = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = pipe.read_to_string(&mut err).await;
            }
            let _ = std::fs::remove_dir_all(&dir);
            bail!("qemu-storage-daemon exited ({status}): {}", err.trim());
        }
        if Instant::now() > deadline {
            let _ = std::fs::remove_dir_all(&dir);
            bail!("the NBD export did not come up within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    info!(url = %url, backup = %manifest.id, "exporting");
    Ok(Export {
        child,
        dir,
        url,
        backup: manifest.id.clone(),
    })
}
