"""The inspection pipeline: capture -> inspect -> output, three threads, small queues.

    capture thread   source.read() (decode) + preprocess into a pooled buffer  --in_q-->
    inspect thread   deadline check, engine.invoke, decide, gate.reject/accept  --out_q-->
    output thread    sinks: reporter (MQTT), Prometheus, recorder, demo printer, watchdog

OpenCV and LiteRT release the GIL, so decoding the next frame overlaps inference of this
one. The gate is told from the inspect thread right after the decision (the part is
moving); everything slower happens in the output thread.

Back-pressure: file and folder sources (not paced by fps) are read only when the inspect
queue has room (pull mode), so a frame's capture time is taken when it can be inspected
promptly. Live sources (cameras, streams, paced files) are never held up: a frame that
finds the queue full is FAILSAFE'd at once ("overload"), and a frame that can no longer
be inspected before its deadline is FAILSAFE'd without inference ("deadline"). No frame is
dropped silently: every part gets an Inspection, a gate action and a report.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from typing import Callable, Iterable

import numpy as np

from firmware_io.timing import quantile

from .frame_checks import REASONS as FRAME_CHECK_REASONS
from .frame_checks import FrameChecker
from .inspector import Inspector
from .parts import REASONS as PART_REASONS
from .parts import Part
from .sources import Captured, Source, SourceError
from .types import Frame, Inspection, Verdict

log = logging.getLogger("pipeline")

_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"

# FAILSAFE reasons (also the Prometheus label values)
DEADLINE = "deadline"            # could not be (or was not) decided before its deadline
OVERLOAD = "overload"            # live frame found the inspect queue full
INFERENCE = "inference_error"    # the engine raised / gave garbage
DECODE = "decode_error"          # a part was there but its image was unreadable
PREPROCESS = "preprocess_error"  # the frame could not be fitted to the model input
PAUSED = "paused"                # inspection paused by command: nothing passes uninspected
NO_ENCODER = "no_encoder"        # encoder timing, but no TRG latched a count: cannot be timed
FAILSAFE_REASONS = (DEADLINE, OVERLOAD, INFERENCE, DECODE, PREPROCESS, PAUSED, NO_ENCODER)

IMAGE_BACKLOG = 16               # reports in the output queue beyond which images are dropped

# blank_frame, frozen_frame, frame_out_of_range: the frame showed nothing worth judging
FAILSAFE_REASONS = FAILSAFE_REASONS + FRAME_CHECK_REASONS
# no_frame_for_trigger, missed_trigger, part_not_judged, ...: the part selector's (parts.py)
FAILSAFE_REASONS = FAILSAFE_REASONS + PART_REASONS
_FRAME_ERRORS = (PREPROCESS, *FRAME_CHECK_REASONS)

STAGES = ("decode", "preprocess", "queue", "invoke", "decide", "gate", "total")


def _b36(n: int) -> str:
    s = ""
    while True:
        n, r = divmod(n, 36)
        s = _B36[r] + s
        if not n:
            return s


def boot_prefix() -> str:
    """A short prefix unique per start: base-36 milliseconds since the epoch (8 chars).
    Part ids are '<prefix>-<seq>': unique across restarts, no spaces, fit the serial line."""
    return _b36(time.time_ns() // 1_000_000)


class _Item:
    __slots__ = ("frame", "pixels", "insp", "t_pre_ns", "extra")

    def __init__(self, frame, pixels, insp, t_pre_ns, extra=()):
        self.frame = frame
        self.pixels = pixels
        self.insp = insp
        self.t_pre_ns = t_pre_ns
        self.extra = extra          # more frames of the same part (judge = "worst")


_END = object()


class Pipeline:
    """Runs a Source through an Inspector to a gate and sinks.

    source        an agent.sources.Source (or anything with open/read/close/live)
    inspector     an agent.inspector.Inspector (swap_inspector() replaces it atomically)
    gate          a firmware_io Gate (reject/accept, non-blocking) or None
    sinks         callables(Inspection) run in the output thread, in order
    deadline_ms   capture + deadline: later than this and the part is FAILSAFE
    failsafe      "reject" (default) or "pass": the gate action for a FAILSAFE part
    queue_size    inspect queue depth for live sources (1-2 keeps latency low)
    pull_queue_size  depth for file/folder sources read as fast as inspected (default 1)
    fps           pace a file/folder source to this rate (0: as fast as inspected)
    on_state      callable(component, state, reason) when the source state changes
    workers       inspect threads; give the inspector as many engines (Inspector.load
                  workers=N). Parts may then finish slightly out of order; each still gets
                  exactly one decision, gate action and report.
    needs_encoder the gate times kicks by encoder count: a part without one (no TRG) is
                  FAILSAFE (no_encoder), never timed by guess
    on_decided    callable(Inspection) run in the inspect thread right after the gate
                  command, before the next part (the reporter makes the alert durable there,
                  so a kill -9 cannot lose the alert of a part the gate was told to kick)
    """

    def __init__(self, source: Source, inspector: Inspector, *, gate=None,
                 sinks: Iterable[Callable[[Inspection], None]] = (),
                 deadline_ms: float = 250.0, failsafe: str = "reject", queue_size: int = 2,
                 gate_number: int = 1, fps: float = 0.0, reconnect_min_s: float = 0.1,
                 reconnect_max_s: float = 10.0, stall_timeout_s: float = 5.0,
                 part_prefix: str | None = None, out_queue_size: int = 1024,
                 on_state: Callable[[str, str, str], None] | None = None,
                 keep_images: bool = True, pull_queue_size: int = 1, workers: int = 1,
                 needs_encoder: bool = False,
                 on_decided: Callable[[Inspection], None] | None = None,
                 selector=None):
        if failsafe not in ("reject", "pass"):
            raise ValueError(f"failsafe must be 'reject' or 'pass', not {failsafe!r}")
        self.source = source
        self._inspector = inspector
        self.gate = gate
        self.sinks = list(sinks)
        self.deadline_ns = int(deadline_ms * 1e6)
        self.failsafe = failsafe
        self.queue_size = int(queue_size)
        self.gate_number = gate_number
        self.fps = float(fps or 0.0)
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.stall_timeout_ns = int(stall_timeout_s * 1e9)
        self.prefix = part_prefix or boot_prefix()
        self.on_state = on_state
        # agent.frame_checks.FrameChecker, run in the capture thread (it remembers the last
        # frame for the frozen check); None: no checks (the daemon sets one from config)
        self.frame_checks: FrameChecker | None = None
        self.keep_images = keep_images
        self.paused = False
        # agent.parts selector (trigger mode external/presence); None: every frame a part.
        # A frame may then make no part or several, so the source is never pulled per part.
        self.selector = selector
        self.mode = getattr(selector, "mode", "frame")
        self._admit_lock = threading.Lock()
        self.pull = not getattr(source, "live", False) and self.fps <= 0 and selector is None
        self.workers = max(1, int(workers))
        self.needs_encoder = needs_encoder
        self.on_decided = on_decided

        self._in_q: queue.SimpleQueue = queue.SimpleQueue()
        # Pull mode (files): one frame decoded ahead is all the overlap there is to gain; a
        # deeper queue only adds an invoke time of waiting to every part's latency.
        self.depth = (max(self.workers, min(pull_queue_size, self.queue_size)) if self.pull
                      else max(self.workers, self.queue_size))
        # Free inspect-queue slots as tokens in a C-level SimpleQueue (a cheaper semaphore).
        self._slots: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.depth):
            self._slots.put(None)
        self._in_depth = 0
        self._out_q: queue.SimpleQueue = queue.SimpleQueue()
        self._out_max = out_queue_size
        self._stop = threading.Event()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._seq = 0
        self._lock = threading.Lock()
        self._pool: list[np.ndarray] = []
        self._pool_spec = None
        self._pool_i = 0
        self._pending_encoder: int | None = None
        self._in_read_since = 0
        self._last_frame_ns = 0
        self._est_invoke_ns = 0.0

        self.source_state = "starting"
        self.source_reason = ""
        self.ended = False             # the source ran out (not looping)
        self.error: str | None = None  # a stage thread died (a bug): the run is a failure
        self.counts: dict[str, int] = collections.Counter()
        self.failsafes: dict[str, int] = collections.Counter()
        self.latency_ms: collections.deque = collections.deque(maxlen=2048)
        self.invoke_ms: collections.deque = collections.deque(maxlen=2048)
        self._rate_marks: collections.deque = collections.deque(maxlen=256)
        self.t_started = 0.0

    # -- control ---------------------------------------------------------------------------
    @property
    def inspector(self) -> Inspector:
        return self._inspector

    def swap_inspector(self, new: Inspector) -> Inspector:
        """Atomically make `new` judge every part from now on; returns the old one."""
        old, self._inspector = self._inspector, new
        return old

    def set_threshold(self, threshold: float | None) -> None:
        self._inspector = self._inspector.with_threshold(threshold)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def on_trigger(self, part: str, encoder: int) -> None:
        """A part-present trigger from the gate controller: the next frame carries its
        encoder count (encoder-mode reject timing); in external trigger mode, a part."""
        if self.selector is not None:
            self.selector.trigger(time.monotonic_ns(), int(encoder), part)
            return
        self._pending_encoder = int(encoder)

    def part_trigger(self, name: str = "", t_ns: int | None = None,
                     encoder: int | None = None) -> None:
        """A part-present trigger from MQTT, Modbus or a test (external trigger mode)."""
        if self.selector is not None:
            self.selector.trigger(time.monotonic_ns() if t_ns is None else t_ns, encoder, name)

    def start(self) -> "Pipeline":
        self.t_started = time.monotonic()
        stages = [("output", self._output_loop)]
        stages += [(f"inspect{i or ''}", self._inspect_loop) for i in range(self.workers)]
        for name, fn in stages + [("capture", self._capture_loop)]:
            t = threading.Thread(target=fn, name=f"pipeline-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop capturing, finish every part already captured (gate + reports), join.
        True when everything drained in time."""
        self._stop.set()
        return self.wait(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the pipeline has finished (source ended or stop()); True if it did."""
        if not self._done.wait(timeout):
            return False
        for t in self._threads:
            t.join(1.0)
        return True

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._done.is_set()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def waiting_for_source(self) -> bool:
        """The source is away and the capture thread is backing off to reopen it (not stuck
        inside a read, which check_stall() reports)."""
        return (self.running and self.source_state == "degraded" and not self._in_read_since
                and not self.ended)

    # -- state -----------------------------------------------------------------------------
    def _set_source_state(self, state: str, reason: str = "") -> None:
        if state == self.source_state and reason == self.source_reason:
            return
        self.source_state, self.source_reason = state, reason
        if state == "degraded":
            log.warning("source %s degraded: %s", self.source.describe(), reason)
        elif state == "connected":
            log.info("source %s connected", self.source.describe())
        if self.on_state is not None:
            try:
                self.on_state("source", state, reason)
            except Exception:
                log.exception("on_state callback failed")

    def check_stall(self) -> bool:
        """Call periodically: a source stuck in read() longer than stall_timeout_s is
        reported degraded (the read cannot be interrupted; the watchdog sees no progress)."""
        if self.selector is not None and self.running:
            # triggers whose frame never came (a stalled camera) are parts: FAILSAFE now
            for part in self.selector.poll(time.monotonic_ns()):
                self._admit_part(part)
        since = self._in_read_since
        if since and time.monotonic_ns() - since > self.stall_timeout_ns:
            self._set_source_state("degraded", "stalled: no frame for "
                                   f"{(time.monotonic_ns() - since) / 1e9:.1f} s")
            return True
        return False

    def queue_depths(self) -> dict[str, int]:
        return {"inspect": max(0, self._in_depth), "output": self._out_q.qsize()}

    def stats(self) -> dict:
        lat = sorted(self.latency_ms)
        inv = sorted(self.invoke_ms)

        def q(s, p):
            v = quantile(s, p)
            return None if v is None else round(v, 3)

        marks = list(self._rate_marks)
        rate = 0.0
        if len(marks) >= 2 and marks[-1][0] > marks[0][0]:
            rate = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])
        return {
            "mode": self.mode,
            "frames": self.counts["frames"],
            "selector": self.selector.counters() if self.selector is not None else {},
            "parts": self.counts["parts"],
            "pass": self.counts["PASS"], "reject": self.counts["REJECT"],
            "failsafe": self.counts["FAILSAFE"],
            "failsafe_reasons": dict(self.failsafes),
            "reports_dropped": self.counts["reports_dropped"],
            "images_dropped": self.counts["images_dropped"],
            "gate_errors": self.counts["gate_errors"],
            "rate": round(rate, 2),
            "latency_ms": {"p50": q(lat, 0.5), "p99": q(lat, 0.99), "max": lat[-1] if lat else None},
            "invoke_ms": {"p50": q(inv, 0.5), "p99": q(inv, 0.99)},
            "queues": self.queue_depths(),
            "source": self.source_state,
            "paused": self.paused,
        }

    # -- capture ---------------------------------------------------------------------------
    def _buffer(self, insp: Inspector) -> np.ndarray:
        if self._pool_spec is not insp.spec:
            # depth in the queue + one being inspected per worker + 1 being filled, a spare.
            self._pool = [insp.new_buffer() for _ in range(self.depth + self.workers + 2)]
            self._pool_spec = insp.spec
        self._pool_i = (self._pool_i + 1) % len(self._pool)
        return self._pool[self._pool_i]

    def _capture_loop(self) -> None:
        src = self.source
        backoff = self.reconnect_min_s
        is_open = False
        period_ns = int(1e9 / self.fps) if self.fps > 0 else 0
        next_ns = 0
        stop = self._stop
        try:
            while not stop.is_set():
                if not is_open:
                    try:
                        src.open()
                        is_open = True
                    except Exception as e:  # noqa: BLE001 - any failure: reopen with backoff
                        self._set_source_state("degraded", str(e) or type(e).__name__)
                        stop.wait(backoff)
                        backoff = min(self.reconnect_max_s, backoff * 2)
                        continue
                if self.pull:
                    while True:
                        try:
                            self._slots.get(timeout=0.1)
                            break
                        except queue.Empty:
                            if stop.is_set():
                                return
                elif period_ns:
                    now = time.monotonic_ns()
                    if next_ns > now:
                        if stop.wait((next_ns - now) / 1e9):
                            return
                        next_ns += period_ns
                    else:
                        next_ns = now + period_ns
                self._in_read_since = time.monotonic_ns() or 1
                try:
                    got = src.read()
                except Exception as e:  # noqa: BLE001
                    self._in_read_since = 0
                    if self.pull:
                        self._slots.put(None)
                    self._set_source_state("degraded", str(e) or type(e).__name__)
                    try:
                        src.close()
                    except Exception:  # noqa: BLE001
                        pass
                    is_open = False
                    stop.wait(backoff)
                    backoff = min(self.reconnect_max_s, backoff * 2)
                    continue
                self._in_read_since = 0
                if got is None:
                    if self.pull:
                        self._slots.put(None)
                    self.ended = True
                    self._set_source_state("ended", "end of source")
                    return
                backoff = self.reconnect_min_s
                if self.source_state != "connected":
                    self._set_source_state("connected")
                self._admit(got)
        except Exception as e:  # a bug must not end the line's capture silently
            log.exception("capture thread crashed")
            self.error = f"capture thread crashed: {type(e).__name__}: {e}"
            self._set_source_state("degraded", "capture thread crashed")
        finally:
            try:
                src.close()
            except Exception:  # noqa: BLE001
                pass
            self._in_q.put(_END)

    def _admit(self, got: Captured) -> None:
        with self._lock:
            self.counts["frames"] += 1
        self._last_frame_ns = got.t_decoded_ns
        if self.selector is None:
            return self._admit_frame(got)
        for part in self.selector.feed(got):
            self._admit_part(part)

    def _admit_part(self, part: Part) -> None:
        # The part's reference time (trigger, line crossing) stands in for the capture
        # time: deadlines and the gate's travel delay count from it.
        with self._admit_lock:
            if part.failsafe is None:
                return self._admit_frame(part.captured, part.t_ref_ns, part.encoder, part.extra,
                                         part.ref, part.box, part.extra_boxes)
            self._seq += 1
            seq = self._seq
            frame = Frame(seq, f"{self.prefix}-{seq}", part.t_ref_ns, time.time(), None,
                          part.ref, part.encoder, part.t_ref_ns, part.detail)
            self._finish(frame, Verdict.FAILSAFE, math.nan, "", part.failsafe, self._inspector,
                         part.t_ref_ns, part.t_ref_ns, 0, 0, 0)

    def _admit_frame(self, got: Captured, t_ref_ns: int | None = None,
                     enc: int | None = None, extra=(), ref: str = "", box=None,
                     extra_boxes=()) -> None:
        self._seq += 1
        seq = self._seq
        if self.selector is None:
            enc, self._pending_encoder = self._pending_encoder, None
        tc = got.t_capture_ns if t_ref_ns is None else t_ref_ns
        image = got.image
        if box is not None and image is not None:
            # presence mode: the part, not the belt around it, is what is judged (and kept)
            image = box.crop(image)
            got = Captured(image, got.ref, got.t_capture_ns, got.t_decoded_ns, got.error)
        frame = Frame(seq, f"{self.prefix}-{seq}", tc, time.time(), image,
                      f"{got.ref} {ref}" if ref else got.ref, enc, got.t_decoded_ns, got.error)
        if not self.pull:
            try:
                self._slots.get_nowait()
            except queue.Empty:
                # A live frame and the inspector is behind: this part cannot be inspected in
                # time. FAILSAFE it now rather than drop it or let latency grow.
                self._finish(frame, Verdict.FAILSAFE, math.nan, "", OVERLOAD, self._inspector,
                             got.t_decoded_ns, got.t_decoded_ns, 0, 0, 0)
                return
        insp = self._inspector
        pixels = None
        if frame.error is None:
            try:
                pixels = insp.preprocess(got.image, self._buffer(insp))
            except Exception as e:  # noqa: BLE001 - odd frame: FAILSAFE, never a crash
                frame.error = f"{PREPROCESS}: {e}"
        if frame.error is None and self.frame_checks is not None:
            frame.error = self.frame_checks.check(got.image, insp.bundle.input_stats)
        more = []
        if frame.error is None:
            boxes = tuple(extra_boxes) + (None,) * (len(extra) - len(extra_boxes))
            for c, b in zip(extra, boxes):
                try:
                    more.append(insp.preprocess(c.image if b is None else b.crop(c.image)))
                except Exception:  # noqa: BLE001 - the main frame still judges the part
                    pass
        self._in_depth += 1
        self._in_q.put(_Item(frame, pixels, insp, time.monotonic_ns(), more))

    # -- inspect ---------------------------------------------------------------------------
    def _inspect_loop(self) -> None:
        get = self._in_q.get
        mono = time.monotonic_ns
        release = self._slots.put
        deadline_ns = self.deadline_ns
        try:
            while True:
                item = get()
                if item is _END:
                    self._in_q.put(_END)     # for the sibling inspect threads
                    break
                release(None)
                self._in_depth -= 1
                frame = item.frame
                insp = self._inspector
                t_deq = mono()
                score, label, reason = math.nan, "", None
                decided = None
                t_inv = t_dec = t_deq
                deadline = frame.t_capture_ns + deadline_ns
                if self.paused:
                    verdict, reason = Verdict.FAILSAFE, PAUSED
                elif self.needs_encoder and frame.encoder is None:
                    verdict, reason = Verdict.FAILSAFE, NO_ENCODER
                    self._log_no_encoder(frame)
                elif frame.error is not None:
                    verdict = Verdict.FAILSAFE
                    reason = reason_kind(frame.error)
                    reason = reason if reason in _FRAME_ERRORS else DECODE
                elif t_deq + self._est_invoke_ns > deadline:
                    verdict, reason = Verdict.FAILSAFE, DEADLINE
                else:
                    pixels = item.pixels
                    try:
                        if item.insp is not insp and item.insp.spec != insp.spec:
                            pixels = insp.preprocess(frame.image)
                        probs = insp.infer(pixels)
                        t_inv = mono()
                        verdict, score, label = insp.decide(probs)
                        decided = pixels
                        for px in item.extra:     # judge = "worst": the worst frame decides
                            v2, s2, l2 = insp.decide(insp.infer(px))
                            if s2 > score:
                                verdict, score, label, decided = v2, s2, l2, px
                        t_dec = mono()
                    except Exception as e:  # noqa: BLE001 - FAILSAFE, counted, reported
                        t_inv = t_dec = mono()
                        verdict, reason = Verdict.FAILSAFE, INFERENCE
                        frame.error = f"{type(e).__name__}: {e}"
                        log.warning("part %s: inference failed: %s", frame.part_id, frame.error)
                    dt = t_inv - t_deq
                    self._est_invoke_ns += 0.1 * (dt - self._est_invoke_ns) if self._est_invoke_ns \
                        else dt
                    self.invoke_ms.append(dt / 1e6)
                    if reason is None and t_dec > deadline:
                        verdict, reason = Verdict.FAILSAFE, DEADLINE
                self._finish(frame, verdict, score, label, reason, insp, item.t_pre_ns, t_deq,
                             t_inv, t_dec, 1, decided if reason is None else None)
        except Exception as e:
            log.exception("inspect thread crashed")
            self.error = f"inspect thread crashed: {type(e).__name__}: {e}"
            self._stop.set()
        finally:
            self._out_q.put(_END)

    def _log_no_encoder(self, frame: Frame) -> None:
        # Loud (ERROR), but a controller that stopped sending TRG must not flood the journal
        # at line rate: the first ten, then every hundredth (all are counted).
        with self._lock:
            n = self.failsafes[NO_ENCODER] + 1
        if n <= 10 or n % 100 == 0:
            log.error("part %s: encoder timing but no encoder count (no TRG from the gate "
                      "controller for it): FAILSAFE, no kick can be timed (%d so far)",
                      frame.part_id, n)

    def _finish(self, frame: Frame, verdict: Verdict, score: float, label: str,
                reason: str | None, insp: Inspector, t_pre: int, t_deq: int, t_inv: int,
                t_dec: int, inspected: int, pixels: np.ndarray | None = None) -> None:
        """Act on the decision (gate) at once, then hand the record to the output thread.
        A REJECT of an engine with maps gets its defect map here, after the gate command and
        the alert commit (the part's gate timing never waits for it)."""
        act_reject = verdict is Verdict.REJECT or (verdict is Verdict.FAILSAFE
                                                   and self.failsafe == "reject")
        gate = self.gate
        target, late, gerr = "", False, None
        t_g0 = time.monotonic_ns()
        if gate is not None:
            try:
                if act_reject:
                    out = gate.reject(frame.part_id, frame.t_capture_ns, frame.encoder,
                                      self.gate_number)
                    target, late, gerr = out.target, out.late, out.error
                    if not out.sent and gerr is None:
                        gerr = "not sent"
                else:
                    gate.accept(frame.part_id)
            except Exception as e:  # noqa: BLE001
                gerr = f"{type(e).__name__}: {e}"
        t_g1 = time.monotonic_ns()
        tc = frame.t_capture_ns
        if inspected:
            timings = {"decode": (frame.t_decoded_ns - tc) / 1e6,
                       "preprocess": (t_pre - frame.t_decoded_ns) / 1e6,
                       "queue": (t_deq - t_pre) / 1e6, "invoke": (t_inv - t_deq) / 1e6,
                       "decide": (t_dec - t_inv) / 1e6, "gate": (t_g1 - t_g0) / 1e6,
                       "total": (t_g1 - tc) / 1e6}
        else:
            timings = {"decode": (frame.t_decoded_ns - tc) / 1e6, "gate": (t_g1 - t_g0) / 1e6,
                       "total": (t_g1 - tc) / 1e6}
        if reason is None:
            why = ""
        elif frame.error and reason in (DECODE, INFERENCE, *_FRAME_ERRORS, *PART_REASONS):
            why = frame.error if frame.error.startswith(reason) else f"{reason}: {frame.error}"
        else:
            why = reason
        # Frames are ~1 MB: while the output thread is behind, reports keep flowing but
        # stop carrying images (counted as images_dropped), so memory stays bounded.
        image = frame.image if self.keep_images and self._out_q.qsize() < IMAGE_BACKLOG else None
        insp_rec = Inspection(
            frame.part_id, frame.seq, frame.source_ref, tc, frame.t_wall, verdict,
            label or (insp.good_label if verdict is Verdict.PASS else ""), score,
            insp.threshold, why, frame.encoder, timings,
            image,
            insp.model_sha256, timings["total"], target, late, gerr)
        if self.on_decided is not None:
            try:
                self.on_decided(insp_rec)
            except Exception:  # noqa: BLE001 - the output thread reports it after all
                log.exception("part %s: on_decided failed", frame.part_id)
        if verdict is Verdict.REJECT and pixels is not None and image is not None and insp.can_map:
            t_m0 = time.monotonic_ns()
            try:
                insp_rec.defect_map = insp.defect_map(pixels)
            except Exception as e:  # noqa: BLE001 - a picture aid: the verdict stands
                log.warning("part %s: defect map failed: %s", frame.part_id, e)
            timings["map"] = (time.monotonic_ns() - t_m0) / 1e6
        with self._lock:
            c = self.counts
            c["parts"] += 1
            c[verdict.value] += 1
            if reason is not None:
                self.failsafes[reason] += 1
            if gerr is not None and act_reject:
                c["gate_errors"] += 1
            self.latency_ms.append(timings["total"])
            if self.keep_images and image is None:
                c["images_dropped"] += 1
        if self._out_q.qsize() < self._out_max:
            self._out_q.put(insp_rec)
        else:
            with self._lock:
                self.counts["reports_dropped"] += 1

    # -- output ----------------------------------------------------------------------------
    def _output_loop(self) -> None:
        get = self._out_q.get
        n = 0
        ends = 0
        try:
            while True:
                rec = get()
                if rec is _END:
                    ends += 1
                    if ends == self.workers:
                        break
                    continue
                for sink in self.sinks:
                    try:
                        sink(rec)
                    except Exception:  # noqa: BLE001 - a report must never stop the line
                        log.exception("sink %r failed on part %s", sink, rec.part_id)
                rec.image = None
                n += 1
                self._rate_marks.append((time.monotonic(), n))
        finally:
            self._done.set()


def reason_kind(reason: str) -> str:
    """The FAILSAFE reason code at the start of an Inspection.reason ('deadline: ...')."""
    return reason.split(":", 1)[0] if reason else ""


__all__ = ["Pipeline", "boot_prefix", "reason_kind", "FAILSAFE_REASONS", "STAGES",
           "SourceError"]
