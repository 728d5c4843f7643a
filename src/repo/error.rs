use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },

    #[error("{} is a symlink; bitback does not follow links out of the repository", path.display())]
    Symlink { path: PathBuf },

    #[error("{what} name \"{name}\" is not allowed: {reason}")]
    BadName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },

    #[error("vm {vm} is locked by {holder}: another bitback run may be working on it")]
    Locked { vm: String, holder: String },

    #[error("manifest {} is invalid: {reason}", path.display())]
    BadManifest { path: PathBuf, reason: String },

    #[error("state file {} is invalid: {reason}", path.display())]
    BadState { path: PathBuf, reason: String },

    #[error("repository file {} is invalid: {reason}", path.display())]
    BadRepo { path: PathBuf, reason: String },

    #[error("vm {vm}'s backups are in use by {holder}")]
    InUse { vm: String, holder: String },

    #[error("cannot encode JSON")]
    Encoding(#[source] serde_json::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
