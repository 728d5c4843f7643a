//! `bitback demo`: the library's [`bitback::demo`], its steps printed.

use std::path::PathBuf;
use std::process::ExitCode;

/// Show bitback at work on a throwaway disk, then clean up.
///
/// Makes a 256 MiB qcow2 disk in a temp dir, serves it with
/// qemu-storage-daemon (standing in for a running VM), writes data, takes a
/// full backup and two incrementals with writes between them, restores the
/// last point with bitback's native restore, and proves it equal to the
/// disk with `qemu-img compare`. Needs qemu-img, qemu-io and
/// qemu-storage-daemon (Debian's qemu-utils).
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Keep the demo's files in this directory instead of a temp dir that
    /// is removed at the end.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
}

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    bitback::demo::run(args.keep.as_deref(), &mut |line| println!("{line}")).await?;
    Ok(ExitCode::SUCCESS)
}
