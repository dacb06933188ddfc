"""agent.preprocess: every frame shape the line can produce becomes the model's input."""

import json

import numpy as np
import pytest

from agent.bundle import BundleError, load_bundle, write_manifest
from agent.decide import decide, defect_score
from agent.preprocess import InputSpec, add_views, preprocess, to_input_tensor


@pytest.mark.parametrize("frame", [
    np.zeros((480, 640), np.uint8),
    np.zeros((480, 640, 1), np.uint8),
    np.zeros((480, 640, 3), np.uint8),
    np.zeros((480, 640, 4), np.uint8),
    np.zeros((100, 50, 3), np.uint16),
    np.zeros((33, 77), np.float32),
])
@pytest.mark.parametrize("color,channels", [("gray", 1), ("rgb", 3)])
def test_any_frame_shape_gives_spec_shape(frame, color, channels):
    spec = InputSpec(width=32, height=24, channels=channels, color=color)
    out = preprocess(frame, spec)
    assert out.shape == (1, 24, 32, channels) and out.dtype == np.uint8


def test_bgr_to_rgb_and_gray():
    frame = np.zeros((10, 10, 3), np.uint8)
    frame[..., 0] = 255  # pure blue in OpenCV's BGR
    rgb = preprocess(frame, InputSpec(10, 10, 3, "rgb"))
    assert rgb[0, 0, 0].tolist() == [0, 0, 255]
    gray = preprocess(frame, InputSpec(10, 10, 1, "gray"))
    assert gray[0, 0, 0, 0] == 29  # ITU-R 601 weight of blue


def test_tiles_keep_full_resolution_and_order():
    frame = np.zeros((64, 64), np.uint8)
    frame[:32, 32:] = 200  # top-right quadrant bright
    out = preprocess(frame, InputSpec(32, 32, tiles=(2, 2)))
    assert out.shape == (4, 32, 32, 1)
    assert [int(t.mean()) for t in out] == [0, 200, 0, 0]


@pytest.mark.parametrize("views", [1, 2, 4])
def test_views_follow_their_tile_mirrored(views):
    frame = np.zeros((40, 60), np.uint8)
    frame[:5, :5] = 200                      # a mark in the top-left corner
    spec = InputSpec(30, 20, tiles=(1, 2), views=views)
    out = preprocess(frame, spec)
    assert out.shape == spec.shape == (2 * views, 20, 30, 1)
    corners = [(0, 0), (0, -1), (-1, 0), (-1, -1)][:views]   # as is, left-right, up-down, both
    for v, (r, c) in enumerate(corners):
        assert out[v, r, c, 0] == 200 and out[v].sum() == out[0].sum()
        assert out[views + v].max() == 0                     # the right tile has no mark
    one = preprocess(frame, InputSpec(30, 20, tiles=(1, 2)))
    assert np.array_equal(add_views(one, views), out)        # training's layout is the line's


def test_decision_averages_views_then_takes_the_worst_tile():
    class B:
        labels, good_label, defect_indices, input = ["good", "a", "b"], "good", [1, 2], \
            InputSpec(8, 8, tiles=(1, 2), views=2)
    probs = np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0],        # tile 0: views disagree
                      [0.6, 0.0, 0.4], [0.4, 0.0, 0.6]])       # tile 1: both mildly "b"
    score, label = defect_score(probs, B)
    assert score == pytest.approx(0.5) and label == "a"        # tile 0: 1 - mean(0.9, 0.1)
    probs[1] = [0.3, 0.7, 0.0]
    score, label = defect_score(probs, B)
    assert score == pytest.approx(0.5) and label == "b"        # now tile 1 is the worst
    with pytest.raises(ValueError, match="views must be one of"):
        InputSpec(8, 8, views=3)


def test_the_threshold_rule_and_an_output_that_cannot_be_judged():
    class B:
        labels, good_label, defect_indices, input = ["good", "a", "b"], "good", [1, 2], \
            InputSpec(8, 8, tiles=(1, 2))
    probs = np.array([[0.9, 0.1, 0.0], [0.4, 0.0, 0.6]], np.float32)   # worst tile: 0.6 "b"
    assert decide(probs, B, 0.6) == (pytest.approx(0.6), "b")         # >= rejects
    assert decide(probs, B, 0.61) == (pytest.approx(0.6), "good")
    for bad in (np.nan, np.inf):
        p = probs.copy()
        p[0, 0] = bad               # the harmless tile: the worst is still judged on tile 1
        with pytest.raises(ValueError, match="not finite"):
            defect_score(p, B)


def test_roi_letterbox_and_center_crop():
    frame = np.full((100, 200), 255, np.uint8)
    lb = preprocess(frame, InputSpec(50, 50, fit="letterbox"))[0, :, :, 0]
    assert lb[0, 25] == 0 and lb[25, 25] == 255          # padded bands above and below
    frame[:, :100] = 0
    cc = preprocess(frame, InputSpec(10, 10, fit="center_crop"))[0, :, :, 0]
    assert cc[:, :5].mean() == 0 and cc[:, 5:].mean() == 255
    roi = preprocess(frame, InputSpec(10, 10, roi=(100, 0, 100, 100)))
    assert roi.min() == 255
    with pytest.raises(ValueError, match="outside"):
        preprocess(frame, InputSpec(10, 10, roi=(500, 0, 10, 10)))


def test_reused_output_buffer_and_bad_frames():
    spec = InputSpec(8, 8)
    buf = np.empty(spec.shape, np.uint8)
    assert preprocess(np.ones((16, 16), np.uint8), spec, out=buf) is buf
    with pytest.raises(ValueError, match="empty frame"):
        preprocess(np.zeros((0, 0), np.uint8), spec)
    with pytest.raises(ValueError, match="unsupported frame shape"):
        preprocess(np.zeros((4, 4, 2), np.uint8), spec)


def test_input_quantization():
    px = np.array([0, 128, 255], np.uint8)
    assert to_input_tensor(px, np.uint8, 1.0, 0) is px
    assert to_input_tensor(px, np.int8, 1.0, -128).tolist() == [-128, 0, 127]
    assert to_input_tensor(px, np.uint8, 2.0, 10).tolist() == [10, 74, 138]


def test_spec_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="does not match channels"):
        InputSpec(8, 8, channels=3, color="gray")
    spec = InputSpec(8, 6, channels=3, color="rgb", roi=(1, 2, 3, 4), tiles=(2, 3), views=4)
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    old = spec.to_dict()
    del old["views"]                      # a bundle from before views: scored as is
    assert InputSpec.from_dict(old).views == 1


def _bundle(tmp_path):
    (tmp_path / "model.tflite").write_bytes(b"not really a model")
    return write_manifest(tmp_path, labels=["good", "defect"], good_label="good",
                          input_spec=InputSpec(8, 8), threshold=0.4, metrics={}, provenance={})


def test_bundle_roundtrip_and_tamper_detection(tmp_path):
    b = _bundle(tmp_path)
    loaded = load_bundle(tmp_path)
    assert loaded.model_sha256 == b.model_sha256 and loaded.defect_labels == ["defect"]
    (tmp_path / "model.tflite").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="corrupt or was changed"):
        load_bundle(tmp_path)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.update(format=99), "bundle format 99 is not supported"),
    (lambda m: m.pop("labels"), "missing field 'labels'"),
    (lambda m: m.update(threshold=3), "threshold 3.0 is outside"),
    (lambda m: m.update(good_label="ok"), "must hold good_label 'ok'"),
])
def test_bundle_manifest_errors(tmp_path, mutate, message):
    _bundle(tmp_path)
    m = json.loads((tmp_path / "bundle.json").read_text())
    mutate(m)
    (tmp_path / "bundle.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=message):
        load_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text("{broken")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path)
