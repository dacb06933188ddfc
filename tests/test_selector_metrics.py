"""The part selector's counters reach Prometheus and the MQTT metrics JSON: external mode
on a simulated line video, triggers over the real MQTT trigger topic (tests/conftest.py
broker), the demo images on the belt."""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt
from prometheus_client import generate_latest

from agent.commands.daemon import Agent
from agent.commands.simulate_line import LineSpec, LineVideoSource, labelled_images, render
from tests.support import agent_cfg, wait_for
from test_parts import IMAGES


def _sample(text: str, name: str, **labels) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and line.split("}")[0][len(name) + 1:] == want:
            return float(line.rsplit(" ", 1)[1])
        if not labels and line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_selector_counters_in_prometheus_and_metrics_json(tmp_path, mqtt_broker):
    video = str(tmp_path / "line.avi")
    truth = render(LineSpec(rate=5, parts=4, lead_s=0.3, sensor_offset_ms=0, gate_delay_ms=600,
                            seed=3), labelled_images(IMAGES), video)
    cfg = agent_cfg(tmp_path, video, broker=mqtt_broker, camera={"fps": 30},
                    inspection={"queue_size": 4},
                    trigger={"mode": "external", "source": "mqtt", "window_ms": 20})
    src = LineVideoSource(video, truth["fps"])
    got, metrics = [], []
    topic = f"{cfg.mqtt.prefix}/{cfg.station.id}"
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_message = lambda c, u, m: metrics.append(json.loads(m.payload))
    sub.on_connect = lambda c, u, f, rc, p=None: c.subscribe(f"{topic}/metrics", qos=0)
    sub.connect(mqtt_broker.host, mqtt_broker.port)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    pub.connect(mqtt_broker.host, mqtt_broker.port)
    pub.loop_start()
    agent = Agent(cfg, source=src, sinks=(got.append,))
    agent.start()
    th = threading.Thread(target=agent.run, daemon=True)
    try:
        th.start()
        wait_for(lambda: src.t0_ns is not None and agent.trigger_source.client.is_connected(),
                 timeout=10, what="the camera and the trigger subscriber")
        for i in range(3):
            pub.publish(f"{topic}/trigger", json.dumps({"part": f"t{i}"}), qos=0).wait_for_publish(2)
            time.sleep(0.15)
        wait_for(lambda: len(got) >= 3, timeout=10, what="three triggered parts")
        # a bouncing sensor: a second trigger right after the first is debounced
        agent.pipeline.part_trigger("bounce-a")
        agent.pipeline.part_trigger("bounce-b")
        wait_for(lambda: agent.pipeline.selector.counters().get("trigger_debounced", 0) >= 1,
                 timeout=5, what="a debounced trigger")
        counts = agent.pipeline.selector.counters()
        agent._update_prom()
        text = generate_latest(agent.prom.registry).decode()
        for event in ("frames", "parts", "triggers", "trigger_debounced"):
            assert counts.get(event, 0) >= 1, counts
            v = _sample(text, "edge_inspect_selector_total", mode="external", event=event)
            assert v is not None and v >= counts[event], (event, v, counts)
        assert _sample(text, "edge_inspect_trigger_mode", edge_inspect_trigger_mode="external") == 1
        payload = agent.metrics_payload()
        assert payload["mode"] == "external"
        assert payload["selector"]["triggers"] >= 4 and payload["selector"]["parts"] >= 3
        # and what went over MQTT is the same object
        wait_for(lambda: any(m.get("selector", {}).get("parts", 0) >= 3 for m in metrics),
                 timeout=5, what="a metrics message with the selector counters")
    finally:
        agent.request_stop()
        th.join(20)
        sub.loop_stop()
        pub.loop_stop()
