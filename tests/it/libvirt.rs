//! libvirt as a real part of the suite: transient and defined TCG domains
//! booting the sequence-log guest (fixtures/guest), run by libvirtd as
//! libvirt-qemu; bitback reaching them through libvirt's QMP proxy and
//! through an extra socket; libvirt's own block operations in between.
//! Every point restores to consistent prefixes of the guest's log.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::domain::{Agent, Domain, must_virsh};
use crate::harness::guest::{assert_killed_and_thawed, check_point_of, serial_count};
use crate::harness::{bitback, by_content, create_qcow2, list_ids, tempdir};

const MIB: u64 = 1 << 20;

fn kinds(m: &Value) -> Vec<(String, String)> {
    m["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Each volume's `guard` in a manifest.
fn guards(m: &Value) -> Vec<String> {
    m["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["guard"].as_str().unwrap_or("none").to_string())
        .collect()
}

/// Every point of the repository restores to consistent logs on vda and
/// vdb, and the guest advanced between points.
fn check_all_points(repo: &Path, out: &Path) {
    let mut last = -1;
    for id in list_ids(repo, Some("dom")) {
        let (a, _) = check_point_of(repo, "dom", &id, ["vda", "vdb"], out);
        assert!(a >= last, "point {id} went back in the log ({a} < {last})");
        last = a;
    }
}

#[test]
fn a_writing_libvirt_guest_through_the_proxy_and_an_extra_socket_is_one_chain() {
    let dir = tempdir();
    let sockets = dir.path().join("sockets");
    std::fs::create_dir(&sockets).unwrap();
    // The extra socket's directory belongs to the user QEMU runs as.
    run_chown("libvirt-qemu", &sockets);
    let extra = sockets.join("extra.sock");
    let domain = Domain::create(dir.path(), Some(&extra));
    let repo = dir.path().join("repo");

    // inspect names the volumes by target device.
    let info = bitback(&["inspect", "--libvirt", &domain.name, "--json"]).json();
    let names = crate::harness::names(&info["volumes"]);
    assert_eq!(names, ["vda", "vdb"]);

    let full = domain.backup(&repo, &[]);
    assert_eq!(full["kind"], "full");
    // bitback's own filter stood under libvirt's devices.
    assert_eq!(guards(&full), ["bitback", "bitback"], "{full}");
    domain.wait_records(20);
    // The extra socket continues the chain the proxy started...
    let extra_arg = extra.display().to_string();
    // Through the extra socket, QEMU itself takes the NBD socket: the
    // bytes go through bitback's server to libvirt's unprivileged QEMU.
    let second = domain.backup(&repo, &["--qmp", &extra_arg, "--data-path", "nbd"]);
    assert_eq!(second["kind"], "incremental", "{}", second["reason"]);
    domain.wait_records(20);
    // ... and the proxy the chain the extra socket continued, on the NBD
    // data path too: QEMU, behind the proxy that passes it no socket,
    // connects to one in a directory of libvirt-qemu's.
    let third = domain.backup(&repo, &["--data-path", "nbd"]);
    assert_eq!(third["kind"], "incremental", "{}", third["reason"]);
    assert_eq!(
        kinds(&third),
        [
            ("vda".to_string(), "incremental".to_string()),
            ("vdb".to_string(), "incremental".to_string())
        ]
    );
    for volume in third["volumes"].as_array().unwrap() {
        assert!(
            volume["cluster_map"].is_object(),
            "bitback wrote {}: {volume}",
            volume["name"]
        );
    }
    // A disk hot-plugged through libvirt: a full of that disk alone, named
    // by its target.
    let extra_disk = dir.path().join("5a1d0c2e-0000-4000-8000-00000000000c");
    create_qcow2(&extra_disk, 8 * MIB, &[]);
    must_virsh(&[
        "attach-disk",
        &domain.name,
        extra_disk.to_str().unwrap(),
        "vdc",
        "--driver",
        "qemu",
        "--subdriver",
        "qcow2",
        "--targetbus",
        "virtio",
        "--live",
    ]);
    domain.wait_records(10);
    // With fleecing (a directory only root can enter: QEMU, running as
    // libvirt-qemu, gets the scratch images as passed descriptors).
    let fleece = dir.path().join("fleece");
    std::fs::create_dir(&fleece).unwrap();
    let plugged = domain.backup(&repo, &["--fleecing", fleece.to_str().unwrap()]);
    assert_eq!(
        guards(&plugged),
        ["fleecing", "fleecing", "fleecing"],
        "{plugged}"
    );
    assert_eq!(std::fs::read_dir(&fleece).unwrap().count(), 0);
    assert_eq!(
        kinds(&plugged),
        [
            ("vda".to_string(), "incremental".to_string()),
            ("vdb".to_string(), "incremental".to_string()),
            ("vdc".to_string(), "full".to_string())
        ],
        "{}",
        plugged["reason"]
    );
    // What libvirt records for each way in.
    let log = std::fs::read_to_string(format!("/var/log/libvirt/qemu/{}.log", domain.name))
        .unwrap_or_default();
    assert!(log.contains("tainted: custom-argv"), "{log}");
    assert!(log.contains("tainted: custom-monitor"), "{log}");

    // libvirt's QMP proxy given as a plain --qmp socket, as plain QMP
    // tools are pointed at it: it ends the connection on getfd, so bitback
    // connects again and passes descriptors with add-fd; the default data
    // path still runs (QEMU connects to bitback's socket). Full, then
    // incremental.
    let proxy_sock = dir.path().join("proxy.sock");
    // Debian's python3, which has the libvirt module (a python3 earlier
    // in PATH may not).
    let mut proxy = Command::new("/usr/bin/python3")
        .args([
            "/usr/bin/virt-qemu-qmp-proxy",
            "--connect",
            "qemu:///system",
        ])
        .arg(&domain.name)
        .arg(&proxy_sock)
        .spawn()
        .expect("starting virt-qemu-qmp-proxy (apt-get install libvirt-clients-qemu)");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !proxy_sock.exists() {
        assert!(Instant::now() < deadline, "the proxy made no socket");
        if let Some(status) = proxy.try_wait().unwrap() {
            panic!("the proxy ended: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let plain = dir.path().join("plain");
    let through = |extra: &[&str]| {
        let mut args = vec![
            "backup",
            "--qmp",
            proxy_sock.to_str().unwrap(),
            "--repo",
            plain.to_str().unwrap(),
            "--vm",
            "dom",
            "--json",
        ];
        args.extend(extra);
        bitback(&args)
    };
    let mut plain_ids = Vec::new();
    for (round, want) in ["full", "incremental"].into_iter().enumerate() {
        domain.wait_records(10);
        let run = through(&[]);
        let m = run.json();
        assert_eq!(m["kind"], want, "round {round}: {}", m["reason"]);
        // On the default data path bitback wrote the files (their maps);
        // BITBACK_DATA_PATH=file runs the same through QEMU's writes.
        for volume in m["volumes"].as_array().unwrap() {
            assert_eq!(
                volume["cluster_map"].is_object(),
                by_content(),
                "bitback wrote {}: {volume}",
                volume["name"]
            );
        }
        plain_ids.push(m["id"].as_str().unwrap().to_string());
    }
    let _ = proxy.kill();
    let _ = proxy.wait();
    domain.destroy();
    check_all_points(&repo, &dir.path().join("out"));
    for id in &plain_ids {
        check_point_of(
            &plain,
            "dom",
            id,
            ["virtio-disk0", "virtio-disk1"],
            &dir.path().join("out"),
        );
    }
}

fn run_chown(user: &str, path: &Path) {
    let status = Command::new("chown")
        .arg(user)
        .arg(path)
        .status()
        .expect("running chown");
    assert!(status.success(), "chown {user} {}", path.display());
}

/// Each volume's `changes` (how its changes were found) in a manifest.
fn changes(m: &Value) -> Vec<String> {
    m["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["changes"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_shut_off_domain_is_backed_up_from_its_xml_and_continues_when_started() {
    let dir = tempdir();
    // vdb raw: its changes are tracked only while its QEMU runs.
    let domain = Domain::define(dir.path(), true);
    let repo = dir.path().join("repo");
    // Never started: the disks are empty, but the backup is real.
    let first = domain.backup(&repo, &[]);
    assert_eq!(first["kind"], "full");
    let names: Vec<String> = kinds(&first).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["vda", "vdb"]);
    domain.start();
    domain.wait_records(20);
    // Started: vda's bitmap carries on; vdb's is gone, so through the
    // proxy its changes are found by content (or it is a full, where QEMU
    // writes the files).
    let lost = if by_content() { "content" } else { "full" };
    let running = domain.backup(&repo, &[]);
    assert_eq!(running["kind"], "incremental", "{}", running["reason"]);
    assert_eq!(changes(&running), ["bitmap", lost], "{}", running["reason"]);
    domain.wait_records(20);
    let again = domain.backup(&repo, &[]);
    assert_eq!(changes(&again), ["bitmap", "bitmap"], "{}", again["reason"]);
    domain.destroy();
    // Shut off again: the persistent bitmap QEMU stored for vda carries on;
    // vdb's went with its QEMU.
    let stopped = domain.backup(&repo, &[]);
    assert_eq!(stopped["kind"], "incremental", "{}", stopped["reason"]);
    assert_eq!(changes(&stopped), ["bitmap", lost], "{}", stopped["reason"]);
    check_all_points(&repo, &dir.path().join("out"));
}

#[test]
fn libvirts_own_block_operations_keep_working_beside_bitback() {
    let dir = tempdir();
    let domain = Domain::create_with(dir.path(), None, Agent::Off);
    let d = dir.path();
    let repo = d.join("repo");
    let name = domain.name.clone();
    assert_eq!(domain.backup(&repo, &[])["kind"], "full");

    // An external snapshot: new images under both disks, each a full.
    let (a_snap, b_snap) = (d.join("a-snap.qcow2"), d.join("b-snap.qcow2"));
    must_virsh(&[
        "snapshot-create-as",
        &name,
        "--disk-only",
        "--no-metadata",
        "--diskspec",
        &format!("vda,file={}", a_snap.display()),
        "--diskspec",
        &format!("vdb,file={}", b_snap.display()),
    ]);
    let snap = domain.backup(&repo, &[]);
    for (volume, kind) in kinds(&snap) {
        assert_eq!(kind, "full", "{volume} after the snapshot");
    }
    domain.wait_records(10);
    assert_eq!(domain.backup(&repo, &[])["kind"], "incremental");

    // Commit vda back into its base: vda alone is full.
    domain.wait_records(10);
    must_virsh(&["blockcommit", &name, "vda", "--active", "--pivot", "--wait"]);
    let committed = domain.backup(&repo, &[]);
    assert_eq!(
        kinds(&committed),
        [
            ("vda".to_string(), "full".to_string()),
            ("vdb".to_string(), "incremental".to_string())
        ],
        "{}",
        committed["reason"]
    );

    // --quiesce through libvirt, whose agent channel nobody answers (the
    // guest runs no agent here): the freeze fails at once, the backup goes
    // on unfrozen and says so.
    domain.wait_records(10);
    let started = std::time::Instant::now();
    let quiesced = domain.run_backup(&repo, &["--quiesce", "--freeze-timeout", "5"], &[]);
    let m = quiesced.json();
    assert_eq!(m["kind"], "incremental", "{}", m["reason"]);
    assert!(
        quiesced.stderr.contains("copying unfrozen"),
        "{}",
        quiesced.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(120));

    // Pull vdb's base into its top: the same image stays, incremental.
    domain.wait_records(10);
    must_virsh(&["blockpull", &name, "vdb", "--wait"]);
    let pulled = domain.backup(&repo, &[]);
    assert_eq!(pulled["kind"], "incremental", "{}", pulled["reason"]);

    // libvirt's own checkpoint: its bitmap and ours live side by side.
    must_virsh(&["checkpoint-create-as", &name, "cp1"]);
    domain.wait_records(10);
    assert_eq!(domain.backup(&repo, &[])["kind"], "incremental");
    let info = bitback(&["inspect", "--libvirt", &name, "--json"]).json();
    for v in info["volumes"].as_array().unwrap() {
        let bitmaps = crate::harness::names(&v["bitmaps"]);
        assert!(bitmaps.contains(&"cp1"), "{bitmaps:?}");
        assert_eq!(bitmaps.len(), 2, "{bitmaps:?}");
    }

    // Another tool's backup (libvirt's pull mode) runs while bitback backs
    // up: both work, neither touches the other's job.
    let sockets = d.join("sockets");
    std::fs::create_dir(&sockets).unwrap();
    run_chown("libvirt-qemu", &sockets);
    let pull = d.join("pull.xml");
    std::fs::write(
        &pull,
        format!(
            "<domainbackup mode='pull'><server transport='unix' socket='{}'/>\
             <disks><disk name='vda' backup='yes' type='file'><scratch file='{}'/></disk>\
             <disk name='vdb' backup='no'/></disks></domainbackup>",
            sockets.join("nbd.sock").display(),
            d.join("scratch.qcow2").display()
        ),
    )
    .unwrap();
    must_virsh(&["backup-begin", &name, "--backupxml", pull.to_str().unwrap()]);
    domain.wait_records(10);
    let beside = domain.backup(&repo, &[]);
    assert_eq!(beside["kind"], "incremental", "{}", beside["reason"]);
    let job = must_virsh(&["domjobinfo", &name]);
    assert!(job.contains("Backup"), "libvirt's backup job ended: {job}");
    must_virsh(&["domjobabort", &name]);
    domain.wait_records(10);
    assert_eq!(domain.backup(&repo, &[])["kind"], "incremental");

    domain.destroy();
    check_all_points(&repo, &d.join("out"));
}

/// The guest agent's own answer to guest-fsfreeze-status, through libvirt.
fn freeze_status(domain: &Domain) -> String {
    let out = must_virsh(&[
        "qemu-agent-command",
        &domain.name,
        r#"{"execute":"guest-fsfreeze-status"}"#,
    ]);
    let reply: Value = serde_json::from_str(out.trim()).unwrap();
    reply["return"].as_str().unwrap_or_default().to_string()
}

#[test]
fn quiesce_through_libvirt_is_one_frozen_instant_and_a_killed_bitback_leaves_the_guest_thawed() {
    let dir = tempdir();
    let d = dir.path();
    let domain = Domain::create(d, None);
    let repo = d.join("repo");
    let quiesced = ["--quiesce"];

    // The guest's agent stops its writer between records while frozen, so
    // the point has both disks at the same record (unfrozen, vda may be one
    // ahead).
    let first = domain.backup(&repo, &quiesced);
    assert_eq!(first["kind"], "full");
    assert_eq!(
        (
            serial_count(&domain.dir, "frozen"),
            serial_count(&domain.dir, "thawed")
        ),
        (1, 1)
    );
    assert_eq!(freeze_status(&domain), "thawed");
    let id = first["id"].as_str().unwrap();
    let (a, b) = check_point_of(&repo, "dom", id, ["vda", "vdb"], &d.join("out"));
    assert_eq!(a, b, "a frozen point has both disks at one record");
    assert!(a > 0);

    // Killed by SIGKILL after the freeze, before the transaction: the thaw
    // guard thaws the guest, and the guest writes on.
    domain.wait_records(10);
    let killed = domain.run_backup(&repo, &quiesced, &[("BITBACK_FAULT", "before-transaction")]);
    assert_killed_and_thawed(&killed);
    assert_eq!(
        (
            serial_count(&domain.dir, "frozen"),
            serial_count(&domain.dir, "thawed")
        ),
        (2, 2)
    );
    assert_eq!(freeze_status(&domain), "thawed");
    domain.wait_records(10);

    // The next quiesced backup continues the chain.
    let next = domain.backup(&repo, &quiesced);
    assert_eq!(next["kind"], "incremental", "{}", next["reason"]);
    assert_eq!(serial_count(&domain.dir, "thawed"), 3);
    let id = next["id"].as_str().unwrap();
    let (a, b) = check_point_of(&repo, "dom", id, ["vda", "vdb"], &d.join("out"));
    assert_eq!(a, b);
    domain.destroy();
    check_all_points(&repo, &d.join("out"));
}

#[test]
fn a_freeze_that_never_ends_costs_a_bounded_wait_and_an_unfrozen_copy() {
    // The guest's agent answers libvirt's sync, then never finishes the
    // freeze: libvirt's own freeze call blocks for good and holds the
    // domain's agent job, so the thaw after it waits 30 s for libvirt's
    // lock and fails. bitback gives the freeze --freeze-timeout, goes on
    // unfrozen and says so.
    let dir = tempdir();
    let d = dir.path();
    let domain = Domain::create_with(d, None, Agent::Stall);
    let repo = d.join("repo");
    let started = Instant::now();
    let run = domain.run_backup(&repo, &["--quiesce", "--freeze-timeout", "3"], &[]);
    let m = run.json();
    assert_eq!(m["kind"], "full");
    assert!(run.stderr.contains("copying unfrozen"), "{}", run.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(150),
        "{:?}",
        started.elapsed()
    );
    domain.wait_records(10);
    domain.destroy();
    check_all_points(&repo, &d.join("out"));
}

/// A domain that wrote, backed up once and shut off, with a runtime
/// directory libvirt-qemu reaches the export's socket through: the
/// runtime, the domain, the repository and the backup's manifest.
fn backed_up_and_shut_off(dir: &Path) -> (crate::instant::Runtime, Domain, PathBuf, Value) {
    let rt = crate::instant::Runtime::new();
    std::fs::set_permissions(rt.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let domain = Domain::define(dir, false);
    domain.start();
    domain.wait_records(20);
    let repo = dir.join("repo");
    let point = domain.backup(&repo, &[]);
    domain.wait_records(20);
    domain.destroy();
    (rt, domain, repo, point)
}

/// `restore --live --libvirt DOMAIN --json` of `dom` in `repo`.
fn live_args<'a>(repo: &'a Path, domain: &'a Domain) -> Vec<&'a str> {
    vec![
        "restore",
        "--repo",
        repo.to_str().unwrap(),
        "--vm",
        "dom",
        "--live",
        "--libvirt",
        &domain.name,
        "--json",
    ]
}

#[test]
fn a_shut_off_domain_is_restored_live_in_one_command() {
    let dir = tempdir();
    let (rt, domain, repo, point) = backed_up_and_shut_off(dir.path());
    // The domain's disks are there: replacing them takes --force.
    let args = live_args(&repo, &domain);
    let exists = rt.run(&args);
    assert_eq!(exists.code, Some(2), "{}", exists.stderr);
    assert!(exists.stderr.contains("--force"), "{}", exists.stderr);
    let mut forced = args.to_vec();
    forced.push("--force");
    let done = rt.run(&forced).json();
    assert_eq!(done["live"]["backup"], point["id"]);
    let images: Vec<PathBuf> = done["live"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| PathBuf::from(f["path"].as_str().unwrap()))
        .collect();
    assert_eq!(images, domain.disks);
    assert_eq!(
        crate::instant::hows(&done["finish"]),
        ["streamed", "streamed"],
        "{done}"
    );
    assert_eq!(
        done["finish"]["ended"].as_array().unwrap().len(),
        1,
        "{done}"
    );
    assert!(rt.entries().is_empty(), "{:?}", rt.entries());
    for image in &images {
        let info = crate::harness::qemu_img_info(image);
        assert!(info["backing-filename"].is_null(), "{info}");
    }
    // libvirt streamed (blockpull): its own view of the chains followed.
    let xml = must_virsh(&["dumpxml", &domain.name]);
    assert!(!xml.contains("protocol='nbd'"), "{xml}");
    // The guest runs on the point and writes on.
    domain.wait_records(20);
    let again = domain.run_backup(&repo, &[], &[]);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    // Running, it is refused: a live restore starts the domain itself.
    let refused = rt.run(&forced);
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    assert!(refused.stderr.contains("is running"), "{}", refused.stderr);
    domain.destroy();
    // Each point restores to consistent logs (the guest, booted again on
    // the restored point, starts its log over: no order between them).
    for id in list_ids(&repo, Some("dom")) {
        check_point_of(&repo, "dom", &id, ["vda", "vdb"], &dir.path().join("out"));
    }
}

/// `restore --live --libvirt DOMAIN` of a point that lies in a bucket:
/// the domain starts on images read from the bucket through bitback's
/// server, and stands alone once streamed; its lease goes, and the
/// server ends with the export.
#[test]
fn a_shut_off_domain_is_restored_live_from_a_bucket() {
    let dir = tempdir();
    let (rt, domain, repo, point) = backed_up_and_shut_off(dir.path());
    let store = crate::harness::s3::Seaweed::start();
    store.bucket("bb-live", false);
    store.aws_ok(&["s3", "sync", repo.to_str().unwrap(), "s3://bb-live/site"]);
    let mut env = store.env();
    env.push(("BITBACK_RUNTIME_DIR", rt.path().to_str().unwrap()));
    let done = crate::harness::bitback_env(
        &[
            "restore",
            "--repo",
            "s3://bb-live/site",
            "--vm",
            "dom",
            "--live",
            "--libvirt",
            &domain.name,
            "--force",
            "--json",
        ],
        &env,
    )
    .json();
    assert_eq!(done["live"]["backup"], point["id"]);
    let server = done["live"]["server"]
        .as_u64()
        .expect("the bucket server's pid");
    assert_eq!(
        crate::instant::hows(&done["finish"]),
        ["streamed", "streamed"],
        "{done}"
    );
    assert!(rt.entries().is_empty(), "{:?}", rt.entries());
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{server}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the bucket server outlived the export"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for image in &domain.disks {
        let info = crate::harness::qemu_img_info(image);
        assert!(info["backing-filename"].is_null(), "{info}");
    }
    let leases = store.aws_ok(&[
        "s3api",
        "list-objects-v2",
        "--bucket",
        "bb-live",
        "--prefix",
        "site/dom/.serving/",
    ]);
    assert!(leases["Contents"].is_null(), "{leases}");
    // The guest runs on the point and writes on; each point restores to
    // consistent logs.
    domain.wait_records(20);
    let again = domain.run_backup(&repo, &[], &[]);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    domain.destroy();
    for id in list_ids(&repo, Some("dom")) {
        check_point_of(&repo, "dom", &id, ["vda", "vdb"], &dir.path().join("out"));
    }
}

/// bitback and the export's daemon die once a live restore of a domain
/// has started it, before the streams (a host in trouble): the domain runs
/// on, its disks reading from an export that is gone. `restore --live
/// --resume --libvirt DOMAIN` serves the same point again at the same
/// socket and streams to the end (libvirt's QEMU reconnects): the disks
/// stand alone, libvirt's XML follows, and the guest backs up again.
#[test]
fn a_domain_whose_live_export_died_is_resumed_and_streamed() {
    let dir = tempdir();
    let (rt, domain, repo, point) = backed_up_and_shut_off(dir.path());
    let args = live_args(&repo, &domain);
    let killed = rt
        .command()
        .args(&args)
        .arg("--force")
        .env("BITBACK_FAULT", "live-domain-started")
        .output()
        .unwrap();
    assert_eq!(
        killed.status.code(),
        None,
        "{}",
        String::from_utf8_lossy(&killed.stderr)
    );
    let served: Vec<PathBuf> = rt.entries();
    assert_eq!(served.len(), 1, "{served:?}");
    let pid = std::fs::read_to_string(served[0].join("daemon.pid")).unwrap();
    let pid = pid.trim().to_string();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("qemu-storage-daemon"));
    crate::harness::run(Command::new("kill").args(["-9", &pid]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "the daemon did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    let xml = must_virsh(&["dumpxml", &domain.name]);
    assert!(xml.contains("protocol='nbd'"), "{xml}");

    let mut resume = args.clone();
    resume.push("--resume");
    let done = rt.run(&resume).json();
    assert_eq!(done["live"]["backup"], point["id"]);
    assert_eq!(
        done["finish"]["ended"].as_array().unwrap().len(),
        1,
        "{done}"
    );
    assert!(rt.entries().is_empty(), "{:?}", rt.entries());
    for image in &domain.disks {
        let info = crate::harness::qemu_img_info(image);
        assert!(info["backing-filename"].is_null(), "{info}");
        crate::harness::run(Command::new("qemu-img").args(["check", "-U"]).arg(image));
    }
    let xml = must_virsh(&["dumpxml", &domain.name]);
    assert!(!xml.contains("protocol='nbd'"), "{xml}");
    domain.wait_records(20);
    let again = domain.run_backup(&repo, &[], &[]);
    assert_eq!(again.code, Some(0), "{}", again.stderr);
    domain.destroy();
}
