"""The actuator: a part's verdict becomes a gate command, at once (the part is moving).

    act = Actuator(gate, gate_number=1, failsafe="reject")
    done = act.act(part_id, t_ref_ns, encoder, verdict)   # GateAction
    done.action                                          # Action.REJECT / Action.PASS

A REJECT, and a FAILSAFE under the default policy, is `gate.reject()` (non-blocking: the
firmware_io gate turns t_ref + travel delay into `d<ms>` or `e<count>`); anything else is
`gate.accept()`. A gate that raises or does not send is an error in the result, never an
exception: the part is still reported, and counted as a gate error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from agent.types import Action, Verdict

POLICIES = ("reject", "pass")


@dataclass(frozen=True, slots=True)
class GateAction:
    action: Action
    target: str = ""             # the command's target ("d612", "e1234"), when sent
    late: bool = False           # sent with less lead than the gate needs
    error: str | None = None     # the reject could not be commanded (or the accept failed)
    t_start_ns: int = 0
    t_end_ns: int = 0

    @property
    def gate_ms(self) -> float:
        return (self.t_end_ns - self.t_start_ns) / 1e6

    @property
    def failed(self) -> bool:
        """A kick that was due and not commanded (what gate_errors counts)."""
        return self.error is not None and self.action is Action.REJECT


class Actuator:
    def __init__(self, gate=None, gate_number: int = 1, failsafe: str = "reject"):
        self.gate = gate
        self.gate_number = gate_number
        self.failsafe = failsafe

    @property
    def failsafe(self) -> str:
        return self._failsafe

    @failsafe.setter
    def failsafe(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"failsafe must be 'reject' or 'pass', not {policy!r}")
        self._failsafe = policy

    def action_for(self, verdict: Verdict) -> Action:
        if verdict is Verdict.REJECT or (verdict is Verdict.FAILSAFE
                                         and self._failsafe == "reject"):
            return Action.REJECT
        return Action.PASS

    def act(self, part_id: str, t_ref_ns: int, encoder: int | None,
            verdict: Verdict) -> GateAction:
        action = self.action_for(verdict)
        gate = self.gate
        target, late, err = "", False, None
        t0 = time.monotonic_ns()
        if gate is not None:
            try:
                if action is Action.REJECT:
                    out = gate.reject(part_id, t_ref_ns, encoder, self.gate_number)
                    target, late, err = out.target, out.late, out.error
                    if not out.sent and err is None:
                        err = "not sent"
                else:
                    gate.accept(part_id)
            except Exception as e:  # noqa: BLE001 - reported with the part, never a crash
                err = f"{type(e).__name__}: {e}"
        return GateAction(action, target, late, err, t0, time.monotonic_ns())


__all__ = ["Actuator", "GateAction", "POLICIES"]
