"""Hands the outbox's alerts to paho in order and deletes each on its PUBACK.

One job, one thread: a window of at most `inflight_window` alerts in flight; a PUBACK
(paho's on_publish, any thread) deletes its row; a PUBACK overdue on a live connection hands
everything from the oldest unacknowledged row over again (at-least-once: consumers drop
duplicates by alert_id). MqttLink owns one per start().
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

import paho.mqtt.client as mqtt

from .mqtt_config import LinkTuning
from .outbox import Outbox

log = logging.getLogger("firmware_io.mqtt")


class OutboxSender:
    def __init__(self, outbox: Outbox, client: mqtt.Client, connected: threading.Event,
                 tuning: LinkTuning, count: Callable[..., None]):
        self._outbox = outbox
        self._client = client
        self._connected = connected
        self._tuning = tuning
        self._count = count
        self._acks: deque[int] = deque()
        self._inflight: dict[int, tuple[int, float]] = {}   # mid -> (row id, sent at)
        self._unmatched: set[int] = set()                   # PUBACKs seen before their mid
        self._cursor = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mqtt-outbox", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Something to send: a new alert, or a fresh connection."""
        self._wake.set()

    def on_publish(self, mid: int) -> None:
        self._acks.append(mid)      # resolved by the sender thread; no locks in paho's
        self._wake.set()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(0.1, timeout))

    def flush_acks(self) -> None:
        done = []
        while self._acks:
            mid = self._acks.popleft()
            entry = self._inflight.pop(mid, None)
            if entry is None:
                self._unmatched.add(mid)
            else:
                done.append(entry[0])
        if done:
            n = self._outbox.delete(done)
            self._count("alerts_acked", n)

    def _loop(self) -> None:
        t = self._tuning
        window = max(1, t.inflight_window)
        while not self._stop.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            try:
                self.flush_acks()
                if not self._connected.is_set():
                    continue
                self._send(window, t.inflight_timeout_s)
            except Exception:
                log.exception("mqtt: outbox sender")
                self._stop.wait(0.5)

    def _send(self, window: int, inflight_timeout_s: float) -> None:
        now = time.monotonic()
        if self._inflight and min(at for _, at in self._inflight.values()) \
                < now - inflight_timeout_s:
            # connected, yet a PUBACK is overdue: hand everything over again
            self._count("inflight_resets")
            self._cursor = min(r for r, _ in self._inflight.values()) - 1
            self._inflight.clear()
        room = window - len(self._inflight)
        if room <= 0:
            return
        rows = self._outbox.after(self._cursor, room)
        for rid, topic, payload, qos in rows:
            info = self._client.publish(topic, payload, qos=qos)
            if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
                log.warning("mqtt: publish rc=%s", info.rc)
                break
            self._cursor = rid
            self._count("alerts_published")
            if info.mid in self._unmatched:
                self._unmatched.discard(info.mid)
                self._outbox.delete([rid])
                self._count("alerts_acked")
            else:
                self._inflight[info.mid] = (rid, now)
        if len(rows) == room:
            self._wake.set()     # more waiting: go round again at once
