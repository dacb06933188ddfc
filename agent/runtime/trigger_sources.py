"""Part-present triggers that do not come over the gate's serial line (external mode).

    MqttTrigger     a message on <prefix>/<station>/trigger (payload: optional JSON
                    {"part": "...", "encoder": 123}); timed at receipt, on the capture clock
    ModbusTrigger   a discrete input polled every poll_ms, rising edge = a part

Each calls on_trigger(name, t_ns, encoder) (Pipeline.part_trigger). The receipt time is
the trigger time: the sender's clock is never trusted, so a clock step there moves nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import time

log = logging.getLogger("trigger")


class MqttTrigger:
    def __init__(self, host: str, port: int, topic: str, on_trigger, *, username=None,
                 password=None, tls: bool = False, ca_file=None):
        import paho.mqtt.client as mqtt

        self.topic = topic
        self.on_trigger = on_trigger
        self.received = 0
        self.bad = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        if username:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set(ca_certs=ca_file)
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(topic, qos=0)
        self.client.on_message = self._message
        self.client.reconnect_delay_set(0.1, 10)
        self.client.connect_async(host, port)

    def _message(self, client, userdata, msg) -> None:
        t = time.monotonic_ns()
        name, enc = "", None
        if msg.payload:
            try:
                body = json.loads(msg.payload)
                name = str(body.get("part", ""))[:64]
                enc = int(body["encoder"]) if body.get("encoder") is not None else None
            except (ValueError, TypeError, AttributeError, KeyError):
                # still a part: a trigger with an odd payload is timed and kept, just unnamed
                self.bad += 1
                if self.bad <= 10:
                    log.warning("trigger %s: payload is not {\"part\", \"encoder\"} JSON; "
                                "taken as a bare trigger", self.topic)
        self.received += 1
        self.on_trigger(name, t, enc)

    def start(self) -> "MqttTrigger":
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class ModbusTrigger:
    """Polls one discrete input; each 0 -> 1 edge is a part, timed at the poll that saw it
    (so poll_ms is the timing resolution). read_input() -> bool | None (None: read failed,
    counted; the line keeps its last level so a failed read is never an edge)."""

    def __init__(self, read_input, on_trigger, poll_ms: float = 2.0):
        self.read_input = read_input
        self.on_trigger = on_trigger
        self.poll_s = poll_ms / 1000
        self.level = False
        self.edges = 0
        self.read_errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> None:
        try:
            v = self.read_input()
        except Exception:  # noqa: BLE001 - a bus error is counted, never a crash
            v = None
        if v is None:
            self.read_errors += 1
            return
        if v and not self.level:
            self.edges += 1
            self.on_trigger(f"M{self.edges}", time.monotonic_ns(), None)
        self.level = bool(v)

    def start(self) -> "ModbusTrigger":
        def run():
            while not self._stop.wait(self.poll_s):
                self.poll_once()
        self._thread = threading.Thread(target=run, name="modbus-trigger", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1)
