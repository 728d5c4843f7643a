//! `bitback nasbackup` against CloudStack's contract: the argument vectors
//! the KVM agent builds (LibvirtTakeBackupCommandWrapper and friends), its
//! stdout parsed the way the agent parses it, the script's layout, and a
//! chain driven the way the orchestrator drives it, restored the agent's
//! way (`qemu-img convert` of the chain top), against a libvirt domain
//! running the sequence-log guest.
//!
//! The NAS is a bind mount (`-t none -s DIR -m bind`, which mount(8)
//! accepts): this kernel has no NFS or CIFS client, and the mount and
//! unmount go through the same code either way.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::guest::check_log;
use crate::guest::serial_count;
use crate::harness::{Run, bitback, bitback_env, qemu_img_info, require, run, tempdir};
use crate::libvirt::Domain;

/// Runs `bitback nasbackup ARGS`.
fn nasbackup(args: &[&str]) -> Run {
    let mut all = vec!["nasbackup"];
    all.extend(args);
    bitback(&all)
}

/// The agent's parse of a running VM's backup output: the last line is the
/// size (LibvirtTakeBackupCommandWrapper.parseBackupSize with no disk
/// paths).
fn running_size(stdout: &str) -> u64 {
    let lines: Vec<&str> = stdout.trim().split('\n').collect();
    lines.last().unwrap().trim().parse().unwrap()
}

/// The agent's parse of a stopped VM's output: the sum of every line's
/// first token.
fn stopped_size(stdout: &str) -> u64 {
    stdout
        .trim()
        .split('\n')
        .map(|l| l.split(' ').next().unwrap().trim().parse::<u64>().unwrap())
        .sum()
}

fn du_sb(dir: &Path) -> u64 {
    let out = run(Command::new("du").arg("-sb").arg(dir));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// No csbackup mount is left, and no mount point directory.
fn nothing_mounted(before: &[PathBuf]) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains("csbackup."), "{mounts}");
    assert_eq!(mount_points(), before, "a /tmp/csbackup.* was left behind");
}

fn mount_points() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(std::env::temp_dir())
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
fn bitmaps(domain: &Domain) -> Vec<(String, Vec<String>)> {
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
fn walk_files(dir: &Path) -> Vec<PathBuf> {
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
fn restore_log(file: &Path, out: &Path) -> i64 {
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(file)
        .arg(out));
    let last = check_log(out).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    std::fs::remove_file(out).unwrap();
    last.map_or(-1, |k| k as i64)
}

#[test]
fn the_agents_commands_give_the_scripts_files_output_and_exit_codes() {
    for tool in ["du", "mount", "umount"] {
        require(tool);
    }
    let dir = tempdir();
    let d = dir.path();
    let nas = d.join("nas");
    std::fs::create_dir(&nas).unwrap();
    let nas_arg = nas.to_str().unwrap().to_string();
    let before = mount_points();
    let domain = Domain::create(d, None);
    let vols: Vec<String> = domain
        .disks
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let instance = "i-2-3-VM";
    let common = |path: &str| -> Vec<String> {
        [
            "-o",
            "backup",
            "-v",
            &domain.name,
            "-t",
            "none",
            "-s",
            &nas_arg,
            "-m",
            "bind",
            "-p",
            path,
            "-q",
            "false",
            "-d",
            "",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let call = |args: Vec<String>| -> Run {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        nasbackup(&args)
    };

    // stats: the mount point, then "total used" in 1K blocks.
    let stats = nasbackup(&["-o", "stats", "-t", "none", "-s", &nas_arg, "-m", "bind"]);
    assert_eq!(stats.code, Some(0), "{}{}", stats.stdout, stats.stderr);
    let lines: Vec<&str> = stats.stdout.trim().lines().collect();
    assert_eq!(lines.len(), 2, "{}", stats.stdout);
    assert!(lines[0].starts_with(&format!("{}/csbackup.", std::env::temp_dir().display())));
    let numbers: Vec<u64> = lines[1]
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(numbers.len(), 2);
    assert!(numbers[0] >= numbers[1] && numbers[0] > 0);
    nothing_mounted(&before);

    // Bad options: usage, exit 1.
    let bad = nasbackup(&["-o", "backup", "--frobnicate", "1"]);
    assert_eq!(bad.code, Some(1));
    assert!(
        bad.stdout.contains("Invalid option: --frobnicate"),
        "{}",
        bad.stdout
    );
    assert!(bad.stdout.contains("Usage:"), "{}", bad.stdout);

    // A full with the bitmap the orchestrator named.
    let t = |n: u32| format!("{instance}/2026.11.27.05.{n:02}.00");
    let mut args = common(&t(0));
    args.extend(["-M", "full", "--bitmap-new", "backup-1000"].map(String::from));
    let full = call(args);
    assert_eq!(full.code, Some(0), "{}{}", full.stdout, full.stderr);
    let dest0 = nas.join(t(0));
    assert_eq!(running_size(&full.stdout), du_sb(&dest0));
    let mut names: Vec<String> = std::fs::read_dir(&dest0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected = vec![
        format!("datadisk.{}.qcow2", vols[1]),
        "domain-config.xml".into(),
        "domblklist.xml".into(),
        "domiflist.xml".into(),
        "dominfo.xml".into(),
        format!("root.{}.qcow2", vols[0]),
    ];
    expected.sort();
    assert_eq!(names, expected);
    for (disk, list) in bitmaps(&domain) {
        assert!(
            list.contains(&"backup-1000".to_string()),
            "{disk}: {list:?}"
        );
    }
    nothing_mounted(&before);

    // Three incrementals, each on the previous one's files.
    let mut parent = 0;
    for (n, bitmap) in [(1, "backup-2000"), (2, "backup-3000"), (3, "backup-4000")] {
        domain.wait_records(10);
        let parent_bitmap = format!("backup-{}000", parent + 1);
        let parents = format!(
            "{}/root.{}.qcow2,{}/datadisk.{}.qcow2",
            t(parent),
            vols[0],
            t(parent),
            vols[1]
        );
        let mut args = common(&t(n));
        if n == 2 {
            // -q true: frozen through libvirt and the guest's agent.
            let q = args.iter().position(|a| a == "-q").unwrap();
            args[q + 1] = "true".into();
        }
        args.extend([
            "-M".into(),
            "incremental".into(),
            "--bitmap-new".into(),
            bitmap.into(),
            "--bitmap-parent".into(),
            parent_bitmap,
            "--parent-paths".into(),
            parents,
        ]);
        let incr = call(args);
        assert_eq!(incr.code, Some(0), "{}{}", incr.stdout, incr.stderr);
        let frozen = usize::from(n >= 2);
        assert_eq!(
            (
                serial_count(&domain.dir, "frozen"),
                serial_count(&domain.dir, "thawed")
            ),
            (frozen, frozen)
        );
        let dest = nas.join(t(n));
        assert_eq!(running_size(&incr.stdout), du_sb(&dest));
        for (i, role) in ["root", "datadisk"].iter().enumerate() {
            let file = dest.join(format!("{role}.{}.qcow2", vols[i]));
            let info = qemu_img_info(&file);
            assert_eq!(
                info["backing-filename"],
                format!("../2026.11.27.05.{parent:02}.00/{role}.{}.qcow2", vols[i])
            );
            run(Command::new("qemu-img").args(["check", "-q"]).arg(&file));
        }
        parent = n;
    }

    // An incremental whose parent bitmap is gone: exit 1, nothing left.
    let mut args = common(&t(9));
    args.extend(
        [
            "-M",
            "incremental",
            "--bitmap-new",
            "backup-9000",
            "--bitmap-parent",
            "backup-gone",
            "--parent-paths",
        ]
        .map(String::from),
    );
    args.push(format!(
        "{}/root.{}.qcow2,{}/datadisk.{}.qcow2",
        t(3),
        vols[0],
        t(3),
        vols[1]
    ));
    let refused = call(args.clone());
    assert_eq!(refused.code, Some(1), "{}", refused.stdout);
    assert!(refused.stdout.contains("backup-gone"), "{}", refused.stdout);
    assert!(!nas.join(t(9)).exists());
    // ... and one whose disk list no longer matches.
    let pos = args.iter().position(|a| a == "backup-gone").unwrap();
    args[pos] = "backup-4000".into();
    let last = args.len() - 1;
    args[last] = format!("{}/root.{}.qcow2", t(3), vols[0]);
    let mismatch = call(args);
    assert_eq!(mismatch.code, Some(1), "{}", mismatch.stdout);
    assert!(
        mismatch.stdout.contains("no longer matches"),
        "{}",
        mismatch.stdout
    );
    assert!(!nas.join(t(9)).exists());
    nothing_mounted(&before);

    // legacy-full (no -M): a full, no bitmap.
    let legacy = call(common(&t(10)));
    assert_eq!(legacy.code, Some(0), "{}{}", legacy.stdout, legacy.stderr);
    for (disk, list) in bitmaps(&domain) {
        assert_eq!(list.len(), 4, "{disk}: {list:?}");
    }

    // After a restore the orchestrator clears its active checkpoint and
    // asks for a full again, then incrementals from it.
    domain.wait_records(10);
    let mut args = common(&t(11));
    args.extend(["-M", "full", "--bitmap-new", "backup-11000"].map(String::from));
    let again = call(args);
    assert_eq!(again.code, Some(0), "{}{}", again.stdout, again.stderr);
    domain.wait_records(10);
    let mut args = common(&t(12));
    args.extend(
        [
            "-M",
            "incremental",
            "--bitmap-new",
            "backup-12000",
            "--bitmap-parent",
            "backup-11000",
            "--parent-paths",
        ]
        .map(String::from),
    );
    args.push(format!(
        "{}/root.{}.qcow2,{}/datadisk.{}.qcow2",
        t(11),
        vols[0],
        t(11),
        vols[1]
    ));
    let after = call(args.clone());
    assert_eq!(after.code, Some(0), "{}{}", after.stdout, after.stderr);

    // A second run while one holds the domain's lock (the agent gave up on
    // it but did not kill it) is refused at once, and leaves nothing.
    let lock_path =
        std::path::Path::new("/run/lock").join(format!("bitback-nasbackup-{}.lock", domain.name));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap();
    let holder = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .expect("taking the domain's lock");
    let mut args = common(&t(13));
    args.extend(["-M", "full", "--bitmap-new", "backup-13000"].map(String::from));
    let locked = call(args);
    drop(holder);
    assert_eq!(locked.code, Some(1), "{}", locked.stdout);
    assert!(locked.stdout.contains("is running"), "{}", locked.stdout);
    assert!(!nas.join(t(13)).exists());

    // Killed (SIGKILL after the transaction): the NAS was mounted in
    // bitback's own mount namespace, which died with it, so the host keeps
    // no mount. Left: the empty mount point, and the partial backup
    // directory, which the orchestrator records as a failed backup.
    domain.wait_records(10);
    let mut args = vec!["nasbackup".to_string()];
    args.extend(common(&t(14)));
    args.extend(["-M", "full", "--bitmap-new", "backup-14000"].map(String::from));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let killed = bitback_env(&argv, &[("BITBACK_FAULT", "after-transaction")]);
    assert_eq!(killed.code, None, "{}{}", killed.stdout, killed.stderr);
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains("csbackup."), "{mounts}");
    for point in mount_points() {
        if !before.contains(&point) {
            std::fs::remove_dir(&point).expect("the left mount point is empty");
        }
    }
    nothing_mounted(&before);
    // The next run (the orchestrator's next backup) works.
    let mut args = common(&t(15));
    args.extend(["-M", "full", "--bitmap-new", "backup-15000"].map(String::from));
    let next = call(args);
    assert_eq!(next.code, Some(0), "{}{}", next.stdout, next.stderr);
    nothing_mounted(&before);

    // qemu-img check is clean on every file written.
    for entry in walk_files(&nas) {
        if entry.extension().is_some_and(|e| e == "qcow2") {
            run(Command::new("qemu-img").args(["check", "-q"]).arg(&entry));
        }
    }

    // Every point restores the agent's way to consistent logs, the disks
    // within one record of each other.
    let out = d.join("restored.raw");
    let mut previous = -1;
    for n in [0, 1, 2, 3, 10, 11, 12, 15] {
        let dest = nas.join(t(n));
        let a = restore_log(&dest.join(format!("root.{}.qcow2", vols[0])), &out);
        let b = restore_log(&dest.join(format!("datadisk.{}.qcow2", vols[1])), &out);
        assert!(a == b || a == b + 1, "point {n}: vda at {a}, vdb at {b}");
        assert!(a >= previous, "point {n} went back in the log");
        previous = a;
    }

    // A stopped VM (-d, the domain gone): full copies, one size per line,
    // and the new bitmap pre-seeded on the qcow2 sources.
    domain.destroy();
    let disks = format!(
        "{},{}",
        domain.disks[0].display(),
        domain.disks[1].display()
    );
    let mut args = common(&t(20));
    let di = args.iter().position(|a| a == "-d").unwrap();
    args[di + 1] = disks;
    args.extend(["-M", "full", "--bitmap-new", "backup-20000"].map(String::from));
    let stopped = call(args);
    assert_eq!(
        stopped.code,
        Some(0),
        "{}{}",
        stopped.stdout,
        stopped.stderr
    );
    let dest = nas.join(t(20));
    let files: u64 = std::fs::read_dir(&dest)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert_eq!(stopped_size(&stopped.stdout), files);
    assert_eq!(stopped.stdout.trim().lines().count(), 2);
    for disk in &domain.disks {
        let info = qemu_img_info(disk);
        let text = info.to_string();
        assert!(text.contains("backup-20000"), "{text}");
    }
    let a = restore_log(&dest.join(format!("root.{}.qcow2", vols[0])), &out);
    assert!(a >= previous);
    nothing_mounted(&before);

    // delete: the backup directory goes.
    let deleted = nasbackup(&[
        "-o",
        "delete",
        "-t",
        "none",
        "-s",
        &nas_arg,
        "-m",
        "bind",
        "-p",
        &t(20),
    ]);
    assert_eq!(
        deleted.code,
        Some(0),
        "{}{}",
        deleted.stdout,
        deleted.stderr
    );
    assert!(!dest.exists());
    assert!(nas.join(t(3)).exists());
    nothing_mounted(&before);
}
