//! `bitback sync`: a directory repository's points copied into a bucket,
//! under the same keys, so that the bucket (or an `aws s3 sync` of it
//! back to a directory) is the same repository; and a bucket's points
//! copied back into a directory ([`sync_from_bucket`]).
//!
//! A point is copied only as it verifies: everything but its data checked
//! first as `bitback verify` checks it, then each byte of its data proven
//! as it is read to be sent ([`super::proof`]), so a damaged point is
//! refused, never copied off-site, and the bytes stored are the bytes
//! proven. Its data files go first, its manifest last and
//! only if absent: the manifest is the point's commit in a bucket, so a
//! killed sync leaves no listed point (only objects the next sync writes
//! again), and two syncs at once copy a point once. Points go oldest
//! first, so a point's parents are in the bucket before it. A point
//! already there (its manifest, byte for byte) is skipped; one there with
//! another manifest is an error.
//!
//! One sync of a VM into a bucket at a time: `<vm>/.lock.json` in the bucket,
//! written only if absent (a second sync is refused, naming the first; a
//! dead sync's lock on this host is taken over), under which the
//! multipart uploads a dead sync left are aborted.
//!
//! Not copied: `state.json` (the source's own chain state, with its
//! checkpoint bitmaps in the VM), damage records, leases, locks.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use serde::Serialize;
use tracing::info;

use super::check::{Report, verify_backup, verify_but_data};
use super::outcome::BadInput;
use super::proof::FileProof;
use crate::repo::time::Utc;
use crate::repo::{
    Bucket, BucketLock, Entry, Manifest, MapRecord, Repo, Store, VolumeRecord, check_name,
};
use crate::s3::{LockMode, Retention};

/// What to copy.
#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// Only this VM; every VM of the source when `None`.
    pub vm: Option<String>,
    /// Object lock on every object of each point copied, for this many
    /// days from now, in this mode; the objects of its chain's parents
    /// are extended to the same date. The bucket must have object lock.
    pub retain: Option<(u32, LockMode)>,
    /// Files already uploaded as they were written, not sent again.
    pub streamed: Option<Arc<StreamTo>>,
}

/// The object lock of `retain` (days from now, mode).
pub fn retention_for(retain: Option<(u32, LockMode)>) -> Option<Retention> {
    retain.map(|(days, mode)| Retention {
        mode,
        until: Utc::from_unix(Utc::now().to_unix() + i64::from(days) * 86_400).rfc3339(),
    })
}

/// A bucket a backup's files go up to while they are written (the NBD
/// data path feeds each file's multipart upload, [`crate::s3::Feed`]),
/// and which of them went up whole: the upload after the backup sends
/// only the others (and every point's maps and manifest).
#[derive(Debug)]
pub struct StreamTo {
    pub bucket: Arc<Bucket>,
    /// The object lock each file is made under (from its first byte in
    /// the bucket, as a file the upload after the backup sends is).
    pub retention: Option<Retention>,
    /// Repository key -> the file's length, of each file that went up.
    went_up: Mutex<BTreeMap<String, u64>>,
}

impl StreamTo {
    pub fn new(bucket: Arc<Bucket>, retention: Option<Retention>) -> StreamTo {
        StreamTo {
            bucket,
            retention,
            went_up: Mutex::default(),
        }
    }

    /// Notes that the file of `key`, `len` bytes, is in the bucket.
    pub(super) fn went_up(&self, key: &str, len: u64) {
        self.lock().insert(key.to_string(), len);
    }

    /// The length of the file of `key`, when it went up as written.
    fn len_of(&self, key: &str) -> Option<u64> {
        self.lock().get(key).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.went_up
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One point, and what the sync did with it.
#[derive(Debug, Clone, Serialize)]
pub struct Synced {
    pub vm: String,
    pub backup: String,
    pub action: SyncAction,
    /// Objects written (data files, maps and the manifest).
    pub objects: usize,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Of those, bytes that went up while the backup wrote them.
    #[serde(skip_serializing_if = "is_zero")]
    pub streamed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Synced {
    /// Point `m`, found already there (nothing written yet).
    fn already_there(m: &Manifest) -> Synced {
        Synced {
            vm: m.vm.clone(),
            backup: m.id.clone(),
            action: SyncAction::AlreadyThere,
            objects: 0,
            bytes: 0,
            streamed: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncAction {
    Copied,
    AlreadyThere,
}

/// Copies every point of the chosen VMs of `source` not yet in `target`.
/// Stops at the first point that cannot be copied (the points after it
/// may build on it), with what was done so far in the error's context.
pub fn sync_to_bucket(
    source: &Repo,
    target: &Bucket,
    opts: &SyncOptions,
) -> anyhow::Result<Vec<Synced>> {
    let vms = chosen_vms(opts, source.store())?;
    if opts.retain.is_some() {
        require_lock(target)?;
    }
    let mut done = Vec::new();
    for vm in vms {
        // One sync of the VM into the bucket at a time.
        let lock = target.lock_vm(&vm, &super::in_bucket::holder("sync"))?;
        done.extend(sync_vm(source, target, &lock, &vm, opts)?);
    }
    Ok(done)
}

/// [`sync_to_bucket`] of one VM, holding its `lock` in the bucket: what
/// a dead run left half uploaded goes first.
fn sync_vm(
    source: &Repo,
    target: &Bucket,
    lock: &BucketLock<'_>,
    vm: &str,
    opts: &SyncOptions,
) -> anyhow::Result<Vec<Synced>> {
    let retention = retention_for(opts.retain);
    // No prune or consolidation changes the points while they copy.
    let _readers = source.read_lock(vm, "sync")?;
    target.abort_incomplete(lock, vm)?;
    let mut done = Vec::new();
    let mut copied = false;
    for m in source.backups(vm)? {
        let synced = sync_point(
            source,
            target,
            &m,
            retention.as_ref(),
            opts.streamed.as_deref(),
        )
        .with_context(|| format!("copying backup {} of vm {vm}", m.id))?;
        if let Some(retention) = &retention
            && synced.action == SyncAction::Copied
        {
            hold_parents(source, target, &m, retention).with_context(|| {
                format!(
                    "extending the object lock of the parents of backup {}",
                    m.id
                )
            })?;
        }
        copied |= synced.action == SyncAction::Copied;
        done.push(synced);
    }
    if copied {
        super::in_bucket::write_index(target, vm);
    }
    Ok(done)
}

fn sync_point(
    source: &Repo,
    target: &Bucket,
    m: &Manifest,
    retention: Option<&Retention>,
    streamed: Option<&StreamTo>,
) -> anyhow::Result<Synced> {
    let key = format!("{}/{}/manifest.json", m.vm, m.id);
    let manifest = source
        .store()
        .get(&key)?
        .with_context(|| format!("{key} vanished"))?;
    let mut synced = Synced::already_there(m);
    if let Some(there) = target.get(&key)? {
        if there != manifest {
            bail!(
                "{} holds another manifest for it: a point of another repository under the same name",
                target.locate(&key).display()
            );
        }
        return Ok(synced);
    }
    // Everything but the data proven now; the data as it is read to go
    // (no byte leaves unproven, and each is read once).
    let mut report = Report::default();
    verify_but_data(source, m, &mut report);
    if let Some(p) = report.problems.first() {
        bail!(
            "{DAMAGED}: {}{}",
            p.file
                .as_deref()
                .map(|f| format!("{f}: "))
                .unwrap_or_default(),
            p.problem
        );
    }
    crate::fault::hold("sync-checked");
    for (file, proof) in data_files(m) {
        let path = source.root().join(file);
        if let Some(len) = streamed.and_then(|s| s.len_of(file))
            && std::fs::metadata(&path).is_ok_and(|meta| meta.len() == len)
        {
            // It went up as it was written, each part with the CRC32C of
            // the bytes the backup wrote (taken from the buffer its
            // cluster digests came from), under the lock asked for then
            // (extended here to this point's date).
            if let Some(retention) = retention {
                target.extend_retention(file, retention)?;
            }
            synced.objects += 1;
            synced.bytes += len;
            synced.streamed += len;
            continue;
        }
        let mut proof = match proof {
            Of::Volume(v) => FileProof::of_volume(source, v).context(DAMAGED)?,
            Of::Map(record) => FileProof::of_map(record),
        };
        crate::fault::hold("sync-file-proven");
        synced.bytes += match target.upload_file(file, &path, retention, &mut proof) {
            Err(crate::repo::Error::S3(e @ crate::s3::Error::Unproven { .. })) => {
                return Err(anyhow::Error::from(e).context(DAMAGED));
            }
            sent => sent?,
        };
        synced.objects += 1;
    }
    crate::fault::point("sync-before-manifest");
    if target.put_new_retained(&key, &manifest, retention)? {
        synced.objects += 1;
        synced.bytes += manifest.len() as u64;
        synced.action = SyncAction::Copied;
        info!(vm = %m.vm, backup = %m.id, objects = synced.objects, bytes = synced.bytes, "copied");
    }
    Ok(synced)
}

/// The VMs a sync copies: the one asked for, or every VM of the source.
fn chosen_vms(opts: &SyncOptions, source: &dyn Store) -> anyhow::Result<Vec<String>> {
    Ok(match &opts.vm {
        Some(vm) => vec![vm.clone()],
        None => crate::repo::vms_in(source)?,
    })
}

/// Why a point is not copied, when its files are not what its manifest
/// records.
const DAMAGED: &str = "it does not verify, and a damaged point is never copied";

/// What a data object of a point is.
enum Of<'a> {
    Volume(&'a VolumeRecord),
    Map(&'a MapRecord),
}

/// The keys of a point's data objects (each volume's file and map), with
/// what each is.
fn data_files(m: &Manifest) -> Vec<(&str, Of<'_>)> {
    let mut files = Vec::new();
    for v in &m.volumes {
        files.push((v.file.as_str(), Of::Volume(v)));
        if let Some(map) = &v.cluster_map {
            files.push((map.file.as_str(), Of::Map(map)));
        }
    }
    files
}

/// Extends the object lock of every object of `m`'s parents (its whole
/// chain) to at least `retention`: no incremental outlives a point it
/// builds on.
fn hold_parents(
    source: &Repo,
    target: &Bucket,
    m: &Manifest,
    retention: &Retention,
) -> anyhow::Result<()> {
    let mut parent = m.parent.clone();
    while let Some(id) = parent {
        let p = source.manifest(&m.vm, &id)?;
        let mut keys: Vec<String> = data_files(&p)
            .into_iter()
            .map(|(key, _)| key.to_string())
            .collect();
        keys.push(format!("{}/{}/manifest.json", p.vm, p.id));
        for key in &keys {
            target.extend_retention(key, retention)?;
        }
        parent = p.parent.clone();
    }
    Ok(())
}

/// Copies every point of the chosen VMs of bucket `source` not yet in the
/// directory repository `target`, oldest first: each point's objects are
/// downloaded into its `.partial` directory and committed as a backup
/// does, then verified where they landed (a point that does not verify
/// is removed again, and the sync stops there).
pub fn sync_from_bucket(
    source: &Bucket,
    target: &Repo,
    opts: &SyncOptions,
) -> anyhow::Result<Vec<Synced>> {
    let vms = chosen_vms(opts, source)?;
    let mut done = Vec::new();
    for vm in vms {
        check_name("VM", &vm)?;
        let lock = target.lock_vm(&vm, "sync")?;
        for m in bucket_points(source, &vm)? {
            done.push(
                fetch_point(source, target, &lock, &m)
                    .with_context(|| format!("copying backup {} of vm {vm}", m.id))?,
            );
        }
    }
    Ok(done)
}

/// The committed points of `vm` in `bucket` (those with a manifest),
/// oldest first. A manifest that does not parse is an error naming it.
fn bucket_points(bucket: &Bucket, vm: &str) -> anyhow::Result<Vec<Manifest>> {
    let mut points = Vec::new();
    for entry in bucket.list(vm)? {
        let Entry::Prefix(id) = entry else { continue };
        if id.starts_with('.') {
            continue;
        }
        let key = format!("{vm}/{id}/manifest.json");
        // A point without a manifest is a sync that did not finish.
        let Some(bytes) = bucket.get(&key)? else {
            continue;
        };
        let m = Manifest::parse(&bytes, vm, &id)
            .with_context(|| format!("{} is not a manifest", bucket.locate(&key).display()))?;
        points.push(m);
    }
    points.sort_by(crate::repo::order);
    Ok(points)
}

fn fetch_point(
    source: &Bucket,
    target: &Repo,
    lock: &crate::repo::VmLock,
    m: &Manifest,
) -> anyhow::Result<Synced> {
    let mut synced = Synced::already_there(m);
    match target.manifest(&m.vm, &m.id) {
        Ok(there) if there == *m => return Ok(synced),
        Ok(_) => bail!(
            "{} holds another point of that id: a point of another repository under the same name",
            target.root().join(&m.vm).join(&m.id).display()
        ),
        Err(_) => {}
    }
    let partial = target.begin(lock, &m.vm, &m.id)?;
    for (key, _) in data_files(m) {
        let name = key.rsplit('/').next().unwrap_or(key);
        synced.bytes += source.download(key, &partial.dir().join(name))?;
        synced.objects += 1;
    }
    partial.commit(m)?;
    synced.objects += 1;
    let mut report = Report::default();
    verify_backup(target, m, &mut report, false);
    if let Some(p) = report.problems.first() {
        let problem = format!(
            "{}{}",
            p.file
                .as_deref()
                .map(|f| format!("{f}: "))
                .unwrap_or_default(),
            p.problem
        );
        target.delete_backup(lock, &m.vm, &m.id)?;
        bail!("it does not verify as copied, and was removed again: {problem}");
    }
    synced.action = SyncAction::Copied;
    info!(vm = %m.vm, backup = %m.id, objects = synced.objects, bytes = synced.bytes, "copied");
    Ok(synced)
}

/// Checks, before a backup touches its VM, that `bucket` answers these
/// credentials (a LIST of `vm`'s prefix) and, when `locking`, has object
/// lock.
pub fn check_bucket(bucket: &Bucket, vm: &str, locking: bool) -> anyhow::Result<()> {
    bucket
        .list(vm)
        .with_context(|| format!("reaching {}", bucket.location()))?;
    if locking {
        require_lock(bucket)?;
    }
    Ok(())
}

/// Refuses, before anything is written, a bucket without object lock
/// for `--retain-days`.
fn require_lock(bucket: &Bucket) -> anyhow::Result<()> {
    if !bucket.object_lock_enabled()? {
        return Err(BadInput(format!(
            "--retain-days: bucket {} has no object lock (a bucket gets it when it is made: \
             aws s3api create-bucket --object-lock-enabled-for-bucket); nothing was written",
            bucket.location()
        ))
        .into());
    }
    Ok(())
}

/// Takes `vm`'s lock in `bucket` for a backup into it: a second backup
/// or sync of the VM into the bucket is refused while the backup runs
/// (and cannot abort the uploads its writer feeds); a dead one's is
/// taken over on this host. Held by another run: an error. A store
/// that does not take the lock (full, failing): `None`, logged; the
/// backup then goes into the spool alone, its upload tried after it.
pub fn lock_for_backup<'a>(bucket: &'a Bucket, vm: &str) -> anyhow::Result<Option<BucketLock<'a>>> {
    match bucket.lock_vm(vm, &super::in_bucket::holder("backup")) {
        Ok(lock) => Ok(Some(lock)),
        Err(e @ crate::repo::Error::Locked { .. }) => Err(e.into()),
        Err(e) => {
            tracing::warn!(vm, error = %e, "the VM's lock in the bucket cannot be taken: the backup goes into the spool, and is uploaded after it if the store takes it then");
            Ok(None)
        }
    }
}

/// After a backup into the spool `spool`: every point of `vm` not yet in
/// `bucket` verified and uploaded under the backup's `lock` there (taken
/// now when the backup has none; as [`sync_to_bucket`]; the files in
/// `streamed` went up as the backup wrote them, and are not sent again),
/// then the chains older than the newest let go from the spool (they are
/// in the bucket now). A spool a reader holds keeps them until next time.
pub fn upload_spool(
    spool: &Repo,
    (bucket, lock): (&Bucket, Option<&BucketLock<'_>>),
    vm: &str,
    retain: Option<(u32, LockMode)>,
    streamed: Option<Arc<StreamTo>>,
) -> anyhow::Result<Vec<Synced>> {
    let opts = SyncOptions {
        vm: Some(vm.to_string()),
        retain,
        streamed,
    };
    let synced = match lock {
        Some(lock) => {
            if retain.is_some() {
                require_lock(bucket)?;
            }
            sync_vm(spool, bucket, lock, vm, &opts)?
        }
        None => sync_to_bucket(spool, bucket, &opts)?,
    };
    let pruned = spool
        .lock_vm(vm, "prune")
        .map_err(anyhow::Error::from)
        .and_then(|lock| super::retention::prune(spool, &lock, super::retention::Keep::Chains(1)));
    match pruned {
        Ok(r) if !r.deleted.is_empty() => {
            tracing::info!(vm, points = ?r.deleted, "older chains left the spool: they are in the bucket");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(vm, "the spool keeps its older chains for now: {e:#}"),
    }
    Ok(synced)
}
