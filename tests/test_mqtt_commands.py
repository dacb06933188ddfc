"""Issue 20 item 8: MQTT commands on a running agent (the demo bundle, real demo images, a
real broker) are strictly typed, refusals echo request_id, replies stay small."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.commands.daemon import Agent
from tests.support import agent_cfg, wait_for

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "agent" / "demo_data"


class RawReplies:
    """Keeps every cmd/+/reply as raw bytes (the size is what the test is about)."""

    def __init__(self, broker, base: str):
        self.base = base
        self.got: list[tuple[str, bytes]] = []
        self.ready = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"cmd-{uuid.uuid4().hex[:8]}")
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{base}/cmd/+/reply", qos=1)
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.on_message = lambda c, u, m: self.got.append((m.topic, m.payload))
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert self.ready.wait(5)

    def send(self, verb: str, payload: bytes) -> tuple[dict, int]:
        k = len(self.got)
        self.c.publish(f"{self.base}/cmd/{verb}", payload, qos=1).wait_for_publish(10)
        wait_for(lambda: len(self.got) > k, timeout=15, what=f"{verb} reply")
        _topic, raw = self.got[k]
        return json.loads(raw), len(raw)

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def test_threshold_command_is_strict_and_replies_are_bounded(tmp_path, mqtt_broker):
    cfg = agent_cfg(tmp_path, DEMO / "images", broker=mqtt_broker,
                    model={"bundle": str(DEMO / "bundle")}, camera={"loop": True, "fps": 10},
                    inspection={"deadline_ms": 2000})
    agent = Agent(cfg)
    agent.start()
    th = threading.Thread(target=agent.run, daemon=True)
    th.start()
    rr = RawReplies(mqtt_broker, "edge-inspect/test-st")
    try:
        wait_for(agent.link.connected, what="agent connected")
        time.sleep(0.3)                                   # the agent's SUBACK for cmd/+
        t0 = agent.pipeline.inspector.threshold
        # JSON true must not become 1.0 (that would stop every reject on the line)
        rep, _ = rr.send("threshold", b'{"value": true, "request_id": "r-bool"}')
        assert rep["ok"] is False and rep["request_id"] == "r-bool", rep
        assert "valid number" in rep["error"]
        # a string is not a number
        rep, _ = rr.send("threshold", b'{"value": "0.3", "request_id": "r-str"}')
        assert rep["ok"] is False and rep["request_id"] == "r-str", rep
        # NaN: refused as not finite (not as "greater than or equal to 0")
        rep, _ = rr.send("threshold", b'{"value": NaN, "request_id": "r-nan"}')
        assert rep["ok"] is False and rep["request_id"] == "r-nan", rep
        assert "finite" in rep["error"] and "greater" not in rep["error"], rep
        rep, _ = rr.send("threshold", b'{"value": 7, "request_id": "r-range"}')
        assert rep["ok"] is False and rep["request_id"] == "r-range"
        assert agent.pipeline.inspector.threshold == t0          # nothing changed
        # a 3.7 MB command: a short refusal, not an 8 MB echo of it
        big = json.dumps({"value": 0.3, "request_id": "r-big", "x" * 3_700_000: 1}).encode()
        rep, size = rr.send("threshold", big)
        assert rep["ok"] is False and size < 2048, size
        # under the size cap but with a huge unknown key: the reply quotes a clipped name
        mid = json.dumps({"value": 0.3, "request_id": "r-mid", "y" * 60_000: 1}).encode()
        rep, size = rr.send("threshold", mid)
        assert rep["ok"] is False and rep["request_id"] == "r-mid" and size < 2048, size
        assert agent.pipeline.inspector.threshold == t0
        # a well-formed command still works, and an integer is a number
        rep, _ = rr.send("threshold", b'{"value": 1, "request_id": "r-ok"}')
        assert rep["ok"] is True and rep["request_id"] == "r-ok" and rep["threshold"] == 1.0
    finally:
        rr.close()
        agent.request_stop()
        th.join(15)
    assert not th.is_alive()
