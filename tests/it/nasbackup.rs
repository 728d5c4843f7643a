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

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::domain::{Domain, must_virsh};
use crate::harness::guest::{check_log, serial_count};
use crate::harness::nas::*;
use crate::harness::{bitback, qemu_img_info, require, run, tempdir};

#[test]
fn the_agents_commands_give_the_scripts_files_output_and_exit_codes() {
    let _serial = one_at_a_time();
    for tool in ["du", "mount", "umount"] {
        require(tool);
    }
    let dir = tempdir();
    let d = dir.path();
    let before = mount_points();
    let domain = Domain::create(d, None);
    let agent = Agent::new(&domain, d.join("nas"), "i-2-3-VM", "2026.11.27");

    a_full_makes_the_scripts_files_and_bitmap(&agent);
    nothing_mounted(&before);
    incrementals_build_on_their_parents(&agent);
    a_lost_parent_or_a_changed_disk_list_gives_a_full(&agent);
    nothing_mounted(&before);
    a_legacy_full_leaves_the_bitmaps_alone(&agent);
    // After a restore the orchestrator clears its active checkpoint and
    // asks for a full again, then incrementals from it.
    domain.wait_records(10);
    assert_ok(&agent.full(11, "backup-11000", &[]));
    domain.wait_records(10);
    assert_ok(&agent.incremental(12, "backup-12000", "backup-11000", 11, &[]));
    a_second_run_on_a_locked_domain_is_refused(&agent);
    a_killed_run_leaves_no_mount_and_the_next_run_works(&agent, &before);

    // qemu-img check is clean on every file of a backup that ended. (The
    // killed run's file is not one: on bitback's data path its header is
    // written last, so it may not even be a qcow2 image.)
    let killed_dir = agent.dir(14);
    for entry in walk_files(&agent.nas) {
        if !entry.starts_with(&killed_dir) && entry.extension().is_some_and(|e| e == "qcow2") {
            run(Command::new("qemu-img").args(["check", "-q"]).arg(&entry));
        }
    }
    agent.restores_in_order(&[0, 1, 2, 3, 10, 11, 12, 15], &d.join("restored.raw"));
    nothing_mounted(&before);
}

/// A full with the bitmap the orchestrator named: the script's files, its
/// size line, the bitmap on every disk.
fn a_full_makes_the_scripts_files_and_bitmap(agent: &Agent) {
    let full = agent.full(0, "backup-1000", &[]);
    assert_ok(&full);
    assert_eq!(running_size(&full.stdout), du_sb(&agent.dir(0)));
    let mut names: Vec<String> = std::fs::read_dir(agent.dir(0))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected = vec![
        format!("datadisk.{}.qcow2", agent.vols[1]),
        "domain-config.xml".into(),
        "domblklist.xml".into(),
        "domiflist.xml".into(),
        "dominfo.xml".into(),
        format!("root.{}.qcow2", agent.vols[0]),
    ];
    expected.sort();
    assert_eq!(names, expected);
    for (disk, list) in bitmaps(agent.domain) {
        assert!(
            list.contains(&"backup-1000".to_string()),
            "{disk}: {list:?}"
        );
    }
}

/// Three incrementals, each on the previous one's files: the second
/// frozen through libvirt and the guest's agent (`-q true`), the third
/// with bitback's own `--fleecing` (old data to a local scratch image,
/// removed after the run). After them, each parent's bitmap went with it.
fn incrementals_build_on_their_parents(agent: &Agent) {
    let domain = agent.domain;
    let mut parent = 0;
    for (n, bitmap) in [(1, "backup-2000"), (2, "backup-3000"), (3, "backup-4000")] {
        domain.wait_records(10);
        let parent_bitmap = format!("backup-{}000", parent + 1);
        let fleece = tempdir();
        let fleece_arg = fleece.path().display().to_string();
        let extra: Vec<&str> = match n {
            2 => vec!["-q", "true"],
            3 => vec!["--fleecing", &fleece_arg],
            _ => vec![],
        };
        let incr = agent.incremental(n, bitmap, &parent_bitmap, parent, &extra);
        assert_ok(&incr);
        assert_eq!(std::fs::read_dir(fleece.path()).unwrap().count(), 0);
        let frozen = usize::from(n >= 2);
        assert_eq!(
            (
                serial_count(&domain.dir, "frozen"),
                serial_count(&domain.dir, "thawed")
            ),
            (frozen, frozen)
        );
        assert_eq!(running_size(&incr.stdout), du_sb(&agent.dir(n)));
        for (role, name) in ["root", "datadisk"].iter().enumerate() {
            assert_eq!(
                agent.backing(n, role).as_deref(),
                Some(
                    format!(
                        "../2026.11.27.05.{parent:02}.00/{name}.{}.qcow2",
                        agent.vols[role]
                    )
                    .as_str()
                )
            );
            run(Command::new("qemu-img")
                .args(["check", "-q"])
                .arg(agent.file(n, role)));
        }
        parent = n;
    }
    agent.only_bitmap("backup-4000");
}

/// An incremental whose parent bitmap is gone: a full, exit 0, said with
/// the script's marker (failing would lock the VM out); and one whose
/// disk list no longer matches: a full too.
fn a_lost_parent_or_a_changed_disk_list_gives_a_full(agent: &Agent) {
    let fell = agent.incremental(9, "backup-9000", "backup-gone", 3, &[]);
    assert_ok(&fell);
    assert!(
        fell.stdout.starts_with("INCREMENTAL_FALLBACK=true\n"),
        "{}",
        fell.stdout
    );
    assert!(fell.stderr.contains("backup-gone"), "{}", fell.stderr);
    assert_eq!(agent.backing(9, 0), None);
    let one_disk = format!("{}/root.{}.qcow2", agent.point(9), agent.vols[0]);
    let mismatch = agent.backup(
        8,
        &[
            "-M",
            "incremental",
            "--bitmap-new",
            "backup-8000",
            "--bitmap-parent",
            "backup-9000",
            "--parent-paths",
            &one_disk,
        ],
    );
    assert_ok(&mismatch);
    assert!(
        mismatch.stdout.contains("INCREMENTAL_FALLBACK=true"),
        "{}",
        mismatch.stdout
    );
    assert!(
        mismatch.stderr.contains("no longer matches"),
        "{}",
        mismatch.stderr
    );
}

/// legacy-full (no -M): a full, no bitmap made or removed.
fn a_legacy_full_leaves_the_bitmaps_alone(agent: &Agent) {
    assert_ok(&agent.backup(10, &[]));
    for (disk, mut list) in bitmaps(agent.domain) {
        list.sort();
        assert_eq!(
            list,
            vec!["backup-4000".to_string(), "backup-8000".to_string()],
            "{disk}"
        );
    }
}

/// A second run while one holds the domain's lock (the agent gave up on
/// it but did not kill it) is refused at once, and leaves nothing.
fn a_second_run_on_a_locked_domain_is_refused(agent: &Agent) {
    let lock_path = std::path::Path::new("/run/lock")
        .join(format!("bitback-nasbackup-{}.lock", agent.domain.name));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap();
    let holder = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .expect("taking the domain's lock");
    let locked = agent.full(13, "backup-13000", &[]);
    drop(holder);
    assert_eq!(locked.code, Some(1), "{}", locked.stdout);
    assert!(locked.stdout.contains("is running"), "{}", locked.stdout);
    assert!(!agent.dir(13).exists());
}

/// Killed (SIGKILL after the transaction): the NAS was mounted in
/// bitback's own mount namespace, which died with it, so the host keeps
/// no mount. Left: the empty mount point, and the partial backup
/// directory, which the orchestrator records as a failed backup. The next
/// run (the orchestrator's next backup) works, and removes the killed
/// run's sockets' directories.
fn a_killed_run_leaves_no_mount_and_the_next_run_works(agent: &Agent, before: &[PathBuf]) {
    agent.domain.wait_records(10);
    let killed = agent.backup_env(
        14,
        &["-M", "full", "--bitmap-new", "backup-14000"],
        &[("BITBACK_FAULT", "after-transaction")],
    );
    assert_eq!(killed.code, None, "{}{}", killed.stdout, killed.stderr);
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains("csbackup."), "{mounts}");
    for point in mount_points() {
        if !before.contains(&point) {
            std::fs::remove_dir(&point).expect("the left mount point is empty");
        }
    }
    nothing_mounted(before);
    assert_ok(&agent.full(15, "backup-15000", &[]));
    nothing_mounted(before);
    let left: Vec<_> = std::fs::read_dir(run_tmp())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("bitback-"))
        .collect();
    assert!(left.is_empty(), "a killed run's leftovers: {left:?}");
}

/// Issue 18 through the agent's argument vectors, against a domain with a
/// raw data disk and no guest agent channel: a parent the chain cannot
/// build on (a bitmap gone from one disk, a truncated parent file) gives a
/// full with INCREMENTAL_FALLBACK=true and exit 0, and the chain goes on;
/// after each incremental only the newest bitmap is left; a paused domain
/// is backed up and stays paused; -c -b -e --verify work.
#[test]
fn the_drop_in_never_locks_a_vm_out_of_its_backups() {
    let _serial = one_at_a_time();
    for tool in ["du", "mount", "umount", "virsh"] {
        require(tool);
    }
    let dir = tempdir();
    let d = dir.path();
    let before = mount_points();
    let domain = Domain::create_shaped(d, None, crate::harness::domain::Agent::NoChannel, true);
    let agent = Agent::new(&domain, d.join("nas"), "i-2-4-VM", "2026.11.28");

    // libvirt's raw disk is a raw file, as with plain QEMU (it was "other").
    let info = bitback(&["inspect", "--libvirt", &domain.name, "--json"]).json();
    let kinds: Vec<(&str, &str)> = info["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(kinds, [("vda", "qcow2"), ("vdb", "raw-file")]);

    assert_ok(&agent.full(0, "b-1", &[]));
    agent.only_bitmap("b-1");
    no_agent_channel_is_said_and_the_copy_is_crash_consistent(&agent);
    a_bitmap_gone_from_one_disk_gives_a_full_and_the_chain_goes_on(&agent);
    a_truncated_parent_file_gives_a_full(&agent, d);
    a_paused_domain_is_backed_up_and_stays_paused(&agent);
    a_parent_directory_that_is_a_symlink_is_never_built_on(&agent);
    let key = compressed_limited_verified_and_encrypted_points(&agent, d);

    // Every point restores the agent's way; the encrypted one with the key.
    let out = d.join("restored.raw");
    let last = agent.restores_in_order(&[0, 1, 2, 3, 4, 5, 7], &out);
    run(Command::new("qemu-img")
        .arg("convert")
        .arg("--object")
        .arg(format!("secret,id=sec0,file={}", key.display()))
        .arg("--image-opts")
        .arg(format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
            agent.file(8, 0).display()
        ))
        .args(["-O", "raw"])
        .arg(&out));
    let a = check_log(&out).unwrap().map_or(-1, |k| k as i64);
    assert!(a >= last);
    std::fs::remove_file(&out).unwrap();

    a_stopped_domain_with_a_raw_disk_is_copied_whole(&agent);
    // A delete of one backup directory works.
    assert_ok(&delete(&agent.nas, &agent.point(9)));
    assert!(!agent.dir(9).exists());
    assert!(agent.dir(8).exists());
    nothing_mounted(&before);
}

/// `-q true` with no agent channel: said plainly, crash-consistent, and
/// no thaw error. After the incremental only its own bitmap is left, and
/// the size is given both ways.
fn no_agent_channel_is_said_and_the_copy_is_crash_consistent(agent: &Agent) {
    agent.domain.wait_records(10);
    let incr = agent.incremental(1, "b-2", "b-1", 0, &["-q", "true"]);
    assert_ok(&incr);
    assert!(
        !incr.stdout.contains("INCREMENTAL_FALLBACK"),
        "{}",
        incr.stdout
    );
    assert!(
        incr.stdout.contains("PARENT_BITMAP_DELETED=true"),
        "{}",
        incr.stdout
    );
    assert!(
        incr.stderr.contains("no guest agent channel"),
        "{}",
        incr.stderr
    );
    assert!(incr.stderr.contains("crash-consistent"), "{}", incr.stderr);
    assert!(!incr.stderr.contains("thawing"), "{}", incr.stderr);
    let size = running_size(&without_markers(&incr.stdout));
    assert_eq!(size, du_sb(&agent.dir(1)));
    assert!(
        incr.stdout
            .contains(&format!("\nBACKUP_SIZE_TOTAL={size}\n")),
        "{}",
        incr.stdout
    );
    assert!(agent.backing(1, 0).is_some() && agent.backing(1, 1).is_some());
    agent.only_bitmap("b-2");
}

/// The parent bitmap gone from one disk (as a raw disk's is after a QEMU
/// restart): a full, exit 0, the marker; the stale parent bitmap goes
/// too, and the chain goes on from the full.
fn a_bitmap_gone_from_one_disk_gives_a_full_and_the_chain_goes_on(agent: &Agent) {
    let domain = agent.domain;
    let vdb = node_of(domain, "vdb");
    must_virsh(&[
        "qemu-monitor-command",
        &domain.name,
        &format!(
            r#"{{"execute":"block-dirty-bitmap-remove","arguments":{{"node":"{vdb}","name":"b-2"}}}}"#
        ),
    ]);
    domain.wait_records(10);
    let fell = agent.incremental(2, "b-3", "b-2", 1, &[]);
    assert_ok(&fell);
    assert!(
        fell.stdout.contains("INCREMENTAL_FALLBACK=true"),
        "{}",
        fell.stdout
    );
    assert!(
        fell.stderr.contains("missing on disk vdb"),
        "{}",
        fell.stderr
    );
    assert_eq!((agent.backing(2, 0), agent.backing(2, 1)), (None, None));
    assert_eq!(
        running_size(&without_markers(&fell.stdout)),
        du_sb(&agent.dir(2))
    );
    agent.only_bitmap("b-3");
    domain.wait_records(10);
    let on = agent.incremental(3, "b-4", "b-3", 2, &[]);
    assert_ok(&on);
    assert!(!on.stdout.contains("INCREMENTAL_FALLBACK"), "{}", on.stdout);
    assert_eq!(
        agent.backing(3, 0).as_deref(),
        Some(format!("../2026.11.28.05.02.00/root.{}.qcow2", agent.vols[0]).as_str())
    );
    agent.only_bitmap("b-4");
}

/// A truncated parent file: a full, not an incremental built on it.
fn a_truncated_parent_file_gives_a_full(agent: &Agent, scratch: &Path) {
    let cut = agent.file(3, 1);
    let cut_copy = scratch.join("cut-copy.qcow2");
    std::fs::copy(&cut, &cut_copy).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(2 << 16)
        .unwrap();
    agent.domain.wait_records(10);
    let fell = agent.incremental(4, "b-5", "b-4", 3, &[]);
    assert_ok(&fell);
    assert!(
        fell.stdout.contains("INCREMENTAL_FALLBACK=true"),
        "{}",
        fell.stdout
    );
    assert!(fell.stderr.contains(&agent.vols[1]), "{}", fell.stderr);
    assert_eq!((agent.backing(4, 0), agent.backing(4, 1)), (None, None));
    std::fs::copy(&cut_copy, &cut).unwrap();
    agent.only_bitmap("b-5");
}

/// Paused: backed up like a running domain, and left paused; -q true does
/// not try to freeze a guest that runs no code.
fn a_paused_domain_is_backed_up_and_stays_paused(agent: &Agent) {
    let name = &agent.domain.name;
    must_virsh(&["suspend", name]);
    let paused = agent.incremental(5, "b-6", "b-5", 4, &["-q", "true"]);
    let state = must_virsh(&["domstate", name]).trim().to_string();
    must_virsh(&["resume", name]);
    assert_ok(&paused);
    assert_eq!(state, "paused");
    assert!(agent.backing(5, 0).is_some());
    agent.only_bitmap("b-6");
}

/// The parent's timestamp directory replaced by a symlink to the same
/// files in another VM's directory: never built on (it could be any VM's
/// data), a full.
fn a_parent_directory_that_is_a_symlink_is_never_built_on(agent: &Agent) {
    let real = agent.dir(5);
    let elsewhere = agent.nas.join("i-9-9-VM");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let moved = elsewhere.join("moved");
    std::fs::rename(&real, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &real).unwrap();
    agent.domain.wait_records(10);
    let fell = agent.incremental(6, "b-6x", "b-6", 5, &[]);
    std::fs::remove_file(&real).unwrap();
    std::fs::rename(&moved, &real).unwrap();
    std::fs::remove_dir(&elsewhere).unwrap();
    assert_ok(&fell);
    assert!(
        fell.stdout.contains("INCREMENTAL_FALLBACK=true"),
        "{}",
        fell.stdout
    );
    assert!(fell.stderr.contains("symlink"), "{}", fell.stderr);
    assert_eq!((agent.backing(6, 0), agent.backing(6, 1)), (None, None));
    agent.only_bitmap("b-6x");
}

/// The open PR's options: -c (compressed clusters), -b (MiB/s), --verify
/// (point 7); bad values refused; -e with a key others may read refused,
/// with mode 0600 LUKS files the same key file opens (point 8). The key
/// file.
fn compressed_limited_verified_and_encrypted_points(agent: &Agent, scratch: &Path) -> PathBuf {
    agent.domain.wait_records(10);
    let packed = agent.full(7, "b-7", &["-c", "-b", "50", "--verify"]);
    assert_ok(&packed);
    let root7 = agent.file(7, 0);
    assert!(
        crate::harness::has_compressed_clusters(&root7),
        "no compressed cluster in {}",
        root7.display()
    );
    for bad in [&["-b", "fast"][..], &["-c", "-e", "/nonexistent"][..]] {
        let refused = agent.full(8, "b-y", bad);
        assert_eq!(refused.code, Some(1), "{bad:?}: {}", refused.stdout);
        assert!(!agent.dir(8).exists());
    }
    let key = scratch.join("passphrase");
    std::fs::write(&key, "cloudstack passphrase").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let key_arg = key.to_str().unwrap();
    let loose = agent.backup(8, &["-e", key_arg]);
    assert_eq!(loose.code, Some(1), "{}", loose.stdout);
    assert!(loose.stdout.contains("mode 0644"), "{}", loose.stdout);
    assert!(!agent.dir(8).exists());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let refused = agent.incremental(8, "b-8", "b-7", 7, &["-e", key_arg]);
    assert_eq!(refused.code, Some(1), "{}", refused.stdout);
    assert_ok(&agent.backup(8, &["-e", key_arg, "--verify"]));
    assert_eq!(qemu_img_info(&agent.file(8, 0))["encrypted"], true);
    key
}

/// Stopped, with a raw disk: the copies are full (the marker, for an
/// incremental asked of a stopped VM), every other line a number, and no
/// bitmap on the raw disk is said on stderr.
fn a_stopped_domain_with_a_raw_disk_is_copied_whole(agent: &Agent) {
    let domain = agent.domain;
    domain.destroy();
    let disks = format!(
        "{},{}",
        domain.disks[0].display(),
        domain.disks[1].display()
    );
    let mut args = agent.args(
        &agent.point(9),
        &[
            "-M",
            "incremental",
            "--bitmap-new",
            "b-9",
            "--bitmap-parent",
            "b-6",
            "--parent-paths",
            &agent.parents(5),
        ],
    );
    let d = args.iter().position(|a| a == "-d").unwrap();
    args[d + 1] = disks;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stopped = nasbackup(&args);
    assert_ok(&stopped);
    assert!(
        stopped.stdout.contains("INCREMENTAL_FALLBACK=true"),
        "{}",
        stopped.stdout
    );
    assert!(
        stopped.stderr.contains("no bitmap b-9 was made"),
        "{}",
        stopped.stderr
    );
    let files: u64 = std::fs::read_dir(agent.dir(9))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert_eq!(stopped_size(&without_markers(&stopped.stdout)), files);
    assert!(qemu_img_info(&domain.disks[0]).to_string().contains("b-9"));
}

/// A LINSTOR volume still named by its legacy DRBD node (`/dev/drbdNNNN`,
/// VMs started before CloudStack moved to `by-res` paths) gets the volume
/// UUID of the udev `by-res` link that leads to the same device: the name
/// CloudStack's restore looks for. A loop device stands in for DRBD, with
/// a node and a link made as udev makes them.
#[test]
fn a_legacy_drbd_device_is_named_by_its_volume_uuid() {
    let _serial = one_at_a_time();
    for tool in ["du", "mount", "umount", "mknod"] {
        require(tool);
    }
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let dir = tempdir();
    let d = dir.path();
    let nas = d.join("nas");
    std::fs::create_dir(&nas).unwrap();
    let image = d.join("drbd.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5c 1M 64k"])
        .arg(&image));
    let looped = crate::harness::LoopDevice::new(&image);
    let rdev = std::fs::metadata(&looped.device).unwrap().rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    // A minor no real DRBD here uses, unique per test process.
    let node = PathBuf::from(format!("/dev/drbd{}", 60000 + std::process::id() % 5000));
    let uuid = format!("5a1d0c2e-dbd0-4000-8000-{:012}", std::process::id());
    let res = PathBuf::from(format!("/dev/drbd/by-res/cs-{uuid}"));
    struct Cleanup(Vec<PathBuf>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for p in &self.0 {
                let _ = std::fs::remove_file(p).or_else(|_| std::fs::remove_dir(p));
            }
        }
    }
    let _cleanup = Cleanup(vec![node.clone(), res.join("0"), res.clone()]);
    run(Command::new("mknod")
        .arg(&node)
        .args(["b", &major.to_string(), &minor.to_string()]));
    assert!(
        std::fs::metadata(&node)
            .unwrap()
            .file_type()
            .is_block_device()
    );
    std::fs::create_dir_all(&res).unwrap();
    std::os::unix::fs::symlink(
        format!("../../../{}", node.file_name().unwrap().to_string_lossy()),
        res.join("0"),
    )
    .unwrap();

    let nas_arg = nas.to_str().unwrap().to_string();
    let node_arg = node.to_str().unwrap().to_string();
    // The stopped VM's backup into `path`, the DRBD node its one disk.
    let stopped_backup = |path: &str, extra: &[&str]| {
        let mut args = vec![
            "-o", "backup", "-v", "i-9-9-VM", "-t", "none", "-s", &nas_arg, "-m", "bind", "-p",
            path, "-q", "false", "-d", &node_arg,
        ];
        args.extend(extra);
        nasbackup(&args)
    };
    let path = "i-9-9-VM/2026.11.29.00.00.00";
    let stopped = stopped_backup(path, &[]);
    assert_eq!(
        stopped.code,
        Some(0),
        "{}{}",
        stopped.stdout,
        stopped.stderr
    );
    let file = nas.join(path).join(format!("root.{uuid}.qcow2"));
    assert!(file.is_file(), "{:?}", walk_files(&nas));
    assert!(crate::harness::same_content(&image, "raw", &file, "qcow2"));
    // Every line a number, as the merged agent sums them...
    assert_eq!(
        stopped_size(&stopped.stdout),
        std::fs::metadata(&file).unwrap().len()
    );
    // ... and with --size-marker (for the open PR's agent) the total line
    // too.
    let path = "i-9-9-VM/2026.11.29.00.30.00";
    let marked = stopped_backup(path, &["--size-marker"]);
    assert_eq!(marked.code, Some(0), "{}{}", marked.stdout, marked.stderr);
    let total = std::fs::metadata(nas.join(path).join(format!("root.{uuid}.qcow2")))
        .unwrap()
        .len();
    assert!(
        marked
            .stdout
            .contains(&format!("BACKUP_SIZE_TOTAL={total}\n")),
        "{}",
        marked.stdout
    );

    // A DRBD node with no by-res link: refused, nothing left, rather than
    // a file named after the node.
    std::fs::remove_file(res.join("0")).unwrap();
    let path = "i-9-9-VM/2026.11.29.01.00.00";
    let refused = stopped_backup(path, &[]);
    assert_eq!(refused.code, Some(1), "{}", refused.stdout);
    assert!(
        refused.stdout.contains("LINSTOR volume UUID"),
        "{}",
        refused.stdout
    );
    assert!(!nas.join(path).exists());
}

/// A stopped VM's backup that fails on its second disk leaves no new
/// bitmap on the first (the bitmap goes on only once every copy is written
/// and checked), and nothing on the NAS.
#[test]
fn a_failed_stopped_backup_leaves_no_bitmap_on_the_sources() {
    let _serial = one_at_a_time();
    for tool in ["du", "mount", "umount"] {
        require(tool);
    }
    let dir = tempdir();
    let d = dir.path();
    let nas = d.join("nas");
    std::fs::create_dir(&nas).unwrap();
    let root = d.join("5a1d0c2e-0000-4000-8000-0000000000f1");
    crate::harness::create_qcow2(&root, 4 << 20, &[]);
    let disks = format!("{},{}", root.display(), d.join("missing-disk").display());
    let path = "i-7-7-VM/2026.11.29.02.00.00";
    let failed = nasbackup(&[
        "-o",
        "backup",
        "-v",
        "i-7-7-VM",
        "-t",
        "none",
        "-s",
        nas.to_str().unwrap(),
        "-m",
        "bind",
        "-p",
        path,
        "-q",
        "false",
        "-d",
        &disks,
        "-M",
        "full",
        "--bitmap-new",
        "b-fail",
    ]);
    assert_eq!(failed.code, Some(1), "{}{}", failed.stdout, failed.stderr);
    assert!(!qemu_img_info(&root).to_string().contains("b-fail"));
    assert!(!nas.join("i-7-7-VM").exists());
}

/// Failures remove only what the run made, and a delete names exactly
/// one backup directory: a NAS with two VMs' backups, and every refused
/// or failing run leaves it byte for byte (no domain needed: all of this
/// is decided before QEMU is asked anything).
#[test]
fn a_failed_run_or_a_bad_delete_leaves_the_nas_as_it_was() {
    let _serial = one_at_a_time();
    for tool in ["du", "mount", "umount"] {
        require(tool);
    }
    let dir = tempdir();
    let nas = dir.path().join("nas");
    let before = mount_points();
    let instance = "i-5-5-VM";
    for (vm, ts) in [
        (instance, "2026.11.28.05.00.00"),
        (instance, "2026.11.28.06.00.00"),
        ("i-6-6-VM", "2026.11.28.05.00.00"),
    ] {
        let d = nas.join(vm).join(ts);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("root.a.qcow2"), vm.as_bytes()).unwrap();
        std::fs::write(d.join("domain-config.xml"), ts.as_bytes()).unwrap();
    }
    let kept = snapshot(&nas);
    let backup = |path: &str, extra: &[&str]| {
        let args = backup_args("no-such-domain", &nas, path, extra);
        nasbackup(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // Into a directory holding a backup, into the VM's directory, through
    // `.` or `..`: refused before anything is written.
    let holding = format!("{instance}/2026.11.28.05.00.00");
    for path in [
        holding.as_str(),
        instance,
        &format!("{instance}/."),
        &format!("{instance}/../i-6-6-VM"),
        ".",
    ] {
        let refused = backup(path, &["-M", "full", "--bitmap-new", "b-x"]);
        assert_eq!(refused.code, Some(1), "{path}: {}", refused.stdout);
        assert_eq!(snapshot(&nas), kept, "{path}");
    }
    // A run that fails (no disks for a domain that is not running) in a
    // directory it made removes that directory, and only it; under a new
    // VM directory, the VM directory too.
    for path in [
        format!("{instance}/2026.11.28.07.00.00"),
        "no-such-domain/2026.11.28.05.00.00".to_string(),
    ] {
        let failed = backup(&path, &[]);
        assert_eq!(failed.code, Some(1), "{path}: {}", failed.stdout);
        assert!(failed.stdout.contains("no disk paths"), "{}", failed.stdout);
        assert_eq!(snapshot(&nas), kept, "{path}");
    }
    assert!(!nas.join("no-such-domain").exists());
    assert!(nas.join(instance).is_dir());

    // A delete names one backup directory, nothing above it.
    for path in [
        ".",
        instance,
        &format!("{instance}/."),
        &format!("{instance}/.."),
        &format!("./{instance}"),
        "",
    ] {
        let refused = delete(&nas, path);
        assert_eq!(refused.code, Some(1), "{path:?}: {}", refused.stdout);
        assert_eq!(snapshot(&nas), kept, "{path:?}");
    }
    // ... and removes it, printing what it removed as rm -v does.
    let deleted = delete(&nas, &holding);
    assert_ok(&deleted);
    assert_eq!(
        deleted.stdout.matches("removed").count(),
        3,
        "{}",
        deleted.stdout
    );
    assert!(!nas.join(&holding).exists());
    assert!(nas.join(instance).join("2026.11.28.06.00.00").is_dir());
    assert!(nas.join("i-6-6-VM").is_dir());

    // Symlinks planted on the NAS lead nowhere: an instance directory
    // linked to a host directory or to another VM's, a timestamp linked
    // to another VM's backup. Delete refuses them with nothing removed;
    // a backup through them writes nothing there.
    let host = dir.path().join("host");
    std::fs::create_dir_all(host.join("keep")).unwrap();
    std::fs::write(host.join("keep/file"), b"the host's").unwrap();
    std::os::unix::fs::symlink(&host, nas.join("i-7-7-VM")).unwrap();
    std::os::unix::fs::symlink("i-6-6-VM", nas.join("i-8-8-VM")).unwrap();
    std::os::unix::fs::symlink(
        "../i-6-6-VM/2026.11.28.05.00.00",
        nas.join(instance).join("2026.11.28.08.00.00"),
    )
    .unwrap();
    let kept = snapshot(&nas);
    let host_kept = snapshot(&host);
    for path in [
        "i-7-7-VM/keep".to_string(),
        "i-8-8-VM/2026.11.28.05.00.00".to_string(),
        format!("{instance}/2026.11.28.08.00.00"),
    ] {
        let refused = delete(&nas, &path);
        assert_eq!(refused.code, Some(1), "{path}: {}", refused.stdout);
        assert!(
            refused.stdout.contains("symlink"),
            "{path}: {}",
            refused.stdout
        );
        assert_eq!(snapshot(&nas), kept, "{path}");
        assert_eq!(snapshot(&host), host_kept, "{path}");
    }
    for path in [
        "i-7-7-VM/2026.11.28.09.00.00",
        "i-8-8-VM/2026.11.28.09.00.00",
    ] {
        let refused = backup(path, &["-M", "full", "--bitmap-new", "b-x"]);
        assert_eq!(refused.code, Some(1), "{path}: {}", refused.stdout);
        assert_eq!(snapshot(&nas), kept, "{path}");
        assert_eq!(snapshot(&host), host_kept, "{path}");
    }
    // A three-part path, which no delete would remove, is no backup path.
    let refused = backup(
        &format!("{instance}/x/2026.11.28.09.00.00"),
        &["-M", "full", "--bitmap-new", "b-x"],
    );
    assert_eq!(refused.code, Some(1), "{}", refused.stdout);
    assert!(
        refused.stdout.contains("Bad backup path"),
        "{}",
        refused.stdout
    );
    assert_eq!(snapshot(&nas), kept);
    nothing_mounted(&before);
}

/// The script's stats operation and its answer to bad options, with no
/// domain.
#[test]
fn stats_and_bad_options_answer_as_the_script_does() {
    let _serial = one_at_a_time();
    for tool in ["mount", "umount"] {
        require(tool);
    }
    let dir = tempdir();
    let nas = dir.path().join("nas");
    std::fs::create_dir(&nas).unwrap();
    let nas_arg = nas.to_str().unwrap().to_string();
    let before = mount_points();
    // stats: the mount point, then "total used" in 1K blocks.
    let stats = nasbackup(&["-o", "stats", "-t", "none", "-s", &nas_arg, "-m", "bind"]);
    assert_eq!(stats.code, Some(0), "{}{}", stats.stdout, stats.stderr);
    let lines: Vec<&str> = stats.stdout.trim().lines().collect();
    assert_eq!(lines.len(), 2, "{}", stats.stdout);
    assert!(lines[0].starts_with(&format!("{}/csbackup.", run_tmp().display())));
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
    nothing_mounted(&before);
}

/// A stopped VM's backup (`-d`, the domain not running): a full copy of
/// each image, one byte count per line (what the merged agent sums), the
/// new bitmap pre-seeded on the qcow2 sources, each copy equal to its
/// image; then the agent's delete of that backup directory.
#[test]
fn a_stopped_vm_is_copied_whole_and_its_backup_deleted() {
    let _serial = one_at_a_time();
    for tool in ["du", "mount", "umount", "qemu-io"] {
        require(tool);
    }
    let dir = tempdir();
    let d = dir.path();
    let nas = d.join("nas");
    std::fs::create_dir(&nas).unwrap();
    let nas_arg = nas.to_str().unwrap().to_string();
    let before = mount_points();
    let vols = [
        "5a1d0c2e-0000-4000-8000-0000000000c1",
        "5a1d0c2e-0000-4000-8000-0000000000c2",
    ];
    let disks: Vec<PathBuf> = vols.iter().map(|v| d.join(v)).collect();
    for (i, disk) in disks.iter().enumerate() {
        crate::harness::create_qcow2(disk, 8 << 20, &[]);
        run(Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                &format!("write -P {} 1M 256k", 0x31 + i),
            ])
            .arg(disk));
    }
    let other = nas.join("other-vm/2026.11.29.03.00.00");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("root.x.qcow2"), b"kept").unwrap();
    let path = "i-8-8-VM/2026.11.29.03.00.00";
    let list = format!("{},{}", disks[0].display(), disks[1].display());
    let stopped = nasbackup(&[
        "-o",
        "backup",
        "-v",
        "i-8-8-VM",
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
        &list,
        "-M",
        "full",
        "--bitmap-new",
        "backup-20000",
    ]);
    assert_eq!(
        stopped.code,
        Some(0),
        "{}{}",
        stopped.stdout,
        stopped.stderr
    );
    let dest = nas.join(path);
    let files: u64 = std::fs::read_dir(&dest)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert_eq!(stopped_size(&stopped.stdout), files);
    assert_eq!(stopped.stdout.trim().lines().count(), 2);
    for (i, disk) in disks.iter().enumerate() {
        assert!(qemu_img_info(disk).to_string().contains("backup-20000"));
        let role = if i == 0 { "root" } else { "datadisk" };
        let copy = dest.join(format!("{role}.{}.qcow2", vols[i]));
        assert!(
            crate::harness::same_content(disk, "qcow2", &copy, "qcow2"),
            "{} differs from {}",
            copy.display(),
            disk.display()
        );
    }
    nothing_mounted(&before);

    // delete: the backup directory goes, nothing else.
    let deleted = nasbackup(&[
        "-o", "delete", "-t", "none", "-s", &nas_arg, "-m", "bind", "-p", path,
    ]);
    assert_eq!(
        deleted.code,
        Some(0),
        "{}{}",
        deleted.stdout,
        deleted.stderr
    );
    assert!(!dest.exists());
    assert!(nas.join("i-8-8-VM").is_dir());
    assert_eq!(std::fs::read(other.join("root.x.qcow2")).unwrap(), b"kept");
    nothing_mounted(&before);
}
