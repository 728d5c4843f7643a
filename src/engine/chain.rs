//! Chains: which backups a point builds on, which files make up one
//! volume's image at that point, and the one structural check every user
//! of a chain applies (backup before building on it, restore and export
//! before reading it, verify).
//!
//! A point's chain follows `parent` links from it back to a full. A
//! volume's files are the suffix of that chain that starts at the last
//! link where the volume is full: a point may hold a full of one volume
//! (new, resized, or its bitmap lost) beside incrementals of the others.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::verify::{Problem, Report, data_file_problem};
use crate::qcow2::Image;
use crate::repo::{BackupKind, Manifest, Repo, VolumeRecord};

/// The chain of `m`, full first. Refuses loops and missing parents.
pub(super) fn chain(repo: &Repo, m: &Manifest) -> anyhow::Result<Vec<Manifest>> {
    let mut out = vec![m.clone()];
    let mut seen = BTreeSet::from([m.id.clone()]);
    while let Some(parent) = out.last().and_then(|m| m.parent.clone()) {
        if !seen.insert(parent.clone()) {
            bail!(
                "backup {}'s chain loops: {parent} is its own ancestor (the manifests were changed by hand or tampered with)",
                m.id
            );
        }
        let parent = repo
            .manifest(&m.vm, &parent)
            .with_context(|| format!("backup {} needs its parent {parent}", m.id))?;
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

/// The structural rules, without reading data: each file a plain qcow2
/// image (no symlink) with the size, backing name and format the manifest
/// gives, its backing file present, encrypted exactly when the manifest
/// says so, and naming no external data file. [`super::verify`] adds the
/// cluster tables and digests on top.
pub(super) fn verify_structure(repo: &Repo, m: &Manifest, report: &mut Report) {
    for v in &m.volumes {
        if let Some(problem) = record_problem(repo, m, v) {
            report.problems.push(Problem {
                vm: m.vm.clone(),
                backup: m.id.clone(),
                file: Some(v.file.clone()),
                problem,
            });
        }
    }
}

/// The structural rules for one file of `m`: what is wrong with it, if
/// anything.
fn record_problem(repo: &Repo, m: &Manifest, v: &VolumeRecord) -> Option<String> {
    let path = repo.root().join(&v.file);
    let link = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
    match Image::open(&path) {
        _ if link => Some("is a symlink; backup files must be plain files".into()),
        Err(e) => Some(e.to_string()),
        Ok(image) if image.hc.backing_file != v.backing => Some(format!(
            "backing file is {:?}, the manifest says {:?}",
            image.hc.backing_file, v.backing
        )),
        Ok(image) if image.header().size != v.virtual_size => {
            Some("virtual size differs from the manifest".into())
        }
        Ok(image) if image.hc.backing_format.as_deref() != v.backing.as_ref().map(|_| "qcow2") => {
            Some(format!("backing format is {:?}", image.hc.backing_format))
        }
        Ok(image)
            if image
                .full_backing_path()
                .is_some_and(|backing| !backing.exists()) =>
        {
            Some(format!(
                "backing file {} is missing",
                image.full_backing_path().unwrap_or_default().display()
            ))
        }
        Ok(image) if image.encrypted() != m.encryption.is_some() => Some(format!(
            "the file is {}encrypted, the manifest says it is {}",
            if image.encrypted() { "" } else { "not " },
            if m.encryption.is_some() { "" } else { "not" }
        )),
        Ok(image) => data_file_problem(&image),
    }
}

/// Checks the files that `volumes` of `m` need along `chain` (every volume
/// of `m` when empty): the structural rules, and the digests too with
/// `digests`. Another volume's files are not read; a problem of no file (a
/// parent manifest missing) counts.
pub(super) fn check_needed(
    repo: &Repo,
    m: &Manifest,
    chain: &[Manifest],
    volumes: &[String],
    digests: bool,
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
        if digests {
            super::verify::verify_backup(repo, &link, &mut report);
        } else {
            verify_structure(repo, &link, &mut report);
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
                record_problem(repo, link, r)
                    .or_else(|| size_problem(repo, r))
                    .or_else(|| {
                        // What verify found (a flipped bit in data that
                        // no structural check sees) counts too.
                        repo.damage(&link.vm, &link.id, &r.name, &r.digest)
                            .map(|p| format!("verify found it damaged: {p}"))
                    })
                    .map(|p| format!("{}: {p}", r.file))
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

/// Whether the file of `r` still has the length its manifest recorded at
/// the commit (a truncated or appended file), where one was recorded.
/// Checked by backups before they build on a file; a restore leaves it to
/// the digests (`--no-verify` reads a file that was replaced on purpose).
fn size_problem(repo: &Repo, r: &VolumeRecord) -> Option<String> {
    let recorded = r.file_size?;
    let len = std::fs::metadata(repo.root().join(&r.file)).ok()?.len();
    (len != recorded).then(|| {
        format!("is {len} bytes, the manifest says {recorded}: truncated or written to since")
    })
}

/// The image of an encrypted volume's files (full first) as one QEMU
/// image spec: each file opened with the secret `secret`, the backing of
/// each the explicit file before it (never a name found in a file).
pub(super) fn encrypted_image(files: &[PathBuf], secret: &str) -> Value {
    let mut image = Value::Null;
    for file in files {
        image = json!({
            "driver": "qcow2",
            "encrypt": { "format": "luks", "key-secret": secret },
            "file": { "driver": "file", "filename": file },
            "backing": image,
        });
    }
    image
}
