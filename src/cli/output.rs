//! Small helpers for human output.

pub(crate) use bitback::units::bytes;

/// Left-aligned columns, two spaces apart; the last column is not padded.
pub(crate) fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A progress bar on stderr, drawn from the engine's progress reports;
/// `None` when stderr is not a terminal or output is JSON. With
/// `BITBACK_PROGRESS=lines` (`bitback run` sets it for the backups it
/// starts), `bitback-progress DONE TOTAL` lines on stderr instead,
/// whatever stderr is.
pub(crate) fn progress_bar(wanted: bool) -> Option<bitback::engine::ProgressSink> {
    use std::io::IsTerminal;
    if std::env::var("BITBACK_PROGRESS").as_deref() == Ok("lines") {
        return Some(bitback::engine::ProgressSink(std::sync::Arc::new(Lines)));
    }
    (wanted && std::io::stderr().is_terminal()).then(|| {
        bitback::engine::ProgressSink(std::sync::Arc::new(Bar(indicatif::ProgressBar::new(0))))
    })
}

/// Progress as lines for a parent process to read.
struct Lines;

impl bitback::engine::Progress for Lines {
    fn start(&self, _what: &str, total: u64) {
        eprintln!("bitback-progress 0 {total}");
    }

    fn update(&self, done: u64, total: u64) {
        eprintln!("bitback-progress {done} {total}");
    }

    fn finish(&self) {}
}

struct Bar(indicatif::ProgressBar);

impl bitback::engine::Progress for Bar {
    fn start(&self, what: &str, total: u64) {
        self.0.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        self.0.set_message(what.to_string());
        self.0.set_length(total);
        self.0.set_position(0);
    }

    fn update(&self, done: u64, total: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// Reads the key file a `flag` option names, if given; a bad one is the
/// caller's input to fix.
pub(crate) fn key_file(
    path: Option<&std::path::Path>,
    flag: &str,
) -> anyhow::Result<Option<bitback::engine::key::Key>> {
    path.map(bitback::engine::key::Key::from_file)
        .transpose()
        .map_err(|e| bitback::engine::BadInput(format!("{flag}: {e:#}")).into())
}

/// The bucket `repo` names when it is an `s3://BUCKET/PREFIX` URL, reached
/// the AWS way (`endpoint` over AWS_ENDPOINT_URL); `None` for a directory.
pub(crate) fn bucket(
    repo: &std::path::Path,
    endpoint: Option<&str>,
) -> anyhow::Result<Option<bitback::repo::Bucket>> {
    use bitback::engine::BadInput;
    let Some(location) = repo.to_str().and_then(bitback::s3::Location::parse) else {
        if endpoint.is_some() {
            return Err(BadInput("--s3-endpoint goes with an s3:// repository".into()).into());
        }
        return Ok(None);
    };
    let bad = |e: bitback::s3::Error| anyhow::Error::from(BadInput(e.to_string()));
    let config = bitback::s3::Config::from_env(endpoint).map_err(bad)?;
    Ok(Some(bitback::repo::Bucket::new(
        &config,
        location.map_err(bad)?,
    )?))
}

/// What a bitback server of a bucket's point opens: `vm`'s point
/// `backup` (an id or `latest`), its `volumes` (all when empty), in the
/// bucket `repo` names (an `s3://` URL, checked by [`bucket`] first).
pub(crate) fn bucket_source(
    repo: &std::path::Path,
    endpoint: Option<&str>,
    vm: &str,
    backup: &str,
    volumes: &[String],
) -> bitback::engine::serve::bucket::Source {
    bitback::engine::serve::bucket::Source {
        url: repo.to_string_lossy().into_owned(),
        endpoint: endpoint.map(str::to_string),
        vm: vm.to_string(),
        backup: bitback::engine::Pick::from(backup),
        volumes: volumes.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(65536), "64 KiB");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
        assert_eq!(bytes(u64::MAX), "16 EiB");
    }

    #[test]
    fn columns_align() {
        let t = table(&[
            vec!["A".into(), "BB".into(), "C".into()],
            vec!["AAA".into(), "B".into(), "CCCC".into()],
        ]);
        assert_eq!(t, "A    BB  C\nAAA  B   CCCC\n");
    }
}
