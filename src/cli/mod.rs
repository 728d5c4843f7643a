//! The command line: argument parsing, human and JSON output. No logic of
//! its own; every command calls into the library.
//!
//! Exit codes: 0 success; 1 the command ran but found a problem (reserved for
//! checks such as `verify`); 2 the command could not run (bad arguments, no
//! socket, QEMU refused).

mod backup;
mod demo;
mod inspect;
mod monitor;
mod mount;
mod nasbackup;
mod output;
mod qcow2;
mod restore;
mod retention;
mod run;
mod sync;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::level_filters::LevelFilter;

use bitback::qmp;

/// Incremental backups of running QEMU virtual machines, over QMP.
///
/// bitback talks to QEMU's monitor directly (no libvirt), tracks changed
/// blocks with persistent dirty bitmaps, and writes each disk's backups as a
/// chain of qcow2 files.
#[derive(Debug, Parser)]
#[command(name = "bitback", version, max_term_width = 100)]
struct Cli {
    /// More log output on stderr (-v: debug, -vv: every QMP frame).
    ///
    /// The environment variable BITBACK_LOG (error, warn, info, debug, trace)
    /// sets the level too; the flag wins.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    /// File mode mask for everything bitback creates (octal).
    ///
    /// Backups hold whole disks, so the default 077 makes repository files
    /// and restored images 0600 and directories 0700, whatever the shell's
    /// umask. 027 lets the owning group read them.
    #[arg(long, global = true, value_name = "MASK", default_value = "077", value_parser = parse_umask)]
    umask: u32,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Demo(demo::DemoArgs),
    Backup(Box<backup::BackupArgs>),
    Run(run::RunArgs),
    List(backup::ListArgs),
    Restore(restore::RestoreArgs),
    Mount(mount::MountArgs),
    Umount(mount::UmountArgs),
    Serving(mount::ServingArgs),
    Verify(restore::VerifyArgs),
    Prune(retention::PruneArgs),
    Consolidate(retention::ConsolidateArgs),
    Export(retention::ExportArgs),
    Sync(sync::SyncArgs),
    Inspect(inspect::Args),
    RemoveCheckpoint(inspect::RemoveCheckpointArgs),
    Nasbackup(nasbackup::NasArgs),
    #[command(hide = true)]
    ThawGuard(backup::ThawGuardArgs),
    #[command(hide = true)]
    ServeBucket(mount::ServeBucketArgs),
    #[command(subcommand)]
    Qcow2(qcow2::Command),
}

fn parse_umask(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode mask such as 077 or 027"))
}

/// Exit status when a command could not be carried out.
const EXIT_ERROR: u8 = 2;
/// Exit status when a backup (or a check) ran and failed.
const EXIT_FAILED: u8 = 1;

/// 2 for bad usage or input (nothing was attempted), 1 when a backup or
/// restore ran and failed, 2 for any other failure.
fn exit_code(error: &anyhow::Error) -> u8 {
    let failed = error.downcast_ref::<bitback::engine::Operation>().is_some();
    if failed && !bitback::engine::nothing_attempted(error) {
        EXIT_FAILED
    } else {
        EXIT_ERROR
    }
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_ERROR)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(cli.verbose);
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(cli.umask));
    if matches!(cli.command, Command::Nasbackup(_)) {
        nasbackup::private_mounts();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bitback: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Backup(args) => backup::backup(*args).await,
            Command::Run(args) => run::run(args).await,
            Command::List(args) => backup::list(args),
            Command::Restore(args) => restore::restore(args).await,
            Command::Mount(args) => mount::mount(args).await,
            Command::Umount(args) => mount::umount(args).await,
            Command::Serving(args) => mount::serving(args).await,
            Command::Verify(args) => restore::verify(args),
            Command::Prune(args) => retention::prune(args),
            Command::Consolidate(args) => retention::consolidate(args),
            Command::Export(args) => retention::export(args).await,
            Command::Sync(args) => sync::sync(args),
            Command::Inspect(args) => inspect::run(args).await,
            Command::RemoveCheckpoint(args) => inspect::remove_checkpoint(args).await,
            Command::Nasbackup(args) => nasbackup::run(args).await,
            Command::ThawGuard(args) => backup::thaw_guard(args).await,
            Command::ServeBucket(args) => mount::serve_bucket(args).await,
            Command::Qcow2(command) => qcow2::run(command),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bitback: {e:#}");
            if let Some(hint) = hint(&e) {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

/// A next step for the errors operators meet most.
fn hint(error: &anyhow::Error) -> Option<&'static str> {
    use std::io::ErrorKind;
    let qmp_error = error.chain().find_map(|e| e.downcast_ref::<qmp::Error>())?;
    match qmp_error {
        qmp::Error::Connecting { source, .. } => match source.kind() {
            ErrorKind::NotFound => {
                Some("is QEMU running with -qmp unix:PATH,server=on,wait=off at that path?")
            }
            ErrorKind::ConnectionRefused => {
                Some("nothing listens on that socket; the QEMU that made it may have exited")
            }
            ErrorKind::PermissionDenied => {
                Some("run bitback as a user that may open the socket (often root or QEMU's user)")
            }
            _ => None,
        },
        qmp::Error::GreetingTimeout { .. } => Some(
            "QEMU serves one client per QMP socket and another may hold this one; \
             give QEMU a second -qmp socket for bitback",
        ),
        qmp::Error::NotQmp { .. } => {
            Some("bitback needs a QMP socket (-qmp, or -mon mode=control), not a serial or HMP one")
        }
        _ => None,
    }
}

fn init_logging(verbose: u8) {
    let from_env = std::env::var("BITBACK_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok());
    let level = match verbose {
        0 => from_env.unwrap_or(LevelFilter::WARN),
        1 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    };
    // Colours only for a person at a terminal: a pipe, a file or a
    // journal gets plain text.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}
