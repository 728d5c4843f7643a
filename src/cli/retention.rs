//! `bitback prune`, `bitback consolidate` and `bitback export`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use bitback::engine::{self, Calendar, ExportOptions, Keep, Listen, Retention};
use bitback::repo::Repo;

/// Delete old backups, never one a kept backup builds on.
///
/// --keep-chains N keeps the newest N chains (a full and its
/// incrementals); --keep-last N keeps the newest N backups and every
/// backup they need. By the calendar (restic's and Proxmox Backup
/// Server's meaning; combine them, and with --keep-last): --keep-daily N
/// keeps, for each of the newest N days that have backups, the newest
/// backup of that day; --keep-hourly, --keep-weekly (ISO weeks, Monday to
/// Sunday), --keep-monthly and --keep-yearly the same for their periods.
/// Periods are UTC, by the time each manifest records. For example, with
/// a backup every night at 01:00, --keep-daily 7 --keep-weekly 4
/// --keep-monthly 6 keeps the last 7 nights, the newest backup of each of
/// the 4 newest weeks, and of each of the 6 newest months: at most 17,
/// usually fewer as they overlap. Whatever a kept backup builds on is
/// kept too.
///
/// Deleted backups disappear in one rename each; a crash leaves at most a
/// `.<id>.deleting` directory, removed next time.
#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("keep")
        .required(true)
        .multiple(true)
        .args(["keep_chains", "keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"])
))]
pub(crate) struct PruneArgs {
    /// The repository: a directory, or s3://BUCKET/PREFIX (a point goes
    /// for good, every version of its objects; one an object lock holds
    /// is kept, with all it builds on, and the report says until when).
    #[arg(long, value_name = "DIR|URL")]
    repo: PathBuf,
    /// The S3 endpoint of an s3:// repository (a store other than AWS),
    /// instead of AWS_ENDPOINT_URL.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// The VM to prune.
    #[arg(long, value_name = "NAME")]
    vm: String,
    /// Keep the newest N chains (alone: not with the other --keep-*).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..),
          conflicts_with_all = ["keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"])]
    keep_chains: Option<u64>,
    /// Keep the newest N backups (and what they build on).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    keep_last: Option<u64>,
    /// Keep the newest backup of each of the newest N hours with backups.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    keep_hourly: Option<u64>,
    /// Keep the newest backup of each of the newest N days with backups.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    keep_daily: Option<u64>,
    /// Keep the newest backup of each of the newest N ISO weeks.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    keep_weekly: Option<u64>,
    /// Keep the newest backup of each of the newest N months.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    keep_monthly: Option<u64>,
    /// Keep the newest backup of each of the newest N years.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    keep_yearly: Option<u64>,
    /// Say what would be deleted and kept, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print {deleted, kept, consolidated, locked, dry_run} as JSON.
    #[arg(long)]
    json: bool,
}

/// Shorten long chains: merge the oldest incrementals into the full.
///
/// For a chain longer than --max-chain, the backup that would be the
/// oldest one kept is rewritten as a full of the same point (written
/// aside, then swapped in with one atomic rename), and the backups before
/// it are deleted. The next incremental's link to it never breaks, and a
/// crash at any moment leaves every point restorable. Restores from short
/// chains read fewer files.
///
/// A bucket (s3://) is refused: its points are never rewritten; its chains
/// are shortened by new fulls (backup --full-every N) and prune.
#[derive(Debug, clap::Args)]
pub(crate) struct ConsolidateArgs {
    /// The repository directory.
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
    /// The VM whose chains to shorten.
    #[arg(long, value_name = "NAME")]
    vm: String,
    /// The longest chain to leave, in backups (1: every backup a full).
    #[arg(long, value_name = "L", value_parser = clap::value_parser!(u32).range(1..))]
    max_chain: u32,
    /// Print {deleted, kept, consolidated} as JSON.
    #[arg(long)]
    json: bool,
}

/// Serve one backup point of a volume over NBD until interrupted.
///
/// qemu-storage-daemon serves the chain through a throwaway overlay, so the
/// backup files are never written. Read-only unless --writable (writes
/// then go to the overlay and vanish when the export stops): mount it with
/// `qemu-nbd`/`nbd-client`, or boot a VM from it at once.
///
/// With --repo s3://BUCKET/PREFIX, bitback's own NBD server serves the
/// point read-only where it lies: each volume read through its chain of
/// object versions by ranged GETs, every cluster checked against the
/// chain's cluster maps before it is given (a mismatch is an I/O error to
/// the client and a damage record in the bucket, never other bytes).
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("listen").required(true).args(["socket", "port"])))]
pub(crate) struct ExportArgs {
    /// The repository: a directory, or s3://BUCKET/PREFIX.
    #[arg(long, value_name = "DIR|URL")]
    repo: PathBuf,
    /// The S3 endpoint of an s3:// repository (a store other than AWS),
    /// instead of AWS_ENDPOINT_URL.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// The VM.
    #[arg(long, value_name = "NAME")]
    vm: String,
    /// The backup id, or `latest`.
    #[arg(long, value_name = "ID", default_value = "latest")]
    backup: String,
    /// The volume to serve (the export's name too).
    #[arg(long, value_name = "NAME")]
    volume: String,
    /// Listen on this unix socket.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Listen on this TCP port.
    #[arg(long, value_name = "N")]
    port: Option<u16>,
    /// The address to listen on with --port.
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1",
        requires = "port"
    )]
    host: String,
    /// Accept writes (into a throwaway overlay).
    #[arg(long)]
    writable: bool,
    /// The key file of an encrypted backup; QEMU decrypts the chain.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Serve the point even where what is known says not to: a file
    /// `bitback verify` found damaged, or one whose length is not the one
    /// recorded at its backup. Without it such a point is refused, naming
    /// the file. The files' structure is checked either way.
    #[arg(long)]
    no_verify: bool,
}

fn print(report: &Retention, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    for id in &report.consolidated {
        println!("consolidated {id} into a full");
    }
    let deleted = match report.dry_run {
        true => "would delete",
        false => "deleted",
    };
    for id in &report.deleted {
        println!("{deleted} {id}");
    }
    for l in &report.locked {
        println!(
            "kept {}: an object lock holds it until {}",
            l.backup, l.until
        );
    }
    println!(
        "{} backups kept, {} {}",
        report.kept.len(),
        report.deleted.len(),
        match report.dry_run {
            true => "would be deleted (nothing was changed: --dry-run)",
            false => "deleted",
        }
    );
    Ok(())
}

pub(crate) fn prune(args: PruneArgs) -> anyhow::Result<ExitCode> {
    let n = |v: Option<u64>| v.map_or(0, |n| n as usize);
    let calendar = Calendar {
        last: n(args.keep_last),
        hourly: n(args.keep_hourly),
        daily: n(args.keep_daily),
        weekly: n(args.keep_weekly),
        monthly: n(args.keep_monthly),
        yearly: n(args.keep_yearly),
    };
    let keep = match args.keep_chains {
        Some(chains) => Keep::Chains(chains as usize),
        None => Keep::Calendar(calendar),
    };
    let report = match super::output::bucket(&args.repo, args.s3_endpoint.as_deref())? {
        Some(bucket) => engine::prune_bucket(&bucket, &args.vm, keep, args.dry_run),
        None if args.dry_run => engine::prune_plan(&Repo::open(&args.repo)?, &args.vm, keep),
        None => {
            let repo = Repo::open(&args.repo)?;
            let lock = repo.lock_vm(&args.vm, "prune")?;
            engine::prune(&repo, &lock, keep)
        }
    }
    .with_context(|| format!("pruning vm {}", args.vm))?;
    print(&report, args.json)?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn consolidate(args: ConsolidateArgs) -> anyhow::Result<ExitCode> {
    if let Some(Ok(location)) = args.repo.to_str().and_then(bitback::s3::Location::parse) {
        return Err(bitback::engine::BadInput(format!(
            "{} is a bucket: consolidate rewrites a point in place, and a bucket's points are never \
             rewritten (under object lock every version stays anyway, so a merge would only add \
             bytes). Shorten a bucket's chains with new fulls (backup --full-every N) and \
             prune --keep-chains N, which removes a chain once no lock holds it",
            location
        ))
        .into());
    }
    let repo = Repo::open(&args.repo)?;
    let lock = repo.lock_vm(&args.vm, "consolidate")?;
    let report = engine::consolidate(&repo, &lock, args.max_chain)
        .with_context(|| format!("consolidating vm {}", args.vm))?;
    print(&report, args.json)?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    if let Some(bucket) = super::output::bucket(&args.repo, args.s3_endpoint.as_deref())? {
        return export_bucket(args, bucket).await;
    }
    let repo = Repo::open(&args.repo)?;
    let listen = match (&args.socket, args.port) {
        (Some(path), _) => Listen::Socket(path.clone()),
        (None, Some(port)) => Listen::Tcp {
            host: args.host.clone(),
            port,
        },
        (None, None) => unreachable!("clap requires one"),
    };
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let export = engine::export(
        &repo,
        &ExportOptions {
            vm: args.vm.clone(),
            backup: engine::Pick::from(args.backup.as_str()),
            volume: args.volume.clone(),
            listen,
            writable: args.writable,
            key: super::output::key_file(args.key_file.as_deref(), "--key-file")?,
            checks: engine::Checks::serving(!args.no_verify),
        },
    )
    .await
    .with_context(|| format!("exporting vm {}", args.vm))?;
    println!(
        "serving {}/{} volume {} at {} ({}); Ctrl-C stops",
        args.vm,
        export.backup,
        args.volume,
        export.url,
        if args.writable {
            "writes go to a throwaway overlay"
        } else {
            "read-only"
        }
    );
    export
        .serve_until(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        })
        .await?;
    println!("export stopped");
    Ok(ExitCode::SUCCESS)
}

/// `export --repo s3://...`: bitback's own NBD server, in the foreground.
async fn export_bucket(
    args: ExportArgs,
    bucket: bitback::repo::Bucket,
) -> anyhow::Result<ExitCode> {
    use engine::serve::bucket::{Listener, Until, serve};
    use tokio::signal::unix::{SignalKind, signal};
    if args.writable || args.key_file.is_some() || args.no_verify {
        return Err(engine::BadInput(
            "--writable, --key-file and --no-verify go with a directory repository: a bucket's point is served read-only and checked (bring it here first for more: bitback sync --from s3://... --to DIR)".into(),
        )
        .into());
    }
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    // The server lives as long as the process: its chains borrow it.
    let bucket: &'static bitback::repo::Bucket = Box::leak(Box::new(bucket));
    let (vm, backup, volume) = (args.vm.clone(), args.backup.clone(), args.volume.clone());
    let point = tokio::task::spawn_blocking(move || {
        engine::serve_from_bucket(
            bucket,
            &vm,
            &engine::Pick::from(backup.as_str()),
            std::slice::from_ref(&volume),
        )
    })
    .await?
    .with_context(|| format!("exporting vm {}", args.vm))?;
    let (listener, url) = match (&args.socket, args.port) {
        (Some(path), _) => (
            Listener::Unix(
                tokio::net::UnixListener::bind(path)
                    .with_context(|| format!("listening on {}", path.display()))?,
            ),
            format!("nbd+unix:///{}?socket={}", args.volume, path.display()),
        ),
        (None, Some(port)) => (
            Listener::Tcp(
                tokio::net::TcpListener::bind((args.host.as_str(), port))
                    .await
                    .with_context(|| format!("listening on {}:{port}", args.host))?,
            ),
            format!("nbd://{}:{port}/{}", args.host, args.volume),
        ),
        (None, None) => unreachable!("clap requires one"),
    };
    println!(
        "serving {}/{} volume {} at {} (read-only, from {}); Ctrl-C stops",
        args.vm,
        point.manifest.id,
        args.volume,
        url,
        bucket.location()
    );
    let served = serve(listener, &point, Until::Stopped, async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
    .await;
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
    }
    served?;
    println!("export stopped");
    Ok(ExitCode::SUCCESS)
}
