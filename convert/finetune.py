"""Fitting the pretrained Lite0 classifier (convert.model.Lite0Classifier) on cached features.

The frozen lower blocks see every training image once per mirror view (the views the bundle
scores, agent.preprocess.add_views, each with its own photometric jitter); their outputs are
cached, and training runs only the tuned upper blocks and the head. Two phases, the usual
transfer-learning recipe: a frozen warm-up (here a softmax fitted in closed form on the
frozen features), then fine-tuning of the upper blocks at a lower rate, BatchNorm frozen
throughout. Image labels only: boxes and masks are not used by this backbone (auto gives
fully boxed data to the scratch model, which trains on them cell by cell).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np

from agent.preprocess import add_views

from .model import Lite0Classifier
from .monitor import Progress

log = logging.getLogger("convert.finetune")

VIEWS_CACHED = 4
TUNE_LR_FACTOR = 0.25       # fine-tuning rate = --lr x this (1e-3 -> 2.5e-4)


# Photometric jitter of the cached training views (as convert.crops.augmenter gives the
# scratch model): a line's lighting drifts, and a model that keys on a tile's overall
# brightness rejects a whole shift's parts when the lamp ages.
BRIGHTNESS, CONTRAST = 20.0, 0.15


def cache_features(clf: Lite0Classifier, X: np.ndarray, views: int, batch: int = 8,
                   jitter_seed: int | None = None) -> np.ndarray:
    """(N, T, H, W, C) uint8 pixels -> (N, views, T, h, w, C') float16 features of the frozen
    blocks; with jitter_seed, every view gets its own brightness and contrast jitter."""
    import tensorflow as tf

    n, T = X.shape[0], X.shape[1]
    h, w = clf.cells
    # one traced graph: eager calls of a 60-layer model grew the process past 20 GB
    infer = tf.function(lambda x: clf.features(x, training=False), reduce_retracing=True)
    out = None
    flat = X.reshape((-1,) + X.shape[2:])                              # (N*T, H, W, C)
    rng = np.random.default_rng(jitter_seed)
    for s in range(0, len(flat), batch):
        xb = add_views(flat[s:s + batch], views).astype(np.float32)   # (b*V, ...), views inner
        if jitter_seed is not None:
            k = rng.uniform(1 - CONTRAST, 1 + CONTRAST, (len(xb), 1, 1, 1))
            br = rng.uniform(-BRIGHTNESS, BRIGHTNESS, (len(xb), 1, 1, 1))
            mean = xb.mean(axis=(1, 2, 3), keepdims=True)
            xb = np.clip((xb - mean) * k + mean + br, 0.0, 255.0)
        f = infer(xb).numpy().astype(np.float16)
        if out is None:
            out = np.empty((n * T * views,) + f.shape[1:], np.float16)
        out[s * views:s * views + len(f)] = f
    return out.reshape(n, T, views, h, w, -1).transpose(0, 2, 1, 3, 4, 5)


@dataclasses.dataclass
class FitResult:
    progress: Progress
    seconds: float
    cache_seconds: float
    warmup: dict


def fit_lite0(clf: Lite0Classifier, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray,
              tr_i: np.ndarray, va_i: np.ndarray, *, epochs: int, batch_size: int,
              learning_rate: float, patience: int, seed: int, verbose: bool, flips: bool,
              good_idx: int) -> FitResult:
    import keras

    t0 = time.perf_counter()
    views = VIEWS_CACHED if flips else 1
    F_tr = cache_features(clf, X[tr_i], views, jitter_seed=seed)
    F_va = cache_features(clf, X[va_i], 1)[:, 0]
    cache_s = time.perf_counter() - t0
    log.info("Lite0 blocks 0-%d (frozen, ImageNet) cached for %d training images x %d view(s) "
             "and %d validation images: %.0f MB, %.0fs", clf.tuned_from - 1, len(tr_i), views, len(va_i),
             (F_tr.nbytes + F_va.nbytes) / 1e6, cache_s)
    yt, wt = y[tr_i].astype(np.int32), sample_weight[tr_i].astype(np.float32)
    # One (image, view) per sample and epoch, drawn by a seeded generator: deterministic.
    rng = np.random.default_rng(seed)
    n = len(tr_i)

    def epoch_arrays():
        v = rng.integers(0, views, n)
        order = rng.permutation(n)
        return F_tr[order, v[order]], yt[order], wt[order]

    class Epochs(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self._arrays = epoch_arrays()

        def __len__(self):
            return math.ceil(n / batch_size)

        def __getitem__(self, i):
            f, yy, ww = (a[i * batch_size:(i + 1) * batch_size] for a in self._arrays)
            return f.astype(np.float32), yy, ww

        def on_epoch_end(self):
            self._arrays = epoch_arrays()

    ds_va = [(F_va[s:s + 32].astype(np.float32), y[va_i][s:s + 32], sample_weight[va_i][s:s + 32])
             for s in range(0, len(va_i), 32)]
    loss = "sparse_categorical_crossentropy"
    steps = math.ceil(n / batch_size)
    data = Epochs()

    # Phase 1, the frozen warm-up: a softmax on the frozen ImageNet features, fitted in closed
    # form (full-batch, seconds) so that fine-tuning starts from a good head instead of a
    # random one whose gradients would wreck the pretrained blocks in the first steps.
    warm = warm_start(clf, F_tr, yt, wt, F_va, y[va_i], good_idx)
    log.info("warm-up: softmax on frozen features, validation AUC %.4f  [%.0fs]", warm["val_auc"],
             warm["seconds"])
    # Phase 2: the head and the upper blocks, cosine decay from --lr x TUNE_LR_FACTOR.
    clf.set_tuning(True)
    lr = keras.optimizers.schedules.CosineDecay(learning_rate * TUNE_LR_FACTOR,
                                                decay_steps=max(1, epochs * steps), alpha=0.05)
    clf.train_model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss)
    prog = Progress(epochs, verbose, ds_va, good_idx, None, patience, ema_decay=1.0 - 1.0 / steps)
    clf.train_model.fit(data, epochs=epochs, callbacks=[prog.callback], verbose=0)
    return FitResult(prog, time.perf_counter() - t0, cache_s, warm)


def warm_start(clf: Lite0Classifier, F_tr, y_tr, w_tr, F_va, y_va, good_idx: int) -> dict:
    """Standardisation and softmax weights from the frozen features of every cached view."""
    from .monitor import roc_auc

    t0 = time.perf_counter()
    n, V, T = F_tr.shape[:3]
    # per tile: pooled vectors of every view (train) and of view 0 (validation)
    P = _pooled(clf, F_tr.reshape((-1,) + F_tr.shape[3:]))          # (n*V*T, 2 x 1280)
    D = P.shape[1]
    mu, sd = P.mean(0), P.std(0) + 1e-3
    half = D // 2
    for norm, sl in ((clf.norm_max, slice(0, half)), (clf.norm_mean, slice(half, D))):
        w = norm.get_weights()
        norm.set_weights([mu[sl], sd[sl] ** 2] + w[2:])
    Z = (P - mu) / sd
    # a frame's label is its worst tile's: for T > 1 the defect label goes to every tile here
    # (a start, which fine-tuning's max-over-tiles corrects)
    yy = np.repeat(y_tr, V * T)
    ww = np.repeat(w_tr, V * T)
    W, b = softmax_regression(Z, yy, ww, n_classes=clf.logit_max.units)
    clf.logit_max.set_weights([W[:half].astype(np.float32), b.astype(np.float32)])
    clf.logit_mean.set_weights([W[half:].astype(np.float32)])
    p_va = clf.train_model.predict(F_va.astype(np.float32), verbose=0, batch_size=64)
    auc = roc_auc(1.0 - p_va[:, good_idx], y_va != good_idx)
    return {"val_auc": float(auc), "seconds": round(time.perf_counter() - t0, 1), "dims": int(D)}


def _pooled(clf: Lite0Classifier, F: np.ndarray) -> np.ndarray:
    """Max-and-mean vectors before standardisation."""
    return np.concatenate([np.concatenate(clf.pooled.predict(F[s:s + 256].astype(np.float32), verbose=0), 1)
                           for s in range(0, len(F), 256)])


def softmax_regression(Z: np.ndarray, y: np.ndarray, w: np.ndarray, n_classes: int,
                       l2: float = 1e-3, steps: int = 300):
    """Weighted multinomial logistic regression, full-batch gradient descent with Nesterov
    momentum on standardised inputs (convex: the result does not depend on a seed)."""
    d = Z.shape[1]
    W = np.zeros((d, n_classes))
    b = np.zeros(n_classes)
    vW, vb = np.zeros_like(W), np.zeros_like(b)
    Y = np.eye(n_classes)[y]
    sw = (w / w.sum())[:, None]
    # step size 1/L: L bounds the curvature of the weighted cross-entropy (0.5 x the largest
    # eigenvalue of the weighted feature covariance), found by power iteration
    v = np.ones(d) / np.sqrt(d)
    for _ in range(20):
        v = Z.T @ (sw[:, 0] * (Z @ v))
        lam = np.linalg.norm(v)
        v /= lam
    lr = 1.0 / (0.5 * lam + l2)
    mom = 0.9
    for _ in range(steps):
        Wl, bl = W + mom * vW, b + mom * vb
        logits = Z @ Wl + bl
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        g = (p - Y) * sw
        gW = Z.T @ g + l2 * Wl
        gb = g.sum(0)
        vW = mom * vW - lr * gW
        vb = mom * vb - lr * gb
        W, b = W + vW, b + vb
    return W, b
