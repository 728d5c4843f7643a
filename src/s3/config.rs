//! Where a bucket is and who bitback is to it, the AWS way: the
//! environment first (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`,
//! `AWS_REGION`, `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), then the profile
//! (`AWS_PROFILE`, else `default`) in the shared files
//! (`AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`;
//! `AWS_CONFIG_FILE`, else `~/.aws/config`). Secrets come from there
//! only: never from an argument (`ps` would show it), never into a log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::Error;

/// A repository's place in object storage: `s3://BUCKET/PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub bucket: String,
    /// Every key of the repository starts with it: empty, or ending in
    /// `/`.
    pub prefix: String,
}

impl Location {
    /// `s3://BUCKET` or `s3://BUCKET/PREFIX`; `None` when `text` is not
    /// an `s3://` URL at all (a directory).
    pub fn parse(text: &str) -> Option<Result<Location, Error>> {
        let rest = text.strip_prefix("s3://")?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // S3's bucket rule: 3 to 63 of lowercase letters, digits, `-` and
        // `.`, starting and ending with a letter or digit.
        let edge =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && edge(bucket.chars().next())
            && edge(bucket.chars().last());
        if !bucket_ok {
            return Some(Err(Error::Config(format!(
                "{text}: bucket name {bucket:?} is not 3 to 63 lowercase letters, digits, '-' or '.'"
            ))));
        }
        let prefix = prefix.trim_matches('/');
        let plain = prefix
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
        if !prefix.is_empty() && !plain {
            return Some(Err(Error::Config(format!(
                "{text}: the prefix must be plain names joined by '/'"
            ))));
        }
        Some(Ok(Location {
            bucket: bucket.to_string(),
            prefix: match prefix {
                "" => String::new(),
                p => format!("{p}/"),
            },
        }))
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "s3://{}/{}",
            self.bucket,
            self.prefix.trim_end_matches('/')
        )
    }
}

/// How to reach the store and sign for it.
#[derive(Clone)]
pub struct Config {
    /// `https://s3.REGION.amazonaws.com`, or the store's own endpoint.
    pub endpoint: String,
    pub region: String,
    /// Path-style URLs (`ENDPOINT/BUCKET/KEY`): for every endpoint but
    /// AWS's own, which takes the bucket in the host name.
    pub path_style: bool,
    pub key_id: String,
    secret: String,
    token: Option<String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// The configuration from the process's environment and the AWS
    /// shared files; `endpoint`, when given (`--s3-endpoint`), first.
    pub fn from_env(endpoint: Option<&str>) -> Result<Config, Error> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let home = std::env::var_os("HOME").map(PathBuf::from);
        Config::resolve(&env, home.as_deref(), endpoint)
    }

    /// [`Config::from_env`] over `env` and the home directory `home`.
    pub fn resolve(
        env: &HashMap<String, String>,
        home: Option<&Path>,
        endpoint: Option<&str>,
    ) -> Result<Config, Error> {
        let get = |name: &str| env.get(name).filter(|v| !v.is_empty()).cloned();
        let profile = get("AWS_PROFILE").unwrap_or_else(|| "default".into());
        let file = |var: &str, name: &str| {
            get(var)
                .map(PathBuf::from)
                .or_else(|| home.map(|h| h.join(".aws").join(name)))
        };
        let credentials = file("AWS_SHARED_CREDENTIALS_FILE", "credentials")
            .map(|p| section(&p, &profile))
            .transpose()?
            .flatten()
            .unwrap_or_default();
        // In the config file a profile is `[profile NAME]`, the default
        // `[default]`.
        let config_name = match profile.as_str() {
            "default" => "default".to_string(),
            p => format!("profile {p}"),
        };
        let config = file("AWS_CONFIG_FILE", "config")
            .map(|p| section(&p, &config_name))
            .transpose()?
            .flatten()
            .unwrap_or_default();
        let from_profile = |key: &str| {
            credentials
                .get(key)
                .or_else(|| config.get(key))
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let region = get("AWS_REGION")
            .or_else(|| get("AWS_DEFAULT_REGION"))
            .or_else(|| from_profile("region"))
            .unwrap_or_else(|| "us-east-1".into());
        let given = endpoint
            .map(str::to_string)
            .or_else(|| get("AWS_ENDPOINT_URL_S3"))
            .or_else(|| get("AWS_ENDPOINT_URL"))
            .or_else(|| from_profile("endpoint_url"));
        let path_style = given.is_some();
        let endpoint = given.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(Error::Config(format!(
                "endpoint {endpoint:?} is not an http:// or https:// URL"
            )));
        }
        let (key_id, secret, token) = match (get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY"))
        {
            (Some(id), Some(secret)) => (id, secret, get("AWS_SESSION_TOKEN")),
            _ => match (
                from_profile("aws_access_key_id"),
                from_profile("aws_secret_access_key"),
            ) {
                (Some(id), Some(secret)) => (id, secret, from_profile("aws_session_token")),
                _ => {
                    return Err(Error::Config(format!(
                        "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give \
                         profile {profile:?} aws_access_key_id and aws_secret_access_key in \
                         ~/.aws/credentials (AWS_PROFILE names another profile)"
                    )));
                }
            },
        };
        Ok(Config {
            endpoint,
            region,
            path_style,
            key_id,
            secret,
            token,
        })
    }

    pub(super) fn credentials(&self) -> rusty_s3::Credentials {
        match &self.token {
            Some(token) => rusty_s3::Credentials::new_with_token(
                self.key_id.clone(),
                self.secret.clone(),
                token.clone(),
            ),
            None => rusty_s3::Credentials::new(self.key_id.clone(), self.secret.clone()),
        }
    }
}

/// The keys of section `[name]` of the INI file at `path`; `None` when
/// the file or the section is not there.
fn section(path: &Path, name: &str) -> Result<Option<HashMap<String, String>>, Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::Config(format!("reading {}: {e}", path.display())));
        }
    };
    let mut found: Option<HashMap<String, String>> = None;
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = header.trim() == name;
            if inside {
                found.get_or_insert_with(HashMap::new);
            }
            continue;
        }
        if inside && let Some((key, value)) = line.split_once('=') {
            found
                .get_or_insert_with(HashMap::new)
                .insert(key.trim().to_string(), value.trim().to_string());
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_buckets_and_plain_prefixes() {
        assert!(Location::parse("/mnt/nas").is_none());
        let at = |t: &str| Location::parse(t).unwrap();
        assert_eq!(
            at("s3://bb-lock/site/a/").unwrap(),
            Location {
                bucket: "bb-lock".into(),
                prefix: "site/a/".into()
            }
        );
        assert_eq!(at("s3://bb-lock").unwrap().prefix, "");
        assert_eq!(
            at("s3://bb-lock/site").unwrap().to_string(),
            "s3://bb-lock/site"
        );
        for bad in [
            "s3://",
            "s3://ab",
            "s3://Bucket/x",
            "s3://-b-/x",
            "s3://bkt/a/../b",
            "s3://bkt/a//b",
        ] {
            assert!(at(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_environment_wins_then_the_profile() {
        let dir = tempfile::tempdir().unwrap();
        let aws = dir.path().join(".aws");
        std::fs::create_dir(&aws).unwrap();
        std::fs::write(
            aws.join("credentials"),
            "[default]\naws_access_key_id = D\naws_secret_access_key = DS\n\n[nas]\naws_access_key_id=N\naws_secret_access_key=NS\n",
        )
        .unwrap();
        std::fs::write(
            aws.join("config"),
            "[profile nas]\nregion = eu-west-3\nendpoint_url = http://127.0.0.1:9000\n",
        )
        .unwrap();
        let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let home = Some(dir.path());
        let c = Config::resolve(&env(&[]), home, None).unwrap();
        assert_eq!((c.key_id.as_str(), c.region.as_str()), ("D", "us-east-1"));
        assert_eq!(c.endpoint, "https://s3.us-east-1.amazonaws.com");
        assert!(!c.path_style);
        let c = Config::resolve(&env(&[("AWS_PROFILE", "nas")]), home, None).unwrap();
        assert_eq!((c.key_id.as_str(), c.region.as_str()), ("N", "eu-west-3"));
        assert_eq!(c.endpoint, "http://127.0.0.1:9000");
        assert!(c.path_style);
        let c = Config::resolve(
            &env(&[
                ("AWS_PROFILE", "nas"),
                ("AWS_ACCESS_KEY_ID", "E"),
                ("AWS_SECRET_ACCESS_KEY", "s3cr3t-env"),
                ("AWS_REGION", "ap-south-1"),
                ("AWS_ENDPOINT_URL", "http://10.0.0.1:8333"),
            ]),
            home,
            Some("http://127.0.0.1:1"),
        )
        .unwrap();
        assert_eq!((c.key_id.as_str(), c.region.as_str()), ("E", "ap-south-1"));
        assert_eq!(c.endpoint, "http://127.0.0.1:1");
        // The secret is never shown.
        assert!(!format!("{c:?}").contains("s3cr3t"));
        let none = Config::resolve(&env(&[("AWS_PROFILE", "gone")]), home, None).unwrap_err();
        assert!(none.to_string().contains("no credentials"), "{none}");
    }
}
