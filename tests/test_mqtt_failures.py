"""MQTT failures say what they are (issue 21, item 5): a TLS/plain mismatch, a host that is
a URL, a refused login and an outage each change the link's state and log one line why;
the station goes degraded while its alerts cannot leave the box."""

from __future__ import annotations

import logging
import time

import pytest

from agent.commands.local_broker import LocalBroker
from firmware_io.mqtt_config import LinkTuning, MqttConfig
from firmware_io.mqtt_link import MqttLink
from tests.helpers import wait_until


def link_for(host: str, port: int, tmp_path, unchecked: bool = False, **kw) -> MqttLink:
    kw.update(host=host, port=port, outbox=tmp_path / "ob.sqlite")
    # unchecked: what the link does with settings check-config would have refused
    s = MqttConfig.model_construct(**kw) if unchecked else MqttConfig(**kw)
    return MqttLink(s, station="st-fail", tuning=LinkTuning(reconnect_min_s=0.2,
                                                            reconnect_max_s=0.5))


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "firmware_io.mqtt" and r.levelno >= logging.WARNING]


def test_tls_against_a_plain_broker_says_so(mqtt_broker, tmp_path, caplog):
    caplog.set_level(logging.WARNING, "firmware_io.mqtt")
    link = link_for(mqtt_broker.host, mqtt_broker.port, tmp_path, tls=True)
    link.start()
    try:
        assert wait_until(lambda: link.state() == "down", timeout=10), link.state()
        assert "TLS handshake" in link.last_error and "plain MQTT port" in link.last_error
        time.sleep(1.0)      # several retries: still one line, not one per attempt
        lines = [m for m in warnings(caplog) if "TLS handshake" in m]
        assert len(lines) == 1, warnings(caplog)
    finally:
        link.stop()


def test_a_url_as_host_says_so(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "firmware_io.mqtt")
    link = link_for("tcp://127.0.0.1:1883", 1883, tmp_path, unchecked=True)
    link.start()
    try:
        assert wait_until(lambda: link.state() == "down", timeout=10), link.state()
        assert "cannot resolve host 'tcp://127.0.0.1:1883'" in link.last_error
        assert any("cannot resolve host" in m for m in warnings(caplog))
    finally:
        link.stop()


def test_an_outage_is_down_then_connected_again(own_broker, tmp_path, caplog):
    caplog.set_level(logging.WARNING, "firmware_io.mqtt")
    link = link_for(own_broker.host, own_broker.port, tmp_path)
    link.start()
    try:
        assert wait_until(lambda: link.state() == "connected", timeout=10)
        own_broker.stop()
        assert wait_until(lambda: link.state() == "down", timeout=10), link.state()
        assert wait_until(lambda: "nothing listens" in (link.last_error or ""), timeout=10)
        assert any("connection lost" in m for m in warnings(caplog)), warnings(caplog)
        own_broker.start()
        assert wait_until(lambda: link.state() == "connected", timeout=15)
    finally:
        link.stop()


@pytest.fixture
def closed_broker():
    """A real amqtt broker that refuses anonymous clients."""
    try:
        broker = LocalBroker(prefer="amqtt")
    except RuntimeError as e:
        pytest.skip(str(e))
    conf = broker._dir / "amqtt.yaml"
    conf.write_text(conf.read_text().replace("allow_anonymous: true", "allow_anonymous: false"))
    broker.start()
    yield broker
    broker.stop()


def test_a_refused_login_is_refused_not_connecting(closed_broker, tmp_path, caplog):
    caplog.set_level(logging.WARNING, "firmware_io.mqtt")
    link = link_for(closed_broker.host, closed_broker.port, tmp_path)
    link.start()
    try:
        assert wait_until(lambda: link.state() == "refused", timeout=10), \
            (link.state(), link.last_error)
        assert "refused the connection" in link.last_error
        assert any("check mqtt.username" in m for m in warnings(caplog))
    finally:
        link.stop()


def test_the_station_is_degraded_while_mqtt_is_down(own_broker, tmp_path):
    from agent.commands.daemon import Agent
    from tests.support import agent_cfg

    images = tmp_path / "images"
    images.mkdir()
    import shutil
    from pathlib import Path
    demo = Path(__file__).resolve().parents[1] / "agent" / "demo_data" / "images"
    for p in sorted(demo.iterdir())[:2]:
        shutil.copy(p, images / p.name)
    cfg = agent_cfg(tmp_path, images, broker=own_broker, camera={"loop": True, "fps": 5})
    agent = Agent(cfg).start()
    try:
        assert wait_until(lambda: agent.link.state() == "connected", timeout=10)
        assert agent.overall_state() == "online"
        own_broker.stop()
        assert wait_until(lambda: agent.overall_state() == "degraded", timeout=10)
        assert "mqtt down" in agent.status_line()
        own_broker.start()
        assert wait_until(lambda: agent.overall_state() == "online", timeout=15)
    finally:
        agent.request_stop()
        agent.shutdown(2.0)
