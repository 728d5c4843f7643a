//! Incrementals by content: a volume whose bitmap is lost (with its QEMU,
//! removed, inconsistent after a crash; a raw image never keeps one) is
//! read whole with `sync=full`, and bitback's writer stores only the
//! clusters whose digest differs from what the last backup's chain holds
//! ([`cluster_map::Baseline`]), with the last backup's file as backing
//! file. Nothing of the parent chain is read but its cluster maps, and a
//! map is trusted only when its digest is the one its manifest recorded
//! (which catches bit rot and tampering: the digest is over the whole map
//! file) and its geometry is this backup's. Two clusters with one
//! 128-bit BLAKE3 digest and different bytes would be taken as unchanged:
//! not a practical risk (about 2^-64 for 2^32 clusters).

use std::sync::Arc;

use crate::cluster_map::{Baseline, Map};
use crate::repo::{Manifest, Repo};

/// The baseline of `volume` at the top of `chain` (full first): the maps
/// of its files, each verified, of `cluster_size` (any, when `None`: the
/// full's). `Err` says why there is none.
pub(super) fn baseline(
    repo: &Repo,
    chain: &[Manifest],
    volume: &str,
    cluster_size: Option<u64>,
) -> Result<Arc<Baseline>, String> {
    baseline_of(chain, volume, cluster_size, |file| {
        let file = std::fs::File::open(repo.root().join(file)).map_err(|e| e.to_string())?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        Ok((Box::new(file) as Box<dyn std::io::Read>, Some(len)))
    })
}

/// A map's bytes and their length, when known.
pub(super) type MapBytes<'a> = (Box<dyn std::io::Read + 'a>, Option<u64>);

/// [`baseline`], each map's bytes read by `read` (given the map's file,
/// relative to the repository: a file, or an object of a bucket). The
/// maps are laid over each other as they are read: one at a time is held
/// besides the baseline.
pub(super) fn baseline_of<'a>(
    chain: &[Manifest],
    volume: &str,
    cluster_size: Option<u64>,
    read: impl Fn(&str) -> Result<MapBytes<'a>, String>,
) -> Result<Arc<Baseline>, String> {
    let records = super::chain::volume_records(chain, volume).map_err(|e| format!("{e:#}"))?;
    let load = |r: &crate::repo::VolumeRecord| -> Result<Map, String> {
        let Some(map) = &r.cluster_map else {
            return Err(format!(
                "its file {} has no cluster map (QEMU wrote it, or a consolidation did)",
                r.file
            ));
        };
        let cannot = |e: String| format!("the cluster map {} cannot be read: {e}", map.file);
        let (bytes, len) = read(&map.file).map_err(cannot)?;
        let (read, digest) = Map::read_from(bytes, len).map_err(|e| cannot(e.to_string()))?;
        if digest != map.digest {
            return Err(format!(
                "the cluster map {} is not the one written (its digest is {digest}, the manifest says {})",
                map.file, map.digest
            ));
        }
        let read = read.map_err(|e| format!("the cluster map {} is not one: {e:#}", map.file))?;
        let cluster_size = cluster_size.unwrap_or(read.cluster_size);
        if read.cluster_size != cluster_size || read.size != r.virtual_size {
            return Err(format!(
                "the cluster map {} is of {} B clusters of {} B; this backup writes {} B clusters of {} B",
                map.file, read.cluster_size, read.size, cluster_size, r.virtual_size
            ));
        }
        Ok(read)
    };
    let mut failed = None;
    let maps = records.iter().map_while(|r| match load(r) {
        Ok(map) => Some(map),
        Err(e) => {
            failed = Some(e);
            None
        }
    });
    let overlaid = Baseline::overlay(maps);
    if let Some(e) = failed {
        return Err(e);
    }
    overlaid.map(Arc::new).map_err(|e| format!("{e:#}"))
}
