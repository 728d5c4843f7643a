//! Creating an empty qcow2 v3 image: header cluster, refcount table and
//! blocks covering the metadata, and a zeroed L1 table. No data cluster is
//! allocated, so every guest range reads from the backing file, or as
//! zeros without one.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::error::{Error, Result};
use super::header::{self, Extension, MAX_L1_ENTRIES, ext};

const HEADER_LENGTH: usize = 112;
/// 16-bit refcounts, as QEMU's default.
const REFCOUNT_ORDER: u32 = 4;

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateOptions<'a> {
    /// Virtual size in bytes.
    pub size: u64,
    /// A power of two from 512 B to 2 MiB.
    pub cluster_size: u64,
    pub backing: Option<&'a str>,
    pub backing_format: Option<&'a str>,
}

impl Default for CreateOptions<'_> {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 64 << 10,
            backing: None,
            backing_format: None,
        }
    }
}

const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

fn feature_table() -> Extension {
    let mut data = Vec::with_capacity(FEATURE_NAMES.len() * 48);
    for (kind, bit, name) in FEATURE_NAMES {
        let mut entry = [0u8; 48];
        entry[0] = kind;
        entry[1] = bit;
        entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
        data.extend_from_slice(&entry);
    }
    Extension {
        kind: ext::FEATURE_NAMES,
        data,
    }
}

/// Creates `path`, which must not exist.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    create_with_clusters(path, opts, &[]).map(drop)
}

const OFLAG_COPIED: u64 = 1 << 63;

/// A qcow2 cluster size: a power of two from 512 B to 2 MiB.
pub fn check_cluster_size(size: u64) -> Result<()> {
    if !size.is_power_of_two() || !(512..=(2 << 20)).contains(&size) {
        return Err(Error::BadClusterSize { size });
    }
    Ok(())
}

/// Creates `path` (which must not exist) with the guest clusters
/// `clusters` (indices, ascending, unique) allocated and mapped, after all
/// the metadata, in that order: guest cluster `clusters[i]` lives at the
/// returned offset plus `i` clusters. Their bytes are zero until the
/// caller writes them; every other guest cluster is unallocated.
pub fn create_with_clusters(path: &Path, opts: &CreateOptions, clusters: &[u64]) -> Result<u64> {
    let cs = opts.cluster_size;
    let l1_entries = check(opts)?;
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let per_l2 = cs / 8;
    let guest_clusters = opts.size.div_ceil(cs);
    if clusters.windows(2).any(|w| w[0] >= w[1])
        || clusters.last().is_some_and(|&c| c >= guest_clusters)
    {
        return Err(Error::BadSize {
            size: opts.size,
            reason: "cluster list is not ascending within the image".into(),
        });
    }
    // One L2 table per L1 entry that maps anything.
    let mut l2_indices: Vec<u64> = clusters.iter().map(|c| c / per_l2).collect();
    l2_indices.dedup();
    let l2_clusters = l2_indices.len() as u64;
    let data_clusters = clusters.len() as u64;

    let (rt, rb) = refcount_clusters(cs, 1 + l1_clusters + l2_clusters + data_clusters);
    let total = 1 + rt + rb + l1_clusters + l2_clusters + data_clusters;
    let rt_offset = cs;
    let rb_offset = (1 + rt) * cs;
    let l1_offset = (1 + rt + rb) * cs;
    let l2_offset = l1_offset + l1_clusters * cs;
    let data_offset = l2_offset + l2_clusters * cs;

    let header_cluster = header_cluster(opts, None, l1_entries, l1_offset, rt_offset, rt, &[])?;

    let (table, blocks) = refcounts(cs, rt, rb, rb_offset, total);

    write_new(path, "the new image", |file| {
        file.set_len(total * cs)?;
        file.write_all_at(&header_cluster, 0)?;
        file.write_all_at(&table, rt_offset)?;
        file.write_all_at(&blocks, rb_offset)?;
        if !clusters.is_empty() {
            let mut l1 = vec![0u8; (l1_clusters * cs) as usize];
            for (j, index) in l2_indices.iter().enumerate() {
                let entry = (l2_offset + j as u64 * cs) | OFLAG_COPIED;
                let at = (*index * 8) as usize;
                l1[at..at + 8].copy_from_slice(&entry.to_be_bytes());
            }
            file.write_all_at(&l1, l1_offset)?;
            // One L2 table at a time: memory stays at one cluster.
            let mut i = 0usize;
            for (j, index) in l2_indices.iter().enumerate() {
                let mut l2 = vec![0u8; cs as usize];
                while i < clusters.len() && clusters[i] / per_l2 == *index {
                    let entry = (data_offset + i as u64 * cs) | OFLAG_COPIED;
                    let at = ((clusters[i] % per_l2) * 8) as usize;
                    l2[at..at + 8].copy_from_slice(&entry.to_be_bytes());
                    i += 1;
                }
                file.write_all_at(&l2, l2_offset + j as u64 * cs)?;
            }
        }
        file.sync_all()
    })?;
    Ok(data_offset)
}

/// Creates `path` (which must not exist) and writes it with `write`; on a
/// failed write the file is removed, the error naming `what` it held.
pub(super) fn write_new(
    path: &Path,
    what: &'static str,
    write: impl FnOnce(&std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let file = create_new(path)?;
    if let Err(source) = write(&file) {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(Error::Writing { what, source });
    }
    Ok(())
}

/// Checks what to create; the number of L1 entries its size needs.
pub(super) fn check(opts: &CreateOptions) -> Result<u64> {
    let cs = opts.cluster_size;
    check_cluster_size(cs)?;
    if opts.backing.is_none() && opts.backing_format.is_some() {
        return Err(Error::FormatWithoutBacking);
    }
    for (value, what) in [
        (opts.backing, "backing file name"),
        (opts.backing_format, "backing format"),
    ] {
        if value.is_some_and(|v| v.is_empty() || v.contains('\0')) {
            return Err(Error::BadName { what });
        }
    }
    if opts.size % 512 != 0 {
        // QEMU counts in 512-byte sectors and would drop the remainder.
        return Err(Error::BadSize {
            size: opts.size,
            reason: "not a multiple of 512 bytes".into(),
        });
    }
    let l1_entries = opts.size.div_ceil(cs / 8 * cs);
    if l1_entries > MAX_L1_ENTRIES || opts.size > i64::MAX as u64 {
        return Err(Error::BadSize {
            size: opts.size,
            reason: format!(
                "{cs}-byte clusters address at most {} bytes",
                MAX_L1_ENTRIES * (cs / 8) * cs
            ),
        });
    }
    Ok(l1_entries)
}

/// How many refcount-table and refcount-block clusters cover `others`
/// clusters plus themselves.
pub(super) fn refcount_clusters(cs: u64, others: u64) -> (u64, u64) {
    let refs_per_block = cs * 8 / (1 << REFCOUNT_ORDER);
    let (mut rt, mut rb) = (1u64, 1u64);
    loop {
        let total = others + rt + rb;
        let need_rb = total.div_ceil(refs_per_block);
        let need_rt = (need_rb * 8).div_ceil(cs);
        if (need_rb, need_rt) == (rb, rt) {
            return (rt, rb);
        }
        (rb, rt) = (need_rb, need_rt);
    }
}

/// The refcount table (`rt` clusters, pointing at `rb` blocks from
/// `rb_offset`) and blocks giving clusters `0..total` a refcount of 1.
pub(super) fn refcounts(
    cs: u64,
    rt: u64,
    rb: u64,
    rb_offset: u64,
    total: u64,
) -> (Vec<u8>, Vec<u8>) {
    refcounts_with(cs, rt, rb, rb_offset, total, &|_| 1)
}

/// [`refcounts`], cluster `c` counting `count(c)`.
pub(super) fn refcounts_with(
    cs: u64,
    rt: u64,
    rb: u64,
    rb_offset: u64,
    total: u64,
    count: &dyn Fn(u64) -> u16,
) -> (Vec<u8>, Vec<u8>) {
    let mut table = vec![0u8; (rt * cs) as usize];
    for i in 0..rb {
        let at = (i * 8) as usize;
        table[at..at + 8].copy_from_slice(&(rb_offset + i * cs).to_be_bytes());
    }
    let mut blocks = vec![0u8; (rb * cs) as usize];
    for cluster in 0..total {
        let at = (cluster * 2) as usize;
        blocks[at..at + 2].copy_from_slice(&count(cluster).to_be_bytes());
    }
    (table, blocks)
}

/// The first cluster of a new v3 image: the header, its extensions (with
/// `more` after the backing format) and the backing file name.
pub(super) fn header_cluster(
    opts: &CreateOptions,
    compression: Option<super::compress::Compression>,
    l1_entries: u64,
    l1_offset: u64,
    rt_offset: u64,
    rt: u64,
    more: &[Extension],
) -> Result<Vec<u8>> {
    let cs = opts.cluster_size;
    let mut h = vec![0u8; HEADER_LENGTH];
    h[0..4].copy_from_slice(&header::MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&cs.trailing_zeros().to_be_bytes());
    h[24..32].copy_from_slice(&opts.size.to_be_bytes());
    h[36..40].copy_from_slice(&(l1_entries as u32).to_be_bytes());
    h[40..48].copy_from_slice(&l1_offset.to_be_bytes());
    h[48..56].copy_from_slice(&rt_offset.to_be_bytes());
    h[56..60].copy_from_slice(&(rt as u32).to_be_bytes());
    h[96..100].copy_from_slice(&REFCOUNT_ORDER.to_be_bytes());
    h[100..104].copy_from_slice(&(HEADER_LENGTH as u32).to_be_bytes());
    if let Some(c) = compression.filter(|&c| c != super::compress::Compression::Deflate) {
        h[72..80].copy_from_slice(&header::incompat::COMPRESSION.to_be_bytes());
        h[104] = c.type_byte();
    }

    let mut extensions = Vec::new();
    if let Some(format) = opts.backing_format {
        extensions.push(Extension {
            kind: ext::BACKING_FORMAT,
            data: format.as_bytes().to_vec(),
        });
    }
    extensions.extend_from_slice(more);
    // The feature-name table helps other tools name bits; it is left out
    // when a small cluster has no room for it.
    let mut with_names = extensions.clone();
    with_names.push(feature_table());
    header::serialize(&h, &with_names, opts.backing, cs)
        .or_else(|_| header::serialize(&h, &extensions, opts.backing, cs))
}

/// Opens `path` for reading and writing, creating it; it must not exist.
pub(super) fn create_new(path: &Path) -> Result<std::fs::File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| match source.kind() {
            ErrorKind::AlreadyExists => Error::AlreadyExists { path: path.into() },
            _ => Error::Opening {
                path: path.into(),
                source,
            },
        })
}
