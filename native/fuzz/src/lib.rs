//! Shared harness of the `decode_*` fuzz targets (and of the seed-corpus generator).
//!
//! # Input layout
//!
//! `data[0]` is a control byte, the rest is the byte stream a peer sends:
//!
//! * bit 7 set: the decoder's `max_frame` is [`SMALL_MAX_FRAME`] (so that the too-large and
//!   partial-frame paths are reached with short inputs), else [`MAX_FRAME`];
//! * bits 0..6 (`s`): how the stream is split into `feed` calls. `s == 0` feeds it whole;
//!   otherwise the chunk lengths come from a small PRNG seeded by `s`, each in `1..=s`
//!   (`s == 1` feeds one byte at a time).
//!
//! # Properties checked
//!
//! * nothing panics (the decoder, the encoder, the lazy record iterator);
//! * the incremental decoder yields exactly what a one-shot reference framer (written from
//!   `docs/protocol.md`) yields over the whole stream, whatever the split: the same frames, the
//!   same error codes in the same order, the same pending tail, the same poisoned state;
//! * every error code is one of BAD_FRAME, FRAME_TOO_LARGE, UNKNOWN_TYPE, BAD_UTF8, and
//!   FRAME_TOO_LARGE ends the stream;
//! * every decoded frame is of a type the link carries, re-encodes to exactly the bytes it was
//!   decoded from (the encoding is canonical), and decoding that encoding gives the frame back;
//! * the decoder's buffer never holds (nor reserves) more than `max_frame + 4` bytes.

use iris_native::frame::{
    encode, parse_frame_link, DecodeError, Decoder, Frame, LinkKind, E_BAD_FRAME, E_BAD_UTF8,
    E_FRAME_TOO_LARGE, E_UNKNOWN_TYPE, HEADER_LEN,
};

/// `max_frame` of the decoder when the control byte's bit 7 is clear (the server default).
pub const MAX_FRAME: u32 = 65_536;
/// `max_frame` of the decoder when the control byte's bit 7 is set.
pub const SMALL_MAX_FRAME: u32 = 64;

/// One decode result, owned, as both the decoder and the reference report it.
type Outcome = Result<Frame, DecodeError>;

/// What the one-shot reference framer makes of a whole stream.
struct Reference<'a> {
    /// Each result with the raw bytes (header included) of its frame, if it had any.
    results: Vec<(Outcome, &'a [u8])>,
    /// Bytes of an incomplete trailing frame.
    pending: &'a [u8],
    poisoned: bool,
}

fn reference(link: LinkKind, max_frame: u32, stream: &[u8]) -> Reference<'_> {
    let mut results = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &stream[pos..];
        if rest.len() < HEADER_LEN {
            return Reference {
                results,
                pending: rest,
                poisoned: false,
            };
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        if len == 0 {
            let err = DecodeError {
                code: E_BAD_FRAME,
                reason: String::new(),
            };
            results.push((Err(err), &rest[..HEADER_LEN]));
            pos += HEADER_LEN;
            continue;
        }
        if len > max_frame {
            let err = DecodeError {
                code: E_FRAME_TOO_LARGE,
                reason: String::new(),
            };
            results.push((Err(err), &rest[..HEADER_LEN]));
            return Reference {
                results,
                pending: &[],
                poisoned: true,
            };
        }
        let total = HEADER_LEN + len as usize;
        if rest.len() < total {
            return Reference {
                results,
                pending: rest,
                poisoned: false,
            };
        }
        let raw = &rest[..total];
        let parsed = parse_frame_link(raw[HEADER_LEN], &raw[HEADER_LEN + 1..], link);
        results.push((parsed.map(|f| f.to_owned()), raw));
        pos += total;
    }
}

/// Chunk lengths for splitting a stream: xorshift32 seeded by the control byte.
struct Splitter {
    state: u32,
    max: usize,
}

impl Splitter {
    fn next_len(&mut self) -> usize {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.state = x;
        1 + (x as usize) % self.max
    }
}

/// Feeds `stream` to `decoder` in the chunks that `split` (bits 0..6 of the control byte)
/// chooses, checking the buffer bound after every call; returns every result in order.
fn feed_split(decoder: &mut Decoder, stream: &[u8], split: u8) -> Vec<Outcome> {
    let bound = decoder.max_frame() as usize + HEADER_LEN;
    let mut out = Vec::new();
    let mut chunks = Vec::new();
    if split == 0 {
        chunks.push(stream);
    } else {
        let mut splitter = Splitter {
            state: 0x9E37_79B9 ^ u32::from(split),
            max: usize::from(split),
        };
        let mut rest = stream;
        while !rest.is_empty() {
            let n = splitter.next_len().min(rest.len());
            chunks.push(&rest[..n]);
            rest = &rest[n..];
        }
    }
    for (i, chunk) in chunks.into_iter().enumerate() {
        decoder.feed(chunk, |r| out.push(r.map(|f| f.to_owned())));
        assert!(decoder.pending() <= bound, "pending {} > {bound}", decoder.pending());
        assert!(
            decoder.buffer_capacity() <= bound,
            "buffer capacity {} > {bound}",
            decoder.buffer_capacity()
        );
        if i % 3 == 2 {
            // An idle connection's decoder gives its memory back; decoding must not notice.
            decoder.release();
        }
    }
    out
}

/// Splits a fuzz input into (max_frame, split seed, stream).
pub fn parse_input(data: &[u8]) -> (u32, u8, &[u8]) {
    match data.split_first() {
        None => (MAX_FRAME, 0, &[]),
        Some((&ctl, stream)) => {
            let max_frame = if ctl & 0x80 != 0 {
                SMALL_MAX_FRAME
            } else {
                MAX_FRAME
            };
            (max_frame, ctl & 0x7f, stream)
        }
    }
}

/// The whole check of one fuzz input on a link of kind `link` (see the module docs).
pub fn check_stream(link: LinkKind, data: &[u8]) {
    let (max_frame, split, stream) = parse_input(data);
    let mut decoder = Decoder::for_link(max_frame, link);
    assert_eq!(decoder.link(), link);
    let got = feed_split(&mut decoder, stream, split);
    let want = reference(link, max_frame, stream);

    assert_eq!(
        got.len(),
        want.results.len(),
        "decoder yielded {} results, the reference framer {}",
        got.len(),
        want.results.len()
    );
    for (i, (g, (w, raw))) in got.iter().zip(&want.results).enumerate() {
        match (g, w) {
            (Ok(gf), Ok(wf)) => {
                assert_eq!(gf, wf, "result {i}: frames differ");
                check_frame(link, max_frame, gf, raw);
            }
            (Err(ge), Err(we)) => {
                assert_eq!(ge.code, we.code, "result {i}: {ge} vs {we}");
                assert!(
                    matches!(
                        ge.code,
                        E_BAD_FRAME | E_FRAME_TOO_LARGE | E_UNKNOWN_TYPE | E_BAD_UTF8
                    ),
                    "result {i}: unexpected error code {ge}"
                );
                assert!(!ge.reason.is_empty(), "result {i}: error without a reason");
                assert_eq!(
                    ge.is_fatal(),
                    ge.code == E_FRAME_TOO_LARGE,
                    "result {i}: {ge}"
                );
            }
            _ => panic!("result {i}: decoder gave {g:?}, reference framer {w:?}"),
        }
    }

    assert_eq!(decoder.poisoned(), want.poisoned, "poisoned state differs");
    assert_eq!(decoder.pending(), want.pending.len(), "pending bytes differ");
    // A poisoned decoder ignores all further input.
    if decoder.poisoned() {
        let mut more = 0;
        decoder.feed(stream, |_| more += 1);
        assert_eq!(more, 0, "a poisoned decoder yielded results");
    }
    let pending = decoder.take_pending();
    assert_eq!(pending, want.pending, "pending bytes differ");
    assert_eq!(decoder.pending(), 0);
}

/// Checks one decoded frame: a type the link carries, canonical re-encoding, and
/// decode(encode(f)) == f on a fresh decoder of the same kind.
fn check_frame(link: LinkKind, max_frame: u32, frame: &Frame, raw: &[u8]) {
    let fref = frame.as_ref();
    let ftype = fref.frame_type();
    assert!(link.accepts(ftype), "{link:?} link decoded type 0x{ftype:02x}");
    assert_eq!(ftype, raw[HEADER_LEN], "frame type differs from its type byte");
    let encoded = match encode(&fref, max_frame) {
        Ok(e) => e,
        Err(e) => panic!("decoded frame {frame:?} does not re-encode: {e}"),
    };
    assert_eq!(encoded, raw, "re-encoding {frame:?} gives other bytes");
    let mut fresh = Decoder::for_link(max_frame, link);
    let again = fresh.feed_owned(&encoded);
    assert_eq!(again, vec![Ok(frame.clone())], "decode(encode(f)) != f");
    assert_eq!(fresh.pending(), 0);
}
