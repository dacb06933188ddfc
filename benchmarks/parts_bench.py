"""Part selection on simulated lines: parts counted against the truth, line-time error and
the presence detector's cost per frame.

    .venv/bin/python benchmarks/parts_bench.py                # 2 and 5 parts/s, 240 parts each
    .venv/bin/python benchmarks/parts_bench.py --parts 400 --images DIR --seed 7
    taskset -c 0 .venv/bin/python benchmarks/parts_bench.py --gate --parts 200   # firing error

Frames are decoded from the MJPG video first, so the cost is the selector's alone (one
thread: OpenCV is held to one with cv2.setNumThreads(1)).

--gate measures the gate firing error end to end instead: the whole agent (the demo bundle,
the serial gate) on the line video replayed in real time as a camera, the gate simulator on
a pty (os.openpty) and, in external mode, sending TRG at the truth's sensor times. Each
FIRED pulse (a rejected or FAILSAFE part) is matched to its truth part by the inspection's
reference time; the error is the simulator's fire time minus the truth's gate time
(t0 + t_gate_s, t0 the camera's first frame). Real time: 200 parts take 100 s at 2/s.
The gate simulator runs in its own process, on the last core where there are two or more
(a gate controller is its own hardware: in the agent's process and on its core, the
simulator's scheduler thread queued behind the agent's and its lateness was the tail);
CLOCK_MONOTONIC is system-wide, so its fire times compare with the agent's.
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

from agent.runtime.parts import ExternalSelector, PresenceSelector  # noqa: E402
from agent.commands.simulate_line import LineSpec, labelled_images, render  # noqa: E402
from agent.runtime.sources import Captured  # noqa: E402


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


class SimProcess:
    """firmware_io's GateSimulator on the pty's master end, in a forked child process pinned
    to the last core; the parent asks it for its fired count, TRG drives and, at the end,
    its fired events."""

    def __init__(self, master_fd: int):
        import multiprocessing as mp

        self.conn, child = mp.Pipe()
        self.proc = mp.get_context("fork").Process(target=self._serve, args=(master_fd, child),
                                                   daemon=True)
        self.proc.start()
        # the agent's first heartbeat must find the simulator serving, or its ack times out
        if not self.conn.poll(30) or self.conn.recv() != "ready":
            raise RuntimeError("gate simulator process did not start within 30 s")

    @staticmethod
    def _serve(fd: int, conn) -> None:
        import os

        from firmware_io import protocol as P
        from firmware_io.gate_sim import GateSimulator
        from agent.commands.simulate_line import drive_triggers

        cores = sorted(os.sched_getaffinity(0))
        if len(cores) > 1:
            os.sched_setaffinity(0, {cores[-1]})
        sim = GateSimulator(fd=fd, hb_timeout_ms=5000).start()
        conn.send("ready")
        while True:
            cmd, *arg = conn.recv()
            if cmd == "count":
                conn.send(len(sim.fired))
            elif cmd == "triggers":
                truth, t0_ns = arg
                drive_triggers(lambda name, t: sim.send(P.Trigger(name, 0)), truth, t0_ns)
            else:
                sim.stop()
                conn.send([(e.part, e.scheduled_ns, e.actual_ns) for e in sim.fired])
                return

    def fired_count(self) -> int:
        self.conn.send(("count",))
        return self.conn.recv()

    def drive_triggers(self, truth: dict, t0_ns: int) -> None:
        self.conn.send(("triggers", truth, t0_ns))

    def stop(self) -> list[tuple[str, int, int]]:
        self.conn.send(("stop",))
        fired = self.conn.recv()
        self.proc.join(5)
        return fired


def gate_run(mode: str, rate: float, parts: int, imgs, seed: int, tmp: str) -> dict:
    """One line through the whole agent and the gate simulator; FIRED vs truth gate time."""
    import os
    import threading
    import tty

    from agent.config import parse_config
    from agent.commands.daemon import Agent
    from agent.commands.simulate_line import LineVideoSource

    root = Path(__file__).resolve().parents[1]
    Path(tmp).mkdir(parents=True, exist_ok=True)
    video = f"{tmp}/gate-{mode}-{rate:g}.avi"
    spec = LineSpec(rate=rate, parts=parts, seed=seed)
    truth = render(spec, imgs, video)
    off, gate_ms = spec.sensor_offset_ms, spec.gate_delay_ms
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    sim = SimProcess(master)
    fired = []
    trig = ({"mode": "presence"} if mode == "presence" else
            {"mode": "external", "offset_ms": off, "window_ms": 20})
    # presence counts the gate delay from the line crossing, external from the trigger
    delay = gate_ms if mode == "presence" else off + gate_ms
    cfg = parse_config({
        "station": {"id": "bench"},
        "camera": {"source": video, "fps": truth["fps"]},
        "model": {"bundle": str(root / "agent" / "demo_data" / "bundle"), "threads": 1},
        "inspection": {"deadline_ms": 300, "queue_size": 4},
        "gate": {"kind": "serial", "port": os.ttyname(slave), "ack_timeout_ms": 50,
                 "heartbeat_ms": 200, "delay_ms": delay},
        "mqtt": {"enabled": False}, "metrics": {"port": 0},
        "recorder": {"dir": f"{tmp}/rec-{mode}-{rate:g}", "pass_sample": 0.0},
        "trigger": trig}, Path(tmp))
    src = LineVideoSource(video, truth["fps"])
    got = []
    agent = Agent(cfg, source=src, sinks=(got.append,))
    try:
        agent.start()
        th = threading.Thread(target=agent.run, daemon=True)
        th.start()
        while src.t0_ns is None:
            time.sleep(0.001)
        if mode == "external":
            sim.drive_triggers(truth, src.t0_ns)
        th.join(truth["frames"] / truth["fps"] + 60)
        acted = [g for g in got if g.rejected]
        t_end = time.monotonic() + 5
        while sim.fired_count() < len(acted) and time.monotonic() < t_end:
            time.sleep(0.05)
    finally:
        agent.close()
        fired = sim.stop()
        os.close(slave)
    tl = np.array([p["t_line_s"] for p in truth["parts"]])
    by_id = {g.part_id: g for g in got}
    err, sched, late, unmatched = [], [], [], 0
    for part, scheduled_ns, actual_ns in fired:
        g = by_id.get(part)
        if g is None:
            unmatched += 1
            continue
        # the inspection's reference: line crossing (presence), trigger (external)
        t_ref = (g.t_capture_ns - src.t0_ns) / 1e9 + (off / 1e3 if mode == "external" else 0)
        q = truth["parts"][int(np.argmin(np.abs(tl - t_ref)))]
        err.append((actual_ns - src.t0_ns) / 1e6 - q["t_gate_s"] * 1e3)
        # split: where the host's command put the pulse (selector's reference time, the
        # d<ms> rounding, host-to-controller transit) and how late the simulator fired it
        sched.append((scheduled_ns - src.t0_ns) / 1e6 - q["t_gate_s"] * 1e3)
        late.append((actual_ns - scheduled_ns) / 1e6)
    e = np.array(err)
    verdicts = {"good": [0, 0], "defect": [0, 0]}      # label -> [passed, rejected]
    for g in got:
        t_ref = (g.t_capture_ns - src.t0_ns) / 1e9 + (off / 1e3 if mode == "external" else 0)
        label = truth["parts"][int(np.argmin(np.abs(tl - t_ref)))]["label"]
        verdicts.setdefault(label, [0, 0])[g.rejected] += 1
    pct = (lambda q: round(float(np.percentile(e, q)), 2) if len(e) else None)
    return {"truth": len(tl), "defect": sum(p["label"] != "good" for p in truth["parts"]),
            "inspected": len(got), "rejected": len(acted),
            "good_rejected": verdicts["good"][1], "defect_passed": verdicts["defect"][0],
            "failsafe": sum(g.verdict.value == "FAILSAFE" for g in got),
            "failsafe_reasons": sorted({g.reason for g in got if g.verdict.value == "FAILSAFE"}),
            "fired": len(fired), "unmatched": unmatched,
            "err_ms_p50": pct(50), "err_ms_p99": pct(99),
            "abs_err_ms_max": round(float(np.abs(e).max()), 2) if len(e) else None,
            "scheduled_err_ms_p99": round(float(np.percentile(sched, 99)), 2) if sched else None,
            "sim_late_ms_p99": round(float(np.percentile(late, 99)), 2) if late else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[1] / "agent" /
                                            "demo_data" / "images"))
    ap.add_argument("--parts", type=int, default=240)
    ap.add_argument("--rates", default="2,5")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gate", action="store_true",
                    help="gate firing error end to end (real time) instead")
    ap.add_argument("--modes", default="presence,external", help="with --gate")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    imgs = labelled_images(args.images)
    report = {}
    if args.gate:
        with tempfile.TemporaryDirectory() as d:
            for rate in (float(r) for r in args.rates.split(",")):
                for mode in args.modes.split(","):
                    r = gate_run(mode, rate, args.parts, imgs, args.seed, d)
                    report[f"{rate:g}/s {mode}"] = r
                    print(f"{rate:g}/s {mode}: {json.dumps(r)}", file=sys.stderr, flush=True)
        print(json.dumps(report, indent=1))
        ok = all(r["inspected"] == r["truth"] and r["failsafe"] == 0
                 and r["fired"] == r["rejected"] for r in report.values())
        return 0 if ok else 1
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
