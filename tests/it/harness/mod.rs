//! The shared test harness: real QEMU processes in temp dirs, a small
//! synchronous QMP client of its own (so setup never goes through the code
//! under test), images made with qemu-img, and a runner for the built
//! bitback binary.
//!
//! Every process is started as a child and ended by its pid when its guard
//! drops, whether the test passed or panicked.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub mod domain;
pub mod guest;
pub mod nas;
pub mod s3;
#[path = "../../../fixtures/slowfs/mount.rs"]
pub mod slowfs;
pub mod vm;
pub(crate) use vm::{Model, Vm};

pub const INSTALL_HINT: &str = "install QEMU 10 from bookworm-backports as .ci/run does: \
     add the bookworm-backports suite, then `apt-get install -t bookworm-backports \
     qemu-system-x86 qemu-utils` (see README.md)";

/// Panics, naming the install command, when `tool` is not on PATH. Tests
/// that need QEMU never skip.
pub fn require(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "{tool} is not installed: {INSTALL_HINT}");
}

/// The test guest's kernel and initramfs, built once per checkout by
/// fixtures/guest/build.sh into target/guest.
pub fn guest_files() -> (PathBuf, PathBuf) {
    static BUILT: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let cache = root.join("target/guest");
            let out = Command::new("bash")
                .arg(root.join("fixtures/guest/build.sh"))
                .arg(&cache)
                .output()
                .expect("running fixtures/guest/build.sh");
            assert!(
                out.status.success(),
                "building the test guest failed; it needs apt-get and dpkg-deb and \
                 Debian's package mirror (apt-get download linux-image-cloud-amd64 \
                 busybox-static cpio):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            (cache.join("vmlinuz"), cache.join("initrd.gz"))
        })
        .clone()
}

/// A TCP port free at the time of asking, for a QEMU to listen on.
/// The major version of the qemu-system-x86_64 on PATH (7 for Debian
/// 12's, 10 for bookworm-backports'), read from `--version`, not from QMP:
/// the tests compare what bitback reads over QMP against it.
pub fn qemu_major() -> u64 {
    require("qemu-system-x86_64");
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .expect("running qemu-system-x86_64 --version");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("cannot read a version from {text:?}"))
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a free port")
        .port()
}

/// A key file as bitback accepts it: the text, readable by its owner
/// alone.
pub fn write_key(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// A loop device over a file (root), detached when dropped.
pub struct LoopDevice {
    pub device: PathBuf,
}

impl LoopDevice {
    pub fn new(file: &Path) -> LoopDevice {
        LoopDevice::with(file, &[])
    }

    /// A read-only loop device over `file`.
    pub fn read_only(file: &Path) -> LoopDevice {
        LoopDevice::with(file, &["--read-only"])
    }

    fn with(file: &Path, extra: &[&str]) -> LoopDevice {
        require("losetup");
        let out = run(Command::new("losetup")
            .args(["--find", "--show"])
            .args(extra)
            .arg(file));
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(
            device.starts_with("/dev/"),
            "losetup gave {device:?}; loop devices need root (this test runs as root in CI)"
        );
        LoopDevice { device }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("--detach")
            .arg(&self.device)
            .status();
    }
}

/// A small tmpfs mounted at a path (root only, as CI runs), unmounted
/// when dropped: a filesystem that fills up.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (as CI runs): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.into())
    }

    /// Gives the filesystem a new size.
    pub fn resize(&self, size: &str) {
        run(Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Whether this run of the suite finds a lost bitmap's changes by content
/// (bitback writes the files: the default data path), or takes a full
/// (`BITBACK_DATA_PATH=file`, QEMU writes them).
pub fn by_content() -> bool {
    std::env::var("BITBACK_DATA_PATH").as_deref() != Ok("file")
}

/// The kind of a volume whose bitmap was lost, in this run of the suite.
pub fn lost_bitmap_kind() -> &'static str {
    if by_content() { "incremental" } else { "full" }
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("bitback-test-")
        .tempdir()
        .expect("creating a temp dir")
}

/// Runs a command and panics with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `qemu-img create -f qcow2` with extra options, e.g. `["-o", "cluster_size=4k"]`.
pub fn create_qcow2(path: &Path, size: u64, extra: &[&str]) {
    require("qemu-img");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .args(extra)
        .arg(path)
        .arg(size.to_string()));
}

/// `qemu-img info --output=json` (with -U: the image may be open in QEMU).
pub fn qemu_img_info(path: &Path) -> Value {
    let out = run(Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path));
    serde_json::from_slice(&out.stdout).expect("qemu-img info prints JSON")
}

/// Whether a qcow2 image holds compressed clusters, from `qemu-img
/// check`'s summary (`... 12.50% compressed clusters`), which QEMU 7.2
/// prints too (its `qemu-img map` has no `compressed` field).
pub fn has_compressed_clusters(path: &Path) -> bool {
    let out = run(Command::new("qemu-img").args(["check", "-U"]).arg(path));
    let text = String::from_utf8_lossy(&out.stdout);
    let share = text
        .split(',')
        .find(|part| part.contains("compressed clusters"))
        .and_then(|part| part.trim().split('%').next())
        .and_then(|n| n.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no compressed share in qemu-img check's output: {text}"));
    share > 0.0
}

/// `qemu-img compare` of two qcow2 images (chains followed).
pub fn images_equal(a: &Path, b: &Path) -> bool {
    same_content(a, "qcow2", b, "qcow2")
}

/// `qemu-img compare` of two images with their formats given: true when
/// the guest-visible contents are equal; panics when compare itself fails.
pub fn same_content(a: &Path, fa: &str, b: &Path, fb: &str) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", fa, "-F", fb])
        .arg(a)
        .arg(b)
        .output()
        .expect("running qemu-img compare");
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare {} {} failed: {}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// A QMP error reply, as the harness sees it.
#[derive(Debug)]
pub struct QmpFailure {
    pub class: String,
    pub desc: String,
}

type Session = (BufReader<UnixStream>, UnixStream);

/// Connects, reads the greeting and negotiates capabilities.
fn qmp_session(socket: &Path) -> std::io::Result<Session> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let greeting = read_message(&mut reader)?;
    assert!(greeting.get("QMP").is_some(), "no greeting: {greeting}");
    writeln!(writer, "{}", json!({"execute": "qmp_capabilities"}))?;
    read_message(&mut reader)?;
    Ok((reader, writer))
}

/// The next reply, skipping events.
fn read_message(reader: &mut BufReader<UnixStream>) -> std::io::Result<Value> {
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let value: Value = serde_json::from_str(&line).expect("QMP sends JSON lines");
        if value.get("event").is_none() {
            return Ok(value);
        }
    }
}

/// One short-lived QMP session of the harness's own.
pub fn qmp_call(socket: &Path, command: &str, arguments: Value) -> Result<Value, QmpFailure> {
    let mut message = json!({ "execute": command });
    if !arguments.is_null() {
        message["arguments"] = arguments;
    }
    // Under load QEMU sometimes drops a connection it has not served yet
    // (a reset or a broken pipe before the command went out); the harness
    // retries that, and nothing after the command was written.
    let mut attempt = 0;
    let mut reader = loop {
        let sent = qmp_session(socket).and_then(|(reader, mut writer)| {
            writeln!(writer, "{message}")?;
            Ok(reader)
        });
        match sent {
            Ok(reader) => break reader,
            Err(e) if attempt < 50 => {
                attempt += 1;
                eprintln!(
                    "harness: QMP session on {} failed ({e}); retrying",
                    socket.display()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("harness: QMP session on {}: {e}", socket.display()),
        }
    };
    let reply =
        read_message(&mut reader).unwrap_or_else(|e| panic!("harness: waiting for {command}: {e}"));
    if let Some(ret) = reply.get("return") {
        return Ok(ret.clone());
    }
    let error = &reply["error"];
    Err(QmpFailure {
        class: error["class"].as_str().unwrap_or_default().to_string(),
        desc: error["desc"].as_str().unwrap_or_default().to_string(),
    })
}

/// What kind of QEMU a test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `qemu-system-x86_64 -machine none`: format nodes, no devices.
    MachineNone,
    /// `qemu-system-x86_64 -machine pc -S -accel tcg` with one virtio-blk
    /// device per volume (`share-rw=on`, so HMP qemu-io can write).
    Pc,
    /// `qemu-storage-daemon` with an NBD export per volume.
    StorageDaemon,
    /// `-machine pc -accel tcg` booting the test guest (fixtures/guest),
    /// which writes its sequence log to its disks without stopping.
    Guest,
}

/// A disk to attach: the device id (Pc only), the node name, the image,
/// its format driver and extra options for the format node (such as
/// `encrypt.key-secret=sec0`). A block device is opened with
/// `host_device`, anything else with `file`.
#[derive(Debug, Clone)]
pub struct Disk {
    pub device: String,
    pub node: String,
    pub image: PathBuf,
    pub format: String,
    pub options: String,
}

impl Disk {
    pub fn new(device: &str, node: &str, image: &Path) -> Disk {
        Disk::with_format(device, node, image, "qcow2", "")
    }

    pub fn with_format(
        device: &str,
        node: &str,
        image: &Path,
        format: &str,
        options: &str,
    ) -> Disk {
        Disk {
            device: device.into(),
            node: node.into(),
            image: image.into(),
            format: format.into(),
            options: options.into(),
        }
    }

    fn protocol(&self) -> &'static str {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(&self.image) {
            Ok(m) if m.file_type().is_block_device() => "host_device",
            _ => "file",
        }
    }

    /// The format node's options after its driver and file.
    fn format_options(&self) -> String {
        if self.options.is_empty() {
            String::new()
        } else {
            format!(",{}", self.options)
        }
    }
}

/// A running QEMU with two monitors: `control` for the harness, `qmp` for
/// the code under test (QEMU serves one client per monitor at a time).
pub struct Qemu {
    pub kind: Kind,
    child: Option<Child>,
    pub dir: PathBuf,
    pub qmp: PathBuf,
    pub control: PathBuf,
    pub nbd: PathBuf,
    pub disks: Vec<Disk>,
}

impl Qemu {
    pub fn start(kind: Kind, dir: &Path, disks: &[Disk]) -> Qemu {
        Qemu::start_with(kind, dir, disks, &[])
    }

    /// Starts QEMU with extra command-line arguments.
    pub fn start_with(kind: Kind, dir: &Path, disks: &[Disk], extra: &[String]) -> Qemu {
        let qmp = dir.join("qmp.sock");
        let control = dir.join("control.sock");
        let nbd = dir.join("nbd.sock");
        let mut args: Vec<String> = Vec::new();
        let program = match kind {
            Kind::MachineNone | Kind::Pc | Kind::Guest => {
                require("qemu-system-x86_64");
                if kind == Kind::Pc {
                    args.extend(["-machine", "pc", "-S", "-accel", "tcg"].map(String::from));
                } else if kind == Kind::Guest {
                    let (kernel, initrd) = guest_files();
                    args.extend(["-machine", "pc", "-accel", "tcg", "-m", "256"].map(String::from));
                    args.extend([
                        "-kernel".into(),
                        kernel.display().to_string(),
                        "-initrd".into(),
                        initrd.display().to_string(),
                        "-append".into(),
                        "console=ttyS0 panic=-1 quiet".into(),
                        "-no-reboot".into(),
                        "-serial".into(),
                        format!("file:{}", dir.join("serial.log").display()),
                        // The guest agent's port; the guest answers on it.
                        "-device".into(),
                        "virtio-serial".into(),
                        "-chardev".into(),
                        format!(
                            "socket,id=qga0,path={},server=on,wait=off",
                            dir.join("qga.sock").display()
                        ),
                        "-device".into(),
                        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into(),
                    ]);
                } else {
                    args.extend(["-machine", "none"].map(String::from));
                }
                args.extend(["-nodefaults", "-display", "none"].map(String::from));
                // Extra arguments for every qemu-system run, e.g. firmware
                // directories for an older QEMU extracted beside the
                // installed one (CONTRIBUTING.md: running the suite on QEMU 7.2).
                if let Ok(extra) = std::env::var("BITBACK_TEST_QEMU_ARGS") {
                    args.extend(extra.split_whitespace().map(String::from));
                }
                for socket in [&qmp, &control] {
                    args.push("-qmp".into());
                    args.push(format!("unix:{},server=on,wait=off", socket.display()));
                }
                for (i, d) in disks.iter().enumerate() {
                    args.push("-blockdev".into());
                    args.push(format!(
                        "driver={},filename={},node-name=file{i},discard=unmap",
                        d.protocol(),
                        d.image.display()
                    ));
                    args.push("-blockdev".into());
                    // discard=unmap: guest discards really free clusters,
                    // as on a VM with discard on (the default ignores them).
                    args.push(format!(
                        "driver={},file=file{i},node-name={},discard=unmap{}",
                        d.format,
                        d.node,
                        d.format_options()
                    ));
                    if kind == Kind::Pc || kind == Kind::Guest {
                        args.push("-device".into());
                        args.push(format!(
                            "virtio-blk-pci,drive={},id={},share-rw=on",
                            d.node, d.device
                        ));
                    }
                }
                "qemu-system-x86_64"
            }
            Kind::StorageDaemon => {
                require("qemu-storage-daemon");
                for (i, socket) in [&qmp, &control].into_iter().enumerate() {
                    args.push("--chardev".into());
                    args.push(format!(
                        "socket,path={},server=on,wait=off,id=mon{i}",
                        socket.display()
                    ));
                    args.push("--monitor".into());
                    args.push(format!("chardev=mon{i}"));
                }
                args.push("--nbd-server".into());
                args.push(format!("addr.type=unix,addr.path={}", nbd.display()));
                for (i, d) in disks.iter().enumerate() {
                    args.push("--blockdev".into());
                    args.push(format!(
                        "driver={},filename={},node-name=file{i}",
                        d.protocol(),
                        d.image.display()
                    ));
                    args.push("--blockdev".into());
                    args.push(format!(
                        "driver={},file=file{i},node-name={}{}",
                        d.format,
                        d.node,
                        d.format_options()
                    ));
                    args.push("--export".into());
                    args.push(format!(
                        "type=nbd,id=export{i},node-name={},name={},writable=on",
                        d.node, d.node
                    ));
                }
                "qemu-storage-daemon"
            }
        };
        args.extend(extra.iter().cloned());
        // A QEMU killed earlier in this dir left its sockets behind; they
        // must not pass for the new one's.
        for socket in [&qmp, &control, &nbd] {
            let _ = std::fs::remove_file(socket);
        }
        let log = std::fs::File::create(dir.join("qemu.log")).expect("creating the QEMU log");
        let child = Command::new(program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program}: {e}"));
        let mut qemu = Qemu {
            kind,
            child: Some(child),
            dir: dir.into(),
            qmp,
            control,
            nbd,
            disks: disks.to_vec(),
        };
        qemu.wait_ready();
        if kind == Kind::Guest {
            qemu.wait_serial("bitback-guest: writing", Duration::from_secs(90));
        }
        qemu
    }

    /// The guest agent's socket of a `Kind::Guest` QEMU.
    pub fn qga(&self) -> PathBuf {
        self.dir.join("qga.sock")
    }

    /// Waits until the guest's serial log holds `text`.
    pub fn wait_serial(&self, text: &str, limit: Duration) {
        let log = self.dir.join("serial.log");
        let deadline = Instant::now() + limit;
        loop {
            let seen = std::fs::read_to_string(&log).unwrap_or_default();
            if seen.contains(text) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the guest did not print {text:?} within {limit:?}; its serial log:\n{seen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("QEMU is running")
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let sockets = [&self.qmp, &self.control];
        loop {
            if sockets.iter().all(|s| s.exists())
                && (self.kind != Kind::StorageDaemon || self.nbd.exists())
            {
                // The sockets listen before QEMU has opened its images; a
                // reply means its main loop runs, so start-up is over.
                self.must("query-version", Value::Null);
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "QEMU exited at start ({status}):\n{}",
                    std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "QEMU's monitors did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A command on the harness's own monitor.
    pub fn call(&self, command: &str, arguments: Value) -> Result<Value, QmpFailure> {
        qmp_call(&self.control, command, arguments)
    }

    /// A command that must succeed.
    pub fn must(&self, command: &str, arguments: Value) -> Value {
        self.call(command, arguments)
            .unwrap_or_else(|e| panic!("{command} failed: {e:?}"))
    }

    /// Writes through QEMU itself: HMP `qemu-io` on qemu-system, the NBD
    /// export on the storage daemon. `cmd` is a qemu-io command such as
    /// `write -P 0x55 1M 64k`.
    pub fn qemu_io(&self, node: &str, cmd: &str) {
        match self.kind {
            Kind::MachineNone | Kind::Pc | Kind::Guest => {
                let out = self.must(
                    "human-monitor-command",
                    json!({ "command-line": format!("qemu-io {node} \"{cmd}\"") }),
                );
                // QEMU 10 does not return qemu-io's own output through
                // QMP; tests check the effect (bitmap counts, compare).
                assert!(out.is_string(), "qemu-io {node} {cmd:?}: {out}");
            }
            Kind::StorageDaemon => {
                require("qemu-io");
                let url = format!("nbd+unix:///{node}?socket={}", self.nbd.display());
                run(Command::new("qemu-io")
                    .args(["-f", "raw", "-c", cmd])
                    .arg(url));
            }
        }
    }

    /// Writes through guest device `device` (a virtio-blk-pci id), above
    /// any filter under it, as a guest's write goes. QEMU 10 returns no
    /// qemu-io output: a write that failed shows in the image's contents.
    pub fn qemu_io_device(&self, device: &str, cmd: &str) {
        let path = format!("/machine/peripheral/{device}/virtio-backend");
        let out = self.must(
            "human-monitor-command",
            json!({ "command-line": format!("qemu-io -d {path} \"{cmd}\"") }),
        );
        let out = out.as_str().unwrap_or_default();
        assert!(
            !out.contains("Error") && !out.contains("failed"),
            "qemu-io -d {path} {cmd:?}: {out}"
        );
    }

    pub fn add_bitmap(&self, node: &str, name: &str, persistent: bool) {
        self.must(
            "block-dirty-bitmap-add",
            json!({ "node": node, "name": name, "persistent": persistent }),
        );
    }

    /// Waits until a block job runs in QEMU, while `child` (the bitback
    /// that starts it) still runs.
    pub fn wait_for_job(&self, child: &mut std::process::Child) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let jobs = self.must("query-block-jobs", Value::Null);
            if jobs.as_array().is_some_and(|j| !j.is_empty()) {
                return;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("bitback ended ({status}) before its job was seen");
            }
            assert!(Instant::now() < deadline, "no backup job within 120 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until QEMU runs no block job.
    pub fn wait_jobs_done(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self
            .must("query-block-jobs", Value::Null)
            .as_array()
            .expect("query-block-jobs returns a list")
            .is_empty()
        {
            assert!(
                Instant::now() < deadline,
                "block jobs did not finish in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal to QEMU by its pid.
    pub fn signal(&self, signal: &str) {
        run(Command::new("kill").args([format!("-{signal}"), self.pid().to_string()]));
    }

    /// Asks QEMU to quit and waits for it, so its images are closed cleanly
    /// (persistent bitmaps written) and safe to compare. QEMU closing the
    /// connection, or having gone with its socket, is what quitting means:
    /// neither is an error.
    pub fn quit(mut self) {
        let asked = std::panic::catch_unwind(|| {
            let sent = qmp_session(&self.control).and_then(|(mut reader, mut writer)| {
                writeln!(writer, "{}", json!({"execute": "quit"}))?;
                read_message(&mut reader)
            });
            if let Err(e) = sent {
                eprintln!("harness: quit: {e} (QEMU is exiting or gone)");
            }
        });
        if asked.is_err() {
            eprintln!("harness: quit: the monitor answered oddly; waiting for QEMU anyway");
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("QEMU did not quit within 20 s");
        }
    }

    /// Kills QEMU with SIGKILL now and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The result of one run of the bitback binary.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        assert_eq!(self.code, Some(0), "bitback failed:\n{}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

pub fn bitback(args: &[&str]) -> Run {
    bitback_env(args, &[])
}

/// `bitback backup --json` of the QEMU at `qmp` into `repo` as `vm`, plus
/// `extra` arguments.
pub fn backup_into(qmp: &Path, repo: &Path, vm: &str, extra: &[&str]) -> Run {
    backup_into_env(qmp, repo, vm, extra, &[])
}

/// [`backup_into`] with extra environment variables.
pub fn backup_into_env(
    qmp: &Path,
    repo: &Path,
    vm: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Run {
    let mut args = vec![
        "backup",
        "--qmp",
        qmp.to_str().unwrap(),
        "--repo",
        repo.to_str().unwrap(),
        "--vm",
        vm,
        "--json",
    ];
    args.extend(extra);
    bitback_env(&args, env)
}

/// The ids `bitback list` gives, oldest first: of `vm`, or of every VM.
pub fn list_ids(repo: &Path, vm: Option<&str>) -> Vec<String> {
    let mut args = vec!["list", "--repo", repo.to_str().unwrap(), "--json"];
    if let Some(vm) = vm {
        args.extend(["--vm", vm]);
    }
    bitback(&args)
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// The `name` of each object of the JSON array `list` (volumes, bitmaps).
pub fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .expect("a JSON array")
        .iter()
        .map(|v| v["name"].as_str().expect("a name"))
        .collect()
}

/// The longest any one bitback run in the tests may take: a run that
/// hangs fails its test instead of hanging the suite.
pub const RUN_LIMIT: Duration = Duration::from_secs(300);

/// `bitback` with extra environment variables, killed (by its pid) and
/// failed when it runs longer than [`RUN_LIMIT`].
pub fn bitback_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let out = bitback::child::output_within(
        Command::new(env!("CARGO_BIN_EXE_bitback"))
            .args(args)
            .envs(env.iter().copied())
            .env_remove("BITBACK_LOG"),
        RUN_LIMIT,
    )
    .expect("running bitback")
    .unwrap_or_else(|| {
        panic!(
            "bitback {} did not finish within {RUN_LIMIT:?}; killed",
            args.join(" ")
        )
    });
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A small deterministic generator: the seed is printed so a failure can be
/// replayed with BITBACK_SEED.
pub struct Rng(u64);

impl Rng {
    /// `BITBACK_SEED` if set, else `seed`: for tests that must replay.
    pub fn from_env_or(seed: u64) -> Rng {
        let seed = std::env::var("BITBACK_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(seed);
        eprintln!("BITBACK_SEED={seed}");
        Rng(seed | 1)
    }

    pub fn from_env() -> Rng {
        let seed = std::env::var("BITBACK_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("BITBACK_SEED={seed}");
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}
