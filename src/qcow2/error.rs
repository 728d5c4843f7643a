use std::io;
use std::path::PathBuf;

/// What can be wrong with a qcow2 file, or with what was asked of it. Each
/// check has its own variant carrying the offending values.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {}", path.display())]
    Opening {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot read {what} ({len} bytes at offset {offset})")]
    Reading {
        what: &'static str,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },

    #[error("cannot write {what}")]
    Writing {
        what: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("{} already exists", path.display())]
    AlreadyExists { path: PathBuf },

    #[error("{len} bytes at offset {offset} reach past the image's end ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },

    #[error(
        "a write covers part of the {cluster_size}-byte cluster at offset {offset}, which this image does not hold yet and its backing file may: the rest of the cluster is unknown"
    )]
    PartialOverBacking { offset: u64, cluster_size: u64 },

    #[error("not a qcow2 image: magic is {found:#010x}")]
    BadMagic { found: u32 },

    #[error("file is {len} bytes, too short for a qcow2 header")]
    TooShort { len: u64 },

    #[error("unsupported qcow2 version {version} (2 and 3 are known)")]
    UnsupportedVersion { version: u32 },

    #[error("cluster_bits {bits} is outside 9..=21 (512 B to 2 MiB clusters)")]
    BadClusterBits { bits: u32 },

    #[error(
        "header length {length} is invalid for a version {version} image of {cluster_size}-byte clusters"
    )]
    BadHeaderLength {
        length: u32,
        version: u32,
        cluster_size: u64,
    },

    #[error("refcount order {order} is invalid for a version {version} image")]
    BadRefcountOrder { order: u32, version: u32 },

    #[error("unknown encryption method {method}")]
    BadCryptMethod { method: u32 },

    #[error("unknown compression type {found}")]
    BadCompressionType { found: u8 },

    #[error("image needs features bitback does not know: {}", names.join(", "))]
    UnknownIncompatibleFeatures { bits: u64, names: Vec<String> },

    #[error(
        "virtual size {size} needs {needed} L1 entries but the table has {l1_size} (at most {max})"
    )]
    BadL1Size {
        size: u64,
        l1_size: u32,
        needed: u64,
        max: u64,
    },

    #[error("{what} at offset {offset:#x} is not aligned to the {cluster_size}-byte cluster")]
    Unaligned {
        what: &'static str,
        offset: u64,
        cluster_size: u64,
    },

    #[error(
        "{what} ({len} bytes at offset {offset:#x}) lies past the end of the file ({file_len} bytes)"
    )]
    PastEnd {
        what: &'static str,
        offset: u64,
        len: u64,
        file_len: u64,
    },

    #[error(
        "header extension {kind:#010x} at offset {offset} ({len} bytes) runs past the header area ({end} bytes)"
    )]
    ExtensionOutOfBounds {
        kind: u32,
        offset: u64,
        len: u64,
        end: u64,
    },

    #[error("header extension {kind:#010x} is malformed: {reason}")]
    BadExtension { kind: u32, reason: String },

    #[error("backing file name is {len} bytes; at most {max} are allowed")]
    BackingNameTooLong { len: usize, max: usize },

    #[error(
        "backing file name ({size} bytes at offset {offset}) lies outside the first cluster ({cluster_size} bytes)"
    )]
    BackingNameOutOfBounds {
        offset: u64,
        size: u32,
        cluster_size: u64,
    },

    #[error("{what} is not valid UTF-8")]
    NotUtf8 { what: &'static str },

    #[error("{what} must not be empty or contain NUL bytes")]
    BadName { what: &'static str },

    #[error("bitmap directory has {count} bitmaps; at most {max} are allowed")]
    TooManyBitmaps { count: u32, max: u32 },

    #[error("bitmap directory is {size} bytes; at most {max} are allowed")]
    BitmapDirectoryTooLarge { size: u64, max: u64 },

    #[error("bitmap directory entry {index} is malformed: {reason}")]
    BadBitmapEntry { index: u32, reason: String },

    #[error("{what} has {entries} entries; at most {max} are allowed")]
    TableTooLarge {
        what: &'static str,
        entries: u64,
        max: u64,
    },

    #[error("L2 entry for guest offset {guest_offset:#x} is invalid: {reason}")]
    BadL2Entry { guest_offset: u64, reason: String },

    #[error("image has the {flag} bit set; run `qemu-img check -r all` on it first")]
    Unsafe { flag: &'static str },

    #[error("image is in use by another process (QEMU holds a lock on it)")]
    InUse,

    #[error("new header needs {needed} bytes but the first cluster holds {cluster_size}")]
    HeaderDoesNotFit { needed: u64, cluster_size: u64 },

    #[error("virtual size {size} is not supported: {reason}")]
    BadSize { size: u64, reason: String },

    #[error("cluster size {size} is not a power of two between 512 B and 2 MiB")]
    BadClusterSize { size: u64 },

    #[error("an image whose external data file is raw (data-file-raw) cannot have a backing file")]
    BackingWithRawDataFile,

    #[error("a backing format needs a backing file")]
    FormatWithoutBacking,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
