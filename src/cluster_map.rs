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

use std::collections::HashMap;
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

/// Digests by cluster number.
pub type Clusters = HashMap<u64, Digest, std::hash::BuildHasherDefault<ClusterHasher>>;

/// A hasher for cluster numbers: a backup's content check looks up every
/// cluster of the disk (a million of 64 KiB in 64 GiB), where SipHash
/// cost a third of a second. Its defence against chosen keys is not
/// needed: a map is used only once its digest matched its manifest's.
#[derive(Default)]
pub struct ClusterHasher(u64);

impl std::hash::Hasher for ClusterHasher {
    fn finish(&self) -> u64 {
        // A folded 128-bit product: every input bit reaches the high bits
        // (the table's tags) and the low ones (its buckets).
        let wide = u128::from(self.0) * 0x9e37_79b9_7f4a_7c15;
        (wide as u64) ^ ((wide >> 64) as u64)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl Map {
    /// Reads and checks a map file (hostile: every record is checked
    /// against the header's geometry).
    pub fn read(path: &Path) -> anyhow::Result<Map> {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .with_context(|| format!("reading {}", path.display()))?;
        Map::parse(&bytes).with_context(|| format!("{} is not a cluster map", path.display()))
    }

    pub fn parse(bytes: &[u8]) -> anyhow::Result<Map> {
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            bail!("no map header");
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let (cluster_size, size) = (word(8), word(16));
        if !cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster_size) {
            bail!("cluster size {cluster_size} is not a power of two from 512 B to 2 MiB");
        }
        let body = &bytes[HEADER..];
        if body.len() % RECORD != 0 {
            bail!("the records end inside a record ({} bytes)", body.len());
        }
        let clusters_in_disk = size.div_ceil(cluster_size);
        let mut clusters =
            Clusters::with_capacity_and_hasher(body.len() / RECORD, Default::default());
        for rec in body.chunks_exact(RECORD) {
            let cluster = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
            if cluster >= clusters_in_disk {
                bail!("cluster {cluster} is past the disk's end ({clusters_in_disk} clusters)");
            }
            clusters.insert(cluster, rec[8..].try_into().expect("16 bytes"));
        }
        Ok(Map {
            cluster_size,
            size,
            clusters,
        })
    }

    /// The guest length of cluster `c` (the last may be short).
    pub fn cluster_len(&self, c: u64) -> usize {
        (self.size - c * self.cluster_size).min(self.cluster_size) as usize
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
        let zeros = Zeros::new(base.cluster_size);
        let zeros_of = |map: &Map, c: u64| zeros.of(map.cluster_len(c));
        // Only data is kept: a cluster not recorded reads as zeros, so a
        // sparse disk's baseline is the size of its data.
        let mut data = Clusters::with_capacity_and_hasher(base.clusters.len(), Default::default());
        for (c, d) in std::mem::take(&mut base.clusters) {
            if d != zeros_of(&base, c) {
                data.insert(c, d);
            }
        }
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
            for (c, d) in m.clusters {
                if d == zeros_of(&base, c) {
                    data.remove(&c);
                } else {
                    data.insert(c, d);
                }
            }
        }
        base.clusters = data;
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
        match self.map.clusters.get(&c) {
            Some(d) => *d,
            None => self.zeros_of(c),
        }
    }

    /// Whether cluster `c` held zeros.
    pub fn is_zero(&self, c: u64) -> bool {
        self.get(c) == self.zeros_of(c)
    }

    /// The clusters that held data (any order).
    pub fn data_clusters(&self) -> impl Iterator<Item = u64> + '_ {
        self.map.clusters.keys().copied()
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
        assert_eq!(map.clusters[&0], digest(&[2u8; 512]));
        assert_eq!(map.clusters[&3], digest(&[0u8; 512]));

        let mut past = bytes.clone();
        past[HEADER..HEADER + 8].copy_from_slice(&4u64.to_le_bytes());
        assert!(Map::parse(&past).is_err());
        assert!(Map::parse(&bytes[..bytes.len() - 1]).is_err());
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(Map::parse(&magic).is_err());
    }
}
