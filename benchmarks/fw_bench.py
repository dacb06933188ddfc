"""firmware_io benchmarks (not tests): run  .venv/bin/python benchmarks/fw_bench.py

1. alerts/s through the SQLite outbox to a live broker (synchronous FULL and NORMAL)
2. drain rate after an outage (alerts queued while the broker is down)
3. REJ write -> ACK round trip over a pty with the gate simulator (p50/p99)
4. host-timed (Modbus RTU) firing error, scheduled vs actual, p50/p99
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import tty
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from agent.commands.local_broker import LocalBroker  # noqa: E402  (test/demo helper: a throwaway broker)
from firmware_io.gate_sim import GateSimulator  # noqa: E402
from firmware_io.gates import (DEFER_CHECKS, ModbusGateConfig, SerialGateConfig,  # noqa: E402
                               create_gate)
from firmware_io.mqtt_config import LinkTuning, MqttConfig  # noqa: E402
from firmware_io.mqtt_link import MqttLink  # noqa: E402
from helpers import wait_until  # noqa: E402  (tests/helpers.py)


def wait(pred, timeout):
    return wait_until(pred, timeout, step=0.002)


def bench_alerts(broker, n, sync):
    d = tempfile.mkdtemp()
    link = MqttLink(MqttConfig(host=broker.host, port=broker.port, outbox=f"{d}/ob.sqlite"),
                    station="bench", tuning=LinkTuning(outbox_sync=sync))
    link.start()
    wait(link.connected, 5)
    t0 = time.perf_counter()
    for i in range(n):
        link.publish_alert({"part": f"P{i}", "verdict": "REJECT", "score": 0.9})
    t_commit = time.perf_counter() - t0
    link.wait_drained(120)
    t_all = time.perf_counter() - t0
    link.stop()
    return {"sync": sync, "n": n, "commit_per_s": round(n / t_commit),
            "delivered_per_s": round(n / t_all), "commit_us_each": round(t_commit / n * 1e6, 1)}


def bench_drain(n):
    broker = LocalBroker().start()
    d = tempfile.mkdtemp()
    link = MqttLink(MqttConfig(host=broker.host, port=broker.port, outbox=f"{d}/ob.sqlite"),
                    station="bench", tuning=LinkTuning(outbox_sync="NORMAL", reconnect_min_s=0.1,
                                                       reconnect_max_s=0.2))
    link.start()
    wait(link.connected, 5)
    broker.stop()
    wait(lambda: not link.connected(), 5)
    for i in range(n):
        link.publish_alert({"part": f"P{i}"})
    broker.start()
    wait(link.connected, 10)
    t0 = time.perf_counter()
    link.wait_drained(120)
    dt = time.perf_counter() - t0
    link.stop()
    broker.stop()
    return {"n": n, "drain_per_s": round(n / dt), "seconds": round(dt, 2)}


def bench_rtt(n):
    m, s = os.openpty()
    tty.setraw(m)
    tty.setraw(s)
    sim = GateSimulator(fd=m, max_scheduled=10_000).start()
    # DEFER_CHECKS: 3 resends x 100 ms outlast the 200 ms travel, which a plant's config
    # refuses; here every command is ACKed at once, so the rule does not matter
    g = create_gate(SerialGateConfig.model_validate(
        {"port": os.ttyname(s), "delay_ms": 200, "pulse_ms": 5}, context=DEFER_CHECKS))
    g.open()
    wait(lambda: g.state() == "connected", 5)
    call_ns = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        g.reject(f"P{i}", time.monotonic_ns())
        call_ns.append(time.perf_counter_ns() - t0)
        wait(lambda: g.counters().get("acked", 0) > i, 1)    # one at a time: pure round trip
    q = g.rtt_quantiles()
    call_ns.sort()
    g.close()
    sim.stop()
    os.close(s)
    return {"n": n, "rtt_p50_ms": round(q["p50"], 3), "rtt_p99_ms": round(q["p99"], 3),
            "rtt_max_ms": round(q["max"], 3),
            "reject_call_p50_us": round(call_ns[len(call_ns) // 2] / 1e3, 1),
            "reject_call_p99_us": round(call_ns[int(len(call_ns) * 0.99)] / 1e3, 1)}


def bench_modbus(n):
    from test_fw_modbus import ModbusServerThread, NullModem
    modem = NullModem()
    srv = ModbusServerThread(modem.a)
    g = create_gate(ModbusGateConfig(port=modem.b, delay_ms=60, pulse_ms=20))
    g.open()
    wait(lambda: g.state() == "connected", 5)
    for i in range(n):
        g.reject(f"P{i}", time.monotonic_ns())
        time.sleep(0.05)                                     # one part every 50 ms
    wait(lambda: g.counters().get("fired", 0) >= n, 10)
    time.sleep(0.1)
    fire = g.fire_error_quantiles()
    from firmware_io.gates.base import quantiles_ms
    issue = quantiles_ms(list(g.issue_errors_ns))
    print("modbus counters:", g.counters(), sorted(e / 1e6 for e in g.issue_errors_ns)[-5:],
          file=sys.stderr)
    g.close()
    srv.stop()
    modem.close()
    return {"n": n, "fire_err_p50_ms": round(fire["p50"], 3), "fire_err_p99_ms": round(fire["p99"], 3),
            "issue_err_p50_ms": round(issue["p50"], 3), "issue_err_p99_ms": round(issue["p99"], 3)}


def main():
    out = {}
    broker = LocalBroker().start()
    try:
        out["alerts_full"] = bench_alerts(broker, 2000, "FULL")
        out["alerts_normal"] = bench_alerts(broker, 5000, "NORMAL")
    finally:
        broker.stop()
    out["drain_after_outage"] = bench_drain(10_000)
    out["rej_ack_rtt_pty"] = bench_rtt(1000)
    out["modbus_host_timed"] = bench_modbus(100)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
