"""edge-inspect bench BUNDLE: will this model keep up with my line, on this box?

Measurements in one run, on the same source, so they compare on a shared, noisy box:
1. model only: int8 invoke p50/p99 per backend and thread count (and the float32 model);
2. the real pipeline (threads, bounded queues) from a video file or image folder;
3. a naive single-threaded loop (read, preprocess, invoke, decide) on the same source;
4. the overlap ceiling: the most any pipeline of this work could give on this box;
and the trigger modes' own cost per frame on that source's frames, at its resolution
(`frame`: none; `external`: the frame ring; `presence`: the part detector), one thread.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

import cv2
import numpy as np

from agent.bundle import FLOAT_MODEL, ONNX_FLOAT_MODEL
from agent.runtime.engines import ENGINES, EngineError, create_engine
from agent.runtime.engines.onnxrt import CHAIN as ONNX_BACKENDS, ort_module
from agent.runtime.inspector import Inspector, InspectorError
from agent.runtime.pipeline import Pipeline
from agent.preprocess import VIEWS, preprocess
from agent.runtime.sources import SourceError, open_source
from agent.types import Inspection, Verdict

log = logging.getLogger("bench")

def pct(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def rss_mb() -> float:
    """Resident memory now (VmRSS), falling back to the peak where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_invoke(engine, pixels: np.ndarray, seconds: float, min_runs: int = 20) -> list[float]:
    engine.invoke(pixels)  # warm-up: XNNPACK packs weights on the first call
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < min_runs:
        t0 = time.perf_counter_ns()
        engine.invoke(pixels)
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return times


def model_only(bundle, pixels, threads_list, seconds) -> list[dict]:
    rows = []
    n = len(bundle.labels)
    try:
        ort_module()
        no_ort = None
    except EngineError as e:
        no_ort = str(e)
    for name, cls in sorted(ENGINES.items()):
        onnx = name in ONNX_BACKENDS
        if onnx and no_ort:
            continue                      # one row below for all three, not three alike
        why = cls.available()
        if why:
            rows.append({"backend": name, "model": "int8", "available": False, "reason": why})
            continue
        models = [("int8", bundle.model_path)]
        if name == "cpu" and bundle.file(FLOAT_MODEL):
            models.append(("float32", bundle.file(FLOAT_MODEL)))
        if onnx and bundle.file(ONNX_FLOAT_MODEL):
            models.append(("float32", bundle.file(ONNX_FLOAT_MODEL)))
        for label, path in models:
            for threads in (threads_list if name in ("cpu", "onnx-cpu") else [1]):
                try:
                    eng = create_engine(name, path, bundle.input, n, threads=threads)
                except EngineError as e:
                    rows.append({"backend": name, "model": label, "available": False, "reason": str(e)})
                    break
                t = time_invoke(eng, pixels, seconds)
                rows.append({"backend": name, "model": label, "threads": threads, "available": True,
                             "runs": len(t), "p50_ms": round(pct(t, 50), 3),
                             "p99_ms": round(pct(t, 99), 3)})
    if no_ort:
        rows.append({"backend": "/".join(ONNX_BACKENDS), "model": "int8", "available": False,
                     "reason": no_ort})
    return rows


def make_video(image: np.ndarray, path: Path, frames: int = 300, fps: float = 30.0) -> Path:
    """A video of the sample drifting a few pixels per frame, so decode work is real."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    h, w = image.shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    if not vw.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    for i in range(frames):
        vw.write(np.roll(image, (i % 16) - 8, axis=1))
    vw.release()
    return path


def iter_source(src: str):
    """Decoded frames of a video file or image folder, in order, through the daemon's own
    sources (so the naive loop decodes exactly what the pipeline decodes)."""
    source = open_source(src)
    source.open()
    try:
        while (got := source.read()) is not None:
            if got.image is not None:
                yield got.image
    finally:
        source.close()


def naive_loop(inspector: Inspector, src: str) -> dict:
    """read -> preprocess -> invoke -> decide, one part at a time, one thread."""
    lat, n, rejects = [], 0, 0
    t_start = time.perf_counter()
    frames = iter_source(src)
    while True:
        t0 = time.perf_counter_ns()
        img = next(frames, None)
        if img is None:
            break
        verdict, _, _ = inspector.inspect(img)
        rejects += verdict is Verdict.REJECT
        lat.append((time.perf_counter_ns() - t0) / 1e6)
        n += 1
    wall = time.perf_counter() - t_start
    return {"parts": n, "rejects": rejects, "seconds": round(wall, 3),
            "parts_per_s": round(n / wall, 2) if wall else 0.0,
            "latency_ms_p50": round(pct(lat, 50), 3), "latency_ms_p99": round(pct(lat, 99), 3)}


class _OutboxLink:
    """What the reporter's early commit does to an alert (MqttLink.publish_alert: JSON, one
    SQLite commit), without a broker, so bench measures the disk and nothing else."""

    def __init__(self, path: Path, sync: str):
        from firmware_io.outbox import Outbox

        self.outbox = Outbox(path, synchronous=sync)
        self.commit_ms: list[float] = []

    def commit(self, insp: Inspection) -> None:
        # every part, not just the rejects: the worst case, a line rejecting everything
        from agent.report.reporter import event_payload

        t0 = time.perf_counter_ns()
        body = event_payload(insp, "bench")
        body["alert_id"] = uuid.uuid4().hex
        self.outbox.put("bench/events/reject", json.dumps(body, default=str).encode(), 1)
        self.commit_ms.append((time.perf_counter_ns() - t0) / 1e6)

    def close(self) -> None:
        self.outbox.close()


def run_pipeline(inspector: Inspector, src: str, deadline_ms: float, workers: int = 1,
                 durable: _OutboxLink | None = None) -> dict:
    """The daemon's own Pipeline (capture, inspect, output threads) from src to a gate that
    records its commands; every figure comes from the parts' own per-stage timings. With
    `durable`, every part's alert is committed in the inspect thread as the daemon does."""
    from firmware_io.gates import NoneGateConfig, create_gate

    gate = create_gate(NoneGateConfig(delay_ms=deadline_ms * 4 or None))
    records: list[Inspection] = []
    pipe = Pipeline(open_source(src), inspector, gate=gate, sinks=[records.append],
                    deadline_ms=deadline_ms, keep_images=False, workers=workers,
                    on_decided=durable.commit if durable is not None else None)
    t0 = time.perf_counter()
    pipe.start()
    pipe.wait()
    wall = time.perf_counter() - t0
    decision = [r.timings_ms["total"] - r.timings_ms.get("gate", 0.0) for r in records]
    to_gate = [r.latency_ms for r in records]
    misses = sum(r.verdict is Verdict.FAILSAFE for r in records)
    n = len(records)
    return {"parts": n, "rejects": sum(r.verdict is Verdict.REJECT for r in records),
            "failsafes": misses, "seconds": round(wall, 3),
            "parts_per_s": round(n / wall, 2) if wall else 0.0,
            "latency_ms_p50": round(pct(decision, 50), 3),
            "latency_ms_p99": round(pct(decision, 99), 3),
            "latency_ms_max": round(max(decision, default=float("nan")), 3),
            "gate_ms_p50": round(pct(to_gate, 50), 3), "gate_ms_p99": round(pct(to_gate, 99), 3),
            "deadline_miss_rate": round(misses / n, 4) if n else 0.0}


def measure_durability(inspector: Inspector, src: str, deadline_ms: float, plain: dict,
                       where: Path, out) -> list[dict]:
    """The price of committing each alert in the inspect thread (what makes kill -9 lose
    none): the best pipeline configuration again, every part an alert, per outbox sync
    mode, as a ratio of parts/s against the same pipeline without durability."""
    rows = []
    where.mkdir(parents=True, exist_ok=True)
    for sync in ("FULL", "NORMAL"):
        path = where / f"bench-outbox-{os.getpid()}-{sync.lower()}.sqlite"
        link = _OutboxLink(path, sync)
        try:
            r = run_pipeline(inspector, src, deadline_ms, plain["workers"], durable=link)
        finally:
            link.close()
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
        ratio = r["parts_per_s"] / plain["parts_per_s"] if plain["parts_per_s"] else float("nan")
        row = {"sync": sync, "outbox_dir": str(where), "parts_per_s": r["parts_per_s"],
               "vs_no_durability": round(ratio, 3),
               "commit_ms_p50": round(pct(link.commit_ms, 50), 3),
               "commit_ms_p99": round(pct(link.commit_ms, 99), 3),
               "gate_ms_p99": r["gate_ms_p99"], "deadline_miss_rate": r["deadline_miss_rate"]}
        rows.append(row)
        print(f"  durable alerts ({sync:6s} sync, every part an alert, outbox in {where}): "
              f"{r['parts_per_s']:7.1f} parts/s = {ratio:.2f}x no durability, commit p50 "
              f"{row['commit_ms_p50']:.2f} p99 {row['commit_ms_p99']:.2f} ms", file=out)
    return rows


def capture_cost(src: str, spec, max_frames: int = 300) -> float:
    """ms per frame of the pipeline's capture stage alone (decode + preprocess, as Intake
    does them in the capture thread), for the overlap ceiling. Its own pass over the source,
    not trigger_cost's: holding every decoded frame (as the selectors' bench must) makes each
    decode fault in fresh memory (2.5 against 1.1 ms a frame in one run, 2026-12-07)."""
    ms, frames = [], iter_source(src)
    buf = None
    while len(ms) < max_frames:
        t0 = time.perf_counter_ns()
        img = next(frames, None)
        if img is None:
            break
        buf = preprocess(img, spec, buf)
        ms.append((time.perf_counter_ns() - t0) / 1e6)
    frames.close()
    return float(np.mean(ms)) if ms else 0.0


def overlap_ceiling(capture_ms: float, naive_1thread_per_s: float, best_naive_per_s: float,
                    ncpu: int) -> dict:
    """The most any pipeline of this work can give on this box, against the best naive loop.

    A part costs the capture stage's time (one thread, serial: decode, preprocess) plus the
    inspection's; a one-thread naive loop pays both, back to back, in 1 / naive_1thread_per_s.
    Overlapping them can at best spread that work over every core, and never beat the serial
    capture stage: ms a part >= max(capture_ms, naive ms / ncpu). A naive loop whose
    interpreter already uses every core keeps most of that gain for itself, so where invoke
    dominates the ceiling sits near 1x, whatever the threading."""
    naive1_ms = 1e3 / naive_1thread_per_s if naive_1thread_per_s else float("nan")
    floor_ms = max(capture_ms, naive1_ms / max(ncpu, 1))
    best_ms = 1e3 / best_naive_per_s if best_naive_per_s else float("nan")
    return {"capture_ms": round(capture_ms, 3), "naive_1thread_ms": round(naive1_ms, 3),
            "cores": ncpu, "pipeline_floor_ms": round(floor_ms, 3),
            "pipeline_vs_naive_ceiling": round(best_ms / floor_ms, 3) if floor_ms else float("nan")}


def trigger_cost(src: str, max_frames: int = 300) -> dict:
    """ms per frame of each part selector on the source's decoded frames, one OpenCV thread
    (the capture thread runs it). The presence detector is fed from an empty-belt start, as
    on a line; a bench video of parts is its worst case (a part in every frame)."""
    from agent.runtime.parts import ExternalSelector, PresenceSelector
    from agent.runtime.sources import Captured

    frames = []
    for img in iter_source(src):
        t = int(len(frames) * 1e9 / 30)
        frames.append(Captured(img, f"#{len(frames)}", t, t))
        if len(frames) >= max_frames:
            break
    h, w = frames[0].image.shape[:2]
    nthreads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    out = {"frames": len(frames), "size": [w, h], "frame_ms_per_frame": 0.0}
    try:
        for name, sel in (("presence", PresenceSelector()), ("external", ExternalSelector())):
            ms = []
            for f in frames:
                t0 = time.perf_counter()
                sel.feed(f)
                ms.append((time.perf_counter() - t0) * 1e3)
            out[f"{name}_ms_p50"] = round(pct(ms, 50), 3)
            out[f"{name}_ms_p99"] = round(pct(ms, 99), 3)
            out[f"{name}_ms_per_frame"] = round(float(np.mean(ms)), 3)
    finally:
        cv2.setNumThreads(nthreads)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=argv[0], description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="model bundle directory")
    p.add_argument("--source", help="video file or image folder (default: a video made from "
                                    "the bundle's own sample image)")
    p.add_argument("--threads", type=int, action="append",
                   help="XNNPACK threads to try (repeatable; default: 1 and the CPU count)")
    p.add_argument("--line-rate", type=float, metavar="PARTS_PER_MIN",
                   help="the conveyor's rate: reports headroom and a verdict")
    p.add_argument("--seconds", type=float, default=3.0, help="time per model-only measurement")
    p.add_argument("--deadline-ms", type=float, default=250.0, help="inspection deadline to judge against")
    p.add_argument("--frames", type=int, default=600, help="frames in the generated video")
    p.add_argument("--workers", type=int, action="append",
                   help="pipeline inspect workers to try (repeatable; default: 1 and, on a "
                        "multi-core box, the CPU count with 1 thread each)")
    p.add_argument("--views", type=int, choices=VIEWS, default=None,
                   help="mirror views per tile, as the agent's model.views (default: the bundle's)")
    p.add_argument("--outbox-dir", help="where the durability runs put their SQLite outbox "
                                        "(default: a temp dir; use the disk the real outbox is "
                                        "on, e.g. /var/lib/edge-inspect, /tmp may be RAM)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    args = p.parse_args(argv[1:])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    out = sys.stderr if args.json else sys.stdout

    ncpu = os.cpu_count() or 1
    threads_list = sorted(set(args.threads or [1, ncpu]))
    # (XNNPACK threads, inspect workers): each loop is measured in every configuration and
    # judged by its best, so the pipeline is compared with the best a naive loop can do.
    configs = [(t, 1) for t in threads_list]
    for w in sorted(set(args.workers or ([ncpu] if ncpu > 1 else []))):
        if w > 1:
            configs.append((1, w))
    try:
        inspectors = {c: Inspector.load(args.bundle, threads=c[0], workers=c[1], views=args.views)
                      for c in configs}
    except InspectorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bundle = next(iter(inspectors.values())).bundle
    tmp = tempfile.TemporaryDirectory(prefix="edge-inspect-bench-")
    if args.source:
        src = args.source
        if not os.path.exists(src):
            print(f"error: --source {src} does not exist", file=sys.stderr)
            return 2
        try:
            sample = next(iter_source(src), None)
        except SourceError as e:
            print(f"error: --source {src}: {e}", file=sys.stderr)
            return 2
    else:
        if not bundle.sample:
            print("error: the bundle has no sample image; pass --source", file=sys.stderr)
            return 2
        sample = cv2.imread(str(bundle.path / bundle.sample), cv2.IMREAD_UNCHANGED)
        src = str(make_video(sample, Path(tmp.name) / "bench.avi", frames=args.frames))
    if sample is None:
        print(f"error: no frame could be read from {src}", file=sys.stderr)
        return 2
    pixels = preprocess(sample, bundle.input)

    print(f"bundle {bundle.path} ({bundle.model_sha256[:12]}), input {bundle.input.shape}", file=out)
    rows = model_only(bundle, pixels, threads_list, args.seconds)
    for r in rows:
        if r["available"]:
            print(f"  invoke {r['backend']:8s} {r['model']:7s} threads={r['threads']}: "
                  f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  ({r['runs']} runs)", file=out)
        else:
            print(f"  invoke {r['backend']:8s} {r['model']:7s} unavailable: {r['reason']}", file=out)

    naives, pipes = {}, {}
    for (t, w), insp in inspectors.items():
        if w == 1:
            naives[t] = naive_loop(insp, src)
            naives[t]["threads"] = t
            print(f"  naive loop  threads={t}:           {naives[t]['parts_per_s']:7.1f} parts/s, "
                  f"latency p50 {naives[t]['latency_ms_p50']:.2f} p99 "
                  f"{naives[t]['latency_ms_p99']:.2f} ms", file=out)
        pipes[(t, w)] = r = run_pipeline(insp, src, args.deadline_ms, workers=w)
        r.update(threads=t, workers=w)
        same = naives.get(t, {}).get("parts_per_s") if w == 1 else None
        vs = f" ({r['parts_per_s'] / same:.2f}x naive, same threads)" if same else ""
        print(f"  pipeline    threads={t} workers={w}: {r['parts_per_s']:7.1f} parts/s{vs}, "
              f"capture->decision p50 {r['latency_ms_p50']:.2f} p99 {r['latency_ms_p99']:.2f} "
              f"max {r['latency_ms_max']:.2f} ms, capture->gate command p99 {r['gate_ms_p99']:.2f} ms, "
              f"deadline misses {r['deadline_miss_rate']:.1%}", file=out)
    naive = max(naives.values(), key=lambda r: r["parts_per_s"])
    pipe = max(pipes.values(), key=lambda r: r["parts_per_s"])
    durability = measure_durability(inspectors[(pipe["threads"], pipe["workers"])], src,
                                    args.deadline_ms, pipe, Path(args.outbox_dir or tmp.name),
                                    out)
    ratio = pipe["parts_per_s"] / naive["parts_per_s"] if naive["parts_per_s"] else float("nan")
    print(f"  best pipeline (threads={pipe['threads']} workers={pipe['workers']}) / best naive "
          f"(threads={naive['threads']}): {ratio:.2f}x", file=out)
    ceiling = None
    if 1 in naives:
        ceiling = overlap_ceiling(capture_cost(src, bundle.input),
                                  naives[1]["parts_per_s"], naive["parts_per_s"], ncpu)
        ceiling["reached"] = round(ratio / ceiling["pipeline_vs_naive_ceiling"], 3)
        print(f"  overlap ceiling on {ncpu} cores: capture (decode + preprocess) "
              f"{ceiling['capture_ms']:.2f} ms a part, naive loop at 1 thread "
              f"{ceiling['naive_1thread_ms']:.2f} ms -> no pipeline beats "
              f"{ceiling['pipeline_floor_ms']:.2f} ms a part = "
              f"{ceiling['pipeline_vs_naive_ceiling']:.2f}x the best naive loop; this run "
              f"reached {ceiling['reached']:.0%} of it", file=out)
    # the invoke time of the engine configuration the best pipeline ran
    int8 = [r for r in rows if r["available"] and r["backend"] == "cpu" and r["model"] == "int8"
            and r["threads"] == pipe["threads"]]
    result = {
        "bundle": str(bundle.path), "model_sha256": bundle.model_sha256, "source": args.source or "sample-video",
        "invoke": rows,
        "invoke_ms_p50": int8[0]["p50_ms"] if int8 else None,
        "invoke_ms_p99": int8[0]["p99_ms"] if int8 else None,
        "threads": pipe["threads"], "workers": pipe["workers"],
        "pipeline_parts_per_s": pipe["parts_per_s"], "naive_parts_per_s": naive["parts_per_s"],
        "pipeline_vs_naive": round(ratio, 3),
        "latency_ms_p50": pipe["latency_ms_p50"], "latency_ms_p99": pipe["latency_ms_p99"],
        "latency_ms_max": pipe["latency_ms_max"],
        "gate_ms_p50": pipe["gate_ms_p50"], "gate_ms_p99": pipe["gate_ms_p99"],
        "deadline_ms": args.deadline_ms, "deadline_miss_rate": pipe["deadline_miss_rate"],
        "naive": naive, "pipeline": pipe, "rss_mb": round(rss_mb(), 1),
        "naive_runs": list(naives.values()), "pipeline_runs": list(pipes.values()),
        "durability": durability, "ceiling": ceiling,
    }
    if args.line_rate:
        need = args.line_rate / 60.0
        headroom = pipe["parts_per_s"] / need
        ok = headroom >= 1.0 and pipe["deadline_miss_rate"] == 0.0
        result.update(line_rate_per_min=args.line_rate, headroom=round(headroom, 2),
                      verdict="keeps up" if ok else "too slow")
        print(f"  line {args.line_rate:g} parts/min = {need:.2f} parts/s: headroom {headroom:.1f}x -> "
              f"{'KEEPS UP' if ok else 'TOO SLOW'}", file=out)
    trig = result["trigger"] = trigger_cost(src)
    result["presence_ms_per_frame"] = trig["presence_ms_per_frame"]
    print(f"  trigger     at {trig['size'][0]}x{trig['size'][1]}, one thread, "
          f"{trig['frames']} frames: presence detector {trig['presence_ms_per_frame']:.3f} ms "
          f"a frame (p99 {trig['presence_ms_p99']:.3f}), external ring "
          f"{trig['external_ms_per_frame']:.3f} ms, frame 0", file=out)
    print(f"  resident memory {result['rss_mb']} MB", file=out)
    if args.json:
        print(json.dumps(result))
    tmp.cleanup()
    return 0
