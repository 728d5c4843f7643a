//! Guest writes during a backup to a slow repository, with and without
//! `--fleecing`, and with no backup running, side by side in one run.
//!
//! A `-machine pc -S` QEMU with one virtio-blk disk (BITBACK_BENCH_DATA_MIB
//! of data, default 256, on a disk twice that size) stands in for the
//! guest; its writes go through the device (HMP `qemu-io -d`), above the
//! backup's filter, as a guest's do. The repository is slowfs (a FUSE
//! passthrough with direct I/O, writes held to BITBACK_BENCH_RATE_MB MB/s,
//! default 20) over BITBACK_BENCH_DIR (default /var/tmp); the fleecing
//! directory is a plain directory there (BITBACK_BENCH_FLEECE_DIR to
//! choose another). Each measurement times
//! BITBACK_BENCH_WRITES (default 32) writes of 1 MiB to data the copy has
//! not reached yet; a backup runs from shortly before the first write (its
//! job seen in QEMU) and is then cancelled (SIGTERM). Rounds alternate the
//! three modes (BITBACK_BENCH_REPEAT rounds, default 3); the median of each
//! is printed, then a JSON line with every run. BITBACK_BENCH_ARGS adds
//! arguments to both backups.

#[path = "../fixtures/slowfs/mount.rs"]
mod slowfs;

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{BITBACK, Monitor, env_u64, run};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// A guest write of 1 MiB through the device, above the backup's filter.
fn guest_write(monitor: &mut Monitor, offset: u64, pattern: u8) {
    let out = monitor.call(
        "human-monitor-command",
        json!({ "command-line": format!(
            "qemu-io -d /machine/peripheral/disk0/virtio-backend \"write -P {pattern} {offset} 1M\""
        ) }),
    );
    assert!(!out.as_str().unwrap_or_default().contains("rror"), "{out}");
}

struct Qemu {
    child: Child,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_qemu(dir: &Path, disk: &Path) -> (Qemu, PathBuf, Monitor) {
    let qmp = dir.join("qmp.sock");
    let control = dir.join("control.sock");
    let child = Command::new("qemu-system-x86_64")
        .args(common::PC_VM)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", control.display()))
        .arg("-blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=file0",
            disk.display()
        ))
        .args(["-blockdev", "driver=qcow2,file=file0,node-name=drive0"])
        .args(["-device", "virtio-blk-pci,drive=drive0,id=disk0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("starting qemu-system-x86_64 (install qemu-system-x86)");
    let monitor = Monitor::connect(&control);
    (Qemu { child }, qmp, monitor)
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    NoBackup,
    Backup,
    Fleecing,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::NoBackup => "no backup",
            Mode::Backup => "backup, no fleecing",
            Mode::Fleecing => "backup with --fleecing",
        }
    }
}

fn main() {
    let data = env_u64("BITBACK_BENCH_DATA_MIB", 256) * MIB;
    let rate = env_u64("BITBACK_BENCH_RATE_MB", 20) * 1_000_000;
    let writes = env_u64("BITBACK_BENCH_WRITES", 32);
    let rounds = env_u64("BITBACK_BENCH_REPEAT", 3);
    assert!(
        writes * MIB < data / 2,
        "BITBACK_BENCH_WRITES MiB must stay under half the data"
    );
    let dir = common::bench_dir("bitback-bench-fleecing-");
    let disk = dir.path().join("disk.qcow2");
    common::create_qcow2(&disk, 2 * data);
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &format!("write -P 17 0 {data}")])
        .arg(&disk)
        .stdout(Stdio::null()));
    let slow = slowfs::SlowFs::mount(&dir.path().join("nas-store"), &dir.path().join("nas"), rate);
    let fleece = std::env::var_os("BITBACK_BENCH_FLEECE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("fleece"));
    std::fs::create_dir_all(&fleece).unwrap();
    let (_qemu, qmp, mut monitor) = start_qemu(dir.path(), &disk);
    eprintln!(
        "{} MiB of data, {writes} guest writes of 1 MiB, repository at {} MB/s, {rounds} rounds",
        data >> 20,
        rate / 1_000_000
    );

    let modes = [Mode::NoBackup, Mode::Backup, Mode::Fleecing];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for round in 0..rounds {
        for (m, &mode) in modes.iter().enumerate() {
            let repo = slow.mountpoint.join(format!("repo-{round}-{m}"));
            let mut backup = (mode != Mode::NoBackup).then(|| {
                let mut cmd = Command::new(BITBACK);
                cmd.args(["backup", "--full", "--qmp"])
                    .arg(&qmp)
                    .arg("--repo")
                    .arg(&repo)
                    .args(["--vm", "bench"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                if mode == Mode::Fleecing {
                    cmd.arg("--fleecing").arg(&fleece);
                }
                if let Ok(extra) = std::env::var("BITBACK_BENCH_ARGS") {
                    cmd.args(extra.split_whitespace());
                }
                cmd.spawn().expect("starting bitback")
            });
            if let Some(child) = &mut backup {
                wait_for_job(&mut monitor, child);
            }
            // Data the copy (from offset 0, at the repository's rate) has
            // not reached: the upper half of the data.
            let start = Instant::now();
            for i in 0..writes {
                guest_write(
                    &mut monitor,
                    data / 2 + i * MIB,
                    (round * 3 + m as u64) as u8 % 250 + 1,
                );
            }
            let took = start.elapsed().as_secs_f64();
            times[m].push(took);
            eprintln!("round {round}: {:<24} {took:.3} s", mode.name());
            if let Some(child) = backup {
                run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
                let out = child.wait_with_output().unwrap();
                assert_ne!(
                    out.status.code(),
                    Some(0),
                    "the backup ended before it was cancelled"
                );
            }
            let _ = std::fs::remove_dir_all(&repo);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!();
    println!("| guest writes ({writes} x 1 MiB) | median | runs |");
    println!("|---|---|---|");
    for (m, mode) in modes.iter().enumerate() {
        let runs: Vec<String> = times[m].iter().map(|t| format!("{t:.3}")).collect();
        println!(
            "| {} | {:.3} s | {} |",
            mode.name(),
            median(&times[m]),
            runs.join(", ")
        );
    }
    let ratio = median(&times[2]) / median(&times[1]);
    println!("fleecing / no fleecing: {ratio:.3}x");
    println!(
        "{}",
        json!({
            "bench": "fleecing", "data_mib": data >> 20, "rate_mb": rate / 1_000_000,
            "writes_mib": writes,
            "no_backup_s": times[0], "backup_s": times[1], "fleecing_s": times[2],
            "ratio_fleecing_to_backup": ratio,
        })
    );
    drop(slow);
}

fn wait_for_job(monitor: &mut Monitor, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let jobs = monitor.call("query-block-jobs", Value::Null);
        if jobs.as_array().is_some_and(|j| !j.is_empty()) {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            panic!("bitback ended ({status}) before its job was seen: {err}");
        }
        assert!(Instant::now() < deadline, "no backup job within 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}
