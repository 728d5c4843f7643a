//! The operations: [`plan`] decides full or incremental from facts alone;
//! [`backup`] carries a backup out against a running QEMU, [`backup_stopped`]
//! against a stopped VM's images through a qemu-storage-daemon it starts;
//! [`verify`] checks what the repository holds; [`restore`] turns a point
//! back into an image.

mod backup;
mod chain;
mod export;
pub mod key;
pub mod plan;
mod restore;
mod retention;
pub mod scope;
mod stopped;
mod verify;

pub use crate::digest::file as digest_file;
pub use backup::{BackupOptions, Cancel, Perf, backup};
pub use export::{Export, ExportOptions, Listen, export};
pub use restore::{
    Format, InPlaceOptions, RestoreOptions, Restored, resolve, restore, restore_in_place,
};
pub use retention::{Keep, Retention, consolidate, prune};
pub use stopped::{StoppedImage, backup_stopped};
pub use verify::{Problem, Report, Scope, verify};

/// Input the user must fix (an unknown volume, a malformed argument):
/// nothing was attempted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);
