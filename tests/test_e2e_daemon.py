"""The daemon as a subprocess: `edge-inspect run --config FILE` with signals, systemd
notify on a real datagram socket, MQTT reload reports, config errors, no TensorFlow."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support import PY, ROOT, MqttCollector, copy_bundle, make_folder, wait_for


class Daemon:
    def __init__(self, config: Path, env: dict | None = None):
        e = dict(os.environ)
        e.pop("NOTIFY_SOCKET", None)
        e.update(env or {})
        self.p = subprocess.Popen([PY, "-m", "agent", "run", "--config", str(config)],
                                  cwd=ROOT, env=e, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_log(self, text: str, timeout: float = 20.0, after: int = 0) -> str:
        return wait_for(lambda: next((ln for ln in self.lines[after:] if text in ln), None),
                        timeout=timeout, what=f"log line {text!r}\n{self.log()[-3000:]}")

    def stop(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)


def write_cfg(tmp: Path, bundle: Path, broker, source: Path, **extra) -> Path:
    text = f"""
[station]
id = "sub-st"
[camera]
source = "{source}"
loop = true
fps = 30
[model]
bundle = "{bundle}"
threads = 1
[mqtt]
host = "{broker.host}"
port = {broker.port}
outbox = "{tmp / 'outbox.sqlite'}"
commands = true
metrics_interval_s = 1
[metrics]
port = 0
[recorder]
dir = "{tmp / 'rec'}"
"""
    p = tmp / "config.toml"
    p.write_text(text)
    return p


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.2)
    msgs: list[tuple[float, str]] = []
    stop = threading.Event()

    def rx():
        while not stop.is_set():
            try:
                data = s.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            msgs.append((time.monotonic(), data.decode()))

    t = threading.Thread(target=rx, daemon=True)
    t.start()
    yield path, msgs
    stop.set()
    t.join(1)
    s.close()


def test_sighup_corrupt_model_keeps_old_then_sigterm_drains(tmp_path, mqtt_broker,
                                                           notify_socket):
    sock, msgs = notify_socket
    bundle = copy_bundle(tmp_path / "bundle")
    make_folder(tmp_path / "imgs", "gdgdgg")
    cfg = write_cfg(tmp_path, bundle, mqtt_broker, tmp_path / "imgs")
    col = MqttCollector(mqtt_broker.host, mqtt_broker.port, "edge-inspect/sub-st/#")
    d = Daemon(cfg, env={"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "2000000"})
    try:
        # READY only once parts flow: its STATUS already counts processed parts
        ready = wait_for(lambda: next((m for _t, m in msgs if "READY=1" in m), None),
                         timeout=30, what="READY=1\n" + d.log()[-2000:])
        status = next(ln for ln in ready.splitlines() if ln.startswith("STATUS="))
        parts = int(status.split(" parts/s, ")[1].split(" parts")[0])
        assert parts >= 1, status
        wait_for(lambda: any("WATCHDOG=1" in m for _t, m in msgs), timeout=5, what="watchdog")
        wait_for(lambda: len(col.on("events/reject")) >= 2, what="reject events")
        sha_old = col.on("events/reject")[-1]["model_sha256"]
        # -- tamper with the model and ask for a reload: refused, the old model keeps running
        with open(bundle / "model.tflite", "ab") as f:
            f.write(b"tampered")
        n = len(d.lines)
        d.p.send_signal(signal.SIGHUP)
        line = d.wait_log("REFUSED", after=n)
        assert "corrupt or was changed" in line
        rep = wait_for(lambda: col.on("events/reload"), what="reload report")[-1]
        assert rep["ok"] is False and "model" in rep["error"] and rep["origin"] == "SIGHUP"
        k = len(col.on("events/reject"))
        wait_for(lambda: len(col.on("events/reject")) >= k + 2, what="rejects after refusal")
        assert col.on("events/reject")[-1]["model_sha256"] == sha_old
        assert any("RELOADING=1" in m for _t, m in msgs)
        assert d.p.poll() is None
        # -- a bad config is refused the same way
        good_cfg = cfg.read_text()
        cfg.write_text(good_cfg.replace("threads = 1", "threads = 1\nthreshhold = 0.2"))
        (bundle / "model.tflite").write_bytes((bundle / "model.tflite").read_bytes()[:-8])
        n = len(d.lines)
        d.p.send_signal(signal.SIGHUP)
        line = d.wait_log("REFUSED", after=n)
        assert "threshhold" in line and "did you mean 'threshold'" in line
        # -- fixed: the reload goes through (over MQTT this time)
        cfg.write_text(good_cfg.replace("threads = 1", "threads = 1\nthreshold = 0.7"))
        col.c.publish("edge-inspect/sub-st/cmd/reload", "{}", qos=1)
        rep = wait_for(lambda: col.on("cmd/reload/reply"), what="reload reply")[-1]
        assert rep["ok"] is True and rep["threshold"] == 0.7, rep
        wait_for(lambda: col.on("events/reject")[-1]["threshold"] == 0.7, what="new threshold")
        # -- SIGTERM: STOPPING, drain, exit 0
        n = len(d.lines)
        d.p.send_signal(signal.SIGTERM)
        assert d.p.wait(15) == 0
        d._t.join(2)
        assert "drained fully" in d.log()
        wait_for(lambda: any("STOPPING=1" in m for _t, m in msgs), timeout=2, what="STOPPING")
        wait_for(lambda: (col.on("status") or [{}])[-1].get("state") == "offline",
                 what="offline status")
    finally:
        d.stop()
        col.close()


def test_config_errors_one_line_each_exit_2(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[camera]\nsource = "nowhere"\nfsp = 3\n[inspection]\ndeadline_ms = -1\n')
    r = subprocess.run([PY, "-m", "agent", "run", "--config", str(cfg)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errs) == 2, r.stderr
    assert any("camera.fsp" in e for e in errs) and any("deadline_ms" in e for e in errs)


def test_bad_bundle_at_start_exit_2(tmp_path, mqtt_broker):
    bundle = copy_bundle(tmp_path / "bundle")
    with open(bundle / "model.tflite", "ab") as f:
        f.write(b"x")
    make_folder(tmp_path / "imgs", "g")
    cfg = write_cfg(tmp_path, bundle, mqtt_broker, tmp_path / "imgs")
    r = subprocess.run([PY, "-m", "agent", "run", "--config", str(cfg)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "error: model.bundle:" in r.stderr and "corrupt" in r.stderr


def test_daemon_never_imports_tensorflow():
    r = subprocess.run([PY, "-X", "importtime", "-c",
                        "import agent.commands.daemon, agent.commands.demo, agent.runtime.pipeline, agent.report.reporter, "
                        "agent.report.prom, agent.report.recorder, agent.runtime.sources, agent.runtime.inspector"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tensorflow" not in r.stderr and "keras" not in r.stderr
    r = subprocess.run([PY, "-X", "importtime", "-m", "agent", "run", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "tensorflow" not in r.stderr
