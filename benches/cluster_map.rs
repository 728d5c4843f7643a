//! Cluster maps of large disks, in memory: a full's map recording every
//! cluster of a BITBACK_BENCH_GIB (1024) GiB disk of 64 KiB clusters
//! (BITBACK_BENCH_DATA_PCT (100) percent of them data), written in the
//! order a backup job with parallel workers sends them (in order within
//! windows of 1,024 clusters, the windows' clusters shuffled), and an
//! incremental's map of 1% of them. Two phases, each in a child process
//! of its own (this bench run again with the phase's name) whose peak RSS
//! is sampled:
//!
//! - `read`: the full's map read and parsed (what `verify` and the upload
//!   proof hold for a file);
//! - `overlay`: both maps read and laid over each other, then every
//!   cluster of the disk looked up in order (what a restore, a served
//!   point and an incremental by content hold and do).
//!
//! BITBACK_BENCH_REPEAT (3) rounds; medians, then a JSON line.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bitback::cluster_map::{Baseline, Map, Writer};
use common::{Rng, bench_dir, env_u64, median, run_measured};
use serde_json::json;

const CS: u64 = 64 << 10;

/// A digest that differs by cluster and by `salt`, and is never a zero
/// cluster's.
fn fake_digest(c: u64, salt: u64) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&(c ^ salt.rotate_left(32)).to_le_bytes());
    d[8..].copy_from_slice(&(c.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1).to_le_bytes());
    d
}

fn write_maps(dir: &Path, size: u64, pct: u64) {
    let clusters = size / CS;
    let mut rng = Rng(0x5eed_cafe);
    let mut w = Writer::create(&dir.join("full.map"), CS, size).unwrap();
    let mut window: Vec<u64> = Vec::with_capacity(1024);
    for start in (0..clusters).step_by(1024) {
        window.clear();
        window.extend((start..(start + 1024).min(clusters)).filter(|c| c % 100 < pct));
        for i in (1..window.len()).rev() {
            window.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        for &c in &window {
            w.record_digest(c, fake_digest(c, 1)).unwrap();
        }
    }
    w.finish().unwrap();
    let mut w = Writer::create(&dir.join("incr.map"), CS, size).unwrap();
    for c in (0..clusters).filter(|c| c % 100 == 7) {
        w.record_digest(c, fake_digest(c, 2)).unwrap();
    }
    w.finish().unwrap();
}

/// One phase, in this process; prints what it found.
fn phase(name: &str, dir: &Path) {
    let start = Instant::now();
    match name {
        "read" => {
            let map = Map::read(&dir.join("full.map")).unwrap();
            println!("{}", map.clusters.len());
        }
        "overlay" => {
            let maps = [
                Map::read(&dir.join("full.map")).unwrap(),
                Map::read(&dir.join("incr.map")).unwrap(),
            ];
            let base = Baseline::overlay(maps).unwrap();
            let clusters = base.size() / base.cluster_size();
            let data = (0..clusters).filter(|&c| !base.is_zero(c)).count();
            println!("{data}");
        }
        other => panic!("no phase {other}"),
    }
    eprintln!("{name}: {:.2} s", start.elapsed().as_secs_f64());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--phase") {
        phase(&args[i + 1], Path::new(&args[i + 2]));
        return;
    }
    let size = env_u64("BITBACK_BENCH_GIB", 1024) << 30;
    let pct = env_u64("BITBACK_BENCH_DATA_PCT", 100).min(100);
    let rounds = env_u64("BITBACK_BENCH_REPEAT", 3).max(1);
    let dir = bench_dir("bitback-cluster-map-");
    write_maps(dir.path(), size, pct);
    let map_len = std::fs::metadata(dir.path().join("full.map"))
        .unwrap()
        .len();
    let me = std::env::current_exe().unwrap();
    let mut runs = json!({});
    for name in ["read", "overlay"] {
        let (mut times, mut peaks) = (Vec::new(), Vec::new());
        let mut found = String::new();
        for _ in 0..rounds {
            let (t, peak, out): (Duration, u64, String) =
                run_measured(Command::new(&me).args(["--phase", name]).arg(dir.path()));
            times.push(t);
            peaks.push(peak);
            found = out.trim().to_string();
        }
        let peak_mib = *peaks.iter().max().unwrap() as f64 / f64::from(1 << 20);
        println!(
            "{name}: {:.2} s (median of {rounds}), peak RSS {peak_mib:.0} MiB, {found} clusters",
            median(&times)
        );
        runs[name] = json!({
            "seconds": times.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
            "peak_rss": peaks,
            "clusters": found,
        });
    }
    println!(
        "{}",
        json!({"gib": size >> 30, "data_pct": pct, "map_bytes": map_len, "runs": runs})
    );
}
