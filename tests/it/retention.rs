//! `bitback prune`, `consolidate` and `export`: every remaining point still
//! restores to what the guest wrote.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::Vm;
use crate::harness::{bitback, same_content, tempdir};

const MIB: u64 = 1 << 20;

fn list_ids(vm: &Vm) -> Vec<String> {
    crate::harness::list_ids(&vm.repo, None)
}

fn same(a: &Path, b: &Path) -> bool {
    same_content(a, "raw", b, "raw")
}

/// Every backup still listed restores to its model, and verify is clean.
fn assert_all_restorable(vm: &Vm) {
    let ids = list_ids(vm);
    assert!(!ids.is_empty());
    for id in &ids {
        let (_, models) = vm
            .points
            .iter()
            .find(|(p, _)| p == id)
            .unwrap_or_else(|| panic!("no model for {id}"));
        let out = vm.dir.join(format!("check-{id}"));
        let run = vm.restore(id, &out, &[]);
        assert_eq!(run.code, Some(0), "{id}: {}", run.stderr);
        for (i, model) in models.iter().enumerate() {
            assert!(
                same(&out.join(format!("drive{i}.raw")), model),
                "{id} volume {i}"
            );
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
    let verified = bitback(&["verify", "--repo", vm.repo.to_str().unwrap()]);
    assert_eq!(verified.code, Some(0), "{}", verified.stdout);
}

/// Backups A0..A3 (one chain), then B0..B2 (a second).
fn two_chains(dir: &Path) -> Vm {
    let mut vm = Vm::new(dir, &[8 * MIB, 2 * MIB]);
    for i in 0..7u64 {
        vm.write(
            (i % 2) as usize,
            (i % 4) * 256 * 1024,
            64 * 1024,
            0x20 + i as u8,
        );
        vm.backup(if i == 4 { &["--full"] } else { &[] });
    }
    vm
}

fn prune(vm: &Vm, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend(args);
    vm.cli("prune", &all).json()
}

#[test]
fn prune_keeps_chains_and_what_kept_backups_need() {
    let dir = tempdir();
    let mut vm = two_chains(dir.path());
    let ids = list_ids(&vm);
    assert_eq!(
        prune(&vm, &["--keep-chains", "2"])["deleted"],
        Value::Array(vec![])
    );
    // The last five reach into chain A: all of A is needed.
    assert_eq!(
        prune(&vm, &["--keep-last", "5"])["deleted"],
        Value::Array(vec![])
    );
    let report = prune(&vm, &["--keep-last", "2"]);
    assert_eq!(report["deleted"], serde_json::json!(ids[..4]));
    assert_eq!(list_ids(&vm), ids[4..].to_vec());
    assert_all_restorable(&vm);
    // The active checkpoint survived: the next backup is incremental.
    vm.write(0, 0, 4096, 0x77);
    assert_eq!(vm.backup(&[])["kind"], "incremental");
    vm.quit();
    assert_all_restorable(&vm);
}

#[test]
fn consolidate_shortens_chains_and_every_point_left_restores() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[8 * MIB, 2 * MIB]);
    for i in 0..8u64 {
        vm.write(
            (i % 2) as usize,
            (i % 5) * 300 * 1024,
            100 * 1024,
            0x30 + i as u8,
        );
        vm.backup(&[]);
    }
    let ids = list_ids(&vm);
    let report = bitback(&[
        "consolidate",
        "--repo",
        vm.repo.to_str().unwrap(),
        "--vm",
        "vm1",
        "--max-chain",
        "3",
        "--json",
    ])
    .json();
    assert_eq!(report["consolidated"], serde_json::json!([ids[5]]));
    assert_eq!(report["deleted"].as_array().unwrap().len(), 5);
    let listed = bitback(&["list", "--repo", vm.repo.to_str().unwrap(), "--json"]).json();
    let positions: Vec<(String, u64, String)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["kind"].as_str().unwrap().to_string(),
                m["position"].as_u64().unwrap(),
                m["chain"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        positions,
        vec![
            ("full".to_string(), 0, ids[5].clone()),
            ("incremental".to_string(), 1, ids[5].clone()),
            ("incremental".to_string(), 2, ids[5].clone()),
        ]
    );
    assert_all_restorable(&vm);
    vm.write(1, 0, 4096, 0x7e);
    let next = vm.backup(&[]);
    assert_eq!(next["kind"], "incremental");
    assert_eq!(next["position"], 3);
    vm.quit();
    assert_all_restorable(&vm);
}

#[test]
fn a_kill_during_consolidation_or_prune_leaves_every_point_restorable() {
    for phase in [
        "consolidate-before-swap",
        "consolidate-after-swap",
        "prune-renamed",
    ] {
        let dir = tempdir();
        let mut vm = Vm::new(dir.path(), &[4 * MIB, 2 * MIB]);
        // Two chains of three: prune and consolidation both have work.
        for i in 0..6u64 {
            vm.write((i % 2) as usize, i * 128 * 1024, 64 * 1024, 0x40 + i as u8);
            vm.backup(if i == 3 { &["--full"] } else { &[] });
        }
        vm.quit();
        let repo = vm.repo.to_str().unwrap().to_string();
        let args: Vec<&str> = if phase.starts_with("prune") {
            vec!["prune", "--repo", &repo, "--vm", "vm1", "--keep-last", "1"]
        } else {
            vec![
                "consolidate",
                "--repo",
                &repo,
                "--vm",
                "vm1",
                "--max-chain",
                "2",
            ]
        };
        let killed = Command::new(env!("CARGO_BIN_EXE_bitback"))
            .args(&args)
            .env("BITBACK_FAULT", phase)
            .output()
            .unwrap();
        assert_eq!(killed.status.code(), None, "{phase}: not killed");
        assert_all_restorable(&vm);
        // The next run finishes the job.
        let again = bitback(&args);
        assert_eq!(again.code, Some(0), "{phase}: {}", again.stderr);
        assert_all_restorable(&vm);
        if !phase.starts_with("prune") {
            let listed = bitback(&["list", "--repo", &repo, "--json"]).json();
            assert!(
                listed
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|m| m["position"].as_u64().unwrap() < 2),
                "{phase}: {listed:#}"
            );
        }
    }
}

#[test]
fn export_serves_the_point_that_restore_gives() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[8 * MIB]);
    for i in 0..3u64 {
        vm.write(0, i * MIB, 300 * 1024, 0x50 + i as u8);
        vm.backup(&[]);
    }
    vm.quit();
    let ids = list_ids(&vm);
    let socket = dir.path().join("export.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_bitback"))
        .args([
            "export",
            "--repo",
            vm.repo.to_str().unwrap(),
            "--vm",
            "vm1",
            "--backup",
            &ids[1],
        ])
        .args(["--volume", "drive0", "--socket", socket.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "export did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let restored = dir.path().join("point1.raw");
    let run = vm.restore(&ids[1], &restored, &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let url = format!("nbd+unix:///drive0?socket={}", socket.display());
    let compared = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&restored)
        .arg(&url)
        .output()
        .unwrap();
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        compared.status.success(),
        "{}{}",
        String::from_utf8_lossy(&compared.stdout),
        String::from_utf8_lossy(&compared.stderr)
    );
    assert!(same(&restored, &vm.points[1].1[0]));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("read-only"), "{stdout}");
}

/// A backup of `vm` taken as if the clock read `time` (RFC 3339, UTC):
/// the debug build's BITBACK_CLOCK_OFFSET set to the difference.
fn backup_at(vm: &mut Vm, time: &str, extra: &[&str]) -> String {
    let target = Command::new("date")
        .args(["-u", "-d", time, "+%s"])
        .output()
        .unwrap();
    let target: i64 = String::from_utf8_lossy(&target.stdout)
        .trim()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let offset = (target - now).to_string();
    let qmp = vm.qemu().qmp.to_str().unwrap().to_string();
    let mut args = vec![
        "backup",
        "--qmp",
        &qmp,
        "--repo",
        vm.repo.to_str().unwrap(),
        "--vm",
        "vm1",
        "--json",
    ];
    args.extend(extra);
    let run = crate::harness::bitback_env(&args, &[("BITBACK_CLOCK_OFFSET", &offset)]);
    let id = run.json()["id"].as_str().unwrap().to_string();
    vm.snapshot(&id);
    id
}

/// `prune --keep-daily/--keep-weekly/--keep-monthly/--keep-yearly` over
/// a year of backups (the clock set by the test): exactly the backups the
/// rules name are kept, each restores, and a kept incremental keeps the
/// full it builds on. ISO weeks as date(1) gives them: 2027-01-04 to -06
/// are week 1, -12 and -13 week 2, 2027-02-10 and -11 week 6.
#[test]
fn calendar_retention_keeps_the_newest_of_each_period_and_their_chains() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[4 * MIB, 2 * MIB]);
    let times = [
        "2027-01-04T12:00:00Z",
        "2027-01-04T18:00:00Z",
        "2027-01-05T12:00:00Z",
        "2027-01-06T12:00:00Z",
        "2027-01-12T12:00:00Z",
        "2027-01-13T12:00:00Z",
        "2027-02-10T12:00:00Z",
        "2027-02-11T12:00:00Z",
        "2027-03-15T12:00:00Z",
        "2028-02-01T12:00:00Z",
    ];
    let mut ids = Vec::new();
    for (i, time) in times.iter().enumerate() {
        vm.write(
            i % 2,
            (i as u64 % 4) * 256 * 1024,
            64 * 1024,
            0x30 + i as u8,
        );
        ids.push(backup_at(&mut vm, time, &["--full"]));
    }
    // Days: 2028-02-01, 2027-03-15, 2027-02-11. Weeks: 2028-05,
    // 2027-11, 2027-06 (the 11th, not the 10th), 2027-02 (the 13th).
    // Months: 2028-02, 2027-03, 2027-02 (the 11th). Years: 2028, 2027
    // (03-15).
    let rules = [
        "--keep-daily",
        "3",
        "--keep-weekly",
        "4",
        "--keep-monthly",
        "3",
        "--keep-yearly",
        "2",
    ];
    let expected: Vec<String> = [5, 7, 8, 9].iter().map(|&i| ids[i].clone()).collect();
    // --dry-run says so, and changes nothing.
    let mut dry = rules.to_vec();
    dry.push("--dry-run");
    let plan = prune(&vm, &dry);
    assert_eq!(plan["dry_run"], true, "{plan}");
    assert_eq!(plan["kept"], serde_json::json!(expected), "{plan}");
    assert_eq!(plan["deleted"].as_array().unwrap().len(), 6, "{plan}");
    assert_eq!(list_ids(&vm), ids);
    let report = prune(&vm, &rules);
    assert_eq!(list_ids(&vm), expected, "{report}");
    assert_all_restorable(&vm);

    // An incremental the next day: one day kept is it, and its full.
    vm.write(0, 0, 64 * 1024, 0x77);
    let incr = backup_at(&mut vm, "2028-02-02T12:00:00Z", &[]);
    prune(&vm, &["--keep-daily", "1"]);
    assert_eq!(list_ids(&vm), [ids[9].clone(), incr]);
    assert_all_restorable(&vm);
}
