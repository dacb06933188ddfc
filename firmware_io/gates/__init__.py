"""Reject-gate backends behind one interface. Each backend module holds its gate class and
its config model (``kind: Literal[...]``), as Frigate's detector plugins do; ``GateConfig``
is their union, discriminated by ``kind``, and a gate is built from its own model:

    gate = create_gate(SerialGateConfig(port="/dev/ttyUSB0", delay_ms=800))
    gate.open()                          # never raises for a missing device
    outcome = gate.reject("P42", t_capture_ns)

The backends' optional dependencies (pyserial, pymodbus) are imported only when a gate is
built, so the configs validate on a workstation without them.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field, TypeAdapter

from ..checked import DEFER_CHECKS, Problem
from .base import Gate, GateOutcome
from .base import GateConfig as BaseGateConfig
from .modbus_gate import ModbusGate, ModbusGateConfig
from .mqtt_gate import MqttGate, MqttGateConfig
from .null_gate import NoneGateConfig, NullGate
from .serial_gate import SerialGate, SerialGateConfig

GateConfig = Annotated[Union[SerialGateConfig, ModbusGateConfig, MqttGateConfig, NoneGateConfig],
                       Field(discriminator="kind")]
GATE_CONFIG = TypeAdapter(GateConfig)

_REGISTRY: dict[str, type[Gate]] = {}


def register_gate(cls: type[Gate]) -> type[Gate]:
    """Class decorator: make ``cls`` (with ``kind`` and its ``config`` model) buildable."""
    kind = getattr(cls, "kind", None)
    if not kind:
        raise TypeError(f"{cls.__name__} has no 'kind'")
    _REGISTRY[kind] = cls
    return cls


for _cls in (SerialGate, ModbusGate, MqttGate, NullGate):
    register_gate(_cls)

# kind -> config model, in the order check-config names them
GATE_KINDS: dict[str, type[BaseGateConfig]] = {c.kind: c.config for c in _REGISTRY.values()}


def gate_kinds() -> list[str]:
    return sorted(_REGISTRY)


def gate_class(kind: str) -> type[Gate]:
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown gate kind {kind!r}; known: {', '.join(gate_kinds())}") from None


def create_gate(config: BaseGateConfig, link=None, **hooks) -> Gate:
    """The gate ``config`` describes; call .open() on it. ``hooks``: on_trigger, on_fired,
    on_reject_failed (called on the gate's threads)."""
    return gate_class(config.kind)(config, link=link, **hooks)


__all__ = ["DEFER_CHECKS", "GATE_CONFIG", "GATE_KINDS", "Gate", "GateConfig", "GateOutcome",
           "ModbusGateConfig", "MqttGateConfig", "NoneGateConfig", "Problem",
           "SerialGateConfig", "create_gate", "gate_class", "gate_kinds", "register_gate"]
