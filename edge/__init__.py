"""The edge side: inference on clinic devices, local records, local training, participation.

``Predictor`` (onnxruntime only) is importable without torch; the training parts import torch
lazily, only when a device trains. Importing this package never imports torch or dp-accounting.
"""

from bedside.edge.predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]
