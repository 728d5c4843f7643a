//! `bitback inspect`: what a running QEMU has.

use std::process::ExitCode;

use anyhow::Context;

use super::output::{bytes, table};
use crate::qemu::{self, QemuInfo};
use crate::qmp::Qmp;

/// Show a running QEMU's version, run state, volumes and dirty bitmaps.
///
/// Works with qemu-system (volumes are the guest's block devices, named by
/// their qdev id) and with qemu-storage-daemon or `-machine none` (volumes
/// are the named format nodes no other node uses). Changes nothing.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The QMP monitor: a unix socket path, or tcp:HOST:PORT.
    ///
    /// QEMU serves one QMP client per monitor socket at a time; give QEMU a
    /// second `-qmp` socket for bitback if something else already holds the
    /// first.
    #[arg(long, value_name = "SOCK")]
    qmp: String,

    /// Print one JSON object instead of a table.
    ///
    /// Fields: version {major, minor, micro, package}, status, running, and
    /// volumes [{name, node_name, format, image_file, virtual_size (bytes),
    /// read_only, backing_file, device, bitmaps [{name, recording, busy, persistent,
    /// inconsistent, granularity, count (dirty bytes)}]}].
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let qmp = Qmp::connect(&args.qmp).await?;
    let info = qemu::inspect(&qmp)
        .await
        .with_context(|| format!("inspecting QEMU at {}", args.qmp))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
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
        ["VOLUME", "NODE", "FORMAT", "SIZE", "MODE", "IMAGE"]
            .map(String::from)
            .to_vec(),
    ];
    for v in &info.volumes {
        rows.push(vec![
            v.name.clone(),
            v.node_name.clone(),
            v.format.clone(),
            bytes(v.virtual_size),
            if v.read_only { "ro" } else { "rw" }.into(),
            v.image_file.clone(),
        ]);
    }
    out.push('\n');
    out.push_str(&table(&rows));

    let mut rows = vec![
        ["VOLUME", "BITMAP", "GRANULARITY", "DIRTY", "FLAGS"]
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
