//! An opened qcow2 image: its header cluster, bitmap directory and, when
//! encrypted, its LUKS header. Read-only; [`super::set_backing`] writes.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::bitmaps::{self, BitmapEntry};
use super::error::{Error, Result};
use super::header::{self, CRYPT_AES, CRYPT_LUKS, HeaderCluster, autoclear, check_within};
use super::luks::{self, LuksInfo};

/// A qcow2 image, parsed and checked.
#[derive(Debug, Clone)]
pub struct Image {
    pub path: PathBuf,
    pub file_len: u64,
    /// Bytes the file occupies on disk (`st_blocks * 512`).
    pub allocated: u64,
    pub hc: HeaderCluster,
    /// The persistent bitmaps. Empty when the bitmaps extension is absent;
    /// see [`Image::bitmaps_consistent`] for whether QEMU would use them.
    pub bitmaps: Vec<BitmapEntry>,
    pub luks: Option<LuksInfo>,
}

/// Whether a named bitmap can carry an incremental backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BitmapStatus {
    pub present: bool,
    /// Marked in use: a QEMU holds it now, or held it and died.
    pub in_use: bool,
    /// The image's bitmaps extension is consistent (autoclear bit 0):
    /// unset, QEMU discards every bitmap in it.
    pub consistent: bool,
}

impl BitmapStatus {
    /// Present, consistent, and not in use.
    pub fn usable(&self) -> bool {
        self.present && self.consistent && !self.in_use
    }
}

pub use crate::source::Source;

/// Reads `len` bytes; `len` must already be checked against a cap.
pub(crate) fn read_at<S: Source + ?Sized>(
    source: &S,
    what: &'static str,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    source
        .read_exact_at(&mut buf, offset)
        .map_err(|source| Error::Reading {
            what,
            offset,
            len: len as u64,
            source,
        })?;
    Ok(buf)
}

impl Image {
    pub fn open(path: &Path) -> Result<Image> {
        let file = File::open(path).map_err(|source| Error::Opening {
            path: path.into(),
            source,
        })?;
        Image::from_file(&file, path)
    }

    pub(crate) fn from_file(file: &File, path: &Path) -> Result<Image> {
        let meta = file.metadata().map_err(|source| Error::Reading {
            what: "file metadata",
            offset: 0,
            len: 0,
            source,
        })?;
        let mut image = Image::parse(file, path)?;
        image.allocated = meta.blocks() * 512;
        Ok(image)
    }

    /// Parses an image from any [`Source`]; `path` only names it (and
    /// anchors a relative backing name). `allocated` is left at 0.
    pub fn parse<S: Source + ?Sized>(file: &S, path: &Path) -> Result<Image> {
        let file_len = file.size().map_err(|source| Error::Reading {
            what: "file size",
            offset: 0,
            len: 0,
            source,
        })?;
        if file_len < u64::from(header::V2_HEADER_LENGTH) {
            return Err(Error::TooShort { len: file_len });
        }
        // Enough for any fixed header; the cluster size comes from it.
        let probe_len = file_len.min(4096) as usize;
        let probe = read_at(file, "header", 0, probe_len)?;
        let bits = header::be32(&probe, 20);
        if !(9..=21).contains(&bits) {
            // Let the parser name the problem (magic first).
            header::parse(&probe, file_len)?;
            return Err(Error::BadClusterBits { bits });
        }
        let first_cluster = file_len.min(1 << bits) as usize;
        let buf = if first_cluster > probe.len() {
            read_at(file, "header cluster", 0, first_cluster)?
        } else {
            probe
        };
        let hc = header::parse(&buf, file_len)?;

        let bitmaps = match hc.bitmaps {
            Some(ext) if ext.nb_bitmaps > 0 => {
                if ext.directory_size > bitmaps::MAX_DIRECTORY_SIZE {
                    return Err(Error::BitmapDirectoryTooLarge {
                        size: ext.directory_size,
                        max: bitmaps::MAX_DIRECTORY_SIZE,
                    });
                }
                if ext.directory_offset % hc.header.cluster_size() != 0 {
                    return Err(Error::Unaligned {
                        what: "bitmap directory",
                        offset: ext.directory_offset,
                        cluster_size: hc.header.cluster_size(),
                    });
                }
                check_within(
                    "bitmap directory",
                    ext.directory_offset,
                    ext.directory_size,
                    file_len,
                )?;
                let dir = read_at(
                    file,
                    "bitmap directory",
                    ext.directory_offset,
                    ext.directory_size as usize,
                )?;
                bitmaps::parse_directory(
                    &dir,
                    ext.nb_bitmaps,
                    hc.header.size,
                    hc.header.cluster_size(),
                    file_len,
                )?
            }
            _ => Vec::new(),
        };

        let luks = match (hc.header.crypt_method, hc.crypto) {
            (CRYPT_LUKS, Some(crypto)) => {
                if crypto.length < luks::HEADER_LEN as u64 {
                    return Err(Error::BadExtension {
                        kind: header::ext::CRYPTO,
                        reason: format!("LUKS header area of {} bytes", crypto.length),
                    });
                }
                check_within(
                    "LUKS header",
                    crypto.offset,
                    luks::HEADER_LEN as u64,
                    file_len,
                )?;
                let buf = read_at(file, "LUKS header", crypto.offset, luks::HEADER_LEN)?;
                Some(luks::parse(&buf)?)
            }
            (CRYPT_LUKS, None) => {
                return Err(Error::BadExtension {
                    kind: header::ext::CRYPTO,
                    reason: "LUKS-encrypted image without a crypto header extension".into(),
                });
            }
            _ => None,
        };

        Ok(Image {
            path: path.into(),
            file_len,
            allocated: 0,
            hc,
            bitmaps,
            luks,
        })
    }

    pub fn header(&self) -> &header::Header {
        &self.hc.header
    }

    pub fn encrypted(&self) -> bool {
        self.hc.header.crypt_method != 0
    }

    /// The image's bitmaps extension is consistent (autoclear bit 0).
    pub fn bitmaps_consistent(&self) -> bool {
        self.hc.bitmaps.is_some() && self.hc.header.autoclear_features & autoclear::BITMAPS != 0
    }

    pub fn bitmap(&self, name: &str) -> Option<&BitmapEntry> {
        self.bitmaps.iter().find(|b| b.name == name)
    }

    pub fn bitmap_status(&self, name: &str) -> BitmapStatus {
        let entry = self.bitmap(name);
        BitmapStatus {
            present: entry.is_some(),
            in_use: entry.is_some_and(|b| b.in_use),
            consistent: self.bitmaps_consistent(),
        }
    }

    /// The backing file's path as QEMU resolves it: a relative name is
    /// appended to this image's path up to its last `/`, with no other
    /// normalization (so `a/./img` and `base` give `a/./base`).
    pub fn full_backing_path(&self) -> Option<PathBuf> {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let name = self.hc.backing_file.as_deref()?;
        if name.starts_with('/') {
            return Some(name.into());
        }
        let image = self.path.as_os_str().as_bytes();
        let prefix = match image.iter().rposition(|&b| b == b'/') {
            Some(slash) => &image[..=slash],
            None => &[][..],
        };
        let mut full = prefix.to_vec();
        full.extend_from_slice(name.as_bytes());
        Some(PathBuf::from(OsStr::from_bytes(&full)))
    }

    /// What `qemu-img info --output=json` reports, under its names.
    pub fn info(&self) -> Info {
        let h = &self.hc.header;
        let compat = if h.version == 2 { "0.10" } else { "1.1" };
        let v3 = h.version == 3;
        let bitmaps = self.bitmaps_consistent().then(|| {
            self.bitmaps
                .iter()
                .map(|b| InfoBitmap {
                    name: b.name.clone(),
                    granularity: b.granularity,
                    flags: [(b.in_use, "in-use"), (b.auto, "auto")]
                        .into_iter()
                        .filter_map(|(on, flag)| on.then_some(flag))
                        .collect(),
                })
                .collect()
        });
        let data = Qcow2Data {
            compat,
            compression_type: if h.compression_type == 1 {
                "zstd"
            } else {
                "zlib"
            },
            lazy_refcounts: v3
                .then_some(h.compatible_features & header::compat::LAZY_REFCOUNTS != 0),
            bitmaps,
            refcount_bits: 1 << h.refcount_order,
            data_file: self.hc.data_file.clone(),
            data_file_raw: self
                .hc
                .data_file
                .as_ref()
                .map(|_| h.autoclear_features & autoclear::DATA_FILE_RAW != 0),
            encrypt: match h.crypt_method {
                CRYPT_LUKS => self.luks.clone().map(Encrypt::Luks),
                CRYPT_AES => Some(Encrypt::Aes { format: "aes" }),
                _ => None,
            },
            corrupt: v3.then_some(h.corrupt()),
            extended_l2: v3.then_some(h.extended_l2()),
        };
        Info {
            // QEMU counts whole 512-byte sectors.
            virtual_size: h.size / 512 * 512,
            filename: self.path.display().to_string(),
            cluster_size: h.cluster_size(),
            format: "qcow2",
            actual_size: self.allocated,
            encrypted: self.encrypted().then_some(true),
            format_specific: FormatSpecific {
                kind: "qcow2",
                data,
            },
            backing_filename: self.hc.backing_file.clone(),
            full_backing_filename: self.full_backing_path().map(|p| p.display().to_string()),
            backing_filename_format: self
                .hc
                .backing_file
                .as_ref()
                .and(self.hc.backing_format.clone()),
            dirty_flag: h.dirty(),
            bitback: Details {
                version: h.version,
                header_length: h.header_length,
                l1_size: h.l1_size,
                l1_table_offset: h.l1_table_offset,
                refcount_table_offset: h.refcount_table_offset,
                refcount_table_clusters: h.refcount_table_clusters,
                nb_snapshots: h.nb_snapshots,
                incompatible_features: h.incompatible_features,
                compatible_features: h.compatible_features,
                autoclear_features: h.autoclear_features,
                bitmaps_consistent: self.bitmaps_consistent(),
                extensions: self
                    .hc
                    .extensions
                    .iter()
                    .map(|e| ExtensionInfo {
                        kind: format!("{:#010x}", e.kind),
                        length: e.data.len(),
                    })
                    .collect(),
                file_length: self.file_len,
            },
        }
    }
}

/// `qemu-img info --output=json`'s fields, plus bitback's own details.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Info {
    pub virtual_size: u64,
    pub filename: String,
    pub cluster_size: u64,
    pub format: &'static str,
    pub actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    pub format_specific: FormatSpecific,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    pub dirty_flag: bool,
    /// Header details qemu-img does not show.
    pub bitback: Details,
}

#[derive(Debug, Clone, Serialize)]
pub struct FormatSpecific {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub data: Qcow2Data,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Data {
    pub compat: &'static str,
    pub compression_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<InfoBitmap>>,
    pub refcount_bits: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<Encrypt>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Encrypt {
    Luks(LuksInfo),
    Aes { format: &'static str },
}

#[derive(Debug, Clone, Serialize)]
pub struct InfoBitmap {
    pub flags: Vec<&'static str>,
    pub name: String,
    pub granularity: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Details {
    pub version: u32,
    pub header_length: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub bitmaps_consistent: bool,
    pub extensions: Vec<ExtensionInfo>,
    pub file_length: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExtensionInfo {
    #[serde(rename = "type")]
    pub kind: String,
    pub length: usize,
}
