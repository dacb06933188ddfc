"""The serial gate opens its port with pyserial's serial_for_url: a device path as before, and
socket://HOST:PORT (the gate simulator behind a TCP socket) and spy://PORT (the wire logged)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from firmware_io.gate_sim import GateSimulator
from firmware_io.gates import DEFER_CHECKS, SerialGateConfig, create_gate
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "agent" / "demo_data" / "bundle"


def _reject_round_trip(port: str, sim_ready) -> None:
    # 60 ms is shorter than check-config's resend rule allows: the wire is under test here
    g = create_gate(SerialGateConfig.model_validate({"port": port, "delay_ms": 60, "pulse_ms": 10},
                                                    context=DEFER_CHECKS))
    g.open()
    try:
        assert wait_until(lambda: g.state() == "connected", timeout=10), g.last_error
        sim = sim_ready()
        assert g.fw == "sim-1.0" and g.proto == 1
        out = g.reject("URL1", time.monotonic_ns())
        assert out.sent and not out.late and out.error is None
        assert wait_until(lambda: len(sim.fired) == 1 and g.counters().get("acked") == 1)
        assert sim.fired[0].part == "URL1"
    finally:
        g.close()


def test_socket_url_reaches_a_gate_behind_tcp():
    srv = socket.create_server(("127.0.0.1", 0))
    host, port = srv.getsockname()
    held: dict = {}

    def serve():
        conn, _ = srv.accept()
        held["conn"] = conn                  # the simulator uses its fd; keep the socket alive
        held["sim"] = GateSimulator(fd=conn.fileno()).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        _reject_round_trip(f"socket://{host}:{port}",
                           lambda: wait_until(lambda: "sim" in held) and held["sim"])
    finally:
        t.join(timeout=5)
        if "sim" in held:
            held["sim"].stop()
        if "conn" in held:
            held["conn"].close()
        srv.close()


def test_spy_url_logs_the_wire(pty_pair, tmp_path):
    log = tmp_path / "wire.txt"
    sim = GateSimulator(fd=pty_pair.peer_fd).start()
    try:
        _reject_round_trip(f"spy://{pty_pair.host_path}?file={log}", lambda: sim)
    finally:
        sim.stop()
    wire = log.read_text(errors="replace")
    assert "HELLO" in wire and "REJ" in wire and "URL1" in wire


def test_check_config_takes_a_serial_url_and_still_refuses_non_devices(tmp_path, pty_pair):
    shutil.copytree(DEMO_BUNDLE, tmp_path / "bundle")
    (tmp_path / "images").mkdir()
    shutil.copy(DEMO_BUNDLE / "sample.png", tmp_path / "images" / "good_1.png")
    regular = tmp_path / "ttyUSB0"
    regular.write_text("")

    def check(port: str) -> tuple[int, str]:
        cfg = tmp_path / "config.toml"
        cfg.write_text(f'[camera]\nsource = "images"\n[model]\nbundle = "bundle"\n'
                       f'[mqtt]\nenabled = false\n[metrics]\nport = 0\n[recorder]\nenabled = false\n'
                       f'[gate]\nkind = "serial"\nport = "{port}"\ndelay_ms = 800\n')
        r = subprocess.run([sys.executable, "-m", "agent", "check-config", str(cfg)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert "Traceback" not in r.stderr, r.stderr
        return r.returncode, r.stderr

    for port in (pty_pair.host_path, "socket://127.0.0.1:7777", f"spy://{pty_pair.host_path}"):
        code, err = check(port)
        assert code == 0, (port, err)
    code, err = check(str(regular))
    assert code == 2 and f"gate.port: {regular} is a regular file, not a serial device" in err
    code, err = check("/dev/null")
    assert code == 2 and "gate.port: /dev/null is not a serial port" in err
