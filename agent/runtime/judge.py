"""The inspect stage's decision: one queued part -> one Judgement (inspect threads).

    judge = Judge(deadline_ms=250, needs_encoder=False, stats=collector)
    j = judge.judge(work, inspector, paused)     # Judgement: verdict, score, why

In order, a part is FAILSAFE without inference when inspection is paused, when encoder
timing has no count for it, when intake found its frame unusable (decode, preprocess, frame
checks), or when the expected invoke time (a running average) cannot fit before its
deadline: a backlog then drains instead of growing. Otherwise it is inferred and decided
(judge = "worst": every frame of the part, the worst score decides); an engine error, or a
decision after the deadline, is FAILSAFE too.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from agent.runtime.inspector import Inspector
from agent.runtime.intake import Work
from agent.runtime.stats import StatsCollector
from agent.types import FailsafeReason, Verdict

log = logging.getLogger("pipeline")

R = FailsafeReason


@dataclass(slots=True)
class Judgement:
    verdict: Verdict
    score: float = math.nan
    label: str = ""
    failsafe: FailsafeReason | None = None
    detail: str = ""                  # the failsafe's own words (Inspection.reason's tail)
    t_deq_ns: int = 0                 # taken off the inspect queue
    t_inv_ns: int = 0                 # inference done
    t_dec_ns: int = 0                 # decided
    inspected: bool = True            # went through the inspect stage (full timings)
    pixels: np.ndarray | None = None  # the input that decided a judged part (defect map)

    @property
    def reason(self) -> str:
        return "" if self.failsafe is None else self.failsafe.text(self.detail)


def unjudged(reason: FailsafeReason, detail: str = "") -> Judgement:
    """A part that never reached the inspect stage (selector, overload)."""
    return Judgement(Verdict.FAILSAFE, failsafe=reason, detail=detail, inspected=False)


class Judge:
    def __init__(self, *, deadline_ms: float = 250.0, needs_encoder: bool = False,
                 stats: StatsCollector | None = None):
        self.deadline_ns = int(deadline_ms * 1e6)
        self.needs_encoder = needs_encoder
        self.stats = stats or StatsCollector()
        self.est_invoke_ns = 0.0
        self._no_encoder = itertools.count(1)

    def judge(self, work: Work, insp: Inspector, paused: bool) -> Judgement:
        mono = time.monotonic_ns
        frame = work.frame
        t_deq = mono()
        j = Judgement(Verdict.FAILSAFE, t_deq_ns=t_deq, t_inv_ns=t_deq, t_dec_ns=t_deq)
        deadline = frame.t_capture_ns + self.deadline_ns
        if paused:
            j.failsafe = R.PAUSED
        elif self.needs_encoder and frame.encoder is None:
            j.failsafe = R.NO_ENCODER
            self._log_no_encoder(frame.part_id)
        elif work.problem is not None:
            j.failsafe, j.detail = work.problem
        elif t_deq + self.est_invoke_ns > deadline:
            j.failsafe = R.DEADLINE
        else:
            self._infer(work, insp, j)
            if j.failsafe is None and j.t_dec_ns > deadline:
                j.verdict, j.failsafe, j.pixels = Verdict.FAILSAFE, R.DEADLINE, None
        return j

    def _infer(self, work: Work, insp: Inspector, j: Judgement) -> None:
        mono = time.monotonic_ns
        pixels = work.pixels
        try:
            if work.inspector is not insp and work.inspector.spec != insp.spec:
                # preprocessed for a model swapped out since, with another input spec
                pixels = insp.preprocess(work.frame.image)
            probs = insp.infer(pixels)
            j.t_inv_ns = mono()
            j.verdict, j.score, j.label = insp.decide(probs)
            j.pixels = pixels
            for px in work.extra:          # judge = "worst": the worst frame decides
                v2, s2, l2 = insp.decide(insp.infer(px))
                if s2 > j.score:
                    j.verdict, j.score, j.label, j.pixels = v2, s2, l2, px
            j.t_dec_ns = mono()
        except Exception as e:  # noqa: BLE001 - FAILSAFE, counted, reported
            j.t_inv_ns = j.t_dec_ns = mono()
            # a score from frames decided before the error stays (what was seen)
            j.verdict, j.failsafe, j.pixels = Verdict.FAILSAFE, R.INFERENCE, None
            j.detail = f"{type(e).__name__}: {e}"
            log.warning("part %s: inference failed: %s", work.frame.part_id, j.detail)
        dt = j.t_inv_ns - j.t_deq_ns
        self.est_invoke_ns += 0.1 * (dt - self.est_invoke_ns) if self.est_invoke_ns else dt
        self.stats.invoke(dt / 1e6)

    def _log_no_encoder(self, part_id: str) -> None:
        # Loud (ERROR), but a controller that stopped sending TRG must not flood the journal
        # at line rate: the first ten, then every hundredth (all are counted).
        n = next(self._no_encoder)
        if n <= 10 or n % 100 == 0:
            log.error("part %s: encoder timing but no encoder count (no TRG from the gate "
                      "controller for it): FAILSAFE, no kick can be timed (%d so far)",
                      part_id, n)


__all__ = ["Judge", "Judgement", "unjudged"]
