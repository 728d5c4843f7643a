//! Restores in seconds, measured. A qcow2 volume of
//! BITBACK_BENCH_VIRTUAL_GIB (64) GiB holding BITBACK_BENCH_DATA_GIB (4)
//! GiB of data is backed up once; then, BITBACK_BENCH_REPEAT (3) rounds of:
//!
//! - `restore --live` until it returns (the images exist and the export
//!   serves: a VM can start on them);
//! - `mount` until it returns (the files serve), and `umount`;
//! - a plain `restore` of the same point to a raw file (`--no-verify`);
//! - a VM (a qemu-storage-daemon on the live image, with an NBD export of
//!   its disk for the reads below) and `restore --finish`: the stream's
//!   whole time;
//! - BITBACK_BENCH_READ_MIB (1024) MiB of the guest's data (its first 16
//!   MiB pieces) read through the VM (`qemu-io` over its export) before the
//!   stream (every byte from the backup), during it, and after it (every
//!   byte local).
//!
//! Medians, then a JSON line with every run.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    BITBACK, Daemon, bitback_backup, bitback_restore, env_u64, median, run, run_measured,
    sparse_disk,
};
use serde_json::{Value, json};

/// Runs bitback with the bench's runtime directory; returns (time, JSON).
fn timed_json(runtime: &Path, args: &[&str]) -> (Duration, Value) {
    let start = Instant::now();
    let out = Command::new(BITBACK)
        .args(args)
        .env("BITBACK_RUNTIME_DIR", runtime)
        .stderr(Stdio::inherit())
        .output()
        .expect("running bitback");
    let t = start.elapsed();
    assert!(out.status.success(), "bitback {}", args.join(" "));
    (t, serde_json::from_slice(&out.stdout).expect("JSON"))
}

/// Reads the first `len` bytes of the disk's data (the 16 MiB pieces
/// [`common::spread_writes`] wrote over `size` bytes with `data` in all)
/// from the VM's disk, in one qemu-io; returns MiB/s.
fn read_rate(url: &str, size: u64, data: u64, len: u64) -> f64 {
    let stride = size / (data >> 24).max(1);
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-r", "-f", "raw", url]);
    for i in 0..(len >> 24).max(1) {
        cmd.arg("-c")
            .arg(format!("read {} 16M", (i * stride) >> 16 << 16));
    }
    let start = Instant::now();
    run(&mut cmd);
    (len >> 20) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let size = env_u64("BITBACK_BENCH_VIRTUAL_GIB", 64) << 30;
    let data = env_u64("BITBACK_BENCH_DATA_GIB", 4) << 30;
    let read = env_u64("BITBACK_BENCH_READ_MIB", 1024) << 20;
    let rounds = env_u64("BITBACK_BENCH_REPEAT", 3).max(1);
    let (dir, _disk, daemon) = sparse_disk("bitback-instant-", size, data);
    let d = dir.path();
    let repo = d.join("repo");
    let (_, _, full) = bitback_backup(&daemon, &repo, "vm", &[]);
    assert_eq!(full["kind"], "full");
    drop(daemon);
    let runtime = d.join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    let repo_s = repo.to_str().unwrap().to_string();

    let (mut live, mut mount, mut plain, mut stream) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut before, mut during, mut after) = (Vec::new(), Vec::new(), Vec::new());
    let mut live_rss = 0u64;
    for round in 0..rounds {
        // A plain restore of the same point.
        let out = d.join("restored.raw");
        let (t, _) = bitback_restore(&repo, "vm", None, &out);
        std::fs::remove_file(&out).unwrap();
        eprintln!("round {round}: plain restore {:.2} s", t.as_secs_f64());
        plain.push(t);

        // Mounted.
        let mnt = d.join("mnt");
        let (t, _) = timed_json(
            &runtime,
            &[
                "mount",
                "--repo",
                &repo_s,
                "--vm",
                "vm",
                "--json",
                mnt.to_str().unwrap(),
            ],
        );
        eprintln!("round {round}: mount {:.3} s", t.as_secs_f64());
        mount.push(t);
        timed_json(&runtime, &["umount", "--json", mnt.to_str().unwrap()]);

        // Live: ready, read before, during and after the stream.
        let out = d.join("live");
        let (t, rss, served) = run_measured(
            Command::new(BITBACK)
                .args(["restore", "--repo", &repo_s, "--vm", "vm", "--live"])
                .arg("--output")
                .arg(&out)
                .arg("--json")
                .env("BITBACK_RUNTIME_DIR", &runtime),
        );
        let served: Value = serde_json::from_str(&served).expect("JSON");
        eprintln!(
            "round {round}: live ready {:.3} s, peak RSS {} MiB",
            t.as_secs_f64(),
            rss >> 20
        );
        live.push(t);
        live_rss = live_rss.max(rss);
        let image = std::path::PathBuf::from(served["files"][0]["path"].as_str().unwrap());
        // The VM: a qemu-storage-daemon on the live image, its disk
        // exported for the reads below.
        let vm = Daemon::start(d, &image);
        let url = vm.url.clone();
        let r = read_rate(&url, size, data, read);
        eprintln!("round {round}: guest reads before the stream {r:.0} MiB/s");
        before.push(r);
        let start = Instant::now();
        let mut finish = Command::new(BITBACK)
            .args(["restore", "--finish", "--json", "--qmp"])
            .arg(&vm.qmp)
            .env("BITBACK_RUNTIME_DIR", &runtime)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let r = read_rate(&url, size, data, read);
        eprintln!("round {round}: guest reads during the stream {r:.0} MiB/s");
        during.push(r);
        assert!(finish.wait().unwrap().success(), "restore --finish failed");
        let t = start.elapsed();
        eprintln!("round {round}: stream {:.2} s", t.as_secs_f64());
        stream.push(t);
        let r = read_rate(&url, size, data, read);
        eprintln!("round {round}: guest reads after the stream {r:.0} MiB/s");
        after.push(r);
        drop(vm);
        std::fs::remove_dir_all(&out).unwrap();
    }
    let rate = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (l, m, p, s) = (
        median(&live),
        median(&mount),
        median(&plain),
        median(&stream),
    );
    println!();
    println!(
        "qcow2 volume, {} GiB virtual / {} GiB data, one full backup; medians of {rounds}",
        size >> 30,
        data >> 30
    );
    println!();
    println!("| | time | vs a plain restore |");
    println!("|---|---|---|");
    println!("| plain restore (raw, --no-verify): the VM can start after | {p:.2} s | 1.00x |");
    println!(
        "| restore --live: the VM can start after | {l:.3} s | {:.4}x |",
        l / p
    );
    println!("| mount | {m:.3} s | {:.4}x |", m / p);
    // run_measured samples every 20 ms: a run shorter than that shows 0.
    match live_rss {
        0 => println!("| (peak RSS of restore --live: each run too short to sample) | | |"),
        rss => println!("| (peak RSS of restore --live: {} MiB) | | |", rss >> 20),
    }
    println!(
        "| restore --finish (the stream, the VM running) | {s:.2} s | {:.2}x |",
        s / p
    );
    println!();
    println!(
        "guest reads of {} MiB of data: {:.0} MiB/s before the stream, {:.0} MiB/s during it, {:.0} MiB/s after it",
        read >> 20,
        rate(&before),
        rate(&during),
        rate(&after)
    );
    let secs = |v: &[Duration]| v.iter().map(|t| t.as_secs_f64()).collect::<Vec<_>>();
    println!(
        "{}",
        json!({ "bench": "instant", "virtual_gib": size >> 30, "data_gib": data >> 30,
                "plain_s": secs(&plain), "live_s": secs(&live), "mount_s": secs(&mount),
                "stream_s": secs(&stream), "read_mib": read >> 20, "live_peak_rss": live_rss,
                "read_before_mib_s": before, "read_during_mib_s": during, "read_after_mib_s": after })
    );
}
