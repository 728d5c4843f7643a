//! Per-cluster digest maps: what each guest cluster of a backup file holds,
//! as 128 bits of BLAKE3 of its bytes, written beside the file as the file
//! is written.
//!
//! A map describes one file, not the chain: it has a record for every
//! guest cluster the backup job wrote into that file (data or zeros), and
//! none for what the file leaves to its backing file. The volume at a
//! point is the chain's maps laid over each other, full first, as qemu
//! lays the files. A cluster's digest is over its guest bytes (the disk's
//! last cluster may be shorter than the cluster size), whatever the file
//! stores (plain, compressed, or a zero cluster).
//!
//! The file (`<volume>.map` beside `<volume>.qcow2`), little-endian:
//!
//! ```text
//!  0   magic "BBCMAP01"
//!  8   cluster size (u64)
//!  16  virtual size (u64)
//!  24  reserved, 0 (u64)
//!  32  records: cluster index (u64) + digest (16 bytes), 24 bytes each,
//!      in the order the clusters were written; a later record of a
//!      cluster replaces an earlier one
//! ```
//!
//! Appending in write order keeps nothing in memory while a backup runs,
//! and a chain's maps concatenate (parent first) into the map of the
//! files merged.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::digest::Digest as FileDigest;

pub const MAGIC: &[u8; 8] = b"BBCMAP01";
const HEADER: usize = 32;
const RECORD: usize = 24;

/// 128 bits of BLAKE3.
pub type Digest = [u8; 16];

/// The digest of one cluster's guest bytes.
pub fn digest(bytes: &[u8]) -> Digest {
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::hash(bytes).as_bytes()[..16]);
    out
}

/// The digest of a cluster of zeros, of its guest length: a whole
/// cluster's computed once.
#[derive(Debug, Clone, Copy)]
struct Zeros {
    cluster_size: u64,
    whole: Digest,
}

impl Zeros {
    fn new(cluster_size: u64) -> Zeros {
        Zeros {
            cluster_size,
            whole: digest(&vec![0u8; cluster_size as usize]),
        }
    }

    fn of(&self, len: usize) -> Digest {
        match len as u64 == self.cluster_size {
            true => self.whole,
            false => digest(&vec![0u8; len]),
        }
    }
}

/// The map file beside a backup file: `x.qcow2` -> `x.map`.
pub fn path_for(file: &Path) -> PathBuf {
    file.with_extension("map")
}

/// A map being written, record by record.
pub struct Writer {
    out: BufWriter<File>,
    path: PathBuf,
    hasher: blake3::Hasher,
    records: u64,
    zeros: Zeros,
}

/// A finished map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub path: PathBuf,
    /// BLAKE3 of the map file.
    pub digest: FileDigest,
    pub records: u64,
}

impl Writer {
    /// Creates `path` (which must not exist).
    pub fn create(path: &Path, cluster_size: u64, size: u64) -> std::io::Result<Writer> {
        let file = File::options().write(true).create_new(true).open(path)?;
        let mut w = Writer {
            out: BufWriter::with_capacity(256 << 10, file),
            path: path.into(),
            hasher: blake3::Hasher::new(),
            records: 0,
            zeros: Zeros::new(cluster_size),
        };
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&cluster_size.to_le_bytes());
        header[16..24].copy_from_slice(&size.to_le_bytes());
        w.put(&header)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hasher.update(bytes);
        self.out.write_all(bytes)
    }

    /// Guest cluster `cluster` now holds `bytes` (its whole guest range).
    pub fn record(&mut self, cluster: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.record_digest(cluster, digest(bytes))
    }

    /// Guest cluster `cluster` now reads as zeros; `len` is its guest
    /// length.
    pub fn record_zeros(&mut self, cluster: u64, len: usize) -> std::io::Result<()> {
        self.record_digest(cluster, self.zeros.of(len))
    }

    /// Guest cluster `cluster` now holds bytes whose digest is `d`.
    pub fn record_digest(&mut self, cluster: u64, d: Digest) -> std::io::Result<()> {
        let mut rec = [0u8; RECORD];
        rec[..8].copy_from_slice(&cluster.to_le_bytes());
        rec[8..].copy_from_slice(&d);
        self.records += 1;
        self.put(&rec)
    }

    /// Flushes and syncs the map.
    pub fn finish(self) -> std::io::Result<Written> {
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(Written {
            path: self.path,
            digest: FileDigest::Whole(self.hasher.finalize()),
            records: self.records,
        })
    }
}

/// A map read back: the newest digest of each cluster it records.
#[derive(Debug, Clone, Default)]
pub struct Map {
    pub cluster_size: u64,
    pub size: u64,
    pub clusters: Clusters,
}

/// Digests by cluster number, in as little memory as the records allow:
/// where few of the disk's clusters are recorded, their numbers sorted
/// with their digests (24 bytes a cluster recorded); where most are, a
/// digest for every cluster of the disk and a bit saying which are
/// recorded (16 bytes and a bit a cluster of the disk). A terabyte of
/// 64 KiB clusters all recorded is 258 MiB either way; a hash table of
/// them took 800 MiB, and the map's bytes read whole 384 MiB more.
#[derive(Debug, Clone)]
pub struct Clusters {
    /// Clusters of the disk.
    disk: u64,
    repr: Repr,
}

#[derive(Debug, Clone)]
enum Repr {
    /// Sorted by cluster, each once.
    Sparse(Vec<(u64, Digest)>),
    Dense {
        digests: Vec<Digest>,
        /// Bit `c` set: cluster `c` is recorded.
        recorded: Vec<u64>,
        len: usize,
    },
}

impl Default for Clusters {
    fn default() -> Clusters {
        Clusters {
            disk: 0,
            repr: Repr::Sparse(Vec::new()),
        }
    }
}

/// Whether `records` of a disk of `disk` clusters take less memory held
/// densely.
fn dense_fits(disk: u64, records: u64) -> bool {
    records.saturating_mul(24) >= disk.saturating_mul(16) + disk / 8
}

impl Clusters {
    /// No record yet, of a disk of `disk` clusters, about `records` of
    /// them to come (to choose how they are held).
    fn with_records(disk: u64, records: u64) -> Clusters {
        let repr = match dense_fits(disk, records) {
            true => Repr::Dense {
                digests: vec![[0u8; 16]; disk as usize],
                recorded: vec![0u64; disk.div_ceil(64) as usize],
                len: 0,
            },
            false => Repr::Sparse(Vec::with_capacity(records as usize)),
        };
        Clusters { disk, repr }
    }

    /// The digest recorded for cluster `c`.
    pub fn get(&self, c: u64) -> Option<&Digest> {
        match &self.repr {
            Repr::Sparse(v) => v
                .binary_search_by_key(&c, |&(k, _)| k)
                .ok()
                .map(|i| &v[i].1),
            Repr::Dense {
                digests, recorded, ..
            } => (c < self.disk && recorded[(c / 64) as usize] & (1 << (c % 64)) != 0)
                .then(|| &digests[c as usize]),
        }
    }

    pub fn contains(&self, c: u64) -> bool {
        self.get(c).is_some()
    }

    /// Clusters recorded.
    pub fn len(&self) -> usize {
        match &self.repr {
            Repr::Sparse(v) => v.len(),
            Repr::Dense { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The clusters recorded and their digests, in cluster order.
    pub fn iter(&self) -> Box<dyn Iterator<Item = (u64, &Digest)> + '_> {
        match &self.repr {
            Repr::Sparse(v) => Box::new(v.iter().map(|(c, d)| (*c, d))),
            Repr::Dense {
                digests, recorded, ..
            } => Box::new(
                recorded
                    .iter()
                    .enumerate()
                    .flat_map(|(w, &bits)| Bits(bits).map(move |b| w as u64 * 64 + b))
                    .map(|c| (c, &digests[c as usize])),
            ),
        }
    }

    /// The clusters recorded, in order.
    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.iter().map(|(c, _)| c)
    }

    /// Records, in the order written (a later record of a cluster wins);
    /// sparse ones are sorted by [`Clusters::settle`].
    fn push(&mut self, c: u64, d: Digest) {
        match &mut self.repr {
            Repr::Sparse(v) => v.push((c, d)),
            Repr::Dense {
                digests,
                recorded,
                len,
            } => {
                let (w, bit) = ((c / 64) as usize, 1u64 << (c % 64));
                if recorded[w] & bit == 0 {
                    recorded[w] |= bit;
                    *len += 1;
                }
                digests[c as usize] = d;
            }
        }
    }

    /// After the last [`Clusters::push`]: sparse records sorted, each
    /// cluster's last one kept.
    fn settle(&mut self) {
        let Repr::Sparse(v) = &mut self.repr else {
            return;
        };
        if !v.is_sorted_by(|a, b| a.0 < b.0) {
            // Stable: a cluster's records stay in the order written.
            v.sort_by_key(|&(c, _)| c);
            let mut kept = 0;
            for i in 0..v.len() {
                if kept > 0 && v[kept - 1].0 == v[i].0 {
                    v[kept - 1] = v[i];
                } else {
                    v[kept] = v[i];
                    kept += 1;
                }
            }
            v.truncate(kept);
        }
        v.shrink_to_fit();
    }

    /// `newer`'s records laid over these (its digest wins).
    fn overlay(&mut self, newer: Clusters) {
        match &mut self.repr {
            Repr::Dense { .. } => {
                for (c, d) in newer.iter() {
                    self.push(c, *d);
                }
            }
            Repr::Sparse(old) => {
                let old = std::mem::take(old);
                let mut merged = Vec::with_capacity(old.len() + newer.len());
                let mut new = newer.iter().peekable();
                for (c, d) in old {
                    while let Some((n, nd)) = new.next_if(|&(n, _)| n <= c) {
                        merged.push((n, *nd));
                    }
                    if merged.last().is_none_or(|&(m, _)| m != c) {
                        merged.push((c, d));
                    }
                }
                merged.extend(new.map(|(n, nd)| (n, *nd)));
                self.repr = Repr::Sparse(merged);
                self.fit();
            }
        }
    }

    /// Keeps only the records `keep` takes.
    fn retain(&mut self, keep: impl Fn(u64, &Digest) -> bool) {
        match &mut self.repr {
            Repr::Sparse(v) => v.retain(|(c, d)| keep(*c, d)),
            Repr::Dense {
                digests,
                recorded,
                len,
            } => {
                for (w, bits) in recorded.iter_mut().enumerate() {
                    for b in Bits(*bits) {
                        let c = w as u64 * 64 + b;
                        if !keep(c, &digests[c as usize]) {
                            *bits &= !(1 << b);
                            *len -= 1;
                        }
                    }
                }
            }
        }
        self.fit();
    }

    /// Held the way that takes less memory.
    fn fit(&mut self) {
        let dense = matches!(self.repr, Repr::Dense { .. });
        if dense != dense_fits(self.disk, self.len() as u64) {
            let mut other = Clusters::with_records(self.disk, self.len() as u64);
            for (c, d) in self.iter() {
                other.push(c, *d);
            }
            *self = other;
        }
        if let Repr::Sparse(v) = &mut self.repr {
            v.shrink_to_fit();
        }
    }
}

/// The set bits of a word, lowest first.
struct Bits(u64);

impl Iterator for Bits {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(u64::from(b))
    }
}

impl Map {
    /// Reads and checks a map file (hostile: every record is checked
    /// against the header's geometry).
    pub fn read(path: &Path) -> anyhow::Result<Map> {
        let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
        let len = file.metadata().ok().map(|m| m.len());
        let (map, _) =
            Map::read_from(file, len).with_context(|| format!("reading {}", path.display()))?;
        map.with_context(|| format!("{} is not a cluster map", path.display()))
    }

    pub fn parse(bytes: &[u8]) -> anyhow::Result<Map> {
        Map::read_from(bytes, Some(bytes.len() as u64))
            .map_err(anyhow::Error::from)
            .and_then(|(map, _)| map)
    }

    /// Reads a map from `from` (`len` bytes long, when known: it chooses
    /// how the records are held), parsed as it is read, and the digest of
    /// all its bytes. The map is hostile until that digest matches its
    /// manifest's: a caller looks at the digest first, then at the map
    /// (or at why the bytes are not one). Memory: the records as held,
    /// not the bytes.
    pub fn read_from(
        mut from: impl Read,
        len: Option<u64>,
    ) -> std::io::Result<(anyhow::Result<Map>, FileDigest)> {
        let mut hasher = blake3::Hasher::new();
        let mut parser = Parser::new(len);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
            parser.feed(&buf[..n]);
        }
        Ok((parser.finish(), FileDigest::Whole(hasher.finalize())))
    }

    /// A map of these records, in the order written (a later record of a
    /// cluster wins); records past the disk's end are refused.
    pub fn from_records(
        cluster_size: u64,
        size: u64,
        records: impl IntoIterator<Item = (u64, Digest)>,
    ) -> anyhow::Result<Map> {
        let mut parser = Parser::new(None);
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&cluster_size.to_le_bytes());
        header[16..24].copy_from_slice(&size.to_le_bytes());
        parser.feed(&header);
        for (c, d) in records {
            let mut rec = [0u8; RECORD];
            rec[..8].copy_from_slice(&c.to_le_bytes());
            rec[8..].copy_from_slice(&d);
            parser.feed(&rec);
        }
        parser.finish()
    }

    /// The guest length of cluster `c` (the last may be short).
    pub fn cluster_len(&self, c: u64) -> usize {
        (self.size - c * self.cluster_size).min(self.cluster_size) as usize
    }
}

/// A map's bytes parsed as they come.
struct Parser {
    /// The file's length, when known.
    len: Option<u64>,
    head: Vec<u8>,
    map: Option<Map>,
    /// A record cut by the end of the bytes fed.
    carry: Vec<u8>,
    /// Bytes of records fed.
    body: u64,
    failed: Option<anyhow::Error>,
}

impl Parser {
    fn new(len: Option<u64>) -> Parser {
        Parser {
            len,
            head: Vec::with_capacity(HEADER),
            map: None,
            carry: Vec::with_capacity(RECORD),
            body: 0,
            failed: None,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.map.is_none() {
            let n = (HEADER - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.head.len() < HEADER {
                return;
            }
            match self.header() {
                Ok(map) => self.map = Some(map),
                Err(e) => {
                    self.failed = Some(e);
                    return;
                }
            }
        }
        self.body += bytes.len() as u64;
        if !self.carry.is_empty() {
            let n = (RECORD - self.carry.len()).min(bytes.len());
            self.carry.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.carry.len() < RECORD {
                return;
            }
            let rec = std::mem::take(&mut self.carry);
            self.record(&rec);
        }
        let whole = bytes.len() / RECORD * RECORD;
        for rec in bytes[..whole].chunks_exact(RECORD) {
            self.record(rec);
        }
        self.carry.extend_from_slice(&bytes[whole..]);
    }

    fn header(&self) -> anyhow::Result<Map> {
        let bytes = &self.head;
        if &bytes[..8] != MAGIC {
            bail!("no map header");
        }
        // `head` is the whole HEADER (32 bytes): each word's slice is 8.
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let (cluster_size, size) = (word(8), word(16));
        if !cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster_size) {
            bail!("cluster size {cluster_size} is not a power of two from 512 B to 2 MiB");
        }
        let records = self
            .len
            .map_or(0, |l| l.saturating_sub(HEADER as u64) / RECORD as u64);
        Ok(Map {
            cluster_size,
            size,
            clusters: Clusters::with_records(size.div_ceil(cluster_size), records),
        })
    }

    /// One record: `rec` is always [`RECORD`] bytes (whole chunks, or a
    /// carry filled to that length), so its slices convert.
    fn record(&mut self, rec: &[u8]) {
        let Some(map) = &mut self.map else {
            return;
        };
        if self.failed.is_some() {
            return;
        }
        let cluster = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
        let disk = map.clusters.disk;
        if cluster >= disk {
            self.failed = Some(anyhow::anyhow!(
                "cluster {cluster} is past the disk's end ({disk} clusters)"
            ));
            return;
        }
        map.clusters
            .push(cluster, rec[8..].try_into().expect("16 bytes"));
    }

    fn finish(self) -> anyhow::Result<Map> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let Some(mut map) = self.map else {
            bail!("no map header");
        };
        if !self.carry.is_empty() {
            bail!("the records end inside a record ({} bytes)", self.body);
        }
        map.clusters.settle();
        Ok(map)
    }
}

/// What a volume held at a backup point, cluster by cluster: the maps of
/// its chain laid over each other, full first. A cluster no map records
/// reads as zeros (the full has no backing file).
#[derive(Debug, Clone)]
pub struct Baseline {
    map: Map,
    zeros: Zeros,
}

impl Baseline {
    /// The maps of a chain's files, full first. All must be of one
    /// geometry.
    pub fn overlay(maps: impl IntoIterator<Item = Map>) -> anyhow::Result<Baseline> {
        let mut maps = maps.into_iter();
        let Some(mut base) = maps.next() else {
            bail!("no map to build on");
        };
        for m in maps {
            if (m.cluster_size, m.size) != (base.cluster_size, base.size) {
                bail!(
                    "the chain's maps disagree on the geometry ({} B clusters of {} B, then {} B of {} B)",
                    base.cluster_size,
                    base.size,
                    m.cluster_size,
                    m.size
                );
            }
            base.clusters.overlay(m.clusters);
        }
        // Only data is kept: a cluster not recorded reads as zeros, so a
        // sparse disk's baseline is the size of its data.
        let zeros = Zeros::new(base.cluster_size);
        let (cs, size) = (base.cluster_size, base.size);
        base.clusters
            .retain(|c, d| *d != zeros.of((size - c * cs).min(cs) as usize));
        Ok(Baseline { map: base, zeros })
    }

    pub fn cluster_size(&self) -> u64 {
        self.map.cluster_size
    }

    pub fn size(&self) -> u64 {
        self.map.size
    }

    /// The digest of cluster `c` all zeros.
    fn zeros_of(&self, c: u64) -> Digest {
        self.zeros.of(self.map.cluster_len(c))
    }

    /// The digest of what cluster `c` held.
    pub fn get(&self, c: u64) -> Digest {
        match self.map.clusters.get(c) {
            Some(d) => *d,
            None => self.zeros_of(c),
        }
    }

    /// Whether cluster `c` held zeros.
    pub fn is_zero(&self, c: u64) -> bool {
        self.get(c) == self.zeros_of(c)
    }

    /// The clusters that held data, in order.
    pub fn data_clusters(&self) -> impl Iterator<Item = u64> + '_ {
        self.map.clusters.keys()
    }

    /// Clusters recorded (the data a full of this point would hold, at
    /// most).
    pub fn len(&self) -> usize {
        self.map.clusters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.clusters.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_records_win_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.map");
        let mut w = Writer::create(&path, 512, 512 * 3 + 512).unwrap();
        w.record(0, &[1u8; 512]).unwrap();
        w.record_zeros(3, 512).unwrap();
        w.record(0, &[2u8; 512]).unwrap();
        let done = w.finish().unwrap();
        assert_eq!(done.records, 3);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(done.digest, FileDigest::Whole(blake3::hash(&bytes)));
        let map = Map::read(&path).unwrap();
        assert_eq!(map.clusters.len(), 2);
        assert_eq!(map.clusters.get(0), Some(&digest(&[2u8; 512])));
        assert_eq!(map.clusters.get(3), Some(&digest(&[0u8; 512])));

        let mut past = bytes.clone();
        past[HEADER..HEADER + 8].copy_from_slice(&4u64.to_le_bytes());
        assert!(Map::parse(&past).is_err());
        assert!(Map::parse(&bytes[..bytes.len() - 1]).is_err());
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(Map::parse(&magic).is_err());
    }

    /// A reader that hands out a few bytes at a time.
    struct Dribble<'a>(&'a [u8], usize);

    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.1 = self.1 % 7 + 1;
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// Records of a disk of `disk` clusters of 512 B, some written twice,
    /// in a scrambled order; and the model of what they leave.
    fn records(
        disk: u64,
        count: u64,
        salt: u8,
    ) -> (Vec<(u64, Digest)>, std::collections::BTreeMap<u64, Digest>) {
        let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ u64::from(salt);
        let mut recs = Vec::new();
        let mut model = std::collections::BTreeMap::new();
        for i in 0..count {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let c = x % disk;
            let d = match i % 5 {
                0 => digest(&[0u8; 512]),
                _ => digest(&[(i % 251) as u8, salt, 1]),
            };
            recs.push((c, d));
            model.insert(c, d);
        }
        (recs, model)
    }

    #[test]
    fn sparse_and_dense_maps_hold_the_same_records_whatever_the_reads() {
        let disk = 3000u64;
        // Few records (held sparse), then nearly the whole disk (dense).
        for count in [40u64, 500, 6000] {
            let (recs, model) = records(disk, count, 1);
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("v.map");
            let mut w = Writer::create(&path, 512, disk * 512 - 100).unwrap();
            for (c, d) in &recs {
                w.record_digest(*c, *d).unwrap();
            }
            let done = w.finish().unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let (map, d) = Map::read_from(Dribble(&bytes, 0), None).unwrap();
            assert_eq!(d, done.digest);
            let dribbled = map.unwrap();
            for map in [Map::read(&path).unwrap(), dribbled] {
                assert_eq!(map.clusters.len(), model.len(), "{count}");
                let held: Vec<(u64, Digest)> = map.clusters.iter().map(|(c, d)| (c, *d)).collect();
                let want: Vec<(u64, Digest)> = model.iter().map(|(c, d)| (*c, *d)).collect();
                assert_eq!(held, want, "{count}");
                for c in 0..disk + 2 {
                    assert_eq!(map.clusters.get(c), model.get(&c), "{count}: cluster {c}");
                }
            }
            let dense = matches!(Map::read(&path).unwrap().clusters.repr, Repr::Dense { .. });
            assert_eq!(dense, count == 6000, "{count}");
        }
    }

    #[test]
    fn a_chain_laid_over_keeps_the_newest_data_of_each_cluster() {
        let disk = 3000u64;
        let size = disk * 512 - 100;
        let zero_of = |c: u64| digest(&vec![0u8; (size - c * 512).min(512) as usize]);
        for (full, incr) in [(40u64, 30u64), (6000, 30), (40, 6000), (6000, 6000)] {
            let (a, mut model) = records(disk, full, 2);
            let (b, newer) = records(disk, incr, 3);
            model.extend(newer);
            model.retain(|c, d| *d != zero_of(*c));
            let maps = [
                Map::from_records(512, size, a).unwrap(),
                Map::from_records(512, size, b).unwrap(),
            ];
            let base = Baseline::overlay(maps).unwrap();
            assert_eq!(base.len(), model.len());
            assert_eq!(
                base.data_clusters().collect::<Vec<_>>(),
                model.keys().copied().collect::<Vec<_>>()
            );
            for c in 0..disk {
                let want = model.get(&c).copied().unwrap_or_else(|| zero_of(c));
                assert_eq!(base.get(c), want, "{full}/{incr}: cluster {c}");
            }
        }
        assert!(Map::from_records(512, size, [(disk, [0u8; 16])]).is_err());
    }
}
