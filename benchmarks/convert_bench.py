"""int8 TFLite vs float32 TFLite vs the Keras model called directly: same images, one run.

    python benchmarks/convert_bench.py BUNDLE_DIR DATA_DIR [--keras MODEL.keras] [--n 100]

The TFLite models run through agent.preprocess + agent.runtime.engines (as on the line, batch 1,
2 threads); the Keras model is called as model(x, training=False) one image at a time.
Prints a table and (with --json) one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bundle import load_bundle  # noqa: E402
from agent.decide import decide  # noqa: E402
from agent.runtime.engines import create_engine  # noqa: E402
from agent.preprocess import preprocess  # noqa: E402
from convert.data import read_image, scan_eval  # noqa: E402
from convert.evaluate import verdict_metrics  # noqa: E402


def _time(fn, xs, warm=3):
    for x in xs[:warm]:
        fn(x)
    out, t0 = [], time.perf_counter()
    for x in xs:
        out.append(fn(x))
    return out, (time.perf_counter() - t0) * 1000 / len(xs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--keras", type=Path, default=None)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    b = load_bundle(a.bundle)
    items = scan_eval(a.data).items()
    step = max(1, len(items) // a.n)
    items = items[::step][: a.n]
    truth = [c for _, c in items]
    px = [preprocess(read_image(p), b.input) for p, _ in items]
    rows = {}

    def record(name, probs, ms, size):
        preds = [decide(p, b, b.threshold)[1] for p in probs]
        m = verdict_metrics(truth, preds, b.good_label, b.labels)
        rows[name] = {"ms_per_image": ms, "accuracy": m["accuracy"], "escape_rate": m["escape_rate"],
                      "false_reject_rate": m["false_reject_rate"], "bytes": size}
        return probs

    e8 = create_engine("cpu", b.model_path, b.input, len(b.labels), threads=a.threads)
    p8, ms = _time(e8.invoke, px)
    record("int8 tflite", p8, ms, b.model_path.stat().st_size)
    fpath = b.path / "model_float.tflite"
    if fpath.exists():
        ef = create_engine("cpu", fpath, b.input, len(b.labels), threads=a.threads)
        pf, ms = _time(ef.invoke, px)
        record("float32 tflite", pf, ms, fpath.stat().st_size)
        rows["int8 tflite"]["top1_agreement_vs_float"] = float(np.mean(    # per model run
            np.argmax(np.concatenate(p8), -1) == np.argmax(np.concatenate(pf), -1)))
    if a.keras:
        import keras
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(a.threads)
        model = keras.models.load_model(str(a.keras), compile=False)
        pk, ms = _time(lambda x: model(x.astype(np.float32), training=False).numpy(), px)
        record("keras (direct call)", pk, ms, a.keras.stat().st_size)
    if a.json:
        print(json.dumps({"n": len(px), "models": rows}))
    else:
        print(f"{len(px)} images from {a.data}, bundle {a.bundle}, threshold {b.threshold:.4f}")
        print(f"{'model':<22}{'ms/img':>9}{'acc %':>8}{'escape %':>10}{'FR %':>7}{'kB':>8}")
        for k, r in rows.items():
            print(f"{k:<22}{r['ms_per_image']:>9.2f}{100 * r['accuracy']:>8.1f}"
                  f"{100 * r['escape_rate']:>10.1f}{100 * r['false_reject_rate']:>7.1f}{r['bytes'] / 1024:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
