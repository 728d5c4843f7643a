//! Full or incremental, decided per volume: a pure function of the facts.
//!
//! An incremental of a volume is safe only when the bitmap that recorded
//! every write to it since the last backup is known good, and the last
//! backup's file of that volume is there to build on. Anything else gives
//! a full of that volume, with a reason an operator can act on; the other
//! volumes stay incremental. A point is still one transaction across all
//! volumes, so every volume of it is the same instant.
//!
//! Rules for the whole point, in the order checked (each makes every
//! volume full): asked for full or incrementals off; no backup yet; no
//! active checkpoint (cleared by a restore); the last backup is not the
//! checkpoint's; the backup's encryption differs from the last one's; the
//! chain is at its length limit; the last backup's files are unusable.
//! Then, per volume: new since the last backup; resized; its image file
//! changed; its checkpoint bitmap is missing (for an image that keeps its
//! bitmap in QEMU's memory only: QEMU restarted), inconsistent, disabled or
//! busy. A point where every volume is full starts a new chain.
//!
//! A volume whose only fault is its bitmap (lost with QEMU, missing,
//! inconsistent, not recording, busy) is an incremental by content when
//! its last backup's chain has cluster maps that verify
//! ([`Facts::content`]): it is read whole, and only clusters whose content
//! differs are stored.

use std::collections::BTreeMap;
use std::fmt;

use crate::qemu::{DiskKind, Tracking, Volume};
use crate::repo::{Manifest, VmState};

/// What the operator asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub force_full: bool,
    /// A chain is a full plus at most N-1 incrementals; 1 turns
    /// incrementals off; `None` lets chains grow without limit.
    pub full_every: Option<u32>,
    /// The VM under this name is a new machine (`--vm-replaced`).
    pub replaced: bool,
}

/// Everything the decision depends on.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    pub policy: &'a Policy,
    pub state: Option<&'a VmState>,
    /// The newest committed backup of the VM.
    pub last: Option<&'a Manifest>,
    /// The volumes to back up now, in order, with their bitmaps.
    pub volumes: &'a [Volume],
    /// Whether this backup's files are encrypted.
    pub encrypted: bool,
    /// Why the last backup cannot be built on at all, if it cannot.
    pub parent_problem: Option<String>,
    /// Volumes of the last backup whose own files cannot be built on, and
    /// why: each of them alone takes a full.
    pub parent_volume_problems: &'a BTreeMap<String, String>,
    /// Per volume, whether its changes can be found by content (the last
    /// backup's chain has cluster maps that verify, and this run writes
    /// the files), or why not. A volume not named is not asked about.
    pub content: &'a BTreeMap<String, Result<(), String>>,
}

/// The decision for one point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// What the incremental volumes build on; `None` when every volume is
    /// full (the point starts a chain).
    pub base: Option<Base>,
    /// One decision per volume, in the order of [`Facts::volumes`].
    pub volumes: Vec<VolumePlan>,
}

/// The backup an incremental point builds on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub parent: String,
    /// The bitmap holding every change since `parent`.
    pub checkpoint: String,
    pub chain: String,
    /// This point's position in the chain.
    pub position: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePlan {
    pub volume: String,
    pub decision: Decision,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Full(FullReason),
    Incremental,
    /// The bitmap is lost (why): the volume is read whole and only the
    /// clusters whose content differs from the last backup's are stored.
    Content(FullReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FullReason {
    Requested,
    Replaced,
    IncrementalsOff,
    NoBackup,
    NoCheckpoint,
    LastBackupNotCheckpoint {
        last: String,
        state_last: Option<String>,
    },
    EncryptionChanged {
        now: bool,
    },
    ChainLimit {
        length: u32,
        limit: u32,
    },
    ParentUnusable(String),
    ParentFileUnusable {
        volume: String,
        problem: String,
    },
    NewVolume {
        volume: String,
        parent: String,
    },
    Resized {
        volume: String,
        before: u64,
        now: u64,
    },
    ImageChanged {
        volume: String,
        before: String,
        now: String,
    },
    BitmapMissing {
        volume: String,
        bitmap: String,
    },
    /// A bitmap kept in memory only is gone: QEMU restarted.
    MemoryBitmapLost {
        volume: String,
        kind: DiskKind,
    },
    BitmapInconsistent {
        volume: String,
        bitmap: String,
    },
    BitmapDisabled {
        volume: String,
        bitmap: String,
    },
    BitmapBusy {
        volume: String,
        bitmap: String,
    },
    /// A lost bitmap, and no incremental by content either.
    NoContent {
        lost: Box<FullReason>,
        why: String,
    },
}

impl FullReason {
    /// Whether the volume is full only because its bitmap cannot be used
    /// (its changes could still be found by content).
    pub fn is_bitmap_loss(&self) -> bool {
        use FullReason::*;
        matches!(
            self,
            MemoryBitmapLost { .. }
                | BitmapMissing { .. }
                | BitmapInconsistent { .. }
                | BitmapDisabled { .. }
                | BitmapBusy { .. }
        )
    }

    /// The reason without its leading "full: ".
    fn lost_text(&self) -> String {
        let text = self.to_string();
        text.strip_prefix("full: ").unwrap_or(&text).to_string()
    }
}

fn size(n: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    if n % GIB == 0 {
        format!("{} GiB", n / GIB)
    } else if n % MIB == 0 {
        format!("{} MiB", n / MIB)
    } else {
        format!("{n} bytes")
    }
}

impl fmt::Display for FullReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use FullReason::*;
        match self {
            Requested => write!(f, "full: requested (--full)"),
            Replaced => write!(
                f,
                "full: the vm was replaced by another machine (--vm-replaced)"
            ),
            IncrementalsOff => write!(f, "full: incrementals are off (--full-every 1)"),
            NoBackup => write!(f, "full: no earlier backup of this vm"),
            NoCheckpoint => write!(
                f,
                "full: no active checkpoint (first backup, or the vm was restored)"
            ),
            LastBackupNotCheckpoint { last, state_last } => write!(
                f,
                "full: the newest backup {last} is not the one the checkpoint belongs to ({})",
                state_last.as_deref().unwrap_or("none")
            ),
            EncryptionChanged { now: true } => write!(
                f,
                "full: backups are encrypted from now on (the last one was not)"
            ),
            EncryptionChanged { now: false } => {
                write!(f, "full: the last backup was encrypted and this one is not")
            }
            ChainLimit { length, limit } => write!(
                f,
                "full: the chain has {length} backups, its limit (--full-every {limit})"
            ),
            ParentUnusable(reason) => {
                write!(f, "full: the last backup cannot be built on: {reason}")
            }
            ParentFileUnusable { volume, problem } => write!(
                f,
                "full: the last backup's files of volume {volume} cannot be built on: {problem}"
            ),
            NewVolume { volume, parent } => {
                write!(f, "full: volume {volume} is new (not in backup {parent})")
            }
            Resized {
                volume,
                before,
                now,
            } => write!(
                f,
                "full: volume {volume} was resized ({} -> {})",
                size(*before),
                size(*now)
            ),
            ImageChanged {
                volume,
                before,
                now,
            } => write!(
                f,
                "full: volume {volume} now uses image {now} (was {before}; an external snapshot?)"
            ),
            BitmapMissing { volume, bitmap } => write!(
                f,
                "full: checkpoint bitmap {bitmap} is missing on volume {volume}"
            ),
            MemoryBitmapLost { volume, kind } => {
                write!(
                    f,
                    "full: volume {volume} is a {}: changes are tracked in memory only, and QEMU restarted",
                    kind.describe()
                )?;
                match kind.hint() {
                    Some(hint) => write!(f, " ({hint})"),
                    None => Ok(()),
                }
            }
            BitmapInconsistent { volume, bitmap } => write!(
                f,
                "full: checkpoint bitmap {bitmap} on volume {volume} is inconsistent (QEMU stopped without closing the image)"
            ),
            BitmapDisabled { volume, bitmap } => write!(
                f,
                "full: checkpoint bitmap {bitmap} on volume {volume} is not recording"
            ),
            BitmapBusy { volume, bitmap } => write!(
                f,
                "full: checkpoint bitmap {bitmap} on volume {volume} is busy (used by another job)"
            ),
            NoContent { lost, why } => write!(f, "{lost}; not by content: {why}"),
        }
    }
}

impl Plan {
    /// Every volume full for one reason.
    fn all_full(volumes: &[Volume], reason: FullReason) -> Plan {
        Plan {
            base: None,
            volumes: volumes
                .iter()
                .map(|v| VolumePlan {
                    volume: v.name.clone(),
                    decision: Decision::Full(reason.clone()),
                })
                .collect(),
        }
    }

    /// True when no volume builds on an earlier backup.
    pub fn is_full(&self) -> bool {
        self.base.is_none()
    }

    /// One volume's decision, as text.
    pub fn volume_reason(&self, index: usize) -> String {
        match (&self.volumes[index].decision, &self.base) {
            (Decision::Full(reason), _) => reason.to_string(),
            (Decision::Incremental, Some(base)) => format!(
                "incremental: changes since {}, tracked by bitmap {}",
                base.parent, base.checkpoint
            ),
            (Decision::Incremental, None) => "incremental".into(),
            (Decision::Content(lost), Some(base)) => format!(
                "incremental by content: changes since {} found by reading the volume whole ({})",
                base.parent,
                lost.lost_text()
            ),
            (Decision::Content(lost), None) => {
                format!("incremental by content ({})", lost.lost_text())
            }
        }
    }

    /// The point's decision, as text: the shared reason when every volume
    /// has the same, else the incremental base and which volumes are full.
    pub fn reason(&self) -> String {
        let reasons: Vec<String> = (0..self.volumes.len())
            .map(|i| self.volume_reason(i))
            .collect();
        if reasons.windows(2).all(|w| w[0] == w[1])
            && let Some(first) = reasons.first()
        {
            return first.clone();
        }
        let fulls: Vec<String> = self
            .volumes
            .iter()
            .filter_map(|v| match &v.decision {
                Decision::Full(r) => Some(format!("{} ({})", v.volume, r)),
                Decision::Incremental | Decision::Content(_) => None,
            })
            .collect();
        let contents: Vec<&str> = self
            .volumes
            .iter()
            .filter(|v| matches!(v.decision, Decision::Content(_)))
            .map(|v| v.volume.as_str())
            .collect();
        match &self.base {
            Some(base) => {
                let mut parts = vec![format!(
                    "incremental: changes since {}, tracked by bitmap {}",
                    base.parent, base.checkpoint
                )];
                if !contents.is_empty() {
                    parts.push(format!(
                        "found by content on {} (bitmap lost)",
                        contents.join(", ")
                    ));
                }
                if !fulls.is_empty() {
                    parts.push(format!("full of {}", fulls.join("; ")));
                }
                parts.join("; ")
            }
            None => format!("full: every volume needs one: {}", fulls.join("; ")),
        }
    }
}

/// Decides full or incremental for each volume.
pub fn plan(facts: &Facts) -> Plan {
    let base = match check_point(facts) {
        Ok(base) => base,
        Err(reason) => return Plan::all_full(facts.volumes, reason),
    };
    let volumes: Vec<VolumePlan> = facts
        .volumes
        .iter()
        .map(|live| VolumePlan {
            volume: live.name.clone(),
            decision: match check_volume(facts, &base, live) {
                Ok(()) => Decision::Incremental,
                Err(lost) if lost.is_bitmap_loss() => match facts.content.get(&live.name) {
                    Some(Ok(())) => Decision::Content(lost),
                    Some(Err(why)) => Decision::Full(FullReason::NoContent {
                        lost: Box::new(lost),
                        why: why.clone(),
                    }),
                    None => Decision::Full(lost),
                },
                Err(reason) => Decision::Full(reason),
            },
        })
        .collect();
    let any_incremental = volumes
        .iter()
        .any(|v| matches!(v.decision, Decision::Incremental | Decision::Content(_)));
    Plan {
        base: any_incremental.then_some(base),
        volumes,
    }
}

/// The rules for the whole point; the base to build on if they pass.
fn check_point(facts: &Facts) -> Result<Base, FullReason> {
    use FullReason::*;
    let policy = facts.policy;
    if policy.force_full {
        return Err(Requested);
    }
    if policy.replaced {
        return Err(Replaced);
    }
    if policy.full_every == Some(1) {
        return Err(IncrementalsOff);
    }
    let last = facts.last.ok_or(NoBackup)?;
    let state = facts.state.ok_or(NoCheckpoint)?;
    let checkpoint = state.active_checkpoint.as_ref().ok_or(NoCheckpoint)?;
    if state.last_backup.as_deref() != Some(last.id.as_str()) || &last.checkpoint != checkpoint {
        return Err(LastBackupNotCheckpoint {
            last: last.id.clone(),
            state_last: state.last_backup.clone(),
        });
    }
    if last.encryption.is_some() != facts.encrypted {
        return Err(EncryptionChanged {
            now: facts.encrypted,
        });
    }
    if let Some(limit) = policy.full_every {
        let length = last.position + 1;
        if length >= limit {
            return Err(ChainLimit { length, limit });
        }
    }
    if let Some(problem) = &facts.parent_problem {
        return Err(ParentUnusable(problem.clone()));
    }
    Ok(Base {
        parent: last.id.clone(),
        checkpoint: checkpoint.clone(),
        chain: last.chain.clone(),
        position: last.position + 1,
    })
}

/// The rules for one volume, given a base that passed the point's rules.
fn check_volume(facts: &Facts, base: &Base, live: &Volume) -> Result<(), FullReason> {
    use FullReason::*;
    let Some(old) = facts
        .last
        .and_then(|last| last.volumes.iter().find(|v| v.name == live.name))
    else {
        return Err(NewVolume {
            volume: live.name.clone(),
            parent: base.parent.clone(),
        });
    };
    if let Some(problem) = facts.parent_volume_problems.get(&live.name) {
        return Err(ParentFileUnusable {
            volume: live.name.clone(),
            problem: problem.clone(),
        });
    }
    if old.virtual_size != live.virtual_size {
        return Err(Resized {
            volume: live.name.clone(),
            before: old.virtual_size,
            now: live.virtual_size,
        });
    }
    if old.image_file != live.image_file {
        return Err(ImageChanged {
            volume: live.name.clone(),
            before: old.image_file.clone(),
            now: live.image_file.clone(),
        });
    }
    let named = || (live.name.clone(), base.checkpoint.clone());
    let Some(bitmap) = live.bitmaps.iter().find(|b| b.name == base.checkpoint) else {
        if live.kind.tracking() == Tracking::Memory {
            return Err(MemoryBitmapLost {
                volume: live.name.clone(),
                kind: live.kind,
            });
        }
        let (volume, bitmap) = named();
        return Err(BitmapMissing { volume, bitmap });
    };
    if bitmap.inconsistent {
        let (volume, bitmap) = named();
        return Err(BitmapInconsistent { volume, bitmap });
    }
    if !bitmap.recording {
        let (volume, bitmap) = named();
        return Err(BitmapDisabled { volume, bitmap });
    }
    if bitmap.busy {
        let (volume, bitmap) = named();
        return Err(BitmapBusy { volume, bitmap });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::Bitmap;
    use crate::repo::{BackupKind, MANIFEST_SCHEMA, STATE_SCHEMA, VolumeRecord};

    const GIB: u64 = 1 << 30;

    fn bitmap(name: &str) -> Bitmap {
        Bitmap {
            name: name.into(),
            recording: true,
            busy: false,
            persistent: true,
            inconsistent: false,
            granularity: 65536,
            count: 0,
        }
    }

    fn volume(name: &str, size: u64, bitmaps: &[&str]) -> Volume {
        Volume {
            name: name.into(),
            node_name: format!("node-{name}"),
            format: "qcow2".into(),
            image_file: format!("/vms/{name}.qcow2"),
            virtual_size: size,
            read_only: false,
            backing_file: None,
            device: None,
            backend: None,
            kind: DiskKind::Qcow2,
            encrypted: false,
            bitmaps: bitmaps.iter().map(|b| bitmap(b)).collect(),
        }
    }

    fn manifest(id: &str, position: u32, volumes: &[Volume]) -> Manifest {
        let kind = if position == 0 {
            BackupKind::Full
        } else {
            BackupKind::Incremental
        };
        Manifest {
            schema: MANIFEST_SCHEMA,
            id: id.into(),
            vm: "vm".into(),
            seq: u64::from(position) + 1,
            kind,
            reason: String::new(),
            chain: "c0".into(),
            position,
            parent: (position > 0).then(|| "p".into()),
            checkpoint: format!("bitback-{id}"),
            time: String::new(),
            volumes: volumes
                .iter()
                .map(|v| VolumeRecord {
                    name: v.name.clone(),
                    node: v.node_name.clone(),
                    image_file: v.image_file.clone(),
                    format: v.format.clone(),
                    virtual_size: v.virtual_size,
                    kind,
                    reason: String::new(),
                    disk: Some(v.kind),
                    tracking: Some(v.kind.tracking()),
                    file: String::new(),
                    backing: None,
                    bytes_written: 0,
                    digest: crate::repo::Digest::Whole(blake3::Hash::from_bytes([0; 32])),
                    file_size: None,
                    guard: None,
                    cluster_map: None,
                    changes: None,
                    bytes_read: None,
                })
                .collect(),
            qemu_version: None,
            encryption: None,
        }
    }

    fn state(last: &str, volumes: &[Volume]) -> VmState {
        VmState {
            schema: STATE_SCHEMA,
            vm: "vm".into(),
            active_checkpoint: Some(format!("bitback-{last}")),
            last_backup: Some(last.into()),
            volumes: volumes
                .iter()
                .map(crate::engine::backup::state_volume)
                .collect(),
            last_seq: 0,
            identity: None,
        }
    }

    /// A VM whose last backup b3 (position 2) is a good parent.
    struct World {
        policy: Policy,
        state: Option<VmState>,
        last: Option<Manifest>,
        volumes: Vec<Volume>,
        encrypted: bool,
        parent_problem: Option<String>,
        parent_volume_problems: BTreeMap<String, String>,
        content: BTreeMap<String, Result<(), String>>,
    }

    impl World {
        fn good() -> World {
            let volumes = vec![
                volume("disk0", 10 * GIB, &["bitback-b3"]),
                volume("disk1", GIB, &["other", "bitback-b3"]),
            ];
            World {
                policy: Policy::default(),
                state: Some(state("b3", &volumes)),
                last: Some(manifest("b3", 2, &volumes)),
                volumes,
                encrypted: false,
                parent_problem: None,
                parent_volume_problems: BTreeMap::new(),
                content: BTreeMap::new(),
            }
        }

        fn plan(&self) -> Plan {
            plan(&Facts {
                policy: &self.policy,
                state: self.state.as_ref(),
                last: self.last.as_ref(),
                volumes: &self.volumes,
                encrypted: self.encrypted,
                parent_problem: self.parent_problem.clone(),
                parent_volume_problems: &self.parent_volume_problems,
                content: &self.content,
            })
        }

        /// The reason every volume is full for (the point's own rules).
        fn full(&self) -> FullReason {
            let plan = self.plan();
            assert_eq!(plan.base, None, "expected a full point, got {plan:?}");
            let reasons: Vec<&FullReason> = plan
                .volumes
                .iter()
                .map(|v| match &v.decision {
                    Decision::Full(r) => r,
                    _ => panic!("an incremental volume in {plan:?}"),
                })
                .collect();
            assert!(reasons.windows(2).all(|w| w[0] == w[1]), "{plan:?}");
            reasons[0].clone()
        }

        /// The decision for volume `i`.
        fn decision(&self, i: usize) -> Decision {
            self.plan().volumes[i].decision.clone()
        }

        fn bitmap(&mut self, volume: usize) -> &mut Bitmap {
            self.volumes[volume]
                .bitmaps
                .iter_mut()
                .find(|b| b.name == "bitback-b3")
                .unwrap()
        }
    }

    fn base() -> Base {
        Base {
            parent: "b3".into(),
            checkpoint: "bitback-b3".into(),
            chain: "c0".into(),
            position: 3,
        }
    }

    #[test]
    fn good_parent_gives_incremental_of_every_volume() {
        let plan = World::good().plan();
        assert_eq!(plan.base, Some(base()));
        assert!(
            plan.volumes
                .iter()
                .all(|v| v.decision == Decision::Incremental)
        );
        assert_eq!(
            plan.reason(),
            "incremental: changes since b3, tracked by bitmap bitback-b3"
        );
    }

    #[test]
    fn replaced_vm_is_full() {
        let mut w = World::good();
        w.policy.replaced = true;
        assert_eq!(w.full(), FullReason::Replaced);
    }

    #[test]
    fn requested_full() {
        let mut w = World::good();
        w.policy.force_full = true;
        assert_eq!(w.full(), FullReason::Requested);
        assert_eq!(w.full().to_string(), "full: requested (--full)");
        assert_eq!(w.plan().reason(), "full: requested (--full)");
    }

    #[test]
    fn incrementals_off() {
        let mut w = World::good();
        w.policy.full_every = Some(1);
        assert_eq!(w.full(), FullReason::IncrementalsOff);
    }

    #[test]
    fn no_backup() {
        let mut w = World::good();
        w.last = None;
        assert_eq!(w.full(), FullReason::NoBackup);
    }

    #[test]
    fn no_state_or_cleared_checkpoint() {
        let mut w = World::good();
        w.state = None;
        assert_eq!(w.full(), FullReason::NoCheckpoint);
        let mut w = World::good();
        w.state.as_mut().unwrap().active_checkpoint = None;
        assert_eq!(w.full(), FullReason::NoCheckpoint);
    }

    #[test]
    fn last_backup_is_not_the_checkpoints() {
        let mut w = World::good();
        w.last.as_mut().unwrap().id = "b4".into();
        assert!(matches!(
            w.full(),
            FullReason::LastBackupNotCheckpoint { .. }
        ));
        let mut w = World::good();
        w.last.as_mut().unwrap().checkpoint = "bitback-b4".into();
        assert!(matches!(
            w.full(),
            FullReason::LastBackupNotCheckpoint { .. }
        ));
    }

    #[test]
    fn encryption_changed_either_way() {
        let mut w = World::good();
        w.encrypted = true;
        assert_eq!(w.full(), FullReason::EncryptionChanged { now: true });
        let mut w = World::good();
        w.last.as_mut().unwrap().encryption = Some(crate::repo::Encryption::Luks);
        assert_eq!(w.full(), FullReason::EncryptionChanged { now: false });
        w.encrypted = true;
        assert_eq!(w.plan().base, Some(base()));
    }

    #[test]
    fn a_new_volume_is_a_full_of_that_volume_only() {
        let mut w = World::good();
        w.volumes.push(volume("disk2", GIB, &[]));
        let plan = w.plan();
        assert_eq!(plan.base, Some(base()));
        assert_eq!(plan.volumes[0].decision, Decision::Incremental);
        assert_eq!(plan.volumes[1].decision, Decision::Incremental);
        assert_eq!(
            plan.volume_reason(2),
            "full: volume disk2 is new (not in backup b3)"
        );
        assert_eq!(
            plan.reason(),
            "incremental: changes since b3, tracked by bitmap bitback-b3; full of disk2 (full: volume disk2 is new (not in backup b3))"
        );
    }

    #[test]
    fn a_removed_or_reordered_volume_keeps_the_others_incremental() {
        let mut w = World::good();
        w.volumes.pop();
        assert_eq!(w.plan().base, Some(base()));
        assert_eq!(w.decision(0), Decision::Incremental);
        let mut w = World::good();
        w.volumes.swap(0, 1);
        assert!(
            w.plan()
                .volumes
                .iter()
                .all(|v| v.decision == Decision::Incremental)
        );
        // A renamed volume is a new one.
        let mut w = World::good();
        w.volumes[1].name = "data".into();
        assert_eq!(w.decision(0), Decision::Incremental);
        assert!(matches!(
            w.decision(1),
            Decision::Full(FullReason::NewVolume { .. })
        ));
    }

    #[test]
    fn resized_volume() {
        let mut w = World::good();
        w.volumes[1].virtual_size = 2 * GIB;
        assert_eq!(w.decision(0), Decision::Incremental);
        assert_eq!(
            w.plan().volume_reason(1),
            "full: volume disk1 was resized (1 GiB -> 2 GiB)"
        );
    }

    #[test]
    fn image_file_changed() {
        let mut w = World::good();
        w.volumes[0].image_file = "/vms/disk0-snap.qcow2".into();
        assert!(matches!(
            w.decision(0),
            Decision::Full(FullReason::ImageChanged { .. })
        ));
        assert_eq!(w.decision(1), Decision::Incremental);
    }

    #[test]
    fn bitmap_missing_inconsistent_disabled_busy() {
        let mut w = World::good();
        w.volumes[1].bitmaps.retain(|b| b.name != "bitback-b3");
        assert_eq!(
            w.decision(1),
            Decision::Full(FullReason::BitmapMissing {
                volume: "disk1".into(),
                bitmap: "bitback-b3".into()
            })
        );
        assert_eq!(w.decision(0), Decision::Incremental);
        let mut w = World::good();
        w.bitmap(0).inconsistent = true;
        assert!(matches!(
            w.decision(0),
            Decision::Full(FullReason::BitmapInconsistent { .. })
        ));
        let mut w = World::good();
        w.bitmap(1).recording = false;
        assert!(matches!(
            w.decision(1),
            Decision::Full(FullReason::BitmapDisabled { .. })
        ));
        let mut w = World::good();
        w.bitmap(0).busy = true;
        assert!(matches!(
            w.decision(0),
            Decision::Full(FullReason::BitmapBusy { .. })
        ));
    }

    #[test]
    fn memory_tracked_volumes_say_why_after_a_restart() {
        for (kind, text) in [
            (
                DiskKind::RawFile,
                "full: volume disk1 is a raw image: changes are tracked in memory only, and QEMU restarted",
            ),
            (
                DiskKind::RawDevice,
                "full: volume disk1 is a raw block device: changes are tracked in memory only, and QEMU restarted",
            ),
            (
                DiskKind::Qcow2V2,
                "full: volume disk1 is a qcow2 v2 image: changes are tracked in memory only, and QEMU restarted (`qemu-img amend -f qcow2 -o compat=1.1 IMAGE` (VM stopped) lets it keep a persistent bitmap)",
            ),
        ] {
            let mut w = World::good();
            w.volumes[1].kind = kind;
            // While its QEMU lives, the memory bitmap serves.
            assert_eq!(w.decision(1), Decision::Incremental, "{kind:?}");
            w.volumes[1].bitmaps.clear();
            assert_eq!(w.plan().volume_reason(1), text);
            assert_eq!(w.decision(0), Decision::Incremental);
        }
    }

    #[test]
    fn every_volume_full_for_its_own_reason_starts_a_chain() {
        let mut w = World::good();
        w.volumes[0].virtual_size += GIB;
        w.volumes[1].bitmaps.clear();
        let plan = w.plan();
        assert_eq!(plan.base, None);
        assert!(plan.is_full());
        assert_eq!(
            plan.reason(),
            "full: every volume needs one: disk0 (full: volume disk0 was resized (10 GiB -> 11 GiB)); disk1 (full: checkpoint bitmap bitback-b3 is missing on volume disk1)"
        );
    }

    #[test]
    fn chain_limit() {
        // b3 is at position 2: the chain holds 3 backups.
        let mut w = World::good();
        w.policy.full_every = Some(3);
        assert_eq!(
            w.full(),
            FullReason::ChainLimit {
                length: 3,
                limit: 3
            }
        );
        w.policy.full_every = Some(4);
        assert_eq!(w.plan().base.map(|b| b.position), Some(3));
    }

    #[test]
    fn parent_unusable() {
        let mut w = World::good();
        w.parent_problem = Some("vm/b3/disk0.qcow2 is missing".into());
        assert!(matches!(w.full(), FullReason::ParentUnusable(_)));
    }

    #[test]
    fn a_parent_file_problem_is_that_volumes_alone_and_said() {
        let mut w = World::good();
        w.parent_volume_problems
            .insert("disk1".into(), "vm/b3/disk1.qcow2: bad magic".into());
        let plan = w.plan();
        assert_eq!(plan.volumes[0].decision, Decision::Incremental);
        assert_eq!(
            plan.volumes[1].decision,
            Decision::Full(FullReason::ParentFileUnusable {
                volume: "disk1".into(),
                problem: "vm/b3/disk1.qcow2: bad magic".into()
            })
        );
        assert!(
            plan.volume_reason(1)
                .contains("vm/b3/disk1.qcow2: bad magic"),
            "{}",
            plan.volume_reason(1)
        );
        // Both damaged: every volume full, a new chain.
        w.parent_volume_problems
            .insert("disk0".into(), "vm/b3/disk0.qcow2: missing".into());
        assert_eq!(w.plan().base, None);
        // A volume new since the last backup has no parent file to blame.
        w.parent_volume_problems.clear();
        w.parent_volume_problems
            .insert("disk2".into(), "not a volume of the last backup".into());
        assert_eq!(w.plan().volumes[1].decision, Decision::Incremental);
    }

    #[test]
    fn point_rules_come_before_volume_rules_and_in_order() {
        // Everything wrong at once: the request wins.
        let mut w = World::good();
        w.policy.force_full = true;
        w.policy.full_every = Some(1);
        w.volumes[0].virtual_size += GIB;
        w.volumes[1].bitmaps.clear();
        w.parent_problem = Some("x".into());
        assert_eq!(w.full(), FullReason::Requested);
        w.policy.force_full = false;
        assert_eq!(w.full(), FullReason::IncrementalsOff);
        w.policy.full_every = Some(3);
        assert!(matches!(w.full(), FullReason::ChainLimit { .. }));
        w.policy.full_every = None;
        assert!(matches!(w.full(), FullReason::ParentUnusable(_)));
        w.parent_problem = None;
        // Now each volume for its own reason.
        assert!(matches!(
            w.decision(0),
            Decision::Full(FullReason::Resized { .. })
        ));
        assert!(matches!(
            w.decision(1),
            Decision::Full(FullReason::BitmapMissing { .. })
        ));
        // A resize is reported before the missing bitmap it also caused.
        w.volumes[0].bitmaps.clear();
        assert!(matches!(
            w.decision(0),
            Decision::Full(FullReason::Resized { .. })
        ));
        w.volumes[0].virtual_size -= GIB;
        w.volumes[0].bitmaps.push(bitmap("bitback-b3"));
        assert_eq!(w.decision(0), Decision::Incremental);
        assert_eq!(w.plan().base, Some(base()));
    }

    #[test]
    fn every_single_fault_makes_that_volume_full_and_only_it() {
        // Each fault alone, over every volume: never an incremental of
        // the faulty volume, always one of the other.
        type Fault = fn(&mut World, usize);
        let faults: &[Fault] = &[
            |w, i| w.volumes[i].virtual_size += 512,
            |w, i| w.volumes[i].image_file.push('x'),
            |w, i| w.volumes[i].name.push('x'),
            |w, i| w.volumes[i].bitmaps.clear(),
            |w, i| w.bitmap(i).inconsistent = true,
            |w, i| w.bitmap(i).recording = false,
            |w, i| w.bitmap(i).busy = true,
            |w, i| {
                w.volumes[i].kind = DiskKind::RawFile;
                w.volumes[i].bitmaps.clear()
            },
            |w, i| {
                let name = w.volumes[i].name.clone();
                w.parent_volume_problems
                    .insert(name, "vm/b3/x.qcow2: bad magic".into());
            },
        ];
        for (n, fault) in faults.iter().enumerate() {
            for i in 0..2 {
                let mut w = World::good();
                fault(&mut w, i);
                let plan = w.plan();
                assert!(
                    matches!(plan.volumes[i].decision, Decision::Full(_)),
                    "fault {n} on volume {i}"
                );
                assert_eq!(
                    plan.volumes[1 - i].decision,
                    Decision::Incremental,
                    "fault {n} on volume {i}"
                );
                assert_eq!(plan.base, Some(base()), "fault {n} on volume {i}");
            }
        }
    }

    #[test]
    fn a_lost_bitmap_is_found_by_content_where_the_maps_allow() {
        let mut w = World::good();
        w.volumes[0].bitmaps.clear();
        w.bitmap(1).inconsistent = true;
        // Not asked about: full, as before.
        assert!(matches!(
            w.decision(0),
            Decision::Full(FullReason::BitmapMissing { .. })
        ));
        w.content.insert("disk0".into(), Ok(()));
        w.content
            .insert("disk1".into(), Err("its file has no cluster map".into()));
        let plan = w.plan();
        assert!(matches!(
            plan.volumes[0].decision,
            Decision::Content(FullReason::BitmapMissing { .. })
        ));
        assert!(matches!(
            &plan.volumes[1].decision,
            Decision::Full(FullReason::NoContent { lost, .. })
                if matches!(**lost, FullReason::BitmapInconsistent { .. })
        ));
        assert_eq!(plan.base.as_ref().map(|b| b.parent.as_str()), Some("b3"));
        assert!(
            plan.volume_reason(0)
                .starts_with("incremental by content: changes since b3"),
            "{}",
            plan.volume_reason(0)
        );
        assert!(
            plan.volume_reason(1)
                .ends_with("not by content: its file has no cluster map"),
            "{}",
            plan.volume_reason(1)
        );
        assert!(
            plan.reason().contains("found by content on disk0"),
            "{}",
            plan.reason()
        );
        // A resize is never found by content.
        w.volumes[0].virtual_size += GIB;
        assert!(matches!(
            w.decision(0),
            Decision::Full(FullReason::Resized { .. })
        ));
    }
}
