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
//! A cluster written again is overwritten where it lies. Zeros are a
//! zero cluster where a backing file could show through, and nothing (a
//! hole) where none can. A write that covers only part of a cluster not
//! yet written needs the rest of that cluster: zeros without a backing
//! file, the backing file's bytes with one, which this writer does not
//! read, so it refuses such a write (a backup job writes whole clusters
//! of its cluster size, which the backup files share; the disk's last,
//! short cluster counts as whole). Memory: the L2 tables of the ranges
//! written (what the file will hold), nothing per byte of data.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::create::{
    CreateOptions, check, create_new, header_cluster, refcount_clusters, refcounts,
};
use super::error::{Error, Result};

const COPIED: u64 = 1 << 63;
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
    l2: BTreeMap<u64, Vec<u64>>,
    /// Where the next data cluster goes.
    next: u64,
    /// Guest bytes of data clusters (zero clusters not counted).
    data_clusters: u64,
    /// The file's digest, computed as it is written.
    digest: crate::digest::InFlight,
}

/// A finished image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// The file's length in bytes.
    pub len: u64,
    /// `blake3:<hex>` of the whole file, as the manifests record it.
    pub digest: String,
    /// Guest bytes the image holds as data (zero clusters not counted).
    pub data_bytes: u64,
    /// Bytes of the file read back to complete the digest (the first 64
    /// MiB, which hold the header written last, and any piece written
    /// over in place).
    pub read_back: u64,
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

impl Stream {
    /// Creates `path` (which must not exist) for an image of `opts`.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Stream> {
        let l1_entries = check(opts)?;
        let file = create_new(path)?;
        Ok(Stream {
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
            digest: Default::default(),
        })
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
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.size)
            .ok_or(Error::OutOfRange {
                offset,
                len,
                size: self.size,
            })?;
        let cs = self.cs;
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
                whole: pos == start && stop == (start + cs).min(self.size),
            });
            pos = stop;
        }
        Ok(out)
    }

    fn entry(&self, cluster: u64) -> u64 {
        let per = self.cs / 8;
        self.l2
            .get(&(cluster / per))
            .map_or(0, |t| t[(cluster % per) as usize])
    }

    fn set(&mut self, cluster: u64, entry: u64) {
        let per = self.cs / 8;
        self.l2
            .entry(cluster / per)
            .or_insert_with(|| vec![0; per as usize])[(cluster % per) as usize] = entry;
    }

    fn write_at(&mut self, data: &[u8], at: u64) -> Result<()> {
        self.file
            .write_all_at(data, at)
            .map_err(|source| Error::Writing {
                what: "a data cluster",
                source,
            })?;
        self.digest.written(at, data);
        Ok(())
    }

    fn allocate(&mut self) -> u64 {
        let host = self.next;
        self.next += self.cs;
        self.data_clusters += 1;
        host
    }

    /// Stores `data` at guest `offset`. New whole clusters that follow
    /// each other are appended with one write.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let mut done = 0usize;
        // A run of new whole clusters not yet written: (host, data start).
        let mut run: Option<(u64, usize)> = None;
        for p in self.pieces(offset, data.len() as u64)? {
            let part = &data[done..done + p.len];
            let entry = self.entry(p.cluster);
            let host = entry & OFFSET_MASK;
            if host == 0 && p.whole {
                let host = self.allocate();
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
            match (host != 0, entry & ZERO != 0, p.whole) {
                // Data where it lies: overwritten in place.
                (true, false, _) | (true, true, true) => {
                    self.write_at(part, host + p.at as u64)?;
                    self.set(p.cluster, host | COPIED);
                }
                // An allocated zero cluster, partly written: its old
                // bytes must read as zeros.
                (true, true, false) => {
                    self.write_at(&self.padded(&p, part), host)?;
                    self.set(p.cluster, host | COPIED);
                }
                (false, _, true) => unreachable!("a new whole cluster joins the run"),
                (false, zero, false) => {
                    if !zero && self.backing.is_some() {
                        return Err(self.partial(p.cluster));
                    }
                    let host = self.allocate();
                    self.write_at(&self.padded(&p, part), host)?;
                    self.set(p.cluster, host | COPIED);
                }
            }
        }
        if let Some((start, from)) = run {
            self.write_at(&data[from..done], start)?;
        }
        Ok(())
    }

    /// A whole cluster of zeros with `part` at its place.
    fn padded(&self, p: &Piece, part: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; self.cs as usize];
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
        for p in self.pieces(offset, len)? {
            let entry = self.entry(p.cluster);
            let host = entry & OFFSET_MASK;
            let zero = entry & ZERO != 0;
            match (host != 0, p.whole) {
                (true, true) => self.set(p.cluster, host | COPIED | ZERO),
                (true, false) if !zero => {
                    self.write_at(&vec![0u8; p.len], host + p.at as u64)?;
                }
                (true, false) => {}
                (false, true) => match self.backing {
                    Some(_) => self.set(p.cluster, ZERO),
                    None => self.set(p.cluster, 0),
                },
                (false, false) => {
                    if !zero && self.backing.is_some() {
                        return Err(self.partial(p.cluster));
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads guest `offset..offset + buf.len()` of this image alone: what
    /// it does not hold reads as zeros (the backing file is not read).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        for p in self.pieces(offset, buf.len() as u64)? {
            let out = &mut buf[done..done + p.len];
            done += p.len;
            let entry = self.entry(p.cluster);
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

    /// Writes the tables and the header after the data and syncs the
    /// file: the image is complete. Returns its length, digest and data.
    pub fn finish(mut self) -> Result<Finished> {
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
        let header = header_cluster(&opts, self.l1_entries, l1_offset, rt_offset, rt)?;
        let (table, blocks) = refcounts(cs, rt, rb, rb_offset, total);
        let mut l1 = vec![0u8; (l1_clusters * cs) as usize];
        let mut data_bytes = 0u64;
        let mut tables = Vec::new();
        for (j, (index, entries)) in self.l2.iter().enumerate() {
            let at = l2_offset + j as u64 * cs;
            let mut raw = Vec::with_capacity(cs as usize);
            for (k, e) in entries.iter().enumerate() {
                raw.extend_from_slice(&e.to_be_bytes());
                if e & OFFSET_MASK != 0 && e & ZERO == 0 {
                    let guest = (index * (cs / 8) + k as u64) * cs;
                    data_bytes += cs.min(self.size - guest);
                }
            }
            tables.push((raw, at));
            let slot = (*index * 8) as usize;
            l1[slot..slot + 8].copy_from_slice(&(at | COPIED).to_be_bytes());
        }
        tables.push((l1, l1_offset));
        tables.push((table, rt_offset));
        tables.push((blocks, rb_offset));
        tables.push((header, 0));
        let written = (|| {
            for (bytes, at) in &tables {
                self.file.write_all_at(bytes, *at)?;
                self.digest.written(*at, bytes);
            }
            self.file.set_len(total * cs)?;
            self.file.sync_all()
        })();
        written.map_err(|source| Error::Writing {
            what: "the image's tables",
            source,
        })?;
        let len = total * cs;
        let (digest, read_back) =
            self.digest
                .finish(&self.file, len)
                .map_err(|source| Error::Reading {
                    what: "the image, for its digest",
                    offset: 0,
                    len,
                    source,
                })?;
        Ok(Finished {
            len,
            digest,
            data_bytes,
            read_back,
        })
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
