"""Per-frame cost of an anomaly bundle on ONE core: preprocess, int8 features, memory search.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/anomaly_bench.py BUNDLE [IMAGE_DIR] [--n 200]

numpy's BLAS must be pinned before numpy loads (the env var above; this script sets it too), or
the nearest-neighbour matmul spreads over every core and the figure is not a one-core figure.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.runtime.anomaly import AnomalyEngine, patch_features  # noqa: E402
from agent.bundle import load_bundle  # noqa: E402
from agent.decide import anomaly_probs, defect_score  # noqa: E402
from agent.preprocess import preprocess  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("bundle", type=Path)
    p.add_argument("images", type=Path, nargs="?")
    p.add_argument("--n", type=int, default=200)
    a = p.parse_args()
    b = load_bundle(a.bundle)
    eng = AnomalyEngine.from_bundle(b, threads=1)
    import cv2
    if a.images:
        paths = sorted(q for q in a.images.rglob("*") if q.suffix.lower() in (".png", ".jpg", ".bmp"))
        frames = [cv2.imread(str(q), cv2.IMREAD_UNCHANGED) for q in paths[:a.n]]
    else:
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 255, (b.input.height, b.input.width), np.uint8) for _ in range(a.n)]
    t = {"preprocess": [], "features": [], "search": [], "total": []}
    for _ in range(5):       # warm-up
        eng.invoke(preprocess(frames[0], b.input))
    for f in frames:
        t0 = time.perf_counter()
        px = preprocess(f, b.input)
        t1 = time.perf_counter()
        outs = eng.features(px[0])
        t2 = time.perf_counter()
        pm = eng.scorer.patch_map(patch_features(outs))
        defect_score(anomaly_probs([eng.scorer.raw_score(pm)], eng.memory.scale), b)
        t3 = time.perf_counter()
        for k, v in zip(t, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            t[k].append(1000 * v)
    res = {k: {"mean_ms": float(np.mean(v)), "p95_ms": float(np.percentile(v, 95))} for k, v in t.items()}
    res.update(frames=len(frames), method=eng.memory.method,
               bank=None if eng.memory.bank is None else len(eng.memory.bank),
               memory_mb=b.file("memory.npz").stat().st_size / 1e6,
               model_kb=b.model_path.stat().st_size / 1024)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
