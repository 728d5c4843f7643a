//! bitback's integration tests: one binary, one shared harness.
//!
//! Tests that need QEMU start real processes (qemu-system-x86_64,
//! qemu-storage-daemon) and fail, naming the install command, when QEMU is
//! missing.

mod backup;
mod content;
mod data_path;
mod fake_qmp;
mod field;
mod guard;
mod guest;
mod harness;
mod hostile;
mod inspect;
mod instant;
mod kinds;
mod libvirt;
mod nasbackup;
mod nbd;
mod qcow2;
mod qmp_client;
mod restore;
mod retention;
mod run;
mod s3;
mod soak;
