//! The soak test: randomized rounds of writes, backups (full or
//! incremental, all volumes or some), restores, prunes and consolidations;
//! every point is checked against the raw model. BITBACK_SOAK_ROUNDS sets
//! the number of rounds (CI runs a few); the seed is printed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::Vm;
use crate::harness::{Rng, bitback, same_content, tempdir};

const MIB: u64 = 1 << 20;

fn same(a: &Path, b: &Path) -> bool {
    same_content(a, "raw", b, "raw")
}

#[test]
fn soak() {
    let rounds: u64 = std::env::var("BITBACK_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[8 * MIB, 4 * MIB, 2 * MIB]);
    let mut rng = Rng::from_env();
    let repo = vm.repo.to_str().unwrap().to_string();
    // backup id -> (volume index, model file) for the volumes it holds
    let mut points: HashMap<String, Vec<(usize, PathBuf)>> = HashMap::new();
    let mut checked = 0;
    let mut differences = Vec::new();
    for round in 0..rounds {
        let writes = 1 + rng.below(10) as usize;
        vm.random_writes(&mut rng, writes);
        let mut args: Vec<String> = Vec::new();
        if rng.below(5) == 0 {
            args.push("--full".into());
        }
        let excluded = (rng.below(4) == 0).then(|| rng.below(3) as usize);
        if let Some(x) = excluded {
            args.extend(["--exclude".into(), format!("drive{x}")]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let m = vm.backup(&refs);
        vm.points.pop();
        let id = m["id"].as_str().unwrap().to_string();
        let mut held = Vec::new();
        for (i, model) in vm.models.iter().enumerate() {
            if Some(i) == excluded {
                continue;
            }
            let path = dir.path().join(format!("model-{id}-{i}.raw"));
            std::fs::write(&path, &model.bytes).unwrap();
            held.push((i, path));
        }
        points.insert(id.clone(), held);

        match rng.below(6) {
            0 => {
                let keep = 1 + rng.below(4);
                let run = bitback(&[
                    "prune",
                    "--repo",
                    &repo,
                    "--vm",
                    "vm1",
                    "--keep-last",
                    &keep.to_string(),
                ]);
                assert_eq!(run.code, Some(0), "round {round} prune: {}", run.stderr);
            }
            1 => {
                let max = 1 + rng.below(4);
                let run = bitback(&[
                    "consolidate",
                    "--repo",
                    &repo,
                    "--vm",
                    "vm1",
                    "--max-chain",
                    &max.to_string(),
                ]);
                assert_eq!(
                    run.code,
                    Some(0),
                    "round {round} consolidate: {}",
                    run.stderr
                );
            }
            _ => {}
        }

        // Restore a few listed points and compare with their models.
        let listed: Vec<String> = bitback(&["list", "--repo", &repo, "--vm", "vm1", "--json"])
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        for _ in 0..2 {
            let id = &listed[rng.below(listed.len() as u64) as usize];
            let out = dir.path().join(format!("restore-{round}"));
            let format = if rng.below(2) == 0 { "raw" } else { "qcow2" };
            let run = vm.restore(id, &out, &["--format", format]);
            assert_eq!(
                run.code,
                Some(0),
                "round {round} restore {id}: {}",
                run.stderr
            );
            for (i, model) in &points[id] {
                let restored = out.join(format!("drive{i}.{format}"));
                let raw = if format == "raw" {
                    restored.clone()
                } else {
                    let raw = out.join(format!("drive{i}.as-raw"));
                    crate::harness::run(
                        Command::new("qemu-img")
                            .args(["convert", "-O", "raw"])
                            .arg(&restored)
                            .arg(&raw),
                    );
                    raw
                };
                checked += 1;
                if !same(&raw, model) {
                    differences.push(format!("round {round}: {id} drive{i} ({format})"));
                }
            }
            std::fs::remove_dir_all(&out).unwrap();
        }
    }
    let verified = bitback(&["verify", "--repo", &repo]);
    assert_eq!(verified.code, Some(0), "{}", verified.stdout);
    eprintln!(
        "soak: {rounds} rounds, {checked} restored volumes checked, {} differences",
        differences.len()
    );
    assert!(differences.is_empty(), "{differences:#?}");
    vm.quit();
}
