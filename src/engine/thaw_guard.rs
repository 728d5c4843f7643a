//! The thaw guard: a process apart from bitback that thaws the guest when
//! bitback dies while the guest may be frozen.
//!
//! bitback thaws the guest itself on every path it lives through, but a
//! SIGKILL (a wrapper's timeout, the OOM killer) between the freeze and
//! the thaw would leave the guest's filesystems frozen, and a frozen guest
//! stalls every write until someone thaws it by hand. So before a freeze
//! bitback starts itself again as `bitback thaw-guard`, in a process group
//! of its own (a signal to bitback's group does not reach it), with a pipe
//! on its stdin. When the guest is thawed bitback writes [`RELEASE`] and
//! waits for the guard to exit; when bitback dies, the kernel closes the
//! pipe, and a guard that read end of file without the release thaws the
//! guest (retrying for [`THAW_FOR`]) and exits. A thaw of a guest that is
//! not frozen does nothing, so a guard that thaws needlessly is harmless.
//!
//! Not covered: a kill of the guard itself, or of the whole cgroup at once
//! (systemd's stop sends SIGTERM to every process in the unit, which the
//! guard ignores; its SIGKILL comes after `TimeoutStopSec`, by when the
//! guard has thawed).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use tracing::{error, warn};

use crate::libvirt::Domain;
use crate::qemu::agent::{Agent, AgentError};
use crate::qemu::commands;

/// What bitback writes when the guest is thawed.
const RELEASE: &[u8] = b"thawed\n";
/// How long a guard keeps trying to thaw.
const THAW_FOR: Duration = Duration::from_secs(120);

/// What a guard undoes, and through whom: a freeze (the guest's
/// filesystems thawed) or a pause (the VM that bitback paused for a
/// backup's point resumed; see [`super::guard`]).
#[derive(Debug, Clone)]
pub enum Thawer {
    /// Thaw through the guest agent's socket (`--qga`).
    Agent(PathBuf),
    /// Thaw through libvirt, by the agent channel it holds (`virsh
    /// domfsthaw`).
    Libvirt(Domain),
    /// Resume through this QMP socket (`cont`), once bitback's connection
    /// is gone.
    ResumeQmp(PathBuf),
    /// Resume through libvirt (`virsh resume`).
    ResumeLibvirt(Domain),
}

impl Thawer {
    fn args(&self) -> Vec<std::ffi::OsString> {
        match self {
            Thawer::Agent(socket) => vec!["--qga".into(), socket.into()],
            Thawer::Libvirt(domain) => vec![
                "--libvirt".into(),
                domain.name.clone().into(),
                "--connect".into(),
                domain.connect.clone().into(),
            ],
            Thawer::ResumeQmp(socket) => vec!["--resume-qmp".into(), socket.into()],
            Thawer::ResumeLibvirt(domain) => vec![
                "--libvirt".into(),
                domain.name.clone().into(),
                "--connect".into(),
                domain.connect.clone().into(),
                "--resume".into(),
            ],
        }
    }

    /// Whether this guard resumes a paused VM (rather than thaws).
    fn resumes(&self) -> bool {
        matches!(self, Thawer::ResumeQmp(_) | Thawer::ResumeLibvirt(_))
    }

    /// One thaw attempt.
    async fn thaw(&self) -> anyhow::Result<()> {
        match self {
            Thawer::Agent(socket) => {
                let mut agent = Agent::connect(socket, Duration::from_secs(10)).await?;
                agent.thaw_after_freeze().await?;
                Ok(())
            }
            Thawer::Libvirt(domain) => {
                let domain = domain.clone();
                Ok(tokio::task::spawn_blocking(move || domain.fs_thaw()).await??)
            }
            Thawer::ResumeQmp(socket) => {
                let qmp = crate::qmp::Qmp::connect(&socket.display().to_string()).await?;
                let status = crate::qemu::query::status(&qmp).await?;
                // Only a VM the backup paused ("paused" by `stop`); one
                // that runs, or stopped for another reason (an I/O error,
                // a migration), is left as it is.
                if status.status == "paused" {
                    commands::cont(&qmp).await?;
                }
                Ok(())
            }
            Thawer::ResumeLibvirt(domain) => {
                let domain = domain.clone();
                Ok(tokio::task::spawn_blocking(move || domain.resume_if_paused()).await??)
            }
        }
    }
}

/// How to start a guard: a program and its first arguments, which the
/// thawer's own follow (`--qga SOCK`, or `--libvirt DOMAIN --connect
/// URI`); the program must then run [`serve`]. The caller names it (the
/// CLI: its own binary's hidden `thaw-guard` command), so that the library
/// knows no command line of its front ends.
#[derive(Debug, Clone)]
pub struct GuardCommand {
    pub program: PathBuf,
    pub args: Vec<std::ffi::OsString>,
}

/// A running guard; [`ThawGuard::release`] once the guest is thawed.
/// Dropped unreleased, it closes the pipe and the guard thaws.
pub struct ThawGuard {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl ThawGuard {
    /// Starts a guard for `thawer` with `command`, before the freeze.
    pub fn start(command: &GuardCommand, thawer: &Thawer) -> anyhow::Result<ThawGuard> {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(&command.program)
            .args(&command.args)
            .args(thawer.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting bitback's thaw guard (which thaws the guest if bitback dies)")?;
        let stdin = child.stdin.take();
        Ok(ThawGuard { child, stdin })
    }

    /// The guest is thawed: tells the guard and waits for it to exit, so
    /// nothing of this backup outlives bitback.
    pub fn release(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(RELEASE);
        }
        let _ = self.child.wait();
    }
}

impl Drop for ThawGuard {
    fn drop(&mut self) {
        // Unreleased: closing the pipe makes the guard thaw. It is not
        // waited for; it outlives bitback if it must.
        self.stdin.take();
    }
}

/// The guard's side: waits for end of file on stdin and thaws unless the
/// release came first. Returns whether the guest needed no thaw or was
/// thawed.
pub async fn serve(thawer: Thawer) -> bool {
    // bitback's SIGTERM, Ctrl-C or hang-up must not end the guard before
    // its thaw: each is caught here and let pass.
    use tokio::signal::unix::{SignalKind, signal};
    let _caught: Vec<_> = [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
    ]
    .into_iter()
    .filter_map(|kind| signal(kind).ok())
    .collect();
    let released = tokio::task::spawn_blocking(|| {
        let mut seen = Vec::new();
        let _ = std::io::stdin().take(64).read_to_end(&mut seen);
        seen == RELEASE
    })
    .await
    .unwrap_or(false);
    if released {
        return true;
    }
    match thawer.resumes() {
        false => warn!(
            ?thawer,
            "bitback ended while the guest may be frozen; thawing it"
        ),
        true => warn!(
            ?thawer,
            "bitback ended while the vm may be paused; resuming it"
        ),
    }
    let deadline = Instant::now() + THAW_FOR;
    loop {
        match thawer.thaw().await {
            Ok(()) => {
                match thawer.resumes() {
                    false => warn!(?thawer, "guest thawed after bitback ended"),
                    true => warn!(?thawer, "vm resumed after bitback ended"),
                }
                return true;
            }
            // An agent that answers with a refusal will refuse again; a
            // connection, a timeout or libvirt may come good.
            Err(e) if Instant::now() < deadline && !refused(&e) => {
                warn!(error = %format!("{e:#}"), "thawing the guest failed; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                error!(
                    ?thawer,
                    error = %format!("{e:#}"),
                    "thawing or resuming failed; the guest may still be frozen, or the vm paused"
                );
                return false;
            }
        }
    }
}

fn refused(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<AgentError>(),
        Some(AgentError::Refused { .. })
    )
}
