//! The operations: [`plan`] decides full or incremental from facts alone;
//! [`backup`] carries a backup out against a running QEMU, [`backup_stopped`]
//! against a stopped VM's images through a qemu-storage-daemon it starts;
//! [`verify`] checks what the repository holds; [`restore`] turns a point
//! back into an image.

mod backup;
mod chain;
mod check;
mod content;
mod copy;
mod guard;
pub mod key;
mod nbd_target;
pub mod plan;
mod quiesce;
mod restore;
mod retention;
pub mod scope;
pub mod serve;
mod stopped;
pub mod thaw_guard;
mod verify;

pub use crate::digest::file as digest_file;
pub use backup::{BackupOptions, BackupRun, DataPath, backup, backup_named, backup_vm};
pub use chain::resolve;
pub use check::data_file_problem;
pub use check::{Checks, Problem, Report};
pub use copy::{Cancel, CopyPlan, Perf, Target, copy_to_files};
pub use restore::{Format, InPlaceOptions, RestoreOptions, Restored, restore, restore_in_place};
pub use retention::{Keep, Retention, consolidate, prune};
pub use serve::{
    Export, ExportOptions, FinishReport, Finished, Listen, LiveOptions, MountOptions, Served,
    ServedFile, export, finish, finish_domain, mount, restore_live, restore_live_domain, umount,
};
pub use stopped::{StoppedImage, backup_stopped, domain_images};
pub use verify::{Scope, verify};

/// Removes checkpoint bitmap `name` from every volume of the VM behind
/// `monitor` that has it (only from `volume`, when given); the volumes it
/// went from.
pub async fn remove_checkpoint(
    monitor: &mut crate::monitor::Monitor,
    name: &str,
    volume: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    use anyhow::Context;
    let mut removed = Vec::new();
    for v in monitor.volumes().await? {
        if volume.is_some_and(|want| want != v.name) || !v.bitmaps.iter().any(|b| b.name == name) {
            continue;
        }
        crate::qemu::remove_bitmap(&monitor.qmp, &v.node_name, name)
            .await
            .with_context(|| format!("removing {name} from volume {}", v.name))?;
        removed.push(v.name);
    }
    Ok(removed)
}

/// What the VM's state records of a volume the run saw.
pub(crate) fn state_volume(v: &crate::qemu::Volume) -> crate::repo::StateVolume {
    crate::repo::StateVolume {
        name: v.name.clone(),
        node: v.node_name.clone(),
        image_file: v.image_file.clone(),
        format: v.format.clone(),
        virtual_size: v.virtual_size,
    }
}

/// Where the engine reports the progress of long copies (the CLI draws
/// bars from it; the engine draws nothing).
pub trait Progress: Send + Sync {
    /// A new phase: `what`, with `total` bytes to go (0 while unknown).
    fn start(&self, what: &str, total: u64);
    /// Bytes done so far, and the total (which may grow).
    fn update(&self, done: u64, total: u64);
    fn finish(&self);
}

/// A [`Progress`] as an option value.
#[derive(Clone)]
pub struct ProgressSink(pub std::sync::Arc<dyn Progress>);

impl std::fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressSink")
    }
}

/// The engine's errors that a front end decides on (the CLI maps them to
/// exit codes): what failed, as a typed context: a backup or restore that
/// ran (exit 1), as opposed to [`BadInput`] or an unreachable QEMU (exit
/// 2). The layers below have their own (`qmp::Error`, `repo::Error`,
/// `libvirt::Error`, `qemu::daemon::Error`, `child::Failed`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Operation {
    #[error("backup of vm {vm}")]
    Backup { vm: String },
    #[error("restore of vm {vm}")]
    Restore { vm: String },
}

/// Whether `error` says nothing was attempted: input the user must fix
/// ([`BadInput`], no monitor named), a monitor never reached, or a
/// repository that cannot be used as given. Each error type says which of
/// its own kinds are input.
pub fn nothing_attempted(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        e.is::<BadInput>()
            || e.is::<crate::monitor::NoTarget>()
            || e.downcast_ref::<crate::qmp::Error>()
                .is_some_and(crate::qmp::Error::is_input)
            || e.downcast_ref::<crate::repo::Error>()
                .is_some_and(crate::repo::Error::is_input)
    })
}

/// Input the user must fix (an unknown volume, a malformed argument):
/// nothing was attempted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);
