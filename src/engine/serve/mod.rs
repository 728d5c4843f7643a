//! Serving a backup point: `mount` (FUSE files of each volume), `restore
//! --live` (NBD exports a VM boots from, streamed into its images by
//! `--finish`) and `export` (an NBD export in the foreground). A mount or a
//! live restore outlives bitback: its qemu-storage-daemon runs in a
//! runtime directory of its own, with a lease in the repository
//! ([`runtime`]).

pub mod bucket;
mod export;
mod live;
mod mount;
pub mod runtime;

pub use export::{Export, ExportOptions, Listen, export};
pub use live::{
    FinishReport, Finished, LiveOptions, PointIn, finish, finish_domain, restore_live,
    restore_live_bucket, restore_live_domain,
};
pub use mount::{MountOptions, Served, ServedFile, mount, mount_bucket, umount};
