"""Gate interface, settings, outcome, and the small registry the backends plug into."""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

from ..timing import RejectTiming, quantile

log = logging.getLogger("firmware_io.gates")


@dataclass
class GateOutcome:
    part_id: str
    sent: bool
    late: bool
    target: str
    error: str | None = None


@dataclass
class GateSettings:
    """Everything any backend needs; each backend reads the fields it knows."""
    port: str = "/dev/ttyUSB0"
    baud: int = 115200
    timing: RejectTiming = field(default_factory=RejectTiming)
    # serial line protocol
    ack_timeout_ms: float = 100.0
    retries: int = 3                    # resends of an un-ACKed command (same seq)
    heartbeat_ms: float = 500.0
    hello_retry_ms: float = 1000.0
    send_accept: bool = False           # send ACC for passed parts (optional handshake)
    degraded_window_s: float = 5.0      # a timeout/NAK keeps the state "degraded" this long
    # reconnect backoff (serial and modbus)
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 5.0
    # modbus RTU
    slave_id: int = 1
    modbus_target: Literal["coil", "register"] = "coil"
    modbus_addresses: dict[int, int] = field(default_factory=lambda: {1: 0})   # gate -> address
    modbus_timeout_s: float = 0.2
    modbus_on_value: int = 1            # register mode: value written for "on" (off is 0)
    # mqtt
    mqtt_gate: str | None = None        # topic name of the gate; default: the gate number
    # callbacks (run on the gate's reader/scheduler thread; keep them short)
    on_trigger: Callable[[str, int], None] | None = None          # TRG <part> <encoder>
    on_fired: Callable[[str, int, int], None] | None = None       # FIRED <part> <gate> <t_ms>
    on_reject_failed: Callable[[str, str], None] | None = None    # (part, "NAK <code>"|"timeout"|...)

    def __post_init__(self):
        if self.modbus_target not in ("coil", "register"):
            raise ValueError("modbus_target must be 'coil' or 'register'")
        if self.retries < 0 or self.ack_timeout_ms <= 0 or self.heartbeat_ms <= 0:
            raise ValueError("retries >= 0, ack_timeout_ms > 0, heartbeat_ms > 0 required")


class Gate(ABC):
    """A reject gate. ``reject`` and ``accept`` never block on the device."""

    kind: ClassVar[str]

    def __init__(self, settings: GateSettings, link=None):
        self.settings = settings
        self.link = link
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

