//! What operators' hosts do to a backup tool: several repositories and VM
//! names on one QEMU, another machine under a known name, a clock that
//! steps back, private data, hostile repository files, slow or failing
//! guest agents, a proxy that mangles events or loses a reply. Every point
//! is judged against raw models with `qemu-img compare`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::Vm;
use crate::harness::{
    Disk, Kind, Qemu, backup_into, backup_into_env, bitback, create_qcow2, run, same_content,
    tempdir,
};

const MIB: u64 = 1 << 20;

/// `bitback backup --json` of `vm`'s QEMU into `repo` as `name`.
fn backup_as(vm: &Vm, repo: &Path, name: &str, extra: &[&str]) -> crate::harness::Run {
    backup_into(&vm.qemu().qmp, repo, name, extra)
}

fn bitmaps_of(qemu: &Qemu, node: &str) -> Vec<String> {
    qemu.must("query-named-block-nodes", json!({"flat": true}))
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["node-name"] == node)
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

fn list_ids(repo: &Path, name: &str) -> Vec<String> {
    crate::harness::list_ids(repo, Some(name))
}

/// Every file and directory under `dir`, with its mode.
fn modes(dir: &Path) -> Vec<(PathBuf, u32, bool)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        out.push((
            entry.path(),
            meta.permissions().mode() & 0o777,
            meta.is_dir(),
        ));
        if meta.is_dir() {
            out.extend(modes(&entry.path()));
        }
    }
    out
}

#[test]
fn one_qemu_in_two_repositories_and_under_two_names_keeps_every_chain() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[8 * MIB]);
    let local = dir.path().join("local");
    let offsite = dir.path().join("offsite");
    let targets = [(&local, "vm1"), (&offsite, "vm1"), (&offsite, "vm2")];
    // A bitmap of a bitback from before repository ids, and one of a
    // repository that is not here: neither may be touched.
    vm.qemu()
        .add_bitmap("drive0", "bitback-20200101T000000Z", true);
    vm.qemu().add_bitmap(
        "drive0",
        "bitback-0badc0de-elsewhere-20200101T000000Z",
        true,
    );
    // (target, id, model file)
    let mut points: Vec<(usize, String, PathBuf)> = Vec::new();
    for round in 0..4u64 {
        vm.write(0, round * MIB + 4096, 64 << 10, 0x40 + round as u8);
        let model = dir.path().join(format!("model-{round}.raw"));
        std::fs::write(&model, &vm.models[0].bytes).unwrap();
        if round >= 2 {
            // Seconds apart as well as within one second.
            std::thread::sleep(Duration::from_millis(1100));
        }
        for (t, (repo, name)) in targets.iter().enumerate() {
            let m = backup_as(&vm, repo, name, &[]).json();
            let want = if round == 0 { "full" } else { "incremental" };
            assert_eq!(
                m["kind"],
                want,
                "{name} in {}: {}",
                repo.display(),
                m["reason"]
            );
            points.push((t, m["id"].as_str().unwrap().to_string(), model.clone()));
        }
        let names = bitmaps_of(vm.qemu(), "drive0");
        assert_eq!(
            names.len(),
            5,
            "one checkpoint per repository and name: {names:?}"
        );
    }
    let inspect = bitback(&["inspect", "--qmp", vm.qemu().qmp.to_str().unwrap()]);
    assert!(
        inspect.stdout.contains("bitback repo"),
        "{}",
        inspect.stdout
    );
    assert!(inspect.stdout.contains("vm vm2"), "{}", inspect.stdout);

    // A repository that is gone: its checkpoint is removed on purpose.
    let foreign = "bitback-0badc0de-elsewhere-20200101T000000Z";
    let removed = bitback(&[
        "remove-checkpoint",
        "--qmp",
        vm.qemu().qmp.to_str().unwrap(),
        "--name",
        foreign,
    ]);
    assert_eq!(removed.code, Some(0), "{}", removed.stderr);
    let names = bitmaps_of(vm.qemu(), "drive0");
    assert!(!names.contains(&foreign.to_string()), "{names:?}");
    assert!(names.contains(&"bitback-20200101T000000Z".to_string()));
    let refused = bitback(&[
        "remove-checkpoint",
        "--qmp",
        vm.qemu().qmp.to_str().unwrap(),
        "--name",
        "not-ours",
    ]);
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);

    vm.quit();
    for (t, id, model) in &points {
        let (repo, name) = targets[*t];
        let file = repo.join(name).join(id).join("drive0.qcow2");
        assert!(
            same_content(model, "raw", &file, "qcow2"),
            "{name} in {}: backup {id} differs from its model",
            repo.display()
        );
    }
}

#[test]
fn a_different_machine_under_a_known_name_is_refused() {
    let dir = tempdir();
    let a_dir = dir.path().join("a");
    let b_dir = dir.path().join("b");
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let repo = dir.path().join("repo");
    let start = |d: &Path, uuid: &str, name: &str| {
        let image = d.join("disk0.qcow2");
        create_qcow2(&image, 4 * MIB, &[]);
        let extra = ["-uuid", uuid, "-name", name].map(String::from);
        Qemu::start_with(
            Kind::MachineNone,
            d,
            &[Disk::new("disk0", "drive0", &image)],
            &extra,
        )
    };
    let a = start(&a_dir, "11111111-2222-3333-4444-555555555555", "web");
    let b = start(&b_dir, "99999999-2222-3333-4444-555555555555", "db");
    let backup = |q: &Qemu, extra: &[&str]| backup_into(&q.qmp, &repo, "vm1", extra);
    assert_eq!(backup(&a, &[]).json()["kind"], "full");
    let state = std::fs::read(repo.join("vm1/state.json")).unwrap();
    let refused = backup(&b, &[]);
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    for needle in [
        "11111111-2222",
        "99999999-2222",
        "different machine",
        "--vm-replaced",
    ] {
        assert!(
            refused.stderr.contains(needle),
            "{needle}: {}",
            refused.stderr
        );
    }
    assert_eq!(std::fs::read(repo.join("vm1/state.json")).unwrap(), state);
    assert_eq!(list_ids(&repo, "vm1").len(), 1);
    assert!(
        bitmaps_of(&b, "drive0").is_empty(),
        "nothing added to the other QEMU"
    );

    let replaced = backup(&b, &["--vm-replaced"]).json();
    assert_eq!(replaced["kind"], "full");
    assert!(
        replaced["reason"].as_str().unwrap().contains("replaced"),
        "{}",
        replaced["reason"]
    );
    assert_eq!(backup(&b, &[]).json()["kind"], "incremental");
    // Now the first machine is the stranger.
    assert_eq!(backup(&a, &[]).code, Some(2));
    a.quit();
    b.quit();
}

#[test]
fn the_clock_stepping_back_keeps_ids_order_and_chains() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[4 * MIB]);
    let repo = vm.repo.clone();
    let back = [("BITBACK_CLOCK_OFFSET", "-3600")];
    let mut ids = Vec::new();
    for (i, env) in [&[][..], &back[..], &back[..]].into_iter().enumerate() {
        vm.write(0, i as u64 * MIB, 4096, 0x60 + i as u8);
        let extra: &[&str] = if i == 2 { &["--full"] } else { &[] };
        let m = backup_into_env(&vm.qemu().qmp, &repo, "vm1", extra, env).json();
        let want = ["full", "incremental", "full"][i];
        assert_eq!(m["kind"], want, "{}", m["reason"]);
        assert_eq!(m["seq"], i as u64 + 1);
        ids.push(m["id"].as_str().unwrap().to_string());
        vm.snapshot(m["id"].as_str().unwrap());
    }
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, ids, "ids keep increasing when the clock steps back");
    assert_eq!(list_ids(&repo, "vm1"), ids);

    // "latest" is the newest point, not the one with the latest clock.
    let out = dir.path().join("latest.raw");
    let restored = vm.cli("restore", &["--output", out.to_str().unwrap()]);
    assert_eq!(restored.code, Some(0), "{}", restored.stderr);
    assert!(same_content(&vm.points[2].1[0], "raw", &out, "raw"));

    let pruned = vm.cli("prune", &["--keep-last", "1", "--json"]).json();
    assert_eq!(pruned["kept"], json!([ids[2]]));
    assert_eq!(pruned["deleted"], json!([ids[0], ids[1]]));
    vm.quit();
}

#[test]
fn repository_files_and_restores_are_private_unless_asked() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[4 * MIB]);
    vm.write(0, 0, 4096, 0x11);
    vm.backup(&[]);
    vm.write(0, MIB, 4096, 0x12);
    vm.backup(&[]);
    for (path, mode, is_dir) in modes(&vm.repo) {
        let want = if is_dir { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{}: {mode:o}", path.display());
    }
    let out = dir.path().join("out.raw");
    assert_eq!(vm.restore("latest", &out, &[]).code, Some(0));
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");

    let shared = dir.path().join("shared.raw");
    let granted = vm.cli(
        "restore",
        &["--umask", "027", "--output", shared.to_str().unwrap()],
    );
    assert_eq!(granted.code, Some(0), "{}", granted.stderr);
    let mode = std::fs::metadata(&shared).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "{mode:o}");
    vm.quit();
}

/// A VM with a chain of three backups (full, two incrementals), stopped.
fn chain_of_three(dir: &Path) -> (Vm, Vec<String>) {
    let mut vm = Vm::new(dir, &[4 * MIB]);
    let mut ids = Vec::new();
    for i in 0..3u64 {
        vm.write(0, i * MIB, 64 << 10, 0x21 + i as u8);
        ids.push(vm.backup(&[])["id"].as_str().unwrap().to_string());
    }
    vm.quit();
    (vm, ids)
}

fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    // Lock files change with every run that takes them, and verify
    // records the backups it found whole (`.verified/`).
    let mut out: Vec<(PathBuf, Vec<u8>)> = modes(dir)
        .into_iter()
        .filter(|(p, _, is_dir)| {
            !is_dir
                && !p.ends_with(".lock")
                && !p.ends_with(".readers")
                && !p.parent().is_some_and(|d| d.ends_with(".verified"))
        })
        .map(|(p, _, _)| {
            let bytes = std::fs::read(&p).unwrap_or_default();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_backup_file_with_an_external_data_file_is_refused_everywhere() {
    let dir = tempdir();
    let (vm, ids) = chain_of_three(dir.path());
    let secret = dir.path().join("host-secret.raw");
    std::fs::write(&secret, vec![0x5a; 4 * MIB as usize]).unwrap();
    let planted = vm.repo.join("vm1").join(&ids[0]).join("drive0.qcow2");
    std::fs::remove_file(&planted).unwrap();
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .arg(format!("data_file={},data_file_raw=on", secret.display()))
        .arg(&planted)
        .arg("4M"));
    let out = dir.path().join("out.raw");
    let restored = vm.restore(&ids[2], &out, &["--no-verify"]);
    assert_ne!(restored.code, Some(0));
    assert!(
        restored.stderr.contains("external data file"),
        "{}",
        restored.stderr
    );
    assert!(!out.exists(), "nothing restored");
    let verified = vm.cli("verify", &[]);
    assert_eq!(verified.code, Some(1));
    assert!(
        verified.stdout.contains("external data file"),
        "{}",
        verified.stdout
    );
    let before = tree(&vm.repo);
    let consolidated = vm.cli("consolidate", &["--max-chain", "1"]);
    assert_ne!(consolidated.code, Some(0), "{}", consolidated.stdout);
    assert_eq!(tree(&vm.repo), before, "consolidate changed nothing");
    let socket = dir.path().join("export.sock");
    let exported = vm.cli(
        "export",
        &["--volume", "drive0", "--socket", socket.to_str().unwrap()],
    );
    assert_ne!(exported.code, Some(0));
    assert!(
        exported.stderr.contains("external data file"),
        "{}",
        exported.stderr
    );
}

#[test]
fn planted_symlinks_and_parent_loops_are_refused_without_harm() {
    let dir = tempdir();
    let (mut vm, ids) = chain_of_three(dir.path());
    let outside = dir.path().join("outside.txt");
    std::fs::write(&outside, b"keep me").unwrap();
    let vm_dir = vm.repo.join("vm1");
    // The lock planted as a link out of the repository.
    std::fs::remove_file(vm_dir.join(".lock")).unwrap();
    std::os::unix::fs::symlink(&outside, vm_dir.join(".lock")).unwrap();
    std::os::unix::fs::symlink(&outside, vm_dir.join(".state.json.tmp")).unwrap();
    vm.start();
    let refused = vm.run_backup(&[]);
    assert_ne!(refused.code, Some(0), "{}", refused.stderr);
    assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");
    std::fs::remove_file(vm_dir.join(".lock")).unwrap();
    // A planted temp name is never written through.
    let ok = vm.run_backup(&["--json"]);
    assert_eq!(ok.code, Some(0), "{}", ok.stderr);
    assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");
    vm.quit();

    // Two manifests that name each other as parent.
    let edit = |id: &str, parent: &str| {
        let path = vm_dir.join(id).join("manifest.json");
        let mut m: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        m["parent"] = json!(parent);
        for v in m["volumes"].as_array_mut().unwrap() {
            v["backing"] = json!(format!("../{parent}/drive0.qcow2"));
        }
        std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    };
    edit(&ids[1], &ids[2]);
    edit(&ids[2], &ids[1]);
    let before = tree(&vm.repo);
    let started = Instant::now();
    let pruned = vm.cli("prune", &["--keep-last", "1"]);
    assert_eq!(pruned.code, Some(2), "{}", pruned.stderr);
    assert!(pruned.stderr.contains("loops"), "{}", pruned.stderr);
    let out = dir.path().join("out.raw");
    let restored = vm.restore(&ids[2], &out, &["--no-verify"]);
    assert_ne!(restored.code, Some(0));
    assert!(restored.stderr.contains("loops"), "{}", restored.stderr);
    let verified = vm.cli("verify", &[]);
    assert_eq!(verified.code, Some(1));
    assert!(verified.stdout.contains("loops"), "{}", verified.stdout);
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(tree(&vm.repo), before, "nothing deleted or rewritten");

    // A manifest that is its own parent.
    edit(&ids[1], &ids[1]);
    let verified = vm.cli("verify", &[]);
    assert!(
        verified.stdout.contains("itself as its parent"),
        "{}",
        verified.stdout
    );
}

#[test]
fn consolidate_refuses_a_chain_with_bit_rot() {
    let dir = tempdir();
    let (vm, ids) = chain_of_three(dir.path());
    // One flipped byte in the middle incremental's data.
    let file = vm.repo.join("vm1").join(&ids[1]).join("drive0.qcow2");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let before = tree(&vm.repo);
    let consolidated = vm.cli("consolidate", &["--max-chain", "1"]);
    assert_ne!(consolidated.code, Some(0));
    assert!(
        consolidated.stderr.contains("digest"),
        "{}",
        consolidated.stderr
    );
    assert_eq!(tree(&vm.repo), before);
}

/// A guest agent stand-in that freezes slowly, or refuses to freeze or to
/// thaw; it logs (command, when it answered).
fn scripted_agent(
    path: &Path,
    freeze_delay: Duration,
    fail: Option<&'static str>,
) -> Arc<Mutex<Vec<(String, Instant)>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let listener = UnixListener::bind(path).unwrap();
    let seen = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut writer = stream.try_clone().unwrap();
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let cmd: Value = serde_json::from_str(&line).unwrap();
                let name = cmd["execute"].as_str().unwrap().to_string();
                if name == "guest-fsfreeze-freeze" {
                    std::thread::sleep(freeze_delay);
                }
                let reply = if fail == Some(name.as_str()) {
                    json!({"error": {"class": "GenericError", "desc": "scripted failure"}})
                } else if name == "guest-sync" {
                    json!({"return": cmd["arguments"]["id"]})
                } else {
                    json!({"return": 1})
                };
                seen.lock().unwrap().push((name, Instant::now()));
                if writeln!(writer, "{reply}").is_err() {
                    break;
                }
            }
        }
    });
    log
}

fn names(log: &Arc<Mutex<Vec<(String, Instant)>>>) -> Vec<String> {
    log.lock().unwrap().iter().map(|(n, _)| n.clone()).collect()
}

#[test]
fn a_slow_or_failing_guest_agent_never_leaves_the_guest_frozen() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[4 * MIB]);
    vm.write(0, 0, 4096, 0x71);
    let socket = |n: &str| dir.path().join(format!("qga-{n}.sock"));

    // The freeze answers after the timeout: the thaw follows the freeze.
    let slow = scripted_agent(&socket("slow"), Duration::from_secs(3), None);
    let qga = socket("slow");
    let run = vm.run_backup(&[
        "--quiesce",
        "--qga",
        qga.to_str().unwrap(),
        "--freeze-timeout",
        "1",
    ]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert_eq!(
        names(&slow),
        [
            "guest-sync",
            "guest-fsfreeze-freeze",
            "guest-sync",
            "guest-fsfreeze-thaw"
        ]
    );
    assert!(
        !vm.repo.join("vm1").join("state.json").exists(),
        "no backup was kept"
    );

    // A refused freeze is thawed too (it may have frozen some).
    let refusing = scripted_agent(
        &socket("refuse"),
        Duration::ZERO,
        Some("guest-fsfreeze-freeze"),
    );
    let qga = socket("refuse");
    let run = vm.run_backup(&["--quiesce", "--qga", qga.to_str().unwrap()]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert_eq!(
        names(&refusing).last().map(String::as_str),
        Some("guest-fsfreeze-thaw")
    );

    // A failed thaw: the backup is kept, but the run fails and says so.
    let no_thaw = scripted_agent(
        &socket("nothaw"),
        Duration::ZERO,
        Some("guest-fsfreeze-thaw"),
    );
    let qga = socket("nothaw");
    let run = vm.run_backup(&["--quiesce", "--qga", qga.to_str().unwrap()]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("may still be frozen"), "{}", run.stderr);
    assert!(names(&no_thaw).contains(&"guest-fsfreeze-thaw".to_string()));
    let ids = list_ids(&vm.repo, "vm1");
    assert_eq!(ids.len(), 1, "the backup itself is good");
    vm.snapshot(&ids[0]);
    vm.quit();
    vm.check_all_points();
}

#[test]
fn a_bitback_killed_while_the_guest_is_frozen_leaves_it_thawed() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[4 * MIB]);
    vm.write(0, 0, 4096, 0x72);
    let qga = dir.path().join("qga.sock");
    let agent = scripted_agent(&qga, Duration::ZERO, None);
    // SIGKILLed after the freeze, before the transaction: bitback cannot
    // thaw; its guard does, on a connection of its own.
    let killed = backup_into_env(
        &vm.qemu().qmp,
        &vm.repo,
        "vm1",
        &["--quiesce", "--qga", qga.to_str().unwrap()],
        &[("BITBACK_FAULT", "before-transaction")],
    );
    crate::harness::guest::assert_killed_and_thawed(&killed);
    assert_eq!(
        names(&agent),
        [
            "guest-sync",
            "guest-fsfreeze-freeze",
            // The guard: its connection's sync, the thaw's.
            "guest-sync",
            "guest-sync",
            "guest-fsfreeze-thaw"
        ]
    );
    // A backup that lives releases its guard: one thaw, bitback's own.
    let before = names(&agent).len();
    let m = vm.backup(&["--quiesce", "--qga", qga.to_str().unwrap()]);
    assert_eq!(m["kind"], "full");
    assert_eq!(
        names(&agent)[before..],
        [
            "guest-sync",
            "guest-fsfreeze-freeze",
            "guest-sync",
            "guest-fsfreeze-thaw"
        ]
    );
    vm.quit();
    vm.check_all_points();
}

/// Relays one QMP client to a real QEMU, changing what passes: event data
/// re-encoded as a JSON string (as libvirt's QMP proxy sends it), job
/// events dropped, or the reply to `transaction` swallowed. `add-fd` is
/// answered as unknown (descriptors cannot be relayed), so bitback opens
/// targets by name.
#[derive(Clone, Copy)]
enum Mangle {
    StringData,
    DropJobEvents,
    LoseTransactionReply,
}

fn proxy(listen: &Path, upstream: &Path, mangle: Mangle) {
    let listener = UnixListener::bind(listen).unwrap();
    let upstream = upstream.to_path_buf();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = UnixStream::connect(&upstream) else {
                return;
            };
            let mut to_client = client.try_clone().unwrap();
            let mut to_server = server.try_clone().unwrap();
            let swallow: Arc<Mutex<Vec<Value>>> = Arc::default();
            let swallow_up = swallow.clone();
            let mut reply_to_client = client.try_clone().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(client).lines() {
                    let Ok(line) = line else { break };
                    let cmd: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                    if cmd["execute"] == "add-fd" {
                        let reply = json!({"error": {"class": "CommandNotFound",
                            "desc": "The command add-fd has not been found"}, "id": cmd["id"]});
                        let _ = writeln!(reply_to_client, "{reply}");
                        continue;
                    }
                    if cmd["execute"] == "transaction" {
                        swallow_up.lock().unwrap().push(cmd["id"].clone());
                    }
                    if writeln!(to_server, "{line}").is_err() {
                        break;
                    }
                }
                // The client left: free QEMU's monitor for the next one.
                let _ = to_server.shutdown(std::net::Shutdown::Both);
            });
            std::thread::spawn(move || {
                for line in BufReader::new(server).lines() {
                    let Ok(line) = line else { break };
                    let mut msg: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                    let event = msg["event"].as_str().unwrap_or("").to_string();
                    match mangle {
                        Mangle::StringData if !event.is_empty() => {
                            msg["data"] = json!(msg["data"].to_string());
                        }
                        Mangle::DropJobEvents if event.contains("JOB") => continue,
                        Mangle::LoseTransactionReply
                            if msg.get("id").is_some()
                                && swallow.lock().unwrap().contains(&msg["id"]) =>
                        {
                            continue;
                        }
                        _ => {}
                    }
                    if writeln!(to_client, "{msg}").is_err() {
                        break;
                    }
                }
            });
        }
    });
}

#[test]
fn mangled_events_and_a_lost_transaction_reply_never_hang_a_backup() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[4 * MIB]);
    let upstream = vm.qemu().qmp.clone();
    for (n, mangle) in [Mangle::StringData, Mangle::DropJobEvents]
        .into_iter()
        .enumerate()
    {
        let socket = dir.path().join(format!("proxy-{n}.sock"));
        proxy(&socket, &upstream, mangle);
        vm.write(0, n as u64 * MIB, 64 << 10, 0x31 + n as u8);
        let run = vm.cli(
            "backup",
            &[
                "--qmp",
                socket.to_str().unwrap(),
                "--json",
                "--qmp-timeout",
                "20",
            ],
        );
        let m = run.json();
        vm.snapshot(m["id"].as_str().unwrap());
    }

    // The transaction is applied but its reply never comes.
    let socket = dir.path().join("proxy-lost.sock");
    proxy(&socket, &upstream, Mangle::LoseTransactionReply);
    vm.write(0, 2 * MIB, 64 << 10, 0x39);
    let started = Instant::now();
    let lost = vm.cli(
        "backup",
        &["--qmp", socket.to_str().unwrap(), "--qmp-timeout", "3"],
    );
    assert_eq!(lost.code, Some(1), "{}", lost.stderr);
    assert!(started.elapsed() < Duration::from_secs(60));
    // Undone by name: no job, no target node, only the old checkpoint.
    assert_eq!(vm.qemu().must("query-jobs", Value::Null), json!([]));
    let bitmaps = bitmaps_of(vm.qemu(), "drive0");
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
    let nodes = vm
        .qemu()
        .must("query-named-block-nodes", json!({"flat": true}));
    assert!(
        !nodes.to_string().contains("-t0\""),
        "a target node was left: {nodes}"
    );
    assert_eq!(list_ids(&vm.repo, "vm1").len(), 2);
    // And the chain goes on, with the lost run's writes in the next point.
    let m = vm.backup(&[]);
    assert_eq!(m["kind"], "incremental", "{}", m["reason"]);
    vm.quit();
    vm.check_all_points();
}

#[test]
fn small_things_operators_hit() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[4 * MIB, 4 * MIB]);
    // --qmp naming a regular file.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"").unwrap();
    let fresh = dir.path().join("fresh-repo");
    let run = bitback(&[
        "backup",
        "--qmp",
        file.to_str().unwrap(),
        "--repo",
        fresh.to_str().unwrap(),
        "--vm",
        "vm1",
    ]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("regular file"), "{}", run.stderr);
    assert!(
        !fresh.exists(),
        "a failed connection created the repository"
    );
    // No socket at all, and an empty VM name: nothing created either.
    for (qmp, name) in [
        (dir.path().join("none.sock"), "vm1"),
        (vm.qemu().qmp.clone(), ""),
    ] {
        let run = bitback(&[
            "backup",
            "--qmp",
            qmp.to_str().unwrap(),
            "--repo",
            fresh.to_str().unwrap(),
            "--vm",
            name,
        ]);
        assert_eq!(run.code, Some(2), "{}", run.stderr);
        assert!(!fresh.exists(), "{}", run.stderr);
    }

    vm.write(0, 0, 4096, 0x51);
    vm.write(1, 0, 4096, 0x52);
    let id = vm.backup(&[])["id"].as_str().unwrap().to_string();
    let one = dir.path().join("one.raw");
    let run = vm.restore(&id, &one, &[]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(!one.exists(), "one.raw must not become a directory");

    // What a killed restore left is removed by the next one.
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let stale = out.join(".drive0.raw.restoring-999999999");
    std::fs::write(&stale, b"partial").unwrap();
    let run = vm.restore(&id, &out, &[]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!stale.exists());
    assert!(same_content(
        &vm.points[0].1[0],
        "raw",
        &out.join("drive0.raw"),
        "raw"
    ));
    vm.quit();
}

/// A repository and its `cp -a` copy (the usual seed of an off-site
/// copy), backed up in turn and at once: the copy takes an id of its own
/// on its first run and says so, neither removes or reuses the other's
/// checkpoint, so every incremental of both is by bitmap, and every point
/// of both equals the disk at its time. (Before, the two shared an id:
/// each run removed the other's bitmap as stray, and two runs in the same
/// second made one bitmap name for two points, so an incremental of the
/// copy was built on the original's later checkpoint and lost writes.)
#[test]
fn a_copied_repository_gets_its_own_id_and_both_chains_stay_right() {
    let dir = tempdir();
    let mut vm = Vm::new(dir.path(), &[8 * MIB]);
    let ra = dir.path().join("ra");
    let rb = dir.path().join("rb");
    let mut points: Vec<(PathBuf, String, PathBuf)> = Vec::new();
    let mut round = 0u64;
    let mut write = |vm: &mut Vm| -> PathBuf {
        round += 1;
        vm.write(
            0,
            (round % 7) * MIB + 512 * round,
            96 << 10,
            0x30 + round as u8,
        );
        let model = dir.path().join(format!("model-{round}.raw"));
        std::fs::write(&model, &vm.models[0].bytes).unwrap();
        model
    };
    let model = write(&mut vm);
    let full = backup_as(&vm, &ra, "vm1", &[]).json();
    assert_eq!(full["kind"], "full");
    points.push((ra.clone(), full["id"].as_str().unwrap().into(), model));
    run(Command::new("cp").arg("-a").arg(&ra).arg(&rb));
    let id_of = |repo: &Path| -> String {
        let text = std::fs::read_to_string(repo.join(".bitback.json")).unwrap();
        serde_json::from_str::<Value>(&text).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let original = id_of(&ra);
    assert_eq!(id_of(&rb), original);

    // In turn: the copy, the original, the copy again.
    for (i, repo) in [&rb, &ra, &rb, &ra].into_iter().enumerate() {
        let model = write(&mut vm);
        let run = backup_as(&vm, repo, "vm1", &[]);
        if i == 0 {
            assert!(run.stderr.contains("copied"), "{}", run.stderr);
        }
        let m = run.json();
        assert_eq!(m["kind"], "incremental", "{m:#}");
        assert_eq!(m["volumes"][0]["changes"], "bitmap", "{m:#}");
        points.push((repo.clone(), m["id"].as_str().unwrap().into(), model));
    }
    assert_eq!(id_of(&ra), original, "the original keeps its id");
    assert_ne!(id_of(&rb), original, "the copy has an id of its own");

    // At once, twice: the same second, the same backup id in both.
    for _ in 0..2 {
        let model = write(&mut vm);
        let spawn = |repo: &Path| {
            let qmp = vm.qemu().qmp.clone();
            let repo = repo.to_path_buf();
            std::thread::spawn(move || backup_into(&qmp, &repo, "vm1", &[]))
        };
        let (a, b) = (spawn(&ra), spawn(&rb));
        for (repo, run) in [(&ra, a.join().unwrap()), (&rb, b.join().unwrap())] {
            let m = run.json();
            assert_eq!(m["kind"], "incremental", "{m:#}");
            points.push((
                repo.clone(),
                m["id"].as_str().unwrap().into(),
                model.clone(),
            ));
        }
    }
    // Whatever the runs at once found (a bitmap busy in the other's job
    // is read by content), both are by bitmap again after them.
    for repo in [&ra, &rb] {
        let model = write(&mut vm);
        let m = backup_as(&vm, repo, "vm1", &[]).json();
        assert_eq!(m["volumes"][0]["changes"], "bitmap", "{m:#}");
        points.push((repo.clone(), m["id"].as_str().unwrap().into(), model));
    }
    vm.quit();
    for (repo, id, model) in &points {
        let file = repo.join("vm1").join(id).join("drive0.qcow2");
        assert!(
            same_content(model, "raw", &file, "qcow2"),
            "{}: backup {id} differs from its model",
            repo.display()
        );
    }
}
