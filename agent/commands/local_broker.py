"""A throwaway MQTT broker on a free loopback port, for the demo and the tests.

Mosquitto when it is installed (Debian's package), else the pure-Python amqtt broker.
Restartable with the same port, so tests can pull the broker out from under a client.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )


def _find_amqtt() -> list[str] | None:
    exe = Path(sys.executable).with_name("amqtt")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("amqtt")
    return [found] if found else None


class LocalBroker:
    """Start/stop/restart an MQTT broker bound to 127.0.0.1:port."""

    def __init__(self, port: int | None = None, prefer: str | None = None,
                 persistent: bool = False):
        """persistent: keep sessions and queued messages across restart() (Mosquitto only;
        lets a durable subscriber in a test tell lost messages from missed ones)."""
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="edge-inspect-broker-"))
        self._proc: subprocess.Popen | None = None
        mosq = _find_mosquitto() if prefer in (None, "mosquitto") else None
        if mosq:
            self.kind = "mosquitto"
            conf = self._dir / "mosquitto.conf"
            persist = (f"persistence true\npersistence_location {self._dir}/\n" if persistent
                       else "persistence false\n")
            if os.geteuid() == 0:
                # Run as root, Mosquitto drops to user 'mosquitto', which cannot write our
                # private temp dir (its persistence file would silently not be saved).
                persist += "user root\n"
            conf.write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{persist}"
                "max_queued_messages 100000\nmax_inflight_messages 100\n"
            )
            self._cmd = [mosq, "-c", str(conf)]
        else:
            amqtt = _find_amqtt()
            if not amqtt:
                raise RuntimeError(
                    "no MQTT broker available: install Debian's 'mosquitto' package "
                    "or the 'amqtt' Python package (pip install 'edge-inspect[runtime]')"
                )
            if persistent:
                raise RuntimeError("a persistent broker needs Mosquitto (apt-get install mosquitto)")
            self.kind = "amqtt"
            conf = self._dir / "amqtt.yaml"
            conf.write_text(
                "listeners:\n  default:\n    type: tcp\n"
                f"    bind: 127.0.0.1:{self.port}\n"
                "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                "    allow_anonymous: true\n"
            )
            self._cmd = [*amqtt, "-c", str(conf)]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> "LocalBroker":
        if self.running:
            return self
        log = open(self._dir / "broker.log", "ab")
        self._proc = subprocess.Popen(self._cmd, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited at start: "
                                   f"{(self._dir / 'broker.log').read_text(errors='replace')[-500:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.kind} did not listen on {self.host}:{self.port} within {timeout}s")

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
