"""Turn a classifier's raw ONNX outputs into class probabilities in the schema's label order.

Bedside-exported models output one float tensor ``[N, k]`` already in label order. Imported models
may output a ZipMap (a sequence of ``{class: probability}`` maps, as skl2onnx does by default) or a
tensor in the classifier's own class order; the manifest's ``output`` block says which
(``format``, ``classes``), and this function normalises both. Used by the Predictor and by
``bedside models import``'s self-test, so the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bedside.errors import ModelError


def to_probabilities(output: Mapping[str, Any], raw: Any, labels: Sequence[str]) -> np.ndarray:
    """``raw`` is the value of the probability output; returns float64 ``[N, len(labels)]``.

    ``output["classes"]`` are the model's own class keys in its output order (ZipMap keys, or the
    column order of a tensor) and ``output["class_labels"]`` the schema label of each; both
    default to the schema's labels (a Bedside-exported model).
    """
    classes = [str(c) for c in output.get("classes", labels)]
    class_labels = [str(c) for c in output.get("class_labels", classes)]
    if output.get("format", "tensor") == "zipmap":
        if not isinstance(raw, list):
            raise ModelError("model output: expected a sequence of maps (ZipMap)")
        try:
            probs = np.array([[float(m[_key(m, c)]) for c in classes] for m in raw],
                             dtype=np.float64).reshape(len(raw), len(classes))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model output: ZipMap does not hold the classes {classes} ({exc})"
                             ) from None
    else:
        probs = np.asarray(raw, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ModelError(f"model output: probabilities of shape {list(probs.shape)}, expected "
                         f"[N, {len(classes)}]")
    if class_labels != [str(label) for label in labels]:
        try:
            order = [class_labels.index(str(label)) for label in labels]
        except ValueError:
            raise ModelError(f"model output: classes {class_labels} do not cover the labels "
                             f"{list(labels)}") from None
        probs = probs[:, order]
    return probs


def _key(m: Mapping[Any, Any], cls: str) -> Any:
    if cls in m:
        return cls
    for k in m:  # integer class keys
        if str(k) == cls:
            return k
    raise KeyError(cls)
