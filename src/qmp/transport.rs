//! The byte level: where the monitor is, how lines are read under a cap, and
//! how a line is written together with file descriptors (SCM_RIGHTS).

use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader, Interest};
use tokio::net::{TcpStream, UnixStream, tcp, unix};

use super::error::{Error, Result};

/// The longest line bitback accepts from QEMU. The largest real replies
/// (`query-qmp-schema`, `query-named-block-nodes` on a VM with hundreds of
/// nodes) are a few MiB; anything past this is not a monitor talking.
pub const MAX_LINE: usize = 16 << 20;

/// Where a QMP monitor listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    /// `HOST:PORT`, as given after `tcp:`.
    Tcp(String),
}

impl Endpoint {
    /// `tcp:HOST:PORT` is a TCP address; anything else is a unix socket path.
    pub fn parse(s: &str) -> Result<Endpoint> {
        if let Some(addr) = s.strip_prefix("tcp:") {
            match addr.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(Endpoint::Tcp(addr.to_string()))
                }
                _ => Err(Error::BadEndpoint(s.to_string())),
            }
        } else if s.is_empty() || s.contains('\0') {
            Err(Error::BadEndpoint(s.to_string()))
        } else {
            Ok(Endpoint::Unix(PathBuf::from(s)))
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

pub(crate) type LineReader = BufReader<Box<dyn AsyncRead + Send + Unpin>>;

pub(crate) enum Writer {
    Unix(unix::OwnedWriteHalf),
    Tcp(tcp::OwnedWriteHalf),
}

pub(crate) async fn connect(endpoint: &Endpoint) -> io::Result<(LineReader, Writer)> {
    match endpoint {
        Endpoint::Unix(path) => {
            let (r, w) = UnixStream::connect(path).await?.into_split();
            Ok((BufReader::new(Box::new(r)), Writer::Unix(w)))
        }
        Endpoint::Tcp(addr) => {
            let stream = TcpStream::connect(addr.as_str()).await?;
            stream.set_nodelay(true)?;
            let (r, w) = stream.into_split();
            Ok((BufReader::new(Box::new(r)), Writer::Tcp(w)))
        }
    }
}

impl Writer {
    pub(crate) fn can_pass_fds(&self) -> bool {
        matches!(self, Writer::Unix(_))
    }

    /// Writes one whole line. The descriptors, if any, travel with its first
    /// byte, which is how QEMU's monitor associates them with the command.
    pub(crate) async fn send(&mut self, line: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
        match self {
            Writer::Tcp(w) => {
                if !fds.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "file descriptors over TCP",
                    ));
                }
                w.write_all(line).await
            }
            Writer::Unix(w) => {
                let mut rest = line;
                if !fds.is_empty() {
                    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
                    let sent = send_with_fds(w.as_ref(), line, &raw).await?;
                    rest = &line[sent..];
                }
                w.write_all(rest).await
            }
        }
    }
}

async fn send_with_fds(stream: &UnixStream, buf: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    loop {
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(buf)];
            let cmsg = [ControlMessage::ScmRights(fds)];
            sendmsg::<UnixAddr>(
                stream.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// What reading one line gave.
#[derive(Debug)]
pub(crate) enum Line {
    Complete(Vec<u8>),
    /// The peer closed the socket; `partial` bytes of an unfinished line
    /// were lost with it.
    Eof {
        partial: usize,
    },
    TooLong,
}

/// Reads up to and including the next `\n`, refusing lines over `max`
/// before buffering them whole.
pub(crate) async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> io::Result<Line> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(Line::Eof {
                partial: line.len(),
            });
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max + 1 {
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if done {
            return Ok(Line::Complete(line));
        }
    }
}
