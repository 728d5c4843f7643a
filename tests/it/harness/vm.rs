//! A VM of `-machine pc` under test (no guest), its volumes' raw models
//! written in parallel with the VM's disks, and the backups taken of it:
//! the fixture most scenarios share.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Disk, Kind, Qemu, Rng, bitback, create_qcow2, same_content};

const MIB: u64 = 1 << 20;

/// A volume's expected contents, kept in memory and snapshotted to a raw
/// file at each backup.
pub(crate) struct Model {
    pub(crate) node: String,
    pub(crate) bytes: Vec<u8>,
}

/// A VM under test with its models.
pub(crate) struct Vm {
    pub(crate) dir: PathBuf,
    pub(crate) repo: PathBuf,
    pub(crate) disks: Vec<Disk>,
    pub(crate) models: Vec<Model>,
    pub(crate) qemu: Option<Qemu>,
    /// `Kind::MachineNone` (writes go to the nodes) or `Kind::Pc` (a
    /// device per volume, and writes go through the devices, as a guest's
    /// do).
    pub(crate) kind: Kind,
    /// (backup id, model files per volume)
    pub(crate) points: Vec<(String, Vec<PathBuf>)>,
}

impl Vm {
    pub(crate) fn new(dir: &Path, sizes: &[u64]) -> Vm {
        Vm::of_kind(Kind::MachineNone, dir, sizes)
    }

    /// A VM whose volumes are guest devices (`-machine pc -S`, no guest),
    /// written through the devices.
    pub(crate) fn with_devices(dir: &Path, sizes: &[u64]) -> Vm {
        Vm::of_kind(Kind::Pc, dir, sizes)
    }

    fn of_kind(kind: Kind, dir: &Path, sizes: &[u64]) -> Vm {
        let mut disks = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let image = dir.join(format!("disk{i}.qcow2"));
            create_qcow2(&image, size, &[]);
            disks.push(Disk::new(&format!("disk{i}"), &format!("drive{i}"), &image));
        }
        Vm::from_disks(kind, dir, disks, sizes)
    }

    /// A VM of `disks` (images the caller made, of `sizes`, all zeros),
    /// whose nodes are `drive0`, `drive1`, ...
    pub(crate) fn from_disks(kind: Kind, dir: &Path, disks: Vec<Disk>, sizes: &[u64]) -> Vm {
        let models = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| Model {
                node: format!("drive{i}"),
                bytes: vec![0; size as usize],
            })
            .collect();
        let mut vm = Vm {
            dir: dir.into(),
            repo: dir.join("repo"),
            disks,
            models,
            qemu: None,
            kind,
            points: Vec::new(),
        };
        vm.start();
        vm
    }

    pub(crate) fn start(&mut self) {
        self.qemu = Some(Qemu::start(self.kind, &self.dir, &self.disks));
    }

    pub(crate) fn qemu(&self) -> &Qemu {
        self.qemu.as_ref().expect("QEMU is running")
    }

    pub(crate) fn write(&mut self, volume: usize, offset: u64, len: u64, pattern: u8) {
        let cmd = format!("write -P {pattern:#x} {offset} {len}");
        match self.kind {
            Kind::Pc => self.qemu().qemu_io_device(&self.disks[volume].device, &cmd),
            _ => self.qemu().qemu_io(&self.models[volume].node, &cmd),
        }
        self.models[volume].bytes[offset as usize..(offset + len) as usize].fill(pattern);
    }

    pub(crate) fn zero(&mut self, volume: usize, offset: u64, len: u64) {
        self.qemu().qemu_io(
            &self.models[volume].node,
            &format!("write -z {offset} {len}"),
        );
        self.models[volume].bytes[offset as usize..(offset + len) as usize].fill(0);
    }

    /// Whole 64 KiB clusters only: QEMU drops partial-cluster discards.
    pub(crate) fn discard(&mut self, volume: usize, offset: u64, len: u64) {
        self.qemu().qemu_io(
            &self.models[volume].node,
            &format!("discard {offset} {len}"),
        );
        self.models[volume].bytes[offset as usize..(offset + len) as usize].fill(0);
    }

    pub(crate) fn random_writes(&mut self, rng: &mut Rng, count: usize) {
        for _ in 0..count {
            let volume = rng.below(self.models.len() as u64) as usize;
            let size = self.models[volume].bytes.len() as u64;
            match rng.below(6) {
                0 => {
                    let cluster = 65536;
                    let offset = rng.below(size / cluster) * cluster;
                    let len = cluster * (1 + rng.below(4)).min((size - offset) / cluster);
                    self.discard(volume, offset, len);
                }
                1 => {
                    let offset = rng.below(size / 512) * 512;
                    let len = (512 * (1 + rng.below(256))).min(size - offset);
                    self.zero(volume, offset, len);
                }
                _ => {
                    let offset = rng.below(size / 512) * 512;
                    let len = (512 * (1 + rng.below(512))).min(size - offset);
                    let pattern = 1 + rng.below(255) as u8;
                    self.write(volume, offset, len, pattern);
                }
            }
        }
    }

    /// `bitback backup` of the running QEMU, plus `extra` arguments.
    pub(crate) fn run_backup(&self, extra: &[&str]) -> crate::harness::Run {
        let mut args = vec!["--qmp", self.qemu().qmp.to_str().unwrap()];
        args.extend(extra);
        self.cli("backup", &args)
    }

    /// A successful `bitback backup --json`, recorded as a point.
    pub(crate) fn backup(&mut self, extra: &[&str]) -> Value {
        let mut args = vec!["--json"];
        args.extend(extra);
        let manifest = self.run_backup(&args).json();
        self.snapshot(manifest["id"].as_str().unwrap());
        manifest
    }

    /// Records the models as the contents of backup `id`.
    pub(crate) fn snapshot(&mut self, id: &str) {
        let mut files = Vec::new();
        for (i, m) in self.models.iter().enumerate() {
            let path = self.dir.join(format!("model-{id}-{i}.raw"));
            std::fs::write(&path, &m.bytes).unwrap();
            files.push(path);
        }
        self.points.push((id.to_string(), files));
    }

    /// Every file of every recorded point is `qemu-img check` clean.
    pub(crate) fn check_files(&self) {
        for (id, _) in &self.points {
            for i in 0..self.models.len() {
                let file = self
                    .repo
                    .join("vm1")
                    .join(id)
                    .join(format!("{}.qcow2", self.volume(i)));
                crate::harness::run(
                    std::process::Command::new("qemu-img")
                        .args(["check", "-q"])
                        .arg(&file),
                );
            }
        }
    }

    /// Every recorded point of every volume equals its model.
    pub(crate) fn check_all_points(&self) {
        for (id, files) in &self.points {
            for (i, model) in files.iter().enumerate() {
                let backup = self
                    .repo
                    .join("vm1")
                    .join(id)
                    .join(format!("{}.qcow2", self.volume(i)));
                assert_compare(model, &backup);
            }
        }
    }

    /// Volume `i`'s name in the repository: its device, or its node.
    pub(crate) fn volume(&self, i: usize) -> &str {
        match self.kind {
            Kind::Pc => &self.disks[i].device,
            _ => &self.models[i].node,
        }
    }

    /// `bitback <command> --repo <repo> --vm vm1`, plus `extra` arguments.
    pub(crate) fn cli(&self, command: &str, extra: &[&str]) -> crate::harness::Run {
        let mut args = vec![
            command,
            "--repo",
            self.repo.to_str().unwrap(),
            "--vm",
            "vm1",
        ];
        args.extend(extra);
        bitback(&args)
    }

    /// `bitback restore` of backup `id` to `out`, plus `extra` arguments.
    pub(crate) fn restore(&self, id: &str, out: &Path, extra: &[&str]) -> crate::harness::Run {
        let mut args = vec!["--backup", id, "--output", out.to_str().unwrap()];
        args.extend(extra);
        self.cli("restore", &args)
    }

    pub(crate) fn quit(&mut self) {
        if let Some(qemu) = self.qemu.take() {
            qemu.quit();
        }
    }

    /// QEMU dies by SIGKILL: nothing is closed, persistent bitmaps are
    /// left in use (inconsistent at the next start).
    pub(crate) fn kill(&mut self) {
        if let Some(mut qemu) = self.qemu.take() {
            qemu.kill();
        }
    }
}

fn assert_compare(model: &Path, backup: &Path) {
    assert!(
        same_content(model, "raw", backup, "qcow2"),
        "{} differs from its model {}",
        backup.display(),
        model.display()
    );
}
