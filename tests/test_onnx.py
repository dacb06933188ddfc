"""The Jetson path on this CPU box: a bundle trained by our trainer gets model.onnx (float and
int8 QDQ) from convert-bundle, the ONNX Runtime engine runs it as the agent would and agrees
with the int8 TFLite, a damaged or foreign model.onnx is refused, and the GPU providers that
are missing here say why in one line.

Trains ONE small model per module (about a minute and a half on two busy cores). Needs
TensorFlow, tf2onnx, onnx and onnxruntime (the [test] extra)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'edge-inspect[onnx]')")
pytest.importorskip("onnx", reason="onnx is not installed (pip install 'edge-inspect[onnx-export]')")
pytest.importorskip("tf2onnx", reason="tf2onnx is not installed (pip install 'edge-inspect[onnx-export]')")
pytest.importorskip("tensorflow", reason="the trainer needs TensorFlow (the [train] extra)")

from agent.bundle import (BundleError, ONNX_FLOAT_MODEL, ONNX_MODEL, add_files,  # noqa: E402
                          load_bundle)
from agent.runtime.engines import ENGINES, EngineError, create_engine  # noqa: E402
from agent.runtime.engines import onnxrt  # noqa: E402
from agent.runtime.inspector import Inspector, InspectorError  # noqa: E402
from convert.onnx_export import OnnxExportError, add_onnx, images_from_data  # noqa: E402
from convert.synthetic import make_synthetic_dataset  # noqa: E402
from tests.support import tiny_bundle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data root, a bundle as the trainer wrote it: no ONNX yet). Two views per tile, so the
    engine is given the same view batches the TFLite engine gets."""
    root = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(root / "train", n_per_class=60, size=64, seed=1)
    make_synthetic_dataset(root / "test", n_per_class=20, size=64, seed=2)
    out = tmp_path_factory.mktemp("bundle") / "b"
    proc = subprocess.run(
        [sys.executable, "-m", "agent.commands.cli", "train", str(root), "--out", str(out), "--epochs", "8",
         "--input-size", "48", "--seed", "3", "--patience", "20", "--batch-size", "8", "--views",
         "2", "--backbone", "scratch", "--parity-margin", "100", "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, out


@pytest.fixture(scope="module")
def converted(trained, tmp_path_factory):
    """The trained bundle with ONNX added by the convert-bundle command."""
    root, src = trained
    b = tmp_path_factory.mktemp("onnx") / "b"
    shutil.copytree(src, b)
    proc = subprocess.run([sys.executable, "-m", "convert.onnx_export", str(b), "--data", str(root),
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, b, json.loads(proc.stdout)


def test_convert_bundle_lists_hashed_onnx_and_its_parity(converted):
    root, b, rep = converted
    bundle = load_bundle(b)                                   # verifies every sha256
    assert ONNX_MODEL in bundle.files and ONNX_FLOAT_MODEL in bundle.files
    onnx_meta = bundle.metrics["onnx"]
    assert onnx_meta == rep
    assert rep["opset"] == 17 and rep["int8_from"] == "qdq" and rep["tensorrt_int8"] is True
    assert set(rep["int8_routes_tried"]) == {"qdq"}        # auto: qdq passed, no fallback
    assert rep["tflite_sha256"] == bundle.model_sha256
    # parity was measured on the test images (40 images x 2 views), not the calibration ones
    assert rep["parity_on"] == "parity images" and rep["parity"]["n"] == 80
    # and judged per image, as the line decides (40 images)
    assert rep["parity_judged_on"] == "40 images" and rep["parity"]["images"]["n"] == 40
    assert rep["parity"]["top1_agreement"] >= 1 - rep["parity_margin"]
    assert rep["float_parity_vs_float_tflite"]["top1_agreement"] == 1.0
    assert rep["float_parity_vs_float_tflite"]["max_prob_diff"] < 1e-3
    # the trainer's own metrics are still there: bundle.json was extended, not rewritten
    assert "threshold_selection" in bundle.metrics and bundle.input_stats is not None
    import onnx
    m = onnx.load(str(b / ONNX_MODEL))
    ops = {n.op_type for n in m.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # TensorRT compiles a Q/DQ pair to int8 only with zero point 0
    inits = {i.name: i for i in m.graph.initializer}
    zps = [inits[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zps and all(not onnx.numpy_helper.to_array(z).any() for z in zps)


def test_onnx_cpu_engine_agrees_with_tflite_through_the_inspector(converted):
    root, b, _ = converted
    onnx_i = Inspector.load(b, delegate="onnx-cpu")
    tfl_i = Inspector.load(b, delegate="cpu")
    assert "onnx-cpu" in onnx_i.describe() and "CPU" in onnx_i.describe()
    files = sorted((root / "test").rglob("*.*"))
    same, labels, diffs = 0, 0, []
    for f in files:
        img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        px = onnx_i.preprocess(img)
        assert px.shape == (2, 48, 48, 3)                    # both views in one invoke
        po, pt = onnx_i.infer(px), tfl_i.infer(px)
        assert po.shape == pt.shape == (2, 2) and po.dtype == np.float32
        (vo, so, lo), (vt, st, lt) = onnx_i.decide(po), tfl_i.decide(pt)
        same += vo == vt
        labels += lo == lt
        diffs.append(abs(so - st))
    assert same >= 0.95 * len(files), (same, len(files))
    # the export's per-image parity is this comparison: the same images, the same decisions
    im = load_bundle(b).metrics["onnx"]["parity"]["images"]
    assert im["n"] == len(files)
    assert im["verdict_agreement"] == pytest.approx(same / len(files))
    assert im["label_agreement"] == pytest.approx(labels / len(files))
    assert im["max_score_diff"] == pytest.approx(max(diffs), abs=1e-6)
    assert max(diffs) < 0.2


def test_an_onnx_sharing_constants_runs_on_the_fast_kernels_and_says_so(trained, tmp_path,
                                                                          caplog):
    """tf2onnx shares Q/DQ constants between nodes; ORT's exact int8 mode (what the engine
    asks for, against the saturating x86 AVX2 kernels) cannot load such a graph. The export
    now writes one constant per node; a model.onnx exported before still runs, and says so."""
    import dataclasses
    import logging

    import onnx

    from convert.onnx_export import save_model, tflite_to_onnx

    _, src = trained
    bundle = load_bundle(src)
    spec1 = dataclasses.replace(bundle.input, views=1, tiles=(1, 1))
    m = tflite_to_onnx(bundle.model_path)
    onnx.save(m, str(tmp_path / "old.onnx"))
    save_model(m, tmp_path / "new.onnx")
    caplog.set_level(logging.WARNING, "engine")
    old = create_engine("onnx-cpu", tmp_path / "old.onnx", spec1, len(bundle.labels))
    assert old.exact_int8 is False and "fast int8 kernels" in old.describe()
    assert any("shares int8 constants" in r.getMessage() and "convert-bundle" in r.getMessage()
               for r in caplog.records)
    new = create_engine("onnx-cpu", tmp_path / "new.onnx", spec1, len(bundle.labels))
    assert new.exact_int8 is True and "fast int8" not in new.describe()
    x = np.random.default_rng(0).integers(0, 256, (1, spec1.height, spec1.width, spec1.channels),
                                          dtype=np.uint8)
    p = new.invoke(x)
    assert p.shape == (1, len(bundle.labels)) and abs(float(p.sum()) - 1) < 0.02


def test_evaluate_scores_through_any_engine(converted):
    root, b, _ = converted
    outs = {}
    for eng in ("cpu", "onnx-cpu"):
        r = subprocess.run([sys.executable, "-m", "agent.commands.cli", "evaluate", str(b), str(root), "--json",
                            "--engine", eng], cwd=ROOT, capture_output=True, text=True, timeout=200)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[eng] = json.loads(r.stdout)
    assert outs["onnx-cpu"]["engine"].startswith("onnx-cpu") and outs["cpu"]["engine"].startswith("cpu")
    assert outs["onnx-cpu"]["n"] == outs["cpu"]["n"] == 40
    assert abs(outs["onnx-cpu"]["accuracy"] - outs["cpu"]["accuracy"]) <= 0.05
    r = subprocess.run([sys.executable, "-m", "agent.commands.cli", "evaluate", str(b), str(root),
                        "--engine", "tensorrt"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "TensorrtExecutionProvider" in r.stderr


def test_bench_lists_the_onnx_backends_beside_litert(converted, tmp_path):
    _, b, _ = converted
    r = subprocess.run([sys.executable, "-m", "agent", "bench", str(b), "--seconds", "0.2",
                        "--threads", "1", "--frames", "20", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)["invoke"]
    by = {(x["backend"], x["model"]): x for x in rows}
    for key in (("cpu", "int8"), ("onnx-cpu", "int8"), ("onnx-cpu", "float32")):
        assert by[key]["available"] and by[key]["p50_ms"] > 0, key
    for gpu in ("tensorrt", "cuda"):
        assert not by[(gpu, "int8")]["available"] and "wrong wheel" in by[(gpu, "int8")]["reason"]
    assert "invoke onnx-cpu int8    threads=1" in r.stderr


def test_corrupt_or_foreign_model_onnx_is_refused(converted, tmp_path):
    _, src, _ = converted
    # a changed byte: the bundle fails its hash check, for every engine
    b = tmp_path / "corrupt"
    shutil.copytree(src, b)
    data = bytearray((b / ONNX_MODEL).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / ONNX_MODEL).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx is corrupt or was changed after export"):
        load_bundle(b)
    with pytest.raises(InspectorError, match="model.onnx is corrupt"):
        Inspector.load(b, delegate="onnx-cpu")
    bundle = load_bundle(b, verify=False)
    with pytest.raises(EngineError, match="model.onnx is corrupt"):
        create_engine("onnx-cpu", bundle.model_path, bundle.input, 2)
    # hashed, but exported from another model.tflite: its parity was never checked
    b2 = tmp_path / "foreign"
    shutil.copytree(src, b2)
    other = load_bundle(src).metrics["onnx"]
    add_files(b2, (), metrics={"onnx": {**other, "tflite_sha256": "0" * 64}})
    with pytest.raises(InspectorError, match="exported from another model.tflite"):
        Inspector.load(b2, delegate="onnx-cpu")
    # a bundle without ONNX (every bundle before this one) loads as before, and the ONNX
    # engines say what to run
    old = load_bundle(tiny_bundle())
    assert ONNX_MODEL not in old.files
    with pytest.raises(InspectorError, match="carries no model.onnx.*convert-bundle"):
        Inspector.load(old.path, delegate="onnx-cpu")


def test_missing_gpu_providers_give_one_line_reasons(converted, monkeypatch):
    _, b, _ = converted
    bundle = load_bundle(b)
    args = (bundle.model_path, bundle.input, len(bundle.labels))
    # this box's wheel: CPU only
    for name, prov in (("tensorrt", "TensorrtExecutionProvider"), ("cuda", "CUDAExecutionProvider")):
        why = ENGINES[name].available()
        assert why and "\n" not in why and prov in why and "wrong wheel" in why
        with pytest.raises(EngineError, match=prov):
            create_engine(name, *args)
    assert ENGINES["onnx-cpu"].available() is None
    # with cpu_fallback the box runs model.tflite on LiteRT instead
    assert create_engine("tensorrt", *args, cpu_fallback=True).name == "cpu"
    # a GPU wheel on a box without a GPU
    import onnxruntime as ort
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", *real])
    monkeypatch.setattr(onnxrt, "_GPU_NODES", ("/nonexistent/nvidia0",))
    why = ENGINES["tensorrt"].available()
    assert why.startswith("no NVIDIA GPU") and "\n" not in why
    # a GPU, but the provider's libraries do not load: the session falls back, the engine refuses
    monkeypatch.setattr(onnxrt, "_gpu_present", lambda: True)
    assert ENGINES["cuda"].available() is None
    with pytest.raises(EngineError, match="could not start CUDAExecutionProvider") as e:
        create_engine("cuda", *args)
    assert "\n" not in str(e.value)


def test_tensorrt_cache_is_per_model_hash(tmp_path):
    root = tmp_path / "trt-cache"
    a = onnxrt.model_cache_dir(root, "a" * 64)
    (a / "engine.trt").write_bytes(b"x")
    assert onnxrt.model_cache_dir(root, "a" * 64) == a and (a / "engine.trt").exists()   # reused
    b = onnxrt.model_cache_dir(root, "b" * 64)
    assert b != a and not any(b.iterdir())                   # a new model builds afresh
    import os
    import time
    os.utime(a, (time.time() - 100, time.time() - 100))
    os.utime(b, (time.time() - 50, time.time() - 50))
    c = onnxrt.model_cache_dir(root, "c" * 64)
    # the current and the previous (a rollback) stay; older ones go
    assert {p.name for p in root.iterdir()} == {c.name, b.name}


def test_cache_root_follows_the_state_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGE_INSPECT_TRT_CACHE", raising=False)
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    assert onnxrt.cache_root() == tmp_path / "state" / "trt-cache"
    monkeypatch.setenv("EDGE_INSPECT_TRT_CACHE", str(tmp_path / "x"))
    assert onnxrt.cache_root() == tmp_path / "x"


def test_add_onnx_refuses_beyond_the_margin_and_changes_nothing(trained, tmp_path):
    root, src = trained
    b = tmp_path / "b"
    shutil.copytree(src, b)
    before = (b / "bundle.json").read_bytes()
    bundle = load_bundle(b)
    cal, par, _ = images_from_data(bundle, root, 60, 0)
    with pytest.raises(OnnxExportError, match="parity check failed"):
        add_onnx(b, cal, parity_images=par, margin=-0.01)
    assert (b / "bundle.json").read_bytes() == before
    assert not (b / ONNX_MODEL).exists() and not list(b.glob(".onnx-*"))
    # the trainer's call: calibration inputs it has in memory, parity on its held-out ones
    rep = add_onnx(b, cal, parity_images=par)
    assert rep["parity"]["n"] == len(par) and load_bundle(b).metrics["onnx"] == rep
