//! A minimal QEMU guest agent client: enough to freeze and thaw the guest's
//! filesystems around a backup's point in time.
//!
//! The agent speaks line-delimited JSON without a greeting; a reply left
//! over from an earlier client may still be in the pipe, so every session
//! starts with `guest-sync` and discards lines until its own id comes back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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
    #[error("guest agent connection failed")]
    Io(#[from] std::io::Error),
}

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
        let id = u64::from(std::process::id()) << 20 | u64::from(rand_u16());
        let reply = agent
            .call("guest-sync", json!({ "id": id }), Some(id))
            .await?;
        debug_assert_eq!(reply, json!(id));
        Ok(agent)
    }

    /// Sends `command` and returns its `return`. With `expect`, lines are
    /// read until a return equal to it (the sync handshake).
    async fn call(
        &mut self,
        command: &'static str,
        arguments: Value,
        expect: Option<u64>,
    ) -> Result<Value, AgentError> {
        let mut message = json!({ "execute": command });
        if !arguments.is_null() {
            message["arguments"] = arguments;
        }
        let line = format!("{message}\n");
        self.writer.write_all(line.as_bytes()).await?;
        let read = async {
            loop {
                let mut line = String::new();
                if self.reader.read_line(&mut line).await? == 0 {
                    return Err(AgentError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                let Ok(value) = serde_json::from_str::<Value>(line.trim_start_matches('\u{ff}'))
                else {
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
        timeout(self.wait, read)
            .await
            .map_err(|_| AgentError::Timeout {
                command,
                timeout: self.wait,
            })?
    }

    /// Freezes every guest filesystem; returns how many.
    pub async fn freeze(&mut self) -> Result<u64, AgentError> {
        let n = self
            .call("guest-fsfreeze-freeze", Value::Null, None)
            .await?;
        Ok(n.as_u64().unwrap_or(0))
    }

    pub async fn thaw(&mut self) -> Result<u64, AgentError> {
        let n = self.call("guest-fsfreeze-thaw", Value::Null, None).await?;
        Ok(n.as_u64().unwrap_or(0))
    }
}

fn rand_u16() -> u16 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u16)
        .unwrap_or(7)
}
