"""Local training on the device (torch; the ``train`` extra). Imported only when a device trains.

``local_update`` rebuilds the network from the manifest's architecture spec, loads the global
weights from the ONNX file (initializer names = torch parameter names), trains on the device's
records (with record-level DP-SGD when planned) and returns the update
``delta = w_local - w_global`` for the trainable parameters only, plus a description of what the
training did (checked against the privacy ledger's plan).
"""

from __future__ import annotations

import numpy as np
import torch

from bedside.errors import ModelError
from bedside.federation.settings import TrainSettings
from bedside.manifest import Manifest
from bedside.models.onnx_weights import read_weights
from bedside.models.spec import ArchSpec
from bedside.models.train import FitResult, TrainConfig, fit
from bedside.models.zoo import build
from bedside.privacy.dpsgd import DPSGDPlan


def local_update(manifest: Manifest, onnx_bytes: bytes, x: np.ndarray, y: np.ndarray,
                 train: TrainSettings, dp: DPSGDPlan | None, seed: int | None = None,
                 ) -> tuple[dict[str, np.ndarray], FitResult]:
    if manifest.arch is None:
        raise ModelError(f"model {manifest.name!r} has no architecture spec; it cannot be trained")
    torch.set_num_threads(1)
    spec = ArchSpec.from_dict(manifest.arch)
    net = build(spec, manifest.schema)
    global_w = read_weights(onnx_bytes, manifest.parameters)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name not in global_w or tuple(global_w[name].shape) != tuple(p.shape):
                raise ModelError(f"parameter {name} does not match the ONNX model's initializer")
            p.copy_(torch.from_numpy(np.array(global_w[name], dtype=np.float32)))
    cfg = TrainConfig(epochs=train.epochs, batch_size=train.batch_size, lr=train.lr,
                      optimizer=train.optimizer, weight_decay=train.weight_decay, seed=seed)
    result = fit(net, x, y, cfg, dp)
    delta = {name: (p.detach().numpy().astype(np.float32) - global_w[name])
             for name, p in net.named_parameters()}
    return delta, result
