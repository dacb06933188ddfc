"""MQTT link against a real broker: durability across broker restarts and SIGKILL,
status + last will, commands, the MQTT gate, the outbox cap."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from typing import NamedTuple
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.helpers import wait_until  # noqa: E402
from firmware_io.gates import MqttGateConfig, create_gate
from firmware_io.mqtt_config import LinkTuning, MqttConfig
from firmware_io.mqtt_link import MqttLink
from firmware_io.outbox import Outbox

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "firmware_io" / "schemas"


class Subscriber:
    """A plain paho client that records (topic, json payload, retain) per message."""

    def __init__(self, broker, topic, client_id=None, clean_session=True):
        self.msgs: list[tuple[str, dict, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2,
                             client_id=client_id or f"sub-{uuid.uuid4().hex[:8]}",
                             clean_session=clean_session)
        self.c.reconnect_delay_set(0.05, 0.2)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_message = self._on_message
        self.c.connect(broker.host, broker.port, keepalive=10)
        self.c.loop_start()
        assert self.subscribed.wait(5)

    def _on_message(self, c, u, msg):
        try:
            body = json.loads(msg.payload) if msg.payload else {}
        except ValueError:
            body = {"raw": msg.payload}
        with self.lock:
            self.msgs.append((msg.topic, body, bool(msg.retain)))

    def on(self, suffix):
        with self.lock:
            return [b for t, b, _ in self.msgs if t.endswith(suffix)]

    def send(self, topic, payload: bytes | str):
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


class Site(NamedTuple):
    """A link's config, the station it speaks for and its tuning (quick reconnects)."""
    config: MqttConfig
    station: str
    tuning: LinkTuning

    @property
    def prefix(self) -> str:
        return self.config.prefix


def settings_for(broker, tmp_path, outbox_sync="FULL", **kw) -> Site:
    return Site(MqttConfig(host=broker.host, port=broker.port, outbox=tmp_path / "ob.sqlite",
                           **kw),
                f"st-{uuid.uuid4().hex[:6]}",
                LinkTuning(reconnect_min_s=0.1, reconnect_max_s=0.5, outbox_sync=outbox_sync))


def link_on(s: Site, **kw) -> MqttLink:
    return MqttLink(s.config, station=s.station, tuning=s.tuning, **kw)


def check_schema(name: str, payload: dict):
    """Minimal JSON-schema check (no jsonschema here): required keys and basic types."""
    schema = json.loads((SCHEMAS / name).read_text())
    for key in schema.get("required", []):
        assert key in payload, f"{name}: {key} missing from {payload}"
    types = {"string": str, "number": (int, float), "integer": int, "boolean": bool,
             "object": dict, "array": list, "null": type(None)}
    for key, val in payload.items():
        spec = schema["properties"].get(key)
        if spec is None:
            assert schema.get("additionalProperties", True) is not False, f"{name}: extra {key}"
            continue
        t = spec.get("type")
        if t:
            allowed = tuple(x for tt in ([t] if isinstance(t, str) else t) for x in
                            (types[tt] if isinstance(types[tt], tuple) else (types[tt],)))
            assert isinstance(val, allowed), f"{name}: {key}={val!r} not {t}"


# --------------------------------------------------------------------------- basics


def test_alert_status_metrics_and_clean_offline(mqtt_broker, tmp_path):
    s = settings_for(mqtt_broker, tmp_path, publish_results=True)
    sub = Subscriber(mqtt_broker, f"{s.prefix}/{s.station}/#")
    link = link_on(s, status_fields=lambda: {"version": "0.1.0", "model_sha256": "ab" * 32})
    link.start()
    try:
        assert wait_until(link.connected)
        rid = link.publish_alert({"part": "P1", "verdict": "REJECT", "score": 0.93,
                                  "label": "short", "t_capture": 1.5, "source_ref": "cam0",
                                  "model_sha256": "ab" * 32, "latency_ms": 12.5,
                                  "image_path": "/var/x.jpg"})
        assert isinstance(rid, int)
        link.publish_result({"part": "P2", "verdict": "PASS", "score": 0.01})
        link.publish_metrics({"fps": 30.0, "parts": 10})
        assert wait_until(lambda: sub.on("events/reject") and sub.on("metrics")
                          and sub.on("events/result"))
        alert = sub.on("events/reject")[0]
        assert alert["part"] == "P1" and len(alert["alert_id"]) == 32
        assert alert["station"] == s.station
        # (what the agent really sends is checked against reject_event.json, every key
        # required, in tests/test_mqtt_payloads.py; this alert is the link's caller's own)
        check_schema("result_event.json", sub.on("events/result")[0])
        check_schema("metrics.json", sub.on("metrics")[0])
        assert wait_until(lambda: sub.on("/status"))
        online = sub.on("/status")[0]
        assert online["state"] == "online" and online["version"] == "0.1.0"
        assert "uptime_s" in online and online["model_sha256"] == "ab" * 32
        check_schema("status.json", online)
        assert wait_until(lambda: link.outbox_depth() == 0)
    finally:
        link.stop()
    assert wait_until(lambda: sub.on("/status")[-1]["state"] == "offline")
    sub.close()
    # retained: a newcomer sees "offline"
    late = Subscriber(mqtt_broker, f"{s.prefix}/{s.station}/status")
    assert wait_until(lambda: late.msgs and late.msgs[-1][2] and late.msgs[-1][1]["state"] == "offline")
    late.close()


def test_last_will_has_no_stale_ts_and_clean_stop_has_the_real_time(mqtt_broker, tmp_path):
    """The will is registered at connect and published by the broker when the connection
    dies: it carries no ts (it would be the connect time). A clean stop's offline status
    carries the time of the stop."""
    import socket

    s = settings_for(mqtt_broker, tmp_path)
    sub = Subscriber(mqtt_broker, f"{s.prefix}/{s.station}/status")
    # only this station's (amqtt may hand a new subscriber other topics' retained messages)
    mine = lambda: [b for b in sub.on("/status") if b.get("station") == s.station]  # noqa: E731
    link = link_on(s)
    link.start()
    try:
        assert wait_until(link.connected)
        t_connected = time.time()
        time.sleep(1.0)
        # the TCP connection dies without a DISCONNECT (a pulled cable, a crash)
        link._client.socket().shutdown(socket.SHUT_RDWR)
        assert wait_until(lambda: any(b.get("state") == "offline" for b in mine()))
        will = [b for b in mine() if b["state"] == "offline"][0]
        assert will == {"state": "offline", "station": s.station}
        check_schema("status.json", will)
        assert wait_until(lambda: link.connected() and mine()[-1]["state"] == "online")
    finally:
        t_stop = time.time()
        link.stop()
    assert wait_until(lambda: mine()[-1]["state"] == "offline")
    bye = mine()[-1]
    assert bye["ts"] >= t_stop - 0.001 and t_stop > t_connected + 0.9   # ts: 3 decimals
    check_schema("status.json", bye)
    sub.close()


def test_start_with_broker_down_never_raises_then_drains(own_broker, tmp_path):
    own_broker.stop()
    s = settings_for(own_broker, tmp_path)
    link = link_on(s)
    link.start()                                    # must not raise
    try:
        for i in range(20):
            link.publish_alert({"part": f"P{i}"})
        time.sleep(0.3)
        assert link.state() == "down" and link.outbox_depth() == 20
        assert "nothing listens" in link.last_error
        own_broker.start()
        assert link.wait_drained(10)
        assert link.counters()["alerts_acked"] == 20
    finally:
        link.stop()


def test_outbox_order_and_cap(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", max_rows=5)
    ids = [ob.put("t", f"m{i}".encode()) for i in range(8)]
    assert ob.depth() == 5 and ob.dropped == 3
    rows = ob.after(0, 100)
    assert [r[0] for r in rows] == ids[3:] and rows[0][2] == b"m3"
    ob.delete(ids[3:5])
    assert [r[0] for r in ob.after(0, 100)] == ids[5:]
    ob.close()
    ob2 = Outbox(tmp_path / "o.sqlite", max_rows=5)   # survives reopening
    assert ob2.depth() == 3
    ob2.close()


# --------------------------------------------------------------------------- durability


def test_broker_restart_mid_burst_of_1000(persistent_broker, tmp_path):
    s = settings_for(persistent_broker, tmp_path, outbox_sync="NORMAL")
    sub = Subscriber(persistent_broker, f"{s.prefix}/{s.station}/events/reject",
                     client_id=f"durable-{uuid.uuid4().hex[:6]}", clean_session=False)
    link = link_on(s)
    link.start()
    try:
        assert wait_until(link.connected)
        for i in range(1000):
            link.publish_alert({"part": f"P{i}", "i": i})
            if i == 300:
                persistent_broker.stop()                   # broker gone mid-burst
            if i == 700:
                persistent_broker.start()                  # and back
        assert link.wait_drained(30), link.counters()
        ok = wait_until(lambda: len({b["alert_id"] for b in sub.on("events/reject")}) == 1000,
                        timeout=20)
        ids = sorted({b["i"] for b in sub.on("events/reject")})
        assert ok, (len(ids), sorted(set(range(1000)) - set(ids))[:20], link.counters())
        got = sub.on("events/reject")
        assert {b["i"] for b in got} == set(range(1000))
        c = link.counters()
        assert c["disconnects"] >= 1 and c["connects"] >= 2 and c["outbox_dropped"] == 0
    finally:
        link.stop()
        sub.close()


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from firmware_io.mqtt_config import LinkTuning, MqttConfig
    from firmware_io.mqtt_link import MqttLink
    host, port, station, outbox, mode, n = sys.argv[1:7]
    link = MqttLink(MqttConfig(host=host, port=int(port), outbox=outbox), station=station,
                    tuning=LinkTuning(reconnect_min_s=0.1))
    link.start()
    if mode == "burst":
        for i in range(int(n)):
            link.publish_alert({{"part": f"P{{i}}", "i": i}})
            print("C", i, flush=True)         # committed: the parent may kill us now
        time.sleep(60)
    else:
        ok = link.wait_drained(30)
        print("drained" if ok else "not drained", link.counters(), flush=True)
        link.stop()
""")


def test_sigkill_publisher_mid_burst_then_restart_loses_nothing(mqtt_broker, tmp_path):
    station = f"kill-{uuid.uuid4().hex[:6]}"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    outbox = str(tmp_path / "outbox.sqlite")
    sub = Subscriber(mqtt_broker, f"edge-inspect/{station}/#")
    args = [sys.executable, str(script), mqtt_broker.host, str(mqtt_broker.port), station, outbox]
    child = subprocess.Popen(args + ["burst", "3000"], stdout=subprocess.PIPE, text=True)
    last = -1
    try:
        while last < 400:
            line = child.stdout.readline()
            assert line, "child died"
            last = int(line.split()[1])
    finally:
        child.send_signal(signal.SIGKILL)           # no goodbye, no flush, no atexit
        child.wait(10)
    # the children's last line might be cut: whatever it printed was committed
    last = max(last, *[int(x.split()[1]) for x in child.stdout.read().splitlines()
                       if x.startswith("C ")] or [last])
    # the broker publishes the last will (retained) for the killed client
    assert wait_until(lambda: any(b.get("state") == "offline" for b in sub.on("/status")))
    pending = Outbox(outbox).depth()
    print("outbox rows left by the killed publisher:", pending, "last committed:", last)
    drain = subprocess.run(args + ["drain", "0"], capture_output=True, text=True, timeout=60)
    assert drain.stdout.startswith("drained"), drain.stdout + drain.stderr
    got = {b["i"] for b in sub.on("events/reject")}
    assert wait_until(lambda: {b["i"] for b in sub.on("events/reject")} >= set(range(last + 1)),
                      timeout=10), (last, pending, sorted(set(range(last + 1)) - got)[:10])
    assert Outbox(outbox).depth() == 0
    sub.close()


# --------------------------------------------------------------------------- commands


def test_commands_validated_bad_ones_never_reach_the_handler(own_broker, tmp_path):
    # a broker of its own: with the shared amqtt broker, other tests' messages reached this
    # link's counters and subscription
    mqtt_broker = own_broker
    s = settings_for(mqtt_broker, tmp_path, commands=True)
    calls = []

    def on_command(verb, args):
        calls.append((verb, args))
        return {"ok": True, "applied": args}

    base = f"{s.prefix}/{s.station}"
    sub = Subscriber(mqtt_broker, f"{base}/cmd/+/reply")
    link = link_on(s, on_command=on_command)
    link.start()
    try:
        assert wait_until(link.connected)
        time.sleep(0.2)                                  # the link's SUBACK
        bad = [("pause", b"{not json"), ("explode", b"{}"), ("threshold", b'{"value": 2.0}'),
               ("threshold", b'{"value": "high"}'), ("threshold", b"{}"),
               ("pause", b'{"now": true}'), ("reload", b"[1, 2]")]
        for verb, payload in bad:
            sub.send(f"{base}/cmd/{verb}", payload)
        # only the replies: amqtt has been seen to hand a subscriber retained messages of
        # other topics (another test's status), which say nothing about this link
        def replies_seen():
            return [b for t, b, _ in sub.msgs if t.startswith(f"{base}/cmd/") and t.endswith("/reply")]
        assert wait_until(lambda: len(replies_seen()) == len(bad)), sub.msgs
        replies = replies_seen()
        assert all(r["ok"] is False and r["error"] for r in replies), replies
        for r in replies:
            check_schema("command_reply.json", r)
        assert calls == []                               # nothing reached the handler
        sub.send(f"{base}/cmd/threshold", b'{"value": 0.7, "request_id": "r1"}')
        sub.send(f"{base}/cmd/pause", b"{}")
        sub.send(f"{base}/cmd/reload", b"")
        assert wait_until(lambda: len(calls) == 3 and len(replies_seen()) == len(bad) + 3)
        assert calls == [("threshold", {"value": 0.7}), ("pause", {}), ("reload", {})]
        good = {t.split("/")[-2]: b for t, b, _ in sub.msgs
                if t.startswith(f"{base}/cmd/") and t.endswith("/reply")}
        good = {k: v for k, v in good.items() if v.get("ok")}
        assert good["threshold"] == {"ok": True, "applied": {"value": 0.7}, "verb": "threshold",
                                     "request_id": "r1", "station": s.station}
        assert link.counters()["cmd_rejected"] == len(bad)
    finally:
        link.stop()
        sub.close()


def test_commands_off_by_default(mqtt_broker, tmp_path):
    s = settings_for(mqtt_broker, tmp_path)
    calls = []
    base = f"{s.prefix}/{s.station}"
    sub = Subscriber(mqtt_broker, f"{base}/cmd/+/reply")
    link = link_on(s, on_command=lambda v, a: calls.append(v) or {})
    link.start()
    try:
        assert wait_until(link.connected)
        sub.send(f"{base}/cmd/pause", b"{}")
        time.sleep(0.3)
        assert calls == [] and sub.msgs == []
    finally:
        link.stop()
        sub.close()


# --------------------------------------------------------------------------- mqtt gate


def test_mqtt_gate_publishes_timed_reject(mqtt_broker, tmp_path):
    s = settings_for(mqtt_broker, tmp_path)
    sub = Subscriber(mqtt_broker, f"{s.prefix}/{s.station}/gate/+/reject")
    link = link_on(s)
    link.start()
    g = create_gate(MqttGateConfig(delay_ms=400, pulse_ms=60), link=link)
    g.open()
    try:
        assert wait_until(lambda: g.state() == "connected")
        now_ms = time.time() * 1000
        out = g.reject("G1", time.monotonic_ns() - 100_000_000, gate=2)
        assert out.sent and not out.late
        assert wait_until(lambda: sub.msgs)
        topic, body, _ = sub.msgs[0]
        assert topic.endswith("/gate/2/reject")
        assert body["part"] == "G1" and body["gate"] == 2 and body["pulse_ms"] == 60
        assert abs(body["fire_at_epoch_ms"] - (now_ms + 300)) < 50
        check_schema("gate_reject.json", body)
    finally:
        g.close()
        link.stop()
        sub.close()
    out = g.reject("G2", time.monotonic_ns())
    assert not out.sent and out.error == "mqtt link down"


def test_schemas_are_valid_json():
    names = {p.name for p in SCHEMAS.glob("*.json")}
    assert {"reject_event.json", "result_event.json", "status.json", "metrics.json",
            "command_pause.json", "command_resume.json", "command_reload.json",
            "command_threshold.json", "command_reply.json", "gate_reject.json"} <= names
    for p in SCHEMAS.glob("*.json"):
        doc = json.loads(p.read_text())
        assert doc["$schema"].startswith("https://json-schema.org/") and doc["type"] == "object"
