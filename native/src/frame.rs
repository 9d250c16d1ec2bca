//! Frame types, the incremental decoder and the encoder for the wire protocol
//! described in `docs/protocol.md`.

use std::fmt;

use crate::repl::{self, Record, Records, StreamLsns};
pub use crate::repl::{
    is_repl_type, HELLO_SPLIT, REPL_ACK, REPL_APPEND, REPL_HEARTBEAT, REPL_HELLO, REPL_VERSION,
};

pub const LOGIN: u8 = 0x01;
pub const LOGIN_OK: u8 = 0x02;
pub const SEND: u8 = 0x03;
pub const ACK: u8 = 0x04;
pub const DELIVER: u8 = 0x05;
pub const DELIVER_ACK: u8 = 0x06;
pub const PING: u8 = 0x07;
pub const PONG: u8 = 0x08;
pub const ERROR: u8 = 0x09;

// Internal frame types: valid only on worker-to-worker links (a decoder built
// with `internal = true`); a client decoder reports them as unknown types.
pub const ROUTE_SEND: u8 = 0x41;
pub const ROUTE_ACK: u8 = 0x42;
pub const ROUTE_ERROR: u8 = 0x43;
pub const LINK_HELLO: u8 = 0x44;

/// `ROUTE_SEND.flags` bit: the message is a replay of a stored one.
pub const ROUTE_FLAG_REPLAY: u8 = 1;

/// True for the frame types that only internal links accept.
pub fn is_internal_type(t: u8) -> bool {
    matches!(t, ROUTE_SEND | ROUTE_ACK | ROUTE_ERROR | LINK_HELLO)
}

pub const E_BAD_FRAME: u16 = 1;
pub const E_FRAME_TOO_LARGE: u16 = 2;
pub const E_UNKNOWN_TYPE: u16 = 3;
pub const E_BAD_UTF8: u16 = 4;

pub const ACK_STORED: u8 = 1;
pub const ACK_DUPLICATE: u8 = 2;
pub const ACK_DEGRADED: u8 = 4;

pub const DEFAULT_MAX_FRAME: u32 = 65_536;
pub const HEADER_LEN: usize = 4;

const STR8_MAX: usize = u8::MAX as usize;
const STR16_MAX: usize = u16::MAX as usize;

/// An owned frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Login {
        version: u8,
        user: String,
        token: String,
        /// Optional trailing field (empty: absent, an old client's anonymous device).
        device: String,
    },
    LoginOk {
        version: u8,
        flags: u8,
        node: String,
        max_frame: u32,
    },
    Send {
        msg_id: String,
        to: String,
        body: Vec<u8>,
    },
    Ack {
        msg_id: String,
        flags: u8,
    },
    Deliver {
        tag: u64,
        ts_ms: u64,
        sender: String,
        msg_id: String,
        body: Vec<u8>,
    },
    DeliverAck {
        tag: u64,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    Error {
        code: u16,
        msg_id: String,
        reason: String,
    },
    RouteSend {
        ts_ms: u64,
        flags: u8,
        sender: String,
        msg_id: String,
        to: String,
        body: Vec<u8>,
    },
    RouteAck {
        user: String,
        msg_id: String,
        flags: u8,
    },
    RouteError {
        user: String,
        code: u16,
        msg_id: String,
        reason: String,
    },
    LinkHello {
        worker: u16,
        pid: u32,
        epoch: u64,
    },
    ReplHello {
        version: u8,
        node: String,
        epoch: u64,
        workers: u16,
        flags: u8,
        applied: Vec<(u16, u64)>,
    },
    ReplAppend {
        stream: u16,
        first_lsn: u64,
        records: Vec<Record>,
    },
    ReplAck {
        stream: u16,
        lsn: u64,
    },
    ReplHeartbeat {
        ts_ms: u64,
        last: Vec<(u16, u64)>,
    },
}

/// A frame borrowing its strings and body, either from the decoder's input (so
/// the Python layer copies a body exactly once) or from caller-owned values
/// being encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameRef<'a> {
    Login {
        version: u8,
        user: &'a str,
        token: &'a str,
        /// Optional trailing field (empty: absent, an old client's anonymous device).
        device: &'a str,
    },
    LoginOk {
        version: u8,
        flags: u8,
        node: &'a str,
        max_frame: u32,
    },
    Send {
        msg_id: &'a str,
        to: &'a str,
        body: &'a [u8],
    },
    Ack {
        msg_id: &'a str,
        flags: u8,
    },
    Deliver {
        tag: u64,
        ts_ms: u64,
        sender: &'a str,
        msg_id: &'a str,
        body: &'a [u8],
    },
    DeliverAck {
        tag: u64,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    Error {
        code: u16,
        msg_id: &'a str,
        reason: &'a str,
    },
    RouteSend {
        ts_ms: u64,
        flags: u8,
        sender: &'a str,
        msg_id: &'a str,
        to: &'a str,
        body: &'a [u8],
    },
    RouteAck {
        user: &'a str,
        msg_id: &'a str,
        flags: u8,
    },
    RouteError {
        user: &'a str,
        code: u16,
        msg_id: &'a str,
        reason: &'a str,
    },
    LinkHello {
        worker: u16,
        pid: u32,
        epoch: u64,
    },
    ReplHello {
        version: u8,
        node: &'a str,
        epoch: u64,
        workers: u16,
        flags: u8,
        applied: StreamLsns<'a>,
    },
    ReplAppend {
        stream: u16,
        first_lsn: u64,
        records: Records<'a>,
    },
    ReplAck {
        stream: u16,
        lsn: u64,
    },
    ReplHeartbeat {
        ts_ms: u64,
        last: StreamLsns<'a>,
    },
}

impl Frame {
    pub fn as_ref(&self) -> FrameRef<'_> {
        match self {
            Frame::Login {
                version,
                user,
                token,
                device,
            } => FrameRef::Login {
                version: *version,
                user,
                token,
                device,
            },
            Frame::LoginOk {
                version,
                flags,
                node,
                max_frame,
            } => FrameRef::LoginOk {
                version: *version,
                flags: *flags,
                node,
                max_frame: *max_frame,
            },
            Frame::Send { msg_id, to, body } => FrameRef::Send { msg_id, to, body },
            Frame::Ack { msg_id, flags } => FrameRef::Ack {
                msg_id,
                flags: *flags,
            },
            Frame::Deliver {
                tag,
                ts_ms,
                sender,
                msg_id,
                body,
            } => FrameRef::Deliver {
                tag: *tag,
                ts_ms: *ts_ms,
                sender,
                msg_id,
                body,
            },
            Frame::DeliverAck { tag } => FrameRef::DeliverAck { tag: *tag },
            Frame::Ping { nonce } => FrameRef::Ping { nonce: *nonce },
            Frame::Pong { nonce } => FrameRef::Pong { nonce: *nonce },
            Frame::Error {
                code,
                msg_id,
                reason,
            } => FrameRef::Error {
                code: *code,
                msg_id,
                reason,
            },
            Frame::RouteSend {
                ts_ms,
                flags,
                sender,
                msg_id,
                to,
                body,
            } => FrameRef::RouteSend {
                ts_ms: *ts_ms,
                flags: *flags,
                sender,
                msg_id,
                to,
                body,
            },
            Frame::RouteAck {
                user,
                msg_id,
                flags,
            } => FrameRef::RouteAck {
                user,
                msg_id,
                flags: *flags,
            },
            Frame::RouteError {
                user,
                code,
                msg_id,
                reason,
            } => FrameRef::RouteError {
                user,
                code: *code,
                msg_id,
                reason,
            },
            Frame::LinkHello { worker, pid, epoch } => FrameRef::LinkHello {
                worker: *worker,
                pid: *pid,
                epoch: *epoch,
            },
            Frame::ReplHello {
                version,
                node,
                epoch,
                workers,
                flags,
                applied,
            } => FrameRef::ReplHello {
                version: *version,
                node,
                epoch: *epoch,
                workers: *workers,
                flags: *flags,
                applied: StreamLsns::Slice(applied),
            },
            Frame::ReplAppend {
                stream,
                first_lsn,
                records,
            } => FrameRef::ReplAppend {
                stream: *stream,
                first_lsn: *first_lsn,
                records: Records::Owned(records),
            },
            Frame::ReplAck { stream, lsn } => FrameRef::ReplAck {
                stream: *stream,
                lsn: *lsn,
            },
            Frame::ReplHeartbeat { ts_ms, last } => FrameRef::ReplHeartbeat {
                ts_ms: *ts_ms,
                last: StreamLsns::Slice(last),
            },
        }
    }
}

impl FrameRef<'_> {
    pub fn frame_type(&self) -> u8 {
        match self {
            FrameRef::Login { .. } => LOGIN,
            FrameRef::LoginOk { .. } => LOGIN_OK,
            FrameRef::Send { .. } => SEND,
            FrameRef::Ack { .. } => ACK,
            FrameRef::Deliver { .. } => DELIVER,
            FrameRef::DeliverAck { .. } => DELIVER_ACK,
            FrameRef::Ping { .. } => PING,
            FrameRef::Pong { .. } => PONG,
            FrameRef::Error { .. } => ERROR,
            FrameRef::RouteSend { .. } => ROUTE_SEND,
            FrameRef::RouteAck { .. } => ROUTE_ACK,
            FrameRef::RouteError { .. } => ROUTE_ERROR,
            FrameRef::LinkHello { .. } => LINK_HELLO,
            FrameRef::ReplHello { .. } => REPL_HELLO,
            FrameRef::ReplAppend { .. } => REPL_APPEND,
            FrameRef::ReplAck { .. } => REPL_ACK,
            FrameRef::ReplHeartbeat { .. } => REPL_HEARTBEAT,
        }
    }

    pub fn to_owned(&self) -> Frame {
        match *self {
            FrameRef::Login {
                version,
                user,
                token,
                device,
            } => Frame::Login {
                version,
                user: user.to_owned(),
                token: token.to_owned(),
                device: device.to_owned(),
            },
            FrameRef::LoginOk {
                version,
                flags,
                node,
                max_frame,
            } => Frame::LoginOk {
                version,
                flags,
                node: node.to_owned(),
                max_frame,
            },
            FrameRef::Send { msg_id, to, body } => Frame::Send {
                msg_id: msg_id.to_owned(),
                to: to.to_owned(),
                body: body.to_vec(),
            },
            FrameRef::Ack { msg_id, flags } => Frame::Ack {
                msg_id: msg_id.to_owned(),
                flags,
            },
            FrameRef::Deliver {
                tag,
                ts_ms,
                sender,
                msg_id,
                body,
            } => Frame::Deliver {
                tag,
                ts_ms,
                sender: sender.to_owned(),
                msg_id: msg_id.to_owned(),
                body: body.to_vec(),
            },
            FrameRef::DeliverAck { tag } => Frame::DeliverAck { tag },
            FrameRef::Ping { nonce } => Frame::Ping { nonce },
            FrameRef::Pong { nonce } => Frame::Pong { nonce },
            FrameRef::Error {
                code,
                msg_id,
                reason,
            } => Frame::Error {
                code,
                msg_id: msg_id.to_owned(),
                reason: reason.to_owned(),
            },
            FrameRef::RouteSend {
                ts_ms,
                flags,
                sender,
                msg_id,
                to,
                body,
            } => Frame::RouteSend {
                ts_ms,
                flags,
                sender: sender.to_owned(),
                msg_id: msg_id.to_owned(),
                to: to.to_owned(),
                body: body.to_vec(),
            },
            FrameRef::RouteAck {
                user,
                msg_id,
                flags,
            } => Frame::RouteAck {
                user: user.to_owned(),
                msg_id: msg_id.to_owned(),
                flags,
            },
            FrameRef::RouteError {
                user,
                code,
                msg_id,
                reason,
            } => Frame::RouteError {
                user: user.to_owned(),
                code,
                msg_id: msg_id.to_owned(),
                reason: reason.to_owned(),
            },
            FrameRef::LinkHello { worker, pid, epoch } => Frame::LinkHello { worker, pid, epoch },
            FrameRef::ReplHello {
                version,
                node,
                epoch,
                workers,
                flags,
                applied,
            } => Frame::ReplHello {
                version,
                node: node.to_owned(),
                epoch,
                workers,
                flags,
                applied: applied.to_vec(),
            },
            FrameRef::ReplAppend {
                stream,
                first_lsn,
                records,
            } => Frame::ReplAppend {
                stream,
                first_lsn,
                records: records.iter().map(|r| r.to_owned()).collect(),
            },
            FrameRef::ReplAck { stream, lsn } => Frame::ReplAck { stream, lsn },
            FrameRef::ReplHeartbeat { ts_ms, last } => Frame::ReplHeartbeat {
                ts_ms,
                last: last.to_vec(),
            },
        }
    }
}

/// Name of a frame type, for error messages.
pub(crate) fn frame_name(t: u8) -> &'static str {
    type_name(t)
}

fn type_name(t: u8) -> &'static str {
    match t {
        LOGIN => "LOGIN",
        LOGIN_OK => "LOGIN_OK",
        SEND => "SEND",
        ACK => "ACK",
        DELIVER => "DELIVER",
        DELIVER_ACK => "DELIVER_ACK",
        PING => "PING",
        PONG => "PONG",
        ERROR => "ERROR",
        ROUTE_SEND => "ROUTE_SEND",
        ROUTE_ACK => "ROUTE_ACK",
        ROUTE_ERROR => "ROUTE_ERROR",
        LINK_HELLO => "LINK_HELLO",
        REPL_HELLO => "REPL_HELLO",
        REPL_APPEND => "REPL_APPEND",
        REPL_ACK => "REPL_ACK",
        REPL_HEARTBEAT => "REPL_HEARTBEAT",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// A per-frame decode error; `code` is one of the `E_*` protocol codes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    pub code: u16,
    pub reason: String,
}

impl DecodeError {
    fn new(code: u16, reason: String) -> Self {
        DecodeError { code, reason }
    }

    /// FRAME_TOO_LARGE leaves the stream position unknowable, so the connection must end.
    pub fn is_fatal(&self) -> bool {
        self.code == E_FRAME_TOO_LARGE
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (code {})", self.reason, self.code)
    }
}

impl std::error::Error for DecodeError {}

/// Field reader over one frame's payload; errors name the frame type and field
/// so a client author can tell what was wrong from the ERROR reason alone.
pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) pos: usize,
    pub(crate) ftype: u8,
}

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], DecodeError> {
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(DecodeError::new(
                E_BAD_FRAME,
                format!(
                    "{} payload truncated in field {field}: needs {n} bytes, {left} left",
                    type_name(self.ftype)
                ),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], DecodeError> {
        let s = self.take(N, field)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(crate) fn u8(&mut self, field: &str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    fn utf8(&self, raw: &'a [u8], field: &str) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(raw).map_err(|_| {
            DecodeError::new(
                E_BAD_UTF8,
                format!("{} field {field} is not valid UTF-8", type_name(self.ftype)),
            )
        })
    }

    pub(crate) fn str8(&mut self, field: &str) -> Result<&'a str, DecodeError> {
        let n = self.u8(field)? as usize;
        let raw = self.take(n, field)?;
        self.utf8(raw, field)
    }

    fn str16(&mut self, field: &str) -> Result<&'a str, DecodeError> {
        let n = self.u16(field)? as usize;
        let raw = self.take(n, field)?;
        self.utf8(raw, field)
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    fn finish(&self) -> Result<(), DecodeError> {
        let extra = self.buf.len() - self.pos;
        if extra != 0 {
            return Err(DecodeError::new(
                E_BAD_FRAME,
                format!(
                    "{} payload has {extra} trailing bytes after its fields",
                    type_name(self.ftype)
                ),
            ));
        }
        Ok(())
    }
}

/// Parses one client-link frame body: `ftype` is the type byte, `payload`
/// what follows it. Internal frame types are rejected as UNKNOWN_TYPE.
pub fn parse_frame(ftype: u8, payload: &[u8]) -> Result<FrameRef<'_>, DecodeError> {
    parse_frame_on(ftype, payload, false)
}

/// The kind of connection a decoder serves; it decides which frame types exist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinkKind {
    /// Client connection: the client frame types only.
    #[default]
    Client,
    /// Worker-to-worker link: client types plus ROUTE_SEND, ROUTE_ACK,
    /// ROUTE_ERROR and LINK_HELLO.
    Worker,
    /// Replication link between the nodes of a pair: REPL_HELLO, REPL_APPEND,
    /// REPL_ACK and REPL_HEARTBEAT only.
    Repl,
}

impl LinkKind {
    /// True if frames of type `t` may appear on this kind of link.
    pub fn accepts(self, t: u8) -> bool {
        match self {
            LinkKind::Client => !is_internal_type(t) && !is_repl_type(t),
            LinkKind::Worker => !is_repl_type(t),
            LinkKind::Repl => is_repl_type(t),
        }
    }
}

/// Parses one frame body on a link of the given kind: with `internal` the
/// worker-link types (ROUTE_SEND, ROUTE_ACK, ROUTE_ERROR, LINK_HELLO) are
/// accepted too; without it they are unknown types, exactly as any other
/// type byte outside the client table. Replication types are unknown on both.
pub fn parse_frame_on(
    ftype: u8,
    payload: &[u8],
    internal: bool,
) -> Result<FrameRef<'_>, DecodeError> {
    let link = if internal {
        LinkKind::Worker
    } else {
        LinkKind::Client
    };
    parse_frame_link(ftype, payload, link)
}

/// Parses one frame body on a link of kind `link`; a type the link does not
/// carry is UNKNOWN_TYPE whatever its payload.
pub fn parse_frame_link(
    ftype: u8,
    payload: &[u8],
    link: LinkKind,
) -> Result<FrameRef<'_>, DecodeError> {
    if !link.accepts(ftype) {
        return Err(unknown_type(ftype));
    }
    let mut r = Reader {
        buf: payload,
        pos: 0,
        ftype,
    };
    let frame = match ftype {
        REPL_HELLO | REPL_APPEND | REPL_ACK | REPL_HEARTBEAT => repl::parse_repl(&mut r)?,
        LOGIN => FrameRef::Login {
            version: r.u8("version")?,
            user: r.str8("user")?,
            token: r.str16("token")?,
            // Old clients end the frame after the token.
            device: if r.pos < r.buf.len() {
                let device = r.str8("device")?;
                if device.is_empty() {
                    // One encoding per LOGIN: no device is no field, not an empty one.
                    return Err(DecodeError::new(
                        E_BAD_FRAME,
                        "LOGIN field device is empty (a trailing zero byte): omit the field"
                            .to_string(),
                    ));
                }
                device
            } else {
                ""
            },
        },
        LOGIN_OK => FrameRef::LoginOk {
            version: r.u8("version")?,
            flags: r.u8("flags")?,
            node: r.str8("node")?,
            max_frame: r.u32("max_frame")?,
        },
        SEND => FrameRef::Send {
            msg_id: r.str8("msg_id")?,
            to: r.str8("to")?,
            body: r.rest(),
        },
        ACK => FrameRef::Ack {
            msg_id: r.str8("msg_id")?,
            flags: r.u8("flags")?,
        },
        DELIVER => FrameRef::Deliver {
            tag: r.u64("tag")?,
            ts_ms: r.u64("ts_ms")?,
            sender: r.str8("sender")?,
            msg_id: r.str8("msg_id")?,
            body: r.rest(),
        },
        DELIVER_ACK => FrameRef::DeliverAck { tag: r.u64("tag")? },
        PING => FrameRef::Ping {
            nonce: r.u64("nonce")?,
        },
        PONG => FrameRef::Pong {
            nonce: r.u64("nonce")?,
        },
        ERROR => FrameRef::Error {
            code: r.u16("code")?,
            msg_id: r.str8("msg_id")?,
            reason: r.str16("reason")?,
        },
        ROUTE_SEND => FrameRef::RouteSend {
            ts_ms: r.u64("ts_ms")?,
            flags: r.u8("flags")?,
            sender: r.str8("sender")?,
            msg_id: r.str8("msg_id")?,
            to: r.str8("to")?,
            body: r.rest(),
        },
        ROUTE_ACK => FrameRef::RouteAck {
            user: r.str8("user")?,
            msg_id: r.str8("msg_id")?,
            flags: r.u8("flags")?,
        },
        ROUTE_ERROR => FrameRef::RouteError {
            user: r.str8("user")?,
            code: r.u16("code")?,
            msg_id: r.str8("msg_id")?,
            reason: r.str16("reason")?,
        },
        LINK_HELLO => FrameRef::LinkHello {
            worker: r.u16("worker")?,
            pid: r.u32("pid")?,
            epoch: r.u64("epoch")?,
        },
        other => return Err(unknown_type(other)),
    };
    r.finish()?;
    Ok(frame)
}

fn unknown_type(t: u8) -> DecodeError {
    DecodeError::new(E_UNKNOWN_TYPE, format!("unknown frame type 0x{t:02x}"))
}

/// What the header of the next frame says.
enum Header {
    /// Fewer than 4 bytes available.
    Incomplete,
    /// A zero length: report, skip the 4 bytes, go on.
    Empty,
    TooLarge(u32),
    /// Total bytes of the frame including the 4-byte header.
    Frame(usize),
}

/// Incremental frame decoder for one connection.
///
/// Whole frames are parsed straight from the caller's input; only a trailing
/// partial frame is copied into the internal buffer, which therefore never
/// holds more than `max_frame + 4` bytes.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    max_frame: u32,
    poisoned: bool,
    /// Which frame types the link carries.
    link: LinkKind,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder {
    /// A decoder for a client connection (internal frame types are unknown).
    pub fn new(max_frame: u32) -> Self {
        Decoder::with_link(max_frame, false)
    }

    /// A decoder for a worker-to-worker link: accepts client and internal frames.
    pub fn new_internal(max_frame: u32) -> Self {
        Decoder::with_link(max_frame, true)
    }

    /// A decoder for a replication link: accepts the REPL_* frames only.
    pub fn new_repl(max_frame: u32) -> Self {
        Decoder::for_link(max_frame, LinkKind::Repl)
    }

    /// A client (`internal = false`) or worker-link (`internal = true`) decoder.
    pub fn with_link(max_frame: u32, internal: bool) -> Self {
        let link = if internal {
            LinkKind::Worker
        } else {
            LinkKind::Client
        };
        Decoder::for_link(max_frame, link)
    }

    pub fn for_link(max_frame: u32, link: LinkKind) -> Self {
        Decoder {
            buf: Vec::new(),
            max_frame,
            poisoned: false,
            link,
        }
    }

    pub fn link(&self) -> LinkKind {
        self.link
    }

    /// True for a replication-link decoder.
    pub fn repl(&self) -> bool {
        self.link == LinkKind::Repl
    }

    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// True for a worker-link decoder (internal frame types accepted).
    pub fn internal(&self) -> bool {
        self.link == LinkKind::Worker
    }

    /// Bytes of an incomplete frame held back; non-zero at EOF means truncation.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Frees the buffer's memory (keeping any pending bytes) so that an idle
    /// connection costs next to nothing.
    pub fn release(&mut self) {
        self.buf.shrink_to_fit();
    }

    pub fn poisoned(&self) -> bool {
        self.poisoned
    }

    /// Removes and returns the bytes of an incomplete frame, leaving the
    /// decoder empty: they travel with a connection handed to another worker.
    pub fn take_pending(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    fn header(&self, bytes: &[u8]) -> Header {
        if bytes.len() < HEADER_LEN {
            return Header::Incomplete;
        }
        let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if len == 0 {
            Header::Empty
        } else if len > self.max_frame {
            Header::TooLarge(len)
        } else {
            Header::Frame(HEADER_LEN + len as usize)
        }
    }

    fn poison<F>(&mut self, len: u32, sink: &mut F)
    where
        F: FnMut(Result<FrameRef<'_>, DecodeError>),
    {
        self.poisoned = true;
        self.buf = Vec::new();
        sink(Err(DecodeError::new(
            E_FRAME_TOO_LARGE,
            format!("frame length {len} exceeds max_frame {}", self.max_frame),
        )));
    }

    fn empty_frame_error() -> DecodeError {
        DecodeError::new(E_BAD_FRAME, "frame length 0 (no type byte)".to_owned())
    }

    /// Feeds bytes from the socket; `sink` receives every frame (or per-frame
    /// error) completed by them, in stream order. After a FRAME_TOO_LARGE error
    /// the decoder is poisoned and ignores all further input.
    ///
    /// Returns the offset in `input` just past the first well-formed LOGIN
    /// frame this call completed, if any. A connection handed to its user's
    /// home worker takes the bytes after it along exactly as the client sent
    /// them: frames that failed to decode cannot be re-encoded, and the home
    /// worker must answer them itself. (Returned, not stored: a field would
    /// grow every connection's decoder.)
    pub fn feed<F>(&mut self, mut input: &[u8], mut sink: F) -> Option<usize>
    where
        F: FnMut(Result<FrameRef<'_>, DecodeError>),
    {
        if self.poisoned {
            return None;
        }
        let start = input.len();
        let mut login_end = None;
        while !self.buf.is_empty() && !input.is_empty() {
            // Complete the header first: the size check must happen before any
            // body byte is buffered.
            if self.buf.len() < HEADER_LEN {
                let n = (HEADER_LEN - self.buf.len()).min(input.len());
                self.buf.extend_from_slice(&input[..n]);
                input = &input[n..];
            }
            match self.header(&self.buf) {
                Header::Incomplete => return login_end,
                Header::Empty => {
                    self.buf.clear();
                    sink(Err(Self::empty_frame_error()));
                }
                Header::TooLarge(len) => {
                    self.poison(len, &mut sink);
                    return login_end;
                }
                Header::Frame(total) => {
                    let n = (total - self.buf.len()).min(input.len());
                    self.buf.reserve_exact(total - self.buf.len());
                    self.buf.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.buf.len() < total {
                        return login_end;
                    }
                    let r = parse_frame_link(
                        self.buf[HEADER_LEN],
                        &self.buf[HEADER_LEN + 1..],
                        self.link,
                    );
                    if login_end.is_none() && matches!(r, Ok(FrameRef::Login { .. })) {
                        login_end = Some(start - input.len());
                    }
                    sink(r);
                    self.buf.clear();
                }
            }
        }
        loop {
            match self.header(input) {
                Header::Incomplete => {
                    // Exact, so the buffer never exceeds max_frame + 4 even for tiny max_frame.
                    if !input.is_empty() {
                        self.buf.reserve_exact(HEADER_LEN);
                    }
                    break;
                }
                Header::Empty => {
                    input = &input[HEADER_LEN..];
                    sink(Err(Self::empty_frame_error()));
                }
                Header::TooLarge(len) => {
                    self.poison(len, &mut sink);
                    return login_end;
                }
                Header::Frame(total) => {
                    if input.len() < total {
                        self.buf.reserve_exact(total);
                        break;
                    }
                    let r = parse_frame_link(
                        input[HEADER_LEN],
                        &input[HEADER_LEN + 1..total],
                        self.link,
                    );
                    if login_end.is_none() && matches!(r, Ok(FrameRef::Login { .. })) {
                        login_end = Some(start - input.len() + total);
                    }
                    sink(r);
                    input = &input[total..];
                }
            }
        }
        self.buf.extend_from_slice(input);
        login_end
    }

    /// Convenience form of [`Decoder::feed`] returning owned frames.
    pub fn feed_owned(&mut self, input: &[u8]) -> Vec<Result<Frame, DecodeError>> {
        let mut out = Vec::new();
        self.feed(input, |r| out.push(r.map(|f| f.to_owned())));
        out
    }
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EncodeError {
    StringTooLong {
        frame: &'static str,
        field: &'static str,
        len: usize,
        max: usize,
    },
    FrameTooLarge {
        frame: &'static str,
        len: usize,
        max_frame: u32,
    },
    /// A list longer than its count field allows.
    TooManyItems {
        frame: &'static str,
        field: &'static str,
        len: usize,
        max: usize,
    },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::StringTooLong {
                frame,
                field,
                len,
                max,
            } => write!(
                f,
                "{frame} field {field} is {len} bytes of UTF-8, at most {max} allowed"
            ),
            EncodeError::FrameTooLarge {
                frame,
                len,
                max_frame,
            } => write!(
                f,
                "{frame} frame length {len} exceeds max_frame {max_frame}"
            ),
            EncodeError::TooManyItems {
                frame,
                field,
                len,
                max,
            } => write!(
                f,
                "{frame} field {field} has {len} entries, at most {max} allowed"
            ),
        }
    }
}

impl std::error::Error for EncodeError {}

pub(crate) fn check_str(
    frame: &FrameRef<'_>,
    field: &'static str,
    s: &str,
    max: usize,
) -> Result<usize, EncodeError> {
    if s.len() > max {
        return Err(EncodeError::StringTooLong {
            frame: type_name(frame.frame_type()),
            field,
            len: s.len(),
            max,
        });
    }
    Ok(if max == STR8_MAX { 1 } else { 2 } + s.len())
}

/// Total encoded size (header included) of `frame`, validating field limits
/// and `max_frame` so that writing can no longer fail.
pub fn encoded_len(frame: &FrameRef<'_>, max_frame: u32) -> Result<usize, EncodeError> {
    let f = frame;
    let payload = match *frame {
        FrameRef::Login {
            user,
            token,
            device,
            ..
        } => {
            1 + check_str(f, "user", user, STR8_MAX)?
                + check_str(f, "token", token, STR16_MAX)?
                + if device.is_empty() {
                    0
                } else {
                    check_str(f, "device", device, STR8_MAX)?
                }
        }
        FrameRef::LoginOk { node, .. } => 2 + check_str(f, "node", node, STR8_MAX)? + 4,
        FrameRef::Send { msg_id, to, body } => {
            check_str(f, "msg_id", msg_id, STR8_MAX)?
                + check_str(f, "to", to, STR8_MAX)?
                + body.len()
        }
        FrameRef::Ack { msg_id, .. } => check_str(f, "msg_id", msg_id, STR8_MAX)? + 1,
        FrameRef::Deliver {
            sender,
            msg_id,
            body,
            ..
        } => {
            16 + check_str(f, "sender", sender, STR8_MAX)?
                + check_str(f, "msg_id", msg_id, STR8_MAX)?
                + body.len()
        }
        FrameRef::DeliverAck { .. } | FrameRef::Ping { .. } | FrameRef::Pong { .. } => 8,
        FrameRef::Error { msg_id, reason, .. } => {
            2 + check_str(f, "msg_id", msg_id, STR8_MAX)?
                + check_str(f, "reason", reason, STR16_MAX)?
        }
        FrameRef::RouteSend {
            sender,
            msg_id,
            to,
            body,
            ..
        } => {
            9 + check_str(f, "sender", sender, STR8_MAX)?
                + check_str(f, "msg_id", msg_id, STR8_MAX)?
                + check_str(f, "to", to, STR8_MAX)?
                + body.len()
        }
        FrameRef::RouteAck { user, msg_id, .. } => {
            check_str(f, "user", user, STR8_MAX)? + check_str(f, "msg_id", msg_id, STR8_MAX)? + 1
        }
        FrameRef::RouteError {
            user,
            msg_id,
            reason,
            ..
        } => {
            check_str(f, "user", user, STR8_MAX)?
                + 2
                + check_str(f, "msg_id", msg_id, STR8_MAX)?
                + check_str(f, "reason", reason, STR16_MAX)?
        }
        FrameRef::LinkHello { .. } => 2 + 4 + 8,
        FrameRef::ReplHello { .. }
        | FrameRef::ReplAppend { .. }
        | FrameRef::ReplAck { .. }
        | FrameRef::ReplHeartbeat { .. } => repl::repl_payload_len(frame)?,
    };
    let len = 1 + payload;
    if len > max_frame as usize {
        return Err(EncodeError::FrameTooLarge {
            frame: type_name(frame.frame_type()),
            len,
            max_frame,
        });
    }
    Ok(HEADER_LEN + len)
}

/// Cursor over a pre-sized output slice; the caller sized it with
/// [`encoded_len`], so running out of room is a bug and panics.
pub(crate) struct Writer<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.out[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }

    pub(crate) fn str8(&mut self, s: &str) {
        self.u8(s.len() as u8);
        self.bytes(s.as_bytes());
    }

    fn str16(&mut self, s: &str) {
        self.bytes(&(s.len() as u16).to_be_bytes());
        self.bytes(s.as_bytes());
    }
}

/// Writes `frame` into `out`, which must be exactly `encoded_len(frame)` bytes.
pub fn write_frame(frame: &FrameRef<'_>, out: &mut [u8]) {
    let mut w = Writer { out, pos: 0 };
    w.bytes(&((w.out.len() - HEADER_LEN) as u32).to_be_bytes());
    w.u8(frame.frame_type());
    match *frame {
        FrameRef::Login {
            version,
            user,
            token,
            device,
        } => {
            w.u8(version);
            w.str8(user);
            w.str16(token);
            if !device.is_empty() {
                w.str8(device);
            }
        }
        FrameRef::LoginOk {
            version,
            flags,
            node,
            max_frame,
        } => {
            w.u8(version);
            w.u8(flags);
            w.str8(node);
            w.bytes(&max_frame.to_be_bytes());
        }
        FrameRef::Send { msg_id, to, body } => {
            w.str8(msg_id);
            w.str8(to);
            w.bytes(body);
        }
        FrameRef::Ack { msg_id, flags } => {
            w.str8(msg_id);
            w.u8(flags);
        }
        FrameRef::Deliver {
            tag,
            ts_ms,
            sender,
            msg_id,
            body,
        } => {
            w.bytes(&tag.to_be_bytes());
            w.bytes(&ts_ms.to_be_bytes());
            w.str8(sender);
            w.str8(msg_id);
            w.bytes(body);
        }
        FrameRef::DeliverAck { tag } => w.bytes(&tag.to_be_bytes()),
        FrameRef::Ping { nonce } | FrameRef::Pong { nonce } => w.bytes(&nonce.to_be_bytes()),
        FrameRef::Error {
            code,
            msg_id,
            reason,
        } => {
            w.bytes(&code.to_be_bytes());
            w.str8(msg_id);
            w.str16(reason);
        }
        FrameRef::RouteSend {
            ts_ms,
            flags,
            sender,
            msg_id,
            to,
            body,
        } => {
            w.bytes(&ts_ms.to_be_bytes());
            w.u8(flags);
            w.str8(sender);
            w.str8(msg_id);
            w.str8(to);
            w.bytes(body);
        }
        FrameRef::RouteAck {
            user,
            msg_id,
            flags,
        } => {
            w.str8(user);
            w.str8(msg_id);
            w.u8(flags);
        }
        FrameRef::RouteError {
            user,
            code,
            msg_id,
            reason,
        } => {
            w.str8(user);
            w.bytes(&code.to_be_bytes());
            w.str8(msg_id);
            w.str16(reason);
        }
        FrameRef::LinkHello { worker, pid, epoch } => {
            w.bytes(&worker.to_be_bytes());
            w.bytes(&pid.to_be_bytes());
            w.bytes(&epoch.to_be_bytes());
        }
        FrameRef::ReplHello { .. }
        | FrameRef::ReplAppend { .. }
        | FrameRef::ReplAck { .. }
        | FrameRef::ReplHeartbeat { .. } => repl::write_repl(frame, &mut w),
    }
    debug_assert_eq!(w.pos, w.out.len(), "encoded_len disagrees with write_frame");
}

/// Encodes one frame (header included).
pub fn encode(frame: &FrameRef<'_>, max_frame: u32) -> Result<Vec<u8>, EncodeError> {
    let mut out = vec![0u8; encoded_len(frame, max_frame)?];
    write_frame(frame, &mut out);
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {

    #[test]
    fn feed_returns_the_offset_past_the_first_good_login() {
        let login = |user: &str| {
            encode(
                &FrameRef::Login {
                    version: 1,
                    user,
                    token: "",
                    device: "",
                },
                DEFAULT_MAX_FRAME,
            )
            .unwrap()
        };
        let ping = encode(&FrameRef::Ping { nonce: 1 }, DEFAULT_MAX_FRAME).unwrap();
        // A LOGIN with invalid UTF-8 in its user id: a decode error, not a LOGIN.
        let mut bad = login("x");
        let at = bad.len() - 3;
        bad[at] = 0xff;
        let first = login("alice");
        let mut d = Decoder::new(DEFAULT_MAX_FRAME);
        // The first good LOGIN starts in one feed and ends in the next.
        let input = [ping.clone(), bad, first[..3].to_vec()].concat();
        let mut errors = 0;
        let end = d.feed(&input, |r| errors += usize::from(r.is_err()));
        assert_eq!((errors, end), (1, None));
        let input = [first[3..].to_vec(), login("bob"), ping.clone(), vec![0, 0]].concat();
        assert_eq!(d.feed(&input, |_| {}), Some(first.len() - 3));
        // Whole in one feed, after another frame; then a feed without LOGIN.
        let mut d = Decoder::new(DEFAULT_MAX_FRAME);
        let input = [ping.clone(), first.clone(), ping.clone()].concat();
        assert_eq!(d.feed(&input, |_| {}), Some(ping.len() + first.len()));
        assert_eq!(d.feed(&ping, |_| {}), None);
    }

    #[test]
    fn take_pending_returns_the_partial_frame_and_empties_the_decoder() {
        let mut d = Decoder::new(DEFAULT_MAX_FRAME);
        let frame = encode(&FrameRef::Ping { nonce: 7 }, DEFAULT_MAX_FRAME).unwrap();
        let mut n = 0;
        d.feed(&frame[..5], |_| n += 1);
        assert_eq!(n, 0);
        assert_eq!(d.take_pending(), frame[..5].to_vec());
        assert_eq!(d.pending(), 0);
        assert_eq!(d.buffer_capacity(), 0);
    }

    use super::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Login {
                version: 1,
                user: "alice".into(),
                token: "tok.en".into(),
                device: String::new(),
            },
            Frame::Login {
                version: 1,
                user: "alice".into(),
                token: "tok.en".into(),
                device: "laptop".into(),
            },
            Frame::LoginOk {
                version: 1,
                flags: 1,
                node: "n1".into(),
                max_frame: 65536,
            },
            Frame::Send {
                msg_id: "m1".into(),
                to: "bob".into(),
                body: b"hello".to_vec(),
            },
            Frame::Send {
                msg_id: "".into(),
                to: "bob".into(),
                body: vec![],
            },
            Frame::Ack {
                msg_id: "m1".into(),
                flags: ACK_STORED | ACK_DEGRADED,
            },
            Frame::Deliver {
                tag: 7,
                ts_ms: 1_700_000_000_000,
                sender: "alice".into(),
                msg_id: "m1".into(),
                body: vec![0, 1, 2, 255],
            },
            Frame::DeliverAck { tag: u64::MAX },
            Frame::Ping { nonce: 42 },
            Frame::Pong { nonce: 42 },
            Frame::Error {
                code: 9,
                msg_id: "m1".into(),
                reason: "mailbox full ✓".into(),
            },
        ]
    }

    fn enc(f: &Frame) -> Vec<u8> {
        encode(&f.as_ref(), DEFAULT_MAX_FRAME).unwrap()
    }

    /// Builds a raw frame from a type byte and payload, bypassing the encoder.
    pub(crate) fn raw(t: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
        v.push(t);
        v.extend_from_slice(payload);
        v
    }

    fn decode_all(input: &[u8]) -> Vec<Result<Frame, DecodeError>> {
        Decoder::default().feed_owned(input)
    }

    fn single_error(input: &[u8]) -> DecodeError {
        let out = decode_all(input);
        assert_eq!(out.len(), 1, "{out:?}");
        out.into_iter().next().unwrap().unwrap_err()
    }

    #[test]
    fn wire_layout_matches_spec() {
        let f = Frame::Send {
            msg_id: "ab".into(),
            to: "c".into(),
            body: b"xy".to_vec(),
        };
        assert_eq!(
            enc(&f),
            vec![0, 0, 0, 8, SEND, 2, b'a', b'b', 1, b'c', b'x', b'y']
        );
        assert_eq!(
            enc(&Frame::Ping { nonce: 0x0102 }),
            vec![0, 0, 0, 9, PING, 0, 0, 0, 0, 0, 0, 1, 2]
        );
    }

    #[test]
    fn roundtrip_every_type() {
        for f in samples() {
            assert_eq!(decode_all(&enc(&f)), vec![Ok(f.clone())]);
        }
    }

    #[test]
    fn split_at_every_boundary_matches_whole() {
        let mut all = Vec::new();
        for f in samples() {
            all.extend(enc(&f));
        }
        all.extend([0, 0, 0, 0]);
        all.extend(raw(0x42, b"junk"));
        let whole = decode_all(&all);
        assert_eq!(whole.len(), samples().len() + 2);
        for i in 0..=all.len() {
            for j in i..=all.len() {
                let mut d = Decoder::default();
                let mut out = d.feed_owned(&all[..i]);
                out.extend(d.feed_owned(&all[i..j]));
                out.extend(d.feed_owned(&all[j..]));
                assert_eq!(out, whole, "split at {i},{j}");
                assert_eq!(d.pending(), 0);
            }
        }
        let mut d = Decoder::default();
        let mut out = Vec::new();
        for b in &all {
            out.extend(d.feed_owned(std::slice::from_ref(b)));
        }
        assert_eq!(out, whole);
    }

    #[test]
    fn zero_length_is_bad_frame_and_decoding_continues() {
        let mut input = vec![0, 0, 0, 0];
        input.extend(enc(&Frame::Ping { nonce: 1 }));
        let out = decode_all(&input);
        assert_eq!(out[0].as_ref().unwrap_err().code, E_BAD_FRAME);
        assert_eq!(out[1], Ok(Frame::Ping { nonce: 1 }));
    }

    #[test]
    fn too_large_poisons_before_body_arrives() {
        let mut d = Decoder::new(65536);
        assert!(d.feed_owned(&[0, 1]).is_empty());
        let out = d.feed_owned(&[0x11, 0x70]); // 70000
        assert_eq!(out.len(), 1);
        let e = out[0].as_ref().unwrap_err();
        assert_eq!(e.code, E_FRAME_TOO_LARGE);
        assert!(e.is_fatal());
        assert_eq!(e.reason, "frame length 70000 exceeds max_frame 65536");
        assert!(d.poisoned());
        assert_eq!(d.pending(), 0);
        assert_eq!(d.buffer_capacity(), 0);
        // Poisoned stays poisoned, even for perfectly valid input.
        assert!(d.feed_owned(&enc(&Frame::Ping { nonce: 1 })).is_empty());
        assert!(d.feed_owned(&[0, 0, 0, 0]).is_empty());
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn too_large_in_direct_path_after_good_frames() {
        let mut input = enc(&Frame::Ping { nonce: 1 });
        input.extend([0, 0, 0, 11, PING]);
        input.extend(enc(&Frame::Ping { nonce: 2 }));
        let mut d = Decoder::new(10);
        let out = d.feed_owned(&input);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], Ok(Frame::Ping { nonce: 1 }));
        assert_eq!(out[1].as_ref().unwrap_err().code, E_FRAME_TOO_LARGE);
        assert!(d.poisoned());
    }

    #[test]
    fn max_frame_boundary_is_inclusive() {
        let f = Frame::Ping { nonce: 3 };
        let mut d = Decoder::new(9);
        assert_eq!(d.feed_owned(&enc(&f)), vec![Ok(f)]);
        assert!(!d.poisoned());
    }

    #[test]
    fn unknown_type_is_skipped() {
        for t in [0u8, 10, 0x42, 255] {
            let mut input = raw(t, b"abc");
            input.extend(enc(&Frame::Pong { nonce: 5 }));
            let out = decode_all(&input);
            let e = out[0].as_ref().unwrap_err();
            assert_eq!(e.code, E_UNKNOWN_TYPE);
            assert!(e.reason.contains(&format!("0x{t:02x}")));
            assert_eq!(out[1], Ok(Frame::Pong { nonce: 5 }));
        }
    }

    #[test]
    fn every_truncation_of_every_type_is_bad_frame() {
        for f in samples() {
            let bytes = enc(&f);
            let (t, payload) = (bytes[4], &bytes[5..]);
            // For SEND/DELIVER the body is `rest`, so cutting into it is still valid;
            // only cuts inside the fixed fields and strings must fail.
            let fixed = match &f {
                Frame::Send { body, .. } | Frame::Deliver { body, .. } => {
                    payload.len() - body.len()
                }
                _ => payload.len(),
            };
            for cut in 0..fixed {
                if let Frame::Login { device, .. } = &f {
                    if !device.is_empty() && cut == fixed - 1 - device.len() {
                        continue; // an old client's LOGIN: the device field is optional
                    }
                }
                let e = single_error(&raw(t, &payload[..cut]));
                assert_eq!(e.code, E_BAD_FRAME, "{f:?} cut at {cut}: {e:?}");
                assert!(e.reason.contains("truncated"), "{}", e.reason);
            }
        }
    }

    #[test]
    fn str_length_past_end_is_bad_frame() {
        let e = single_error(&raw(SEND, &[200, b'a', b'b']));
        assert_eq!(e.code, E_BAD_FRAME);
        assert!(e.reason.contains("msg_id"), "{}", e.reason);
    }

    #[test]
    fn trailing_bytes_after_fixed_fields_is_bad_frame() {
        for f in samples() {
            if matches!(f, Frame::Send { .. } | Frame::Deliver { .. }) {
                continue;
            }
            let bytes = enc(&f);
            let mut payload = bytes[5..].to_vec();
            payload.push(0);
            let e = single_error(&raw(bytes[4], &payload));
            assert_eq!(e.code, E_BAD_FRAME, "{f:?}");
            assert!(e.reason.contains("trailing"), "{}", e.reason);
        }
        assert_eq!(single_error(&raw(PING, &[0; 9])).code, E_BAD_FRAME);
        assert_eq!(single_error(&raw(DELIVER_ACK, &[0; 7])).code, E_BAD_FRAME);
        assert_eq!(single_error(&raw(DELIVER_ACK, &[0; 9])).code, E_BAD_FRAME);
    }

    #[test]
    fn bad_utf8_in_every_string_field() {
        // Placeholder that no other field of these frames encodes to; patched to invalid bytes.
        let bad = "\u{7f}\u{7f}";
        let cases: Vec<(Frame, &str)> = vec![
            (
                Frame::Login {
                    version: 1,
                    user: bad.into(),
                    token: "t".into(),
                    device: String::new(),
                },
                "user",
            ),
            (
                Frame::Login {
                    version: 1,
                    user: "u".into(),
                    token: bad.into(),
                    device: String::new(),
                },
                "token",
            ),
            (
                Frame::LoginOk {
                    version: 1,
                    flags: 0,
                    node: bad.into(),
                    max_frame: 1,
                },
                "node",
            ),
            (
                Frame::Send {
                    msg_id: bad.into(),
                    to: "b".into(),
                    body: vec![],
                },
                "msg_id",
            ),
            (
                Frame::Send {
                    msg_id: "m".into(),
                    to: bad.into(),
                    body: vec![],
                },
                "to",
            ),
            (
                Frame::Ack {
                    msg_id: bad.into(),
                    flags: 0,
                },
                "msg_id",
            ),
            (
                Frame::Deliver {
                    tag: 1,
                    ts_ms: 2,
                    sender: bad.into(),
                    msg_id: "m".into(),
                    body: vec![],
                },
                "sender",
            ),
            (
                Frame::Deliver {
                    tag: 1,
                    ts_ms: 2,
                    sender: "s".into(),
                    msg_id: bad.into(),
                    body: vec![],
                },
                "msg_id",
            ),
            (
                Frame::Error {
                    code: 1,
                    msg_id: bad.into(),
                    reason: "r".into(),
                },
                "msg_id",
            ),
            (
                Frame::Error {
                    code: 1,
                    msg_id: "m".into(),
                    reason: bad.into(),
                },
                "reason",
            ),
        ];
        for (f, field) in cases {
            let mut bytes = enc(&f);
            let pos = bytes.windows(2).position(|w| w == [0x7f, 0x7f]).unwrap();
            bytes[pos] = 0xff;
            bytes[pos + 1] = 0xfe;
            let e = single_error(&bytes);
            assert_eq!(e.code, E_BAD_UTF8, "{f:?}");
            assert!(e.reason.contains(field), "{}", e.reason);
        }
    }

    #[test]
    fn rest_body_may_be_empty_or_binary() {
        let f = Frame::Deliver {
            tag: 1,
            ts_ms: 1,
            sender: "s".into(),
            msg_id: "m".into(),
            body: vec![0xff, 0xfe, 0],
        };
        assert_eq!(decode_all(&enc(&f)), vec![Ok(f)]);
    }

    #[test]
    fn pending_counts_partial_frame_and_release_frees_capacity() {
        let bytes = enc(&samples()[2]);
        let mut d = Decoder::default();
        assert!(d.feed_owned(&bytes[..6]).is_empty());
        assert_eq!(d.pending(), 6);
        assert!(d.buffer_capacity() >= bytes.len());
        assert_eq!(d.feed_owned(&bytes[6..]).len(), 1);
        assert_eq!(d.pending(), 0);
        assert!(d.buffer_capacity() > 0);
        d.release();
        assert_eq!(d.buffer_capacity(), 0);
        // A released decoder keeps working.
        assert_eq!(d.feed_owned(&bytes).len(), 1);
    }

    #[test]
    fn release_keeps_pending_bytes() {
        let bytes = enc(&samples()[0]);
        let mut d = Decoder::default();
        d.feed_owned(&bytes[..3]);
        d.release();
        assert_eq!(d.pending(), 3);
        assert_eq!(d.feed_owned(&bytes[3..]), vec![Ok(samples()[0].clone())]);
    }

    #[test]
    fn encoder_rejects_oversize_strings() {
        let long8 = "x".repeat(256);
        let f = Frame::Send {
            msg_id: long8.clone(),
            to: "b".into(),
            body: vec![],
        };
        let e = encode(&f.as_ref(), u32::MAX).unwrap_err();
        assert!(matches!(
            e,
            EncodeError::StringTooLong {
                field: "msg_id",
                len: 256,
                max: 255,
                ..
            }
        ));
        assert!(e.to_string().contains("msg_id"));
        let ok = Frame::Send {
            msg_id: "x".repeat(255),
            to: "b".into(),
            body: vec![],
        };
        assert!(encode(&ok.as_ref(), u32::MAX).is_ok());
        let f = Frame::Error {
            code: 1,
            msg_id: "".into(),
            reason: "r".repeat(65536),
        };
        assert!(matches!(
            encode(&f.as_ref(), u32::MAX),
            Err(EncodeError::StringTooLong {
                field: "reason",
                ..
            })
        ));
        let f = Frame::Login {
            version: 1,
            user: "u".into(),
            token: "t".repeat(65535),
            device: String::new(),
        };
        assert!(encode(&f.as_ref(), u32::MAX).is_ok());
    }

    #[test]
    fn encoder_rejects_frames_over_max_frame() {
        let f = Frame::Send {
            msg_id: "m".into(),
            to: "t".into(),
            body: vec![0; 100],
        };
        // length = 1 + (1+1) + (1+1) + 100 = 105
        assert_eq!(encode(&f.as_ref(), 105).unwrap().len(), 109);
        let e = encode(&f.as_ref(), 104).unwrap_err();
        assert_eq!(
            e,
            EncodeError::FrameTooLarge {
                frame: "SEND",
                len: 105,
                max_frame: 104
            }
        );
        assert_eq!(e.to_string(), "SEND frame length 105 exceeds max_frame 104");
    }

    // -----------------------------------------------------------------------
    // Internal (worker-link) frames
    // -----------------------------------------------------------------------

    fn internal_samples() -> Vec<Frame> {
        vec![
            Frame::RouteSend {
                ts_ms: 1_700_000_000_000,
                flags: ROUTE_FLAG_REPLAY,
                sender: "alice".into(),
                msg_id: "m1".into(),
                to: "bob".into(),
                body: vec![0, 1, 2, 255],
            },
            Frame::RouteSend {
                ts_ms: 0,
                flags: 0,
                sender: "".into(),
                msg_id: "".into(),
                to: "".into(),
                body: vec![],
            },
            Frame::RouteAck {
                user: "alice".into(),
                msg_id: "m1".into(),
                flags: ACK_STORED | ACK_DUPLICATE,
            },
            Frame::RouteError {
                user: "alice".into(),
                code: 9,
                msg_id: "m1".into(),
                reason: "mailbox full ✓".into(),
            },
            Frame::LinkHello {
                worker: 0xfffe,
                pid: 0x0102_0304,
                epoch: u64::MAX,
            },
        ]
    }

    fn decode_internal(input: &[u8]) -> Vec<Result<Frame, DecodeError>> {
        Decoder::new_internal(DEFAULT_MAX_FRAME).feed_owned(input)
    }

    fn single_internal_error(input: &[u8]) -> DecodeError {
        let out = decode_internal(input);
        assert_eq!(out.len(), 1, "{out:?}");
        out.into_iter().next().unwrap().unwrap_err()
    }

    #[test]
    fn decoder_link_kind_and_size() {
        assert!(!Decoder::default().internal());
        assert!(!Decoder::new(10).internal());
        assert!(Decoder::new_internal(10).internal());
        assert!(Decoder::with_link(10, true).internal());
        // The link flag fits in the padding: a decoder stays 32 bytes.
        assert!(std::mem::size_of::<Decoder>() <= 32);
    }

    #[test]
    fn internal_wire_layout_matches_spec() {
        let f = Frame::RouteAck {
            user: "u".into(),
            msg_id: "ab".into(),
            flags: 3,
        };
        assert_eq!(
            enc(&f),
            vec![0, 0, 0, 7, ROUTE_ACK, 1, b'u', 2, b'a', b'b', 3]
        );
        let f = Frame::LinkHello {
            worker: 0x0102,
            pid: 0x0304_0506,
            epoch: 7,
        };
        assert_eq!(
            enc(&f),
            vec![0, 0, 0, 15, LINK_HELLO, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0, 0, 7]
        );
        let f = Frame::RouteSend {
            ts_ms: 1,
            flags: ROUTE_FLAG_REPLAY,
            sender: "s".into(),
            msg_id: "m".into(),
            to: "t".into(),
            body: b"xy".to_vec(),
        };
        let mut want = vec![0, 0, 0, 18, ROUTE_SEND, 0, 0, 0, 0, 0, 0, 0, 1, 1];
        want.extend([1, b's', 1, b'm', 1, b't', b'x', b'y']);
        assert_eq!(enc(&f), want);
        let f = Frame::RouteError {
            user: "u".into(),
            code: 0x0102,
            msg_id: "m".into(),
            reason: "r".into(),
        };
        assert_eq!(
            enc(&f),
            vec![0, 0, 0, 10, ROUTE_ERROR, 1, b'u', 1, 2, 1, b'm', 0, 1, b'r']
        );
    }

    #[test]
    fn internal_types_roundtrip_on_internal_decoder() {
        for f in internal_samples() {
            assert_eq!(decode_internal(&enc(&f)), vec![Ok(f.clone())]);
        }
        // An internal link still speaks every client frame type.
        for f in samples() {
            assert_eq!(decode_internal(&enc(&f)), vec![Ok(f.clone())]);
        }
    }

    #[test]
    fn internal_batch_split_everywhere_matches_whole() {
        let mut all = Vec::new();
        for f in internal_samples().into_iter().chain(samples()) {
            all.extend(enc(&f));
        }
        let whole = decode_internal(&all);
        assert!(whole.iter().all(Result::is_ok));
        for i in 0..=all.len() {
            let mut d = Decoder::new_internal(DEFAULT_MAX_FRAME);
            let mut out = d.feed_owned(&all[..i]);
            out.extend(d.feed_owned(&all[i..]));
            assert_eq!(out, whole, "split at {i}");
        }
    }

    #[test]
    fn client_decoder_rejects_internal_types_as_unknown() {
        for f in internal_samples() {
            let bytes = enc(&f);
            let t = bytes[4];
            assert!(is_internal_type(t));
            // Exactly the error any unknown type gets, for whole and split input.
            let want = DecodeError::new(E_UNKNOWN_TYPE, format!("unknown frame type 0x{t:02x}"));
            let mut input = bytes.clone();
            input.extend(enc(&Frame::Pong { nonce: 5 }));
            let out = decode_all(&input);
            assert_eq!(out, vec![Err(want.clone()), Ok(Frame::Pong { nonce: 5 })]);
            let mut d = Decoder::default();
            let mut out = d.feed_owned(&input[..3]);
            out.extend(d.feed_owned(&input[3..]));
            assert_eq!(out, vec![Err(want.clone()), Ok(Frame::Pong { nonce: 5 })]);
            // Even malformed payloads report UNKNOWN_TYPE, never a field error.
            assert_eq!(single_error(&raw(t, &[])), want);
            assert_eq!(single_error(&raw(t, &[0xff; 3])), want);
            assert_eq!(parse_frame(t, &bytes[5..]), Err(want.clone()));
            assert_eq!(parse_frame_on(t, &bytes[5..], false), Err(want));
            assert!(parse_frame_on(t, &bytes[5..], true).is_ok());
        }
        for t in [0x40u8, 0x45] {
            assert!(!is_internal_type(t));
            assert_eq!(single_internal_error(&raw(t, b"x")).code, E_UNKNOWN_TYPE);
        }
    }

    #[test]
    fn internal_truncations_are_bad_frame() {
        for f in internal_samples() {
            let bytes = enc(&f);
            let (t, payload) = (bytes[4], &bytes[5..]);
            let fixed = match &f {
                Frame::RouteSend { body, .. } => payload.len() - body.len(),
                _ => payload.len(),
            };
            for cut in 0..fixed {
                let e = single_internal_error(&raw(t, &payload[..cut]));
                assert_eq!(e.code, E_BAD_FRAME, "{f:?} cut at {cut}: {e:?}");
                assert!(e.reason.contains("truncated"), "{}", e.reason);
                assert!(e.reason.starts_with(type_name(t)), "{}", e.reason);
            }
        }
    }

    #[test]
    fn internal_trailing_bytes_are_bad_frame() {
        for f in internal_samples() {
            if matches!(f, Frame::RouteSend { .. }) {
                continue;
            }
            let bytes = enc(&f);
            let mut payload = bytes[5..].to_vec();
            payload.push(0);
            let e = single_internal_error(&raw(bytes[4], &payload));
            assert_eq!(e.code, E_BAD_FRAME, "{f:?}");
            assert!(e.reason.contains("trailing"), "{}", e.reason);
        }
        assert_eq!(
            single_internal_error(&raw(LINK_HELLO, &[0; 13])).code,
            E_BAD_FRAME
        );
        assert_eq!(
            single_internal_error(&raw(LINK_HELLO, &[0; 15])).code,
            E_BAD_FRAME
        );
    }

    #[test]
    fn internal_bad_utf8_in_every_string_field() {
        let bad = "\u{7f}\u{7f}";
        let send = |sender: &str, msg_id: &str, to: &str| Frame::RouteSend {
            ts_ms: 1,
            flags: 0,
            sender: sender.into(),
            msg_id: msg_id.into(),
            to: to.into(),
            body: vec![],
        };
        let cases: Vec<(Frame, &str)> = vec![
            (send(bad, "m", "t"), "sender"),
            (send("s", bad, "t"), "msg_id"),
            (send("s", "m", bad), "to"),
            (
                Frame::RouteAck {
                    user: bad.into(),
                    msg_id: "m".into(),
                    flags: 0,
                },
                "user",
            ),
            (
                Frame::RouteAck {
                    user: "u".into(),
                    msg_id: bad.into(),
                    flags: 0,
                },
                "msg_id",
            ),
            (
                Frame::RouteError {
                    user: bad.into(),
                    code: 1,
                    msg_id: "m".into(),
                    reason: "r".into(),
                },
                "user",
            ),
            (
                Frame::RouteError {
                    user: "u".into(),
                    code: 1,
                    msg_id: bad.into(),
                    reason: "r".into(),
                },
                "msg_id",
            ),
            (
                Frame::RouteError {
                    user: "u".into(),
                    code: 1,
                    msg_id: "m".into(),
                    reason: bad.into(),
                },
                "reason",
            ),
        ];
        for (f, field) in cases {
            let mut bytes = enc(&f);
            let pos = bytes.windows(2).position(|w| w == [0x7f, 0x7f]).unwrap();
            bytes[pos] = 0xff;
            bytes[pos + 1] = 0xfe;
            let e = single_internal_error(&bytes);
            assert_eq!(e.code, E_BAD_UTF8, "{f:?}");
            assert!(e.reason.contains(field), "{}", e.reason);
            // A client decoder never looks at the payload.
            assert_eq!(single_error(&bytes).code, E_UNKNOWN_TYPE);
        }
    }

    #[test]
    fn internal_encoder_checks_limits() {
        let long = "x".repeat(256);
        let f = Frame::RouteSend {
            ts_ms: 0,
            flags: 0,
            sender: "s".into(),
            msg_id: "m".into(),
            to: long.clone(),
            body: vec![],
        };
        assert!(matches!(
            encode(&f.as_ref(), u32::MAX),
            Err(EncodeError::StringTooLong {
                frame: "ROUTE_SEND",
                field: "to",
                ..
            })
        ));
        let f = Frame::RouteAck {
            user: long,
            msg_id: "m".into(),
            flags: 0,
        };
        assert!(matches!(
            encode(&f.as_ref(), u32::MAX),
            Err(EncodeError::StringTooLong {
                frame: "ROUTE_ACK",
                field: "user",
                ..
            })
        ));
        let f = Frame::RouteError {
            user: "u".into(),
            code: 1,
            msg_id: "".into(),
            reason: "r".repeat(65536),
        };
        assert!(matches!(
            encode(&f.as_ref(), u32::MAX),
            Err(EncodeError::StringTooLong {
                field: "reason",
                ..
            })
        ));
        let f = Frame::LinkHello {
            worker: 1,
            pid: 2,
            epoch: 3,
        };
        assert_eq!(encode(&f.as_ref(), 15).unwrap().len(), 19);
        assert_eq!(
            encode(&f.as_ref(), 14).unwrap_err().to_string(),
            "LINK_HELLO frame length 15 exceeds max_frame 14"
        );
    }

    #[test]
    fn pending_buffer_is_bounded() {
        let mut d = Decoder::new(100);
        let mut input = vec![0, 0, 0, 100, PING];
        input.extend([0; 98]);
        d.feed_owned(&input);
        assert_eq!(d.pending(), 103);
        assert_eq!(d.feed_owned(&[0]).len(), 1); // BAD_FRAME: PING with 99 bytes
        assert_eq!(d.pending(), 0);
    }
}
