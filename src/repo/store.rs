//! Where a repository's objects live, behind one trait: a directory today
//! ([`Directory`]), a bucket next.
//!
//! A key is a path relative to the repository, names joined by `/`
//! (`web1/state.json`, `web1/20261206T101500Z/manifest.json`): the same
//! key names a file in a directory repository and an object in a bucket,
//! so a synced prefix is a directory repository and back.
//!
//! What goes through the trait: the small objects the repository's rules
//! read and write whole (its identity, each VM's state, manifests, damage
//! findings) and the listings of VMs and points. What does not yet, being
//! the directory's own until a second store shapes them: a point's data
//! files (QEMU or bitback's NBD target write them in place in the
//! `.partial` directory), the commit by rename, deletion by rename, and
//! the locks (flock). A bucket writes data by multipart upload, commits by
//! writing the manifest last, and locks by conditional writes
//! (design.md, "Object storage").

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use super::error::{Error, Result};

/// What a listing holds under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// An object (a file), by its last name.
    Object(String),
    /// A prefix more objects sit under (a directory), by its last name.
    Prefix(String),
    /// A link (a directory's only): listed so that the caller refuses
    /// it by name when it reaches for it, never followed.
    Link(String),
}

impl Entry {
    pub fn name(&self) -> &str {
        match self {
            Entry::Object(name) | Entry::Prefix(name) | Entry::Link(name) => name,
        }
    }
}

/// A repository's storage: objects by key.
pub trait Store: std::fmt::Debug + Send + Sync {
    /// Object `key`'s bytes; `None` when there is none. A link in its
    /// place, or on the way to it, is refused ([`Error::Symlink`]).
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Writes object `key` whole and durably: a reader sees the old bytes
    /// or the new, never a mix, and a crash leaves one of them.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<()>;

    /// Writes object `key` only if there is none: `false` (and nothing
    /// written) when one exists. Two writers racing: one wins.
    fn put_new(&self, key: &str, bytes: &[u8]) -> Result<bool>;

    /// What lies directly under `prefix` (`""`: the top), in no order.
    /// No prefix there: nothing.
    fn list(&self, prefix: &str) -> Result<Vec<Entry>>;

    /// Removes object `key`; none there is no error.
    fn delete(&self, key: &str) -> Result<()>;

    /// Where `key` is, for messages: a path, or a URL.
    fn locate(&self, key: &str) -> PathBuf;
}

/// A repository in a directory (a NAS mount, a local disk).
#[derive(Debug, Clone)]
pub struct Directory {
    root: PathBuf,
}

impl Directory {
    pub fn new(root: PathBuf) -> Directory {
        Directory { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path of `key`, checked: relative names only (no `..`, no
    /// root), and no link on the way from the root to it.
    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key, &self.root.join(key))?;
        let relative = Path::new(key);
        let mut path = self.root.clone();
        for part in relative.components() {
            path.push(part);
            if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(Error::Symlink { path });
            }
        }
        Ok(path)
    }

    /// `key`'s directory, made where missing (never through a link).
    fn parent_made(&self, key: &str) -> Result<PathBuf> {
        let path = self.path(key)?;
        let parent = path.parent().unwrap_or(&self.root).to_path_buf();
        if let Err(source) = fs::create_dir_all(&parent) {
            return Err(Error::Io {
                action: "creating",
                path: parent,
                source,
            });
        }
        // A link planted between the check and the creation.
        self.path(key)?;
        Ok(parent)
    }
}

impl Store for Directory {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        read_if_there(&self.path(key)?)
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let dir = self.parent_made(key)?;
        write_atomic(&dir, last_name(key), bytes)
    }

    fn put_new(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        let dir = self.parent_made(key)?;
        let (tmp, _file) = write_temp(&dir, last_name(key), bytes)?;
        // link(2) never replaces: a concurrent writer's object stands.
        let path = dir.join(last_name(key));
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => sync_dir(&dir).map(|()| true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(source) => Err(Error::Io {
                action: "creating",
                path,
                source,
            }),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let dir = match prefix {
            "" => self.root.clone(),
            _ => self.path(prefix)?,
        };
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !prefix.is_empty() => {
                return Ok(Vec::new());
            }
            Err(source) => {
                return Err(Error::Io {
                    action: "listing",
                    path: dir,
                    source,
                });
            }
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| Error::Io {
                action: "listing",
                path: dir.clone(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            match entry.file_type() {
                Ok(t) if t.is_dir() => found.push(Entry::Prefix(name)),
                Ok(t) if t.is_file() => found.push(Entry::Object(name)),
                Ok(t) if t.is_symlink() => found.push(Entry::Link(name)),
                _ => {}
            }
        }
        Ok(found)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io {
                action: "removing",
                path,
                source,
            }),
        }
    }

    fn locate(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
}

/// Refuses a key that is not plain names joined by `/` (`..`, a leading
/// `/`, an empty name): a key names a place inside the repository only.
/// `location` says where, for the message.
pub(super) fn check_key(key: &str, location: &Path) -> Result<()> {
    let plain = !key.is_empty()
        && key.split('/').all(|part| !part.is_empty())
        && Path::new(key)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    match plain {
        true => Ok(()),
        false => Err(Error::BadRepo {
            path: location.into(),
            reason: "a key must be a relative path of plain names".into(),
        }),
    }
}

/// The last name of `key`.
fn last_name(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// Reads a file the repository holds, refusing a symlink in its place.
pub(super) fn read_nofollow(path: &Path) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// [`read_nofollow`], with `None` for a file that is not there.
pub(super) fn read_if_there(path: &Path) -> Result<Option<Vec<u8>>> {
    match read_nofollow(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            Err(Error::Symlink { path: path.into() })
        }
        Err(source) => Err(Error::Io {
            action: "reading",
            path: path.into(),
            source,
        }),
    }
}

/// Creates a new temp file for `name` in `dir` (never an existing file or
/// a planted symlink: O_EXCL), writes and syncs `bytes`.
pub(super) fn write_temp(dir: &Path, name: &str, bytes: &[u8]) -> Result<(PathBuf, File)> {
    let mut attempt = 0u32;
    loop {
        let tmp = dir.join(format!(".{name}.tmp-{}-{}", std::process::id(), attempt));
        let opened = OpenOptions::new().write(true).create_new(true).open(&tmp);
        let mut f = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1;
                continue;
            }
            Err(source) => {
                return Err(Error::Io {
                    action: "creating",
                    path: tmp,
                    source,
                });
            }
        };
        if let Err(source) = f.write_all(bytes).and_then(|_| f.sync_all()) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::Io {
                action: "writing",
                path: tmp,
                source,
            });
        }
        return Ok((tmp, f));
    }
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error::Io {
            action: "syncing",
            path: dir.into(),
            source,
        })
}

/// Writes `name` in `dir` through a new synced temp file and a rename (a
/// symlink at `name` is replaced, never followed).
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let (tmp, _file) = write_temp(dir, name, bytes)?;
    let path = dir.join(name);
    if let Err(source) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Io {
            action: "writing",
            path,
            source,
        });
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bitback-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_directory_keeps_objects_by_key() {
        let root = scratch("keys");
        let store = Directory::new(root.clone());
        assert_eq!(store.get("vm/state.json").unwrap(), None);
        store.put("vm/state.json", b"one").unwrap();
        store.put("vm/state.json", b"two").unwrap();
        assert_eq!(
            store.get("vm/state.json").unwrap().as_deref(),
            Some(&b"two"[..])
        );
        assert_eq!(fs::read(root.join("vm/state.json")).unwrap(), b"two");
        assert!(store.put_new("vm/id.json", b"first").unwrap());
        assert!(!store.put_new("vm/id.json", b"second").unwrap());
        assert_eq!(
            store.get("vm/id.json").unwrap().as_deref(),
            Some(&b"first"[..])
        );
        fs::create_dir(root.join("vm/p1")).unwrap();
        let mut listed = store.list("vm").unwrap();
        listed.sort_by(|a, b| a.name().cmp(b.name()));
        assert_eq!(
            listed,
            [
                Entry::Object("id.json".into()),
                Entry::Prefix("p1".into()),
                Entry::Object("state.json".into()),
            ]
        );
        assert!(store.list("gone").unwrap().is_empty());
        store.delete("vm/id.json").unwrap();
        store.delete("vm/id.json").unwrap();
        assert_eq!(store.get("vm/id.json").unwrap(), None);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_directory_refuses_links_and_keys_that_leave_it() {
        let root = scratch("links");
        let outside = scratch("links-outside");
        fs::write(outside.join("state.json"), b"theirs").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("vm")).unwrap();
        let store = Directory::new(root.clone());
        assert!(matches!(
            store.get("vm/state.json"),
            Err(Error::Symlink { .. })
        ));
        assert!(matches!(
            store.put("vm/state.json", b"x"),
            Err(Error::Symlink { .. })
        ));
        assert_eq!(fs::read(outside.join("state.json")).unwrap(), b"theirs");
        std::os::unix::fs::symlink(outside.join("state.json"), root.join("leak.json")).unwrap();
        assert!(matches!(store.get("leak.json"), Err(Error::Symlink { .. })));
        for key in ["../x", "/etc/passwd", "a/../../x", ""] {
            assert!(store.get(key).is_err(), "{key}");
        }
        let mut listed = store.list("").unwrap();
        listed.sort_by(|a, b| a.name().cmp(b.name()));
        assert_eq!(
            listed,
            [Entry::Link("leak.json".into()), Entry::Link("vm".into())]
        );
        fs::remove_dir_all(&root).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }
}
