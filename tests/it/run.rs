//! `bitback run JOBFILE`: many VMs as one job, within one rate limit,
//! each failure its own.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::vm::Vm;
use crate::harness::{Tmpfs, bitback, require, tempdir};

const MIB: u64 = 1 << 20;

/// Bytes allocated under `dirs`, every file counted.
fn allocated(dirs: &[&Path]) -> u64 {
    fn walk(p: &Path, sum: &mut u64) {
        let Ok(entries) = std::fs::read_dir(p) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if meta.is_dir() {
                walk(&e.path(), sum);
            } else {
                *sum += meta.blocks() * 512;
            }
        }
    }
    let mut sum = 0;
    for d in dirs {
        walk(d, &mut sum);
    }
    sum
}

/// `bitback run JOBFILE ARGS`, sampling the bytes allocated under
/// `watched` every 100 ms while it runs: its exit code, stdout, stderr
/// and the samples (seconds since start, bytes).
fn run_sampled(
    job: &Path,
    args: &[&str],
    watched: &[&Path],
) -> (Option<i32>, String, String, Vec<(f64, u64)>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitback"))
        .arg("run")
        .arg(job)
        .args(args)
        .env_remove("BITBACK_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let start = Instant::now();
    let mut samples = Vec::new();
    let status = loop {
        samples.push((start.elapsed().as_secs_f64(), allocated(watched)));
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(600) {
            let _ = child.kill();
            panic!("bitback run did not end within 600 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (
        status.code(),
        stdout.join().unwrap(),
        stderr.join().unwrap(),
        samples,
    )
}

/// The highest write rate over any `window` of the samples, bytes/s.
fn peak_rate(samples: &[(f64, u64)], window: f64) -> f64 {
    let mut peak: f64 = 0.0;
    for (i, &(t0, b0)) in samples.iter().enumerate() {
        if let Some(&(t1, b1)) = samples[i..].iter().find(|(t, _)| t - t0 >= window) {
            peak = peak.max(b1.saturating_sub(b0) as f64 / (t1 - t0));
        }
    }
    peak
}

/// A VM (`-machine pc -S`, one 64 MiB volume under a virtio-blk device)
/// holding `data_mib` MiB written through its device.
fn vm_with_data(dir: &Path, data_mib: u64, seed: u8) -> Vm {
    std::fs::create_dir_all(dir).unwrap();
    let mut vm = Vm::with_devices(dir, &[64 * MIB]);
    for k in 0..data_mib {
        vm.write(0, k * 2 * MIB, MIB, seed.wrapping_add(k as u8) | 1);
    }
    vm
}

/// Restores the newest point of `vm` from `repo` and compares it with the
/// model of its volume.
fn assert_restores_to_model(vm: &Vm, repo: &Path, name: &str) {
    let out = vm.dir.join(format!("restored-{name}.raw"));
    let _ = std::fs::remove_file(&out);
    bitback(&[
        "restore",
        "--repo",
        repo.to_str().unwrap(),
        "--vm",
        name,
        "--output",
        out.to_str().unwrap(),
    ])
    .json_or_ok();
    let model = vm.dir.join(format!("model-{name}.raw"));
    std::fs::write(&model, &vm.models[0].bytes).unwrap();
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&model)
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(
        cmp.status.code(),
        Some(0),
        "vm {name}'s restore differs from its disk: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

trait OkRun {
    fn json_or_ok(&self);
}

impl OkRun for crate::harness::Run {
    fn json_or_ok(&self) {
        assert_eq!(self.code, Some(0), "bitback failed:\n{}", self.stderr);
    }
}

/// Parses the metrics file with Prometheus's own Python parser (not
/// bitback's code): `{name: [[labels, value], ...]}`.
fn prometheus_samples(file: &Path) -> Value {
    require("python3");
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import json, sys\n\
             try:\n    from prometheus_client.parser import text_string_to_metric_families\n\
             except ImportError:\n    sys.exit('prometheus_client is not installed: python3 -m pip install prometheus-client')\n\
             out = {}\n\
             for fam in text_string_to_metric_families(open(sys.argv[1]).read()):\n    \
                 for s in fam.samples:\n        \
                     out.setdefault(s.name, []).append([s.labels, s.value])\n\
             print(json.dumps(out))",
        )
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the metrics file does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sample_of(samples: &Value, name: &str, vm: &str) -> f64 {
    samples[name]
        .as_array()
        .unwrap_or_else(|| panic!("no {name} in {samples}"))
        .iter()
        .find(|s| s[0]["vm"] == vm)
        .unwrap_or_else(|| panic!("no {name} of vm {vm}"))[1]
        .as_f64()
        .unwrap()
}

#[test]
fn a_job_backs_up_its_vms_within_one_rate_limit_and_names_the_failures() {
    let dir = tempdir();
    let d = dir.path();
    let healthy: Vec<Vm> = (0..3)
        .map(|i| vm_with_data(&d.join(format!("vm{i}")), 16, 40 * i as u8))
        .collect();
    // One VM whose repository fills up, one whose QEMU is gone.
    let full = vm_with_data(&d.join("full"), 16, 200);
    let small = d.join("small-repo");
    let _tmpfs = Tmpfs::mount(&small, "4M");
    let repo = d.join("repo");
    let gone = d.join("gone.qmp");
    let (metrics, report) = (d.join("bitback.prom"), d.join("last.json"));
    let mut text = format!(
        "jobs = 3\nrate_limit = \"8M\"\nmetrics_file = {metrics:?}\nreport_file = {report:?}\n"
    );
    for (i, vm) in healthy.iter().enumerate() {
        text.push_str(&format!(
            "\n[[vm]]\nname = \"vm{i}\"\nqmp = {:?}\nrepo = {repo:?}\nkeep_last = 3\nverify_outdated_after = \"1d\"\n",
            vm.qemu().qmp
        ));
    }
    text.push_str(&format!(
        "\n[[vm]]\nname = \"full\"\nqmp = {:?}\nrepo = {small:?}\n",
        full.qemu().qmp
    ));
    text.push_str(&format!(
        "\n[[vm]]\nname = \"gone\"\nqmp = {gone:?}\nrepo = {repo:?}\n"
    ));
    let job = d.join("job.toml");
    std::fs::write(&job, text).unwrap();

    let (code, stdout, stderr, samples) = run_sampled(&job, &[], &[&repo, &small]);
    assert_eq!(
        code,
        Some(1),
        "some VMs failed, so exit 1:\n{stdout}\n{stderr}"
    );
    // The backups' progress reached bitback run as numbers, not as lines
    // in its log.
    assert!(!stderr.contains("bitback-progress"), "{stderr}");
    assert!(
        stderr.contains("[vm0 → "),
        "each task's lines are named: {stderr}"
    );

    // The healthy VMs' points are their disks; the failures are named.
    for (i, vm) in healthy.iter().enumerate() {
        assert_restores_to_model(vm, &repo, &format!("vm{i}"));
    }
    let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let mut failed: Vec<&str> = r["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    failed.sort();
    assert_eq!(
        failed,
        [
            format!("full → {}", small.display()),
            format!("gone → {}", repo.display())
        ]
    );
    for t in r["tasks"].as_array().unwrap() {
        let vm = t["vm"].as_str().unwrap();
        if vm.starts_with("vm") {
            assert_eq!(t["ok"], json!(true), "{t}");
            assert_eq!(t["kind"], json!("full"), "{t}");
            assert_eq!(t["verified"]["ok"], json!(true), "{t}");
        } else {
            assert!(t["error"].as_str().is_some_and(|e| !e.is_empty()), "{t}");
        }
    }
    let full_error = r["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["vm"] == "full")
        .unwrap()["error"]
        .to_string();
    assert!(full_error.contains("No space left"), "{full_error}");
    assert!(stdout.contains("FAILED"), "{stdout}");

    // The written bytes never ran faster than the limit (8 MiB/s), over
    // any 3 s: without it the 48 MiB would go in about a second. The
    // slack is what sampling can see: the files grow by QEMU's requests
    // (1 MiB), so a window may catch one request more per running backup
    // (3 MiB in 3 s: 12%), and the files' own metadata.
    let limit = 8.0 * MIB as f64;
    let peak = peak_rate(&samples, 3.0);
    assert!(
        peak <= limit * 1.12,
        "the repositories grew at {:.1} MiB/s over 3 s, past the 8 MiB/s limit; samples: {samples:?}",
        peak / MIB as f64
    );
    eprintln!(
        "peak write rate over 3 s: {:.2} MiB/s (limit 8); run took {:.1} s",
        peak / MIB as f64,
        samples.last().map_or(0.0, |s| s.0)
    );
    if std::env::var("BITBACK_TEST_SHOW_RATES").is_ok() {
        for w in samples.windows(10).step_by(5) {
            let (t0, b0) = w[0];
            let (t1, b1) = w[w.len() - 1];
            eprintln!(
                "{t0:5.1}..{t1:5.1}: {:6.2} MiB/s",
                (b1 - b0) as f64 / (t1 - t0) / MIB as f64
            );
        }
        eprintln!("{stderr}");
    }
    let written = allocated(&[&repo]);
    assert!(written >= 48 * MIB, "only {written} bytes written");

    // The metrics file parses with Prometheus's parser and says who failed.
    let m = prometheus_samples(&metrics);
    for i in 0..3 {
        assert_eq!(
            sample_of(&m, "bitback_last_run_success", &format!("vm{i}")),
            1.0
        );
        assert!(
            sample_of(&m, "bitback_last_run_bytes_written", &format!("vm{i}")) >= (16 * MIB) as f64
        );
    }
    assert_eq!(sample_of(&m, "bitback_last_run_success", "full"), 0.0);
    assert_eq!(sample_of(&m, "bitback_failures_total", "gone"), 1.0);
    assert_eq!(m["bitback_job_failed_vms"][0][1].as_f64(), Some(2.0));

    // A second run: incrementals; the failures count up, the good VMs'
    // last success moves on.
    let first_success = sample_of(&m, "bitback_last_success_timestamp_seconds", "vm0");
    std::thread::sleep(Duration::from_millis(1100));
    let (code, stdout, stderr, _) = run_sampled(&job, &["--json"], &[]);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    let r: Value = serde_json::from_str(&stdout).unwrap();
    let kinds: Vec<&Value> = r["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["ok"] == json!(true))
        .map(|t| &t["kind"])
        .collect();
    assert_eq!(kinds, [&json!("incremental"); 3], "{stdout}");
    let m = prometheus_samples(&metrics);
    assert_eq!(sample_of(&m, "bitback_failures_total", "gone"), 2.0);
    assert!(sample_of(&m, "bitback_last_success_timestamp_seconds", "vm0") > first_success);
    drop(full);
}

#[test]
fn a_backup_past_its_time_limit_is_cancelled_and_leaves_nothing() {
    let dir = tempdir();
    let d = dir.path();
    let vm = vm_with_data(&d.join("vm"), 24, 7);
    let repo = d.join("repo");
    // 24 MiB at 1 MiB/s takes 24 s; the limit cuts it at 3.
    let job = d.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "rate_limit = \"1M\"\ntime_limit = 3\n[[vm]]\nname = \"slow\"\nqmp = {:?}\nrepo = {repo:?}\n",
            vm.qemu().qmp
        ),
    )
    .unwrap();
    let started = Instant::now();
    let (code, stdout, stderr, _) = run_sampled(&job, &["--json"], &[]);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the run went on past its time limit"
    );
    let r: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["tasks"][0]["timed_out"], json!(true), "{stdout}");
    assert_eq!(r["tasks"][0]["backup"], Value::Null);
    // Nothing of it kept, nothing of it left in QEMU.
    let listed = bitback(&["list", "--repo", repo.to_str().unwrap(), "--json"]);
    assert_eq!(listed.code, Some(0), "{}", listed.stderr);
    assert_eq!(
        serde_json::from_str::<Value>(&listed.stdout).unwrap(),
        json!([])
    );
    let qemu = vm.qemu();
    let nodes = qemu.must("query-named-block-nodes", json!({ "flat": true }));
    for n in nodes.as_array().unwrap() {
        let name = n["node-name"].as_str().unwrap_or_default();
        assert!(!name.starts_with("bitback-"), "{name} was left in QEMU");
    }
    assert_eq!(qemu.must("query-jobs", Value::Null), json!([]));
    let on = qemu.must(
        "qom-get",
        json!({ "path": "/machine/peripheral/disk0/virtio-backend", "property": "drive" }),
    );
    assert_eq!(on, json!("drive0"), "the device is back on its own node");
    let status = qemu.must("query-status", Value::Null);
    assert_eq!(
        status["status"],
        json!("prelaunch"),
        "the VM was left as it was"
    );
}

/// Every file under `dir` with its length and modification time.
fn tree(dir: &Path) -> Vec<(PathBuf, u64, i64)> {
    let mut out = Vec::new();
    fn walk(p: &Path, out: &mut Vec<(PathBuf, u64, i64)>) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                walk(&e.path(), out);
            }
            out.push((
                e.path(),
                meta.len(),
                meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
            ));
        }
    }
    walk(dir, &mut out);
    out.sort();
    out
}

#[test]
fn dry_run_shows_the_plan_and_changes_nothing() {
    let dir = tempdir();
    let d = dir.path();
    let vm = vm_with_data(&d.join("vm"), 2, 3);
    let repo = d.join("repo");
    let qmp = vm.qemu().qmp.clone();
    for _ in 0..2 {
        crate::harness::backup_into(&qmp, &repo, "a", &["--full"]).json();
    }
    let ids = crate::harness::list_ids(&repo, Some("a"));
    let (metrics, report) = (d.join("m.prom"), d.join("r.json"));
    let job = d.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "metrics_file = {metrics:?}\nreport_file = {report:?}\n\
             [[vm]]\nname = \"a\"\nqmp = {qmp:?}\nrepo = {repo:?}\nkeep_last = 1\n\
             [[vm]]\nname = \"new\"\nqmp = {qmp:?}\nrepo = {repo:?}\n"
        ),
    )
    .unwrap();
    let before = tree(&repo);
    let bitmaps_before = vm.qemu().must("query-block", Value::Null);
    let out = bitback(&["run", job.to_str().unwrap(), "--dry-run", "--json"]);
    let plans = out.json();
    assert_eq!(plans[0]["vm"], json!("a"));
    assert_eq!(plans[0]["last"], json!(ids[1]));
    // The VM's own plan: its checkpoint bitmap is there.
    assert!(
        plans[0]["next"]
            .as_str()
            .unwrap()
            .starts_with(&format!("incremental: changes since {}", ids[1])),
        "{plans}"
    );
    assert_eq!(plans[0]["problems"], json!([]), "{plans}");
    assert_eq!(plans[0]["would_prune"], json!([ids[0]]), "{plans}");
    assert!(
        plans[1]["next"].as_str().unwrap().starts_with("full"),
        "{plans}"
    );
    assert_eq!(tree(&repo), before, "--dry-run changed the repository");
    assert_eq!(vm.qemu().must("query-block", Value::Null), bitmaps_before);
    assert!(!metrics.exists() && !report.exists());
    // The human form says the same.
    let text = bitback(&["run", job.to_str().unwrap(), "--dry-run"]);
    assert_eq!(text.code, Some(0), "{}", text.stderr);
    assert!(
        text.stdout.contains("retention would remove"),
        "{}",
        text.stdout
    );
    assert_eq!(tree(&repo), before);
}

/// A killed `bitback run` leaves its shared rate files in the temp dir;
/// the next run with a rate limit removes them, and leaves alone the
/// directory of a run that lives and a look-alike that is not a run's.
#[test]
fn a_killed_runs_rate_files_go_with_the_next_run() {
    let dir = tempdir();
    let d = dir.path();
    let tmp = d.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let left = tmp.join(format!("bitback-run-{dead}-00ff00ff00ff00ff"));
    let alive = tmp.join(format!(
        "bitback-run-{}-00ff00ff00ff00ff",
        std::process::id()
    ));
    let other = tmp.join("bitback-runner-1-x");
    for d in [&left, &alive, &other] {
        std::fs::create_dir(d).unwrap();
        std::fs::write(d.join("0.rate"), b"1000").unwrap();
    }
    let job = d.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "rate_limit = \"8M\"\n[[vm]]\nname = \"a\"\nqmp = {:?}\nrepo = {:?}\n",
            d.join("no-such.sock"),
            d.join("repo")
        ),
    )
    .unwrap();
    let out = crate::harness::bitback_env(
        &["run", job.to_str().unwrap()],
        &[("TMPDIR", tmp.to_str().unwrap())],
    );
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(!left.exists(), "the dead run's rate files stayed");
    assert!(alive.join("0.rate").exists());
    assert!(other.join("0.rate").exists());
    let mine: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("bitback-run-") && !n.contains("00ff00ff"))
        .collect();
    assert!(mine.is_empty(), "the run left {mine:?}");
}

#[test]
fn a_wrong_job_file_exits_2_and_starts_nothing() {
    let dir = tempdir();
    let d = dir.path();
    let job = d.join("job.toml");
    for (text, says) in [
        (
            "jobs = 2\n[[vm]]\nname = \"a\"\nqmp = \"/x\"\nrepo = \"/r\"\nkeep_daly = 7\n",
            "keep_daly",
        ),
        (
            "[[vm]]\nname = \"../a\"\nqmp = \"/x\"\nrepo = \"/r\"\n",
            "../a",
        ),
        ("jobs = \n", "job file"),
    ] {
        std::fs::write(&job, text).unwrap();
        let out = bitback(&["run", job.to_str().unwrap()]);
        assert_eq!(out.code, Some(2), "{text}: {}", out.stderr);
        assert!(out.stderr.contains(says), "{text}: {}", out.stderr);
    }
}

#[test]
fn a_vm_with_two_repositories_is_backed_up_into_one_then_the_other_each_guarded() {
    let dir = tempdir();
    let d = dir.path();
    let vm = vm_with_data(&d.join("vm"), 4, 11);
    let (r1, r2) = (d.join("local"), d.join("offsite"));
    let job = d.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "jobs = 2\n[[vm]]\nname = \"a\"\nqmp = {:?}\nrepos = [{r1:?}, {r2:?}]\n",
            vm.qemu().qmp
        ),
    )
    .unwrap();
    let out = bitback(&["run", job.to_str().unwrap(), "--json"]);
    let r = out.json();
    assert_eq!(r["ok"], json!(true), "{r}");
    // One after the other: the second started after the first ended.
    let tasks = r["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2);
    for repo in [&r1, &r2] {
        assert_restores_to_model(&vm, repo, "a");
        let listed = bitback(&[
            "list",
            "--repo",
            repo.to_str().unwrap(),
            "--vm",
            "a",
            "--json",
        ])
        .json();
        assert_eq!(
            listed[0]["volumes"][0]["guard"],
            json!("bitback"),
            "the backup into {} ran on QEMU's filter: {listed}",
            repo.display()
        );
    }
    assert!(
        !out.stderr.contains("QEMU's own filter"),
        "a run fell back to QEMU's filter:\n{}",
        out.stderr
    );
}

/// A job over six libvirt domains, three at once within one rate limit:
/// four running (two healthy, one whose agent stalls a freeze, one whose
/// repository fills up), one shut off, and one that does not exist.
/// Every good point is a consistent prefix of its guest's log; the
/// failures are named; the stalled freeze is reported as a warning.
#[test]
fn a_job_over_libvirt_domains_goes_on_past_a_full_repository_a_stalled_agent_and_a_missing_domain()
{
    use crate::harness::domain::{Agent, Domain};
    use crate::harness::guest::check_point_of;
    let dir = tempdir();
    let d = dir.path();
    let sub = |name: &str| {
        let p = d.join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    let healthy = Domain::create_with(&sub("healthy"), None, Agent::On);
    let second = Domain::create_with(&sub("second"), None, Agent::On);
    let stall = Domain::create_with(&sub("stall"), None, Agent::Stall);
    let filling = Domain::create_with(&sub("filling"), None, Agent::On);
    let off = Domain::define(&sub("off"), false);
    let repo = d.join("repo");
    let small = d.join("small-repo");
    let _tmpfs = Tmpfs::mount(&small, "256K");
    let (metrics, report) = (d.join("bitback.prom"), d.join("last.json"));
    let entry = |vm: &str, domain: &str, repo: &Path, extra: &str| {
        format!("\n[[vm]]\nname = \"{vm}\"\nlibvirt = \"{domain}\"\nrepo = {repo:?}\n{extra}")
    };
    let mut text = format!(
        "jobs = 3\nrate_limit = \"40M\"\nmetrics_file = {metrics:?}\nreport_file = {report:?}\n"
    );
    text.push_str(&entry("healthy", &healthy.name, &repo, "quiesce = true\n"));
    text.push_str(&entry("second", &second.name, &repo, ""));
    text.push_str(&entry(
        "stall",
        &stall.name,
        &repo,
        "quiesce = true\nbackup_args = [\"--freeze-timeout\", \"3\"]\n",
    ));
    text.push_str(&entry("filling", &filling.name, &small, ""));
    text.push_str(&entry("off", &off.name, &repo, ""));
    text.push_str(&entry("missing", "bitback-test-no-such-domain", &repo, ""));
    let job = d.join("job.toml");
    std::fs::write(&job, text).unwrap();

    let (code, stdout, stderr, samples) = run_sampled(&job, &["--json"], &[&repo, &small]);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    let r: Value = serde_json::from_str(&stdout).unwrap();
    let task = |vm: &str| {
        r["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["vm"] == vm)
            .unwrap_or_else(|| panic!("no task of {vm}: {r}"))
            .clone()
    };
    for vm in ["healthy", "second", "stall", "off"] {
        assert_eq!(task(vm)["ok"], json!(true), "{vm}: {}", task(vm));
    }
    let warned = task("stall")["warnings"].to_string();
    assert!(
        warned.contains("unfrozen"),
        "the stalled freeze is not reported: {warned}"
    );
    let mut failed: Vec<String> = r["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    failed.sort();
    assert_eq!(
        failed,
        [
            format!("filling → {}", small.display()),
            format!("missing → {}", repo.display())
        ]
    );
    let filling_error = task("filling")["error"].to_string().to_lowercase();
    assert!(filling_error.contains("no space left"), "{filling_error}");
    assert!(
        task("missing")["error"]
            .to_string()
            .contains("bitback-test-no-such-domain"),
        "{}",
        task("missing")
    );
    // Every good point restores to consistent logs on both disks.
    for vm in ["healthy", "second", "stall", "off"] {
        let id = task(vm)["backup"].as_str().unwrap().to_string();
        check_point_of(&repo, vm, &id, ["vda", "vdb"], &d.join(format!("out-{vm}")));
    }
    let peak = peak_rate(&samples, 3.0);
    assert!(
        peak <= 40.0 * MIB as f64 * 1.12,
        "the repositories grew at {:.1} MiB/s, past the limit",
        peak / MIB as f64
    );
    let m = prometheus_samples(&metrics);
    assert_eq!(sample_of(&m, "bitback_last_run_success", "healthy"), 1.0);
    assert_eq!(sample_of(&m, "bitback_last_run_success", "filling"), 0.0);
    // The guests went on writing through it all.
    healthy.wait_records(10);
    second.wait_records(10);
    filling.wait_records(10);
}
