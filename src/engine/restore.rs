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

use anyhow::{Context, bail};
use serde::Serialize;
use tracing::{info, warn};

use super::chain::{Pick, check_needed, refuse_problems, resolve, volume_files};
use super::check::Checks;
use super::key::Key;
use super::native::{Copier, Mapped, copy_native, copy_native_qcow2, copy_segments, plan_copy};
use super::outcome::BadInput;
use crate::cluster_map::Baseline;
use crate::qcow2::{self, Image};
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
pub(super) const MAX_IN_FLIGHT_RECORDS: u64 = 2 << 20;

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
    let outputs = Outputs::plan(&m, opts)?;
    let selected: Vec<&VolumeRecord> = outputs.targets.iter().map(|(v, _)| *v).collect();
    let baselines = match opts.verify {
        true => in_flight_checks(repo, &m, &chain, &selected)?,
        false => BTreeMap::new(),
    };
    let restored = restore_selected(repo, &m, &chain, &outputs, opts, key, &baselines);
    outputs.undo_if(restored.is_err());
    restored
}

/// Where each volume a restore selected goes, checked before anything is
/// read: none exists yet.
pub(super) struct Outputs<'m> {
    pub targets: Vec<(&'m VolumeRecord, PathBuf)>,
    /// The directory this run made (to go again if the run fails).
    made_dir: Option<PathBuf>,
}

impl<'m> Outputs<'m> {
    /// The volumes of `m` that `opts` selects and their outputs: one
    /// file, or a directory of `<volume>.raw|qcow2` (made if needed).
    pub(super) fn plan(m: &'m Manifest, opts: &RestoreOptions) -> anyhow::Result<Outputs<'m>> {
        let selected: Vec<_> = m
            .volumes
            .iter()
            .filter(|v| opts.volumes.is_empty() || opts.volumes.contains(&v.name))
            .collect();
        // Several volumes go into a directory: one that exists, or a new
        // one whose name ends with / or has no extension. `one.raw` is a
        // mistake.
        let output = &opts.output;
        let to_dir = output.is_dir()
            || output.as_os_str().as_encoded_bytes().ends_with(b"/")
            || (selected.len() > 1 && !output.exists() && output.extension().is_none());
        if selected.len() > 1 && !to_dir {
            return Err(BadInput(format!(
                "backup {} has {} volumes; --output {} must be a directory (end it with /) or name one volume with --volume",
                m.id,
                selected.len(),
                output.display()
            ))
            .into());
        }
        let extension = match opts.format {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        };
        let targets: Vec<_> = selected
            .into_iter()
            .map(|v| match to_dir {
                true => (v, output.join(format!("{}.{extension}", v.name))),
                false => (v, output.clone()),
            })
            .collect();
        if let Some((_, target)) = targets.iter().find(|(_, t)| t.exists()) {
            return Err(BadInput(format!(
                "{} exists; bitback does not overwrite restores",
                target.display()
            ))
            .into());
        }
        // A directory this run creates goes again if the run fails (a
        // wrong key, a full disk) and nothing was restored into it.
        let made_dir = (to_dir && !output.exists()).then(|| output.clone());
        if to_dir {
            std::fs::create_dir_all(output)
                .with_context(|| format!("creating {}", output.display()))?;
        }
        Ok(Outputs { targets, made_dir })
    }

    /// Removes the directory this run made, if `failed` (and it is empty).
    pub(super) fn undo_if(&self, failed: bool) {
        if let (true, Some(dir)) = (failed, &self.made_dir) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Restores each of `outputs` into its target, checking each cluster of
/// the volumes in `baselines` against them as it is copied.
fn restore_selected(
    repo: &Repo,
    m: &Manifest,
    chain: &[Manifest],
    outputs: &Outputs,
    opts: &RestoreOptions,
    key: Option<&Key>,
    baselines: &BTreeMap<String, Arc<Baseline>>,
) -> anyhow::Result<Vec<Restored>> {
    let mut out = Vec::new();
    for (v, target) in &outputs.targets {
        let files = volume_files(repo, chain, &v.name)?;
        let check = baselines.get(&v.name).map(Arc::as_ref);
        let restored = restore_volume(&files, target, opts, v.virtual_size, key, check)
            .with_context(|| format!("restoring volume {} of backup {}", v.name, m.id))?;
        info!(volume = %v.name, path = %target.display(), method = %restored.1, "restored");
        out.push(Restored {
            volume: v.name.clone(),
            backup: m.id.clone(),
            path: target.clone(),
            virtual_size: v.virtual_size,
            chain_length: files.len(),
            bytes_copied: restored.0,
            method: restored.1,
        });
    }
    Ok(out)
}

/// Restores a volume of `size` bytes from `files` (full first) into
/// `target`.
fn restore_volume(
    files: &[PathBuf],
    target: &Path,
    opts: &RestoreOptions,
    size: u64,
    key: Option<&Key>,
    check: Option<&Baseline>,
) -> anyhow::Result<(Option<u64>, String)> {
    let plan = match key {
        Some(_) => None,
        None => plan_copy(files)?,
    };
    let how = Copier {
        threads: opts.threads.max(1),
        progress: opts.progress.as_ref(),
        check,
        span: None,
    };
    write_restore(target, |tmp| match plan {
        Some(mapped) => copy_mapped(mapped, tmp, opts.format, size, &how),
        None => {
            let format = match opts.format {
                Format::Raw => "raw",
                Format::Qcow2 => "qcow2",
            };
            qemu_img_convert(files, key, tmp, format).map(|_| {
                (
                    None,
                    "qemu-img convert (the backup is encrypted: QEMU decrypts it)".to_string(),
                )
            })
        }
    })
}

/// Copies a mapped chain natively into a new file `out` of `format`: the
/// bytes copied, and the method's name.
pub(super) fn copy_mapped(
    mapped: Mapped,
    out: &Path,
    format: Format,
    size: u64,
    how: &Copier,
) -> anyhow::Result<(Option<u64>, String)> {
    let copy = match format {
        Format::Raw => copy_native,
        Format::Qcow2 => copy_native_qcow2,
    };
    copy(mapped, out, size, how).map(|n| (Some(n), "native".to_string()))
}

/// Runs `write` on a temporary name in `target`'s directory, then renames
/// the result into place (never over a file that appeared meanwhile) and
/// syncs the directory. A failure leaves nothing.
pub(super) fn write_restore<T>(
    target: &Path,
    write: impl FnOnce(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
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
    let result = match write(&tmp) {
        Ok(result) => result,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
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
    Ok(result)
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
            span: None,
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
