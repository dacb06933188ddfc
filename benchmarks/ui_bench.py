"""The operator page's price (not a test): run  .venv/bin/python benchmarks/ui_bench.py

1. pipeline throughput (demo bundle, demo images on a loop, as fast as it goes) with the
   page off, and with the page on and a client polling it at 30 fps (state + live image);
   runs interleaved, so drift on a shared box hits both alike
2. how soon a reject is in /api/state after its decision (capture + latency_ms), as seen
   by that 30 fps client; the page itself polls at [ui] live_fps (4: +250 ms at most)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from agent.commands.daemon import Agent  # noqa: E402
from ui_support import Client, _NoNotify, line_config  # noqa: E402


def run(page: bool, secs: float = 6.0) -> tuple[float, list[float]]:
    cfg = line_config(Path(tempfile.mkdtemp(prefix="ui-bench-")), fps=0.0)
    if not page:
        cfg = cfg.model_copy(update={"ui": cfg.ui.model_copy(update={"port": 0})})
    a = Agent(cfg, notifier=_NoNotify()).start()
    stop = threading.Event()
    delays: list[float] = []
    seen: set[int] = set()

    def client():
        c = Client(a.ui.port)
        while not stop.is_set():
            t0 = time.time()
            s = c.json("/api/state")
            c.get("/api/live.jpg")
            for r in s["rejects"]:
                if r["seq"] not in seen:
                    seen.add(r["seq"])
                    delays.append(t0 - (r["t"] + (r["latency_ms"] or 0) / 1000))
            time.sleep(max(0.0, 1 / 30 - (time.time() - t0)))

    time.sleep(1.0)                       # past the model's first runs
    n0, t0 = a.pipeline.stats()["parts"], time.monotonic()
    if page:
        threading.Thread(target=client, daemon=True).start()
    time.sleep(secs)
    rate = (a.pipeline.stats()["parts"] - n0) / (time.monotonic() - t0)
    stop.set()
    a.shutdown()
    return rate, delays[3:]               # the first polls find a backlog


def main() -> None:
    off, on, delays = [], [], []
    for _ in range(3):
        off.append(run(False)[0])
        r, d = run(True)
        on.append(r)
        delays += d
    print(f"parts/s page off   {', '.join(f'{x:.1f}' for x in off)}  (mean {statistics.mean(off):.1f})")
    print(f"parts/s page 30fps {', '.join(f'{x:.1f}' for x in on)}  (mean {statistics.mean(on):.1f})")
    print(f"throughput change  {100 * (statistics.mean(on) / statistics.mean(off) - 1):+.1f} %")
    delays.sort()
    print(f"reject -> /api/state  n {len(delays)}  p50 {delays[len(delays) // 2] * 1e3:.0f} ms  "
          f"p99 {delays[int(len(delays) * 0.99)] * 1e3:.0f} ms  max {delays[-1] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
