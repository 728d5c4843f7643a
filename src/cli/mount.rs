//! `bitback mount` and `bitback umount`.

use std::path::PathBuf;
use std::process::ExitCode;

use super::output::{bytes, table};
use bitback::engine::{self, MountOptions};
use bitback::repo::Repo;

/// Serve a backup point's volumes as read-only files, for file-level
/// restores.
///
/// Returns once DIR (made when missing) holds one file per volume,
/// <volume>.raw: the volume's whole virtual disk at that point, read
/// through its chain by a qemu-storage-daemon that runs on after bitback
/// (FUSE exports; root, or a user who may mount FUSE). Nothing is copied:
/// every read goes through the chain, so it costs what reading the backup
/// files costs (on a NAS, a network read).
///
/// To get files back, attach a volume read-only and mount its filesystem
/// (noload: no journal replay on a read-only device):
///
///   losetup -f -P -r --show DIR/vda.raw          # prints /dev/loopN
///   mount -o ro,noload /dev/loopNp1 /mnt         # /dev/loopN without partitions
///   vgchange -ay; mount -o ro,noload /dev/VG/LV /mnt   # LVM inside the disk
///
/// then undo it (umount /mnt; losetup -d /dev/loopN) before `bitback
/// umount DIR`. While mounted, the VM's read lock is held: prune and
/// consolidate refuse, naming the mount. A mount whose daemon died is
/// cleaned up by the next mount or umount.
///
/// With --repo s3://BUCKET/PREFIX the point is read where it lies: a
/// bitback server (its own process, ended with the daemon) reads each
/// volume through its chain of object versions by ranged GETs, and checks
/// every cluster against the chain's cluster maps before giving it. A
/// cluster that does not match is an I/O error to the reader (never other
/// bytes) and a damage record in the bucket.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub(crate) struct MountArgs {
    /// The repository: a directory, or s3://BUCKET/PREFIX.
    #[arg(long, value_name = "DIR|URL")]
    repo: PathBuf,
    /// The S3 endpoint of an s3:// repository (a store other than AWS),
    /// instead of AWS_ENDPOINT_URL.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// The VM whose backup to mount.
    #[arg(long, value_name = "NAME")]
    vm: String,
    /// The backup id, or `latest`.
    #[arg(long, value_name = "ID", default_value = "latest")]
    backup: String,
    /// Only this volume (repeat for more); all of the point's by default.
    #[arg(long = "volume", value_name = "NAME")]
    volumes: Vec<String>,
    /// The key file of an encrypted backup.
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Serve the point even where what is known says not to: a file
    /// `bitback verify` found damaged, or one whose length is not the one
    /// recorded at its backup. Without it such a point is refused, naming
    /// the file. The files' structure is checked either way.
    #[arg(long)]
    no_verify: bool,
    /// Print {vm, backup, files: [{volume, path, virtual_size}], pid,
    /// runtime}.
    #[arg(long)]
    json: bool,
    /// The directory that gets the files.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

/// End a `bitback mount`: stop its daemon, remove its files (and DIR, when
/// mount made it).
#[derive(Debug, clap::Args)]
pub(crate) struct UmountArgs {
    /// Print what was mounted, as JSON.
    #[arg(long)]
    json: bool,
    /// The directory given to `bitback mount`.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

pub(crate) async fn mount(args: MountArgs) -> anyhow::Result<ExitCode> {
    let bucket = super::output::bucket(&args.repo, args.s3_endpoint.as_deref())?;
    let key = super::output::key_file(args.key_file.as_deref(), "--key-file")?;
    let opts = MountOptions {
        vm: args.vm.clone(),
        backup: engine::Pick::from(args.backup.as_str()),
        volumes: args.volumes.clone(),
        dir: args.dir.clone(),
        key,
        checks: engine::Checks::serving(!args.no_verify),
    };
    let served = match bucket {
        Some(_) => {
            if opts.key.is_some() || args.no_verify {
                return Err(bitback::engine::BadInput(
                    "--key-file and --no-verify go with a directory repository: a bucket's point is served checked, and an encrypted one needs its files here (bitback sync --from s3://... --to DIR)".into(),
                )
                .into());
            }
            let source = super::output::bucket_source(
                &args.repo,
                args.s3_endpoint.as_deref(),
                &args.vm,
                &args.backup,
                &args.volumes,
            );
            engine::mount_bucket(&source, &opts).await?
        }
        None => engine::mount(&Repo::open(&args.repo)?, &opts).await?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&served)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![["VOLUME", "SIZE", "FILE"].map(String::from).to_vec()];
    for f in &served.files {
        rows.push(vec![
            f.volume.clone(),
            bytes(f.virtual_size),
            f.path.display().to_string(),
        ]);
    }
    print!("{}", table(&rows));
    println!(
        "backup {} of vm {} mounted read-only (qemu-storage-daemon pid {}); end it with: bitback umount {}",
        served.backup,
        served.vm,
        served.pid,
        args.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The server of a point in a bucket that a mount or live restore reads
/// (bitback starts it itself; not for people).
#[derive(Debug, clap::Args)]
pub(crate) struct ServeBucketArgs {
    #[arg(long, value_name = "URL")]
    repo: PathBuf,
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    #[arg(long, value_name = "NAME")]
    vm: String,
    #[arg(long, value_name = "ID", default_value = "latest")]
    backup: String,
    #[arg(long = "volume", value_name = "NAME")]
    volumes: Vec<String>,
}

pub(crate) async fn serve_bucket(args: ServeBucketArgs) -> anyhow::Result<ExitCode> {
    let Some(bucket) = super::output::bucket(&args.repo, args.s3_endpoint.as_deref())? else {
        return Err(
            bitback::engine::BadInput("serve-bucket serves an s3:// repository".into()).into(),
        );
    };
    // The server lives as long as the process: its chains borrow it.
    let bucket: &'static bitback::repo::Bucket = Box::leak(Box::new(bucket));
    let point = tokio::task::spawn_blocking(move || {
        engine::serve_from_bucket(
            bucket,
            &args.vm,
            &engine::Pick::from(args.backup.as_str()),
            &args.volumes,
        )
    })
    .await??;
    engine::serve::bucket::run_server(point).await?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn umount(args: UmountArgs) -> anyhow::Result<ExitCode> {
    let state = engine::umount(&args.dir).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&state)?);
    } else {
        println!(
            "unmounted backup {} of vm {} from {}",
            state.backup,
            state.vm,
            state.target.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What serves backup points on this host, and what a repository's leases
/// say.
///
/// Lists this host's mounts and live restores (their runtime directories:
/// serving, setting up, or gone with their daemon). With --repo, also the
/// leases each serve leaves in the repository (<vm>/.serving/), which keep
/// prunes off on every host: serving, needs-resume (a live restore whose
/// export is gone while its images still read from the point: `bitback
/// restore --live --resume`), ended (removed by the next prune), or
/// other-host.
#[derive(Debug, clap::Args)]
pub(crate) struct ServingArgs {
    /// Also list this repository's leases: a directory, or
    /// s3://BUCKET/PREFIX (the serves of its points where they lie).
    #[arg(long, value_name = "DIR|URL")]
    repo: Option<PathBuf>,
    /// The S3 endpoint of an s3:// repository (a store other than AWS),
    /// instead of AWS_ENDPOINT_URL.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
    /// Only this VM's serves and leases.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Print {serves: [...], leases: [...]}.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn serving(args: ServingArgs) -> anyhow::Result<ExitCode> {
    let serves: Vec<_> = engine::serve::runtime::serves()
        .into_iter()
        .filter(|s| args.vm.as_ref().is_none_or(|vm| *vm == s.state.vm))
        .collect();
    let mut leases = Vec::new();
    if let Some(root) = &args.repo {
        match super::output::bucket(root, args.s3_endpoint.as_deref())? {
            Some(bucket) => {
                let vms = match &args.vm {
                    Some(vm) => vec![vm.clone()],
                    None => bucket.all_vms()?,
                };
                for vm in vms {
                    for found in engine::serve::runtime::bucket_leases(&bucket, &vm)? {
                        leases.push((vm.clone(), found));
                    }
                }
            }
            None => {
                let repo = Repo::open(root)?;
                let vms = match &args.vm {
                    Some(vm) => vec![vm.clone()],
                    None => repo.vms()?,
                };
                for vm in vms {
                    for found in engine::serve::runtime::leases(&repo.vm_dir(&vm)?) {
                        leases.push((vm.clone(), found));
                    }
                }
            }
        }
    }
    if args.json {
        #[derive(serde::Serialize)]
        struct Lease<'a, L> {
            vm: &'a str,
            lease: &'a L,
        }
        #[derive(serde::Serialize)]
        struct Listing<S, L> {
            serves: S,
            leases: L,
        }
        let leases: Vec<_> = leases
            .iter()
            .map(|(vm, lease)| Lease { vm, lease })
            .collect();
        let listing = Listing { serves, leases };
        println!("{}", serde_json::to_string_pretty(&listing)?);
        return Ok(ExitCode::SUCCESS);
    }
    let kind = |k: engine::serve::runtime::Kind| match k {
        engine::serve::runtime::Kind::Mount => "mount",
        engine::serve::runtime::Kind::Live => "live",
    };
    if serves.is_empty() {
        println!("nothing serves on this host");
    } else {
        let mut rows = vec![
            ["KIND", "VM", "BACKUP", "AT", "STATUS", "PID"]
                .map(String::from)
                .to_vec(),
        ];
        for s in &serves {
            rows.push(vec![
                kind(s.state.kind).into(),
                s.state.vm.clone(),
                s.state.backup.clone(),
                s.state.target.display().to_string(),
                s.status.name().into(),
                s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            ]);
        }
        print!("{}", table(&rows));
    }
    if args.repo.is_some() {
        if leases.is_empty() {
            println!("no lease in the repository");
        } else {
            let mut rows = vec![
                ["VM", "HOST", "KIND", "BACKUP", "AT", "STATUS", "LEASE"]
                    .map(String::from)
                    .to_vec(),
            ];
            for (vm, l) in &leases {
                let status = serde_json::to_value(l.status)?;
                let (host, k, backup, at) = match &l.lease {
                    Some(x) => (
                        x.host.clone(),
                        kind(x.kind).to_string(),
                        x.backup.clone(),
                        x.target.display().to_string(),
                    ),
                    None => Default::default(),
                };
                rows.push(vec![
                    vm.clone(),
                    host,
                    k,
                    backup,
                    at,
                    status.as_str().unwrap_or_default().to_string(),
                    l.path.display().to_string(),
                ]);
            }
            print!("{}", table(&rows));
        }
    }
    Ok(ExitCode::SUCCESS)
}
