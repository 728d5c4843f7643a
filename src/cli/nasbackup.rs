//! `bitback nasbackup`: a drop-in for Apache CloudStack's
//! `scripts/vm/hypervisor/kvm/nasbackup.sh`, carried out over QMP.
//!
//! The contract, from CloudStack's KVM agent (LibvirtTakeBackupCommandWrapper,
//! LibvirtDeleteBackupCommandWrapper, LibvirtGetBackupStatsCommandWrapper)
//! and the script with the incremental options of apache/cloudstack PR 13074:
//! - options come as `-x value` pairs (`-c` and `--verify` alone); an
//!   unknown option prints `Invalid option: X` and the usage, exit 1;
//! - `-o backup|delete|stats`; the NAS is mounted (`mount -t TYPE STORAGE
//!   MOUNTPOINT -o OPTS`, cifs with `nobrl` added) on a fresh
//!   `/tmp/csbackup.XXXXX` and unmounted on every path;
//! - a backup writes `<mount>/<-p path>/root.<vol>.qcow2` for the first disk
//!   and `datadisk.<vol>.qcow2` for the others (`<vol>`: the basename of the
//!   disk's source; LINSTOR's `/dev/drbd/by-res/cs-<uuid>/0` gives `<uuid>`,
//!   rbd's `pool/<uuid>` gives `<uuid>`, a legacy `/dev/drbdNNNN` the
//!   UUID of its `by-res` link), disks in `domblklist` order;
//!   incrementals are backed by their `--parent-paths` entry made
//!   relative; one that cannot be built safely is a full, and stdout says
//!   `INCREMENTAL_FALLBACK=true` (the agent then records a full);
//! - a running VM's backup prints its job text, `BACKUP_SIZE_TOTAL=N`
//!   (the open PR's agent) and, last, the backup directory's size in
//!   bytes (`du -sb`, the merged agent); a stopped VM's prints one byte
//!   count per file (the merged agent sums every line); marker lines are
//!   stripped by the agent before it parses;
//! - exit 0 done; 20 the cleanup after a failure failed; anything else
//!   failed, with what the run made removed (never more);
//! - stats print the mount point, then total and used 1K blocks.

use std::path::{Component, Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, bail};

use bitback::engine::key::Key;
use bitback::engine::thaw_guard::Thawer;
use bitback::engine::{self, BackupOptions, Target};
use bitback::libvirt::{Domain, DomainDisk, DomainInfo};
use bitback::qcow2::{self, Image};
use bitback::qemu;

/// Act as CloudStack's nasbackup.sh (the KVM agent's NAS backup script).
///
/// Takes exactly the script's options (-o backup|delete|stats, -v DOMAIN,
/// -t TYPE, -s STORAGE, -m MOUNT_OPTIONS, -p PATH, -q true|false, -d
/// PATHS, -M full|incremental|legacy-full, --bitmap-new NAME,
/// --bitmap-parent NAME, --parent-paths P1,P2,..., -w MOUNT_TIMEOUT, and
/// the open PR's -c, -b MIB_PER_S, -e PASSFILE, --verify) and keeps its
/// output and exit codes; see docs/cloudstack.md. An
/// incremental that cannot be built safely is a full with
/// INCREMENTAL_FALLBACK=true. bitback's own: --size-marker (a stopped VM's
/// output gets BACKUP_SIZE_TOTAL= too).
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
    /// `-c`: compressed clusters.
    compress: bool,
    /// `-b`: MiB/s per disk.
    bandwidth: String,
    /// `-e`: the LUKS passphrase file.
    encrypt: String,
    /// `--verify`: check the written files before reporting success.
    verify: bool,
    /// `--size-marker` (bitback's own): a stopped VM's output gets the
    /// open PR's `BACKUP_SIZE_TOTAL=` line too.
    size_marker: bool,
}

const USAGE: &str = "
Usage: bitback nasbackup -o <operation> -v|--vm <domain name> -t <storage type> -s <storage address> -m <mount options> -p <backup path> -d <disks path> -q|--quiesce <true|false> [-c] [-b <MiB/s>] [-e <passphrase file>] [--verify]
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
        // Options without a value.
        match flag {
            "-c" | "--compress" => {
                o.compress = true;
                i += 1;
                continue;
            }
            "--verify" => {
                o.verify = true;
                i += 1;
                continue;
            }
            "--size-marker" => {
                o.size_marker = true;
                i += 1;
                continue;
            }
            _ => {}
        }
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
            "-b" | "--bandwidth" => &mut o.bandwidth,
            "-e" | "--encrypt" => &mut o.encrypt,
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

/// Removes what this run made of the backup directory and releases the
/// mount after a failure: exit 1, or 20 when the cleanup itself failed.
fn fail(mount: &mut Mount, dest: Option<&Dest>, message: &str) -> ExitCode {
    println!("{message}");
    let mut failed = Vec::new();
    if let Some(dest) = dest
        && let Err(e) = dest.remove()
    {
        failed.push(format!("Failed to delete {}: {e}", dest.path.display()));
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

/// The parts of a path the agent gives relative to the NAS root: plain
/// names only. `.`, `..`, empty parts and absolute paths are refused, so
/// `VM/.` cannot stand for `VM`, nor `.` for the whole NAS.
fn plain_parts(path: &str) -> Option<Vec<&str>> {
    let parts: Vec<&str> = path.split('/').collect();
    let plain = !path.is_empty()
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != "..");
    plain.then_some(parts)
}

/// One run's backup directory, and what the run made of it: after a
/// failure only that is removed, never a directory or file that was there
/// before (another backup, the VM's directory).
struct Dest {
    path: PathBuf,
    /// The topmost directory this run created, if it created any.
    made: Option<PathBuf>,
}

impl Dest {
    /// Creates `root/parts...`. A directory that already exists is used
    /// only if it is empty: a path that holds another backup (or the
    /// VM's directory itself) is refused with nothing touched.
    fn create(root: &Path, parts: &[&str]) -> Result<Dest, String> {
        let mut path = root.to_path_buf();
        let mut made = None;
        for part in parts {
            path.push(part);
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    if made.is_none() {
                        made = Some(path.clone());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
                    if !dir {
                        return Err(format!(
                            "Failed to create backup directory {}: {} exists and is not a directory",
                            root.join(parts.join("/")).display(),
                            path.display()
                        ));
                    }
                }
                Err(e) => {
                    let dest = Dest { path, made };
                    let _ = dest.remove();
                    return Err(format!(
                        "Failed to create backup directory {}: {e}",
                        root.join(parts.join("/")).display()
                    ));
                }
            }
        }
        if made.is_none() {
            let empty = std::fs::read_dir(&path)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty {
                return Err(format!(
                    "Backup directory {} already exists and is not empty; nothing was written or removed",
                    path.display()
                ));
            }
        }
        Ok(Dest { path, made })
    }

    /// Removes what this run made: the directories it created with all
    /// in them, or, in a directory that was there (empty, under the
    /// domain's lock) before, the files in it.
    fn remove(&self) -> std::io::Result<()> {
        match &self.made {
            Some(top) => match std::fs::remove_dir_all(top) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
            None => {
                for entry in std::fs::read_dir(&self.path)? {
                    let entry = entry?;
                    if entry.file_type()?.is_file() {
                        std::fs::remove_file(entry.path())?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// The volume part of a backup file's name, as the script derives it.
/// LINSTOR's legacy `/dev/drbdNNNN` paths are mapped to their volume's
/// UUID through udev's `by-res` links; without one the name would be one
/// CloudStack's restore cannot find, so that is an error.
fn vol_uuid(path: &str) -> anyhow::Result<String> {
    if let Some(rest) = path.strip_prefix("/dev/drbd/by-res/") {
        let res = rest.split('/').next().unwrap_or(rest);
        return Ok(res.strip_prefix("cs-").unwrap_or(res).to_string());
    }
    if let Some(minor) = path.strip_prefix("/dev/drbd")
        && !minor.is_empty()
        && minor.bytes().all(|b| b.is_ascii_digit())
    {
        return linstor_uuid_of_device(Path::new(path), Path::new(DRBD_BY_RES))
            .with_context(|| format!("Failed to resolve LINSTOR volume UUID for {path}"));
    }
    if let Some(rest) = path.strip_prefix("rbd:") {
        let after_pool = rest.split_once('/').map(|(_, r)| r).unwrap_or(rest);
        return Ok(after_pool
            .split(':')
            .next()
            .unwrap_or(after_pool)
            .to_string());
    }
    Ok(path.rsplit('/').next().unwrap_or(path).to_string())
}

/// Where udev puts DRBD's per-resource links (`cs-<uuid>/0`).
const DRBD_BY_RES: &str = "/dev/drbd/by-res";

/// The volume UUID of a DRBD device node: the `cs-<uuid>/<volume>` link
/// under `by_res` that leads to the same device (udev's `by-res` links,
/// read from the filesystem: no udevadm needed, and the same answer).
fn linstor_uuid_of_device(device: &Path, by_res: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(device)
        .with_context(|| format!("reading {}", device.display()))?
        .rdev();
    let resources =
        std::fs::read_dir(by_res).with_context(|| format!("reading {}", by_res.display()))?;
    for resource in resources.flatten() {
        let name = resource.file_name().to_string_lossy().into_owned();
        let Some(uuid) = name.strip_prefix("cs-") else {
            continue;
        };
        let Ok(volumes) = std::fs::read_dir(resource.path()) else {
            continue;
        };
        for volume in volumes.flatten() {
            if std::fs::metadata(volume.path()).is_ok_and(|m| m.rdev() == rdev && rdev != 0) {
                return Ok(uuid.to_string());
            }
        }
    }
    bail!(
        "no cs-<uuid> link under {} leads to {}",
        by_res.display(),
        device.display()
    )
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

/// What the script's newer options ask of a backup, checked before
/// anything is mounted or started.
struct Extras {
    /// Bytes per second per disk (`-b`, MiB/s).
    rate: Option<u64>,
    key: Option<Key>,
}

impl Extras {
    fn check(o: &Options) -> Result<Extras, String> {
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
        let key = match o.encrypt.as_str() {
            "" => None,
            path => Some(
                Key::from_file(Path::new(path))
                    .map_err(|e| format!("Encryption passphrase file: {e:#}"))?,
            ),
        };
        Ok(Extras { rate, key })
    }
}

async fn backup(o: &Options) -> anyhow::Result<ExitCode> {
    let extras = match Extras::check(o) {
        Ok(extras) => extras,
        Err(message) => {
            println!("{message}");
            return Ok(ExitCode::from(1));
        }
    };
    let Some(parts) = plain_parts(&o.path) else {
        println!(
            "Bad backup path {:?}: give <instance>/<timestamp> under the NAS",
            o.path
        );
        return Ok(ExitCode::from(1));
    };
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
    // Not found (a stopped transient domain, an empty -v) means stopped; a
    // paused domain is backed up like a running one (QMP answers while it
    // is paused) and stays paused.
    let info = if o.vm.is_empty() {
        None
    } else {
        domain.info().ok().filter(|info| info.running)
    };
    let mut mount = match Mount::new(o) {
        Ok(mount) => mount,
        Err(code) => return Ok(code),
    };
    let dest = match Dest::create(&mount.point, &parts) {
        Ok(dest) => dest,
        Err(message) => return Ok(fail(&mut mount, None, &message)),
    };
    let result = match &info {
        Some(info) => backup_running(o, &extras, &domain, info, &mount.point, &dest.path).await,
        None => backup_stopped(o, &extras, &dest.path),
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
fn domain_disks(info: &DomainInfo) -> anyhow::Result<Vec<(&DomainDisk, String)>> {
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
fn bitmap_problem(v: &qemu::Volume, bitmap: &str) -> Option<String> {
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

/// Why `path` cannot be an incremental's parent for a disk of
/// `virtual_size` bytes, if it cannot: it and every file of its backing
/// chain must be a plain qcow2 image whose cluster tables stay within the
/// file (a truncated file fails here), of the disk's size. Data is not
/// read: a flipped bit inside a cluster is not seen.
fn parent_problem(path: &Path, virtual_size: u64) -> Option<String> {
    let mut next = Some(path.to_path_buf());
    let mut seen = Vec::new();
    while let Some(file) = next.take() {
        if seen.contains(&file) || seen.len() > 1000 {
            return Some(format!("the backing chain of {} loops", path.display()));
        }
        let problem = |text: String| Some(format!("parent file {}: {text}", file.display()));
        match std::fs::symlink_metadata(&file) {
            Err(e) => return problem(e.to_string()),
            Ok(m) if !m.is_file() => return problem("not a regular file".into()),
            Ok(_) => {}
        }
        let image = match Image::open(&file) {
            Ok(image) => image,
            Err(e) => return problem(e.to_string()),
        };
        if image.header().size != virtual_size {
            return problem(format!(
                "its virtual size is {}, the disk's {virtual_size}",
                image.header().size
            ));
        }
        if let Some(p) = engine::data_file_problem(&image) {
            return problem(p);
        }
        let walked = std::fs::File::open(&file)
            .map_err(|e| e.to_string())
            .and_then(|f| qcow2::walk(&f, &image, |_| Ok(())).map_err(|e| e.to_string()));
        if let Err(e) = walked {
            return problem(format!("cluster map: {e}"));
        }
        next = image.full_backing_path();
        seen.push(file);
    }
    None
}

/// Removes `bitmap` from every volume that has it; whether it went from
/// all of them. A failure is logged, not fatal: the backup is written.
async fn remove_bitmap(qmp: &bitback::qmp::Qmp, volumes: &[qemu::Volume], bitmap: &str) -> bool {
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
fn verify_files(dest: &Path, key: Option<&Key>) -> anyhow::Result<()> {
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

async fn backup_running(
    o: &Options,
    extras: &Extras,
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
    let (checkpoint, mut parent) = match mode {
        "legacy-full" => (None, None),
        "full" if !o.bitmap_new.is_empty() => (Some(o.bitmap_new.as_str()), None),
        "incremental" if !o.bitmap_new.is_empty() && !o.bitmap_parent.is_empty() => {
            (Some(o.bitmap_new.as_str()), Some(o.bitmap_parent.as_str()))
        }
        "full" => bail!("full mode requires --bitmap-new"),
        "incremental" => bail!("incremental mode requires --bitmap-new and --bitmap-parent"),
        other => bail!("Unknown mode: {other}"),
    };
    let disks = domain_disks(info)?;
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
    let mut lines = Vec::new();
    // An incremental that cannot be built safely is a full, said with the
    // script's marker: failing instead would leave the orchestrator asking
    // for the same incremental at every later backup.
    let mut parent_files = Vec::new();
    if let Some(bitmap) = parent {
        let mut problems: Vec<String> = volumes
            .iter()
            .filter_map(|v| bitmap_problem(v, bitmap))
            .collect();
        if parents.len() != disks.len() {
            problems.push(format!(
                "--parent-paths lists {} files for {} disks: the disk list no longer matches",
                parents.len(),
                disks.len()
            ));
        } else {
            for (i, v) in volumes.iter().enumerate() {
                match under(mount, parents[i]) {
                    None => problems.push(format!("parent path {:?} leaves the NAS", parents[i])),
                    Some(abs) => {
                        if let Some(p) = parent_problem(&abs, v.virtual_size) {
                            problems.push(p);
                        }
                        parent_files.push(abs);
                    }
                }
            }
        }
        if !problems.is_empty() {
            for p in &problems {
                eprintln!("incremental: {p}; falling back to full");
            }
            lines.push("INCREMENTAL_FALLBACK=true".to_string());
            parent = None;
        }
    }
    let mut targets = Vec::new();
    for (i, ((_, vol), _)) in disks.iter().zip(&volumes).enumerate() {
        let path = dest.join(file_name(i, vol));
        let (backing, since) = match parent {
            None => (None, None),
            Some(bitmap) => (
                Some(relative(dest, &parent_files[i]).display().to_string()),
                Some(bitmap.to_string()),
            ),
        };
        targets.push(Target {
            path,
            backing,
            since,
        });
    }
    let opts = BackupOptions {
        vm: domain.name.clone(),
        quiesce: (o.quiesce == "true").then(|| Thawer::Libvirt(domain.clone())),
        thaw_guard: Some(super::backup::thaw_guard_command()),
        rate_limit: extras.rate,
        compress: o.compress,
        encrypt: extras.key.clone(),
        ..BackupOptions::default()
    };
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
    if let Some(old) = (mode == "incremental").then_some(o.bitmap_parent.as_str())
        && remove_bitmap(&monitor.qmp, &volumes, old).await
        && volumes
            .iter()
            .any(|v| v.bitmaps.iter().any(|b| b.name == old))
    {
        lines.push("PARENT_BITMAP_DELETED=true".into());
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
    lines.extend([
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
        // The open PR's agent reads this line; the merged one reads the
        // last line, the size alone.
        format!("BACKUP_SIZE_TOTAL={size}"),
        size.to_string(),
    ]);
    Ok(lines)
}

/// Full copies of a stopped VM's disks with `qemu-img convert` (files,
/// block devices, `rbd:` where qemu-img has the driver), then the new
/// bitmap added to file-based qcow2 v3 sources. The output is one size
/// per file, every line a number: the merged agent sums the first word of
/// every line, so `BACKUP_SIZE_TOTAL=` (the open PR's line) is printed
/// only with `--size-marker`.
fn backup_stopped(o: &Options, extras: &Extras, dest: &Path) -> anyhow::Result<Vec<String>> {
    if o.disk_paths.is_empty() {
        bail!(
            "domain {} is not running and no disk paths were given (-d)",
            o.vm
        );
    }
    let mut lines = Vec::new();
    if o.mode == "incremental" {
        // The copies are full: said so, as for a running VM.
        eprintln!("incremental: domain {} is not running; taking a full", o.vm);
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
        if !out.status.success() {
            bail!(
                "qemu-img convert failed for {disk} {}: {}",
                output.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
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
            if !out.status.success() {
                bail!(
                    "Failed to pre-seed bitmap {} on {disk}: {}",
                    o.bitmap_new,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        } else {
            // Said on stderr: every stdout line must stay a number.
            eprintln!(
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

fn is_qcow2_v3_file(path: &str) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
        && bitback::qcow2::Image::open(Path::new(path)).is_ok_and(|i| i.header().version >= 3)
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

/// Deletes one backup: the path must name exactly one backup directory of
/// the layout, `<instance>/<timestamp>`, holding files only. Anything
/// else (`.`, `VM`, `VM/.`, a path with a directory inside) is refused
/// with nothing removed: `rm -rf` of such a path would wipe other backups.
fn delete(o: &Options) -> anyhow::Result<ExitCode> {
    let Some(parts) = plain_parts(&o.path).filter(|p| p.len() == 2) else {
        println!(
            "Bad backup path {:?}: a delete names one backup directory, <instance>/<timestamp>",
            o.path
        );
        return Ok(ExitCode::from(1));
    };
    let mut mount = match Mount::new(o) {
        Ok(mount) => mount,
        Err(code) => return Ok(code),
    };
    let dest = mount.point.join(parts[0]).join(parts[1]);
    if let Err(message) = remove_backup_dir(&dest) {
        return Ok(fail(&mut mount, None, &message));
    }
    Ok(mount.finish(1))
}

/// Removes backup directory `dest` (absent is fine), printing each removal
/// as `rm -v` does. Anything but a directory of plain files is refused
/// before anything is removed.
fn remove_backup_dir(dest: &Path) -> Result<(), String> {
    let rm = |path: &Path, e: std::io::Error| format!("rm: {}: {e}", path.display());
    match std::fs::symlink_metadata(dest) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(rm(dest, e)),
        Ok(m) if !m.is_dir() => {
            return Err(format!(
                "{} is not a backup directory; nothing was removed",
                dest.display()
            ));
        }
        Ok(_) => {}
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dest).map_err(|e| rm(dest, e))? {
        let entry = entry.map_err(|e| rm(dest, e))?;
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            return Err(format!(
                "{} holds {}, which is not a backup file; nothing was removed",
                dest.display(),
                entry.path().display()
            ));
        }
        files.push(entry.path());
    }
    files.sort();
    for file in files {
        std::fs::remove_file(&file).map_err(|e| rm(&file, e))?;
        println!("removed '{}'", file.display());
    }
    std::fs::remove_dir(dest).map_err(|e| rm(dest, e))?;
    println!("removed directory '{}'", dest.display());
    Ok(())
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
        let uuid = |p: &str| vol_uuid(p).unwrap();
        assert_eq!(uuid("/mnt/pool/0b3f-uuid"), "0b3f-uuid");
        assert_eq!(uuid("/dev/drbd/by-res/cs-53d5c355-d726/0"), "53d5c355-d726");
        assert_eq!(
            uuid("rbd:cloudstack/53d5c355-d726:mon_host=10.0.1.2"),
            "53d5c355-d726"
        );
        assert_eq!(uuid("cloudstack/53d5c355-d726"), "53d5c355-d726");
        // A legacy DRBD node with no by-res link: an error, never a name
        // CloudStack's restore cannot find.
        let e = vol_uuid("/dev/drbd65001").unwrap_err();
        assert!(format!("{e:#}").contains("/dev/drbd65001"), "{e:#}");
        assert_eq!(file_name(0, "a"), "root.a.qcow2");
        assert_eq!(file_name(1, "b"), "datadisk.b.qcow2");
    }

    #[test]
    fn legacy_drbd_devices_map_to_their_by_res_link() {
        let dir = tempfile::tempdir().unwrap();
        let by_res = dir.path().join("by-res");
        for (res, target) in [("cs-aaaa-1111", "/dev/zero"), ("cs-bbbb-2222", "/dev/null")] {
            std::fs::create_dir_all(by_res.join(res)).unwrap();
            std::os::unix::fs::symlink(target, by_res.join(res).join("0")).unwrap();
        }
        std::fs::create_dir_all(by_res.join("other")).unwrap();
        std::os::unix::fs::symlink("/dev/full", by_res.join("other/0")).unwrap();
        assert_eq!(
            linstor_uuid_of_device(Path::new("/dev/null"), &by_res).unwrap(),
            "bbbb-2222"
        );
        // Only cs-<uuid> resources count.
        assert!(linstor_uuid_of_device(Path::new("/dev/full"), &by_res).is_err());
    }

    #[test]
    fn paths_are_plain_names_only() {
        assert_eq!(plain_parts("vm/2026.11.27"), Some(vec!["vm", "2026.11.27"]));
        assert_eq!(plain_parts("vm"), Some(vec!["vm"]));
        for bad in [
            "", ".", "vm/.", "./vm", "vm/..", "/vm", "vm//t", "vm/t/", "..",
        ] {
            assert_eq!(plain_parts(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_failed_run_removes_only_what_it_made() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // A path that holds another backup is refused, untouched.
        std::fs::create_dir_all(root.join("vm/t1")).unwrap();
        std::fs::write(root.join("vm/t1/root.a.qcow2"), b"x").unwrap();
        assert!(Dest::create(root, &["vm", "t1"]).is_err());
        assert!(Dest::create(root, &["vm"]).is_err());
        assert!(root.join("vm/t1/root.a.qcow2").exists());
        // A new one under the existing VM directory: only it goes.
        let dest = Dest::create(root, &["vm", "t2"]).unwrap();
        std::fs::write(dest.path.join("root.a.qcow2"), b"y").unwrap();
        dest.remove().unwrap();
        assert!(!root.join("vm/t2").exists());
        assert!(root.join("vm/t1/root.a.qcow2").exists());
        // A new VM directory: all of it goes.
        let dest = Dest::create(root, &["new", "t1"]).unwrap();
        dest.remove().unwrap();
        assert!(!root.join("new").exists());
        // An empty directory that was there: its files go, it stays.
        std::fs::create_dir(root.join("vm/t3")).unwrap();
        let dest = Dest::create(root, &["vm", "t3"]).unwrap();
        std::fs::write(dest.path.join("root.a.qcow2"), b"z").unwrap();
        dest.remove().unwrap();
        assert!(root.join("vm/t3").is_dir());
        assert_eq!(std::fs::read_dir(root.join("vm/t3")).unwrap().count(), 0);
        // A symlink is not a directory to write into.
        std::os::unix::fs::symlink(root.join("vm"), root.join("link")).unwrap();
        assert!(Dest::create(root, &["link", "t9"]).is_err());
        assert!(!root.join("vm/t9").exists());
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
