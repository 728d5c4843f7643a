//! The guest comes first: a repository or fleecing directory that fills up
//! breaks the backup, never a guest write; fleecing points equal the disk
//! at the backup's start; a killed fleecing run is cleaned up by the next.
//!
//! The guest's writes go through its device (HMP `qemu-io -d`), above
//! bitback's filter, as a guest's do; that every one of them landed is
//! judged by `qemu-img compare` of the disk with its raw model after QEMU
//! quit. Before bitback had its own filter, the writes that met a full
//! repository failed (`No space left on device`) and the compare differs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::slowfs::SlowFs;
use crate::harness::{Tmpfs, Vm, same_content, tempdir};

const MIB: u64 = 1 << 20;

/// `bitback backup` of `vm` started in the background, with `extra`.
fn spawn_backup(vm: &Vm, extra: &[&str]) -> Child {
    spawn_backup_at(&vm.qemu().qmp, &vm.repo, extra, &[])
}

/// `bitback backup --json` of the QEMU at `qmp` into `repo` as vm1,
/// started in the background, with `extra` arguments and `env`.
fn spawn_backup_at(qmp: &Path, repo: &Path, extra: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_bitback"))
        .args(["backup", "--qmp"])
        .arg(qmp)
        .arg("--repo")
        .arg(repo)
        .args(["--vm", "vm1", "--json"])
        .args(extra)
        .env_remove("BITBACK_LOG")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting bitback")
}

/// Waits until the backup's job runs in QEMU.
fn wait_for_job(vm: &Vm, child: &mut Child) {
    vm.qemu().wait_for_job(child);
}

struct Ended {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn wait(child: Child) -> Ended {
    let out = child.wait_with_output().unwrap();
    Ended {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Nothing of a run is left in QEMU: no node or job of bitback's, and
/// every device on its own node again.
fn assert_nothing_left(vm: &Vm) {
    let qemu = vm.qemu();
    let nodes: Vec<String> = qemu
        .must("query-named-block-nodes", json!({ "flat": true }))
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        nodes.iter().all(|n| !n.starts_with("bitback-")),
        "{nodes:?}"
    );
    let jobs = qemu.must("query-jobs", Value::Null);
    assert_eq!(jobs, json!([]));
    for (i, disk) in vm.disks.iter().enumerate() {
        let on = qemu.must(
            "qom-get",
            json!({ "path": format!("/machine/peripheral/{}/virtio-backend", disk.device), "property": "drive" }),
        );
        assert_eq!(on, json!(format!("drive{i}")));
    }
}

fn bitmaps(vm: &Vm) -> Vec<String> {
    let blocks = vm.qemu().must("query-block", Value::Null);
    blocks[0]["inserted"]["dirty-bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

/// Writes `count` MiB of `pattern` through the device from `from` on,
/// one MiB at a time (each a guest write that must land).
fn guest_writes(vm: &mut Vm, from: u64, count: u64, pattern: u8) {
    for i in 0..count {
        vm.write(0, from + i * MIB, MIB, pattern);
    }
}

/// After QEMU quit: the disk holds every write (its model).
fn assert_disk_is_model(vm: &Vm) {
    let model = vm.dir.join("disk-now.raw");
    std::fs::write(&model, &vm.models[0].bytes).unwrap();
    assert!(
        same_content(&model, "raw", &vm.disks[0].image, "qcow2"),
        "a guest write was lost: the disk differs from its model"
    );
}

/// While QEMU runs: the guest's writes are flushed through the device and
/// the image (read beside QEMU, `qemu-img compare -U`) equals its model.
fn assert_writes_landed(vm: &Vm) {
    vm.qemu().qemu_io_device(&vm.disks[0].device, "flush");
    let model = vm.dir.join("disk-now.raw");
    std::fs::write(&model, &vm.models[0].bytes).unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "qcow2"])
        .arg(&model)
        .arg(&vm.disks[0].image)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "guest writes were lost: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fleecing directory in `dir`, and its path as an argument.
fn fleece_dir(dir: &Path) -> (PathBuf, String) {
    let fleece = dir.join("fleece");
    std::fs::create_dir_all(&fleece).unwrap();
    let arg = fleece.to_str().unwrap().to_string();
    (fleece, arg)
}

/// Ends the scenario: QEMU quits, the disk holds every guest write, and
/// every recorded point equals its model.
fn finish(mut vm: Vm) {
    vm.quit();
    assert_disk_is_model(&vm);
    vm.check_all_points();
}

/// Records backup `id` as holding `bytes` (the models at its point).
fn record_point(vm: &mut Vm, id: &str, bytes: Vec<u8>) {
    let path = vm.dir.join(format!("model-{id}-0.raw"));
    std::fs::write(&path, bytes).unwrap();
    vm.points.push((id.to_string(), vec![path]));
}

/// A backup with `extra` during which the guest writes `count` MiB of
/// `pattern` from `from` on: it must succeed, with the `kind` and each
/// volume's `guard` given; it is recorded as a point holding the disk as
/// it was at its start. Returns the manifest.
fn backup_while_writing(
    vm: &mut Vm,
    extra: &[&str],
    (from, count, pattern): (u64, u64, u8),
    kind: &str,
    guard: &str,
) -> Value {
    let at_start = vm.models[0].bytes.clone();
    let mut child = spawn_backup(vm, extra);
    wait_for_job(vm, &mut child);
    guest_writes(vm, from, count, pattern);
    let ended = wait(child);
    assert_eq!(ended.code, Some(0), "{}", ended.stderr);
    let manifest: Value = serde_json::from_str(&ended.stdout).unwrap();
    assert_eq!(manifest["kind"], kind, "{manifest}");
    for v in manifest["volumes"].as_array().unwrap() {
        assert_eq!(v["guard"], guard, "{manifest}");
    }
    record_point(vm, manifest["id"].as_str().unwrap(), at_start);
    manifest
}

/// A 64 MiB volume with 48 MiB of data, on a device.
fn vm_with_data(dir: &Path) -> Vm {
    let mut vm = Vm::with_devices(dir, &[64 * MIB]);
    guest_writes(&mut vm, 0, 48, 0x11);
    vm
}

/// The repository (or, with `fleecing`, the fleecing directory) is a
/// small tmpfs that the old data of 24 MiB of guest writes overflows
/// while a slow copy runs: every write lands, the run fails naming the
/// cause, nothing is left in QEMU, the previous checkpoint is whole, and
/// once there is room the next backup is right (incremental where it
/// can be).
fn fills_up(incremental: bool, fleecing: bool) {
    fills_up_with(incremental, fleecing, &[]);
}

/// [`fills_up`], with `data_path` arguments for every backup of it.
fn fills_up_with(incremental: bool, fleecing: bool, data_path: &[&str]) {
    let dir = tempdir();
    let mut vm = vm_with_data(dir.path());
    let small = dir.path().join("small");
    let tmpfs = Tmpfs::mount(&small, if fleecing { "8M" } else { "16M" });
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    if !fleecing {
        vm.repo = small.join("repo");
        if incremental {
            tmpfs.resize("96M");
        }
    }
    let mut extra = vec!["--speed-limit", "2M"];
    extra.extend(data_path);
    let fleece_dir = if fleecing { &small } else { &scratch };
    if fleecing {
        extra.extend(["--fleecing", fleece_dir.to_str().unwrap()]);
    }
    let mut before = Vec::new();
    if incremental {
        let first = vm.backup(data_path);
        assert_eq!(first["kind"], "full");
        before = bitmaps(&vm);
        assert_eq!(before.len(), 1, "{before:?}");
        // Every cluster dirty since: the incremental copies 48 MiB.
        guest_writes(&mut vm, 0, 48, 0x22);
        if !fleecing {
            // 16 MiB left: the old data of the writes below overflows it.
            let used = fs_used(&small);
            tmpfs.resize(&format!("{}M", (used >> 20) + 16));
        }
    }

    let mut child = spawn_backup(&vm, &extra);
    wait_for_job(&vm, &mut child);
    // Old data not yet copied (the copy runs from offset 0 at 2 MiB/s).
    guest_writes(&mut vm, 24 * MIB, 24, 0x33);
    let ended = wait(child);
    assert_writes_landed(&vm);
    assert_eq!(ended.code, Some(1), "{}\n{}", ended.stdout, ended.stderr);
    assert!(
        ended
            .stderr
            .contains("the backup broke, not the guest: no space left on"),
        "{}",
        ended.stderr
    );
    assert_nothing_left(&vm);
    assert_eq!(bitmaps(&vm), before, "the checkpoints changed");
    let strays: Vec<_> = std::fs::read_dir(fleece_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".qcow2"))
        .collect();
    assert!(strays.is_empty(), "fleecing images left: {strays:?}");

    // Room again: the next backup is right.
    tmpfs.resize("256M");
    let next = vm.backup(data_path);
    let expected = if incremental { "incremental" } else { "full" };
    assert_eq!(next["kind"], expected, "{next}");
    finish(vm);
}

fn fs_used(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=used", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df's used bytes")
}

#[test]
fn a_repository_that_fills_up_during_a_full_fails_the_backup_not_a_guest_write() {
    fills_up(false, false);
}

#[test]
fn a_repository_that_fills_up_during_an_incremental_fails_the_backup_not_a_guest_write() {
    fills_up(true, false);
}

/// The same through bitback's NBD server: the writer's ENOSPC reaches
/// QEMU as the NBD reply, and the filter drops the point.
#[test]
fn a_repository_that_fills_up_under_the_nbd_data_path_fails_the_backup_not_a_guest_write() {
    fills_up_with(true, false, &["--data-path", "nbd"]);
}

#[test]
fn a_fleecing_directory_that_fills_up_fails_the_backup_not_a_guest_write() {
    fills_up(false, true);
}

#[test]
fn a_fleecing_incremental_whose_directory_fills_up_keeps_its_checkpoint() {
    fills_up(true, true);
}

/// With fleecing, a point taken while the guest writes equals the disk at
/// the backup's start, full and incremental; the old data went to the
/// fleecing directory, which is empty again after each run.
#[test]
fn a_fleecing_point_is_the_disk_at_the_start_while_the_guest_writes() {
    let dir = tempdir();
    let mut vm = vm_with_data(dir.path());
    let (fleece, fleece_arg) = fleece_dir(dir.path());
    for (kind, pattern) in [("full", 0x44u8), ("incremental", 0x55)] {
        let extra = ["--speed-limit", "4M", "--fleecing", &fleece_arg];
        backup_while_writing(&mut vm, &extra, (8 * MIB, 40, pattern), kind, "fleecing");
        assert_eq!(std::fs::read_dir(&fleece).unwrap().count(), 0);
        assert_nothing_left(&vm);
    }
    finish(vm);
}

/// bitback killed (SIGKILL) in the middle of a fleecing backup: the guard
/// stays under the device and the guest's writes still land; the next run
/// takes it out, removes the fleecing image, and is right.
#[test]
fn a_killed_fleecing_backup_is_cleaned_up_by_the_next_run() {
    let dir = tempdir();
    let mut vm = vm_with_data(dir.path());
    let (fleece, fleece_arg) = fleece_dir(dir.path());
    vm.backup(&[]);
    guest_writes(&mut vm, 0, 8, 0x66);

    let mut child = spawn_backup(&vm, &["--speed-limit", "1M", "--fleecing", &fleece_arg]);
    wait_for_job(&vm, &mut child);
    child.kill().unwrap();
    let _ = child.wait();
    let left: Vec<PathBuf> = std::fs::read_dir(&fleece)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(left.len(), 1, "the killed run's fleecing image: {left:?}");
    // The guest goes on writing, through what the killed run left.
    guest_writes(&mut vm, 16 * MIB, 8, 0x77);

    let next = vm.backup(&["--fleecing", &fleece_arg]);
    assert_eq!(next["kind"], "incremental", "{next}");
    assert_eq!(std::fs::read_dir(&fleece).unwrap().count(), 0);
    assert_nothing_left(&vm);
    finish(vm);
}

/// `--fleecing` must name a directory; `--speed-limit` takes suffixes.
#[test]
fn fleecing_needs_a_directory() {
    let dir = tempdir();
    let vm = Vm::with_devices(dir.path(), &[MIB]);
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let run = vm.run_backup(&["--fleecing", file.to_str().unwrap(), "--speed-limit", "5M"]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("--fleecing"), "{}", run.stderr);
    assert!(!vm.repo.join("vm1").exists());
}

/// A slow repository (8 MB/s past the page cache, slowfs): with fleecing,
/// a full and an incremental taken while the guest writes equal the disk
/// at their starts.
#[test]
fn a_slow_repository_with_fleecing_keeps_each_point() {
    let dir = tempdir();
    let mut vm = Vm::with_devices(dir.path(), &[64 * MIB]);
    guest_writes(&mut vm, 0, 32, 0x11);
    let slow = SlowFs::mount(
        &dir.path().join("nas-store"),
        &dir.path().join("nas"),
        8 << 20,
    );
    vm.repo = slow.mountpoint.join("repo");
    let (_, fleece_arg) = fleece_dir(dir.path());
    for (kind, pattern) in [("full", 0x21u8), ("incremental", 0x22)] {
        let extra = ["--fleecing", &fleece_arg];
        backup_while_writing(&mut vm, &extra, (8 * MIB, 24, pattern), kind, "fleecing");
    }
    finish(vm);
    drop(slow);
}

/// Every disk kind under a device, guarded and fleeced at once: a qcow2
/// v3, a qcow2 v2, a raw file and a raw block device (a loop device), a
/// full and an incremental each taken while the guest writes all four;
/// every point equals the disks at its start.
#[test]
fn every_disk_kind_is_guarded_and_fleeced_at_one_point() {
    use crate::harness::{Disk, Kind, LoopDevice, Qemu, create_qcow2, run};
    const SIZE: u64 = 16 * MIB;
    let dir = tempdir();
    let d = dir.path();
    create_qcow2(&d.join("v3.qcow2"), SIZE, &[]);
    create_qcow2(&d.join("v2.qcow2"), SIZE, &["-o", "compat=0.10"]);
    for raw in ["raw.img", "dev.img"] {
        run(Command::new("truncate")
            .args(["-s", &SIZE.to_string()])
            .arg(d.join(raw)));
    }
    let device = LoopDevice::new(&d.join("dev.img"));
    let disks = vec![
        Disk::with_format("v3", "v3", &d.join("v3.qcow2"), "qcow2", ""),
        Disk::with_format("v2", "v2", &d.join("v2.qcow2"), "qcow2", ""),
        Disk::with_format("raw", "raw", &d.join("raw.img"), "raw", ""),
        Disk::with_format("dev", "dev", &device.device, "raw", ""),
    ];
    let qemu = Qemu::start(Kind::Pc, d, &disks);
    let repo = d.join("repo");
    let fleece = d.join("fleece");
    std::fs::create_dir_all(&fleece).unwrap();
    let mut models: Vec<Vec<u8>> = vec![vec![0; SIZE as usize]; disks.len()];
    let write = |qemu: &Qemu, models: &mut Vec<Vec<u8>>, i: usize, at: u64, pattern: u8| {
        qemu.qemu_io_device(&disks[i].device, &format!("write -P {pattern} {at} 1M"));
        models[i][at as usize..(at + MIB) as usize].fill(pattern);
    };
    for (i, _) in disks.iter().enumerate() {
        for at in 0..8 {
            write(&qemu, &mut models, i, at * MIB, 0x10 + i as u8);
        }
    }
    let mut points = Vec::new();
    for (round, kind) in ["full", "incremental"].into_iter().enumerate() {
        let at_start = models.clone();
        let mut child = Command::new(env!("CARGO_BIN_EXE_bitback"))
            .args(["backup", "--qmp"])
            .arg(&qemu.qmp)
            .arg("--repo")
            .arg(&repo)
            .args([
                "--vm",
                "kinds",
                "--json",
                "--speed-limit",
                "2M",
                "--fleecing",
            ])
            .arg(&fleece)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        qemu.wait_for_job(&mut child);
        for (i, _) in disks.iter().enumerate() {
            for at in 4..12 {
                write(
                    &qemu,
                    &mut models,
                    i,
                    at * MIB,
                    0x40 + (round * 4 + i) as u8,
                );
            }
        }
        let ended = wait(child);
        assert_eq!(ended.code, Some(0), "{}", ended.stderr);
        let manifest: Value = serde_json::from_str(&ended.stdout).unwrap();
        assert_eq!(manifest["kind"], kind, "{manifest}");
        for v in manifest["volumes"].as_array().unwrap() {
            assert_eq!(v["guard"], "fleecing", "{v}");
        }
        points.push((manifest["id"].as_str().unwrap().to_string(), at_start));
    }
    qemu.quit();
    for (id, models) in points {
        for (i, disk) in disks.iter().enumerate() {
            let model = d.join(format!("model-{id}-{i}.raw"));
            std::fs::write(&model, &models[i]).unwrap();
            let backup = repo
                .join("kinds")
                .join(&id)
                .join(format!("{}.qcow2", disk.device));
            assert!(
                same_content(&model, "raw", &backup, "qcow2"),
                "{} differs from the disk at its point",
                backup.display()
            );
        }
    }
    drop(device);
}

/// A compressed backup while the guest writes data not yet copied, on
/// both data paths. Where QEMU writes the file (deflate), the old data
/// goes to a fleecing image in the temporary directory (QEMU cannot write
/// a compressed cluster twice); where bitback does (zstd, the default),
/// to the target through bitback's filter, and the clusters the job then
/// copies again are written again. Either way the file holds compressed
/// clusters, nothing is left in the temporary directory, and the point is
/// the disk at its start.
#[test]
fn a_compressed_backup_keeps_its_point_on_both_data_paths() {
    let dir = tempdir();
    let mut vm = vm_with_data(dir.path());
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    for (round, (path, guard, kind)) in [("nbd", "bitback", "zstd"), ("file", "fleecing", "zlib")]
        .into_iter()
        .enumerate()
    {
        let at_start = vm.models[0].bytes.clone();
        let mut child = Command::new(env!("CARGO_BIN_EXE_bitback"))
            .args(["backup", "--qmp"])
            .arg(&vm.qemu().qmp)
            .arg("--repo")
            .arg(&vm.repo)
            .args(["--vm", "vm1", "--json", "--compress", "--speed-limit", "4M"])
            .args(["--data-path", path, "--full"])
            .env("TMPDIR", &tmp)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_job(&vm, &mut child);
        guest_writes(&mut vm, 0, 48, 0x5c + round as u8);
        let ended = wait(child);
        assert_eq!(ended.code, Some(0), "{}", ended.stderr);
        let manifest: Value = serde_json::from_str(&ended.stdout).unwrap();
        assert_eq!(manifest["volumes"][0]["guard"], guard, "{manifest}");
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
        let id = manifest["id"].as_str().unwrap();
        record_point(&mut vm, id, at_start);
        let file = vm.repo.join("vm1").join(id).join("disk0.qcow2");
        assert!(
            crate::harness::has_compressed_clusters(&file),
            "no compressed cluster in {}",
            file.display()
        );
        let info = crate::harness::run(
            Command::new("qemu-img")
                .args(["info", "-U", "--output=json"])
                .arg(&file),
        );
        let info: Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(
            info["format-specific"]["data"]["compression-type"], kind,
            "{info}"
        );
        crate::harness::run(
            Command::new("qemu-img")
                .args(["check", "-U", "-q"])
                .arg(&file),
        );
    }
    finish(vm);
}

/// bitback killed in the milliseconds the VM is paused for the point: the
/// guard it started beside itself resumes the VM, and the next run takes
/// out what the killed one left and is right.
#[test]
fn a_kill_while_the_vm_is_paused_for_the_point_leaves_it_running() {
    let dir = tempdir();
    let mut vm = Vm::with_devices(dir.path(), &[16 * MIB]);
    guest_writes(&mut vm, 0, 8, 0x12);
    // Running (its firmware finds nothing to boot and waits): a running VM
    // is paused for the point.
    vm.qemu().must("cont", Value::Null);
    assert_eq!(vm.backup(&[])["kind"], "full");
    let status = |vm: &Vm| vm.qemu().must("query-status", Value::Null)["status"].clone();
    let out = crate::harness::backup_into_env(
        &vm.qemu().qmp,
        &vm.repo,
        "vm1",
        &[],
        &[("BITBACK_FAULT", "paused")],
    );
    assert_eq!(
        out.code, None,
        "bitback was to die by SIGKILL: {}",
        out.stderr
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&vm) != "running" {
        assert!(
            Instant::now() < deadline,
            "the VM stayed {} after bitback died while it was paused",
            status(&vm)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    guest_writes(&mut vm, 2 * MIB, 4, 0x13);
    let next = vm.backup(&[]);
    assert_eq!(next["kind"], "incremental", "{next}");
    assert_eq!(status(&vm), "running");
    assert_nothing_left(&vm);
    finish(vm);
}

/// An NVMe disk, which `query-block` names by its bare id: guarded too,
/// and its point taken while the guest writes is the disk at the start.
#[test]
fn an_nvme_disk_is_guarded() {
    use crate::harness::{Kind, Qemu, create_qcow2};
    let dir = tempdir();
    let d = dir.path();
    let image = d.join("nvme.qcow2");
    create_qcow2(&image, 16 * MIB, &[]);
    let extra: Vec<String> = [
        "-blockdev".to_string(),
        format!(
            "driver=file,filename={},node-name=nvmefile",
            image.display()
        ),
        "-blockdev".into(),
        "driver=qcow2,file=nvmefile,node-name=nvmedisk".into(),
        "-device".into(),
        "nvme,serial=bitback1,drive=nvmedisk,id=nvme0".into(),
    ]
    .into();
    let qemu = Qemu::start_with(Kind::Pc, d, &[], &extra);
    let mut model = vec![0u8; 16 * MIB as usize];
    let write = |qemu: &Qemu, model: &mut Vec<u8>, at: u64, pattern: u8| {
        let out = qemu.must(
            "human-monitor-command",
            serde_json::json!({ "command-line": format!("qemu-io -d nvme0 \"write -P {pattern} {at} 1M\"") }),
        );
        assert!(!out.as_str().unwrap_or_default().contains("rror"), "{out}");
        model[at as usize..(at + MIB) as usize].fill(pattern);
    };
    for at in 0..12 {
        write(&qemu, &mut model, at * MIB, 0x31);
    }
    let repo = d.join("repo");
    let at_start = model.clone();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitback"))
        .args(["backup", "--qmp"])
        .arg(&qemu.qmp)
        .arg("--repo")
        .arg(&repo)
        .args(["--vm", "nv", "--json", "--speed-limit", "2M"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    qemu.wait_for_job(&mut child);
    for at in 4..12 {
        write(&qemu, &mut model, at * MIB, 0x32);
    }
    let ended = wait(child);
    assert_eq!(ended.code, Some(0), "{}", ended.stderr);
    let manifest: Value = serde_json::from_str(&ended.stdout).unwrap();
    assert_eq!(manifest["volumes"][0]["guard"], "bitback", "{manifest}");
    let on = qemu.must(
        "qom-get",
        serde_json::json!({ "path": "/machine/peripheral/nvme0", "property": "drive" }),
    );
    assert_eq!(on, "nvmedisk");
    qemu.quit();
    let point = d.join("point.raw");
    std::fs::write(&point, &at_start).unwrap();
    let id = manifest["id"].as_str().unwrap();
    let file = repo.join("nv").join(id).join(format!(
        "{}.qcow2",
        manifest["volumes"][0]["name"].as_str().unwrap()
    ));
    assert!(
        same_content(&point, "raw", &file, "qcow2"),
        "the point differs from the disk at its start"
    );
    let now = d.join("now.raw");
    std::fs::write(&now, &model).unwrap();
    assert!(
        same_content(&now, "raw", &image, "qcow2"),
        "a guest write was lost"
    );
}

/// The same VM backed up into two repositories at once: the first run's
/// guard stands under the device, so the second waits for it to go (its
/// lock), then takes its own point under bitback's filter, not QEMU's.
/// The guest writes while the second copies: each point is the disk at
/// its start.
#[test]
fn two_repositories_at_once_each_keep_their_point() {
    let dir = tempdir();
    let mut vm = Vm::with_devices(dir.path(), &[32 * MIB]);
    guest_writes(&mut vm, 0, 16, 0x11);
    // QEMU serves one client per monitor socket: a third one for the
    // second repository's run.
    let third = dir.path().join("third.sock");
    vm.quit();
    vm.qemu = Some(crate::harness::Qemu::start_with(
        crate::harness::Kind::Pc,
        &vm.dir,
        &vm.disks,
        &[
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", third.display()),
        ],
    ));
    let offsite = dir.path().join("offsite");
    let at_start = vm.models[0].bytes.clone();
    let mut local = spawn_backup(&vm, &["--speed-limit", "8M"]);
    wait_for_job(&vm, &mut local);
    let mut remote = Command::new(env!("CARGO_BIN_EXE_bitback"))
        .args(["backup", "--qmp"])
        .arg(&third)
        .arg("--repo")
        .arg(&offsite)
        .args(["--vm", "vm1", "--json", "--speed-limit", "1M"])
        .env("BITBACK_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = wait(local);
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    // The first is done; the second now copies (1 MiB/s over 16 MiB).
    wait_for_job(&vm, &mut remote);
    guest_writes(&mut vm, 12 * MIB, 4, 0x22);
    let second = wait(remote);
    assert_eq!(second.code, Some(0), "{}", second.stderr);
    let m1: Value = serde_json::from_str(&first.stdout).unwrap();
    let m2: Value = serde_json::from_str(&second.stdout).unwrap();
    assert_eq!(m1["volumes"][0]["guard"], "bitback", "{m1}");
    assert_eq!(m2["volumes"][0]["guard"], "bitback", "{m2}");
    assert!(
        second.stderr.contains("waiting for another bitback run"),
        "{}",
        second.stderr
    );
    assert_nothing_left(&vm);
    let point = dir.path().join("point.raw");
    std::fs::write(&point, &at_start).unwrap();
    for (repo, m) in [(&vm.repo, &m1), (&offsite, &m2)] {
        let file = repo
            .join("vm1")
            .join(m["id"].as_str().unwrap())
            .join("disk0.qcow2");
        assert!(
            same_content(&point, "raw", &file, "qcow2"),
            "{} differs from the disk at its start",
            file.display()
        );
    }
    finish(vm);
}

/// An incremental by content of a guarded volume (its bitmap lost with a
/// killed QEMU) while the guest overwrites data not yet copied: the
/// filter's copies go to a fleecing image (bitback's writer keeps nothing
/// it finds unchanged, so the job could not read them back from the
/// target), nothing changed before the point so the file stores nothing,
/// and the point is the disk at its start.
#[test]
fn a_guarded_incremental_by_content_fleeces_and_keeps_its_point() {
    let dir = tempdir();
    let mut vm = vm_with_data(dir.path());
    let full = vm.backup(&["--data-path", "nbd"]);
    assert_eq!(full["kind"], "full");
    // A guest flushes what it needs kept; a kill loses qcow2 metadata
    // not yet written.
    let device = vm.disks[0].device.clone();
    vm.qemu().qemu_io_device(&device, "flush");
    vm.kill();
    vm.start();
    let m = backup_while_writing(
        &mut vm,
        &["--data-path", "nbd", "--speed-limit", "8M"],
        (0, 40, 0x66),
        "incremental",
        "fleecing",
    );
    let v = &m["volumes"][0];
    assert_eq!(v["changes"], "content", "{m}");
    assert_eq!(v["bytes_written"], 0, "{m}");
    finish(vm);
}

/// Disks given the older way, with `-drive` (plain QEMU scripts,
/// appliances, older management layers): QEMU's graph names the device's
/// backend by its drive id, not by the device. Each is still the guest's
/// own disk: bitback's filter goes under its device, so a repository that
/// fills up breaks the backup and every guest write lands (before, every
/// one took QEMU's own filter, and writes failed with "No space left on
/// device"). The guest's writes go through the device's backend by its
/// name, above any filter, as a guest's do.
#[test]
fn disks_given_with_drive_are_guarded_when_the_repository_fills_up() {
    use crate::harness::{Kind, Qemu, create_qcow2, run};
    let configs: [(&str, &[&str]); 4] = [
        (
            "if=none",
            &["-device", "virtio-blk-pci,drive=drive0,id=disk0"],
        ),
        ("if=virtio", &[]),
        ("if=none", &["-device", "ide-hd,drive=drive0,id=disk0"]),
        (
            "if=none",
            &[
                "-device",
                "virtio-scsi-pci,id=scsi0",
                "-device",
                "scsi-hd,drive=drive0,id=disk0",
            ],
        ),
    ];
    for (drive, devices) in configs {
        let dir = tempdir();
        let image = dir.path().join("disk.qcow2");
        create_qcow2(&image, 64 * MIB, &[]);
        let mut extra = vec![
            "-drive".to_string(),
            format!("file={},format=qcow2,{drive},id=drive0", image.display()),
        ];
        extra.extend(devices.iter().map(|s| s.to_string()));
        let qemu = Qemu::start_with(Kind::Pc, dir.path(), &[], &extra);
        let mut model = vec![0u8; 64 * MIB as usize];
        let mut write = |from: u64, count: u64, pattern: u8| {
            for i in 0..count {
                let at = from + i * MIB;
                qemu.qemu_io("drive0", &format!("write -P {pattern:#x} {at} {MIB}"));
                model[at as usize..(at + MIB) as usize].fill(pattern);
            }
        };
        write(0, 48, 0x11);
        let small = dir.path().join("small");
        let _tmpfs = Tmpfs::mount(&small, "16M");
        let mut child = spawn_backup_at(
            &qemu.qmp,
            &small.join("repo"),
            &["--speed-limit", "2M"],
            &[],
        );
        qemu.wait_for_job(&mut child);
        write(24 * MIB, 24, 0x33);
        let ended = wait(child);
        assert_eq!(ended.code, Some(1), "{drive} {devices:?}: {}", ended.stderr);
        assert!(
            ended.stderr.contains("the backup broke, not the guest"),
            "{drive} {devices:?}: {}",
            ended.stderr
        );
        assert!(
            !ended.stderr.contains("QEMU's own filter"),
            "{drive} {devices:?}: {}",
            ended.stderr
        );
        qemu.quit();
        let raw = dir.path().join("model.raw");
        std::fs::write(&raw, &model).unwrap();
        let out = run(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&raw)
            .arg(&image));
        assert!(
            out.status.success(),
            "{drive} {devices:?}: a guest write was lost"
        );
    }
}

/// Scratch images (a compressed backup that QEMU writes keeps the old
/// data of guest writes in one) go in a directory of the run's own,
/// 0700 with a random name, never at a name any local user can take
/// ahead in the shared temp dir: a link to nowhere and a FIFO planted at
/// the names the scratch images once had change nothing, and each run
/// leaves nothing behind.
#[test]
fn planted_scratch_names_in_the_temp_dir_do_not_stop_backups() {
    let dir = tempdir();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut vm = Vm::with_devices(dir.path(), &[8 * MIB]);
    guest_writes(&mut vm, 0, 4, 0x21);
    let env = [("TMPDIR", tmp.to_str().unwrap())];
    let args = ["--compress", "--data-path", "file"];
    let full = crate::harness::backup_into_env(&vm.qemu().qmp, &vm.repo, "vm1", &args, &env);
    assert_eq!(full.json()["kind"], "full");
    let id: Value =
        serde_json::from_str(&std::fs::read_to_string(vm.repo.join(".bitback.json")).unwrap())
            .unwrap();
    let scope = bitback::engine::scope::Scope::new(id["id"].as_str().unwrap(), "vm1");
    std::os::unix::fs::symlink(
        "/nonexistent",
        tmp.join(format!("{}.qcow2", scope.fleece(0))),
    )
    .unwrap();
    let fifo = tmp.join(format!("{}.qcow2", scope.fleece(1)));
    run_ok(Command::new("mkfifo").arg(&fifo));
    let planted = |tmp: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = planted(&tmp);
    for round in 0..2u8 {
        guest_writes(&mut vm, MIB, 2, 0x30 + round);
        let at_start = vm.models[0].bytes.clone();
        let mut extra = vec!["--speed-limit", "4M"];
        extra.extend(args);
        let mut child = spawn_backup_at(&vm.qemu().qmp, &vm.repo, &extra, &env);
        wait_for_job(&vm, &mut child);
        guest_writes(&mut vm, 0, 2, 0x40 + round);
        let ended = wait(child);
        assert_eq!(ended.code, Some(0), "{}", ended.stderr);
        let m: Value = serde_json::from_str(&ended.stdout).unwrap();
        // The old data went to the run's scratch image.
        assert_eq!(m["volumes"][0]["guard"], "fleecing", "{m}");
        record_point(&mut vm, m["id"].as_str().unwrap(), at_start);
        assert_eq!(planted(&tmp), before, "the run left or took a name");
    }
    finish(vm);
}

fn run_ok(cmd: &mut Command) {
    let status = cmd.status().unwrap();
    assert!(status.success(), "{cmd:?}: {status}");
}

/// A repository whose filesystem goes away mid-backup (its FUSE server
/// killed: ENOTCONN): the backup breaks and says the filesystem is gone,
/// every guest write lands.
#[test]
fn a_repository_whose_filesystem_goes_away_says_so_and_spares_the_guest() {
    let dir = tempdir();
    let mut vm = vm_with_data(dir.path());
    let mut slow = SlowFs::mount(
        &dir.path().join("nas-store"),
        &dir.path().join("nas"),
        4 << 20,
    );
    vm.repo = slow.mountpoint.join("repo");
    let mut child = spawn_backup(&vm, &["--speed-limit", "2M"]);
    wait_for_job(&vm, &mut child);
    slow.kill();
    guest_writes(&mut vm, 24 * MIB, 8, 0x44);
    let ended = wait(child);
    assert_eq!(ended.code, Some(1), "{}", ended.stderr);
    assert!(
        ended
            .stderr
            .contains("the backup broke, not the guest: the filesystem of"),
        "{}",
        ended.stderr
    );
    assert!(ended.stderr.contains("is gone"), "{}", ended.stderr);
    assert_writes_landed(&vm);
    drop(slow);
    vm.quit();
    assert_disk_is_model(&vm);
}

/// A guarded full copies only what the volume may hold, read from its
/// image after the point. What the guest discards after the point
/// (through the device, the volume with `discard=unmap`) before that read
/// is still in the backup: the filter copied it first, to the target
/// or to the fleecing image (whose record is merged into the job's
/// bitmap). Held between the point and the read (`BITBACK_HOLD`), the
/// guest discards half the data and writes over some of the freed room;
/// every point restores to the disk as it was at the start. A 1 TiB
/// overlay's full copies its chain's 48 MiB, not its virtual size (QEMU's
/// job says), and restores to the disk.
#[test]
fn a_guarded_full_copies_what_the_volume_held_at_the_point() {
    use crate::harness::{Disk, Kind, create_qcow2};
    // A v3 image marks a discarded cluster as zeros, which the mask
    // counts; a v2 image frees it outright, which only the filter's copy
    // (to the target, or to the fleecing image) keeps.
    for (compat, fleecing) in [
        ("1.1", false),
        ("0.10", false),
        ("0.10", true),
        ("1.1", true),
    ] {
        let dir = tempdir();
        let image = dir.path().join("disk0.qcow2");
        create_qcow2(&image, 64 * MIB, &["-o", &format!("compat={compat}")]);
        let disk = Disk::with_format("disk0", "drive0", &image, "qcow2", "discard=unmap");
        let mut vm = Vm::from_disks(Kind::Pc, dir.path(), vec![disk], &[64 * MIB]);
        guest_writes(&mut vm, 0, 48, 0x11);
        let at_start = vm.models[0].bytes.clone();
        let go = dir.path().join("go");
        let hold = format!("before-mask:{}", go.display());
        let (_fleece, fleece_arg) = fleece_dir(dir.path());
        let mut extra = vec![];
        if fleecing {
            extra.extend(["--fleecing", fleece_arg.as_str()]);
        }
        let child = spawn_backup_at(&vm.qemu().qmp, &vm.repo, &extra, &[("BITBACK_HOLD", &hold)]);
        let held = go.with_file_name("go.held");
        let until = Instant::now() + Duration::from_secs(60);
        while !held.exists() {
            assert!(Instant::now() < until, "bitback never reached the mask");
            std::thread::sleep(Duration::from_millis(20));
        }
        let device = vm.disks[0].device.clone();
        vm.qemu()
            .qemu_io_device(&device, &format!("discard 0 {}", 24 * MIB));
        vm.models[0].bytes[..(24 * MIB) as usize].fill(0);
        vm.qemu().qemu_io_device(&device, "flush");
        let before = Command::new("qemu-img")
            .args(["map", "--output=json", "-U"])
            .arg(&image)
            .output()
            .unwrap();
        let map: Value = serde_json::from_slice(&before.stdout).unwrap();
        assert!(
            map.as_array()
                .unwrap()
                .iter()
                .any(|e| e["start"] == 0 && e["data"] == false),
            "the discard freed nothing, so the test proves nothing: {map}"
        );
        guest_writes(&mut vm, 56, 4, 0x22);
        std::fs::write(&go, b"").unwrap();
        let ended = wait(child);
        assert_eq!(ended.code, Some(0), "{}", ended.stderr);
        let manifest: Value = serde_json::from_str(&ended.stdout).unwrap();
        let guard = if fleecing { "fleecing" } else { "bitback" };
        assert_eq!(manifest["volumes"][0]["guard"], guard, "{manifest}");
        record_point(&mut vm, manifest["id"].as_str().unwrap(), at_start);
        assert_nothing_left(&vm);
        finish(vm);
    }

    // 1 TiB: an overlay (backing name relative, as QEMU resolves it) over
    // a base holding 16 MiB; the guest writes 32 MiB more.
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    create_qcow2(&base, 1 << 40, &[]);
    crate::harness::run(Command::new("qemu-io").args([
        "-f",
        "qcow2",
        "-c",
        &format!("write -P 0x44 {} {}", 300u64 << 30, 16 * MIB),
        base.to_str().unwrap(),
    ]));
    let image = dir.path().join("disk0.qcow2");
    create_qcow2(&image, 1 << 40, &["-b", "base.qcow2", "-F", "qcow2"]);
    let disk = Disk::new("disk0", "drive0", &image);
    let qemu = crate::harness::Qemu::start(Kind::Pc, dir.path(), &[disk]);
    for at in [0, (1 << 40) - 16 * MIB] {
        qemu.qemu_io_device("disk0", &format!("write -P 0x33 {at} {}", 16 * MIB));
    }
    // QEMU's own count of what the job copies, asked while bitback holds
    // with the job concluded.
    let repo = dir.path().join("repo");
    let go = dir.path().join("go");
    let hold = format!("after-jobs:{}", go.display());
    let child = spawn_backup_at(&qemu.qmp, &repo, &[], &[("BITBACK_HOLD", &hold)]);
    let held = go.with_file_name("go.held");
    let until = Instant::now() + Duration::from_secs(120);
    while !held.exists() {
        assert!(Instant::now() < until, "bitback never finished the job");
        std::thread::sleep(Duration::from_millis(20));
    }
    let jobs = qemu.must("query-jobs", json!({}));
    std::fs::write(&go, b"").unwrap();
    assert_eq!(jobs[0]["status"], "concluded", "{jobs}");
    assert_eq!(jobs[0]["total-progress"], 48 * MIB, "{jobs}");
    let ended = wait(child);
    assert_eq!(ended.code, Some(0), "{}", ended.stderr);
    let manifest: Value = serde_json::from_str(&ended.stdout).unwrap();
    assert_eq!(manifest["volumes"][0]["guard"], "bitback", "{manifest}");
    qemu.quit();
    assert_point_is_disk(&repo, &image, &dir.path().join("restored.raw"));
}

/// A QEMU (`-machine pc -S`) whose one 64 MiB volume under a virtio-blk
/// device holds 16 MiB written through it, with `sockets` extra QMP
/// sockets for as many bitback runs at once.
fn vm_with_sockets(dir: &Path, sockets: usize) -> (crate::harness::Qemu, Vec<PathBuf>) {
    use crate::harness::{Disk, Kind, Qemu, create_qcow2};
    let image = dir.join("disk0.qcow2");
    create_qcow2(&image, 64 * MIB, &[]);
    let paths: Vec<PathBuf> = (0..sockets)
        .map(|i| dir.join(format!("run{i}.qmp")))
        .collect();
    let extra: Vec<String> = paths
        .iter()
        .flat_map(|p| {
            [
                "-qmp".to_string(),
                format!("unix:{},server=on,wait=off", p.display()),
            ]
        })
        .collect();
    let qemu = Qemu::start_with(
        Kind::Pc,
        dir,
        &[Disk::new("disk0", "drive0", &image)],
        &extra,
    );
    for k in 0..16u64 {
        qemu.qemu_io_device(
            "disk0",
            &format!("write -P {:#x} {} 1M", k + 1, k * 4 * MIB),
        );
    }
    (qemu, paths)
}

/// The guard locks left in QEMU (`bitback-guard-*` objects).
fn guard_locks(qemu: &crate::harness::Qemu) -> Vec<String> {
    qemu.must("qom-list", json!({ "path": "/objects" }))
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .filter(|n| n.starts_with("bitback-guard-"))
        .map(String::from)
        .collect()
}

/// Restores `repo`'s newest point of vm1 and compares it with the disk
/// (the VM does not run: the disk holds still).
fn assert_point_is_disk(repo: &Path, disk: &Path, out: &Path) {
    let run = crate::harness::bitback(&[
        "restore",
        "--repo",
        repo.to_str().unwrap(),
        "--vm",
        "vm1",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    // Beside the QEMU that holds the disk: -U.
    let cmp = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "qcow2"])
        .arg(out)
        .arg(disk)
        .output()
        .unwrap();
    assert_eq!(
        cmp.status.code(),
        Some(0),
        "the point in {} is not the disk: {}{}",
        repo.display(),
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
}

/// Three runs of one VM at once, each into its own repository (a local
/// and two offsite ones): each takes its point under bitback's own
/// filter, one after the other, instead of the later ones going through
/// QEMU's filter, and none cuts another's filter out from under the
/// device (which would change that run's point under its copy).
#[test]
fn runs_of_one_vm_at_once_take_turns_each_under_bitbacks_filter() {
    let dir = tempdir();
    let d = dir.path();
    let (qemu, sockets) = vm_with_sockets(d, 3);
    let repos: Vec<PathBuf> = (0..3).map(|i| d.join(format!("repo{i}"))).collect();
    // The first is slow (16 MiB at 4 MiB/s), so the others meet its filter.
    let env = [("BITBACK_LOG", "info")];
    let mut first = spawn_backup_at(&sockets[0], &repos[0], &["--speed-limit", "4M"], &env);
    qemu.wait_for_job(&mut first);
    let others: Vec<Child> = (1..3)
        .map(|i| spawn_backup_at(&sockets[i], &repos[i], &[], &env))
        .collect();
    let mut ended = vec![wait(first)];
    ended.extend(others.into_iter().map(wait));
    for (i, e) in ended.iter().enumerate() {
        assert_eq!(e.code, Some(0), "run {i}: {}", e.stderr);
        let m: Value = serde_json::from_str(&e.stdout).unwrap();
        assert_eq!(
            m["volumes"][0]["guard"],
            json!("bitback"),
            "run {i} went through QEMU's filter: {}",
            e.stderr
        );
    }
    assert!(
        ended[1..]
            .iter()
            .any(|e| e.stderr.contains("waiting for another bitback run")),
        "no run waited for another:\n{}\n{}",
        ended[1].stderr,
        ended[2].stderr
    );
    for (i, repo) in repos.iter().enumerate() {
        assert_point_is_disk(repo, &d.join("disk0.qcow2"), &d.join(format!("out{i}.raw")));
    }
    assert_eq!(guard_locks(&qemu), Vec::<String>::new());
}

/// A run killed while its filter stands leaves its lock: another
/// repository's run waits a few seconds, sees nothing of the dead run
/// but the lock and its filter, and copies through QEMU's filter, saying
/// why; the dead run's own next backup takes its leftovers out, lock
/// included.
#[test]
fn a_killed_runs_lock_is_passed_by_others_and_removed_by_its_own_next_run() {
    let dir = tempdir();
    let d = dir.path();
    let (qemu, sockets) = vm_with_sockets(d, 2);
    let (mine, other) = (d.join("mine"), d.join("other"));
    let mut killed = spawn_backup_at(&sockets[0], &mine, &["--speed-limit", "1M"], &[]);
    qemu.wait_for_job(&mut killed);
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert_eq!(guard_locks(&qemu).len(), 1, "the killed run held a lock");
    // Its job, filter and target stay in QEMU until its scope's next run;
    // its process is gone, so the lock is known for a dead run's at once.
    let passed = wait(spawn_backup_at(&sockets[1], &other, &[], &[]));
    assert_eq!(passed.code, Some(0), "{}", passed.stderr);
    let m: Value = serde_json::from_str(&passed.stdout).unwrap();
    assert_eq!(m["volumes"][0]["guard"], json!("qemu"), "{}", passed.stderr);
    assert!(passed.stderr.contains("killed"), "{}", passed.stderr);
    assert_point_is_disk(&other, &d.join("disk0.qcow2"), &d.join("other.raw"));
    // The dead run's scope cleans up after it, lock included.
    let again = wait(spawn_backup_at(&sockets[0], &mine, &[], &[]));
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    let m: Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(
        m["volumes"][0]["guard"],
        json!("bitback"),
        "{}",
        again.stderr
    );
    assert_eq!(guard_locks(&qemu), Vec::<String>::new());
    assert_point_is_disk(&mine, &d.join("disk0.qcow2"), &d.join("mine.raw"));
}

/// A run waiting for another's filter, asked to stop (SIGTERM), stops
/// without a point and without a lock, and the other goes on.
#[test]
fn a_run_waiting_for_another_stops_when_asked() {
    let dir = tempdir();
    let d = dir.path();
    let (qemu, sockets) = vm_with_sockets(d, 2);
    let (first_repo, second_repo) = (d.join("first"), d.join("second"));
    let mut first = spawn_backup_at(&sockets[0], &first_repo, &["--speed-limit", "2M"], &[]);
    qemu.wait_for_job(&mut first);
    let waiting = spawn_backup_at(&sockets[1], &second_repo, &[], &[("BITBACK_LOG", "info")]);
    std::thread::sleep(Duration::from_secs(2));
    crate::harness::run(Command::new("kill").args(["-TERM", &waiting.id().to_string()]));
    let stopped = wait(waiting);
    assert_eq!(stopped.code, Some(1), "{}", stopped.stderr);
    assert!(stopped.stderr.contains("interrupted"), "{}", stopped.stderr);
    let done = wait(first);
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let m: Value = serde_json::from_str(&done.stdout).unwrap();
    assert_eq!(m["volumes"][0]["guard"], json!("bitback"));
    assert_eq!(guard_locks(&qemu), Vec::<String>::new());
    let listed =
        crate::harness::bitback(&["list", "--repo", second_repo.to_str().unwrap(), "--json"]);
    if listed.code == Some(0) {
        assert_eq!(
            serde_json::from_str::<Value>(&listed.stdout).unwrap(),
            json!([])
        );
    }
    assert_point_is_disk(&first_repo, &d.join("disk0.qcow2"), &d.join("first.raw"));
}

/// An object of the guard lock's name that bitback did not make: the run
/// goes on without the lock (still under bitback's filter) and leaves the
/// object alone.
#[test]
fn a_planted_lock_object_is_left_alone_and_the_run_goes_on() {
    let dir = tempdir();
    let d = dir.path();
    let (qemu, sockets) = vm_with_sockets(d, 1);
    let hash = blake3::hash(b"drive0");
    let id = format!("bitback-guard-{}", &hash.to_hex()[..16]);
    qemu.must(
        "object-add",
        json!({ "qom-type": "authz-simple", "id": id, "identity": "someone-else" }),
    );
    let repo = d.join("repo");
    let ran = wait(spawn_backup_at(&sockets[0], &repo, &[], &[]));
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    assert!(ran.stderr.contains("without the lock"), "{}", ran.stderr);
    let m: Value = serde_json::from_str(&ran.stdout).unwrap();
    assert_eq!(m["volumes"][0]["guard"], json!("bitback"), "{}", ran.stderr);
    assert_eq!(guard_locks(&qemu), [id], "the planted object was touched");
    assert_point_is_disk(&repo, &d.join("disk0.qcow2"), &d.join("out.raw"));
}
