//! The QMP commands that take a thing apart or move the VM, typed by QEMU's
//! schema (`qapi-qmp`): their arguments are checked by the compiler, not
//! by QEMU at run time. (A raw `job-cancel` carried a `force` the command
//! does not take, and QEMU refused every cancel.)

use qapi_qmp as q;

use crate::qmp::{Qmp, Result};

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
