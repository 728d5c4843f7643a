//! Verifying backups: every file's metadata parses, its backing name is
//! exactly the one the layout gives it (nothing leaves the repository), its
//! parent exists, its size and digest match the manifest. Every file is
//! checked even after a failure; verify reports and never deletes. Data
//! damage it finds is recorded in the repository, for the next backup
//! not to build on it; a backup that verifies whole is recorded as such
//! (`<vm>/.verified/<id>.json`, with its files' digests), so that
//! `--outdated-after` reads only what was not verified lately. `--sample`
//! reads a random share of each file's data clusters against its map:
//! damage it finds is recorded, but it never records a backup as
//! verified whole.

use super::check::{Problem, Report, Sample, verify_backup_sampled};
use crate::repo::time::Utc;
use crate::repo::{Manifest, Repo};

/// Which backups to check.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub vm: Option<String>,
    pub backup: Option<String>,
    /// Compare each cluster map with its file, cluster by cluster (reads
    /// the files' data again); without it a map is checked against its
    /// recorded digest.
    pub map_clusters: bool,
    /// Skip a backup that verified whole less than this many seconds ago
    /// (and has no damage recorded since).
    pub outdated_after: Option<i64>,
    /// Read only this share of the data clusters of each file whose map
    /// proves its data; such a verify is not recorded as whole.
    pub sample: Option<Sample>,
}

pub fn verify(repo: &Repo, scope: &Scope) -> anyhow::Result<Report> {
    let vms = match &scope.vm {
        Some(vm) => vec![vm.clone()],
        None => repo.vms()?,
    };
    let mut report = Report::default();
    for vm in vms {
        let _readers = repo.read_lock(&vm, "verify")?;
        let ids = match &scope.backup {
            Some(id) => vec![id.clone()],
            None => backup_dirs(repo, &vm)?,
        };
        for id in ids {
            let manifest = repo.manifest(&vm, &id);
            if let (Ok(m), Some(age)) = (&manifest, scope.outdated_after)
                && recently_verified(repo, m, age)
            {
                report.skipped += 1;
                continue;
            }
            report.backups += 1;
            match manifest {
                Ok(m) => {
                    let before = report.problems.len();
                    if let Err(e) = super::chain::chain(repo, &m) {
                        report.problems.push(Problem {
                            vm: vm.clone(),
                            backup: id.clone(),
                            file: None,
                            problem: format!("{e:#}"),
                            data_damage: false,
                        });
                    }
                    let checked = report.problems.len();
                    verify_backup_sampled(
                        repo,
                        &m,
                        &mut report,
                        scope.map_clusters,
                        scope.sample.as_ref(),
                    );
                    record_damage(repo, &m, &report.problems[checked..]);
                    if report.problems.len() == before
                        && scope.sample.is_none()
                        && let Err(e) = repo.mark_verified(&m, &Utc::now())
                    {
                        tracing::warn!(vm = %m.vm, backup = %m.id, error = %e, "could not record the verification; the next verify --outdated-after reads it again");
                    }
                }
                Err(e) => report.problems.push(Problem {
                    vm: vm.clone(),
                    backup: id.clone(),
                    file: None,
                    problem: format!("{e:#}"),
                    data_damage: false,
                }),
            }
        }
    }
    Ok(report)
}

/// Whether backup `m` verified whole less than `age` seconds ago, and no
/// damage was recorded on its files since.
fn recently_verified(repo: &Repo, m: &Manifest, age: i64) -> bool {
    let Some(at) = repo.verified_at(m) else {
        return false;
    };
    let damaged = m
        .volumes
        .iter()
        .any(|v| repo.damage(&m.vm, &m.id, &v.name, &v.digest).is_some());
    let elapsed = Utc::now().to_unix() - at.to_unix();
    !damaged && (0..age).contains(&elapsed)
}

/// Records the data damage verify found in `m`'s files (what only a
/// digest or the cluster tables show; a file's cluster map when its
/// layout digest leaves the data's proof to it), so that the next backup takes a
/// full of the volume instead of building on it. With the record of a
/// backup found whole, verify's only writes.
fn record_damage(repo: &Repo, m: &Manifest, problems: &[Problem]) {
    for p in problems {
        let Some(v) = p.file.as_ref().and_then(|f| {
            m.volumes
                .iter()
                .find(|v| &v.file == f || v.cluster_map.as_ref().is_some_and(|map| &map.file == f))
        }) else {
            continue;
        };
        if !p.data_damage {
            continue;
        }
        if let Err(e) = repo.mark_damaged(&m.vm, &m.id, &v.name, &v.digest, &p.problem) {
            tracing::warn!(vm = %m.vm, backup = %m.id, volume = %v.name, error = %e, "could not record the damage found; the next backup does not know of it");
        }
    }
}

/// Backup directories of `vm` by name, whether or not their manifest reads.
fn backup_dirs(repo: &Repo, vm: &str) -> anyhow::Result<Vec<String>> {
    let dir = repo.vm_dir(vm)?;
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.path().is_dir() {
            ids.push(name);
        }
    }
    ids.sort();
    Ok(ids)
}
