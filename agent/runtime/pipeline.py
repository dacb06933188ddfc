"""The inspection pipeline: the stages wired one way, in three kinds of threads.

    capture thread   ReconnectingSource (capture.py): read, pace, reconnect with backoff
                       -> selector (parts.py, the trigger mode): frames -> parts
                       -> Intake (intake.py): ids, crop, preprocess into a pooled buffer
                                                                               --in_q-->
    inspect thread   Judge (judge.py): deadline check, engine.invoke, decide
                       -> Actuator (actuator.py): gate.reject / gate.accept, at once
                       -> on_decided (the alert's durable commit), StatsCollector
                                                                               --out_q-->
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

import logging
import queue
import threading
import time
from typing import Callable, Iterable

from agent.runtime.actuator import Actuator, GateAction
from agent.runtime.capture import ReconnectingSource, Slots, SourceState
from agent.frame_checks import FrameChecker
from agent.runtime.inspector import Inspector
from agent.runtime.intake import Intake, Work, boot_prefix
from agent.runtime.judge import Judge, Judgement, unjudged
from agent.runtime.selector import FrameSelector
from agent.runtime.sources import Captured, Source, SourceError
from agent.runtime.stats import STAGES, PipelineStats, StatsCollector
from agent.types import FailsafeReason, Frame, Inspection, Verdict

log = logging.getLogger("pipeline")

# FAILSAFE reasons (agent.types.FailsafeReason; the values are the Prometheus labels)
DEADLINE = FailsafeReason.DEADLINE
OVERLOAD = FailsafeReason.OVERLOAD
INFERENCE = FailsafeReason.INFERENCE
DECODE = FailsafeReason.DECODE
PREPROCESS = FailsafeReason.PREPROCESS
PAUSED = FailsafeReason.PAUSED
NO_ENCODER = FailsafeReason.NO_ENCODER
FAILSAFE_REASONS = tuple(FailsafeReason)

IMAGE_BACKLOG = 16               # reports in the output queue beyond which images are dropped

_END = object()


class Pipeline:
    """Runs a Source through an Inspector to a gate and sinks.

    source        an agent.runtime.sources.Source (or anything with open/read/close/live)
    inspector     an agent.runtime.inspector.Inspector (swap_inspector() replaces it atomically)
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
    selector      agent.runtime.parts selector (trigger mode external/presence); None: mode frame
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
        self.actuator = Actuator(gate, gate_number, failsafe)
        self._inspector = inspector
        self.sinks = list(sinks)
        self.queue_size = int(queue_size)
        self.keep_images = keep_images
        self.paused = False
        self.workers = max(1, int(workers))
        self.on_decided = on_decided
        self.error: str | None = None  # a stage thread died (a bug): the run is a failure
        self.t_started = 0.0
        self.collector = StatsCollector()
        self.judge = Judge(deadline_ms=deadline_ms, needs_encoder=needs_encoder,
                           stats=self.collector)

        # The trigger mode. A frame may make no part or several, so the source is pulled
        # per frame only in mode frame.
        self.selector = selector
        self.mode = getattr(selector, "mode", "frame")
        self._parts = selector if selector is not None else FrameSelector()
        fps = float(fps or 0.0)
        self.pull = not getattr(source, "live", False) and fps <= 0 and selector is None
        # Pull mode (files): one frame decoded ahead is all the overlap there is to gain; a
        # deeper queue only adds an invoke time of waiting to every part's latency.
        self.depth = (max(self.workers, min(pull_queue_size, self.queue_size)) if self.pull
                      else max(self.workers, self.queue_size))
        slots = Slots(self.depth)
        self._slots = slots
        self.capture = ReconnectingSource(
            source, fps=fps, reconnect_min_s=reconnect_min_s, reconnect_max_s=reconnect_max_s,
            stall_timeout_s=stall_timeout_s, on_state=on_state,
            room=slots if self.pull else None)
        self._in_q: queue.SimpleQueue = queue.SimpleQueue()
        # buffers: depth in the queue + one being inspected per worker + 1 filled, a spare
        self.intake = Intake(part_prefix or boot_prefix(), inspector=lambda: self._inspector,
                             put=self._in_q.put, unjudged=self._finish_unjudged,
                             room=None if self.pull else slots,
                             buffers=self.depth + self.workers + 2)
        self._out_q: queue.SimpleQueue = queue.SimpleQueue()
        self._out_max = out_queue_size
        self._stop = threading.Event()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- the stages' settings, as the daemon sets them -----------------------------------
    source = property(lambda self: self.capture.source)
    gate = property(lambda self: self.actuator.gate)
    gate_number = property(lambda self: self.actuator.gate_number)
    prefix = property(lambda self: self.intake.prefix)
    fps = property(lambda self: self.capture.fps)
    needs_encoder = property(lambda self: self.judge.needs_encoder)

    @property
    def failsafe(self) -> str:
        return self.actuator.failsafe

    @failsafe.setter
    def failsafe(self, policy: str) -> None:
        self.actuator.failsafe = policy

    @property
    def deadline_ns(self) -> int:
        return self.judge.deadline_ns

    @deadline_ns.setter
    def deadline_ns(self, ns: int) -> None:
        self.judge.deadline_ns = int(ns)

    @property
    def frame_checks(self) -> FrameChecker | None:
        return self.intake.frame_checks

    @frame_checks.setter
    def frame_checks(self, checker: FrameChecker | None) -> None:
        self.intake.frame_checks = checker

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
        self._parts.latch(encoder)

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

    # -- state -----------------------------------------------------------------------------
    @property
    def source_state(self) -> str:
        return self.capture.state.value

    @property
    def source_reason(self) -> str:
        return self.capture.reason

    @property
    def ended(self) -> bool:
        """The source ran out (not looping)."""
        return self.capture.ended

    @property
    def waiting_for_source(self) -> bool:
        """The source is away and the capture thread is backing off to reopen it (not stuck
        inside a read, which check_stall() reports)."""
        return self.running and self.capture.waiting

    def check_stall(self) -> bool:
        """Call periodically: triggers whose frame never came become FAILSAFE parts, and a
        source stuck in read() longer than stall_timeout_s is reported degraded."""
        if self.selector is not None and self.running:
            # triggers whose frame never came (a stalled camera) are parts: FAILSAFE now
            for part in self.selector.poll(time.monotonic_ns()):
                self.intake.admit(part)
        return self.capture.check_stall()

    @property
    def counts(self):
        return self.collector.counts

    @property
    def failsafes(self):
        return self.collector.failsafes

    @property
    def latency_ms(self):
        return self.collector.latency_ms

    @property
    def invoke_ms(self):
        return self.collector.invoke_ms

    def queue_depths(self) -> dict[str, int]:
        return {"inspect": max(0, self.intake.queued), "output": self._out_q.qsize()}

    def snapshot(self) -> PipelineStats:
        """Everything counted so far, as one typed object (status line, metrics, Prometheus)."""
        return self.collector.snapshot(
            mode=self.mode, queues=self.queue_depths(), source=self.source_state,
            source_reason=self.source_reason, paused=self.paused,
            selector=self.selector.counters() if self.selector is not None else {})

    def stats(self) -> dict:
        return self.snapshot().as_dict()

    # -- capture ---------------------------------------------------------------------------
    def _capture_loop(self) -> None:
        try:
            self.capture.run(self._admit, self._stop)
        except Exception as e:  # a bug must not end the line's capture silently
            log.exception("capture thread crashed")
            self.error = f"capture thread crashed: {type(e).__name__}: {e}"
            self.capture.set_state(SourceState.DEGRADED, "capture thread crashed")
        finally:
            self._in_q.put(_END)

    def _admit(self, got: Captured) -> None:
        self.collector.frame()
        for part in self._parts.feed(got):
            self.intake.admit(part)

    # -- inspect ---------------------------------------------------------------------------
    def _inspect_loop(self) -> None:
        get = self._in_q.get
        release = self._slots.give
        try:
            while True:
                work: Work = get()
                if work is _END:
                    self._in_q.put(_END)     # for the sibling inspect threads
                    break
                release()
                self.intake.queued -= 1
                insp = self._inspector
                self._finish(work.frame, self.judge.judge(work, insp, self.paused), insp,
                             work.t_pre_ns)
        except Exception as e:
            log.exception("inspect thread crashed")
            self.error = f"inspect thread crashed: {type(e).__name__}: {e}"
            self._stop.set()
        finally:
            self._out_q.put(_END)

    def _finish_unjudged(self, frame: Frame, reason: FailsafeReason, detail: str,
                         insp: Inspector) -> None:
        self._finish(frame, unjudged(reason, detail), insp, frame.t_decoded_ns)

    def _finish(self, frame: Frame, j: Judgement, insp: Inspector, t_pre: int) -> None:
        """Act on the decision (gate) at once, then hand the record to the output thread.
        A REJECT of an engine with maps gets its defect map here, after the gate command and
        the alert commit (the part's gate timing never waits for it)."""
        done = self.actuator.act(frame.part_id, frame.t_capture_ns, frame.encoder, j.verdict)
        timings = _timings(frame, t_pre, j, done)
        # Frames are ~1 MB: while the output thread is behind, reports keep flowing but
        # stop carrying images (counted as images_dropped), so memory stays bounded.
        image = frame.image if self.keep_images and self._out_q.qsize() < IMAGE_BACKLOG else None
        verdict = j.verdict
        rec = Inspection(
            frame.part_id, frame.seq, frame.source_ref, frame.t_capture_ns, frame.t_wall,
            verdict, j.label or (insp.good_label if verdict is Verdict.PASS else ""), j.score,
            insp.threshold, j.reason, frame.encoder, timings, image, insp.model_sha256,
            timings["total"], done.target, done.late, done.error,
            failsafe_reason=j.failsafe, action=done.action)
        if self.on_decided is not None:
            try:
                self.on_decided(rec)
            except Exception:  # noqa: BLE001 - the output thread reports it after all
                log.exception("part %s: on_decided failed", frame.part_id)
        if (verdict is Verdict.REJECT and j.pixels is not None and image is not None
                and insp.can_map):
            t_m0 = time.monotonic_ns()
            try:
                rec.defect_map = insp.defect_map(j.pixels)
            except Exception as e:  # noqa: BLE001 - a picture aid: the verdict stands
                log.warning("part %s: defect map failed: %s", frame.part_id, e)
            timings["map"] = (time.monotonic_ns() - t_m0) / 1e6
        self.collector.part(rec, gate_failed=done.failed,
                         image_dropped=self.keep_images and image is None)
        if self._out_q.qsize() < self._out_max:
            self._out_q.put(rec)
        else:
            self.collector.report_dropped()

    # -- output ----------------------------------------------------------------------------
    def _output_loop(self) -> None:
        get = self._out_q.get
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
                self.collector.reported()
        finally:
            self._done.set()


def _timings(frame: Frame, t_pre: int, j: Judgement, done: GateAction) -> dict[str, float]:
    """Per-stage ms of one part (STAGES; total = capture or trigger to gate command)."""
    tc = frame.t_capture_ns
    if not j.inspected:
        return {"decode": (frame.t_decoded_ns - tc) / 1e6, "gate": done.gate_ms,
                "total": (done.t_end_ns - tc) / 1e6}
    return {"decode": (frame.t_decoded_ns - tc) / 1e6,
            "preprocess": (t_pre - frame.t_decoded_ns) / 1e6,
            "queue": (j.t_deq_ns - t_pre) / 1e6, "invoke": (j.t_inv_ns - j.t_deq_ns) / 1e6,
            "decide": (j.t_dec_ns - j.t_inv_ns) / 1e6, "gate": done.gate_ms,
            "total": (done.t_end_ns - tc) / 1e6}


__all__ = ["Pipeline", "PipelineStats", "boot_prefix", "FAILSAFE_REASONS", "STAGES",
           "SourceError"]
