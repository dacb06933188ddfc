"""Inference backends behind a registry: one small class per backend.

A backend is a class with `name`, `available()` and `invoke()`, decorated with @register; the
pipeline never changes. cpu (LiteRT), edgetpu, and the ONNX Runtime ones (tensorrt, cuda,
onnx-cpu: onnxrt.py, imported lazily, onnxruntime being an optional extra).
"""

from __future__ import annotations

from agent.runtime.engines.base import Engine, EngineError, EnginePool, ENGINES, register, create_engine  # noqa: F401
from agent.runtime.engines import litert, edgetpu, onnxrt  # noqa: F401,E402  (registration side effect)
