"""The capture stage: a Source kept running, whatever it does.

    capture = ReconnectingSource(source, fps=30, reconnect_min_s=0.1, reconnect_max_s=10,
                                 stall_timeout_s=5, on_state=cb, room=None)
    capture.run(emit, stop)          # the capture thread: emit(Captured) per frame
    capture.state                    # SourceState: starting, connected, degraded, ended
    capture.check_stall()            # supervisor tick: a read stuck too long -> degraded

A source (agent/runtime/sources.py) only says what happened; this class decides what to do about
it: reopen with exponential backoff (firmware_io's Backoff, the gates' own), pace a file
to `fps`, and in pull mode read only when the inspect queue has room (`room`, a Slots).
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from typing import Callable

from firmware_io.gates.base import Backoff

from agent.runtime.sources import Captured, Source

log = logging.getLogger("pipeline")


class SourceState(enum.StrEnum):
    """The values are the wire format (status `source`, Prometheus edge_inspect_source_state)."""
    STARTING = "starting"
    CONNECTED = "connected"
    DEGRADED = "degraded"     # failed, reconnecting with backoff, or stuck in a read
    ENDED = "ended"           # a file or folder ran out (not looping)


class Slots:
    """Free places in the inspect queue, as tokens in a C-level SimpleQueue (a cheaper
    semaphore than threading.Semaphore on the per-frame path)."""

    def __init__(self, n: int):
        self.n = n
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(n):
            self._q.put(None)

    def take(self, stop: threading.Event) -> bool:
        """Block until a place is free (True) or stop is set (False)."""
        while True:
            try:
                self._q.get(timeout=0.1)
                return True
            except queue.Empty:
                if stop.is_set():
                    return False

    def try_take(self) -> bool:
        try:
            self._q.get_nowait()
            return True
        except queue.Empty:
            return False

    def give(self) -> None:
        self._q.put(None)


class ReconnectingSource:
    """Runs one Source in the capture thread; see the module docstring."""

    def __init__(self, source: Source, *, fps: float = 0.0, reconnect_min_s: float = 0.1,
                 reconnect_max_s: float = 10.0, stall_timeout_s: float = 5.0,
                 on_state: Callable[[str, str, str], None] | None = None,
                 room: Slots | None = None):
        self.source = source
        self.fps = float(fps or 0.0)
        self.backoff = Backoff(reconnect_min_s, reconnect_max_s)
        self.stall_timeout_ns = int(stall_timeout_s * 1e9)
        self.on_state = on_state
        self.room = room                  # pull mode: read only with a free inspect slot
        self.state = SourceState.STARTING
        self.reason = ""
        self.ended = False
        self.reading_since_ns = 0         # monotonic_ns a read() began; 0: not in a read
        self.last_frame_ns = 0

    # -- state ---------------------------------------------------------------------------
    def set_state(self, state: SourceState, reason: str = "") -> None:
        if state == self.state and reason == self.reason:
            return
        self.state, self.reason = state, reason
        if state is SourceState.DEGRADED:
            log.warning("source %s degraded: %s", self.source.describe(), reason)
        elif state is SourceState.CONNECTED:
            log.info("source %s connected", self.source.describe())
        if self.on_state is not None:
            try:
                self.on_state("source", state.value, reason)
            except Exception:
                log.exception("on_state callback failed")

    @property
    def waiting(self) -> bool:
        """Away and backing off to reopen it (not stuck inside a read: check_stall())."""
        return self.state is SourceState.DEGRADED and not self.reading_since_ns and not self.ended

    def check_stall(self) -> bool:
        """A read() stuck longer than stall_timeout_s: reported degraded (the read cannot be
        interrupted; the watchdog sees no progress)."""
        since = self.reading_since_ns
        if since and time.monotonic_ns() - since > self.stall_timeout_ns:
            self.set_state(SourceState.DEGRADED, "stalled: no frame for "
                           f"{(time.monotonic_ns() - since) / 1e9:.1f} s")
            return True
        return False

    # -- the capture thread --------------------------------------------------------------
    def run(self, emit: Callable[[Captured], None], stop: threading.Event) -> None:
        """Read until the source ends or stop is set; emit each frame. Closes the source."""
        src, room = self.source, self.room
        is_open = False
        period_ns = int(1e9 / self.fps) if self.fps > 0 else 0
        next_ns = 0
        try:
            while not stop.is_set():
                if not is_open:
                    try:
                        src.open()
                        is_open = True
                    except Exception as e:  # noqa: BLE001 - any failure: reopen with backoff
                        self.set_state(SourceState.DEGRADED, str(e) or type(e).__name__)
                        stop.wait(self.backoff.next())
                        continue
                if room is not None:
                    if not room.take(stop):
                        return
                elif period_ns:
                    now = time.monotonic_ns()
                    if next_ns > now:
                        if stop.wait((next_ns - now) / 1e9):
                            return
                        next_ns += period_ns
                    else:
                        next_ns = now + period_ns
                self.reading_since_ns = time.monotonic_ns() or 1
                try:
                    got = src.read()
                except Exception as e:  # noqa: BLE001
                    self.reading_since_ns = 0
                    if room is not None:
                        room.give()
                    self.set_state(SourceState.DEGRADED, str(e) or type(e).__name__)
                    _close(src)
                    is_open = False
                    stop.wait(self.backoff.next())
                    continue
                self.reading_since_ns = 0
                if got is None:
                    if room is not None:
                        room.give()
                    self.ended = True
                    self.set_state(SourceState.ENDED, "end of source")
                    return
                self.backoff.reset()
                if self.state is not SourceState.CONNECTED:
                    self.set_state(SourceState.CONNECTED)
                self.last_frame_ns = got.t_decoded_ns
                emit(got)
        finally:
            _close(src)


def _close(src: Source) -> None:
    try:
        src.close()
    except Exception:  # noqa: BLE001 - closing a failed source may fail too
        pass


__all__ = ["ReconnectingSource", "SourceState", "Slots"]
