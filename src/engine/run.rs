//! The front door of a backup: one backup of the VM a front end names,
//! running (through its monitor) or stopped (its images, through a
//! qemu-storage-daemon), under the VM's lock.

use std::path::Path;

use super::backup::{BackupOptions, backup_named};
use super::copy::Cancel;
use super::key::Key;
use super::outcome::{BadInput, Operation};
use super::stopped::{StoppedImage, backup_stopped, domain_images};
use crate::repo::{Manifest, Repo};

/// One backup as a front end asks for it: the repository, the way in to
/// the VM, and what to do.
pub struct BackupRun<'a> {
    /// The repository's directory (made if missing; removed again if the
    /// run made it and wrote nothing).
    pub repo: &'a Path,
    /// A running VM's monitor, or a libvirt domain (running or shut off).
    pub target: crate::monitor::Target,
    /// A stopped VM's images, as given (empty: a shut-off domain's disks,
    /// or those recorded at the VM's last backup).
    pub images: Vec<StoppedImage>,
    /// The key of a stopped VM's encrypted images.
    pub image_key: Option<&'a Key>,
    /// How long a QMP command may take.
    pub qmp_timeout: std::time::Duration,
    pub opts: &'a BackupOptions,
    pub cancel: Cancel,
}

/// Runs one backup of the VM `run` names, the way in chosen as the target
/// says (its monitor, or a stopped VM's images through a storage daemon),
/// under the VM's lock; returns the committed manifest. A run that failed
/// before writing anything leaves nothing: no VM directory, and no
/// repository directory if it made it.
pub async fn backup_vm(run: BackupRun<'_>) -> anyhow::Result<Manifest> {
    let BackupRun {
        repo: root,
        target,
        mut images,
        image_key,
        qmp_timeout,
        opts,
        cancel,
    } = run;
    crate::qemu::daemon::clean_dead_runs();
    let info = match &target.domain {
        Some(domain) => Some(domain.info()?),
        None => None,
    };
    // A shut-off domain: its disks, from its XML.
    if let (Some(domain), Some(info)) = (&target.domain, &info)
        && !info.running
    {
        if target.qmp.is_some() {
            return Err(BadInput(format!(
                "domain {} is shut off; it has no monitor to reach through --qmp",
                domain.name
            ))
            .into());
        }
        images = domain_images(&domain.name, info, &opts.exclude)?;
    }
    let running = match &info {
        Some(info) => info.running,
        None => target.qmp.is_some(),
    };
    let repo_existed = root.exists();
    let remove_if_made = || {
        if !repo_existed {
            let _ = std::fs::remove_dir(root);
        }
    };
    let repo = Repo::create(root)?;
    // The lock first: a second run fails here at once.
    let lock = match repo.lock_vm(opts.vm(), "backup") {
        Ok(lock) => lock,
        Err(e) => {
            remove_if_made();
            return Err(e.into());
        }
    };
    let result = if running {
        match target.connect(info.as_ref(), qmp_timeout).await {
            Ok(monitor) => {
                backup_named(&monitor.qmp, &repo, &lock, opts, cancel, &monitor.renames).await
            }
            Err(e) => Err(e),
        }
    } else {
        backup_stopped(&repo, &lock, opts, &images, image_key, cancel).await
    };
    result.map_err(|e| {
        // A run that failed before writing anything leaves nothing.
        lock.release_unused();
        remove_if_made();
        e.context(Operation::Backup {
            vm: opts.vm().to_string(),
        })
    })
}

/// A backup's plan as `bitback backup --dry-run` gives it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Planned {
    pub vm: String,
    /// `full` or `incremental`.
    pub kind: String,
    pub reason: String,
    pub volumes: Vec<PlannedVolume>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PlannedVolume {
    pub name: String,
    /// `full`, `incremental`, or `incremental by content`.
    pub kind: String,
    pub reason: String,
}

/// What a backup of the running VM `run` names would be now, changing
/// nothing: its monitor is reached as a backup reaches it, the repository
/// only read (one that does not exist yet makes every volume full).
pub async fn plan_vm(run: BackupRun<'_>) -> anyhow::Result<Planned> {
    use super::plan::Decision;
    let info = match &run.target.domain {
        Some(domain) => Some(domain.info()?),
        None => None,
    };
    if info.as_ref().is_some_and(|i| !i.running) || (info.is_none() && run.target.qmp.is_none()) {
        return Err(BadInput(
            "--dry-run plans a running VM's backup; a stopped VM's is planned when it runs".into(),
        )
        .into());
    }
    let monitor = run.target.connect(info.as_ref(), run.qmp_timeout).await?;
    let repo = match run.repo.exists() {
        true => Some(Repo::open(run.repo)?),
        false => None,
    };
    let plan =
        super::backup::plan_named(&monitor.qmp, repo.as_ref(), run.opts, &monitor.renames).await?;
    let volumes = plan
        .volumes
        .iter()
        .enumerate()
        .map(|(i, v)| PlannedVolume {
            name: v.volume.clone(),
            kind: match v.decision {
                Decision::Full(_) => "full",
                Decision::Incremental => "incremental",
                Decision::Content(_) => "incremental by content",
            }
            .to_string(),
            reason: plan.volume_reason(i),
        })
        .collect();
    Ok(Planned {
        vm: run.opts.vm().to_string(),
        kind: if plan.is_full() {
            "full"
        } else {
            "incremental"
        }
        .to_string(),
        reason: plan.reason(),
        volumes,
    })
}
