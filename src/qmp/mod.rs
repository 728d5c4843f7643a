//! An async client for the QEMU Machine Protocol.
//!
//! [`Qmp::connect`] opens a unix socket (or `tcp:HOST:PORT`), reads the
//! greeting, negotiates capabilities and returns a cheap, cloneable handle.
//! One task owns the socket: commands carry numeric ids and their replies
//! are matched by id, so any number of callers may wait at once. Events are
//! delivered to every [`Events`] subscription as raw JSON; [`Event::typed`]
//! converts them to the `qapi-qmp` types when it can, so an event or enum
//! value from a newer QEMU is never fatal.
//!
//! Every wait has a timeout. When the socket closes, QEMU dies or sends
//! something that is not QMP (a line that is not JSON, a line over
//! [`MAX_LINE`]), the connection ends and every pending and later call
//! fails at once with [`Error::Disconnected`], naming the reason.
//!
//! File descriptors travel with a command over a unix socket (SCM_RIGHTS):
//! [`Qmp::add_fd`] puts one in an fd set that QEMU opens as
//! `/dev/fdset/N`; [`Qmp::getfd`] names one.

mod client;
mod error;
mod transport;

pub use client::{Event, Events, Greeting, Options, QemuVersion, Qmp, SocketOwner, Timestamp};
pub use error::{Error, ErrorClass, Result};
pub use transport::{Endpoint, MAX_LINE};
pub(crate) use transport::{Line, read_line};
