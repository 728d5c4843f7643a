//! Reaching a running VM's monitor: `--qmp SOCK`, or `--libvirt DOMAIN`
//! (through libvirt's QMP proxy, or through `--qmp` as the domain's extra
//! socket), with volumes named the way the VM's backups name them.

use std::time::Duration;

use bitback::libvirt::{Domain, DomainInfo};
pub(crate) use bitback::monitor::Monitor;

/// Where the VM is, as the command line said.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Target {
    /// The running VM's QMP monitor: a unix socket path, or tcp:HOST:PORT.
    ///
    /// Over a unix socket, backup files are handed to QEMU as passed file
    /// descriptors, so QEMU need not be able to open the repository itself.
    /// With --libvirt: the extra QMP socket the domain was given
    /// (`<qemu:commandline>`), used instead of libvirt's QMP proxy.
    #[arg(long, value_name = "SOCK")]
    pub qmp: Option<String>,

    /// A libvirt domain (name, UUID or id), running or shut off.
    ///
    /// Running: bitback reaches its QMP monitor through libvirt's QMP proxy
    /// (virt-qemu-qmp-proxy, started and ended by bitback; libvirt 8.2+),
    /// with no restart and no socket prepared. Shut off: its disks are
    /// read from the domain XML and backed up through qemu-storage-daemon.
    /// Volumes are named by target device (vda, vdb, ...) either way.
    #[arg(long, value_name = "DOMAIN")]
    pub libvirt: Option<String>,

    /// The libvirt connection URI, with --libvirt.
    #[arg(
        long,
        value_name = "URI",
        default_value = "qemu:///system",
        requires = "libvirt"
    )]
    pub connect: String,
}

impl Target {
    pub fn domain(&self) -> Option<Domain> {
        self.libvirt.as_ref().map(|name| Domain {
            name: name.clone(),
            connect: self.connect.clone(),
        })
    }

    /// The library's view of where the monitor is.
    pub fn target(&self) -> bitback::monitor::Target {
        bitback::monitor::Target {
            qmp: self.qmp.clone(),
            domain: self.domain(),
        }
    }

    /// Connects to the running VM. `info` is the domain's, when --libvirt.
    pub async fn connect(
        &self,
        info: Option<&DomainInfo>,
        timeout: Duration,
    ) -> anyhow::Result<Monitor> {
        self.target().connect(info, timeout).await
    }
}
