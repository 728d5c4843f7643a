//! `bitback backup` and `bitback list`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use super::output::{bytes, table};
use super::qcow2::parse_size;
use bitback::engine::plan::Policy;
use bitback::engine::thaw_guard::Thawer;
use bitback::engine::{self, BackupOptions, BadInput, CopyOptions, Perf, StoppedImage};
use bitback::repo::{BackupKind, Changes, Manifest, Repo, VolumeRecord};

/// Back up a VM: every writable volume at one point in time.
///
/// With --qmp, the VM is running: bitback adds a checkpoint bitmap and
/// starts a backup job per volume in one QMP transaction. Each volume is
/// full or incremental on its own (only the clusters written since the
/// last backup), and the reason is printed per volume: a new, resized or
/// replaced disk costs a full of that disk only. qcow2 v3 images keep the
/// bitmap in the image; raw files, raw block devices and qcow2 v2 images
/// keep it in QEMU's memory, so they take a full after QEMU restarts.
/// Without --qmp, the VM is stopped: bitback starts qemu-storage-daemon on
/// the images given with --image (or those recorded at the last backup);
/// qcow2 v3 images still hold the checkpoint bitmap.
///
/// Exit codes: 0 done, 1 the backup failed (nothing of it is kept, the
/// previous checkpoint is intact), 2 bad usage or bad input.
#[derive(Debug, clap::Args)]
pub(crate) struct BackupArgs {
    #[command(flatten)]
    target: super::monitor::Target,

    /// The repository: a directory (created if missing), or
    /// s3://BUCKET/PREFIX with --spool.
    #[arg(long, value_name = "DIR|URL")]
    repo: PathBuf,

    /// With an s3:// repository: the directory repository on this host
    /// the backup is written into (created if missing). On the NBD data
    /// path each file also goes up to the bucket as it is written (a
    /// multipart upload fed by the writer, its header part last). Then
    /// every point of the VM not yet in the bucket is verified and the
    /// rest of it uploaded, its manifest last, as `bitback sync` does; the
    /// spool keeps the VM's newest chain (incrementals build on it) and
    /// lets older chains go once they are in the bucket. A failed upload
    /// keeps the point in the spool: the next backup (or sync) uploads it.
    /// The backup holds the VM's lock in the bucket throughout: another
    /// backup or sync of the VM into it is refused meanwhile.
    #[arg(long, value_name = "DIR")]
    spool: Option<PathBuf>,

    /// The S3 endpoint of an s3:// repository (a store other than AWS),
    /// instead of AWS_ENDPOINT_URL.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,

    #[command(flatten)]
    retain: super::sync::RetainArgs,

    /// The VM's name in the repository: letters, digits and -_.+@:.
    #[arg(long, value_name = "NAME")]
    vm: String,

    /// A stopped VM's image, as VOLUME=PATH; repeat for each volume.
    ///
    /// Without --qmp and without --image, the volumes recorded at the VM's
    /// last backup are used. Refused while a QEMU holds an image.
    #[arg(long, value_name = "VOLUME=PATH", conflicts_with_all = ["qmp", "libvirt"])]
    image: Vec<String>,

    /// Take a full backup whatever the rules say.
    #[arg(long)]
    full: bool,

    /// Start a new chain every N backups: a full plus N-1 incrementals.
    ///
    /// 1 turns incrementals off. Without it chains grow without limit.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    full_every: Option<u32>,

    /// Back up only this volume (repeat for more). Names are those
    /// `bitback inspect` shows.
    #[arg(long = "volume", value_name = "NAME")]
    volumes: Vec<String>,

    /// Leave this volume out (repeat for more).
    #[arg(long, value_name = "NAME")]
    exclude: Vec<String>,

    /// Freeze the guest's filesystems (guest agent) around the moment the
    /// backup starts; they are thawed on every path out.
    ///
    /// Needs --qga, or --libvirt (then libvirt freezes and thaws through
    /// the agent channel it holds: `virsh domfsfreeze`; a freeze that fails
    /// is logged and the backup goes on unfrozen). From the freeze to the
    /// thaw a second bitback process waits beside this one and thaws the
    /// guest if this one is killed.
    #[arg(long)]
    quiesce: bool,

    /// The guest agent's socket (`-chardev socket,path=...,id=qga0 -device
    /// virtserialport,chardev=qga0,name=org.qemu.guest_agent.0`).
    #[arg(long, value_name = "SOCK")]
    qga: Option<PathBuf>,

    /// Limit each volume's copy to this many bytes per second (K, M, G
    /// suffixes: 50M, 1G).
    ///
    /// The limit holds back the backup job's own reads and writes. Without
    /// --fleecing it cannot hold back the copies of old data that guest
    /// writes cause: those go to the repository at once.
    #[arg(long, visible_alias = "rate-limit", value_name = "RATE", value_parser = parse_size)]
    speed_limit: Option<u64>,

    /// All volumes' copies together at the bytes per second this file
    /// holds, read again every half second (`bitback run` shares its
    /// `rate_limit` among its runs so).
    #[arg(long, value_name = "FILE", hide = true, conflicts_with = "speed_limit")]
    rate_file: Option<PathBuf>,

    /// Fleecing: old data that guest writes displace during the backup goes
    /// to a scratch image in DIR instead of straight to the repository.
    ///
    /// While a backup runs, a guest write to a cluster not yet copied waits
    /// until the old data is stored. Without fleecing it is stored in the
    /// repository, so a slow NAS slows the guest; with it, in DIR, and the
    /// copy to the repository reads it from there at its own pace. Choose a
    /// local, fast filesystem (the host's SSD, a tmpfs with room), not the
    /// repository. DIR needs room for at most what the guest overwrites
    /// during the run (never more than the volumes' size); if it fills up,
    /// the backup fails and the guest's writes go on. The scratch images
    /// (`bitback-*-f<N>.qcow2`) are removed after every run; one a killed run
    /// left is removed by the next run with the same DIR. Encrypted volumes
    /// are never fleeced (their old data would lie in DIR in the clear).
    #[arg(long, value_name = "DIR")]
    fleecing: Option<PathBuf>,

    /// Where the backup job's bytes go: `nbd` (QEMU's NBD client sends
    /// them to bitback's own NBD server, and bitback writes the file: zstd
    /// compression, a per-cluster digest map beside each file computed in
    /// flight (each byte hashed once; the file's digest covers the rest),
    /// writes around the page cache), `file` (QEMU
    /// writes each qcow2 file, bitback reads it back for its digest), or
    /// `auto` (the default: `nbd` wherever it can, which measures faster;
    /// see benches/README.md).
    ///
    /// `nbd` writes unencrypted backups with clusters up to 64K; an
    /// encrypted backup, larger clusters, or libvirt's QMP proxy (which
    /// cannot pass QEMU a socket: give the domain an extra QMP socket)
    /// take `file`, and the run says so.
    #[arg(long, value_name = "PATH", default_value = "auto", value_parser = ["auto", "file", "nbd"], env = "BITBACK_DATA_PATH")]
    data_path: String,

    /// Cluster size of the backup files (512 to 2M, a power of two).
    ///
    /// QEMU copies in units of max(64K, this), so a larger size makes
    /// incrementals of small scattered writes larger.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64K")]
    cluster_size: u64,

    /// Granularity of the new checkpoint bitmap (512 to 2G, a power of
    /// two): the next incremental copies every granule the guest touched.
    ///
    /// QEMU copies units of at least 64K, so finer granules copy no less;
    /// QEMU's own default (the image's cluster size, from 4K to 64K) gives
    /// 4K-cluster images a bitmap 16 times larger for nothing.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64K")]
    granularity: u64,

    /// QEMU copy tuning (x-perf, QEMU 6.0+): parallel requests per job.
    /// Default: QEMU's (64).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=i32::MAX as u64), help_heading = "Copy tuning")]
    max_workers: Option<u64>,

    /// QEMU copy tuning (x-perf): largest copy request (at least the copy
    /// unit, max(64K, --cluster-size)). Default: QEMU's (1M, 16M with
    /// --copy-range).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, help_heading = "Copy tuning")]
    max_chunk: Option<u64>,

    /// QEMU copy tuning (x-perf): copy with copy_file_range where the
    /// filesystem allows. Default: off (QEMU's default).
    #[arg(long, help_heading = "Copy tuning")]
    copy_range: bool,

    /// Give up when the copy makes no progress for this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    stall_timeout: u64,

    /// How long the guest agent may take to freeze the guest (--quiesce).
    ///
    /// A freeze that fails or times out is followed by a thaw (after a
    /// fresh guest-sync, so a late freeze completes first); the backup then
    /// fails. A thaw that fails makes the backup exit 1 and say that the
    /// guest may still be frozen.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    freeze_timeout: u64,

    /// How long to wait for QEMU to answer one QMP command.
    ///
    /// A backup transaction left unanswered is treated as possibly
    /// applied: its jobs, target nodes and checkpoint bitmap are looked up
    /// by name and removed.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    qmp_timeout: u64,

    /// The VM under this --vm name was replaced by another machine.
    ///
    /// bitback records who each VM is (QEMU's UUID and name, and its
    /// images) and refuses to back up a different machine under a name
    /// that has backups. With this flag the new machine's identity is
    /// recorded, its backup is full, and the old backups stay as they are.
    #[arg(long)]
    vm_replaced: bool,

    /// Encrypt every backup file (LUKS in qcow2) with the key in FILE.
    ///
    /// The file's bytes, exactly, are the passphrase (a trailing newline
    /// counts). The key reaches QEMU as a secret object over QMP, never on
    /// a command line. Restore and export need the same file; verify does
    /// not. All backups of a chain share one key: a backup with a
    /// different key (or none) starts a new chain.
    #[arg(long, value_name = "FILE")]
    encrypt_key_file: Option<PathBuf>,

    /// LUKS key derivation time of new encrypted files, in milliseconds
    /// (QEMU's default: 2000).
    ///
    /// Every open of an encrypted file costs about this long: each backup
    /// opens its new files once, a restore opens every file of the chain.
    /// Lower values make guessing a weak passphrase cheaper.
    #[arg(long, value_name = "MS", requires = "encrypt_key_file", value_parser = clap::value_parser!(u64).range(1..=600_000))]
    encrypt_iter_time: Option<u64>,

    /// Write compressed clusters: zstd, written by bitback (the NBD data
    /// path), readable by qemu-img and QEMU 5.1 and later. Smaller files,
    /// more CPU in bitback during the copy. Not with --encrypt-key-file.
    ///
    /// Where bitback cannot take the bytes (--data-path file, libvirt's
    /// QMP proxy without an extra socket, clusters over 64K) QEMU writes
    /// deflate clusters instead; QEMU cannot write a compressed cluster
    /// twice, so there the old data of guest writes during the copy goes
    /// to a fleecing image: in --fleecing DIR, or else in the temporary
    /// directory ($TMPDIR or /tmp). Restores decompress natively.
    #[arg(long, conflicts_with = "encrypt_key_file")]
    compress: bool,

    /// zstd's compression level, 1 (fastest) to 19 (smallest); 3 by
    /// default. Implies --compress.
    #[arg(long, value_name = "N", conflicts_with = "encrypt_key_file", value_parser = clap::value_parser!(i32).range(1..=19))]
    compress_level: Option<i32>,

    /// Back up encrypted volumes into unencrypted files.
    ///
    /// Without it, a VM with an encrypted volume is refused (exit 2) unless
    /// --encrypt-key-file is given: the backup would hold the guest's data
    /// in plaintext.
    #[arg(long, conflicts_with = "encrypt_key_file")]
    allow_plaintext: bool,

    /// The key of the stopped VM's encrypted images (LUKS in qcow2 or raw
    /// LUKS), as a file whose bytes are the passphrase. Running VMs need
    /// none: their QEMU holds the key.
    #[arg(long, value_name = "FILE", conflicts_with = "qmp")]
    image_key_file: Option<PathBuf>,

    /// Say what the backup would be, volume by volume (full or
    /// incremental, and why), and change nothing: no bitmap, no file, no
    /// lock. A running VM only. What an interrupted run left is cleaned by
    /// the real run first, which can change a volume's plan.
    #[arg(long)]
    dry_run: bool,

    /// Print the backup's manifest as one JSON object: {id, vm, kind,
    /// reason, chain, position, parent, checkpoint, time, encryption,
    /// volumes: [{name, node, kind, reason, disk, tracking, file,
    /// virtual_size, bytes_written, ...}], ...}.
    #[arg(long)]
    json: bool,
}

/// List the backups in a repository, oldest first.
#[derive(Debug, clap::Args)]
pub(crate) struct ListArgs {
    /// The repository: a directory, or s3://BUCKET/PREFIX (listed from
    /// the object versions bitback wrote: points hidden by delete
    /// markers are listed too, marked hidden).
    #[arg(long, value_name = "DIR|URL")]
    repo: PathBuf,
    /// The S3 endpoint of an s3:// repository (a store other than AWS),
    /// instead of AWS_ENDPOINT_URL.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Only this VM's backups.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Print a JSON array of manifests (the objects `backup --json`
    /// prints; from a bucket each with `hidden` and `manifest_version`).
    #[arg(long)]
    json: bool,
}

fn parse_images(specs: &[String]) -> anyhow::Result<Vec<StoppedImage>> {
    let images: Vec<StoppedImage> = specs
        .iter()
        .map(|spec| match spec.split_once('=') {
            Some((volume, path)) if !volume.is_empty() && !path.is_empty() => Ok(StoppedImage {
                volume: volume.to_string(),
                path: path.into(),
            }),
            _ => Err(BadInput(format!("--image {spec:?}: expected VOLUME=PATH"))),
        })
        .collect::<Result<_, _>>()?;
    // A usage error, found before anything starts.
    for (i, image) in images.iter().enumerate() {
        if images[..i].iter().any(|o| o.volume == image.volume) {
            return Err(BadInput(format!(
                "--image names volume {} twice; give each volume once",
                image.volume
            ))
            .into());
        }
    }
    Ok(images)
}

/// A receiver that turns true on SIGINT or SIGTERM. A second signal ends
/// the process at once (exit 1): what the run added in QEMU and the
/// repository is removed by the next backup of the VM.
pub(crate) fn cancel_on_signals() -> anyhow::Result<engine::Cancel> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = watch::channel(false);
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("bitback: interrupted; cancelling the backup (signal again to stop at once)");
        let _ = tx.send(true);
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!(
            "bitback: interrupted again; stopping now. The next backup of this vm removes \
             what this run left (a .partial directory, its jobs, nodes and bitmap)"
        );
        std::process::exit(1);
    });
    Ok(rx)
}

pub(crate) async fn backup(args: BackupArgs) -> anyhow::Result<ExitCode> {
    bitback::repo::check_name("VM", &args.vm)?;
    let mut opts = BackupOptions {
        policy: Policy {
            force_full: args.full,
            full_every: args.full_every,
            replaced: args.vm_replaced,
        },
        include: args.volumes.clone(),
        exclude: args.exclude.clone(),
        allow_plaintext: args.allow_plaintext,
        copy: CopyOptions {
            vm: args.vm.clone(),
            quiesce: match (&args.qga, args.target.domain()) {
                _ if !args.quiesce => None,
                (Some(socket), _) => Some(Thawer::Agent(socket.clone())),
                (None, domain) => domain.map(Thawer::Libvirt),
            },
            thaw_guard: Some(thaw_guard_command()),
            // Who resumes the VM should this process die while it is
            // paused for the point: libvirt, or the QMP socket once it is
            // free.
            resume: match (args.target.domain(), &args.target.qmp) {
                (Some(domain), _) => Some(Thawer::ResumeLibvirt(domain)),
                (None, Some(qmp)) if !qmp.starts_with("tcp:") => {
                    Some(Thawer::ResumeQmp(PathBuf::from(qmp)))
                }
                (None, _) => None,
            },
            rate: match (&args.rate_file, args.speed_limit) {
                (Some(file), _) => engine::Rate::Shared(file.clone()),
                (None, Some(n)) => engine::Rate::PerJob(n),
                (None, None) => engine::Rate::Unlimited,
            },
            compress: args.compress || args.compress_level.is_some(),
            compress_level: args.compress_level.unwrap_or(3),
            cluster_size: args.cluster_size,
            granularity: Some(args.granularity),
            perf: Perf {
                max_workers: args.max_workers,
                max_chunk: args.max_chunk,
                use_copy_range: args.copy_range.then_some(true),
            },
            stall_timeout: Duration::from_secs(args.stall_timeout),
            freeze_timeout: Duration::from_secs(args.freeze_timeout),
            progress: super::output::progress_bar(!args.json),
            encrypt: super::output::key_file(
                args.encrypt_key_file.as_deref(),
                "--encrypt-key-file",
            )?,
            encrypt_iter_time: args.encrypt_iter_time,
            fleecing: args.fleecing.clone(),
            data_path: match args.data_path.as_str() {
                "nbd" => engine::DataPath::Nbd,
                "file" => engine::DataPath::File,
                _ => engine::DataPath::Auto,
            },
            cluster_maps: true,
            stream_to: None,
        },
    };
    if let Some(dir) = &args.fleecing {
        if !dir.is_dir() {
            return Err(BadInput(format!(
                "--fleecing {}: not a directory (give a directory on local, fast storage)",
                dir.display()
            ))
            .into());
        }
    }
    let image_key = super::output::key_file(args.image_key_file.as_deref(), "--image-key-file")?;
    if args.quiesce && args.qga.is_none() && args.target.libvirt.is_none() {
        return Err(BadInput("--quiesce needs --qga SOCK, or --libvirt DOMAIN".into()).into());
    }
    bitback::qcow2::check_cluster_size(args.cluster_size)
        .map_err(|e| BadInput(format!("--cluster-size: {e}")))?;
    bitback::qemu::check_granularity(args.granularity)
        .map_err(|e| BadInput(format!("--granularity {}: {e}", args.granularity)))?;
    let images = parse_images(&args.image)?;
    let retain = args.retain.asked();
    // The bucket is reached before the VM is touched.
    let (repo, bucket) = match args.dry_run {
        true => (args.repo.clone(), None),
        false => where_to(&args, retain.is_some())?,
    };
    let bucket = bucket.map(std::sync::Arc::new);
    // One backup or sync of the VM into the bucket at a time; the files
    // go up as they are written where the lock is held.
    let bucket_lock = match &bucket {
        Some(bucket) => engine::lock_for_backup(bucket, &args.vm)?,
        None => None,
    };
    if let (Some(bucket), Some(_)) = (&bucket, &bucket_lock) {
        opts.copy.stream_to = Some(std::sync::Arc::new(engine::StreamTo::new(
            bucket.clone(),
            engine::retention_for(retain),
        )));
    }
    let opts = opts;
    let run = |repo, images, cancel| engine::BackupRun {
        repo,
        target: args.target.target(),
        images,
        image_key: image_key.as_ref(),
        qmp_timeout: Duration::from_secs(args.qmp_timeout),
        opts: &opts,
        cancel,
    };
    if args.dry_run {
        // The spool of a bucket holds the chain the backup builds on.
        let local = args.spool.clone().unwrap_or_else(|| args.repo.clone());
        let (_tx, cancel) = watch::channel(false);
        let planned = engine::plan_vm(run(&local, images, cancel)).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&planned)?);
        } else {
            print!("{}", render_plan(&planned));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let cancel = cancel_on_signals()?;
    let manifest = engine::backup_vm(run(&repo, images, cancel)).await?;
    let Some(bucket) = &bucket else {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&manifest)?);
        } else {
            print!("{}", render_backup(&manifest));
        }
        return Ok(ExitCode::SUCCESS);
    };
    upload(
        &args,
        &repo,
        (bucket, bucket_lock.as_ref()),
        &manifest,
        (retain, opts.copy.stream_to.clone()),
    )
}

/// The directory a backup writes into (the repository, or the spool of
/// an s3:// one), and the bucket when there is one: checked before the
/// VM is touched, reachable with these credentials and with object lock
/// when `locking`.
fn where_to(
    args: &BackupArgs,
    locking: bool,
) -> anyhow::Result<(PathBuf, Option<bitback::repo::Bucket>)> {
    let bucket = super::output::bucket(&args.repo, args.s3_endpoint.as_deref())?;
    match (bucket, &args.spool) {
        (Some(bucket), Some(spool)) => {
            engine::check_bucket(&bucket, &args.vm, locking)?;
            Ok((spool.clone(), Some(bucket)))
        }
        (Some(_), None) => Err(BadInput(format!(
            "--repo {}: a backup is written into a spool first; give --spool DIR (a directory on this host that keeps the VM's newest chain)",
            args.repo.display()
        ))
        .into()),
        (None, Some(_)) => Err(BadInput("--spool goes with an s3:// repository".into()).into()),
        (None, None) if locking => Err(BadInput(
            "--retain-days locks a point's objects in a bucket: it goes with --repo s3://...".into(),
        )
        .into()),
        (None, None) => Ok((args.repo.clone(), None)),
    }
}

/// After a backup into `spool`: the VM's points not yet in `bucket`
/// uploaded, and the backup printed with what went up.
fn upload(
    args: &BackupArgs,
    spool: &Path,
    (bucket, lock): (
        &bitback::repo::Bucket,
        Option<&bitback::repo::BucketLock<'_>>,
    ),
    manifest: &Manifest,
    (retain, streamed): (
        Option<(u32, bitback::s3::LockMode)>,
        Option<std::sync::Arc<engine::StreamTo>>,
    ),
) -> anyhow::Result<ExitCode> {
    if !args.json {
        print!("{}", render_backup(manifest));
    }
    let synced = engine::upload_spool(&Repo::open(spool)?, (bucket, lock), &args.vm, retain, streamed)
        .map_err(|e| {
            e.context(format!(
                "backup {} is kept in the spool {}; the next backup (or bitback sync --from {} --to {}) uploads it",
                manifest.id,
                spool.display(),
                spool.display(),
                args.repo.display()
            ))
            .context(engine::Operation::Sync {
                from: spool.display().to_string(),
                to: args.repo.display().to_string(),
            })
        })?;
    if args.json {
        #[derive(serde::Serialize)]
        struct Uploaded<'a> {
            #[serde(flatten)]
            manifest: &'a Manifest,
            /// The points the upload copied or found in the bucket.
            synced: &'a [engine::Synced],
        }
        let out = Uploaded {
            manifest,
            synced: &synced,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        super::sync::print_synced(&synced);
    }
    Ok(ExitCode::SUCCESS)
}

fn render_plan(p: &engine::Planned) -> String {
    let mut out = format!(
        "the next backup of vm {} would be {} (--dry-run: nothing was changed)\n",
        p.vm, p.kind
    );
    let mut rows = vec![vec!["VOLUME".to_string(), "KIND".into(), "WHY".into()]];
    for v in &p.volumes {
        rows.push(vec![v.name.clone(), v.kind.clone(), v.reason.clone()]);
    }
    out.push_str(&table(&rows));
    out
}

fn kind_name(kind: BackupKind) -> &'static str {
    match kind {
        BackupKind::Full => "full",
        BackupKind::Incremental => "incremental",
    }
}

/// The point's kind, with how many of its volumes are full, and how many
/// were found by content, when some are.
fn point_kind(m: &Manifest) -> String {
    let count = |f: &dyn Fn(&VolumeRecord) -> bool| m.volumes.iter().filter(|v| f(v)).count();
    let fulls = count(&|v| v.kind == BackupKind::Full);
    let content = count(&|v| v.changes == Some(Changes::Content));
    let mut notes = Vec::new();
    if m.kind == BackupKind::Incremental && fulls > 0 {
        notes.push(format!("{fulls} full"));
    }
    if content > 0 {
        notes.push(format!("{content} by content"));
    }
    match notes.is_empty() {
        true => kind_name(m.kind).to_string(),
        false => format!("{} ({})", kind_name(m.kind), notes.join(", ")),
    }
}

/// A volume's kind, and how its changes were found when not by bitmap.
fn volume_kind(v: &VolumeRecord) -> String {
    match v.changes {
        Some(Changes::Content) => "incremental by content".into(),
        _ => kind_name(v.kind).into(),
    }
}

fn render_backup(m: &Manifest) -> String {
    let mut out = format!(
        "backup {} of vm {}: {}{}\n",
        m.id,
        m.vm,
        point_kind(m),
        if m.encryption.is_some() {
            ", encrypted"
        } else {
            ""
        }
    );
    let mut rows = vec![
        ["VOLUME", "KIND", "TRACKING", "SIZE", "READ", "DATA", "FILE"]
            .map(String::from)
            .to_vec(),
    ];
    for v in &m.volumes {
        rows.push(vec![
            v.name.clone(),
            volume_kind(v),
            v.tracking.map(|t| t.to_string()).unwrap_or("-".into()),
            bytes(v.virtual_size),
            v.bytes_read.map_or("-".into(), bytes),
            bytes(v.bytes_written),
            v.file.clone(),
        ]);
    }
    out.push_str(&table(&rows));
    for v in &m.volumes {
        out.push_str(&format!("  {}: {}\n", v.name, v.reason));
    }
    out
}

pub(crate) fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    // From a bucket: each point with whether a delete marker hides it.
    let (all, hidden): (Vec<Manifest>, Vec<bool>) =
        match super::output::bucket(&args.repo, args.s3_endpoint.as_deref())? {
            Some(bucket) => {
                let points = engine::bucket_points(&bucket, args.vm.as_deref())?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&points)?);
                    return Ok(ExitCode::SUCCESS);
                }
                points.into_iter().map(|p| (p.manifest, p.hidden)).unzip()
            }
            None => {
                let repo = Repo::open(&args.repo)?;
                let vms = match &args.vm {
                    Some(vm) => vec![vm.clone()],
                    None => repo.vms()?,
                };
                let mut all = Vec::new();
                for vm in &vms {
                    all.extend(repo.backups(vm)?);
                }
                let hidden = vec![false; all.len()];
                (all, hidden)
            }
        };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    if all.is_empty() {
        println!("no backups");
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![
        ["VM", "ID", "KIND", "CHAIN", "POS", "PARENT", "TIME", "DATA"]
            .map(String::from)
            .to_vec(),
    ];
    for (m, hidden) in all.iter().zip(hidden) {
        rows.push(vec![
            m.vm.clone(),
            m.id.clone(),
            match hidden {
                true => format!("{} (hidden)", point_kind(m)),
                false => point_kind(m),
            },
            m.chain.clone(),
            m.position.to_string(),
            m.parent.clone().unwrap_or_else(|| "-".into()),
            m.time.clone(),
            bytes(m.volumes.iter().map(|v| v.bytes_written).sum()),
        ]);
    }
    print!("{}", table(&rows));
    Ok(ExitCode::SUCCESS)
}

/// The thaw guard as this binary runs it: its own hidden `thaw-guard`
/// command, through /proc/self/exe, which runs this very binary even if
/// the file was replaced by an upgrade since bitback started.
pub(crate) fn thaw_guard_command() -> engine::thaw_guard::GuardCommand {
    engine::thaw_guard::GuardCommand {
        program: "/proc/self/exe".into(),
        args: vec!["thaw-guard".into()],
    }
}

/// Internal: thaws the guest if the bitback that started this dies while
/// the guest may be frozen (see `engine::thaw_guard`). Not for operators.
#[derive(Debug, clap::Args)]
pub(crate) struct ThawGuardArgs {
    /// The guest agent's socket.
    #[arg(long, conflicts_with_all = ["libvirt", "resume_qmp"], required_unless_present_any = ["libvirt", "resume_qmp"])]
    qga: Option<PathBuf>,
    /// The libvirt domain.
    #[arg(long, conflicts_with = "resume_qmp")]
    libvirt: Option<String>,
    /// The libvirt connection URI.
    #[arg(long, default_value = "qemu:///system")]
    connect: String,
    /// Resume the domain (paused for a backup's point), not thaw it.
    #[arg(long, requires = "libvirt")]
    resume: bool,
    /// Resume the VM behind this QMP socket (paused for a backup's point).
    #[arg(long, value_name = "SOCK")]
    resume_qmp: Option<PathBuf>,
}

pub(crate) async fn thaw_guard(args: ThawGuardArgs) -> anyhow::Result<ExitCode> {
    use engine::thaw_guard::{Thawer, serve};
    let thawer = match (args.qga, args.libvirt, args.resume_qmp) {
        (Some(socket), _, _) => Thawer::Agent(socket),
        (None, Some(name), _) => {
            let domain = bitback::libvirt::Domain {
                name,
                connect: args.connect,
            };
            match args.resume {
                true => Thawer::ResumeLibvirt(domain),
                false => Thawer::Libvirt(domain),
            }
        }
        (None, None, Some(socket)) => Thawer::ResumeQmp(socket),
        (None, None, None) => {
            return Err(
                BadInput("thaw-guard needs --qga, --libvirt or --resume-qmp".into()).into(),
            );
        }
    };
    Ok(if serve(thawer).await {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILED)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_named_twice_is_a_usage_error() {
        let specs = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let e = parse_images(&specs(&["a=/x", "b=/y", "a=/z"])).unwrap_err();
        assert!(e.is::<BadInput>(), "{e:#}");
        assert!(format!("{e}").contains("volume a twice"), "{e}");
        assert_eq!(parse_images(&specs(&["a=/x", "b=/y"])).unwrap().len(), 2);
        assert!(parse_images(&specs(&["a"])).unwrap_err().is::<BadInput>());
    }
}
