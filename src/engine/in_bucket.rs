//! A repository where it lies in a bucket: `list`, `restore`, `verify`
//! and `prune`
//! with `--repo s3://BUCKET/PREFIX`, nothing downloaded first.
//!
//! What is read is what bitback wrote, whatever came after: of every key
//! the first version written (the oldest that is data, of the length
//! its manifest recorded). A later version is a put over bitback's (a
//! credential thief may add one; object lock keeps the first), a delete
//! marker a delete: neither hides or replaces a point. A point whose
//! manifest or files have a delete marker on top is listed as hidden and
//! still restores; a restore names the versions it read.
//!
//! A restore reads the chain natively ([`super::native`]), each file an
//! object version read by ranged GETs: its tables first, then only the
//! newest object holding each cluster, on several threads. Every file is
//! checked as a directory restore checks it: the structural rules (its
//! length, backing name, size, no external data file), and its data
//! against the chain's cluster maps in flight, or against its digest
//! (read first) where the chain has no maps.
//!
//! Prune removes a point for good (every version of its objects, the
//! manifest first), holding the VM's lock in the bucket; a point an
//! object lock holds is kept, with all it builds on, and the report says
//! until when. What a dead sync or prune left under a point without a
//! manifest goes too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::Serialize;
use tracing::info;

use super::chain::{Pick, chain_of, has_volumes, volume_records};
use super::check::{Problem, Report};
use super::native::{ChainSource, Copier, Mapped, Mismatch, plan_sources};
use super::outcome::BadInput;
use super::restore::{MAX_IN_FLIGHT_RECORDS, Outputs, RestoreOptions, Restored};
use super::retention::{Keep, Locked, Retention, ancestors, check_links, keep_set};
use crate::cluster_map::{Baseline, Map};
use crate::qcow2::{self, Image};
use crate::repo::time::Utc;
use crate::repo::{Bucket, Manifest, Store, VolumeRecord};
use crate::s3::Version;

/// A point in a bucket, as bitback wrote it.
#[derive(Debug, Clone, Serialize)]
pub struct BucketPoint {
    #[serde(flatten)]
    pub manifest: Manifest,
    /// A delete marker lies on its manifest or one of its files: a plain
    /// listing or `aws s3 sync` no longer sees it whole. It still
    /// restores from its versions.
    pub hidden: bool,
    /// The version of its manifest read.
    pub manifest_version: String,
}

/// A restore from a bucket: the restore, and the object versions it read.
#[derive(Debug, Clone, Serialize)]
pub struct BucketRestored {
    #[serde(flatten)]
    pub restored: Restored,
    /// The files of the volume's chain, full first, each with its version.
    pub versions: Vec<UsedVersion>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UsedVersion {
    /// Relative to the repository (the object's key under the prefix).
    pub file: String,
    pub version: String,
}

/// Every version of every object of one VM in a bucket.
struct Objects<'b> {
    bucket: &'b Bucket,
    /// By repository key, oldest first.
    versions: BTreeMap<String, Vec<Version>>,
    /// The VM's index: manifests' bytes by key and version, each taken
    /// only where it hashes to its version's entity tag.
    index: BTreeMap<(String, String), String>,
}

/// A VM's index in a bucket, `<vm>/.points.json`: a copy of each point's
/// manifest, so that a listing reads one object per VM instead of one per
/// point. It is never believed: the listing of versions says which points
/// there are, and a copy is used only where its MD5 is the entity tag the
/// store lists for that manifest version (else the manifest is read).
#[derive(Debug, Default, Serialize, serde::Deserialize)]
struct Index {
    points: Vec<Indexed>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
struct Indexed {
    /// The manifest's key and version.
    key: String,
    version: String,
    /// Its bytes.
    manifest: String,
}

/// The key of `vm`'s index.
fn index_key(vm: &str) -> String {
    format!("{vm}/.points.json")
}

impl<'b> Objects<'b> {
    fn load(bucket: &'b Bucket, vm: &str) -> anyhow::Result<Objects<'b>> {
        Ok(Objects {
            bucket,
            versions: bucket.versions(vm)?,
            index: BTreeMap::new(),
        })
    }

    /// [`Objects::load`] with the VM's index read too (for a listing).
    fn load_indexed(bucket: &'b Bucket, vm: &str) -> anyhow::Result<Objects<'b>> {
        let mut objects = Objects::load(bucket, vm)?;
        let key = index_key(vm);
        let newest = objects
            .versions
            .get(&key)
            .and_then(|v| v.last())
            .filter(|v| !v.marker);
        if let Some(version) = newest {
            let read = bucket
                .get_version(&key, &version.id)
                .ok()
                .flatten()
                .and_then(|bytes| serde_json::from_slice::<Index>(&bytes).ok());
            match read {
                Some(index) => {
                    objects.index = index
                        .points
                        .into_iter()
                        .map(|p| ((p.key, p.version), p.manifest))
                        .collect()
                }
                None => tracing::warn!(
                    vm,
                    "the VM's index in the bucket does not read; its manifests are read instead"
                ),
            }
        }
        Ok(objects)
    }

    /// The bytes of manifest `key`'s `version` from the index, where they
    /// hash to the entity tag the store listed for it.
    fn indexed(&self, key: &str, version: &Version) -> Option<Vec<u8>> {
        let text = self.index.get(&(key.to_string(), version.id.clone()))?;
        let etag = version.etag.as_deref()?;
        (crate::s3::md5_hex(text.as_bytes()) == etag).then(|| text.as_bytes().to_vec())
    }

    /// The version of `key` bitback reads: the first written (the oldest
    /// that is data), of `size` bytes when one is given.
    fn original(&self, key: &str, size: Option<u64>) -> anyhow::Result<&Version> {
        let versions = self.versions.get(key).map(Vec::as_slice).unwrap_or(&[]);
        let data = || versions.iter().filter(|v| !v.marker);
        data()
            .find(|v| size.is_none_or(|s| v.size == s))
            .with_context(|| match (data().next(), size) {
                (Some(v), Some(s)) => format!(
                    "{} holds no version of {s} bytes (the first is {} bytes): the object was replaced",
                    self.bucket.locate(key).display(),
                    v.size
                ),
                _ => format!(
                    "{} is missing: no version of it is in the bucket",
                    self.bucket.locate(key).display()
                ),
            })
    }

    /// The bytes of the first version of `key` (a manifest, a map).
    fn read_original(&self, key: &str) -> anyhow::Result<Vec<u8>> {
        let version = self.original(key, None)?;
        self.bucket.get_version(key, &version.id)?.with_context(|| {
            format!(
                "{} (version {}) is gone",
                self.bucket.locate(key).display(),
                version.id
            )
        })
    }

    /// Version `version` of `key` as a chain file.
    fn object(&self, key: &str, version: &Version) -> Object<'b> {
        Object {
            bucket: self.bucket,
            key: key.to_string(),
            version: version.id.clone(),
            size: version.size,
        }
    }

    /// Whether a delete marker is the newest version of `key`.
    fn hidden(&self, key: &str) -> bool {
        self.versions
            .get(key)
            .and_then(|v| v.last())
            .is_some_and(|v| v.marker)
    }

    /// The points of `vm`: each manifest's first version, oldest point
    /// first. A manifest that does not parse is an error naming it.
    fn points(&self, vm: &str) -> anyhow::Result<Vec<BucketPoint>> {
        let keys: Vec<(&String, &str)> = self
            .versions
            .keys()
            .filter_map(|key| {
                let id = key
                    .strip_prefix(&format!("{vm}/"))?
                    .strip_suffix("/manifest.json")
                    .filter(|id| !id.contains('/') && !id.starts_with('.'))?;
                Some((key, id))
            })
            .collect();
        // The manifests are read several at once: a listing of many
        // points is many GETs.
        let read = in_parallel(&keys, MANIFEST_READERS, |&(key, id)| {
            self.point(vm, key, id)
        });
        if !self.index.is_empty() {
            let from_index = keys
                .iter()
                .filter(|(key, _)| {
                    self.original(key, None)
                        .is_ok_and(|v| self.indexed(key, v).is_some())
                })
                .count();
            tracing::debug!(
                vm,
                from_index,
                points = keys.len(),
                "manifests taken from the index"
            );
        }
        let mut points = Vec::new();
        for point in read {
            points.extend(point?);
        }
        points.sort_by(|a, b| crate::repo::order(&a.manifest, &b.manifest));
        Ok(points)
    }

    /// The chain of `vm`'s point `pick` (full first, the point last),
    /// which must hold `volumes` (all when empty). An encrypted point is
    /// refused: QEMU decrypts from files.
    fn pick(&self, vm: &str, pick: &Pick, volumes: &[String]) -> anyhow::Result<Vec<Manifest>> {
        let points = self.points(vm)?;
        let location = self.bucket.location();
        let m = match pick {
            Pick::Latest => points.last(),
            Pick::Id(id) => points.iter().find(|p| &p.manifest.id == id),
        }
        .map(|p| &p.manifest)
        .ok_or_else(|| match pick.id() {
            Some(id) => BadInput(format!("{location} holds no backup {id} of vm {vm}")),
            None => BadInput(format!("{location} holds no backup of vm {vm}")),
        })?;
        if m.encryption.is_some() {
            return Err(BadInput(format!(
                "backup {} is encrypted, and QEMU decrypts it from files: bring it here first (bitback sync --from {location} --to DIR --vm {vm}), then use DIR",
                m.id,
            ))
            .into());
        }
        has_volumes(m, volumes)?;
        chain_of(m, |id| {
            points
                .iter()
                .find(|p| p.manifest.id == id)
                .map(|p| p.manifest.clone())
                .with_context(|| format!("the bucket holds no manifest of {id}"))
        })
    }

    /// The point whose manifest is `key` (of id `id`); `None` when only
    /// delete markers are left of it (a prune that died midway: the
    /// manifest is gone for good, so there is no point).
    fn point(&self, vm: &str, key: &str, id: &str) -> anyhow::Result<Option<BucketPoint>> {
        let Ok(version) = self.original(key, None) else {
            return Ok(None);
        };
        let bytes = match self.indexed(key, version) {
            Some(bytes) => bytes,
            None => self.read_original(key)?,
        };
        let manifest = Manifest::parse(&bytes, vm, id)
            .with_context(|| format!("{} is not a manifest", self.bucket.locate(key).display()))?;
        let hidden = self.hidden(key)
            || manifest.volumes.iter().any(|v| {
                self.hidden(&v.file) || v.cluster_map.as_ref().is_some_and(|m| self.hidden(&m.file))
            });
        Ok(Some(BucketPoint {
            manifest,
            hidden,
            manifest_version: version.id.clone(),
        }))
    }
}

/// Manifests read at once.
const MANIFEST_READERS: usize = 8;
/// VMs listed at once (each reads its manifests several at once too).
const VM_READERS: usize = 16;

/// `f` of every item of `items`, in their order, on up to `threads`
/// threads at once.
fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads.min(items.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else {
                        return;
                    };
                    let result = f(item);
                    *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                }
            });
        }
    });
    // Every slot is filled: a thread that panicked panics the scope.
    slots
        .into_iter()
        .filter_map(|slot| slot.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect()
}

/// The points of `vm` in `bucket` (every VM's with `None`), oldest first
/// per VM, hidden ones included.
pub fn bucket_points(bucket: &Bucket, vm: Option<&str>) -> anyhow::Result<Vec<BucketPoint>> {
    let vms = match vm {
        Some(vm) => vec![vm.to_string()],
        None => bucket.all_vms()?,
    };
    let read = in_parallel(&vms, VM_READERS, |vm| {
        Objects::load_indexed(bucket, vm)?.points(vm)
    });
    let mut all = Vec::new();
    for points in read {
        all.extend(points?);
    }
    Ok(all)
}

/// Writes `vm`'s index in `bucket` anew from its points (each manifest's
/// first version): after a sync or prune changed them, under the VM's
/// lock there. A failure costs listings speed, not a point: it is logged.
pub fn write_index(bucket: &Bucket, vm: &str) {
    let written = (|| {
        let objects = Objects::load_indexed(bucket, vm)?;
        let mut index = Index::default();
        for point in objects.points(vm)? {
            let key = format!("{vm}/{}/manifest.json", point.manifest.id);
            let version = objects.original(&key, None)?;
            let bytes = match objects.indexed(&key, version) {
                Some(bytes) => bytes,
                None => objects.read_original(&key)?,
            };
            index.points.push(Indexed {
                key,
                version: version.id.clone(),
                manifest: String::from_utf8(bytes).context("a manifest that is not UTF-8")?,
            });
        }
        let bytes = serde_json::to_vec(&index)?;
        let key = index_key(vm);
        Store::put(bucket, &key, &bytes)?;
        // Only the newest version is read: the older ones go where they
        // can (a bucket's default retention may hold them; "null" is the
        // one just written, in a bucket that keeps no versions).
        for old in objects.versions.get(&key).into_iter().flatten() {
            if old.id != "null"
                && let Err(e) = bucket.delete_version(&key, &old.id)
            {
                tracing::debug!(error = %e, "an old version of the index stays");
            }
        }
        anyhow::Ok(())
    })();
    if let Err(e) = written {
        tracing::warn!(
            vm,
            error = format!("{e:#}"),
            "the VM's index in the bucket was not written; listings read its manifests"
        );
    }
}

/// A chain file read in aligned windows of [`WINDOW`] bytes (each by
/// [`WINDOW_GETS`] ranged GETs at once), the last [`WINDOWS`] read kept:
/// a served volume's reads (FUSE's 128 KiB, a stream's, a booting
/// guest's) cost a window's GETs per window instead of one each.
struct Windowed<'b> {
    inner: Box<dyn ChainSource + 'b>,
    size: u64,
    /// Most recently used first.
    kept: std::sync::Mutex<Vec<(u64, Arc<Vec<u8>>)>>,
}

const WINDOW: u64 = 4 << 20;
const WINDOW_GETS: u64 = 2;
const WINDOWS: usize = 8;

impl<'b> Windowed<'b> {
    fn new(inner: Box<dyn ChainSource + 'b>) -> Windowed<'b> {
        let size = inner.size().unwrap_or(0);
        Windowed {
            inner,
            size,
            kept: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The window starting at `start`, kept or read now.
    fn window(&self, start: u64) -> std::io::Result<Arc<Vec<u8>>> {
        let kept = |kept: &mut Vec<(u64, Arc<Vec<u8>>)>| {
            let at = kept.iter().position(|(s, _)| *s == start)?;
            let hit = kept.remove(at);
            let bytes = hit.1.clone();
            kept.insert(0, hit);
            Some(bytes)
        };
        if let Some(bytes) = kept(&mut self.kept.lock().unwrap_or_else(|e| e.into_inner())) {
            return Ok(bytes);
        }
        let len = WINDOW.min(self.size.saturating_sub(start));
        let mut bytes = vec![0u8; len as usize];
        let part = (WINDOW / WINDOW_GETS) as usize;
        std::thread::scope(|scope| {
            let gets: Vec<_> = bytes
                .chunks_mut(part)
                .enumerate()
                .map(|(i, chunk)| {
                    let at = start + (i * part) as u64;
                    scope.spawn(move || self.inner.read_chunk(chunk, at))
                })
                .collect();
            gets.into_iter().try_for_each(|get| {
                get.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a read thread panicked")))
            })
        })?;
        let bytes = Arc::new(bytes);
        let mut all = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        all.insert(0, (start, bytes.clone()));
        all.truncate(WINDOWS);
        Ok(bytes)
    }
}

impl qcow2::Source for Windowed<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.size {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut at = offset;
        while at < end {
            let start = at / WINDOW * WINDOW;
            let window = self.window(start)?;
            let from = (at - start) as usize;
            let n = (window.len() - from).min((end - at) as usize);
            let to = (at - offset) as usize;
            buf[to..to + n].copy_from_slice(&window[from..from + n]);
            at += n as u64;
        }
        Ok(())
    }

    fn size(&self) -> std::io::Result<u64> {
        Ok(self.size)
    }
}

impl ChainSource for Windowed<'_> {
    fn name(&self) -> String {
        self.inner.name()
    }
}

/// One file of a chain: an object version, read by ranged GETs.
struct Object<'b> {
    bucket: &'b Bucket,
    key: String,
    version: String,
    size: u64,
}

impl qcow2::Source for Object<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset + buf.len() as u64 > self.size {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.bucket
            .read_range(&self.key, &self.version, offset, buf)
            .map_err(std::io::Error::other)
    }

    fn size(&self) -> std::io::Result<u64> {
        Ok(self.size)
    }
}

impl ChainSource for Object<'_> {
    fn name(&self) -> String {
        format!(
            "{} (version {})",
            self.bucket.locate(&self.key).display(),
            self.version
        )
    }
}

/// Restores a point of `opts.vm` from `bucket` into `opts.output`.
pub fn restore_from_bucket(
    bucket: &Bucket,
    opts: &RestoreOptions,
) -> anyhow::Result<Vec<BucketRestored>> {
    let objects = Objects::load(bucket, &opts.vm)?;
    let chain = objects.pick(&opts.vm, &opts.backup, &opts.volumes)?;
    let m = chain.last().context("a chain of no point")?;
    let outputs = Outputs::plan(m, opts)?;
    let restored: anyhow::Result<Vec<_>> = outputs
        .targets
        .iter()
        .map(|(v, target)| {
            restore_volume(&objects, &chain, v, target, opts)
                .with_context(|| format!("restoring volume {} of backup {}", v.name, m.id))
        })
        .collect();
    outputs.undo_if(restored.is_err());
    restored
}

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
            // read in windows, a few kept.
            let sources: Sources<'static> = sources
                .into_iter()
                .map(|s| Box::new(Windowed::new(s)) as Box<dyn ChainSource>)
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

/// Restores volume `v` at the top of `chain` into `target`.
fn restore_volume(
    objects: &Objects,
    chain: &[Manifest],
    v: &VolumeRecord,
    target: &Path,
    opts: &RestoreOptions,
) -> anyhow::Result<BucketRestored> {
    let records = volume_records(chain, &v.name)?;
    let (sources, versions) = chain_sources(objects, &records)?;
    let check = match opts.verify {
        true => proof(objects, chain, v, &records, &sources)?,
        false => None,
    };
    let mapped = plan_sources(sources)?.context("an encrypted file in a chain that is not")?;
    let how = Copier {
        threads: opts.threads.max(1),
        progress: opts.progress.as_ref(),
        check: check.as_deref(),
    };
    let (copied, method) = super::restore::write_restore(target, |tmp| {
        super::restore::copy_mapped(mapped, tmp, opts.format, v.virtual_size, &how)
    })?;
    info!(volume = %v.name, path = %target.display(), "restored from the bucket");
    Ok(BucketRestored {
        restored: Restored {
            volume: v.name.clone(),
            backup: chain.last().map(|m| m.id.clone()).unwrap_or_default(),
            path: target.to_path_buf(),
            virtual_size: v.virtual_size,
            chain_length: records.len(),
            bytes_copied: copied,
            method: format!("{method}, from the bucket"),
        },
        versions,
    })
}

/// The files of a chain, full first, as a native copy reads them.
type Sources<'b> = Vec<Box<dyn ChainSource + 'b>>;

/// The object versions of a volume's chain (`records`, full first), each
/// checked by the structural rules, and the versions used.
fn chain_sources<'b>(
    objects: &Objects<'b>,
    records: &[&VolumeRecord],
) -> anyhow::Result<(Sources<'b>, Vec<UsedVersion>)> {
    let mut sources: Sources<'b> = Vec::new();
    let mut versions = Vec::new();
    for r in records {
        let version = objects.original(&r.file, r.file_size)?;
        let object = objects.object(&r.file, version);
        let image = Image::parse(&object, Path::new(&r.file))
            .with_context(|| format!("reading {}", object.name()))?;
        if let Some(problem) = structure_problem(r, &image, false) {
            bail!("{}: {problem}", object.name());
        }
        versions.push(UsedVersion {
            file: r.file.clone(),
            version: version.id.clone(),
        });
        sources.push(Box::new(object));
    }
    Ok((sources, versions))
}

/// What is wrong with file `r` as read (`image`), by the structural
/// rules: its backing name, format and size as the manifest says,
/// encrypted as `encrypted` says, naming no external data file.
fn structure_problem(r: &VolumeRecord, image: &Image, encrypted: bool) -> Option<String> {
    if image.hc.backing_file != r.backing {
        return Some(format!(
            "backing file is {:?}, the manifest says {:?}",
            image.hc.backing_file, r.backing
        ));
    }
    if image.hc.backing_format.as_deref() != r.backing.as_ref().map(|_| "qcow2") {
        return Some(format!("backing format is {:?}", image.hc.backing_format));
    }
    if image.header().size != r.virtual_size {
        return Some("virtual size differs from the manifest".into());
    }
    if image.encrypted() != encrypted {
        return Some(format!(
            "the file is {}encrypted, the manifest says it is {}",
            if image.encrypted() { "" } else { "not " },
            if encrypted { "" } else { "not" }
        ));
    }
    super::check::data_file_problem(image)
}

/// How volume `v`'s data is proven: the chain's cluster maps laid over
/// each other, each cluster checked as it is copied (returned); or, where
/// the chain has no maps, each file's digest read now.
fn proof(
    objects: &Objects,
    chain: &[Manifest],
    v: &VolumeRecord,
    records: &[&VolumeRecord],
    sources: &[Box<dyn ChainSource + '_>],
) -> anyhow::Result<Option<Arc<Baseline>>> {
    let held: u64 = records
        .iter()
        .map(|r| r.cluster_map.as_ref().map_or(0, |m| m.records))
        .sum();
    let maps = records.iter().all(|r| r.cluster_map.is_some()) && held <= MAX_IN_FLIGHT_RECORDS;
    if maps {
        let read = |file: &str| objects.read_original(file).map_err(|e| format!("{e:#}"));
        return super::content::baseline_of(chain, &v.name, None, read)
            .map(Some)
            .map_err(|why| anyhow::anyhow!("volume {}: {why}", v.name));
    }
    info!(volume = %v.name, "the chain has no cluster maps: its digests are read first");
    for (r, source) in records.iter().zip(sources) {
        let source = source.as_ref();
        let digest = match r.digest.is_layout() {
            true => {
                let image = Image::parse(source, &PathBuf::from(&r.file))?;
                qcow2::layout_digest(source, &image)?.0
            }
            false => crate::digest::of_source(source)?,
        };
        if digest != r.digest {
            bail!(
                "{} does not verify: its digest is {digest}, the manifest says {}",
                source.name(),
                r.digest
            );
        }
    }
    Ok(None)
}

/// Prunes `vm`'s points in `bucket` as `keep` says, holding the VM's
/// lock in the bucket. A point an object lock still holds is kept (and
/// what it builds on); the report names it and the date. While a serve's
/// lease lies in the bucket (a mount or live restore reading a point
/// where it lies, on any host) the prune is refused, naming it.
/// With `dry_run`, nothing is changed and no lock taken: the report
/// says what would go.
pub fn prune_bucket(
    bucket: &Bucket,
    vm: &str,
    keep: Keep,
    dry_run: bool,
) -> anyhow::Result<Retention> {
    let lock = match dry_run {
        true => None,
        false => {
            let lock = bucket.lock_vm(vm, &super::sync::holder("prune"))?;
            // A mount or live restore of a point reads it where it lies.
            let serving = super::serve::runtime::bucket_leases_in_the_way(bucket, vm)?;
            if !serving.is_empty() {
                let held: Vec<String> = serving.into_iter().map(|l| l.what).collect();
                return Err(crate::repo::Error::InUse {
                    vm: vm.to_string(),
                    holder: held.join("; "),
                }
                .into());
            }
            bucket.abort_incomplete(&lock, vm)?;
            Some(lock)
        }
    };
    let objects = Objects::load(bucket, vm)?;
    let manifests: Vec<Manifest> = objects
        .points(vm)?
        .into_iter()
        .map(|p| p.manifest)
        .collect();
    check_links(&manifests)?;
    let mut kept = keep_set(&manifests, keep)?;
    let lockable = bucket.object_lock_enabled()?;
    let mut locked = BTreeMap::new();
    for m in &manifests {
        if kept.contains(m.id.as_str()) || !lockable {
            continue;
        }
        if let Some(until) = objects.held_until(&format!("{vm}/{}/", m.id))? {
            locked.insert(m.id.as_str(), until);
            kept.extend(ancestors(&manifests, m));
        }
    }
    let mut report = Retention {
        dry_run,
        ..Retention::default()
    };
    // Newest first: a failure never leaves a kept point without its parent.
    for m in manifests.iter().rev() {
        if kept.contains(m.id.as_str()) {
            report.kept.push(m.id.clone());
            if let Some(until) = locked.get(m.id.as_str()) {
                report.locked.push(Locked {
                    backup: m.id.clone(),
                    until: until.clone(),
                });
            }
            continue;
        }
        if !dry_run {
            objects
                .remove_point(vm, &m.id)
                .with_context(|| format!("deleting backup {} from {}", m.id, bucket.location()))?;
            info!(vm, backup = %m.id, "pruned from the bucket");
        }
        report.deleted.push(m.id.clone());
    }
    if lock.is_some() {
        objects.remove_leftovers(vm, &manifests, lockable)?;
        write_index(bucket, vm);
    }
    report.kept.reverse();
    report.deleted.reverse();
    report.locked.reverse();
    Ok(report)
}

impl Objects<'_> {
    /// The keys under `prefix`.
    fn under<'k>(&'k self, prefix: &'k str) -> impl Iterator<Item = &'k String> + 'k {
        self.versions
            .range(prefix.to_string()..)
            .map(|(k, _)| k)
            .take_while(move |k| k.starts_with(prefix))
    }

    /// The latest retain-until date of any version under `prefix` that
    /// an object lock still holds; `None` when none is held.
    fn held_until(&self, prefix: &str) -> anyhow::Result<Option<String>> {
        let now = Utc::now().to_unix();
        let mut latest: Option<(i64, String)> = None;
        for key in self.under(prefix) {
            for v in self.versions[key].iter().filter(|v| !v.marker) {
                let Some(r) = self.bucket.retention_of(key, &v.id)? else {
                    continue;
                };
                // A date that does not parse holds (the store enforces it).
                let until = Utc::parse_rfc3339(&r.until).map_or(i64::MAX, |t| t.to_unix());
                if until > now && latest.as_ref().is_none_or(|(l, _)| until > *l) {
                    latest = Some((until, r.until.clone()));
                }
            }
        }
        Ok(latest.map(|(_, text)| text))
    }

    /// Removes every version of every object of point `id`, delete
    /// markers included: its manifest first, so no half point is listed.
    fn remove_point(&self, vm: &str, id: &str) -> anyhow::Result<()> {
        let prefix = format!("{vm}/{id}/");
        let manifest = format!("{prefix}manifest.json");
        let keys = std::iter::once(&manifest)
            .filter(|k| self.versions.contains_key(*k))
            .chain(self.under(&prefix).filter(|k| **k != manifest));
        for key in keys {
            for v in self.versions[key].iter().rev() {
                self.bucket.delete_version(key, &v.id)?;
            }
        }
        Ok(())
    }

    /// Removes what lies under a point's prefix with no manifest (a sync
    /// or prune that died midway; none runs now: the VM's bucket lock is
    /// held), unless an object lock holds it.
    fn remove_leftovers(
        &self,
        vm: &str,
        points: &[Manifest],
        lockable: bool,
    ) -> anyhow::Result<()> {
        let ids: BTreeSet<&str> = self
            .versions
            .keys()
            .filter_map(|k| k.strip_prefix(&format!("{vm}/"))?.split_once('/'))
            .map(|(id, _)| id)
            .filter(|id| !id.starts_with('.') && !points.iter().any(|m| m.id == *id))
            .collect();
        for id in ids {
            let prefix = format!("{vm}/{id}/");
            if lockable && self.held_until(&prefix)?.is_some() {
                continue;
            }
            info!(
                vm,
                id, "removing what an interrupted run left in the bucket"
            );
            self.remove_point(vm, id)?;
        }
        Ok(())
    }
}

/// Checks the points of `vm` in `bucket` (every VM's with `None`; only
/// `backup` when given) as `verify` checks a directory's: of each file its
/// first version, of the recorded length, by the structural rules, its
/// cluster tables, and every byte: by its whole-file digest, or by its
/// layout digest and its cluster map read against its data
/// (`map_clusters`: the maps of whole-file digests too). Nothing is
/// changed, and no damage is recorded in the bucket.
pub fn verify_bucket(
    bucket: &Bucket,
    vm: Option<&str>,
    backup: Option<&str>,
    map_clusters: bool,
) -> anyhow::Result<Report> {
    let vms = match vm {
        Some(vm) => vec![vm.to_string()],
        None => bucket.all_vms()?,
    };
    let mut report = Report::default();
    for vm in &vms {
        let objects = Objects::load(bucket, vm)?;
        let points = objects.points(vm)?;
        if let Some(id) = backup
            && !points.iter().any(|p| p.manifest.id == id)
        {
            return Err(BadInput(format!(
                "{} holds no backup {id} of vm {vm}",
                bucket.location()
            ))
            .into());
        }
        for m in points.iter().map(|p| &p.manifest) {
            if backup.is_some_and(|id| id != m.id) {
                continue;
            }
            report.backups += 1;
            let mut problem = |file: Option<&str>, text: String| {
                report.problems.push(Problem {
                    vm: vm.clone(),
                    backup: m.id.clone(),
                    file: file.map(str::to_string),
                    problem: text,
                    data_damage: file.is_some(),
                })
            };
            if let Some(parent) = &m.parent
                && !points.iter().any(|p| &p.manifest.id == parent)
            {
                problem(None, format!("parent backup {parent} is not in the bucket"));
            }
            for v in &m.volumes {
                if let Err(e) = verify_object(&objects, m, v, map_clusters) {
                    problem(Some(&v.file), format!("{e:#}"));
                }
            }
            report.files += m.volumes.len();
        }
    }
    Ok(report)
}

/// Checks file `v` of point `m` (see [`verify_bucket`]): the first
/// problem found.
fn verify_object(
    objects: &Objects,
    m: &Manifest,
    v: &VolumeRecord,
    map_clusters: bool,
) -> anyhow::Result<()> {
    let object = objects.object(&v.file, objects.original(&v.file, v.file_size)?);
    let image = Image::parse(&object, Path::new(&v.file))?;
    if let Some(problem) = structure_problem(v, &image, m.encryption.is_some()) {
        bail!("{problem}");
    }
    qcow2::walk(&object, &image, |_| Ok(())).context("cluster tables")?;
    let layout = v.digest.is_layout();
    let digest = match layout {
        true => qcow2::layout_digest(&object, &image)?.0,
        false => crate::digest::of_source(&object)?,
    };
    if digest != v.digest {
        bail!("digest is {digest}, the manifest says {}", v.digest);
    }
    let Some(record) = &v.cluster_map else {
        if layout {
            bail!("its digest leaves the data to a cluster map, and the manifest names none");
        }
        return Ok(());
    };
    let bytes = objects.read_original(&record.file)?;
    let digest = crate::digest::Digest::Whole(blake3::hash(&bytes));
    if digest != record.digest {
        bail!(
            "cluster map {}: digest is {digest}, the manifest says {}",
            record.file,
            record.digest
        );
    }
    if layout || map_clusters {
        let map = Map::parse(&bytes).with_context(|| format!("cluster map {}", record.file))?;
        super::check::map_against_file(&object, &image, &map)
            .with_context(|| format!("cluster map {}", record.file))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::in_parallel;

    #[test]
    fn in_parallel_gives_every_result_in_order() {
        let items: Vec<u64> = (0..100).collect();
        let out = in_parallel(&items, 7, |&i| {
            // Later items finish first.
            std::thread::sleep(std::time::Duration::from_micros(100 - i));
            i * 2
        });
        assert_eq!(out, (0..100).map(|i| i * 2).collect::<Vec<_>>());
        assert!(in_parallel(&[] as &[u64], 4, |&i| i).is_empty());
    }
}
