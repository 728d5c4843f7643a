//! A VM's objects in a bucket as bitback reads them: every version of
//! every key listed once ([`Objects`]), of each key the version bitback
//! wrote (the first, of its recorded length), its points (their manifests,
//! from the VM's index where the store vouches for a copy), and a chain's
//! files as sources a native copy or a served read goes through
//! ([`chain_sources`], [`Windowed`]), proven as a restore proves them
//! ([`proof`]). What reads a bucket builds on this: `list`, `restore`,
//! `verify` and `prune` ([`super::in_bucket`]) and a served point
//! ([`super::serve::bucket`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::Serialize;
use tracing::info;

use super::chain::{Pick, chain_of, has_volumes};
use super::native::ChainSource;
use super::outcome::BadInput;
use super::restore::MAX_IN_FLIGHT_RECORDS;
use crate::cluster_map::Baseline;
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

#[derive(Debug, Clone, Serialize)]
pub struct UsedVersion {
    /// Relative to the repository (the object's key under the prefix).
    pub file: String,
    pub version: String,
}

/// Every version of every object of one VM in a bucket.
pub(super) struct Objects<'b> {
    pub(super) bucket: &'b Bucket,
    /// By repository key, oldest first.
    pub(super) versions: BTreeMap<String, Vec<Version>>,
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
pub(super) struct Index {
    pub(super) points: Vec<Indexed>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub(super) struct Indexed {
    /// The manifest's key and version.
    pub(super) key: String,
    pub(super) version: String,
    /// Its bytes.
    pub(super) manifest: String,
}

/// The key of `vm`'s index.
pub(super) fn index_key(vm: &str) -> String {
    format!("{vm}/.points.json")
}

impl<'b> Objects<'b> {
    pub(super) fn load(bucket: &'b Bucket, vm: &str) -> anyhow::Result<Objects<'b>> {
        Ok(Objects {
            bucket,
            versions: bucket.versions(vm)?,
            index: BTreeMap::new(),
        })
    }

    /// [`Objects::load`] with the VM's index read too (for a listing).
    pub(super) fn load_indexed(bucket: &'b Bucket, vm: &str) -> anyhow::Result<Objects<'b>> {
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
    pub(super) fn indexed(&self, key: &str, version: &Version) -> Option<Vec<u8>> {
        let text = self.index.get(&(key.to_string(), version.id.clone()))?;
        let etag = version.etag.as_deref()?;
        (crate::s3::md5_hex(text.as_bytes()) == etag).then(|| text.as_bytes().to_vec())
    }

    /// The version of `key` bitback reads: the first written (the oldest
    /// that is data), of `size` bytes when one is given.
    pub(super) fn original(&self, key: &str, size: Option<u64>) -> anyhow::Result<&Version> {
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
    pub(super) fn read_original(&self, key: &str) -> anyhow::Result<Vec<u8>> {
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
    pub(super) fn object(&self, key: &str, version: &Version) -> Object<'b> {
        Object {
            bucket: self.bucket,
            key: key.to_string(),
            version: version.id.clone(),
            size: version.size,
        }
    }

    /// Whether a delete marker is the newest version of `key`.
    pub(super) fn hidden(&self, key: &str) -> bool {
        self.versions
            .get(key)
            .and_then(|v| v.last())
            .is_some_and(|v| v.marker)
    }

    /// The points of `vm`: each manifest's first version, oldest point
    /// first. A manifest that does not parse is an error naming it.
    pub(super) fn points(&self, vm: &str) -> anyhow::Result<Vec<BucketPoint>> {
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
    pub(super) fn pick(
        &self,
        vm: &str,
        pick: &Pick,
        volumes: &[String],
    ) -> anyhow::Result<Vec<Manifest>> {
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
    pub(super) fn point(
        &self,
        vm: &str,
        key: &str,
        id: &str,
    ) -> anyhow::Result<Option<BucketPoint>> {
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
pub(super) const MANIFEST_READERS: usize = 8;
/// `f` of every item of `items`, in their order, on up to `threads`
/// threads at once.
pub(super) fn in_parallel<T: Sync, R: Send>(
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

/// A chain file read in aligned windows of [`WINDOW`] bytes (each by
/// [`WINDOW_GETS`] ranged GETs at once), the last [`WINDOWS`] read by
/// the files of one chain kept ([`Kept`], shared: memory is bounded per
/// volume, however long its chain): a served volume's reads (FUSE's 128
/// KiB, a stream's, a booting guest's) cost a window's GETs per window
/// instead of one each.
pub(super) struct Windowed<'b> {
    inner: Box<dyn ChainSource + 'b>,
    size: u64,
    /// This file's place in its chain, in the keys of `kept`.
    file: usize,
    kept: Kept,
}

/// The windows the files of one chain keep: (file, start) and bytes,
/// most recently used first.
pub(super) type Kept = Arc<std::sync::Mutex<Windows>>;

/// Windows by (file, start), most recently used first.
pub(super) type Windows = Vec<((usize, u64), Arc<Vec<u8>>)>;

const WINDOW: u64 = 4 << 20;
const WINDOW_GETS: u64 = 2;
const WINDOWS: usize = 8;

impl<'b> Windowed<'b> {
    /// File `file` of a chain whose files keep their windows in `kept`.
    pub(super) fn new(inner: Box<dyn ChainSource + 'b>, file: usize, kept: Kept) -> Windowed<'b> {
        let size = inner.size().unwrap_or(0);
        Windowed {
            inner,
            size,
            file,
            kept,
        }
    }

    /// The window starting at `start`, kept or read now.
    pub(super) fn window(&self, start: u64) -> std::io::Result<Arc<Vec<u8>>> {
        let key = (self.file, start);
        let kept = |kept: &mut Windows| {
            let at = kept.iter().position(|(k, _)| *k == key)?;
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
        all.insert(0, (key, bytes.clone()));
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
pub(super) struct Object<'b> {
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

/// The files of a chain, full first, as a native copy reads them.
pub(super) type Sources<'b> = Vec<Box<dyn ChainSource + 'b>>;

/// The object versions of a volume's chain (`records`, full first), each
/// checked by the structural rules, and the versions used.
pub(super) fn chain_sources<'b>(
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
pub(super) fn structure_problem(
    r: &VolumeRecord,
    image: &Image,
    encrypted: bool,
) -> Option<String> {
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
pub(super) fn proof(
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
        let read = |file: &str| {
            let bytes = objects.read_original(file).map_err(|e| format!("{e:#}"))?;
            let len = bytes.len() as u64;
            Ok((
                Box::new(std::io::Cursor::new(bytes)) as Box<dyn std::io::Read>,
                Some(len),
            ))
        };
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

impl Objects<'_> {
    /// The keys under `prefix`.
    pub(super) fn under<'k>(&'k self, prefix: &'k str) -> impl Iterator<Item = &'k String> + 'k {
        self.versions
            .range(prefix.to_string()..)
            .map(|(k, _)| k)
            .take_while(move |k| k.starts_with(prefix))
    }

    /// The latest retain-until date of any version under `prefix` that
    /// an object lock still holds; `None` when none is held.
    pub(super) fn held_until(&self, prefix: &str) -> anyhow::Result<Option<String>> {
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
    pub(super) fn remove_point(&self, vm: &str, id: &str) -> anyhow::Result<()> {
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
    pub(super) fn remove_leftovers(
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
