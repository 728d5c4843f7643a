//! What bitback needs to know about a running QEMU: its version and run
//! state, its volumes and their dirty bitmaps.

pub mod agent;
pub mod backup;
pub mod blockdev;
pub mod commands;
pub mod daemon;
pub mod graph;
pub mod query;
pub mod schema;
mod volumes;

use serde::Serialize;

use crate::qmp::{self, QemuVersion, Qmp};

pub use crate::disk::{DiskKind, Tracking};
pub use volumes::{Bitmap, Volume, is_automatic_node_name, list_volumes};

/// A snapshot of one QEMU process, as `bitback inspect` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct QemuInfo {
    pub version: QemuVersion,
    /// `running`, `paused`, `prelaunch`, ...; `None` for qemu-storage-daemon,
    /// which has no run state.
    pub status: Option<String>,
    pub running: Option<bool>,
    pub volumes: Vec<Volume>,
}

/// QEMU's rule for a dirty bitmap's granularity: a power of two from
/// 512 bytes to 2 GiB.
pub fn check_granularity(granularity: u64) -> Result<(), String> {
    if granularity.is_power_of_two() && (512..=(2 << 30)).contains(&granularity) {
        Ok(())
    } else {
        Err("expected a power of two from 512 to 2G bytes".into())
    }
}

/// `volumes` named by `renames` (`(node name, volume name)`): only the
/// renamed ones, in the order of `renames` (a libvirt domain's disks, a
/// stopped VM's images as given). No renames: all, as they are.
pub fn named(mut volumes: Vec<Volume>, renames: &[(String, String)]) -> Vec<Volume> {
    if renames.is_empty() {
        return volumes;
    }
    volumes.retain(|v| renames.iter().any(|(node, _)| node == &v.node_name));
    for v in &mut volumes {
        if let Some((_, name)) = renames.iter().find(|(node, _)| node == &v.node_name) {
            v.name = name.clone();
        }
    }
    volumes.sort_by_key(|v| renames.iter().position(|(node, _)| node == &v.node_name));
    volumes
}

/// Removes dirty bitmap `name` from `node` (`block-dirty-bitmap-remove`;
/// a persistent one leaves the image too).
pub async fn remove_bitmap(qmp: &Qmp, node: &str, name: &str) -> qmp::Result<()> {
    qmp.execute_raw(
        "block-dirty-bitmap-remove",
        serde_json::json!({ "node": node, "name": name }),
    )
    .await
    .map(drop)
}

/// Gathers version, run state and volumes.
pub async fn inspect(qmp: &Qmp) -> qmp::Result<QemuInfo> {
    let (status, running) = match query::status(qmp).await {
        Ok(reply) => (Some(reply.status), Some(reply.running)),
        Err(e) if e.is_command_not_found() => (None, None),
        Err(e) => return Err(e),
    };
    Ok(QemuInfo {
        version: qmp.greeting().version.clone(),
        status,
        running,
        volumes: list_volumes(qmp).await?,
    })
}
