//! `bitback run JOBFILE`: every VM of a host as one job.
//!
//! A job file (TOML, [`spec`]) names the VMs (a QMP socket, a libvirt
//! domain, or a glob over the running domains), the repositories each
//! goes to, and what follows each backup (retention, verify). A run
//! ([`schedule`]) turns it into tasks, one per VM and repository, and
//! carries each out as `bitback backup` in a process of its own, then
//! `bitback prune` and `bitback verify` where the file asks for them:
//!
//! - at most `jobs` tasks at once, and never two of one VM: a VM's
//!   backups (a local and an offsite repository) take their points one
//!   after the other, each under bitback's own filter (two at once would
//!   only hold a slot while one waits for the other's filter, see
//!   [`crate::engine`]'s guard);
//! - `rate_limit`, bytes per second for every running backup together:
//!   each running task's share is the limit divided by the tasks running,
//!   written to a file the backup reads every half second
//!   ([`crate::engine::Rate::Shared`]). A task starts only after the
//!   others' shares were lowered (and a second passed for them to take
//!   effect); when one ends, the others' shares rise;
//! - `time_limit` per backup: past it the backup gets SIGTERM (it cancels
//!   its jobs, takes its filter out, thaws the guest, keeps nothing), and
//!   SIGKILL a minute later (its thaw guard then resumes and thaws);
//! - one task's failure is its own: the others go on, and the report
//!   names it.
//!
//! Each process is a separate `bitback` so that a task that hangs or
//! crashes takes nothing else with it, and every safeguard of a single
//! run (locks, the guest's guard, the thaw guard, clean-up of an
//! interrupted run) holds unchanged.
//!
//! What a run leaves ([`report`]): a JSON report, a Prometheus text file
//! for node_exporter's textfile collector (written atomically), and the
//! one-screen summary the command prints.

pub mod report;
pub mod schedule;
pub mod spec;

pub use report::{Outcome, Report};
pub use schedule::{Plan, Watch, label, plan, run};
pub use spec::{Job, JobFile, Source, Task};
