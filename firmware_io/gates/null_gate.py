"""The "none" gate: a station without a reject gate. Records what it would have done.

Nothing is commanded, so what the station reports says so: state() is "none" (not
"connected"), and the outcome the pipeline gets has no target, is never late and is not
counted as sent (a part's reject event shows ``gate.commanded: false``; ``kicks.commanded``
in metrics stays 0). The would-be target is kept in ``records`` (counted as "recorded").
"""

from __future__ import annotations

import threading
import time
from typing import Literal

from ..timing import compute_target
from .base import Gate, GateConfig, GateOutcome


class NoneGateConfig(GateConfig):
    """``[gate] kind = "none"`` (the default): no gate; what it would do is recorded."""
    kind: Literal["none"] = "none"


class NullGate(Gate):
    kind = "none"
    config = NoneGateConfig

    def __init__(self, settings: NoneGateConfig | None = None, link=None, **hooks):
        super().__init__(settings or NoneGateConfig(), link, **hooks)
        self.records: list[GateOutcome] = []
        self._rlock = threading.Lock()

    def open(self) -> None:
        pass

    def reject(self, part_id: str, t_capture_ns: int, encoder: int | None = None,
               gate: int = 1) -> GateOutcome:
        target = compute_target(self.settings.timing, t_capture_ns, encoder, time.monotonic_ns())
        self._count("recorded")
        with self._rlock:
            self.records.append(GateOutcome(part_id, False, target.late, target.at))
            if len(self.records) > 10_000:
                del self.records[:1000]
        # sent=True: nothing failed (no "not sent" kick failure); target "": nothing was
        # commanded; late False: there is no gate for the part to be late at
        return GateOutcome(part_id, True, False, "")

    def state(self) -> str:
        return "none"

    def close(self) -> None:
        pass
