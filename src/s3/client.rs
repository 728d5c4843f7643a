//! The S3 requests a repository needs, signed (SigV4, by `rusty-s3`) and
//! sent (by `ureq`, blocking: the repository's own calls are blocking, and
//! data moves on threads of its own). Each request is tried again on a
//! connection failure or a 5xx answer, with growing pauses, a bounded
//! number of times; then it fails saying what it tried.

use std::time::Duration;

use std::io::Read;
use std::sync::PoisonError;

use base64::Engine;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use sha2::Digest;
use tracing::{debug, info, warn};

use super::{Config, Error, Location, Proof};

/// The largest object sent in one request; larger ones go up in parts.
pub const PART: u64 = 64 << 20;
/// Parts of one multipart upload in flight at once.
pub const UPLOADERS: usize = 4;

/// The part size of a multipart upload of `len` bytes: 16 MiB, or larger
/// (whole MiB) where 9,000 parts would not hold the file (S3 takes
/// 10,000 at most).
pub fn part_size(len: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    (16 * MIB).max(len.div_ceil(9_000).div_ceil(MIB) * MIB)
}

/// How long a signed URL stays good: longer than any one request's tries.
const SIGNED_FOR: Duration = Duration::from_secs(15 * 60);
/// Tries of one request, and the pause before each retry.
const PAUSES: [Duration; 4] = [
    Duration::from_millis(200),
    Duration::from_millis(800),
    Duration::from_secs(2),
    Duration::from_secs(5),
];

/// An S3 bucket, as one set of credentials reaches it.
pub struct Client {
    bucket: Bucket,
    credentials: Credentials,
    agent: ureq::Agent,
    location: String,
    /// How the store is to check the bytes of a part, once a probe found
    /// out ([`Client::start_upload`]).
    part_sum: std::sync::OnceLock<PartSum>,
}

/// What a part's bytes go up with, for the store to check them against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PartSum {
    /// `x-amz-checksum-crc32c`: a hardware CRC, over twenty times cheaper
    /// than MD5, taken where a probe showed the store refusing a wrong
    /// one, and each part's answer echoes it back.
    Crc32c,
    /// `Content-MD5`, which every store checks.
    Md5,
}

/// A part uploaded: its entity tag, and its CRC32C when it went with one.
pub(super) struct Part {
    etag: String,
    crc32c: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// What a listing found directly under a prefix.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Whole keys of the objects.
    pub objects: Vec<String>,
    /// Whole prefixes (ending in the delimiter) more objects sit under.
    pub prefixes: Vec<String>,
}

/// An object-lock retention: no version it is on can be deleted or
/// overwritten before `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// `COMPLIANCE` (nobody can shorten it) or `GOVERNANCE` (a holder of
    /// `s3:BypassGovernanceRetention` can).
    pub mode: LockMode,
    /// RFC 3339, UTC: `2027-01-05T00:00:00Z`.
    pub until: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Compliance,
    Governance,
}

impl LockMode {
    fn as_str(self) -> &'static str {
        match self {
            LockMode::Compliance => "COMPLIANCE",
            LockMode::Governance => "GOVERNANCE",
        }
    }
}

/// One version of an object, or a delete marker, as a listing of
/// versions gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// The whole key.
    pub key: String,
    /// The store's id of the version (`null` in a bucket that never kept
    /// versions).
    pub id: String,
    /// Bytes (0 for a delete marker).
    pub size: u64,
    /// A delete marker: the key reads as absent while it is the newest.
    pub marker: bool,
    /// The store's entity tag, unquoted (of an object written in one
    /// request, the hex MD5 of its bytes on AWS and the stores like it).
    pub etag: Option<String>,
}

/// The hex MD5 of `bytes`: what a store's entity tag of an object written
/// in one request is.
pub fn md5_hex(bytes: &[u8]) -> String {
    md5::Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One page of a listing of versions.
struct VersionsPage {
    versions: Vec<Version>,
    prefixes: Vec<String>,
    /// Where the next page starts (key marker, version id marker), when
    /// the listing is truncated.
    next: Option<(String, String)>,
}

/// A page of `ListObjectVersions`: its `<Version>` and `<DeleteMarker>`
/// elements in document order (each key's newest first), its common
/// prefixes, and where the next page starts.
fn parse_versions(xml: &str) -> Result<VersionsPage, String> {
    if !xml.contains("<ListVersionsResult") {
        return Err(format!("no ListVersionsResult in {:.200}", xml));
    }
    let mut versions = Vec::new();
    let mut rest = xml;
    loop {
        let plain = rest.find("<Version>");
        let marker = rest.find("<DeleteMarker>");
        let (is_marker, at) = match (plain, marker) {
            (Some(v), Some(d)) if d < v => (true, d),
            (Some(v), _) => (false, v),
            (None, Some(d)) => (true, d),
            (None, None) => break,
        };
        let (open, close) = match is_marker {
            true => ("<DeleteMarker>", "</DeleteMarker>"),
            false => ("<Version>", "</Version>"),
        };
        let body = &rest[at + open.len()..];
        let end = body
            .find(close)
            .ok_or_else(|| format!("{open} is not closed"))?;
        let element = &body[..end];
        let key = tag(element, "Key").ok_or("a version without a key")?;
        let id = tag(element, "VersionId").unwrap_or_else(|| "null".into());
        let size = match is_marker {
            true => 0,
            false => tag(element, "Size")
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("version {id} of {key} has no size"))?,
        };
        let etag = tag(element, "ETag").map(|e| unescape(&e).trim_matches('"').to_string());
        versions.push(Version {
            key: unescape(&key),
            id: unescape(&id),
            size,
            marker: is_marker,
            etag,
        });
        rest = &body[end + close.len()..];
    }
    let prefixes = xml
        .split("<CommonPrefixes>")
        .skip(1)
        .filter_map(|p| tag(p, "Prefix"))
        .map(|p| unescape(&p))
        .collect();
    let next = match tag(xml, "IsTruncated").as_deref() {
        Some("true") => Some((
            tag(xml, "NextKeyMarker")
                .map(|k| unescape(&k))
                .ok_or("a truncated listing without NextKeyMarker")?,
            tag(xml, "NextVersionIdMarker")
                .map(|v| unescape(&v))
                .unwrap_or_default(),
        )),
        _ => None,
    };
    Ok(VersionsPage {
        versions,
        prefixes,
        next,
    })
}

/// Text made safe inside an XML element.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// XML's five escapes undone.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let Some(end) = rest.find(';') else {
            break;
        };
        let entity = &rest[1..end];
        let decoded = match entity {
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "amp" => Some('&'),
            // Numeric references (SeaweedFS quotes entity tags as &#34;).
            _ => entity
                .strip_prefix("#x")
                .or_else(|| entity.strip_prefix("#X"))
                .map(|hex| u32::from_str_radix(hex, 16))
                .or_else(|| entity.strip_prefix('#').map(str::parse))
                .and_then(Result::ok)
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// What one ranged GET of a download brought.
struct Chunk {
    len: usize,
    /// The object's length.
    total: u64,
    version: Option<String>,
}

/// The range of one GET of a download.
pub const DOWNLOAD_CHUNK: u64 = 16 << 20;

/// How a put went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Put {
    /// Written; the store's version id when the bucket keeps versions.
    Written { version: Option<String> },
    /// Not written: the put was only if absent, and an object was there.
    Exists,
}

impl Client {
    /// A client of the bucket at `location`, as `config` reaches it.
    pub fn new(config: &Config, location: &Location) -> Result<Client, Error> {
        let endpoint = config
            .endpoint
            .parse()
            .map_err(|e| Error::Config(format!("endpoint {}: {e}", config.endpoint)))?;
        let style = match config.path_style {
            true => UrlStyle::Path,
            false => UrlStyle::VirtualHost,
        };
        let bucket = Bucket::new(
            endpoint,
            style,
            location.bucket.clone(),
            config.region.clone(),
        )
        .map_err(|e| Error::Config(format!("bucket {}: {e}", location.bucket)))?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            // A store that takes a request and never answers (hung, or
            // cut off mid-way) costs a try, not the run.
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .timeout_global(Some(Duration::from_secs(600)))
            .build()
            .into();
        Ok(Client {
            bucket,
            credentials: config.credentials(),
            agent,
            location: format!("s3://{}", location.bucket),
            part_sum: std::sync::OnceLock::new(),
        })
    }

    /// Object `key`'s bytes; `None` when there is none (or only a delete
    /// marker).
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        self.get_version(key, None)
    }

    /// The bytes of version `version` of `key` (the current one when
    /// `None`); `None` when there is no such version.
    pub fn get_version(&self, key: &str, version: Option<&str>) -> Result<Option<Vec<u8>>, Error> {
        let mut action = self.bucket.get_object(Some(&self.credentials), key);
        if let Some(version) = version {
            action.query_mut().insert("versionId", version.to_string());
        }
        let url = action.sign(SIGNED_FOR);
        let reply = self.send("GET", key, || self.agent.get(url.as_str()).call())?;
        match reply.status {
            200 => Ok(Some(reply.body)),
            // A version id the store does not know is a 400 on some.
            404 | 400 if version.is_some() && reply.code().contains("NoSuch") => Ok(None),
            404 => Ok(None),
            _ => Err(reply.error("GET", key)),
        }
    }

    /// Fills `buf` from offset `offset` of version `version` of `key`
    /// (one ranged GET, tried again as every request is).
    pub fn read_range(
        &self,
        key: &str,
        version: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), Error> {
        if buf.is_empty() {
            return Ok(());
        }
        let chunk = self.get_chunk(key, Some(version), offset, buf)?;
        if chunk.len != buf.len() {
            return Err(Error::Reply {
                what: format!("GET {}/{key} at {offset}", self.location),
                reason: format!(
                    "the object ends at {}, before the {} bytes asked",
                    chunk.total,
                    buf.len()
                ),
            });
        }
        Ok(())
    }

    /// Every version and delete marker of the objects under `prefix`
    /// (all depths), in the store's order: by key, each key's newest
    /// first. A bucket that never kept versions gives one version of
    /// each object, its id `null`.
    pub fn versions(&self, prefix: &str) -> Result<Vec<Version>, Error> {
        Ok(self.list_versions(prefix, false)?.0)
    }

    /// The prefixes directly under `prefix` that hold any version or
    /// delete marker (a listing of versions, to the next `/`): what a
    /// plain listing gives, and those whose every object is deleted.
    pub fn version_prefixes(&self, prefix: &str) -> Result<Vec<String>, Error> {
        Ok(self.list_versions(prefix, true)?.1)
    }

    fn list_versions(
        &self,
        prefix: &str,
        delimited: bool,
    ) -> Result<(Vec<Version>, Vec<String>), Error> {
        let mut versions = Vec::new();
        let mut prefixes = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut action = self.bucket.list_objects_v2(Some(&self.credentials));
            let query = action.query_mut();
            query.remove("list-type");
            query.remove("encoding-type");
            query.insert("versions", "");
            query.insert("prefix", prefix.to_string());
            if delimited {
                query.insert("delimiter", "/");
            }
            if let Some((key, version)) = &markers {
                query.insert("key-marker", key.clone());
                query.insert("version-id-marker", version.clone());
            }
            let url = action.sign(SIGNED_FOR);
            let body = self.get_listing("LIST-VERSIONS", prefix, url.as_str())?;
            let text = String::from_utf8_lossy(&body);
            let page = parse_versions(&text).map_err(|reason| Error::Reply {
                what: format!("LIST-VERSIONS {}/{prefix}", self.location),
                reason,
            })?;
            versions.extend(page.versions);
            prefixes.extend(page.prefixes);
            match page.next {
                Some(next) if Some(&next) != markers.as_ref() => markers = Some(next),
                Some(_) => {
                    return Err(Error::Reply {
                        what: format!("LIST-VERSIONS {}/{prefix}", self.location),
                        reason: "the next page starts where this one did".into(),
                    });
                }
                None => return Ok((versions, prefixes)),
            }
        }
    }

    /// Object `key` downloaded into a new file at `path` (replaced when
    /// there), synced. It comes in ranged GETs of [`DOWNLOAD_CHUNK`],
    /// [`UPLOADERS`] at once after the first, each tried again on its own
    /// and bounded in time as every request is, so a large object over a
    /// slow link neither hits one request's time limit nor starts over
    /// after a failure; every range after the first names the version the
    /// first came from, so an object replaced meanwhile is not mixed.
    /// Memory: a range per GET in flight. The bytes written.
    pub fn download(&self, key: &str, path: &std::path::Path) -> Result<u64, Error> {
        use std::os::unix::fs::FileExt;
        use std::sync::Mutex;
        use std::sync::atomic::{AtomicU64, Ordering};
        let local = |e: std::io::Error| Error::Local {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let file = std::fs::File::create(path).map_err(local)?;
        // The first range gives the object's length and its version.
        let mut buf = vec![0u8; DOWNLOAD_CHUNK as usize];
        let first = self.get_chunk(key, None, 0, &mut buf)?;
        file.write_all_at(&buf[..first.len], 0).map_err(local)?;
        drop(buf);
        let (version, total) = (first.version, first.total);
        let ranges = total.div_ceil(DOWNLOAD_CHUNK).max(1);
        let next = AtomicU64::new(1);
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        let failed = || {
            failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some()
        };
        std::thread::scope(|scope| {
            for _ in 1..ranges.min(1 + UPLOADERS as u64) {
                scope.spawn(|| {
                    let mut buf = vec![0u8; DOWNLOAD_CHUNK as usize];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= ranges || failed() {
                            return;
                        }
                        let at = i * DOWNLOAD_CHUNK;
                        let want = DOWNLOAD_CHUNK.min(total - at) as usize;
                        let got = self
                            .get_chunk(key, version.as_deref(), at, &mut buf[..want])
                            .and_then(|chunk| match chunk.total == total && chunk.len == want {
                                true => file.write_all_at(&buf[..want], at).map_err(local),
                                false => Err(Error::Reply {
                                    what: format!("GET {}/{key}", self.location),
                                    reason: format!(
                                        "the object was {total} bytes long, and then {}",
                                        chunk.total
                                    ),
                                }),
                            });
                        if let Err(e) = got {
                            failure
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        if let Some(e) = failure.into_inner().unwrap_or_else(PoisonError::into_inner) {
            return Err(e);
        }
        file.sync_all().map_err(local)?;
        Ok(total)
    }

    /// One ranged GET of `key` (of `version`, when given) from `at` into
    /// `buf`, tried again as every request is: how much came, the
    /// object's length, and its version.
    fn get_chunk(
        &self,
        key: &str,
        version: Option<&str>,
        at: u64,
        buf: &mut [u8],
    ) -> Result<Chunk, Error> {
        let mut action = self.bucket.get_object(Some(&self.credentials), key);
        if let Some(version) = version {
            action.query_mut().insert("versionId", version.to_string());
        }
        let url = action.sign(SIGNED_FOR);
        let range = format!("bytes={at}-{}", at + buf.len() as u64 - 1);
        let what = || format!("GET {}/{key} ({range})", self.location);
        let mut tries = 0;
        loop {
            let failure = match self.agent.get(url.as_str()).header("range", &range).call() {
                Ok(mut response) if response.status().as_u16() == 206 => {
                    let header = |name: &str| {
                        response
                            .headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    };
                    let found = header("x-amz-version-id");
                    // `bytes FIRST-LAST/TOTAL`.
                    let total = header("content-range")
                        .and_then(|r| r.rsplit_once('/').and_then(|(_, t)| t.parse::<u64>().ok()));
                    let Some(total) = total else {
                        return Err(Error::Reply {
                            what: what(),
                            reason: "a ranged answer without the object's length".into(),
                        });
                    };
                    let len = (total.saturating_sub(at)).min(buf.len() as u64) as usize;
                    let mut body = response.body_mut().as_reader();
                    match body.read_exact(&mut buf[..len]) {
                        Ok(()) => {
                            return Ok(Chunk {
                                len,
                                total,
                                version: found,
                            });
                        }
                        Err(e) => e.to_string(),
                    }
                }
                // An empty object has no byte to range over.
                Ok(response) if response.status().as_u16() == 416 && at == 0 => {
                    let found = response
                        .headers()
                        .get("x-amz-version-id")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    return Ok(Chunk {
                        len: 0,
                        total: 0,
                        version: found,
                    });
                }
                Ok(response) if response.status().as_u16() == 200 => {
                    return Err(Error::Reply {
                        what: what(),
                        reason: "the store ignored the range (200, not 206)".into(),
                    });
                }
                Ok(mut response) => {
                    let status = response.status().as_u16();
                    let body = response.body_mut().read_to_vec().unwrap_or_default();
                    let reply = Reply {
                        status,
                        version: None,
                        etag: None,
                        crc32c: None,
                        body,
                    };
                    if status < 500 {
                        return Err(reply.error("GET", key));
                    }
                    reply.error("GET", key).to_string()
                }
                Err(e) => e.to_string(),
            };
            let Some(pause) = PAUSES.get(tries) else {
                return Err(Error::Unreachable {
                    what: what(),
                    tries: tries + 1,
                    reason: failure,
                });
            };
            debug!(key, failure, "trying the ranged GET again");
            std::thread::sleep(*pause);
            tries += 1;
        }
    }

    /// Writes object `key` whole: only if no object is there when
    /// `only_new` (`If-None-Match: *`), under `retention` when given.
    /// The store checks the bytes against their SHA-256, sent with them.
    pub fn put(
        &self,
        key: &str,
        bytes: &[u8],
        only_new: bool,
        retention: Option<&Retention>,
    ) -> Result<Put, Error> {
        // Both sums: Content-MD5 is what every store checks (and what S3
        // asks for with object lock), SHA-256 the stronger one.
        let mut headers: Vec<(&str, String)> = vec![
            ("content-md5", md5(bytes)),
            ("x-amz-checksum-sha256", sha256(bytes)),
        ];
        if only_new {
            headers.push(("if-none-match", "*".into()));
        }
        if let Some(r) = retention {
            headers.push(("x-amz-object-lock-mode", r.mode.as_str().into()));
            headers.push(("x-amz-object-lock-retain-until-date", r.until.clone()));
        }
        let mut action = self.bucket.put_object(Some(&self.credentials), key);
        for (name, value) in &headers {
            action.headers_mut().insert(*name, value.clone());
        }
        let url = action.sign(SIGNED_FOR);
        let reply = self.send("PUT", key, || {
            let mut request = self.agent.put(url.as_str());
            for (name, value) in &headers {
                request = request.header(*name, value);
            }
            request.send(bytes)
        })?;
        match reply.status {
            200 => Ok(Put::Written {
                version: reply.version,
            }),
            412 if only_new => Ok(Put::Exists),
            _ => Err(reply.error("PUT", key)),
        }
    }

    /// Uploads the file at `path` as object `key`, under `retention` when
    /// given: in one request up to [`PART`] bytes, else as a multipart
    /// upload whose parts ([`part_size`]) are read in order and sent by
    /// [`UPLOADERS`] threads at once (memory: twice that many parts). The
    /// store checks every request's bytes against their MD5
    /// (`Content-MD5`, which object lock also asks for). A failed
    /// multipart upload is aborted. Every byte read is shown to `proof`
    /// before it is sent, and the object is made only once `proof` holds
    /// at the end. The bytes uploaded.
    pub fn upload_file(
        &self,
        key: &str,
        path: &std::path::Path,
        retention: Option<&Retention>,
        proof: &mut dyn Proof,
    ) -> Result<u64, Error> {
        use std::io::Read;
        let io = |e: std::io::Error| Error::Local {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let unproven = |reason: String| Error::Unproven {
            path: path.to_path_buf(),
            reason,
        };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len <= PART {
            let mut bytes = Vec::with_capacity(len as usize);
            file.read_to_end(&mut bytes).map_err(io)?;
            proof.read(0, &bytes).map_err(unproven)?;
            proof.end(bytes.len() as u64).map_err(unproven)?;
            self.put(key, &bytes, false, retention)?;
            return Ok(bytes.len() as u64);
        }
        let (upload, sum) = self.start_upload(key, retention)?;
        let sent = self.send_parts(
            key,
            (&upload, sum),
            (&mut file, path),
            part_size(len),
            proof,
        );
        let done = sent.and_then(|(sent, parts)| {
            proof.end(sent).map_err(unproven)?;
            self.complete_multipart(key, &upload, &parts)?;
            Ok(sent)
        });
        if done.is_err() {
            let _ = self.abort_upload(key, &upload);
        }
        done
    }

    /// Reads `file` in parts of `size` bytes, shows each to `proof` and
    /// uploads them, several at once; the bytes sent and the parts'
    /// ETags, in order.
    fn send_parts(
        &self,
        key: &str,
        (upload, sum): (&str, PartSum),
        (file, path): (&mut std::fs::File, &std::path::Path),
        size: u64,
        proof: &mut dyn Proof,
    ) -> Result<(u64, Vec<Part>), Error> {
        use std::sync::{Mutex, mpsc};
        let len = file
            .metadata()
            .map_err(|e| Error::Local {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?
            .len();
        let direct = crate::direct::reopen_read(file);
        let (tx, rx) = mpsc::sync_channel::<(u16, PartBytes)>(UPLOADERS);
        let rx = Mutex::new(rx);
        let parts: Mutex<Vec<(u16, Part)>> = Mutex::new(Vec::new());
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        let failed = || {
            failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some()
        };
        let mut sent = 0u64;
        std::thread::scope(|scope| {
            for _ in 0..UPLOADERS {
                scope.spawn(|| {
                    loop {
                        let next = rx.lock().map(|r| r.recv());
                        let Ok(Ok((number, bytes))) = next else {
                            return;
                        };
                        // After a failure the parts still queued are let
                        // go unsent: the reader stops at its next look,
                        // and must never wait on a queue nobody empties.
                        if failed() {
                            continue;
                        }
                        match self.upload_part(key, (upload, sum), number, PartBody::Bytes(&bytes))
                        {
                            Ok(part) => parts
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push((number, part)),
                            Err(e) => {
                                failure
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .get_or_insert(e);
                                continue;
                            }
                        }
                        crate::fault::point("sync-mid-upload");
                    }
                });
            }
            let mut number = 0u16;
            let read = loop {
                if failed() {
                    break Ok(());
                }
                let want = len.saturating_sub(sent).min(size) as usize;
                if want == 0 {
                    break Ok(());
                }
                let buffer = match read_part(file, direct.as_ref(), sent, want) {
                    Ok(buffer) => buffer,
                    Err(e) => {
                        break Err(Error::Local {
                            path: path.to_path_buf(),
                            reason: e.to_string(),
                        });
                    }
                };
                if let Err(reason) = proof.read(sent, &buffer) {
                    break Err(Error::Unproven {
                        path: path.to_path_buf(),
                        reason,
                    });
                }
                number = match number.checked_add(1).filter(|n| *n <= 10_000) {
                    Some(n) => n,
                    None => break Err(Error::Config("over 10,000 parts".into())),
                };
                sent += buffer.len() as u64;
                if tx.send((number, buffer)).is_err() {
                    break Ok(());
                }
            };
            drop(tx);
            if let Err(e) = read {
                failure
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_or_insert(e);
            }
        });
        if let Some(e) = failure.into_inner().unwrap_or_else(PoisonError::into_inner) {
            return Err(e);
        }
        let mut parts = parts.into_inner().unwrap_or_else(PoisonError::into_inner);
        parts.sort_by_key(|(number, _)| *number);
        Ok((sent, parts.into_iter().map(|(_, part)| part).collect()))
    }

    /// Begins a multipart upload of `key`, and says what its parts go up
    /// with. The first time, it finds out whether the store checks a
    /// part's CRC32C: a part of one byte is sent with a wrong one. A store
    /// that refuses it checks them; one that takes it does not, and that
    /// upload is aborted and begun again for parts with MD5.
    pub(super) fn start_upload(
        &self,
        key: &str,
        retention: Option<&Retention>,
    ) -> Result<(String, PartSum), Error> {
        if let Some(&sum) = self.part_sum.get() {
            return Ok((self.start_multipart(key, retention, sum)?, sum));
        }
        let md5 = || -> Result<(String, PartSum), Error> {
            let _ = self.part_sum.set(PartSum::Md5);
            info!(store = %self.location, "the store does not check a part's CRC32C: parts go with their MD5");
            Ok((
                self.start_multipart(key, retention, PartSum::Md5)?,
                PartSum::Md5,
            ))
        };
        let upload = match self.start_multipart(key, retention, PartSum::Crc32c) {
            Ok(upload) => upload,
            Err(Error::Refused {
                status: 400 | 501, ..
            }) => return md5(),
            Err(e) => return Err(e),
        };
        let mut action = self
            .bucket
            .upload_part(Some(&self.credentials), key, 1, &upload);
        let wrong = crc32c_base64(b"probe", 1);
        action
            .headers_mut()
            .insert("x-amz-checksum-crc32c", wrong.clone());
        let url = action.sign(SIGNED_FOR);
        let reply = self.send("PART 1 (probe)", key, || {
            self.agent
                .put(url.as_str())
                .header("x-amz-checksum-crc32c", &wrong)
                .send(&b"probe"[..])
        })?;
        match reply.status {
            400 => {
                let _ = self.part_sum.set(PartSum::Crc32c);
                debug!(store = %self.location, "the store checks a part's CRC32C: parts go with it");
                Ok((upload, PartSum::Crc32c))
            }
            200 => {
                let _ = self.abort_upload(key, &upload);
                md5()
            }
            _ => {
                let _ = self.abort_upload(key, &upload);
                Err(reply.error("PART 1 (probe)", key))
            }
        }
    }

    fn start_multipart(
        &self,
        key: &str,
        retention: Option<&Retention>,
        sum: PartSum,
    ) -> Result<String, Error> {
        let mut headers: Vec<(&str, String)> = Vec::new();
        if sum == PartSum::Crc32c {
            headers.push(("x-amz-checksum-algorithm", "CRC32C".into()));
        }
        if let Some(r) = retention {
            headers.push(("x-amz-object-lock-mode", r.mode.as_str().into()));
            headers.push(("x-amz-object-lock-retain-until-date", r.until.clone()));
        }
        let mut action = self
            .bucket
            .create_multipart_upload(Some(&self.credentials), key);
        for (name, value) in &headers {
            action.headers_mut().insert(*name, value.clone());
        }
        let url = action.sign(SIGNED_FOR);
        let reply = self.send("CREATE-MULTIPART", key, || {
            let mut request = self.agent.post(url.as_str());
            for (name, value) in &headers {
                request = request.header(*name, value);
            }
            request.send_empty()
        })?;
        if reply.status != 200 {
            return Err(reply.error("CREATE-MULTIPART", key));
        }
        rusty_s3::actions::CreateMultipartUpload::parse_response(&reply.body)
            .map(|r| r.upload_id().to_string())
            .map_err(|e| Error::Reply {
                what: format!("CREATE-MULTIPART {}/{key}", self.location),
                reason: e.to_string(),
            })
    }

    /// One part, with its CRC32C or its MD5 as `sum` says. A part sent
    /// with its CRC32C whose answer does not echo it (a store that took
    /// the header without checking it) is sent again with its MD5 too.
    /// A part read from a file as it is sent is checked as it is read
    /// against the CRC32C its bytes had when written: one that changed is
    /// [`Error::Unproven`], whatever the store answered.
    pub(super) fn upload_part(
        &self,
        key: &str,
        (upload, sum): (&str, PartSum),
        number: u16,
        body: PartBody<'_>,
    ) -> Result<Part, Error> {
        let crc = (sum == PartSum::Crc32c).then(|| base64_crc(body.crc32c()));
        let mut md5_too = crc.is_none();
        loop {
            let mut headers: Vec<(&str, String)> = Vec::new();
            if let Some(c) = &crc {
                headers.push(("x-amz-checksum-crc32c", c.clone()));
            }
            if md5_too {
                headers.push(("content-md5", body.md5()?));
            }
            let mut action = self
                .bucket
                .upload_part(Some(&self.credentials), key, number, upload);
            for (name, value) in &headers {
                action.headers_mut().insert(*name, value.clone());
            }
            let url = action.sign(SIGNED_FOR);
            let what = format!("PART {number}");
            let read = std::cell::Cell::new(None);
            let reply = self.send(&what, key, || {
                let mut request = self.agent.put(url.as_str());
                for (name, value) in &headers {
                    request = request.header(*name, value);
                }
                match &body {
                    PartBody::Bytes(bytes) => request.send(*bytes),
                    PartBody::Range(range) => {
                        let mut reader = range.reader(&read);
                        request
                            .header("content-length", range.len.to_string())
                            .send(ureq::SendBody::from_reader(&mut reader))
                    }
                }
            });
            if let PartBody::Range(range) = &body {
                range.check(read.get())?;
            }
            let reply = reply?;
            if reply.status != 200 {
                return Err(reply.error(&what, key));
            }
            let Some(etag) = reply.etag else {
                return Err(Error::Refused {
                    what: format!("{what} {key}"),
                    status: reply.status,
                    code: String::new(),
                    message: "no ETag for the part".into(),
                });
            };
            match (&crc, reply.crc32c) {
                (Some(ours), Some(theirs)) if *ours != theirs => {
                    return Err(Error::Reply {
                        what: format!("{what} {}/{key}", self.location),
                        reason: format!(
                            "the store's CRC32C of the part is {theirs}, its bytes' {ours}"
                        ),
                    });
                }
                (Some(_), None) if !md5_too => {
                    warn!(store = %self.location, part = number, "the store did not echo the part's CRC32C: it is sent again with its MD5");
                    md5_too = true;
                }
                _ => return Ok(Part { etag, crc32c: crc }),
            }
        }
    }

    pub(super) fn complete_multipart(
        &self,
        key: &str,
        upload: &str,
        parts: &[Part],
    ) -> Result<(), Error> {
        let action = self.bucket.complete_multipart_upload(
            Some(&self.credentials),
            key,
            upload,
            parts.iter().map(|p| p.etag.as_str()),
        );
        let url = action.sign(SIGNED_FOR);
        // With CRC32Cs, each part's goes in the completion too (S3 asks
        // for them when the upload was begun with the algorithm).
        let body = match parts.iter().all(|p| p.crc32c.is_some()) {
            false => action.body(),
            true => {
                let mut xml = String::from("<CompleteMultipartUpload>");
                for (i, p) in parts.iter().enumerate() {
                    xml.push_str(&format!(
                        "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag><ChecksumCRC32C>{}</ChecksumCRC32C></Part>",
                        i + 1,
                        escape(&p.etag),
                        p.crc32c.as_deref().unwrap_or_default()
                    ));
                }
                xml.push_str("</CompleteMultipartUpload>");
                xml
            }
        };
        let reply = self.send("COMPLETE-MULTIPART", key, || {
            self.agent.post(url.as_str()).send(body.as_bytes())
        })?;
        // A completion can fail after a 200: the error is in the body.
        if reply.status != 200 || String::from_utf8_lossy(&reply.body).contains("<Error>") {
            return Err(reply.error("COMPLETE-MULTIPART", key));
        }
        Ok(())
    }

    /// Whether the bucket has object lock (made with it: it cannot be
    /// turned on later for the objects already there).
    pub fn object_lock_enabled(&self) -> Result<bool, Error> {
        let url = self.bucket_query("object-lock");
        let reply = self.send("GET-OBJECT-LOCK", "", || self.agent.get(&url).call())?;
        match reply.status {
            200 => Ok(String::from_utf8_lossy(&reply.body)
                .contains("<ObjectLockEnabled>Enabled</ObjectLockEnabled>")),
            404 => Ok(false),
            _ => Err(reply.error("GET-OBJECT-LOCK", "")),
        }
    }

    /// The retention on the current version of `key`; `None` when it has
    /// none.
    pub fn retention(&self, key: &str) -> Result<Option<Retention>, Error> {
        self.retention_of(key, None)
    }

    /// The retention on version `version` of `key` (the current one when
    /// `None`); `None` when it has none.
    pub fn retention_of(
        &self,
        key: &str,
        version: Option<&str>,
    ) -> Result<Option<Retention>, Error> {
        let mut action = self.bucket.get_object(Some(&self.credentials), key);
        action.query_mut().insert("retention", "");
        if let Some(version) = version {
            action.query_mut().insert("versionId", version.to_string());
        }
        let url = action.sign(SIGNED_FOR);
        let reply = self.send("GET-RETENTION", key, || self.agent.get(url.as_str()).call())?;
        if reply.status == 404 {
            let code = reply.code();
            if code.contains("ObjectLock") || code.contains("Retention") {
                return Ok(None);
            }
        }
        if reply.status != 200 {
            return Err(reply.error("GET-RETENTION", key));
        }
        let text = String::from_utf8_lossy(&reply.body);
        let tag = |name: &str| tag(&text, name);
        let mode = match tag("Mode").as_deref() {
            Some("COMPLIANCE") => LockMode::Compliance,
            Some("GOVERNANCE") => LockMode::Governance,
            _ => {
                return Err(Error::Reply {
                    what: format!("GET-RETENTION {}/{key}", self.location),
                    reason: format!("no retention mode in {text}"),
                });
            }
        };
        let until = tag("RetainUntilDate").ok_or_else(|| Error::Reply {
            what: format!("GET-RETENTION {}/{key}", self.location),
            reason: format!("no retain-until date in {text}"),
        })?;
        Ok(Some(Retention { mode, until }))
    }

    /// Puts `retention` on the current version of `key` (a longer one
    /// only: the store refuses to shorten a compliance retention).
    pub fn set_retention(&self, key: &str, retention: &Retention) -> Result<(), Error> {
        let xml = format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>{}</Mode><RetainUntilDate>{}</RetainUntilDate></Retention>",
            retention.mode.as_str(),
            retention.until
        );
        let md5 =
            base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(xml.as_bytes()));
        let mut action = self.bucket.put_object(Some(&self.credentials), key);
        action.query_mut().insert("retention", "");
        action.headers_mut().insert("content-md5", md5.clone());
        let url = action.sign(SIGNED_FOR);
        let reply = self.send("PUT-RETENTION", key, || {
            self.agent
                .put(url.as_str())
                .header("content-md5", &md5)
                .send(xml.as_bytes())
        })?;
        match reply.status {
            200 | 204 => Ok(()),
            _ => Err(reply.error("PUT-RETENTION", key)),
        }
    }

    /// The multipart uploads begun and never completed or aborted under
    /// `prefix`: (key, upload id).
    pub fn incomplete_uploads(&self, prefix: &str) -> Result<Vec<(String, String)>, Error> {
        let mut action = self.bucket.list_objects_v2(Some(&self.credentials));
        action.query_mut().remove("list-type");
        action.query_mut().remove("encoding-type");
        action.query_mut().insert("uploads", "");
        action.query_mut().insert("prefix", prefix.to_string());
        let url = action.sign(SIGNED_FOR);
        let body = self.get_listing("LIST-UPLOADS", prefix, url.as_str())?;
        let text = String::from_utf8_lossy(&body);
        let mut found = Vec::new();
        for upload in text.split("<Upload>").skip(1) {
            if let (Some(key), Some(id)) = (tag(upload, "Key"), tag(upload, "UploadId")) {
                found.push((key, id));
            }
        }
        Ok(found)
    }

    /// Aborts multipart upload `upload` of `key`: its parts go.
    pub fn abort_upload(&self, key: &str, upload: &str) -> Result<(), Error> {
        let url = self
            .bucket
            .abort_multipart_upload(Some(&self.credentials), key, upload)
            .sign(SIGNED_FOR);
        let reply = self.send("ABORT", key, || self.agent.delete(url.as_str()).call())?;
        match reply.status {
            200 | 204 | 404 => Ok(()),
            _ => Err(reply.error("ABORT", key)),
        }
    }

    /// A signed GET of the bucket itself with sub-resource `query`.
    fn bucket_query(&self, query: &str) -> String {
        let mut action = self.bucket.list_objects_v2(Some(&self.credentials));
        action.query_mut().remove("list-type");
        action.query_mut().remove("encoding-type");
        action.query_mut().insert(query.to_string(), "");
        action.sign(SIGNED_FOR).to_string()
    }

    /// Removes object `key` (in a bucket that keeps versions, adds a
    /// delete marker); none there is no error.
    pub fn delete(&self, key: &str) -> Result<(), Error> {
        let url = self
            .bucket
            .delete_object(Some(&self.credentials), key)
            .sign(SIGNED_FOR);
        let reply = self.send("DELETE", key, || self.agent.delete(url.as_str()).call())?;
        match reply.status {
            200 | 204 | 404 => Ok(()),
            _ => Err(reply.error("DELETE", key)),
        }
    }

    /// Removes version `version` of `key` for good (no delete marker);
    /// the store refuses a version under an object lock (403).
    pub fn delete_version(&self, key: &str, version: &str) -> Result<(), Error> {
        let mut action = self.bucket.delete_object(Some(&self.credentials), key);
        action.query_mut().insert("versionId", version.to_string());
        let url = action.sign(SIGNED_FOR);
        let reply = self.send("DELETE", key, || self.agent.delete(url.as_str()).call())?;
        match reply.status {
            200 | 204 | 404 => Ok(()),
            _ => Err(reply.error("DELETE", key)),
        }
    }

    /// What lies directly under `prefix` (keys starting with it, up to
    /// the next `/`), every page of it.
    pub fn list(&self, prefix: &str) -> Result<Listing, Error> {
        let mut listing = Listing::default();
        let mut token: Option<String> = None;
        loop {
            let mut action = self.bucket.list_objects_v2(Some(&self.credentials));
            // Keys as they are (the names bitback makes need no escaping
            // beyond XML's).
            action.query_mut().remove("encoding-type");
            action.with_prefix(prefix);
            action.with_delimiter("/");
            if let Some(token) = &token {
                action.with_continuation_token(token.clone());
            }
            let url = action.sign(SIGNED_FOR);
            let body = self.get_listing("LIST", prefix, url.as_str())?;
            let page = rusty_s3::actions::ListObjectsV2::parse_response(&body).map_err(|e| {
                Error::Reply {
                    what: format!("LIST {}/{prefix}", self.location),
                    reason: e.to_string(),
                }
            })?;
            listing
                .objects
                .extend(page.contents.into_iter().map(|c| c.key));
            listing
                .prefixes
                .extend(page.common_prefixes.into_iter().map(|p| p.prefix));
            match page.next_continuation_token {
                Some(next) => token = Some(next),
                None => return Ok(listing),
            }
        }
    }

    /// The body of a listing (`what`, of `prefix`) at signed `url`, which
    /// must answer 200.
    fn get_listing(&self, what: &str, prefix: &str, url: &str) -> Result<Vec<u8>, Error> {
        let reply = self.send(what, prefix, || self.agent.get(url).call())?;
        match reply.status {
            200 => Ok(reply.body),
            _ => Err(reply.error(what, prefix)),
        }
    }

    /// Sends a request (made anew by `make` for each try), trying again on
    /// a connection failure or a 5xx answer.
    fn send(
        &self,
        what: &str,
        key: &str,
        make: impl Fn() -> Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Reply, Error> {
        let mut tries = 0;
        loop {
            let sent = std::time::Instant::now();
            let failure = match make() {
                Ok(mut response) => {
                    let status = response.status().as_u16();
                    debug!(
                        what,
                        key,
                        status,
                        ms = sent.elapsed().as_millis() as u64,
                        "answered"
                    );
                    let header = |name: &str| {
                        response
                            .headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    };
                    let version = header("x-amz-version-id");
                    let etag = header("etag");
                    let crc32c = header("x-amz-checksum-crc32c");
                    let body = response
                        .body_mut()
                        .with_config()
                        .limit(64 << 20)
                        .read_to_vec();
                    match body {
                        Ok(body) if status < 500 => {
                            return Ok(Reply {
                                status,
                                version,
                                etag,
                                crc32c,
                                body,
                            });
                        }
                        Ok(body) => Reply {
                            status,
                            version,
                            etag,
                            crc32c,
                            body,
                        }
                        .error(what, key)
                        .to_string(),
                        Err(e) => e.to_string(),
                    }
                }
                Err(e) => e.to_string(),
            };
            let Some(pause) = PAUSES.get(tries) else {
                return Err(Error::Unreachable {
                    what: format!("{what} {}/{key}", self.location),
                    tries: tries + 1,
                    reason: failure,
                });
            };
            debug!(what, key, failure, "trying again");
            std::thread::sleep(*pause);
            tries += 1;
        }
    }
}

/// An answer, read whole.
struct Reply {
    status: u16,
    version: Option<String>,
    etag: Option<String>,
    /// `x-amz-checksum-crc32c`: the store's CRC32C of what it took.
    crc32c: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    /// The store's refusal: its status, and its error code and message
    /// from the XML body when there is one.
    fn error(&self, what: &str, key: &str) -> Error {
        let text = String::from_utf8_lossy(&self.body);
        Error::Refused {
            what: format!("{what} {key}"),
            status: self.status,
            code: tag(&text, "Code").unwrap_or_default(),
            message: tag(&text, "Message").unwrap_or_default(),
        }
    }

    /// The store's error code, if its answer has one.
    fn code(&self) -> String {
        tag(&String::from_utf8_lossy(&self.body), "Code").unwrap_or_default()
    }
}

/// The text of the first `<name>` element of `xml` (the flat answers of
/// S3's errors and retentions).
fn tag(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find("</")? + start;
    Some(xml[start..end].to_string())
}

/// The base64 MD5 of `bytes`, as `Content-MD5` takes it.
fn md5(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(bytes))
}

/// A part's bytes, in a buffer aligned for O_DIRECT.
pub(super) struct PartBytes {
    raw: Vec<u8>,
    skip: usize,
    len: usize,
}

impl std::ops::Deref for PartBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.skip..self.skip + self.len]
    }
}

/// The `want` bytes at `at` of `file`: read around the page cache
/// (through `direct`, its O_DIRECT handle) where the page cache does not
/// hold them, so the kernel neither copies them nor keeps them (a
/// spool's files are written that way too); from the page cache where it
/// does. The file must hold them all.
pub(super) fn read_part(
    file: &std::fs::File,
    direct: Option<&std::fs::File>,
    at: u64,
    want: usize,
) -> std::io::Result<PartBytes> {
    use std::os::unix::fs::FileExt;
    const ALIGN: usize = crate::direct::ALIGN as usize;
    let mut raw = vec![0u8; want + ALIGN];
    let skip = raw.as_ptr().align_offset(ALIGN);
    let buf = &mut raw[skip..skip + want];
    let direct = direct.filter(|_| !crate::direct::resident(file, at, want));
    // The whole blocks around the page cache, the last piece through it.
    let whole = match at % ALIGN as u64 {
        0 => want / ALIGN * ALIGN,
        _ => 0,
    };
    crate::direct::read_exact_at(file, direct, &mut buf[..whole], at)?;
    file.read_exact_at(&mut buf[whole..], at + whole as u64)?;
    Ok(PartBytes {
        raw,
        skip,
        len: want,
    })
}

/// The base64 CRC32C of `bytes` (big-endian, as `x-amz-checksum-crc32c`
/// takes it), XORed with `flip` (a wrong one, for the probe).
fn crc32c_base64(bytes: &[u8], flip: u32) -> String {
    base64_crc(crc32c::crc32c(bytes) ^ flip)
}

/// A CRC32C as `x-amz-checksum-crc32c` takes it: base64, big-endian.
fn base64_crc(crc: u32) -> String {
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

/// A part's bytes: in memory, or read from a file as they are sent.
pub(super) enum PartBody<'a> {
    Bytes(&'a [u8]),
    Range(FileRange<'a>),
}

impl PartBody<'_> {
    fn crc32c(&self) -> u32 {
        match self {
            PartBody::Bytes(bytes) => crc32c::crc32c(bytes),
            PartBody::Range(range) => range.crc,
        }
    }

    /// The base64 MD5 (a file's range read once for it, and checked).
    fn md5(&self) -> Result<String, Error> {
        use md5::Digest;
        use std::io::Read;
        let range = match self {
            PartBody::Bytes(bytes) => return Ok(md5(bytes)),
            PartBody::Range(range) => range,
        };
        let read = std::cell::Cell::new(None);
        let mut reader = range.reader(&read);
        let mut hasher = md5::Md5::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf).map_err(|e| range.local(e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        range.check(read.get())?;
        Ok(base64::engine::general_purpose::STANDARD.encode(hasher.finalize()))
    }
}

/// `len` bytes at `at` of the file at `path`, read through `direct` (its
/// O_DIRECT handle) where the page cache does not hold them; `crc` is
/// their CRC32C when they were written.
pub(super) struct FileRange<'a> {
    pub file: &'a std::fs::File,
    pub direct: Option<&'a std::fs::File>,
    pub path: &'a std::path::Path,
    pub at: u64,
    pub len: u64,
    pub crc: u32,
}

impl<'a> FileRange<'a> {
    /// A reader of the range, which leaves the CRC32C of what it read in
    /// `read` once it read it all.
    fn reader<'b>(&'b self, read: &'b std::cell::Cell<Option<u32>>) -> RangeReader<'b, 'a> {
        read.set(None);
        RangeReader {
            range: self,
            done: 0,
            chunk: None,
            pos: 0,
            crc: 0,
            read,
        }
    }

    /// Fails when the range was read whole and is not what was written.
    fn check(&self, read: Option<u32>) -> Result<(), Error> {
        match read {
            Some(crc) if crc != self.crc => Err(Error::Unproven {
                path: self.path.to_path_buf(),
                reason: format!(
                    "bytes {}..{} changed after they were written",
                    self.at,
                    self.at + self.len
                ),
            }),
            _ => Ok(()),
        }
    }

    fn local(&self, e: std::io::Error) -> Error {
        Error::Local {
            path: self.path.to_path_buf(),
            reason: e.to_string(),
        }
    }
}

/// Reads a [`FileRange`] a MiB at a time, summing it.
struct RangeReader<'b, 'a> {
    range: &'b FileRange<'a>,
    /// Bytes of the range read from the file.
    done: u64,
    chunk: Option<PartBytes>,
    pos: usize,
    crc: u32,
    read: &'b std::cell::Cell<Option<u32>>,
}

impl std::io::Read for RangeReader<'_, '_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        const CHUNK: u64 = 1 << 20;
        let r = self.range;
        if self.chunk.as_ref().is_none_or(|c| self.pos == c.len()) {
            if self.done == r.len {
                return Ok(0);
            }
            let want = (r.len - self.done).min(CHUNK) as usize;
            let chunk = read_part(r.file, r.direct, r.at + self.done, want)?;
            self.crc = crc32c::crc32c_append(self.crc, &chunk);
            self.done += want as u64;
            if self.done == r.len {
                // A sender that knows the length asks no more.
                self.read.set(Some(self.crc));
            }
            self.chunk = Some(chunk);
            self.pos = 0;
        }
        let Some(chunk) = &self.chunk else {
            return Ok(0);
        };
        let n = out.len().min(chunk.len() - self.pos);
        out[..n].copy_from_slice(&chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The base64 SHA-256 of `bytes`, as `x-amz-checksum-sha256` takes it.
fn sha256(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_text_unescapes_named_and_numeric_references() {
        assert_eq!(unescape("&#34;a1b2&#34;"), "\"a1b2\"");
        assert_eq!(unescape("&#x22;x&#X22;"), "\"x\"");
        assert_eq!(
            unescape("a&amp;lt;b &lt;c&gt; &quot;&apos;"),
            "a&lt;b <c> \"'"
        );
        // Not a reference: kept as written.
        assert_eq!(unescape("a & b; &#zz; &"), "a & b; &#zz; &");
    }

    #[test]
    fn versions_come_in_document_order_markers_included() {
        let xml = "<?xml version=\"1.0\"?><ListVersionsResult><IsTruncated>true</IsTruncated>\
            <NextKeyMarker>p/b</NextKeyMarker><NextVersionIdMarker>v9</NextVersionIdMarker>\
            <DeleteMarker><Key>p/a&amp;1</Key><VersionId>v3</VersionId><IsLatest>true</IsLatest></DeleteMarker>\
            <Version><Key>p/a&amp;1</Key><VersionId>v2</VersionId><Size>7</Size></Version>\
            <Version><Key>p/a&amp;1</Key><VersionId>v1</VersionId><Size>5</Size></Version>\
            <CommonPrefixes><Prefix>p/vm1/</Prefix></CommonPrefixes></ListVersionsResult>";
        let page = parse_versions(xml).unwrap();
        let seen: Vec<_> = page
            .versions
            .iter()
            .map(|v| (v.key.as_str(), v.id.as_str(), v.size, v.marker))
            .collect();
        assert_eq!(
            seen,
            [
                ("p/a&1", "v3", 0, true),
                ("p/a&1", "v2", 7, false),
                ("p/a&1", "v1", 5, false)
            ]
        );
        assert_eq!(page.prefixes, ["p/vm1/"]);
        assert_eq!(page.next, Some(("p/b".into(), "v9".into())));
        assert!(parse_versions("<Error/>").is_err());
        let sizeless = "<ListVersionsResult><Version><Key>k</Key></Version></ListVersionsResult>";
        assert!(parse_versions(sizeless).is_err());
    }

    #[test]
    fn parts_read_around_the_page_cache_are_the_files_bytes() {
        // Not tmpfs, which refuses O_DIRECT.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..3 * 65536 + 1234u32)
            .map(|i| (i * 31 % 253) as u8)
            .collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let direct = crate::direct::reopen_read(&file);
        assert!(
            direct.is_some(),
            "{} refuses O_DIRECT",
            dir.path().display()
        );
        // Dropped from the page cache, so that O_DIRECT is taken.
        nix::fcntl::posix_fadvise(
            &file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        for (at, want) in [
            (0, 65536),
            (65536, 2 * 65536 + 1234),
            (4096, 5000),
            (100, 70000),
        ] {
            let part = read_part(&file, direct.as_ref(), at, want).unwrap();
            assert_eq!(
                &part[..],
                &bytes[at as usize..at as usize + want],
                "{at}+{want}"
            );
        }
        assert!(read_part(&file, direct.as_ref(), 65536, 3 * 65536).is_err());
    }

    /// A request a [`FakeStore`] took.
    #[derive(Debug, Clone)]
    struct Taken {
        method: String,
        target: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Taken {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }
    }

    /// A store that SeaweedFS cannot be made to be: one that takes a
    /// part whatever its sums (`checks: false`, as an older store may),
    /// or one that refuses a wrong CRC32C but never echoes a right one.
    /// Multipart requests only; it records each.
    struct FakeStore {
        endpoint: String,
        taken: std::sync::Arc<Mutex<Vec<Taken>>>,
    }

    use std::sync::Mutex;

    impl FakeStore {
        fn start(checks: bool) -> FakeStore {
            FakeStore::serve(move |t, uploads| FakeStore::answer(t, checks, uploads))
        }

        /// One that takes each part `ms` milliseconds after it came (a
        /// store slower than the writer).
        fn slow_parts(ms: u64, checks: bool) -> FakeStore {
            FakeStore::serve(move |t, uploads| {
                if t.method == "PUT" && t.target.contains("partNumber=") && t.body != b"probe" {
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
                FakeStore::answer(t, checks, uploads)
            })
        }

        /// One that refuses every part (as a full store does), a moment
        /// after taking it: long enough for the parts read meanwhile to
        /// fill the uploaders' queue.
        fn refusing_parts() -> FakeStore {
            FakeStore::serve(|t, uploads| match t.method.as_str() {
                "PUT" if t.target.contains("partNumber=") && t.body != b"probe" => {
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    (
                        400,
                        String::new(),
                        "<Error><Code>EntityTooLarge</Code></Error>".into(),
                    )
                }
                _ => FakeStore::answer(t, true, uploads),
            })
        }

        fn serve(
            answer: impl Fn(&Taken, &std::sync::atomic::AtomicU32) -> (u16, String, String)
            + Send
            + Sync
            + 'static,
        ) -> FakeStore {
            let answer = std::sync::Arc::new(answer);
            use std::io::{BufRead, BufReader, Read, Write};
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let endpoint = format!("http://{}", listener.local_addr().unwrap());
            let taken = std::sync::Arc::new(Mutex::new(Vec::new()));
            let log = taken.clone();
            let uploads = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { return };
                    let (log, uploads, answer) = (log.clone(), uploads.clone(), answer.clone());
                    std::thread::spawn(move || {
                        let mut out = conn.try_clone().unwrap();
                        let mut reader = BufReader::new(conn);
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            let mut words = line.split_whitespace();
                            let method = words.next().unwrap_or_default().to_string();
                            let target = words.next().unwrap_or_default().to_string();
                            let mut headers = Vec::new();
                            loop {
                                let mut h = String::new();
                                reader.read_line(&mut h).unwrap();
                                let h = h.trim_end();
                                if h.is_empty() {
                                    break;
                                }
                                let (n, v) = h.split_once(':').unwrap();
                                headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
                            }
                            let len = headers
                                .iter()
                                .find(|(n, _)| n == "content-length")
                                .map_or(0, |(_, v)| v.parse().unwrap());
                            let mut body = vec![0u8; len];
                            reader.read_exact(&mut body).unwrap();
                            let t = Taken {
                                method,
                                target,
                                headers,
                                body,
                            };
                            let (status, extra, text) = answer(&t, &uploads);
                            log.lock().unwrap().push(t);
                            let reply = format!(
                                "HTTP/1.1 {status} X\r\ncontent-length: {}\r\n{extra}\r\n{text}",
                                text.len()
                            );
                            out.write_all(reply.as_bytes()).unwrap();
                        }
                    });
                }
            });
            FakeStore { endpoint, taken }
        }

        fn answer(
            t: &Taken,
            checks: bool,
            uploads: &std::sync::atomic::AtomicU32,
        ) -> (u16, String, String) {
            let q = &t.target;
            match t.method.as_str() {
                "POST" if q.contains("uploads") => {
                    let n = uploads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let xml = format!(
                        "<InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key><UploadId>U{n}</UploadId></InitiateMultipartUploadResult>"
                    );
                    (200, String::new(), xml)
                }
                "PUT" if q.contains("partNumber=") => {
                    let wrong = t
                        .header("x-amz-checksum-crc32c")
                        .is_some_and(|c| c != crc32c_base64(&t.body, 0));
                    match checks && wrong {
                        true => (
                            400,
                            String::new(),
                            "<Error><Code>BadDigest</Code></Error>".into(),
                        ),
                        false => (
                            200,
                            format!("etag: \"e{}\"\r\n", t.body.len()),
                            String::new(),
                        ),
                    }
                }
                "DELETE" if q.contains("uploadId=") => (204, String::new(), String::new()),
                "POST" if q.contains("uploadId=") => (
                    200,
                    String::new(),
                    "<CompleteMultipartUploadResult></CompleteMultipartUploadResult>".into(),
                ),
                _ => (
                    404,
                    String::new(),
                    "<Error><Code>NoSuchKey</Code></Error>".into(),
                ),
            }
        }

        fn client(&self) -> Client {
            let env: std::collections::HashMap<String, String> = [
                ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
                ("AWS_ACCESS_KEY_ID", "K"),
                ("AWS_SECRET_ACCESS_KEY", "S"),
                ("AWS_REGION", "us-east-1"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            let config = Config::resolve(&env, None, None).unwrap();
            let location = Location::parse("s3://bkt").unwrap().unwrap();
            Client::new(&config, &location).unwrap()
        }

        /// What it took since the last call.
        fn take(&self) -> Vec<Taken> {
            std::mem::take(&mut *self.taken.lock().unwrap())
        }
    }

    /// A file of two parts and a bit.
    fn big_file(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
        let path = dir.join("f");
        let bytes: Vec<u8> = (0..PART as u32 + 4096).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        (path, bytes)
    }

    #[test]
    fn a_store_that_takes_a_wrong_crc32c_gets_md5_parts_as_before() {
        let store = FakeStore::start(false);
        let client = store.client();
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes) = big_file(dir.path());
        let sent = client
            .upload_file("k", &path, None, &mut crate::s3::Unchecked)
            .unwrap();
        assert_eq!(sent, bytes.len() as u64);
        let taken = store.take();
        // Begun with the algorithm, probed, aborted, begun again without.
        assert_eq!(taken[0].header("x-amz-checksum-algorithm"), Some("CRC32C"));
        assert!(taken[1].target.contains("partNumber=1"), "{:?}", taken[1]);
        assert_eq!(taken[1].body, b"probe");
        assert_eq!(taken[2].method, "DELETE");
        assert!(taken[2].target.contains("uploadId=U0"));
        assert!(taken[3].target.contains("uploads"));
        assert_eq!(taken[3].header("x-amz-checksum-algorithm"), None);
        let parts: Vec<&Taken> = taken.iter().filter(|t| t.method == "PUT").skip(1).collect();
        assert_eq!(
            parts.len() as u64,
            (bytes.len() as u64).div_ceil(part_size(bytes.len() as u64))
        );
        let mut whole = Vec::new();
        let mut ordered = parts.clone();
        ordered.sort_by_key(|t| {
            let n = t.target.split("partNumber=").nth(1).unwrap();
            n.split('&').next().unwrap().parse::<u32>().unwrap()
        });
        for p in ordered {
            assert!(p.target.contains("uploadId=U1"), "{}", p.target);
            assert_eq!(p.header("content-md5"), Some(md5(&p.body).as_str()));
            assert_eq!(p.header("x-amz-checksum-crc32c"), None);
            whole.extend_from_slice(&p.body);
        }
        assert!(whole == bytes, "the parts are not the file");
        let done = taken.last().unwrap();
        assert!(done.target.contains("uploadId=U1"));
        assert!(!String::from_utf8_lossy(&done.body).contains("ChecksumCRC32C"));

        // Found out once: the next upload goes with MD5 from the start.
        client
            .upload_file("k2", &path, None, &mut crate::s3::Unchecked)
            .unwrap();
        let taken = store.take();
        assert_eq!(taken[0].header("x-amz-checksum-algorithm"), None);
        assert!(taken.iter().all(|t| t.body != b"probe"));
    }

    #[test]
    fn a_store_refusing_parts_stops_the_upload_at_once() {
        let store = FakeStore::refusing_parts();
        let client = store.client();
        let dir = tempfile::tempdir().unwrap();
        // Far more parts than the uploaders and their queue hold.
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 64 * 65536]).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (upload, sum) = client.start_upload("k", None).unwrap();
            let mut file = std::fs::File::open(&path).unwrap();
            let sent = client.send_parts(
                "k",
                (&upload, sum),
                (&mut file, &path),
                65536,
                &mut crate::s3::Unchecked,
            );
            let _ = tx.send(sent.map(|(n, _)| n).map_err(|e| e.to_string()));
        });
        let sent = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the upload hung after the store refused its parts");
        let e = sent.expect_err("the store refused every part");
        assert!(e.contains("EntityTooLarge"), "{e}");
        let parts = store.take().iter().filter(|t| t.method == "PUT").count();
        assert!(parts < 64, "{parts} parts sent after the first refusal");
    }

    #[test]
    fn a_part_whose_crc32c_is_not_echoed_goes_again_with_its_md5() {
        let store = FakeStore::start(true);
        let client = store.client();
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes) = big_file(dir.path());
        client
            .upload_file("k", &path, None, &mut crate::s3::Unchecked)
            .unwrap();
        let taken = store.take();
        assert_eq!(taken[0].header("x-amz-checksum-algorithm"), Some("CRC32C"));
        assert_eq!(taken[1].body, b"probe");
        // No abort: the store refused the wrong sum, so it checks them.
        assert!(taken.iter().all(|t| t.method != "DELETE"));
        let parts: Vec<&Taken> = taken.iter().filter(|t| t.method == "PUT").skip(1).collect();
        let count = (bytes.len() as u64).div_ceil(part_size(bytes.len() as u64)) as usize;
        assert_eq!(parts.len(), 2 * count, "each part twice");
        for p in &parts {
            assert_eq!(
                p.header("x-amz-checksum-crc32c"),
                Some(crc32c_base64(&p.body, 0).as_str())
            );
        }
        assert_eq!(
            parts
                .iter()
                .filter(|p| p.header("content-md5").is_some())
                .count(),
            count
        );
        let done = String::from_utf8_lossy(&taken.last().unwrap().body).into_owned();
        assert_eq!(done.matches("<ChecksumCRC32C>").count(), count, "{done}");
    }

    #[test]
    fn a_crc32c_goes_as_s3_takes_it() {
        // RFC 3720's check value: CRC32C("123456789") = 0xe3069283.
        assert_eq!(crc32c_base64(b"123456789", 0), "4waSgw==");
        assert_ne!(crc32c_base64(b"123456789", 1), "4waSgw==");
    }

    #[test]
    fn parts_are_16_mib_until_9000_of_them_would_not_hold_the_file() {
        const MIB: u64 = 1 << 20;
        assert_eq!(part_size(PART + 1), 16 * MIB);
        assert_eq!(part_size(9_000 * 16 * MIB), 16 * MIB);
        let big = 10 << 40;
        let size = part_size(big);
        assert_eq!(size % MIB, 0);
        assert!(big.div_ceil(size) <= 9_000, "{size}");
        assert!(size > 16 * MIB);
    }

    /// The number of a part request.
    fn part_number(t: &Taken) -> u32 {
        let n = t.target.split("partNumber=").nth(1).unwrap();
        n.split('&').next().unwrap().parse().unwrap()
    }

    /// A writer's file and its feed: the data appended from `HEAD` on in
    /// writes of uneven sizes (each made to the file, then shown to the
    /// tap, as the streaming writer does), the header last. The file's
    /// bytes.
    fn write_through(
        path: &std::path::Path,
        tap: &mut dyn crate::qcow2::Tap,
        data: usize,
    ) -> Vec<u8> {
        use crate::s3::HEAD;
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        let len = HEAD as usize + data;
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i * 7 % 253) as u8 ^ (i >> 20) as u8)
            .collect();
        let mut at = HEAD as usize;
        let mut step = 1usize;
        while at < len {
            let n = (65536 * step % 3_000_017 + 512).min(len - at);
            file.write_all_at(&bytes[at..at + n], at as u64).unwrap();
            tap.written(at as u64, &bytes[at..at + n]);
            at += n;
            step += 1;
        }
        // The first data and the header, last, as the writer does.
        file.write_all_at(&bytes[65536..HEAD as usize], 65536)
            .unwrap();
        tap.written(65536, &bytes[65536..HEAD as usize]);
        file.write_all_at(&bytes[..65536], 0).unwrap();
        tap.written(0, &bytes[..65536]);
        bytes
    }

    #[test]
    fn a_feed_makes_the_file_as_written_its_head_last_and_parts_past_its_hold_read_back() {
        // Slower than the writer: parts past HOLD are read back.
        feed_makes_the_file(FakeStore::slow_parts(150, true), true);
        // A store that checks no CRC32C: parts with their MD5, the read
        // back ones read once more for it.
        feed_makes_the_file(FakeStore::slow_parts(150, false), false);
    }

    fn feed_makes_the_file(store: FakeStore, crc: bool) {
        let client = std::sync::Arc::new(store.client());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        let data = (crate::s3::HOLD + 40 * (1 << 20) + 12345) as usize;
        let feed = client.feed("k", &path, None).unwrap();
        let bytes = write_through(&path, &mut *feed.tap(), data);
        assert_eq!(feed.finish(bytes.len() as u64).unwrap(), bytes.len() as u64);
        let taken = store.take();
        let mut parts: Vec<&Taken> = taken
            .iter()
            .filter(|t| t.method == "PUT" && t.body != b"probe")
            .collect();
        parts.sort_by_key(|t| part_number(t));
        // This store echoes no CRC32C: each part goes again with its MD5.
        parts.dedup_by_key(|t| part_number(t));
        let numbers: Vec<u32> = parts.iter().map(|t| part_number(t)).collect();
        let expected: Vec<u32> = (1..=numbers.len() as u32).collect();
        assert_eq!(numbers, expected);
        assert_eq!(parts[0].body.len() as u64, crate::s3::HEAD);
        let whole: Vec<u8> = parts.iter().flat_map(|t| t.body.clone()).collect();
        assert!(whole == bytes, "the parts are not the file");
        // The head went last, then the completion.
        let last_part = taken.iter().rposition(|t| t.method == "PUT").unwrap();
        assert_eq!(part_number(&taken[last_part]), 1);
        assert!(taken.last().unwrap().method == "POST");
        for p in &parts {
            match crc {
                true => assert_eq!(
                    p.header("x-amz-checksum-crc32c"),
                    Some(crc32c_base64(&p.body, 0).as_str())
                ),
                false => assert_eq!(p.header("content-md5"), Some(md5(&p.body).as_str())),
            }
        }
    }

    /// The requests of an upload that was aborted, never completed.
    fn aborted_not_made(taken: &[Taken]) {
        assert!(
            taken
                .iter()
                .all(|t| !(t.method == "POST" && t.target.contains("uploadId="))),
            "completed"
        );
        assert!(taken.last().unwrap().method == "DELETE", "not aborted");
    }

    #[test]
    fn a_feed_whose_file_changed_before_a_part_was_read_back_is_aborted() {
        use std::os::unix::fs::FileExt;
        let store = FakeStore::slow_parts(400, true);
        let client = std::sync::Arc::new(store.client());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        let data = (crate::s3::HOLD + 40 * (1 << 20)) as usize;
        // A budget with no room: every part is read back.
        let full = crate::s3::feed::Budget(std::sync::atomic::AtomicU64::new(crate::s3::HOLD));
        let feed = client
            .feed_in("k", &path, None, Box::leak(Box::new(full)))
            .unwrap();
        let bytes = write_through(&path, &mut *feed.tap(), data);
        // In the last part, read back once the parts before it are sent.
        let at = bytes.len() as u64 - 1000;
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[bytes[at as usize] ^ 1], at).unwrap();
        let e = feed.finish(bytes.len() as u64).unwrap_err();
        assert!(matches!(e, Error::Unproven { .. }), "{e}");
        assert!(
            e.to_string().contains("changed after they were written"),
            "{e}"
        );
        aborted_not_made(&store.take());
    }

    #[test]
    fn a_feed_dropped_unfinished_aborts_its_upload_off_the_dropping_thread() {
        use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
        // A store that holds every part until the gate opens (at most a
        // minute): the drop must return while it holds them.
        let gate = std::sync::Arc::new(AtomicBool::new(false));
        let answered = std::sync::Arc::new(AtomicU32::new(0));
        let (g, a) = (gate.clone(), answered.clone());
        let store = FakeStore::serve(move |t, uploads| {
            if t.method == "PUT" && t.target.contains("partNumber=") && t.body != b"probe" {
                let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
                while !g.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                a.fetch_add(1, Ordering::SeqCst);
            }
            FakeStore::answer(t, true, uploads)
        });
        let client = std::sync::Arc::new(store.client());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        let feed = client.feed("k", &path, None).unwrap();
        write_through(&path, &mut *feed.tap(), 40 << 20);
        drop(feed);
        assert_eq!(
            answered.load(Ordering::SeqCst),
            0,
            "the drop waited for the store"
        );
        gate.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut taken = Vec::new();
        while !taken.iter().any(|t: &Taken| t.method == "DELETE") {
            assert!(std::time::Instant::now() < deadline, "never aborted");
            std::thread::sleep(std::time::Duration::from_millis(50));
            taken.extend(store.take());
        }
        aborted_not_made(&taken);
    }

    #[test]
    fn a_feed_given_a_write_behind_what_it_fed_is_aborted() {
        let store = FakeStore::start(true);
        let client = std::sync::Arc::new(store.client());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        let feed = client.feed("k", &path, None).unwrap();
        let mut tap = feed.tap();
        let bytes = write_through(&path, &mut *tap, 40 << 20);
        // A cluster written again where it lies, past the head.
        let at = crate::s3::HEAD + (1 << 20);
        tap.written(at, &[1u8; 65536]);
        let e = feed.finish(bytes.len() as u64).unwrap_err();
        assert!(matches!(e, Error::Unfollowed(_)), "{e}");
        assert!(e.to_string().contains("behind"), "{e}");
        aborted_not_made(&store.take());
    }
}
