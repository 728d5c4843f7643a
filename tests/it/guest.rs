//! A booted guest writing without pause (fixtures/guest): every backup
//! point must restore to a consistent prefix of its sequence log, on both
//! disks, with matching positions, also when bitback is killed mid-way.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::guest::{
    SLOTS, assert_killed_and_thawed, check_log, check_point_of, checksum, serial_count,
};
use crate::harness::{Disk, Kind, Qemu, backup_into, backup_into_env, create_qcow2, tempdir};

const MIB: u64 = 1 << 20;
/// [`check_point_of`] for the VM `guest` of this file's scenarios.
fn check_point(repo: &Path, id: &str, out: &Path) -> (i64, i64) {
    check_point_of(repo, "guest", id, ["disk0", "disk1"], out)
}

fn guest(dir: &Path) -> Qemu {
    let a = dir.join("a.qcow2");
    let b = dir.join("b.qcow2");
    create_qcow2(&a, 16 * MIB, &[]);
    create_qcow2(&b, 16 * MIB, &[]);
    Qemu::start(
        Kind::Guest,
        dir,
        &[
            Disk::new("disk0", "drive0", &a),
            Disk::new("disk1", "drive1", &b),
        ],
    )
}

fn backup(qemu: &Qemu, repo: &Path, env: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bitback"));
    cmd.args(["backup", "--qmp", qemu.qmp.to_str().unwrap(), "--repo"])
        .arg(repo)
        .args(["--vm", "guest", "--json", "-v"]);
    if let Some(phase) = env {
        cmd.env("BITBACK_FAULT", phase);
        if phase == "mid-copy" {
            // Slow enough that a progress poll sees the copy under way.
            cmd.args(["--rate-limit", "16K"]);
        }
    }
    cmd.output().unwrap()
}

fn ids(repo: &Path) -> Vec<String> {
    crate::harness::list_ids(repo, None)
}

/// Waits until the guest has written to both disks since the last
/// backup: every checkpoint bitmap on them counts dirty bytes (at once
/// when there is none yet).
fn wait_for_guest_writes(qemu: &Qemu) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let nodes = qemu.must("query-named-block-nodes", serde_json::json!({"flat": true}));
        let dirty = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| matches!(n["node-name"].as_str(), Some("drive0" | "drive1")))
            .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
            .filter(|b| {
                b["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("bitback-"))
            })
            .all(|b| b["count"].as_u64().unwrap_or(0) > 0);
        if dirty {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest wrote nothing for 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_writing_guest_restores_to_consistent_prefixes_at_every_point() {
    let dir = tempdir();
    let qemu = guest(dir.path());
    let repo = dir.path().join("repo");
    let mut kinds = Vec::new();
    for _ in 0..6 {
        wait_for_guest_writes(&qemu);
        let out = backup(&qemu, &repo, None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m: Value = serde_json::from_slice(&out.stdout).unwrap();
        kinds.push(m["kind"].as_str().unwrap().to_string());
    }
    assert_eq!(kinds[0], "full");
    assert!(kinds[1..].iter().all(|k| k == "incremental"), "{kinds:?}");
    drop(qemu);
    let mut last = None;
    for id in ids(&repo) {
        let (a, _) = check_point(&repo, &id, &dir.path().join("out"));
        if let Some(previous) = last {
            assert!(a > previous, "the guest made no progress between backups");
        }
        last = Some(a);
    }
}

#[test]
fn killed_at_any_phase_with_the_guest_writing_every_point_stays_consistent() {
    let dir = tempdir();
    let qemu = guest(dir.path());
    let repo = dir.path().join("repo");
    let first = backup(&qemu, &repo, None);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    for phase in [
        "after-transaction",
        "mid-copy",
        "after-jobs",
        "before-commit",
        "after-commit",
    ] {
        wait_for_guest_writes(&qemu);
        if phase == "mid-copy" {
            // 1 MiB more to copy on each disk, beyond the guest's log: at
            // 16 KiB/s the copy is surely under way at the first poll.
            qemu.qemu_io("drive0", "write -P 0x77 8M 1M");
            qemu.qemu_io("drive1", "write -P 0x77 8M 1M");
        }
        let killed = backup(&qemu, &repo, Some(phase));
        assert_eq!(killed.status.code(), None, "{phase}: not killed");
        wait_for_guest_writes(&qemu);
        let next = backup(&qemu, &repo, None);
        let log = String::from_utf8_lossy(&next.stderr);
        assert!(next.status.success(), "{phase}: {log}");
        let m: Value = serde_json::from_slice(&next.stdout).unwrap();
        eprintln!(
            "{phase}: next is {} {} ({})",
            m["id"], m["kind"], m["reason"]
        );
        if phase == "after-commit" {
            assert_eq!(m["kind"], "full", "{phase}");
        } else {
            assert_eq!(m["kind"], "incremental", "{phase}");
            assert!(
                log.contains("interrupted run") || log.contains("does not use"),
                "{phase}: the log does not say what was cleaned:\n{log}"
            );
        }
    }
    drop(qemu);
    let all = ids(&repo);
    assert_eq!(all.len(), 7, "{all:?}");
    for id in all {
        check_point(&repo, &id, &dir.path().join("out"));
    }
}

#[test]
fn the_log_checker_catches_what_it_must() {
    let dir = tempdir();
    let path = dir.path().join("log.raw");
    let write = |records: &[(u64, u64)]| {
        let mut bytes = vec![0u8; (SLOTS * 4096) as usize];
        for &(k, c) in records {
            let line = format!("BBREC {k:012} {c:010}\n");
            let at = ((k % SLOTS) * 4096) as usize;
            bytes[at..at + line.len()].copy_from_slice(line.as_bytes());
        }
        std::fs::write(&path, bytes).unwrap();
    };
    let good: Vec<(u64, u64)> = (10..=100).map(|k| (k, checksum(k))).collect();
    write(&good);
    assert_eq!(check_log(&path), Ok(Some(100)));
    let early: Vec<(u64, u64)> = (0..=4).map(|k| (k, checksum(k))).collect();
    write(&early);
    assert_eq!(check_log(&path), Ok(Some(4)));
    // A log must start at record 0.
    write(&good[..5]);
    assert!(check_log(&path).is_err());
    write(&[]);
    assert_eq!(check_log(&path), Ok(None));
    // A slot that missed its newest record breaks the run.
    let mut stale = good.clone();
    stale.retain(|&(k, _)| k != 90);
    write(&stale);
    assert!(check_log(&path).is_err());
    let mut bad = good.clone();
    bad.last_mut().unwrap().1 += 1;
    write(&bad);
    assert!(check_log(&path).is_err());
}

/// The guest agent's own answer to guest-fsfreeze-status, asked on a
/// connection of the test's.
fn freeze_status(qemu: &Qemu) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(qemu.qga()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(b"{\"execute\":\"guest-fsfreeze-status\"}\n")
        .unwrap();
    for line in BufReader::new(stream).lines() {
        let line = line.expect("the guest agent answers within 30 s");
        if let Ok(reply) = serde_json::from_str::<Value>(&line)
            && let Some(status) = reply["return"].as_str()
        {
            return status.to_string();
        }
    }
    panic!("the guest agent closed the connection");
}

#[test]
fn quiesce_through_the_guests_agent_is_one_frozen_instant_and_a_kill_leaves_it_thawed() {
    let dir = tempdir();
    let qemu = guest(dir.path());
    let repo = dir.path().join("repo");
    let qga = qemu.qga();
    let quiesce = ["--quiesce", "--qga", qga.to_str().unwrap()];

    // The guest's agent stops its writer between records while frozen:
    // the point has both disks at the same record.
    wait_for_guest_writes(&qemu);
    let first = backup_into(&qemu.qmp, &repo, "guest", &quiesce).json();
    assert_eq!(
        (
            serial_count(&qemu.dir, "frozen"),
            serial_count(&qemu.dir, "thawed")
        ),
        (1, 1)
    );
    let (a, b) = check_point(
        &repo,
        first["id"].as_str().unwrap(),
        &dir.path().join("out"),
    );
    assert_eq!(a, b, "a frozen point has both disks at one record");

    // SIGKILL after the freeze: bitback's guard thaws the guest.
    wait_for_guest_writes(&qemu);
    let killed = backup_into_env(
        &qemu.qmp,
        &repo,
        "guest",
        &quiesce,
        &[("BITBACK_FAULT", "before-transaction")],
    );
    assert_killed_and_thawed(&killed);
    assert_eq!(
        (
            serial_count(&qemu.dir, "frozen"),
            serial_count(&qemu.dir, "thawed")
        ),
        (2, 2)
    );
    assert_eq!(freeze_status(&qemu), "thawed");

    // The guest writes on, and the chain goes on from the first point.
    wait_for_guest_writes(&qemu);
    let next = backup_into(&qemu.qmp, &repo, "guest", &quiesce).json();
    assert_eq!(next["kind"], "incremental", "{}", next["reason"]);
    let (c, d) = check_point(&repo, next["id"].as_str().unwrap(), &dir.path().join("out"));
    assert_eq!(c, d);
    assert!(c > a, "the guest wrote on after the thaw");
}
