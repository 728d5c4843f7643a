//! Full or incremental: a pure function of the facts.
//!
//! An incremental is safe only when the bitmap that recorded every write
//! since the last backup is known good on every volume, and the last
//! backup's files are there to build on. Anything else gives a full backup,
//! with a reason an operator can act on. The rules, in the order checked:
//! asked for full or incrementals off; no backup yet; no active checkpoint
//! (cleared by a restore); the last backup is not the checkpoint's; the
//! volume set changed; a volume's size or image file changed; the
//! checkpoint bitmap is missing, inconsistent, disabled or busy on a
//! volume; the chain is at its length limit; a parent file is unusable.

use std::fmt;

use crate::qemu::Volume;
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
    /// Why the last backup's files cannot be built on, if they cannot.
    pub parent_problem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Full(FullReason),
    Incremental {
        parent: String,
        /// The bitmap holding every change since `parent`.
        checkpoint: String,
        chain: String,
        position: u32,
    },
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
    VolumeSetChanged {
        before: Vec<String>,
        now: Vec<String>,
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
    ChainLimit {
        length: u32,
        limit: u32,
    },
    ParentUnusable(String),
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
            VolumeSetChanged { before, now } => write!(
                f,
                "full: the volume set changed ([{}] -> [{}])",
                before.join(", "),
                now.join(", ")
            ),
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
            ChainLimit { length, limit } => write!(
                f,
                "full: the chain has {length} backups, its limit (--full-every {limit})"
            ),
            ParentUnusable(reason) => {
                write!(f, "full: the last backup cannot be built on: {reason}")
            }
        }
    }
}

impl Plan {
    pub fn reason(&self) -> String {
        match self {
            Plan::Full(reason) => reason.to_string(),
            Plan::Incremental {
                parent, checkpoint, ..
            } => format!("incremental: changes since {parent}, tracked by bitmap {checkpoint}"),
        }
    }
}

/// Decides full or incremental.
pub fn plan(facts: &Facts) -> Plan {
    match check(facts) {
        Ok(plan) => plan,
        Err(reason) => Plan::Full(reason),
    }
}

fn check(facts: &Facts) -> Result<Plan, FullReason> {
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

    let before: Vec<String> = last.volumes.iter().map(|v| v.name.clone()).collect();
    let now: Vec<String> = facts.volumes.iter().map(|v| v.name.clone()).collect();
    if before != now {
        return Err(VolumeSetChanged { before, now });
    }
    for (old, live) in last.volumes.iter().zip(facts.volumes) {
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
    }
    for live in facts.volumes {
        let named = |volume: &Volume| (volume.name.clone(), checkpoint.clone());
        let Some(bitmap) = live.bitmaps.iter().find(|b| &b.name == checkpoint) else {
            let (volume, bitmap) = named(live);
            return Err(BitmapMissing { volume, bitmap });
        };
        if bitmap.inconsistent {
            let (volume, bitmap) = named(live);
            return Err(BitmapInconsistent { volume, bitmap });
        }
        if !bitmap.recording {
            let (volume, bitmap) = named(live);
            return Err(BitmapDisabled { volume, bitmap });
        }
        if bitmap.busy {
            let (volume, bitmap) = named(live);
            return Err(BitmapBusy { volume, bitmap });
        }
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
    Ok(Plan::Incremental {
        parent: last.id.clone(),
        checkpoint: checkpoint.clone(),
        chain: last.chain.clone(),
        position: last.position + 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::Bitmap;
    use crate::repo::{BackupKind, MANIFEST_SCHEMA, STATE_SCHEMA, StateVolume, VolumeRecord};

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
            bitmaps: bitmaps.iter().map(|b| bitmap(b)).collect(),
        }
    }

    fn manifest(id: &str, position: u32, volumes: &[Volume]) -> Manifest {
        Manifest {
            schema: MANIFEST_SCHEMA,
            id: id.into(),
            vm: "vm".into(),
            seq: u64::from(position) + 1,
            kind: if position == 0 {
                BackupKind::Full
            } else {
                BackupKind::Incremental
            },
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
                    file: String::new(),
                    backing: None,
                    bytes_written: 0,
                    digest: String::new(),
                })
                .collect(),
            qemu_version: None,
        }
    }

    fn state(last: &str, volumes: &[Volume]) -> VmState {
        VmState {
            schema: STATE_SCHEMA,
            vm: "vm".into(),
            active_checkpoint: Some(format!("bitback-{last}")),
            last_backup: Some(last.into()),
            volumes: volumes.iter().map(StateVolume::from).collect(),
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
        parent_problem: Option<String>,
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
                parent_problem: None,
            }
        }

        fn plan(&self) -> Plan {
            plan(&Facts {
                policy: &self.policy,
                state: self.state.as_ref(),
                last: self.last.as_ref(),
                volumes: &self.volumes,
                parent_problem: self.parent_problem.clone(),
            })
        }

        fn full(&self) -> FullReason {
            match self.plan() {
                Plan::Full(reason) => reason,
                other => panic!("expected full, got {other:?}"),
            }
        }

        fn bitmap(&mut self, volume: usize) -> &mut Bitmap {
            self.volumes[volume]
                .bitmaps
                .iter_mut()
                .find(|b| b.name == "bitback-b3")
                .unwrap()
        }
    }

    #[test]
    fn good_parent_gives_incremental() {
        assert_eq!(
            World::good().plan(),
            Plan::Incremental {
                parent: "b3".into(),
                checkpoint: "bitback-b3".into(),
                chain: "c0".into(),
                position: 3,
            }
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
    fn volume_added_removed_renamed_or_reordered() {
        let mut w = World::good();
        w.volumes.push(volume("disk2", GIB, &["bitback-b3"]));
        assert!(matches!(w.full(), FullReason::VolumeSetChanged { .. }));
        let mut w = World::good();
        w.volumes.pop();
        assert!(matches!(w.full(), FullReason::VolumeSetChanged { .. }));
        let mut w = World::good();
        w.volumes.swap(0, 1);
        assert!(matches!(w.full(), FullReason::VolumeSetChanged { .. }));
        let mut w = World::good();
        w.volumes[1].name = "data".into();
        assert_eq!(
            w.full().to_string(),
            "full: the volume set changed ([disk0, disk1] -> [disk0, data])"
        );
    }

    #[test]
    fn resized_volume() {
        let mut w = World::good();
        w.volumes[1].virtual_size = 2 * GIB;
        assert_eq!(
            w.full().to_string(),
            "full: volume disk1 was resized (1 GiB -> 2 GiB)"
        );
    }

    #[test]
    fn image_file_changed() {
        let mut w = World::good();
        w.volumes[0].image_file = "/vms/disk0-snap.qcow2".into();
        assert!(matches!(w.full(), FullReason::ImageChanged { .. }));
    }

    #[test]
    fn bitmap_missing_inconsistent_disabled_busy() {
        let mut w = World::good();
        w.volumes[1].bitmaps.retain(|b| b.name != "bitback-b3");
        assert_eq!(
            w.full(),
            FullReason::BitmapMissing {
                volume: "disk1".into(),
                bitmap: "bitback-b3".into()
            }
        );
        let mut w = World::good();
        w.bitmap(0).inconsistent = true;
        assert!(matches!(w.full(), FullReason::BitmapInconsistent { .. }));
        let mut w = World::good();
        w.bitmap(1).recording = false;
        assert!(matches!(w.full(), FullReason::BitmapDisabled { .. }));
        let mut w = World::good();
        w.bitmap(0).busy = true;
        assert!(matches!(w.full(), FullReason::BitmapBusy { .. }));
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
        assert!(matches!(w.plan(), Plan::Incremental { position: 3, .. }));
    }

    #[test]
    fn parent_unusable() {
        let mut w = World::good();
        w.parent_problem = Some("vm/b3/disk0.qcow2 is missing".into());
        assert!(matches!(w.full(), FullReason::ParentUnusable(_)));
    }

    #[test]
    fn rules_in_combination_report_the_first_in_order() {
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
        w.policy.full_every = Some(2);
        // A resize is reported before the missing bitmap it also caused.
        assert!(matches!(w.full(), FullReason::Resized { .. }));
        w.volumes[0].virtual_size -= GIB;
        assert!(matches!(w.full(), FullReason::BitmapMissing { .. }));
        w.volumes[1].bitmaps.push(bitmap("bitback-b3"));
        assert!(matches!(w.full(), FullReason::ChainLimit { .. }));
        w.policy.full_every = None;
        assert!(matches!(w.full(), FullReason::ParentUnusable(_)));
        w.parent_problem = None;
        assert!(matches!(w.plan(), Plan::Incremental { .. }));
    }

    #[test]
    fn every_single_fault_forces_full() {
        // Each fault alone, over every volume: never an incremental.
        type Fault = fn(&mut World, usize);
        let faults: &[Fault] = &[
            |w, i| w.volumes[i].virtual_size += 512,
            |w, i| w.volumes[i].image_file.push('x'),
            |w, i| w.volumes[i].name.push('x'),
            |w, i| w.volumes[i].bitmaps.clear(),
            |w, i| w.bitmap(i).inconsistent = true,
            |w, i| w.bitmap(i).recording = false,
            |w, i| w.bitmap(i).busy = true,
        ];
        for (n, fault) in faults.iter().enumerate() {
            for i in 0..2 {
                let mut w = World::good();
                fault(&mut w, i);
                assert!(matches!(w.plan(), Plan::Full(_)), "fault {n} on volume {i}");
            }
        }
    }
}
