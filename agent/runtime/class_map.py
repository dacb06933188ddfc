"""Where a classifier bundle sees the defect: its optional map model (agent.bundle.MAP_MODEL,
convert.model.Lite0Classifier.map_model), pixels -> per-cell evidence in [0, 1]. Run for
rejects only, after the gate command (agent.runtime.inspector.Inspector.defect_map), like an anomaly
bundle's patch map, so the operator page and the recorder can show WHERE."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .engines.base import EngineError
from .engines.litert import interpreter_module
from agent.preprocess import InputSpec, to_input_tensor


class MapModel:
    def __init__(self, path: Path, spec: InputSpec, threads: int = 1):
        try:
            self.interp = interpreter_module().Interpreter(model_path=str(path), num_threads=threads)
            self.interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise EngineError(f"cannot load the defect map model {path}: {e}") from None
        inp, out = self.interp.get_input_details(), self.interp.get_output_details()
        want = (1, spec.height, spec.width, spec.channels)
        if len(inp) != 1 or len(out) != 1 or tuple(int(v) for v in inp[0]["shape"]) != want \
                or len(out[0]["shape"]) != 3:
            raise EngineError(f"{path}: not a defect map model for input {want} (it takes "
                              f"{[tuple(i['shape']) for i in inp]} and gives "
                              f"{[tuple(o['shape']) for o in out]})")
        self._in, self._out = inp[0], out[0]
        self._lock = threading.Lock()      # one interpreter; rejects come from every inspect worker

    def maps(self, pixels: np.ndarray) -> list[np.ndarray]:
        """(N, H, W, C) uint8 -> N (h, w) float maps in [0, 1]."""
        with self._lock:
            return [self._one(p) for p in pixels]

    def _one(self, pixels: np.ndarray) -> np.ndarray:
        x = to_input_tensor(np.asarray(pixels)[None], self._in["dtype"], *self._in["quantization"])
        self.interp.set_tensor(self._in["index"], x)
        self.interp.invoke()
        m = self.interp.get_tensor(self._out["index"])[0]
        if m.dtype != np.float32:
            s, z = self._out["quantization"]
            m = (m.astype(np.float32) - z) * s
        return m
