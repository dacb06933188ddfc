"""The ONNX path against LiteRT on a labelled test set: per-image verdicts and scores of the
int8 ONNX (onnx-cpu) beside the int8 TFLite (cpu), the per-input parity convert-bundle
measured at export (bundle.json metrics.onnx), and the invoke time of each.

    python benchmarks/onnx_bench.py BUNDLE DATA_DIR [--engine onnx-cpu] [--json]

BUNDLE must carry model.onnx (convert-bundle BUNDLE --data DATA_DIR). Figures:
benchmarks/README.md, "ONNX".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bundle import load_bundle  # noqa: E402
from agent.runtime.engines import create_engine  # noqa: E402
from convert.data import load_split, scan_eval  # noqa: E402
from convert.evaluate import run_engine  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("data", type=Path, help="class folders, or a folder holding test/")
    p.add_argument("--engine", default="onnx-cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    b = load_bundle(a.bundle)
    _, truth, images, _ = load_split(scan_eval(a.data), "evaluation")
    n = len(b.labels)
    res = {}
    for name in ("cpu", a.engine):
        eng = create_engine(name, b.model_path, b.input, n, threads=a.threads)
        scores, preds, ms = run_engine(eng, b, images)
        res[name] = {"scores": np.array(scores), "preds": preds, "ms_per_image": round(ms, 2),
                     "engine": eng.describe()}
    c, o = res["cpu"], res[a.engine]
    good = b.good_label
    out = {
        "bundle": str(b.path), "data": str(a.data), "images": len(images), "engine": o["engine"],
        "verdict_agreement": float(np.mean([(x == good) == (y == good) for x, y in zip(c["preds"], o["preds"])])),
        "label_agreement": float(np.mean([x == y for x, y in zip(c["preds"], o["preds"])])),
        "max_score_diff": float(np.abs(c["scores"] - o["scores"]).max()),
        "accuracy_tflite": float(np.mean([(x == good) == (t == good) for x, t in zip(c["preds"], truth)])),
        "accuracy_onnx": float(np.mean([(x == good) == (t == good) for x, t in zip(o["preds"], truth)])),
        "ms_per_image_tflite": c["ms_per_image"], "ms_per_image_onnx": o["ms_per_image"],
        "export": {k: v for k, v in (b.metrics.get("onnx") or {}).items()
                   if k in ("int8_from", "tensorrt_int8", "parity", "int8_routes_tried", "opset")},
    }
    if a.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
