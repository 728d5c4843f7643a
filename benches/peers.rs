//! bitback next to its peer on the same running QEMU: qmpbackup (full,
//! incremental, and its restore: `qmprestore rebase` + `qemu-img convert
//! -t none`), with the physical limits of this machine measured in the
//! same run (the O_DIRECT write of the data, QEMU's read of it).
//!
//! The VM is `qemu-system-x86_64 -machine pc -S` with the disk on a
//! virtio-blk device, as a production VM has one (so bitback's guard
//! stands under it). The disk (64 GiB virtual, 4 GiB of data in 16 MiB
//! pieces spread over it) is written before QEMU starts; each
//! incremental's 64 MiB go through the device (HMP `qemu-io -d`).
//! Rounds alternate which tool goes first; every operation starts from
//! cold caches (as root; with BITBACK_BENCH_CACHES=warm, each backup
//! starts with the disk read into the page cache instead) and its timing
//! ends with `sync`. Best and median of
//! BITBACK_BENCH_REPEAT (3) rounds.
//!
//! qmpbackup is not shipped with bitback: give a checkout of its public
//! repository (`qmpbackup` and `qmprestore` at its top) in
//! BITBACK_QMPBACKUP, and install its dependencies for the `python3` in
//! PATH, or the one BITBACK_PYTHON names (`pip install qemu.qmp
//! colorlog`). BITBACK_BENCH_VIRTUAL_GIB,
//! BITBACK_BENCH_DATA_GIB, BITBACK_BENCH_DIRTY_MIB and BITBACK_BENCH_DIR
//! change the disk and where it lives.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{BITBACK, Monitor, Rng, env_u64, median, qemu_io, random_writes, run};
use serde_json::json;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// The VM, killed by pid when dropped.
struct Vm {
    child: Child,
    control: Monitor,
    /// bitback's monitor and qmpbackup's (one client each).
    bitback: PathBuf,
    peer: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vm {
    fn start(dir: &Path, disk: &Path) -> Vm {
        let [control, bitback, peer] =
            ["control", "bitback", "peer"].map(|n| dir.join(format!("{n}.sock")));
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(common::PC_VM);
        for socket in [&control, &bitback, &peer] {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", socket.display()));
        }
        cmd.arg("-blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=file0",
                disk.display()
            ))
            .args(["-blockdev", "driver=qcow2,file=file0,node-name=disk0"])
            .args(["-device", "virtio-blk-pci,drive=disk0,id=vda"]);
        // QEMU prints qemu-io's output on its own stdout.
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting qemu-system-x86_64 (apt-get install qemu-system-x86)");
        let control = Monitor::connect(&control);
        Vm {
            child,
            control,
            bitback,
            peer,
        }
    }

    /// Guest writes through the device.
    fn write(&mut self, commands: &[String]) {
        for c in commands {
            self.control.call(
                "human-monitor-command",
                json!({ "command-line": format!("qemu-io -d /machine/peripheral/vda/virtio-backend \"{c}\"") }),
            );
        }
    }
}

/// Runs `cmd`, then `sync`; the wall time of both.
fn timed(cmd: &mut Command) -> Duration {
    let start = Instant::now();
    let out = cmd.output().expect("running a tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    run(&mut Command::new("sync"));
    start.elapsed()
}

/// Before a backup: the page cache dropped, or with `warm` the disk read
/// into it (the same for both tools either way).
fn ready_disk(warm: bool, disk: &Path) {
    match warm {
        true => {
            let mut file = std::fs::File::open(disk).unwrap();
            std::io::copy(&mut file, &mut std::io::sink()).unwrap();
        }
        false => {
            drop_caches();
        }
    }
}

/// Drops the page cache (root only; elsewhere the restores read what is
/// cached, and the output says so).
fn drop_caches() -> bool {
    run(&mut Command::new("sync"));
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn python() -> Command {
    Command::new(std::env::var_os("BITBACK_PYTHON").unwrap_or_else(|| "python3".into()))
}

/// qmpbackup's checkout, with its dependencies importable.
fn qmpbackup_dir() -> PathBuf {
    let dir = std::env::var_os("BITBACK_QMPBACKUP").map(PathBuf::from).expect(
        "BITBACK_QMPBACKUP: give a checkout of qmpbackup's public repository (its qmpbackup and qmprestore scripts at the top)",
    );
    assert!(
        dir.join("qmpbackup").is_file() && dir.join("qmprestore").is_file(),
        "{}: no qmpbackup and qmprestore scripts there",
        dir.display()
    );
    let deps = python().args(["-c", "import qemu.qmp, colorlog"]).status();
    assert!(
        deps.is_ok_and(|s| s.success()),
        "qmpbackup needs qemu.qmp and colorlog for its python3 (BITBACK_PYTHON, else python3 in PATH): pip install qemu.qmp colorlog"
    );
    dir
}

struct Row {
    name: &'static str,
    bitback: Vec<Duration>,
    peer: Vec<Duration>,
}

impl Row {
    fn best(v: &[Duration]) -> f64 {
        v.iter().min().map_or(f64::NAN, Duration::as_secs_f64)
    }

    fn print(&self) {
        let (b, p) = (median(&self.bitback), median(&self.peer));
        println!(
            "| {} | {:.2} s ({:.2}) | {:.2} s ({:.2}) | {:.2}x ({:.2}x) |",
            self.name,
            b,
            Row::best(&self.bitback),
            p,
            Row::best(&self.peer),
            b / p,
            Row::best(&self.bitback) / Row::best(&self.peer)
        );
    }
}

fn main() {
    let peer_dir = qmpbackup_dir();
    let size = env_u64("BITBACK_BENCH_VIRTUAL_GIB", 64) * GIB;
    let data = env_u64("BITBACK_BENCH_DATA_GIB", 4) * GIB;
    let dirty = env_u64("BITBACK_BENCH_DIRTY_MIB", 64) * MIB;
    let repeat = env_u64("BITBACK_BENCH_REPEAT", 3) as usize;
    let warm = std::env::var("BITBACK_BENCH_CACHES").is_ok_and(|v| v == "warm");
    let dir = common::bench_dir("bitback-peers-");
    let d = dir.path();
    let disk = d.join("disk.qcow2");
    common::create_qcow2(&disk, size);
    eprintln!(
        "writing {} MiB of data over a {} GiB disk",
        data >> 20,
        size >> 30
    );
    qemu_io(
        "qcow2",
        disk.to_str().unwrap(),
        &common::spread_writes(size, data),
    );
    let mut vm = Vm::start(d, &disk);

    // The physical limits: the O_DIRECT write of the data, QEMU's read.
    // Where caches can be dropped, also the two at once from a cold
    // cache: what a cold full and a restore need of one disk (a shared
    // virtual disk may serve reads and writes from one budget).
    let mut write_limit = Vec::new();
    let mut read_limit = Vec::new();
    let mut both_limit = Vec::new();
    let out = d.join("direct.bin");
    let direct_write = || {
        let mut cmd = Command::new("dd");
        cmd.arg("if=/dev/zero")
            .arg(format!("of={}", out.display()))
            .args([
                "bs=4M",
                &format!("count={}", data / (4 * MIB)),
                "oflag=direct",
                "status=none",
            ]);
        cmd
    };
    let qemu_read = || {
        let mut cmd = Command::new("qemu-img");
        cmd.args(["convert", "-U", "-n", "-f", "qcow2"])
            .arg(&disk)
            .arg("--target-image-opts")
            .arg(format!("driver=null-co,size={size}"));
        cmd
    };
    for _ in 0..repeat {
        write_limit.push(timed(&mut direct_write()));
        std::fs::remove_file(&out).unwrap();
        read_limit.push(timed(&mut qemu_read()));
        if drop_caches() {
            let start = Instant::now();
            let mut writer = direct_write().spawn().expect("running dd");
            timed(&mut qemu_read());
            assert!(writer.wait().unwrap().success());
            run(&mut Command::new("sync"));
            both_limit.push(start.elapsed());
            std::fs::remove_file(&out).unwrap();
        }
    }

    let (ours_sock, peer_sock) = (vm.bitback.clone(), vm.peer.clone());
    let bitback_backup = |repo: &Path| {
        let mut cmd = Command::new(BITBACK);
        cmd.args(["backup", "--qmp"])
            .arg(&ours_sock)
            .arg("--repo")
            .arg(repo)
            .args(["--vm", "bench", "--json"]);
        cmd
    };
    let peer_backup = |level: &str, target: &Path| {
        let mut cmd = python();
        cmd.arg(peer_dir.join("qmpbackup"))
            .arg("--socket")
            .arg(&peer_sock)
            .args(["backup", "--level", level, "--target"])
            .arg(target);
        cmd
    };

    let mut full = Row {
        name: "full",
        bitback: Vec::new(),
        peer: Vec::new(),
    };
    let mut inc = Row {
        name: "incremental",
        bitback: Vec::new(),
        peer: Vec::new(),
    };
    let mut restore = Row {
        name: "restore of the chain to raw",
        bitback: Vec::new(),
        peer: Vec::new(),
    };
    let mut rng = Rng(0x5eed);
    for round in 0..repeat {
        let repo = d.join(format!("repo-{round}"));
        let target = d.join(format!("peer-{round}"));
        std::fs::create_dir(&target).unwrap();
        // Fulls, then incrementals, in the round's order.
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for ours in order {
            ready_disk(warm, &disk);
            if ours {
                full.bitback.push(timed(&mut bitback_backup(&repo)));
            } else {
                // A full of its own: no bitmap of an earlier round's chain.
                let mut cleanup = python();
                cleanup
                    .arg(peer_dir.join("qmpbackup"))
                    .arg("--socket")
                    .arg(&peer_sock)
                    .args(["cleanup", "--remove-bitmap"]);
                timed(&mut cleanup);
                full.peer.push(timed(&mut peer_backup("full", &target)));
            }
        }
        vm.write(&random_writes(
            &mut rng,
            size,
            dirty / MIB,
            round as u64 + 7,
        ));
        for ours in order {
            ready_disk(warm, &disk);
            if ours {
                inc.bitback.push(timed(&mut bitback_backup(&repo)));
            } else {
                inc.peer.push(timed(&mut peer_backup("inc", &target)));
            }
        }
        // Restores of the newest point to raw. Every operation starts from
        // cold caches where this user may drop them (root): the disk as a
        // nightly backup finds it, the files as a restore days later
        // does; bitback writes its files around the page cache, QEMU
        // wrote qmpbackup's through it.
        for ours in order {
            let out = d.join("restored.raw");
            let _ = std::fs::remove_file(&out);
            drop_caches();
            if ours {
                restore.bitback.push(timed(
                    Command::new(BITBACK)
                        .args(["restore", "--repo"])
                        .arg(&repo)
                        .args(["--vm", "bench", "--output"])
                        .arg(&out),
                ));
            } else {
                // qmpbackup's way: rebase the chain in place, then convert.
                let chain = std::fs::read_dir(&target)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .find(|p| p.is_dir())
                    .expect("qmpbackup's device directory");
                let start = Instant::now();
                let mut rebase = python();
                rebase
                    .arg(peer_dir.join("qmprestore"))
                    .args(["rebase", "--dir"])
                    .arg(&chain);
                timed(&mut rebase);
                timed(
                    Command::new("qemu-img")
                        .args(["convert", "-t", "none", "-O", "raw"])
                        .arg(chain.join("image"))
                        .arg(&out),
                );
                restore.peer.push(start.elapsed());
            }
            std::fs::remove_file(&out).unwrap();
        }
        std::fs::remove_dir_all(&repo).unwrap();
        std::fs::remove_dir_all(&target).unwrap();
    }
    drop(vm);

    println!(
        "\n{} GiB virtual, {} GiB of data, {} MiB dirty per incremental; medians (best) of {repeat}",
        size >> 30,
        data >> 30,
        dirty >> 20
    );
    let cold = drop_caches();
    println!(
        "{} from {} caches",
        if warm {
            "backups from the disk in the page cache (BITBACK_BENCH_CACHES=warm); restores"
        } else {
            "every operation"
        },
        if cold {
            "cold"
        } else {
            "warm (no right to drop them)"
        }
    );
    println!("| operation | bitback | qmpbackup | ratio |");
    println!("|---|---|---|---|");
    for row in [&full, &inc, &restore] {
        row.print();
    }
    let (w, r) = (median(&write_limit), median(&read_limit));
    println!(
        "limits: O_DIRECT write of the data {w:.2} s, QEMU's read of it {r:.2} s (warm); bitback's full is {:.2}x of the larger",
        median(&full.bitback) / w.max(r)
    );
    if !both_limit.is_empty() {
        let b = median(&both_limit);
        println!(
            "cold read and O_DIRECT write of the data at once: {b:.2} s; bitback's full is {:.2}x of it, its restore {:.2}x",
            median(&full.bitback) / b,
            median(&restore.bitback) / b
        );
    }
    let secs = |v: &[Duration]| v.iter().map(Duration::as_secs_f64).collect::<Vec<_>>();
    println!(
        "{}",
        json!({
            "virtual": size, "data": data, "dirty": dirty,
            "full": {"bitback": secs(&full.bitback), "qmpbackup": secs(&full.peer)},
            "incremental": {"bitback": secs(&inc.bitback), "qmpbackup": secs(&inc.peer)},
            "restore": {"bitback": secs(&restore.bitback), "qmpbackup": secs(&restore.peer)},
            "limits": {
                "direct_write": secs(&write_limit),
                "qemu_read": secs(&read_limit),
                "cold_read_and_direct_write": secs(&both_limit),
            },
        })
    );
}
