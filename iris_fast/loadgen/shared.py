"""Shared-memory layout between the parent and its workers.

Each worker owns one row of ``COUNTER_SLOTS`` int64 counters in a ``RawArray`` and overwrites
them a few times a second; the parent only reads them (progress bar, phase barrier, the grace
cut-off). No lock: every slot has a single writer and a torn read of a progress figure is
harmless on the 64-bit platforms we run on.

The parent owns the ``control`` array and the workers only read it.
"""

from __future__ import annotations

import time

# Counter slots of one worker row.
CONN_OK = 0
CONN_FAILED = 1
SENT = 2
ACKED = 3
DELIVERED = 4
SEND_FAILED = 5
ERRORS = 6
PHASE = 7
DUPLICATED = 8
COUNTER_SLOTS = 9

# Worker phases (slot PHASE).
PHASE_STARTING = 0
PHASE_CONNECTING = 1
PHASE_READY = 2
PHASE_RUNNING = 3
PHASE_SENT = 4  # send loop over: SENT is final
PHASE_DONE = 5

# Control slots written by the parent.
CTL_GO = 0  # 1: start the send / hold phase
CTL_START_NS = 1  # monotonic ns at which the phase starts (same clock in every process)
CTL_STOP = 2  # 1: stop everything, report results now
CONTROL_SLOTS = 3


def mono_ns() -> int:
    """CLOCK_MONOTONIC in ns: one clock shared by every process of the machine."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)
