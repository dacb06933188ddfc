"""Decision thresholds and what validation can say about them. No TensorFlow, so evaluate
(which must run on an edge box) uses these too.

A part is a defect when its score (agent.decide.defect_score) is >= the threshold. The
threshold is chosen for a target escape rate (defects passed as good) on validation scores;
the same rule tabulates other targets, and a confidence bound says how far the figures of a
few hundred images can be trusted.
"""

from __future__ import annotations

import math

import numpy as np

OPERATING_POINTS = (0.005, 0.01, 0.02, 0.03, 0.05)     # escape targets tabulated in the bundle


def roc_auc(scores, positive) -> float:
    """ROC AUC of scores for a boolean truth, ties counted half (Mann-Whitney from average
    ranks: O(n log n), numpy only, since evaluate runs on boxes without scipy); NaN without
    both kinds."""
    s, d = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n1, n0 = int(d.sum()), int((~d).sum())
    if not n1 or not n0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    r = np.empty(s.size)
    r[order] = np.arange(1, s.size + 1)
    _, inv = np.unique(s, return_inverse=True)
    r = (np.bincount(inv, weights=r) / np.bincount(inv))[inv]
    return float((r[d].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def roc_auc_or_none(scores, positive) -> float | None:
    """roc_auc as bundle.json and evaluate --json record it: None (null) without both kinds."""
    auc = roc_auc(scores, positive)
    return None if math.isnan(auc) else auc


def allowed_escapes(n_defects: int, max_escape: float) -> int:
    """How many of n validation defects may score below the threshold: floor(max_escape * n)."""
    return int(math.floor(max_escape * n_defects + 1e-9))


def select_threshold(scores, is_defect, max_escape: float) -> float:
    """The decision threshold (defect if score >= threshold) for a target escape rate.

    Lets at most floor(max_escape * n_defects) validation defects score below it and sits in
    the middle of the gap under the lowest defect score it must catch (a margin for unseen
    parts). It is not capped at 0.5: the escape target alone sets it, so a model that is
    sure of its defects does not reject good parts it merely finds unusual. Without
    validation defects it is 0.5 (argmax).
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_defect = np.asarray(is_defect, dtype=bool)
    d = np.sort(scores[is_defect])
    k = allowed_escapes(d.size, max_escape)
    if d.size == 0 or k >= d.size:
        return 0.5
    t = d[k]
    below = scores[scores < t]
    lower = float(below.max()) if below.size else 0.0
    return float((t + lower) / 2.0)


def operating_points(scores, is_defect, targets=OPERATING_POINTS) -> list[dict]:
    """For each escape target: the threshold select_threshold picks, and the escape and
    false-reject rates there. The bundle records them for validation, so a plant can move
    its operating point (`model.threshold` in the agent's config, or the `threshold` command)
    knowing what it costs, without retraining."""
    points = []
    for target in sorted(set(targets)):
        t = select_threshold(scores, is_defect, target)
        r = rates_at(scores, is_defect, t)
        points.append({"max_escape": target, "threshold": t, "escape_rate": r["escape_rate"],
                       "false_reject_rate": r["false_reject_rate"]})
    return points


def rates_at(scores, is_defect, threshold: float) -> dict:
    """Escape rate, false-reject rate and accuracy of deciding `score >= threshold`."""
    s = np.asarray(scores, dtype=np.float64)
    d = np.asarray(is_defect, dtype=bool)
    return {"escape_rate": float((s[d] < threshold).mean()) if d.any() else 0.0,
            "false_reject_rate": float((s[~d] >= threshold).mean()) if (~d).any() else 0.0,
            "accuracy": float(((s >= threshold) == d).mean()) if s.size else 0.0}


def rate_upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on a rate seen as k events in n trials: the
    largest rate under which k or fewer would still happen with probability 1 - confidence.
    1 escape in 100 validation defects bounds the true escape rate only by 4.7 %; an engineer
    reading "escape 1 %" needs to know that the data cannot say more."""
    if n <= 0 or k >= n:
        return 1.0
    alpha = 1.0 - confidence

    def cdf(p: float) -> float:        # P(X <= k) for X ~ Binomial(n, p), in logs for large n
        lp, lq = math.log(p), math.log1p(-p)
        return sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                            + i * lp + (n - i) * lq) for i in range(k + 1))

    lo, hi = k / n, 1.0
    for _ in range(60):                # cdf falls as p rises: bisect for cdf(p) = alpha
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > alpha else (lo, mid)
    return hi


def defects_to_show(rate: float, confidence: float = 0.95) -> int:
    """How many defects, none escaping, it takes to bound the escape rate by `rate`."""
    return math.ceil(math.log(1.0 - confidence) / math.log1p(-rate)) if 0 < rate < 1 else 0


def parity_verdict(int8_right: list[bool], float_right: list[bool], margin: float) -> dict:
    """Is int8 worse than float by more than `margin` (a fraction of the images), beyond chance?

    Only the images where the two disagree carry evidence. On 189 validation images with the
    threshold in the thick of the good scores, int8 alone wrong on 9 and float alone on 4 is a
    2.6-point drop, and as likely as not a coin's doing (sign test p = 0.13): refusing the model
    for it made the default command fail on one seed in three. So the drop must exceed the margin
    by a one-sided 95 % sign-test band, 1.645 sqrt(discordant) images; a real drop still fails,
    and a negative margin forces the check (tests)."""
    n = len(int8_right)
    worse = sum(f and not i for i, f in zip(int8_right, float_right))
    better = sum(i and not f for i, f in zip(int8_right, float_right))
    band = 1.645 * math.sqrt(worse + better)
    return {"n": n, "int8_only_wrong": worse, "float_only_wrong": better,
            "drop": (worse - better) / max(n, 1), "chance_band": band / max(n, 1),
            "refused": bool(worse - better > margin * n + band)}
