//! The header cluster: the fixed header, the extensions after it, and the
//! backing file name. Parsed from the first cluster only; everything sized
//! by the file is checked against caps before use.

use super::error::{Error, Result};

pub const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
pub const V2_HEADER_LENGTH: u32 = 72;
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Where `compression_type` sits; present when header_length > 104.
const COMPRESSION_TYPE_OFFSET: usize = 104;
/// QEMU refuses longer backing names.
pub const MAX_BACKING_NAME: usize = 1023;
/// QEMU's QCOW_MAX_L1_SIZE: 32 MiB of L1 entries.
pub const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;

pub mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const CRYPTO: u32 = 0x0537_be77;
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Incompatible feature bits.
pub mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION: u64 = 1 << 3;
    pub const EXTENDED_L2: u64 = 1 << 4;
    pub const SUPPORTED: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTENDED_L2;
}

pub mod compat {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

pub mod autoclear {
    /// The bitmaps extension is consistent with the image.
    pub const BITMAPS: u64 = 1 << 0;
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

pub const CRYPT_AES: u32 = 1;
pub const CRYPT_LUKS: u32 = 2;

/// The fixed header fields, v2 and v3 (v3 fields are zero on v2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTENDED_L2 != 0
    }

    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    pub fn dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }

    pub fn corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }

    /// Bytes of guest data one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        let entry = if self.extended_l2() { 16 } else { 8 };
        self.cluster_size() / entry * self.cluster_size()
    }

    /// The L1 entries needed for the virtual size.
    pub fn l1_entries_needed(&self) -> u64 {
        self.size.div_ceil(self.l2_coverage())
    }
}

/// A header extension, kept as raw bytes so that a rewrite keeps it byte for
/// byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// An entry of the feature-name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// The bitmaps extension: where the bitmap directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

/// The crypto extension: where the LUKS header is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoExtension {
    pub offset: u64,
    pub length: u64,
}

pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// Everything the header cluster says, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderCluster {
    pub header: Header,
    /// The raw fixed header (header_length bytes), kept for rewrites so
    /// fields bitback does not know survive.
    pub raw_header: Vec<u8>,
    pub extensions: Vec<Extension>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub feature_names: Vec<FeatureName>,
    pub bitmaps: Option<BitmapsExtension>,
    pub data_file: Option<String>,
    pub crypto: Option<CryptoExtension>,
}

impl Header {
    /// The fixed fields' own rules: the refcount order the version
    /// allows, a known encryption method, a compression type that agrees
    /// with its feature bit.
    fn check_fields(&self) -> Result<()> {
        let refcount_ok = match self.version {
            2 => self.refcount_order == 4,
            _ => self.refcount_order <= 6,
        };
        if !refcount_ok {
            return Err(Error::BadRefcountOrder {
                order: self.refcount_order,
                version: self.version,
            });
        }
        if self.crypt_method > CRYPT_LUKS {
            return Err(Error::BadCryptMethod {
                method: self.crypt_method,
            });
        }
        let compression_flag = self.incompatible_features & incompat::COMPRESSION != 0;
        match (self.compression_type, compression_flag) {
            (0, false) | (1, true) => Ok(()),
            (found, _) => Err(Error::BadCompressionType { found }),
        }
    }
}

/// Parses the header cluster. `buf` holds the start of the file, at least
/// the first cluster or the whole file when it is shorter; `file_len` is
/// the file's length, for bounds checks.
pub fn parse(buf: &[u8], file_len: u64) -> Result<HeaderCluster> {
    if buf.len() < V2_HEADER_LENGTH as usize {
        return Err(Error::TooShort {
            len: buf.len() as u64,
        });
    }
    let magic = be32(buf, 0);
    if magic != MAGIC {
        return Err(Error::BadMagic { found: magic });
    }
    let version = be32(buf, 4);
    if version != 2 && version != 3 {
        return Err(Error::UnsupportedVersion { version });
    }
    let cluster_bits = be32(buf, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(Error::BadClusterBits { bits: cluster_bits });
    }
    let cluster_size = 1u64 << cluster_bits;

    let mut h = Header {
        version,
        backing_file_offset: be64(buf, 8),
        backing_file_size: be32(buf, 16),
        cluster_bits,
        size: be64(buf, 24),
        crypt_method: be32(buf, 32),
        l1_size: be32(buf, 36),
        l1_table_offset: be64(buf, 40),
        refcount_table_offset: be64(buf, 48),
        refcount_table_clusters: be32(buf, 56),
        nb_snapshots: be32(buf, 60),
        snapshots_offset: be64(buf, 64),
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: V2_HEADER_LENGTH,
        compression_type: 0,
    };
    if version == 3 {
        if buf.len() < V3_MIN_HEADER_LENGTH as usize {
            return Err(Error::TooShort {
                len: buf.len() as u64,
            });
        }
        h.incompatible_features = be64(buf, 72);
        h.compatible_features = be64(buf, 80);
        h.autoclear_features = be64(buf, 88);
        h.refcount_order = be32(buf, 96);
        h.header_length = be32(buf, 100);
        if h.header_length < V3_MIN_HEADER_LENGTH
            || u64::from(h.header_length) > cluster_size
            || h.header_length as usize > buf.len()
        {
            return Err(Error::BadHeaderLength {
                length: h.header_length,
                version,
                cluster_size,
            });
        }
        if h.header_length as usize > COMPRESSION_TYPE_OFFSET {
            h.compression_type = buf[COMPRESSION_TYPE_OFFSET];
        }
    }
    h.check_fields()?;

    // Extensions live between the fixed header and the backing name (or
    // the end of the first cluster).
    let area_end = if h.backing_file_offset != 0 {
        h.backing_file_offset
    } else {
        cluster_size
    }
    .min(buf.len() as u64);
    let extensions = parse_extensions(buf, u64::from(h.header_length), area_end)?;

    let mut out = HeaderCluster {
        raw_header: buf[..h.header_length as usize].to_vec(),
        header: h,
        extensions,
        backing_file: None,
        backing_format: None,
        feature_names: Vec::new(),
        bitmaps: None,
        data_file: None,
        crypto: None,
    };
    out.interpret_extensions()?;
    out.read_backing_name(buf, cluster_size)?;
    out.check_features()?;
    out.check_tables(file_len)?;
    Ok(out)
}

fn parse_extensions(buf: &[u8], start: u64, end: u64) -> Result<Vec<Extension>> {
    let mut extensions = Vec::new();
    let mut at = start;
    loop {
        if at + 8 > end {
            // No end marker before the area ends: QEMU accepts this too.
            break;
        }
        let kind = be32(buf, at as usize);
        let len = u64::from(be32(buf, at as usize + 4));
        if kind == ext::END {
            break;
        }
        let data_start = at + 8;
        if len > end - data_start {
            return Err(Error::ExtensionOutOfBounds {
                kind,
                offset: at,
                len,
                end,
            });
        }
        extensions.push(Extension {
            kind,
            data: buf[data_start as usize..(data_start + len) as usize].to_vec(),
        });
        // Data is padded to 8 bytes; the padding may end the area.
        at = data_start + len.next_multiple_of(8);
    }
    Ok(extensions)
}

fn utf8(bytes: &[u8], what: &'static str) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| Error::NotUtf8 { what })
}

impl HeaderCluster {
    fn interpret_extensions(&mut self) -> Result<()> {
        for e in &self.extensions {
            let bad = |reason: &str| Error::BadExtension {
                kind: e.kind,
                reason: reason.to_string(),
            };
            match e.kind {
                ext::BACKING_FORMAT => {
                    self.backing_format = Some(utf8(&e.data, "backing format")?);
                }
                ext::FEATURE_NAMES => {
                    if e.data.len() % 48 != 0 {
                        return Err(bad("length is not a multiple of 48"));
                    }
                    for entry in e.data.chunks_exact(48) {
                        let name = &entry[2..];
                        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(46)];
                        self.feature_names.push(FeatureName {
                            kind: entry[0],
                            bit: entry[1],
                            name: String::from_utf8_lossy(name).into_owned(),
                        });
                    }
                }
                ext::BITMAPS => {
                    if e.data.len() != 24 {
                        return Err(bad("length is not 24"));
                    }
                    if be32(&e.data, 4) != 0 {
                        return Err(bad("reserved field is not zero"));
                    }
                    self.bitmaps = Some(BitmapsExtension {
                        nb_bitmaps: be32(&e.data, 0),
                        directory_size: be64(&e.data, 8),
                        directory_offset: be64(&e.data, 16),
                    });
                }
                ext::DATA_FILE => {
                    self.data_file = Some(utf8(&e.data, "external data file name")?);
                }
                ext::CRYPTO => {
                    if e.data.len() != 16 {
                        return Err(bad("length is not 16"));
                    }
                    self.crypto = Some(CryptoExtension {
                        offset: be64(&e.data, 0),
                        length: be64(&e.data, 8),
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn read_backing_name(&mut self, buf: &[u8], cluster_size: u64) -> Result<()> {
        let h = &self.header;
        if h.backing_file_offset == 0 {
            return Ok(());
        }
        let size = h.backing_file_size as usize;
        if size > MAX_BACKING_NAME {
            return Err(Error::BackingNameTooLong {
                len: size,
                max: MAX_BACKING_NAME,
            });
        }
        let end = h.backing_file_offset.checked_add(size as u64);
        match end {
            Some(end) if end <= cluster_size && end <= buf.len() as u64 => {
                let start = h.backing_file_offset as usize;
                self.backing_file = Some(utf8(&buf[start..end as usize], "backing file name")?);
                Ok(())
            }
            _ => Err(Error::BackingNameOutOfBounds {
                offset: h.backing_file_offset,
                size: h.backing_file_size,
                cluster_size,
            }),
        }
    }

    /// The name the image's feature table gives to an incompatible bit.
    fn feature_name(&self, bit: u8) -> String {
        self.feature_names
            .iter()
            .find(|f| f.kind == 0 && f.bit == bit)
            .map(|f| format!("{} (bit {bit})", f.name))
            .unwrap_or_else(|| format!("unknown incompatible feature bit {bit}"))
    }

    fn check_features(&self) -> Result<()> {
        let unknown = self.header.incompatible_features & !incompat::SUPPORTED;
        if unknown != 0 {
            let names = (0..64u8)
                .filter(|bit| unknown & (1 << bit) != 0)
                .map(|bit| self.feature_name(bit))
                .collect();
            return Err(Error::UnknownIncompatibleFeatures {
                bits: unknown,
                names,
            });
        }
        if self.header.has_data_file() && self.data_file.is_none() {
            // QEMU lets the user name the file at open; bitback needs it.
            return Err(Error::BadExtension {
                kind: ext::DATA_FILE,
                reason: "image has an external data file but does not name it".into(),
            });
        }
        Ok(())
    }

    fn check_tables(&self, file_len: u64) -> Result<()> {
        let h = &self.header;
        let cluster_size = h.cluster_size();
        let needed = h.l1_entries_needed();
        if u64::from(h.l1_size) < needed || u64::from(h.l1_size) > MAX_L1_ENTRIES {
            return Err(Error::BadL1Size {
                size: h.size,
                l1_size: h.l1_size,
                needed,
                max: MAX_L1_ENTRIES,
            });
        }
        let tables = [
            ("L1 table", h.l1_table_offset, u64::from(h.l1_size) * 8),
            (
                "refcount table",
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cluster_size,
            ),
        ];
        for (what, offset, len) in tables {
            if len == 0 {
                continue;
            }
            if offset % cluster_size != 0 {
                return Err(Error::Unaligned {
                    what,
                    offset,
                    cluster_size,
                });
            }
            check_within(what, offset, len, file_len)?;
        }
        Ok(())
    }
}

pub(crate) fn check_within(what: &'static str, offset: u64, len: u64, file_len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Error::PastEnd {
            what,
            offset,
            len,
            file_len,
        }),
    }
}

/// Lays out a header cluster: the fixed header `raw_header` (with the
/// backing fields patched), the extensions, the end marker and the backing
/// name, zero-padded to `cluster_size`.
pub fn serialize(
    raw_header: &[u8],
    extensions: &[Extension],
    backing_file: Option<&str>,
    cluster_size: u64,
) -> Result<Vec<u8>> {
    let mut out = raw_header.to_vec();
    for e in extensions {
        out.extend_from_slice(&e.kind.to_be_bytes());
        out.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
        out.extend_from_slice(&e.data);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out.extend_from_slice(&[0u8; 8]);
    let (offset, size) = match backing_file {
        Some(name) => {
            if name.len() > MAX_BACKING_NAME {
                return Err(Error::BackingNameTooLong {
                    len: name.len(),
                    max: MAX_BACKING_NAME,
                });
            }
            let offset = out.len() as u64;
            out.extend_from_slice(name.as_bytes());
            (offset, name.len() as u32)
        }
        None => (0, 0),
    };
    if out.len() as u64 > cluster_size {
        return Err(Error::HeaderDoesNotFit {
            needed: out.len() as u64,
            cluster_size,
        });
    }
    out[8..16].copy_from_slice(&offset.to_be_bytes());
    out[16..20].copy_from_slice(&size.to_be_bytes());
    out.resize(cluster_size as usize, 0);
    Ok(out)
}
