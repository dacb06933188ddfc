"""Scoring a trained model exactly as the agent does (agent.decide), whether the output
comes from Keras, the float TFLite or the int8 TFLite through the agent's own engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from agent.bundle import Bundle
from agent.decide import decide, defect_score
from agent.preprocess import add_views

from .data import GOOD


class Scorer:
    """dec is the bundle as the agent will read it, less the files not written yet; its
    threshold is 0.5 until the calibration stage sets the chosen one."""

    def __init__(self, ts, model, out_dir: Path):
        self.ts, self.model = ts, model
        self.views = ts.views
        self.hwc = (ts.spec.height, ts.spec.width, ts.spec.channels)
        self.dec = Bundle(path=out_dir, labels=ts.labels, good_label=GOOD,
                          defect_labels=[c for c in ts.labels if c != GOOD], input=ts.bspec,
                          threshold=0.5, files={})

    def engine(self, path: Path):
        from agent.runtime.engines import create_engine
        return create_engine("cpu", path, self.ts.bspec, len(self.ts.labels), threads=2)

    def run(self, eng, Xs) -> np.ndarray:
        """(N, tiles x views, K) through an agent engine."""
        return np.stack([eng.invoke(add_views(Xs[i], self.views)) for i in range(len(Xs))])

    def keras_probs(self, Xs, chunk: int = 32) -> np.ndarray:
        out = [self.model.predict(add_views(Xs[i:i + chunk].reshape((-1,) + self.hwc), self.views)
                                  .astype(np.float32), batch_size=32, verbose=0)
               for i in range(0, len(Xs), chunk)]
        return np.concatenate(out).reshape(len(Xs), self.ts.bspec.batch, -1)

    def scores(self, P, dec: Bundle | None = None) -> np.ndarray:
        return np.array([defect_score(p, dec or self.dec)[0] for p in P])

    def verdict(self, p) -> str:
        return decide(p, self.dec, self.dec.threshold)[1]

    def metrics(self, P, truth) -> tuple[dict, list[str]]:
        from .evaluate import verdict_metrics
        preds = [self.verdict(p) for p in P]
        return verdict_metrics(truth, preds, GOOD, self.ts.labels), preds

    def with_views(self, v: int) -> Bundle:
        return dataclasses.replace(self.dec, input=dataclasses.replace(self.ts.bspec, views=v))

    def first_views(self, P, v: int) -> np.ndarray:
        """A tile's first v views: the layout a v-view bundle has."""
        T = self.ts.spec.n_tiles
        return P.reshape(len(P), T, self.views, -1)[:, :, :v].reshape(len(P), T * v, -1)
