"""What each escape target would have given on a test set: the threshold policy, judged apart
from the model.

    python benchmarks/policy_table.py BUNDLE DATA_DIR/test [--threads 2] [--json]
    python benchmarks/policy_table.py BUNDLE DATA_DIR/test --pools [--json]

The bundle records, for each escape target in convert.threshold.OPERATING_POINTS, the
threshold the trainer's own rule picks on its held-out scores (validation, or out of fold):
`metrics.threshold_selection.operating_points`. This scores the test set once through the
agent's engine and decision rule and reports, per target, accuracy, escape and false reject
at that recorded threshold: what `--max-escape T` would have shipped, without retraining.
(evaluate's own `operating_points` picks thresholds on the test scores themselves: a ceiling
for the model, not what a line gets.)

--pools asks which held-out scores a threshold should rest on: from the bundle's
report/scores.csv (every held-out image with the model that scored it) it picks each target's
threshold by the trainer's rule (convert.threshold.select_threshold) on the validation rows
alone (the exported model's own), on the out-of-fold rows alone (the refits'), and on both
(what the trainer does), and gives the test figures at each: whether the refits, most of a
Lite0 training's time, earn their minutes.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bundle import load_bundle  # noqa: E402
from agent.runtime.engines import create_engine  # noqa: E402
from convert.data import load_split, scan_eval  # noqa: E402
from convert.evaluate import run_engine  # noqa: E402
from convert.threshold import OPERATING_POINTS, rates_at, roc_auc, select_threshold  # noqa: E402

POOL_TARGETS = tuple(sorted(set(OPERATING_POINTS) | {0.03}))


def held_out_pools(scores_csv: Path) -> dict:
    """{pool: (scores, is_defect)} from a bundle's report/scores.csv, by its source column."""
    with scores_csv.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{scores_csv}: no rows")
    pools = {"validation": lambda r: r["source"] == "validation",
             "out-of-fold": lambda r: r["source"].startswith("out-of-fold"),
             "both": lambda r: True}
    out = {}
    for name, keep in pools.items():
        sel = [r for r in rows if keep(r)]
        if sel:
            out[name] = (np.array([float(r["score"]) for r in sel]),
                         np.array([r["defect"] == "1" for r in sel]))
    return out


def pool_rows(pools: dict, test_scores, test_is_def) -> list[dict]:
    rows = []
    for name, (s, d) in pools.items():
        for e in POOL_TARGETS:
            t = select_threshold(s, d, e)
            rows.append({"pool": name, "n": int(len(s)), "n_defect": int(d.sum()), "max_escape": e,
                         "threshold": t, "held_out": rates_at(s, d, t),
                         **rates_at(test_scores, test_is_def, t)})
    return rows


def policy_rows(bundle_dir: Path, data: Path, threads: int = 2, pools: bool = False) -> dict:
    b = load_bundle(bundle_dir)
    sel = b.metrics.get("threshold_selection") or {}
    points = sel.get("operating_points") or []
    if not points and not pools:
        raise SystemExit(f"{bundle_dir}: bundle.json records no operating points")
    held = held_out_pools(bundle_dir / "report" / "scores.csv") if pools else None
    eng = create_engine("cpu", b.model_path, b.input, len(b.labels), threads=threads)
    _, truth, images, _ = load_split(scan_eval(data), "test")
    scores, _, _ = run_engine(eng, b, images)
    is_def = [t != b.good_label for t in truth]
    rows = pool_rows(held, scores, is_def) if pools else [
        {"max_escape": p["max_escape"], "threshold": p["threshold"],
         "held_out_false_reject": p["false_reject_rate"],
         **rates_at(scores, is_def, p["threshold"])} for p in points]
    return {"bundle": str(bundle_dir), "on": sel.get("on"), "bundle_threshold": b.threshold,
            "n": len(truth), "n_defect": int(sum(is_def)), "roc_auc": roc_auc(scores, is_def),
            "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("data", type=Path, help="a test folder: one folder per class")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--pools", action="store_true",
                   help="thresholds re-chosen on the validation, out-of-fold and both pools of report/scores.csv")
    a = p.parse_args(argv)
    r = policy_rows(a.bundle, a.data, a.threads, a.pools)
    if a.json:
        print(json.dumps(r))
        return 0
    head = f"{r['bundle']}: {r['n']} test images ({r['n_defect']} defects), ROC AUC {r['roc_auc']:.4f}"
    if a.pools:
        print(head)
        print(f"  {'pool':>11}  {'images':>11}  {'target':>6}  {'threshold':>9}  {'held-out FR':>11}  "
              f"{'accuracy':>8}  {'escape':>7}  {'false reject':>12}")
        for q in r["rows"]:
            print(f"  {q['pool']:>11}  {q['n']:>5} ({q['n_defect']:>3})  {100 * q['max_escape']:>4.1f} %"
                  f"  {q['threshold']:>9.4f}  {100 * q['held_out']['false_reject_rate']:>9.1f} %"
                  f"  {100 * q['accuracy']:>6.2f} %  {100 * q['escape_rate']:>5.2f} %"
                  f"  {100 * q['false_reject_rate']:>10.2f} %")
        return 0
    print(f"{head}; thresholds chosen on {r['on']}")
    print(f"  {'escape target':>13}  {'threshold':>9}  {'accuracy':>8}  {'escape':>7}  {'false reject':>12}")
    for q in r["rows"]:
        mark = "  <- the bundle's" if abs(q["threshold"] - r["bundle_threshold"]) < 1e-9 else ""
        print(f"  {100 * q['max_escape']:>11.1f} %  {q['threshold']:>9.4f}  {100 * q['accuracy']:>6.2f} %"
              f"  {100 * q['escape_rate']:>5.2f} %  {100 * q['false_reject_rate']:>10.2f} %{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
