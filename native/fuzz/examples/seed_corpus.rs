//! Writes the seed corpus of the `decode_*` fuzz targets: valid encoded frames of every type
//! each link carries, a stream of all of them, and the classic bad inputs (zero length, too
//! large, truncated field, trailing bytes, bad UTF-8, unknown type, partial frame).
//!
//! ```text
//! cargo run --manifest-path native/fuzz/Cargo.toml --example seed_corpus -- native/fuzz/corpus
//! ```
//!
//! Each file is a fuzz input: a control byte (see `iris_native_fuzz`), then the stream.

use std::fs;
use std::path::Path;

use iris_native::frame::{encode, Frame, LinkKind, ERROR, LOGIN, SEND};
use iris_native::repl::{Record, REPL_APPEND, REPL_HELLO};
use iris_native_fuzz::MAX_FRAME;

fn client_frames() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "login",
            Frame::Login {
                version: 1,
                user: "alice".into(),
                token: "tok.en".into(),
                device: "phone".into(),
            },
        ),
        (
            "login_ok",
            Frame::LoginOk {
                version: 1,
                flags: 1,
                node: "node-a".into(),
                max_frame: MAX_FRAME,
            },
        ),
        (
            "send",
            Frame::Send {
                msg_id: "m1".into(),
                to: "bob".into(),
                body: b"hello \xff\x00 body".to_vec(),
            },
        ),
        (
            "ack",
            Frame::Ack {
                msg_id: "m1".into(),
                flags: 5,
            },
        ),
        (
            "deliver",
            Frame::Deliver {
                tag: 1,
                ts_ms: 1_700_000_000_000,
                sender: "alice".into(),
                msg_id: "m1".into(),
                body: b"hello".to_vec(),
            },
        ),
        ("deliver_ack", Frame::DeliverAck { tag: 1 }),
        ("ping", Frame::Ping { nonce: 42 }),
        ("pong", Frame::Pong { nonce: 42 }),
        (
            "error",
            Frame::Error {
                code: 9,
                msg_id: "m1".into(),
                reason: "mailbox full \u{e9}".into(),
            },
        ),
    ]
}

fn worker_frames() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "route_send",
            Frame::RouteSend {
                ts_ms: 1_700_000_000_000,
                flags: 1,
                sender: "alice".into(),
                msg_id: "m1".into(),
                to: "bob".into(),
                body: b"routed".to_vec(),
            },
        ),
        (
            "route_ack",
            Frame::RouteAck {
                user: "alice".into(),
                msg_id: "m1".into(),
                flags: 1,
            },
        ),
        (
            "route_error",
            Frame::RouteError {
                user: "alice".into(),
                code: 12,
                msg_id: "m1".into(),
                reason: "bad recipient".into(),
            },
        ),
        (
            "link_hello",
            Frame::LinkHello {
                worker: 1,
                pid: 4242,
                epoch: 7,
            },
        ),
    ]
}

fn repl_frames() -> Vec<(&'static str, Frame)> {
    vec![
        (
            "repl_hello",
            Frame::ReplHello {
                version: 1,
                node: "node-b".into(),
                epoch: 3,
                workers: 2,
                flags: 1,
                applied: vec![(0, 10), (1, 20)],
            },
        ),
        (
            "repl_append",
            Frame::ReplAppend {
                stream: 1,
                first_lsn: 21,
                records: vec![
                    Record::Put {
                        user: "bob".into(),
                        seq: 5,
                        ts_ms: 1_700_000_000_000,
                        sender: "alice".into(),
                        msg_id: "m1".into(),
                        body: b"hello".to_vec(),
                    },
                    Record::Del {
                        user: "bob".into(),
                        seq: 4,
                    },
                    Record::Dedup {
                        key: *b"0123456789abcdef",
                        ts_ms: 1_700_000_000_000,
                        sender: 0x0123_4567_89ab_cdef,
                    },
                ],
            },
        ),
        (
            "repl_append_empty",
            Frame::ReplAppend {
                stream: 0,
                first_lsn: 1,
                records: vec![],
            },
        ),
        ("repl_ack", Frame::ReplAck { stream: 1, lsn: 23 }),
        (
            "repl_heartbeat",
            Frame::ReplHeartbeat {
                ts_ms: 1_700_000_000_000,
                last: vec![(0, 10), (1, 23)],
            },
        ),
    ]
}

fn raw(ftype: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = (1 + payload.len() as u32).to_be_bytes().to_vec();
    out.push(ftype);
    out.extend_from_slice(payload);
    out
}

/// Bad inputs every link rejects the same way.
fn bad_inputs(valid_type: u8) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("zero_length", vec![0, 0, 0, 0]),
        ("too_large", vec![0x80, 0, 0, 0, SEND]),
        ("unknown_type", raw(0x7f, b"whatever")),
        ("truncated_field", raw(valid_type, b"\xc8abc")),
        ("trailing_bytes", raw(valid_type, &[0u8; 40])),
        ("bad_utf8", raw(valid_type, b"\x01\x02\xff\xfe\x00\x00")),
        ("partial_frame", vec![0, 0, 1, 0, valid_type, 1, 2, 3]),
    ]
}

fn write(dir: &Path, name: &str, ctl: u8, stream: &[u8]) {
    let mut data = vec![ctl];
    data.extend_from_slice(stream);
    fs::write(dir.join(format!("seed-{name}")), data).expect("write seed");
}

fn write_target(root: &Path, target: &str, link: LinkKind, frames: &[(&str, Frame)]) {
    let dir = root.join(target);
    fs::create_dir_all(&dir).expect("create corpus dir");
    let mut all = Vec::new();
    for (name, frame) in frames {
        assert!(link.accepts(frame.as_ref().frame_type()));
        let bytes = encode(&frame.as_ref(), MAX_FRAME).expect("encode seed");
        write(&dir, name, 0, &bytes);
        all.extend_from_slice(&bytes);
    }
    write(&dir, "all", 0, &all);
    write(&dir, "all_bytewise", 1, &all);
    write(&dir, "all_split7", 7, &all);
    write(&dir, "all_small_max", 0x80 | 5, &all);
    let valid_type = match link {
        LinkKind::Repl => REPL_HELLO,
        LinkKind::Client | LinkKind::Worker => LOGIN,
    };
    for (name, bytes) in bad_inputs(valid_type) {
        write(&dir, name, 0, &bytes);
    }
    // Frames of the other links' types: unknown here.
    let foreign = match link {
        LinkKind::Repl => raw(ERROR, b"\x00\x01\x00\x00\x00"),
        LinkKind::Client | LinkKind::Worker => raw(REPL_APPEND, &[0u8; 14]),
    };
    write(&dir, "foreign_type", 0, &foreign);
    if link == LinkKind::Repl {
        // A record of unknown kind, and a count that lies.
        let mut bad_kind = vec![0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1];
        bad_kind.push(9);
        write(&dir, "bad_record_kind", 0, &raw(REPL_APPEND, &bad_kind));
        let lying = [
            0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 2, 0, 0,
        ];
        write(&dir, "lying_count", 0, &raw(REPL_APPEND, &lying));
    }
}

fn main() {
    let root = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "native/fuzz/corpus".to_owned());
    let root = Path::new(&root);
    let client = client_frames();
    let mut worker = client_frames();
    worker.extend(worker_frames());
    write_target(root, "decode_client", LinkKind::Client, &client);
    write_target(root, "decode_worker", LinkKind::Worker, &worker);
    write_target(root, "decode_repl", LinkKind::Repl, &repl_frames());
    println!("seed corpus written under {}", root.display());
}
