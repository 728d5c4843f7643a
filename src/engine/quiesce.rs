//! Freezing the guest's filesystems just around the transaction, one way
//! or the other ([`Thawer`]): through the guest agent's socket, or through
//! libvirt, which holds the agent's channel of its domains. From before
//! the freeze until the thaw a thaw guard ([`super::thaw_guard`]) stands
//! by, so that a bitback killed in between leaves no frozen guest.
//!
//! The two ways differ where a freeze fails: through the agent socket the
//! backup fails (the operator asked for a frozen copy); through libvirt
//! the copy goes on unfrozen and the failure is logged, as CloudStack's
//! script does. A freeze that failed may still complete in the guest, so
//! a thaw follows it either way.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tracing::{error, info, warn};

use super::thaw_guard::{GuardCommand, ThawGuard, Thawer};
use crate::libvirt::Domain;
use crate::qemu::agent::Agent;

/// A guest frozen for the transaction; thawed by [`Frozen::thaw`].
pub(super) struct Frozen {
    how: How,
    guard: ThawGuard,
}

enum How {
    Agent(Agent),
    Libvirt(Domain),
}

/// Freezes the guest `thawer` reaches, giving up after `limit`. `None`
/// when libvirt could not freeze it and the copy goes on unfrozen.
pub(super) async fn freeze(
    thawer: &Thawer,
    guard: &GuardCommand,
    vm: &str,
    limit: Duration,
) -> anyhow::Result<Option<Frozen>> {
    match thawer {
        Thawer::Agent(socket) => {
            let mut agent = Agent::connect(socket, Duration::from_secs(10)).await?;
            let guard = ThawGuard::start(guard, thawer)?;
            match agent.freeze(limit).await {
                Ok(n) => {
                    info!(vm, filesystems = n, "guest filesystems frozen");
                    Ok(Some(Frozen {
                        how: How::Agent(agent),
                        guard,
                    }))
                }
                Err(e) => {
                    if let Err(t) = agent.thaw_after_freeze().await {
                        // The guard, unreleased, tries again.
                        bail!(
                            "freezing the guest failed ({e}), and so did the thaw after it: {t}; \
                             the guest's filesystems may still be frozen"
                        );
                    }
                    guard.release();
                    Err(anyhow!(e).context("freezing the guest's filesystems"))
                }
            }
        }
        Thawer::Libvirt(domain) => {
            let guard = ThawGuard::start(guard, thawer)?;
            let frozen = {
                let domain = domain.clone();
                tokio::task::spawn_blocking(move || libvirt_freeze(&domain, limit)).await?
            };
            match frozen {
                Ok(()) => Ok(Some(Frozen {
                    how: How::Libvirt(domain.clone()),
                    guard,
                })),
                Err(e) => {
                    warn!(vm, error = %format!("{e:#}"), "freezing the guest through libvirt failed; copying unfrozen");
                    guard.release();
                    Ok(None)
                }
            }
        }
        Thawer::ResumeQmp(_) | Thawer::ResumeLibvirt(_) => {
            bail!("internal error: a resuming guard cannot freeze the guest")
        }
    }
}

/// libvirt's freeze, and the thaw after one that failed. A domain with
/// nothing to freeze through (no agent channel, paused) is said so, and
/// no thaw follows.
fn libvirt_freeze(domain: &Domain, limit: Duration) -> anyhow::Result<()> {
    match domain.info() {
        Ok(info) if !info.agent => bail!(
            "domain {} has no guest agent channel (org.qemu.guest_agent.0), so its filesystems cannot be frozen; the copy is crash-consistent",
            domain.name
        ),
        Ok(info) if info.paused => bail!(
            "domain {} is paused, so its guest agent cannot freeze; the copy is of the paused guest (crash-consistent)",
            domain.name
        ),
        _ => {}
    }
    let frozen = domain.fs_freeze(limit);
    if frozen.is_err()
        && let Err(t) = domain.fs_thaw()
    {
        error!(error = %format!("{t:#}"), "thawing after a failed freeze failed; the guest may be frozen");
    }
    Ok(frozen?)
}

impl Frozen {
    /// Thaws the guest; what failed, if the thaw did (the guard then stays
    /// and tries again once this process let go of the agent's socket).
    pub(super) async fn thaw(self, vm: &str) -> Option<String> {
        let failed = match self.how {
            How::Agent(mut agent) => match agent.thaw_after_freeze().await {
                Ok(n) => {
                    info!(vm, filesystems = n, "guest filesystems thawed");
                    None
                }
                Err(e) => {
                    error!(vm, error = %e, "thawing the guest failed; its filesystems may still be frozen");
                    Some(e.to_string())
                }
            },
            How::Libvirt(domain) => {
                let thawed = tokio::task::spawn_blocking(move || domain.fs_thaw())
                    .await
                    .context("thawing through libvirt")
                    .and_then(|r| r.map_err(anyhow::Error::from));
                match thawed {
                    Ok(()) => None,
                    Err(e) => {
                        error!(vm, error = %format!("{e:#}"), "thawing the guest through libvirt failed");
                        Some(format!("{e:#}"))
                    }
                }
            }
        };
        if failed.is_none() {
            self.guard.release();
        }
        failed
    }
}
