//! CloudStack's side of `bitback nasbackup`: its runs with their own
//! TMPDIR, the agent's parses of their output, the NAS's mounts and
//! files, and [`Agent`], the argument vectors the KVM agent builds for one
//! domain. The scenarios in `nasbackup.rs` are written over these.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::domain::Domain;
use super::guest::check_log;
use super::{Run, bitback, bitback_env, qemu_img_info, run};

/// Held by each nasbackup test: they check that no `/tmp/csbackup.*` is left,
/// which another test's run in flight would make. A flock, not a mutex:
/// `cargo test` runs tests as threads of one process, nextest each in a
/// process of its own, and each open of the file is a lock of its own.
pub fn one_at_a_time() -> nix::fcntl::Flock<std::fs::File> {
    let path = std::env::temp_dir().join("bitback-test-nasbackup.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap();
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap()
}

/// The temp directory (TMPDIR) of this process's nasbackup runs, where
/// they make their `csbackup.XXXXX` mount points: the checks here look at
/// what these runs made, never at the rest of `/tmp`, where a real agent's
/// run on the same host may come and go.
pub fn run_tmp() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bitback-nas-tests.{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `bitback nasbackup ARGS` (with [`run_tmp`] as its TMPDIR), plus
/// environment `env`.
pub fn nasbackup_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut all = vec!["nasbackup"];
    all.extend(args);
    let tmp = run_tmp();
    let mut env = env.to_vec();
    env.push(("TMPDIR", tmp.to_str().unwrap()));
    bitback_env(&all, &env)
}

/// Runs `bitback nasbackup ARGS`.
pub fn nasbackup(args: &[&str]) -> Run {
    nasbackup_env(args, &[])
}

/// The agent's parse of a running VM's backup output: the last line is the
/// size (LibvirtTakeBackupCommandWrapper.parseBackupSize with no disk
/// paths).
pub fn running_size(stdout: &str) -> u64 {
    let lines: Vec<&str> = stdout.trim().split('\n').collect();
    lines.last().unwrap().trim().parse().unwrap()
}

/// The agent's parse of a stopped VM's output: the sum of every line's
/// first token.
pub fn stopped_size(stdout: &str) -> u64 {
    stdout
        .trim()
        .split('\n')
        .map(|l| l.split(' ').next().unwrap().trim().parse::<u64>().unwrap())
        .sum()
}

pub fn du_sb(dir: &Path) -> u64 {
    let out = run(Command::new("du").arg("-sb").arg(dir));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// No csbackup mount of these runs is left, and no mount point directory.
pub fn nothing_mounted(before: &[PathBuf]) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let ours = format!("{}/csbackup.", run_tmp().display());
    assert!(!mounts.contains(&ours), "{mounts}");
    assert_eq!(mount_points(), before, "a csbackup.* was left behind");
}

/// The mount points these runs made and left.
pub fn mount_points() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(run_tmp())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("csbackup."))
        })
        .collect();
    out.sort();
    out
}

/// The bitmaps of every disk of the domain, by target.
pub fn bitmaps(domain: &Domain) -> Vec<(String, Vec<String>)> {
    let info = bitback(&["inspect", "--libvirt", &domain.name, "--json"]).json();
    info["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["bitmaps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b["name"].as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

/// Every file under `dir`.
pub fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk_files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Restores `file` (a chain top) the agent's way and checks the guest's log.
pub fn restore_log(file: &Path, out: &Path) -> i64 {
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(file)
        .arg(out));
    let last = check_log(out).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    std::fs::remove_file(out).unwrap();
    last.map_or(-1, |k| k as i64)
}

/// The lines of `stdout` the agent keeps after stripping the script's
/// marker lines (LibvirtTakeBackupCommandWrapper.stripMarkerLines).
pub fn without_markers(stdout: &str) -> String {
    stdout
        .lines()
        .filter(|l| {
            !l.contains("INCREMENTAL_FALLBACK=true") && !l.contains("PARENT_BITMAP_DELETED=true")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every file under `dir` with its bytes: what a run must leave as it
/// found it.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = walk_files(dir)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

/// The node name of each of the domain's disks, by target.
pub fn node_of(domain: &Domain, disk: &str) -> String {
    let info = bitback(&["inspect", "--libvirt", &domain.name, "--json"]).json();
    info["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == disk)
        .unwrap_or_else(|| panic!("no volume {disk}: {info}"))["node_name"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The KVM agent of one domain backing it up to a bind-mounted NAS: the
/// argument vectors it builds (LibvirtTakeBackupCommandWrapper), the
/// points' directories `<instance>/<day>.05.MM.00` and files
/// `root.<vol>.qcow2`, `datadisk.<vol>.qcow2`.
pub struct Agent<'a> {
    pub domain: &'a Domain,
    pub nas: PathBuf,
    pub instance: String,
    /// The domain's volumes' file names (the agent's volume ids).
    pub vols: Vec<String>,
    /// `YYYY.MM.DD`, the points' day.
    day: String,
}

/// The role of each of the domain's disks, as the agent names its files.
const ROLES: [&str; 2] = ["root", "datadisk"];

impl<'a> Agent<'a> {
    /// The agent of `domain`, its NAS at `nas` (made), its instance name
    /// `instance`, its points on `day`.
    pub fn new(domain: &'a Domain, nas: PathBuf, instance: &str, day: &str) -> Agent<'a> {
        std::fs::create_dir_all(&nas).unwrap();
        let vols = domain
            .disks
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        Agent {
            domain,
            nas,
            instance: instance.into(),
            vols,
            day: day.into(),
        }
    }

    /// Point `n`'s path under the NAS (`-p`).
    pub fn point(&self, n: u32) -> String {
        format!("{}/{}.05.{n:02}.00", self.instance, self.day)
    }

    /// Point `n`'s directory.
    pub fn dir(&self, n: u32) -> PathBuf {
        self.nas.join(self.point(n))
    }

    /// The file of disk `role` (0: root, 1: datadisk) in point `n`.
    pub fn file(&self, n: u32, role: usize) -> PathBuf {
        self.dir(n)
            .join(format!("{}.{}.qcow2", ROLES[role], self.vols[role]))
    }

    /// Point `n`'s files as `--parent-paths` names them.
    pub fn parents(&self, n: u32) -> String {
        (0..2)
            .map(|role| {
                format!(
                    "{}/{}.{}.qcow2",
                    self.point(n),
                    ROLES[role],
                    self.vols[role]
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The agent's arguments for a backup of the running domain into
    /// `path`: no quiescing, no disk list; `extra` after them (a repeated
    /// option's last value counts).
    pub fn args(&self, path: &str, extra: &[&str]) -> Vec<String> {
        backup_args(&self.domain.name, &self.nas, path, extra)
    }

    /// A backup into point `n`, with `extra`.
    pub fn backup(&self, n: u32, extra: &[&str]) -> Run {
        self.backup_env(n, extra, &[])
    }

    /// [`Agent::backup`], with environment `env`.
    pub fn backup_env(&self, n: u32, extra: &[&str], env: &[(&str, &str)]) -> Run {
        let args = self.args(&self.point(n), extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        nasbackup_env(&args, env)
    }

    /// A full into point `n` making bitmap `bitmap`.
    pub fn full(&self, n: u32, bitmap: &str, extra: &[&str]) -> Run {
        let mut all = vec!["-M", "full", "--bitmap-new", bitmap];
        all.extend(extra);
        self.backup(n, &all)
    }

    /// An incremental into point `n`, bitmap `new` made, since bitmap
    /// `parent` on point `parent_point`'s files.
    pub fn incremental(
        &self,
        n: u32,
        new: &str,
        parent: &str,
        parent_point: u32,
        extra: &[&str],
    ) -> Run {
        let parents = self.parents(parent_point);
        let mut all = vec![
            "-M",
            "incremental",
            "--bitmap-new",
            new,
            "--bitmap-parent",
            parent,
            "--parent-paths",
            &parents,
        ];
        all.extend(extra);
        self.backup(n, &all)
    }

    /// The backing file name of disk `role`'s file in point `n`.
    pub fn backing(&self, n: u32, role: usize) -> Option<String> {
        qemu_img_info(&self.file(n, role))["backing-filename"]
            .as_str()
            .map(str::to_string)
    }

    /// Every disk holds bitmap `name` and no other.
    pub fn only_bitmap(&self, name: &str) {
        for (disk, list) in bitmaps(self.domain) {
            assert_eq!(list, vec![name.to_string()], "disk {disk}");
        }
    }

    /// Every point of `points` (oldest first) restores the agent's way
    /// (through `out`) to consistent logs, the disks within one record of
    /// each other and no point behind the one before; the last record.
    pub fn restores_in_order(&self, points: &[u32], out: &Path) -> i64 {
        let mut previous = -1;
        for &n in points {
            let a = restore_log(&self.file(n, 0), out);
            let b = restore_log(&self.file(n, 1), out);
            assert!(a == b || a == b + 1, "point {n}: vda at {a}, vdb at {b}");
            assert!(a >= previous, "point {n} went back in the log");
            previous = a;
        }
        previous
    }
}

/// The agent's arguments for a backup of domain `domain` into `path` on
/// the bind-mounted NAS `nas`: no quiescing, no disk list; `extra` after
/// them (a repeated option's last value counts).
pub fn backup_args(domain: &str, nas: &Path, path: &str, extra: &[&str]) -> Vec<String> {
    let nas = nas.to_str().unwrap();
    let mut args: Vec<String> = [
        "-o", "backup", "-v", domain, "-t", "none", "-s", nas, "-m", "bind", "-p", path, "-q",
        "false", "-d", "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The agent's delete of backup directory `path` on the NAS `nas`.
pub fn delete(nas: &Path, path: &str) -> Run {
    let nas = nas.to_str().unwrap();
    nasbackup(&[
        "-o", "delete", "-t", "none", "-s", nas, "-m", "bind", "-p", path,
    ])
}

/// `run` exited 0 (its output shown when not).
pub fn assert_ok(run: &Run) {
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
}
