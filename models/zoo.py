"""The model zoo (torch): logistic regression, MLP and a 1-D CNN for vitals windows.

Every network starts with a :class:`Standardize` layer holding the schema's scaling constants as
buffers, so feature scaling is part of the exported ONNX graph and never fitted on clinic data.
Buffers are not parameters: federated updates carry only ``named_parameters()``, whose names are
also the ONNX initializer names (checked at export).

Networks return logits for training; with ``net.probabilities = True`` (set by the exporter) the
forward pass ends in a softmax, which is what the ONNX file outputs.

Binary classifiers have a single-logit head ``z`` (logistic regression proper): the logits are
``[0, z]``, so the softmax is ``[1 - sigmoid(z), sigmoid(z)]``. A two-logit head has one redundant
degree of freedom, and under differential privacy every redundant coordinate is pure added noise.
"""

from __future__ import annotations

import torch
from torch import nn

from bedside.models.spec import ArchSpec
from bedside.schema import Schema


class Standardize(nn.Module):
    """``(x - loc) / scale`` per feature; constants from the schema, stored as buffers."""

    loc: torch.Tensor
    inv_scale: torch.Tensor

    def __init__(self, schema: Schema) -> None:
        super().__init__()
        loc, scale = schema.loc_scale()
        shape = (1, -1, 1) if schema.kind == "timeseries" else (1, -1)
        self.register_buffer("loc", torch.from_numpy(loc).reshape(shape))
        self.register_buffer("inv_scale", torch.from_numpy(1.0 / scale).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.loc) * self.inv_scale


class BedsideNet(nn.Module):
    """A classifier: standardise, body (the trainable part), optional softmax."""

    def __init__(self, spec: ArchSpec, schema: Schema, body: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.standardize = Standardize(schema)
        self.body = body
        self.probabilities = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.body(self.standardize(x))
        if self.spec.n_classes == 2:  # single-logit head: logits [0, z]
            logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
        return torch.softmax(logits, dim=-1) if self.probabilities else logits


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


class _GlobalAvgPool1d(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=-1)


def _mlp_body(spec: ArchSpec, hidden: list[int]) -> nn.Module:
    layers: list[nn.Module] = [_Flatten()] if spec.window else []
    width = spec.flat_inputs
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        if spec.params.get("dropout", 0.0):
            layers.append(nn.Dropout(float(spec.params["dropout"])))
        width = int(h)
    layers.append(nn.Linear(width, spec.head_width))
    return nn.Sequential(*layers)


def _cnn1d_body(spec: ArchSpec) -> nn.Module:
    channels = [int(c) for c in spec.params["channels"]]
    k = int(spec.params["kernel_size"])
    layers: list[nn.Module] = []
    width = spec.n_features
    for c in channels:
        layers += [nn.Conv1d(width, c, kernel_size=k, padding=k // 2), nn.ReLU()]
        width = c
    layers.append(_GlobalAvgPool1d())
    if spec.params.get("dropout", 0.0):
        layers.append(nn.Dropout(float(spec.params["dropout"])))
    layers.append(nn.Linear(width, spec.head_width))
    return nn.Sequential(*layers)


def build(spec: ArchSpec, schema: Schema, seed: int | None = None) -> BedsideNet:
    """Build the network for ``spec``; ``seed`` makes the initial weights reproducible."""
    if seed is not None:
        torch.manual_seed(seed)
    if spec.name == "logreg":
        body = _mlp_body(spec, [])
    elif spec.name == "mlp":
        body = _mlp_body(spec, list(spec.params["hidden"]))
    else:
        body = _cnn1d_body(spec)
    return BedsideNet(spec, schema, body)


def trainable_shapes(net: nn.Module) -> dict[str, list[int]]:
    """Names and shapes of the parameters a federated update carries."""
    return {n: list(p.shape) for n, p in net.named_parameters()}
