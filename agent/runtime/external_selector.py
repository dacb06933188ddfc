"""Mode "external": a part-present signal (gate TRG, a Modbus input, an MQTT message) picks
the frame nearest trigger time + offset_ms from a short ring of timestamped frames.

Time is the capture clock (time.monotonic_ns): frames and triggers are compared on it, so a
wall-clock step (NTP) moves nothing here (tests/test_external_trigger.py).
"""

from __future__ import annotations

import collections

from agent.runtime.selector import Part, SelectorBase
from agent.runtime.sources import Captured
from agent.types import FailsafeReason

NO_FRAME_FOR_TRIGGER = FailsafeReason.NO_FRAME_FOR_TRIGGER
MISSED_TRIGGER = FailsafeReason.MISSED_TRIGGER


class ExternalSelector(SelectorBase):
    """A part-present signal picks the frame nearest trigger time + offset from a ring.

    A trigger is resolved when the first frame at or after its target arrives (the nearest
    is then known), or by poll() once target + window has passed without one (the camera
    stalled). A nearest frame further than window_ms from the target: FAILSAFE."""

    mode = "external"

    def __init__(self, offset_ms: float = 0.0, window_ms: float = 40.0, ring_frames: int = 32,
                 debounce_ms: float = 5.0, max_pending: int = 64):
        super().__init__()
        self.offset_ns = int(offset_ms * 1e6)
        self.window_ns = int(window_ms * 1e6)
        self.debounce_ns = int(debounce_ms * 1e6)
        self.max_pending = max_pending
        self._ring: collections.deque[Captured] = collections.deque(maxlen=ring_frames)
        self._pending: collections.deque = collections.deque()
        self._last_trg_ns: int | None = None
        self._n = 0
        self._out: list[Part] = []      # overflow parts, handed out by the next feed/poll

    def trigger(self, t_ns: int, encoder: int | None = None, name: str = "") -> None:
        with self._lock:
            self.counts["triggers"] += 1
            last, self._last_trg_ns = self._last_trg_ns, t_ns
            if last is not None and 0 <= t_ns - last < self.debounce_ns:
                # contact bounce, not a part: dropped, counted; measured from the last
                # edge, so a whole bounce train is one part
                self.counts["trigger_debounced"] += 1
                return
            self._n += 1
            name = name or f"T{self._n}"
            self._pending.append((t_ns + self.offset_ns, t_ns, encoder, name))
            while len(self._pending) > self.max_pending:
                # A storm beyond the bound: the oldest cannot wait longer; it is a part
                tgt, t0, enc, nm = self._pending.popleft()
                self._failsafe_counted(MISSED_TRIGGER, f"trigger {nm}: more than "
                                       f"{self.max_pending} triggers waiting for frames")
                self._out.append(Part(None, t0, f"trg:{nm}", enc, MISSED_TRIGGER,
                                      f"{MISSED_TRIGGER}: more than {self.max_pending} pending"))

    def feed(self, got: Captured) -> list[Part]:
        with self._lock:
            self.counts["frames"] += 1
            if got.image is not None:
                self._ring.append(got)
            return self._resolve(got.t_capture_ns, False)

    def poll(self, now_ns: int) -> list[Part]:
        with self._lock:
            return self._resolve(now_ns, True)

    def _resolve(self, now_ns: int, by_clock: bool) -> list[Part]:
        out, self._out = self._out, []
        while self._pending:
            tgt, t0, enc, name = self._pending[0]
            if not by_clock and now_ns < tgt:
                break
            if by_clock and now_ns < tgt + self.window_ns:
                break
            self._pending.popleft()
            best = min(self._ring, key=lambda c: abs(c.t_capture_ns - tgt), default=None)
            dt = abs(best.t_capture_ns - tgt) if best is not None else None
            if dt is None or dt > self.window_ns:
                why = ("no frame at all" if dt is None else
                       f"nearest frame {dt / 1e6:.1f} ms from trigger + offset")
                detail = f"{NO_FRAME_FOR_TRIGGER}: {why} (window {self.window_ns / 1e6:g} ms)"
                self._failsafe_counted(NO_FRAME_FOR_TRIGGER, f"trigger {name}: {detail}")
                out.append(Part(None, t0, f"trg:{name}", enc, NO_FRAME_FOR_TRIGGER, detail))
            else:
                self.counts["parts"] += 1
                out.append(Part(best, t0, f"trg:{name}", enc))
        return out



__all__ = ["ExternalSelector"]
