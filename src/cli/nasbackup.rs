//! `bitback nasbackup`: CloudStack's `nasbackup.sh` command line, run by
//! the library's [`bitback::nasbackup`]; this prints what it says.

use std::process::ExitCode;

/// Act as CloudStack's nasbackup.sh (the KVM agent's NAS backup script).
///
/// Takes exactly the script's options (-o backup|delete|stats, -v DOMAIN,
/// -t TYPE, -s STORAGE, -m MOUNT_OPTIONS, -p PATH, -q true|false, -d
/// PATHS, -M full|incremental|legacy-full, --bitmap-new NAME,
/// --bitmap-parent NAME, --parent-paths P1,P2,..., -w MOUNT_TIMEOUT, and
/// the open PR's -c, -b MIB_PER_S, -e PASSFILE, --verify) and keeps its
/// output and exit codes; see docs/cloudstack.md. An incremental that
/// cannot be built safely is a full with INCREMENTAL_FALLBACK=true.
/// bitback's own: --size-marker (a stopped VM's output gets
/// BACKUP_SIZE_TOTAL= too).
#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
pub(crate) struct NasArgs {
    /// The script's arguments, as the agent passes them.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    args: Vec<String>,
}

pub(crate) async fn run(args: NasArgs) -> anyhow::Result<ExitCode> {
    let guard = super::backup::thaw_guard_command();
    let (stdout, code) = bitback::nasbackup::run(&args.args, &guard).await;
    for line in stdout {
        println!("{line}");
    }
    Ok(ExitCode::from(code?))
}

/// Gives this process a mount namespace of its own; see
/// [`bitback::nasbackup::private_mounts`].
pub(crate) fn private_mounts() {
    bitback::nasbackup::private_mounts();
}
