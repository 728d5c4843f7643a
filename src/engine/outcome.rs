//! How the engine's runs end, as a front end decides on them: input to
//! fix (nothing attempted), or an operation that ran and failed.

/// The engine's errors that a front end decides on (the CLI maps them to
/// exit codes): what failed, as a typed context: a backup or restore that
/// ran (exit 1), as opposed to [`BadInput`] or an unreachable QEMU (exit
/// 2). The layers below have their own (`qmp::Error`, `repo::Error`,
/// `libvirt::Error`, `qemu::daemon::Error`, `child::Failed`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Operation {
    #[error("backup of vm {vm}")]
    Backup { vm: String },
    #[error("restore of vm {vm}")]
    Restore { vm: String },
    #[error("sync of {from} into {to}")]
    Sync { from: String, to: String },
}

/// Whether `error` says nothing was attempted: input the user must fix
/// ([`BadInput`], no monitor named), a monitor never reached, or a
/// repository that cannot be used as given. Each error type says which of
/// its own kinds are input.
pub fn nothing_attempted(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        e.is::<BadInput>()
            || e.is::<crate::monitor::NoTarget>()
            || e.downcast_ref::<crate::qmp::Error>()
                .is_some_and(crate::qmp::Error::is_input)
            || e.downcast_ref::<crate::repo::Error>()
                .is_some_and(crate::repo::Error::is_input)
    })
}

/// Input the user must fix (an unknown volume, a malformed argument):
/// nothing was attempted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);
