//! The per-VM lock: an exclusive flock on `<vm>/.lock`, with a note of who
//! holds it so a refused run can say.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use super::error::{Error, Result};

/// Held for a run that changes a VM's backups; released on drop.
#[derive(Debug)]
pub struct VmLock {
    vm: String,
    _file: Flock<File>,
}

impl VmLock {
    /// The VM this lock is for.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    pub(crate) fn acquire(vm: &str, dir: &Path, purpose: &str) -> Result<VmLock> {
        let path = dir.join(".lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| Error::Io {
                action: "opening the lock",
                path: path.clone(),
                source,
            })?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, _)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(Error::Locked {
                    vm: vm.to_string(),
                    holder: if holder.is_empty() {
                        "another process".into()
                    } else {
                        holder.to_string()
                    },
                });
            }
        };
        // Who holds it, for the message another run prints.
        let note = format!(
            "pid {} ({purpose}, since {})",
            std::process::id(),
            super::time::Utc::now().rfc3339()
        );
        let written = file
            .set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(note.as_bytes()))
            .and_then(|_| file.flush());
        if let Err(source) = written {
            return Err(Error::Io {
                action: "writing the lock note",
                path,
                source,
            });
        }
        Ok(VmLock {
            vm: vm.to_string(),
            _file: file,
        })
    }
}
