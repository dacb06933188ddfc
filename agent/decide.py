"""The decision rule shared by convert (evaluation) and the agent (the line).

`defect_score(probs, bundle) -> (score, label)`: a tile's probabilities are the mean over its
views (agent.preprocess); score = 1 - P(good), the max over tiles, so one bad tile makes a bad
part; label = the most probable defect label in that worst tile.
`decide(probs, bundle, threshold) -> (score, label)`: the rule itself. A part is rejected
when score >= threshold (label: that defect label); a passed part gets the bundle's good label.
The line (agent.runtime.inspector), evaluation, the trainer's scoring and the ONNX parity check
all decide through it, so what they report is what the line does.
A model output that is not finite cannot be judged: ValueError (the line makes it FAILSAFE),
never a score, since clamping NaN gave 0.0, a pass.
"""

from __future__ import annotations

import numpy as np


def defect_score(probs: np.ndarray, bundle) -> tuple[float, str]:
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim == 1:
        p = p[None, :]
    views = bundle.input.views
    if views > 1:
        p = p.reshape(-1, views, p.shape[-1]).mean(axis=1)
    good = bundle.labels.index(bundle.good_label)
    scores = 1.0 - p[:, good]
    if not np.isfinite(p).all():
        raise ValueError("model output is not finite (NaN or inf): the part cannot be judged")
    worst = int(np.argmax(scores))
    score = float(min(1.0, max(0.0, scores[worst])))
    defects = bundle.defect_indices
    row = p[worst]
    best = max(defects, key=lambda i: row[i])
    return score, bundle.labels[best]


def decide(probs: np.ndarray, bundle, threshold: float) -> tuple[float, str]:
    score, label = defect_score(probs, bundle)
    return score, (label if score >= threshold else bundle.good_label)


def anomaly_probs(raw_scores, scale: float) -> np.ndarray:
    """An anomaly bundle's raw image scores (max of the patch distance map, unbounded) as
    (N, 2) [P(good), score] rows, score = raw / (raw + scale): monotone, so its AUROC is the
    raw score's, and in [0, 1] like a classifier's, so defect_score and the threshold rule
    above judge both kinds. `scale` is the raw score at the calibrated false-reject target,
    so the trained threshold is 0.5 and a plant may move it like any other."""
    r = np.maximum(np.asarray(raw_scores, dtype=np.float64), 0.0)
    s = r / (r + float(scale))
    return np.stack([1.0 - s, s], axis=-1).astype(np.float32)
