//! `bitback demo`: a full and two incrementals of a throwaway disk, then a
//! native restore proved equal to the disk by `qemu-img compare`. Needs
//! only qemu-utils (qemu-img, qemu-io, qemu-storage-daemon): the daemon
//! plays the running VM, and writes reach it over its NBD export while
//! the backups run over QMP. Each step is said through the caller's `say`.

use std::path::Path;
use std::process::Command;

use crate::qemu::blockdev::{Address, Export, Node, Qcow2};
use anyhow::Context;
use tokio::sync::watch;

use crate::engine::{self, BackupOptions, CopyOptions};
use crate::qcow2::{self, CreateOptions};
use crate::qemu::daemon::{Daemon, DaemonSpec, private_dir};
use crate::qemu::{commands, query};
use crate::repo::{BackupKind, Repo};

macro_rules! say {
    ($say:expr, $($arg:tt)*) => {
        $say(format!($($arg)*))
    };
}

fn tool(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| {
        format!(
            "{what}: cannot run {:?} (install qemu-utils)",
            cmd.get_program()
        )
    })?;
    let out = crate::child::succeeded(what, out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the demo in `keep` (kept afterwards), or in a temp dir that is
/// removed at the end.
pub async fn run(keep: Option<&Path>, say: &mut dyn FnMut(String)) -> anyhow::Result<()> {
    let (dir, remove) = match keep {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            (std::fs::canonicalize(dir)?, false)
        }
        None => {
            let dir = std::env::temp_dir().join(format!("bitback-demo-{}", std::process::id()));
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            (dir, true)
        }
    };
    let result = demo(&dir, say).await;
    if remove {
        let _ = std::fs::remove_dir_all(&dir);
        say!(say, "removed {}", dir.display());
    } else {
        say!(say, "kept everything in {}", dir.display());
    }
    result
}

/// Ends the demo's NBD export and waits until it is gone (its removal
/// completes in the background).
async fn end_export(qmp: &crate::qmp::Qmp) -> anyhow::Result<()> {
    commands::delete_export(qmp, "e0")
        .await
        .context("ending the disk's export")?;
    for _ in 0..200 {
        if query::export_ids(qmp).await?.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    anyhow::bail!("the disk's export did not end within 2 s")
}

/// The demo's stand-in VM: a qemu-storage-daemon with a monitor, serving
/// `disk` as node `disk0` and exporting it writable at `nbd_socket`.
/// The demo disk as an NBD export (the "guest" writes through it).
fn disk_export() -> Export {
    Export::Nbd {
        id: "e0".into(),
        node_name: "disk0".into(),
        name: "disk0".into(),
        writable: true,
    }
}

fn demo_vm(disk: &Path, nbd_socket: &Path) -> DaemonSpec {
    DaemonSpec {
        qmp: true,
        blockdevs: vec![Qcow2::over(Node::file(disk)).named("disk0").node()],
        nbd: Some(Address::Unix {
            path: nbd_socket.to_path_buf(),
        }),
        exports: vec![disk_export()],
        objects: Vec::new(),
    }
}

async fn demo(dir: &Path, say: &mut dyn FnMut(String)) -> anyhow::Result<()> {
    let disk = dir.join("disk0.qcow2");
    let repo_dir = dir.join("repo");
    let nbd_socket = dir.join("nbd.sock");
    say!(say, "1. a 256 MiB disk: {}", disk.display());
    qcow2::create(
        &disk,
        &CreateOptions {
            size: 256 << 20,
            ..CreateOptions::default()
        },
    )?;

    let daemon = Daemon::start(private_dir("demo-vm")?, &demo_vm(&disk, &nbd_socket)).await?;
    say!(
        say,
        "2. qemu-storage-daemon serves it, standing in for a running VM"
    );
    let qmp = daemon.qmp.clone().context("the daemon has no monitor")?;
    let url = format!("nbd+unix:///disk0?socket={}", nbd_socket.display());
    let write = |pattern: &str| -> anyhow::Result<()> {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for c in pattern.split(';') {
            cmd.args(["-c", c.trim()]);
        }
        cmd.arg(&url);
        tool(&mut cmd, "qemu-io")?;
        Ok(())
    };

    let repo = Repo::create(&repo_dir)?;
    let opts = BackupOptions {
        copy: CopyOptions {
            vm: "demo".into(),
            ..CopyOptions::default()
        },
        ..BackupOptions::default()
    };
    let (_tx, cancel) = watch::channel(false);
    let lock = repo.lock_vm("demo", "demo")?;
    let rounds = [
        (
            "write -P 0x11 0 32M; write -P 0x12 100M 8M; write -P 0x13 200M 1M",
            "41 MiB in three places",
        ),
        (
            "write -P 0x21 4M 1M; write -z 100M 2M",
            "1 MiB of new data, 2 MiB zeroed",
        ),
        (
            "write -P 0x31 250M 64k; write -P 0x32 16M 4k",
            "68 KiB more",
        ),
    ];
    // The writes go in over an NBD export, which is there only while they
    // do: a volume something else writes during a copy keeps QEMU's own
    // filter (bitback's goes under guest devices only), and the demo's
    // "guest" writes between backups.
    let mut last = None;
    for (i, (pattern, what)) in rounds.iter().enumerate() {
        if i > 0 {
            commands::add_export(&qmp, &disk_export())
                .await
                .context("exporting the disk for the writes")?;
        }
        write(pattern)?;
        end_export(&qmp).await?;
        say!(say, "   guest writes: {what}");
        let m = engine::backup(&qmp, &repo, &lock, &opts, cancel.clone()).await?;
        let data: u64 = m.volumes.iter().map(|v| v.bytes_written).sum();
        say!(
            say,
            "{}. backup {}: {}, {} KiB of data written ({})",
            i + 3,
            m.id,
            match m.kind {
                BackupKind::Full => "full",
                BackupKind::Incremental => "incremental",
            },
            data >> 10,
            m.reason
        );
        last = Some(m);
    }
    let last = last.context("no backup was taken")?;
    // Quit the daemon: the disk is closed cleanly (bitmaps written) and
    // safe to compare.
    drop(qmp);
    daemon.quit().await?;

    restore_and_compare(&repo, dir, &disk, &last.id, say)
}

/// Restores backup `id` to a raw file in `dir` and compares it with the
/// disk (`qemu-img compare`, a tool bitback shares no code with).
fn restore_and_compare(
    repo: &Repo,
    dir: &Path,
    disk: &Path,
    id: &str,
    say: &mut dyn FnMut(String),
) -> anyhow::Result<()> {
    let restored = dir.join("restored.raw");
    let done = engine::restore(
        repo,
        &engine::RestoreOptions {
            vm: "demo".into(),
            backup: engine::Pick::Id(id.to_string()),
            volumes: Vec::new(),
            output: restored.clone(),
            format: engine::Format::Raw,
            threads: 4,
            verify: true,
            progress: None,
            key: None,
        },
    )?;
    say!(
        say,
        "6. bitback restore: verified the chain ({} files), copied {} KiB natively to {}",
        done[0].chain_length,
        done[0].bytes_copied.unwrap_or(0) >> 10,
        restored.display()
    );
    let compared = tool(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(disk)
            .arg(&restored),
        "qemu-img compare of the disk and the restore",
    )?;
    say!(say, "7. qemu-img compare: {}", compared.trim());
    say!(say, "the restore equals the disk byte for byte");
    Ok(())
}
