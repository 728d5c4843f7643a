use std::io;
use std::sync::Arc;
use std::time::Duration;

/// Everything that can go wrong between bitback and a QMP monitor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to QMP monitor {endpoint}")]
    Connecting {
        endpoint: String,
        #[source]
        source: io::Error,
    },

    #[error("{endpoint} is a {kind}, not a socket; a QMP monitor is QEMU's -qmp unix:PATH socket")]
    NotASocket {
        endpoint: String,
        kind: &'static str,
    },

    #[error("{endpoint} is not a QMP monitor: {reason}")]
    NotQmp { endpoint: String, reason: String },

    #[error("{endpoint} sent no QMP greeting within {timeout:?}")]
    GreetingTimeout { endpoint: String, timeout: Duration },

    /// QEMU answered the command with an error.
    #[error("{command}: {desc} ({class})")]
    Qemu {
        command: String,
        class: String,
        desc: String,
    },

    #[error("{command}: no reply within {timeout:?}")]
    Timeout { command: String, timeout: Duration },

    #[error("no event within {timeout:?}{}", job_suffix(.job))]
    EventTimeout {
        job: Option<String>,
        timeout: Duration,
    },

    /// The connection is gone; every pending and later call gets this.
    #[error("QMP connection closed: {reason}")]
    Disconnected { reason: Arc<str> },

    #[error("{command}: reply does not have the expected shape")]
    UnexpectedReply {
        command: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("{command}: arguments cannot be encoded as JSON")]
    EncodingArguments {
        command: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("{command}: arguments must be a JSON object or null")]
    ArgumentsNotObject { command: String },

    #[error("file descriptors can be passed only over a unix socket, not {endpoint}")]
    FdPassingUnsupported { endpoint: String },

    #[error("cannot duplicate the file descriptor to pass")]
    DuplicatingFd(#[source] io::Error),

    #[error("malformed QMP address {0:?}: expected a socket path or tcp:HOST:PORT")]
    BadEndpoint(String),
}

fn job_suffix(job: &Option<String>) -> String {
    match job {
        Some(job) => format!(" for job {job}"),
        None => String::new(),
    }
}

/// QMP's error classes (qapi/error.json). Most refusals are
/// `GenericError`: what QEMU refused is then known from the state, never
/// from the message's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KvmMissingCap,
    /// A class this bitback does not know (a newer QEMU).
    Other,
}

impl Error {
    /// Whether the monitor was never reached (no such socket, not a QMP
    /// monitor, a bad endpoint, no greeting): the input to fix, nothing
    /// was attempted.
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            Error::Connecting { .. }
                | Error::NotQmp { .. }
                | Error::NotASocket { .. }
                | Error::GreetingTimeout { .. }
                | Error::BadEndpoint(_)
        )
    }

    /// The QMP error class when QEMU refused the command, typed.
    pub fn class(&self) -> Option<ErrorClass> {
        self.qemu_class().map(|class| match class {
            "GenericError" => ErrorClass::GenericError,
            "CommandNotFound" => ErrorClass::CommandNotFound,
            "DeviceNotActive" => ErrorClass::DeviceNotActive,
            "DeviceNotFound" => ErrorClass::DeviceNotFound,
            "KVMMissingCap" => ErrorClass::KvmMissingCap,
            _ => ErrorClass::Other,
        })
    }

    /// The QMP error class when QEMU refused the command.
    pub fn qemu_class(&self) -> Option<&str> {
        match self {
            Error::Qemu { class, .. } => Some(class),
            _ => None,
        }
    }

    /// True when QEMU does not know the command (an older QEMU, or
    /// qemu-storage-daemon lacking a system-emulator command).
    pub fn is_command_not_found(&self) -> bool {
        self.class() == Some(ErrorClass::CommandNotFound)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
