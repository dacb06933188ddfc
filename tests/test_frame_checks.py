"""Issue 20 item 7: a blank, frozen or far-off frame is FAILSAFE with its own reason, never
judged. The real demo bundle, real images decoded by OpenCV from a folder, the agent as
`run` builds it (frame checks on by default)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np

from agent.bundle import load_bundle
from agent.commands.daemon import Agent
from agent.frame_checks import FrameChecker, image_stats, parse_input_stats, summarize_stats
from agent.types import Verdict
from tests.support import agent_cfg

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "agent" / "demo_data"
IMAGES = sorted((DEMO / "images").glob("*.png"))


def read(p: Path) -> np.ndarray:
    return cv2.imread(str(p), cv2.IMREAD_UNCHANGED)


def demo_with_stats(dst: Path) -> Path:
    """The demo bundle plus the input_stats the trainer will record for its images."""
    shutil.copytree(DEMO / "bundle", dst)
    m = json.loads((dst / "bundle.json").read_text())
    m["input_stats"] = summarize_stats(image_stats(read(p)) for p in IMAGES)
    (dst / "bundle.json").write_text(json.dumps(m, indent=2))
    return dst


def run_folder(tmp_path: Path, frames: list[tuple[str, np.ndarray]], bundle: Path):
    d = tmp_path / "imgs"
    d.mkdir()
    for name, img in frames:
        assert cv2.imwrite(str(d / name), img)
    cfg = agent_cfg(tmp_path, d, model={"bundle": str(bundle)},
                    inspection={"deadline_ms": 5000}, recorder={"enabled": False})
    got = []
    agent = Agent(cfg, sinks=(got.append,))
    agent.start()
    th = threading.Thread(target=agent.run, daemon=True)
    th.start()
    th.join(60)
    assert not th.is_alive()
    return {i.source_ref: i for i in got}, agent


def test_blank_and_frozen_frames_are_failsafe_without_stats(tmp_path):
    good = read(DEMO / "images" / "good_12100027.png")
    frames = [("00_part.png", good),
              ("01_black.png", np.zeros_like(good)),                     # capped lens
              ("02_black_small.png", np.zeros((120, 160), np.uint8)),    # any size
              ("03_white.png", np.full((480, 640, 3), 255, np.uint8)),   # blown out, colour
              ("04_part.png", read(IMAGES[3])),
              ("05_same.png", read(IMAGES[3])),                          # frozen camera:
              ("06_same.png", read(IMAGES[3])),                          # the same frame again
              ("07_part.png", read(IMAGES[5]))]
    by_ref, agent = run_folder(tmp_path, frames, DEMO / "bundle")
    assert load_bundle(DEMO / "bundle").input_stats is None       # stats-free checks only
    for ref in ("01_black.png", "02_black_small.png", "03_white.png"):
        i = by_ref[ref]
        assert i.verdict is Verdict.FAILSAFE and i.reason.startswith("blank_frame:"), (ref, i)
    for ref in ("05_same.png", "06_same.png"):
        i = by_ref[ref]
        assert i.verdict is Verdict.FAILSAFE and i.reason.startswith("frozen_frame:"), (ref, i)
    for ref in ("00_part.png", "04_part.png", "07_part.png"):
        assert by_ref[ref].verdict is not Verdict.FAILSAFE, by_ref[ref]
    assert agent.pipeline.failsafes["blank_frame"] == 3
    assert agent.pipeline.failsafes["frozen_frame"] == 2
    text = __import__("prometheus_client").generate_latest(agent.prom.registry).decode()
    assert 'edge_inspect_failsafes_total{reason="blank_frame"} 3.0' in text


def test_frames_far_from_the_training_images_are_failsafe(tmp_path):
    bundle = demo_with_stats(tmp_path / "bundle")
    stats = load_bundle(bundle).input_stats
    assert stats is not None and stats.n == len(IMAGES)
    part = read(DEMO / "images" / "defect_12300066.png")
    dim = (part // 8).astype(np.uint8)                  # the light is failing: not uniform
    m = part.mean()                                     # fogged lens: a fifth of the contrast
    flat = ((part.astype(np.float32) - m) * 0.2 + m).clip(0, 255).astype(np.uint8)
    frames = [("0_part.png", part), ("1_dim.png", dim), ("2_flat.png", flat),
              ("3_part.png", read(IMAGES[0]))]
    by_ref, _agent = run_folder(tmp_path, frames, bundle)
    for ref in ("1_dim.png", "2_flat.png"):
        i = by_ref[ref]
        assert i.verdict is Verdict.FAILSAFE and i.reason.startswith("frame_out_of_range:"), i
    for ref in ("0_part.png", "3_part.png"):
        assert by_ref[ref].verdict is not Verdict.FAILSAFE, by_ref[ref]


def test_every_training_image_passes_its_own_stats():
    stats = parse_input_stats(summarize_stats(image_stats(read(p)) for p in IMAGES))
    fc = FrameChecker()
    for p in IMAGES:
        assert fc.check(read(p), stats) is None, p


def test_switched_off_in_config(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    cv2.imwrite(str(d / "black.png"), np.zeros((64, 64), np.uint8))
    cfg = agent_cfg(tmp_path, d, model={"bundle": str(DEMO / "bundle")},
                    frame_checks={"enabled": False}, recorder={"enabled": False})
    got = []
    agent = Agent(cfg, sinks=(got.append,))
    agent.start()
    agent.run()
    assert got[0].verdict is not Verdict.FAILSAFE
