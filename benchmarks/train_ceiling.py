"""Worst-case training time of the defaults: every epoch runs (early stopping switched off).

    python -c "from convert.synthetic import make_synthetic_dataset as m; m('/tmp/syn1000', 500, 300, seed=12)"
    python benchmarks/train_ceiling.py /tmp/syn1000 /tmp/b_ceiling

Data that the model separates early stops after a few epochs (176 s for the set above); data
that never separates runs them all. This forces the latter on any data set.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import convert.monitor as monitor  # noqa: E402
import convert.train as tr  # noqa: E402


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    monitor.CONVERGED = -1.0          # never "validation separated"
    t = time.perf_counter()
    res = tr.train_bundle(Path(sys.argv[1]), Path(sys.argv[2]),
                          tr.TrainOptions(patience=10 ** 6, keep_float=False))
    m = res["metrics"]
    print(f"{m['epochs_run']} epochs, fit {m['train_seconds']:.0f} s, total "
          f"{time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
