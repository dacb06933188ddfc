"""Google Coral Edge TPU through the libedgetpu delegate (pycoral's make_interpreter, inlined)."""

from __future__ import annotations

import ctypes.util
import platform
from pathlib import Path

from agent.preprocess import InputSpec
from agent.runtime.engines.base import EngineError, register
from agent.runtime.engines.litert import TFLiteEngine, interpreter_module

_LIB = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib",
        "Windows": "edgetpu.dll"}.get(platform.system(), "libedgetpu.so.1")

_INSTALL = ("install the Edge TPU runtime (Debian: 'apt-get install libedgetpu1-std' from "
            "Coral's package repository) and plug in the Coral; or set [model] delegate = 'cpu'")


@register
class EdgeTpuEngine(TFLiteEngine):
    name = "edgetpu"

    @classmethod
    def available(cls):
        if ctypes.util.find_library("edgetpu") is None and not Path(f"/usr/lib/{_LIB}").exists():
            return f"{_LIB} not found: {_INSTALL}"
        return None

    def __init__(self, model_path: Path, spec: InputSpec, n_labels: int, *, threads: int = 1,
                 device: str | None = None):
        mod = interpreter_module()
        options = {"device": device} if device else {}
        try:
            delegate = mod.load_delegate(_LIB, options)
        except (ValueError, OSError) as e:
            raise EngineError(f"cannot open Edge TPU {device or '(first found)'}: {e}; {_INSTALL}") from None
        super().__init__(model_path, spec, n_labels, threads=threads, delegates=[delegate])
        self.device = device

    def describe(self) -> str:
        return f"edgetpu ({self.device or 'first device'})"
