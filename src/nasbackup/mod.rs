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

/// Collects a line of the script's stdout.
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {
        $out.push(format!($($arg)*))
    };
}

mod backup;
mod layout;
mod mount;

use crate::engine::thaw_guard::GuardCommand;
use layout::{Dest, backup_parts, remove_backup_dir};
use mount::Mount;
pub use mount::private_mounts;

/// Runs the script's command line `args` (as CloudStack's KVM agent
/// passes them): the script's stdout lines, and its exit status, or an
/// error that is not the script's own output (the caller reports it as
/// any other command's).
pub async fn run(args: &[String], guard: &GuardCommand) -> (Vec<String>, anyhow::Result<u8>) {
    let mut stdout = Vec::new();
    let code = dispatch(args, guard, &mut stdout).await;
    (stdout, code)
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
    /// `--fleecing DIR` (bitback's own): old data displaced by guest
    /// writes during the copy goes to a scratch image in DIR, not to the
    /// NAS (see `bitback backup --fleecing`).
    fleecing: String,
}

const USAGE: &str = "
Usage: bitback nasbackup -o <operation> -v|--vm <domain name> -t <storage type> -s <storage address> -m <mount options> -p <backup path> -d <disks path> -q|--quiesce <true|false> [-c] [-b <MiB/s>] [-e <passphrase file>] [--verify]
         [--fleecing <local dir>] [-M|--mode <full|incremental|legacy-full>] [--bitmap-new <name>] [--bitmap-parent <name>] [--parent-paths <p1,p2,...>]
";

fn usage(out: &mut Vec<String>) -> u8 {
    say!(out, "{USAGE}");
    1
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
            "--fleecing" => &mut o.fleecing,
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

async fn dispatch(
    args: &[String],
    guard: &GuardCommand,
    out: &mut Vec<String>,
) -> anyhow::Result<u8> {
    let o = match parse(args) {
        Ok(o) => o,
        Err(message) => {
            if !message.is_empty() {
                say!(out, "{message}");
            }
            return Ok(usage(out));
        }
    };
    match o.op.as_str() {
        "backup" => backup::backup(&o, guard, out).await,
        "delete" => delete(&o, out),
        "stats" => stats(&o, out),
        other => {
            say!(out, "Unknown operation: {other:?}");
            Ok(usage(out))
        }
    }
}

/// Removes what this run made of the backup directory and releases the
/// mount after a failure: exit 1, or 20 when the cleanup itself failed.
fn fail(mount: &mut Mount, dest: Option<&Dest>, message: &str, out: &mut Vec<String>) -> u8 {
    say!(out, "{message}");
    let mut failed = Vec::new();
    if let Some(dest) = dest
        && let Err(e) = dest.remove()
    {
        failed.push(format!("Failed to delete {}: {e}", dest.path.display()));
    }
    failed.extend(mount.release());
    if failed.is_empty() {
        1
    } else {
        for line in failed {
            say!(out, "{line}");
        }
        say!(out, "Backup cleanup failed");
        EXIT_CLEANUP_FAILED
    }
}

/// Deletes one backup: the path must name exactly one backup directory of
/// the layout, `<instance>/<timestamp>`, holding files only. Anything
/// else (`.`, `VM`, `VM/.`, a path with a directory inside) is refused
/// with nothing removed: `rm -rf` of such a path would wipe other backups.
fn delete(o: &Options, out: &mut Vec<String>) -> anyhow::Result<u8> {
    let Some(parts) = backup_parts(&o.path) else {
        say!(
            out,
            "Bad backup path {:?}: a delete names one backup directory, <instance>/<timestamp>",
            o.path
        );
        return Ok(1);
    };
    let mut mount = match Mount::new(o, out) {
        Ok(mount) => mount,
        Err(code) => return Ok(code),
    };
    if let Err(message) = remove_backup_dir(&mount.point, parts[0], parts[1], out) {
        return Ok(fail(&mut mount, None, &message, out));
    }
    Ok(mount.finish(1, out))
}

fn stats(o: &Options, out: &mut Vec<String>) -> anyhow::Result<u8> {
    let mount = match Mount::new(o, out) {
        Ok(mount) => mount,
        Err(code) => return Ok(code),
    };
    let fs = nix::sys::statvfs::statvfs(&mount.point);
    say!(out, "{}", mount.point.display());
    if let Ok(fs) = fs {
        // df -P: 1024-byte blocks, used = total - free.
        let unit = fs.fragment_size() as u128;
        let total = fs.blocks() as u128 * unit / 1024;
        let used = (fs.blocks() as u128 - fs.blocks_free() as u128) * unit / 1024;
        say!(out, "{total} {used}");
    }
    Ok(mount.finish(1, out))
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
}
