# cython: language_level=3
"""The per-connection protocol object that uvloop calls on every read.

This is the whole connection layer's interface to the rest of the server (see
docs/architecture.md): accept (``connection_made``), frames in (``data_received`` -> the worker's
``on_*`` methods), frames out (``send``), close (``close``) and ``hibernate``. Nothing else in the
server touches sockets, so this layer can later move into a native reactor unchanged.

Why Cython: an idle, logged-in connection must cost a few hundred bytes of Python-side state. A
``cdef class`` stores its fields in C slots (no ``__dict__``, no per-field objects for the
counters) and the dispatch loop below runs without attribute look-ups on the hot path.
"""

from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from iris_native import Decoder, encode_batch

# Frame types and error codes (docs/protocol.md); literal so Cython compiles them to C ints.
cdef enum:
    T_DECODE_ERROR = 0
    T_LOGIN = 1
    T_SEND = 3
    T_DELIVER_ACK = 6
    T_PING = 7
    T_PONG = 8
    E_UNKNOWN_TYPE = 3
    E_NOT_LOGGED_IN = 5
    # Bound on one outgoing frame: a sanity check only. What makes a DELIVER fit the client's
    # --max-frame is the SEND check (Worker.on_send); a message stored while the node ran with
    # a larger --max-frame (at most 16 MiB) is still delivered as it is, never stuck.
    ENCODE_MAX = 16 * 1024 * 1024 + 1024

# Process-wide I/O counters, read by the metrics collector: C integers, so counting costs no
# allocation on the write path.
cdef unsigned long long _writes = 0
cdef unsigned long long _frames_out = 0
cdef unsigned long long _bytes_out = 0
cdef unsigned long long _bytes_in = 0
cdef unsigned long long _hibernations = 0


def io_stats():
    """(writes, frames written, bytes written, bytes read, hibernations) since start."""
    return _writes, _frames_out, _bytes_out, _bytes_in, _hibernations


cdef inline double now_monotonic() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def monotonic():
    """The clock the connection layer stamps activity with (CLOCK_MONOTONIC, seconds)."""
    return now_monotonic()


cdef class Connection:
    """One client connection: decoder, outgoing batch and delivery state, in C slots."""

    cdef readonly object transport
    cdef readonly object worker
    cdef object _decoder
    cdef list _out
    # Logged-in user id (str) or None before LOGIN_OK.
    cdef public object user
    # Unacknowledged deliveries: deque of (tag, record), created on first delivery.
    cdef public object inflight
    cdef public unsigned long long next_tag
    # Every stored message with seq < cursor has been delivered on this connection.
    cdef public long long cursor
    cdef public long long inflight_bytes
    cdef public double last_active
    cdef public double opened_at
    cdef public int errors
    cdef public bint closing
    cdef public bint detached
    cdef public bint write_paused
    # Set while this connection is being handed to its user's home worker.
    cdef public bint handoff_pending
    # (user, preamble) for a socket adopted from another worker; consumed by the worker.
    cdef public object pending_login
    # The device id given in LOGIN ("": none, an old client's anonymous device).
    cdef public object device
    # Token bucket of this connection's SENDs (iris_fast.server.ratelimit.SendBucket), or None.
    cdef public object bucket
    # The client's source address (an interned str shared by its connections), once counted.
    cdef public object source
    cdef bint _flush_scheduled
    cdef int _max_frame

    def __cinit__(self, worker, int max_frame=65536):
        self.worker = worker
        self._max_frame = max_frame
        self.next_tag = 1
        self.cursor = 0
        self.device = ""

    # ---- asyncio protocol -------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        self._decoder = Decoder(self._max_frame)
        self.opened_at = now_monotonic()
        self.last_active = self.opened_at
        self.worker.on_open(self)

    def data_received(self, data):
        global _bytes_in
        cdef int t
        cdef Py_ssize_t i, n
        cdef tuple f
        _bytes_in += len(data)
        self.last_active = now_monotonic()
        decoder = self._decoder
        if decoder is None:
            return
        login_end = None
        if self.user is None:
            # Before LOGIN: note where the first LOGIN ends, for a hand-off (see below).
            frames, login_end = decoder.feed_login(data)
        else:
            frames = decoder.feed(data)
        worker = self.worker
        n = len(frames)
        for i in range(n):
            f = frames[i]
            t = f[0]
            if t == T_SEND:
                if self.user is None:
                    worker.reject(self, E_NOT_LOGGED_IN, "log in before sending")
                else:
                    worker.on_send(self, f[1], f[2], f[3])
            elif t == T_DELIVER_ACK:
                if self.user is None:
                    worker.reject(self, E_NOT_LOGGED_IN, "log in before acknowledging")
                else:
                    worker.on_deliver_ack(self, f[1])
            elif t == T_PING:
                self.send((T_PONG, f[1]))
            elif t == T_PONG:
                pass
            elif t == T_LOGIN:
                worker.on_login(self, f[1], f[2], f[3], f[4] if len(f) > 4 else "")
                if self.handoff_pending:
                    # What followed LOGIN travels as the client sent it (undecodable frames
                    # included: the home worker answers them).
                    worker.finish_handoff(self, f[2], bytes(data[login_end:]))
                    return
            elif t == T_DECODE_ERROR:
                worker.on_decode_error(self, f[1], f[2])
            else:
                worker.reject(
                    self, E_UNKNOWN_TYPE, f"frame type {t} is sent by servers, not by clients"
                )
            if self.closing:
                break

    def eof_received(self):
        # The client finished sending; let the transport close once our writes are flushed.
        return False

    def connection_lost(self, exc):
        self.closing = True
        self.worker.on_close(self)
        self.transport = None
        self._decoder = None
        self._out = None

    def pause_writing(self):
        self.write_paused = True
        self.worker.on_write_paused(self)

    def resume_writing(self):
        self.write_paused = False
        self.worker.on_writable(self)

    # ---- frames out ---------------------------------------------------------------------------

    cpdef send(self, tuple frame):
        """Queue one frame; all frames queued in one loop tick go out in one write."""
        if self.transport is None:
            return
        if self._out is None:
            self._out = [frame]
        else:
            self._out.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.worker.schedule_flush(self)

    cpdef flush(self):
        """Encode the queued frames into one buffer (Rust) and write it with one syscall."""
        global _writes, _frames_out, _bytes_out
        self._flush_scheduled = False
        out = self._out
        if out is None:
            return
        self._out = None
        if self.transport is None:
            return
        data = encode_batch(out, ENCODE_MAX)
        _writes += 1
        _frames_out += len(out)
        _bytes_out += len(data)
        self.transport.write(data)
        if self.write_paused:
            # Over the transport's high-water mark: the worker checks its bounds at every flush.
            self.worker.on_pending(self)

    def close(self):
        """Flush what is queued, then close; the worker sees ``on_close`` exactly once."""
        if self.closing:
            return
        self.closing = True
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def cut(self):
        """Flush what is queued (it goes out if the kernel takes it), then drop the connection
        at once: a peer that does not read is never waited for. ``on_close`` follows once."""
        if self.transport is None:
            return
        if not self.closing:
            self.closing = True
            self.flush()
        if self.transport is not None:
            self.transport.abort()

    def abandon(self):
        """Drop this process's hold on a socket handed to another worker (no FIN, no flush)."""
        self.closing = True
        self.detached = True
        self._out = None
        if self.transport is not None:
            self.transport.abort()

    def fileno(self):
        return self.transport.get_extra_info("socket").fileno()

    def take_pending(self):
        """Remove and return the bytes of an incomplete frame (they travel with a hand-off)."""
        return b"" if self._decoder is None else self._decoder.take_pending()

    def pause_reading(self):
        if self.transport is not None and not self.closing:
            self.transport.pause_reading()

    def resume_reading(self):
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    # ---- idle ---------------------------------------------------------------------------------

    def hibernate(self):
        """Release every buffer an idle connection does not need (Erlang's ``hibernate``)."""
        global _hibernations
        if self._decoder is not None and self._decoder.capacity():
            self._decoder.release()
            _hibernations += 1
        if self.inflight is not None and not self.inflight:
            self.inflight = None

    def pending_input(self):
        """Bytes of an incomplete frame held by the decoder (non-zero at EOF = truncated)."""
        return 0 if self._decoder is None else self._decoder.pending()

    def buffer_capacity(self):
        """Bytes of read buffer this connection holds right now."""
        return 0 if self._decoder is None else self._decoder.capacity()

    @property
    def peer(self):
        if self.transport is None:
            return None
        return self.transport.get_extra_info("peername")
