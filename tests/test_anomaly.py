"""Good-only anomaly mode: a real int8 bundle trained on generated textures, scored through the
real agent Inspector, evaluate and deploy-model, and the bad inputs that must exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("tensorflow")

from agent.runtime.anomaly import AnomalyEngine, load_memory  # noqa: E402
from agent.bundle import MANIFEST, load_bundle, sha256_file  # noqa: E402
from agent.decide import anomaly_probs  # noqa: E402
from agent.runtime.inspector import Inspector, InspectorError  # noqa: E402
from agent.types import Verdict  # noqa: E402

SIZE = 128


def texture(rng: np.random.Generator) -> np.ndarray:
    """A brushed-metal-like gray texture: smoothed noise plus fine horizontal grain."""
    n = cv2.GaussianBlur(rng.normal(0, 1, (SIZE, SIZE)).astype(np.float32), (0, 0), 2.0)
    grain = np.sin(np.arange(SIZE) * 0.9 + rng.uniform(0, 6))[:, None].astype(np.float32)
    img = 128 + 18 * n / (n.std() + 1e-6) + 8 * grain
    return np.clip(img, 0, 255).astype(np.uint8)


def blemish(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """A dark pit with a bright rim somewhere away from the border; returns (image, (y, x))."""
    out = img.copy()
    y, x = (int(v) for v in rng.integers(24, SIZE - 24, 2))
    cv2.circle(out, (x, y), 9, 225, -1)
    cv2.circle(out, (x, y), 6, 25, -1)
    return out, (y, x)


def write_set(root: Path, n_good: int, n_defect: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    (root / "good").mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        cv2.imwrite(str(root / "good" / f"g{i:03d}.png"), texture(rng))
    where = []
    if n_defect:
        (root / "pit").mkdir(parents=True, exist_ok=True)
    for i in range(n_defect):
        img, yx = blemish(texture(rng), rng)
        where.append(yx)
        cv2.imwrite(str(root / "pit" / f"d{i:03d}.png"), img)
    return where


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("anomaly_data")
    write_set(root / "train", 40, 6, seed=1)
    write_set(root / "test", 16, 16, seed=2)
    return root


@pytest.fixture(scope="module")
def bundle(data, tmp_path_factory) -> Path:
    """One real training run through the train CLI's --mode dispatch (about 20-30 s)."""
    from convert.train import main
    out = tmp_path_factory.mktemp("anomaly_bundle") / "b"
    rc = main(["edge-inspect train", str(data), "--mode", "anomaly", "--out", str(out),
               "--input-size", "96", "--bank", "500", "-q"])
    assert rc == 0
    return out


def test_bundle_is_an_anomaly_bundle_with_a_hashed_memory(bundle):
    b = load_bundle(bundle)
    assert b.kind == "anomaly"
    assert b.labels == ["good", "anomaly"] and b.threshold == 0.5
    assert b.files["memory.npz"]["sha256"] == sha256_file(bundle / "memory.npz")
    m = b.metrics
    # defect folders only report: train/pit was scored, never put in the memory
    assert m["validation"]["n_defect"] == 6 and m["memory_good"] + m["held_back_good"] == 40
    assert m["test"]["auroc"] >= 0.9, m["test"]
    assert m["memory_bytes"] < 20e6
    mem = load_memory(bundle / "memory.npz", b.model_sha256)
    assert mem.grid == (12, 12) and mem.method in ("patchcore", "padim")
    assert {c["method"] for c in m["candidates"]} == {"patchcore", "padim"}   # auto measured both


def test_feature_model_is_full_int8_with_two_outputs(bundle):
    from agent.runtime.engines.litert import interpreter_module
    it = interpreter_module().Interpreter(model_path=str(bundle / "model.tflite"))
    it.allocate_tensors()
    outs = it.get_output_details()
    assert it.get_input_details()[0]["dtype"] == np.uint8
    assert sorted(tuple(o["shape"][1:]) for o in outs) == [(6, 6, 112), (12, 12, 40)]
    assert all(o["dtype"] == np.uint8 for o in outs)
    ops = {op["op_name"] for op in it._get_ops_details()}
    assert "AVERAGE_POOL_2D" in ops             # the 3x3 neighbourhood average is in the graph
    float_ops = [t for t in it.get_tensor_details()
                 if t["dtype"] == np.float32 and "pixels" not in t["name"]]
    assert not float_ops, [t["name"] for t in float_ops][:5]


def test_inspector_rejects_blemishes_and_passes_good(bundle):
    insp = Inspector.load(bundle, threads=1)
    assert "anomaly" in insp.describe()
    rng = np.random.default_rng(7)
    good = [insp.inspect(texture(rng)) for _ in range(12)]
    bad = [insp.inspect(blemish(texture(rng), rng)[0]) for _ in range(12)]
    assert sum(v == Verdict.PASS for v, _, _ in good) >= 10
    assert sum(v == Verdict.REJECT for v, _, _ in bad) >= 10
    assert all(lbl == "anomaly" for v, _, lbl in bad if v == Verdict.REJECT)
    assert np.median([s for _, s, _ in bad]) > np.median([s for _, s, _ in good])


def test_anomaly_map_points_at_the_blemish(bundle):
    b = load_bundle(bundle)
    eng = AnomalyEngine.from_bundle(b)
    from agent.preprocess import preprocess
    rng = np.random.default_rng(11)
    hits = 0
    for _ in range(8):
        img, (y, x) = blemish(texture(rng), rng)
        pmap = eng.maps(preprocess(img, b.input))[0]
        py, px = np.unravel_index(int(pmap.argmax()), pmap.shape)
        cell = SIZE / pmap.shape[0]
        hits += abs((py + 0.5) * cell - y) <= 2 * cell and abs((px + 0.5) * cell - x) <= 2 * cell
    assert hits >= 6


def test_evaluate_reports_auroc_escape_false_reject(bundle, data, capsys):
    from convert.evaluate import main
    assert main(["edge-inspect evaluate", str(bundle), str(data), "--json"]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["kind"] == "anomaly" and m["n_defect"] == 16 and m["n_good"] == 16
    assert m["roc_auc"] >= 0.9
    assert m["escape_rate"] <= 0.25 and m["false_reject_rate"] <= 0.25
    assert 0 < m["escape_rate_upper_95"] <= 1


def test_deploy_model_verifies_an_anomaly_bundle(bundle):
    from agent.commands.deploy_model import verify
    b, line = verify(bundle)
    assert b.kind == "anomaly" and "smoke test" in line and "good" in line


# -- bad input: one line, exit 2 -------------------------------------------------------------

def _train(tmp_path, data_dir, capsys) -> tuple[int, str]:
    from convert.train import main
    rc = main(["edge-inspect train", "--mode", "anomaly", str(data_dir), "--out", str(tmp_path / "o"),
               "--input-size", "64", "-q"])
    return rc, capsys.readouterr().err.strip()


def test_defects_only_is_an_error(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "d" / "pit").mkdir(parents=True)
    for i in range(5):
        cv2.imwrite(str(tmp_path / "d" / "pit" / f"{i}.png"), blemish(texture(rng), rng)[0])
    rc, err = _train(tmp_path, tmp_path / "d", capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "good" in err


def test_too_few_good_images_is_an_error(tmp_path, capsys):
    write_set(tmp_path / "d", 6, 2, seed=3)
    rc, err = _train(tmp_path, tmp_path / "d", capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "hold" in err and "6" in err


def test_unknown_mode_is_an_error(tmp_path, capsys):
    from convert.train import main
    assert main(["edge-inspect train", "--mode", "magic", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "--mode" in capsys.readouterr().err


def _copy(bundle, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def test_memory_not_matching_its_hash_is_refused(bundle, tmp_path, capsys):
    b = _copy(bundle, tmp_path)
    with open(b / "memory.npz", "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(InspectorError, match="memory.npz is corrupt"):
        Inspector.load(b)
    from convert.evaluate import main
    assert main(["edge-inspect evaluate", str(b), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "memory.npz" in err


def _rehash(b: Path) -> None:
    m = json.loads((b / MANIFEST).read_text())
    for name, info in m["files"].items():
        info["sha256"] = sha256_file(b / name)
        info["bytes"] = (b / name).stat().st_size
    (b / MANIFEST).write_text(json.dumps(m))


def test_memory_from_another_feature_model_is_refused(bundle, tmp_path):
    """Hashes all correct, but the memory names another model.tflite: refused by name."""
    b = _copy(bundle, tmp_path)
    mem = load_memory(b / "memory.npz")
    from dataclasses import replace
    replace(mem, model_sha256="0" * 64).save(b / "memory.npz")
    _rehash(b)
    with pytest.raises(InspectorError, match="built from feature model 000000000000"):
        Inspector.load(b)


def test_memory_of_the_wrong_shape_is_refused(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    mem = load_memory(b / "memory.npz")
    from dataclasses import replace
    replace(mem, grid=(6, 6), mu=None if mem.mu is None else mem.mu[:36],
            inv_cov=None if mem.inv_cov is None else mem.inv_cov[:36]).save(b / "memory.npz")
    _rehash(b)
    with pytest.raises(InspectorError, match="does not fit the feature model"):
        Inspector.load(b)


def test_anomaly_bundle_without_memory_is_refused(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    m = json.loads((b / MANIFEST).read_text())
    del m["files"]["memory.npz"]
    (b / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(InspectorError, match="must list its memory file"):
        Inspector.load(b)


# -- the pieces --------------------------------------------------------------------------------

def test_coreset_keeps_the_rare_patch_a_random_sample_drops():
    from convert.anomaly import greedy_coreset
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, (5000, 8)), [[40.0] * 8]].astype(np.float32)
    assert 5000 in set(greedy_coreset(x, 20, seed=1).tolist())


def test_threshold_meets_the_false_reject_target():
    from convert.anomaly import threshold_for_false_reject
    g = np.random.default_rng(0).gamma(2.0, 1.0, 400)
    for target in (0.0, 0.01, 0.05):
        t = threshold_for_false_reject(g, target)
        assert (g >= t).mean() <= target + 1e-12
        assert (g >= t * 0.98).mean() > 0 or target == 0.0


def test_anomaly_probs_is_monotone_with_half_at_scale():
    p = anomaly_probs([0.0, 1.0, 2.0, 10.0], 2.0)
    assert p[2, 1] == pytest.approx(0.5)
    assert np.all(np.diff(p[:, 1]) > 0) and np.allclose(p.sum(axis=1), 1)


def test_auroc_matches_pairwise_count():
    from convert.threshold import roc_auc_or_none as auroc
    rng = np.random.default_rng(0)
    s = rng.integers(0, 6, 300).astype(float)
    d = rng.random(300) < 0.3
    g, b = s[~d], s[d]
    pairs = (b[:, None] > g[None]).sum() + 0.5 * (b[:, None] == g[None]).sum()
    assert auroc(s, d) == pytest.approx(pairs / (len(g) * len(b)))
    assert auroc(s, np.zeros(300, bool)) is None
