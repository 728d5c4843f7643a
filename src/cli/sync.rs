//! `bitback sync`: parse and print only (engine::sync_to_bucket does the
//! work).

use std::path::PathBuf;
use std::process::ExitCode;

use bitback::engine::{self, SyncAction, SyncOptions};
use bitback::repo::{Bucket, Repo};
use bitback::s3::{Config, Location, LockMode};

use super::output::bytes;

/// Copy a directory repository's points into an S3 bucket (an off-site
/// copy: same layout, objects for files), or a bucket's back into a
/// directory.
///
/// Every point not yet in the bucket is verified, then copied: its data
/// files first (above 64 MiB in 16 MiB parts, four at once, each checked
/// by the store),
/// its manifest last, so an interrupted sync leaves no half point; the
/// next sync copies what is missing. Points already there are skipped.
///
/// The bucket is reached the AWS way: AWS_ENDPOINT_URL (or --s3-endpoint)
/// for a store other than AWS, AWS_REGION, and AWS_ACCESS_KEY_ID with
/// AWS_SECRET_ACCESS_KEY, or AWS_PROFILE in ~/.aws/credentials and
/// ~/.aws/config. Credentials are never taken as arguments.
///
/// Back from a bucket (--from s3://..., --to DIR): every point not yet in
/// the directory is downloaded, committed as a backup is, and verified
/// where it landed; then `bitback restore --repo DIR` restores it. (An
/// `aws s3 sync` of the prefix gives the same directory.)
#[derive(Debug, clap::Args)]
pub(crate) struct SyncArgs {
    /// Where the points are: a directory repository, or s3://BUCKET/PREFIX.
    #[arg(long, value_name = "DIR|URL")]
    from: String,
    /// Where they go: s3://BUCKET/PREFIX, or a directory repository (made
    /// if needed).
    #[arg(long, value_name = "URL|DIR")]
    to: String,
    /// Only this VM.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// The S3 endpoint (a store other than AWS: SeaweedFS, MinIO, Ceph
    /// RGW), instead of AWS_ENDPOINT_URL.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    #[command(flatten)]
    retain: RetainArgs,
    /// Print [{vm, backup, action, objects, bytes}].
    #[arg(long)]
    json: bool,
}

pub(crate) fn sync(args: SyncArgs) -> anyhow::Result<ExitCode> {
    let bad = |text: String| anyhow::Error::from(engine::BadInput(text));
    let to_bucket = Location::parse(&args.to);
    let from_bucket = Location::parse(&args.from);
    let opts = SyncOptions {
        vm: args.vm.clone(),
        retain: args.retain.asked(),
        streamed: None,
    };
    let config = || Config::from_env(args.s3_endpoint.as_deref()).map_err(|e| bad(e.to_string()));
    let done = match (from_bucket, to_bucket) {
        (None, Some(location)) => {
            let location = location.map_err(|e| bad(e.to_string()))?;
            let source = Repo::open(&PathBuf::from(&args.from))?;
            let target = Bucket::new(&config()?, location)?;
            engine::sync_to_bucket(&source, &target, &opts)
        }
        (Some(location), None) => {
            if opts.retain.is_some() {
                return Err(bad(
                    "--retain-days locks the objects of a bucket: it applies when --to is one".into(),
                ));
            }
            let location = location.map_err(|e| bad(e.to_string()))?;
            let source = Bucket::new(&config()?, location)?;
            let target = Repo::create(&PathBuf::from(&args.to))?;
            engine::sync_from_bucket(&source, &target, &opts)
        }
        _ => {
            return Err(bad(format!(
                "--from {} --to {}: one of them is an s3://BUCKET/PREFIX URL, the other a directory",
                args.from, args.to
            )));
        }
    }
    .map_err(|e| {
        e.context(engine::Operation::Sync {
            from: args.from.clone(),
            to: args.to.clone(),
        })
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&done)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_synced(&done);
    Ok(ExitCode::SUCCESS)
}

/// One line per point a sync copied or found there.
pub(crate) fn print_synced(done: &[engine::Synced]) {
    for s in done {
        match s.action {
            SyncAction::Copied => println!(
                "{}/{}: copied, {} objects, {}",
                s.vm,
                s.backup,
                s.objects,
                bytes(s.bytes)
            ),
            SyncAction::AlreadyThere => println!("{}/{}: already there", s.vm, s.backup),
        }
    }
}

/// `--retain-days N [--lock-mode MODE]`, of `sync` and `backup`.
#[derive(Debug, clap::Args)]
pub(crate) struct RetainArgs {
    /// Lock every object of each point uploaded for N days (S3 object
    /// lock: no one, bitback's own credentials included, can delete or
    /// overwrite them before), and extend the lock of the points it
    /// builds on to the same date. The bucket must have object lock:
    /// checked before anything is written.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=36_500))]
    retain_days: Option<u32>,
    /// The lock's mode: compliance (no one can shorten it) or governance
    /// (a holder of s3:BypassGovernanceRetention can).
    #[arg(
        long,
        value_name = "MODE",
        default_value = "compliance",
        requires = "retain_days"
    )]
    lock_mode: LockModeArg,
}

impl RetainArgs {
    /// The days and mode asked for, if any.
    pub(crate) fn asked(&self) -> Option<(u32, LockMode)> {
        self.retain_days.map(|days| (days, self.lock_mode.mode()))
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LockModeArg {
    Compliance,
    Governance,
}

impl LockModeArg {
    fn mode(self) -> LockMode {
        match self {
            LockModeArg::Compliance => LockMode::Compliance,
            LockModeArg::Governance => LockMode::Governance,
        }
    }
}
