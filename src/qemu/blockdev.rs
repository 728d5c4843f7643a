//! The block nodes, addresses and exports bitback asks QEMU for, as types:
//! `blockdev-add` (and qemu-storage-daemon's `--blockdev`) arguments,
//! `SocketAddress` and `--export`/`block-export-add` values. Only the
//! drivers and options bitback uses; each serializes to what QEMU's schema
//! names (`BlockdevOptions`, `SocketAddress`, `BlockExportOptions`).

use std::path::PathBuf;

use serde::Serialize;

/// A block node's options (`BlockdevOptions`), by driver.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(
    tag = "driver",
    rename_all = "kebab-case",
    rename_all_fields = "kebab-case"
)]
pub enum Node {
    /// A file in the host's file system (or `/dev/fdset/N`).
    File {
        filename: PathBuf,
        #[serde(skip_serializing_if = "Option::is_none")]
        node_name: Option<String>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        read_only: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        discard: Option<Discard>,
    },
    /// A host block device (LVM, DRBD, a loop device).
    #[serde(rename = "host_device")]
    HostDevice {
        filename: PathBuf,
    },
    Qcow2(Box<Qcow2>),
    Raw {
        #[serde(skip_serializing_if = "Option::is_none")]
        node_name: Option<String>,
        file: Box<Node>,
    },
    /// A LUKS volume, its key in secret `key_secret`.
    Luks {
        #[serde(skip_serializing_if = "Option::is_none")]
        node_name: Option<String>,
        file: Box<Node>,
        key_secret: String,
    },
    /// An NBD client of `server`'s export `export`.
    Nbd {
        node_name: String,
        export: String,
        server: Address,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        read_only: bool,
    },
    /// The guard's filter: writes to `file` copy the old data to `target`
    /// first.
    CopyBeforeWrite {
        node_name: String,
        /// The node guarded (a name).
        file: String,
        /// Where old data goes (a name).
        target: String,
        on_cbw_error: &'static str,
        cbw_timeout: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        bitmap: Option<BitmapRef>,
        #[serde(skip_serializing_if = "Option::is_none")]
        discard: Option<Discard>,
    },
    /// Reads the point a `copy-before-write` filter keeps.
    SnapshotAccess {
        node_name: String,
        file: String,
    },
}

/// `discard` of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Discard {
    Unmap,
}

/// A path QEMU's JSON cannot name: JSON strings are UTF-8, and the path
/// is not.
#[derive(Debug, thiserror::Error)]
#[error("{what} names a path that is not UTF-8, which QEMU's JSON options cannot carry; rename it")]
pub struct NotUtf8 {
    pub what: String,
}

/// `value` as JSON; `what` names it in the error (a path in it that is
/// not UTF-8 is the one way this fails).
pub fn json_of(what: &str, value: &impl Serialize) -> Result<serde_json::Value, NotUtf8> {
    serde_json::to_value(value).map_err(|_| NotUtf8 { what: what.into() })
}

/// The qcow2 driver's options.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2 {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    pub file: Node,
    /// `None`: the image's own; `Some(None)`: no backing file (`null`);
    /// `Some(Some(node))`: that node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing: Option<Option<Box<Node>>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discard: Option<Discard>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,
    /// The image's LUKS encryption, its key in a secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<Encrypt>,
}

impl Qcow2 {
    /// A qcow2 node over `file`, every option QEMU's default.
    pub fn over(file: Node) -> Qcow2 {
        Qcow2 {
            node_name: None,
            file,
            backing: None,
            read_only: false,
            discard: None,
            cache: None,
            encrypt: None,
        }
    }

    pub fn named(mut self, name: impl Into<String>) -> Qcow2 {
        self.node_name = Some(name.into());
        self
    }

    /// Opened without its backing file.
    pub fn no_backing(mut self) -> Qcow2 {
        self.backing = Some(None);
        self
    }

    pub fn read_only(mut self) -> Qcow2 {
        self.read_only = true;
        self
    }

    /// Encrypted, the key in secret `secret` (none: as it is).
    pub fn encrypted(mut self, secret: Option<&str>) -> Qcow2 {
        self.encrypt = secret.map(Encrypt::luks);
        self
    }

    pub fn node(self) -> Node {
        Node::Qcow2(Box::new(self))
    }
}

impl Node {
    /// The node as QEMU's `json:` pseudo file name (`qemu-img`'s argument).
    pub fn json_filename(&self) -> Result<String, NotUtf8> {
        Ok(format!("json:{}", json_of("the image", self)?))
    }

    /// A plain file node, read-write.
    pub fn file(filename: impl Into<PathBuf>) -> Node {
        Node::File {
            filename: filename.into(),
            node_name: None,
            read_only: false,
            discard: None,
        }
    }
}

/// A node's cache options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Cache {
    /// Flushes are ignored (bitback syncs the file itself).
    pub no_flush: bool,
}

/// A qcow2 image's encryption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Encrypt {
    pub format: &'static str,
    pub key_secret: String,
}

impl Encrypt {
    pub fn luks(secret: &str) -> Encrypt {
        Encrypt {
            format: "luks",
            key_secret: secret.into(),
        }
    }
}

/// A dirty bitmap, by node and name (`BlockDirtyBitmap`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BitmapRef {
    pub node: String,
    pub name: String,
}

impl BitmapRef {
    pub fn new(node: impl Into<String>, name: impl Into<String>) -> BitmapRef {
        BitmapRef {
            node: node.into(),
            name: name.into(),
        }
    }
}

/// A socket address (`SocketAddress`, flat).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Address {
    Unix {
        path: PathBuf,
    },
    Inet {
        host: String,
        port: String,
    },
    /// A descriptor passed to QEMU before (`getfd`), by its name.
    Fd {
        str: String,
    },
}

/// A block export (`BlockExportOptions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(
    tag = "type",
    rename_all = "lowercase",
    rename_all_fields = "kebab-case"
)]
pub enum Export {
    /// On the NBD server, as export `name`.
    Nbd {
        id: String,
        node_name: String,
        name: String,
        writable: bool,
    },
    /// As a file at `mountpoint` (FUSE).
    Fuse {
        id: String,
        node_name: String,
        mountpoint: PathBuf,
        writable: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn value(node: &impl Serialize) -> Value {
        serde_json::to_value(node).unwrap()
    }

    #[test]
    fn nodes_say_what_qemu_names() {
        let target = Qcow2 {
            cache: Some(Cache { no_flush: true }),
            ..Qcow2::over(Node::file("/r/a.qcow2"))
        }
        .named("t0")
        .no_backing()
        .encrypted(Some("k"))
        .node();
        assert_eq!(
            value(&target),
            json!({
                "driver": "qcow2", "node-name": "t0", "backing": null,
                "cache": {"no-flush": true},
                "encrypt": {"format": "luks", "key-secret": "k"},
                "file": {"driver": "file", "filename": "/r/a.qcow2"},
            })
        );
        let chain = Qcow2 {
            backing: Some(Some(Box::new(Qcow2::over(Node::file("/b")).node()))),
            ..Qcow2::over(Node::file("/c"))
        }
        .read_only()
        .node();
        assert_eq!(
            value(&chain),
            json!({
                "driver": "qcow2", "read-only": true,
                "file": {"driver": "file", "filename": "/c"},
                "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "/b"}},
            })
        );
        let filter = Node::CopyBeforeWrite {
            node_name: "f".into(),
            file: "n".into(),
            target: "t".into(),
            on_cbw_error: "break-snapshot",
            cbw_timeout: 5,
            bitmap: Some(BitmapRef::new("n", "b")),
            discard: Some(Discard::Unmap),
        };
        assert_eq!(
            value(&filter),
            json!({
                "driver": "copy-before-write", "node-name": "f", "file": "n", "target": "t",
                "on-cbw-error": "break-snapshot", "cbw-timeout": 5,
                "bitmap": {"node": "n", "name": "b"}, "discard": "unmap",
            })
        );
        let device = Node::Raw {
            node_name: Some("v".into()),
            file: Box::new(Node::HostDevice {
                filename: "/dev/vg/lv".into(),
            }),
        };
        assert_eq!(
            value(&device),
            json!({"driver": "raw", "node-name": "v",
                   "file": {"driver": "host_device", "filename": "/dev/vg/lv"}})
        );
        let access = Node::SnapshotAccess {
            node_name: "a".into(),
            file: "f".into(),
        };
        assert_eq!(
            value(&access),
            json!({"driver": "snapshot-access", "node-name": "a", "file": "f"})
        );
    }

    #[test]
    fn addresses_and_exports_say_what_qemu_names() {
        assert_eq!(
            value(&Address::Fd { str: "n".into() }),
            json!({"type": "fd", "str": "n"})
        );
        assert_eq!(
            value(&Address::Inet {
                host: "::".into(),
                port: "10809".into()
            }),
            json!({"type": "inet", "host": "::", "port": "10809"})
        );
        let export = Export::Nbd {
            id: "e0".into(),
            node_name: "vol0".into(),
            name: "disk".into(),
            writable: false,
        };
        assert_eq!(
            value(&export),
            json!({"type": "nbd", "id": "e0", "node-name": "vol0", "name": "disk", "writable": false})
        );
        let fuse = Export::Fuse {
            id: "e1".into(),
            node_name: "vol1".into(),
            mountpoint: "/m/d".into(),
            writable: false,
        };
        assert_eq!(
            value(&fuse),
            json!({"type": "fuse", "id": "e1", "node-name": "vol1", "mountpoint": "/m/d", "writable": false})
        );
    }

    #[test]
    fn a_path_that_is_not_utf8_is_an_error_not_a_panic() {
        use std::os::unix::ffi::OsStrExt;
        let path = std::path::Path::new(std::ffi::OsStr::from_bytes(b"/vm/disk-\xff.qcow2"));
        let image = Qcow2::over(Node::file(path)).read_only().node();
        let e = image.json_filename().unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        assert!(Node::file("/vm/disk.qcow2").json_filename().is_ok());
    }
}
