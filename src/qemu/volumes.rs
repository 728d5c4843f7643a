//! Volume discovery: which disks a running QEMU has, and their bitmaps.
//!
//! A volume is a guest device's disk (from `query-block`) or, when QEMU has no
//! block devices (`-machine none`, qemu-storage-daemon), a named format node
//! that no other node uses. Its facts come from the node that holds the
//! image: filters QEMU stacks on top (a backup job's `copy-before-write`, a
//! `throttle` group) are walked through with the block graph, so a volume
//! looks the same during a job as outside one.
//!
//! Replies are decoded leniently into bitback's own structs: a field or enum
//! value from a newer QEMU is ignored, never an error.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::debug;

use super::graph::Graph;
use super::query::{self, Block, Node};
use crate::disk::DiskKind;
use crate::qmp::{self, Qmp};

/// Drivers that only pass requests to their `file` child.
const FILTER_DRIVERS: &[&str] = &[
    "copy-before-write",
    "throttle",
    "copy-on-read",
    "compress",
    "preallocate",
    "blkdebug",
    "blklogwrites",
    "snapshot-access",
];

/// Drivers that talk to storage rather than interpret an image format.
const PROTOCOL_DRIVERS: &[&str] = &[
    "file",
    "host_device",
    "host_cdrom",
    "nbd",
    "nfs",
    "iscsi",
    "rbd",
    "ssh",
    "http",
    "https",
    "null-co",
    "null-aio",
    "io_uring",
    "nvme",
    "gluster",
];

/// One disk of a VM, as bitback names and backs it up.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Volume {
    /// The device's qdev id, the `-drive` id, or the node name.
    pub name: String,
    /// The node that holds the image (below any filter).
    pub node_name: String,
    /// The node's driver: `qcow2`, `raw`, ...
    pub format: String,
    /// The image file QEMU opened.
    pub image_file: String,
    pub virtual_size: u64,
    pub read_only: bool,
    /// The image's backing file, when it has one (a template, an external
    /// snapshot's base): a full backup must then copy through it.
    pub backing_file: Option<String>,
    /// The guest device's QOM path, when the volume is a device.
    pub device: Option<String>,
    /// The name of the device's block backend when it has one of its own:
    /// a disk given with `-drive` (its id), which QEMU's graph shows in
    /// place of the device's QOM path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// What the image is, which decides how its changes can be tracked.
    pub kind: DiskKind,
    /// The image is encrypted (QEMU decrypts it for the guest).
    pub encrypted: bool,
    pub bitmaps: Vec<Bitmap>,
}

/// A dirty bitmap on a volume's node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitmap {
    pub name: String,
    #[serde(default)]
    pub recording: bool,
    #[serde(default)]
    pub busy: bool,
    #[serde(default)]
    pub persistent: bool,
    #[serde(default)]
    pub inconsistent: bool,
    pub granularity: u64,
    /// Dirty bytes.
    pub count: u64,
}

/// QEMU assigns `#block123`-style names itself, and differently on every
/// start: they identify nothing across runs.
pub fn is_automatic_node_name(name: &str) -> bool {
    name.is_empty() || name.starts_with('#')
}

/// The id a guest device was given (`-device ...,id=disk0`), from its QOM
/// path: `/machine/peripheral/disk0/virtio-backend` gives `disk0`.
/// Anonymous devices live under `/machine/peripheral-anon` and have none.
fn qdev_id(qdev: &str) -> Option<&str> {
    if !qdev.starts_with('/') {
        return (!qdev.is_empty()).then_some(qdev);
    }
    let rest = qdev.strip_prefix("/machine/peripheral/")?;
    let id = rest.split('/').next()?;
    (!id.is_empty()).then_some(id)
}

/// Lists the volumes of the QEMU behind `qmp`, in the order QEMU reports
/// them (device order for a VM, node creation order otherwise).
pub async fn list_volumes(qmp: &Qmp) -> qmp::Result<Vec<Volume>> {
    let blocks = query::blocks(qmp).await?;
    let nodes = query::nodes(qmp).await?;
    let graph = match super::graph::query(qmp).await? {
        Some(graph) => graph,
        None => {
            debug!("no x-debug-query-block-graph: filters are not walked");
            Graph::default()
        }
    };
    let by_name: HashMap<&str, &Node> = nodes.iter().map(|n| (n.node_name.as_str(), n)).collect();

    // The node a format node reads from (`file`, `host_device`, ...).
    let protocol_of = |node: &Node| -> Option<&Node> {
        graph
            .file_child(&node.node_name)
            .and_then(|child| by_name.get(child).copied())
    };

    // Below filters, to the node that holds the image.
    let image_node = |top: &str| -> Option<&Node> {
        let mut name = top;
        for _ in 0..16 {
            let node = by_name.get(name)?;
            if !FILTER_DRIVERS.contains(&node.drv.as_str()) {
                return Some(node);
            }
            name = graph.file_child(name)?;
        }
        None
    };

    let mut volumes = Vec::new();
    let devices: Vec<&Block> = blocks.iter().filter(|b| b.inserted.is_some()).collect();
    if !devices.is_empty() {
        for block in devices {
            let Some(inserted) = &block.inserted else {
                continue;
            };
            let Some(node) = image_node(&inserted.node_name) else {
                debug!(device = %block.device, node = %inserted.node_name, "device's node not found; skipped");
                continue;
            };
            let name = block
                .qdev
                .as_deref()
                .and_then(qdev_id)
                .map(str::to_string)
                .or_else(|| (!block.device.is_empty()).then(|| block.device.clone()))
                .or_else(|| {
                    (!is_automatic_node_name(&node.node_name)).then(|| node.node_name.clone())
                })
                .or_else(|| block.qdev.clone())
                .unwrap_or_else(|| node.node_name.clone());
            let protocol = protocol_of(node);
            let mut v = volume(name, node, protocol, block.qdev.clone())?;
            v.backend =
                (block.qdev.is_some() && !block.device.is_empty()).then(|| block.device.clone());
            volumes.push(v);
        }
        return Ok(volumes);
    }

    // No devices: the volumes are the named images at the top of the graph.
    // Sorted by name, since nodes have no order that survives a restart.
    let children = graph.children();
    let mut names: Vec<&str> = Vec::new();
    for node in &nodes {
        if children.contains(node.node_name.as_str()) {
            continue;
        }
        let Some(image) = image_node(&node.node_name) else {
            continue;
        };
        if is_automatic_node_name(&image.node_name)
            || PROTOCOL_DRIVERS.contains(&image.drv.as_str())
            || names.contains(&image.node_name.as_str())
        {
            continue;
        }
        names.push(&image.node_name);
    }
    names.sort_unstable();
    for name in names {
        if let Some(node) = by_name.get(name) {
            volumes.push(volume(name.to_string(), node, protocol_of(node), None)?);
        }
    }
    Ok(volumes)
}

fn volume(
    name: String,
    node: &Node,
    protocol: Option<&Node>,
    device: Option<String>,
) -> qmp::Result<Volume> {
    let bitmaps = node
        .dirty_bitmaps
        .iter()
        .filter(|raw| raw.get("name").is_some())
        .map(|raw| query::decode("query-named-block-nodes", raw.clone()))
        .collect::<qmp::Result<Vec<Bitmap>>>()?;
    let mut image_file = if node.image.filename.is_empty() {
        node.file.clone()
    } else {
        node.image.filename.clone()
    };
    // Options QEMU cannot put in a file name (an encryption secret, ...)
    // make it `json:{...}`; the protocol node still has the plain path.
    if image_file.starts_with("json:")
        && let Some(p) = protocol.filter(|p| !p.file.is_empty() && !p.file.starts_with("json:"))
    {
        image_file = p.file.clone();
    }
    Ok(Volume {
        name,
        node_name: node.node_name.clone(),
        // A protocol node read directly is a raw image.
        format: if PROTOCOL_DRIVERS.contains(&node.drv.as_str()) {
            "raw".to_string()
        } else {
            node.drv.clone()
        },
        kind: disk_kind(node, protocol, &image_file),
        encrypted: node.encrypted,
        image_file,
        virtual_size: node.image.virtual_size,
        read_only: node.ro,
        backing_file: node.image.backing_filename.clone(),
        device,
        backend: None,
        bitmaps,
    })
}

fn disk_kind(node: &Node, protocol: Option<&Node>, image_file: &str) -> DiskKind {
    match node.drv.as_str() {
        "qcow2" => {
            let compat = node
                .image
                .format_specific
                .as_ref()
                .and_then(|f| f.pointer("/data/compat"))
                .and_then(Value::as_str);
            if compat == Some("0.10") {
                DiskKind::Qcow2V2
            } else {
                DiskKind::Qcow2
            }
        }
        "raw" => {
            let device = match protocol {
                Some(p) => p.drv == "host_device",
                // No block graph (an old QEMU): judge by the path.
                None => std::fs::metadata(image_file)
                    .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
                    .unwrap_or(false),
            };
            if device {
                DiskKind::RawDevice
            } else {
                DiskKind::RawFile
            }
        }
        // No format node above the storage: a raw image (libvirt opens
        // raw disks so, as `libvirt-N-storage` alone).
        "file" => DiskKind::RawFile,
        drv if PROTOCOL_DRIVERS.contains(&drv) => DiskKind::RawDevice,
        _ => DiskKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qdev_id_from_qom_paths() {
        assert_eq!(
            qdev_id("/machine/peripheral/disk0/virtio-backend"),
            Some("disk0")
        );
        assert_eq!(qdev_id("/machine/peripheral/scsi1"), Some("scsi1"));
        assert_eq!(
            qdev_id("/machine/peripheral-anon/device[0]/virtio-backend"),
            None
        );
        assert_eq!(qdev_id("disk7"), Some("disk7"));
        assert_eq!(qdev_id(""), None);
    }

    #[test]
    fn automatic_node_names() {
        assert!(is_automatic_node_name("#block123"));
        assert!(is_automatic_node_name(""));
        assert!(!is_automatic_node_name("drive0"));
    }
}
