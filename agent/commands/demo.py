"""`edge-inspect demo`: the whole loop with no hardware and nothing to install.

The demo bundle and sample images (agent/demo_data/), a folder source, the real pipeline,
the gate simulator on a pseudo-terminal speaking the serial protocol, and an MQTT broker
the demo starts itself (Mosquitto, else the pure-Python amqtt) unless --mqtt names one.
One line per part as it is decided, FIRED lines as the simulated gate kicks parts off,
and a summary at the end (truth from file names: good_* should pass, defect_* reject).

--line (what `make demo` runs): the same images composited onto a moving belt by
`simulate-line` (a 30 fps video and its ground truth), replayed as a free-running camera
in `presence` mode, so parts are found on the belt rather than one per frame; the summary
then counts the parts seen against the truth, the verdicts against the parts' labels and
each FIRED pulse against the time its part reached the gate.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
import threading
import time
import tty
from pathlib import Path

from firmware_io.timing import quantile

from agent.config import parse_config, print_problems
from agent.runtime.sources import FolderSource
from agent.types import Inspection, Verdict

DEMO_DATA = Path(__file__).resolve().parents[1] / "demo_data"


class _Passes(FolderSource):
    """A folder read `loops` times over, then the end."""

    def __init__(self, path, loops: int):
        super().__init__(path, loop=True)
        self.loops = max(1, loops)
        self.passes = 0

    def read(self):
        if self.pos >= len(self.files):
            self.passes += 1
            if self.passes >= self.loops:
                return None
        return super().read()


def _truth(ref: str) -> Verdict | None:
    name = ref.lower()
    if name.startswith("good") or "_good" in name:
        return Verdict.PASS
    if name.startswith("defect") or "_defect" in name:
        return Verdict.REJECT
    return None


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=argv[0], description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=DEMO_DATA / "images",
                    help="folder of images (good_*/defect_* names give the truth)")
    ap.add_argument("--bundle", type=Path, default=DEMO_DATA / "bundle", help="model bundle")
    ap.add_argument("--loops", type=int, default=1, help="passes over the folder (default 1)")
    ap.add_argument("--fps", type=float, default=25.0,
                    help="parts per second on the simulated line (0: as fast as it goes)")
    ap.add_argument("--delay-ms", type=float, default=300.0,
                    help="camera-to-gate travel time (default 300)")
    ap.add_argument("--line", action="store_true",
                    help="a simulated conveyor line in presence mode (see above)")
    ap.add_argument("--parts", type=int, default=30, help="with --line: parts on the line")
    ap.add_argument("--rate", type=float, default=3.0, help="with --line: parts per second")
    ap.add_argument("--mqtt", metavar="HOST:PORT", help="use this broker instead of starting one")
    ap.add_argument("--threads", type=int, default=2, help="inference threads")
    ap.add_argument("--quiet", action="store_true", help="summary only")
    ap.add_argument("--verbose", action="store_true", help="show the daemon's log")
    args = ap.parse_args(argv[1:])

    from agent.logs import setup_logging

    setup_logging("INFO" if args.verbose else "WARNING", stream=sys.stderr)
    problems = []
    if not (args.bundle / "bundle.json").is_file():
        problems.append(f"--bundle: {args.bundle} is not a model bundle (no bundle.json)")
    if not args.images.is_dir():
        problems.append(f"--images: {args.images} is not a folder")
    if args.loops < 1:
        problems.append("--loops: must be at least 1")
    if args.line and (args.parts < 1 or not 0 < args.rate <= 10):
        problems.append("--parts/--rate: at least 1 part, 0 < rate <= 10 parts/s")
    if problems:
        return print_problems(problems)

    from firmware_io.gate_sim import GateSimulator

    from agent.commands.daemon import Agent, StartupError
    from agent.commands.local_broker import LocalBroker

    out = sys.stdout
    work = tempfile.TemporaryDirectory(prefix="edge-inspect-demo-")
    tmp = Path(work.name)
    broker = None
    if args.mqtt:
        host, _, port = args.mqtt.rpartition(":")
        mqtt = {"enabled": True, "host": host or "127.0.0.1", "port": int(port)}
    else:
        try:
            broker = LocalBroker().start()
            mqtt = {"enabled": True, "host": broker.host, "port": broker.port}
        except RuntimeError as e:
            print(f"note: no MQTT broker ({e}); running without MQTT", file=sys.stderr)
            mqtt = {"enabled": False}
    if mqtt["enabled"]:
        mqtt.update(outbox=str(tmp / "outbox.sqlite"), metrics_interval_s=5)

    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    sim = GateSimulator(fd=master).start()
    deadline = min(250.0, args.delay_ms * 0.6)
    line_truth, source = None, None
    if args.line:
        from agent.commands.simulate_line import LineSpec, LineVideoSource, labelled_images, render

        video = str(tmp / "line.avi")
        # 240 px parts (1800 px/s keeps the spacing): the inspector is given the part's
        # crop, and a PCB's defects need that many pixels on the part to be seen at all
        line_truth = render(LineSpec(rate=args.rate, parts=args.parts, part_px=240,
                                     speed=1800.0, gate_delay_ms=args.delay_ms),
                            labelled_images(args.images), video)
        source = LineVideoSource(video, line_truth["fps"])
    cfg = parse_config({
        "station": {"id": "demo"},
        "camera": ({"source": video, "fps": line_truth["fps"]} if args.line
                   else {"source": str(args.images), "fps": args.fps}),
        "trigger": {"mode": "presence"} if args.line else {"mode": "frame"},
        "model": {"bundle": str(args.bundle), "threads": args.threads},
        "inspection": {"deadline_ms": deadline, "queue_size": 2},
        "gate": {"kind": "serial", "port": os.ttyname(slave), "delay_ms": args.delay_ms,
                 "pulse_ms": 20},
        "mqtt": mqtt,
        "metrics": {"port": 0},
        "recorder": {"dir": str(tmp / "images"), "pass_sample": 0.0},
    }, tmp)

    lock = threading.Lock()
    results: list[Inspection] = []
    fired: dict[str, float] = {}
    t_cap: dict[str, int] = {}

    def truth_part(insp: Inspection) -> dict | None:
        # a line's part: the truth part whose line crossing is nearest the reference time
        if line_truth is None or source.t0_ns is None:
            return None
        t = (insp.t_capture_ns - source.t0_ns) / 1e9
        return min(line_truth["parts"], key=lambda q: abs(q["t_line_s"] - t))

    def truth_of(insp: Inspection) -> Verdict | None:
        if line_truth is None:
            return _truth(insp.source_ref)
        q = truth_part(insp)
        return None if q is None else _truth(q["label"])

    def line(insp: Inspection) -> None:
        with lock:
            results.append(insp)
            if insp.verdict is not Verdict.PASS:
                t_cap[insp.part_id] = insp.t_capture_ns
        if args.quiet:
            return
        score = "  -  " if math.isnan(insp.score) else f"{insp.score:.3f}"
        gate = f"gate {insp.gate_target}" if insp.gate_target else ""
        if insp.gate_error:
            gate += f" ({insp.gate_error})"
        truth = truth_of(insp)
        mark = "" if truth is None or insp.verdict is Verdict.FAILSAFE else (
            "  ok" if truth is insp.verdict else "  MISMATCH")
        extra = f" [{insp.reason}]" if insp.reason else ""
        out.write(f"{insp.part_id:>14}  {insp.source_ref[:28]:<28} {insp.verdict.value:<8} "
                  f"{score}  {insp.latency_ms:6.2f} ms  {gate}{extra}{mark}\n")
        out.flush()

    def on_fired(part: str, gate: int, t_ms: int) -> None:
        now = time.monotonic_ns()
        with lock:
            fired[part] = now
            t0 = t_cap.get(part)
        if not args.quiet:
            after = f"{(now - t0) / 1e6:.0f} ms after capture" if t0 else ""
            out.write(f"{part:>14}  FIRED gate {gate} {after}\n")
            out.flush()

    def last_fires() -> None:
        # the last parts are still travelling to the gate: wait for their FIRED reports
        want = {i.part_id for i in results if i.verdict is not Verdict.PASS and not i.gate_error}
        end = time.monotonic() + args.delay_ms / 1000 + 1.0
        while time.monotonic() < end and not want <= set(fired):
            time.sleep(0.02)

    agent = Agent(cfg, sinks=(line,), on_fired=on_fired, notifier=_NoNotify(),
                  source=source or _Passes(str(args.images), args.loops),
                  on_drained=last_fires)
    code = 0
    t0 = time.monotonic()
    try:
        try:
            agent.start()
        except StartupError as e:
            return print_problems(e.problems)
        where = f"{mqtt['host']}:{mqtt['port']}" if mqtt["enabled"] else "off"
        if not args.quiet:
            what = (f"a simulated line ({args.parts} parts at {args.rate:g}/s, 30 fps, "
                    f"presence mode) from {args.images}" if args.line
                    else f"images {args.images}")
            print(f"edge-inspect demo: {agent.inspector.describe()}\n"
                  f"  {what}, gate simulator on {os.ttyname(slave)} "
                  f"(fires {args.delay_ms:g} ms after capture), MQTT "
                  f"{where}\n")
        prev = signal.signal(signal.SIGINT, lambda *_: agent.request_stop())
        agent.run()
        signal.signal(signal.SIGINT, prev)
        elapsed = time.monotonic() - t0
        summary(results, {e.part for e in sim.fired}, elapsed, agent, out, truth_of,
                "parts' labels" if args.line else "file names")
        if line_truth is not None:
            line_summary(results, sim.fired, line_truth, truth_part, source.t0_ns, out)
    finally:
        agent.close()
        sim.stop()
        for fd in (master, slave):
            try:
                os.close(fd)
            except OSError:
                pass
        if broker is not None:
            broker.stop()
        work.cleanup()
    return code


class _NoNotify:
    enabled = False
    watchdog_interval_s = None

    def __getattr__(self, name):
        return lambda *a, **k: None


def summary(results: list[Inspection], fired: set[str], elapsed: float, agent, out,
            truth_of=lambda i: _truth(i.source_ref), truth_name: str = "file names") -> None:
    n = len(results)
    rej = [i for i in results if i.verdict is Verdict.REJECT]
    fs = [i for i in results if i.verdict is Verdict.FAILSAFE]
    lat = sorted(i.latency_ms for i in results)
    span = (results[-1].t_capture_ns - results[0].t_capture_ns) / 1e9 if n > 1 else 0.0
    rate = (n - 1) / span if span > 0 else 0.0

    def q(p):
        v = quantile(lat, p)
        return float("nan") if v is None else v

    judged = [(i, truth_of(i)) for i in results if i.verdict is not Verdict.FAILSAFE]
    known = [(i, t) for i, t in judged if t is not None]
    match = sum(1 for i, t in known if i.verdict is t)
    acted = [i for i in results if i.verdict is not Verdict.PASS]
    fired_n = sum(1 for i in acted if i.part_id in fired)
    lines = [
        "",
        "summary",
        f"  parts        {n} in {elapsed:.1f} s ({rate:.1f} parts/s)",
        f"  verdicts     {n - len(rej) - len(fs)} pass, {len(rej)} reject, {len(fs)} failsafe"
        + (f" ({', '.join(sorted({str(i.failsafe_reason) for i in fs}))})" if fs else ""),
        f"  latency      capture -> gate command p50 {q(0.5):.2f} ms, p99 {q(0.99):.2f} ms",
        f"  gate         {fired_n}/{len(acted)} rejected parts FIRED by the simulated gate",
        f"  truth        {match}/{len(known)} verdicts match the {truth_name}"
        + (f" ({len(known) - match} wrong)" if match != len(known) else ""),
    ]
    if agent.link is not None:
        c = agent.link.counters()
        lines.append(f"  mqtt         {c.get('alerts_queued', 0)} alerts queued, outbox "
                     f"{c.get('outbox_depth', 0)} waiting")
    out.write("\n".join(lines) + "\n")
    out.flush()


def line_summary(results: list[Inspection], fired, truth: dict, truth_part, t0_ns: int,
                 out) -> None:
    """--line: parts seen against the truth; each FIRED pulse against its part's gate time."""
    seen = [truth_part(i)["n"] for i in results]
    missed = len(truth["parts"]) - len(set(seen))
    double = len(seen) - len(set(seen))
    by_id = {i.part_id: i for i in results}
    err = sorted((e.actual_ns - t0_ns) / 1e6 - truth_part(by_id[e.part])["t_gate_s"] * 1e3
                 for e in fired if e.part in by_id)

    def q(p):
        v = quantile(err, p)
        return float("nan") if v is None else v

    lines = [f"  line         {len(results)} parts seen / {len(truth['parts'])} in the truth "
             f"({missed} missed, {double} double)"]
    if err:
        lines.append(f"  gate timing  FIRED - truth gate time p50 {q(0.5):+.2f} ms, "
                     f"p99 {q(0.99):+.2f} ms, worst {max(err, key=abs):+.2f} ms "
                     f"({len(err)} pulses)")
    out.write("\n".join(lines) + "\n")
    out.flush()
