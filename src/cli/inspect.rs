//! `bitback inspect`: what a running QEMU has.

use std::process::ExitCode;

use anyhow::Context;

use super::output::{bytes, table};
use bitback::engine::scope;
use bitback::qemu::{self, QemuInfo};

/// Show a running QEMU's version, run state, volumes and dirty bitmaps.
///
/// Works with qemu-system (volumes are the guest's block devices, named by
/// their qdev id) and with qemu-storage-daemon or `-machine none` (volumes
/// are the named format nodes no other node uses). Changes nothing.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// QEMU serves one QMP client per monitor socket at a time; give QEMU a
    /// second `-qmp` socket for bitback if something else already holds the
    /// first, or use --libvirt for a libvirt domain.
    #[command(flatten)]
    target: super::monitor::Target,

    /// Print one JSON object instead of a table.
    ///
    /// Fields: version {major, minor, micro, package}, status, running, and
    /// volumes [{name, node_name, format, image_file, virtual_size (bytes),
    /// read_only, backing_file, device, kind (qcow2, qcow2-v2, raw-file,
    /// raw-device, other), tracking (persistent: the checkpoint bitmap is
    /// stored in the image; memory: in QEMU only, lost when it restarts),
    /// encrypted, bitmaps [{name, recording, busy, persistent,
    /// inconsistent, granularity, count (dirty bytes), owner}]}]. `owner` is
    /// {repo_id, vm, backup} for bitback's checkpoints (repo_id and vm null
    /// for bitmaps from before repository ids), null for other bitmaps.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let monitor = connect(&args.target).await?;
    let mut info = qemu::inspect(&monitor.qmp)
        .await
        .context("inspecting QEMU")?;
    // A libvirt domain's volumes by the names its backups use.
    info.volumes = qemu::named(std::mem::take(&mut info.volumes), &monitor.renames);
    if args.json {
        let mut value = serde_json::to_value(&info)?;
        for (volume, v) in value["volumes"]
            .as_array_mut()
            .into_iter()
            .flatten()
            .zip(&info.volumes)
        {
            volume["tracking"] = serde_json::to_value(v.kind.tracking())?;
            for bitmap in volume["bitmaps"].as_array_mut().into_iter().flatten() {
                let owner = bitmap["name"].as_str().and_then(scope::owner);
                bitmap["owner"] = serde_json::to_value(owner)?;
            }
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", render(&info));
    }
    Ok(ExitCode::SUCCESS)
}

fn render(info: &QemuInfo) -> String {
    let mut out = format!("QEMU {}", info.version);
    if !info.version.package.is_empty() {
        out.push_str(&format!(" ({})", info.version.package));
    }
    match &info.status {
        Some(status) => out.push_str(&format!(", {status}\n")),
        None => out.push_str(", no run state (storage daemon)\n"),
    }
    if info.volumes.is_empty() {
        out.push_str("no volumes\n");
        return out;
    }
    let mut rows = vec![
        [
            "VOLUME", "NODE", "KIND", "TRACKING", "SIZE", "MODE", "IMAGE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for v in &info.volumes {
        rows.push(vec![
            v.name.clone(),
            v.node_name.clone(),
            format!(
                "{}{}",
                serde_json::to_value(v.kind)
                    .ok()
                    .and_then(|k| k.as_str().map(str::to_string))
                    .unwrap_or_default(),
                if v.encrypted { ",encrypted" } else { "" }
            ),
            v.kind.tracking().to_string(),
            bytes(v.virtual_size),
            if v.read_only { "ro" } else { "rw" }.into(),
            v.image_file.clone(),
        ]);
    }
    out.push('\n');
    out.push_str(&table(&rows));

    let mut rows = vec![
        ["VOLUME", "BITMAP", "GRANULARITY", "DIRTY", "FLAGS", "OWNER"]
            .map(String::from)
            .to_vec(),
    ];
    for v in &info.volumes {
        for b in &v.bitmaps {
            let flags: Vec<&str> = [
                (b.recording, "recording"),
                (!b.recording, "disabled"),
                (b.persistent, "persistent"),
                (b.busy, "busy"),
                (b.inconsistent, "INCONSISTENT"),
            ]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
            rows.push(vec![
                v.name.clone(),
                b.name.clone(),
                bytes(b.granularity),
                bytes(b.count),
                flags.join(","),
                match scope::owner(&b.name) {
                    Some(scope::Owner {
                        repo_id: Some(repo),
                        vm: Some(vm),
                        ..
                    }) => format!("bitback repo {repo} vm {vm}"),
                    Some(_) => "bitback (no repository id)".into(),
                    None => "-".into(),
                },
            ]);
        }
    }
    out.push('\n');
    if rows.len() == 1 {
        out.push_str("no dirty bitmaps\n");
    } else {
        out.push_str(&table(&rows));
    }
    out
}

/// Connects to the running VM `target` names.
async fn connect(target: &super::monitor::Target) -> anyhow::Result<super::monitor::Monitor> {
    let info = match target.domain() {
        Some(domain) => {
            let info = domain.info()?;
            if !info.running {
                return Err(bitback::engine::BadInput(format!(
                    "domain {} is shut off; inspect needs a running QEMU",
                    domain.name
                ))
                .into());
            }
            Some(info)
        }
        None => None,
    };
    target
        .connect(info.as_ref(), std::time::Duration::from_secs(30))
        .await
}

/// Remove a checkpoint bitmap bitback made, on purpose.
///
/// For a repository that is gone (or a VM name no longer backed up): its
/// checkpoint bitmap stays in the VM's images, recording every write, until
/// it is removed. `bitback inspect` shows each bitmap's repository and VM.
/// Only bitmaps bitback made can be removed this way; the next backup of
/// their repository and VM is then full.
#[derive(Debug, clap::Args)]
pub(crate) struct RemoveCheckpointArgs {
    #[command(flatten)]
    target: super::monitor::Target,

    /// The bitmap's name, as `bitback inspect` shows it.
    #[arg(long, value_name = "BITMAP")]
    name: String,

    /// Only from this volume (default: every volume that has it).
    #[arg(long, value_name = "NAME")]
    volume: Option<String>,
}

pub(crate) async fn remove_checkpoint(args: RemoveCheckpointArgs) -> anyhow::Result<ExitCode> {
    if scope::owner(&args.name).is_none() {
        return Err(bitback::engine::BadInput(format!(
            "{} is not a checkpoint bitmap bitback made; bitback removes only its own",
            args.name
        ))
        .into());
    }
    let mut monitor = connect(&args.target).await?;
    let removed =
        bitback::engine::remove_checkpoint(&mut monitor, &args.name, args.volume.as_deref())
            .await?;
    for volume in &removed {
        println!("removed {} from volume {volume}", args.name);
    }
    if removed.is_empty() {
        return Err(bitback::engine::BadInput(format!(
            "no volume{} has bitmap {}",
            args.volume
                .as_ref()
                .map(|v| format!(" named {v}"))
                .unwrap_or_default(),
            args.name
        ))
        .into());
    }
    Ok(ExitCode::SUCCESS)
}
