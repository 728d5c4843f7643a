//! The operations: [`plan`] decides full or incremental from facts alone;
//! [`backup`] carries a backup out against a running QEMU, [`backup_stopped`]
//! against a stopped VM's images through a qemu-storage-daemon it starts.

mod backup;
pub mod plan;
mod stopped;

pub use backup::{BackupOptions, CHECKPOINT_PREFIX, Cancel, backup, digest_file};
pub use stopped::{StoppedImage, backup_stopped};

/// Input the user must fix (an unknown volume, a malformed argument):
/// nothing was attempted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);
