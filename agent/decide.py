"""The decision rule shared by convert (evaluation) and the agent (the line).

`defect_score(probs, bundle) -> (score, label)`: a tile's probabilities are the mean over its
views (agent.preprocess); score = 1 - P(good), the max over tiles, so one bad tile makes a bad
part; label = the most probable defect label in that worst tile.
A part is rejected when score >= threshold; a passed part is reported with the bundle's
good label.
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
    worst = int(np.argmax(scores))
    score = float(min(1.0, max(0.0, scores[worst])))
    defects = bundle.defect_indices
    row = p[worst]
    best = max(defects, key=lambda i: row[i])
    return score, bundle.labels[best]


def anomaly_probs(raw_scores, scale: float) -> np.ndarray:
    """An anomaly bundle's raw image scores (max of the patch distance map, unbounded) as
    (N, 2) [P(good), score] rows, score = raw / (raw + scale): monotone, so its AUROC is the
    raw score's, and in [0, 1] like a classifier's, so defect_score and the threshold rule
    above judge both kinds. `scale` is the raw score at the calibrated false-reject target,
    so the trained threshold is 0.5 and a plant may move it like any other."""
    r = np.maximum(np.asarray(raw_scores, dtype=np.float64), 0.0)
    s = r / (r + float(scale))
    return np.stack([1.0 - s, s], axis=-1).astype(np.float32)
