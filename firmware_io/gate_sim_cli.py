"""`edge-inspect gate-sim`: the simulated gate controller (firmware_io.gate_sim) on a serial
port or a fresh pty, for a bench without the real controller."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import tty

from .gate_sim import GateSimulator

log = logging.getLogger("firmware_io.gate_sim")


def _parser(prog: str = "gate-sim") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=(
        "Simulated reject-gate controller speaking the edge-inspect serial line protocol."))
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", help="serial device (or pty) path to serve on")
    where.add_argument("--pty", action="store_true",
                       help="create a pty pair; print the host-side path on stdout")
    ap.add_argument("--fw", default="sim-1.0", help="firmware version reported in HELLO")
    ap.add_argument("--gates", default="1,2,3,4", help="gate numbers, comma separated")
    ap.add_argument("--hb-timeout-ms", type=float, default=2000.0,
                    help="enter fail-safe after this long without HB (default 2000)")
    ap.add_argument("--encoder-rate", type=float, default=1000.0,
                    help="simulated encoder counts per second (default 1000)")
    ap.add_argument("--trigger-hz", type=float, default=0.0,
                    help="emit TRG part-present triggers at this rate (default off)")
    ap.add_argument("--nak", metavar="CODE", help="NAK every command with CODE (testing)")
    ap.add_argument("--silent", action="store_true", help="never answer (testing)")
    ap.add_argument("--duration", type=float, default=0.0,
                    help="exit after this many seconds (default: run until SIGTERM/SIGINT)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every fired pulse")
    return ap


def main(argv: list[str] | None = None) -> int:
    """argv[0] is the program name, as for every edge-inspect command (the CLI passes
    'edge-inspect gate-sim'); None reads sys.argv (python -m firmware_io.gate_sim)."""
    argv = list(sys.argv if argv is None else argv)
    args = _parser(argv[0] if argv else "gate-sim").parse_args(argv[1:])
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        stream=sys.stderr, format="%(asctime)s gate-sim %(message)s")
    try:
        gates = tuple(int(g) for g in args.gates.split(",") if g.strip())
    except ValueError:
        print(f"gate-sim: bad --gates {args.gates!r}", file=sys.stderr)
        return 2
    slave_fd = None
    try:
        if args.pty:
            master, slave_fd = os.openpty()
            tty.setraw(slave_fd)
            host_path = os.ttyname(slave_fd)
            sim = GateSimulator(fd=master, fw=args.fw, gates=gates,
                                hb_timeout_ms=args.hb_timeout_ms,
                                encoder_rate=args.encoder_rate, trigger_hz=args.trigger_hz)
            sim._own_fd = True
        else:
            host_path = args.port
            sim = GateSimulator(port=args.port, fw=args.fw, gates=gates,
                                hb_timeout_ms=args.hb_timeout_ms,
                                encoder_rate=args.encoder_rate, trigger_hz=args.trigger_hz)
        sim.nak_code = args.nak
        sim.silent = args.silent
        sim.start()
    except OSError as exc:
        print(f"gate-sim: {exc}", file=sys.stderr)
        return 1
    print(host_path, flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, lambda *_: done.set())
        except ValueError:       # not the main thread
            pass
    n_logged = 0
    deadline = time.monotonic() + args.duration if args.duration > 0 else None
    try:
        while not done.wait(0.2):
            if args.verbose:
                for ev in sim.fired[n_logged:]:
                    log.info("FIRED %s gate %d at %s (error %+.2f ms)", ev.part, ev.gate,
                             ev.at, ev.error_ms)
                n_logged = len(sim.fired)
            if deadline and time.monotonic() >= deadline:
                break
    finally:
        sim.stop()
        if slave_fd is not None:
            os.close(slave_fd)
    c = sim.counters
    print(f"gate-sim: rej={c.rej} fired={c.fired} dup={c.duplicates} naks={c.naks} "
          f"failsafe_entries={c.failsafe_entries}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
