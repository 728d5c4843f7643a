//! Serving a point that lies in a bucket (`mount`, `restore --live` and
//! `export` with `--repo s3://`): bitback's own NBD server reads each
//! volume through its chain of object versions, every cluster checked
//! against the chain's cluster maps before it is given ([`ServedVolume`]).
//!
//! `export` runs the server in its own process, in the foreground. A mount
//! or a live restore outlives bitback: its qemu-storage-daemon (the FUSE
//! files, or the NBD exports images read) reads the volumes from a
//! `bitback serve-bucket` process ([`Server`]) on `bucket.sock` in its
//! runtime directory. That process opens the point first and says what it
//! found; only then is the runtime directory made and its socket bound.
//! It ends by itself once the daemon's connections end (however the daemon
//! ends), so it never outlives what it serves; and at once when the
//! set-up that started it dies before any client came.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

use crate::cluster_map::Baseline;
use crate::engine::chain::{Pick, volume_records};
use crate::engine::native::{ChainSource, Mapped, Mismatch, plan_sources};
use crate::engine::objects::{Kept, Objects, Sources, UsedVersion, Windowed, chain_sources, proof};
use crate::repo::{Bucket, Manifest};

/// The socket a [`Server`] listens on, in its runtime directory.
pub const SOCKET: &str = "bucket.sock";
/// Its log, in the runtime directory.
const LOG: &str = "bucket.log";
/// How long a server waits for its first client.
const FIRST_CLIENT: Duration = Duration::from_secs(60);

/// A point in a bucket served where it lies (`mount`, `restore --live`,
/// `export` with `--repo s3://`): each volume read at any offset through
/// its chain of object versions.
pub struct ServedPoint {
    pub manifest: Manifest,
    pub volumes: Vec<Arc<ServedVolume>>,
}

/// One volume of a [`ServedPoint`].
pub struct ServedVolume {
    pub name: String,
    pub virtual_size: u64,
    /// The files of its chain, full first, each with its version.
    pub versions: Vec<UsedVersion>,
    mapped: Mapped<'static>,
    /// The chain's cluster maps laid over each other; none where the chain
    /// has none (its files' digests were read whole when it was opened).
    check: Option<Arc<Baseline>>,
    bucket: &'static Bucket,
    vm: String,
    /// Each file of the chain (full first): the point it belongs to and
    /// its digest, for a damage record.
    files: Vec<(String, crate::digest::Digest)>,
    /// A damage record was written (one per volume and serve is enough).
    recorded: std::sync::atomic::AtomicBool,
}

/// Opens `vm`'s point `pick` in `bucket` for serving, its `wanted`
/// volumes (all when empty): the chain of each checked as a restore
/// checks it (the structural rules, and its cluster maps read, or where
/// it has none its files' digests read whole), ready to read.
pub fn serve_from_bucket(
    bucket: &'static Bucket,
    vm: &str,
    pick: &Pick,
    wanted: &[String],
) -> anyhow::Result<ServedPoint> {
    let objects = Objects::load(bucket, vm)?;
    let chain = objects.pick(vm, pick, wanted)?;
    let m = chain.last().context("a chain of no point")?.clone();
    let mut volumes = Vec::new();
    for v in m
        .volumes
        .iter()
        .filter(|v| wanted.is_empty() || wanted.contains(&v.name))
    {
        let opened = (|| {
            let records = volume_records(&chain, &v.name)?;
            let (sources, versions) = chain_sources(&objects, &records)?;
            let check = proof(&objects, &chain, v, &records, &sources)?;
            // Served reads come small and near each other: each object is
            // read in windows, a few kept for the whole chain.
            let kept = Kept::default();
            let sources: Sources<'static> = sources
                .into_iter()
                .enumerate()
                .map(|(i, s)| Box::new(Windowed::new(s, i, kept.clone())) as Box<dyn ChainSource>)
                .collect();
            let files = records
                .iter()
                .map(|r| {
                    let point = r.file.split('/').nth(1).unwrap_or_default().to_string();
                    (point, r.digest)
                })
                .collect();
            let mapped = plan_sources(sources)?
                .context("an encrypted file in a chain that is not")?
                .for_reads();
            anyhow::Ok(ServedVolume {
                name: v.name.clone(),
                virtual_size: v.virtual_size,
                versions,
                mapped,
                check,
                bucket,
                vm: vm.to_string(),
                files,
                recorded: Default::default(),
            })
        })()
        .with_context(|| format!("opening volume {} of backup {}", v.name, m.id))?;
        volumes.push(Arc::new(opened));
    }
    info!(vm, backup = %m.id, volumes = volumes.len(), "serving from the bucket");
    Ok(ServedPoint {
        manifest: m,
        volumes,
    })
}

impl ServedVolume {
    /// The volume's bytes at `offset`. A cluster that does not match its
    /// cluster map is an I/O error (never other bytes), and leaves a
    /// damage record in the bucket naming the file that gave it.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.mapped
            .read_at(offset, buf, self.virtual_size, self.check.as_deref())
            .map_err(|e| {
                let text = format!("{e:#}");
                match e.downcast_ref::<Mismatch>() {
                    Some(m) => self.damaged(m, &text),
                    None => tracing::error!(vm = %self.vm, volume = %self.name, error = %text, "a read from the bucket failed"),
                }
                std::io::Error::other(text)
            })
    }

    /// The guest ranges that hold data, sorted and merged.
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        self.mapped.data_ranges()
    }

    /// Notes damage found by a read: logged, and recorded in the bucket
    /// (`<vm>/.damaged/<point>.<volume>.json`) once per serve.
    fn damaged(&self, m: &Mismatch, text: &str) {
        let names = self.mapped.names();
        // A cluster no file gives was hidden by the newest file's tables.
        let file = m.file.unwrap_or(self.files.len().saturating_sub(1));
        let name = names.get(file).cloned().unwrap_or_default();
        tracing::error!(vm = %self.vm, volume = %self.name, file = %name, "{text}: the reader gets an I/O error");
        if self
            .recorded
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let Some((point, digest)) = self.files.get(file) else {
            return;
        };
        let problem = format!("{name}: {text} (found by a read of a served point)");
        if let Err(e) =
            crate::repo::record_damage(self.bucket, &self.vm, point, &self.name, digest, &problem)
        {
            tracing::warn!(error = %e, "the damage could not be recorded in the bucket");
        }
    }
}

/// A volume as an NBD export: read-only, each read through its chain.
struct VolumeExport(Arc<ServedVolume>);

impl crate::nbd::Export for VolumeExport {
    fn size(&self) -> u64 {
        self.0.virtual_size
    }

    fn read_only(&self) -> bool {
        true
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(nix::libc::EPERM))
    }

    fn write_zeroes(&mut self, _offset: u64, _len: u64) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(nix::libc::EPERM))
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, buf)
    }
}

/// Resolves once this process's parent is no longer `parent` (it died,
/// and this one was handed to another).
async fn gone(parent: nix::unistd::Pid) {
    while nix::unistd::getppid() == parent {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Where a server takes its clients.
pub enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

/// When a server stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// When told (the future given to [`serve`]).
    Stopped,
    /// Once it has had clients and none is left, or none came within a
    /// minute, or `starter` (the process that set the serve up) died
    /// before any came: a serve behind a qemu-storage-daemon.
    ClientsGone { starter: nix::unistd::Pid },
}

/// Serves `point`'s volumes, each under its name, to every client of
/// `listener`, until `until` says (or `stop` resolves).
pub async fn serve(
    listener: Listener,
    point: &ServedPoint,
    until: Until,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let exports: Vec<(String, Arc<ServedVolume>)> = point
        .volumes
        .iter()
        .map(|v| (v.name.clone(), v.clone()))
        .collect();
    let (done, mut ended) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut clients = 0usize;
    let mut had = false;
    tokio::pin!(stop);
    loop {
        // A serve whose set-up died (a mount killed before its daemon
        // started) has no client coming: it ends at once.
        let first = async {
            match (until, had) {
                (Until::ClientsGone { starter }, false) => tokio::select! {
                    _ = tokio::time::sleep(FIRST_CLIENT) => {
                        format!("no client came within {} s", FIRST_CLIENT.as_secs())
                    }
                    _ = gone(starter) => {
                        format!("the process that started it ({starter}) is gone, and no client came")
                    }
                },
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut stop => return Ok(()),
            why = first => {
                warn!("{why}; the serve ends");
                return Ok(());
            }
            Some(()) = ended.recv() => {
                clients -= 1;
                if matches!(until, Until::ClientsGone { .. }) && clients == 0 {
                    info!("the last client is gone; the serve ends");
                    return Ok(());
                }
            }
            accepted = accept(&listener) => {
                let conn = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        warn!(error = %e, "accepting an NBD client failed");
                        continue;
                    }
                };
                clients += 1;
                had = true;
                let offered = exports
                    .iter()
                    .map(|(name, v)| (name.clone(), VolumeExport(v.clone())))
                    .collect();
                let done = done.clone();
                tokio::spawn(async move {
                    if let Err(e) = crate::nbd::serve_one_of(conn, offered).await {
                        warn!(error = %e, "an NBD client's connection ended badly");
                    }
                    let _ = done.send(());
                });
            }
        }
    }
}

/// A client's connection, either kind.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

async fn accept(listener: &Listener) -> std::io::Result<Box<dyn Conn>> {
    Ok(match listener {
        Listener::Unix(l) => Box::new(l.accept().await?.0),
        Listener::Tcp(l) => Box::new(l.accept().await?.0),
    })
}

/// What a server opened: the point, and each volume's size, data ranges
/// (a live image marks the rest as zeros) and the object versions read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Opened {
    pub manifest: Manifest,
    pub volumes: Vec<OpenedVolume>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenedVolume {
    pub name: String,
    pub virtual_size: u64,
    pub data: Vec<(u64, u64)>,
    pub versions: Vec<(String, String)>,
}

impl Opened {
    pub fn of(point: &ServedPoint) -> Opened {
        Opened {
            manifest: point.manifest.clone(),
            volumes: point
                .volumes
                .iter()
                .map(|v| OpenedVolume {
                    name: v.name.clone(),
                    virtual_size: v.virtual_size,
                    data: v.data_ranges(),
                    versions: v
                        .versions
                        .iter()
                        .map(|UsedVersion { file, version }| (file.clone(), version.clone()))
                        .collect(),
                })
                .collect(),
        }
    }
}

/// Which point a server opens, and in which bucket.
#[derive(Debug, Clone)]
pub struct Source {
    /// `s3://BUCKET/PREFIX`.
    pub url: String,
    /// `--s3-endpoint`, when given (else the environment's).
    pub endpoint: Option<String>,
    pub vm: String,
    pub backup: Pick,
    pub volumes: Vec<String>,
}

/// A `bitback serve-bucket` process that has opened its point and waits
/// to be told where to listen ([`Server::listen`]); dropped before that,
/// it ends.
pub struct Server {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    pub opened: Opened,
    /// It listens: it serves on after bitback, not to be waited for.
    listening: bool,
}

impl Server {
    /// Starts the server of `source` (in a session of its own: it serves
    /// on after bitback) and waits until it has opened the point.
    pub fn open(source: &Source) -> anyhow::Result<Server> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().context("finding bitback's own executable")?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("serve-bucket")
            .arg("--repo")
            .arg(&source.url)
            .arg("--vm")
            .arg(&source.vm)
            .arg("--backup")
            .arg(source.backup.id().unwrap_or("latest"));
        if let Some(endpoint) = &source.endpoint {
            cmd.arg("--s3-endpoint").arg(endpoint);
        }
        for v in &source.volumes {
            cmd.arg("--volume").arg(v);
        }
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // SAFETY: setsid(2) is async-signal-safe; the closure runs in the
        // child between fork and exec and touches nothing else.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("starting bitback serve-bucket")?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let mut stdout = std::io::BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line.trim().is_empty() {
            bail!("{}", failure(&mut child));
        }
        let opened: Opened = serde_json::from_str(&line)
            .with_context(|| format!("the server said {line:?}, not what it opened"))?;
        Ok(Server {
            child,
            stdout,
            opened,
            listening: false,
        })
    }

    /// Tells the server to listen on [`SOCKET`] in runtime directory
    /// `dir` (its log goes there too); returns its pid and the socket
    /// once it listens.
    pub fn listen(mut self, dir: &Path) -> anyhow::Result<(u32, PathBuf)> {
        let mut stdin = self.child.stdin.take().context("the server's stdin")?;
        let dir_text = dir.to_str().context("the runtime directory is not UTF-8")?;
        writeln!(stdin, "{dir_text}")?;
        drop(stdin);
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.trim() != "listening" {
            bail!("{}", failure(&mut self.child));
        }
        self.listening = true;
        Ok((self.child.id(), dir.join(SOCKET)))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.listening {
            return;
        }
        // Told nothing, a server ends (its stdin closes); reap it.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Ends the server of pid `pid` (SIGTERM), if that pid is still a
/// `bitback serve-bucket`: a set-up that failed after it listened.
pub fn end_server(pid: u32) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if cmdline.split(|b| *b == 0).any(|a| a == b"serve-bucket") {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// Why a server ended before it served: its last words.
fn failure(child: &mut std::process::Child) -> String {
    let mut said = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut said);
    }
    let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
    let last: Vec<&str> = said
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.strip_prefix("bitback: ").unwrap_or(l))
        .collect();
    match last.last() {
        Some(line) => line.to_string(),
        None => format!("bitback serve-bucket ended ({status}) without a word"),
    }
}

/// The body of `bitback serve-bucket`: says what it opened (a JSON line),
/// reads the runtime directory from stdin, listens there, says
/// `listening`, and serves until its clients are gone.
pub async fn run_server(point: ServedPoint) -> anyhow::Result<()> {
    // The set-up waits for the line below: it is alive now.
    let starter = nix::unistd::getppid();
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &Opened::of(&point))?;
    writeln!(out)?;
    out.flush()?;
    drop(out);
    let mut dir = String::new();
    std::io::stdin().lock().read_line(&mut dir)?;
    let dir = PathBuf::from(dir.trim());
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    let socket = dir.join(SOCKET);
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("listening on {}", socket.display()))?;
    // From here on the log is the runtime directory's: nobody reads the
    // pipe any more.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(LOG))?;
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    println!("listening");
    std::io::stdout().flush()?;
    nix::unistd::dup2_stderr(&log)?;
    nix::unistd::dup2_stdout(&null)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    serve(
        Listener::Unix(listener),
        &point,
        Until::ClientsGone { starter },
        async move {
            term.recv().await;
        },
    )
    .await
}
