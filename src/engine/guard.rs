//! The guest's guard: a backup's failure lands on the backup, never on a
//! guest write.
//!
//! QEMU's `blockdev-backup` puts its own copy-before-write filter under
//! the guest's disk, and that filter fails the guest's write when the old
//! data cannot reach the target (a full repository, an I/O error): the
//! guest sees an error, or with `werror=enospc` the whole VM pauses. Its
//! `on-cbw-error` cannot be set (QEMU 7.2 to 10.0). So for a volume that a
//! guest device writes, bitback builds the graph itself:
//!
//! ```text
//!  device -> [copy-before-write -c<i>] -> volume node
//!                 | target                  ^
//!                 v                         | (not yet copied)
//!      fleecing image -f<i> (--fleecing)    |
//!      or the backup's target -t<i>   [snapshot-access -a<i>] <- backup job
//! ```
//!
//! The filter runs with `on-cbw-error=break-snapshot` and a
//! [`CBW_TIMEOUT`]: a copy that fails or hangs drops the point (the job
//! then fails reading it) and the guest's write goes on. The device is
//! moved onto the filter with `qom-set drive` (QEMU has no
//! `blockdev-replace` up to 10.0), which only moves a device: a volume
//! that anything else writes (an NBD export, a second device, a job) keeps
//! QEMU's own filter, and the run says so.
//!
//! One filter per device at a time: two runs on one VM (a local and an
//! offsite repository, each its own scope) would otherwise race, and a
//! second filter put under the device while the first stands would cut
//! the first out (the guest's writes no longer pass it, and its point
//! silently changes under its copy). So a run first takes each device's
//! volume's lock, a QOM object QEMU lets only one client add
//! (`bitback-guard-<node>`, naming the run's scope and process), waiting
//! while another run holds it, and gives it back once its filter is out
//! ([`lock`]). A lock whose process is gone (or, for a run on another
//! host, which has had no live job for [`LOCK_ORPHANED`]) was left by a
//! killed run: that volume then goes through QEMU's own filter, and the
//! owner's next run removes the lock with the rest of its leftovers.
//!
//! The point is the moment the device moves. With the VM running, bitback
//! pauses it (`stop`) for the few commands that move every device and add
//! the checkpoint bitmaps, so all volumes share one point, and resumes it
//! (`cont`) on every path it lives through. Should it die in those
//! milliseconds (SIGKILL), a guard process started beside it (the thaw
//! guard's, [`super::thaw_guard`]) resumes the VM: `cont` on the QMP
//! socket once bitback's connection is gone, or `virsh resume`.

use anyhow::{Context, bail};
use tracing::{debug, info, warn};

use super::scope::Scope;
use crate::qemu::Volume;
use crate::qemu::backup::{self, BitmapAdd};
use crate::qemu::blockdev::{BitmapRef, Discard, Node};
use crate::qemu::graph::{self, Graph};
use crate::qemu::{commands, query};
use crate::qmp::{self, Qmp};

/// How long a guest write may wait for its old data to reach the filter's
/// target before that copy gives up, the point is dropped and the write
/// goes on (QEMU's `cbw-timeout`, in seconds).
pub(super) const CBW_TIMEOUT: u64 = 30;

/// The name of the bitmap on a snapshot-access node that the job copies:
/// for an incremental, a copy of the checkpoint at the point; for a full,
/// what the volume may hold ([`Guard::load_mask`]). It goes with the node.
const COPY_BITMAP: &str = "bitback-copy";

/// The bitmap on a fleecing image that records what the filter copied
/// there during a guarded full ([`Guard::load_mask`]).
const FLEECED_BITMAP: &str = "bitback-fleeced";

/// The name of the one bitmap in a mask image.
pub(super) const MASK_BITMAP: &str = "bitback-mask";

/// How a volume is copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Way {
    /// Through bitback's filter, moving the device at this QOM path.
    Guarded { qdev: String },
    /// Through `blockdev-backup`'s own filter, for the reason given (none
    /// when nothing but the job uses the volume).
    Direct { why: Option<String> },
}

impl Way {
    pub(super) fn is_guarded(&self) -> bool {
        matches!(self, Way::Guarded { .. })
    }
}

/// For each volume, how it can be copied: guarded when exactly one guest
/// device writes its node directly (no filter between), and nothing else
/// writes it.
pub(super) async fn survey(qmp: &Qmp, volumes: &[Volume]) -> anyhow::Result<Vec<Way>> {
    let Some(graph) = graph::query(qmp).await? else {
        let why = "this QEMU has no x-debug-query-block-graph to check who writes the volume";
        return Ok(volumes
            .iter()
            .map(|_| Way::Direct {
                why: Some(why.into()),
            })
            .collect());
    };
    Ok(volumes.iter().map(|v| way(&graph, v)).collect())
}

fn way(graph: &Graph, v: &Volume) -> Way {
    let writers = graph.writers(&v.node_name);
    match writers.as_slice() {
        [] => Way::Direct { why: None },
        [("block-backend", qdev)] if v.device.as_deref() == Some(*qdev) => Way::Guarded {
            qdev: qdev.to_string(),
        },
        // A `-drive` disk: the graph names the device's backend by its id.
        [("block-backend", name)] if v.backend.as_deref() == Some(*name) => match &v.device {
            Some(qdev) => Way::Guarded { qdev: qdev.clone() },
            None => Way::Direct {
                why: Some(format!("its backend {name} has no guest device to move")),
            },
        },
        [("block-backend", qdev)] if qdev.starts_with('/') => Way::Direct {
            why: Some(format!(
                "its device {qdev} reaches it through another node (a filter): moving the device would drop that node"
            )),
        },
        _ => {
            let names: Vec<String> = writers
                .iter()
                .map(|(kind, name)| {
                    if name.is_empty() {
                        format!("an unnamed {kind} (an export?)")
                    } else {
                        format!("{kind} {name}")
                    }
                })
                .collect();
            Way::Direct {
                why: Some(format!(
                    "it is written by more than one guest device, or by something else ({})",
                    names.join(", ")
                )),
            }
        }
    }
}

/// How long another run's lock may stand with no live job of that run
/// before it is taken for what a killed run left, when that run's
/// process cannot be looked at (it runs on another host). A run holds
/// its lock without a job while it prepares (a freeze may take its
/// `--freeze-timeout`) and while it takes its filter out.
pub(super) const LOCK_ORPHANED: std::time::Duration = std::time::Duration::from_secs(90);

/// The QOM object that names the run whose filter stands (or is about
/// to) under the device of volume node `node`: named by a hash of the
/// node's name, as QOM ids take fewer characters than node names
/// (`#block123`).
fn lock_id(node: &str) -> String {
    let hash = blake3::hash(node.as_bytes());
    format!("bitback-guard-{}", &hash.to_hex()[..16])
}

/// Who holds a lock: the run's scope prefix, and its process (pid and
/// start time, in clock ticks since boot) where it runs on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holder {
    scope: String,
    process: Option<(i32, u64)>,
}

impl Holder {
    /// This process, for `scope`.
    fn me(scope: &Scope) -> Holder {
        let pid = std::process::id() as i32;
        Holder {
            scope: scope.prefix(),
            process: start_time(pid).map(|start| (pid, start)),
        }
    }

    fn parse(text: &str) -> Holder {
        let mut words = text.split(' ');
        let scope = words.next().unwrap_or_default().to_string();
        let pid = words.next().and_then(|w| w.parse().ok());
        let start = words.next().and_then(|w| w.parse().ok());
        Holder {
            scope,
            process: pid.zip(start),
        }
    }

    fn text(&self) -> String {
        match self.process {
            Some((pid, start)) => format!("{} {pid} {start}", self.scope),
            None => self.scope.clone(),
        }
    }

    /// Whether its process is gone (`None`: cannot tell).
    fn gone(&self) -> Option<bool> {
        let (pid, start) = self.process?;
        Some(start_time(pid) != Some(start))
    }
}

/// Process `pid`'s start time (field 22 of /proc/PID/stat), which tells
/// a process from a later one given the same pid.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Takes the guard lock of every volume with a guest device, waiting
/// while another live run holds one (`cancel` ends the wait). Returns the
/// locks taken (for [`unlock`]) and, per volume, why it cannot be guarded
/// when a killed run's lock stands on it.
pub(super) async fn lock(
    qmp: &Qmp,
    scope: &Scope,
    volumes: &[Volume],
    cancel: &mut tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(Vec<String>, Vec<Option<String>>)> {
    let me = Holder::me(scope);
    let mut locks = Vec::new();
    let mut refused = vec![None; volumes.len()];
    for (i, v) in volumes.iter().enumerate() {
        if v.device.is_none() {
            continue;
        }
        let id = lock_id(&v.node_name);
        let mut waiting_since: Option<std::time::Instant> = None;
        let mut jobless_since: Option<std::time::Instant> = None;
        let mut let_go = 0;
        // A `cancel` whose sender is gone can no longer ask anything.
        let mut cancellable = true;
        loop {
            let added = commands::add_marker(qmp, &id, &me.text()).await;
            let Err(e) = added else {
                locks.push(id.clone());
                break;
            };
            let holder = match query::marker_holder(qmp, &id).await? {
                // Let go in the meantime: try again; but a refusal with
                // no holder, again and again, is QEMU refusing the object.
                None if let_go < 3 => {
                    let_go += 1;
                    continue;
                }
                // No lock to be had (a QEMU that refuses the object, one
                // of that name that is not bitback's): the run goes on as
                // before locks, the device's check before it moves still
                // keeping another run's filter in place.
                None => {
                    warn!(volume = %v.name, error = %e, "QEMU refuses the guard lock; going on without it");
                    break;
                }
                Some(h) if h.starts_with("bitback-") => Holder::parse(&h),
                Some(_) => {
                    warn!(volume = %v.name, lock = %id, "QEMU has an object of the guard lock's name that bitback did not make; going on without the lock");
                    break;
                }
            };
            if holder.scope == me.scope {
                // This scope's runs exclude each other (the repository's
                // lock of the vm): an interrupted one left it.
                let _ = commands::delete_object(qmp, &id).await;
                continue;
            }
            let orphaned = match holder.gone() {
                Some(gone) => gone,
                None if run_has_live_job(qmp, &holder.scope).await? => {
                    jobless_since = None;
                    false
                }
                None => {
                    jobless_since
                        .get_or_insert_with(std::time::Instant::now)
                        .elapsed()
                        > LOCK_ORPHANED
                }
            };
            if orphaned {
                warn!(volume = %v.name, holder = %holder.scope, "a killed bitback run left its guard lock on this volume; its next backup removes it");
                refused[i] = Some(format!(
                    "a killed bitback run ({}) left its filter's lock on it",
                    holder.scope
                ));
                break;
            }
            if *cancel.borrow() {
                unlock(qmp, scope, &locks).await;
                bail!("interrupted while waiting for another backup of this vm");
            }
            if waiting_since.is_none() {
                info!(volume = %v.name, holder = %holder.scope, "waiting for another bitback run to take its filter out from under this volume");
                waiting_since = Some(std::time::Instant::now());
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                changed = cancel.changed(), if cancellable => match changed {
                    Err(_) => cancellable = false,
                    Ok(()) if *cancel.borrow() => {
                        unlock(qmp, scope, &locks).await;
                        bail!("interrupted while waiting for another backup of this vm");
                    }
                    Ok(()) => {}
                },
            }
        }
        if let Some(since) = waiting_since
            && refused[i].is_none()
        {
            info!(volume = %v.name, waited_ms = since.elapsed().as_millis() as u64, "the other run's filter is out; this run goes on");
        }
    }
    Ok((locks, refused))
}

/// Whether the run whose names start with `prefix` has a job that has
/// not concluded.
async fn run_has_live_job(qmp: &Qmp, prefix: &str) -> anyhow::Result<bool> {
    Ok(query::jobs(qmp).await?.iter().any(|j| {
        j.id.strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('-'))
            && !matches!(j.status.as_str(), "concluded" | "null")
    }))
}

/// Gives back the locks this process took for `scope`; one another run
/// holds by now is left alone.
pub(super) async fn unlock(qmp: &Qmp, scope: &Scope, locks: &[String]) {
    let me = Holder::me(scope).text();
    for id in locks {
        match query::marker_holder(qmp, id).await {
            Ok(Some(h)) if h == me => {
                if let Err(e) = commands::delete_object(qmp, id).await {
                    warn!(lock = %id, error = %e, "cannot give back the guard lock; this vm's next backup into this repository does");
                }
            }
            _ => {}
        }
    }
}

/// One guarded volume's graph, while it stands.
#[derive(Debug, Clone)]
pub(super) struct Guard {
    pub qdev: String,
    /// The volume's node, where the device goes back to.
    pub node: String,
    /// The device's backend name, for a `-drive` disk: what QEMU then
    /// names as the device's drive while it reads the volume's node.
    pub backend: Option<String>,
    pub filter: String,
    pub access: String,
}

/// The QOM path of a device as `query-block` names it: a path already, or
/// a bare id (NVMe devices, for one, are named so) under
/// `/machine/peripheral`.
fn qom_path(qdev: &str) -> String {
    if qdev.starts_with('/') {
        qdev.to_string()
    } else {
        format!("/machine/peripheral/{qdev}")
    }
}

impl Guard {
    pub(super) fn new(scope: &Scope, i: usize, v: &Volume, qdev: &str) -> Guard {
        Guard {
            qdev: qom_path(qdev),
            node: v.node_name.clone(),
            backend: v.backend.clone(),
            filter: scope.guard_filter(i),
            access: scope.guard_access(i),
        }
    }

    /// The node the backup job reads.
    pub(super) fn source(&self) -> &str {
        &self.access
    }

    /// The bitmap an incremental's job copies, on [`Guard::source`].
    pub(super) fn copy_bitmap(&self) -> &'static str {
        COPY_BITMAP
    }

    /// Adds the filter over the volume's node (old data to `target`), moves
    /// the device onto it (the point), and adds the snapshot-access node
    /// the job reads; with `since`, also the bitmap the incremental copies
    /// (the checkpoint as it is at the point) and the filter copies only
    /// that bitmap's clusters. With `record` (a full whose filter copies to
    /// a fleecing image `target`), a bitmap of that granularity on
    /// `target` records what the filter copies, for
    /// [`Guard::load_mask`]. Must run with the VM paused or not running,
    /// so that no guest write falls between the filter and the move. On
    /// failure, what it added is left for [`Guard::remove`].
    pub(super) async fn insert(
        &self,
        qmp: &Qmp,
        target: &str,
        since: Option<&str>,
        record: Option<u64>,
    ) -> anyhow::Result<()> {
        let scratch = |node: &str, name: &str, granularity| BitmapAdd {
            node: node.into(),
            name: name.into(),
            persistent: false,
            granularity,
        };
        if let Some(granularity) = record {
            let bitmap = scratch(target, FLEECED_BITMAP, Some(granularity));
            backup::add_bitmap(qmp, &bitmap).await?;
        }
        let filter = Node::CopyBeforeWrite {
            node_name: self.filter.clone(),
            file: self.node.clone(),
            target: target.into(),
            on_cbw_error: "break-snapshot",
            cbw_timeout: CBW_TIMEOUT,
            bitmap: since.map(|since| BitmapRef::new(&self.node, since)),
            // The guest's discards go on to the volume, which decides by
            // its own `discard` option (QEMU's default would drop them
            // here while the guard stands).
            discard: Some(Discard::Unmap),
        };
        commands::add_node(qmp, &filter).await?;
        // Only from the volume's own node: a device on another filter
        // (something else moved it since the survey) keeps it.
        let on = query::device_drive(qmp, &self.qdev).await?;
        if on.is_none() || (on != Some(self.node.clone()) && on != self.backend) {
            bail!(
                "device {} is on node {}, not on volume node {}",
                self.qdev,
                on.as_deref().unwrap_or("?"),
                self.node
            );
        }
        commands::set_device_drive(qmp, &self.qdev, &self.filter).await?;
        let access = Node::SnapshotAccess {
            node_name: self.access.clone(),
            file: self.filter.clone(),
        };
        commands::add_node(qmp, &access).await?;
        if let Some(since) = since {
            backup::add_bitmap(qmp, &scratch(&self.access, COPY_BITMAP, None)).await?;
            let from = [BitmapRef::new(&self.node, since)];
            backup::merge_bitmaps(qmp, &self.access, COPY_BITMAP, &from).await?;
        }
        Ok(())
    }

    /// For a guarded full: the bitmap the job copies, on the
    /// snapshot-access node, made from the mask image open as node `mask`
    /// (every range the volume may hold, read after the point) and, with
    /// `fleece` (the fleecing image the filter copies to, whose bitmap
    /// [`Guard::insert`] added), what the filter has copied there. With
    /// that bitmap, the job (`sync=bitmap`) copies what the volume holds,
    /// not its whole virtual size: a snapshot-access node reports every
    /// cluster allocated.
    ///
    /// Why no cluster of the point is missed: the mask is read after the
    /// point, and QEMU frees a cluster only for a guest discard or zero
    /// write, which passes the filter, which first copies the old data to
    /// its target. Without fleecing that target is the backup's; with it,
    /// the fleecing image, whose bitmap is merged after the mask was read,
    /// so it holds every copy made before then.
    pub(super) async fn load_mask(
        &self,
        qmp: &Qmp,
        mask: &str,
        granularity: u64,
        fleece: Option<&str>,
    ) -> qmp::Result<()> {
        let bitmap = BitmapAdd {
            node: self.access.clone(),
            name: COPY_BITMAP.into(),
            persistent: false,
            granularity: Some(granularity),
        };
        backup::add_bitmap(qmp, &bitmap).await?;
        let mut sources = vec![BitmapRef::new(mask, MASK_BITMAP)];
        if let Some(fleece) = fleece {
            sources.push(BitmapRef::new(fleece, FLEECED_BITMAP));
        }
        backup::merge_bitmaps(qmp, &self.access, COPY_BITMAP, &sources).await
    }

    /// Takes the guard out (after its job has ended): the snapshot-access
    /// node, then the device back onto what sits under the filter now,
    /// then the filter. Under the filter is the volume's node, unless a
    /// backup of another repository started since: its job's own filter
    /// then sits there, and the device must stay above it, or that
    /// backup's point would change under it.
    pub(super) async fn remove(&self, qmp: &Qmp) -> anyhow::Result<()> {
        let _ = commands::delete_node(qmp, &self.access).await;
        let graph = graph::query(qmp).await?;
        let under = graph
            .as_ref()
            .and_then(|g| g.file_child(&self.filter))
            .unwrap_or(&self.node);
        move_back(qmp, &self.qdev, &self.filter, under).await?;
        if let Err(e) = commands::delete_node(qmp, &self.filter).await {
            if node_exists(qmp, &self.filter).await {
                bail!("cannot remove the guard's filter {}: {e}", self.filter);
            }
        }
        Ok(())
    }
}

/// Moves device `qdev` from `filter` back to `node`, if it is on `filter`.
/// Never sets a device to the node it already has: QEMU 10.0 aborts on
/// that.
async fn move_back(qmp: &Qmp, qdev: &str, filter: &str, node: &str) -> anyhow::Result<()> {
    let on = match query::device_drive(qmp, qdev).await {
        Ok(on) => on,
        // No device there: none to move back (an insert that failed
        // before moving it).
        Err(e) if e.class() == Some(crate::qmp::ErrorClass::DeviceNotFound) => return Ok(()),
        Err(e) => {
            return Err(anyhow::anyhow!(e).context(format!("asking which node device {qdev} uses")));
        }
    };
    if on.as_deref() != Some(filter) {
        debug!(qdev, on = ?on, "device not on the guard's filter");
        return Ok(());
    }
    commands::set_device_drive(qmp, qdev, node)
        .await
        .with_context(|| format!("moving device {qdev} back onto {node}"))?;
    Ok(())
}

async fn node_exists(qmp: &Qmp, name: &str) -> bool {
    match query::nodes(qmp).await {
        Ok(nodes) => nodes.iter().any(|n| n.node_name == name),
        Err(_) => true,
    }
}

/// Takes out the guards an interrupted run of `scope` left: snapshot-access
/// nodes first, then each device back from a filter onto the node under
/// it. The filters and other nodes are the caller's to delete after.
pub(super) async fn remove_stray(qmp: &Qmp, scope: &Scope) -> anyhow::Result<()> {
    let owned: Vec<String> = query::nodes(qmp)
        .await?
        .into_iter()
        .map(|n| n.node_name)
        .filter(|n| scope.owns_node_or_job(n))
        .collect();
    for node in owned.iter().filter(|n| is_access(n)) {
        info!(
            node,
            "removing a snapshot-access node left by an interrupted run"
        );
        let _ = commands::delete_node(qmp, node).await;
    }
    let Some(graph) = graph::query(qmp).await? else {
        return Ok(());
    };
    for block in query::blocks(qmp).await? {
        let (Some(qdev), Some(on)) = (
            block.qdev.as_deref(),
            block.inserted.as_ref().map(|i| i.node_name.as_str()),
        ) else {
            continue;
        };
        if !owned.iter().any(|n| n == on) {
            continue;
        }
        let Some(under) = graph.file_child(on) else {
            warn!(
                qdev,
                node = on,
                "a device sits on a node of an interrupted run with nothing under it; left as it is"
            );
            continue;
        };
        info!(
            qdev,
            filter = on,
            node = under,
            "moving a device back from the filter an interrupted run left"
        );
        move_back(qmp, &qom_path(qdev), on, under).await?;
    }
    // Its guard locks last, once its filters are out from under the
    // devices.
    let ours = scope.prefix();
    for id in query::object_ids(qmp).await? {
        let holder = match id.starts_with("bitback-guard-") {
            true => query::marker_holder(qmp, &id).await?,
            false => None,
        };
        if holder.is_some_and(|h| Holder::parse(&h).scope == ours) {
            info!(lock = %id, "removing a guard lock an interrupted run left");
            let _ = commands::delete_object(qmp, &id).await;
        }
    }
    Ok(())
}

/// Whether `name` (a node of the scope) is a snapshot-access node.
fn is_access(name: &str) -> bool {
    name.rsplit_once('-')
        .is_some_and(|(_, last)| last.starts_with('a'))
}

/// Whether the VM runs (and so must be paused for a point on several
/// devices at once).
pub(super) async fn running(qmp: &Qmp) -> anyhow::Result<bool> {
    Ok(query::status(qmp).await?.running)
}
