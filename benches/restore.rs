//! Restore time against chain length, next to `qemu-img convert` of the
//! same chain, in the same run.
//!
//! `cargo bench --bench restore` builds, with bitback's own backups of a
//! disk served by qemu-storage-daemon, one chain of 30 backups of a
//! BITBACK_BENCH_GIB GiB disk (default 4) holding BITBACK_BENCH_DATA_MIB
//! MiB of data (default 1024) plus BITBACK_BENCH_DIRTY_MIB MiB of random
//! writes between backups (default 32). It then restores the points at
//! chain lengths 1, 10 and 30 to raw files natively (digests not checked,
//! as qemu-img does not check them either) and with `qemu-img convert -O
//! raw` of the chain top, each twice, keeping the faster run, and prints a
//! table and the raw figures as JSON. Both read warm page cache, and both
//! include syncing the output (bitback does before it reports success;
//! the baseline is `qemu-img convert` followed by an fsync).

#[path = "common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Rng, env_u64, fsync, random_writes, run, sparse_disk};

use bitback::engine::{self, BackupOptions, CopyOptions, Format, RestoreOptions};
use bitback::qmp::Qmp;
use bitback::repo::Repo;
use serde_json::json;

fn best_of_two(mut f: impl FnMut() -> Duration) -> Duration {
    let a = f();
    let b = f();
    a.min(b)
}

fn main() {
    // cargo bench passes --bench; nothing else to parse.
    let gib = env_u64("BITBACK_BENCH_GIB", 4);
    let data_mib = env_u64("BITBACK_BENCH_DATA_MIB", 1024);
    let dirty_mib = env_u64("BITBACK_BENCH_DIRTY_MIB", 32);
    let size = gib << 30;
    let (dir, _disk, daemon) = sparse_disk("bitback-bench-", size, data_mib << 20);

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let repo_dir = dir.path().join("repo");
    let repo = Repo::create(&repo_dir).expect("repo");
    let opts = BackupOptions {
        copy: CopyOptions {
            vm: "bench".into(),
            ..CopyOptions::default()
        },
        ..BackupOptions::default()
    };
    let mut ids = Vec::new();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    rt.block_on(async {
        let qmp = Qmp::connect(daemon.qmp.to_str().unwrap())
            .await
            .expect("qmp");
        let lock = repo.lock_vm("bench", "bench").expect("lock");
        let (_tx, cancel) = tokio::sync::watch::channel(false);
        // 30 backups in one chain, then a full of the last point: the same
        // data behind a chain of 1.
        for i in 0..31 {
            if i > 0 && i < 30 {
                daemon.write(&random_writes(&mut rng, size, dirty_mib, i));
            }
            let mut opts = opts.clone();
            opts.policy.force_full = i == 30;
            let m = engine::backup(&qmp, &repo, &lock, &opts, cancel.clone())
                .await
                .expect("backup");
            eprintln!("backup {} ({:?}, position {})", m.id, m.kind, m.position);
            ids.push(m.id);
        }
    });
    drop(daemon);

    let mut rows = Vec::new();
    let cases = [
        ("1 (first full)", 0usize),
        ("10", 9),
        ("30", 29),
        ("1 (full of point 30)", 30),
    ];
    for (label, index) in cases {
        let id = &ids[index];
        let top = repo_dir.join("bench").join(id).join("disk0.qcow2");
        let native_out = dir.path().join(format!("native-{index}.raw"));
        let qemu_out = dir.path().join(format!("qemu-{index}.raw"));
        let native = best_of_two(|| {
            let _ = std::fs::remove_file(&native_out);
            let start = Instant::now();
            engine::restore(
                &repo,
                &RestoreOptions {
                    vm: "bench".into(),
                    backup: bitback::engine::Pick::Id(id.clone()),
                    volumes: Vec::new(),
                    output: native_out.clone(),
                    format: Format::Raw,
                    threads: 4,
                    verify: false,
                    progress: None,
                    key: None,
                },
            )
            .expect("native restore");
            start.elapsed()
        });
        let qemu = best_of_two(|| {
            let _ = std::fs::remove_file(&qemu_out);
            let start = Instant::now();
            run(Command::new("qemu-img")
                .args(["convert", "-O", "raw"])
                .arg(&top)
                .arg(&qemu_out));
            // bitback syncs its output before it reports success; so must
            // the baseline.
            fsync(&qemu_out);
            start.elapsed()
        });
        run(Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "raw"])
            .arg(&native_out)
            .arg(&qemu_out));
        let _ = std::fs::remove_file(&native_out);
        let _ = std::fs::remove_file(&qemu_out);
        rows.push((label, native, qemu));
    }

    println!(
        "restore of a {gib} GiB disk with {data_mib} MiB of data, {dirty_mib} MiB dirtied per backup"
    );
    println!(
        "{:<22} {:>10} {:>18} {:>8}",
        "chain", "bitback", "qemu-img + fsync", "ratio"
    );
    for (label, native, qemu) in &rows {
        println!(
            "{:<22} {:>8.2} s {:>16.2} s {:>7.2}x",
            label,
            native.as_secs_f64(),
            qemu.as_secs_f64(),
            qemu.as_secs_f64() / native.as_secs_f64()
        );
    }
    // The same data behind chains of 30 and of 1.
    let chain1 = rows[3].1.as_secs_f64();
    let chain30 = rows[2].1.as_secs_f64();
    println!(
        "bitback, point 30 from a chain of 30 vs from a full: {:+.1}%",
        (chain30 / chain1 - 1.0) * 100.0
    );
    let figures: Vec<_> = rows
        .iter()
        .map(|(l, n, q)| {
            json!({"chain": l, "bitback_s": n.as_secs_f64(), "qemu_img_convert_fsync_s": q.as_secs_f64()})
        })
        .collect();
    println!(
        "{}",
        json!({"disk_gib": gib, "data_mib": data_mib, "dirty_mib_per_backup": dirty_mib, "restores": figures})
    );
}
