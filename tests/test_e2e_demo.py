"""`edge-inspect demo` end to end as a user runs it: no hardware, its own broker, exit 0."""

from __future__ import annotations

import re
import subprocess
import time

import cv2
import pytest

from agent.commands.demo import DEMO_DATA
from tests.support import PY, ROOT, make_image, tiny_bundle


def run_demo(*args, timeout=90):
    t = time.monotonic()
    r = subprocess.run([PY, "-m", "agent", "demo", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    return r, time.monotonic() - t


def test_demo_on_given_images_and_bundle(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    for i in range(9):
        d = i % 3 == 0
        cv2.imwrite(str(imgs / f"{'defect' if d else 'good'}_{i:03d}.png"), make_image(d, i))
    (imgs / "good_999.png").write_bytes(b"broken")
    r, took = run_demo("--images", str(imgs), "--bundle", str(tiny_bundle()), "--loops", "2",
                       "--fps", "40")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout
    assert len(re.findall(r" REJECT ", out)) == 6 and len(re.findall(r" FAILSAFE ", out)) == 2
    assert len(re.findall(r"FIRED gate 1", out)) == 8           # 6 defects + 2 failsafe
    assert "parts        20 in" in out
    assert "truth        18/18 verdicts match" in out
    assert "8/8 rejected parts FIRED" in out
    assert re.search(r"latency      capture -> gate command p50 [\d.]+ ms, p99 [\d.]+ ms", out)
    assert "8 alerts queued, outbox 0 waiting" in out
    assert took < 30


def test_demo_bad_arguments_exit_2(tmp_path):
    r, _ = run_demo("--images", str(tmp_path / "none"), "--bundle", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("error: ") == 2


@pytest.mark.skipif(not (DEMO_DATA / "bundle" / "bundle.json").is_file(),
                    reason="agent/demo_data not committed yet")
def test_demo_defaults_finish_fast():
    r, took = run_demo(timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "summary" in r.stdout and took < 50


@pytest.mark.skipif(not (DEMO_DATA / "bundle" / "bundle.json").is_file(),
                    reason="agent/demo_data not committed yet")
def test_demo_line_counts_parts_against_the_truth_and_times_the_gate():
    """`demo --line`: a simulated line video in presence mode, parts counted against its truth."""
    r, took = run_demo("--line", "--parts", "12", "--rate", "4", "--quiet", timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout
    assert "line         12 parts seen / 12 in the truth (0 missed, 0 double)" in out
    assert "parts        12 in" in out and "failsafe" in out
    m = re.search(r"gate timing  FIRED - truth gate time p50 ([-+][\d.]+) ms, p99 ([-+][\d.]+) "
                  r"ms, worst ([-+][\d.]+) ms \((\d+) pulses\)", out)
    assert m, out
    acted = re.search(r"gate         (\d+)/(\d+) rejected parts FIRED", out)
    assert acted and acted.group(1) == acted.group(2) == m.group(4)
    assert abs(float(m.group(1))) < 50              # on time, on a loaded 2-core box
    assert took < 60
