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
