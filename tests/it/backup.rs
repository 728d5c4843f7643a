//! `bitback backup` against real QEMU. Every backup point is judged against
//! raw model files the test writes in parallel with the guest's writes,
//! with `qemu-img compare` following each chain.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{
    Disk, Kind, Model, Qemu, Rng, Vm, bitback, create_qcow2, run, same_content, tempdir,
};

const MIB: u64 = 1 << 20;

fn bitmaps(qemu: &Qemu, node: &str) -> Vec<Value> {
    qemu.must("query-named-block-nodes", json!({"flat": true}))
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["node-name"] == node)
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .filter(|b| b.get("name").is_some())
        .collect()
}

fn bitmap_names(qemu: &Qemu, node: &str) -> Vec<String> {
    bitmaps(qemu, node)
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn two_volumes_full_and_five_incrementals_match_raw_models() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[24 * MIB, 8 * MIB]);
    let mut rng = Rng::from_env();
    let mut manifests = Vec::new();
    for round in 0..6 {
        vm.random_writes(&mut rng, 12);
        let m = vm.backup(&[]);
        assert_eq!(
            m["kind"],
            if round == 0 { "full" } else { "incremental" },
            "{m:#}"
        );
        assert_eq!(m["position"], round);
        assert_eq!(m["vm"], "vm1");
        assert_eq!(m["volumes"].as_array().unwrap().len(), 2);
        for (i, v) in m["volumes"].as_array().unwrap().iter().enumerate() {
            assert_eq!(v["name"], format!("drive{i}"));
            assert_eq!(v["node"], format!("drive{i}"));
            assert_eq!(
                v["file"],
                format!("vm1/{}/drive{i}.qcow2", m["id"].as_str().unwrap())
            );
            assert_eq!(v["virtual_size"], vm.models[i].bytes.len() as u64);
        }
        if round > 0 {
            assert_eq!(
                m["parent"],
                manifests.last().map(|p: &Value| p["id"].clone()).unwrap()
            );
            assert_eq!(m["chain"], manifests[0]["id"]);
        }
        // Only the new checkpoint remains on each volume.
        for i in 0..2 {
            assert_eq!(
                bitmap_names(vm.qemu(), &format!("drive{i}")),
                vec![m["checkpoint"].as_str().unwrap().to_string()]
            );
        }
        manifests.push(m);
    }
    vm.quit();
    vm.check_all_points();
    let listed = bitback(&["list", "--repo", vm.repo.to_str().unwrap(), "--json"]).json();
    assert_eq!(listed.as_array().unwrap(), &manifests);
    for m in &manifests {
        for v in m["volumes"].as_array().unwrap() {
            let file = vm.repo.join(v["file"].as_str().unwrap());
            run(Command::new("qemu-img").args(["check", "-U"]).arg(&file));
        }
    }
}

#[test]
fn full_every_starts_new_chains() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[8 * MIB]);
    let mut kinds = Vec::new();
    for i in 0..5 {
        vm.write(0, i * MIB, 4096, 0x40 + i as u8);
        let m = vm.backup(&["--full-every", "3"]);
        kinds.push((
            m["kind"].as_str().unwrap().to_string(),
            m["position"].as_u64().unwrap(),
        ));
        if i == 3 {
            assert!(
                m["reason"].as_str().unwrap().contains("--full-every 3"),
                "{m:#}"
            );
        }
    }
    let expected: Vec<(String, u64)> = [
        ("full", 0),
        ("incremental", 1),
        ("incremental", 2),
        ("full", 0),
        ("incremental", 1),
    ]
    .iter()
    .map(|(k, p)| (k.to_string(), *p))
    .collect();
    assert_eq!(kinds, expected);
    let full = vm.backup(&["--full"]);
    assert_eq!(full["kind"], "full");
    assert_eq!(full["reason"], "full: requested (--full)");
    vm.quit();
    vm.check_all_points();
}

/// The kind and reason of each volume in a manifest.
pub(crate) fn volume_kinds(m: &Value) -> Vec<(String, String)> {
    m["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["kind"].as_str().unwrap().to_string(),
                v["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A bitmap removed by hand: that volume alone loses it, and is read whole
/// (by content) or, where QEMU writes the files, a full.
#[test]
fn a_bitmap_removed_by_hand_costs_that_volume_a_read_or_a_full() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[8 * MIB, 4 * MIB]);
    vm.write(0, 0, MIB, 0x11);
    let first = vm.backup(&[]);
    vm.qemu().must(
        "block-dirty-bitmap-remove",
        json!({"node": "drive1", "name": first["checkpoint"]}),
    );
    vm.write(1, 0, 4096, 0x12);
    vm.write(0, 2 * MIB, 4096, 0x14);
    // --dry-run says so beforehand, and changes nothing.
    let before = (
        bitmap_names(vm.qemu(), "drive0"),
        bitmap_names(vm.qemu(), "drive1"),
    );
    let plan = vm.run_backup(&["--dry-run", "--json"]).json();
    let planned: Vec<&str> = plan["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["kind"].as_str().unwrap())
        .collect();
    let lost = match crate::harness::by_content() {
        true => "incremental by content",
        false => "full",
    };
    assert_eq!(planned, ["incremental", lost], "{plan}");
    assert!(
        plan["volumes"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("missing on volume drive1"),
        "{plan}"
    );
    assert_eq!(
        (
            bitmap_names(vm.qemu(), "drive0"),
            bitmap_names(vm.qemu(), "drive1")
        ),
        before
    );
    assert_eq!(crate::harness::list_ids(&vm.repo, None).len(), 1);
    let text = vm.run_backup(&["--dry-run"]);
    assert!(
        text.stdout.contains("would be incremental"),
        "{}",
        text.stdout
    );
    let second = vm.backup(&[]);
    assert_eq!(second["kind"], "incremental");
    let kinds = volume_kinds(&second);
    assert_eq!(kinds[0].0, "incremental", "{kinds:?}");
    assert_eq!(kinds[1].0, crate::harness::lost_bitmap_kind(), "{kinds:?}");
    assert!(kinds[1].1.contains("missing on volume drive1"), "{kinds:?}");
    // The point's reason names the volume; drive0's incremental holds
    // only the new write; drive1's file holds only its write (by
    // content) or stands alone (a full).
    let reason = second["reason"].as_str().unwrap();
    assert!(second["volumes"][0]["bytes_written"].as_u64().unwrap() <= 64 << 10);
    if crate::harness::by_content() {
        assert!(reason.contains("found by content on drive1"), "{reason}");
        assert_eq!(second["volumes"][1]["changes"], "content");
        assert!(second["volumes"][1]["bytes_written"].as_u64().unwrap() <= 64 << 10);
    } else {
        assert!(reason.contains("full of drive1"), "{reason}");
        assert_eq!(second["volumes"][1]["backing"], Value::Null);
    }
    vm.write(0, MIB, 4096, 0x13);
    let third = vm.backup(&[]);
    assert_eq!(third["kind"], "incremental");
    assert!(volume_kinds(&third).iter().all(|(k, _)| k == "incremental"));
    vm.quit();
    vm.check_all_points();
}

fn granularity(qemu: &Qemu, node: &str, name: &str) -> u64 {
    bitmaps(qemu, node)
        .iter()
        .find(|b| b["name"] == name)
        .and_then(|b| b["granularity"].as_u64())
        .unwrap_or_else(|| panic!("no bitmap {name} on {node}"))
}

#[test]
fn checkpoints_are_64k_granular_on_small_cluster_images() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[32 * MIB]);
    vm.quit();
    create_qcow2(&vm.disks[0].image, 32 * MIB, &["-o", "cluster_size=4K"]);
    vm.start();
    // QEMU's own choice on this image would be 4 KiB: a bitmap 16 times
    // larger, for nothing, as QEMU copies 64 KiB units anyway.
    vm.qemu().must(
        "block-dirty-bitmap-add",
        json!({"node": "drive0", "name": "probe"}),
    );
    assert_eq!(granularity(vm.qemu(), "drive0", "probe"), 4096);
    vm.qemu().must(
        "block-dirty-bitmap-remove",
        json!({"node": "drive0", "name": "probe"}),
    );

    vm.write(0, 0, 8 * MIB, 0x21);
    let full = vm.backup(&[]);
    let checkpoint = full["checkpoint"].as_str().unwrap();
    assert_eq!(granularity(vm.qemu(), "drive0", checkpoint), 64 << 10);
    for i in 0..16 {
        vm.write(0, i * 2 * MIB + 4096, 4096, 0x22);
    }
    let incr = vm.backup(&[]);
    assert_eq!(incr["kind"], "incremental");
    let copied = incr["volumes"][0]["bytes_written"].as_u64().unwrap();
    assert_eq!(copied, 16 * (64 << 10), "{incr}");
    vm.quit();
    vm.check_all_points();
}

#[test]
fn layout_and_copy_tuning_options_reach_qemu() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[16 * MIB, 8 * MIB]);
    let tuned = [
        "--cluster-size",
        "256K",
        "--granularity",
        "128K",
        "--max-workers",
        "4",
        "--max-chunk",
        "512K",
        "--copy-range",
    ];
    let mut rng = Rng::from_env();
    vm.random_writes(&mut rng, 40);
    let full = vm.backup(&tuned);
    assert_eq!(full["kind"], "full");
    for v in full["volumes"].as_array().unwrap() {
        let file = vm.repo.join(v["file"].as_str().unwrap());
        assert_eq!(crate::harness::qemu_img_info(&file)["cluster-size"], 262144);
        let node = v["node"].as_str().unwrap();
        let checkpoint = full["checkpoint"].as_str().unwrap();
        assert_eq!(granularity(vm.qemu(), node, checkpoint), 128 << 10);
    }
    vm.random_writes(&mut rng, 40);
    assert_eq!(vm.backup(&tuned)["kind"], "incremental");

    // QEMU refuses a chunk below its copy unit (the 256K cluster): the
    // option reached it, and the refusal leaves nothing behind.
    let before = bitmap_names(vm.qemu(), "drive0");
    let run = vm.run_backup(&["--cluster-size", "256K", "--max-chunk", "64K"]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("max-chunk"), "{}", run.stderr);
    assert_eq!(bitmap_names(vm.qemu(), "drive0"), before);
    let backups = std::fs::read_dir(vm.repo.join("vm1"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_dir())
        .count();
    assert_eq!(backups, 2);
    vm.quit();
    vm.check_all_points();
}

#[test]
fn a_resized_volume_forces_full() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[8 * MIB]);
    vm.write(0, 0, MIB, 0x21);
    vm.backup(&[]);
    vm.qemu().must(
        "block_resize",
        json!({"node-name": "drive0", "size": 16 * MIB}),
    );
    vm.models[0].bytes.resize(16 * MIB as usize, 0);
    vm.write(0, 12 * MIB, MIB, 0x22);
    let m = vm.backup(&[]);
    assert_eq!(m["kind"], "full");
    assert_eq!(
        m["reason"],
        "full: volume drive0 was resized (8 MiB -> 16 MiB)"
    );
    assert_eq!(m["volumes"][0]["virtual_size"], 16 * MIB);
    vm.quit();
    vm.check_all_points();
}

#[test]
fn an_added_volume_is_a_full_of_that_volume_alone() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[8 * MIB]);
    vm.write(0, 0, MIB, 0x31);
    vm.backup(&[]);
    let extra = dir.path().join("extra.qcow2");
    create_qcow2(&extra, 4 * MIB, &[]);
    vm.qemu().must(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "drive1",
               "file": {"driver": "file", "filename": extra}}),
    );
    vm.models.push(Model {
        node: "drive1".into(),
        bytes: vec![0; 4 * MIB as usize],
    });
    vm.write(1, MIB, 8192, 0x32);
    let m = vm.backup(&[]);
    assert_eq!(m["kind"], "incremental");
    let kinds = volume_kinds(&m);
    assert_eq!(kinds[0].0, "incremental");
    assert_eq!(kinds[1].0, "full");
    assert!(kinds[1].1.contains("volume drive1 is new"), "{kinds:?}");
    vm.write(1, 0, 4096, 0x33);
    assert_eq!(vm.backup(&[])["kind"], "incremental");
    // Leaving a volume out keeps the other incremental; bringing it back
    // makes it full again (it is not in the backup before).
    let only = vm.backup(&["--exclude", "drive1"]);
    assert_eq!(only["kind"], "incremental");
    assert_eq!(only["volumes"].as_array().unwrap().len(), 1);
    vm.points.pop();
    vm.write(1, 2 * MIB, 4096, 0x34);
    let back = vm.backup(&[]);
    let kinds = volume_kinds(&back);
    assert_eq!(kinds[0].0, "incremental");
    assert_eq!(kinds[1].0, "full", "{kinds:?}");
    vm.quit();
    vm.check_all_points();
}

/// A clean restart keeps qcow2 v3 bitmaps; a kill loses them (the volume
/// is then read whole by content, or a full where QEMU writes the files).
#[test]
fn a_clean_restart_continues_incrementally_and_a_kill_loses_the_bitmap() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[8 * MIB, 4 * MIB]);
    vm.write(0, 0, 2 * MIB, 0x41);
    vm.backup(&[]);
    vm.write(1, MIB, 64 * 1024, 0x42);
    vm.quit();
    vm.start();
    vm.write(0, 3 * MIB, 4096, 0x43);
    let after_restart = vm.backup(&[]);
    assert_eq!(after_restart["kind"], "incremental", "{after_restart:#}");
    // Stored at a clean close, loaded again, then QEMU is killed: the
    // image keeps the bitmap marked in use, so it loads inconsistent.
    vm.quit();
    vm.start();
    vm.write(0, 5 * MIB, 4096, 0x44);
    // A guest flushes what it needs kept; a kill loses unflushed metadata.
    vm.qemu().qemu_io("drive0", "flush");
    vm.qemu().qemu_io("drive1", "flush");
    vm.qemu.as_mut().unwrap().kill();
    vm.qemu = None;
    vm.start();
    let checkpoint = after_restart["checkpoint"].as_str().unwrap();
    let loaded = bitmaps(vm.qemu(), "drive0");
    let stale = loaded
        .iter()
        .find(|b| b["name"] == checkpoint)
        .expect("bitmap loaded");
    assert_eq!(stale["inconsistent"], true, "{stale}");
    let after_kill = vm.backup(&[]);
    assert_eq!(after_kill["kind"], crate::harness::lost_bitmap_kind());
    assert!(
        volume_kinds(&after_kill)
            .iter()
            .all(|(_, reason)| reason.contains("is inconsistent")),
        "{after_kill:#}"
    );
    vm.write(1, 0, 4096, 0x45);
    let next = vm.backup(&[]);
    assert_eq!(next["kind"], "incremental");
    // A checkpoint created in a session that is then killed never reached
    // the image: it is simply missing.
    vm.write(0, 6 * MIB, 4096, 0x46);
    vm.qemu().qemu_io("drive0", "flush");
    vm.qemu().qemu_io("drive1", "flush");
    vm.qemu.as_mut().unwrap().kill();
    vm.qemu = None;
    vm.start();
    let missing = vm.backup(&[]);
    assert_eq!(missing["kind"], crate::harness::lost_bitmap_kind());
    assert!(
        volume_kinds(&missing)
            .iter()
            .all(|(_, reason)| reason.contains("missing")),
        "{missing:#}"
    );
    vm.quit();
    vm.check_all_points();
}

/// The host offset of the cluster holding guest offset `guest`.
fn host_offset(image: &Path, guest: u64) -> u64 {
    let image = bitback::qcow2::Image::open(image).unwrap();
    let map = bitback::qcow2::map(&image).unwrap();
    let e = map
        .iter()
        .find(|e| e.start <= guest && guest < e.start + e.length)
        .unwrap();
    e.offset.expect("guest offset is allocated") + (guest - e.start)
}

/// Starts the VM's one volume through blkdebug, whose rules come from
/// `config`: the node's name stays the same whatever the rules are.
fn start_with_blkdebug(vm: &mut Vm, config: &Path) {
    let blockdev = json!({
        "driver": "qcow2", "node-name": "drive0",
        "file": {
            "driver": "blkdebug",
            "config": config,
            "image": {"driver": "file", "filename": vm.disks[0].image},
        },
    });
    vm.qemu = Some(Qemu::start_with(
        Kind::MachineNone,
        &vm.dir,
        &[],
        &["-blockdev".into(), blockdev.to_string()],
    ));
}

#[test]
fn a_job_failing_mid_copy_keeps_the_previous_checkpoint() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[16 * MIB]);
    vm.quit();
    let config = dir.path().join("blkdebug.conf");
    std::fs::write(&config, "").unwrap();
    start_with_blkdebug(&mut vm, &config);
    vm.write(0, 0, 4 * MIB, 0x51);
    let full = vm.backup(&[]);
    vm.write(0, 8 * MIB, 256 * 1024, 0x52);
    vm.write(0, 12 * MIB, 4096, 0x53);
    vm.quit();

    // Restart with one read error where the dirty data lives.
    let sector = host_offset(&vm.disks[0].image, 8 * MIB + 128 * 1024) / 512;
    std::fs::write(
        &config,
        format!("[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nsector = \"{sector}\"\nonce = \"on\"\n"),
    )
    .unwrap();
    start_with_blkdebug(&mut vm, &config);
    let failed = vm.run_backup(&[]);
    assert_eq!(failed.code, Some(1), "{}", failed.stderr);
    assert!(failed.stderr.contains("failed"), "{}", failed.stderr);
    // Nothing of it is kept; the old checkpoint is intact and alone.
    let vm_dir = vm.repo.join("vm1");
    let entries: Vec<String> = std::fs::read_dir(&vm_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".lock")
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(
        bitmap_names(vm.qemu(), "drive0"),
        vec![full["checkpoint"].as_str().unwrap().to_string()]
    );
    let nodes = vm
        .qemu()
        .must("query-named-block-nodes", json!({"flat": true}));
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("bitback-t")),
        "target node left behind: {names:?}"
    );

    // The error fired once; the next incremental holds everything since the full.
    let m = vm.backup(&[]);
    assert_eq!(m["kind"], "incremental", "{m:#}");
    assert_eq!(m["parent"], full["id"]);
    vm.quit();
    vm.check_all_points();
}

#[test]
fn a_stopped_vm_gets_an_incremental_and_continues_after_restart() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[8 * MIB, 4 * MIB]);
    vm.write(0, 0, MIB, 0x61);
    vm.backup(&[]);
    vm.write(1, 2 * MIB, 8192, 0x62);
    vm.quit();

    // Stopped: named images, then the recorded ones.
    let img = |i: usize| format!("drive{i}={}", vm.disks[i].image.display());
    let repo = vm.repo.to_str().unwrap().to_string();
    let stopped = bitback(&[
        "backup",
        "--repo",
        &repo,
        "--vm",
        "vm1",
        "--image",
        &img(0),
        "--image",
        &img(1),
        "--json",
    ])
    .json();
    assert_eq!(stopped["kind"], "incremental", "{stopped:#}");
    vm.snapshot(stopped["id"].as_str().unwrap());
    let again = bitback(&["backup", "--repo", &repo, "--vm", "vm1", "--json"]).json();
    assert_eq!(again["kind"], "incremental");
    assert_eq!(again["volumes"][0]["bytes_written"], 0);
    vm.snapshot(again["id"].as_str().unwrap());

    // The checkpoint written while stopped carries on in the VM.
    vm.start();
    let checkpoint = again["checkpoint"].as_str().unwrap();
    let loaded = bitmaps(vm.qemu(), "drive0");
    let b = loaded
        .iter()
        .find(|b| b["name"] == checkpoint)
        .expect("checkpoint in the image");
    assert!(b.get("inconsistent").is_none_or(|v| v == false), "{b}");
    vm.write(0, 6 * MIB, 4096, 0x63);
    let live = vm.backup(&[]);
    assert_eq!(live["kind"], "incremental", "{live:#}");
    assert_eq!(live["position"], 3);

    // A running QEMU holds the images: a stopped-VM backup is refused.
    let refused = bitback(&["backup", "--repo", &repo, "--vm", "vm1"]);
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("in use by a running QEMU"),
        "{}",
        refused.stderr
    );
    vm.quit();
    vm.check_all_points();
}

/// Starts bitback in the background; killed by pid when dropped.
struct Background(Child);

impl Background {
    pub(crate) fn start(args: &[&str]) -> Background {
        Background(
            Command::new(env!("CARGO_BIN_EXE_bitback"))
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }

    fn signal(&self, signal: &str) {
        run(Command::new("kill").args([format!("-{signal}"), self.0.id().to_string()]));
    }

    fn finish(mut self) -> (Option<i32>, String) {
        let mut child = std::mem::replace(&mut self.0, Command::new("true").spawn().unwrap());
        let out = std::mem::take(&mut child.stderr);
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        if let Some(mut pipe) = out {
            use std::io::Read;
            pipe.read_to_string(&mut stderr).unwrap();
        }
        (status.code(), stderr)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_job(qemu: &Qemu) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let jobs = qemu.must("query-jobs", Value::Null);
        if jobs
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["status"] == "running")
        {
            return;
        }
        assert!(Instant::now() < deadline, "no backup job started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_cancels_and_a_second_run_meets_the_lock() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[16 * MIB]);
    vm.write(0, 0, MIB, 0x71);
    let full = vm.backup(&[]);
    vm.write(0, 2 * MIB, 8 * MIB, 0x72);
    let qmp = vm.qemu().qmp.to_str().unwrap().to_string();
    let repo = vm.repo.to_str().unwrap().to_string();
    let slow = Background::start(&[
        "backup",
        "--qmp",
        &qmp,
        "--repo",
        &repo,
        "--vm",
        "vm1",
        "--rate-limit",
        "64K",
        "--data-path",
        "file",
    ]);
    wait_for_job(vm.qemu());
    // The target went to QEMU as a passed fd, not by name.
    let fdsets = vm.qemu().must("query-fdsets", Value::Null);
    let opaque = fdsets[0]["fds"][0]["opaque"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        opaque.starts_with("bitback ") && opaque.ends_with("drive0.qcow2"),
        "{fdsets}"
    );

    // A second run on the same VM fails at once, naming the lock.
    let second = bitback(&["backup", "--qmp", &qmp, "--repo", &repo, "--vm", "vm1"]);
    assert_ne!(second.code, Some(0));
    assert!(
        second.stderr.contains("vm vm1 is locked by pid"),
        "{}",
        second.stderr
    );

    slow.signal("TERM");
    let (code, stderr) = slow.finish();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(stderr.contains("cancelled by a signal"), "{stderr}");
    assert!(!stderr.contains("the backup broke"), "{stderr}");
    assert_eq!(
        bitmap_names(vm.qemu(), "drive0"),
        vec![full["checkpoint"].as_str().unwrap().to_string()]
    );
    assert!(
        vm.qemu()
            .must("query-jobs", Value::Null)
            .as_array()
            .unwrap()
            .is_empty()
    );
    let leftovers: Vec<_> = std::fs::read_dir(vm.repo.join("vm1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let m = vm.backup(&[]);
    assert_eq!(m["kind"], "incremental");
    vm.quit();
    vm.check_all_points();
}

#[test]
fn a_crash_at_any_phase_is_cleaned_up_by_the_next_run() {
    for phase in [
        "after-transaction",
        "after-jobs",
        "before-commit",
        "after-commit",
    ] {
        let dir = tempdir();
        let mut vm = Vm::new(dir.path(), &[8 * MIB, 4 * MIB]);
        vm.write(0, 0, MIB, 0x81);
        vm.backup(&[]);
        vm.write(1, MIB, 64 * 1024, 0x82);
        let crashed = Command::new(env!("CARGO_BIN_EXE_bitback"))
            .args(["backup", "--qmp", vm.qemu().qmp.to_str().unwrap(), "--repo"])
            .arg(&vm.repo)
            .args(["--vm", "vm1"])
            .env("BITBACK_FAULT", phase)
            .output()
            .unwrap();
        assert_eq!(
            crashed.status.code(),
            None,
            "{phase}: bitback was not killed"
        );
        if phase == "after-commit" {
            // Committed before the crash: a point the repository keeps.
            let list = bitback(&["list", "--repo", vm.repo.to_str().unwrap(), "--json"]).json();
            let id = list.as_array().unwrap().last().unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string();
            vm.snapshot(&id);
        }
        vm.write(0, 3 * MIB, 4096, 0x83);
        let next = vm.run_backup(&["--json", "-v"]);
        assert_eq!(next.code, Some(0), "{phase}: {}", next.stderr);
        let m: Value = serde_json::from_str(&next.stdout).unwrap();
        vm.snapshot(m["id"].as_str().unwrap());
        if phase == "after-commit" {
            assert_eq!(m["kind"], "full", "{phase}: {m:#}\n{}", next.stderr);
        } else {
            assert_eq!(m["kind"], "incremental", "{phase}: {m:#}\n{}", next.stderr);
            assert!(
                next.stderr.contains("interrupted run") || next.stderr.contains("does not use"),
                "{phase}: the log does not say what was cleaned:\n{}",
                next.stderr
            );
        }
        for i in 0..2 {
            assert_eq!(
                bitmap_names(vm.qemu(), &format!("drive{i}")),
                vec![m["checkpoint"].as_str().unwrap().to_string()],
                "{phase}"
            );
        }
        vm.quit();
        vm.check_all_points();
    }
}

/// A guest agent stand-in: QEMU cannot run one without a booted guest.
fn fake_agent(path: &Path, log: Arc<Mutex<Vec<String>>>) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut writer = stream.try_clone().unwrap();
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            let cmd: Value = serde_json::from_str(&line).unwrap();
            let name = cmd["execute"].as_str().unwrap().to_string();
            let reply = match name.as_str() {
                "guest-sync" => {
                    // A stale reply first, as a real agent may have.
                    writeln!(writer, "{}", json!({"return": 12345})).unwrap();
                    json!({"return": cmd["arguments"]["id"]})
                }
                "guest-fsfreeze-freeze" | "guest-fsfreeze-thaw" => json!({"return": 2}),
                _ => json!({"error": {"class": "CommandNotFound", "desc": "no"}}),
            };
            log.lock().unwrap().push(name);
            writeln!(writer, "{reply}").unwrap();
        }
    });
}

#[test]
fn quiesce_freezes_then_thaws_the_guest() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[4 * MIB]);
    vm.write(0, 0, 4096, 0x91);
    let agent = dir.path().join("qga.sock");
    let log = Arc::new(Mutex::new(Vec::new()));
    fake_agent(&agent, log.clone());
    let m = vm.backup(&["--quiesce", "--qga", agent.to_str().unwrap()]);
    assert_eq!(m["kind"], "full");
    assert_eq!(
        *log.lock().unwrap(),
        [
            "guest-sync",
            "guest-fsfreeze-freeze",
            "guest-sync",
            "guest-fsfreeze-thaw"
        ]
    );
    let no_agent = vm.run_backup(&[
        "--quiesce",
        "--qga",
        dir.path().join("none.sock").to_str().unwrap(),
    ]);
    assert_eq!(no_agent.code, Some(1));
    assert!(
        no_agent.stderr.contains("guest agent"),
        "{}",
        no_agent.stderr
    );
    vm.quit();
    vm.check_all_points();
}

#[test]
fn bad_input_is_exit_2_and_writes_nothing() {
    let dir = tempdir();
    let vm = Vm::new(dir.path(), &[4 * MIB]);
    for (args, message) in [
        (vec!["--vm", "../escape"], "not allowed"),
        (
            vec!["--vm", "vm1", "--volume", "nosuch"],
            "has no volume nosuch",
        ),
        (vec!["--vm", "a/b"], "not allowed"),
        (vec!["--vm", "vm1", "--cluster-size", "96K"], "power of two"),
        (vec!["--vm", "vm1", "--granularity", "256"], "power of two"),
    ] {
        let mut full = vec![
            "backup",
            "--qmp",
            vm.qemu().qmp.to_str().unwrap(),
            "--repo",
            vm.repo.to_str().unwrap(),
        ];
        full.extend(args.iter());
        let run = bitback(&full);
        assert_eq!(run.code, Some(2), "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(message), "{args:?}: {}", run.stderr);
    }
    assert!(!dir.path().join("escape").exists());
    let entries: Vec<_> = std::fs::read_dir(&vm.repo)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(entries.iter().all(|e| e == "vm1"), "{entries:?}");
}

#[test]
fn demo_proves_its_restore() {
    crate::harness::require("qemu-storage-daemon");
    let run = bitback(&["demo"]);
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("Images are identical"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("incremental"), "{}", run.stdout);
    // The first impression: no warning about a filter that fails guest
    // writes, and logs to a pipe in plain text.
    assert!(!run.stderr.contains("WARN"), "{}", run.stderr);
    assert!(!run.stderr.contains('\x1b'), "{}", run.stderr);
    // With -v the log has lines, and no colour codes in them.
    let logged = bitback(&["demo", "-v"]);
    assert_eq!(logged.code, Some(0), "{}", logged.stderr);
    assert!(logged.stderr.contains(" INFO "), "{}", logged.stderr);
    assert!(!logged.stderr.contains('\x1b'), "{:?}", logged.stderr);
}

/// A full of a volume whose image has a backing file (a template) must
/// copy the template's data too; sync=top, used for images without one,
/// would leave it out.
#[test]
fn a_full_of_an_overlay_includes_its_backing_data() {
    let dir = tempdir();
    let base = dir.path().join("template.qcow2");
    let overlay = dir.path().join("vm.qcow2");
    create_qcow2(&base, 8 * MIB, &[]);
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x3c 1M 2M"])
        .arg(&base));
    create_qcow2(
        &overlay,
        8 * MIB,
        &["-b", base.to_str().unwrap(), "-F", "qcow2"],
    );
    let qemu = Qemu::start(
        Kind::MachineNone,
        dir.path(),
        &[Disk::new("d", "drive0", &overlay)],
    );
    qemu.qemu_io("drive0", "write -P 0x3d 4M 64k");
    let repo = dir.path().join("repo");
    let m = bitback(&[
        "backup",
        "--qmp",
        qemu.qmp.to_str().unwrap(),
        "--repo",
        repo.to_str().unwrap(),
        "--vm",
        "vm1",
        "--json",
    ])
    .json();
    assert_eq!(m["kind"], "full");
    assert_eq!(
        m["volumes"][0]["bytes_written"],
        2 * MIB + 64 * 1024,
        "{m:#}"
    );
    qemu.quit();
    let file = repo.join(m["volumes"][0]["file"].as_str().unwrap());
    assert!(crate::harness::images_equal(&overlay, &file));
}

#[test]
fn a_damaged_parent_file_forces_full() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[4 * MIB]);
    vm.write(0, 0, MIB, 0x51);
    let full = vm.backup(&[]);
    vm.write(0, MIB, 4096, 0x52);
    vm.backup(&[]);
    // The chain's first file is gone: nothing can build on the chain.
    let lost = vm.repo.join(full["volumes"][0]["file"].as_str().unwrap());
    std::fs::remove_file(&lost).unwrap();
    vm.points.remove(0);
    vm.write(0, 2 * MIB, 4096, 0x53);
    let m = vm.backup(&[]);
    assert_eq!(m["kind"], "full", "{m:#}");
    let reason = m["reason"].as_str().unwrap();
    assert!(reason.contains("cannot be built on"), "{reason}");
    assert!(reason.contains("drive0.qcow2"), "{reason}");
    // Only the point whose chain is whole can be checked.
    vm.points.remove(0);
    vm.quit();
    vm.check_all_points();
}

#[test]
fn a_damaged_parent_file_is_a_full_of_that_volume_alone() {
    let dir = tempdir();
    let d = dir.path();
    let mut vm = Vm::new(d, &[4 * MIB, 4 * MIB]);
    vm.write(0, 0, MIB, 0x61);
    vm.write(1, 0, MIB, 0x71);
    let full = vm.backup(&[]);
    vm.write(0, MIB, 4096, 0x62);
    vm.write(1, MIB, 4096, 0x72);
    vm.backup(&[]);
    // drive1's full loses its magic; drive0's files are whole.
    let rel = full["volumes"][1]["file"].as_str().unwrap().to_string();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(vm.repo.join(&rel))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0; 4], 0).unwrap();
    drop(file);

    vm.write(0, 2 * MIB, 4096, 0x63);
    vm.write(1, 2 * MIB, 4096, 0x73);
    let m = vm.backup(&[]);
    assert_eq!(m["kind"], "incremental", "{m:#}");
    assert_eq!(m["volumes"][0]["kind"], "incremental", "{m:#}");
    assert_eq!(m["volumes"][1]["kind"], "full", "{m:#}");
    let reason = m["volumes"][1]["reason"].as_str().unwrap();
    assert!(reason.contains("cannot be built on"), "{reason}");
    assert!(reason.contains(&rel), "{reason}");
    vm.write(0, 3 * MIB, 4096, 0x64);
    vm.write(1, 3 * MIB, 4096, 0x74);
    let next = vm.backup(&[]);
    assert_eq!(next["volumes"][1]["kind"], "incremental", "{next:#}");
    vm.quit();

    // The new points restore whole, natively: drive1 from its new full,
    // drive0 through the old files.
    for (id, models) in &vm.points[2..] {
        let out = d.join(format!("restored-{id}"));
        let r = vm.restore(id, &out, &[]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        for (i, model) in models.iter().enumerate() {
            let got = out.join(format!("drive{i}.raw"));
            assert!(same_content(&got, "raw", model, "raw"), "{id} drive{i}");
        }
    }
    // verify still reports the damaged file, and only it.
    let verified = vm.cli("verify", &["--json"]);
    assert_eq!(verified.code, Some(1), "{}", verified.stdout);
    let report: Value = serde_json::from_str(&verified.stdout).unwrap();
    let files: Vec<&str> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["file"].as_str())
        .collect();
    assert!(files.iter().all(|f| *f == rel), "{report:#}");
    // Shortening the chain to 2 rewrites the third point as a full of both
    // volumes: it reads no damaged file, and every point left restores.
    let consolidated = vm.cli("consolidate", &["--max-chain", "2"]);
    assert_eq!(consolidated.code, Some(0), "{}", consolidated.stderr);
    vm.points.drain(..2);
    vm.check_all_points();
}

/// Damage no structural check sees: a bit flipped inside a data cluster
/// (found by verify's digests, recorded, and then known to the next
/// backup) and a truncated newest file (the manifest's file size). Each
/// makes a full of its volume alone; the point after restores right.
#[test]
fn a_flipped_bit_found_by_verify_or_a_truncated_file_is_a_full_of_that_volume() {
    let dir = tempdir();
    let d = dir.path();
    let mut vm = Vm::new(d, &[4 * MIB, 4 * MIB]);
    vm.write(0, 0, MIB, 0x61);
    vm.write(1, 0, MIB, 0x71);
    let full = vm.backup(&[]);
    vm.write(0, MIB, 4096, 0x62);
    vm.write(1, MIB, 4096, 0x72);
    vm.backup(&[]);

    // One bit of guest data in drive1's full, where qemu-img map says
    // data lives: the file's structure stays whole.
    let rel = full["volumes"][1]["file"].as_str().unwrap().to_string();
    let path = vm.repo.join(&rel);
    let map = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(&path));
    let map: Value = serde_json::from_slice(&map.stdout).unwrap();
    let offset = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["data"] == true && e["offset"].is_u64())
        .unwrap()["offset"]
        .as_u64()
        .unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut byte = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, offset + 100).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[byte[0] ^ 0x10], offset + 100).unwrap();
    drop(file);
    run(Command::new("qemu-img").args(["check", "-q"]).arg(&path));

    let verified = vm.cli("verify", &["--json"]);
    assert_eq!(verified.code, Some(1), "{}", verified.stdout);
    assert!(verified.stdout.contains(&rel), "{}", verified.stdout);
    vm.write(0, 2 * MIB, 4096, 0x63);
    vm.write(1, 2 * MIB, 4096, 0x73);
    let m = vm.backup(&[]);
    assert_eq!(m["volumes"][0]["kind"], "incremental", "{m:#}");
    assert_eq!(m["volumes"][1]["kind"], "full", "{m:#}");
    let reason = m["volumes"][1]["reason"].as_str().unwrap();
    assert!(reason.contains("verify found it damaged"), "{reason}");
    assert!(reason.contains(&rel), "{reason}");

    // The newest file of drive0 loses its last cluster.
    let newest = vm.repo.join(m["volumes"][0]["file"].as_str().unwrap());
    let len = std::fs::metadata(&newest).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap()
        .set_len(len - 65536)
        .unwrap();
    vm.write(0, 3 * MIB, 4096, 0x64);
    vm.write(1, 3 * MIB, 4096, 0x74);
    let n = vm.backup(&[]);
    assert_eq!(n["volumes"][0]["kind"], "full", "{n:#}");
    let reason = n["volumes"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("truncated"), "{reason}");
    assert_eq!(n["volumes"][1]["kind"], "incremental", "{n:#}");
    vm.quit();

    let (id, models) = vm.points.last().unwrap();
    let out = d.join("restored");
    let r = vm.restore(id, &out, &[]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    for (i, model) in models.iter().enumerate() {
        let got = out.join(format!("drive{i}.raw"));
        assert!(same_content(&got, "raw", model, "raw"), "{id} drive{i}");
    }
}

/// The pids of `pid`'s children (every thread's).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
    {
        let path = task.unwrap().path().join("children");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    out
}

#[test]
fn a_killed_stopped_vm_backup_leaves_no_daemon_holding_the_image() {
    let dir = tempdir();
    let image = dir.path().join("disk.qcow2");
    create_qcow2(&image, 32 * MIB, &[]);
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 16M"])
        .arg(&image));
    let repo = dir.path().join("repo");
    let spec = format!("disk0={}", image.display());
    let args = [
        "backup",
        "--repo",
        repo.to_str().unwrap(),
        "--vm",
        "cold",
        "--image",
        &spec,
    ];
    let run_in_background = Background::start(&[&args[..], &["--rate-limit", "256K"]].concat());
    // Wait for the daemon bitback starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    let daemon = loop {
        let found = children(run_in_background.0.id()).into_iter().find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim().starts_with("qemu-storage"))
        });
        if let Some(pid) = found {
            break pid;
        }
        assert!(Instant::now() < deadline, "no qemu-storage-daemon appeared");
        std::thread::sleep(Duration::from_millis(20));
    };
    // A wrapper's timeout: SIGKILL, no chance to clean up.
    run_in_background.signal("KILL");
    let (code, _) = run_in_background.finish();
    assert_eq!(code, None, "killed by a signal");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::path::Path::new(&format!("/proc/{daemon}")).exists()
        && !std::fs::read_to_string(format!("/proc/{daemon}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
    {
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon {daemon} outlived the killed bitback by 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The image is free for the VM again, and the next backup cleans up.
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5b 0 64k"])
        .arg(&image));
    let next = bitback(&[&args[..], &["--json"]].concat()).json();
    assert_eq!(next["kind"], "full");
    let backup = repo
        .join("cold")
        .join(next["id"].as_str().unwrap())
        .join("disk0.qcow2");
    assert!(crate::harness::images_equal(&image, &backup));
}
