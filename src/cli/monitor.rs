//! Reaching a running VM's monitor: `--qmp SOCK`, or `--libvirt DOMAIN`
//! (through libvirt's QMP proxy, or through `--qmp` as the domain's extra
//! socket), with volumes named the way the VM's backups name them.

use std::time::Duration;

use anyhow::Context;

use bitback::engine::BadInput;
use bitback::libvirt::{Domain, DomainInfo, Proxy};
use bitback::qemu;
use bitback::qmp::{Endpoint, Options as QmpOptions, Qmp};

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

/// A connection to a running VM's monitor. The proxy, if any, lives as
/// long as this value (dropped after the connection).
pub(crate) struct Monitor {
    pub qmp: Qmp,
    /// (node name, volume name) for a libvirt domain; empty otherwise.
    pub renames: Vec<(String, String)>,
    _proxy: Option<Proxy>,
}

impl Target {
    pub fn domain(&self) -> Option<Domain> {
        self.libvirt.as_ref().map(|name| Domain {
            name: name.clone(),
            connect: self.connect.clone(),
        })
    }

    /// Connects to the running VM. `info` is the domain's, when --libvirt.
    pub async fn connect(
        &self,
        info: Option<&DomainInfo>,
        timeout: Duration,
    ) -> anyhow::Result<Monitor> {
        let mut options = QmpOptions {
            command_timeout: timeout,
            ..QmpOptions::default()
        };
        let (endpoint, proxy) = match (&self.qmp, self.domain()) {
            (Some(qmp), _) => (Endpoint::parse(qmp)?, None),
            (None, Some(domain)) => {
                let proxy = Proxy::start(&domain)?;
                // The proxy greets only after asking libvirt for the
                // hypervisor's version, which libvirt may re-probe: seconds,
                // more on a busy host (measured 4 s idle, over 10 s under
                // load).
                options.connect_timeout = options.connect_timeout.max(Duration::from_secs(120));
                (Endpoint::Unix(proxy.socket().to_path_buf()), Some(proxy))
            }
            (None, None) => {
                return Err(BadInput("give --qmp SOCK or --libvirt DOMAIN".into()).into());
            }
        };
        let qmp = if proxy.is_some() {
            connect_to_proxy(endpoint, options).await?
        } else {
            Qmp::connect_with(endpoint, options).await?
        };
        let renames = match info {
            Some(info) => renames(&qmp, info).await?,
            None => Vec::new(),
        };
        Ok(Monitor {
            qmp,
            renames,
            _proxy: proxy,
        })
    }
}

/// Connects to libvirt's QMP proxy. Its socket file appears when it binds,
/// a moment before it listens: a refused connection is tried again for a
/// few seconds.
async fn connect_to_proxy(endpoint: Endpoint, options: QmpOptions) -> anyhow::Result<Qmp> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Qmp::connect_with(endpoint.clone(), options).await {
            Err(bitback::qmp::Error::Connecting { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionRefused
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Whatever goes wrong behind libvirt's proxy is no usage
            // error of the caller's (exit 1, not 2).
            other => {
                return other.map_err(|e| anyhow::anyhow!("libvirt's QMP proxy: {e}"));
            }
        }
    }
}

/// Names a libvirt domain's volumes by target device: QEMU knows each
/// disk by its libvirt alias (the qdev id), which the live XML maps to
/// the target.
async fn renames(qmp: &Qmp, info: &DomainInfo) -> anyhow::Result<Vec<(String, String)>> {
    let volumes = qemu::list_volumes(qmp)
        .await
        .context("listing the domain's volumes")?;
    let mut out = Vec::new();
    for v in &volumes {
        match info
            .disks
            .iter()
            .find(|d| d.alias.as_deref() == Some(v.name.as_str()))
        {
            Some(disk) => out.push((v.node_name.clone(), disk.target.clone())),
            None => {
                tracing::info!(volume = %v.name, "a volume the domain XML does not list; skipped")
            }
        }
    }
    Ok(out)
}
