"""The write stage of `edge-inspect train`: sample.png, bundle.json (what the agent verifies
and loads, with the provenance a plant needs to rebuild it) and the report pictures."""

from __future__ import annotations

import datetime as _dt
import logging
import platform
from pathlib import Path

import cv2
import numpy as np

from agent.bundle import MAP_MODEL, write_manifest

from .calibrate import Choice
from .data import GOOD, fingerprint
from .fit import Fitted
from .options import TrainOptions
from .train_data import TrainingSet

log = logging.getLogger("convert.train")

SAMPLE = "sample.png"


def write_bundle(ts: TrainingSet, fitted: Fitted, choice: Choice, metrics: dict, data_dir: Path,
                 out_dir: Path, opts: TrainOptions) -> None:
    """sample.png, bundle.json (what the agent verifies and loads) and the report."""
    labels, y, tr_i, va_i = ts.labels, ts.y, ts.tr_i, ts.va_i
    # a held-back defect frame if there is one
    hb = ts.held_back()
    truth_h, src_imgs = hb.truth, hb.images
    cands = [i for i, c in enumerate(truth_h) if c != GOOD] or list(range(len(truth_h)))
    sample_img = src_imgs[cands[0]]
    if sample_img.dtype != np.uint8:
        sample_img = cv2.normalize(sample_img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    cv2.imwrite(str(out_dir / SAMPLE), sample_img)

    train_split, test_split = ts.train_split, ts.test_split
    all_paths = [p for p, _ in train_split.items()] + ([p for p, _ in test_split.items()] if test_split else [])
    provenance = {
        "dataset": str(data_dir.resolve()),
        "dataset_fingerprint": fingerprint(all_paths),
        "counts": {"train_folder": train_split.counts(),
                   "test_folder": test_split.counts() if test_split else None,
                   "train": {c: int((y[tr_i] == k).sum()) for k, c in enumerate(labels)},
                   "validation": {c: int((y[va_i] == k).sum()) for k, c in enumerate(labels)},
                   "test": {c: ts.te_cls.count(c) for c in labels} if ts.te_imgs else None},
        "unreadable": {"count": len(ts.tr_bad) + len(ts.te_bad), "files": (ts.tr_bad + ts.te_bad)[:50]},
        "ignored_folders": train_split.ignored_dirs,
        "near_duplicates": ts.dup_report,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "seed": opts.seed,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in
                 {**opts.__dict__, **opts.extra_args}.items() if k != "extra_args"},
        "architecture": fitted.model.name,
        "host": platform.node(),
    }
    # The agent's frame checks (agent.frame_checks) flag frames far from what training saw.
    from agent.frame_checks import image_stats, summarize_stats
    input_stats = summarize_stats(image_stats(ts.tr_imgs[i]) for i in tr_i)
    write_manifest(out_dir, labels=labels, good_label=GOOD, input_spec=ts.bspec,
                   threshold=choice.threshold, metrics=metrics, provenance=provenance,
                   sample=SAMPLE, input_stats=input_stats, extra_files=(MAP_MODEL,))
    sel = choice.held.index
    _write_report(out_dir, fitted.progress.history, choice.scores, [labels[i] for i in y[sel]],
                  [ts.rel(i) for i in sel], [ts.tr_imgs[i] for i in sel], choice.threshold,
                  opts.max_escape, labels, choice.held.where,
                  _gallery_maps(ts, fitted, choice) if fitted.map_model is not None else None,
                  _sources(ts, sel))


def _sources(ts: TrainingSet, sel) -> list[str]:
    """Where each held-out score came from: the exported model on validation, or the refit
    that left the image's fold out (scores.csv, so a policy study can tell them apart)."""
    fold_of = {int(i): f + 1 for f, held in enumerate(ts.folds or []) for i in held}
    va = {int(i) for i in ts.va_i}
    return ["validation" if int(i) in va else f"out-of-fold {fold_of.get(int(i), '?')}" for i in sel]


def _gallery_maps(ts: TrainingSet, fitted: Fitted, choice: Choice) -> list | None:
    """Defect maps of the held-out images the report's galleries show (the others None)."""
    from .report import ScoredSet, gallery_indices

    if ts.spec.n_tiles != 1:
        return None
    sel = choice.held.index
    probe = ScoredSet(choice.scores, [ts.labels[i] for i in ts.y[sel]], [""] * len(sel),
                      [None] * len(sel))
    shown = sorted({int(i) for part in gallery_indices(probe, GOOD) for i in part})
    maps: list = [None] * len(sel)
    if shown:
        mm = fitted.map_model()
        out = mm.predict(ts.X[sel[shown], 0].astype(np.float32), batch_size=16, verbose=0)
        for j, m in zip(shown, out):
            maps[j] = m
    return maps


def _write_report(out_dir, history, scores, truth, files, images, threshold, max_escape, labels,
                  where, maps=None, sources=None):
    """The bundle's pictures (report/index.html) on the held-out scores that set the
    threshold. Not part of the verified files: the agent never reads them."""
    try:
        from .report import ScoredSet, write_report
        page = write_report(out_dir, title=f"edge-inspect train: {out_dir.name} ({where})",
                            history=history, scored=ScoredSet(np.asarray(scores), truth, files, images, maps,
                                             sources),
                            threshold=threshold, max_escape=max_escape, labels=labels, good=GOOD)
        log.info("report: %s", page)
    except ImportError as e:
        log.warning("no report pictures (%s): pip install matplotlib", e)
    except Exception as e:   # noqa: BLE001 - the pictures must never cost the bundle
        log.warning("report pictures failed: %s: %s", type(e).__name__, e)


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
