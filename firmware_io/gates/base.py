"""Gate interface, outcome, the config every gate kind extends, and small shared helpers."""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, ClassVar, Optional

from pydantic import ConfigDict, Field

from ..checked import Checked
from ..timing import PulseMs, RejectTiming, TravelMs, quantile

log = logging.getLogger("firmware_io.gates")


@dataclass
class GateOutcome:
    part_id: str
    sent: bool
    late: bool
    target: str
    error: str | None = None


class GateConfig(Checked):
    """What every gate kind is configured with. Each backend extends it with its own keys
    and ``kind: Literal[...]``; ``[gate]`` is the union of them, discriminated by kind."""
    # frozen: a running gate's settings change only by building a new gate (a restart)
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    # counts an encoder itself, so it can fire at a count (encoder mode)
    counts_encoder: ClassVar[bool] = False

    gate: int = Field(1, ge=1, le=99, description="gate number on the controller")
    delay_ms: Optional[TravelMs] = Field(None, description="camera-to-gate travel (time mode)")
    encoder_offset: Optional[int] = Field(None, ge=0, description="encoder counts camera-to-gate")
    pulse_ms: PulseMs = 50

    @property
    def mode(self) -> str:
        return "encoder" if self.encoder_offset is not None else "time"

    @cached_property
    def timing(self) -> RejectTiming:
        return RejectTiming(mode=self.mode, delay_ms=self.delay_ms or 0.0,
                            encoder_offset=self.encoder_offset or 0, pulse_ms=self.pulse_ms)

    def checks(self):
        return [self._one_timing, self._timing_needed, self._encoder_counted]

    def _one_timing(self):
        if self.delay_ms is not None and self.encoder_offset is not None:
            return "", "set delay_ms (time mode) or encoder_offset (encoder mode), not both"

    def _timing_needed(self):
        if self.kind != "none" and self.delay_ms is None and self.encoder_offset is None:
            return "", (f"a {self.kind} gate needs delay_ms (time mode) or encoder_offset "
                        "(encoder mode) to know when the part reaches it")

    def _encoder_counted(self):
        if self.encoder_offset is not None and not self.counts_encoder:
            return "encoder_offset", ("encoder mode needs a gate controller that counts the "
                                      f"encoder (kind = 'serial'), not {self.kind!r}")


class PortConfig(GateConfig):
    """A gate behind a serial port (a device path or, for the serial gate, a pyserial URL)."""
    port: Optional[str] = None
    baud: int = Field(115200, gt=0)
    # reconnect backoff while the adapter is away
    reconnect_min_s: float = Field(0.1, gt=0)
    reconnect_max_s: float = Field(5.0, gt=0)
    # a timeout or error keeps the state "degraded" this long
    degraded_window_s: float = Field(5.0, gt=0)

    def checks(self):
        return [*super().checks(), self._port_named]

    def _port_named(self):
        if not self.port:
            return "port", f"a {self.kind} gate needs the serial port (e.g. /dev/ttyUSB0)"


class Gate(ABC):
    """A reject gate. ``reject`` and ``accept`` never block on the device."""

    kind: ClassVar[str]

    def __init__(self, settings: GateConfig, link=None, *,
                 on_trigger: Callable[[str, int], None] | None = None,
                 on_fired: Callable[[str, int, int], None] | None = None,
                 on_reject_failed: Callable[[str, str], None] | None = None):
        self.settings = settings
        self.link = link
        # run on the gate's reader/scheduler thread; keep them short
        self.on_trigger = on_trigger                  # TRG <part> <encoder>
        self.on_fired = on_fired                      # FIRED <part> <gate> <t_ms>
        self.on_reject_failed = on_reject_failed      # (part, "NAK <code>"|"timeout"|...)
        self._clock = threading.Lock()
        self._counters: dict[str, int] = {}

    # -- helpers for subclasses
    def _count(self, key: str, n: int = 1) -> None:
        with self._clock:
            self._counters[key] = self._counters.get(key, 0) + n

    def _callback(self, fn, *args) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:   # a user callback must never kill a gate thread
            log.exception("%s gate: callback %r failed", self.kind, fn)

    # -- the interface
    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def reject(self, part_id: str, t_capture_ns: int, encoder: int | None = None,
               gate: int = 1) -> GateOutcome: ...

    def accept(self, part_id: str) -> None:
        self._count("accepted")

    @abstractmethod
    def state(self) -> str: ...

    def counters(self) -> dict[str, int]:
        with self._clock:
            return dict(self._counters)

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()


class Backoff:
    """Exponential reconnect backoff: min, 2*min, ... capped at max; reset() on success."""

    def __init__(self, min_s: float, max_s: float):
        self.min_s, self.max_s = min_s, max_s
        self.current = min_s

    def next(self) -> float:
        d = self.current
        self.current = min(self.max_s, self.current * 2)
        return d

    def reset(self) -> None:
        self.current = self.min_s


class RecentTrouble:
    """Timestamps of recent problems; ``active()`` while one is younger than the window."""

    def __init__(self, window_s: float):
        self.window_ns = int(window_s * 1e9)
        self.last_ns: int | None = None
        self.last_reason = ""

    def mark(self, reason: str) -> None:
        self.last_ns = time.monotonic_ns()
        self.last_reason = reason

    def active(self) -> bool:
        return self.last_ns is not None and time.monotonic_ns() - self.last_ns < self.window_ns


def quantiles_ms(samples_ns, qs=(0.5, 0.99)) -> dict[str, float]:
    s = sorted(samples_ns)
    if not s:
        return {}
    out = {}
    for q in qs:
        out[f"p{int(q * 100)}"] = quantile(s, q) / 1e6
    out["max"] = s[-1] / 1e6
    out["n"] = len(s)
    return out

