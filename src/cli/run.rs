//! `bitback run JOBFILE`: every VM of a host as one job.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::output::{bytes, table};
use bitback::job::{self, Job, JobFile, Report};

/// Back up many VMs as one job: a TOML file names the VMs and their
/// repositories; backups run side by side within a host-wide rate limit.
///
/// Each VM goes into each of its repositories with `bitback backup` (a
/// process of its own), then retention (`keep_daily = 7`, ...) and verify
/// (`verify_outdated_after = "30d"`) where the entry asks. `jobs` backups
/// run at once, never two of one VM: a VM with a local and an offsite
/// repository is backed up into one, then the other, each with bitback's
/// own filter under the guest's device. `rate_limit` holds all running
/// backups together under that many bytes per second (each gets an even
/// share, adjusted as backups start and end). A backup past its
/// `time_limit` is cancelled cleanly (its filter out, the guest thawed,
/// nothing kept); one VM's failure never stops the others.
///
/// The job file:
///
///   jobs = 2                          # backups at once (default 1)
///   rate_limit = "40M"                # bytes/s, K M G binary (default: none)
///   time_limit = "4h"                 # each backup (d h m s; default: none)
///   metrics_file = "/var/lib/prometheus/node-exporter/bitback.prom"
///   report_file = "/var/log/bitback/last.json"
///   connect = "qemu:///system"        # libvirt's URI for libvirt entries
///
///   [[vm]]
///   name = "vm1"                      # the VM's name in the repository
///   qmp = "/run/vm1.qmp"              # or: libvirt = "dom" | "web-*" | "*" (running domains)
///   repo = "/mnt/nas/backups"         # or: repos = ["/backup", "s3://bucket/site"]
///   spool = "/var/spool/bitback"      # with an s3:// repository
///   keep_daily = 7                    # keep_last, keep_hourly, keep_weekly, keep_monthly, keep_yearly
///   full_every = 14
///   quiesce = true
///   verify_outdated_after = "30d"
///   backup_args = ["--exclude", "vdc"]
///
/// Exit codes: 0 every VM backed up (and pruned and verified where asked),
/// 1 some failed (the summary and the report name them), 2 the job file is
/// wrong (nothing was started).
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub(crate) struct RunArgs {
    /// The job file (TOML).
    #[arg(value_name = "JOBFILE")]
    jobfile: PathBuf,

    /// Print what each task would do (the VM, its repository, full or
    /// incremental as the repository tells, what retention would remove)
    /// and change nothing: no backup, no prune, no report or metrics file.
    #[arg(long)]
    dry_run: bool,

    /// Print the report (or with --dry-run, the plan) as JSON instead of
    /// the summary: {ok, failed, tasks: [{vm, repo, ok, backup, kind,
    /// seconds, bytes_read, bytes_written, error, warnings, pruned,
    /// verified}], not_started, unmatched}.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let job = match read(&args.jobfile) {
        Ok(job) => job,
        Err(e) => {
            eprintln!("bitback: {e:#}");
            return Ok(ExitCode::from(super::EXIT_ERROR));
        }
    };
    let exe = std::env::current_exe().context("finding the bitback executable")?;
    for note in &job.unmatched {
        eprintln!("bitback run: {note}");
    }
    if args.dry_run {
        let plans = job::plan(&job, &exe).await;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&plans)?);
        } else {
            print!("{}", render_plan(&job, &plans));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let cancel = super::backup::cancel_on_signals()?;
    use std::io::IsTerminal;
    let watcher: std::sync::Arc<dyn job::Watch> =
        match !args.json && std::io::stderr().is_terminal() {
            true => std::sync::Arc::new(Bars::default()),
            false => std::sync::Arc::new(Plain),
        };
    let report = job::run(&job, &exe, cancel, watcher).await;
    let mut wrote = Vec::new();
    if let Some(path) = &job.report_file {
        wrote.push(
            report
                .write_json(path)
                .with_context(|| format!("writing the report {}", path.display())),
        );
    }
    if let Some(path) = &job.metrics_file {
        wrote.push(
            report
                .write_metrics(path)
                .with_context(|| format!("writing the metrics {}", path.display())),
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    let mut ok = report.ok;
    for w in wrote {
        if let Err(e) = w {
            eprintln!("bitback: {e:#}");
            ok = false;
        }
    }
    Ok(match ok {
        true => ExitCode::SUCCESS,
        false => ExitCode::from(super::EXIT_FAILED),
    })
}

/// The job file, read and checked.
fn read(path: &std::path::Path) -> anyhow::Result<Job> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the job file {}", path.display()))?;
    let file: JobFile =
        toml::from_str(&text).with_context(|| format!("the job file {}", path.display()))?;
    file.check(&|connect| bitback::libvirt::running_domains(connect))
        .with_context(|| format!("the job file {}", path.display()))
}

fn render_plan(job: &Job, plans: &[job::Plan]) -> String {
    let mut out = format!(
        "{} tasks, {} at once{}; nothing is changed (--dry-run)\n",
        plans.len(),
        job.jobs,
        job.rate_limit
            .map(|r| format!(", {}/s in all", bytes(r)))
            .unwrap_or_default()
    );
    for p in plans {
        out.push_str(&format!("{} → {} ({})\n", p.vm, p.repo, p.source));
        out.push_str(&format!("  next: {}\n", p.next));
        if !p.would_prune.is_empty() {
            out.push_str(&format!(
                "  retention would remove: {}\n",
                p.would_prune.join(", ")
            ));
        }
        for problem in &p.problems {
            out.push_str(&format!("  problem: {problem}\n"));
        }
    }
    out
}

/// The one-screen summary.
fn render(report: &Report) -> String {
    let good = report.tasks.iter().filter(|t| t.ok).count();
    let mut out = format!(
        "bitback run: {good} of {} tasks ok in {:.1} s{}\n",
        report.tasks.len() + report.not_started.len(),
        report.seconds,
        match report.failed.len() {
            0 => String::new(),
            n => format!(", {n} failed"),
        }
    );
    let mut rows = vec![
        ["VM", "REPO", "RESULT", "KIND", "TIME", "WRITTEN", "PRUNED"]
            .map(String::from)
            .to_vec(),
    ];
    for t in &report.tasks {
        rows.push(vec![
            t.vm.clone(),
            t.repo.clone(),
            if t.ok { "ok" } else { "FAILED" }.into(),
            t.kind.clone().unwrap_or("-".into()),
            format!("{:.1} s", t.seconds),
            bytes(t.bytes_written),
            t.pruned.len().to_string(),
        ]);
    }
    out.push_str(&table(&rows));
    for t in report.tasks.iter().filter(|t| !t.ok) {
        out.push_str(&format!(
            "{} → {}: {}\n",
            t.vm,
            t.repo,
            t.error.as_deref().unwrap_or("failed")
        ));
    }
    for n in &report.not_started {
        out.push_str(&format!("{n}: not started (the run was stopped)\n"));
    }
    out
}

/// Each task's lines on stderr as they come, prefixed with the task.
struct Plain;

impl job::Watch for Plain {
    fn started(&self, task: &str) {
        eprintln!("[{task}] started");
    }

    fn progress(&self, _task: &str, _done: u64, _total: u64) {}

    fn said(&self, task: &str, line: &str) {
        eprintln!("[{task}] {line}");
    }

    fn ended(&self, task: &str, outcome: &job::Outcome) {
        eprintln!("[{task}] {}", outcome.summary());
    }

    fn note(&self, line: &str) {
        eprintln!("bitback run: {line}");
    }
}

/// A progress bar per running task, the tasks' lines printed above them.
#[derive(Default)]
struct Bars {
    all: indicatif::MultiProgress,
    bars: std::sync::Mutex<std::collections::BTreeMap<String, indicatif::ProgressBar>>,
}

impl Bars {
    fn bar(&self, task: &str) -> Option<indicatif::ProgressBar> {
        self.bars
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(task)
            .cloned()
    }
}

impl job::Watch for Bars {
    fn started(&self, task: &str) {
        let bar = self.all.add(indicatif::ProgressBar::new(0));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:24}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(task.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(250));
        self.bars
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(task.to_string(), bar);
    }

    fn progress(&self, task: &str, done: u64, total: u64) {
        if let Some(bar) = self.bar(task) {
            bar.set_length(total);
            bar.set_position(done);
        }
    }

    fn said(&self, task: &str, line: &str) {
        let _ = self.all.println(format!("[{task}] {line}"));
    }

    fn ended(&self, task: &str, outcome: &job::Outcome) {
        let bar = self
            .bars
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(task);
        if let Some(bar) = bar {
            bar.finish_and_clear();
            self.all.remove(&bar);
        }
        let _ = self.all.println(format!("[{task}] {}", outcome.summary()));
    }

    fn note(&self, line: &str) {
        let _ = self.all.println(format!("bitback run: {line}"));
    }
}
