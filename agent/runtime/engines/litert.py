"""LiteRT (ai_edge_litert) on the CPU with XNNPACK; tflite_runtime on boxes that have it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from agent.preprocess import InputSpec, to_input_tensor
from agent.runtime.engines.base import Engine, EngineError, register

log = logging.getLogger("engine")


def interpreter_module():
    """The Interpreter module: ai_edge_litert first, tflite_runtime as the fallback."""
    try:
        from ai_edge_litert import interpreter as mod
        return mod
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter as mod  # type: ignore[no-redef]
        return mod
    except ImportError:
        raise EngineError("no TFLite runtime installed: pip install ai-edge-litert "
                          "(or tflite-runtime on boxes where LiteRT has no wheel)") from None


class TFLiteEngine(Engine):
    """Shared by every backend that runs a .tflite file through the LiteRT Interpreter."""

    name = "tflite"

    def __init__(self, model_path: Path, spec: InputSpec, n_labels: int, *, threads: int = 2,
                 delegates: list | None = None):
        mod = interpreter_module()
        model_path = Path(model_path)
        try:
            self.interp = mod.Interpreter(model_path=str(model_path), num_threads=threads,
                                          experimental_delegates=delegates)
            self.interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise EngineError(f"cannot load {model_path}: {e}") from None
        inp = self.interp.get_input_details()
        out = self.interp.get_output_details()
        if len(inp) != 1 or len(out) != 1:
            raise EngineError(f"{model_path}: expected 1 input and 1 output, "
                              f"got {len(inp)} and {len(out)}")
        self._in, self._out = inp[0], out[0]
        shape = tuple(int(v) for v in self._in["shape"])
        want = (spec.height, spec.width, spec.channels)
        if len(shape) != 4 or shape[1:] != want:
            raise EngineError(f"{model_path}: model input {shape} does not match the bundle's "
                              f"input spec (N, {want[0]}, {want[1]}, {want[2]})")
        if int(self._out["shape"][-1]) != n_labels:
            raise EngineError(f"{model_path}: model has {int(self._out['shape'][-1])} outputs "
                              f"but the bundle lists {n_labels} labels")
        self.batch = shape[0]
        self.threads = threads
        self._in_q = self._in["quantization"]
        self._out_q = self._out["quantization"]
        self._in_dtype = self._in["dtype"]

    def invoke(self, pixels: np.ndarray) -> np.ndarray:
        x = to_input_tensor(pixels, self._in_dtype, *self._in_q)
        n = x.shape[0]
        results = []
        for i in range(0, n, self.batch):
            chunk = x[i:i + self.batch]
            if chunk.shape[0] != self.batch:   # a static-batch model and a partial last chunk
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - chunk.shape[0], 0)])
            self.interp.set_tensor(self._in["index"], chunk)
            self.interp.invoke()
            results.append(self.interp.get_tensor(self._out["index"])[: min(self.batch, n - i)])
        y = np.concatenate(results) if len(results) > 1 else results[0]
        if y.dtype != np.float32:
            scale, zp = self._out_q
            y = (y.astype(np.float32) - zp) * scale
        return y

    def describe(self) -> str:
        return f"{self.name} (threads={self.threads})"


@register
class CpuEngine(TFLiteEngine):
    name = "cpu"

    @classmethod
    def available(cls):
        try:
            interpreter_module()
        except EngineError as e:
            return str(e)
        return None
