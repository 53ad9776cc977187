"""Train a starting model, export it, check it and write a model directory.

This is what ``bedside models export`` runs, and what the demo uses to create version 1 of a
federation's model. The held-out split is never trained on: parity and test metrics come from it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bedside.constants import ONNX_INPUT, ONNX_OPSET, ONNX_OUTPUT, QUANTIZED_FILE
from bedside.manifest import Manifest, write_model_dir
from bedside.metrics import evaluate
from bedside.models.datasets import Dataset, train_test_split
from bedside.models.export import (
    check_parameter_names,
    check_parity,
    onnx_probabilities,
    to_onnx_bytes,
)
from bedside.models.spec import ArchSpec
from bedside.models.train import FitResult, TrainConfig, fit
from bedside.models.zoo import build
from bedside.privacy.dpsgd import DPSGDPlan

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = {"wdbc": 40, "digits": 30, "vitals": 30}


def export_model(
    ds: Dataset,
    arch: str,
    out_dir: str | Path,
    *,
    name: str | None = None,
    version: int = 1,
    parent_version: int | None = None,
    train: TrainConfig | None = None,
    dp: DPSGDPlan | None = None,
    params: dict[str, Any] | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    quantize: str | None = None,
    privacy: dict[str, Any] | None = None,
) -> Manifest:
    """Train ``arch`` on ``ds`` (minus a held-out split), export, check, write ``out_dir``.

    ``privacy`` describes the DP guarantee of the training (empty for a non-private model); the
    caller computes it with the accountant from the returned :class:`FitResult` in
    ``manifest.training['fit']``.

    Input scaling: without ``dp`` the model standardises its inputs with the training split's
    mean and standard deviation (the engineer's own rows, on their own machine; the held-out
    split never influences the model). With ``dp`` the schema's scaling is kept as it is:
    fitting it on the rows would be a release no accountant saw, so a DP caller brings scaling
    from public knowledge or from an accounted release
    (:mod:`bedside.federation.statistics`).
    """
    if quantize not in (None, "int8"):
        from bedside.errors import InputError

        raise InputError(f"--quantize supports only 'int8', not {quantize!r}")
    cfg = train or TrainConfig(epochs=DEFAULT_EPOCHS.get(ds.name, 30))
    train_ds, test_ds = train_test_split(ds, test_fraction=test_fraction, seed=split_seed)
    scaling = "schema (public or accounted constants)"
    if dp is None:
        from dataclasses import replace

        from bedside.models.datasets import fit_scaling

        schema = fit_scaling(ds.schema, train_ds.x, method="standard")
        ds, train_ds, test_ds = (replace(d, schema=schema) for d in (ds, train_ds, test_ds))
        scaling = "standardised on the training split"
    spec = ArchSpec.for_schema(arch, ds.schema, **(params or {}))
    net = build(spec, ds.schema, seed=cfg.seed)
    result: FitResult = fit(net, train_ds.x, train_ds.y, cfg, dp)
    onnx_bytes = to_onnx_bytes(net, ds.schema)
    parameters = check_parameter_names(net, onnx_bytes)
    parity = check_parity(net, onnx_bytes, test_ds.x)
    probs = onnx_probabilities(onnx_bytes, test_ds.x, ds.schema.labels)
    metrics: dict[str, Any] = {"test": evaluate(test_ds.y, probs)}
    manifest = Manifest(
        name=name or f"{ds.name}-{arch}",
        version=version,
        parent_version=parent_version,
        schema=ds.schema,
        sha256="",
        opset=ONNX_OPSET,
        arch=spec.to_dict(),
        output={"probabilities": ONNX_OUTPUT, "input": ONNX_INPUT, "labels": list(ds.schema.labels),
                "format": "tensor"},
        parity=parity,
        metrics=metrics,
        privacy=privacy or {},
        parameters=parameters,
        training={"dataset": ds.name, "source": ds.source, "rows_train": len(train_ds),
                  "rows_test": len(test_ds), "split_seed": split_seed,
                  "test_fraction": test_fraction, "scaling": scaling,
                  "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                  "fit": result.to_dict()},
    )
    extra: dict[str, bytes] = {}
    if quantize == "int8":
        from bedside.models.quantize import compare, quantize_int8

        q = quantize_int8(onnx_bytes)
        manifest.extra["quantization"] = {"file": QUANTIZED_FILE, "scheme": "dynamic int8 "
                                          "(onnxruntime quantize_dynamic, QInt8 weights)",
                                          **compare(onnx_bytes, q, test_ds.x, test_ds.y,
                                                  ds.schema.labels)}
        extra[QUANTIZED_FILE] = q
    write_model_dir(out_dir, onnx_bytes, manifest, extra)
    log.info("wrote %s (version %d) to %s", manifest.name, version, out_dir)
    return manifest
