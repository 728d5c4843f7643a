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

use crate::guest::{assert_killed_and_thawed, check_point_of, serial_count};
use crate::harness::{
    Run, bitback, bitback_env, create_qcow2, guest_files, list_ids, require, tempdir,
};

const MIB: u64 = 1 << 20;
const URI: &str = "qemu:///system";

pub(crate) fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .expect("running virsh")
}

pub(crate) fn must_virsh(args: &[&str]) -> String {
    let out = virsh(args);
    assert!(
        out.status.success(),
        "virsh {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Gives /dev/kvm the owner and mode Debian's udev rule gives it (root:kvm
/// 0660) when this machine left it root-only. libvirt checks /dev/kvm as the
/// QEMU user (libvirt-qemu, group kvm) while its probe QEMU, started as root,
/// finds KVM: each check then calls the cached capabilities stale and probes
/// QEMU again, twice, for every lookup. Measured here: `virsh create` took
/// 60 s with a root-only /dev/kvm and 0.35 s with root:kvm 0660, and under
/// load the endless probing failed a create with "An error occurred, but the
/// cause is unknown". The guests still run on TCG (`type='qemu'`).
fn kvm_like_udev() {
    use std::os::unix::fs::MetadataExt;
    let kvm = Path::new("/dev/kvm");
    let Ok(meta) = std::fs::metadata(kvm) else {
        return;
    };
    let kvm_gid = std::fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("kvm:")?
                .split(':')
                .nth(1)?
                .parse::<u32>()
                .ok()
        });
    let Some(kvm_gid) = kvm_gid else {
        return;
    };
    if meta.gid() == kvm_gid && meta.mode() & 0o060 == 0o060 {
        return;
    }
    for (tool, arg) in [("chgrp", "kvm"), ("chmod", "0660")] {
        let status = Command::new(tool).arg(arg).arg(kvm).status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "{tool} {arg} /dev/kvm failed (the libvirt tests run as root)"
        );
    }
}

/// Starts virtlogd and libvirtd when libvirt does not answer.
fn libvirt_up() {
    for tool in ["virsh", "libvirtd", "virtlogd", "virt-qemu-qmp-proxy"] {
        require(tool);
    }
    static UP: std::sync::Once = std::sync::Once::new();
    UP.call_once(|| {
        kvm_like_udev();
        if virsh(&["list", "--name"]).status.success() {
            return;
        }
        // Each daemon is started only when its socket does not answer: one
        // left running alone (virtlogd without libvirtd) refuses a second.
        for (daemon, socket) in [
            ("virtlogd", "/run/libvirt/virtlogd-sock"),
            ("libvirtd", "/run/libvirt/libvirt-sock"),
        ] {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                continue;
            }
            let status = Command::new(daemon).arg("-d").status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "starting {daemon} -d failed (as root? install: apt-get install -t bookworm-backports \
                 --no-install-recommends libvirt-daemon-driver-qemu libvirt-clients \
                 libvirt-clients-qemu libvirt-daemon python3-libvirt)"
            );
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !virsh(&["list", "--name"]).status.success() {
            assert!(Instant::now() < deadline, "libvirtd did not answer in 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}

/// The test guest's agent on its org.qemu.guest_agent.0 port (see
/// fixtures/guest/init.sh).
#[derive(Clone, Copy)]
pub(crate) enum Agent {
    /// Answers sync, ping, freeze (stopping the writer between records),
    /// thaw and status.
    On,
    /// None: libvirt sees the channel disconnected.
    Off,
    /// Answers sync; a freeze never ends (a filesystem that cannot be
    /// frozen), and nothing is answered after it.
    Stall,
    /// No agent channel in the domain at all (an agent not configured).
    NoChannel,
}

impl Agent {
    fn mode(self) -> &'static str {
        match self {
            Agent::On => "on",
            Agent::Off => "off",
            Agent::Stall => "stall",
            Agent::NoChannel => "off",
        }
    }
}

/// A libvirt domain of the test guest; destroyed (and undefined when
/// defined) on drop.
pub(crate) struct Domain {
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
    persistent: bool,
    /// The two disk images, as CloudStack names volumes (a UUID, no
    /// extension).
    pub(crate) disks: [PathBuf; 2],
}

impl Domain {
    /// The domain XML: the test guest on TCG, its two disks vda and vdb,
    /// its serial console to a file, optionally an extra QMP socket.
    fn xml(
        name: &str,
        dir: &Path,
        disks: [&Path; 2],
        extra_socket: Option<&Path>,
        agent: Agent,
    ) -> String {
        let (kernel, initrd) = guest_files();
        let extra = extra_socket
            .map(|s| {
                format!(
                    "<qemu:commandline><qemu:arg value='-qmp'/>\
                     <qemu:arg value='unix:{},server=on,wait=off'/></qemu:commandline>",
                    s.display()
                )
            })
            .unwrap_or_default();
        format!(
            "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{}</kernel><initrd>{}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet bitback.agent={}</cmdline></os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{}'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='{}'/><target dev='vdb' bus='virtio'/></disk>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <serial type='file'><source path='{}'/><target port='0'/></serial>
  </devices>
  {extra}
</domain>",
            kernel.display(),
            initrd.display(),
            agent.mode(),
            disks[0].display(),
            disks[1].display(),
            dir.join("serial.log").display(),
        )
    }

    /// A directory libvirt-qemu can reach, with two fresh disks (vdb raw
    /// when `raw_vdb`).
    fn prepare(dir: &Path) -> [PathBuf; 2] {
        Domain::prepare_with(dir, false)
    }

    fn prepare_with(dir: &Path, raw_vdb: bool) -> [PathBuf; 2] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let disks = [
            dir.join("5a1d0c2e-0000-4000-8000-00000000000a"),
            dir.join("5a1d0c2e-0000-4000-8000-00000000000b"),
        ];
        create_qcow2(&disks[0], 16 * MIB, &[]);
        if raw_vdb {
            let f = std::fs::File::create(&disks[1]).unwrap();
            f.set_len(16 * MIB).unwrap();
            std::fs::set_permissions(&disks[1], std::fs::Permissions::from_mode(0o666)).unwrap();
        } else {
            create_qcow2(&disks[1], 16 * MIB, &[]);
        }
        disks
    }

    fn name() -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        format!(
            "bitback-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    }

    /// A transient domain, running, its guest writing, its guest agent
    /// answering.
    pub(crate) fn create(dir: &Path, extra_socket: Option<&Path>) -> Domain {
        Domain::create_with(dir, extra_socket, Agent::On)
    }

    /// [`Domain::create`] with the guest agent as `agent` says.
    fn create_with(dir: &Path, extra_socket: Option<&Path>, agent: Agent) -> Domain {
        Domain::create_shaped(dir, extra_socket, agent, false)
    }

    /// [`Domain::create_with`], vdb a raw file when `raw_vdb`.
    pub(crate) fn create_shaped(
        dir: &Path,
        extra_socket: Option<&Path>,
        agent: Agent,
        raw_vdb: bool,
    ) -> Domain {
        libvirt_up();
        let disks = Domain::prepare_with(dir, raw_vdb);
        let name = Domain::name();
        let xml = dir.join("domain.xml");
        let mut text = Domain::xml(&name, dir, [&disks[0], &disks[1]], extra_socket, agent);
        if raw_vdb {
            let vdb = format!(
                "<driver name='qemu' type='qcow2'/>\n      <source file='{}'",
                disks[1].display()
            );
            let raw = format!(
                "<driver name='qemu' type='raw'/>\n      <source file='{}'",
                disks[1].display()
            );
            assert!(text.contains(&vdb));
            text = text.replace(&vdb, &raw);
        }
        if matches!(agent, Agent::NoChannel) {
            let channel = "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>";
            assert!(text.contains(channel));
            text = text.replace(channel, "");
        }
        std::fs::write(&xml, text).unwrap();
        must_virsh(&["create", xml.to_str().unwrap()]);
        let domain = Domain {
            name,
            dir: dir.into(),
            persistent: false,
            disks,
        };
        domain.wait_writing();
        domain
    }

    /// A defined domain, shut off.
    fn define(dir: &Path) -> Domain {
        libvirt_up();
        let disks = Domain::prepare(dir);
        let name = Domain::name();
        let xml = dir.join("domain.xml");
        let xml_text = Domain::xml(&name, dir, [&disks[0], &disks[1]], None, Agent::On);
        std::fs::write(&xml, xml_text).unwrap();
        must_virsh(&["define", xml.to_str().unwrap()]);
        Domain {
            name,
            dir: dir.into(),
            persistent: true,
            disks,
        }
    }

    fn start(&self) {
        let _ = std::fs::remove_file(self.dir.join("serial.log"));
        must_virsh(&["start", &self.name]);
        self.wait_writing();
    }

    fn wait_writing(&self) {
        let log = self.dir.join("serial.log");
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("bitback-guest: record 100") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "domain {}'s guest did not write within 180 s; serial:\n{text}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the guest wrote `n` more records.
    pub(crate) fn wait_records(&self, n: u64) {
        let last = |text: &str| {
            text.lines()
                .filter_map(|l| l.strip_prefix("bitback-guest: record "))
                .filter_map(|k| k.trim().parse::<u64>().ok())
                .max()
                .unwrap_or(0)
        };
        let log = self.dir.join("serial.log");
        let start = last(&std::fs::read_to_string(&log).unwrap_or_default());
        let deadline = Instant::now() + Duration::from_secs(120);
        while last(&std::fs::read_to_string(&log).unwrap_or_default()) < start + n {
            assert!(Instant::now() < deadline, "the guest stopped writing");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn destroy(&self) {
        let _ = virsh(&["destroy", &self.name]);
    }

    fn backup(&self, repo: &Path, extra: &[&str]) -> Value {
        self.run_backup(repo, extra, &[]).json()
    }

    /// `bitback backup --libvirt` of this domain into `repo` as VM `dom`,
    /// with `extra` arguments and `env`, as it came out.
    fn run_backup(&self, repo: &Path, extra: &[&str], env: &[(&str, &str)]) -> Run {
        let mut args = vec![
            "backup",
            "--libvirt",
            &self.name,
            "--repo",
            repo.to_str().unwrap(),
            "--vm",
            "dom",
            "--json",
        ];
        args.extend(extra);
        bitback_env(&args, env)
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        self.destroy();
        if self.persistent {
            let _ = virsh(&["undefine", &self.name]);
        }
    }
}

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
    domain.wait_records(20);
    // The extra socket continues the chain the proxy started...
    let extra_arg = extra.display().to_string();
    let second = domain.backup(&repo, &["--qmp", &extra_arg]);
    assert_eq!(second["kind"], "incremental", "{}", second["reason"]);
    domain.wait_records(20);
    // ... and the proxy the chain the extra socket continued.
    let third = domain.backup(&repo, &[]);
    assert_eq!(third["kind"], "incremental", "{}", third["reason"]);
    assert_eq!(
        kinds(&third),
        [
            ("vda".to_string(), "incremental".to_string()),
            ("vdb".to_string(), "incremental".to_string())
        ]
    );
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
    let plugged = domain.backup(&repo, &[]);
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
    domain.destroy();
    check_all_points(&repo, &dir.path().join("out"));
}

fn run_chown(user: &str, path: &Path) {
    let status = Command::new("chown")
        .arg(user)
        .arg(path)
        .status()
        .expect("running chown");
    assert!(status.success(), "chown {user} {}", path.display());
}

#[test]
fn a_shut_off_domain_is_backed_up_from_its_xml_and_continues_when_started() {
    let dir = tempdir();
    let domain = Domain::define(dir.path());
    let repo = dir.path().join("repo");
    // Never started: the disks are empty, but the backup is real.
    let first = domain.backup(&repo, &[]);
    assert_eq!(first["kind"], "full");
    let names: Vec<String> = kinds(&first).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["vda", "vdb"]);
    domain.start();
    domain.wait_records(20);
    let running = domain.backup(&repo, &[]);
    assert_eq!(running["kind"], "incremental", "{}", running["reason"]);
    domain.destroy();
    // Shut off again: the persistent bitmaps QEMU stored carry on.
    let stopped = domain.backup(&repo, &[]);
    assert_eq!(stopped["kind"], "incremental", "{}", stopped["reason"]);
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
