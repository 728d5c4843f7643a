//! The bitmap directory (docs/interop/qcow2.txt, "Bitmaps extension").

use serde::Serialize;

use super::error::{Error, Result};
use super::header::{be16, be32, be64};

/// QEMU's limits: QCOW2_MAX_BITMAPS and QCOW2_MAX_BITMAP_DIRECTORY_SIZE.
pub const MAX_BITMAPS: u32 = 65535;
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
pub const MAX_NAME: usize = 1023;
/// Extra data QEMU would carry is tiny; refuse anything that is not.
pub const MAX_EXTRA_DATA: u32 = 64 << 10;
/// QEMU's BME_MAX_TABLE_SIZE.
pub const MAX_TABLE_SIZE: u32 = 0x0800_0000;

const FLAG_IN_USE: u32 = 1 << 0;
const FLAG_AUTO: u32 = 1 << 1;
const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
const KNOWN_FLAGS: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;
const TYPE_DIRTY_TRACKING: u8 = 1;
const ENTRY_FIXED: usize = 24;

/// One persistent bitmap, as the image's directory describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BitmapEntry {
    pub name: String,
    /// Set while a QEMU has the bitmap loaded; set in a closed image, the
    /// bitmap is stale (QEMU died) and cannot be used.
    pub in_use: bool,
    /// Enabled: QEMU records writes into it.
    pub auto: bool,
    pub granularity: u64,
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    #[serde(skip)]
    pub extra_data: Vec<u8>,
}

/// A bitmap's table, as its directory entry places it.
struct Table {
    offset: u64,
    /// Entries of 8 bytes.
    size: u32,
}

impl Table {
    /// Why the table cannot be a bitmap's of a `size`-byte image at
    /// `granularity`: too large or empty, not on a cluster, past the
    /// file's end, or too small to cover the image.
    fn check(
        &self,
        granularity: u64,
        size: u64,
        cluster_size: u64,
        file_len: u64,
    ) -> std::result::Result<(), String> {
        let (offset, entries) = (self.offset, self.size);
        if entries == 0 || entries > MAX_TABLE_SIZE {
            return Err(format!("table of {entries} entries"));
        }
        if offset == 0 || offset % cluster_size != 0 {
            return Err(format!("table offset {offset:#x} is not a cluster"));
        }
        let end = offset.checked_add(u64::from(entries) * 8);
        if end.is_none_or(|end| end > file_len) {
            return Err(format!(
                "table at {offset:#x} runs past the end of the file"
            ));
        }
        let covered = u64::from(entries)
            .saturating_mul(cluster_size * 8)
            .saturating_mul(granularity);
        if covered < size {
            return Err(format!(
                "table of {entries} entries covers {covered} bytes of a {size}-byte image"
            ));
        }
        Ok(())
    }
}

/// Parses `nb` entries from the directory bytes, checking each against the
/// image: `size` (virtual), `cluster_size` and `file_len`.
pub fn parse_directory(
    dir: &[u8],
    nb: u32,
    size: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<Vec<BitmapEntry>> {
    if nb > MAX_BITMAPS {
        return Err(Error::TooManyBitmaps {
            count: nb,
            max: MAX_BITMAPS,
        });
    }
    let mut entries: Vec<BitmapEntry> = Vec::with_capacity(nb.min(1024) as usize);
    let mut at = 0usize;
    for index in 0..nb {
        let bad = |reason: String| Error::BadBitmapEntry { index, reason };
        if dir.len() - at < ENTRY_FIXED {
            return Err(bad(format!(
                "directory ends at {} bytes, inside this entry",
                dir.len()
            )));
        }
        let e = &dir[at..];
        let table_offset = be64(e, 0);
        let table_size = be32(e, 8);
        let flags = be32(e, 12);
        let kind = e[16];
        let granularity_bits = e[17];
        let name_size = be16(e, 18) as usize;
        let extra_size = be32(e, 20);
        if extra_size > MAX_EXTRA_DATA {
            return Err(bad(format!("{extra_size} bytes of extra data")));
        }
        let extra_end = ENTRY_FIXED + extra_size as usize;
        let name_end = extra_end + name_size;
        let entry_len = name_end.next_multiple_of(8);
        if entry_len > e.len() {
            return Err(bad(format!(
                "entry of {entry_len} bytes runs past the directory"
            )));
        }
        if name_size == 0 || name_size > MAX_NAME {
            return Err(bad(format!("name of {name_size} bytes")));
        }
        let name = String::from_utf8(e[extra_end..name_end].to_vec())
            .map_err(|_| bad("name is not UTF-8".into()))?;
        if kind != TYPE_DIRTY_TRACKING {
            return Err(bad(format!("type {kind} is not a dirty-tracking bitmap")));
        }
        if !(9..=31).contains(&granularity_bits) {
            return Err(bad(format!("granularity_bits {granularity_bits}")));
        }
        if flags & !KNOWN_FLAGS != 0 {
            return Err(bad(format!("unknown flags {flags:#x}")));
        }
        let granularity = 1u64 << granularity_bits;
        let table = Table {
            offset: table_offset,
            size: table_size,
        };
        table
            .check(granularity, size, cluster_size, file_len)
            .map_err(bad)?;
        if entries.iter().any(|other| other.name == name) {
            return Err(bad(format!("name {name:?} appears twice")));
        }
        entries.push(BitmapEntry {
            name,
            in_use: flags & FLAG_IN_USE != 0,
            auto: flags & FLAG_AUTO != 0,
            granularity,
            table_offset,
            table_size,
            flags,
            extra_data: e[ENTRY_FIXED..extra_end].to_vec(),
        });
        at += entry_len;
    }
    if at != dir.len() {
        return Err(Error::BadBitmapEntry {
            index: nb,
            reason: format!(
                "{} bytes left in the directory after the last entry",
                dir.len() - at
            ),
        });
    }
    Ok(entries)
}
