"""Fitting the pretrained Lite0 classifier (convert.model.Lite0Classifier) on cached features.

The frozen lower blocks see every training image once per mirror view (the same views the
bundle scores, agent.preprocess.add_views); their outputs are cached, and training runs the
tuned upper blocks and the local head only. Two phases, the usual transfer-learning recipe:
a frozen warm-up that trains the new head on ImageNet features, then fine-tuning of the
upper blocks at a lower rate (BatchNorm frozen throughout). Both use the scratch model's
defect-map loss (convert.model.map_loss): good images teach every cell, boxes or masks teach
their cells, a label-only defect image asks for one confident cell.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np

from agent.preprocess import InputSpec, add_views, preprocess

from .data import GOOD, box_mask
from .model import MAP_STRIDE, Lite0Classifier, map_loss
from .monitor import Progress

log = logging.getLogger("convert.finetune")

VIEWS_CACHED = 4
WARMUP_EPOCHS = 3
WARMUP_LR = 2e-3
TUNE_LR_FACTOR = 0.25       # fine-tuning rate = --lr x this (1e-3 -> 2.5e-4)


def cell_targets(spec: InputSpec, boxes, classes, images, labels: list[str]) -> np.ndarray:
    """(N, VIEWS_CACHED, T, h, w, K) float32 map_loss targets in every cached view: good image
    0 everywhere; a boxed/masked defect image 1 on its cells in its class's channel; a
    label-only defect image -1 ("somewhere") in its class's channel."""
    h, w = -(-spec.height // MAP_STRIDE), -(-spec.width // MAP_STRIDE)
    K, T = len(labels) - 1, spec.n_tiles
    out = np.zeros((len(images), VIEWS_CACHED, T, h, w, K), np.float32)
    mspec = dataclasses.replace(spec, channels=1, color="gray", views=1)
    for i, (b, c, im) in enumerate(zip(boxes, classes, images)):
        if c == GOOD:
            continue
        k = labels.index(c) - 1
        if not b:
            out[i, ..., k] = -1.0
            continue
        m = add_views(preprocess(box_mask(im.shape, b), mspec)[..., 0], VIEWS_CACHED)   # (T*V, H, W)
        m = m.reshape(T, VIEWS_CACHED, spec.height, spec.width).transpose(1, 0, 2, 3)
        ph, pw = h * MAP_STRIDE - spec.height, w * MAP_STRIDE - spec.width
        m = np.pad(m, ((0, 0), (0, 0), (0, ph), (0, pw)))
        cells = m.reshape(VIEWS_CACHED, T, h, MAP_STRIDE, w, MAP_STRIDE).max(axis=(3, 5)) > 127
        out[i, ..., k] = cells
    return out


def cache_features(clf: Lite0Classifier, X: np.ndarray, views: int, batch: int = 32) -> np.ndarray:
    """(N, T, H, W, C) uint8 pixels -> (N, views, T, h, w, 80) float16 block-7 features."""
    n, T = X.shape[0], X.shape[1]
    h, w = clf.cells
    out = None
    flat = X.reshape((-1,) + X.shape[2:])                              # (N*T, H, W, C)
    for s in range(0, len(flat), batch):
        xb = add_views(flat[s:s + batch], views).astype(np.float32)   # (b*V, ...), views inner
        f = clf.features(xb, training=False).numpy().astype(np.float16)
        if out is None:
            out = np.empty((n * T * views,) + f.shape[1:], np.float16)
        out[s * views:s * views + len(f)] = f
    return out.reshape(n, T, views, h, w, -1).transpose(0, 2, 1, 3, 4, 5)


@dataclasses.dataclass
class FitResult:
    progress: Progress
    seconds: float
    cache_seconds: float
    epochs_warmup: int


def fit_lite0(clf: Lite0Classifier, X: np.ndarray, y: np.ndarray, targets: np.ndarray,
              sample_weight: np.ndarray, tr_i: np.ndarray, va_i: np.ndarray, *, epochs: int,
              batch_size: int, learning_rate: float, patience: int, seed: int, verbose: bool,
              flips: bool, good_idx: int) -> FitResult:
    import keras

    t0 = time.perf_counter()
    views = VIEWS_CACHED if flips else 1
    F_tr = cache_features(clf, X[tr_i], views)
    F_va = cache_features(clf, X[va_i], 1)[:, 0]
    cache_s = time.perf_counter() - t0
    log.info("Lite0 blocks 0-7 (frozen, ImageNet) cached for %d training images x %d view(s) "
             "and %d validation images: %.0f MB, %.0fs", len(tr_i), views, len(va_i),
             (F_tr.nbytes + F_va.nbytes) / 1e6, cache_s)

    def side_by_side(t):      # (..., T, h, w, K) -> (..., T*h, w, K), as train_model lays tiles out
        return t.reshape(t.shape[:-4] + (-1,) + t.shape[-2:])

    tgt_tr = side_by_side(targets[tr_i][:, :views])
    yt, wt = y[tr_i].astype(np.int32), sample_weight[tr_i].astype(np.float32)
    # One (image, view) per sample and epoch, drawn by a seeded generator: deterministic.
    rng = np.random.default_rng(seed)
    n = len(tr_i)

    def epoch_arrays():
        v = rng.integers(0, views, n)
        order = rng.permutation(n)
        return F_tr[order, v[order]], tgt_tr[order, v[order]], yt[order], wt[order]

    class Epochs(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self._arrays = epoch_arrays()

        def __len__(self):
            return math.ceil(n / batch_size)

        def __getitem__(self, i):
            f, t, yy, ww = (a[i * batch_size:(i + 1) * batch_size] for a in self._arrays)
            return f.astype(np.float32), {"probs": yy, "defect_map": t}, {"probs": ww, "defect_map": ww}

        def on_epoch_end(self):
            self._arrays = epoch_arrays()

    va_t = side_by_side(targets[va_i][:, 0])
    ds_va = [(F_va[s:s + 32].astype(np.float32),
              {"probs": y[va_i][s:s + 32], "defect_map": va_t[s:s + 32]},
              {"probs": sample_weight[va_i][s:s + 32], "defect_map": sample_weight[va_i][s:s + 32]})
             for s in range(0, len(va_i), 32)]
    loss = {"defect_map": map_loss()}
    steps = math.ceil(n / batch_size)
    data = Epochs()

    # Phase 1: the new head on frozen ImageNet features (a random head's gradients would
    # otherwise wreck the pretrained blocks in the first steps).
    clf.set_tuning(False)
    clf.train_model.compile(optimizer=keras.optimizers.Adam(WARMUP_LR), loss=loss)
    clf.train_model.fit(data, epochs=WARMUP_EPOCHS, verbose=0)
    # Phase 2: the head and blocks 8-10, cosine decay from --lr x TUNE_LR_FACTOR.
    clf.set_tuning(True)
    lr = keras.optimizers.schedules.CosineDecay(learning_rate * TUNE_LR_FACTOR,
                                                decay_steps=max(1, epochs * steps), alpha=0.05)
    clf.train_model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss)
    prog = Progress(epochs, verbose, ds_va, good_idx, loss["defect_map"], patience,
                    ema_decay=1.0 - 1.0 / steps)
    clf.train_model.fit(data, epochs=epochs, callbacks=[prog.callback], verbose=0)
    return FitResult(prog, time.perf_counter() - t0, cache_s, WARMUP_EPOCHS)
