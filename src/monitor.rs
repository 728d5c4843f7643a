//! Reaching a running VM's monitor: a QMP socket of its own, or a
//! libvirt domain (through libvirt's QMP proxy, or through the extra QMP
//! socket the domain was given), with the volumes named the way the VM's
//! backups name them (a libvirt domain's by target device). Every front
//! end asks here.

use std::time::Duration;

use anyhow::Context;

use crate::libvirt::{Domain, DomainInfo, Proxy};
use crate::qemu::{self, Volume};
use crate::qmp::{Endpoint, Options as QmpOptions, Qmp, SocketOwner};
use tracing::info;

/// A [`Target`] that names neither a socket nor a domain: the caller's
/// input to fix.
#[derive(Debug, thiserror::Error)]
#[error("give a QMP socket (--qmp SOCK) or a libvirt domain (--libvirt DOMAIN)")]
pub struct NoTarget;

/// Where the VM's monitor is.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// A QMP socket: a unix socket path, or tcp:HOST:PORT. With a domain:
    /// the extra socket the domain was given, used instead of the proxy.
    pub qmp: Option<String>,
    /// A libvirt domain.
    pub domain: Option<Domain>,
}

/// A connection to a running VM's monitor. The proxy, if any, lives as
/// long as this value (dropped after the connection).
pub struct Monitor {
    pub qmp: Qmp,
    /// (node name, volume name) for a libvirt domain; empty otherwise.
    pub renames: Vec<(String, String)>,
    /// The volumes listed while connecting, handed out by the first
    /// [`Monitor::volumes`].
    listed: Option<Vec<Volume>>,
    _proxy: Option<Proxy>,
}

impl Monitor {
    /// The VM's volumes, named as its backups name them (a libvirt
    /// domain's by target device; one the domain XML does not list is
    /// left out).
    pub async fn volumes(&mut self) -> anyhow::Result<Vec<Volume>> {
        let all = match self.listed.take() {
            Some(listed) => listed,
            None => qemu::list_volumes(&self.qmp)
                .await
                .context("listing the VM's volumes")?,
        };
        Ok(qemu::named(all, &self.renames))
    }
}

impl Target {
    /// Connects to the running VM. `info` is the domain's XML, when the
    /// target is a libvirt domain: its volumes are then named by target.
    pub async fn connect(
        &self,
        info: Option<&DomainInfo>,
        timeout: Duration,
    ) -> anyhow::Result<Monitor> {
        let mut options = QmpOptions {
            command_timeout: timeout,
            ..QmpOptions::default()
        };
        let (endpoint, proxy) = match (&self.qmp, self.domain.clone()) {
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
                return Err(NoTarget.into());
            }
        };
        let qmp = if proxy.is_some() {
            // The proxy passes descriptors with add-fd only; a getfd
            // through it ends the connection (libvirt 11.3).
            options.named_fds = false;
            let mut qmp = connect_to_proxy(endpoint, options).await?;
            let owner = self.domain.as_ref().and_then(Domain::qemu_owner);
            adopt_owner(&mut qmp, owner).await;
            qmp
        } else {
            let qmp = Qmp::connect_with(endpoint.clone(), options).await?;
            if matches!(endpoint, Endpoint::Unix(_)) && qmp.named_fds() && !takes_getfd(&qmp).await
            {
                // A relay that ends the connection on getfd: libvirt's QMP
                // proxy, given as a plain socket. Connect again, and pass
                // descriptors the way it takes them.
                info!(
                    "the monitor dropped the connection on getfd (libvirt's QMP proxy?); connecting again, passing descriptors with add-fd"
                );
                drop(qmp);
                options.named_fds = false;
                let mut qmp = connect_to_proxy(endpoint, options).await?;
                let owner = libvirt_qemu_user(&qmp).await;
                adopt_owner(&mut qmp, owner).await;
                qmp
            } else {
                qmp
            }
        };
        let (renames, listed) = match info {
            Some(info) => {
                let volumes = qemu::list_volumes(&qmp)
                    .await
                    .context("listing the domain's volumes")?;
                (renames(&volumes, info), Some(volumes))
            }
            None => (Vec::new(), None),
        };
        Ok(Monitor {
            qmp,
            renames,
            listed,
            _proxy: proxy,
        })
    }
}

/// Lets bitback's sockets be given to `owner`, the user a QEMU behind
/// libvirt's proxy runs as, once a probe showed QEMU can connect to one.
async fn adopt_owner(qmp: &mut Qmp, owner: Option<SocketOwner>) {
    let Some(owner) = owner else {
        return;
    };
    match reaches_sockets(qmp, owner).await {
        Ok(()) => qmp.set_socket_owner(owner),
        Err(e) => info!(
            error = format!("{e:#}"),
            "QEMU cannot connect to a socket bitback listens on"
        ),
    }
}

/// Whether QEMU, running as `owner`, can connect to a socket bitback
/// listens on in a directory of `owner`'s (a MAC policy may forbid it):
/// QEMU connects a client character device to one, which is then removed.
async fn reaches_sockets(qmp: &Qmp, owner: SocketOwner) -> anyhow::Result<()> {
    let name = format!("bitback-probe-{}", std::process::id());
    let dir = qemu::daemon::socket_dir(&name, Some(owner))?;
    let socket = dir.join("probe.sock");
    let tried = async {
        let _listener = std::os::unix::net::UnixListener::bind(&socket)
            .with_context(|| format!("listening on {}", socket.display()))?;
        qemu::daemon::give_to(&socket, owner)?;
        qemu::commands::add_socket_chardev(qmp, &name, &socket)
            .await
            .context("QEMU connecting to a probe socket")?;
        qemu::commands::remove_chardev(qmp, &name)
            .await
            .context("removing the probe's character device")?;
        anyhow::Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    tried
}

/// Whether the monitor takes a socket with `getfd`, as the NBD data path
/// passes one: one end of a fresh socket pair is passed under a probe
/// name and closed again. `false` only when the connection ended on it,
/// as libvirt's QMP proxy ends it (it cannot relay a socket).
async fn takes_getfd(qmp: &Qmp) -> bool {
    use std::os::fd::AsFd;
    let Ok((_ours, theirs)) = std::os::unix::net::UnixStream::pair() else {
        return true;
    };
    let name = format!("bitback-probe-{}", std::process::id());
    match qmp.getfd(&name, theirs.as_fd()).await {
        Ok(()) => {
            let _ = qemu::commands::close_fd(qmp, &name).await;
            true
        }
        Err(crate::qmp::Error::Disconnected { .. }) => false,
        Err(_) => true,
    }
}

/// The user a libvirt QEMU runs as, found from its name (`query-name`,
/// which libvirt sets to the domain's) and libvirt's pid file.
async fn libvirt_qemu_user(qmp: &Qmp) -> Option<SocketOwner> {
    let (_, name) = qemu::query::identity(qmp).await;
    Domain {
        name: name?,
        connect: "qemu:///system".into(),
    }
    .qemu_owner()
}

/// Connects to libvirt's QMP proxy. Its socket file appears when it binds,
/// a moment before it listens: a refused connection is tried again for a
/// few seconds.
async fn connect_to_proxy(endpoint: Endpoint, options: QmpOptions) -> anyhow::Result<Qmp> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Qmp::connect_with(endpoint.clone(), options).await {
            Err(crate::qmp::Error::Connecting { source, .. })
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
fn renames(volumes: &[Volume], info: &DomainInfo) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for v in volumes {
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
    out
}
