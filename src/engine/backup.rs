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
//!    With `--quiesce` the guest's filesystems are frozen just around it,
//!    and a thaw guard ([`super::thaw_guard`]) thaws them if bitback dies
//!    in between.
//! 5. Wait for every job; on any failure or a signal, cancel them all, drop
//!    the targets and the new bitmap: the old checkpoint is untouched.
//! 6. Digest the files, write the manifest, commit (rename), move the
//!    state's active checkpoint, and only then remove the old bitmap.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::BadInput;
use super::key::Key;
use super::plan::{self, Decision, Facts, Plan, Policy};
use super::scope::Scope;
use super::thaw_guard::{ThawGuard, Thawer};
use crate::qcow2::{self, CreateOptions, Image};
use crate::qemu::agent::Agent;
use crate::qemu::{self, Tracking, Volume};
use crate::qmp::{self, Endpoint, Events, Qmp};
use crate::repo::{
    self, BackupKind, MANIFEST_SCHEMA, Manifest, Repo, STATE_SCHEMA, VmIdentity, VmLock, VmState,
    VolumeRecord,
};

/// What one backup run should do.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub vm: String,
    pub policy: Policy,
    /// Only these volumes (empty: all writable ones).
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// The guest agent socket, to freeze filesystems around the start.
    pub quiesce: Option<PathBuf>,
    /// A libvirt domain whose filesystems libvirt freezes around the start
    /// (`virsh domfsfreeze` / `domfsthaw`: libvirt holds the agent's
    /// channel). A freeze that fails or takes longer than
    /// `freeze_timeout` is followed by a thaw and logged, and the copy goes
    /// on unfrozen, as CloudStack's script does; a thaw that fails after
    /// the copy started fails the run.
    pub quiesce_libvirt: Option<crate::libvirt::Domain>,
    /// Bytes per second per job; `None` for no limit.
    pub rate_limit: Option<u64>,
    /// Write compressed clusters (`blockdev-backup compress=true`):
    /// smaller files, more CPU in QEMU; not with encryption.
    pub compress: bool,
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
    pub progress: Option<super::ProgressSink>,
    /// Write every backup file as a LUKS-encrypted qcow2 with this key.
    pub encrypt: Option<Key>,
    /// LUKS key derivation time in milliseconds; `None` for QEMU's default
    /// (2000). Every open of a file (the backup's own, a restore's) costs
    /// about this long.
    pub encrypt_iter_time: Option<u64>,
    /// Back up encrypted volumes without encrypting the backup.
    pub allow_plaintext: bool,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            vm: String::new(),
            policy: Policy::default(),
            include: Vec::new(),
            exclude: Vec::new(),
            quiesce: None,
            quiesce_libvirt: None,
            rate_limit: None,
            compress: false,
            cluster_size: 64 << 10,
            granularity: Some(64 << 10),
            perf: Perf::default(),
            stall_timeout: Duration::from_secs(600),
            freeze_timeout: Duration::from_secs(30),
            progress: None,
            encrypt: None,
            encrypt_iter_time: None,
            allow_plaintext: false,
        }
    }
}

/// `blockdev-backup`'s `x-perf` tuning (QEMU 6.0 and newer; an unstable
/// interface, so each field is passed only when set and the QEMU's schema
/// lists it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Perf {
    /// Parallel copy requests per job (QEMU's default: 64).
    pub max_workers: Option<u64>,
    /// Largest request in bytes (QEMU's default: no limit beyond its own
    /// 1 MiB buffer, 16 MiB with copy offloading).
    pub max_chunk: Option<u64>,
    /// Copy with copy_file_range (QEMU's default: off).
    pub use_copy_range: Option<bool>,
}

impl Perf {
    fn fields(&self) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        if let Some(n) = self.max_workers {
            out.push(("max-workers", n.into()));
        }
        if let Some(n) = self.max_chunk {
            out.push(("max-chunk", n.into()));
        }
        if let Some(b) = self.use_copy_range {
            out.push(("use-copy-range", b.into()));
        }
        out
    }

    /// The `x-perf` object this QEMU accepts, warning about what it lacks.
    async fn for_qemu(&self, qmp: &Qmp) -> anyhow::Result<Option<Value>> {
        let fields = self.fields();
        if fields.is_empty() {
            return Ok(None);
        }
        let known = crate::qemu::schema::backup_perf_members(qmp)
            .await
            .context("reading QEMU's QMP schema")?;
        let mut perf = serde_json::Map::new();
        for (name, value) in fields {
            if known.iter().any(|k| k == name) {
                perf.insert(name.into(), value);
            } else {
                warn!(
                    option = name,
                    qemu = %qmp.greeting().version,
                    "this QEMU has no x-perf {name} (QEMU 6.0 and newer); copying with its default"
                );
            }
        }
        Ok((!perf.is_empty()).then_some(Value::Object(perf)))
    }
}

/// Set to true (by a signal handler) to stop a backup at the next point
/// where it can stop cleanly.
pub type Cancel = watch::Receiver<bool>;

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
    let vm = opts.vm.as_str();
    repo::check_name("VM", vm)?;
    if lock.vm() != vm {
        bail!(
            "internal error: holding the lock of vm {} for vm {vm}",
            lock.vm()
        );
    }
    let mut volumes = select_volumes(qmp, opts, renames).await?;
    check_plaintext(opts, &volumes)?;
    let state = repo.load_state(vm)?;
    let identity = identity(qmp).await;
    check_identity(
        vm,
        state.as_ref(),
        &identity,
        &volumes,
        opts.policy.replaced,
    )?;
    let scope = Scope::new(&repo.ensure_id()?, vm);
    repo.clean_partials(lock, vm)?;
    if clean_stray_jobs(qmp, &scope).await? {
        // A cancelled job no longer holds its bitmap busy: look again.
        volumes = select_volumes(qmp, opts, renames).await?;
    }
    let backups = repo.backups(vm)?;
    let last = backups.last();
    let active = state.as_ref().and_then(|s| s.active_checkpoint.clone());
    clean_stray_bitmaps(qmp, &scope, &mut volumes, active.as_deref()).await?;

    let buildable = last.map(|m| super::chain::check_buildable(repo, m));
    let parent_problem = match (last, &buildable) {
        (Some(m), Some(b)) => b
            .point
            .clone()
            .or_else(|| check_key(repo, m, opts.encrypt.as_ref(), &b.volumes).err()),
        _ => None,
    };
    let no_problems = BTreeMap::new();
    let plan = plan::plan(&Facts {
        policy: &opts.policy,
        state: state.as_ref(),
        last,
        volumes: &volumes,
        encrypted: opts.encrypt.is_some(),
        parent_problem,
        parent_volume_problems: buildable.as_ref().map_or(&no_problems, |b| &b.volumes),
    });
    for (i, v) in plan.volumes.iter().enumerate() {
        debug!(vm, volume = %v.volume, plan = %plan.volume_reason(i), "volume planned");
    }
    info!(vm, plan = %plan.reason(), "planned");
    // Phase timings at debug (-v): where a backup's time goes.
    let started = std::time::Instant::now();

    let now = repo::time::Utc::now();
    let newest_id = backups.iter().map(|m| m.id.as_str()).max();
    let id = repo.new_backup_id(vm, &now, newest_id)?;
    let seq = backups
        .iter()
        .map(|m| m.seq)
        .chain(state.as_ref().map(|s| s.last_seq))
        .max()
        .unwrap_or(0)
        + 1;
    let checkpoint = scope.checkpoint(&id);
    let partial = repo.begin(lock, vm, &id)?;
    let mut undo = Undo::default();
    let run = Run {
        qmp,
        opts,
        scope: &scope,
        volumes: &volumes,
        targets: Target::planned(&plan, &volumes, partial.dir()),
        checkpoint: Some(&checkpoint),
    };
    let result = run_jobs(&run, &mut undo, cancel.clone()).await;
    if let Err(e) = result {
        undo.rollback(qmp).await;
        // Dropping the partial removes its directory.
        drop(partial);
        return Err(e);
    }
    let thawed = undo.thaw_failure.take();
    debug!(
        vm,
        ms = started.elapsed().as_millis() as u64,
        "copy jobs done, targets closed"
    );

    let built = build_manifest(&run, &plan, &checkpoint, &id, seq, &now).await;
    let manifest = match built {
        Ok(_) if *cancel.borrow() => {
            undo.rollback(qmp).await;
            bail!("interrupted before the commit; nothing was kept");
        }
        Ok(manifest) => manifest,
        Err(e) => {
            undo.rollback(qmp).await;
            return Err(e);
        }
    };
    debug!(
        vm,
        ms = started.elapsed().as_millis() as u64,
        "files read back and digested"
    );
    crate::fault::point("before-commit");
    if let Err(e) = partial.commit(&manifest) {
        undo.rollback(qmp).await;
        return Err(e.into());
    }
    debug!(
        vm,
        ms = started.elapsed().as_millis() as u64,
        "committed (files synced, renamed)"
    );
    crate::fault::point("after-commit");
    let state = VmState {
        schema: STATE_SCHEMA,
        vm: vm.to_string(),
        active_checkpoint: Some(checkpoint.clone()),
        last_backup: Some(id.clone()),
        volumes: volumes.iter().map(super::state_volume).collect(),
        last_seq: seq,
        identity: Some(identity),
    };
    repo.save_state(lock, &state)?;

    // The new checkpoint is active: the old one can go.
    if let Some(old) = active.filter(|old| old != &checkpoint) {
        for v in &volumes {
            if !v.bitmaps.iter().any(|b| b.name == old) {
                info!(vm, volume = %v.name, bitmap = %old, "the previous checkpoint bitmap was already gone");
                continue;
            }
            if let Err(e) = qemu::remove_bitmap(qmp, &v.node_name, &old).await {
                warn!(vm, volume = %v.name, bitmap = %old, error = %e, "cannot remove the previous checkpoint bitmap; the next backup of this vm removes it");
            }
        }
    }
    if let Some(e) = thawed {
        bail!(
            "backup {id} is committed, but thawing the guest failed: {e}; \
             the guest's filesystems may still be frozen (run guest-fsfreeze-thaw through its agent)"
        );
    }
    Ok(manifest)
}

/// Copies every volume into its own given file in one transaction, adding
/// `checkpoint` (if any) on every volume: the run of a backup without a
/// repository (CloudStack's layout, see `bitback nasbackup`). What an
/// interrupted run of `scope` left in QEMU is removed first; on failure
/// everything this run added is taken back and the files are the caller's
/// to remove. Returns whether a thaw failed (the copies are good).
pub async fn copy_to_files(
    qmp: &Qmp,
    opts: &BackupOptions,
    scope: &Scope,
    volumes: &[Volume],
    targets: Vec<Target>,
    checkpoint: Option<&str>,
    cancel: Cancel,
) -> anyhow::Result<Option<String>> {
    if targets.len() != volumes.len() {
        bail!(
            "internal error: {} targets for {} volumes",
            targets.len(),
            volumes.len()
        );
    }
    clean_stray_jobs(qmp, scope).await?;
    let run = Run {
        qmp,
        opts,
        scope,
        volumes,
        targets,
        checkpoint,
    };
    let mut undo = Undo::default();
    if let Err(e) = run_jobs(&run, &mut undo, cancel).await {
        undo.rollback(qmp).await;
        return Err(e);
    }
    Ok(undo.thaw_failure.take())
}

/// Who the QEMU says it is: `query-uuid` (unless all zeros) and
/// `query-name`. A storage daemon has neither.
async fn identity(qmp: &Qmp) -> VmIdentity {
    let uuid = qmp
        .execute_raw("query-uuid", Value::Null)
        .await
        .ok()
        .and_then(|r| r["UUID"].as_str().map(str::to_ascii_lowercase))
        .filter(|u| u.chars().any(|c| c != '0' && c != '-'));
    let name = qmp
        .execute_raw("query-name", Value::Null)
        .await
        .ok()
        .and_then(|r| r["name"].as_str().map(str::to_string))
        .filter(|n| !n.is_empty());
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
    run: &Run<'_>,
    plan: &Plan,
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
        let (digest, bytes_written) = digest_and_count(path.clone())
            .await
            .with_context(|| format!("reading back {}", path.display()))?;
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
        encryption: run.opts.encrypt.as_ref().map(|_| "luks".to_string()),
    })
}

/// Refuses to copy encrypted volumes into plaintext files unless asked to.
fn check_plaintext(opts: &BackupOptions, volumes: &[Volume]) -> anyhow::Result<()> {
    if opts.encrypt.is_some() || opts.allow_plaintext {
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
        opts.vm
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
    let image = json!({
        "driver": "qcow2",
        "backing": null,
        "read-only": true,
        "encrypt": { "format": "luks", "key-secret": "k" },
        "file": { "driver": "file", "filename": path, "read-only": true },
    });
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.arg("--object")
        .arg("secret,id=k,format=raw,file=/dev/stdin")
        .args(["-r", "-c", "read 0 512"])
        .arg(format!("json:{image}"));
    let out = key
        .feed(&mut cmd)
        .map_err(|e| format!("running qemu-io to check the key (install qemu-utils): {e}"))?;
    // qemu-io reports a failed read on stdout and still exits 0.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && !stdout.contains("failed") && stderr.trim().is_empty() {
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
    let mut all = qemu::list_volumes(qmp).await?;
    // Backup targets (of any repository) are never volumes.
    all.retain(|v| !super::scope::is_target_node(&v.node_name));
    if !renames.is_empty() {
        all.retain(|v| renames.iter().any(|(node, _)| node == &v.node_name));
        for v in &mut all {
            if let Some((_, name)) = renames.iter().find(|(node, _)| node == &v.node_name) {
                v.name = name.clone();
            }
        }
        // The order given, not the daemon's.
        all.sort_by_key(|v| renames.iter().position(|(node, _)| node == &v.node_name));
    }
    let names: Vec<&str> = all.iter().map(|v| v.name.as_str()).collect();
    for wanted in opts.include.iter().chain(&opts.exclude) {
        if !names.contains(&wanted.as_str()) {
            return Err(BadInput(format!(
                "vm {} has no volume {wanted}; its volumes are: {}",
                opts.vm,
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
        return Err(BadInput(format!("no volume to back up in vm {}", opts.vm)).into());
    }
    Ok(selected)
}

/// Removes the jobs and target nodes an interrupted run of this scope
/// left in QEMU; true if there were any.
async fn clean_stray_jobs(qmp: &Qmp, scope: &Scope) -> anyhow::Result<bool> {
    let mut found = false;
    let vm = scope.vm.as_str();
    let jobs = qmp.execute_raw("query-jobs", Value::Null).await?;
    for job in jobs.as_array().into_iter().flatten() {
        let Some(id) = job["id"].as_str().filter(|id| scope.owns_node_or_job(id)) else {
            continue;
        };
        info!(vm, job = id, status = %job["status"], "cleaning up a job left by an interrupted run");
        found = true;
        cancel_job(qmp, id).await;
    }
    let nodes = qmp
        .execute_raw("query-named-block-nodes", json!({ "flat": true }))
        .await?;
    for node in nodes.as_array().into_iter().flatten() {
        if let Some(name) = node["node-name"]
            .as_str()
            .filter(|n| scope.owns_node_or_job(n))
        {
            info!(
                vm,
                node = name,
                "removing a target node left by an interrupted run"
            );
            found = true;
            if let Err(e) = qmp
                .execute_raw("blockdev-del", json!({ "node-name": name }))
                .await
            {
                warn!(vm, node = name, error = %e, "cannot remove a stray target node");
            }
        }
    }
    Ok(found)
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
    /// Set when the guest was frozen and the thaw failed: the backup may
    /// go on, but must not report success.
    thaw_failure: Option<String>,
}

/// Cancels job `id` and dismisses it once it has concluded, so its nodes
/// can be removed; gives up (logging) after 30 s.
async fn cancel_job(qmp: &Qmp, id: &str) {
    let _ = qmp
        .execute_raw("job-cancel", json!({ "id": id, "force": true }))
        .await;
    // A cancelled job takes a moment to conclude before it can be
    // dismissed.
    for _ in 0..600 {
        match qmp.execute_raw("job-dismiss", json!({ "id": id })).await {
            Ok(_) => return,
            Err(e) if e.to_string().contains("not found") => return,
            Err(qmp::Error::Disconnected { .. }) => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    warn!(
        job = id,
        "the job did not conclude within 30 s of its cancel"
    );
}

impl Undo {
    async fn rollback(&mut self, qmp: &Qmp) {
        for job in self.jobs.drain(..) {
            cancel_job(qmp, &job).await;
        }
        for node in self.nodes.drain(..).rev() {
            if let Err(e) = qmp
                .execute_raw("blockdev-del", json!({ "node-name": node }))
                .await
            {
                warn!(%node, error = %e, "cannot remove a target node; the next backup of this vm removes it");
            }
        }
        for fdset in self.fdsets.drain(..) {
            let _ = qmp
                .execute_raw("remove-fd", json!({ "fdset-id": fdset }))
                .await;
        }
        for id in self.objects.drain(..) {
            let _ = qmp.execute_raw("object-del", json!({ "id": id })).await;
        }
        for (node, bitmap) in self.bitmaps.drain(..) {
            match qemu::remove_bitmap(qmp, &node, &bitmap).await {
                Ok(()) => {}
                // A transaction that timed out may not have applied.
                Err(qmp::Error::Qemu { desc, .. }) if desc.contains("not found") => {
                    debug!(%node, %bitmap, "the new checkpoint was never added")
                }
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
struct Run<'a> {
    pub qmp: &'a Qmp,
    pub opts: &'a BackupOptions,
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
}

impl Target {
    /// The targets of a repository backup in `dir`, as `plan` decided.
    fn planned(plan: &Plan, volumes: &[Volume], dir: &Path) -> Vec<Target> {
        volumes
            .iter()
            .zip(&plan.volumes)
            .map(|(v, p)| {
                let base = match (&p.decision, &plan.base) {
                    (Decision::Incremental, Some(base)) => Some(base),
                    _ => None,
                };
                Target {
                    path: dir.join(VolumeRecord::file_name(&v.name)),
                    backing: base.map(|b| VolumeRecord::backing_name(&b.parent, &v.name)),
                    since: base.map(|b| b.checkpoint.clone()),
                }
            })
            .collect()
    }
}

/// Steps 3 to 5: targets, transaction, jobs. On success the jobs are
/// dismissed and the targets closed; `undo` holds only the new bitmaps.
async fn run_jobs(run: &Run<'_>, undo: &mut Undo, cancel: Cancel) -> anyhow::Result<()> {
    let jobs = prepare_targets(run, undo).await?;
    if *cancel.borrow() {
        bail!("interrupted before the backup started");
    }
    let mut events = run.qmp.subscribe();
    start_transaction(run, undo).await?;
    wait_jobs(run.qmp, run.opts, &mut events, &jobs, cancel).await?;
    crate::fault::point("after-jobs");
    close_targets(run.qmp, undo).await
}

/// Step 3: one target per volume, created and opened in QEMU with
/// `backing: null`. Plain targets are created natively; encrypted ones by
/// `qemu-img create` processes (in parallel, outside the VM's QEMU, so the
/// key derivation's calibration does not stall it), the key on their
/// stdin; the VM's QEMU gets the key as a secret object over QMP. Returns
/// the backup job ids.
async fn prepare_targets(run: &Run<'_>, undo: &mut Undo) -> anyhow::Result<Vec<String>> {
    let (qmp, scope) = (run.qmp, run.scope);
    let paths: Vec<PathBuf> = run.targets.iter().map(|t| t.path.clone()).collect();
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
            let _ = qmp.execute_raw("object-del", json!({ "id": id })).await;
            qmp.execute_raw(
                "object-add",
                json!({ "qom-type": "secret", "id": id, "data": key.base64(), "format": "base64" }),
            )
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
        let mut target = json!({
            "driver": "qcow2",
            "node-name": node,
            "backing": null,
            "cache": { "no-flush": true },
            "file": { "driver": "file", "filename": filename },
        });
        if let Some(secret) = &secret {
            target["encrypt"] = json!({ "format": "luks", "key-secret": secret });
        }
        qmp.execute_raw("blockdev-add", target)
            .await
            .with_context(|| format!("opening the target for volume {} in QEMU", v.name))?;
        undo.nodes.push(node);
    }
    Ok((0..run.volumes.len()).map(|i| scope.job(i)).collect())
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
/// round reads no CPU time. Such a volume is tried again, up to
/// [`CALIBRATION_TRIES`] times.
async fn create_encrypted(run: &Run<'_>, key: &Key, paths: &[PathBuf]) -> anyhow::Result<()> {
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
            if attempt < CALIBRATION_TRIES && stderr.contains("Unable to get accurate CPU usage") {
                debug!(volume = %run.volumes[i].name, "qemu-img's key calibration failed; trying again");
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
    run: &Run<'_>,
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
    let absolute = std::path::absolute(path)
        .with_context(|| format!("resolving {}", path.display()))?
        .display()
        .to_string();
    if !*pass_fds {
        return Ok(absolute);
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let label = format!("bitback {}", path.display());
    match qmp.add_fd(file.as_fd(), None, Some(&label)).await {
        Ok(added) => {
            undo.fdsets.push(added.fdset_id);
            Ok(format!("/dev/fdset/{}", added.fdset_id))
        }
        Err(e) if e.is_command_not_found() => {
            debug!("no add-fd in this QEMU: targets are opened by name");
            *pass_fds = false;
            Ok(absolute)
        }
        Err(e) => Err(anyhow!(e).context("passing the target to QEMU")),
    }
}

/// Step 4: the new checkpoint on every volume and every copy, in one
/// transaction, with the guest frozen around it when asked.
async fn start_transaction(run: &Run<'_>, undo: &mut Undo) -> anyhow::Result<()> {
    let (qmp, opts) = (run.qmp, run.opts);
    let perf = opts.perf.for_qemu(qmp).await?;
    let mut actions = Vec::new();
    for (i, v) in run.volumes.iter().enumerate() {
        // Only qcow2 v3 can store a bitmap; every other kind gets one in
        // QEMU's memory, which tracks changes while this QEMU lives.
        if let Some(checkpoint) = run.checkpoint {
            let persistent = v.kind.tracking() == Tracking::Persistent;
            let mut bitmap =
                json!({ "node": v.node_name, "name": checkpoint, "persistent": persistent });
            if let Some(g) = opts.granularity {
                bitmap["granularity"] = g.into();
            }
            actions.push(json!({ "type": "block-dirty-bitmap-add", "data": bitmap }));
        }
        // A full of an image without a backing file copies only what the
        // image allocates (sync=top): unallocated clusters read as zeros
        // and stay unallocated in the target. sync=full would write zeros
        // for every one of them, which on a sparse 1 TiB disk costs more
        // than the data.
        let full_sync = if v.backing_file.is_none() {
            "top"
        } else {
            "full"
        };
        let mut data = json!({
            "job-id": run.scope.job(i), "device": v.node_name, "target": run.scope.target_node(i),
            "sync": full_sync, "auto-dismiss": false,
        });
        if let Some(since) = &run.targets[i].since {
            data["sync"] = "bitmap".into();
            data["bitmap"] = since.as_str().into();
            data["bitmap-mode"] = "never".into();
        }
        if let Some(speed) = opts.rate_limit {
            data["speed"] = speed.into();
        }
        if opts.compress {
            data["compress"] = true.into();
        }
        if let Some(perf) = &perf {
            data["x-perf"] = perf.clone();
        }
        actions.push(json!({ "type": "blockdev-backup", "data": data }));
    }

    let mut agent = match &opts.quiesce {
        Some(socket) => Some(Agent::connect(socket, Duration::from_secs(10)).await?),
        None => None,
    };
    // From before the freeze to after the thaw, a guard process thaws the
    // guest if bitback dies in between.
    let guard = match (&opts.quiesce, &opts.quiesce_libvirt) {
        (Some(socket), _) => Some(ThawGuard::start(&Thawer::Agent(socket.clone()))?),
        (None, Some(domain)) => Some(ThawGuard::start(&Thawer::Libvirt(domain.clone()))?),
        (None, None) => None,
    };
    if let Some(agent) = agent.as_mut() {
        match agent.freeze(opts.freeze_timeout).await {
            Ok(frozen) => {
                info!(vm = %opts.vm, filesystems = frozen, "guest filesystems frozen");
            }
            Err(e) => {
                // A freeze that failed or timed out may still complete in
                // the guest: thaw whatever it did.
                if let Err(t) = agent.thaw_after_freeze().await {
                    // The guard, unreleased, tries again.
                    bail!(
                        "freezing the guest failed ({e}), and so did the thaw after it: {t}; \
                         the guest's filesystems may still be frozen"
                    );
                }
                if let Some(guard) = guard {
                    guard.release();
                }
                return Err(anyhow!(e).context("freezing the guest's filesystems"));
            }
        }
    }
    let libvirt_frozen = match &opts.quiesce_libvirt {
        Some(domain) => {
            let (domain, limit) = (domain.clone(), opts.freeze_timeout);
            let frozen = tokio::task::spawn_blocking(move || {
                // Nothing to freeze through: said, and no thaw after it.
                match domain.info() {
                    Ok(info) if !info.agent => {
                        return Err(anyhow!(
                            "domain {} has no guest agent channel (org.qemu.guest_agent.0), so its filesystems cannot be frozen; the copy is crash-consistent",
                            domain.name
                        ));
                    }
                    Ok(info) if info.paused => {
                        return Err(anyhow!(
                            "domain {} is paused, so its guest agent cannot freeze; the copy is of the paused guest (crash-consistent)",
                            domain.name
                        ));
                    }
                    _ => {}
                }
                let frozen = domain.fs_freeze(limit);
                // A freeze that failed or timed out may still complete in
                // the guest: thaw whatever it did before going on unfrozen.
                if frozen.is_err()
                    && let Err(t) = domain.fs_thaw()
                {
                    error!(error = %format!("{t:#}"), "thawing after a failed freeze failed; the guest may be frozen");
                }
                frozen
            })
            .await?;
            match frozen {
                Ok(()) => true,
                Err(e) => {
                    warn!(vm = %opts.vm, error = %format!("{e:#}"), "freezing the guest through libvirt failed; copying unfrozen");
                    false
                }
            }
        }
        None => false,
    };
    crate::fault::point("before-transaction");
    let started = qmp
        .execute_raw("transaction", json!({ "actions": actions }))
        .await;
    if let (true, Some(domain)) = (libvirt_frozen, &opts.quiesce_libvirt) {
        let domain = domain.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || domain.fs_thaw()).await? {
            error!(vm = %opts.vm, error = %format!("{e:#}"), "thawing the guest through libvirt failed");
            undo.thaw_failure = Some(format!("{e:#}"));
        }
    }
    if let Some(agent) = agent.as_mut() {
        match agent.thaw_after_freeze().await {
            Ok(n) => info!(vm = %opts.vm, filesystems = n, "guest filesystems thawed"),
            Err(e) => {
                error!(vm = %opts.vm, error = %e, "thawing the guest failed; its filesystems may still be frozen");
                undo.thaw_failure = Some(e.to_string());
            }
        }
    }
    drop(agent);
    // Released once thawed; unreleased, the guard tries the thaw again
    // (after this process let go of the agent's socket).
    if let (Some(guard), None) = (guard, &undo.thaw_failure) {
        guard.release();
    }
    let applied = match &started {
        Ok(_) => true,
        // QEMU refused it: a transaction is all or nothing.
        Err(qmp::Error::Qemu { .. }) => false,
        // No answer: it may have been applied; undo it by name.
        Err(e) => {
            warn!(vm = %opts.vm, error = %e, "the transaction's outcome is unknown; undoing it by name");
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
    started.context("starting the backup transaction")?;
    crate::fault::point("after-transaction");
    Ok(())
}

/// After success: the jobs are concluded; dismiss them, close the
/// targets, take back the passed fds and the key.
async fn close_targets(qmp: &Qmp, undo: &mut Undo) -> anyhow::Result<()> {
    for job in std::mem::take(&mut undo.jobs) {
        qmp.execute_raw("job-dismiss", json!({ "id": job }))
            .await
            .with_context(|| format!("dismissing job {job}"))?;
    }
    // Format nodes before the file nodes under them.
    for node in std::mem::take(&mut undo.nodes).into_iter().rev() {
        qmp.execute_raw("blockdev-del", json!({ "node-name": node }))
            .await
            .with_context(|| format!("closing target node {node}"))?;
    }
    for fdset in std::mem::take(&mut undo.fdsets) {
        if let Err(e) = qmp
            .execute_raw("remove-fd", json!({ "fdset-id": fdset }))
            .await
        {
            debug!(fdset, error = %e, "remove-fd");
        }
    }
    for id in std::mem::take(&mut undo.objects) {
        if let Err(e) = qmp.execute_raw("object-del", json!({ "id": id })).await {
            warn!(object = %id, error = %e, "cannot remove the key from QEMU");
        }
    }
    Ok(())
}

/// Waits until every job has ended; fails on any error, stall or signal.
/// A job's end is seen from its event or, should the event never come
/// (a proxy that mangles events, a lost line), from `query-jobs`.
async fn wait_jobs(
    qmp: &Qmp,
    opts: &BackupOptions,
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

async fn cancel_all(qmp: &Qmp, jobs: &[String]) {
    for job in jobs {
        let _ = qmp
            .execute_raw("block-job-cancel", json!({ "device": job, "force": true }))
            .await;
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
    let Ok(reply) = qmp.execute_raw("query-jobs", Value::Null).await else {
        return JobsSeen::default();
    };
    let mut seen = JobsSeen::default();
    for j in reply.as_array().into_iter().flatten() {
        let Some(id) = j["id"].as_str().filter(|id| jobs.iter().any(|o| o == id)) else {
            continue;
        };
        seen.current += j["current-progress"].as_u64().unwrap_or(0);
        seen.total += j["total-progress"].as_u64().unwrap_or(0);
        match j["status"].as_str() {
            Some("running") => seen.running = true,
            Some("concluded") | Some("null") => {
                let error = j["error"].as_str().map(str::to_string);
                seen.concluded.push((id.to_string(), error));
            }
            _ => {}
        }
    }
    seen
}

/// BLAKE3 of the whole file, and the guest bytes of data it holds (zero
/// clusters are metadata only).
async fn digest_and_count(path: PathBuf) -> anyhow::Result<(String, u64)> {
    tokio::task::spawn_blocking(move || -> anyhow::Result<(String, u64)> {
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
