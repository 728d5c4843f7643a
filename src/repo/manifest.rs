//! The manifest of one backup and the state of one VM, as JSON, with the
//! checks a file read back from a shared disk must pass.

use serde::{Deserialize, Serialize};

use super::error::Invalid;
use super::names::check_name;
pub use crate::digest::Digest;

/// 2: each volume records its own kind and reason (a point may hold fulls
/// and incrementals), its tracking, and the backup its encryption.
/// Schema 1 manifests still read: their volumes take the point's kind.
/// 3: a file's digest may be a layout digest (`blake3-layout:`), its data
/// proven by its cluster map; an older bitback would take that for
/// damage, so it refuses the manifest instead. Schema 2 reads as it is.
pub const MANIFEST_SCHEMA: u32 = 3;
pub const STATE_SCHEMA: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    Full,
    Incremental,
}

/// One backup: every selected volume at one point in time. Its JSON is also
/// what `bitback backup --json` prints and `bitback list --json` lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    pub id: String,
    pub vm: String,
    /// The VM's backups in the order they were taken: 1, 2, ... (0 in
    /// manifests from before sequences, which order by time).
    #[serde(default)]
    pub seq: u64,
    pub kind: BackupKind,
    /// Why this kind: the plan's reason.
    pub reason: String,
    /// The id of the full backup this chain starts with.
    pub chain: String,
    /// 0 for the full, then 1, 2, ... along the chain.
    pub position: u32,
    pub parent: Option<String>,
    /// The bitmap created with this backup on every volume.
    pub checkpoint: String,
    /// RFC 3339, UTC.
    pub time: String,
    pub volumes: Vec<VolumeRecord>,
    #[serde(default)]
    pub qemu_version: Option<String>,
    /// `luks` when every file is a LUKS-encrypted qcow2 (restore needs the
    /// key; verify does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// How a backup's files are encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    /// LUKS-encrypted qcow2 (QEMU's `encrypt.format=luks`).
    Luks,
}

/// What stood between the guest's writes and a volume's copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Guard {
    /// bitback's own copy-before-write filter: old data that could not be
    /// copied broke the backup, not the guest's write.
    Bitback,
    /// The same, with the old data in the fleecing directory.
    Fleecing,
    /// QEMU's own filter, which fails the guest's write instead.
    Qemu,
}

/// How the changes a volume's file stores were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Changes {
    /// The checkpoint's dirty bitmap.
    Bitmap,
    /// The volume read whole and compared with the parent's cluster maps
    /// (the bitmap was lost).
    Content,
    /// None: the file is a full.
    Full,
}

fn full() -> BackupKind {
    BackupKind::Full
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    /// The QEMU node the volume was copied from.
    pub node: String,
    /// The VM's image file, as QEMU named it.
    pub image_file: String,
    pub format: String,
    pub virtual_size: u64,
    /// Full (a file of its own) or incremental (backed by the parent's).
    #[serde(default = "full")]
    pub kind: BackupKind,
    /// Why this kind.
    #[serde(default)]
    pub reason: String,
    /// What the image is (`qcow2`, `raw-file`, ...); unknown before schema 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<crate::disk::DiskKind>,
    /// How the changes after this backup are tracked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<crate::disk::Tracking>,
    /// The backup file, relative to the repository: `<vm>/<id>/<name>.qcow2`.
    pub file: String,
    /// The backing file name stored in it: `../<parent>/<name>.qcow2`.
    pub backing: Option<String>,
    /// Guest bytes of data this file holds (zero clusters not counted).
    pub bytes_written: u64,
    /// `blake3:<hex>` of the whole file; or, for a file written with a
    /// cluster map, `blake3-layout:<hex>` of all its bytes but its data
    /// (`qcow2::layout_digest`), the map proving the data. Computed as
    /// the file was written, or once the job finished.
    pub digest: Digest,
    /// The file's length in bytes when it was committed: every backup
    /// built on the file checks it (a truncated or appended file is seen
    /// without reading data). Absent in manifests from before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_size: Option<u64>,
    /// What stood between the guest's writes and the copy: `bitback` (its
    /// own filter: old data that could not be copied broke the backup, not
    /// the guest's write), `fleecing` (the same, with the old data in the
    /// fleecing directory), or `qemu` (QEMU's own filter, which fails the
    /// guest's write instead; the run's log says why). Absent when nothing
    /// but the backup used the volume, and in manifests from before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<Guard>,
    /// The per-cluster digest map written with the file (the NBD data
    /// path, [`crate::cluster_map`]); absent for files QEMU wrote, files
    /// a consolidation rewrote, and in manifests from before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_map: Option<MapRecord>,
    /// How the changes stored were found: `bitmap` (the checkpoint's
    /// dirty bitmap), `content` (the volume read whole and compared with
    /// the parent's cluster maps: the bitmap was lost), or `full`. Absent
    /// in manifests from before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<Changes>,
    /// Bytes of data QEMU sent bitback to find them (the NBD path; zero
    /// ranges not counted); `bytes_written` is what the file stores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_read: Option<u64>,
}

/// A volume's per-cluster digest map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapRecord {
    /// Relative to the repository: `<vm>/<id>/<name>.map`.
    pub file: String,
    /// `blake3:<hex>` of the map file.
    pub digest: Digest,
    /// How many records it holds (clusters written, rewrites included).
    pub records: u64,
}

impl VolumeRecord {
    pub fn map_file(vm: &str, id: &str, volume: &str) -> String {
        format!("{vm}/{id}/{volume}.map")
    }

    pub fn file_name(volume: &str) -> String {
        format!("{volume}.qcow2")
    }

    pub fn repo_file(vm: &str, id: &str, volume: &str) -> String {
        format!("{vm}/{id}/{}", VolumeRecord::file_name(volume))
    }

    pub fn backing_name(parent: &str, volume: &str) -> String {
        format!("../{parent}/{}", VolumeRecord::file_name(volume))
    }
}

impl Manifest {
    /// Parses and checks a manifest found at `<vm>/<id>/manifest.json`:
    /// every name it holds must be safe, every file name the one the
    /// layout dictates (nothing that leaves the repository).
    pub fn parse(bytes: &[u8], vm: &str, id: &str) -> Result<Manifest, Invalid> {
        let mut m: Manifest = serde_json::from_slice(bytes)?;
        match m.schema {
            1 => {
                for v in &mut m.volumes {
                    v.kind = m.kind;
                    v.reason = m.reason.clone();
                }
            }
            2 | MANIFEST_SCHEMA => {}
            other => {
                return Err(Invalid::Schema {
                    found: other,
                    expected: MANIFEST_SCHEMA,
                });
            }
        }
        if m.id != id || m.vm != vm {
            return Err(Invalid::Misplaced {
                vm: m.vm,
                id: m.id,
                dir: format!("{vm}/{id}"),
            });
        }
        check_name("backup", &m.chain)?;
        if let Some(parent) = &m.parent {
            check_name("backup", parent)?;
            if parent == id {
                return Err(Invalid::OwnParent);
            }
        }
        match (m.kind, &m.parent, m.position) {
            (BackupKind::Full, None, 0) if m.chain == m.id => {}
            (BackupKind::Incremental, Some(_), p) if p > 0 => {}
            _ => return Err(Invalid::Disagrees),
        }
        if m.volumes.is_empty() {
            return Err(Invalid::NoVolumes);
        }
        for v in &m.volumes {
            check_name("volume", &v.name)?;
            if v.file != VolumeRecord::repo_file(vm, id, &v.name) {
                return Err(Invalid::File {
                    volume: v.name.clone(),
                    file: v.file.clone(),
                });
            }
            if let Some(map) = &v.cluster_map
                && map.file != VolumeRecord::map_file(vm, id, &v.name)
            {
                return Err(Invalid::File {
                    volume: v.name.clone(),
                    file: map.file.clone(),
                });
            }
            let map_digest = v.cluster_map.as_ref().map(|m| m.digest);
            if (v.digest.is_layout() && v.cluster_map.is_none())
                || map_digest.is_some_and(|d| d.is_layout())
            {
                return Err(Invalid::Digest {
                    volume: v.name.clone(),
                    digest: v.digest.to_string(),
                });
            }
            let expected = match v.kind {
                BackupKind::Full => None,
                BackupKind::Incremental => m
                    .parent
                    .as_ref()
                    .map(|p| VolumeRecord::backing_name(p, &v.name)),
            };
            if v.backing != expected || (v.kind == BackupKind::Incremental && expected.is_none()) {
                return Err(Invalid::Backing {
                    volume: v.name.clone(),
                    backing: v.backing.clone(),
                });
            }
        }
        if m.kind == BackupKind::Incremental && m.volumes.iter().all(|v| v.kind == BackupKind::Full)
        {
            return Err(Invalid::AllFull);
        }
        Ok(m)
    }
}

/// Per-VM state: which checkpoint the next incremental starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub schema: u32,
    pub vm: String,
    /// The bitmap of the last committed backup; `None` after a restore, or
    /// before the first backup: the next backup is full.
    pub active_checkpoint: Option<String>,
    pub last_backup: Option<String>,
    /// The volumes the active checkpoint covers, in order.
    pub volumes: Vec<StateVolume>,
    /// The sequence number of the newest backup ever taken (never reused,
    /// even when that backup is pruned).
    #[serde(default)]
    pub last_seq: u64,
    /// Who the VM is, as its QEMU said at the last backup.
    #[serde(default)]
    pub identity: Option<VmIdentity>,
}

/// What tells one VM from another: QEMU's `query-uuid` (unless all
/// zeros) and `query-name`. Either may be unknown (a storage daemon has
/// neither).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmIdentity {
    pub uuid: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateVolume {
    pub name: String,
    pub node: String,
    pub image_file: String,
    pub format: String,
    pub virtual_size: u64,
}

impl VmState {
    pub fn parse(bytes: &[u8], vm: &str) -> Result<VmState, Invalid> {
        let s: VmState = serde_json::from_slice(bytes)?;
        if s.schema != STATE_SCHEMA {
            return Err(Invalid::Schema {
                found: s.schema,
                expected: STATE_SCHEMA,
            });
        }
        if s.vm != vm {
            return Err(Invalid::OtherVm(s.vm));
        }
        for v in &s.volumes {
            check_name("volume", &v.name)?;
        }
        if let Some(last) = &s.last_backup {
            check_name("backup", last)?;
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest as bitback 0.x (schema 1) wrote it: one kind per point.
    const SCHEMA_1: &str = r#"{
        "schema": 1, "id": "20261126T152252Z", "vm": "web1", "seq": 2,
        "kind": "incremental", "reason": "incremental: changes since 20261126T140000Z",
        "chain": "20261126T140000Z", "position": 1, "parent": "20261126T140000Z",
        "checkpoint": "bitback-20261126T152252Z", "time": "2026-11-26T15:22:52Z",
        "volumes": [{
            "name": "disk0", "node": "drive0", "image_file": "/vms/web1.qcow2",
            "format": "qcow2", "virtual_size": 1073741824,
            "file": "web1/20261126T152252Z/disk0.qcow2",
            "backing": "../20261126T140000Z/disk0.qcow2",
            "bytes_written": 65536, "digest": "blake3:0000000000000000000000000000000000000000000000000000000000000000"
        }]
    }"#;

    #[test]
    fn schema_1_manifests_read_with_the_points_kind_per_volume() {
        let m = Manifest::parse(SCHEMA_1.as_bytes(), "web1", "20261126T152252Z").unwrap();
        assert_eq!(m.volumes[0].kind, BackupKind::Incremental);
        assert_eq!(m.volumes[0].reason, m.reason);
        assert_eq!(m.volumes[0].tracking, None);
        assert_eq!(m.encryption, None);
    }

    #[test]
    fn per_volume_kinds_must_match_their_backing() {
        let mut value: serde_json::Value = serde_json::from_str(SCHEMA_1).unwrap();
        value["schema"] = MANIFEST_SCHEMA.into();
        value["volumes"][0]["kind"] = "incremental".into();
        let parse = |v: &serde_json::Value| {
            Manifest::parse(v.to_string().as_bytes(), "web1", "20261126T152252Z")
        };
        assert!(parse(&value).is_ok());
        // A full volume with a backing file, an incremental without one.
        value["volumes"][0]["kind"] = "full".into();
        assert!(matches!(
            parse(&value).unwrap_err(),
            Invalid::Backing { .. }
        ));
        value["volumes"][0]["backing"] = serde_json::Value::Null;
        // ... and then every volume of the incremental point is full.
        assert!(matches!(parse(&value).unwrap_err(), Invalid::AllFull));
        value["volumes"][0]["kind"] = "incremental".into();
        assert!(matches!(
            parse(&value).unwrap_err(),
            Invalid::Backing { .. }
        ));
        value["schema"] = 4.into();
        assert!(matches!(
            parse(&value).unwrap_err(),
            Invalid::Schema { found: 4, .. }
        ));
    }

    #[test]
    fn a_layout_digest_needs_a_cluster_map() {
        let mut value: serde_json::Value = serde_json::from_str(SCHEMA_1).unwrap();
        value["schema"] = MANIFEST_SCHEMA.into();
        value["volumes"][0]["kind"] = "incremental".into();
        let parse = |v: &serde_json::Value| {
            Manifest::parse(v.to_string().as_bytes(), "web1", "20261126T152252Z")
        };
        let hex = "ab".repeat(32);
        value["volumes"][0]["digest"] = format!("blake3-layout:{hex}").into();
        assert!(matches!(parse(&value).unwrap_err(), Invalid::Digest { .. }));
        value["volumes"][0]["cluster_map"] = serde_json::from_str(&format!(
            r#"{{"file": "web1/20261126T152252Z/disk0.map", "digest": "blake3:{hex}", "records": 1}}"#
        ))
        .unwrap();
        let m = parse(&value).unwrap();
        assert!(m.volumes[0].digest.is_layout());
        assert_eq!(
            m.volumes[0].digest.to_string(),
            format!("blake3-layout:{hex}")
        );
        value["volumes"][0]["cluster_map"]["digest"] = format!("blake3-layout:{hex}").into();
        assert!(matches!(parse(&value).unwrap_err(), Invalid::Digest { .. }));
        value["volumes"][0]["cluster_map"]["digest"] = format!("blake3:{hex}").into();
        // Another hash, a short one, or none: not a digest at all.
        for bad in ["sha256:00", "blake3:00", "blake3-layout:", "ab"] {
            value["volumes"][0]["digest"] = bad.into();
            let e = parse(&value).unwrap_err();
            assert!(matches!(e, Invalid::Json(_)), "{bad}: {e}");
            assert!(e.to_string().contains("digest"), "{bad}: {e}");
        }
    }
}
