"""Reject-gate backends behind one interface, chosen by name from a small registry.

    gate = create_gate("serial", GateSettings(port="/dev/ttyUSB0"))
    gate.open()                          # never raises for a missing device
    outcome = gate.reject("P42", t_capture_ns)

A backend is one class with a ``kind`` and the ``Gate`` methods, registered with
``@register_gate``. Built-in kinds are imported lazily (so a box without pymodbus can still
use the serial gate).
"""

from __future__ import annotations

import importlib

from .base import Gate, GateOutcome, GateSettings

_REGISTRY: dict[str, type[Gate]] = {}
_BUILTIN = {
    "serial": "firmware_io.gates.serial_gate",
    "modbus": "firmware_io.gates.modbus_gate",
    "mqtt": "firmware_io.gates.mqtt_gate",
    "none": "firmware_io.gates.null_gate",
}


def register_gate(cls: type[Gate]) -> type[Gate]:
    """Class decorator: make ``cls`` available to create_gate under ``cls.kind``."""
    kind = getattr(cls, "kind", None)
    if not kind:
        raise TypeError(f"{cls.__name__} has no 'kind'")
    _REGISTRY[kind] = cls
    return cls


def gate_kinds() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def gate_class(kind: str) -> type[Gate]:
    if kind not in _REGISTRY and kind in _BUILTIN:
        importlib.import_module(_BUILTIN[kind])
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown gate kind {kind!r}; known: {', '.join(gate_kinds())}") from None


def create_gate(kind: str, settings: GateSettings | None = None, link=None) -> Gate:
    """A gate of ``kind`` ("serial", "modbus", "mqtt", "none"); call .open() on it."""
    return gate_class(kind)(settings or GateSettings(), link=link)


__all__ = ["Gate", "GateOutcome", "GateSettings", "create_gate", "register_gate", "gate_kinds",
           "gate_class"]
