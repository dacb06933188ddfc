"""The threshold stage of `edge-inspect train`: on held-out scores (the exported model's
validation, and where refits ran, the out-of-fold scores of every other training image),
centre the head on the float threshold before export, then choose the bundle's threshold
on the int8 scores for the escape target, and say what the data can and cannot show."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from .model import centre_head, centred_probs
from .options import TrainOptions
from .threshold import (OPERATING_POINTS, allowed_escapes, defects_to_show, operating_points,
                        rate_upper_bound, rates_at, select_threshold)

log = logging.getLogger("convert.train")

# Above this held-out false-reject rate at the chosen threshold, training warns and names
# the defects that forced the threshold down.
HIGH_FALSE_REJECT = 0.10


@dataclasses.dataclass
class HeldOut:
    """The images the threshold is chosen on: validation first, then out-of-fold."""
    index: np.ndarray
    is_defect: np.ndarray
    oof_probs: np.ndarray | None       # the fold models' (n, tiles x views, K), before centring

    @property
    def where(self) -> str:
        return "out-of-fold" if self.oof_probs is not None else "validation"


@dataclasses.dataclass
class Choice:
    threshold: float
    t_float: float                     # float threshold before centring (maps to 0.5 after)
    head_bias: float
    on: str
    held: HeldOut
    scores: np.ndarray                 # int8 (validation) + centred float (out-of-fold)
    points: list[dict]
    binding: list[dict]                # the lowest-scoring defects, which set the threshold
    rates: dict                        # escape, false reject, n... on the held-out images
    P8_va: np.ndarray                  # the int8 model's validation outputs

    def record(self, opts: TrainOptions, oof, by_views: dict) -> dict:
        """metrics.threshold_selection of bundle.json."""
        return {"max_escape": opts.max_escape, "threshold": self.threshold, "on": self.on,
                "images": self.rates,
                "out_of_fold": None if oof is None else {
                    "folds": oof.folds, "planned": oof.planned, "images": int(len(oof.index)),
                    "seconds": oof.seconds, "note": oof.note},
                "lowest_defects": self.binding, "operating_points": self.points,
                "by_views": by_views, "float_threshold_before_centring": self.t_float,
                "head_bias": self.head_bias}


def held_out(ts, oof) -> HeldOut:
    if oof is not None and oof.folds:
        idx, probs = np.concatenate([ts.va_i, oof.index]), oof.probs
    else:
        idx, probs = ts.va_i, None
    return HeldOut(idx, ts.y[idx] != ts.good_idx, probs)


def centre(ts, scorer, held: HeldOut, opts: TrainOptions) -> tuple[float, float]:
    """Centre the exported head on the operating point: the uint8 output has 1/256 steps, and
    at an uncentred threshold of ~0.95 the frames that matter share ~15 levels (on DeepPCB
    the int8 test AUC was 0.9926 against float 0.9958; centred, they agree)."""
    s = scorer.scores(scorer.keras_probs(ts.X[ts.va_i]))
    if held.oof_probs is not None:
        s = np.concatenate([s, scorer.scores(held.oof_probs)])
    t_float = select_threshold(s, held.is_defect, opts.max_escape)
    head_bias = centre_head(scorer.model, t_float)
    log.info("output centred on the float threshold %.4f (head bias %.3f): it maps to 0.5",
             t_float, head_bias)
    return t_float, head_bias


def choose(ts, scorer, eng8, held: HeldOut, t_float: float, head_bias: float,
           opts: TrainOptions, oof) -> Choice:
    """The bundle's threshold: its own target's row of the table a plant chooses from."""
    P8_va = scorer.run(eng8, ts.X[ts.va_i])
    s = scorer.scores(P8_va)
    on = "validation int8 scores"
    if held.oof_probs is not None:     # the fold models' scores as the centred head gives them
        s = np.concatenate([s, scorer.scores(centred_probs(held.oof_probs, t_float))])
        on += f" and out-of-fold float scores of {oof.folds} refits"
    d = held.is_defect
    points = operating_points(s, d, OPERATING_POINTS + (opts.max_escape,))
    threshold = next(p["threshold"] for p in points if p["max_escape"] == opts.max_escape)
    scorer.dec.threshold = threshold
    # The few lowest-scoring defects set the threshold: name them, so a surprising threshold
    # can be traced to images an engineer can look at (a wrong label, a defect kind the
    # training set barely has).
    dj = np.nonzero(d)[0]
    binding = [{"file": ts.rel(held.index[j]), "score": float(s[j])}
               for j in dj[np.argsort(s[dj])][:allowed_escapes(dj.size, opts.max_escape) + 2]]
    rates = rates_at(s, d, threshold)
    rates.update(n=int(len(s)), n_defect=int(d.sum()),
                 escape_rate_upper_95=rate_upper_bound(int((s[d] < threshold).sum()), int(d.sum())))
    choice = Choice(threshold, t_float, head_bias, on, held, s, points, binding, rates, P8_va)
    _explain(choice, opts, oof)
    return choice


def _explain(c: Choice, opts: TrainOptions, oof) -> None:
    r, where = c.rates, c.held.where
    log.info("threshold %.4f chosen on %s for max escape %.1f%% (%s, %d images: escape %.2f%% of "
             "%d defects, at most %.1f%% at 95%% confidence; false reject %.2f%%)", c.threshold,
             c.on, 100 * opts.max_escape, where, r["n"], 100 * r["escape_rate"], r["n_defect"],
             100 * r["escape_rate_upper_95"], 100 * r["false_reject_rate"])
    if oof is not None and oof.note:
        log.info("out-of-fold: %s", oof.note)
    need = defects_to_show(opts.max_escape)
    if r["n_defect"] < need:
        # Not a warning: most plants start here. It says why the threshold moves when the
        # split or the data changes a little, and what would steady it.
        log.info("%d %s defects cannot show an escape rate of %g%% or less: that takes %d with "
                 "none escaping (more defect images)", r["n_defect"], where,
                 100 * opts.max_escape, need)
    log.info("%s operating points (max escape: threshold, false reject): %s", where, ", ".join(
        f"{100 * p['max_escape']:g}%: {p['threshold']:.3f}, {100 * p['false_reject_rate']:.0f}%"
        for p in c.points))
    lowest = ", ".join(f"{b['file']} ({b['score']:.3f})" for b in c.binding)
    if r["false_reject_rate"] > HIGH_FALSE_REJECT:
        log.warning("the escape target costs %.1f%% false rejects (%s). The lowest-scoring "
                    "defects set the threshold: %s. Check their labels, add more defects like "
                    "them to training, or allow a higher --max-escape.",
                    100 * r["false_reject_rate"], where, lowest)
    else:
        log.info("lowest-scoring held-out defects: %s", lowest)
