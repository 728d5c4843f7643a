//! The cluster map: what each guest range of one image file holds, from its
//! L1 and L2 tables. Backing files are not consulted: an `Unallocated` range
//! reads from the backing file (or as zeros when there is none).

use std::fs::File;

use serde::Serialize;

use super::error::{Error, Result};
use super::header::{MAX_L1_ENTRIES, check_within};
use super::image::{Image, Source, read_at};

const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const OFLAG_COPIED: u64 = 1 << 63;
const OFLAG_COMPRESSED: u64 = 1 << 62;
const OFLAG_ZERO: u64 = 1;
const SUBCLUSTERS: u64 = 32;

/// What a guest range holds in this file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Data at `offset` in the image (or in its external data file).
    Data,
    /// Reads as zeros; `offset` is set when a cluster stays allocated.
    Zero,
    /// Not in this file: read from the backing file.
    Unallocated,
    /// One compressed cluster at `offset`, `compressed_length` bytes.
    Compressed,
}

/// A guest range of one kind, with host offsets contiguous.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed_length: Option<u64>,
}

impl Extent {
    fn absorbs(&self, next: &Extent) -> bool {
        self.kind == next.kind
            && self.kind != Kind::Compressed
            && self.start + self.length == next.start
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// Merges adjacent extents and hands each finished one on.
struct Merger<F> {
    pending: Option<Extent>,
    sink: F,
}

impl<F: FnMut(Extent) -> Result<()>> Merger<F> {
    fn push(&mut self, next: Extent) -> Result<()> {
        match &mut self.pending {
            Some(p) if p.absorbs(&next) => {
                p.length += next.length;
                Ok(())
            }
            _ => match self.pending.replace(next) {
                Some(done) => (self.sink)(done),
                None => Ok(()),
            },
        }
    }

    fn finish(mut self) -> Result<()> {
        match self.pending.take() {
            Some(done) => (self.sink)(done),
            None => Ok(()),
        }
    }
}

/// The whole map of `image`, merged.
pub fn map(image: &Image) -> Result<Vec<Extent>> {
    let file = File::open(&image.path).map_err(|source| Error::Opening {
        path: image.path.clone(),
        source,
    })?;
    let mut out = Vec::new();
    walk(&file, image, |e| {
        out.push(e);
        Ok(())
    })?;
    Ok(out)
}

/// Calls `f` with each extent of `image`, in guest order, merged. Reads one
/// L2 table at a time: memory stays at one cluster plus the L1 table.
pub fn walk<S: Source + ?Sized>(
    file: &S,
    image: &Image,
    f: impl FnMut(Extent) -> Result<()>,
) -> Result<()> {
    let h = image.header();
    let size = h.size;
    let cluster_size = h.cluster_size();
    let coverage = h.l2_coverage();
    let needed = h.l1_entries_needed();
    if needed > MAX_L1_ENTRIES {
        return Err(Error::TableTooLarge {
            what: "L1 table",
            entries: needed,
            max: MAX_L1_ENTRIES,
        });
    }
    let l1 = read_at(file, "L1 table", h.l1_table_offset, needed as usize * 8)?;
    let mut merger = Merger {
        pending: None,
        sink: f,
    };
    let data_file = h.has_data_file();
    for (i, raw) in l1.chunks_exact(8).enumerate() {
        let guest_base = i as u64 * coverage;
        let span = coverage.min(size - guest_base);
        let entry = u64::from_be_bytes(raw.try_into().unwrap_or_default());
        let l2_offset = entry & L1E_OFFSET_MASK;
        if l2_offset == 0 {
            merger.push(Extent {
                start: guest_base,
                length: span,
                kind: Kind::Unallocated,
                offset: None,
                compressed_length: None,
            })?;
            continue;
        }
        if l2_offset % cluster_size != 0 {
            return Err(Error::Unaligned {
                what: "L2 table",
                offset: l2_offset,
                cluster_size,
            });
        }
        check_within("L2 table", l2_offset, cluster_size, image.file_len)?;
        let l2 = read_at(file, "L2 table", l2_offset, cluster_size as usize)?;
        let step = if h.extended_l2() { 16 } else { 8 };
        for (j, e) in l2.chunks_exact(step).enumerate() {
            let guest = guest_base + j as u64 * cluster_size;
            if guest >= size {
                break;
            }
            let len = cluster_size.min(size - guest);
            let word = |at: usize| u64::from_be_bytes(e[at..at + 8].try_into().unwrap_or_default());
            let l2e = word(0);
            let bitmap = if step == 16 { Some(word(8)) } else { None };
            classify(image, guest, len, l2e, bitmap, data_file, &mut merger)?;
        }
    }
    merger.finish()
}

/// The extent of compressed cluster `l2e` at `guest` (`len` bytes), its
/// host range checked against the file.
fn compressed(image: &Image, guest: u64, len: u64, l2e: u64) -> Result<Extent> {
    let h = image.header();
    // Host offset in the low x bits, then (sectors - 1) above it.
    let x = 62 - (h.cluster_bits - 8);
    let host = l2e & ((1u64 << x) - 1);
    let sectors = ((l2e >> x) & ((1u64 << (h.cluster_bits - 8)) - 1)) + 1;
    let compressed_length = sectors * 512 - (host & 511);
    // The length counts whole sectors, an upper bound: the data may end
    // inside the last one, and a file QEMU wrote ends where its last
    // compressed cluster's data ends (reads past it give zeros). So the
    // range may reach into the file's last, partial sector, no further.
    check_within(
        "compressed cluster",
        host,
        compressed_length.min(h.cluster_size()),
        image.file_len.next_multiple_of(512),
    )?;
    check_within("compressed cluster", host, 1, image.file_len)?;
    Ok(Extent {
        start: guest,
        length: len,
        kind: Kind::Compressed,
        offset: Some(host),
        compressed_length: Some(compressed_length),
    })
}

fn classify<F: FnMut(Extent) -> Result<()>>(
    image: &Image,
    guest: u64,
    len: u64,
    l2e: u64,
    bitmap: Option<u64>,
    data_file: bool,
    out: &mut Merger<F>,
) -> Result<()> {
    let h = image.header();
    let cluster_size = h.cluster_size();
    let bad = |reason: String| Error::BadL2Entry {
        guest_offset: guest,
        reason,
    };
    let extent = |start, length, kind, offset| Extent {
        start,
        length,
        kind,
        offset,
        compressed_length: None,
    };

    if l2e & OFLAG_COMPRESSED != 0 {
        if data_file {
            return Err(bad("compressed cluster in an image with a data file".into()));
        }
        if bitmap.is_some_and(|b| b != 0) {
            return Err(bad("compressed cluster with a subcluster bitmap".into()));
        }
        return out.push(compressed(image, guest, len, l2e)?);
    }

    let host = l2e & L2E_OFFSET_MASK;
    // With an external data file, offset 0 is a real offset; such clusters
    // always have refcount 1, so the COPIED flag tells them apart.
    let allocated = host != 0 || (data_file && l2e & OFLAG_COPIED != 0);
    if allocated {
        if host % cluster_size != 0 {
            return Err(Error::Unaligned {
                what: "data cluster",
                offset: host,
                cluster_size,
            });
        }
        if !data_file {
            check_within("data cluster", host, 1, image.file_len)?;
        }
    }

    let Some(bitmap) = bitmap else {
        let (kind, offset) = if l2e & OFLAG_ZERO != 0 {
            (Kind::Zero, allocated.then_some(host))
        } else if allocated {
            (Kind::Data, Some(host))
        } else {
            (Kind::Unallocated, None)
        };
        return out.push(extent(guest, len, kind, offset));
    };

    let alloc_bits = bitmap & 0xffff_ffff;
    let zero_bits = bitmap >> 32;
    if alloc_bits & zero_bits != 0 {
        return Err(bad(format!(
            "subclusters both allocated and zero (bitmap {bitmap:#018x})"
        )));
    }
    if !allocated && alloc_bits != 0 {
        return Err(bad(format!(
            "subclusters allocated in an unallocated cluster (bitmap {bitmap:#018x})"
        )));
    }
    let sc = cluster_size / SUBCLUSTERS;
    for k in 0..SUBCLUSTERS {
        let start = guest + k * sc;
        if start >= guest + len {
            break;
        }
        let length = sc.min(guest + len - start);
        let (kind, offset) = if zero_bits & (1 << k) != 0 {
            (Kind::Zero, allocated.then_some(host + k * sc))
        } else if alloc_bits & (1 << k) != 0 {
            (Kind::Data, Some(host + k * sc))
        } else {
            (Kind::Unallocated, None)
        };
        out.push(extent(start, length, kind, offset))?;
    }
    Ok(())
}
