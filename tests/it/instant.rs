//! Restores in seconds: `bitback mount` (a point's volumes as read-only
//! FUSE files) and `restore --live` / `--finish` (a VM running on a point
//! at once, then streamed to stand alone), with real qemu-storage-daemon
//! exports, real FUSE mounts and loop devices, and real QEMU; judged by
//! models, `qemu-img compare`, `qemu-img info` and `qemu-img check`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{
    Disk, Kind, LoopDevice, Rng, Run, Tmpfs, Vm, bitback_env, require, run, same_content, tempdir,
};

const MIB: u64 = 1 << 20;

/// A runtime directory of its own for each test (`BITBACK_RUNTIME_DIR`):
/// tests running at once never see each other's daemons. Whatever a
/// failed test left serving is ended by its pid when this is dropped.
pub(crate) struct Runtime {
    dir: tempfile::TempDir,
    /// The host name bitback gives itself (`BITBACK_HOST`), when set.
    host: Option<String>,
}

impl Runtime {
    pub(crate) fn new() -> Runtime {
        Runtime {
            dir: tempdir(),
            host: None,
        }
    }

    /// A runtime of its own on "host" `name`: what another host sharing
    /// the repository sees (its own runtime directory, its own name).
    pub(crate) fn on_host(name: &str) -> Runtime {
        Runtime {
            dir: tempdir(),
            host: Some(name.into()),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `bitback ARGS` with this runtime directory.
    pub(crate) fn run(&self, args: &[&str]) -> Run {
        let mut env = vec![("BITBACK_RUNTIME_DIR", self.path().to_str().unwrap())];
        if let Some(host) = &self.host {
            env.push(("BITBACK_HOST", host));
        }
        bitback_env(args, &env)
    }

    pub(crate) fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bitback"));
        cmd.env("BITBACK_RUNTIME_DIR", self.path())
            .env_remove("BITBACK_LOG");
        cmd
    }

    /// The runtime directories of daemons serving now.
    pub(crate) fn entries(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for dir in self.entries() {
            let Ok(text) = std::fs::read_to_string(dir.join("state.json")) else {
                continue;
            };
            let state: Value = serde_json::from_str(&text).unwrap_or_default();
            let pid = std::fs::read_to_string(dir.join("daemon.pid")).unwrap_or_default();
            if let Ok(pid) = pid.trim().parse::<u64>() {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains("qemu-storage-daemon") {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            }
            if state["kind"] == "mount" {
                for f in state["files"].as_array().into_iter().flatten() {
                    let _ = Command::new("umount")
                        .arg("-l")
                        .arg(f.as_str().unwrap_or_default())
                        .status();
                }
            }
        }
    }
}

pub(crate) fn alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits until process `pid` is gone (a zombie's parent reaps it).
pub(crate) fn wait_gone(pid: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z ") {
            return;
        }
        assert!(Instant::now() < deadline, "pid {pid} did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills `pid` and waits until it and its children (a serve's
/// qemu-storage-daemon, which holds the repository's read lock it
/// inherited until it notices its parent died) are gone.
fn kill9(pid: u64) {
    let children: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<u64>>()
        })
        .collect();
    run(Command::new("kill").args(["-9", &pid.to_string()]));
    wait_gone(pid);
    for child in children {
        wait_gone(child);
    }
}

/// Waits until no process holds VM directory `vm_dir`'s read lock (a
/// killed serve's daemon lets it go when its last descriptor closes);
/// fails naming the processes that still hold it after 30 s.
fn wait_unread(vm_dir: &Path) {
    let path = vm_dir.join(".readers");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let file = std::fs::File::open(&path).unwrap();
        if nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok() {
            return;
        }
        if Instant::now() >= deadline {
            let holders: Vec<String> = std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter(|p| {
                    std::fs::read_dir(p.path().join("fd"))
                        .into_iter()
                        .flatten()
                        .flatten()
                        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == path))
                })
                .map(|p| {
                    let pid = p.file_name().to_string_lossy().into_owned();
                    let cmd = std::fs::read_to_string(p.path().join("cmdline")).unwrap_or_default();
                    format!("{pid}: {}", cmd.replace('\0', " "))
                })
                .collect();
            panic!("{} is still held: {holders:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How a `--finish` report says each volume ended (`streamed`, ...).
pub(crate) fn hows(finish: &Value) -> Vec<&str> {
    finish["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["how"].as_str().unwrap())
        .collect()
}

pub(crate) fn paths(served: &Value) -> Vec<PathBuf> {
    served["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| PathBuf::from(f["path"].as_str().unwrap()))
        .collect()
}

#[test]
fn a_mounted_point_reads_as_its_model_and_umount_leaves_nothing() {
    let dir = tempdir();
    let rt = Runtime::new();
    let mut vm = Vm::new(dir.path(), &[12 * MIB, 4 * MIB]);
    let mut rng = Rng::from_env();
    vm.random_writes(&mut rng, 10);
    let first = vm.backup(&[]);
    vm.random_writes(&mut rng, 10);
    vm.backup(&[]);
    vm.quit();
    let repo = vm.repo.to_str().unwrap().to_string();
    let id1 = first["id"].as_str().unwrap();

    let mnt = dir.path().join("mnt");
    let m = rt
        .run(&[
            "mount",
            "--repo",
            &repo,
            "--vm",
            "vm1",
            "--backup",
            id1,
            "--json",
            mnt.to_str().unwrap(),
        ])
        .json();
    assert_eq!(m["backup"], id1);
    let files = paths(&m);
    assert_eq!(files, [mnt.join("drive0.raw"), mnt.join("drive1.raw")]);
    for (i, file) in files.iter().enumerate() {
        assert!(
            same_content(file, "raw", &vm.points[0].1[i], "raw"),
            "{} differs from its model",
            file.display()
        );
        // Root passes any permission check: the export itself refuses.
        let written = std::fs::OpenOptions::new()
            .write(true)
            .open(file)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &[1u8; 512]));
        assert!(written.is_err(), "{} took a write", file.display());
    }
    let pid1 = m["pid"].as_u64().unwrap();
    assert!(alive(pid1));

    // One place, one mount.
    let again = rt.run(&[
        "mount",
        "--repo",
        &repo,
        "--vm",
        "vm1",
        mnt.to_str().unwrap(),
    ]);
    assert_refused(&again, &["served already"]);

    // The newest point, one volume, in a directory that was there.
    let mnt2 = dir.path().join("mnt2");
    std::fs::create_dir(&mnt2).unwrap();
    let m2 = rt
        .run(&[
            "mount",
            "--repo",
            &repo,
            "--vm",
            "vm1",
            "--volume",
            "drive1",
            "--json",
            mnt2.to_str().unwrap(),
        ])
        .json();
    assert_eq!(paths(&m2), [mnt2.join("drive1.raw")]);
    assert!(same_content(
        &mnt2.join("drive1.raw"),
        "raw",
        &vm.points[1].1[1],
        "raw"
    ));

    // Prune refuses while mounted, naming the mount.
    let prune = ["prune", "--repo", &repo, "--vm", "vm1", "--keep-last", "1"];
    let refused = rt.run(&prune);
    assert_ne!(refused.code, Some(0), "{}", refused.stdout);
    assert!(
        refused.stderr.contains("bitback mount of backup") && refused.stderr.contains("umount"),
        "{}",
        refused.stderr
    );

    // umount leaves nothing: no daemon, no file, no directory it made.
    let out = rt.run(&["umount", mnt.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    wait_gone(pid1);
    assert!(!mnt.exists(), "umount left {}", mnt.display());
    let out = rt.run(&["umount", "--json", mnt2.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(out.json()["backup"], m2["backup"]);
    wait_gone(m2["pid"].as_u64().unwrap());
    assert_eq!(std::fs::read_dir(&mnt2).unwrap().count(), 0);
    assert!(rt.entries().is_empty(), "{:?}", rt.entries());
    let pruned = rt.run(&prune);
    assert_eq!(pruned.code, Some(0), "{}", pruned.stderr);
}

/// `bitback mount --json` of the newest point of `vm1` in `repo` at `at`.
fn mount_at(rt: &Runtime, repo: &str, at: &Path) -> Value {
    rt.run(&[
        "mount",
        "--repo",
        repo,
        "--vm",
        "vm1",
        "--json",
        at.to_str().unwrap(),
    ])
    .json()
}

#[test]
fn a_mount_whose_daemon_died_is_cleaned_up_by_the_next_mount() {
    let dir = tempdir();
    let rt = Runtime::new();
    let mut vm = Vm::new(dir.path(), &[4 * MIB]);
    vm.write(0, MIB, MIB, 0x41);
    vm.backup(&[]);
    vm.quit();
    let repo = vm.repo.to_str().unwrap().to_string();
    let mnt = dir.path().join("mnt");
    let m = mount_at(&rt, &repo, &mnt);
    kill9(m["pid"].as_u64().unwrap());
    // The dead daemon's FUSE file answers nothing.
    assert!(std::fs::read(mnt.join("drive0.raw")).is_err());

    let mnt2 = dir.path().join("mnt2");
    let m2 = mount_at(&rt, &repo, &mnt2);
    assert!(!mnt.exists(), "the dead mount's directory is left");
    assert!(same_content(
        &mnt2.join("drive0.raw"),
        "raw",
        &vm.points[0].1[0],
        "raw"
    ));
    assert_eq!(rt.entries().len(), 1);
    let gone = rt.run(&["umount", mnt.to_str().unwrap()]);
    assert_eq!(gone.code, Some(2), "{}", gone.stderr);
    let out = rt.run(&["umount", mnt2.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    wait_gone(m2["pid"].as_u64().unwrap());
    assert!(rt.entries().is_empty());

    // The same after a kill, by umount itself.
    let m3 = mount_at(&rt, &repo, &mnt);
    kill9(m3["pid"].as_u64().unwrap());
    let out = rt.run(&["umount", mnt.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(!mnt.exists());
    assert!(rt.entries().is_empty());
}

#[test]
fn compressed_and_encrypted_points_mount_and_an_encrypted_one_needs_its_key() {
    let dir = tempdir();
    let rt = Runtime::new();
    let mut vm = Vm::new(dir.path(), &[8 * MIB]);
    let mut rng = Rng::from_env();
    vm.write(0, 0, 3 * MIB, 0x61);
    vm.random_writes(&mut rng, 6);
    let compressed = vm.backup(&["--compress"]);
    vm.random_writes(&mut rng, 6);
    let key = dir.path().join("key");
    crate::harness::write_key(&key, "a passphrase of the backups");
    let key = key.to_str().unwrap().to_string();
    let encrypted = vm.backup(&["--encrypt-key-file", &key]);
    assert_eq!(encrypted["kind"], "full");
    vm.quit();
    let repo = vm.repo.to_str().unwrap().to_string();
    let mount = |id: &str, at: &Path, extra: &[&str]| {
        let mut args = vec![
            "mount", "--repo", &repo, "--vm", "vm1", "--backup", id, "--json",
        ];
        args.extend(extra);
        args.push(at.to_str().unwrap());
        rt.run(&args)
    };
    for (n, (m, extra)) in [
        (&compressed, vec![]),
        (&encrypted, vec!["--key-file", key.as_str()]),
    ]
    .into_iter()
    .enumerate()
    {
        let id = m["id"].as_str().unwrap();
        let at = dir.path().join(format!("mnt{n}"));
        if n == 1 {
            let refused = mount(id, &at, &[]);
            assert_refused(&refused, &["--key-file"]);
            assert!(!at.exists(), "a refused mount left {}", at.display());
        }
        let served = mount(id, &at, &extra).json();
        assert!(
            same_content(&at.join("drive0.raw"), "raw", &vm.points[n].1[0], "raw"),
            "point {n} differs from its model"
        );
        let out = rt.run(&["umount", at.to_str().unwrap()]);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        wait_gone(served["pid"].as_u64().unwrap());
    }
    assert!(rt.entries().is_empty());
}

#[test]
fn a_file_inside_an_ext4_volume_is_read_back_through_a_loop_device() {
    require("mkfs.ext4");
    let dir = tempdir();
    let rt = Runtime::new();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    let mut rng = Rng::from_env();
    let text: Vec<u8> = (0..300 * 1024).map(|_| rng.next() as u8).collect();
    std::fs::write(tree.join("etc/precious.bin"), &text).unwrap();
    let disk = dir.path().join("ext4.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&disk));
    let disks = vec![Disk::with_format("disk0", "drive0", &disk, "raw", "")];
    let mut vm = Vm::from_disks(Kind::MachineNone, dir.path(), disks, &[64 * MIB]);
    vm.backup(&[]);
    vm.quit();

    let mnt = dir.path().join("mnt");
    let m = rt
        .run(&[
            "mount",
            "--repo",
            vm.repo.to_str().unwrap(),
            "--vm",
            "vm1",
            "--json",
            mnt.to_str().unwrap(),
        ])
        .json();
    let fs = dir.path().join("fs");
    std::fs::create_dir(&fs).unwrap();
    {
        let device = LoopDevice::read_only(&mnt.join("drive0.raw"));
        run(Command::new("mount")
            .args(["-o", "ro,noload"])
            .arg(&device.device)
            .arg(&fs));
        let back = std::fs::read(fs.join("etc/precious.bin"));
        let _ = Command::new("umount").arg(&fs).status();
        assert_eq!(back.expect("reading the file back"), text);
        // While the loop device is on the served file, umount refuses,
        // naming it (the device would read nothing once the file goes).
        let refused = rt.run(&["umount", mnt.to_str().unwrap()]);
        assert_refused(&refused, &[device.device.to_str().unwrap(), "losetup -d"]);
        assert!(mnt.join("drive0.raw").exists());
    }
    let out = rt.run(&["umount", mnt.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    wait_gone(m["pid"].as_u64().unwrap());
    assert!(!mnt.exists());
}

/// The backing file an image's header names.
/// `run` was refused as bad input (exit 2), its error naming each of
/// `words`.
fn assert_refused(run: &Run, words: &[&str]) {
    assert_eq!(run.code, Some(2), "{}{}", run.stdout, run.stderr);
    for word in words {
        assert!(run.stderr.contains(word), "{word}: {}", run.stderr);
    }
}

pub(crate) fn backing_of(image: &Path) -> Option<String> {
    let out = run(Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(image));
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    info["backing-filename"].as_str().map(String::from)
}

/// `bitback restore --live --json` of backup `id` of `vm1` in `repo` into
/// `out`, plus `extra`, as JSON.
fn live_at(rt: &Runtime, repo: &str, id: &str, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "restore",
        "--repo",
        repo,
        "--vm",
        "vm1",
        "--backup",
        id,
        "--live",
        "--json",
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    rt.run(&args).json()
}

/// A VM of two volumes with most of the first written, backed up once;
/// returns it (quit) and the backup's id.
fn point(dir: &Path, big: u64) -> (Vm, String) {
    let mut vm = Vm::new(dir, &[big, 8 * MIB]);
    vm.write(0, 0, big - 8 * MIB, 0x51);
    let mut rng = Rng::from_env();
    vm.random_writes(&mut rng, 12);
    let id = vm.backup(&[])["id"].as_str().unwrap().to_string();
    vm.quit();
    (vm, id)
}

/// A QEMU on the live images, its models the point's.
pub(crate) fn vm_on(dir: &Path, images: &[PathBuf], source: &Vm) -> Vm {
    std::fs::create_dir_all(dir).unwrap();
    let disks = images
        .iter()
        .enumerate()
        .map(|(i, image)| Disk::new(&format!("disk{i}"), &format!("drive{i}"), image))
        .collect();
    let sizes: Vec<u64> = source.models.iter().map(|m| m.bytes.len() as u64).collect();
    let mut vm = Vm::from_disks(Kind::MachineNone, dir, disks, &sizes);
    for (i, model) in vm.models.iter_mut().enumerate() {
        model.bytes = std::fs::read(&source.points[0].1[i]).unwrap();
    }
    vm
}

/// Every image stands alone and holds its model; qemu-img check is clean.
pub(crate) fn assert_restored(vm: &mut Vm, images: &[PathBuf]) {
    vm.quit();
    for (i, image) in images.iter().enumerate() {
        assert_eq!(
            backing_of(image),
            None,
            "{} keeps a backing file",
            image.display()
        );
        let model = vm.dir.join(format!("model-{i}.raw"));
        std::fs::write(&model, &vm.models[i].bytes).unwrap();
        assert!(
            same_content(image, "qcow2", &model, "raw"),
            "{} differs from the point plus the VM's writes",
            image.display()
        );
        run(Command::new("qemu-img").arg("check").arg(image));
    }
}

#[test]
fn a_vm_runs_on_a_live_restore_and_finish_leaves_the_point_plus_its_writes() {
    let dir = tempdir();
    let rt = Runtime::new();
    let (vm, id) = point(dir.path(), 48 * MIB);
    let repo = vm.repo.to_str().unwrap().to_string();
    let out = dir.path().join("live");
    let live = live_at(&rt, &repo, &id, &out, &[]);
    let images = paths(&live);
    assert_eq!(images, [out.join("drive0.qcow2"), out.join("drive1.qcow2")]);
    let socket = live["socket"].as_str().unwrap();
    assert!(socket.starts_with(rt.path().to_str().unwrap()), "{socket}");
    for (i, image) in images.iter().enumerate() {
        assert_eq!(
            backing_of(image).unwrap(),
            format!("nbd+unix:///vm1/{id}/drive{i}?socket={socket}")
        );
        // Before any VM: the image reads as the point, through the export.
        assert!(same_content(image, "qcow2", &vm.points[0].1[i], "raw"));
    }
    // Where the point holds no data the images hold zero clusters of their
    // own: the VM reads them without the export, the stream skips them.
    let local_zeros: u64 = images
        .iter()
        .map(|image| {
            let out = run(Command::new("qemu-img")
                .args(["map", "-U", "--output=json"])
                .arg(image));
            let map: Value = serde_json::from_slice(&out.stdout).unwrap();
            map.as_array()
                .unwrap()
                .iter()
                .filter(|e| e["depth"] == 0 && e["zero"] == true)
                .map(|e| e["length"].as_u64().unwrap())
                .sum::<u64>()
        })
        .sum();
    assert!(
        local_zeros >= 4 * MIB,
        "{local_zeros} bytes of zero clusters"
    );
    // Prune refuses while the export serves, naming it.
    let prune = ["prune", "--repo", &repo, "--vm", "vm1", "--keep-last", "1"];
    let refused = rt.run(&prune);
    assert_ne!(refused.code, Some(0), "{}", refused.stdout);
    assert!(
        refused.stderr.contains("a live restore of backup"),
        "{}",
        refused.stderr
    );
    // A restore into images that exist is refused without --force.
    let twice = rt.run(&[
        "restore",
        "--repo",
        &repo,
        "--vm",
        "vm1",
        "--live",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(twice.code, Some(2), "{}", twice.stderr);

    let mut vm2 = vm_on(&dir.path().join("vm2"), &images, &vm);
    vm2.write(0, 5 * MIB + 512, 70_000, 0x77);
    vm2.write(1, 0, 4096, 0x78);
    let mut finishing = rt
        .command()
        .args(["restore", "--finish", "--json", "--qmp"])
        .arg(&vm2.qemu().qmp)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Writes while the streams run are kept.
    vm2.write(0, 30 * MIB, MIB, 0x79);
    vm2.write(1, 6 * MIB, 2 * MIB, 0x7a);
    vm2.zero(0, 2 * MIB, MIB);
    let done = wait_output(&mut finishing);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let report: Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(hows(&report), ["streamed", "streamed"], "{report}");
    assert_eq!(report["ended"].as_array().unwrap().len(), 1, "{report}");
    wait_gone(live["pid"].as_u64().unwrap());
    assert!(rt.entries().is_empty(), "{:?}", rt.entries());
    // Run again: nothing to do, and it says so.
    let again = rt.run(&[
        "restore",
        "--finish",
        "--json",
        "--qmp",
        vm2.qemu().qmp.to_str().unwrap(),
    ]);
    assert_eq!(again.json()["volumes"], serde_json::json!([]));
    let pruned = rt.run(&prune);
    assert_eq!(pruned.code, Some(0), "{}", pruned.stderr);
    // The VM runs on the images now: a live restore over them is refused,
    // --force or not, naming the holder; the files stay the VM's (the
    // same inodes, nothing made beside them).
    use std::os::unix::fs::MetadataExt;
    let inodes = |images: &[PathBuf]| -> Vec<u64> {
        images
            .iter()
            .map(|i| std::fs::metadata(i).unwrap().ino())
            .collect()
    };
    let before = (inodes(&images), names_in(&out));
    let over = rt.run(&[
        "restore",
        "--repo",
        &repo,
        "--vm",
        "vm1",
        "--live",
        "--force",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_refused(&over, &["held open", "qemu"]);
    assert_eq!((inodes(&images), names_in(&out)), before);
    assert!(rt.entries().is_empty(), "{:?}", rt.entries());
    assert_restored(&mut vm2, &images);
}

pub(crate) fn wait_output(child: &mut std::process::Child) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("bitback restore --finish ran over 300 s; killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut stderr)
        .unwrap();
    std::process::Output {
        status: child.wait().unwrap(),
        stdout,
        stderr,
    }
}

#[test]
fn finish_runs_again_after_a_kill_and_says_when_the_export_is_gone() {
    let dir = tempdir();
    let rt = Runtime::new();
    let (vm, id) = point(dir.path(), 160 * MIB);
    let repo = vm.repo.to_str().unwrap().to_string();
    let restore_live = |out: &Path| live_at(&rt, &repo, &id, out, &[]);

    let out = dir.path().join("live");
    let live = restore_live(&out);
    let images = paths(&live);
    let mut vm2 = vm_on(&dir.path().join("vm2"), &images, &vm);
    vm2.write(0, 100 * MIB, 2 * MIB, 0x66);
    // bitback is killed while the streams run; QEMU's jobs go on.
    let mut finishing = rt
        .command()
        .args(["restore", "--finish", "--qmp"])
        .arg(&vm2.qemu().qmp)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = vm2.qemu().must("query-block-jobs", Value::Null);
        if !jobs.as_array().unwrap().is_empty() {
            break;
        }
        if finishing.try_wait().unwrap().is_some() {
            let out = wait_output(&mut finishing);
            panic!(
                "bitback restore --finish ended before a stream was seen: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "no stream started");
        std::thread::sleep(Duration::from_millis(10));
    }
    finishing.kill().unwrap();
    finishing.wait().unwrap();
    vm2.write(0, 150 * MIB, MIB, 0x67);
    let again = rt.run(&[
        "restore",
        "--finish",
        "--json",
        "--qmp",
        vm2.qemu().qmp.to_str().unwrap(),
    ]);
    let report = again.json();
    assert_eq!(report["ended"].as_array().unwrap().len(), 1, "{report}");
    wait_gone(live["pid"].as_u64().unwrap());
    assert!(rt.entries().is_empty(), "{:?}", rt.entries());
    assert_restored(&mut vm2, &images);

    // The export's daemon dies under a VM (a host restart would end it
    // too): --finish says what that means, and --resume serves the point
    // again at the same socket, the images and the guest's writes as they
    // were.
    let out = dir.path().join("live2");
    let live = restore_live(&out);
    let images = paths(&live);
    let mut vm3 = vm_on(&dir.path().join("vm3"), &images, &vm);
    vm3.write(0, 20 * MIB, MIB, 0x68);
    kill9(live["pid"].as_u64().unwrap());
    // The VM reads errors where its image holds nothing yet (read here
    // through an NBD export of its disk, with qemu-io's own client).
    let reads = dir.path().join("vm3-reads.sock");
    vm3.qemu().must(
        "nbd-server-start",
        serde_json::json!({ "addr": { "type": "unix", "data": { "path": reads } } }),
    );
    vm3.qemu().must(
        "block-export-add",
        serde_json::json!({ "type": "nbd", "id": "reads", "node-name": "drive0" }),
    );
    let read_start = || {
        let read = Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", "read -P 0x51 0 64k"])
            .arg(format!("nbd+unix:///drive0?socket={}", reads.display()))
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&read.stdout),
            String::from_utf8_lossy(&read.stderr)
        )
    };
    let said = read_start();
    assert!(said.contains("read failed"), "{said}");
    let qmp = vm3.qemu().qmp.clone();
    let finish = [
        "restore",
        "--finish",
        "--json",
        "--qmp",
        qmp.to_str().unwrap(),
    ];
    let failed = rt.run(&finish);
    assert_ne!(failed.code, Some(0));
    assert!(
        failed.stderr.contains("export that is gone")
            && failed.stderr.contains("read errors")
            && failed.stderr.contains("--resume"),
        "{}",
        failed.stderr
    );

    // The images still need the point: a prune is refused, pointing to
    // --resume, though the export is gone (as a host restart leaves it).
    let prune = ["prune", "--repo", &repo, "--vm", "vm1", "--keep-last", "1"];
    let refused = rt.run(&prune);
    assert_refused(&refused, &["export that is gone", "--resume"]);
    let serving = rt
        .run(&["serving", "--repo", &repo, "--vm", "vm1", "--json"])
        .json();
    assert_eq!(
        serving["leases"][0]["lease"]["status"], "needs-resume",
        "{serving}"
    );
    let resume = |extra: &[&str]| {
        let mut args = vec![
            "restore", "--repo", &repo, "--vm", "vm1", "--live", "--resume", "--json", "--output",
        ];
        args.push(out.to_str().unwrap());
        args.extend(extra);
        rt.run(&args)
    };
    // Another backup than the one the images read is refused.
    let wrong = resume(&["--backup", "20200101T000000Z"]);
    assert_refused(&wrong, &[id.as_str()]);
    let resumed = resume(&[]).json();
    assert_eq!(resumed["backup"].as_str(), Some(id.as_str()));
    assert_eq!(resumed["socket"], live["socket"], "{resumed}");
    assert_eq!(paths(&resumed), images);
    assert_ne!(resumed["pid"], live["pid"]);
    // Served already: a second resume is refused.
    let again = resume(&[]);
    assert_refused(&again, &["served already"]);
    // The running QEMU reconnects at its next read.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let said = read_start();
        if !said.contains("failed") && !said.contains("error") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the VM still cannot read: {said}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    vm3.write(0, 30 * MIB, MIB, 0x69);
    let report = rt.run(&finish).json();
    assert!(report.is_object(), "{report}");
    wait_gone(resumed["pid"].as_u64().unwrap());
    assert!(rt.entries().is_empty(), "{:?}", rt.entries());
    assert_restored(&mut vm3, &images);
    // The images stand alone: the lease is gone, and a prune runs.
    assert_eq!(
        names_in(&vm.repo.join("vm1/.serving")),
        Vec::<String>::new()
    );
    let pruned = rt.run(&prune);
    assert_eq!(pruned.code, Some(0), "{}", pruned.stderr);
    // Nothing is left to resume.
    let nothing = resume(&[]);
    assert_refused(&nothing, &["nothing to resume"]);
}

#[test]
fn a_live_restore_is_given_to_the_user_its_qemu_runs_as() {
    require("setpriv");
    let dir = tempdir();
    let rt = Runtime::new();
    // An unprivileged user reaches the images and the runtime directory.
    for d in [dir.path(), rt.path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (vm, id) = point(dir.path(), 16 * MIB);
    let repo = vm.repo.to_str().unwrap().to_string();
    let model = vm.points[0].1[0].clone();
    std::fs::set_permissions(&model, std::fs::Permissions::from_mode(0o644)).unwrap();
    // What user nobody (65534) sees of an image, through its export.
    let as_nobody = |image: &Path| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["qemu-img", "compare", "-f", "qcow2", "-F", "raw"])
            .arg(image)
            .arg(&model)
            .output()
            .unwrap()
    };
    let live = |out: &Path, extra: &[&str]| {
        let mut with = vec!["--volume", "drive0"];
        with.extend(extra);
        live_at(&rt, &repo, &id, out, &with)
    };
    let given = live(&dir.path().join("given"), &["--owner", "nobody"]);
    let image = &paths(&given)[0];
    let seen = as_nobody(image);
    assert!(
        seen.status.success(),
        "{}",
        String::from_utf8_lossy(&seen.stderr)
    );
    // Without --owner only root can use them.
    let kept = live(&dir.path().join("kept"), &[]);
    let seen = as_nobody(&paths(&kept)[0]);
    assert!(!seen.status.success());
    let bad = rt.run(&[
        "restore",
        "--repo",
        &repo,
        "--vm",
        "vm1",
        "--live",
        "--output",
        "x",
        "--owner",
        "no-such-user",
    ]);
    assert_refused(&bad, &["no user"]);
}

/// `restore --live --force --json` of backup `id` of `vm1` in `repo` into
/// `out`, where something stands already as `drive0.qcow2` (a VM's disk,
/// say): the arguments, and that file.
fn over_a_disk(repo: &str, id: &str, out: &Path) -> (Vec<String>, PathBuf) {
    let there = out.join("drive0.qcow2");
    std::fs::write(&there, b"the disk that was there").unwrap();
    let args = [
        "restore", "--repo", repo, "--vm", "vm1", "--backup", id, "--live", "--force", "--json",
    ];
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.extend(["--output".into(), out.to_str().unwrap().into()]);
    (args, there)
}

/// The names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_live_restore_killed_while_setting_up_leaves_the_files_there_as_they_were() {
    let dir = tempdir();
    let rt = Runtime::new();
    let (vm, id) = point(dir.path(), 16 * MIB);
    let repo = vm.repo.to_str().unwrap().to_string();
    let out = dir.path().join("live");
    std::fs::create_dir(&out).unwrap();
    let (args, there) = over_a_disk(&repo, &id, &out);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let killed = bitback_env(
        &args,
        &[
            ("BITBACK_RUNTIME_DIR", rt.path().to_str().unwrap()),
            ("BITBACK_FAULT", "serve-before-daemon"),
        ],
    );
    assert_eq!(killed.code, None, "{}", killed.stderr);
    assert_eq!(std::fs::read(&there).unwrap(), b"the disk that was there");
    // Its lease is left too; a prune on this host sees that nothing
    // serves, removes it and runs.
    let leases = vm.repo.join("vm1/.serving");
    assert_eq!(names_in(&leases).len(), 1);
    let prune = ["prune", "--repo", &repo, "--vm", "vm1", "--keep-last", "1"];
    let pruned = rt.run(&prune);
    assert_eq!(pruned.code, Some(0), "{}", pruned.stderr);
    assert_eq!(names_in(&leases), Vec::<String>::new());
    // The next run cleans up what the killed one made, and only that.
    let live = rt.run(&args).json();
    assert_eq!(names_in(&out), ["drive0.qcow2", "drive1.qcow2"], "{live}");
    assert!(same_content(&there, "qcow2", &vm.points[0].1[0], "raw"));
    assert_eq!(rt.entries().len(), 1);
    assert_eq!(names_in(&leases).len(), 1);
}

/// A live restore into a filesystem that fills up while it makes the
/// images fails with the reason and leaves what stood there, no image made
/// aside and no export serving; given room, the same command works.
#[test]
fn a_live_restore_that_runs_out_of_space_leaves_the_files_there_and_no_export() {
    let dir = tempdir();
    let rt = Runtime::new();
    let (vm, id) = point(dir.path(), 16 * MIB);
    let repo = vm.repo.to_str().unwrap().to_string();
    let out = dir.path().join("small");
    // Room for one image's tables (five 64 KiB clusters), not two.
    let tmpfs = Tmpfs::mount(&out, "448k");
    let (args, there) = over_a_disk(&repo, &id, &out);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let failed = rt.run(&args);
    assert_eq!(failed.code, Some(1), "{}", failed.stderr);
    // The second image is the one that does not fit: the first, made
    // aside, is removed too.
    assert!(
        failed.stderr.contains("drive1.qcow2") && failed.stderr.contains("No space left on device"),
        "{}",
        failed.stderr
    );
    assert_eq!(std::fs::read(&there).unwrap(), b"the disk that was there");
    assert_eq!(names_in(&out), ["drive0.qcow2"]);
    // No export serves, and nothing of it is left.
    assert_eq!(rt.entries(), Vec::<PathBuf>::new());
    tmpfs.resize("16M");
    let live = rt.run(&args).json();
    assert_eq!(names_in(&out), ["drive0.qcow2", "drive1.qcow2"], "{live}");
    for (i, image) in paths(&live).iter().enumerate() {
        assert!(same_content(image, "qcow2", &vm.points[0].1[i], "raw"));
    }
    assert_eq!(rt.entries().len(), 1);
}

/// A serve leaves a lease in the repository: a prune on another host is
/// refused naming the host and the serve; once that serve is gone (its
/// daemon killed: a host that went down), the other host's prune is still
/// refused by the lease, and says which file to remove; the serving host's
/// own prune removes its dead lease and runs.
#[test]
fn a_serve_keeps_prunes_on_other_hosts_off_through_its_lease() {
    let dir = tempdir();
    let alpha = Runtime::on_host("alpha");
    let beta = Runtime::on_host("beta");
    let mut vm = Vm::new(dir.path(), &[8 * MIB]);
    // The last a full, so a prune keeping one point removes two.
    for round in 0..3u8 {
        vm.write(0, round as u64 * MIB, MIB, 0x30 + round);
        vm.backup(if round == 2 { &["--full"] } else { &[] });
    }
    vm.quit();
    let repo = vm.repo.to_str().unwrap().to_string();
    let leases = vm.repo.join("vm1/.serving");
    let lease_files = || -> Vec<PathBuf> {
        std::fs::read_dir(&leases)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    };
    let count = |rt: &Runtime| {
        rt.run(&["list", "--repo", &repo, "--vm", "vm1", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len()
    };
    let mnt = dir.path().join("mnt");
    let served = mount_at(&alpha, &repo, &mnt);
    let lease = lease_files();
    assert_eq!(lease.len(), 1, "{lease:?}");
    let name = lease[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("alpha--mount-"), "{name}");
    // `serving` shows the mount on alpha, and its lease as each host sees
    // it.
    let status = |rt: &Runtime| {
        let out = rt.run(&["serving", "--repo", &repo, "--json"]).json();
        let leases: Vec<String> = out["leases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["lease"]["status"].as_str().unwrap().to_string())
            .collect();
        let serves: Vec<String> = out["serves"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["status"].as_str().unwrap().to_string())
            .collect();
        (serves, leases)
    };
    assert_eq!(
        status(&alpha),
        (vec!["serving".into()], vec!["serving".into()])
    );
    assert_eq!(status(&beta), (vec![], vec!["other-host".into()]));
    let shown = alpha.run(&["serving", "--repo", &repo]);
    assert_eq!(shown.code, Some(0), "{}", shown.stderr);
    for word in [
        "mount",
        "serving",
        "alpha",
        mnt.to_str().unwrap(),
        lease[0].to_str().unwrap(),
    ] {
        assert!(shown.stdout.contains(word), "{word}: {}", shown.stdout);
    }

    // Refused on beta while alpha serves, naming alpha's serve.
    let prune = ["prune", "--repo", &repo, "--vm", "vm1", "--keep-last", "1"];
    let refused = beta.run(&prune);
    assert_refused(
        &refused,
        &[
            "bitback mount of backup",
            "on host alpha",
            mnt.to_str().unwrap(),
        ],
    );

    // On alpha too, however the repository's path is spelled; the lease
    // of a serve that runs stays.
    let link = dir.path().join("repo-link");
    std::os::unix::fs::symlink(&vm.repo, &link).unwrap();
    let spelled = link.to_str().unwrap();
    let refused = alpha.run(&[
        "prune",
        "--repo",
        spelled,
        "--vm",
        "vm1",
        "--keep-last",
        "1",
    ]);
    assert_refused(&refused, &["bitback umount"]);
    assert_eq!(lease_files(), lease);

    // alpha goes down with its serve: the lock is gone, the lease stays.
    kill9(served["pid"].as_u64().unwrap());
    wait_unread(&vm.repo.join("vm1"));
    assert_eq!(status(&alpha), (vec!["gone".into()], vec!["ended".into()]));
    let refused = beta.run(&prune);
    assert_refused(
        &refused,
        &[
            "on host alpha",
            lease[0].to_str().unwrap(),
            "no longer serves it",
        ],
    );
    assert_eq!(count(&beta), 3, "a refused prune removed backups");
    // consolidate, the other deleter, is refused alike.
    let refused = beta.run(&[
        "consolidate",
        "--repo",
        &repo,
        "--vm",
        "vm1",
        "--max-chain",
        "1",
    ]);
    assert_refused(&refused, &["on host alpha"]);
    assert_eq!(count(&beta), 3, "a refused consolidate removed backups");
    // The operator does as told: beta's prune runs.
    std::fs::remove_file(&lease[0]).unwrap();
    let pruned = beta.run(&prune);
    assert_eq!(pruned.code, Some(0), "{}", pruned.stderr);
    assert_eq!(count(&beta), 1);

    // On alpha: a new mount (the dead one cleaned up first), its daemon
    // killed; alpha's own prune removes its dead lease and runs.
    let served = mount_at(&alpha, &repo, &mnt);
    assert_eq!(lease_files().len(), 1);
    assert!(same_content(
        &mnt.join("drive0.raw"),
        "raw",
        &vm.points[2].1[0],
        "raw"
    ));
    kill9(served["pid"].as_u64().unwrap());
    wait_unread(&vm.repo.join("vm1"));
    let pruned = alpha.run(&prune);
    assert_eq!(pruned.code, Some(0), "{}", pruned.stderr);
    assert_eq!(lease_files(), Vec::<PathBuf>::new());
    let out = alpha.run(&["umount", mnt.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(alpha.entries().is_empty(), "{:?}", alpha.entries());
}

/// The host offset of the first data cluster of qcow2 `file`.
fn first_data_offset(file: &Path) -> u64 {
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json"])
        .arg(file));
    let map: Value = serde_json::from_slice(&out.stdout).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .find(|e| e["data"] == true && e["depth"] == 0 && e["offset"].is_u64())
        .and_then(|e| e["offset"].as_u64())
        .expect("a data cluster")
}

/// What is known of a point is honoured by every way of serving it: one
/// data byte flipped in its full, found by `verify`, and (another point) a
/// truncated file, found by nobody yet. `mount`, `restore --live` and
/// `export` refuse each, naming the file, and serve nothing; `--no-verify`
/// serves the flipped byte, and says what it skips.
#[test]
fn a_point_known_damaged_is_served_by_no_path_unless_told() {
    let dir = tempdir();
    let rt = Runtime::new();
    let mut vm = Vm::new(dir.path(), &[8 * MIB]);
    vm.write(0, 0, 2 * MIB, 0x61);
    let rotten = vm.backup(&[])["id"].as_str().unwrap().to_string();
    vm.quit();
    let repo = vm.repo.to_str().unwrap().to_string();
    let file = vm.repo.join("vm1").join(&rotten).join("drive0.qcow2");
    let at = first_data_offset(&file);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[at as usize + 100] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let verified = rt.run(&["verify", "--repo", &repo]);
    assert_eq!(verified.code, Some(1), "{}", verified.stdout);

    let refused = |args: &[&str]| {
        let run = rt.run(args);
        assert_ne!(run.code, Some(0), "{args:?}: {}", run.stdout);
        assert!(
            run.stderr.contains("damaged") && run.stderr.contains("drive0.qcow2"),
            "{args:?}: {}",
            run.stderr
        );
        assert!(rt.entries().is_empty(), "{:?}", rt.entries());
    };
    let mnt = dir.path().join("mnt");
    let live = dir.path().join("live");
    let sock = dir.path().join("export.sock");
    let base = ["--repo", repo.as_str(), "--vm", "vm1"];
    let with = |command: &[&str], extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = command.iter().map(|s| s.to_string()).collect();
        args.extend(base.iter().map(|s| s.to_string()));
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    for args in [
        with(&["mount"], &[mnt.to_str().unwrap()]),
        with(
            &["restore"],
            &["--live", "--output", live.to_str().unwrap()],
        ),
        with(
            &["export"],
            &["--volume", "drive0", "--socket", sock.to_str().unwrap()],
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&args);
    }
    assert!(!live.join("drive0.qcow2").exists());
    assert!(!sock.exists());

    // --no-verify serves it, flipped byte and all, and says so.
    let told = rt.run(&[
        "mount",
        "--repo",
        &repo,
        "--vm",
        "vm1",
        "--no-verify",
        "--json",
        mnt.to_str().unwrap(),
    ]);
    assert_eq!(told.code, Some(0), "{}", told.stderr);
    assert!(told.stderr.contains("--no-verify"), "{}", told.stderr);
    let served = std::fs::read(mnt.join("drive0.raw")).unwrap();
    assert_ne!(
        &served[..2 * MIB as usize],
        &vec![0x61u8; 2 * MIB as usize][..]
    );
    let out = rt.run(&["umount", mnt.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    // A file cut short since its backup: refused unverified too.
    let two = dir.path().join("two");
    std::fs::create_dir_all(&two).unwrap();
    let mut vm = Vm::new(&two, &[8 * MIB]);
    vm.write(0, 0, MIB, 0x62);
    let cut = vm.backup(&[])["id"].as_str().unwrap().to_string();
    vm.quit();
    let repo = vm.repo.to_str().unwrap().to_string();
    let file = vm.repo.join("vm1").join(&cut).join("drive0.qcow2");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len - 512)
        .unwrap();
    let run = rt.run(&[
        "mount",
        "--repo",
        &repo,
        "--vm",
        "vm1",
        mnt.to_str().unwrap(),
    ]);
    assert_ne!(run.code, Some(0), "{}", run.stdout);
    assert!(run.stderr.contains("truncated"), "{}", run.stderr);
    assert!(rt.entries().is_empty(), "{:?}", rt.entries());
}
