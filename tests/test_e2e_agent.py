"""End to end, in process: real sources (folder, MJPG video), the real tiny int8 model, the
serial gate against the gate simulator on a pty, a real MQTT broker."""

from __future__ import annotations

import logging
import os
import shutil
import time
import tty
from pathlib import Path

import numpy as np
import pytest

from agent.commands.daemon import Agent
from agent.runtime.inspector import WrappedEngine
from agent.types import Verdict
from firmware_io.gate_sim import GateSimulator
from tests.helpers import run_agent
from tests.support import MqttCollector, agent_cfg, make_folder, make_video, wait_for

DELAY = 400


class Rig:
    """A symlinked pty gate port with the simulator on the other end (re-pluggable)."""

    def __init__(self, tmp: Path):
        self.link = tmp / "ttyGATE"
        self.sim: GateSimulator | None = None
        self.fds: tuple[int, int] | None = None
        self.plug()

    def plug(self):
        master, slave = os.openpty()
        tty.setraw(master)
        tty.setraw(slave)
        if self.link.is_symlink():
            self.link.unlink()
        self.link.symlink_to(os.ttyname(slave))
        self.fds = (master, slave)
        if self.sim is None:
            self.sim = GateSimulator(fd=master, hb_timeout_ms=5000).start()
        else:
            self.sim.swap_fd(master)

    def unplug(self):
        self.link.unlink()
        self.sim.swap_fd(None)
        for fd in self.fds:
            os.close(fd)
        self.fds = None

    def close(self):
        self.sim.stop()
        if self.fds:
            for fd in self.fds:
                os.close(fd)


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def collect(agent: Agent):
    got = []
    agent._extra_sinks = (got.append,)
    return got


@pytest.mark.parametrize("kind", ["folder", "video"])
def test_every_defect_reaches_gate_and_mqtt(kind, tmp_path, rig, mqtt_broker):
    pattern = "gddgdggdgdddg"
    if kind == "folder":
        files = make_folder(tmp_path / "imgs", pattern)
        src, truth = tmp_path / "imgs", [d for _n, d in files]
    else:
        truth = make_video(tmp_path / "parts.avi", pattern)
        src = tmp_path / "parts.avi"
    cfg = agent_cfg(tmp_path, src, broker=mqtt_broker, gate_port=str(rig.link), delay_ms=DELAY,
                    camera={"fps": 40})
    col = MqttCollector(mqtt_broker.host, mqtt_broker.port, "edge-inspect/test-st/#")
    got = []
    agent = Agent(cfg, sinks=(got.append,))
    th = run_agent(agent)
    th.join(20)
    assert not th.is_alive(), "the run should end with the source"
    assert [i.verdict for i in got] == [Verdict.REJECT if d else Verdict.PASS for d in truth]
    rejected = [i for i in got if i.verdict is Verdict.REJECT]
    ids = [i.part_id for i in rejected]
    assert len(set(i.part_id for i in got)) == len(got)
    assert all(" " not in p and len(p) <= 32 for p in ids)
    sim = rig.sim
    wait_for(lambda: len(sim.fired) >= len(ids), timeout=5, what="every reject fired")
    time.sleep(0.1)
    fired = {}
    for ev in sim.fired:
        fired.setdefault(ev.part, []).append(ev)
    assert sorted(fired) == sorted(ids), "exactly the defects fired"
    for insp in rejected:
        (ev,) = fired[insp.part_id]                           # exactly once
        assert ev.at == insp.gate_target and ev.at.startswith("d")
        # d<ms> = travel delay - time already spent when the gate computed it: somewhere
        # inside the gate call (which a loaded box can stretch), rounded to whole ms
        spent = insp.latency_ms - insp.timings_ms["gate"]
        assert DELAY - insp.latency_ms - 1 <= int(ev.at[1:]) <= DELAY - spent + 1
        # the pulse was due when the part reaches the gate: capture + travel delay (plus
        # the pty transit, which a loaded CI box can stretch)
        assert DELAY - 3 < (ev.scheduled_ns - insp.t_capture_ns) / 1e6 < DELAY + 100
    events = wait_for(lambda: len(col.on("events/reject")) >= len(ids) and col.on("events/reject"),
                      timeout=10, what="MQTT reject events")
    time.sleep(0.2)
    events = col.on("events/reject")
    assert sorted(e["part"] for e in events) == sorted(ids)
    by_part = {e["part"]: e for e in events}
    for insp in rejected:
        e = by_part[insp.part_id]
        for key in ("part", "source_ref", "t_capture", "label", "score", "verdict",
                    "model_sha256", "latency_ms", "station", "threshold", "reason", "timings",
                    "image_path"):
            assert key in e, key
        assert e["verdict"] == "REJECT" and e["label"] == "defect" and e["score"] >= 0.5
        assert e["source_ref"] == insp.source_ref
        assert e["model_sha256"] == agent.inspector.model_sha256
        assert Path(e["image_path"]).exists()                 # recorder kept every reject
    if kind == "folder":
        assert [i.source_ref for i in got] == [n for n, _d in files]
    col.close()


class Slow(WrappedEngine):
    def __init__(self, inner, delay_s=0.08, fail_every=0):
        super().__init__(inner)
        self.delay_s, self.fail_every, self.n = delay_s, fail_every, 0

    def invoke(self, pixels):
        self.n += 1
        if self.fail_every and self.n % self.fail_every == 0:
            raise RuntimeError("injected inference failure")
        time.sleep(self.delay_s)
        return self.inner.invoke(pixels)


def test_slow_or_failing_inference_is_failsafe_rejected(tmp_path, mqtt_broker):
    make_folder(tmp_path / "imgs", "g" * 8)           # all good: only FAILSAFE can reject
    cfg = agent_cfg(tmp_path, tmp_path / "imgs", broker=mqtt_broker, deadline_ms=40)
    col = MqttCollector(mqtt_broker.host, mqtt_broker.port, "edge-inspect/test-st/events/#")
    slow = {}

    def wrap(e):
        slow["e"] = Slow(e, delay_s=0.06, fail_every=0)
        return slow["e"]

    got = []
    agent = Agent(cfg, engine_wrap=wrap, sinks=(got.append,))
    th = run_agent(agent)
    th.join(20)
    assert len(got) == 8 and all(i.verdict is Verdict.FAILSAFE for i in got)
    assert all(i.reason.startswith("deadline") for i in got)
    # most were judged hopeless before inference rather than run late
    assert slow["e"].n < 8
    gate = agent.gate                                       # kind "none" records what it did
    assert sorted(o.part_id for o in gate.records) == sorted(i.part_id for i in got)
    wait_for(lambda: len(col.on("events/reject")) >= 8, what="failsafe alerts")
    assert {e["verdict"] for e in col.on("events/reject")} == {"FAILSAFE"}
    assert agent.pipeline.failsafes["deadline"] == 8
    col.close()


def test_inference_error_and_corrupt_image_are_failsafe(tmp_path):
    files = make_folder(tmp_path / "imgs", "gggggg")
    (tmp_path / "imgs" / "003_corrupt.png").write_bytes(b"\x89PNG not really")
    cfg = agent_cfg(tmp_path, tmp_path / "imgs")
    got = []
    agent = Agent(cfg, engine_wrap=lambda e: Slow(e, delay_s=0, fail_every=3),
                  sinks=(got.append,))
    run_agent(agent).join(20)
    by_ref = {i.source_ref: i for i in got}
    assert len(got) == len(files) + 1
    bad = by_ref["003_corrupt.png"]
    assert bad.verdict is Verdict.FAILSAFE and bad.reason.startswith("decode_error")
    errs = [i for i in got if i.reason.startswith("inference_error")]
    assert len(errs) >= 1 and all(i.verdict is Verdict.FAILSAFE for i in errs)
    assert "injected" in errs[0].reason
    # the none gate was told to reject every FAILSAFE part
    assert {o.part_id for o in agent.gate.records} == {i.part_id for i in got
                                                      if i.verdict is Verdict.FAILSAFE}


class NotFinite(WrappedEngine):
    """Every other output carries a NaN or an inf where P(good) is: a float engine's overflow,
    a broken model. Clamping NaN to [0, 1] once scored such a part 0.0, a silent pass."""

    def __init__(self, inner):
        super().__init__(inner)
        self.n, self.poisoned = 0, 0

    def invoke(self, pixels):
        self.n += 1
        out = np.array(self.inner.invoke(pixels), dtype=np.float32)
        if self.n % 2 == 0:
            out[..., 0] = np.nan if self.n % 4 == 0 else np.inf
            self.poisoned += 1
        return out


def test_a_model_output_that_is_not_finite_is_failsafe_never_a_pass(tmp_path):
    make_folder(tmp_path / "imgs", "g" * 8)            # all good: only FAILSAFE can reject
    got, eng = [], {}

    def wrap(e):
        eng["e"] = NotFinite(e)
        return eng["e"]

    agent = Agent(agent_cfg(tmp_path, tmp_path / "imgs"), engine_wrap=wrap, sinks=(got.append,))
    run_agent(agent).join(20)
    assert len(got) == 8
    bad = [i for i in got if i.verdict is not Verdict.PASS]
    assert len(bad) == eng["e"].poisoned >= 3 and all(i.verdict is Verdict.FAILSAFE for i in bad)
    assert all(i.reason.startswith("inference_error") and "not finite" in i.reason for i in bad)
    assert agent.pipeline.failsafes["inference_error"] == len(bad)


def test_pause_resume_threshold_over_mqtt(tmp_path, mqtt_broker):
    make_folder(tmp_path / "imgs", "gdgd" * 3)
    cfg = agent_cfg(tmp_path, tmp_path / "imgs", broker=mqtt_broker,
                    camera={"loop": True, "fps": 50})
    col = MqttCollector(mqtt_broker.host, mqtt_broker.port, "edge-inspect/test-st/#")
    got = []
    agent = Agent(cfg, sinks=(got.append,))
    th = run_agent(agent)

    def cmd(verb, body="{}"):
        k = len(col.on(f"cmd/{verb}/reply"))
        col.c.publish(f"edge-inspect/test-st/cmd/{verb}", body, qos=1)
        return wait_for(lambda: col.on(f"cmd/{verb}/reply")[k:], what=f"{verb} reply")[0]

    try:
        wait_for(lambda: agent.link.connected() and len(got) >= 4, what="parts")
        assert cmd("pause")["ok"]
        t_pause = time.monotonic_ns()
        n0 = len(got)
        wait_for(lambda: len(got) >= n0 + 6, what="paused parts")
        assert agent.overall_state() == "paused"
        wait_for(lambda: any(s.get("state") == "paused" for s in col.on("status")),
                 what="paused status")
        t_resume_sent = time.monotonic_ns()
        assert cmd("resume")["ok"]
        t_resume = time.monotonic_ns()
        n1 = len(got)
        wait_for(lambda: len(got) >= n1 + 6, what="resumed parts")
        # decided (capture + latency) after the pause reply and before resume was even sent:
        # these must all be paused. (A fixed 20 ms margin on capture time raced on a loaded
        # box: a part captured in the window could be decided after the resume.)
        during = [i for i in got if t_pause < i.t_capture_ns
                  and i.t_capture_ns + i.latency_ms * 1e6 < t_resume_sent]
        assert during and all(i.reason == "paused" and i.verdict is Verdict.FAILSAFE
                              for i in during)
        assert all(i.reason != "paused" for i in got if i.t_capture_ns > t_resume)
        # a bad command changes nothing
        bad = cmd("threshold", '{"value": 7}')
        assert bad["ok"] is False and agent.pipeline.inspector.threshold == 0.5
        rep = cmd("threshold", '{"value": 0.99}')
        assert rep["ok"] and rep["threshold"] == 0.99 and rep["previous"] == 0.5
        t_thr = time.monotonic_ns()
        n2 = len(got)
        wait_for(lambda: len(got) >= n2 + 4, what="parts at new threshold")
        assert all(i.threshold == 0.99 for i in got if i.t_capture_ns > t_thr)
    finally:
        agent.request_stop()
        th.join(10)
        col.close()
    assert not th.is_alive()


def test_failsafe_pass_policy(tmp_path, mqtt_broker):
    """failsafe = "pass": FAILSAFE parts are let through (gate.accept) but still alerted."""
    make_folder(tmp_path / "imgs", "gggg")
    cfg = agent_cfg(tmp_path, tmp_path / "imgs", broker=mqtt_broker, deadline_ms=40,
                    inspection={"failsafe": "pass"})
    col = MqttCollector(mqtt_broker.host, mqtt_broker.port, "edge-inspect/test-st/events/#")
    got = []
    agent = Agent(cfg, engine_wrap=lambda e: Slow(e, delay_s=0.06), sinks=(got.append,))
    run_agent(agent).join(20)
    assert len(got) == 4 and all(i.verdict is Verdict.FAILSAFE for i in got)
    assert agent.gate.records == [] and agent.gate.counters().get("accepted") == 4
    wait_for(lambda: len(col.on("events/reject")) >= 4, what="alerts")
    assert {e["action"] for e in col.on("events/reject")} == {"pass"}
    col.close()


@pytest.mark.parametrize("kind", ["folder", "video", "raising"])
def test_vanished_source_degrades_and_recovers(kind, tmp_path, mqtt_broker):
    col = MqttCollector(mqtt_broker.host, mqtt_broker.port, "edge-inspect/test-st/status")
    source = None
    if kind == "folder":
        make_folder(tmp_path / "imgs", "gdgg")
        src = tmp_path / "imgs"
    elif kind == "video":
        make_video(tmp_path / "v.avi", "gdgg")
        src = tmp_path / "v.avi"
        shutil.copy(src, tmp_path / "v.bak")
    else:
        from agent.runtime.sources import FolderSource, SourceError

        make_folder(tmp_path / "imgs", "gdgg")
        src = tmp_path / "imgs"

        class Flaky(FolderSource):
            broken = False

            def read(self):
                if self.broken:
                    raise SourceError("injected: camera cable pulled")
                return super().read()

        source = Flaky(str(src), loop=True)
    cfg = agent_cfg(tmp_path, src, broker=mqtt_broker, camera={"loop": True, "fps": 50})
    got = []
    agent = Agent(cfg, source=source, sinks=(got.append,))
    th = run_agent(agent)
    try:
        wait_for(lambda: len(got) >= 6, what="parts")
        if kind == "folder":
            os.rename(src, tmp_path / "gone")
        elif kind == "video":
            os.truncate(src, 0)
        else:
            source.broken = True
        wait_for(lambda: agent.health()["source"] == "degraded", what="degraded")
        wait_for(lambda: any(s and s.get("state") == "degraded" for s in col.on("status")),
                 what="degraded status on MQTT")
        n = len(got)
        time.sleep(0.3)
        assert len(got) <= n + 1
        if kind == "folder":
            os.rename(tmp_path / "gone", src)
        elif kind == "video":
            shutil.copy(tmp_path / "v.bak", src)
        else:
            source.broken = False
        wait_for(lambda: agent.health()["source"] == "connected", what="recovered")
        wait_for(lambda: len(got) >= n + 6, what="parts after recovery")
        wait_for(lambda: (col.on("status") or [{}])[-1].get("state") == "online",
                 what="online again")
    finally:
        agent.request_stop()
        th.join(10)
        col.close()


def test_gate_and_broker_vanish_no_alert_lost(tmp_path, rig, own_broker):
    make_folder(tmp_path / "imgs", "dgdd")
    cfg = agent_cfg(tmp_path, tmp_path / "imgs", broker=own_broker, gate_port=str(rig.link),
                    camera={"loop": True, "fps": 25})
    col = MqttCollector(own_broker.host, own_broker.port, "edge-inspect/test-st/events/reject")
    col.c.reconnect_delay_set(0.05, 0.2)
    got = []
    agent = Agent(cfg, sinks=(got.append,))
    th = run_agent(agent)
    try:
        wait_for(lambda: len(got) >= 4, what="parts")
        # -- the gate vanishes (adapter unplugged) and comes back
        rig.unplug()
        wait_for(lambda: agent.gate.state() == "down", what="gate down")
        wait_for(lambda: agent.overall_state() == "degraded", what="agent degraded")
        t_down = time.monotonic_ns()
        n = len(got)
        wait_for(lambda: len(got) >= n + 4, what="parts while the gate is away")
        missed = [i for i in got if i.verdict is Verdict.REJECT and i.t_capture_ns > t_down]
        assert missed and all(i.gate_error for i in missed)          # counted, reported
        rig.plug()
        wait_for(lambda: agent.gate.state() == "connected", timeout=10, what="gate back")
        t_up = time.monotonic_ns()
        n = len(got)
        wait_for(lambda: len(got) >= n + 4, what="parts after the gate returned")
        back = [i for i in got if i.verdict is Verdict.REJECT and i.t_capture_ns > t_up]
        assert back and not any(i.gate_error for i in back)
        wait_for(lambda: {i.part_id for i in back} <= {e.part for e in rig.sim.fired},
                 what="rejects fire again")
        # -- the broker vanishes and comes back
        own_broker.stop()
        wait_for(lambda: agent.link.state() != "connected", what="mqtt down")
        n = len(got)
        wait_for(lambda: len(got) >= n + 8, what="parts while the broker is away")
        assert agent.link.outbox_depth() > 0
        own_broker.start()
        wait_for(lambda: agent.link.state() == "connected", timeout=15, what="mqtt back")
        wait_for(lambda: agent.link.outbox_depth() == 0, timeout=10, what="outbox drained")
        n_final = len(got)
    finally:
        agent.request_stop()
        th.join(10)
    want = {i.part_id for i in got if i.verdict is not Verdict.PASS}
    wait_for(lambda: want <= {e["part"] for e in col.on("events/reject")}, timeout=10,
             what="every alert delivered")
    assert n_final > 0
    col.close()


def test_live_source_overload_is_failsafe_not_dropped(tmp_path):
    """A live source faster than inference: frames that find the queue full are FAILSAFE'd
    at once, never dropped silently."""
    from agent.runtime.sources import FolderSource

    make_folder(tmp_path / "imgs", "g" * 10)

    class Live(FolderSource):
        live = True

    src = Live(str(tmp_path / "imgs"), loop=False)
    cfg = agent_cfg(tmp_path, tmp_path / "imgs", deadline_ms=1000,
                    inspection={"queue_size": 1})
    got = []
    agent = Agent(cfg, source=src, engine_wrap=lambda e: Slow(e, delay_s=0.03),
                  sinks=(got.append,))
    run_agent(agent).join(20)
    assert len(got) == 10
    reasons = {i.reason for i in got if i.verdict is Verdict.FAILSAFE}
    assert "overload" in reasons
    assert any(i.verdict is Verdict.PASS for i in got)


def test_encoder_mode_uses_trigger_counts(tmp_path, rig):
    """Encoder mode: the gate controller's TRG latches an encoder count; the next frame
    carries it and its reject targets e<count + offset>."""
    make_folder(tmp_path / "imgs", "dddd")
    rig.sim.encoder_rate = 10_000.0
    rig.sim.trigger_hz = 100.0
    cfg = agent_cfg(tmp_path, tmp_path / "imgs", gate_port=str(rig.link), delay_ms=None,
                    camera={"fps": 20}, gate={"encoder_offset": 3000})
    got = []
    agent = Agent(cfg, sinks=(got.append,))
    run_agent(agent).join(20)
    with_enc = [i for i in got if i.encoder is not None]
    assert with_enc, "frames should carry trigger encoder counts"
    for i in with_enc:
        assert i.gate_target == f"e{i.encoder + 3000}"
    wait_for(lambda: {i.part_id for i in with_enc} <= {e.part for e in rig.sim.fired},
             timeout=3, what="encoder-timed rejects fired")


def test_source_failing_from_the_start_logs_degraded(tmp_path, caplog):
    """A camera that fails before the first status tick used to start without a word."""
    from agent.runtime.sources import FolderSource, SourceError

    make_folder(tmp_path / "imgs", "gdgg")

    class Dead(FolderSource):
        def read(self):
            raise SourceError("injected: camera never answered")

    cfg = agent_cfg(tmp_path, tmp_path / "imgs", camera={"loop": True, "fps": 50})
    agent = Agent(cfg, source=Dead(str(tmp_path / "imgs"), loop=True))
    with caplog.at_level(logging.WARNING, logger="daemon"):
        th = run_agent(agent)
        try:
            wait_for(lambda: any("-> degraded" in r.getMessage() for r in caplog.records),
                     what="a degraded log line")
        finally:
            agent.request_stop()
            th.join(10)
    line = next(r.getMessage() for r in caplog.records if "-> degraded" in r.getMessage())
    assert line.startswith("state starting -> degraded") and "source" in line
