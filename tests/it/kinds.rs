//! Every kind of disk, decided per volume: qcow2 v3, raw files, raw block
//! devices (a loop device), qcow2 v2 and LUKS-encrypted qcow2 in one VM;
//! encrypted backups. Judged by raw models written beside the guest's
//! writes, with `qemu-img compare` / `check` / `info` as the oracle.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::harness::{
    Disk, Kind, LoopDevice, Qemu, bitback, create_qcow2, list_ids, qemu_img_info, require, run,
    same_content, tempdir, write_key,
};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

/// A VM of `-machine none` whose volumes are named after their nodes, with
/// a model per volume.
struct Vm {
    dir: PathBuf,
    repo: PathBuf,
    disks: Vec<Disk>,
    extra: Vec<String>,
    models: BTreeMap<String, Vec<u8>>,
    qemu: Option<Qemu>,
    /// (backup id, model file per volume of the backup)
    points: Vec<(String, BTreeMap<String, PathBuf>)>,
}

impl Vm {
    /// Starts QEMU in `dir` with `disks`, each with a zero model of SIZE
    /// bytes, and the secret of the LUKS images (`source-key`).
    fn start_in(dir: &Path, disks: Vec<Disk>) -> Vm {
        let mut vm = Vm {
            dir: dir.into(),
            repo: dir.join("repo"),
            models: disks
                .iter()
                .map(|disk| (disk.node.clone(), vec![0; SIZE as usize]))
                .collect(),
            disks,
            extra: vec!["-object".into(), "secret,id=sec0,data=source-key".into()],
            qemu: None,
            points: Vec::new(),
        };
        vm.start();
        vm
    }

    fn start(&mut self) {
        self.qemu = Some(Qemu::start_with(
            Kind::MachineNone,
            &self.dir,
            &self.disks,
            &self.extra,
        ));
    }

    fn qemu(&self) -> &Qemu {
        self.qemu.as_ref().expect("QEMU is running")
    }

    fn write(&mut self, node: &str, offset: u64, len: u64, pattern: u8) {
        self.qemu()
            .qemu_io(node, &format!("write -P {pattern:#x} {offset} {len}"));
        self.models.get_mut(node).expect("a model")[offset as usize..(offset + len) as usize]
            .fill(pattern);
    }

    /// A write to every volume, at a place and pattern given by `round`.
    fn write_all(&mut self, round: u64) {
        let nodes: Vec<String> = self.models.keys().cloned().collect();
        for (i, node) in nodes.iter().enumerate() {
            let offset = (round * 3 + i as u64) % 60 * 128 * 1024;
            self.write(
                node,
                offset,
                96 * 1024,
                (0x20 + round * 16 + i as u64) as u8,
            );
        }
    }

    fn backup(&mut self, extra: &[&str]) -> Value {
        let qmp = self.qemu().qmp.clone();
        let mut args = vec![
            "backup",
            "--qmp",
            qmp.to_str().unwrap(),
            "--repo",
            self.repo.to_str().unwrap(),
            "--vm",
            "vm1",
            "--json",
        ];
        args.extend(extra);
        let m = bitback(&args).json();
        self.snapshot(&m);
        m
    }

    /// Records the models as the contents of backup `m`.
    fn snapshot(&mut self, m: &Value) {
        let id = m["id"].as_str().unwrap().to_string();
        let mut files = BTreeMap::new();
        for v in m["volumes"].as_array().unwrap() {
            let name = v["name"].as_str().unwrap();
            let path = self.dir.join(format!("model-{id}-{name}.raw"));
            std::fs::write(&path, &self.models[name]).unwrap();
            files.insert(name.to_string(), path);
        }
        self.points.push((id, files));
    }

    fn quit(&mut self) {
        if let Some(qemu) = self.qemu.take() {
            qemu.quit();
        }
    }

    /// Every point of every volume equals its model (unencrypted
    /// backups: `qemu-img compare` follows the backing names).
    fn check_all_points(&self) {
        for (id, files) in &self.points {
            for (name, model) in files {
                let backup = self.repo.join("vm1").join(id).join(format!("{name}.qcow2"));
                assert!(
                    same_content(model, "raw", &backup, "qcow2"),
                    "{} differs from its model",
                    backup.display()
                );
                run(Command::new("qemu-img")
                    .args(["check", "-q", "-f", "qcow2"])
                    .arg(&backup));
            }
        }
    }
}

/// volume name -> (kind, reason, tracking, disk)
fn volumes(m: &Value) -> BTreeMap<String, (String, String, String, String)> {
    m["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            (
                s("name"),
                (s("kind"), s("reason"), s("tracking"), s("disk")),
            )
        })
        .collect()
}

/// A LUKS qcow2 disk opened with the secret `Vm::start_in` gives QEMU.
fn luks_disk(node: &str, image: &Path) -> Disk {
    Disk::with_format(
        node,
        node,
        image,
        "qcow2",
        "encrypt.format=luks,encrypt.key-secret=sec0",
    )
}

/// A LUKS qcow2 image. QEMU 7.2's key-derivation calibration sometimes
/// fails ("Unable to get accurate CPU usage", about 1 create in 3 here):
/// tried up to 20 times.
fn luks_qcow2(path: &Path, secret: &str) {
    for attempt in 1..=20 {
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "--object"])
            .arg(format!("secret,id=sec0,data={secret}"))
            .args([
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            ])
            .arg(path)
            .arg(SIZE.to_string())
            .output()
            .expect("running qemu-img");
        if out.status.success() {
            return;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            attempt < 20 && stderr.contains("Unable to get accurate CPU usage"),
            "qemu-img create of {}: {stderr}",
            path.display()
        );
        let _ = std::fs::remove_file(path);
    }
}

/// A VM of the five kinds of disk (qcow2 v3, raw file, raw block device
/// on a loop device, qcow2 v2, LUKS in qcow2), each with a zero model;
/// the loop device and the LUKS source's key file with it.
fn five_kinds(d: &Path) -> (Vm, LoopDevice, PathBuf) {
    create_qcow2(&d.join("v3.qcow2"), SIZE, &[]);
    create_qcow2(&d.join("v2.qcow2"), SIZE, &["-o", "compat=0.10"]);
    std::fs::File::create(d.join("raw.img"))
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    std::fs::File::create(d.join("dev.img"))
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let device = LoopDevice::new(&d.join("dev.img"));
    luks_qcow2(&d.join("luks.qcow2"), "source-key");
    let source_key = d.join("source.key");
    write_key(&source_key, "source-key");

    let disks = vec![
        Disk::with_format("v3", "v3", &d.join("v3.qcow2"), "qcow2", ""),
        Disk::with_format("raw", "raw", &d.join("raw.img"), "raw", ""),
        Disk::with_format("dev", "dev", &device.device, "raw", ""),
        Disk::with_format("v2", "v2", &d.join("v2.qcow2"), "qcow2", ""),
        luks_disk("luks", &d.join("luks.qcow2")),
    ];
    (Vm::start_in(d, disks), device, source_key)
}

/// What bitback says of the five kinds before any backup: how each is
/// tracked, and that an encrypted volume is not copied to plaintext unasked.
#[test]
fn five_kinds_of_disk_are_told_apart_and_encryption_is_not_dropped_unasked() {
    let dir = tempdir();
    let d = dir.path();
    let (mut vm, _device, _source_key) = five_kinds(d);
    // inspect says how each volume is tracked.
    let qmp = vm.qemu().qmp.clone();
    let info = bitback(&["inspect", "--qmp", qmp.to_str().unwrap(), "--json"]).json();
    let tracking: BTreeMap<&str, (&str, &str, bool)> = info["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap(),
                (
                    v["kind"].as_str().unwrap(),
                    v["tracking"].as_str().unwrap(),
                    v["encrypted"].as_bool().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(
        tracking,
        BTreeMap::from([
            ("dev", ("raw-device", "memory", false)),
            ("luks", ("qcow2", "persistent", true)),
            ("raw", ("raw-file", "memory", false)),
            ("v2", ("qcow2-v2", "memory", false)),
            ("v3", ("qcow2", "persistent", false)),
        ])
    );

    // An encrypted volume is not copied into plaintext unasked.
    vm.write_all(0);
    let refused = bitback(&[
        "backup",
        "--qmp",
        qmp.to_str().unwrap(),
        "--repo",
        vm.repo.to_str().unwrap(),
        "--vm",
        "vm1",
    ]);
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    for word in [
        "luks",
        "encrypted",
        "--encrypt-key-file",
        "--allow-plaintext",
    ] {
        assert!(refused.stderr.contains(word), "{word}: {}", refused.stderr);
    }
    assert!(!vm.repo.exists() || list_ids(&vm.repo, Some("vm1")).is_empty());

    vm.quit();
}

#[test]
fn five_kinds_of_disk_full_incremental_restart_hotplug_and_stopped() {
    let dir = tempdir();
    let d = dir.path();
    let (mut vm, device, source_key) = five_kinds(d);
    vm.write_all(0);
    let plain = ["--allow-plaintext"];
    let full = vm.backup(&plain);
    assert_eq!(full["kind"], "full");
    let v = volumes(&full);
    assert_eq!(v["v3"].2, "persistent");
    assert_eq!(v["luks"].2, "persistent");
    for name in ["raw", "dev", "v2"] {
        assert_eq!(v[name].2, "memory", "{name}");
    }
    assert_eq!(v["dev"].3, "raw-device");
    assert_eq!(v["v2"].3, "qcow2-v2");

    // While this QEMU lives, every kind is incremental.
    vm.write_all(1);
    let incr = vm.backup(&plain);
    assert_eq!(incr["kind"], "incremental");
    for (name, (kind, reason, ..)) in volumes(&incr) {
        assert_eq!(kind, "incremental", "{name}: {reason}");
    }
    // Each incremental holds about what was written (96 KiB, in 64 KiB
    // units), not the disk.
    for v in incr["volumes"].as_array().unwrap() {
        assert!(
            v["bytes_written"].as_u64().unwrap() <= 192 * 1024,
            "{}: {}",
            v["name"],
            v["bytes_written"]
        );
    }

    // A clean restart: only the persistent bitmaps survive. The others'
    // changes are found by content where bitback writes the files (the
    // default data path), else they are fulls.
    let by_content = std::env::var("BITBACK_DATA_PATH").as_deref() != Ok("file");
    let changes = |m: &Value, name: &str| {
        m["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .map(|v| v["changes"].as_str().unwrap_or_default().to_string())
            .unwrap()
    };
    vm.quit();
    vm.start();
    vm.write_all(2);
    let after = vm.backup(&plain);
    assert_eq!(after["kind"], "incremental");
    let v = volumes(&after);
    for name in ["v3", "luks"] {
        assert_eq!(v[name].0, "incremental", "{name}: {}", v[name].1);
        assert_eq!(changes(&after, name), "bitmap");
    }
    for (name, what) in [
        ("raw", "raw image"),
        ("dev", "raw block device"),
        ("v2", "qcow2 v2 image"),
    ] {
        let (kind, found) = match by_content {
            true => ("incremental", "content"),
            false => ("full", "full"),
        };
        assert_eq!(v[name].0, kind, "{name}: {}", v[name].1);
        assert_eq!(changes(&after, name), found, "{name}");
        let lost = format!(
            "volume {name} is a {what}: changes are tracked in memory only, and QEMU restarted"
        );
        assert!(v[name].1.contains(&lost), "{name}: {}", v[name].1);
        if by_content {
            // About what was written, not the disk.
            let written = after["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["name"] == name)
                .unwrap()["bytes_written"]
                .as_u64()
                .unwrap();
            assert!(written <= 192 * 1024, "{name}: {written} bytes stored");
        }
    }
    assert!(v["v2"].1.contains("qemu-img amend -f qcow2 -o compat=1.1"));

    // A hot-plugged disk is a full of that disk alone.
    create_qcow2(&d.join("x9.qcow2"), 4 * MIB, &[]);
    vm.qemu().must(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "x9",
               "file": {"driver": "file", "filename": d.join("x9.qcow2")}}),
    );
    vm.models.insert("x9".into(), vec![0; 4 * MIB as usize]);
    vm.write("x9", MIB, 64 * 1024, 0x99);
    vm.write("v3", 5 * MIB, 4096, 0x98);
    let plugged = vm.backup(&plain);
    let v = volumes(&plugged);
    assert_eq!(v["x9"].0, "full");
    assert!(v["x9"].1.contains("volume x9 is new"), "{}", v["x9"].1);
    for name in ["v3", "raw", "dev", "v2", "luks"] {
        assert_eq!(v[name].0, "incremental", "{name}: {}", v[name].1);
    }

    // Stopped: every image opened with its own driver; the v3 images
    // continue from the bitmaps QEMU stored at its quit.
    vm.quit();
    let images: Vec<String> = vec![
        format!("v3={}", d.join("v3.qcow2").display()),
        format!("raw={}", d.join("raw.img").display()),
        format!("dev={}", device.device.display()),
        format!("v2={}", d.join("v2.qcow2").display()),
        format!("luks={}", d.join("luks.qcow2").display()),
        format!("x9={}", d.join("x9.qcow2").display()),
    ];
    // An offline write to the raw file, as a tool on the host might do.
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x77 0 65536"])
        .arg(d.join("raw.img")));
    vm.models.get_mut("raw").unwrap()[..65536].fill(0x77);
    let mut args = vec![
        "backup".to_string(),
        "--repo".into(),
        vm.repo.display().to_string(),
        "--vm".into(),
        "vm1".into(),
        "--json".into(),
        "--allow-plaintext".into(),
    ];
    for image in &images {
        args.extend(["--image".to_string(), image.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let without_key = bitback(&args);
    assert_eq!(without_key.code, Some(2), "{}", without_key.stderr);
    assert!(
        without_key.stderr.contains("--image-key-file"),
        "{}",
        without_key.stderr
    );
    let mut with_key = args.clone();
    let key_arg = source_key.display().to_string();
    with_key.extend(["--image-key-file", key_arg.as_str()]);
    let stopped = bitback(&with_key).json();
    vm.snapshot(&stopped);
    let v = volumes(&stopped);
    for name in ["v3", "luks", "x9"] {
        assert_eq!(v[name].0, "incremental", "{name}: {}", v[name].1);
    }
    for name in ["raw", "dev", "v2"] {
        let kind = if by_content { "incremental" } else { "full" };
        assert_eq!(v[name].0, kind, "{name}: {}", v[name].1);
    }
    assert_eq!(v["dev"].3, "raw-device");

    vm.check_all_points();
    // A restore of the newest point follows each volume's own chain.
    let out = d.join("restored/");
    let restored = bitback(&[
        "restore",
        "--repo",
        vm.repo.to_str().unwrap(),
        "--vm",
        "vm1",
        "--output",
        out.to_str().unwrap(),
        "--json",
    ])
    .json();
    let (_, models) = vm.points.last().unwrap();
    for r in restored.as_array().unwrap() {
        let name = r["volume"].as_str().unwrap();
        assert!(
            same_content(
                &models[name],
                "raw",
                &out.join(format!("{name}.raw")),
                "raw"
            ),
            "restored {name} differs from its model"
        );
    }
    let verified = bitback(&["verify", "--repo", vm.repo.to_str().unwrap()]);
    assert_eq!(verified.code, Some(0), "{}", verified.stdout);
    drop(device);
}

/// Every 512-byte block of `file` that holds guest data of `model` in
/// plaintext.
fn plaintext_blocks(file: &Path, models: &[&[u8]]) -> usize {
    let mut known: HashSet<&[u8]> = HashSet::new();
    for model in models {
        for block in model.chunks(512) {
            if block.iter().any(|&b| b != 0) {
                known.insert(block);
            }
        }
    }
    let bytes = std::fs::read(file).unwrap();
    bytes
        .chunks(512)
        .filter(|block| known.contains(block))
        .count()
}

#[test]
fn encrypted_backups_hold_no_plaintext_and_restore_with_the_key() {
    require("qemu-io");
    let dir = tempdir();
    let d = dir.path();
    create_qcow2(&d.join("plain.qcow2"), SIZE, &[]);
    luks_qcow2(&d.join("sec.qcow2"), "source-key");
    let key = d.join("backup.key");
    write_key(&key, "a backup passphrase\n");
    let other_key = d.join("other.key");
    write_key(&other_key, "another passphrase");
    let disks = vec![
        Disk::with_format("plain", "plain", &d.join("plain.qcow2"), "qcow2", ""),
        luks_disk("sec", &d.join("sec.qcow2")),
    ];
    let mut vm = Vm::start_in(d, disks);
    let key_arg = key.display().to_string();
    // A short key derivation keeps the many opens of this test quick; the
    // default (2 s) is used once, for the new key below.
    let encrypt = [
        "--encrypt-key-file",
        key_arg.as_str(),
        "--encrypt-iter-time",
        "100",
    ];
    // Patterns that vary inside each block, so that a block is recognised
    // anywhere in a file.
    let write_text = |vm: &mut Vm, node: &str, offset: u64, round: u8| {
        for k in 0..4u64 {
            vm.write(
                node,
                offset + k * 4096,
                4096,
                round.wrapping_add(k as u8 * 7) | 1,
            );
        }
    };
    write_text(&mut vm, "plain", 0, 0x41);
    write_text(&mut vm, "sec", MIB, 0x43);
    let full = vm.backup(&encrypt);
    assert_eq!(full["kind"], "full");
    assert_eq!(full["encryption"], "luks");
    write_text(&mut vm, "plain", 2 * MIB, 0x51);
    write_text(&mut vm, "sec", 3 * MIB, 0x53);
    let incr = vm.backup(&encrypt);
    assert_eq!(incr["kind"], "incremental", "{}", incr["reason"]);
    write_text(&mut vm, "sec", 4 * MIB, 0x63);
    let incr2 = vm.backup(&encrypt);
    assert_eq!(incr2["kind"], "incremental", "{}", incr2["reason"]);

    // No block of guest data in any file, every file LUKS-encrypted and
    // clean by qemu-img.
    let models: Vec<Vec<u8>> = vm.models.values().cloned().collect();
    let models: Vec<&[u8]> = models.iter().map(Vec::as_slice).collect();
    for (id, files) in &vm.points {
        for name in files.keys() {
            let file = vm.repo.join("vm1").join(id).join(format!("{name}.qcow2"));
            assert_eq!(plaintext_blocks(&file, &models), 0, "{}", file.display());
            let info = qemu_img_info(&file);
            assert_eq!(info["encrypted"], true, "{}", file.display());
            assert_eq!(info["format-specific"]["data"]["encrypt"]["format"], "luks");
        }
    }
    // The plaintext model itself is found by the same scan: the check can
    // fail.
    let model_file = &vm.points[0].1["plain"];
    assert!(plaintext_blocks(model_file, &models) > 0);

    // verify needs no key.
    let repo = vm.repo.to_str().unwrap().to_string();
    let verified = bitback(&["verify", "--repo", &repo]);
    assert_eq!(verified.code, Some(0), "{}", verified.stdout);

    // restore needs it (see the next test for the key's refusals), and
    // then equals the model at every point.
    for (i, (id, files)) in vm.points.iter().enumerate() {
        let out = d.join(format!("restored-{i}/"));
        let restored = bitback(&[
            "restore",
            "--repo",
            &repo,
            "--vm",
            "vm1",
            "--backup",
            id,
            "--output",
            out.to_str().unwrap(),
            "--key-file",
            &key_arg,
            "--json",
        ])
        .json();
        assert!(
            restored[0]["method"]
                .as_str()
                .unwrap()
                .contains("encrypted"),
            "{restored}"
        );
        for (name, model) in files {
            assert!(
                same_content(model, "raw", &out.join(format!("{name}.raw")), "raw"),
                "point {id} volume {name} differs from its model"
            );
        }
    }

    // export serves an encrypted point with the key, decrypted by QEMU.
    let (id, files) = &vm.points[1];
    let socket = d.join("export.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bitback"))
        .args(["export", "--repo", &repo, "--vm", "vm1", "--backup", id])
        .args(["--volume", "sec", "--socket", socket.to_str().unwrap()])
        .args(["--key-file", &key_arg])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("export exited: {status}");
        }
        assert!(std::time::Instant::now() < deadline, "export did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let url = format!("nbd+unix:///sec?socket={}", socket.display());
    let served = same_content(&files["sec"], "raw", Path::new(&url), "raw");
    let pid = child.id().to_string();
    run(Command::new("kill").args(["-TERM", &pid]));
    let _ = child.wait();
    assert!(served, "the export of point {id} differs from its model");

    // Another key cannot build on this chain: a full, saying why.
    let other_arg = other_key.display().to_string();
    write_text(&mut vm, "plain", 5 * MIB, 0x71);
    let rekeyed = vm.backup(&["--encrypt-key-file", &other_arg]);
    // Without --encrypt-iter-time, QEMU's own default (2000 ms) derives
    // the key: QEMU records the iteration count it calibrated, far above
    // what 100 ms gave.
    let iters = |m: &Value| {
        let file = vm
            .repo
            .join("vm1")
            .join(m["id"].as_str().unwrap())
            .join("plain.qcow2");
        qemu_img_info(&file)["format-specific"]["data"]["encrypt"]["slots"][0]["iters"]
            .as_u64()
            .unwrap()
    };
    assert!(
        iters(&rekeyed) > 5 * iters(&full),
        "{} vs {}",
        iters(&rekeyed),
        iters(&full)
    );
    assert_eq!(rekeyed["kind"], "full");
    let reason = rekeyed["reason"].as_str().unwrap();
    assert!(reason.contains("does not open"), "{reason}");
    // And no key at all (plaintext allowed) is a full too.
    let plain = vm.backup(&["--allow-plaintext"]);
    assert_eq!(plain["kind"], "full");
    assert!(
        plain["reason"].as_str().unwrap().contains("was encrypted"),
        "{}",
        plain["reason"]
    );
    assert_eq!(plain.get("encryption"), None);
    vm.quit();
}

/// The key a restore of an encrypted backup is given: none, one others
/// may read, the wrong one (each refused, nothing made), and the right one
/// (qemu-img decrypts, so no byte count is claimed).
#[test]
fn an_encrypted_restore_refuses_every_key_but_its_own() {
    require("qemu-io");
    let dir = tempdir();
    let d = dir.path();
    create_qcow2(&d.join("plain.qcow2"), SIZE, &[]);
    let key = d.join("backup.key");
    write_key(&key, "a backup passphrase\n");
    let other_key = d.join("other.key");
    write_key(&other_key, "another passphrase");
    let mut vm = Vm::start_in(
        d,
        vec![Disk::with_format(
            "plain",
            "plain",
            &d.join("plain.qcow2"),
            "qcow2",
            "",
        )],
    );
    vm.write("plain", 0, 65536, 0x41);
    let key_arg = key.display().to_string();
    let full = vm.backup(&["--encrypt-key-file", &key_arg, "--encrypt-iter-time", "100"]);
    assert_eq!(full["encryption"], "luks");
    vm.quit();
    let repo = vm.repo.to_str().unwrap().to_string();
    // No key.
    let out = d.join("no-key/");
    let refused = bitback(&[
        "restore",
        "--repo",
        &repo,
        "--vm",
        "vm1",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    assert!(refused.stderr.contains("--key-file"), "{}", refused.stderr);
    let restore_with = |key: &Path, out: &Path, json: bool| {
        let mut args = vec![
            "restore",
            "--repo",
            &repo,
            "--vm",
            "vm1",
            "--output",
            out.to_str().unwrap(),
            "--key-file",
            key.to_str().unwrap(),
        ];
        if json {
            args.push("--json");
        }
        bitback(&args)
    };
    // A key file others may read is refused (as ssh refuses such a
    // private key), before anything is made.
    let loose = d.join("loose.key");
    std::fs::write(&loose, "a backup passphrase\n").unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let loose_out = d.join("loose/");
    let refused = restore_with(&loose, &loose_out, false);
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    assert!(refused.stderr.contains("mode 0644"), "{}", refused.stderr);
    assert!(refused.stderr.contains("chmod 600"), "{}", refused.stderr);
    assert!(!loose_out.exists());
    // The wrong key fails the restore and leaves no empty directory.
    let wrong_out = d.join("wrong-key/");
    let wrong = restore_with(&other_key, &wrong_out, false);
    assert_eq!(wrong.code, Some(1), "{}", wrong.stderr);
    assert!(!wrong_out.exists());
    // The right one: qemu-img copied, so no byte count is claimed.
    let human_out = d.join("human/");
    let human = restore_with(&key, &human_out, false);
    assert_eq!(human.code, Some(0), "{}", human.stderr);
    assert!(!human.stdout.contains(" 0 B "), "{}", human.stdout);
    let json = restore_with(&key, &d.join("human-json/"), true).json();
    assert_eq!(json[0]["bytes_copied"], Value::Null, "{json}");
}
