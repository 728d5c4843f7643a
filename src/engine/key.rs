//! Encryption keys, given as files: the file's bytes, exactly (a trailing
//! newline included), are the LUKS passphrase. The same file opens the
//! backups with `qemu-img --object secret,id=k,file=FILE,format=raw`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The largest key file read: a passphrase, not a document.
const MAX_KEY: u64 = 64 << 10;

#[derive(Clone)]
pub struct Key {
    bytes: Vec<u8>,
    path: PathBuf,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.path.display())
    }
}

impl Key {
    pub fn from_file(path: &Path) -> anyhow::Result<Key> {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("reading key file {}", path.display()))?;
        if !meta.is_file() {
            bail!("key file {} is not a regular file", path.display());
        }
        // As ssh does with a private key: a key others may read is refused,
        // not used with a warning, since a warning in a nightly job's log
        // is read by nobody while the key stays exposed.
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "key file {} has mode {mode:04o}: its group or others may use it, and it opens every backup
                 hint: chmod 600 {}",
                path.display(),
                path.display()
            );
        }
        if meta.len() > MAX_KEY {
            bail!(
                "key file {} holds {} bytes; a key file holds at most {MAX_KEY}",
                path.display(),
                meta.len()
            );
        }
        let bytes =
            std::fs::read(path).with_context(|| format!("reading key file {}", path.display()))?;
        if bytes.is_empty() {
            bail!("key file {} is empty", path.display());
        }
        let path =
            std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
        Ok(Key { bytes, path })
    }

    /// The passphrase.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Runs `cmd` with the key on its stdin (for `file=/dev/stdin` secret
    /// objects) and returns its output.
    pub fn feed(&self, cmd: &mut std::process::Command) -> std::io::Result<std::process::Output> {
        use std::io::Write;
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            // A tool that fails before reading its stdin closes the pipe;
            // its output says why.
            let _ = stdin.write_all(&self.bytes);
        }
        child.wait_with_output()
    }

    /// The file the key came from (absolute).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key as QMP's `secret` object takes it with `format: base64`.
    pub fn base64(&self) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::with_capacity(self.bytes.len().div_ceil(3) * 4);
        for chunk in self.bytes.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(bytes: &[u8]) -> Key {
        Key {
            bytes: bytes.to_vec(),
            path: PathBuf::new(),
        }
    }

    #[test]
    fn base64_of_every_tail_length() {
        // RFC 4648's test vectors.
        for (input, output) in [
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(key(input.as_bytes()).base64(), output, "{input}");
        }
        assert_eq!(key(&[0xff, 0xfe, 0x00]).base64(), "//4A");
    }

    #[test]
    fn empty_and_huge_key_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("bitback-key-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, bytes: &[u8], mode: u32| {
            use std::os::unix::fs::PermissionsExt;
            let path = dir.join(name);
            std::fs::write(&path, bytes).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let empty = write("empty", b"", 0o600);
        assert!(format!("{:#}", Key::from_file(&empty).unwrap_err()).contains("empty"));
        let huge = write("huge", &vec![b'x'; MAX_KEY as usize + 1], 0o600);
        assert!(format!("{:#}", Key::from_file(&huge).unwrap_err()).contains("at most"));
        let good = write("good", b"secret\n", 0o600);
        assert_eq!(Key::from_file(&good).unwrap().base64(), "c2VjcmV0Cg==");
        for mode in [0o640, 0o604, 0o644, 0o660] {
            let loose = write("loose", b"secret\n", mode);
            let e = format!("{:#}", Key::from_file(&loose).unwrap_err());
            assert!(
                e.contains(&format!("mode {mode:04o}")) && e.contains("chmod 600"),
                "{e}"
            );
        }
        // The owner's own bits are the owner's business.
        let read_only = write("read-only", b"secret\n", 0o400);
        assert!(Key::from_file(&read_only).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
