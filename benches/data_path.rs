//! The data paths side by side, end to end: `bitback backup` (the release
//! binary, against qemu-storage-daemon) with `--data-path file` (QEMU
//! writes the file, bitback reads it back for its digest) and
//! `--data-path nbd` (bitback's NBD server and streaming writer: digest
//! and cluster map in flight), plain and `--compress` (QEMU's deflate on
//! the file path, bitback's zstd on the NBD path), each a full and then an
//! incremental after BITBACK_BENCH_DIRTY_MIB (64) MiB of random 1 MiB
//! writes; next to `qemu-img convert -O qcow2` of the disk (+ fsync), the
//! same with `-c -o compression_type=zstd`, and O_DIRECT writes of as
//! many bytes as the disk holds (the device's write speed: no reading, no
//! format). Each way gets a new repository; rounds alternate the order;
//! medians are printed with their ratio to the file path, with peak RSS
//! and file sizes, then a JSON line with every run.
//!
//! The disk: BITBACK_BENCH_VIRTUAL_GIB (64) GiB virtual with
//! BITBACK_BENCH_DATA_GIB (4) GiB of data in 16 MiB pieces spread over it,
//! each a copy of one 16 MiB block of bytes drawn from 16 letters (zstd
//! makes about half of it; neither all zeros nor noise).
//! BITBACK_BENCH_REPEAT (3) rounds; BITBACK_BENCH_WAYS (e.g. `0,1`) picks
//! bitback's ways by number (the table's order), baselines always run.

mod common;

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    Daemon, Monitor, Rng, bench_dir, bitback_backup, env_u64, fsync, letter_writes, median,
    random_writes, run,
};
use serde_json::{Value, json};

struct Way {
    name: &'static str,
    args: &'static [&'static str],
}

const WAYS: [Way; 4] = [
    Way {
        name: "file (QEMU writes, digest read back)",
        args: &["--data-path", "file"],
    },
    Way {
        name: "nbd (bitback writes, map in flight, layout digest)",
        args: &["--data-path", "nbd"],
    },
    Way {
        name: "file --compress (QEMU, deflate)",
        args: &["--data-path", "file", "--compress"],
    },
    Way {
        name: "nbd --compress (bitback, zstd 3)",
        args: &["--compress"],
    },
];

#[derive(Default, Clone)]
struct Runs {
    full: Vec<Duration>,
    incremental: Vec<Duration>,
    rss: u64,
    full_bytes: u64,
    incremental_bytes: u64,
}

/// Writes `bytes` with O_DIRECT in 4 MiB requests and syncs: what the
/// device takes at best.
fn direct_write(path: &Path, bytes: u64) -> Duration {
    use std::io::Write;
    let chunk = 4usize << 20;
    let mut raw = vec![0x5au8; chunk + 4096];
    let skip = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[skip..skip + chunk];
    let start = Instant::now();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .expect("O_DIRECT open");
    let mut done = 0;
    while done < bytes {
        f.write_all(buf).expect("O_DIRECT write");
        done += chunk as u64;
    }
    f.sync_all().unwrap();
    start.elapsed()
}

fn convert(disk: &Path, out: &Path, extra: &[&str]) -> Duration {
    let start = Instant::now();
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-O", "qcow2"])
        .args(extra)
        .arg(disk)
        .arg(out));
    fsync(out);
    start.elapsed()
}

/// Removes every dirty bitmap of the daemon's disk (each way's repository
/// leaves its checkpoint).
fn drop_bitmaps(qmp: &Path) {
    let mut m = Monitor::connect(qmp);
    let nodes = m.call("query-named-block-nodes", json!({ "flat": true }));
    for n in nodes.as_array().into_iter().flatten() {
        if n["node-name"] != "disk0" {
            continue;
        }
        for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
            if let Some(name) = b["name"].as_str() {
                m.call(
                    "block-dirty-bitmap-remove",
                    json!({ "node": "disk0", "name": name }),
                );
            }
        }
    }
}

fn file_size(repo: &Path, manifest: &Value) -> u64 {
    let rel = manifest["volumes"][0]["file"].as_str().unwrap();
    std::fs::metadata(repo.join(rel)).unwrap().len()
}

fn main() {
    let size = env_u64("BITBACK_BENCH_VIRTUAL_GIB", 64) << 30;
    let data = env_u64("BITBACK_BENCH_DATA_GIB", 4) << 30;
    let dirty = env_u64("BITBACK_BENCH_DIRTY_MIB", 64);
    let rounds = env_u64("BITBACK_BENCH_REPEAT", 3).max(1);
    let dir = bench_dir("bitback-data-path-");
    let d = dir.path();
    let disk = d.join("disk.qcow2");
    common::create_qcow2(&disk, size);
    let writes = letter_writes(d, 0x0da7_a9a7, size, data);
    let daemon = Daemon::start(d, &disk);
    eprintln!(
        "writing {} MiB of data over a {} MiB disk",
        data >> 20,
        size >> 20
    );
    daemon.write(&writes);

    let picked: Vec<usize> = std::env::var("BITBACK_BENCH_WAYS")
        .map(|v| v.split(',').filter_map(|w| w.trim().parse().ok()).collect())
        .unwrap_or_else(|_| (0..WAYS.len()).collect());
    let mut runs = vec![Runs::default(); WAYS.len()];
    let (mut plain, mut zstd, mut direct) = (Vec::new(), Vec::new(), Vec::new());
    let mut zstd_bytes = 0;
    for round in 0..rounds {
        for k in 0..WAYS.len() + 3 {
            let which = (k + round as usize) % (WAYS.len() + 3);
            let out = d.join("baseline.qcow2");
            let _ = std::fs::remove_file(&out);
            if which >= WAYS.len() {
                let (name, t) = match which - WAYS.len() {
                    0 => {
                        let t = convert(&disk, &out, &[]);
                        plain.push(t);
                        ("qemu-img convert", t)
                    }
                    1 => {
                        let t = convert(&disk, &out, &["-c", "-o", "compression_type=zstd"]);
                        zstd_bytes = std::fs::metadata(&out).unwrap().len();
                        zstd.push(t);
                        ("qemu-img convert -c zstd", t)
                    }
                    _ => {
                        let t = direct_write(&out, data);
                        direct.push(t);
                        ("O_DIRECT writes", t)
                    }
                };
                eprintln!("round {round}: {name:<46} {:.2} s", t.as_secs_f64());
                let _ = std::fs::remove_file(&out);
                continue;
            }
            if !picked.contains(&which) {
                continue;
            }
            let way = &WAYS[which];
            let repo = d.join(format!("repo-{which}"));
            let _ = std::fs::remove_dir_all(&repo);
            let (t, rss, full) = bitback_backup(&daemon, &repo, "vm", way.args);
            assert_eq!(full["kind"], "full", "{full}");
            let mut dirty_rng = Rng(0x1d1 + round);
            daemon.write(&random_writes(&mut dirty_rng, size, dirty, round + 7));
            let (ti, rss_i, inc) = bitback_backup(&daemon, &repo, "vm", way.args);
            assert_eq!(inc["kind"], "incremental", "{inc}");
            if round == 0 {
                // The chain against the disk, read by qemu-img.
                let top = repo.join(inc["volumes"][0]["file"].as_str().unwrap());
                let same = Command::new("qemu-img")
                    .args(["compare", "-U", "-q"])
                    .arg(&disk)
                    .arg(&top)
                    .status()
                    .unwrap();
                assert!(
                    same.success(),
                    "{}: the chain differs from the disk",
                    way.name
                );
            }
            let r = &mut runs[which];
            r.full.push(t);
            r.incremental.push(ti);
            r.rss = r.rss.max(rss).max(rss_i);
            r.full_bytes = file_size(&repo, &full);
            r.incremental_bytes = file_size(&repo, &inc);
            eprintln!(
                "round {round}: {:<46} full {:.2} s, incremental {:.2} s",
                way.name,
                t.as_secs_f64(),
                ti.as_secs_f64()
            );
            std::fs::remove_dir_all(&repo).unwrap();
            drop_bitmaps(&daemon.qmp);
        }
    }
    let base = (median(&runs[0].full), median(&runs[0].incremental));
    println!();
    println!(
        "{} GiB virtual / {} GiB data, {dirty} MiB dirty; medians of {rounds}; O_DIRECT writes of {} GiB: {:.2} s",
        size >> 30,
        data >> 30,
        data >> 30,
        median(&direct)
    );
    println!();
    println!(
        "| way | full | vs file | vs O_DIRECT | incremental | vs file | full file | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (way, r) in WAYS.iter().zip(&runs) {
        if r.full.is_empty() {
            continue;
        }
        let (f, i) = (median(&r.full), median(&r.incremental));
        println!(
            "| {} | {f:.2} s | {:.2}x | {:.2}x | {i:.2} s | {:.2}x | {} MiB | {} MiB |",
            way.name,
            f / base.0,
            f / median(&direct),
            i / base.1,
            r.full_bytes >> 20,
            r.rss >> 20
        );
    }
    println!(
        "| qemu-img convert -O qcow2 | {:.2} s | {:.2}x | {:.2}x | | | | |",
        median(&plain),
        median(&plain) / base.0,
        median(&plain) / median(&direct)
    );
    println!(
        "| qemu-img convert -c zstd | {:.2} s | {:.2}x | {:.2}x | | | {} MiB | |",
        median(&zstd),
        median(&zstd) / base.0,
        median(&zstd) / median(&direct),
        zstd_bytes >> 20
    );
    let secs = |v: &[Duration]| v.iter().map(|t| t.as_secs_f64()).collect::<Vec<_>>();
    let ways: Vec<Value> = WAYS
        .iter()
        .zip(&runs)
        .map(|(w, r)| {
            json!({ "way": w.name, "full_s": secs(&r.full), "incremental_s": secs(&r.incremental),
                    "peak_rss": r.rss, "full_bytes": r.full_bytes, "incremental_bytes": r.incremental_bytes })
        })
        .collect();
    println!(
        "{}",
        json!({ "bench": "data_path", "virtual_gib": size >> 30, "data_gib": data >> 30, "dirty_mib": dirty,
                "ways": ways, "convert_s": secs(&plain), "convert_zstd_s": secs(&zstd),
                "o_direct_s": secs(&direct) })
    );
}
