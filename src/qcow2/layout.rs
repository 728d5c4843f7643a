//! The digest of an image's layout: every byte of the file except its
//! guest data, so that a per-cluster digest of that data (a cluster map)
//! and this digest together prove every byte, each byte hashed once.
//!
//! The data ranges are what the image's own L2 tables point at: each
//! plain data cluster's host bytes (of its guest length) and each
//! compressed cluster's host sectors, merged where they touch. The
//! digest, `blake3-layout:<hex>`, is BLAKE3 of three parts, in order:
//!
//! ```text
//!  32 bytes  BLAKE3 of the bytes outside the data ranges, in file order
//!  32 bytes  BLAKE3 of the data ranges, each as offset and length (u64 LE)
//!   8 bytes  the file's length (u64 LE)
//! ```
//!
//! The tables are among the bytes hashed, so the ranges they name are
//! bound too: a changed table changes the first part, a range moved the
//! second. What this does not prove is the data's bytes, and bytes of a
//! compressed cluster's last sector past its data (unread by a reader
//! that stops at the data's end); the cluster map proves the data.

use std::io;

use super::error::{Error, Result};
use super::image::{Image, Source};
use super::map::{Kind, walk};
use crate::digest::Digest;

/// Ranges kept before they are sorted and merged: bounds the memory of a
/// file of scattered data (compressed clusters one range each).
const MERGE_AT: usize = 1 << 20;
/// Bytes read per call.
const READ: u64 = 1 << 20;

/// The layout digest of `image` read from `file`, and how many bytes of
/// the file it read outside the tables' walk.
pub fn layout_digest<S: Source + ?Sized>(file: &S, image: &Image) -> Result<(Digest, u64)> {
    let len = image.file_len;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    walk(file, image, |e| {
        let range = match (e.kind, e.offset) {
            (Kind::Data, Some(host)) => (host, host.saturating_add(e.length)),
            (Kind::Compressed, Some(host)) => {
                (host, host.saturating_add(e.compressed_length.unwrap_or(0)))
            }
            _ => return Ok(()),
        };
        ranges.push((range.0.min(len), range.1.min(len)));
        if ranges.len() >= MERGE_AT {
            merge(&mut ranges);
        }
        Ok(())
    })?;
    merge(&mut ranges);

    let mut outside = blake3::Hasher::new();
    let mut skipped = blake3::Hasher::new();
    let mut buf = vec![0u8; READ as usize];
    let mut read = 0u64;
    let mut at = 0u64;
    let mut feed = |from: u64, to: u64| -> Result<()> {
        let mut pos = from;
        while pos < to {
            let n = (to - pos).min(READ) as usize;
            file.read_exact_at(&mut buf[..n], pos)
                .map_err(|source| reading(pos, n, source))?;
            outside.update(&buf[..n]);
            pos += n as u64;
        }
        read += to - from;
        Ok(())
    };
    for &(start, stop) in ranges.iter().chain(std::iter::once(&(len, len))) {
        feed(at, start)?;
        if start < stop {
            skipped.update(&start.to_le_bytes());
            skipped.update(&(stop - start).to_le_bytes());
        }
        at = stop;
    }
    let mut root = blake3::Hasher::new();
    root.update(outside.finalize().as_bytes());
    root.update(skipped.finalize().as_bytes());
    root.update(&len.to_le_bytes());
    Ok((Digest::Layout(root.finalize()), read))
}

fn reading(offset: u64, len: usize, source: io::Error) -> Error {
    Error::Reading {
        what: "the image, for its layout digest",
        offset,
        len: len as u64,
        source,
    }
}

/// Sorts `ranges` and merges those that overlap or touch; empty ones go.
fn merge(ranges: &mut Vec<(u64, u64)>) {
    ranges.retain(|&(a, b)| a < b);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(a, b) in ranges.iter() {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    *ranges = out;
}

#[cfg(test)]
mod tests {
    use super::merge;

    #[test]
    fn ranges_merge_where_they_overlap_or_touch() {
        let mut r = vec![(10, 20), (0, 5), (5, 7), (15, 30), (40, 40), (31, 32)];
        merge(&mut r);
        assert_eq!(r, vec![(0, 7), (10, 30), (31, 32)]);
    }
}
