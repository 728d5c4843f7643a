//! A multipart upload fed while its file is written ([`Feed`]): the
//! streaming qcow2 writer hands it each write as it makes it
//! ([`crate::qcow2::Tap`]), so the object is in the bucket moments after
//! the file is complete, and its data is not read again to be sent.
//!
//! ```text
//!  part 1                  part 2        part 3          last part
//!  [0 .. HEAD)             [HEAD ..+size)[..+size)  ...  [.. len)
//!  header (written last)   data, in the order the writer appends it, then the tables
//!  + the first data
//! ```
//!
//! The file's first [`HEAD`] bytes are kept in memory and go last, as
//! part 1, once the header (written last) is in them. Past them the writer
//! only appends; each part is sealed once the writes pass its end, with
//! the CRC32C of the bytes as they were written (computed from the
//! writer's own buffer, the one its cluster digests were taken from).
//!
//! **Never a wait for the writer.** A backup's writes can hold up the
//! guest's (copy-before-write), so the tap only copies and sums: a part
//! is kept in memory while the process's feeds hold less than [`HOLD`]
//! bytes of parts, and otherwise read back from the file as it is sent, a MiB at a
//! time, when an uploader gets to it (its bytes checked against the
//! CRC32C taken in flight as they are read, and by the store against the
//! same CRC32C sent ahead of them: a file changed since is not stored).
//! A slow or stopped store costs memory up to [`HOLD`] and then disk
//! reads, never the writer's time.
//!
//! **Parts grow with the file**: 16 MiB, or a 1024th of the bytes before
//! them once that is more (whole MiB), so that S3's 10,000 parts hold
//! any object it takes (5 TiB in about 7,000) and a small file's parts
//! stay small enough to keep.
//!
//! **What it cannot follow** ends it: a write behind bytes already fed
//! (the streaming writer makes none once tapped: a cluster written again
//! moves to the end). The upload is then aborted
//! and the file goes up the usual way, after it is complete.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use super::Error;
use super::client::{Client, FileRange, Part, PartBody, PartSum};

/// Part 1: the file's first bytes, kept in memory and sent last, since
/// the header in them is written last. At least S3's least part (5 MiB).
pub const HEAD: u64 = 8 << 20;

/// Bytes of parts one feed keeps in memory while they wait for an
/// uploader; past that, parts are read back from the file.
pub const HOLD: u64 = 64 << 20;

/// A multipart upload of one file, fed as the file is written; see the
/// module's notes. Give [`Feed::tap`] to the writer, then call
/// [`Feed::finish`] once the file is complete. Dropped unfinished, it
/// aborts its upload (on a thread of its own).
pub struct Feed {
    shared: Arc<Shared>,
    client: Arc<Client>,
    key: String,
    upload: String,
    sum: PartSum,
    uploaders: Vec<JoinHandle<()>>,
    finished: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct State {
    /// Bytes `0..HEAD` as written (zeros where nothing was).
    head: Vec<u8>,
    /// Where the next appended byte goes (from `HEAD` on).
    end: u64,
    /// The part being filled.
    open: Open,
    /// Parts sealed, waiting for an uploader.
    queue: VecDeque<Sealed>,
    /// The next part's number (part 1 is the head).
    number: u16,
    /// Why the feed cannot go on (a write it cannot follow, a part the
    /// store refused, a file changed under it): nothing more is sent.
    stopped: Option<Error>,
    /// No more parts will be sealed.
    closed: bool,
    /// Parts uploaded.
    parts: Vec<(u16, Part)>,
    /// Where the file is, for reading parts back and for messages.
    path: PathBuf,
    /// Where its parts are kept.
    budget: &'static Budget,
}

/// The part being filled.
struct Open {
    at: u64,
    /// Its size, once full.
    size: u64,
    len: u64,
    crc: u32,
    /// Its bytes, when it is kept in memory.
    bytes: Option<Kept>,
}

impl Open {
    /// The part that begins at byte `at`, kept in memory if `budget`
    /// has room for it.
    fn at(at: u64, budget: &'static Budget) -> Open {
        const MIB: u64 = 1 << 20;
        let size = (16 * MIB).max((at / 1024).div_ceil(MIB) * MIB);
        Open {
            at,
            size,
            len: 0,
            crc: 0,
            bytes: budget.take(size),
        }
    }
}

/// Bytes of parts kept in memory, by all the feeds of a process: at most
/// [`HOLD`] (a VM of many volumes feeds them all at once).
pub(super) struct Budget(pub(super) AtomicU64);

static KEPT: Budget = Budget(AtomicU64::new(0));

impl Budget {
    /// Room for a part of `size` bytes, if there is.
    fn take(&'static self, size: u64) -> Option<Kept> {
        let mut now = self.0.load(Ordering::Relaxed);
        loop {
            if now + size > HOLD {
                return None;
            }
            match self
                .0
                .compare_exchange(now, now + size, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(Kept {
                        bytes: Vec::with_capacity(size as usize),
                        size,
                        budget: self,
                    });
                }
                Err(was) => now = was,
            }
        }
    }
}

/// A part's bytes kept in memory, and their room in a [`Budget`] (given
/// back when they go).
struct Kept {
    bytes: Vec<u8>,
    size: u64,
    budget: &'static Budget,
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.budget.0.fetch_sub(self.size, Ordering::AcqRel);
    }
}

/// A part whose bytes are all written.
struct Sealed {
    number: u16,
    at: u64,
    len: u64,
    crc: u32,
    bytes: Option<Kept>,
}

/// The writer's side of a [`Feed`].
struct FeedTap(Arc<Shared>);

impl crate::qcow2::Tap for FeedTap {
    fn written(&mut self, at: u64, bytes: &[u8]) {
        let mut s = self.0.lock();
        if s.stopped.is_none() && s.take(at, bytes) {
            self.0.changed.notify_all();
        }
    }
}

impl State {
    /// Takes the write of `bytes` at `at`; whether a part was sealed.
    fn take(&mut self, at: u64, bytes: &[u8]) -> bool {
        let stop = at.saturating_add(bytes.len() as u64);
        if at < HEAD {
            let n = (stop.min(HEAD) - at) as usize;
            self.head[at as usize..at as usize + n].copy_from_slice(&bytes[..n]);
        }
        if stop <= HEAD {
            return false;
        }
        let (from, bytes) = match at < HEAD {
            true => (HEAD, &bytes[(HEAD - at) as usize..]),
            false => (at, bytes),
        };
        if from < self.end {
            self.stop(Error::Unfollowed(format!(
                "{}: a write at byte {from}, behind the {} bytes already fed",
                self.path.display(),
                self.end
            )));
            return false;
        }
        let mut sealed = self.zeros(from - self.end);
        sealed |= self.append(bytes);
        sealed
    }

    /// Appends `n` zero bytes (a gap the writer left: it reads as zeros).
    fn zeros(&mut self, mut n: u64) -> bool {
        const ZEROS: [u8; 4096] = [0; 4096];
        let mut sealed = false;
        while n > 0 {
            let k = n.min(ZEROS.len() as u64);
            sealed |= self.append(&ZEROS[..k as usize]);
            n -= k;
        }
        sealed
    }

    fn append(&mut self, mut bytes: &[u8]) -> bool {
        let mut sealed = false;
        while !bytes.is_empty() {
            let room = (self.open.size - self.open.len) as usize;
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.open.crc = crc32c::crc32c_append(self.open.crc, now);
            if let Some(kept) = &mut self.open.bytes {
                kept.bytes.extend_from_slice(now);
            }
            self.open.len += now.len() as u64;
            self.end += now.len() as u64;
            bytes = rest;
            if self.open.len == self.open.size {
                self.seal();
                sealed = true;
            }
        }
        sealed
    }

    /// Queues the open part, and opens the next one at the end.
    fn seal(&mut self) {
        if self.open.len == 0 {
            return;
        }
        let next = Open::at(self.end, self.budget);
        let open = std::mem::replace(&mut self.open, next);
        self.queue.push_back(Sealed {
            number: self.number,
            at: open.at,
            len: open.len,
            crc: open.crc,
            bytes: open.bytes,
        });
        match self.number.checked_add(1).filter(|n| *n <= 10_000) {
            Some(n) => self.number = n,
            None => self.stop(Error::Unfollowed(format!(
                "{}: over 10,000 parts",
                self.path.display()
            ))),
        }
    }

    fn stop(&mut self, why: Error) {
        if self.stopped.is_none() {
            self.stopped = Some(why);
        }
        self.queue.clear();
    }
}

impl Client {
    /// Begins a multipart upload of `key`, under `retention` when given,
    /// fed as the file at `path` is written ([`Feed`]).
    pub fn feed(
        self: &Arc<Client>,
        key: &str,
        path: &Path,
        retention: Option<&super::Retention>,
    ) -> Result<Feed, Error> {
        self.feed_in(key, path, retention, &KEPT)
    }

    /// [`Client::feed`], keeping parts in `budget`.
    pub(super) fn feed_in(
        self: &Arc<Client>,
        key: &str,
        path: &Path,
        retention: Option<&super::Retention>,
        budget: &'static Budget,
    ) -> Result<Feed, Error> {
        let file = std::fs::File::open(path).map_err(|e| Error::Local {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let (upload, sum) = self.start_upload(key, retention)?;
        let open = Open::at(HEAD, budget);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                head: vec![0; HEAD as usize],
                end: HEAD,
                open,
                queue: VecDeque::new(),
                number: 2,
                stopped: None,
                closed: false,
                parts: Vec::new(),
                path: path.to_path_buf(),
                budget,
            }),
            changed: Condvar::new(),
        });
        let file = Arc::new(file);
        let uploaders = (0..super::UPLOADERS)
            .map(|_| {
                let (shared, client, file) = (shared.clone(), self.clone(), file.clone());
                let (key, upload) = (key.to_string(), upload.clone());
                std::thread::spawn(move || uploader(&shared, &client, &file, (&key, &upload, sum)))
            })
            .collect();
        Ok(Feed {
            shared,
            client: self.clone(),
            key: key.to_string(),
            upload,
            sum,
            uploaders,
            finished: false,
        })
    }
}

/// One uploader: takes sealed parts (those kept in memory first, then the
/// oldest) and sends them, until the feed is closed or stopped.
fn uploader(
    shared: &Shared,
    client: &Client,
    file: &std::fs::File,
    (key, upload, sum): (&str, &str, PartSum),
) {
    let direct = crate::direct::reopen_read(file);
    let path = shared.lock().path.clone();
    loop {
        let part = {
            let mut s = shared.lock();
            loop {
                if s.stopped.is_some() {
                    return;
                }
                let kept = s.queue.iter().position(|p| p.bytes.is_some());
                if let Some(part) = s.queue.remove(kept.unwrap_or(0)) {
                    break part;
                }
                if s.closed {
                    return;
                }
                s = shared
                    .changed
                    .wait(s)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        crate::fault::point("feed-mid-upload");
        let body = match &part.bytes {
            Some(kept) => PartBody::Bytes(&kept.bytes),
            None => PartBody::Range(FileRange {
                file,
                direct: direct.as_ref(),
                path: &path,
                at: part.at,
                len: part.len,
                crc: part.crc,
            }),
        };
        let sent = client.upload_part(key, (upload, sum), part.number, body);
        let number = part.number;
        // Its room in the budget goes back before the next part is taken.
        drop(part);
        let mut s = shared.lock();
        match sent {
            Ok(done) => s.parts.push((number, done)),
            Err(e) => s.stop(e),
        }
        shared.changed.notify_all();
    }
}

impl Feed {
    /// What the writer hands each write to.
    pub fn tap(&self) -> Box<dyn crate::qcow2::Tap> {
        Box::new(FeedTap(self.shared.clone()))
    }

    /// After the file's last write (it is `len` bytes long): the last
    /// parts and the head sent, and the object made. The bytes uploaded.
    /// A feed that could not follow the file, or whose parts the store
    /// refused, aborts its upload and says why.
    pub fn finish(mut self, len: u64) -> Result<u64, Error> {
        self.finished = true;
        let ended = self.end(len);
        let done = ended.and_then(|()| {
            // The uploaders are gone: what they left is taken out, and
            // nothing is held while the head goes.
            let (head, mut parts) = {
                let mut s = self.shared.lock();
                (std::mem::take(&mut s.head), std::mem::take(&mut s.parts))
            };
            let first = self.client.upload_part(
                &self.key,
                (&self.upload, self.sum),
                1,
                PartBody::Bytes(&head[..len.min(HEAD) as usize]),
            )?;
            parts.push((1, first));
            parts.sort_by_key(|(n, _)| *n);
            let parts: Vec<Part> = parts.into_iter().map(|(_, p)| p).collect();
            self.client
                .complete_multipart(&self.key, &self.upload, &parts)?;
            Ok(len)
        });
        if done.is_err() {
            let _ = self.client.abort_upload(&self.key, &self.upload);
        }
        done
    }

    /// Seals what is left of a file `len` bytes long, and waits for the
    /// uploaders.
    fn end(&mut self, len: u64) -> Result<(), Error> {
        {
            let mut s = self.shared.lock();
            if s.stopped.is_none() && len > HEAD {
                if s.end > len {
                    let why = format!(
                        "{}: {} bytes fed to a file of {len}",
                        s.path.display(),
                        s.end
                    );
                    s.stop(Error::Unfollowed(why));
                } else {
                    let gap = len - s.end;
                    s.zeros(gap);
                    s.seal();
                    // Nothing follows the last part: its successor's room
                    // in the budget goes back at once.
                    s.open.bytes = None;
                }
            }
            s.closed = true;
            self.shared.changed.notify_all();
        }
        for u in self.uploaders.drain(..) {
            let _ = u.join();
        }
        match self.shared.lock().stopped.take() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        {
            let mut s = self.shared.lock();
            s.stop(Error::Unfollowed("abandoned".into()));
            s.closed = true;
            self.shared.changed.notify_all();
        }
        // Off the dropping thread (a runtime's, maybe): an uploader may
        // be waiting on a stalled store, and the abort may too. A process
        // that ends first leaves the upload to the next run's cleanup.
        let uploaders = std::mem::take(&mut self.uploaders);
        let (client, key, upload) = (self.client.clone(), self.key.clone(), self.upload.clone());
        std::thread::spawn(move || {
            for u in uploaders {
                let _ = u.join();
            }
            let _ = client.abort_upload(&key, &upload);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_grow_so_that_10000_hold_5_tib() {
        const MIB: u64 = 1 << 20;
        let none: &'static Budget = Box::leak(Box::new(Budget(AtomicU64::new(HOLD))));
        assert_eq!(Open::at(HEAD, none).size, 16 * MIB);
        assert_eq!(Open::at(16 << 30, none).size, 16 * MIB);
        assert_eq!(Open::at(32 << 30, none).size, 32 * MIB);
        let (mut end, mut parts) = (HEAD, 1u32);
        while end < 5 << 40 {
            let open = Open::at(end, none);
            assert!(open.size >= 5 * MIB && open.size % MIB == 0);
            end += open.size;
            parts += 1;
        }
        assert!(parts <= 7_500, "{parts} parts for 5 TiB");
    }

    #[test]
    fn parts_are_kept_while_the_budget_has_room_and_give_it_back() {
        const MIB: u64 = 1 << 20;
        let budget: &'static Budget = Box::leak(Box::new(Budget(AtomicU64::new(0))));
        let kept: Vec<Open> = (0..4).map(|_| Open::at(HEAD, budget)).collect();
        assert!(kept.iter().all(|o| o.bytes.is_some()));
        assert!(Open::at(HEAD, budget).bytes.is_none(), "past HOLD");
        drop(kept);
        assert_eq!(budget.0.load(Ordering::Relaxed), 0);
        // A part larger than what is left is not kept.
        let _most = budget.take(HOLD - 8 * MIB).unwrap();
        assert!(Open::at(HEAD, budget).bytes.is_none());
    }
}
