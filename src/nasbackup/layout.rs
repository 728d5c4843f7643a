//! The script's layout on the NAS: paths the agent gives, the backup
//! directory a run makes (and removes after a failure, never more), the
//! files' names, and the removal of one backup directory.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};

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

/// One run's backup directory, and what the run made of it: after a
/// failure only that is removed, never a directory or file that was there
/// before (another backup, the VM's directory).
pub(super) struct Dest {
    pub(super) path: PathBuf,
    /// The topmost directory this run created, if it created any.
    made: Option<PathBuf>,
}

impl Dest {
    /// Creates `root/parts...`. A directory that already exists is used
    /// only if it is empty: a path that holds another backup (or the
    /// VM's directory itself) is refused with nothing touched.
    pub(super) fn create(root: &Path, parts: &[&str]) -> Result<Dest, String> {
        let mut path = root.to_path_buf();
        let mut made = None;
        for part in parts {
            path.push(part);
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    if made.is_none() {
                        made = Some(path.clone());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
                    if !dir {
                        return Err(format!(
                            "Failed to create backup directory {}: {} exists and is not a directory",
                            root.join(parts.join("/")).display(),
                            path.display()
                        ));
                    }
                }
                Err(e) => {
                    let dest = Dest { path, made };
                    let _ = dest.remove();
                    return Err(format!(
                        "Failed to create backup directory {}: {e}",
                        root.join(parts.join("/")).display()
                    ));
                }
            }
        }
        if made.is_none() {
            let empty = std::fs::read_dir(&path)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty {
                return Err(format!(
                    "Backup directory {} already exists and is not empty; nothing was written or removed",
                    path.display()
                ));
            }
        }
        Ok(Dest { path, made })
    }

    /// Removes what this run made: the directories it created with all
    /// in them, or, in a directory that was there (empty, under the
    /// domain's lock) before, the files in it.
    pub(super) fn remove(&self) -> std::io::Result<()> {
        match &self.made {
            Some(top) => match std::fs::remove_dir_all(top) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
            None => {
                for entry in std::fs::read_dir(&self.path)? {
                    let entry = entry?;
                    if entry.file_type()?.is_file() {
                        std::fs::remove_file(entry.path())?;
                    }
                }
                Ok(())
            }
        }
    }
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

/// A lexically cleaned path (no `.`, `..` resolved): parent paths come
/// from CloudStack, relative to the mount root, and must stay under it.
pub(super) fn under(root: &Path, relative: &str) -> Option<PathBuf> {
    let mut out = root.to_path_buf();
    for c in Path::new(relative).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// Removes backup directory `dest` (absent is fine), printing each removal
/// as `rm -v` does. Anything but a directory of plain files is refused
/// before anything is removed.
pub(super) fn remove_backup_dir(dest: &Path, out: &mut Vec<String>) -> Result<(), String> {
    let rm = |path: &Path, e: std::io::Error| format!("rm: {}: {e}", path.display());
    match std::fs::symlink_metadata(dest) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(rm(dest, e)),
        Ok(m) if !m.is_dir() => {
            return Err(format!(
                "{} is not a backup directory; nothing was removed",
                dest.display()
            ));
        }
        Ok(_) => {}
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dest).map_err(|e| rm(dest, e))? {
        let entry = entry.map_err(|e| rm(dest, e))?;
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            return Err(format!(
                "{} holds {}, which is not a backup file; nothing was removed",
                dest.display(),
                entry.path().display()
            ));
        }
        files.push(entry.path());
    }
    files.sort();
    for file in files {
        std::fs::remove_file(&file).map_err(|e| rm(&file, e))?;
        say!(out, "removed '{}'", file.display());
    }
    std::fs::remove_dir(dest).map_err(|e| rm(dest, e))?;
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
        let parent = under(root, "vm/2026.11.27.04.00.00/root.x.qcow2").unwrap();
        assert_eq!(
            relative(&dest, &parent),
            Path::new("../2026.11.27.04.00.00/root.x.qcow2")
        );
        assert_eq!(under(root, "../etc/passwd"), None);
        assert_eq!(under(root, "/etc/passwd"), None);
    }
}
