"""A demo-like line for the operator page's tests: the demo bundle and images on a loop,
the recorder on, no gate, no MQTT, the page on a free local port."""

from __future__ import annotations

import json
import socket
import http.client
from pathlib import Path

from agent.config import parse_config
from agent.commands.daemon import Agent
from agent.commands.demo import DEMO_DATA


class _NoNotify:
    enabled = False
    watchdog_interval_s = None

    def __getattr__(self, name):
        return lambda *a, **k: None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def line_config(tmp: Path, fps: float = 8.0, **ui):
    return parse_config({
        "station": {"id": "ui-test"},
        "camera": {"source": str(DEMO_DATA / "images"), "loop": True, "fps": fps},
        "model": {"bundle": str(DEMO_DATA / "bundle"), "threads": 1},
        "inspection": {"deadline_ms": 2000, "queue_size": 2},
        "gate": {"kind": "none"},
        "mqtt": {"enabled": False},
        "metrics": {"port": 0},
        "recorder": {"dir": str(tmp / "rec"), "pass_sample": 0.0, "min_free_mb": 0},
        "ui": {"port": free_port(), **ui},
    }, tmp)


def start_line(tmp: Path, **ui) -> Agent:
    agent = Agent(line_config(tmp, **ui), notifier=_NoNotify()).start()
    return agent


class Client:
    """Raw HTTP (http.client sends the path exactly as given: no normalising of '..')."""

    def __init__(self, port: int, headers: dict | None = None):
        self.port = port
        self.headers = headers or {}

    def request(self, method: str, path: str, body=None, headers: dict | None = None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        h = {**self.headers, **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode() if not isinstance(body, bytes) else body
            h.setdefault("Content-Type", "application/json")
            h.setdefault("X-Edge-Inspect", "1")
        h = {k: v for k, v in h.items() if v is not None}     # None: leave that header out
        try:
            c.request(method, path, body=data, headers=h)
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            c.close()

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, body=None, **kw):
        return self.request("POST", path, body if body is not None else {}, **kw)

    def json(self, path: str):
        code, _, body = self.get(path)
        assert code == 200, (code, body[:300])
        return json.loads(body)
