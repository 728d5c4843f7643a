//! Setting, changing or removing an image's backing file in place: what
//! `qemu-img rebase -u` does, without QEMU.
//!
//! Only the header cluster changes: the backing file offset and size, the
//! backing-format extension (replaced, added first, or removed) and the name
//! after the extensions. Every other extension is kept byte for byte, and
//! the fixed header too, autoclear bits included: the bitmaps stay valid
//! because no data cluster moves. The new cluster is written with one write
//! at offset 0 and synced.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;

use super::error::{Error, Result};
use super::header::{self, Extension, ext};
use super::image::Image;

/// QEMU's file-posix locks one byte per permission at 100 + bit (held) and
/// 200 + bit (not shared). A write lock over both ranges conflicts with any
/// QEMU that has the image open.
const QEMU_LOCK_START: i64 = 100;
const QEMU_LOCK_LEN: i64 = 200;

fn qemu_range_lock(kind: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: QEMU_LOCK_START,
        l_len: QEMU_LOCK_LEN,
        l_pid: 0,
    }
}

/// Whether any lock conflicts with a write lock over QEMU's lock bytes:
/// a QEMU holds the image.
pub(super) fn qemu_holds(file: &File) -> bool {
    let mut probe = qemu_range_lock(libc::F_WRLCK);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut probe)).is_ok()
        && probe.l_type != libc::F_UNLCK as libc::c_short
}

/// An OFD write lock over QEMU's lock bytes: no QEMU holds the image while
/// it lives, and none can open it.
pub struct QemuLockout<'a> {
    file: &'a File,
}

impl<'a> QemuLockout<'a> {
    pub(crate) fn take(file: &'a File) -> Result<QemuLockout<'a>> {
        match fcntl(file, FcntlArg::F_OFD_SETLK(&qemu_range_lock(libc::F_WRLCK))) {
            Ok(_) => Ok(QemuLockout { file }),
            Err(Errno::EAGAIN | Errno::EACCES) => Err(Error::InUse),
            Err(e) => Err(Error::Writing {
                what: "a lock on the image",
                source: e.into(),
            }),
        }
    }
}

impl Drop for QemuLockout<'_> {
    fn drop(&mut self) {
        // Closing the fd would release the lock too, but a child forked by
        // another thread meanwhile shares the open file description until
        // it execs; unlocking explicitly frees the image at once.
        let _ = fcntl(
            self.file,
            FcntlArg::F_OFD_SETLK(&qemu_range_lock(libc::F_UNLCK)),
        );
    }
}

fn check_name(name: &str, what: &'static str) -> Result<()> {
    if name.is_empty() || name.contains('\0') {
        return Err(Error::BadName { what });
    }
    Ok(())
}

/// Sets the backing file of the image at `path` to `backing` with format
/// `format`, or removes it (and its format) when `backing` is `None`.
///
/// Refuses an image that a QEMU holds, or that has the dirty or corrupt
/// bit set. The name is stored as given: relative names are relative to
/// the image's own directory.
pub fn set_backing(path: &Path, backing: Option<&str>, format: Option<&str>) -> Result<()> {
    match (backing, format) {
        (None, Some(_)) => return Err(Error::FormatWithoutBacking),
        (Some(name), _) => check_name(name, "backing file name")?,
        (None, None) => {}
    }
    if let Some(format) = format {
        check_name(format, "backing format")?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| Error::Opening {
            path: path.into(),
            source,
        })?;
    let _lockout = QemuLockout::take(&file)?;
    let image = Image::from_file(&file, path)?;
    let h = image.header();
    if h.dirty() {
        return Err(Error::Unsafe { flag: "dirty" });
    }
    if h.corrupt() {
        return Err(Error::Unsafe { flag: "corrupt" });
    }
    // Guest data is the data file itself: nothing can fall through.
    if backing.is_some()
        && image.hc.data_file.is_some()
        && h.autoclear_features & header::autoclear::DATA_FILE_RAW != 0
    {
        return Err(Error::BackingWithRawDataFile);
    }

    let mut extensions = image.hc.extensions.clone();
    let format_ext = format.map(|f| Extension {
        kind: ext::BACKING_FORMAT,
        data: f.as_bytes().to_vec(),
    });
    match (
        extensions
            .iter()
            .position(|e| e.kind == ext::BACKING_FORMAT),
        format_ext,
    ) {
        (Some(i), Some(e)) => extensions[i] = e,
        (Some(i), None) => {
            extensions.remove(i);
        }
        (None, Some(e)) => extensions.insert(0, e),
        (None, None) => {}
    }
    let cluster = header::serialize(&image.hc.raw_header, &extensions, backing, h.cluster_size())?;
    file.write_all_at(&cluster, 0)
        .map_err(|source| Error::Writing {
            what: "the header cluster",
            source,
        })?;
    file.sync_data().map_err(|source| Error::Writing {
        what: "the header cluster (sync)",
        source,
    })
}
