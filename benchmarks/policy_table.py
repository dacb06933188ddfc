"""What each escape target would have given on a test set: the threshold policy, judged apart
from the model.

    python benchmarks/policy_table.py BUNDLE DATA_DIR/test [--threads 2] [--json]

The bundle records, for each escape target in convert.threshold.OPERATING_POINTS, the
threshold the trainer's own rule picks on its held-out scores (validation, or out of fold):
`metrics.threshold_selection.operating_points`. This scores the test set once through the
agent's engine and decision rule and reports, per target, accuracy, escape and false reject
at that recorded threshold: what `--max-escape T` would have shipped, without retraining.
(evaluate's own `operating_points` picks thresholds on the test scores themselves: a ceiling
for the model, not what a line gets.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bundle import load_bundle  # noqa: E402
from agent.runtime.engines import create_engine  # noqa: E402
from convert.data import load_split, scan_eval  # noqa: E402
from convert.evaluate import run_engine  # noqa: E402
from convert.threshold import rates_at, roc_auc  # noqa: E402


def policy_rows(bundle_dir: Path, data: Path, threads: int = 2) -> dict:
    b = load_bundle(bundle_dir)
    sel = b.metrics.get("threshold_selection") or {}
    points = sel.get("operating_points") or []
    if not points:
        raise SystemExit(f"{bundle_dir}: bundle.json records no operating points")
    eng = create_engine("cpu", b.model_path, b.input, len(b.labels), threads=threads)
    _, truth, images, _ = load_split(scan_eval(data), "test")
    scores, _, _ = run_engine(eng, b, images)
    is_def = [t != b.good_label for t in truth]
    rows = [{"max_escape": p["max_escape"], "threshold": p["threshold"],
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
    a = p.parse_args(argv)
    r = policy_rows(a.bundle, a.data, a.threads)
    if a.json:
        print(json.dumps(r))
        return 0
    print(f"{r['bundle']}: {r['n']} test images ({r['n_defect']} defects), ROC AUC {r['roc_auc']:.4f}; "
          f"thresholds chosen on {r['on']}")
    print(f"  {'escape target':>13}  {'threshold':>9}  {'accuracy':>8}  {'escape':>7}  {'false reject':>12}")
    for q in r["rows"]:
        mark = "  <- the bundle's" if abs(q["threshold"] - r["bundle_threshold"]) < 1e-9 else ""
        print(f"  {100 * q['max_escape']:>11.1f} %  {q['threshold']:>9.4f}  {100 * q['accuracy']:>6.2f} %"
              f"  {100 * q['escape_rate']:>5.2f} %  {100 * q['false_reject_rate']:>10.2f} %{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
