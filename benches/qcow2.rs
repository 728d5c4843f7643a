//! The native qcow2 module next to QEMU's tools, in the same run.
//!
//! `cargo bench --bench qcow2` times, on a 64 GiB image with data and four
//! persistent bitmaps made by qemu-img:
//! - info: `Image::open` + `info()` vs spawning `qemu-img info --output=json`;
//! - bitmap check: `Image::open` + `bitmap_status()` vs spawning
//!   `qemu-img info` (how a script would check a bitmap without bitback);
//! - rebase: `set_backing` vs spawning `qemu-img rebase -u`.
//!
//! The qemu-img figures include its process start-up: that is what a
//! caller without a native reader pays for each question.

use std::path::Path;
use std::process::Command;

use bitback::qcow2::{self, Image};
use criterion::{Criterion, criterion_group, criterion_main};

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("running a QEMU tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("bench.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("64G"));
    for (name, granularity) in [("a", "64k"), ("b", "4k"), ("c", "1M"), ("bitback-7", "64k")] {
        run(Command::new("qemu-img")
            .args(["bitmap", "--add", "-g", granularity])
            .arg(&path)
            .arg(name));
    }
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 16M",
            "-c",
            "write -P 0x5b 40G 16M",
        ])
        .arg(&path));
    path
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = make_image(dir.path());

    let mut g = c.benchmark_group("info");
    g.bench_function("bitback", |b| {
        b.iter(|| Image::open(&image).expect("open").info())
    });
    g.bench_function("qemu-img", |b| {
        b.iter(|| {
            run(Command::new("qemu-img")
                .args(["info", "-U", "--output=json"])
                .arg(&image))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("bitmap-check");
    g.bench_function("bitback", |b| {
        b.iter(|| {
            let status = Image::open(&image)
                .expect("open")
                .bitmap_status("bitback-7");
            assert!(status.usable());
        })
    });
    g.bench_function("qemu-img", |b| {
        b.iter(|| {
            run(Command::new("qemu-img")
                .args(["info", "-U", "--output=json"])
                .arg(&image))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("rebase");
    let names = ["../a/bench.qcow2", "../bb/bench.qcow2"];
    let mut i = 0;
    g.bench_function("bitback", |b| {
        b.iter(|| {
            i += 1;
            qcow2::set_backing(&image, Some(names[i % 2]), Some("qcow2")).expect("rebase")
        })
    });
    g.bench_function("qemu-img", |b| {
        b.iter(|| {
            i += 1;
            run(Command::new("qemu-img")
                .args(["rebase", "-u", "-F", "qcow2", "-b", names[i % 2]])
                .arg(&image))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
