"""Intake: selected parts become numbered Work on the inspect queue (capture thread).

    intake = Intake(prefix, inspector=lambda: pipe.inspector, put=in_q.put,
                    unjudged=finish, room=slots, buffers=n)
    intake.admit(part)          # a Part from the trigger mode's selector

Each part gets its sequence number and id ('<boot prefix>-<seq>'), the frame it is judged
on (presence mode: the crop of its box), and its preprocessed input in a pooled buffer, so
decoding and preprocessing the next frame overlap inference of this one. A part found
unusable here (unreadable, unfit for the model, a blank or frozen frame) carries that
reason to the inspect stage; a part that cannot be inspected at all (the selector's
FAILSAFE, or a live frame that finds the inspect queue full) is finished at once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from agent.runtime.capture import Slots
from agent.frame_checks import FrameChecker
from agent.runtime.inspector import Inspector
from agent.runtime.selector import Part
from agent.runtime.sources import Captured
from agent.types import FailsafeReason, Frame

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def _b36(n: int) -> str:
    s = ""
    while True:
        n, r = divmod(n, 36)
        s = _B36[r] + s
        if not n:
            return s


def boot_prefix() -> str:
    """A short prefix unique per start: base-36 milliseconds since the epoch (8 chars).
    Part ids are '<prefix>-<seq>': unique across restarts, no spaces, fit the serial line."""
    return _b36(time.time_ns() // 1_000_000)


@dataclass(slots=True)
class Work:
    """A part on the inspect queue."""
    frame: Frame
    pixels: np.ndarray | None        # the model input, preprocessed by `inspector`
    inspector: Inspector             # the one that preprocessed it (a swap may follow)
    t_pre_ns: int                    # preprocessing done
    extra: list = field(default_factory=list)   # judge = "worst": more frames' inputs
    problem: tuple[FailsafeReason, str] | None = None   # found unusable before inference


class Intake:
    def __init__(self, prefix: str, *, inspector: Callable[[], Inspector],
                 put: Callable[[Work], None],
                 unjudged: Callable[[Frame, FailsafeReason, str, Inspector], None],
                 room: Slots | None, buffers: int):
        self.prefix = prefix
        self._inspector = inspector
        self._put = put
        self._unjudged = unjudged
        self.room = room                 # live sources: a full queue is OVERLOAD
        self.n_buffers = buffers
        # agent.frame_checks.FrameChecker (it remembers the last frame for the frozen
        # check, so one per intake); None: no checks
        self.frame_checks: FrameChecker | None = None
        self.seq = 0
        self.queued = 0                  # put on the inspect queue and not yet taken
        # the capture thread and the supervisor (selector.poll) both admit parts
        self._lock = threading.Lock()
        self._pool: list[np.ndarray] = []
        self._pool_spec = None
        self._pool_i = 0

    def admit(self, part: Part) -> None:
        with self._lock:
            self.seq += 1
            seq = self.seq
            part_id = f"{self.prefix}-{seq}"
            if part.failsafe is not None:
                frame = Frame(seq, part_id, part.t_ref_ns, time.time(), None, part.ref,
                              part.encoder, part.t_ref_ns, part.detail)
                return self._unjudged(frame, part.failsafe, part.detail, self._inspector())
            self._queue(part, seq, part_id)

    def _queue(self, part: Part, seq: int, part_id: str) -> None:
        got = part.captured
        image = got.image
        if part.box is not None and image is not None:
            # presence mode: the part, not the belt around it, is what is judged (and kept)
            image = part.box.crop(image)
            got = Captured(image, got.ref, got.t_capture_ns, got.t_decoded_ns, got.error)
        frame = Frame(seq, part_id, part.t_ref_ns, time.time(), image,
                      f"{got.ref} {part.ref}" if part.ref else got.ref, part.encoder,
                      got.t_decoded_ns, got.error)
        if self.room is not None and not self.room.try_take():
            # A live frame and the inspector is behind: this part cannot be inspected in
            # time. FAILSAFE it now rather than drop it or let latency grow.
            return self._unjudged(frame, FailsafeReason.OVERLOAD, "", self._inspector())
        insp = self._inspector()
        pixels, problem = None, None
        if frame.error is not None:
            problem = (FailsafeReason.DECODE, frame.error)
        else:
            try:
                pixels = insp.preprocess(image, self._buffer(insp))
            except Exception as e:  # noqa: BLE001 - odd frame: FAILSAFE, never a crash
                problem = (FailsafeReason.PREPROCESS, f"{FailsafeReason.PREPROCESS}: {e}")
        if problem is None and self.frame_checks is not None:
            problem = self.frame_checks.find(image, insp.bundle.input_stats)
        more = []
        if problem is None:
            boxes = tuple(part.extra_boxes) + (None,) * (len(part.extra) - len(part.extra_boxes))
            for c, b in zip(part.extra, boxes):
                try:
                    more.append(insp.preprocess(c.image if b is None else b.crop(c.image)))
                except Exception:  # noqa: BLE001 - the main frame still judges the part
                    pass
        self.queued += 1
        self._put(Work(frame, pixels, insp, time.monotonic_ns(), more, problem))

    def _buffer(self, insp: Inspector) -> np.ndarray:
        if self._pool_spec is not insp.spec:
            self._pool = [insp.new_buffer() for _ in range(self.n_buffers)]
            self._pool_spec = insp.spec
        self._pool_i = (self._pool_i + 1) % len(self._pool)
        return self._pool[self._pool_i]


__all__ = ["Intake", "Work", "boot_prefix"]
