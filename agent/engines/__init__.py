"""Inference backends behind a registry: one small class per backend.

Add ONNX Runtime or TensorRT by writing a class with `name`, `available()` and `invoke()`
and decorating it with @register; the pipeline never changes.
"""

from __future__ import annotations

from .base import Engine, EngineError, EnginePool, ENGINES, register, create_engine  # noqa: F401
from . import litert, edgetpu  # noqa: F401,E402  (registration side effect)
