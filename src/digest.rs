//! BLAKE3 of whole files on every core.
//!
//! BLAKE3 is a tree hash: a file splits into aligned pieces whose subtree
//! hashes (chaining values) can be computed apart and merged. Each thread
//! reads and hashes whole pieces with `pread`, so reading is parallel too;
//! the result is the same hash as one sequential pass.

use std::fmt;
use std::fs::File;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::source::Source;
use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

/// Bytes a thread hashes at a time: a power of two, so every piece starts
/// on a subtree boundary.
const PIECE: u64 = 64 << 20;
/// Bytes read per call.
const READ: usize = 1 << 20;

/// What proves a file, as manifests record it (docs/repository.md, "What
/// proves a file"). Compared in constant time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Digest {
    /// `blake3:<hex>`: BLAKE3 of every byte of the file.
    Whole(blake3::Hash),
    /// `blake3-layout:<hex>`: of every byte of a qcow2 file but its data,
    /// with the data's ranges and the file's length
    /// (`qcow2::layout_digest`); the file's cluster map proves the data.
    Layout(blake3::Hash),
}

/// The prefix of a [`Digest::Whole`].
pub const WHOLE: &str = "blake3:";
/// The prefix of a [`Digest::Layout`].
pub const LAYOUT: &str = "blake3-layout:";

impl Digest {
    pub fn is_layout(&self) -> bool {
        matches!(self, Digest::Layout(_))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Digest::Whole(hash) => write!(f, "{WHOLE}{}", hash.to_hex()),
            Digest::Layout(hash) => write!(f, "{LAYOUT}{}", hash.to_hex()),
        }
    }
}

impl std::str::FromStr for Digest {
    type Err = String;

    fn from_str(text: &str) -> Result<Digest, String> {
        let (make, hex): (fn(blake3::Hash) -> Digest, &str) = if let Some(hex) =
            text.strip_prefix(LAYOUT)
        {
            (Digest::Layout, hex)
        } else if let Some(hex) = text.strip_prefix(WHOLE) {
            (Digest::Whole, hex)
        } else {
            return Err(format!(
                "digest {text:?} is neither a whole file's ({WHOLE}) nor a layout digest ({LAYOUT})"
            ));
        };
        blake3::Hash::from_hex(hex)
            .map(make)
            .map_err(|_| format!("digest {text:?} does not end in 64 hex digits"))
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Digest, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// BLAKE3 of a whole file.
pub fn file(path: &Path) -> std::io::Result<Digest> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    Ok(Digest::Whole(hash(&file, len, PIECE, threads)?))
}

/// BLAKE3 of every byte `source` holds (a bucket's object: its pieces
/// read by ranged GETs on several threads).
pub fn of_source<S: Source + Sync + ?Sized>(source: &S) -> std::io::Result<Digest> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    Ok(Digest::Whole(hash(source, source.size()?, PIECE, threads)?))
}

fn hash<S: Source + Sync + ?Sized>(
    file: &S,
    len: u64,
    piece: u64,
    threads: usize,
) -> std::io::Result<blake3::Hash> {
    hash_with(file, len, piece, threads, &[])
}

/// [`hash`], where `known[i]`, when set, is piece `i`'s chaining value
/// already (that piece is not read).
fn hash_with<S: Source + Sync + ?Sized>(
    file: &S,
    len: u64,
    piece: u64,
    threads: usize,
    known: &[Option<ChainingValue>],
) -> std::io::Result<blake3::Hash> {
    debug_assert!(piece.is_power_of_two() && piece >= 1024);
    if len <= piece {
        let mut hasher = blake3::Hasher::new();
        feed(file, 0, len, &mut hasher)?;
        return Ok(hasher.finalize());
    }
    let pieces = len.div_ceil(piece) as usize;
    let cvs = Mutex::new(
        (0..pieces)
            .map(|i| known.get(i).copied().flatten().unwrap_or([0u8; 32]))
            .collect::<Vec<_>>(),
    );
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.clamp(1, pieces))
            .map(|_| {
                scope.spawn(|| -> std::io::Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= pieces {
                            return Ok(());
                        }
                        if known.get(i).is_some_and(Option::is_some) {
                            continue;
                        }
                        let start = i as u64 * piece;
                        let mut hasher = blake3::Hasher::new();
                        hasher.set_input_offset(start);
                        feed(file, start, piece.min(len - start), &mut hasher)?;
                        let cv = hasher.finalize_non_root();
                        cvs.lock().unwrap_or_else(|e| e.into_inner())[i] = cv;
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("a hashing thread panicked")))
        })
    })?;
    let cvs = cvs.into_inner().unwrap_or_else(|e| e.into_inner());
    let left = left_subtree_len(len);
    Ok(merge_subtrees_root(
        &merged(&cvs, 0, left, piece),
        &merged(&cvs, left, len - left, piece),
        Mode::Hash,
    ))
}

/// A file's digest computed as it is written: bytes appended at its end
/// in order are hashed as they come, a 64 MiB piece at a time; at the end
/// only the pieces that were not (any rewritten in place) are read back.
///
/// A file whose first `head` bytes are written last (a qcow2 header) has
/// its first piece hashed in flight too, as BLAKE3 subtrees `[head,
/// 2 head)`, `[2 head, 4 head)`, ... up to the piece's end: only the head
/// is read back. A small file (a short incremental) is then hashed
/// without reading back more than its head.
pub(crate) struct InFlight {
    /// The piece size (a power of two): [`PIECE`], smaller in tests.
    piece: u64,
    cvs: Vec<Option<ChainingValue>>,
    /// The piece being fed (from its first byte, without a gap).
    current: Option<(usize, blake3::Hasher)>,
    /// The end of what was appended.
    end: u64,
    /// The first piece's subtrees after the head (0: none kept).
    head: Head,
}

/// The first piece, hashed in flight after its head: the complete
/// subtrees in order, and the one being fed.
#[derive(Default)]
struct Head {
    /// A power of two from 1 KiB to the piece size; 0 when unused.
    len: u64,
    blocks: Vec<ChainingValue>,
    current: Option<blake3::Hasher>,
    /// A write into the piece other than an append: read it back whole.
    spoiled: bool,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            piece: PIECE,
            cvs: Vec::new(),
            current: None,
            end: 0,
            head: Head::default(),
        }
    }
}

impl InFlight {
    /// For a file whose first `head` bytes are written last, its bytes
    /// after them appended from `head` on. A `head` that is no power of
    /// two from 1 KiB to a piece hashes the first piece at the end.
    pub(crate) fn with_head(head: u64) -> InFlight {
        let mut flight = InFlight::default();
        if head.is_power_of_two() && (1024..=flight.piece).contains(&head) {
            flight.head.len = head;
            flight.end = head;
        }
        flight
    }

    /// Feeds appended bytes at `at` (within the first piece) to its
    /// subtrees.
    fn feed_head(&mut self, mut at: u64, mut rest: &[u8]) {
        while !rest.is_empty() && !self.head.spoiled {
            let start = self.head.len << self.head.blocks.len();
            let end = (2 * start).min(self.piece);
            if at < start || at >= end {
                self.head.spoiled = true;
                return;
            }
            let hasher = self.head.current.get_or_insert_with(|| {
                let mut h = blake3::Hasher::new();
                h.set_input_offset(start);
                h
            });
            let n = (rest.len() as u64).min(end - at) as usize;
            hasher.update(&rest[..n]);
            at += n as u64;
            rest = &rest[n..];
            if at == end
                && let Some(done) = self.head.current.take()
            {
                self.head.blocks.push(done.finalize_non_root());
            }
        }
    }

    /// The first piece's value from its head's bytes and its subtrees,
    /// where they cover it to `len` (the file's length): the piece's
    /// chaining value in a longer file, the root of a file of one piece.
    fn head_value(&mut self, file: &File, len: u64) -> std::io::Result<Option<HeadValue>> {
        let head = self.head.len;
        let piece_end = len.min(self.piece);
        if head == 0 || self.head.spoiled || len <= head || self.end.min(self.piece) != piece_end {
            return Ok(None);
        }
        let mut bytes = vec![0u8; head as usize];
        file.read_exact_at(&mut bytes, 0)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&bytes);
        let head_cv = hasher.finalize_non_root();
        let partial = self.head.current.take().map(|h| h.finalize_non_root());
        // Folds the head and the first `n` blocks: the value of [0, head << n).
        let fold = |n: usize| {
            self.head.blocks[..n].iter().fold(head_cv, |acc, cv| {
                merge_subtrees_non_root(&acc, cv, Mode::Hash)
            })
        };
        if len > self.piece {
            return Ok(Some(HeadValue::Piece(fold(self.head.blocks.len()))));
        }
        // One piece: the root over [0, left) and [left, len), where left is
        // the start of the last block (complete or not).
        let n = self.head.blocks.len();
        let (left, right) = match (partial, self.head.blocks.last()) {
            (Some(cv), _) => (fold(n), cv),
            (None, Some(last)) => (fold(n - 1), *last),
            (None, None) => return Ok(None),
        };
        Ok(Some(HeadValue::Root(merge_subtrees_root(
            &left,
            &right,
            Mode::Hash,
        ))))
    }

    /// `data` was written at `offset`: appended (at the end so far), or
    /// over earlier bytes or past a gap, whose pieces are then read back.
    pub(crate) fn written(&mut self, offset: u64, data: &[u8]) {
        let Some(last) = (offset + data.len() as u64).checked_sub(1) else {
            return;
        };
        if offset != self.end {
            // The head, written last, is read back at the end anyway.
            if self.head.len > 0 && last < self.head.len {
                return;
            }
            if offset > self.end {
                // A gap the feed did not see.
                self.current = None;
            }
            for i in offset / self.piece..=last / self.piece {
                self.spoil(i as usize);
            }
            self.end = self.end.max(last + 1);
            return;
        }
        // Appended: fed piece by piece. A piece is fed only from its first
        // byte on (the first piece never: its header comes last), and the
        // feed stays contiguous, since anything else drops it.
        let mut at = offset;
        for chunk in split_at_pieces(offset, data, self.piece) {
            let i = (at / self.piece) as usize;
            if i == 0 && self.head.len > 0 {
                self.feed_head(at, chunk);
                at += chunk.len() as u64;
                continue;
            }
            if at % self.piece == 0 && i > 0 {
                let mut hasher = blake3::Hasher::new();
                hasher.set_input_offset(at);
                self.current = Some((i, hasher));
            }
            match &mut self.current {
                Some((j, hasher)) if *j == i => {
                    hasher.update(chunk);
                }
                _ => {}
            }
            at += chunk.len() as u64;
            if at % self.piece == 0 {
                self.complete(i);
            }
        }
        self.end = at;
    }

    /// Piece `i`'s feed, if it is the one fed, is done.
    fn complete(&mut self, i: usize) {
        if let Some((j, hasher)) = self.current.take() {
            if j == i {
                if self.cvs.len() <= i {
                    self.cvs.resize(i + 1, None);
                }
                self.cvs[i] = Some(hasher.finalize_non_root());
            } else {
                self.current = Some((j, hasher));
            }
        }
    }

    fn spoil(&mut self, i: usize) {
        if i == 0 {
            self.head.spoiled = true;
        }
        if let Some(cv) = self.cvs.get_mut(i) {
            *cv = None;
        }
        if self.current.as_ref().is_some_and(|(j, _)| *j == i) {
            self.current = None;
        }
    }

    /// `blake3:<hex>` of the whole file (`len` bytes), reading back only
    /// what was not hashed in flight. Returns it with the bytes read.
    pub(crate) fn finish(mut self, file: &File, len: u64) -> std::io::Result<(Digest, u64)> {
        // The last piece, fed to the file's end, is complete too (a file
        // of one piece is hashed whole: a root, not a subtree).
        if self.end == len && len > self.piece {
            self.complete(((len - 1) / self.piece) as usize);
        }
        let pieces = len.div_ceil(self.piece) as usize;
        self.cvs.resize(pieces, None);
        match self.head_value(file, len)? {
            Some(HeadValue::Root(hash)) => {
                return Ok((Digest::Whole(hash), self.head.len));
            }
            Some(HeadValue::Piece(cv)) => self.cvs[0] = Some(cv),
            None => {}
        }
        let read: u64 = (0..pieces)
            .filter(|&i| self.cvs[i].is_none())
            .map(|i| self.piece.min(len - i as u64 * self.piece))
            .sum();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let hash = hash_with(file, len, self.piece, threads, &self.cvs)?;
        // The head's bytes were read for the first piece's value.
        let read = match self.cvs[0].is_some() && self.head.len > 0 && !self.head.spoiled {
            true => read + self.head.len,
            false => read,
        };
        Ok((Digest::Whole(hash), read))
    }
}

/// What the first piece's subtrees give: its chaining value, or the
/// whole file's root when the file is that piece.
enum HeadValue {
    Piece(ChainingValue),
    Root(blake3::Hash),
}

/// `data`, written at `offset`, cut where pieces of `piece` bytes end.
fn split_at_pieces(offset: u64, data: &[u8], piece: u64) -> impl Iterator<Item = &[u8]> {
    let mut at = offset;
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = rest.len().min((piece - at % piece) as usize);
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        at += n as u64;
        Some(chunk)
    })
}

/// The chaining value of the subtree over `len` bytes at `start`, from the
/// pieces' values. A subtree larger than a piece splits at a power of two
/// at least a piece long, so always between pieces.
fn merged(cvs: &[ChainingValue], start: u64, len: u64, piece: u64) -> ChainingValue {
    if len <= piece {
        return cvs[(start / piece) as usize];
    }
    let left = left_subtree_len(len);
    merge_subtrees_non_root(
        &merged(cvs, start, left, piece),
        &merged(cvs, start + left, len - left, piece),
        Mode::Hash,
    )
}

fn feed<S: Source + ?Sized>(
    file: &S,
    start: u64,
    len: u64,
    hasher: &mut blake3::Hasher,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; READ.min(len as usize)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(READ as u64) as usize;
        file.read_exact_at(&mut buf[..n], start + done)?;
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A xorshift generator: test bytes without a crate.
    fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    #[test]
    fn equals_one_sequential_pass_at_every_boundary() {
        let piece = 4096;
        let mut data = vec![0u8; 9 * piece as usize + 3000];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let p = piece as usize;
        for len in [
            0,
            1,
            1023,
            1024,
            1025,
            p - 1,
            p,
            p + 1,
            2 * p,
            2 * p + 1,
            3 * p,
            5 * p - 7,
            8 * p,
            8 * p + 1,
            9 * p + 3000,
        ] {
            let mut f = File::create(&path).unwrap();
            f.write_all(&data[..len]).unwrap();
            drop(f);
            let f = File::open(&path).unwrap();
            for threads in [1, 2, 3] {
                assert_eq!(
                    hash(&f, len as u64, piece, threads).unwrap(),
                    blake3::hash(&data[..len]),
                    "length {len}, {threads} threads"
                );
            }
        }
    }

    #[test]
    fn in_flight_equals_one_pass_over_appends_rewrites_and_a_late_header() {
        let piece = 4096u64;
        let mut rnd = xorshift(0x9e37_79b9_7f4a_7c15u64);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        for round in 0..40 {
            let mut flight = InFlight {
                piece,
                ..InFlight::default()
            };
            let mut content: Vec<u8> = Vec::new();
            let header = 512usize;
            content.resize(header, 0);
            // Appends of odd sizes, some rewrites behind the end.
            for _ in 0..(5 + rnd() % 30) {
                let n = 1 + (rnd() % 6000) as usize;
                let bytes: Vec<u8> = (0..n).map(|_| rnd() as u8).collect();
                if rnd() % 4 == 0 && content.len() > header + n {
                    let at = header + (rnd() as usize % (content.len() - header - n));
                    content[at..at + n].copy_from_slice(&bytes);
                    flight.written(at as u64, &bytes);
                } else {
                    let at = content.len();
                    content.extend_from_slice(&bytes);
                    flight.written(at as u64, &bytes);
                }
            }
            // The header, written last at 0.
            let head: Vec<u8> = (0..header).map(|_| rnd() as u8).collect();
            content[..header].copy_from_slice(&head);
            flight.written(0, &head);
            std::fs::write(&path, &content).unwrap();
            let f = File::open(&path).unwrap();
            let (digest, read) = flight.finish(&f, content.len() as u64).unwrap();
            assert_eq!(
                digest,
                Digest::Whole(blake3::hash(&content)),
                "round {round}, {} bytes",
                content.len()
            );
            assert!(read <= content.len() as u64);
        }
    }

    #[test]
    fn in_flight_reads_back_only_what_it_could_not_hash() {
        let piece = 4096u64;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let content: Vec<u8> = (0..10 * piece).map(|i| (i * 7 % 251) as u8).collect();
        let mut flight = InFlight {
            piece,
            ..InFlight::default()
        };
        // Everything after the first piece appended in order, then the
        // first piece, then one rewrite in piece 5.
        flight.written(0, &vec![0u8; piece as usize]);
        flight.written(piece, &content[piece as usize..]);
        flight.written(0, &content[..piece as usize]);
        flight.written(
            5 * piece + 10,
            &content[(5 * piece + 10) as usize..(5 * piece + 20) as usize],
        );
        std::fs::write(&path, &content).unwrap();
        let f = File::open(&path).unwrap();
        let (digest, read) = flight.finish(&f, content.len() as u64).unwrap();
        assert_eq!(digest, Digest::Whole(blake3::hash(&content)));
        assert_eq!(read, 2 * piece, "the first piece and the rewritten one");
    }

    #[test]
    fn in_flight_with_a_head_reads_back_only_the_head() {
        let piece = 16384u64;
        let mut rnd = xorshift(0x1234_5678_9abc_def1u64);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        for head in [1024u64, 2048, 4096, 16384] {
            let h = head as usize;
            // Every boundary of the head's subtrees and the pieces, and
            // around them.
            let mut lengths = vec![h + 1, 2 * h, 2 * h + 1, 3 * h, 4 * h - 1, 4 * h];
            for p in [1u64, 2, 3, 5] {
                let at = (p * piece) as usize;
                lengths.extend([at - 1, at, at + 1, at + h]);
            }
            for (round, &len) in lengths.iter().enumerate() {
                if len <= h {
                    continue;
                }
                let content: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
                let mut flight = InFlight {
                    piece,
                    ..InFlight::default()
                };
                flight.head.len = head;
                flight.end = head;
                let rewrite = round % 3 == 2 && len.min(piece as usize) > h;
                let mut at = h;
                while at < len {
                    let n = (1 + (rnd() % 3000) as usize).min(len - at);
                    flight.written(at as u64, &content[at..at + n]);
                    at += n;
                }
                if rewrite {
                    // A rewrite in the first piece: read back, still right.
                    let at = h + (rnd() as usize % (len.min(piece as usize) - h));
                    flight.written(at as u64, &content[at..at + 1]);
                }
                flight.written(0, &content[..h]);
                std::fs::write(&path, &content).unwrap();
                let f = File::open(&path).unwrap();
                let (digest, read) = flight.finish(&f, len as u64).unwrap();
                assert_eq!(
                    digest,
                    Digest::Whole(blake3::hash(&content)),
                    "head {head}, {len} bytes, rewrite {rewrite}"
                );
                if !rewrite {
                    assert_eq!(read, head, "head {head}, {len} bytes");
                }
            }
        }
    }

    #[test]
    fn a_file_shorter_than_its_length_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let f = File::open(&path).unwrap();
        assert!(hash(&f, 20_000, 4096, 2).is_err());
    }
}
