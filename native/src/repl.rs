//! Replication-link frames (see `docs/replication.md`): the mailbox records
//! carried by `REPL_APPEND` and the `(stream, lsn)` lists of `REPL_HELLO` and
//! `REPL_HEARTBEAT`. The frame variants themselves live in [`crate::frame`];
//! this module holds their record types, payload parsing and encoding.

use std::fmt;

use crate::frame::{check_str, DecodeError, EncodeError, FrameRef, Reader, Writer, E_BAD_FRAME};

pub const REPL_HELLO: u8 = 0x61;
pub const REPL_APPEND: u8 = 0x62;
pub const REPL_ACK: u8 = 0x63;
pub const REPL_HEARTBEAT: u8 = 0x64;

/// Replication protocol version carried by `REPL_HELLO`. 2 (issue 10): `DEDUP`
/// records carry the sender hash and `epoch` is the stream identity; a
/// version-1 peer is refused.
pub const REPL_VERSION: u8 = 2;

/// `REPL_HELLO.flags` bit 0: the sending node accepted writes in degraded
/// mode since its last healthy link. Other bits are reserved and ignored by
/// receivers.
pub const HELLO_SPLIT: u8 = 1;

pub const REC_PUT: u8 = 1;
pub const REC_DEL: u8 = 2;
pub const REC_DEDUP: u8 = 3;
/// A device's delivery cursor (docs/replication.md, "Record kinds").
pub const REC_CURSOR: u8 = 4;

/// Bytes of one `(stream u16, lsn u64)` entry.
const STREAM_LSN_LEN: usize = 10;

const STR8_MAX: usize = u8::MAX as usize;

/// True for the frame types that only replication links accept.
pub fn is_repl_type(t: u8) -> bool {
    matches!(t, REPL_HELLO | REPL_APPEND | REPL_ACK | REPL_HEARTBEAT)
}

/// An owned mailbox record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Put {
        user: String,
        seq: u64,
        ts_ms: u64,
        sender: String,
        msg_id: String,
        body: Vec<u8>,
    },
    Del {
        user: String,
        seq: u64,
    },
    Dedup {
        key: [u8; 16],
        ts_ms: u64,
        /// `dedup::sender_hash` of the key's sender (the key cannot tell).
        sender: u64,
    },
    Cursor {
        user: String,
        device: String,
        seq: u64,
        ts_ms: u64,
    },
}

/// A record borrowing its strings and body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordRef<'a> {
    Put {
        user: &'a str,
        seq: u64,
        ts_ms: u64,
        sender: &'a str,
        msg_id: &'a str,
        body: &'a [u8],
    },
    Del {
        user: &'a str,
        seq: u64,
    },
    Dedup {
        key: [u8; 16],
        ts_ms: u64,
        /// `dedup::sender_hash` of the key's sender (the key cannot tell).
        sender: u64,
    },
    /// Device `device` of `user` has every message below `seq`; seen at `ts_ms`.
    Cursor {
        user: &'a str,
        device: &'a str,
        seq: u64,
        ts_ms: u64,
    },
}

impl Record {
    pub fn as_ref(&self) -> RecordRef<'_> {
        match self {
            Record::Put {
                user,
                seq,
                ts_ms,
                sender,
                msg_id,
                body,
            } => RecordRef::Put {
                user,
                seq: *seq,
                ts_ms: *ts_ms,
                sender,
                msg_id,
                body,
            },
            Record::Del { user, seq } => RecordRef::Del { user, seq: *seq },
            Record::Dedup { key, ts_ms, sender } => RecordRef::Dedup {
                key: *key,
                ts_ms: *ts_ms,
                sender: *sender,
            },
            Record::Cursor {
                user,
                device,
                seq,
                ts_ms,
            } => RecordRef::Cursor {
                user,
                device,
                seq: *seq,
                ts_ms: *ts_ms,
            },
        }
    }
}

impl RecordRef<'_> {
    pub fn kind(&self) -> u8 {
        match self {
            RecordRef::Put { .. } => REC_PUT,
            RecordRef::Del { .. } => REC_DEL,
            RecordRef::Dedup { .. } => REC_DEDUP,
            RecordRef::Cursor { .. } => REC_CURSOR,
        }
    }

    pub fn to_owned(&self) -> Record {
        match *self {
            RecordRef::Put {
                user,
                seq,
                ts_ms,
                sender,
                msg_id,
                body,
            } => Record::Put {
                user: user.to_owned(),
                seq,
                ts_ms,
                sender: sender.to_owned(),
                msg_id: msg_id.to_owned(),
                body: body.to_vec(),
            },
            RecordRef::Del { user, seq } => Record::Del {
                user: user.to_owned(),
                seq,
            },
            RecordRef::Dedup { key, ts_ms, sender } => Record::Dedup { key, ts_ms, sender },
            RecordRef::Cursor {
                user,
                device,
                seq,
                ts_ms,
            } => Record::Cursor {
                user: user.to_owned(),
                device: device.to_owned(),
                seq,
                ts_ms,
            },
        }
    }

    /// Encoded size of the record (kind byte included), validating strings.
    fn encoded_len(&self, frame: &FrameRef<'_>) -> Result<usize, EncodeError> {
        let f = frame;
        Ok(match *self {
            RecordRef::Put {
                user,
                sender,
                msg_id,
                body,
                ..
            } => {
                1 + check_str(f, "user", user, STR8_MAX)?
                    + 16
                    + check_str(f, "sender", sender, STR8_MAX)?
                    + check_str(f, "msg_id", msg_id, STR8_MAX)?
                    + 4
                    + body.len()
            }
            RecordRef::Del { user, .. } => 1 + check_str(f, "user", user, STR8_MAX)? + 8,
            RecordRef::Dedup { .. } => 1 + 16 + 8 + 8,
            RecordRef::Cursor { user, device, .. } => {
                1 + check_str(f, "user", user, STR8_MAX)?
                    + check_str(f, "device", device, STR8_MAX)?
                    + 16
            }
        })
    }

    fn write(&self, w: &mut Writer<'_>) {
        w.u8(self.kind());
        match *self {
            RecordRef::Put {
                user,
                seq,
                ts_ms,
                sender,
                msg_id,
                body,
            } => {
                w.str8(user);
                w.bytes(&seq.to_be_bytes());
                w.bytes(&ts_ms.to_be_bytes());
                w.str8(sender);
                w.str8(msg_id);
                // encoded_len bounded the frame by a u32 max_frame.
                w.bytes(&(body.len() as u32).to_be_bytes());
                w.bytes(body);
            }
            RecordRef::Del { user, seq } => {
                w.str8(user);
                w.bytes(&seq.to_be_bytes());
            }
            RecordRef::Dedup { key, ts_ms, sender } => {
                w.bytes(&key);
                w.bytes(&ts_ms.to_be_bytes());
                w.bytes(&sender.to_be_bytes());
            }
            RecordRef::Cursor {
                user,
                device,
                seq,
                ts_ms,
            } => {
                w.str8(user);
                w.str8(device);
                w.bytes(&seq.to_be_bytes());
                w.bytes(&ts_ms.to_be_bytes());
            }
        }
    }
}

/// Reads one record; errors name the record's index in the frame.
fn read_record<'a>(r: &mut Reader<'a>, index: u32) -> Result<RecordRef<'a>, DecodeError> {
    let at = |e: DecodeError| DecodeError {
        code: e.code,
        reason: format!("{} (record {index})", e.reason),
    };
    let kind = r.u8("kind").map_err(at)?;
    let rec = match kind {
        REC_PUT => {
            let user = r.str8("user").map_err(at)?;
            let seq = r.u64("seq").map_err(at)?;
            let ts_ms = r.u64("ts_ms").map_err(at)?;
            let sender = r.str8("sender").map_err(at)?;
            let msg_id = r.str8("msg_id").map_err(at)?;
            let n = r.u32("body_len").map_err(at)? as usize;
            let body = r.take(n, "body").map_err(at)?;
            RecordRef::Put {
                user,
                seq,
                ts_ms,
                sender,
                msg_id,
                body,
            }
        }
        REC_DEL => RecordRef::Del {
            user: r.str8("user").map_err(at)?,
            seq: r.u64("seq").map_err(at)?,
        },
        REC_DEDUP => RecordRef::Dedup {
            key: r.array::<16>("key").map_err(at)?,
            ts_ms: r.u64("ts_ms").map_err(at)?,
            sender: r.u64("sender").map_err(at)?,
        },
        REC_CURSOR => RecordRef::Cursor {
            user: r.str8("user").map_err(at)?,
            device: r.str8("device").map_err(at)?,
            seq: r.u64("seq").map_err(at)?,
            ts_ms: r.u64("ts_ms").map_err(at)?,
        },
        other => {
            return Err(DecodeError {
                code: E_BAD_FRAME,
                reason: format!("REPL_APPEND record {index} has unknown record kind {other}"),
            })
        }
    };
    Ok(rec)
}

// ---------------------------------------------------------------------------
// Record lists
// ---------------------------------------------------------------------------

/// The records of one `REPL_APPEND`: either validated wire bytes (decoder
/// output, parsed again lazily on iteration so nothing is copied) or caller
/// values being encoded.
#[derive(Clone, Copy)]
pub enum Records<'a> {
    /// `count` records, already validated, back to back in `bytes`.
    Wire {
        count: u32,
        bytes: &'a [u8],
    },
    Refs(&'a [RecordRef<'a>]),
    Owned(&'a [Record]),
}

impl<'a> Records<'a> {
    pub fn len(&self) -> usize {
        match self {
            Records::Wire { count, .. } => *count as usize,
            Records::Refs(v) => v.len(),
            Records::Owned(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> RecordIter<'a> {
        RecordIter {
            records: *self,
            reader: match self {
                Records::Wire { bytes, .. } => Reader {
                    buf: bytes,
                    pos: 0,
                    ftype: REPL_APPEND,
                },
                _ => Reader {
                    buf: &[],
                    pos: 0,
                    ftype: REPL_APPEND,
                },
            },
            next: 0,
        }
    }
}

pub struct RecordIter<'a> {
    records: Records<'a>,
    reader: Reader<'a>,
    next: usize,
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = RecordRef<'a>;

    fn next(&mut self) -> Option<RecordRef<'a>> {
        let i = self.next;
        if i >= self.records.len() {
            return None;
        }
        self.next += 1;
        Some(match self.records {
            Records::Wire { .. } => read_record(&mut self.reader, i as u32)
                .expect("REPL_APPEND records are validated when decoded"),
            Records::Refs(v) => v[i],
            Records::Owned(v) => v[i].as_ref(),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.records.len() - self.next;
        (n, Some(n))
    }
}

impl ExactSizeIterator for RecordIter<'_> {}

impl PartialEq for Records<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Records<'_> {}

impl fmt::Debug for Records<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

// ---------------------------------------------------------------------------
// (stream, lsn) lists
// ---------------------------------------------------------------------------

/// The `(stream, lsn)` entries of a `REPL_HELLO` or `REPL_HEARTBEAT`: wire
/// bytes (a multiple of 10, from the decoder) or caller values.
#[derive(Clone, Copy)]
pub enum StreamLsns<'a> {
    Wire(&'a [u8]),
    Slice(&'a [(u16, u64)]),
}

impl<'a> StreamLsns<'a> {
    pub fn len(&self) -> usize {
        match self {
            StreamLsns::Wire(b) => b.len() / STREAM_LSN_LEN,
            StreamLsns::Slice(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (u16, u64)> + 'a {
        let (wire, slice): (&'a [u8], &'a [(u16, u64)]) = match *self {
            StreamLsns::Wire(b) => (b, &[]),
            StreamLsns::Slice(v) => (&[], v),
        };
        let n = self.len();
        (0..n).map(move |i| {
            if slice.is_empty() {
                let e = &wire[i * STREAM_LSN_LEN..(i + 1) * STREAM_LSN_LEN];
                let mut lsn = [0u8; 8];
                lsn.copy_from_slice(&e[2..]);
                (u16::from_be_bytes([e[0], e[1]]), u64::from_be_bytes(lsn))
            } else {
                slice[i]
            }
        })
    }

    pub fn to_vec(&self) -> Vec<(u16, u64)> {
        self.iter().collect()
    }
}

impl PartialEq for StreamLsns<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for StreamLsns<'_> {}

impl fmt::Debug for StreamLsns<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

// ---------------------------------------------------------------------------
// Payload parsing and encoding (called from `frame`)
// ---------------------------------------------------------------------------

fn read_stream_lsns<'a>(r: &mut Reader<'a>, field: &str) -> Result<StreamLsns<'a>, DecodeError> {
    let count = r.u16("count")? as usize;
    Ok(StreamLsns::Wire(r.take(count * STREAM_LSN_LEN, field)?))
}

/// Parses the payload of one of the four replication types (`r` positioned
/// at its start); the caller checks for trailing bytes.
pub(crate) fn parse_repl<'a>(r: &mut Reader<'a>) -> Result<FrameRef<'a>, DecodeError> {
    Ok(match r.ftype {
        REPL_HELLO => FrameRef::ReplHello {
            version: r.u8("version")?,
            node: r.str8("node")?,
            epoch: r.u64("epoch")?,
            workers: r.u16("workers")?,
            flags: r.u8("flags")?,
            applied: read_stream_lsns(r, "applied")?,
        },
        REPL_APPEND => {
            let stream = r.u16("stream")?;
            let first_lsn = r.u64("first_lsn")?;
            let count = r.u32("count")?;
            let start = r.pos;
            // Each record takes at least one byte, so a lying count fails as
            // soon as the payload runs out: the loop is bounded by its length.
            for i in 0..count {
                read_record(r, i)?;
            }
            FrameRef::ReplAppend {
                stream,
                first_lsn,
                records: Records::Wire {
                    count,
                    bytes: &r.buf[start..r.pos],
                },
            }
        }
        REPL_ACK => FrameRef::ReplAck {
            stream: r.u16("stream")?,
            lsn: r.u64("lsn")?,
        },
        _ => FrameRef::ReplHeartbeat {
            ts_ms: r.u64("ts_ms")?,
            last: read_stream_lsns(r, "last_lsn")?,
        },
    })
}

fn check_count(
    frame: &FrameRef<'_>,
    field: &'static str,
    len: usize,
    max: usize,
) -> Result<(), EncodeError> {
    if len > max {
        return Err(EncodeError::TooManyItems {
            frame: crate::frame::frame_name(frame.frame_type()),
            field,
            len,
            max,
        });
    }
    Ok(())
}

/// Payload size of a replication frame, validating strings and counts.
pub(crate) fn repl_payload_len(frame: &FrameRef<'_>) -> Result<usize, EncodeError> {
    let f = frame;
    Ok(match *frame {
        FrameRef::ReplHello { node, applied, .. } => {
            check_count(f, "applied", applied.len(), u16::MAX as usize)?;
            1 + check_str(f, "node", node, STR8_MAX)?
                + 8
                + 2
                + 1
                + 2
                + applied.len() * STREAM_LSN_LEN
        }
        FrameRef::ReplAppend { records, .. } => {
            check_count(f, "records", records.len(), u32::MAX as usize)?;
            records
                .iter()
                .try_fold(2 + 8 + 4, |acc, rec| Ok(acc + rec.encoded_len(f)?))?
        }
        FrameRef::ReplAck { .. } => 2 + 8,
        FrameRef::ReplHeartbeat { last, .. } => {
            check_count(f, "last_lsn", last.len(), u16::MAX as usize)?;
            8 + 2 + last.len() * STREAM_LSN_LEN
        }
        _ => unreachable!("not a replication frame"),
    })
}

fn write_stream_lsns(w: &mut Writer<'_>, entries: StreamLsns<'_>) {
    w.bytes(&(entries.len() as u16).to_be_bytes());
    for (stream, lsn) in entries.iter() {
        w.bytes(&stream.to_be_bytes());
        w.bytes(&lsn.to_be_bytes());
    }
}

/// Writes the payload of a replication frame (sized by `repl_payload_len`).
pub(crate) fn write_repl(frame: &FrameRef<'_>, w: &mut Writer<'_>) {
    match *frame {
        FrameRef::ReplHello {
            version,
            node,
            epoch,
            workers,
            flags,
            applied,
        } => {
            w.u8(version);
            w.str8(node);
            w.bytes(&epoch.to_be_bytes());
            w.bytes(&workers.to_be_bytes());
            w.u8(flags);
            write_stream_lsns(w, applied);
        }
        FrameRef::ReplAppend {
            stream,
            first_lsn,
            records,
        } => {
            w.bytes(&stream.to_be_bytes());
            w.bytes(&first_lsn.to_be_bytes());
            w.bytes(&(records.len() as u32).to_be_bytes());
            for rec in records.iter() {
                rec.write(w);
            }
        }
        FrameRef::ReplAck { stream, lsn } => {
            w.bytes(&stream.to_be_bytes());
            w.bytes(&lsn.to_be_bytes());
        }
        FrameRef::ReplHeartbeat { ts_ms, last } => {
            w.bytes(&ts_ms.to_be_bytes());
            write_stream_lsns(w, last);
        }
        _ => unreachable!("not a replication frame"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::tests::raw;
    use crate::frame::{
        encode, parse_frame, parse_frame_on, Decoder, Frame, LinkKind, E_BAD_UTF8, E_UNKNOWN_TYPE,
    };

    const MAX: u32 = 16 << 20;

    fn put(user: &str, sender: &str, msg_id: &str, body: &[u8]) -> Record {
        Record::Put {
            user: user.into(),
            seq: 7,
            ts_ms: 1_700_000_000_000,
            sender: sender.into(),
            msg_id: msg_id.into(),
            body: body.to_vec(),
        }
    }

    fn samples() -> Vec<Frame> {
        vec![
            Frame::ReplHello {
                version: REPL_VERSION,
                node: "node-a".into(),
                epoch: 0x0102_0304_0506_0708,
                workers: 0xfffe,
                flags: HELLO_SPLIT,
                applied: vec![(0, 5), (1, 0), (0xffff, u64::MAX)],
            },
            Frame::ReplHello {
                version: 9,
                node: "".into(),
                epoch: 0,
                workers: 0,
                flags: 0xff,
                applied: vec![],
            },
            Frame::ReplAppend {
                stream: 3,
                first_lsn: 1,
                records: vec![
                    put("bob", "alice", "m1", b"hello \xff"),
                    Record::Del {
                        user: "bob".into(),
                        seq: 7,
                    },
                    Record::Dedup {
                        key: [0xab; 16],
                        ts_ms: 5,
                        sender: u64::MAX,
                    },
                    put("", "", "", b""),
                ],
            },
            Frame::ReplAppend {
                stream: 0,
                first_lsn: u64::MAX,
                records: vec![],
            },
            Frame::ReplAck {
                stream: 0xfffe,
                lsn: 42,
            },
            Frame::ReplHeartbeat {
                ts_ms: 1_700_000_000_000,
                last: vec![(2, 9)],
            },
            Frame::ReplHeartbeat {
                ts_ms: 0,
                last: vec![],
            },
        ]
    }

    fn enc(f: &Frame) -> Vec<u8> {
        encode(&f.as_ref(), MAX).unwrap()
    }

    fn decode_repl(input: &[u8]) -> Vec<Result<Frame, DecodeError>> {
        Decoder::new_repl(MAX).feed_owned(input)
    }

    fn single_error(input: &[u8]) -> DecodeError {
        let out = decode_repl(input);
        assert_eq!(out.len(), 1, "{out:?}");
        out.into_iter().next().unwrap().unwrap_err()
    }

    fn append_payload(count: u32, records: &[u8]) -> Vec<u8> {
        let mut p = vec![0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
        p.extend(count.to_be_bytes());
        p.extend_from_slice(records);
        p
    }

    #[test]
    fn constants() {
        assert_eq!(
            (REPL_HELLO, REPL_APPEND, REPL_ACK, REPL_HEARTBEAT),
            (0x61, 0x62, 0x63, 0x64)
        );
        assert_eq!(
            (REC_PUT, REC_DEL, REC_DEDUP, REC_CURSOR, REPL_VERSION),
            (1, 2, 3, 4, 2)
        );
        assert_eq!(HELLO_SPLIT, 1);
        assert!((0..=255u8).filter(|t| is_repl_type(*t)).eq(0x61..=0x64));
        assert!(std::mem::size_of::<Decoder>() <= 32);
        assert!(Decoder::new_repl(10).repl());
        assert!(!Decoder::new_repl(10).internal());
        assert!(!Decoder::new_internal(10).repl());
        assert_eq!(Decoder::default().link(), LinkKind::Client);
    }

    #[test]
    fn hello_layout() {
        let f = Frame::ReplHello {
            version: 1,
            node: "ab".into(),
            epoch: 0x0102,
            workers: 0x0809,
            flags: HELLO_SPLIT,
            applied: vec![(0x0304, 0x05), (6, 7)],
        };
        let mut want = vec![
            0, 0, 0, 38, REPL_HELLO, 1, 2, b'a', b'b', 0, 0, 0, 0, 0, 0, 1, 2, 8, 9, 1,
        ];
        want.extend([
            0, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 5, 0, 6, 0, 0, 0, 0, 0, 0, 0, 7,
        ]);
        assert_eq!(enc(&f), want);
    }

    #[test]
    fn hello_workers_and_flags_fields() {
        // version, node "n", epoch, workers: the flags byte is missing.
        let mut p = vec![1, 1, b'n', 0, 0, 0, 0, 0, 0, 0, 9, 0, 4];
        let e = single_error(&raw(REPL_HELLO, &p));
        assert_eq!(e.code, E_BAD_FRAME);
        assert_eq!(
            e.reason,
            "REPL_HELLO payload truncated in field flags: needs 1 bytes, 0 left"
        );
        let e = single_error(&raw(REPL_HELLO, &p[..12]));
        assert!(e.reason.contains("field workers"), "{}", e.reason);
        // Reserved flag bits decode unchanged (receivers ignore them).
        p.extend([0xfe, 0, 0]);
        let want = Frame::ReplHello {
            version: 1,
            node: "n".into(),
            epoch: 9,
            workers: 4,
            flags: 0xfe,
            applied: vec![],
        };
        assert_eq!(decode_repl(&raw(REPL_HELLO, &p)), vec![Ok(want)]);
    }

    #[test]
    fn ack_and_heartbeat_layout() {
        let f = Frame::ReplAck {
            stream: 0x0102,
            lsn: 3,
        };
        assert_eq!(
            enc(&f),
            vec![0, 0, 0, 11, REPL_ACK, 1, 2, 0, 0, 0, 0, 0, 0, 0, 3]
        );
        let f = Frame::ReplHeartbeat {
            ts_ms: 4,
            last: vec![(5, 6)],
        };
        let mut want = vec![0, 0, 0, 21, REPL_HEARTBEAT, 0, 0, 0, 0, 0, 0, 0, 4, 0, 1];
        want.extend([0, 5, 0, 0, 0, 0, 0, 0, 0, 6]);
        assert_eq!(enc(&f), want);
    }

    #[test]
    fn append_and_record_layout() {
        let f = Frame::ReplAppend {
            stream: 1,
            first_lsn: 2,
            records: vec![
                Record::Put {
                    user: "u".into(),
                    seq: 3,
                    ts_ms: 4,
                    sender: "s".into(),
                    msg_id: "m".into(),
                    body: b"xy".to_vec(),
                },
                Record::Del {
                    user: "u".into(),
                    seq: 5,
                },
                Record::Dedup {
                    key: [9; 16],
                    ts_ms: 6,
                    sender: 7,
                },
            ],
        };
        let mut p = vec![0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 3];
        p.extend([
            REC_PUT, 1, b'u', 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 4,
        ]);
        p.extend([1, b's', 1, b'm', 0, 0, 0, 2, b'x', b'y']);
        p.extend([REC_DEL, 1, b'u', 0, 0, 0, 0, 0, 0, 0, 5]);
        p.push(REC_DEDUP);
        p.extend([9; 16]);
        p.extend([0, 0, 0, 0, 0, 0, 0, 6]);
        p.extend([0, 0, 0, 0, 0, 0, 0, 7]);
        assert_eq!(enc(&f), raw(REPL_APPEND, &p));
    }

    #[test]
    fn roundtrip_whole_and_split_everywhere() {
        let mut all = Vec::new();
        for f in samples() {
            let bytes = enc(&f);
            assert_eq!(decode_repl(&bytes), vec![Ok(f.clone())]);
            all.extend(bytes);
        }
        let whole = decode_repl(&all);
        assert_eq!(whole, samples().into_iter().map(Ok).collect::<Vec<_>>());
        for i in 0..=all.len() {
            let mut d = Decoder::new_repl(MAX);
            let mut out = d.feed_owned(&all[..i]);
            out.extend(d.feed_owned(&all[i..]));
            assert_eq!(out, whole, "split at {i}");
        }
    }

    #[test]
    fn decoded_records_borrow_the_input() {
        let bytes = enc(&samples()[2]);
        let f = parse_frame_link(REPL_APPEND, &bytes[5..], LinkKind::Repl).unwrap();
        let FrameRef::ReplAppend { records, .. } = f else {
            panic!("{f:?}")
        };
        assert_eq!(records.len(), 4);
        let Some(RecordRef::Put { body, .. }) = records.iter().next() else {
            panic!()
        };
        let range = bytes.as_ptr_range();
        assert!(range.contains(&body.as_ptr()));
        // Wire and owned forms of the same records compare equal.
        let Frame::ReplAppend { records: owned, .. } = &samples()[2] else {
            panic!()
        };
        assert_eq!(records, Records::Owned(owned));
        let refs: Vec<_> = owned.iter().map(Record::as_ref).collect();
        assert_eq!(Records::Refs(&refs), records);
    }

    use crate::frame::parse_frame_link;

    #[test]
    fn repl_types_are_unknown_on_client_and_worker_links() {
        for f in samples() {
            let bytes = enc(&f);
            let t = bytes[4];
            let want = DecodeError {
                code: E_UNKNOWN_TYPE,
                reason: format!("unknown frame type 0x{t:02x}"),
            };
            for mut d in [Decoder::new(MAX), Decoder::new_internal(MAX)] {
                assert_eq!(d.feed_owned(&bytes), vec![Err(want.clone())]);
                assert_eq!(d.feed_owned(&raw(t, &[0xff; 3])), vec![Err(want.clone())]);
            }
            assert_eq!(parse_frame(t, &bytes[5..]), Err(want.clone()));
            assert_eq!(parse_frame_on(t, &bytes[5..], true), Err(want));
        }
    }

    #[test]
    fn other_types_are_unknown_on_repl_links() {
        let others = [
            Frame::Ping { nonce: 1 },
            Frame::Send {
                msg_id: "m".into(),
                to: "t".into(),
                body: vec![],
            },
            Frame::LinkHello {
                worker: 1,
                pid: 2,
                epoch: 3,
            },
            Frame::RouteAck {
                user: "u".into(),
                msg_id: "m".into(),
                flags: 0,
            },
        ];
        for f in others {
            let bytes = enc(&f);
            let e = single_error(&bytes);
            assert_eq!(e.code, E_UNKNOWN_TYPE, "{f:?}");
            assert_eq!(e.reason, format!("unknown frame type 0x{:02x}", bytes[4]));
        }
        for t in [0u8, 0x60, 0x65, 0xff] {
            assert_eq!(single_error(&raw(t, b"x")).code, E_UNKNOWN_TYPE);
        }
    }

    #[test]
    fn truncation_in_every_field_is_bad_frame() {
        for f in samples() {
            let bytes = enc(&f);
            let (t, payload) = (bytes[4], &bytes[5..]);
            for cut in 0..payload.len() {
                let e = single_error(&raw(t, &payload[..cut]));
                assert_eq!(e.code, E_BAD_FRAME, "{f:?} cut at {cut}: {e:?}");
                assert!(e.reason.contains("truncated"), "{}", e.reason);
                assert!(e.reason.starts_with(type_name_of(t)), "{}", e.reason);
            }
        }
    }

    fn type_name_of(t: u8) -> &'static str {
        crate::frame::frame_name(t)
    }

    #[test]
    fn truncated_record_fields_are_named() {
        let Frame::ReplAppend { records, .. } = &samples()[2] else {
            panic!()
        };
        let rec = enc(&Frame::ReplAppend {
            stream: 1,
            first_lsn: 1,
            records: vec![records[0].clone()],
        })[19..]
            .to_vec();
        // kind(1) user(1+3) seq(8) ts_ms(8) sender(1+5) msg_id(1+2) body_len(4) body
        let fields = [
            (0, "kind"),
            (1, "user"),
            (3, "user"),
            (5, "seq"),
            (13, "ts_ms"),
            (21, "sender"),
            (27, "msg_id"),
            (30, "body_len"),
            (34, "body"),
        ];
        for (cut, field) in fields {
            let e = single_error(&raw(REPL_APPEND, &append_payload(1, &rec[..cut])));
            assert_eq!(e.code, E_BAD_FRAME);
            assert!(
                e.reason.contains(&format!("field {field}:")) && e.reason.ends_with("(record 0)"),
                "{cut}: {}",
                e.reason
            );
        }
        let dedup = [REC_DEDUP, 1, 2, 3];
        let e = single_error(&raw(REPL_APPEND, &append_payload(1, &dedup)));
        assert!(e.reason.contains("field key"), "{}", e.reason);
    }

    #[test]
    fn count_mismatch_both_ways() {
        let del = [REC_DEL, 1, b'u', 0, 0, 0, 0, 0, 0, 0, 1];
        let two: Vec<u8> = del.iter().chain(&del).copied().collect();
        assert!(decode_repl(&raw(REPL_APPEND, &append_payload(2, &two)))[0].is_ok());
        // More records announced than present: truncated.
        let e = single_error(&raw(REPL_APPEND, &append_payload(3, &two)));
        assert_eq!(e.code, E_BAD_FRAME);
        assert!(e.reason.contains("truncated in field kind"), "{}", e.reason);
        assert!(e.reason.ends_with("(record 2)"), "{}", e.reason);
        // A huge count fails fast as well.
        let e = single_error(&raw(REPL_APPEND, &append_payload(u32::MAX, &two)));
        assert!(e.reason.contains("truncated"), "{}", e.reason);
        // Fewer: the extra record is trailing bytes.
        let e = single_error(&raw(REPL_APPEND, &append_payload(1, &two)));
        assert_eq!(e.code, E_BAD_FRAME);
        assert!(e.reason.contains("11 trailing bytes"), "{}", e.reason);
        let e = single_error(&raw(REPL_APPEND, &append_payload(0, &del)));
        assert!(e.reason.contains("trailing"), "{}", e.reason);
        // (stream, lsn) lists: too few entries is truncated, too many trailing.
        let mut hb = vec![0; 8];
        hb.extend([0, 2]);
        hb.extend([0; 10]);
        let e = single_error(&raw(REPL_HEARTBEAT, &hb));
        assert!(
            e.reason.contains("truncated in field last_lsn"),
            "{}",
            e.reason
        );
        hb.extend([0; 20]);
        let e = single_error(&raw(REPL_HEARTBEAT, &hb));
        assert!(e.reason.contains("10 trailing bytes"), "{}", e.reason);
        // version, node "", epoch, workers, flags, count 1.
        let mut hello = vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        hello.extend([0; 9]);
        let e = single_error(&raw(REPL_HELLO, &hello));
        assert!(e.reason.contains("field applied"), "{}", e.reason);
        hello.extend([0; 2]);
        let e = single_error(&raw(REPL_HELLO, &hello));
        assert!(e.reason.contains("1 trailing bytes"), "{}", e.reason);
        let e = single_error(&raw(REPL_ACK, &[0; 11]));
        assert!(e.reason.contains("trailing"), "{}", e.reason);
    }

    #[test]
    fn unknown_record_kind_is_bad_frame() {
        for kind in [0u8, 5, 0xff] {
            let del = [REC_DEL, 0, 0, 0, 0, 0, 0, 0, 0, 1];
            let mut recs = del.to_vec();
            recs.extend([kind, 0, 0, 0]);
            let e = single_error(&raw(REPL_APPEND, &append_payload(2, &recs)));
            assert_eq!(e.code, E_BAD_FRAME);
            assert_eq!(
                e.reason,
                format!("REPL_APPEND record 1 has unknown record kind {kind}")
            );
        }
    }

    #[test]
    fn bad_utf8_in_every_string() {
        let bad = "\u{7f}\u{7f}";
        let append = |r: Record| Frame::ReplAppend {
            stream: 1,
            first_lsn: 1,
            records: vec![
                Record::Dedup {
                    key: [0; 16],
                    ts_ms: 0,
                    sender: 0,
                },
                r,
            ],
        };
        let cases = [
            (
                Frame::ReplHello {
                    version: 1,
                    node: bad.into(),
                    epoch: 1,
                    workers: 4,
                    flags: 0,
                    applied: vec![(1, 1)],
                },
                "node",
            ),
            (append(put(bad, "s", "m", b"")), "user"),
            (append(put("u", bad, "m", b"")), "sender"),
            (append(put("u", "s", bad, b"")), "msg_id"),
            (
                append(Record::Del {
                    user: bad.into(),
                    seq: 1,
                }),
                "user",
            ),
        ];
        for (f, field) in cases {
            let mut bytes = enc(&f);
            let pos = bytes.windows(2).position(|w| w == [0x7f, 0x7f]).unwrap();
            bytes[pos] = 0xff;
            bytes[pos + 1] = 0xfe;
            let e = single_error(&bytes);
            assert_eq!(e.code, E_BAD_UTF8, "{f:?}");
            assert!(
                e.reason.contains(&format!("field {field} ")),
                "{}",
                e.reason
            );
            // Bodies and dedup keys are opaque bytes.
            assert_eq!(
                Decoder::new(MAX).feed_owned(&bytes)[0]
                    .as_ref()
                    .unwrap_err()
                    .code,
                E_UNKNOWN_TYPE
            );
        }
    }

    #[test]
    fn encoder_checks_limits() {
        let long = "x".repeat(256);
        let f = Frame::ReplAppend {
            stream: 1,
            first_lsn: 1,
            records: vec![put("u", &long, "m", b"")],
        };
        assert!(matches!(
            encode(&f.as_ref(), MAX),
            Err(EncodeError::StringTooLong {
                frame: "REPL_APPEND",
                field: "sender",
                ..
            })
        ));
        let f = Frame::ReplHello {
            version: 1,
            node: "n".into(),
            epoch: 1,
            workers: 1,
            flags: 0,
            applied: vec![(0, 0); 65536],
        };
        let e = encode(&f.as_ref(), MAX).unwrap_err();
        assert_eq!(
            e.to_string(),
            "REPL_HELLO field applied has 65536 entries, at most 65535 allowed"
        );
        let f = Frame::ReplHeartbeat {
            ts_ms: 1,
            last: vec![(0, 0); 65535],
        };
        assert_eq!(
            encode(&f.as_ref(), MAX).unwrap().len(),
            4 + 1 + 10 + 655_350
        );
        let f = Frame::ReplAppend {
            stream: 1,
            first_lsn: 1,
            records: vec![put("u", "s", "m", &[0; 100])],
        };
        let n = enc(&f).len() - 4;
        assert!(encode(&f.as_ref(), n as u32).is_ok());
        assert_eq!(
            encode(&f.as_ref(), n as u32 - 1).unwrap_err(),
            EncodeError::FrameTooLarge {
                frame: "REPL_APPEND",
                len: n,
                max_frame: n as u32 - 1
            }
        );
    }

    #[test]
    fn batch_mixes_repl_frames() {
        let owned = samples();
        let refs: Vec<_> = owned.iter().map(Frame::as_ref).collect();
        let batch = crate::batch::encode_batch(&refs, MAX).unwrap();
        let concat: Vec<u8> = owned.iter().flat_map(enc).collect();
        assert_eq!(batch, concat);
    }
}
