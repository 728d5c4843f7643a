//! What real QEMU cannot be made to do: a fake QMP server that sends garbage,
//! oversized lines, unknown events, nonsense replies, or dies mid-reply.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bitback::qmp::{Endpoint, Error, MAX_LINE, Options, Qmp};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::harness::{bitback, tempdir};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": []}}"#;

struct Peer {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Peer {
    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("fake: writing");
    }

    async fn send_json(&mut self, value: Value) {
        self.send(format!("{value}\n").as_bytes()).await;
    }

    async fn command(&mut self) -> Value {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .await
            .expect("fake: reading");
        serde_json::from_str(&line).expect("bitback sends JSON")
    }

    async fn negotiate(&mut self) {
        self.send(format!("{GREETING}\n").as_bytes()).await;
        let cmd = self.command().await;
        assert_eq!(cmd["execute"], "qmp_capabilities");
        self.send_json(json!({"return": {}, "id": cmd["id"]})).await;
    }
}

/// Serves one connection on a socket in `dir` with `script`.
fn serve<F, Fut>(dir: &Path, script: F) -> PathBuf
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let path = dir.join("fake.sock");
    let listener = UnixListener::bind(&path).expect("fake: binding");
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("fake: accepting");
        let (r, w) = stream.into_split();
        script(Peer {
            reader: BufReader::new(r),
            writer: w,
        })
        .await;
    });
    path
}

async fn connect(path: &Path) -> Qmp {
    Qmp::connect(path.to_str().unwrap())
        .await
        .expect("connecting to the fake server")
}

fn disconnect_reason(result: Result<Value, Error>) -> String {
    match result {
        Err(Error::Disconnected { reason }) => reason.to_string(),
        other => panic!("expected Disconnected, got {other:?}"),
    }
}

#[tokio::test]
async fn garbage_line_is_a_protocol_error_for_every_caller() {
    let dir = tempdir();
    let path = serve(dir.path(), |mut peer| async move {
        peer.negotiate().await;
        peer.command().await;
        peer.send(b"this is not json\n").await;
        // Keep the socket open: the client must not wait for more.
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let qmp = connect(&path).await;
    let reason = disconnect_reason(qmp.execute_raw("query-version", Value::Null).await);
    assert!(reason.contains("protocol error"), "{reason}");
    assert!(reason.contains("not JSON"), "{reason}");
    assert!(reason.contains("this is not json"), "{reason}");
    let reason = disconnect_reason(qmp.execute_raw("query-status", Value::Null).await);
    assert!(reason.contains("not JSON"), "{reason}");
}

#[tokio::test]
async fn oversized_line_is_refused_before_it_is_buffered_whole() {
    let dir = tempdir();
    let path = serve(dir.path(), |mut peer| async move {
        peer.negotiate().await;
        let cmd = peer.command().await;
        let padding = "x".repeat(MAX_LINE + 1024);
        let line = format!("{{\"return\": \"{padding}\", \"id\": {}}}\n", cmd["id"]);
        // The client stops reading once over the cap; a failed write here
        // is expected.
        let _ = peer.writer.write_all(line.as_bytes()).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let qmp = connect(&path).await;
    let reason = disconnect_reason(qmp.execute_raw("query-version", Value::Null).await);
    assert!(reason.contains("longer than"), "{reason}");
}

#[tokio::test]
async fn a_line_just_under_the_cap_is_accepted() {
    let dir = tempdir();
    let path = serve(dir.path(), |mut peer| async move {
        peer.negotiate().await;
        let cmd = peer.command().await;
        let overhead = format!("{{\"return\": \"\", \"id\": {}}}", cmd["id"]).len();
        let padding = "y".repeat(MAX_LINE - overhead);
        let line = format!("{{\"return\": \"{padding}\", \"id\": {}}}\n", cmd["id"]);
        peer.send(line.as_bytes()).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let qmp = connect(&path).await;
    let reply = qmp.execute_raw("query-version", Value::Null).await.unwrap();
    assert!(reply.as_str().unwrap().len() > MAX_LINE - 100);
}

#[tokio::test]
async fn unknown_events_and_values_pass_through_as_raw_json() {
    let dir = tempdir();
    let path = serve(dir.path(), |mut peer| async move {
        peer.negotiate().await;
        let cmd = peer.command().await;
        let ts = json!({"seconds": 1, "microseconds": 2});
        peer.send_json(
            json!({"event": "BITBACK_FROM_THE_FUTURE", "data": {"x": [1, 2]}, "timestamp": ts}),
        )
        .await;
        peer.send_json(json!({"event": "JOB_STATUS_CHANGE", "data": {"id": "j1", "status": "hyperspace"}, "timestamp": ts}))
            .await;
        peer.send_json(json!({"event": "JOB_STATUS_CHANGE", "data": {"id": "j1", "status": "running"}, "timestamp": ts}))
            .await;
        peer.send_json(json!({"return": {"fine": true}, "id": cmd["id"]}))
            .await;
        let cmd = peer.command().await;
        peer.send_json(json!({"return": {}, "id": cmd["id"]})).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let qmp = connect(&path).await;
    let mut events = qmp.subscribe();
    let reply = qmp.execute_raw("anything", Value::Null).await.unwrap();
    assert_eq!(reply, json!({"fine": true}));

    let wait = Duration::from_secs(5);
    let unknown = events.next(wait).await.unwrap();
    assert_eq!(unknown.name, "BITBACK_FROM_THE_FUTURE");
    assert_eq!(unknown.data, json!({"x": [1, 2]}));
    assert!(unknown.typed().is_none());

    let odd = events.next_for_job("j1", wait).await.unwrap();
    assert_eq!(odd.data["status"], "hyperspace");
    assert!(
        odd.typed().is_none(),
        "an unknown enum value cannot be typed"
    );

    let known = events.next_for_job("j1", wait).await.unwrap();
    assert!(matches!(
        known.typed(),
        Some(qapi_qmp::Event::JOB_STATUS_CHANGE { .. })
    ));
    // The connection is still good.
    qmp.execute_raw("more", Value::Null).await.unwrap();
}

#[tokio::test]
async fn socket_dying_mid_reply_fails_the_call_at_once() {
    let dir = tempdir();
    let path = serve(dir.path(), |mut peer| async move {
        peer.negotiate().await;
        let cmd = peer.command().await;
        let partial = format!("{{\"id\": {}, \"return\": {{\"half", cmd["id"]);
        peer.send(partial.as_bytes()).await;
        // Dropping the peer closes the socket.
    });
    let qmp = connect(&path).await;
    let reason = disconnect_reason(
        qmp.execute_raw_timeout("query-version", Value::Null, Duration::from_secs(600))
            .await,
    );
    assert!(reason.contains("middle of a message"), "{reason}");
}

#[tokio::test]
async fn nonsense_messages_are_protocol_errors() {
    for nonsense in [json!([1, 2, 3]), json!({"neither": "reply nor event"})] {
        let dir = tempdir();
        let sent = nonsense.clone();
        let path = serve(dir.path(), move |mut peer| async move {
            peer.negotiate().await;
            peer.command().await;
            peer.send_json(sent).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let qmp = connect(&path).await;
        let reason = disconnect_reason(qmp.execute_raw("query-version", Value::Null).await);
        assert!(reason.contains("protocol error"), "{nonsense}: {reason}");
    }
}

#[tokio::test]
async fn replies_to_unknown_ids_are_ignored() {
    let dir = tempdir();
    let path = serve(dir.path(), |mut peer| async move {
        peer.negotiate().await;
        let cmd = peer.command().await;
        peer.send_json(json!({"return": "stray", "id": 987654}))
            .await;
        peer.send_json(json!({"error": {"class": "GenericError", "desc": "no id"}}))
            .await;
        peer.send_json(json!({"return": "mine", "id": cmd["id"]}))
            .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let qmp = connect(&path).await;
    let reply = qmp.execute_raw("x", Value::Null).await.unwrap();
    assert_eq!(reply, json!("mine"));
}

#[tokio::test]
async fn a_socket_that_is_not_qmp_is_named_so() {
    let dir = tempdir();
    let path = serve(dir.path(), |mut peer| async move {
        peer.send(b"SSH-2.0-OpenSSH_9.2\r\n").await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let err = Qmp::connect(path.to_str().unwrap()).await.err().unwrap();
    assert!(matches!(err, Error::NotQmp { .. }), "{err}");
    assert!(err.to_string().contains("SSH-2.0"), "{err}");
}

/// libvirt's QMP proxy, with several clients of one domain, can deliver
/// an event before its greeting (7 of 30 concurrent connects failed
/// before): the events are dropped and the session goes on.
#[tokio::test]
async fn events_before_the_greeting_are_dropped() {
    let dir = tempdir();
    let path = serve(dir.path(), |mut peer| async move {
        for status in ["running", "concluded"] {
            peer.send_json(json!({
                "event": "JOB_STATUS_CHANGE",
                "data": {"status": status, "id": "other-tool"},
                "timestamp": {"seconds": 1, "microseconds": 2}
            }))
            .await;
        }
        peer.negotiate().await;
        let cmd = peer.command().await;
        assert_eq!(cmd["execute"], "query-status");
        peer.send_json(json!({"return": {"status": "running", "running": true}, "id": cmd["id"]}))
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    let qmp = connect(&path).await;
    assert_eq!(qmp.greeting().version.major, 7);
    let status = qmp.execute_raw("query-status", Value::Null).await.unwrap();
    assert_eq!(status["status"], "running");
}

/// ... but a server that sends nothing but events is no QMP monitor.
#[tokio::test]
async fn endless_events_and_no_greeting_is_not_qmp() {
    let dir = tempdir();
    let path = serve(dir.path(), |mut peer| async move {
        for _ in 0..1100 {
            peer.send(
                b"{\"event\": \"RESUME\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 0}}\n",
            )
            .await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    let err = Qmp::connect(path.to_str().unwrap()).await.err().unwrap();
    assert!(matches!(err, Error::NotQmp { .. }), "{err}");
    assert!(err.to_string().contains("no greeting"), "{err}");
}

#[tokio::test]
async fn a_silent_socket_times_out_waiting_for_the_greeting() {
    let dir = tempdir();
    let path = serve(dir.path(), |peer| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(peer);
    });
    let options = Options {
        connect_timeout: Duration::from_millis(300),
        ..Options::default()
    };
    let err = Qmp::connect_with(Endpoint::Unix(path), options)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::GreetingTimeout { .. }), "{err}");
}

#[test]
fn inspect_of_a_socket_that_is_not_qmp_exits_2_with_one_line() {
    let dir = tempdir();
    let path = dir.path().join("not-qmp.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        use std::io::Write;
        let (mut stream, _) = listener.accept().unwrap();
        let _ = stream.write_all(b"hello, I am a serial console\n");
        std::thread::sleep(Duration::from_millis(500));
    });
    let run = bitback(&["inspect", "--qmp", path.to_str().unwrap()]);
    server.join().unwrap();
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains("is not a QMP monitor"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty());
}

/// libvirt's virt-qemu-qmp-proxy hands event data on as a JSON string; a
/// client that ignored those events waited for a job forever.
#[tokio::test]
async fn event_data_sent_as_a_json_string_is_decoded() {
    let dir = tempdir();
    let path = serve(dir.path(), |mut peer| async move {
        peer.negotiate().await;
        let cmd = peer.command().await;
        let data = json!({"device": "j7", "type": "backup", "len": 5, "offset": 5, "speed": 0});
        peer.send_json(
            json!({"event": "BLOCK_JOB_COMPLETED", "data": data.to_string(),
            "timestamp": {"seconds": 1, "microseconds": 2}}),
        )
        .await;
        peer.send_json(json!({"event": "ODD", "data": "not json"}))
            .await;
        peer.send_json(json!({"return": {}, "id": cmd["id"]})).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let qmp = connect(&path).await;
    let mut events = qmp.subscribe();
    qmp.execute_raw("anything", Value::Null).await.unwrap();
    let done = events
        .next_for_job("j7", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(done.data["len"], 5);
    assert!(done.typed().is_some(), "decoded data types as usual");
    let odd = events.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(odd.data, json!("not json"), "a plain string stays a string");
}
