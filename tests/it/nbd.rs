//! bitback's NBD server with a streaming qcow2 writer behind it: QEMU's
//! own NBD client (qemu-img, qemu-io) writes through it and the finished
//! image equals its source (`qemu-img compare`, `qemu-img check`); a
//! hostile client (out of range, huge, unknown commands, bad magic, a cut
//! mid-write) gets error replies or an ended connection, never a crash.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use bitback::nbd::{self, Served};
use bitback::qcow2::{CreateOptions, Stream};

use crate::harness::{create_qcow2, require, run, same_content, tempdir};

const MIB: u64 = 1 << 20;

/// Serves a new streaming image of `size` at `path` as export `disk` on a
/// unix socket in `dir`, for one connection, while `client` runs with the
/// socket's path; returns how the connection ended and the finished image
/// (finished even after a bad connection, as bitback's caller would not
/// keep it but must close it).
fn serve_one(
    dir: &Path,
    path: &Path,
    size: u64,
    client: impl FnOnce(&Path) + Send + 'static,
) -> Result<Served, nbd::Error> {
    let socket = dir.join("nbd.sock");
    let _ = std::fs::remove_file(&socket);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = {
        let _guard = runtime.enter();
        tokio::net::UnixListener::bind(&socket).unwrap()
    };
    let image = Stream::create(
        path,
        &CreateOptions {
            size,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let client_socket = socket.clone();
    let client = std::thread::spawn(move || client(&client_socket));
    let (served, image) = runtime.block_on(async {
        let (conn, _) = listener.accept().await.unwrap();
        nbd::serve(conn, "disk", image).await
    });
    client.join().expect("the client panicked");
    image.finish().unwrap();
    served
}

fn url(socket: &Path) -> String {
    format!("nbd+unix:///disk?socket={}", socket.display())
}

#[test]
fn qemu_img_convert_through_the_server_gives_an_equal_clean_image() {
    require("qemu-img");
    let dir = tempdir();
    let d = dir.path().to_path_buf();
    let source = d.join("source.qcow2");
    create_qcow2(&source, 64 * MIB, &[]);
    for (pattern, at, len) in [(1, 0, MIB), (2, 5 * MIB, 3 * MIB), (3, 63 * MIB, MIB)] {
        run(Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                &format!("write -P {pattern} {at} {len}"),
            ])
            .arg(&source));
    }
    let out = d.join("out.qcow2");
    let src = source.clone();
    let served = serve_one(&d, &out, 64 * MIB, move |socket| {
        run(Command::new("qemu-img")
            .args(["convert", "-n", "-f", "qcow2", "-O", "raw"])
            .arg(&src)
            .arg(url(socket)));
    })
    .unwrap();
    assert!(served.bytes_written >= 5 * MIB, "{served:?}");
    assert_eq!(served.failed, 0);
    run(Command::new("qemu-img").args(["check", "-q"]).arg(&out));
    assert!(same_content(&source, "qcow2", &out, "qcow2"));
}

#[test]
fn qemu_io_writes_zeroes_reads_and_flushes_through_the_server() {
    require("qemu-io");
    let dir = tempdir();
    let d = dir.path().to_path_buf();
    let out = d.join("out.qcow2");
    let served = serve_one(&d, &out, 4 * MIB, |socket| {
        let o = Command::new("qemu-io")
            .args(["-f", "raw"])
            .args(["-c", "write -P 7 0 192k"])
            .args(["-c", "write -z 64k 64k"])
            .args(["-c", "write -P 9 1M 4k"])
            .args(["-c", "read -P 7 0 64k"])
            .args(["-c", "read -P 0 64k 64k"])
            .args(["-c", "read -P 9 1M 4k"])
            .args(["-c", "flush"])
            .arg(url(socket))
            .output()
            .unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{text}");
        assert!(!text.contains("failed"), "{text}");
    })
    .unwrap();
    assert_eq!(served.failed, 0);
    let model = d.join("model.raw");
    let mut bytes = vec![0u8; 4 * MIB as usize];
    bytes[..192 << 10].fill(7);
    bytes[64 << 10..128 << 10].fill(0);
    bytes[MIB as usize..MIB as usize + 4096].fill(9);
    std::fs::write(&model, &bytes).unwrap();
    run(Command::new("qemu-img").args(["check", "-q"]).arg(&out));
    assert!(same_content(&model, "raw", &out, "qcow2"));
}

/// A raw client: the handshake up to transmission on export `disk`.
fn connect(socket: &Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut go = Vec::new();
    go.extend_from_slice(b"IHAVEOPT");
    go.extend_from_slice(&7u32.to_be_bytes());
    let data = [&4u32.to_be_bytes()[..], b"disk", &0u16.to_be_bytes()].concat();
    go.extend_from_slice(&(data.len() as u32).to_be_bytes());
    go.extend_from_slice(&data);
    s.write_all(&go).unwrap();
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).unwrap();
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        if kind == 1 {
            return s;
        }
        assert_eq!(kind, 3, "an info reply or the ack");
    }
}

fn request(s: &mut UnixStream, kind: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
    let mut r = Vec::new();
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r.extend_from_slice(payload);
    s.write_all(&r).unwrap();
}

/// The error of the simple reply to `handle`.
fn reply_error(s: &mut UnixStream, handle: u64) -> u32 {
    let mut head = [0u8; 16];
    s.read_exact(&mut head).unwrap();
    assert_eq!(
        u32::from_be_bytes(head[0..4].try_into().unwrap()),
        0x6744_6698
    );
    assert_eq!(u64::from_be_bytes(head[8..16].try_into().unwrap()), handle);
    u32::from_be_bytes(head[4..8].try_into().unwrap())
}

#[test]
fn a_hostile_client_gets_errors_or_an_ended_connection_never_a_crash() {
    let dir = tempdir();
    let d: PathBuf = dir.path().to_path_buf();

    // Out of range, an unknown command, then a good write: answered each.
    let served = serve_one(&d, &d.join("a.qcow2"), MIB, |socket| {
        let mut s = connect(socket);
        request(&mut s, 1, 1, MIB - 512, 1024, &[1u8; 1024]);
        assert_eq!(reply_error(&mut s, 1), 28, "ENOSPC past the end");
        request(&mut s, 0, 2, u64::MAX - 10, 512, &[]);
        assert_eq!(reply_error(&mut s, 2), 22, "EINVAL for a read past the end");
        request(&mut s, 42, 3, 0, 0, &[]);
        assert_eq!(reply_error(&mut s, 3), 22, "EINVAL for an unknown command");
        request(&mut s, 1, 4, 0, 65536, &[5u8; 65536]);
        assert_eq!(reply_error(&mut s, 4), 0);
        request(&mut s, 2, 5, 0, 0, &[]);
    })
    .unwrap();
    assert_eq!((served.failed, served.writes), (3, 1));
    run(Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(d.join("a.qcow2")));

    // A write larger than any client sends: the connection ends.
    let huge = serve_one(&d, &d.join("b.qcow2"), MIB, |socket| {
        let mut s = connect(socket);
        request(&mut s, 1, 1, 0, u32::MAX, &[]);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(
            rest.is_empty(),
            "no reply to a request that ends the connection"
        );
    });
    assert!(matches!(huge, Err(nbd::Error::Protocol(_))), "{huge:?}");

    // A bad magic: the connection ends.
    let magic = serve_one(&d, &d.join("c.qcow2"), MIB, |socket| {
        let mut s = connect(socket);
        s.write_all(&[0xffu8; 28]).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    assert!(matches!(magic, Err(nbd::Error::Protocol(_))), "{magic:?}");

    // Cut in the middle of a write's payload: an I/O error, the image
    // still closes clean.
    let cut = serve_one(&d, &d.join("e.qcow2"), MIB, |socket| {
        let mut s = connect(socket);
        request(&mut s, 1, 1, 0, 65536, &[6u8; 1000]);
    });
    assert!(matches!(cut, Err(nbd::Error::Io(_))), "{cut:?}");
    run(Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(d.join("e.qcow2")));

    // A handshake that is not NBD: refused.
    let garbage = serve_one(&d, &d.join("f.qcow2"), MIB, |socket| {
        let mut s = UnixStream::connect(socket).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    });
    assert!(garbage.is_err(), "{garbage:?}");
}
