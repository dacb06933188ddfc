"""convert.threshold: the escape-target rule, its table, and the confidence bound on the
escape rate a validation set can show. Pure numbers: no TensorFlow, no model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from convert import threshold as th


def test_select_threshold_known_scores():
    good = [0.01, 0.02, 0.05, 0.10, 0.30]
    defect = [0.20, 0.60, 0.70, 0.80, 0.90, 0.95, 0.97, 0.98, 0.99, 0.999]
    s = np.array(good + defect)
    is_def = np.array([False] * 5 + [True] * 10)
    # 0% escapes: must catch the 0.20 defect; midway to the next lower score (0.10).
    assert th.select_threshold(s, is_def, 0.0) == pytest.approx(0.15)
    # 10% of 10 defects = 1 may escape: the lowest kept defect is 0.60, next below is 0.30
    # -> 0.45.
    assert th.select_threshold(s, is_def, 0.10) == pytest.approx(0.45)
    # 20%: 0.70 / 0.60 -> 0.65: above argmax's 0.5, the escape target alone decides.
    assert th.select_threshold(s, is_def, 0.20) == pytest.approx(0.65)
    # The chosen threshold meets the target on these scores.
    for target in (0.0, 0.1, 0.2, 0.35):
        t = th.select_threshold(s, is_def, target)
        assert np.mean(s[is_def] < t) <= target + 1e-9
    assert th.select_threshold([0.1], [False], 0.01) == 0.5      # no defects: argmax
    # the table: each target's threshold, and the rates it gives on these very scores
    pts = th.operating_points(s, is_def, (0.2, 0.0, 0.1))
    assert [(p["max_escape"], round(p["threshold"], 3)) for p in pts] == [(0.0, 0.15), (0.1, 0.45), (0.2, 0.65)]
    assert [p["escape_rate"] for p in pts] == [0.0, 0.1, 0.2]
    assert [p["false_reject_rate"] for p in pts] == [0.2, 0.0, 0.0]


def test_rate_upper_bound_is_clopper_pearson():
    # none in n: 1 - alpha^(1/n) exactly; the "rule of three" says ~3/n
    assert th.rate_upper_bound(0, 100) == pytest.approx(1 - 0.05 ** (1 / 100))
    assert th.rate_upper_bound(1, 100) == pytest.approx(0.0466, abs=1e-4)   # published tables
    # at the bound, seeing k or fewer has probability alpha
    for k, n in ((1, 100), (5, 250), (30, 1000)):
        p = th.rate_upper_bound(k, n)
        cdf = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))
        assert cdf == pytest.approx(0.05, abs=1e-6) and p > k / n
    assert th.rate_upper_bound(2, 100) > th.rate_upper_bound(1, 100) > th.rate_upper_bound(1, 1000)
    assert th.rate_upper_bound(3, 3) == 1.0 and th.rate_upper_bound(0, 0) == 1.0
    # how many defects, none escaping, show a target: 299 for 1 %, 149 for 2 %
    assert [th.defects_to_show(t) for t in (0.01, 0.02)] == [299, 149]
    assert th.rate_upper_bound(0, 299) <= 0.01 < th.rate_upper_bound(0, 298)
    # no defects seen: nothing is known about escape, and evaluate says so rather than failing
    from convert.evaluate import verdict_metrics
    assert verdict_metrics(["good", "good"], ["good", "defect"], "good", ["good", "defect"])[
        "escape_rate_upper_95"] == 1.0
