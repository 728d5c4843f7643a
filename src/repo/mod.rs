//! The backup repository on disk. Nothing but this module writes there.
//!
//! ```text
//! REPO/
//!   <vm>/
//!     .lock                     flock'd by every run that changes the VM
//!     state.json                active checkpoint, last backup, volume list
//!     <backup-id>/              one point in time of every selected volume
//!       manifest.json
//!       <volume>.qcow2          backing file: ../<parent-id>/<volume>.qcow2
//!     .<backup-id>.partial/     a backup being written; never read as one
//!     .<backup-id>.deleting/    a backup being deleted (renamed first)
//!     .<backup-id>.consolidating/  a backup's replacement, swapped in with
//!                               renameat2(RENAME_EXCHANGE)
//!     .damaged/<backup-id>.<volume>.json  a file `verify` found damaged:
//!                               its digest then,
//!                               and the problem. The next backup takes a
//!                               full of that volume instead of building on
//!                               it. One file per finding, written
//!                               atomically, so readers may write it.
//! ```
//!
//! Commit protocol: a backup is written into its `.partial` directory;
//! every file and the manifest are synced, then the directory is renamed to
//! its id and the VM directory synced. The rename is the commit point: a
//! crash leaves at most a `.partial` directory, which the next run removes.
//! `state.json` is replaced (temp file, fsync, rename) only after a commit.
//!
//! Identity: `REPO/.bitback.json` holds the repository's id, 8 random hex
//! digits made with the repository. Every name bitback creates inside a
//! QEMU carries it (and the VM name), so one VM backed up into several
//! repositories, or under several `--vm` names, keeps one independent chain
//! and checkpoint per repository and name. The file also records the
//! inode of the directory the id was made in: a copy of the repository
//! (`cp -a`, rsync) finds itself elsewhere on its first backup and takes
//! an id of its own (`copied_from` names the old one), so a repository and
//! its copy never share checkpoint names nor remove each other's bitmaps.
//!
//! Locking, per VM:
//!
//! | operation                        | `<vm>/.lock` | `<vm>/.readers` |
//! |----------------------------------|--------------|-----------------|
//! | backup, in-place restore         | exclusive    | -               |
//! | prune, consolidate               | exclusive    | exclusive       |
//! | restore, verify, export          | -            | shared          |
//! | list                             | -            | -               |
//!
//! A backup only adds directories and replaces `state.json`, so readers
//! need not wait for it; prune and consolidate delete and swap files, so
//! they wait for no reader and no reader waits for them: whoever comes
//! second is refused with the holder's note. Both lock files are opened
//! without following symlinks.
//!
//! Order: backups are ordered by a per-VM sequence number (`seq`) stored in
//! each manifest and in the state, never by the clock; ids are made from
//! the clock but kept increasing when it steps back.
//!
//! Files are created with the process's umask; the CLI sets 077 (files
//! 0600, directories 0700) unless told otherwise (`--umask`).
//!
//! Names: VM and volume names become path components, so they are checked
//! ([`check_name`]): no `/`, no NUL, no leading `.`, nothing but letters,
//! digits and `-_.+@:`.

mod bucket;
mod error;
pub mod leases;
mod lock;
mod manifest;
mod names;
pub mod store;
pub mod time;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

pub use bucket::{Bucket, BucketLock, Holder};
pub use error::{Error, Invalid, Result};
pub use lock::{ReadLock, VmLock};
pub use manifest::{
    BackupKind, Changes, Digest, Encryption, Guard, MANIFEST_SCHEMA, Manifest, MapRecord,
    STATE_SCHEMA, StateVolume, VmIdentity, VmState, VolumeRecord,
};
pub use names::{MAX_NAME, check_name};
pub use store::{Directory, Entry, Store, sync_dir, write_atomic};

/// A repository root.
#[derive(Debug, Clone)]
pub struct Repo {
    root: PathBuf,
    /// Where its objects live (the directory at `root`).
    store: Arc<dyn Store>,
}

impl Repo {
    /// Opens an existing repository directory.
    pub fn open(root: &Path) -> Result<Repo> {
        refuse_url(root)?;
        match fs::metadata(root) {
            Ok(meta) if meta.is_dir() => Ok(Repo {
                root: root.into(),
                store: Arc::new(Directory::new(root.into())),
            }),
            Ok(_) => Err(Error::NotADirectory { path: root.into() }),
            Err(source) => Err(Error::Io {
                action: "opening the repository",
                path: root.into(),
                source,
            }),
        }
    }

    /// Opens a repository, creating its directory if needed.
    pub fn create(root: &Path) -> Result<Repo> {
        refuse_url(root)?;
        fs::create_dir_all(root).map_err(|source| Error::Io {
            action: "creating the repository",
            path: root.into(),
            source,
        })?;
        Repo::open(root)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the repository's objects live.
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The key of `name` in `vm`'s prefix (`<vm>/<name>`), the VM's name
    /// checked.
    fn vm_key(vm: &str, name: &str) -> Result<String> {
        check_name("VM", vm)?;
        Ok(format!("{vm}/{name}"))
    }

    /// The VM's directory. A symlink there is refused: it would lead
    /// writes out of the repository.
    pub fn vm_dir(&self, vm: &str) -> Result<PathBuf> {
        check_name("VM", vm)?;
        let dir = self.root.join(vm);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.file_type().is_symlink() => Err(Error::Symlink { path: dir }),
            _ => Ok(dir),
        }
    }

    /// The VMs that have a directory here, sorted.
    pub fn vms(&self) -> Result<Vec<String>> {
        vms_in(self.store())
    }

    /// Locks `vm` for a run that changes it, creating its directory.
    pub fn lock_vm(&self, vm: &str, purpose: &str) -> Result<VmLock> {
        let dir = self.vm_dir(vm)?;
        let created = !dir.exists();
        fs::create_dir_all(&dir).map_err(|source| Error::Io {
            action: "creating the VM directory",
            path: dir.clone(),
            source,
        })?;
        VmLock::acquire(vm, &dir, purpose, created)
    }

    /// Locks `vm` against readers too: for runs that delete or swap
    /// backup files (prune, consolidate). Needs the VM's lock.
    pub fn lock_readers(&self, lock: &VmLock, purpose: &str) -> Result<ReadLock> {
        let dir = self.vm_dir(lock.vm())?;
        ReadLock::acquire(lock.vm(), &dir, purpose, true)
    }

    /// A shared lock for a run that reads `vm`'s backup files (restore,
    /// verify, export): no prune or consolidation changes them meanwhile.
    /// `None` when the VM has no directory (nothing to read) or the
    /// repository is read-only to this user (no writer can run either).
    pub fn read_lock(&self, vm: &str, purpose: &str) -> Result<Option<ReadLock>> {
        let dir = self.vm_dir(vm)?;
        if !dir.is_dir() {
            return Ok(None);
        }
        match ReadLock::acquire(vm, &dir, purpose, false) {
            Ok(lock) => Ok(Some(lock)),
            Err(Error::Io { source, .. })
                if source.raw_os_error() == Some(nix::libc::EROFS)
                    || source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The repository's identity file, if it has one yet.
    fn ident(&self) -> Result<Option<RepoIdent>> {
        let path = self.store.locate(REPO_FILE);
        let Some(bytes) = self.store.get(REPO_FILE)? else {
            return Ok(None);
        };
        let mut ident: RepoIdent = serde_json::from_slice(&bytes).map_err(|e| Error::BadRepo {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if ident.id.len() != REPO_ID_LEN || !ident.id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::BadRepo {
                path,
                reason: format!("id {:?} is not {REPO_ID_LEN} hex digits", ident.id),
            });
        }
        ident.id.make_ascii_lowercase();
        Ok(Some(ident))
    }

    /// The repository's id, if it has one yet.
    pub fn id(&self) -> Result<Option<String>> {
        Ok(self.ident()?.map(|i| i.id))
    }

    /// Where the repository lives: its directory's inode number. A copy
    /// (`cp -a`, rsync, a restored NAS snapshot in another directory) has
    /// another; a rename within the filesystem, a remount or another
    /// host's NFS or CIFS mount keep it.
    fn home(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&self.root)
            .map(|m| m.ino())
            .map_err(|source| Error::Io {
                action: "reading",
                path: self.root.clone(),
                source,
            })
    }

    /// The repository's id, made (8 random hex digits) if it has none.
    /// Two runs racing to make it agree: the first link wins.
    ///
    /// A repository found in another directory than the one its id was
    /// made in is a copy: it gets an id of its own, said with a warning,
    /// so that it and the repository it was copied from never take each
    /// other's checkpoint bitmaps for their own (the same names at the
    /// same second, or each one's stray clean-up removing the other's).
    pub fn ensure_id(&self) -> Result<String> {
        let home = self.home()?;
        let Some(ident) = self.ident()? else {
            return self.make_id(home);
        };
        match ident.home {
            Some(h) if h == home => Ok(ident.id),
            // Made before homes were recorded: this is its home.
            None => {
                let id = ident.id.clone();
                self.write_ident(&RepoIdent {
                    home: Some(home),
                    ..ident
                })?;
                Ok(id)
            }
            Some(_) => {
                let id = random_id()?;
                warn!(
                    repo = %self.root.display(),
                    was = %ident.id,
                    id,
                    "this repository was copied from another (its id was made in another directory); \
                     it now has an id of its own, and leaves the checkpoint bitmaps of the repository \
                     it was copied from to that repository"
                );
                self.write_ident(&RepoIdent {
                    schema: ident.schema,
                    id,
                    home: Some(home),
                    copied_from: Some(ident.id),
                })?;
                // Two runs that found the copy at once: the last rename's
                // id stands, and both use it.
                match self.ident()? {
                    Some(now) if now.home == Some(home) => Ok(now.id),
                    _ => Err(Error::BadRepo {
                        path: self.store.locate(REPO_FILE),
                        reason: "it changed while being given a new id".into(),
                    }),
                }
            }
        }
    }

    fn write_ident(&self, ident: &RepoIdent) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(ident).map_err(Error::Encoding)?;
        self.store.put(REPO_FILE, &bytes)
    }

    fn make_id(&self, home: u64) -> Result<String> {
        let id = random_id()?;
        let bytes = serde_json::to_vec_pretty(&RepoIdent {
            schema: 1,
            id: id.clone(),
            home: Some(home),
            copied_from: None,
        })
        .map_err(Error::Encoding)?;
        // A concurrent maker's id stands.
        if self.store.put_new(REPO_FILE, &bytes)? {
            info!(repo = %self.root.display(), id, "repository id created");
            return Ok(id);
        }
        self.id()?.ok_or_else(|| Error::BadRepo {
            path: self.store.locate(REPO_FILE),
            reason: "it vanished while being made".into(),
        })
    }

    pub fn load_state(&self, vm: &str) -> Result<Option<VmState>> {
        let key = Repo::vm_key(vm, STATE_FILE)?;
        let Some(bytes) = self.store.get(&key)? else {
            return Ok(None);
        };
        let state = VmState::parse(&bytes, vm).map_err(|reason| Error::BadState {
            path: self.store.locate(&key),
            reason,
        })?;
        Ok(Some(state))
    }

    /// Replaces the VM's state atomically. Needs the VM's lock.
    pub fn save_state(&self, _lock: &VmLock, state: &VmState) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(state).map_err(Error::Encoding)?;
        self.store
            .put(&Repo::vm_key(&state.vm, STATE_FILE)?, &bytes)
    }

    /// Every committed backup of `vm`, oldest first. A backup whose
    /// manifest cannot be read is an error naming it.
    pub fn backups(&self, vm: &str) -> Result<Vec<Manifest>> {
        check_name("VM", vm)?;
        let mut out = Vec::new();
        for entry in self.store.list(vm)? {
            match entry {
                // A link is refused by name ([`Repo::manifest`]).
                Entry::Prefix(name) | Entry::Link(name) if !name.starts_with('.') => {
                    out.push(self.manifest(vm, &name)?);
                }
                _ => {}
            }
        }
        out.sort_by(order);
        Ok(out)
    }

    pub fn manifest(&self, vm: &str, id: &str) -> Result<Manifest> {
        check_name("backup", id)?;
        let key = Repo::vm_key(vm, &format!("{id}/{MANIFEST_FILE}"))?;
        let path = self.store.locate(&key);
        let Some(bytes) = self.store.get(&key)? else {
            return Err(Error::Io {
                action: "reading",
                path,
                source: std::io::ErrorKind::NotFound.into(),
            });
        };
        Manifest::parse(&bytes, vm, id).map_err(|reason| Error::BadManifest { path, reason })
    }

    /// Removes `.partial` directories a crashed run left. Needs the lock.
    pub fn clean_partials(&self, _lock: &VmLock, vm: &str) -> Result<Vec<String>> {
        let dir = self.vm_dir(vm)?;
        let mut removed = Vec::new();
        for entry in read_dir(&dir)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".tmp-") {
                // A temp file of a run that died mid-write.
                let _ = fs::remove_file(entry.path());
                continue;
            }
            if name.starts_with('.') && name.ends_with(".partial") {
                let path = entry.path();
                fs::remove_dir_all(&path).map_err(|source| Error::Io {
                    action: "removing a partial backup",
                    path: path.clone(),
                    source,
                })?;
                info!(vm, partial = %name, "removed a partial backup left by an interrupted run");
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// Removes what interrupted deletions and rewrites left
    /// (`.<id>.deleting`, `.<id>.consolidating`). Needs the lock.
    pub fn clean_leftovers(&self, _lock: &VmLock, vm: &str) -> Result<Vec<String>> {
        let dir = self.vm_dir(vm)?;
        let mut removed = Vec::new();
        for entry in read_dir(&dir)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.')
                && (name.ends_with(".deleting") || name.ends_with(".consolidating"))
            {
                let path = entry.path();
                fs::remove_dir_all(&path).map_err(|source| Error::Io {
                    action: "removing",
                    path: path.clone(),
                    source,
                })?;
                info!(vm, leftover = %name, "removed what an interrupted prune or consolidation left");
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// Records that the file of `volume` in backup `id` of `vm`, whose
    /// manifest digest is `digest`, was found damaged (`problem`). Taken
    /// under a read lock: one file per finding, replaced atomically.
    pub fn mark_damaged(
        &self,
        vm: &str,
        id: &str,
        volume: &str,
        digest: &Digest,
        problem: &str,
    ) -> Result<()> {
        record_damage(self.store.as_ref(), vm, id, volume, digest, problem)
    }

    /// What was found wrong with the file of `volume` in backup `id`, if
    /// a finding exists for the file as its manifest (digest `digest`)
    /// describes it: a file rewritten since (consolidated) has a new
    /// digest, and the old finding no longer counts.
    pub fn damage(&self, vm: &str, id: &str, volume: &str, digest: &Digest) -> Option<String> {
        let key = Repo::damage_key(vm, id, volume).ok()?;
        let text = self.store.get(&key).ok()??;
        let record: Damage = serde_json::from_slice(&text).ok()?;
        (record.digest == *digest).then_some(record.problem)
    }

    /// Records that backup `m` verified whole at `at`, for the files its
    /// manifest names now (their digests): a point rewritten since (by a
    /// consolidation) is not taken as verified. Taken under a read lock;
    /// replaced atomically.
    pub fn mark_verified(&self, m: &Manifest, at: &time::Utc) -> Result<()> {
        let key = Repo::verified_key(&m.vm, &m.id)?;
        let record = Verified {
            time: at.rfc3339(),
            digests: m
                .volumes
                .iter()
                .map(|v| (v.name.clone(), v.digest))
                .collect(),
        };
        let bytes = serde_json::to_vec_pretty(&record).map_err(Error::Encoding)?;
        self.store.put(&key, &bytes)
    }

    /// When backup `m` last verified whole, if that is recorded for the
    /// files its manifest names.
    pub fn verified_at(&self, m: &Manifest) -> Option<time::Utc> {
        let key = Repo::verified_key(&m.vm, &m.id).ok()?;
        let text = self.store.get(&key).ok()??;
        let record: Verified = serde_json::from_slice(&text).ok()?;
        let now: std::collections::BTreeMap<String, Digest> = m
            .volumes
            .iter()
            .map(|v| (v.name.clone(), v.digest))
            .collect();
        (record.digests == now).then(|| time::Utc::parse_rfc3339(&record.time))?
    }

    fn verified_key(vm: &str, id: &str) -> Result<String> {
        check_name("backup", id)?;
        Repo::vm_key(vm, &format!("{VERIFIED}/{id}.json"))
    }

    /// The key of the finding on `volume` of backup `id` of `vm`.
    fn damage_key(vm: &str, id: &str, volume: &str) -> Result<String> {
        check_name("backup", id)?;
        check_name("volume", volume)?;
        Repo::vm_key(vm, &format!("{DAMAGED}/{id}.{volume}.json"))
    }

    /// Deletes backup `id` of `vm`: one rename to `.<id>.deleting` (after
    /// which no reader sees it), then the removal. Needs the lock.
    pub fn delete_backup(&self, _lock: &VmLock, vm: &str, id: &str) -> Result<()> {
        check_name("backup", id)?;
        let dir = self.vm_dir(vm)?;
        let doomed = dir.join(format!(".{id}.deleting"));
        fs::rename(dir.join(id), &doomed).map_err(|source| Error::Io {
            action: "deleting backup",
            path: dir.join(id),
            source,
        })?;
        sync_dir(&dir)?;
        crate::fault::point("prune-renamed");
        // Its findings and verification record go with it (ids are never
        // reused; this is tidiness).
        if let Ok(key) = Repo::verified_key(vm, id) {
            let _ = self.store.delete(&key);
        }
        let findings = Repo::vm_key(vm, DAMAGED)?;
        let prefix = format!("{id}.");
        for entry in self.store.list(&findings).unwrap_or_default() {
            if let Entry::Object(name) = entry
                && name.starts_with(&prefix)
            {
                let _ = self.store.delete(&format!("{findings}/{name}"));
            }
        }
        fs::remove_dir_all(&doomed).map_err(|source| Error::Io {
            action: "removing",
            path: doomed,
            source,
        })
    }

    /// Rewrites the manifest of backup `id` in place (temp file, rename).
    pub fn rewrite_manifest(&self, _lock: &VmLock, m: &Manifest) -> Result<()> {
        check_name("backup", &m.id)?;
        let key = Repo::vm_key(&m.vm, &format!("{}/{MANIFEST_FILE}", m.id))?;
        let bytes = serde_json::to_vec_pretty(m).map_err(Error::Encoding)?;
        self.store.put(&key, &bytes)
    }

    /// Starts a replacement of backup `id` of `vm`, written aside in
    /// `.<id>.consolidating/` and swapped in by [`Replacement::swap`].
    pub fn begin_replacement(&self, _lock: &VmLock, vm: &str, id: &str) -> Result<Replacement> {
        check_name("backup", id)?;
        let vm_dir = self.vm_dir(vm)?;
        let dir = vm_dir.join(format!(".{id}.consolidating"));
        fs::create_dir(&dir).map_err(|source| Error::Io {
            action: "creating",
            path: dir.clone(),
            source,
        })?;
        Ok(Replacement {
            dir,
            vm_dir,
            id: id.to_string(),
        })
    }

    /// Starts writing backup `id` of `vm` in its `.partial` directory.
    pub fn begin(&self, _lock: &VmLock, vm: &str, id: &str) -> Result<Partial> {
        check_name("backup", id)?;
        let vm_dir = self.vm_dir(vm)?;
        let dir = vm_dir.join(format!(".{id}.partial"));
        fs::create_dir(&dir).map_err(|source| Error::Io {
            action: "creating",
            path: dir.clone(),
            source,
        })?;
        Ok(Partial {
            dir,
            vm_dir,
            id: id.to_string(),
            committed: false,
        })
    }

    /// A fresh backup id from the clock, unique within `vm` and greater
    /// than `after` (the newest backup's id) even when the clock stepped
    /// back: then the id is one second past `after`'s.
    pub fn new_backup_id(&self, vm: &str, now: &time::Utc, after: Option<&str>) -> Result<String> {
        let dir = self.vm_dir(vm)?;
        let mut base = now.compact();
        if let Some(after) = after.and_then(time::Utc::parse_compact_prefix)
            && after.to_unix() >= now.to_unix()
        {
            base = time::Utc::from_unix(after.to_unix() + 1).compact();
        }
        let mut id = base.clone();
        let mut n = 1;
        while dir.join(&id).exists() || dir.join(format!(".{id}.partial")).exists() {
            n += 1;
            id = format!("{base}-{n}");
        }
        Ok(id)
    }
}

/// The VMs with a prefix (a directory) in `store`, sorted. A link is
/// listed, to be refused by name when used.
/// Refuses a bucket's URL given where a directory is wanted (which would
/// make a local directory `s3:`).
fn refuse_url(root: &Path) -> Result<()> {
    match root.to_str() {
        Some(url) if url.starts_with("s3://") => Err(Error::InBucket { url: url.into() }),
        _ => Ok(()),
    }
}

pub fn vms_in(store: &dyn Store) -> Result<Vec<String>> {
    let mut vms: Vec<String> = store
        .list("")?
        .into_iter()
        .filter_map(|e| match e {
            Entry::Prefix(name) | Entry::Link(name) if check_name("VM", &name).is_ok() => {
                Some(name)
            }
            _ => None,
        })
        .collect();
    vms.sort();
    Ok(vms)
}

/// The file naming a repository and its id.
pub const REPO_FILE: &str = ".bitback.json";
/// Hex digits in a repository id: QEMU node names (31 bytes at most) must
/// hold it with the rest of a target's name.
pub const REPO_ID_LEN: usize = 8;

#[derive(serde::Serialize, serde::Deserialize)]
struct RepoIdent {
    schema: u32,
    id: String,
    /// The inode of the repository's directory when the id was made or
    /// first seen ([`Repo::home`]); absent in repositories from before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    home: Option<u64>,
    /// The id of the repository this one was copied from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    copied_from: Option<String>,
}

/// A new repository id: [`REPO_ID_LEN`] random hex digits.
fn random_id() -> Result<String> {
    let mut raw = [0u8; REPO_ID_LEN / 2];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw))
        .map_err(|source| Error::Io {
            action: "reading random bytes from",
            path: "/dev/urandom".into(),
            source,
        })?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// Newest last: by sequence, then (for manifests written before sequences)
/// by time and id. How a VM's points are listed.
pub fn order(a: &Manifest, b: &Manifest) -> std::cmp::Ordering {
    (a.seq, a.time.as_str(), a.id.len(), a.id.as_str()).cmp(&(
        b.seq,
        b.time.as_str(),
        b.id.len(),
        b.id.as_str(),
    ))
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    let entries = fs::read_dir(dir).map_err(|source| Error::Io {
        action: "listing",
        path: dir.into(),
        source,
    })?;
    entries
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|source| Error::Io {
            action: "listing",
            path: dir.into(),
            source,
        })
}

/// The directory of damage findings in a VM's directory.
const DAMAGED: &str = ".damaged";
/// A VM's state, in its directory.
const STATE_FILE: &str = "state.json";
/// A point's manifest, in its directory.
const MANIFEST_FILE: &str = "manifest.json";

/// Where [`Repo::mark_verified`] keeps its records.
const VERIFIED: &str = ".verified";

/// One record of [`Repo::mark_verified`].
#[derive(serde::Serialize, serde::Deserialize)]
struct Verified {
    /// RFC 3339, UTC.
    time: String,
    /// Each volume's file digest, as the manifest gave it then.
    digests: std::collections::BTreeMap<String, Digest>,
}

/// One finding of [`Repo::mark_damaged`].
#[derive(serde::Serialize, serde::Deserialize)]
struct Damage {
    digest: Digest,
    problem: String,
}

/// [`Repo::mark_damaged`] in any store (a bucket's reads record there).
pub fn record_damage(
    store: &dyn Store,
    vm: &str,
    id: &str,
    volume: &str,
    digest: &Digest,
    problem: &str,
) -> Result<()> {
    let key = Repo::damage_key(vm, id, volume)?;
    let record = Damage {
        digest: *digest,
        problem: problem.to_string(),
    };
    let bytes = serde_json::to_vec_pretty(&record).map_err(Error::Encoding)?;
    store.put(&key, &bytes)
}

/// Writes `manifest.json` in `dir` (temp file, fsync, rename).
fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(manifest).map_err(Error::Encoding)?;
    write_atomic(dir, MANIFEST_FILE, &bytes)
}

/// Syncs every file in a backup directory being written, then writes its
/// manifest: what must be durable before the directory becomes visible.
fn seal(dir: &Path, manifest: &Manifest) -> Result<()> {
    for entry in read_dir(dir)? {
        let path = entry.path();
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|source| Error::Io {
                action: "syncing",
                path: path.clone(),
                source,
            })?;
    }
    write_manifest(dir, manifest)
}

/// A backup being written. Dropped without [`Partial::commit`], it deletes
/// its directory.
#[derive(Debug)]
pub struct Partial {
    dir: PathBuf,
    vm_dir: PathBuf,
    id: String,
    committed: bool,
}

impl Partial {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Syncs every file, writes the manifest, and renames the directory to
    /// its id: the commit point.
    pub fn commit(mut self, manifest: &Manifest) -> Result<PathBuf> {
        seal(&self.dir, manifest)?;
        let final_dir = self.vm_dir.join(&self.id);
        fs::rename(&self.dir, &final_dir).map_err(|source| Error::Io {
            action: "committing",
            path: final_dir.clone(),
            source,
        })?;
        self.committed = true;
        sync_dir(&self.vm_dir)?;
        Ok(final_dir)
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                warn!(dir = %self.dir.display(), error = %e, "cannot remove a partial backup; the next run will");
            }
        }
    }
}

/// A backup's replacement being written aside. Dropped without
/// [`Replacement::swap`], it is left for [`Repo::clean_leftovers`].
#[derive(Debug)]
pub struct Replacement {
    dir: PathBuf,
    vm_dir: PathBuf,
    id: String,
}

impl Replacement {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Syncs every file, writes the manifest, and exchanges the directory
    /// with the backup's in one `renameat2(RENAME_EXCHANGE)`: readers see
    /// the old backup or the new one, never a mix. Then removes the old.
    pub fn swap(self, manifest: &Manifest) -> Result<()> {
        use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
        seal(&self.dir, manifest)?;
        sync_dir(&self.vm_dir)?;
        crate::fault::point("consolidate-before-swap");
        let live = self.vm_dir.join(&self.id);
        renameat2(
            AT_FDCWD,
            &self.dir,
            AT_FDCWD,
            &live,
            RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(|e| Error::Io {
            action: "swapping the replacement into",
            path: live.clone(),
            source: e.into(),
        })?;
        sync_dir(&self.vm_dir)?;
        crate::fault::point("consolidate-after-swap");
        // The aside directory now holds the old backup.
        fs::remove_dir_all(&self.dir).map_err(|source| Error::Io {
            action: "removing",
            path: self.dir.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_takes_an_id_of_its_own_and_a_move_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let repo = Repo::create(&a).unwrap();
        let id = repo.ensure_id().unwrap();
        assert_eq!(repo.ensure_id().unwrap(), id);
        // Moved within the filesystem: the same directory, the same id.
        let moved = dir.path().join("moved");
        fs::rename(&a, &moved).unwrap();
        assert_eq!(Repo::open(&moved).unwrap().ensure_id().unwrap(), id);
        // Copied: another directory, so an id of its own, recorded with
        // the one it was copied from; the original keeps its id.
        let copy = dir.path().join("copy");
        fs::create_dir(&copy).unwrap();
        fs::copy(moved.join(REPO_FILE), copy.join(REPO_FILE)).unwrap();
        let copied = Repo::open(&copy).unwrap();
        let new = copied.ensure_id().unwrap();
        assert_ne!(new, id);
        assert_eq!(copied.ensure_id().unwrap(), new);
        assert_eq!(
            copied.ident().unwrap().unwrap().copied_from,
            Some(id.clone())
        );
        assert_eq!(Repo::open(&moved).unwrap().ensure_id().unwrap(), id);
        // A repository from before homes were recorded adopts its own.
        fs::write(
            copy.join(REPO_FILE),
            format!("{{\"schema\": 1, \"id\": \"{id}\"}}"),
        )
        .unwrap();
        assert_eq!(copied.ensure_id().unwrap(), id);
        assert!(copied.ident().unwrap().unwrap().home.is_some());
    }

    #[test]
    fn names() {
        for good in [
            "web1",
            "i-2-34-VM",
            "disk0",
            "virtio0",
            "a.b",
            "x_y",
            "vm@host:1",
        ] {
            assert!(check_name("VM", good).is_ok(), "{good}");
        }
        for bad in [
            "", ".", "..", "../x", "a/b", ".hidden", "a\0b", "sp ace", "ü",
        ] {
            assert!(check_name("VM", bad).is_err(), "{bad:?}");
        }
        assert!(check_name("VM", &"a".repeat(129)).is_err());
    }
}
