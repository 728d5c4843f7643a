//! Incrementals by content, measured: a raw volume (no persistent bitmap)
//! of BITBACK_BENCH_VIRTUAL_GIB (64) GiB holding BITBACK_BENCH_DATA_GIB (4)
//! GiB of data, served by qemu-storage-daemon; a full backup; the daemon
//! restarted (the in-memory bitmap is lost); BITBACK_BENCH_DIRTY_MIB (64)
//! MiB of random 1 MiB writes; then the next backup, which finds the
//! changes by content: its time and the bytes it stores, next to a full
//! of the same volume (`--full`), to reading the whole volume once (`dd`
//! of all its bytes, holes too, as a thick LVM volume would be read), and
//! to reading the volume's data once, two ways: through QEMU's block layer (`qemu-img convert` of the disk to
//! QEMU's `null-co` driver: what reading it in QEMU costs, the issue's
//! baseline), and in this process (its data extents, found with
//! SEEK_DATA, read with 4 MiB preads, from the page cache here). BITBACK_BENCH_REPEAT (3)
//! rounds, alternating; medians, then a JSON line with every run.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    Daemon, Rng, bench_dir, bitback_backup, env_u64, letter_writes, median, qemu_io, random_writes,
    run,
};
use serde_json::json;

/// Reads every data extent of `path` once.
fn read_data(path: &Path) -> (Duration, u64) {
    use nix::unistd::{Whence, lseek};
    let start = Instant::now();
    let f = File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as i64;
    let mut buf = vec![0u8; 4 << 20];
    let (mut at, mut total) = (0i64, 0u64);
    while at < len {
        let Ok(data) = lseek(&f, at, Whence::SeekData) else {
            break;
        };
        let hole = lseek(&f, data, Whence::SeekHole).unwrap_or(len);
        let mut pos = data;
        while pos < hole {
            let n = ((hole - pos) as usize).min(buf.len());
            f.read_exact_at(&mut buf[..n], pos as u64).unwrap();
            pos += n as i64;
            total += n as u64;
        }
        at = hole;
    }
    (start.elapsed(), total)
}

fn main() {
    let size = env_u64("BITBACK_BENCH_VIRTUAL_GIB", 64) << 30;
    let data = env_u64("BITBACK_BENCH_DATA_GIB", 4) << 30;
    let dirty = env_u64("BITBACK_BENCH_DIRTY_MIB", 64);
    let rounds = env_u64("BITBACK_BENCH_REPEAT", 3).max(1);
    let dir = bench_dir("bitback-content-");
    let d = dir.path();
    let disk = d.join("disk.raw");
    File::create(&disk).unwrap().set_len(size).unwrap();
    let writes = letter_writes(d, 0xc0_47e7, size, data);
    eprintln!(
        "writing {} MiB of data over a {} MiB raw disk",
        data >> 20,
        size >> 20
    );
    qemu_io("raw", disk.to_str().unwrap(), &writes);

    let (mut content, mut full, mut read) = (Vec::new(), Vec::new(), Vec::new());
    let (mut through_qemu, mut dd) = (Vec::new(), Vec::new());
    let (mut content_bytes, mut full_bytes, mut read_bytes, mut rss) = (0, 0, 0, 0);
    for round in 0..rounds {
        let repo = d.join("repo");
        let _ = std::fs::remove_dir_all(&repo);
        // The chain's full, then a restart: the raw volume's bitmap is gone.
        let daemon = Daemon::start_format(d, &disk, "raw");
        let (_, _, first) = bitback_backup(&daemon, &repo, "vm", &[]);
        assert_eq!(first["kind"], "full", "{first}");
        drop(daemon);
        let daemon = Daemon::start_format(d, &disk, "raw");
        let mut dirty_rng = Rng(0xd1 + round);
        daemon.write(&random_writes(&mut dirty_rng, size, dirty, round + 3));
        for k in 0..5 {
            match (k + round as usize) % 5 {
                0 => {
                    // Once per round: the chain has one content incremental.
                    let (t, r, m) = bitback_backup(&daemon, &repo, "vm", &[]);
                    assert_eq!(m["volumes"][0]["changes"], "content", "{m}");
                    content_bytes = m["volumes"][0]["bytes_written"].as_u64().unwrap();
                    rss = rss.max(r);
                    eprintln!(
                        "round {round}: by content {:.2} s, {} MiB stored",
                        t.as_secs_f64(),
                        content_bytes >> 20
                    );
                    content.push(t);
                    // The chain against the disk, read by qemu-img.
                    if round == 0 {
                        let top = repo.join(m["volumes"][0]["file"].as_str().unwrap());
                        let same = Command::new("qemu-img")
                            .args(["compare", "-U", "-q", "-f", "raw"])
                            .arg(&disk)
                            .arg(&top)
                            .status()
                            .unwrap();
                        assert!(
                            same.success(),
                            "the content incremental differs from the disk"
                        );
                    }
                }
                1 => {
                    let other = d.join("repo-full");
                    let _ = std::fs::remove_dir_all(&other);
                    let (t, _, m) = bitback_backup(&daemon, &other, "vm", &["--full"]);
                    full_bytes = m["volumes"][0]["bytes_written"].as_u64().unwrap();
                    eprintln!(
                        "round {round}: full       {:.2} s, {} MiB stored",
                        t.as_secs_f64(),
                        full_bytes >> 20
                    );
                    full.push(t);
                    std::fs::remove_dir_all(&other).unwrap();
                }
                2 => {
                    let start = Instant::now();
                    run(Command::new("qemu-img")
                        .args(["convert", "-U", "-n", "-f", "raw"])
                        .arg(&disk)
                        .arg("--target-image-opts")
                        .arg(format!("driver=null-co,size={size}")));
                    let t = start.elapsed();
                    eprintln!("round {round}: through QEMU {:.2} s", t.as_secs_f64());
                    through_qemu.push(t);
                }
                3 => {
                    let start = Instant::now();
                    run(Command::new("dd")
                        .arg(format!("if={}", disk.display()))
                        .args(["of=/dev/null", "bs=4M", "status=none"]));
                    let t = start.elapsed();
                    eprintln!("round {round}: dd         {:.2} s", t.as_secs_f64());
                    dd.push(t);
                }
                _ => {
                    let (t, n) = read_data(&disk);
                    read_bytes = n;
                    eprintln!(
                        "round {round}: read once  {:.2} s, {} MiB",
                        t.as_secs_f64(),
                        n >> 20
                    );
                    read.push(t);
                }
            }
        }
        drop(daemon);
    }
    let (c, f, r) = (median(&content), median(&full), median(&read));
    let q = median(&through_qemu);
    let whole = median(&dd);
    println!();
    println!(
        "raw volume, {} GiB virtual / {} GiB data, {dirty} MiB dirty after a restart; medians of {rounds}",
        size >> 30,
        data >> 30
    );
    println!();
    println!(
        "| | time | vs the volume read once (dd) | vs its data read through QEMU | vs its data read in bitback | stored |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| incremental by content | {c:.2} s | {:.2}x | {:.2}x | {:.2}x | {} MiB |",
        c / whole,
        c / q,
        c / r,
        content_bytes >> 20
    );
    println!(
        "| full of the same volume | {f:.2} s | {:.2}x | {:.2}x | {:.2}x | {} MiB |",
        f / whole,
        f / q,
        f / r,
        full_bytes >> 20
    );
    println!(
        "| the volume read once (dd bs=4M to /dev/null) | {whole:.2} s | 1.00x | {:.2}x | {:.2}x | |",
        whole / q,
        whole / r
    );
    println!(
        "| its data read once through QEMU (qemu-img convert to null-co) | {q:.2} s | {:.2}x | 1.00x | {:.2}x | |",
        q / whole,
        q / r
    );
    println!(
        "| its data read once in bitback (SEEK_DATA, pread) | {r:.2} s | {:.2}x | {:.2}x | 1.00x | ({} MiB read) |",
        r / whole,
        r / q,
        read_bytes >> 20
    );
    println!("peak RSS of the content incremental: {} MiB", rss >> 20);
    let secs = |v: &[Duration]| v.iter().map(|t| t.as_secs_f64()).collect::<Vec<_>>();
    println!(
        "{}",
        json!({ "bench": "content", "virtual_gib": size >> 30, "data_gib": data >> 30, "dirty_mib": dirty,
                "content_s": secs(&content), "full_s": secs(&full), "read_s": secs(&read),
                "through_qemu_s": secs(&through_qemu), "dd_s": secs(&dd),
                "content_bytes": content_bytes, "full_bytes": full_bytes, "peak_rss": rss })
    );
}
