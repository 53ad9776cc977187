"""The model side: reference data, the model zoo, ONNX export and import, the registry.

Importing this package is cheap and torch-free. The torch parts (``zoo``, ``train``, ``export``,
``pipeline``) are imported explicitly by the code that trains; the aggregator uses only the
torch-free modules (``spec``, ``onnx_weights``, ``registry``, ``datasets``, ``partition``).
"""
