//! QEMU's `query-*` replies bitback reads, decoded leniently into its own
//! structs: a field or enum value from a newer QEMU is ignored, never an
//! error, and a missing optional field reads as its default. (The
//! `qapi-qmp` reply types refuse an enum value they do not know.)

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::qmp::{self, Qmp};

/// Runs query `command` (with `arguments`, or none) and decodes its reply.
async fn query<T: DeserializeOwned>(qmp: &Qmp, command: &str, arguments: Value) -> qmp::Result<T> {
    decode(command, qmp.execute_raw(command, arguments).await?)
}

/// Decodes the reply of `command`.
pub(super) fn decode<T: DeserializeOwned>(command: &str, value: Value) -> qmp::Result<T> {
    serde_json::from_value(value).map_err(|source| qmp::Error::UnexpectedReply {
        command: command.to_string(),
        source,
    })
}

/// A job of `query-jobs`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Job {
    pub id: String,
    /// `running`, `concluded`, ... (a string: newer QEMUs add states).
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub current_progress: u64,
    #[serde(default)]
    pub total_progress: u64,
    #[serde(default)]
    pub error: Option<String>,
}

/// `query-jobs`: every job, of every kind.
pub async fn jobs(qmp: &Qmp) -> qmp::Result<Vec<Job>> {
    query(qmp, "query-jobs", Value::Null).await
}

/// A block job of `query-block-jobs`.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockJob {
    /// The job's id (`device` in this older reply).
    pub device: String,
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub len: u64,
}

/// `query-block-jobs`.
pub async fn block_jobs(qmp: &Qmp) -> qmp::Result<Vec<BlockJob>> {
    query(qmp, "query-block-jobs", Value::Null).await
}

/// A guest device's drive (or a `-drive` without one) of `query-block`.
#[derive(Debug, Clone, Deserialize)]
pub struct Block {
    #[serde(default)]
    pub device: String,
    /// The device's QOM path (or id), when the drive has a device.
    #[serde(default)]
    pub qdev: Option<String>,
    /// The medium, when one is inserted.
    #[serde(default)]
    pub inserted: Option<Inserted>,
}

/// The medium of a [`Block`].
#[derive(Debug, Clone, Deserialize)]
pub struct Inserted {
    /// The node the device reads (its top node: a filter, when one stands).
    #[serde(rename = "node-name")]
    pub node_name: String,
}

/// `query-block`.
pub async fn blocks(qmp: &Qmp) -> qmp::Result<Vec<Block>> {
    query(qmp, "query-block", Value::Null).await
}

/// A block node of `query-named-block-nodes`.
#[derive(Debug, Clone, Deserialize)]
pub struct Node {
    #[serde(rename = "node-name", default)]
    pub node_name: String,
    /// Its driver (`qcow2`, `file`, `copy-before-write`, ...).
    pub drv: String,
    #[serde(default)]
    pub file: String,
    #[serde(default)]
    pub ro: bool,
    #[serde(default)]
    pub encrypted: bool,
    /// The backing file name the image's header holds.
    #[serde(default)]
    pub backing_file: Option<String>,
    pub image: Image,
    /// Internal bitmaps (a running job's) have no name.
    #[serde(rename = "dirty-bitmaps", default)]
    pub dirty_bitmaps: Vec<Value>,
}

/// The image facts of a [`Node`].
#[derive(Debug, Clone, Deserialize)]
pub struct Image {
    #[serde(default)]
    pub filename: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
    #[serde(rename = "format-specific", default)]
    pub format_specific: Option<Value>,
}

/// `query-named-block-nodes` (flat: every node, children included).
pub async fn nodes(qmp: &Qmp) -> qmp::Result<Vec<Node>> {
    query(qmp, "query-named-block-nodes", json!({ "flat": true })).await
}

/// `query-status`: the VM's run state.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub running: bool,
    /// `running`, `paused`, `inmigrate`, ... (a string: newer QEMUs add
    /// states).
    #[serde(default)]
    pub status: String,
}

/// `query-status` (a VM has it; qemu-storage-daemon does not).
pub async fn status(qmp: &Qmp) -> qmp::Result<Status> {
    query(qmp, "query-status", Value::Null).await
}

/// A descriptor set of `query-fdsets`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FdSet {
    pub fdset_id: i64,
    #[serde(default)]
    pub fds: Vec<FdInfo>,
}

/// A descriptor of an [`FdSet`].
#[derive(Debug, Clone, Deserialize)]
pub struct FdInfo {
    /// The label it was added with (`add-fd`'s `opaque`).
    #[serde(default)]
    pub opaque: Option<String>,
}

/// `query-fdsets`.
pub async fn fdsets(qmp: &Qmp) -> qmp::Result<Vec<FdSet>> {
    query(qmp, "query-fdsets", Value::Null).await
}

/// `query-block-exports`: the ids of the exports QEMU serves.
pub async fn export_ids(qmp: &Qmp) -> qmp::Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Export {
        id: String,
    }
    let exports: Vec<Export> = query(qmp, "query-block-exports", Value::Null).await?;
    Ok(exports.into_iter().map(|e| e.id).collect())
}

/// What a VM says it is: its SMBIOS UUID (`query-uuid`, lowercase; `None`
/// when all zeros or not set) and its `-name`, each `None` when QEMU does
/// not answer.
pub async fn identity(qmp: &Qmp) -> (Option<String>, Option<String>) {
    #[derive(Deserialize)]
    struct Uuid {
        #[serde(rename = "UUID")]
        uuid: String,
    }
    #[derive(Deserialize)]
    struct Name {
        #[serde(default)]
        name: Option<String>,
    }
    let uuid = query::<Uuid>(qmp, "query-uuid", Value::Null)
        .await
        .ok()
        .map(|r| r.uuid.to_ascii_lowercase())
        .filter(|u| u.chars().any(|c| c != '0' && c != '-'));
    let name = query::<Name>(qmp, "query-name", Value::Null)
        .await
        .ok()
        .and_then(|r| r.name)
        .filter(|n| !n.is_empty());
    (uuid, name)
}

/// The `identity` of marker object `id` ([`super::commands::add_marker`]);
/// `None` when there is no such object.
pub async fn marker_holder(qmp: &Qmp, id: &str) -> qmp::Result<Option<String>> {
    let path = format!("/objects/{id}");
    match qmp
        .execute_raw("qom-get", json!({ "path": path, "property": "identity" }))
        .await
    {
        Ok(reply) => Ok(reply.as_str().map(str::to_string)),
        Err(e) if e.class() == Some(qmp::ErrorClass::DeviceNotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The ids of the user-created QOM objects (`qom-list /objects`).
pub async fn object_ids(qmp: &Qmp) -> qmp::Result<Vec<String>> {
    let reply = qmp
        .execute_raw("qom-list", json!({ "path": "/objects" }))
        .await?;
    Ok(reply
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"].as_str().is_some_and(|t| t.starts_with("child<")))
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect())
}

/// `qom-get` of a device's `drive` property: the node it reads (`None`
/// when the reply is not a name).
pub async fn device_drive(qmp: &Qmp, qdev: &str) -> qmp::Result<Option<String>> {
    let reply = qmp
        .execute_raw("qom-get", json!({ "path": qdev, "property": "drive" }))
        .await?;
    Ok(reply.as_str().map(str::to_string))
}
