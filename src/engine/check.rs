//! The checks of one backup's files, shared by every user of a chain
//! (backup before building on it, restore and export before reading it,
//! consolidate, verify): the structural rules, which read no data, and
//! the cluster tables and digests on top of them.

use anyhow::Context;
use serde::Serialize;

use crate::cluster_map::Map;
use crate::digest::file as digest_file;
use crate::qcow2::{self, Image};
use crate::repo::{Manifest, Repo, VolumeRecord};

/// One thing wrong with one backup (or one of its files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub vm: String,
    pub backup: String,
    /// The file, relative to the repository, when the problem is a file's.
    pub file: Option<String>,
    pub problem: String,
    /// The file's data is damaged (its cluster tables or its digest), as
    /// no structural check sees: what verify records for the next backup.
    #[serde(skip)]
    pub data_damage: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub backups: usize,
    pub files: usize,
    pub problems: Vec<Problem>,
    /// Backups not read: verified whole within `--outdated-after`.
    #[serde(skip_serializing_if = "is_zero")]
    pub skipped: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The structural rules, without reading data: each file a plain qcow2
/// image (no symlink) with the size, backing name and format the manifest
/// gives, its backing file present, encrypted exactly when the manifest
/// says so, and naming no external data file. [`verify_backup`] adds the
/// cluster tables and digests on top.
pub(super) fn verify_structure(repo: &Repo, m: &Manifest, report: &mut Report) {
    push_problems(m, report, |v| record_problem(repo, m, v));
}

/// [`verify_structure`] plus what else is known without reading data
/// ([`known_problem`]).
pub(super) fn verify_known(repo: &Repo, m: &Manifest, report: &mut Report) {
    push_problems(m, report, |v| known_problem(repo, m, v));
}

/// Pushes what `problem` finds wrong with each file of `m`.
fn push_problems(
    m: &Manifest,
    report: &mut Report,
    problem: impl Fn(&VolumeRecord) -> Option<String>,
) {
    for v in &m.volumes {
        if let Some(problem) = problem(v) {
            report.problems.push(Problem {
                vm: m.vm.clone(),
                backup: m.id.clone(),
                file: Some(v.file.clone()),
                problem,
                data_damage: false,
            });
        }
    }
}

/// The structural rules for one file of `m`: what is wrong with it, if
/// anything.
pub(super) fn record_problem(repo: &Repo, m: &Manifest, v: &VolumeRecord) -> Option<String> {
    let path = repo.root().join(&v.file);
    let link = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
    match Image::open(&path) {
        _ if link => Some("is a symlink; backup files must be plain files".into()),
        Err(e) => Some(e.to_string()),
        Ok(image) if image.hc.backing_file != v.backing => Some(format!(
            "backing file is {:?}, the manifest says {:?}",
            image.hc.backing_file, v.backing
        )),
        Ok(image) if image.header().size != v.virtual_size => {
            Some("virtual size differs from the manifest".into())
        }
        Ok(image) if image.hc.backing_format.as_deref() != v.backing.as_ref().map(|_| "qcow2") => {
            Some(format!("backing format is {:?}", image.hc.backing_format))
        }
        Ok(image)
            if image
                .full_backing_path()
                .is_some_and(|backing| !backing.exists()) =>
        {
            Some(format!(
                "backing file {} is missing",
                image.full_backing_path().unwrap_or_default().display()
            ))
        }
        Ok(image) if image.encrypted() != m.encryption.is_some() => Some(format!(
            "the file is {}encrypted, the manifest says it is {}",
            if image.encrypted() { "" } else { "not " },
            if m.encryption.is_some() { "" } else { "not" }
        )),
        Ok(image) => data_file_problem(&image),
    }
}

/// How much of a chain is checked before it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checks {
    /// The structural rules only (`--no-verify`): what reading the chain
    /// needs to be safe, no more.
    Structure,
    /// What is known without reading data: the structural rules, each
    /// file's length as recorded at the commit, and what `verify` found
    /// damaged. What serving a point in seconds checks.
    Known,
    /// Every file's digest read (which also catches all that is known).
    Digests,
}

impl Checks {
    /// A restore's checks: the digests, or with `--no-verify` the
    /// structure alone.
    pub fn reading(verify: bool) -> Checks {
        if verify {
            Checks::Digests
        } else {
            Checks::Structure
        }
    }

    /// A serve's checks (mount, live restore, export): what is known, or
    /// with `--no-verify` the structure alone.
    pub fn serving(verify: bool) -> Checks {
        if verify {
            Checks::Known
        } else {
            Checks::Structure
        }
    }
}

/// What is known to be wrong with file `r` of `link` without reading its
/// data: the structural rules, its recorded length, and what `verify`
/// found (a flipped bit in data that no structural check sees).
pub(super) fn known_problem(repo: &Repo, link: &Manifest, r: &VolumeRecord) -> Option<String> {
    record_problem(repo, link, r)
        .or_else(|| size_problem(repo, r))
        .or_else(|| {
            repo.damage(&link.vm, &link.id, &r.name, &r.digest)
                .map(|p| format!("verify found it damaged: {p}"))
        })
}

/// Whether the file of `r` still has the length its manifest recorded at
/// the commit (a truncated or appended file), where one was recorded.
/// Checked by backups before they build on a file; a restore leaves it to
/// the digests (`--no-verify` reads a file that was replaced on purpose).
pub(super) fn size_problem(repo: &Repo, r: &VolumeRecord) -> Option<String> {
    let recorded = r.file_size?;
    let len = std::fs::metadata(repo.root().join(&r.file)).ok()?.len();
    (len != recorded).then(|| {
        format!("is {len} bytes, the manifest says {recorded}: truncated or written to since")
    })
}

/// Why `image` must not be read, if it names an external data file:
/// backup files never do, and one that does would lead reads (and
/// `qemu-img`) to any file on the host.
pub fn data_file_problem(image: &Image) -> Option<String> {
    (image.header().has_data_file() || image.hc.data_file.is_some()).then(|| {
        format!(
            "names an external data file ({:?}); backup files never do, and bitback does not read one",
            image.hc.data_file.as_deref().unwrap_or("")
        )
    })
}

/// A file's cluster map: its digest as recorded (which catches any change
/// to it since it was written), and with `clusters` its records against
/// the file's clusters. Under a whole-file digest that is a check of the
/// writer, reading the data again; under a layout digest it is the proof
/// of the data, read once.
fn check_map(
    repo: &Repo,
    record: &crate::repo::MapRecord,
    path: &std::path::Path,
    image: &Image,
    clusters: bool,
    sample: Option<&Sample>,
) -> Result<(), MapFailure> {
    let map = read_map(repo, record).map_err(MapFailure::Map)?;
    if !clusters {
        return Ok(());
    }
    std::fs::File::open(path)
        .map_err(anyhow::Error::from)
        .and_then(|file| {
            let only = sample.map(|s| s.of_file(&record.file));
            map_against_file_sampled(&file, image, &map, only.as_ref())
        })
        .map_err(|e| MapFailure::Clusters(e.context("cluster map")))
}

/// The cluster map of `record`, read once: its bytes proven by the
/// manifest's digest, then parsed (hostile until then).
pub(super) fn read_map(repo: &Repo, record: &crate::repo::MapRecord) -> anyhow::Result<Map> {
    let path = repo.root().join(&record.file);
    let (map, digest) = std::fs::File::open(&path)
        .and_then(|file| {
            let len = file.metadata()?.len();
            Map::read_from(file, Some(len))
        })
        .map_err(|e| anyhow::anyhow!("cluster map: cannot read: {e}"))?;
    if digest != record.digest {
        anyhow::bail!(
            "cluster map: digest is {digest}, the manifest says {}",
            record.digest
        );
    }
    map.with_context(|| format!("{} is not a cluster map", path.display()))
}

/// A share of a file's data clusters to read, chosen afresh each run
/// (`verify --sample`): each cluster is read with that probability, by a
/// hash of the run's seed, the file's name and the cluster's number.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Clusters whose hash is at most this are read.
    threshold: u64,
    seed: u64,
}

impl Sample {
    /// No cluster at all.
    pub(super) const NOTHING: Sample = Sample {
        threshold: 0,
        seed: 0,
    };

    /// `percent` (above 0, at most 100) of the clusters, with a seed of
    /// this moment.
    pub fn percent(percent: f64) -> Sample {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Sample::seeded(percent, seed)
    }

    fn seeded(percent: f64, seed: u64) -> Sample {
        let share = (percent / 100.0).clamp(0.0, 1.0);
        Sample {
            threshold: (share * u64::MAX as f64) as u64,
            seed,
        }
    }

    /// The sample of the file named `name`.
    fn of_file(&self, name: &str) -> Sample {
        let mut key = self.seed;
        for b in name.bytes() {
            key = mix(key ^ u64::from(b));
        }
        Sample {
            threshold: self.threshold,
            seed: key,
        }
    }

    fn takes(&self, cluster: u64) -> bool {
        self.threshold != 0
            && mix(self.seed ^ cluster.wrapping_mul(0x9e37_79b9_7f4a_7c15)) <= self.threshold
    }
}

/// splitmix64's finaliser: every input bit reaches every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What [`check_map`] found wrong.
enum MapFailure {
    /// The map itself: unreadable, or not what the manifest recorded.
    Map(anyhow::Error),
    /// The file's clusters and the map disagree.
    Clusters(anyhow::Error),
}

/// Checks `map` against the qcow2 image in `file`, read alone (its backing
/// file is not read): every cluster the image holds (data, compressed or
/// zero) has a record with its bytes' digest, and every other record is a
/// cluster of zeros in an image without a backing file. Reads every data
/// cluster once. The first disagreement is the error.
pub(super) fn map_against_file<S: qcow2::Source + ?Sized>(
    file: &S,
    image: &Image,
    map: &Map,
) -> anyhow::Result<()> {
    map_against_file_sampled(file, image, map, None)
}

/// [`map_against_file`], reading only the clusters `sample` takes (the
/// map's records of clusters the file does not hold are checked all the
/// same: they need no data read).
fn map_against_file_sampled<S: qcow2::Source + ?Sized>(
    file: &S,
    image: &Image,
    map: &Map,
    sample: Option<&Sample>,
) -> anyhow::Result<()> {
    use crate::cluster_map::digest;
    use crate::qcow2::{Compression, Kind, decompress, walk};

    let h = image.header();
    let cs = h.cluster_size();
    if map.cluster_size != cs || map.size != h.size {
        anyhow::bail!(
            "the map is of {} clusters of a {}-byte disk, the file of {} clusters of a {}-byte disk",
            map.cluster_size,
            map.size,
            cs,
            h.size
        );
    }
    let compression = Compression::from_type_byte(h.compression_type)?;
    let mut extents = Vec::new();
    walk(file, image, |e| {
        if e.kind != Kind::Unallocated {
            extents.push(e);
        }
        Ok(())
    })?;
    let disk = map.size.div_ceil(cs);
    let mut held = Held::new(disk);
    let mut cluster = vec![0u8; cs as usize];
    let mut packed = Vec::new();
    let mut i = 0;
    while i < extents.len() {
        let first = extents[i].start / cs;
        let last = (extents[i].start + extents[i].length - 1) / cs;
        // A cluster of zeros costs no read: its record is checked whatever
        // the sample.
        let reads = matches!(extents[i].kind, Kind::Data | Kind::Compressed);
        if last >= disk {
            anyhow::bail!("the file holds cluster {last}, past the disk's end ({disk} clusters)");
        }
        for c in first..=last {
            if !held.insert(c) || (reads && sample.is_some_and(|s| !s.takes(c))) {
                continue;
            }
            let start = c * cs;
            let len = map.cluster_len(c);
            let bytes = &mut cluster[..len];
            bytes.fill(0);
            // The extents over this cluster (several only with subclusters).
            for e in extents[i..]
                .iter()
                .take_while(|e| e.start < start + len as u64)
            {
                let from = e.start.max(start);
                let to = (e.start + e.length).min(start + len as u64);
                if from >= to {
                    continue;
                }
                let at = (from - start) as usize..(to - start) as usize;
                match (e.kind, e.offset) {
                    (Kind::Data, Some(host)) => file
                        .read_exact_at(&mut bytes[at], host + (from - e.start))
                        .map_err(|e| anyhow::anyhow!("reading cluster {c}: {e}"))?,
                    (Kind::Compressed, Some(host)) => {
                        // The bound counts whole sectors; the file may
                        // end inside the last.
                        let left = file.size()?.saturating_sub(host);
                        let bound = e.compressed_length.unwrap_or(0).min(left);
                        packed.resize(bound as usize, 0);
                        file.read_exact_at(&mut packed, host)?;
                        let mut whole = vec![0u8; cs as usize];
                        decompress(compression, &packed, &mut whole)
                            .map_err(|e| anyhow::anyhow!("cluster {c}: {e}"))?;
                        let skip = (from - e.start) as usize;
                        bytes[at.clone()].copy_from_slice(&whole[skip..skip + at.len()]);
                    }
                    _ => {}
                }
            }
            match map.clusters.get(c) {
                None => anyhow::bail!("the map has no record of cluster {c}, which the file holds"),
                Some(d) if *d != digest(bytes) => {
                    anyhow::bail!("cluster {c}: its digest is not the one the map records")
                }
                Some(_) => {}
            }
        }
        i += 1;
    }
    let has_backing = h.backing_file_offset != 0;
    for (c, d) in map.clusters.iter() {
        if held.contains(c) {
            continue;
        }
        if has_backing || *d != digest(&vec![0u8; map.cluster_len(c)]) {
            anyhow::bail!("the map records cluster {c}, which the file does not hold");
        }
    }
    Ok(())
}

/// Clusters of a disk seen once, a bit each (a hash set of a terabyte's
/// 64 KiB clusters took 288 MiB; this takes 2).
struct Held(Vec<u64>);

impl Held {
    fn new(clusters: u64) -> Held {
        Held(vec![0; clusters.div_ceil(64) as usize])
    }

    /// Marks `c`; false if it was already (or is past the disk's end).
    fn insert(&mut self, c: u64) -> bool {
        let Some(word) = self.0.get_mut((c / 64) as usize) else {
            return false;
        };
        let bit = 1u64 << (c % 64);
        let new = *word & bit == 0;
        *word |= bit;
        new
    }

    fn contains(&self, c: u64) -> bool {
        self.0
            .get((c / 64) as usize)
            .is_some_and(|w| w & (1u64 << (c % 64)) != 0)
    }
}

/// The digest of the file at `path` (opened as `image`) of the kind its
/// manifest records: its layout's, or the whole file's.
fn digest_as_recorded(
    path: &std::path::Path,
    image: &Image,
    layout: bool,
) -> anyhow::Result<crate::digest::Digest> {
    match layout {
        true => Ok(qcow2::layout_digest(&std::fs::File::open(path)?, image)?.0),
        false => Ok(digest_file(path)?),
    }
}

/// Checks one backup's files; pushes every problem found. Every byte of
/// each file is proven: by its whole-file digest, or by its layout digest
/// and its cluster map read against its data. `map_clusters`: compare the
/// cluster maps of whole-file digests with their files too (see
/// [`check_map`]).
pub fn verify_backup(repo: &Repo, m: &Manifest, report: &mut Report, map_clusters: bool) {
    verify_backup_sampled(repo, m, report, map_clusters, None)
}

/// [`verify_backup`], where a file whose layout digest leaves its data to
/// its cluster map has only the `sample` of its data clusters read (its
/// metadata and its map are checked whole; a file with a whole-file
/// digest is read whole).
pub(super) fn verify_backup_sampled(
    repo: &Repo,
    m: &Manifest,
    report: &mut Report,
    map_clusters: bool,
    sample: Option<&Sample>,
) {
    verify_reading(repo, m, report, map_clusters, sample, true)
}

/// [`verify_backup`] of everything but the data, which the caller proves
/// as it reads it ([`super::proof`]): a file under a whole-file digest is
/// not read, one under a layout digest has its layout and its map checked
/// and none of its data clusters read.
pub(super) fn verify_but_data(repo: &Repo, m: &Manifest, report: &mut Report) {
    verify_reading(repo, m, report, false, Some(&Sample::NOTHING), false)
}

/// [`verify_backup_sampled`]; `whole`: compute whole-file digests.
fn verify_reading(
    repo: &Repo,
    m: &Manifest,
    report: &mut Report,
    map_clusters: bool,
    sample: Option<&Sample>,
    whole: bool,
) {
    if let Some(parent) = &m.parent
        && let Err(e) = repo.manifest(&m.vm, parent)
    {
        report.problems.push(Problem {
            vm: m.vm.clone(),
            backup: m.id.clone(),
            file: None,
            problem: format!("parent backup {parent} is unusable: {e:#}"),
            data_damage: false,
        });
    }
    let before = report.problems.len();
    verify_structure(repo, m, report);
    let failed: Vec<String> = report.problems[before..]
        .iter()
        .filter_map(|p| p.file.clone())
        .collect();
    let mut problem = |file: Option<&str>, text: String, data_damage: bool| {
        report.problems.push(Problem {
            vm: m.vm.clone(),
            backup: m.id.clone(),
            file: file.map(str::to_string),
            problem: text,
            data_damage,
        })
    };

    let mut files = 0;
    for v in &m.volumes {
        files += 1;
        let file = Some(v.file.as_str());
        let path = repo.root().join(&v.file);
        let image = match Image::open(&path) {
            Ok(image) if !failed.contains(&v.file) => image,
            // Reported by the structural check; the cluster tables of a
            // file that failed it are not read.
            _ => continue,
        };
        if let Err(e) = qcow2::walk(
            &match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    problem(file, format!("cannot open: {e}"), false);
                    continue;
                }
            },
            &image,
            |_| Ok(()),
        ) {
            problem(file, format!("cluster map: {e}"), true);
        }
        // A layout digest leaves the data to the cluster map: the map's
        // clusters are read against the file's whatever was asked.
        let layout = v.digest.is_layout();
        if !layout && !whole {
            continue;
        }
        match digest_as_recorded(&path, &image, layout) {
            Ok(digest) if digest == v.digest => {}
            Ok(digest) => {
                problem(
                    file,
                    format!("digest is {digest}, the manifest says {}", v.digest),
                    true,
                );
                continue;
            }
            Err(e) => {
                problem(file, format!("cannot read: {e:#}"), false);
                continue;
            }
        }
        match &v.cluster_map {
            // With a layout digest the map is the data's only proof: a
            // map that cannot be trusted, or a cluster unlike its record,
            // is damage to the volume's data. Under a whole-file digest
            // (which proved the data) a disagreement is the writer's.
            Some(record) => match check_map(
                repo,
                record,
                &path,
                &image,
                map_clusters || layout,
                sample.filter(|_| layout),
            ) {
                Ok(()) => {}
                Err(MapFailure::Map(e)) => {
                    problem(Some(record.file.as_str()), format!("{e:#}"), layout)
                }
                Err(MapFailure::Clusters(e)) if layout => problem(file, format!("{e:#}"), true),
                Err(MapFailure::Clusters(e)) => {
                    problem(Some(record.file.as_str()), format!("{e:#}"), false)
                }
            },
            None if layout => problem(
                file,
                "its digest leaves the data to a cluster map, and the manifest names none".into(),
                true,
            ),
            None => {}
        }
    }
    report.files += files;
}

#[cfg(test)]
mod tests {
    use super::Sample;

    #[test]
    fn a_sample_takes_about_its_share_and_another_run_takes_others() {
        let one = Sample::seeded(10.0, 1).of_file("vm/a/vda.qcow2");
        let taken: Vec<u64> = (0..100_000).filter(|&c| one.takes(c)).collect();
        assert!((9_000..11_000).contains(&taken.len()), "{}", taken.len());
        let other = Sample::seeded(10.0, 2).of_file("vm/a/vda.qcow2");
        let both = taken.iter().filter(|&&c| other.takes(c)).count();
        // Independent choices overlap by about a tenth.
        assert!(both < 2_000, "{both}");
        let all = Sample::seeded(100.0, 3).of_file("x");
        assert!((0..10_000).all(|c| all.takes(c)));
    }
}
