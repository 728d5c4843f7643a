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

/// Whether every page of the `len` bytes at `at` of `file` is in the page
/// cache: a file the host read lately (a `verify` before a restore, a
/// download), which a buffered read serves from memory where O_DIRECT
/// would read it from the disk again. `false` where it cannot be told.
pub fn resident(file: &File, at: u64, len: usize) -> bool {
    use nix::libc;
    use std::os::fd::AsRawFd;
    const PAGE: u64 = 4096;
    if len == 0 {
        return false;
    }
    let start = at / PAGE * PAGE;
    let Some(map_len) = (at + len as u64)
        .checked_sub(start)
        .and_then(|n| usize::try_from(n).ok())
    else {
        return false;
    };
    let Ok(offset) = libc::off_t::try_from(start) else {
        return false;
    };
    let mut pages = vec![0u8; map_len.div_ceil(PAGE as usize)];
    // SAFETY: a read-only shared mapping of the file's own range that is
    // never read through (mincore looks at page tables only) and is
    // unmapped before returning; `pages` holds one byte per page of it.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            offset,
        );
        if addr == libc::MAP_FAILED {
            return false;
        }
        let seen = libc::mincore(addr, map_len, pages.as_mut_ptr()) == 0;
        libc::munmap(addr, map_len);
        seen && pages.iter().all(|p| p & 1 == 1)
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

#[cfg(test)]
mod tests {
    use super::resident;
    use std::io::Write;

    #[test]
    fn pages_just_written_are_resident_and_dropped_ones_are_not() {
        let dir = std::env::temp_dir().join(format!("bitback-resident-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 0).unwrap();
        assert!(resident(&f, 0, 1 << 20));
        assert!(resident(&f, 4096 + 17, 8192));
        nix::fcntl::posix_fadvise(
            &f,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        assert!(!resident(&f, 0, 1 << 20));
        assert!(!resident(&f, 0, 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
