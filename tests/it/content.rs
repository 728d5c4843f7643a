//! Incrementals by content: a volume whose bitmap is lost is read whole
//! and only the clusters whose content changed since its last backup are
//! stored. Judged by the raw models (`qemu-img compare` of every point),
//! `qemu-img check`, and what each file holds (`bytes_written`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Disk, Kind, Qemu, Rng, Vm, bitback, create_qcow2, run, tempdir};

const MIB: u64 = 1 << 20;
/// Named, so that the suite's run over the file path (`BITBACK_DATA_PATH`)
/// does not change what these tests are about.
const NBD: [&str; 2] = ["--data-path", "nbd"];

/// A VM of a raw volume (drive0) and a qcow2 v3 volume (drive1).
fn raw_and_v3(d: &Path, size: u64) -> Vm {
    let raw = d.join("raw.img");
    std::fs::File::create(&raw).unwrap().set_len(size).unwrap();
    let v3 = d.join("v3.qcow2");
    create_qcow2(&v3, size, &[]);
    let disks = vec![
        Disk::with_format("raw", "drive0", &raw, "raw", ""),
        Disk::new("v3", "drive1", &v3),
    ];
    Vm::from_disks(Kind::MachineNone, d, disks, &[size, size])
}

/// Volume `i`'s record in manifest `m`.
fn record(m: &Value, i: usize) -> &Value {
    &m["volumes"][i]
}

/// Checks how volume `i`'s changes were found, and that the file stores
/// at most `most` bytes of data.
fn found(m: &Value, i: usize, how: &str, most: u64) {
    let v = record(m, i);
    assert_eq!(v["changes"], how, "volume {i}: {v:#}");
    let stored = v["bytes_written"].as_u64().unwrap();
    assert!(stored <= most, "volume {i} stores {stored} bytes: {v:#}");
}

/// A clean restart loses the raw volume's bitmap (by content), not the
/// v3 one's (by bitmap); a SIGKILL of QEMU loses the v3 bitmap too (both
/// by content); after each, the next backup is by
/// bitmap again. Each content incremental stores about what changed
/// (zero clusters where data was zeroed), reads the data whole, and every
/// point equals its model.
#[test]
fn a_restart_and_a_killed_qemu_cost_a_read_not_a_full() {
    let dir = tempdir();
    let mut vm = raw_and_v3(dir.path(), 24 * MIB);
    let mut rng = Rng::from_env();
    for i in 0..2 {
        vm.write(i, 0, 8 * MIB, 0x11 + i as u8);
        vm.write(i, 12 * MIB, 4 * MIB, 0x21 + i as u8);
    }
    vm.random_writes(&mut rng, 10);
    let full = vm.backup(&NBD);
    assert_eq!(full["kind"], "full");

    // A clean restart.
    vm.quit();
    vm.start();
    vm.write(0, 2 * MIB, 256 << 10, 0x31);
    vm.zero(0, 13 * MIB, 128 << 10);
    vm.write(1, 3 * MIB, 256 << 10, 0x32);
    let after = vm.backup(&NBD);
    assert_eq!(after["kind"], "incremental", "{after:#}");
    found(&after, 0, "content", 256 << 10);
    found(&after, 1, "bitmap", 256 << 10);
    let reason = record(&after, 0)["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("incremental by content") && reason.contains("QEMU restarted"),
        "{reason}"
    );
    // The whole volume's data was read to find them.
    let read = record(&after, 0)["bytes_read"].as_u64().unwrap();
    assert!(read >= 10 * MIB, "{read} bytes read: {after:#}");
    assert!(record(&after, 0)["backing"].is_string());

    vm.write(0, 20 * MIB, 64 << 10, 0x41);
    let again = vm.backup(&NBD);
    found(&again, 0, "bitmap", 64 << 10);

    // QEMU dies: the v3 bitmap is left in use, the raw one is gone.
    vm.write(0, 5 * MIB, 64 << 10, 0x51);
    vm.write(1, 6 * MIB, 192 << 10, 0x52);
    // A guest flushes what it needs kept; a kill loses qcow2 metadata
    // not yet written (and with it data the model holds).
    vm.qemu().qemu_io("drive0", "flush");
    vm.qemu().qemu_io("drive1", "flush");
    vm.kill();
    vm.start();
    vm.write(1, 14 * MIB, 64 << 10, 0x53);
    let killed = vm.backup(&NBD);
    assert_eq!(killed["kind"], "incremental", "{killed:#}");
    found(&killed, 0, "content", 64 << 10);
    found(&killed, 1, "content", 256 << 10);
    // The checkpoint the last backup added was never stored in the image
    // (QEMU stores persistent bitmaps when it closes it): missing, or in
    // use (inconsistent) had it been stored before.
    let reason = record(&killed, 1)["reason"].as_str().unwrap();
    assert!(
        reason.contains("missing") || reason.contains("inconsistent"),
        "{reason}"
    );

    vm.random_writes(&mut rng, 6);
    let next = vm.backup(&NBD);
    found(&next, 0, "bitmap", 24 * MIB);
    found(&next, 1, "bitmap", 24 * MIB);
    vm.quit();
    vm.check_files();
    vm.check_all_points();
    let verified = bitback(&["verify", "--repo", vm.repo.to_str().unwrap()]);
    assert_eq!(verified.code, Some(0), "{}", verified.stderr);
}

/// A map changed on the NAS is never trusted: that volume is a full that
/// says why; a resized volume is a full; where QEMU writes the files
/// (`--data-path file`) a lost bitmap is a full that says why it is not
/// found by content.
#[test]
fn maps_that_do_not_verify_resizes_and_the_file_path_give_fulls() {
    let dir = tempdir();
    let mut vm = raw_and_v3(dir.path(), 16 * MIB);
    vm.write(0, 0, 4 * MIB, 0x61);
    vm.write(1, 0, 4 * MIB, 0x62);
    let full = vm.backup(&NBD);
    let map = vm
        .repo
        .join(record(&full, 0)["cluster_map"]["file"].as_str().unwrap());
    let mut bytes = std::fs::read(&map).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 0x40;
    std::fs::write(&map, &bytes).unwrap();

    vm.quit();
    vm.start();
    vm.write(0, MIB, 64 << 10, 0x63);
    let tampered = vm.backup(&NBD);
    let v = record(&tampered, 0);
    assert_eq!(v["changes"], "full", "{v:#}");
    let reason = v["reason"].as_str().unwrap();
    assert!(
        reason.contains("not by content") && reason.contains("not the one written"),
        "{reason}"
    );

    // Where QEMU writes the files there is no content to compare.
    vm.quit();
    vm.start();
    vm.write(0, 2 * MIB, 64 << 10, 0x64);
    let file_path = vm.backup(&["--data-path", "file"]);
    let reason = record(&file_path, 0)["reason"].as_str().unwrap();
    assert_eq!(record(&file_path, 0)["changes"], "full");
    assert!(
        reason.contains("not by content: QEMU writes the files"),
        "{reason}"
    );

    // That full has no map (QEMU wrote it): the next lost bitmap is a
    // full too, saying so; then a full by bitback has one again.
    vm.quit();
    vm.start();
    let no_map = vm.backup(&NBD);
    let reason = record(&no_map, 0)["reason"].as_str().unwrap();
    assert!(reason.contains("has no cluster map"), "{reason}");

    // A resized volume is a full.
    vm.qemu().must(
        "block_resize",
        serde_json::json!({ "node-name": "drive0", "size": 20 * MIB }),
    );
    vm.models[0].bytes.resize(20 * MIB as usize, 0);
    vm.write(0, 18 * MIB, 64 << 10, 0x65);
    let resized = vm.backup(&NBD);
    let reason = record(&resized, 0)["reason"].as_str().unwrap();
    assert_eq!(record(&resized, 0)["changes"], "full");
    assert!(reason.contains("resized"), "{reason}");
    vm.quit();
    vm.check_files();
    vm.check_all_points();
}

/// A stopped raw image (backed up through qemu-storage-daemon, where it
/// never has a bitmap) is an incremental by content each time.
#[test]
fn a_stopped_raw_image_is_an_incremental_by_content() {
    let dir = tempdir();
    let mut vm = raw_and_v3(dir.path(), 8 * MIB);
    vm.write(0, 0, 3 * MIB, 0x71);
    vm.write(1, MIB, 2 * MIB, 0x72);
    vm.backup(&NBD);
    vm.quit();
    let raw = dir.path().join("raw.img");
    let images = [
        format!("drive0={}", raw.display()),
        format!("drive1={}", dir.path().join("v3.qcow2").display()),
    ];
    for (round, at) in [(0u8, MIB), (1, 5 * MIB)] {
        run(Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                &format!("write -P {} {at} 131072", 0x73 + round),
            ])
            .arg(&raw));
        vm.models[0].bytes[at as usize..at as usize + 131072].fill(0x73 + round);
        let m = bitback(&[
            "backup",
            "--repo",
            vm.repo.to_str().unwrap(),
            "--vm",
            "vm1",
            "--image",
            &images[0],
            "--image",
            &images[1],
            "--json",
            "--data-path",
            "nbd",
        ])
        .json();
        assert_eq!(m["kind"], "incremental", "{m:#}");
        found(&m, 0, "content", 128 << 10);
        vm.snapshot(m["id"].as_str().unwrap());
    }
    vm.check_files();
    vm.check_all_points();
}

/// Migrates `vm` to a new QEMU in `dir` on the same images (shared
/// storage), with QEMU's `dirty-bitmaps` migration capability on both
/// sides when `bitmaps`; the source quits, and the destination runs.
fn migrate(vm: &mut Vm, dir: &Path, bitmaps: bool) {
    std::fs::create_dir(dir).unwrap();
    let channel = dir.join("migration.sock");
    let incoming = ["-incoming".to_string(), "defer".to_string()];
    let destination = Qemu::start_with(Kind::MachineNone, dir, &vm.disks, &incoming);
    let source = vm.qemu.take().unwrap();
    let capabilities = json!({"capabilities": [{"capability": "dirty-bitmaps", "state": bitmaps}]});
    for side in [&source, &destination] {
        side.must("migrate-set-capabilities", capabilities.clone());
    }
    let uri = format!("unix:{}", channel.display());
    destination.must("migrate-incoming", json!({ "uri": uri }));
    source.must("migrate", json!({ "uri": uri }));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = source.must("query-migrate", json!({}));
        match status["status"].as_str() {
            Some("completed") => break,
            Some("failed" | "cancelled") => panic!("migration: {status}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "migration: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    source.quit();
    let deadline = Instant::now() + Duration::from_secs(30);
    while destination.must("query-status", json!({}))["status"] != "running" {
        assert!(Instant::now() < deadline, "the destination does not run");
        std::thread::sleep(Duration::from_millis(50));
    }
    vm.qemu = Some(destination);
}

/// A VM migrated to another QEMU on the same storage (as libvirt migrates
/// with shared storage): the v3 volume's persistent bitmap travels in its
/// image (stored as the source lets the image go, loaded as the
/// destination takes it), so its next backup is by bitmap and holds the
/// writes made on both sides; the raw volume's, in the source's memory,
/// does not travel, and its changes are found by content. Migrated again
/// with QEMU's `dirty-bitmaps` capability, both bitmaps travel in the
/// migration stream: both by bitmap. Every point equals its model.
#[test]
fn a_migrated_vm_keeps_its_v3_bitmap_and_finds_the_raw_changes_by_content() {
    let dir = tempdir();
    let mut vm = raw_and_v3(dir.path(), 16 * MIB);
    for i in 0..2 {
        vm.write(i, 0, 6 * MIB, 0x61 + i as u8);
    }
    assert_eq!(vm.backup(&NBD)["kind"], "full");
    // Written on the source after the full, then on the destination.
    vm.write(0, MIB, 128 << 10, 0x71);
    vm.write(1, 2 * MIB, 192 << 10, 0x72);
    migrate(&mut vm, &dir.path().join("second"), false);
    vm.write(0, 9 * MIB, 64 << 10, 0x81);
    vm.write(1, 10 * MIB, 64 << 10, 0x82);
    let migrated = vm.backup(&NBD);
    assert_eq!(migrated["kind"], "incremental", "{migrated:#}");
    found(&migrated, 0, "content", 192 << 10);
    found(&migrated, 1, "bitmap", 256 << 10);
    assert!(record(&migrated, 1)["bytes_written"].as_u64().unwrap() >= 256 << 10);

    vm.write(0, 12 * MIB, 64 << 10, 0x91);
    vm.write(1, 13 * MIB, 64 << 10, 0x92);
    migrate(&mut vm, &dir.path().join("third"), true);
    vm.write(0, 14 * MIB, 64 << 10, 0xa1);
    vm.write(1, 15 * MIB, 64 << 10, 0xa2);
    let next = vm.backup(&NBD);
    found(&next, 0, "bitmap", 128 << 10);
    found(&next, 1, "bitmap", 128 << 10);
    for i in 0..2 {
        assert_eq!(record(&next, i)["bytes_written"], 128 << 10, "{next:#}");
    }
    vm.quit();
    vm.check_files();
    vm.check_all_points();
}
