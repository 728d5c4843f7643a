//! `bitback restore` and `bitback verify`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::output::{bytes, table};
use bitback::engine::{self, BadInput, Format, InPlaceOptions, RestoreOptions, Scope};
use bitback::repo::Repo;
use bitback::units::parse_age;

/// Restore a backup point of a VM's volumes to image files.
///
/// Restores are native, raw or qcow2: for each guest range, only the
/// newest file of the chain that holds it is read, in large parallel
/// reads, and zero ranges stay holes, so the time grows with the data, not
/// with the chain's length. Compressed clusters (deflate, zstd) are
/// decompressed natively; encrypted backups (--key-file) go through
/// `qemu-img convert` (and say so). Each volume's chain starts at its last
/// full, which may be newer than the point's chain start (a disk added or
/// resized later). The chain is verified first (digests included unless
/// --no-verify); a chain that fails is refused, naming the file. Existing
/// files are never overwritten.
///
/// --live returns in seconds instead: the VM starts on images backed by
/// the point, and --finish completes them while it runs.
#[derive(Debug, clap::Args)]
pub(crate) struct RestoreArgs {
    /// The repository: a directory, or s3://BUCKET/PREFIX (restored to a
    /// file where it lies, by ranged GETs, each file the version bitback
    /// wrote: a point hidden by delete markers still restores; --live
    /// serves it from the bucket, through bitback's own NBD server;
    /// --in-place needs a directory).
    #[arg(long, value_name = "DIR|URL", required_unless_present = "finish")]
    repo: Option<PathBuf>,
    /// The S3 endpoint of an s3:// repository (a store other than AWS),
    /// instead of AWS_ENDPOINT_URL.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// The VM whose backup to restore.
    #[arg(long, value_name = "NAME", required_unless_present = "finish")]
    vm: Option<String>,
    /// The backup id, or `latest`.
    #[arg(long, value_name = "ID", default_value = "latest")]
    backup: String,
    /// Only this volume (repeat for more).
    #[arg(long = "volume", value_name = "NAME")]
    volumes: Vec<String>,
    /// The output file (one volume) or directory (then each volume goes to
    /// <DIR>/<volume>.raw or .qcow2; with --live, <DIR>/<volume>.qcow2).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["in_place", "finish", "libvirt"])]
    output: Option<PathBuf>,
    /// Return in seconds, whatever the size: each volume becomes an empty
    /// qcow2 image, <DIR>/<volume>.qcow2, whose backing file is the point
    /// served read-only over NBD by a qemu-storage-daemon that runs on
    /// after bitback. Start the VM on the images at once: it reads what it
    /// has not written from the backup, through the chain (slower than a
    /// local disk). Then run `bitback restore --finish --qmp SOCK` (or
    /// --libvirt DOMAIN) to copy the rest in and end the export. If the
    /// export's daemon dies before that (the host restarted, say), the VM
    /// gets read errors on data not yet restored until --resume serves it
    /// again. The VM's read lock is held meanwhile: prune and consolidate
    /// refuse.
    ///
    /// With --libvirt DOMAIN (a defined, shut-off domain; no --output):
    /// the images are made at the domain's qcow2 file disk paths, the
    /// domain is started on them, and the streams run to their end, as
    /// --finish does: one command, the domain running within seconds.
    #[arg(long, conflicts_with_all = ["in_place", "format", "finish"])]
    live: bool,
    /// Replace images that exist, with --live: the files there are deleted.
    #[arg(long, requires = "live")]
    force: bool,
    /// With --live: serve again the point that the images in --output DIR
    /// (or the --libvirt domain's disks) read from, when its export ended
    /// before --finish completed them (the host restarted, the daemon was
    /// killed). No image is touched: what the guest wrote stays. The point
    /// is the one the images name. Then start the VM (a running one
    /// reconnects at its next read) and run --finish; with --libvirt, the
    /// domain is started if it is shut off and the streams run to their
    /// end.
    #[arg(long, requires = "live", conflicts_with_all = ["force", "volumes"])]
    resume: bool,
    /// With --live: the user (and group) the VM's QEMU runs as, by name or
    /// number, when it is not root: the images and the export's socket are
    /// given to it (else only root can use them). --libvirt finds libvirt's
    /// user itself.
    #[arg(long, value_name = "USER[:GROUP]", requires = "live", conflicts_with = "libvirt", value_parser = parse_owner)]
    owner: Option<bitback::qmp::SocketOwner>,
    /// In the running VM (--qmp or --libvirt), stream the backup's data
    /// into every image a live restore made (QEMU's block-stream; libvirt's
    /// blockpull with --libvirt), wait, drop the images' backing, and end
    /// each export no image needs any more. The
    /// guest's writes meanwhile are kept. Safe to run again after a kill:
    /// a stream still running is waited for, a finished one recognised.
    #[arg(long, conflicts_with_all = ["in_place", "format", "live", "output"])]
    finish: bool,
    #[command(flatten)]
    target: super::monitor::Target,
    /// Write into a stopped VM's own image (--image) instead of a new
    /// file: a qcow2 image through `qemu-img convert -n`, a raw file
    /// natively. Refused while a QEMU holds the image. Clears the VM's
    /// active checkpoint, so its next backup is full.
    #[arg(long, requires = "image", conflicts_with_all = ["output", "format"])]
    in_place: bool,
    /// The VM image to restore into, with --in-place.
    #[arg(long, value_name = "PATH", requires = "in_place")]
    image: Option<PathBuf>,
    /// The output format.
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Copy threads for native restores (default 8). Each reads, checks
    /// and writes 4 MiB at a time and mostly waits on the disk, so their
    /// number is how many requests the disks have in flight: a disk that
    /// does best with few streams wants fewer (benches/README.md,
    /// "Restores: how many copy threads").
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: Option<u64>,
    /// Skip checking the chain's digests (names, sizes and backing files
    /// are still checked). With --live: serve the point even where what
    /// is known says not to (a file `bitback verify` found damaged, or
    /// whose length is not the one recorded), which is refused otherwise.
    #[arg(long)]
    no_verify: bool,
    /// The key file of an encrypted backup (the one given to `backup
    /// --encrypt-key-file`). Encrypted backups are decrypted by `qemu-img
    /// convert`, which reads the key file as a secret object.
    #[arg(long, value_name = "FILE", conflicts_with = "in_place")]
    key_file: Option<PathBuf>,
    /// Print a JSON array of {volume, backup, path, virtual_size,
    /// chain_length, bytes_copied, method}.
    #[arg(long)]
    json: bool,
}

/// Check backups: metadata, backing names, parents, sizes, digests.
///
/// Every file is checked even after a failure; each problem is reported by
/// file. Nothing is deleted or changed. Exit code 1 when any problem is
/// found.
#[derive(Debug, clap::Args)]
pub(crate) struct VerifyArgs {
    /// The repository: a directory, or s3://BUCKET/PREFIX (each file's
    /// first written version read by ranged GETs; a damaged file gets a
    /// damage record in the bucket, <vm>/.damaged/).
    #[arg(long, value_name = "DIR|URL")]
    repo: PathBuf,
    /// The S3 endpoint of an s3:// repository (a store other than AWS),
    /// instead of AWS_ENDPOINT_URL.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Only this VM.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Only this backup (needs --vm).
    #[arg(long, value_name = "ID", requires = "vm")]
    backup: Option<String>,
    /// Print {backups, files, problems: [{vm, backup, file, problem}]}.
    #[arg(long)]
    json: bool,
    /// Also compare the cluster maps of files with a whole-file digest
    /// with their files, cluster by cluster: a check of the writer, which
    /// reads their data a second time. A file bitback wrote with a map
    /// (a layout digest) is always checked so, once: the map proves its
    /// data. Every map is checked against the digest its manifest
    /// recorded.
    #[arg(long)]
    map_clusters: bool,
    /// Read only the backups not verified whole within this age (30d,
    /// 12h, 90m, 45s): each backup that verifies clean is recorded with
    /// the time (<vm>/.verified/<id>.json), so a weekly `verify
    /// --outdated-after 30d` reads about a quarter of the repository each
    /// time. A backup with damage recorded is always read.
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    outdated_after: Option<i64>,
    /// Read only this percentage of each file's data clusters (0.01 to
    /// 100), chosen at random each run, against its cluster map: a quick
    /// check that finds scattered rot in proportion. Every file's
    /// metadata, layout digest and map are still checked whole; files
    /// QEMU wrote (a whole-file digest) are read whole. Damage found is
    /// recorded as by a full verify; a sampled verify never counts as
    /// verified whole for --outdated-after.
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    sample: Option<f64>,
}

fn parse_percent(text: &str) -> Result<f64, String> {
    match text.trim_end_matches('%').parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 100.0 => Ok(p),
        _ => Err(format!("{text:?}: give a percentage above 0, at most 100")),
    }
}

/// `--format`: the engine's [`Format`] as a command-line value.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Raw,
    Qcow2,
}

impl FormatArg {
    /// The format asked for; raw when none was.
    fn format(asked: Option<FormatArg>) -> Format {
        match asked {
            Some(FormatArg::Qcow2) => Format::Qcow2,
            Some(FormatArg::Raw) | None => Format::Raw,
        }
    }
}

pub(crate) async fn restore(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    if args.finish {
        return finish(&args).await;
    }
    if args.target.qmp.is_some() || (args.target.libvirt.is_some() && !args.live) {
        return Err(
            BadInput("--qmp goes with --finish, --libvirt with --finish or --live".into()).into(),
        );
    }
    let (Some(repo), Some(vm)) = (&args.repo, &args.vm) else {
        return Err(BadInput("give --repo DIR and --vm NAME".into()).into());
    };
    if let Some(bucket) = super::output::bucket(repo, args.s3_endpoint.as_deref())? {
        if args.live {
            let source = super::output::bucket_source(
                repo,
                args.s3_endpoint.as_deref(),
                vm,
                &args.backup,
                &args.volumes,
            );
            return live(&args, engine::PointIn::Bucket(&source), vm, None).await;
        }
        return from_bucket(&args, &bucket, vm);
    }
    let repo = Repo::open(repo)?;
    let key = super::output::key_file(args.key_file.as_deref(), "--key-file")?;
    if args.live {
        return live(&args, engine::PointIn::Repo(&repo), vm, key).await;
    }
    let progress = super::output::progress_bar(!args.json);
    let restored = match (&args.image, &args.output) {
        (Some(image), _) if args.in_place => {
            if args.volumes.len() > 1 {
                return Err(BadInput("--in-place restores one volume".into()).into());
            }
            let lock = repo.lock_vm(vm, "restore")?;
            engine::restore_in_place(
                &repo,
                &lock,
                &InPlaceOptions {
                    vm: vm.to_string(),
                    backup: engine::Pick::from(args.backup.as_str()),
                    volume: args.volumes.first().cloned(),
                    image: image.clone(),
                    threads: copy_threads(args.threads),
                    verify: !args.no_verify,
                    progress: progress.clone(),
                },
            )
            .map(|r| vec![r])
        }
        (_, Some(output)) => engine::restore(
            &repo,
            &RestoreOptions {
                progress,
                key,
                ..file_restore(&args, vm, output, copy_threads(args.threads))
            },
        ),
        _ => return Err(BadInput("give --output, or --in-place with --image".into()).into()),
    }
    .map_err(|e| e.context(engine::Operation::Restore { vm: vm.to_string() }))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&restored)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![
        ["VOLUME", "BACKUP", "CHAIN", "COPIED", "METHOD", "OUTPUT"]
            .map(String::from)
            .to_vec(),
    ];
    for r in &restored {
        rows.push(vec![
            r.volume.clone(),
            r.backup.clone(),
            r.chain_length.to_string(),
            r.bytes_copied.map_or_else(|| "-".to_string(), bytes),
            r.method.clone(),
            r.path.display().to_string(),
        ]);
    }
    print!("{}", table(&rows));
    Ok(ExitCode::SUCCESS)
}

/// `restore --repo s3://...`: into --output, from the bucket.
fn from_bucket(
    args: &RestoreArgs,
    bucket: &bitback::repo::Bucket,
    vm: &str,
) -> anyhow::Result<ExitCode> {
    let Some(output) = args
        .output
        .as_ref()
        .filter(|_| !args.live && !args.in_place)
    else {
        return Err(BadInput(
            "from a bucket, restore writes files (--output) or serves the point (--live --output DIR); --in-place reads a directory repository: bring the point here first with bitback sync --from s3://... --to DIR".into(),
        )
        .into());
    };
    if args.key_file.is_some() {
        return Err(BadInput(
            "an encrypted backup is decrypted by qemu-img from files: bring it here first with bitback sync --from s3://... --to DIR".into(),
        )
        .into());
    }
    let restored = engine::restore_from_bucket(
        bucket,
        &RestoreOptions {
            progress: super::output::progress_bar(!args.json),
            // Requests in flight, not disks: a store answers more at once.
            ..file_restore(
                args,
                vm,
                output,
                args.threads.map_or(BUCKET_THREADS, |n| n as usize),
            )
        },
    )
    .map_err(|e| e.context(engine::Operation::Restore { vm: vm.to_string() }))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&restored)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![
        [
            "VOLUME",
            "BACKUP",
            "CHAIN",
            "COPIED",
            "OUTPUT",
            "VERSIONS READ",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for b in &restored {
        let r = &b.restored;
        rows.push(vec![
            r.volume.clone(),
            r.backup.clone(),
            r.chain_length.to_string(),
            r.bytes_copied.map_or_else(|| "-".to_string(), bytes),
            r.path.display().to_string(),
            b.versions
                .iter()
                .map(|v| format!("{}@{}", v.file, v.version))
                .collect::<Vec<_>>()
                .join(" "),
        ]);
    }
    print!("{}", table(&rows));
    Ok(ExitCode::SUCCESS)
}

/// A restore of `vm` into files at `output` as `args` ask, on `threads`
/// copy threads, without progress or key.
fn file_restore(args: &RestoreArgs, vm: &str, output: &Path, threads: usize) -> RestoreOptions {
    RestoreOptions {
        vm: vm.to_string(),
        backup: engine::Pick::from(args.backup.as_str()),
        volumes: args.volumes.clone(),
        output: output.to_path_buf(),
        format: FormatArg::format(args.format),
        threads,
        verify: !args.no_verify,
        progress: None,
        key: None,
    }
}

/// Copy threads of a restore from a bucket, unless told: ranged GETs in
/// flight at once.
const BUCKET_THREADS: usize = 8;

/// `--owner USER[:GROUP]`: names looked up in /etc/passwd and /etc/group,
/// numbers taken as they are; the group defaults to the user's.
fn parse_owner(text: &str) -> Result<bitback::qmp::SocketOwner, String> {
    let (user, group) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (text, None),
    };
    // name:password:id:gid... lines.
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        std::fs::read_to_string(file)
            .ok()?
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                (fields.first() == Some(&name) && fields.len() > 3)
                    .then(|| Some((fields[2].parse().ok()?, fields[3].parse().unwrap_or(0))))?
            })
    };
    let (uid, user_gid) = match user.parse::<u32>() {
        Ok(uid) => (uid, None),
        Err(_) => {
            let (uid, gid) = lookup("/etc/passwd", user)
                .ok_or_else(|| format!("no user {user:?} in /etc/passwd"))?;
            (uid, Some(gid))
        }
    };
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                lookup("/etc/group", g)
                    .ok_or_else(|| format!("no group {g:?} in /etc/group"))?
                    .0
            }
        },
        None => user_gid
            .ok_or_else(|| format!("give the group of user id {uid} too: --owner {uid}:GID"))?,
    };
    Ok(bitback::qmp::SocketOwner { uid, gid })
}

/// `restore --live`: the images and the export, reported.
async fn live(
    args: &RestoreArgs,
    from: engine::PointIn<'_>,
    vm: &str,
    key: Option<engine::key::Key>,
) -> anyhow::Result<ExitCode> {
    let opts = engine::LiveOptions {
        vm: vm.to_string(),
        backup: engine::Pick::from(args.backup.as_str()),
        volumes: args.volumes.clone(),
        output: args.output.clone().unwrap_or_default(),
        images: Vec::new(),
        force: args.force,
        key,
        owner: args.owner,
        resume: args.resume,
        checks: engine::Checks::serving(!args.no_verify),
    };
    if let Some(domain) = args.target.domain() {
        return live_domain(args, from, &opts, &domain).await;
    }
    if args.output.is_none() {
        return Err(BadInput("--live needs --output DIR (or --libvirt DOMAIN)".into()).into());
    }
    let served = match from {
        engine::PointIn::Repo(repo) => engine::restore_live(repo, &opts).await,
        engine::PointIn::Bucket(source) => engine::restore_live_bucket(source, &opts).await,
    }
    .map_err(|e| e.context(engine::Operation::Restore { vm: vm.to_string() }))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&served)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![
        ["VOLUME", "SIZE", "IMAGE", "READS FROM"]
            .map(String::from)
            .to_vec(),
    ];
    for f in &served.files {
        rows.push(vec![
            f.volume.clone(),
            bytes(f.virtual_size),
            f.path.display().to_string(),
            f.export.clone().unwrap_or_default(),
        ]);
    }
    print!("{}", table(&rows));
    println!(
        "backup {} of vm {} is served by qemu-storage-daemon pid {} ({}); start the VM on these images, then run: bitback restore --finish --qmp SOCK",
        served.backup,
        served.vm,
        served.pid,
        served.runtime.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `restore --live --libvirt`: the domain started on the point, streamed.
async fn live_domain(
    args: &RestoreArgs,
    from: engine::PointIn<'_>,
    opts: &engine::LiveOptions,
    domain: &bitback::libvirt::Domain,
) -> anyhow::Result<ExitCode> {
    let bar = super::output::progress_bar(!args.json);
    let json = args.json;
    let (served, report) = engine::restore_live_domain(from, opts, domain, bar.as_ref(), |s| {
        if !json {
            eprintln!(
                "domain {} runs on backup {} (export: qemu-storage-daemon pid {}); streaming the rest in",
                domain.name, s.backup, s.pid
            );
        }
    })
    .await
    .map_err(|e| {
        e.context(engine::Operation::Restore {
            vm: opts.vm.clone(),
        })
    })?;
    if json {
        #[derive(serde::Serialize)]
        struct Live<S, F> {
            live: S,
            finish: F,
        }
        let value = Live {
            live: served,
            finish: report,
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_finished(&report);
    println!("domain {} runs on its restored images", domain.name);
    Ok(ExitCode::SUCCESS)
}

/// What `--finish` did, for people.
fn print_finished(report: &engine::FinishReport) {
    if report.volumes.is_empty() {
        println!("no image of this VM reads from a live restore's export");
    }
    for v in &report.volumes {
        println!("{}: {} ({}; it stands alone now)", v.node, v.image, v.how);
    }
    for r in &report.ended {
        println!("ended the export in {}", r.display());
    }
    for r in &report.kept {
        println!(
            "the export in {} serves on: another image still reads from it",
            r.display()
        );
    }
}

/// `restore --finish`: streams the live images in the running VM.
async fn finish(args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    if args.target.qmp.is_none() && args.target.libvirt.is_none() {
        return Err(BadInput(
            "--finish needs the running VM: --qmp SOCK or --libvirt DOMAIN".into(),
        )
        .into());
    }
    let bar = super::output::progress_bar(!args.json);
    let report = match (&args.target.qmp, args.target.domain()) {
        // A domain through its extra socket, or any VM: QEMU's streams.
        (Some(_), _) | (None, None) => {
            let monitor = args
                .target
                .connect(None, std::time::Duration::from_secs(30))
                .await?;
            engine::finish(&monitor.qmp, bar.as_ref()).await?
        }
        // Through libvirt: libvirt's own, so its view of the chains follows.
        (None, Some(domain)) => engine::finish_domain(&domain, bar.as_ref()).await?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_finished(&report);
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let report = match super::output::bucket(&args.repo, args.s3_endpoint.as_deref())? {
        Some(_) if args.outdated_after.is_some() => {
            return Err(BadInput(
                "--outdated-after reads records a directory repository keeps; a bucket's verify reads every point".into(),
            )
            .into());
        }
        Some(_) if args.sample.is_some() => {
            return Err(BadInput(
                "--sample works on a directory repository; a bucket's verify reads every point"
                    .into(),
            )
            .into());
        }
        Some(bucket) => engine::verify_bucket(
            &bucket,
            args.vm.as_deref(),
            args.backup.as_deref(),
            args.map_clusters,
        )?,
        None => engine::verify(
            &Repo::open(&args.repo)?,
            &Scope {
                vm: args.vm.clone(),
                backup: args.backup.clone(),
                map_clusters: args.map_clusters,
                outdated_after: args.outdated_after,
                sample: args.sample.map(engine::Sample::percent),
            },
        )?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for p in &report.problems {
            let place = match &p.file {
                Some(file) => file.clone(),
                None => format!("{}/{}", p.vm, p.backup),
            };
            println!("BAD {place}: {}", p.problem);
        }
        println!(
            "checked {} files in {} backups: {} problems",
            report.files,
            report.backups,
            report.problems.len()
        );
        if report.skipped > 0 {
            println!(
                "{} backups verified whole lately were not read (--outdated-after)",
                report.skipped
            );
        }
    }
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `--threads`, or [`COPY_THREADS`].
fn copy_threads(asked: Option<u64>) -> usize {
    asked.map_or(COPY_THREADS, |n| n as usize)
}

/// Copy threads of a native restore by default. Each mostly waits on its
/// read or its write, so their number is how many requests the disks
/// have in flight, not a share of the CPU: on this 2-core machine's
/// shared virtual disk, restores of the same 2 GiB chain from a cold
/// cache took 5.3-5.6 s with 2, 4.5-5.0 s with 4, 4.5-4.7 s with 8 and
/// 4.9-5.4 s with 16 (benches/README.md, "Restores").
const COPY_THREADS: usize = 8;

#[cfg(test)]
mod tests {
    use bitback::units::parse_age;

    #[test]
    fn ages_are_days_hours_minutes_or_seconds() {
        assert_eq!(parse_age("30d"), Ok(30 * 86_400));
        assert_eq!(parse_age("12h"), Ok(12 * 3_600));
        assert_eq!(parse_age("90m"), Ok(5_400));
        assert_eq!(parse_age("45s"), Ok(45));
        assert_eq!(parse_age("600"), Ok(600));
        for bad in ["", "d", "0d", "-3d", "3w", "1.5d", "99999999999999999d"] {
            assert!(parse_age(bad).is_err(), "{bad:?}");
        }
    }
}
