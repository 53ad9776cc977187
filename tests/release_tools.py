"""Helpers for release tests: other models, staging pushes, driving a fleet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bedside.manifest import Manifest, load_manifest, verify_model_file, write_model_dir


def other_model(src: Path, dst: Path, scale: float = 0.5, pad_bytes: int = 0) -> Path:
    """A copy of the model directory ``src`` with its weights scaled (another model, same
    schema). ``pad_bytes`` adds an unused initializer of that size (a large model)."""
    import onnx
    from onnx import numpy_helper

    from bedside.models.onnx_weights import read_weights, replace_weights

    m = load_manifest(src)
    data = verify_model_file(src, m)
    names = list(m.parameters)
    weights = {k: (v * scale).astype(v.dtype) for k, v in read_weights(data, names).items()}
    data = replace_weights(data, weights)
    if pad_bytes:
        proto = onnx.load_from_string(data)
        pad = np.random.default_rng(0).integers(0, 255, pad_bytes, dtype=np.uint8)
        proto.graph.initializer.append(numpy_helper.from_array(pad, "unused_padding"))
        data = proto.SerializeToString()
    m2 = Manifest.from_dict(m.to_dict())
    m2.name = f"{m.name}-pushed"
    m2.files = {}
    write_model_dir(dst, data, m2)
    return dst


def drive(fleet: Any, steps: int = 30, advance: float = 0.0) -> None:
    """Step the in-memory aggregator and agents; ``advance`` the clock between steps."""
    for _ in range(steps):
        fleet.aggregator.step(0.0)
        for a in fleet.agents:
            a.step(0.0)
        if advance:
            fleet.clock.advance(advance)


def stores(agg: Any) -> tuple[Any, Any, Any]:
    return agg.cfg, agg.rollouts.store, agg.registry


class InferenceLoop:
    """Point-of-care inference through a swap: predicts with ``models.predictor()`` in a loop on
    a thread, recording the versions that served and any error."""

    def __init__(self, models: Any) -> None:
        import threading

        self.models = models
        self.x = models.manifest().schema.reference_rows(4)
        self.errors: list[BaseException] = []
        self.served: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                p = self.models.predictor()
                self.served.add(p.version)
                assert np.isfinite(p.predict_proba(self.x)).all()
            except BaseException as exc:
                self.errors.append(exc)

    def __enter__(self) -> InferenceLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
