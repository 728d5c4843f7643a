//! Writing around the page cache (O_DIRECT), where the filesystem allows
//! it. A backup or restore writes each byte once: through the page cache
//! it only evicts the host's useful pages, and on the machines measured
//! here the kernel spent 3 to 4 times longer finding pages for a buffered
//! write than the device took for a direct one.

use std::fs::{File, OpenOptions};

/// Alignment of O_DIRECT writes: offset, length and buffer.
pub const ALIGN: u64 = 4096;

/// A second handle on `file` that writes with O_DIRECT; `None` where the
/// filesystem refuses it (tmpfs, some FUSE mounts).
pub fn reopen(file: &File) -> Option<File> {
    reopen_with(file, OpenOptions::new().write(true))
}

/// Whether `data` written at `at` meets O_DIRECT's alignment.
pub fn aligned(data: &[u8], at: u64) -> bool {
    at % ALIGN == 0
        && data.len() as u64 % ALIGN == 0
        && data.as_ptr().align_offset(ALIGN as usize) == 0
}

/// Writes `buf` at `at` of `file`: through `direct` (its O_DIRECT handle)
/// where the write is aligned and the filesystem takes it, else through
/// the page cache.
pub fn write_all_at(
    file: &File,
    direct: Option<&File>,
    buf: &[u8],
    at: u64,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    match direct {
        Some(direct) if aligned(buf, at) => match direct.write_all_at(buf, at) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => file.write_all_at(buf, at),
            other => other,
        },
        _ => file.write_all_at(buf, at),
    }
}

/// Reads `buf` at `at` of `file`, as [`write_all_at`] writes.
pub fn read_exact_at(
    file: &File,
    direct: Option<&File>,
    buf: &mut [u8],
    at: u64,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    match direct {
        Some(direct) if aligned(buf, at) => match direct.read_exact_at(buf, at) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => file.read_exact_at(buf, at),
            other => other,
        },
        _ => file.read_exact_at(buf, at),
    }
}

/// A second handle on `file` that reads with O_DIRECT; `None` where the
/// filesystem refuses it. A restore reads each byte of a backup file
/// once: a cold file read through the page cache, by several threads at
/// once, cost the kernel several times the device's time here.
pub fn reopen_read(file: &File) -> Option<File> {
    reopen_with(file, OpenOptions::new().read(true))
}

/// `file` opened again through /proc with `options` and O_DIRECT.
fn reopen_with(file: &File, options: &mut OpenOptions) -> Option<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    options
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
}
