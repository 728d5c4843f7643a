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

const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// What an export does with the client's requests.
pub trait Export {
    /// The export's size in bytes.
    fn size(&self) -> u64;
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
}

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

/// Serves `export` under `name` on `conn` until the client disconnects.
pub async fn serve<C, E>(conn: C, name: &str, export: &mut E) -> Result<Served, Error>
where
    C: AsyncRead + AsyncWrite + Unpin,
    E: Export + ?Sized,
{
    let (rx, tx) = tokio::io::split(conn);
    // Buffered both ways: a request's header and payload come out of one
    // read, and the replies to a batch of requests go in one write.
    let mut rx = tokio::io::BufReader::with_capacity(4 << 20, rx);
    let mut tx = tokio::io::BufWriter::with_capacity(64 << 10, tx);
    handshake(&mut rx, &mut tx, name, export.size()).await?;
    transmission(&mut rx, &mut tx, export).await
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

fn transmission_flags() -> u16 {
    TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES
}

/// The fixed newstyle handshake, up to the transmission phase.
async fn handshake<R, W>(rx: &mut R, tx: &mut W, name: &str, size: u64) -> Result<(), Error>
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
                if data != name.as_bytes() {
                    // This option has no error reply: the connection ends.
                    return Err(Error::Protocol(format!(
                        "unknown export {:?}",
                        String::from_utf8_lossy(&data)
                    )));
                }
                let mut out = Vec::new();
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&transmission_flags().to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                tx.write_all(&out).await?;
                tx.flush().await?;
                return Ok(());
            }
            OPT_ABORT => {
                let _ = reply_opt(tx, option, REP_ACK, &[]).await;
                let _ = tx.flush().await;
                return Err(Error::Aborted);
            }
            OPT_LIST => {
                let mut entry = (name.len() as u32).to_be_bytes().to_vec();
                entry.extend_from_slice(name.as_bytes());
                reply_opt(tx, option, REP_SERVER, &entry).await?;
                reply_opt(tx, option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some((asked, requests)) = parse_info(&data) else {
                    reply_opt(tx, option, REP_ERR_INVALID, &[]).await?;
                    continue;
                };
                if asked != name.as_bytes() {
                    reply_opt(tx, option, REP_ERR_UNKNOWN, &[]).await?;
                    continue;
                }
                let mut export = INFO_EXPORT.to_be_bytes().to_vec();
                export.extend_from_slice(&size.to_be_bytes());
                export.extend_from_slice(&transmission_flags().to_be_bytes());
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
                    return Ok(());
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
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(data);
    tx.write_all(&out).await
}

fn errno(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(28) => ENOSPC,
        _ if e.kind() == io::ErrorKind::InvalidInput => EINVAL,
        _ => EIO,
    }
}

async fn transmission<R, W, E>(
    rx: &mut tokio::io::BufReader<R>,
    tx: &mut W,
    export: &mut E,
) -> Result<Served, Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    E: Export + ?Sized,
{
    let mut served = Served::default();
    let size = export.size();
    let mut payload = Vec::new();
    loop {
        // Replies wait in the buffer while more requests are buffered;
        // before waiting for the client, they go.
        if rx.buffer().is_empty() {
            tx.flush().await?;
        }
        let mut head = [0u8; 28];
        match rx.read_exact(&mut head).await {
            Ok(_) => {}
            // A client that closes between requests has disconnected.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                let _ = tx.flush().await;
                return Ok(served);
            }
            Err(e) => return Err(e.into()),
        }
        let magic = u32::from_be_bytes(head[0..4].try_into().unwrap());
        let kind = u16::from_be_bytes(head[6..8].try_into().unwrap());
        let handle = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(head[16..24].try_into().unwrap());
        let len = u32::from_be_bytes(head[24..28].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(Error::Protocol(format!("a request with magic {magic:#x}")));
        }
        let in_range = offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= size);
        match kind {
            CMD_WRITE => {
                if len > MAX_PAYLOAD {
                    return Err(Error::Protocol(format!("a write of {len} bytes")));
                }
                payload.resize(len as usize, 0);
                rx.read_exact(&mut payload).await?;
                if !in_range {
                    served.failed += 1;
                    reply(tx, ENOSPC, handle, &[]).await?;
                    continue;
                }
                let result = export.write(offset, &payload);
                served.writes += 1;
                served.bytes_written += u64::from(len);
                answer(tx, handle, result, &mut served).await?;
            }
            CMD_READ => {
                if len > MAX_PAYLOAD {
                    return Err(Error::Protocol(format!("a read of {len} bytes")));
                }
                if !in_range {
                    served.failed += 1;
                    reply(tx, EINVAL, handle, &[]).await?;
                    continue;
                }
                payload.resize(len as usize, 0);
                match export.read(offset, &mut payload) {
                    Ok(()) => reply(tx, 0, handle, &payload).await?,
                    Err(e) => {
                        served.failed += 1;
                        reply(tx, errno(&e), handle, &[]).await?;
                    }
                }
            }
            CMD_WRITE_ZEROES | CMD_TRIM => {
                if !in_range {
                    served.failed += 1;
                    reply(tx, ENOSPC, handle, &[]).await?;
                    continue;
                }
                let result = if kind == CMD_TRIM {
                    export.trim(offset, u64::from(len))
                } else {
                    served.zero_bytes += u64::from(len);
                    export.write_zeroes(offset, u64::from(len))
                };
                answer(tx, handle, result, &mut served).await?;
            }
            CMD_FLUSH => {
                let result = export.flush();
                answer(tx, handle, result, &mut served).await?;
            }
            CMD_DISC => {
                tx.flush().await?;
                return Ok(served);
            }
            // Unknown, or known but not offered (CACHE, BLOCK_STATUS,
            // RESIZE): none carries a payload to skip.
            _ => {
                served.failed += 1;
                reply(tx, EINVAL, handle, &[]).await?;
            }
        }
    }
}

async fn answer<W: AsyncWrite + Unpin>(
    tx: &mut W,
    handle: u64,
    result: io::Result<()>,
    served: &mut Served,
) -> io::Result<()> {
    match result {
        Ok(()) => reply(tx, 0, handle, &[]).await,
        Err(e) => {
            served.failed += 1;
            reply(tx, errno(&e), handle, &[]).await
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
