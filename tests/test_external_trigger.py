"""External trigger mode's bad input, end to end on real parts: a simulated line video
replayed as a camera (agent/commands/simulate_line.py), the demo model, the serial gate talking to
the gate simulator on a pty (tests/test_e2e_agent.py's rig).

- frames with no triggers at all are never judged, and nothing is sent to the gate;
- a trigger with no frame inside its window (the camera dropped a burst of frames), and one
  whose latest frame is older than the window (the camera stalled): each a FAILSAFE part,
  kicked, counted by reason in the pipeline's stats, the selector and Prometheus;
- a wall-clock step (NTP) mid-line moves nothing: frames and triggers meet on the
  monotonic clock, every part is judged on its own frame and kicked on time.
"""

from __future__ import annotations

import re
import threading
import time

from prometheus_client import generate_latest

from agent.commands.daemon import Agent
from agent.runtime.inspector import Inspector
from agent.runtime.parts import NO_FRAME_FOR_TRIGGER, ExternalSelector
from agent.runtime.pipeline import Pipeline
from agent.commands.simulate_line import LineSpec, LineVideoSource, drive_triggers, labelled_images, render
from agent.runtime.sources import SourceError
from agent.types import FailsafeReason, Verdict
from firmware_io import protocol as P
from firmware_io.gates import NoneGateConfig, create_gate
from tests.support import agent_cfg, wait_for
from test_e2e_agent import rig  # noqa: F401 - the gate simulator on a pty
from test_parts import BUNDLE, IMAGES

OFFSET_MS, WINDOW_MS, GATE_MS = 30.0, 20.0, 600.0


def _line(tmp_path, parts=10, seed=5):
    video = str(tmp_path / "line.avi")
    truth = render(LineSpec(rate=5, parts=parts, lead_s=0.3, sensor_offset_ms=OFFSET_MS,
                            gate_delay_ms=GATE_MS, seed=seed), labelled_images(IMAGES), video)
    return video, truth


def _frame_index(source_ref: str) -> int:
    return int(re.match(r".*#(\d+) trg:", source_ref).group(1))


def test_frames_without_triggers_are_not_judged(tmp_path):
    video, truth = _line(tmp_path, parts=4)
    gate = create_gate(NoneGateConfig(delay_ms=500))
    got = []
    src = LineVideoSource(video, truth["fps"])
    pipe = Pipeline(src, Inspector.load(BUNDLE, threads=1), gate=gate, sinks=[got.append],
                    queue_size=4, deadline_ms=1000,
                    selector=ExternalSelector(offset_ms=OFFSET_MS, window_ms=WINDOW_MS))
    pipe.start()
    assert pipe.wait(30)
    s = pipe.stats()
    # every part of the line went by the camera; no sensor said so: not one is a part
    assert s["frames"] == truth["frames"] and s["selector"]["frames"] == truth["frames"]
    assert got == [] and s["parts"] == 0 and s["failsafe_reasons"] == {}
    assert "parts" not in s["selector"] and gate.records == []


class GappyCamera(LineVideoSource):
    """The line's camera, but it drops the frames in `drop` and stalls for good from frame
    `stall_at` (each read then fails after 50 ms, as a dead stream's would)."""

    def __init__(self, path, fps, drop: set[int], stall_at: int):
        super().__init__(path, fps)
        self.drop, self.stall_at = drop, stall_at
        self.delivered: list[int] = []          # capture ns of every frame handed out

    def open(self):
        if self.cap is None:                    # a reopen must not rewind the video
            super().open()

    def close(self):
        pass

    def read(self):
        while True:
            if self.i >= self.stall_at:
                time.sleep(0.05)
                raise SourceError("no frame (stalled)")
            got = super().read()
            if got is None or self.i - 1 not in self.drop:
                if got is not None:
                    self.delivered.append(got.t_capture_ns)
                return got


def test_triggers_without_a_frame_in_the_window_are_failsafe_kicked_and_counted(
        tmp_path, rig):  # noqa: F811
    video, truth = _line(tmp_path)
    fps = truth["fps"]
    parts = truth["parts"]
    # a burst of dropped frames around part 3's frame, and the camera dead after part 7's
    t3, t7 = parts[2]["t_line_s"], parts[6]["t_line_s"]
    drop = {i for i in range(truth["frames"]) if abs(i / fps - t3) <= 0.06}
    cam = GappyCamera(video, fps, drop, stall_at=int((t7 + 0.1) * fps))
    cfg = agent_cfg(tmp_path, video, gate_port=str(rig.link), delay_ms=OFFSET_MS + GATE_MS,
                    camera={"fps": 30}, inspection={"queue_size": 4},
                    trigger={"mode": "external", "offset_ms": OFFSET_MS,
                             "window_ms": WINDOW_MS})
    got = []
    agent = Agent(cfg, source=cam, sinks=(got.append,))
    agent.start()
    th = threading.Thread(target=agent.run, daemon=True)
    th.start()
    try:
        wait_for(lambda: cam.t0_ns is not None, timeout=10, what="the camera to start")
        t0 = cam.t0_ns
        # the sensor's exact times on the truth's clock (the trigger topic's receipt time)
        drive_triggers(lambda name, t: agent.pipeline.part_trigger(name, t), truth, t0)
        wait_for(lambda: len(got) == len(parts), timeout=20, what="one record per trigger")
        # which triggers had a frame within the window of trigger + offset: from what the
        # camera really delivered, on the same clock
        def nearest_ms(p):
            target = t0 + int(p["t_trigger_s"] * 1e9) + int(OFFSET_MS * 1e6)
            return min(abs(t - target) for t in cam.delivered) / 1e6
        dist = {f"P{p['n']}": nearest_ms(p) for p in parts}
        assert not any(WINDOW_MS - 5 < d < WINDOW_MS + 5 for d in dist.values()), dist
        want_fs = sorted(n for n, d in dist.items() if d > WINDOW_MS)
        assert "P3" in want_fs and {"P8", "P9", "P10"} <= set(want_fs), dist
        by_name = {g.source_ref.rsplit("trg:", 1)[1]: g for g in got}
        fs = sorted(n for n, g in by_name.items() if g.verdict is Verdict.FAILSAFE)
        assert fs == want_fs, {n: (g.verdict, g.reason) for n, g in by_name.items()}
        for n in fs:
            g = by_name[n]
            assert g.failsafe_reason is FailsafeReason.NO_FRAME_FOR_TRIGGER
            assert g.reason.startswith(f"{NO_FRAME_FOR_TRIGGER}: nearest frame ")
            assert g.action.value == "reject" and g.image is None
        # counted by reason: pipeline stats (metrics JSON), the selector, Prometheus
        s = agent.pipeline.stats()
        assert s["failsafe_reasons"] == {NO_FRAME_FOR_TRIGGER: len(fs)}
        assert s["selector"][NO_FRAME_FOR_TRIGGER] == len(fs)
        assert agent.metrics_payload()["failsafe_reasons"] == {NO_FRAME_FOR_TRIGGER: len(fs)}
        text = generate_latest(agent.prom.registry).decode()
        assert f'edge_inspect_failsafes_total{{reason="{NO_FRAME_FOR_TRIGGER}"}} {len(fs)}.0' \
            in text
        # not judged, so not passed: every one of them is kicked at the gate
        want_kicked = {g.part_id for g in got if g.rejected}
        wait_for(lambda: {e.part for e in rig.sim.fired} >= want_kicked, timeout=5,
                 what="every reject and FAILSAFE kicked")
        assert {by_name[n].part_id for n in fs} <= {e.part for e in rig.sim.fired}
        assert agent.pipeline.source_state == "degraded"
    finally:
        agent.request_stop()
        th.join(20)
    assert not th.is_alive()


def test_a_wall_clock_step_does_not_break_frame_trigger_matching(tmp_path, rig,  # noqa: F811
                                                                  monkeypatch):
    video, truth = _line(tmp_path, seed=7)
    fps = truth["fps"]
    cfg = agent_cfg(tmp_path, video, gate_port=str(rig.link), delay_ms=OFFSET_MS + GATE_MS,
                    camera={"fps": 30}, inspection={"queue_size": 4},
                    trigger={"mode": "external", "offset_ms": OFFSET_MS,
                             "window_ms": WINDOW_MS})
    src = LineVideoSource(video, fps)
    got = []
    agent = Agent(cfg, source=src, sinks=(got.append,))
    real_time = time.time
    step = [0.0]
    monkeypatch.setattr(time, "time", lambda: real_time() + step[0])
    agent.start()
    th = threading.Thread(target=agent.run, daemon=True)
    th.start()
    wait_for(lambda: src.t0_ns is not None, timeout=10, what="the camera to start")

    def send(name, t):
        if name == "P5":
            step[0] = -3600.0           # NTP steps the wall clock back an hour mid-line
        rig.sim.send(P.Trigger(name, 0))

    drive_triggers(send, truth, src.t0_ns)
    th.join(20)
    assert not th.is_alive()
    assert len(got) == 10 and all(g.verdict is not Verdict.FAILSAFE for g in got), \
        [g.reason for g in got]
    walls = [g.t_wall for g in got]
    assert min(b - a for a, b in zip(walls, walls[1:])) < -3000    # the step did happen
    # each part judged on the frame nearest its own trigger + offset. The trigger's time is
    # its receipt (Inspection.t_capture_ns, monotonic), a few ms after the truth's on a
    # busy box: the match is checked against that, the truth only loosely.
    for g, q in zip(got, truth["parts"]):
        assert g.source_ref.endswith(f"trg:P{q['n']}")
        t_frame_ns = src.t0_ns + _frame_index(g.source_ref) * 1e9 / fps
        assert abs(t_frame_ns - (g.t_capture_ns + OFFSET_MS * 1e6)) <= 0.5e9 / fps + 1e5, \
            (g.source_ref, q)
        assert abs((g.t_capture_ns - src.t0_ns) / 1e9 - q["t_trigger_s"]) < 0.1, (g, q)
    # and kicked when it reaches the gate: trigger + travel, on the monotonic clock
    rejected = {g.part_id: g for g in got if g.rejected}
    assert rejected
    wait_for(lambda: len(rig.sim.fired) >= len(rejected), timeout=5, what="kicks fired")
    for ev in rig.sim.fired:
        g = rejected[ev.part]
        err_ms = (ev.actual_ns - g.t_capture_ns) / 1e6 - (OFFSET_MS + GATE_MS)
        assert -5 < err_ms < 50, (ev.part, err_ms)
