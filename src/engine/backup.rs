//! Carrying out one backup of a running QEMU (or of a storage daemon that
//! bitback started on a stopped VM's images).
//!
//! The sequence, and why:
//! 1. Lock the VM; check that QEMU is the VM the state describes; remove
//!    what a crashed run of this repository and VM name left (`.partial`
//!    directories, its checkpoint bitmaps other than the active one, its
//!    target nodes and jobs; see [`super::scope`]: what other repositories
//!    or VM names made is never touched).
//! 2. Plan full or incremental per volume from the facts, after the
//!    structural check of each volume's files along the chain.
//! 3. Create each target natively (an incremental's backing file is
//!    `../<parent>/<volume>.qcow2`), hand it to QEMU as a passed fd where
//!    the monitor is a unix socket, and add it with `backing: null`.
//! 4. One `transaction`: per volume, the new persistent checkpoint bitmap
//!    and the `blockdev-backup` (full, or `sync=bitmap` from the active
//!    checkpoint with `bitmap-mode=never`, so a failed job loses nothing).
//!    With `--quiesce` the guest's filesystems are frozen just around it
//!    ([`super::quiesce`]), and a thaw guard thaws them if bitback dies in
//!    between.
//! 5. Wait for every job; on any failure or a signal, cancel them all, drop
//!    the targets and the new bitmap: the old checkpoint is untouched.
//! 6. Digest the files, write the manifest, commit (rename), move the
//!    state's active checkpoint, and only then remove the old bitmap.
//!
//! Steps 3 to 5 are the job driver's ([`super::copy`]); this module is
//! the repository run around them.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cluster_map::Baseline;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tracing::{debug, info, warn};

use super::copy::{self, Cancel, CopyOptions, CopyPlan, Target, clean_stray_jobs};
use super::key::Key;
use super::outcome::BadInput;
use super::plan::{self, Decision, Facts, Plan, Policy};
use super::scope::Scope;
use crate::qcow2::{self, Image};
use crate::qemu::blockdev::{Node, Qcow2};
use crate::qemu::{self, Volume};
use crate::qmp::Qmp;
use crate::repo::{
    self, BackupKind, Digest, MANIFEST_SCHEMA, Manifest, Repo, STATE_SCHEMA, VmIdentity, VmLock,
    VmState, VolumeRecord,
};

/// What one backup run should do.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    pub policy: Policy,
    /// Only these volumes (empty: all writable ones).
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Back up encrypted volumes without encrypting the backup.
    pub allow_plaintext: bool,
    /// How the copy runs (the VM's name among it).
    pub copy: CopyOptions,
}

impl BackupOptions {
    /// The VM's name in the repository.
    pub fn vm(&self) -> &str {
        &self.copy.vm
    }
}

/// A volume as this run names it: the inventory's volume, or a stopped
/// VM's volume renamed after its image mapping.
pub type Renames<'a> = &'a [(String, String)];

/// Runs one backup; returns the committed manifest.
///
/// Take the VM's lock ([`Repo::lock_vm`]) before connecting to QEMU: a
/// second run then fails on the lock at once, instead of waiting for a
/// monitor that serves one client at a time.
pub async fn backup(
    qmp: &Qmp,
    repo: &Repo,
    lock: &VmLock,
    opts: &BackupOptions,
    cancel: Cancel,
) -> anyhow::Result<Manifest> {
    backup_named(qmp, repo, lock, opts, cancel, &[]).await
}

/// Like [`backup`], with volumes renamed: `(node name, volume name)`.
pub async fn backup_named(
    qmp: &Qmp,
    repo: &Repo,
    lock: &VmLock,
    opts: &BackupOptions,
    cancel: Cancel,
    renames: Renames<'_>,
) -> anyhow::Result<Manifest> {
    let vm = opts.vm();
    repo::check_name("VM", vm)?;
    if lock.vm() != vm {
        bail!(
            "internal error: holding the lock of vm {} for vm {vm}",
            lock.vm()
        );
    }
    let ready = get_ready(qmp, repo, lock, opts, renames).await?;
    let planned = plan_backup(qmp, repo, opts, &ready);
    let (manifest, thawed) =
        copy_and_commit(qmp, repo, lock, opts, cancel, &ready, &planned).await?;
    let checkpoint = manifest.checkpoint.clone();
    let state = VmState {
        schema: STATE_SCHEMA,
        vm: vm.to_string(),
        active_checkpoint: Some(checkpoint.clone()),
        last_backup: Some(manifest.id.clone()),
        volumes: ready.volumes.iter().map(state_volume).collect(),
        last_seq: manifest.seq,
        identity: Some(ready.identity.clone()),
    };
    repo.save_state(lock, &state)?;
    retire_checkpoint(qmp, &ready, &checkpoint).await;
    if let Some(e) = thawed {
        bail!(
            "backup {} is committed, but thawing the guest failed: {e}; \
             the guest's filesystems may still be frozen (run guest-fsfreeze-thaw through its agent)",
            manifest.id
        );
    }
    Ok(manifest)
}

/// What a backup of the VM would be now, volume by volume, changing
/// nothing: no lock taken, nothing cleaned, nothing written. The real run
/// first removes what an interrupted run left (a stray checkpoint, jobs),
/// which can change a volume's plan. `repo` is `None` where the
/// repository does not exist yet.
pub async fn plan_named(
    qmp: &Qmp,
    repo: Option<&Repo>,
    opts: &BackupOptions,
    renames: Renames<'_>,
) -> anyhow::Result<Plan> {
    let vm = opts.vm();
    repo::check_name("VM", vm)?;
    let volumes = select_volumes(qmp, opts, renames).await?;
    check_plaintext(opts, &volumes)?;
    let Some(repo) = repo else {
        let (no_problems, no_content) = (BTreeMap::new(), BTreeMap::new());
        return Ok(plan::plan(&Facts {
            policy: &opts.policy,
            state: None,
            last: None,
            volumes: &volumes,
            encrypted: opts.copy.encrypt.is_some(),
            parent_problem: None,
            parent_volume_problems: &no_problems,
            content: &no_content,
        }));
    };
    let (state, identity) = known_vm(qmp, repo, opts, &volumes).await?;
    let ready = Ready {
        scope: Scope::new(&repo.id()?.unwrap_or_default(), vm),
        backups: repo.backups(vm)?,
        active: state.as_ref().and_then(|s| s.active_checkpoint.clone()),
        volumes,
        state,
        identity,
    };
    Ok(plan_backup(qmp, repo, opts, &ready).plan)
}

/// The VM's state in the repository and QEMU's identity, once the VM is
/// known to be the machine the repository's backups are of.
async fn known_vm(
    qmp: &Qmp,
    repo: &Repo,
    opts: &BackupOptions,
    volumes: &[Volume],
) -> anyhow::Result<(Option<VmState>, VmIdentity)> {
    let vm = opts.vm();
    let state = repo.load_state(vm)?;
    let identity = identity(qmp).await;
    check_identity(vm, state.as_ref(), &identity, volumes, opts.policy.replaced)?;
    Ok((state, identity))
}

/// What a run knows before it plans: its volumes, the VM's state and
/// identity, its scope, the VM's backups and its active checkpoint, with
/// what earlier runs left (partial directories, jobs, bitmaps) cleaned.
struct Ready {
    volumes: Vec<Volume>,
    state: Option<VmState>,
    identity: VmIdentity,
    scope: Scope,
    backups: Vec<Manifest>,
    active: Option<String>,
}

/// The checks and the cleanup before a plan: the volumes asked for, the
/// VM still the one the repository knows, strays of earlier runs gone.
async fn get_ready(
    qmp: &Qmp,
    repo: &Repo,
    lock: &VmLock,
    opts: &BackupOptions,
    renames: Renames<'_>,
) -> anyhow::Result<Ready> {
    let vm = opts.vm();
    let mut volumes = select_volumes(qmp, opts, renames).await?;
    check_plaintext(opts, &volumes)?;
    let (state, identity) = known_vm(qmp, repo, opts, &volumes).await?;
    let scope = Scope::new(&repo.ensure_id()?, vm);
    repo.clean_partials(lock, vm)?;
    if clean_stray_jobs(qmp, &scope).await? {
        // A cancelled job no longer holds its bitmap busy: look again.
        volumes = select_volumes(qmp, opts, renames).await?;
    }
    let backups = repo.backups(vm)?;
    let active = state.as_ref().and_then(|s| s.active_checkpoint.clone());
    clean_stray_bitmaps(qmp, &scope, &mut volumes, active.as_deref()).await?;
    Ok(Ready {
        volumes,
        state,
        identity,
        scope,
        backups,
        active,
    })
}

/// A run's plan (the chain rules) and, per volume going by content, its
/// baseline (the parent chain's cluster maps) or why it has none.
struct Planned {
    plan: Plan,
    baselines: Baselines,
}

/// The volumes' plan, with the baselines of the volumes that go by
/// content.
fn plan_backup(qmp: &Qmp, repo: &Repo, opts: &BackupOptions, ready: &Ready) -> Planned {
    let last = ready.backups.last();
    let buildable = last.map(|m| super::chain::check_buildable(repo, m));
    let parent_problem = match (last, &buildable) {
        (Some(m), Some(b)) => b
            .point
            .clone()
            .or_else(|| check_key(repo, m, opts.copy.encrypt.as_ref(), &b.volumes).err()),
        _ => None,
    };
    let no_problems = BTreeMap::new();
    let no_content = BTreeMap::new();
    let mut facts = Facts {
        policy: &opts.policy,
        state: ready.state.as_ref(),
        last,
        volumes: &ready.volumes,
        encrypted: opts.copy.encrypt.is_some(),
        parent_problem,
        parent_volume_problems: buildable.as_ref().map_or(&no_problems, |b| &b.volumes),
        content: &no_content,
    };
    let mut plan = plan::plan(&facts);
    // Volumes whose bitmap alone failed them: by content, if they can be.
    let baselines = match last {
        Some(last) => content_baselines(repo, opts, qmp, &plan, last),
        None => BTreeMap::new(),
    };
    let content: BTreeMap<String, Result<(), String>> = baselines
        .iter()
        .map(|(v, b)| (v.clone(), b.as_ref().map(|_| ()).map_err(Clone::clone)))
        .collect();
    if !content.is_empty() {
        facts.content = &content;
        plan = plan::plan(&facts);
    }
    let vm = opts.vm();
    for (i, v) in plan.volumes.iter().enumerate() {
        debug!(vm, volume = %v.volume, plan = %plan.volume_reason(i), "volume planned");
    }
    info!(vm, plan = %plan.reason(), "planned");
    Planned { plan, baselines }
}

type Baselines = BTreeMap<String, Result<Arc<Baseline>, String>>;

/// Copies the point into a partial backup directory and commits it: the
/// committed manifest, and a thaw that failed (the backup stands, the
/// run must not report success). Anything that fails before the commit
/// takes the new checkpoint back and leaves no backup.
async fn copy_and_commit(
    qmp: &Qmp,
    repo: &Repo,
    lock: &VmLock,
    opts: &BackupOptions,
    cancel: Cancel,
    ready: &Ready,
    Planned { plan, baselines }: &Planned,
) -> anyhow::Result<(Manifest, Option<String>)> {
    let vm = opts.vm();
    // Phase timings at debug (-v): where a backup's time goes.
    let started = std::time::Instant::now();
    let lap = |what: &str| debug!(vm, ms = started.elapsed().as_millis() as u64, "{what}");
    let now = repo::time::Utc::now();
    let newest_id = ready.backups.iter().map(|m| m.id.as_str()).max();
    let id = repo.new_backup_id(vm, &now, newest_id)?;
    let seq = ready
        .backups
        .iter()
        .map(|m| m.seq)
        .chain(ready.state.as_ref().map(|s| s.last_seq))
        .max()
        .unwrap_or(0)
        + 1;
    let checkpoint = ready.scope.checkpoint(&id);
    let partial = repo.begin(lock, vm, &id)?;
    let run = CopyPlan {
        qmp,
        opts: &opts.copy,
        scope: &ready.scope,
        volumes: &ready.volumes,
        targets: planned_targets(plan, &ready.volumes, (partial.dir(), vm, &id), baselines),
        checkpoint: Some(&checkpoint),
    };
    // On failure, dropping the partial removes its directory.
    let mut copied = copy::copy(&run, cancel.clone()).await?;
    let thawed = copied.thaw_failure();
    lap("copy jobs done, targets closed");

    let built = build_manifest(
        &run,
        plan,
        (copied.guards(), copied.finished()),
        &checkpoint,
        &id,
        seq,
        &now,
    )
    .await;
    let manifest = match built {
        Ok(_) if *cancel.borrow() => {
            copied.take_back(qmp).await;
            bail!("interrupted before the commit; nothing was kept");
        }
        Ok(manifest) => manifest,
        Err(e) => {
            copied.take_back(qmp).await;
            return Err(e);
        }
    };
    lap("files read back and digested");
    crate::fault::point("before-commit");
    if let Err(e) = partial.commit(&manifest) {
        copied.take_back(qmp).await;
        return Err(e.into());
    }
    lap("committed (files synced, renamed)");
    crate::fault::point("after-commit");
    Ok((manifest, thawed))
}

/// Once the new checkpoint is active, the old one goes, if it is ours.
/// One named for another repository id is the checkpoint of the
/// repository this one was copied from, which may still build on it.
async fn retire_checkpoint(qmp: &Qmp, ready: &Ready, checkpoint: &str) {
    let vm = ready.scope.vm.as_str();
    let old = ready.active.as_deref().filter(|old| *old != checkpoint);
    if let Some(foreign) = old.filter(|old| {
        super::scope::owner(old)
            .is_some_and(|o| o.repo_id.is_some() && !ready.scope.owns_checkpoint(old))
    }) {
        info!(vm, bitmap = %foreign, "the previous checkpoint belongs to the repository this one was copied from; it is left to that repository");
    } else if let Some(old) = old {
        for v in &ready.volumes {
            if !v.bitmaps.iter().any(|b| b.name == old) {
                info!(vm, volume = %v.name, bitmap = %old, "the previous checkpoint bitmap was already gone");
                continue;
            }
            if let Err(e) = qemu::remove_bitmap(qmp, &v.node_name, old).await {
                warn!(vm, volume = %v.name, bitmap = %old, error = %e, "cannot remove the previous checkpoint bitmap; the next backup of this vm removes it");
            }
        }
    }
}

/// Who the QEMU says it is: `query-uuid` (unless all zeros) and
/// `query-name`. A storage daemon has neither.
async fn identity(qmp: &Qmp) -> VmIdentity {
    let (uuid, name) = qemu::query::identity(qmp).await;
    VmIdentity { uuid, name }
}

fn describe(identity: &VmIdentity, images: &[&str]) -> String {
    match (&identity.uuid, &identity.name) {
        (Some(u), Some(n)) => format!("QEMU uuid {u} (name {n})"),
        (Some(u), None) => format!("QEMU uuid {u}"),
        (None, Some(n)) => format!("QEMU named {n}"),
        (None, None) => format!("images {}", images.join(", ")),
    }
}

/// Refuses to back up a different machine under a VM name that has
/// backups: compared by UUID when both are known, else by name, else by
/// the volumes' images (at least one must be the same).
fn check_identity(
    vm: &str,
    state: Option<&VmState>,
    now: &VmIdentity,
    volumes: &[Volume],
    replaced: bool,
) -> anyhow::Result<()> {
    let Some(state) = state else {
        return Ok(());
    };
    let Some(before) = &state.identity else {
        // A state from before identities: recorded by this backup.
        return Ok(());
    };
    let same = match (&before.uuid, &now.uuid, &before.name, &now.name) {
        (Some(a), Some(b), _, _) => a == b,
        (_, _, Some(a), Some(b)) => a == b,
        _ => {
            state.volumes.is_empty()
                || volumes
                    .iter()
                    .any(|v| state.volumes.iter().any(|s| s.image_file == v.image_file))
        }
    };
    if same || replaced {
        if !same {
            info!(
                vm,
                "a replaced vm: its identity is recorded anew and the backup is full"
            );
        }
        return Ok(());
    }
    let old_images: Vec<&str> = state
        .volumes
        .iter()
        .map(|v| v.image_file.as_str())
        .collect();
    let new_images: Vec<&str> = volumes.iter().map(|v| v.image_file.as_str()).collect();
    Err(BadInput(format!(
        "vm {vm} in this repository is {}, but this is {}: a different machine; nothing was written\n\
         hint: back it up under another --vm name, or pass --vm-replaced if it replaced the old vm (its next backup is full)",
        describe(before, &old_images),
        describe(now, &new_images),
    ))
    .into())
}

/// The manifest of the finished files: digests and data counts read back.
async fn build_manifest(
    run: &CopyPlan<'_>,
    plan: &Plan,
    (guards, finished): (&[Option<repo::Guard>], &[qcow2::Finished]),
    checkpoint: &str,
    id: &str,
    seq: u64,
    now: &repo::time::Utc,
) -> anyhow::Result<Manifest> {
    let vm = run.opts.vm.as_str();
    let (kind, parent, chain, position) = match &plan.base {
        None => (BackupKind::Full, None, id.to_string(), 0),
        Some(base) => (
            BackupKind::Incremental,
            Some(base.parent.clone()),
            base.chain.clone(),
            base.position,
        ),
    };
    let mut records = Vec::new();
    for (i, v) in run.volumes.iter().enumerate() {
        let path = run.targets[i].path.clone();
        // Written by bitback: digested as it was written. Written by QEMU:
        // read back.
        let (digest, bytes_written) = match finished.get(i) {
            Some(done) => (done.digest, done.data_bytes),
            None => digest_and_count(path.clone())
                .await
                .with_context(|| format!("reading back {}", path.display()))?,
        };
        let backing = run.targets[i].backing.clone();
        let file_size = std::fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        records.push(VolumeRecord {
            name: v.name.clone(),
            node: v.node_name.clone(),
            image_file: v.image_file.clone(),
            format: v.format.clone(),
            virtual_size: v.virtual_size,
            kind: if backing.is_some() {
                BackupKind::Incremental
            } else {
                BackupKind::Full
            },
            reason: plan.volume_reason(i),
            disk: Some(v.kind),
            tracking: Some(v.kind.tracking()),
            file: VolumeRecord::repo_file(vm, id, &v.name),
            backing,
            bytes_written,
            digest,
            file_size: Some(file_size),
            guard: guards.get(i).copied().flatten(),
            changes: Some(match plan.volumes[i].decision {
                Decision::Full(_) => repo::Changes::Full,
                Decision::Incremental => repo::Changes::Bitmap,
                Decision::Content(_) => repo::Changes::Content,
            }),
            bytes_read: finished.get(i).map(|done| done.received),
            cluster_map: finished
                .get(i)
                .and_then(|done| done.map.as_ref())
                .map(|map| repo::MapRecord {
                    file: VolumeRecord::map_file(vm, id, &v.name),
                    digest: map.digest,
                    records: map.records,
                }),
        });
    }
    Ok(Manifest {
        schema: MANIFEST_SCHEMA,
        id: id.to_string(),
        vm: vm.to_string(),
        seq,
        kind,
        reason: plan.reason(),
        chain,
        position,
        parent,
        checkpoint: checkpoint.to_string(),
        time: now.rfc3339(),
        volumes: records,
        qemu_version: Some(run.qmp.greeting().version.to_string()),
        encryption: run.opts.encrypt.as_ref().map(|_| repo::Encryption::Luks),
    })
}

/// Refuses to copy encrypted volumes into plaintext files unless asked to.
fn check_plaintext(opts: &BackupOptions, volumes: &[Volume]) -> anyhow::Result<()> {
    if opts.copy.encrypt.is_some() || opts.allow_plaintext {
        return Ok(());
    }
    let encrypted: Vec<&str> = volumes
        .iter()
        .filter(|v| v.encrypted)
        .map(|v| v.name.as_str())
        .collect();
    if encrypted.is_empty() {
        return Ok(());
    }
    Err(BadInput(format!(
        "volume {} of vm {} is encrypted, and its backup would hold the guest's data in plaintext\n\
         hint: encrypt the backup with --encrypt-key-file FILE, exclude the volume with --exclude, \
         or accept plaintext backups with --allow-plaintext",
        encrypted.join(", "),
        opts.vm()
    ))
    .into())
}

/// With a key: whether it opens the last backup's files (all files of an
/// encrypted chain share one key; a new key needs a new chain). Reads one
/// sector of the first volume whose files are whole through `qemu-io`,
/// which derives the key as QEMU would (about as long as LUKS's iteration
/// time, 2 s by default).
fn check_key(
    repo: &Repo,
    last: &Manifest,
    key: Option<&Key>,
    damaged: &BTreeMap<String, String>,
) -> Result<(), String> {
    let (Some(key), Some(_)) = (key, &last.encryption) else {
        return Ok(());
    };
    // A damaged file says nothing of the key: try the first whole one.
    let Some(first) = last.volumes.iter().find(|v| !damaged.contains_key(&v.name)) else {
        return Ok(());
    };
    let path = repo.root().join(&first.file);
    let file = Node::File {
        filename: path,
        node_name: None,
        read_only: true,
        discard: None,
    };
    let image = Qcow2::over(file)
        .no_backing()
        .read_only()
        .encrypted(Some("k"));
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.arg("--object")
        .arg("secret,id=k,format=raw,file=/dev/stdin")
        .args(["-r", "-c", "read 0 512"])
        .arg(image.node().json_filename().map_err(|e| e.to_string())?);
    let out = key
        .feed(&mut cmd)
        .map_err(|e| format!("running qemu-io to check the key (install qemu-utils): {e}"))?;
    // qemu-io exits non-zero when it cannot open the image: a key that
    // unlocks no key slot. (A failed read it reports on stdout and exits
    // 0; opening is what tells the key.)
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "the key in {} does not open {} ({}); a new key starts a new chain",
        key.path().display(),
        first.file,
        stderr.trim().lines().last().unwrap_or("qemu-io failed")
    ))
}

/// The volumes to back up, named and filtered as asked.
async fn select_volumes(
    qmp: &Qmp,
    opts: &BackupOptions,
    renames: Renames<'_>,
) -> anyhow::Result<Vec<Volume>> {
    let mut all = qemu::named(qemu::list_volumes(qmp).await?, renames);
    // Backup targets (of any repository) are never volumes.
    all.retain(|v| !super::scope::is_target_node(&v.node_name));
    let names: Vec<&str> = all.iter().map(|v| v.name.as_str()).collect();
    for wanted in opts.include.iter().chain(&opts.exclude) {
        if !names.contains(&wanted.as_str()) {
            return Err(BadInput(format!(
                "vm {} has no volume {wanted}; its volumes are: {}",
                opts.vm(),
                names.join(", ")
            ))
            .into());
        }
    }
    let mut selected = Vec::new();
    for v in all {
        if opts.exclude.contains(&v.name)
            || (!opts.include.is_empty() && !opts.include.contains(&v.name))
        {
            continue;
        }
        if v.read_only {
            if opts.include.contains(&v.name) {
                return Err(BadInput(format!(
                    "volume {} is read-only and cannot carry a checkpoint",
                    v.name
                ))
                .into());
            }
            info!(volume = %v.name, "read-only volume skipped");
            continue;
        }
        repo::check_name("volume", &v.name).with_context(|| {
            format!(
                "volume {} cannot be a backup file name; exclude it or give the device an id",
                v.name
            )
        })?;
        selected.push(v);
    }
    if selected.is_empty() {
        return Err(BadInput(format!("no volume to back up in vm {}", opts.vm())).into());
    }
    Ok(selected)
}

/// Removes checkpoint bitmaps other than the active one: left by a run
/// that died before its commit (or after it, before the state moved on).
async fn clean_stray_bitmaps(
    qmp: &Qmp,
    scope: &Scope,
    volumes: &mut [Volume],
    active: Option<&str>,
) -> anyhow::Result<()> {
    let vm = scope.vm.as_str();
    for v in volumes.iter_mut() {
        let stray: Vec<String> = v
            .bitmaps
            .iter()
            .filter(|b| scope.owns_checkpoint(&b.name) && Some(b.name.as_str()) != active)
            .map(|b| b.name.clone())
            .collect();
        for name in stray {
            info!(vm, volume = %v.name, bitmap = %name, "removing a checkpoint bitmap the repository does not use");
            qemu::remove_bitmap(qmp, &v.node_name, &name)
                .await
                .with_context(|| format!("removing stray bitmap {name} from volume {}", v.name))?;
            v.bitmaps.retain(|b| b.name != name);
        }
    }
    Ok(())
}

/// The baselines of the volumes `plan` made full only for a lost bitmap:
/// the last backup's chain's cluster maps, or why there are none.
fn content_baselines(
    repo: &Repo,
    opts: &BackupOptions,
    qmp: &Qmp,
    plan: &Plan,
    last: &Manifest,
) -> BTreeMap<String, Result<Arc<Baseline>, String>> {
    let lost: Vec<&str> = plan
        .volumes
        .iter()
        .filter(|v| matches!(&v.decision, Decision::Full(r) if r.is_bitmap_loss()))
        .map(|v| v.volume.as_str())
        .collect();
    if lost.is_empty() {
        return BTreeMap::new();
    }
    let chain = match copy::writes_natively(&opts.copy, qmp) {
        Err(why) => Err(why),
        Ok(()) => super::chain::chain(repo, last).map_err(|e| format!("{e:#}")),
    };
    lost.into_iter()
        .map(|volume| {
            let baseline = chain.as_ref().map_err(Clone::clone).and_then(|chain| {
                super::content::baseline(repo, chain, volume, Some(opts.copy.cluster_size))
            });
            (volume.to_string(), baseline)
        })
        .collect()
}

/// The targets of backup `id` of `vm`, written in `dir`, as `plan`
/// decided.
fn planned_targets(
    plan: &Plan,
    volumes: &[Volume],
    (dir, vm, id): (&Path, &str, &str),
    baselines: &BTreeMap<String, Result<Arc<Baseline>, String>>,
) -> Vec<Target> {
    volumes
        .iter()
        .zip(&plan.volumes)
        .map(|(v, p)| {
            let path = dir.join(VolumeRecord::file_name(&v.name));
            let key = Some(VolumeRecord::repo_file(vm, id, &v.name));
            match (&p.decision, &plan.base) {
                (Decision::Incremental, Some(base)) => Target {
                    path,
                    backing: Some(VolumeRecord::backing_name(&base.parent, &v.name)),
                    since: Some(base.checkpoint.clone()),
                    baseline: None,
                    key,
                },
                (Decision::Content(_), Some(base)) => Target {
                    path,
                    backing: Some(VolumeRecord::backing_name(&base.parent, &v.name)),
                    since: None,
                    baseline: baselines
                        .get(&v.name)
                        .and_then(|b| b.as_ref().ok())
                        .cloned(),
                    key,
                },
                _ => Target {
                    path,
                    backing: None,
                    since: None,
                    baseline: None,
                    key,
                },
            }
        })
        .collect()
}

/// BLAKE3 of the whole file, and the guest bytes of data it holds (zero
/// clusters are metadata only).
async fn digest_and_count(path: PathBuf) -> anyhow::Result<(Digest, u64)> {
    tokio::task::spawn_blocking(move || -> anyhow::Result<(Digest, u64)> {
        let image = Image::open(&path)?;
        let held = qcow2::map(&image)?
            .iter()
            .filter(|e| matches!(e.kind, qcow2::Kind::Data | qcow2::Kind::Compressed))
            .map(|e| e.length)
            .sum();
        Ok((crate::digest::file(&path)?, held))
    })
    .await?
}

/// What the VM's state records of a volume the run saw.
pub(super) fn state_volume(v: &crate::qemu::Volume) -> crate::repo::StateVolume {
    crate::repo::StateVolume {
        name: v.name.clone(),
        node: v.node_name.clone(),
        image_file: v.image_file.clone(),
        format: v.format.clone(),
        virtual_size: v.virtual_size,
    }
}
