//! `blockdev-backup` and the `transaction` that starts a point's jobs,
//! as types: the job's arguments (`BlockdevBackup`), its `x-perf` tuning
//! (`BackupPerf`, passed only as far as this QEMU's schema lists it) and
//! the actions bitback puts in one transaction.

use serde::Serialize;
use serde_json::json;
use tracing::warn;

use super::blockdev::BitmapRef;
use crate::qmp::{self, Qmp};

/// `blockdev-backup`'s `x-perf` tuning (QEMU 6.0 and newer; an unstable
/// interface, so each field is passed only when set and the QEMU's schema
/// lists it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Perf {
    /// Parallel copy requests per job (QEMU's default: 64).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_workers: Option<u64>,
    /// Largest request in bytes (QEMU's default: no limit beyond its own
    /// 1 MiB buffer, 16 MiB with copy offloading).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_chunk: Option<u64>,
    /// Copy with copy_file_range (QEMU's default: off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_copy_range: Option<bool>,
}

impl Perf {
    /// What of this tuning the QEMU behind `qmp` accepts (`None`: nothing
    /// to pass), warning about each field it lacks.
    pub async fn for_qemu(&self, qmp: &Qmp) -> qmp::Result<Option<Perf>> {
        if *self == Perf::default() {
            return Ok(None);
        }
        let known = super::schema::backup_perf_members(qmp).await?;
        let mut kept = self.clone();
        let check = |name: &str, set: bool| -> bool {
            let has = known.iter().any(|k| k == name);
            if set && !has {
                warn!(
                    option = name,
                    qemu = %qmp.greeting().version,
                    "this QEMU has no x-perf {name} (QEMU 6.0 and newer); copying with its default"
                );
            }
            has
        };
        if !check("max-workers", kept.max_workers.is_some()) {
            kept.max_workers = None;
        }
        if !check("max-chunk", kept.max_chunk.is_some()) {
            kept.max_chunk = None;
        }
        if !check("use-copy-range", kept.use_copy_range.is_some()) {
            kept.use_copy_range = None;
        }
        Ok((kept != Perf::default()).then_some(kept))
    }
}

/// What a backup job copies (`MirrorSyncMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sync {
    /// Every cluster.
    Full,
    /// What the source node itself allocates.
    Top,
    /// What a dirty bitmap marks.
    Bitmap,
}

/// What a job does to its bitmap at its end (`BitmapSyncMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BitmapMode {
    /// Leaves it as it was.
    Never,
}

/// A `blockdev-backup` job's arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Backup {
    pub job_id: String,
    /// The node read.
    pub device: String,
    /// The node written.
    pub target: String,
    pub sync: Sync,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmap_mode: Option<BitmapMode>,
    pub auto_dismiss: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub compress: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_perf: Option<Perf>,
}

impl Backup {
    /// Copies what `bitmap` marks, leaving the bitmap as it was.
    pub fn by_bitmap(&mut self, bitmap: &str) {
        self.sync = Sync::Bitmap;
        self.bitmap = Some(bitmap.into());
        self.bitmap_mode = Some(BitmapMode::Never);
    }
}

/// `block-dirty-bitmap-add`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BitmapAdd {
    pub node: String,
    pub name: String,
    /// Kept in the image (qcow2 v3), or in QEMU's memory only.
    pub persistent: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granularity: Option<u64>,
}

/// One action of a `transaction`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum Action {
    BlockDirtyBitmapAdd(BitmapAdd),
    BlockdevBackup(Backup),
}

/// `blockdev-backup`: starts one job.
pub async fn start(qmp: &Qmp, job: &Backup) -> qmp::Result<()> {
    qmp.execute_raw("blockdev-backup", to_value("blockdev-backup", job)?)
        .await
        .map(drop)
}

/// `transaction`: all `actions` or none.
pub async fn transaction(qmp: &Qmp, actions: &[Action]) -> qmp::Result<()> {
    let actions = to_value("transaction", actions)?;
    qmp.execute_raw("transaction", json!({ "actions": actions }))
        .await
        .map(drop)
}

/// `block-dirty-bitmap-add`.
pub async fn add_bitmap(qmp: &Qmp, bitmap: &BitmapAdd) -> qmp::Result<()> {
    let arguments = to_value("block-dirty-bitmap-add", bitmap)?;
    qmp.execute_raw("block-dirty-bitmap-add", arguments)
        .await
        .map(drop)
}

/// `block-dirty-bitmap-merge`: `sources` OR-ed into bitmap `target` of
/// `node`.
pub async fn merge_bitmaps(
    qmp: &Qmp,
    node: &str,
    target: &str,
    sources: &[BitmapRef],
) -> qmp::Result<()> {
    let arguments = json!({ "node": node, "target": target, "bitmaps": sources });
    qmp.execute_raw("block-dirty-bitmap-merge", arguments)
        .await
        .map(drop)
}

/// `block-job-cancel` with `force`: ends a block job at once (a job
/// waiting for its `job-complete` too).
pub async fn force_cancel(qmp: &Qmp, device: &str) -> qmp::Result<()> {
    qmp.execute_raw(
        "block-job-cancel",
        json!({ "device": device, "force": true }),
    )
    .await
    .map(drop)
}

/// `block-stream`: pulls the backing chain's data of `device` into it;
/// the job goes away once it ends.
pub async fn stream(qmp: &Qmp, job_id: &str, device: &str) -> qmp::Result<()> {
    qmp.execute_raw(
        "block-stream",
        json!({ "job-id": job_id, "device": device, "auto-dismiss": true }),
    )
    .await
    .map(drop)
}

/// `arguments` of `command` as JSON.
pub(super) fn to_value(command: &str, arguments: impl Serialize) -> qmp::Result<serde_json::Value> {
    serde_json::to_value(arguments).map_err(|source| qmp::Error::EncodingArguments {
        command: command.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_transaction_says_what_qemu_names() {
        let mut job = Backup {
            job_id: "j".into(),
            device: "d".into(),
            target: "t".into(),
            sync: Sync::Top,
            bitmap: None,
            bitmap_mode: None,
            auto_dismiss: false,
            speed: None,
            compress: false,
            x_perf: Some(Perf {
                max_chunk: Some(4 << 20),
                ..Perf::default()
            }),
        };
        job.by_bitmap("b");
        let actions = [
            Action::BlockDirtyBitmapAdd(BitmapAdd {
                node: "n".into(),
                name: "c".into(),
                persistent: true,
                granularity: None,
            }),
            Action::BlockdevBackup(job),
        ];
        assert_eq!(
            serde_json::to_value(actions).unwrap(),
            json!([
                {"type": "block-dirty-bitmap-add", "data": {"node": "n", "name": "c", "persistent": true}},
                {"type": "blockdev-backup", "data": {
                    "job-id": "j", "device": "d", "target": "t", "sync": "bitmap",
                    "bitmap": "b", "bitmap-mode": "never", "auto-dismiss": false,
                    "x-perf": {"max-chunk": 4194304},
                }},
            ])
        );
    }
}
