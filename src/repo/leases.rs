//! `<vm>/.serving/`: a lease file per serve of one of the VM's points (a
//! mount or a live restore, on any host), which keeps prune and
//! consolidate off while the serve may still read the point. What a lease
//! says is the serving wing's (`engine::serve::runtime::Lease`); the
//! files are the repository's: their names, their atomic writes, their
//! listing and their removal.

use std::io;
use std::path::{Path, PathBuf};

/// The leases' directory inside a VM's directory.
pub const DIR: &str = ".serving";

/// The lease file of serve `name` on host `host`, in VM directory
/// `vm_dir`: `<host>--<name>.json`, the host's name reduced to letters,
/// digits and `._-`.
pub fn lease_file(vm_dir: &Path, host: &str, name: &str) -> PathBuf {
    let host: String = host
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' | '-' => c,
            _ => '_',
        })
        .collect();
    vm_dir.join(DIR).join(format!("{host}--{name}.json"))
}

/// Writes `bytes` as the lease at `path`, aside and then renamed into
/// place (a reader never sees half a lease). `Ok(false)` when this user
/// cannot write the repository (read-only: no prune of it runs here
/// either).
pub fn write_lease(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("a lease is in a directory"))?;
    let tmp = path.with_extension("json.tmp");
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    match written {
        Ok(()) => Ok(true),
        Err(e)
            if e.raw_os_error() == Some(nix::libc::EROFS)
                || e.kind() == io::ErrorKind::PermissionDenied =>
        {
            Ok(false)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The lease files in VM directory `vm_dir`, sorted (none when it has no
/// leases' directory).
pub fn lease_files(vm_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(vm_dir.join(DIR)) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths
}

/// Removes the lease at `path`; one gone already is no error.
pub fn remove_lease(path: &Path) {
    let _ = std::fs::remove_file(path);
}
