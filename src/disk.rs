//! What a volume's image is and how its changes are tracked: found by the
//! QEMU layer, recorded by the repository's manifests, decided on by the
//! plan. Below all three, so that none defines it for the others.

use serde::{Deserialize, Serialize};

/// The kinds of disk that matter for change tracking: only qcow2 v3 can
/// store a dirty bitmap in the image; every other kind is tracked by a
/// bitmap in QEMU's memory, which lives only as long as the QEMU process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskKind {
    /// qcow2 version 3 (`compat=1.1`), on a file or a block device.
    Qcow2,
    /// qcow2 version 2 (`compat=0.10`): no room for bitmaps.
    Qcow2V2,
    /// A raw image in a file.
    RawFile,
    /// A raw block device: LVM, DRBD, a loop device, ...
    RawDevice,
    /// Any other format (luks, vmdk, ...).
    Other,
}

/// How a volume's changes between backups are recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tracking {
    /// A bitmap stored in the image: survives QEMU restarts.
    Persistent,
    /// A bitmap in QEMU's memory: lost when the QEMU process ends.
    Memory,
}

impl DiskKind {
    pub fn tracking(self) -> Tracking {
        match self {
            DiskKind::Qcow2 => Tracking::Persistent,
            _ => Tracking::Memory,
        }
    }

    /// How an operator would name it.
    pub fn describe(self) -> &'static str {
        match self {
            DiskKind::Qcow2 => "qcow2 image",
            DiskKind::Qcow2V2 => "qcow2 v2 image",
            DiskKind::RawFile => "raw image",
            DiskKind::RawDevice => "raw block device",
            DiskKind::Other => "image of a format without persistent bitmaps",
        }
    }

    /// What the operator can do to get persistent tracking, if anything.
    pub fn hint(self) -> Option<&'static str> {
        match self {
            DiskKind::Qcow2V2 => Some(
                "`qemu-img amend -f qcow2 -o compat=1.1 IMAGE` (VM stopped) lets it keep a persistent bitmap",
            ),
            _ => None,
        }
    }
}

impl std::fmt::Display for Tracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tracking::Persistent => "persistent",
            Tracking::Memory => "in memory",
        })
    }
}

/// Who holds the file at `path` open: `pid (command)` of every process
/// with a descriptor on it, and `a QEMU (image lock)` when a process this
/// host cannot see (another mount namespace's, another NFS client's) holds
/// QEMU's image lock on it. Empty when nothing does, or `path` is no
/// regular file. A running VM's disk is never replaced or removed while
/// this says anything.
pub fn holders(path: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Vec::new();
    };
    if !meta.is_file() {
        return Vec::new();
    }
    let (dev, ino) = (meta.dev(), meta.ino());
    let Some(name) = path.file_name() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let me = std::process::id().to_string();
    for proc in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = proc.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        // Only a descriptor whose path ends in the same name is stat'ed:
        // a stat of every open file would wait on any hung NFS mount.
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| target.file_name() == Some(name))
                && std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino)
        });
        if holds {
            let comm = std::fs::read_to_string(proc.path().join("comm")).unwrap_or_default();
            found.push(format!("{pid} ({})", comm.trim()));
        }
    }
    if found.is_empty()
        && let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(path)
        && crate::qcow2::qemu_holds(&file)
    {
        found.push("a QEMU (image lock)".into());
    }
    found
}

/// The loop devices whose backing file is `path` (`/dev/loopN`), as the
/// kernel records them: a loop device holds its file without a
/// descriptor any process shows.
pub fn loop_devices_on(path: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        if std::path::Path::new(backing.trim_end_matches('\n')) == path {
            found.push(format!("/dev/{name}"));
        }
    }
    found.sort();
    found
}

/// How many backing files [`mark_allocated`] follows before it gives up.
const MAX_CHAIN: usize = 64;

/// Sets in `mask` every range of the volume whose image is `path` (QEMU's
/// format driver `format`, `size` bytes) that may hold data: what any
/// qcow2 layer of its chain maps (data, compressed or zero clusters), and
/// what a raw file at the bottom holds (`SEEK_DATA`). Never less than the
/// image holds as it is read: an allocated range stays allocated until the
/// guest discards it. The backing files followed must be `chain`, the
/// ones QEMU opened, in order. `Ok(false)` when the image cannot say (a
/// raw block device, another format, a chain other than QEMU's): the
/// caller copies the whole disk.
pub fn mark_allocated(
    path: &std::path::Path,
    format: &str,
    size: u64,
    chain: &[String],
    mask: &mut crate::qcow2::Mask,
) -> anyhow::Result<bool> {
    use crate::qcow2::{Error, Image, Kind};
    use anyhow::{Context, bail};
    match format {
        "qcow2" => {}
        "raw" => return mark_raw(path, size, mask),
        _ => return Ok(false),
    }
    let mut image = Image::open(path).with_context(|| format!("reading {}", path.display()))?;
    if image.header().size != size {
        bail!(
            "{} holds {} bytes, QEMU's node {size}: not the image QEMU has open",
            path.display(),
            image.header().size
        );
    }
    for depth in 0..MAX_CHAIN {
        let file = std::fs::File::open(&image.path)
            .with_context(|| format!("opening {}", image.path.display()))?;
        crate::qcow2::walk(&file, &image, |e| {
            if e.kind != Kind::Unallocated {
                mask.set(e.start, e.length);
            }
            Ok(())
        })
        .with_context(|| format!("reading the cluster map of {}", image.path.display()))?;
        let Some(backing) = image.full_backing_path() else {
            return Ok(chain.len() == depth);
        };
        if chain.get(depth).map(std::path::Path::new) != Some(backing.as_path()) {
            return Ok(false);
        }
        // A raw file ends the chain.
        let bottom = chain.len() == depth + 1;
        // As QEMU opens it: the format the image names, else probed.
        image = match image.hc.backing_format.as_deref() {
            Some("qcow2") => Image::open(&backing)?,
            Some("raw") if bottom => return mark_raw(&backing, size, mask),
            Some(_) => return Ok(false),
            None => match Image::open(&backing) {
                Ok(image) => image,
                Err(Error::BadMagic { .. }) if bottom => return mark_raw(&backing, size, mask),
                Err(Error::BadMagic { .. }) => return Ok(false),
                Err(e) => return Err(e.into()),
            },
        };
    }
    bail!(
        "{}: a backing chain longer than {MAX_CHAIN}",
        path.display()
    )
}

/// [`mark_allocated`] of a raw file: its data ranges (`SEEK_DATA`), within
/// the disk's `size`. A block device says nothing (`Ok(false)`).
fn mark_raw(
    path: &std::path::Path,
    size: u64,
    mask: &mut crate::qcow2::Mask,
) -> anyhow::Result<bool> {
    use anyhow::Context;
    use nix::unistd::{Whence, lseek};
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if !file.metadata()?.is_file() {
        return Ok(false);
    }
    let mut at: i64 = 0;
    let end = size.min(file.metadata()?.len()) as i64;
    while at < end {
        let start = match lseek(&file, at, Whence::SeekData) {
            Ok(start) => start,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e).with_context(|| format!("seeking data in {}", path.display())),
        };
        let stop = lseek(&file, start, Whence::SeekHole)
            .with_context(|| format!("seeking a hole in {}", path.display()))?;
        mask.set(start as u64, (stop.min(end) - start).max(0) as u64);
        at = stop;
    }
    Ok(true)
}
