//! The native qcow2 module against QEMU's own tools: fixtures made by
//! qemu-img and qemu-io (fixtures/qcow2.sh), judged by `qemu-img info`,
//! `qemu-img map`, `qemu-img check`, `qemu-img rebase -u` and real QEMU.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bitback::qcow2::{self, CreateOptions, Image};
use serde_json::{Value, json};

use crate::harness::{
    Disk, Kind, Qemu, Rng, bitback, create_qcow2, images_equal, require, run, same_content, tempdir,
};

const MIB: u64 = 1 << 20;
const LUKS_SECRET: &str = "bitback-test";

/// Makes every fixture in `dir`; returns their paths.
fn fixtures(dir: &Path) -> Vec<PathBuf> {
    require("qemu-img");
    require("qemu-io");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qcow2.sh");
    let out = run(Command::new("bash").arg(script).arg(dir));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|name| dir.join(name))
        .collect()
}

fn is_luks(path: &Path) -> bool {
    path.file_name().unwrap().to_str().unwrap().contains("luks")
}

/// `qemu-img SUBCOMMAND --output=json` on `path`, opening LUKS images with
/// their secret.
fn qemu_img_json(subcommand: &str, path: &Path) -> Value {
    let mut cmd = Command::new("qemu-img");
    // Relative data file names resolve against the working directory.
    cmd.current_dir(path.parent().unwrap());
    cmd.args([subcommand, "--output=json", "-U"]);
    if is_luks(path) {
        cmd.args([
            "--object",
            &format!("secret,id=sec0,data={LUKS_SECRET}"),
            "--image-opts",
            &format!(
                "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
                path.display()
            ),
        ]);
    } else {
        cmd.arg(path);
    }
    let out = run(&mut cmd);
    serde_json::from_slice(&out.stdout).expect("qemu-img prints JSON")
}

fn bitback_json(args: &[&str]) -> Value {
    bitback(args).json()
}

/// Every field qemu-img reports (but its `children` and, for --image-opts,
/// the filename it prints as a JSON spec) must be in ours with the same
/// value, and ours must not report fields qemu-img does not.
fn assert_info_agrees(path: &Path, ours: &Value, theirs: &Value) {
    let mut ours = ours.clone();
    // qemu-img before 8.x has no `detached-header` for LUKS: compare what
    // the installed version reports.
    let theirs_encrypt = &theirs["format-specific"]["data"]["encrypt"];
    if theirs_encrypt.is_object() && theirs_encrypt.get("detached-header").is_none() {
        if let Some(encrypt) = ours["format-specific"]["data"]["encrypt"].as_object_mut() {
            encrypt.remove("detached-header");
        }
    }
    let ours = ours.as_object().unwrap();
    let theirs = theirs.as_object().unwrap();
    for (key, value) in theirs {
        if key == "children" || (key == "filename" && is_luks(path)) {
            continue;
        }
        assert_eq!(
            ours.get(key),
            Some(value),
            "{}: field {key} differs\nours:   {:#}\nqemu-img: {:#}",
            path.display(),
            ours.get(key).unwrap_or(&Value::Null),
            value
        );
    }
    for key in ours.keys() {
        assert!(
            key == "bitback" || theirs.contains_key(key),
            "{}: bitback reports {key}, qemu-img does not",
            path.display()
        );
    }
}

#[test]
fn info_agrees_with_qemu_img_for_every_fixture() {
    let dir = tempdir();
    let images = fixtures(dir.path());
    assert!(images.len() >= 20, "{images:?}");
    for path in &images {
        let ours = bitback_json(&["qcow2", "info", "--json", path.to_str().unwrap()]);
        let theirs = qemu_img_json("info", path);
        assert_info_agrees(path, &ours, &theirs);
    }
}

/// A map entry reduced to what both tools must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Range {
    start: u64,
    length: u64,
    kind: &'static str,
    offset: Option<u64>,
}

fn merge(ranges: Vec<Range>) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::new();
    for r in ranges {
        if let Some(last) = out.last_mut() {
            let contiguous = match (last.offset, r.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + last.length == b,
                _ => false,
            };
            if last.kind == r.kind && last.start + last.length == r.start && contiguous {
                last.length += r.length;
                continue;
            }
        }
        out.push(r);
    }
    out
}

/// qemu-img map follows the backing chain; for this file alone, anything
/// from a deeper layer, or not present, is unallocated here.
fn classify_qemu(entry: &Value) -> Range {
    let depth = entry["depth"].as_u64().unwrap();
    let present = entry["present"].as_bool().unwrap();
    let (kind, offset) = if depth > 0 || !present {
        ("unallocated", None)
    } else if entry["compressed"].as_bool() == Some(true)
        // qemu-img before 8.x says nothing of compression, and gives a
        // compressed cluster's data no offset.
        || (entry.get("compressed").is_none()
            && entry["data"].as_bool() == Some(true)
            && entry.get("offset").is_none())
    {
        ("compressed", None)
    } else if entry["data"].as_bool().unwrap() {
        ("data", entry["offset"].as_u64())
    } else {
        ("zero", entry["offset"].as_u64())
    };
    Range {
        start: entry["start"].as_u64().unwrap(),
        length: entry["length"].as_u64().unwrap(),
        kind,
        offset,
    }
}

fn classify_ours(entry: &Value) -> Range {
    let kind = match entry["kind"].as_str().unwrap() {
        "data" => "data",
        "zero" => "zero",
        "unallocated" => "unallocated",
        "compressed" => "compressed",
        other => panic!("unknown kind {other}"),
    };
    Range {
        start: entry["start"].as_u64().unwrap(),
        length: entry["length"].as_u64().unwrap(),
        kind,
        // qemu-img does not give compressed clusters an offset.
        offset: if kind == "compressed" {
            None
        } else {
            entry["offset"].as_u64()
        },
    }
}

#[test]
fn map_agrees_with_qemu_img_for_every_fixture() {
    let dir = tempdir();
    for path in fixtures(dir.path()) {
        let ours = bitback_json(&["qcow2", "map", "--json", path.to_str().unwrap()]);
        let theirs = qemu_img_json("map", &path);
        let ours = merge(ours.as_array().unwrap().iter().map(classify_ours).collect());
        let theirs = merge(
            theirs
                .as_array()
                .unwrap()
                .iter()
                .map(classify_qemu)
                .collect(),
        );
        assert_eq!(ours, theirs, "{}", path.display());
        let size = Image::open(&path).unwrap().header().size;
        assert_eq!(ours.iter().map(|r| r.length).sum::<u64>(), size);
    }
}

#[test]
fn map_of_a_sparse_terabyte_is_one_range() {
    let dir = tempdir();
    let path = dir.path().join("big.qcow2");
    create_qcow2(&path, 1 << 40, &[]);
    let map = bitback_json(&["qcow2", "map", "--json", path.to_str().unwrap()]);
    assert_eq!(
        map,
        json!([{"start": 0, "length": 1u64 << 40, "kind": "unallocated"}])
    );
}

#[test]
fn bitmaps_held_by_a_running_qemu_are_in_use() {
    let dir = tempdir();
    let image = dir.path().join("held.qcow2");
    create_qcow2(&image, 8 * MIB, &[]);
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&image)
        .arg("b0"));
    let path = image.to_str().unwrap();
    let check = |expect_code: i32| -> Value {
        let run = bitback(&["qcow2", "bitmaps", path, "--name", "b0", "--json"]);
        assert_eq!(run.code, Some(expect_code), "{}{}", run.stdout, run.stderr);
        serde_json::from_str(&run.stdout).unwrap()
    };
    assert_eq!(check(0)["usable"], true);

    let mut qemu = Qemu::start(
        Kind::MachineNone,
        dir.path(),
        &[Disk::new("d", "drive0", &image)],
    );
    let held = check(1);
    assert_eq!(held["present"], true);
    assert_eq!(held["in_use"], true);
    assert_eq!(held["consistent"], true);
    // While QEMU holds it, info agrees with qemu-img -U, and rebase refuses.
    let ours = bitback_json(&["qcow2", "info", "--json", path]);
    assert_info_agrees(&image, &ours, &qemu_img_json("info", &image));
    assert_eq!(
        ours["format-specific"]["data"]["bitmaps"][0]["flags"],
        json!(["in-use", "auto"])
    );
    let refused = bitback(&[
        "qcow2",
        "rebase",
        path,
        "--backing",
        "x.qcow2",
        "--backing-format",
        "qcow2",
    ]);
    assert_eq!(refused.code, Some(2));
    assert!(refused.stderr.contains("in use"), "{}", refused.stderr);

    // Killed, QEMU leaves the flag set: the bitmap is stale for good.
    qemu.kill();
    let stale = check(1);
    assert_eq!(stale["in_use"], true);
    let listing = bitback(&["qcow2", "bitmaps", path]);
    assert!(listing.stdout.contains("in-use"), "{}", listing.stdout);
}

#[test]
fn a_cleanly_closed_image_has_usable_bitmaps() {
    let dir = tempdir();
    let image = dir.path().join("clean.qcow2");
    create_qcow2(&image, 8 * MIB, &[]);
    let qemu = Qemu::start(
        Kind::MachineNone,
        dir.path(),
        &[Disk::new("d", "drive0", &image)],
    );
    qemu.add_bitmap("drive0", "persisted", true);
    qemu.add_bitmap("drive0", "transient", false);
    qemu.quit();
    let img = Image::open(&image).unwrap();
    assert!(img.bitmap_status("persisted").usable());
    assert!(!img.bitmap_status("transient").present);
    assert!(img.bitmaps_consistent());
}

/// `qemu-img info` less what must differ between two files: their names,
/// and their allocation (qemu-img rebase opens the image read-write, and
/// QEMU stores the bitmaps anew on close, in newly allocated clusters).
fn info_for_comparison(path: &Path) -> Value {
    let mut info = qemu_img_json("info", path);
    let obj = info.as_object_mut().unwrap();
    for key in ["filename", "children", "actual-size"] {
        obj.remove(key);
    }
    info
}

/// `qemu-img check` of the file alone: its backing file need not exist.
fn qemu_img_check_clean(path: &Path) {
    let mut spec = json!({
        "driver": "qcow2",
        "file": {"driver": "file", "filename": path},
        "backing": null,
    });
    if is_luks(path) {
        spec["encrypt"] = json!({"key-secret": "sec0"});
    }
    let out = Command::new("qemu-img")
        .current_dir(path.parent().unwrap())
        .args([
            "check",
            "-U",
            "--object",
            &format!("secret,id=sec0,data={LUKS_SECRET}"),
        ])
        .arg(format!("json:{spec}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn rebase_matches_qemu_img_rebase_unsafe_over_random_sequences() {
    let dir = tempdir();
    let images = fixtures(dir.path());
    let candidates: Vec<&PathBuf> = images
        .iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            [
                "bitmaps", "external", "over-rel", "v2-over", "v2.", "cs-512.", "cs-2M", "ext-l2.",
                "zstd", "luks", "lazy",
            ]
            .iter()
            .any(|prefix| name.starts_with(prefix))
        })
        .collect();
    assert!(candidates.len() >= 10, "{candidates:?}");
    let mut rng = Rng::from_env();
    let names = [
        "base.qcow2".to_string(),
        "../elsewhere/base.qcow2".to_string(),
        dir.path().join("base.qcow2").display().to_string(),
        format!("{}.qcow2", "n".repeat(300)),
        format!("deep/{}/x.qcow2", "d".repeat(900)),
        "name with spaces.qcow2".to_string(),
        "ünïcode.qcow2".to_string(),
    ];
    let formats = ["qcow2", "raw"];
    for round in 0..40 {
        let source = rng.pick(&candidates);
        let source_name = source.file_name().unwrap().to_str().unwrap();
        let ours = dir.path().join(format!("ours-{round}-{source_name}"));
        let theirs = dir.path().join(format!("theirs-{round}-{source_name}"));
        std::fs::copy(source, &ours).unwrap();
        std::fs::copy(source, &theirs).unwrap();
        for step in 0..1 + rng.below(4) {
            let remove = rng.below(4) == 0;
            let (name, format) = if remove {
                (String::new(), None)
            } else {
                (rng.pick(&names).clone(), Some(*rng.pick(&formats)))
            };
            let mut args = vec![
                "qcow2",
                "rebase",
                ours.to_str().unwrap(),
                "--backing",
                &name,
            ];
            if let Some(f) = format {
                args.extend(["--backing-format", f]);
            }
            let mine = bitback(&args);
            let mut cmd = Command::new("qemu-img");
            cmd.args(["rebase", "-u", "-b", &name]);
            if let Some(f) = format {
                cmd.args(["-F", f]);
            }
            if is_luks(&theirs) {
                cmd.args([
                    "--object",
                    &format!("secret,id=sec0,data={LUKS_SECRET}"),
                    "--image-opts",
                    &format!(
                        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
                        theirs.display()
                    ),
                ]);
            } else {
                cmd.arg(&theirs);
            }
            let qemu = cmd.current_dir(dir.path()).output().unwrap();
            let context = format!(
                "round {round} step {step}: {} -> {name:?} {format:?}\nbitback: {}\nqemu-img: {}",
                source.display(),
                mine.stderr,
                String::from_utf8_lossy(&qemu.stderr)
            );
            assert_eq!(mine.code == Some(0), qemu.status.success(), "{context}");
            if !qemu.status.success() {
                assert!(
                    mine.stderr.contains("first cluster") || mine.stderr.contains("data-file-raw"),
                    "{context}"
                );
            }
            assert_eq!(
                info_for_comparison(&ours),
                info_for_comparison(&theirs),
                "{context}"
            );
        }
        qemu_img_check_clean(&ours);
    }
}

/// Persistent bitmaps survive native rebases and still drive an
/// incremental backup in a real QEMU, into a natively created target.
#[test]
fn bitmaps_survive_rebase_and_carry_an_incremental() {
    let dir = tempdir();
    let d = dir.path();
    let disk = d.join("disk.qcow2");
    let empty = d.join("empty.qcow2");
    let full = d.join("full.qcow2");
    create_qcow2(&disk, 16 * MIB, &[]);
    create_qcow2(&empty, 16 * MIB, &[]);
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x10 0 4M",
            "-c",
            "write -P 0x11 9M 1M",
        ])
        .arg(&disk));
    // The full backup's point in time, then a checkpoint bitmap.
    run(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&disk)
        .arg(&full));
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&disk)
        .arg("b0"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x20 1M 64k",
            "-c",
            "write -z 9M 128k",
            "-c",
            "write -P 0x21 15M 4k",
        ])
        .arg(&disk));

    // Rebases that leave the guest view unchanged (the new backing is
    // empty), ending with a backing file set.
    qcow2::set_backing(&disk, Some("empty.qcow2"), Some("qcow2")).unwrap();
    qcow2::set_backing(&disk, None, None).unwrap();
    qcow2::set_backing(&disk, Some(empty.to_str().unwrap()), Some("qcow2")).unwrap();
    qcow2::set_backing(&disk, Some("./empty.qcow2"), Some("qcow2")).unwrap();
    qemu_img_check_clean(&disk);
    let status = Image::open(&disk).unwrap().bitmap_status("b0");
    assert!(status.usable(), "{status:?}");

    let target = d.join("incr.qcow2");
    qcow2::create(
        &target,
        &CreateOptions {
            size: 16 * MIB,
            backing: Some("full.qcow2"),
            backing_format: Some("qcow2"),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    qemu_img_check_clean(&target);

    let qemu = Qemu::start(Kind::MachineNone, d, &[Disk::new("d", "drive0", &disk)]);
    let nodes = qemu.must("query-named-block-nodes", json!({"flat": true}));
    let b0 = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["node-name"] == "drive0")
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .find(|b| b["name"] == "b0")
        .expect("QEMU loaded bitmap b0");
    assert_eq!(b0["persistent"], true);
    assert_eq!(b0["recording"], true);
    assert!(b0.get("inconsistent").is_none_or(|v| v == false), "{b0}");
    // 64k at 1M, 128k at 9M, 4k at 15M: four 64 KiB chunks.
    assert_eq!(b0["count"], 4 * 65536, "{b0}");

    qemu.must(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "incr", "backing": null,
               "file": {"driver": "file", "filename": target}}),
    );
    qemu.must(
        "blockdev-backup",
        json!({"job-id": "incr", "device": "drive0", "target": "incr", "sync": "bitmap",
               "bitmap": "b0", "bitmap-mode": "never"}),
    );
    qemu.wait_jobs_done(Duration::from_secs(30));
    qemu.must("blockdev-del", json!({"node-name": "incr"}));
    qemu.quit();
    qemu_img_check_clean(&target);
    assert!(
        images_equal(&target, &disk),
        "incremental over full != disk"
    );
    // The incremental holds only the dirty chunks.
    let map = qcow2::map(&Image::open(&target).unwrap()).unwrap();
    let held: u64 = map
        .iter()
        .filter(|e| e.kind != qcow2::Kind::Unallocated)
        .map(|e| e.length)
        .sum();
    assert_eq!(held, 4 * 65536, "{map:?}");
}

#[test]
fn created_images_are_clean_and_as_requested() {
    let dir = tempdir();
    // qemu-img check opens backing files: make them.
    let d = dir.path();
    create_qcow2(&d.join("base.qcow2"), MIB, &[]);
    std::fs::create_dir(d.join("p")).unwrap();
    std::fs::create_dir(d.join("q")).unwrap();
    create_qcow2(&d.join("p/x.qcow2"), MIB, &[]);
    std::fs::write(d.join("base.raw"), b"").unwrap();
    let absolute = d.join("base.raw").display().to_string();
    // (virtual size, cluster size, backing (name, format), directory)
    type Case<'a> = (u64, u64, Option<(&'a str, &'a str)>, &'a str);
    let cases: &[Case] = &[
        (MIB, 512, None, "."),
        (1 << 30, 512, None, "."),
        (10 << 30, 4096, Some(("base.qcow2", "qcow2")), "."),
        (512, 65536, None, "."),
        (0, 65536, None, "."),
        ((1 << 40) + 512, 65536, Some((&absolute, "raw")), "."),
        (64 << 40, 2 << 20, None, "."),
        (5 * MIB + 512, 2 << 20, Some(("../p/x.qcow2", "qcow2")), "q"),
    ];
    for (i, &(size, cluster_size, backing, subdir)) in cases.iter().enumerate() {
        let path = if subdir == "." {
            d.join(format!("created-{i}.qcow2"))
        } else {
            d.join(subdir).join(format!("created-{i}.qcow2"))
        };
        qcow2::create(
            &path,
            &CreateOptions {
                size,
                cluster_size,
                backing: backing.map(|b| b.0),
                backing_format: backing.map(|b| b.1),
            },
        )
        .unwrap();
        qemu_img_check_clean(&path);
        let info = qemu_img_json("info", &path);
        assert_eq!(info["virtual-size"], size, "{info:#}");
        assert_eq!(info["cluster-size"], cluster_size, "{info:#}");
        assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
        match backing {
            Some((name, format)) => {
                assert_eq!(info["backing-filename"], name);
                assert_eq!(info["backing-filename-format"], format);
            }
            None => assert!(info.get("backing-filename").is_none()),
        }
        let ours = bitback_json(&["qcow2", "info", "--json", path.to_str().unwrap()]);
        assert_info_agrees(&path, &ours, &info);
    }
    let exists = qcow2::create(
        &dir.path().join("created-0.qcow2"),
        &CreateOptions {
            size: MIB,
            ..CreateOptions::default()
        },
    );
    assert!(
        matches!(exists, Err(qcow2::Error::AlreadyExists { .. })),
        "{exists:?}"
    );
    let odd = qcow2::create(
        &dir.path().join("odd.qcow2"),
        &CreateOptions {
            size: MIB + 3,
            ..CreateOptions::default()
        },
    );
    assert!(matches!(odd, Err(qcow2::Error::BadSize { .. })), "{odd:?}");
    assert!(!dir.path().join("odd.qcow2").exists());
}

#[test]
fn created_images_are_full_backup_targets() {
    let dir = tempdir();
    let d = dir.path();
    let disk = d.join("disk.qcow2");
    create_qcow2(&disk, 24 * MIB, &[]);
    let qemu = Qemu::start(Kind::MachineNone, d, &[Disk::new("d", "drive0", &disk)]);
    qemu.qemu_io("drive0", "write -P 0x61 0 3M");
    qemu.qemu_io("drive0", "write -P 0x62 20M 512k");
    let mut targets = Vec::new();
    for (i, cluster_size) in [512u64, 65536, 2 << 20].into_iter().enumerate() {
        let target = d.join(format!("target-{cluster_size}.qcow2"));
        let created = bitback(&[
            "qcow2",
            "create",
            target.to_str().unwrap(),
            "--size",
            "24M",
            "--cluster-size",
            &cluster_size.to_string(),
        ]);
        assert_eq!(created.code, Some(0), "{}", created.stderr);
        let node = format!("t{i}");
        qemu.must(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": node,
                   "file": {"driver": "file", "filename": target}}),
        );
        qemu.must(
            "blockdev-backup",
            json!({"job-id": format!("job{i}"), "device": "drive0", "target": node, "sync": "full"}),
        );
        targets.push((node, target));
    }
    qemu.wait_jobs_done(Duration::from_secs(60));
    for (node, _) in &targets {
        qemu.must("blockdev-del", json!({"node-name": node}));
    }
    qemu.quit();
    for (_, target) in &targets {
        qemu_img_check_clean(target);
        assert!(images_equal(&disk, target), "{}", target.display());
    }
}

#[test]
fn rebase_refuses_dirty_images_and_headers_that_do_not_fit() {
    let dir = tempdir();
    let path = dir.path().join("small.qcow2");
    create_qcow2(&path, MIB, &["-o", "cluster_size=512"]);
    let long = "x".repeat(1000);
    let err = qcow2::set_backing(&path, Some(&long), Some("qcow2")).unwrap_err();
    assert!(
        matches!(err, qcow2::Error::HeaderDoesNotFit { .. }),
        "{err}"
    );
    let err = qcow2::set_backing(&path, Some(&"y".repeat(1024)), Some("qcow2")).unwrap_err();
    assert!(
        matches!(
            err,
            qcow2::Error::BackingNameTooLong { .. } | qcow2::Error::HeaderDoesNotFit { .. }
        ),
        "{err}"
    );
    let err = qcow2::set_backing(&path, None, Some("qcow2")).unwrap_err();
    assert!(matches!(err, qcow2::Error::FormatWithoutBacking), "{err}");
    let err = qcow2::set_backing(&path, Some("a\0b"), Some("qcow2")).unwrap_err();
    assert!(matches!(err, qcow2::Error::BadName { .. }), "{err}");
    qemu_img_check_clean(&path);

    // Set the dirty bit by hand (incompatible_features, bit 0).
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[79] |= 1;
    std::fs::write(&path, &bytes).unwrap();
    let err = qcow2::set_backing(&path, Some("b.qcow2"), Some("qcow2")).unwrap_err();
    assert!(
        matches!(err, qcow2::Error::Unsafe { flag: "dirty" }),
        "{err}"
    );
    let info = bitback_json(&["qcow2", "info", "--json", path.to_str().unwrap()]);
    assert_eq!(info["dirty-flag"], true);
}

#[test]
fn rebase_cli_requires_a_format_and_names_the_file() {
    let dir = tempdir();
    let path = dir.path().join("a.qcow2");
    create_qcow2(&path, MIB, &[]);
    let p = path.to_str().unwrap();
    let run = bitback(&["qcow2", "rebase", p, "--backing", "b.qcow2"]);
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains("--backing-format is required"),
        "{}",
        run.stderr
    );
    let missing = dir.path().join("missing.qcow2");
    let run = bitback(&["qcow2", "info", missing.to_str().unwrap()]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("missing.qcow2"), "{}", run.stderr);
    let text = dir.path().join("text.qcow2");
    std::fs::write(&text, "not an image at all, just some text\n".repeat(10)).unwrap();
    let run = bitback(&["qcow2", "info", text.to_str().unwrap()]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("not a qcow2 image"), "{}", run.stderr);
}

/// At least 10,000 mutated images through the parser and the cluster map,
/// in memory: errors are fine, panics are not.
#[test]
fn mutated_headers_never_panic() {
    let dir = tempdir();
    let seeds: Vec<Vec<u8>> = fixtures(dir.path())
        .iter()
        .filter(|p| std::fs::metadata(p).unwrap().len() <= 4 * MIB)
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    // Deterministic unless BITBACK_SEED says otherwise: a failure here
    // must replay.
    let mut rng = Rng::from_env_or(0x5eed_b17b_acc0);
    // Where each seed's structures start (offsets its first cluster names:
    // L1 and refcount tables, the bitmap directory, the LUKS header at
    // 256 KiB...): mutations go there too, not only to the first KiB.
    let anchors: Vec<Vec<usize>> = seeds
        .iter()
        .map(|bytes| {
            (0..bytes.len().min(4096).saturating_sub(8))
                .step_by(4)
                .filter_map(|at| {
                    let v = u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
                    (v >= 512 && v % 512 == 0 && v < bytes.len() as u64).then_some(v as usize)
                })
                .collect()
        })
        .collect();
    let interesting: [u64; 10] = [
        0,
        1,
        7,
        512,
        0xffff_ffff,
        0x8000_0000,
        u64::MAX,
        u64::MAX / 2,
        1 << 40,
        0x00ff_ffff_ffff_fe00,
    ];
    let mut parsed = 0;
    let iterations = 12_000;
    for _ in 0..iterations {
        let which = rng.below(seeds.len() as u64) as usize;
        let mut bytes = seeds[which].clone();
        // The header cluster, a structure's first KiB, or anywhere.
        let (base, region) = match rng.below(4) {
            0 => (0, bytes.len() as u64),
            1 if !anchors[which].is_empty() => (*rng.pick(&anchors[which]), 1024),
            _ => (0, bytes.len().min(1024) as u64),
        };
        for _ in 0..1 + rng.below(6) {
            if base >= bytes.len() {
                break;
            }
            let span = region.min((bytes.len() - base) as u64);
            let at = base + rng.below(span) as usize;
            match rng.below(4) {
                0 => bytes[at] ^= 1 << rng.below(8),
                1 => bytes[at] = rng.next() as u8,
                2 => {
                    let value = rng.pick(&interesting).to_be_bytes();
                    let width = *rng.pick(&[2usize, 4, 8]);
                    let end = (at + width).min(bytes.len());
                    bytes[at..end].copy_from_slice(&value[8 - (end - at)..]);
                }
                _ => bytes.truncate(at.max(1)),
            }
            if bytes.is_empty() {
                break;
            }
        }
        let image = Image::parse(bytes.as_slice(), Path::new("/fuzz/x.qcow2"));
        if let Ok(image) = image {
            parsed += 1;
            let _ = image.info();
            let _ = image.bitmap_status("b0");
            let _ = qcow2::walk(bytes.as_slice(), &image, |_| Ok(()));
        }
    }
    // The mutations must not be so wild that nothing parses.
    assert!(
        parsed > iterations / 20,
        "only {parsed} of {iterations} parsed"
    );
}

/// QEMU ends a file where its last compressed cluster's data ends, inside
/// a sector, while the cluster's length counts whole sectors: the map
/// accepts it (it refused such files once, and so every backup QEMU
/// compressed), and a cluster that starts past the end is still refused.
#[test]
fn a_compressed_cluster_ending_the_file_inside_a_sector_maps() {
    let dir = tempdir();
    let path = dir.path().join("c.qcow2");
    create_qcow2(&path, 1 << 20, &[]);
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -c -P 0x11 0 64k"])
        .arg(&path));
    let len = std::fs::metadata(&path).unwrap().len();
    assert_ne!(len % 512, 0, "the file should end inside a sector");
    let map = bitback_json(&["qcow2", "map", path.to_str().unwrap(), "--json"]);
    assert_eq!(map[0]["kind"], "compressed", "{map}");
    // Cut inside the cluster's first byte range: the start is gone.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(map[0]["offset"].as_u64().unwrap()).unwrap();
    let cut = bitback(&["qcow2", "map", path.to_str().unwrap(), "--json"]);
    assert_eq!(cut.code, Some(2), "{}", cut.stdout);
    assert!(cut.stderr.contains("past the end"), "{}", cut.stderr);
}

/// Zeros over a large range cost the streaming writer no table: written
/// where nothing shows through (a full's holes), they leave no L2 table
/// in the file; over a backing file, the zero clusters' tables are
/// written, one per 512 MiB, and both images read as qemu-img says.
#[test]
fn the_streaming_writer_keeps_no_table_for_zeros_where_nothing_shows_through() {
    let dir = tempdir();
    let cs = 65536;
    let size = 4 << 30;
    for backing in [None, Some("base.qcow2")] {
        let path = dir
            .path()
            .join(format!("zeros-{}.qcow2", backing.is_some()));
        let mut image = qcow2::Stream::create(
            &path,
            &CreateOptions {
                size,
                cluster_size: cs,
                backing,
                backing_format: backing.map(|_| "qcow2"),
            },
        )
        .unwrap();
        image.write(0, &vec![0x5a; cs as usize]).unwrap();
        let mut at = cs;
        while at < size {
            let n = (size - at).min(1 << 30);
            image.write_zeroes(at, n).unwrap();
            at += n;
        }
        let done = image.finish().unwrap();
        // Header, one data cluster, L1, refcount table and block, and the
        // L2 tables: one (the data's) without a backing file, eight with.
        let tables = if backing.is_some() { 8 } else { 1 };
        assert_eq!(done.len, (5 + tables) * cs, "backing {backing:?}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), done.len);
        if backing.is_some() {
            create_qcow2(&dir.path().join("base.qcow2"), size, &[]);
            run(Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", "write -P 0x33 0 8M"])
                .arg(dir.path().join("base.qcow2")));
        }
        run(Command::new("qemu-img").args(["check", "-q"]).arg(&path));
        let map = qemu_img_json("map", &path);
        let data: Vec<&Value> = map
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true)
            .collect();
        // Only the written cluster holds data: the backing file's 8 MiB
        // are hidden by zero clusters.
        assert_eq!(data.len(), 1, "{map}");
        assert_eq!(
            (data[0]["start"].as_u64(), data[0]["length"].as_u64()),
            (Some(0), Some(cs))
        );
    }
}

/// What a tap of the streaming writer was shown: the file rebuilt from it.
#[derive(Default)]
struct Shown {
    bytes: Vec<u8>,
    /// The header cluster (at 0) was shown: nothing may follow it.
    header: bool,
}

/// A tap that rebuilds the file and checks that it was only appended to,
/// its header cluster last.
#[derive(Clone, Default)]
struct Follower(std::sync::Arc<std::sync::Mutex<Shown>>);

impl qcow2::Tap for Follower {
    fn written(&mut self, at: u64, bytes: &[u8]) {
        let mut shown = self.0.lock().unwrap();
        assert!(!shown.header, "a write at {at} after the header");
        if at == 0 {
            shown.header = true;
        } else {
            assert!(
                at >= shown.bytes.len() as u64,
                "a write at {at}, behind the {} bytes shown",
                shown.bytes.len()
            );
        }
        let end = at as usize + bytes.len();
        if shown.bytes.len() < end {
            shown.bytes.resize(end, 0);
        }
        shown.bytes[at as usize..end].copy_from_slice(bytes);
    }
}

/// The streaming writer against qemu-img: random sequences of whole,
/// repeated, partial and zero writes in any order, with and without a
/// backing file, plain and zstd-compressed, on sizes that end inside a
/// cluster; every image is `qemu-img check` clean, equals its raw model
/// (`qemu-img compare`, the backing file shown through), holds no data
/// cluster it was not written, reads back (before it is finished) what
/// was written, and its cluster map holds the model's digest of every
/// cluster it holds. Half the rounds are followed by a tap: the file then
/// only grows (a cluster written again moves), its header last, and is
/// what the tap was shown.
#[test]
fn the_streaming_writer_matches_its_model_for_random_write_sequences() {
    let mut rng = Rng::from_env_or(0x5eed_0021);
    let dir = tempdir();
    let mut compressed_rounds = 0;
    for round in 0..18u64 {
        let cs: u64 = [512, 4096, 65536][rng.below(3) as usize];
        let compress = round % 3 == 2;
        let size = (1 + rng.below(4)) * MIB + rng.below(cs / 512) * 512;
        let clusters = size.div_ceil(cs);
        let with_backing = round % 2 == 1;
        let base = dir.path().join(format!("base-{round}.qcow2"));
        let mut model = vec![0u8; size as usize];
        if with_backing {
            create_qcow2(&base, size, &[]);
            for _ in 0..8 {
                let at = rng.below(size / 512) * 512;
                let len = (512 * (1 + rng.below(256))).min(size - at);
                let pattern = 1 + rng.below(250) as u8;
                run(Command::new("qemu-io")
                    .args([
                        "-f",
                        "qcow2",
                        "-c",
                        &format!("write -P {pattern} {at} {len}"),
                    ])
                    .arg(&base));
                model[at as usize..(at + len) as usize].fill(pattern);
            }
        }
        let path = dir.path().join(format!("stream-{round}.qcow2"));
        let backing_name = format!("base-{round}.qcow2");
        let mut image = qcow2::Stream::create(
            &path,
            &CreateOptions {
                size,
                cluster_size: cs,
                backing: with_backing.then_some(backing_name.as_str()),
                backing_format: with_backing.then_some("qcow2"),
            },
        )
        .unwrap();
        if compress {
            image.compress(3).unwrap();
        }
        // Most rounds keep a map (and the file's digest leaves the data
        // to it); every fourth digests the whole file.
        let keep_map = round % 4 != 3;
        let map_path = dir.path().join(format!("stream-{round}.map"));
        if keep_map {
            image.keep_map(&map_path).unwrap();
        }
        // Half the rounds followed as an upload follows the file: the
        // file then only grows.
        let follower = (round % 4 < 2).then(|| {
            let follower = Follower::default();
            image.tap(Box::new(follower.clone()));
            follower
        });
        // Clusters this image holds (written or zeroed): where partial
        // writes may go when a backing file could show through.
        let mut held = std::collections::BTreeSet::new();
        let mut written = std::collections::BTreeSet::new();
        for _ in 0..(20 + rng.below(40)) {
            let first = rng.below(clusters);
            let count = (1 + rng.below(8)).min(clusters - first);
            let start = first * cs;
            let end = ((first + count) * cs).min(size);
            match rng.below(5) {
                0 => {
                    // Often over whole L2 tables (those the writer holds
                    // as one entry), which later writes may land in.
                    let (start, end) = if rng.below(2) == 0 {
                        let per = cs / 8;
                        let table = rng.below(clusters.div_ceil(per));
                        let first = (table * per).saturating_sub(rng.below(3));
                        let last = ((table + 1 + rng.below(2)) * per + rng.below(3)).min(clusters);
                        (first * cs, (last * cs).min(size))
                    } else {
                        (start, end)
                    };
                    let (first, count) = (start / cs, (end - start).div_ceil(cs));
                    image.write_zeroes(start, end - start).unwrap();
                    model[start as usize..end as usize].fill(0);
                    held.extend(first..first + count);
                }
                1 => {
                    // Part of one cluster it holds (or any, without a
                    // backing file).
                    let target = if with_backing {
                        match held
                            .iter()
                            .nth(rng.below(held.len().max(1) as u64) as usize)
                        {
                            Some(&c) => c,
                            None => continue,
                        }
                    } else {
                        first
                    };
                    let c_end = ((target + 1) * cs).min(size);
                    let at = target * cs + rng.below((c_end - target * cs) / 512) * 512;
                    let len = (512 * (1 + rng.below(4))).min(c_end - at);
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    image.write(at, &data).unwrap();
                    model[at as usize..(at + len) as usize].copy_from_slice(&data);
                    held.insert(target);
                    written.insert(target);
                }
                kind => {
                    // Random, compressible, or zeros written as data.
                    let data: Vec<u8> = match kind {
                        2 => (0..end - start).map(|_| rng.next() as u8).collect(),
                        3 => (0..end - start).map(|_| (rng.next() % 3) as u8).collect(),
                        _ => vec![0; (end - start) as usize],
                    };
                    image.write(start, &data).unwrap();
                    model[start as usize..end as usize].copy_from_slice(&data);
                    held.extend(first..first + count);
                    written.extend(first..first + count);
                }
            }
        }
        // Read back before the tables exist: what it holds.
        for &c in held.iter().take(16) {
            let start = c * cs;
            let end = ((c + 1) * cs).min(size);
            let mut buf = vec![0u8; (end - start) as usize];
            image.read(start, &mut buf).unwrap();
            assert!(
                buf == model[start as usize..end as usize],
                "round {round}: cluster {c} reads back wrong"
            );
        }
        assert!(image.write(size - 512, &[0u8; 1024]).is_err());
        let done = image.finish().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), done.len);
        let bytes = std::fs::read(&path).unwrap();
        if let Some(follower) = &follower {
            let mut seen = follower.0.lock().unwrap().bytes.clone();
            assert!(seen.len() as u64 <= done.len, "round {round}");
            seen.resize(done.len as usize, 0);
            assert!(
                seen == bytes,
                "round {round}: the file is not what its tap was shown"
            );
        }
        let expected = match keep_map {
            true => model_layout_digest(&bytes),
            false => format!("blake3:{}", blake3::hash(&bytes).to_hex()),
        };
        assert_eq!(
            done.digest.to_string(),
            expected,
            "round {round}: the file's digest"
        );
        run(Command::new("qemu-img").args(["check", "-q"]).arg(&path));
        let info = qemu_img_json("info", &path);
        let kind = &info["format-specific"]["data"]["compression-type"];
        assert_eq!(kind, if compress { "zstd" } else { "zlib" }, "{info}");
        // (A round without a map writes none.)
        assert_eq!(map_path.exists(), keep_map, "round {round}");
        if keep_map {
            let cmap = bitback::cluster_map::Map::read(&map_path).unwrap();
            // Every cluster it holds data of is recorded (over a backing file,
            // every cluster it holds, zeros too); a full's cluster that only
            // ever got zeros needs no record (unrecorded reads as zeros).
            for &c in &held {
                let start = (c * cs) as usize;
                let end = (((c + 1) * cs).min(size)) as usize;
                let zeros = model[start..end].iter().all(|b| *b == 0);
                assert!(
                    cmap.clusters.contains(c) || (!with_backing && zeros),
                    "round {round}: cluster {c} is not recorded"
                );
            }
            assert!(
                cmap.clusters.keys().all(|c| held.contains(&c)),
                "round {round}: a record of a cluster never written"
            );
            for (c, d) in cmap.clusters.iter() {
                let start = (c * cs) as usize;
                let end = (((c + 1) * cs).min(size)) as usize;
                assert_eq!(
                    *d,
                    bitback::cluster_map::digest(&model[start..end]),
                    "round {round}: cluster {c}'s digest"
                );
            }
        }
        let raw = dir.path().join(format!("model-{round}.raw"));
        std::fs::write(&raw, &model).unwrap();
        assert!(
            same_content(&raw, "raw", &path, "qcow2"),
            "round {round} (cluster {cs}, size {size}, backing {with_backing}) differs from its model"
        );
        let map = qemu_img_json("map", &path);
        let data_bytes: u64 = map
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true && e["depth"] == 0)
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        assert_eq!(done.data_bytes, data_bytes, "round {round}: data bytes");
        // (QEMU 7.2's map has no "compressed"; check's summary does.)
        if compress && data_bytes > 0 && crate::harness::has_compressed_clusters(&path) {
            compressed_rounds += 1;
        }
        let most = written.len() as u64 * cs;
        assert!(
            data_bytes <= most,
            "round {round}: {data_bytes} bytes of data for {most} written"
        );
    }
    assert!(compressed_rounds > 0, "no cluster was stored compressed");
}

/// The layout digest of a qcow2 file written with a cluster map, worked
/// out here from the format (the header, L1 and L2 tables by hand): BLAKE3
/// over BLAKE3 of the bytes outside the data ranges, BLAKE3 of the ranges
/// (offset, length, u64 LE), and the file's length.
fn model_layout_digest(bytes: &[u8]) -> String {
    let be = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let bits = u32::from_be_bytes(bytes[20..24].try_into().unwrap()) as u64;
    let cs = 1u64 << bits;
    let size = be(24);
    let l1_size = u32::from_be_bytes(bytes[36..40].try_into().unwrap()) as u64;
    let l1 = be(40) as usize;
    let len = bytes.len() as u64;
    let mut ranges = Vec::new();
    for i in 0..l1_size {
        let l2 = (be(l1 + 8 * i as usize) & 0x00ff_ffff_ffff_fe00) as usize;
        if l2 == 0 {
            continue;
        }
        for j in 0..cs / 8 {
            let guest = (i * (cs / 8) + j) * cs;
            if guest >= size {
                break;
            }
            let e = be(l2 + 8 * j as usize);
            if e & (1 << 62) != 0 {
                let x = 62 - (bits - 8);
                let host = e & ((1 << x) - 1);
                let sectors = ((e >> x) & ((1 << (bits - 8)) - 1)) + 1;
                ranges.push((host, (host + sectors * 512 - (host & 511)).min(len)));
            } else if e & 0x00ff_ffff_ffff_fe00 != 0 && e & 1 == 0 {
                let host = e & 0x00ff_ffff_ffff_fe00;
                ranges.push((host, host + cs.min(size - guest)));
            }
        }
    }
    ranges.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let (mut outside, mut skipped, mut at) = (blake3::Hasher::new(), blake3::Hasher::new(), 0);
    for &(a, b) in &merged {
        outside.update(&bytes[at as usize..a as usize]);
        skipped.update(&a.to_le_bytes());
        skipped.update(&(b - a).to_le_bytes());
        at = b;
    }
    outside.update(&bytes[at as usize..]);
    let mut root = blake3::Hasher::new();
    root.update(outside.finalize().as_bytes());
    root.update(skipped.finalize().as_bytes());
    root.update(&len.to_le_bytes());
    format!("blake3-layout:{}", root.finalize().to_hex())
}

/// The writer's incremental by content: a full with its map, then the
/// whole changed disk written again (data, zeros as data, zero writes)
/// over it with the full's map as the baseline. Only clusters whose
/// content changed are stored (zeros where the full had data), the image
/// is `qemu-img check` clean and equals the new disk through its backing
/// file, and its map records exactly the changed clusters.
#[test]
fn an_incremental_by_content_stores_only_changed_clusters() {
    use bitback::cluster_map::{Baseline, Map};
    let mut rng = Rng::from_env_or(0x5eed_0022);
    let dir = tempdir();
    let cs = 65536u64;
    let size = 8 * MIB + 3 * 512;
    let clusters = size.div_ceil(cs);
    let len_of = |c: u64| (((c + 1) * cs).min(size) - c * cs) as usize;
    // The old disk: about half its clusters data, the rest zeros.
    let mut old = vec![0u8; size as usize];
    for c in 0..clusters {
        if rng.below(2) == 0 {
            let at = (c * cs) as usize;
            for b in &mut old[at..at + len_of(c)] {
                *b = rng.next() as u8;
            }
        }
    }
    let base = dir.path().join("base.qcow2");
    let mut full = qcow2::Stream::create(
        &base,
        &CreateOptions {
            size,
            cluster_size: cs,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    full.keep_map(&dir.path().join("base.map")).unwrap();
    full.write(0, &old).unwrap();
    full.finish().unwrap();
    // The new disk: some clusters changed, some zeroed, some unchanged.
    let mut new = old.clone();
    let mut changed = std::collections::BTreeSet::new();
    for c in 0..clusters {
        let at = (c * cs) as usize;
        let range = at..at + len_of(c);
        match rng.below(6) {
            0 => {
                for b in &mut new[range.clone()] {
                    *b = rng.next() as u8;
                }
            }
            1 => new[range.clone()].fill(0),
            _ => {}
        }
        if new[range.clone()] != old[range] {
            changed.insert(c);
        }
    }
    assert!(!changed.is_empty());
    let top = dir.path().join("top.qcow2");
    let mut inc = qcow2::Stream::create(
        &top,
        &CreateOptions {
            size,
            cluster_size: cs,
            backing: Some("base.qcow2"),
            backing_format: Some("qcow2"),
        },
    )
    .unwrap();
    let map_path = dir.path().join("top.map");
    inc.keep_map(&map_path).unwrap();
    let baseline = Baseline::overlay([Map::read(&dir.path().join("base.map")).unwrap()]).unwrap();
    inc.only_changes(std::sync::Arc::new(baseline)).unwrap();
    // As a sync=full job sends it: runs of data, zero ranges as zero
    // writes or as data, in any order.
    let mut order: Vec<u64> = (0..clusters).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for c in order {
        let at = c * cs;
        let bytes = &new[at as usize..at as usize + len_of(c)];
        if bytes.iter().all(|&b| b == 0) && rng.below(2) == 0 {
            inc.write_zeroes(at, bytes.len() as u64).unwrap();
        } else {
            inc.write(at, bytes).unwrap();
        }
    }
    let done = inc.finish().unwrap();
    run(Command::new("qemu-img").args(["check", "-q"]).arg(&top));
    let raw = dir.path().join("new.raw");
    std::fs::write(&raw, &new).unwrap();
    assert!(same_content(&raw, "raw", &top, "qcow2"));
    let map = Map::read(&map_path).unwrap();
    let mapped: std::collections::BTreeSet<u64> = map.clusters.keys().collect();
    assert_eq!(mapped, changed, "the map records the changed clusters");
    let stored: u64 = qemu_img_json("map", &top)
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && (e["data"] == true || e["zero"] == true))
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    let want: u64 = changed.iter().map(|&c| len_of(c) as u64).sum();
    assert_eq!(stored, want, "what the image holds itself");
    assert!(done.received >= want);
}

/// The ranges a bitmap has set, as QEMU reads them: the image exported by
/// qemu-storage-daemon with the bitmap, mapped by `qemu-img map` through
/// `x-dirty-bitmap` (a set bit reads as "no data").
fn bitmap_ranges_by_qemu(dir: &Path, image: &Path, name: &str) -> Vec<(u64, u64)> {
    require("qemu-storage-daemon");
    let socket = dir.join(format!(
        "{}.sock",
        image.file_name().unwrap().to_string_lossy()
    ));
    let mut daemon = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=f,read-only=on",
            image.display()
        ))
        .args(["--blockdev", "driver=qcow2,file=f,node-name=m,read-only=on"])
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", socket.display()))
        .arg("--export")
        .arg(format!("type=nbd,id=e,node-name=m,name=m,bitmaps.0={name}"))
        .spawn()
        .expect("starting qemu-storage-daemon (apt-get install qemu-system-x86)");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "--image-opts"])
        .arg(format!(
            "driver=nbd,server.type=unix,server.path={},export=m,x-dirty-bitmap=qemu:dirty-bitmap:{name}",
            socket.display()
        ))
        .output()
        .unwrap();
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    map.iter()
        .filter(|e| e["data"] == false)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

#[test]
fn a_mask_image_hands_qemu_exactly_its_ranges() {
    let dir = tempdir();
    let mut rng = Rng::from_env();
    let size = 6 << 30;
    for granularity in [64 << 10, 1 << 20] {
        let image = dir.path().join(format!("mask-{granularity}.qcow2"));
        let mut ranges: Vec<(u64, u64)> = (0..200)
            .map(|_| (rng.below(size), 1 + rng.below(8 * MIB)))
            .collect();
        ranges.push((size - 1, 1));
        let covered =
            qcow2::create_mask(&image, size, "alloc", granularity, ranges.clone()).unwrap();
        qemu_img_check_clean(&image);
        // The model: every granule a range touches.
        let mut bits = vec![false; (size / granularity) as usize];
        for (start, len) in &ranges {
            let end = (start + len).min(size);
            for b in start / granularity..end.div_ceil(granularity) {
                bits[b as usize] = true;
            }
        }
        let mut model = Vec::new();
        for (b, set) in bits.iter().enumerate() {
            let at = b as u64 * granularity;
            match model.last_mut() {
                Some((start, len)) if *set && *start + *len == at => *len += granularity,
                _ if *set => model.push((at, granularity)),
                _ => {}
            }
        }
        assert_eq!(covered, model.iter().map(|r| r.1).sum::<u64>());
        assert_eq!(bitmap_ranges_by_qemu(dir.path(), &image, "alloc"), model);
    }
}
