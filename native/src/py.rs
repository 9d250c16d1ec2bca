//! Python bindings. Frames cross the boundary as plain tuples whose first item
//! is the frame type, and a whole `feed` / `encode_batch` crosses at once, so
//! the per-frame cost stays in Rust.

use pyo3::buffer::PyBuffer;
use pyo3::conversion::FromPyObjectBound;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use pyo3::{Borrowed, FromPyObject};

use crate::batch::{batch_len, write_batch};
use crate::dedup;
use crate::frame::{
    self, encoded_len, write_frame, DecodeError, FrameRef, LinkKind, DEFAULT_MAX_FRAME,
};
use crate::repl::{self, RecordRef, Records, StreamLsns};

/// Type tag of the `(DECODE_ERROR, code, reason)` tuples `Decoder.feed` yields.
const DECODE_ERROR: u8 = 0;

fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".to_owned())
}

// ---------------------------------------------------------------------------
// Rust frame -> Python tuple
// ---------------------------------------------------------------------------

fn frame_to_py<'py>(py: Python<'py>, f: &FrameRef<'_>) -> PyResult<Bound<'py, PyTuple>> {
    use frame::*;
    match *f {
        FrameRef::Login {
            version,
            user,
            token,
            device,
        } => {
            if device.is_empty() {
                (LOGIN, version, user, token).into_pyobject(py)
            } else {
                (LOGIN, version, user, token, device).into_pyobject(py)
            }
        }
        FrameRef::LoginOk {
            version,
            flags,
            node,
            max_frame,
        } => (LOGIN_OK, version, flags, node, max_frame).into_pyobject(py),
        FrameRef::Send { msg_id, to, body } => {
            (SEND, msg_id, to, PyBytes::new(py, body)).into_pyobject(py)
        }
        FrameRef::Ack { msg_id, flags } => (ACK, msg_id, flags).into_pyobject(py),
        FrameRef::Deliver {
            tag,
            ts_ms,
            sender,
            msg_id,
            body,
        } => (DELIVER, tag, ts_ms, sender, msg_id, PyBytes::new(py, body)).into_pyobject(py),
        FrameRef::DeliverAck { tag } => (DELIVER_ACK, tag).into_pyobject(py),
        FrameRef::Ping { nonce } => (PING, nonce).into_pyobject(py),
        FrameRef::Pong { nonce } => (PONG, nonce).into_pyobject(py),
        FrameRef::Error {
            code,
            msg_id,
            reason,
        } => (ERROR, code, msg_id, reason).into_pyobject(py),
        FrameRef::RouteSend {
            ts_ms,
            flags,
            sender,
            msg_id,
            to,
            body,
        } => (
            ROUTE_SEND,
            ts_ms,
            flags,
            sender,
            msg_id,
            to,
            PyBytes::new(py, body),
        )
            .into_pyobject(py),
        FrameRef::RouteAck {
            user,
            msg_id,
            flags,
        } => (ROUTE_ACK, user, msg_id, flags).into_pyobject(py),
        FrameRef::RouteError {
            user,
            code,
            msg_id,
            reason,
        } => (ROUTE_ERROR, user, code, msg_id, reason).into_pyobject(py),
        FrameRef::LinkHello { worker, pid, epoch } => {
            (LINK_HELLO, worker, pid, epoch).into_pyobject(py)
        }
        FrameRef::ReplHello {
            version,
            node,
            epoch,
            workers,
            flags,
            applied,
        } => (
            REPL_HELLO,
            version,
            node,
            epoch,
            workers,
            flags,
            lsns_to_py(py, applied)?,
        )
            .into_pyobject(py),
        FrameRef::ReplAppend {
            stream,
            first_lsn,
            records,
        } => {
            let items = records
                .iter()
                .map(|r| record_to_py(py, &r))
                .collect::<PyResult<Vec<_>>>()?;
            (REPL_APPEND, stream, first_lsn, PyList::new(py, items)?).into_pyobject(py)
        }
        FrameRef::ReplAck { stream, lsn } => (REPL_ACK, stream, lsn).into_pyobject(py),
        FrameRef::ReplHeartbeat { ts_ms, last } => {
            (REPL_HEARTBEAT, ts_ms, lsns_to_py(py, last)?).into_pyobject(py)
        }
    }
}

fn lsns_to_py<'py>(py: Python<'py>, entries: StreamLsns<'_>) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, entries.iter())
}

fn record_to_py<'py>(py: Python<'py>, r: &RecordRef<'_>) -> PyResult<Bound<'py, PyTuple>> {
    use repl::*;
    match *r {
        RecordRef::Put {
            user,
            seq,
            ts_ms,
            sender,
            msg_id,
            body,
        } => (
            REC_PUT,
            user,
            seq,
            ts_ms,
            sender,
            msg_id,
            PyBytes::new(py, body),
        )
            .into_pyobject(py),
        RecordRef::Del { user, seq } => (REC_DEL, user, seq).into_pyobject(py),
        RecordRef::Dedup { key, ts_ms, sender } => {
            (REC_DEDUP, PyBytes::new(py, &key), ts_ms, sender).into_pyobject(py)
        }
        RecordRef::Cursor {
            user,
            device,
            seq,
            ts_ms,
        } => (REC_CURSOR, user, device, seq, ts_ms).into_pyobject(py),
    }
}

fn error_to_py<'py>(py: Python<'py>, e: &DecodeError) -> PyResult<Bound<'py, PyTuple>> {
    (DECODE_ERROR, e.code, e.reason.as_str()).into_pyobject(py)
}

// ---------------------------------------------------------------------------
// Python tuple -> Rust frame (borrowing the tuple's str / bytes items)
// ---------------------------------------------------------------------------

struct Fields<'a, 'py> {
    t: &'a Bound<'py, PyTuple>,
    name: &'static str,
}

impl<'a, 'py> Fields<'a, 'py> {
    fn item(&self, i: usize) -> PyResult<Borrowed<'a, 'py, PyAny>> {
        self.t.get_borrowed_item(i)
    }

    fn int<T: FromPyObject<'py>>(&self, i: usize, field: &str, range: &str) -> PyResult<T> {
        let item = self.item(i)?;
        item.extract::<T>().map_err(|_| {
            value_error(format!(
                "{} field {field} must be an int in {range}, got {}",
                self.name,
                describe(&item)
            ))
        })
    }

    fn str(&self, i: usize, field: &str) -> PyResult<&'a str> {
        let item = self.item(i)?;
        if !item.is_instance_of::<PyString>() {
            return Err(value_error(format!(
                "{} field {field} must be str, got {}",
                self.name,
                type_name(&item)
            )));
        }
        <&'a str>::from_py_object_bound(item).map_err(|e| {
            value_error(format!(
                "{} field {field} is not encodable as UTF-8: {e}",
                self.name
            ))
        })
    }

    /// The items of a list or tuple field, held so that borrows of them stay valid.
    fn list(&self, i: usize, field: &str, what: &str) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let item = self.item(i)?;
        if let Ok(l) = item.downcast::<PyList>() {
            return Ok(l.iter().collect());
        }
        if let Ok(t) = item.downcast::<PyTuple>() {
            return Ok(t.iter().collect());
        }
        Err(value_error(format!(
            "{} field {field} must be a list of {what}, got {}",
            self.name,
            type_name(&item)
        )))
    }

    /// A list of `(stream, lsn)` int pairs.
    fn lsns(&self, i: usize, field: &str) -> PyResult<Vec<(u16, u64)>> {
        self.list(i, field, "(stream, lsn) tuples")?
            .iter()
            .enumerate()
            .map(|(j, e)| {
                e.extract::<(u16, u64)>().map_err(|_| {
                    value_error(format!(
                        "{} field {field} item {j} must be a (stream, lsn) tuple of ints \
                         in 0..=65535 and 0..=2**64-1, got {}",
                        self.name,
                        describe(e)
                    ))
                })
            })
            .collect()
    }

    fn bytes(&self, i: usize, field: &str) -> PyResult<&'a [u8]> {
        let item = self.item(i)?;
        <&'a [u8]>::from_py_object_bound(item).map_err(|_| {
            value_error(format!(
                "{} field {field} must be bytes, got {}",
                self.name,
                type_name(&item)
            ))
        })
    }
}

fn describe(item: &Bound<'_, PyAny>) -> String {
    match item.repr() {
        Ok(r) if item.is_instance_of::<pyo3::types::PyInt>() => r.to_string(),
        _ => type_name(item),
    }
}

/// A frame tuple together with the record tuples of a `REPL_APPEND` (owned
/// references, so the records' borrowed strings and bodies stay valid while
/// the frame is encoded even though a list is mutable).
struct Held<'py> {
    obj: Bound<'py, PyAny>,
    records: Vec<Bound<'py, PyAny>>,
}

/// A parsed frame tuple; replication frames keep their lists here and
/// [`Parsed::frame`] points the `FrameRef` at them.
struct Parsed<'a> {
    frame: FrameRef<'a>,
    records: Vec<RecordRef<'a>>,
    lsns: Vec<(u16, u64)>,
}

impl Parsed<'_> {
    fn frame(&self) -> FrameRef<'_> {
        match self.frame {
            FrameRef::ReplAppend {
                stream, first_lsn, ..
            } => FrameRef::ReplAppend {
                stream,
                first_lsn,
                records: Records::Refs(&self.records),
            },
            FrameRef::ReplHello {
                version,
                node,
                epoch,
                workers,
                flags,
                ..
            } => FrameRef::ReplHello {
                version,
                node,
                epoch,
                workers,
                flags,
                applied: StreamLsns::Slice(&self.lsns),
            },
            FrameRef::ReplHeartbeat { ts_ms, .. } => FrameRef::ReplHeartbeat {
                ts_ms,
                last: StreamLsns::Slice(&self.lsns),
            },
            f => f,
        }
    }
}

fn frame_tuple<'a, 'py>(obj: &'a Bound<'py, PyAny>) -> PyResult<(&'a Bound<'py, PyTuple>, u8)> {
    let t = obj
        .downcast::<PyTuple>()
        .map_err(|_| value_error(format!("frame must be a tuple, got {}", type_name(obj))))?;
    if t.is_empty() {
        return Err(value_error("frame tuple is empty"));
    }
    let head = t.get_borrowed_item(0)?;
    let ftype: u8 = head.extract().map_err(|_| {
        value_error(format!(
            "frame type must be an int (1..=9, 0x41..=0x44 or 0x61..=0x64), got {}",
            describe(&head)
        ))
    })?;
    Ok((t, ftype))
}

/// First step of encoding a tuple: takes references to a REPL_APPEND's records.
fn hold(obj: Bound<'_, PyAny>) -> PyResult<Held<'_>> {
    let mut records = Vec::new();
    if let Ok((t, repl::REPL_APPEND)) = frame_tuple(&obj) {
        if t.len() == 4 {
            records = Fields {
                t,
                name: "REPL_APPEND",
            }
            .list(3, "records", "record tuples")?;
        }
    }
    Ok(Held { obj, records })
}

fn record_from_py<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<RecordRef<'a>> {
    use repl::{REC_CURSOR, REC_DEDUP, REC_DEL, REC_PUT};
    let t = obj
        .downcast::<PyTuple>()
        .map_err(|_| value_error(format!("record must be a tuple, got {}", type_name(obj))))?;
    let n = t.len();
    if n == 0 {
        return Err(value_error("record tuple is empty"));
    }
    let head = t.get_borrowed_item(0)?;
    let kind: u8 = head.extract().map_err(|_| {
        value_error(format!(
            "record kind must be an int (REC_PUT, REC_DEL, REC_DEDUP or REC_CURSOR), got {}",
            describe(&head)
        ))
    })?;
    let (name, arity) = match kind {
        REC_PUT => ("REC_PUT", 7),
        REC_DEL => ("REC_DEL", 3),
        REC_DEDUP => ("REC_DEDUP", 4),
        REC_CURSOR => ("REC_CURSOR", 5),
        other => return Err(value_error(format!("unknown record kind {other}"))),
    };
    if n != arity {
        return Err(value_error(format!(
            "{name} tuple must have {arity} items (kind included), got {n}"
        )));
    }
    let f = Fields { t, name };
    const U64: &str = "0..=2**64-1";
    Ok(match kind {
        REC_PUT => RecordRef::Put {
            user: f.str(1, "user")?,
            seq: f.int(2, "seq", U64)?,
            ts_ms: f.int(3, "ts_ms", U64)?,
            sender: f.str(4, "sender")?,
            msg_id: f.str(5, "msg_id")?,
            body: f.bytes(6, "body")?,
        },
        REC_DEL => RecordRef::Del {
            user: f.str(1, "user")?,
            seq: f.int(2, "seq", U64)?,
        },
        REC_CURSOR => RecordRef::Cursor {
            user: f.str(1, "user")?,
            device: f.str(2, "device")?,
            seq: f.int(3, "seq", U64)?,
            ts_ms: f.int(4, "ts_ms", U64)?,
        },
        _ => {
            let key = f.bytes(1, "key")?;
            RecordRef::Dedup {
                key: key.try_into().map_err(|_| {
                    value_error(format!(
                        "REC_DEDUP field key must be 16 bytes, got {}",
                        key.len()
                    ))
                })?,
                ts_ms: f.int(2, "ts_ms", U64)?,
                sender: f.int(3, "sender", U64)?,
            }
        }
    })
}

fn frame_from_py<'a>(held: &'a Held<'_>) -> PyResult<Parsed<'a>> {
    use frame::*;
    let (t, ftype) = frame_tuple(&held.obj)?;
    let n = t.len();
    let (name, arity) = match ftype {
        // LOGIN's device id is optional: 4 items without it, 5 with it.
        LOGIN if n == 5 => ("LOGIN", 5),
        LOGIN => ("LOGIN", 4),
        LOGIN_OK => ("LOGIN_OK", 5),
        SEND => ("SEND", 4),
        ACK => ("ACK", 3),
        DELIVER => ("DELIVER", 6),
        DELIVER_ACK => ("DELIVER_ACK", 2),
        PING => ("PING", 2),
        PONG => ("PONG", 2),
        ERROR => ("ERROR", 4),
        ROUTE_SEND => ("ROUTE_SEND", 7),
        ROUTE_ACK => ("ROUTE_ACK", 4),
        ROUTE_ERROR => ("ROUTE_ERROR", 5),
        LINK_HELLO => ("LINK_HELLO", 4),
        REPL_HELLO => ("REPL_HELLO", 7),
        REPL_APPEND => ("REPL_APPEND", 4),
        REPL_ACK => ("REPL_ACK", 3),
        REPL_HEARTBEAT => ("REPL_HEARTBEAT", 3),
        other => return Err(value_error(format!("unknown frame type {other}"))),
    };
    if n != arity {
        return Err(value_error(format!(
            "{name} tuple must have {arity} items (type included), got {n}"
        )));
    }
    let f = Fields { t, name };
    const U8: &str = "0..=255";
    const U16: &str = "0..=65535";
    const U32: &str = "0..=2**32-1";
    const U64: &str = "0..=2**64-1";
    let mut records = Vec::new();
    let mut lsns = Vec::new();
    let frame = match ftype {
        LOGIN => FrameRef::Login {
            version: f.int(1, "version", U8)?,
            user: f.str(2, "user")?,
            token: f.str(3, "token")?,
            device: if n == 5 { f.str(4, "device")? } else { "" },
        },
        LOGIN_OK => FrameRef::LoginOk {
            version: f.int(1, "version", U8)?,
            flags: f.int(2, "flags", U8)?,
            node: f.str(3, "node")?,
            max_frame: f.int(4, "max_frame", U32)?,
        },
        SEND => FrameRef::Send {
            msg_id: f.str(1, "msg_id")?,
            to: f.str(2, "to")?,
            body: f.bytes(3, "body")?,
        },
        ACK => FrameRef::Ack {
            msg_id: f.str(1, "msg_id")?,
            flags: f.int(2, "flags", U8)?,
        },
        DELIVER => FrameRef::Deliver {
            tag: f.int(1, "tag", U64)?,
            ts_ms: f.int(2, "ts_ms", U64)?,
            sender: f.str(3, "sender")?,
            msg_id: f.str(4, "msg_id")?,
            body: f.bytes(5, "body")?,
        },
        DELIVER_ACK => FrameRef::DeliverAck {
            tag: f.int(1, "tag", U64)?,
        },
        PING => FrameRef::Ping {
            nonce: f.int(1, "nonce", U64)?,
        },
        PONG => FrameRef::Pong {
            nonce: f.int(1, "nonce", U64)?,
        },
        ERROR => FrameRef::Error {
            code: f.int(1, "code", U16)?,
            msg_id: f.str(2, "msg_id")?,
            reason: f.str(3, "reason")?,
        },
        ROUTE_SEND => FrameRef::RouteSend {
            ts_ms: f.int(1, "ts_ms", U64)?,
            flags: f.int(2, "flags", U8)?,
            sender: f.str(3, "sender")?,
            msg_id: f.str(4, "msg_id")?,
            to: f.str(5, "to")?,
            body: f.bytes(6, "body")?,
        },
        ROUTE_ACK => FrameRef::RouteAck {
            user: f.str(1, "user")?,
            msg_id: f.str(2, "msg_id")?,
            flags: f.int(3, "flags", U8)?,
        },
        ROUTE_ERROR => FrameRef::RouteError {
            user: f.str(1, "user")?,
            code: f.int(2, "code", U16)?,
            msg_id: f.str(3, "msg_id")?,
            reason: f.str(4, "reason")?,
        },
        LINK_HELLO => FrameRef::LinkHello {
            worker: f.int(1, "worker", U16)?,
            pid: f.int(2, "pid", U32)?,
            epoch: f.int(3, "epoch", U64)?,
        },
        REPL_HELLO => {
            let frame = FrameRef::ReplHello {
                version: f.int(1, "version", U8)?,
                node: f.str(2, "node")?,
                epoch: f.int(3, "epoch", U64)?,
                workers: f.int(4, "workers", U16)?,
                flags: f.int(5, "flags", U8)?,
                applied: StreamLsns::Slice(&[]),
            };
            lsns = f.lsns(6, "applied")?;
            frame
        }
        REPL_APPEND => {
            let frame = FrameRef::ReplAppend {
                stream: f.int(1, "stream", U16)?,
                first_lsn: f.int(2, "first_lsn", U64)?,
                records: Records::Refs(&[]),
            };
            records = held
                .records
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    record_from_py(r).map_err(|e| {
                        value_error(format!("REPL_APPEND record {i}: {}", e.value(r.py())))
                    })
                })
                .collect::<PyResult<_>>()?;
            frame
        }
        REPL_ACK => FrameRef::ReplAck {
            stream: f.int(1, "stream", U16)?,
            lsn: f.int(2, "lsn", U64)?,
        },
        _ => {
            let frame = FrameRef::ReplHeartbeat {
                ts_ms: f.int(1, "ts_ms", U64)?,
                last: StreamLsns::Slice(&[]),
            };
            lsns = f.lsns(2, "last_lsn")?;
            frame
        }
    };
    Ok(Parsed {
        frame,
        records,
        lsns,
    })
}

// ---------------------------------------------------------------------------
// Decoder
// ---------------------------------------------------------------------------

/// Incremental frame decoder for one connection.
///
/// With `internal=False` (client connections) the worker-link frame types
/// (ROUTE_SEND, ROUTE_ACK, ROUTE_ERROR, LINK_HELLO) are reported as
/// `(DECODE_ERROR, E_UNKNOWN_TYPE, reason)` like any unknown type; with
/// `internal=True` (worker links) they decode too. With `repl=True`
/// (replication links between the nodes of a pair) only REPL_HELLO,
/// REPL_APPEND, REPL_ACK and REPL_HEARTBEAT decode; every other type is
/// UNKNOWN_TYPE (and those four are UNKNOWN_TYPE on every other decoder).
/// `feed(data)` returns every frame completed by `data` as tuples
/// (see the module docs); only a trailing partial frame is kept.
/// A `(DECODE_ERROR, E_FRAME_TOO_LARGE, reason)` item is fatal: the decoder is
/// then poisoned, returns nothing more, and the connection must be closed.
#[pyclass(module = "iris_native", name = "Decoder")]
pub struct PyDecoder {
    inner: frame::Decoder,
}

#[pymethods]
impl PyDecoder {
    #[new]
    #[pyo3(signature = (max_frame = DEFAULT_MAX_FRAME, internal = false, repl = false))]
    fn new(max_frame: u32, internal: bool, repl: bool) -> PyResult<Self> {
        if max_frame == 0 {
            return Err(value_error("max_frame must be at least 1"));
        }
        let link = match (internal, repl) {
            (false, false) => LinkKind::Client,
            (true, false) => LinkKind::Worker,
            (false, true) => LinkKind::Repl,
            (true, true) => {
                return Err(value_error(
                    "a decoder serves one link kind: internal and repl exclude each other",
                ))
            }
        };
        Ok(PyDecoder {
            inner: frame::Decoder::for_link(max_frame, link),
        })
    }

    /// Feed bytes received from the socket (bytes or any contiguous buffer);
    /// returns the list of frames and decode errors they complete, in order.
    fn feed<'py>(&mut self, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
        let py = data.py();
        if let Ok(b) = data.downcast::<PyBytes>() {
            return self.feed_slice(py, b.as_bytes());
        }
        let buf = PyBuffer::<u8>::get(data).map_err(|_| {
            value_error(format!(
                "feed() needs bytes or a byte buffer, got {}",
                type_name(data)
            ))
        })?;
        if !buf.is_c_contiguous() {
            return Err(value_error("feed() needs a C-contiguous buffer"));
        }
        // SAFETY: the buffer is C-contiguous with `len_bytes` bytes and stays
        // exported (hence unresizable) until `buf` drops at the end of this call.
        let slice =
            unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes()) };
        self.feed_slice(py, slice)
    }

    /// ``feed`` for a connection that has not logged in yet: returns
    /// ``(frames, login_end)`` where ``login_end`` is the offset in ``data``
    /// just past the first well-formed LOGIN frame it completed, or None. What
    /// follows it travels, exactly as sent, with a connection handed to its
    /// user's home worker.
    fn feed_login<'py>(
        &mut self,
        data: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyList>, Option<usize>)> {
        let py = data.py();
        if let Ok(b) = data.downcast::<PyBytes>() {
            return self.feed_slice_at(py, b.as_bytes());
        }
        let buf = PyBuffer::<u8>::get(data).map_err(|_| {
            value_error(format!(
                "feed_login() needs bytes or a byte buffer, got {}",
                type_name(data)
            ))
        })?;
        if !buf.is_c_contiguous() {
            return Err(value_error("feed_login() needs a C-contiguous buffer"));
        }
        // SAFETY: as in `feed`.
        let slice =
            unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes()) };
        self.feed_slice_at(py, slice)
    }

    /// Bytes of an incomplete frame held back; non-zero at EOF means the
    /// stream ended mid-frame (truncated).
    fn pending(&self) -> usize {
        self.inner.pending()
    }

    /// Remove and return the bytes of an incomplete frame (the decoder is
    /// left empty); used when a connection moves to another worker.
    fn take_pending<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.take_pending())
    }

    /// Free the internal buffer's memory (pending bytes are kept); call on
    /// idle connections.
    fn release(&mut self) {
        self.inner.release()
    }

    /// Bytes currently allocated for the internal buffer.
    fn capacity(&self) -> usize {
        self.inner.buffer_capacity()
    }

    /// True once a frame exceeded max_frame; the decoder then ignores all input.
    fn poisoned(&self) -> bool {
        self.inner.poisoned()
    }

    /// Largest accepted frame length (type byte + payload).
    #[getter]
    fn max_frame(&self) -> u32 {
        self.inner.max_frame()
    }

    /// True for a worker-link decoder (internal frame types accepted).
    #[getter]
    fn internal(&self) -> bool {
        self.inner.internal()
    }

    /// True for a replication-link decoder (REPL_* frame types only).
    #[getter]
    fn repl(&self) -> bool {
        self.inner.repl()
    }

    fn __repr__(&self) -> String {
        let py_bool = |b: bool| if b { "True" } else { "False" };
        format!(
            "Decoder(max_frame={}, internal={}, repl={}, pending={}, poisoned={})",
            self.inner.max_frame(),
            py_bool(self.inner.internal()),
            py_bool(self.inner.repl()),
            self.inner.pending(),
            py_bool(self.inner.poisoned()),
        )
    }
}

impl PyDecoder {
    fn feed_slice<'py>(&mut self, py: Python<'py>, input: &[u8]) -> PyResult<Bound<'py, PyList>> {
        Ok(self.feed_slice_at(py, input)?.0)
    }

    fn feed_slice_at<'py>(
        &mut self,
        py: Python<'py>,
        input: &[u8],
    ) -> PyResult<(Bound<'py, PyList>, Option<usize>)> {
        let mut out: Vec<Bound<'py, PyTuple>> = Vec::new();
        // The core decoder's sink cannot fail; keep the first Python error
        // (only MemoryError is possible) and raise it after the feed.
        let mut failure: Option<PyErr> = None;
        let login_end = self.inner.feed(input, |r| {
            if failure.is_some() {
                return;
            }
            let item = match r {
                Ok(f) => frame_to_py(py, &f),
                Err(e) => error_to_py(py, &e),
            };
            match item {
                Ok(t) => out.push(t),
                Err(e) => failure = Some(e),
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        Ok((PyList::new(py, out)?, login_end))
    }
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// Encode one frame tuple into its wire bytes (header included).
///
/// Raises ValueError for a malformed tuple, a string longer than its length
/// field allows, or a frame longer than `max_frame`.
#[pyfunction]
#[pyo3(signature = (frame, max_frame = DEFAULT_MAX_FRAME))]
fn encode<'py>(frame: &Bound<'py, PyAny>, max_frame: u32) -> PyResult<Bound<'py, PyBytes>> {
    let held = hold(frame.clone())?;
    let parsed = frame_from_py(&held)?;
    let f = parsed.frame();
    let len = encoded_len(&f, max_frame).map_err(|e| value_error(e.to_string()))?;
    PyBytes::new_with(frame.py(), len, |out| {
        write_frame(&f, out);
        Ok(())
    })
}

/// Encode many frame tuples into one bytes object (one allocation), equal
/// to the concatenation of their `encode()` results.
///
/// Raises ValueError naming the index of the first bad frame.
#[pyfunction]
#[pyo3(signature = (frames, max_frame = DEFAULT_MAX_FRAME))]
fn encode_batch<'py>(frames: &Bound<'py, PyAny>, max_frame: u32) -> PyResult<Bound<'py, PyBytes>> {
    let at = |i: usize| move |e: PyErr| value_error(format!("frame {i}: {}", e.value(frames.py())));
    let held = frames
        .try_iter()?
        .enumerate()
        .map(|(i, obj)| hold(obj?).map_err(at(i)))
        .collect::<PyResult<Vec<_>>>()?;
    let parsed = held
        .iter()
        .enumerate()
        .map(|(i, h)| frame_from_py(h).map_err(at(i)))
        .collect::<PyResult<Vec<_>>>()?;
    let refs: Vec<FrameRef<'_>> = parsed.iter().map(Parsed::frame).collect();
    let indexed = |e: frame::EncodeError| {
        // Re-find the failing frame so the message points at it.
        let i = refs
            .iter()
            .position(|f| encoded_len(f, max_frame).is_err())
            .unwrap_or(0);
        value_error(format!("frame {i}: {e}"))
    };
    let total = batch_len(&refs, max_frame).map_err(indexed)?;
    PyBytes::new_with(frames.py(), total, |out| {
        write_batch(&refs, max_frame, out).map_err(|e| value_error(e.to_string()))
    })
}

// ---------------------------------------------------------------------------
// Dedup
// ---------------------------------------------------------------------------

fn key_of(sender: &str, msg_id: &str) -> PyResult<u128> {
    dedup::dedup_key(sender.as_bytes(), msg_id.as_bytes()).ok_or_else(|| {
        value_error(format!(
            "sender is {} bytes of UTF-8, at most {} allowed",
            sender.len(),
            dedup::MAX_SENDER_LEN
        ))
    })
}

/// 16-byte big-endian xxh3_128 of `len(sender) || sender || msg_id`: the
/// persistent form of a DedupWindow key.
#[pyfunction]
fn dedup_key<'py>(py: Python<'py>, sender: &str, msg_id: &str) -> PyResult<Bound<'py, PyBytes>> {
    Ok(PyBytes::new(py, &key_of(sender, msg_id)?.to_be_bytes()))
}

/// xxh3_64 of the sender (an int): whose entry a dedup key is, for the fair
/// split of the window. Persisted and replicated next to the key.
#[pyfunction]
fn dedup_sender(sender: &str) -> u64 {
    dedup::sender_hash(sender.as_bytes())
}

/// Bounded window of recently seen (sender, msg_id) pairs.
///
/// Holds at most `max_entries` keys, none older than `max_age_ms`. Over the
/// budget, the oldest completed entry of the sender holding the most goes
/// first; in-flight (pending) entries are never evicted.
#[pyclass(module = "iris_native", name = "DedupWindow")]
pub struct PyDedupWindow {
    inner: dedup::DedupWindow,
}

#[pymethods]
impl PyDedupWindow {
    #[new]
    fn new(max_entries: usize, max_age_ms: u64) -> Self {
        PyDedupWindow {
            inner: dedup::DedupWindow::new(max_entries, max_age_ms),
        }
    }

    /// DEDUP_NEW (now recorded as pending), DEDUP_PENDING or DEDUP_DONE.
    fn check_and_insert(&mut self, sender: &str, msg_id: &str, now_ms: u64) -> PyResult<u8> {
        let key = key_of(sender, msg_id)?;
        let who = dedup::sender_hash(sender.as_bytes());
        Ok(self.inner.check_and_insert(key, who, now_ms))
    }

    /// Mark a pending pair done; False if it is not in the window.
    fn mark_done(&mut self, sender: &str, msg_id: &str) -> PyResult<bool> {
        Ok(self.inner.mark_done(key_of(sender, msg_id)?))
    }

    /// Forget a pair so that a resend counts as new; False if absent.
    fn remove(&mut self, sender: &str, msg_id: &str) -> PyResult<bool> {
        Ok(self.inner.remove(key_of(sender, msg_id)?))
    }

    /// Insert a key from `dedup_key()` with its state (DEDUP_PENDING or
    /// DEDUP_DONE), timestamp and sender (`dedup_sender()`; 0 when unknown),
    /// e.g. a replicated entry.
    #[pyo3(signature = (key, state, ts_ms, sender=0))]
    fn insert_key(&mut self, key: &[u8], state: u8, ts_ms: u64, sender: u64) -> PyResult<()> {
        let key: [u8; 16] = key
            .try_into()
            .map_err(|_| value_error(format!("key must be 16 bytes, got {}", key.len())))?;
        if state != dedup::PENDING && state != dedup::DONE {
            return Err(value_error(format!(
                "state must be DEDUP_PENDING (1) or DEDUP_DONE (2), got {state}"
            )));
        }
        self.inner
            .insert(u128::from_be_bytes(key), state, ts_ms, sender);
        Ok(())
    }

    /// Insert completed entries from `records`: 32-byte records `ts_ms u64 BE |
    /// key (16 bytes) | sender u64 BE`, oldest first (the LMDB dedup table's key
    /// and value), skipping those older than the age bound at `now_ms`. Returns
    /// how many were inserted. One call per batch keeps a restart's reload out
    /// of per-entry Python.
    fn load(&mut self, records: &[u8], now_ms: u64) -> PyResult<usize> {
        self.inner.load(records, now_ms).ok_or_else(|| {
            value_error(format!(
                "records must be a multiple of {} bytes, got {}",
                dedup::LOAD_RECORD_LEN,
                records.len()
            ))
        })
    }

    #[getter]
    fn max_entries(&self) -> usize {
        self.inner.max_entries()
    }

    #[getter]
    fn max_age_ms(&self) -> u64 {
        self.inner.max_age_ms()
    }

    /// Entries in flight, which nothing evicts.
    #[getter]
    fn pending(&self) -> usize {
        self.inner.pending()
    }

    /// Senders holding at least one entry.
    #[getter]
    fn senders(&self) -> usize {
        self.inner.senders()
    }

    /// Completed entries evicted by the entry budget, before their full age.
    #[getter]
    fn capacity_evictions(&self) -> u64 {
        self.inner.capacity_evictions()
    }

    /// Timestamp of the oldest completed entry held (None if none): now minus
    /// this is the window's real age.
    #[getter]
    fn oldest_ts_ms(&self) -> Option<u64> {
        self.inner.oldest_ts_ms()
    }

    /// Heap bytes allocated by the window.
    #[getter]
    fn memory_bytes(&self) -> usize {
        self.inner.memory_bytes()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "DedupWindow(max_entries={}, max_age_ms={}, len={})",
            self.inner.max_entries(),
            self.inner.max_age_ms(),
            self.inner.len()
        )
    }
}

/// Native wire codec and dedup window for iris-fast (see docs/protocol.md).
///
/// Frames are tuples whose first item is the frame type:
/// (LOGIN, version, user, token), (LOGIN_OK, version, flags, node, max_frame),
/// (SEND, msg_id, to, body), (ACK, msg_id, flags),
/// (DELIVER, tag, ts_ms, sender, msg_id, body), (DELIVER_ACK, tag),
/// (PING, nonce), (PONG, nonce), (ERROR, code, msg_id, reason);
/// worker links only (`Decoder(internal=True)`):
/// (ROUTE_SEND, ts_ms, flags, sender, msg_id, to, body),
/// (ROUTE_ACK, user, msg_id, flags), (ROUTE_ERROR, user, code, msg_id, reason),
/// (LINK_HELLO, worker, pid, epoch);
/// replication links only (`Decoder(repl=True)`, see docs/replication.md):
/// (REPL_HELLO, version, node, epoch, workers, flags, [(stream, lsn), ...]),
/// (REPL_APPEND, stream, first_lsn, [record, ...]), (REPL_ACK, stream, lsn),
/// (REPL_HEARTBEAT, ts_ms, [(stream, last_lsn), ...]) with records
/// (REC_PUT, user, seq, ts_ms, sender, msg_id, body), (REC_DEL, user, seq),
/// (REC_DEDUP, key16, ts_ms, sender_hash), (REC_CURSOR, user, device, seq, ts_ms);
/// decode errors are (DECODE_ERROR, code, reason).
#[pymodule]
fn iris_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    use frame::{
        ACK, ACK_DEGRADED, ACK_DUPLICATE, ACK_STORED, DELIVER, DELIVER_ACK, ERROR, E_BAD_FRAME,
        E_BAD_UTF8, E_FRAME_TOO_LARGE, E_UNKNOWN_TYPE, LINK_HELLO, LOGIN, LOGIN_OK, PING, PONG,
        ROUTE_ACK, ROUTE_ERROR, ROUTE_FLAG_REPLAY, ROUTE_SEND, SEND,
    };
    for (name, v) in [
        ("DECODE_ERROR", DECODE_ERROR),
        ("LOGIN", LOGIN),
        ("LOGIN_OK", LOGIN_OK),
        ("SEND", SEND),
        ("ACK", ACK),
        ("DELIVER", DELIVER),
        ("DELIVER_ACK", DELIVER_ACK),
        ("PING", PING),
        ("PONG", PONG),
        ("ERROR", ERROR),
        ("ROUTE_SEND", ROUTE_SEND),
        ("ROUTE_ACK", ROUTE_ACK),
        ("ROUTE_ERROR", ROUTE_ERROR),
        ("LINK_HELLO", LINK_HELLO),
        ("REPL_HELLO", repl::REPL_HELLO),
        ("REPL_APPEND", repl::REPL_APPEND),
        ("REPL_ACK", repl::REPL_ACK),
        ("REPL_HEARTBEAT", repl::REPL_HEARTBEAT),
        ("REPL_VERSION", repl::REPL_VERSION),
        ("HELLO_SPLIT", repl::HELLO_SPLIT),
        ("REC_PUT", repl::REC_PUT),
        ("REC_DEL", repl::REC_DEL),
        ("REC_DEDUP", repl::REC_DEDUP),
        ("REC_CURSOR", repl::REC_CURSOR),
        ("ROUTE_FLAG_REPLAY", ROUTE_FLAG_REPLAY),
        ("ACK_STORED", ACK_STORED),
        ("ACK_DUPLICATE", ACK_DUPLICATE),
        ("ACK_DEGRADED", ACK_DEGRADED),
        ("DEDUP_NEW", dedup::NEW),
        ("DEDUP_PENDING", dedup::DUP_PENDING),
        ("DEDUP_DONE", dedup::DUP_DONE),
    ] {
        m.add(name, v)?;
    }
    for (name, v) in [
        ("E_BAD_FRAME", E_BAD_FRAME),
        ("E_FRAME_TOO_LARGE", E_FRAME_TOO_LARGE),
        ("E_UNKNOWN_TYPE", E_UNKNOWN_TYPE),
        ("E_BAD_UTF8", E_BAD_UTF8),
    ] {
        m.add(name, v)?;
    }
    m.add("DEFAULT_MAX_FRAME", DEFAULT_MAX_FRAME)?;
    m.add_class::<PyDecoder>()?;
    m.add_class::<PyDedupWindow>()?;
    m.add_function(wrap_pyfunction!(encode, m)?)?;
    m.add_function(wrap_pyfunction!(encode_batch, m)?)?;
    m.add_function(wrap_pyfunction!(dedup_key, m)?)?;
    m.add_function(wrap_pyfunction!(dedup_sender, m)?)?;
    Ok(())
}
