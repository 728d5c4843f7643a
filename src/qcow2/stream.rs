//! A streaming qcow2 v3 writer: guest clusters arrive in any order (as a
//! backup job sends them) and are appended to the file as they come; the
//! L2 tables, the L1 table and the refcounts are written once, at
//! [`Stream::finish`], after the data, and the header cluster last.
//!
//! ```text
//!  0          cs                         next
//!  [header]   [data clusters, arrival order] [L2 tables][L1][refcount table][refcount blocks]
//! ```
//!
//! A cluster written again is overwritten where it lies, or, when a
//! [`Tap`] follows the file (an upload fed as it is written), written
//! whole to a new host cluster at the end, the old one left free: such a
//! file only grows. Zeros are a
//! zero cluster where a backing file could show through, and nothing (a
//! hole) where none can. A write that covers only part of a cluster not
//! yet written needs the rest of that cluster: zeros without a backing
//! file, the backing file's bytes with one, which this writer does not
//! read, so it refuses such a write (a backup job writes whole clusters
//! of its cluster size, which the backup files share; the disk's last,
//! short cluster counts as whole). Memory: the L2 tables of the ranges
//! written (what the file will hold), nothing per byte of data; a table
//! whose entries are all alike (a range only zeroed) holds one entry.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::compress::{self, Compression, Compressor};
use super::create::{
    CreateOptions, check, create_new, header_cluster, refcount_clusters, refcounts_with,
};
use super::error::{Error, Result};
use crate::cluster_map;
use crate::digest::Digest;

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
/// L2 entry bit 0 (v3): the cluster reads as zeros.
const ZERO: u64 = 1;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// A qcow2 image being written; see the module's notes.
pub struct Stream {
    file: File,
    path: PathBuf,
    size: u64,
    cs: u64,
    backing: Option<String>,
    backing_format: Option<String>,
    l1_entries: u64,
    /// L1 index -> that L2 table's entries, as they will be stored.
    l2: BTreeMap<u64, Table>,
    /// Where the next host cluster goes.
    next: u64,
    /// Guest clusters given data (zero clusters not counted).
    data_clusters: u64,
    /// The whole file's digest, computed as it is written; `None` when a
    /// cluster map is kept, which proves the data, and the file's layout
    /// is digested at the end instead ([`super::layout`]).
    digest: Option<crate::digest::InFlight>,
    /// zstd clusters, when the image is compressed.
    compressor: Option<Compressor>,
    /// Where the next compressed cluster's bytes go: inside the last host
    /// cluster allocated (`< next`), or nowhere yet (`>= next`).
    cursor: u64,
    /// Compressed bytes not yet written, ending at `cursor`.
    pending: Vec<u8>,
    /// The per-cluster digest map, when one is kept.
    map: Option<cluster_map::Writer>,
    /// An O_DIRECT handle on the file, for aligned writes, where the
    /// filesystem takes it.
    direct: Option<File>,
    /// What the backing chain holds, cluster by cluster: a whole cluster
    /// written with the same content (or zeros where it held zeros) is
    /// not stored (an incremental by content).
    baseline: Option<std::sync::Arc<cluster_map::Baseline>>,
    /// Bytes of data received (writes, not zero writes).
    received: u64,
    /// Shown every write as it is made (an upload that follows the file).
    /// With one, the file only grows: a cluster written again goes to a
    /// new host cluster ([`Stream::moved`]).
    tap: Option<Box<dyn Tap>>,
    /// Host clusters left free by [`Stream::moved`].
    freed: u64,
}

/// What follows a [`Stream`]'s file as it is written: every write, at
/// its offset, once it is made (the header cluster's last). It must not
/// wait: the writer is on a backup's path.
pub trait Tap: Send {
    fn written(&mut self, at: u64, bytes: &[u8]);
}

/// A finished image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// The file's length in bytes.
    pub len: u64,
    /// As the manifests record it: `blake3:<hex>` of the whole file, or
    /// with a cluster map `blake3-layout:<hex>` of all but its data
    /// ([`super::layout`]), the map proving the data.
    pub digest: Digest,
    /// Guest bytes the image holds as data (zero clusters not counted).
    pub data_bytes: u64,
    /// Bytes of the file read back to complete the digest: for a whole
    /// file's, the header cluster written last and any piece written over
    /// in place; for a layout digest, the bytes outside the data.
    pub read_back: u64,
    /// The per-cluster digest map, when one was kept.
    pub map: Option<cluster_map::Written>,
    /// Bytes of data the writer was sent (zero writes not counted).
    pub received: u64,
}

/// What a guest range of one cluster is, within the image.
struct Piece {
    cluster: u64,
    /// Offset and length within the cluster.
    at: usize,
    len: usize,
    /// The range covers the whole cluster (the disk's end counts as its
    /// end).
    whole: bool,
}

/// One L2 table's entries, as they will be stored: all alike (a range
/// only zeroed: a terabyte of zero clusters is 128 MiB of such tables in
/// the file, and a few KiB here), or each its own.
enum Table {
    Same(u64),
    Each(Vec<u64>),
}

impl Table {
    fn get(&self, k: usize) -> u64 {
        match self {
            Table::Same(e) => *e,
            Table::Each(v) => v[k],
        }
    }

    /// Sets entry `k` of `per`.
    fn set(&mut self, k: usize, entry: u64, per: usize) {
        match self {
            Table::Same(e) if *e == entry => {}
            Table::Same(e) => {
                let mut v = vec![*e; per];
                v[k] = entry;
                *self = Table::Each(v);
            }
            Table::Each(v) => v[k] = entry,
        }
    }

    /// Holds one entry when all are alike.
    fn compact(&mut self) {
        if let Table::Each(v) = self
            && v.iter().all(|&e| e == v[0])
        {
            *self = Table::Same(v[0]);
        }
    }

    /// The `per` entries, in order.
    fn entries(&self, per: usize) -> impl Iterator<Item = u64> + '_ {
        (0..per).map(|k| self.get(k))
    }
}

/// What an L2 entry says of its cluster.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Nothing: the backing file shows through (zeros without one).
    Empty,
    /// Zeros, no host cluster.
    Zero,
    /// A host cluster (its bytes, or zeros when `zero`).
    Data { host: u64, zero: bool },
    /// A compressed cluster.
    Compressed,
}

/// Shows bytes written at `at` to a file's digest and tap, where it has
/// them.
fn show(
    digest: &mut Option<crate::digest::InFlight>,
    tap: &mut Option<Box<dyn Tap>>,
    at: u64,
    bytes: &[u8],
) {
    if let Some(d) = digest {
        d.written(at, bytes);
    }
    if let Some(t) = tap {
        t.written(at, bytes);
    }
}

fn all_zero(bytes: &[u8]) -> bool {
    // `chunks_exact(16)` gives only 16-byte words: each converts.
    let mut words = bytes.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

impl Stream {
    /// Creates `path` (which must not exist) for an image of `opts`.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Stream> {
        let l1_entries = check(opts)?;
        let file = create_new(path)?;
        let direct = crate::direct::reopen(&file);
        Ok(Stream {
            direct,
            file,
            path: path.into(),
            size: opts.size,
            cs: opts.cluster_size,
            backing: opts.backing.map(str::to_string),
            backing_format: opts.backing_format.map(str::to_string),
            l1_entries,
            l2: BTreeMap::new(),
            next: opts.cluster_size,
            data_clusters: 0,
            // The header cluster is written last.
            digest: Some(crate::digest::InFlight::with_head(opts.cluster_size)),
            compressor: None,
            baseline: None,
            received: 0,
            cursor: u64::MAX,
            pending: Vec::new(),
            map: None,
            tap: None,
            freed: 0,
        })
    }

    /// Shows every write from now on to `tap`, and keeps the file
    /// growing only (a cluster written again moves). Call before the
    /// first write.
    pub fn tap(&mut self, tap: Box<dyn Tap>) {
        self.tap = Some(tap);
    }

    /// Stores clusters compressed with zstd at `level` (those that shrink;
    /// the others as they are). Call before the first write.
    pub fn compress(&mut self, level: i32) -> Result<()> {
        let c = Compressor::new(level).map_err(|source| Error::Writing {
            what: "a zstd compressor",
            source,
        })?;
        self.compressor = Some(c);
        Ok(())
    }

    /// Keeps a per-cluster digest map at `path` (which must not exist).
    /// Call before the first write.
    pub fn keep_map(&mut self, path: &Path) -> Result<()> {
        let w = cluster_map::Writer::create(path, self.cs, self.size).map_err(|source| {
            Error::Opening {
                path: path.into(),
                source,
            }
        })?;
        self.map = Some(w);
        self.digest = None;
        Ok(())
    }

    /// Stores only what differs from `baseline` (what the backing chain
    /// holds): a whole cluster this image has not stored, written with
    /// the baseline's content, or zeroed where the baseline holds zeros,
    /// stays unallocated. Call before the first write.
    pub fn only_changes(&mut self, baseline: std::sync::Arc<cluster_map::Baseline>) -> Result<()> {
        if self.backing.is_none()
            || baseline.cluster_size() != self.cs
            || baseline.size() != self.size
        {
            return Err(Error::BadSize {
                size: self.size,
                reason: format!(
                    "a baseline of {} B clusters of {} B for an image of {} B clusters{}",
                    baseline.cluster_size(),
                    baseline.size(),
                    self.cs,
                    if self.backing.is_none() {
                        " without a backing file"
                    } else {
                        ""
                    }
                ),
            });
        }
        self.baseline = Some(baseline);
        Ok(())
    }

    /// Whether `cluster`, not stored here, holds `digest` in the baseline.
    fn unchanged(&self, cluster: u64, slot: Slot, digest: Option<cluster_map::Digest>) -> bool {
        match (&self.baseline, slot, digest) {
            (Some(b), Slot::Empty, Some(d)) => b.get(cluster) == d,
            (Some(b), Slot::Empty, None) => b.is_zero(cluster),
            _ => false,
        }
    }

    /// The image's virtual size.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn cluster_size(&self) -> u64 {
        self.cs
    }

    /// Guest bytes the image holds as data so far.
    pub fn data_bytes(&self) -> u64 {
        self.data_clusters * self.cs
    }

    fn pieces(&self, offset: u64, len: u64) -> Result<Vec<Piece>> {
        pieces(self.cs, self.size, offset, len)
    }

    /// A function that gives, for a write's offset and bytes, the digest
    /// of each whole cluster it covers, in [`Stream::write_prepared`]'s
    /// order, where this image keeps a map or compares with a baseline:
    /// work that needs nothing of the image's state, so that a thread of
    /// its own can do it ahead of the writes.
    pub fn digester(
        &self,
    ) -> Option<impl Fn(u64, &[u8]) -> Vec<cluster_map::Digest> + Send + Sync + 'static> {
        if self.map.is_none() && self.baseline.is_none() {
            return None;
        }
        let (cs, size) = (self.cs, self.size);
        Some(move |offset: u64, data: &[u8]| {
            let Ok(pieces) = pieces(cs, size, offset, data.len() as u64) else {
                return Vec::new();
            };
            let mut at = 0usize;
            pieces
                .iter()
                .map(|p| {
                    let part = &data[at..at + p.len];
                    at += p.len;
                    match p.whole && !all_zero(part) {
                        true => cluster_map::digest(part),
                        false => [0u8; 16],
                    }
                })
                .collect()
        })
    }
}

/// `offset..offset + len` of a disk of `size` bytes cut at its clusters of
/// `cs` bytes.
fn pieces(cs: u64, size: u64, offset: u64, len: u64) -> Result<Vec<Piece>> {
    let end = offset
        .checked_add(len)
        .filter(|&end| end <= size)
        .ok_or(Error::OutOfRange { offset, len, size })?;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let cluster = pos / cs;
        let start = cluster * cs;
        let stop = (start + cs).min(end);
        out.push(Piece {
            cluster,
            at: (pos - start) as usize,
            len: (stop - pos) as usize,
            whole: pos == start && stop == (start + cs).min(size),
        });
        pos = stop;
    }
    Ok(out)
}

impl Stream {
    /// The guest length of `cluster` (the disk's last may be short).
    fn cluster_len(&self, cluster: u64) -> usize {
        (self.size - cluster * self.cs).min(self.cs) as usize
    }

    fn entry(&self, cluster: u64) -> u64 {
        let per = self.cs / 8;
        self.l2
            .get(&(cluster / per))
            .map_or(0, |t| t.get((cluster % per) as usize))
    }

    fn slot(&self, cluster: u64) -> Slot {
        let e = self.entry(cluster);
        if e & COMPRESSED != 0 {
            return Slot::Compressed;
        }
        match (e & OFFSET_MASK, e & ZERO != 0) {
            (0, false) => Slot::Empty,
            (0, true) => Slot::Zero,
            (host, zero) => Slot::Data { host, zero },
        }
    }

    fn set(&mut self, cluster: u64, entry: u64) {
        let per = self.cs / 8;
        self.l2.entry(cluster / per).or_insert(Table::Same(0)).set(
            (cluster % per) as usize,
            entry,
            per as usize,
        );
    }

    /// Writes `data` at `at`: around the page cache when it is aligned
    /// for that (runs of plain clusters from an aligned buffer), through
    /// it otherwise.
    fn write_at(&mut self, data: &[u8], at: u64) -> Result<()> {
        let written = match &self.direct {
            Some(direct) if crate::direct::aligned(data, at) => {
                match direct.write_all_at(data, at) {
                    Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                        self.direct = None;
                        self.file.write_all_at(data, at)
                    }
                    other => other,
                }
            }
            _ => self.file.write_all_at(data, at),
        };
        written.map_err(|source| Error::Writing {
            what: "a data cluster",
            source,
        })?;
        self.shown(at, data);
        Ok(())
    }

    /// Shows bytes written at `at` to the file's digest and the tap.
    fn shown(&mut self, at: u64, bytes: &[u8]) {
        show(&mut self.digest, &mut self.tap, at, bytes);
    }

    /// A new host cluster for plain data. A compressed cluster being
    /// filled is closed first (its tail written as zeros), so the file
    /// grows without gaps.
    fn allocate(&mut self) -> Result<u64> {
        self.close_compressed()?;
        let host = self.next;
        self.next += self.cs;
        self.cursor = u64::MAX;
        Ok(host)
    }

    fn close_compressed(&mut self) -> Result<()> {
        if self.cursor < self.next {
            let pad = (self.next - self.cursor) as usize;
            self.pending.resize(self.pending.len() + pad, 0);
            self.cursor = self.next;
        }
        self.flush_pending()
    }

    fn flush_pending(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::take(&mut self.pending);
        let at = self.cursor.min(self.next) - bytes.len() as u64;
        self.write_at(&bytes, at)?;
        self.pending = bytes;
        self.pending.clear();
        Ok(())
    }

    /// Records `cluster`'s bytes in the map, when one is kept.
    fn record(&mut self, cluster: u64, bytes: &[u8]) -> Result<()> {
        match self.map {
            Some(_) => self.record_digest(cluster, cluster_map::digest(bytes)),
            None => Ok(()),
        }
    }

    /// Records that `cluster`, which was `slot`, now reads as zeros. A
    /// full's cluster that never held anything needs no record: a cluster
    /// a map does not record reads as zeros, and a sparse disk's map stays
    /// the size of its data.
    fn zeroed(&mut self, cluster: u64, slot: Slot) -> Result<()> {
        if self.backing.is_none() && matches!(slot, Slot::Empty) {
            return Ok(());
        }
        self.record_zeros(cluster)
    }

    fn record_zeros(&mut self, cluster: u64) -> Result<()> {
        let len = self.cluster_len(cluster);
        self.map_write(|map| map.record_zeros(cluster, len))
    }

    fn record_digest(&mut self, cluster: u64, d: cluster_map::Digest) -> Result<()> {
        self.map_write(|map| map.record_digest(cluster, d))
    }

    /// One write to the map, when one is kept.
    fn map_write(
        &mut self,
        write: impl FnOnce(&mut cluster_map::Writer) -> std::io::Result<()>,
    ) -> Result<()> {
        match &mut self.map {
            Some(map) => write(map).map_err(|source| Error::Writing {
                what: "the cluster map",
                source,
            }),
            None => Ok(()),
        }
    }

    /// The digest of a whole cluster's bytes, when a map or a baseline
    /// needs it.
    fn digest_for(&self, bytes: &[u8]) -> Option<cluster_map::Digest> {
        (self.map.is_some() || self.baseline.is_some()).then(|| cluster_map::digest(bytes))
    }

    /// Gives `cluster` (whose slot holds no host cluster of its own to
    /// write over) the whole-cluster `bytes`: zeros as a zero cluster or a
    /// hole, else compressed where that shrinks it, else a new cluster.
    fn store(&mut self, cluster: u64, bytes: &[u8]) -> Result<()> {
        let slot = self.slot(cluster);
        if all_zero(bytes) {
            if self.unchanged(cluster, slot, None) {
                return Ok(());
            }
            let entry = if self.backing.is_some() { ZERO } else { 0 };
            self.set(cluster, entry);
            return self.zeroed(cluster, slot);
        }
        let d = self.digest_for(bytes);
        if self.unchanged(cluster, slot, d) {
            return Ok(());
        }
        if let Some(d) = d {
            self.record_digest(cluster, d)?;
        }
        self.data_clusters += 1;
        let cs = self.cs as usize;
        let packed = match &mut self.compressor {
            // QEMU decompresses a whole cluster, the disk's last too.
            Some(c) if bytes.len() < cs => {
                let mut whole = bytes.to_vec();
                whole.resize(cs, 0);
                c.append(&whole, cs, &mut self.pending)
            }
            Some(c) => c.append(bytes, cs, &mut self.pending),
            None => None,
        };
        if let Some(len) = packed {
            let len = len as u64;
            if self.cursor >= self.next {
                // A new host cluster for compressed bytes (nothing is
                // pending: pending bytes belong to an open one).
                self.cursor = self.next;
                self.next += self.cs;
            }
            let off = self.cursor;
            if off + len > self.next {
                // Into the next host cluster, which follows: no gap.
                self.next += self.cs;
            }
            self.cursor = off + len;
            let bits = self.cs.trailing_zeros() as u64;
            let x = 62 - (bits - 8);
            let extra = ((off + len - 1) >> 9) - (off >> 9);
            self.set(cluster, COMPRESSED | (extra << x) | off);
            return Ok(());
        }
        let host = self.allocate()?;
        self.write_at(bytes, host)?;
        self.set(cluster, host | COPIED);
        Ok(())
    }

    /// Gives `cluster`, which holds a host cluster, the whole-cluster
    /// `bytes` in a new one: a tapped file only grows (what follows it
    /// may have taken the old bytes already). The old host cluster is
    /// left free.
    fn moved(&mut self, cluster: u64, bytes: &[u8]) -> Result<()> {
        let host = self.allocate()?;
        self.write_at(bytes, host)?;
        self.set(cluster, host | COPIED);
        self.freed += 1;
        self.record(cluster, bytes)
    }

    /// The whole of `cluster` as this image alone holds it.
    fn cluster_bytes(&mut self, cluster: u64) -> Result<Vec<u8>> {
        self.flush_pending()?;
        let mut buf = vec![0u8; self.cluster_len(cluster)];
        self.read(cluster * self.cs, &mut buf)?;
        Ok(buf)
    }

    /// Stores `data` at guest `offset`. New whole clusters that follow
    /// each other are appended with one write (compressed ones with one
    /// write of all their bytes).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_prepared(offset, data, &[])
    }

    /// [`Stream::write`], given what [`Stream::digester`]'s function gave
    /// for these bytes (empty: the digests are computed here).
    pub fn write_prepared(
        &mut self,
        offset: u64,
        data: &[u8],
        digests: &[cluster_map::Digest],
    ) -> Result<()> {
        let mut done = 0usize;
        // A run of new plain clusters not yet written: (host, data start).
        let mut run: Option<(u64, usize)> = None;
        let plain = self.compressor.is_none();
        self.received += data.len() as u64;
        let pieces = self.pieces(offset, data.len() as u64)?;
        let given = (digests.len() == pieces.len()).then_some(digests);
        for (k, p) in pieces.into_iter().enumerate() {
            let part = &data[done..done + p.len];
            let slot = self.slot(p.cluster);
            let fresh = p.whole && !matches!(slot, Slot::Data { .. });
            if fresh && plain && !all_zero(part) {
                let d = match given {
                    Some(given) if self.map.is_some() || self.baseline.is_some() => Some(given[k]),
                    _ => self.digest_for(part),
                };
                if self.unchanged(p.cluster, slot, d) {
                    if let Some((start, from)) = run.take() {
                        self.write_at(&data[from..done], start)?;
                    }
                    done += p.len;
                    continue;
                }
                if let Some(d) = d {
                    self.record_digest(p.cluster, d)?;
                }
                self.data_clusters += 1;
                let host = self.next;
                self.next += self.cs;
                self.set(p.cluster, host | COPIED);
                match run {
                    Some((start, from)) if start + (done - from) as u64 == host => {}
                    Some((start, from)) => {
                        self.write_at(&data[from..done], start)?;
                        run = Some((host, done));
                    }
                    None => run = Some((host, done)),
                }
                done += p.len;
                continue;
            }
            if let Some((start, from)) = run.take() {
                self.write_at(&data[from..done], start)?;
            }
            done += p.len;
            if fresh {
                self.store(p.cluster, part)?;
                continue;
            }
            match slot {
                Slot::Data { zero, .. } if self.tap.is_some() => {
                    // The same bytes again (a guard's copy of old data,
                    // then the job's of the same cluster) stay where
                    // they are.
                    if p.whole && !zero && self.cluster_bytes(p.cluster)? == part {
                        continue;
                    }
                    let buf = match (p.whole, zero) {
                        (true, _) => part.to_vec(),
                        (false, true) => self.padded(&p, part),
                        (false, false) => {
                            let mut buf = self.cluster_bytes(p.cluster)?;
                            buf[p.at..p.at + p.len].copy_from_slice(part);
                            buf
                        }
                    };
                    self.moved(p.cluster, &buf)?;
                }
                Slot::Data { host, zero } => {
                    if zero && !p.whole {
                        // Its old bytes must read as zeros.
                        let buf = self.padded(&p, part);
                        self.write_at(&buf, host)?;
                    } else {
                        self.write_at(part, host + p.at as u64)?;
                    }
                    self.set(p.cluster, host | COPIED);
                    if p.whole {
                        self.record(p.cluster, part)?;
                    } else if self.map.is_some() {
                        let buf = self.cluster_bytes(p.cluster)?;
                        self.record(p.cluster, &buf)?;
                    }
                }
                Slot::Compressed => {
                    let mut buf = self.cluster_bytes(p.cluster)?;
                    buf[p.at..p.at + p.len].copy_from_slice(part);
                    self.data_clusters -= 1;
                    self.store(p.cluster, &buf)?;
                }
                Slot::Zero => {
                    let buf = self.padded(&p, part);
                    self.store(p.cluster, &buf)?;
                }
                Slot::Empty => {
                    if self.backing.is_some() {
                        return Err(self.partial(p.cluster));
                    }
                    let buf = self.padded(&p, part);
                    self.store(p.cluster, &buf)?;
                }
            }
        }
        if let Some((start, from)) = run {
            self.write_at(&data[from..done], start)?;
        }
        self.flush_pending()
    }

    /// The cluster's guest bytes: zeros with `part` at its place.
    fn padded(&self, p: &Piece, part: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; self.cluster_len(p.cluster)];
        buf[p.at..p.at + part.len()].copy_from_slice(part);
        buf
    }

    fn partial(&self, cluster: u64) -> Error {
        Error::PartialOverBacking {
            offset: cluster * self.cs,
            cluster_size: self.cs,
        }
    }

    /// Makes guest `offset..offset + len` read as zeros.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        let pieces = self.pieces(offset, len)?;
        let per = self.cs / 8;
        let tables = (pieces.first())
            .zip(pieces.last())
            .map(|(first, last)| first.cluster / per..=last.cluster / per);
        for p in pieces {
            let slot = self.slot(p.cluster);
            if p.whole {
                if self.unchanged(p.cluster, slot, None) {
                    continue;
                }
                match slot {
                    Slot::Data { host, .. } => self.set(p.cluster, host | COPIED | ZERO),
                    Slot::Compressed => {
                        self.data_clusters -= 1;
                        let entry = if self.backing.is_some() { ZERO } else { 0 };
                        self.set(p.cluster, entry);
                    }
                    Slot::Empty | Slot::Zero => {
                        let entry = if self.backing.is_some() { ZERO } else { 0 };
                        self.set(p.cluster, entry);
                    }
                }
                self.zeroed(p.cluster, slot)?;
                continue;
            }
            match slot {
                Slot::Data { zero: false, .. } if self.tap.is_some() => {
                    let mut buf = self.cluster_bytes(p.cluster)?;
                    buf[p.at..p.at + p.len].fill(0);
                    self.moved(p.cluster, &buf)?;
                }
                Slot::Data { host, zero: false } => {
                    self.write_at(&vec![0u8; p.len], host + p.at as u64)?;
                    if self.map.is_some() {
                        let buf = self.cluster_bytes(p.cluster)?;
                        self.record(p.cluster, &buf)?;
                    }
                }
                Slot::Data { zero: true, .. } | Slot::Zero => {}
                Slot::Compressed => {
                    let mut buf = self.cluster_bytes(p.cluster)?;
                    buf[p.at..p.at + p.len].fill(0);
                    self.data_clusters -= 1;
                    self.store(p.cluster, &buf)?;
                }
                Slot::Empty => {
                    if self.backing.is_some() {
                        return Err(self.partial(p.cluster));
                    }
                }
            }
        }
        // Tables this left all alike hold one entry again.
        for (_, t) in tables.map_or_else(Default::default, |r| self.l2.range_mut(r)) {
            t.compact();
        }
        self.flush_pending()
    }

    /// Reads guest `offset..offset + buf.len()` of this image alone: what
    /// it does not hold reads as zeros (the backing file is not read).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        for p in self.pieces(offset, buf.len() as u64)? {
            let out = &mut buf[done..done + p.len];
            done += p.len;
            let entry = self.entry(p.cluster);
            if entry & COMPRESSED != 0 {
                let mut whole = vec![0u8; self.cs as usize];
                self.read_compressed(entry, &mut whole)?;
                out.copy_from_slice(&whole[p.at..p.at + p.len]);
                continue;
            }
            // A cluster left to the backing file (an incremental by
            // content found it unchanged) holds data this writer never
            // kept: reading it here as zeros would be wrong.
            if entry == 0
                && let Some(b) = &self.baseline
                && !b.is_zero(p.cluster)
            {
                return Err(Error::Reading {
                    what: "a cluster left to the backing file",
                    offset: p.cluster * self.cs,
                    len: p.len as u64,
                    source: std::io::Error::other(
                        "an incremental by content does not keep unchanged clusters",
                    ),
                });
            }
            let host = entry & OFFSET_MASK;
            if host == 0 || entry & ZERO != 0 {
                out.fill(0);
                continue;
            }
            self.file
                .read_exact_at(out, host + p.at as u64)
                .map_err(|source| Error::Reading {
                    what: "a data cluster",
                    offset: host + p.at as u64,
                    len: p.len as u64,
                    source,
                })?;
        }
        Ok(())
    }

    fn read_compressed(&self, entry: u64, out: &mut [u8]) -> Result<()> {
        let bits = self.cs.trailing_zeros() as u64;
        let x = 62 - (bits - 8);
        let off = entry & ((1 << x) - 1);
        let sectors = ((entry & !COMPRESSED) >> x) + 1;
        // Bytes past what was written are not there yet (the pending
        // ones are written before any read).
        let end = ((off & !511) + sectors * 512).min(self.cursor.min(self.next));
        let mut packed = vec![0u8; (end - off) as usize];
        self.file
            .read_exact_at(&mut packed, off)
            .map_err(|source| Error::Reading {
                what: "a compressed cluster",
                offset: off,
                len: end - off,
                source,
            })?;
        compress::decompress(Compression::Zstd, &packed, out).map_err(|source| Error::Reading {
            what: "a compressed cluster",
            offset: off,
            len: end - off,
            source,
        })
    }

    /// Writes the tables and the header after the data and syncs the
    /// file: the image is complete. Returns its length, digest and data.
    pub fn finish(mut self) -> Result<Finished> {
        self.close_compressed()?;
        // A table of nothing (zeros written where no backing file shows
        // through: a full's holes) reads as no table at all.
        self.l2.retain(|_, t| !matches!(t, Table::Same(0)));
        let cs = self.cs;
        let l1_clusters = (self.l1_entries * 8).div_ceil(cs);
        let l2_count = self.l2.len() as u64;
        let head = self.next / cs;
        let (rt, rb) = refcount_clusters(cs, head + l2_count + l1_clusters);
        let l2_offset = self.next;
        let l1_offset = l2_offset + l2_count * cs;
        let rt_offset = l1_offset + l1_clusters * cs;
        let rb_offset = rt_offset + rt * cs;
        let total = head + l2_count + l1_clusters + rt + rb;

        let opts = CreateOptions {
            size: self.size,
            cluster_size: cs,
            backing: self.backing.as_deref(),
            backing_format: self.backing_format.as_deref(),
        };
        let compression = self.compressor.as_ref().map(|_| Compression::Zstd);
        let header = header_cluster(
            &opts,
            compression,
            self.l1_entries,
            l1_offset,
            rt_offset,
            rt,
            &[],
        )?;
        let data_refs = self.data_refcounts(head)?;
        let (table, blocks) = refcounts_with(cs, rt, rb, rb_offset, total, &|c| {
            data_refs
                .as_ref()
                .and_then(|r| r.get(c as usize).copied())
                .unwrap_or(1)
        });
        let mut l1 = vec![0u8; (l1_clusters * cs) as usize];
        let written = self
            .write_l2_tables(l2_offset, &mut l1)
            .and_then(|data_bytes| {
                for (bytes, at) in [
                    (&l1, l1_offset),
                    (&table, rt_offset),
                    (&blocks, rb_offset),
                    (&header, 0),
                ] {
                    self.file.write_all_at(bytes, at)?;
                    self.shown(at, bytes);
                }
                self.file.set_len(total * cs)?;
                self.file.sync_all()?;
                Ok(data_bytes)
            });
        let data_bytes = written.map_err(|source| Error::Writing {
            what: "the image's tables",
            source,
        })?;
        let len = total * cs;
        let (digest, read_back) = match self.digest.take() {
            Some(flight) => flight.finish(&self.file, len),
            None => self.layout_digest(),
        }
        .map_err(|source| Error::Reading {
            what: "the image, for its digest",
            offset: 0,
            len,
            source,
        })?;
        let map = match self.map.take() {
            Some(m) => Some(m.finish().map_err(|source| Error::Writing {
                what: "the cluster map",
                source,
            })?),
            None => None,
        };
        Ok(Finished {
            len,
            digest,
            data_bytes,
            read_back,
            map,
            received: self.received,
        })
    }

    /// Writes the L2 tables from `l2_offset` on, one at a time (memory for
    /// one table's bytes, not all), each entered in `l1`; returns the
    /// guest bytes the image holds as data.
    fn write_l2_tables(&mut self, l2_offset: u64, l1: &mut [u8]) -> std::io::Result<u64> {
        let cs = self.cs;
        let per = (cs / 8) as usize;
        let mut data_bytes = 0u64;
        let mut raw = Vec::with_capacity(cs as usize);
        for (j, (index, entries)) in self.l2.iter().enumerate() {
            let at = l2_offset + j as u64 * cs;
            raw.clear();
            for (k, e) in entries.entries(per).enumerate() {
                raw.extend_from_slice(&e.to_be_bytes());
                if e & COMPRESSED != 0 || (e & OFFSET_MASK != 0 && e & ZERO == 0) {
                    let guest = (index * per as u64 + k as u64) * cs;
                    data_bytes += cs.min(self.size - guest);
                }
            }
            self.file.write_all_at(&raw, at)?;
            show(&mut self.digest, &mut self.tap, at, &raw);
            let slot = (*index * 8) as usize;
            l1[slot..slot + 8].copy_from_slice(&(at | COPIED).to_be_bytes());
        }
        Ok(data_bytes)
    }

    /// The refcounts of host clusters `0..head` (header and data) of a
    /// compressed image, or of one with clusters left free: a host
    /// cluster counts once per entry whose bytes touch it (a compressed
    /// cluster's sectors), as `qemu-img check` counts them (a cluster left
    /// with only replaced bytes counts 0, free). `None` for a plain image
    /// with none left free, whose every such cluster counts 1.
    fn data_refcounts(&self, head: u64) -> Result<Option<Vec<u16>>> {
        if self.compressor.is_none() && self.freed == 0 {
            return Ok(None);
        }
        let cs = self.cs;
        let x = 62 - (cs.trailing_zeros() as u64 - 8);
        let mut refs = vec![0u16; head as usize];
        refs[0] = 1;
        let mut add = |c: u64| -> Result<()> {
            let r = &mut refs[c as usize];
            *r = r.checked_add(1).ok_or(Error::Writing {
                what: "a refcount",
                source: std::io::Error::other("more than 65535 compressed clusters in one cluster"),
            })?;
            Ok(())
        };
        let per = (cs / 8) as usize;
        for e in self.l2.values().flat_map(|t| t.entries(per)) {
            if e & COMPRESSED != 0 {
                let off = e & ((1 << x) - 1);
                let sectors = ((e & !COMPRESSED) >> x) + 1;
                let first = (off & !511) / cs;
                let last = ((off & !511) + sectors * 512 - 1) / cs;
                for c in first..=last {
                    add(c)?;
                }
            } else if e & OFFSET_MASK != 0 {
                add((e & OFFSET_MASK) / cs)?;
            }
        }
        Ok(Some(refs))
    }

    /// The finished file's layout digest, read back from it (through the
    /// handle it was written with, not its name).
    fn layout_digest(&self) -> std::io::Result<(Digest, u64)> {
        let image =
            super::image::Image::parse(&self.file, &self.path).map_err(std::io::Error::other)?;
        super::layout::layout_digest(&self.file, &image).map_err(std::io::Error::other)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
