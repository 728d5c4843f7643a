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
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub(crate) struct MountArgs {
    /// The repository directory.
    #[arg(long, value_name = "DIR")]
    repo: PathBuf,
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
    let repo = Repo::open(&args.repo)?;
    let key = super::output::key_file(args.key_file.as_deref(), "--key-file")?;
    let served = engine::mount(
        &repo,
        &MountOptions {
            vm: args.vm.clone(),
            backup: Some(args.backup.clone()),
            volumes: args.volumes.clone(),
            dir: args.dir.clone(),
            key,
        },
    )
    .await?;
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
