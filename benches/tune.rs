//! The copy settings measured against each other, to choose defaults.
//!
//! `cargo bench --bench tune` serves a sparse qcow2 disk of
//! BITBACK_BENCH_VIRTUAL_GIB GiB (default 64) holding BITBACK_BENCH_DATA_GIB
//! GiB of data (default 4) with qemu-storage-daemon and, with the release
//! `bitback` binary, best of BITBACK_BENCH_REPEAT runs (default 2):
//! 1. full backups with QEMU's `x-perf` settings (max-workers, max-chunk,
//!    use-copy-range) and target cluster sizes, next to `qemu-img convert
//!    -O qcow2` of the disk (+fsync);
//! 2. for each target cluster size and bitmap granularity: a full, an
//!    incremental after BITBACK_BENCH_SMALL_WRITES 4 KiB writes at random
//!    (default 4096, the pattern of a database or a journal), an
//!    incremental after 64 MiB of 1 MiB writes, and a restore of that
//!    third point; with the bytes each incremental copied.
//!
//! It prints the tables and the raw numbers as JSON.

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    Daemon, Rng, bitback_backup, bitback_restore, env_u64, fsync, run, sparse_disk, writes_of,
};
use serde_json::{Value, json};

fn backup(daemon: &Daemon, repo: &Path, args: &[&str]) -> (Duration, Value) {
    let (t, _, manifest) = bitback_backup(daemon, repo, "tune", args);
    (t, manifest)
}

fn written(manifest: &Value) -> u64 {
    manifest["volumes"][0]["bytes_written"]
        .as_u64()
        .unwrap_or_default()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn main() {
    let virtual_gib = env_u64("BITBACK_BENCH_VIRTUAL_GIB", 64);
    let data_gib = env_u64("BITBACK_BENCH_DATA_GIB", 4);
    let repeat = env_u64("BITBACK_BENCH_REPEAT", 2).max(1);
    let small_writes = env_u64("BITBACK_BENCH_SMALL_WRITES", 4096);
    let size = virtual_gib << 30;
    let (dir, disk, daemon) = sparse_disk("bitback-tune-", size, data_gib << 30);
    let d = dir.path();
    // The incremental writes of part 2, once before anything is timed, so
    // every full below copies the same data.
    let small = writes_of(&mut Rng(7), size, small_writes, 4096, 11);
    let large = writes_of(&mut Rng(13), size, 64, 1 << 20, 12);
    daemon.write(&small);
    daemon.write(&large);

    let best = |f: &mut dyn FnMut() -> Duration| (0..repeat).map(|_| f()).min().unwrap_or_default();

    // Part 1: full backups.
    let copy = d.join("copy.qcow2");
    let convert = best(&mut || {
        let start = Instant::now();
        run(Command::new("qemu-img")
            .args(["convert", "-U", "-O", "qcow2"])
            .arg(&disk)
            .arg(&copy));
        fsync(&copy);
        let t = start.elapsed();
        let _ = std::fs::remove_file(&copy);
        t
    });
    let variants: &[(&str, &[&str])] = &[
        ("QEMU defaults (64 workers, 1M chunks)", &[]),
        ("max-workers 1", &["--max-workers", "1"]),
        ("max-workers 4", &["--max-workers", "4"]),
        ("max-workers 16", &["--max-workers", "16"]),
        ("max-workers 128", &["--max-workers", "128"]),
        ("max-chunk 64K", &["--max-chunk", "64K"]),
        ("max-chunk 256K", &["--max-chunk", "256K"]),
        ("copy-range (16M chunks)", &["--copy-range"]),
        (
            "copy-range, max-chunk 1M",
            &["--copy-range", "--max-chunk", "1M"],
        ),
        ("cluster-size 256K", &["--cluster-size", "256K"]),
        ("cluster-size 1M", &["--cluster-size", "1M"]),
        ("cluster-size 2M", &["--cluster-size", "2M"]),
    ];
    // Round robin, so that a drift of the machine (page cache, the
    // filesystem discarding freed blocks) spreads over every variant.
    let mut fulls: Vec<(String, Duration)> = variants
        .iter()
        .map(|(name, _)| (name.to_string(), Duration::MAX))
        .collect();
    for _ in 0..repeat {
        for ((_, args), (name, best)) in variants.iter().zip(fulls.iter_mut()) {
            let repo = d.join("repo-full");
            let (t, m) = backup(&daemon, &repo, args);
            assert_eq!(m["kind"], "full");
            std::fs::remove_dir_all(&repo).expect("removing the repository");
            eprintln!("full, {name}: {:.2} s", secs(t));
            *best = (*best).min(t);
        }
    }

    // Part 2: cluster size and granularity through a short chain; one
    // repository per layout, then the restores round robin.
    let layouts: &[(&str, &[&str])] = &[
        ("cluster 64K, granularity 64K (defaults)", &[]),
        ("cluster 64K, granularity 4K", &["--granularity", "4K"]),
        ("cluster 64K, granularity 256K", &["--granularity", "256K"]),
        ("cluster 64K, granularity 1M", &["--granularity", "1M"]),
        ("cluster 256K", &["--cluster-size", "256K"]),
        ("cluster 1M", &["--cluster-size", "1M"]),
        ("cluster 2M", &["--cluster-size", "2M"]),
    ];
    let mut chains = Vec::new();
    for (i, (name, args)) in layouts.iter().enumerate() {
        let repo = d.join(format!("repo-chain-{i}"));
        let (full_t, _) = backup(&daemon, &repo, args);
        daemon.write(&small);
        let (small_t, small_m) = backup(&daemon, &repo, args);
        daemon.write(&large);
        let (large_t, large_m) = backup(&daemon, &repo, args);
        assert_eq!(large_m["kind"], "incremental");
        eprintln!(
            "{name}: full {:.2} s, 4K incremental {:.2} s ({} MiB), 1M incremental {:.2} s ({} MiB)",
            secs(full_t),
            secs(small_t),
            written(&small_m) >> 20,
            secs(large_t),
            written(&large_m) >> 20,
        );
        chains.push(json!({
            "layout": name, "full_s": secs(full_t),
            "small_incremental_s": secs(small_t), "small_incremental_bytes": written(&small_m),
            "large_incremental_s": secs(large_t), "large_incremental_bytes": written(&large_m),
            "restore_s": f64::MAX,
        }));
    }
    for _ in 0..repeat {
        for (i, chain) in chains.iter_mut().enumerate() {
            let out = d.join("restored.raw");
            let (t, _) = bitback_restore(&d.join(format!("repo-chain-{i}")), "tune", None, &out);
            std::fs::remove_file(&out).expect("removing the restored disk");
            eprintln!("restore, {}: {:.2} s", chain["layout"], secs(t));
            let best = chain["restore_s"].as_f64().unwrap_or(f64::MAX).min(secs(t));
            chain["restore_s"] = best.into();
        }
    }
    drop(daemon);

    println!(
        "full backup of a {virtual_gib} GiB disk with {data_gib} GiB of data, best of {repeat}"
    );
    println!("{:<40} {:>9} {:>7}", "settings", "time", "ratio");
    println!(
        "{:<40} {:>7.2} s {:>7}",
        "qemu-img convert -O qcow2 (+fsync)",
        secs(convert),
        "1.00x"
    );
    for (name, t) in &fulls {
        println!(
            "{:<40} {:>7.2} s {:>6.2}x",
            name,
            secs(*t),
            secs(*t) / secs(convert)
        );
    }
    println!();
    println!(
        "a chain of 3: full, {small_writes} random 4K writes, 64 random 1M writes (MiB = bytes copied)"
    );
    println!(
        "{:<40} {:>8} {:>16} {:>16} {:>9}",
        "layout", "full", "4K incremental", "1M incremental", "restore"
    );
    for c in &chains {
        println!(
            "{:<40} {:>6.2} s {:>6.2} s {:>5} MiB {:>6.2} s {:>5} MiB {:>7.2} s",
            c["layout"].as_str().unwrap_or_default(),
            c["full_s"].as_f64().unwrap_or_default(),
            c["small_incremental_s"].as_f64().unwrap_or_default(),
            c["small_incremental_bytes"].as_u64().unwrap_or_default() >> 20,
            c["large_incremental_s"].as_f64().unwrap_or_default(),
            c["large_incremental_bytes"].as_u64().unwrap_or_default() >> 20,
            c["restore_s"].as_f64().unwrap_or_default(),
        );
    }
    println!(
        "{}",
        json!({
            "virtual_gib": virtual_gib, "data_gib": data_gib, "repeat": repeat,
            "small_writes": small_writes, "convert_s": secs(convert),
            "fulls": fulls.iter().map(|(n, t)| json!({"settings": n, "s": secs(*t)})).collect::<Vec<_>>(),
            "chains": chains,
        })
    );
}
