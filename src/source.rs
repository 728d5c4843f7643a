//! Where bytes are read from by offset: a file, memory (tests,
//! fuzzing), or whatever else implements [`Source`] (an object version in
//! a bucket). The qcow2 reader, the digests and the restore's copy all
//! read through it.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Where bytes come from: a file, or memory (tests, fuzzing).
pub trait Source {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn size(&self) -> std::io::Result<u64>;
}

impl Source for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    /// A regular file's length, or a block device's (a qcow2 image on an
    /// LVM volume), which its metadata gives as 0.
    fn size(&self) -> std::io::Result<u64> {
        let meta = self.metadata()?;
        if meta.is_file() {
            return Ok(meta.len());
        }
        use std::io::Seek;
        let mut file = self;
        file.seek(std::io::SeekFrom::End(0))
    }
}

impl Source for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start.checked_add(buf.len()) {
            Some(end) if end <= self.len() => {
                buf.copy_from_slice(&self[start..end]);
                Ok(())
            }
            _ => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }

    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len() as u64)
    }
}
