"""convert/model.py and the training signal: the fixed monotone head, the defect-map loss,
crop training, and learning from image labels alone (no boxes) at a large input."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from convert.model import build_model, centre_head, centred_probs, map_loss, map_size  # noqa: E402
from convert.synthetic import make_synthetic_dataset, train_tiny_bundle  # noqa: E402


def _loss(y, z):
    return np.asarray(map_loss()(np.asarray(y, "float32"), np.asarray(z, "float32")))


def test_head_is_monotone_and_shared_with_the_any_size_training_model():
    train_model, model = build_model(64, 64, 1, 3)
    assert not train_model.get_layer("probs").trainable
    kernel, bias = train_model.get_layer("probs").get_weights()
    # good's logit is 0 and defect k's is its own max-cell evidence: more evidence for k can
    # only raise P(k), whatever the training did (the head has no weights to learn)
    assert np.array_equal(kernel, [[0, 1, 0], [0, 0, 1]]) and not bias.any()
    x = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 1)).astype("float32")
    out = train_model.predict(x, verbose=0)
    np.testing.assert_allclose(model.predict(x, verbose=0), out["probs"], rtol=1e-5, atol=1e-6)
    assert out["defect_map"].shape == (2, *map_size(64, 64), 2)
    crop = train_model.predict(x[:, :32, :48], verbose=0)          # crops: any size goes in
    assert crop["defect_map"].shape == (2, *map_size(32, 48), 2)


def test_map_loss_trains_the_hardest_good_cell_and_one_defect_cell():
    good = np.zeros((1, 4, 4, 1))
    z = np.full((1, 4, 4, 1), -6.0)
    one_hot_cell = z.copy()
    one_hot_cell[0, 2, 3, 0] = 4.0
    # one confident cell in a good image costs much more than its 1/16 share of a mean loss
    base, spiked = _loss(good, z)[0], _loss(good, one_hot_cell)[0]
    assert spiked - base > 4.0
    # a boxed defect: only the box cells may carry the evidence; a high cell outside the box
    # is a false alarm (costs), a high cell inside it is what was wanted (cheap)
    boxed = good.copy()
    boxed[0, 0, 0, 0] = 1.0
    inside = z.copy()
    inside[0, 0, 0, 0] = 4.0
    assert _loss(boxed, inside)[0] < 0.1 < _loss(boxed, one_hot_cell)[0] - 4.0
    # no boxes (-1 = somewhere): one confident cell anywhere satisfies the image label, and
    # no evidence at all is penalised
    unknown = -np.ones((1, 4, 4, 1))
    assert _loss(unknown, one_hot_cell)[0] < 0.05 < 5.0 < _loss(unknown, z)[0]


def test_learns_from_image_labels_alone_at_a_large_input(tmp_path):
    """Blobs of ~15 px on 160 px images, no boxes: 10 cells x 10 cells, one of which holds the
    defect. The earlier learnt head and image-level loss sat at chance here (56 % with this
    seed, 62 % with seed 4; seeds 1 and 2 happened to learn): this seed is one it failed."""
    data = make_synthetic_dataset(tmp_path / "d", 40, 160, seed=21, mixed_formats=False,
                                  vary_size=False)
    summary = train_tiny_bundle(data, tmp_path / "b", epochs=12, input_size=160, seed=3)
    m = summary["metrics"]
    assert m["validation"]["accuracy"] >= 0.9 and m["int8_accuracy"] >= 0.9, m["validation"]


def test_boxed_data_trains_on_crops(tmp_path, caplog):
    data = make_synthetic_dataset(tmp_path / "d", 16, 200, seed=4, annotate=True,
                                  mixed_formats=False, vary_size=False)
    with caplog.at_level(logging.INFO, logger="convert.train"):
        summary = train_tiny_bundle(data, tmp_path / "b", epochs=6, input_size=192)
    assert "training on 96x96 crops" in caplog.text and "validating on whole frames" in caplog.text
    assert summary["metrics"]["validation"]["accuracy"] >= 0.8
    # without boxes for every defect image the same data trains on whole frames
    (data / "annotations" / "defect_0000.txt").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="convert.train"):
        train_tiny_bundle(data, tmp_path / "b2", epochs=1, input_size=192)
    assert "crops" not in caplog.text


def test_weight_average_tracks_swaps_and_restores():
    import tensorflow as tf

    from convert.monitor import WeightAverage

    v = tf.Variable([0.0, 10.0])
    avg = WeightAverage([v], decay=0.25)
    for target in ([4.0, 2.0], [4.0, 2.0], [8.0, 6.0]):
        v.assign(target)
        avg.update()
    # bias-corrected start: step n keeps (1+n)/(10+n) of the average, capped by the decay:
    # 2/11, then 3/12 = 0.25, then 0.25 (not 4/13)
    a = np.array([0.0, 10.0])
    for d, t in ((2 / 11, [4.0, 2.0]), (0.25, [4.0, 2.0]), (0.25, [8.0, 6.0])):
        a = d * a + (1 - d) * np.array(t)
    avg.swap()
    np.testing.assert_allclose(v.numpy(), a, rtol=1e-6)          # the live weights ARE the average
    avg.swap()
    np.testing.assert_allclose(v.numpy(), [8.0, 6.0])           # and come back unchanged
    np.testing.assert_allclose(avg.average[0].numpy(), a, rtol=1e-6)


def test_centre_head_puts_the_threshold_at_one_half_and_keeps_the_order():
    _, model = build_model(32, 32, 1, 3)              # two defect classes share the shift
    dm = model.get_layer("defect_map")                # spread the untrained logits apart
    k, b = dm.get_weights()
    dm.set_weights([k * 300, b])
    x = np.random.default_rng(1).integers(0, 255, (9, 32, 32, 1)).astype("float32")
    s0 = 1.0 - model.predict(x, verbose=0)[:, 0]
    order = np.argsort(s0)
    t = float(s0[order[4]])
    bias = centre_head(model, t)
    s1 = 1.0 - model.predict(x, verbose=0)[:, 0]
    assert bias == pytest.approx(np.log(t / (1 - t)))
    assert s1[order[4]] == pytest.approx(0.5, abs=1e-4)            # the operating point
    assert np.all(np.diff(s1[order]) >= -1e-6)                     # same order of frames
    assert np.all((s1 >= 0.5 - 1e-4) == (s0 >= t))                 # same verdicts


def test_centred_probs_are_what_the_centred_head_gives():
    # out-of-fold probabilities (fold models, before centring) join the exported model's
    # centred scores through centred_probs: it must reproduce the shifted head exactly
    _, model = build_model(32, 32, 1, 3)
    dm = model.get_layer("defect_map")
    k, b = dm.get_weights()
    dm.set_weights([k * 300, b])
    x = np.random.default_rng(2).integers(0, 255, (9, 32, 32, 1)).astype("float32")
    p0 = model.predict(x, verbose=0)
    t = float(np.median(1.0 - p0[:, 0]))
    centre_head(model, t)
    np.testing.assert_allclose(centred_probs(p0, t), model.predict(x, verbose=0), atol=2e-5)
    assert not np.allclose(centred_probs(p0, t), p0, atol=1e-3)      # it did move them
