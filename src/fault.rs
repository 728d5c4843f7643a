//! Test-only fault injection: a debug build dies with SIGKILL at the named
//! phase when `BITBACK_FAULT` names it, so tests can prove what a crash at
//! that point leaves behind. Release builds ignore the variable.
//!
//! Phases: `before-transaction`, `paused` (the VM paused for the guard's
//! point), `after-transaction` (bitmaps added, jobs
//! started), `mid-copy` (a progress poll saw a job still running), `after-jobs`,
//! `before-commit`, `after-commit` (before the old bitmap is removed),
//! `prune-renamed`, `consolidate-before-swap`, `consolidate-after-swap`,
//! `serve-before-daemon` (a mount or live restore, its files made),
//! `sync-mid-upload` (a part of a multipart upload sent),
//! `feed-mid-upload` (a part of an upload fed as its file is written,
//! about to go),
//! `sync-before-manifest` (a point's data objects uploaded, its manifest
//! not),
//! `live-domain-started` (a domain started on live images, before its
//! streams).
//!
//! [`hold`] waits instead, so that a test can act at that moment, at any
//! of those phases and at `before-mask` (a guarded full's point taken, its
//! mask not yet read), `sync-checked` (a point to copy into a bucket
//! checked but for its data, which is proven as it is read to go) and
//! `sync-file-proven` (each of its files about to go, its proof ready:
//! for a layout not followed in one pass, its bytes already checked).

/// Dies here if this is a debug build and `BITBACK_FAULT=<phase>`.
pub(crate) fn point(phase: &str) {
    hold(phase);
    if cfg!(debug_assertions) && std::env::var("BITBACK_FAULT").is_ok_and(|wanted| wanted == phase)
    {
        tracing::error!(phase, "BITBACK_FAULT: killing bitback here");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Waits here if this is a debug build and `BITBACK_HOLD=<phase>:<file>`:
/// creates `<file>.held`, then waits until `<file>` exists (at most two
/// minutes). Release builds ignore the variable.
pub(crate) fn hold(phase: &str) {
    if !cfg!(debug_assertions) {
        return;
    }
    let Ok(wanted) = std::env::var("BITBACK_HOLD") else {
        return;
    };
    let Some(file) = wanted.strip_prefix(phase).and_then(|r| r.strip_prefix(':')) else {
        return;
    };
    tracing::warn!(phase, file, "BITBACK_HOLD: waiting for the file");
    let _ = std::fs::write(format!("{file}.held"), b"");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !std::path::Path::new(file).exists() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
