"""The Modbus RTU gate: a coil (or holding register) drives the reject solenoid.

A plain coil cannot schedule, so the HOST does: ``reject()`` pushes an "on" event at the
target time onto a heap; one scheduler thread sleeps until it is due (coarse wait, then a
short spin), writes on, and schedules "off" ``pulse_ms`` later. Overlapping pulses on one
gate merge (off happens after the latest pulse ends). The error between scheduled and
actual firing (write completed) is kept in ``fire_errors_ns`` for the benchmark.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from typing import Literal

from pydantic import Field

from ..timing import compute_target
from .base import Backoff, Gate, GateOutcome, PortConfig, RecentTrouble, quantiles_ms

log = logging.getLogger("firmware_io.gates.modbus")

SPIN_NS = 1_500_000     # the last 1.5 ms before a pulse are spun, not slept


class ModbusGateConfig(PortConfig):
    """``[gate] kind = "modbus"``: a PLC's coil or holding register, pulsed by the host."""
    kind: Literal["modbus"] = "modbus"
    modbus_slave: int = Field(1, ge=1, le=247)
    modbus_address: int = Field(0, ge=0, le=65535, description="the coil/register of `gate`")
    modbus_target: Literal["coil", "register"] = "coil"
    # several gates on one PLC: gate number -> address (default {gate: modbus_address})
    modbus_addresses: dict[int, int] = Field(default_factory=dict)
    modbus_timeout_s: float = Field(0.2, gt=0)
    modbus_on_value: int = Field(1, ge=1, le=65535, description="register mode: 'on' (off is 0)")
    # how often an idle gate reads its output back to notice a PLC that went away
    heartbeat_ms: int = Field(500, ge=50, le=60_000)

    @property
    def addresses(self) -> dict[int, int]:
        return self.modbus_addresses or {self.gate: self.modbus_address}


class ModbusGate(Gate):
    kind = "modbus"
    config = ModbusGateConfig
    settings: ModbusGateConfig

    def __init__(self, settings: ModbusGateConfig, link=None, **hooks):
        super().__init__(settings, link, **hooks)
        from pymodbus.client import ModbusSerialClient  # lazy: optional dependency
        from pymodbus import FramerType
        self._client_cls = ModbusSerialClient
        self._framer = FramerType.RTU
        self._client = None
        self._connected = False
        self._heap: list = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._off_at: dict[int, int] = {}           # gate -> ns the current pulse ends
        self._backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self._trouble = RecentTrouble(settings.degraded_window_s)
        self._next_connect_ns = 0
        self._opened_once = False
        self.fire_errors_ns: deque[int] = deque(maxlen=100_000)    # on-write done - scheduled
        self.issue_errors_ns: deque[int] = deque(maxlen=100_000)   # on-write start - scheduled
        self.last_error: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        if self._thread:
            return
        self._stop.clear()
        self._ensure_connected()
        self._thread = threading.Thread(target=self._loop, name="gate-modbus", daemon=True)
        self._thread.start()

    def close(self, drain_timeout_s: float | None = None) -> None:
        """Fire every kick still scheduled (they are host-timed: nobody else will), then
        stop. A kick not due within ``drain_timeout_s`` (default: the travel delay + 1 s) is
        reported through on_reject_failed as not kicked, never dropped silently."""
        if drain_timeout_s is None:
            drain_timeout_s = self.settings.timing.delay_ms / 1000 + 1.0
        t_end = time.monotonic() + drain_timeout_s
        while self._thread and self._scheduled() and time.monotonic() < t_end:
            time.sleep(0.005)
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread:
            self._thread.join(timeout=3)
            self._thread = None
        with self._cv:
            left = [e for e in self._heap if e[2] == "on"]
            self._heap = [e for e in self._heap if e[2] != "on"]
            heapq.heapify(self._heap)
        for _due, _, _action, _gate, part in sorted(left):
            self._count("abandoned_on_stop")
            log.error("modbus gate: stopped before the kick of part %s was due: NOT kicked",
                      part)
            self._callback(self.on_reject_failed, part, "stopped before firing")
        # leave every output off
        if self._connected:
            for g in list(self._off_at):
                self._write(g, False)
        self._disconnect()

    def _scheduled(self) -> int:
        """Scheduled writes (on and off) not done yet."""
        with self._cv:
            return len(self._heap)

    def counters(self) -> dict[str, int]:
        c = super().counters()
        with self._cv:
            c["pending"] = sum(1 for e in self._heap if e[2] == "on")
        return c

    def state(self) -> str:
        if not self._connected:
            return "down"
        return "degraded" if self._trouble.active() else "connected"

    def fire_error_quantiles(self) -> dict[str, float]:
        return quantiles_ms(list(self.fire_errors_ns))

    # ------------------------------------------------------------------ device
    def _ensure_connected(self) -> bool:
        if self._connected:
            return True
        now = time.monotonic_ns()
        if now < self._next_connect_ns:
            return False
        s = self.settings
        try:
            client = self._client_cls(s.port, framer=self._framer, baudrate=s.baud,
                                      timeout=s.modbus_timeout_s, retries=0)
            ok = client.connect()
        except Exception as exc:
            ok, client = False, None
            self.last_error = str(exc)
        if not ok:
            if client is not None:
                try:
                    client.close()
                except Exception:
                    pass
            self._next_connect_ns = now + int(self._backoff.next() * 1e9)
            return False
        self._client = client
        self._connected = True
        self._backoff.reset()
        if self._opened_once:
            self._count("reconnects")
            log.warning("modbus gate %s: reconnected", s.port)
        self._opened_once = True
        return True

    def _disconnect(self) -> None:
        c, self._client = self._client, None
        self._connected = False
        if c is not None:
            try:
                c.close()
            except Exception:
                pass

    def _write(self, gate: int, on: bool) -> bool:
        s = self.settings
        addr = s.addresses.get(gate)
        if addr is None:
            self._count("bad_gate")
            return False
        if not self._ensure_connected():
            self._count("write_down")
            return False
        try:
            if s.modbus_target == "coil":
                rr = self._client.write_coil(addr, on, device_id=s.modbus_slave)
            else:
                rr = self._client.write_register(addr, s.modbus_on_value if on else 0,
                                                 device_id=s.modbus_slave)
            if rr.isError():
                raise IOError(f"modbus exception response: {rr}")
            return True
        except Exception as exc:
            self._count("write_errors")
            self._trouble.mark(str(exc))
            self.last_error = str(exc)
            log.warning("modbus gate: write %s=%s failed: %s", addr, on, exc)
            self._disconnect()
            return False

    # ------------------------------------------------------------------ interface
    def reject(self, part_id: str, t_capture_ns: int, encoder: int | None = None,
               gate: int = 1) -> GateOutcome:
        now = time.monotonic_ns()
        # host-scheduled: a plain coil has no encoder input, so time mode always
        target = compute_target(self.settings.timing, t_capture_ns, None, now)
        if target.late:
            self._count("late")
        if gate not in self.settings.addresses:
            return GateOutcome(part_id, False, target.late, target.at, f"no address for gate {gate}")
        if not self._connected:
            self._count("dropped_down")
            return GateOutcome(part_id, False, target.late, target.at, "gate down")
        due = now if target.late else target.fire_at_ns
        with self._cv:
            heapq.heappush(self._heap, (due, next(self._order), "on", gate, part_id))
            self._cv.notify()
        self._count("sent")
        return GateOutcome(part_id, True, target.late, target.at)

    # ------------------------------------------------------------------ scheduler
    def _loop(self) -> None:
        s = self.settings
        hb_ns = int(s.heartbeat_ms * 1e6)
        last_io = time.monotonic_ns()
        while not self._stop.is_set():
            item = None
            with self._cv:
                now = time.monotonic_ns()
                if self._heap and self._heap[0][0] <= now:
                    item = heapq.heappop(self._heap)
                else:
                    wait_ns = self._heap[0][0] - now if self._heap else 50_000_000
                    wait_ns = min(wait_ns, 50_000_000)
                    if wait_ns > SPIN_NS:
                        self._cv.wait((wait_ns - SPIN_NS) / 1e9)
                        item = "idle"
            if item is None:
                time.sleep(0)            # spin the last stretch
                continue
            if item == "idle":
                now = time.monotonic_ns()
                if not self._connected:
                    self._ensure_connected()
                elif not self._heap and now - last_io > hb_ns:
                    last_io = now
                    self._health_check()
                continue
            due, _, action, gate, part = item
            if action == "on":
                t0 = time.monotonic_ns()
                ok = self._write(gate, True)
                t1 = time.monotonic_ns()
                last_io = t1
                if ok:
                    self.issue_errors_ns.append(t0 - due)
                    self.fire_errors_ns.append(t1 - due)
                    self._count("fired")
                    off = t1 + int(s.timing.pulse_ms * 1e6)
                    self._off_at[gate] = max(self._off_at.get(gate, 0), off)
                    with self._cv:
                        heapq.heappush(self._heap, (off, next(self._order), "off", gate, part))
                    self._callback(self.on_fired, part, gate, t1 // 1_000_000)
                else:
                    self._count("fire_failed")
                    self._callback(self.on_reject_failed, part, f"modbus: {self.last_error}")
            else:
                if due >= self._off_at.get(gate, 0):
                    if self._write(gate, False):
                        self._off_at.pop(gate, None)
                    else:
                        # retry the "off" soon: never leave a solenoid energised
                        with self._cv:
                            heapq.heappush(self._heap, (time.monotonic_ns() + 50_000_000,
                                                        next(self._order), "off", gate, part))
                        self._off_at[gate] = 0
                last_io = time.monotonic_ns()

    def _health_check(self) -> None:
        s = self.settings
        addr = next(iter(s.addresses.values()), 0)
        try:
            if s.modbus_target == "coil":
                rr = self._client.read_coils(addr, count=1, device_id=s.modbus_slave)
            else:
                rr = self._client.read_holding_registers(addr, count=1, device_id=s.modbus_slave)
            if rr.isError():
                raise IOError(str(rr))
        except Exception as exc:
            self._count("health_errors")
            self._trouble.mark(str(exc))
            log.warning("modbus gate: health check failed: %s", exc)
            self._disconnect()
