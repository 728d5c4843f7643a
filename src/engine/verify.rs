//! Verifying backups: every file's metadata parses, its backing name is
//! exactly the one the layout gives it (nothing leaves the repository), its
//! parent exists, its size and digest match the manifest. Every file is
//! checked even after a failure; verify reports and never deletes.

use serde::Serialize;

use crate::digest::file as digest_file;
use crate::qcow2::{self, Image};
use crate::repo::{Manifest, Repo};

/// One thing wrong with one backup (or one of its files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub vm: String,
    pub backup: String,
    /// The file, relative to the repository, when the problem is a file's.
    pub file: Option<String>,
    pub problem: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub backups: usize,
    pub files: usize,
    pub problems: Vec<Problem>,
}

/// Which backups to check.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub vm: Option<String>,
    pub backup: Option<String>,
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
            report.backups += 1;
            match repo.manifest(&vm, &id) {
                Ok(m) => {
                    if let Err(e) = super::chain::chain(repo, &m) {
                        report.problems.push(Problem {
                            vm: vm.clone(),
                            backup: id.clone(),
                            file: None,
                            problem: format!("{e:#}"),
                        });
                    }
                    let before = report.problems.len();
                    verify_backup(repo, &m, &mut report);
                    record_damage(repo, &m, &report.problems[before..]);
                }
                Err(e) => report.problems.push(Problem {
                    vm: vm.clone(),
                    backup: id.clone(),
                    file: None,
                    problem: format!("{e:#}"),
                }),
            }
        }
    }
    Ok(report)
}

/// Records the data damage verify found in `m`'s files (what only a
/// digest or the cluster tables show), so that the next backup takes a
/// full of the volume instead of building on it. Verify's only write.
fn record_damage(repo: &Repo, m: &Manifest, problems: &[Problem]) {
    for p in problems {
        let Some(v) = p
            .file
            .as_ref()
            .and_then(|f| m.volumes.iter().find(|v| &v.file == f))
        else {
            continue;
        };
        if !(p.problem.starts_with("digest is") || p.problem.starts_with("cluster map")) {
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

/// Why `image` must not be read, if it names an external data file:
/// backup files never do, and one that does would lead reads (and
/// `qemu-img`) to any file on the host.
pub(crate) fn data_file_problem(image: &Image) -> Option<String> {
    (image.header().has_data_file() || image.hc.data_file.is_some()).then(|| {
        format!(
            "names an external data file ({:?}); backup files never do, and bitback does not read one",
            image.hc.data_file.as_deref().unwrap_or("")
        )
    })
}

/// Checks one backup's files; pushes every problem found.
pub fn verify_backup(repo: &Repo, m: &Manifest, report: &mut Report) {
    if let Some(parent) = &m.parent
        && let Err(e) = repo.manifest(&m.vm, parent)
    {
        report.problems.push(Problem {
            vm: m.vm.clone(),
            backup: m.id.clone(),
            file: None,
            problem: format!("parent backup {parent} is unusable: {e:#}"),
        });
    }
    let before = report.problems.len();
    super::chain::verify_structure(repo, m, report);
    let failed: Vec<String> = report.problems[before..]
        .iter()
        .filter_map(|p| p.file.clone())
        .collect();
    let mut problem = |file: Option<&str>, text: String| {
        report.problems.push(Problem {
            vm: m.vm.clone(),
            backup: m.id.clone(),
            file: file.map(str::to_string),
            problem: text,
        })
    };

    let mut files = 0;
    for v in &m.volumes {
        files += 1;
        let file = Some(v.file.as_str());
        let path = repo.root().join(&v.file);
        let image = match Image::open(&path) {
            Ok(image) if !failed.contains(&v.file) => image,
            // Reported by the structural check; the cluster tables of a
            // file that failed it are not read.
            _ => continue,
        };
        if let Err(e) = qcow2::walk(
            &match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    problem(file, format!("cannot open: {e}"));
                    continue;
                }
            },
            &image,
            |_| Ok(()),
        ) {
            problem(file, format!("cluster map: {e}"));
        }
        match digest_file(&path) {
            Ok(digest) if digest == v.digest => {}
            Ok(digest) => problem(
                file,
                format!("digest is {digest}, the manifest says {}", v.digest),
            ),
            Err(e) => problem(file, format!("cannot read: {e}")),
        }
    }
    report.files += files;
}
