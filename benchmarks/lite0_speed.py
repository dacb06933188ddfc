"""int8 invoke of the Lite0 classifier graph at given input sizes and output strides, side by
side on one thread, in alternating rounds (this box is shared: compare ratios, not ms).

    python benchmarks/lite0_speed.py                       # 336x288 gray, output stride 32 and 16
    python benchmarks/lite0_speed.py --size 208x176 --size 336x288 --os 32

The head is untrained and calibration uses random images: the timing depends on the graph,
not on the weights. Prints the op list of each model, then ms p50 per view and the ratio to
the first one.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", action="append", help="HxW (default 336x288)")
    ap.add_argument("--os", type=int, nargs="+", default=[32, 16], help="output strides")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    import tempfile

    from agent.commands.bench import time_invoke
    from agent.runtime.engines.litert import interpreter_module
    from convert.export import model_ops, to_tflite
    from convert.lite0 import pretrained_layers
    from convert.model import Lite0Classifier

    rng = np.random.default_rng(0)
    its, tmp = {}, Path(tempfile.mkdtemp())
    for size in a.size or ["336x288"]:
        h, w = (int(v) for v in size.split("x"))
        reps = [rng.integers(0, 255, (1, h, w, 1)).astype(np.float32) for _ in range(8)]
        for os_ in a.os:
            clf = Lite0Classifier(h, w, 1, 6, pretrained_layers(os_))
            p = tmp / f"lite0_{h}x{w}_os{os_}.tflite"
            p.write_bytes(to_tflite(clf.model, (h, w, 1), reps))
            print(f"{h}x{w} os{os_}: {p.stat().st_size} bytes, ops {dict(model_ops(p))}")
            it = interpreter_module().Interpreter(model_path=str(p), num_threads=1)
            it.allocate_tensors()
            d = it.get_input_details()[0]
            it.set_tensor(d["index"], rng.integers(0, 255, d["shape"]).astype(d["dtype"]))
            its[f"{h}x{w} os{os_}"] = it
    t: dict[str, list[float]] = {k: [] for k in its}
    for _ in range(a.rounds):
        for k, it in its.items():       # the input stays set: invoke alone is what is timed
            t[k] += time_invoke(types.SimpleNamespace(invoke=lambda _x, it=it: it.invoke()),
                                None, seconds=0.0, min_runs=10)
    first = float(np.median(next(iter(t.values()))))
    for k, v in t.items():
        print(f"{k}: {np.median(v):.2f} ms p50 a view, {np.median(v) / first:.2f}x the first")
    return 0


if __name__ == "__main__":
    sys.exit(main())
