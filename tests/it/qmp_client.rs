//! The async QMP client against real QEMU.

use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::time::Duration;

use bitback::qmp::{Endpoint, Error, Options, Qmp};
use serde_json::{Value, json};

use crate::harness::{Disk, Kind, Qemu, create_qcow2, free_tcp_port, images_equal, tempdir};

const MIB: u64 = 1 << 20;

fn one_disk(dir: &std::path::Path, size: u64) -> Vec<Disk> {
    let image = dir.join("disk.qcow2");
    create_qcow2(&image, size, &[]);
    vec![Disk::new("disk0", "drive0", &image)]
}

async fn connect(qemu: &Qemu) -> Qmp {
    Qmp::connect(qemu.qmp.to_str().unwrap())
        .await
        .expect("connecting to QEMU")
}

async fn connect_with_timeout(qemu: &Qemu, command_timeout: Duration) -> Qmp {
    let options = Options {
        command_timeout,
        ..Options::default()
    };
    Qmp::connect_with(Endpoint::Unix(qemu.qmp.clone()), options)
        .await
        .expect("connecting to QEMU")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commands_get_their_own_replies() {
    let dir = tempdir();
    let qemu = Qemu::start(
        Kind::MachineNone,
        dir.path(),
        &one_disk(dir.path(), 4 * MIB),
    );
    let qmp = connect(&qemu).await;
    assert_eq!(qmp.greeting().version.major, crate::harness::qemu_major());

    // Each HMP `print` answers with its own number, so a reply routed to
    // the wrong caller is seen.
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let printer = qmp.clone();
        tasks.push(tokio::spawn(async move {
            let value = 1000 + i;
            let reply = printer
                .execute_raw(
                    "human-monitor-command",
                    json!({ "command-line": format!("print {value}") }),
                )
                .await
                .expect("HMP print");
            (value, reply)
        }));
        // Typed and failing commands interleaved with them.
        let qmp = qmp.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let version = qmp.execute(qapi_qmp::query_version {}).await.unwrap();
                (u64::MAX, json!(version.qemu.major))
            } else {
                let err = qmp
                    .execute_raw(
                        "block-dirty-bitmap-remove",
                        json!({"node": "drive0", "name": format!("missing{i}")}),
                    )
                    .await
                    .unwrap_err();
                (u64::MAX - 1 - i, json!(err.to_string()))
            }
        }));
    }
    for task in tasks {
        let (tag, reply) = task.await.unwrap();
        match tag {
            u64::MAX => assert_eq!(reply, json!(crate::harness::qemu_major())),
            t if t > u64::MAX - 200 => {
                let i = u64::MAX - 1 - t;
                let text = reply.as_str().unwrap();
                assert!(text.contains(&format!("'missing{i}'")), "{text}");
            }
            value => {
                let text = reply.as_str().unwrap();
                assert_eq!(text, format!("{value:#x}\r\n"), "reply for print {value}");
            }
        }
    }
}

#[tokio::test]
async fn qemu_errors_keep_their_class() {
    let dir = tempdir();
    let qemu = Qemu::start(Kind::MachineNone, dir.path(), &one_disk(dir.path(), MIB));
    let qmp = connect(&qemu).await;

    let err = qmp
        .execute_raw("no-such-command", Value::Null)
        .await
        .unwrap_err();
    assert_eq!(err.qemu_class(), Some("CommandNotFound"), "{err}");
    assert!(err.is_command_not_found());

    let err = qmp
        .execute(qapi_qmp::block_dirty_bitmap_add(
            qapi_qmp::BlockDirtyBitmapAdd {
                node: "nowhere".into(),
                name: "b".into(),
                granularity: None,
                persistent: None,
                disabled: None,
            },
        ))
        .await
        .unwrap_err();
    match &err {
        Error::Qemu {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "block-dirty-bitmap-add");
            assert_eq!(class, "GenericError");
            assert!(desc.contains("nowhere"), "{desc}");
        }
        other => panic!("expected a QEMU error, got {other:?}"),
    }
    // The connection survives errors.
    qmp.execute(qapi_qmp::query_version {}).await.unwrap();

    let err = qmp
        .execute_raw("query-version", json!([1, 2]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ArgumentsNotObject { .. }), "{err}");
}

#[tokio::test]
async fn job_events_reach_a_subscriber_registered_before_the_job() {
    let dir = tempdir();
    let disks = one_disk(dir.path(), 8 * MIB);
    let target = dir.path().join("target.qcow2");
    create_qcow2(&target, 8 * MIB, &[]);
    let qemu = Qemu::start(Kind::MachineNone, dir.path(), &disks);
    qemu.qemu_io("drive0", "write -P 0x5a 1M 3M");
    let qmp = connect(&qemu).await;
    qmp.execute_raw(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "target0",
               "file": {"driver": "file", "filename": target}}),
    )
    .await
    .unwrap();

    let mut events = qmp.subscribe();
    let mut unrelated = qmp.subscribe();
    qmp.execute_raw(
        "blockdev-backup",
        json!({"job-id": "job0", "device": "drive0", "target": "target0", "sync": "full"}),
    )
    .await
    .unwrap();

    let mut statuses = Vec::new();
    let completed = loop {
        let event = events
            .next_for_job("job0", Duration::from_secs(30))
            .await
            .expect("job event");
        match event.name.as_str() {
            "JOB_STATUS_CHANGE" => {
                statuses.push(event.data["status"].as_str().unwrap().to_string())
            }
            "BLOCK_JOB_COMPLETED" => break event,
            "BLOCK_JOB_CANCELLED" | "BLOCK_JOB_ERROR" => panic!("job failed: {event:?}"),
            _ => {}
        }
    };
    assert!(completed.data.get("error").is_none(), "{completed:?}");
    assert_eq!(completed.data["len"], 8 * MIB);
    assert_eq!(completed.data["offset"], 8 * MIB);
    assert!(completed.timestamp.is_some());
    match completed.typed() {
        Some(qapi_qmp::Event::BLOCK_JOB_COMPLETED { data, .. }) => {
            assert_eq!(data.device, "job0");
            assert_eq!(data.len, 8 * MIB as i64);
        }
        other => panic!("typed conversion gave {other:?}"),
    }
    assert_eq!(
        statuses.first().map(String::as_str),
        Some("created"),
        "{statuses:?}"
    );
    assert!(statuses.iter().any(|s| s == "running"), "{statuses:?}");
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("pending"),
        "{statuses:?}"
    );
    let after = events
        .next_for_job("job0", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(after.name, "JOB_STATUS_CHANGE");
    assert_eq!(after.data["status"], "concluded");

    // Every subscriber sees every event.
    let first = unrelated.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.name, "JOB_STATUS_CHANGE");
    assert_eq!(first.job_id(), Some("job0"));

    // No event for a job that does not exist: the wait ends on time.
    let err = events
        .next_for_job("nonexistent", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::EventTimeout { .. }), "{err}");

    qmp.execute_raw("blockdev-del", json!({"node-name": "target0"}))
        .await
        .unwrap();
    qemu.quit();
    assert!(images_equal(&disks[0].image, &target));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_mid_command_fails_every_pending_call() {
    let dir = tempdir();
    let mut qemu = Qemu::start(Kind::MachineNone, dir.path(), &one_disk(dir.path(), MIB));
    // A timeout far longer than the test may take: the calls must end
    // because the socket closed, not because they timed out.
    let qmp = connect_with_timeout(&qemu, Duration::from_secs(600)).await;
    let mut events = qmp.subscribe();
    qemu.signal("STOP");
    // Stopped for sure before the calls go out: state T in /proc.
    let stat = format!("/proc/{}/stat", qemu.pid());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&stat)
        .unwrap_or_default()
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('T'))
    {
        assert!(std::time::Instant::now() < deadline, "QEMU did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }

    let mut calls = Vec::new();
    for _ in 0..5 {
        let qmp = qmp.clone();
        calls.push(tokio::spawn(async move {
            qmp.execute_raw("query-named-block-nodes", Value::Null)
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        calls.iter().all(|c| !c.is_finished()),
        "a stopped QEMU cannot answer"
    );
    qemu.kill();

    for call in calls {
        let result = tokio::time::timeout(Duration::from_secs(20), call)
            .await
            .expect("pending call hung after QEMU died")
            .unwrap();
        match result {
            Err(Error::Disconnected { reason }) => {
                assert!(reason.contains("closed"), "{reason}")
            }
            other => panic!("expected Disconnected, got {other:?}"),
        }
    }
    let later = qmp.execute_raw("query-version", Value::Null).await;
    assert!(
        matches!(later, Err(Error::Disconnected { .. })),
        "{later:?}"
    );
    let event = events.next(Duration::from_secs(20)).await;
    assert!(
        matches!(event, Err(Error::Disconnected { .. })),
        "{event:?}"
    );
    let late = qmp.subscribe().next(Duration::from_secs(20)).await;
    assert!(matches!(late, Err(Error::Disconnected { .. })), "{late:?}");
}

#[tokio::test]
async fn a_stalled_qemu_times_out_and_the_connection_recovers() {
    let dir = tempdir();
    let qemu = Qemu::start(Kind::MachineNone, dir.path(), &one_disk(dir.path(), MIB));
    let qmp = connect_with_timeout(&qemu, Duration::from_millis(400)).await;
    qemu.signal("STOP");
    let err = qmp
        .execute_raw("query-version", Value::Null)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("query-version"), "{err}");
    qemu.signal("CONT");
    // The late reply to the timed-out command is dropped; the next command
    // gets its own reply.
    let reply = qmp
        .execute_raw_timeout("query-status", Value::Null, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(reply.get("status").is_some(), "{reply}");
}

#[tokio::test]
async fn a_passed_fd_is_a_backup_target() {
    let dir = tempdir();
    let disks = one_disk(dir.path(), 8 * MIB);
    let target = dir.path().join("passed.qcow2");
    create_qcow2(&target, 8 * MIB, &[]);
    let qemu = Qemu::start(Kind::MachineNone, dir.path(), &disks);
    qemu.qemu_io("drive0", "write -P 0x33 0 2M");
    qemu.qemu_io("drive0", "write -P 0x44 6M 1M");
    let qmp = connect(&qemu).await;

    // bitback opens the file; QEMU never sees its name.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&target)
        .unwrap();
    let added = qmp
        .add_fd(file.as_fd(), None, Some("target of test"))
        .await
        .expect("add-fd");
    drop(file);
    let fdsets = qmp.execute_raw("query-fdsets", Value::Null).await.unwrap();
    let set = fdsets
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["fdset-id"] == added.fdset_id)
        .unwrap_or_else(|| panic!("fd set {} not listed: {fdsets}", added.fdset_id));
    assert_eq!(set["fds"][0]["fd"], added.fd);
    assert_eq!(set["fds"][0]["opaque"], "target of test");

    qmp.execute_raw(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "target0",
               "file": {"driver": "file", "filename": format!("/dev/fdset/{}", added.fdset_id)}}),
    )
    .await
    .expect("QEMU opens the passed fd");
    let mut events = qmp.subscribe();
    qmp.execute_raw(
        "blockdev-backup",
        json!({"job-id": "fdjob", "device": "drive0", "target": "target0", "sync": "full"}),
    )
    .await
    .unwrap();
    loop {
        let event = events
            .next_for_job("fdjob", Duration::from_secs(30))
            .await
            .unwrap();
        if event.name == "BLOCK_JOB_COMPLETED" {
            assert!(event.data.get("error").is_none(), "{event:?}");
            break;
        }
    }
    qmp.execute_raw("blockdev-del", json!({"node-name": "target0"}))
        .await
        .unwrap();
    qemu.quit();
    assert!(images_equal(&disks[0].image, &target));
}

#[tokio::test]
async fn getfd_names_a_passed_fd() {
    let dir = tempdir();
    let qemu = Qemu::start(Kind::MachineNone, dir.path(), &[]);
    let qmp = connect(&qemu).await;
    let file = std::fs::File::create(dir.path().join("some-file")).unwrap();
    qmp.getfd("bitback-fd", file.as_fd()).await.expect("getfd");
    // closefd succeeds only for a name QEMU holds.
    qmp.execute_raw("closefd", json!({"fdname": "bitback-fd"}))
        .await
        .expect("QEMU holds the named fd");
    let again = qmp
        .execute_raw("closefd", json!({"fdname": "bitback-fd"}))
        .await
        .unwrap_err();
    assert_eq!(again.qemu_class(), Some("GenericError"), "{again}");
}

#[tokio::test]
async fn fds_cannot_be_passed_over_tcp() {
    let dir = tempdir();
    let port = free_tcp_port();
    let qemu = Qemu::start_with(
        Kind::MachineNone,
        dir.path(),
        &[],
        &[
            "-qmp".into(),
            format!("tcp:127.0.0.1:{port},server=on,wait=off"),
        ],
    );
    let qmp = Qmp::connect(&format!("tcp:127.0.0.1:{port}"))
        .await
        .expect("connecting over TCP");
    let file = std::fs::File::create(dir.path().join("f")).unwrap();
    let err = qmp.add_fd(file.as_fd(), None, None).await.unwrap_err();
    assert!(matches!(err, Error::FdPassingUnsupported { .. }), "{err}");
    qmp.execute(qapi_qmp::query_version {}).await.unwrap();
    drop(qemu);
}

/// The commands bitback sends to take things apart, typed by QEMU's schema,
/// are accepted by a real QEMU: a rate-limited backup job is cancelled (it
/// ends as cancelled within seconds, not by copying on), dismissed, and its
/// target node, an fd set and a secret go. (A raw `job-cancel` once
/// carried a `force` that QEMU refused every time.)
#[tokio::test]
async fn typed_teardown_commands_cancel_a_job_and_take_its_parts_away() {
    use bitback::qemu::commands;
    let dir = tempdir();
    let disks = one_disk(dir.path(), 64 * MIB);
    let qemu = Qemu::start(Kind::MachineNone, dir.path(), &disks);
    qemu.qemu_io("drive0", "write -P 0x5a 0 64M");
    let qmp = connect(&qemu).await;
    qmp.execute_raw(
        "blockdev-add",
        json!({"driver": "null-co", "node-name": "target0", "size": 64 * MIB}),
    )
    .await
    .unwrap();
    let mut events = qmp.subscribe();
    // 1 MiB/s: the copy would take a minute.
    qmp.execute_raw(
        "blockdev-backup",
        json!({"job-id": "job0", "device": "drive0", "target": "target0",
               "sync": "full", "speed": MIB, "auto-dismiss": false}),
    )
    .await
    .unwrap();
    commands::cancel_job(&qmp, "job0")
        .await
        .expect("QEMU takes job-cancel");
    let ended = loop {
        let event = events
            .next_for_job("job0", Duration::from_secs(10))
            .await
            .expect("the cancelled job's events");
        if event.name.starts_with("BLOCK_JOB_") {
            break event;
        }
    };
    assert_eq!(ended.name, "BLOCK_JOB_CANCELLED", "{ended:?}");
    commands::dismiss_job(&qmp, "job0")
        .await
        .expect("QEMU takes job-dismiss");
    commands::delete_node(&qmp, "target0")
        .await
        .expect("QEMU takes blockdev-del");
    let nodes = qmp
        .execute_raw("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    assert!(
        !nodes.to_string().contains("target0"),
        "the target node is still there: {nodes}"
    );
    // A refused command keeps QEMU's answer.
    let gone = commands::dismiss_job(&qmp, "job0").await.unwrap_err();
    assert!(matches!(gone, Error::Qemu { .. }), "{gone}");

    let file = OpenOptions::new().read(true).open(&disks[0].image).unwrap();
    let set = qmp.add_fd(file.as_fd(), None, None).await.unwrap();
    commands::remove_fdset(&qmp, set.fdset_id)
        .await
        .expect("QEMU takes remove-fd");
    let sets = qmp.execute_raw("query-fdsets", Value::Null).await.unwrap();
    assert_eq!(sets, json!([]), "{sets}");
    qmp.execute_raw(
        "object-add",
        json!({"qom-type": "secret", "id": "k0", "data": "c2VjcmV0", "format": "base64"}),
    )
    .await
    .unwrap();
    commands::delete_object(&qmp, "k0")
        .await
        .expect("QEMU takes object-del");
    let again = commands::delete_object(&qmp, "k0").await.unwrap_err();
    assert!(matches!(again, Error::Qemu { .. }), "{again}");
    commands::quit(&qmp).await.expect("QEMU takes quit");
}
