"""systemd's notify protocol (sd_notify) without libsystemd: READY, STATUS, WATCHDOG,
STOPPING, RELOADING over the AF_UNIX datagram socket named by $NOTIFY_SOCKET.

Outside systemd (NOTIFY_SOCKET unset) every call is a cheap no-op, so the daemon calls
these unconditionally. A notification that cannot be delivered is logged, never raised:
telling systemd how we are must not be what brings the inspection line down.

The watchdog is tied to real work, not to a timer that keeps ticking while the pipeline
is stuck: `Watchdog.progress()` is called for every part processed, and the ping thread
only sends WATCHDOG=1 while progress was seen within `stall_s`. A hung camera, a wedged
inference or a deadlocked stage therefore stops the pings, and systemd (WatchdogSec=)
kills and restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Mapping

log = logging.getLogger("notify")


def _address(value: str) -> str | bytes | None:
    """$NOTIFY_SOCKET -> an address for sendto. '@name' is Linux's abstract namespace."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:… and anything newer: not supported here


class Notifier:
    """Sends notifications to systemd. Thread-safe."""

    def __init__(self, env: Mapping[str, str] = os.environ):
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False
        raw = env.get("NOTIFY_SOCKET", "")
        self._addr = _address(raw) if raw else None
        if raw and self._addr is None:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket path; systemd notifications off", raw)
        self.socket_name = raw if self._addr is not None else None
        self.enabled: bool = self._addr is not None

        # WATCHDOG_USEC is the timeout systemd enforces (WatchdogSec=); ping at half of it,
        # as sd_watchdog_enabled(3) recommends. WATCHDOG_PID, when set, names the process
        # the watchdog is meant for: a child that inherited the environment must not ping.
        self.watchdog_timeout_s: float | None = None
        self.watchdog_interval_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if self.enabled and usec:
            try:
                usec_v = int(usec)
                pid_ok = not pid or int(pid) == os.getpid()
            except ValueError:
                log.warning("ignoring malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r", usec, pid)
            else:
                if usec_v > 0 and pid_ok:
                    self.watchdog_timeout_s = usec_v / 1e6
                    self.watchdog_interval_s = usec_v / 2e6

    # -- the protocol -------------------------------------------------------------------
    def send(self, *fields: str) -> bool:
        """Send 'KEY=value' fields as one datagram. True when it was delivered."""
        if not self.enabled or not fields:
            return False
        msg = "\n".join(fields).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(msg, self._addr)
                return True
            except OSError as e:
                if not self._warned:  # once: a missing socket would otherwise flood the log
                    log.warning("cannot notify systemd at %s: %s", self.socket_name, e)
                    self._warned = True
                return False

    def ready(self, status: str = "") -> None:
        """Startup (or a reload) is complete: READY=1, with an optional STATUS line."""
        self.send("READY=1", *((_status(status),) if status else ()))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def status(self, text: str) -> None:
        """Free text shown by `systemctl status`."""
        self.send(_status(text))

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def reloading(self) -> None:
        """A reload begins; call ready() when it is done. MONOTONIC_USEC lets systemd >= 253
        (Type=notify-reload) match this message to the reload it asked for; older systemd
        ignores the field."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _status(text: str) -> str:
    # One datagram is newline-separated KEY=value fields: a newline in the text would
    # start a bogus field.
    return "STATUS=" + " ".join(str(text).splitlines())


class Watchdog:
    """Pings systemd's watchdog only while the pipeline makes progress.

    `progress()` is called by the pipeline for every part processed; it only stores a
    monotonic timestamp. A thread wakes every `notifier.watchdog_interval_s` and sends
    WATCHDOG=1 when the last progress is younger than `stall_s`. Otherwise it withholds
    the ping and logs why once; systemd kills and restarts the service when WatchdogSec
    passes without a ping. Pinging resumes (and that is logged) if progress comes back
    first. Without a systemd watchdog (WATCHDOG_USEC unset) start() does nothing.

    The stall clock starts at start(), so a pipeline that never processes a single part
    is caught as well. Choose stall_s longer than the longest legitimate gap between
    parts the daemon reports progress for (if the line can stand still, report progress
    per captured frame, not per part).
    """

    def __init__(self, notifier: Notifier, stall_s: float):
        if stall_s <= 0:
            raise ValueError(f"stall_s must be positive, got {stall_s}")
        self.notifier = notifier
        self.stall_s = float(stall_s)
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stalled = False
        self.pings = 0

    @property
    def interval_s(self) -> float | None:
        return self.notifier.watchdog_interval_s

    def progress(self) -> None:
        self._last = time.monotonic()

    def idle_s(self) -> float:
        """Seconds since the last progress()."""
        return time.monotonic() - self._last

    def start(self) -> None:
        if self._thread is not None:
            return
        if not self.notifier.enabled or self.interval_s is None:
            log.debug("no systemd watchdog (WATCHDOG_USEC unset); not pinging")
            return
        self._last = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()
        log.info("systemd watchdog: pinging every %.3g s while parts are processed "
                 "(stall after %.3g s without progress)", self.interval_s, self.stall_s)

    def stop(self) -> None:
        t = self._thread
        if t is None:
            return
        self._stop.set()
        if t is not threading.current_thread():
            t.join(timeout=max(1.0, 2 * (self.interval_s or 0)))
        self._thread = None

    def tick(self) -> bool:
        """One watchdog decision: ping when progress is recent. Returns whether it pinged."""
        idle = self.idle_s()
        if idle <= self.stall_s:
            if self.stalled:
                log.warning("pipeline progressing again after a stall; watchdog pings resume")
                self.stalled = False
            self.notifier.watchdog()
            self.pings += 1
            return True
        if not self.stalled:
            self.stalled = True
            timeout = self.notifier.watchdog_timeout_s
            log.error("pipeline stalled: no part processed for %.1f s (limit %.3g s); "
                      "withholding the systemd watchdog ping so systemd restarts the service%s",
                      idle, self.stall_s,
                      f" within {timeout:.3g} s" if timeout else "")
            self.notifier.status(f"STALLED: no part processed for {idle:.0f} s")
        return False

    def _run(self) -> None:
        interval = self.interval_s or 1.0
        while not self._stop.wait(interval):
            try:
                self.tick()
            except Exception:  # never let the watchdog thread die silently
                log.exception("watchdog tick failed")

    def __enter__(self) -> "Watchdog":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
