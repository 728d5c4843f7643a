//! The handle callers hold ([`Qmp`]) and the task that owns the socket.
//!
//! Two tasks per connection: a reader that turns lines into JSON values (the
//! only place that can block on the socket's read side, so a half-read line
//! is never lost to a cancelled future), and the connection task that owns
//! the write side, the table of commands awaiting a reply, and the event
//! subscribers. When either side fails, the connection task records why and
//! fails every pending command with that reason at once.

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{debug, trace, warn};

use super::error::{Error, Result};
use super::transport::{self, Endpoint, Line, LineReader, MAX_LINE, Writer};

/// Timeouts for one connection.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Connecting and receiving the greeting.
    pub connect_timeout: Duration,
    /// The default wait for a command's reply.
    pub command_timeout: Duration,
    /// Whether the other end takes a descriptor with `getfd` (QEMU does;
    /// libvirt's QMP proxy passes descriptors with `add-fd` only).
    pub named_fds: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(30),
            named_fds: true,
        }
    }
}

/// QEMU's version, from the greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuVersion {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
    /// The distribution's package string, often empty.
    pub package: String,
}

impl QemuVersion {
    pub fn at_least(&self, major: u64, minor: u64) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// What the monitor said when the connection opened.
#[derive(Debug, Clone)]
pub struct Greeting {
    pub version: QemuVersion,
    pub capabilities: Vec<String>,
}

/// A QMP event, as QEMU sent it. Unknown events are delivered like known
/// ones; [`Event::typed`] converts when the `qapi-qmp` types know it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub name: String,
    pub data: Value,
    pub timestamp: Option<Timestamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

impl Event {
    /// The job this event is about: `id` for `JOB_*` events, `device` for the
    /// older `BLOCK_JOB_*` ones (QEMU sets it to the job id).
    pub fn job_id(&self) -> Option<&str> {
        let field = if self.name.starts_with("BLOCK_JOB_") {
            "device"
        } else if self.name.starts_with("JOB_") {
            "id"
        } else {
            return None;
        };
        self.data.get(field).and_then(Value::as_str)
    }

    /// The typed form, or `None` (logged at debug) when this QEMU sent an
    /// event or a value that the `qapi-qmp` schema does not know.
    pub fn typed(&self) -> Option<qapi_qmp::Event> {
        let raw = json!({
            "event": self.name,
            "data": self.data,
            "timestamp": self.timestamp.unwrap_or(Timestamp { seconds: 0, microseconds: 0 }),
        });
        match serde_json::from_value(raw) {
            Ok(event) => Some(event),
            Err(e) => {
                debug!(event = %self.name, error = %e, "event not known to the qapi-qmp types; kept as raw JSON");
                None
            }
        }
    }
}

/// A subscription to the connection's events, from the moment
/// [`Qmp::subscribe`] returned. Nothing is dropped while it is alive.
pub struct Events {
    rx: mpsc::UnboundedReceiver<Event>,
    hub: Arc<Hub>,
}

impl Events {
    /// The next event, whatever it is.
    pub async fn next(&mut self, wait: Duration) -> Result<Event> {
        match timeout(wait, self.rx.recv()).await {
            Ok(Some(event)) => Ok(event),
            Ok(None) => Err(self.hub.disconnected()),
            Err(_) => Err(Error::EventTimeout {
                job: None,
                timeout: wait,
            }),
        }
    }

    /// The next event about job `job`, skipping the others; `wait` bounds
    /// the whole search.
    pub async fn next_for_job(&mut self, job: &str, wait: Duration) -> Result<Event> {
        let deadline = Instant::now() + wait;
        loop {
            match timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(event)) if event.job_id() == Some(job) => return Ok(event),
                Ok(Some(_)) => continue,
                Ok(None) => return Err(self.hub.disconnected()),
                Err(_) => {
                    return Err(Error::EventTimeout {
                        job: Some(job.to_string()),
                        timeout: wait,
                    });
                }
            }
        }
    }

    /// An event already received, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

/// What the connection task shares with the handles, without holding them
/// alive: once every [`Qmp`] is dropped the task ends.
#[derive(Default)]
struct Hub {
    state: Mutex<HubState>,
}

/// One lock for both, so a subscription cannot slip in after the close.
#[derive(Default)]
struct HubState {
    subscribers: Vec<mpsc::UnboundedSender<Event>>,
    closed: Option<Arc<str>>,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HubState> {
        // A panic elsewhere cannot leave these plain fields inconsistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn disconnected(&self) -> Error {
        let reason = self
            .lock()
            .closed
            .clone()
            .unwrap_or_else(|| Arc::from("the connection task ended"));
        Error::Disconnected { reason }
    }

    fn subscribe(&self, tx: mpsc::UnboundedSender<Event>) {
        let mut state = self.lock();
        if state.closed.is_none() {
            state.subscribers.push(tx);
        }
    }

    fn publish(&self, event: Event) {
        self.lock()
            .subscribers
            .retain(|tx| tx.send(event.clone()).is_ok());
    }

    fn close(&self, reason: Arc<str>) {
        let mut state = self.lock();
        state.closed = Some(reason);
        state.subscribers.clear();
    }
}

struct Request {
    id: u64,
    command: String,
    line: Vec<u8>,
    fds: Vec<OwnedFd>,
    reply: oneshot::Sender<Result<Value>>,
}

struct Pending {
    command: String,
    reply: oneshot::Sender<Result<Value>>,
}

enum Incoming {
    Message(Value),
    Closed(String),
}

/// A cheap, cloneable handle to one QMP connection.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
    /// Who a socket QEMU connects to must belong to (see
    /// [`Qmp::set_socket_owner`]).
    socket_owner: Option<SocketOwner>,
}

/// The user and group a QEMU process runs as: a socket it is to connect to
/// lives in a directory of theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOwner {
    pub uid: u32,
    pub gid: u32,
}

struct Inner {
    endpoint: Endpoint,
    greeting: Greeting,
    options: Options,
    can_pass_fds: bool,
    requests: mpsc::UnboundedSender<Request>,
    hub: Arc<Hub>,
    next_id: AtomicU64,
}

impl Qmp {
    /// Connects to `endpoint` (a socket path or `tcp:HOST:PORT`) with the
    /// default timeouts and negotiates capabilities.
    pub async fn connect(endpoint: &str) -> Result<Qmp> {
        Qmp::connect_with(Endpoint::parse(endpoint)?, Options::default()).await
    }

    pub async fn connect_with(endpoint: Endpoint, options: Options) -> Result<Qmp> {
        let shown = endpoint.to_string();
        let connected = timeout(options.connect_timeout, transport::connect(&endpoint)).await;
        let (mut reader, writer) = match connected {
            Ok(Ok(pair)) => pair,
            Ok(Err(source)) => {
                if let Endpoint::Unix(path) = &endpoint
                    && let Ok(meta) = std::fs::metadata(path)
                {
                    use std::os::unix::fs::FileTypeExt;
                    let t = meta.file_type();
                    let kind = if t.is_file() {
                        Some("regular file")
                    } else if t.is_dir() {
                        Some("directory")
                    } else if t.is_block_device() || t.is_char_device() {
                        Some("device")
                    } else {
                        None
                    };
                    if let Some(kind) = kind {
                        return Err(Error::NotASocket {
                            endpoint: shown,
                            kind,
                        });
                    }
                }
                return Err(Error::Connecting {
                    endpoint: shown,
                    source,
                });
            }
            Err(_) => {
                return Err(Error::Connecting {
                    endpoint: shown,
                    source: std::io::ErrorKind::TimedOut.into(),
                });
            }
        };
        let greeting = match timeout(options.connect_timeout, read_greeting(&mut reader)).await {
            Ok(Ok(greeting)) => greeting,
            Ok(Err(reason)) => {
                return Err(Error::NotQmp {
                    endpoint: shown,
                    reason,
                });
            }
            Err(_) => {
                return Err(Error::GreetingTimeout {
                    endpoint: shown,
                    timeout: options.connect_timeout,
                });
            }
        };
        debug!(endpoint = %shown, version = %greeting.version, "QMP greeting");

        let can_pass_fds = writer.can_pass_fds();
        let (requests, request_rx) = mpsc::unbounded_channel();
        let (incoming_tx, incoming_rx) = mpsc::channel(256);
        let hub = Arc::new(Hub::default());
        let reader_task = tokio::spawn(read_messages(reader, incoming_tx));
        tokio::spawn(run(
            writer,
            incoming_rx,
            request_rx,
            hub.clone(),
            reader_task,
        ));

        let qmp = Qmp {
            inner: Arc::new(Inner {
                endpoint,
                greeting,
                options,
                can_pass_fds,
                requests,
                hub,
                next_id: AtomicU64::new(1),
            }),
            socket_owner: None,
        };
        qmp.execute_raw("qmp_capabilities", Value::Null).await?;
        Ok(qmp)
    }

    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// Whether a descriptor can be passed with `getfd` here (see
    /// [`Options::named_fds`]).
    pub fn named_fds(&self) -> bool {
        self.inner.can_pass_fds && self.inner.options.named_fds
    }

    /// Says that QEMU, which cannot take a passed socket here, connects to
    /// one in a directory owned by `owner` (libvirt's unprivileged QEMU
    /// behind its QMP proxy, once it was seen to reach one).
    pub fn set_socket_owner(&mut self, owner: SocketOwner) {
        self.socket_owner = Some(owner);
    }

    /// See [`Qmp::set_socket_owner`].
    pub fn socket_owner(&self) -> Option<SocketOwner> {
        self.socket_owner
    }

    /// Receives every event from now on. Subscribe before sending the
    /// command that starts a job, or its first events may be missed.
    pub fn subscribe(&self) -> Events {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.hub.subscribe(tx);
        Events {
            rx,
            hub: self.inner.hub.clone(),
        }
    }

    /// Runs a typed command from the `qapi-qmp` schema.
    pub async fn execute<C: qapi_spec::Command>(&self, command: C) -> Result<C::Ok> {
        let reply = self.execute_raw(C::NAME, encode(&command)?).await?;
        decode::<C>(reply)
    }

    /// Runs any command; `arguments` is an object, or `null` for none.
    pub async fn execute_raw(&self, command: &str, arguments: Value) -> Result<Value> {
        self.call(
            command,
            arguments,
            Vec::new(),
            self.inner.options.command_timeout,
        )
        .await
    }

    /// Like [`Qmp::execute_raw`] with its own timeout.
    pub async fn execute_raw_timeout(
        &self,
        command: &str,
        arguments: Value,
        wait: Duration,
    ) -> Result<Value> {
        self.call(command, arguments, Vec::new(), wait).await
    }

    /// Passes `fd` to QEMU and adds it to fd set `fdset_id` (a new set when
    /// `None`). QEMU can then open it as `/dev/fdset/<fdset-id>` with the
    /// same access mode. Only over a unix socket.
    pub async fn add_fd(
        &self,
        fd: BorrowedFd<'_>,
        fdset_id: Option<i64>,
        opaque: Option<&str>,
    ) -> Result<qapi_qmp::AddfdInfo> {
        let command = qapi_qmp::add_fd {
            fdset_id,
            opaque: opaque.map(str::to_string),
        };
        self.execute_with_fd(command, fd).await
    }

    /// Passes `fd` to QEMU under `name` (`getfd`), for commands that take a
    /// named descriptor.
    pub async fn getfd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<()> {
        let command = qapi_qmp::getfd {
            fdname: name.to_string(),
        };
        self.execute_with_fd(command, fd).await.map(drop)
    }

    /// Runs a typed command with `fd` attached (SCM_RIGHTS). The caller's
    /// descriptor stays open; QEMU gets a duplicate.
    pub async fn execute_with_fd<C: qapi_spec::Command>(
        &self,
        command: C,
        fd: BorrowedFd<'_>,
    ) -> Result<C::Ok> {
        if !self.inner.can_pass_fds {
            return Err(Error::FdPassingUnsupported {
                endpoint: self.inner.endpoint.to_string(),
            });
        }
        let owned = fd.try_clone_to_owned().map_err(Error::DuplicatingFd)?;
        let arguments = encode(&command)?;
        let reply = self
            .call(
                C::NAME,
                arguments,
                vec![owned],
                self.inner.options.command_timeout,
            )
            .await?;
        decode::<C>(reply)
    }

    async fn call(
        &self,
        command: &str,
        arguments: Value,
        fds: Vec<OwnedFd>,
        wait: Duration,
    ) -> Result<Value> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({ "execute": command, "id": id });
        match arguments {
            Value::Null => {}
            Value::Object(map) if map.is_empty() => {}
            Value::Object(map) => {
                message["arguments"] = Value::Object(map);
            }
            _ => {
                return Err(Error::ArgumentsNotObject {
                    command: command.to_string(),
                });
            }
        }
        let mut line = serde_json::to_vec(&message).map_err(|source| Error::EncodingArguments {
            command: command.to_string(),
            source,
        })?;
        line.push(b'\n');
        trace!(frame = %String::from_utf8_lossy(&line).trim_end(), "qmp send");

        let (reply, answer) = oneshot::channel();
        let request = Request {
            id,
            command: command.to_string(),
            line,
            fds,
            reply,
        };
        if self.inner.requests.send(request).is_err() {
            return Err(self.inner.hub.disconnected());
        }
        match timeout(wait, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.inner.hub.disconnected()),
            Err(_) => Err(Error::Timeout {
                command: command.to_string(),
                timeout: wait,
            }),
        }
    }
}

fn encode<C: qapi_spec::Command>(command: &C) -> Result<Value> {
    serde_json::to_value(command).map_err(|source| Error::EncodingArguments {
        command: C::NAME.to_string(),
        source,
    })
}

fn decode<C: qapi_spec::Command>(reply: Value) -> Result<C::Ok> {
    serde_json::from_value(reply).map_err(|source| Error::UnexpectedReply {
        command: C::NAME.to_string(),
        source,
    })
}

/// Events a server may send before its greeting before it is given up on.
const MAX_EVENTS_BEFORE_GREETING: usize = 1000;

async fn read_greeting(reader: &mut LineReader) -> std::result::Result<Greeting, String> {
    #[derive(Deserialize)]
    struct Wire {
        #[serde(rename = "QMP")]
        qmp: WireQmp,
    }
    #[derive(Deserialize)]
    struct WireQmp {
        version: WireVersion,
        #[serde(default)]
        capabilities: Vec<String>,
    }
    #[derive(Deserialize)]
    struct WireVersion {
        qemu: WireTriple,
        #[serde(default)]
        package: String,
    }
    #[derive(Deserialize)]
    struct WireTriple {
        major: u64,
        minor: u64,
        micro: u64,
    }

    // libvirt's QMP proxy can pass on an event of the domain before its
    // greeting (seen with three clients of one domain at once): events
    // come before the session and are dropped, up to a bound.
    let mut skipped = 0;
    let line = loop {
        let line = match transport::read_line(reader, MAX_LINE).await {
            Ok(Line::Complete(line)) => line,
            Ok(Line::Eof { .. }) => {
                return Err("it closed the connection without a greeting".into());
            }
            Ok(Line::TooLong) => return Err("its first line is too long to be a greeting".into()),
            Err(e) => return Err(format!("reading the greeting failed: {e}")),
        };
        let event = serde_json::from_slice::<Value>(&line)
            .ok()
            .is_some_and(|v| v.get("event").is_some_and(Value::is_string));
        if !event {
            break line;
        }
        skipped += 1;
        if skipped > MAX_EVENTS_BEFORE_GREETING {
            return Err(format!(
                "it sent over {MAX_EVENTS_BEFORE_GREETING} events and no greeting"
            ));
        }
        debug!(event = %preview(&line), "event before the QMP greeting; dropped");
    };
    let wire: Wire = serde_json::from_slice(&line)
        .map_err(|_| format!("its first line is not a QMP greeting: {}", preview(&line)))?;
    Ok(Greeting {
        version: QemuVersion {
            major: wire.qmp.version.qemu.major,
            minor: wire.qmp.version.qemu.minor,
            micro: wire.qmp.version.qemu.micro,
            package: wire.qmp.version.package,
        },
        capabilities: wire.qmp.capabilities,
    })
}

/// A short, printable excerpt of a line for error messages.
fn preview(line: &[u8]) -> String {
    const MAX: usize = 80;
    let text = String::from_utf8_lossy(&line[..line.len().min(MAX)]);
    let text = text.trim_end();
    if line.len() > MAX {
        format!("{text:?}...")
    } else {
        format!("{text:?}")
    }
}

async fn read_messages(mut reader: LineReader, out: mpsc::Sender<Incoming>) {
    loop {
        let incoming = match transport::read_line(&mut reader, MAX_LINE).await {
            Ok(Line::Complete(line)) => {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                trace!(frame = %String::from_utf8_lossy(&line).trim_end(), "qmp recv");
                match serde_json::from_slice(&line) {
                    Ok(value) => Incoming::Message(value),
                    Err(e) => Incoming::Closed(format!(
                        "protocol error: QEMU sent a line that is not JSON ({e}): {}",
                        preview(&line)
                    )),
                }
            }
            Ok(Line::Eof { partial: 0 }) => Incoming::Closed("QEMU closed the connection".into()),
            Ok(Line::Eof { partial }) => Incoming::Closed(format!(
                "QEMU closed the connection in the middle of a message ({partial} bytes received)"
            )),
            Ok(Line::TooLong) => Incoming::Closed(format!(
                "protocol error: QEMU sent a line longer than {MAX_LINE} bytes"
            )),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                Incoming::Closed("QEMU closed the connection abruptly (connection reset)".into())
            }
            Err(e) => Incoming::Closed(format!("reading from QEMU failed: {e}")),
        };
        let last = matches!(incoming, Incoming::Closed(_));
        if out.send(incoming).await.is_err() || last {
            return;
        }
    }
}

async fn run(
    mut writer: Writer,
    mut incoming: mpsc::Receiver<Incoming>,
    mut requests: mpsc::UnboundedReceiver<Request>,
    hub: Arc<Hub>,
    reader_task: JoinHandle<()>,
) {
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let reason: Arc<str> = loop {
        tokio::select! {
            message = incoming.recv() => match message {
                Some(Incoming::Message(value)) => {
                    if let Err(reason) = dispatch(value, &mut pending, &hub) {
                        break reason.into();
                    }
                }
                Some(Incoming::Closed(reason)) => break reason.into(),
                None => break "the reader task ended".into(),
            },
            request = requests.recv() => match request {
                Some(request) => {
                    let Request { id, command, line, fds, reply } = request;
                    // Callers that timed out no longer wait for their reply.
                    pending.retain(|_, p| !p.reply.is_closed());
                    pending.insert(id, Pending { command, reply });
                    // The descriptors are closed on our side once sent.
                    if let Err(e) = writer.send(&line, &fds).await {
                        // QEMU gone: whether a write or the reader saw it
                        // first is a race; the reason says the same.
                        break match e.kind() {
                            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                                format!("QEMU closed the connection (writing to it: {e})")
                            }
                            _ => format!("writing to QEMU failed: {e}"),
                        }
                        .into();
                    }
                }
                None => break "every handle was dropped".into(),
            },
        }
    };
    reader_task.abort();
    debug!(%reason, pending = pending.len(), "QMP connection closed");
    hub.close(reason.clone());
    requests.close();
    let fail = |reply: oneshot::Sender<Result<Value>>| {
        let _ = reply.send(Err(Error::Disconnected {
            reason: reason.clone(),
        }));
    };
    for (_, p) in pending.drain() {
        fail(p.reply);
    }
    while let Ok(request) = requests.try_recv() {
        fail(request.reply);
    }
}

/// Routes one message. An `Err` is a protocol violation that ends the
/// connection.
fn dispatch(
    value: Value,
    pending: &mut HashMap<u64, Pending>,
    hub: &Hub,
) -> std::result::Result<(), String> {
    let Value::Object(mut message) = value else {
        return Err(format!(
            "protocol error: QEMU sent a JSON value that is not an object: {}",
            preview(value.to_string().as_bytes())
        ));
    };
    if let Some(name) = message
        .get("event")
        .and_then(Value::as_str)
        .map(str::to_string)
    {
        let data = match message.remove("data") {
            // libvirt's virt-qemu-qmp-proxy hands event data on as a
            // JSON-encoded string.
            Some(Value::String(text)) => match serde_json::from_str::<Value>(&text) {
                Ok(value @ Value::Object(_)) => value,
                _ => Value::String(text),
            },
            Some(other) => other,
            None => Value::Null,
        };
        let event = Event {
            name,
            data,
            timestamp: message
                .get("timestamp")
                .and_then(|t| serde_json::from_value(t.clone()).ok()),
        };
        hub.publish(event);
        return Ok(());
    }
    let outcome = if let Some(ret) = message.remove("return") {
        Ok(ret)
    } else if let Some(error) = message.get("error") {
        Err((
            error
                .get("class")
                .and_then(Value::as_str)
                .unwrap_or("GenericError")
                .to_string(),
            error
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        ))
    } else {
        return Err(format!(
            "protocol error: QEMU sent a message that is neither a reply nor an event: {}",
            preview(Value::Object(message).to_string().as_bytes())
        ));
    };
    let Some(p) = message
        .get("id")
        .and_then(Value::as_u64)
        .and_then(|id| pending.remove(&id))
    else {
        // QEMU answers a request it could not parse without an id; bitback
        // sends only well-formed requests, so this is someone else's reply.
        let shown = preview(Value::Object(message).to_string().as_bytes());
        warn!(reply = %shown, "QMP reply matches no pending command; ignored");
        return Ok(());
    };
    let result = outcome.map_err(|(class, desc)| Error::Qemu {
        command: p.command,
        class,
        desc,
    });
    let _ = p.reply.send(result);
    Ok(())
}
