//! An image that carries nothing but one persistent dirty bitmap with the
//! ranges the caller gives set: the only way to hand QEMU a bitmap of
//! bitback's making (QMP can add, merge and clear bitmaps, but cannot set
//! a range in one). QEMU opens the image read-only and merges the bitmap
//! into one of its own (`block-dirty-bitmap-merge`).
//!
//! Layout, in clusters: the header (with the bitmaps extension and
//! autoclear bit 0, without which QEMU ignores the extension), the
//! refcount table and blocks, an empty L1 table, the bitmap directory (one
//! entry: not in use, not auto, so QEMU loads it disabled), the bitmap
//! table, then one data cluster per table entry that has a bit set (an
//! entry of 0 reads as all zeros).

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::create::{
    CreateOptions, check, header_cluster, refcount_clusters, refcounts, write_new,
};
use super::error::{Error, Result};
use super::header::{Extension, autoclear, ext};

/// qcow2.txt's bitmap type "dirty tracking bitmap".
const TYPE_DIRTY_TRACKING: u8 = 1;
const CLUSTER_SIZE: u64 = 64 << 10;

/// A bitmap of a disk of `size` bytes, one bit per `granularity` bytes,
/// built in memory (2 MiB for 1 TiB at 64 KiB) and written as an image
/// with [`Mask::write`].
#[derive(Debug, Clone)]
pub struct Mask {
    size: u64,
    granularity: u64,
    bits: Vec<u8>,
    covered: u64,
}

/// The most bits a mask [`Mask::granularity_for`] chooses: 8 MiB of
/// bitmap.
const MAX_BITS: u64 = 64 << 20;

impl Mask {
    /// An empty mask; `granularity` a power of two from 512 B to 2 GiB.
    pub fn new(size: u64, granularity: u64) -> Result<Mask> {
        if !granularity.is_power_of_two() || !(512..=(1 << 31)).contains(&granularity) {
            return Err(Error::BadSize {
                size: granularity,
                reason: "a bitmap granularity is a power of two from 512 B to 2 GiB".into(),
            });
        }
        let bits = size.div_ceil(granularity);
        if bits > 8 * MAX_BITS {
            return Err(Error::BadSize {
                size,
                reason: format!("a mask of {granularity}-byte granules would be too large"),
            });
        }
        Ok(Mask {
            size,
            granularity,
            bits: vec![0u8; bits.div_ceil(8) as usize],
            covered: 0,
        })
    }

    /// 64 KiB (a qcow2 cluster and QEMU's backup unit), or coarser for a
    /// disk so large that the bitmap would pass 8 MiB (above 4 TiB).
    pub fn granularity_for(size: u64) -> u64 {
        (size.div_ceil(MAX_BITS)).next_power_of_two().max(64 << 10)
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Sets every bit that covers a byte of `start..start + len` (clipped
    /// to the disk).
    pub fn set(&mut self, start: u64, len: u64) {
        let end = start.saturating_add(len).min(self.size);
        if start >= end {
            return;
        }
        let g = self.granularity;
        for bit in start / g..end.div_ceil(g) {
            let byte = &mut self.bits[(bit / 8) as usize];
            let flag = 1u8 << (bit % 8);
            if *byte & flag == 0 {
                *byte |= flag;
                self.covered += g.min(self.size - bit * g);
            }
        }
    }

    /// The bytes the set bits cover.
    pub fn covered(&self) -> u64 {
        self.covered
    }

    /// Creates `path` (which must not exist): an empty image of the mask's
    /// size whose one bitmap `name` is this mask.
    pub fn write(&self, path: &Path, name: &str) -> Result<()> {
        write(path, self.size, name, self.granularity, &self.bits)
    }
}

/// [`Mask::new`], [`Mask::set`] for each of `ranges` (start, length), then
/// [`Mask::write`]; how many bytes the set bits cover.
pub fn create_mask(
    path: &Path,
    size: u64,
    name: &str,
    granularity: u64,
    ranges: impl IntoIterator<Item = (u64, u64)>,
) -> Result<u64> {
    let mut mask = Mask::new(size, granularity)?;
    for (start, len) in ranges {
        mask.set(start, len);
    }
    mask.write(path, name)?;
    Ok(mask.covered())
}

fn write(path: &Path, size: u64, name: &str, granularity: u64, bitmap: &[u8]) -> Result<()> {
    let cs = CLUSTER_SIZE;
    let opts = CreateOptions {
        size,
        cluster_size: cs,
        ..CreateOptions::default()
    };
    let l1_entries = check(&opts)?;
    if name.is_empty() || name.len() > super::bitmaps::MAX_NAME || name.contains('\0') {
        return Err(Error::BadName {
            what: "bitmap name",
        });
    }
    // One table entry per cluster of bitmap data; only clusters with a bit
    // set are written.
    let per_cluster = cs as usize;
    let table_entries = bitmap.len().div_ceil(per_cluster) as u64;
    let nonzero: Vec<usize> = bitmap
        .chunks(per_cluster)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&b| b != 0))
        .map(|(i, _)| i)
        .collect();

    let mut entry = Vec::new();
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let table_clusters = (table_entries * 8).div_ceil(cs).max(1);
    let data_clusters = nonzero.len() as u64;
    let (rt, rb) = refcount_clusters(cs, 1 + l1_clusters + 1 + table_clusters + data_clusters);
    let rt_offset = cs;
    let rb_offset = (1 + rt) * cs;
    let l1_offset = (1 + rt + rb) * cs;
    let dir_offset = l1_offset + l1_clusters * cs;
    let table_offset = dir_offset + cs;
    let data_offset = table_offset + table_clusters * cs;
    let total = data_offset / cs + data_clusters;

    entry.extend_from_slice(&table_offset.to_be_bytes());
    entry.extend_from_slice(&(table_entries as u32).to_be_bytes());
    entry.extend_from_slice(&0u32.to_be_bytes()); // flags: not in use, not auto
    entry.push(TYPE_DIRTY_TRACKING);
    entry.push(granularity.trailing_zeros() as u8);
    entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
    entry.extend_from_slice(&0u32.to_be_bytes()); // no extra data
    entry.extend_from_slice(name.as_bytes());
    entry.resize(entry.len().next_multiple_of(8), 0);

    let mut extension = Vec::with_capacity(24);
    extension.extend_from_slice(&1u32.to_be_bytes());
    extension.extend_from_slice(&0u32.to_be_bytes());
    extension.extend_from_slice(&(entry.len() as u64).to_be_bytes());
    extension.extend_from_slice(&dir_offset.to_be_bytes());
    let bitmaps = Extension {
        kind: ext::BITMAPS,
        data: extension,
    };
    let mut header = header_cluster(
        &opts,
        None,
        l1_entries,
        l1_offset,
        rt_offset,
        rt,
        &[bitmaps],
    )?;
    header[88..96].copy_from_slice(&autoclear::BITMAPS.to_be_bytes());

    let mut table = vec![0u8; (table_clusters * cs) as usize];
    for (j, &i) in nonzero.iter().enumerate() {
        let at = i * 8;
        let offset = data_offset + j as u64 * cs;
        table[at..at + 8].copy_from_slice(&offset.to_be_bytes());
    }
    let (rtable, rblocks) = refcounts(cs, rt, rb, rb_offset, total);

    write_new(path, "the bitmap image", |file| {
        file.set_len(total * cs)?;
        file.write_all_at(&header, 0)?;
        file.write_all_at(&rtable, rt_offset)?;
        file.write_all_at(&rblocks, rb_offset)?;
        file.write_all_at(&entry, dir_offset)?;
        file.write_all_at(&table, table_offset)?;
        for (j, &i) in nonzero.iter().enumerate() {
            let chunk = &bitmap[i * per_cluster..((i + 1) * per_cluster).min(bitmap.len())];
            file.write_all_at(chunk, data_offset + j as u64 * cs)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::Image;

    #[test]
    fn the_bitmap_reads_back_with_its_bits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.qcow2");
        let size = 3 << 40;
        let covered = create_mask(
            &path,
            size,
            "alloc",
            64 << 10,
            [(0, 1), (1 << 30, 128 << 10), (size - 512, 4096), (5, 0)],
        )
        .unwrap();
        assert_eq!(covered, 4 * (64 << 10));
        let image = Image::open(&path).unwrap();
        assert!(image.bitmaps_consistent());
        let entry = image.bitmap("alloc").unwrap();
        assert!(!entry.in_use && !entry.auto);
        assert_eq!(entry.granularity, 64 << 10);
        // 3 TiB / 64 KiB bits = 6 MiB of bitmap = 96 table entries, of
        // which the clusters of bits 0, 16384 (same cluster) and the last.
        assert_eq!(entry.table_size, 96);
        let table = std::fs::read(&path).unwrap();
        let t = entry.table_offset as usize;
        let offsets: Vec<u64> = table[t..t + 96 * 8]
            .chunks(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(offsets.iter().filter(|&&o| o != 0).count(), 2);
        let first = offsets[0] as usize;
        assert_eq!(table[first], 1);
        assert_eq!(table[first + 16384 / 8], 0b11);
        let last = offsets[95] as usize;
        assert_eq!(table[last + (64 << 10) - 1], 0x80);
    }

    #[test]
    fn bad_granularity_and_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.qcow2");
        assert!(create_mask(&path, 1 << 30, "a", 3000, []).is_err());
        assert!(create_mask(&path, 1 << 30, "", 65536, []).is_err());
        assert!(!path.exists());
    }
}
