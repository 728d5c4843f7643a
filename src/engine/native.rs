//! The native copy of a chain: the cluster tables of every file (the
//! qcow2 module) say, for each guest range, which file is the newest to
//! hold it; only those ranges are read, each once, with positioned reads
//! spread over a few threads, and written where the caller says (a raw
//! file's own offset, or a qcow2 restore's preallocated clusters).
//! Compressed clusters (deflate or zstd) are decompressed by the copy
//! threads. A file's bytes come from a [`ChainSource`]: a file of a
//! directory repository, or an object version in a bucket.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use anyhow::{Context, bail};

use crate::cluster_map::Baseline;
use crate::qcow2::{self, Image, Kind};

/// A guest range to copy from one file of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    guest: u64,
    len: u64,
    file: usize,
    host: u64,
    /// A compressed cluster at `host`: its bytes are decompressed and the
    /// segment's part of them copied.
    packed: Option<Packed>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packed {
    /// The compressed bytes' length bound (whole sectors).
    len: u64,
    /// Where the segment starts within the cluster.
    skip: u64,
}

/// Guest ranges already decided by a newer file: start -> end, disjoint.
#[derive(Default)]
struct Covered(BTreeMap<u64, u64>);

impl Covered {
    /// The parts of [start, end) not covered yet, in order.
    fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        let mut at = start;
        // A range starting before `start` may reach into it.
        if let Some((_, &e)) = self.0.range(..=start).next_back()
            && e > at
        {
            at = e;
        }
        for (&s, &e) in self.0.range(start..end) {
            if s > at {
                gaps.push((at, s.min(end)));
            }
            at = at.max(e);
            if at >= end {
                break;
            }
        }
        if at < end {
            gaps.push((at, end));
        }
        gaps
    }

    fn insert(&mut self, start: u64, end: u64) {
        let mut start = start;
        let mut end = end;
        if let Some((&s, &e)) = self.0.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
        }
        let overlapping: Vec<u64> = self.0.range(start..=end).map(|(&s, _)| s).collect();
        for s in overlapping {
            if let Some(e) = self.0.remove(&s) {
                end = end.max(e);
            }
        }
        self.0.insert(start, end);
    }
}

/// Where the bytes of one file of a chain come from.
pub(super) trait ChainSource: qcow2::Source + Send + Sync {
    /// What errors call it: a path, or an object's URL and version.
    fn name(&self) -> String;

    /// Reads `buf` (data: at most [`CHUNK`], or a [`Copier`]'s span) at
    /// `offset`.
    fn read_chunk(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

/// A chain file of a directory repository, opened once (never through a
/// symlink), with an O_DIRECT handle for its data where the file system
/// takes one (a restore does not fill the page cache with a backup); a
/// piece already in the page cache is read from there.
pub(super) struct LocalFile {
    path: PathBuf,
    file: File,
    direct: Option<File>,
    size: u64,
}

impl LocalFile {
    pub(super) fn open(path: &Path) -> anyhow::Result<LocalFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let size =
            qcow2::Source::size(&file).with_context(|| format!("sizing {}", path.display()))?;
        Ok(LocalFile {
            path: path.into(),
            direct: crate::direct::reopen_read(&file),
            file,
            size,
        })
    }
}

impl qcow2::Source for LocalFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }

    fn size(&self) -> std::io::Result<u64> {
        Ok(self.size)
    }
}

impl ChainSource for LocalFile {
    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn read_chunk(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        // Around the page cache, unless the bytes are there already.
        let direct = self
            .direct
            .as_ref()
            .filter(|_| !crate::direct::resident(&self.file, offset, buf.len()));
        crate::direct::read_exact_at(&self.file, direct, buf, offset)
    }
}

/// A chain mapped for a native copy: for each guest range the newest file
/// holding it, and the files opened once (the copy reads through the same
/// sources the map was made from).
pub(super) struct Mapped<'a> {
    /// Full first.
    sources: Vec<Box<dyn ChainSource + 'a>>,
    segments: Vec<Segment>,
    /// Each file's compression type and cluster size (for its compressed
    /// clusters).
    packing: Vec<(qcow2::Compression, u64)>,
}

/// How a native copy runs.
pub(super) struct Copier<'a> {
    pub threads: usize,
    pub progress: Option<&'a super::progress::ProgressSink>,
    /// The chain's cluster maps laid over each other: every cluster read
    /// is checked against them, and every cluster they hold data for must
    /// be read.
    pub check: Option<&'a Baseline>,
    /// Read the files in spans of up to this many bytes, each one read
    /// for all the chunks it holds (an object store's request costs more
    /// than its bytes); `None`: each chunk on its own.
    pub span: Option<u64>,
}

/// The most bytes between two chunks a span reads over, in vain.
const SPAN_GAP: u64 = 1 << 20;

/// Chunks (sorted by file and host offset) grouped into spans of at most
/// `span` bytes of one file, with gaps of at most [`SPAN_GAP`]; a
/// compressed cluster is a span of its own. The ranges of `chunks`.
fn spans(chunks: &[Segment], span: Option<u64>) -> Vec<std::ops::Range<usize>> {
    let mut spans: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        if let (Some(limit), Some(last)) = (span, spans.last_mut()) {
            let (first, prev) = (&chunks[last.start], &chunks[i - 1]);
            let joins = c.packed.is_none()
                && first.packed.is_none()
                && c.file == first.file
                && c.host >= prev.host + prev.len
                && c.host - (prev.host + prev.len) <= SPAN_GAP
                && c.host + c.len - first.host <= limit;
            if joins {
                last.end = i + 1;
                continue;
            }
        }
        spans.push(i..i + 1);
    }
    spans
}

/// Maps `files` (full first) for a native copy; `None` when a file needs
/// `qemu-img` (encryption).
pub(super) fn plan_copy(files: &[PathBuf]) -> anyhow::Result<Option<Mapped<'static>>> {
    let sources = files
        .iter()
        .map(|path| Ok(Box::new(LocalFile::open(path)?) as Box<dyn ChainSource>))
        .collect::<anyhow::Result<Vec<_>>>()?;
    plan_sources(sources)
}

/// Maps the files `sources` read (full first) for a native copy; `None`
/// when a file needs `qemu-img` (encryption).
pub(super) fn plan_sources<'a>(
    sources: Vec<Box<dyn ChainSource + 'a>>,
) -> anyhow::Result<Option<Mapped<'a>>> {
    let mut covered = Covered::default();
    let mut segments = Vec::new();
    let mut packing = vec![(qcow2::Compression::Deflate, 0); sources.len()];
    for (index, source) in sources.iter().enumerate().rev() {
        let source = source.as_ref();
        let name = source.name();
        let image =
            Image::parse(source, Path::new(&name)).with_context(|| format!("reading {name}"))?;
        if let Some(problem) = super::check::data_file_problem(&image) {
            bail!("{name} {problem}");
        }
        if image.encrypted() {
            return Ok(None);
        }
        let h = image.header();
        packing[index] = (
            qcow2::Compression::from_type_byte(h.compression_type)?,
            h.cluster_size(),
        );
        qcow2::walk(source, &image, |e| {
            if e.kind == Kind::Unallocated {
                return Ok(());
            }
            let end = e.start + e.length;
            for (s, t) in covered.gaps(e.start, end) {
                match (e.kind, e.offset) {
                    (Kind::Data, Some(host)) => segments.push(Segment {
                        guest: s,
                        len: t - s,
                        file: index,
                        host: host + (s - e.start),
                        packed: None,
                    }),
                    // One cluster each.
                    (Kind::Compressed, Some(host)) => segments.push(Segment {
                        guest: s,
                        len: t - s,
                        file: index,
                        host,
                        packed: Some(Packed {
                            len: e.compressed_length.unwrap_or(0),
                            skip: s - e.start,
                        }),
                    }),
                    _ => {}
                }
            }
            covered.insert(e.start, end);
            Ok(())
        })
        .with_context(|| format!("mapping {name}"))?;
    }
    Ok(Some(Mapped {
        sources,
        segments,
        packing,
    }))
}

/// A cluster read through a chain that does not hold what the chain's
/// cluster maps recorded for it.
#[derive(Debug, thiserror::Error)]
#[error(
    "guest cluster {cluster} (offset {offset}) does not hold what its cluster map recorded: the chain is damaged"
)]
pub(super) struct Mismatch {
    pub cluster: u64,
    pub offset: u64,
    /// The file (index in the chain, full first) that gave its data; none
    /// when no file gives it (a table marks it zero or unallocated).
    pub file: Option<usize>,
}

impl Mapped<'_> {
    /// The mapped chain made ready for reads at any guest offset
    /// ([`Mapped::read_at`]): its segments in guest order.
    pub(super) fn for_reads(mut self) -> Self {
        self.segments.sort_unstable_by_key(|s| s.guest);
        self
    }

    /// Reads the guest bytes at `guest` into `buf` (a volume of `size`
    /// bytes): from the newest file holding each range, zeros where none
    /// does. With `check` (the chain's cluster maps laid over each other),
    /// whole clusters are read and each is checked against its map before
    /// any of its bytes is given: a cluster that does not match is an
    /// error naming it, never other bytes. Needs [`Mapped::for_reads`].
    pub(super) fn read_at(
        &self,
        guest: u64,
        buf: &mut [u8],
        size: u64,
        check: Option<&Baseline>,
    ) -> anyhow::Result<()> {
        let end = guest + buf.len() as u64;
        if end > size {
            bail!("a read past the disk's end ({end} > {size})");
        }
        let Some(maps) = check else {
            self.fill(guest, buf)?;
            return Ok(());
        };
        let cs = maps.cluster_size();
        let (first, last) = (guest / cs, end.div_ceil(cs));
        let start = first * cs;
        // Whole clusters are read and checked: into `buf` itself when it
        // holds whole clusters, else into a buffer of them.
        let aligned = guest == start && (end % cs == 0 || end == size);
        let mut spare = Vec::new();
        let whole: &mut [u8] = match aligned {
            true => buf,
            false => {
                spare.resize(((last * cs).min(size) - start) as usize, 0);
                &mut spare
            }
        };
        let given = self.fill(start, whole)?;
        for (i, bytes) in whole.chunks(cs as usize).enumerate() {
            let cluster = first + i as u64;
            let at = cluster * cs;
            // A cluster no file gives reads as zeros: its map says so, or
            // not, without hashing them.
            let given = given.iter().any(|&(a, b)| a < at + cs && b > at);
            let right = match given {
                true => crate::cluster_map::digest(bytes) == maps.get(cluster),
                false => maps.is_zero(cluster),
            };
            if !right {
                let at = cluster * cs;
                let from = self.segments.partition_point(|s| s.guest + s.len <= at);
                let file = self
                    .segments
                    .get(from)
                    .filter(|s| s.guest < at + cs)
                    .map(|s| s.file);
                return Err(Mismatch {
                    cluster,
                    offset: at,
                    file,
                }
                .into());
            }
        }
        if !aligned {
            let skip = (guest - start) as usize;
            buf.copy_from_slice(&spare[skip..skip + buf.len()]);
        }
        Ok(())
    }

    /// [`Mapped::read_at`] unchecked: every segment overlapping the range
    /// read into its place, the rest zeroed. Returns the guest ranges
    /// segments gave.
    fn fill(&self, guest: u64, buf: &mut [u8]) -> anyhow::Result<Vec<(u64, u64)>> {
        buf.fill(0);
        let mut given = Vec::new();
        let end = guest + buf.len() as u64;
        // Segments are disjoint and sorted: the first that may overlap is
        // the last starting at or before `guest`.
        let from = self
            .segments
            .partition_point(|s| s.guest <= guest)
            .saturating_sub(1);
        let mut scratch = (Vec::new(), Vec::new());
        for s in self.segments[from..].iter().take_while(|s| s.guest < end) {
            let (a, b) = (s.guest.max(guest), (s.guest + s.len).min(end));
            if a >= b {
                continue;
            }
            given.push((a, b));
            let out = &mut buf[(a - guest) as usize..(b - guest) as usize];
            let source = self.sources[s.file].as_ref();
            match s.packed {
                None => source.read_chunk(out, s.host + (a - s.guest)),
                Some(p) => {
                    // The part of the cluster this read wants.
                    let part = Segment {
                        guest: a,
                        len: b - a,
                        packed: None,
                        ..*s
                    };
                    let p = Packed {
                        skip: p.skip + (a - s.guest),
                        ..p
                    };
                    unpack(source, &part, p, self.packing[s.file], &mut scratch, out)
                }
            }
            .with_context(|| format!("reading {}", source.name()))?;
        }
        Ok(given)
    }

    /// The guest ranges that hold data, sorted and merged.
    pub(super) fn data_ranges(&self) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = self
            .segments
            .iter()
            .map(|s| (s.guest, s.guest + s.len))
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        merged
    }

    /// The names of the chain's files, full first.
    pub(super) fn names(&self) -> Vec<String> {
        self.sources.iter().map(|s| s.name()).collect()
    }
}

/// The guest ranges of a chain (`files`, full first) that hold data,
/// sorted and merged: what a restore of it copies. `None` for an encrypted
/// chain (its metadata is not read natively).
pub(super) fn data_ranges(files: &[PathBuf]) -> anyhow::Result<Option<Vec<(u64, u64)>>> {
    Ok(plan_copy(files)?.map(|mapped| mapped.data_ranges()))
}

/// Largest single read/write.
pub(super) const CHUNK: u64 = 4 << 20;

/// Copies the segments into a new sparse raw file of `size` bytes.
pub(super) fn copy_native(
    mapped: Mapped,
    out: &Path,
    size: u64,
    how: &Copier,
) -> anyhow::Result<u64> {
    let output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    output.set_len(size)?;
    copy_segments(mapped, output, how, &|guest| guest)
}

/// The cluster size of qcow2 restores.
const QCOW2_CLUSTER: u64 = 64 << 10;

/// Copies the segments into a new qcow2 image: every guest cluster they
/// touch is allocated, in guest order, and nothing else.
pub(super) fn copy_native_qcow2(
    mapped: Mapped,
    out: &Path,
    size: u64,
    how: &Copier,
) -> anyhow::Result<u64> {
    let cs = QCOW2_CLUSTER;
    let mut clusters: Vec<u64> = mapped
        .segments
        .iter()
        .flat_map(|s| s.guest / cs..=(s.guest + s.len - 1) / cs)
        .collect();
    clusters.sort_unstable();
    clusters.dedup();
    let data = qcow2::create_with_clusters(
        out,
        &qcow2::CreateOptions {
            size,
            cluster_size: cs,
            ..qcow2::CreateOptions::default()
        },
        &clusters,
    )?;
    let output = OpenOptions::new()
        .write(true)
        .open(out)
        .with_context(|| format!("opening {}", out.display()))?;
    // A segment's clusters are all allocated and consecutive in the list,
    // so its bytes are contiguous in the file.
    let dest = |guest: u64| {
        let index = clusters.binary_search(&(guest / cs)).unwrap_or(0) as u64;
        data + index * cs + guest % cs
    };
    copy_segments(mapped, output, how, &dest)
}

const DIRECT_ALIGN: u64 = crate::direct::ALIGN;

/// Writes the segments into `output` at `dest(guest offset)`; the other
/// bytes are already zero. Aligned chunks go through an O_DIRECT handle
/// where there is one, the rest (and all, where the filesystem refuses
/// O_DIRECT) through `output`, which is synced at the end either way.
pub(super) fn copy_segments(
    mapped: Mapped,
    output: File,
    how: &Copier,
    dest: &(dyn Fn(u64) -> u64 + Sync),
) -> anyhow::Result<u64> {
    let Mapped {
        sources,
        segments,
        packing,
    } = mapped;
    let chunks = chunks_of(&segments);
    let spans = spans(&chunks, how.span);
    let span_len = how.span.unwrap_or(CHUNK).max(CHUNK);
    let total: u64 = chunks.iter().map(|c| c.len).sum();
    let bar = how.progress.map(|p| &p.0);
    if let Some(bar) = bar {
        bar.start("restoring", total);
    }
    let direct = crate::direct::reopen(&output);
    let next = AtomicUsize::new(0);
    let copied = AtomicU64::new(0);
    let seen = Seen::new(how.check);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..how.threads.max(1))
            .map(|_| {
                let (sources, output, direct) = (&sources, &output, &direct);
                let (chunks, spans) = (&chunks, &spans);
                let packing = &packing;
                let next = &next;
                let copied = &copied;
                let seen = &seen;
                scope.spawn(move || -> anyhow::Result<()> {
                    // Aligned for O_DIRECT (chunks start on clusters).
                    let mut raw = vec![0u8; (span_len + DIRECT_ALIGN) as usize];
                    let skip = raw.as_ptr().align_offset(DIRECT_ALIGN as usize);
                    let whole = &mut raw[skip..skip + span_len as usize];
                    let mut scratch = (Vec::new(), Vec::new());
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(span) = spans.get(i) else {
                            return Ok(());
                        };
                        let span = &chunks[span.clone()];
                        let (first, last) = (&span[0], &span[span.len() - 1]);
                        let source = sources[first.file].as_ref();
                        let read = (last.host + last.len - first.host) as usize;
                        match first.packed {
                            None => source.read_chunk(&mut whole[..read], first.host),
                            Some(p) => {
                                let out = &mut whole[..first.len as usize];
                                unpack(source, first, p, packing[first.file], &mut scratch, out)
                            }
                        }
                        .with_context(|| format!("reading {}", source.name()))?;
                        for c in span {
                            let at = (c.host - first.host) as usize;
                            let buf = &whole[at..at + c.len as usize];
                            if let Some(check) = how.check {
                                seen.check(check, c, buf)
                                    .with_context(|| format!("reading {}", source.name()))?;
                            }
                            crate::direct::write_all_at(
                                output,
                                direct.as_ref(),
                                buf,
                                dest(c.guest),
                            )?;
                            let done = copied.fetch_add(c.len, Ordering::Relaxed) + c.len;
                            if let Some(bar) = bar {
                                bar.update(done, total);
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a copy thread panicked"))??;
        }
        Ok(())
    })?;
    if let Some(bar) = bar {
        bar.finish();
    }
    if let Some(check) = how.check {
        seen.all_read(check).with_context(|| {
            let names: Vec<String> = sources.iter().map(|f| f.name()).collect();
            format!("checking what {} hold", names.join(", "))
        })?;
    }
    output.sync_all()?;
    Ok(copied.load(Ordering::Relaxed))
}

/// The copy's units: each segment of plain data cut into chunks of at
/// most [`CHUNK`] (a compressed cluster is one), in each file's host
/// order, so that every file is read sequentially.
fn chunks_of(segments: &[Segment]) -> Vec<Segment> {
    let mut chunks = Vec::new();
    for s in segments {
        if s.packed.is_some() {
            chunks.push(*s);
            continue;
        }
        let mut done = 0;
        while done < s.len {
            let len = CHUNK.min(s.len - done);
            chunks.push(Segment {
                guest: s.guest + done,
                len,
                file: s.file,
                host: s.host + done,
                packed: None,
            });
            done += len;
        }
    }
    chunks.sort_by_key(|c| (c.file, c.host));
    chunks
}

/// The guest clusters a checked copy has read, one bit each.
struct Seen(Vec<AtomicU64>);

impl Seen {
    fn new(check: Option<&Baseline>) -> Seen {
        let clusters = check.map_or(0, |b| b.size().div_ceil(b.cluster_size()));
        Seen(
            (0..clusters.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        )
    }

    /// Checks each cluster of chunk `c` (its bytes `buf`) against what
    /// the maps recorded, and notes it read.
    fn check(&self, maps: &Baseline, c: &Segment, buf: &[u8]) -> anyhow::Result<()> {
        let cs = maps.cluster_size();
        if c.guest % cs != 0 || (c.len % cs != 0 && c.guest + c.len != maps.size()) {
            bail!(
                "its data at guest offset {} ({} bytes) does not fall on the cluster map's {cs} B clusters",
                c.guest,
                c.len
            );
        }
        for (i, bytes) in buf.chunks(cs as usize).enumerate() {
            let cluster = c.guest / cs + i as u64;
            if crate::cluster_map::digest(bytes) != maps.get(cluster) {
                bail!(
                    "guest cluster {cluster} (offset {}) does not hold what its cluster map recorded: the file is damaged (bitback verify names it)",
                    cluster * cs
                );
            }
            let slot = self
                .0
                .get((cluster / 64) as usize)
                .context("a cluster past the disk's end")?;
            slot.fetch_or(1 << (cluster % 64), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Every cluster the maps hold data for was read: no file's tables
    /// hid one (a cluster they mark as zeros or unallocated).
    fn all_read(&self, maps: &Baseline) -> anyhow::Result<()> {
        for cluster in maps.data_clusters() {
            let read = self
                .0
                .get((cluster / 64) as usize)
                .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (cluster % 64)) != 0);
            if !read {
                bail!(
                    "guest cluster {cluster} held data at the backup, but no file of the chain gives it: a file's tables are damaged (bitback verify names it)"
                );
            }
        }
        Ok(())
    }
}

/// Decompresses the cluster of segment `c` and copies its part into `out`.
/// `scratch` holds the compressed bytes and the cluster between calls.
fn unpack(
    source: &dyn ChainSource,
    c: &Segment,
    p: Packed,
    (kind, cs): (qcow2::Compression, u64),
    scratch: &mut (Vec<u8>, Vec<u8>),
    out: &mut [u8],
) -> std::io::Result<()> {
    let (packed, cluster) = scratch;
    // The bound counts whole sectors; the file may end inside the last.
    let left = source.size()?.saturating_sub(c.host);
    packed.resize(p.len.min(left) as usize, 0);
    source.read_exact_at(packed, c.host)?;
    cluster.resize(cs as usize, 0);
    qcow2::decompress(kind, packed, cluster).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("the compressed cluster at {}: {e}", c.host),
        )
    })?;
    let skip = p.skip as usize;
    out.copy_from_slice(&cluster[skip..skip + out.len()]);
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn spans_join_near_chunks_of_one_file_up_to_their_limit() {
        const M: u64 = 1 << 20;
        let at = |file: usize, host: u64, len: u64| Segment {
            guest: host,
            len,
            file,
            host,
            packed: None,
        };
        let chunks = [
            at(0, 0, 4 * M),
            at(0, 4 * M, 4 * M),
            // A gap of 1 MiB: read over.
            at(0, 9 * M, 4 * M),
            // Past 16 MiB from the span's start.
            at(0, 13 * M, 4 * M),
            // A gap of 2 MiB: a new span.
            at(0, 19 * M, M),
            // Another file.
            at(1, 20 * M, M),
            Segment {
                packed: Some(Packed { len: 512, skip: 0 }),
                ..at(1, 21 * M, 64 << 10)
            },
            at(1, 22 * M, M),
        ];
        assert_eq!(
            spans(&chunks, Some(16 * M)),
            [0..3, 3..4, 4..5, 5..6, 6..7, 7..8]
        );
        assert_eq!(spans(&chunks, None).len(), chunks.len());
    }

    use super::{Covered, Packed, Segment, spans};

    #[test]
    fn gaps_and_inserts() {
        let mut c = Covered::default();
        assert_eq!(c.gaps(0, 100), vec![(0, 100)]);
        c.insert(10, 20);
        c.insert(30, 40);
        assert_eq!(c.gaps(0, 100), vec![(0, 10), (20, 30), (40, 100)]);
        assert_eq!(c.gaps(15, 35), vec![(20, 30)]);
        assert_eq!(c.gaps(12, 18), vec![]);
        c.insert(15, 35);
        assert_eq!(c.gaps(0, 100), vec![(0, 10), (40, 100)]);
        c.insert(40, 50);
        c.insert(0, 10);
        assert_eq!(c.gaps(0, 100), vec![(50, 100)]);
        assert_eq!(c.0.len(), 1);
    }
}
