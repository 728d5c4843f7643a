//! Restoring a backup point to an image file.
//!
//! Raw output is native: the cluster maps of every file in the chain (the
//! qcow2 module) say, for each guest range, which file is the newest to
//! hold it; only those ranges are read, each once, with positioned reads
//! and writes spread over a few threads. Zero and unallocated ranges stay
//! holes in a sparse output file. qcow2 output is written natively too: the
//! clusters the copy will fill are allocated up front, in guest order, and
//! the data lands in them. The cost grows with the data, not with the
//! chain's length. Compressed clusters (deflate or zstd) are decompressed
//! by the copy threads. Encrypted chains go through `qemu-img convert`,
//! and say so.
//!
//! The output is written under a temporary name in its directory, synced,
//! and renamed: a failed restore leaves nothing that looks restored.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use anyhow::{Context, bail};
use serde::Serialize;
use tracing::{info, warn};

use super::chain::{Pick, check_needed, refuse_problems, resolve, volume_files};
use super::check::Checks;
use super::key::Key;
use super::outcome::BadInput;
use crate::cluster_map::Baseline;
use crate::qcow2::{self, Image, Kind};
use crate::repo::{Manifest, Repo, VolumeRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub vm: String,
    /// Which point.
    pub backup: Pick,
    /// Only these volumes (empty: all).
    pub volumes: Vec<String>,
    /// A file (one volume) or a directory (any number).
    pub output: PathBuf,
    pub format: Format,
    /// Copy threads for native restores.
    pub threads: usize,
    /// Prove what is copied: each cluster against the chain's cluster
    /// maps as it is copied, or (chains without maps) every file's digest
    /// first.
    pub verify: bool,
    pub progress: Option<super::progress::ProgressSink>,
    /// The key of an encrypted backup.
    pub key: Option<Key>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    pub volume: String,
    pub backup: String,
    pub path: PathBuf,
    pub virtual_size: u64,
    /// Files in the chain, full to top.
    pub chain_length: usize,
    /// Bytes of data copied (native restores); `None` where qemu-img
    /// copied and bitback did not count (encrypted or compressed chains,
    /// a qcow2 image restored in place).
    pub bytes_copied: Option<u64>,
    /// `native` or `qemu-img convert` (and why).
    pub method: String,
}

/// The most cluster map records a restore lays over each other in memory
/// (about 40 bytes each): 2 Mi records cover 128 GiB of 64 KiB clusters
/// in about 80 MiB. A larger volume's chain is proven by its digests,
/// read before the copy.
const MAX_IN_FLIGHT_RECORDS: u64 = 2 << 20;

/// How a restore proves what it copies, per volume: each cluster it reads
/// checked in flight against the chain's cluster maps (read once, while
/// copying), where every file of the volume's chain has a map; otherwise
/// every file's digest read before the copy. Returns the maps' baselines
/// of the volumes checked in flight.
fn in_flight_checks(
    repo: &Repo,
    m: &Manifest,
    chain: &[Manifest],
    selected: &[&VolumeRecord],
) -> anyhow::Result<BTreeMap<String, Arc<Baseline>>> {
    let mut baselines = BTreeMap::new();
    let mut digests = Vec::new();
    for v in selected {
        let records: u64 = super::chain::volume_records(chain, &v.name)?
            .iter()
            .map(|r| r.cluster_map.as_ref().map_or(0, |m| m.records))
            .sum();
        let baseline = match m.encryption {
            Some(_) => Err("the backup is encrypted".to_string()),
            None if records > MAX_IN_FLIGHT_RECORDS => Err(format!(
                "its cluster maps hold {records} records, more than a restore keeps in memory ({MAX_IN_FLIGHT_RECORDS})"
            )),
            None => super::content::baseline(repo, chain, &v.name, None),
        };
        match baseline {
            Ok(b) => {
                baselines.insert(v.name.clone(), b);
            }
            Err(why) => {
                info!(volume = %v.name, "digests read before the copy: {why}");
                digests.push(v.name.clone());
            }
        }
    }
    if !digests.is_empty() {
        refuse_problems(m, &check_needed(repo, m, chain, &digests, Checks::Digests)?)?;
    }
    Ok(baselines)
}

pub fn restore(repo: &Repo, opts: &RestoreOptions) -> anyhow::Result<Vec<Restored>> {
    let _readers = repo.read_lock(&opts.vm, "restore")?;
    // What is known, first; the data is proven while it is copied
    // (in_flight_checks).
    let (m, chain) = resolve(
        repo,
        &opts.vm,
        &opts.backup,
        Checks::serving(opts.verify),
        &opts.volumes,
    )?;
    let key = match (&m.encryption, &opts.key) {
        (Some(_), Some(key)) => Some(key),
        (Some(_), None) => {
            return Err(BadInput(format!(
                "backup {} is encrypted; give its key with --key-file FILE",
                m.id
            ))
            .into());
        }
        (None, _) => None,
    };
    let selected: Vec<_> = m
        .volumes
        .iter()
        .filter(|v| opts.volumes.is_empty() || opts.volumes.contains(&v.name))
        .collect();
    // Several volumes go into a directory: one that exists, or a new one
    // whose name ends with / or has no extension. `one.raw` is a mistake.
    let to_dir = opts.output.is_dir()
        || opts.output.as_os_str().as_encoded_bytes().ends_with(b"/")
        || (selected.len() > 1 && !opts.output.exists() && opts.output.extension().is_none());
    if selected.len() > 1 && !to_dir {
        return Err(BadInput(format!(
            "backup {} has {} volumes; --output {} must be a directory (end it with /) or name one volume with --volume",
            m.id,
            selected.len(),
            opts.output.display()
        ))
        .into());
    }
    // A directory this run creates goes again if the run fails (a wrong
    // key, a full disk) and nothing was restored into it.
    let made_dir = to_dir && !opts.output.exists();
    if to_dir {
        std::fs::create_dir_all(&opts.output)
            .with_context(|| format!("creating {}", opts.output.display()))?;
    }
    let baselines = match opts.verify {
        true => in_flight_checks(repo, &m, &chain, &selected)?,
        false => BTreeMap::new(),
    };
    let restored = restore_selected(repo, &m, &chain, &selected, opts, to_dir, key, &baselines);
    if restored.is_err() && made_dir {
        let _ = std::fs::remove_dir(&opts.output);
    }
    restored
}

/// Restores each of `selected` into `opts.output`, checking each cluster
/// of the volumes in `baselines` against them as it is copied.
#[allow(clippy::too_many_arguments)]
fn restore_selected(
    repo: &Repo,
    m: &Manifest,
    chain: &[Manifest],
    selected: &[&VolumeRecord],
    opts: &RestoreOptions,
    to_dir: bool,
    key: Option<&Key>,
    baselines: &BTreeMap<String, Arc<Baseline>>,
) -> anyhow::Result<Vec<Restored>> {
    let extension = match opts.format {
        Format::Raw => "raw",
        Format::Qcow2 => "qcow2",
    };
    let mut out = Vec::new();
    for v in selected {
        let target = if to_dir {
            opts.output.join(format!("{}.{extension}", v.name))
        } else {
            opts.output.clone()
        };
        if target.exists() {
            return Err(BadInput(format!(
                "{} exists; bitback does not overwrite restores",
                target.display()
            ))
            .into());
        }
        let files = volume_files(repo, chain, &v.name)?;
        let check = baselines.get(&v.name).map(Arc::as_ref);
        let restored = restore_volume(&files, &target, opts, v.virtual_size, key, check)
            .with_context(|| format!("restoring volume {} of backup {}", v.name, m.id))?;
        info!(volume = %v.name, path = %target.display(), method = %restored.1, "restored");
        out.push(Restored {
            volume: v.name.clone(),
            backup: m.id.clone(),
            path: target,
            virtual_size: v.virtual_size,
            chain_length: files.len(),
            bytes_copied: restored.0,
            method: restored.1,
        });
    }
    Ok(out)
}

/// Writes under a temp name, then renames into place.
fn restore_volume(
    files: &[PathBuf],
    target: &Path,
    opts: &RestoreOptions,
    size: u64,
    key: Option<&Key>,
    check: Option<&Baseline>,
) -> anyhow::Result<(Option<u64>, String)> {
    let dir = target
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .context("the output has no file name")?
        .to_string_lossy();
    clean_restoring(dir);
    let tmp = dir.join(format!(".{name}.restoring-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let format = match opts.format {
        Format::Raw => "raw",
        Format::Qcow2 => "qcow2",
    };
    let threads = opts.threads.max(1);
    let plan = match key {
        Some(_) => None,
        None => plan_copy(files)?,
    };
    let how = Copier {
        threads,
        progress: opts.progress.as_ref(),
        check,
    };
    let result = match plan {
        Some(mapped) => {
            let copy = match opts.format {
                Format::Raw => copy_native,
                Format::Qcow2 => copy_native_qcow2,
            };
            copy(mapped, &tmp, size, &how).map(|n| (Some(n), "native".to_string()))
        }
        None => qemu_img_convert(files, key, &tmp, format).map(|_| {
            (
                None,
                "qemu-img convert (the backup is encrypted: QEMU decrypts it)".to_string(),
            )
        }),
    };
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // Never over a file that appeared meanwhile.
    let renamed = nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &tmp,
        nix::fcntl::AT_FDCWD,
        target,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    );
    if let Err(e) = renamed {
        let _ = std::fs::remove_file(&tmp);
        return Err(std::io::Error::from(e))
            .with_context(|| format!("renaming into {}", target.display()));
    }
    crate::repo::sync_dir(dir)?;
    result
}

/// Removes what killed restores left in `dir`: `.NAME.restoring-PID`
/// files whose process is gone (and `.NAME.restoring` of older versions).
fn clean_restoring(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            continue;
        }
        let stale = match name.rsplit_once(".restoring") {
            Some((_, "")) => true,
            Some((_, pid)) => pid
                .strip_prefix('-')
                .and_then(|p| p.parse::<i32>().ok())
                .is_some_and(|pid| {
                    pid > 0
                        && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                            == Err(nix::errno::Errno::ESRCH)
                }),
            None => false,
        };
        if stale && entry.file_type().is_ok_and(|t| t.is_file()) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    info!(file = %entry.path().display(), "removed what a killed restore left")
                }
                Err(e) => {
                    warn!(file = %entry.path().display(), error = %e, "cannot remove what a killed restore left")
                }
            }
        }
    }
}

/// Converts a chain (full first) with `qemu-img convert`, synced. An
/// encrypted chain is decrypted with `key`, which qemu-img reads from its
/// stdin as a secret object, each file's backing given explicitly.
fn qemu_img_convert(
    files: &[PathBuf],
    key: Option<&Key>,
    out: &Path,
    format: &str,
) -> anyhow::Result<()> {
    let top = files.last().context("empty chain")?;
    let mut cmd = Command::new("qemu-img");
    cmd.arg("convert");
    match key {
        Some(_) => {
            let image = super::chain::encrypted_image(files, "bitback-key")?;
            cmd.arg("--object")
                .arg("secret,id=bitback-key,format=raw,file=/dev/stdin")
                .args(["-O", format])
                .arg(image.node().json_filename()?);
        }
        None => {
            cmd.args(["-f", "qcow2", "-O", format]).arg(top);
        }
    }
    cmd.arg(out);
    let output = match key {
        Some(key) => key.feed(&mut cmd),
        None => cmd.output(),
    }
    .context("running qemu-img convert (install qemu-utils)")?;
    crate::child::succeeded("qemu-img convert", output)?;
    File::open(out)?.sync_all()?;
    Ok(())
}

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

/// Opens a chain file for reading, refusing a symlink.
fn open_chain_file(path: &Path) -> anyhow::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// A chain mapped for a native copy: for each guest range the newest file
/// holding it, and the files opened once (the copy reads through the same
/// handles the map was made from).
struct Mapped<'a> {
    files: &'a [PathBuf],
    handles: Vec<File>,
    segments: Vec<Segment>,
    /// Each file's compression type and cluster size (for its compressed
    /// clusters).
    packing: Vec<(qcow2::Compression, u64)>,
}

/// How a native copy runs.
struct Copier<'a> {
    threads: usize,
    progress: Option<&'a super::progress::ProgressSink>,
    /// The chain's cluster maps laid over each other: every cluster read
    /// is checked against them, and every cluster they hold data for must
    /// be read.
    check: Option<&'a Baseline>,
}

/// Maps `files` (full first) for a native copy; `None` when a file needs
/// `qemu-img` (encryption).
fn plan_copy(files: &[PathBuf]) -> anyhow::Result<Option<Mapped<'_>>> {
    let mut covered = Covered::default();
    let mut segments = Vec::new();
    let mut handles: Vec<Option<File>> = files.iter().map(|_| None).collect();
    let mut packing = vec![(qcow2::Compression::Deflate, 0); files.len()];
    for (index, path) in files.iter().enumerate().rev() {
        let file = open_chain_file(path)?;
        let image =
            Image::from_file(&file, path).with_context(|| format!("reading {}", path.display()))?;
        if let Some(problem) = super::check::data_file_problem(&image) {
            bail!("{} {problem}", path.display());
        }
        if image.encrypted() {
            return Ok(None);
        }
        let h = image.header();
        packing[index] = (
            qcow2::Compression::from_type_byte(h.compression_type)?,
            h.cluster_size(),
        );
        qcow2::walk(&file, &image, |e| {
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
        .with_context(|| format!("mapping {}", path.display()))?;
        handles[index] = Some(file);
    }
    let handles = handles.into_iter().flatten().collect();
    Ok(Some(Mapped {
        files,
        handles,
        segments,
        packing,
    }))
}

/// The guest ranges of a chain (`files`, full first) that hold data,
/// sorted and merged: what a restore of it copies. `None` for an encrypted
/// chain (its metadata is not read natively).
pub(super) fn data_ranges(files: &[PathBuf]) -> anyhow::Result<Option<Vec<(u64, u64)>>> {
    let Some(mapped) = plan_copy(files)? else {
        return Ok(None);
    };
    let mut ranges: Vec<(u64, u64)> = mapped
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
    Ok(Some(merged))
}

/// Largest single read/write.
const CHUNK: u64 = 4 << 20;

/// Copies the segments into a new sparse raw file of `size` bytes.
fn copy_native(mapped: Mapped, out: &Path, size: u64, how: &Copier) -> anyhow::Result<u64> {
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
fn copy_native_qcow2(mapped: Mapped, out: &Path, size: u64, how: &Copier) -> anyhow::Result<u64> {
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
fn copy_segments(
    mapped: Mapped,
    output: File,
    how: &Copier,
    dest: &(dyn Fn(u64) -> u64 + Sync),
) -> anyhow::Result<u64> {
    let Mapped {
        files,
        handles: sources,
        segments,
        packing,
    } = mapped;
    let chunks = chunks_of(&segments);
    let total: u64 = chunks.iter().map(|c| c.len).sum();
    let bar = how.progress.map(|p| &p.0);
    if let Some(bar) = bar {
        bar.start("restoring", total);
    }
    let direct = crate::direct::reopen(&output);
    let direct_sources: Vec<Option<File>> =
        sources.iter().map(crate::direct::reopen_read).collect();
    let next = AtomicUsize::new(0);
    let copied = AtomicU64::new(0);
    let seen = Seen::new(how.check);
    let shared = Arc::new((sources, output, direct));
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..how.threads.max(1))
            .map(|_| {
                let shared = shared.clone();
                let chunks = &chunks;
                let packing = &packing;
                let direct_sources = &direct_sources;
                let next = &next;
                let copied = &copied;
                let seen = &seen;
                scope.spawn(move || -> anyhow::Result<()> {
                    let (sources, output, direct) = &*shared;
                    // Aligned for O_DIRECT.
                    let mut raw = vec![0u8; (CHUNK + DIRECT_ALIGN) as usize];
                    let skip = raw.as_ptr().align_offset(DIRECT_ALIGN as usize);
                    let buf = &mut raw[skip..skip + CHUNK as usize];
                    let mut scratch = (Vec::new(), Vec::new());
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(c) = chunks.get(i) else {
                            return Ok(());
                        };
                        let buf = &mut buf[..c.len as usize];
                        match c.packed {
                            None => crate::direct::read_exact_at(
                                &sources[c.file],
                                direct_sources[c.file].as_ref(),
                                buf,
                                c.host,
                            )
                            .with_context(|| format!("reading {}", files[c.file].display()))?,
                            Some(p) => unpack(
                                &sources[c.file],
                                c,
                                p,
                                packing[c.file],
                                &mut scratch,
                                buf,
                            )
                            .with_context(|| format!("reading {}", files[c.file].display()))?,
                        }
                        if let Some(check) = how.check {
                            seen.check(check, c, buf)
                                .with_context(|| format!("reading {}", files[c.file].display()))?;
                        }
                        crate::direct::write_all_at(output, direct.as_ref(), buf, dest(c.guest))?;
                        let done = copied.fetch_add(c.len, Ordering::Relaxed) + c.len;
                        if let Some(bar) = bar {
                            bar.update(done, total);
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
            let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            format!("checking what {} hold", names.join(", "))
        })?;
    }
    shared.1.sync_all()?;
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
    source: &File,
    c: &Segment,
    p: Packed,
    (kind, cs): (qcow2::Compression, u64),
    scratch: &mut (Vec<u8>, Vec<u8>),
    out: &mut [u8],
) -> std::io::Result<()> {
    let (packed, cluster) = scratch;
    packed.resize(p.len as usize, 0);
    // The bound counts whole sectors; the file may end inside the last.
    let mut got = 0;
    while got < packed.len() {
        match source.read_at(&mut packed[got..], c.host + got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    cluster.resize(cs as usize, 0);
    qcow2::decompress(kind, &packed[..got], cluster).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("the compressed cluster at {}: {e}", c.host),
        )
    })?;
    let skip = p.skip as usize;
    out.copy_from_slice(&cluster[skip..skip + out.len()]);
    Ok(())
}

/// Restoring into a stopped VM's own image.
#[derive(Debug, Clone)]
pub struct InPlaceOptions {
    pub vm: String,
    pub backup: Pick,
    /// Needed when the backup has several volumes.
    pub volume: Option<String>,
    pub image: PathBuf,
    pub threads: usize,
    pub verify: bool,
    pub progress: Option<super::progress::ProgressSink>,
}

/// The volume of `m` an in-place restore writes: the one named, or its
/// only one. An encrypted backup is refused (its key never meets a VM's
/// image here).
fn in_place_record<'m>(m: &'m Manifest, volume: Option<&str>) -> anyhow::Result<&'m VolumeRecord> {
    let record = match (volume, m.volumes.as_slice()) {
        (None, [only]) => only,
        (None, _) => {
            return Err(BadInput(format!(
                "backup {} has several volumes; name one with --volume",
                m.id
            ))
            .into());
        }
        (Some(name), volumes) => volumes
            .iter()
            .find(|v| v.name == name)
            .context("the volume resolve found")?,
    };
    if m.encryption.is_some() {
        return Err(BadInput(format!(
            "backup {} is encrypted; restore it to a file with --key-file, then copy that into the image",
            m.id
        ))
        .into());
    }
    Ok(record)
}

/// Converts chain top `top` into the existing qcow2 image at `image`
/// (`qemu-img convert -n`, which takes the image's lock itself).
fn convert_into(top: &Path, image: &Path) -> anyhow::Result<()> {
    let out = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "qcow2", "-O", "qcow2"])
        .arg(top)
        .arg(image)
        .output()
        .context("running qemu-img convert (install qemu-utils)")?;
    crate::child::succeeded("qemu-img convert", out)?;
    Ok(())
}

/// QEMU locked out of `image` (at `path`) while the lock lives; a
/// running QEMU holding it is refused.
fn lock_out<'f>(image: &'f File, path: &Path) -> anyhow::Result<qcow2::QemuLockout<'f>> {
    qcow2::lock_out_qemu(image).map_err(|e| match e {
        qcow2::Error::InUse => anyhow::Error::new(BadInput(format!(
            "{} is in use by a running QEMU; stop the VM first",
            path.display()
        ))),
        other => anyhow::anyhow!(other),
    })
}

/// Writes a backup point into an existing image (qcow2 through `qemu-img
/// convert -n`, a raw file natively), refusing while a QEMU holds it, then
/// clears the VM's active checkpoint: the disk no longer matches any
/// bitmap, so the next backup is full.
pub fn restore_in_place(
    repo: &Repo,
    lock: &crate::repo::VmLock,
    opts: &InPlaceOptions,
) -> anyhow::Result<Restored> {
    let (m, chain) = resolve(
        repo,
        &opts.vm,
        &opts.backup,
        Checks::reading(opts.verify),
        opts.volume.as_slice(),
    )?;
    let record = in_place_record(&m, opts.volume.as_deref())?;
    let files = volume_files(repo, &chain, &record.name)?;
    let top = files.last().context("empty chain")?;

    let image = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&opts.image)
        .with_context(|| format!("opening {}", opts.image.display()))?;
    let lockout = lock_out(&image, &opts.image)?;
    // The image is about to change: from here on no checkpoint describes
    // it, whether the write completes or not.
    let clear_checkpoint = || -> anyhow::Result<()> {
        if let Some(mut state) = repo.load_state(&opts.vm)?
            && state.active_checkpoint.is_some()
        {
            state.active_checkpoint = None;
            repo.save_state(lock, &state)?;
            info!(vm = %opts.vm, "active checkpoint cleared: the next backup is full");
        }
        Ok(())
    };
    let meta = image.metadata()?;
    let mut magic = [0u8; 4];
    let is_qcow2 = image.read_exact_at(&mut magic, 0).is_ok() && magic == *b"QFI\xfb";
    let (copied, method) = if is_qcow2 {
        let size = Image::parse(&image, &opts.image)?.header().size;
        if size != record.virtual_size {
            bail!(
                "{} is {size} bytes, the backup {}: resize it first",
                opts.image.display(),
                record.virtual_size
            );
        }
        clear_checkpoint()?;
        // qemu-img takes its own lock.
        drop(lockout);
        drop(image);
        convert_into(top, &opts.image)?;
        (None, "qemu-img convert -n (qcow2 image)".to_string())
    } else if meta.is_file() {
        if meta.len() != record.virtual_size {
            bail!(
                "{} is {} bytes, the backup {}: resize it first",
                opts.image.display(),
                meta.len(),
                record.virtual_size
            );
        }
        let Some(mapped) = plan_copy(&files)? else {
            bail!("the chain is encrypted; restore it to a file instead");
        };
        clear_checkpoint()?;
        // Every byte not copied must read as zero: empty the file first.
        image.set_len(0)?;
        image.set_len(record.virtual_size)?;
        // Checked before (the digests of the chain): a mismatch found
        // while copying would leave the VM's disk half written.
        let how = Copier {
            threads: opts.threads.max(1),
            progress: opts.progress.as_ref(),
            check: None,
        };
        let copied = copy_segments(mapped, image.try_clone()?, &how, &|guest| guest)?;
        drop(lockout);
        (Some(copied), "native (raw image)".to_string())
    } else {
        bail!(
            "{} is neither a qcow2 image nor a regular raw file",
            opts.image.display()
        );
    };

    Ok(Restored {
        volume: record.name.clone(),
        backup: m.id.clone(),
        path: opts.image.clone(),
        virtual_size: record.virtual_size,
        chain_length: files.len(),
        bytes_copied: copied,
        method,
    })
}

#[cfg(test)]
mod tests {
    use super::Covered;

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
