//! bitback against the practical limits on a large sparse disk, in one run.
//!
//! `cargo bench --bench large` serves a sparse qcow2 disk of
//! BITBACK_BENCH_VIRTUAL_GIB GiB (default 64) holding BITBACK_BENCH_DATA_GIB
//! GiB of data (default 4, in 16 MiB pieces spread over it) with
//! qemu-storage-daemon, and times, with the release `bitback` binary:
//! - a full backup, next to `qemu-img convert -O qcow2` of the disk (+fsync);
//! - an incremental after BITBACK_BENCH_DIRTY_MIB MiB (default 64) of 1 MiB
//!   random writes, next to converting a file of that many MiB (+fsync),
//!   and next to converting the incremental's own clusters, its backing
//!   cut (the same scattered layout, +fsync);
//! - restores of the points at chain lengths 1, 10 and 30, and of a full
//!   taken of the chain of 30's point, next to `qemu-img convert -O raw` of
//!   the same chain top (+fsync), and next to the same with `-t none`
//!   (around the page cache, as bitback writes);
//! - `bitback verify` of the whole repository, and its throughput.
//!
//! Restores go to BITBACK_BENCH_RESTORE_DIR (default: the bench's own
//! directory under BITBACK_BENCH_DIR, default /var/tmp); point it at a
//! tmpfs to time the tools without the output disk.
//!
//! Each timed figure but verify runs BITBACK_BENCH_REPEAT times (default 2;
//! restores at least BITBACK_BENCH_RESTORE_REPEAT, default 3) in
//! alternating order with its baseline, and the best of each is kept;
//! every run is in the JSON. The restores go round robin over the chain
//! lengths, so a drift of the machine does not land on one length.
//!
//! It prints one table (figure, baseline, ratio), the peak RSS of the
//! bitback process during the full backup and a restore, and the raw
//! numbers as JSON. A peer tool can be timed on the same disk: set
//! BITBACK_PEER_CMD to a shell command; it runs with $DISK (the image, not
//! in use) and $OUT (a directory) set, after the chain is built, and its
//! time is reported next to bitback's full backup.

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    BITBACK, Daemon, Rng, bitback_backup, bitback_restore, env_u64, fsync, random_writes, run,
    sparse_disk,
};
use serde_json::{Value, json};

/// One figure: the best of bitback's runs next to the best of the
/// baseline's (all runs kept for the JSON).
struct Row {
    name: String,
    bitback: Duration,
    baseline_name: String,
    baseline: Option<Duration>,
    runs: Vec<Duration>,
    baseline_runs: Vec<Duration>,
}

impl Row {
    fn new(name: &str, runs: &[Duration], baseline_name: &str, baseline_runs: &[Duration]) -> Row {
        Row {
            name: name.into(),
            bitback: runs.iter().copied().min().unwrap_or_default(),
            baseline_name: baseline_name.into(),
            baseline: baseline_runs.iter().copied().min(),
            runs: runs.to_vec(),
            baseline_runs: baseline_runs.to_vec(),
        }
    }
}

fn backup(daemon: &Daemon, repo: &Path, args: &[&str]) -> (Duration, u64, Value) {
    bitback_backup(daemon, repo, "bench", args)
}

fn main() {
    let virtual_gib = env_u64("BITBACK_BENCH_VIRTUAL_GIB", 64);
    let data_gib = env_u64("BITBACK_BENCH_DATA_GIB", 4);
    let dirty_mib = env_u64("BITBACK_BENCH_DIRTY_MIB", 64);
    let size = virtual_gib << 30;
    let (dir, disk, daemon) = sparse_disk("bitback-large-", size, data_gib << 30);
    let d = dir.path();
    let repo = d.join("repo");
    let repeat = env_u64("BITBACK_BENCH_REPEAT", 2).max(1) as usize;
    let mut rows = Vec::new();

    // Full backup next to a plain copy of the same disk, `repeat` times,
    // the order alternating so neither always meets the colder cache. Each
    // full goes to a fresh repository; the last one is kept for the chain.
    let copy = d.join("copy.qcow2");
    let mut full_times = Vec::new();
    let mut convert_times = Vec::new();
    let mut full_rss = 0;
    let mut full = Value::Null;
    for k in 0..repeat {
        for step in [k % 2, 1 - k % 2] {
            if step == 0 {
                let start = Instant::now();
                run(Command::new("qemu-img")
                    .args(["convert", "-U", "-O", "qcow2"])
                    .arg(&disk)
                    .arg(&copy));
                fsync(&copy);
                convert_times.push(start.elapsed());
                std::fs::remove_file(&copy).expect("removing the copy");
            } else {
                if repo.exists() {
                    std::fs::remove_dir_all(&repo).expect("removing the repository");
                }
                let (t, rss, m) = backup(&daemon, &repo, &[]);
                assert_eq!(m["kind"], "full");
                full_times.push(t);
                full_rss = full_rss.max(rss);
                full = m;
            }
        }
    }
    rows.push(Row::new(
        "full backup",
        &full_times,
        "qemu-img convert -O qcow2 of the disk",
        &convert_times,
    ));

    // Incrementals next to copying the dirty bytes alone.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let dirty = d.join("dirty.raw");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&dirty)
        .arg(format!("{dirty_mib}M")));
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", &format!("write -P 0x5a 0 {dirty_mib}M")])
        .arg(&dirty));
    let dirty_copy = d.join("dirty.qcow2");
    let mut ids = vec![full["id"].as_str().unwrap_or_default().to_string()];
    let mut incr_times = Vec::new();
    let mut copy_times = Vec::new();
    // The same clusters into the same layout: the incremental's own file,
    // its backing cut, converted to a new qcow2. Scattered writes over a
    // large disk need one L2 table per 512 MiB region they touch, in any
    // tool's target; a contiguous file needs one per 512 MiB of data.
    let mut same_layout_times = Vec::new();
    let same_layout = d.join("same-layout.qcow2");
    for k in 0..repeat {
        daemon.write(&random_writes(&mut rng, size, dirty_mib, k as u64 + 1));
        for step in [k % 2, 1 - k % 2] {
            if step == 0 {
                let start = Instant::now();
                run(Command::new("qemu-img")
                    .args(["convert", "-O", "qcow2"])
                    .arg(&dirty)
                    .arg(&dirty_copy));
                fsync(&dirty_copy);
                copy_times.push(start.elapsed());
            } else {
                let (t, _, m) = backup(&daemon, &repo, &[]);
                assert_eq!(m["kind"], "incremental");
                incr_times.push(t);
                ids.push(m["id"].as_str().unwrap_or_default().to_string());
                let file = repo.join(m["volumes"][0]["file"].as_str().unwrap_or_default());
                let alone = json!({
                    "driver": "qcow2",
                    "backing": null,
                    "file": { "driver": "file", "filename": file },
                });
                let _ = std::fs::remove_file(&same_layout);
                let start = Instant::now();
                run(Command::new("qemu-img")
                    .args(["convert", "-O", "qcow2"])
                    .arg(format!("json:{alone}"))
                    .arg(&same_layout));
                fsync(&same_layout);
                same_layout_times.push(start.elapsed());
            }
        }
    }
    rows.push(Row::new(
        &format!("incremental, {dirty_mib} MiB dirty"),
        &incr_times,
        &format!("qemu-img convert of a {dirty_mib} MiB file"),
        &copy_times,
    ));
    rows.push(Row::new(
        &format!("incremental, {dirty_mib} MiB dirty, vs the same layout"),
        &incr_times,
        "qemu-img convert of the incremental's clusters (backing cut)",
        &same_layout_times,
    ));

    // The rest of a chain of 30.
    let mut i = ids.len() as u64;
    while ids.len() < 30 {
        i += 1;
        daemon.write(&random_writes(&mut rng, size, dirty_mib, i));
        let (_, _, m) = backup(&daemon, &repo, &[]);
        ids.push(m["id"].as_str().unwrap_or_default().to_string());
    }
    // The same point as the chain of 30, as a full: a chain of 1 holding
    // exactly the same data, so the two restores differ by chain length
    // alone (the first full holds less: every incremental added data).
    let (_, _, same) = backup(&daemon, &repo, &["--full"]);
    assert_eq!(same["kind"], "full");
    let same_point = same["id"].as_str().unwrap_or_default().to_string();
    drop(daemon);

    // Restores, round robin over the chain lengths and the two tools, into
    // BITBACK_BENCH_RESTORE_DIR (default: beside the repository). On a
    // shared disk whose write speed swings, a tmpfs there (/dev/shm)
    // measures the tools rather than the disk.
    let out_dir = std::env::var_os("BITBACK_BENCH_RESTORE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| d.to_path_buf());
    // Restores swing with the kernel's cost of finding pages for the
    // output (seen here: the same restore took 2.8 s, then 14 s, all of it
    // system time), so they run at least three times each, after one
    // untimed restore that reads the whole repository into the cache.
    let restore_repeat = repeat.max(env_u64("BITBACK_BENCH_RESTORE_REPEAT", 3) as usize);
    let warm = out_dir.join("warm.raw");
    bitback_restore(&repo, "bench", None, &warm);
    std::fs::remove_file(&warm).expect("removing the warm-up restore");
    let points = [
        ("restore, chain of 1 (the first full)", &ids[0]),
        ("restore, chain of 10", &ids[9]),
        ("restore, chain of 30", &ids[29]),
        ("restore, chain of 1 (a full of that point)", &same_point),
    ];
    let mut native_times = vec![Vec::new(); points.len()];
    let mut qemu_times = vec![Vec::new(); points.len()];
    let mut direct_times = vec![Vec::new(); points.len()];
    let mut restore_rss = 0;
    for k in 0..restore_repeat {
        for (j, (_, id)) in points.iter().enumerate() {
            let native = out_dir.join("native.raw");
            let converted = out_dir.join("qemu.raw");
            let top = repo.join("bench").join(id).join("disk0.qcow2");
            // bitback, qemu-img convert, qemu-img convert -t none: each
            // takes each place in the order over three rounds.
            for step in (0..3).map(|i| (i + k + j) % 3) {
                match step {
                    0 => {
                        let (t, rss) = bitback_restore(&repo, "bench", Some(id), &native);
                        restore_rss = restore_rss.max(rss);
                        native_times[j].push(t);
                    }
                    _ => {
                        let out = out_dir.join(format!("qemu-{step}.raw"));
                        let mut cmd = Command::new("qemu-img");
                        cmd.args(["convert", "-O", "raw"]);
                        if step == 2 {
                            cmd.args(["-t", "none"]);
                        }
                        let start = Instant::now();
                        run(cmd.arg(&top).arg(&out));
                        fsync(&out);
                        let t = start.elapsed();
                        if step == 1 {
                            qemu_times[j].push(t);
                            std::fs::rename(&out, &converted).expect("keeping the converted disk");
                        } else {
                            direct_times[j].push(t);
                            let _ = std::fs::remove_file(&out);
                        }
                    }
                }
            }
            if k == 0 {
                run(Command::new("qemu-img")
                    .args(["compare", "-q", "-f", "raw", "-F", "raw"])
                    .arg(&native)
                    .arg(&converted));
            }
            let _ = std::fs::remove_file(&native);
            let _ = std::fs::remove_file(&converted);
        }
    }
    for (j, (name, _)) in points.iter().enumerate() {
        rows.push(Row::new(
            name,
            &native_times[j],
            "qemu-img convert -O raw of the chain top",
            &qemu_times[j],
        ));
    }
    // The same restores next to qemu-img writing around the page cache
    // too, as bitback does.
    for (j, (name, _)) in points.iter().enumerate() {
        rows.push(Row::new(
            &name.replace("restore,", "restore vs -t none,"),
            &native_times[j],
            "qemu-img convert -t none -O raw of the chain top",
            &direct_times[j],
        ));
    }

    let start = Instant::now();
    let verified = Command::new(BITBACK)
        .args(["verify", "--repo"])
        .arg(&repo)
        .output()
        .expect("verify");
    let verify_time = start.elapsed();
    assert!(verified.status.success(), "verify found problems");
    let repo_bytes: u64 = walk_size(&repo);
    rows.push(Row::new(
        &format!(
            "verify, {:.2} GiB of files ({:.0} MiB/s)",
            repo_bytes as f64 / (1u64 << 30) as f64,
            repo_bytes as f64 / (1 << 20) as f64 / verify_time.as_secs_f64()
        ),
        &[verify_time],
        "",
        &[],
    ));

    if let Ok(peer) = std::env::var("BITBACK_PEER_CMD") {
        let out = d.join("peer");
        std::fs::create_dir_all(&out).expect("peer dir");
        let start = Instant::now();
        let status = Command::new("sh")
            .args(["-c", &peer])
            .env("DISK", &disk)
            .env("OUT", &out)
            .status()
            .expect("running BITBACK_PEER_CMD");
        assert!(status.success(), "BITBACK_PEER_CMD failed");
        rows.push(Row::new(
            "peer tool (BITBACK_PEER_CMD) vs full backup",
            &full_times,
            &format!("peer: {peer}"),
            &[start.elapsed()],
        ));
    }

    println!(
        "bitback on a {virtual_gib} GiB disk with {data_gib} GiB of data ({dirty_mib} MiB dirtied per incremental)"
    );
    println!(
        "repository in {}, restores written to {}",
        d.display(),
        out_dir.display()
    );
    println!(
        "{:<54} {:>10} {:>10} {:>7}  baseline",
        "figure", "bitback", "baseline", "ratio"
    );
    for r in &rows {
        let (base, ratio) = match r.baseline {
            Some(b) => (
                format!("{:.2} s", b.as_secs_f64()),
                format!("{:.2}x", r.bitback.as_secs_f64() / b.as_secs_f64()),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<54} {:>8.2} s {:>10} {:>7}  {}",
            r.name,
            r.bitback.as_secs_f64(),
            base,
            ratio,
            r.baseline_name
        );
    }
    println!(
        "(best of {repeat}, restores best of {restore_repeat}; ratio = bitback time / baseline time; below 1 is faster)"
    );
    let chain_ratio = native_times[2]
        .iter()
        .min()
        .unwrap_or(&Duration::ZERO)
        .as_secs_f64()
        / native_times[3]
            .iter()
            .min()
            .unwrap_or(&Duration::MAX)
            .as_secs_f64();
    println!("restore of one point from a chain of 30 / from a full of it: {chain_ratio:.2}x");
    println!(
        "peak RSS of bitback: full backup {} MiB, restore {} MiB",
        full_rss >> 20,
        restore_rss >> 20
    );
    let figures: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "figure": r.name,
                "bitback_s": r.bitback.as_secs_f64(),
                "baseline": r.baseline_name,
                "baseline_s": r.baseline.map(|b| b.as_secs_f64()),
                "runs_s": r.runs.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
                "baseline_runs_s": r.baseline_runs.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
            })
        })
        .collect();
    println!(
        "{}",
        json!({
            "virtual_gib": virtual_gib, "data_gib": data_gib, "dirty_mib": dirty_mib,
            "repeat": repeat, "restore_chain30_over_full_of_same_point": chain_ratio,
            "restore_dir": out_dir.display().to_string(),
            "peak_rss_full_backup": full_rss, "peak_rss_restore": restore_rss,
            "figures": figures,
        })
    );
}

fn walk_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        walk_size(&p)
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}
