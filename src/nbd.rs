//! bitback's NBD server: one export on one connection, so that a backup
//! job's target can be bitback itself (QEMU's `nbd` block driver on a
//! passed socket) and bitback writes the backup file.
//!
//! The protocol's fixed newstyle handshake (`NBD_OPT_GO`, `NBD_OPT_INFO`,
//! `NBD_OPT_EXPORT_NAME`, `NBD_OPT_LIST`, `NBD_OPT_ABORT`; every other
//! option, structured replies included, is answered unsupported, and a
//! client goes on with simple replies), then `READ`, `WRITE`,
//! `WRITE_ZEROES`, `TRIM`, `FLUSH` and `DISC`. The client is not trusted:
//! a request past the export's end or of an unknown command gets an error
//! reply; one whose framing cannot be followed (a bad magic, a payload
//! above [`MAX_PAYLOAD`]) ends the connection with an error; neither
//! harms the server's process.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest request payload accepted (QEMU sends at most 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 << 20;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1 << 0;
const TFLAG_READ_ONLY: u16 = 1 << 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// What an export does with the client's requests.
pub trait Export {
    /// The export's size in bytes.
    fn size(&self) -> u64;
    /// The client is told it may not write, and a write it sends anyway
    /// is refused (EPERM) before the export sees it.
    fn read_only(&self) -> bool {
        false
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()>;
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Data may be dropped; a backup target keeps it (the default).
    fn trim(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Work on each write's bytes that needs nothing of the export's state
    /// (a backup file's per-cluster digests), for a thread of its own to
    /// do ahead of [`Export::write_prepared`], overlapping the export's
    /// work on the writes before; none by default.
    fn prepare(&self) -> Option<Prepare> {
        None
    }
    /// [`Export::write`], with what [`Export::prepare`]'s function gave
    /// for these bytes.
    fn write_prepared(
        &mut self,
        offset: u64,
        data: &[u8],
        _prepared: &[[u8; 16]],
    ) -> io::Result<()> {
        self.write(offset, data)
    }
}

/// See [`Export::prepare`]: from a write's offset and bytes, 16-byte
/// values the export takes with them.
pub type Prepare = std::sync::Arc<dyn Fn(u64, &[u8]) -> Vec<[u8; 16]> + Send + Sync>;

/// Why a connection ended badly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NBD connection: {0}")]
    Io(#[from] io::Error),
    #[error("NBD client broke the protocol: {0}")]
    Protocol(String),
    #[error("NBD client ended the handshake without choosing the export")]
    Aborted,
}

/// What a connection did, once it ended with the client's `DISC` (or its
/// close after the handshake).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Served {
    pub writes: u64,
    pub bytes_written: u64,
    pub zero_bytes: u64,
    /// Requests answered with an error (the export failed them).
    pub failed: u64,
}

/// Serves `export` under `name` on `conn` until the client disconnects;
/// gives the export back with how the connection ended. Requests are read
/// while earlier ones are carried out (on a thread of their own, in
/// order), and replies go back in that order.
pub async fn serve<C, E>(conn: C, name: &str, export: E) -> (Result<Served, Error>, E)
where
    C: AsyncRead + AsyncWrite + Unpin,
    E: Export + Send + 'static,
{
    let (mut rx, mut tx) = buffered(conn);
    let offer = [Offer::of(name, &export)];
    if let Err(e) = handshake(&mut rx, &mut tx, &offer).await {
        return (Err(e), export);
    }
    transmission(rx, tx, export).await
}

/// A connection's two halves, buffered both ways: a request's header and
/// payload come out of one read, and the replies to a batch of requests
/// go in one write.
fn buffered<C: AsyncRead + AsyncWrite>(
    conn: C,
) -> (
    tokio::io::BufReader<tokio::io::ReadHalf<C>>,
    tokio::io::BufWriter<tokio::io::WriteHalf<C>>,
) {
    let (rx, tx) = tokio::io::split(conn);
    (
        tokio::io::BufReader::with_capacity(16 << 10, rx),
        tokio::io::BufWriter::with_capacity(64 << 10, tx),
    )
}

/// Serves whichever of `exports` (name, export) the client chooses on
/// `conn`, until it disconnects; the others are dropped unused.
pub async fn serve_one_of<C, E>(conn: C, exports: Vec<(String, E)>) -> Result<Served, Error>
where
    C: AsyncRead + AsyncWrite + Unpin,
    E: Export + Send + 'static,
{
    let (mut rx, mut tx) = buffered(conn);
    let offers: Vec<Offer> = exports.iter().map(|(n, e)| Offer::of(n, e)).collect();
    let chosen = handshake(&mut rx, &mut tx, &offers).await?;
    let Some((_, export)) = exports.into_iter().nth(chosen) else {
        return Err(Error::Aborted);
    };
    transmission(rx, tx, export).await.0
}

/// An export as the handshake offers it.
struct Offer<'a> {
    name: &'a str,
    size: u64,
    flags: u16,
}

impl Offer<'_> {
    fn of<'a, E: Export>(name: &'a str, export: &E) -> Offer<'a> {
        Offer {
            name,
            size: export.size(),
            flags: transmission_flags(export.read_only()),
        }
    }
}

async fn reply_opt<W: AsyncWrite + Unpin>(
    tx: &mut W,
    option: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut head = Vec::with_capacity(20 + data.len());
    head.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    head.extend_from_slice(&option.to_be_bytes());
    head.extend_from_slice(&kind.to_be_bytes());
    head.extend_from_slice(&(data.len() as u32).to_be_bytes());
    head.extend_from_slice(data);
    tx.write_all(&head).await
}

fn transmission_flags(read_only: bool) -> u16 {
    match read_only {
        true => TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH,
        false => {
            TFLAG_HAS_FLAGS
                | TFLAG_SEND_FLUSH
                | TFLAG_SEND_FUA
                | TFLAG_SEND_TRIM
                | TFLAG_SEND_WRITE_ZEROES
        }
    }
}

/// The fixed newstyle handshake, up to the transmission phase: which of
/// `offers` the client chose.
async fn handshake<R, W>(rx: &mut R, tx: &mut W, offers: &[Offer<'_>]) -> Result<usize, Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    tx.write_all(&hello).await?;
    tx.flush().await?;
    let client_flags = rx.read_u32().await?;
    if client_flags & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(Error::Protocol(
            "the client does not speak fixed newstyle".into(),
        ));
    }
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    loop {
        tx.flush().await?;
        if rx.read_u64().await? != IHAVEOPT {
            return Err(Error::Protocol("an option without IHAVEOPT".into()));
        }
        let option = rx.read_u32().await?;
        let len = rx.read_u32().await?;
        if len > 65536 {
            return Err(Error::Protocol(format!("an option of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        rx.read_exact(&mut data).await?;
        match option {
            OPT_EXPORT_NAME => {
                let Some(chosen) = offers.iter().position(|o| o.name.as_bytes() == data) else {
                    // This option has no error reply: the connection ends.
                    return Err(Error::Protocol(format!(
                        "unknown export {:?}",
                        String::from_utf8_lossy(&data)
                    )));
                };
                let offer = &offers[chosen];
                let mut out = Vec::new();
                out.extend_from_slice(&offer.size.to_be_bytes());
                out.extend_from_slice(&offer.flags.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                tx.write_all(&out).await?;
                tx.flush().await?;
                return Ok(chosen);
            }
            OPT_ABORT => {
                let _ = reply_opt(tx, option, REP_ACK, &[]).await;
                let _ = tx.flush().await;
                return Err(Error::Aborted);
            }
            OPT_LIST => {
                for offer in offers {
                    let mut entry = (offer.name.len() as u32).to_be_bytes().to_vec();
                    entry.extend_from_slice(offer.name.as_bytes());
                    reply_opt(tx, option, REP_SERVER, &entry).await?;
                }
                reply_opt(tx, option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some((asked, requests)) = parse_info(&data) else {
                    reply_opt(tx, option, REP_ERR_INVALID, &[]).await?;
                    continue;
                };
                let Some(chosen) = offers.iter().position(|o| o.name.as_bytes() == asked) else {
                    reply_opt(tx, option, REP_ERR_UNKNOWN, &[]).await?;
                    continue;
                };
                let offer = &offers[chosen];
                let mut export = INFO_EXPORT.to_be_bytes().to_vec();
                export.extend_from_slice(&offer.size.to_be_bytes());
                export.extend_from_slice(&offer.flags.to_be_bytes());
                reply_opt(tx, option, REP_INFO, &export).await?;
                if requests.contains(&INFO_BLOCK_SIZE) {
                    let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for v in [1u32, 64 << 10, MAX_PAYLOAD] {
                        sizes.extend_from_slice(&v.to_be_bytes());
                    }
                    reply_opt(tx, option, REP_INFO, &sizes).await?;
                }
                reply_opt(tx, option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    tx.flush().await?;
                    return Ok(chosen);
                }
            }
            _ => reply_opt(tx, option, REP_ERR_UNSUP, &[]).await?,
        }
    }
}

/// `NBD_OPT_INFO`/`GO` data: the export name and the info types asked.
fn parse_info(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + len)?;
    let rest = data.get(4 + len..)?;
    let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let list = rest.get(2..2 + 2 * count)?;
    if rest.len() != 2 + 2 * count {
        return None;
    }
    Some((
        name,
        list.chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

async fn reply<W: AsyncWrite + Unpin>(
    tx: &mut W,
    error: u32,
    handle: u64,
    data: &[u8],
) -> io::Result<()> {
    // The header, then the data as it is: no copy of the data.
    let mut head = [0u8; 16];
    head[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    head[4..8].copy_from_slice(&error.to_be_bytes());
    head[8..].copy_from_slice(&handle.to_be_bytes());
    tx.write_all(&head).await?;
    tx.write_all(data).await
}

fn errno(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(28) => ENOSPC,
        _ if e.kind() == io::ErrorKind::InvalidInput => EINVAL,
        _ => EIO,
    }
}

/// One request, as the worker carries it out.
enum Op {
    Write {
        handle: u64,
        offset: u64,
        data: Payload,
        /// What [`Export::prepare`]'s function gave, if there is one.
        prepared: Vec<[u8; 16]>,
    },
    Zeroes {
        handle: u64,
        offset: u64,
        len: u64,
    },
    Trim {
        handle: u64,
        offset: u64,
        len: u64,
    },
    Flush {
        handle: u64,
    },
    Read {
        handle: u64,
        offset: u64,
        len: u32,
    },
    /// Answered with this error, nothing done.
    Refuse {
        handle: u64,
        error: u32,
    },
}

/// A write's bytes, starting on a 4 KiB boundary in memory, so that an
/// export can hand them to an O_DIRECT descriptor as they are. Its buffer
/// goes back to the connection's [`Buffers`] when dropped.
struct Payload {
    buf: Vec<u8>,
    start: usize,
    len: usize,
    buffers: Buffers,
}

/// The alignment of [`Payload`]s.
pub const PAYLOAD_ALIGN: usize = 4096;

/// Write buffers a connection used and may use again: a backup job sends
/// gigabytes in requests of one size, and a new buffer for each costs
/// zeroing it and faulting its pages in.
#[derive(Clone, Default)]
struct Buffers(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl Buffers {
    /// At most this many are kept (QEMU's NBD client has 16 requests in
    /// flight).
    const KEPT: usize = 32;

    fn take(&self, len: usize) -> Payload {
        let want = len + PAYLOAD_ALIGN;
        let reused = {
            let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
            kept.iter()
                .position(|b| b.len() >= want)
                .map(|i| kept.swap_remove(i))
        };
        // A kept buffer's old bytes are overwritten before they are read.
        let buf = reused.unwrap_or_else(|| vec![0u8; want]);
        let start = buf.as_ptr().align_offset(PAYLOAD_ALIGN);
        Payload {
            buf,
            start,
            len,
            buffers: self.clone(),
        }
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        let mut kept = self.buffers.0.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() < Buffers::KEPT {
            kept.push(buf);
        }
    }
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

struct Reply {
    handle: u64,
    error: u32,
    data: Vec<u8>,
}

async fn transmission<R, W, E>(
    mut rx: tokio::io::BufReader<R>,
    mut tx: W,
    export: E,
) -> (Result<Served, Error>, E)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    E: Export + Send + 'static,
{
    let size = export.size();
    let read_only = export.read_only();
    let (ops, mut todo) = tokio::sync::mpsc::channel::<Op>(64);
    // With a preparer, requests pass through its thread first.
    let (ops, preparer) = match export.prepare() {
        Some(prepare) => {
            let (raw, mut incoming) = tokio::sync::mpsc::channel::<Op>(64);
            let stage = tokio::task::spawn_blocking(move || {
                while let Some(mut op) = incoming.blocking_recv() {
                    if let Op::Write {
                        offset,
                        data,
                        prepared,
                        ..
                    } = &mut op
                    {
                        *prepared = prepare(*offset, data.bytes());
                    }
                    if ops.blocking_send(op).is_err() {
                        break;
                    }
                }
            });
            (raw, Some(stage))
        }
        None => (ops, None),
    };
    let (replies, mut answered) = tokio::sync::mpsc::unbounded_channel::<Reply>();
    let worker = tokio::task::spawn_blocking(move || {
        let mut export = export;
        let mut served = Served::default();
        while let Some(op) = todo.blocking_recv() {
            let reply = carry_out(&mut export, op, &mut served);
            if replies.send(reply).is_err() {
                break;
            }
        }
        (export, served)
    });
    let reader = read_requests(&mut rx, size, read_only, ops);
    let writer = async {
        while let Some(r) = answered.recv().await {
            reply(&mut tx, r.error, r.handle, &r.data).await?;
            while let Ok(r) = answered.try_recv() {
                reply(&mut tx, r.error, r.handle, &r.data).await?;
            }
            tx.flush().await?;
        }
        tx.flush().await
    };
    let (read, wrote) = tokio::join!(reader, writer);
    if let Some(stage) = preparer
        && let Err(e) = stage.await
    {
        std::panic::resume_unwind(e.into_panic());
    }
    let (export, served) = match worker.await {
        Ok(done) => done,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    let result = match (read, wrote) {
        (Err(e), _) => Err(e),
        (Ok(()), Err(e)) => Err(Error::Io(e)),
        (Ok(()), Ok(())) => Ok(served),
    };
    (result, export)
}

/// Reads requests until the client's `DISC` or close, handing each to the
/// worker. Ends with an error where the framing cannot be followed.
async fn read_requests<R: AsyncRead + Unpin>(
    rx: &mut tokio::io::BufReader<R>,
    size: u64,
    read_only: bool,
    ops: tokio::sync::mpsc::Sender<Op>,
) -> Result<(), Error> {
    let buffers = Buffers::default();
    loop {
        let magic = match rx.read_u32().await {
            Ok(magic) => magic,
            // A client that closes between requests has disconnected.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let _flags = rx.read_u16().await?;
        let kind = rx.read_u16().await?;
        let handle = rx.read_u64().await?;
        let offset = rx.read_u64().await?;
        let len = rx.read_u32().await?;
        if magic != REQUEST_MAGIC {
            return Err(Error::Protocol(format!("a request with magic {magic:#x}")));
        }
        let in_range = offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= size);
        let op = match kind {
            CMD_WRITE => {
                if len > MAX_PAYLOAD {
                    return Err(Error::Protocol(format!("a write of {len} bytes")));
                }
                let mut data = buffers.take(len as usize);
                rx.read_exact(data.bytes_mut()).await?;
                match in_range {
                    _ if read_only => Op::Refuse {
                        handle,
                        error: EPERM,
                    },
                    true => Op::Write {
                        handle,
                        offset,
                        data,
                        prepared: Vec::new(),
                    },
                    false => Op::Refuse {
                        handle,
                        error: ENOSPC,
                    },
                }
            }
            CMD_READ if len > MAX_PAYLOAD => {
                return Err(Error::Protocol(format!("a read of {len} bytes")));
            }
            CMD_READ if in_range => Op::Read {
                handle,
                offset,
                len,
            },
            CMD_READ => Op::Refuse {
                handle,
                error: EINVAL,
            },
            CMD_WRITE_ZEROES | CMD_TRIM if read_only => Op::Refuse {
                handle,
                error: EPERM,
            },
            CMD_WRITE_ZEROES | CMD_TRIM if !in_range => Op::Refuse {
                handle,
                error: ENOSPC,
            },
            CMD_WRITE_ZEROES => Op::Zeroes {
                handle,
                offset,
                len: u64::from(len),
            },
            CMD_TRIM => Op::Trim {
                handle,
                offset,
                len: u64::from(len),
            },
            CMD_FLUSH => Op::Flush { handle },
            CMD_DISC => return Ok(()),
            // Unknown, or known but not offered (CACHE, BLOCK_STATUS,
            // RESIZE): none carries a payload to skip.
            _ => Op::Refuse {
                handle,
                error: EINVAL,
            },
        };
        if ops.send(op).await.is_err() {
            return Ok(());
        }
    }
}

/// Carries out one request on the worker's thread.
fn carry_out<E: Export + ?Sized>(export: &mut E, op: Op, served: &mut Served) -> Reply {
    let done = |handle: u64, result: io::Result<()>, served: &mut Served| match result {
        Ok(()) => Reply {
            handle,
            error: 0,
            data: Vec::new(),
        },
        Err(e) => {
            served.failed += 1;
            Reply {
                handle,
                error: errno(&e),
                data: Vec::new(),
            }
        }
    };
    match op {
        Op::Write {
            handle,
            offset,
            data,
            prepared,
        } => {
            served.writes += 1;
            served.bytes_written += data.bytes().len() as u64;
            let written = export.write_prepared(offset, data.bytes(), &prepared);
            done(handle, written, served)
        }
        Op::Zeroes {
            handle,
            offset,
            len,
        } => {
            served.zero_bytes += len;
            done(handle, export.write_zeroes(offset, len), served)
        }
        Op::Trim {
            handle,
            offset,
            len,
        } => done(handle, export.trim(offset, len), served),
        Op::Flush { handle } => done(handle, export.flush(), served),
        Op::Read {
            handle,
            offset,
            len,
        } => {
            let mut data = vec![0u8; len as usize];
            match export.read(offset, &mut data) {
                Ok(()) => Reply {
                    handle,
                    error: 0,
                    data,
                },
                Err(e) => {
                    served.failed += 1;
                    Reply {
                        handle,
                        error: errno(&e),
                        data: Vec::new(),
                    }
                }
            }
        }
        Op::Refuse { handle, error } => {
            served.failed += 1;
            Reply {
                handle,
                error,
                data: Vec::new(),
            }
        }
    }
}

impl Export for crate::qcow2::Stream {
    fn size(&self) -> u64 {
        crate::qcow2::Stream::size(self)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        crate::qcow2::Stream::write(self, offset, data).map_err(into_io)
    }

    fn prepare(&self) -> Option<Prepare> {
        let digester = self.digester()?;
        Some(std::sync::Arc::new(digester))
    }

    fn write_prepared(
        &mut self,
        offset: u64,
        data: &[u8],
        prepared: &[[u8; 16]],
    ) -> io::Result<()> {
        crate::qcow2::Stream::write_prepared(self, offset, data, prepared).map_err(into_io)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        crate::qcow2::Stream::write_zeroes(self, offset, len).map_err(into_io)
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        crate::qcow2::Stream::read(self, offset, buf).map_err(into_io)
    }
}

/// A writer's error as the I/O error the client is told: its own errno
/// when it has one (ENOSPC from a full disk), else EIO.
fn into_io(e: crate::qcow2::Error) -> io::Error {
    use std::error::Error as _;
    let os = e
        .source()
        .and_then(|s| s.downcast_ref::<io::Error>())
        .and_then(io::Error::raw_os_error);
    match os {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::other(e.to_string()),
    }
}
