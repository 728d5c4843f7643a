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
//! `live-domain-started` (a domain started on live images, before its
//! streams).

/// Dies here if this is a debug build and `BITBACK_FAULT=<phase>`.
pub(crate) fn point(phase: &str) {
    if cfg!(debug_assertions) && std::env::var("BITBACK_FAULT").is_ok_and(|wanted| wanted == phase)
    {
        tracing::error!(phase, "BITBACK_FAULT: killing bitback here");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
