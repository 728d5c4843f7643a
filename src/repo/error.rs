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

    #[error(
        "{url} is a bucket: this command works on a directory repository (list, restore, verify and prune read a bucket where it is; bitback sync copies a directory's points into one and back)"
    )]
    InBucket { url: String },

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
    BadManifest { path: PathBuf, reason: Invalid },

    #[error("state file {} is invalid: {reason}", path.display())]
    BadState { path: PathBuf, reason: Invalid },

    #[error("repository file {} is invalid: {reason}", path.display())]
    BadRepo { path: PathBuf, reason: String },

    #[error("vm {vm}'s backups are in use by {holder}")]
    InUse { vm: String, holder: String },

    #[error("cannot encode JSON")]
    Encoding(#[source] serde_json::Error),

    /// A repository in object storage (`s3://`) that failed.
    #[error(transparent)]
    S3(#[from] crate::s3::Error),
}

impl Error {
    /// Whether the repository, as given, cannot be used (a bad name, not a
    /// directory, a symlink, a manifest or state file that does not
    /// read): the input to fix, nothing was attempted.
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            Error::BadName { .. }
                | Error::NotADirectory { .. }
                | Error::Symlink { .. }
                | Error::BadManifest { .. }
                | Error::BadState { .. }
                | Error::S3(crate::s3::Error::Config(_))
        )
    }
}

/// Why a manifest or a state file is refused (their bytes are never
/// trusted).
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    #[error("{0}")]
    Json(#[from] serde_json::Error),

    #[error("schema {found} is not {expected}; a newer bitback may have written it")]
    Schema { found: u32, expected: u32 },

    #[error("it names backup {vm}/{id} but lies in {dir}")]
    Misplaced { vm: String, id: String, dir: String },

    #[error("it belongs to vm {0:?}")]
    OtherVm(String),

    /// A name in it that could not be a path component.
    #[error("{0}")]
    Name(Box<Error>),

    #[error("it names itself as its parent")]
    OwnParent,

    #[error("kind, parent, chain and position disagree")]
    Disagrees,

    #[error("it lists no volumes")]
    NoVolumes,

    #[error("volume {volume} has file {file:?}")]
    File { volume: String, file: String },

    #[error("volume {volume} has backing {backing:?}")]
    Backing {
        volume: String,
        backing: Option<String>,
    },

    #[error("an incremental backup whose every volume is full")]
    AllFull,

    #[error(
        "volume {volume} has digest {digest:?}: a layout digest (blake3-layout:) needs a cluster map, and a cluster map a whole file's digest (blake3:)"
    )]
    Digest { volume: String, digest: String },
}

impl From<Error> for Invalid {
    fn from(e: Error) -> Invalid {
        Invalid::Name(Box::new(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
