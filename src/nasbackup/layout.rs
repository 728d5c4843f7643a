//! The script's layout on the NAS: paths the agent gives, the backup
//! directory a run makes (and removes after a failure, never more), the
//! files' names, and the removal of one backup directory.

use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};
use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// The parts of a path the agent gives relative to the NAS root: plain
/// names only. `.`, `..`, empty parts and absolute paths are refused, so
/// `VM/.` cannot stand for `VM`, nor `.` for the whole NAS.
pub(super) fn plain_parts(path: &str) -> Option<Vec<&str>> {
    let parts: Vec<&str> = path.split('/').collect();
    let plain = !path.is_empty()
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != "..");
    plain.then_some(parts)
}

/// A path the agent gives for one backup: `<instance>/<timestamp>`, the
/// only shape a delete removes and so the only one a backup writes (a
/// backup at `VM/x/y` would be one that no delete could remove).
pub(super) fn backup_parts(path: &str) -> Option<Vec<&str>> {
    plain_parts(path).filter(|p| p.len() == 2)
}

/// Opens directory `root/parts...` one part at a time with
/// `O_NOFOLLOW`: a symlink (or anything but a directory) at any part
/// under `root` is refused, so nothing planted on the NAS leads a run
/// off it or into another VM's backups.
pub(super) fn open_dir_beneath(root: &Path, parts: &[&str]) -> Result<OwnedFd, String> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut dir = openat(AT_FDCWD, root, flags, Mode::empty())
        .map_err(|e| format!("{}: {e}", root.display()))?;
    let mut path = root.to_path_buf();
    for part in parts {
        path.push(part);
        dir = open_in(&dir, part, flags | OFlag::O_NOFOLLOW, &path)?;
    }
    Ok(dir)
}

/// `openat` of one name in `dir`, with the refusal of a symlink said
/// as such.
fn open_in(dir: &OwnedFd, name: &str, flags: OFlag, path: &Path) -> Result<OwnedFd, String> {
    openat(dir, name, flags, Mode::empty()).map_err(|e| match e {
        Errno::ELOOP | Errno::ENOTDIR | Errno::EMLINK => {
            let what = if flags.contains(OFlag::O_DIRECTORY) {
                "a directory"
            } else {
                "a file"
            };
            format!(
                "{} is a symlink or not {what}; nothing on the NAS is followed through a link",
                path.display()
            )
        }
        e => format!("{}: {e}", path.display()),
    })
}

/// Opens file `root/parts...` for reading, with no symlink at any part
/// (the file included), and only if it is a regular file.
pub(super) fn open_file_beneath(root: &Path, parts: &[&str]) -> Result<std::fs::File, String> {
    let (name, dirs) = parts.split_last().ok_or("an empty path")?;
    let dir = open_dir_beneath(root, dirs)?;
    let path = root.join(parts.join("/"));
    let fd = open_in(
        &dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        &path,
    )?;
    let file = std::fs::File::from(fd);
    match file.metadata() {
        Ok(m) if m.is_file() => Ok(file),
        Ok(_) => Err(format!("{} is not a regular file", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The regular files in directory `dir` (opened beneath the mount), or
/// why it holds something else.
fn plain_files(dir: &OwnedFd, path: &Path) -> Result<Vec<String>, String> {
    let fd = dir
        .try_clone()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut listing = Dir::from_fd(fd).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut files = Vec::new();
    for entry in listing.iter() {
        let entry = entry.map_err(|e| format!("{}: {e}", path.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "." || name == ".." {
            continue;
        }
        let regular = fstatat(dir, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|st| {
            SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
        });
        if !regular {
            return Err(format!(
                "{} holds {}, which is not a backup file",
                path.display(),
                path.join(&name).display()
            ));
        }
        files.push(name);
    }
    files.sort();
    Ok(files)
}

/// One run's backup directory, and what the run made of it: after a
/// failure only that is removed, never a directory or file that was there
/// before (another backup, the VM's directory).
pub(super) struct Dest {
    pub(super) path: PathBuf,
    root: PathBuf,
    parts: Vec<String>,
    /// How many of `parts` this run created (the last ones).
    made: usize,
}

impl Dest {
    /// Creates `root/parts...`, one part at a time beneath `root`, never
    /// through a symlink. A directory that already exists is used only if
    /// it is empty: a path that holds another backup (or the VM's
    /// directory itself) is refused with nothing touched.
    pub(super) fn create(root: &Path, parts: &[&str]) -> Result<Dest, String> {
        let whole = root.join(parts.join("/"));
        let failed =
            |e: String| format!("Failed to create backup directory {}: {e}", whole.display());
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let mut dir = openat(AT_FDCWD, root, flags, Mode::empty())
            .map_err(|e| failed(format!("{}: {e}", root.display())))?;
        let mut dest = Dest {
            path: whole.clone(),
            root: root.to_path_buf(),
            parts: parts.iter().map(|p| p.to_string()).collect(),
            made: 0,
        };
        let mut path = root.to_path_buf();
        for part in parts {
            path.push(part);
            match mkdirat(&dir, *part, Mode::from_bits_truncate(0o777)) {
                Ok(()) => dest.made += 1,
                Err(Errno::EEXIST) if dest.made == 0 => {}
                Err(e) => {
                    let _ = dest.remove();
                    return Err(failed(e.to_string()));
                }
            }
            dir = match open_in(&dir, part, flags | OFlag::O_NOFOLLOW, &path) {
                Ok(dir) => dir,
                Err(e) => {
                    let _ = dest.remove();
                    return Err(failed(e));
                }
            };
        }
        if dest.made == 0 {
            let empty = plain_files(&dir, &whole).is_ok_and(|f| f.is_empty());
            if !empty {
                return Err(format!(
                    "Backup directory {} already exists and is not empty; nothing was written or removed",
                    whole.display()
                ));
            }
        }
        Ok(dest)
    }

    /// Removes what this run made: the directories it created with the
    /// files in them, or, in a directory that was there (empty, under the
    /// domain's lock) before, the files in it. Walked beneath the mount,
    /// never through a symlink.
    pub(super) fn remove(&self) -> std::io::Result<()> {
        let parts: Vec<&str> = self.parts.iter().map(String::as_str).collect();
        let kept = parts.len() - self.made;
        for depth in (kept..parts.len()).rev() {
            let parent =
                open_dir_beneath(&self.root, &parts[..depth]).map_err(std::io::Error::other)?;
            let path = self.root.join(parts[..=depth].join("/"));
            match open_dir_beneath(&self.root, &parts[..=depth]) {
                Ok(dir) => {
                    remove_files(&dir, &path)?;
                    unlinkat(&parent, parts[depth], UnlinkatFlags::RemoveDir)?;
                }
                Err(_) if path.symlink_metadata().is_err() => {}
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
        if self.made == 0 {
            let dir = open_dir_beneath(&self.root, &parts).map_err(std::io::Error::other)?;
            remove_files(&dir, &self.path)?;
        }
        Ok(())
    }
}

/// Removes the regular files of `dir`; anything else in it is refused.
fn remove_files(dir: &OwnedFd, path: &Path) -> std::io::Result<()> {
    for name in plain_files(dir, path).map_err(std::io::Error::other)? {
        unlinkat(dir, name.as_str(), UnlinkatFlags::NoRemoveDir)?;
    }
    Ok(())
}

/// The volume part of a backup file's name, as the script derives it.
/// LINSTOR's legacy `/dev/drbdNNNN` paths are mapped to their volume's
/// UUID through udev's `by-res` links; without one the name would be one
/// CloudStack's restore cannot find, so that is an error.
pub(super) fn vol_uuid(path: &str) -> anyhow::Result<String> {
    if let Some(rest) = path.strip_prefix("/dev/drbd/by-res/") {
        let res = rest.split('/').next().unwrap_or(rest);
        return Ok(res.strip_prefix("cs-").unwrap_or(res).to_string());
    }
    if let Some(minor) = path.strip_prefix("/dev/drbd")
        && !minor.is_empty()
        && minor.bytes().all(|b| b.is_ascii_digit())
    {
        return linstor_uuid_of_device(Path::new(path), Path::new(DRBD_BY_RES))
            .with_context(|| format!("Failed to resolve LINSTOR volume UUID for {path}"));
    }
    if let Some(rest) = path.strip_prefix("rbd:") {
        let after_pool = rest.split_once('/').map(|(_, r)| r).unwrap_or(rest);
        return Ok(after_pool
            .split(':')
            .next()
            .unwrap_or(after_pool)
            .to_string());
    }
    Ok(path.rsplit('/').next().unwrap_or(path).to_string())
}

/// Where udev puts DRBD's per-resource links (`cs-<uuid>/0`).
pub(super) const DRBD_BY_RES: &str = "/dev/drbd/by-res";

/// The volume UUID of a DRBD device node: the `cs-<uuid>/<volume>` link
/// under `by_res` that leads to the same device (udev's `by-res` links,
/// read from the filesystem: no udevadm needed, and the same answer).
pub(super) fn linstor_uuid_of_device(device: &Path, by_res: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(device)
        .with_context(|| format!("reading {}", device.display()))?
        .rdev();
    let resources =
        std::fs::read_dir(by_res).with_context(|| format!("reading {}", by_res.display()))?;
    for resource in resources.flatten() {
        let name = resource.file_name().to_string_lossy().into_owned();
        let Some(uuid) = name.strip_prefix("cs-") else {
            continue;
        };
        let Ok(volumes) = std::fs::read_dir(resource.path()) else {
            continue;
        };
        for volume in volumes.flatten() {
            if std::fs::metadata(volume.path()).is_ok_and(|m| m.rdev() == rdev && rdev != 0) {
                return Ok(uuid.to_string());
            }
        }
    }
    bail!(
        "no cs-<uuid> link under {} leads to {}",
        by_res.display(),
        device.display()
    )
}

/// `root` for the first disk, `datadisk` for the others.
pub(super) fn file_name(index: usize, vol: &str) -> String {
    let role = if index == 0 { "root" } else { "datadisk" };
    format!("{role}.{vol}.qcow2")
}

/// `target` relative to directory `from` (both absolute, no `..`).
pub(super) fn relative(from: &Path, target: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = target.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c.as_os_str());
    }
    out
}

/// Where a parent file of an incremental lies: `<instance>/<timestamp>/<file>`
/// under the NAS root, in `instance`'s own backups. `name` is relative to
/// the NAS root, or with `from` (the parts of the file that names it as
/// its backing file) relative to that file's directory, as QEMU resolves a
/// backing name; `..` may climb to the instance's directory, no further.
pub(super) fn parent_parts(
    instance: &str,
    from: Option<&[String]>,
    name: &str,
) -> Result<Vec<String>, String> {
    if name.starts_with('/') {
        return Err(format!("{name:?} is an absolute path"));
    }
    let mut parts: Vec<String> = match from {
        Some(file) => file[..file.len().saturating_sub(1)].to_vec(),
        None => Vec::new(),
    };
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!("{name:?} leaves the NAS"));
                }
            }
            part => parts.push(part.to_string()),
        }
    }
    if parts.len() != 3 || parts[0] != instance {
        return Err(format!(
            "{name:?} is not a backup file of {instance} (<instance>/<timestamp>/<file>)"
        ));
    }
    Ok(parts)
}

/// Removes backup directory `root/<instance>/<timestamp>` (absent is
/// fine), printing each removal as `rm -v` does. Walked on descriptors
/// beneath the mount: a symlink at either part, or anything but plain
/// files inside, is refused before anything is removed.
pub(super) fn remove_backup_dir(
    root: &Path,
    instance: &str,
    stamp: &str,
    out: &mut Vec<String>,
) -> Result<(), String> {
    let dest = root.join(instance).join(stamp);
    let refused = |e: String| format!("{e}; nothing was removed");
    let vm = match open_dir_beneath(root, &[instance]) {
        Ok(vm) => vm,
        Err(_) if std::fs::symlink_metadata(root.join(instance)).is_err() => return Ok(()),
        Err(e) => return Err(refused(e)),
    };
    let dir = match open_in(
        &vm,
        stamp,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        &dest,
    ) {
        Ok(dir) => dir,
        Err(_) if fstatat(&vm, stamp, AtFlags::AT_SYMLINK_NOFOLLOW) == Err(Errno::ENOENT) => {
            return Ok(());
        }
        Err(e) => return Err(refused(e)),
    };
    let rm = |path: &Path, e: Errno| format!("rm: {}: {e}", path.display());
    for name in plain_files(&dir, &dest).map_err(refused)? {
        unlinkat(&dir, name.as_str(), UnlinkatFlags::NoRemoveDir)
            .map_err(|e| rm(&dest.join(&name), e))?;
        say!(out, "removed '{}'", dest.join(&name).display());
    }
    unlinkat(&vm, stamp, UnlinkatFlags::RemoveDir).map_err(|e| rm(&dest, e))?;
    say!(out, "removed directory '{}'", dest.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_as_the_script_derives_them() {
        let uuid = |p: &str| vol_uuid(p).unwrap();
        assert_eq!(uuid("/mnt/pool/0b3f-uuid"), "0b3f-uuid");
        assert_eq!(uuid("/dev/drbd/by-res/cs-53d5c355-d726/0"), "53d5c355-d726");
        assert_eq!(
            uuid("rbd:cloudstack/53d5c355-d726:mon_host=10.0.1.2"),
            "53d5c355-d726"
        );
        assert_eq!(uuid("cloudstack/53d5c355-d726"), "53d5c355-d726");
        // A legacy DRBD node with no by-res link: an error, never a name
        // CloudStack's restore cannot find.
        let e = vol_uuid("/dev/drbd65001").unwrap_err();
        assert!(format!("{e:#}").contains("/dev/drbd65001"), "{e:#}");
        assert_eq!(file_name(0, "a"), "root.a.qcow2");
        assert_eq!(file_name(1, "b"), "datadisk.b.qcow2");
    }

    #[test]
    fn legacy_drbd_devices_map_to_their_by_res_link() {
        let dir = tempfile::tempdir().unwrap();
        let by_res = dir.path().join("by-res");
        for (res, target) in [("cs-aaaa-1111", "/dev/zero"), ("cs-bbbb-2222", "/dev/null")] {
            std::fs::create_dir_all(by_res.join(res)).unwrap();
            std::os::unix::fs::symlink(target, by_res.join(res).join("0")).unwrap();
        }
        std::fs::create_dir_all(by_res.join("other")).unwrap();
        std::os::unix::fs::symlink("/dev/full", by_res.join("other/0")).unwrap();
        assert_eq!(
            linstor_uuid_of_device(Path::new("/dev/null"), &by_res).unwrap(),
            "bbbb-2222"
        );
        // Only cs-<uuid> resources count.
        assert!(linstor_uuid_of_device(Path::new("/dev/full"), &by_res).is_err());
    }

    #[test]
    fn paths_are_plain_names_only() {
        assert_eq!(plain_parts("vm/2026.11.27"), Some(vec!["vm", "2026.11.27"]));
        assert_eq!(plain_parts("vm"), Some(vec!["vm"]));
        for bad in [
            "", ".", "vm/.", "./vm", "vm/..", "/vm", "vm//t", "vm/t/", "..",
        ] {
            assert_eq!(plain_parts(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_failed_run_removes_only_what_it_made() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // A path that holds another backup is refused, untouched.
        std::fs::create_dir_all(root.join("vm/t1")).unwrap();
        std::fs::write(root.join("vm/t1/root.a.qcow2"), b"x").unwrap();
        assert!(Dest::create(root, &["vm", "t1"]).is_err());
        assert!(Dest::create(root, &["vm"]).is_err());
        assert!(root.join("vm/t1/root.a.qcow2").exists());
        // A new one under the existing VM directory: only it goes.
        let dest = Dest::create(root, &["vm", "t2"]).unwrap();
        std::fs::write(dest.path.join("root.a.qcow2"), b"y").unwrap();
        dest.remove().unwrap();
        assert!(!root.join("vm/t2").exists());
        assert!(root.join("vm/t1/root.a.qcow2").exists());
        // A new VM directory: all of it goes.
        let dest = Dest::create(root, &["new", "t1"]).unwrap();
        dest.remove().unwrap();
        assert!(!root.join("new").exists());
        // An empty directory that was there: its files go, it stays.
        std::fs::create_dir(root.join("vm/t3")).unwrap();
        let dest = Dest::create(root, &["vm", "t3"]).unwrap();
        std::fs::write(dest.path.join("root.a.qcow2"), b"z").unwrap();
        dest.remove().unwrap();
        assert!(root.join("vm/t3").is_dir());
        assert_eq!(std::fs::read_dir(root.join("vm/t3")).unwrap().count(), 0);
        // A symlink is not a directory to write into.
        std::os::unix::fs::symlink(root.join("vm"), root.join("link")).unwrap();
        assert!(Dest::create(root, &["link", "t9"]).is_err());
        assert!(!root.join("vm/t9").exists());
    }

    #[test]
    fn parent_paths_relative_and_confined() {
        let root = Path::new("/tmp/csbackup.abcde");
        let dest = root.join("vm/2026.11.27.05.00.00");
        let parts = parent_parts("vm", None, "vm/2026.11.27.04.00.00/root.x.qcow2").unwrap();
        assert_eq!(
            relative(&dest, &root.join(parts.join("/"))),
            Path::new("../2026.11.27.04.00.00/root.x.qcow2")
        );
        // A backing name resolves from its file's directory, and may
        // climb to the instance's directory only.
        assert_eq!(
            parent_parts("vm", Some(&parts), "../2026.11.27.03.00.00/root.x.qcow2").unwrap(),
            ["vm", "2026.11.27.03.00.00", "root.x.qcow2"]
        );
        for (from, bad) in [
            (None, "../etc/passwd"),
            (None, "/etc/passwd"),
            (None, "other/2026.11.27.04.00.00/root.x.qcow2"),
            (None, "vm/root.x.qcow2"),
            (None, "vm/a/b/root.x.qcow2"),
            (Some(&parts[..]), "../../other/t/root.x.qcow2"),
            (Some(&parts[..]), "../../../../etc/passwd"),
            (Some(&parts[..]), "/abs/root.x.qcow2"),
        ] {
            assert!(parent_parts("vm", from, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nothing_is_followed_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("nas");
        let host = dir.path().join("host");
        std::fs::create_dir_all(root.join("other/t1")).unwrap();
        std::fs::write(root.join("other/t1/root.a.qcow2"), b"other's").unwrap();
        std::fs::create_dir_all(host.join("keep")).unwrap();
        std::fs::write(host.join("keep/file"), b"host's").unwrap();
        std::os::unix::fs::symlink(&host, root.join("linked")).unwrap();
        std::os::unix::fs::symlink("other", root.join("alias")).unwrap();
        std::fs::create_dir(root.join("vm")).unwrap();
        std::os::unix::fs::symlink("../other/t1", root.join("vm/t0")).unwrap();
        let mut out = Vec::new();
        // Delete: a link at either part is refused, and nothing goes.
        for (vm, stamp) in [("linked", "keep"), ("alias", "t1"), ("vm", "t0")] {
            let e = remove_backup_dir(&root, vm, stamp, &mut out).unwrap_err();
            assert!(e.contains("symlink"), "{e}");
        }
        assert!(host.join("keep/file").exists());
        assert!(root.join("other/t1/root.a.qcow2").exists());
        assert!(out.is_empty(), "{out:?}");
        // Reading a parent: the same.
        for parts in [["linked", "keep", "file"], ["vm", "t0", "root.a.qcow2"]] {
            let e = open_file_beneath(&root, &parts).unwrap_err();
            assert!(e.contains("symlink"), "{e}");
        }
        std::os::unix::fs::symlink("/etc/passwd", root.join("other/t1/link.qcow2")).unwrap();
        assert!(open_file_beneath(&root, &["other", "t1", "link.qcow2"]).is_err());
        assert!(open_file_beneath(&root, &["other", "t1", "root.a.qcow2"]).is_ok());
        // Writing: no directory is made through a link.
        assert!(Dest::create(&root, &["linked", "t9"]).is_err());
        assert!(!host.join("t9").exists());
        // A directory holding a link is no backup: refused whole.
        std::fs::remove_file(root.join("other/t1/link.qcow2")).unwrap();
        std::fs::create_dir(root.join("vm/t2")).unwrap();
        std::os::unix::fs::symlink(host.join("keep/file"), root.join("vm/t2/root.a.qcow2"))
            .unwrap();
        assert!(remove_backup_dir(&root, "vm", "t2", &mut out).is_err());
        assert!(host.join("keep/file").exists());
        // A plain backup directory goes; an absent one is fine.
        remove_backup_dir(&root, "other", "t1", &mut out).unwrap();
        assert!(!root.join("other/t1").exists());
        remove_backup_dir(&root, "other", "t1", &mut out).unwrap();
        remove_backup_dir(&root, "nothing", "t1", &mut out).unwrap();
        assert_eq!(out.len(), 2, "{out:?}");
    }
}
