"""The fit stage of `edge-inspect train`: pick the backbone and fit it on the prepared
training set (convert.train_data.TrainingSet). The pretrained Lite0 fine-tunes on cached
features (convert.finetune); the from-scratch FCN trains on frames or crops here."""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np

from agent.preprocess import InputSpec

from .crops import (BOX_CENTRED, SCALE_JITTER, STRUCTURE_CENTRED, augmenter, crop_sampler,
                    crop_side, defect_masks, mark_structure, n_crops)
from .data import GOOD, DataError
from .monitor import Progress
from .options import TrainOptions

log = logging.getLogger("convert.train")

EPOCHS_CROPS, EPOCHS_WHOLE = 20, 12
EPOCHS_LITE0 = 15           # fine-tuning epochs after the warm-up (cached features: cheap)


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
    defect is boxed. Returns (exported tile model, Progress, fit seconds, map model factory)."""
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
    return tile_model, prog, fit_s, lambda: scratch_map_model(train_model, tile_model, spec)


def scratch_map_model(train_model, tile_model, spec: InputSpec):
    """pixels -> (h, w) defect map in [0, 1] of the from-scratch FCN: its own stride-16 map
    (the cells whose max the verdict is), the likeliest defect class's, through the head's
    centring bias so that 0.5 sits at the bundle's operating point as the frame score does."""
    import keras
    from keras import layers, ops

    shift = tile_model.get_layer("probs").get_weights()[1][1:].astype(np.float32)
    inp = keras.Input((spec.height, spec.width, spec.channels), name="pixels")
    z = train_model(inp)["defect_map"]
    m = layers.Lambda(lambda t: ops.sigmoid(ops.max(t + shift, axis=-1)), name="defect_map")(z)
    return keras.Model(inp, m, name="edge_inspect_fcn_map")


BACKBONES = ("auto", "lite0", "scratch")


def choose_backbone(requested: str, crop_training: bool) -> tuple[str, str]:
    """(backbone, why). auto: the from-scratch FCN where every defect image has boxes or
    masks (it trains on crops with every cell known, and holds 97.8 % on DeepPCB, where Lite0
    from the labels gave 96.6 % in 4x the training time), the pretrained Lite0 where the data
    has image labels only (the from-scratch net barely learns from labels alone: 29 % on
    magnetic tiles)."""
    if requested != "auto":
        return requested, "asked for"
    if crop_training:
        return "scratch", "every defect image has boxes or masks: crop training of the from-scratch FCN"
    return "lite0", "defects carry image labels only: pretrained EfficientNet-Lite0, fine-tuned"


@dataclasses.dataclass
class Fitted:
    model: object                      # the exported (static-shape) Keras model, one tile in
    progress: Progress
    seconds: float
    report: dict                       # the backbone chosen and why (bundle.json)
    oof: object | None = None          # convert.finetune.OutOfFold
    map_model: object | None = None    # () -> Keras pixels -> defect map, after centring


def fit_backbone(ts, opts: TrainOptions) -> Fitted:
    """Seed, pick the backbone and fit it on ts (convert.train_data.TrainingSet)."""
    import tensorflow as tf
    import keras

    from .monitor import left_chance

    # Same data and seed, same model: a plant can rebuild a bundle, and trainer changes can be
    # compared on one split without run-to-run noise (up to 5 points of DeepPCB accuracy
    # while the parallel augmentation drew random numbers in whatever order its threads ran).
    keras.utils.set_random_seed(opts.seed)
    tf.config.experimental.enable_op_determinism()
    spec = ts.spec
    crop_training = bool(opts.crops and ts.boxed and spec.n_tiles == 1 and crop_side(spec))
    backbone, why = choose_backbone(opts.backbone, crop_training)
    log.info("backbone: %s (%s)", backbone, why)
    report = {"requested": opts.backbone, "chosen": backbone, "reason": why}
    if backbone == "scratch":
        # no refits: a from-scratch fit takes minutes, and boxed data (what auto gives it)
        # validates on every cell of every frame, a steadier base than labels alone
        model, prog, secs, map_model = _fit_scratch(spec, ts.labels, opts, ts.X, ts.y, ts.tr_i,
                                                    ts.va_i, ts.tr_boxes, ts.tr_cls, ts.tr_imgs)
        # one tile a frame: with tiles the map would need the tile's place in the frame
        fitted = Fitted(model, prog, secs, report, None, map_model if spec.n_tiles == 1 else None)
    else:
        fitted = _fit_lite0(ts, opts, report)
    prog = fitted.progress
    log.info("trained %d epochs in %.0fs; best validation AUC %.4f (loss %.4f) at epoch %d "
             "(weights restored)", prog.epochs_run, fitted.seconds, prog.best_auc, prog.best_loss,
             prog.best_epoch)
    if not left_chance(prog.best_auc):
        log.warning("validation AUC %.3f: the model has not learnt to tell defect from good "
                    "(0.5 is chance). More --epochs, more defect images, defect boxes "
                    "(annotations/) or a larger --input-size may help; at the escape target "
                    "this model rejects most good parts", prog.best_auc)
    return fitted


def _fit_lite0(ts, opts: TrainOptions, report: dict) -> Fitted:
    from .finetune import fit_lite0
    from .lite0 import pretrained_layers
    from .model import LITE0_OUTPUT_STRIDE, Lite0Classifier

    spec, labels = ts.spec, ts.labels
    clf = Lite0Classifier(spec.height, spec.width, spec.channels, len(labels),
                          pretrained_layers(LITE0_OUTPUT_STRIDE),
                          n_tiles=spec.n_tiles, good_idx=ts.good_idx)
    if opts.weights:
        try:
            clf.model.load_weights(str(opts.weights))
        except Exception as e:   # noqa: BLE001 - any load failure is a user error here
            raise DataError(f"cannot load --weights {opts.weights}: {e}") from None
    epochs = opts.epochs or EPOCHS_LITE0
    log.info("training: a softmax on frozen features (warm-up), then up to %d fine-tuning epochs "
             "of Lite0 blocks %d-15, its head conv and the softmax (best and early stopping by "
             "validation AUC; patience %d)", epochs, clf.tuned_from, opts.patience)
    res = fit_lite0(clf, ts.X, ts.y, balanced_weights(ts.y, ts.tr_i, len(labels)), ts.tr_i, ts.va_i,
                    epochs=epochs, batch_size=opts.batch_size, learning_rate=opts.learning_rate,
                    patience=opts.patience, seed=opts.seed, verbose=opts.verbose,
                    flips=opts.flips, good_idx=ts.good_idx, folds=ts.folds,
                    fold_seconds=opts.fold_seconds, score_views=ts.views)
    report.update(cache_seconds=round(res.cache_seconds, 1), warmup=res.warmup)
    clf.fold_standardisation()
    return Fitted(clf.model, res.progress, res.seconds, report, res.oof, clf.map_model)
