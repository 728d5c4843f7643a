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

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use serde::Serialize;
use tracing::info;

use super::chain::volume_records;
use super::check::{Problem, Report};
use super::native::{Copier, plan_sources};
use super::objects::{
    BucketPoint, Index, Indexed, Objects, UsedVersion, chain_sources, in_parallel, index_key,
    proof, structure_problem,
};
use super::outcome::BadInput;
use super::restore::{Outputs, RestoreOptions, Restored};
use super::retention::{Keep, Locked, Retention, ancestors, check_links, keep_set};
use crate::cluster_map::Map;
use crate::qcow2::{self, Image};
use crate::repo::time::Utc;
use crate::repo::{Bucket, Manifest, Store, VolumeRecord};

/// A restore from a bucket: the restore, and the object versions it read.
#[derive(Debug, Clone, Serialize)]
pub struct BucketRestored {
    #[serde(flatten)]
    pub restored: Restored,
    /// The files of the volume's chain, full first, each with its version.
    pub versions: Vec<UsedVersion>,
}

/// VMs listed at once (each reads its manifests several at once too).
const VM_READERS: usize = 16;

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

/// This run, as the holder of a VM's lock in a bucket, for `purpose`.
pub(super) fn holder(purpose: &str) -> crate::repo::Holder {
    crate::repo::Holder {
        host: super::serve::runtime::host(),
        pid: std::process::id(),
        purpose: purpose.into(),
        started: Utc::now().rfc3339(),
    }
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

/// The most bytes one ranged GET of a restore reads: an object store
/// charges per request (SeaweedFS spends about 10 ms of CPU on each,
/// whatever its length: a 1 GiB point read in 4 MiB GETs cost it 6.3
/// CPU-seconds, in 16 MiB ones about 2), and multipart objects come in
/// parts of 16 MiB.
const SPAN: u64 = 16 << 20;

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
        span: Some(SPAN),
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
            let lock = bucket.lock_vm(vm, &holder("prune"))?;
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

/// Checks the points of `vm` in `bucket` (every VM's with `None`; only
/// `backup` when given) as `verify` checks a directory's: of each file its
/// first version, of the recorded length, by the structural rules, its
/// cluster tables, and every byte: by its whole-file digest, or by its
/// layout digest and its cluster map read against its data
/// (`map_clusters`: the maps of whole-file digests too). A file found
/// damaged (not one the store failed to give) gets a damage record in
/// the bucket, `<vm>/.damaged/<point>.<volume>.json`; nothing else is
/// written.
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
            let mut problem = |file: Option<&str>, text: String, data_damage: bool| {
                report.problems.push(Problem {
                    vm: vm.clone(),
                    backup: m.id.clone(),
                    file: file.map(str::to_string),
                    problem: text,
                    data_damage,
                })
            };
            if let Some(parent) = &m.parent
                && !points.iter().any(|p| &p.manifest.id == parent)
            {
                problem(
                    None,
                    format!("parent backup {parent} is not in the bucket"),
                    false,
                );
            }
            for v in &m.volumes {
                let Err(e) = verify_object(&objects, m, v, map_clusters) else {
                    continue;
                };
                let text = format!("{e:#}");
                // What the store failed to give is not the file's damage.
                let damage = !unread(&e);
                if damage
                    && let Err(e) =
                        crate::repo::record_damage(bucket, vm, &m.id, &v.name, &v.digest, &text)
                {
                    tracing::warn!(error = %e, "the damage could not be recorded in the bucket");
                }
                problem(Some(&v.file), text, damage);
            }
            report.files += m.volumes.len();
        }
    }
    Ok(report)
}

/// Whether `e` is a failure to read from the store (a request that
/// failed, an I/O error carrying one), not a finding about the bytes.
fn unread(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<crate::repo::Error>()
            || c.is::<crate::s3::Error>()
            || c.downcast_ref::<std::io::Error>().is_some_and(|io| {
                io.get_ref()
                    .is_some_and(|i| i.is::<crate::repo::Error>() || i.is::<crate::s3::Error>())
            })
    })
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
