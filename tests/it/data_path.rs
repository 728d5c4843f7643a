//! `--data-path nbd`: the backup job's bytes reach bitback's NBD server and
//! bitback writes the files. The same judges as the file path's tests:
//! raw models written in parallel, `qemu-img compare` and `qemu-img check`
//! of every file, a booted-guest-like point taken while the device is
//! written, a stopped VM through qemu-storage-daemon, and a kill mid-copy.

use std::process::Command;

use serde_json::Value;

use crate::harness::{Rng, Vm, backup_into_env, bitback, run, tempdir};

const MIB: u64 = 1 << 20;
const NBD: [&str; 2] = ["--data-path", "nbd"];

#[test]
fn a_full_and_incrementals_through_bitbacks_nbd_server_match_their_models() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[24 * MIB, 8 * MIB + 512 * 3]);
    let mut rng = Rng::from_env();
    for round in 0..5 {
        vm.random_writes(&mut rng, 12);
        let m = vm.backup(&NBD);
        assert_eq!(
            m["kind"],
            if round == 0 { "full" } else { "incremental" },
            "{m:#}"
        );
    }
    // The file path continues the chain the NBD path made, and back.
    vm.random_writes(&mut rng, 6);
    assert_eq!(vm.backup(&[])["kind"], "incremental");
    vm.random_writes(&mut rng, 6);
    assert_eq!(vm.backup(&NBD)["kind"], "incremental");
    vm.check_files();
    vm.quit();
    vm.check_all_points();
    let verified = bitback(&["verify", "--repo", vm.repo.to_str().unwrap()]);
    assert_eq!(verified.code, Some(0), "{}", verified.stderr);
}

#[test]
fn a_guarded_point_through_the_nbd_server_is_the_disk_at_its_start() {
    use std::process::Stdio;
    let dir = tempdir();
    let mut vm = Vm::with_devices(dir.path(), &[32 * MIB]);
    for at in 0..24 {
        vm.write(0, at * MIB, MIB, 0x21);
    }
    for (round, kind) in ["full", "incremental"].into_iter().enumerate() {
        let at_start = vm.models[0].bytes.clone();
        let mut child = Command::new(env!("CARGO_BIN_EXE_bitback"))
            .args(["backup", "--qmp"])
            .arg(&vm.qemu().qmp)
            .arg("--repo")
            .arg(&vm.repo)
            .args(["--vm", "vm1", "--json", "--speed-limit", "4M"])
            .args(NBD)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        vm.qemu().wait_for_job(&mut child);
        // Old data the copy has not reached: the filter copies it through
        // the NBD server, and the job reads it back from there.
        for at in 8..24 {
            vm.write(0, at * MIB, MIB, 0x30 + round as u8);
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(m["kind"], kind, "{m}");
        assert_eq!(m["volumes"][0]["guard"], "bitback", "{m}");
        let id = m["id"].as_str().unwrap().to_string();
        let model = vm.dir.join(format!("model-{id}-0.raw"));
        std::fs::write(&model, &at_start).unwrap();
        vm.points.push((id, vec![model]));
    }
    vm.check_files();
    vm.quit();
    vm.check_all_points();
}

#[test]
fn a_stopped_vm_and_a_killed_copy_through_the_nbd_server() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[8 * MIB, 4 * MIB]);
    vm.write(0, 0, 2 * MIB, 0x41);
    vm.backup(&NBD);
    // Killed mid-copy: the next run cleans up and continues the chain.
    vm.write(1, MIB, 2 * MIB, 0x42);
    let killed = backup_into_env(
        &vm.qemu().qmp,
        &vm.repo,
        "vm1",
        &["--data-path", "nbd", "--speed-limit", "64K"],
        &[("BITBACK_FAULT", "mid-copy")],
    );
    assert_eq!(killed.code, None, "{}", killed.stderr);
    let next = vm.backup(&NBD);
    assert_eq!(next["kind"], "incremental", "{next}");
    vm.write(0, 3 * MIB, MIB, 0x43);
    vm.quit();

    // Stopped: qemu-storage-daemon, which has no getfd, connects to a
    // socket bitback listens on.
    let img = |i: usize| format!("drive{i}={}", vm.disks[i].image.display());
    let repo = vm.repo.to_str().unwrap().to_string();
    let stopped = bitback(&[
        "backup",
        "--repo",
        &repo,
        "--vm",
        "vm1",
        "--image",
        &img(0),
        "--image",
        &img(1),
        "--json",
        "--data-path",
        "nbd",
    ])
    .json();
    assert_eq!(stopped["kind"], "incremental", "{stopped:#}");
    vm.snapshot(stopped["id"].as_str().unwrap());
    vm.check_files();
    vm.check_all_points();
}

/// `--compress` (the NBD path by default): bitback writes zstd clusters
/// that qemu-img reads, a cluster map beside each file that holds the
/// model's digest of every cluster the file holds, restores decompress
/// natively, and verify checks the maps (and catches a changed one).
#[test]
fn compressed_backups_are_zstd_files_bitback_writes_with_cluster_maps() {
    use bitback::cluster_map::{Map, digest};
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[16 * MIB, 4 * MIB + 512 * 5]);
    let mut rng = Rng::from_env();
    for at in 0..6 {
        vm.write(0, at * 2 * MIB, MIB, 0x50 + at as u8);
    }
    // Both volumes hold data before the first full, whatever the seed: a
    // full's map records only the clusters that hold data.
    vm.write(1, 0, 64 * 1024 + 512, 0x5f);
    vm.random_writes(&mut rng, 8);
    let levels: [&[&str]; 3] = [
        &["--compress", "--data-path", "nbd"],
        &["--compress-level", "9", "--data-path", "nbd"],
        &["--compress", "--full", "--data-path", "nbd"],
    ];
    for (round, extra) in levels.into_iter().enumerate() {
        if round > 0 {
            vm.random_writes(&mut rng, 6);
            vm.write(1, MIB, MIB, 0x60 + round as u8);
            vm.write(0, round as u64 * 3 * MIB, MIB, 0x70 + round as u8);
        }
        let m = vm.backup(extra);
        let id = m["id"].as_str().unwrap();
        for (i, v) in m["volumes"].as_array().unwrap().iter().enumerate() {
            let file = vm.repo.join(v["file"].as_str().unwrap());
            let info: Value = serde_json::from_slice(
                &run(Command::new("qemu-img")
                    .args(["info", "--output=json", "-U"])
                    .arg(&file))
                .stdout,
            )
            .unwrap();
            assert_eq!(
                info["format-specific"]["data"]["compression-type"], "zstd",
                "{info}"
            );
            // Volume 0 holds patterns, which shrink.
            if i == 0 {
                assert!(crate::harness::has_compressed_clusters(&file));
            }
            // The map: every record is the model's cluster at this point.
            let rel = v["cluster_map"]["file"].as_str().expect("a cluster map");
            let map = Map::read(&vm.repo.join(rel)).unwrap();
            let records = v["cluster_map"]["records"].as_u64().unwrap();
            assert!(records >= map.clusters.len() as u64, "{v}");
            assert!(!map.clusters.is_empty(), "round {round}: an empty map");
            let model = &vm.models[i].bytes;
            // A full's map holds every cluster of the model with data.
            if v["kind"] == "full" {
                for (c, bytes) in model.chunks(map.cluster_size as usize).enumerate() {
                    if bytes.iter().any(|&b| b != 0) {
                        assert!(
                            map.clusters.contains(c as u64),
                            "{id} volume {i}: data cluster {c} not in the full's map"
                        );
                    }
                }
            }
            for (c, d) in map.clusters.iter() {
                let start = (c * map.cluster_size) as usize;
                let end = (start + map.cluster_len(c)).min(model.len());
                assert_eq!(
                    *d,
                    digest(&model[start..end]),
                    "{id} volume {i} cluster {c}"
                );
            }
        }
    }
    vm.check_files();
    vm.quit();
    vm.check_all_points();
    for (id, models) in &vm.points {
        for (i, model) in models.iter().enumerate() {
            let out = dir.path().join(format!("restored-{id}-{i}.raw"));
            let r = vm.restore(id, &out, &["--volume", vm.volume(i), "--json"]);
            assert_eq!(r.code, Some(0), "{}", r.stderr);
            assert!(r.stdout.contains("\"native\""), "{}", r.stdout);
            assert!(crate::harness::same_content(&out, "raw", model, "raw"));
        }
    }
    let verified = bitback(&[
        "verify",
        "--repo",
        vm.repo.to_str().unwrap(),
        "--map-clusters",
    ]);
    assert_eq!(verified.code, Some(0), "{}", verified.stderr);
    // A map changed on the NAS is caught, named by its file.
    let (id, _) = &vm.points[1];
    let map = vm
        .repo
        .join("vm1")
        .join(id)
        .join(format!("{}.map", vm.volume(0)));
    let mut bytes = std::fs::read(&map).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&map, &bytes).unwrap();
    let caught = bitback(&["verify", "--repo", vm.repo.to_str().unwrap(), "--json"]);
    assert_eq!(caught.code, Some(1), "{}", caught.stderr);
    assert!(
        caught.stdout.contains(&format!("{}.map", vm.volume(0)))
            && caught.stdout.contains("cluster map"),
        "{}",
        caught.stdout
    );
}

/// bitback killed mid-copy on a guarded volume over the NBD path, with
/// guest writes before and after: the next run takes out the job, the
/// guard and the NBD nodes the killed one left, and continues the chain,
/// within seconds. (The killed run's job, rate-limited, slept out its
/// limit before it saw its cancel or its dead target; the cleanup lifts
/// the limit first.)
#[test]
fn a_killed_guarded_copy_through_the_nbd_server_is_cleaned_up() {
    let dir = tempdir();
    let mut vm = Vm::with_devices(dir.path(), &[16 * MIB, 8 * MIB]);
    vm.write(0, 0, 4 * MIB, 0x21);
    vm.write(1, 0, 2 * MIB, 0x22);
    vm.backup(&NBD);
    // Several chunks each: after the first, the speed limit holds the job
    // back (a job of one chunk could end before any poll saw it run).
    vm.write(0, 8 * MIB, 4 * MIB, 0x23);
    vm.write(1, 4 * MIB, 3 * MIB, 0x24);
    let killed = backup_into_env(
        &vm.qemu().qmp,
        &vm.repo,
        "vm1",
        &["--data-path", "nbd", "--speed-limit", "16K"],
        &[("BITBACK_FAULT", "mid-copy")],
    );
    assert_eq!(killed.code, None, "{}", killed.stderr);
    vm.write(0, 12 * MIB, MIB, 0x25);
    // The killed run's job, held back by its limit, is cancelled at once:
    // a cleanup that waited it out gave up and met its nodes ("Duplicate
    // nodes"), and this backup failed.
    let next = vm.backup(&NBD);
    assert_eq!(next["kind"], "incremental", "{next}");
    vm.quit();
    vm.check_files();
    vm.check_all_points();
}
