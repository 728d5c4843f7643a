//! BLAKE3 of whole files on every core.
//!
//! BLAKE3 is a tree hash: a file splits into aligned pieces whose subtree
//! hashes (chaining values) can be computed apart and merged. Each thread
//! reads and hashes whole pieces with `pread`, so reading is parallel too;
//! the result is the same hash as one sequential pass.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

/// Bytes a thread hashes at a time: a power of two, so every piece starts
/// on a subtree boundary.
const PIECE: u64 = 64 << 20;
/// Bytes read per call.
const READ: usize = 1 << 20;

/// `blake3:<hex>` of a whole file.
pub fn file(path: &Path) -> std::io::Result<String> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    Ok(format!(
        "blake3:{}",
        hash(&file, len, PIECE, threads)?.to_hex()
    ))
}

fn hash(file: &File, len: u64, piece: u64, threads: usize) -> std::io::Result<blake3::Hash> {
    debug_assert!(piece.is_power_of_two() && piece >= 1024);
    if len <= piece {
        let mut hasher = blake3::Hasher::new();
        feed(file, 0, len, &mut hasher)?;
        return Ok(hasher.finalize());
    }
    let pieces = len.div_ceil(piece) as usize;
    let cvs = Mutex::new(vec![[0u8; 32]; pieces]);
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.clamp(1, pieces))
            .map(|_| {
                scope.spawn(|| -> std::io::Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= pieces {
                            return Ok(());
                        }
                        let start = i as u64 * piece;
                        let mut hasher = blake3::Hasher::new();
                        hasher.set_input_offset(start);
                        feed(file, start, piece.min(len - start), &mut hasher)?;
                        let cv = hasher.finalize_non_root();
                        cvs.lock().unwrap_or_else(|e| e.into_inner())[i] = cv;
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("a hashing thread panicked")))
        })
    })?;
    let cvs = cvs.into_inner().unwrap_or_else(|e| e.into_inner());
    let left = left_subtree_len(len);
    Ok(merge_subtrees_root(
        &merged(&cvs, 0, left, piece),
        &merged(&cvs, left, len - left, piece),
        Mode::Hash,
    ))
}

/// The chaining value of the subtree over `len` bytes at `start`, from the
/// pieces' values. A subtree larger than a piece splits at a power of two
/// at least a piece long, so always between pieces.
fn merged(cvs: &[ChainingValue], start: u64, len: u64, piece: u64) -> ChainingValue {
    if len <= piece {
        return cvs[(start / piece) as usize];
    }
    let left = left_subtree_len(len);
    merge_subtrees_non_root(
        &merged(cvs, start, left, piece),
        &merged(cvs, start + left, len - left, piece),
        Mode::Hash,
    )
}

fn feed(file: &File, start: u64, len: u64, hasher: &mut blake3::Hasher) -> std::io::Result<()> {
    let mut buf = vec![0u8; READ.min(len as usize)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(READ as u64) as usize;
        file.read_exact_at(&mut buf[..n], start + done)?;
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn equals_one_sequential_pass_at_every_boundary() {
        let piece = 4096;
        let mut data = vec![0u8; 9 * piece as usize + 3000];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let p = piece as usize;
        for len in [
            0,
            1,
            1023,
            1024,
            1025,
            p - 1,
            p,
            p + 1,
            2 * p,
            2 * p + 1,
            3 * p,
            5 * p - 7,
            8 * p,
            8 * p + 1,
            9 * p + 3000,
        ] {
            let mut f = File::create(&path).unwrap();
            f.write_all(&data[..len]).unwrap();
            drop(f);
            let f = File::open(&path).unwrap();
            for threads in [1, 2, 3] {
                assert_eq!(
                    hash(&f, len as u64, piece, threads).unwrap(),
                    blake3::hash(&data[..len]),
                    "length {len}, {threads} threads"
                );
            }
        }
    }

    #[test]
    fn a_file_shorter_than_its_length_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let f = File::open(&path).unwrap();
        assert!(hash(&f, 20_000, 4096, 2).is_err());
    }
}
