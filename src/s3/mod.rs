//! Object storage over S3's HTTP API: where a bucket is and who bitback is
//! to it ([`Config`], [`Location`]), and the requests a repository needs
//! ([`Client`]). Checked against SeaweedFS (tests/it/s3.rs); the client
//! is `rusty-s3` (SigV4 signing, no I/O of its own) over `ureq`,
//! chosen by measurement (README.md, "Layout").

mod client;
mod config;

pub use client::{
    Client, Listing, LockMode, PART, Put, Retention, UPLOADERS, Version, md5_hex, part_size,
};
pub use config::{Config, Location};

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

    /// An answer that makes no sense.
    #[error("S3 {what}: the answer makes no sense: {reason}")]
    Reply { what: String, reason: String },
}
