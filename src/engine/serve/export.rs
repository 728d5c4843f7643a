//! Serving one backup point over NBD, read-only (or through a throwaway
//! writable overlay, to boot it), with qemu-storage-daemon.

use std::path::PathBuf;

use crate::qemu::blockdev::{Address, Export as BlockExport, Node, Qcow2};
use anyhow::{Context, bail};
use tracing::info;

use crate::engine::chain::{Pick, resolve};
use crate::engine::outcome::BadInput;
use crate::qcow2::{self, CreateOptions};
use crate::qemu::daemon::{Daemon, DaemonSpec, private_dir};
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
    pub backup: Pick,
    pub volume: String,
    pub listen: Listen,
    /// Let clients write (into the throwaway overlay).
    pub writable: bool,
    /// The key of an encrypted backup.
    pub key: Option<crate::engine::key::Key>,
    /// What is checked before the point is served.
    pub checks: crate::engine::check::Checks,
}

/// A running export; dropping it stops the daemon and removes the overlay.
pub struct Export {
    daemon: Daemon,
    /// Keeps prune and consolidate off the exported chain while it serves.
    _readers: Option<crate::repo::ReadLock>,
    /// What a client opens: `nbd+unix:///<volume>?socket=...` or
    /// `nbd://host:port/<volume>`.
    pub url: String,
    pub backup: String,
}

impl Export {
    /// Serves until the daemon exits (it should not) or `stop` resolves.
    pub async fn serve_until(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::select! {
            status = self.daemon.wait() => bail!("qemu-storage-daemon exited: {:?}", status?),
            _ = stop => Ok(()),
        }
    }
}

pub async fn export(repo: &Repo, opts: &ExportOptions) -> anyhow::Result<Export> {
    let readers = repo.read_lock(&opts.vm, "export")?;
    let (manifest, chain) = resolve(
        repo,
        &opts.vm,
        &opts.backup,
        opts.checks,
        std::slice::from_ref(&opts.volume),
    )?;
    let record = manifest
        .volumes
        .iter()
        .find(|v| v.name == opts.volume)
        .context("the volume resolve found")?;
    let top = std::fs::canonicalize(repo.root().join(&record.file))?;
    let top_name = top.to_str().context("backup path is not UTF-8")?;
    let dir = private_dir("export")?;
    let overlay = dir.join("overlay.qcow2");
    if let Err(e) = qcow2::create(
        &overlay,
        &CreateOptions {
            size: record.virtual_size,
            backing: Some(top_name),
            backing_format: Some("qcow2"),
            ..CreateOptions::default()
        },
    ) {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e.into());
    }
    let (addr, url) = match &opts.listen {
        Listen::Socket(path) => (
            Address::Unix { path: path.clone() },
            format!("nbd+unix:///{}?socket={}", opts.volume, path.display()),
        ),
        Listen::Tcp { host, port } => (
            Address::Inet {
                host: host.clone(),
                port: port.to_string(),
            },
            format!("nbd://{host}:{port}/{}", opts.volume),
        ),
    };
    let mut blockdev = Qcow2::over(Node::file(&overlay)).named("export0");
    let mut objects = Vec::new();
    match (&manifest.encryption, &opts.key) {
        (None, _) => {}
        (Some(_), Some(key)) => {
            let files = crate::engine::chain::volume_files(repo, &chain, &record.name)?;
            let backing = crate::engine::chain::encrypted_image(&files, "bitback-key")?;
            blockdev.backing = Some(Some(Box::new(backing.node())));
            objects.push(format!(
                "secret,id=bitback-key,format=raw,file={}",
                key.path().display().to_string().replace(',', ",,")
            ));
        }
        (Some(_), None) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(BadInput(format!(
                "backup {} is encrypted; give its key with --key-file FILE",
                manifest.id
            ))
            .into());
        }
    }
    let spec = DaemonSpec {
        blockdevs: vec![blockdev.node()],
        objects,
        nbd: Some(addr),
        exports: vec![BlockExport::Nbd {
            id: "e0".into(),
            node_name: "export0".into(),
            name: opts.volume.clone(),
            writable: opts.writable,
        }],
        ..DaemonSpec::default()
    };
    let daemon = Daemon::start(dir, &spec).await?;
    info!(url = %url, backup = %manifest.id, "exporting");
    Ok(Export {
        daemon,
        _readers: readers,
        url,
        backup: manifest.id.clone(),
    })
}
