"""The serial gate: a reject-gate controller speaking the checksummed line protocol.

Threads: ``io`` (opens the port with exponential backoff, reads and dispatches lines,
notices a vanished device) and ``tick`` (heartbeats, HELLO retries, ACK timeouts and
bounded resends). ``reject()`` writes one short line under a lock and returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Literal

from pydantic import Field

from .. import protocol as P
from ..timing import compute_target
from .base import Backoff, Gate, GateOutcome, PortConfig, RecentTrouble, quantiles_ms
from .pending import Pending, PendingCommands

try:
    import serial  # pyserial: the runtime extra; the config below is checked without it
except ModuleNotFoundError:  # pragma: no cover
    serial = None

log = logging.getLogger("firmware_io.gates.serial")

NO_ENCODER_ERROR = "no encoder count (no TRG for this part): kick not sent"

# The reference gate firmware's fail-safe timeout without a heartbeat (CFG hb_timeout_ms,
# docs/serial-protocol.md section 7); the host's heartbeat must come well within it.
FIRMWARE_HB_TIMEOUT_MS = 2000


class SerialGateConfig(PortConfig):
    """``[gate] kind = "serial"``: our gate controller on the checksummed line protocol."""
    kind: Literal["serial"] = "serial"
    counts_encoder = True
    ack_timeout_ms: int = Field(100, ge=5, le=10_000)
    retries: int = Field(3, ge=0, le=20, description="resends of an un-ACKed command (same seq)")
    heartbeat_ms: int = Field(500, ge=50, le=60_000)
    hello_retry_ms: float = Field(1000.0, gt=0)
    send_accept: bool = Field(False, description="send ACC for passed parts (optional handshake)")

    def checks(self):
        return [*super().checks(), self._heartbeat_in_time, self._resends_in_time]

    def _heartbeat_in_time(self):
        if self.heartbeat_ms >= FIRMWARE_HB_TIMEOUT_MS:
            return "heartbeat_ms", (
                f"{self.heartbeat_ms} ms is not shorter than the gate firmware's heartbeat "
                f"timeout ({FIRMWARE_HB_TIMEOUT_MS} ms): the gate would divert every part "
                "as if the host were gone")

    def _resends_in_time(self):
        if self.delay_ms is not None and self.retries \
                and self.ack_timeout_ms * self.retries > self.delay_ms:
            return "retries", (
                f"the last resend of an unanswered reject would leave "
                f"{self.ack_timeout_ms * self.retries} ms (ack_timeout_ms {self.ack_timeout_ms} "
                f"x retries {self.retries}) after the first, when the part is past the gate "
                f"(delay_ms {self.delay_ms:g}); lower retries or ack_timeout_ms")


class SerialGate(Gate):
    kind = "serial"
    config = SerialGateConfig
    settings: SerialGateConfig

    def __init__(self, settings: SerialGateConfig, link=None, **hooks):
        if serial is None:
            raise ModuleNotFoundError("the serial gate needs pyserial "
                                      "(pip install 'edge-inspect[runtime]')", name="serial")
        super().__init__(settings, link, **hooks)
        self._ser: serial.SerialBase | None = None
        self._wlock = threading.Lock()          # guards _ser swaps and writes
        self._pending = PendingCommands()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._parser = P.LineParser("to_host", name=f"serial {settings.port}")
        self._backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self._trouble = RecentTrouble(settings.degraded_window_s)
        self._hello_ok = False
        self._last_hello_ns = 0
        self._last_hb_ns = 0
        self._last_hb_ack_ns = 0
        self._opened_once = False
        self.fw: str | None = None
        self.proto: int | None = None
        self.fault: tuple[str, str] | None = None     # active FAULT (code, text)
        self.rtt_ns: deque[int] = deque(maxlen=100_000)   # REJ write -> ACK round trips
        self.last_error: str | None = None
        self._logged_errors: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        self._try_open()            # one quick attempt now; never raises
        for name, fn in (("io", self._io_loop), ("tick", self._tick_loop)):
            t = threading.Thread(target=fn, name=f"gate-serial-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self._threads.clear()
        self._drop_port("closed", fail_pending=True, log_it=False)

    # ------------------------------------------------------------------ state
    def state(self) -> str:
        if self._ser is None:
            return "down"
        now = time.monotonic_ns()
        hb_ns = int(self.settings.heartbeat_ms * 1e6)
        hb_stale = (self._last_hb_ns and self._last_hb_ns - self._last_hb_ack_ns > 2 * hb_ns
                    and now - self._last_hb_ack_ns > 3 * hb_ns)
        if not self._hello_ok or self._trouble.active() or self.fault or hb_stale:
            return "degraded"
        return "connected"

    def counters(self) -> dict[str, int]:
        c = super().counters()
        for k, v in self._parser.errors.items():
            c[f"parse_{k}"] = v
        c["pending"] = len(self._pending)
        return c

    def rtt_quantiles(self) -> dict[str, float]:
        return quantiles_ms(list(self.rtt_ns))

    # ------------------------------------------------------------------ commands
    def reject(self, part_id: str, t_capture_ns: int, encoder: int | None = None,
               gate: int = 1) -> GateOutcome:
        timing = self.settings.timing
        now = time.monotonic_ns()
        if timing.mode == "encoder" and encoder is None:
            # No TRG latched a count for this part: any target would be a guess (d0 kicks
            # whatever is at the gate now), so no kick is sent and the caller is told.
            self._count("no_encoder")
            return GateOutcome(part_id, False, False, "", NO_ENCODER_ERROR)
        target = compute_target(timing, t_capture_ns, encoder, now)
        if target.late:
            self._count("late")
        if self._ser is None:
            self._count("dropped_down")
            return GateOutcome(part_id, False, target.late, target.at, "gate down")
        seq = self._pending.next_seq()
        try:
            line = P.Reject(seq, part_id, int(gate), target.at, int(timing.pulse_ms)).encode()
        except P.ProtocolError as exc:
            self._count("bad_command")
            return GateOutcome(part_id, False, target.late, target.at, str(exc))
        self._pending.add(Pending(seq, "REJ", part_id, int(gate), target, int(timing.pulse_ms),
                                  now, now))
        err = self._write(line)
        if err:
            self._pending.discard(seq)
            return GateOutcome(part_id, False, target.late, target.at, err)
        self._count("sent")
        return GateOutcome(part_id, True, target.late, target.at)

    def accept(self, part_id: str) -> None:
        self._count("accepted")
        if not self.settings.send_accept or self._ser is None:
            return
        seq = self._pending.next_seq()
        try:
            line = P.Accept(seq, part_id).encode()
        except P.ProtocolError:
            self._count("bad_command")
            return
        now = time.monotonic_ns()
        self._pending.add(Pending(seq, "ACC", part_id, 0, None, 0, now, now))
        if self._write(line):
            self._pending.discard(seq)
        else:
            self._count("acc_sent")

    def send_config(self, key: str, value) -> int | None:
        """Send ``CFG <seq> <key> <value>``; returns the seq (ACK/NAK tracked like REJ)."""
        if self._ser is None:
            return None
        seq = self._pending.next_seq()
        line = P.Config(seq, key, str(value)).encode()
        now = time.monotonic_ns()
        self._pending.add(Pending(seq, "CFG", key, 0, None, 0, now, now, value=str(value)))
        if self._write(line):
            self._pending.discard(seq)
            return None
        self._count("cfg_sent")
        return seq

    # ------------------------------------------------------------------ port handling
    def _write(self, data: bytes) -> str | None:
        """Write one line; on failure drop the port and return the error text."""
        with self._wlock:
            ser = self._ser
            if ser is None:
                self._count("dropped_down")
                return "gate down"
            try:
                ser.write(data)
                return None
            except (serial.SerialException, OSError) as exc:
                err = f"write failed: {exc}"
        self._drop_port(err, fail_pending=True)
        return err

    def _try_open(self) -> bool:
        try:
            # a device path, or a pyserial URL: spy://PORT logs the wire, socket://HOST:PORT
            ser = serial.serial_for_url(self.settings.port, self.settings.baud, timeout=0.05,
                                        write_timeout=0.2)
        except (serial.SerialException, OSError, ValueError) as exc:
            self.last_error = f"open {self.settings.port}: {exc}"
            return False
        try:
            ser.reset_input_buffer()
        except Exception:
            pass
        with self._wlock:
            self._ser = ser
        self._parser.reset()        # a half line from the old connection is not a line
        if self._opened_once:
            self._count("reconnects")
            log.warning("serial gate %s: reconnected", self.settings.port)
        else:
            log.info("serial gate %s: opened", self.settings.port)
        self._opened_once = True
        self._backoff.reset()
        self._hello_ok = False
        self._last_hb_ack_ns = time.monotonic_ns()
        self._last_hb_ns = 0
        self._send_hello()
        return True

    def _drop_port(self, reason: str, fail_pending: bool = True, log_it: bool = True) -> None:
        with self._wlock:
            ser, self._ser = self._ser, None
        if ser is None:
            return
        try:
            ser.close()
        except Exception:
            pass
        self.last_error = reason
        self._hello_ok = False
        if log_it:
            log.warning("serial gate %s: port lost (%s); reconnecting", self.settings.port, reason)
            self._count("disconnects")
        if fail_pending:
            for p in self._pending.drop_all():
                self._count("lost_on_disconnect")
                if p.verb == "REJ":
                    self._callback(self.on_reject_failed, p.part, "disconnected")

    def _send_hello(self) -> None:
        self._last_hello_ns = time.monotonic_ns()
        if self._write(P.Hello().encode()) is None:
            self._count("hello_sent")

    # ------------------------------------------------------------------ threads
    def _io_loop(self) -> None:
        while not self._stop.is_set():
            ser = self._ser
            if ser is None:
                if not self._try_open():
                    self._stop.wait(self._backoff.next())
                continue
            try:
                data = ser.read(ser.in_waiting or 1)
            except (serial.SerialException, OSError, TypeError, AttributeError) as exc:
                if self._stop.is_set():
                    break
                self._drop_port(f"read failed: {exc}")
                continue
            if not data:
                continue
            try:
                msgs = self._parser.feed(data)
            except Exception:           # the parser never raises; belt and braces
                log.exception("serial gate: parser failed")
                continue
            self._log_parse_errors()
            for m in msgs:
                try:
                    self._handle(m)
                except Exception:
                    log.exception("serial gate: handling %r failed", m)

    def _log_parse_errors(self) -> None:
        for kind, n in self._parser.errors.items():
            seen = self._logged_errors.get(kind, 0)
            if n > seen:
                if seen == 0 or n // 100 > seen // 100:
                    log.warning("serial gate %s: %d line(s) with %s", self.settings.port, n, kind)
                self._logged_errors[kind] = n

    def _handle(self, m: P.Message) -> None:
        now = time.monotonic_ns()
        if isinstance(m, P.Ack):
            p, hb = self._pending.answered(m.seq)
            if p is not None:
                if p.verb == "REJ":
                    self._count("acked")
                    self.rtt_ns.append(now - p.first_ns)
                else:
                    self._count(f"{p.verb.lower()}_acked")
            elif hb is not None:
                self._count("hb_acked")
                self._last_hb_ack_ns = now
            else:
                self._count("ack_unknown")       # a duplicate ACK of a resend: harmless
        elif isinstance(m, P.Nak):
            p, _ = self._pending.answered(m.seq, heartbeat_too=False)
            self._count("naked")
            self._count(f"nak_{m.code}")
            self._trouble.mark(f"NAK {m.code}")
            log.warning("serial gate: NAK seq=%d code=%s (%s)", m.seq, m.code,
                        p.part if p else "unknown seq")
            if p is not None and p.verb == "REJ":
                self._callback(self.on_reject_failed, p.part, f"NAK {m.code}")
        elif isinstance(m, P.Fired):
            self._count("fired")
            self._callback(self.on_fired, m.part, m.gate, m.t_ms)
        elif isinstance(m, P.Trigger):
            self._count("triggers")
            self._callback(self.on_trigger, m.part, m.encoder)
        elif isinstance(m, P.HelloReply):
            self._count("hello_replies")
            self._hello_ok = True
            self.fw, self.proto = m.fw, m.proto
            if m.proto != P.PROTO_VERSION:
                log.warning("serial gate: controller speaks proto %d, host %d",
                            m.proto, P.PROTO_VERSION)
        elif isinstance(m, P.Fault):
            if m.code == "CLEAR":
                self._count("fault_clears")
                log.warning("serial gate: fault cleared (%s)", m.text)
                self.fault = None
            else:
                self._count("faults")
                log.error("serial gate: FAULT %s %s", m.code, m.text)
                self.fault = (m.code, m.text)
        else:
            self._count("unexpected")

    def _tick_loop(self) -> None:
        s = self.settings
        ack_ns = int(s.ack_timeout_ms * 1e6)
        hb_ns = int(s.heartbeat_ms * 1e6)
        period = max(0.002, min(s.ack_timeout_ms / 5000, s.heartbeat_ms / 5000, 0.02))
        while not self._stop.wait(period):
            if self._ser is None:
                continue
            now = time.monotonic_ns()
            if not self._hello_ok and now - self._last_hello_ns > s.hello_retry_ms * 1e6:
                self._send_hello()
            if now - self._last_hb_ns >= hb_ns:
                self._last_hb_ns = now
                seq = self._pending.next_seq()
                self._pending.heartbeat(seq, now)
                if self._write(P.Heartbeat(seq).encode()) is None:
                    self._count("hb_sent")
            resend, expired = self._pending.due(now, ack_ns, s.retries)
            for p in resend:
                self._count("resent")
                self._write(p.line(now))
            for p in expired:
                self._count("timeouts")
                self._trouble.mark(f"timeout seq={p.seq}")
                log.warning("serial gate: no ACK for %s seq=%d part=%s after %d tries",
                            p.verb, p.seq, p.part, p.tries)
                if p.verb == "REJ":
                    self._callback(self.on_reject_failed, p.part, "timeout")
