"""Part selection on simulated lines: parts counted against the truth, line-time error and
the presence detector's cost per frame.

    .venv/bin/python benchmarks/parts_bench.py                # 2 and 5 parts/s, 240 parts each
    .venv/bin/python benchmarks/parts_bench.py --parts 400 --images DIR --seed 7

Frames are decoded from the MJPG video first, so the cost is the selector's alone (one
thread: OpenCV is held to one with cv2.setNumThreads(1)).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.parts import ExternalSelector, PresenceSelector  # noqa: E402
from agent.simulate_line import LineSpec, labelled_images, render  # noqa: E402
from agent.sources import Captured  # noqa: E402


def decoded(video: str, fps: float) -> list[Captured]:
    cap = cv2.VideoCapture(video)
    out = []
    while True:
        ok, img = cap.read()
        if not ok:
            return out
        t = int(len(out) * 1e9 / fps)
        out.append(Captured(img, f"#{len(out)}", t, t))


def score(parts, truth) -> dict:
    # match each truth part to the selected part whose reference time is nearest
    tl = np.array([p["t_line_s"] for p in truth["parts"]])
    got = np.array([p.t_ref_ns / 1e9 for p in parts])
    hits = [int(np.argmin(np.abs(tl - g))) for g in got]
    err = np.array([abs(got[i] - tl[h]) * 1e3 for i, h in enumerate(hits)])
    return {"truth": len(tl), "parts": len(parts), "missed": len(tl) - len(set(hits)),
            "double": len(hits) - len(set(hits)),
            "failsafe": sum(p.failsafe is not None for p in parts),
            "t_err_ms_p99": round(float(np.percentile(err, 99)), 2) if len(err) else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[1] / "agent" /
                                            "demo_data" / "images"))
    ap.add_argument("--parts", type=int, default=240)
    ap.add_argument("--rates", default="2,5")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    imgs = labelled_images(args.images)
    report = {}
    with tempfile.TemporaryDirectory() as d:
        for rate in (float(r) for r in args.rates.split(",")):
            video = f"{d}/line{rate:g}.avi"
            truth = render(LineSpec(rate=rate, parts=args.parts, seed=args.seed), imgs, video)
            frames = decoded(video, truth["fps"])
            sel = PresenceSelector()
            t0 = time.perf_counter()
            parts = [p for f in frames for p in sel.feed(f)]
            ms = (time.perf_counter() - t0) * 1e3 / len(frames)
            pres = score(parts, truth) | {"ms_per_frame": round(ms, 3)}
            off = truth["spec"]["sensor_offset_ms"]
            ext = ExternalSelector(offset_ms=off, window_ms=20)
            trig = sorted(int(p["t_trigger_s"] * 1e9) for p in truth["parts"])
            eparts = []
            for f in frames:
                while trig and trig[0] <= f.t_capture_ns:
                    ext.trigger(trig.pop(0))
                eparts += ext.feed(f)
            # the external part's reference is its trigger; compare trigger + offset
            for p in eparts:
                p.t_ref_ns += int(off * 1e6)
            report[f"{rate:g}/s"] = {"frames": len(frames), "presence": pres,
                                     "external": score(eparts, truth)}
    print(json.dumps(report, indent=1))
    ok = all(r[m]["missed"] == 0 and r[m]["double"] == 0 and r[m]["failsafe"] == 0
             for r in report.values() for m in ("presence", "external"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
