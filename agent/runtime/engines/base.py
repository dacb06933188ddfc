from __future__ import annotations

import abc
import logging
import queue
from pathlib import Path
from typing import ClassVar

import numpy as np

from agent.preprocess import InputSpec

log = logging.getLogger("engine")


class EngineError(Exception):
    """The model cannot be run on this backend; the message says why and what to do."""


class Engine(abc.ABC):
    name: ClassVar[str]

    @classmethod
    def available(cls) -> str | None:
        """None when this backend can run here, else the reason it cannot."""
        return None

    @abc.abstractmethod
    def invoke(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels (N, H, W, C) from agent.preprocess -> float32 probabilities (N, labels)."""

    def describe(self) -> str:
        return self.name


class EnginePool(Engine):
    """N engines of one model behind one invoke(), for N inspect threads: a LiteRT
    interpreter must not be used by two threads at once, and on a small CPU two
    single-threaded interpreters keep both cores busier than one two-threaded one."""

    name = "pool"

    def __init__(self, engines: list[Engine]):
        self.engines = list(engines)
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for e in self.engines:
            self._free.put(e)
        if all(callable(getattr(e, "maps", None)) for e in self.engines):
            self.maps = self._maps          # an anomaly pool gives maps like its engines

    def _maps(self, pixels: np.ndarray) -> list[np.ndarray]:
        engine = self._free.get()
        try:
            return engine.maps(pixels)
        finally:
            self._free.put(engine)

    def invoke(self, pixels: np.ndarray) -> np.ndarray:
        engine = self._free.get()
        try:
            return engine.invoke(pixels)
        finally:
            self._free.put(engine)

    def describe(self) -> str:
        return f"{self.engines[0].describe()} x{len(self.engines)}"


ENGINES: dict[str, type[Engine]] = {}


def register(cls: type[Engine]) -> type[Engine]:
    ENGINES[cls.name] = cls
    return cls


def create_engine(delegate: str, model_path: Path, spec: InputSpec, n_labels: int, *,
                  threads: int = 2, device: str | None = None, cpu_fallback: bool = False,
                  cpu_model_path: Path | None = None) -> Engine:
    """Build the configured backend. With cpu_fallback, a backend that cannot start here
    (no Edge TPU plugged in, say) falls back to the CPU with a warning instead of failing."""
    if delegate not in ENGINES:
        raise EngineError(f"unknown delegate {delegate!r}; known: {', '.join(sorted(ENGINES))}")
    cls = ENGINES[delegate]
    try:
        why = cls.available()
        if why:
            raise EngineError(why)
        kwargs = {"device": device} if device else {}
        return cls(model_path, spec, n_labels, threads=threads, **kwargs)
    except EngineError as e:
        if not cpu_fallback or delegate == "cpu":
            raise
        log.warning("%s backend unavailable (%s); falling back to the CPU", delegate, e)
        return ENGINES["cpu"](cpu_model_path or model_path, spec, n_labels, threads=threads)
