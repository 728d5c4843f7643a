//! A repository in object storage: [`Bucket`], the [`Store`] over an S3
//! bucket and prefix. Its keys are the directory repository's paths
//! under the prefix, so an `aws s3 sync` of the prefix to a directory
//! gives the same repository, and back.
//!
//! What S3 gives for what the directory does: a put is whole and atomic
//! by itself (no temp file, no rename); a put only if absent is
//! `If-None-Match: *`; a listing is by prefix and `/`. A delete in a
//! bucket that keeps versions adds a delete marker.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use super::names::check_name;
use super::store::{Entry, Store, check_key};
use crate::s3::{Client, Config, Location, Put, Retention, Version};

/// A repository's objects in an S3 bucket, under a prefix.
#[derive(Debug)]
pub struct Bucket {
    client: std::sync::Arc<Client>,
    location: Location,
}

impl Bucket {
    /// The bucket at `location`, reached as `config` says. Nothing is
    /// asked of the store yet.
    pub fn new(config: &Config, location: Location) -> Result<Bucket> {
        Ok(Bucket {
            client: std::sync::Arc::new(Client::new(config, &location)?),
            location,
        })
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Uploads the file at `path` as repository key `key` (multipart
    /// when large; the store checks every part's MD5), under `retention`
    /// when given, each byte shown to `proof` before it leaves (the object
    /// is made only if `proof` holds). The bytes uploaded.
    pub fn upload_file(
        &self,
        key: &str,
        path: &std::path::Path,
        retention: Option<&Retention>,
        proof: &mut dyn crate::s3::Proof,
    ) -> Result<u64> {
        Ok(self
            .client
            .upload_file(&self.object(key)?, path, retention, proof)?)
    }

    /// Begins the upload of repository key `key`, under `retention` when
    /// given, fed as the file at `path` is written ([`crate::s3::Feed`]).
    pub fn feed(
        &self,
        key: &str,
        path: &std::path::Path,
        retention: Option<&Retention>,
    ) -> Result<crate::s3::Feed> {
        Ok(self.client.feed(&self.object(key)?, path, retention)?)
    }

    /// Repository key `key` streamed into a new file at `path`. The bytes
    /// written.
    pub fn download(&self, key: &str, path: &std::path::Path) -> Result<u64> {
        Ok(self.client.download(&self.object(key)?, path)?)
    }

    /// [`Store::put_new`], under `retention` when given.
    pub fn put_new_retained(
        &self,
        key: &str,
        bytes: &[u8],
        retention: Option<&Retention>,
    ) -> Result<bool> {
        let put = self
            .client
            .put(&self.object(key)?, bytes, true, retention)?;
        Ok(matches!(put, Put::Written { .. }))
    }

    /// Whether the bucket has object lock.
    pub fn object_lock_enabled(&self) -> Result<bool> {
        Ok(self.client.object_lock_enabled()?)
    }

    /// Makes object `key` retained at least until `retention.until`: a
    /// later date stands, an earlier one (or none) is extended. Whether
    /// it was extended.
    pub fn extend_retention(&self, key: &str, retention: &Retention) -> Result<bool> {
        let object = self.object(key)?;
        let until =
            |r: &Retention| crate::repo::time::Utc::parse_rfc3339(&r.until).map(|t| t.to_unix());
        if let Some(held) = self.client.retention(&object)?
            && until(&held) >= until(retention)
        {
            return Ok(false);
        }
        self.client.set_retention(&object, retention)?;
        Ok(true)
    }

    /// Takes `vm`'s lock in the bucket for `holder` (a sync into it):
    /// `<vm>/.lock.json` (not `.lock`: that name is a directory repository's
    /// flock file, which an `aws s3 sync` of one copies up), written only if absent, removed when the lock is
    /// dropped. Held by another run: refused, naming it. Left by a run
    /// of this host that is gone (its pid is not running): taken over.
    pub fn lock_vm(&self, vm: &str, holder: &Holder) -> Result<BucketLock<'_>> {
        check_name("VM", vm)?;
        let key = format!("{vm}/.lock.json");
        let bytes = serde_json::to_vec_pretty(holder).map_err(Error::Encoding)?;
        for _ in 0..2 {
            if self.put_new(&key, &bytes)? {
                return Ok(BucketLock { bucket: self, key });
            }
            let held = self.get(&key)?;
            let other: Option<Holder> =
                held.as_deref().and_then(|b| serde_json::from_slice(b).ok());
            match other {
                Some(other) if other.host == holder.host && !other.running() => {
                    tracing::info!(
                        vm,
                        pid = other.pid,
                        "taking over the bucket lock of a sync that is gone"
                    );
                    self.delete(&key)?;
                }
                // Removed meanwhile: try again.
                None if held.is_none() => {}
                _ => {
                    let holder = other.map_or_else(
                        || "an unreadable lock".to_string(),
                        |o| {
                            format!(
                                "{} of pid {} on {} since {}",
                                o.purpose, o.pid, o.host, o.started
                            )
                        },
                    );
                    return Err(Error::Locked {
                        vm: vm.to_string(),
                        holder: format!("{holder} ({})", self.locate(&key).display()),
                    });
                }
            }
        }
        Err(Error::Locked {
            vm: vm.to_string(),
            holder: format!("a run that keeps taking {}", self.locate(&key).display()),
        })
    }

    /// Aborts the multipart uploads left under `vm`'s prefix by runs that
    /// died: to be called holding `vm`'s lock (no live run has one). How
    /// many.
    pub fn abort_incomplete(&self, _lock: &BucketLock<'_>, vm: &str) -> Result<usize> {
        let prefix = format!("{}{vm}/", self.location.prefix);
        let uploads = self.client.incomplete_uploads(&prefix)?;
        for (key, id) in &uploads {
            tracing::info!(key, "aborting a multipart upload an interrupted sync left");
            self.client.abort_upload(key, id)?;
        }
        Ok(uploads.len())
    }

    /// Every version and delete marker of the objects under `vm`'s
    /// prefix, by repository key, each key's oldest first.
    pub fn versions(&self, vm: &str) -> Result<BTreeMap<String, Vec<Version>>> {
        check_name("VM", vm)?;
        let prefix = format!("{}{vm}/", self.location.prefix);
        let mut by_key: BTreeMap<String, Vec<Version>> = BTreeMap::new();
        for v in self.client.versions(&prefix)? {
            let Some(key) = v.key.strip_prefix(&self.location.prefix) else {
                continue;
            };
            by_key.entry(key.to_string()).or_default().push(v.clone());
        }
        // The store lists each key's newest first.
        for versions in by_key.values_mut() {
            versions.reverse();
        }
        Ok(by_key)
    }

    /// The VMs with any object in the bucket, deleted ones (only delete
    /// markers over their versions) included.
    pub fn all_vms(&self) -> Result<Vec<String>> {
        let mut vms: Vec<String> = self
            .client
            .version_prefixes(&self.location.prefix)?
            .iter()
            .filter_map(|p| p.strip_prefix(&self.location.prefix))
            .map(|p| p.trim_end_matches('/').to_string())
            .filter(|vm| check_name("VM", vm).is_ok())
            .collect();
        vms.sort();
        vms.dedup();
        Ok(vms)
    }

    /// Version `version` of repository key `key`; `None` when the store
    /// has no such version.
    pub fn get_version(&self, key: &str, version: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.client.get_version(&self.object(key)?, Some(version))?)
    }

    /// Fills `buf` from `offset` of version `version` of `key`.
    pub fn read_range(&self, key: &str, version: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        Ok(self
            .client
            .read_range(&self.object(key)?, version, offset, buf)?)
    }

    /// The object-lock retention on version `version` of `key`, if any.
    pub fn retention_of(&self, key: &str, version: &str) -> Result<Option<Retention>> {
        Ok(self
            .client
            .retention_of(&self.object(key)?, Some(version))?)
    }

    /// Removes version `version` of `key` for good (refused by the store
    /// while an object lock holds it). A bucket that never kept versions
    /// has one, `null`: a plain delete removes it.
    /// Removes every version of `key` (bitback's own notes: leases), for
    /// good; none there is no error.
    pub fn remove_all(&self, key: &str) -> Result<()> {
        let object = self.object(key)?;
        for v in self.client.versions(&object)? {
            if v.key == object {
                self.delete_version(key, &v.id)?;
            }
        }
        Ok(())
    }

    pub fn delete_version(&self, key: &str, version: &str) -> Result<()> {
        let object = self.object(key)?;
        match version {
            "null" => Ok(self.client.delete(&object)?),
            _ => Ok(self.client.delete_version(&object, version)?),
        }
    }

    /// The object key of repository key `key`.
    fn object(&self, key: &str) -> Result<String> {
        check_key(key, &self.locate(key))?;
        Ok(format!("{}{key}", self.location.prefix))
    }
}

impl Store for Bucket {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.client.get(&self.object(key)?)?)
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.client.put(&self.object(key)?, bytes, false, None)?;
        Ok(())
    }

    fn put_new(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        let put = self.client.put(&self.object(key)?, bytes, true, None)?;
        Ok(matches!(put, Put::Written { .. }))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let under = match prefix {
            "" => self.location.prefix.clone(),
            p => format!("{}/", self.object(p)?),
        };
        let listing = self.client.list(&under)?;
        let last = |whole: &str| whole[under.len()..].trim_end_matches('/').to_string();
        let mut found: Vec<Entry> = listing
            .objects
            .iter()
            .filter(|k| k.len() > under.len())
            .map(|k| Entry::Object(last(k)))
            .collect();
        found.extend(listing.prefixes.iter().map(|p| Entry::Prefix(last(p))));
        Ok(found)
    }

    fn delete(&self, key: &str) -> Result<()> {
        Ok(self.client.delete(&self.object(key)?)?)
    }

    fn locate(&self, key: &str) -> PathBuf {
        let Location { bucket, prefix } = &self.location;
        PathBuf::from(format!("s3://{bucket}/{prefix}{key}"))
    }
}

/// Who holds a VM's lock in a bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    pub purpose: String,
    /// RFC 3339.
    pub started: String,
}

impl Holder {
    /// Whether its pid runs (on this host).
    fn running(&self) -> bool {
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        !matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        )
    }
}

/// A VM's lock in a bucket; removed when dropped.
#[derive(Debug)]
pub struct BucketLock<'a> {
    bucket: &'a Bucket,
    key: String,
}

impl Drop for BucketLock<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.bucket.delete(&self.key) {
            tracing::warn!(lock = %self.key, error = %e, "cannot remove the bucket lock; the next sync of this host takes it over");
        }
    }
}
