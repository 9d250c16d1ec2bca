//! Property tests of the codec through the crate's public API.

use iris_native::batch::encode_batch;
use iris_native::frame::{
    encode, is_internal_type, DecodeError, Decoder, Frame, LinkKind, E_FRAME_TOO_LARGE,
    E_UNKNOWN_TYPE, HEADER_LEN,
};
use iris_native::repl::{is_repl_type, Record};
use proptest::collection::vec;
use proptest::prelude::*;

/// Strings that fit a str8 field: at most 255 bytes of UTF-8.
fn str8() -> impl Strategy<Value = String> {
    ".{0,80}".prop_filter("fits str8", |s| s.len() <= 255)
}

fn str16() -> impl Strategy<Value = String> {
    ".{0,300}"
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..600)
}

/// Client and internal frames alike (internal ones need an internal decoder).
fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![client_frame(), internal_frame()]
}

/// Worker-link frames: ROUTE_SEND, ROUTE_ACK, ROUTE_ERROR, LINK_HELLO.
fn internal_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u64>(), any::<u8>(), str8(), str8(), str8(), body()).prop_map(
            |(ts_ms, flags, sender, msg_id, to, body)| Frame::RouteSend {
                ts_ms,
                flags,
                sender,
                msg_id,
                to,
                body
            }
        ),
        (str8(), str8(), any::<u8>()).prop_map(|(user, msg_id, flags)| Frame::RouteAck {
            user,
            msg_id,
            flags
        }),
        (str8(), any::<u16>(), str8(), str16()).prop_map(|(user, code, msg_id, reason)| {
            Frame::RouteError {
                user,
                code,
                msg_id,
                reason,
            }
        }),
        (any::<u16>(), any::<u32>(), any::<u64>())
            .prop_map(|(worker, pid, epoch)| { Frame::LinkHello { worker, pid, epoch } }),
    ]
}

fn record() -> impl Strategy<Value = Record> {
    prop_oneof![
        (str8(), any::<u64>(), any::<u64>(), str8(), str8(), body()).prop_map(
            |(user, seq, ts_ms, sender, msg_id, body)| Record::Put {
                user,
                seq,
                ts_ms,
                sender,
                msg_id,
                body
            }
        ),
        (str8(), any::<u64>()).prop_map(|(user, seq)| Record::Del { user, seq }),
        (any::<[u8; 16]>(), any::<u64>(), any::<u64>())
            .prop_map(|(key, ts_ms, sender)| Record::Dedup { key, ts_ms, sender }),
        (str8(), str8(), any::<u64>(), any::<u64>()).prop_map(|(user, device, seq, ts_ms)| {
            Record::Cursor {
                user,
                device,
                seq,
                ts_ms,
            }
        }),
    ]
}

fn stream_lsns() -> impl Strategy<Value = Vec<(u16, u64)>> {
    vec(any::<(u16, u64)>(), 0..20)
}

/// Replication-link frames: REPL_HELLO, REPL_APPEND, REPL_ACK, REPL_HEARTBEAT.
fn repl_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<u8>(),
            str8(),
            any::<u64>(),
            any::<u16>(),
            any::<u8>(),
            stream_lsns()
        )
            .prop_map(
                |(version, node, epoch, workers, flags, applied)| Frame::ReplHello {
                    version,
                    node,
                    epoch,
                    workers,
                    flags,
                    applied
                }
            ),
        (any::<u16>(), any::<u64>(), vec(record(), 0..12)).prop_map(
            |(stream, first_lsn, records)| Frame::ReplAppend {
                stream,
                first_lsn,
                records
            }
        ),
        (any::<u16>(), any::<u64>()).prop_map(|(stream, lsn)| Frame::ReplAck { stream, lsn }),
        (any::<u64>(), stream_lsns())
            .prop_map(|(ts_ms, last)| Frame::ReplHeartbeat { ts_ms, last }),
    ]
}

fn link_kind() -> impl Strategy<Value = LinkKind> {
    prop_oneof![
        Just(LinkKind::Client),
        Just(LinkKind::Worker),
        Just(LinkKind::Repl)
    ]
}

fn client_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u8>(), str8(), str16(), str8()).prop_map(|(version, user, token, device)| {
            Frame::Login {
                version,
                user,
                token,
                device,
            }
        }),
        (any::<u8>(), any::<u8>(), str8(), any::<u32>()).prop_map(
            |(version, flags, node, max_frame)| Frame::LoginOk {
                version,
                flags,
                node,
                max_frame
            }
        ),
        (str8(), str8(), body()).prop_map(|(msg_id, to, body)| Frame::Send { msg_id, to, body }),
        (str8(), any::<u8>()).prop_map(|(msg_id, flags)| Frame::Ack { msg_id, flags }),
        (any::<u64>(), any::<u64>(), str8(), str8(), body()).prop_map(
            |(tag, ts_ms, sender, msg_id, body)| Frame::Deliver {
                tag,
                ts_ms,
                sender,
                msg_id,
                body
            }
        ),
        any::<u64>().prop_map(|tag| Frame::DeliverAck { tag }),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
        (any::<u16>(), str8(), str16()).prop_map(|(code, msg_id, reason)| Frame::Error {
            code,
            msg_id,
            reason
        }),
    ]
}

/// Splits `data` at the given cut points (taken modulo its length).
fn chunks(data: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    points.sort_unstable();
    let mut out = Vec::new();
    let mut prev = 0;
    for p in points.into_iter().chain([data.len()]) {
        out.push(data[prev..p].to_vec());
        prev = p;
    }
    out
}

/// Encodes `frames` as one batch (within the decoder's max_frame) and feeds it to `d` cut at `cuts`: (decoded, bytes left pending).
fn feed_batch_in_chunks(
    frames: &[Frame],
    mut d: Decoder,
    cuts: &[usize],
) -> (Vec<Result<Frame, DecodeError>>, usize) {
    let refs: Vec<_> = frames.iter().map(Frame::as_ref).collect();
    let bytes = encode_batch(&refs, d.max_frame()).unwrap();
    let mut got = Vec::new();
    for c in chunks(&bytes, cuts) {
        got.extend(d.feed_owned(&c));
    }
    (got, d.pending())
}

proptest! {
    #[test]
    fn decode_inverts_encode(frames in vec(frame(), 1..8), cuts in vec(any::<usize>(), 0..6)) {
        let (got, pending) = feed_batch_in_chunks(&frames, Decoder::new_internal(1 << 20), &cuts);
        let want: Vec<_> = frames.into_iter().map(Ok).collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(pending, 0);
    }

    #[test]
    fn single_encode_roundtrips(f in frame()) {
        let bytes = encode(&f.as_ref(), 1 << 20).unwrap();
        prop_assert_eq!(Decoder::new_internal(1 << 20).feed_owned(&bytes), vec![Ok(f)]);
    }

    #[test]
    fn client_decoder_sees_internal_frames_as_unknown(
        frames in vec(frame(), 1..8),
        cuts in vec(any::<usize>(), 0..6),
    ) {
        let refs: Vec<_> = frames.iter().map(Frame::as_ref).collect();
        let bytes = encode_batch(&refs, 1 << 20).unwrap();
        let mut d = Decoder::new(1 << 20);
        let mut got = Vec::new();
        for c in chunks(&bytes, &cuts) {
            got.extend(d.feed_owned(&c));
        }
        prop_assert_eq!(got.len(), frames.len());
        for (r, f) in got.into_iter().zip(frames) {
            if is_internal_type(f.as_ref().frame_type()) {
                let e = r.unwrap_err();
                prop_assert_eq!(e.code, E_UNKNOWN_TYPE);
                let want = format!("unknown frame type 0x{:02x}", f.as_ref().frame_type());
                prop_assert_eq!(e.reason, want);
            } else {
                prop_assert_eq!(r, Ok(f));
            }
        }
        prop_assert_eq!(d.pending(), 0);
    }

    #[test]
    fn byte_soup_never_panics_and_stays_bounded(
        data in vec(any::<u8>(), 0..4096),
        cuts in vec(any::<usize>(), 0..32),
        max_frame in prop_oneof![1u32..8, 1u32..2048],
        link in link_kind(),
    ) {
        let mut d = Decoder::for_link(max_frame, link);
        let mut fatal = false;
        for c in chunks(&data, &cuts) {
            for r in d.feed_owned(&c) {
                prop_assert!(!fatal, "output after a fatal error");
                if let Err(e) = r {
                    fatal |= e.code == E_FRAME_TOO_LARGE;
                }
            }
            prop_assert!(d.pending() <= max_frame as usize + HEADER_LEN);
            prop_assert!(d.buffer_capacity() <= max_frame as usize + HEADER_LEN);
        }
        prop_assert_eq!(fatal, d.poisoned());
    }

    #[test]
    fn byte_soup_split_matches_whole(
        data in vec(any::<u8>(), 0..2048),
        cuts in vec(any::<usize>(), 0..16),
        link in link_kind(),
    ) {
        let whole = Decoder::for_link(512, link).feed_owned(&data);
        let mut d = Decoder::for_link(512, link);
        let mut got = Vec::new();
        for c in chunks(&data, &cuts) {
            got.extend(d.feed_owned(&c));
        }
        prop_assert_eq!(got, whole);
    }

    #[test]
    fn repl_frames_roundtrip_on_repl_decoder(
        frames in vec(repl_frame(), 1..8),
        cuts in vec(any::<usize>(), 0..6),
    ) {
        let (got, pending) = feed_batch_in_chunks(&frames, Decoder::new_repl(16 << 20), &cuts);
        let want: Vec<_> = frames.into_iter().map(Ok).collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(pending, 0);
    }

    #[test]
    fn each_link_accepts_only_its_types(
        frames in vec(prop_oneof![frame(), repl_frame()], 1..8),
        link in link_kind(),
    ) {
        let refs: Vec<_> = frames.iter().map(Frame::as_ref).collect();
        let bytes = encode_batch(&refs, 16 << 20).unwrap();
        let got = Decoder::for_link(16 << 20, link).feed_owned(&bytes);
        prop_assert_eq!(got.len(), frames.len());
        for (r, f) in got.into_iter().zip(frames) {
            let t = f.as_ref().frame_type();
            let ok = match link {
                LinkKind::Client => !is_internal_type(t) && !is_repl_type(t),
                LinkKind::Worker => !is_repl_type(t),
                LinkKind::Repl => is_repl_type(t),
            };
            if ok {
                prop_assert_eq!(r, Ok(f));
            } else {
                let e = r.unwrap_err();
                prop_assert_eq!(e.code, E_UNKNOWN_TYPE);
                prop_assert_eq!(e.reason, format!("unknown frame type 0x{t:02x}"));
            }
        }
    }

    #[test]
    fn repl_byte_soup_with_repl_headers_never_panics(
        frames in vec(repl_frame(), 1..4),
        flips in vec((any::<usize>(), any::<u8>()), 1..8),
        cuts in vec(any::<usize>(), 0..6),
    ) {
        // Valid frames with corrupted bytes reach the record parser far more
        // often than random bytes do.
        let refs: Vec<_> = frames.iter().map(Frame::as_ref).collect();
        let mut bytes = encode_batch(&refs, 16 << 20).unwrap();
        for (i, b) in flips {
            let n = bytes.len();
            bytes[i % n] = b;
        }
        let whole = Decoder::new_repl(1 << 20).feed_owned(&bytes);
        let mut d = Decoder::new_repl(1 << 20);
        let mut got = Vec::new();
        for c in chunks(&bytes, &cuts) {
            got.extend(d.feed_owned(&c));
        }
        prop_assert_eq!(got, whole);
    }
}
