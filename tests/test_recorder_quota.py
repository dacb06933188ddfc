"""The recorder's quota deletes an image and its .json together (never one of the pair)."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np

from agent.report.recorder import Recorder


def _noise(i: int) -> np.ndarray:
    # noise does not compress: every PNG is about the same size
    return np.random.default_rng(i).integers(0, 256, (40, 60, 3), dtype=np.uint8)


def _pairs_intact(root) -> tuple[set, set]:
    pngs = {p.with_suffix("") for p in root.rglob("*.png")}
    jsons = {p.with_suffix("") for p in root.rglob("*.json")}
    return pngs, jsons


def test_quota_while_saving_deletes_pairs(tmp_path):
    rec_dir = tmp_path / "rec"
    png = len(cv2.imencode(".png", _noise(0))[1])
    # room for a few pairs and a half: an image-at-a-time quota would stop after the .png
    rec = Recorder(rec_dir, max_mb=(3.5 * (png + 300)) / (1024 * 1024), pass_sample=1.0).start()
    for i in range(12):
        assert rec.put(str(rec_dir / "20240101" / "reject" / f"p-{i}.png"), _noise(i),
                       {"part": f"p-{i}", "score": 0.9, "pad": "x" * 200})
        assert rec.wait_idle(5)
    rec.stop()
    pngs, jsons = _pairs_intact(rec_dir)
    assert pngs == jsons and pngs, (sorted(pngs ^ jsons))
    assert rec.deleted > 0 and rec.deleted % 2 == 0
    assert rec.bytes == sum(f.stat().st_size for f in rec_dir.rglob("*.*"))
    assert rec.bytes <= rec.max_bytes
    assert (rec_dir / "20240101" / "reject" / "p-11.json").is_file()      # the newest stays


def test_quota_at_start_deletes_pairs_found_on_disk(tmp_path):
    """Files from an earlier run: the .json is written after its picture, so it is newer
    (or, on a coarse clock, of the same mtime); either way the pair goes at once."""
    rec_dir = tmp_path / "rec"
    day = rec_dir / "20240101" / "reject"
    day.mkdir(parents=True)
    sizes = 0
    for i in range(6):
        ok, buf = cv2.imencode(".png", _noise(i))
        (day / f"p-{i}.png").write_bytes(buf.tobytes())
        (day / f"p-{i}.json").write_text(json.dumps({"part": f"p-{i}", "pad": "y" * 300}))
        t = 1_700_000_000 + 10 * i
        os.utime(day / f"p-{i}.png", (t, t))
        os.utime(day / f"p-{i}.json", (t + (i % 2), t + (i % 2)))     # same or 1 s later
        sizes += (day / f"p-{i}.png").stat().st_size + (day / f"p-{i}.json").stat().st_size
    # room for a bit more than half of them
    rec = Recorder(rec_dir, max_mb=sizes * 0.6 / (1024 * 1024)).start()
    assert rec.wait_idle(5)
    rec.stop()
    pngs, jsons = _pairs_intact(rec_dir)
    assert pngs == jsons, sorted(pngs ^ jsons)
    assert {p.name for p in pngs} == {"p-3", "p-4", "p-5"}               # oldest went first
    assert rec.deleted == 6
