"""Presence mode inspects the part, not the belt: the tracker's box (frame pixels, plus
[trigger] crop_margin, clamped) is cropped from the chosen frame before agent.preprocess."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.runtime.parts import PresenceSelector
from agent.commands.simulate_line import LineSpec, LineVideoSource, labelled_images, render
from agent.runtime.sources import Captured
from agent.types import Box

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "agent" / "demo_data" / "images"
BUNDLE = ROOT / "agent" / "demo_data" / "bundle"
SPEC = dict(rate=3, parts=8, part_px=240, speed=1800.0, lead_s=0.6, seed=5)


def test_box_expand_and_crop_clamp_to_the_frame():
    img = np.arange(100 * 200).reshape(100, 200)
    b = Box(-5, 90, 40, 130).expand(0.1, 200, 100)
    assert (b.x0, b.y0, b.x1, b.y1) == (0, 86, 44, 100)
    assert b.crop(img).shape == (14, 44)
    assert Box(190, 0, 260, 10).crop(img).shape == (10, 10)


def _truth_region(truth, q, t_s, sprite_shape):
    sh, sw = sprite_shape
    cx = truth["line_x"] + truth["spec"]["speed"] * (t_s - q["t_line_s"])
    x0 = int(round(cx - sw / 2))
    return x0, q["y"] - sh // 2, x0 + sw, q["y"] - sh // 2 + sh


def test_inspector_gets_the_part_crop_from_a_decoded_line(tmp_path):
    from agent.runtime.inspector import Inspector
    from agent.runtime.pipeline import Pipeline

    video = str(tmp_path / "line.avi")
    imgs = labelled_images(IMAGES)
    truth = render(LineSpec(**SPEC), imgs, video)
    paths = {Path(p).name: p for _, p in imgs}
    insp = Inspector.load(BUNDLE, threads=1)
    seen = []                                  # what the inspector was given
    real = insp.preprocess

    def spy(image, out=None):
        seen.append(image.copy())
        return real(image, out)

    insp.preprocess = spy
    got = []
    src = LineVideoSource(video, truth["fps"])
    pipe = Pipeline(src, insp, sinks=[got.append], queue_size=4, deadline_ms=2000,
                    selector=PresenceSelector(crop_margin=0.05))
    pipe.start()
    assert pipe.wait(60)
    assert len(got) == len(truth["parts"]) == len(seen)
    for r, crop, q in zip(got, seen, truth["parts"]):
        s = cv2.imread(paths[q["image"]], cv2.IMREAD_GRAYSCALE)
        k = 240 / max(s.shape)
        sprite = cv2.resize(s, (int(s.shape[1] * k), int(s.shape[0] * k)),
                            interpolation=cv2.INTER_AREA).astype(np.float32)
        h, w = crop.shape[:2]
        # the whole part, and not much belt: about the sprite plus 5 % each side
        assert sprite.shape[0] <= h <= sprite.shape[0] * 1.2 + 8, (crop.shape, sprite.shape)
        assert sprite.shape[1] <= w <= sprite.shape[1] * 1.2 + 8, (crop.shape, sprite.shape)
        # ...and it is that part: the sprite matches somewhere inside the crop, and is not
        # cut (it fits whole); lighting drift is a gain, which normalised correlation ignores
        g = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY).astype(np.float32)
        score = cv2.matchTemplate(g, sprite, cv2.TM_CCOEFF_NORMED).max()
        assert score > 0.9, (q["image"], score)
    # the box on the chosen frame holds the truth's composited region (a 240 px sprite at
    # the truth's position at that frame's time), with little more than the margin
    sel = PresenceSelector(crop_margin=0.05)
    parts = []
    cap = cv2.VideoCapture(video)
    for i in range(truth["frames"]):
        ok, img = cap.read()
        assert ok
        t = int(i * 1e9 / truth["fps"])
        parts += sel.feed(Captured(img, f"#{i}", t, t))
    cap.release()
    assert len(parts) == len(truth["parts"])
    for p, q in zip(parts, truth["parts"]):
        x0, y0, x1, y1 = _truth_region(truth, q, p.captured.t_capture_ns / 1e9, (240, 240))
        b = p.box
        assert b.x0 <= x0 + 2 and b.y0 <= y0 + 2 and b.x1 >= x1 - 2 and b.y1 >= y1 - 2, (b, q)
        assert b.x0 >= x0 - 24 and b.y0 >= y0 - 24 and b.x1 <= x1 + 24 and b.y1 <= y1 + 24, (b, q)


def _demo_match(*extra):
    r = subprocess.run([sys.executable, "-m", "agent", "demo", "--line", "--parts", "12",
                        "--rate", "3", "--quiet", *extra], cwd=ROOT, capture_output=True,
                       text=True, timeout=150)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = re.search(r"truth        (\d+)/(\d+) verdicts match", r.stdout)
    assert m, r.stdout
    return int(m.group(1)), int(m.group(2))


@pytest.mark.skipif(not (BUNDLE / "bundle.json").is_file(), reason="no demo bundle")
def test_demo_line_verdicts_mostly_match_the_labels():
    # measured: 12/12 with the crop; the whole-frame inspector got 5/12 (it sees the belt)
    ok, n = _demo_match()
    assert n == 12 and ok >= 10, (ok, n)
