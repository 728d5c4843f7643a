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
mod in_bucket;
pub mod key;
mod native;
mod nbd_target;
mod objects;
mod outcome;
pub mod plan;
mod progress;
mod proof;
mod quiesce;
mod restore;
mod retention;
mod run;
pub mod scope;
pub mod serve;
mod stopped;
mod sync;
pub mod thaw_guard;
mod verify;

pub use crate::digest::file as digest_file;
pub use backup::{BackupOptions, backup, backup_named};
pub use chain::{Pick, resolve};
pub use check::data_file_problem;
pub use check::{Checks, Problem, Report, Sample};
pub use copy::{Cancel, CopyOptions, CopyPlan, DataPath, Perf, Rate, Target, copy_to_files};
pub use in_bucket::{
    BucketRestored, bucket_points, prune_bucket, restore_from_bucket, verify_bucket,
};
pub use objects::{BucketPoint, UsedVersion};
pub use outcome::{BadInput, Operation, nothing_attempted};
pub use progress::{Progress, ProgressSink};
pub use restore::{Format, InPlaceOptions, RestoreOptions, Restored, restore, restore_in_place};
pub use retention::{Calendar, Keep, Locked, Retention, consolidate, prune, prune_plan};
pub use run::{BackupRun, Planned, PlannedVolume, backup_vm, plan_vm};
pub use serve::bucket::{ServedPoint, ServedVolume, serve_from_bucket};
pub use serve::{
    Export, ExportOptions, FinishReport, Finished, Listen, LiveOptions, MountOptions, PointIn,
    Served, ServedFile, export, finish, finish_domain, mount, mount_bucket, restore_live,
    restore_live_bucket, restore_live_domain, umount,
};
pub use stopped::{StoppedImage, backup_stopped, domain_images};
pub use sync::{
    StreamTo, SyncAction, SyncOptions, Synced, check_bucket, lock_for_backup, retention_for,
    sync_from_bucket, sync_to_bucket, upload_spool,
};
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
