"""edge-inspect simulate-line: a conveyor in a video file, with its ground truth.

Real part images from a labelled folder (good_*.png / defect_*.png, or good/ and defect/
subfolders) move across a textured belt at a given speed, spacing, jitter and lighting
drift. Writes an MJPG AVI (and MP4 with --mp4) and a ground-truth JSON:

    {"fps": 30, "size": [640, 480], "line_x": 320, "parts": [
        {"n": 1, "label": "good", "image": "good_1.png", "t_line_s": 1.23, "t_gate_s": 1.83,
         "t_trigger_s": 1.20}, ...]}

t_line_s: the part's centre crosses the trigger line (frame time 0 = the first frame);
t_gate_s: it reaches the gate (t_line_s + --gate-delay-ms); t_trigger_s: a part-present
sensor --sensor-offset-ms upstream of the line fires. LineVideoSource replays the video as
a camera would (frame i captured at t0 + i / fps) and drive_triggers() sends the gate
simulator's TRG at t0 + t_trigger_s, so tests and the bench share one clock with the truth.

From the command line, --drive-trg PORT serves the gate simulator on PORT (a serial device,
or "pty": a new pty pair whose host-side path is printed) and sends each part's TRG at
t0 + t_trigger_s, t0 = the host's first HELLO (--trg-t0 hello, the default) or the moment
the video is written (--trg-t0 now), plus --trg-delay-ms either way; it fires the host's
rejects like `edge-inspect gate-sim` and exits after the last part has passed the gate.
A daemon started separately opens its camera some time after its HELLO: --trg-delay-ms is
that lag (the TRG lines say where each part is; the camera must agree within window_ms).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from agent.runtime.sources import IMAGE_EXTS, Captured, Source, SourceError


@dataclass
class SimPart:
    n: int
    label: str
    image: str
    t_line_s: float
    t_gate_s: float
    t_trigger_s: float
    y: int                      # centre row


@dataclass
class LineSpec:
    width: int = 640
    height: int = 480
    fps: float = 30.0
    rate: float = 2.0           # parts per second
    parts: int = 20
    speed: float = 900.0        # belt speed, px/s
    part_px: int = 120          # a part's longer side on screen
    jitter: float = 0.15        # spacing jitter, share of the mean spacing (each way)
    drift: float = 0.15         # lighting drift amplitude (share of brightness)
    drift_period_s: float = 7.0
    lead_s: float = 1.0         # empty belt at the start (the presence detector learns it)
    line: float = 0.5           # trigger line, share of the width
    gate_delay_ms: float = 600.0
    sensor_offset_ms: float = 30.0
    seed: int = 0


def labelled_images(folder: str | Path) -> list[tuple[str, str]]:
    """(label, path): label from a good/ or defect/ subfolder, else the file-name prefix."""
    folder = Path(folder)
    out = []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXTS or not p.is_file():
            continue
        label = p.parent.name if p.parent != folder else p.stem.split("_", 1)[0]
        out.append((label.lower(), str(p)))
    if not out:
        raise SystemExit(f"simulate-line: no images in {folder}")
    return out


def _belt(spec: LineSpec, rng: np.random.Generator) -> np.ndarray:
    # A rubber belt: fine speckle, some cross-belt streaks; wide enough to scroll through.
    w = spec.width * 2
    base = rng.normal(70, 10, (spec.height, w)).astype(np.float32)
    base = cv2.GaussianBlur(base, (0, 0), 1.2)
    streaks = cv2.GaussianBlur(rng.normal(0, 6, (1, w)).astype(np.float32), (0, 0), 3)
    return np.clip(base + streaks, 0, 255)


def plan(spec: LineSpec, images: list[tuple[str, str]]) -> list[SimPart]:
    rng = np.random.default_rng(spec.seed)
    spacing = 1.0 / spec.rate
    # a part enters (its front at x = 0) after the lead; it reaches the line later
    to_line = (spec.line * spec.width + spec.part_px / 2) / spec.speed
    t = spec.lead_s + to_line
    out = []
    for n in range(1, spec.parts + 1):
        label, path = images[int(rng.integers(len(images)))]
        y = int(spec.height / 2 + rng.uniform(-0.1, 0.1) * spec.height)
        out.append(SimPart(n, label, os.path.basename(path), round(t, 6),
                           round(t + spec.gate_delay_ms / 1000, 6),
                           round(t - spec.sensor_offset_ms / 1000, 6), y))
        t += spacing * (1 + rng.uniform(-spec.jitter, spec.jitter))
    return out


def render(spec: LineSpec, images: list[tuple[str, str]], out_video: str,
           truth_path: str | None = None, mp4: bool = False) -> dict:
    rng = np.random.default_rng(spec.seed + 1)
    parts = plan(spec, images)
    paths = dict((os.path.basename(p), p) for _, p in images)
    sprites = {}
    for p in parts:
        if p.image not in sprites:
            img = cv2.imread(paths[p.image], cv2.IMREAD_COLOR)
            h, w = img.shape[:2]
            k = spec.part_px / max(h, w)
            sprites[p.image] = cv2.resize(img, (max(1, int(w * k)), max(1, int(h * k))),
                                          interpolation=cv2.INTER_AREA).astype(np.float32)
    belt = _belt(spec, rng)
    n_frames = int((parts[-1].t_line_s + (spec.width * (1 - spec.line) + spec.part_px)
                    / spec.speed + 0.5) * spec.fps)
    writers = [cv2.VideoWriter(out_video, cv2.VideoWriter_fourcc(*"MJPG"), spec.fps,
                               (spec.width, spec.height))]
    if mp4:
        writers.append(cv2.VideoWriter(str(Path(out_video).with_suffix(".mp4")),
                                       cv2.VideoWriter_fourcc(*"mp4v"), spec.fps,
                                       (spec.width, spec.height)))
    if not writers[0].isOpened():
        raise SystemExit(f"simulate-line: cannot write {out_video}")
    line_x = spec.line * spec.width
    bw = belt.shape[1]
    for i in range(n_frames):
        t = i / spec.fps
        off = int(spec.speed * t) % (bw - spec.width)
        # the belt moves with the parts: its texture scrolls the same way
        frame = belt[:, bw - spec.width - off: bw - off].copy()
        for p in parts:
            cx = line_x + spec.speed * (t - p.t_line_s)
            s = sprites[p.image]
            sh, sw = s.shape[:2]
            x0 = int(round(cx - sw / 2))
            if x0 >= spec.width or x0 + sw <= 0:
                continue
            y0 = p.y - sh // 2
            a, b = max(0, x0), min(spec.width, x0 + sw)
            frame[y0:y0 + sh, a:b] = s[:, a - x0:b - x0, 1]
        gain = 1 + spec.drift * np.sin(2 * np.pi * t / spec.drift_period_s)
        img = np.clip(frame * gain + rng.normal(0, 2, frame.shape), 0, 255).astype(np.uint8)
        bgr = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        for w in writers:
            w.write(bgr)
    for w in writers:
        w.release()
    truth = {"fps": spec.fps, "size": [spec.width, spec.height], "frames": n_frames,
             "line_x": line_x, "spec": asdict(spec), "parts": [asdict(p) for p in parts]}
    if truth_path:
        Path(truth_path).write_text(json.dumps(truth, indent=1))
    return truth


class LineVideoSource(Source):
    """A simulated line's video replayed as a free-running camera: frame i is delivered at
    t0 + i / fps and stamped with exactly that capture time (the truth's clock)."""

    live = True

    def __init__(self, path: str, fps: float, t0_ns: int | None = None, realtime: bool = True):
        self.path, self.fps, self.realtime = path, fps, realtime
        self.t0_ns = t0_ns
        self.cap = None
        self.i = 0
        self.name = os.path.basename(path)

    def open(self) -> None:
        self.cap = cv2.VideoCapture(self.path)
        if not self.cap.isOpened():
            raise SourceError(f"cannot open {self.path}")
        if self.t0_ns is None:
            self.t0_ns = time.monotonic_ns()

    def read(self) -> Captured | None:
        ok, img = self.cap.read()
        if not ok:
            return None
        t = self.t0_ns + int(self.i * 1e9 / self.fps)
        if self.realtime:
            wait = (t - time.monotonic_ns()) / 1e9
            if wait > 0:
                time.sleep(wait)
        self.i += 1
        return Captured(img, f"{self.name}#{self.i - 1}", t, time.monotonic_ns())

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


def drive_triggers(send, truth: dict, t0_ns: int, stop: threading.Event | None = None) -> threading.Thread:
    """Call send(name, t_ns) at each part's t0 + t_trigger_s (a thread; returns it)."""
    stop = stop or threading.Event()

    def run():
        for p in truth["parts"]:
            t = t0_ns + int(p["t_trigger_s"] * 1e9)
            wait = (t - time.monotonic_ns()) / 1e9
            if wait > 0 and stop.wait(wait):
                return
            send(f"P{p['n']}", t)

    th = threading.Thread(target=run, name="sim-triggers", daemon=True)
    th.start()
    return th


def serve_triggers(port: str, truth: dict, *, t0: str = "hello", delay_ms: float = 0.0,
                   wait_s: float = 60.0, linger_s: float = 2.0, out=print) -> int:
    """--drive-trg: the gate simulator on port, TRG at the truth's sensor times."""
    import tty

    from firmware_io import protocol as P
    from firmware_io.gate_sim import GateSimulator

    slave = None
    if port == "pty":
        master, slave = os.openpty()
        tty.setraw(slave)
        sim = GateSimulator(fd=master)
        sim._own_fd = True
        out(f"gate simulator on {os.ttyname(slave)}")
    else:
        sim = GateSimulator(port=port)
    sim.start()
    try:
        if t0 == "hello":
            end = time.monotonic() + wait_s
            while sim.counters.hello == 0:
                if time.monotonic() > end:
                    out(f"simulate-line: no HELLO on {port} in {wait_s:g} s; no TRG sent")
                    return 1
                time.sleep(0.001)
        t0_ns = time.monotonic_ns() + int(delay_ms * 1e6)
        th = drive_triggers(lambda name, t: sim.send(P.Trigger(name, sim.encoder(t))),
                            truth, t0_ns)
        th.join()
        last = max(p["t_gate_s"] for p in truth["parts"]) if truth["parts"] else 0.0
        rest = t0_ns / 1e9 + last + linger_s - time.monotonic()
        if rest > 0:
            time.sleep(rest)
        c = sim.counters
        out(f"simulate-line: sent {len(truth['parts'])} TRG; gate rej={c.rej} fired={c.fired}")
        return 0
    finally:
        sim.stop()
        if slave is not None:
            os.close(slave)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=argv[0], description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).parents[1] / "demo_data" / "images"
    ap.add_argument("--images", default=str(here), help="labelled image folder")
    ap.add_argument("--out", required=True, help="video file to write (.avi, MJPG)")
    ap.add_argument("--truth", help="ground-truth JSON (default: beside the video)")
    ap.add_argument("--mp4", action="store_true", help="also write an MP4 (mp4v)")
    d = LineSpec()
    for f in ("width", "height", "parts", "part_px", "seed"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(d, f))
    for f in ("fps", "rate", "speed", "jitter", "drift", "drift_period_s", "lead_s", "line",
              "gate_delay_ms", "sensor_offset_ms"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=float, default=getattr(d, f))
    ap.add_argument("--drive-trg", metavar="PORT",
                    help="serve the gate simulator on PORT ('pty': a new pty) and send TRG "
                         "at the truth's sensor times")
    ap.add_argument("--trg-t0", choices=("hello", "now"), default="hello",
                    help="time 0 of the TRG schedule: the host's first HELLO, or now")
    ap.add_argument("--trg-delay-ms", type=float, default=0.0,
                    help="added to time 0 (the camera's start after HELLO)")
    ap.add_argument("--trg-wait-s", type=float, default=60.0, help="wait this long for HELLO")
    args = ap.parse_args(argv[1:])
    spec = LineSpec(**{k: getattr(args, k) for k in asdict(d)})
    if spec.speed / spec.rate < spec.part_px * 1.3:
        print(f"simulate-line: parts {spec.part_px} px long every {spec.speed / spec.rate:.0f} px "
              "would touch; raise --speed or lower --rate")
    truth_path = args.truth or str(Path(args.out).with_suffix(".json"))
    truth = render(spec, labelled_images(args.images), args.out, truth_path, args.mp4)
    n_def = sum(p["label"] != "good" for p in truth["parts"])
    print(f"{args.out}: {truth['frames']} frames at {spec.fps:g} fps, {len(truth['parts'])} parts "
          f"({n_def} defect) at {spec.rate:g}/s; truth in {truth_path}")
    if args.drive_trg:
        return serve_triggers(args.drive_trg, truth, t0=args.trg_t0,
                              delay_ms=args.trg_delay_ms, wait_s=args.trg_wait_s,
                              out=lambda m: print(m, flush=True))
    return 0
