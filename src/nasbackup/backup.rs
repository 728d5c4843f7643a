//! A backup, running or stopped, in the script's layout.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use super::layout::{
    Dest, backup_parts, file_name, open_file_beneath, parent_parts, relative, vol_uuid,
};
use super::mount::{Mount, lock_domain};
use super::{EXIT_CLEANUP_FAILED, Options, fail};
use crate::engine::key::Key;
use crate::engine::thaw_guard::{GuardCommand, Thawer};
use crate::engine::{self, CopyOptions, Target};
use crate::libvirt::{Domain, DomainDisk, DomainInfo};
use crate::qcow2::{self, Image};
use crate::qemu;

/// What the script's newer options ask of a backup, checked before
/// anything is mounted or started.
pub(super) struct Extras {
    /// Bytes per second per disk (`-b`, MiB/s).
    rate: Option<u64>,
    key: Option<Key>,
    /// `--fleecing DIR`.
    fleecing: Option<std::path::PathBuf>,
    /// The thaw guard to start when quiescing (the caller's command).
    guard: GuardCommand,
}

impl Extras {
    fn check(o: &Options, guard: &GuardCommand) -> Result<Extras, String> {
        if o.compress && !o.encrypt.is_empty() {
            return Err(
                "Compression and encryption cannot be combined: qcow2 does not support both on one image"
                    .into(),
            );
        }
        if o.mode == "incremental" && !o.encrypt.is_empty() {
            // CloudStack's restore opens one file with the key, not a chain
            // of encrypted files; the script refuses this too.
            return Err("Incremental mode cannot be combined with encryption".into());
        }
        let rate = match o.bandwidth.as_str() {
            "" => None,
            text => match text.parse::<u64>() {
                Ok(mib) if mib > 0 && mib <= u64::MAX >> 20 => Some(mib << 20),
                _ => {
                    return Err(format!(
                        "Invalid bandwidth {text:?}: give MiB/s per disk as a whole number above 0"
                    ));
                }
            },
        };
        let fleecing = match o.fleecing.as_str() {
            "" => None,
            dir if Path::new(dir).is_dir() => Some(Path::new(dir).to_path_buf()),
            dir => {
                return Err(format!(
                    "Invalid fleecing directory {dir:?}: give a directory on local, fast storage"
                ));
            }
        };
        let key = match o.encrypt.as_str() {
            "" => None,
            path => Some(
                Key::from_file(Path::new(path))
                    .map_err(|e| format!("Encryption passphrase file: {e:#}"))?,
            ),
        };
        Ok(Extras {
            rate,
            key,
            fleecing,
            guard: guard.clone(),
        })
    }
}

pub(super) async fn backup(
    o: &Options,
    guard: &GuardCommand,
    out: &mut Vec<String>,
) -> anyhow::Result<u8> {
    let extras = match Extras::check(o, guard) {
        Ok(extras) => extras,
        Err(message) => {
            say!(out, "{message}");
            return Ok(1);
        }
    };
    let Some(parts) = backup_parts(&o.path) else {
        say!(
            out,
            "Bad backup path {:?}: give <instance>/<timestamp> under the NAS",
            o.path
        );
        return Ok(1);
    };
    let domain = Domain {
        name: o.vm.clone(),
        connect: "qemu:///system".into(),
    };
    let _lock = match lock_domain(&o.vm) {
        Ok(lock) => lock,
        Err(e) => {
            say!(out, "{e:#}");
            return Ok(1);
        }
    };
    crate::qemu::daemon::clean_dead_runs();
    // Not found (a stopped transient domain, an empty -v) means stopped; a
    // paused domain is backed up like a running one (QMP answers while it
    // is paused) and stays paused.
    let info = if o.vm.is_empty() {
        None
    } else {
        domain.info().ok().filter(|info| info.running)
    };
    let mut mount = match Mount::new(o, out) {
        Ok(mount) => mount,
        Err(code) => return Ok(code),
    };
    let dest = match Dest::create(&mount.point, &parts) {
        Ok(dest) => dest,
        Err(message) => return Ok(fail(&mut mount, None, &message, out)),
    };
    let result = match &info {
        Some(info) => backup_running(o, &extras, &domain, info, &mount.point, &dest.path).await,
        None => backup_stopped(o, &extras, &dest.path),
    };
    match result {
        Ok(lines) => {
            for line in lines {
                say!(out, "{line}");
            }
            Ok(mount.finish(EXIT_CLEANUP_FAILED, out))
        }
        Err(e) => Ok(fail(&mut mount, Some(&dest), &format!("{e:#}"), out)),
    }
}

/// The domain's disks in `domblklist` order (device `disk`), with the
/// name each backup file takes.
pub(super) fn domain_disks(info: &DomainInfo) -> anyhow::Result<Vec<(&DomainDisk, String)>> {
    info.disks
        .iter()
        .filter(|d| d.device == "disk")
        .map(|d| {
            let source = d
                .source
                .as_ref()
                .map(|p| p.display().to_string())
                .or_else(|| d.source_name.clone())
                .unwrap_or_default();
            Ok((d, vol_uuid(&source)?))
        })
        .collect()
}

/// Why an incremental cannot be built on `bitmap` of `v`, if it cannot.
pub(super) fn bitmap_problem(v: &qemu::Volume, bitmap: &str) -> Option<String> {
    let Some(b) = v.bitmaps.iter().find(|b| b.name == bitmap) else {
        return Some(format!(
            "parent bitmap {bitmap} is missing on disk {}",
            v.name
        ));
    };
    let state = if b.inconsistent {
        "inconsistent (QEMU stopped without saving it)"
    } else if b.busy {
        "busy (another job uses it)"
    } else if !b.recording {
        "not recording"
    } else {
        return None;
    };
    Some(format!(
        "parent bitmap {bitmap} on disk {} is {state}",
        v.name
    ))
}

/// Why `name` (relative to the NAS root `mount`) cannot be an
/// incremental's parent for a disk of `virtual_size` bytes of `instance`,
/// if it cannot; else its parts. It and every file of its backing chain
/// must be a backup file of the instance, reached with no symlink on the
/// way (a planted link could lead to another VM's data), a plain qcow2
/// image whose cluster tables stay within the file (a truncated file fails
/// here), of the disk's size. Data is not read: a flipped bit inside a
/// cluster is not seen.
pub(super) fn parent_problem(
    mount: &Path,
    instance: &str,
    name: &str,
    virtual_size: u64,
) -> Result<Vec<String>, String> {
    let first = parent_parts(instance, None, name).map_err(|e| format!("parent path {e}"))?;
    let mut next = Some(first.clone());
    let mut seen = Vec::new();
    while let Some(parts) = next.take() {
        let file = mount.join(parts.join("/"));
        if seen.contains(&parts) || seen.len() > 1000 {
            return Err(format!("the backing chain of {name} loops"));
        }
        let problem = |text: String| format!("parent file {}: {text}", file.display());
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        let opened = open_file_beneath(mount, &refs).map_err(|e| format!("parent file {e}"))?;
        let image = Image::from_file(&opened, &file).map_err(|e| problem(e.to_string()))?;
        if image.header().size != virtual_size {
            return Err(problem(format!(
                "its virtual size is {}, the disk's {virtual_size}",
                image.header().size
            )));
        }
        if let Some(p) = engine::data_file_problem(&image) {
            return Err(problem(p));
        }
        qcow2::walk(&opened, &image, |_| Ok(()))
            .map_err(|e| problem(format!("cluster map: {e}")))?;
        if let Some(backing) = image.hc.backing_file.as_deref() {
            next = Some(
                parent_parts(instance, Some(&parts), backing)
                    .map_err(|e| problem(format!("backing file {e}")))?,
            );
        }
        seen.push(parts);
    }
    Ok(first)
}

/// Removes `bitmap` from every volume that has it; whether it went from
/// all of them. A failure is logged, not fatal: the backup is written.
pub(super) async fn remove_bitmap(
    qmp: &crate::qmp::Qmp,
    volumes: &[qemu::Volume],
    bitmap: &str,
) -> bool {
    let mut all = true;
    for v in volumes
        .iter()
        .filter(|v| v.bitmaps.iter().any(|b| b.name == bitmap))
    {
        if let Err(e) = qemu::remove_bitmap(qmp, &v.node_name, bitmap).await {
            tracing::warn!(disk = %v.name, bitmap, error = %e, "removing the parent bitmap failed; a later run may remove it");
            all = false;
        }
    }
    all
}

/// `qemu-img check` of every qcow2 file in `dest` (what the script's
/// `--verify` runs): clean (0) or leaked clusters only (3) pass.
pub(super) fn verify_files(dest: &Path, key: Option<&Key>) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dest)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .collect();
    files.sort();
    for file in files {
        let mut cmd = Command::new("qemu-img");
        cmd.arg("check");
        match key {
            Some(key) => {
                cmd.arg("--object")
                    .arg(format!("secret,id=sec0,file={}", key.path().display()))
                    .arg("--image-opts")
                    .arg(format!(
                        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
                        file.display()
                    ));
            }
            None => {
                cmd.arg(&file);
            }
        }
        let out = cmd
            .output()
            .context("running qemu-img (install qemu-utils)")?;
        match out.status.code() {
            Some(0) | Some(3) => {}
            code => failed.push(format!(
                "Backup verification failed for {} (qemu-img check exit code {}): {}",
                file.display(),
                code.map_or("none".to_string(), |c| c.to_string()),
                String::from_utf8_lossy(&out.stdout).trim()
            )),
        }
    }
    if !failed.is_empty() {
        bail!(
            "{}\nOne or more backup files failed verification",
            failed.join("\n")
        );
    }
    Ok(())
}

pub(super) async fn backup_running(
    o: &Options,
    extras: &Extras,
    domain: &Domain,
    info: &DomainInfo,
    mount: &Path,
    dest: &Path,
) -> anyhow::Result<Vec<String>> {
    let (mode, checkpoint, mut parent) = mode(o)?;
    let disks = domain_disks(info)?;
    let target = crate::monitor::Target {
        qmp: None,
        domain: Some(domain.clone()),
    };
    let mut monitor = target.connect(Some(info), Duration::from_secs(30)).await?;
    let all = monitor.volumes().await?;
    let mut volumes = Vec::new();
    for (disk, _) in &disks {
        let v = all
            .iter()
            .find(|v| v.name == disk.target)
            .with_context(|| format!("QEMU has no volume for disk {}", disk.target))?;
        volumes.push(v.clone());
    }
    let mut lines = Vec::new();
    // An incremental that cannot be built safely is a full, said with the
    // script's marker: failing instead would leave the orchestrator asking
    // for the same incremental at every later backup.
    let mut parent_files = Vec::new();
    if let Some(bitmap) = parent {
        match parents_to_build_on(o, mount, &volumes, bitmap) {
            Ok(files) => parent_files = files,
            Err(problems) => {
                for p in &problems {
                    tracing::warn!("incremental: {p}; falling back to full");
                }
                lines.push("INCREMENTAL_FALLBACK=true".to_string());
                parent = None;
            }
        }
    }
    let targets = disks
        .iter()
        .zip(&volumes)
        .enumerate()
        .map(|(i, ((_, vol), _))| Target {
            path: dest.join(file_name(i, vol)),
            backing: parent.map(|_| relative(dest, &parent_files[i]).display().to_string()),
            since: parent.map(str::to_string),
            // Never by content: CloudStack takes a fallback for a full
            // that stands alone.
            baseline: None,
            key: None,
        })
        .collect();
    let opts = nas_options(o, extras, domain);
    let repo_id = blake3::hash(o.storage.as_bytes()).to_hex()[..8].to_string();
    let scope = engine::scope::Scope::new(&repo_id, &format!("nas-{}", domain.name));
    let (_tx, cancel) = tokio::sync::watch::channel(false);
    let plan = engine::CopyPlan {
        qmp: &monitor.qmp,
        opts: &opts,
        scope: &scope,
        volumes: &volumes,
        targets,
        checkpoint,
    };
    let thaw = engine::copy_to_files(&plan, cancel).await?;
    if let Some(e) = thaw {
        bail!("Failed to thaw the filesystem for vm {}: {e}", domain.name);
    }
    if o.verify
        && let Err(e) = verify_files(dest, extras.key.as_ref())
    {
        // The files are removed: so is the bitmap made with them, which
        // nothing would ever build on.
        if let Some(new) = checkpoint {
            let now = qemu::list_volumes(&monitor.qmp).await.unwrap_or_default();
            remove_bitmap(&monitor.qmp, &now, new).await;
        }
        return Err(e);
    }
    // The orchestrator names the parent bitmap; once the new one tracks
    // the changes (after an incremental, or a full that replaced one) it
    // only costs every guest write.
    if let Some(old) = (mode == Mode::Incremental).then_some(o.bitmap_parent.as_str())
        && remove_bitmap(&monitor.qmp, &volumes, old).await
        && volumes
            .iter()
            .any(|v| v.bitmaps.iter().any(|b| b.name == old))
    {
        lines.push("PARENT_BITMAP_DELETED=true".into());
    }
    drop(monitor);
    lines.extend(finish_dest(domain, dest, parent.is_some())?);
    Ok(lines)
}

/// The copy's options for the script's: quiescing through libvirt, the
/// domain resumed by libvirt should bitback die with it paused, no
/// cluster maps.
fn nas_options(o: &Options, extras: &Extras, domain: &Domain) -> CopyOptions {
    CopyOptions {
        vm: domain.name.clone(),
        quiesce: (o.quiesce == "true").then(|| Thawer::Libvirt(domain.clone())),
        thaw_guard: Some(extras.guard.clone()),
        resume: Some(Thawer::ResumeLibvirt(domain.clone())),
        rate: extras
            .rate
            .map_or(engine::Rate::Unlimited, engine::Rate::PerJob),
        compress: o.compress,
        encrypt: extras.key.clone(),
        fleecing: extras.fleecing.clone(),
        // CloudStack's layout has no place for them.
        cluster_maps: false,
        ..CopyOptions::default()
    }
}

/// What the orchestrator asked for (`-M`): CloudStack's modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No mode given: a full without bitmaps (the script's first
    /// version).
    LegacyFull,
    /// A full that starts bitmap `--bitmap-new`.
    Full,
    /// The changes since `--bitmap-parent`, starting `--bitmap-new`.
    Incremental,
}

/// The mode, the bitmap the backup starts, and the one it builds on.
fn mode(o: &Options) -> anyhow::Result<(Mode, Option<&str>, Option<&str>)> {
    let new = (!o.bitmap_new.is_empty()).then_some(o.bitmap_new.as_str());
    let parent = (!o.bitmap_parent.is_empty()).then_some(o.bitmap_parent.as_str());
    match o.mode.as_str() {
        "" | "legacy-full" => Ok((Mode::LegacyFull, None, None)),
        "full" if new.is_some() => Ok((Mode::Full, new, None)),
        "incremental" if new.is_some() && parent.is_some() => Ok((Mode::Incremental, new, parent)),
        "full" => bail!("full mode requires --bitmap-new"),
        "incremental" => bail!("incremental mode requires --bitmap-new and --bitmap-parent"),
        other => bail!("Unknown mode: {other}"),
    }
}

/// The parents' files, one per volume in order, when an incremental can
/// build on them: every volume still has `bitmap`, and `--parent-paths`
/// names a usable file of each volume's size. Otherwise every problem.
fn parents_to_build_on(
    o: &Options,
    mount: &Path,
    volumes: &[crate::qemu::Volume],
    bitmap: &str,
) -> Result<Vec<PathBuf>, Vec<String>> {
    // `-p` was checked to be `<instance>/<timestamp>`.
    let instance = o.path.split('/').next().unwrap_or_default();
    let parents: Vec<&str> = match o.parent_paths.is_empty() {
        true => Vec::new(),
        false => o.parent_paths.split(',').collect(),
    };
    let mut problems: Vec<String> = volumes
        .iter()
        .filter_map(|v| bitmap_problem(v, bitmap))
        .collect();
    let mut files = Vec::new();
    if parents.len() != volumes.len() {
        problems.push(format!(
            "--parent-paths lists {} files for {} disks: the disk list no longer matches",
            parents.len(),
            volumes.len()
        ));
    } else {
        for (v, parent) in volumes.iter().zip(&parents) {
            match parent_problem(mount, instance, parent, v.virtual_size) {
                Err(p) => problems.push(p),
                Ok(parts) => files.push(mount.join(parts.join("/"))),
            }
        }
    }
    match problems.is_empty() {
        true => Ok(files),
        false => Err(problems),
    }
}

/// The domain's records beside the disks, as the script keeps them, the
/// directory synced, and the script's closing lines with its size.
fn finish_dest(domain: &Domain, dest: &Path, incremental: bool) -> anyhow::Result<Vec<String>> {
    for (file, command) in [
        ("domain-config.xml", "dumpxml"),
        ("dominfo.xml", "dominfo"),
        ("domiflist.xml", "domiflist"),
        ("domblklist.xml", "domblklist"),
    ] {
        let text = domain.virsh_text(command).unwrap_or_default();
        std::fs::write(dest.join(file), text)
            .with_context(|| format!("writing {}", dest.join(file).display()))?;
    }
    sync_dir_files(dest)?;
    let size = du_sb(dest)?;
    Ok(vec![
        "Job type:         Completed".into(),
        "Operation:        Backup".into(),
        format!(
            "Mode:             {}",
            if incremental { "incremental" } else { "full" }
        ),
        // The open PR's agent reads this line; the merged one reads the
        // last line, the size alone.
        format!("BACKUP_SIZE_TOTAL={size}"),
        size.to_string(),
    ])
}

/// Full copies of a stopped VM's disks with `qemu-img convert` (files,
/// block devices, `rbd:` where qemu-img has the driver), then the new
/// bitmap added to file-based qcow2 v3 sources. The output is one size
/// per file, every line a number: the merged agent sums the first word of
/// every line, so `BACKUP_SIZE_TOTAL=` (the open PR's line) is printed
/// only with `--size-marker`.
pub(super) fn backup_stopped(
    o: &Options,
    extras: &Extras,
    dest: &Path,
) -> anyhow::Result<Vec<String>> {
    if o.disk_paths.is_empty() {
        bail!(
            "domain {} is not running and no disk paths were given (-d)",
            o.vm
        );
    }
    let mut lines = Vec::new();
    if o.mode == "incremental" {
        // The copies are full: said so, as for a running VM.
        tracing::warn!("incremental: domain {} is not running; taking a full", o.vm);
        lines.push("INCREMENTAL_FALLBACK=true".to_string());
    }
    let mut files = Vec::new();
    for (i, disk) in o.disk_paths.split(',').enumerate() {
        let output = dest.join(file_name(i, &vol_uuid(disk)?));
        let mut cmd = Command::new("qemu-img");
        cmd.arg("convert");
        if o.compress {
            cmd.arg("-c");
        }
        if let Some(rate) = extras.rate {
            cmd.args(["-r", &rate.to_string()]);
        }
        if let Some(key) = &extras.key {
            cmd.arg("--object")
                .arg(format!("secret,id=sec0,file={}", key.path().display()))
                .args(["-o", "encrypt.format=luks,encrypt.key-secret=sec0"]);
        }
        let out = cmd
            .args(["-O", "qcow2", disk])
            .arg(&output)
            .output()
            .context("running qemu-img (install qemu-utils)")?;
        files.push(output.clone());
        crate::child::succeeded("qemu-img convert", out)
            .with_context(|| format!("copying {disk} to {}", output.display()))?;
    }
    sync_dir_files(dest)?;
    if o.verify {
        verify_files(dest, extras.key.as_ref())?;
    }
    // The new bitmap only once every copy is written and checked: a run
    // that fails leaves none on the sources.
    for disk in o.disk_paths.split(',').filter(|_| !o.bitmap_new.is_empty()) {
        if is_qcow2_v3_file(disk) {
            let out = Command::new("qemu-img")
                .args(["bitmap", "--add", disk, &o.bitmap_new])
                .output()
                .context("running qemu-img")?;
            crate::child::succeeded("qemu-img bitmap --add", out)
                .with_context(|| format!("Failed to pre-seed bitmap {} on {disk}", o.bitmap_new))?;
        } else {
            // Said on stderr: every stdout line must stay a number.
            tracing::warn!(
                "no bitmap {} was made on {disk}: only a qcow2 v3 file keeps one while the VM is stopped; \
                 the next incremental of this disk falls back to a full",
                o.bitmap_new
            );
        }
    }
    let mut sizes = Vec::new();
    files.sort();
    let mut total = 0;
    for f in files {
        let len = std::fs::metadata(&f)?.len();
        total += len;
        sizes.push(len.to_string());
    }
    if o.size_marker {
        lines.push(format!("BACKUP_SIZE_TOTAL={total}"));
    }
    lines.extend(sizes);
    Ok(lines)
}

pub(super) fn is_qcow2_v3_file(path: &str) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
        && crate::qcow2::Image::open(Path::new(path)).is_ok_and(|i| i.header().version >= 3)
}

pub(super) fn sync_dir_files(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        std::fs::File::open(entry?.path())?.sync_all()?;
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// `du -sb DIR`: apparent bytes of the directory and everything in it.
pub(super) fn du_sb(dir: &Path) -> anyhow::Result<u64> {
    let out = Command::new("du").arg("-sb").arg(dir).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("du -sb {} said {text:?}", dir.display()))
}
