//! Property tests of the codec through the crate's public API.

use iris_native::batch::encode_batch;
use iris_native::frame::{
    encode, is_internal_type, Decoder, Frame, E_FRAME_TOO_LARGE, E_UNKNOWN_TYPE, HEADER_LEN,
};
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

fn client_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u8>(), str8(), str16()).prop_map(|(version, user, token)| Frame::Login {
            version,
            user,
            token
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

proptest! {
    #[test]
    fn decode_inverts_encode(frames in vec(frame(), 1..8), cuts in vec(any::<usize>(), 0..6)) {
        let refs: Vec<_> = frames.iter().map(Frame::as_ref).collect();
        let bytes = encode_batch(&refs, 1 << 20).unwrap();
        let mut d = Decoder::new_internal(1 << 20);
        let mut got = Vec::new();
        for c in chunks(&bytes, &cuts) {
            got.extend(d.feed_owned(&c));
        }
        let want: Vec<_> = frames.into_iter().map(Ok).collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(d.pending(), 0);
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
        internal in any::<bool>(),
    ) {
        let mut d = Decoder::with_link(max_frame, internal);
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
        internal in any::<bool>(),
    ) {
        let whole = Decoder::with_link(512, internal).feed_owned(&data);
        let mut d = Decoder::with_link(512, internal);
        let mut got = Vec::new();
        for c in chunks(&data, &cuts) {
            got.extend(d.feed_owned(&c));
        }
        prop_assert_eq!(got, whole);
    }
}
