//! The QMP job driver: one point of a VM's volumes copied into given
//! files in one transaction (steps 3 to 5 of [`super::backup`]'s
//! sequence). Targets are created, handed to QEMU and opened; one
//! `transaction` adds the new checkpoint bitmap and starts a
//! `blockdev-backup` per volume (the guest frozen just around it, when
//! asked); the jobs are waited for (progress, stalls, cancelling); and on
//! any failure everything the copy added in QEMU is taken back. It knows
//! no repository: [`super::backup`] and `nasbackup` give it the files.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::guard::{self, Guard, Way};
use super::key::Key;
use super::nbd_target;
use super::quiesce;
use super::scope::Scope;
use super::thaw_guard::ThawGuard;
use crate::qcow2::{self, CreateOptions, Mask};
use crate::qemu::backup::{Action, Backup, BitmapAdd, Sync};
use crate::qemu::blockdev::{Cache, Discard, Node, Qcow2};
use crate::qemu::graph;
use crate::qemu::{self, Tracking, Volume};
use crate::qemu::{commands, query};
use crate::qmp::{self, Endpoint, Events, Qmp};

/// How a point's copy runs: the guest's freeze and pause, QEMU's jobs
/// and the targets they write. Nothing of the chain rules (a front end
/// such as nasbackup states what it wants here, and only here).
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// The VM's name (its repository's, for logs and messages).
    pub vm: String,
    /// How to freeze the guest's filesystems around the transaction (and
    /// thaw them): through the guest agent's socket, where a failed freeze
    /// fails the backup, or through libvirt (`virsh domfsfreeze` /
    /// `domfsthaw`), where a freeze that fails or takes longer than
    /// `freeze_timeout` is followed by a thaw and logged and the copy goes
    /// on unfrozen, as CloudStack's script does. A thaw that fails after
    /// the copy started fails the run. `None`: no freeze.
    pub quiesce: Option<super::thaw_guard::Thawer>,
    /// How to start the thaw guard that stands by while the guest is
    /// frozen; needed with `quiesce`.
    pub thaw_guard: Option<super::thaw_guard::GuardCommand>,
    /// How a guard resumes the VM (`ResumeQmp` or `ResumeLibvirt`) should
    /// bitback die in the milliseconds it pauses the VM for the point (see
    /// the guard's filter, `engine::guard`); started with `thaw_guard`.
    /// `None`: no guard then (a kill there leaves the VM paused).
    pub resume: Option<super::thaw_guard::Thawer>,
    /// How fast the jobs may copy.
    pub rate: Rate,
    /// Write compressed clusters: zstd at `compress_level` written by
    /// bitback on the NBD data path, deflate written by QEMU
    /// (`blockdev-backup compress=true`) on the file path; not with
    /// encryption.
    pub compress: bool,
    /// zstd's level (1 to 19) on the NBD data path.
    pub compress_level: i32,
    /// Cluster size of the backup files.
    pub cluster_size: u64,
    /// Granularity of the new checkpoint bitmap; `None` lets QEMU choose
    /// (the image's cluster size, clamped to 4 KiB..64 KiB). Default 64 KiB:
    /// QEMU copies at least 64 KiB units, so finer granules copy no less.
    pub granularity: Option<u64>,
    /// Tuning of QEMU's copy (`x-perf`); unset fields keep QEMU's defaults.
    pub perf: Perf,
    /// Fail when no job makes progress for this long.
    pub stall_timeout: Duration,
    /// How long the guest agent may take to freeze the guest.
    pub freeze_timeout: Duration,
    pub progress: Option<super::progress::ProgressSink>,
    /// Write every backup file as a LUKS-encrypted qcow2 with this key.
    pub encrypt: Option<Key>,
    /// LUKS key derivation time in milliseconds; `None` for QEMU's default
    /// (2000). Every open of a file (the backup's own, a restore's) costs
    /// about this long.
    pub encrypt_iter_time: Option<u64>,
    /// Fleecing: the old data of guest writes during the copy goes to a
    /// scratch image in this directory (local, fast storage) instead of to
    /// the repository, so a slow repository does not slow the guest. It
    /// holds at most what the guest overwrites during the run.
    pub fleecing: Option<PathBuf>,
    /// Where the job's bytes go: QEMU writes the files (`File`), or
    /// bitback's NBD server receives them and writes the files (`Nbd`).
    pub data_path: DataPath,
    /// On the NBD data path, a per-cluster digest map beside each file
    /// (`<volume>.map`, [`crate::cluster_map`]).
    pub cluster_maps: bool,
    /// On the NBD data path, a bucket each file goes up to while it is
    /// written (under its target's key).
    pub stream_to: Option<std::sync::Arc<super::StreamTo>>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            vm: String::new(),
            quiesce: None,
            thaw_guard: None,
            resume: None,
            rate: Rate::Unlimited,
            compress: false,
            compress_level: 3,
            cluster_size: 64 << 10,
            granularity: Some(64 << 10),
            perf: Perf::default(),
            stall_timeout: Duration::from_secs(600),
            freeze_timeout: Duration::from_secs(30),
            progress: None,
            encrypt: None,
            encrypt_iter_time: None,
            fleecing: None,
            data_path: DataPath::Auto,
            cluster_maps: true,
            stream_to: None,
        }
    }
}

/// How fast a run's backup jobs may copy (QEMU's job `speed`, which
/// holds back the job's reads and so its writes; not the copies of old
/// data that guest writes cause).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Rate {
    #[default]
    Unlimited,
    /// Bytes per second, each job.
    PerJob(u64),
    /// Bytes per second for all the run's jobs together, read from this
    /// file (a decimal number) when the jobs start and every half second
    /// after, and split evenly among the jobs still running. `bitback run`
    /// shares one host-wide budget among the runs it starts so, rewriting
    /// each run's file as runs start and end.
    Shared(PathBuf),
}

impl Rate {
    /// Each job's speed when `jobs` jobs run; `None` for no limit.
    fn per_job(&self, jobs: usize) -> anyhow::Result<Option<u64>> {
        Ok(match self {
            Rate::Unlimited => None,
            Rate::PerJob(n) => Some(*n),
            Rate::Shared(file) => Some(split(read_shared_rate(file)?, jobs)),
        })
    }
}

/// A shared budget's file: bytes per second, at least 1.
fn read_shared_rate(file: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the shared rate limit in {}", file.display()))?;
    match text.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => bail!(
            "{} holds {:?}, not a rate in bytes per second",
            file.display(),
            text.trim()
        ),
    }
}

/// `total` split among `jobs`, never 0 (QEMU's speed 0 means no limit).
fn split(total: u64, jobs: usize) -> u64 {
    (total / jobs.max(1) as u64).max(1)
}

/// Where a backup job's bytes go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DataPath {
    /// `Nbd` where bitback's writer does what the run asks and QEMU can
    /// reach it (it measures faster: benches/README.md), else `File`.
    #[default]
    Auto,
    /// QEMU writes each qcow2 file (a qcow2 node over a passed fd).
    File,
    /// QEMU's `nbd` driver sends them to bitback's NBD server, and bitback
    /// writes the file (`engine::nbd_target`).
    Nbd,
}

pub use crate::qemu::backup::Perf;

/// Set to true (by a signal handler) to stop a backup at the next point
/// where it can stop cleanly.
pub type Cancel = watch::Receiver<bool>;

/// Removes the jobs and target nodes an interrupted run of this scope
/// left in QEMU; true if there were any.
pub(super) async fn clean_stray_jobs(qmp: &Qmp, scope: &Scope) -> anyhow::Result<bool> {
    let mut found = false;
    let vm = scope.vm.as_str();
    for job in query::jobs(qmp).await? {
        if !scope.owns_node_or_job(&job.id) {
            continue;
        }
        info!(vm, job = %job.id, status = %job.status, "cleaning up a job left by an interrupted run");
        found = true;
        cancel_job(qmp, &job.id).await;
    }
    if let Err(e) = guard::remove_stray(qmp, scope).await {
        warn!(vm, error = %e, "cannot take out a guard left by an interrupted run");
    }
    let nodes = query::nodes(qmp).await?;
    let mut owned: Vec<&str> = nodes
        .iter()
        .map(|node| node.node_name.as_str())
        .filter(|n| scope.owns_node_or_job(n))
        .collect();
    // Filters before the nodes they write (targets, fleecing images).
    owned.sort_by_key(|n| !n.rsplit_once('-').is_some_and(|(_, k)| k.starts_with('c')));
    for name in owned {
        info!(
            vm,
            node = name,
            "removing a node left by an interrupted run"
        );
        found = true;
        if let Err(e) = commands::delete_node(qmp, name).await {
            warn!(vm, node = name, error = %e, "cannot remove a stray node");
        }
    }
    clean_stray_fdsets(qmp, scope).await;
    Ok(found)
}

/// Removes the descriptors an interrupted run passed to QEMU (`add-fd`,
/// labelled `bitback <path>`) once nothing uses them: those of this
/// scope's fleecing images, and those of files that are gone (a dead
/// run's targets, whose partial directory was removed). QEMU would
/// otherwise hold those files open for as long as it runs.
async fn clean_stray_fdsets(qmp: &Qmp, scope: &Scope) {
    let Ok(fdsets) = query::fdsets(qmp).await else {
        return;
    };
    for set in fdsets {
        let id = set.fdset_id;
        let stray = set.fds.iter().any(|fd| {
            let Some(path) = fd
                .opaque
                .as_deref()
                .and_then(|o| o.strip_prefix("bitback "))
            else {
                return false;
            };
            let path = Path::new(path);
            let fleece = path
                .file_name()
                .is_some_and(|n| scope.owns_fleece_file(&n.to_string_lossy()));
            fleece || std::fs::symlink_metadata(path).is_err()
        });
        if stray {
            debug!(vm = %scope.vm, fdset = id, "removing descriptors left by an interrupted run");
            let _ = commands::remove_fdset(qmp, id).await;
        }
    }
}

/// Removes the run's scratch directory, once its images are gone.
fn remove_scratch_dir(dir: &mut Option<PathBuf>) {
    if let Some(dir) = dir.take()
        && let Err(e) = std::fs::remove_dir(&dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(dir = %dir.display(), error = %e, "cannot remove the scratch directory");
    }
}

/// Removes the fleecing files (QEMU has closed them, or keeps only an
/// open descriptor to an unlinked file).
fn remove_scratch(files: &mut Vec<PathBuf>) {
    for file in files.drain(..) {
        if let Err(e) = std::fs::remove_file(&file) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(file = %file.display(), error = %e, "cannot remove a fleecing image");
            }
        }
    }
}

/// What to take back in QEMU if the run fails after changing it.
#[derive(Default)]
struct Undo {
    jobs: Vec<String>,
    nodes: Vec<String>,
    fdsets: Vec<i64>,
    /// QOM objects (the key's secret).
    objects: Vec<String>,
    /// (node, bitmap) added by the transaction.
    bitmaps: Vec<(String, String)>,
    /// Guards standing under devices, taken out before the nodes.
    guards: Vec<Guard>,
    /// The guard locks this run holds (`guard::lock`), given back once
    /// its guards are out, and the scope they were taken for.
    locks: Vec<String>,
    lock_scope: Option<Scope>,
    /// Fleecing files the run created, removed once QEMU let them go.
    scratch: Vec<PathBuf>,
    /// The run's own directory of scratch images, removed after them.
    scratch_dir: Option<PathBuf>,
    /// bitback's NBD servers behind NBD targets, ended after the nodes.
    servers: Vec<nbd_target::Server>,
    /// Set when the guest was frozen and the thaw failed: the backup may
    /// go on, but must not report success.
    thaw_failure: Option<String>,
}

/// Cancels job `id` and dismisses it once it has concluded, so its nodes
/// can be removed; gives up (logging) after 30 s.
async fn cancel_job(qmp: &Qmp, id: &str) {
    // A rate-limited job may sleep for a long while before it sees the
    // cancel (block-copy waits out its limit; with a dead target it waits
    // for the next request to fail): lifting the limit wakes it.
    let _ = commands::set_job_speed(qmp, id, 0).await;
    let _ = commands::cancel_job(qmp, id).await;
    // A cancelled job takes a moment to conclude before it can be
    // dismissed.
    for _ in 0..600 {
        match commands::dismiss_job(qmp, id).await {
            Ok(_) => return,
            Err(qmp::Error::Disconnected { .. }) => return,
            // Refused: gone already (nothing to wait for), or not yet
            // concluded (wait).
            Err(_) if !job_exists(qmp, id).await => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    warn!(
        job = id,
        "the job did not conclude within 30 s of its cancel"
    );
}

/// Whether QEMU lists job `id` (an unanswered query counts as yes: the
/// caller then waits and asks again).
async fn job_exists(qmp: &Qmp, id: &str) -> bool {
    match query::jobs(qmp).await {
        Ok(jobs) => jobs.iter().any(|job| job.id == id),
        Err(_) => true,
    }
}

impl Undo {
    async fn rollback(&mut self, qmp: &Qmp) {
        for job in self.jobs.drain(..) {
            cancel_job(qmp, &job).await;
        }
        let mut guards_out = true;
        for guard in self.guards.drain(..) {
            if let Err(e) = guard.remove(qmp).await {
                warn!(device = %guard.qdev, error = %e, "cannot take out the guard; the next backup of this vm does");
                guards_out = false;
            }
        }
        // A filter that may still stand keeps its lock: no other run puts
        // its own under the device meanwhile.
        if guards_out && let Some(scope) = &self.lock_scope {
            guard::unlock(qmp, scope, &std::mem::take(&mut self.locks)).await;
        }
        for node in self.nodes.drain(..).rev() {
            if let Err(e) = commands::delete_node(qmp, &node).await {
                warn!(%node, error = %e, "cannot remove a target node; the next backup of this vm removes it");
            }
        }
        for server in self.servers.drain(..) {
            server.abort();
        }
        for fdset in self.fdsets.drain(..) {
            let _ = commands::remove_fdset(qmp, fdset).await;
        }
        for id in self.objects.drain(..) {
            let _ = commands::delete_object(qmp, &id).await;
        }
        remove_scratch(&mut self.scratch);
        remove_scratch_dir(&mut self.scratch_dir);
        if self.bitmaps.is_empty() {
            return;
        }
        // A transaction that timed out may not have applied: only the
        // bitmaps QEMU lists are removed.
        let present = qemu::list_volumes(qmp).await.ok();
        for (node, bitmap) in self.bitmaps.drain(..) {
            let listed = present.as_ref().is_none_or(|volumes| {
                volumes
                    .iter()
                    .any(|v| v.node_name == node && v.bitmaps.iter().any(|b| b.name == bitmap))
            });
            if !listed {
                debug!(%node, %bitmap, "the new checkpoint was never added");
                continue;
            }
            match qemu::remove_bitmap(qmp, &node, &bitmap).await {
                Ok(()) => {}
                Err(e) => {
                    warn!(%node, %bitmap, error = %e, "cannot remove the new checkpoint bitmap; the next backup of this vm removes it")
                }
            }
        }
    }
}

/// What one run works with while it changes QEMU (steps 3 to 5): for each
/// volume (in order) the file to write and how, and the bitmap the
/// transaction adds on every volume.
pub struct CopyPlan<'a> {
    pub qmp: &'a Qmp,
    pub opts: &'a CopyOptions,
    pub scope: &'a Scope,
    pub volumes: &'a [Volume],
    pub targets: Vec<Target>,
    /// The new checkpoint bitmap; `None` adds none (a copy that keeps no
    /// record for a next incremental).
    pub checkpoint: Option<&'a str>,
}

/// One volume's copy.
#[derive(Debug, Clone)]
pub struct Target {
    /// The new file (created by the run; it must not exist).
    pub path: PathBuf,
    /// The backing file name stored in it, for an incremental.
    pub backing: Option<String>,
    /// The bitmap an incremental copies (`sync=bitmap`); `None` for a full.
    pub since: Option<String>,
    /// An incremental by content: the whole volume is copied (`sync=full`)
    /// and only clusters that differ from this are stored (the NBD path).
    pub baseline: Option<std::sync::Arc<crate::cluster_map::Baseline>>,
    /// The repository key the file is committed under: where it goes up
    /// as it is written, with [`CopyOptions::stream_to`].
    pub key: Option<String>,
}

/// What a finished copy left in QEMU: the new checkpoint bitmaps (taken
/// back with [`Copied::take_back`] when the backup is not kept), and
/// whether the thaw after the transaction failed.
pub(super) struct Copied {
    undo: Undo,
    guards: Vec<Option<crate::repo::Guard>>,
    /// What bitback wrote itself (the NBD path), per volume in order;
    /// empty when QEMU wrote the files.
    finished: Vec<qcow2::Finished>,
}

impl Copied {
    /// Per volume, what stood between the guest's writes and the copy
    /// (the manifest's `guard`).
    pub(super) fn guards(&self) -> &[Option<crate::repo::Guard>] {
        &self.guards
    }

    /// The files bitback wrote, with their digests computed in flight.
    pub(super) fn finished(&self) -> &[qcow2::Finished] {
        &self.finished
    }

    /// Set when the guest was frozen and the thaw failed: the copies are
    /// good, but the run must not report success.
    pub(super) fn thaw_failure(&mut self) -> Option<String> {
        self.undo.thaw_failure.take()
    }

    /// Removes what the copy added (the new bitmaps).
    pub(super) async fn take_back(mut self, qmp: &Qmp) {
        self.undo.rollback(qmp).await;
    }
}

/// Copies every volume of `plan` into its target in one transaction. On
/// failure (or `cancel`) everything the copy added in QEMU is taken back
/// first; the files are the caller's to remove.
pub(super) async fn copy(plan: &CopyPlan<'_>, cancel: Cancel) -> anyhow::Result<Copied> {
    let mut undo = Undo::default();
    match run_jobs(plan, &mut undo, cancel).await {
        Ok((guards, finished)) => Ok(Copied {
            undo,
            guards,
            finished,
        }),
        Err(e) => {
            undo.rollback(plan.qmp).await;
            Err(e)
        }
    }
}

/// Copies every volume into its own given file in one transaction, adding
/// the plan's checkpoint (if any) on every volume: the run of a backup
/// without a repository (CloudStack's layout, see `bitback nasbackup`).
/// What an interrupted run of the plan's scope left in QEMU is removed
/// first; on failure everything this run added is taken back and the
/// files are the caller's to remove. Returns whether a thaw failed (the
/// copies are good).
pub async fn copy_to_files(plan: &CopyPlan<'_>, cancel: Cancel) -> anyhow::Result<Option<String>> {
    if plan.targets.len() != plan.volumes.len() {
        bail!(
            "internal error: {} targets for {} volumes",
            plan.targets.len(),
            plan.volumes.len()
        );
    }
    clean_stray_jobs(plan.qmp, plan.scope).await?;
    Ok(copy(plan, cancel).await?.thaw_failure())
}

/// Steps 3 to 5: targets, transaction, jobs. On success the jobs are
/// dismissed and the targets closed; `undo` holds only the new bitmaps.
async fn run_jobs(
    run: &CopyPlan<'_>,
    undo: &mut Undo,
    cancel: Cancel,
) -> anyhow::Result<(Vec<Option<crate::repo::Guard>>, Vec<qcow2::Finished>)> {
    // One filter per device at a time: wait for another run's to go.
    let (locks, refused) =
        guard::lock(run.qmp, run.scope, run.volumes, &mut cancel.clone()).await?;
    undo.locks = locks;
    undo.lock_scope = Some(run.scope.clone());
    let mut ways = guard::survey(run.qmp, run.volumes).await?;
    for (way, why) in ways.iter_mut().zip(refused) {
        if let Some(why) = why
            && way.is_guarded()
        {
            *way = Way::Direct { why: Some(why) };
        }
    }
    let nbd = nbd_path(run.opts, run.qmp);
    if !nbd && run.targets.iter().any(|t| t.baseline.is_some()) {
        bail!("internal error: an incremental by content needs bitback to write the files");
    }
    // Where the filter's copies need a fleecing image, an encrypted
    // volume's old data must not go there in the clear: it keeps QEMU's
    // filter.
    for (i, (v, way)) in run.volumes.iter().zip(ways.iter_mut()).enumerate() {
        if let Some(why) = needs_scratch(run, nbd, i)
            && v.encrypted
            && way.is_guarded()
        {
            *way = Way::Direct {
                why: Some(format!(
                    "{why} of an encrypted volume: its old data cannot go to a fleecing image in the clear"
                )),
            };
        }
    }
    for (v, way) in run.volumes.iter().zip(&ways) {
        if let Way::Direct { why: Some(why) } = way {
            warn!(volume = %v.name, "copied through QEMU's own filter, which fails the guest's write when the backup cannot take its old data: {why}");
        }
    }
    let jobs = prepare_targets(run, nbd, undo).await?;
    let fleece = prepare_fleecing(run, &ways, nbd, undo).await?;
    if *cancel.borrow() {
        bail!("interrupted before the backup started");
    }
    let mut events = run.qmp.subscribe();
    let guarded = start_transaction(run, &ways, &fleece, nbd, undo).await?;
    for (way, guarded) in ways.iter_mut().zip(guarded) {
        if way.is_guarded() && !guarded {
            *way = Way::Direct {
                why: Some("bitback's filter could not be put under the device".into()),
            };
        }
    }
    let interrupted = cancel.clone();
    if let Err(e) = wait_jobs(run.qmp, run.opts, &mut events, &jobs, cancel).await {
        if *interrupted.borrow() {
            // Asked to stop (SIGINT, SIGTERM): nothing broke.
            return Err(e.context("cancelled by a signal; nothing of this backup is kept"));
        }
        if undo.guards.is_empty() {
            return Err(e);
        }
        return Err(e.context(guarded_failure(run)));
    }
    crate::fault::point("after-jobs");
    let finished = close_targets(run.qmp, undo).await?;
    let guards = ways
        .iter()
        .zip(&fleece)
        .map(|(way, fleece)| match (way, fleece) {
            (Way::Guarded { .. }, Some(_)) => Some(crate::repo::Guard::Fleecing),
            (Way::Guarded { .. }, None) => Some(crate::repo::Guard::Bitback),
            (Way::Direct { why: Some(_) }, _) => Some(crate::repo::Guard::Qemu),
            (Way::Direct { why: None }, _) => None,
        })
        .collect();
    Ok((guards, finished))
}

/// What a failed guarded run tells: the guest was spared, and how much
/// room the places the old data went to have left.
fn guarded_failure(run: &CopyPlan<'_>) -> String {
    let mut dirs: Vec<PathBuf> = run
        .targets
        .iter()
        .filter_map(|t| t.path.parent().map(Path::to_path_buf))
        .collect();
    dirs.extend(run.opts.fleecing.clone());
    if run.opts.compress && run.opts.fleecing.is_none() {
        dirs.push(std::env::temp_dir());
    }
    dirs.dedup();
    // What each place says now: its free room, or why it cannot say.
    let mut cause = None;
    let mut room = Vec::new();
    for d in &dirs {
        match nix::sys::statvfs::statvfs(d) {
            Ok(s) => {
                let free = s.blocks_available() * s.fragment_size();
                room.push(format!("{} has {} MiB free", d.display(), free >> 20));
                // Less than one large copy request (QEMU's chunks go up
                // to 64 MiB): the copy met a full filesystem.
                if free < 64 << 20 {
                    cause.get_or_insert(format!("no space left on {}", d.display()));
                }
            }
            Err(e) => {
                room.push(format!("{}: {e}", d.display()));
                cause.get_or_insert(match e {
                    nix::errno::Errno::ENOTCONN
                    | nix::errno::Errno::ESTALE
                    | nix::errno::Errno::ENOENT => {
                        format!("the filesystem of {} is gone ({e})", d.display())
                    }
                    e => format!("{} fails ({e})", d.display()),
                });
            }
        }
    }
    let cause = cause
        .unwrap_or_else(|| "a copy of old data failed or was slower than the filter waits".into());
    format!(
        "the backup broke, not the guest: {cause}. bitback's filter drops the point when old data \
         cannot be copied (a full or failing repository or fleecing directory, or a copy slower \
         than {} s), and the guest's writes went on ({})",
        guard::CBW_TIMEOUT,
        room.join("; ")
    )
}

/// What makes volume `i`'s filter copies need a fleecing image even
/// without `--fleecing`, if anything: QEMU cannot write a compressed
/// cluster twice, and an incremental by content keeps nothing it finds
/// unchanged for the job to read back from the target. (Plain and
/// compressed targets bitback writes take the copies.)
fn needs_scratch(run: &CopyPlan<'_>, nbd: bool, i: usize) -> Option<&'static str> {
    if run.opts.compress && !nbd {
        Some("a compressed backup")
    } else if run.targets[i].baseline.is_some() {
        Some("an incremental by content")
    } else {
        None
    }
}

/// With `--fleecing DIR`: a scratch image per guarded volume, in DIR,
/// opened in QEMU; what the filter copies goes there instead of to the
/// target. Encrypted volumes get none: their old data would lie in DIR
/// in the clear. Fleecing files an interrupted run of the scope left in
/// DIR are removed first. Returns the fleecing node per volume.
async fn prepare_fleecing(
    run: &CopyPlan<'_>,
    ways: &[Way],
    nbd: bool,
    undo: &mut Undo,
) -> anyhow::Result<Vec<Option<String>>> {
    let mut nodes = vec![None; run.volumes.len()];
    let scratch = (0..run.volumes.len()).find_map(|i| needs_scratch(run, nbd, i));
    let dir = match (&run.opts.fleecing, scratch) {
        (Some(dir), _) => dir.clone(),
        (None, Some(what)) if ways.iter().any(Way::is_guarded) => {
            // A directory of the run's own: a shared temp dir's names
            // could be taken ahead by any local user.
            let dir = crate::qemu::daemon::run_dir("scratch")
                .context("making a directory for the scratch images")?;
            undo.scratch_dir = Some(dir.clone());
            info!(dir = %dir.display(), "{what} fleeces: old data of guest writes goes to a scratch image here (--fleecing DIR to choose)");
            dir
        }
        (None, _) => return Ok(nodes),
    };
    let dir = &dir;
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading the fleecing directory {}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        // Only plain files of this repository's and VM's names that are
        // qcow2 images no process holds: what a killed run of this scope
        // left. Anything else of such a name is left where it is (the
        // image's creation below then fails, naming it).
        let plain = entry.file_type().is_ok_and(|t| t.is_file());
        if plain && run.scope.owns_fleece_file(&name.to_string_lossy()) {
            let path = entry.path();
            let held = crate::disk::holders(&path);
            if !held.is_empty() || qcow2::Image::open(&path).is_err() {
                warn!(file = %path.display(), holders = ?held, "a file of a fleecing image's name that is no image left by a run, or is held open; it is left alone");
                continue;
            }
            info!(file = %entry.path().display(), "removing a fleecing image left by an interrupted run");
            std::fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    let mut pass_fds = matches!(run.qmp.endpoint(), Endpoint::Unix(_));
    for (i, v) in run.volumes.iter().enumerate() {
        if !ways[i].is_guarded() {
            continue;
        }
        if v.encrypted {
            warn!(volume = %v.name, "no fleecing for an encrypted volume: its old data would lie in the fleecing directory in the clear");
            continue;
        }
        let node = run.scope.fleece(i);
        let path = dir.join(format!("{node}.qcow2"));
        qcow2::create(
            &path,
            &CreateOptions {
                size: v.virtual_size,
                cluster_size: run.opts.cluster_size,
                backing: None,
                backing_format: None,
            },
        )
        .with_context(|| format!("creating the fleecing image {}", path.display()))?;
        undo.scratch.push(path.clone());
        let filename = target_filename(run.qmp, &path, &mut pass_fds, undo).await?;
        let file = Node::File {
            filename: filename.into(),
            node_name: None,
            read_only: false,
            discard: Some(Discard::Unmap),
        };
        let image = Qcow2 {
            discard: Some(Discard::Unmap),
            cache: Some(Cache { no_flush: true }),
            ..Qcow2::over(file)
        };
        commands::add_node(run.qmp, &image.named(&node).no_backing().node())
            .await
            .with_context(|| format!("opening the fleecing image of volume {} in QEMU", v.name))?;
        undo.nodes.push(node.clone());
        nodes[i] = Some(node);
    }
    Ok(nodes)
}

/// Step 3: one target per volume, created and opened in QEMU with
/// `backing: null`. Plain targets are created natively; encrypted ones by
/// `qemu-img create` processes (in parallel, outside the VM's QEMU, so the
/// key derivation's calibration does not stall it), the key on their
/// stdin; the VM's QEMU gets the key as a secret object over QMP. Returns
/// the backup job ids.
async fn prepare_targets(
    run: &CopyPlan<'_>,
    nbd: bool,
    undo: &mut Undo,
) -> anyhow::Result<Vec<String>> {
    let (qmp, scope) = (run.qmp, run.scope);
    let paths: Vec<PathBuf> = run.targets.iter().map(|t| t.path.clone()).collect();
    if nbd {
        for (i, v) in run.volumes.iter().enumerate() {
            let backing = run.targets[i].backing.clone();
            let node = scope.target_node(i);
            let opts = CreateOptions {
                size: v.virtual_size,
                cluster_size: run.opts.cluster_size,
                backing: backing.as_deref(),
                backing_format: backing.as_ref().map(|_| "qcow2"),
            };
            let writer = nbd_target::Writer {
                compress: run.opts.compress.then_some(run.opts.compress_level),
                map: run.opts.cluster_maps,
                baseline: run.targets[i].baseline.clone(),
                upload: run.opts.stream_to.clone().zip(run.targets[i].key.clone()),
            };
            let server = nbd_target::open(qmp, &node, &paths[i], &opts, &writer)
                .await
                .with_context(|| format!("opening the target for volume {} in QEMU", v.name))?;
            undo.servers.push(server);
            undo.nodes.push(node);
        }
        return Ok((0..run.volumes.len()).map(|i| scope.job(i)).collect());
    }
    match &run.opts.encrypt {
        Some(key) => create_encrypted(run, key, &paths).await?,
        None => {
            for (i, v) in run.volumes.iter().enumerate() {
                let backing = run.targets[i].backing.clone();
                qcow2::create(
                    &paths[i],
                    &CreateOptions {
                        size: v.virtual_size,
                        cluster_size: run.opts.cluster_size,
                        backing: backing.as_deref(),
                        backing_format: backing.as_ref().map(|_| "qcow2"),
                    },
                )
                .with_context(|| format!("creating {}", paths[i].display()))?;
            }
        }
    }
    let secret = match &run.opts.encrypt {
        Some(key) => {
            let id = scope.secret();
            // One a killed run left behind.
            let _ = commands::delete_object(qmp, &id).await;
            commands::add_secret(qmp, &id, &key.base64())
                .await
                .context("handing the encryption key to QEMU")?;
            undo.objects.push(id.clone());
            Some(id)
        }
        None => None,
    };
    // qemu-storage-daemon has no add-fd: it opens targets by name.
    let mut pass_fds = matches!(qmp.endpoint(), Endpoint::Unix(_));
    for (i, v) in run.volumes.iter().enumerate() {
        let filename = target_filename(qmp, &paths[i], &mut pass_fds, undo).await?;
        let node = scope.target_node(i);
        // no-flush: QEMU would fdatasync the target each time a new L2
        // table depends on a refcount update (dozens of times on a sparse
        // disk); bitback syncs every file once, at the commit, and a
        // partial backup is discarded after a crash anyway.
        let target = Qcow2 {
            cache: Some(Cache { no_flush: true }),
            ..Qcow2::over(Node::file(filename))
        };
        let target = target
            .named(&node)
            .no_backing()
            .encrypted(secret.as_deref());
        commands::add_node(qmp, &target.node())
            .await
            .with_context(|| format!("opening the target for volume {} in QEMU", v.name))?;
        undo.nodes.push(node);
    }
    Ok((0..run.volumes.len()).map(|i| scope.job(i)).collect())
}

/// Whether this run's targets are bitback's NBD servers: asked for, or by
/// default (it measures faster: benches/README.md), where the streaming
/// writer does what the run asks (no encryption; a cluster no larger than
/// the job's 64 KiB copy unit, so that a job never writes part of a
/// cluster it has not written) and QEMU can reach the server.
fn nbd_path(opts: &CopyOptions, qmp: &Qmp) -> bool {
    let asked = match opts.data_path {
        DataPath::File => return false,
        DataPath::Nbd => true,
        DataPath::Auto => false,
    };
    let Some(why) = nbd_impossible(opts, qmp) else {
        return true;
    };
    if asked {
        warn!("--data-path nbd: {why}; QEMU writes the files");
    } else if opts.compress {
        info!("{why}: QEMU writes the files, with its deflate compression");
    } else {
        info!("{why}: QEMU writes the files");
    }
    false
}

/// Whether bitback writes this run's files (the NBD data path).
pub(super) fn writes_natively(opts: &CopyOptions, qmp: &Qmp) -> Result<(), String> {
    if opts.data_path == DataPath::File {
        return Err("QEMU writes the files (--data-path file)".into());
    }
    match nbd_impossible(opts, qmp) {
        Some(why) => Err(format!("QEMU writes the files: {why}")),
        None => Ok(()),
    }
}

/// Why bitback's writer cannot take this run's bytes, if it cannot.
fn nbd_impossible(opts: &CopyOptions, qmp: &Qmp) -> Option<&'static str> {
    if matches!(qmp.endpoint(), Endpoint::Unix(_))
        && !qmp.named_fds()
        && qmp.socket_owner().is_none()
    {
        Some(
            "libvirt's QMP proxy cannot pass QEMU a socket (getfd), and QEMU could not connect to one in a directory of its user's (give the domain an extra QMP socket)",
        )
    } else if opts.encrypt.is_some() {
        Some("bitback does not write encrypted backups")
    } else if opts.cluster_size > 64 << 10 {
        Some("bitback writes clusters of at most 64 KiB")
    } else {
        None
    }
}

/// How many times a `qemu-img create` of an encrypted target is tried when
/// QEMU 7.2's calibration fails. Measured with 7.2.22 here: 7 of 20 creates
/// failed so (idle machine), each failure within milliseconds; 10 tries
/// leave about 3 in 100,000 backups failing on it.
const CALIBRATION_TRIES: u32 = 10;

/// Creates the encrypted targets with `qemu-img create`, one process per
/// volume at once. The key goes in on stdin (`file=/dev/stdin`): never on
/// a command line, never in a file. QEMU 7.2's key-derivation calibration
/// sometimes fails ("Unable to get accurate CPU usage"): its first timing
/// round reads no CPU time. A volume whose create failed is tried again,
/// up to [`CALIBRATION_TRIES`] times.
async fn create_encrypted(run: &CopyPlan<'_>, key: &Key, paths: &[PathBuf]) -> anyhow::Result<()> {
    let mut pending: Vec<usize> = (0..run.volumes.len()).collect();
    for attempt in 1..=CALIBRATION_TRIES {
        let mut children = Vec::new();
        for &i in &pending {
            children.push((i, spawn_create(run, key, i, &paths[i]).await?));
        }
        let mut again = Vec::new();
        for (i, child) in children {
            let out = child.wait_with_output().await?;
            if out.status.success() {
                continue;
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            // Any failure is tried again: the calibration's is told from
            // no other by anything but its message, and bitback decides
            // nothing on a message's words. A failure that repeats (a full
            // disk) costs the tries, the last one's stderr is reported.
            if attempt < CALIBRATION_TRIES {
                debug!(volume = %run.volumes[i].name, status = %out.status, stderr = %stderr.trim(), "qemu-img create of an encrypted target failed; trying again");
                let _ = std::fs::remove_file(&paths[i]);
                again.push(i);
                continue;
            }
            bail!(
                "creating the encrypted backup file of volume {} failed: {}",
                run.volumes[i].name,
                stderr.trim()
            );
        }
        if again.is_empty() {
            return Ok(());
        }
        pending = again;
    }
    Ok(())
}

/// Starts `qemu-img create` of volume `i`'s encrypted target, the key
/// written to its stdin.
async fn spawn_create(
    run: &CopyPlan<'_>,
    key: &Key,
    i: usize,
    path: &Path,
) -> anyhow::Result<tokio::process::Child> {
    use tokio::io::AsyncWriteExt;
    let v = &run.volumes[i];
    let mut options = format!(
        "encrypt.format=luks,encrypt.key-secret=k,cluster_size={}",
        run.opts.cluster_size
    );
    if let Some(ms) = run.opts.encrypt_iter_time {
        options.push_str(&format!(",encrypt.iter-time={ms}"));
    }
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "--object"])
        .arg("secret,id=k,format=raw,file=/dev/stdin")
        .args(["-o", &options]);
    if let Some(backing) = &run.targets[i].backing {
        // Resolved against the new file's directory, as QEMU does.
        cmd.args(["-b", backing, "-F", "qcow2"]);
    }
    cmd.arg(path)
        .arg(v.virtual_size.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .context("running qemu-img create (install qemu-utils)")?;
    let mut stdin = child.stdin.take().context("qemu-img has no stdin")?;
    stdin
        .write_all(key.bytes())
        .await
        .context("handing the key to qemu-img")?;
    drop(stdin);
    Ok(child)
}

/// The name QEMU opens a target by: a passed fd where the monitor takes
/// one, else the absolute path (QEMU resolves a relative name against its
/// own working directory).
async fn target_filename(
    qmp: &Qmp,
    path: &Path,
    pass_fds: &mut bool,
    undo: &mut Undo,
) -> anyhow::Result<String> {
    let (filename, fdset) = qemu_filename(qmp, path, true, pass_fds).await?;
    undo.fdsets.extend(fdset);
    Ok(filename)
}

/// [`target_filename`] of a file QEMU opens for reading (`writable`
/// false) or for writing too, and the fd set it was passed in, if it was.
async fn qemu_filename(
    qmp: &Qmp,
    path: &Path,
    writable: bool,
    pass_fds: &mut bool,
) -> anyhow::Result<(String, Option<i64>)> {
    let absolute = std::path::absolute(path)
        .with_context(|| format!("resolving {}", path.display()))?
        .display()
        .to_string();
    if !*pass_fds {
        return Ok((absolute, None));
    }
    // QEMU takes from a set only a descriptor of the access mode it opens
    // with.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let label = format!("bitback {}", path.display());
    match qmp.add_fd(file.as_fd(), None, Some(&label)).await {
        Ok(added) => Ok((
            format!("/dev/fdset/{}", added.fdset_id),
            Some(added.fdset_id),
        )),
        Err(e) if e.is_command_not_found() => {
            debug!("no add-fd in this QEMU: files are opened by name");
            *pass_fds = false;
            Ok((absolute, None))
        }
        Err(e) => Err(anyhow!(e).context(format!("passing {} to QEMU", path.display()))),
    }
}

/// Step 4: the new checkpoint on every volume and every copy, in one
/// transaction, with the guest frozen around it when asked. Guarded
/// volumes ([`guard`]) get their filter first, their devices moved onto it,
/// all with the VM paused when it runs, so that the moves and the
/// transaction fall on one point.
async fn start_transaction(
    run: &CopyPlan<'_>,
    ways: &[Way],
    fleece: &[Option<String>],
    nbd: bool,
    undo: &mut Undo,
) -> anyhow::Result<Vec<bool>> {
    let (qmp, opts) = (run.qmp, run.opts);
    let perf = job_perf(run, fleece)
        .for_qemu(qmp)
        .await
        .context("reading QEMU's QMP schema")?;
    let tuning = Tuning {
        perf,
        speed: opts.rate.per_job(run.volumes.len())?,
    };
    let mut guards: Vec<Option<Guard>> = run
        .volumes
        .iter()
        .enumerate()
        .map(|(i, v)| match &ways[i] {
            Way::Guarded { qdev } => Some(Guard::new(run.scope, i, v, qdev)),
            Way::Direct { .. } => None,
        })
        .collect();
    let frozen = match (&opts.quiesce, &opts.thaw_guard) {
        (Some(thawer), Some(guard)) => {
            quiesce::freeze(thawer, guard, &opts.vm, opts.freeze_timeout).await?
        }
        (Some(_), None) => {
            bail!("internal error: quiescing needs a thaw guard command (CopyOptions::thaw_guard)")
        }
        (None, _) => None,
    };
    // Before the pause: a kill in the pause's milliseconds would leave the
    // VM paused.
    crate::fault::point("before-transaction");
    let guarded = guards.iter().any(Option::is_some);
    let paused = match guarded {
        true => pause(qmp, opts).await,
        false => Ok(None),
    };
    // The guarded fulls, whose jobs start after the point.
    let later = |guards: &[Option<Guard>]| -> Vec<bool> {
        (0..guards.len())
            .map(|i| guards[i].is_some() && masked(run, i))
            .collect()
    };
    // A VM that does not run is flushed too where a guarded full reads
    // its mask from the images' metadata on disk ([`start_masked_fulls`]).
    let flushed_stopped = match &paused {
        Ok(None) if later(&guards).contains(&true) => flush_stopped(qmp).await,
        _ => false,
    };
    let started = match &paused {
        Ok(_) => match insert_guards(run, &mut guards, fleece, undo).await {
            Ok(()) => {
                let actions = backup_actions(run, &guards, &tuning, nbd, &later(&guards));
                if actions.is_empty() {
                    Ok(())
                } else {
                    qemu::backup::transaction(qmp, &actions)
                        .await
                        .map_err(Failure::Transaction)
                }
            }
            Err(e) => Err(Failure::Guard(e)),
        },
        Err(e) => Err(Failure::Guard(anyhow!("pausing the vm for the point: {e}"))),
    };
    // Every cluster allocated up to the point is in the images' metadata
    // on disk: the VM was paused for the point (`stop` flushes), or did
    // not run, was flushed, and still does not run (nothing wrote since).
    let flushed = match &paused {
        Ok(Some(_)) => true,
        Ok(None) => flushed_stopped && !guard::running(qmp).await.unwrap_or(true),
        Err(_) => false,
    };
    let resumed = match paused {
        Ok(Some(paused)) => resume(qmp, opts, paused, undo.guards.len()).await,
        _ => Ok(()),
    };
    if let Some(frozen) = frozen {
        undo.thaw_failure = frozen.thaw(&opts.vm).await;
    }
    record_applied(run, &started, undo);
    resumed.context(
        "resuming the vm after the point failed: it stays paused until resumed (virsh resume, or QMP cont)",
    )?;
    match started {
        Ok(_) => {}
        Err(Failure::Transaction(e)) => {
            return Err(anyhow!(e).context("starting the backup transaction"));
        }
        Err(Failure::Guard(e)) => {
            return Err(e.context("setting up bitback's filter under the devices"));
        }
    }
    crate::fault::point("after-transaction");
    start_masked_fulls(run, &guards, fleece, &tuning, nbd, flushed).await?;
    Ok(guards.iter().map(Option::is_some).collect())
}

/// Parallel copy requests per job with fleecing, unless `--max-workers`
/// says otherwise. Each request to a slow repository holds one of the
/// threads of QEMU's pool (64 by default) that the guest's own I/O, and
/// the filter's copies to the fleecing image, need as well: with QEMU's 64
/// workers, 32 guest writes of 1 MiB during a backup to a 20 MB/s
/// repository took 2.2 s with fleecing; with 16, 0.096 s; with 4, 0.046 s
/// (0.033 s with no backup; `cargo bench --bench fleecing`).
const FLEECING_WORKERS: u64 = 8;

/// QEMU's copy unit (`x-perf max-chunk`) when a volume is read whole for
/// an incremental by content: a quarter as many requests over the NBD
/// socket. Measured within this machine's noise of QEMU's default
/// (benches/README.md, incrementals by content).
const CONTENT_CHUNK: u64 = 4 << 20;

/// What every job of a run is started with: QEMU's copy tuning and the
/// job's speed.
struct Tuning {
    perf: Option<Perf>,
    speed: Option<u64>,
}

/// Whether volume `i`, when guarded, is a full whose job starts after the
/// point with what the volume holds ([`start_masked_fulls`]): a full not
/// by content (that one reads every cluster to compare it).
fn masked(run: &CopyPlan<'_>, i: usize) -> bool {
    run.targets[i].since.is_none() && run.targets[i].baseline.is_none()
}

/// The transaction's actions: the new checkpoint on every volume and a
/// `blockdev-backup` per volume, from the guard's snapshot-access node
/// where the volume has one; a guarded full's job is left out (`later`),
/// to start once the point is taken ([`start_masked_fulls`]).
fn backup_actions(
    run: &CopyPlan<'_>,
    guards: &[Option<Guard>],
    tuning: &Tuning,
    nbd: bool,
    later: &[bool],
) -> Vec<Action> {
    let opts = run.opts;
    let mut actions = Vec::new();
    for (i, v) in run.volumes.iter().enumerate() {
        // Only qcow2 v3 can store a bitmap; every other kind gets one in
        // QEMU's memory, which tracks changes while this QEMU lives.
        if let Some(checkpoint) = run.checkpoint {
            actions.push(Action::BlockDirtyBitmapAdd(BitmapAdd {
                node: v.node_name.clone(),
                name: checkpoint.to_string(),
                persistent: v.kind.tracking() == Tracking::Persistent,
                granularity: opts.granularity,
            }));
        }
        if !later[i] {
            actions.push(Action::BlockdevBackup(backup_job(
                run, guards, tuning, nbd, i,
            )));
        }
    }
    actions
}

/// The `blockdev-backup` arguments of volume `i`.
fn backup_job(
    run: &CopyPlan<'_>,
    guards: &[Option<Guard>],
    tuning: &Tuning,
    nbd: bool,
    i: usize,
) -> Backup {
    let (opts, v) = (run.opts, &run.volumes[i]);
    // A full of an image without a backing file copies only what the
    // image allocates (sync=top): unallocated clusters read as zeros and
    // stay unallocated in the target. sync=full would write zeros for
    // every one of them, which on a sparse 1 TiB disk costs more than the
    // data. A guarded volume's job reads the snapshot-access node, where
    // every cluster counts as allocated: sync=full, narrowed to what the
    // volume holds where bitback can tell ([`start_masked_fulls`]).
    let by_content = run.targets[i].baseline.is_some();
    let sync = if v.backing_file.is_none() && guards[i].is_none() && !by_content {
        Sync::Top
    } else {
        Sync::Full
    };
    let source = guards[i]
        .as_ref()
        .map_or(v.node_name.as_str(), Guard::source);
    let mut job = Backup {
        job_id: run.scope.job(i),
        device: source.to_string(),
        target: run.scope.target_node(i),
        sync,
        bitmap: None,
        bitmap_mode: None,
        auto_dismiss: false,
        speed: tuning.speed,
        // On the NBD path bitback compresses.
        compress: opts.compress && !nbd,
        x_perf: tuning.perf.clone(),
    };
    if let Some(since) = &run.targets[i].since {
        job.by_bitmap(match &guards[i] {
            Some(guard) => guard.copy_bitmap(),
            None => since,
        });
    }
    job
}

/// Starts the jobs of the guarded fulls left out of the transaction, the
/// point being taken (the guards stand). Each copies what its volume may
/// hold ([`Guard::load_mask`]) where bitback can read that from the
/// image, the images having been `flushed` at the point; else (a raw
/// block device, an image bitback cannot open, a VM resumed by someone
/// else during the point) the whole virtual size, as QEMU alone would.
async fn start_masked_fulls(
    run: &CopyPlan<'_>,
    guards: &[Option<Guard>],
    fleece: &[Option<String>],
    tuning: &Tuning,
    nbd: bool,
    flushed: bool,
) -> anyhow::Result<()> {
    for (i, guard) in guards.iter().enumerate() {
        let Some(guard) = guard.as_ref().filter(|_| masked(run, i)) else {
            continue;
        };
        let v = &run.volumes[i];
        let mut job = backup_job(run, guards, tuning, nbd, i);
        let loaded = match flushed {
            true => load_mask(run, i, guard, fleece[i].as_deref()).await,
            false => Err(anyhow!(
                "the vm's images were not flushed at the point (it runs, and bitback did not pause it)"
            )),
        };
        match loaded {
            Ok(Some(covered)) => {
                debug!(volume = %v.name, covered, "the full copies what the volume may hold");
                job.by_bitmap(guard.copy_bitmap());
            }
            Ok(None) => {
                debug!(volume = %v.name, "the image does not say what it holds: the full reads the whole disk")
            }
            Err(e) => {
                info!(volume = %v.name, error = %format!("{e:#}"), "cannot tell what the volume holds: the full reads the whole disk")
            }
        }
        qemu::backup::start(run.qmp, &job)
            .await
            .with_context(|| format!("starting the backup job of volume {}", v.name))?;
    }
    Ok(())
}

/// The files of the backing chain QEMU opened under `node`, in order (its
/// graph's `backing` edges, each node's file name): a `-blockdev` graph
/// may give a backing node other than the one the image names.
async fn backing_chain(qmp: &Qmp, node: &str) -> anyhow::Result<Vec<String>> {
    let graph = graph::query(qmp)
        .await?
        .context("this QEMU shows no block graph")?;
    let nodes = query::nodes(qmp).await?;
    let filename = |name: &str| {
        nodes
            .iter()
            .find(|n| n.node_name == name)
            .map(|n| n.image.filename.clone())
            .filter(|f| !f.is_empty())
    };
    let mut chain = Vec::new();
    let mut at = node.to_string();
    while let Some(backing) = graph.child(&at, "backing") {
        chain.push(filename(backing).with_context(|| format!("node {backing} has no file name"))?);
        at = backing.to_string();
        anyhow::ensure!(chain.len() <= 64, "a backing chain longer than 64");
    }
    Ok(chain)
}

/// Volume `i`'s mask: what its image may hold, read now (after the
/// point), written as a mask image in a directory of the run's own,
/// opened in QEMU for the moment [`Guard::load_mask`] takes, then removed.
/// The bytes it covers; `None` when the image does not say.
async fn load_mask(
    run: &CopyPlan<'_>,
    i: usize,
    guard: &Guard,
    fleece: Option<&str>,
) -> anyhow::Result<Option<u64>> {
    let v = &run.volumes[i];
    crate::fault::hold("before-mask");
    let granularity = Mask::granularity_for(v.virtual_size);
    let mut mask = Mask::new(v.virtual_size, granularity)?;
    let chain = backing_chain(run.qmp, &v.node_name).await?;
    let (path, format, size) = (
        PathBuf::from(&v.image_file),
        v.format.clone(),
        v.virtual_size,
    );
    let (mask, known) = tokio::task::spawn_blocking(move || {
        crate::disk::mark_allocated(&path, &format, size, &chain, &mut mask)
            .map(|known| (mask, known))
    })
    .await??;
    if !known {
        return Ok(None);
    }
    let dir =
        crate::qemu::daemon::run_dir("mask").context("making a directory for the mask image")?;
    let file = dir.join("mask.qcow2");
    let mut fdset = None;
    let loaded = async {
        mask.write(&file, guard::MASK_BITMAP)?;
        let mut pass_fds = matches!(run.qmp.endpoint(), Endpoint::Unix(_));
        let filename;
        (filename, fdset) = qemu_filename(run.qmp, &file, false, &mut pass_fds).await?;
        let node = run.scope.mask_node(i);
        let image = Qcow2::over(Node::file(filename)).named(&node).read_only();
        commands::add_node(run.qmp, &image.node())
            .await
            .context("opening the mask image in QEMU")?;
        let merged = guard.load_mask(run.qmp, &node, granularity, fleece).await;
        if let Err(e) = commands::delete_node(run.qmp, &node).await {
            warn!(%node, error = %e, "cannot remove the mask image's node; the next backup of this vm removes it");
        }
        merged.context("merging the mask into the job's bitmap")?;
        anyhow::Ok(mask.covered())
    }
    .await;
    if let Some(fdset) = fdset {
        let _ = commands::remove_fdset(run.qmp, fdset).await;
    }
    let _ = std::fs::remove_file(&file);
    remove_scratch_dir(&mut Some(dir));
    loaded.map(Some)
}

/// Why the point was not taken.
enum Failure {
    Guard(anyhow::Error),
    Transaction(qmp::Error),
}

/// The jobs' `x-perf` as asked, with the run's own defaults: fewer
/// workers with fleecing, larger chunks for a volume read by content.
fn job_perf(run: &CopyPlan<'_>, fleece: &[Option<String>]) -> Perf {
    let mut perf = run.opts.perf.clone();
    if fleece.iter().any(Option::is_some) && perf.max_workers.is_none() {
        perf.max_workers = Some(FLEECING_WORKERS);
    }
    if run.targets.iter().any(|t| t.baseline.is_some()) && perf.max_chunk.is_none() {
        perf.max_chunk = Some(CONTENT_CHUNK);
    }
    perf
}

/// Resumes the VM paused for the point; the guard standing by is released
/// once it runs (dropped unreleased, the guard tries).
async fn resume(
    qmp: &Qmp,
    opts: &CopyOptions,
    paused: Paused,
    devices: usize,
) -> Result<(), qmp::Error> {
    let resumed = commands::cont(qmp).await;
    info!(vm = %opts.vm, ms = paused.since.elapsed().as_millis() as u64, devices, "vm paused for the point");
    if let (Ok(_), Some(guard)) = (&resumed, paused.guard) {
        guard.release();
    }
    resumed.map(drop)
}

/// Records in `undo` what a transaction that may have been applied made:
/// its jobs and the new checkpoint's bitmaps, to be taken back by name.
fn record_applied(run: &CopyPlan<'_>, started: &Result<(), Failure>, undo: &mut Undo) {
    let applied = match started {
        Ok(_) => true,
        // QEMU refused it (a transaction is all or nothing), or it was
        // never sent.
        Err(Failure::Transaction(qmp::Error::Qemu { .. })) | Err(Failure::Guard(_)) => false,
        // No answer: it may have been applied; undo it by name.
        Err(Failure::Transaction(e)) => {
            warn!(vm = %run.opts.vm, error = %e, "the transaction's outcome is unknown; undoing it by name");
            true
        }
    };
    if applied {
        undo.jobs
            .extend((0..run.volumes.len()).map(|i| run.scope.job(i)));
        if let Some(checkpoint) = run.checkpoint {
            for v in run.volumes {
                undo.bitmaps
                    .push((v.node_name.clone(), checkpoint.to_string()));
            }
        }
    }
}

/// A VM paused for the point: since when, and the guard that resumes it
/// should bitback die before it does.
struct Paused {
    since: std::time::Instant,
    guard: Option<ThawGuard>,
}

/// Pauses a running VM, with a guard standing by when the options name
/// one; `Some` if it was paused here.
async fn pause(qmp: &Qmp, opts: &CopyOptions) -> anyhow::Result<Option<Paused>> {
    if !guard::running(qmp).await? {
        return Ok(None);
    }
    let guard = match (&opts.resume, &opts.thaw_guard) {
        (Some(resume), Some(command)) => Some(ThawGuard::start(command, resume)?),
        _ => None,
    };
    let since = std::time::Instant::now();
    if let Err(e) = commands::stop(qmp).await {
        // Unanswered, the stop may have happened: the guard (unreleased,
        // dropped) resumes the VM if it did.
        return Err(e.into());
    }
    crate::fault::point("paused");
    Ok(Some(Paused { since, guard }))
}

/// Flushes a VM that does not run, so that its images' metadata on disk
/// holds every cluster allocated so far: QMP `stop` drains and flushes
/// every node, and leaves a paused or never started VM's state as it was.
/// False where that is not known: an incoming or finished migration
/// (another QEMU writes the images), or a `stop` that failed.
async fn flush_stopped(qmp: &Qmp) -> bool {
    let Ok(status) = query::status(qmp).await else {
        return false;
    };
    if status.running || matches!(status.status.as_str(), "inmigrate" | "postmigrate") {
        return false;
    }
    commands::stop(qmp).await.is_ok()
}

/// Puts each guard in place (the VM paused or not running); each is in
/// `undo` before it changes anything. A guard that cannot be put in place
/// (a device QEMU will not move, say) is taken out again and its volume
/// copied through QEMU's own filter, with a warning; one that cannot be
/// taken out either fails the run.
async fn insert_guards(
    run: &CopyPlan<'_>,
    guards: &mut [Option<Guard>],
    fleece: &[Option<String>],
    undo: &mut Undo,
) -> anyhow::Result<()> {
    for (i, slot) in guards.iter_mut().enumerate() {
        let Some(guard) = slot.clone() else { continue };
        undo.guards.push(guard.clone());
        let target = fleece[i]
            .clone()
            .unwrap_or_else(|| run.scope.target_node(i));
        let record = (masked(run, i) && fleece[i].is_some())
            .then(|| Mask::granularity_for(run.volumes[i].virtual_size));
        let Err(e) = guard
            .insert(run.qmp, &target, run.targets[i].since.as_deref(), record)
            .await
        else {
            continue;
        };
        let volume = &run.volumes[i].name;
        if let Err(out) = guard.remove(run.qmp).await {
            return Err(anyhow!(e)
                .context(format!("volume {volume}"))
                .context(format!("and taking it out again failed: {out:#}")));
        }
        undo.guards.pop();
        warn!(volume = %volume, error = %e, "bitback's filter could not be put under the device; copied through QEMU's own filter, which fails the guest's write when the backup cannot take its old data");
        *slot = None;
    }
    Ok(())
}

/// After success: the jobs are concluded; dismiss them, close the
/// targets, take back the passed fds and the key. Once the guards are out
/// (bitback's filter writes old data into its target), the NBD targets
/// close: the files get their tables and syncs side by side, while the
/// rest is taken back.
async fn close_targets(qmp: &Qmp, undo: &mut Undo) -> anyhow::Result<Vec<qcow2::Finished>> {
    for job in std::mem::take(&mut undo.jobs) {
        commands::dismiss_job(qmp, &job)
            .await
            .with_context(|| format!("dismissing job {job}"))?;
    }
    while let Some(guard) = undo.guards.first().cloned() {
        guard
            .remove(qmp)
            .await
            .with_context(|| format!("taking bitback's filter out from under {}", guard.qdev))?;
        undo.guards.remove(0);
    }
    if let Some(scope) = &undo.lock_scope {
        guard::unlock(qmp, scope, &std::mem::take(&mut undo.locks)).await;
    }
    let mut finishing = Vec::new();
    while let Some(node) = undo.servers.first().map(|s| s.node.clone()) {
        commands::delete_node(qmp, &node)
            .await
            .with_context(|| format!("closing target node {node}"))?;
        undo.nodes.retain(|n| *n != node);
        let server = undo.servers.remove(0);
        // The node's client is gone with it: the connection ends.
        finishing.push(tokio::spawn(async move {
            let (stream, upload) = server.finish().await?;
            let done = nbd_target::complete(stream, upload).await?;
            debug!(
                node,
                bytes = done.len,
                read_back = done.read_back,
                "NBD target complete"
            );
            anyhow::Ok(done)
        }));
    }
    // Format nodes before the file nodes under them.
    for node in std::mem::take(&mut undo.nodes).into_iter().rev() {
        commands::delete_node(qmp, &node)
            .await
            .with_context(|| format!("closing target node {node}"))?;
    }
    for fdset in std::mem::take(&mut undo.fdsets) {
        if let Err(e) = commands::remove_fdset(qmp, fdset).await {
            debug!(fdset, error = %e, "remove-fd");
        }
    }
    for id in std::mem::take(&mut undo.objects) {
        if let Err(e) = commands::delete_object(qmp, &id).await {
            warn!(object = %id, error = %e, "cannot remove the key from QEMU");
        }
    }
    remove_scratch(&mut undo.scratch);
    remove_scratch_dir(&mut undo.scratch_dir);
    let mut finished = Vec::new();
    for task in finishing {
        finished.push(task.await.context("completing an NBD target")??);
    }
    Ok(finished)
}

/// Waits until every job has ended; fails on any error, stall or signal.
/// A job's end is seen from its event or, should the event never come
/// (a proxy that mangles events, a lost line), from `query-jobs`.
async fn wait_jobs(
    qmp: &Qmp,
    opts: &CopyOptions,
    events: &mut Events,
    jobs: &[String],
    mut cancel: Cancel,
) -> anyhow::Result<()> {
    let bar = opts.progress.as_ref().map(|p| &p.0);
    if let Some(bar) = bar {
        bar.start(&format!("backing up {}", opts.vm), 0);
    }
    let mut done: std::collections::BTreeSet<String> = Default::default();
    let mut failure: Option<String> = None;
    let mut last_progress = (0u64, tokio::time::Instant::now());
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut share = Share::default();
    while done.len() < jobs.len() {
        tokio::select! {
            event = events.next(Duration::from_secs(3600)) => {
                let event = match event {
                    Ok(e) => e,
                    Err(qmp::Error::EventTimeout { .. }) => continue,
                    Err(e) => return Err(anyhow!(e).context("waiting for the backup jobs")),
                };
                let Some(job) = event.job_id().filter(|j| jobs.iter().any(|o| o == j)) else {
                    continue;
                };
                match event.name.as_str() {
                    "BLOCK_JOB_COMPLETED" => {
                        done.insert(job.to_string());
                        if let Some(error) = event.data.get("error").and_then(Value::as_str) {
                            failure.get_or_insert(format!("job {job} failed: {error}"));
                        }
                    }
                    "BLOCK_JOB_CANCELLED" => {
                        done.insert(job.to_string());
                        failure.get_or_insert(format!("job {job} was cancelled"));
                    }
                    "BLOCK_JOB_ERROR" => {
                        warn!(job, data = %event.data, "I/O error in a backup job");
                    }
                    _ => {}
                }
            }
            _ = tick.tick() => {
                let seen = job_progress(qmp, jobs).await;
                if seen.running {
                    crate::fault::point("mid-copy");
                }
                for (job, error) in seen.concluded {
                    if done.insert(job.clone()) {
                        debug!(job, "job concluded without its event; seen in query-jobs");
                        if let Some(error) = error {
                            failure.get_or_insert(format!("job {job} failed: {error}"));
                        }
                    }
                }
                if let Some(bar) = bar {
                    bar.update(seen.current, seen.total);
                }
                if let Rate::Shared(file) = &opts.rate {
                    share.apply(qmp, file, jobs, &done).await;
                }
                if seen.current != last_progress.0 {
                    last_progress = (seen.current, tokio::time::Instant::now());
                } else if last_progress.1.elapsed() > opts.stall_timeout && failure.is_none() {
                    failure = Some(format!("no progress for {:?}", opts.stall_timeout));
                    cancel_all(qmp, jobs).await;
                }
            }
            changed = cancel.changed() => {
                if changed.is_ok() && *cancel.borrow() && failure.is_none() {
                    failure = Some("interrupted".into());
                    cancel_all(qmp, jobs).await;
                }
            }
        }
        if failure.is_some() && done.len() < jobs.len() {
            // One job failed: the backup is lost; stop the others.
            cancel_all(qmp, jobs).await;
        }
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    match failure {
        Some(reason) => bail!("backup failed: {reason}"),
        None => Ok(()),
    }
}

/// A shared rate as last applied to the running jobs.
#[derive(Default)]
struct Share {
    per_job: Option<u64>,
    running: usize,
}

impl Share {
    /// Reads the shared budget again and, when it or the number of
    /// running jobs changed, gives each running job its part. A file that
    /// cannot be read keeps the speeds as they are.
    async fn apply(
        &mut self,
        qmp: &Qmp,
        file: &Path,
        jobs: &[String],
        done: &std::collections::BTreeSet<String>,
    ) {
        let total = match read_shared_rate(file) {
            Ok(total) => total,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "keeping the jobs' speeds");
                return;
            }
        };
        let running: Vec<&String> = jobs.iter().filter(|j| !done.contains(*j)).collect();
        let per_job = split(total, running.len());
        if self.per_job == Some(per_job) && self.running == running.len() {
            return;
        }
        debug!(total, per_job, jobs = running.len(), "shared rate applied");
        for job in running.iter().copied() {
            if let Err(e) = commands::set_job_speed(qmp, job, per_job).await {
                debug!(job, error = %e, "setting the job's speed");
            }
        }
        self.per_job = Some(per_job);
        self.running = running.len();
    }
}

async fn cancel_all(qmp: &Qmp, jobs: &[String]) {
    for job in jobs {
        let _ = qemu::backup::force_cancel(qmp, job).await;
    }
}

/// What `query-jobs` says of this run's jobs.
#[derive(Default)]
struct JobsSeen {
    current: u64,
    total: u64,
    running: bool,
    /// Jobs that have concluded, with their error if they failed.
    concluded: Vec<(String, Option<String>)>,
}

async fn job_progress(qmp: &Qmp, jobs: &[String]) -> JobsSeen {
    let Ok(reply) = query::jobs(qmp).await else {
        return JobsSeen::default();
    };
    let mut seen = JobsSeen::default();
    for j in reply {
        if !jobs.contains(&j.id) {
            continue;
        }
        seen.current += j.current_progress;
        seen.total += j.total_progress;
        match j.status.as_str() {
            "running" => seen.running = true,
            "concluded" | "null" => seen.concluded.push((j.id, j.error)),
            _ => {}
        }
    }
    seen
}
