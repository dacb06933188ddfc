"""The part selector's contract: what a selector hands the inspector (Part), the base every
trigger mode shares, and mode "frame" (every frame a part).

A selector is fed every captured frame (capture thread) and answers with the parts it has
finished selecting, each exactly once:

    for part in sel.feed(captured): ...   # 0, 1 or more parts
    sel.trigger(t_ns, encoder, name)      # a part-present signal, from any thread
    for part in sel.poll(now_ns): ...     # supervisor tick: parts whose frame never came

A Part either carries the frame to judge or a FAILSAFE reason: it was there, it could not
be judged, so it is rejected (by policy) and counted, never passed silently.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass

from agent.runtime.sources import Captured
from agent.types import Box, FailsafeReason

# the trigger modes share one logger: their FAILSAFE lines read "parts: part FAILSAFE (...)"
log = logging.getLogger("parts")


@dataclass(slots=True)
class Part:
    captured: Captured | None      # the frame to judge; None when failsafe is set
    t_ref_ns: int                  # gate timing counts from here (trigger / line crossing)
    ref: str = ""                  # "trg:<name>" or "track:<id>": what selected it
    encoder: int | None = None
    failsafe: FailsafeReason | None = None
    detail: str = ""
    # judge = "worst": more frames of the same part; its score is the worst of all
    extra: tuple = ()
    # presence mode: where the part is in `captured` (frame pixels, crop_margin included,
    # clamped to the frame); the inspector is given only this crop. None: the whole frame.
    box: Box | None = None
    extra_boxes: tuple = ()        # the same for each of `extra`


class SelectorBase:
    mode = "frame"

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()

    def trigger(self, t_ns: int, encoder: int | None = None, name: str = "") -> None:
        """Only external mode uses triggers; the others count and ignore them."""
        with self._lock:
            self.counts["triggers_ignored"] += 1

    def poll(self, now_ns: int) -> list[Part]:
        return []

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def _failsafe_counted(self, reason: FailsafeReason, detail: str) -> None:
        # Loud, but never at line rate: the first ten of each reason, then every hundredth.
        self.counts[reason.value] += 1
        n = self.counts[reason.value]
        if n <= 10 or n % 100 == 0:
            log.error("part FAILSAFE (%s): %s (%d so far)", reason.value, detail, n)


class FrameSelector(SelectorBase):
    """Mode "frame": every frame is a part, timed from its capture. A part-present trigger
    (the gate controller's TRG) only latches an encoder count for the next frame, which the
    gate's encoder-mode timing needs. Counts nothing: a frame mode run has no selector
    counters to report."""

    mode = "frame"

    def __init__(self):
        super().__init__()
        self._encoder: int | None = None

    def latch(self, encoder: int) -> None:
        self._encoder = int(encoder)

    def feed(self, got: Captured) -> list[Part]:
        enc, self._encoder = self._encoder, None
        return [Part(got, got.t_capture_ns, "", enc)]


__all__ = ["Part", "SelectorBase", "FrameSelector"]
