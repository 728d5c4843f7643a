//! A native reader and editor of qcow2 images, no QEMU process needed.
//!
//! The format (QEMU's docs/interop/qcow2.txt), as far as bitback uses it:
//! - Cluster 0 holds the header: a fixed part (72 bytes in v2,
//!   `header_length` in v3), then extensions (u32 type, u32 length, data
//!   padded to 8; type 0 ends them), then the backing file name.
//! - The bitmaps extension points at the bitmap directory: one entry per
//!   persistent dirty bitmap, with its flags (`in_use`, `auto`) and
//!   granularity. Autoclear bit 0 says the extension is consistent.
//! - The L1 table points at L2 tables, whose entries map each guest cluster
//!   to a host cluster, a zero cluster, a compressed cluster, or nothing
//!   (read from the backing file). Extended L2 entries add a 32-subcluster
//!   bitmap.
//!
//! Every byte read is hostile: sizes are checked against named caps before
//! any allocation, offsets against the file's length, with checked
//! arithmetic; each failed check is its own [`Error`] variant.
//!
//! Offered: [`Image::open`] (header, extensions, bitmaps, LUKS header;
//! [`Image::info`] in `qemu-img info`'s terms), [`map`] / [`walk`] (the
//! cluster map), [`set_backing`] (in-place rebase, refused while a QEMU
//! holds the image), and [`create`] (an empty v3 image).

mod bitmaps;
mod compress;
mod create;
mod error;
mod header;
mod image;
mod layout;
mod luks;
mod map;
mod mask;
mod rebase;
mod stream;

pub use bitmaps::BitmapEntry;
pub use compress::{Compression, Compressor, decompress};
pub use create::{CreateOptions, check_cluster_size, create, create_with_clusters};
pub use error::{Error, Result};
pub use header::{Header, HeaderCluster};
pub use image::{BitmapStatus, Image, Info, Source};
pub use layout::layout_digest;
pub use map::{Extent, Kind, map, walk};
pub use mask::{Mask, create_mask};
pub use rebase::{QemuLockout, set_backing};
pub use stream::{Finished, Stream, Tap};

/// Holds QEMU off an image while alive (an OFD write lock over the bytes
/// QEMU locks); `Error::InUse` when a QEMU holds it now.
pub fn lock_out_qemu(file: &std::fs::File) -> Result<QemuLockout<'_>> {
    rebase::QemuLockout::take(file)
}

/// Whether a QEMU holds the image open now (a lock on the bytes QEMU
/// locks), asked without taking a lock: a file open read-only will do.
pub fn qemu_holds(file: &std::fs::File) -> bool {
    rebase::qemu_holds(file)
}
