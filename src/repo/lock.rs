//! The per-VM locks: flocks on `<vm>/.lock` (writers) and `<vm>/.readers`
//! (readers shared, deleters exclusive), each with a note of who holds it
//! so a refused run can say. Lock files are opened without following
//! symlinks and never truncated before the lock is held.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::error::{Error, Result};

/// Held for a run that changes a VM's backups; released on drop.
#[derive(Debug)]
pub struct VmLock {
    vm: String,
    dir: PathBuf,
    /// This run made the VM's directory.
    created: bool,
    _file: Flock<File>,
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| Error::Io {
            action: "opening the lock",
            path: path.into(),
            source,
        })
}

fn holder_of(file: &mut File) -> String {
    let mut holder = String::new();
    let _ = file.take(4096).read_to_string(&mut holder);
    let holder = holder.trim();
    if holder.is_empty() {
        "another process".into()
    } else {
        holder.to_string()
    }
}

fn write_note(file: &mut Flock<File>, path: &Path, purpose: &str) -> Result<()> {
    let note = format!(
        "pid {} ({purpose}, since {})",
        std::process::id(),
        super::time::Utc::now().rfc3339()
    );
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| file.write_all(note.as_bytes()))
        .and_then(|_| file.flush())
        .map_err(|source| Error::Io {
            action: "writing the lock note",
            path: path.into(),
            source,
        })
}

impl VmLock {
    /// The VM this lock is for.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    pub(crate) fn acquire(vm: &str, dir: &Path, purpose: &str, created: bool) -> Result<VmLock> {
        let path = dir.join(".lock");
        let file = open_lock_file(&path)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, _)) => {
                return Err(Error::Locked {
                    vm: vm.to_string(),
                    holder: holder_of(&mut file),
                });
            }
        };
        write_note(&mut file, &path, purpose)?;
        Ok(VmLock {
            vm: vm.to_string(),
            dir: dir.into(),
            created,
            _file: file,
        })
    }

    /// Releases the lock; if this run made the VM's directory and nothing
    /// but the lock file is in it, removes both, so a run that failed
    /// before writing anything leaves nothing behind.
    pub fn release_unused(self) {
        if !self.created {
            return;
        }
        let only_lock = std::fs::read_dir(&self.dir).is_ok_and(|entries| {
            entries
                .filter_map(|e| e.ok())
                .all(|e| e.file_name() == ".lock")
        });
        if only_lock {
            let _ = std::fs::remove_file(self.dir.join(".lock"));
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// A lock on a VM's backup files against deletion (shared, held by
/// readers) or against readers (exclusive, held by prune and consolidate).
#[derive(Debug)]
pub struct ReadLock {
    _file: Flock<File>,
}

impl ReadLock {
    /// The lock's descriptor: a process that inherits it holds the lock
    /// as long as it keeps it open.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self._file.as_fd()
    }

    pub(crate) fn acquire(
        vm: &str,
        dir: &Path,
        purpose: &str,
        exclusive: bool,
    ) -> Result<ReadLock> {
        let path = dir.join(".readers");
        let file = open_lock_file(&path)?;
        let arg = if exclusive {
            FlockArg::LockExclusiveNonblock
        } else {
            FlockArg::LockSharedNonblock
        };
        let mut file = match Flock::lock(file, arg) {
            Ok(locked) => locked,
            Err((mut file, _)) => {
                return Err(Error::InUse {
                    vm: vm.to_string(),
                    holder: if exclusive {
                        "a restore, verify or export that reads them".into()
                    } else {
                        holder_of(&mut file)
                    },
                });
            }
        };
        // Shared holders do not write a note: they would overwrite each
        // other's; the note is for whoever waits on an exclusive holder.
        if exclusive {
            write_note(&mut file, &path, purpose)?;
        }
        Ok(ReadLock { _file: file })
    }
}
