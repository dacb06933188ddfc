"""One variant of the Lite0 classifier's training recipe on a train/ + test/ data set: the
ranking it gives, fast (no out-of-fold refits, no export), so recipes compare side by side.

    python benchmarks/lite0_variants.py base 0 ../shared/datasets/magnetic-tile
    python benchmarks/lite0_variants.py tuned_from=11 0 ../shared/datasets/magnetic-tile
    python benchmarks/lite0_variants.py epochs=15,scale=1.5 1 ../shared/datasets/magnetic-tile

VARIANT is `base` or comma-separated key=value changes to the defaults:
  epochs=N         fine-tuning epochs (the default is convert.fit.EPOCHS_LITE0)
  tuned_from=B     first fine-tuned Lite0 block (default convert.model.LITE0_TUNED_FROM)
  scale=F          input side x F against the auto size (more pixels per defect)
  good_weight=F    good's total loss weight = F x all defect classes' (default: balanced)
  average=E        window of the validated weight average in epochs (default
                   convert.finetune.AVERAGE_EPOCHS)
  last=1           export the last epoch's weight average, no best-epoch selection (and no
                   early stop): convert.finetune.KEEP_LAST
  os=16            output stride 16: Lite0's stride-32 blocks run at stride 16, dilated
                   (convert.model.LITE0_OUTPUT_STRIDE): four times the cells
  lr_factor=F      fine-tuning rate = --lr x F (default convert.finetune.TUNE_LR_FACTOR)
  margin=F         reflect-pad every image by F x its side on each edge before preprocessing
                   (train and test alike): more cells around a defect at the border
  full=1           after the fit, refit from the same start on training AND validation
                   images for the best epoch's count (as the out-of-fold refits do) and
                   report that model's test figures too, under "full_*": the pair is one run;
                   full=2: the same, its cosine schedule compressed to the best epoch's count
                   (the rate anneals to its floor by the refit's last epoch)
  members=N        fit N models on the same split (the seed's, then seeds +1000, +2000...:
                   another jitter, draw order and dropout) and report each one's test
                   figures ("mK_*") and the first K+1 members' ensemble's (probabilities averaged,
                   "ensK+1_*");
                   the members' test probabilities go to /tmp/ens_SEED.npz

Prints one JSON line: validation AUC (what the trainer selects on), test ROC AUC of the float
model over the bundle's 4 mirror views, and the test false-reject rate at the best test
threshold for 1/2/3/5 % escape (the ranking's cost, apart from any threshold policy). Seeded
and deterministic like `edge-inspect train` (convert.fit.fit_backbone). Accuracy at the
bundle's own threshold needs the whole trainer: `edge-inspect train` + `evaluate --json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import convert.finetune as FT  # noqa: E402
import convert.fit as FIT  # noqa: E402
import convert.model as M  # noqa: E402
from convert.data import load_split, scan_dataset  # noqa: E402
from convert.threshold import roc_auc  # noqa: E402
from convert.options import TrainOptions  # noqa: E402
import convert.train_data as TD  # noqa: E402
from convert.train_data import load_training_set  # noqa: E402


def weights_with_good(f: float):
    def weights(y, tr_i, n_labels):
        cw = len(tr_i) / (n_labels * np.maximum(np.bincount(y[tr_i], minlength=n_labels), 1.0))
        cw[0] *= f * (n_labels - 1)                 # good is label 0 (convert.train_data)
        cw *= len(tr_i) / cw[y[tr_i]].sum()
        return cw[y].astype(np.float32)
    return weights


def with_margin(f: float):
    import cv2
    prepare = TD.prepare

    def padded(imgs, spec):
        out = []
        for im in imgs:
            dy, dx = int(round(im.shape[0] * f)), int(round(im.shape[1] * f))
            out.append(cv2.copyMakeBorder(im, dy, dy, dx, dx, cv2.BORDER_REFLECT_101))
        return prepare(out, spec)
    return padded


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    variant, seed, data = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    opts = TrainOptions(seed=seed, folds=0)
    epochs, tuned_from, scale, full, members = FIT.EPOCHS_LITE0, M.LITE0_TUNED_FROM, None, 0, 1
    weights = FIT.balanced_weights
    for part in filter(None, variant.replace("base", "").split(",")):
        k, _, v = part.partition("=")
        if k == "epochs":
            epochs = int(v)
        elif k == "tuned_from":
            tuned_from = int(v)
        elif k == "scale":
            scale = float(v)
        elif k == "good_weight":
            weights = weights_with_good(float(v))
        elif k == "margin":
            TD.prepare = with_margin(float(v))
        elif k == "members":
            members = int(v)
        elif k == "full":
            full = int(v)
        elif k == "average":
            FT.AVERAGE_EPOCHS = float(v)
        elif k == "last":
            FT.KEEP_LAST = bool(int(v))
        elif k == "os":
            M.LITE0_OUTPUT_STRIDE = int(v)
        elif k == "lr_factor":
            FT.TUNE_LR_FACTOR = float(v)
        else:
            raise SystemExit(f"unknown variant key {k!r}")
    import keras
    import tensorflow as tf

    t0 = time.perf_counter()
    ts = load_training_set(data / "train", opts)
    if scale:
        w, h = (int(round(s * scale / 16) * 16) for s in (ts.spec.width, ts.spec.height))
        ts = load_training_set(data / "train", dataclasses.replace(opts, input_size=(w, h)))
    spec = ts.spec
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    from convert.lite0 import pretrained_layers
    clf = M.Lite0Classifier(spec.height, spec.width, spec.channels, len(ts.labels),
                            pretrained_layers(M.LITE0_OUTPUT_STRIDE),
                            n_tiles=spec.n_tiles, good_idx=ts.good_idx, tuned_from=tuned_from)
    start = clf.train_model.get_weights()
    w_all = weights(ts.y, ts.tr_i, len(ts.labels))
    res = FT.fit_lite0(clf, ts.X, ts.y, w_all, ts.tr_i, ts.va_i,
                       epochs=epochs, batch_size=opts.batch_size, learning_rate=opts.learning_rate,
                       patience=opts.patience, seed=seed, verbose=False, flips=True,
                       good_idx=ts.good_idx)
    fit_s = time.perf_counter() - t0
    _, te_cls, te_imgs, _ = load_split(scan_dataset(data / "test")[0], "test")
    X = TD.prepare(te_imgs, spec)
    run = FT.FrozenRunner(clf, X.shape[2:])
    F = FT.cache_features(run, X, FT.VIEWS_CACHED)[0]
    n, V, T = F.shape[:3]
    F = F.reshape((n * V * T,) + F.shape[3:]).astype(np.float32)
    d = np.array([c != "good" for c in te_cls])
    out = {"variant": variant, "seed": seed, "size": [spec.width, spec.height],
           "val_auc": round(res.progress.best_auc, 4), "best_epoch": res.progress.best_epoch,
           "fit_s": round(fit_s)}

    def test_figures(prefix, p=None):
        if p is None:
            p = clf.tile_model.predict(F, batch_size=64, verbose=0).reshape(n, V, T, -1)
        raw = p
        p = p.mean(1)
        s = (1.0 - p[..., ts.good_idx]).max(1)      # agent.decide: mean over views, worst tile
        out[f"{prefix}test_auc"] = round(roc_auc(s, d), 4)
        sd, sg = np.sort(s[d]), s[~d]
        for e in (0.01, 0.02, 0.03, 0.05):
            thr = sd[int(np.floor(e * d.sum()))]   # at most that share of defects below it
            out[f"{prefix}test_fr_at_{e:g}_escape"] = round(float((sg >= thr).mean()), 4)
        return raw

    P, W = [test_figures("")], [clf.train_model.get_weights()]
    for m in range(1, members):
        keras.utils.set_random_seed(seed + 1000 * m)
        clf.train_model.set_weights(start)
        clf.set_tuning(False)
        r = FT.fit_lite0(clf, ts.X, ts.y, w_all, ts.tr_i, ts.va_i, epochs=epochs,
                         batch_size=opts.batch_size, learning_rate=opts.learning_rate,
                         patience=opts.patience, seed=seed + 1000 * m, verbose=False, flips=True,
                         good_idx=ts.good_idx)
        out[f"m{m}_val_auc"] = round(r.progress.best_auc, 4)
        out[f"m{m}_best_epoch"] = r.progress.best_epoch
        P.append(test_figures(f"m{m}_"))
        test_figures(f"ens{m + 1}_", np.mean(P, axis=0))
        W.append(clf.train_model.get_weights())
        clf.train_model.set_weights([np.mean(ws, axis=0) for ws in zip(*W)])
        test_figures(f"soup{m + 1}_")       # one model: the members' weights averaged
    if members > 1:
        np.savez(f"/tmp/ens_{seed}.npz", probs=np.array(P), defect=d, good_idx=ts.good_idx)
    if full:
        # the out-of-fold refit (convert.finetune.refit) with nothing held out
        tf0 = time.perf_counter()
        F_tr, P_tr = FT.cache_features(run, ts.X[ts.tr_i], FT.VIEWS_CACHED, jitter_seed=seed)
        F_vj, P_vj = FT.cache_features(run, ts.X[ts.va_i], FT.VIEWS_CACHED, jitter_seed=seed + 1)
        idx = np.concatenate([ts.tr_i, ts.va_i])
        n_ep = max(1, res.progress.best_epoch)
        FT.refit(clf, start, np.concatenate([F_tr, F_vj]), np.concatenate([P_tr, P_vj]),
                 ts.y[idx].astype(np.int32), w_all[idx].astype(np.float32), epochs=n_ep,
                 schedule_epochs=n_ep if full == 2 else epochs, batch_size=opts.batch_size,
                 learning_rate=opts.learning_rate, seed=seed + 1)
        out["full_fit_s"] = round(time.perf_counter() - tf0)
        test_figures("full_")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
