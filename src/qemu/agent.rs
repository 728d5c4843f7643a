//! A minimal QEMU guest agent client: enough to freeze and thaw the guest's
//! filesystems around a backup's point in time.
//!
//! The agent speaks line-delimited JSON without a greeting; a reply left
//! over from an earlier client may still be in the pipe, so every session
//! starts with `guest-sync` and discards lines until its own id comes back.
//!
//! A freeze that fails or times out may still complete inside the guest,
//! so every freeze attempt is followed by [`Agent::thaw_after_freeze`]:
//! a fresh `guest-sync` (which the agent answers only after the freeze
//! finished, as it serves commands in order) and then the thaw.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt, BufReader};

use crate::qmp::{Line, read_line};
use tokio::net::UnixStream;
use tokio::time::timeout;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the guest agent at {}", path.display())]
    Connecting {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "guest agent: {command} gave no reply within {timeout:?} (is the agent running in the guest?)"
    )]
    Timeout {
        command: &'static str,
        timeout: Duration,
    },
    #[error("guest agent: {command} failed: {desc}")]
    Refused { command: &'static str, desc: String },
    #[error("guest agent sent a line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("guest agent connection failed")]
    Io(#[from] std::io::Error),
}

/// The longest reply line bitback reads from a guest agent: the replies
/// it asks for are a few bytes; the guest is not trusted.
pub const MAX_LINE: usize = 64 << 10;

/// How long the thaw after a freeze may wait for the agent to come back.
const THAW_WAIT: Duration = Duration::from_secs(60);

pub struct Agent {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    wait: Duration,
}

impl Agent {
    pub async fn connect(path: &Path, wait: Duration) -> Result<Agent, AgentError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| AgentError::Connecting {
                path: path.into(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut agent = Agent {
            reader: BufReader::new(r),
            writer: w,
            wait,
        };
        agent.sync(wait).await?;
        Ok(agent)
    }

    /// `guest-sync` with a fresh id: lines up to its reply are stale.
    async fn sync(&mut self, wait: Duration) -> Result<(), AgentError> {
        let id = u64::from(std::process::id()) << 20 | u64::from(rand_u16());
        self.call("guest-sync", json!({ "id": id }), Some(id), wait)
            .await
            .map(drop)
    }

    /// Sends `command` and returns its `return`. With `expect`, lines are
    /// read until a return equal to it (the sync handshake).
    async fn call(
        &mut self,
        command: &'static str,
        arguments: Value,
        expect: Option<u64>,
        wait: Duration,
    ) -> Result<Value, AgentError> {
        let mut message = json!({ "execute": command });
        if !arguments.is_null() {
            message["arguments"] = arguments;
        }
        let line = format!("{message}\n");
        self.writer.write_all(line.as_bytes()).await?;
        let read = async {
            loop {
                let line = match read_line(&mut self.reader, MAX_LINE).await? {
                    Line::Complete(line) => line,
                    Line::TooLong => return Err(AgentError::LineTooLong),
                    Line::Eof { .. } => {
                        return Err(AgentError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                    }
                };
                // The agent may send 0xff to resynchronise.
                let start = line.iter().position(|&b| b != 0xff).unwrap_or(line.len());
                let Ok(value) = serde_json::from_slice::<Value>(&line[start..]) else {
                    continue;
                };
                if let Some(error) = value.get("error") {
                    if expect.is_none() {
                        return Err(AgentError::Refused {
                            command,
                            desc: error["desc"].as_str().unwrap_or("").to_string(),
                        });
                    }
                    continue;
                }
                let Some(ret) = value.get("return") else {
                    continue;
                };
                match expect {
                    Some(id) if ret != &json!(id) => continue,
                    _ => return Ok(ret.clone()),
                }
            }
        };
        timeout(wait, read).await.map_err(|_| AgentError::Timeout {
            command,
            timeout: wait,
        })?
    }

    /// Freezes every guest filesystem; returns how many. Whatever the
    /// outcome, call [`Agent::thaw_after_freeze`] afterwards.
    pub async fn freeze(&mut self, wait: Duration) -> Result<u64, AgentError> {
        let n = self
            .call("guest-fsfreeze-freeze", Value::Null, None, wait)
            .await?;
        Ok(n.as_u64().unwrap_or(0))
    }

    /// Thaws the guest after a freeze attempt, answered or not: first a
    /// fresh sync, so a late freeze reply is not taken for the thaw's.
    pub async fn thaw_after_freeze(&mut self) -> Result<u64, AgentError> {
        self.sync(THAW_WAIT).await?;
        let n = self
            .call("guest-fsfreeze-thaw", Value::Null, None, self.wait)
            .await?;
        Ok(n.as_u64().unwrap_or(0))
    }
}

fn rand_u16() -> u16 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u16)
        .unwrap_or(7)
}
