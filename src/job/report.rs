//! What a run leaves: each task's [`Outcome`], the run's [`Report`]
//! (JSON), and the same as Prometheus text for node_exporter's textfile
//! collector.
//!
//! The metrics, one series per VM and repository (labels `vm`, `repo`):
//!
//! | metric | what |
//! |---|---|
//! | `bitback_last_run_success` | 1 when the last backup succeeded, else 0 |
//! | `bitback_last_run_timestamp_seconds` | when the last backup ended |
//! | `bitback_last_success_timestamp_seconds` | when the last good backup ended (kept from the previous file when this one failed) |
//! | `bitback_last_run_duration_seconds` | the last backup's time |
//! | `bitback_last_run_bytes_read` / `_bytes_written` | what it read from the VM and wrote |
//! | `bitback_last_run_full` | 1 when any volume was full, else 0 |
//! | `bitback_last_run_by_content` | 1 when any volume went by content |
//! | `bitback_failures_total` | backups that failed, counted across runs |
//! | `bitback_last_verify_timestamp_seconds` | when verify last found the VM's points good (kept across runs) |
//!
//! and for the run: `bitback_job_last_run_timestamp_seconds`,
//! `bitback_job_last_run_duration_seconds`, `bitback_job_failed_vms`.
//! Counters and timestamps that a run does not renew are carried over
//! from the file it replaces, so a VM that fails keeps its last success.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::Serialize;

/// One task's end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    pub vm: String,
    pub repo: String,
    /// The backup, its retention and its verify all went well.
    pub ok: bool,
    /// The new backup's id.
    pub backup: Option<String>,
    /// full, incremental, or incremental with some volumes full or by
    /// content, as `bitback backup` prints it.
    pub kind: Option<String>,
    pub any_full: bool,
    pub by_content: bool,
    pub started: String,
    pub seconds: f64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Cut off by its time limit.
    pub timed_out: bool,
    /// What failed, as the failing command said it.
    pub error: Option<String>,
    /// Warnings the backup logged (a freeze that did not happen, QEMU's
    /// filter instead of bitback's).
    pub warnings: Vec<String>,
    /// Backups retention removed.
    pub pruned: Vec<String>,
    /// Points verify read and found good, and those it skipped as
    /// verified lately.
    pub verified: Option<Verified>,
    /// Unix time the backup ended, for the metrics.
    #[serde(skip)]
    pub ended_unix: i64,
}

impl Outcome {
    /// The task's result in a few words.
    pub fn summary(&self) -> String {
        match (&self.error, &self.kind) {
            (Some(e), _) => format!("FAILED after {:.1} s: {e}", self.seconds),
            (None, kind) => format!(
                "ok: {} of {} written in {:.1} s",
                kind.as_deref().unwrap_or("backup"),
                crate::units::bytes(self.bytes_written),
                self.seconds
            ),
        }
    }
}

/// What verify said after a backup.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verified {
    pub ok: bool,
    pub backups: u64,
    pub skipped: u64,
    pub problems: u64,
}

/// A whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub started: String,
    pub finished: String,
    pub seconds: f64,
    /// Every task ok.
    pub ok: bool,
    /// `vm → repo` of each task that failed.
    pub failed: Vec<String>,
    pub tasks: Vec<Outcome>,
    /// Tasks not started because the run was interrupted.
    pub not_started: Vec<String>,
    /// Entries that matched no VM.
    pub unmatched: Vec<String>,
    #[serde(skip)]
    pub ended_unix: i64,
}

impl Report {
    /// Writes the report as JSON to `path`, atomically.
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        replace(path, format!("{text}\n").as_bytes())
    }

    /// Writes the metrics to `path`, atomically, carrying over from the
    /// file it replaces what this run did not renew.
    pub fn write_metrics(&self, path: &Path) -> std::io::Result<()> {
        let before = std::fs::read_to_string(path).unwrap_or_default();
        replace(path, self.metrics(&before).as_bytes())
    }

    /// The Prometheus text, given the previous file's text.
    pub fn metrics(&self, before: &str) -> String {
        let old = parse_samples(before);
        let mut series: BTreeMap<&'static str, BTreeMap<String, f64>> = BTreeMap::new();
        // Series of VMs this run did not touch stay as they were.
        for ((name, labels), value) in &old {
            if let Some(m) = METRICS.iter().find(|m| m.name == name) {
                series
                    .entry(m.name)
                    .or_default()
                    .insert(labels.clone(), *value);
            }
        }
        let mut put = |name: &'static str, labels: &str, value: f64| {
            series.entry(name).or_default().insert(labels.into(), value);
        };
        for t in &self.tasks {
            let labels = format!("vm=\"{}\",repo=\"{}\"", escape(&t.vm), escape(&t.repo));
            let old_value = |name: &str| old.get(&(name.to_string(), labels.clone())).copied();
            put(
                "bitback_last_run_success",
                &labels,
                f64::from(u8::from(t.ok)),
            );
            put(
                "bitback_last_run_timestamp_seconds",
                &labels,
                t.ended_unix as f64,
            );
            put("bitback_last_run_duration_seconds", &labels, t.seconds);
            put("bitback_last_run_bytes_read", &labels, t.bytes_read as f64);
            put(
                "bitback_last_run_bytes_written",
                &labels,
                t.bytes_written as f64,
            );
            put(
                "bitback_last_run_full",
                &labels,
                f64::from(u8::from(t.any_full)),
            );
            put(
                "bitback_last_run_by_content",
                &labels,
                f64::from(u8::from(t.by_content)),
            );
            let failures = old_value("bitback_failures_total").unwrap_or(0.0);
            put(
                "bitback_failures_total",
                &labels,
                failures + f64::from(u8::from(!t.ok)),
            );
            if t.backup.is_some() {
                put(
                    "bitback_last_success_timestamp_seconds",
                    &labels,
                    t.ended_unix as f64,
                );
            }
            if t.verified.as_ref().is_some_and(|v| v.ok) {
                put(
                    "bitback_last_verify_timestamp_seconds",
                    &labels,
                    t.ended_unix as f64,
                );
            }
        }
        put(
            "bitback_job_last_run_timestamp_seconds",
            "",
            self.ended_unix as f64,
        );
        put("bitback_job_last_run_duration_seconds", "", self.seconds);
        put("bitback_job_failed_vms", "", self.failed.len() as f64);
        let mut out = String::new();
        for m in METRICS {
            let Some(samples) = series.get(m.name) else {
                continue;
            };
            out.push_str(&format!(
                "# HELP {} {}\n# TYPE {} {}\n",
                m.name, m.help, m.name, m.kind
            ));
            for (labels, value) in samples {
                match labels.is_empty() {
                    true => out.push_str(&format!("{} {}\n", m.name, value)),
                    false => out.push_str(&format!("{}{{{labels}}} {}\n", m.name, value)),
                }
            }
        }
        out
    }
}

struct Metric {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
}

const METRICS: &[Metric] = &[
    Metric {
        name: "bitback_last_run_success",
        kind: "gauge",
        help: "1 when the VM's last backup into the repository succeeded, else 0.",
    },
    Metric {
        name: "bitback_last_run_timestamp_seconds",
        kind: "gauge",
        help: "Unix time the VM's last backup ended.",
    },
    Metric {
        name: "bitback_last_success_timestamp_seconds",
        kind: "gauge",
        help: "Unix time the VM's last successful backup ended.",
    },
    Metric {
        name: "bitback_last_run_duration_seconds",
        kind: "gauge",
        help: "How long the VM's last backup took.",
    },
    Metric {
        name: "bitback_last_run_bytes_read",
        kind: "gauge",
        help: "Bytes the VM's last backup read from its volumes.",
    },
    Metric {
        name: "bitback_last_run_bytes_written",
        kind: "gauge",
        help: "Bytes the VM's last backup wrote into the repository.",
    },
    Metric {
        name: "bitback_last_run_full",
        kind: "gauge",
        help: "1 when any volume of the VM's last backup was full.",
    },
    Metric {
        name: "bitback_last_run_by_content",
        kind: "gauge",
        help: "1 when any volume of the VM's last backup found its changes by content (a lost bitmap).",
    },
    Metric {
        name: "bitback_failures_total",
        kind: "counter",
        help: "Backups of the VM into the repository that failed.",
    },
    Metric {
        name: "bitback_last_verify_timestamp_seconds",
        kind: "gauge",
        help: "Unix time verify last found the VM's backups good.",
    },
    Metric {
        name: "bitback_job_last_run_timestamp_seconds",
        kind: "gauge",
        help: "Unix time the last bitback run ended.",
    },
    Metric {
        name: "bitback_job_last_run_duration_seconds",
        kind: "gauge",
        help: "How long the last bitback run took.",
    },
    Metric {
        name: "bitback_job_failed_vms",
        kind: "gauge",
        help: "Tasks (a VM into a repository) that failed in the last bitback run.",
    },
];

/// A label value as Prometheus's text format writes it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The samples of a file this module wrote: `(name, labels) → value`.
/// Lines it cannot read are dropped (the file is ours; a damaged one
/// loses only what it carried over).
fn parse_samples(text: &str) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => match rest.strip_suffix('}') {
                Some(labels) => (name, labels),
                None => continue,
            },
            None => (series, ""),
        };
        out.insert((name.to_string(), labels.to_string()), value);
    }
    out
}

/// Replaces `path` with `bytes`: a temporary file beside it, synced, then
/// renamed over it.
fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} names no file", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(vm: &str, ok: bool) -> Outcome {
        Outcome {
            vm: vm.into(),
            repo: "/r".into(),
            ok,
            backup: ok.then(|| "20261206T000000Z".into()),
            ended_unix: 1_800_000_000,
            seconds: 2.5,
            bytes_written: 1 << 20,
            ..Outcome::default()
        }
    }

    #[test]
    fn a_failed_vm_keeps_its_last_success_and_counts_the_failure() {
        let first = Report {
            tasks: vec![outcome("a", true), outcome("b\"x", true)],
            ended_unix: 1_800_000_000,
            ..Report::default()
        };
        let text = first.metrics("");
        assert!(
            text.contains(
                "bitback_last_success_timestamp_seconds{vm=\"a\",repo=\"/r\"} 1800000000\n"
            ),
            "{text}"
        );
        assert!(text.contains("vm=\"b\\\"x\""), "{text}");
        let mut later = outcome("a", false);
        later.ended_unix = 1_800_086_400;
        let second = Report {
            tasks: vec![later],
            failed: vec!["a → /r".into()],
            ..Report::default()
        };
        let text = second.metrics(&text);
        assert!(
            text.contains(
                "bitback_last_success_timestamp_seconds{vm=\"a\",repo=\"/r\"} 1800000000\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("bitback_last_run_success{vm=\"a\",repo=\"/r\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("bitback_failures_total{vm=\"a\",repo=\"/r\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("bitback_job_failed_vms 1\n"), "{text}");
        // b was not in the second run: its series stay.
        assert!(
            text.contains("bitback_last_run_success{vm=\"b\\\"x\",repo=\"/r\"} 1\n"),
            "{text}"
        );
    }
}
