//! Encrypted backups against plain ones of the same disk, in the same run.
//!
//! `cargo bench --bench encrypted` writes BITBACK_BENCH_DATA_MIB MiB
//! (default 512) over a BITBACK_BENCH_GIB GiB disk (default 2) served by
//! qemu-storage-daemon, then at each of 4 points (a full and 3
//! incrementals, BITBACK_BENCH_DIRTY_MIB MiB of random writes between them,
//! default 32) backs the disk up twice: as VM `plain`, and as VM `enc` with
//! --encrypt-key-file (QEMU's default key derivation time, 2 s). It then
//! restores the newest point of each to a raw file: `plain` natively,
//! `enc` through `qemu-img convert` with the key (bitback's only path for
//! encrypted chains), and as the baseline `qemu-img convert` of the plain
//! chain plus an fsync. It prints a table and the figures as JSON; the
//! restores are compared with `qemu-img compare`.

#[path = "common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    BITBACK, Rng, bitback_backup, env_u64, fsync, random_writes, run, run_measured, sparse_disk,
};
use serde_json::json;

fn main() {
    let gib = env_u64("BITBACK_BENCH_GIB", 2);
    let data_mib = env_u64("BITBACK_BENCH_DATA_MIB", 512);
    let dirty_mib = env_u64("BITBACK_BENCH_DIRTY_MIB", 32);
    let size = gib << 30;
    let (dir, _disk, daemon) = sparse_disk("bitback-bench-enc-", size, data_mib << 20);
    let repo = dir.path().join("repo");
    let key = dir.path().join("bench.key");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&key)
            .and_then(|mut f| f.write_all(b"bench passphrase"))
            .expect("key file");
    }
    let key_arg = key.display().to_string();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut rows: Vec<(String, Duration, Duration)> = Vec::new();
    for i in 0..4 {
        if i > 0 {
            daemon.write(&random_writes(&mut rng, size, dirty_mib, i));
        }
        let (plain, _, m) = bitback_backup(&daemon, &repo, "plain", &[]);
        let (enc, _, e) = bitback_backup(&daemon, &repo, "enc", &["--encrypt-key-file", &key_arg]);
        assert_eq!(m["kind"], e["kind"]);
        eprintln!(
            "point {i}: {} plain {plain:?}, encrypted {enc:?}",
            m["kind"]
        );
        rows.push((
            format!("backup {} #{i}", m["kind"].as_str().unwrap_or("?")),
            plain,
            enc,
        ));
    }
    drop(daemon);

    let plain_out = dir.path().join("plain.raw");
    let enc_out = dir.path().join("enc.raw");
    let (native, _, _) = run_measured(
        Command::new(BITBACK)
            .args(["restore", "--repo"])
            .arg(&repo)
            .args(["--vm", "plain", "--no-verify", "--output"])
            .arg(&plain_out),
    );
    let (decrypted, _, stdout) = run_measured(
        Command::new(BITBACK)
            .args(["restore", "--repo"])
            .arg(&repo)
            .args([
                "--vm",
                "enc",
                "--no-verify",
                "--key-file",
                &key_arg,
                "--json",
                "--output",
            ])
            .arg(&enc_out),
    );
    assert!(stdout.contains("encrypted"), "{stdout}");
    let top = std::fs::read_dir(repo.join("plain"))
        .expect("plain backups")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .max()
        .expect("a plain backup")
        .join("disk0.qcow2");
    let baseline_out = dir.path().join("baseline.raw");
    let start = Instant::now();
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&top)
        .arg(&baseline_out));
    fsync(&baseline_out);
    let baseline = start.elapsed();
    for out in [&plain_out, &enc_out] {
        run(Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "raw"])
            .arg(&baseline_out)
            .arg(out));
    }

    println!("{gib} GiB disk, {data_mib} MiB of data, {dirty_mib} MiB dirtied per point");
    println!(
        "{:<24} {:>10} {:>12} {:>8}",
        "", "plain", "encrypted", "ratio"
    );
    for (label, plain, enc) in &rows {
        println!(
            "{:<24} {:>8.2} s {:>10.2} s {:>7.2}x",
            label,
            plain.as_secs_f64(),
            enc.as_secs_f64(),
            enc.as_secs_f64() / plain.as_secs_f64()
        );
    }
    println!(
        "{:<24} {:>8.2} s {:>10.2} s {:>7.2}x   (plain native; encrypted via qemu-img)",
        "restore of point 4",
        native.as_secs_f64(),
        decrypted.as_secs_f64(),
        decrypted.as_secs_f64() / native.as_secs_f64()
    );
    println!(
        "{:<24} {:>8.2} s   (qemu-img convert of the plain chain + fsync; encrypted/baseline {:.2}x)",
        "baseline",
        baseline.as_secs_f64(),
        decrypted.as_secs_f64() / baseline.as_secs_f64()
    );
    let backups: Vec<_> = rows
        .iter()
        .map(|(l, p, e)| json!({"point": l, "plain_s": p.as_secs_f64(), "encrypted_s": e.as_secs_f64()}))
        .collect();
    println!(
        "{}",
        json!({
            "disk_gib": gib, "data_mib": data_mib, "dirty_mib_per_point": dirty_mib,
            "backups": backups,
            "restore_native_plain_s": native.as_secs_f64(),
            "restore_encrypted_qemu_img_s": decrypted.as_secs_f64(),
            "baseline_qemu_img_convert_plain_s": baseline.as_secs_f64(),
        })
    );
}
