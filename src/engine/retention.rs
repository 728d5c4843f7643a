//! Retention: pruning whole backups and consolidating long chains.
//!
//! Prune deletes only backups no kept backup depends on: keeping a backup
//! keeps every ancestor it needs. A backup is deleted by renaming its
//! directory to `.<id>.deleting` (one atomic step, after which no reader
//! sees it) and then removing it; a crash leaves a `.deleting` directory
//! that the next prune or consolidation removes.
//!
//! Consolidation shortens a chain F, I1, ..., In to at most L files by
//! turning Ik (k = n + 1 - L) into a full: the point Ik is written aside as
//! standalone qcow2 files in `.<Ik>.consolidating/` with a full manifest,
//! synced, and swapped with `<Ik>/` in one `renameat2(RENAME_EXCHANGE)`.
//! I(k+1) keeps its backing name `../<Ik>/<volume>.qcow2`, whose guest view
//! is unchanged, so the link it needs never breaks; F .. I(k-1) are then
//! deleted as by prune. At every instant every point is restorable: before
//! the swap nothing changed, after it Ik is a full with the same contents,
//! and the old backups stay whole until their rename.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use serde::Serialize;
use tracing::info;

use crate::digest::file as digest_file;
use crate::repo::{self, BackupKind, Manifest, Repo, VmLock, VolumeRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The newest N chains.
    Chains(usize),
    /// The newest N backups, and whatever they build on.
    Last(usize),
    /// By the calendar (and whatever the kept build on).
    Calendar(Calendar),
}

/// Retention by the calendar, as restic and Proxmox Backup Server mean
/// it: `last` keeps the newest N backups; `daily` keeps, for each of the
/// N newest days that have backups, the newest backup of that day; and
/// so for hours, ISO weeks (Monday to Sunday), months and years. A
/// backup any rule keeps is kept, with what it builds on. Periods are in
/// UTC, by the time each manifest records; a backup whose time cannot be
/// read is kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calendar {
    pub last: usize,
    pub hourly: usize,
    pub daily: usize,
    pub weekly: usize,
    pub monthly: usize,
    pub yearly: usize,
}

impl Calendar {
    /// Whether it keeps nothing at all.
    fn is_empty(&self) -> bool {
        *self == Calendar::default()
    }

    /// The ids of `backups` (oldest first) the rules name, before their
    /// chains are added.
    fn named<'a>(&self, backups: &'a [Manifest]) -> BTreeSet<&'a str> {
        type Period = fn(&crate::repo::time::Utc) -> (i64, u32, u32, u32);
        let rules: [(usize, Period); 5] = [
            (self.hourly, |t| (t.year, t.month, t.day, t.hour)),
            (self.daily, |t| (t.year, t.month, t.day, 0)),
            (self.weekly, |t| {
                let (year, week) = t.iso_week();
                (year, week, 0, 0)
            }),
            (self.monthly, |t| (t.year, t.month, 0, 0)),
            (self.yearly, |t| (t.year, 0, 0, 0)),
        ];
        let mut kept: BTreeSet<&str> = backups
            .iter()
            .rev()
            .take(self.last)
            .map(|m| m.id.as_str())
            .collect();
        for (count, period) in rules {
            let mut seen = 0;
            let mut last = None;
            for m in backups.iter().rev() {
                if seen == count {
                    break;
                }
                let Some(t) = crate::repo::time::Utc::parse_rfc3339(&m.time) else {
                    continue;
                };
                let p = period(&t);
                if last != Some(p) {
                    kept.insert(m.id.as_str());
                    seen += 1;
                    last = Some(p);
                }
            }
        }
        // No period can be told: kept.
        kept.extend(
            backups
                .iter()
                .filter(|m| crate::repo::time::Utc::parse_rfc3339(&m.time).is_none())
                .map(|m| m.id.as_str()),
        );
        kept
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Retention {
    pub deleted: Vec<String>,
    pub kept: Vec<String>,
    /// Backups turned into fulls by consolidation.
    pub consolidated: Vec<String>,
    /// Of those kept, the ones `keep` would have deleted, kept because an
    /// object lock holds them (in a bucket), and until when.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub locked: Vec<Locked>,
    /// Nothing was deleted: `deleted` is what would have been.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// A backup an object lock keeps.
#[derive(Debug, Clone, Serialize)]
pub struct Locked {
    pub backup: String,
    /// The latest retain-until date among its objects (RFC 3339).
    pub until: String,
}

/// `m` and the backups it builds on, newest first. Stops at a loop, which
/// [`check_links`] refuses before any decision is made.
pub(super) fn ancestors<'a>(backups: &'a [Manifest], m: &'a Manifest) -> Vec<&'a str> {
    let mut out = vec![m.id.as_str()];
    let mut current = m;
    while let Some(parent) = &current.parent {
        if out.contains(&parent.as_str()) {
            break;
        }
        match backups.iter().find(|b| &b.id == parent) {
            Some(p) => {
                out.push(p.id.as_str());
                current = p;
            }
            None => break,
        }
    }
    out
}

/// Refuses parent links that loop: a repository bitback wrote has none.
pub(super) fn check_links(backups: &[Manifest]) -> anyhow::Result<()> {
    for m in backups {
        let mut seen = BTreeSet::from([m.id.as_str()]);
        let mut current = m;
        while let Some(parent) = &current.parent {
            if !seen.insert(parent.as_str()) {
                bail!(
                    "backup {}'s chain loops through {parent}: the manifests were changed by hand or tampered with; nothing was deleted",
                    m.id
                );
            }
            match backups.iter().find(|b| &b.id == parent) {
                Some(p) => current = p,
                None => break,
            }
        }
    }
    Ok(())
}

/// The ids of `backups` (oldest first) that `keep` keeps, with every
/// backup they build on.
pub(super) fn keep_set<'a>(
    backups: &'a [Manifest],
    keep: Keep,
) -> anyhow::Result<BTreeSet<&'a str>> {
    let mut kept: BTreeSet<&str> = BTreeSet::new();
    match keep {
        Keep::Chains(0) | Keep::Last(0) => bail!("keeping nothing is not pruning; keep at least 1"),
        Keep::Calendar(c) if c.is_empty() => {
            bail!("keeping nothing is not pruning; keep at least 1")
        }
        Keep::Calendar(c) => {
            for id in c.named(backups) {
                if let Some(m) = backups.iter().find(|m| m.id == id) {
                    kept.extend(ancestors(backups, m));
                }
            }
        }
        Keep::Chains(n) => {
            // A chain is named by its full, found by following parents
            // (not by the `chain` field a manifest may carry stale).
            let root = |m: &'a Manifest| ancestors(backups, m).last().copied().unwrap_or("");
            let mut chains: Vec<&str> = Vec::new();
            for m in backups.iter().rev() {
                if !chains.contains(&root(m)) {
                    chains.push(root(m));
                }
            }
            chains.truncate(n);
            for m in backups {
                if chains.contains(&root(m)) {
                    kept.extend(ancestors(backups, m));
                }
            }
        }
        Keep::Last(n) => {
            for m in backups.iter().rev().take(n) {
                kept.extend(ancestors(backups, m));
            }
        }
    }
    Ok(kept)
}

/// What [`prune`] would delete and keep, decided as it decides; nothing
/// is changed and no lock taken.
pub fn prune_plan(repo: &Repo, vm: &str, keep: Keep) -> anyhow::Result<Retention> {
    let backups = repo.backups(vm)?;
    check_links(&backups)?;
    let kept = keep_set(&backups, keep)?;
    let (keep, drop): (Vec<&Manifest>, Vec<&Manifest>) =
        backups.iter().partition(|m| kept.contains(m.id.as_str()));
    Ok(Retention {
        kept: keep.iter().map(|m| m.id.clone()).collect(),
        deleted: drop.iter().map(|m| m.id.clone()).collect(),
        dry_run: true,
        ..Retention::default()
    })
}

/// Deletes every backup that neither `keep` nor a kept backup needs.
pub fn prune(repo: &Repo, lock: &VmLock, keep: Keep) -> anyhow::Result<Retention> {
    let vm = lock.vm();
    let _readers = lock_readers(repo, lock, "prune")?;
    repo.clean_leftovers(lock, vm)?;
    let backups = renumber(repo, lock)?;
    let kept = keep_set(&backups, keep)?;
    let mut report = Retention::default();
    // Newest first: a crash never leaves a kept backup without its parent.
    for m in backups.iter().rev() {
        if kept.contains(m.id.as_str()) {
            report.kept.push(m.id.clone());
        } else {
            repo.delete_backup(lock, vm, &m.id)?;
            info!(vm, backup = %m.id, "pruned");
            report.deleted.push(m.id.clone());
        }
    }
    report.kept.reverse();
    report.deleted.reverse();
    Ok(report)
}

/// Makes every chain at most `max_chain` backups long.
pub fn consolidate(repo: &Repo, lock: &VmLock, max_chain: u32) -> anyhow::Result<Retention> {
    let vm = lock.vm();
    if max_chain == 0 {
        bail!("--max-chain must be at least 1");
    }
    let _readers = lock_readers(repo, lock, "consolidate")?;
    repo.clean_leftovers(lock, vm)?;
    let mut report = Retention::default();
    loop {
        let backups = renumber(repo, lock)?;
        // The deepest backup, by the parent links themselves (not the
        // stored numbers): one rewrite shortens its whole chain.
        let Some((deep, path)) = backups
            .iter()
            .map(|m| (m, ancestors(&backups, m)))
            .filter(|(_, path)| path.len() > max_chain as usize)
            .max_by_key(|(_, path)| path.len())
        else {
            break;
        };
        let new_full = path[max_chain as usize - 1];
        let new_full = backups
            .iter()
            .find(|m| m.id == new_full)
            .with_context(|| format!("backup {} lost its chain", deep.id))?
            .clone();
        let older: Vec<String> = ancestors(&backups, &new_full)
            .into_iter()
            .skip(1)
            .map(str::to_string)
            .collect();
        if new_full.encryption.is_some() {
            bail!(
                "backup {} is encrypted: consolidation would need its key, and bitback does not \
                 rewrite encrypted chains; nothing was changed\n\
                 hint: limit encrypted chains with backup --full-every, and prune whole chains",
                new_full.id
            );
        }
        // Rewriting bit rot as a freshly digested full would hide it.
        // Only the files the new full is made of count: a damaged file of a
        // volume that a later full replaced is not read.
        let chain = super::chain::chain(repo, &new_full)?;
        let check = super::chain::check_needed(
            repo,
            &new_full,
            &chain,
            &[],
            super::check::Checks::Digests,
        )?;
        if let Some(p) = check.problems.first() {
            bail!(
                "backup {} cannot be consolidated: {}: {}; nothing was changed (run bitback verify)",
                new_full.id,
                p.file.as_deref().unwrap_or(&p.backup),
                p.problem
            );
        }
        make_full(repo, lock, &new_full)?;
        report.consolidated.push(new_full.id.clone());
        // Newest first, as prune does.
        for id in older {
            repo.delete_backup(lock, vm, &id)?;
            report.deleted.push(id);
        }
    }
    report.kept = renumber(repo, lock)?.into_iter().map(|m| m.id).collect();
    Ok(report)
}

/// Rewrites the chain and position of manifests whose parent links say
/// otherwise (after a consolidation); returns the backups as they are now.
fn renumber(repo: &Repo, lock: &VmLock) -> anyhow::Result<Vec<Manifest>> {
    let vm = lock.vm();
    let backups = repo.backups(vm)?;
    check_links(&backups)?;
    let mut changed = false;
    for m in &backups {
        let path = ancestors(&backups, m);
        let position = (path.len() - 1) as u32;
        let chain = path.last().copied().unwrap_or(m.id.as_str());
        if m.position != position || m.chain != chain {
            let mut updated = m.clone();
            updated.position = position;
            updated.chain = chain.to_string();
            repo.rewrite_manifest(lock, &updated)?;
            changed = true;
        }
    }
    if changed {
        repo.backups(vm).map_err(Into::into)
    } else {
        Ok(backups)
    }
}

/// Rewrites backup `m` as a full of the same point, swapped in atomically.
fn make_full(repo: &Repo, lock: &VmLock, m: &Manifest) -> anyhow::Result<()> {
    let replacement = repo.begin_replacement(lock, &m.vm, &m.id)?;
    let mut full = m.clone();
    full.kind = BackupKind::Full;
    full.parent = None;
    full.position = 0;
    full.chain = m.id.clone();
    full.reason = format!("consolidated: the point of {} rewritten as a full", m.id);
    full.schema = repo::MANIFEST_SCHEMA;
    for v in &mut full.volumes {
        v.kind = BackupKind::Full;
        v.reason = full.reason.clone();
        let source = repo.root().join(&v.file);
        let target = replacement.dir().join(VolumeRecord::file_name(&v.name));
        convert_standalone(&source, &target)?;
        v.backing = None;
        // The rewritten file's clusters are not the ones mapped.
        v.cluster_map = None;
        v.digest = digest_file(&target)?;
        v.file_size = Some(
            std::fs::metadata(&target)
                .with_context(|| format!("reading {}", target.display()))?
                .len(),
        );
    }
    replacement
        .swap(&full)
        .with_context(|| format!("swapping the consolidated {} into place", m.id))?;
    info!(vm = %m.vm, backup = %m.id, "consolidated into a full");
    Ok(())
}

/// The guest view of `source` (its whole chain) as one standalone qcow2.
fn convert_standalone(source: &Path, target: &Path) -> anyhow::Result<()> {
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "qcow2"])
        .arg(source)
        .arg(target)
        .output()
        .context("running qemu-img convert (install qemu-utils)")?;
    crate::child::succeeded("qemu-img convert", out)
        .with_context(|| format!("converting {}", source.display()))?;
    Ok(())
}

/// [`Repo::lock_readers`], its refusal naming the serves that hold the
/// lock after bitback exited: this host's mounts and live restores, and
/// other hosts' from their leases. A lease of another host refuses too
/// when the lock was had: the repository's locks may not reach across
/// hosts (some NAS setups), or that host stopped without ending its serve,
/// which the refusal says how to clear.
fn lock_readers(
    repo: &Repo,
    lock: &VmLock,
    purpose: &str,
) -> crate::repo::Result<crate::repo::ReadLock> {
    let vm = lock.vm();
    let vm_dir = repo.vm_dir(vm)?;
    let leases = || super::serve::runtime::leases_in_the_way(&vm_dir);
    match repo.lock_readers(lock, purpose) {
        Ok(readers) => {
            let leases = leases();
            if leases.is_empty() {
                return Ok(readers);
            }
            let held: Vec<String> = leases.into_iter().map(|l| l.what).collect();
            Err(crate::repo::Error::InUse {
                vm: vm.to_string(),
                holder: held.join("; "),
            })
        }
        Err(crate::repo::Error::InUse { vm, holder }) => {
            let mut held = super::serve::runtime::holders(repo.root(), &vm);
            held.extend(leases().into_iter().filter(|l| !l.here).map(|l| l.what));
            let holder = if held.is_empty() {
                holder
            } else {
                held.join("; ")
            };
            Err(crate::repo::Error::InUse { vm, holder })
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::time::Utc;

    /// Full backups at `times` (seconds after 2025-01-01T00:00:00Z),
    /// oldest first; a time of -1 is unreadable.
    fn fulls(times: &[i64]) -> Vec<Manifest> {
        let start = Utc::parse_rfc3339("2025-01-01T00:00:00Z")
            .unwrap()
            .to_unix();
        times
            .iter()
            .enumerate()
            .map(|(i, &t)| Manifest {
                schema: crate::repo::MANIFEST_SCHEMA,
                id: format!("b{i:03}"),
                vm: "vm1".into(),
                seq: i as u64 + 1,
                kind: BackupKind::Full,
                reason: String::new(),
                chain: format!("b{i:03}"),
                position: 0,
                parent: None,
                checkpoint: String::new(),
                time: match t {
                    -1 => "yesterday".into(),
                    t => Utc::from_unix(start + t).rfc3339(),
                },
                volumes: Vec::new(),
                qemu_version: None,
                encryption: None,
            })
            .collect()
    }

    fn kept(backups: &[Manifest], c: Calendar) -> Vec<&str> {
        keep_set(backups, Keep::Calendar(c))
            .unwrap()
            .into_iter()
            .collect()
    }

    const HOUR: i64 = 3600;
    const DAY: i64 = 86_400;

    #[test]
    fn the_calendar_keeps_the_newest_of_each_of_the_newest_periods() {
        // Two a day for ten days, at 01:00 and 13:00.
        let times: Vec<i64> = (0..10)
            .flat_map(|d| [d * DAY + HOUR, d * DAY + 13 * HOUR])
            .collect();
        let b = fulls(&times);
        let daily = Calendar {
            daily: 3,
            ..Calendar::default()
        };
        // The 13:00 backups of the last three days.
        assert_eq!(kept(&b, daily), ["b015", "b017", "b019"]);
        let last = Calendar {
            last: 3,
            ..Calendar::default()
        };
        assert_eq!(kept(&b, last), ["b017", "b018", "b019"]);
        let both = Calendar {
            last: 2,
            daily: 2,
            ..Calendar::default()
        };
        assert_eq!(kept(&b, both), ["b017", "b018", "b019"]);
        // 2025-01-01 is a Wednesday: days 0-4 are week 1, 5-9 week 2.
        let weekly = Calendar {
            weekly: 5,
            ..Calendar::default()
        };
        assert_eq!(kept(&b, weekly), ["b009", "b019"]);
        let hourly = Calendar {
            hourly: 1,
            monthly: 1,
            yearly: 1,
            ..Calendar::default()
        };
        assert_eq!(kept(&b, hourly), ["b019"]);
        assert!(keep_set(&b, Keep::Calendar(Calendar::default())).is_err());
    }

    #[test]
    fn months_and_years_over_a_long_calendar() {
        // One backup every 3 days for 400 days from 2025-01-01.
        let times: Vec<i64> = (0..134).map(|i| i * 3 * DAY).collect();
        let b = fulls(&times);
        let c = Calendar {
            monthly: 3,
            yearly: 2,
            ..Calendar::default()
        };
        let names: Vec<String> = kept(&b, c)
            .into_iter()
            .map(|id| {
                let m = b.iter().find(|m| m.id == id).unwrap();
                m.time[..10].to_string()
            })
            .collect();
        // The last of 2025 (2025-12-30), and the newest of the last three
        // months: 2025-12-30, 2026-01-29, 2026-02-04 (the newest point).
        assert_eq!(names, ["2025-12-30", "2026-01-29", "2026-02-04"]);
    }

    /// The example of docs/usage.md: nightly at 01:00 from 2027-01-01
    /// to 2027-06-30, `--keep-daily 7 --keep-weekly 4 --keep-monthly 12`.
    #[test]
    fn the_documented_example_keeps_fourteen() {
        let from = Utc::parse_rfc3339("2027-01-01T01:00:00Z")
            .unwrap()
            .to_unix()
            - Utc::parse_rfc3339("2025-01-01T00:00:00Z")
                .unwrap()
                .to_unix();
        let times: Vec<i64> = (0..181).map(|d| from + d * DAY).collect();
        let b = fulls(&times);
        assert!(b.last().unwrap().time.starts_with("2027-06-30"));
        let c = Calendar {
            daily: 7,
            weekly: 4,
            monthly: 12,
            ..Calendar::default()
        };
        let days: Vec<String> = kept(&b, c)
            .into_iter()
            .map(|id| b.iter().find(|m| m.id == id).unwrap().time[5..10].to_string())
            .collect();
        assert_eq!(
            days,
            [
                "01-31", "02-28", "03-31", "04-30", "05-31", "06-13", "06-20", "06-24", "06-25",
                "06-26", "06-27", "06-28", "06-29", "06-30"
            ]
        );
    }

    #[test]
    fn a_time_that_cannot_be_read_keeps_its_backup() {
        let b = fulls(&[0, -1, DAY, 2 * DAY]);
        let c = Calendar {
            daily: 1,
            ..Calendar::default()
        };
        assert_eq!(kept(&b, c), ["b001", "b003"]);
    }
}
