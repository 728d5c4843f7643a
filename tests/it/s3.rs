//! The repository's storage seam over a real object store (SeaweedFS):
//! a bucket keeps a repository's objects as a directory does, under the
//! same keys; object lock holds against bitback's own credentials; a wrong
//! key, a missing bucket and a dead store are clear errors. What bitback
//! stored is read back with the aws CLI.

use std::collections::HashMap;

use bitback::repo::{Bucket, Directory, Entry, Store};
use bitback::s3::{Client, Config, Location, LockMode, Put, Retention};

use crate::harness::s3::{KEY_ID, SECRET, Seaweed};
use crate::harness::{Rng, Run, Vm, bitback_env, by_content, run, same_content, tempdir};

const MIB: u64 = 1 << 20;

fn config(store: &Seaweed, secret: &str) -> Config {
    let env: HashMap<String, String> = [
        ("AWS_ENDPOINT_URL", store.endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", secret),
        ("AWS_REGION", "us-east-1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Config::resolve(&env, None, None).unwrap()
}

fn location(text: &str) -> Location {
    Location::parse(text).unwrap().unwrap()
}

/// The same steps against any store; what a store then holds under
/// `vm1/`, sorted.
fn keep_objects(store: &dyn Store) -> Vec<Entry> {
    assert_eq!(store.get("vm1/state.json").unwrap(), None);
    store.put("vm1/state.json", b"one").unwrap();
    store.put("vm1/state.json", b"two").unwrap();
    assert_eq!(
        store.get("vm1/state.json").unwrap().as_deref(),
        Some(&b"two"[..])
    );
    assert!(store.put_new("vm1/p1/manifest.json", b"first").unwrap());
    assert!(!store.put_new("vm1/p1/manifest.json", b"second").unwrap());
    assert_eq!(
        store.get("vm1/p1/manifest.json").unwrap().as_deref(),
        Some(&b"first"[..])
    );
    store.put("vm1/.damaged/p1.disk0.json", b"{}").unwrap();
    store.put("vm1/gone.json", b"x").unwrap();
    store.delete("vm1/gone.json").unwrap();
    store.delete("vm1/gone.json").unwrap();
    assert_eq!(store.get("vm1/gone.json").unwrap(), None);
    assert!(store.list("vm9").unwrap().is_empty());
    let top = store.list("").unwrap();
    assert!(top.contains(&Entry::Prefix("vm1".into())), "{top:?}");
    for key in ["../x", "/etc/passwd", "vm1//state.json", "vm1/../x", ""] {
        assert!(store.get(key).is_err(), "{key:?}");
        assert!(store.put(key, b"x").is_err(), "{key:?}");
    }
    let mut listed = store.list("vm1").unwrap();
    listed.sort_by(|a, b| a.name().cmp(b.name()));
    listed
}

#[test]
fn a_bucket_keeps_a_repositorys_objects_as_a_directory_does() {
    let store = Seaweed::start();
    store.bucket("bb-repo", false);
    let dir = tempdir();
    let directory = Directory::new(dir.path().join("repo"));
    std::fs::create_dir(directory.root()).unwrap();
    let bucket = Bucket::new(&config(&store, SECRET), location("s3://bb-repo/site/a")).unwrap();

    let in_directory = keep_objects(&directory);
    let in_bucket = keep_objects(&bucket);
    assert_eq!(in_bucket, in_directory);
    assert_eq!(
        in_bucket,
        [
            Entry::Prefix(".damaged".into()),
            Entry::Prefix("p1".into()),
            Entry::Object("state.json".into()),
        ]
    );

    // The same keys under the prefix, and the same bytes, as the aws CLI
    // reads them.
    let listed = store.aws_ok(&["s3api", "list-objects-v2", "--bucket", "bb-repo"]);
    let mut keys: Vec<&str> = listed["Contents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["Key"].as_str().unwrap())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "site/a/vm1/.damaged/p1.disk0.json",
            "site/a/vm1/p1/manifest.json",
            "site/a/vm1/state.json",
        ]
    );
    for key in ["vm1/state.json", "vm1/p1/manifest.json"] {
        assert_eq!(
            store.read("bb-repo", &format!("site/a/{key}"), dir.path()),
            std::fs::read(directory.root().join(key)).unwrap(),
            "{key}"
        );
    }
}

#[test]
fn a_locked_object_outlives_bitbacks_own_credentials() {
    let store = Seaweed::start();
    store.bucket("bb-lock", true);
    let dir = tempdir();
    let client = Client::new(&config(&store, SECRET), &location("s3://bb-lock")).unwrap();
    let until = tomorrow();
    let retention = Retention {
        mode: LockMode::Compliance,
        until: until.clone(),
    };
    let Put::Written {
        version: Some(version),
    } = client
        .put("vm1/p1/disk0.qcow2", b"point data", true, Some(&retention))
        .unwrap()
    else {
        panic!("a bucket with object lock keeps versions");
    };
    let held = store.aws_ok(&[
        "s3api",
        "get-object-retention",
        "--bucket",
        "bb-lock",
        "--key",
        "vm1/p1/disk0.qcow2",
    ]);
    assert_eq!(held["Retention"]["Mode"], "COMPLIANCE");
    // A delete of the version, with the very credentials bitback holds,
    // is refused by the store.
    let refused = store.aws(&[
        "s3api",
        "delete-object",
        "--bucket",
        "bb-lock",
        "--key",
        "vm1/p1/disk0.qcow2",
        "--version-id",
        &version,
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("AccessDenied"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // A plain delete only hides it behind a marker: the version reads on.
    client.delete("vm1/p1/disk0.qcow2").unwrap();
    assert_eq!(client.get("vm1/p1/disk0.qcow2").unwrap(), None);
    let out = dir.path().join("v");
    store.aws_ok(&[
        "s3api",
        "get-object",
        "--bucket",
        "bb-lock",
        "--key",
        "vm1/p1/disk0.qcow2",
        "--version-id",
        &version,
        out.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), b"point data");
}

#[test]
fn wrong_keys_missing_buckets_and_dead_stores_are_clear_errors() {
    let store = Seaweed::start();
    store.bucket("bb-here", false);
    let wrong = Bucket::new(&config(&store, "not-the-secret"), location("s3://bb-here")).unwrap();
    let e = wrong.get("vm1/state.json").unwrap_err().to_string();
    assert!(e.contains("403"), "{e}");
    let missing = Bucket::new(&config(&store, SECRET), location("s3://bb-not-here")).unwrap();
    let e = missing.list("").unwrap_err().to_string();
    assert!(e.contains("NoSuchBucket"), "{e}");
    // A store that does not answer: a bounded number of tries, then a
    // failure that says so. Nothing was written anywhere.
    let endpoint = store.endpoint.clone();
    drop(store);
    let dead = config_at(&endpoint);
    let dead = Bucket::new(&dead, location("s3://bb-here")).unwrap();
    let e = dead.put("vm1/state.json", b"x").unwrap_err().to_string();
    assert!(e.contains("no answer after 5 tries"), "{e}");
}

fn config_at(endpoint: &str) -> Config {
    let env: HashMap<String, String> = [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ACCESS_KEY_ID", KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Config::resolve(&env, None, None).unwrap()
}

/// RFC 3339, a day from now.
fn tomorrow() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", "+1 day", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `bitback sync` into a bucket, as its user drives it: every point
/// copied once, a killed sync leaving no listed point, a damaged point
/// refused; the bucket, synced back to a directory by the aws CLI,
/// restores every point equal to the disk at its time.
#[test]
fn a_repository_synced_to_a_bucket_restores_from_it_point_by_point() {
    let store = Seaweed::start();
    store.bucket("bb-sync", false);
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[8 * MIB, 4 * MIB]);
    let mut rng = Rng::from_env();
    for _ in 0..3 {
        vm.random_writes(&mut rng, 6);
        vm.backup(&[]);
    }
    let env = store.env();
    let repo = vm.repo.to_str().unwrap().to_string();
    let sync = |extra: &[(&str, &str)]| {
        let mut env = env.clone();
        env.extend(extra);
        bitback_env(
            &[
                "sync",
                "--from",
                &repo,
                "--to",
                "s3://bb-sync/site",
                "--json",
            ],
            &env,
        )
    };
    let actions = |run: &crate::harness::Run| -> Vec<String> {
        assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
        run.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["action"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(actions(&sync(&[])), ["copied"; 3]);

    // A sync killed after a new point's data, before its manifest: the
    // bucket lists no such point; the next sync copies it.
    vm.random_writes(&mut rng, 6);
    let fourth = vm.backup(&[])["id"].as_str().unwrap().to_string();
    let killed = sync(&[("BITBACK_FAULT", "sync-before-manifest")]);
    assert_eq!(killed.code, None, "{}{}", killed.stdout, killed.stderr);
    let manifest = format!("site/vm1/{fourth}/manifest.json");
    let head = store.aws(&[
        "s3api",
        "head-object",
        "--bucket",
        "bb-sync",
        "--key",
        &manifest,
    ]);
    assert!(!head.status.success(), "a killed sync left {manifest}");
    assert_eq!(
        actions(&sync(&[])),
        ["already-there", "already-there", "already-there", "copied"]
    );
    assert_eq!(actions(&sync(&[])), ["already-there"; 4]);

    // A point whose file rotted on the NAS is not copied off-site.
    vm.random_writes(&mut rng, 6);
    let fifth = vm.backup(&[]);
    let file = vm.repo.join(fifth["volumes"][0]["file"].as_str().unwrap());
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let refused = sync(&[]);
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("does not verify"),
        "{}",
        refused.stderr
    );
    let manifest = format!("site/vm1/{}/manifest.json", fifth["id"].as_str().unwrap());
    let head = store.aws(&[
        "s3api",
        "head-object",
        "--bucket",
        "bb-sync",
        "--key",
        &manifest,
    ]);
    assert!(!head.status.success(), "a damaged point was copied");
    vm.quit();

    // Back into a directory, with the aws CLI and with bitback: the same
    // repository, every copied point restoring equal to its model.
    let back = dir.path().join("back");
    store.aws_ok(&["s3", "sync", "s3://bb-sync/site", back.to_str().unwrap()]);
    let fetched = dir.path().join("fetched");
    let fetch = || {
        bitback_env(
            &[
                "sync",
                "--from",
                "s3://bb-sync/site",
                "--to",
                fetched.to_str().unwrap(),
                "--json",
            ],
            &env,
        )
    };
    assert_eq!(actions(&fetch()), ["copied"; 4]);
    assert_eq!(actions(&fetch()), ["already-there"; 4]);
    restores_equal(&fetched, &vm.points[..4], dir.path());
    // An object altered in the bucket: that point is not taken in.
    let third = &vm.points[2].0;
    let altered = format!("site/vm1/{third}/{}.qcow2", vm.volume(1));
    let mut bytes = store.read("bb-sync", &altered, dir.path());
    let at = bytes.len() - 100;
    bytes[at] ^= 0xff;
    let file = dir.path().join("altered");
    std::fs::write(&file, &bytes).unwrap();
    store.aws_ok(&[
        "s3api",
        "put-object",
        "--bucket",
        "bb-sync",
        "--key",
        &altered,
        "--body",
        file.to_str().unwrap(),
    ]);
    let elsewhere = dir.path().join("elsewhere");
    let refused = bitback_env(
        &[
            "sync",
            "--from",
            "s3://bb-sync/site",
            "--to",
            elsewhere.to_str().unwrap(),
        ],
        &env,
    );
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("does not verify"),
        "{}",
        refused.stderr
    );
    assert!(!elsewhere.join("vm1").join(third).exists());
    restores_equal(&back, &vm.points[..4], dir.path());
}

/// `bitback restore --json` of point `id` of vm1 from `repo` (a directory
/// or an s3:// URL) into `out`.
fn restore_from(repo: &str, id: &str, out: &std::path::Path, env: &[(&str, &str)]) -> Run {
    bitback_env(
        &[
            "restore",
            "--repo",
            repo,
            "--vm",
            "vm1",
            "--backup",
            id,
            "--output",
            out.to_str().unwrap(),
            "--json",
        ],
        env,
    )
}

/// Point `id` restores from `repo` into `out` equal to its `models`,
/// volume by volume; what the restore printed.
fn restores_right(
    repo: &str,
    (id, models): &(String, Vec<std::path::PathBuf>),
    out: &std::path::Path,
    env: &[(&str, &str)],
) -> serde_json::Value {
    let run = restore_from(repo, id, out, env);
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    let restored = run.json();
    for (i, r) in restored.as_array().unwrap().iter().enumerate() {
        let path = std::path::PathBuf::from(r["path"].as_str().unwrap());
        assert!(
            same_content(&models[i], "raw", &path, "raw"),
            "{repo}: point {id}, volume {i} differs from its model"
        );
    }
    restored
}

/// Every point of `points` restores from the repository at `repo` (a
/// bucket's URL) into `dir` equal to its models.
fn every_point_restores(
    repo: &str,
    points: &[(String, Vec<std::path::PathBuf>)],
    dir: &std::path::Path,
    env: &[(&str, &str)],
) {
    for point in points {
        let out = dir.join(format!("restored-{}", point.0));
        restores_right(repo, point, &out, env);
    }
}

/// Every point of `points` restores from the repository at `repo` equal
/// to its models (volume by volume).
fn restores_equal(
    repo: &std::path::Path,
    points: &[(String, Vec<std::path::PathBuf>)],
    scratch: &std::path::Path,
) {
    let name = repo.file_name().unwrap().to_string_lossy();
    for point in points {
        let out = scratch.join(format!("restored-{name}-{}", point.0));
        restores_right(repo.to_str().unwrap(), point, &out, &[]);
    }
}

/// Seconds since the epoch of an RFC 3339 time, read by date(1).
fn epoch(time: &str) -> i64 {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", time, "+%s"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// When the aws CLI says object `key` of `bucket` is retained until, in
/// seconds since the epoch, and in which mode.
fn retained(store: &Seaweed, bucket: &str, key: &str) -> (String, i64) {
    let r = store.aws_ok(&[
        "s3api",
        "get-object-retention",
        "--bucket",
        bucket,
        "--key",
        key,
    ]);
    (
        r["Retention"]["Mode"].as_str().unwrap().to_string(),
        epoch(r["Retention"]["RetainUntilDate"].as_str().unwrap()),
    )
}

/// `sync --retain-days`: a bucket without object lock is refused before
/// anything is written; every object of a copied point is locked for the
/// days asked, against bitback's own credentials; a later point's lock
/// extends its parents' to the same date.
#[test]
fn synced_points_are_locked_and_their_parents_held_as_long() {
    let store = Seaweed::start();
    store.bucket("bb-locked", true);
    store.bucket("bb-plain", false);
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[8 * MIB]);
    let mut rng = Rng::from_env();
    vm.random_writes(&mut rng, 6);
    let full = vm.backup(&[]);
    let env = store.env();
    let repo = vm.repo.to_str().unwrap().to_string();
    let sync = |to: &str, days: &str| {
        bitback_env(
            &["sync", "--from", &repo, "--to", to, "--retain-days", days],
            &env,
        )
    };
    let plain = sync("s3://bb-plain", "1");
    assert_eq!(plain.code, Some(2), "{}", plain.stderr);
    assert!(plain.stderr.contains("no object lock"), "{}", plain.stderr);
    let listed = store.aws_ok(&["s3api", "list-objects-v2", "--bucket", "bb-plain"]);
    assert!(listed.get("Contents").is_none(), "{listed}");

    let now = epoch("now");
    let first = sync("s3://bb-locked", "1");
    assert_eq!(first.code, Some(0), "{}{}", first.stdout, first.stderr);
    let full_file = full["volumes"][0]["file"].as_str().unwrap().to_string();
    let full_manifest = format!("vm1/{}/manifest.json", full["id"].as_str().unwrap());
    for key in [&full_file, &full_manifest] {
        let (mode, until) = retained(&store, "bb-locked", key);
        assert_eq!(mode, "COMPLIANCE", "{key}");
        assert!(
            (until - now - 86_400).abs() < 600,
            "{key}: until {until}, now {now}"
        );
    }
    let head = store.aws_ok(&[
        "s3api",
        "head-object",
        "--bucket",
        "bb-locked",
        "--key",
        &full_file,
    ]);
    let version = head["VersionId"].as_str().unwrap();
    let refused = store.aws(&[
        "s3api",
        "delete-object",
        "--bucket",
        "bb-locked",
        "--key",
        &full_file,
        "--version-id",
        version,
    ]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("AccessDenied"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    vm.random_writes(&mut rng, 6);
    let incr = vm.backup(&[]);
    vm.quit();
    let second = sync("s3://bb-locked", "3");
    assert_eq!(second.code, Some(0), "{}{}", second.stdout, second.stderr);
    let incr_file = incr["volumes"][0]["file"].as_str().unwrap().to_string();
    for key in [&incr_file, &full_file, &full_manifest] {
        let (mode, until) = retained(&store, "bb-locked", key);
        assert_eq!(mode, "COMPLIANCE", "{key}");
        assert!(
            (until - now - 3 * 86_400).abs() < 600,
            "{key}: held until {until}, not 3 days from {now}"
        );
    }
}

/// A file larger than one request goes up in parts (several at once),
/// each checked by the store, under the lock asked for, and reads back
/// whole, its parts in order.
#[test]
fn a_large_file_goes_up_in_parts_and_comes_back_whole() {
    let store = Seaweed::start();
    store.bucket("bb-parts", true);
    let dir = tempdir();
    let path = dir.path().join("big");
    let mut rng = Rng::from_env();
    let len = 2 * bitback::s3::PART + 12_345;
    let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    let client = Client::new(&config(&store, SECRET), &location("s3://bb-parts")).unwrap();
    let retention = Retention {
        mode: LockMode::Governance,
        until: tomorrow(),
    };
    let sent = client
        .upload_file(
            "vm1/p1/disk0.qcow2",
            &path,
            Some(&retention),
            &mut bitback::s3::Unchecked,
        )
        .unwrap();
    assert_eq!(sent, len);
    let parts = store.aws_ok(&[
        "s3api",
        "head-object",
        "--bucket",
        "bb-parts",
        "--key",
        "vm1/p1/disk0.qcow2",
        "--part-number",
        "1",
    ]);
    let expected = len.div_ceil(bitback::s3::part_size(len));
    assert!(expected > 1);
    assert_eq!(parts["PartsCount"], expected, "{parts}");
    assert_eq!(
        retained(&store, "bb-parts", "vm1/p1/disk0.qcow2").0,
        "GOVERNANCE"
    );
    assert!(store.read("bb-parts", "vm1/p1/disk0.qcow2", dir.path()) == bytes);
    // Back in ranged GETs of 16 MiB, the last one short; an empty object
    // too.
    let back = dir.path().join("back");
    assert_eq!(client.download("vm1/p1/disk0.qcow2", &back).unwrap(), len);
    assert!(std::fs::read(&back).unwrap() == bytes);
    client.put("vm1/p1/empty", b"", false, None).unwrap();
    assert_eq!(client.download("vm1/p1/empty", &back).unwrap(), 0);
    assert_eq!(std::fs::metadata(&back).unwrap().len(), 0);
}

/// A point whose data rotted after it was written is stopped on its way
/// up: each byte is proven as it is read to go (by its cluster map, or
/// the file's whole digest), so the damaged part is never sent, the
/// upload is aborted, and nothing of the point stays in the bucket, not
/// even under an object lock; rot between the point's check and the
/// reading of its data too (the bytes stored are the bytes proven).
/// Mended, it goes up and restores.
#[test]
fn a_point_damaged_in_its_data_is_stopped_on_its_way_up_and_leaves_nothing() {
    let store = Seaweed::start();
    store.bucket("bb-proof", true);
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[96 * MIB]);
    vm.write(0, 0, 48 * MIB, 0x11);
    vm.write(0, 48 * MIB, 40 * MIB, 0x22);
    let point = vm.backup(&[]);
    // A compressed point after it, whose clusters are proven by reading
    // it whole before it goes.
    vm.random_writes(&mut Rng::from_env(), 20);
    vm.backup(&["--compress"]);
    vm.quit();
    let id = point["id"].as_str().unwrap().to_string();
    let file = vm.repo.join(point["volumes"][0]["file"].as_str().unwrap());
    assert!(std::fs::metadata(&file).unwrap().len() > bitback::s3::PART);
    // A byte of data (as qemu-img maps the file) past the first parts.
    let map = run(std::process::Command::new("qemu-img").args([
        "map",
        "--output=json",
        "-f",
        "qcow2",
        file.to_str().unwrap(),
    ]));
    let extents: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let at = extents
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .filter_map(|e| {
            let (offset, length) = (e["offset"].as_u64()?, e["length"].as_u64()?);
            (offset + length > 80 * MIB).then(|| offset.max(80 * MIB - 100) + 100)
        })
        .next()
        .unwrap_or_else(|| panic!("no data past 80 MiB: {extents}"));
    let flip = |file: &std::path::Path| {
        let mut bytes = std::fs::read(file).unwrap();
        bytes[at as usize] ^= 0x40;
        std::fs::write(file, &bytes).unwrap();
    };
    flip(&file);

    let env = store.env();
    let repo = vm.repo.to_str().unwrap().to_string();
    let sync = |env: &[(&str, &str)]| {
        bitback_env(
            &[
                "sync",
                "--from",
                &repo,
                "--to",
                "s3://bb-proof/site",
                "--retain-days",
                "1",
            ],
            env,
        )
    };
    let prefix = format!("site/vm1/{id}/");
    let refused_leaving_nothing = |refused: Run| {
        assert_eq!(refused.code, Some(1), "{}", refused.stderr);
        assert!(
            refused.stderr.contains("does not verify") && refused.stderr.contains(vm.volume(0)),
            "{}",
            refused.stderr
        );
        leaves_nothing(&store, "bb-proof", &prefix);
    };
    refused_leaving_nothing(sync(&env));

    // Mended, then rotting again once the sync checked the point.
    flip(&file);
    let gate = dir.path().join("gate");
    refused_leaving_nothing(held_at("sync-checked", &gate, &env, sync, || flip(&file)));

    flip(&file);
    let copied = sync(&env);
    assert_eq!(copied.code, Some(0), "{}", copied.stderr);
    // Its parts went up with their CRC32C (not MD5: SeaweedFS refuses a
    // wrong one, which bitback's probe found), and the store keeps it,
    // one per part combined.
    let key = format!("site/{}", point["volumes"][0]["file"].as_str().unwrap());
    let head = store.aws_ok(&[
        "s3api",
        "head-object",
        "--bucket",
        "bb-proof",
        "--key",
        &key,
        "--checksum-mode",
        "ENABLED",
    ]);
    let parts = std::fs::metadata(&file)
        .unwrap()
        .len()
        .div_ceil(bitback::s3::part_size(
            std::fs::metadata(&file).unwrap().len(),
        ));
    let crc = head["ChecksumCRC32C"].as_str().unwrap_or_default();
    assert!(crc.ends_with(&format!("-{parts}")), "{head}");
    assert_eq!(head["ChecksumType"], "COMPOSITE", "{head}");
    for (i, point) in vm.points.iter().enumerate() {
        let out = dir.path().join(format!("out{i}"));
        restores_right("s3://bb-proof/site", point, &out, &env);
    }
}

/// Runs `run` with `env` and `BITBACK_HOLD=<phase>:<gate>`; once it is
/// held there, does `at_hold`, lets it go on, and returns how it ended.
fn held_at(
    phase: &str,
    gate: &std::path::Path,
    env: &[(&str, &str)],
    run: impl Fn(&[(&str, &str)]) -> Run + Sync,
    at_hold: impl FnOnce(),
) -> Run {
    let hold = format!("{phase}:{}", gate.display());
    let mut held = env.to_vec();
    held.push(("BITBACK_HOLD", &hold));
    std::thread::scope(|s| {
        let running = s.spawn(|| run(&held));
        reached_hold(gate);
        at_hold();
        std::fs::write(gate, b"").unwrap();
        running.join().unwrap()
    })
}

/// Waits until a bitback held at `BITBACK_HOLD=<phase>:<gate>` is there.
fn reached_hold(gate: &std::path::Path) {
    let mark = gate.with_extension("held");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !mark.exists() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(mark.exists(), "bitback never reached its hold");
}

/// Nothing of a refused upload stays in `bucket`: no version under
/// `prefix`, no multipart upload begun.
fn leaves_nothing(store: &Seaweed, bucket: &str, prefix: &str) {
    let versions = store.aws_ok(&[
        "s3api",
        "list-object-versions",
        "--bucket",
        bucket,
        "--prefix",
        prefix,
    ]);
    assert!(versions.get("Versions").is_none(), "{versions}");
    let uploads = store.aws_ok(&["s3api", "list-multipart-uploads", "--bucket", bucket]);
    assert!(uploads.get("Uploads").is_none(), "{uploads}");
}

/// A file proven by reading it whole before it goes (a compressed one:
/// its layout is not followed in one pass) is held to the bytes it had
/// then: changed after that check, it is refused on its way up and leaves
/// nothing. Unchanged, it goes up and restores.
#[test]
fn a_compressed_file_changed_after_its_check_is_stopped_on_its_way_up() {
    let store = Seaweed::start();
    store.bucket("bb-held", false);
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[96 * MIB]);
    vm.write(0, 0, 40 * MIB, 0x33);
    vm.random_writes(&mut Rng::from_env(), 12);
    let point = vm.backup(&["--compress"]);
    vm.quit();
    let file = vm.repo.join(point["volumes"][0]["file"].as_str().unwrap());
    let len = std::fs::metadata(&file).unwrap().len();
    let flip = || {
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[(len / 2) as usize] ^= 0x08;
        std::fs::write(&file, &bytes).unwrap();
    };
    let env = store.env();
    let repo = vm.repo.to_str().unwrap().to_string();
    let gate = dir.path().join("gate");
    let sync = |env: &[(&str, &str)]| {
        bitback_env(&["sync", "--from", &repo, "--to", "s3://bb-held/site"], env)
    };
    let refused = held_at("sync-file-proven", &gate, &env, sync, flip);
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("does not verify"),
        "{}",
        refused.stderr
    );
    if by_content() {
        // Bitback wrote it: a layout digest and a cluster map, the
        // file read whole against the map before it went.
        assert!(
            refused.stderr.contains("changed after it was checked"),
            "{}",
            refused.stderr
        );
    }
    leaves_nothing(&store, "bb-held", "site/vm1/");

    flip();
    let copied = sync(&env);
    assert_eq!(copied.code, Some(0), "{}", copied.stderr);
    let out = dir.path().join("out");
    restores_right("s3://bb-held/site", &vm.points[0], &out, &env);
}

/// One sync of a VM into a bucket at a time: a sync killed halfway
/// through a multipart upload leaves its upload and its lock; the next
/// sync takes the dead lock over and aborts the upload; a sync started
/// while that one runs is refused, naming it.
#[test]
fn a_second_sync_is_refused_and_a_dead_ones_leftovers_go() {
    let store = Seaweed::start();
    store.bucket("bb-conc", false);
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[160 * MIB]);
    vm.write(0, 0, 100 * MIB, 0x5a);
    vm.backup(&[]);
    vm.quit();
    let env = store.env();
    let args = [
        "sync",
        "--from",
        vm.repo.to_str().unwrap(),
        "--to",
        "s3://bb-conc",
    ];
    let uploads = || {
        let listed = store.aws_ok(&["s3api", "list-multipart-uploads", "--bucket", "bb-conc"]);
        listed
            .get("Uploads")
            .and_then(|u| u.as_array())
            .map_or(0, Vec::len)
    };
    let lock_there = || {
        store
            .aws(&[
                "s3api",
                "head-object",
                "--bucket",
                "bb-conc",
                "--key",
                "vm1/.lock.json",
            ])
            .status
            .success()
    };

    let mut killed_env = env.clone();
    killed_env.push(("BITBACK_FAULT", "sync-mid-upload"));
    let killed = bitback_env(&args, &killed_env);
    assert_eq!(killed.code, None, "{}{}", killed.stdout, killed.stderr);
    assert_eq!(uploads(), 1, "the killed sync's multipart upload");
    assert!(lock_there(), "the killed sync's lock");

    let go = dir.path().join("go");
    let hold = format!("sync-before-manifest:{}", go.display());
    let mut held_env = env.clone();
    held_env.push(("BITBACK_HOLD", &hold));
    let first = std::process::Command::new(env!("CARGO_BIN_EXE_bitback"))
        .args(args)
        .envs(held_env.iter().copied())
        .env_remove("BITBACK_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let held = go.with_file_name("go.held");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !held.exists() {
        assert!(
            std::time::Instant::now() < until,
            "the sync never reached its manifest"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(uploads(), 0, "the dead sync's upload was not aborted");
    let second = bitback_env(&args, &env);
    assert_ne!(second.code, Some(0), "{}", second.stdout);
    assert!(
        second.stderr.contains("locked") && second.stderr.contains("sync of pid"),
        "{}",
        second.stderr
    );
    std::fs::write(&go, b"").unwrap();
    let out = first.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("copied"));
    assert!(!lock_there(), "the lock outlived its sync");
}

/// `list` and `restore` with `--repo s3://`: every point of a synced
/// repository restores from the bucket where it lies, equal to its model.
/// With bitback's own credentials an attacker deletes a point (delete
/// markers) and puts garbage over another's file (a new version): `list`
/// shows the first as hidden, and both still restore right, from the
/// versions bitback wrote, which the restore names. In a bucket without
/// versions an altered file is refused, never restored. A command that
/// writes a directory repository refuses an s3:// URL and makes no `s3:`
/// directory.
#[test]
fn points_restore_from_the_bucket_where_they_lie_deleted_or_overwritten() {
    let store = Seaweed::start();
    store.bucket("bb-read", true);
    store.bucket("bb-plain", false);
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[8 * MIB, 4 * MIB]);
    let mut rng = Rng::from_env();
    // The full holds data whatever the random writes hit.
    vm.write(0, 0, 64 << 10, 0x77);
    for _ in 0..3 {
        vm.random_writes(&mut rng, 6);
        vm.backup(&[]);
    }
    vm.quit();
    let env = store.env();
    let repo = vm.repo.to_str().unwrap().to_string();
    for url in ["s3://bb-read/site", "s3://bb-plain/site"] {
        let run = bitback_env(&["sync", "--from", &repo, "--to", url], &env);
        assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    }
    let list = |vm_name: Option<&str>| -> Vec<(String, bool)> {
        let mut args = vec!["list", "--repo", "s3://bb-read/site", "--json"];
        if let Some(name) = vm_name {
            args.extend(["--vm", name]);
        }
        let run = bitback_env(&args, &env);
        assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
        run.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["id"].as_str().unwrap().to_string(),
                    p["hidden"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    let ids: Vec<String> = vm.points.iter().map(|(id, _)| id.clone()).collect();
    let visible: Vec<(String, bool)> = ids.iter().map(|id| (id.clone(), false)).collect();
    assert_eq!(list(None), visible);
    let restore = |url: &str, id: &str, out: &std::path::Path| restore_from(url, id, out, &env);
    let restores_right = |url: &str, point: usize, tag: &str| -> serde_json::Value {
        let out = dir
            .path()
            .join(format!("from-{tag}-{}", vm.points[point].0));
        let restored = restores_right(url, &vm.points[point], &out, &env);
        for r in restored.as_array().unwrap() {
            assert_eq!(
                r["versions"].as_array().unwrap().len(),
                r["chain_length"].as_u64().unwrap() as usize
            );
        }
        restored
    };
    for point in 0..3 {
        restores_right("s3://bb-read/site", point, "locked");
    }

    // The attacker: the second point deleted, the third's first file
    // overwritten with garbage of its length.
    let second = &ids[1];
    store.aws_ok(&[
        "s3",
        "rm",
        "--recursive",
        &format!("s3://bb-read/site/vm1/{second}/"),
    ]);
    let third_file = format!("site/vm1/{}/{}.qcow2", ids[2], vm.volume(0));
    let len = store.read("bb-read", &third_file, dir.path()).len();
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, vec![0x5a; len]).unwrap();
    store.aws_ok(&[
        "s3api",
        "put-object",
        "--bucket",
        "bb-read",
        "--key",
        &third_file,
        "--body",
        garbage.to_str().unwrap(),
    ]);
    let mut expected = visible.clone();
    expected[1].1 = true;
    assert_eq!(list(Some("vm1")), expected);
    let text = bitback_env(&["list", "--repo", "s3://bb-read/site"], &env);
    assert!(text.stdout.contains("(hidden)"), "{}", text.stdout);
    let restored = restores_right("s3://bb-read/site", 1, "deleted");
    let versions = &restored[0]["versions"];
    assert!(
        versions[versions.as_array().unwrap().len() - 1]["file"]
            .as_str()
            .unwrap()
            .contains(second.as_str()),
        "{versions}"
    );
    restores_right("s3://bb-read/site", 2, "overwritten");
    // verify reads the versions bitback wrote: every file still proves.
    let verified = bitback_env(&["verify", "--repo", "s3://bb-read/site", "--json"], &env);
    assert_eq!(
        verified.code,
        Some(0),
        "{}{}",
        verified.stdout,
        verified.stderr
    );
    let report = verified.json();
    assert_eq!(report["backups"], 3);
    assert_eq!(report["files"], 6);

    // Without versions, an altered file is all there is: refused.
    // A byte of guest data in a file of the full (qemu-img map of the
    // same file in the directory): what only the maps or digests catch.
    let data_at = |volume: usize| -> Option<(String, usize)> {
        let key = format!("site/vm1/{}/{}.qcow2", ids[0], vm.volume(volume));
        let local = vm.repo.join(&key["site/".len()..]);
        let map = std::process::Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "qcow2"])
            .arg(&local)
            .output()
            .unwrap();
        let extents: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
        let data = extents
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["data"] == true && e["depth"] == 0 && e["offset"].is_u64())?;
        Some((key, data["offset"].as_u64().unwrap() as usize + 1000))
    };
    let (volume, (altered, at)) = [1, 0]
        .into_iter()
        .find_map(|v| Some((v, data_at(v)?)))
        .expect("the full holds data");
    let mut bytes = store.read("bb-plain", &altered, dir.path());
    bytes[at] ^= 0xff;
    std::fs::write(&garbage, &bytes).unwrap();
    store.aws_ok(&[
        "s3api",
        "put-object",
        "--bucket",
        "bb-plain",
        "--key",
        &altered,
        "--body",
        garbage.to_str().unwrap(),
    ]);
    let out = dir.path().join("refused");
    let run = restore("s3://bb-plain/site", &ids[0], &out);
    assert_eq!(run.code, Some(1), "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("cluster map") || run.stderr.contains("does not verify"),
        "{}",
        run.stderr
    );
    // The volume before it restored (as from a directory); of the altered
    // one nothing is left, not even a temporary file.
    let left: Vec<String> = std::fs::read_dir(&out)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.iter()
            .all(|name| !name.starts_with('.') && name != &format!("{}.raw", vm.volume(volume))),
        "a refused restore left {left:?}"
    );
    // verify names the altered file, and only it.
    let verified = bitback_env(&["verify", "--repo", "s3://bb-plain/site", "--json"], &env);
    assert_eq!(
        verified.code,
        Some(1),
        "{}{}",
        verified.stdout,
        verified.stderr
    );
    let report: serde_json::Value = serde_json::from_str(&verified.stdout).unwrap();
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{report}");
    assert_eq!(
        problems[0]["file"].as_str().unwrap(),
        &altered[5..],
        "{report}"
    );
    // ...and records it in the bucket, as a directory's verify does.
    let record = store.read(
        "bb-plain",
        &format!("site/vm1/.damaged/{}.{}.json", ids[0], vm.volume(volume)),
        dir.path(),
    );
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    assert_eq!(record["problem"], problems[0]["problem"], "{record}");
    // A later point builds on it: refused, naming the file, unless a
    // newer file holds the altered cluster (then it is never read, and
    // the point restores right). Never wrong data.
    let run = restore("s3://bb-plain/site", &ids[2], &dir.path().join("later"));
    match run.code {
        Some(0) => {
            for (i, r) in run.json().as_array().unwrap().iter().enumerate() {
                let path = std::path::PathBuf::from(r["path"].as_str().unwrap());
                assert!(same_content(&vm.points[2].1[i], "raw", &path, "raw"));
            }
        }
        _ => {
            assert_eq!(run.code, Some(1), "{}{}", run.stdout, run.stderr);
            assert!(run.stderr.contains(&altered[5..]), "{}", run.stderr);
        }
    }

    // What writes a directory repository refuses a bucket, and makes no
    // directory named after it.
    let cwd = dir.path().join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_bitback"))
        .args(["consolidate", "--vm", "vm1", "--max-chain", "1"])
        .args(["--repo", "s3://bb-read/site"])
        .current_dir(&cwd)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is a bucket") && stderr.contains("--full-every"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(&cwd).unwrap().count(), 0);
}

/// `prune --repo s3://`: in a bucket without object lock, the points
/// `--keep-chains 1` drops go for good (no version of their objects
/// left), with what a dead run left under a point without a manifest;
/// the kept chain restores. Where an object lock holds the older chain,
/// it is kept, and the report says until when.
#[test]
fn prune_in_a_bucket_removes_for_good_but_never_a_locked_point() {
    let store = Seaweed::start();
    store.bucket("bb-prune-lock", true);
    store.bucket("bb-prune-plain", false);
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[8 * MIB]);
    let mut rng = Rng::from_env();
    for extra in [&[][..], &[], &["--full"], &[]] {
        vm.random_writes(&mut rng, 6);
        vm.backup(extra);
    }
    vm.quit();
    let ids: Vec<String> = vm.points.iter().map(|(id, _)| id.clone()).collect();
    let env = store.env();
    let repo = vm.repo.to_str().unwrap().to_string();
    let run_ok = |args: &[&str]| {
        let run = bitback_env(args, &env);
        assert_eq!(run.code, Some(0), "{args:?}: {}{}", run.stdout, run.stderr);
        run
    };
    run_ok(&["sync", "--from", &repo, "--to", "s3://bb-prune-plain/site"]);
    run_ok(&[
        "sync",
        "--from",
        &repo,
        "--to",
        "s3://bb-prune-lock/site",
        "--retain-days",
        "1",
    ]);
    // What a sync killed before its manifest leaves.
    let leftover = "site/vm1/20200101T000000Z/drive0.qcow2";
    store.aws_ok(&[
        "s3api",
        "put-object",
        "--bucket",
        "bb-prune-plain",
        "--key",
        leftover,
    ]);
    let prune = |url: &str| {
        run_ok(&[
            "prune",
            "--repo",
            url,
            "--vm",
            "vm1",
            "--keep-chains",
            "1",
            "--json",
        ])
        .json()
    };
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let plan = run_ok(&[
        "prune",
        "--repo",
        "s3://bb-prune-plain/site",
        "--vm",
        "vm1",
        "--keep-chains",
        "1",
        "--dry-run",
        "--json",
    ])
    .json();
    assert_eq!(plan["dry_run"], true, "{plan}");
    assert_eq!(strings(&plan["deleted"]), ids[..2]);
    let pruned = prune("s3://bb-prune-plain/site");
    assert_eq!(strings(&pruned["deleted"]), ids[..2]);
    assert_eq!(strings(&pruned["kept"]), ids[2..]);
    let versions = |bucket: &str, prefix: &str| -> usize {
        let listed = store.aws_ok(&[
            "s3api",
            "list-object-versions",
            "--bucket",
            bucket,
            "--prefix",
            prefix,
        ]);
        ["Versions", "DeleteMarkers"]
            .iter()
            .map(|k| listed.get(k).and_then(|v| v.as_array()).map_or(0, Vec::len))
            .sum()
    };
    for id in &ids[..2] {
        assert_eq!(versions("bb-prune-plain", &format!("site/vm1/{id}/")), 0);
    }
    assert_eq!(versions("bb-prune-plain", "site/vm1/20200101T000000Z/"), 0);
    let out = dir.path().join("kept.raw");
    restores_right("s3://bb-prune-plain/site", &vm.points[3], &out, &env);

    // Under the lock nothing goes, and the report says until when.
    let pruned = prune("s3://bb-prune-lock/site");
    assert_eq!(strings(&pruned["deleted"]), Vec::<String>::new());
    assert_eq!(strings(&pruned["kept"]), ids);
    let locked = pruned["locked"].as_array().unwrap();
    let held: Vec<&str> = locked
        .iter()
        .map(|l| l["backup"].as_str().unwrap())
        .collect();
    assert_eq!(held, ids[..2]);
    let until = epoch(locked[0]["until"].as_str().unwrap());
    let now = epoch("now");
    assert!(
        (until - now - 86_400).abs() < 600,
        "until {until}, now {now}"
    );
    assert!(versions("bb-prune-lock", &format!("site/vm1/{}/", ids[0])) > 0);
    let text = run_ok(&[
        "prune",
        "--repo",
        "s3://bb-prune-lock/site",
        "--vm",
        "vm1",
        "--keep-chains",
        "1",
    ]);
    assert!(
        text.stdout
            .contains(&format!("kept {}: an object lock holds it until", ids[0])),
        "{}",
        text.stdout
    );
}

/// `bitback backup --json` of the QEMU at `qmp` into `url` as vm1
/// through `spool`, with `extra` arguments.
fn backup_through(
    qmp: &str,
    url: &str,
    spool: &std::path::Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Run {
    let mut args = vec!["backup", "--qmp", qmp, "--repo", url, "--vm", "vm1"];
    args.extend(["--spool", spool.to_str().unwrap(), "--json"]);
    args.extend(extra);
    bitback_env(&args, env)
}

/// `backup --repo s3://... --spool DIR`: full and incrementals of a
/// running VM land in the bucket (each point verified, uploaded, its
/// manifest last, under the lock asked for), the spool keeps only the
/// newest chain, and every point restores from the bucket equal to the
/// disk at its time. A missing bucket, a wrong key and a lock the bucket
/// cannot hold are refused before the VM is touched, leaving no spool.
#[test]
fn backups_reach_the_bucket_through_a_spool() {
    let store = Seaweed::start();
    store.bucket("bb-spool", true);
    store.bucket("bb-nolock", false);
    let dir = tempdir();
    let spool = dir.path().join("spool");
    let mut vm = Vm::new(dir.path(), &[8 * MIB, 4 * MIB]);
    let mut rng = Rng::from_env();
    let env = store.env();
    let qmp = vm.qemu().qmp.to_str().unwrap().to_string();
    let backup = |url: &str, extra: &[&str], env: &[(&str, &str)]| {
        backup_through(&qmp, url, &spool, extra, env)
    };

    // Refused before anything: no spool made.
    let mut wrong: Vec<(&str, &str)> = env.clone();
    wrong.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
    wrong.push(("AWS_SECRET_ACCESS_KEY", "not-the-key"));
    for (url, extra, env, says) in [
        ("s3://bb-missing/x", &[][..], &env[..], "NoSuchBucket"),
        ("s3://bb-spool/site", &[], &wrong[..], "403"),
        (
            "s3://bb-nolock/site",
            &["--retain-days", "1"],
            &env[..],
            "no object lock",
        ),
    ] {
        let run = backup(url, extra, env);
        assert_eq!(run.code, Some(2), "{url}: {}{}", run.stdout, run.stderr);
        assert!(run.stderr.contains(says), "{url}: {}", run.stderr);
        assert!(!spool.exists(), "{url}: a refused backup made the spool");
    }
    let no_spool = bitback_env(
        &[
            "backup",
            "--qmp",
            &qmp,
            "--repo",
            "s3://bb-spool/site",
            "--vm",
            "vm1",
        ],
        &env,
    );
    assert_eq!(no_spool.code, Some(2), "{}", no_spool.stderr);
    assert!(no_spool.stderr.contains("--spool"), "{}", no_spool.stderr);

    for extra in [&[][..], &[], &["--full"], &[]] {
        vm.random_writes(&mut rng, 6);
        let mut args = vec!["--retain-days", "1"];
        args.extend(extra);
        let run = backup("s3://bb-spool/site", &args, &env);
        let point = run.json();
        let id = point["id"].as_str().unwrap().to_string();
        let synced = point["synced"].as_array().unwrap();
        let copied: Vec<&str> = synced
            .iter()
            .filter(|s| s["action"] == "copied")
            .map(|s| s["backup"].as_str().unwrap())
            .collect();
        assert_eq!(copied, [id.as_str()], "{point}");
        vm.snapshot(&id);
    }
    vm.quit();
    let ids: Vec<String> = vm.points.iter().map(|(id, _)| id.clone()).collect();
    // The spool keeps the newest chain only.
    let spooled = crate::harness::list_ids(&spool, Some("vm1"));
    assert_eq!(spooled, ids[2..]);
    let listed = bitback_env(
        &[
            "list",
            "--repo",
            "s3://bb-spool/site",
            "--vm",
            "vm1",
            "--json",
        ],
        &env,
    );
    let listed: Vec<String> = listed
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, ids);
    every_point_restores("s3://bb-spool/site", &vm.points, dir.path(), &env);
    // Locked: the first full's file cannot be removed, by version.
    let key = format!("site/vm1/{}/{}.qcow2", ids[0], vm.volume(0));
    let head = store.aws_ok(&[
        "s3api",
        "head-object",
        "--bucket",
        "bb-spool",
        "--key",
        &key,
    ]);
    let refused = store.aws(&[
        "s3api",
        "delete-object",
        "--bucket",
        "bb-spool",
        "--key",
        &key,
        "--version-id",
        head["VersionId"].as_str().unwrap(),
    ]);
    assert!(!refused.status.success(), "a locked version was deleted");
}

/// On the NBD data path a backup into a bucket feeds each file's
/// multipart upload while it writes the file, the header part last: the
/// objects are byte for byte the files in the spool, went up with their
/// parts' CRC32C (checked by the store), are locked as asked from the
/// moment they are there (before the point's upload), and the
/// upload after the backup sends only the maps and the manifest. A
/// bitback killed while a part is on its way leaves no point; the next
/// backup aborts what it left, and every point restores equal to the disk.
/// On the file data path (QEMU writes the files) nothing is fed, and the
/// files go up after the backup as before (the kill there is mid-upload
/// after the backup, and the next backup uploads both points).
#[test]
fn a_backups_files_go_up_while_they_are_written() {
    let store = Seaweed::start();
    store.bucket("bb-feed", true);
    let dir = tempdir();
    let spool = dir.path().join("spool");
    let mut vm = Vm::new(dir.path(), &[80 * MIB, 4 * MIB]);
    let nbd = std::env::var("BITBACK_DATA_PATH").as_deref() != Ok("file");
    let env = store.env();
    let qmp = vm.qemu().qmp.to_str().unwrap().to_string();
    let backup = |env: &[(&str, &str)]| {
        backup_through(
            &qmp,
            "s3://bb-feed/site",
            &spool,
            &["--retain-days", "1"],
            env,
        )
    };
    let incomplete = || {
        let listed = store.aws_ok(&["s3api", "list-multipart-uploads", "--bucket", "bb-feed"]);
        listed["Uploads"].as_array().map_or(0, Vec::len)
    };
    for (k, pattern) in [0x31u8, 0x32, 0x33].into_iter().enumerate() {
        vm.write(0, (k as u64) * MIB, 72 * MIB, pattern);
        vm.write(1, 0, 2 * MIB, pattern);
        vm.random_writes(&mut Rng::from_env(), 4);
        if k == 1 {
            // Killed while a part of a file is on its way: fed as the
            // file is written, or (QEMU writing the file) sent after.
            let mut killed = env.clone();
            let fault = if nbd {
                "feed-mid-upload"
            } else {
                "sync-mid-upload"
            };
            killed.push(("BITBACK_FAULT", fault));
            let run = backup(&killed);
            assert_ne!(run.code, Some(0), "{}", run.stderr);
            let listed = bitback_env(
                &[
                    "list",
                    "--repo",
                    "s3://bb-feed/site",
                    "--vm",
                    "vm1",
                    "--json",
                ],
                &env,
            );
            let listed = listed.json().as_array().unwrap().len();
            assert_eq!(listed, vm.points.len(), "a killed backup listed a point");
            assert!(incomplete() > 0, "no upload was under way");
        }
        let run = match k {
            // Held once the files went up, before the upload after the
            // backup: each is there, already locked; and the VM's lock in
            // the bucket refuses a second backup (another host's spool)
            // and a sync, which could abort the uploads being fed.
            0 => {
                let at_hold = || {
                    let listed = store.aws_ok(&[
                        "s3api",
                        "list-object-versions",
                        "--bucket",
                        "bb-feed",
                        "--prefix",
                        "site/vm1/",
                    ]);
                    let files: Vec<&str> = listed["Versions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|v| v["Key"].as_str().unwrap())
                        .filter(|k| k.ends_with(".qcow2"))
                        .collect();
                    assert_eq!(files.len(), if nbd { 2 } else { 0 }, "{listed}");
                    for key in files {
                        let head = store.aws_ok(&[
                            "s3api",
                            "head-object",
                            "--bucket",
                            "bb-feed",
                            "--key",
                            key,
                        ]);
                        assert!(
                            head["ObjectLockRetainUntilDate"].is_string(),
                            "{key}: {head}"
                        );
                    }
                    let other = dir.path().join("other-spool");
                    let second = backup_through(&qmp, "s3://bb-feed/site", &other, &[], &env);
                    assert_ne!(second.code, Some(0), "{}", second.stderr);
                    assert!(second.stderr.contains("backup of pid"), "{}", second.stderr);
                    assert!(
                        !other.join("vm1").exists(),
                        "the refused backup wrote its spool"
                    );
                    let sync = bitback_env(
                        &[
                            "sync",
                            "--from",
                            spool.to_str().unwrap(),
                            "--to",
                            "s3://bb-feed/site",
                        ],
                        &env,
                    );
                    assert_ne!(sync.code, Some(0), "{}", sync.stderr);
                    assert!(sync.stderr.contains("backup of pid"), "{}", sync.stderr);
                };
                held_at(
                    "sync-checked",
                    &dir.path().join("gate"),
                    &env,
                    backup,
                    at_hold,
                )
            }
            _ => backup(&env),
        };
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        let point = run.json();
        let id = point["id"].as_str().unwrap().to_string();
        vm.snapshot(&id);
        assert_eq!(incomplete(), 0, "an upload was left under way");
        let synced = point["synced"].as_array().unwrap();
        let this = synced.iter().find(|s| s["backup"] == id.as_str()).unwrap();
        assert_eq!(this["action"], "copied", "{point}");
        let streamed = this["streamed"].as_u64().unwrap_or(0);
        let mut files = 0;
        for v in point["volumes"].as_array().unwrap() {
            let file = v["file"].as_str().unwrap();
            let local = spool.join(file);
            let bytes = std::fs::read(&local).unwrap();
            files += bytes.len() as u64;
            let key = format!("site/{file}");
            let there = store.read("bb-feed", &key, dir.path());
            assert!(there == bytes, "{key} is not the spool's file");
            let head = store.aws_ok(&[
                "s3api",
                "head-object",
                "--bucket",
                "bb-feed",
                "--key",
                &key,
                "--checksum-mode",
                "ENABLED",
            ]);
            assert!(
                head["ObjectLockRetainUntilDate"].is_string(),
                "{key}: {head}"
            );
            if nbd && bytes.len() as u64 > bitback::s3::HEAD {
                // The head, then 16 MiB parts.
                let parts = 1 + (bytes.len() as u64 - bitback::s3::HEAD).div_ceil(16 * MIB);
                let crc = head["ChecksumCRC32C"].as_str().unwrap_or_default();
                assert!(crc.ends_with(&format!("-{parts}")), "{key}: {head}");
            }
        }
        match nbd {
            true => assert_eq!(streamed, files, "{point}"),
            false => assert_eq!(streamed, 0, "{point}"),
        }
    }
    vm.quit();
    every_point_restores("s3://bb-feed/site", &vm.points, dir.path(), &env);
}

/// The store stopped (SIGSTOP) while a backup copies a VM into it: the
/// guest's writes during the copy land, and the copy runs to its end and
/// QEMU's side of the backup is closed, all while the store is stopped
/// (the feed never makes the writer wait: it keeps parts in memory, then
/// reads them back from the spool when it can send them). Once the store
/// is back the backup finishes, and its point restores equal to the disk
/// at its start.
#[test]
fn a_stopped_store_holds_up_no_guest_write_of_a_backup_feeding_it() {
    let store = Seaweed::start();
    store.bucket("bb-stall", false);
    let dir = tempdir();
    let spool = dir.path().join("spool");
    let mut vm = Vm::with_devices(dir.path(), &[96 * MIB]);
    for i in 0..88 {
        vm.write(0, i * MIB, MIB, 0x11 + (i % 7) as u8);
    }
    let at_start = vm.models[0].bytes.clone();
    let env = store.env();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bitback"))
        .args(["backup", "--qmp"])
        .arg(&vm.qemu().qmp)
        .args(["--repo", "s3://bb-stall/site", "--vm", "vm1", "--spool"])
        .arg(&spool)
        .args(["--json", "--speed-limit", "8M"])
        .envs(env.iter().copied())
        .env_remove("BITBACK_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    vm.qemu().wait_for_job(&mut child);
    store.signal(nix::sys::signal::Signal::SIGSTOP);
    // Old data not yet copied (the copy runs from offset 0 at 8 MiB/s):
    // each write waits for its old data to reach the writer.
    for i in 40..72 {
        vm.write(0, i * MIB, MIB, 0x77);
    }
    // The copy ends and bitback takes its nodes out of QEMU.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let nodes = vm.qemu().must(
            "query-named-block-nodes",
            serde_json::json!({ "flat": true }),
        );
        let ours = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| {
                n["node-name"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("bitback-")
            })
            .count();
        if ours == 0
            && vm.qemu().must("query-block-jobs", serde_json::Value::Null) == serde_json::json!([])
        {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "bitback ended with the store stopped"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the copy did not end while the store was stopped"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    store.signal(nix::sys::signal::Signal::SIGCONT);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let point: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = point["id"].as_str().unwrap().to_string();
    if std::env::var("BITBACK_DATA_PATH").as_deref() != Ok("file") {
        let this = point["synced"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["backup"] == id.as_str())
            .unwrap()
            .clone();
        assert!(
            this["streamed"].as_u64().unwrap_or(0) > 64 * MIB,
            "{point}\n{stderr}"
        );
    }
    // What went up is the spool's file, and a sound image, holding each
    // cluster once (the guard's copies of old data, written again by the
    // job, stay where they are).
    let file = point["volumes"][0]["file"].as_str().unwrap();
    let local = spool.join(file);
    let len = std::fs::metadata(&local).unwrap().len();
    assert!(len < 90 * MIB, "{len} bytes for 88 MiB of data");
    run(std::process::Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&local));
    let there = store.read("bb-stall", &format!("site/{file}"), dir.path());
    assert!(
        there == std::fs::read(&local).unwrap(),
        "{file} is not the spool's file"
    );
    vm.quit();
    let model = dir.path().join("at-start.raw");
    std::fs::write(&model, &at_start).unwrap();
    restores_right(
        "s3://bb-stall/site",
        &(id, vec![model]),
        &dir.path().join("restored"),
        &env,
    );
}

/// A store that fills up while a backup feeds it (SeaweedFS with room for
/// a few small volumes): the backup into the spool is whole, the store's
/// refusals end the feed (its upload aborted) and the upload after the
/// backup, which names them; the backup exits 1 keeping the point in the
/// spool, and the bucket lists no point and holds no upload under way.
/// Full from the start, the VM's lock there cannot be taken: the backup
/// still goes into the spool, and is kept there. Given room (the store
/// restarted larger), the next backup uploads all three points, which
/// restore equal to the disk.
#[test]
fn a_store_that_fills_up_under_a_backup_keeps_the_point_in_the_spool() {
    let mut store = Seaweed::start_sized(8, 3);
    store.bucket("bb-full", false);
    let dir = tempdir();
    let spool = dir.path().join("spool");
    let mut vm = Vm::new(dir.path(), &[96 * MIB]);
    vm.write(0, 0, 80 * MIB, 0x5c);
    let qmp = vm.qemu().qmp.to_str().unwrap().to_string();
    let backup = |env: &[(&str, &str)]| backup_through(&qmp, "s3://bb-full/site", &spool, &[], env);
    let env = store.env();
    let run = backup(&env);
    assert_eq!(run.code, Some(1), "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("kept in the spool"), "{}", run.stderr);
    if std::env::var("BITBACK_DATA_PATH").as_deref() != Ok("file") {
        assert!(
            run.stderr.contains("upload as it was written failed") && run.stderr.contains("500"),
            "{}",
            run.stderr
        );
    }
    let kept = crate::harness::list_ids(&spool, Some("vm1"));
    assert_eq!(kept.len(), 1, "{kept:?}");
    vm.snapshot(&kept[0]);
    let uploads = store.aws_ok(&["s3api", "list-multipart-uploads", "--bucket", "bb-full"]);
    assert!(
        uploads["Uploads"].as_array().is_none_or(Vec::is_empty),
        "{uploads}"
    );
    let listed = bitback_env(
        &[
            "list",
            "--repo",
            "s3://bb-full/site",
            "--vm",
            "vm1",
            "--json",
        ],
        &env,
    );
    assert_eq!(listed.json(), serde_json::json!([]), "{}", listed.stderr);

    // Full from the start: the VM's lock there cannot be taken, and the
    // backup still goes into the spool.
    vm.random_writes(&mut Rng::from_env(), 6);
    let run = backup(&env);
    assert_eq!(run.code, Some(1), "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("lock in the bucket cannot be taken")
            && run.stderr.contains("kept in the spool"),
        "{}",
        run.stderr
    );
    let kept = crate::harness::list_ids(&spool, Some("vm1"));
    assert_eq!(kept.len(), 2, "{kept:?}");
    vm.snapshot(&kept[1]);

    store.grow(40);
    let env = store.env();
    vm.random_writes(&mut Rng::from_env(), 6);
    let run = backup(&env);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let point = run.json();
    vm.snapshot(point["id"].as_str().unwrap());
    let copied: Vec<&str> = point["synced"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["action"] == "copied")
        .map(|s| s["backup"].as_str().unwrap())
        .collect();
    assert_eq!(copied.len(), 3, "{point}");
    vm.quit();
    every_point_restores("s3://bb-full/site", &vm.points, dir.path(), &env);
}

/// The store killed (by its pid) while a sync's multipart upload is in
/// flight: the sync fails after its bounded retries, saying what it
/// tried, and the bucket lists no point. Killed again and started again
/// at once while a sync runs: the sync either finishes or fails so,
/// never leaving a half point. With the store back, the next sync aborts
/// what the dead ones left, copies the point whole, and it restores equal
/// to the disk.
#[test]
fn a_store_killed_mid_upload_leaves_no_point_and_the_next_sync_finishes() {
    let mut store = Seaweed::start();
    store.bucket("bb-crash", false);
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[160 * MIB]);
    let mut rng = Rng::from_env();
    vm.write(0, 0, 100 * MIB, 0x5a);
    vm.random_writes(&mut rng, 6);
    let id = vm.backup(&[])["id"].as_str().unwrap().to_string();
    vm.quit();
    let args = [
        "sync",
        "--from",
        vm.repo.to_str().unwrap(),
        "--to",
        "s3://bb-crash/site",
    ];
    let manifest_there = |store: &Seaweed| {
        store
            .aws(&[
                "s3api",
                "head-object",
                "--bucket",
                "bb-crash",
                "--key",
                &format!("site/vm1/{id}/manifest.json"),
            ])
            .status
            .success()
    };
    // Runs a sync held after its first part, lets `at_hold` act on the
    // store, releases it and returns its exit code and stderr.
    let held_sync = |store: &mut Seaweed, round: u32, at_hold: &dyn Fn(&mut Seaweed)| {
        let go = dir.path().join(format!("go{round}"));
        let hold = format!("sync-mid-upload:{}", go.display());
        // The store's address now (a restart may have moved it).
        let env = store.env();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_bitback"))
            .args(args)
            .envs(env.iter().copied())
            .env("BITBACK_HOLD", &hold)
            .env_remove("BITBACK_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let held = go.with_file_name(format!("go{round}.held"));
        let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !held.exists() {
            assert!(
                std::time::Instant::now() < until,
                "the sync never sent a part"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        store.kill();
        std::fs::write(&go, b"").unwrap();
        at_hold(store);
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // Killed and left dead: a clear failure, no point.
    let (code, stderr) = held_sync(&mut store, 0, &|_| {});
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no answer after"), "{stderr}");
    store.restart();
    assert!(!manifest_there(&store), "a failed sync left a manifest");

    // Killed and started again at once: done, or failed so; never half.
    let (code, stderr) = held_sync(&mut store, 1, &|store| store.restart());
    match code {
        Some(0) => assert!(manifest_there(&store)),
        _ => {
            assert_eq!(code, Some(1), "{stderr}");
            assert!(!manifest_there(&store), "a failed sync left a manifest");
        }
    }

    let env = store.env();
    let last = bitback_env(&args, &env);
    assert_eq!(last.code, Some(0), "{}{}", last.stdout, last.stderr);

    // Unreachable for 10 s mid-upload (stopped: connections taken, no
    // answer), then back: the sync waits it out within its limits and
    // the point is whole; or it fails and lists none.
    let go = dir.path().join("go-paused");
    let held = dir.path().join("go-paused.held");
    let paused = std::process::Command::new(env!("CARGO_BIN_EXE_bitback"))
        .args(["sync", "--from", vm.repo.to_str().unwrap()])
        .args(["--to", "s3://bb-crash/paused"])
        .envs(env.iter().copied())
        .env("BITBACK_HOLD", format!("sync-mid-upload:{}", go.display()))
        .env_remove("BITBACK_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !held.exists() {
        assert!(
            std::time::Instant::now() < until,
            "the sync never sent a part"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    store.signal(nix::sys::signal::Signal::SIGSTOP);
    std::fs::write(&go, b"").unwrap();
    std::thread::sleep(std::time::Duration::from_secs(10));
    store.signal(nix::sys::signal::Signal::SIGCONT);
    let out = paused.wait_with_output().unwrap();
    let paused_manifest = store
        .aws(&[
            "s3api",
            "head-object",
            "--bucket",
            "bb-crash",
            "--key",
            &format!("site/vm1/{id}/manifest.json").replacen("site/", "paused/", 1),
        ])
        .status
        .success();
    eprintln!(
        "the sync across the pause: {:?}, {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => {
            assert!(paused_manifest, "a sync that succeeded left no manifest");
            let restored = dir.path().join("restored-paused.raw");
            restores_right("s3://bb-crash/paused", &vm.points[0], &restored, &env);
        }
        code => {
            assert_eq!(code, Some(1), "{}", String::from_utf8_lossy(&out.stderr));
            assert!(!paused_manifest, "a failed sync left a manifest");
        }
    }
    let uploads = store.aws_ok(&["s3api", "list-multipart-uploads", "--bucket", "bb-crash"]);
    let left = uploads
        .get("Uploads")
        .and_then(|u| u.as_array())
        .map_or(0, Vec::len);
    assert_eq!(left, 0, "dead uploads left: {uploads}");
    let out = dir.path().join("restored.raw");
    restores_right("s3://bb-crash/site", &vm.points[0], &out, &env);
}

/// `bitback run` with a VM going to a directory and a bucket (through a
/// spool): each run backs up into both, one after the other, and prunes
/// both by the job's rule; the bucket's newest point restores to the
/// disk.
#[test]
fn a_job_backs_up_into_a_directory_and_a_bucket_and_prunes_both() {
    let store = Seaweed::start();
    store.bucket("bb-job", false);
    let dir = tempdir();
    let d = dir.path();
    let mut vm = Vm::new(d, &[8 * MIB]);
    let (local, spool) = (d.join("local"), d.join("spool"));
    let job = d.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "jobs = 2\n[[vm]]\nname = \"vm1\"\nqmp = {:?}\nrepos = [{local:?}, \"s3://bb-job/site\"]\n\
             spool = {spool:?}\nfull_every = 1\nkeep_last = 1\nverify_outdated_after = \"1d\"\n",
            vm.qemu().qmp
        ),
    )
    .unwrap();
    let env = store.env();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", job.to_str().unwrap(), "--json"];
        args.extend(extra);
        bitback_env(&args, &env)
    };
    let plan = run(&["--dry-run"]);
    assert_eq!(plan.code, Some(0), "{}", plan.stderr);
    let mut ids = Vec::new();
    for round in 0..2u8 {
        vm.write(0, u64::from(round) * MIB, MIB, 0x40 + round);
        let out = run(&[]);
        assert_eq!(
            out.code,
            Some(0),
            "round {round}: {}\n{}",
            out.stdout,
            out.stderr
        );
        let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        let tasks = report["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 2, "{report}");
        // Verify after the backup where the repository keeps its records.
        assert_eq!(tasks[0]["verified"]["ok"], true, "{report}");
        assert_eq!(tasks[1]["verified"], serde_json::Value::Null, "{report}");
        if round == 1 {
            for t in tasks {
                assert_eq!(t["pruned"].as_array().map(Vec::len), Some(1), "{report}");
            }
        }
        ids.push(tasks[1]["backup"].as_str().unwrap().to_string());
        vm.snapshot(tasks[1]["backup"].as_str().unwrap());
    }
    // One point left in each.
    for repo in [local.to_str().unwrap(), "s3://bb-job/site"] {
        let listed = bitback_env(&["list", "--repo", repo, "--vm", "vm1", "--json"], &env);
        let points: serde_json::Value = serde_json::from_str(&listed.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}{}", listed.stdout, listed.stderr));
        assert_eq!(points.as_array().map(Vec::len), Some(1), "{repo}: {points}");
    }
    let out = d.join("from-bucket.raw");
    let restored = bitback_env(
        &[
            "restore",
            "--repo",
            "s3://bb-job/site",
            "--vm",
            "vm1",
            "--output",
            out.to_str().unwrap(),
        ],
        &env,
    );
    assert_eq!(restored.code, Some(0), "{}", restored.stderr);
    assert!(same_content(&out, "raw", &vm.points[1].1[0], "raw"));
}

/// A quit VM of volumes of `sizes` backed up `backups` times (`writes`
/// random writes before each, and data in each volume's first cluster
/// before the first, whatever the random writes hit) into its directory
/// repository, which is then copied to `url` as `aws s3 sync` copies it;
/// its directory.
fn points_in_bucket(
    store: &Seaweed,
    url: &str,
    sizes: &[u64],
    backups: usize,
    writes: usize,
) -> (tempfile::TempDir, Vm) {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), sizes);
    let mut rng = Rng::from_env();
    for volume in 0..sizes.len() {
        vm.write(volume, 0, 64 << 10, 0x77);
    }
    for _ in 0..backups {
        vm.random_writes(&mut rng, writes);
        vm.backup(&[]);
    }
    vm.quit();
    store.aws_ok(&["s3", "sync", vm.repo.to_str().unwrap(), url]);
    (dir, vm)
}

/// `bitback ARGS` with the store's credentials and runtime `rt`.
fn served_run(rt: &crate::instant::Runtime, args: &[&str], env: &[(&str, &str)]) -> Run {
    let runtime = rt.path().to_str().unwrap().to_string();
    let mut env = env.to_vec();
    env.push(("BITBACK_RUNTIME_DIR", &runtime));
    bitback_env(args, &env)
}

/// A mount from a bucket whose store stalls (a NAS link that crawls):
/// the reads wait for the store, none fails or gives other bytes, and
/// they finish right once it answers again. A mount killed after its
/// bucket server started but before its daemon did: the server ends at
/// once (no client is coming), `serving` shows the serve ended, a prune
/// removes its lease and goes on, and a new mount there works.
#[test]
fn a_bucket_mount_waits_out_a_stalled_store_and_a_killed_one_is_cleared() {
    use crate::instant::{Runtime, alive, paths, wait_gone};
    use nix::sys::signal::Signal;
    let store = Seaweed::start();
    store.bucket("bb-stall", false);
    let rt = Runtime::new();
    let url = "s3://bb-stall/site";
    // More data than the server keeps read (its windows): the reads
    // after the stop must go to the store.
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[64 * MIB]);
    vm.write(0, MIB, 56 * MIB, 0x5b);
    vm.random_writes(&mut Rng::from_env(), 20);
    vm.backup(&[]);
    vm.quit();
    store.aws_ok(&["s3", "sync", vm.repo.to_str().unwrap(), url]);
    let env = store.env();
    let mnt = dir.path().join("mnt");
    let mount = |extra: &[(&str, &str)]| {
        let mut env = env.clone();
        env.extend_from_slice(extra);
        served_run(
            &rt,
            &[
                "mount",
                "--repo",
                url,
                "--vm",
                "vm1",
                "--json",
                mnt.to_str().unwrap(),
            ],
            &env,
        )
    };
    let served = mount(&[]).json();
    let file = paths(&served)[0].clone();

    store.signal(Signal::SIGSTOP);
    let (reading, done) = std::sync::mpsc::channel();
    let reader = std::thread::spawn({
        let file = file.clone();
        move || {
            let read = std::fs::read(&file);
            let _ = reading.send(());
            read
        }
    });
    let early = done.recv_timeout(std::time::Duration::from_secs(10));
    store.signal(Signal::SIGCONT);
    assert!(
        early.is_err(),
        "a read finished while the store was stopped"
    );
    let bytes = reader
        .join()
        .unwrap()
        .expect("reading the mount once the store is back");
    assert!(
        bytes == std::fs::read(&vm.points[0].1[0]).unwrap(),
        "the mount read other bytes than the disk held"
    );
    let out = served_run(&rt, &["umount", mnt.to_str().unwrap()], &env);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    wait_gone(served["server"].as_u64().unwrap());

    // Killed between its server and its daemon.
    let killed = mount(&[("BITBACK_FAULT", "serve-before-daemon")]);
    assert_eq!(killed.code, None, "{}{}", killed.stdout, killed.stderr);
    let servers: Vec<u64> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let runtime = rt.path().to_str().unwrap().as_bytes();
            cmdline.split(|b| *b == 0).any(|a| a == b"serve-bucket")
                && environ.windows(runtime.len()).any(|w| w == runtime)
        })
        .collect();
    assert!(servers.len() <= 1, "{servers:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while servers.iter().any(|&pid| alive(pid)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the killed mount's server still runs"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let serving = served_run(
        &rt,
        &["serving", "--repo", url, "--vm", "vm1", "--json"],
        &env,
    );
    assert_eq!(serving.code, Some(0), "{}", serving.stderr);
    let statuses: Vec<String> = serving.json()["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["lease"]["status"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(statuses.iter().all(|s| s != "serving"), "{statuses:?}");
    let prune = ["prune", "--repo", url, "--vm", "vm1", "--keep-last", "2"];
    let pruned = served_run(&rt, &prune, &env);
    assert_eq!(pruned.code, Some(0), "{}", pruned.stderr);
    let left = store.aws_ok(&[
        "s3api",
        "list-objects-v2",
        "--bucket",
        "bb-stall",
        "--prefix",
        "site/vm1/.serving/",
    ]);
    assert!(left.get("Contents").is_none(), "{left}");
    let again = mount(&[]);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    let out = served_run(&rt, &["umount", mnt.to_str().unwrap()], &env);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(rt.entries().is_empty(), "{:?}", rt.entries());
}

/// A point in a bucket served where it lies: `mount` (FUSE files through
/// a qemu-storage-daemon reading bitback's bucket server), `export`
/// (bitback's NBD server in the foreground) and `restore --live` (a QEMU
/// runs on images backed by the bucket's point, then `--finish` streams
/// the rest in). Every read equals the disk at its backup, judged by
/// `qemu-img compare` against the models; the bucket's server ends with
/// what it serves. A file altered before it reached the bucket is never
/// served: reading its damaged cluster is an I/O error, the other clusters
/// read right, and a damage record lands in the bucket.
#[test]
fn a_point_in_a_bucket_is_mounted_exported_and_restored_live_where_it_lies() {
    use crate::instant::{
        Runtime, alive, assert_restored, backing_of, paths, vm_on, wait_gone, wait_output,
    };
    let store = Seaweed::start();
    store.bucket("bb-serve", false);
    let rt = Runtime::new();
    let url = "s3://bb-serve/site";
    let (dir, vm) = points_in_bucket(&store, url, &[12 * MIB, 4 * MIB], 2, 10);
    let env = store.env();
    let (first, second) = (vm.points[0].0.clone(), vm.points[1].0.clone());

    // mount: each point's files read as its models; no writes.
    let mut mounts = Vec::new();
    for (i, id) in [&first, &second].into_iter().enumerate() {
        let mnt = dir.path().join(format!("mnt{i}"));
        let m = served_run(
            &rt,
            &[
                "mount",
                "--repo",
                url,
                "--vm",
                "vm1",
                "--backup",
                id,
                "--json",
                mnt.to_str().unwrap(),
            ],
            &env,
        )
        .json();
        assert_eq!(m["backup"], id.as_str());
        let files = paths(&m);
        assert_eq!(files, [mnt.join("drive0.raw"), mnt.join("drive1.raw")]);
        for (v, file) in files.iter().enumerate() {
            assert!(
                same_content(file, "raw", &vm.points[i].1[v], "raw"),
                "{} differs from its model",
                file.display()
            );
        }
        let written = std::fs::OpenOptions::new()
            .write(true)
            .open(&files[0])
            .and_then(|mut f| std::io::Write::write_all(&mut f, &[1u8; 512]));
        assert!(written.is_err(), "a bucket's mount took a write");
        let server = m["server"].as_u64().expect("the bucket server's pid");
        assert!(alive(server));
        mounts.push((mnt, m["pid"].as_u64().unwrap(), server));
    }
    // Each serve leaves a lease in the bucket, and a prune keeps off.
    let leases = || {
        let listed = store.aws_ok(&[
            "s3api",
            "list-objects-v2",
            "--bucket",
            "bb-serve",
            "--prefix",
            "site/vm1/.serving/",
        ]);
        listed["Contents"].as_array().map_or(0, Vec::len)
    };
    assert_eq!(leases(), 2);
    let serving = served_run(
        &rt,
        &["serving", "--repo", url, "--vm", "vm1", "--json"],
        &env,
    )
    .json();
    let statuses: Vec<&str> = serving["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["lease"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["serving", "serving"], "{serving}");
    let prune = ["prune", "--repo", url, "--vm", "vm1", "--keep-last", "1"];
    let refused = served_run(&rt, &prune, &env);
    assert_ne!(refused.code, Some(0), "{}", refused.stdout);
    assert!(
        refused.stderr.contains("bitback mount of backup"),
        "{}",
        refused.stderr
    );
    // The first mount's server killed: its file's reads fail, never
    // giving other bytes; umount still ends it all.
    let (killed_mnt, _, killed) = &mounts[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(*killed as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_gone(*killed);
    let file = std::fs::File::open(killed_mnt.join("drive0.raw")).unwrap();
    let mut buf = vec![0u8; 65536];
    let read = std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 3 * MIB);
    assert!(read.is_err(), "a read with its server gone gave bytes");
    drop(file);
    for (mnt, pid, server) in mounts {
        let out = served_run(&rt, &["umount", mnt.to_str().unwrap()], &env);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        wait_gone(pid);
        // The server ends with the daemon that read from it.
        wait_gone(server);
        assert!(!mnt.exists());
    }
    assert!(rt.entries().is_empty(), "{:?}", rt.entries());
    assert_eq!(leases(), 0, "umount left its lease in the bucket");
    let keep_both = ["prune", "--repo", url, "--vm", "vm1", "--keep-last", "2"];
    let pruned = served_run(&rt, &keep_both, &env);
    assert_eq!(pruned.code, Some(0), "{}", pruned.stderr);

    // export: bitback's own NBD server, in the foreground.
    let socket = dir.path().join("export.sock");
    let mut export = std::process::Command::new(env!("CARGO_BIN_EXE_bitback"))
        .args(["export", "--repo", url, "--vm", "vm1", "--volume", "drive0"])
        .arg("--socket")
        .arg(&socket)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !socket.exists() {
        assert!(
            export.try_wait().unwrap().is_none(),
            "export ended early: {:?}",
            export.wait_with_output()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "export never listened"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let nbd = format!("nbd+unix:///drive0?socket={}", socket.display());
    let compare = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &nbd])
        .arg(&vm.points[1].1[0])
        .output()
        .unwrap();
    assert!(
        compare.status.success(),
        "the export differs from its model: {}",
        String::from_utf8_lossy(&compare.stdout)
    );
    // Read-only: qemu-io's write is refused by the server.
    let write = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k", &nbd])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&write.stderr).to_string()
        + &String::from_utf8_lossy(&write.stdout);
    assert!(
        !write.status.success() || said.contains("read-only") || said.contains("ermission"),
        "a write went through: {said}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(export.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stopped = wait_output(&mut export);
    assert!(stopped.status.success(), "{stopped:?}");
    assert!(!socket.exists(), "the export left its socket");

    // restore --live: a VM runs on the bucket's point, then stands alone.
    let out = dir.path().join("live");
    let live = served_run(
        &rt,
        &[
            "restore",
            "--repo",
            url,
            "--vm",
            "vm1",
            "--backup",
            &second,
            "--live",
            "--json",
            "--output",
            out.to_str().unwrap(),
        ],
        &env,
    )
    .json();
    let images = paths(&live);
    let server = live["server"].as_u64().expect("the bucket server's pid");
    for (i, image) in images.iter().enumerate() {
        assert!(backing_of(image).unwrap().starts_with("nbd+unix:///vm1/"));
        assert!(same_content(image, "qcow2", &vm.points[1].1[i], "raw"));
    }
    assert_eq!(leases(), 1);
    let refused = served_run(&rt, &prune, &env);
    assert!(
        refused.stderr.contains("a live restore of backup"),
        "{}",
        refused.stderr
    );
    let mut vm2 = vm_on(&dir.path().join("vm2"), &images, &vm);
    for (i, model) in vm2.models.iter_mut().enumerate() {
        model.bytes = std::fs::read(&vm.points[1].1[i]).unwrap();
    }
    vm2.write(0, MIB + 512, 70_000, 0x77);
    let mut finishing = rt
        .command()
        .args(["restore", "--finish", "--json", "--qmp"])
        .arg(&vm2.qemu().qmp)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let done = wait_output(&mut finishing);
    assert!(done.status.success(), "{done:?}");
    assert_restored(&mut vm2, &images);
    wait_gone(live["pid"].as_u64().unwrap());
    wait_gone(server);
    assert_eq!(leases(), 0, "--finish left the lease in the bucket");

    // A point whose file was altered before it reached the bucket.
    let bad_repo = dir.path().join("bad-repo");
    run(std::process::Command::new("cp")
        .arg("-a")
        .arg(&vm.repo)
        .arg(&bad_repo));
    let full = bad_repo.join("vm1").join(&first).join("drive0.qcow2");
    let map = run(std::process::Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(&full));
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let extent = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["data"] == true && e["offset"].is_u64())
        .expect("a data extent");
    let (guest, host) = (
        extent["start"].as_u64().unwrap(),
        extent["offset"].as_u64().unwrap(),
    );
    let mut bytes = std::fs::read(&full).unwrap();
    bytes[host as usize + 100] ^= 0xff;
    std::fs::write(&full, &bytes).unwrap();
    store.aws_ok(&[
        "s3",
        "sync",
        bad_repo.to_str().unwrap(),
        "s3://bb-serve/bad",
    ]);
    let mnt = dir.path().join("mnt-bad");
    let mount_bad = served_run(
        &rt,
        &[
            "mount",
            "--repo",
            "s3://bb-serve/bad",
            "--vm",
            "vm1",
            "--backup",
            &first,
            "--json",
            mnt.to_str().unwrap(),
        ],
        &env,
    );
    let manifest = std::fs::read(vm.repo.join("vm1").join(&first).join("manifest.json")).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    if manifest["volumes"][0]["cluster_map"].is_null() {
        // No cluster maps (QEMU wrote the files): the chain's digests are
        // read whole before anything is served, and this one fails.
        assert_eq!(mount_bad.code, Some(2), "{}", mount_bad.stdout);
        assert!(
            mount_bad.stderr.contains("does not verify") && mount_bad.stderr.contains("drive0"),
            "{}",
            mount_bad.stderr
        );
        assert!(!mnt.exists(), "a refused mount left {}", mnt.display());
        assert!(rt.entries().is_empty(), "{:?}", rt.entries());
        return;
    }
    let m = mount_bad.json();
    let file = std::fs::File::open(mnt.join("drive0.raw")).unwrap();
    let mut buf = vec![0u8; 4096];
    let damaged = std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, guest);
    assert!(damaged.is_err(), "the damaged cluster was served");
    // Elsewhere it reads as its model.
    let model = std::fs::read(&vm.points[0].1[0]).unwrap();
    let far = (guest + 2 * MIB) % (12 * MIB);
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, far).unwrap();
    assert_eq!(buf, model[far as usize..far as usize + 4096]);
    drop(file);
    let record = store.read(
        "bb-serve",
        &format!("bad/vm1/.damaged/{first}.drive0.json"),
        dir.path(),
    );
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    assert!(
        record["problem"]
            .as_str()
            .unwrap()
            .contains("does not hold what its cluster map recorded"),
        "{record}"
    );
    let out = served_run(&rt, &["umount", mnt.to_str().unwrap()], &env);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    wait_gone(m["pid"].as_u64().unwrap());
}

/// A VM's index in the bucket (`<vm>/.points.json`, written by prune and
/// by each sync or backup that copies a point) saves a listing a GET per
/// point, and is never believed: a listing with it equals one without
/// it; a copy whose bytes are not the manifest version the store lists
/// (its entity tag) is not taken, and a point the index names that the
/// bucket does not hold is not listed.
#[test]
fn a_listing_takes_manifests_from_the_index_only_where_the_store_vouches_for_them() {
    let store = Seaweed::start();
    store.bucket("bb-index", false);
    let (dir, _vm) = points_in_bucket(&store, "s3://bb-index/site", &[4 * MIB], 3, 4);
    let env = store.env();
    let list = || {
        let run = bitback_env(
            &["list", "-v", "--repo", "s3://bb-index/site", "--json"],
            &env,
        );
        let listed = run.json();
        (listed, run.stderr)
    };
    let (without, said) = list();
    assert_eq!(without.as_array().unwrap().len(), 3, "{without}");
    assert!(!said.contains("taken from the index"), "{said}");
    let pruned = bitback_env(
        &[
            "prune",
            "--repo",
            "s3://bb-index/site",
            "--vm",
            "vm1",
            "--keep-last",
            "3",
        ],
        &env,
    );
    assert_eq!(pruned.code, Some(0), "{}", pruned.stderr);
    let index = store.read("bb-index", "site/vm1/.points.json", dir.path());
    let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
    assert_eq!(index["points"].as_array().unwrap().len(), 3, "{index}");
    let (with, said) = list();
    assert_eq!(with, without);
    assert!(said.contains("from_index=3"), "{said}");

    // A forged index: one copy altered, one point that is not there.
    let mut forged = index.clone();
    let points = forged["points"].as_array_mut().unwrap();
    let text = points[1]["manifest"].as_str().unwrap().to_string();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["reason"] = "forged".into();
    points[1]["manifest"] = m.to_string().into();
    let mut fake = points[2].clone();
    let mut m: serde_json::Value =
        serde_json::from_str(fake["manifest"].as_str().unwrap()).unwrap();
    m["id"] = "20990101T000000Z".into();
    fake["key"] = "vm1/20990101T000000Z/manifest.json".into();
    fake["manifest"] = m.to_string().into();
    points.push(fake);
    let file = dir.path().join("forged.json");
    std::fs::write(&file, serde_json::to_vec(&forged).unwrap()).unwrap();
    store.aws_ok(&[
        "s3api",
        "put-object",
        "--bucket",
        "bb-index",
        "--key",
        "site/vm1/.points.json",
        "--body",
        file.to_str().unwrap(),
    ]);
    let (forged_list, said) = list();
    assert_eq!(forged_list, without);
    assert!(said.contains("from_index=2"), "{said}");
}
