"""The "none" gate: a station without a reject gate. Records what it would have done."""

from __future__ import annotations

import threading
import time

from ..timing import compute_target
from . import register_gate
from .base import Gate, GateOutcome


@register_gate
class NullGate(Gate):
    kind = "none"

    def __init__(self, settings, link=None):
        super().__init__(settings, link)
        self.records: list[GateOutcome] = []
        self._rlock = threading.Lock()

    def open(self) -> None:
        pass

    def reject(self, part_id: str, t_capture_ns: int, encoder: int | None = None,
               gate: int = 1) -> GateOutcome:
        target = compute_target(self.settings.timing, t_capture_ns, encoder, time.monotonic_ns())
        out = GateOutcome(part_id, True, target.late, target.at)
        self._count("sent")
        if target.late:
            self._count("late")
        with self._rlock:
            self.records.append(out)
            if len(self.records) > 10_000:
                del self.records[:1000]
        return out

    def state(self) -> str:
        return "connected"

    def close(self) -> None:
        pass
