//! Plumbing shared by the end-to-end benchmarks: a qemu-storage-daemon
//! serving one disk (QMP for bitback, NBD for the writes), and helpers.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The release binary the end-to-end benchmarks time.
pub const BITBACK: &str = env!("CARGO_BIN_EXE_bitback");

/// A VM without a guest for the devices' sake: `qemu-system-x86_64`'s
/// arguments before its monitors and disks.
pub const PC_VM: [&str; 8] = [
    "-machine",
    "pc",
    "-S",
    "-accel",
    "tcg",
    "-nodefaults",
    "-display",
    "none",
];

/// An empty qcow2 image of `size` bytes at `path` (`qemu-img create`).
pub fn create_qcow2(path: &Path, size: u64) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string()));
}

pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn run(cmd: &mut Command) {
    let out = cmd.output().expect("running a tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qemu-storage-daemon, killed by pid when dropped.
pub struct Daemon {
    child: Child,
    pub qmp: PathBuf,
    /// `nbd+unix:///disk0?socket=...`
    pub url: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    pub fn start(dir: &Path, disk: &Path) -> Daemon {
        Daemon::start_format(dir, disk, "qcow2")
    }

    /// Serves `disk` of `format` (`qcow2` or `raw`) as node `disk0`.
    pub fn start_format(dir: &Path, disk: &Path, format: &str) -> Daemon {
        let qmp = dir.join("qmp.sock");
        let nbd = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&qmp);
        let _ = std::fs::remove_file(&nbd);
        let child = Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=m0",
                qmp.display()
            ))
            .args(["--monitor", "chardev=m0"])
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=file0",
                disk.display()
            ))
            .arg("--blockdev")
            .arg(format!("driver={format},file=file0,node-name=disk0"))
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
            .args([
                "--export",
                "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on",
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("starting qemu-storage-daemon (install qemu-utils)");
        let deadline = Instant::now() + Duration::from_secs(15);
        while !(qmp.exists() && nbd.exists()) {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let url = format!("nbd+unix:///disk0?socket={}", nbd.display());
        Daemon { child, qmp, url }
    }

    /// Writes through the NBD export.
    pub fn write(&self, commands: &[String]) {
        qemu_io("raw", &self.url, commands);
    }
}

/// Runs qemu-io `commands` on `target` of `format`, 256 a process.
pub fn qemu_io(format: &str, target: &str, commands: &[String]) {
    for batch in commands.chunks(256) {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", format]);
        for c in batch {
            cmd.args(["-c", c]);
        }
        run(cmd.arg(target).stdout(Stdio::null()));
    }
}

/// The qemu-io commands that write `data` bytes in 16 MiB pieces spread
/// over a `size`-byte disk, each a copy of one block of bytes drawn from
/// 16 letters (zstd makes about half of it), which is written to
/// `dir/block.bin` from `seed`.
pub fn letter_writes(dir: &Path, seed: u64, size: u64, data: u64) -> Vec<String> {
    let source = dir.join("block.bin");
    let mut rng = Rng(seed);
    let block: Vec<u8> = (0..16 << 20)
        .map(|_| b'a' + (rng.next() % 16) as u8)
        .collect();
    std::fs::write(&source, &block).expect("writing the data block");
    let pieces = (data >> 24).max(1);
    let stride = size / pieces;
    (0..pieces)
        .map(|i| {
            format!(
                "write -s {} {} 16M",
                source.display(),
                (i * stride) >> 16 << 16
            )
        })
        .collect()
}

/// xorshift64: the same dirty offsets on every run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `count` 1 MiB writes at random MiB-aligned offsets of a `size`-byte disk.
pub fn random_writes(rng: &mut Rng, size: u64, count: u64, pattern: u64) -> Vec<String> {
    writes_of(rng, size, count, 1 << 20, pattern)
}

/// `count` writes of `len` bytes (a power of two) at random `len`-aligned
/// offsets of a `size`-byte disk.
pub fn writes_of(rng: &mut Rng, size: u64, count: u64, len: u64, pattern: u64) -> Vec<String> {
    let shift = len.trailing_zeros();
    (0..count)
        .map(|_| {
            let offset = (rng.next() % (size >> shift)) << shift;
            format!("write -P {} {offset} {len}", pattern % 250 + 1)
        })
        .collect()
}

/// Data spread over the disk: `total` bytes in 16 MiB pieces.
pub fn spread_writes(size: u64, total: u64) -> Vec<String> {
    let pieces = (total >> 24).max(1);
    let stride = size / pieces;
    (0..pieces)
        .map(|i| format!("write -P {} {} 16M", i % 250 + 1, (i * stride) >> 16 << 16))
        .collect()
}

pub fn fsync(path: &Path) {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .expect("fsync");
}

/// Runs `cmd`, sampling the child's peak RSS (VmHWM) until it exits.
/// Returns (wall time, peak RSS in bytes, stdout).
pub fn run_measured(cmd: &mut Command) -> (Duration, u64, String) {
    let start = Instant::now();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning");
    let pid = child.id();
    let status_path = format!("/proc/{pid}/status");
    let sampler = std::thread::spawn(move || {
        let mut peak = 0u64;
        while let Ok(status) = std::fs::read_to_string(&status_path) {
            if let Some(kib) = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                peak = peak.max(kib * 1024);
            }
            if status.contains("State:\tZ") {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    });
    let out = child.wait_with_output().expect("waiting");
    let elapsed = start.elapsed();
    let peak = sampler.join().unwrap_or(0);
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        elapsed,
        peak,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A new directory under BITBACK_BENCH_DIR (default /var/tmp) named after
/// `prefix`, removed when dropped.
pub fn bench_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(std::env::var("BITBACK_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
        .expect("temp dir")
}

/// A sparse qcow2 disk of `size` bytes holding `data` bytes spread over it,
/// served by qemu-storage-daemon, in a new directory under
/// BITBACK_BENCH_DIR (default /var/tmp) named after `prefix`.
pub fn sparse_disk(prefix: &str, size: u64, data: u64) -> (tempfile::TempDir, PathBuf, Daemon) {
    let dir = bench_dir(prefix);
    let disk = dir.path().join("disk.qcow2");
    create_qcow2(&disk, size);
    let daemon = Daemon::start(dir.path(), &disk);
    eprintln!(
        "writing {} MiB of data over a {} MiB disk",
        data >> 20,
        size >> 20
    );
    daemon.write(&spread_writes(size, data));
    (dir, disk, daemon)
}

/// `bitback backup --json` of the daemon's disk as VM `vm`, plus `args`.
/// Returns (wall time, peak RSS, manifest).
pub fn bitback_backup(
    daemon: &Daemon,
    repo: &Path,
    vm: &str,
    args: &[&str],
) -> (Duration, u64, Value) {
    let (t, rss, out) = run_measured(
        Command::new(BITBACK)
            .args(["backup", "--qmp"])
            .arg(&daemon.qmp)
            .arg("--repo")
            .arg(repo)
            .args(["--vm", vm, "--json"])
            .args(args),
    );
    (t, rss, serde_json::from_str(&out).expect("backup JSON"))
}

/// `bitback restore --no-verify` of backup `id` (the newest when `None`)
/// of VM `vm` to `out`. Returns (wall time, peak RSS).
pub fn bitback_restore(repo: &Path, vm: &str, id: Option<&str>, out: &Path) -> (Duration, u64) {
    let mut cmd = Command::new(BITBACK);
    cmd.args(["restore", "--repo"]).arg(repo).args(["--vm", vm]);
    if let Some(id) = id {
        cmd.args(["--backup", id]);
    }
    let (t, rss, _) = run_measured(cmd.args(["--no-verify", "--output"]).arg(out));
    (t, rss)
}

/// A one-client QMP session (the bench's own; bitback gets the other socket).
pub struct Monitor {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events read while waiting for replies.
    events: Vec<Value>,
}

impl Monitor {
    pub fn connect(path: &Path) -> Monitor {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("QMP {}: {e}", path.display()),
            }
        };
        let mut m = Monitor {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            events: Vec::new(),
        };
        m.line();
        m.call("qmp_capabilities", Value::Null);
        m
    }

    fn line(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP said {line:?}: {e}"))
    }

    pub fn call(&mut self, command: &str, arguments: Value) -> Value {
        let mut msg = json!({ "execute": command });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        writeln!(self.writer, "{msg}").unwrap();
        loop {
            let reply = self.line();
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return ret.clone();
            }
            panic!("{command}: {reply}");
        }
    }

    /// Waits for event `name` (one already read counts); returns its data.
    pub fn wait_event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i)["data"].clone();
        }
        loop {
            let msg = self.line();
            if msg["event"] == name {
                return msg["data"].clone();
            }
        }
    }
}

/// The median of `v` in seconds (NaN when empty).
pub fn median(v: &[Duration]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

/// Runs `cmd`, which must succeed; its wall time.
pub fn timed(cmd: &mut Command) -> Duration {
    let start = Instant::now();
    let out = cmd.output().expect("running");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    start.elapsed()
}
