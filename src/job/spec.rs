//! The job file: what the operator writes ([`JobFile`], read from TOML by
//! the command line), and what a run works from ([`Job`]: every value
//! checked, every VM entry turned into tasks of one VM and one
//! repository).
//!
//! ```toml
//! jobs = 2                          # backups at once
//! rate_limit = "40M"                # bytes/s (K, M, G: binary), all backups together
//! time_limit = "4h"                 # each backup; past it the backup is cancelled
//! metrics_file = "/var/lib/prometheus/node-exporter/bitback.prom"
//! report_file = "/var/log/bitback/last.json"
//!
//! [[vm]]
//! name = "vm1"                      # the --vm name in the repository
//! qmp = "/run/vm1.qmp"              # or: libvirt = "domain" (a glob, or "*")
//! repo = "/mnt/nas/backups"         # or: repos = ["/backup/local", "s3://bucket/site"]
//! keep_daily = 7                    # keep_last, keep_hourly, ..., keep_yearly
//! verify_outdated_after = "30d"     # verify after the backup, what was not verified lately
//! ```
//!
//! Unknown keys are refused, so that a misspelt `keep_daly` does not
//! silently keep everything.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::engine::Calendar;

/// What can be wrong with a job file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{at}: {problem}")]
    Invalid { at: String, problem: String },

    #[error("listing the running libvirt domains on {connect}")]
    Listing {
        connect: String,
        #[source]
        source: crate::libvirt::Error,
    },
}

fn invalid(at: impl Into<String>, problem: impl Into<String>) -> Error {
    Error::Invalid {
        at: at.into(),
        problem: problem.into(),
    }
}

/// A number, or a string with a unit (`"40M"`, `"4h"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Amount {
    Number(u64),
    Text(String),
}

/// The job file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    /// Backups at once (default 1).
    pub jobs: Option<u64>,
    /// Bytes per second for every running backup together.
    pub rate_limit: Option<Amount>,
    /// Each backup's time limit (`"4h"`; a number is seconds).
    pub time_limit: Option<Amount>,
    /// A Prometheus text file, replaced at the end of every run.
    pub metrics_file: Option<PathBuf>,
    /// The run's JSON report, replaced at the end of every run.
    pub report_file: Option<PathBuf>,
    /// The libvirt connection of `libvirt` entries (default
    /// qemu:///system).
    pub connect: Option<String>,
    #[serde(default)]
    pub vm: Vec<VmEntry>,
}

/// One `[[vm]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmEntry {
    /// The VM's name in the repository; with a `libvirt` glob, each
    /// domain's own name (and `name` must be left out).
    pub name: Option<String>,
    pub qmp: Option<PathBuf>,
    pub libvirt: Option<String>,
    pub repo: Option<String>,
    #[serde(default)]
    pub repos: Vec<String>,
    /// The local spool of an s3:// repository.
    pub spool: Option<PathBuf>,
    pub s3_endpoint: Option<String>,
    pub keep_last: Option<u32>,
    pub keep_hourly: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub keep_yearly: Option<u32>,
    pub full_every: Option<u32>,
    #[serde(default)]
    pub quiesce: bool,
    pub fleecing: Option<PathBuf>,
    #[serde(default)]
    pub compress: bool,
    /// This VM's time limit, instead of the file's.
    pub time_limit: Option<Amount>,
    /// After the backup, verify the VM's points not verified whole within
    /// this age (`bitback verify --outdated-after`); directory
    /// repositories only.
    pub verify_outdated_after: Option<String>,
    /// More `bitback backup` arguments, passed as they are
    /// (`["--exclude", "vdc"]`).
    #[serde(default)]
    pub backup_args: Vec<String>,
}

/// How a task reaches its VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Qmp(PathBuf),
    Libvirt { domain: String, connect: String },
}

/// One VM into one repository: a backup, then what the entry asks after
/// it.
#[derive(Debug, Clone)]
pub struct Task {
    pub vm: String,
    pub source: Source,
    pub repo: String,
    pub spool: Option<PathBuf>,
    pub s3_endpoint: Option<String>,
    /// Retention after the backup (`bitback prune --keep-...`); `None`
    /// keeps everything.
    pub keep: Option<Calendar>,
    pub full_every: Option<u32>,
    pub quiesce: bool,
    pub fleecing: Option<PathBuf>,
    pub compress: bool,
    pub time_limit: Option<Duration>,
    /// `verify --outdated-after` after the backup, in seconds.
    pub verify_outdated_after: Option<i64>,
    pub backup_args: Vec<String>,
}

/// A checked job.
#[derive(Debug, Clone)]
pub struct Job {
    pub jobs: usize,
    pub rate_limit: Option<u64>,
    pub metrics_file: Option<PathBuf>,
    pub report_file: Option<PathBuf>,
    pub tasks: Vec<Task>,
    /// Entries that matched no VM (a glob over no running domain), as
    /// `what: why`: reported, not failed.
    pub unmatched: Vec<String>,
}

/// The most backups at once a job may ask for: each is a process with a
/// QMP connection and an NBD server.
const MAX_JOBS: u64 = 64;

impl JobFile {
    /// Checks every value and expands the entries into tasks: a
    /// `libvirt` glob against the running domains `running(connect)`
    /// lists (`virsh list --name`), in file order.
    pub fn check(
        self,
        running: &dyn Fn(&str) -> Result<Vec<String>, crate::libvirt::Error>,
    ) -> Result<Job, Error> {
        let jobs = match self.jobs {
            None => 1,
            Some(n @ 1..=MAX_JOBS) => n as usize,
            Some(n) => return Err(invalid("jobs", format!("{n}: give 1 to {MAX_JOBS}"))),
        };
        let rate_limit = match &self.rate_limit {
            None => None,
            Some(a) => Some(size(a).map_err(|e| invalid("rate_limit", e))?),
        };
        if rate_limit == Some(0) {
            return Err(invalid("rate_limit", "0: leave it out for no limit"));
        }
        let time_limit = match &self.time_limit {
            None => None,
            Some(a) => Some(age(a).map_err(|e| invalid("time_limit", e))?),
        };
        if self.vm.is_empty() {
            return Err(invalid("the job file", "no [[vm]] entry"));
        }
        let connect = self
            .connect
            .clone()
            .unwrap_or_else(|| "qemu:///system".into());
        let mut tasks = Vec::new();
        let mut unmatched = Vec::new();
        for (i, entry) in self.vm.into_iter().enumerate() {
            let at = format!(
                "[[vm]] {}{}",
                i + 1,
                entry
                    .name
                    .as_deref()
                    .or(entry.libvirt.as_deref())
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            );
            let names = entry_vms(&entry, &connect, running, &at)?;
            if names.is_empty() {
                let glob = entry.libvirt.clone().unwrap_or_default();
                unmatched.push(format!(
                    "{at}: libvirt = {glob:?} matched no running domain"
                ));
            }
            for (vm, source) in names {
                tasks.extend(entry_tasks(&entry, &vm, &source, time_limit, &at)?);
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in &tasks {
            if !seen.insert((t.vm.clone(), t.repo.clone())) {
                return Err(invalid(
                    format!("vm {}", t.vm),
                    format!("named twice for repository {}", t.repo),
                ));
            }
        }
        Ok(Job {
            jobs,
            rate_limit,
            metrics_file: self.metrics_file,
            report_file: self.report_file,
            tasks,
            unmatched,
        })
    }
}

/// The VMs of one entry, each with how it is reached.
fn entry_vms(
    entry: &VmEntry,
    connect: &str,
    running: &dyn Fn(&str) -> Result<Vec<String>, crate::libvirt::Error>,
    at: &str,
) -> Result<Vec<(String, Source)>, Error> {
    let checked = |vm: &str| {
        crate::repo::check_name("VM", vm)
            .map(|_| vm.to_string())
            .map_err(|e| invalid(at, e.to_string()))
    };
    match (&entry.qmp, &entry.libvirt) {
        (Some(_), Some(_)) => Err(invalid(at, "give qmp or libvirt, not both")),
        (None, None) => Err(invalid(at, "give qmp (a socket) or libvirt (a domain)")),
        (Some(qmp), None) => {
            let Some(name) = &entry.name else {
                return Err(invalid(at, "a qmp entry needs a name"));
            };
            Ok(vec![(checked(name)?, Source::Qmp(qmp.clone()))])
        }
        (None, Some(domain)) if !is_glob(domain) => {
            let vm = checked(entry.name.as_deref().unwrap_or(domain))?;
            let source = Source::Libvirt {
                domain: domain.clone(),
                connect: connect.into(),
            };
            Ok(vec![(vm, source)])
        }
        (None, Some(glob)) => {
            if entry.name.is_some() {
                return Err(invalid(
                    at,
                    "a libvirt glob names each VM after its domain: leave name out",
                ));
            }
            let domains = running(connect).map_err(|source| Error::Listing {
                connect: connect.into(),
                source,
            })?;
            domains
                .into_iter()
                .filter(|d| glob_matches(glob, d))
                .map(|d| {
                    let source = Source::Libvirt {
                        domain: d.clone(),
                        connect: connect.into(),
                    };
                    Ok((checked(&d)?, source))
                })
                .collect()
        }
    }
}

/// One entry's tasks for VM `vm`: one per repository.
fn entry_tasks(
    entry: &VmEntry,
    vm: &str,
    source: &Source,
    job_limit: Option<Duration>,
    at: &str,
) -> Result<Vec<Task>, Error> {
    let mut repos: Vec<String> = entry.repo.iter().cloned().collect();
    repos.extend(entry.repos.iter().cloned());
    if repos.is_empty() {
        return Err(invalid(at, "give repo (or repos)"));
    }
    let rules = [
        entry.keep_last,
        entry.keep_hourly,
        entry.keep_daily,
        entry.keep_weekly,
        entry.keep_monthly,
        entry.keep_yearly,
    ];
    if rules.contains(&Some(0)) {
        return Err(invalid(
            at,
            "a keep_ value of 0 keeps nothing of that kind: leave it out",
        ));
    }
    let n = |rule: Option<u32>| rule.unwrap_or(0) as usize;
    let keep = Calendar {
        last: n(entry.keep_last),
        hourly: n(entry.keep_hourly),
        daily: n(entry.keep_daily),
        weekly: n(entry.keep_weekly),
        monthly: n(entry.keep_monthly),
        yearly: n(entry.keep_yearly),
    };
    let keep = rules.iter().any(Option::is_some).then_some(keep);
    let time_limit = match &entry.time_limit {
        Some(a) => Some(age(a).map_err(|e| invalid(at, format!("time_limit: {e}")))?),
        None => job_limit,
    };
    let verify = match &entry.verify_outdated_after {
        Some(text) => Some(
            crate::units::parse_age(text)
                .map_err(|e| invalid(at, format!("verify_outdated_after: {e}")))?,
        ),
        None => None,
    };
    let mut tasks = Vec::new();
    for repo in repos {
        let bucket = repo.starts_with("s3://");
        if bucket && entry.spool.is_none() {
            return Err(invalid(
                at,
                format!("{repo}: a backup into a bucket needs spool (a local directory)"),
            ));
        }
        tasks.push(Task {
            vm: vm.into(),
            source: source.clone(),
            repo,
            spool: entry.spool.clone().filter(|_| bucket),
            s3_endpoint: entry.s3_endpoint.clone(),
            keep,
            full_every: entry.full_every,
            quiesce: entry.quiesce,
            fleecing: entry.fleecing.clone(),
            compress: entry.compress,
            time_limit,
            // Verify's records live in a directory repository; a bucket
            // is verified whole with `bitback verify`, not after each
            // backup.
            verify_outdated_after: verify.filter(|_| !bucket),
            backup_args: entry.backup_args.clone(),
        });
    }
    Ok(tasks)
}

fn size(a: &Amount) -> Result<u64, String> {
    match a {
        Amount::Number(n) => Ok(*n),
        Amount::Text(t) => crate::units::parse_size(t),
    }
}

fn age(a: &Amount) -> Result<Duration, String> {
    match a {
        Amount::Number(0) => Err("0: leave it out for no limit".into()),
        Amount::Number(n) => Ok(Duration::from_secs(*n)),
        Amount::Text(t) => crate::units::parse_age(t).map(|s| Duration::from_secs(s as u64)),
    }
}

fn is_glob(name: &str) -> bool {
    name.contains(['*', '?', '['])
}

/// Shell-style matching: `*` any run of characters, `?` one character,
/// `[abc]` one of a set (no ranges); no escapes.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Where the last `*` stood and the name position it now covers up to.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
                continue;
            }
            Some('?') => Some(1),
            Some('[') => match p[pi..].iter().position(|&c| c == ']') {
                Some(end) if end > 1 => p[pi + 1..pi + end].contains(&n[ni]).then_some(end + 1),
                _ => (n[ni] == '[').then_some(1),
            },
            Some(&c) => (c == n[ni]).then_some(1),
            None => None,
        };
        match (step, star) {
            (Some(len), _) => {
                pi += len;
                ni += 1;
            }
            (None, Some((sp, sn))) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            (None, None) => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> JobFile {
        // The tests write the file as a struct literal would be tedious:
        // serde_json reads the same shape.
        serde_json::from_str(text).unwrap()
    }

    fn none(_: &str) -> Result<Vec<String>, crate::libvirt::Error> {
        Ok(vec![])
    }

    #[test]
    fn globs_match_as_a_shell_does() {
        assert!(glob_matches("*", "web1"));
        assert!(glob_matches("web*", "web1"));
        assert!(!glob_matches("w?b[0x]", "web1"));
        assert!(glob_matches("w?b[12]", "web1"));
        assert!(glob_matches("*-db-*", "site-db-3"));
        assert!(!glob_matches("web*", "db1"));
        assert!(!glob_matches("web?", "web"));
        assert!(glob_matches("a*b*c", "aXbYbZc"));
        assert!(!glob_matches("a*b*c", "aXbYbZ"));
    }

    #[test]
    fn entries_become_one_task_per_vm_and_repository() {
        let job = file(
            r#"{"jobs": 3, "rate_limit": "40M", "time_limit": "2h", "vm": [
                {"name": "a", "qmp": "/run/a.qmp", "repos": ["/r1", "s3://b/p"], "spool": "/s",
                 "keep_daily": 7, "verify_outdated_after": "30d"},
                {"libvirt": "web*", "repo": "/r1", "time_limit": 60}
            ]}"#,
        )
        .check(&|_| Ok(vec!["web1".into(), "db1".into(), "web2".into()]))
        .unwrap();
        assert_eq!(job.jobs, 3);
        assert_eq!(job.rate_limit, Some(40 << 20));
        let names: Vec<(&str, &str)> = job
            .tasks
            .iter()
            .map(|t| (t.vm.as_str(), t.repo.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("a", "/r1"),
                ("a", "s3://b/p"),
                ("web1", "/r1"),
                ("web2", "/r1")
            ]
        );
        // The spool goes with the bucket; verify with the directory.
        assert_eq!(job.tasks[0].spool, None);
        assert_eq!(job.tasks[1].spool, Some(PathBuf::from("/s")));
        assert_eq!(job.tasks[0].verify_outdated_after, Some(30 * 86_400));
        assert_eq!(job.tasks[1].verify_outdated_after, None);
        assert_eq!(job.tasks[0].time_limit, Some(Duration::from_secs(7200)));
        assert_eq!(job.tasks[2].time_limit, Some(Duration::from_secs(60)));
        assert_eq!(job.tasks[0].keep.unwrap().daily, 7);
        assert!(job.tasks[2].keep.is_none());
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (r#"{"vm": []}"#, "no [[vm]] entry"),
            (
                r#"{"jobs": 0, "vm": [{"name": "a", "qmp": "/q", "repo": "/r"}]}"#,
                "jobs",
            ),
            (r#"{"vm": [{"name": "a", "repo": "/r"}]}"#, "give qmp"),
            (r#"{"vm": [{"qmp": "/q", "repo": "/r"}]}"#, "needs a name"),
            (
                r#"{"vm": [{"name": "../x", "qmp": "/q", "repo": "/r"}]}"#,
                "../x",
            ),
            (r#"{"vm": [{"name": "a", "qmp": "/q"}]}"#, "give repo"),
            (
                r#"{"vm": [{"name": "a", "qmp": "/q", "repo": "s3://b/p"}]}"#,
                "spool",
            ),
            (
                r#"{"vm": [{"name": "a", "qmp": "/q", "repo": "/r", "keep_daily": 0}]}"#,
                "keep_",
            ),
            (
                r#"{"rate_limit": "40Q", "vm": [{"name": "a", "qmp": "/q", "repo": "/r"}]}"#,
                "rate_limit",
            ),
            (
                r#"{"vm": [{"name": "a", "qmp": "/q", "repo": "/r"}, {"name": "a", "qmp": "/q2", "repo": "/r"}]}"#,
                "named twice",
            ),
            (
                r#"{"vm": [{"name": "x", "libvirt": "*", "repo": "/r"}]}"#,
                "leave name out",
            ),
        ];
        for (text, expected) in cases {
            let e = file(text).check(&none).unwrap_err().to_string();
            assert!(e.contains(expected), "{text}: {e}");
        }
    }

    #[test]
    fn a_glob_over_no_domain_is_noted_not_failed() {
        let job = file(r#"{"vm": [{"libvirt": "web*", "repo": "/r"}, {"name": "a", "qmp": "/q", "repo": "/r"}]}"#)
            .check(&none)
            .unwrap();
        assert_eq!(job.tasks.len(), 1);
        assert_eq!(job.unmatched.len(), 1);
        assert!(job.unmatched[0].contains("web*"), "{:?}", job.unmatched);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let parsed: Result<JobFile, _> = serde_json::from_str(
            r#"{"vm": [{"name": "a", "qmp": "/q", "repo": "/r", "keep_daly": 7}]}"#,
        );
        assert!(parsed.unwrap_err().to_string().contains("keep_daly"));
    }
}
