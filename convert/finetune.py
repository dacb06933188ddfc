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
import os
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


class FrozenRunner:
    """The frozen part of the classifier as a float TFLite model on XNNPACK: pixels -> the
    cut features (what fine-tuning trains on) and the max-and-mean vector the untouched upper
    blocks give (what the warm-up fits on). TensorFlow's CPU kernels ran these depthwise
    convolutions at ~28 ms a 304x304 view on 2 cores; XNNPACK is several times faster."""

    def __init__(self, clf: Lite0Classifier, shape: tuple[int, int, int]):
        import keras

        from agent.engines.litert import interpreter_module

        from .export import to_tflite

        inp = keras.Input(shape, name="pixels")
        f = clf.features(inp)
        g, a = clf.pooled(f)
        wrapper = keras.Model(inp, [f, keras.layers.Concatenate()([g, a])])
        self.it = interpreter_module().Interpreter(model_content=to_tflite(wrapper, shape),
                                                   num_threads=os.cpu_count() or 1)
        self.it.allocate_tensors()
        self.inp = self.it.get_input_details()[0]["index"]
        outs = self.it.get_output_details()
        self.f_idx = next(o["index"] for o in outs if len(o["shape"]) == 4)
        self.p_idx = next(o["index"] for o in outs if len(o["shape"]) == 2)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.it.set_tensor(self.inp, x[None].astype(np.float32))
        self.it.invoke()
        return self.it.get_tensor(self.f_idx)[0], self.it.get_tensor(self.p_idx)[0]


def cache_features(run: FrozenRunner, X: np.ndarray, views: int,
                   jitter_seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, T, H, W, C) uint8 pixels -> features (N, views, T, h, w, C') float16 and pooled
    vectors (N, views, T, 2560) float32 of the frozen part; with jitter_seed, every view gets
    its own brightness and contrast jitter."""
    n, T = X.shape[0], X.shape[1]
    rng = np.random.default_rng(jitter_seed)
    F = P = None
    for i in range(n):
        xv = add_views(X[i], views).astype(np.float32)      # (T*V, H, W, C), views inner
        if jitter_seed is not None:
            k = rng.uniform(1 - CONTRAST, 1 + CONTRAST, (len(xv), 1, 1, 1))
            br = rng.uniform(-BRIGHTNESS, BRIGHTNESS, (len(xv), 1, 1, 1))
            mean = xv.mean(axis=(1, 2, 3), keepdims=True)
            xv = np.clip((xv - mean) * k + mean + br, 0.0, 255.0)
        for j, x in enumerate(xv):
            f, p = run(x)
            if F is None:
                F = np.empty((n, T, views) + f.shape, np.float16)
                P = np.empty((n, T, views) + p.shape, np.float32)
            F[i, j // views, j % views], P[i, j // views, j % views] = f, p
    return F.transpose(0, 2, 1, 3, 4, 5), P.transpose(0, 2, 1, 3)


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
    run = FrozenRunner(clf, X.shape[2:])
    F_tr, P_tr = cache_features(run, X[tr_i], views, jitter_seed=seed)
    F_va = cache_features(run, X[va_i], 1)[0][:, 0]
    del run
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
    warm = warm_start(clf, P_tr, yt, wt, F_va, y[va_i], good_idx)
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


def warm_start(clf: Lite0Classifier, P_tr, y_tr, w_tr, F_va, y_va, good_idx: int) -> dict:
    """Standardisation and softmax weights from the pooled frozen features of every cached
    view (P_tr: (n, views, tiles, 2560))."""
    from .monitor import roc_auc

    t0 = time.perf_counter()
    n, V, T = P_tr.shape[:3]
    P = P_tr.reshape(n * V * T, -1)                                  # (n*V*T, 2 x 1280)
    D = P.shape[1]
    mu, sd = P.mean(0), P.std(0) + 1e-3
    half = D // 2
    for norm, sl in ((clf.norm_max, slice(0, half)), (clf.norm_mean, slice(half, D))):
        w = norm.get_weights()
        norm.set_weights([mu[sl], sd[sl] ** 2] + w[2:])
    Z = ((P - mu) / sd).astype(np.float32)       # float32 matmuls: half the warm-up time
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


def softmax_regression(Z: np.ndarray, y: np.ndarray, w: np.ndarray, n_classes: int,
                       l2: float = 1e-3, steps: int = 300):
    """Weighted multinomial logistic regression, full-batch gradient descent with Nesterov
    momentum on standardised inputs (convex: the result does not depend on a seed)."""
    d = Z.shape[1]
    W = np.zeros((d, n_classes), np.float32)
    b = np.zeros(n_classes, np.float32)
    vW, vb = np.zeros_like(W), np.zeros_like(b)
    Y = np.eye(n_classes, dtype=np.float32)[y]
    sw = (w / w.sum()).astype(np.float32)[:, None]
    # step size 1/L: L bounds the curvature of the weighted cross-entropy (0.5 x the largest
    # eigenvalue of the weighted feature covariance), found by power iteration
    v = np.full(d, 1.0 / np.sqrt(d), np.float32)
    for _ in range(20):
        v = Z.T @ (sw[:, 0] * (Z @ v))
        lam = np.linalg.norm(v)
        v /= lam
    lr = np.float32(1.0 / (0.5 * lam + l2))   # float32 throughout: one float64 scalar made
    mom = np.float32(0.9)                     # every matmul mixed-precision, 10x slower
    l2 = np.float32(l2)
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
