//! `bitback nasbackup`: a drop-in for Apache CloudStack's
//! `scripts/vm/hypervisor/kvm/nasbackup.sh`, carried out over QMP.
//!
//! The contract, from CloudStack's KVM agent (LibvirtTakeBackupCommandWrapper,
//! LibvirtDeleteBackupCommandWrapper, LibvirtGetBackupStatsCommandWrapper)
//! and the script with the incremental options of apache/cloudstack PR 13074:
//! - options come as `-x value` pairs; an unknown option prints
//!   `Invalid option: X` and the usage, exit 1;
//! - `-o backup|delete|stats`; the NAS is mounted (`mount -t TYPE STORAGE
//!   MOUNTPOINT -o OPTS`, cifs with `nobrl` added) on a fresh
//!   `/tmp/csbackup.XXXXX` and unmounted on every path;
//! - a backup writes `<mount>/<-p path>/root.<vol>.qcow2` for the first disk
//!   and `datadisk.<vol>.qcow2` for the others (`<vol>`: the basename of the
//!   disk's source; LINSTOR's `/dev/drbd/by-res/cs-<uuid>/0` gives `<uuid>`,
//!   rbd's `pool/<uuid>` gives `<uuid>`), disks in `domblklist` order;
//!   incrementals are backed by their `--parent-paths` entry made relative;
//! - a running VM's backup prints its job text and, last, the backup
//!   directory's size in bytes (`du -sb`); a stopped VM's prints one byte
//!   count per file; the agent parses nothing else;
//! - exit 0 done; 20 the cleanup after a failure failed; anything else
//!   failed, with the backup directory removed;
//! - stats print the mount point, then total and used 1K blocks.

use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::engine::{self, BackupOptions, Target};
use crate::libvirt::{Domain, DomainDisk, DomainInfo};
use crate::qemu;

/// Act as CloudStack's nasbackup.sh (the KVM agent's NAS backup script).
///
/// Takes exactly the script's options (-o backup|delete|stats, -v DOMAIN,
/// -t TYPE, -s STORAGE, -m MOUNT_OPTIONS, -p PATH, -q true|false, -d
/// PATHS, -M full|incremental|legacy-full, --bitmap-new NAME,
/// --bitmap-parent NAME, --parent-paths P1,P2,..., -w MOUNT_TIMEOUT) and
/// keeps its output and exit codes; see the README's CloudStack section.
#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
pub(crate) struct NasArgs {
    /// The script's arguments, as the agent passes them.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<String>,
}

/// Exit status when cleaning up after a failure failed (the agent then
/// marks the backup for cleanup).
const EXIT_CLEANUP_FAILED: u8 = 20;

#[derive(Debug, Default)]
struct Options {
    op: String,
    vm: String,
    nas_type: String,
    storage: String,
    mount_opts: String,
    path: String,
    quiesce: String,
    disk_paths: String,
    mode: String,
    bitmap_new: String,
    bitmap_parent: String,
    parent_paths: String,
}

const USAGE: &str = "
Usage: bitback nasbackup -o <operation> -v|--vm <domain name> -t <storage type> -s <storage address> -m <mount options> -p <backup path> -d <disks path> -q|--quiesce <true|false>
         [-M|--mode <full|incremental|legacy-full>] [--bitmap-new <name>] [--bitmap-parent <name>] [--parent-paths <p1,p2,...>]
";

fn usage() -> ExitCode {
    println!("{USAGE}");
    ExitCode::from(1)
}

/// Parses the script's options; `Err` carries what to print before the
/// usage (empty for `-h`).
fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut i = 0;
    while i < args.len() {
        let flag = args[i].as_str();
        let slot: &mut String = match flag {
            "-o" | "--operation" => &mut o.op,
            "-v" | "--vm" => &mut o.vm,
            "-t" | "--type" => &mut o.nas_type,
            "-s" | "--storage" => &mut o.storage,
            "-m" | "--mount" => &mut o.mount_opts,
            "-p" | "--path" => &mut o.path,
            "-q" | "--quiesce" => &mut o.quiesce,
            "-d" | "--diskpaths" => &mut o.disk_paths,
            "-M" | "--mode" => &mut o.mode,
            "--bitmap-new" => &mut o.bitmap_new,
            "--bitmap-parent" => &mut o.bitmap_parent,
            "--parent-paths" => &mut o.parent_paths,
            // Newer agents pass the mount timeout; mount(8) has its own.
            "-w" | "--mount-timeout" => {
                i += 2;
                continue;
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("Invalid option: {other}")),
        };
        // The script shifts twice: a missing value is an empty one.
        *slot = args.get(i + 1).cloned().unwrap_or_default();
        i += 2;
    }
    Ok(o)
}

pub(crate) async fn run(args: NasArgs) -> anyhow::Result<ExitCode> {
    let o = match parse(&args.args) {
        Ok(o) => o,
        Err(message) => {
            if !message.is_empty() {
                println!("{message}");
            }
            return Ok(usage());
        }
    };
    match o.op.as_str() {
        "backup" => backup(&o).await,
        "delete" => delete(&o),
        "stats" => stats(&o),
        other => {
            println!("Unknown operation: {other:?}");
            Ok(usage())
        }
    }
}

/// Gives this process a mount namespace of its own, private from the
/// host's, before any thread starts (`unshare` moves only the calling
/// thread). The NAS is then mounted in it alone, and a bitback killed
/// mid-run leaves no mount behind: the namespace dies with its last
/// process. QEMU never needs the mount (backup files reach it as passed
/// descriptors); bitback's children (qemu-img, the libvirt proxy, virsh)
/// share the namespace. Where it cannot be had (no CAP_SYS_ADMIN), the
/// host's is used, as the script does.
pub(crate) fn private_mounts() {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    let made = unshare(CloneFlags::CLONE_NEWNS).and_then(|()| {
        // Mounts made here must not propagate back to the host.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
    });
    if let Err(e) = made {
        tracing::debug!(error = %e, "no private mount namespace; mounting in the host's");
    }
}

/// The NAS, mounted on a fresh `/tmp/csbackup.XXXXX`.
struct Mount {
    point: PathBuf,
    mounted: bool,
}

impl Mount {
    /// Mounts the NAS; on failure prints why and gives the exit code.
    fn new(o: &Options) -> Result<Mount, ExitCode> {
        let failed = |message: String| {
            println!("{message}");
            ExitCode::from(1)
        };
        let point =
            fresh_dir().map_err(|e| failed(format!("Failed to create a mount point: {e}")))?;
        let mut opts = o.mount_opts.clone();
        if o.nas_type == "cifs" {
            opts.push_str(",nobrl");
        }
        let opts = opts.trim_start_matches(',').to_string();
        let mut cmd = Command::new("mount");
        cmd.args(["-t", &o.nas_type, &o.storage]).arg(&point);
        if !opts.is_empty() {
            cmd.args(["-o", &opts]);
        }
        let ok = cmd.output().map(|out| {
            if !out.status.success() {
                eprint!("{}", String::from_utf8_lossy(&out.stderr));
            }
            out.status.success()
        });
        if ok.unwrap_or(false) {
            Ok(Mount {
                point,
                mounted: true,
            })
        } else {
            let _ = std::fs::remove_dir(&point);
            Err(failed(format!("Failed to mount {} store", o.nas_type)))
        }
    }

    /// Unmounts and removes the mount point; what failed, if anything.
    fn release(&mut self) -> Vec<String> {
        let mut failed = Vec::new();
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.point)
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                self.mounted = false;
            } else {
                failed.push(format!("Failed to unmount {}", self.point.display()));
            }
        }
        if !self.mounted && std::fs::remove_dir(&self.point).is_err() {
            failed.push(format!(
                "Failed to remove mount point {}",
                self.point.display()
            ));
        }
        failed
    }
}

impl Mount {
    /// Releases the mount after the operation worked: success, or
    /// `failed_code` (printing what failed) when the release did not.
    fn finish(mut self, failed_code: u8) -> ExitCode {
        let failed = self.release();
        if failed.is_empty() {
            return ExitCode::SUCCESS;
        }
        for line in failed {
            println!("{line}");
        }
        ExitCode::from(failed_code)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// `/tmp/csbackup.XXXXX`, created fresh.
fn fresh_dir() -> std::io::Result<PathBuf> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    for attempt in 0..100u128 {
        let n = blake3::hash(format!("{seed}-{}-{attempt}", std::process::id()).as_bytes());
        let name: String = n.to_hex()[..5].to_string();
        let dir = std::env::temp_dir().join(format!("csbackup.{name}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free /tmp/csbackup.XXXXX name"))
}

/// Removes the backup directory and releases the mount after a failure:
/// exit 1, or 20 when the cleanup itself failed.
fn fail(mount: &mut Mount, dest: Option<&Path>, message: &str) -> ExitCode {
    println!("{message}");
    let mut failed = Vec::new();
    if let Some(dest) = dest
        && dest.exists()
        && let Err(e) = std::fs::remove_dir_all(dest)
    {
        failed.push(format!("Failed to delete {}: {e}", dest.display()));
    }
    failed.extend(mount.release());
    if failed.is_empty() {
        ExitCode::from(1)
    } else {
        for line in failed {
            println!("{line}");
        }
        println!("Backup cleanup failed");
        ExitCode::from(EXIT_CLEANUP_FAILED)
    }
}

/// The volume part of a backup file's name, as the script derives it.
fn vol_uuid(path: &str) -> String {
    if let Some(rest) = path.strip_prefix("/dev/drbd/by-res/") {
        let res = rest.split('/').next().unwrap_or(rest);
        return res.strip_prefix("cs-").unwrap_or(res).to_string();
    }
    if let Some(rest) = path.strip_prefix("rbd:") {
        let after_pool = rest.split_once('/').map(|(_, r)| r).unwrap_or(rest);
        return after_pool
            .split(':')
            .next()
            .unwrap_or(after_pool)
            .to_string();
    }
    path.rsplit('/').next().unwrap_or(path).to_string()
}

/// `root` for the first disk, `datadisk` for the others.
fn file_name(index: usize, vol: &str) -> String {
    let role = if index == 0 { "root" } else { "datadisk" };
    format!("{role}.{vol}.qcow2")
}

/// `target` relative to directory `from` (both absolute, no `..`).
fn relative(from: &Path, target: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = target.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c.as_os_str());
    }
    out
}

/// A lexically cleaned path (no `.`, `..` resolved): parent paths come
/// from CloudStack, relative to the mount root, and must stay under it.
fn under(root: &Path, relative: &str) -> Option<PathBuf> {
    let mut out = root.to_path_buf();
    for c in Path::new(relative).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// Holds the per-domain lock for the run: the agent does not kill a run
/// that timed out, and may start another.
fn lock_domain(vm: &str) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let dir = Path::new("/run/lock");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let name: String = vm
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path = dir.join(format!("bitback-nasbackup-{name}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        anyhow::anyhow!(
            "another backup of domain {vm} is running (lock {})",
            path.display()
        )
    })
}

async fn backup(o: &Options) -> anyhow::Result<ExitCode> {
    let domain = Domain {
        name: o.vm.clone(),
        connect: "qemu:///system".into(),
    };
    let _lock = match lock_domain(&o.vm) {
        Ok(lock) => lock,
        Err(e) => {
            println!("{e:#}");
            return Ok(ExitCode::from(1));
        }
    };
    // Not found (a stopped transient domain, an empty -v) means stopped.
    let info = if o.vm.is_empty() {
        None
    } else {
        domain.info().ok().filter(|info| info.running)
    };
    let mut mount = match Mount::new(o) {
        Ok(mount) => mount,
        Err(code) => return Ok(code),
    };
    let dest = match under(&mount.point, &o.path) {
        Some(dest) if !o.path.is_empty() => dest,
        _ => {
            return Ok(fail(
                &mut mount,
                None,
                &format!("Bad backup path {:?}", o.path),
            ));
        }
    };
    if std::fs::create_dir_all(&dest).is_err() {
        return Ok(fail(
            &mut mount,
            None,
            &format!("Failed to create backup directory {}", dest.display()),
        ));
    }
    let result = match &info {
        Some(info) => backup_running(o, &domain, info, &mount.point, &dest).await,
        None => backup_stopped(o, &dest),
    };
    match result {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            Ok(mount.finish(EXIT_CLEANUP_FAILED))
        }
        Err(e) => Ok(fail(&mut mount, Some(&dest), &format!("{e:#}"))),
    }
}

/// The domain's disks in `domblklist` order (device `disk`), with the
/// name each backup file takes.
fn domain_disks(info: &DomainInfo) -> Vec<(&DomainDisk, String)> {
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
            let vol = vol_uuid(&source);
            (d, vol)
        })
        .collect()
}

async fn backup_running(
    o: &Options,
    domain: &Domain,
    info: &DomainInfo,
    mount: &Path,
    dest: &Path,
) -> anyhow::Result<Vec<String>> {
    let mode = if o.mode.is_empty() {
        "legacy-full"
    } else {
        o.mode.as_str()
    };
    let (checkpoint, parent) = match mode {
        "legacy-full" => (None, None),
        "full" if !o.bitmap_new.is_empty() => (Some(o.bitmap_new.as_str()), None),
        "incremental" if !o.bitmap_new.is_empty() && !o.bitmap_parent.is_empty() => {
            (Some(o.bitmap_new.as_str()), Some(o.bitmap_parent.as_str()))
        }
        "full" => bail!("full mode requires --bitmap-new"),
        "incremental" => bail!("incremental mode requires --bitmap-new and --bitmap-parent"),
        other => bail!("Unknown mode: {other}"),
    };
    let disks = domain_disks(info);
    let target = super::monitor::Target {
        qmp: None,
        libvirt: Some(domain.name.clone()),
        connect: domain.connect.clone(),
    };
    let monitor = target.connect(Some(info), Duration::from_secs(30)).await?;
    let mut all = qemu::list_volumes(&monitor.qmp).await?;
    for v in &mut all {
        if let Some((_, name)) = monitor
            .renames
            .iter()
            .find(|(node, _)| node == &v.node_name)
        {
            v.name = name.clone();
        }
    }
    let mut volumes = Vec::new();
    for (disk, _) in &disks {
        let v = all
            .iter()
            .find(|v| v.name == disk.target)
            .with_context(|| format!("QEMU has no volume for disk {}", disk.target))?;
        volumes.push(v.clone());
    }
    let parents: Vec<&str> = if o.parent_paths.is_empty() {
        Vec::new()
    } else {
        o.parent_paths.split(',').collect()
    };
    let mut targets = Vec::new();
    for (i, ((_, vol), v)) in disks.iter().zip(&volumes).enumerate() {
        let path = dest.join(file_name(i, vol));
        let (backing, since) = match parent {
            None => (None, None),
            Some(bitmap) => {
                if !v.bitmaps.iter().any(|b| b.name == bitmap) {
                    bail!("Parent bitmap {bitmap} is missing on disk {}", v.name);
                }
                if parents.len() != disks.len() {
                    bail!(
                        "--parent-paths lists {} files for {} disks: the disk list no longer matches",
                        parents.len(),
                        disks.len()
                    );
                }
                let parent_abs = under(mount, parents[i])
                    .with_context(|| format!("parent path {:?} leaves the mount", parents[i]))?;
                if !parent_abs.is_file() {
                    bail!(
                        "Parent backup file does not exist on NAS: {}",
                        parent_abs.display()
                    );
                }
                (
                    Some(relative(dest, &parent_abs).display().to_string()),
                    Some(bitmap.to_string()),
                )
            }
        };
        targets.push(Target {
            path,
            backing,
            since,
        });
    }
    let opts = BackupOptions {
        vm: domain.name.clone(),
        quiesce_libvirt: (o.quiesce == "true").then(|| domain.clone()),
        ..BackupOptions::default()
    };
    let repo_id = blake3::hash(o.storage.as_bytes()).to_hex()[..8].to_string();
    let scope = engine::scope::Scope::new(&repo_id, &format!("nas-{}", domain.name));
    let (_tx, cancel) = tokio::sync::watch::channel(false);
    let thaw = engine::copy_to_files(
        &monitor.qmp,
        &opts,
        &scope,
        &volumes,
        targets,
        checkpoint,
        cancel,
    )
    .await?;
    if let Some(e) = thaw {
        bail!("Failed to thaw the filesystem for vm {}: {e}", domain.name);
    }
    drop(monitor);
    // The domain's records beside the disks, as the script keeps them.
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
            if parent.is_some() {
                "incremental"
            } else {
                "full"
            }
        ),
        size.to_string(),
    ])
}

/// Full copies of a stopped VM's disks with `qemu-img convert` (files,
/// block devices, `rbd:` where qemu-img has the driver), then the new
/// bitmap added to file-based qcow2 v3 sources.
fn backup_stopped(o: &Options, dest: &Path) -> anyhow::Result<Vec<String>> {
    if o.disk_paths.is_empty() {
        bail!(
            "domain {} is not running and no disk paths were given (-d)",
            o.vm
        );
    }
    let mut files = Vec::new();
    for (i, disk) in o.disk_paths.split(',').enumerate() {
        let output = dest.join(file_name(i, &vol_uuid(disk)));
        let out = Command::new("qemu-img")
            .args(["convert", "-O", "qcow2", disk])
            .arg(&output)
            .output()
            .context("running qemu-img (install qemu-utils)")?;
        if !out.status.success() {
            bail!(
                "qemu-img convert failed for {disk} {}: {}",
                output.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if !o.bitmap_new.is_empty() && is_qcow2_v3_file(disk) {
            let out = Command::new("qemu-img")
                .args(["bitmap", "--add", disk, &o.bitmap_new])
                .output()
                .context("running qemu-img")?;
            if !out.status.success() {
                bail!(
                    "Failed to pre-seed bitmap {} on {disk}: {}",
                    o.bitmap_new,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        files.push(output);
    }
    sync_dir_files(dest)?;
    let mut sizes = Vec::new();
    let mut names: Vec<PathBuf> = files;
    names.sort();
    for f in names {
        sizes.push(std::fs::metadata(&f)?.len().to_string());
    }
    Ok(sizes)
}

fn is_qcow2_v3_file(path: &str) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
        && crate::qcow2::Image::open(Path::new(path)).is_ok_and(|i| i.header().version >= 3)
}

fn sync_dir_files(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        std::fs::File::open(entry?.path())?.sync_all()?;
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// `du -sb DIR`: apparent bytes of the directory and everything in it.
fn du_sb(dir: &Path) -> anyhow::Result<u64> {
    let out = Command::new("du").arg("-sb").arg(dir).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("du -sb {} said {text:?}", dir.display()))
}

fn delete(o: &Options) -> anyhow::Result<ExitCode> {
    let mut mount = match Mount::new(o) {
        Ok(mount) => mount,
        Err(code) => return Ok(code),
    };
    let Some(dest) = under(&mount.point, &o.path).filter(|_| !o.path.is_empty()) else {
        return Ok(fail(
            &mut mount,
            None,
            &format!("Bad backup path {:?}", o.path),
        ));
    };
    if dest.exists() {
        for entry in walk(&dest) {
            println!("removed '{}'", entry.display());
        }
        if let Err(e) = std::fs::remove_dir_all(&dest) {
            return Ok(fail(
                &mut mount,
                None,
                &format!("rm: {}: {e}", dest.display()),
            ));
        }
    }
    Ok(mount.finish(1))
}

/// Every path under `dir`, children first, `dir` last.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
    }
    out.push(dir.to_path_buf());
    out
}

fn stats(o: &Options) -> anyhow::Result<ExitCode> {
    let mount = match Mount::new(o) {
        Ok(mount) => mount,
        Err(code) => return Ok(code),
    };
    let fs = nix::sys::statvfs::statvfs(&mount.point);
    println!("{}", mount.point.display());
    if let Ok(fs) = fs {
        // df -P: 1024-byte blocks, used = total - free.
        let unit = fs.fragment_size() as u128;
        let total = fs.blocks() as u128 * unit / 1024;
        let used = (fs.blocks() as u128 - fs.blocks_free() as u128) * unit / 1024;
        println!("{total} {used}");
    }
    Ok(mount.finish(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_agents_argument_vectors_parse() {
        let o = parse(&args(&[
            "-o",
            "backup",
            "-v",
            "i-2-3-VM",
            "-t",
            "nfs",
            "-s",
            "10.0.0.1:/export",
            "-m",
            "",
            "-p",
            "i-2-3-VM/2026.11.27.05.00.00",
            "-q",
            "false",
            "-d",
            "",
            "-M",
            "incremental",
            "--bitmap-new",
            "backup-2",
            "--bitmap-parent",
            "backup-1",
            "--parent-paths",
            "i-2-3-VM/a/root.x.qcow2,i-2-3-VM/a/datadisk.y.qcow2",
            "-w",
            "60",
        ]))
        .unwrap();
        assert_eq!(o.op, "backup");
        assert_eq!(o.mount_opts, "");
        assert_eq!(o.mode, "incremental");
        assert_eq!(o.parent_paths.split(',').count(), 2);
        assert_eq!(
            parse(&args(&["-x", "1"])).unwrap_err(),
            "Invalid option: -x"
        );
        assert_eq!(parse(&args(&["-h"])).unwrap_err(), "");
    }

    #[test]
    fn volume_names_as_the_script_derives_them() {
        assert_eq!(vol_uuid("/mnt/pool/0b3f-uuid"), "0b3f-uuid");
        assert_eq!(
            vol_uuid("/dev/drbd/by-res/cs-53d5c355-d726/0"),
            "53d5c355-d726"
        );
        assert_eq!(
            vol_uuid("rbd:cloudstack/53d5c355-d726:mon_host=10.0.1.2"),
            "53d5c355-d726"
        );
        assert_eq!(vol_uuid("cloudstack/53d5c355-d726"), "53d5c355-d726");
        assert_eq!(file_name(0, "a"), "root.a.qcow2");
        assert_eq!(file_name(1, "b"), "datadisk.b.qcow2");
    }

    #[test]
    fn parent_paths_relative_and_confined() {
        let root = Path::new("/tmp/csbackup.abcde");
        let dest = root.join("vm/2026.11.27.05.00.00");
        let parent = under(root, "vm/2026.11.27.04.00.00/root.x.qcow2").unwrap();
        assert_eq!(
            relative(&dest, &parent),
            Path::new("../2026.11.27.04.00.00/root.x.qcow2")
        );
        assert_eq!(under(root, "../etc/passwd"), None);
        assert_eq!(under(root, "/etc/passwd"), None);
    }
}
