//! The data path's first measure: QEMU's backup job writing a full into a
//! qcow2 file target and the file's digest read back (what bitback does
//! today), next to the same job writing through QEMU's `nbd` driver into
//! bitback's NBD server and streaming qcow2 writer, which digests in flight
//! (`bitback::nbd`, `bitback::qcow2::Stream`, in this process), next to
//! `qemu-img convert -O qcow2` of the disk (no digest).
//!
//! A sparse qcow2 disk of BITBACK_BENCH_VIRTUAL_GIB GiB (default 16) with
//! BITBACK_BENCH_DATA_GIB GiB of data (default 2) is served by
//! qemu-storage-daemon; each run is `blockdev-backup sync=top` (as bitback
//! runs a full of an image without a backing file) into a new file, timed
//! from the job's start until the file is synced, in
//! BITBACK_BENCH_REPEAT (default 3) rounds alternating the three ways; the
//! medians are printed, then a JSON line with every run. Every output is
//! checked against the disk with `qemu-img compare` once.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bitback::qcow2::{CreateOptions, Stream};
use common::{Monitor, env_u64, fsync, run, sparse_disk};
use serde_json::json;

fn file_target(monitor: &mut Monitor, out: &Path, size: u64) -> Duration {
    bitback::qcow2::create(
        out,
        &CreateOptions {
            size,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let start = Instant::now();
    monitor.call(
        "blockdev-add",
        json!({ "driver": "qcow2", "node-name": "t", "backing": null,
                "cache": { "no-flush": true },
                "file": { "driver": "file", "filename": out } }),
    );
    backup(monitor);
    monitor.call("blockdev-del", json!({ "node-name": "t" }));
    fsync(out);
    // As a backup does: the file's digest, read back.
    bitback::engine::digest_file(out).unwrap();
    start.elapsed()
}

fn backup(monitor: &mut Monitor) {
    monitor.call(
        "blockdev-backup",
        json!({ "job-id": "j", "device": "disk0", "target": "t", "sync": "top",
                "auto-dismiss": false }),
    );
    let done = monitor.wait_event("BLOCK_JOB_COMPLETED");
    assert!(done.get("error").is_none(), "the job failed: {done}");
    monitor.call("job-dismiss", json!({ "id": "j" }));
}

fn nbd_target(monitor: &mut Monitor, dir: &Path, out: &Path, size: u64) -> Duration {
    let socket = dir.join("bitback-nbd.sock");
    let _ = std::fs::remove_file(&socket);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = {
        let _guard = runtime.enter();
        tokio::net::UnixListener::bind(&socket).unwrap()
    };
    let image = Stream::create(
        out,
        &CreateOptions {
            size,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let server = std::thread::spawn(move || {
        let (served, image) = runtime.block_on(async {
            let (conn, _) = listener.accept().await.unwrap();
            bitback::nbd::serve(conn, "disk", image).await
        });
        served.expect("the NBD connection");
        image.finish().unwrap();
    });
    let start = Instant::now();
    monitor.call(
        "blockdev-add",
        json!({ "driver": "nbd", "node-name": "t", "export": "disk",
                "server": { "type": "unix", "path": socket } }),
    );
    backup(monitor);
    monitor.call("blockdev-del", json!({ "node-name": "t" }));
    server.join().expect("the server");
    start.elapsed()
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let size = env_u64("BITBACK_BENCH_VIRTUAL_GIB", 16) << 30;
    let data = env_u64("BITBACK_BENCH_DATA_GIB", 2) << 30;
    let rounds = env_u64("BITBACK_BENCH_REPEAT", 3).max(1);
    let (dir, disk, daemon) = sparse_disk("bitback-nbd-target-", size, data);
    let d = dir.path();
    let mut monitor = Monitor::connect(&daemon.qmp);
    let names = [
        "file target + digest read back (today)",
        "NBD server + Stream, digest in flight",
        "qemu-img convert (no digest)",
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); 3];
    for round in 0..rounds {
        for k in 0..3 {
            let way = (k + round as usize) % 3;
            let out = d.join(format!("out-{way}.qcow2"));
            let _ = std::fs::remove_file(&out);
            let t = match way {
                0 => file_target(&mut monitor, &out, size),
                1 => nbd_target(&mut monitor, d, &out, size),
                _ => {
                    let start = Instant::now();
                    run(Command::new("qemu-img")
                        .args(["convert", "-U", "-O", "qcow2"])
                        .arg(&disk)
                        .arg(&out));
                    fsync(&out);
                    start.elapsed()
                }
            };
            eprintln!("round {round}: {:<28} {:.2} s", names[way], t.as_secs_f64());
            if round == 0 {
                let same = Command::new("qemu-img")
                    .args(["compare", "-U", "-q"])
                    .arg(&disk)
                    .arg(&out)
                    .status()
                    .unwrap();
                assert!(same.success(), "{} differs from the disk", names[way]);
            }
            times[way].push(t);
            std::fs::remove_file(&out).unwrap();
        }
    }
    println!();
    println!(
        "| full of {} GiB virtual / {} GiB data | median | ratio to the file target |",
        size >> 30,
        data >> 30
    );
    println!("|---|---|---|");
    let base = median(&times[0]).as_secs_f64();
    for (way, name) in names.iter().enumerate() {
        let m = median(&times[way]).as_secs_f64();
        println!("| {name} | {m:.2} s | {:.2}x |", m / base);
    }
    let secs = |v: &Vec<Duration>| v.iter().map(|t| t.as_secs_f64()).collect::<Vec<_>>();
    println!(
        "{}",
        json!({ "bench": "nbd_target", "with_digests": true, "virtual_gib": size >> 30, "data_gib": data >> 30,
                "file_target_s": secs(&times[0]), "nbd_stream_s": secs(&times[1]),
                "qemu_img_convert_s": secs(&times[2]) })
    );
}
