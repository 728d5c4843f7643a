//! Running a helper program with a time limit: a program that hangs (a
//! stalled libvirtd, a guest agent that never answers) is killed by its
//! pid instead of hanging bitback.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A helper program that ran and failed: what it was, its exit status
/// and what it said on stderr, as fields a caller can decide on.
#[derive(Debug, thiserror::Error)]
#[error("{program} failed ({status}): {stderr}")]
pub struct Failed {
    pub program: String,
    pub status: std::process::ExitStatus,
    pub stderr: String,
}

/// `out` when its program succeeded, else the [`Failed`] it was.
pub fn succeeded(program: impl Into<String>, out: Output) -> Result<Output, Failed> {
    if out.status.success() {
        return Ok(out);
    }
    Err(Failed {
        program: program.into(),
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Runs `cmd` (stdin from /dev/null) and collects its output; `None` when
/// it was still running after `limit` and was killed. The pipes are read
/// from threads while it runs, so a full pipe cannot stall it.
pub fn output_within(cmd: &mut Command, limit: Duration) -> std::io::Result<Option<Output>> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Some(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_comes_back_and_a_hang_is_cut_off() {
        let out = output_within(
            Command::new("sh").args(["-c", "echo out; echo err >&2"]),
            Duration::from_secs(30),
        )
        .unwrap()
        .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        let started = Instant::now();
        let hung =
            output_within(Command::new("sleep").arg("60"), Duration::from_millis(200)).unwrap();
        assert!(hung.is_none());
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}
