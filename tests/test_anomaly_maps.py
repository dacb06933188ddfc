"""Where an anomaly bundle's REJECT is defective: the pipeline fills Inspection.defect_map
(rejects only, after the gate command), the recorder writes <part>_map.png beside the image
(quota'd with it), the operator page draws it. A real bundle trained here, real images."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("tensorflow")

from agent.runtime.inspector import Inspector  # noqa: E402
from agent.runtime.pipeline import Pipeline  # noqa: E402
from agent.runtime.sources import open_source  # noqa: E402
from agent.types import Verdict  # noqa: E402
from firmware_io.gates import NoneGateConfig, create_gate  # noqa: E402
from tests.test_anomaly import blemish, bundle, data, texture  # noqa: E402,F401 (fixtures)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> tuple[Path, dict[str, tuple[int, int] | None]]:
    """A folder of 6 good textures and 6 with a blemish; name -> blemish (y, x) or None."""
    root = tmp_path_factory.mktemp("anomaly_parts")
    rng = np.random.default_rng(7)
    truth = {}
    for i in range(12):
        img = texture(rng)
        yx = None
        if i % 2:
            img, yx = blemish(img, rng)
        name = f"p{i:02d}.png"
        cv2.imwrite(str(root / name), img)
        truth[name] = yx
    return root, truth


def run_line(bundle, folder, sinks=(), workers=1):
    insp = Inspector.load(bundle, threads=1, workers=workers)
    gate = create_gate(NoneGateConfig(delay_ms=500))
    got = []
    pipe = Pipeline(open_source(str(folder)), insp, gate=gate, sinks=[got.append, *sinks],
                    workers=workers, deadline_ms=10_000)
    pipe.start()
    assert pipe.wait(120)
    return insp, gate, got


def test_rejects_get_a_map_passes_do_not(bundle, parts):
    folder, truth = parts
    insp, gate, got = run_line(bundle, folder)
    assert insp.can_map and len(got) == len(truth)
    rejects = [r for r in got if r.verdict is Verdict.REJECT]
    passes = [r for r in got if r.verdict is Verdict.PASS]
    assert rejects and passes
    grid = tuple(insp.engine.memory.grid)
    for r in rejects:
        assert r.defect_map is not None and r.defect_map.shape == grid
        assert np.all(np.isfinite(r.defect_map)) and r.timings_ms["map"] > 0
    for r in passes:
        assert r.defect_map is None and "map" not in r.timings_ms
    assert sorted(o.part_id for o in gate.records) == sorted(r.part_id for r in rejects)
    # a blemished reject's map is hottest near its blemish (stretched over the 128 px image)
    for r in rejects:
        yx = truth[r.source_ref]
        if yx is None:
            continue
        m = r.defect_map
        cy, cx = np.unravel_index(int(np.argmax(m)), m.shape)
        sy, sx = 128 / m.shape[0], 128 / m.shape[1]
        assert abs((cy + 0.5) * sy - yx[0]) <= 24 and abs((cx + 0.5) * sx - yx[1]) <= 24, (r.source_ref, (cy, cx), yx)
    cost = [r.timings_ms["map"] for r in rejects]
    print(f"\nper-reject map cost: median {np.median(cost):.1f} ms, max {max(cost):.1f} ms; "
          f"invoke median {np.median([r.timings_ms['invoke'] for r in got]):.1f} ms")


def test_a_pool_of_anomaly_engines_gives_maps(bundle, parts):
    folder, _ = parts
    insp, _, got = run_line(bundle, folder, workers=2)
    assert insp.can_map
    assert all((r.defect_map is not None) == (r.verdict is Verdict.REJECT) for r in got)


def _units(root: Path) -> dict[str, set[str]]:
    """stem -> the kinds of file recorded for it ('png', 'json', 'map')."""
    out: dict[str, set[str]] = {}
    for p in root.rglob("*.*"):
        if p.name.endswith("_map.png"):
            out.setdefault(str(p)[:-len("_map.png")], set()).add("map")
        else:
            out.setdefault(str(p.with_suffix("")), set()).add(p.suffix[1:])
    return out


@pytest.fixture(scope="module")
def recorded(bundle, parts, tmp_path_factory):
    from agent.report.recorder import Recorder
    from agent.report.reporter import Reporter
    rec_dir = tmp_path_factory.mktemp("anomaly_rec") / "rec"
    rec = Recorder(rec_dir, pass_sample=1.0).start()
    _, _, got = run_line(bundle, parts[0], sinks=[Reporter("t", None, rec)])
    assert rec.wait_idle(10)
    rec.stop()
    return rec_dir, got


def test_recorder_writes_a_heat_map_beside_each_reject(recorded):
    rec_dir, got = recorded
    units = _units(rec_dir)
    assert len(units) == len(got)
    n_maps = 0
    for r in got:
        img_path = next(rec_dir.rglob(f"{r.part_id}.png"))
        meta = json.loads(img_path.with_suffix(".json").read_text())
        mp = img_path.with_name(f"{r.part_id}_map.png")
        if r.verdict is Verdict.REJECT:
            n_maps += 1
            assert mp.is_file() and meta["map"] == mp.name
            heat, img = cv2.imread(str(mp), cv2.IMREAD_UNCHANGED), cv2.imread(str(img_path))
            assert heat.shape == img.shape and heat.ndim == 3
            # colour where the map is hot (the source is grey: B = G = R everywhere)
            assert (np.abs(heat[..., 2].astype(int) - heat[..., 0]) > 40).mean() > 0.01
            assert not np.array_equal(heat, img)
        else:
            assert not mp.exists() and "map" not in meta
    assert n_maps > 0


def test_quota_counts_and_deletes_the_map_with_its_image(recorded, tmp_path):
    import shutil
    from agent.report.recorder import Recorder
    rec_dir = tmp_path / "rec"
    shutil.copytree(recorded[0], rec_dir)
    total = sum(p.stat().st_size for p in rec_dir.rglob("*.*"))
    # a restart over the files found on disk, room for about half of them
    rec = Recorder(rec_dir, max_mb=total * 0.5 / (1024 * 1024)).start()
    # wait_idle() is already set before the thread's start-up scan: wait for the scan's quota
    from tests.helpers import wait_until
    assert wait_until(lambda: rec.deleted > 0 and rec.bytes <= rec.max_bytes, timeout=10)
    assert rec.bytes == sum(p.stat().st_size for p in rec_dir.rglob("*.*")) <= rec.max_bytes
    for stem, kinds in _units(rec_dir).items():
        assert kinds in ({"png", "json"}, {"png", "json", "map"}), (stem, kinds)
    # then new saves, with maps, under a quota of a few units: triples go as one
    img = cv2.imread(str(next(rec_dir.rglob("*_map.png"))).replace("_map", ""))
    dmap = np.random.default_rng(0).random((12, 12)).astype(np.float32)
    rec.max_bytes = rec.bytes
    for i in range(6):
        assert rec.put(str(rec_dir / "20240101" / "reject" / f"n-{i}.png"), img,
                       {"part": f"n-{i}"}, dmap)
        assert rec.wait_idle(10)
    rec.stop()
    units = _units(rec_dir)
    assert all(k in ({"png", "json"}, {"png", "json", "map"}) for k in units.values()), units
    assert units[str(rec_dir / "20240101" / "reject" / "n-5")] == {"png", "json", "map"}
    assert rec.bytes == sum(p.stat().st_size for p in rec_dir.rglob("*.*")) <= rec.max_bytes


def test_operator_page_shows_an_anomaly_reject_with_its_overlay(bundle, parts, tmp_path):
    """The real agent and HTTP server on the anomaly bundle: a reject has a map, its JPEG is
    the overlay (colour on a grey part), ?map=0 the plain image; the recorded map is served."""
    from agent.config import parse_config
    from agent.commands.daemon import Agent
    from tests.helpers import wait_until
    from ui_support import Client, _NoNotify, free_port
    cfg = parse_config({
        "station": {"id": "ui-anomaly"},
        "camera": {"source": str(parts[0]), "loop": True, "fps": 8.0},
        "model": {"bundle": str(bundle), "threads": 1},
        "inspection": {"deadline_ms": 5000, "queue_size": 2},
        "gate": {"kind": "none"}, "mqtt": {"enabled": False}, "metrics": {"port": 0},
        "recorder": {"dir": str(tmp_path / "rec"), "pass_sample": 0.0, "min_free_mb": 0},
        "ui": {"port": free_port()},
    }, tmp_path)
    agent = Agent(cfg, notifier=_NoNotify()).start()
    try:
        c = Client(agent.ui.port)
        assert wait_until(lambda: any(r["has_map"] for r in c.json("/api/state")["rejects"]),
                          timeout=60, step=0.1), "no reject with a map"
        s = c.json("/api/state")
        assert s["health"]["defect_map"] is True
        shot = next(r for r in s["rejects"] if r["has_map"])
        assert shot["verdict"] == "REJECT"
        code, h, over = c.get(f"/api/reject/{shot['seq']}.jpg")
        assert code == 200 and h["Content-Type"] == "image/jpeg"
        code, _, plain = c.get(f"/api/reject/{shot['seq']}.jpg?map=0")
        assert code == 200 and over != plain
        o = cv2.imdecode(np.frombuffer(over, np.uint8), cv2.IMREAD_COLOR).astype(int)
        p = cv2.imdecode(np.frombuffer(plain, np.uint8), cv2.IMREAD_COLOR).astype(int)
        assert (np.abs(o[..., 2] - o[..., 0]) > 40).mean() > 0.01      # the heat colours
        assert (np.abs(p[..., 2] - p[..., 0]) > 40).mean() < 0.001     # a grey part
        # the review queue lists the recorded reject with its map file, which is served
        assert wait_until(lambda: any(i["map"] for i in c.json("/api/review")["items"]),
                          timeout=30, step=0.1)
        items = c.json("/api/review")["items"]
        assert not any(i["path"].endswith("_map.png") for i in items)
        item = next(i for i in items if i["map"])
        code, h, png = c.get(f"/recorded/{item['map']}")
        assert code == 200 and png[:4] == b"\x89PNG"
    finally:
        agent.shutdown()
