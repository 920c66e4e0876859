"""Lightweight ranking: train a tenant's GBDT, convert it to ONNX, gate it, score with it.

Serving imports only `walkrank.ranking.scorer` (numpy, numba, onnx, onnxruntime); training,
conversion and export pull in xgboost and the converters and never run on the request path.
"""
