//! A repository in object storage: [`Bucket`], the [`Store`] over an S3
//! bucket and prefix. Its keys are the directory repository's paths
//! under the prefix, so an `aws s3 sync` of the prefix to a directory
//! gives the same repository, and back.
//!
//! What S3 gives for what the directory does: a put is whole and atomic
//! by itself (no temp file, no rename); a put only if absent is
//! `If-None-Match: *`; a listing is by prefix and `/`. A delete in a
//! bucket that keeps versions adds a delete marker.

use std::path::PathBuf;

use super::error::Result;
use super::store::{Entry, Store, check_key};
use crate::s3::{Client, Config, Location, Put, Retention};

/// A repository's objects in an S3 bucket, under a prefix.
#[derive(Debug)]
pub struct Bucket {
    client: Client,
    location: Location,
}

impl Bucket {
    /// The bucket at `location`, reached as `config` says. Nothing is
    /// asked of the store yet.
    pub fn new(config: &Config, location: Location) -> Result<Bucket> {
        Ok(Bucket {
            client: Client::new(config, &location)?,
            location,
        })
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Uploads the file at `path` as repository key `key` (multipart
    /// when large; the store checks every part's MD5), under `retention`
    /// when given. The bytes uploaded.
    pub fn upload_file(
        &self,
        key: &str,
        path: &std::path::Path,
        retention: Option<&Retention>,
    ) -> Result<u64> {
        Ok(self
            .client
            .upload_file(&self.object(key)?, path, retention)?)
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
