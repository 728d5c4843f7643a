//! Compressed clusters: deflate (compression type 0, raw deflate without a
//! zlib header, QEMU's default) and zstd (type 1, one or more zstd frames).
//! A compressed cluster's bytes are followed by whatever lies after them
//! in the file, so decompression stops when the cluster is full, not when
//! the input ends; input that ends first is an error.

use std::io;

use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

use super::error::{Error, Result};

/// A qcow2 image's compression type (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Deflate,
    Zstd,
}

impl Compression {
    /// The header's `compression_type` value.
    pub fn type_byte(self) -> u8 {
        match self {
            Compression::Deflate => 0,
            Compression::Zstd => 1,
        }
    }

    pub fn from_type_byte(found: u8) -> Result<Compression> {
        match found {
            0 => Ok(Compression::Deflate),
            1 => Ok(Compression::Zstd),
            found => Err(Error::BadCompressionType { found }),
        }
    }
}

/// Fills `out` (one cluster, or the disk's last, shorter one) from the
/// compressed bytes at the start of `input`.
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> io::Result<()> {
    match kind {
        Compression::Deflate => inflate(input, out),
        Compression::Zstd => unzstd(input, out),
    }
}

fn corrupt(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn inflate(input: &[u8], out: &mut [u8]) -> io::Result<()> {
    use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};
    let mut state = DecompressorOxide::new();
    let (status, _, written) = decompress(
        &mut state,
        input,
        out,
        0,
        inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    );
    if written == out.len() {
        return Ok(());
    }
    Err(corrupt(format!(
        "a deflate cluster gave {written} of {} bytes ({status:?})",
        out.len()
    )))
}

fn unzstd(input: &[u8], out: &mut [u8]) -> io::Result<()> {
    let mut decoder = Decoder::new()?;
    let mut src = InBuffer::around(input);
    let want = out.len();
    let mut dst = OutBuffer::around(out);
    // A cluster may be several frames; bytes after the last are not ours.
    while dst.pos() < want {
        let before = (src.pos(), dst.pos());
        decoder
            .run(&mut src, &mut dst)
            .map_err(|e| corrupt(format!("a zstd cluster does not decompress: {e}")))?;
        if (src.pos(), dst.pos()) == before {
            return Err(corrupt(format!(
                "a zstd cluster gave {} of {want} bytes",
                dst.pos()
            )));
        }
    }
    Ok(())
}

/// Compresses clusters with zstd, as QEMU's qcow2 driver stores them.
pub struct Compressor {
    zstd: zstd::bulk::Compressor<'static>,
}

impl Compressor {
    /// zstd at `level` (1 to 19; 3 is zstd's default).
    pub fn new(level: i32) -> io::Result<Compressor> {
        Ok(Compressor {
            zstd: zstd::bulk::Compressor::new(level)?,
        })
    }

    /// Appends `data` compressed to `out` and returns its length, or
    /// appends nothing and returns `None` when that saves nothing: a
    /// compressed cluster must be shorter than a cluster (QEMU's rule),
    /// else it is stored as it is.
    pub fn append(&mut self, data: &[u8], cluster_size: usize, out: &mut Vec<u8>) -> Option<usize> {
        let start = out.len();
        let room = cluster_size - 1;
        out.resize(start + room, 0);
        let result = self.zstd.compress_to_buffer(data, &mut out[start..]);
        match result {
            Ok(n) if n < room => {
                out.truncate(start + n);
                Some(n)
            }
            _ => {
                out.truncate(start);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_round_trip_with_bytes_after_it() {
        let cs = 64 << 10;
        let data: Vec<u8> = (0..cs).map(|i| (i / 100) as u8).collect();
        let mut c = Compressor::new(3).unwrap();
        let mut stored = Vec::new();
        c.append(&data, cs, &mut stored).unwrap();
        assert!(stored.len() < cs / 4);
        stored.extend_from_slice(&[0xAB; 700]);
        let mut out = vec![0u8; cs];
        decompress(Compression::Zstd, &stored, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn random_data_is_not_compressed() {
        let cs = 64 << 10;
        let mut x = 0x1234_5678_9abc_def0u64;
        let data: Vec<u8> = (0..cs)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut out = vec![7u8];
        assert!(
            Compressor::new(3)
                .unwrap()
                .append(&data, cs, &mut out)
                .is_none()
        );
        assert_eq!(out, [7]);
    }

    #[test]
    fn truncated_input_is_an_error() {
        let cs = 64 << 10;
        let data: Vec<u8> = (0..cs).map(|i| (i % 251) as u8).collect();
        let mut c = Compressor::new(3).unwrap();
        let mut stored = Vec::new();
        c.append(&data, cs, &mut stored).unwrap();
        let mut out = vec![0u8; cs];
        let err = decompress(Compression::Zstd, &stored[..stored.len() / 2], &mut out);
        assert!(err.is_err());
        assert!(decompress(Compression::Deflate, &[0xff; 40], &mut out).is_err());
    }
}
