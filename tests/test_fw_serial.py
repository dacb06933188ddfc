"""Serial gate against the gate simulator over real pty serial lines."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tty
from pathlib import Path

import pytest

from tests.helpers import wait_until  # noqa: E402
from firmware_io.gate_sim import GateSimulator
from firmware_io.gates import (DEFER_CHECKS, MqttGateConfig, NoneGateConfig, SerialGateConfig, create_gate,
                               gate_class, gate_kinds)

ROOT = Path(__file__).resolve().parents[1]
MS = 1_000_000


def serial_config(**kw) -> SerialGateConfig:
    # The gate's behaviour under test, not check-config's rules: these travel delays are
    # shorter than the resends (ack_timeout_ms x retries) that check-config would allow.
    return SerialGateConfig.model_validate(kw, context=DEFER_CHECKS)


@pytest.fixture
def rig(pty_pair):
    """A started simulator on the pty's peer end and a factory for gates on the host end."""
    sim = GateSimulator(fd=pty_pair.peer_fd).start()
    gates = []

    def make(**kw):
        hooks = {k: kw.pop(k) for k in list(kw) if k.startswith("on_")}
        kw.setdefault("delay_ms", 100)
        kw.setdefault("pulse_ms", 20)
        g = create_gate(serial_config(port=pty_pair.host_path, **kw), **hooks)
        g.open()
        gates.append(g)
        return g

    yield sim, make
    for g in gates:
        g.close()
    sim.stop()


def test_registry():
    assert {"serial", "modbus", "mqtt", "none"} <= set(gate_kinds())
    with pytest.raises(ValueError):
        gate_class("laser")
    with pytest.raises(ValueError):
        create_gate(MqttGateConfig(delay_ms=400))     # needs a link
    with pytest.raises(ValueError):
        SerialGateConfig(delay_ms=100)                # a serial gate needs its port
    # a gate that does nothing says so: no target, never late, not "connected" (with
    # delay_ms 0, what the agent passes for kind = "none", every part would be "late")
    g = create_gate(NoneGateConfig())
    g.open()
    out = g.reject("P1", time.monotonic_ns() - 1_000_000)
    assert out.sent and not out.late and out.target == "" and out.error is None
    assert g.state() == "none"
    assert g.records[-1].part_id == "P1" and g.records[-1].target == "d0" and g.records[-1].late
    assert g.counters().get("recorded") == 1 and "sent" not in g.counters()
    assert "late" not in g.counters()
    g.close()


def test_handshake_reject_fires_at_target(rig):
    sim, make = rig
    fired = []
    g = make(on_fired=lambda *a: fired.append(a))
    assert wait_until(lambda: g.state() == "connected")
    assert g.fw == "sim-1.0" and g.proto == 1
    t_cap = time.monotonic_ns() - 20 * MS
    t0 = time.perf_counter()
    outs = [g.reject(f"P{i}", t_cap, gate=1 + i % 2) for i in range(3)]
    call_ms = (time.perf_counter() - t0) * 1000 / 3
    assert all(o.sent and not o.late and o.error is None for o in outs)
    assert call_ms < 5, f"reject() took {call_ms:.2f} ms"
    assert wait_until(lambda: len(fired) == 3)
    assert sorted(p for p, _, _ in fired) == ["P0", "P1", "P2"]
    for ev in sim.fired:
        err_ms = (ev.actual_ns - (t_cap + 100 * MS)) / MS
        assert -2 < err_ms < 25, err_ms              # fired when the part reached the gate
    c = g.counters()
    assert c["sent"] == 3 and c["acked"] == 3 and c.get("resent", 0) == 0 and c["fired"] == 3
    assert g.rtt_quantiles()["n"] == 3


def test_late_reject_sent_as_d0_and_flagged(rig):
    sim, make = rig
    g = make()
    assert wait_until(lambda: g.state() == "connected")
    out = g.reject("LATE1", time.monotonic_ns() - 400 * MS)   # delay is 100 ms
    assert out.sent and out.late and out.target == "d0"
    assert wait_until(lambda: len(sim.fired) == 1)
    assert g.counters()["late"] == 1


def test_lost_acks_resent_same_seq_and_deduplicated(rig):
    sim, make = rig
    g = make(ack_timeout_ms=40, retries=3)
    assert wait_until(lambda: g.state() == "connected")
    sim.drop_acks = 2                 # the gate executes, but its first two ACKs are lost
    g.reject("DUP1", time.monotonic_ns())
    assert wait_until(lambda: g.counters().get("acked") == 1)
    c = g.counters()
    assert c["resent"] == 2 and c.get("timeouts", 0) == 0
    rejs = [m for m in sim.received if getattr(m, "part", None) == "DUP1"]
    assert len(rejs) == 3 and len({m.seq for m in rejs}) == 1
    assert sim.counters.duplicates == 2
    assert wait_until(lambda: len(sim.fired) == 1)
    time.sleep(0.15)
    assert [e.part for e in sim.fired] == ["DUP1"]        # fired once, not three times


def test_nak_counted_surfaced_degraded(rig):
    sim, make = rig
    failed = []
    g = make(on_reject_failed=lambda p, why: failed.append((p, why)))
    assert wait_until(lambda: g.state() == "connected")
    sim.nak_code = "FULL"
    out = g.reject("N1", time.monotonic_ns())
    assert out.sent                                    # non-blocking: the NAK comes later
    assert wait_until(lambda: failed == [("N1", "NAK FULL")])
    c = g.counters()
    assert c["naked"] == 1 and c["nak_FULL"] == 1 and c.get("resent", 0) == 0
    assert g.state() == "degraded"
    assert not sim.fired


def test_silent_gate_bounded_resend_then_timeout(rig):
    sim, make = rig
    failed = []
    g = make(ack_timeout_ms=30, retries=2, on_reject_failed=lambda p, why: failed.append(why))
    assert wait_until(lambda: g.state() == "connected")
    sim.silent = True
    g.reject("S1", time.monotonic_ns())
    assert wait_until(lambda: g.counters().get("timeouts") == 1)
    time.sleep(0.1)
    c = g.counters()
    assert c["resent"] == 2 and c["timeouts"] == 1 and c["pending"] == 0
    assert len([m for m in sim.received if getattr(m, "part", None) == "S1"]) == 3
    assert failed == ["timeout"]
    assert g.state() == "degraded"


def test_never_answering_gate_is_degraded_not_connected(rig):
    sim, make = rig
    sim.silent = True
    g = make(hello_retry_ms=100)
    time.sleep(0.35)
    assert g.state() == "degraded"
    assert g.counters()["hello_sent"] >= 3             # keeps asking
    sim.silent = False
    assert wait_until(lambda: g.state() == "connected")


def test_corrupt_bytes_counted_reader_survives(rig):
    sim, make = rig
    g = make()
    assert wait_until(lambda: g.state() == "connected")
    from firmware_io import protocol as P
    bad = bytearray(P.Ack(999).encode())
    bad[5] ^= 0x01
    sim.inject(b"\x00\xff\xfe garbage\n" + bytes(bad) + P.frame(b"BOGUS 1") + b"Q" * 600
               + b"\n" + P.frame(b"ACK x") + P.Fired("P", 1, 5).encode()[:7])
    sim.inject(b"\n")                                   # cuts the half FIRED line: garbage
    assert wait_until(lambda: g.counters()["parse_overlong"] == 1)
    out = g.reject("AFTER", time.monotonic_ns())
    assert out.sent and wait_until(lambda: g.counters().get("acked") == 1)
    c = g.counters()
    assert c["parse_garbage"] == 2 and c["parse_bad_checksum"] == 1
    assert c["parse_unknown_verb"] == 1 and c["parse_bad_fields"] == 1
    assert g.state() == "connected"


def test_heartbeat_loss_failsafe_and_back(rig):
    sim, make = rig
    sim.hb_timeout_ms = 250
    g = make(heartbeat_ms=60)
    assert wait_until(lambda: g.state() == "connected")
    time.sleep(0.4)
    assert not sim.failsafe                              # heartbeats keep it alive
    g.close()                                            # host gone: no heartbeats
    assert wait_until(lambda: sim.failsafe, timeout=2)
    assert sim.faults[-1][0] == "HBLOST"
    g2 = make(heartbeat_ms=60)                           # host back
    assert wait_until(lambda: not sim.failsafe)
    assert sim.faults[-1][0] == "CLEAR" and sim.counters.failsafe_exits == 1
    # host-visible side: heartbeats slower than the gate's timeout -> FAULT seen, degraded
    g2.close()
    sim.hb_timeout_ms = 150
    g3 = make(heartbeat_ms=400)
    # a fault holds for ~250 ms of every 400 ms heartbeat cycle: poll for it rather than read
    # it once after the counter moved (on a loaded box the next heartbeat had cleared it)
    assert wait_until(lambda: (g3.fault or ("",))[0] == "HBLOST" and g3.state() == "degraded",
                      timeout=2)
    assert g3.counters().get("faults", 0) >= 1
    assert wait_until(lambda: g3.counters().get("fault_clears", 0) >= 1, timeout=2)


def test_replug_port_vanishes_and_returns(tmp_path):
    """A USB adapter re-plugged: the device path is missing at start, appears, vanishes
    (the other end hangs up and the path is removed) and comes back as a new tty."""
    link = tmp_path / "ttyGATE"
    fired = []
    g = create_gate(serial_config(port=str(link), reconnect_min_s=0.02, reconnect_max_s=0.1,
                                  delay_ms=30, pulse_ms=10),
                    on_fired=lambda *a: fired.append(a[0]))
    g.open()                                            # must not raise: device missing
    assert g.state() == "down"
    out = g.reject("EARLY", time.monotonic_ns())
    assert not out.sent and out.error == "gate down"

    def plug():
        master, slave = os.openpty()
        tty.setraw(master)
        tty.setraw(slave)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(os.ttyname(slave))
        return master, slave

    m1, s1 = plug()
    sim = GateSimulator(fd=m1).start()
    try:
        assert wait_until(lambda: g.state() == "connected")
        assert g.reject("A", time.monotonic_ns()).sent
        assert wait_until(lambda: "A" in fired)
        # unplug: the path disappears and the line hangs up
        link.unlink()
        sim.swap_fd(None)
        os.close(m1)
        os.close(s1)
        assert wait_until(lambda: g.state() == "down")
        assert not g.reject("GONE", time.monotonic_ns()).sent
        time.sleep(0.2)                                  # a few failed reopen attempts
        m2, s2 = plug()
        sim.swap_fd(m2)
        assert wait_until(lambda: g.state() == "connected")
        assert g.reject("B", time.monotonic_ns()).sent
        assert wait_until(lambda: "B" in fired)
        c = g.counters()
        assert c["reconnects"] == 1 and c["disconnects"] == 1 and c["dropped_down"] == 2
        os.close(s2)
    finally:
        g.close()
        sim.stop()


def test_encoder_mode_and_triggers(rig):
    sim, make = rig
    sim.encoder_rate = 10_000.0                          # counts/s
    sim.trigger_hz = 40.0
    results = []

    def on_trigger(part, enc):                           # the agent would inspect, then:
        results.append(g.reject(part, time.monotonic_ns(), encoder=enc))

    g = make(delay_ms=None, encoder_offset=500, pulse_ms=5, on_trigger=on_trigger)
    assert wait_until(lambda: len(sim.fired) >= 3, timeout=3)
    assert all(r.target.startswith("e") and r.sent for r in results)
    trig = dict(sim.triggers)
    for ev in sim.fired[:3]:
        enc_at_fire = sim.encoder(ev.actual_ns)
        assert 0 <= enc_at_fire - (trig[ev.part] + 500) < 100     # within 10 ms of counts


def test_config_command(rig):
    sim, make = rig
    g = make()
    assert wait_until(lambda: g.state() == "connected")
    g.send_config("hb_timeout_ms", 1500)
    g.send_config("no_such_key", 1)
    assert wait_until(lambda: g.counters().get("cfg_acked") == 1 and g.counters().get("naked") == 1)
    assert sim.hb_timeout_ms == 1500 and g.counters()["nak_BADKEY"] == 1


def test_gate_sim_cli_pty():
    proc = subprocess.Popen([sys.executable, "-m", "firmware_io.gate_sim", "--pty", "--duration", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        path = proc.stdout.readline().strip()
        assert path.startswith("/dev/")
        fired = []
        g = create_gate(serial_config(port=path, delay_ms=20),
                        on_fired=lambda *a: fired.append(a))
        g.open()
        try:
            assert wait_until(lambda: g.state() == "connected")
            g.reject("CLI1", time.monotonic_ns())
            assert wait_until(lambda: fired and fired[0][0] == "CLI1")
        finally:
            g.close()
    finally:
        proc.terminate()
        rc = proc.wait(10)
    assert rc == 0
    assert "fired=1" in proc.stderr.read()
