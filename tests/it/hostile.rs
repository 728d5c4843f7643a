//! Hostile input and a hostile world: garbled repository files, links out
//! of the repository, a full target filesystem, QEMU dying mid-backup.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::harness::Vm;
use crate::harness::{Tmpfs, bitback, tempdir};

const MIB: u64 = 1 << 20;

/// Every file under `dir` with its bytes, to prove nothing changed.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != ".lock") {
                let bytes = std::fs::read(&p).unwrap();
                out.push((p, bytes));
            }
        }
    }
    out.sort();
    out
}

/// Every named bitmap in the VM.
fn bitmap_names(vm: &Vm) -> Vec<String> {
    vm.qemu()
        .must("query-named-block-nodes", serde_json::json!({"flat": true}))
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b["name"].as_str().map(str::to_string))
        .collect()
}

fn backup_run(vm: &Vm) -> crate::harness::Run {
    bitback(&[
        "backup",
        "--qmp",
        vm.qemu().qmp.to_str().unwrap(),
        "--repo",
        vm.repo.to_str().unwrap(),
        "--vm",
        "vm1",
    ])
}

#[test]
fn garbled_state_and_manifests_are_clear_errors_that_lose_nothing() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[4 * MIB]);
    vm.write(0, 0, MIB, 0x11);
    let first = vm.backup(&[]);
    vm.write(0, MIB, MIB, 0x12);
    let second = vm.backup(&[]);
    let state = vm.repo.join("vm1/state.json");
    let manifest = vm
        .repo
        .join("vm1")
        .join(second["id"].as_str().unwrap())
        .join("manifest.json");
    let good_state = std::fs::read(&state).unwrap();
    let good_manifest = std::fs::read(&manifest).unwrap();

    let cases: Vec<(&Path, Vec<u8>, &str)> = vec![
        (&state, b"{\"schema\": 1, \"vm\": ".to_vec(), "state file"),
        (&state, b"\x00\x01garbage".to_vec(), "state file"),
        (&state, br#"{"schema":1,"vm":"other","active_checkpoint":null,"last_backup":null,"volumes":[]}"#.to_vec(), "belongs to vm"),
        (&state, br#"{"schema":9,"vm":"vm1","active_checkpoint":null,"last_backup":null,"volumes":[]}"#.to_vec(), "schema 9"),
        (&manifest, good_manifest[..good_manifest.len() / 2].to_vec(), "manifest"),
        (
            &manifest,
            String::from_utf8(good_manifest.clone())
                .unwrap()
                .replace(
                    &format!("vm1/{}/drive0.qcow2", second["id"].as_str().unwrap()),
                    "../../../etc/passwd",
                )
                .into_bytes(),
            "has file",
        ),
        (
            &manifest,
            String::from_utf8(good_manifest.clone())
                .unwrap()
                .replace("\"name\": \"drive0\"", "\"name\": \"../x\"")
                .into_bytes(),
            "not allowed",
        ),
    ];
    for (path, bytes, words) in cases {
        std::fs::write(path, &bytes).unwrap();
        let before = snapshot(&vm.repo);
        let bitmaps_before = bitmap_names(&vm);
        let run = backup_run(&vm);
        assert_eq!(run.code, Some(2), "{words}: {}", run.stderr);
        assert!(run.stderr.contains(words), "{words}: {}", run.stderr);
        assert!(
            run.stderr
                .contains(path.file_name().unwrap().to_str().unwrap()),
            "{}",
            run.stderr
        );
        assert_eq!(
            snapshot(&vm.repo),
            before,
            "{words}: the repository changed"
        );
        assert_eq!(
            bitmap_names(&vm),
            bitmaps_before,
            "{words}: the bitmaps changed"
        );
        assert_eq!(bitmaps_before.len(), 1);
        std::fs::write(&state, &good_state).unwrap();
        std::fs::write(&manifest, &good_manifest).unwrap();
    }
    // Mended, everything carries on incrementally.
    vm.write(0, 2 * MIB, 4096, 0x13);
    assert_eq!(vm.backup(&[])["kind"], "incremental");
    vm.quit();
    vm.check_all_points();
    let _ = first;
}

#[test]
fn links_out_of_the_repository_are_refused() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[4 * MIB]);
    vm.write(0, 0, MIB, 0x21);
    let m = vm.backup(&[]);
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();

    // A VM directory that is a link elsewhere.
    std::os::unix::fs::symlink(&elsewhere, vm.repo.join("vm2")).unwrap();
    let run = bitback(&[
        "backup",
        "--qmp",
        vm.qemu().qmp.to_str().unwrap(),
        "--repo",
        vm.repo.to_str().unwrap(),
        "--vm",
        "vm2",
    ]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("is a symlink"), "{}", run.stderr);
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "wrote outside the repository"
    );

    // A backup file replaced by a link to a file outside.
    let file = vm.repo.join(m["volumes"][0]["file"].as_str().unwrap());
    let outside = elsewhere.join("disk.qcow2");
    std::fs::rename(&file, &outside).unwrap();
    std::os::unix::fs::symlink(&outside, &file).unwrap();
    let verified = bitback(&["verify", "--repo", vm.repo.to_str().unwrap(), "--vm", "vm1"]);
    assert_eq!(verified.code, Some(1));
    assert!(
        verified.stdout.contains("is a symlink"),
        "{}",
        verified.stdout
    );
    let restored = bitback(&[
        "restore",
        "--repo",
        vm.repo.to_str().unwrap(),
        "--vm",
        "vm1",
        "--no-verify",
        "--output",
        dir.path().join("r.raw").to_str().unwrap(),
    ]);
    assert_eq!(restored.code, Some(1), "{}", restored.stderr);
    assert!(
        restored.stderr.contains("is a symlink"),
        "{}",
        restored.stderr
    );
    vm.quit();
}

#[test]
fn a_full_target_filesystem_fails_cleanly_and_the_next_backup_is_right() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[32 * MIB]);
    let mount = dir.path().join("small");
    let tmpfs = Tmpfs::mount(&mount, "8M");
    vm.repo = mount.join("repo");
    vm.write(0, 0, 20 * MIB, 0x31);
    let failed = backup_run(&vm);
    assert_eq!(failed.code, Some(1), "{}", failed.stderr);
    assert!(
        failed.stderr.contains("No space left on device"),
        "{}",
        failed.stderr
    );
    // The first backup of the VM failed: its directory is gone again.
    let leftovers: Vec<String> = std::fs::read_dir(vm.repo.join("vm1"))
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let names = bitmap_names(&vm);
    assert!(names.is_empty(), "{names:?}");

    // Space freed: the next backup is right.
    tmpfs.resize("96M");
    let m = vm.backup(&[]);
    assert_eq!(m["kind"], "full");
    vm.write(0, 24 * MIB, MIB, 0x32);
    assert_eq!(vm.backup(&[])["kind"], "incremental");
    vm.quit();
    vm.check_all_points();
}

/// QEMU killed mid-backup: the run fails, the restarted QEMU's bitmap is
/// inconsistent (by content, or a full where QEMU writes the files), and
/// every point is right.
#[test]
fn qemu_killed_mid_backup_then_restarted_loses_the_bitmap_and_keeps_every_point() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[16 * MIB]);
    vm.write(0, 0, MIB, 0x41);
    vm.backup(&[]);
    vm.quit();
    vm.start();
    vm.write(0, 2 * MIB, 8 * MIB, 0x42);
    vm.qemu().qemu_io("drive0", "flush");
    let slow = Command::new(env!("CARGO_BIN_EXE_bitback"))
        .args(["backup", "--qmp", vm.qemu().qmp.to_str().unwrap(), "--repo"])
        .arg(&vm.repo)
        .args(["--vm", "vm1", "--rate-limit", "64K"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let jobs = vm.qemu().must("query-jobs", Value::Null);
        if !jobs.as_array().unwrap().is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no job started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    vm.qemu.as_mut().unwrap().kill();
    vm.qemu = None;
    let out = slow.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("QEMU closed the connection"), "{stderr}");
    vm.start();
    let m = vm.backup(&[]);
    assert_eq!(m["kind"], crate::harness::lost_bitmap_kind());
    assert!(
        m["reason"].as_str().unwrap().contains("inconsistent"),
        "{m:#}"
    );
    vm.quit();
    vm.check_all_points();
}
