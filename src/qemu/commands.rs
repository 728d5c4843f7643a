//! The QMP commands bitback sends, as functions with typed arguments:
//! those that take a thing apart or move the VM by QEMU's schema
//! (`qapi-qmp`), those that add a thing by bitback's own types of it
//! ([`super::blockdev`]). Either way the compiler checks the arguments,
//! not QEMU at run time. (A raw `job-cancel` carried a `force` the command
//! does not take, and QEMU refused every cancel.)

use qapi_qmp as q;
use serde_json::json;

use super::backup::to_value;
use super::blockdev::{Export, Node};
use crate::qmp::{Qmp, Result};

/// `blockdev-add`: opens `node`.
pub async fn add_node(qmp: &Qmp, node: &Node) -> Result<()> {
    let arguments = to_value("blockdev-add", node)?;
    qmp.execute_raw("blockdev-add", arguments).await.map(drop)
}

/// `block-export-add`: serves `export`.
pub async fn add_export(qmp: &Qmp, export: &Export) -> Result<()> {
    let arguments = to_value("block-export-add", export)?;
    qmp.execute_raw("block-export-add", arguments)
        .await
        .map(drop)
}

/// `object-add` of a `secret` holding `base64` (a key).
pub async fn add_secret(qmp: &Qmp, id: &str, base64: &str) -> Result<()> {
    let arguments = json!({ "qom-type": "secret", "id": id, "data": base64, "format": "base64" });
    qmp.execute_raw("object-add", arguments).await.map(drop)
}

/// `object-add` of an `authz-simple` object `id` whose `identity` is
/// `holder`. QEMU refuses a second object of one id, so only one client
/// adds it: a lock inside the VM, which every client of it sees (read it
/// with [`super::query::marker_holder`]).
pub async fn add_marker(qmp: &Qmp, id: &str, holder: &str) -> Result<()> {
    let arguments = json!({ "qom-type": "authz-simple", "id": id, "identity": holder });
    qmp.execute_raw("object-add", arguments).await.map(drop)
}

/// `qom-set` of device `qdev`'s `drive`: the device reads `node` from now
/// on (the guard's filter, or the volume again).
pub async fn set_device_drive(qmp: &Qmp, qdev: &str, node: &str) -> Result<()> {
    let arguments = json!({ "path": qdev, "property": "drive", "value": node });
    qmp.execute_raw("qom-set", arguments).await.map(drop)
}

/// `chardev-add` of a client socket to `path`, as character device `id`.
pub async fn add_socket_chardev(qmp: &Qmp, id: &str, path: &std::path::Path) -> Result<()> {
    let path = to_value("chardev-add", path)?;
    let backend = json!({
        "type": "socket",
        "data": {
            "addr": { "type": "unix", "data": { "path": path } },
            "server": false,
        }
    });
    qmp.execute_raw("chardev-add", json!({ "id": id, "backend": backend }))
        .await
        .map(drop)
}

/// `chardev-remove`.
pub async fn remove_chardev(qmp: &Qmp, id: &str) -> Result<()> {
    qmp.execute(q::chardev_remove { id: id.into() })
        .await
        .map(drop)
}

/// `closefd`: closes a descriptor passed by `getfd` under `name`.
pub async fn close_fd(qmp: &Qmp, name: &str) -> Result<()> {
    qmp.execute(q::closefd {
        fdname: name.into(),
    })
    .await
    .map(drop)
}

/// `blockdev-del`: closes node `name`.
pub async fn delete_node(qmp: &Qmp, name: &str) -> Result<()> {
    let command = q::blockdev_del {
        node_name: name.into(),
    };
    qmp.execute(command).await.map(drop)
}

/// `job-dismiss`: takes a concluded job away.
pub async fn dismiss_job(qmp: &Qmp, id: &str) -> Result<()> {
    qmp.execute(q::job_dismiss { id: id.into() })
        .await
        .map(drop)
}

/// `job-cancel`: asks job `id` to stop; it concludes a moment later.
pub async fn cancel_job(qmp: &Qmp, id: &str) -> Result<()> {
    qmp.execute(q::job_cancel { id: id.into() }).await.map(drop)
}

/// `block-job-set-speed`: the job's bytes per second (0: no limit).
pub async fn set_job_speed(qmp: &Qmp, id: &str, speed: u64) -> Result<()> {
    let command = q::block_job_set_speed {
        device: id.into(),
        speed: i64::try_from(speed).unwrap_or(i64::MAX),
    };
    qmp.execute(command).await.map(drop)
}

/// `remove-fd`: drops fd set `id` (its descriptors close once nothing
/// uses them).
pub async fn remove_fdset(qmp: &Qmp, id: i64) -> Result<()> {
    let command = q::remove_fd {
        fdset_id: id,
        fd: None,
    };
    qmp.execute(command).await.map(drop)
}

/// `object-del`: removes QOM object `id` (a secret).
pub async fn delete_object(qmp: &Qmp, id: &str) -> Result<()> {
    qmp.execute(q::object_del { id: id.into() }).await.map(drop)
}

/// `stop`: pauses the VM (and flushes its disks).
pub async fn stop(qmp: &Qmp) -> Result<()> {
    qmp.execute(q::stop {}).await.map(drop)
}

/// `cont`: resumes the VM.
pub async fn cont(qmp: &Qmp) -> Result<()> {
    qmp.execute(q::cont {}).await.map(drop)
}

/// `quit`: ends the QEMU (a storage daemon of bitback's).
pub async fn quit(qmp: &Qmp) -> Result<()> {
    qmp.execute(q::quit {}).await.map(drop)
}

/// `block-export-del`: ends export `id`.
pub async fn delete_export(qmp: &Qmp, id: &str) -> Result<()> {
    let command = q::block_export_del {
        id: id.into(),
        mode: None,
    };
    qmp.execute(command).await.map(drop)
}
