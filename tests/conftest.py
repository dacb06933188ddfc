"""Fixtures every test may use: a real MQTT broker, a pty serial pair, a config writer."""

from __future__ import annotations

import os
import sys
import textwrap
import tty
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.commands.local_broker import LocalBroker  # noqa: E402

DEEPPCB = ROOT.parent / "shared" / "datasets" / "deeppcb"


@pytest.fixture(scope="session")
def mqtt_broker():
    """One real broker (Mosquitto, else amqtt) for the whole session. Do not stop it."""
    broker = LocalBroker().start()
    yield broker
    broker.stop()


@pytest.fixture
def own_broker():
    """A broker of this test's own, which the test may stop() and start() at will."""
    broker = LocalBroker().start()
    yield broker
    broker.stop()


@pytest.fixture
def persistent_broker():
    """Like own_broker, but Mosquitto with persistence: sessions and queued QoS 1 messages
    survive stop()/start(). Skips where only amqtt is available."""
    try:
        broker = LocalBroker(persistent=True).start()
    except RuntimeError as e:
        pytest.skip(str(e))
    yield broker
    broker.stop()


class PtyPair:
    """A real serial line: `host_path` is a tty device pyserial can open; `peer_fd` is the
    other end (the 'gate controller' side), a raw file descriptor."""

    def __init__(self):
        self.peer_fd, self.host_fd = os.openpty()
        tty.setraw(self.peer_fd)
        tty.setraw(self.host_fd)
        self.host_path = os.ttyname(self.host_fd)
        self.peer_path = None

    def close(self):
        for fd in (self.peer_fd, self.host_fd):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def pty_pair():
    pair = PtyPair()
    yield pair
    pair.close()


@pytest.fixture
def write_config(tmp_path):
    """write_config(text) -> Path of a config.toml in tmp_path (text is dedented)."""

    def _write(text: str, name: str = "config.toml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return _write


@pytest.fixture(scope="session")
def deeppcb():
    if not (DEEPPCB / "train").is_dir():
        pytest.skip(f"DeepPCB dataset not present at {DEEPPCB}")
    return DEEPPCB
