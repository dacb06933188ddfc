"""A simulated reject-gate controller that speaks the serial line protocol.

It does what the firmware is specified to do in docs/serial-protocol.md: answers HELLO,
ACKs heartbeats and commands, de-duplicates by seq, fires each pulse at its ``d<ms>`` or
``e<count>`` target (a simulated encoder advances at ``encoder_rate`` counts/s), reports
``FIRED``, enters fail-safe (divert everything, ``FAULT HBLOST``) when heartbeats stop and
leaves it (``FAULT CLEAR``) when they resume, and can emit ``TRG`` part-present triggers.
For tests it can be told to NAK everything (``nak_code``), go silent (``silent``) or drop
the next N ACKs (``drop_acks``, to exercise resends).

    sim = GateSimulator(fd=pty_master).start()
    ...
    sim.fired  # [FiredEvent(part, gate, t_ms, scheduled_ns, actual_ns, ...)]

CLI (firmware_io.gate_sim_cli): ``gate-sim --pty`` prints the host-side tty path on stdout
and runs until SIGTERM.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import select
import threading
import time
import tty
from collections import OrderedDict
from dataclasses import dataclass, field

from . import protocol as P

log = logging.getLogger("firmware_io.gate_sim")

ENC_MOD = 2**32


@dataclass
class FiredEvent:
    part: str
    gate: int
    t_ms: int               # the simulated controller's clock (ms since it started)
    scheduled_ns: int       # host monotonic_ns the pulse was due
    actual_ns: int          # host monotonic_ns it fired
    seq: int
    at: str
    failsafe: bool = False

    @property
    def error_ms(self) -> float:
        return (self.actual_ns - self.scheduled_ns) / 1e6


@dataclass
class SimCounters:
    rx_lines: int = 0
    hello: int = 0
    hb: int = 0
    rej: int = 0
    acc: int = 0
    cfg: int = 0
    duplicates: int = 0
    acks: int = 0
    naks: int = 0
    acks_dropped: int = 0
    fired: int = 0
    triggers: int = 0
    failsafe_entries: int = 0
    failsafe_exits: int = 0
    tx_dropped: int = 0
    errors: dict = field(default_factory=dict)


class GateSimulator:
    def __init__(self, port: str | None = None, fd: int | None = None, *, fw: str = "sim-1.0",
                 gates: tuple[int, ...] = (1, 2, 3, 4), hb_timeout_ms: float = 2000.0,
                 encoder_rate: float = 1000.0, encoder_start: int = 0,
                 trigger_hz: float = 0.0, max_scheduled: int = 256,
                 dedupe_window: int = 256, late_window_ms: float = 10_000.0):
        if (port is None) == (fd is None):
            raise ValueError("give exactly one of port (a tty path) or fd (a pty master)")
        self.port = port
        self._fd: int | None = fd
        self._own_fd = False
        self.fw = fw
        self.gates = tuple(gates)
        self.hb_timeout_ms = float(hb_timeout_ms)
        self.encoder_rate = float(encoder_rate)
        self.trigger_hz = float(trigger_hz)
        self.max_scheduled = max_scheduled
        self.late_window_ms = late_window_ms
        self._dedupe: OrderedDict[int, bytes] = OrderedDict()
        self._dedupe_window = dedupe_window
        self._t0 = time.monotonic_ns()
        self._enc0 = int(encoder_start)
        self._enc_t0 = self._t0
        self._heap: list = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._wlock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._parser = P.LineParser("to_gate", name="gate-sim")
        self._last_hb_ns: int | None = None    # None: not armed until the host speaks
        self._next_trg_ns = 0
        self._trg_n = 0
        # observable state for tests
        self.fired: list[FiredEvent] = []
        self.received: list[P.Message] = []
        self.triggers: list[tuple[str, int]] = []
        self.faults: list[tuple[str, str]] = []
        self.config: dict[str, str] = {}
        self.failsafe = False
        self.counters = SimCounters()
        # fault injection
        self.nak_code: str | None = None
        self.silent = False
        self.drop_acks = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "GateSimulator":
        if self._fd is None:
            self._open_path()
        self._prep_fd()
        self._stop.clear()
        for name, fn in (("rx", self._rx_loop), ("sched", self._sched_loop)):
            t = threading.Thread(target=fn, name=f"gate-sim-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=2)
        self._threads.clear()
        if self._own_fd:
            self._close_fd()

    close = stop

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _open_path(self) -> None:
        self._fd = os.open(self.port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self._own_fd = True

    def _prep_fd(self) -> None:
        try:
            tty.setraw(self._fd)
        except Exception:
            pass
        os.set_blocking(self._fd, False)

    def _close_fd(self) -> None:
        with self._wlock:
            fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def swap_fd(self, fd: int | None) -> None:
        """Tests: detach from the current line (None) or attach to a new pty master."""
        with self._wlock:
            self._fd = fd
        self._parser.reset()
        if fd is not None:
            self._prep_fd()

    # ------------------------------------------------------------------ clock & encoder
    def t_ms(self, now_ns: int | None = None) -> int:
        return ((now_ns or time.monotonic_ns()) - self._t0) // 1_000_000 % ENC_MOD

    def encoder(self, now_ns: int | None = None) -> int:
        now_ns = now_ns or time.monotonic_ns()
        return int(self._enc0 + self.encoder_rate * (now_ns - self._enc_t0) / 1e9) % ENC_MOD

    def _encoder_time_ns(self, count: int, now_ns: int) -> int:
        ahead = (count - self.encoder(now_ns)) % ENC_MOD
        if ahead >= ENC_MOD // 2 or self.encoder_rate <= 0:
            return now_ns if ahead >= ENC_MOD // 2 else now_ns + 10**15
        return now_ns + int(ahead / self.encoder_rate * 1e9)

    # ------------------------------------------------------------------ line I/O
    def send(self, msg: P.Message | bytes) -> None:
        data = msg if isinstance(msg, bytes) else msg.encode()
        with self._wlock:
            if self._fd is None:
                return
            try:
                os.write(self._fd, data)
            except (BlockingIOError, OSError):
                self.counters.tx_dropped += 1

    def inject(self, raw: bytes) -> None:
        """Tests: put raw bytes (garbage, broken lines) on the line to the host."""
        self.send(raw)

    def _rx_loop(self) -> None:
        while not self._stop.is_set():
            fd = self._fd
            if fd is None:
                self._stop.wait(0.02)
                continue
            try:
                r, _, _ = select.select([fd], [], [], 0.05)
                if not r:
                    continue
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            except (OSError, ValueError) as exc:
                # EIO: no host has the tty open (yet); EBADF: swapped/closed under us
                if getattr(exc, "errno", None) not in (errno.EIO, errno.EBADF, None):
                    log.warning("gate-sim read: %s", exc)
                self._stop.wait(0.02)
                continue
            if not data:
                self._stop.wait(0.02)
                continue
            for m in self._parser.feed(data):
                try:
                    self._handle(m)
                except Exception:
                    log.exception("gate-sim: handling %r", m)
            self.counters.errors = dict(self._parser.errors)

    def _reply(self, seq: int, msg: P.Message, remember: bool = True) -> None:
        data = msg.encode()
        if remember:
            self._dedupe[seq] = data
            while len(self._dedupe) > self._dedupe_window:
                self._dedupe.popitem(last=False)
        if isinstance(msg, P.Ack):
            if self.drop_acks > 0:
                self.drop_acks -= 1
                self.counters.acks_dropped += 1
                return
            self.counters.acks += 1
        else:
            self.counters.naks += 1
        self.send(data)

    def _handle(self, m: P.Message) -> None:
        now = time.monotonic_ns()
        self.counters.rx_lines += 1
        self.received.append(m)
        if self.silent:
            return
        if isinstance(m, P.Hello):
            self.counters.hello += 1
            self._dedupe.clear()            # a new host session restarts its seqs
            self._feed_watchdog(now)
            self.send(P.HelloReply(self.fw, P.PROTO_VERSION))
            return
        if getattr(m, "seq", None) == 0:
            # seq 0 is never used (protocol section 4): a host that sends it is broken, and
            # an ACK would hide that; not a heartbeat either, so the watchdog is not fed
            self.counters.naks += 1
            self.send(P.Nak(0, "BADARG"))
            return
        if isinstance(m, P.Heartbeat):
            self.counters.hb += 1
            self._feed_watchdog(now)
            self.counters.acks += 1         # (drop_acks applies to commands only)
            self.send(P.Ack(m.seq))
            return
        seq = m.seq
        if seq in self._dedupe:             # a resend: answer the same, do nothing again
            self.counters.duplicates += 1
            data = self._dedupe[seq]
            if self.drop_acks > 0 and data.startswith(b"ACK"):
                self.drop_acks -= 1
                self.counters.acks_dropped += 1
                return
            self.send(data)
            return
        if self.nak_code:
            self._reply(seq, P.Nak(seq, self.nak_code))
            return
        if isinstance(m, P.Reject):
            self.counters.rej += 1
            self._reply(seq, self._schedule(m, now))
        elif isinstance(m, P.Accept):
            self.counters.acc += 1
            self._reply(seq, P.Ack(seq))
        elif isinstance(m, P.Config):
            self.counters.cfg += 1
            self._reply(seq, self._configure(m))

    def _schedule(self, m: P.Reject, now: int) -> P.Message:
        if m.gate not in self.gates:
            return P.Nak(m.seq, "BADGATE")
        if not 1 <= m.pulse_ms <= 10_000:
            return P.Nak(m.seq, "BADARG")
        if m.at_kind == "d":
            if m.at_value > 600_000:
                return P.Nak(m.seq, "BADARG")
            due = now + m.at_value * 1_000_000
        else:
            due = self._encoder_time_ns(m.at_value, now)
        with self._cv:
            if len(self._heap) >= self.max_scheduled:
                return P.Nak(m.seq, "FULL")
            heapq.heappush(self._heap, (due, next(self._order), m))
            self._cv.notify()
        return P.Ack(m.seq)

    def _configure(self, m: P.Config) -> P.Message:
        try:
            if m.key == "hb_timeout_ms":
                v = float(m.value)
                if v <= 0:
                    raise ValueError
                self.hb_timeout_ms = v
            elif m.key == "encoder_rate":
                rate = float(m.value)
                now = time.monotonic_ns()
                self._enc0, self._enc_t0 = self.encoder(now), now
                self.encoder_rate = rate
            elif m.key == "trigger_hz":
                self.trigger_hz = float(m.value)
            else:
                return P.Nak(m.seq, "BADKEY")
        except ValueError:
            return P.Nak(m.seq, "BADKEY")
        self.config[m.key] = m.value
        return P.Ack(m.seq)

    # ------------------------------------------------------------------ watchdog
    def _feed_watchdog(self, now: int) -> None:
        self._last_hb_ns = now
        if self.failsafe:
            self.failsafe = False
            self.counters.failsafe_exits += 1
            self.faults.append(("CLEAR", "heartbeat resumed"))
            log.warning("gate-sim: heartbeat resumed, leaving fail-safe")
            self.send(P.Fault("CLEAR", "heartbeat resumed"))

    def _check_watchdog(self, now: int) -> None:
        if self.failsafe or self._last_hb_ns is None or self.silent:
            return
        if now - self._last_hb_ns > self.hb_timeout_ms * 1e6:
            self.failsafe = True
            self.counters.failsafe_entries += 1
            text = f"no heartbeat for {self.hb_timeout_ms:.0f} ms, diverting all"
            self.faults.append(("HBLOST", text))
            log.warning("gate-sim: %s", text)
            self.send(P.Fault("HBLOST", text))

    # ------------------------------------------------------------------ scheduler
    def _sched_loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic_ns()
            self._check_watchdog(now)
            if self.trigger_hz > 0 and now >= self._next_trg_ns:
                self._next_trg_ns = now + int(1e9 / self.trigger_hz)
                self._trg_n += 1
                part, enc = f"T{self._trg_n}", self.encoder(now)
                self.triggers.append((part, enc))
                self.counters.triggers += 1
                if not self.silent:
                    self.send(P.Trigger(part, enc))
            due_item = None
            with self._cv:
                if self._heap and self._heap[0][0] <= now:
                    due_item = heapq.heappop(self._heap)
                else:
                    wait_ns = 10_000_000
                    if self._heap:
                        wait_ns = min(wait_ns, self._heap[0][0] - now)
                    if wait_ns > 1_500_000:
                        self._cv.wait((wait_ns - 1_000_000) / 1e9)
                        continue
            if due_item is None:
                # final stretch: spin politely to land within ~0.1 ms
                time.sleep(0)
                continue
            due, _, m = due_item
            actual = time.monotonic_ns()
            ev = FiredEvent(m.part, m.gate, self.t_ms(actual), due, actual, m.seq, m.at,
                            self.failsafe)
            self.fired.append(ev)
            self.counters.fired += 1
            if not self.silent:
                self.send(P.Fired(m.part, m.gate, ev.t_ms))


if __name__ == "__main__":       # python -m firmware_io.gate_sim, as before the CLI moved out
    import sys

    from .gate_sim_cli import main
    sys.exit(main())
