//! Carrying out a job: tasks started as `bitback` processes, at most
//! `jobs` at once and one per VM, a shared rate limit split among the
//! running backups, a time limit per backup, and a report at the end
//! (see the module above for the rules).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::report::{Outcome, Report, Verified};
use super::spec::{Job, Source, Task};
use crate::repo::{self, BackupKind, Changes, Manifest};

/// How long a backup past its time limit (or asked to stop) has after
/// SIGTERM to take its filter out and thaw the guest before SIGKILL.
const GRACE: Duration = Duration::from_secs(60);

/// How long a lowered share takes to reach a running backup: it reads
/// its file every half second.
const SHARE_SETTLES: Duration = Duration::from_millis(1100);

/// How long a finished command's pipes are read for what it wrote last.
const PIPES_DRAIN: Duration = Duration::from_secs(10);

/// How long `--dry-run` waits for one VM's plan.
const PLAN_LIMIT: Duration = Duration::from_secs(120);

/// The tail of a command's stderr kept for the report.
const STDERR_LINES: usize = 20;

/// A task as `--dry-run` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub vm: String,
    pub repo: String,
    /// How the VM is reached: `qmp PATH` or `libvirt DOMAIN`.
    pub source: String,
    /// The newest backup in the repository (or its spool).
    pub last: Option<String>,
    /// What the backup will be: the VM's own plan (`backup --dry-run`)
    /// where it runs, else what the repository tells.
    pub next: String,
    /// What retention would remove as the repository stands.
    pub would_prune: Vec<String>,
    /// What could not be found out.
    pub problems: Vec<String>,
    pub time_limit_seconds: Option<u64>,
    pub verify_outdated_after_seconds: Option<i64>,
}

/// What each task would do, changing nothing: `exe` (bitback) is asked
/// what retention would remove (`prune --dry-run`).
pub async fn plan(job: &Job, exe: &Path) -> Vec<Plan> {
    let mut plans = Vec::new();
    for task in &job.tasks {
        let mut plan = Plan {
            vm: task.vm.clone(),
            repo: task.repo.clone(),
            source: source_text(&task.source),
            last: None,
            next: String::new(),
            would_prune: Vec::new(),
            problems: Vec::new(),
            time_limit_seconds: task.time_limit.map(|d| d.as_secs()),
            verify_outdated_after_seconds: task.verify_outdated_after,
        };
        let local = task
            .spool
            .clone()
            .unwrap_or_else(|| PathBuf::from(&task.repo));
        match backups_in(&local, &task.vm) {
            Ok(backups) => {
                plan.last = backups.last().map(|m| m.id.clone());
                plan.next = next_kind(task, &backups);
            }
            Err(e) => {
                plan.next = "full, unless the repository can be read at run time".into();
                plan.problems.push(e);
            }
        }
        // The VM's own answer where it runs: its bitmaps decide.
        let mut args = backup_args(task, None);
        args.push("--dry-run".into());
        match capture(exe, &args, Some(PLAN_LIMIT), &mut |_| {}).await {
            Ok(Captured {
                status: 0, stdout, ..
            }) => match serde_json::from_str::<crate::engine::Planned>(&stdout) {
                Ok(p) => plan.next = p.reason,
                Err(e) => plan.problems.push(format!("backup --dry-run said: {e}")),
            },
            Ok(c) => plan.problems.push(format!(
                "asking the VM: {} (the next line is the repository's guess)",
                last_error(&c.stderr)
            )),
            Err(e) => plan.problems.push(format!("running backup --dry-run: {e}")),
        }
        if let (Some(keep), Some(_)) = (&task.keep, &plan.last) {
            let mut args = prune_args(task, keep);
            args.push("--dry-run".into());
            match capture(exe, &args, None, &mut |_| {}).await {
                Ok(Captured {
                    status: 0, stdout, ..
                }) => match serde_json::from_str::<serde_json::Value>(&stdout) {
                    Ok(v) => plan.would_prune = ids(&v["deleted"]),
                    Err(e) => plan.problems.push(format!("prune --dry-run said: {e}")),
                },
                Ok(c) => plan
                    .problems
                    .push(format!("prune --dry-run failed: {}", last_error(&c.stderr))),
                Err(e) => plan.problems.push(format!("running prune --dry-run: {e}")),
            }
        }
        plans.push(plan);
    }
    plans
}

/// The backups of `vm` in directory repository `root`, oldest first.
fn backups_in(root: &Path, vm: &str) -> Result<Vec<Manifest>, String> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let repo = repo::Repo::open(root).map_err(|e| format!("{}: {e}", root.display()))?;
    repo.backups(vm)
        .map_err(|e| format!("{}: the backups of vm {vm}: {e}", root.display()))
}

/// The next backup's kind by the repository alone.
fn next_kind(task: &Task, backups: &[Manifest]) -> String {
    let Some(last) = backups.last() else {
        return "full: no earlier backup of this vm".into();
    };
    if let Some(every) = task.full_every
        && last.position + 1 >= every
    {
        return format!(
            "full: chain {} holds {} backups (full_every = {every})",
            last.chain,
            last.position + 1
        );
    }
    format!(
        "incremental after {} where QEMU still tracks checkpoint {}; full for a volume it does not",
        last.id, last.checkpoint
    )
}

fn source_text(source: &Source) -> String {
    match source {
        Source::Qmp(p) => format!("qmp {}", p.display()),
        Source::Libvirt { domain, .. } => format!("libvirt {domain}"),
    }
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs every task of `job` with `exe` (bitback); `cancel` (SIGINT,
/// SIGTERM) stops starting tasks and asks the running ones to stop.
pub async fn run(
    job: &Job,
    exe: &Path,
    mut cancel: watch::Receiver<bool>,
    watcher: Arc<dyn Watch>,
) -> Report {
    let started = Instant::now();
    let started_at = repo::time::Utc::now().rfc3339();
    let shares = match job.rate_limit {
        Some(limit) => match Shares::new(limit) {
            Ok(s) => Some(s),
            Err(e) => {
                // Without the share files no backup may start: the limit
                // would not hold.
                return failed_to_start(job, &started_at, format!("{e:#}"));
            }
        },
        None => None,
    };
    let mut pending: VecDeque<usize> = (0..job.tasks.len()).collect();
    let mut busy: BTreeSet<String> = BTreeSet::new();
    let mut running: JoinSet<(usize, Outcome)> = JoinSet::new();
    // Which task each spawned future carries out, for one that panics.
    let mut spawned: BTreeMap<tokio::task::Id, usize> = BTreeMap::new();
    let mut outcomes: BTreeMap<usize, Outcome> = BTreeMap::new();
    let mut shares = shares;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut interrupted = false;
    // A `cancel` whose sender is gone can no longer ask anything.
    let mut cancellable = true;
    loop {
        // Start what may start: a free slot, a VM not already busy.
        while !interrupted && running.len() < job.jobs {
            let Some(at) = pending
                .iter()
                .position(|&i| !busy.contains(&job.tasks[i].vm))
            else {
                break;
            };
            let Some(i) = pending.remove(at) else { break };
            let task = job.tasks[i].clone();
            let rate_file = match &mut shares {
                Some(s) => match s.admit(i).await {
                    Ok(file) => Some(file),
                    Err(e) => {
                        let mut o = outcome_of(&task);
                        o.error = Some(format!("sharing the rate limit: {e:#}"));
                        watcher.ended(&label(&task), &o);
                        outcomes.insert(i, o);
                        continue;
                    }
                },
                None => None,
            };
            busy.insert(task.vm.clone());
            info!(vm = %task.vm, repo = %task.repo, "task started");
            watcher.started(&label(&task));
            let exe = exe.to_path_buf();
            let stop = stop_rx.clone();
            let w = watcher.clone();
            let handle = running
                .spawn(async move { (i, carry_out(&exe, &task, rate_file, stop, &*w).await) });
            spawned.insert(handle.id(), i);
        }
        if running.is_empty() {
            break;
        }
        tokio::select! {
            joined = running.join_next() => {
                let Some(joined) = joined else { continue };
                let (i, outcome) = match joined {
                    Ok(done) => done,
                    Err(e) => {
                        // This process's own code failed (a bug): the task
                        // is named as failed, and its VM stays busy so
                        // nothing else starts on it this run.
                        warn!(error = %e, "a task ended abnormally");
                        let Some(&i) = spawned.get(&e.id()) else { continue };
                        let mut o = outcome_of(&job.tasks[i]);
                        o.error = Some(format!("bitback run failed carrying it out: {e}"));
                        watcher.ended(&label(&job.tasks[i]), &o);
                        if let Some(s) = &mut shares {
                            s.release(i);
                        }
                        outcomes.insert(i, o);
                        continue;
                    }
                };
                busy.remove(&job.tasks[i].vm);
                if let Some(s) = &mut shares {
                    s.release(i);
                }
                watcher.ended(&label(&job.tasks[i]), &outcome);
                outcomes.insert(i, outcome);
            }
            changed = cancel.changed(), if !interrupted && cancellable => {
                match changed {
                    Err(_) => cancellable = false,
                    Ok(()) if *cancel.borrow() => {
                        interrupted = true;
                        let _ = stop_tx.send(true);
                        watcher.note("asked to stop; the running backups are cancelled");
                    }
                    Ok(()) => {}
                }
            }
        }
    }
    if let Some(s) = shares {
        s.remove();
    }
    let not_started = pending
        .iter()
        .map(|&i| format!("{} → {}", job.tasks[i].vm, job.tasks[i].repo))
        .collect();
    finish(job, started, started_at, outcomes, not_started)
}

fn finish(
    job: &Job,
    started: Instant,
    started_at: String,
    outcomes: BTreeMap<usize, Outcome>,
    not_started: Vec<String>,
) -> Report {
    let tasks: Vec<Outcome> = outcomes.into_values().collect();
    let failed: Vec<String> = tasks
        .iter()
        .filter(|o| !o.ok)
        .map(|o| format!("{} → {}", o.vm, o.repo))
        .collect();
    let not_started: Vec<String> = not_started;
    Report {
        started: started_at,
        finished: repo::time::Utc::now().rfc3339(),
        seconds: started.elapsed().as_secs_f64(),
        ok: failed.is_empty() && not_started.is_empty(),
        failed,
        tasks,
        not_started,
        unmatched: job.unmatched.clone(),
        ended_unix: unix_now(),
    }
}

fn failed_to_start(job: &Job, started_at: &str, why: String) -> Report {
    let outcomes = job
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut o = outcome_of(t);
            o.error = Some(why.clone());
            (i, o)
        })
        .collect();
    finish(job, Instant::now(), started_at.into(), outcomes, Vec::new())
}

fn outcome_of(task: &Task) -> Outcome {
    Outcome {
        vm: task.vm.clone(),
        repo: task.repo.clone(),
        started: repo::time::Utc::now().rfc3339(),
        ended_unix: unix_now(),
        ..Outcome::default()
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// What a run reports as it goes (the command line draws bars or prints
/// lines); `task` is `vm → repo`.
pub trait Watch: Send + Sync {
    fn started(&self, task: &str);
    /// Bytes the task's backup copied so far, of `total`.
    fn progress(&self, task: &str, done: u64, total: u64);
    /// A line the task's bitback wrote on stderr.
    fn said(&self, task: &str, line: &str);
    fn ended(&self, task: &str, outcome: &Outcome);
    /// About the run as a whole.
    fn note(&self, line: &str);
}

/// A task's name in what a run says: `vm → repo`.
pub fn label(task: &Task) -> String {
    format!("{} → {}", task.vm, task.repo)
}

/// `(done, total)` from a `bitback-progress DONE TOTAL` line.
fn progress_line(line: &str) -> Option<(u64, u64)> {
    let mut words = line.strip_prefix("bitback-progress ")?.split(' ');
    let done = words.next()?.parse().ok()?;
    let total = words.next()?.parse().ok()?;
    Some((done, total))
}

/// The backup, then retention and verify where asked, each a `bitback`
/// process.
async fn carry_out(
    exe: &Path,
    task: &Task,
    rate_file: Option<PathBuf>,
    stop: watch::Receiver<bool>,
    watcher: &dyn Watch,
) -> Outcome {
    let begun = Instant::now();
    let mut o = outcome_of(task);
    let label = label(task);
    // The backup's progress lines (`BITBACK_PROGRESS=lines`) go to the
    // watcher as numbers; every other line as it was said.
    let mut forward = |line: &str| match progress_line(line) {
        Some((done, total)) => watcher.progress(&label, done, total),
        None => watcher.said(&label, line),
    };
    let args = backup_args(task, rate_file.as_deref());
    let ran = capture_until(exe, &args, task.time_limit, stop.clone(), &mut forward).await;
    o.seconds = begun.elapsed().as_secs_f64();
    o.ended_unix = unix_now();
    let captured = match ran {
        Ok(c) => c,
        Err(e) => {
            o.error = Some(format!("running bitback backup: {e}"));
            return o;
        }
    };
    o.warnings = captured
        .stderr
        .iter()
        .filter(|l| l.contains(" WARN "))
        .map(|l| {
            l.split_once(" WARN ")
                .map_or(l.as_str(), |(_, w)| w)
                .trim()
                .to_string()
        })
        .collect();
    if captured.timed_out {
        o.timed_out = true;
        o.error = Some(format!(
            "cut off by its time limit of {} s; nothing of it is kept",
            task.time_limit.map_or(0, |d| d.as_secs())
        ));
        return o;
    }
    if captured.stopped {
        o.error = Some("the run was asked to stop; nothing of this backup is kept".into());
        return o;
    }
    if captured.status != 0 {
        o.error = Some(last_error(&captured.stderr));
        return o;
    }
    match serde_json::from_str::<Manifest>(&captured.stdout) {
        Ok(m) => describe(&mut o, &m),
        Err(e) => {
            o.error = Some(format!(
                "the backup printed no manifest bitback can read: {e}"
            ));
            return o;
        }
    }
    if let Some(keep) = &task.keep {
        match capture(exe, &prune_args(task, keep), None, &mut forward).await {
            Ok(c) if c.status == 0 => {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&c.stdout) {
                    o.pruned = ids(&v["deleted"]);
                }
            }
            Ok(c) => {
                o.error = Some(format!("retention failed: {}", last_error(&c.stderr)));
                return o;
            }
            Err(e) => {
                o.error = Some(format!("running bitback prune: {e}"));
                return o;
            }
        }
    }
    if let Some(age) = task.verify_outdated_after {
        let args: Vec<String> = vec![
            "verify".into(),
            "--repo".into(),
            task.repo.clone(),
            "--vm".into(),
            task.vm.clone(),
            "--json".into(),
            "--outdated-after".into(),
            format!("{age}s"),
        ];
        match capture(exe, &args, None, &mut forward).await {
            Ok(c) => {
                let v: serde_json::Value = serde_json::from_str(&c.stdout).unwrap_or_default();
                let count = |key: &str| match &v[key] {
                    serde_json::Value::Array(a) => a.len() as u64,
                    other => other.as_u64().unwrap_or(0),
                };
                let verified = Verified {
                    ok: c.status == 0,
                    backups: count("backups"),
                    skipped: count("skipped"),
                    problems: count("problems"),
                };
                if !verified.ok {
                    o.error = Some(format!("verify failed: {}", last_error(&c.stderr)));
                }
                o.verified = Some(verified);
            }
            Err(e) => o.error = Some(format!("running bitback verify: {e}")),
        }
    }
    o.ok = o.error.is_none();
    o.seconds = begun.elapsed().as_secs_f64();
    o
}

/// What the manifest tells the report.
fn describe(o: &mut Outcome, m: &Manifest) {
    o.backup = Some(m.id.clone());
    o.any_full = m.volumes.iter().any(|v| v.kind == BackupKind::Full);
    o.by_content = m
        .volumes
        .iter()
        .any(|v| v.changes == Some(Changes::Content));
    o.kind = Some(
        match (m.kind, o.any_full, o.by_content) {
            (BackupKind::Full, _, _) => "full",
            (BackupKind::Incremental, true, _) => "incremental, some volumes full",
            (BackupKind::Incremental, false, true) => "incremental, some volumes by content",
            (BackupKind::Incremental, false, false) => "incremental",
        }
        .to_string(),
    );
    o.bytes_written = m.volumes.iter().map(|v| v.bytes_written).sum();
    o.bytes_read = m.volumes.iter().filter_map(|v| v.bytes_read).sum();
}

/// `bitback backup`'s arguments for a task.
fn backup_args(task: &Task, rate_file: Option<&Path>) -> Vec<String> {
    let mut a: Vec<String> = vec!["backup".into(), "--json".into()];
    a.extend([
        "--vm".into(),
        task.vm.clone(),
        "--repo".into(),
        task.repo.clone(),
    ]);
    match &task.source {
        Source::Qmp(p) => a.extend(["--qmp".into(), p.display().to_string()]),
        Source::Libvirt { domain, connect } => a.extend([
            "--libvirt".into(),
            domain.clone(),
            "--connect".into(),
            connect.clone(),
        ]),
    }
    if let Some(s) = &task.spool {
        a.extend(["--spool".into(), s.display().to_string()]);
    }
    if let Some(e) = &task.s3_endpoint {
        a.extend(["--s3-endpoint".into(), e.clone()]);
    }
    if let Some(n) = task.full_every {
        a.extend(["--full-every".into(), n.to_string()]);
    }
    if task.quiesce {
        a.push("--quiesce".into());
    }
    if let Some(f) = &task.fleecing {
        a.extend(["--fleecing".into(), f.display().to_string()]);
    }
    if task.compress {
        a.push("--compress".into());
    }
    if let Some(f) = rate_file {
        a.extend(["--rate-file".into(), f.display().to_string()]);
    }
    a.extend(task.backup_args.iter().cloned());
    a
}

/// `bitback prune`'s arguments for a task's retention.
fn prune_args(task: &Task, keep: &crate::engine::Calendar) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "prune".into(),
        "--json".into(),
        "--repo".into(),
        task.repo.clone(),
        "--vm".into(),
        task.vm.clone(),
    ];
    for (flag, n) in [
        ("--keep-last", keep.last),
        ("--keep-hourly", keep.hourly),
        ("--keep-daily", keep.daily),
        ("--keep-weekly", keep.weekly),
        ("--keep-monthly", keep.monthly),
        ("--keep-yearly", keep.yearly),
    ] {
        if n > 0 {
            a.extend([flag.into(), n.to_string()]);
        }
    }
    if let Some(e) = &task.s3_endpoint {
        a.extend(["--s3-endpoint".into(), e.clone()]);
    }
    a
}

/// The error a failed bitback printed: its `bitback: ...` line (and a
/// hint after it), else its last line.
fn last_error(stderr: &[String]) -> String {
    let at = stderr.iter().rposition(|l| l.starts_with("bitback: "));
    match at {
        Some(i) => stderr[i..]
            .iter()
            .map(|l| l.strip_prefix("bitback: ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("; "),
        None => stderr
            .last()
            .cloned()
            .unwrap_or_else(|| "it failed and said nothing".into()),
    }
}

/// What a finished command left.
struct Captured {
    /// Its exit code; -1 when a signal ended it.
    status: i32,
    stdout: String,
    /// Its last [`STDERR_LINES`] lines.
    stderr: Vec<String>,
    timed_out: bool,
    stopped: bool,
}

async fn capture(
    exe: &Path,
    args: &[String],
    limit: Option<Duration>,
    forward: &mut (dyn FnMut(&str) + Send),
) -> std::io::Result<Captured> {
    let (_tx, never) = watch::channel(false);
    capture_until(exe, args, limit, never, forward).await
}

/// Runs `exe args` with stdin from /dev/null, its stdout kept, each line
/// of its stderr passed to `forward` as it comes. Past `limit`, or when
/// `stop` turns true, it gets SIGTERM, then SIGKILL after [`GRACE`].
async fn capture_until(
    exe: &Path,
    args: &[String],
    limit: Option<Duration>,
    mut stop: watch::Receiver<bool>,
    forward: &mut (dyn FnMut(&str) + Send),
) -> std::io::Result<Captured> {
    let mut child = tokio::process::Command::new(exe)
        .args(args)
        .env("BITBACK_PROGRESS", "lines")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("no stdout"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| std::io::Error::other("no stderr"))?;
    let out_task = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text).await;
        text
    });
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let mut tail: VecDeque<String> = VecDeque::new();
    let deadline = limit.map(|l| tokio::time::Instant::now() + l);
    let (mut timed_out, mut stopped) = (false, false);
    let mut killed_at: Option<tokio::time::Instant> = None;
    let mut stderr_open = true;
    let status = loop {
        let terminate_at = match (killed_at, deadline) {
            (Some(at), _) => Some(at + GRACE),
            (None, d) => d,
        };
        let sleep = async {
            match terminate_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            line = lines.next_line(), if stderr_open => match line {
                Ok(Some(line)) => heard(&mut tail, forward, line),
                _ => stderr_open = false,
            },
            status = child.wait() => break status?,
            _ = sleep => match killed_at {
                None => {
                    timed_out = true;
                    signal(pid, nix::sys::signal::Signal::SIGTERM);
                    killed_at = Some(tokio::time::Instant::now());
                }
                Some(_) => {
                    signal(pid, nix::sys::signal::Signal::SIGKILL);
                    killed_at = Some(tokio::time::Instant::now() + Duration::from_secs(3600));
                }
            },
            changed = stop.changed(), if killed_at.is_none() => {
                if changed.is_ok() && *stop.borrow() {
                    stopped = true;
                    signal(pid, nix::sys::signal::Signal::SIGTERM);
                    killed_at = Some(tokio::time::Instant::now());
                }
            }
        }
    };
    // What it wrote last. A process it left behind (a daemon that
    // inherited the pipes) must not hold this task: a few seconds, then
    // the pipes are left.
    let drained = tokio::time::timeout(PIPES_DRAIN, async {
        while stderr_open {
            match lines.next_line().await {
                Ok(Some(line)) => heard(&mut tail, forward, line),
                _ => stderr_open = false,
            }
        }
        out_task.await.unwrap_or_default()
    })
    .await;
    let stdout = drained.unwrap_or_default();
    Ok(Captured {
        status: status.code().unwrap_or(-1),
        stdout,
        stderr: tail.into(),
        timed_out,
        stopped,
    })
}

/// A line of stderr: passed on, and kept among the last few.
fn heard(tail: &mut VecDeque<String>, forward: &mut (dyn FnMut(&str) + Send), line: String) {
    forward(&line);
    tail.push_back(line);
    if tail.len() > STDERR_LINES {
        tail.pop_front();
    }
}

fn signal(pid: Option<u32>, sig: nix::sys::signal::Signal) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// The rate limit's shares: one file per running backup, in a private
/// directory, each holding that backup's bytes per second.
struct Shares {
    limit: u64,
    dir: PathBuf,
    running: BTreeSet<usize>,
}

impl Shares {
    fn new(limit: u64) -> anyhow::Result<Shares> {
        // A new directory of this run's own (never one found there); a
        // killed run's is removed by a later run.
        crate::qemu::daemon::clean_dead_runs();
        let dir = crate::qemu::daemon::run_dir("run")?;
        Ok(Shares {
            limit,
            dir,
            running: BTreeSet::new(),
        })
    }

    fn file(&self, task: usize) -> PathBuf {
        self.dir.join(format!("{task}.rate"))
    }

    /// Lowers the running backups' shares to make room for `task`, waits
    /// until they took it, and gives `task` its share file.
    async fn admit(&mut self, task: usize) -> anyhow::Result<PathBuf> {
        let share = self.limit / (self.running.len() as u64 + 1);
        if !self.running.is_empty() {
            self.write_all(share)?;
            tokio::time::sleep(SHARE_SETTLES).await;
        }
        self.running.insert(task);
        let file = self.file(task);
        write_share(&file, share.max(1))?;
        Ok(file)
    }

    /// `task` ended: the others share its part.
    fn release(&mut self, task: usize) {
        self.running.remove(&task);
        let _ = std::fs::remove_file(self.file(task));
        if let Some(share) = self.limit.checked_div(self.running.len() as u64)
            && let Err(e) = self.write_all(share)
        {
            warn!(error = %format!("{e:#}"), "raising the running backups' shares");
        }
    }

    fn write_all(&self, share: u64) -> anyhow::Result<()> {
        for &t in &self.running {
            write_share(&self.file(t), share.max(1))?;
        }
        Ok(())
    }

    fn remove(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Replaces a share file (rename over it: a reader never sees half).
fn write_share(file: &Path, bytes_per_second: u64) -> anyhow::Result<()> {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, format!("{bytes_per_second}\n"))
        .and_then(|()| std::fs::rename(&tmp, file))
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_is_the_line_bitback_printed() {
        let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            last_error(&lines(&[
                "2026-12-06T00:00:00Z  WARN something",
                "bitback: backup of vm a: No space left on device (os error 28)",
                "hint: free room",
            ])),
            "backup of vm a: No space left on device (os error 28); hint: free room"
        );
        assert_eq!(last_error(&lines(&["killed"])), "killed");
        assert_eq!(last_error(&[]), "it failed and said nothing");
    }

    #[test]
    fn progress_lines_are_numbers_and_nothing_else_is_one() {
        assert_eq!(progress_line("bitback-progress 5 10"), Some((5, 10)));
        assert_eq!(progress_line("bitback-progress 5"), None);
        assert_eq!(progress_line("[x] bitback-progress 5 10"), None);
        assert_eq!(progress_line("bitback: failed"), None);
    }

    #[tokio::test]
    async fn shares_split_the_limit_among_the_running() {
        let mut s = Shares::new(90).unwrap();
        let a = s.admit(0).await.unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap().trim(), "90");
        let b = s.admit(1).await.unwrap();
        let c = s.admit(2).await.unwrap();
        for f in [&a, &b, &c] {
            assert_eq!(std::fs::read_to_string(f).unwrap().trim(), "30");
        }
        s.release(1);
        assert!(!b.exists());
        for f in [&a, &c] {
            assert_eq!(std::fs::read_to_string(f).unwrap().trim(), "45");
        }
        let dir = s.dir.clone();
        s.remove();
        assert!(!dir.exists());
    }
}
