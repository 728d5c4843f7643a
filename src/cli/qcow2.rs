//! `bitback qcow2 ...`: the native qcow2 module from the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};

use super::output::{bytes, table};
use bitback::qcow2::{self, CreateOptions, Image, Kind};

/// Read and edit qcow2 images without QEMU.
///
/// These commands read the image's own bytes; none of them starts QEMU.
/// `info` and `map` agree with `qemu-img info` and `qemu-img map` for the
/// image alone; `rebase` does what `qemu-img rebase -u` does.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    Info(InfoArgs),
    Bitmaps(BitmapsArgs),
    Rebase(RebaseArgs),
    Map(MapArgs),
    Create(CreateArgs),
}

/// Show an image's header: size, cluster size, features, backing file,
/// bitmaps.
///
/// The JSON uses `qemu-img info --output=json`'s field names, plus a
/// `bitback` object with header details qemu-img does not show.
#[derive(Debug, clap::Args)]
pub(crate) struct InfoArgs {
    /// The qcow2 image.
    file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// List an image's persistent dirty bitmaps, or check one.
///
/// With --name, says whether that bitmap is present, in use (a QEMU holds
/// it, or died holding it), and consistent (the image's bitmaps extension
/// is valid), and exits 1 unless it can carry an incremental backup.
#[derive(Debug, clap::Args)]
pub(crate) struct BitmapsArgs {
    /// The qcow2 image.
    file: PathBuf,
    /// Check this bitmap instead of listing them all.
    #[arg(long, value_name = "BITMAP")]
    name: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Set, change or remove an image's backing file in place, like
/// `qemu-img rebase -u`.
///
/// Only the header cluster is rewritten; data, bitmaps and other header
/// extensions are kept. Nothing checks that the new backing file holds
/// the right data: that is the caller's promise. Refused while a QEMU holds
/// the image, and on images with the dirty or corrupt bit set.
#[derive(Debug, clap::Args)]
pub(crate) struct RebaseArgs {
    /// The qcow2 image to change.
    file: PathBuf,
    /// The new backing file name, stored as given; an empty string removes
    /// the backing file.
    ///
    /// A relative name is resolved against the image's own directory, so
    /// `../full/disk0.qcow2` keeps working wherever the tree is mounted.
    #[arg(long, value_name = "PATH", allow_hyphen_values = true)]
    backing: String,
    /// The backing file's format (qcow2, raw, ...). Required with a
    /// non-empty --backing, as qemu-img requires -F.
    #[arg(long, value_name = "FMT")]
    backing_format: Option<String>,
}

/// Show which guest ranges an image holds: data (with its host offset),
/// zeros, compressed clusters, or nothing (read from the backing file).
///
/// Only this file's tables are read; backing files are not followed.
#[derive(Debug, clap::Args)]
pub(crate) struct MapArgs {
    /// The qcow2 image.
    file: PathBuf,
    /// Print a JSON array of {start, length, kind, offset?,
    /// compressed_length?} instead of a table.
    #[arg(long)]
    json: bool,
}

/// Create an empty qcow2 v3 image.
#[derive(Debug, clap::Args)]
pub(crate) struct CreateArgs {
    /// The image to create; it must not exist.
    file: PathBuf,
    /// Virtual size: bytes, or with a K, M, G or T suffix (powers of 1024).
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Cluster size, a power of two from 512 to 2M.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    cluster_size: u64,
    /// Backing file name, stored as given.
    #[arg(long, value_name = "PATH")]
    backing: Option<String>,
    /// The backing file's format; required with --backing.
    #[arg(long, value_name = "FMT", requires = "backing")]
    backing_format: Option<String>,
}

pub(crate) use bitback::units::parse_size;

pub(crate) fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Info(args) => info(args),
        Command::Bitmaps(args) => bitmaps(args),
        Command::Rebase(args) => rebase(args),
        Command::Map(args) => map(args),
        Command::Create(args) => create(args),
    }
}

fn open(file: &std::path::Path) -> anyhow::Result<Image> {
    Image::open(file).with_context(|| format!("reading {}", file.display()))
}

fn info(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let image = open(&args.file)?;
    let info = image.info();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(ExitCode::SUCCESS);
    }
    let h = image.header();
    let data = &info.format_specific.data;
    let mut rows = vec![
        vec!["image".into(), info.filename.clone()],
        vec![
            "virtual size".into(),
            format!("{} ({} bytes)", bytes(h.size), h.size),
        ],
        vec!["cluster size".into(), bytes(h.cluster_size())],
        vec![
            "version".into(),
            format!("{} (compat {})", h.version, data.compat),
        ],
        vec!["on disk".into(), bytes(info.actual_size)],
        vec!["compression".into(), data.compression_type.into()],
        vec!["refcount bits".into(), data.refcount_bits.to_string()],
    ];
    if let Some(backing) = &info.backing_filename {
        let format = info
            .backing_filename_format
            .as_deref()
            .unwrap_or("unspecified");
        rows.push(vec!["backing file".into(), format!("{backing} ({format})")]);
    }
    if let Some(data_file) = &data.data_file {
        rows.push(vec!["data file".into(), data_file.clone()]);
    }
    let mut features = Vec::new();
    if h.extended_l2() {
        features.push("extended-l2");
    }
    if data.lazy_refcounts == Some(true) {
        features.push("lazy-refcounts");
    }
    if image.encrypted() {
        features.push("encrypted");
    }
    if h.dirty() {
        features.push("DIRTY");
    }
    if h.corrupt() {
        features.push("CORRUPT");
    }
    if !features.is_empty() {
        rows.push(vec!["features".into(), features.join(", ")]);
    }
    rows.push(vec![
        "bitmaps".into(),
        match (image.bitmaps.len(), image.bitmaps_consistent()) {
            (0, _) => "none".into(),
            (n, true) => n.to_string(),
            (n, false) => format!("{n}, INCONSISTENT (QEMU will discard them)"),
        },
    ]);
    print!("{}", table(&rows));
    Ok(ExitCode::SUCCESS)
}

fn bitmaps(args: BitmapsArgs) -> anyhow::Result<ExitCode> {
    let image = open(&args.file)?;
    if let Some(name) = &args.name {
        let status = image.bitmap_status(name);
        if args.json {
            let mut value = serde_json::to_value(status)?;
            value["name"] = name.clone().into();
            value["usable"] = status.usable().into();
            println!("{}", serde_json::to_string_pretty(&value)?);
        } else {
            let verdict = if status.usable() {
                "usable"
            } else if !status.present {
                "missing"
            } else if status.in_use {
                "in use (held by a QEMU, or left by one that died)"
            } else {
                "inconsistent (QEMU will discard it)"
            };
            println!("bitmap {name}: {verdict}");
        }
        return Ok(if status.usable() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    if args.json {
        #[derive(serde::Serialize)]
        struct Bitmaps<'a> {
            consistent: bool,
            bitmaps: &'a [qcow2::BitmapEntry],
        }
        let value = Bitmaps {
            consistent: image.bitmaps_consistent(),
            bitmaps: &image.bitmaps,
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    if image.bitmaps.is_empty() {
        println!("no bitmaps");
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![["NAME", "GRANULARITY", "FLAGS"].map(String::from).to_vec()];
    for b in &image.bitmaps {
        let mut flags = vec![if b.auto { "enabled" } else { "disabled" }];
        if b.in_use {
            flags.push("in-use");
        }
        if !image.bitmaps_consistent() {
            flags.push("INCONSISTENT");
        }
        rows.push(vec![b.name.clone(), bytes(b.granularity), flags.join(",")]);
    }
    print!("{}", table(&rows));
    Ok(ExitCode::SUCCESS)
}

fn rebase(args: RebaseArgs) -> anyhow::Result<ExitCode> {
    let backing = (!args.backing.is_empty()).then_some(args.backing.as_str());
    if backing.is_some() && args.backing_format.is_none() {
        bail!("--backing-format is required with a backing file (e.g. --backing-format qcow2)");
    }
    if backing.is_none() && args.backing_format.is_some() {
        bail!("--backing-format makes no sense when removing the backing file");
    }
    qcow2::set_backing(&args.file, backing, args.backing_format.as_deref())
        .with_context(|| format!("rebasing {}", args.file.display()))?;
    Ok(ExitCode::SUCCESS)
}

fn map(args: MapArgs) -> anyhow::Result<ExitCode> {
    let image = open(&args.file)?;
    let extents = qcow2::map(&image).with_context(|| format!("mapping {}", args.file.display()))?;
    if args.json {
        println!("{}", serde_json::to_string(&extents)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![
        ["START", "LENGTH", "KIND", "HOST OFFSET"]
            .map(String::from)
            .to_vec(),
    ];
    for e in &extents {
        let kind = match e.kind {
            Kind::Data => "data",
            Kind::Zero => "zero",
            Kind::Unallocated => "unallocated",
            Kind::Compressed => "compressed",
        };
        rows.push(vec![
            format!("{:#x}", e.start),
            bytes(e.length),
            kind.into(),
            e.offset.map(|o| format!("{o:#x}")).unwrap_or_default(),
        ]);
    }
    print!("{}", table(&rows));
    Ok(ExitCode::SUCCESS)
}

fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    if args.backing.is_some() && args.backing_format.is_none() {
        bail!("--backing-format is required with --backing (e.g. --backing-format qcow2)");
    }
    let opts = CreateOptions {
        size: args.size,
        cluster_size: args.cluster_size,
        backing: args.backing.as_deref(),
        backing_format: args.backing_format.as_deref(),
    };
    qcow2::create(&args.file, &opts)
        .with_context(|| format!("creating {}", args.file.display()))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999P").is_err());
        assert!(parse_size("").is_err());
    }
}
