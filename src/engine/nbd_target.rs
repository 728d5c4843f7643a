//! The NBD data path: a backup job's target is QEMU's `nbd` driver talking
//! to bitback's own NBD server ([`crate::nbd`]), and bitback writes the
//! backup file itself with a streaming qcow2 writer ([`qcow2::Stream`]).
//! QEMU still decides what to copy (the job, its bitmaps, the one
//! transaction); only where the bytes go changes.
//!
//! QEMU reaches the server through a connected socket passed over QMP
//! (`getfd`, then `server: {type: fd}`), so an unprivileged QEMU (libvirt's)
//! needs no path; a qemu-storage-daemon, which has no `getfd`, connects to
//! a socket in a private directory instead, and so does libvirt's QEMU
//! behind libvirt's QMP proxy (which passes no socket), the directory then
//! given to QEMU's user. The file is complete once QEMU
//! closed the node (its client disconnects) and [`Server::finish`] wrote
//! the tables.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use tokio::task::JoinHandle;
use tracing::warn;

use super::StreamTo;
use crate::cluster_map;
use crate::nbd::{self, Served};
use crate::qcow2::{self, CreateOptions, Stream};
use crate::qemu::blockdev::{Address, Node};
use crate::qemu::{commands, daemon};
use crate::qmp::Qmp;

/// The export's name (one export per connection).
const EXPORT: &str = "disk";

/// One target's server, from the node's opening to the file's end.
pub(super) struct Server {
    pub node: String,
    handle: JoinHandle<(Result<Served, nbd::Error>, Stream)>,
    upload: Option<Upload>,
    /// The private directory of a listening socket (qemu-storage-daemon).
    socket_dir: Option<PathBuf>,
}

/// How bitback writes a target.
pub(super) struct Writer {
    /// zstd clusters at this level.
    pub compress: Option<i32>,
    /// A per-cluster digest map beside the file.
    pub map: bool,
    /// Store only clusters that differ from this (an incremental by
    /// content).
    pub baseline: Option<std::sync::Arc<crate::cluster_map::Baseline>>,
    /// Upload the file as it is written, under this key.
    pub upload: Option<(Arc<StreamTo>, String)>,
}

/// A file's upload as it is written.
pub(super) struct Upload {
    feed: crate::s3::Feed,
    to: Arc<StreamTo>,
    key: String,
}

/// Creates `path` as a streaming image of `opts` (with its cluster map
/// beside it, [`cluster_map::path_for`], when asked), starts serving it,
/// and opens it in QEMU as node `node` (driver `nbd`).
pub(super) async fn open(
    qmp: &Qmp,
    node: &str,
    path: &Path,
    opts: &CreateOptions<'_>,
    writer: &Writer,
) -> anyhow::Result<Server> {
    let mut stream =
        Stream::create(path, opts).with_context(|| format!("creating {}", path.display()))?;
    if let Some(level) = writer.compress {
        stream.compress(level)?;
    }
    if let Some(baseline) = &writer.baseline {
        stream.only_changes(baseline.clone())?;
    }
    if writer.map {
        let map = cluster_map::path_for(path);
        stream
            .keep_map(&map)
            .with_context(|| format!("creating {}", map.display()))?;
    }
    let upload = match &writer.upload {
        Some((to, key)) => feed(to, key, path).await,
        None => None,
    };
    if let Some(u) = &upload {
        stream.tap(u.feed.tap());
    }
    let (conn, server_addr, socket_dir) = if qmp.named_fds() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .context("making the socket pair for QEMU's NBD client")?;
        match qmp.getfd(node, theirs.as_fd()).await {
            Ok(()) => {
                ours.set_nonblocking(true)?;
                let conn = tokio::net::UnixStream::from_std(ours)?;
                (
                    Connection::Ready(conn),
                    Address::Fd { str: node.into() },
                    None,
                )
            }
            Err(e) if e.is_command_not_found() => listen(node, None)?,
            Err(e @ crate::qmp::Error::Disconnected { .. }) => {
                return Err(anyhow!(e).context("passing the NBD socket to QEMU"));
            }
            // A relay that drops passed descriptors: QEMU connects by path.
            Err(e) => {
                warn!(node, error = %e, "QEMU did not take the NBD socket (getfd); it connects to one in a private directory instead");
                listen(node, None)?
            }
        }
    } else {
        listen(node, qmp.socket_owner())?
    };
    let handle = tokio::spawn(async move {
        let conn = match conn {
            Connection::Ready(conn) => Ok(conn),
            Connection::Listening(listener) => listener.accept().await.map(|(c, _)| c),
        };
        match conn {
            Ok(conn) => nbd::serve(conn, EXPORT, stream).await,
            Err(e) => (Err(nbd::Error::Io(e)), stream),
        }
    });
    let server = Server {
        node: node.to_string(),
        handle,
        upload,
        socket_dir,
    };
    let target = Node::Nbd {
        node_name: node.into(),
        export: EXPORT.into(),
        server: server_addr,
        read_only: false,
    };
    let added = commands::add_node(qmp, &target).await;
    if let Err(e) = added {
        server.abort();
        return Err(anyhow!(e).context("opening the NBD target in QEMU"));
    }
    Ok(server)
}

/// Begins the upload of the file at `path` as `key`, fed as it is
/// written. A store that does not take it costs nothing but the feed:
/// the file goes up after the backup.
async fn feed(to: &Arc<StreamTo>, key: &str, path: &Path) -> Option<Upload> {
    let (to, key, path) = (to.clone(), key.to_string(), path.to_path_buf());
    let begun = tokio::task::spawn_blocking(move || {
        let feed = to.bucket.feed(&key, &path, to.retention.as_ref());
        feed.map(|feed| Upload { feed, to, key })
    })
    .await;
    match begun.map_err(anyhow::Error::from).and_then(|b| Ok(b?)) {
        Ok(upload) => Some(upload),
        Err(e) => {
            warn!(
                error = format!("{e:#}"),
                "the file is not uploaded as it is written: it goes up after the backup"
            );
            None
        }
    }
}

enum Connection {
    Ready(tokio::net::UnixStream),
    Listening(tokio::net::UnixListener),
}

/// A listening socket in a new private directory, which QEMU can reach
/// when its user is `owner` (libvirt's QEMU behind its QMP proxy).
fn listen(
    node: &str,
    owner: Option<crate::qmp::SocketOwner>,
) -> anyhow::Result<(Connection, Address, Option<PathBuf>)> {
    let dir = daemon::socket_dir(&format!("bitback-nbd-{}-{node}", std::process::id()), owner)?;
    let socket = dir.join("nbd.sock");
    let listened = tokio::net::UnixListener::bind(&socket)
        .map_err(anyhow::Error::from)
        .and_then(|listener| {
            if let Some(owner) = owner {
                daemon::give_to(&socket, owner)?;
            }
            Ok(listener)
        });
    match listened {
        Ok(listener) => Ok((
            Connection::Listening(listener),
            Address::Unix { path: socket },
            Some(dir),
        )),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e.context(format!("listening on {}", socket.display())))
        }
    }
}

impl Server {
    /// After QEMU closed the node: waits for the connection's end and
    /// completes the file (tables, header, sync). Fails when the
    /// connection broke or a request failed: the file is then not a
    /// complete backup.
    pub(super) async fn finish(mut self) -> anyhow::Result<(qcow2::Stream, Option<Upload>)> {
        let node = self.node.clone();
        let upload = self.upload.take();
        let (served, stream) =
            match tokio::time::timeout(std::time::Duration::from_secs(60), self.handle).await {
                Ok(joined) => joined.context("the NBD server task")?,
                Err(_) => bail!("QEMU did not disconnect from the NBD target {node} within 60 s"),
            };
        if let Some(dir) = &self.socket_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        let served = served.with_context(|| format!("the NBD connection of {node}"))?;
        tracing::debug!(
            node,
            writes = served.writes,
            bytes = served.bytes_written,
            zero_bytes = served.zero_bytes,
            "NBD connection closed"
        );
        if served.failed > 0 {
            bail!(
                "{} requests to the NBD target {node} failed; the file is not complete",
                served.failed
            );
        }
        Ok((stream, upload))
    }

    /// Ends the server without a file (the run failed).
    pub(super) fn abort(&self) {
        self.handle.abort();
        if let Some(dir) = &self.socket_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Writes the tables of a finished stream and completes its digest
/// (blocking I/O, off the runtime's threads); then the last parts of its
/// upload, when it went up as written. An upload that fails is only
/// logged: the file goes up after the backup.
pub(super) async fn complete(
    stream: Stream,
    upload: Option<Upload>,
) -> anyhow::Result<qcow2::Finished> {
    let path = stream.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let done = stream.finish()?;
        if let Some(Upload { feed, to, key }) = upload {
            match feed.finish(done.len) {
                Ok(len) => to.went_up(&key, len),
                Err(e) => {
                    warn!(key, error = %e, "the file's upload as it was written failed: it goes up after the backup");
                }
            }
        }
        Ok::<_, qcow2::Error>(done)
    })
    .await?
    .with_context(|| format!("completing {}", path.display()))
}
