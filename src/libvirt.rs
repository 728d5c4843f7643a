//! libvirt domains: what a domain is (its XML, read with `virsh`) and a way
//! in to a running one's QMP monitor without restarting it.
//!
//! libvirt holds a running domain's monitor. bitback reaches it through
//! libvirt's own QMP proxy, `virt-qemu-qmp-proxy DOMAIN SOCKET`, started as
//! a child on a socket in a private directory and ended by its pid: the
//! proxy relays QMP over `virDomainQemuMonitorCommandWithFiles`, which
//! carries file descriptors (libvirt 8.2 and newer), so backup files reach
//! the unprivileged QEMU as passed fds. The alternative, an extra `-qmp`
//! socket given to QEMU through `<qemu:commandline>`, needs the domain
//! restarted once; bitback uses it when `--qmp` names it.
//!
//! Volumes of a libvirt domain are named by their target device (`vda`,
//! `sdb`): stable across restarts and hotplug, the same for a running and
//! a stopped domain, unlike libvirt's node names (`libvirt-2-format`),
//! which change on every start.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tracing::info;

/// The longest a virsh call may take (libvirt re-probing the hypervisor
/// takes seconds; a stalled daemon forever).
const VIRSH_LIMIT: Duration = Duration::from_secs(120);

/// The oldest libvirt whose QMP passthrough carries file descriptors.
const FD_PASSING: (u64, u64) = (8, 2);

/// What can go wrong talking to libvirt.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "running virsh (install libvirt-clients: apt-get install --no-install-recommends libvirt-clients)"
    )]
    RunningVirsh(#[source] std::io::Error),

    #[error("virsh {command} did not answer within {limit:?}")]
    VirshTimeout { command: String, limit: Duration },

    /// virsh ran and failed: its status and stderr are the fields.
    #[error(transparent)]
    Virsh(#[from] crate::child::Failed),

    #[error("libvirt domain {domain} on {connect}")]
    Domain {
        domain: String,
        connect: String,
        #[source]
        source: Box<Error>,
    },

    #[error("the XML of domain {domain}")]
    Xml {
        domain: String,
        #[source]
        source: roxmltree::Error,
    },

    #[error("{0}")]
    TooOld(String),

    #[error("creating the proxy's private directory")]
    ProxyDir(#[source] crate::qemu::daemon::Error),

    #[error("starting virt-qemu-qmp-proxy (install libvirt-clients-qemu and python3-libvirt)")]
    StartingProxy(#[source] std::io::Error),

    #[error("libvirt's QMP proxy for domain {domain} exited ({status}): {output}")]
    ProxyExited {
        domain: String,
        status: std::process::ExitStatus,
        output: String,
    },

    #[error("libvirt's QMP proxy for domain {domain} did not listen within {limit:?}")]
    ProxyTimeout { domain: String, limit: Duration },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The names of the running domains on `connect` (`virsh list --name`).
pub fn running_domains(connect: &str) -> Result<Vec<String>> {
    let args = ["list", "--name"];
    let out = crate::child::output_within(
        std::process::Command::new("virsh")
            .arg("-c")
            .arg(connect)
            .args(args),
        VIRSH_LIMIT,
    )
    .map_err(Error::RunningVirsh)?
    .ok_or_else(|| Error::VirshTimeout {
        command: args.join(" "),
        limit: VIRSH_LIMIT,
    })?;
    let out = crate::child::succeeded("virsh list --name", out)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// A domain and the libvirt connection it lives on.
#[derive(Debug, Clone)]
pub struct Domain {
    pub name: String,
    pub connect: String,
}

/// One disk of a domain, from its XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// `vda`, `sdb`, ...: the volume name.
    pub target: String,
    /// The device alias QEMU knows it by (`virtio-disk0`); running only.
    pub alias: Option<String>,
    /// `file`, `block`, `network`, `volume`.
    pub kind: String,
    /// `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// The file or block device; `None` for network disks and empty drives.
    pub source: Option<PathBuf>,
    /// A network disk's source name (`pool/volume` for rbd).
    pub source_name: Option<String>,
    pub read_only: bool,
    /// The image format QEMU opens it as (`<driver type=...>`).
    pub format: Option<String>,
    /// The unix socket of its backing image, when that is an NBD export
    /// (a live restore's, running only).
    pub backing_socket: Option<PathBuf>,
}

/// A domain's state and disks.
#[derive(Debug, Clone)]
pub struct DomainInfo {
    pub uuid: Option<String>,
    /// Has a QEMU process: running, paused, ... (not shut off or crashed).
    pub running: bool,
    /// Paused (`virsh suspend`, or an I/O error): the guest runs no code,
    /// so its agent cannot freeze anything.
    pub paused: bool,
    /// Has a guest agent channel (`org.qemu.guest_agent.0`) to freeze
    /// through.
    pub agent: bool,
    pub disks: Vec<DomainDisk>,
}

impl Domain {
    /// The user and group the domain's QEMU runs as, from libvirt's pid
    /// file (the system daemon's only: `qemu:///system`); `None` when not
    /// found or not a QEMU.
    pub fn qemu_owner(&self) -> Option<crate::qmp::SocketOwner> {
        use std::os::unix::fs::MetadataExt;
        if !matches!(
            self.connect.as_str(),
            "qemu:///system" | "qemu+unix:///system"
        ) {
            return None;
        }
        let pid_file = Path::new("/run/libvirt/qemu").join(format!("{}.pid", self.name));
        let pid: u32 = std::fs::read_to_string(pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let comm = std::fs::read_to_string(proc_dir.join("comm")).ok()?;
        if !comm.starts_with("qemu") {
            return None;
        }
        let meta = std::fs::metadata(&proc_dir).ok()?;
        Some(crate::qmp::SocketOwner {
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }

    /// Starts libvirt's own stream of disk `target` from its backing chain
    /// (`virsh blockpull`; libvirt then keeps its view of the chain).
    pub fn blockpull(&self, target: &str) -> Result<()> {
        self.virsh(&["blockpull", &self.name, target]).map(drop)
    }

    /// The block job on disk `target`: (bytes done, bytes in all), or
    /// `None` when it has none.
    pub fn blockjob(&self, target: &str) -> Result<Option<(u64, u64)>> {
        let text = self.virsh(&["blockjob", &self.name, target, "--raw"])?;
        Ok(block_job(&text))
    }

    /// Starts the defined, shut-off domain.
    pub fn start(&self) -> Result<()> {
        self.virsh(&["start", &self.name]).map(drop)
    }

    /// The user and group libvirt runs this domain's QEMU as: its DAC base
    /// label for the domain's type, from `virsh capabilities`; `None` when
    /// libvirt names none (no DAC driver).
    pub fn qemu_user(&self) -> Option<crate::qmp::SocketOwner> {
        let xml = self.virsh(&["dumpxml", "--inactive", &self.name]).ok()?;
        let kind = roxmltree::Document::parse(&xml)
            .ok()?
            .root_element()
            .attribute("type")
            .unwrap_or("kvm")
            .to_string();
        dac_label(&self.virsh(&["capabilities"]).ok()?, &kind)
    }

    /// Runs `virsh -c URI ARGS...` and returns its stdout.
    fn virsh(&self, args: &[&str]) -> Result<String> {
        self.virsh_within(args, VIRSH_LIMIT)
    }

    /// [`Domain::virsh`] with a time limit: a virsh still running after
    /// `limit` (a stalled libvirtd or guest agent) is killed by its pid and
    /// the call fails.
    fn virsh_within(&self, args: &[&str], limit: Duration) -> Result<String> {
        let out = crate::child::output_within(
            std::process::Command::new("virsh")
                .arg("-c")
                .arg(&self.connect)
                .args(args),
            limit,
        )
        .map_err(Error::RunningVirsh)?
        .ok_or_else(|| Error::VirshTimeout {
            command: args.join(" "),
            limit,
        })?;
        let out = crate::child::succeeded(format!("virsh {}", args.join(" ")), out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The domain's state and disks (the live XML when it runs).
    pub fn info(&self) -> Result<DomainInfo> {
        let state = self
            .virsh(&["domstate", &self.name])
            .map_err(|e| Error::Domain {
                domain: self.name.clone(),
                connect: self.connect.clone(),
                source: Box::new(e),
            })?;
        let running = !matches!(state.trim(), "shut off" | "crashed");
        let xml = if running {
            self.virsh(&["dumpxml", &self.name])?
        } else {
            self.virsh(&["dumpxml", "--inactive", &self.name])?
        };
        let mut info = parse_xml(&xml).map_err(|source| Error::Xml {
            domain: self.name.clone(),
            source,
        })?;
        info.running = running;
        info.paused = state.trim() == "paused";
        Ok(info)
    }

    /// Freezes the guest's filesystems through libvirt's agent channel,
    /// giving up after `limit` (a stalled agent).
    pub fn fs_freeze(&self, limit: Duration) -> Result<()> {
        self.virsh_within(&["domfsfreeze", &self.name], limit)
            .map(drop)
    }

    /// Thaws them (harmless when they are not frozen).
    pub fn fs_thaw(&self) -> Result<()> {
        self.virsh(&["domfsthaw", &self.name]).map(drop)
    }

    /// Resumes the domain if libvirt says it is paused (a domain that runs,
    /// or is shut off, is left as it is).
    pub fn resume_if_paused(&self) -> Result<()> {
        let state = self.virsh(&["domstate", &self.name])?;
        if state.trim() == "paused" {
            self.virsh(&["resume", &self.name])?;
        }
        Ok(())
    }

    /// `virsh ARGS... DOMAIN`'s output, for records kept beside a backup.
    pub fn virsh_text(&self, command: &str) -> Result<String> {
        self.virsh(&[command, &self.name])
    }

    /// Refuses a libvirt too old to pass file descriptors with QMP. Reads
    /// the client library's version (`virsh --version`; `virsh version`
    /// would probe the hypervisor, seconds on a busy host): the proxy's
    /// passthrough is a client call, and a daemon without it says so.
    fn check_version(&self) -> Result<()> {
        let text = self.virsh(&["--version"])?;
        match version_problem(&text) {
            Some(problem) => Err(Error::TooOld(problem)),
            None => Ok(()),
        }
    }
}

/// Why the libvirt of `virsh --version`'s output cannot carry fds with
/// QMP, if it cannot.
fn version_problem(text: &str) -> Option<String> {
    let mut parts = text.trim().split('.').map(|p| p.parse::<u64>().ok());
    let version = match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor),
        _ => {
            return Some(format!(
                "cannot read libvirt's version from `virsh --version`: {text:?}"
            ));
        }
    };
    (version < FD_PASSING).then(|| {
        format!(
            "libvirt {}.{} cannot pass file descriptors through its QMP proxy; \
             bitback needs libvirt {}.{} or newer (virDomainQemuMonitorCommandWithFiles)\n\
             hint: give QEMU an extra QMP socket (<qemu:commandline>) and use --qmp",
            version.0, version.1, FD_PASSING.0, FD_PASSING.1
        )
    })
}

/// How to run libvirt's QMP proxy: a Python script for the system's
/// python3 (Debian's python3-libvirt is built for /usr/bin/python3; an
/// `env python3` on PATH may be another one without the module).
fn proxy_command() -> std::process::Command {
    let mut cmd = proxy_command_line();
    crate::qemu::daemon::die_with_parent(&mut cmd);
    cmd
}

fn proxy_command_line() -> std::process::Command {
    let script = std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("virt-qemu-qmp-proxy"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from("/usr/bin/virt-qemu-qmp-proxy"));
    let python = Path::new("/usr/bin/python3");
    if python.exists() {
        let mut cmd = std::process::Command::new(python);
        cmd.arg(script);
        cmd
    } else {
        std::process::Command::new(script)
    }
}

/// `virsh blockjob --raw`'s answer: (cur, end), or `None` for "No current
/// block job".
fn block_job(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((field("cur=")?, field("end=")?))
}

/// The DAC base label for domains of type `kind` in libvirt's
/// capabilities XML (`<baselabel type='qemu'>+64055:+994</baselabel>`).
fn dac_label(capabilities: &str, kind: &str) -> Option<crate::qmp::SocketOwner> {
    let doc = roxmltree::Document::parse(capabilities).ok()?;
    let dac = doc.descendants().find(|n| {
        n.has_tag_name("secmodel")
            && n.children()
                .any(|m| m.has_tag_name("model") && m.text() == Some("dac"))
    })?;
    let label = dac
        .children()
        .find(|n| n.has_tag_name("baselabel") && n.attribute("type") == Some(kind))?
        .text()?;
    let (uid, gid) = label.trim().split_once(':')?;
    Some(crate::qmp::SocketOwner {
        uid: uid.trim_start_matches('+').parse().ok()?,
        gid: gid.trim_start_matches('+').parse().ok()?,
    })
}

/// Reads what bitback needs from a domain's XML.
fn parse_xml(xml: &str) -> std::result::Result<DomainInfo, roxmltree::Error> {
    let doc = roxmltree::Document::parse(xml)?;
    let root = doc.root_element();
    let uuid = root
        .children()
        .find(|n| n.has_tag_name("uuid"))
        .and_then(|n| n.text())
        .map(|t| t.trim().to_string());
    let mut disks = Vec::new();
    let devices = root.children().filter(|n| n.has_tag_name("devices"));
    for disk in devices.flat_map(|d| d.children().filter(|n| n.has_tag_name("disk"))) {
        let child = |tag: &str| disk.children().find(|n| n.has_tag_name(tag));
        let Some(target) = child("target").and_then(|t| t.attribute("dev")) else {
            continue;
        };
        let source = child("source")
            .and_then(|s| s.attribute("file").or_else(|| s.attribute("dev")))
            .map(PathBuf::from);
        disks.push(DomainDisk {
            target: target.to_string(),
            alias: child("alias")
                .and_then(|a| a.attribute("name"))
                .map(str::to_string),
            kind: disk.attribute("type").unwrap_or("file").to_string(),
            device: disk.attribute("device").unwrap_or("disk").to_string(),
            source,
            source_name: child("source")
                .and_then(|s| s.attribute("name"))
                .map(str::to_string),
            read_only: child("readonly").is_some(),
            format: child("driver")
                .and_then(|d| d.attribute("type"))
                .map(str::to_string),
            backing_socket: child("backingStore")
                .and_then(|b| b.children().find(|n| n.has_tag_name("source")))
                .filter(|s| s.attribute("protocol") == Some("nbd"))
                .and_then(|s| s.children().find(|n| n.has_tag_name("host")))
                .filter(|h| h.attribute("transport") == Some("unix"))
                .and_then(|h| h.attribute("socket"))
                .map(PathBuf::from),
        });
    }
    let agent = root
        .children()
        .filter(|n| n.has_tag_name("devices"))
        .flat_map(|d| d.children().filter(|n| n.has_tag_name("channel")))
        .any(|c| {
            c.children().any(|t| {
                t.has_tag_name("target") && t.attribute("name") == Some("org.qemu.guest_agent.0")
            })
        });
    Ok(DomainInfo {
        uuid,
        running: false,
        paused: false,
        agent,
        disks,
    })
}

/// libvirt's QMP proxy for one running domain, on a private socket. Killed
/// by its pid, and its directory removed, when dropped.
pub struct Proxy {
    child: std::process::Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Proxy {
    /// Starts `virt-qemu-qmp-proxy` for `domain` and waits until its socket
    /// appears. Call it on a runtime thread, not through `spawn_blocking`:
    /// the proxy dies when the thread that spawned it ends
    /// ([`crate::qemu::daemon::die_with_parent`]), and blocking-pool
    /// threads end when idle.
    pub fn start(domain: &Domain) -> Result<Proxy> {
        domain.check_version()?;
        let dir = crate::qemu::daemon::private_dir("libvirt").map_err(Error::ProxyDir)?;
        let socket = dir.join("qmp.sock");
        let child = proxy_command()
            .arg("--connect")
            .arg(&domain.connect)
            .arg(&domain.name)
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Error::StartingProxy(e));
            }
        };
        info!(pid = child.id(), domain = %domain.name, "started libvirt's QMP proxy");
        let mut proxy = Proxy { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !proxy.socket.exists() {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                let mut text = String::new();
                for pipe in [
                    proxy
                        .child
                        .stdout
                        .take()
                        .map(|p| Box::new(p) as Box<dyn std::io::Read>),
                    proxy
                        .child
                        .stderr
                        .take()
                        .map(|p| Box::new(p) as Box<dyn std::io::Read>),
                ]
                .into_iter()
                .flatten()
                {
                    let mut pipe = pipe;
                    let _ = pipe.read_to_string(&mut text);
                }
                return Err(Error::ProxyExited {
                    domain: domain.name.clone(),
                    status,
                    output: text.trim().to_string(),
                });
            }
            if Instant::now() > deadline {
                return Err(Error::ProxyTimeout {
                    domain: domain.name.clone(),
                    limit: Duration::from_secs(30),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(proxy)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_jobs_are_read_from_virshs_raw_answer() {
        let raw = " type=Pull\n bandwidth=0\n cur=1048576\n end=67108864\n";
        assert_eq!(block_job(raw), Some((1 << 20, 64 << 20)));
        assert_eq!(block_job("No current block job for vda\n"), None);
    }

    #[test]
    fn the_dac_label_of_a_domain_type_is_read_from_the_capabilities() {
        let caps = "<capabilities><host><secmodel><model>none</model><doi>0</doi></secmodel>\
            <secmodel><model>dac</model><doi>0</doi>\
            <baselabel type='kvm'>+64055:+994</baselabel>\
            <baselabel type='qemu'>+64056:+995</baselabel></secmodel></host></capabilities>";
        assert_eq!(
            dac_label(caps, "qemu"),
            Some(crate::qmp::SocketOwner {
                uid: 64056,
                gid: 995
            })
        );
        assert_eq!(dac_label(caps, "kvm").map(|o| o.uid), Some(64055));
        assert_eq!(dac_label(caps, "xen"), None);
        assert_eq!(dac_label("<capabilities/>", "kvm"), None);
    }

    const LIVE: &str = r#"<domain type='qemu' id='3'>
  <name>web1</name>
  <uuid>0d9a6b52-35a4-4b1e-9a7e-1c2d3e4f5a6b</uuid>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web1.qcow2' index='2'/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg0/web1-data' index='1'/>
      <target dev='vdb' bus='virtio'/>
      <alias name='virtio-disk1'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sda' bus='sata'/>
      <readonly/>
      <alias name='sata0-0-0'/>
    </disk>
  </devices>
</domain>"#;

    #[test]
    fn disks_of_a_live_domain() {
        let info = parse_xml(LIVE).unwrap();
        assert_eq!(
            info.uuid.as_deref(),
            Some("0d9a6b52-35a4-4b1e-9a7e-1c2d3e4f5a6b")
        );
        assert_eq!(info.disks.len(), 3);
        assert_eq!(info.disks[0].target, "vda");
        assert_eq!(info.disks[0].alias.as_deref(), Some("virtio-disk0"));
        assert_eq!(
            info.disks[1].source.as_deref(),
            Some(Path::new("/dev/vg0/web1-data"))
        );
        assert_eq!(info.disks[1].kind, "block");
        assert_eq!(info.disks[2].device, "cdrom");
        assert!(info.disks[2].read_only);
        assert_eq!(info.disks[2].source, None);
    }

    #[test]
    fn libvirt_versions_without_fd_passing_are_named() {
        assert_eq!(version_problem("11.3.0\n"), None);
        assert_eq!(version_problem("8.2.0"), None);
        let old = version_problem("8.1.0").unwrap();
        assert!(
            old.contains("libvirt 8.1") && old.contains("8.2 or newer"),
            "{old}"
        );
        assert!(version_problem("7.0.0").unwrap().contains("libvirt 7.0"));
        assert!(version_problem("nonsense").unwrap().contains("cannot read"));
    }

    #[test]
    fn garbage_xml_is_an_error() {
        assert!(parse_xml("<domain><devices>").is_err());
        assert!(parse_xml("not xml").is_err());
    }
}
