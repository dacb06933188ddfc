"""The MQTT link: durable alerts, status with last will, metrics, commands (paho-mqtt 2.x).

    link = MqttLink(MqttConfig(host="broker"), station="line-3", on_command=handler,
                    status_fields=lambda: {"version": "0.1.0", "model_sha256": sha})
    link.start()                          # never raises when the broker is down
    link.publish_alert({"part": "P42", "verdict": "REJECT", ...})   # durable, QoS 1
    link.stop()                           # publishes status offline (retained, real ts)

Alerts go through an SQLite outbox (firmware_io.outbox): committed before publish, deleted
on PUBACK, drained in order after a reconnect or a restart. Delivery is at-least-once;
every alert carries a unique ``alert_id`` so consumers can drop duplicates.
Topics and payloads: docs/mqtt.md and firmware_io/schemas/*.json; the commands and
their schemas: firmware_io/commands.py.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .commands import run_command
from .mqtt_config import LinkTuning, MqttConfig
from .mqtt_diagnose import tls_context, why_unreachable
from .outbox import Outbox, OutboxFull
from .outbox_sender import OutboxSender

log = logging.getLogger("firmware_io.mqtt")


# ---------------------------------------------------------------------------- the link


def _str(p: Path | None) -> str | None:
    return None if p is None else str(p)


class MqttLink:
    """The link ``settings`` describe, speaking for ``station`` (the topics' second level).
    ``password``: given, or read from settings.password_file at start()."""

    def __init__(self, settings: MqttConfig,
                 on_command: Callable[[str, dict], dict] | None = None,
                 status_fields: Callable[[], dict] | None = None, *,
                 station: str | None = None, password: str | None = None,
                 tuning: LinkTuning | None = None):
        self.settings = settings
        self.tuning = tuning or LinkTuning()
        self.station = station or "station-1"
        self._password = password
        self.on_command = on_command
        self.status_fields = status_fields
        self._outbox: Outbox | None = None
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._sender: OutboxSender | None = None
        self._cmd_q: queue.Queue = queue.Queue(maxsize=100)
        self._cmd_thread: threading.Thread | None = None
        self._started_at = time.time()
        self._lock = threading.Lock()
        self._counters: dict[str, int] = {}
        self._state = "stopped"
        self.last_error: str | None = None
        # Why the broker is not ours right now (None: connected, or not tried yet) and
        # whether it said no (bad login) rather than being unreachable; see state().
        self._problem: str | None = None
        self._refused = False
        self._logged: tuple[str, float] = ("", 0.0)

    # ------------------------------------------------------------------ helpers
    def topic(self, suffix: str) -> str:
        return f"{self.settings.prefix}/{self.station}/{suffix}"

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + n

    def counters(self) -> dict:
        with self._lock:
            c = dict(self._counters)
        c["outbox_depth"] = self.outbox_depth()
        c["outbox_dropped"] = self._outbox.dropped if self._outbox else 0
        c["outbox_dropped_full"] = self._outbox.dropped_full if self._outbox else 0
        c["outbox_disk_full"] = self.disk_full()
        c["inflight"] = self._sender.inflight if self._sender else 0
        return c

    def connected(self) -> bool:
        return self._connected.is_set()

    def state(self) -> str:
        """"connected" | "connecting" (started, first attempt under way) | "down" (the
        broker could not be reached or the connection was lost; last_error says why) |
        "refused" (the broker refused the login) | "stopped"."""
        if self._state == "stopped":
            return "stopped"
        if self._connected.is_set():
            return "connected"
        if self._refused:
            return "refused"
        return "down" if self._problem else "connecting"

    def _trouble(self, reason: str) -> None:
        """Record why we are not connected; log it when it is new, else once a minute.
        The line is logged before the state shows "down", so whoever sees the state can
        already find the reason in the log."""
        now = time.monotonic()
        last, at = self._logged
        if reason != last or now - at > 60:
            self._logged = (reason, now)
            log.warning("mqtt: %s:%s: %s; retrying", self.settings.host, self.settings.port,
                        reason)
        self._problem = self.last_error = reason

    def outbox_depth(self) -> int:
        return self._outbox.depth() if self._outbox else 0

    def disk_full(self) -> bool:
        """The outbox hit a full disk and runs on (or past) its reserve."""
        return bool(self._outbox and self._outbox.disk_full)

    def alerts_dropped(self) -> dict[str, int]:
        """Alerts that were NOT stored, by reason: disk_full (refused by the disk),
        outbox_max (the oldest, deleted past outbox_max rows)."""
        ob = self._outbox
        return {"disk_full": ob.dropped_full if ob else 0, "outbox_max": ob.dropped if ob else 0}

    def wait_drained(self, timeout: float) -> bool:
        """Block until the outbox is empty (every alert PUBACKed); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.outbox_depth() == 0:
                return True
            time.sleep(0.01)
        return self.outbox_depth() == 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._state != "stopped":
            return
        s, t = self.settings, self.tuning
        self._stop.clear()
        password = self._password if self._password is not None else s.password()
        self._outbox = Outbox(str(s.outbox), s.outbox_max, t.outbox_sync,
                              reserve_bytes=s.outbox_reserve_bytes)
        cid = t.client_id or f"edge-inspect-{self.station}-{uuid.uuid4().hex[:8]}"
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=True,
                        protocol=mqtt.MQTTv311)
        if s.username:
            c.username_pw_set(s.username, password)
        if s.tls:
            c.tls_set(ca_certs=_str(s.ca_file), certfile=_str(s.cert_file),
                      keyfile=_str(s.key_file))
        # The will is registered now and published by the broker later, when it sees the
        # connection die: a time stamped here would be the connect time, not when the
        # station went offline. So it has no ts (the broker's arrival time is the truth);
        # stop() publishes its own offline status with the real time.
        c.will_set(self.topic("status"),
                   self._status_payload("offline", with_fields=False, with_ts=False),
                   qos=1, retain=True)
        c.max_inflight_messages_set(max(1, t.inflight_window))
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(t.reconnect_min_s, t.reconnect_max_s)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        self._client = c
        self._sender = OutboxSender(self._outbox, c, self._connected, t, self._count)
        self._state = "started"
        try:
            c.connect_async(s.host, s.port, keepalive=t.keepalive)
        except (OSError, ValueError) as exc:          # never raise: the loop retries
            self.last_error = str(exc)
            log.warning("mqtt: connect_async %s:%s: %s", s.host, s.port, exc)
        c.loop_start()
        self._sender.start()
        self._cmd_thread = threading.Thread(target=self._cmd_loop, name="mqtt-commands",
                                            daemon=True)
        self._cmd_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._state == "stopped":
            return
        c = self._client
        deadline = time.monotonic() + timeout
        if self._connected.is_set():
            try:
                info = c.publish(self.topic("status"),
                                 self._status_payload("offline", with_fields=False),
                                 qos=1, retain=True)
                info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                log.warning("mqtt: offline status not confirmed: %s", exc)
        self._stop.set()
        try:
            self._cmd_q.put_nowait(None)
        except queue.Full:
            pass
        self._sender.stop(deadline - time.monotonic())
        if self._cmd_thread is not None:
            self._cmd_thread.join(timeout=max(0.1, deadline - time.monotonic()))
        try:
            c.disconnect()
        except Exception:
            pass
        c.loop_stop()
        self._connected.clear()
        self._sender.flush_acks()
        if self._outbox:
            self._outbox.close()
        self._state = "stopped"

    # ------------------------------------------------------------------ paho callbacks
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._count("connect_refused")
            self._trouble(f"the broker refused the connection: {reason_code} (check "
                          "mqtt.username and password_file)")
            self._refused = True
            return
        self._count("connects")
        log.info("mqtt: connected to %s:%s", self.settings.host, self.settings.port)
        self._problem, self._refused, self._logged = None, False, ("", 0.0)
        self._connected.set()
        if self.settings.commands:
            client.subscribe(self.topic("cmd/+"), qos=1)
        try:
            client.publish(self.topic("status"), self._status_payload("online"), qos=1,
                           retain=True)
        except Exception:
            log.exception("mqtt: online status")
        self._sender.wake()

    def _on_connect_fail(self, client, userdata):
        # paho keeps the error; find it again (runs in paho's thread, which is idle anyway)
        s = self.settings
        self._count("connect_failed")
        self._refused = False
        try:
            ctx = tls_context(_str(s.ca_file), _str(s.cert_file), _str(s.key_file)) \
                if s.tls else None
            reason = why_unreachable(s.host, s.port, ctx)
        except Exception as exc:  # noqa: BLE001 - a diagnosis must never stop the retries
            reason = f"connect failed ({exc})"
        self._trouble(reason)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if self._stop.is_set():
            pass
        elif self._connected.is_set():
            self._count("disconnects")
            self._trouble(f"connection lost ({reason_code})")
        elif not self._refused:
            self._trouble(f"the broker closed the connection before accepting it "
                          f"({reason_code}; a TLS port without tls = true?)")
        self._connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self._sender.on_publish(mid)

    def _on_message(self, client, userdata, msg):
        parts = msg.topic.split("/")
        verb = parts[-1] if parts else ""
        try:
            self._cmd_q.put_nowait((verb, msg.payload))
        except queue.Full:
            self._count("cmd_dropped")

    # ------------------------------------------------------------------ publishing
    def publish_alert(self, payload: dict, suffix: str = "events/reject") -> int:
        """Durable: committed to the outbox before this returns; QoS 1; at-least-once.
        Adds ``alert_id`` (unique, for de-duplication) and ``station``. Returns the
        outbox row id."""
        if self._outbox is None:
            raise RuntimeError("MqttLink.start() first")
        body = dict(payload)
        body.setdefault("alert_id", uuid.uuid4().hex)
        body.setdefault("station", self.station)
        try:
            rid = self._outbox.put(self.topic(suffix), json.dumps(body, default=str).encode(), 1)
        except OutboxFull:
            self._count("alerts_dropped_disk_full")
            raise
        self._count("alerts_queued")
        self._sender.wake()
        return rid

    def publish_result(self, payload: dict) -> None:
        """Every part, best effort (QoS 0, not stored); only if settings.publish_results."""
        if not self.settings.publish_results:
            return
        body = dict(payload)
        body.setdefault("station", self.station)
        self.publish_raw("events/result", body, qos=0)

    def _status_payload(self, state: str, with_fields: bool = True, with_ts: bool = True,
                        **fields) -> bytes:
        body: dict[str, Any] = {"state": state, "station": self.station}
        if with_ts:
            body["ts"] = round(time.time(), 3)
        if with_fields:
            body["uptime_s"] = round(time.time() - self._started_at, 1)
            body["host"] = socket.gethostname()
            if self.status_fields is not None:
                try:
                    body.update(self.status_fields() or {})
                except Exception:
                    log.exception("mqtt: status_fields()")
        body.update(fields)
        return json.dumps(body, default=str).encode()

    def publish_status(self, state: str, **fields) -> None:
        """Retained JSON on ``status`` (state + status_fields() + fields)."""
        self._publish(self.topic("status"), self._status_payload(state, **fields), 1, True)

    def publish_metrics(self, payload: dict) -> None:
        body = dict(payload)
        body.setdefault("station", self.station)
        body.setdefault("ts", round(time.time(), 3))
        self.publish_raw("metrics", body, qos=0)

    def publish_raw(self, suffix: str, payload: dict, qos: int = 1, retain: bool = False) -> None:
        """Not stored: QoS 1 messages wait in paho's memory queue while disconnected."""
        self._publish(self.topic(suffix), json.dumps(payload, default=str).encode(), qos, retain)

    def _publish(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
        c = self._client
        if c is None:
            self._count("publish_not_started")
            return
        if qos == 0 and not self._connected.is_set():
            self._count("publish_dropped")
            return
        try:
            c.publish(topic, data, qos=qos, retain=retain)
            self._count("published")
        except (ValueError, RuntimeError) as exc:
            self._count("publish_errors")
            log.warning("mqtt: publish %s: %s", topic, exc)

    # ------------------------------------------------------------------ commands
    def _cmd_loop(self) -> None:
        while not self._stop.is_set():
            item = self._cmd_q.get()
            if item is None:
                break
            verb, raw = item
            self._handle_command(verb, raw)

    def _handle_command(self, verb: str, raw: bytes) -> None:
        verb, reply = run_command(verb, raw, self.on_command, self.station, self._count)
        self.publish_raw(f"cmd/{verb}/reply", reply, qos=1)
