//! Chains: which backups a point builds on, which files make up one
//! volume's image at that point, and which of those files a backup, a
//! restore or an export must check (the checks themselves are
//! [`super::check`]'s).
//!
//! A point's chain follows `parent` links from it back to a full. A
//! volume's files are the suffix of that chain that starts at the last
//! link where the volume is full: a point may hold a full of one volume
//! (new, resized, or its bitmap lost) beside incrementals of the others.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::qemu::blockdev::{Node, Qcow2};
use anyhow::{Context, bail};

use super::check::{Checks, Report, known_problem, verify_backup, verify_known, verify_structure};
use super::outcome::BadInput;
use crate::repo::{BackupKind, Manifest, Repo, VolumeRecord};

/// The chain of `m`, full first. Refuses loops and missing parents.
pub(super) fn chain(repo: &Repo, m: &Manifest) -> anyhow::Result<Vec<Manifest>> {
    chain_of(m, |id| Ok(repo.manifest(&m.vm, id)?))
}

/// The chain of `m`, full first, each parent's manifest given by
/// `parent(id)`. Refuses loops and missing parents.
pub(super) fn chain_of(
    m: &Manifest,
    parent: impl Fn(&str) -> anyhow::Result<Manifest>,
) -> anyhow::Result<Vec<Manifest>> {
    let read = parent;
    let mut out = vec![m.clone()];
    let mut seen = BTreeSet::from([m.id.clone()]);
    while let Some(parent) = out.last().and_then(|m| m.parent.clone()) {
        if !seen.insert(parent.clone()) {
            bail!(
                "backup {}'s chain loops: {parent} is its own ancestor (the manifests were changed by hand or tampered with)",
                m.id
            );
        }
        let parent =
            read(&parent).with_context(|| format!("backup {} needs its parent {parent}", m.id))?;
        out.push(parent);
    }
    out.reverse();
    Ok(out)
}

/// The records of `volume` along `chain` (full first) that make up its
/// image at the chain's top: from the last link where it is full.
pub(super) fn volume_records<'a>(
    chain: &'a [Manifest],
    volume: &str,
) -> anyhow::Result<Vec<&'a VolumeRecord>> {
    let mut records: Vec<&VolumeRecord> = Vec::new();
    for link in chain {
        match link.volumes.iter().find(|r| r.name == volume) {
            Some(r) if r.kind == BackupKind::Full => records = vec![r],
            Some(r) => {
                if records.is_empty() {
                    bail!(
                        "volume {volume} of backup {} is incremental, but no earlier backup of its chain holds the volume",
                        link.id
                    );
                }
                records.push(r);
            }
            None => records.clear(),
        }
    }
    if records.is_empty() {
        bail!("no backup of the chain holds volume {volume}");
    }
    Ok(records)
}

/// The files of `volume` at the top of `chain`, full first.
pub(super) fn volume_files(
    repo: &Repo,
    chain: &[Manifest],
    volume: &str,
) -> anyhow::Result<Vec<PathBuf>> {
    Ok(volume_records(chain, volume)?
        .into_iter()
        .map(|r| repo.root().join(&r.file))
        .collect())
}

/// Checks the files that `volumes` of `m` need along `chain` (every volume
/// of `m` when empty), as much as `checks` says. Another volume's files
/// are not read; a problem of no file (a parent manifest missing) counts.
pub(super) fn check_needed(
    repo: &Repo,
    m: &Manifest,
    chain: &[Manifest],
    volumes: &[String],
    checks: Checks,
) -> anyhow::Result<Report> {
    let mut needed = BTreeSet::new();
    for v in m
        .volumes
        .iter()
        .filter(|v| volumes.is_empty() || volumes.contains(&v.name))
    {
        needed.extend(
            volume_records(chain, &v.name)?
                .into_iter()
                .map(|r| r.file.clone()),
        );
    }
    let mut report = Report::default();
    for link in chain {
        // Only the needed files are read (a restore of one small volume
        // does not digest a large one).
        let mut link = link.clone();
        link.volumes.retain(|v| needed.contains(&v.file));
        match checks {
            Checks::Digests => verify_backup(repo, &link, &mut report, false),
            Checks::Structure => verify_structure(repo, &link, &mut report),
            Checks::Known => verify_known(repo, &link, &mut report),
        }
    }
    Ok(report)
}

/// What the next incremental could not build on, as a restore would
/// check it: the point's problem (its chain cannot be followed), else,
/// per volume of `last`, the first of that volume's own files that fails
/// the structural rules. A volume with a problem takes a full alone.
pub(super) struct Buildable {
    pub point: Option<String>,
    pub volumes: BTreeMap<String, String>,
}

pub(super) fn check_buildable(repo: &Repo, last: &Manifest) -> Buildable {
    let chain = match chain(repo, last) {
        Ok(chain) => chain,
        Err(e) => {
            return Buildable {
                point: Some(format!("{e:#}")),
                volumes: BTreeMap::new(),
            };
        }
    };
    let mut volumes = BTreeMap::new();
    for v in &last.volumes {
        let problem = match volume_records(&chain, &v.name) {
            Err(e) => Some(format!("{e:#}")),
            Ok(records) => records.into_iter().find_map(|r| {
                let link = chain
                    .iter()
                    .find(|m| m.volumes.iter().any(|x| x.file == r.file))?;
                known_problem(repo, link, r).map(|p| format!("{}: {p}", r.file))
            }),
        };
        if let Some(problem) = problem {
            volumes.insert(v.name.clone(), problem);
        }
    }
    Buildable {
        point: None,
        volumes,
    }
}

/// The image of an encrypted volume's files (full first) as one QEMU
/// image spec: each file opened with the secret `secret`, the backing of
/// each the explicit file before it (never a name found in a file).
pub(super) fn encrypted_image(files: &[PathBuf], secret: &str) -> anyhow::Result<Qcow2> {
    chain_image(files, Some(secret))
}

/// A volume's files (full first) as one read-only QEMU image spec, the
/// backing of each the explicit file before it (never a name found in a
/// file), each opened with the secret `secret` when encrypted.
pub(super) fn chain_image(files: &[PathBuf], secret: Option<&str>) -> anyhow::Result<Qcow2> {
    let mut image: Option<Qcow2> = None;
    for file in files {
        let file = Node::File {
            filename: file.clone(),
            node_name: None,
            read_only: true,
            discard: None,
        };
        image = Some(Qcow2 {
            backing: Some(image.map(|below| Box::new(below.node()))),
            ..Qcow2::over(file).read_only().encrypted(secret)
        });
    }
    image.context("a volume with no files in its chain")
}

/// Which point of a VM a command reads: its newest, or one by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Pick {
    /// The newest committed point (`--backup latest`, the default).
    #[default]
    Latest,
    /// The point of this id.
    Id(String),
}

impl From<&str> for Pick {
    /// `latest` is the newest point; anything else an id.
    fn from(text: &str) -> Pick {
        match text {
            "latest" => Pick::Latest,
            id => Pick::Id(id.to_string()),
        }
    }
}

impl Pick {
    /// The id asked for, if one was.
    pub fn id(&self) -> Option<&str> {
        match self {
            Pick::Latest => None,
            Pick::Id(id) => Some(id),
        }
    }
}

/// The point `backup` of `vm` and its chain,
/// full first, refused with the first problem found when it does not
/// verify (digests only with `digests`). Only the files that `volumes`
/// need count (every volume when empty): a damaged file of one volume does
/// not keep the others from being restored.
pub fn resolve(
    repo: &Repo,
    vm: &str,
    backup: &Pick,
    checks: Checks,
    volumes: &[String],
) -> anyhow::Result<(Manifest, Vec<Manifest>)> {
    let m = match backup {
        Pick::Id(id) => repo.manifest(vm, id)?,
        Pick::Latest => repo
            .backups(vm)?
            .pop()
            .ok_or_else(|| BadInput(format!("vm {vm} has no backups")))?,
    };
    has_volumes(&m, volumes)?;
    let chain = chain(repo, &m)?;
    let report = check_needed(repo, &m, &chain, volumes, checks)?;
    refuse_problems(&m, &report)?;
    Ok((m, chain))
}

/// Refuses a volume of `volumes` that backup `m` does not hold, naming
/// those it does.
pub(super) fn has_volumes(m: &Manifest, volumes: &[String]) -> anyhow::Result<()> {
    match volumes
        .iter()
        .find(|w| !m.volumes.iter().any(|v| &&v.name == w))
    {
        Some(wanted) => Err(BadInput(format!(
            "backup {} has no volume {wanted}; it has: {}",
            m.id,
            m.volumes
                .iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .into()),
        None => Ok(()),
    }
}

/// Refuses backup `m` with the first problem of `report`, if any.
pub(super) fn refuse_problems(m: &Manifest, report: &Report) -> anyhow::Result<()> {
    if let Some(p) = report.problems.first() {
        bail!(
            "backup {} cannot be restored: {}{}{}",
            m.id,
            p.file
                .as_deref()
                .map(|f| format!("{f}: "))
                .unwrap_or_default(),
            p.problem,
            if report.problems.len() > 1 {
                format!(
                    " (and {} more problems; run bitback verify)",
                    report.problems.len() - 1
                )
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
