//! A libvirt domain of the sequence-log guest (transient or defined, on
//! TCG, run by libvirtd as libvirt-qemu), and the libvirt daemons it
//! needs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Run, bitback_env, create_qcow2, guest_files, require};

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
pub(crate) fn kvm_like_udev() {
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
pub(crate) fn libvirt_up() {
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
    pub(crate) fn mode(self) -> &'static str {
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
    pub(crate) fn xml(
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
    pub(crate) fn prepare(dir: &Path) -> [PathBuf; 2] {
        Domain::prepare_with(dir, false)
    }

    pub(crate) fn prepare_with(dir: &Path, raw_vdb: bool) -> [PathBuf; 2] {
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

    pub(crate) fn name() -> String {
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
    pub(crate) fn create_with(dir: &Path, extra_socket: Option<&Path>, agent: Agent) -> Domain {
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
            text = Domain::raw_vdb(text, &disks[1]);
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

    /// `text` with vdb (`disk`) a raw file.
    fn raw_vdb(text: String, disk: &Path) -> String {
        let vdb = format!(
            "<driver name='qemu' type='qcow2'/>\n      <source file='{}'",
            disk.display()
        );
        let raw = format!(
            "<driver name='qemu' type='raw'/>\n      <source file='{}'",
            disk.display()
        );
        assert!(text.contains(&vdb));
        text.replace(&vdb, &raw)
    }

    /// A defined domain, shut off, vdb a raw file when `raw_vdb`.
    pub(crate) fn define(dir: &Path, raw_vdb: bool) -> Domain {
        libvirt_up();
        let disks = Domain::prepare_with(dir, raw_vdb);
        let name = Domain::name();
        let xml = dir.join("domain.xml");
        let mut xml_text = Domain::xml(&name, dir, [&disks[0], &disks[1]], None, Agent::On);
        if raw_vdb {
            xml_text = Domain::raw_vdb(xml_text, &disks[1]);
        }
        std::fs::write(&xml, xml_text).unwrap();
        must_virsh(&["define", xml.to_str().unwrap()]);
        Domain {
            name,
            dir: dir.into(),
            persistent: true,
            disks,
        }
    }

    pub(crate) fn start(&self) {
        let _ = std::fs::remove_file(self.dir.join("serial.log"));
        must_virsh(&["start", &self.name]);
        self.wait_writing();
    }

    pub(crate) fn wait_writing(&self) {
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

    pub(crate) fn backup(&self, repo: &Path, extra: &[&str]) -> Value {
        self.run_backup(repo, extra, &[]).json()
    }

    /// `bitback backup --libvirt` of this domain into `repo` as VM `dom`,
    /// with `extra` arguments and `env`, as it came out.
    pub(crate) fn run_backup(&self, repo: &Path, extra: &[&str], env: &[(&str, &str)]) -> Run {
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
