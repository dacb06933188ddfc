"""The kick ledger: every reject the gate did not carry out, counted and told.

`gate.reject()` returns as soon as the command is on its way; whether the gate takes it is
known later, on the gate's own thread (serial: NAK or no ACK after the resends, the port
lost with the command pending; Modbus: the coil write failed, or the agent stopped before
the kick was due). Some failures are known at once (gate down, no encoder count). A part
whose kick failed is a defect on its way to the customer, so each one ends here whatever
its origin: a durable alert on ``events/reject_failed`` (part id, reason), a count by kind
(Prometheus, metrics, status), and the station reported "degraded" for ``degraded_s``.

Gate threads only call `failed()` (a counter and a queue put); the supervisor publishes
with `drain(link)`, so an fsync of the outbox never holds up a gate thread.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

log = logging.getLogger("kicks")

# failure kinds: bounded label values for Prometheus; the full reason goes in the event
KINDS = ("nak", "timeout", "disconnected", "down", "no_encoder", "stopped", "write_failed",
         "other")


@dataclass(frozen=True)
class KickFailure:
    part: str
    reason: str         # as the gate said it: "NAK FULL", "timeout", "gate down", ...
    kind: str           # one of KINDS
    t_wall: float
    immediate: bool     # known when the command was made (vs. reported later by the gate)

    def event(self) -> dict:
        d = asdict(self)
        d["kicked"] = False
        d["ts"] = round(d.pop("t_wall"), 3)
        return d


def failure_kind(reason: str) -> str:
    r = reason.lower()
    for key, kind in (("nak", "nak"), ("timeout", "timeout"), ("no ack", "timeout"),
                      ("disconnect", "disconnected"), ("closed", "disconnected"),
                      ("gate down", "down"), ("encoder", "no_encoder"), ("stopped", "stopped"),
                      ("write failed", "write_failed"), ("modbus", "write_failed")):
        if key in r:
            return kind
    return "other"


class KickLedger:
    def __init__(self, degraded_s: float = 30.0,
                 on_count: Callable[[KickFailure], None] | None = None):
        self.degraded_s = float(degraded_s)
        self.on_count = on_count
        self._lock = threading.Lock()
        self._q: queue.SimpleQueue[KickFailure] = queue.SimpleQueue()
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.last: KickFailure | None = None
        self._last_mono = 0.0
        self.published = 0
        self.publish_errors = 0

    def failed(self, part: str, reason: str, immediate: bool = False) -> KickFailure:
        f = KickFailure(part, reason, failure_kind(reason), time.time(), immediate)
        with self._lock:
            self.by_kind[f.kind] += 1
            self.last = f
            self._last_mono = time.monotonic()
        log.error("part %s NOT kicked: %s (a rejected part may be on its way out)", part, reason)
        if self.on_count is not None:
            try:
                self.on_count(f)
            except Exception:  # noqa: BLE001 - counting must not break the gate thread
                log.exception("kick failure hook failed")
        self._q.put(f)
        return f

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.by_kind.values())

    def active(self) -> bool:
        """A kick failed within the last degraded_s seconds."""
        return self._last_mono > 0 and time.monotonic() - self._last_mono < self.degraded_s

    def drain(self, link) -> int:
        """Publish the failures queued so far as durable alerts (no link: just forget them,
        they are logged and counted). Returns how many were taken off the queue."""
        n = 0
        while True:
            try:
                f = self._q.get_nowait()
            except queue.Empty:
                return n
            n += 1
            if link is None:
                continue
            try:
                link.publish_alert(f.event(), suffix="events/reject_failed")
                self.published += 1
            except Exception as e:  # noqa: BLE001 - e.g. outbox full: counted, logged
                self.publish_errors += 1
                log.error("part %s: reject_failed event not queued: %s", f.part, e)

    def counters(self) -> dict:
        with self._lock:
            out = {"failed": sum(self.by_kind.values()), "failed_reasons": dict(self.by_kind)}
            if self.last is not None:
                out["last_failure"] = {"part": self.last.part, "reason": self.last.reason,
                                       "ts": round(self.last.t_wall, 3)}
        return out
