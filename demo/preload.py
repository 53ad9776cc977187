"""Imports the demo's fork server loads once for every service process (see
:mod:`bedside.demo.processes`). Importing it runs no computation."""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger(__name__)

MODULES = (
    "numpy",
    "paho.mqtt.client",
    "onnx",
    "onnxruntime",
    "dp_accounting",
    "torch",
    "torch.func",
    "torch._dynamo",  # imported by torch.optim on first use (0.8 s): paid once, here
    "torch.onnx",
    "onnxscript",
    "sklearn.datasets",
    "bedside.models.export",
    "bedside.models.datasets",
    "bedside.models.partition",
    "bedside.demo.run",
    "bedside.cli",
    "bedside.edge.agent",
    "bedside.edge.agent_cli",
    "bedside.edge.cli",
    "bedside.edge.trainer",
    "bedside.aggregator.cli",
    "bedside.aggregator.service",
    "bedside.aggregator.evaluate",
    "bedside.privacy.accountant",
    "bedside.privacy.ledger",
)

for _name in MODULES:
    try:
        importlib.import_module(_name)
    except ImportError as exc:  # an optional part not installed: its process imports what it can
        log.debug("fork server: %s not preloaded (%s)", _name, exc)
