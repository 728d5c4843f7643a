//! `bitback inspect` against real QEMU processes of every kind.

use std::path::Path;

use serde_json::{Value, json};

use crate::harness::{
    Disk, Kind, Qemu, bitback, create_qcow2, free_tcp_port, qemu_img_info, tempdir,
};

const MIB: u64 = 1 << 20;

fn two_disks(dir: &Path) -> Vec<Disk> {
    let a = dir.join("a.qcow2");
    let b = dir.join("b.qcow2");
    create_qcow2(&a, 64 * MIB, &[]);
    create_qcow2(&b, 32 * MIB, &["-o", "cluster_size=4096"]);
    vec![
        Disk::new("disk0", "drive0", &a),
        Disk::new("disk1", "drive1", &b),
    ]
}

fn inspect_json(qemu: &Qemu) -> Value {
    bitback(&["inspect", "--qmp", qemu.qmp.to_str().unwrap(), "--json"]).json()
}

fn volume<'a>(info: &'a Value, name: &str) -> &'a Value {
    info["volumes"]
        .as_array()
        .expect("volumes is an array")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name} in {info:#}"))
}

fn bitmap<'a>(volume: &'a Value, name: &str) -> &'a Value {
    volume["bitmaps"]
        .as_array()
        .expect("bitmaps is an array")
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no bitmap {name} in {volume:#}"))
}

/// Checks the facts qemu-img can tell independently of QEMU and bitback.
fn assert_matches_image(volume: &Value, disk: &Disk) {
    let info = qemu_img_info(&disk.image);
    assert_eq!(volume["virtual_size"], info["virtual-size"], "{volume:#}");
    assert_eq!(volume["format"], info["format"], "{volume:#}");
    assert_eq!(
        volume["image_file"],
        disk.image.to_str().unwrap(),
        "{volume:#}"
    );
    assert_eq!(volume["node_name"], disk.node.as_str(), "{volume:#}");
    assert_eq!(volume["read_only"], false);
}

/// Writes that dirty a known number of bitmap chunks, the same on every
/// kind of QEMU: 64 KiB at 1 MiB plus 4 KiB at 8 MiB, which at a 64 KiB
/// granularity dirties two chunks.
fn dirty_known_ranges(qemu: &Qemu, node: &str) {
    qemu.qemu_io(node, "write -P 0x55 1M 64k");
    qemu.qemu_io(node, "write -P 0xaa 8M 4k");
}

fn check_two_volumes(kind: Kind) {
    let dir = tempdir();
    let disks = two_disks(dir.path());
    let qemu = Qemu::start(kind, dir.path(), &disks);
    qemu.add_bitmap("drive0", "bm0", true);
    qemu.must(
        "block-dirty-bitmap-add",
        json!({"node": "drive1", "name": "off", "persistent": false, "granularity": 4096, "disabled": true}),
    );
    dirty_known_ranges(&qemu, "drive0");
    dirty_known_ranges(&qemu, "drive1");

    let info = inspect_json(&qemu);
    let names = crate::harness::names(&info["volumes"]);
    let expected = match kind {
        Kind::Pc => ["disk0", "disk1"],
        _ => ["drive0", "drive1"],
    };
    assert_eq!(names, expected, "{info:#}");
    assert_eq!(info["version"]["major"], crate::harness::qemu_major());

    let v0 = volume(&info, expected[0]);
    assert_matches_image(v0, &disks[0]);
    let bm0 = bitmap(v0, "bm0");
    assert_eq!(
        bm0,
        &json!({
            "name": "bm0", "recording": true, "busy": false, "persistent": true,
            "inconsistent": false, "granularity": 65536, "count": 2 * 65536,
            "owner": null,
        })
    );
    let v1 = volume(&info, expected[1]);
    assert_matches_image(v1, &disks[1]);
    let off = bitmap(v1, "off");
    assert_eq!(
        off,
        &json!({
            "name": "off", "recording": false, "busy": false, "persistent": false,
            "inconsistent": false, "granularity": 4096, "count": 0,
            "owner": null,
        })
    );

    let table = bitback(&["inspect", "--qmp", qemu.qmp.to_str().unwrap()]);
    assert_eq!(table.code, Some(0), "{}", table.stderr);
    assert!(
        table.stdout.contains("bm0") && table.stdout.contains(expected[1]),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("128 KiB"), "{}", table.stdout);
}

#[test]
fn inspect_machine_none_reports_named_format_nodes_and_bitmaps() {
    check_two_volumes(Kind::MachineNone);
}

#[test]
fn inspect_pc_names_volumes_by_qdev_id() {
    check_two_volumes(Kind::Pc);
}

#[test]
fn inspect_storage_daemon_has_no_run_state() {
    check_two_volumes(Kind::StorageDaemon);
    let dir = tempdir();
    let disks = two_disks(dir.path());
    let qemu = Qemu::start(Kind::StorageDaemon, dir.path(), &disks);
    let info = inspect_json(&qemu);
    assert_eq!(info["status"], Value::Null);
    assert_eq!(info["running"], Value::Null);
}

#[test]
fn inspect_pc_without_disks_has_run_state_and_no_volumes() {
    let dir = tempdir();
    let vm = Qemu::start(Kind::Pc, dir.path(), &[]);
    let info = inspect_json(&vm);
    assert_eq!(info["status"], "prelaunch");
    assert_eq!(info["running"], false);
    assert_eq!(info["volumes"], json!([]));
}

/// During a backup QEMU stacks a copy-before-write filter on the source
/// and adds a target node; neither may change what the volumes are.
fn check_sees_through_backup_job(kind: Kind) {
    let dir = tempdir();
    let disks = two_disks(dir.path());
    let target = dir.path().join("target.qcow2");
    create_qcow2(&target, 64 * MIB, &[]);
    let qemu = Qemu::start(kind, dir.path(), &disks);
    qemu.add_bitmap("drive0", "bm0", true);
    qemu.qemu_io("drive0", "write -P 0x11 0 4M");
    qemu.must(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "target0",
               "file": {"driver": "file", "filename": target}}),
    );
    // 1 byte/s: the job stays running while we look.
    qemu.must(
        "blockdev-backup",
        json!({"job-id": "slow", "device": "drive0", "target": "target0", "sync": "bitmap",
               "bitmap": "bm0", "bitmap-mode": "never", "speed": 1, "filter-node-name": "cbw0"}),
    );
    let info = inspect_json(&qemu);
    let names = crate::harness::names(&info["volumes"]);
    let first = if kind == Kind::Pc { "disk0" } else { "drive0" };
    assert_eq!(names.len(), 2, "{info:#}");
    assert_eq!(names[0], first, "{info:#}");
    let v0 = volume(&info, first);
    assert_eq!(v0["node_name"], "drive0", "{v0:#}");
    assert_eq!(v0["format"], "qcow2", "{v0:#}");
    let bm0 = bitmap(v0, "bm0");
    assert_eq!(bm0["busy"], true, "{bm0:#}");
    assert_eq!(bm0["count"], 4 * MIB, "{bm0:#}");
    assert_eq!(v0["bitmaps"].as_array().unwrap().len(), 1, "{v0:#}");
    qemu.must("block-job-cancel", json!({"device": "slow", "force": true}));
}

#[test]
fn inspect_during_backup_job_pc() {
    check_sees_through_backup_job(Kind::Pc);
}

#[test]
fn inspect_during_backup_job_machine_none() {
    check_sees_through_backup_job(Kind::MachineNone);
}

#[test]
fn inspect_missing_socket_is_one_line_and_exit_2() {
    let dir = tempdir();
    let missing = dir.path().join("nothing.sock");
    let run = bitback(&["inspect", "--qmp", missing.to_str().unwrap()]);
    assert_eq!(run.code, Some(2));
    assert!(run.stdout.is_empty());
    assert!(run.stderr.contains("cannot connect"), "{}", run.stderr);
    assert!(run.stderr.contains("nothing.sock"), "{}", run.stderr);
    assert!(
        run.stderr.contains("hint: is QEMU running with -qmp"),
        "{}",
        run.stderr
    );
}

#[test]
fn inspect_bad_tcp_address_is_exit_2() {
    let run = bitback(&["inspect", "--qmp", "tcp:localhost"]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("tcp:HOST:PORT"), "{}", run.stderr);
}

#[test]
fn inspect_over_tcp() {
    let dir = tempdir();
    let disks = two_disks(dir.path());
    let port = free_tcp_port();
    let qemu = Qemu::start_with(
        Kind::MachineNone,
        dir.path(),
        &disks,
        &[
            "-qmp".into(),
            format!("tcp:127.0.0.1:{port},server=on,wait=off"),
        ],
    );
    let info = bitback(&[
        "inspect",
        "--qmp",
        &format!("tcp:127.0.0.1:{port}"),
        "--json",
    ])
    .json();
    assert_eq!(info["volumes"].as_array().unwrap().len(), 2, "{info:#}");
    drop(qemu);
}
