//! The NAS, mounted in a mount namespace of bitback's own, and the
//! per-domain lock.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use super::Options;

/// Gives this process a mount namespace of its own, private from the
/// host's, before any thread starts (`unshare` moves only the calling
/// thread). The NAS is then mounted in it alone, and a bitback killed
/// mid-run leaves no mount behind: the namespace dies with its last
/// process. QEMU never needs the mount (backup files reach it as passed
/// descriptors); bitback's children (qemu-img, the libvirt proxy, virsh)
/// share the namespace. Where it cannot be had (no CAP_SYS_ADMIN), the
/// host's is used, as the script does.
pub fn private_mounts() {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    let made = unshare(CloneFlags::CLONE_NEWNS).and_then(|()| {
        // Mounts made here must not propagate back to the host.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
    });
    if let Err(e) = made {
        tracing::debug!(error = %e, "no private mount namespace; mounting in the host's");
    }
}

/// The NAS, mounted on a fresh `/tmp/csbackup.XXXXX`.
pub(super) struct Mount {
    pub(super) point: PathBuf,
    mounted: bool,
}

impl Mount {
    /// Mounts the NAS; on failure prints why and gives the exit code.
    pub(super) fn new(o: &Options, out: &mut Vec<String>) -> Result<Mount, u8> {
        let mut failed = |message: String| {
            say!(out, "{message}");
            1
        };
        let point =
            fresh_dir().map_err(|e| failed(format!("Failed to create a mount point: {e}")))?;
        let mut opts = o.mount_opts.clone();
        if o.nas_type == "cifs" {
            opts.push_str(",nobrl");
        }
        let opts = opts.trim_start_matches(',').to_string();
        let mut cmd = Command::new("mount");
        cmd.args(["-t", &o.nas_type, &o.storage]).arg(&point);
        if !opts.is_empty() {
            cmd.args(["-o", &opts]);
        }
        let ok = cmd.output().map(|out| {
            if !out.status.success() {
                eprint!("{}", String::from_utf8_lossy(&out.stderr));
            }
            out.status.success()
        });
        if ok.unwrap_or(false) {
            Ok(Mount {
                point,
                mounted: true,
            })
        } else {
            let _ = std::fs::remove_dir(&point);
            Err(failed(format!("Failed to mount {} store", o.nas_type)))
        }
    }

    /// Unmounts and removes the mount point; what failed, if anything.
    pub(super) fn release(&mut self) -> Vec<String> {
        let mut failed = Vec::new();
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.point)
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                self.mounted = false;
            } else {
                failed.push(format!("Failed to unmount {}", self.point.display()));
            }
        }
        if !self.mounted && std::fs::remove_dir(&self.point).is_err() {
            failed.push(format!(
                "Failed to remove mount point {}",
                self.point.display()
            ));
        }
        failed
    }
}

impl Mount {
    /// Releases the mount after the operation worked: success, or
    /// `failed_code` (printing what failed) when the release did not.
    pub(super) fn finish(mut self, failed_code: u8, out: &mut Vec<String>) -> u8 {
        let failed = self.release();
        if failed.is_empty() {
            return 0;
        }
        for line in failed {
            say!(out, "{line}");
        }
        failed_code
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// `/tmp/csbackup.XXXXX`, created fresh.
pub(super) fn fresh_dir() -> std::io::Result<PathBuf> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    for attempt in 0..100u128 {
        let n = blake3::hash(format!("{seed}-{}-{attempt}", std::process::id()).as_bytes());
        let name: String = n.to_hex()[..5].to_string();
        let dir = std::env::temp_dir().join(format!("csbackup.{name}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free /tmp/csbackup.XXXXX name"))
}

/// Holds the per-domain lock for the run: the agent does not kill a run
/// that timed out, and may start another.
pub(super) fn lock_domain(vm: &str) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let dir = Path::new("/run/lock");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let name: String = vm
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = dir.join(format!("bitback-nasbackup-{name}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        anyhow::anyhow!(
            "another backup of domain {vm} is running (lock {})",
            path.display()
        )
    })
}
