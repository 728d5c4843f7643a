//! Progress of long copies, reported to whoever draws it.

/// Where the engine reports the progress of long copies (the CLI draws
/// bars from it; the engine draws nothing).
pub trait Progress: Send + Sync {
    /// A new phase: `what`, with `total` bytes to go (0 while unknown).
    fn start(&self, what: &str, total: u64);
    /// Bytes done so far, and the total (which may grow).
    fn update(&self, done: u64, total: u64);
    fn finish(&self);
}

/// A [`Progress`] as an option value.
#[derive(Clone)]
pub struct ProgressSink(pub std::sync::Arc<dyn Progress>);

impl std::fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressSink")
    }
}
