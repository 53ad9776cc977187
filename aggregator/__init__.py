"""The aggregator side: rounds, update validation, aggregation strategies, model versions.

``Aggregator`` (in ``bedside.aggregator.service``) is the front door. Nothing here imports torch:
new weights are written into the ONNX graph with ``onnx.numpy_helper``.
"""
