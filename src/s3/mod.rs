//! Object storage over S3's HTTP API: where a bucket is and who bitback is
//! to it ([`Config`], [`Location`]), and the requests a repository needs
//! ([`Client`]). Checked against SeaweedFS (tests/it/s3.rs); the client
//! is `rusty-s3` (SigV4 signing, no I/O of its own) over `ureq`,
//! chosen by measurement (README.md, "Layout").

mod client;
mod config;
mod feed;

pub use client::{
    Client, Listing, LockMode, PART, Put, Retention, UPLOADERS, Version, md5_hex, part_size,
};
pub use config::{Config, Location};
pub use feed::{Feed, HEAD, HOLD};

/// What an upload checks a file's bytes against as it reads them, before
/// they leave: a check that fails stops the upload, and what was sent of
/// it goes (a multipart upload is aborted, a single one never sent).
pub trait Proof {
    /// The file's bytes at `offset`, read in order from its start, before
    /// they are sent.
    fn read(&mut self, offset: u64, bytes: &[u8]) -> Result<(), String>;
    /// After the last byte (the file `len` bytes long), before the object
    /// is made.
    fn end(&mut self, len: u64) -> Result<(), String>;
}

/// No check: the bytes go as they are read.
pub struct Unchecked;

impl Proof for Unchecked {
    fn read(&mut self, _: u64, _: &[u8]) -> Result<(), String> {
        Ok(())
    }
    fn end(&mut self, _: u64) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The repository's location or the AWS configuration is wrong.
    #[error("S3: {0}")]
    Config(String),

    /// The store answered, and refused.
    #[error("S3 {what}: {status} {code}: {message}")]
    Refused {
        what: String,
        status: u16,
        code: String,
        message: String,
    },

    /// The store did not answer (or answered 5xx) on every try.
    #[error("S3 {what}: no answer after {tries} tries: {reason}")]
    Unreachable {
        what: String,
        tries: usize,
        reason: String,
    },

    /// A local file to upload that cannot be read.
    #[error("reading {}: {reason}", path.display())]
    Local {
        path: std::path::PathBuf,
        reason: String,
    },

    /// Bytes of a file to upload that are not what its proof holds: the
    /// upload was stopped before they were stored.
    #[error("{}: {reason}", path.display())]
    Unproven {
        path: std::path::PathBuf,
        reason: String,
    },

    /// An upload fed as its file was written could not follow it (or
    /// was given up): it was aborted, and the file goes up whole later.
    #[error("S3: an upload fed as its file was written stopped: {0}")]
    Unfollowed(String),

    /// An answer that makes no sense.
    #[error("S3 {what}: the answer makes no sense: {reason}")]
    Reply { what: String, reason: String },
}
