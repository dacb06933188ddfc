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
# Window of the weight average (convert.monitor.Progress, refit), in epochs; the bias-corrected
# start (WeightAverage) centres it about a tenth of the steps back until epoch 9 x this.
# 3 was measured worse through the whole trainer (benchmarks/README.md, 2026-12-06).
AVERAGE_EPOCHS = 1.0
# Export the last epoch's weight average instead of the best-validated epoch's (and refit the
# folds for the whole schedule).
KEEP_LAST = False


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

        from agent.runtime.engines.litert import interpreter_module

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
    t0, said = time.perf_counter(), 0
    for i in range(n):
        if n >= 200 and i * 4 // n > said:      # minutes on a big set: say how far, and when done
            said = i * 4 // n
            el = time.perf_counter() - t0
            log.info("  frozen features: %d/%d images, %.0fs, ~%.0fs left", i, n, el, el * (n - i) / i)
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
class OutOfFold:
    """Scores of training images by models that did not train on them (k-fold): the threshold
    then rests on every defect scored, not only on the ~20 % held for validation."""
    index: np.ndarray          # images (rows of X) scored out of fold
    probs: np.ndarray          # (n, tiles x views, K) float probabilities, laid out as the bundle's
    folds: int                 # folds run besides the exported model's own validation
    planned: int
    seconds: float
    note: str = ""             # why fewer folds ran than planned


@dataclasses.dataclass
class FitResult:
    progress: Progress
    seconds: float
    cache_seconds: float
    warmup: dict
    oof: OutOfFold | None = None


class _Epochs:
    """One (image, view) per sample and epoch, drawn by a seeded generator: deterministic."""

    def __init__(self, F, y, w, batch_size: int, seed: int):
        import keras

        rng = np.random.default_rng(seed)
        n, views = len(F), F.shape[1]

        def draw():
            v = rng.integers(0, views, n)
            order = rng.permutation(n)
            return F[order, v[order]], y[order], w[order]

        class Data(keras.utils.PyDataset):
            def __init__(self):
                super().__init__()
                self._arrays = draw()

            def __len__(self):
                return math.ceil(n / batch_size)

            def __getitem__(self, i):
                f, yy, ww = (a[i * batch_size:(i + 1) * batch_size] for a in self._arrays)
                return f.astype(np.float32), yy, ww

            def on_epoch_end(self):
                self._arrays = draw()

        self.data = Data()
        self.steps = math.ceil(n / batch_size)


def _compile(clf: Lite0Classifier, learning_rate: float, decay_steps: int) -> None:
    """Phase 2: the head and the upper blocks, cosine decay from --lr x TUNE_LR_FACTOR."""
    import keras

    clf.set_tuning(True)
    lr = keras.optimizers.schedules.CosineDecay(learning_rate * TUNE_LR_FACTOR,
                                                decay_steps=max(1, decay_steps), alpha=0.05)
    clf.train_model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy")


def fit_lite0(clf: Lite0Classifier, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray,
              tr_i: np.ndarray, va_i: np.ndarray, *, epochs: int, batch_size: int,
              learning_rate: float, patience: int, seed: int, verbose: bool, flips: bool,
              good_idx: int, folds: list[np.ndarray] | None = None, fold_seconds: float = 0.0,
              score_views: int = 1) -> FitResult:
    """Fit clf on tr_i (best epoch by validation on va_i), then, with folds (disjoint parts of
    tr_i), refit from the same start once per fold without it, for the best epoch's count of
    epochs, and score the fold: out-of-fold scores, while fold_seconds allow. clf ends with
    the weights fitted on tr_i."""
    t0 = time.perf_counter()
    views = VIEWS_CACHED if flips else 1
    start = clf.train_model.get_weights()
    run = FrozenRunner(clf, X.shape[2:])
    F_tr, P_tr = cache_features(run, X[tr_i], views, jitter_seed=seed)
    F_va = cache_features(run, X[va_i], 1)[0][:, 0]
    cache_s = time.perf_counter() - t0
    log.info("Lite0 blocks 0-%d (frozen, ImageNet) cached for %d training images x %d view(s) "
             "and %d validation images: %.0f MB, %.0fs", clf.tuned_from - 1, len(tr_i), views, len(va_i),
             (F_tr.nbytes + F_va.nbytes) / 1e6, cache_s)
    yt, wt = y[tr_i].astype(np.int32), sample_weight[tr_i].astype(np.float32)
    ds_va = [(F_va[s:s + 32].astype(np.float32), y[va_i][s:s + 32], sample_weight[va_i][s:s + 32])
             for s in range(0, len(va_i), 32)]

    # Phase 1, the frozen warm-up: a softmax on the frozen ImageNet features, fitted in closed
    # form (full-batch, seconds) so that fine-tuning starts from a good head instead of a
    # random one whose gradients would wreck the pretrained blocks in the first steps.
    warm = warm_start(clf, P_tr, yt, wt)
    warm["val_auc"] = _auc(clf, F_va, y[va_i], good_idx)
    log.info("warm-up: softmax on frozen features, validation AUC %.4f  [%.0fs]", warm["val_auc"],
             warm["seconds"])
    ep = _Epochs(F_tr, yt, wt, batch_size, seed)
    _compile(clf, learning_rate, epochs * ep.steps)
    prog = Progress(epochs, verbose, ds_va, good_idx, None, patience, ema_decay=_decay(ep.steps),
                    keep_last=KEEP_LAST)
    tf0 = time.perf_counter()
    clf.train_model.fit(ep.data, epochs=epochs, callbacks=[prog.callback], verbose=0)
    epoch_s = (time.perf_counter() - tf0) / max(1, prog.epochs_run)
    oof = None
    if folds:
        oof = _out_of_fold(clf, run, X, y, sample_weight, tr_i, va_i, F_tr, P_tr, start,
                           folds=folds, epochs=epochs, best_epoch=max(1, prog.best_epoch),
                           epoch_seconds=epoch_s, budget=fold_seconds, batch_size=batch_size,
                           learning_rate=learning_rate, seed=seed, flips=flips,
                           score_views=score_views, good_idx=good_idx)
    return FitResult(prog, time.perf_counter() - t0, cache_s, warm, oof)


def _out_of_fold(clf, run, X, y, sample_weight, tr_i, va_i, F_tr, P_tr, start, *, folds, epochs,
                 best_epoch, epoch_seconds, budget, batch_size, learning_rate, seed, flips,
                 score_views, good_idx) -> OutOfFold:
    """Refit from `start` without each fold, exactly as the exported model was fitted but for
    a fixed best_epoch epochs (no model selection on the fold it then scores), and score the
    fold as the bundle would: every mirror view of every tile, unjittered."""
    t0 = time.perf_counter()
    views = VIEWS_CACHED if flips else 1
    final = clf.train_model.get_weights()
    # what the folds need beyond the exported model's cache: validation as training views
    F_vj, P_vj = cache_features(run, X[va_i], views, jitter_seed=seed + 1)
    pos = {int(i): k for k, i in enumerate(tr_i)}
    each = epoch_seconds * best_epoch * (len(tr_i) - len(tr_i) / max(1, len(folds)) + len(va_i)) / len(tr_i)
    log.info("out-of-fold threshold: %d refits of %d epochs, ~%.0fs each (about %.0fs in all; time "
             "box %.0fs)", len(folds), best_epoch, each, each * len(folds) + time.perf_counter() - t0,
             budget)
    index, probs, done, note = [], [], 0, ""
    for f, held in enumerate(folds):
        rows = np.array([pos[int(i)] for i in held])
        keep = np.setdiff1d(np.arange(len(tr_i)), rows)
        n_fit = len(keep) + len(va_i)
        # cost: the exported model's epoch time scaled to this fold's images, plus its share
        # of scoring (views x tiles per held image through the frozen blocks)
        est = epoch_seconds * best_epoch * n_fit / len(tr_i) + 0.05 * len(held) * score_views
        spent = time.perf_counter() - t0
        if spent + est > budget:
            note = (f"time box: {done} of {len(folds)} folds in {spent:.0f}s, the next needs ~{est:.0f}s "
                    f"of the {budget:.0f}s allowed (--fold-seconds)")
            break
        tf0 = time.perf_counter()
        Ff = np.concatenate([F_tr[keep], F_vj])
        Pf = np.concatenate([P_tr[keep], P_vj])
        yf = np.concatenate([y[tr_i][keep], y[va_i]]).astype(np.int32)
        wf = np.concatenate([sample_weight[tr_i][keep], sample_weight[va_i]]).astype(np.float32)
        refit(clf, start, Ff, Pf, yf, wf, epochs=best_epoch, schedule_epochs=epochs,
              batch_size=batch_size, learning_rate=learning_rate, seed=seed + 1 + f)
        del Ff, Pf
        Fh = cache_features(run, X[held], score_views)[0]        # (n, V, T, h, w, C)
        n, V, T = Fh.shape[:3]
        flat = Fh.transpose(0, 2, 1, 3, 4, 5).reshape((n * T * V,) + Fh.shape[3:])
        p = clf.tile_model.predict(flat.astype(np.float32), batch_size=64, verbose=0)
        index.append(held)
        probs.append(p.reshape(n, T * V, -1))
        done += 1
        log.info("out-of-fold %d/%d: fitted on %d images for %d epochs, scored %d  [%.0fs]",
                 f + 1, len(folds), n_fit, best_epoch, len(held), time.perf_counter() - tf0)
    clf.train_model.set_weights(final)
    K = clf.train_model.output_shape[-1]
    return OutOfFold(index=np.concatenate(index) if index else np.zeros(0, int),
                     probs=np.concatenate(probs) if probs else np.zeros((0, 1, K), np.float32),
                     folds=done, planned=len(folds), seconds=round(time.perf_counter() - t0, 1),
                     note=note)


def refit(clf: Lite0Classifier, start, F, P, y, w, *, epochs: int, schedule_epochs: int,
          batch_size: int, learning_rate: float, seed: int) -> None:
    """Fit clf from the weights `start` on cached features F / pooled P for a fixed count of
    epochs, no model selection: the warm-up, then fine-tuning on the cosine schedule of
    schedule_epochs, keeping the weight average (what an out-of-fold refit is)."""
    clf.train_model.set_weights(start)
    clf.set_tuning(False)
    warm_start(clf, P, y, w)
    ep = _Epochs(F, y, w, batch_size, seed)
    _compile(clf, learning_rate, schedule_epochs * ep.steps)
    clf.train_model.fit(ep.data, epochs=epochs, callbacks=[_Averaged(_decay(ep.steps))], verbose=0)


def _decay(steps_per_epoch: int) -> float:
    return 1.0 - 1.0 / (AVERAGE_EPOCHS * steps_per_epoch)


class _Averaged:
    """The weight average of convert.monitor.Progress without validation: what a fold model
    keeps after its fixed count of epochs, as the exported model keeps its best epoch's."""

    def __new__(cls, decay: float):
        import keras

        from .monitor import WeightAverage

        class CB(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.avg = WeightAverage(self.model.trainable_weights, decay)

            def on_train_batch_end(self, batch, logs=None):
                self.avg.update()

            def on_train_end(self, logs=None):
                self.avg.swap()

        return CB()


def _auc(clf: Lite0Classifier, F_va, y_va, good_idx: int) -> float:
    from .threshold import roc_auc

    p_va = clf.train_model.predict(F_va.astype(np.float32), verbose=0, batch_size=64)
    return float(roc_auc(1.0 - p_va[:, good_idx], y_va != good_idx))


def warm_start(clf: Lite0Classifier, P_tr, y_tr, w_tr) -> dict:
    """Standardisation and softmax weights from the pooled frozen features of every cached
    view (P_tr: (n, views, tiles, 2560))."""
    t0 = time.perf_counter()
    n, V, T = P_tr.shape[:3]
    P = P_tr.reshape(n * V * T, -1)                                  # (n*V*T, 2 x 1280)
    D = P.shape[1]
    mu, sd = P.mean(0), P.std(0) + 1e-3
    half = D // 2
    for norm, sl in ((clf.norm_max, slice(0, half)), (clf.norm_mean, slice(half, D))):
        norm.set_weights([mu[sl].astype(np.float32), (1.0 / sd[sl]).astype(np.float32)])
    Z = ((P - mu) / sd).astype(np.float32)       # float32 matmuls: half the warm-up time
    # a frame's label is its worst tile's: for T > 1 the defect label goes to every tile here
    # (a start, which fine-tuning's max-over-tiles corrects)
    yy = np.repeat(y_tr, V * T)
    ww = np.repeat(w_tr, V * T)
    W, b = softmax_regression(Z, yy, ww, n_classes=clf.logit_max.units)
    clf.logit_max.set_weights([W[:half].astype(np.float32), b.astype(np.float32)])
    clf.logit_mean.set_weights([W[half:].astype(np.float32)])
    return {"seconds": round(time.perf_counter() - t0, 1), "dims": int(D)}


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
