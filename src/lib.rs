//! bitback: incremental backups of running QEMU virtual machines.
//!
//! The modules, from the bottom up:
//! - [`qmp`]: an async QMP client (commands, events, fd passing);
//! - [`qemu`]: what bitback needs from a running QEMU (volumes, bitmaps);
//! - [`libvirt`]: libvirt domains (their disks, a way in to their QMP);
//! - [`child`]: helper programs run with a time limit;
//! - [`nbd`]: an NBD server, so that a backup job's target can be bitback;
//! - [`job`]: every VM of a host as one job (`bitback run`);
//! - [`units`]: sizes and ages as people write them;
//!
//! docs/repository.md describes the on-disk formats.

pub mod child;
pub mod cluster_map;
pub mod demo;
mod digest;
mod direct;
pub mod disk;
pub mod engine;
mod fault;
pub mod job;
pub mod libvirt;
pub mod monitor;
pub mod nasbackup;
pub mod nbd;
pub mod qcow2;
pub mod qemu;
pub mod qmp;
pub mod repo;
pub mod s3;
mod source;
pub mod units;
