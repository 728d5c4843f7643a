//! `bitback restore` and `bitback verify` on chains made by real backups.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::harness::Vm;
use crate::harness::{Rng, bitback, run, same_content, tempdir};

const MIB: u64 = 1 << 20;

fn restore(vm: &Vm, id: &str, out: &Path, format: &str) -> Value {
    vm.restore(id, out, &["--format", format, "--json"]).json()
}

#[test]
fn native_restore_of_every_point_equals_qemu_img_convert_and_the_model() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[12 * MIB, 4 * MIB]);
    let mut rng = Rng::from_env();
    let mut lengths = Vec::new();
    // Chains of 40, 1 and 4 files.
    for i in 0..45 {
        vm.random_writes(&mut rng, 6);
        let full = i == 40 || i == 41;
        let m = vm.backup(if full { &["--full"] } else { &[] });
        lengths.push(m["position"].as_u64().unwrap() + 1);
    }
    vm.quit();
    assert_eq!(lengths[39], 40);
    assert_eq!(lengths[40], 1);
    assert_eq!(lengths[44], 4);
    for (n, (id, models)) in vm.points.iter().enumerate() {
        let out = dir.path().join(format!("restored-{n}"));
        let restored = restore(&vm, id, &out, "raw");
        let restored = restored.as_array().unwrap();
        assert_eq!(restored.len(), 2);
        for (i, r) in restored.iter().enumerate() {
            assert_eq!(r["method"], "native", "{r}");
            assert_eq!(r["chain_length"], lengths[n]);
            let path = PathBuf::from(r["path"].as_str().unwrap());
            assert_eq!(path, out.join(format!("drive{i}.raw")));
            // Against qemu-img's own reading of the same chain...
            let top = vm.repo.join("vm1").join(id).join(format!("drive{i}.qcow2"));
            let converted = dir.path().join(format!("converted-{n}-{i}.raw"));
            run(Command::new("qemu-img")
                .args(["convert", "-O", "raw"])
                .arg(&top)
                .arg(&converted));
            assert!(
                same_content(&path, "raw", &converted, "raw"),
                "point {n} ({id}) volume {i}"
            );
            // ...and against what the guest wrote.
            assert!(
                same_content(&path, "raw", &models[i], "raw"),
                "point {n} ({id}) volume {i} vs model"
            );
            std::fs::remove_file(&converted).unwrap();
        }
        if n % 4 == 1 {
            let out = dir.path().join(format!("restored-{n}-qcow2"));
            let restored = restore(&vm, id, &out, "qcow2");
            for (i, r) in restored.as_array().unwrap().iter().enumerate() {
                assert_eq!(r["method"], "native", "{r}");
                let path = PathBuf::from(r["path"].as_str().unwrap());
                assert!(
                    same_content(&path, "qcow2", &models[i], "raw"),
                    "qcow2 point {n} volume {i}"
                );
                run(Command::new("qemu-img").arg("check").arg(&path));
            }
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
    let verified = bitback(&["verify", "--repo", vm.repo.to_str().unwrap()]);
    assert_eq!(
        verified.code,
        Some(0),
        "{}{}",
        verified.stdout,
        verified.stderr
    );
    assert!(
        verified
            .stdout
            .contains("checked 90 files in 45 backups: 0 problems"),
        "{}",
        verified.stdout
    );
}

/// A VM with a chain full, inc1, inc2 of one volume; returns (vm, ids).
/// Restores write aligned chunks around the page cache (O_DIRECT) and the
/// rest through it: a disk whose size is not a multiple of 4 KiB, written
/// up to its last sector, takes both paths in one file.
#[test]
fn a_disk_ending_off_a_page_boundary_restores_exactly() {
    let dir = tempdir();
    let size = 8 * MIB + 1536;
    let mut vm = Vm::new(dir.path(), &[size]);
    vm.write(0, 0, 3 * MIB, 0x31);
    vm.write(0, size - 1536, 1536, 0x32);
    let full = vm.backup(&[]);
    vm.write(0, size - 512, 512, 0x33);
    vm.write(0, 5 * MIB + 512, 4096, 0x34);
    let incr = vm.backup(&[]);
    vm.quit();
    for (i, m) in [&full, &incr].into_iter().enumerate() {
        let id = m["id"].as_str().unwrap();
        let model = &vm.points[i].1[0];
        for format in ["raw", "qcow2"] {
            let out = dir.path().join(format!("{id}.{format}"));
            restore(&vm, id, &out, format);
            assert!(
                same_content(model, "raw", &out, format),
                "{format} restore of {id} differs from its model"
            );
        }
    }
}

fn chain_of_three(dir: &Path) -> (Vm, Vec<String>) {
    let mut vm = Vm::new(dir, &[8 * MIB]);
    let mut ids = Vec::new();
    for i in 0..3u64 {
        vm.write(0, i * 2 * MIB, MIB, 0x10 + i as u8);
        ids.push(vm.backup(&[])["id"].as_str().unwrap().to_string());
    }
    vm.quit();
    (vm, ids)
}

fn file_of(vm: &Vm, id: &str) -> PathBuf {
    vm.repo.join("vm1").join(id).join("drive0.qcow2")
}

/// verify exits 1 naming `file`; restore of the top refuses naming it too.
fn assert_caught(vm: &Vm, ids: &[String], file: &Path, words: &str) {
    let rel = file
        .strip_prefix(&vm.repo)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let verified = bitback(&["verify", "--repo", vm.repo.to_str().unwrap(), "--json"]);
    assert_eq!(verified.code, Some(1), "{}", verified.stdout);
    let report: Value = serde_json::from_str(&verified.stdout).unwrap();
    let problems = report["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p["file"] == rel.as_str() && p["problem"].as_str().unwrap().contains(words)),
        "{rel}: {words}: {problems:#?}"
    );
    let text = bitback(&["verify", "--repo", vm.repo.to_str().unwrap()]);
    assert!(
        text.stdout.contains(&format!("BAD {rel}")),
        "{}",
        text.stdout
    );

    let out = vm.dir.join("refused");
    let refused = vm.restore(ids.last().unwrap(), &out, &[]);
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("cannot be restored"),
        "{}",
        refused.stderr
    );
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none());
}

#[test]
fn verify_catches_a_flipped_byte_in_a_data_cluster() {
    let dir = tempdir();
    let (vm, ids) = chain_of_three(dir.path());
    let file = file_of(&vm, &ids[1]);
    let image = bitback::qcow2::Image::open(&file).unwrap();
    let map = bitback::qcow2::map(&image).unwrap();
    let data = map
        .iter()
        .find(|e| e.kind == bitback::qcow2::Kind::Data)
        .unwrap();
    let at = data.offset.unwrap() as usize + 1000;
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[at] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    assert_caught(&vm, &ids, &file, "digest");
}

/// Bytes no reader of the image looks at (the header cluster's unused
/// tail) and the file's last bytes (a refcount block where bitback wrote
/// the file) are covered too: by the whole file's digest, or by the
/// layout digest bitback's own writer records beside the cluster map.
#[test]
fn verify_catches_a_flipped_byte_outside_the_data() {
    for place in ["header", "tail"] {
        let dir = tempdir();
        let (vm, ids) = chain_of_three(dir.path());
        let file = file_of(&vm, &ids[1]);
        let mut bytes = std::fs::read(&file).unwrap();
        let cs = 1usize << u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        let at = match place {
            "header" => cs - 100,
            _ => bytes.len() - 100,
        };
        bytes[at] ^= 0x04;
        std::fs::write(&file, &bytes).unwrap();
        if place == "header" {
            // Unused: QEMU finds nothing wrong.
            run(Command::new("qemu-img").args(["check", "-q"]).arg(&file));
        }
        assert_caught(&vm, &ids, &file, "digest");
    }
}

#[test]
fn verify_catches_a_truncated_file() {
    let dir = tempdir();
    let (vm, ids) = chain_of_three(dir.path());
    let file = file_of(&vm, &ids[0]);
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_caught(&vm, &ids, &file, "");
}

#[test]
fn verify_catches_backing_names_that_leave_the_chain() {
    for bad in ["ABSOLUTE", "../../x.qcow2"] {
        let dir = tempdir();
        let (vm, ids) = chain_of_three(dir.path());
        let file = file_of(&vm, &ids[2]);
        let name = if bad == "ABSOLUTE" {
            file_of(&vm, &ids[1]).display().to_string()
        } else {
            bad.to_string()
        };
        bitback::qcow2::set_backing(&file, Some(&name), Some("qcow2")).unwrap();
        assert_caught(&vm, &ids, &file, "backing file is");
    }
}

#[test]
fn verify_catches_a_deleted_middle_file() {
    let dir = tempdir();
    let (vm, ids) = chain_of_three(dir.path());
    let middle = file_of(&vm, &ids[1]);
    std::fs::remove_file(&middle).unwrap();
    assert_caught(&vm, &ids, &middle, "");
    // The file built on it says its backing file is missing.
    let report: Value = serde_json::from_str(
        &bitback(&["verify", "--repo", vm.repo.to_str().unwrap(), "--json"]).stdout,
    )
    .unwrap();
    let top = format!("vm1/{}/drive0.qcow2", ids[2]);
    assert!(
        report["problems"].as_array().unwrap().iter().any(
            |p| p["file"] == top.as_str() && p["problem"].as_str().unwrap().contains("missing")
        ),
        "{report:#}"
    );
    // The full alone still restores.
    let out = dir.path().join("first.raw");
    let r = vm.restore(&ids[0], &out, &[]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(same_content(&out, "raw", &vm.points[0].1[0], "raw"));
}

#[test]
fn a_damaged_file_of_one_volume_keeps_the_others_restorable() {
    let dir = tempdir();
    let d = dir.path();
    let mut vm = Vm::new(d, &[4 * MIB, 4 * MIB]);
    vm.write(0, 0, MIB, 0x31);
    vm.write(1, 0, MIB, 0x41);
    let full = vm.backup(&[])["id"].as_str().unwrap().to_string();
    vm.write(0, MIB, MIB, 0x32);
    vm.write(1, MIB, MIB, 0x42);
    let top = vm.backup(&[])["id"].as_str().unwrap().to_string();
    vm.quit();
    // drive1's full loses its magic.
    let damaged = vm.repo.join("vm1").join(&full).join("drive1.qcow2");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&damaged)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0; 4], 0).unwrap();
    drop(file);

    // drive0 is whole: it restores, with digests checked or not.
    for extra in [&[][..], &["--no-verify"][..]] {
        let out = d.join(format!("drive0{}.raw", extra.len()));
        let mut args = vec!["--volume", "drive0"];
        args.extend(extra);
        let r = vm.restore(&top, &out, &args);
        assert_eq!(r.code, Some(0), "{extra:?}: {}", r.stderr);
        assert!(same_content(&out, "raw", &vm.points[1].1[0], "raw"));
    }
    // drive1, or every volume, is refused naming the damaged file.
    let rel = format!("vm1/{full}/drive1.qcow2");
    for args in [&["--volume", "drive1"][..], &[][..]] {
        let out = d.join(format!("all{}", args.len()));
        let r = vm.restore(&top, &out, args);
        assert_ne!(r.code, Some(0), "{args:?}");
        assert!(r.stderr.contains(&rel), "{args:?}: {}", r.stderr);
        assert!(!out.exists(), "{args:?}: nothing written");
    }
}

#[test]
fn restore_never_overwrites_and_names_unknown_volumes() {
    let dir = tempdir();
    let (vm, _) = chain_of_three(dir.path());
    let out = dir.path().join("exists.raw");
    std::fs::write(&out, b"precious").unwrap();
    let r = vm.cli("restore", &["--output", out.to_str().unwrap()]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("does not overwrite"), "{}", r.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let r = vm.cli(
        "restore",
        &[
            "--volume",
            "nope",
            "--output",
            dir.path().join("x.raw").to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("has no volume nope"), "{}", r.stderr);
    let latest = dir.path().join("latest.raw");
    let r = vm.cli("restore", &["--output", latest.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(same_content(&latest, "raw", &vm.points[2].1[0], "raw"));
}

#[test]
fn in_place_restore_refuses_a_running_vm_and_clears_the_checkpoint() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[8 * MIB]);
    let mut ids = Vec::new();
    for i in 0..3u64 {
        vm.write(0, i * MIB, 256 * 1024, 0x60 + i as u8);
        ids.push(vm.backup(&[])["id"].as_str().unwrap().to_string());
    }
    let repo = vm.repo.to_str().unwrap().to_string();
    let image = vm.disks[0].image.to_str().unwrap().to_string();
    let args = |id: &str| -> Vec<String> {
        [
            "restore",
            "--repo",
            &repo,
            "--vm",
            "vm1",
            "--backup",
            id,
            "--in-place",
            "--image",
            &image,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let refused = bitback(&args(&ids[1]).iter().map(String::as_str).collect::<Vec<_>>());
    // Refused before anything ran: exit 2, as the README's rule says.
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("in use by a running QEMU"),
        "{}",
        refused.stderr
    );
    vm.quit();

    let done = bitback(&args(&ids[1]).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let restored = dir.path().join("disk0-as-raw.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&vm.disks[0].image)
        .arg(&restored));
    assert!(same_content(&restored, "raw", &vm.points[1].1[0], "raw"));
    let state: Value =
        serde_json::from_slice(&std::fs::read(vm.repo.join("vm1/state.json")).unwrap()).unwrap();
    assert_eq!(state["active_checkpoint"], Value::Null);

    // The disk no longer matches any bitmap: the next backup is full.
    vm.start();
    vm.models[0].bytes = std::fs::read(&vm.points[1].1[0]).unwrap();
    vm.write(0, 5 * MIB, 4096, 0x6f);
    let next = vm.backup(&[]);
    assert_eq!(next["kind"], "full");
    assert!(
        next["reason"]
            .as_str()
            .unwrap()
            .contains("no active checkpoint"),
        "{next:#}"
    );
    vm.quit();
    vm.check_all_points();

    // A raw image is written natively.
    let raw = dir.path().join("vm-disk.raw");
    std::fs::write(&raw, vec![0xeeu8; 8 * MIB as usize]).unwrap();
    let r = vm.cli(
        "restore",
        &[
            "--backup",
            &ids[2],
            "--in-place",
            "--image",
            raw.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("native"), "{}", r.stdout);
    assert!(same_content(&raw, "raw", &vm.points[2].1[0], "raw"));
}

/// Rewrites `file` with compressed clusters of `kind` (`zlib` or `zstd`):
/// the same guest view, over the same backing file.
fn recompress(file: &Path, kind: &str) {
    let info: Value = serde_json::from_slice(
        &run(Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(file))
        .stdout,
    )
    .unwrap();
    let out = file.with_extension("compressed");
    let mut cmd = Command::new("qemu-img");
    cmd.current_dir(file.parent().unwrap())
        .args(["convert", "-c", "-O", "qcow2", "-o"])
        .arg(format!("compression_type={kind}"));
    if let Some(backing) = info["backing-filename"].as_str() {
        cmd.args(["-B", backing, "-F", "qcow2"]);
    }
    run(cmd.arg(file).arg(&out));
    assert!(crate::harness::has_compressed_clusters(&out));
    std::fs::rename(&out, file).unwrap();
}

/// A chain of deflate and zstd clusters restores natively (no qemu-img),
/// to raw and to qcow2, equal to the model.
#[test]
fn compressed_chains_restore_natively() {
    let dir = tempdir();
    let (vm, ids) = chain_of_three(dir.path());
    recompress(&file_of(&vm, &ids[0]), "zlib");
    recompress(&file_of(&vm, &ids[1]), "zstd");
    for (point, format) in [(1, "raw"), (2, "raw"), (2, "qcow2")] {
        let out = dir.path().join(format!("native-{point}.{format}"));
        let r = vm.restore(
            &ids[point],
            &out,
            &["--format", format, "--no-verify", "--json"],
        );
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert!(r.stdout.contains("\"native\""), "{}", r.stdout);
        assert!(
            same_content(&out, format, &vm.points[point].1[0], "raw"),
            "point {point} as {format}"
        );
    }
    // Checked, the rewritten files are caught (their lengths are not the
    // recorded ones), naming one.
    let caught = vm.cli(
        "restore",
        &["--output", dir.path().join("x.raw").to_str().unwrap()],
    );
    assert_eq!(caught.code, Some(1), "{}", caught.stderr);
    assert!(
        caught.stderr.contains("written to since") && caught.stderr.contains("drive0.qcow2"),
        "{}",
        caught.stderr
    );
}

/// A restore proves what it copies with no verify run before: a data
/// byte flipped in the full, and (another chain) a cluster the full's
/// tables were made to hide (discarded behind bitback's back), are both
/// refused, naming the file, and leave no output; `--no-verify` copies
/// the flipped byte. On the default data path each cluster is checked
/// against the chain's cluster maps as it is copied; with QEMU writing
/// the files (no maps), every file's digest is read first.
#[test]
fn a_restore_refuses_damage_no_verify_has_found_yet() {
    let dir = tempdir();
    for damage in ["flipped byte", "hidden cluster"] {
        let d = dir.path().join(damage.replace(' ', "-"));
        std::fs::create_dir(&d).unwrap();
        let (vm, ids) = chain_of_three(&d);
        let full = file_of(&vm, &ids[0]);
        let map = run(Command::new("qemu-img")
            .args(["map", "--output=json"])
            .arg(&full));
        let map: Value = serde_json::from_slice(&map.stdout).unwrap();
        let data = map
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["data"] == true && e["offset"].is_u64())
            .expect("a data cluster in the full")
            .clone();
        match damage {
            "flipped byte" => {
                let at = data["offset"].as_u64().unwrap() + 300;
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&full)
                    .unwrap();
                let mut byte = [0u8];
                std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, at).unwrap();
                std::os::unix::fs::FileExt::write_all_at(&file, &[byte[0] ^ 0x40], at).unwrap();
            }
            _ => {
                let start = data["start"].as_u64().unwrap();
                run(Command::new("qemu-io")
                    .args(["-f", "qcow2", "-c"])
                    .arg(format!("discard {start} 65536"))
                    .arg(&full));
            }
        }
        let out = d.join("out.raw");
        let refused = vm.restore(ids.last().unwrap(), &out, &[]);
        assert_eq!(refused.code, Some(1), "{damage}: {}", refused.stderr);
        assert!(
            refused.stderr.contains("drive0.qcow2"),
            "{damage}: {}",
            refused.stderr
        );
        assert!(!out.exists(), "{damage}: an output was left");
        let names: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("restoring"))
            .collect();
        assert!(names.is_empty(), "{damage}: {names:?}");
        if damage == "flipped byte" {
            let told = vm.restore(ids.last().unwrap(), &out, &["--no-verify"]);
            assert_eq!(told.code, Some(0), "{}", told.stderr);
            assert!(!same_content(&out, "raw", &vm.points[2].1[0], "raw"));
        }
    }
}

/// `verify --outdated-after`: a backup that verified whole is not read
/// again within the age, and is once the clock has moved past it
/// (BITBACK_CLOCK_OFFSET); one with damage recorded is always read.
#[test]
fn verify_outdated_after_reads_only_what_was_not_verified_lately() {
    let dir = tempdir();
    let (vm, ids) = chain_of_three(dir.path());
    let repo = vm.repo.to_str().unwrap().to_string();
    let verify = |extra: &[&str], offset: &str| -> (Option<i32>, Value) {
        let mut args = vec!["verify", "--repo", &repo, "--json"];
        args.extend(extra);
        let run = crate::harness::bitback_env(&args, &[("BITBACK_CLOCK_OFFSET", offset)]);
        let report: Value = serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}{}", run.stdout, run.stderr));
        (run.code, report)
    };
    let counts = |r: &Value| (r["backups"].as_u64(), r["skipped"].as_u64());
    let age = ["--outdated-after", "1d"];
    let (code, r) = verify(&age, "0");
    assert_eq!((code, counts(&r)), (Some(0), (Some(3), None)), "{r}");
    let (code, r) = verify(&age, "0");
    assert_eq!((code, counts(&r)), (Some(0), (Some(0), Some(3))), "{r}");
    // Two days on: read again.
    let later = (2 * 86_400).to_string();
    let (code, r) = verify(&age, &later);
    assert_eq!((code, counts(&r)), (Some(0), (Some(3), None)), "{r}");

    // Damage found by a full verify is read on every verify after.
    let file = file_of(&vm, &ids[1]);
    let image = bitback::qcow2::Image::open(&file).unwrap();
    let data = bitback::qcow2::map(&image)
        .unwrap()
        .into_iter()
        .find(|e| e.kind == bitback::qcow2::Kind::Data)
        .unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[data.offset.unwrap() as usize + 1000] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let (code, r) = verify(&[], &later);
    assert_eq!(code, Some(1), "{r}");
    let (code, r) = verify(&age, &later);
    assert_eq!((code, counts(&r)), (Some(1), (Some(1), Some(2))), "{r}");
    assert!(
        r["problems"][0]["file"].as_str().unwrap().contains(&ids[1]),
        "{r}"
    );
}

/// `verify --sample`: a share of the data clusters, enough to find rot
/// spread over a file; never recorded as a whole verify.
#[test]
fn verify_sample_finds_spread_rot_and_never_counts_as_whole() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[16 * MIB]);
    vm.write(0, 0, 8 * MIB, 0x5a);
    let id = vm.backup(&[])["id"].as_str().unwrap().to_string();
    vm.quit();
    let repo = vm.repo.to_str().unwrap().to_string();
    let verify = |extra: &[&str]| -> (Option<i32>, Value) {
        let mut args = vec!["verify", "--repo", &repo, "--json"];
        args.extend(extra);
        let run = bitback(&args);
        let report: Value = serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}{}", run.stdout, run.stderr));
        (run.code, report)
    };
    let (code, r) = verify(&["--sample", "5"]);
    assert_eq!(code, Some(0), "{r}");
    // Sampled: not recorded as verified whole, so an --outdated-after
    // verify reads it.
    let (code, r) = verify(&["--outdated-after", "1d"]);
    assert_eq!((code, r["backups"].as_u64()), (Some(0), Some(1)), "{r}");

    // Rot in 40 of the 128 data clusters: a 25% sample misses all of
    // them once in 100,000 runs.
    let file = file_of(&vm, &id);
    let image = bitback::qcow2::Image::open(&file).unwrap();
    let data: Vec<u64> = bitback::qcow2::map(&image)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == bitback::qcow2::Kind::Data)
        .flat_map(|e| {
            let first = e.offset.unwrap();
            (0..e.length / 65536).map(move |k| first + k * 65536)
        })
        .collect();
    assert_eq!(data.len(), 128);
    let mut bytes = std::fs::read(&file).unwrap();
    for host in data.iter().step_by(3).take(40) {
        bytes[*host as usize + 77] ^= 0x01;
    }
    std::fs::write(&file, &bytes).unwrap();
    let (code, r) = verify(&["--sample", "25"]);
    assert_eq!(code, Some(1), "the sample missed the rot: {r}");
    assert!(
        r["problems"][0]["file"].as_str().unwrap().contains(&id),
        "{r}"
    );
    let bad = bitback(&["verify", "--repo", &repo, "--sample", "0"]);
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
}
