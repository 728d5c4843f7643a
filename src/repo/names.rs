//! The names that become path components (VMs, volumes, backup ids):
//! checked before any path is made of them.

use super::error::{Error, Result};

/// The longest VM or volume name: it becomes a file name, with room to spare.
pub const MAX_NAME: usize = 128;

/// Checks that `name` (of a `what`: "VM", "volume") is safe as one path
/// component.
pub fn check_name(what: &'static str, name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME {
        Some("it is longer than 128 bytes")
    } else if name.starts_with('.') {
        Some("it starts with '.'")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.+@:".contains(c))
    {
        Some("only letters, digits and -_.+@: are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::BadName {
            what,
            name: name.escape_debug().to_string(),
            reason,
        }),
        None => Ok(()),
    }
}
