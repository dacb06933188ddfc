"""Frames to parts: [trigger] config, the part selectors on real simulated-line videos
(written as MJPG and decoded by OpenCV), their documented odd cases, and the pipeline."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.config import ConfigError, parse_config, summary
from agent.runtime.parts import (MISSED_TRIGGER, NO_FRAME_FOR_TRIGGER, PART_NOT_JUDGED, PART_STOPPED,
                         TOUCHING, ExternalSelector, PresenceSelector, make_selector)
from agent.commands.simulate_line import LineSpec, LineVideoSource, labelled_images, render
from agent.runtime.sources import Captured

IMAGES = Path(__file__).resolve().parents[1] / "agent" / "demo_data" / "images"
BUNDLE = Path(__file__).resolve().parents[1] / "agent" / "demo_data" / "bundle"
MS = 1_000_000


# -- config ------------------------------------------------------------------------------
def test_trigger_defaults_to_frame_and_each_mode_has_its_own_keys():
    assert parse_config({}).trigger.mode == "frame"
    assert make_selector(parse_config({}).trigger) is None
    cfg = parse_config({"trigger": {"mode": "presence", "roi": [0.1, 0.2, 0.9, 0.8],
                                    "direction": "-x"}})
    assert cfg.trigger.roi == (0.1, 0.2, 0.9, 0.8)
    assert isinstance(make_selector(cfg.trigger), PresenceSelector)
    assert "presence in roi [0.1, 0.2, 0.9, 0.8] moving -x" in summary(cfg)
    with pytest.raises(ConfigError) as e:
        parse_config({"trigger": {"mode": "external", "source": "mqtt", "roi": [0, 0, 1, 1]}})
    assert e.value.problems[0].startswith("trigger.roi: unknown key")
    with pytest.raises(ConfigError) as e:
        parse_config({"trigger": {"mode": "presnce"}})
    assert e.value.problems == ["trigger.mode: 'presnce' is not one of ('frame', 'external', 'presence')"]


def test_trigger_cross_section_rules():
    with pytest.raises(ConfigError) as e:   # serial TRG without a serial gate
        parse_config({"trigger": {"mode": "external"}})
    assert any(p.startswith("trigger.source: 'serial'") for p in e.value.problems)
    with pytest.raises(ConfigError) as e:
        parse_config({"trigger": {"mode": "external", "source": "mqtt", "offset_ms": 240}})
    assert any(p.startswith("trigger.offset_ms:") for p in e.value.problems)
    with pytest.raises(ConfigError) as e:   # a file replayed unpaced has no line times
        parse_config({"trigger": {"mode": "presence"}, "camera": {"source": "/x/line.avi"}})
    assert any(p.startswith("camera.fps:") for p in e.value.problems)
    with pytest.raises(ConfigError) as e:
        parse_config({"trigger": {"mode": "presence", "roi": [0.5, 0, 0.4, 1]}})
    assert e.value.problems[0].startswith("trigger.roi:")
    cfg = parse_config({"trigger": {"mode": "external", "source": "mqtt"},
                        "camera": {"source": "/dev/video0"}})
    assert cfg.trigger.window_ms == 40


# -- simulated lines ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    d = tmp_path_factory.mktemp("lines")
    imgs = labelled_images(IMAGES)
    out = {}
    for rate, n in ((2.0, 30), (5.0, 40)):
        video = str(d / f"line{rate:g}.avi")
        render(LineSpec(rate=rate, parts=n, seed=int(rate)), imgs, video, video + ".json")
        out[rate] = (video, json.loads(Path(video + ".json").read_text()))
    return out


def frames(video: str, fps: float):
    cap = cv2.VideoCapture(video)
    i = 0
    while True:
        ok, img = cap.read()
        if not ok:
            break
        t = int(i * 1e9 / fps)
        yield Captured(img, f"#{i}", t, t)
        i += 1
    cap.release()


def test_simulated_line_is_a_real_video_with_its_truth(lines):
    video, truth = lines[2.0]
    cap = cv2.VideoCapture(video)
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == truth["frames"]
    assert cap.get(cv2.CAP_PROP_FOURCC) == cv2.VideoWriter_fourcc(*"MJPG")
    cap.release()
    parts = truth["parts"]
    assert len(parts) == 30 and {p["label"] for p in parts} == {"good", "defect"}
    t = [p["t_line_s"] for p in parts]
    assert all(b > a for a, b in zip(t, t[1:]))
    assert all(math.isclose(p["t_gate_s"] - p["t_line_s"], 0.6, abs_tol=1e-6) for p in parts)


@pytest.mark.parametrize("rate", [2.0, 5.0])
def test_presence_counts_every_part_once_and_times_the_line(lines, rate):
    video, truth = lines[rate]
    sel = PresenceSelector()
    parts = [p for got in frames(video, truth["fps"]) for p in sel.feed(got)]
    assert len(parts) == len(truth["parts"]), sel.counters()
    assert all(p.failsafe is None for p in parts)
    assert len({p.ref for p in parts}) == len(parts)           # one decision per track
    err_ms = [abs(p.t_ref_ns / 1e6 - q["t_line_s"] * 1e3) for p, q in zip(parts, truth["parts"])]
    assert max(err_ms) < 5.0                     # a frame is 33 ms: interpolated, not snapped
    # best-centred: the judged frame is within half a frame's travel of the line
    for p, q in zip(parts, truth["parts"]):
        t_frame = p.captured.t_capture_ns / 1e9
        assert abs(t_frame - q["t_line_s"]) <= 0.5 / truth["fps"] + 1e-3


def test_external_picks_the_frame_nearest_trigger_plus_offset(lines):
    video, truth = lines[5.0]
    fps = truth["fps"]
    offset = truth["spec"]["sensor_offset_ms"]
    sel = ExternalSelector(offset_ms=offset, window_ms=20)
    trig = sorted((int(p["t_trigger_s"] * 1e9), p["n"]) for p in truth["parts"])
    parts = []
    for got in frames(video, fps):
        while trig and trig[0][0] <= got.t_capture_ns:   # the sensor fires as the line runs
            t, n = trig.pop(0)
            sel.trigger(t, 1000 + n, f"P{n}")
        parts += sel.feed(got)
    assert [p.ref for p in parts] == [f"trg:P{p['n']}" for p in truth["parts"]]
    assert all(p.failsafe is None for p in parts)
    for p, q in zip(parts, truth["parts"]):
        assert p.encoder == 1000 + q["n"]
        assert abs(p.captured.t_capture_ns / 1e9 - q["t_line_s"]) <= 0.5 / fps + 1e-6
    assert sel.counters()["parts"] == len(truth["parts"])


# -- external: bad input -----------------------------------------------------------------
def _cap(t_ms: float) -> Captured:
    t = int(t_ms * MS)
    return Captured(np.zeros((4, 4), np.uint8), f"@{t_ms}", t, t)


def test_trigger_without_frames_is_a_failsafe_part_on_the_clock():
    sel = ExternalSelector(offset_ms=10, window_ms=20)
    sel.feed(_cap(0))
    sel.trigger(100 * MS, 7, "A")        # camera stalled after the frame at 0
    assert sel.poll(125 * MS) == []      # still inside trigger + offset + window
    (p,) = sel.poll(131 * MS)
    assert p.failsafe == NO_FRAME_FOR_TRIGGER and p.t_ref_ns == 100 * MS and p.encoder == 7
    assert "nearest frame 110.0 ms" in p.detail
    assert sel.counters()[NO_FRAME_FOR_TRIGGER] == 1
    assert sel.feed(_cap(140)) == []     # resolved once, never twice


def test_frames_without_triggers_make_no_parts_and_a_storm_is_bounded():
    sel = ExternalSelector(offset_ms=0, window_ms=20, debounce_ms=5, max_pending=3)
    assert [p for t in range(0, 300, 33) for p in sel.feed(_cap(t))] == []
    for i in range(10):                  # a bouncing sensor: 1 ms apart
        sel.trigger((400 + i) * MS, None)
    c = sel.counters()
    assert c["trigger_debounced"] == 9 and c["triggers"] == 10
    for i in range(6):                   # six real triggers, 10 ms apart, no frame yet
        sel.trigger((500 + 10 * i) * MS, None)
    out = sel.feed(_cap(530))            # the 4 oldest were pushed out by the bound of 3
    assert [p.failsafe for p in out] == [MISSED_TRIGGER] * 4 + [None]
    assert [p.t_ref_ns // MS for p in out] == [400, 500, 510, 520, 530]
    out = sel.feed(_cap(560))            # 540 -> frame 530 (10 ms), 550 -> frame 560
    assert [(p.t_ref_ns // MS, p.captured.t_capture_ns // MS) for p in out] == [(540, 530),
                                                                                 (550, 560)]
    assert sel.counters()[MISSED_TRIGGER] == 4


# -- presence: odd cases on synthetic belts with a real part image ------------------------
PART = cv2.resize(cv2.imread(str(IMAGES / "good_00041201.png"), cv2.IMREAD_GRAYSCALE), (80, 80))


def belt_frames(objects, n, seed=0, size=(480, 640)):
    """objects: callables(i) -> list of (x_centre, y_centre, w, h) or (x, y, 'part')."""
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.normal(70, 10, size).astype(np.float32), (0, 0), 1.2)
    for i in range(n):
        img = base + rng.normal(0, 2, size)
        for obj in objects:
            for x, y, w, h in obj(i):
                x0, y0 = int(x - w / 2), int(y - h / 2)
                a, b = max(0, x0), min(size[1], x0 + w)
                if b <= a:
                    continue
                if (w, h) == (80, 80):
                    img[y0:y0 + h, a:b] = PART[:, a - x0:b - x0]
                else:
                    img[y0:y0 + h, a:b] = 230
        t = int(i * 1e9 / 30)
        yield Captured(np.clip(img, 0, 255).astype(np.uint8), f"#{i}", t, t)


def moving(x0, speed=20, start=20, y=240, w=80, h=80):
    return lambda i: [(x0 + speed * (i - start), y, w, h)] if i >= start else []


def run(sel, gen):
    return [p for got in gen for p in sel.feed(got)]


def test_debris_is_ignored_and_a_part_still_counts():
    debris = moving(-20, speed=20, w=16, h=40, y=100)   # 4 detector px along the belt
    sel = PresenceSelector()
    parts = run(sel, belt_frames([debris, moving(-40, start=25)], 70))
    assert len(parts) == 1 and parts[0].failsafe is None
    assert sel.counters()["debris"] > 10 and sel.counters()["parts"] == 1


def test_touching_parts_are_each_failsafe():
    singles = [moving(-40, start=20 + 10 * k) for k in range(3)]          # learn the length
    pair = [moving(-40, start=60), moving(-120, start=60)]                 # 80 px apart: touching
    parts = run(PresenceSelector(), belt_frames(singles + pair, 110))
    assert [p.failsafe for p in parts] == [None, None, None, TOUCHING, TOUCHING]
    a, b = parts[3:]
    assert a.t_ref_ns != b.t_ref_ns and abs(abs(a.t_ref_ns - b.t_ref_ns) / MS - 80 / 20 / 30 * 1e3) < 10


def test_a_part_that_stops_is_failsafe_once_and_not_again_when_it_moves_on():
    def stop_then_go(i):
        if i < 20:
            return []
        x = -40 + 20 * min(i - 20, 12) + 20 * max(0, i - 80)   # stops at x=200 for 2 s
        return [(x, 240, 80, 80)]
    parts = run(PresenceSelector(stop_ms=1000), belt_frames([stop_then_go], 110))
    assert [p.failsafe for p in parts] == [PART_STOPPED]


def test_a_part_that_leaves_unseen_is_failsafe_and_a_part_first_seen_past_the_line_too():
    def lifted(i):                      # taken off the belt at x = 180, before the line
        return [(-40 + 20 * (i - 20), 240, 80, 80)] if 20 <= i < 31 else []
    dropped_in = lambda i: [(420 + 20 * (i - 50), 240, 80, 80)] if i >= 50 else []  # noqa: E731
    sel = PresenceSelector()
    parts = run(sel, belt_frames([lifted, dropped_in], 70))
    assert [p.failsafe for p in parts] == [PART_NOT_JUDGED, PART_NOT_JUDGED]
    assert "lost before the line" in parts[0].detail and "past the line" in parts[1].detail
    # the lifted part's gate time is extrapolated at its speed: centre 320 at frame 38
    assert abs(parts[0].t_ref_ns / MS - 38 / 30 * 1e3) < 10


def test_lighting_drift_and_other_directions():
    def drift(gen, amp=0.3):
        for k, got in enumerate(gen):
            got.image = np.clip(got.image * (1 + amp * math.sin(k / 20)), 0, 255).astype(np.uint8)
            yield got
    objs = [moving(-40, start=20 + 15 * k) for k in range(4)]
    assert len(run(PresenceSelector(), drift(belt_frames(objs, 120)))) == 4
    flipped = (Captured(np.ascontiguousarray(g.image[:, ::-1].T), g.ref, g.t_capture_ns,
                        g.t_decoded_ns) for g in belt_frames(objs, 120))
    parts = run(PresenceSelector(direction="-y"), flipped)
    assert len(parts) == 4 and all(p.failsafe is None for p in parts)


def test_worst_mode_hands_over_more_frames_of_the_part():
    parts = run(PresenceSelector(judge="worst"), belt_frames([moving(-40)], 60))
    assert len(parts) == 1 and len(parts[0].extra) >= 1
    assert all(e is not parts[0].captured for e in parts[0].extra)


# -- the pipeline ------------------------------------------------------------------------
def test_pipeline_presence_one_inspection_per_part_on_a_live_replay(tmp_path):
    from agent.runtime.inspector import Inspector
    from agent.runtime.pipeline import Pipeline

    video = str(tmp_path / "line.avi")
    truth = render(LineSpec(rate=5, parts=8, lead_s=0.6, seed=3), labelled_images(IMAGES),
                   video)
    got = []
    insp = Inspector.load(BUNDLE, threads=1)
    src = LineVideoSource(video, truth["fps"])
    pipe = Pipeline(src, insp, sinks=[got.append], queue_size=4, deadline_ms=1000,
                    selector=PresenceSelector())
    pipe.start()
    assert pipe.wait(30)
    s = pipe.stats()
    assert s["mode"] == "presence" and s["frames"] == truth["frames"]
    assert len(got) == 8 and s["parts"] == 8, s
    assert all(r.verdict.value in ("PASS", "REJECT") for r in got), [r.reason for r in got]
    # the reference time (line crossing) is what the gate counts from
    for r, q in zip(got, truth["parts"]):
        assert abs((r.t_capture_ns - src.t0_ns) / 1e9 - q["t_line_s"]) < 0.005


def test_pipeline_external_failsafe_for_trigger_without_frame(tmp_path):
    from agent.runtime.inspector import Inspector
    from agent.runtime.pipeline import Pipeline

    class Stalled:                       # a camera that gives nothing
        live, name = True, "stalled"

        def open(self):
            pass

        def read(self):
            time.sleep(0.05)
            raise __import__("agent.runtime.sources", fromlist=["SourceError"]).SourceError("no frame")

        def close(self):
            pass

        def describe(self):
            return self.name

    got = []
    pipe = Pipeline(Stalled(), Inspector.load(BUNDLE, threads=1), sinks=[got.append],
                    selector=ExternalSelector(offset_ms=0, window_ms=20))
    pipe.start()
    pipe.part_trigger("X1")
    t_end = time.monotonic() + 5
    while not got and time.monotonic() < t_end:
        pipe.check_stall()
        time.sleep(0.01)
    pipe.stop(5)
    assert len(got) == 1 and got[0].verdict.value == "FAILSAFE"
    assert got[0].reason.startswith(NO_FRAME_FOR_TRIGGER)
    assert pipe.stats()["failsafe_reasons"] == {NO_FRAME_FOR_TRIGGER: 1}
